"""AlphaEdit (Fang et al., 2025): MEMIT's layer spreading with a null-space constrained update.

    P   = U₀ U₀ᵀ, U₀ the eigenvectors of C_l with eigenvalue < null_space_threshold
    ΔW_l = R K_lᵀ P (K_l K_lᵀ P + K_p K_pᵀ P + α I)⁻¹       α = l2, K_p = keys of all earlier edits
Written as the released code solves it: A = (P (K Kᵀ + K_p K_pᵀ) + α I)⁻¹ P K and ΔW = R Aᵀ (the
transpose of the same expression, since P is symmetric). For any preserved key k₀ with P k₀ = 0,
ΔW k₀ = 0. After each batch the running sum K_p K_pᵀ += K Kᵀ, per layer, is kept in the edit context
and rebuilt from a saved log's keys on resume.
"""

from __future__ import annotations

import torch

from workers.editing.context import EditContext
from workers.editing.hparams import AlphaEditHParams
from workers.editing.memit import solve, spread_over_layers


def alphaedit_right_factor(hparams: AlphaEditHParams):
    def right(ctx: EditContext, layer: int, keys: torch.Tensor) -> torch.Tensor:
        projector = ctx.null_space_projector(layer, hparams.null_space_threshold).to(keys.device)
        earlier = ctx.key_cache.get(layer)
        gram = keys @ keys.T + (earlier.to(keys.device) if earlier is not None else 0.0)
        identity = torch.eye(keys.shape[0], dtype=keys.dtype, device=keys.device)
        return solve(projector @ gram + hparams.l2 * identity, projector @ keys)
    return right


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


def layer_index(module_name: str) -> int:
    """The layer number in a module name such as ``model.layers.7.mlp.down_proj``."""
    for part in module_name.split("."):
        if part.isdigit():
            return int(part)
    raise ValueError(f"no layer index in module name {module_name!r}")
