"""GFLOP/s of the default model's linear-layer shapes: PyTorch's ``linear`` against oneDNN with the
weight packed once (workers/packed_linear.py), float32 and bf16 products, interleaved in one run.

For each (rows, in, out) shape — the target optimisation's (66 rows: 22 prompts × 3 suffix tokens; the
LM head at 22 rows, forward and its backward's transposed product) and a scoring batch's (440 rows) —
the arms alternate over ``--rounds``; each timing is CPU time of the process (``time.process_time``:
on a shared machine, the wall clock also counts the time other processes held the core), median
reported, with the largest difference from a float64 product relative to its largest value.

    python benchmarks/packed_linear.py --json benchmarks/results/packed_linear-smollm2.json
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

from workers.packed_linear import PackedLinear  # noqa: E402

SHAPES = [(66, 576, 1536), (66, 1536, 576), (66, 576, 576), (66, 576, 192), (22, 576, 49152), (22, 49152, 576),
          (440, 576, 1536)]


def cpu_seconds(function, calls: int) -> float:
    start = time.process_time()
    for _ in range(calls):
        function()
    return (time.process_time() - start) / calls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for m, k, n in SHAPES:
        torch.manual_seed(0)
        x, linear = torch.randn(m, k), torch.nn.Linear(k, n, bias=False).requires_grad_(False)
        arms = {"pytorch": linear, "packed": PackedLinear(linear, gradients=False),
                "packed_bf16": PackedLinear(linear, torch.bfloat16, gradients=False)}
        exact = x.double() @ linear.weight.double().t()
        error = {name: float((arm(x).double() - exact).abs().max() / exact.abs().max()) for name, arm in arms.items()}
        seconds: dict[str, list[float]] = {name: [] for name in arms}
        for _ in range(args.rounds):
            for name, arm in arms.items():
                seconds[name].append(cpu_seconds(lambda: arm(x), args.calls))
        flop = 2 * m * k * n / 1e9
        row = {"shape": [m, k, n], **{f"{name}_gflop_per_s": flop / statistics.median(t) for name, t in seconds.items()},
               **{f"{name}_relative_error": e for name, e in error.items()}}
        rows.append(row)
        print(f"{m:4d} x {k:5d} x {n:5d}: GFLOP/s " + ", ".join(f"{name} {row[f'{name}_gflop_per_s']:.0f}" for name in arms)
              + f"  packed/pytorch {row['packed_gflop_per_s'] / row['pytorch_gflop_per_s']:.2f}x  relative error "
              + ", ".join(f"{name} {e:.1e}" for name, e in error.items()), flush=True)
    load = os.getloadavg()[0]
    print(f"1 thread, CPU time; load average {load:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"load_average": load, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
