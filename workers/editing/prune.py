"""PRUNE (Ma et al., "Perturbation-Restrained Sequential Model Editing", ICLR 2025) around ROME, MEMIT
and AlphaEdit: after every edit step, the accumulated update of each edited matrix,

    ΔW = W − W₀ = U diag(σ) Vᵀ,

has its singular values above the largest singular value of the unedited matrix, σ_max(W₀), mapped by
the paper's restraint function F of the singular values of the summed perturbation matrix (transcribed
as the paper writes it and as the authors' code computes it, ``func_log`` / ``func_logn``):

    F(σ) = log_α(σ) − log_α(σ_max(W₀)) + σ_max(W₀)     for σ > σ_max(W₀),    F(σ) = σ otherwise,

and W becomes W₀ + U diag(F(σ)) Vᵀ. Published default: α = e (the authors' README's ``reduce_type=log``;
their code also offers α = 1.5 and 1.2). Since only the singular values above the bound change, the
step's correction is U_k diag(F(σ_k) − σ_k) V_kᵀ over those k directions — a rank-k update stored
factorised as a second delta of the same matrix in the step, so a replayed log writes exactly what the
edit wrote.

Where this departs from the authors' code: their code edits the whole sequence unrestrained and maps
the final sum once, before evaluation; here (the product's sequential use) every step is restrained
on top of the restrained weights, so each later edit is computed on the model that will be used.

F is a compression (F(σ) ≤ σ for every σ > σ_max) exactly when σ_max · ln α ≥ 1 (ln x ≤ x − 1);
otherwise log_α grows faster than σ just above the bound and F would enlarge the update. Real models'
MLP output projections have σ_max ≫ 1 (SmolLM2-135M: 21–28); the tiny random test models (0.16–0.40)
need a larger α, and any α that would enlarge is refused when the editor is built.
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
    """(left, right) float32 factors of U_k diag(F(σ_k) − σ_k) V_kᵀ over the singular values of
    ``accumulated`` above ``sigma_max``, or None when there are none. SVD in float64."""
    u, sigma, vh = torch.linalg.svd(accumulated.double(), full_matrices=False)
    above = sigma > sigma_max
    if not bool(above.any()):
        return None
    shrink = log_restraint(sigma[above], sigma_max, alpha) - sigma[above]
    return (u[:, above] * shrink).float(), vh[above].T.float()


class PruneRestraint:
    """The PRUNE step for one editor: remembers W₀'s σ_max per matrix (the base weights never change)."""

    def __init__(self, settings: PruneHParams, base: WeightSnapshot):
        self.alpha = settings.alpha
        self.base = base
        self.sigma_max: dict[str, float] = {}
        for module in base.modules:
            sigma_max = float(torch.linalg.matrix_norm(base.original(module).double(), ord=2))
            if sigma_max * math.log(self.alpha) < 1:
                raise ValueError(
                    f"prune.alpha = {self.alpha:.4g} would enlarge singular values of {module} "
                    f"(σ_max(W₀) = {sigma_max:.3g}, so F is a compression only for alpha ≥ "
                    f"exp(1/σ_max) = {math.exp(1 / sigma_max):.4g})")
            self.sigma_max[module] = sigma_max

    @torch.no_grad()
    def __call__(self, model, delta: WeightDelta, before: WeightSnapshot) -> WeightDelta:
        """Restrain the accumulated update of every matrix ``delta`` touched (already applied) and
        return the step's delta with the corrections appended (``before`` is not needed by PRUNE)."""
        layers = list(delta.layers)
        numbers = {layer.module: layer.layer for layer in delta.layers}
        for module in delta.modules():
            weight = edited_weight(model, module)
            accumulated = weight.double() - self.base.original(module).to(weight.device).double()
            factors = restraining_correction(accumulated, self.sigma_max[module], self.alpha)
            if factors is None:
                continue
            correction = LayerDelta(module, *factors, layer=numbers[module])
            correction.apply(model)
            layers.append(correction)
        return WeightDelta(layers, list(delta.case_ids), delta.method)
