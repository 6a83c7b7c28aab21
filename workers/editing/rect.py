"""RECT (Gu et al., "Model Editing Harms General Abilities of Large Language Models: Regularization to
the Rescue", EMNLP 2024) around ROME, MEMIT and AlphaEdit: of each edit step's update ΔW of a matrix W,
keep only the top k% of elements by relative change in weight,

    δ_ij = |ΔW_ij| / |W_ij|      (W: the matrix before this step's update),

as the principal editing information, and set the other elements of ΔW to 0. Published default
k = 20% (the authors' code zeroes the 80% smallest relative changes; the paper's Fig. 6 draws k = 25
"for illustration"). An element of a zero weight that changes has δ = ∞ (always kept); one that
does not change has δ = 0.

MEMIT and AlphaEdit spread the update over layers, each computed on top of the full updates of the
layers before it; like the authors' code, RECT sparsifies each layer's update afterwards, so the later
layers do not compensate for what is dropped. The step's delta keeps the method's factors and the
boolean mask of kept elements (ΔW = mask ⊙ left @ rightᵀ), a quarter of a dense float32 update.
"""

from __future__ import annotations

import torch

from workers.editing.delta import LayerDelta, WeightDelta, WeightSnapshot
from workers.editing.hparams import RectHParams
from workers.models import edited_weight


def relative_change_mask(update: torch.Tensor, weight: torch.Tensor, keep_fraction: float) -> torch.Tensor:
    """Boolean mask of the round(keep_fraction · n) elements with the largest |update| / |weight|."""
    if not 0 < keep_fraction <= 1:
        raise ValueError(f"rect.keep_fraction must be in (0, 1], got {keep_fraction}")
    change = update.abs().float()
    reference = weight.abs().to(device=change.device, dtype=change.dtype)
    infinite = torch.full_like(change, float("inf"))
    relative = torch.where(reference > 0, change / reference,
                           torch.where(change > 0, infinite, torch.zeros_like(change)))
    keep = round(keep_fraction * relative.numel())
    mask = torch.zeros(relative.numel(), dtype=torch.bool, device=relative.device)
    mask[torch.topk(relative.flatten(), keep, sorted=False).indices] = True
    return mask.view(relative.shape)


def merged(parts: list[LayerDelta]) -> LayerDelta:
    """One delta of a matrix from a step's several deltas of it (ROME edits a batch one request at a
    time): factors side by side, or the dense sum when one of them is dense."""
    module = parts[0].module
    keys = [p.keys for p in parts if p.keys is not None]
    joined_keys = torch.cat(keys, dim=1) if keys else None
    if any(p.right is None for p in parts):
        return LayerDelta(module, sum(p.dense() for p in parts), None, joined_keys, layer=parts[0].layer)
    return LayerDelta(module, torch.cat([p.left for p in parts], dim=1), torch.cat([p.right for p in parts], dim=1),
                      joined_keys, layer=parts[0].layer)


class RectSparsifier:
    """The RECT step: rewrite each touched matrix as its pre-step weight plus the sparsified update."""

    def __init__(self, settings: RectHParams, base: WeightSnapshot):
        self.keep_fraction = settings.keep_fraction

    @torch.no_grad()
    def __call__(self, model, delta: WeightDelta, before: WeightSnapshot) -> WeightDelta:
        layers = []
        for module in delta.modules():
            full = merged([layer for layer in delta.layers if layer.module == module])
            weight = edited_weight(model, module)
            previous = before.original(module)
            mask = relative_change_mask(full.dense().to(weight.device), previous, self.keep_fraction)
            sparse = LayerDelta(module, full.left, full.right, full.keys, mask, full.layer)
            weight.copy_(previous)  # undo the full update, then write the kept part the one way replay does
            sparse.apply(model)
            layers.append(sparse)
        return WeightDelta(layers, list(delta.case_ids), delta.method)
