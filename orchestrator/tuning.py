"""Ray Tune search over EAC's anchor percentile γ (Eq. 2), λ and μ (the elastic net, Eq. 4).

μ is searched as the target optimiser's ``weight_decay``: the paper's μ values are the authors'
``v_weight_decay`` and their code has no other squared-norm term (see ``EACHParams``), so searching
``eac.l2_weight`` would search a second, extra term.

    searches = run_tune(load_tune_spec("experiments/configs/tune-rome-eac-smollm2.yaml"))   # `eac tune SPEC`
    searches[0].best_path          # a hyper-parameter YAML that `eac run` takes as is

A tune spec is an experiment spec (``orchestrator/spec.py``: models, methods, one edit data set, one
seed, ``n_edits``, checkpoints, evaluation, resources, store) plus a ``search`` section::

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

Every (model, method variant) gets its own search. A trial is one trajectory of that variant with the
sampled overrides, run by the same ``Driver`` as ``eac run`` (its trajectory and evaluation actors
start inside the trial's placement group), so its edits, evaluations and full hyper-parameters land in
the same Parquet store, tagged ``group: tune``. At every scored checkpoint the trial reports the
objective, read back from the store, with ``edits`` as ASHA's time axis, so bad trials are cut early.

The objective (default): the mean editing score — reliability, generalisation, locality — times the
general-ability retention (edited / unedited, the headline metric of every task evaluated, averaged).

The best trial is the one with the highest objective among those that reached the last checkpoint
(an early-stopped trial has fewer edits, which flatters it). Its complete hyper-parameters are written
to ``<out>/<experiment>/best-<model>-<variant>.yaml``; give it to a spec as ``hparams_file:`` (or as
``hparams:``) and ``eac run`` edits with exactly those values.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import pandas as pd
import yaml

from orchestrator.spec import (ExperimentSpec, MethodVariant, SpecError, read_spec_yaml, resolve_hparams,
                               spec_from_dict)
from orchestrator.store import Store
from workers import storage

TUNE_GROUP = "tune"  # the ``group`` of trial trajectories in the store (kept out of the paper figures)
TIME_AXIS = "edits"  # what ASHA counts: requests edited when the checkpoint was scored
METRIC = "objective"
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
    v = _SearchValidator(source)
    search = v.search(search_raw, experiment)
    for model, variant in ((m, var) for m in experiment.models for var in experiment.methods):
        v.space_resolves(search.space, model, variant)
    return TuneSpec(experiment, search, str(source))


class _SearchValidator:
    def __init__(self, source):
        self.source = source

    def fail(self, field_name: str, problem: str):
        raise SpecError(self.source, field_name, problem)

    def mapping(self, value, where: str) -> dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.fail(where, f"expected a mapping, got {type(value).__name__}")
        return value

    def known(self, raw: dict, known: set, prefix: str) -> None:
        unknown = sorted(set(raw) - known, key=str)
        if unknown:
            self.fail(prefix + str(unknown[0]), f"unknown field; known: {sorted(known)}")

    def integer(self, value, where: str, minimum: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            self.fail(where, f"expected an integer >= {minimum}, got {value!r}")
        return value

    def search(self, raw, experiment: ExperimentSpec) -> SearchSpec:
        raw = self.mapping(raw, "search")
        self.known(raw, {"space", "num_samples", "seed", "objective", "scheduler", "max_concurrent_trials"},
                   "search.")
        space = self.space(raw["space"]) if raw.get("space") is not None else DEFAULT_SPACE
        concurrent = raw.get("max_concurrent_trials")
        return SearchSpec(
            space=space,
            num_samples=self.integer(raw.get("num_samples", SearchSpec.num_samples), "search.num_samples", 1),
            seed=self.integer(raw.get("seed", 0), "search.seed", 0),
            objective=self.objective(raw.get("objective"), experiment),
            scheduler=self.scheduler(raw.get("scheduler"), experiment),
            max_concurrent_trials=None if concurrent is None else self.integer(
                concurrent, "search.max_concurrent_trials", 1))

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
                if len(values) != arity or not all(_is_number(x) for x in values):
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
        from workers.evaluation import EvalConfig
        from workers.evaluation.config import GENERAL_TASKS

        raw = self.mapping(raw, "search.objective")
        self.known(raw, {"edit", "retention", "combine", "constraint", "tolerance"}, "search.objective.")
        combine = raw.get("combine", "product")
        if combine not in COMBINE:
            self.fail("search.objective.combine", f"{combine!r} is not one of {list(COMBINE)}")
        if combine == CONSTRAINED:
            return self.constrained(raw, experiment)
        for name in ("constraint", "tolerance"):
            if name in raw:
                self.fail(f"search.objective.{name}", f"only used with combine: {CONSTRAINED}")
        edit = self.terms(raw["edit"], "search.objective.edit") if "edit" in raw else DEFAULT_EDIT_TERMS
        retention_raw = raw.get("retention", HEADLINE_RETENTION)
        retention = None if retention_raw == HEADLINE_RETENTION else self.terms(retention_raw,
                                                                                "search.objective.retention")
        config = EvalConfig.from_dict(experiment.evaluation.config_fields(), source="evaluation")
        if combine in ("product", "edit"):
            for i, (task, _) in enumerate(edit):
                family = task.removeprefix("edit/")
                if not task.startswith("edit/") or family not in config.edit_metrics:
                    self.fail(f"search.objective.edit[{i}]", f"{task!r} is not an editing-metric family the "
                                                             f"evaluation computes (edit/<one of {list(config.edit_metrics)}>)")
        if combine in ("product", "retention"):
            evaluated = [task for task in GENERAL_TASKS if config.count(task)]
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
        from workers.evaluation import EvalConfig

        for name in ("edit", "retention"):
            if name in raw:
                self.fail(f"search.objective.{name}", f"not used with combine: {CONSTRAINED} (it reads constraint)")
        constraint = self.term(raw.get("constraint", ":".join(DEFAULT_CONSTRAINT)), "search.objective.constraint")
        tolerance = raw.get("tolerance", Objective.tolerance)
        if not _is_number(tolerance) or tolerance < 0:
            self.fail("search.objective.tolerance", f"expected a number >= 0, got {tolerance!r}")
        config = EvalConfig.from_dict(experiment.evaluation.config_fields(), source="evaluation")
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
        self.known(raw, {"type", "grace_period", "reduction_factor"}, "search.scheduler.")
        kind = raw.get("type", "asha")
        if kind not in SCHEDULERS:
            self.fail("search.scheduler.type", f"{kind!r} is not one of {list(SCHEDULERS)}")
        grace = raw.get("grace_period")
        first = min(c for c in experiment.checkpoints if c > 0)
        if grace is None:
            grace = first
        grace = self.integer(grace, "search.scheduler.grace_period", 1)
        if grace > experiment.n_edits:
            self.fail("search.scheduler.grace_period", f"{grace} is beyond n_edits ({experiment.n_edits})")
        factor = raw.get("reduction_factor", 2.0)
        if not _is_number(factor) or factor <= 1:
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


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# --------------------------------------------------------------------------------------------
# Trials


def plain(value):
    """A sampled value as a plain Python scalar (Tune may hand out numpy scalars)."""
    return value.item() if hasattr(value, "item") else value


def trial_variant(variant: MethodVariant, sampled: Mapping[str, Any]) -> MethodVariant:
    """The variant a trial runs: the sampled overrides on top of the variant's own, named by them."""
    sampled = {name: plain(value) for name, value in sampled.items()}
    label = ",".join(f"{name.rsplit('.', 1)[-1]}={value:.4g}" if isinstance(value, float) else
                     f"{name.rsplit('.', 1)[-1]}={value}" for name, value in sorted(sampled.items()))
    return MethodVariant(f"{variant.name}[{label}]", variant.method, {**variant.hparams, **sampled}, TUNE_GROUP,
                         variant.hparams_file)


@dataclass(frozen=True)
class TrialContext:
    """What every trial of one search shares (shipped to the trial actors by ``tune.with_parameters``)."""

    experiment: ExperimentSpec  # the search's model and variant only
    objective: Objective
    store_root: str
    data_root: str
    cache_dir: str

    def trial_spec(self, sampled: Mapping[str, Any]) -> ExperimentSpec:
        (variant,) = self.experiment.methods
        return dataclasses.replace(self.experiment, methods=(trial_variant(variant, sampled),))


def checkpoint_values(store: Store, experiment: str, trajectory_id: str) -> dict[int, dict[tuple[str, str], float]]:
    """``{checkpoint: {(task, metric): value}}`` of one trajectory, from the store."""
    frame = store.frame("evaluations", experiment, trajectory_id)
    return {int(n): {(t, m): float(v) for t, m, v in zip(rows["task"], rows["metric"], rows["value"])}
            for n, rows in frame.groupby("n_edits")}


def run_trial(config: dict, context: TrialContext) -> None:
    """One Tune trial: ``eac run`` of the one-trajectory spec, reporting the objective at each scored
    checkpoint (checkpoints already in the store from an earlier run are reported first)."""
    from ray import tune

    from orchestrator.driver import Driver

    spec = context.trial_spec(config)
    store = Store(context.store_root)
    reported: list[int] = []

    def report(checkpoint: int) -> None:
        if checkpoint == 0 or (reported and checkpoint <= reported[-1]):
            return  # the unedited model has no editing score; ASHA's axis only goes forward
        values = checkpoint_values(store, spec.experiment, trajectory_id)[checkpoint]
        reported.append(checkpoint)
        tune.report({TIME_AXIS: checkpoint, **context.objective.terms(values, checkpoint),
                     "trajectory_id": trajectory_id})

    driver = Driver(spec, store, progress=False, data_root=context.data_root, cache_dir=context.cache_dir,
                    observer=lambda kind, trajectory, event: report(event) if kind == "evaluation" else None,
                    take_lock=False)  # run_tune holds the experiment's lock for every trial
    (planned,) = driver.plan()
    trajectory_id = planned.trajectory_id
    try:
        for checkpoint in sorted(planned.evaluated):
            report(checkpoint)
        result = driver.run()
    except SystemExit:
        # The scheduler stopped the trial: ``tune.report`` exits the trial's thread, and the driver,
        # unwinding, released its actors and marked the trajectory interrupted. Say what happened.
        settle_status(context, spec, error=None)
        raise
    except Exception as exc:  # e.g. the objective's rows are missing: say so rather than "interrupted"
        settle_status(context, spec, error=exc, replace_failure=True)
        raise
    (trajectory,) = result.trajectories
    if trajectory.status.startswith("failed"):
        raise RuntimeError(f"{trajectory.spec.label}: {trajectory.status}")


def trial_resources(experiment: ExperimentSpec):
    """The trial's placement group: a zero-CPU bundle for the trial itself (it only waits on its
    actors), one for the trajectory actor and one per evaluation actor, as the spec asks."""
    from ray import tune

    def bundle(resources) -> dict[str, float]:
        out = {"CPU": resources.num_cpus}
        if resources.num_gpus:
            out["GPU"] = resources.num_gpus
        return out

    res = experiment.resources
    return tune.PlacementGroupFactory([{"CPU": 0}, bundle(res.trajectory)]
                                      + [bundle(res.evaluation)] * res.eval_actors)


# --------------------------------------------------------------------------------------------
# Searches


@dataclass
class SearchResult:
    model: str
    variant: str
    trials: pd.DataFrame  # one row per trial: sampled values, trajectory_id, edits, objective, status
    best_trajectory_id: str | None = None
    best_objective: float = math.nan
    best_path: Path | None = None
    tune_path: str | None = None

    @property
    def ok(self) -> bool:
        return self.best_path is not None


def run_search(tune_spec: TuneSpec, model: str, variant: MethodVariant, store: Store, *, out_dir: Path,
               data_root: str, cache_dir: str, verbose: int = 1) -> SearchResult:
    """One Tune search (one model, one method variant) on the connected Ray cluster."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    search, experiment = tune_spec.search, tune_spec.experiment
    context = TrialContext(dataclasses.replace(experiment, models=(model,), methods=(variant,)),
                           search.objective, str(store.root.resolve()), data_root, cache_dir)
    if search.objective.combine == CONSTRAINED:
        context = dataclasses.replace(context, objective=dataclasses.replace(
            search.objective, reference=reference_scores(context, search.objective.constraint)))
    if search.scheduler.type == "asha":
        scheduler = ASHAScheduler(time_attr=TIME_AXIS, max_t=experiment.n_edits,
                                  grace_period=search.scheduler.grace_period,
                                  reduction_factor=search.scheduler.reduction_factor,
                                  stop_last_trials=False)  # a trial at n_edits ends by itself, completed
    else:
        scheduler = FIFOScheduler()
    name = f"{experiment.experiment}-{_safe(model)}-{_safe(variant.name)}"
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(run_trial, context=context), trial_resources(experiment)),
        param_space={d.name: d.domain() for d in search.space},
        tune_config=tune.TuneConfig(metric=METRIC, mode="max", scheduler=scheduler, num_samples=search.num_samples,
                                    search_alg=BasicVariantGenerator(random_state=search.seed),
                                    max_concurrent_trials=search.max_concurrent_trials),
        run_config=tune.RunConfig(name=name, storage_path=str((store.root / "tune").resolve()), verbose=verbose))
    grid = tuner.fit()

    rows = []
    for result in grid:
        sampled = {d.name: plain(result.config[d.name]) for d in search.space}
        rows.append(_trial_row(store, context, sampled, result.error))
    trials = pd.DataFrame(rows)
    outcome = SearchResult(model, variant.name, trials, tune_path=str(grid.experiment_path))
    finished = trials[(trials["status"] == "completed") & trials[METRIC].notna()] if len(trials) else trials
    if len(finished):
        best = finished.loc[finished[METRIC].idxmax()]
        outcome.best_trajectory_id, outcome.best_objective = best["trajectory_id"], float(best[METRIC])
        hparams = json.loads(store.trajectory(experiment.experiment, best["trajectory_id"])["hparams"])
        outcome.best_path = out_dir / experiment.experiment / f"best-{_safe(model)}-{_safe(variant.name)}.yaml"
        write_best_hparams(outcome.best_path, hparams, {
            "experiment": experiment.experiment, "model": model, "method": variant.method,
            "variant": variant.name, "trial": best["variant"], "trajectory_id": best["trajectory_id"],
            "objective": float(best[METRIC]), "edits": int(best[TIME_AXIS]), "store": str(store.root),
            "sampled": {d.name: best[d.name] for d in search.space}})
    return outcome


def reference_variant(variant: MethodVariant) -> MethodVariant:
    """The base method of a constrained variant (``rome-eac`` -> ``rome``) with the variant's overrides
    that are not the constraint's own (``eac.*``), tagged as a tuning trajectory."""
    from workers.editing.methods import split_method

    base, constraint = split_method(variant.method)
    hparams = {name: value for name, value in variant.hparams.items() if name.split(".")[0] != constraint}
    return MethodVariant(f"{base}[reference]", base, hparams, TUNE_GROUP)


def reference_scores(context: TrialContext, constraint: tuple[str, str]) -> tuple[tuple[int, float], ...]:
    """Run the base method's own trajectory with the trials' setting (skipped when the store has it) and
    return its ``constraint`` score at each scored checkpoint after 0: the constrained objective's bar."""
    from orchestrator.driver import Driver

    (variant,) = context.experiment.methods
    spec = dataclasses.replace(context.experiment, methods=(reference_variant(variant),))
    store = Store(context.store_root)
    result = Driver(spec, store, progress=False, data_root=context.data_root, cache_dir=context.cache_dir,
                    take_lock=False).run()  # run_tune holds the experiment's lock
    (trajectory,) = result.trajectories
    if trajectory.status.startswith("failed"):
        raise RuntimeError(f"{trajectory.spec.label} (the constrained objective's reference): {trajectory.status}")
    scored = checkpoint_values(store, spec.experiment, trajectory.spec.trajectory_id)
    return tuple((checkpoint, values[constraint]) for checkpoint, values in sorted(scored.items())
                 if checkpoint > 0 and constraint in values)


def settle_status(context: TrialContext, trial_spec: ExperimentSpec, error: BaseException | None, *,
                  replace_failure: bool = False) -> str:
    """Make a trial's ``trajectories.status`` final: ``completed`` when every edit and checkpoint is in
    the store, ``failed: <reason>`` after an error, otherwise ``stopped: early stopping, scored at N of
    M edits`` (the scheduler cut it). A completed trajectory keeps its status, and so does a failed one
    after an error unless ``replace_failure`` (the error is the reason, not the driver's unwinding)."""
    from orchestrator.driver import COMPLETED, Driver
    from orchestrator.driver import _first_line as first_line

    store = Store(context.store_root)
    driver = Driver(trial_spec, store, progress=False, data_root=context.data_root, cache_dir=context.cache_dir)
    (trajectory,) = driver.plan()
    spec = trajectory.spec
    row = store.trajectory(spec.experiment, spec.trajectory_id)
    status = row["status"] if row is not None else "pending"
    if status == COMPLETED or (error is not None and status.startswith("failed") and not replace_failure):
        return status  # finished, or failed with the driver's own reason
    done = store.edit_steps_done(spec.experiment, spec.trajectory_id) >= trajectory.task.n_steps
    if error is not None:
        status = f"failed: {first_line(error)}"
    elif done and trajectory.scored_all():
        status = COMPLETED
    else:
        scored = max((c for c in trajectory.evaluated if c > 0), default=0)
        status = f"stopped: early stopping, scored at {scored} of {spec.n_edits} edits"
    driver._status(trajectory, status)  # the same row an `eac run` writes
    return status


def _trial_row(store: Store, context: TrialContext, sampled: dict, error) -> dict:
    """The trial's line in the summary, its store status made final first (a trial whose actor was
    ended without warning still says ``running``)."""
    trial_spec = context.trial_spec(sampled)
    (trajectory_spec,) = trial_spec.trajectories()
    experiment, trajectory_id = trial_spec.experiment, trajectory_spec.trajectory_id
    row = store.trajectory(experiment, trajectory_id)
    status = row["status"] if row is not None else "pending"
    if error is not None or not (status == "completed" or status.startswith(("failed", "stopped"))):
        status = settle_status(context, trial_spec, error)
    scored = {c: v for c, v in checkpoint_values(store, experiment, trajectory_id).items() if c > 0}
    last = max(scored, default=0)
    objective = math.nan
    if last:
        try:
            objective = context.objective.terms(scored[last], last)[METRIC]
        except ValueError:
            pass
    return {**sampled, "variant": trajectory_spec.variant.name, "trajectory_id": trajectory_id, TIME_AXIS: last,
            METRIC: objective, "status": status}


def write_best_hparams(path: Path, hparams: dict, about: dict) -> Path:
    """The complete hyper-parameters as YAML, with a header saying where they come from."""
    header = ["Best configuration of a Ray Tune search (eac tune); use it in an experiment spec as",
              "  methods: [{method: %s, hparams_file: %s}]" % (about["method"], path.name),
              ""] + [f"{key}: {json.dumps(value, default=plain)}" for key, value in about.items()]  # numpy scalars
    text = "".join(f"# {line}\n" if line else "#\n" for line in header)
    text += yaml.safe_dump(_lists(hparams), sort_keys=False, default_flow_style=False)
    storage.write_bytes(*storage.resolve(path), text.encode("utf-8"))
    return path


def _lists(value):
    if isinstance(value, dict):
        return {key: _lists(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_lists(item) for item in value]
    return value


@dataclass
class TuneRun:
    searches: list[SearchResult] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 0 if self.searches and all(s.ok for s in self.searches) else 1


def run_tune(tune_spec: TuneSpec, store: Store | None = None, *, address: str | None = None,
             out_dir: str | Path | None = None, data_root: str | Path | None = None,
             cache_dir: str | Path | None = None, verbose: int = 1) -> TuneRun:
    """Every search of the spec, one after another, on a local Ray cluster or the one at ``address``."""
    import ray

    from orchestrator.driver import Driver

    store = store or Store(tune_spec.experiment.store)
    connector = Driver(tune_spec.experiment, store, address=address, progress=False, data_root=data_root,
                       cache_dir=cache_dir)
    out = Path(out_dir) if out_dir is not None else store.root / "tune"
    with store.lock(tune_spec.experiment.experiment):  # one search (or run) of an experiment at a time
        started = connector._connect()  # the same ray.init (forwarded settings) as `eac run`
        try:
            return TuneRun([run_search(tune_spec, model, variant, store, out_dir=out,
                                       data_root=connector.data_root, cache_dir=connector.cache_dir,
                                       verbose=verbose)
                            for model, variant in tune_spec.searches()])
        finally:
            if started:
                ray.shutdown()


def format_trials(result: SearchResult) -> str:
    shown = result.trials.drop(columns=["trajectory_id"]).sort_values(METRIC, ascending=False, na_position="last")
    return shown.to_string(index=False, float_format=lambda x: f"{x:.4g}", na_rep="–")


_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]+")


def _safe(name: str) -> str:
    return _UNSAFE.sub("_", Path(name).name if "/" in name and Path(name).exists() else name).strip("_") or "model"

