"""PRUNE (Ma et al., "Perturbation-Restrained Sequential Model Editing", ICLR 2025) around ROME, MEMIT
and AlphaEdit: the accumulated update of each edited matrix,

    ΔW = W − W₀ = U diag(σ) Vᵀ,

has its singular values above the largest singular value of the unedited matrix, σ_max(W₀), mapped by
the paper's restraint function F of the singular values of the summed perturbation matrix (transcribed
as the paper writes it and as the authors' code computes it, ``func_log`` / ``func_logn``):

    F(σ) = log_α(σ) − log_α(σ_max(W₀)) + σ_max(W₀)     for σ > σ_max(W₀),    F(σ) = σ otherwise,

and W becomes W₀ + U diag(F(σ)) Vᵀ. Published default: α = e (the authors' README's ``reduce_type=log``;
their code also offers α = 1.5 and 1.2). Since only the singular values above the bound change, the
restraint is the correction U_k diag(F(σ_k) − σ_k) V_kᵀ over those k directions.

When F is applied is the setting ``prune.apply`` (``PruneHParams``):

- ``evaluation`` — **the paper's PRUNE** (and its code's: the editor writes every edit unrestrained and
  ``PRUNE.reduce_weights`` / ``read_weights`` map the sum once, before the edited model is evaluated).
  Editing runs exactly as the base method (the edit log holds what the base wrote and replays it), and
  every checkpoint is scored with W₀ + F(ΔW) of the update accumulated so far
  (``restrain_at_checkpoint``, the registry's ``checkpoint`` hook, applied where the evaluators rebuild
  the weights from the log: ``methods.scored_weights``). The trajectory goes on from the unrestrained
  weights, so a later checkpoint restrains the whole sum again, as the paper's does after n edits.
- ``step`` (default) — **this toolkit's sequential variant**, the one the study's ROME-PRUNE and
  MEMIT-PRUNE ran: after every edit step the accumulated update is restrained in the weights
  (``restrain_each_step``, the ``rewrite`` hook), so each later edit is computed on the model that will
  be used and sums onto a restrained one. The correction is stored factorised as a second delta of the
  same matrix in the step, so a replayed log writes exactly what the edit wrote.

Beyond that choice, where the authors' code differs: it rebuilds ΔW from its first ``matrix_rank(ΔW)``
singular directions only (dropping the float round-off below numpy's rank tolerance) and compresses
σ ≥ σ_max rather than σ > σ_max; here the directions at or under the bound are kept as they are.

F is a compression (F(σ) ≤ σ for every σ > σ_max) exactly when σ_max · ln α ≥ 1 (ln x ≤ x − 1);
otherwise log_α grows faster than σ just above the bound and F would enlarge the update. Real models'
MLP output projections have σ_max ≫ 1 (SmolLM2-135M: 21–28); the tiny random test models (0.16–0.40)
need a larger α, and any α that would enlarge is refused when the editor is built (either setting).
"""

from __future__ import annotations

import math

import torch

from workers.editing.delta import LayerDelta, WeightDelta, WeightSnapshot
from workers.editing.hparams import PruneHParams
from workers.models import edited_weight


def log_restraint(sigma: torch.Tensor, sigma_max: float, alpha: float) -> torch.Tensor:
    """F(σ) element-wise: log_α(σ / σ_max) + σ_max above σ_max, σ itself at or below it."""
    compressed = torch.log(sigma / sigma_max) / math.log(alpha) + sigma_max
    return torch.where(sigma > sigma_max, compressed, sigma)


def restraining_correction(accumulated: torch.Tensor, sigma_max: float, alpha: float):
    """(left, right) float64 factors of U_k diag(F(σ_k) − σ_k) V_kᵀ over the singular values of
    ``accumulated`` above ``sigma_max``, or None when there are none. SVD in float64."""
    u, sigma, vh = torch.linalg.svd(accumulated.double(), full_matrices=False)
    above = sigma > sigma_max
    if not bool(above.any()):
        return None
    shrink = log_restraint(sigma[above], sigma_max, alpha) - sigma[above]
    return u[:, above] * shrink, vh[above].T


def spectral_bounds(settings: PruneHParams, base: WeightSnapshot) -> dict[str, float]:
    """σ_max(W₀) of every matrix in ``base``; refuses an α under which F would enlarge its updates."""
    alpha = settings.alpha
    bounds = {}
    for module in base.modules:
        sigma_max = float(torch.linalg.matrix_norm(base.original(module).double(), ord=2))
        if sigma_max * math.log(alpha) < 1:
            raise ValueError(
                f"prune.alpha = {alpha:.4g} would enlarge singular values of {module} "
                f"(σ_max(W₀) = {sigma_max:.3g}, so F is a compression only for alpha ≥ "
                f"exp(1/σ_max) = {math.exp(1 / sigma_max):.4g})")
        bounds[module] = sigma_max
    return bounds


def accumulated_update(model, base: WeightSnapshot, module: str) -> torch.Tensor:
    """W − W₀ of ``module`` in float64, on the weight's device."""
    weight = edited_weight(model, module)
    return weight.double() - base.original(module).to(weight.device).double()


class PruneRestraint:
    """The per-step variant (``prune.apply: step``) for one editor: remembers W₀'s σ_max per matrix
    (the base weights never change)."""

    def __init__(self, settings: PruneHParams, base: WeightSnapshot):
        self.alpha = settings.alpha
        self.base = base
        self.sigma_max = spectral_bounds(settings, base)

    @torch.no_grad()
    def __call__(self, model, delta: WeightDelta, before: WeightSnapshot) -> WeightDelta:
        """Restrain the accumulated update of every matrix ``delta`` touched (already applied) and
        return the step's delta with the corrections appended (``before`` is not needed by PRUNE)."""
        layers = list(delta.layers)
        numbers = {layer.module: layer.layer for layer in delta.layers}
        for module in delta.modules():
            factors = restraining_correction(accumulated_update(model, self.base, module), self.sigma_max[module],
                                             self.alpha)
            if factors is None:
                continue
            correction = LayerDelta(module, *(factor.float() for factor in factors), layer=numbers[module])
            correction.apply(model)
            layers.append(correction)
        return WeightDelta(layers, list(delta.case_ids), delta.method)


def restrain_each_step(settings: PruneHParams, base: WeightSnapshot) -> PruneRestraint | None:
    """The ``rewrite`` hook: the per-step restraint, or None when PRUNE waits for the evaluation (α is
    checked against every edited matrix either way, before the first edit)."""
    restraint = PruneRestraint(settings, base)
    return restraint if settings.apply == "step" else None


class AccumulatedRestraint:
    """The paper's PRUNE at a checkpoint (``prune.apply: evaluation``): W ← W₀ + F(W − W₀) in every
    matrix the edit log touched, the model holding base + log."""

    def __init__(self, settings: PruneHParams):
        self.settings = settings

    @torch.no_grad()
    def __call__(self, model, base: WeightSnapshot) -> None:
        """``base``: W₀ of every matrix the log touched (what the model held before the log was replayed)."""
        for module, sigma_max in spectral_bounds(self.settings, base).items():
            factors = restraining_correction(accumulated_update(model, base, module), sigma_max, self.settings.alpha)
            if factors is None:
                continue
            weight = edited_weight(model, module)
            left, right = factors
            # W₀ + ΔW + U_k diag(F(σ_k) − σ_k) V_kᵀ = W₀ + U diag(F(σ)) Vᵀ, summed in float64 and rounded
            # once to the weight's dtype.
            weight.copy_((weight.double() + left @ right.T).to(weight.dtype))


def restrain_at_checkpoint(settings: PruneHParams) -> AccumulatedRestraint | None:
    """The ``checkpoint`` hook: the paper's restraint of the accumulated update, or None when every
    step was restrained already (the log's replay is what is scored)."""
    return AccumulatedRestraint(settings) if settings.apply == "evaluation" else None
