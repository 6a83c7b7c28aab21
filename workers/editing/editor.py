"""One API for sequential and batch-sequential editing.

    editor = Editor(model, tokenizer, "rome", load_hparams("rome", model))
    log = editor.apply(requests, batch_size=1, on_edit=print)   # each step on top of all previous ones

Every step is all-or-nothing: the matrices a method may touch and the edit context's running state
(AlphaEdit's key cache) are snapshotted first, and if the method fails (bad input, a NaN loss, a
singular solve) or produces non-finite weights, both are restored bit for bit, the step is recorded
as skipped with its reason, and the trajectory goes on
(``on_error="raise"`` re-raises instead). ``revert()`` restores the base weights exactly;
``resume(log)`` replays a saved log onto the base model and continues from it.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from workers.data import EditRequest
from workers.editing.alphaedit import alphaedit_layers, apply_alphaedit, remember_keys
from workers.editing.context import EditContext
from workers.editing.delta import EditLog, WeightDelta, WeightSnapshot, edited_weight
from workers.editing.ft import apply_ft, ft_layers
from workers.editing.hparams import FTHParams, split_method
from workers.editing.memit import apply_memit, memit_layers
from workers.editing.prune import PruneRestraint
from workers.editing.rect import RectSparsifier
from workers.editing.rome import apply_rome, rome_layers
from workers.editing.errors import EditFailure
from workers.models import arch_spec

# method -> (edited layers of its hyper-parameters, the function that makes one edit step)
METHOD_IMPLEMENTATIONS = {
    "rome": (rome_layers, apply_rome),
    "memit": (memit_layers, apply_memit),
    "alphaedit": (alphaedit_layers, apply_alphaedit),
    "ft-l": (ft_layers, apply_ft),
    "ft-m": (ft_layers, apply_ft),
}
# constraint -> what rewrites a step's update after the base method wrote it, built per editor from
# (its hyper-parameter section, the base weights) and called as (model, delta, pre-step weights) -> delta.
# (EAC acts inside the target optimisation instead: EditContext.optimise.)
WEIGHT_CONSTRAINTS = {"prune": PruneRestraint, "rect": RectSparsifier}


@dataclass
class EditRecord:
    edit_index: int
    case_ids: list
    method: str
    seconds: dict[str, float] = field(default_factory=dict)
    loss: float = float("nan")
    delta_norm: float = float("nan")
    steps: int = 0
    dw_l1: float = float("nan")
    dw_fro: float = float("nan")
    relative_l1: dict[str, float] = field(default_factory=dict)
    anchors: int | None = None
    delta_norm_before: float | None = None
    skipped: bool = False
    error: str | None = None

    def as_row(self) -> dict:
        """A flat dict for the Parquet ``edits`` table (timings as ``seconds_<phase>``)."""
        row = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("seconds", "relative_l1")}
        row["case_ids"] = [str(c) for c in self.case_ids]
        for phase, seconds in self.seconds.items():
            row[f"seconds_{phase}"] = seconds
        row["relative_l1_max"] = max(self.relative_l1.values()) if self.relative_l1 else float("nan")
        row["relative_l1"] = dict(self.relative_l1)
        return row


class Editor:
    def __init__(self, model, tokenizer, method: str, hparams, *, cache_dir: str | Path | None = None,
                 data_root=None, second_moments: dict[int, torch.Tensor] | None = None, on_error: str = "skip"):
        base, constraint = split_method(method)
        if on_error not in ("skip", "raise"):
            raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
        if constraint in WEIGHT_CONSTRAINTS and getattr(hparams, constraint, None) is None:
            raise ValueError(f"method {method} needs hyper-parameters with a '{constraint}' section "
                             f"(load_hparams({method!r}, model))")
        self.model, self.tokenizer, self.method, self.hparams = model, tokenizer, method, hparams
        self.on_error = on_error
        layers_of, self._step = METHOD_IMPLEMENTATIONS[base]
        self.layers = layers_of(hparams)
        spec = arch_spec(model)
        self.modules = [spec.mlp_out_name(layer) for layer in self.layers]
        self.ctx = EditContext(model, tokenizer, cache_dir=cache_dir, data_root=data_root, second_moments=second_moments)
        if not isinstance(hparams, FTHParams):
            # Statistics of the unedited model, computed (or loaded) once, before any edit.
            needs_c = base != "rome" or hparams.mom2_adjustment
            if needs_c:
                self.ctx.prepare_second_moments(self.layers, hparams)
            self.ctx.context_templates(hparams)
        self.base = WeightSnapshot(model, self.modules)
        self._restrain = (WEIGHT_CONSTRAINTS[constraint](getattr(hparams, constraint), self.base)
                          if constraint in WEIGHT_CONSTRAINTS else None)
        self._base_l1 = {m: float(self.base.original(m).double().abs().sum()) for m in self.modules}
        self.log = EditLog(metadata={"method": method, "hparams": dataclasses.asdict(hparams)})
        self.records: list[EditRecord] = []

    # ---- editing -------------------------------------------------------------------------------

    def apply(self, requests: Sequence[EditRequest], batch_size: int = 1,
              on_edit: Callable[[EditRecord], None] | None = None) -> EditLog:
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        requests = list(requests)
        for start in range(0, len(requests), batch_size):
            record = self.edit_step(requests[start:start + batch_size])
            if on_edit is not None:
                on_edit(record)
        return self.log

    def edit_step(self, requests: list[EditRequest]) -> EditRecord:
        record = EditRecord(edit_index=len(self.records), case_ids=[r.case_id for r in requests], method=self.method)
        snapshot = WeightSnapshot(self.model, self.modules)
        state = self.ctx.edit_state()
        start = time.perf_counter()
        try:
            delta, info = self._step(self.model, self.tokenizer, requests, self.hparams, self.ctx, self.method)
            if self._restrain is not None:
                restrain_start = time.perf_counter()
                delta = self._restrain(self.model, delta, snapshot)
                info.seconds["restrain"] = time.perf_counter() - restrain_start
            if not all(torch.isfinite(edited_weight(self.model, m)).all() for m in delta.modules()):
                raise EditFailure("the update produced non-finite weights")
        except (EditFailure, torch.linalg.LinAlgError) as exc:
            snapshot.restore(self.model)
            self.ctx.restore_edit_state(state)
            if self.on_error == "raise":
                raise
            record.skipped, record.error = True, f"{type(exc).__name__}: {exc}"
            record.seconds["total"] = time.perf_counter() - start
            self.records.append(record)
            return record
        except BaseException:
            snapshot.restore(self.model)  # never leave the model half-edited
            self.ctx.restore_edit_state(state)
            raise
        record.seconds = {**info.seconds, "total": time.perf_counter() - start}
        record.loss, record.delta_norm, record.steps = info.loss, info.delta_norm, info.steps
        record.anchors, record.delta_norm_before = info.anchors, info.delta_norm_before
        self._measure(record, delta, snapshot)
        self.log.append(delta)
        self.records.append(record)
        return record

    @torch.no_grad()
    def _measure(self, record: EditRecord, delta: WeightDelta, before: WeightSnapshot) -> None:
        l1, squares = 0.0, 0.0
        for module in delta.modules():
            change = edited_weight(self.model, module).double() - before.original(module).double()
            l1 += float(change.abs().sum())
            squares += float(change.pow(2).sum())
        record.dw_l1, record.dw_fro = l1, math.sqrt(squares)
        record.relative_l1 = {m: float(edited_weight(self.model, m).double().abs().sum()) / self._base_l1[m]
                              for m in self.modules}

    # ---- state ---------------------------------------------------------------------------------

    def revert(self) -> None:
        """Back to the base weights, bit for bit; the log and records are cleared."""
        self.base.restore(self.model)
        self.log = EditLog(metadata=self.log.metadata)
        self.records = []
        self.ctx.key_cache.clear()

    def resume(self, log: EditLog) -> None:
        """Replay ``log`` onto the base weights and continue editing after it."""
        self.revert()
        log.replay(self.model)
        for delta in log:
            remember_keys(self.ctx, delta)
        self.log = EditLog(log.deltas, {**self.log.metadata, **log.metadata})
        self.records = [EditRecord(edit_index=i, case_ids=list(d.case_ids), method=d.method) for i, d in enumerate(log)]
