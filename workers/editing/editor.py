"""One API for sequential and batch-sequential editing.

    editor = Editor(model, tokenizer, "rome", load_hparams("rome", model))
    log = editor.apply(requests, batch_size=1, on_edit=print)   # each step on top of all previous ones

Every step is all-or-nothing: the matrices a method may touch and the edit context's running state
(AlphaEdit's key caches) are snapshotted first, and if the method fails (bad input, a NaN loss, a
singular solve) or produces non-finite weights, both are restored bit for bit, the step is recorded
as skipped with its reason, and the trajectory goes on
(``on_error="raise"`` re-raises instead). ``revert()`` restores the base weights exactly;
``resume(log)`` replays a saved log onto the base model and continues from it.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from workers.data import EditRequest
from workers.editing.context import EditContext
from workers.editing.delta import EditLog, WeightDelta, WeightSnapshot
from workers.editing.errors import EditFailure
from workers.editing.methods import BASES, CONSTRAINTS, split_method
from workers.editing.record import EditRecord
from workers.fields import identity
from workers.memory import release_free_heap
from workers.models import arch_spec, edited_weight
from workers.packed_linear import LinearCompute


class Editor:
    def __init__(self, model, tokenizer, method: str, hparams, *, cache_dir: str | Path | None = None,
                 data_root=None, second_moments: dict[int, torch.Tensor] | None = None, on_error: str = "skip",
                 compute: LinearCompute = LinearCompute()):
        base_name, constraint_name = split_method(method)
        if on_error not in ("skip", "raise"):
            raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
        base, constraint = BASES[base_name], CONSTRAINTS.get(constraint_name)
        settings = None if constraint is None else getattr(hparams, constraint_name, None)
        if constraint is not None and settings is None:
            raise ValueError(f"method {method} needs hyper-parameters with a '{constraint_name}' section "
                             f"(load_hparams({method!r}, model))")
        self.model, self.tokenizer, self.method, self.hparams = model, tokenizer, method, hparams
        self.on_error = on_error
        self._base_method = base
        self.layers = base.layers(hparams)
        spec = arch_spec(model)
        self.modules = [spec.mlp_out_name(layer) for layer in self.layers]
        # The constraint's hooks (methods.Constraint), built from its settings.
        optimiser = constraint.optimise(settings) if constraint is not None and constraint.optimise else None
        self.ctx = EditContext(model, tokenizer, cache_dir=cache_dir, data_root=data_root, second_moments=second_moments,
                               optimiser=optimiser, compute=compute)
        # Statistics of the unedited model, computed (or loaded) once, before any edit.
        if base.second_moments(hparams):
            self.ctx.prepare_second_moments(self.layers, hparams)
        if base.context_templates:
            self.ctx.context_templates(hparams)
        if constraint is not None and constraint.solve is not None:
            self.ctx.layer_solve = constraint.solve(settings)
        self.ctx.optimiser.prepare(hparams, self.ctx)  # on the unedited model (NAS's reference norm)
        self.base = WeightSnapshot(model, self.modules)
        self._restrain = (constraint.rewrite(settings, self.base) if constraint is not None and constraint.rewrite
                          else None)
        self._base_l1 = {m: float(self.base.original(m).double().abs().sum()) for m in self.modules}
        # What made the log, as its binding hashes it: the evaluators read the constraint's settings here.
        self.log = EditLog(metadata={"method": method, "hparams": identity(hparams)})
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
        """One all-or-nothing step (applied, or recorded as skipped with the model as it was)."""
        try:
            return self._edit_step(requests)
        finally:
            # After the step's tensors are gone: its free heap pages go back to the system, so a long
            # sequence does not grow the process (workers/memory.py: AlphaEdit's actor reached 14.8 GB).
            release_free_heap()

    def _edit_step(self, requests: list[EditRequest]) -> EditRecord:
        who = {"edit_index": len(self.records), "case_ids": [r.case_id for r in requests], "method": self.method}
        snapshot = WeightSnapshot(self.model, self.modules)
        state = self.ctx.edit_state()
        start = time.perf_counter()
        try:
            delta, info = self._base_method.apply(self.model, self.tokenizer, requests, self.hparams, self.ctx,
                                                  self.method)
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
            record = EditRecord.of_step(None, **who, skipped=True, error=f"{type(exc).__name__}: {exc}",
                                        seconds={"total": time.perf_counter() - start})
            self.records.append(record)
            return record
        except BaseException:
            snapshot.restore(self.model)  # never leave the model half-edited
            self.ctx.restore_edit_state(state)
            raise
        info.seconds["total"] = time.perf_counter() - start
        record = EditRecord.of_step(info, **who)
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
        self.ctx.clear_edit_state()

    def resume(self, log: EditLog) -> None:
        """Replay ``log`` onto the base weights and continue editing after it."""
        self.revert()
        log.replay(self.model)
        layer_of = dict(zip(self.modules, self.layers))
        for layer_delta in (layer_delta for delta in log for layer_delta in delta.layers):
            if layer_delta.layer is None:  # a log saved before deltas recorded their layer
                layer_delta.layer = layer_of.get(layer_delta.module)
        if self._base_method.on_resume is not None:
            for delta in log:
                self._base_method.on_resume(self.ctx, delta)
        self.log = EditLog(log.deltas, {**self.log.metadata, **log.metadata})
        self.records = [EditRecord(edit_index=i, case_ids=list(d.case_ids), method=d.method) for i, d in enumerate(log)]
