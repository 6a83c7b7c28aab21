"""bf16 products in a float32 model (issue 33, item 3): speed and accuracy cost, in one interleaved run.

The option is ``LinearCompute(dtype=torch.bfloat16)``: the target optimisation's and the scoring's linear
layers compute their products in bfloat16 (oneDNN, packed), while the weights, δ, the statistics and the
solves stay float32/float64 (``evaluation.compute_dtype: bfloat16`` for scoring). Three arms per method,
each its own copy of the default model editing the same ``-n`` CounterFact requests sequentially:

- ``float32``: the default (packed oneDNN linears, float32);
- ``float32-unpacked``: PyTorch's own linear — float32 too, summed in another order, so its distance from
  ``float32`` is float32's own run-to-run noise, the yardstick the issue sets for bf16's differences;
- ``bf16``: bf16 products.

The arms alternate request by request (rotating which goes first), so a change in the machine's load
falls on all alike: read the ratios of their seconds per edit (CPU and wall). After the edits: each arm's
efficacy and greedy answers on the ``n`` facts, its ‖ΔW‖_F per edited matrix and its distance from the
float32 arm's ΔW, its editing metrics and WikiText perplexity (scored alike in float32, so only the
edits differ). Then the checkpoint of the float32 arm's edits is scored by each scoring path, alternating,
``--repeats`` times: seconds per checkpoint and the largest metric difference from the float32 path.

    python benchmarks/bf16_compute.py --methods rome,memit -n 20 --json benchmarks/results/bf16_compute-smollm2.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.half_precision import compare, efficacy, wikitext_perplexity  # noqa: E402
from workers.data import load_counterfact  # noqa: E402
from workers.editing import Editor, load_hparams  # noqa: E402
from workers.evaluation.checkpoint import evaluate_checkpoint  # noqa: E402
from workers.evaluation.config import EvalConfig  # noqa: E402
from workers.evaluation.edit_metrics import edit_metric_rows  # noqa: E402
from workers.evaluation.reference import ReferenceCache, model_key  # noqa: E402
from workers.generation import begins_with, greedy_continuations  # noqa: E402
from workers.models import edited_weight, load_model  # noqa: E402
from workers.packed_linear import LinearCompute  # noqa: E402

ARMS = {"float32": LinearCompute(), "float32-unpacked": LinearCompute(packed=False),
        "bf16": LinearCompute(dtype=torch.bfloat16)}
REFERENCE = "float32"


def edit_interleaved(method: str, requests, base, tokenizer, cache_dir) -> dict[str, dict]:
    arms = {}
    for name, compute in ARMS.items():
        model = copy.deepcopy(base)
        editor = Editor(model, tokenizer, method, load_hparams(method, model), cache_dir=cache_dir, compute=compute)
        arms[name] = {"model": model, "editor": editor, "cpu": [], "wall": [],
                      "before": {m: edited_weight(model, m).detach().double().clone() for m in editor.modules}}
    names = list(arms)
    for i, request in enumerate(requests):
        for name in names[i % len(names):] + names[: i % len(names)]:
            arm = arms[name]
            cpu, wall = time.process_time(), time.perf_counter()
            arm["editor"].edit_step([request])
            arm["cpu"].append(time.process_time() - cpu)
            arm["wall"].append(time.perf_counter() - wall)
        print(f"{method} request {i + 1}/{len(requests)}: " + ", ".join(
            f"{name} {arms[name]['cpu'][-1]:.1f} CPU-s" for name in names), flush=True)
    return arms


def outcome(arm: dict, requests, tokenizer) -> dict:
    model, editor = arm["model"], arm["editor"]
    updates = {m: edited_weight(model, m).detach().double() - before for m, before in arm["before"].items()}
    answers = greedy_continuations(model, tokenizer, [r.prompt for r in requests], max_new_tokens=4)
    rows = edit_metric_rows(model, tokenizer, requests, families=("counterfact",))
    # Every edit but the first (which includes set-up: statistics, templates, packing).
    return {"cpu_per_edit": statistics.fmean(arm["cpu"][1:]), "wall_per_edit": statistics.fmean(arm["wall"][1:]),
            "skipped": [r.error for r in editor.records if r.skipped],
            "efficacy": efficacy(model, tokenizer, requests),
            "greedy": [begins_with(a, r.target_new) for a, r in zip(answers, requests)],
            "scores": {f"{row.task}/{row.metric}": row.value for row in rows},
            "perplexity": wikitext_perplexity(model, tokenizer),
            "dw_fro": {m: float(u.norm()) for m, u in updates.items()}, "_updates": updates}


def time_scoring(base, tokenizer, log, requests, repeats: int) -> dict:
    config = EvalConfig.from_dict({"tasks": {"wikitext": 2}, "drift_examples": 4, "progress": False})
    reference, key = ReferenceCache(), model_key(base, tokenizer)
    paths = ARMS  # the scoring paths are the editing arms' computes

    def score(compute):
        rows = evaluate_checkpoint(base, tokenizer, log, requests, config, reference=reference, base_key=key,
                                   compute=compute)
        return {(r.task, r.metric): r.value for r in rows}

    score(paths[REFERENCE])  # warm-up: the reference cache, as an evaluator's holds it
    seconds, rows = {name: [] for name in paths}, {}
    for _ in range(repeats):
        for name, compute in paths.items():
            start = time.process_time()
            rows[name] = score(compute)
            seconds[name].append(time.process_time() - start)
    result = {}
    for name in paths:
        differences = {"/".join(k): abs(v - rows[REFERENCE][k]) for k, v in rows[name].items()
                       if isinstance(v, float) and math.isfinite(v) and k in rows[REFERENCE]}
        largest = max(differences, key=differences.get)
        result[name] = {"cpu_seconds": statistics.median(seconds[name]),
                        "over_float32": statistics.median(seconds[name]) / statistics.median(seconds[REFERENCE]),
                        "largest_difference": differences[largest], "largest_difference_metric": largest}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="rome,memit")
    parser.add_argument("-n", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2, help="scorings of the checkpoint per path")
    parser.add_argument("--cache-dir", help="statistics/templates cache shared by the arms")
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base, tokenizer = load_model("smollm2-135m")
    requests = load_counterfact("edit")[: args.n]
    load_before = os.getloadavg()[0]
    results = {"n": args.n, "threads": args.threads, "methods": {}}
    for method in args.methods.split(","):
        arms = edit_interleaved(method, requests, base, tokenizer, args.cache_dir)
        outcomes = {name: outcome(arm, requests, tokenizer) for name, arm in arms.items()}
        reference = outcomes[REFERENCE]
        report = {}
        for name, result in outcomes.items():
            row = {k: v for k, v in result.items() if not k.startswith("_")}
            row["cpu_over_float32"] = result["cpu_per_edit"] / reference["cpu_per_edit"]
            row["wall_over_float32"] = result["wall_per_edit"] / reference["wall_per_edit"]
            if name != REFERENCE:
                row["against_float32"] = compare(reference, result)
            report[name] = row
            against = row.get("against_float32", {})
            print(f"{method:6s} {name:17s} {row['cpu_per_edit']:6.2f} CPU-s/edit (x{row['cpu_over_float32']:.2f}) "
                  f"efficacy {sum(row['efficacy'])}/{args.n} greedy {sum(row['greedy'])}/{args.n} "
                  f"ppl {row['perplexity']:.3f}" + (
                      f" | vs float32: dW distance {against['max_relative_dw_distance']:.2e}, |log norm ratio| "
                      f"{against['max_abs_log_norm_ratio']:.2e}, score diff {against['max_score_difference']:.3f}, "
                      f"ppl ratio {against['perplexity_ratio']:.5f}" if against else ""), flush=True)
        report["scoring"] = time_scoring(base, tokenizer, arms[REFERENCE]["editor"].log, requests, args.repeats)
        for name, row in report["scoring"].items():
            print(f"{method:6s} checkpoint scored by {name:17s} {row['cpu_seconds']:6.1f} CPU-s "
                  f"(x{row['over_float32']:.2f}), largest difference {row['largest_difference']:.2e} "
                  f"({row['largest_difference_metric']})", flush=True)
        results["methods"][method] = report
        del arms
    results["load_average"] = [load_before, os.getloadavg()[0]]
    print(f"load average before {load_before:.1f}, after {results['load_average'][1]:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
