"""Does ROME-NAS remove the edit-57 norm jump of the study's ROME arm? Same 300-request sample as
study-smollm2 (seed 0), first 58 edits, ROME's default settings (the reference code's prompt key) with
Norm-Anchor Scaling (issue 34). Per edit: ‖W‖₁ relative to the base, ‖ΔW‖₁, and the solved ‖v*‖ before
and after the rescaling. The data directory is EAC_DATA_DIR's; the NAS reference norm is cached under
EAC_NAS_CACHE (default ~/.cache/eac). Output: stdout; the run is experiments/results/study-smollm2/nas_edit57.log."""
import os
import sys
import time
from pathlib import Path

import torch
from orchestrator.driver import select_requests
from workers import settings
from workers.data import load_edit_dataset
from workers.editing import Editor, load_hparams
from workers.models import load_model

torch.set_num_threads(1)
count = int(sys.argv[1]) if len(sys.argv) > 1 else 58
requests = select_requests(load_edit_dataset("counterfact", settings.data_dir()), 300, "random", 0)[:count]
print("case ids 0, 57:", requests[0].case_id, requests[min(57, count - 1)].case_id, flush=True)
model, tokenizer = load_model("smollm2-135m")
cache = os.environ.get("EAC_NAS_CACHE", str(Path.home() / ".cache" / "eac"))
started = time.time()
editor = Editor(model, tokenizer, "rome-nas", load_hparams("rome-nas", model), cache_dir=cache,
                data_root=settings.data_dir())
anchor = editor.ctx.optimiser  # nas.NormAnchoredOptimiser
print("reference norm", anchor.reference, "in", round(time.time() - started), "s", flush=True)
norms = []
rescale = anchor.rescale


def recorded(problem, results):  # the same rescaling, with the norms recorded
    before = [float((problem.mlp_inits[r].double() + res.delta.double()).norm()) for r, res in enumerate(results)]
    rescale(problem, results)
    after = [float((problem.mlp_inits[r].double() + res.delta.double()).norm()) for r, res in enumerate(results)]
    norms.append((before, after))


anchor.rescale = recorded
previous = 1.0


def show(record) -> None:
    global previous
    (module, relative), = record.relative_l1.items()
    before, after = norms[-1]
    print(time.strftime("%H:%M:%S"), record.edit_index, "case", record.case_ids[0], "relative_l1", round(relative, 5),
          "step_points", round(100 * (relative - previous), 2), "dw_l1", round(record.dw_l1, 1),
          "v_star_norm", round(before[0], 3), "->", round(after[0], 3), "loss", round(record.loss, 4), flush=True)
    previous = relative


editor.apply(requests, batch_size=1, on_edit=show)
print("done in", round(time.time() - started), "s")
