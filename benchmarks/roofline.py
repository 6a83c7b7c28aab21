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

**Arms** (``--arms``): ``float32-unpacked`` runs every phase on PyTorch's own linear (MKL: the toolkit
before ``workers/packed_linear.py``); ``float32`` as the toolkit runs it now — the target optimisation's
upper layers and LM head packed on oneDNN (``LinearCompute()``), the scoring phases with the whole
model packed once, as ``evaluate_checkpoint`` does per checkpoint; ``bfloat16`` a bfloat16 copy of the
model (``load_model(dtype=bfloat16)``), packed the same way. The naive step is the same plain loop in
every arm. The peak of a dtype is the best of both backends (``a @ b`` on MKL, the oneDNN product with
the weight packed once) over the shapes, so before and after are fractions of the same roofline.

The arms' runs are **interleaved** (every phase in every arm, then the next repeat), so a change in the
machine's load falls on all alike; on a shared machine read the fractions and ratios, not the seconds.
A phase that fails in an arm is reported with its error.

    python benchmarks/roofline.py --threads 1 --json benchmarks/results/roofline-smollm2.json
"""

from __future__ import annotations

import argparse
import contextlib
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
from workers.packed_linear import LinearCompute, _pack, _product, linear_names  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from edit_latency import naive_step_seconds  # noqa: E402


def matmul_shapes(config, rows: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """(m, k, n) of the model's linear layers for ``rows`` tokens at once."""
    hidden, width, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    return [(m, k, n) for m in rows for k, n in ((hidden, hidden), (hidden, width), (width, hidden), (hidden, vocab))]


# An arm: the model's dtype, how the target optimisation computes its linear layers, whether the
# scoring phases run with the whole model packed (as evaluate_checkpoint runs a checkpoint).
ARMS = {"float32-unpacked": (torch.float32, LinearCompute(packed=False), False),
        "float32": (torch.float32, LinearCompute(), True),
        "bfloat16": (torch.bfloat16, LinearCompute(), True)}
BACKENDS = ("mkl", "onednn")


def time_matmul(m: int, k: int, n: int, dtype: torch.dtype, repeats: int, backend: str = "mkl") -> float:
    """GFLOP/s of ``(m, k) @ (k, n)`` (the median of ``repeats`` timings, each ≥ 50 ms of work): ``mkl``
    is PyTorch's ``a @ b``; ``onednn`` the packed product the toolkit's passes use (weight packed once)."""
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    if backend == "onednn":
        packed = _pack(b.t().contiguous(), m)

        def product():
            return _product(a, packed, None)
    else:
        def product():
            return a @ b
    product()  # warm-up
    start, calls = time.perf_counter(), 0
    while time.perf_counter() - start < 0.05:
        product()
        calls += 1
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            product()
        timings.append((time.perf_counter() - start) / calls)
    return 2 * m * k * n / statistics.median(timings) / 1e9


def counted_flops(function) -> int:
    with FlopCounterMode(display=False) as counter:
        function()
    return counter.get_total_flops()


def target_step(model, tokenizer, method: str, request, *, naive: bool = False, compute=LinearCompute()):
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
    problem = TargetProblem(model, tokenizer, request, layer, templates, init_from=init_from, config=config,
                            compute=compute)
    if naive:
        return lambda: naive_step_seconds(model, problem, injected, repeats=1)
    delta = torch.zeros_like(problem.v_init, requires_grad=True)

    def step():
        problem.loss(delta).total.backward()
        delta.grad = None
    return step


def phases(model, tokenizer, requests, windows, max_new_tokens: int, compute: LinearCompute = LinearCompute(),
           pack_scoring: bool = True) -> dict:
    """name -> a function running that phase once, in an arm (``ARMS``)."""
    edit_requests = requests[1:]
    reference = unedited_locality_argmax(model, tokenizer, edit_requests, ReferenceCache(), "roofline")
    prompts = [r.prompt for r in edit_requests]
    packed = compute.pack(model, linear_names(model, [""]), gradients=False) if pack_scoring else None

    def scoring(function):
        """``function`` with the whole model packed (packed once, as per checkpoint) where the arm packs."""
        def run():
            with packed.swapped() if packed is not None else contextlib.nullcontext():
                return function()
        return run
    return {
        "rome_step": target_step(model, tokenizer, "rome", requests[0], compute=compute),
        "memit_step": target_step(model, tokenizer, "memit", requests[0], compute=compute),
        "naive_step": target_step(model, tokenizer, "rome", requests[0], naive=True),
        "edit_scoring": scoring(lambda: edit_metric_rows(model, tokenizer, edit_requests, families=("toolkit",),
                                                         locality_reference=reference)),
        "perplexity": scoring(lambda: window_nlls(model, tokenizer, windows)),
        "generation": scoring(lambda: greedy_continuations(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                                           sort_by_length=True)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--arms", default="float32-unpacked,float32,bfloat16", help=f"of {list(ARMS)}")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the actors use one per CPU)")
    parser.add_argument("--requests", type=int, default=16, help="requests per scoring / generation batch")
    parser.add_argument("--windows", type=int, default=2, help="WikiText windows of 512 tokens")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    arms = {name: ARMS[name] for name in args.arms.split(",")}
    dtypes = list(dict.fromkeys(dtype for dtype, _, _ in arms.values()))

    requests = load_counterfact("edit")[: args.requests + 1]
    models = {dtype: load_model(args.model, dtype=dtype) for dtype in dtypes}
    model, tokenizer = models[dtypes[0]]
    config = EvalConfig.from_dict({"tasks": {"wikitext": args.windows}})
    windows = TaskSuite.load(tokenizer, config, context_length=context_length(model)).perplexity_windows
    load_before = os.getloadavg()
    print(f"{args.model}, {args.threads} thread(s), {os.cpu_count()} CPUs, load average before {load_before[0]:.1f}",
          flush=True)

    # Peak: every shape in every dtype on both backends, interleaved shape by shape.
    shapes = matmul_shapes(model.config, (16, 64, 512))
    matmul = {f"{str(dtype).removeprefix('torch.')}/{backend}": {} for dtype in dtypes for backend in BACKENDS}
    for m, k, n in shapes:
        for dtype in dtypes:
            for backend in BACKENDS:
                matmul[f"{str(dtype).removeprefix('torch.')}/{backend}"][f"{m}x{k}x{n}"] = time_matmul(
                    m, k, n, dtype, args.repeats, backend)
    for name, values in matmul.items():
        print(f"matmul {name}: best {max(values.values()):.1f} GFLOP/s; "
              + ", ".join(f"{shape} {value:.0f}" for shape, value in values.items()), flush=True)
    # A dtype's peak: its best (backend, shape), whichever arm runs it.
    best: dict[torch.dtype, tuple[str, tuple[int, int, int]]] = {}
    peak: dict[str, float] = {}
    for dtype in dtypes:
        name = str(dtype).removeprefix("torch.")
        value, backend, shape = max((rate, b, shape) for b in BACKENDS
                                    for shape, rate in matmul[f"{name}/{b}"].items())
        best[dtype], peak[name] = (backend, tuple(map(int, shape.split("x")))), value
        print(f"peak {name}: {value:.1f} GFLOP/s ({backend} {shape})")

    # FLOPs per phase, counted on the plain layers (FlopCounterMode does not see oneDNN's packed product;
    # packing changes how the same products run, not how many there are).
    counted: dict[torch.dtype, dict[str, int]] = {}
    for dtype in dtypes:
        m, t = models[dtype]
        counted[dtype] = {}
        for phase, run in phases(m, t, requests, windows, args.max_new_tokens, LinearCompute(packed=False),
                                 False).items():
            try:
                run()  # warm-up
                counted[dtype][phase] = counted_flops(run)
            except Exception:  # noqa: BLE001 - the arm's own run reports it below
                pass
    runs: dict[str, dict] = {}
    flops: dict[str, dict] = {}
    errors: dict[str, dict] = {}
    for name, (dtype, compute, pack_scoring) in arms.items():
        m, t = models[dtype]
        try:
            runs[name] = phases(m, t, requests, windows, args.max_new_tokens, compute, pack_scoring)
        except Exception as exc:  # noqa: BLE001 - reported, not hidden
            errors[name] = {"setup": f"{type(exc).__name__}: {exc}"}
            runs[name] = {}
            continue
        flops[name], errors[name] = {}, {}
        for phase, run in list(runs[name].items()):
            try:
                run()  # warm-up
                flops[name][phase] = counted[dtype][phase]
            except Exception as exc:  # noqa: BLE001
                errors[name][phase] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                del runs[name][phase]
    # Each phase timed right after its dtype's best matmul, every repeat: the fraction of peak is taken
    # within the repeat (the machine's load then is the same for both), its median reported.
    seconds: dict[str, dict[str, list[float]]] = {name: {phase: [] for phase in runs[name]} for name in runs}
    local_peak: dict[str, dict[str, list[float]]] = {name: {phase: [] for phase in runs[name]} for name in runs}
    for _ in range(args.repeats):
        for phase in runs[next(iter(arms))]:
            for name, (dtype, _, _) in arms.items():
                if phase in runs.get(name, {}):
                    backend, (m, k, n) = best[dtype]
                    local_peak[name][phase].append(time_matmul(m, k, n, dtype, 3, backend))
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
            rows.append({"arm": name, "phase": phase, "seconds": median, "seconds_all": timings, "gflop": gflop,
                         "gflop_per_s": rate, "peak_gflop_per_s": phase_peak, "peak_all": local_peak[name][phase],
                         "fraction_of_peak": fraction, "gap_seconds": median - gflop / phase_peak})
        for phase, error in errors.get(name, {}).items():
            rows.append({"arm": name, "phase": phase, "error": error})
    print(f"\n{'arm':16s} {'phase':13s} {'seconds':>8s} {'GFLOP':>8s} {'GFLOP/s':>8s} {'peak':>8s} {'of peak':>8s} "
          f"{'gap s':>8s}")
    for row in rows:
        if "error" in row:
            print(f"{row['arm']:16s} {row['phase']:13s} failed: {row['error']}")
            continue
        print(f"{row['arm']:16s} {row['phase']:13s} {row['seconds']:8.3f} {row['gflop']:8.2f} {row['gflop_per_s']:8.1f} "
              f"{row['peak_gflop_per_s']:8.1f} {row['fraction_of_peak']:8.2f} {row['gap_seconds']:8.3f}")
    first = next(iter(arms))
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
