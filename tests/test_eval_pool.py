"""The evaluation pool grows into CPUs the trajectories free: behaviour, with stand-in actors (no Ray
instance, no model) — which checkpoints go to which evaluator, and when evaluators are added."""

import pytest
import ray

from orchestrator import driver as driver_module
from orchestrator.driver import Driver, EvalPool
from orchestrator.progress import Progress
from orchestrator.spec import spec_from_dict

SPEC = {"experiment": "pool", "models": ["tiny-gpt2"], "methods": ["rome", "rome-eac", "memit", "memit-eac"],
        "datasets": ["counterfact"], "seeds": [0], "n_edits": 4, "checkpoints": [0, 2, 4],
        # The demo's resources: two trajectories edit at once on two CPUs while one evaluator scores.
        "resources": {"trajectory": {"num_cpus": 0.75}, "evaluation": {"num_cpus": 0.5, "actors": 1}}}


class Started:
    """``actor.__ray_ready__``: the reference that an actor is up."""

    def __init__(self, actor):
        self.actor = actor

    def remote(self):
        return ("started", self.actor)


class FakeActor:
    """An evaluator that records what it was given; its results are ready when the test says so."""

    def __init__(self, options):
        self.options, self.calls, self.evaluate = options, [], self
        self.__ray_ready__ = Started(self)

    def remote(self, *args):
        self.calls.append(args)
        return (self, len(self.calls))


@pytest.fixture
def actors(monkeypatch):
    made: list[FakeActor] = []

    def options(**kw):
        def remote(*args):
            made.append(FakeActor({**kw, "threads": args[-1]}))
            return made[-1]
        return type("Factory", (), {"remote": staticmethod(remote)})

    monkeypatch.setattr(driver_module.EvalActor, "options", options)
    monkeypatch.setattr(driver_module.ray, "get", lambda ref: [{"task": "t", "metric": "m", "value": 1.0}])
    monkeypatch.setattr(driver_module.ray, "kill", lambda actor: None)
    return made


def plan(**changes):
    spec = spec_from_dict({**SPEC, **changes}, check_data=False)
    driver = Driver(spec, store=None, progress=Progress("none"))
    pool = EvalPool(spec, spec.resources, "cache", "data")
    task = type("Task", (), {"requests": list(range(spec.n_edits)), "log_path": "log"})
    trajectories = [type("T", (), {"spec": t, "task": task}) for t in spec.trajectories()]
    return driver, pool, trajectories


def in_flight(pool) -> list[tuple[int, int]]:
    """(evaluator index, checkpoint) of every evaluation running."""
    return sorted((index, checkpoint) for _, checkpoint, index, *_ in pool.pending.values())


def test_an_evaluator_scores_one_checkpoint_at_a_time_the_rest_wait_in_the_pool(actors):
    _, pool, trajectories = plan()
    for checkpoint in (0, 2, 4):
        pool.submit(trajectories[0], checkpoint)
    assert in_flight(pool) == [(0, 0)] and [c for _, c, _ in pool.waiting] == [2, 4]
    pool.collect(next(iter(pool.pending)))
    assert in_flight(pool) == [(0, 2)] and [c for _, c, _ in pool.waiting] == [4]


def test_the_pool_grows_into_cpus_the_trajectories_free_and_new_evaluators_take_waiting_work(actors, monkeypatch):
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    driver, pool, trajectories = plan()
    for trajectory in trajectories[:2]:
        for checkpoint in (0, 2, 4):
            pool.submit(trajectory, checkpoint)
    driver._grow(pool, trajectories=2)  # two trajectories (0.75 each) + the evaluator (0.5): none free
    assert len(pool.actors) == 1
    driver._grow(pool, trajectories=1)  # 0.75 free: less than the whole CPU an added evaluator takes
    assert len(pool.actors) == 1
    driver._grow(pool, trajectories=0)  # editing over: 1.5 CPUs free, one more evaluator
    assert len(pool.actors) == 2 and len(actors) == 2
    assert actors[1].options["num_cpus"] == 1.0 and actors[1].options["threads"] == actors[0].options["threads"] == 1
    assert in_flight(pool) == [(0, 0), (1, 2)]  # the waiting checkpoint went to the new evaluator at once
    driver._grow(pool, trajectories=0)  # 0.5 left: no more
    assert len(pool.actors) == 2
    scored = []
    while pool.outstanding:
        trajectory, checkpoint, rows, error = pool.collect(next(iter(pool.pending)))
        assert error is None and rows
        scored.append((trajectory.spec.method, checkpoint))
    assert sorted(scored) == sorted((t.spec.method, c) for t in trajectories[:2] for c in (0, 2, 4))
    assert {len(a.calls) for a in actors} == {3}  # the six checkpoints shared between the two


def test_a_spec_with_fewer_trajectories_than_cpus_starts_with_the_spare_ones_for_evaluation(actors, monkeypatch):
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0})
    driver, pool, trajectories = plan(methods=["rome"], resources={"trajectory": {"num_cpus": 1},
                                                                       "evaluation": {"num_cpus": 1, "actors": 1}})
    for checkpoint in (0, 2, 4):
        pool.submit(trajectories[0], checkpoint)
    driver._grow(pool, trajectories=1)  # 6 CPUs free, but only two checkpoints wait: two evaluators added
    assert len(pool.actors) == 3 and not pool.waiting
    assert in_flight(pool) == [(0, 0), (1, 2), (2, 4)]


def test_no_growth_when_the_driver_is_told_not_to(actors, monkeypatch):
    """A Tune trial's actors live in its placement group: the driver there does not grow its pool."""
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0})
    spec = spec_from_dict(SPEC, check_data=False)
    assert Driver(spec, store=None, progress=Progress("none")).grow_evaluators
    assert not Driver(spec, store=None, progress=Progress("none"), grow_evaluators=False).grow_evaluators


def test_an_evaluation_on_a_dead_evaluator_goes_to_its_replacement_first(actors, monkeypatch):
    _, pool, trajectories = plan()
    for checkpoint in (0, 2):
        pool.submit(trajectories[0], checkpoint)

    def dead(ref):
        raise ray.exceptions.RayActorError()

    monkeypatch.setattr(driver_module.ray, "get", dead)
    assert pool.collect(next(iter(pool.pending)))[2:] == (None, None)  # handed on, not failed
    assert len(actors) == 2 and in_flight(pool) == [(0, 0)] and actors[1].calls  # the replacement has it
    assert [c for _, c, _ in pool.waiting] == [2]


def test_a_replacement_still_starting_takes_no_work_while_another_evaluator_is_up(actors, monkeypatch):
    """A node lost with its evaluator: the replacement asks for what the node had (its GPU), which no
    node left may hold. Sending it the lost evaluation (as the first free slot) held that checkpoint,
    and the run, for ever (tests/test_multinode.py); it waits in the pool for an evaluator that is up."""
    _, pool, trajectories = plan(resources={"trajectory": {"num_cpus": 0.75},
                                            "evaluation": {"num_cpus": 0.5, "actors": 2}})
    for checkpoint in (0, 2, 4):
        pool.submit(trajectories[0], checkpoint)
    assert in_flight(pool) == [(0, 0), (1, 2)]
    lost = next(ref for ref, (_, checkpoint, *_) in pool.pending.items() if checkpoint == 0)

    def dead(ref):
        raise ray.exceptions.RayActorError()

    monkeypatch.setattr(driver_module.ray, "get", dead)
    assert pool.collect(lost)[2:] == (None, None)  # handed on, not failed
    assert len(actors) == 3 and not actors[2].calls  # the replacement, still starting, has nothing
    assert in_flight(pool) == [(1, 2)] and [c for _, c, _ in pool.waiting] == [0, 4]
    pool.started(next(iter(pool.starting)))  # it is up: it takes the first waiting checkpoint
    assert in_flight(pool) == [(0, 0), (1, 2)] and actors[2].calls and [c for _, c, _ in pool.waiting] == [4]
