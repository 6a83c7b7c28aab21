"""Ray Tune search over EAC's anchor percentile γ (Eq. 2), λ and μ (the elastic net, Eq. 4).

μ is searched as the target optimiser's ``weight_decay``: the paper's μ values are the authors'
``v_weight_decay`` and their code has no other squared-norm term (see ``EACHParams``), so searching
``eac.l2_weight`` would search a second, extra term.

    from orchestrator.tune_spec import load_tune_spec
    searches = run_tune(load_tune_spec("experiments/configs/tune-rome-eac-smollm2.yaml"))   # `eac tune SPEC`
    searches[0].best_path          # a hyper-parameter YAML that `eac run` takes as is

A tune spec (``orchestrator/tune_spec.py``) is an experiment spec plus a ``search`` section: the
space, the number of trials, the objective and the scheduler.

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
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from orchestrator.cluster import connect, shutdown
from orchestrator.driver import Driver, error_reason, plan_trajectories, write_status
from orchestrator.spec import TUNE_GROUP, ExperimentSpec, MethodVariant
from orchestrator.status import Status, status_text
from orchestrator.store import Store
from orchestrator.tune_spec import CONSTRAINED, METRIC, Objective, TuneSpec
from workers import settings, storage
from workers.editing.methods import split_method

TIME_AXIS = "edits"  # what ASHA counts: requests edited when the checkpoint was scored


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
        return self.experiment.with_methods((trial_variant(variant, sampled),))


def checkpoint_values(store: Store, experiment: str, trajectory_id: str) -> dict[int, dict[tuple[str, str], float]]:
    """``{checkpoint: {(task, metric): value}}`` of one trajectory, from the store."""
    frame = store.frame("evaluations", experiment, trajectory_id)
    return {int(n): {(t, m): float(v) for t, m, v in zip(rows["task"], rows["metric"], rows["value"])}
            for n, rows in frame.groupby("n_edits")}


def run_trial(config: dict, context: TrialContext) -> None:
    """One Tune trial: ``eac run`` of the one-trajectory spec, reporting the objective at each scored
    checkpoint (checkpoints already in the store from an earlier run are reported first)."""
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
                    take_lock=False, grow_evaluators=False)  # run_tune holds the experiment's lock for every
    # trial; the trial's actors live in its placement group, which has no room for more evaluators
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
    if trajectory.status == Status.FAILED:
        raise RuntimeError(f"{trajectory.spec.label}: {status_text(trajectory.status, trajectory.reason)}")


def trial_resources(experiment: ExperimentSpec):
    """The trial's placement group: a zero-CPU bundle for the trial itself (it only waits on its
    actors), one for the trajectory actor and one per evaluation actor, as the spec asks."""
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
    search, experiment = tune_spec.search, tune_spec.experiment
    context = TrialContext(dataclasses.replace(experiment, models=(model,)).with_methods((variant,)),
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
    base, constraint = split_method(variant.method)
    hparams = {name: value for name, value in variant.hparams.items() if name.split(".")[0] != constraint}
    return MethodVariant(f"{base}[reference]", base, hparams, TUNE_GROUP)


def reference_scores(context: TrialContext, constraint: tuple[str, str]) -> tuple[tuple[int, float], ...]:
    """Run the base method's own trajectory with the trials' setting (skipped when the store has it) and
    return its ``constraint`` score at each scored checkpoint after 0: the constrained objective's bar."""
    (variant,) = context.experiment.methods
    spec = context.experiment.with_methods((reference_variant(variant),))
    store = Store(context.store_root)
    result = Driver(spec, store, progress=False, data_root=context.data_root, cache_dir=context.cache_dir,
                    take_lock=False, grow_evaluators=False).run()  # run_tune holds the experiment's lock
    (trajectory,) = result.trajectories
    if trajectory.status == Status.FAILED:
        raise RuntimeError(f"{trajectory.spec.label} (the constrained objective's reference): "
                           f"{status_text(trajectory.status, trajectory.reason)}")
    scored = checkpoint_values(store, spec.experiment, trajectory.spec.trajectory_id)
    return tuple((checkpoint, values[constraint]) for checkpoint, values in sorted(scored.items())
                 if checkpoint > 0 and constraint in values)


def settle_status(context: TrialContext, trial_spec: ExperimentSpec, error: BaseException | None, *,
                  replace_failure: bool = False) -> tuple[Status, str | None]:
    """Make a trial's status final: ``completed`` when every edit and checkpoint is in the store,
    ``failed`` after an error (its first line the reason), otherwise ``stopped`` (the scheduler cut it;
    reason: scored at N of M edits). A completed trajectory keeps its status, and so does a failed one
    after an error unless ``replace_failure`` (the error is the reason, not the driver's unwinding)."""
    store = Store(context.store_root)
    (trajectory,) = plan_trajectories(trial_spec, store, data_root=context.data_root, cache_dir=context.cache_dir)
    spec = trajectory.spec
    status, reason = stored_status(store, spec.experiment, spec.trajectory_id)
    if status == Status.COMPLETED or (error is not None and status == Status.FAILED and not replace_failure):
        return status, reason  # finished, or failed with the driver's own reason
    done = store.edit_steps_done(spec.experiment, spec.trajectory_id) >= trajectory.task.n_steps
    if error is not None:
        status, reason = Status.FAILED, error_reason(error)
    elif done and trajectory.scored_all():
        status, reason = Status.COMPLETED, None
    else:
        scored = max((c for c in trajectory.evaluated if c > 0), default=0)
        status, reason = Status.STOPPED, f"early stopping, scored at {scored} of {spec.n_edits} edits"
    write_status(store, trajectory, status, reason)  # the same row an `eac run` writes
    return status, reason


def stored_status(store: Store, experiment: str, trajectory_id: str) -> tuple[Status, str | None]:
    row = store.trajectory(experiment, trajectory_id)
    return (Status(row["status"]), row["reason"]) if row is not None else (Status.PENDING, None)


def _trial_row(store: Store, context: TrialContext, sampled: dict, error) -> dict:
    """The trial's line in the summary, its store status made final first (a trial whose actor was
    ended without warning still says ``running``)."""
    trial_spec = context.trial_spec(sampled)
    (trajectory_spec,) = trial_spec.trajectories()
    experiment, trajectory_id = trial_spec.experiment, trajectory_spec.trajectory_id
    status, reason = stored_status(store, experiment, trajectory_id)
    if error is not None or status not in (Status.COMPLETED, Status.FAILED, Status.STOPPED):
        status, reason = settle_status(context, trial_spec, error)
    scored = {c: v for c, v in checkpoint_values(store, experiment, trajectory_id).items() if c > 0}
    last = max(scored, default=0)
    objective = math.nan
    if last:
        try:
            objective = context.objective.terms(scored[last], last)[METRIC]
        except ValueError:
            pass
    return {**sampled, "variant": trajectory_spec.variant.name, "trajectory_id": trajectory_id, TIME_AXIS: last,
            METRIC: objective, "status": status_text(status, reason)}


def write_best_hparams(path: Path, hparams: dict, about: dict) -> Path:
    """The complete hyper-parameters as YAML, with a header saying where they come from."""
    header = ["Best configuration of a Ray Tune search (eac tune); use it in an experiment spec as",
              "  methods: [{method: %s, hparams_file: %s}]" % (about["method"], path.name),
              ""] + [f"{key}: {json.dumps(value, default=plain)}" for key, value in about.items()]
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
    store = store or Store(tune_spec.experiment.store)
    data_root, cache_dir = str(settings.data_dir(data_root)), str(settings.cache_dir(cache_dir))
    out = Path(out_dir) if out_dir is not None else store.root / "tune"
    with store.lock(tune_spec.experiment.experiment):  # one search (or run) of an experiment at a time
        started = connect(address)  # the same ray.init (forwarded settings) as `eac run`
        try:
            return TuneRun([run_search(tune_spec, model, variant, store, out_dir=out, data_root=data_root,
                                       cache_dir=cache_dir, verbose=verbose)
                            for model, variant in tune_spec.searches()])
        finally:
            if started:
                shutdown()


def format_trials(result: SearchResult) -> str:
    shown = result.trials.drop(columns=["trajectory_id"]).sort_values(METRIC, ascending=False, na_position="last")
    return shown.to_string(index=False, float_format=lambda x: f"{x:.4g}", na_rep="–")


_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]+")


def _safe(name: str) -> str:
    return _UNSAFE.sub("_", Path(name).name if "/" in name and Path(name).exists() else name).strip("_") or "model"

