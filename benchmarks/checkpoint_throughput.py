"""Seconds per scored checkpoint of the study (experiments/configs/study-smollm2.yaml), by how the
scoring passes compute their linear layers, in one interleaved run.

Arms, each scoring the same checkpoint (``evaluate_checkpoint``) with the study's evaluation settings:
- ``old``: PyTorch's own ``linear`` (MKL; the path before packed_linear.py);
- ``packed``: the default — oneDNN with the weights packed once per checkpoint, float32;
- ``bf16``: packed, the products in bfloat16 (``evaluation.compute_dtype: bfloat16``).
The arms alternate within every repeat, so a change in the machine's load falls on all alike; read the
ratios. The checkpoint is "300 edits so far": the editing metrics of 300 CounterFact requests and the
study's task sample; at ``--scale s`` every count (requests, each task's examples, drift prompts) is
divided by ``s`` (rounded up) and the seconds multiplied back by ``s`` (each part is linear in its
count). The edit log holds ``--edits`` real ROME edits (replaying it costs milliseconds; what is scored
does not depend on how many edits made the weights). The unedited model's predictions are computed
before the timing, as an evaluator's reference cache holds them in a running study. Each arm's rows are
compared with the old arm's (largest difference of a metric value).

    python benchmarks/checkpoint_throughput.py --scale 16 --json benchmarks/results/checkpoint_throughput.json

``--pool N`` measures instead what the evaluation pool's growth buys (issue 33: evaluators grow into the
CPUs freed by finished trajectories), in processes as the pool's evaluator actors are: ``before``, one
one-thread evaluator with PyTorch's linear scoring N queued checkpoints one after another (the tail of a
run before the pool grew); ``after``, N one-thread evaluators, packed float32, one checkpoint each, at once.
Every process loads the model, its edit log and the reference cache (filled once, beforehand, in a
directory, as the pool's evaluators share it) before a barrier; the clock runs from the barrier to the
last checkpoint scored. The two alternate per repeat; read their ratio, on an otherwise idle machine
(N ≤ its cores).

    python benchmarks/checkpoint_throughput.py --pool 2 --spec experiments/configs/replicated-smollm2.yaml
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import multiprocessing
import os
import tempfile
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from workers.data import load_counterfact  # noqa: E402
from workers.editing import Editor, load_hparams  # noqa: E402
from workers.evaluation.checkpoint import evaluate_checkpoint  # noqa: E402
from workers.evaluation.config import EvalConfig  # noqa: E402
from workers.evaluation.reference import ReferenceCache, model_key  # noqa: E402
from workers.evaluation.suite import TaskSuite  # noqa: E402
from workers.models import context_length, load_model  # noqa: E402
from workers.packed_linear import LinearCompute  # noqa: E402
from workers.yaml_files import read_yaml_file  # noqa: E402

STUDY = Path(__file__).resolve().parents[1] / "experiments" / "configs" / "study-smollm2.yaml"
ARMS = {"old": LinearCompute(packed=False), "packed": LinearCompute(), "bf16": LinearCompute(dtype=torch.bfloat16)}


def scaled_config(study: dict, scale: int) -> EvalConfig:
    evaluation = dict(study["evaluation"])
    evaluation.pop("edit_sample", None)  # a spec field, not an EvalConfig one
    evaluation["tasks"] = {task: math.ceil(count / scale) for task, count in evaluation["tasks"].items()}
    if "drift_examples" in evaluation:
        evaluation["drift_examples"] = math.ceil(evaluation["drift_examples"] / scale)
    return EvalConfig.from_dict({**evaluation, "progress": False})


def rows_by_key(rows) -> dict:
    return {(row.task, row.metric): row.value for row in rows}


def pool_worker(args, compute: LinearCompute, checkpoints: int, log, reference_dir: str, barrier, results) -> None:
    """One evaluator process: set up, wait for the others, score ``checkpoints`` checkpoints in turn."""
    torch.set_num_threads(1)
    base, tokenizer = load_model(args.model)
    config = scaled_config(read_yaml_file(args.spec), args.scale)
    suite = TaskSuite.load(tokenizer, config, context_length=context_length(base))
    requests = load_counterfact("edit")[: math.ceil(args.edits_so_far / args.scale)]
    reference, key = ReferenceCache(reference_dir), model_key(base, tokenizer)
    barrier.wait()
    start = time.perf_counter()  # CLOCK_MONOTONIC: comparable between the processes
    for _ in range(checkpoints):
        evaluate_checkpoint(base, tokenizer, log, requests, config, reference=reference, tasks=suite,
                            base_key=key, compute=compute)
    results.put((start, time.perf_counter()))


def pool_run(args, compute: LinearCompute, processes: int, checkpoints: int, log, reference_dir: str) -> float:
    """Seconds from the barrier to the last of ``processes`` evaluators' ``checkpoints`` each."""
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(processes), context.Queue()
    workers = [context.Process(target=pool_worker, args=(args, compute, checkpoints, log, reference_dir, barrier,
                                                         results)) for _ in range(processes)]
    for worker in workers:
        worker.start()
    spans = [results.get() for _ in workers]
    for worker in workers:
        worker.join()
        if worker.exitcode:
            raise SystemExit(f"an evaluator process exited with {worker.exitcode}")
    return max(end for _, end in spans) - min(start for start, _ in spans)


def pool_main(args, log, tokenizer, base, requests) -> int:
    """``--pool N``: N checkpoints scored by one unpacked evaluator (before) or N packed ones (after)."""
    config = scaled_config(read_yaml_file(args.spec), args.scale)
    with tempfile.TemporaryDirectory() as reference_dir:
        suite = TaskSuite.load(tokenizer, config, context_length=context_length(base))
        evaluate_checkpoint(base, tokenizer, log, requests, config, reference=ReferenceCache(reference_dir),
                            tasks=suite, base_key=model_key(base, tokenizer))  # fills the shared reference cache
        load_before = os.getloadavg()[0]
        print(f"{args.model}: {len(requests)} requests, tasks {config.tasks}, drift {config.drift_examples} "
              f"(1/{args.scale} of {Path(args.spec).name}'s checkpoint at {args.edits_so_far} edits); "
              f"{args.pool} checkpoints; {os.cpu_count()} CPUs, load average {load_before:.1f}", flush=True)
        seconds = {"before": [], "after": []}
        for repeat in range(args.repeats):
            seconds["before"].append(pool_run(args, ARMS["old"], 1, args.pool, log, reference_dir))
            seconds["after"].append(pool_run(args, ARMS["packed"], args.pool, 1, log, reference_dir))
            print(f"repeat {repeat}: before {seconds['before'][-1]:.1f} s, after {seconds['after'][-1]:.1f} s, "
                  f"load average {os.getloadavg()[0]:.1f}", flush=True)
    load_after = os.getloadavg()[0]
    before, after = statistics.median(seconds["before"]), statistics.median(seconds["after"])
    print(f"{args.pool} checkpoints: 1 evaluator, PyTorch linear {before:.1f} s; {args.pool} evaluators, packed "
          f"{after:.1f} s; throughput after/before {before / after:.2f}x; load average before {load_before:.1f}, "
          f"after {load_after:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "model": args.model, "spec": Path(args.spec).name, "scale": args.scale, "pool": args.pool,
            "requests": len(requests), "tasks": config.tasks, "drift_examples": config.drift_examples,
            "seconds": seconds, "throughput_ratio": before / after, "load_average": [load_before, load_after]},
            indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--spec", default=str(STUDY), help="the study whose scoring is timed")
    parser.add_argument("--pool", type=int, help="measure the pool's growth into this many CPUs instead")
    parser.add_argument("--edits-so-far", type=int, default=300)
    parser.add_argument("--edits", type=int, default=2, help="real ROME edits in the log")
    parser.add_argument("--scale", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (an evaluator uses one per CPU)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--arms", default="old,packed,bf16")
    parser.add_argument("--cache-dir", help="the edits' statistics and templates cached there (e.g. ~/.cache/eac)")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    arms = {name: ARMS[name] for name in args.arms.split(",")}

    base, tokenizer = load_model(args.model)
    edited = copy.deepcopy(base)
    requests = load_counterfact("edit")[: math.ceil(args.edits_so_far / args.scale)]
    editor = Editor(edited, tokenizer, "rome", load_hparams("rome", edited), cache_dir=args.cache_dir)
    log = editor.apply(requests[: args.edits])
    del edited, editor
    if args.pool:
        return pool_main(args, log, tokenizer, base, requests)
    config = scaled_config(read_yaml_file(args.spec), args.scale)
    suite = TaskSuite.load(tokenizer, config, context_length=context_length(base))
    reference, key = ReferenceCache(), model_key(base, tokenizer)
    load_before = os.getloadavg()[0]
    print(f"{args.model}: {len(requests)} requests, tasks {config.tasks}, drift {config.drift_examples} "
          f"(1/{args.scale} of the study's checkpoint at {args.edits_so_far} edits), {args.threads} thread(s), "
          f"load average {load_before:.1f}", flush=True)

    def score(compute):
        return evaluate_checkpoint(base, tokenizer, log, requests, config, reference=reference, tasks=suite,
                                   base_key=key, compute=compute)

    score(next(iter(arms.values())))  # warm-up: fills the reference cache with the unedited model's predictions
    seconds: dict[str, list[float]] = {name: [] for name in arms}
    rows = {}
    for _ in range(args.repeats):
        for name, compute in arms.items():
            start = time.perf_counter()
            rows[name] = rows_by_key(score(compute))
            seconds[name].append(time.perf_counter() - start)
    load_after = os.getloadavg()[0]

    first = next(iter(arms))
    result = {"model": args.model, "scale": args.scale, "threads": args.threads, "requests": len(requests),
              "tasks": config.tasks, "drift_examples": config.drift_examples,
              "load_average": [load_before, load_after], "arms": {}}
    for name in arms:
        median = statistics.median(seconds[name])
        shared = set(rows[name]) & set(rows[first])
        differences = {k: abs(rows[name][k] - rows[first][k]) for k in shared
                       if isinstance(rows[name][k], float) and math.isfinite(rows[name][k])}
        largest = max(differences, key=differences.get) if differences else None
        result["arms"][name] = {"seconds": median, "seconds_all": seconds[name],
                                "full_checkpoint_seconds": median * args.scale,
                                f"over_{first}": median / statistics.median(seconds[first]),
                                "largest_difference": differences.get(largest, 0.0),
                                "largest_difference_metric": "/".join(largest) if largest else None}
        arm = result["arms"][name]
        print(f"{name:7s} {median:8.1f} s ({arm['full_checkpoint_seconds']:7.0f} s per full checkpoint)  "
              f"{name}/{first} {arm[f'over_{first}']:.2f}  largest difference {arm['largest_difference']:.2e} "
              f"({arm['largest_difference_metric']})", flush=True)
    print(f"load average before {load_before:.1f}, after {load_after:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
