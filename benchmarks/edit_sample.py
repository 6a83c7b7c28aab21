"""What ``evaluation.edit_sample`` saves over a long trajectory, and how much of the scoring's batches
is padding — measured on the default model, in one run.

A checkpoint's scoring is (a) the editing metrics of the requests edited so far — every family the
spec asks for (default: toolkit, counterfact, generative), linear in the number of requests scored —
and (b) the general tasks and drift, a fixed cost per checkpoint. Scoring every edit so far at
checkpoints every ``k`` edits therefore costs Σ_c c·r + C·(checkpoints): quadratic in the trajectory's
length. ``edit_sample: s`` caps the requests scored per checkpoint at ``s``.

Measured here (one process, ``--threads``): the seconds of (a) for ``--sizes`` requests (interleaved
over ``--repeats`` rounds; medians; the slope r per request from a least-squares line through them),
and of (b) for the study's task sample (``experiments/configs/study-smollm2.yaml``), once — at
``1/--fixed-scale`` of each task's count, multiplied back (each task's cost is linear in its examples;
on a loaded machine the whole sample takes too long). From these,
the scoring seconds of one trajectory with checkpoints every 50 edits to 300 and to 1,000 edits, for
each ``--samples`` value ("all" = no sample). The unedited model's locality predictions are computed
before the timing, as the evaluators' disk cache holds them in a running study.

Padding: every batch the scoring builds (teacher-forced scoring through ``workers.batching``; greedy
generation's left-padded prompts) is counted: padded positions / all positions, with the batches
sorted by length as the evaluation does, and in the requests' own order (the same examples unsorted),
for the editing metrics of the largest ``--sizes`` and the demo's task sample (``--padding-tasks``;
WikiText windows all have the same length and never pad).

    python benchmarks/edit_sample.py --json benchmarks/results/edit_sample-smollm2.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import yaml  # noqa: E402

from workers import batching, generation  # noqa: E402
from workers.data import load_counterfact  # noqa: E402
from workers.evaluation.config import EvalConfig  # noqa: E402
from workers.evaluation.edit_metrics import edit_metric_rows, unedited_locality_argmax  # noqa: E402
from workers.evaluation.suite import TaskSuite  # noqa: E402
from workers.evaluation.reference import ReferenceCache  # noqa: E402
from workers.evaluation.scoring import next_token_logprobs  # noqa: E402
from workers.evaluation.tasks import drift_prompts, general_task_rows  # noqa: E402
from workers.models import context_length, load_model  # noqa: E402

STUDY = Path(__file__).resolve().parents[1] / "experiments" / "configs" / "study-smollm2.yaml"


class PaddingCount:
    """Counts real and padded positions of every batch built while it is installed."""

    def __init__(self):
        self.real = self.total = 0

    def install(self, monkey: list) -> None:
        pad_right, greedy = batching.pad_right, generation.greedy_token_ids

        def counted_pad_right(sequences, pad_id, device=None):
            ids, mask = pad_right(sequences, pad_id, device)
            self.real += int(mask.sum())
            self.total += mask.numel()
            return ids, mask

        batching.pad_right = counted_pad_right
        monkey.append((batching, "pad_right", pad_right))

        # Generation pads inside the tokenizer: counted from the prompts' lengths, batched as it batches them.
        def counted_greedy(model, tokenizer, prompts, max_new_tokens=8, batch_size=16, *, add_special_tokens=True,
                           sort_by_length=False, progress=False):
            lengths = [len(i) for i in tokenizer(list(prompts), add_special_tokens=add_special_tokens)["input_ids"]]
            order = sorted(range(len(prompts)), key=lambda i: -lengths[i]) if sort_by_length else range(len(prompts))
            order = list(order)
            for start in range(0, len(order), batch_size):
                chunk = [lengths[i] for i in order[start:start + batch_size]]
                self.real += sum(chunk)
                self.total += max(chunk) * len(chunk)
            return greedy(model, tokenizer, prompts, max_new_tokens, batch_size, add_special_tokens=add_special_tokens,
                          sort_by_length=sort_by_length, progress=progress)

        generation.greedy_token_ids = counted_greedy
        monkey.append((generation, "greedy_token_ids", greedy))

    @property
    def share(self) -> float:
        return 1 - self.real / self.total if self.total else 0.0


def restore(monkey: list) -> None:
    for module, name, value in reversed(monkey):
        setattr(module, name, value)
    monkey.clear()


def unsorted_batches(sequences, batch_size, pad_id, device=None, *, max_padding=None, progress=False,
                     desc="batches"):
    """``right_padded_batches`` without the sort: the sequences in their own order."""
    for start in range(0, len(sequences), batch_size):
        indices = list(range(start, min(start + batch_size, len(sequences))))
        yield (indices, *batching.pad_right([sequences[i] for i in indices], pad_id, device))


def padding_shares(model, tokenizer, requests, reference, suite, config) -> dict:
    """Padding share of one checkpoint's scoring, and its rows: ``bucketed`` (as the evaluation runs:
    sorted, each batch's padding capped), ``sorted`` (fixed-size batches of the sorted rows, the cap
    off) and ``unsorted`` (fixed-size batches in the examples' own order)."""
    from workers.evaluation import scoring

    shares = {}
    for label in ("bucketed", "sorted", "unsorted"):
        monkey: list = []
        count = PaddingCount()
        count.install(monkey)
        if label != "bucketed":
            monkey.append((scoring, "SCORING_MAX_PADDING", scoring.SCORING_MAX_PADDING))
            scoring.SCORING_MAX_PADDING = None
        if label == "unsorted":
            monkey.append((scoring, "right_padded_batches", scoring.right_padded_batches))
            scoring.right_padded_batches = unsorted_batches
            greedy = generation.greedy_token_ids
            monkey.append((generation, "greedy_token_ids", greedy))
            generation.greedy_token_ids = lambda *a, **k: greedy(*a, **{**k, "sort_by_length": False})
        try:
            start = time.perf_counter()
            rows = edit_metric_rows(model, tokenizer, requests, locality_reference=reference)
            rows += general_task_rows(model, tokenizer, suite, config)
            seconds = time.perf_counter() - start
        finally:
            restore(monkey)
        shares[label] = {"padding_share": count.share, "real_positions": count.real, "positions": count.total,
                         "seconds": seconds, "rows": [(r.task, r.metric, r.value) for r in rows]}
    reference_rows = shares["sorted"]["rows"]
    for values in shares.values():
        values["rows_equal_sorted"] = values["rows"] == reference_rows
    return shares


def trajectory_seconds(n_edits: int, every: int, per_request: float, intercept: float, fixed: float,
                       sample: int | None) -> float:
    """Scoring seconds of one trajectory: checkpoints 0, every, 2·every, ..., n_edits."""
    checkpoints = sorted({0, *range(every, n_edits + 1, every), n_edits})
    total = 0.0
    for c in checkpoints:
        scored = c if sample is None else min(c, sample)
        total += fixed + (intercept + per_request * scored if scored else 0.0)
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sizes", default="16,32,64")
    parser.add_argument("--samples", default="all,50,100")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--fixed-scale", type=int, default=4, help="general tasks timed at 1/this of their counts")
    parser.add_argument("--padding-tasks", default="nli:16,sst2:16,nq:8,samsum:5", help="the demo's sample")
    parser.add_argument("--padding-only", action="store_true", help="measure the padding only")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]
    samples = [None if s == "all" else int(s) for s in args.samples.split(",")]

    model, tokenizer = load_model(args.model)
    study = yaml.safe_load(STUDY.read_text())
    scale = args.fixed_scale
    study["evaluation"].pop("edit_sample", None)  # the spec's, not an EvalConfig field
    scaled = {**study["evaluation"], "progress": False,
              "tasks": {task: max(1, count // scale) for task, count in study["evaluation"]["tasks"].items()},
              "drift_examples": max(1, study["evaluation"].get("drift_examples", 50) // scale)}
    config = EvalConfig.from_dict(scaled)
    suite = TaskSuite.load(tokenizer, config, context_length=context_length(model))
    padding_tasks = {name: int(count) for name, count in (item.split(":") for item in args.padding_tasks.split(","))}
    padding_config = EvalConfig.from_dict({"tasks": padding_tasks, "progress": False})
    padding_suite = TaskSuite.load(tokenizer, padding_config, context_length=context_length(model))
    requests = load_counterfact("edit")[: max(sizes)]
    reference = unedited_locality_argmax(model, tokenizer, requests, ReferenceCache(), "edit-sample")
    load_before = os.getloadavg()[0]
    print(f"{args.model}, {args.threads} thread(s), load average before {load_before:.1f}", flush=True)

    padding = padding_shares(model, tokenizer, requests[:sizes[-1]], reference[:sizes[-1]], padding_suite,
                             padding_config)
    for label, values in padding.items():
        print(f"padding {label}: {values['padding_share']:.3f} of {values['positions']} positions, "
              f"{values['seconds']:.1f} s, rows equal to sorted: {values['rows_equal_sorted']}", flush=True)
    if args.padding_only:
        if args.json:
            with open(args.json, "w") as handle:
                json.dump({"model": args.model, "threads": args.threads, "padding_tasks": padding_tasks,
                           "requests": sizes[-1], "padding": padding}, handle, indent=1)
        return 0

    timings: dict[int, list[float]] = {n: [] for n in sizes}
    for _ in range(args.repeats):
        for n in sizes:
            start = time.perf_counter()
            edit_metric_rows(model, tokenizer, requests[:n], locality_reference=reference[:n])
            timings[n].append(time.perf_counter() - start)
    medians = {n: statistics.median(t) for n, t in timings.items()}
    xs, ys = list(medians), list(medians.values())
    mean_x, mean_y = statistics.mean(xs), statistics.mean(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)
    intercept = mean_y - slope * mean_x
    print("editing metrics: " + ", ".join(f"{n} requests {s:.1f} s" for n, s in medians.items())
          + f"; {slope:.3f} s per request + {intercept:.2f} s", flush=True)

    start = time.perf_counter()
    general_task_rows(model, tokenizer, suite, config)
    for prompts in drift_prompts(suite, config).values():
        next_token_logprobs(model, tokenizer, prompts)
    fixed = (time.perf_counter() - start) * scale
    print(f"general tasks + drift (the study's sample, timed at 1/{scale} and scaled): {fixed:.1f} s per checkpoint",
          flush=True)

    every = int(study["checkpoints"]["every"])
    projections = []
    for n_edits in (300, 1000):
        base = trajectory_seconds(n_edits, every, slope, intercept, fixed, None)
        for sample in samples:
            seconds = trajectory_seconds(n_edits, every, slope, intercept, fixed, sample)
            last = fixed + intercept + slope * (n_edits if sample is None else min(n_edits, sample))
            projections.append({"n_edits": n_edits, "every": every, "edit_sample": sample,
                                "trajectory_scoring_seconds": seconds, "over_all": seconds / base,
                                "last_checkpoint_seconds": last})
            print(f"{n_edits:5d} edits, edit_sample {sample if sample else 'all':>4}: {seconds / 3600:6.2f} h of scoring "
                  f"per trajectory ({seconds / base:.2f} of all); last checkpoint {last:.0f} s", flush=True)
    load_after = os.getloadavg()[0]
    print(f"load average after {load_after:.1f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"model": args.model, "threads": args.threads, "load_average": [load_before, load_after],
                       "padding": padding, "editing_metric_seconds": timings, "per_request_seconds": slope,
                       "intercept_seconds": intercept, "fixed_seconds": fixed, "fixed_scale": scale,
                       "padding_tasks": padding_tasks, "projections": projections},
                      handle, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
