"""Editing Anchor Compression (EAC; paper §5, Appendices A, C.5, E), wrapped around the shared
target optimiser (targets.optimise_delta) — ROME, MEMIT and AlphaEdit then apply their unchanged
update to the compressed target.

Phase 1 (probe): the usual optimisation of δ for ``probe_steps`` steps, recording ∇L each step.
Saliency (Eq. 1):   score = v* ⊙ ∇L(z)            (``score_vector: v_star``, the paper; v* = v_init + δ)
                    score = δ ⊙ mean ∇L            (``score_vector: delta`` + ``gradient: mean``, the authors' code)
Anchors (Eq. 2):    m_S = 1(|score| ≥ γ), γ = P_x(|score|)   (``anchor_rule: percentile``)
                    or the top (100 − x)% of |score|          (``anchor_rule: top_fraction``, the authors' top-k)
                    Dimensions whose score is exactly 0 are never anchors (γ > 0 in the paper), so an
                    all-zero gradient (e.g. an immediate early stop) yields no anchors and δ = 0.
Phase 2 (retrain, Eq. 3): a fresh Adam optimises only the anchor dimensions (δ = m_S ⊙ θ, the others
                    exactly 0), warm-started from m_S ⊙ δ_probe (``retrain_init: probe``) or from 0, under
    L_r(δ) = L(δ) + λ Σ_i α_i |δ_i| + μ ‖δ‖²₂,  α = 1 / (|score| + ε)       (Eqs. 4–6)
The μ term is already in L(δ): it is the target loss's weight decay (targets.py), whose value in the
authors' ROME/MEMIT settings is exactly the paper's μ (C.5), and the authors' code has no other
squared-norm term. So by default the retrain adds only the weighted L1 term; ``l2_weight`` (default
0) adds a second, explicit μ‖δ‖² for those who read Eq. 4 the other way (hparams.EACHParams).

Step counts: each phase runs the shared loop, whose last evaluation makes no update, so it makes one
Adam update fewer than the authors' loops; ``authors_loops: true`` makes that update too. The
paper-model settings use the shared loop; ``hparams.authors_eac_overrides`` gives the authors' code
(their loops, their score and top-k, and MEMIT's retrain from zero).

Interpretation, stated because the paper leaves it open: Eq. 4 writes the elastic net on "z, the
vector that makes the network predict the target"; like the authors' code we apply it to the part
being optimised, δ = z − v_init (penalising the constant v_init would only pull the fact's existing
representation towards zero). The authors' released ROME code computes the L1 term but never adds it
to the loss and has no μ term; ``elastic_net: false`` reproduces that.

EAC wraps the base methods through the registry's optimiser hook (``methods.Constraint.optimise``):
``AnchoredOptimiser`` replaces the plain target optimiser of ROME, MEMIT and AlphaEdit (per request,
so MEMIT's batch is optimised one request at a time), and gives FT, which has no target vector, the
elastic net on its weight update with every α_i = 1 (Appendix E).

Ablations (paper §6.3, §6.5) are configuration: ``saliency_mask: false`` (elastic net only),
``elastic_net: false`` (saliency only), ``score: random | gradient | magnitude`` (anchor selection).
"""

from __future__ import annotations

import typing

import torch

from workers.editing.hparams import EACHParams, Score
from workers.editing.targets import OptimisationResult, TargetOptimiser, TargetProblem, optimise_delta

SCORES = typing.get_args(Score)


def saliency_scores(vector: torch.Tensor, gradient: torch.Tensor, eac: EACHParams) -> torch.Tensor:
    """Eq. 1 (or the ablation's score), one value per dimension."""
    if eac.score == "saliency":
        return vector * gradient
    if eac.score == "gradient":
        return gradient.clone()
    if eac.score == "magnitude":
        return vector.clone()
    if eac.score == "random":
        generator = torch.Generator().manual_seed(eac.seed)
        return torch.rand(vector.shape, generator=generator).to(vector.device)
    raise ValueError(f"unknown EAC score {eac.score!r}; known: {SCORES}")


def anchor_mask(magnitude: torch.Tensor, percentile: float, rule: str = "percentile") -> torch.Tensor:
    """0/1 mask of anchor dimensions from |score| (Eq. 2)."""
    if not 0 <= percentile < 100:
        raise ValueError(f"gamma_percentile must be in [0, 100), got {percentile}")
    informative = magnitude > 0
    if rule == "percentile":
        gamma = torch.quantile(magnitude.double(), percentile / 100.0)
        return ((magnitude.double() >= gamma) & informative).to(magnitude.dtype)
    if rule == "top_fraction":
        keep = int(round((1 - percentile / 100.0) * magnitude.numel()))
        order = torch.argsort(magnitude, descending=True, stable=True)[:keep]
        mask = torch.zeros_like(magnitude)
        mask[order] = 1
        return mask * informative.to(magnitude.dtype)
    raise ValueError(f"unknown anchor_rule {rule!r}; known: percentile, top_fraction")


def elastic_net(alpha: torch.Tensor | float, l1_weight: float, l2_weight: float):
    """λ Σ α_i |δ_i| + μ ‖δ‖²₂ (Eqs. 4–5) as a penalty function of δ."""
    def penalty(delta: torch.Tensor) -> torch.Tensor:
        return l1_weight * (alpha * delta.abs()).sum() + l2_weight * delta.pow(2).sum()
    return penalty


def plan_anchors(vector: torch.Tensor, gradient: torch.Tensor, eac: EACHParams) -> tuple[torch.Tensor, torch.Tensor]:
    """The anchor mask and the elastic-net weights α for one δ."""
    score = saliency_scores(vector, gradient, eac)
    magnitude = score.abs()
    mask = anchor_mask(magnitude, eac.gamma_percentile, eac.anchor_rule) if eac.saliency_mask \
        else torch.ones_like(magnitude)
    alpha = 1.0 / (magnitude + eac.epsilon)
    return mask, alpha


def optimise_with_anchors(problem: TargetProblem, eac: EACHParams) -> tuple[OptimisationResult, dict]:
    """Both EAC phases for one request; returns the final optimisation and what the record reports.
    (``EACHParams`` refuses, when built, a choice its fields do not declare.)"""
    probe = optimise_delta(problem, num_steps=eac.probe_steps, record_gradients=True, update_last=eac.authors_loops)
    gradient = probe.gradients[-1] if eac.gradient == "last" else torch.stack(probe.gradients).mean(dim=0)
    vector = problem.v_init + probe.delta if eac.score_vector == "v_star" else probe.delta
    mask, alpha = plan_anchors(vector, gradient, eac)
    penalty = elastic_net(alpha, eac.l1_weight, eac.l2_weight) if eac.elastic_net else None
    init = probe.delta * mask if eac.retrain_init == "probe" else None
    final = optimise_delta(problem, num_steps=eac.retrain_steps, init=init, mask=mask, penalty=penalty,
                           update_last=eac.authors_loops)
    final.steps += probe.steps
    return final, {"anchors": int(mask.sum()), "delta_norm_before": float(probe.delta.norm())}


class AnchoredOptimiser(TargetOptimiser):
    """The target optimiser of a ``<base>-eac`` method (the registry builds it from the ``eac`` section)."""

    batches = False  # both phases run per request

    def __init__(self, eac: EACHParams):
        self.eac = eac

    def optimise(self, problem: TargetProblem) -> tuple[OptimisationResult, dict]:
        return optimise_with_anchors(problem, self.eac)

    def weight_penalty(self):
        """FT-EAC: λ‖D‖₁ + μ‖D‖²_F on the weight update D (Eq. 4, every α_i = 1: no target to score)."""
        return elastic_net(1.0, self.eac.l1_weight, self.eac.l2_weight) if self.eac.elastic_net else None
