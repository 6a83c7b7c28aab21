"""What an editing method needs besides the request: cached statistics, templates and the optimiser.

One ``EditContext`` per Editor (per model replica), built on the *unedited* model. It owns explicit
caches — no module globals: second moments C_l (computed once on the unedited model), their Cholesky
factors, context templates (generated once from the unedited model, keyed on its fingerprint taken
here at construction), AlphaEdit's null-space projectors, and the running key cache — the one piece
of state an edit step changes, so ``edit_state``/``restore_edit_state`` let a failed step undo it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from workers.editing.errors import EditFailure
from workers.editing.targets import OptimisationResult, TargetProblem, optimise_delta
from workers.editing.target_hooks import TargetHooks
from workers.editing.templates import ContextTemplates
from workers.models import weights_fingerprint


@dataclass
class StepInfo:
    """What a method reports about one edit step, beyond the delta itself."""

    loss: float = float("nan")
    delta_norm: float = float("nan")
    steps: int = 0  # optimisation steps (loss evaluations), summed over the step's requests
    seconds: dict[str, float] = field(default_factory=dict)
    anchors: int | None = None
    delta_norm_before: float | None = None
    targets: list[torch.Tensor] = field(default_factory=list)  # v* (ROME) or z (MEMIT) per request

    def absorb(self, results: list[OptimisationResult], extra: list[dict]) -> None:
        """Average the per-request optimisation outcomes (batch edits optimise one δ per request)."""
        self.loss = sum(r.loss for r in results) / len(results)
        self.steps = sum(r.steps for r in results)
        self.delta_norm = sum(float(r.delta.norm()) for r in results) / len(results)
        anchors = [e["anchors"] for e in extra if e.get("anchors") is not None]
        before = [e["delta_norm_before"] for e in extra if e.get("delta_norm_before") is not None]
        if anchors:
            self.anchors = round(sum(anchors) / len(anchors))
        if before:
            self.delta_norm_before = sum(before) / len(before)


class EditContext:
    def __init__(self, model, tokenizer, *, cache_dir: str | Path | None = None, data_root=None,
                 second_moments: dict[int, torch.Tensor] | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.data_root = data_root
        self._second_moments: dict[int, torch.Tensor] = dict(second_moments or {})
        self._cholesky: dict[int, torch.Tensor] = {}
        self._projectors: dict[tuple[int, float], torch.Tensor] = {}
        self.key_cache: dict[int, torch.Tensor] = {}  # AlphaEdit: Σ K Kᵀ of earlier edits, per layer
        # AlphaEdit: P Σ K Kᵀ per (layer, null-space threshold), kept in step with key_cache so an edit
        # adds (P K) Kᵀ (d² b) instead of multiplying P by the whole running sum again (d³ per layer).
        self.projected_key_cache: dict[tuple[int, float], torch.Tensor] = {}
        # A constraint's stopping rule and target rewrite (target_hooks.py); none by default.
        self.target_hooks = TargetHooks()
        self._templates = ContextTemplates(self.cache_dir / "context_templates" if self.cache_dir else None)
        # Hashed once, before any edit: the templates' disk key names the base model, never the
        # weights of the moment (hashing at every edit cost a full state-dict pass per edit).
        self.base_fingerprint = weights_fingerprint(model)

    # ---- statistics ---------------------------------------------------------------------------

    def prepare_second_moments(self, layers, hparams) -> None:
        """Compute (or load from the disk cache) C for every layer still missing, in one pass."""
        missing = [layer for layer in layers if layer not in self._second_moments]
        if not missing:
            return
        from workers.stats import SecondMomentCache, StatsConfig, second_moments

        config = StatsConfig(corpus=hparams.stats_corpus, token_budget=hparams.stats_token_budget,
                             max_length=hparams.stats_max_length)
        cache = SecondMomentCache(self.cache_dir / "stats" if self.cache_dir else None)
        self._second_moments.update(second_moments(self.model, self.tokenizer, missing, config=config,
                                                   cache=cache, data_root=self.data_root))

    def second_moment(self, layer: int) -> torch.Tensor:
        if layer not in self._second_moments:
            raise KeyError(f"second moment of layer {layer} was not prepared")
        return self._second_moments[layer]

    def solve_second_moment(self, layer: int, rhs: torch.Tensor) -> torch.Tensor:
        """C⁻¹ rhs in float64 through a cached Cholesky factor (C is symmetric positive definite)."""
        if layer not in self._cholesky:
            moment = self.second_moment(layer).double()
            if not bool(torch.isfinite(moment).all()):
                raise EditFailure(f"the second moment of layer {layer} holds non-finite values")
            factor, info = torch.linalg.cholesky_ex(moment)
            if int(info) != 0:
                raise EditFailure(f"the second moment of layer {layer} is singular (not positive definite)")
            self._cholesky[layer] = factor
        factor = self._cholesky[layer]
        column = rhs.double().to(factor.device)
        squeeze = column.dim() == 1
        solved = torch.cholesky_solve(column.unsqueeze(1) if squeeze else column, factor)
        return solved.squeeze(1) if squeeze else solved

    def null_space_projector(self, layer: int, threshold: float) -> torch.Tensor:
        """AlphaEdit's P: projector onto the eigenvectors of C with eigenvalue < threshold (float64)."""
        key = (layer, threshold)
        if key not in self._projectors:
            eigenvalues, eigenvectors = torch.linalg.eigh(self.second_moment(layer).double())
            basis = eigenvectors[:, eigenvalues < threshold]
            self._projectors[key] = basis @ basis.T
        return self._projectors[key]

    # ---- templates and the target optimiser ----------------------------------------------------

    def context_templates(self, hparams) -> list[str]:
        """The trajectory's templates (see templates.py). The first call for a given (lengths, seed)
        may generate them, so make it before the first edit — the Editor does, at construction."""
        return self._templates.get(self.model, self.tokenizer, hparams.context_template_lengths, hparams.context_seed,
                                   base_fingerprint=self.base_fingerprint)

    # ---- the state an edit step changes -------------------------------------------------------

    def edit_state(self) -> tuple[dict, dict]:
        """A copy of AlphaEdit's running key caches (their tensors are replaced, never changed in place)."""
        return dict(self.key_cache), dict(self.projected_key_cache)

    def restore_edit_state(self, state: tuple[dict, dict]) -> None:
        keys, projected = state
        self.key_cache.clear()
        self.key_cache.update(keys)
        self.projected_key_cache.clear()
        self.projected_key_cache.update(projected)

    def clear_edit_state(self) -> None:
        """Back to no earlier edits (the base weights)."""
        self.restore_edit_state(({}, {}))

    def optimise(self, problem: TargetProblem, hparams) -> tuple[OptimisationResult, dict]:
        """The plain target optimisation, or EAC's two phases around it when the method asks for it."""
        if hparams.eac is None:
            return optimise_delta(problem, stop=self.target_hooks.new_stop()), {}
        from workers.editing.eac import optimise_with_anchors

        return optimise_with_anchors(problem, hparams.eac)
