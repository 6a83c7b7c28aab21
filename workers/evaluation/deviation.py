"""How far editing moves the edited matrices and the model's representations (the paper's §4).

- ``matrix_deviation``: for one edited matrix, the L1 norm (entry-wise, the paper's Fig. 2), the
  Frobenius norm, the spectral norm and the condition number σ_max/σ_min (Ma et al., 2025: the
  bottleneck of sequential editing) of the original and the edited matrix, their relative changes,
  and the norms of the update ΔW = W_edited − W_original relative to ‖W_original‖.
- ``pca_view``: the paper's Fig. 3 — the last-token hidden states (what the LM head reads) of task
  prompts under the original and the edited model, projected on the first two principal components of
  both sets together; ``separability`` is the cross-validated accuracy of a logistic regression
  telling the two sets apart in that plane (≈ 0.5: indistinguishable; → 1: the edit moved them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from workers.editing.delta import WeightSnapshot
from workers.evaluation.config import MetricRow
from workers.evaluation.scoring import map_last_positions
from workers.models import edited_weight


@dataclass(frozen=True)
class MatrixDeviation:
    module: str
    l1_original: float
    l1_edited: float
    frobenius_original: float
    frobenius_edited: float
    spectral_original: float
    spectral_edited: float
    condition_original: float
    condition_edited: float
    update_l1: float
    update_frobenius: float
    update_spectral: float

    def rows(self) -> list[MetricRow]:
        task = f"deviation/{self.module}"
        values = {
            "l1_edited": self.l1_edited,
            "l1_relative_change": self.l1_edited / self.l1_original - 1,
            "frobenius_relative_change": self.frobenius_edited / self.frobenius_original - 1,
            "spectral_relative_change": self.spectral_edited / self.spectral_original - 1,
            "condition_number_original": self.condition_original,
            "condition_number_edited": self.condition_edited,
            "condition_number_ratio": self.condition_edited / self.condition_original,
            "update_l1_relative": self.update_l1 / self.l1_original,
            "update_frobenius_relative": self.update_frobenius / self.frobenius_original,
            "update_spectral_relative": self.update_spectral / self.spectral_original,
        }
        return [MetricRow(task, name, float(value), 1) for name, value in values.items()]


def _condition_number(singular_values: torch.Tensor) -> float:
    smallest = singular_values[-1].item()
    return singular_values[0].item() / smallest if smallest > 0 else float("inf")


@torch.no_grad()
def matrix_deviation(module: str, original: torch.Tensor, edited: torch.Tensor) -> MatrixDeviation:
    """Norms of ``original`` and ``edited`` (same shape), computed in float64."""
    if original.shape != edited.shape:
        raise ValueError(f"{module}: original {tuple(original.shape)} and edited {tuple(edited.shape)} differ in shape")
    w0, w1 = original.detach().double().cpu(), edited.detach().double().cpu()
    update = w1 - w0
    s0, s1 = torch.linalg.svdvals(w0), torch.linalg.svdvals(w1)
    return MatrixDeviation(
        module=module,
        l1_original=w0.abs().sum().item(), l1_edited=w1.abs().sum().item(),
        frobenius_original=torch.linalg.matrix_norm(w0).item(), frobenius_edited=torch.linalg.matrix_norm(w1).item(),
        spectral_original=s0[0].item(), spectral_edited=s1[0].item(),
        condition_original=_condition_number(s0), condition_edited=_condition_number(s1),
        update_l1=update.abs().sum().item(), update_frobenius=torch.linalg.matrix_norm(update).item(),
        update_spectral=torch.linalg.matrix_norm(update, ord=2).item())


def snapshot_deviations(model, snapshot: WeightSnapshot) -> list[MatrixDeviation]:
    """Every matrix in ``snapshot`` (the original weights) against what ``model`` holds now."""
    return [matrix_deviation(name, snapshot.original(name), edited_weight(model, name)) for name in snapshot.modules]


@dataclass(frozen=True)
class PCAView:
    """Points of the original and the edited model's hidden states in the first two principal
    components, for plotting, and how separable the two sets are there."""

    original_points: np.ndarray  # (n, 2)
    edited_points: np.ndarray  # (n, 2)
    explained_variance_ratio: tuple[float, float]
    separability: float  # cross-validated logistic-regression accuracy
    folds: int

    def rows(self, task: str = "deviation/pca") -> list[MetricRow]:
        n = len(self.original_points)
        return [MetricRow(task, "separability", self.separability, 2 * n),
                MetricRow(task, "mean_shift", float(np.linalg.norm(self.edited_points.mean(0)
                                                                   - self.original_points.mean(0))), n)]


def pca_view(original_states: torch.Tensor, edited_states: torch.Tensor, *, folds: int = 5,
             seed: int = 0) -> PCAView:
    """PCA (2 components) fitted on both sets of states together; logistic regression separability."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    if original_states.shape != edited_states.shape or original_states.ndim != 2:
        raise ValueError(f"expected two (n, hidden) arrays of one shape, got {tuple(original_states.shape)} "
                         f"and {tuple(edited_states.shape)}")
    n = len(original_states)
    if n < folds:
        raise ValueError(f"{n} prompts cannot be split into {folds} folds")
    states = torch.cat([original_states, edited_states]).double().numpy()
    pca = PCA(n_components=2, random_state=seed)
    points = pca.fit_transform(states)
    labels = np.repeat([0, 1], n)
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    accuracy = cross_val_score(LogisticRegression(), points, labels, cv=splitter, scoring="accuracy").mean()
    ratio = pca.explained_variance_ratio_
    return PCAView(points[:n], points[n:], (float(ratio[0]), float(ratio[1])), float(accuracy), folds)


def last_token_states(model, tokenizer, prompts: Sequence[str], **kwargs) -> torch.Tensor:
    """(n_prompts, hidden) float32 final hidden states (what the LM head reads) at each prompt's last token."""
    return map_last_positions(model, tokenizer, prompts, lambda h: h.float(), **kwargs)
