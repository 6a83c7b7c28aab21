"""SAMSum ROUGE of a model through the evaluation's own path (``TaskSuite`` + ``general_task_rows``).

Issue 17, item 12: the unedited SmolLM2-135M scored rouge_mean 0.090 on a seeded sample of 100
SAMSum dialogues, an independent script 0.117 on the first 200. ``--order first -n 200`` reproduces
the latter with this code; ``--order seeded`` draws the evaluation's default sample. ``-n 818`` is the
paper's full test set. 200 generations of 25 tokens take minutes on a shared CPU (``--threads 1``),
too long for the test suite, which checks the first 20 instead (tests/test_evaluation_default_model.py).

    python benchmarks/samsum_reference.py -n 200 --order first --threads 1 --json samsum.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from workers.evaluation import EvalConfig, TaskSuite  # noqa: E402
from workers.evaluation.tasks import general_task_rows  # noqa: E402
from workers.models import DEFAULT_MODEL, context_length, load_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("-n", type=int, default=200, help="dialogues (818: the whole test set)")
    parser.add_argument("--order", choices=["first", "seeded"], default="first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="write {n, order, rows, seconds} here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    config = EvalConfig(tasks={"samsum": args.n}, sample_order=args.order, seed=args.seed,
                        batch_size=args.batch_size, edit_metrics=(), drift_examples=0, progress=False)
    suite = TaskSuite.load(tokenizer, config, context_length=context_length(model))
    start = time.perf_counter()
    rows = general_task_rows(model, tokenizer, suite, config)
    seconds = time.perf_counter() - start
    for row in rows:
        print(row)
    print(f"{args.model}: {len(suite.examples['samsum'])} SAMSum dialogues ({args.order}), {seconds:.0f} s on "
          f"{args.threads} thread(s)")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "n": len(suite.examples["samsum"]),
                                               "order": args.order, "seed": args.seed, "seconds": seconds,
                                               "rows": [r.as_dict() for r in rows]}, indent=1))


if __name__ == "__main__":
    main()
