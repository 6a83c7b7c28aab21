"""AlphaEdit (Fang et al., 2025): MEMIT's layer spreading with a null-space constrained update.

    P   = U₀ U₀ᵀ, U₀ the eigenvectors of C_l with eigenvalue < null_space_threshold
    ΔW_l = R K_lᵀ P (K_l K_lᵀ P + K_p K_pᵀ P + α I)⁻¹       α = l2, K_p = keys of all earlier edits
Written as the released code solves it: A = (P (K Kᵀ + K_p K_pᵀ) + α I)⁻¹ P K and ΔW = R Aᵀ (the
transpose of the same expression, since P is symmetric). For any preserved key k₀ with P k₀ = 0,
ΔW k₀ = 0. After each batch the running sum K_p K_pᵀ += K Kᵀ, per layer, is kept in ``AlphaEditState``
(this module's running state in the edit context) and rebuilt from a saved log's keys on resume. So
is P K_p K_pᵀ: by distributivity P (K Kᵀ + K_p K_pᵀ) = (P K) Kᵀ + P K_p K_pᵀ, so each edit costs a d×b
product and a d×d solve, not a d×d×d product of P with the whole running sum (the released code's
form; equal up to float64 round-off).
"""

from __future__ import annotations

import torch

from workers.editing.context import EditContext
from workers.editing.hparams import AlphaEditHParams
from workers.editing.memit import solve, spread_over_layers


class AlphaEditState:
    """AlphaEdit's running state in an edit context (``ctx.running_state(AlphaEditState)``): the
    null-space projectors P (from the unedited model's C_l, made once per (layer, threshold)), Σ K Kᵀ
    of the earlier edits per layer, and P Σ K Kᵀ per (layer, threshold), kept in step with it so an
    edit adds (P K) Kᵀ (d² b) instead of multiplying P by the whole running sum again (d³ per layer).
    """

    def __init__(self, ctx: EditContext):
        self.ctx = ctx
        self.projectors: dict[tuple[int, float], torch.Tensor] = {}
        self.key_cache: dict[int, torch.Tensor] = {}
        self.projected_key_cache: dict[tuple[int, float], torch.Tensor] = {}

    def null_space_projector(self, layer: int, threshold: float) -> torch.Tensor:
        """P: projector onto the eigenvectors of C with eigenvalue < threshold (float64)."""
        key = (layer, threshold)
        if key not in self.projectors:
            eigenvalues, eigenvectors = torch.linalg.eigh(self.ctx.second_moment(layer).double())
            basis = eigenvectors[:, eigenvalues < threshold]
            self.projectors[key] = basis @ basis.T
        return self.projectors[key]

    def projected_earlier_keys(self, layer: int, threshold: float) -> torch.Tensor | None:
        """P K_p K_pᵀ of the earlier edits at ``layer``; made once from the running sum where only that
        is known (the first edit after a resume), then kept up to date by ``remember``."""
        earlier = self.key_cache.get(layer)
        if earlier is None:
            return None
        key = (layer, threshold)
        if key not in self.projected_key_cache:
            self.projected_key_cache[key] = self.null_space_projector(layer, threshold).to(earlier.device) @ earlier
        return self.projected_key_cache[key]

    def remember(self, layer: int, keys: torch.Tensor) -> None:
        """Add an edit's K Kᵀ at ``layer`` to the running sums (float64). Cached tensors are replaced,
        not changed in place, so a snapshot keeps the old ones."""
        keys = keys.double()
        gram = keys @ keys.T
        previous = self.key_cache.get(layer)
        self.key_cache[layer] = gram if previous is None else previous + gram.to(previous.device)
        for (cached_layer, threshold), projected in list(self.projected_key_cache.items()):
            if cached_layer == layer:
                here = keys.to(projected.device)
                projector = self.null_space_projector(layer, threshold).to(projected.device)
                self.projected_key_cache[(layer, threshold)] = projected + (projector @ here) @ here.T

    # ---- RunningState: what a failed step puts back (the projectors never change) ----

    def snapshot(self) -> tuple[dict, dict]:
        return dict(self.key_cache), dict(self.projected_key_cache)

    def restore(self, snapshot: tuple[dict, dict]) -> None:
        self.key_cache, self.projected_key_cache = dict(snapshot[0]), dict(snapshot[1])

    def clear(self) -> None:
        self.restore(({}, {}))


def alphaedit_right_factor(hparams: AlphaEditHParams):
    def right(ctx: EditContext, layer: int, keys: torch.Tensor) -> torch.Tensor:
        state = ctx.running_state(AlphaEditState)
        threshold = hparams.null_space_threshold
        projector = state.null_space_projector(layer, threshold).to(keys.device)
        projected_keys = projector @ keys  # P K
        earlier = state.projected_earlier_keys(layer, threshold)  # P K_p K_pᵀ
        system = projected_keys @ keys.T + (earlier.to(keys.device) if earlier is not None else 0.0)
        identity = torch.eye(keys.shape[0], dtype=keys.dtype, device=keys.device)
        return solve(system + hparams.l2 * identity, projected_keys)
    return right


def apply_alphaedit(model, tokenizer, requests, hparams: AlphaEditHParams, ctx: EditContext,
                    method: str = "alphaedit"):
    delta, info = spread_over_layers(model, tokenizer, requests, hparams, ctx, alphaedit_right_factor(hparams),
                                     method, keep_keys=True)
    remember_keys(ctx, delta)
    return delta, info


def remember_keys(ctx: EditContext, delta) -> None:
    """Add this step's K Kᵀ to the running cache of earlier edits' keys (per layer); also the registry's
    ``on_resume``, for each delta of a replayed log."""
    state = ctx.running_state(AlphaEditState)
    for layer_delta in delta.layers:
        if layer_delta.keys is not None:
            state.remember(layer_delta.layer, layer_delta.keys)
