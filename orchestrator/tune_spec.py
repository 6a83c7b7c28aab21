"""Tune specs: an experiment spec plus a ``search`` section (``orchestrator/tuning.py`` runs them).

A tune spec is an experiment spec (``orchestrator/spec.py``: models, methods, one edit data set, one
seed, ``n_edits``, checkpoints, evaluation, resources, store) plus::

    search:
      num_samples: 16                    # trials per (model, method)
      seed: 0                            # the sampler's seed: the same spec samples the same trials
      space:                             # dotted hyper-parameter names (default: the three below)
        eac.gamma_percentile: {uniform: [70, 99]}
        eac.l1_weight: {loguniform: [1.0e-8, 1.0e-5]}
        weight_decay: {loguniform: [1.0e-4, 1.0]}   # μ
      objective:
        edit: [edit/toolkit:reliability, edit/toolkit:generalisation, edit/toolkit:locality]
        retention: headline              # or a list of task:metric rows, e.g. [nli:retention/accuracy_all]
        combine: product                 # product | edit | retention
      scheduler: {type: asha, grace_period: 10, reduction_factor: 2}   # or {type: fifo}
      max_concurrent_trials: null        # default: as many as the cluster's resources hold

The experiment part is validated by ``spec_from_dict``; the ``search`` section by ``SearchValidator``,
which is the experiment spec's ``SpecValidator`` (same messages, same ``SpecError``) plus the search's
own fields.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from orchestrator.spec import (ExperimentSpec, MethodVariant, SpecError, SpecValidator, read_spec_yaml,
                               resolve_hparams, spec_from_dict)
from workers.fields import is_finite_number

METRIC = "objective"  # the value a trial reports and the search maximises
DISTRIBUTIONS = ("uniform", "loguniform", "quniform", "randint", "choice")
COMBINE = ("product", "edit", "retention", "constrained")
CONSTRAINED = "constrained"
DEFAULT_CONSTRAINT = ("edit/counterfact", "efficacy")
UPDATE_L1 = "update_l1_relative"  # deviation/<module> rows: ||W - W0||_1 / ||W0||_1 of each edited matrix
SCHEDULERS = ("asha", "fifo")
HEADLINE_RETENTION = "headline"


# --------------------------------------------------------------------------------------------
# Typed tune spec


@dataclass(frozen=True)
class Dimension:
    """One searched hyper-parameter: its dotted name and distribution (``uniform``/``loguniform``:
    (low, high); ``quniform``: (low, high, q); ``randint``: (low, high), high exclusive; ``choice``:
    the values)."""

    name: str
    distribution: str
    values: tuple

    def domain(self):
        from ray import tune

        if self.distribution == "choice":
            return tune.choice(list(self.values))
        return getattr(tune, self.distribution)(*self.values)

    def example(self):
        """A value in the domain (its lower bound or first choice), to check the name resolves."""
        return self.values[0]


DEFAULT_SPACE = (Dimension("eac.gamma_percentile", "uniform", (70.0, 99.0)),  # P70–P99 (Table 2: P80–P95)
                 Dimension("eac.l1_weight", "loguniform", (1e-8, 1e-5)),  # λ (C.5: 5e-7)
                 Dimension("weight_decay", "loguniform", (1e-4, 1.0)))  # μ (C.5: 0.5 GPT-2 XL, 1e-3 LLaMA-3)

DEFAULT_EDIT_TERMS = (("edit/toolkit", "reliability"), ("edit/toolkit", "generalisation"),
                      ("edit/toolkit", "locality"))


@dataclass(frozen=True)
class Objective:
    """What a trial maximises, from the rows of one checkpoint.

    ``edit``: (task, metric) rows averaged into the editing score. ``retention``: (task, metric) rows
    averaged into the retention, or ``None`` for the headline retention of every general task that has
    a row (a task whose unedited score is 0 has no retention row). ``combine``: ``product`` (editing
    score × retention), ``edit`` or ``retention`` alone, or ``constrained``: the ``constraint`` score
    (default CounterFact efficacy) must be within ``tolerance`` of the base method's at the same
    checkpoint (``reference``: (checkpoint, score) pairs of the unconstrained method's own trajectory,
    filled in by ``run_search``), and among the trials that meet it the smallest accumulated update
    wins (mean over edited matrices of ‖ΔW‖₁ / ‖W₀‖₁, the ``deviation/<module>`` rows)."""

    edit: tuple[tuple[str, str], ...] = DEFAULT_EDIT_TERMS
    retention: tuple[tuple[str, str], ...] | None = None
    combine: str = "product"
    constraint: tuple[str, str] = DEFAULT_CONSTRAINT
    tolerance: float = 0.05
    reference: tuple[tuple[int, float], ...] = ()

    def terms(self, values: Mapping[tuple[str, str], float], checkpoint: int | None = None) -> dict[str, float]:
        """``{"edit_score": .., "retention": .., "objective": ..}`` from ``{(task, metric): value}`` (for
        ``constrained``: ``{"constraint": .., "reference": .., "update_l1": .., "objective": ..}`` of the
        rows of ``checkpoint``)."""
        if self.combine == CONSTRAINED:
            return self._constrained_terms(values, checkpoint)
        out = {}
        if self.combine in ("product", "edit"):
            out["edit_score"] = _mean_of(values, self.edit, "edit")
        if self.combine in ("product", "retention"):
            out["retention"] = _mean_of(values, self._retention_terms(values), "retention")
        out[METRIC] = math.prod(out.values())
        return out

    def _constrained_terms(self, values: Mapping[tuple[str, str], float], checkpoint: int | None) -> dict[str, float]:
        """Lexicographic as one number for Tune to maximise: a trial within ``tolerance`` of the reference
        scores 1 / (1 + L1) in (0, 1], smaller updates higher; one that falls short scores minus its
        shortfall, below every trial that meets the constraint and closer to 0 the closer it came."""
        reference = dict(self.reference).get(checkpoint)
        if reference is None:
            raise ValueError(f"objective: no reference {':'.join(self.constraint)} of the base method at "
                             f"{checkpoint} edits (reference checkpoints: {[c for c, _ in self.reference]})")
        score = _mean_of(values, (self.constraint,), "constraint")
        l1_terms = tuple(key for key in values if key[0].startswith("deviation/") and key[1] == UPDATE_L1)
        l1 = _mean_of(values, l1_terms, "update norm (evaluation.deviation_norms)")
        shortfall = (reference - self.tolerance) - score
        objective = 1.0 / (1.0 + l1) if shortfall <= 1e-12 else -shortfall
        return {"constraint": score, "reference": reference, "update_l1": l1, METRIC: objective}

    def _retention_terms(self, values: Mapping[tuple[str, str], float]) -> tuple[tuple[str, str], ...]:
        if self.retention is not None:
            return self.retention
        from workers.evaluation.metrics import HEADLINE

        return tuple((task, f"retention/{metric}") for task, metric in HEADLINE.items()
                     if (task, f"retention/{metric}") in values)


def _mean_of(values: Mapping[tuple[str, str], float], terms, what: str) -> float:
    missing = [f"{task}:{metric}" for task, metric in terms if (task, metric) not in values]
    if missing or not terms:
        raise ValueError(f"objective: the checkpoint has no {what} row(s) {missing or '(none configured)'}; "
                         f"rows present: {sorted(f'{t}:{m}' for t, m in values)[:40]}")
    picked = [values[term] for term in terms]
    if any(math.isnan(v) for v in picked):
        raise ValueError(f"objective: {what} row(s) {[f'{t}:{m}' for t, m in terms]} hold NaN: {picked}")
    return sum(picked) / len(picked)


@dataclass(frozen=True)
class SchedulerSpec:
    """``asha``: asynchronous successive halving on the ``edits`` axis, from ``grace_period`` edits (default:
    the first checkpoint after an edit) up to ``n_edits``, keeping 1 / ``reduction_factor`` of the trials
    at each rung; ``fifo``: every trial runs to the end."""

    type: str = "asha"
    grace_period: int | None = None
    reduction_factor: float = 2.0


@dataclass(frozen=True)
class SearchSpec:
    space: tuple[Dimension, ...] = DEFAULT_SPACE
    num_samples: int = 8
    seed: int = 0
    objective: Objective = Objective()
    scheduler: SchedulerSpec = SchedulerSpec()
    max_concurrent_trials: int | None = None


@dataclass(frozen=True)
class TuneSpec:
    experiment: ExperimentSpec  # what every trial shares (one data set, one seed)
    search: SearchSpec
    source: str = "<dict>"

    def searches(self) -> list[tuple[str, MethodVariant]]:
        """One search per (model, method variant)."""
        return [(model, variant) for model in self.experiment.models for variant in self.experiment.methods]


# --------------------------------------------------------------------------------------------
# Loading and validation


def load_tune_spec(path: str | Path, *, check_models: bool = True, check_data: bool = True,
                   data_root: str | Path | None = None) -> TuneSpec:
    path = Path(path)
    return tune_spec_from_dict(read_spec_yaml(path), source=path, base_dir=path.parent, check_models=check_models,
                               check_data=check_data, data_root=data_root)


def tune_spec_from_dict(raw: Any, *, source: str | Path = "<dict>", base_dir: str | Path | None = None,
                        check_models: bool = True, check_data: bool = True,
                        data_root: str | Path | None = None) -> TuneSpec:
    """The experiment part is validated by ``spec_from_dict``; the ``search`` section here."""
    if not isinstance(raw, dict):
        raise SpecError(source, "<top level>", "expected a mapping of fields")
    raw = dict(raw)
    search_raw = raw.pop("search", {})
    experiment = spec_from_dict(raw, source=source, base_dir=base_dir, check_models=check_models,
                                check_data=check_data, data_root=data_root)
    for name in ("datasets", "seeds"):
        if len(getattr(experiment, name)) != 1:
            raise SpecError(source, name, f"a trial is one trajectory: give one entry, not "
                                          f"{list(getattr(experiment, name))} (a search per entry: one spec each)")
    v = SearchValidator(source, Path(base_dir) if base_dir is not None else Path.cwd())
    search = v.search(search_raw, experiment)
    for model, variant in ((m, var) for m in experiment.models for var in experiment.methods):
        v.space_resolves(search.space, model, variant)
    return TuneSpec(experiment, search, str(source))


class SearchValidator(SpecValidator):
    """The experiment spec's validator (``fail``, ``mapping``, ``no_unknown``, ``integer``) plus the
    ``search`` section's fields."""

    def one_of(self, value, options: tuple, field_name: str):
        if value not in options:
            self.fail(field_name, f"{value!r} is not one of {list(options)}")
        return value

    def search(self, raw, experiment: ExperimentSpec) -> SearchSpec:
        raw = self.mapping(raw, "search")
        self.no_unknown(raw, {"space", "num_samples", "seed", "objective", "scheduler", "max_concurrent_trials"},
                        "search.")
        space = self.space(raw["space"]) if raw.get("space") is not None else DEFAULT_SPACE
        concurrent = raw.get("max_concurrent_trials")
        return SearchSpec(
            space=space,
            num_samples=self.integer(raw.get("num_samples", SearchSpec.num_samples), "search.num_samples", minimum=1),
            seed=self.integer(raw.get("seed", 0), "search.seed", minimum=0),
            objective=self.objective(raw.get("objective"), experiment),
            scheduler=self.scheduler(raw.get("scheduler"), experiment),
            max_concurrent_trials=None if concurrent is None else self.integer(
                concurrent, "search.max_concurrent_trials", minimum=1))

    def space(self, raw) -> tuple[Dimension, ...]:
        raw = self.mapping(raw, "search.space")
        if not raw:
            self.fail("search.space", "no hyper-parameter to search")
        dimensions = []
        for name, spec in raw.items():
            where = f"search.space.{name}"
            spec = self.mapping(spec, where)
            if len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
                self.fail(where, f"expected one of {{{' | '.join(DISTRIBUTIONS)}: [...]}}, got {spec!r}")
            (distribution, values), = spec.items()
            if not isinstance(values, list) or not values:
                self.fail(where, f"{distribution}: expected a list, got {values!r}")
            if distribution != "choice":
                arity = 3 if distribution == "quniform" else 2
                if len(values) != arity or not all(is_finite_number(x) for x in values):
                    self.fail(where, f"{distribution}: expected {arity} numbers, got {values!r}")
                if not values[0] < values[1]:
                    self.fail(where, f"{distribution}: the lower bound {values[0]} is not below {values[1]}")
                if distribution == "loguniform" and values[0] <= 0:
                    self.fail(where, f"loguniform: bounds must be positive, got {values!r}")
                if distribution == "randint" and not all(isinstance(x, int) for x in values):
                    self.fail(where, f"randint: expected integers, got {values!r}")
            dimensions.append(Dimension(str(name), distribution, tuple(values)))
        return tuple(dimensions)

    def term(self, value, where: str) -> tuple[str, str]:
        if not isinstance(value, str) or value.count(":") != 1 or not all(value.split(":")):
            self.fail(where, f"expected 'task:metric' (e.g. edit/toolkit:reliability), got {value!r}")
        task, metric = value.split(":")
        return task, metric

    def terms(self, raw, where: str) -> tuple[tuple[str, str], ...]:
        if not isinstance(raw, list) or not raw:
            self.fail(where, f"expected a non-empty list of 'task:metric', got {raw!r}")
        return tuple(self.term(item, f"{where}[{i}]") for i, item in enumerate(raw))

    def objective(self, raw, experiment: ExperimentSpec) -> Objective:
        from workers.evaluation.tasks import TASKS

        raw = self.mapping(raw, "search.objective")
        self.no_unknown(raw, {"edit", "retention", "combine", "constraint", "tolerance"}, "search.objective.")
        combine = self.one_of(raw.get("combine", "product"), COMBINE, "search.objective.combine")
        if combine == CONSTRAINED:
            return self.constrained(raw, experiment)
        for name in ("constraint", "tolerance"):
            if name in raw:
                self.fail(f"search.objective.{name}", f"only used with combine: {CONSTRAINED}")
        edit = self.terms(raw["edit"], "search.objective.edit") if "edit" in raw else DEFAULT_EDIT_TERMS
        retention_raw = raw.get("retention", HEADLINE_RETENTION)
        retention = None if retention_raw == HEADLINE_RETENTION else self.terms(retention_raw,
                                                                                "search.objective.retention")
        config = experiment.evaluation.config
        if combine in ("product", "edit"):
            for i, (task, _) in enumerate(edit):
                family = task.removeprefix("edit/")
                if not task.startswith("edit/") or family not in config.edit_metrics:
                    self.fail(f"search.objective.edit[{i}]", f"{task!r} is not an editing-metric family the "
                                                             f"evaluation computes (edit/<one of {list(config.edit_metrics)}>)")
        if combine in ("product", "retention"):
            evaluated = [task for task in TASKS if config.count(task)]
            if not evaluated:
                self.fail("search.objective.combine", f"{combine!r} needs general-ability retention, but "
                                                      "evaluation.tasks names no task; add tasks or use combine: edit")
            for i, (task, _) in enumerate(retention or ()):
                if task not in evaluated:
                    self.fail(f"search.objective.retention[{i}]", f"task {task!r} is not evaluated "
                                                                  f"(evaluation.tasks: {evaluated})")
        return Objective(edit, retention, combine)

    def constrained(self, raw: dict, experiment: ExperimentSpec) -> Objective:
        from workers.editing.methods import split_method

        for name in ("edit", "retention"):
            if name in raw:
                self.fail(f"search.objective.{name}", f"not used with combine: {CONSTRAINED} (it reads constraint)")
        constraint = self.term(raw.get("constraint", ":".join(DEFAULT_CONSTRAINT)), "search.objective.constraint")
        tolerance = raw.get("tolerance", Objective.tolerance)
        if not is_finite_number(tolerance) or tolerance < 0:
            self.fail("search.objective.tolerance", f"expected a number >= 0, got {tolerance!r}")
        config = experiment.evaluation.config
        if not constraint[0].startswith("edit/") or constraint[0].removeprefix("edit/") not in config.edit_metrics:
            self.fail("search.objective.constraint", f"{constraint[0]!r} is not an editing-metric family the "
                                                     f"evaluation computes (edit/<one of {list(config.edit_metrics)}>)")
        if not config.deviation_norms:
            self.fail("search.objective.combine", f"{CONSTRAINED} ranks trials by the update's L1 norm; "
                                                  "evaluation.deviation_norms is off")
        for i, variant in enumerate(experiment.methods):
            if split_method(variant.method)[1] is None:
                self.fail(f"methods[{i}]", f"{CONSTRAINED} compares a constrained method with its base method; "
                                           f"{variant.method!r} has no constraint (e.g. rome-eac, memit-rect)")
        return Objective(combine=CONSTRAINED, constraint=constraint, tolerance=float(tolerance))

    def scheduler(self, raw, experiment: ExperimentSpec) -> SchedulerSpec:
        raw = self.mapping(raw, "search.scheduler")
        self.no_unknown(raw, {"type", "grace_period", "reduction_factor"}, "search.scheduler.")
        kind = self.one_of(raw.get("type", "asha"), SCHEDULERS, "search.scheduler.type")
        grace = raw.get("grace_period")
        first = min(c for c in experiment.checkpoints if c > 0)
        if grace is None:
            grace = first
        grace = self.integer(grace, "search.scheduler.grace_period", minimum=1)
        if grace > experiment.n_edits:
            self.fail("search.scheduler.grace_period", f"{grace} is beyond n_edits ({experiment.n_edits})")
        factor = raw.get("reduction_factor", 2.0)
        if not is_finite_number(factor) or factor <= 1:
            self.fail("search.scheduler.reduction_factor", f"expected a number > 1, got {factor!r}")
        return SchedulerSpec(kind, grace, float(factor))

    def space_resolves(self, space: tuple[Dimension, ...], model: str, variant: MethodVariant) -> None:
        """Every searched name is a hyper-parameter of the variant (e.g. ``eac.*`` needs an EAC method)."""
        for dimension in space:
            probe = dataclasses.replace(variant, hparams={**variant.hparams, dimension.name: dimension.example()})
            try:
                resolve_hparams(model, probe)
            except (TypeError, ValueError) as exc:
                self.fail(f"search.space.{dimension.name}", f"{variant.name} on {model}: {exc}")
