"""`eac run` through Ray: a scaled-down demo end to end, resume after a killed actor, determinism, and
bad specs that fail before any actor starts. One local Ray instance (2 CPUs) serves the module."""

import json
from pathlib import Path

import pandas as pd
import pytest
import ray
import yaml
from pandas.testing import assert_frame_equal

from orchestrator import cli
from orchestrator import driver as driver_module
from orchestrator.driver import Driver, on_this_cluster
from orchestrator.spec import load_spec
from orchestrator.store import Store
from workers.actors import saved_log_steps

# The demo scaled down: a tiny model, four sequential edits, two methods, three checkpoints.
SPEC = {
    "experiment": "mini-demo",
    "models": ["tiny-gpt2"],
    "methods": ["rome", "rome-eac"],
    "datasets": ["counterfact"],
    "seeds": [3],
    "n_edits": 4,
    "checkpoints": [0, 2, 4],
    "evaluation": {"tasks": {"wikitext": 2}, "perplexity_window": 64, "perplexity_stride": 64},
    "resources": {"trajectory": {"num_cpus": 1}, "evaluation": {"num_cpus": 1, "actors": 1}},
    "max_restarts": 0,
}
TIMINGS = ["seconds_total", "seconds"]  # wall-clock: the only columns allowed to differ between runs
CONFIGS = Path(__file__).resolve().parent.parent / "experiments" / "configs"


def write_spec(directory, **changes):
    path = directory / "spec.yaml"
    path.write_text(yaml.safe_dump({**SPEC, **changes}))
    return path


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


def run(spec_path, store_root, observer=None):
    return Driver(load_spec(spec_path), Store(store_root), progress=False, observer=observer).run()


def tables(store_root) -> dict[str, pd.DataFrame]:
    store = Store(store_root)
    return {"trajectories": store.frame("trajectories").drop(columns=["updated_at"]),
            "edits": store.frame("edits").drop(columns=TIMINGS),
            "evaluations": store.frame("evaluations")}


@pytest.fixture(scope="module")
def uninterrupted(local_ray, data_root, tmp_path_factory):
    directory = tmp_path_factory.mktemp("uninterrupted")
    result = run(write_spec(directory), directory / "store")
    return directory, result


def test_scaled_down_demo_fills_the_three_tables(uninterrupted):
    directory, result = uninterrupted
    assert result.exit_code == 0 and [t.status for t in result.trajectories] == ["completed", "completed"]
    store = Store(directory / "store")
    trajectories = store.frame("trajectories")
    assert sorted(trajectories["method"]) == ["rome", "rome-eac"]
    assert set(trajectories["edits_done"]) == {4} and set(trajectories["seed"]) == {3}
    eac = trajectories[trajectories["method"] == "rome-eac"].iloc[0]
    assert json.loads(eac["hparams"])["eac"]["gamma_percentile"] > 0  # the full resolved hyper-parameters
    assert json.loads(eac["config"])["checkpoints"] == [0, 2, 4]

    edits = store.frame("edits")
    plan = {t.trajectory_id: t for t in result.trajectories}
    for tid, rows in edits.groupby("trajectory_id"):
        assert rows["edit_index"].tolist() == [0, 1, 2, 3]
        assert rows["case_id"].tolist() == [str(r.case_id) for r in plan[tid].task.requests]
        assert (rows["seconds_total"] > 0).all() and not rows["skipped"].any()
    assert edits.loc[edits["method"] == "rome-eac", "anchors"].gt(0).all()
    assert edits.loc[edits["method"] == "rome", "anchors"].isna().all()

    evaluations = store.frame("evaluations")
    for tid in plan:
        mine = evaluations[evaluations["trajectory_id"] == tid]
        assert set(mine["n_edits"]) == {0, 2, 4}
        reliability = mine[(mine["task"] == "edit/toolkit") & (mine["metric"] == "reliability")]
        assert reliability.set_index("n_edits")["n_examples"].to_dict() == {2: 2, 4: 4}  # every edit so far
        assert set(mine.loc[mine["task"] == "wikitext", "n_edits"]) == {0, 2, 4}
        assert saved_log_steps(store.log_path("mini-demo", tid)) == 4
    assert not evaluations.duplicated(["trajectory_id", "n_edits", "task", "metric"]).any()
    # The tables read as plain Parquet datasets, too.
    assert len(pd.read_parquet(directory / "store" / "edits")) == 8


def test_rerunning_a_completed_spec_starts_no_actor(uninterrupted, monkeypatch):
    directory, _ = uninterrupted
    before = {p: p.stat().st_mtime_ns for p in (directory / "store").rglob("*.parquet")}
    monkeypatch.setattr(driver_module.TrajectoryActor, "options", lambda **kw: pytest.fail("an actor started"))
    result = run(directory / "spec.yaml", directory / "store")
    assert result.exit_code == 0 and {p: p.stat().st_mtime_ns for p in before} == before


def test_same_spec_and_seed_give_identical_metrics(uninterrupted, tmp_path, capsys):
    directory, _ = uninterrupted
    # This time through the command line: summary table, exit code and report as `eac run` gives them.
    assert cli.main(["run", str(directory / "spec.yaml"), "--store", str(tmp_path / "store"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    summary = [line.split() for line in out.splitlines() if line.startswith("tiny-gpt2 ")]
    assert [(row[1], row[4], row[-1]) for row in summary] == [("rome", "4/4", "completed"),
                                                              ("rome-eac", "4/4", "completed")]
    assert (tmp_path / "store" / "report" / "report.md").is_file()
    first, second = tables(directory / "store"), tables(tmp_path / "store")
    assert len(first["evaluations"]) > 20
    for name in first:
        assert_frame_equal(first[name], second[name], check_exact=True)


def test_killed_actor_resumes_on_rerun_with_no_row_lost_or_duplicated(uninterrupted, tmp_path):
    directory, _ = uninterrupted
    killed = []

    def kill_rome_at_step_3(kind, trajectory, event):
        # After the checkpoint at 2 edits (log saved) and one more, unsaved, edit.
        if kind == "edit" and trajectory.spec.method == "rome" and event.step == 2 and not killed:
            killed.append(trajectory.trajectory_id)
            ray.kill(trajectory.actor)

    first = run(directory / "spec.yaml", tmp_path / "store", observer=kill_rome_at_step_3)
    assert killed and first.exit_code == 1
    status = {t.spec.method: t.status for t in first.trajectories}
    assert status["rome"].startswith("failed: actor died") and status["rome-eac"] == "completed"
    store = Store(tmp_path / "store")
    assert store.trajectory("mini-demo", killed[0])["status"].startswith("failed: actor died")
    assert store.edit_steps_done("mini-demo", killed[0]) == 2  # the unsaved edit's row was not written

    resumed = []
    second = run(directory / "spec.yaml", tmp_path / "store",
                 observer=lambda kind, t, event: resumed.append(event.step) if kind == "edit" else None)
    assert second.exit_code == 0 and resumed == [2, 3]  # replayed the saved log, edited only what was missing
    uninterrupted_tables, resumed_tables = tables(directory / "store"), tables(tmp_path / "store")
    for name in uninterrupted_tables:
        assert_frame_equal(uninterrupted_tables[name], resumed_tables[name], check_exact=True)


@pytest.mark.parametrize("change, field", [
    ({"methods": ["rome", "rome-eca"]}, "methods[1].method"),
    ({"n_edits": -4}, "n_edits"),
    ({"datasets": ["counterfact", "edits/missing.json"]}, "datasets[1]"),
    ({"n_edits": 3, "checkpoints": [0, 3], "datasets": ["two.json"]}, "n_edits"),  # more edits than requests
])
def test_bad_spec_fails_before_any_actor_starts(tmp_path, data_root, monkeypatch, capsys, change, field):
    (tmp_path / "edits").mkdir()
    (tmp_path / "two.json").write_text(json.dumps([
        {"case_id": i, "prompt": "The capital of France is", "subject": "France", "target_new": "Rome",
         "ground_truth": "Paris", "rephrase_prompt": "France's capital is", "locality_prompt": "Spain's capital is",
         "locality_ground_truth": "Madrid"} for i in range(2)]))
    for name in ("init", "remote"):
        monkeypatch.setattr(driver_module.ray, name, lambda *a, **k: pytest.fail("Ray was used"), raising=False)
    monkeypatch.setattr(driver_module.TrajectoryActor, "options", lambda **kw: pytest.fail("an actor started"))
    monkeypatch.setattr(driver_module.EvalActor, "options", lambda **kw: pytest.fail("an actor started"))
    assert cli.main(["run", str(write_spec(tmp_path, **change)), "--store", str(tmp_path / "store")]) == 2
    error = capsys.readouterr().err
    assert f"field {field!r}" in error and "spec.yaml" in error
    assert not (tmp_path / "store").exists()


def test_gpu_actors_where_the_cluster_has_gpus_cpu_actors_otherwise(data_root):
    paper = load_spec(CONFIGS / "zsre-gpt2-xl.yaml", check_models=False).resources
    assert paper.trajectory.num_gpus == 1 and paper.evaluation.num_gpus == 1
    assert on_this_cluster(paper, cluster_gpus=8) == paper
    on_cpu = on_this_cluster(paper, cluster_gpus=0)
    assert on_cpu.trajectory.num_gpus == 0 and on_cpu.evaluation.num_gpus == 0
    assert (on_cpu.trajectory.num_cpus, on_cpu.eval_actors) == (paper.trajectory.num_cpus, paper.eval_actors)
