"""The per-edit record, spelled once: every measure of one edit step is one field here.

``StepMeasures`` holds what a method (or the constraint wrapping it) measures about one edit step.
``StepInfo`` is what a method returns beside its delta: those measures plus the targets it solved
(kept for tests and analyses, never stored). ``EditRecord`` is the Editor's row for the step: the
same measures plus who was edited and what the step did to the weights. The store's ``edits`` table
(``orchestrator.store.edit_row`` and ``SCHEMAS["edits"]``) is derived from ``EditRecord``'s fields
and their annotations, so a new per-edit metric is one field in ``StepMeasures`` (measured by the
method) or in ``EditRecord`` (measured by the Editor).

Annotations name the column types: ``int``, ``float``, ``str``, ``bool``, ``dict[str, float]``
(a map column), ``... | None`` (nullable). Two fields become two columns each: ``case_ids`` is
stored as ``case_id`` (the ids joined with ',') and ``n_requests``; ``seconds`` as the map ``seconds``
and its ``total`` as ``seconds_total``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch


@dataclass(kw_only=True)
class StepMeasures:
    """What a method measures about one edit step."""

    seconds: dict[str, float] = field(default_factory=dict)  # per phase: keys, targets, update, ...
    loss: float = float("nan")
    delta_norm: float = float("nan")
    steps: int = 0  # optimisation steps (loss evaluations), summed over the step's requests
    anchors: int | None = None  # EAC: anchor dimensions kept (mean over the step's requests)
    delta_norm_before: float | None = None  # EAC: ‖δ‖ after the probe, before compression


def measure_names() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(StepMeasures))


@dataclass(kw_only=True)
class StepInfo(StepMeasures):
    """What a method reports about one edit step, beside the delta itself."""

    targets: list[torch.Tensor] = field(default_factory=list)  # v* (ROME) or z (MEMIT) per request

    def absorb(self, results: list, reports: list[dict]) -> None:
        """Average the per-request optimisation outcomes (batch edits optimise one δ per request) and
        the per-request reports of the target optimiser (``TargetOptimiser``: measure name -> value;
        integer measures are rounded to the nearest integer)."""
        self.loss = sum(r.loss for r in results) / len(results)
        self.steps = sum(r.steps for r in results)
        self.delta_norm = sum(float(r.delta.norm()) for r in results) / len(results)
        kinds = {f.name: f.type for f in dataclasses.fields(StepMeasures)}
        for name in dict.fromkeys(name for report in reports for name in report):
            if name not in kinds:
                raise KeyError(f"the target optimiser reported {name!r}, which is not a measure of an edit step "
                               f"(workers.editing.record.StepMeasures: {sorted(kinds)})")
            values = [report[name] for report in reports if report.get(name) is not None]
            if values:
                mean = sum(values) / len(values)
                setattr(self, name, round(mean) if kinds[name].startswith("int") else mean)


@dataclass(kw_only=True)
class EditRecord(StepMeasures):
    """One edit step as the Editor records it (one row of the store's ``edits`` table)."""

    edit_index: int
    case_ids: list
    method: str
    dw_l1: float = float("nan")  # ‖ΔW‖₁ of the step, summed over the matrices it touched
    dw_fro: float = float("nan")  # ‖ΔW‖_F of the step
    relative_l1: dict[str, float] = field(default_factory=dict)  # per edited matrix: ‖W‖₁ / ‖W₀‖₁ after it
    skipped: bool = False
    error: str | None = None

    @classmethod
    def of_step(cls, info: StepMeasures | None, **fields) -> "EditRecord":
        """The record of a step: ``info``'s measures (none for a skipped step) and the Editor's ``fields``."""
        measures = {} if info is None else {name: getattr(info, name) for name in measure_names()}
        return cls(**measures, **fields)
