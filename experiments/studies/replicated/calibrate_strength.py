"""Edit strength on the validation split (issue 31): the settings of the replicated study's matched-strength
arms are chosen here, on CounterFact-val, never on the test facts the study edits.

For each arm, N sequential single edits of a seeded CounterFact-val sample (seed 2: the issue-34 comparison
edits seed 0's, the single-edit check seed 1's), from the unedited model: per edit the optimised target's
‖δ‖ and final loss (the `edits` table's delta_norm and loss) and whether the greedy continuation of the edit
prompt begins with the new object right after the edit. Arms: the bases, their EAC arms with the searched
settings, and the bases with their own knobs turned down: a smaller `clamp_norm_factor` (MEMIT's bound on
‖δ‖, a fraction of the unedited target's norm: 0.75 by default on this model) or fewer optimisation steps
(`num_steps`, 25 by default), so that the settings whose mean ‖δ‖ and final loss match EAC's can be read off.

    .venv/bin/python experiments/studies/replicated/calibrate_strength.py [N] [ARM ...]
        ARM: a method, or METHOD@FIELD=X[,FIELD=Y] with FIELD a hyper-parameter of the method, or `clamp`
        (clamp_norm_factor) or `steps` (num_steps): e.g. memit@clamp=0.4, memit@steps=6
Its run: experiments/results/replicated/calibrate_strength.log
"""
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from workers import settings
from workers.data import load_edit_dataset
from workers.editing import Editor, load_hparams
from workers.evaluation.intervals import mean_interval
from workers.generation import begins_with, greedy_continuations
from workers.models import load_model
from workers.sampling import seeded_sample

torch.set_num_threads(1)
count = int(sys.argv[1]) if len(sys.argv) > 1 else 30
arms = sys.argv[2:] or ["memit", "memit-eac", "memit@clamp=0.45", "memit@clamp=0.35",
                        "alphaedit", "alphaedit-eac", "alphaedit@clamp=0.45", "alphaedit@clamp=0.35"]
pool = load_edit_dataset("counterfact-val", settings.data_dir())
facts = [pool[i] for i in seeded_sample(len(pool), count, 2)]
model, tokenizer = load_model("smollm2-135m")
cache = os.environ.get("EAC_CACHE_DIR", str(Path.home() / ".cache" / "eac"))


def interval(values: list[float]) -> str:
    """Mean with its 95% percentile-bootstrap interval (the project's: workers.evaluation.intervals)."""
    low, high = mean_interval(values)
    return f"{statistics.fmean(values):.1f} [{low:.1f}, {high:.1f}]"


for arm in arms:
    method, _, setting = arm.partition("@")
    overrides = {}
    for assignment in filter(None, setting.split(",")):
        field, value = assignment.split("=")
        field = {"clamp": "clamp_norm_factor", "steps": "num_steps"}.get(field, field)
        overrides[field] = int(value) if value.isdigit() else float(value)
    started = time.time()
    editor = Editor(model, tokenizer, method, load_hparams(method, model, overrides=overrides or None), cache_dir=cache,
                    data_root=settings.data_dir())
    norms, losses, hits = [], [], []
    for fact in facts:
        record = editor.edit_step([fact])
        (continuation,) = greedy_continuations(model, tokenizer, [fact.prompt], max_new_tokens=6)
        norms.append(record.delta_norm)
        losses.append(record.loss)
        hits.append(float(begins_with(continuation, fact.target_new)))
    editor.revert()
    print(f"{arm:22s} n={count} mean ||delta|| {interval(norms)}  median loss {statistics.median(losses):.3f}  "
          f"mean loss {statistics.fmean(losses):.3f}  efficacy right after the edit {statistics.fmean(hits):.3f}  "
          f"({time.time() - started:.0f} s)", flush=True)
