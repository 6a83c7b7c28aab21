"""Seconds of one target-optimisation step (loss + backward) of ROME (v*) and MEMIT (z) by how its
linear layers are computed, against the naive loop's step on the same batch, interleaved in one run.

Arms per request and method: ``unpacked`` (PyTorch's own linear: the path before packed_linear.py),
``packed`` (the default: oneDNN, weights packed once per problem), ``bf16`` (packed, products in
bfloat16), and ``naive`` (every token, every layer, logits everywhere: edit_latency.py's baseline step,
on ROME's rewriting batch for ROME and on MEMIT's for MEMIT). Every repeat runs every arm of every
request, so a change in the machine's load falls on all alike; medians are reported, with each arm's
step / naive step and packed (bf16) / unpacked. Also each arm's loss and gradient at the same δ against
unpacked float32's (relative difference), so the speed is read next to what it changes.
A whole edit adds the key pass, the setup forward and the update to its steps (edit_latency.py).

    python benchmarks/target_step.py --threads 1 --repeats 5 --json benchmarks/results/target_step-smollm2.json
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from edit_latency import naive_step_seconds  # noqa: E402
from workers.data import load_counterfact  # noqa: E402
from workers.editing import load_hparams  # noqa: E402
from workers.editing.context import EditContext  # noqa: E402
from workers.editing.targets import TargetProblem  # noqa: E402
from workers.models import arch_spec, load_model  # noqa: E402
from workers.packed_linear import LinearCompute  # noqa: E402

ARMS = {"unpacked": LinearCompute(packed=False), "packed": LinearCompute(), "bf16": LinearCompute(dtype=torch.bfloat16)}


def arms_for(model, tokenizer, method: str, request, cache_dir) -> dict:
    """arm -> a function running one step and returning (loss, gradient)."""
    hparams = load_hparams(method, model)
    templates = EditContext(model, tokenizer, cache_dir=cache_dir).context_templates(hparams)
    if method == "rome":
        layer, init_from, injected = hparams.layer, "mlp", arch_spec(model).mlp_out_name(hparams.layer)
    else:
        layer = list(hparams.layers)[-1]
        init_from, injected = "residual", arch_spec(model).layer_name(layer)
    functions = {}
    for arm, compute in ARMS.items():
        problem = TargetProblem(model, tokenizer, request, layer, templates, init_from=init_from,
                                config=hparams.target_config(), compute=compute)
        delta = torch.full_like(problem.v_init, 0.01, requires_grad=True)

        def step(problem=problem, delta=delta):
            loss = problem.loss(delta).total
            loss.backward()
            gradient, delta.grad = delta.grad.clone(), None
            return float(loss.detach()), gradient
        functions[arm] = step
    naive_problem = TargetProblem(model, tokenizer, request, layer, templates, init_from=init_from,
                                  config=hparams.target_config(), compute=ARMS["unpacked"])
    functions["naive"] = lambda: (naive_step_seconds(model, naive_problem, injected, repeats=1), None)
    return functions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", default="rome,memit")
    parser.add_argument("--requests", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cache-dir", help="context templates cached there (e.g. ~/.cache/eac)")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    requests = load_counterfact("edit")[: args.requests]
    cases = {(method, i): arms_for(model, tokenizer, method, request, args.cache_dir)
             for method in args.methods.split(",") for i, request in enumerate(requests)}
    load_before = os.getloadavg()[0]
    agreement = {}
    for case, functions in cases.items():
        reference_loss, reference_gradient = functions["unpacked"]()
        for arm in ("packed", "bf16"):
            loss, gradient = functions[arm]()
            agreement[(case, arm)] = (abs(loss - reference_loss) / abs(reference_loss),
                                      float((gradient - reference_gradient).norm() / reference_gradient.norm()))
    seconds = {(case, arm): [] for case, functions in cases.items() for arm in functions}
    for _ in range(args.repeats):
        for case, functions in cases.items():
            for arm, function in functions.items():
                start = time.perf_counter()
                function()
                seconds[(case, arm)].append(time.perf_counter() - start)
    load_after = os.getloadavg()[0]
    rows = []
    for (method, index), functions in cases.items():
        median = {arm: statistics.median(seconds[((method, index), arm)]) for arm in functions}
        row = {"method": method, "request": index, "seconds": median,
               **{f"{arm}_over_naive": median[arm] / median["naive"] for arm in ARMS},
               "packed_over_unpacked": median["packed"] / median["unpacked"],
               "bf16_over_packed": median["bf16"] / median["packed"],
               **{f"{arm}_loss_rel_diff": agreement[((method, index), arm)][0] for arm in ("packed", "bf16")},
               **{f"{arm}_grad_rel_diff": agreement[((method, index), arm)][1] for arm in ("packed", "bf16")}}
        rows.append(row)
        print(f"{method:6s} request {index}: step s unpacked {median['unpacked']:.3f} packed {median['packed']:.3f} "
              f"bf16 {median['bf16']:.3f} naive {median['naive']:.3f} | /naive unpacked {row['unpacked_over_naive']:.3f} "
              f"packed {row['packed_over_naive']:.3f} bf16 {row['bf16_over_naive']:.3f} | packed/unpacked "
              f"{row['packed_over_unpacked']:.2f} bf16/packed {row['bf16_over_packed']:.2f} | grad rel diff packed "
              f"{row['packed_grad_rel_diff']:.1e} bf16 {row['bf16_grad_rel_diff']:.1e}", flush=True)
    print(f"{args.threads} thread(s); load average before {load_before:.1f}, after {load_after:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"threads": args.threads, "repeats": args.repeats,
                                               "load_average": [load_before, load_after], "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
