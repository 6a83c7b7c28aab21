"""A roofline for editing and scoring: achieved FLOP/s of each phase against the machine's measured
matmul throughput, in one run.

1. **Peak.** The machine's matmul throughput on the default model's shapes (rows × hidden → hidden,
   → MLP width, MLP width → hidden, hidden → vocabulary, for a few row counts), per dtype (float32,
   bfloat16): GFLOP/s = 2·m·k·n / seconds, the median of ``--repeats`` timings each. The peak of a
   dtype is the best shape's; every phase is compared with it.
2. **Phases**, each timed the way the toolkit runs it, its FLOPs counted by
   ``torch.utils.flop_counter.FlopCounterMode`` on one untimed run — so what is counted is exactly the
   work dispatched: suffix tokens only and the layers above the edited one for the target
   optimisation (prefix reuse), logits only at the scored positions, matmuls and attention, forward
   and backward. Elementwise work (norms, activations, softmax, Adam) is not counted: it is part of
   the gap.
   - ``rome_step`` / ``memit_step``: one optimisation step of v* (ROME, δ on the MLP output of its
     layer) / z (MEMIT, δ on the residual after its last layer): loss + backward of a CounterFact
     request's rewriting batch with the method's context templates (``TargetProblem``);
   - ``naive_step``: the same step as the naive loop runs it (every token, every layer, logits
     everywhere — ``benchmarks/edit_latency.py``'s baseline), for scale;
   - ``edit_scoring``: the toolkit editing metrics (reliability, generalisation, locality) of a batch
     of ``--requests`` requests (``edit_metric_rows``);
   - ``perplexity``: ``--windows`` WikiText windows of 512 tokens (``window_nlls``);
   - ``generation``: greedy decoding of ``--max-new-tokens`` tokens after ``--requests`` CounterFact
     prompts (``greedy_continuations``, sorted by length as the evaluation does).
   For each: seconds (median of ``--repeats``), GFLOP counted, achieved GFLOP/s, the fraction of the
   dtype's peak, and the gap: seconds − FLOPs / peak (the time the phase spends above its roofline).
   The peak shape of each dtype is timed again right before every timed phase and the fraction taken
   within that repeat (median reported), so a change of the machine's load between the peak's
   measurement and the phase's does not enter the fraction.

The dtypes' runs are **interleaved** (every phase in every dtype, then the next repeat), so a change
in the machine's load falls on all alike; on a shared machine read the fractions and ratios, not the
seconds. bfloat16 runs a bfloat16 copy of the model (``load_model(dtype=bfloat16)``); a phase that
fails there is reported with its error (the editing code's bf16 correctness is another issue's).

    python benchmarks/roofline.py --threads 1 --json benchmarks/results/roofline-smollm2.json
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
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from workers.data import load_counterfact  # noqa: E402
from workers.editing import load_hparams  # noqa: E402
from workers.editing.context import EditContext  # noqa: E402
from workers.editing.targets import TargetProblem  # noqa: E402
from workers.evaluation.config import EvalConfig  # noqa: E402
from workers.evaluation.edit_metrics import edit_metric_rows, unedited_locality_argmax  # noqa: E402
from workers.evaluation.suite import TaskSuite  # noqa: E402
from workers.evaluation.reference import ReferenceCache  # noqa: E402
from workers.evaluation.tasks import window_nlls  # noqa: E402
from workers.generation import greedy_continuations  # noqa: E402
from workers.models import arch_spec, context_length, load_model  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from edit_latency import naive_step_seconds  # noqa: E402


def matmul_shapes(config, rows: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """(m, k, n) of the model's linear layers for ``rows`` tokens at once."""
    hidden, width, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    return [(m, k, n) for m in rows for k, n in ((hidden, hidden), (hidden, width), (width, hidden), (hidden, vocab))]


def time_matmul(m: int, k: int, n: int, dtype: torch.dtype, repeats: int) -> float:
    """GFLOP/s of ``(m, k) @ (k, n)`` (the median of ``repeats`` timings, each ≥ 50 ms of work)."""
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    a @ b  # warm-up
    start, calls = time.perf_counter(), 0
    while time.perf_counter() - start < 0.05:
        a @ b
        calls += 1
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            a @ b
        timings.append((time.perf_counter() - start) / calls)
    return 2 * m * k * n / statistics.median(timings) / 1e9


def counted_flops(function) -> int:
    with FlopCounterMode(display=False) as counter:
        function()
    return counter.get_total_flops()


def target_step(model, tokenizer, method: str, request, *, naive: bool = False):
    """One optimisation step of ``method``'s target vector for ``request`` (loss + backward), as a
    function; ``naive``: the naive loop's step on the same batch instead."""
    hparams = load_hparams(method, model)
    config = hparams.target_config()
    templates = EditContext(model, tokenizer).context_templates(hparams)
    if method == "rome":
        layer, init_from = hparams.layer, "mlp"
        injected = arch_spec(model).mlp_out_name(layer)
    else:
        layer, init_from = list(hparams.layers)[-1], "residual"
        injected = arch_spec(model).layer_name(layer)
    problem = TargetProblem(model, tokenizer, request, layer, templates, init_from=init_from, config=config)
    if naive:
        return lambda: naive_step_seconds(model, problem, injected, repeats=1)
    delta = torch.zeros_like(problem.v_init, requires_grad=True)

    def step():
        problem.loss(delta).total.backward()
        delta.grad = None
    return step


def phases(model, tokenizer, requests, windows, max_new_tokens: int) -> dict:
    """name -> a function running that phase once."""
    edit_requests = requests[1:]
    reference = unedited_locality_argmax(model, tokenizer, edit_requests, ReferenceCache(), "roofline")
    prompts = [r.prompt for r in edit_requests]
    return {
        "rome_step": target_step(model, tokenizer, "rome", requests[0]),
        "memit_step": target_step(model, tokenizer, "memit", requests[0]),
        "naive_step": target_step(model, tokenizer, "rome", requests[0], naive=True),
        "edit_scoring": lambda: edit_metric_rows(model, tokenizer, edit_requests, families=("toolkit",),
                                                 locality_reference=reference),
        "perplexity": lambda: window_nlls(model, tokenizer, windows),
        "generation": lambda: greedy_continuations(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                                   sort_by_length=True),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the actors use one per CPU)")
    parser.add_argument("--requests", type=int, default=16, help="requests per scoring / generation batch")
    parser.add_argument("--windows", type=int, default=2, help="WikiText windows of 512 tokens")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtypes = [getattr(torch, name) for name in args.dtypes.split(",")]

    requests = load_counterfact("edit")[: args.requests + 1]
    models = {dtype: load_model(args.model, dtype=dtype) for dtype in dtypes}
    model, tokenizer = models[dtypes[0]]
    config = EvalConfig.from_dict({"tasks": {"wikitext": args.windows}})
    windows = TaskSuite.load(tokenizer, config, context_length=context_length(model)).perplexity_windows
    load_before = os.getloadavg()
    print(f"{args.model}, {args.threads} thread(s), {os.cpu_count()} CPUs, load average before {load_before[0]:.1f}",
          flush=True)

    # Peak: every shape in every dtype, interleaved shape by shape.
    shapes = matmul_shapes(model.config, (16, 64, 512))
    matmul = {str(dtype).removeprefix("torch."): {} for dtype in dtypes}
    for m, k, n in shapes:
        for dtype in dtypes:
            matmul[str(dtype).removeprefix("torch.")][f"{m}x{k}x{n}"] = time_matmul(m, k, n, dtype, args.repeats)
    peak = {name: max(values.values()) for name, values in matmul.items()}
    for name, values in matmul.items():
        print(f"matmul {name}: peak {peak[name]:.1f} GFLOP/s; "
              + ", ".join(f"{shape} {value:.0f}" for shape, value in values.items()), flush=True)

    runs: dict[str, dict] = {}
    flops: dict[str, dict] = {}
    errors: dict[str, dict] = {}
    for dtype in dtypes:
        name = str(dtype).removeprefix("torch.")
        m, t = models[dtype]
        try:
            runs[name] = phases(m, t, requests, windows, args.max_new_tokens)
        except Exception as exc:  # noqa: BLE001 - reported, not hidden
            errors[name] = {"setup": f"{type(exc).__name__}: {exc}"}
            runs[name] = {}
            continue
        flops[name], errors[name] = {}, {}
        for phase, run in list(runs[name].items()):
            try:
                run()  # warm-up
                flops[name][phase] = counted_flops(run)
            except Exception as exc:  # noqa: BLE001
                errors[name][phase] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                del runs[name][phase]
    # Each phase timed right after its dtype's best matmul shape, every repeat: the fraction of peak is
    # taken within the repeat (the machine's load then is the same for both), its median reported.
    best = {name: max(values, key=values.get) for name, values in matmul.items()}
    seconds: dict[str, dict[str, list[float]]] = {name: {phase: [] for phase in runs[name]} for name in runs}
    local_peak: dict[str, dict[str, list[float]]] = {name: {phase: [] for phase in runs[name]} for name in runs}
    for _ in range(args.repeats):
        for phase in runs[str(dtypes[0]).removeprefix("torch.")]:
            for dtype in dtypes:
                name = str(dtype).removeprefix("torch.")
                if phase in runs.get(name, {}):
                    m, k, n = map(int, best[name].split("x"))
                    local_peak[name][phase].append(time_matmul(m, k, n, dtype, 3))
                    start = time.perf_counter()
                    runs[name][phase]()
                    seconds[name][phase].append(time.perf_counter() - start)

    rows = []
    for name in runs:
        for phase, timings in seconds[name].items():
            median = statistics.median(timings)
            gflop = flops[name][phase] / 1e9
            rate = gflop / median
            fractions = [gflop / t / p for t, p in zip(timings, local_peak[name][phase])]
            fraction = statistics.median(fractions)
            phase_peak = statistics.median(local_peak[name][phase])
            rows.append({"dtype": name, "phase": phase, "seconds": median, "seconds_all": timings, "gflop": gflop,
                         "gflop_per_s": rate, "peak_gflop_per_s": phase_peak, "peak_all": local_peak[name][phase],
                         "fraction_of_peak": fraction, "gap_seconds": median - gflop / phase_peak})
        for phase, error in errors.get(name, {}).items():
            rows.append({"dtype": name, "phase": phase, "error": error})
    print(f"\n{'dtype':9s} {'phase':13s} {'seconds':>8s} {'GFLOP':>8s} {'GFLOP/s':>8s} {'peak':>8s} {'of peak':>8s} "
          f"{'gap s':>8s}")
    for row in rows:
        if "error" in row:
            print(f"{row['dtype']:9s} {row['phase']:13s} failed: {row['error']}")
            continue
        print(f"{row['dtype']:9s} {row['phase']:13s} {row['seconds']:8.3f} {row['gflop']:8.2f} {row['gflop_per_s']:8.1f} "
              f"{row['peak_gflop_per_s']:8.1f} {row['fraction_of_peak']:8.2f} {row['gap_seconds']:8.3f}")
    first = str(dtypes[0]).removeprefix("torch.")
    for name in runs:
        if name == first:
            continue
        for phase in seconds[name]:
            if phase in seconds[first]:
                ratio = statistics.median(seconds[name][phase]) / statistics.median(seconds[first][phase])
                print(f"{name}/{first} seconds {phase}: {ratio:.2f}")
    load_after = os.getloadavg()
    print(f"load average after {load_after[0]:.1f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"model": args.model, "threads": args.threads, "cpus": os.cpu_count(),
                       "load_average": [load_before[0], load_after[0]], "matmul_gflop_per_s": matmul, "peak": peak,
                       "phases": rows}, handle, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
