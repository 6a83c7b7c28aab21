"""Seconds per edit for each method on the default model, against the naive loop, in one run.

For each method: one warm-up edit, then the mean wall time of ``-n`` (≥ 5) sequential CounterFact
edits (statistics and context templates are cached beforehand, as in any long trajectory). The naive
cost of the same edits is measured in the same run: for each edit, (optimisation steps it took) ×
(one full forward + backward of its rewriting batch through the whole model, logits at every
position, δ injected by a hook — what the naive ROME loop does each step), timed on that batch.

Locate-then-edit methods run with the target optimiser's prefix reuse and packed oneDNN linear layers
(the default, ``new``), with prefix reuse on PyTorch's own linear layers (``unpacked``: the default
before packed_linear.py) and without prefix reuse (``prefix_reuse: false``, the cached-hidden-state
path, ``old``), on the same edits (``--paths`` picks among them). The
arms of one base method (ROME, ROME-EAC, each new and old) are **interleaved**: each arm edits its own
copy of the model, and every request is edited by every arm before the next request, so a change in
the machine's load during the run falls on all of them alike and the ratios between them
(new / old, EAC / base — paper Table 1: no overhead) are measured side by side. Each record's
per-phase seconds (keys, targets, update, ...) are averaged and printed. On a shared machine the
ratios are the meaningful numbers, not the seconds.

    python benchmarks/edit_latency.py --methods rome,rome-eac,memit,memit-eac -n 5 --json out.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from workers.data import load_counterfact
from workers.editing import Editor, load_hparams
from workers.editing.methods import split_method
from workers.editing.targets import TargetProblem
from workers.hooks import add_to_output
from workers.models import arch_spec, load_model
from workers.packed_linear import LinearCompute


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


@dataclass
class Arm:
    """One method on one path, editing its own copy of the model."""

    method: str
    path: str  # "new" (prefix reuse, packed), "unpacked", "old" (prefix_reuse: false) or "" (no target optimiser)
    model: torch.nn.Module
    editor: Editor
    layer: int
    injected: str  # the module the naive loop injects δ at
    templates: list[str] | None
    seconds: list[float] = field(default_factory=list)
    naive: list[float] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)
    case_ids: list[int] = field(default_factory=list)

    def edit(self, request, naive_steps: dict) -> None:
        """Edit ``request``; its naive cost is this edit's steps × one naive step of the same batch,
        timed once per request for all arms sharing (layer, injected module, templates)."""
        record = self.editor.edit_step([request])
        if record.skipped:
            raise RuntimeError(f"{self.method} ({self.path}): edit of case {request.case_id} was skipped: "
                               f"{record.error}")
        self.seconds.append(record.seconds["total"])
        self.steps.append(record.steps)
        self.case_ids.append(request.case_id)
        for phase, value in record.seconds.items():
            self.phases[phase] = self.phases.get(phase, 0.0) + value
        if self.templates is not None:
            key = (self.layer, self.injected, tuple(self.templates))
            if key not in naive_steps:
                naive_steps[key] = self.naive_step_seconds(request)
            self.naive.append(record.steps * naive_steps[key])

    def naive_step_seconds(self, request) -> float:
        config = replace(self.editor.hparams.target_config(), prefix_reuse=False)
        problem = TargetProblem(self.model, self.editor.tokenizer, request, self.layer, self.templates,
                                init_from="mlp", config=config)
        return naive_step_seconds(self.model, problem, self.injected)

    def summary(self) -> dict:
        n = len(self.seconds)
        per_edit = statistics.mean(self.seconds)
        naive = statistics.mean(self.naive) if self.naive else float("nan")
        return {"seconds_per_edit": per_edit, "naive_seconds": naive,
                "ratio": per_edit / naive if self.naive else float("nan"), "mean_steps": statistics.mean(self.steps),
                "phases": {k: v / n for k, v in self.phases.items()}, "case_ids": list(self.case_ids)}


def make_arm(model, tokenizer, method: str, path: str, cache_dir: str | None = None) -> Arm:
    """An arm on a private copy of ``model``: statistics and templates are prepared at construction."""
    model = copy.deepcopy(model)
    overrides = {"prefix_reuse": False} if path == "old" else None
    hparams = load_hparams(method, model, overrides=overrides)
    editor = Editor(model, tokenizer, method, hparams, compute=LinearCompute(packed=path != "unpacked"),
                    cache_dir=cache_dir)
    base, _ = split_method(method)
    layer = hparams.layer if hasattr(hparams, "layer") else list(hparams.layers)[-1]
    spec = arch_spec(model)
    injected = spec.mlp_out_name(layer) if base == "rome" else spec.layer_name(layer)
    templates = editor.ctx.context_templates(hparams) if hasattr(hparams, "context_template_lengths") else None
    return Arm(method, path, model, editor, layer, injected, templates)


def measure_group(model, tokenizer, methods: list[str], requests, n: int,
                  paths: tuple[str, ...] = ("new", "old"), cache_dir: str | None = None) -> list[dict]:
    """Rows for ``methods`` (one base method and its constrained variants), their arms interleaved."""
    arms = [make_arm(model, tokenizer, method, path, cache_dir) for method in methods
            for path in (paths if hasattr(load_hparams(method, model), "prefix_reuse") else ("",))]
    for arm in arms:  # warm-up, not counted
        arm.editor.edit_step([requests[0]])
    for request in requests[1: n + 1]:
        naive_steps: dict = {}  # the naive loop's cost depends on the batch's shapes, not on the arm
        for arm in arms:
            arm.edit(request, naive_steps)
    rows = []
    for method in methods:
        own = {arm.path: arm.summary() for arm in arms if arm.method == method}
        row = {"method": method, **own.get("new", own.get(""))}
        if "unpacked" in own:
            unpacked = own["unpacked"]
            row.update(unpacked_seconds_per_edit=unpacked["seconds_per_edit"], unpacked_ratio=unpacked["ratio"],
                       unpacked_phases=unpacked["phases"], unpacked_steps=unpacked["mean_steps"],
                       new_over_unpacked=row["seconds_per_edit"] / unpacked["seconds_per_edit"])
        if "old" in own:
            old = own["old"]
            row.update(old_seconds_per_edit=old["seconds_per_edit"], old_ratio=old["ratio"], old_phases=old["phases"],
                       new_over_old=row["seconds_per_edit"] / old["seconds_per_edit"], old_steps=old["mean_steps"])
        rows.append(row)
    by_method = {row["method"]: row for row in rows}
    for row in rows:
        base, constraint = split_method(row["method"])
        row["eac_over_base"] = (row["seconds_per_edit"] / by_method[base]["seconds_per_edit"]
                                if constraint and base in by_method else None)
    return rows


def groups_of(methods: list[str]) -> list[list[str]]:
    """Methods grouped by base method, in the order first given (``rome-eac,memit,rome`` -> rome, memit)."""
    groups: dict[str, list[str]] = {}
    for method in methods:
        groups.setdefault(split_method(method)[0], []).append(method)
    return list(groups.values())


def phase_text(phases: dict) -> str:
    return " ".join(f"{name} {value:.2f}" for name, value in sorted(phases.items()) if name != "total")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", default="rome,rome-eac,memit,memit-eac,alphaedit,alphaedit-eac,ft-l,ft-m")
    parser.add_argument("-n", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--paths", default="new,old", help="of new, unpacked, old (see the docstring)")
    parser.add_argument("--cache-dir", help="statistics and context templates cached there (e.g. ~/.cache/eac)")
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.n < 1:
        parser.error("-n must be at least 1")
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    model, tokenizer = load_model(args.model)
    requests = load_counterfact("edit")[: args.n + 1]
    rows = []
    for group in groups_of(args.methods.split(",")):
        for row in measure_group(model, tokenizer, group, requests, args.n, tuple(args.paths.split(",")),
                                 args.cache_dir):
            rows.append(row)
            label = "new" if "old_seconds_per_edit" in row else "   "
            print(f"{row['method']:14s} {label} {row['seconds_per_edit']:7.2f} s/edit  naive {row['naive_seconds']:7.2f} s  "
                  f"ratio {row['ratio']:.2f}  ({row['mean_steps']:.1f} steps)  phases: {phase_text(row['phases'])}",
                  flush=True)
            if "unpacked_seconds_per_edit" in row:
                print(f"{'':14s} unp {row['unpacked_seconds_per_edit']:7.2f} s/edit  ratio {row['unpacked_ratio']:.2f}  "
                      f"({row['unpacked_steps']:.1f} steps)  phases: {phase_text(row['unpacked_phases'])}  "
                      f"new/unpacked {row['new_over_unpacked']:.2f}", flush=True)
            if "old_seconds_per_edit" in row:
                print(f"{'':14s} old {row['old_seconds_per_edit']:7.2f} s/edit  ratio {row['old_ratio']:.2f}  "
                      f"({row['old_steps']:.1f} steps)  phases: {phase_text(row['old_phases'])}  "
                      f"new/old {row['new_over_old']:.2f}", flush=True)
    print(f"\n{'method':14s} {'s/edit':>8s} {'naive s':>8s} {'ratio':>6s} {'unp/nv':>6s} {'new/unp':>7s} "
          f"{'old s':>8s} {'old/nv':>6s} {'new/old':>7s} {'EAC/base':>9s}")
    for row in rows:
        overhead = f"{row['eac_over_base']:.2f}" if row["eac_over_base"] is not None else ""
        print(f"{row['method']:14s} {row['seconds_per_edit']:8.2f} {row['naive_seconds']:8.2f} {row['ratio']:6.2f} "
              f"{row.get('unpacked_ratio', float('nan')):6.2f} {row.get('new_over_unpacked', float('nan')):7.2f} "
              f"{row.get('old_seconds_per_edit', float('nan')):8.2f} {row.get('old_ratio', float('nan')):6.2f} "
              f"{row.get('new_over_old', float('nan')):7.2f} {overhead:>9s}")
    load_after = os.getloadavg()[0]
    print(f"{args.threads} thread(s); load average before {load_before:.1f}, after {load_after:.1f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"threads": args.threads, "load_average": [load_before, load_after], "rows": rows}, handle,
                      indent=1)


if __name__ == "__main__":
    main()
