"""Edit 57's fact (CounterFact case 3561) as a single edit on the unedited default model, with ROME and
ROME-NAS (default settings, the reference code's prompt key): the step's ‖ΔW‖₁ in points of the base
matrix's ‖W‖₁, the solved ‖v*‖ before and after the rescaling, and the rank-one update's denominator
(C⁻¹k*)ᵀk_p. A cheap look at whether the study's edit-57 jump lives in v* (what NAS rescales) or in the
update's denominator (what it does not touch). Output: stdout; the run is experiments/results/study-smollm2/nas_case3561.log."""
import os
import sys
from pathlib import Path

import torch
from workers import settings
from workers.data import load_edit_dataset
from workers.editing import Editor, load_hparams
from workers.editing.keys import per_template_at_subject
from workers.models import arch_spec, load_model

torch.set_num_threads(1)
fact = next(r for r in load_edit_dataset("counterfact", settings.data_dir()) if r.case_id == 3561)
print("case", fact.case_id, repr(fact.prompt.format(fact.subject)), "->", fact.target_new, flush=True)
model, tokenizer = load_model("smollm2-135m")
cache = os.environ.get("EAC_NAS_CACHE", str(Path.home() / ".cache" / "eac"))
for method in ("rome", "rome-nas"):
    hp = load_hparams(method, model)
    editor = Editor(model, tokenizer, method, hp, cache_dir=cache, data_root=settings.data_dir())
    module = arch_spec(model).mlp_out_name(hp.layer)
    keys = per_template_at_subject(model, tokenizer, [fact], module, editor.ctx.context_templates(hp), inputs=True)[0]
    direction = editor.ctx.solve_second_moment(hp.layer, keys.mean(dim=0))
    denominator = float(direction @ keys[0].double())
    record = editor.edit_step([fact])
    (relative,) = record.relative_l1.values()
    left = editor.log[-1].layers[0].left
    print(method, "step_points", round(100 * (relative - 1), 2), "dw_l1", round(record.dw_l1, 1),
          "denominator", f"{denominator:.4g}", "residual_norm", round(float(left.norm()) * abs(denominator), 3),
          "loss", round(record.loss, 4), "delta_norm", round(record.delta_norm, 3), flush=True)
    editor.revert()
