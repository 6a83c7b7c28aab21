"""Size and write time of the store's ``examples`` table for a spec's shape (not a test).

Builds, for each checkpoint of one trajectory, the example rows the evaluation writes — the same
metrics, ids and value kinds (0/1 outcomes, token shares, ROUGE, KL, window NLLs) as
``workers.evaluation`` produces for the spec's evaluation settings, with seeded random values — writes
them through ``Store.put_checkpoint`` and reports the files' bytes and the write time per checkpoint;
the total for ``arms`` trajectories is the per-trajectory total times the arms.

    python benchmarks/examples_table.py            # the study's spec: 11 arms x 300 edits x 7 checkpoints
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np

from orchestrator.store import Store

# The study's evaluation (experiments/configs/study-smollm2.yaml).
STUDY_TASKS = {"nli": 64, "sst2": 64, "nq": 32, "samsum": 16, "mmlu": 64, "wikitext": 8}
STUDY_DRIFT = 16
EDIT_METRICS = [("edit/toolkit", "reliability", "edit", "share"), ("edit/toolkit", "generalisation", "rephrase", "share"),
                ("edit/toolkit", "locality", "locality", "share"), ("edit/counterfact", "efficacy", "edit", "binary"),
                ("edit/counterfact", "paraphrase", "rephrase", "share"),
                ("edit/counterfact", "neighbourhood", "locality", "share"),
                ("edit/generative", "reliability", "edit", "binary"),
                ("edit/generative", "generalisation", "rephrase", "share")]
TASK_METRICS = {"nli": ["accuracy_valid", "accuracy_all", "valid_rate", "label_ll_accuracy"],
                "sst2": ["accuracy_valid", "accuracy_all", "valid_rate", "label_ll_accuracy"],
                "nq": ["exact_match", "contains_answer"], "samsum": ["rouge1", "rouge2", "rougeL", "rouge_mean"],
                "mmlu": ["accuracy_letter", "accuracy_cloze"]}


def checkpoint_rows(n_requests: int, tasks: dict[str, int], drift: int, rng) -> list[dict]:
    """Aggregate rows with their ``examples``, shaped as ``CheckpointEvaluator.evaluate`` returns them."""
    rows = []

    def row(task, metric, examples):
        values = [e["value"] for e in examples]
        rows.append({"task": task, "metric": metric, "value": float(np.mean(values)) if values else float("nan"),
                     "n_examples": len(values), "ci_low": None, "ci_high": None, "examples": examples})

    case_ids = [str(c) for c in rng.choice(20000, n_requests, replace=False)]
    for task, metric, kind, values in EDIT_METRICS:
        draw = (rng.random(n_requests) < 0.6).astype(float) if values == "binary" else rng.integers(0, 5, n_requests) / 4
        row(task, metric, [{"example_id": c, "value": float(v), "case_id": c, "prompt_kind": kind,
                            "prompt_index": 0 if kind == "edit" else None} for c, v in zip(case_ids, draw)])
    for task, metrics in TASK_METRICS.items():
        indices = sorted(rng.choice(5000, tasks[task], replace=False).tolist())
        for metric in metrics:
            kept = indices[: len(indices) // 2] if metric == "accuracy_valid" else indices
            draw = rng.random(len(kept)) if task == "samsum" else (rng.random(len(kept)) < 0.5).astype(float)
            row(task, metric, [{"example_id": str(i), "value": float(v), "example_index": i} for i, v in zip(kept, draw)])
    starts = sorted((rng.choice(500, tasks["wikitext"], replace=False) * 512).tolist())
    nll = rng.uniform(1200, 2200, len(starts))
    row("wikitext", "perplexity", [{"example_id": str(s), "value": float(v / 512), "window_start": s,
                                    "window_tokens": 512, "window_nll": float(v)} for s, v in zip(starts, nll)])
    everything = []
    for task in TASK_METRICS:
        examples = [{"example_id": f"{task}/{i}", "value": float(v), "prompt_kind": task, "example_index": i}
                    for i, v in zip(range(drift), rng.exponential(0.05, drift))]
        everything += examples
        row(task, "drift_kl", examples)
    row("drift", "kl_mean", everything)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", type=int, default=11)
    parser.add_argument("--checkpoints", type=int, nargs="+", default=[0, 50, 100, 150, 200, 250, 300])
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as root:
        store = Store(root)
        results = []
        for n_edits in args.checkpoints:
            rows = checkpoint_rows(n_edits, STUDY_TASKS, STUDY_DRIFT, rng)
            start = time.perf_counter()
            store.put_checkpoint("study", "t", n_edits, rows)
            seconds = time.perf_counter() - start
            path = store.files("examples", "study")[-1]
            results.append({"n_edits": n_edits, "example_rows": sum(len(r["examples"]) for r in rows),
                            "bytes": os.path.getsize(path), "write_seconds": round(seconds, 4)})
    per_trajectory = sum(r["bytes"] for r in results)
    summary = {"checkpoints": results, "rows_per_trajectory": sum(r["example_rows"] for r in results),
               "bytes_per_trajectory": per_trajectory, "arms": args.arms,
               "bytes_all_arms": per_trajectory * args.arms,
               "rows_all_arms": sum(r["example_rows"] for r in results) * args.arms}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
