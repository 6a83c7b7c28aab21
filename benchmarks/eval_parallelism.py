"""Two evaluators of one thread each against one evaluator of two threads, scoring the same work, in
one run: which way should the evaluation pool use two freed CPUs?

The work unit is one checkpoint's scoring in small: the toolkit editing metrics of ``--requests``
CounterFact requests and ``--windows`` WikiText perplexity windows. Per repeat, alternating:
- ``threads``: this process, ``torch.set_num_threads(2)``, scores the unit twice in a row;
- ``actors``: two worker processes (started and warmed before any timing), one thread each, score one
  unit each at the same time.
Wall seconds of each (medians over ``--repeats``) and their ratio; the scores of both ways are
checked to be identical.

    python benchmarks/eval_parallelism.py --json benchmarks/results/eval_parallelism-smollm2.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

_STATE: dict = {}


def _load(model_name: str, requests: int, windows: int, threads: int) -> None:
    import torch

    from workers.data import load_counterfact
    from workers.evaluation.config import EvalConfig
    from workers.evaluation.edit_metrics import unedited_locality_argmax
    from workers.evaluation.suite import TaskSuite
    from workers.evaluation.reference import ReferenceCache
    from workers.models import context_length, load_model

    torch.set_num_threads(threads)
    model, tokenizer = load_model(model_name)
    chosen = load_counterfact("edit")[:requests]
    suite = TaskSuite.load(tokenizer, EvalConfig.from_dict({"tasks": {"wikitext": windows}}),
                           context_length=context_length(model))
    reference = unedited_locality_argmax(model, tokenizer, chosen, ReferenceCache(), "parallelism")
    _STATE.update(model=model, tokenizer=tokenizer, requests=chosen, windows=suite.perplexity_windows,
                  reference=reference)


def unit(_: int = 0) -> list[float]:
    """One unit of scoring; its values (for the identity check)."""
    from workers.evaluation.edit_metrics import edit_metric_rows
    from workers.evaluation.tasks import window_nlls

    s = _STATE
    rows = edit_metric_rows(s["model"], s["tokenizer"], s["requests"], families=("toolkit",),
                            locality_reference=s["reference"])
    nlls, _ = window_nlls(s["model"], s["tokenizer"], s["windows"])
    return [row.value for row in rows] + nlls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--windows", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    context = mp.get_context("spawn")
    with context.Pool(2, initializer=_load, initargs=(args.model, args.requests, args.windows, 1)) as pool:
        pool.map(unit, [0, 1])  # both workers loaded and warm
        _load(args.model, args.requests, args.windows, 2)
        expected = unit()
        load_before = os.getloadavg()[0]
        timings: dict[str, list[float]] = {"threads": [], "actors": []}
        same = True
        for _ in range(args.repeats):
            start = time.perf_counter()
            values = [unit(), unit()]
            timings["threads"].append(time.perf_counter() - start)
            start = time.perf_counter()
            values += pool.map(unit, [0, 1])
            timings["actors"].append(time.perf_counter() - start)
            same &= all(v == expected for v in values)
        load_after = os.getloadavg()[0]
    medians = {k: statistics.median(v) for k, v in timings.items()}
    ratio = medians["actors"] / medians["threads"]
    print(f"{args.model}: two units, one process x 2 threads {medians['threads']:.1f} s; two processes x 1 thread "
          f"{medians['actors']:.1f} s; actors/threads {ratio:.2f}; scores identical: {same}; load average "
          f"{load_before:.1f} -> {load_after:.1f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"model": args.model, "timings": timings, "medians": medians, "actors_over_threads": ratio,
                       "identical_scores": same, "load_average": [load_before, load_after]}, handle, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
