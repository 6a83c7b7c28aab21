"""AlphaEdit (Fang et al., 2025): MEMIT's layer spreading with a null-space constrained update.

    P   = U₀ U₀ᵀ, U₀ the eigenvectors of C_l with eigenvalue < null_space_threshold
    ΔW_l = R K_lᵀ P (K_l K_lᵀ P + K_p K_pᵀ P + α I)⁻¹       α = l2, K_p = keys of all earlier edits
Written as the released code solves it: A = (P (K Kᵀ + K_p K_pᵀ) + α I)⁻¹ P K and ΔW = R Aᵀ (the
transpose of the same expression, since P is symmetric). For any preserved key k₀ with P k₀ = 0,
ΔW k₀ = 0. After each batch the running sum K_p K_pᵀ += K Kᵀ, per layer, is kept in the edit context
and rebuilt from a saved log's keys on resume. So is P K_p K_pᵀ: by distributivity
P (K Kᵀ + K_p K_pᵀ) = (P K) Kᵀ + P K_p K_pᵀ, so each edit costs a d×b product and a d×d solve, not a
d×d×d product of P with the whole running sum (the released code's form; equal up to float64 round-off).
"""

from __future__ import annotations

import torch

from workers.editing.context import EditContext
from workers.editing.hparams import AlphaEditHParams
from workers.editing.memit import solve, spread_over_layers


def alphaedit_right_factor(hparams: AlphaEditHParams):
    def right(ctx: EditContext, layer: int, keys: torch.Tensor) -> torch.Tensor:
        threshold = hparams.null_space_threshold
        projector = ctx.null_space_projector(layer, threshold).to(keys.device)
        projected_keys = projector @ keys  # P K
        earlier = projected_earlier_keys(ctx, layer, threshold)  # P K_p K_pᵀ
        system = projected_keys @ keys.T + (earlier.to(keys.device) if earlier is not None else 0.0)
        identity = torch.eye(keys.shape[0], dtype=keys.dtype, device=keys.device)
        return solve(system + hparams.l2 * identity, projected_keys)
    return right


def projected_earlier_keys(ctx: EditContext, layer: int, threshold: float) -> torch.Tensor | None:
    """P K_p K_pᵀ of the earlier edits at ``layer``; made once from the running sum where only that is
    known (the first edit after a resume), then kept up to date by ``remember_keys``."""
    earlier = ctx.key_cache.get(layer)
    if earlier is None:
        return None
    key = (layer, threshold)
    if key not in ctx.projected_key_cache:
        ctx.projected_key_cache[key] = ctx.null_space_projector(layer, threshold).to(earlier.device) @ earlier
    return ctx.projected_key_cache[key]


def apply_alphaedit(model, tokenizer, requests, hparams: AlphaEditHParams, ctx: EditContext,
                    method: str = "alphaedit"):
    delta, info = spread_over_layers(model, tokenizer, requests, hparams, ctx, alphaedit_right_factor(hparams),
                                     method, keep_keys=True)
    remember_keys(ctx, delta)
    return delta, info


def remember_keys(ctx: EditContext, delta) -> None:
    """Add this step's K Kᵀ to the running cache of earlier edits' keys (per layer, float64)."""
    for layer_delta in delta.layers:
        if layer_delta.keys is None:
            continue
        layer = layer_index(layer_delta.module)
        keys = layer_delta.keys.double()
        gram = keys @ keys.T
        previous = ctx.key_cache.get(layer)
        ctx.key_cache[layer] = gram if previous is None else previous + gram.to(previous.device)
        for (cached_layer, threshold), projected in list(ctx.projected_key_cache.items()):
            if cached_layer == layer:  # replaced, not changed in place (edit_state keeps the old one)
                here = keys.to(projected.device)
                projector = ctx.null_space_projector(layer, threshold).to(projected.device)
                ctx.projected_key_cache[(layer, threshold)] = projected + (projector @ here) @ here.T


def layer_index(module_name: str) -> int:
    """The layer number in a module name such as ``model.layers.7.mlp.down_proj``."""
    for part in module_name.split("."):
        if part.isdigit():
            return int(part)
    raise ValueError(f"no layer index in module name {module_name!r}")
