"""Seconds per edit for each method on the default model, against the naive loop, in one run.

For each method: one warm-up edit, then the mean wall time of ``-n`` (≥ 5) sequential CounterFact
edits (statistics and context templates are cached beforehand, as in any long trajectory). The naive
cost of the same edits is measured in the same run: for each edit, (optimisation steps it took) ×
(one full forward + backward of its rewriting batch through the whole model, logits at every
position, δ injected by a hook — what the naive ROME loop does each step), timed on that batch.
EAC variants are also reported as EAC time / base time (paper Table 1: no overhead).

Locate-then-edit methods run twice in the same run: with the target optimiser's prefix reuse (the
default, ``new``) and without it (``prefix_reuse: false``, the cached-hidden-state path, ``old``),
on the same edits; each record's per-phase seconds (keys, targets, update, ...) are averaged and
printed. On a shared machine the ratios are the meaningful numbers, not the seconds.

    python benchmarks/edit_latency.py --methods rome,rome-eac,memit,memit-eac -n 5 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

from workers.data import load_counterfact
from workers.editing import Editor, load_hparams
from workers.editing.methods import split_method
from workers.editing.targets import TargetProblem
from workers.hooks import add_to_output
from workers.models import arch_spec, load_model


def naive_step_seconds(model, problem: TargetProblem, layer_module: str, repeats: int = 2) -> float:
    """One full forward + backward of the rewriting batch, δ injected at the subject's last token."""
    delta = torch.zeros_like(problem.v_init, requires_grad=True)
    batch = problem.batch
    rows = range(batch.input_ids.shape[0])
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        with add_to_output(model, layer_module, delta, rows, batch.lookup.tolist()):
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        logprobs = F.log_softmax(logits.float(), dim=-1)
        nll = -logprobs[problem.target_rows, problem.target_pos].gather(1, problem.target_tok.unsqueeze(1)).mean()
        nll.backward()
        delta.grad = None
        timings.append(time.perf_counter() - start)
    return min(timings)


def measure(model, tokenizer, method: str, requests, n: int, overrides: dict | None = None) -> dict:
    hparams = load_hparams(method, model, overrides=overrides)
    editor = Editor(model, tokenizer, method, hparams)  # statistics + templates prepared here, once
    base, _ = split_method(method)
    layer = hparams.layer if hasattr(hparams, "layer") else list(hparams.layers)[-1]
    spec = arch_spec(model)
    injected = spec.mlp_out_name(layer) if base == "rome" else spec.layer_name(layer)
    templates = editor.ctx.context_templates(hparams) if hasattr(hparams, "context_template_lengths") else None
    editor.edit_step([requests[0]])  # warm-up
    seconds, naive, steps, phases = [], [], [], {}
    for request in requests[1: n + 1]:
        record = editor.edit_step([request])
        if record.skipped:
            raise RuntimeError(f"{method}: edit of case {request.case_id} was skipped: {record.error}")
        seconds.append(record.seconds["total"])
        steps.append(record.steps)
        for phase, value in record.seconds.items():
            phases[phase] = phases.get(phase, 0.0) + value / n
        if templates is not None:
            problem = TargetProblem(model, tokenizer, request, layer, templates, init_from="mlp",
                                    config=replace(hparams.target_config(), prefix_reuse=False))
            naive.append(record.steps * naive_step_seconds(model, problem, injected))
    editor.revert()
    per_edit = statistics.mean(seconds)
    naive_mean = statistics.mean(naive) if naive else float("nan")
    return {"method": method, "seconds_per_edit": per_edit, "naive_seconds": naive_mean,
            "ratio": per_edit / naive_mean if naive else float("nan"), "mean_steps": statistics.mean(steps),
            "phases": phases}


def measure_both(model, tokenizer, method: str, requests, n: int) -> dict:
    """The method with prefix reuse and, for the target-optimising methods, without it."""
    row = measure(model, tokenizer, method, requests, n)
    if hasattr(load_hparams(method, model), "prefix_reuse"):
        old = measure(model, tokenizer, method, requests, n, overrides={"prefix_reuse": False})
        row.update(old_seconds_per_edit=old["seconds_per_edit"], old_ratio=old["ratio"], old_phases=old["phases"],
                   new_over_old=row["seconds_per_edit"] / old["seconds_per_edit"], old_steps=old["mean_steps"])
    return row


def phase_text(phases: dict) -> str:
    return " ".join(f"{name} {value:.2f}" for name, value in sorted(phases.items()) if name != "total")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", default="rome,rome-eac,memit,memit-eac,alphaedit,alphaedit-eac,ft-l,ft-m")
    parser.add_argument("-n", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.n < 1:
        parser.error("-n must be at least 1")
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    requests = load_counterfact("edit")[: args.n + 1]
    rows = []
    for method in args.methods.split(","):
        rows.append(measure_both(model, tokenizer, method, requests, args.n))
        row = rows[-1]
        print(f"{method:14s} new {row['seconds_per_edit']:7.2f} s/edit  naive {row['naive_seconds']:7.2f} s  "
              f"ratio {row['ratio']:.2f}  ({row['mean_steps']:.1f} steps)  phases: {phase_text(row['phases'])}",
              flush=True)
        if "old_seconds_per_edit" in row:
            print(f"{'':14s} old {row['old_seconds_per_edit']:7.2f} s/edit  ratio {row['old_ratio']:.2f}  "
                  f"({row['old_steps']:.1f} steps)  phases: {phase_text(row['old_phases'])}  "
                  f"new/old {row['new_over_old']:.2f}", flush=True)
    by_method = {r["method"]: r for r in rows}
    print(f"\n{'method':14s} {'s/edit':>8s} {'naive s':>8s} {'ratio':>6s} {'old s':>8s} {'old/nv':>6s} "
          f"{'new/old':>7s} {'EAC/base':>9s}")
    for row in rows:
        base, constraint = split_method(row["method"])
        overhead = (f"{row['seconds_per_edit'] / by_method[base]['seconds_per_edit']:.2f}"
                    if constraint and base in by_method else "")
        row["eac_over_base"] = float(overhead) if overhead else None
        print(f"{row['method']:14s} {row['seconds_per_edit']:8.2f} {row['naive_seconds']:8.2f} {row['ratio']:6.2f} "
              f"{row.get('old_seconds_per_edit', float('nan')):8.2f} {row.get('old_ratio', float('nan')):6.2f} "
              f"{row.get('new_over_old', float('nan')):7.2f} {overhead:>9s}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
