"""Measure single-edit quality of ROME / MEMIT / AlphaEdit settings on a model, to choose its hparams.

For each of N CounterFact facts (validation split, so the edit split stays untouched): edit, score,
restore. Scores: efficacy (greedy continuation of the prompt begins with target_new), paraphrase
(same on the rephrase prompt), locality (the neighbour prompt's greedy continuation is unchanged),
and ‖ΔW‖_F. MEMIT/AlphaEdit targets z are optimised once per (fact, layer set) and re-spread for
each λ / threshold, which is exact: z does not depend on the spreading.

    python benchmarks/calibrate_hparams.py --model smollm2-135m -n 12 --json out.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from workers.data import load_counterfact
from workers.editing import load_hparams
from workers.editing.alphaedit import alphaedit_right_factor
from workers.editing.context import EditContext
from workers.editing.delta import WeightSnapshot
from workers.editing.eac import AnchoredOptimiser
from workers.editing.hparams import with_overrides
from workers.editing.memit import memit_right_factor, optimise_targets, spread_targets
from workers.editing.rome import apply_rome
from workers.generation import begins_with, greedy_continuations
from workers.models import arch_spec, load_model


def score(model, tokenizer, request, unedited_neighbour: str) -> dict:
    prompt, rephrase, neighbour = greedy_continuations(
        model, tokenizer, [request.prompt, request.rephrase_prompts[0], request.locality_prompts[0]], max_new_tokens=6)
    return {"efficacy": float(begins_with(prompt, request.target_new)),
            "paraphrase": float(begins_with(rephrase, request.target_new)),
            "locality": float(neighbour == unedited_neighbour)}


def mean_rows(rows: list[dict]) -> dict:
    keys = [k for k in rows[0] if isinstance(rows[0][k], float)]
    return {k: sum(r[k] for r in rows) / len(rows) for k in keys}


def parse_overrides(text: str) -> dict:
    """``"eac.l2_weight=1e-5,eac.score_vector=delta"`` -> dotted overrides (int, float, else string)."""
    out = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if not value:
            raise SystemExit(f"--eac-set: expected KEY=VALUE, got {item!r}")
        for convert in (int, float, str):
            try:
                out[key.strip()] = convert(value)
                break
            except ValueError:
                continue
    return out


def calibrate_eac(model, tokenizer, requests, neighbours, gamma: float, args) -> list[dict]:
    """Single-edit scores and ‖ΔW‖₁ of ROME-EAC and MEMIT-EAC at one percentile γ."""
    spec = arch_spec(model)
    out = []
    rome_layer = int(args.rome_layers.split(",")[0])
    low, high = (int(x) for x in args.memit_layer_sets.split(",")[0].split("-"))
    layers = tuple(range(low, high + 1))
    lam = float(args.memit_lambdas.split(",")[0])
    variants = {"rome-eac": {"layer": rome_layer}, "memit-eac": {"layers": layers, "mom2_update_weight": lam}}
    eac_overrides = parse_overrides(args.eac_set)
    for method, overrides in ((m, variants[m]) for m in args.eac_methods.split(",")):
        hp = with_overrides(load_hparams(method, model),
                            {**overrides, **eac_overrides, "eac.gamma_percentile": gamma})
        hp_layers = [rome_layer] if method == "rome-eac" else list(layers)
        ctx = EditContext(model, tokenizer, optimiser=AnchoredOptimiser(hp.eac))  # as the Editor builds it
        ctx.prepare_second_moments(hp_layers, hp)
        snapshot = WeightSnapshot(model, [spec.mlp_out_name(l) for l in hp_layers])
        rows, start = [], time.perf_counter()
        for request, neighbour in zip(requests, neighbours):
            if method == "rome-eac":
                delta, info = apply_rome(model, tokenizer, [request], hp, ctx, method)
                deltas, anchors, loss = delta.layers, info.anchors, info.loss
            else:
                targets, opt_results, extras = optimise_targets(model, tokenizer, [request], hp, ctx)
                deltas = spread_targets(model, tokenizer, [request], targets, hp, ctx, memit_right_factor(hp))
                anchors, loss = extras[0]["anchors"], opt_results[0].loss
            rows.append({**score(model, tokenizer, request, neighbour),
                         "dw_l1": sum(float(d.dense().abs().sum()) for d in deltas), "anchors": float(anchors),
                         "loss": float(loss)})
            snapshot.restore(model)
        out.append({"method": method, "layers": hp_layers, "gamma_percentile": gamma,
                    **eac_overrides, **mean_rows(rows),
                    "seconds_per_edit": (time.perf_counter() - start) / len(requests)})
        print(out[-1], flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("-n", type=int, default=12)
    parser.add_argument("--rome-layers", default="5")
    parser.add_argument("--memit-layer-sets", default="3-7,4-8")
    parser.add_argument("--memit-lambdas", default="500,2000,5000,15000")
    parser.add_argument("--alphaedit-thresholds", default="0.02")
    parser.add_argument("--eac-gammas", default="",
                        help="EAC percentiles to try on ROME (first --rome-layers) and MEMIT (first layer set, "
                             "first lambda), e.g. 80,90,95")
    parser.add_argument("--eac-set", default="",
                        help="dotted EAC overrides for every EAC run, e.g. eac.l2_weight=1e-5,eac.retrain_steps=25")
    parser.add_argument("--eac-methods", default="rome-eac,memit-eac", help="EAC variants --eac-gammas runs")
    parser.add_argument("--skip-base", action="store_true", help="only the EAC variants")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    requests = load_counterfact("val")[: args.n]
    neighbours = greedy_continuations(model, tokenizer, [r.locality_prompts[0] for r in requests], max_new_tokens=6)
    spec = arch_spec(model)
    results = []

    rome_base = load_hparams("rome", model)
    rome_layers = [] if args.skip_base else [int(x) for x in args.rome_layers.split(",")]
    for layer in rome_layers:
        hp = with_overrides(rome_base, {"layer": layer})
        ctx = EditContext(model, tokenizer)
        ctx.prepare_second_moments([layer], hp)
        snapshot = WeightSnapshot(model, [spec.mlp_out_name(layer)])
        rows, start = [], time.perf_counter()
        for request, neighbour in zip(requests, neighbours):
            delta, info = apply_rome(model, tokenizer, [request], hp, ctx)
            rows.append({**score(model, tokenizer, request, neighbour), "dw_fro": float(delta.layers[0].dense().norm()),
                         "dw_l1": float(delta.layers[0].dense().abs().sum()),
                         "loss": info.loss})
            snapshot.restore(model)
        results.append({"method": "rome", "layers": [layer], **mean_rows(rows),
                        "seconds_per_edit": (time.perf_counter() - start) / len(requests)})
        print(results[-1], flush=True)

    memit_base = load_hparams("memit", model)
    alpha_base = load_hparams("alphaedit", model)
    for layer_set in ([] if args.skip_base else args.memit_layer_sets.split(",")):
        low, high = (int(x) for x in layer_set.split("-"))
        layers = tuple(range(low, high + 1))
        hp = with_overrides(memit_base, {"layers": layers})
        ctx = EditContext(model, tokenizer)
        ctx.prepare_second_moments(layers, hp)
        for layer in layers:
            eigenvalues = torch.linalg.eigvalsh(ctx.second_moment(layer).double())
            for threshold in [float(t) for t in args.alphaedit_thresholds.split(",")]:
                print(f"layer {layer}: {(eigenvalues < threshold).sum().item()} of {len(eigenvalues)} eigenvalues "
                      f"< {threshold} (min {eigenvalues.min():.2e}, median {eigenvalues.median():.2e})", flush=True)
        snapshot = WeightSnapshot(model, [spec.mlp_out_name(l) for l in layers])
        variants = [("memit", {"mom2_update_weight": float(lam)}, memit_right_factor)
                    for lam in args.memit_lambdas.split(",")]
        variants += [("alphaedit", {"null_space_threshold": float(t)}, alphaedit_right_factor)
                     for t in args.alphaedit_thresholds.split(",")]
        rows = {i: [] for i in range(len(variants))}
        for request, neighbour in zip(requests, neighbours):
            targets, opt_results, _ = optimise_targets(model, tokenizer, [request], hp, ctx)
            for i, (name, override, factor) in enumerate(variants):
                variant_hp = with_overrides(alpha_base if name == "alphaedit" else hp, {"layers": layers, **override})
                ctx.clear_edit_state()
                deltas = spread_targets(model, tokenizer, [request], targets, variant_hp, ctx, factor(variant_hp))
                dw = sum(float(d.dense().norm() ** 2) for d in deltas) ** 0.5
                rows[i].append({**score(model, tokenizer, request, neighbour), "dw_fro": dw,
                                "dw_l1": sum(float(d.dense().abs().sum()) for d in deltas),
                                "loss": opt_results[0].loss})
                snapshot.restore(model)
        for i, (name, override, _) in enumerate(variants):
            results.append({"method": name, "layers": list(layers), **override, **mean_rows(rows[i])})
            print(results[-1], flush=True)
    for gamma in [float(g) for g in args.eac_gammas.split(",") if g]:
        results += calibrate_eac(model, tokenizer, requests, neighbours, gamma, args)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
