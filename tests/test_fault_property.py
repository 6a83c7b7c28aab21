"""Issue 12, item 9 — the fault property test: processes killed with SIGKILL at seeded random points of
a run lose no row and duplicate none; the run ends with the tables of an uninterrupted one.

- 8 kill points in 2 runs of 4 trajectories, one per trajectory, every kind of point once in every run: a
  trajectory actor during an edit step, between a checkpoint's last edit and its saved log, between
  the saved log and its event, or the evaluation actor while it scores one of the trajectory's
  checkpoints (``workers.faults``: the actors read the plan named by ``EAC_FAULTS``, set for this
  module's Ray session only). Each run goes on to the end (``max_restarts``) and its tables must
  equal the uninterrupted run's. (Two runs of four, not four runs of five: almost all of a run's time
  is actor start-up, one process per trajectory and per restart, and drawing the four kinds into every
  run keeps each kind struck twice.)
- The driver itself (a subprocess ``eac run``) killed with SIGKILL when a seeded number of store files
  have been written, run again and killed again later, then run to the end: the same tables. It runs
  the first two trajectories only (a trajectory's rows do not depend on the others in the spec), as
  the driver's writes, not the number of trajectories, are what is under test.

Kept small for CI on 2 cores: a tiny model, 4 edits per trajectory, one Ray session for the module.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
import yaml
from pandas.testing import assert_frame_equal

from orchestrator import cli
from orchestrator.cluster import init_loopback_ray
from orchestrator.driver import Driver
from orchestrator.spec import load_spec
from orchestrator.store import Store
from workers.faults import FAULTS_ENV, POINTS

SEEDS = [0, 1, 2, 3]
DRIVER_SEEDS = SEEDS[:2]  # the driver-kill test's spec
SPEC = {
    "experiment": "faults",
    "models": ["tiny-gpt2"],
    "methods": ["rome"],
    "datasets": ["counterfact"],
    "seeds": SEEDS,
    "n_edits": 4,
    "checkpoints": [0, 2, 4],
    # Scoring kept light (one evaluator serves every trajectory): the toolkit's metrics, one window.
    "evaluation": {"tasks": {"wikitext": 1}, "perplexity_window": 64, "perplexity_stride": 64,
                   "edit_metrics": ["toolkit"], "drift_examples": 0, "deviation_norms": False},
    # Fractions of the session's 2 CPUs: three trajectories edit while the evaluator scores.
    "resources": {"trajectory": {"num_cpus": 0.5}, "evaluation": {"num_cpus": 0.5, "actors": 1}},
    "max_restarts": 2,  # one kill per trajectory, and an evaluation it shares with another kill
}
CHECKPOINT_STEPS = (1, 3)  # the edit steps after which 2 and 4 edits are done
N_RUNS = 2
TIMINGS = ["seconds_total", "seconds"]  # wall-clock: the only columns allowed to differ


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    directory = tmp_path_factory.mktemp("faults")
    plan = directory / "plan.json"
    plan.write_text("[]")
    for attempt in range(3):  # Ray waits a fixed 30 s for its raylet: a loaded machine can miss that
        try:
            init_loopback_ray(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
                              runtime_env={"env_vars": {FAULTS_ENV: str(plan)}})
            break
        except Exception as exc:  # Ray raises a bare Exception for the timeout
            if "timed out during startup" not in str(exc) or attempt == 2:
                raise
            ray.shutdown()
    spec_path = directory / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(SPEC))
    yield directory, plan, spec_path
    ray.shutdown()


def tables(store_root, trajectory_ids=None) -> dict:
    """The three tables less their wall-clock columns; only ``trajectory_ids``' rows when given."""
    store = Store(store_root)
    frames = {"trajectories": store.frame("trajectories").drop(columns=["updated_at"]),
              "edits": store.frame("edits").drop(columns=TIMINGS),
              "evaluations": store.frame("evaluations")}
    if trajectory_ids is None:
        return frames
    return {name: frame[frame["trajectory_id"].isin(trajectory_ids)].reset_index(drop=True)
            for name, frame in frames.items()}


def assert_same_tables(expected_root, actual_root, context, trajectory_ids=None) -> None:
    expected, actual = tables(expected_root, trajectory_ids), tables(actual_root)
    assert len(actual["trajectories"]) == len(expected["trajectories"]), context
    for name in expected:
        assert_frame_equal(expected[name], actual[name], check_exact=True, obj=f"{name} ({context})")


@pytest.fixture(scope="module")
def uninterrupted(session):
    directory, _, spec_path = session
    result = Driver(load_spec(spec_path), Store(directory / "store"), progress=False).run()
    assert result.exit_code == 0 and {t.status for t in result.trajectories} == {"completed"}
    edits = Store(directory / "store").frame("edits")
    assert len(edits) == 4 * len(SEEDS)
    return directory / "store", [t.trajectory_id for t in result.trajectories]


def draw_points(rng: random.Random, n: int) -> list[str]:
    """``n`` kill points (n >= 4) that include every kind, in a seeded order."""
    points = list(POINTS) + [rng.choice(POINTS) for _ in range(n - len(POINTS))]
    rng.shuffle(points)
    return points


def draw_fault(rng: random.Random, fault_id: str, trajectory_id: str, point: str) -> dict:
    if point == "edit":
        where = {"step": rng.randrange(SPEC["n_edits"])}
    elif point == "scoring":
        where = {"steps": rng.choice([2, 4])}
    else:
        where = {"step": rng.choice(CHECKPOINT_STEPS)}
    return {"id": fault_id, "point": point, "where": {"trajectory_id": trajectory_id, **where}}


@pytest.mark.parametrize("run", range(N_RUNS))
def test_actors_killed_at_random_points_lose_and_duplicate_no_row(run, session, uninterrupted, tmp_path):
    _, plan, spec_path = session
    expected_root, trajectory_ids = uninterrupted
    rng = random.Random(f"fault-run-{run}")
    points = draw_points(rng, len(trajectory_ids))
    faults = [draw_fault(rng, f"{run}-{i}", tid, point) for i, (tid, point) in enumerate(zip(trajectory_ids, points))]
    assert {f["point"] for f in faults} == set(POINTS)
    plan.write_text(json.dumps(faults))
    fired = Path(f"{plan}.fired")
    for marker in fired.glob("*"):
        marker.unlink()
    try:
        result = Driver(load_spec(spec_path), Store(tmp_path / "store"), progress=False).run()
    finally:
        plan.write_text("[]")
    context = f"faults {json.dumps(faults)}"
    assert sorted(p.name for p in fired.glob("*")) == sorted(f["id"] for f in faults), context  # all struck
    assert result.exit_code == 0, (context, [t.status for t in result.trajectories])
    assert_same_tables(expected_root, tmp_path / "store", context)


def store_files(root: Path) -> int:
    return sum(1 for table in ("edits", "evaluations") for _ in (root / table).rglob("*.parquet"))


def kill_driver_after(spec_path: Path, store_root: Path, kill_after: int) -> None:
    """Run ``eac run`` as a subprocess on this module's Ray session and SIGKILL it once ``kill_after``
    store files exist; wait until Ray has ended its actors (their CPUs are free again)."""
    address = ray.get_runtime_context().gcs_address
    driver = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "run", str(spec_path), "--store",
                               str(store_root), "--address", address, "--no-report", "--no-progress"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while store_files(store_root) < kill_after and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert driver.poll() is None, f"the driver ended before {kill_after} store files were written"
        # Not killed at the deadline instead: a driver that never joined the instance (what a subprocess
        # joining a loopback instance did, waiting for a raylet at the routable address) wrote nothing.
        assert store_files(store_root) >= kill_after, f"{store_files(store_root)} of {kill_after} store files in 240 s"
        os.kill(driver.pid, signal.SIGKILL)
    finally:
        driver.wait()
    assert driver.returncode == -signal.SIGKILL
    # Its actors go with it (Ray ends a dead driver's actors); the next run finds the store as it left it.
    deadline = time.monotonic() + 60
    while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)


def test_a_driver_killed_twice_with_sigkill_and_run_again_gives_the_same_tables(session, uninterrupted, tmp_path,
                                                                               capsys):
    """Killed at a seeded point, resumed and killed again at a later one (a resume of a resume), then
    run to the end. One store, two kill points: half the cost of two separate kill-and-rerun runs."""
    expected_root, trajectory_ids = uninterrupted
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump({**SPEC, "seeds": DRIVER_SEEDS}))
    driver_ids = [t.trajectory_id for t in load_spec(spec_path).trajectories()]
    assert set(driver_ids) < set(trajectory_ids)  # the same trajectories as the full spec's first two
    store_root = tmp_path / "store"
    total = store_files(expected_root) * len(DRIVER_SEEDS) // len(SEEDS)  # every trajectory writes as many
    rng = random.Random("driver")
    first = rng.randint(1, total - 2)
    second = rng.randint(first + 1, total - 1)
    kill_driver_after(spec_path, store_root, first)
    kill_driver_after(spec_path, store_root, second)
    assert cli.main(["run", str(spec_path), "--store", str(store_root), "--no-report", "--no-progress"]) == 0
    capsys.readouterr()
    assert_same_tables(expected_root, store_root, f"driver killed after {first} and {second} of {total} store files",
                       trajectory_ids=driver_ids)


def test_one_dead_evaluator_is_replaced_once_whatever_it_had_queued(monkeypatch):
    """When the evaluation actor dies, every evaluation queued on it fails. Replacing the actor once per
    failed evaluation killed the replacement the first one had been resubmitted to, and so on, until the
    evaluations ran out of tries and failed their trajectories (what the property test's evaluator kills
    meet whenever more than one checkpoint waits to be scored)."""
    from orchestrator import driver as driver_module
    from orchestrator.driver import EvalPool
    from orchestrator.spec import spec_from_dict

    class Actor:
        def __init__(self):
            self.alive, self.evaluate = True, self
            self.__ray_ready__ = type("Started", (), {"remote": staticmethod(lambda: ("started", self))})

        def remote(self, *args):
            return (self, len(calls.append(self) or calls))

    def get(ref):
        if not ref[0].alive:
            raise ray.exceptions.RayActorError()
        return [{"task": "t", "metric": "m", "value": 1.0, "n_examples": 1}]

    calls: list[Actor] = []
    monkeypatch.setattr(driver_module.EvalActor, "options", lambda **kw: type("Factory", (), {
        "remote": staticmethod(lambda *a: Actor())}))
    monkeypatch.setattr(driver_module.ray, "get", get)
    monkeypatch.setattr(driver_module.ray, "kill", lambda actor: setattr(actor, "alive", False))
    spec = spec_from_dict({**SPEC, "seeds": [0]}, check_data=False)
    pool = EvalPool(spec, spec.resources, "cache", "data")
    task = type("Task", (), {"requests": list(range(SPEC["n_edits"])), "log_path": "x"})
    trajectories = [type("T", (), {"spec": t, "task": task}) for t in spec.trajectories()]
    for checkpoint in (0, 2, 4):
        pool.submit(trajectories[0], checkpoint)
    pool.actors[0].alive = False  # killed while scoring the first, the others waiting in the pool
    outcomes = []
    while pool.outstanding:
        outcomes.append(pool.collect(next(iter(pool.pending))))
    assert [error for *_, error in outcomes] == [None] * 4  # one lost, rescored with the two waiting; no failure
    assert sorted(checkpoint for _, checkpoint, rows, _ in outcomes if rows) == [0, 2, 4]
    assert len({id(actor) for actor in calls}) == 2  # the dead actor and one replacement
