"""What an editing method needs besides the request: cached statistics, templates and the optimiser.

One ``EditContext`` per Editor (per model replica), built on the *unedited* model. It owns explicit
caches — no module globals: second moments C_l (computed once on the unedited model), their Cholesky
factors and context templates (generated once from the unedited model, keyed on its fingerprint taken
here at construction); the target optimiser the Editor chose (the plain one, or a constraint's:
``methods.Constraint.optimise``) and MEMIT's layer solve where a constraint supplies one
(``methods.Constraint.solve``); and the running state a method keeps across edit steps (AlphaEdit's
key caches, an object of alphaedit.py) — the one thing an edit step changes here, so
``edit_state``/``restore_edit_state`` let a failed step undo it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol, TypeVar

import torch

from workers.editing.errors import EditFailure
from workers.editing.targets import TargetOptimiser
from workers.editing.templates import ContextTemplates
from workers.models import weights_fingerprint
from workers.packed_linear import LinearCompute, PackCache

if TYPE_CHECKING:
    from workers.editing.memit import LayerSolve


class RunningState(Protocol):
    """State a method keeps across edit steps, made by ``EditContext.running_state``."""

    def snapshot(self):
        """A copy to put back with ``restore`` (cheap: tensors are replaced, never changed in place)."""

    def restore(self, snapshot) -> None: ...

    def clear(self) -> None:
        """Back to no earlier edits."""


State = TypeVar("State", bound=RunningState)


class EditContext:
    def __init__(self, model, tokenizer, *, cache_dir: str | Path | None = None, data_root=None,
                 second_moments: dict[int, torch.Tensor] | None = None, optimiser: TargetOptimiser | None = None, compute: LinearCompute = LinearCompute()):
        self.model, self.tokenizer = model, tokenizer
        # How the target optimisation's passes compute their linear layers (packed_linear.py); what they
        # pack is kept across edit steps while the packed weights stay unchanged.
        self.compute = PackCache(compute)
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.data_root = data_root
        self.optimiser = optimiser if optimiser is not None else TargetOptimiser()
        # MEMIT's per-layer least-squares solve, where a constraint supplies another
        # (``methods.Constraint.solve``, a ``memit.LayerSolve``); None: MEMIT's own.
        self.layer_solve: LayerSolve | None = None
        self._second_moments: dict[int, torch.Tensor] = dict(second_moments or {})
        self._cholesky: dict[int, torch.Tensor] = {}
        self._running: dict[Callable, RunningState] = {}
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

    # ---- templates ---------------------------------------------------------------------------------

    def context_templates(self, hparams) -> list[str]:
        """The trajectory's templates (see templates.py). The first call for a given (lengths, seed)
        may generate them, so make it before the first edit — the Editor does, at construction."""
        return self._templates.get(self.model, self.tokenizer, hparams.context_template_lengths, hparams.context_seed,
                                   base_fingerprint=self.base_fingerprint)

    # ---- the state an edit step changes -------------------------------------------------------

    def running_state(self, kind: Callable[["EditContext"], State]) -> State:
        """The running state ``kind`` (a class taking this context) of the method that keeps one: made
        on first use, the same object afterwards."""
        if kind not in self._running:
            self._running[kind] = kind(self)
        return self._running[kind]  # type: ignore[return-value]

    def edit_state(self) -> dict:
        """A copy of every running state, for ``restore_edit_state``."""
        return {kind: state.snapshot() for kind, state in self._running.items()}

    def restore_edit_state(self, saved: dict) -> None:
        for kind, state in self._running.items():
            if kind in saved:
                state.restore(saved[kind])
            else:  # made during the step being undone: there were no earlier edits
                state.clear()

    def clear_edit_state(self) -> None:
        """Back to no earlier edits (the base weights)."""
        for state in self._running.values():
            state.clear()
