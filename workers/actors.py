"""The Ray actors — the only module in workers/ that knows about Ray — as thin shells around two plain
classes that are usable and testable without it:

- ``TrajectoryRunner`` holds one model replica and one editor. ``run(start_step)`` applies a
  trajectory's requests in order and yields one ``EditEvent`` per edit step; at every checkpoint it
  saves the edit log (safetensors, atomically) and yields a ``CheckpointEvent`` (every ``save_every``
  steps between checkpoints it saves the log too and yields a ``SaveEvent``). A fresh runner given
  ``start_step`` replays the saved log's first steps onto the base model and goes on from there —
  that is how a trajectory whose actor died resumes.
- ``CheckpointEvaluator`` holds a base model and scores "base + the log's first steps" with
  ``workers.evaluation.evaluate_checkpoint``; the unedited model's predictions are cached on disk and
  shared by every evaluator on the machine.
- ``EvalGroup``: a sharded evaluation replica, one ``EvalRank`` actor per rank of a tensor-parallel
  group (``workers.sharded``), placed together; used like one ``EvalActor``.

Every edit step runs under its own seed, derived from the trajectory's seed and the step index, so a
resumed trajectory makes exactly the edits an uninterrupted one makes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence
from urllib.parse import urlsplit

import ray
import torch

from workers.data import EditRequest
from workers.editing import EditLog, Editor
from workers.editing.delta import check_binding, check_requests, log_binding, log_prefix
from workers.faults import fault_point
from workers.fields import identity
from workers.memory import release_free_heap
from workers.models import load_model, weights_fingerprint
from workers.placement import EvaluationGroupPlan

if TYPE_CHECKING:  # the evaluation package loads when the first checkpoint is scored
    from workers.evaluation import EvalConfig


@dataclass(frozen=True)
class Replica:
    """Which model to load and where: ``dtype`` by name, onto the accelerator when the actor has one."""

    model: str
    dtype: str = "float32"
    use_accelerator: bool = False
    num_threads: int = 1


@dataclass(frozen=True)
class TrajectoryTask:
    """Everything a trajectory actor needs, as plain data: ``hparams`` are the typed hyper-parameters
    resolved with the spec (the ones its trajectory id hashes); the actor reads no YAML of its own."""

    trajectory_id: str
    replica: Replica
    method: str
    hparams: object
    requests: tuple[EditRequest, ...]
    batch_size: int
    checkpoints: tuple[int, ...]  # numbers of requests edited after which the log is saved and scored
    seed: int
    log_path: str
    cache_dir: str
    data_root: str
    save_every: int = 0  # edit steps between saves of the log besides the checkpoints' (0: none)

    @property
    def n_steps(self) -> int:
        return math.ceil(len(self.requests) / self.batch_size)

    def requests_after(self, steps: int) -> int:
        return min(steps * self.batch_size, len(self.requests))


@dataclass(frozen=True)
class EditEvent:
    step: int
    record: dict  # the editor's EditRecord as a dict, ``edit_index`` = step


@dataclass(frozen=True)
class CheckpointEvent:
    requests_done: int
    steps_done: int
    log_path: str


@dataclass(frozen=True)
class SaveEvent:
    """The log was saved after ``steps_done`` steps between checkpoints: the steps so far can be stored."""

    steps_done: int


def step_seed(seed: int, step: int) -> int:
    """A seed per (trajectory seed, step), independent of everything that ran before the step."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{step}".encode()).digest()[:4], "little")


def load_replica(replica: Replica, role: str = "trajectory"):
    """The model on CPU, or on the actor's accelerators: one, or several for one replica (layers spread
    over them); ``workers.placement`` decides from what the process sees and what ``role`` may use."""
    torch.set_num_threads(max(1, replica.num_threads))
    model, tokenizer = load_model(replica.model, dtype=getattr(torch, replica.dtype))
    if replica.use_accelerator:
        from workers.placement import place_model, plan_for_actor

        # Ray makes exactly the actor's GPUs visible to its process: all of them hold this replica.
        model = place_model(model, plan_for_actor(role, torch.accelerator.device_count()))
    return model, tokenizer


class TrajectoryRunner:
    def __init__(self, task: TrajectoryTask):
        self.task = task
        self.model, self.tokenizer = load_replica(task.replica)
        # Statistics, context templates and the base weights' fingerprint are computed here, on the
        # base weights, before any edit; the log binding reuses the editor's fingerprint (one hash).
        self.editor = Editor(self.model, self.tokenizer, task.method, task.hparams, cache_dir=task.cache_dir,
                             data_root=task.data_root)
        self.binding = log_binding(task.requests, identity(task.hparams), self.editor.ctx.base_fingerprint)

    def run(self, start_step: int = 0) -> Iterator[EditEvent | CheckpointEvent | SaveEvent]:
        task = self.task
        delta_steps: list[int] = []
        if start_step:
            saved = EditLog.load(task.log_path)
            check_binding(saved.metadata, self.binding, task.log_path)
            resumed = log_prefix(saved, start_step)
            delta_steps = list(saved.metadata["delta_steps"][: len(resumed)])
            self.editor.resume(resumed)
        for step in range(start_step, task.n_steps):
            batch = list(task.requests[step * task.batch_size:(step + 1) * task.batch_size])
            torch.manual_seed(step_seed(task.seed, step))
            record = self.editor.edit_step(batch)
            record.edit_index = step
            if not record.skipped:
                delta_steps.append(step)
            fault_point("edit", trajectory_id=task.trajectory_id, step=step)  # off unless a test sets a plan
            yield EditEvent(step, dataclasses.asdict(record))
            done = task.requests_after(step + 1)
            if done in task.checkpoints:
                fault_point("checkpoint-save", trajectory_id=task.trajectory_id, step=step)
                self._save(step + 1, done, delta_steps)
                fault_point("checkpoint-event", trajectory_id=task.trajectory_id, step=step)
                yield CheckpointEvent(done, step + 1, task.log_path)
            elif task.save_every and (step + 1) % task.save_every == 0:  # the last step is a checkpoint
                self._save(step + 1, done, delta_steps)
                yield SaveEvent(step + 1)

    def _save(self, steps_done: int, requests_done: int, delta_steps: list[int]) -> None:
        """The edit log so far, with what a resumed run checks it against (atomically: a crash mid-save
        leaves the previous save)."""
        log = self.editor.log
        log.metadata.update({"trajectory_id": self.task.trajectory_id, "steps_done": steps_done,
                             "requests_done": requests_done, "delta_steps": list(delta_steps),
                             "binding": self.binding})
        log.save(self.task.log_path)


class CheckpointEvaluator:
    """Scores checkpoints of any trajectory on one base model at a time (the last one asked for)."""

    def __init__(self, cache_dir: str, data_root: str, *, use_accelerator: bool = False, num_threads: int = 1,
                 scorer_factory=None):
        """``scorer_factory``: makes the scorer (``evaluate_checkpoint``'s) of each base model loaded;
        a tensor-parallel rank's keeps its reference predictions in memory (see ``workers.sharded``)."""
        from workers.evaluation import ReferenceCache

        self.data_root, self.use_accelerator, self.num_threads = data_root, use_accelerator, num_threads
        self.scorer_factory = scorer_factory
        self.reference = ReferenceCache(None if scorer_factory else Path(cache_dir) / "reference")
        self._replica: tuple[Replica, object, object, str, str, object] | None = None
        self._suites: dict[str, object] = {}

    def _base(self, replica: Replica):
        from workers.evaluation import model_key

        if self._replica is None or self._replica[0] != replica:
            self._replica, self._suites = None, {}  # one base model in memory at a time
            model, tokenizer = load_replica(replica, role="evaluation")
            scorer = self.scorer_factory() if self.scorer_factory else None
            fingerprint = weights_fingerprint(model)  # hashed once per load: the cache key and the log check
            self._replica = (replica, model, tokenizer, model_key(model, tokenizer, fingerprint=fingerprint),
                             fingerprint, scorer)
        return self._replica[1:]

    def evaluate(self, model: str, dtype: str, log_path: str | None, steps: int,
                 requests: Sequence[EditRequest], config: EvalConfig) -> list[dict]:
        """Rows (``MetricRow`` as dicts, each with its ``examples``) for base ``model`` + the first ``steps``
        steps of the log, scored as ``config`` (the spec's, typed once when it was loaded) says; no
        progress bars in an actor."""
        from workers.evaluation import TaskSuite, evaluate_checkpoint
        from workers.models import context_length

        replica = Replica(model, dtype, self.use_accelerator, self.num_threads)
        base, tokenizer, base_key, fingerprint, scorer = self._base(replica)
        if config.progress:
            config = dataclasses.replace(config, progress=False)
        # Samples and perplexity windows depend on the tokenizer and context: keyed by model too.
        digest = (base_key, config.digest())
        if digest not in self._suites:
            self._suites[digest] = TaskSuite.load(tokenizer, config, self.data_root,
                                                  context_length=context_length(base))
        log = EditLog()
        if steps:
            saved = EditLog.load(log_path)
            check_binding(saved.metadata, {"base_fingerprint": fingerprint}, log_path)
            check_requests(saved.metadata, requests, log_path)
            log = log_prefix(saved, steps)
        # The log's name is its trajectory's id, also in a store URI (s3://bucket/.../<id>.safetensors?options).
        fault_point("scoring", trajectory_id=Path(urlsplit(log_path).path).stem if log_path else None, steps=steps)
        rows = evaluate_checkpoint(base, tokenizer, log, list(requests), config, reference=self.reference,
                                   tasks=self._suites[digest], base_key=base_key, data_root=self.data_root,
                                   scorer=scorer)
        release_free_heap()  # a long-lived evaluator's resident set must not grow checkpoint by checkpoint
        # Each aggregate row with its per-example values (``Store.put_checkpoint`` splits them).
        return [{**row.as_dict(), "examples": [example.as_dict() for example in row.examples]} for row in rows]


@ray.remote
class TrajectoryActor:
    """One model replica editing one trajectory; ``run`` streams its events."""

    def __init__(self, task: TrajectoryTask):
        self.runner = TrajectoryRunner(task)

    def run(self, start_step: int = 0):
        yield from self.runner.run(start_step)


@ray.remote
class EvalActor:
    """One of the evaluation pool: scores checkpoints while the trajectories go on editing."""

    def __init__(self, cache_dir: str, data_root: str, use_accelerator: bool = False, num_threads: int = 1):
        self.evaluator = CheckpointEvaluator(cache_dir, data_root, use_accelerator=use_accelerator,
                                             num_threads=num_threads)

    def evaluate(self, model: str, dtype: str, log_path: str | None, steps: int, requests, config: EvalConfig):
        return self.evaluator.evaluate(model, dtype, log_path, steps, requests, config)


@ray.remote
class EvalRank:
    """One rank of a sharded evaluation replica (``workers.sharded``): the base model whole on CPU,
    the forward passes on its shard of a sharded copy; rank 0's ``evaluate`` returns the rows."""

    def __init__(self, cache_dir: str, data_root: str, rank: int, ranks: int, sharding: str,
                 use_accelerator: bool, num_threads: int):
        from workers.sharded import TensorParallelScorer

        # Ray shows each rank its own GPU only: it is device 0 of its process (what DeepSpeed reads).
        os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(ranks), "LOCAL_RANK": "0"})
        if not use_accelerator:  # DeepSpeed picks its accelerator at import: the CPU one for a CPU rank
            os.environ["DS_ACCELERATOR"] = "cpu"
        self.rank, self.ranks, self.use_accelerator = rank, ranks, use_accelerator
        self.scorers: list[TensorParallelScorer] = []

        def scorer() -> TensorParallelScorer:
            self.scorers.append(TensorParallelScorer(sharding, ranks, use_accelerator))
            return self.scorers[-1]

        self.evaluator = CheckpointEvaluator(cache_dir, data_root, use_accelerator=False, num_threads=num_threads,
                                             scorer_factory=scorer)

    def sharded_layers(self) -> int:
        """Tensor-parallel layers in this rank's sharded copy of its current base model (0: none yet)."""
        return self.scorers[-1].parallel_layers() if self.scorers else 0

    def address(self) -> str:
        from workers.sharded import rendezvous_address

        return rendezvous_address(ray.util.get_node_ip_address())

    def join(self, address: str) -> None:
        from workers.sharded import backend_for, join_group

        host, port = address.rsplit(":", 1)
        os.environ.update({"MASTER_ADDR": host, "MASTER_PORT": port})
        join_group(self.rank, self.ranks, address, backend_for(self.use_accelerator))

    def evaluate(self, model: str, dtype: str, log_path: str | None, steps: int, requests, config: EvalConfig):
        rows = self.evaluator.evaluate(model, dtype, log_path, steps, requests, config)
        return rows if self.rank == 0 else None


class GroupCall:
    """``group.evaluate.remote(...)``: the same call on every rank, in the same order (SPMD); the
    reference to rank 0's result."""

    def __init__(self, ranks: list):
        self.ranks = ranks

    def remote(self, *args):
        return [rank.evaluate.remote(*args) for rank in self.ranks][0]


class EvalGroup:
    """A sharded evaluation replica: ``plan.ranks`` ``EvalRank`` actors in one placement group
    (STRICT_PACK: on one node, where the collectives are fast), each taking its share of ``num_cpus``
    and one GPU (``plan.gpus_per_rank``), joined into one ``torch.distributed`` group whose address
    rank 0 publishes. Called like an ``EvalActor`` (``group.evaluate.remote(...)``). A rank that dies
    or raises alone leaves the others waiting in a collective until ``workers.sharded.COLLECTIVE_TIMEOUT``;
    rank 0's evaluation then fails with the timeout. When rank 0 dies, the pool replaces the whole group."""

    def __init__(self, plan: EvaluationGroupPlan, num_cpus: float, cache_dir: str, data_root: str):
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        cpus = num_cpus / plan.ranks
        bundle = {key: value for key, value in (("CPU", cpus), ("GPU", plan.gpus_per_rank)) if value}
        self.placement_group = placement_group([bundle] * plan.ranks, strategy="STRICT_PACK")
        self.ranks = [EvalRank.options(
            num_cpus=cpus, num_gpus=plan.gpus_per_rank,
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement_group, placement_group_bundle_index=i),
        ).remote(cache_dir, data_root, i, plan.ranks, plan.sharding, plan.gpus_per_rank > 0, max(1, int(cpus)))
            for i in range(plan.ranks)]
        # Queued, not awaited: every rank's calls run in the order they are made, joining first.
        address = self.ranks[0].address.remote()
        self.joined = [rank.join.remote(address) for rank in self.ranks]
        self.evaluate = GroupCall(self.ranks)

    def kill(self) -> None:
        from ray.util.placement_group import remove_placement_group

        for rank in self.ranks:
            ray.kill(rank)
        remove_placement_group(self.placement_group)


def evaluator_started(evaluator):
    """A reference that resolves once an ``EvalActor`` (or every rank of an ``EvalGroup``) is up."""
    if isinstance(evaluator, EvalGroup):
        return evaluator.joined[0]  # rank 0 has joined the group: every rank has started
    return evaluator.__ray_ready__.remote()


def kill_evaluator(evaluator) -> None:
    """Stop an ``EvalActor`` or an ``EvalGroup``."""
    if isinstance(evaluator, EvalGroup):
        evaluator.kill()
    else:
        ray.kill(evaluator)
