"""MEMIT (Meng et al., 2023) and the layer-spreading loop it shares with AlphaEdit.

For a batch of requests: optimise z_i = z_init + δ_i at the output of the last edited layer L
(targets.py, one δ per request). Then for each edited layer l in ascending order, with the weights
already updated at the layers before it:
    K_l = keys at the subject's last token: ½ k("{}") + ½ mean over the generated context
          templates (MEMIT's compute_ks; keys.template_weights)                        (d_in × n)
    R   = (Z − z_cur) / (number of layers still to edit)                              (d × n)
    MEMIT:     ΔW_l = R K_lᵀ (λ C_l + K_l K_lᵀ)⁻¹          solved in float64, λ = mom2_update_weight
    AlphaEdit: ΔW_l = R K_lᵀ P (K_l K_lᵀ P + K_p K_pᵀ P + α I)⁻¹      (alphaedit.py)
and ΔW_l is applied before moving to the next layer. Both updates are stored factorised:
ΔW_l = R Aᵀ with A (d_in × n).
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from workers.data import EditRequest
from workers.editing.context import EditContext
from workers.editing.delta import LayerDelta, WeightDelta
from workers.editing.hparams import MemitHParams
from workers.editing.keys import at_subject, template_weights
from workers.editing.errors import EditFailure
from workers.editing.record import StepInfo
from workers.editing.targets import TargetBatch, TargetProblem
from workers.models import arch_spec

# (ctx, layer, keys K (d_in × n, float64)) -> A (d_in × n, float64) such that ΔW = R Aᵀ
RightFactor = Callable[[EditContext, int, torch.Tensor], torch.Tensor]


def memit_right_factor(hparams: MemitHParams) -> RightFactor:
    def right(ctx: EditContext, layer: int, keys: torch.Tensor) -> torch.Tensor:
        # (λC + KKᵀ)⁻¹ K — the system is symmetric, so ΔW = R Kᵀ(λC + KKᵀ)⁻¹ = R [(λC + KKᵀ)⁻¹ K]ᵀ.
        # By the Woodbury identity (λC + KKᵀ)⁻¹ K = Y (I + KᵀY)⁻¹ with Y = (λC)⁻¹ K: C⁻¹ goes through
        # the context's Cholesky factor of C, made once per layer, so an edit costs O(d²n) and an
        # n × n solve instead of forming and factorising a fresh d × d system (O(d³)) every time.
        scaled = ctx.solve_second_moment(layer, keys).to(keys.device) / hparams.mom2_update_weight
        small = torch.eye(keys.shape[1], dtype=keys.dtype, device=keys.device) + keys.T @ scaled
        # I + KᵀY is symmetric, so Y (I + KᵀY)⁻¹ = [(I + KᵀY)⁻¹ Yᵀ]ᵀ.
        return solve(small, scaled.T).T
    return right


def solve(system: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    solution, info = torch.linalg.solve_ex(system, rhs)
    if int(info) != 0 or not torch.isfinite(solution).all():
        raise EditFailure("the layer update's linear system is singular")
    return solution


def optimise_targets(model, tokenizer, requests: list[EditRequest], hparams, ctx: EditContext):
    """z_i = z_init + δ_i at the output of the last edited layer, by the context's target optimiser.
    One that batches optimises all requests together, in one batched forward per step
    (targets.TargetBatch: the same per-request results as one at a time); otherwise one at a time."""
    templates = ctx.context_templates(hparams)
    layer, config = list(hparams.layers)[-1], hparams.target_config()
    optimiser = ctx.optimiser
    if optimiser.batches:
        problem = TargetBatch(model, tokenizer, requests, layer, templates, init_from="residual", config=config,
                              compute=ctx.compute)
        results, reports = optimiser.optimise_batch(problem)
        return [v + r.delta for v, r in zip(problem.v_inits, results)], results, reports
    results, reports, targets = [], [], []
    for request in requests:
        problem = TargetProblem(model, tokenizer, request, layer, templates, init_from="residual", config=config,
                                compute=ctx.compute)
        result, report = optimiser.optimise(problem)
        targets.append(problem.v_init + result.delta)
        results.append(result)
        reports.append(report)
    return targets, results, reports


def spread_targets(model, tokenizer, requests: list[EditRequest], targets: list[torch.Tensor], hparams,
                   ctx: EditContext, right_factor: RightFactor, keep_keys: bool = False,
                   seconds: dict | None = None) -> list[LayerDelta]:
    """Write the targets into the layers in ascending order, applying each layer's update in place."""
    spec = arch_spec(model)
    layers = list(hparams.layers)
    if layers != sorted(layers):
        raise ValueError(f"layers must be ascending, got {layers}")
    last_layer = spec.layer_name(layers[-1])
    templates = ctx.context_templates(hparams)
    target_z = torch.stack(targets).double().T  # (d, n)
    seconds = seconds if seconds is not None else {}
    seconds.setdefault("keys", 0.0)
    seconds.setdefault("update", 0.0)
    layer_deltas = []
    for i, layer in enumerate(layers):
        start = time.perf_counter()
        module = spec.mlp_out_name(layer)
        keys = at_subject(model, tokenizer, requests, module, templates, inputs=True,
                          weights=template_weights(templates)).double().T  # (d_in, n)
        current_z = at_subject(model, tokenizer, requests, last_layer, ["{}"], inputs=False).double().T
        seconds["keys"] += time.perf_counter() - start

        start = time.perf_counter()
        residual = (target_z.to(current_z.device) - current_z) / (len(layers) - i)
        right = right_factor(ctx, layer, keys)
        layer_delta = LayerDelta(module, residual.float(), right.float(), keys.float() if keep_keys else None,
                                 layer=layer)
        layer_delta.apply(model)
        layer_deltas.append(layer_delta)
        seconds["update"] += time.perf_counter() - start
    return layer_deltas


def spread_over_layers(model, tokenizer, requests: list[EditRequest], hparams, ctx: EditContext,
                       right_factor: RightFactor, method: str, keep_keys: bool = False) -> tuple[WeightDelta, StepInfo]:
    info = StepInfo()
    start = time.perf_counter()
    targets, results, reports = optimise_targets(model, tokenizer, requests, hparams, ctx)
    info.seconds["targets"] = time.perf_counter() - start
    layer_deltas = spread_targets(model, tokenizer, requests, targets, hparams, ctx, right_factor, keep_keys,
                                  info.seconds)
    info.absorb(results, reports)
    info.targets = targets
    return WeightDelta(layer_deltas, [r.case_id for r in requests], method), info


class LayerSolve:
    """How MEMIT solves each layer's least-squares update ΔW = R Aᵀ: its own (λC + KKᵀ)⁻¹ K by default.
    A constraint may supply another (``methods.Constraint.solve``: ENCORE's norm-constrained system,
    encore.py), which the Editor puts in the edit context (``ctx.layer_solve``); MEMIT reads it from
    there and never knows which constraint it is."""

    # Whether the deltas keep their keys K (for ``remember``, and through a saved log for a resume).
    keeps_keys = False

    def right_factor(self, hparams: MemitHParams) -> RightFactor:
        return memit_right_factor(hparams)

    def remember(self, ctx: EditContext, delta: WeightDelta) -> None:
        """After a step, and for each delta of a replayed log: what the solve keeps of earlier edits
        (a running state in ``ctx``); nothing by default."""


def apply_memit(model, tokenizer, requests, hparams: MemitHParams, ctx: EditContext, method: str = "memit"):
    if ctx.layer_solve is None:
        return spread_over_layers(model, tokenizer, requests, hparams, ctx, memit_right_factor(hparams), method)
    solver = ctx.layer_solve
    delta, info = spread_over_layers(model, tokenizer, requests, hparams, ctx, solver.right_factor(hparams), method,
                                     keep_keys=solver.keeps_keys)
    solver.remember(ctx, delta)
    return delta, info


def remember_solved(ctx: EditContext, delta: WeightDelta) -> None:
    """MEMIT's ``on_resume``: replay a saved delta into the layer solve's running state, if it keeps one."""
    if ctx.layer_solve is not None:
        ctx.layer_solve.remember(ctx, delta)
