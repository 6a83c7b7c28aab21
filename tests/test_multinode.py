"""Issue 32, item 2: a multi-node Ray cluster on one machine (``ray.cluster_utils.Cluster``, as Ray's own
tests do), with a worker node taken away mid-run.

The cluster: a head that runs only the driver (``num_cpus=0``, as Ray advises for a head) and two worker
nodes of 2 CPUs and one (fake) GPU each. The spec asks one GPU per evaluator and two evaluators, so
Ray puts one evaluator on each worker node; the two trajectories (one CPU each) fill the CPU left on
each. The evaluators' replicas go through the GPU placement code and, CUDA being absent, run on the
CPU. The store is a shared path for the uninterrupted run and the S3 test server for the other.

The node loss is made to happen at a known moment with pausing faults (``workers.faults``): both
trajectories stop right after their checkpoint at 2 edits is saved, and both evaluators stop inside the
scoring of a checkpoint at 2 edits. Then worker node B goes (``Cluster.remove_node``, SIGKILL to every
process of the node): its trajectory resumes on node A from its last saved log once A's own trajectory
is done, the evaluation it was scoring is redone by A's evaluator, and B's evaluator, whose
replacement no node can hold (no GPU is left), holds no work. The tables equal the uninterrupted run's.

One cluster for the module; 147 s at moderate load, up to 260 s under heavy load (most of it actor start-up).
"""

from __future__ import annotations

import _thread
import json
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest
import ray
import yaml
from pandas.testing import assert_frame_equal
from ray.cluster_utils import Cluster
from test_driver import tables
from test_store_s3 import s3  # noqa: F401  (the S3 test server, a fixture)

from orchestrator.cluster import loopback_node
from orchestrator.driver import Driver
from orchestrator.progress import Progress
from orchestrator.spec import load_spec
from orchestrator.store import Store
from workers.faults import FAULTS_ENV

SPEC = {
    "experiment": "multinode", "models": ["tiny-gpt2"], "methods": ["rome", "memit"], "datasets": ["counterfact"],
    "seeds": [3], "n_edits": 4, "checkpoints": [0, 2, 4], "selection": "first",
    "evaluation": {"tasks": {"nli": 2}, "edit_metrics": ["counterfact"], "drift_examples": 0},
    "resources": {"trajectory": {"num_cpus": 1}, "evaluation": {"num_cpus": 1, "num_gpus": 1, "actors": 2}},
    "max_restarts": 2,
}
# The GCS declares a silent node dead after period × threshold (Ray's defaults: about 30 s).
HEALTH_CHECK = {"health_check_period_ms": 1000, "health_check_timeout_ms": 2000, "health_check_failure_threshold": 5}
RUN_LIMIT_SECONDS = 420  # a run still going after this is stuck (a checkpoint held by an evaluator that never starts)


@pytest.fixture(scope="module")
def cluster(s3, data_root, tmp_path_factory):  # noqa: F811
    directory = tmp_path_factory.mktemp("multinode")
    plan = directory / "faults.json"
    plan.write_text("[]")
    # Ray's sockets live under its temp dir, whose path must stay short (pytest's tmp_path is too deep).
    ray_tmp = tempfile.mkdtemp(prefix="eac-ray-", dir="/tmp")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(FAULTS_ENV, str(plan))  # every node's processes inherit it (and the S3 credentials)
        # The cluster's address file (ray_current_cluster) in our temp dir, not /tmp/ray: there, any
        # `ray.init()` on the machine without an address would join this cluster.
        patch.setenv("RAY_TMPDIR", ray_tmp)
        (Path(ray_tmp) / "ray").mkdir()
        with loopback_node():
            nodes = Cluster(initialize_head=True, head_node_args={
                "num_cpus": 0, "temp_dir": ray_tmp, "include_dashboard": False, "_system_config": HEALTH_CHECK})
            workers = [nodes.add_node(num_cpus=2, num_gpus=1) for _ in range(2)]
            nodes.wait_for_nodes()
            ray.init(address=nodes.address, logging_level="ERROR", log_to_driver=False)
        try:
            (directory / "spec.yaml").write_text(yaml.safe_dump(SPEC))
            yield nodes, workers, directory, plan
        finally:
            ray.shutdown()
            nodes.shutdown()
            shutil.rmtree(ray_tmp, ignore_errors=True)


def actors_by_class() -> dict[str, list[dict]]:
    """Every actor of this job, from the GCS's actor table: class name -> [{node, pid, state}]."""
    found: dict[str, list[dict]] = {}
    for actor in ray._private.state.actors().values():
        found.setdefault(actor["ActorClassName"], []).append(
            {"node": actor["Address"]["NodeID"], "pid": actor["Pid"], "state": actor["State"]})
    return found


def node_of(pid: int) -> str:
    return next(a["node"] for kind in actors_by_class().values() for a in kind if a["pid"] == pid)


@pytest.fixture(scope="module")
def uninterrupted(cluster):
    nodes, workers, directory, _ = cluster
    result = Driver(load_spec(directory / "spec.yaml"), Store(directory / "store"), address=nodes.address,
                    progress=False).run()
    assert result.exit_code == 0 and {t.status for t in result.trajectories} == {"completed"}
    return directory / "store", result, actors_by_class()


def test_trajectories_and_evaluators_spread_over_the_worker_nodes(cluster, uninterrupted):
    nodes, workers, _, _ = cluster
    _, _, actors = uninterrupted
    worker_ids = sorted(node.node_id for node in workers)
    # One GPU per evaluator: one on each worker node (CPU alone would let both land on one); the
    # trajectories on the CPU left beside them; nothing on the head.
    assert sorted(a["node"] for a in actors["EvalActor"]) == worker_ids
    assert sorted(a["node"] for a in actors["TrajectoryActor"]) == worker_ids


def test_a_node_lost_mid_run_loses_no_work_and_the_tables_equal_the_uninterrupted_run(cluster, uninterrupted,
                                                                                      s3, capsys):  # noqa: F811
    nodes, workers, directory, plan = cluster
    expected_store, reference, _ = uninterrupted
    uri, _ = s3
    ids = [t.trajectory_id for t in reference.trajectories]
    faults = [{"id": f"{kind}-{tid}", "point": point, "where": {"trajectory_id": tid, where: 2}, "action": "pause"}
              for tid in ids for kind, point, where in (("edit", "edit", "step"), ("score", "scoring", "steps"))]
    plan.write_text(json.dumps(faults))
    fired = Path(f"{plan}.fired")
    node_a, node_b = workers
    seen: dict = {}

    def paused() -> dict[str, int] | None:
        """fault id -> pid of the paused process, once all four have paused."""
        pids = {p.name: p.read_text() for p in fired.glob("*") if not p.name.endswith(".release")}
        return {name: int(pid) for name, pid in pids.items()} if len(pids) == 4 and all(pids.values()) else None

    def release(fault_id: str) -> None:
        (fired / f"{fault_id}.release").touch()

    def take_node_b() -> None:
        while (pids := paused()) is None:
            if seen.get("done"):
                return
            time.sleep(0.2)
        seen["paused_on"] = {name: node_of(pid) for name, pid in pids.items()}
        nodes.remove_node(node_b, allow_graceful=False)
        seen["removed_at"] = time.monotonic()
        for name, node in seen["paused_on"].items():  # A's trajectory goes on; A's evaluator stays paused
            if name.startswith("edit-") and node == node_a.node_id:
                release(name)

    def observer(kind, trajectory, event) -> None:
        if trajectory.restarts and kind == "edit":
            seen.setdefault("resumed", []).append((trajectory.trajectory_id, event.step,
                                                   actor_node(trajectory.actor)))
            for name, node in seen.get("paused_on", {}).items():  # the restarted trajectory is up: free A's evaluator
                if name.startswith("score-") and node == node_a.node_id:
                    release(name)

    def actor_node(actor) -> str:
        return ray._private.state.actors(actor._actor_id.hex())["Address"]["NodeID"]

    def watchdog() -> None:
        if not finished.wait(RUN_LIMIT_SECONDS):
            _thread.interrupt_main()

    finished = threading.Event()
    threading.Thread(target=take_node_b, daemon=True).start()
    threading.Thread(target=watchdog, daemon=True).start()
    try:
        result = Driver(load_spec(directory / "spec.yaml"), Store(uri("multinode")), address=nodes.address,
                        progress=Progress("lines"), observer=observer).run()
    except KeyboardInterrupt:
        pytest.fail(f"the run was still going {RUN_LIMIT_SECONDS} s after it started: {seen}")
    finally:
        finished.set()
        seen["done"] = True
    out = capsys.readouterr().out

    # The premise: node B held one paused trajectory and one evaluator paused inside a scoring.
    on_b = sorted(name.split("-")[0] for name, node in seen["paused_on"].items() if node == node_b.node_id)
    assert on_b == ["edit", "score"], seen["paused_on"]
    assert result.exit_code == 0 and {t.status for t in result.trajectories} == {"completed"}
    lost = [t for t in result.trajectories if t.restarts]
    assert len(lost) == 1 and f"{lost[0].spec.label}: actor died; restart 1 of 2 from step 2" in out
    # Resumed on node A from its saved log (steps 2 and 3 edited again, 0 and 1 replayed).
    assert [(step, node) for _, step, node in seen["resumed"]] == [(2, node_a.node_id), (3, node_a.node_id)]
    assert "edits was lost with its evaluator; it is scored again" in out
    expected, actual = tables(expected_store), tables(uri("multinode"))
    for name in expected:
        assert_frame_equal(expected[name], actual[name], check_exact=True, obj=name)
