"""The driver: an experiment spec → trajectories → actors on Ray → rows in the Parquet store.

    result = Driver(spec, Store(root)).run()      # what `eac run SPEC` does
    result.exit_code                              # 1 when any trajectory failed

1. **Plan**, before any actor starts: every edit data set is loaded once and each trajectory's
   requests are picked (the first ``n_edits``, or a sample seeded by the trajectory's seed); its
   hyper-parameters are resolved; the store is read. A completed trajectory is skipped. An
   interrupted one resumes from the last step reached by both its saved edit log and its stored edit
   rows (a checkpoint, or one of the saves every ``save_every`` steps); checkpoints up to there that were
   never scored are scored from the saved log.
2. **Run**: an evaluation pool (``EvalActor`` × ``resources.evaluation.actors``) and as many
   ``TrajectoryActor``s at once as the cluster holds. Each trajectory streams one ``EditEvent`` per
   step (buffered) and a ``CheckpointEvent`` per checkpoint: the buffered rows are written, and the
   checkpoint waits in the pool for the next free evaluator while editing continues. When trajectory
   actors finish (or there are fewer trajectories than the cluster holds), the pool grows into the
   resources no trajectory will need while checkpoints wait (``EvalPool.grow``). A trajectory is
   completed when its last edit is stored and every checkpoint is scored.
3. **Failures**: a trajectory actor that dies is started again (up to ``max_restarts``) and resumes
   from the store exactly as a re-run would; an error inside the editor or the evaluation fails the
   trajectory, with its reason in ``trajectories.reason``.

What else drives trajectories (``orchestrator/tuning.py``: a Tune trial is one trajectory) uses the
same steps without a whole ``Driver``: ``connect`` (the Ray instance), ``plan_trajectories`` (what the
store says is done), ``write_status`` (the trajectory's row) and ``error_reason`` (an error as a reason).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import pandas as pd
import ray
from orchestrator.progress import Progress, resolve_mode
from orchestrator.spec import ActorResources, ExperimentSpec, Resources, SpecError, TrajectorySpec
from orchestrator.status import Status, status_text
from orchestrator.store import TABLES, Store, edit_row, split_examples
from workers import settings
from orchestrator.cluster import CONNECT_TIMEOUT_SECONDS, connect, shutdown
from workers.actors import (CheckpointEvent, EditEvent, EvalActor, EvalGroup, Replica, SaveEvent, TrajectoryActor,
                            TrajectoryTask, evaluator_started, kill_evaluator)
from workers.data import EditRequest, check_lengths, edit_dataset_file, load_edit_dataset
from workers.models import load_tokenizer
from workers.editing.delta import EditLog, check_binding, log_binding, saved_log_metadata, saved_log_steps
from workers.editing.methods import split_method
from workers.evaluation.text_metrics import first_line
from workers.sampling import seeded_disjoint_sample, seeded_sample
from workers.placement import EvaluationGroupPlan, deepspeed_installed, plan_evaluation_group

CLUSTER_CHECK_SECONDS = 60.0  # with no event for this long, check that the cluster still has a live node



def select_requests(pool: list[EditRequest], n_edits: int, selection: str, seed: int) -> list[EditRequest]:
    """``first``: the data set's first ``n_edits`` requests; ``random``: a sample seeded by ``seed``,
    in data-set order; ``disjoint``: the same, but sharing no request with the samples of seeds
    ``0 … seed − 1`` (seed 0's is ``random``'s), for a study replicated over fact samples."""
    if selection == "first":
        return pool[:n_edits]
    if selection == "disjoint":
        return [pool[i] for i in seeded_disjoint_sample(len(pool), n_edits, seed)]
    return [pool[i] for i in seeded_sample(len(pool), n_edits, seed)]


def steps_for(requests: int, batch_size: int) -> int:
    return math.ceil(requests / batch_size)


def on_this_cluster(resources: Resources, cluster_gpus: float) -> Resources:
    """One GPU (or what the spec asks) per actor where the cluster has GPUs, CPU actors otherwise."""
    if cluster_gpus > 0:
        return resources
    return dataclasses.replace(resources, trajectory=dataclasses.replace(resources.trajectory, num_gpus=0.0),
                               evaluation=dataclasses.replace(resources.evaluation, num_gpus=0.0))


def setup_key(trajectory: "Trajectory") -> tuple[str, str]:
    """Trajectories with the same key share their set-up caches (second moments, context templates)."""
    return trajectory.spec.model, split_method(trajectory.spec.method)[0]


@dataclass
class Trajectory:
    """One trajectory of the plan and, while it runs, its actor and buffered rows."""

    spec: TrajectorySpec
    task: TrajectoryTask
    hparams_json: str
    start_step: int = 0
    evaluated: set[int] = field(default_factory=set)
    status: Status = Status.PENDING
    reason: str | None = None  # why it failed, was interrupted or stopped
    restarts: int = 0
    actor: object = None
    generator: object = None
    buffer: list[dict] = field(default_factory=list)
    steps_done: int = 0
    editing_done: bool = False
    setting_up: bool = False  # its actor has not produced its first event yet

    @property
    def trajectory_id(self) -> str:
        return self.spec.trajectory_id

    @property
    def finished(self) -> bool:
        return self.status.finished

    def scored_all(self) -> bool:
        return set(self.spec.checkpoints) <= self.evaluated


@dataclass
class RunResult:
    trajectories: list[Trajectory]
    summary: pd.DataFrame

    @property
    def failed(self) -> list[Trajectory]:
        return [t for t in self.trajectories if t.status == Status.FAILED]

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


def plan_trajectories(spec: ExperimentSpec, store: Store, *, data_root: str | Path | None = None,
                      cache_dir: str | Path | None = None) -> list[Trajectory]:
    """The spec's trajectories with their requests, hyper-parameters and what the store says is done,
    the data read from ``data_root`` (its digests are in the trajectory ids). Raises before any actor
    starts: a data set too small, a saved edit log made from other requests."""
    data_root, cache_dir = str(settings.data_dir(data_root)), str(settings.cache_dir(cache_dir))
    spec = dataclasses.replace(spec, data_root=data_root)
    for table in TABLES:  # every file of the experiment, not only the trajectories' (the report reads them all)
        store.read(table, spec.experiment)
    pools = {}
    for dataset in spec.datasets:
        pools[dataset] = load_edit_dataset(dataset, data_root)
        if spec.n_edits > len(pools[dataset]):
            raise SpecError(spec.source, "n_edits", f"{spec.n_edits} edits asked for, but {dataset} "
                                                    f"holds {len(pools[dataset])} requests")
        if spec.selection == "disjoint" and (max(spec.seeds) + 1) * spec.n_edits > len(pools[dataset]):
            raise SpecError(spec.source, "seeds", f"disjoint samples of {spec.n_edits} edits for seeds up to "
                                                  f"{max(spec.seeds)} need {(max(spec.seeds) + 1) * spec.n_edits} "
                                                  f"requests, but {dataset} holds {len(pools[dataset])}")
    plan, tokenizers = [], {}
    for one in spec.trajectories():
        requests = select_requests(pools[one.dataset], one.n_edits, one.selection, one.seed)
        if one.model not in tokenizers:
            tokenizers[one.model] = load_tokenizer(one.model)
        check_lengths(requests, *tokenizers[one.model], data_file(one.dataset, data_root))
        res = one.resources.trajectory
        task = TrajectoryTask(
            one.trajectory_id, Replica(one.model, one.dtype, res.num_gpus > 0, max(1, int(res.num_cpus))),
            one.method, one.hparams, tuple(requests),
            one.batch_size, one.edit_checkpoints(), one.seed,
            str(store.log_path(one.experiment, one.trajectory_id)), cache_dir, data_root,
            save_every=math.ceil(spec.save_every / one.batch_size) if spec.save_every else 0)
        trajectory = Trajectory(one, task, json.dumps(one.resolved_hparams, sort_keys=True))
        read_progress(store, trajectory)
        if not trajectory.finished and saved_log_metadata(task.log_path) is not None:
            # Its saved log will be replayed: intact (its content digest), made from these requests?
            check_binding(EditLog.load(task.log_path).metadata, log_binding(requests, one.resolved_hparams),
                          task.log_path)
        plan.append(trajectory)
    return plan


def data_file(dataset: str, data_root: str) -> str:
    """Where a data set's records are read from, as errors name it."""
    file = Path(edit_dataset_file(dataset))
    return str(file if file.is_absolute() or file.exists() else Path(data_root) / file)


def read_progress(store: Store, trajectory: Trajectory) -> None:
    """Where the trajectory stands in the store: completed, or the step to resume from."""
    spec = trajectory.spec
    row = store.trajectory(spec.experiment, spec.trajectory_id)
    trajectory.evaluated = store.evaluated_checkpoints(spec.experiment, spec.trajectory_id)
    edited = store.edit_steps_done(spec.experiment, spec.trajectory_id)
    # "completed" in the trajectories table is a claim; the edit rows (every step, by index) and
    # the evaluation rows (every checkpoint) are the evidence: a file moved aside is redone.
    if (row is not None and row["status"] == Status.COMPLETED and trajectory.scored_all()
            and edited == trajectory.task.n_steps):
        trajectory.status, trajectory.reason, trajectory.editing_done = Status.COMPLETED, None, True
        trajectory.start_step = trajectory.steps_done = trajectory.task.n_steps
        return
    # Where both the saved log and the stored edit rows reach (the rows are written after each save of
    # the log, at a checkpoint or every ``save_every`` steps): a checkpoint, or a save in between.
    reachable = min(edited, saved_log_steps(trajectory.task.log_path))
    trajectory.start_step = trajectory.steps_done = reachable
    trajectory.editing_done = trajectory.start_step >= trajectory.task.n_steps
    trajectory.buffer = []


def write_status(store: Store, trajectory: Trajectory, status: Status, reason: str | None = None) -> None:
    """Set the trajectory's status (and why) and write its row of the trajectories table."""
    trajectory.status, trajectory.reason = status, reason
    spec = trajectory.spec
    store.put_trajectory({
        "experiment": spec.experiment, "trajectory_id": spec.trajectory_id, "model": spec.model,
        "method": spec.method, "variant": spec.variant.name, "group": spec.variant.group,
        "dataset": spec.dataset, "seed": spec.seed, "n_edits": spec.n_edits, "batch_size": spec.batch_size,
        "hparams": trajectory.hparams_json, "config": json.dumps(spec.config(), sort_keys=True, default=str),
        "status": status.value, "reason": reason, "edits_done": trajectory.task.requests_after(
            store.edit_steps_done(spec.experiment, spec.trajectory_id)),
        "updated_at": datetime.now(timezone.utc)})


class Driver:
    def __init__(self, spec: ExperimentSpec, store: Store, *, address: str | None = None,
                 progress: bool | str | Progress = True, data_root: str | Path | None = None,
                 cache_dir: str | Path | None = None,
                 observer: Callable[[str, Trajectory, object], None] | None = None,
                 take_lock: bool = True, connect_timeout: float = CONNECT_TIMEOUT_SECONDS,
                 grow_evaluators: bool = True):
        """``progress``: a ``Progress``, or its mode (True = ``auto``: bars on a terminal, plain lines
        otherwise; False = none). ``take_lock``: hold the store's experiment lock while running; a Tune
        trial passes False, because its controller holds the lock for all the search's trials, which run
        side by side as distinct trajectories of one experiment. ``grow_evaluators``: add evaluators
        into the CPUs (and GPUs) no trajectory needs any more while checkpoints wait to be scored; a
        Tune trial passes False (its actors live in the trial's placement group, which has no room)."""
        self.data_root = str(settings.data_dir(data_root))
        # The data digests in the trajectory ids are taken from the directory this run reads.
        self.spec = dataclasses.replace(spec, data_root=self.data_root)
        self.store, self.address = store, address
        self.progress = progress if isinstance(progress, Progress) else Progress(resolve_mode(progress))
        self.cache_dir = str(settings.cache_dir(cache_dir))
        self.observer = observer or (lambda kind, trajectory, event: None)
        self.resources = spec.resources  # as the spec asks; adapted to the cluster when the run starts
        self.take_lock = take_lock
        self.connect_timeout = connect_timeout  # seconds to join the cluster at ``address``
        self.grow_evaluators = grow_evaluators

    # ---- plan -----------------------------------------------------------------------------------

    def plan(self) -> list[Trajectory]:
        """The trajectories with their requests, hyper-parameters and what the store says is done."""
        return plan_trajectories(self.spec, self.store, data_root=self.data_root, cache_dir=self.cache_dir)

    def scorable_now(self, trajectory: Trajectory) -> list[int]:
        """Checkpoints not yet scored that the saved log (or the base model, at 0) already covers."""
        covered = trajectory.task.requests_after(trajectory.start_step)
        return [c for c in trajectory.spec.checkpoints if c <= covered and c not in trajectory.evaluated]

    # ---- run ------------------------------------------------------------------------------------

    def run(self) -> RunResult:
        plan = self.plan()  # raises before any actor starts
        todo = [t for t in plan if not t.finished]
        if todo and self.take_lock:
            with self.store.lock(self.spec.experiment):  # StoreError when another run holds it
                # Planned again under the lock: a run that held it until a moment ago may have done
                # the work this plan saw undone; redoing it from a stale plan would rewrite its files.
                plan = self.plan()
                todo = [t for t in plan if not t.finished]
                if todo:
                    self._run_todo(todo)
        elif todo:
            self._run_todo(todo)
        return RunResult(plan, summary_table(self.store, plan))

    def _run_todo(self, todo: list[Trajectory]) -> None:
        started_ray = connect(self.address, self.connect_timeout)
        try:
            self._execute(todo)
            for trajectory in todo:  # every trajectory ends completed or failed; say so if not
                if not trajectory.finished:
                    self._fail(trajectory, "the driver ran out of work before it finished")
        except (KeyboardInterrupt, SystemExit) as exc:
            # Stopped from outside (Ctrl-C, a Tune scheduler): not a failure; a re-run resumes.
            for trajectory in todo:
                if not trajectory.finished:
                    write_status(self.store, trajectory, Status.INTERRUPTED, type(exc).__name__)
            raise
        except Exception as exc:
            for trajectory in todo:
                if not trajectory.finished:
                    self._fail(trajectory, f"the driver stopped: {type(exc).__name__}: {error_reason(exc)}")
            raise
        finally:
            if started_ray:
                shutdown()

    def _max_parallel(self, queued: int) -> int:
        resources = self.resources
        if resources.max_parallel_trajectories:
            return resources.max_parallel_trajectories
        total = ray.cluster_resources()
        pool = resources.eval_actors
        limits = []
        for name, key in (("num_cpus", "CPU"), ("num_gpus", "GPU")):
            need = getattr(resources.trajectory, name)
            if need <= 0:
                continue
            free = total.get(key, 0.0) - pool * getattr(resources.evaluation, name)
            if free < need and not self.address:
                raise RuntimeError(f"this machine has {total.get(key, 0):g} {key}; the spec asks {need:g} per "
                                   f"trajectory actor and {getattr(resources.evaluation, name):g} × {pool} for the "
                                   "evaluation pool (resources in the spec)")
            limits.append(int(free // need) if free >= need else 1)
        return max(1, min([queued, *limits]))

    def _execute(self, todo: list[Trajectory]) -> None:
        gpus = ray.cluster_resources().get("GPU", 0.0)
        # A cluster we joined may add GPU nodes on demand; a local one has what it has.
        self.resources = self.spec.resources if self.address else on_this_cluster(self.spec.resources, gpus)
        if self.resources != self.spec.resources:
            self.progress.message("no GPU on this machine: the spec's GPU actors run on CPU")
        resources = self.resources
        group = plan_evaluation_group(resources.eval_engine, resources.eval_ranks, resources.evaluation.num_gpus,
                                      math.inf if self.address else gpus, deepspeed_installed())
        if group.reason:
            self.progress.message(group.reason)
        pool = EvalPool(self.spec, self.resources, self.cache_dir, self.data_root, group)
        self.progress.open([(t.trajectory_id, t.spec.label, t.task.n_steps, t.start_step) for t in todo])
        for trajectory in todo:
            write_status(self.store, trajectory, Status.PENDING)
            for checkpoint in self.scorable_now(trajectory):
                pool.submit(trajectory, checkpoint)
        queue = [t for t in todo if not t.editing_done]
        for trajectory in todo:
            self._maybe_complete(trajectory)
        parallel = self._max_parallel(len(queue)) if queue else 0
        running: dict[object, Trajectory] = {}
        warmed: set[tuple[str, str]] = set()
        quiet_since = time.monotonic()
        try:
            while queue or running or pool.outstanding:
                while queue and len(running) < parallel:
                    trajectory = self._next_startable(queue, running.values(), warmed)
                    if trajectory is None:
                        break
                    queue.remove(trajectory)
                    if not trajectory.finished:
                        self._start(trajectory)
                        running[trajectory.generator] = trajectory
                if self.grow_evaluators:
                    self._grow(pool, min(len(queue) + len(running), parallel))
                waitables = list(running) + list(pool.pending) + list(pool.starting)
                ready, _ = ray.wait(waitables, num_returns=1, timeout=1.0)
                quiet_since = quiet_since if not ready else time.monotonic()
                if time.monotonic() - quiet_since > CLUSTER_CHECK_SECONDS:
                    quiet_since = time.monotonic()
                    if not any(node.get("Alive") for node in ray.nodes()):
                        raise RuntimeError("the Ray cluster has no live node left (was it stopped?)")
                for obj in ready:
                    if obj in pool.starting:
                        pool.started(obj)
                    elif obj in pool.pending:
                        trajectory, checkpoint, rows, error = pool.collect(obj)
                        self._scored(trajectory, checkpoint, rows, error)
                    else:
                        trajectory = running[obj]
                        outcome = self._advance(trajectory, pool)
                        if trajectory.setting_up and outcome == "running":
                            warmed.add(setup_key(trajectory))
                        trajectory.setting_up = False
                        if outcome == "restart":
                            queue.insert(0, trajectory)
                # Trajectories whose actor finished, died or was released because they failed.
                running = {g: t for g, t in running.items() if t.generator is g}
        finally:
            pool.close()
            self.progress.close()

    def _grow(self, pool: "EvalPool", trajectories: int) -> None:
        """Grow the evaluation pool into what ``trajectories`` actors (those running and those that will
        start) leave free of the cluster's CPUs and GPUs, while checkpoints wait for an evaluator."""
        if not pool.waiting:
            return
        total, unit = ray.cluster_resources(), pool.grown_resources
        count = len(pool.waiting)
        for name, key in (("num_cpus", "CPU"), ("num_gpus", "GPU")):
            need = getattr(unit, name)
            if need > 0:
                free = (total.get(key, 0.0) - trajectories * getattr(self.resources.trajectory, name)
                        - pool.holding(name))
                count = min(count, int(free / need + 1e-9))
        if count > 0:
            added = pool.grow(count)
            self.progress.message(f"evaluation pool grown to {len(pool.actors)} evaluators "
                                  f"({added} added into freed CPUs)")

    @staticmethod
    def _next_startable(queue: list[Trajectory], running, warmed: set) -> Trajectory | None:
        """The first queued trajectory that does not wait on another's set-up: the first actor of each
        (model, method family) computes the statistics and context templates into the cache; the
        others of that family start once it has, and find them there."""
        busy = {setup_key(t) for t in running if t.setting_up}
        for trajectory in queue:
            key = setup_key(trajectory)
            if key in warmed or key not in busy:
                return trajectory
        return None

    def _start(self, trajectory: Trajectory) -> None:
        res = self.resources.trajectory
        task = dataclasses.replace(trajectory.task, replica=dataclasses.replace(
            trajectory.task.replica, use_accelerator=res.num_gpus > 0))
        trajectory.actor = TrajectoryActor.options(num_cpus=res.num_cpus, num_gpus=res.num_gpus).remote(task)
        # At most one event waits unread: the actor cannot run ahead of what the driver has stored, and
        # an actor that dies leaves at most one event behind it.
        trajectory.generator = trajectory.actor.run.options(_generator_backpressure_num_objects=1).remote(
            trajectory.start_step)
        trajectory.setting_up = True
        trajectory.buffer = []
        write_status(self.store, trajectory, Status.RUNNING)

    def _advance(self, trajectory: Trajectory, pool: "EvalPool") -> str:
        """Take the next event of a running trajectory; say whether it still runs."""
        try:
            event = ray.get(next(trajectory.generator))
        except StopIteration:
            self._release(trajectory)
            trajectory.editing_done = True
            self._maybe_complete(trajectory)
            return "done"
        except ray.exceptions.RayActorError as exc:  # the actor process died (or never started)
            self._release(trajectory)
            if trajectory.restarts < self.spec.max_restarts and "creation task" not in str(exc):
                trajectory.restarts += 1
                read_progress(self.store, trajectory)  # resume as a re-run would: from the store
                self.progress.restarted(trajectory.trajectory_id, trajectory.start_step,
                                        f"actor died; restart {trajectory.restarts} of {self.spec.max_restarts} "
                                        f"from step {trajectory.start_step}")
                for checkpoint in self.scorable_now(trajectory):
                    if not pool.has(trajectory, checkpoint):
                        pool.submit(trajectory, checkpoint)
                return "restart"
            self._fail(trajectory, f"actor died: {error_reason(exc)}")
            return "failed"
        except ray.exceptions.RayTaskError as exc:  # an exception inside the editor
            self._release(trajectory)
            self._fail(trajectory, _reason(exc))
            return "failed"
        if isinstance(event, EditEvent):
            trajectory.buffer.append(edit_row(event.record))
            trajectory.steps_done = event.step + 1
            self.progress.edited(trajectory.trajectory_id, trajectory.steps_done)
        elif isinstance(event, (CheckpointEvent, SaveEvent)):  # the log is saved: store the steps so far
            spec = trajectory.spec
            if trajectory.buffer:
                self.store.put_edits(spec.experiment, spec.trajectory_id, trajectory.buffer)
                trajectory.buffer = []
            write_status(self.store, trajectory, Status.RUNNING)
            if (isinstance(event, CheckpointEvent) and event.requests_done not in trajectory.evaluated
                    and not pool.has(trajectory, event.requests_done)):
                pool.submit(trajectory, event.requests_done)
        kind = {EditEvent: "edit", CheckpointEvent: "checkpoint", SaveEvent: "save"}[type(event)]
        self.observer(kind, trajectory, event)
        return "running"

    def _scored(self, trajectory: Trajectory, checkpoint: int, rows: list[dict] | None, error: str | None) -> None:
        spec = trajectory.spec
        if rows is None and error is None:  # its evaluator died (with its node?): scored again by another
            self.progress.message(f"{spec.label}: the evaluation at {checkpoint} edits was lost with its "
                                  "evaluator; it is scored again")
            return
        if error is not None:
            if not trajectory.finished:
                self._release(trajectory)
                self._fail(trajectory, f"evaluation at {checkpoint} edits: {error}")
            return
        self.store.put_checkpoint(spec.experiment, spec.trajectory_id, checkpoint, rows)
        trajectory.evaluated.add(checkpoint)
        self.progress.scored(trajectory.trajectory_id, checkpoint, split_examples(rows)[0])
        self.observer("evaluation", trajectory, checkpoint)
        self._maybe_complete(trajectory)

    def _maybe_complete(self, trajectory: Trajectory) -> None:
        if trajectory.editing_done and trajectory.scored_all() and not trajectory.finished:
            write_status(self.store, trajectory, Status.COMPLETED)
            self.progress.finished(trajectory.trajectory_id, Status.COMPLETED)

    def _release(self, trajectory: Trajectory) -> None:
        if trajectory.actor is not None:
            ray.kill(trajectory.actor)
        trajectory.actor = trajectory.generator = None

    def _fail(self, trajectory: Trajectory, reason: str) -> None:
        write_status(self.store, trajectory, Status.FAILED, reason)
        self.progress.message(f"{trajectory.spec.label}: {status_text(trajectory.status, reason)}")


class EvalPool:
    """The evaluation actors. Checkpoints wait in the pool's own queue, and each actor is given the next
    one as soon as it is free (one evaluation at a time per actor), so an actor added later takes work
    that is already waiting: ``grow`` adds evaluators into CPUs the trajectories no longer need.

    Every evaluator runs the same number of threads and restores the base weights bit for bit after
    each checkpoint, so a checkpoint's scores do not depend on which evaluator scored it, nor when."""

    def __init__(self, spec: ExperimentSpec, resources: Resources, cache_dir: str, data_root: str,
                 group: EvaluationGroupPlan = EvaluationGroupPlan()):
        """``group``: each evaluator is a sharded ``EvalGroup`` of that many ranks, or one ``EvalActor``."""
        self.spec, self.resources, self.cache_dir, self.data_root = spec, resources, cache_dir, data_root
        self.group = group
        self.actors = [self._new_actor() for _ in range(resources.eval_actors)]
        self.held = [resources.evaluation] * len(self.actors)  # what each actor asked Ray for
        self.busy = [False] * len(self.actors)
        # A replacement is given work once it is up (or when no other evaluator is): one that the
        # cluster cannot place (its node's GPUs gone with the node) must not hold a checkpoint for ever.
        self.ready = [True] * len(self.actors)
        self.starting: dict[object, tuple[int, object]] = {}  # readiness ref -> (slot, replacement)
        self.waiting: list[tuple[Trajectory, int, int]] = []  # (trajectory, checkpoint, try), in order
        # ref -> (trajectory, checkpoint, actor slot, the evaluator it went to, try)
        self.pending: dict[object, tuple[Trajectory, int, int, object, int]] = {}

    @property
    def grown_resources(self) -> ActorResources:
        """What an evaluator added by ``grow`` asks for: the pool's own, on at least one whole CPU (it
        runs the same one thread per whole CPU as the others; two single-threaded processes on one core
        score no faster than one, and each costs a start-up and a model's memory)."""
        res = self.resources.evaluation
        return dataclasses.replace(res, num_cpus=float(max(1, math.ceil(res.num_cpus))))

    def _new_actor(self, res: ActorResources | None = None):
        res = res or self.resources.evaluation
        threads = max(1, int(self.resources.evaluation.num_cpus))  # the same in every evaluator of the pool
        if self.group.ranks > 1:
            return EvalGroup(self.group, res.num_cpus, self.cache_dir, self.data_root)
        return EvalActor.options(num_cpus=res.num_cpus, num_gpus=res.num_gpus).remote(
            self.cache_dir, self.data_root, res.num_gpus > 0, threads)

    def holding(self, name: str) -> float:
        """The pool's total of one resource (``num_cpus``, ``num_gpus``)."""
        return sum(getattr(res, name) for res in self.held)

    def grow(self, count: int) -> int:
        """Add up to ``count`` evaluators, no more than there are checkpoints waiting for one; each takes
        the next waiting checkpoint. The number added."""
        count = max(0, min(count, len(self.waiting)))
        for _ in range(count):
            res = self.grown_resources
            self.actors.append(self._new_actor(res))
            self.held.append(res)
            self.busy.append(False)
            self.ready.append(True)
        self._dispatch()
        return count

    @property
    def outstanding(self) -> bool:
        """Evaluations running or waiting."""
        return bool(self.pending or self.waiting)

    def has(self, trajectory: Trajectory, checkpoint: int) -> bool:
        return (any(t is trajectory and c == checkpoint for t, c, *_ in self.pending.values())
                or any(t is trajectory and c == checkpoint for t, c, _ in self.waiting))

    def submit(self, trajectory: Trajectory, checkpoint: int, attempt: int = 0) -> None:
        self.waiting.append((trajectory, checkpoint, attempt))
        self._dispatch()

    def _dispatch(self) -> None:
        """Give the waiting checkpoints, in order, to the free evaluators that are up (to a replacement
        still starting only when no evaluator is up)."""
        any_ready = any(self.ready)
        for index in range(len(self.actors)):
            if not self.waiting:
                return
            if not self.busy[index] and (self.ready[index] or not any_ready):
                self._send(index, *self.waiting.pop(0))

    def started(self, ref) -> None:
        """A replacement evaluator is up (or failed to start: its next evaluation says so): it takes work."""
        index, evaluator = self.starting.pop(ref)
        if self.actors[index] is evaluator:
            self.ready[index] = True
            self._dispatch()

    def _send(self, index: int, trajectory: Trajectory, checkpoint: int, attempt: int) -> None:
        spec, task = trajectory.spec, trajectory.task
        requests = [task.requests[i] for i in spec.evaluated_requests(checkpoint)]
        steps = steps_for(checkpoint, spec.batch_size)
        ref = self.actors[index].evaluate.remote(spec.model, spec.dtype, task.log_path if steps else None, steps,
                                                 requests, spec.evaluation.config)
        self.busy[index] = True
        self.pending[ref] = (trajectory, checkpoint, index, self.actors[index], attempt)

    def collect(self, ref) -> tuple[Trajectory, int, list[dict] | None, str | None]:
        """(trajectory, checkpoint, rows, error); neither rows nor error when the evaluation's actor
        died and the evaluation went to a fresh one."""
        trajectory, checkpoint, index, evaluator, attempt = self.pending.pop(ref)
        try:
            return trajectory, checkpoint, ray.get(ref), None
        except ray.exceptions.RayActorError as exc:
            # Only the evaluation running on a dead evaluator fails with it (the others wait in the
            # pool's queue); it is replaced once, and the evaluation tried again.
            if self.actors[index] is evaluator:
                kill_evaluator(evaluator)
                self.actors[index] = self._new_actor(self.held[index])
                self.ready[index] = False
                self.starting[evaluator_started(self.actors[index])] = (index, self.actors[index])
            if attempt < self.spec.max_restarts:  # an evaluation only reads: running it again is safe
                self.waiting.insert(0, (trajectory, checkpoint, attempt + 1))
                return trajectory, checkpoint, None, None
            return trajectory, checkpoint, None, f"evaluation actor died: {error_reason(exc)}"
        except ray.exceptions.RayTaskError as exc:
            return trajectory, checkpoint, None, _reason(exc)
        finally:  # one evaluation at a time per actor: this slot is free for the next
            self.busy[index] = False
            self._dispatch()

    def close(self) -> None:
        for actor in self.actors:
            kill_evaluator(actor)


# --------------------------------------------------------------------------------------------
# Summary


def summary_table(store: Store, plan: list[Trajectory]) -> pd.DataFrame:
    """One line per trajectory, from the store: edits, seconds per edit, the editing metrics at the
    last checkpoint, the mean retention of the general tasks, and the status."""
    from workers.evaluation.metrics import task_retention

    rows = []
    for trajectory in plan:
        spec = trajectory.spec
        edits = store.frame("edits", spec.experiment, spec.trajectory_id)
        evaluations = store.frame("evaluations", spec.experiment, spec.trajectory_id)
        last = evaluations[evaluations["n_edits"] == evaluations["n_edits"].max()] if len(evaluations) else evaluations

        def value(task: str, metric: str) -> float:
            found = last[(last["task"] == task) & (last["metric"] == metric)]["value"]
            return float(found.iloc[0]) if len(found) else math.nan

        retention = [ratio for _, ratio in task_retention(last).values()]
        done = int(edits["n_requests"].sum()) if len(edits) else 0
        rows.append({"model": spec.model, "method": spec.variant.name, "dataset": Path(spec.dataset).stem,
                     "seed": spec.seed, "edits": f"{done}/{spec.n_edits}",
                     "s/edit": float(edits["seconds_total"].mean()) if len(edits) else math.nan,
                     "reliability": value("edit/toolkit", "reliability"),
                     "generalisation": value("edit/toolkit", "generalisation"),
                     "locality": value("edit/toolkit", "locality"),
                     "retention": sum(retention) / len(retention) if retention else math.nan,
                     "status": status_text(trajectory.status, trajectory.reason)})
    return pd.DataFrame(rows)


def format_summary(summary: pd.DataFrame) -> str:
    return summary.to_string(index=False, float_format=lambda x: f"{x:.3f}", na_rep="–")


def _reason(exc: Exception) -> str:
    cause = getattr(exc, "cause", None)
    if cause is not None:
        return f"{type(cause).__name__}: {error_reason(cause)}"
    return error_reason(exc)


def error_reason(exc: BaseException) -> str:
    """An error's first non-blank line (at most 300 characters; its type where it has no text), as a
    status reason."""
    return (first_line(str(exc)) or type(exc).__name__)[:300]
