"""Single-edit efficacy of the NAS and ENCORE arms against their bases on the default model (issue 34).

For each of the first N facts of a seeded CounterFact-val sample (seed 1, so not the comparison's
seed-0 sample): edit the unedited model once, score, revert. Scores: efficacy (the greedy continuation
of the edit prompt begins with target_new), paraphrase (same on the first rephrase), CounterFact
efficacy (P(new) > P(true) on the prompt, teacher-forced), and the edit's ‖ΔW‖_F. ROME arms use MEMIT's
context templates [[10, 5]] as the comparison spec does. NAS references come from the cache directory
(EAC_CACHE_DIR or ~/.cache/eac), shared with `eac run`.

    .venv/bin/python experiments/studies/nas-encore/single_edit.py [N] [METHODS]   (its run: experiments/results/nas-encore/single_edit.log)
"""
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from workers import settings
from workers.data import load_edit_dataset
from workers.editing import Editor, load_hparams
from workers.generation import begins_with, greedy_continuations
from workers.models import load_model
from workers.sampling import seeded_sample

torch.set_num_threads(1)
count = int(sys.argv[1]) if len(sys.argv) > 1 else 8
methods = sys.argv[2].split(",") if len(sys.argv) > 2 else ["rome", "rome-nas", "memit", "memit-nas", "memit-encore"]
pool = load_edit_dataset("counterfact-val", settings.data_dir())
facts = [pool[i] for i in seeded_sample(len(pool), count, 1)]
model, tokenizer = load_model("smollm2-135m")
cache = os.environ.get("EAC_CACHE_DIR", str(Path.home() / ".cache" / "eac"))


@torch.no_grad()
def target_logprob(prompt: str, target: str) -> float:
    prompt_ids = tokenizer(prompt)["input_ids"]
    target_ids = tokenizer(" " + target.strip(), add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + target_ids])
    logprobs = F.log_softmax(model(ids).logits[0, len(prompt_ids) - 1:-1].float(), dim=-1)
    return float(logprobs.gather(1, torch.tensor(target_ids).unsqueeze(1)).sum())


for method in methods:
    overrides = {"context_template_lengths": [[10, 5]]} if method.startswith("rome") else None
    started = time.time()
    editor = Editor(model, tokenizer, method, load_hparams(method, model, overrides=overrides), cache_dir=cache,
                    data_root=settings.data_dir())
    rows = []
    for fact in facts:
        record = editor.edit_step([fact])
        prompt, rephrase = greedy_continuations(model, tokenizer, [fact.prompt, fact.rephrase_prompts[0]], max_new_tokens=6)
        rows.append((float(begins_with(prompt, fact.target_new)), float(begins_with(rephrase, fact.target_new)),
                     float(target_logprob(fact.prompt, fact.target_new) > target_logprob(fact.prompt, fact.target_true)),
                     record.dw_fro, record.steps, record.skipped))
        editor.revert()
    n = len(rows)
    print(f"{method:13s} n={n} efficacy {sum(r[0] for r in rows) / n:.3f} paraphrase {sum(r[1] for r in rows) / n:.3f} "
          f"cf_efficacy {sum(r[2] for r in rows) / n:.3f} mean_dW_fro {sum(r[3] for r in rows) / n:.3f} "
          f"mean_steps {sum(r[4] for r in rows) / n:.1f} skipped {sum(r[5] for r in rows)} "
          f"({time.time() - started:.0f} s)", flush=True)
