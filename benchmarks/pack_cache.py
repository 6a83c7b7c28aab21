"""Packing the target optimisation's upper layers once per Editor (EditContext's PackCache) against once per
edit step (the plain LinearCompute): CPU seconds per MEMIT edit on the default model, the two editors
interleaved edit by edit on the same CounterFact-val facts, 1 thread; the first edit (set-up) left out.

    .venv/bin/python benchmarks/pack_cache.py   (its run: benchmarks/results/pack_cache-smollm2.txt)
"""
import time, torch
torch.set_num_threads(1)
from workers import settings
from workers.data import load_edit_dataset
from workers.editing import Editor, load_hparams
from workers.models import load_model
from workers.packed_linear import LinearCompute
from workers.sampling import seeded_sample
pool = load_edit_dataset("counterfact-val", settings.data_dir())
facts = [pool[i] for i in seeded_sample(len(pool), 6, 3)]
editors = {}
for arm in ("cached", "per_step"):
    model, tok = load_model("smollm2-135m")
    ed = Editor(model, tok, "memit", load_hparams("memit", model))
    if arm == "per_step":
        ed.ctx.compute = LinearCompute()  # the old behaviour: pack at every step
    editors[arm] = ed
times = {a: [] for a in editors}
for fact in facts:
    for arm, ed in editors.items():
        s = time.process_time(); ed.edit_step([fact]); times[arm].append(time.process_time() - s)
for arm, t in times.items():
    print(arm, "CPU s per edit (all; the mean leaves out the first):", [round(x, 2) for x in t], "mean", round(sum(t[1:]) / len(t[1:]), 3))
print("cached / per_step:", round(sum(times['cached'][1:]) / sum(times['per_step'][1:]), 3))
