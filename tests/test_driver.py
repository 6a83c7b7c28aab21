"""`eac run` through Ray: a scaled-down demo end to end, resume after a killed actor, determinism, and
bad specs that fail before any actor starts. One local Ray instance (2 CPUs) serves the module."""

import contextlib
import json
import re
import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest
import ray
import yaml
from pandas.testing import assert_frame_equal

from orchestrator import cli
from orchestrator import driver as driver_module
from orchestrator.driver import Driver, on_this_cluster
from orchestrator.dry_run import plan_table
from orchestrator.spec import load_spec
from orchestrator.store import Store
from workers.editing.delta import saved_log_steps

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
    # The demo's resources: both trajectories edit at once while the evaluator scores (one actor start-up
    # of wall-clock per run instead of two in a row).
    "resources": {"trajectory": {"num_cpus": 0.75}, "evaluation": {"num_cpus": 0.5, "actors": 1}},
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
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


def run(spec_path, store_root, observer=None):
    return Driver(load_spec(spec_path), Store(store_root), progress=False, observer=observer).run()


def tables(store_root) -> dict[str, pd.DataFrame]:
    store = Store(store_root)
    return {"trajectories": store.frame("trajectories").drop(columns=["updated_at"]),
            "edits": store.frame("edits").drop(columns=TIMINGS),
            "evaluations": store.frame("evaluations"), "examples": store.frame("examples")}


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
    # Every checkpoint's per-example rows, beside its aggregates: the edits so far by case id.
    examples = store.frame("examples")
    for tid in plan:
        mine = examples[examples["trajectory_id"] == tid]
        assert set(mine["n_edits"]) == {0, 2, 4}
        reliability = mine[(mine["metric"] == "reliability") & (mine["task"] == "edit/toolkit") & (mine["n_edits"] == 4)]
        assert sorted(reliability["case_id"]) == sorted(str(r.case_id) for r in plan[tid].task.requests)
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
    status = {t.spec.method: (t.status, t.reason) for t in first.trajectories}
    assert status["rome"][0] == "failed" and status["rome"][1].startswith("actor died")
    assert status["rome-eac"] == ("completed", None)
    store = Store(tmp_path / "store")
    row = store.trajectory("mini-demo", killed[0])
    assert row["status"] == "failed" and row["reason"].startswith("actor died")
    assert store.edit_steps_done("mini-demo", killed[0]) == 2  # the unsaved edit's row was not written

    resumed = []
    second = run(directory / "spec.yaml", tmp_path / "store",
                 observer=lambda kind, t, event: resumed.append(event.step) if kind == "edit" else None)
    assert second.exit_code == 0 and resumed == [2, 3]  # replayed the saved log, edited only what was missing
    uninterrupted_tables, resumed_tables = tables(directory / "store"), tables(tmp_path / "store")
    for name in uninterrupted_tables:
        assert_frame_equal(uninterrupted_tables[name], resumed_tables[name], check_exact=True)


def test_save_every_resumes_between_checkpoints_and_keeps_the_trajectory_ids(uninterrupted, tmp_path):
    # The same spec saving its log every 3 edits besides the checkpoints (2, 4): killed after the save
    # at 3 edits, it resumes from step 3 (checkpoints only: from 2), and the tables equal the
    # uninterrupted run's, ids included -- how often the log is saved changes no result.
    directory, _ = uninterrupted
    spec = write_spec(tmp_path, save_every=3)
    assert load_spec(spec).save_every == 3
    killed, saves = [], []

    def kill_rome_after_its_save(kind, trajectory, event):
        # Killed as soon as the save at 3 edits is stored: the actor may still edit step 3 and save the
        # log at 4 before the kill lands, but the driver stores no row past 3 (killing at the edit event
        # of step 3 instead raced with the final checkpoint's rows).
        if kind == "save":
            saves.append(event.steps_done)
            if trajectory.spec.method == "rome" and not killed:
                killed.append(trajectory.trajectory_id)
                ray.kill(trajectory.actor)

    first = run(spec, tmp_path / "store", observer=kill_rome_after_its_save)
    assert killed and first.exit_code == 1 and 3 in saves
    store = Store(tmp_path / "store")
    assert store.edit_steps_done("mini-demo", killed[0]) == 3  # the rows up to the save were stored
    assert saved_log_steps(store.log_path("mini-demo", killed[0])) >= 3

    resumed = []
    second = run(spec, tmp_path / "store",
                 observer=lambda kind, t, event: resumed.append(event.step) if kind == "edit" else None)
    assert second.exit_code == 0 and resumed == [3]
    uninterrupted_tables, resumed_tables = tables(directory / "store"), tables(tmp_path / "store")
    for name in uninterrupted_tables:
        assert_frame_equal(uninterrupted_tables[name], resumed_tables[name], check_exact=True)


@pytest.mark.parametrize("change, field", [
    ({"methods": ["rome", "rome-eca"]}, "methods[1].method"),
    ({"n_edits": -4}, "n_edits"),
    ({"save_every": 0}, "save_every"),
    ({"datasets": ["counterfact", "edits/missing.json"]}, "datasets[1]"),
    ({"n_edits": 3, "checkpoints": [0, 3], "datasets": ["two.json"]}, "n_edits"),  # more edits than requests
    # two disjoint samples of one request each fit in two requests, three do not
    ({"n_edits": 1, "checkpoints": [0, 1], "datasets": ["two.json"], "selection": "disjoint", "seeds": [0, 2]},
     "seeds"),
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


def test_with_stdout_in_a_file_a_run_logs_plain_lines(local_ray, data_root, tmp_path, monkeypatch):
    # As under `ray job submit` or `eac run ... > log`: neither stream is a terminal.
    spec = write_spec(tmp_path, methods=["rome"])
    with open(tmp_path / "out.log", "w") as out, open(tmp_path / "err.log", "w") as err:
        monkeypatch.setattr(sys, "stdout", out)
        monkeypatch.setattr(sys, "stderr", err)
        code = cli.main(["run", str(spec), "--store", str(tmp_path / "store"), "--no-report",
                         "--progress-every", "2", "--progress-seconds", "3600"])
        monkeypatch.undo()
    assert code == 0
    logged = (tmp_path / "out.log").read_text() + (tmp_path / "err.log").read_text()
    assert "\r" not in logged and "\x1b" not in logged  # no bar fragments, no cursor movements
    label = r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d tiny-gpt2/rome/counterfact/seed3: "
    edits = re.findall(label + r"(\d)/4 edits, (.*)$", logged, re.MULTILINE)
    # The first step (it carries the set-up), every second step after it, and the last.
    assert [int(done) for done, _ in edits] == [1, 3, 4]
    assert edits[0][1].startswith("s/edit not yet measured")
    for _, rate in edits[1:]:
        assert re.fullmatch(r"[0-9.e+-]+ s/edit, ETA \d+:\d\d:\d\d", rate), rate
    scored = re.findall(label + r"scored at (\d) edits \((\d+) scores\): (.*)$", logged, re.MULTILINE)
    assert sorted(int(c) for c, _, _ in scored) == [0, 2, 4]
    assert all("wikitext perplexity" in shown for _, _, shown in scored)
    assert "reliability" in dict((c, s) for c, _, s in scored)["4"]
    assert re.search(label + "completed$", logged, re.MULTILINE)


def test_dry_run_lists_the_plan_what_the_store_holds_and_the_cost_and_starts_nothing(
        uninterrupted, tmp_path, monkeypatch, capsys):
    directory, _ = uninterrupted
    store_root = tmp_path / "store"
    shutil.copytree(directory / "store", store_root)
    rome = Store(store_root).frame("trajectories").set_index("method").loc["rome", "trajectory_id"]
    # As if rome's run had stopped after its checkpoint at 2 edits: its later rows are gone.
    (store_root / "edits" / "mini-demo" / f"{rome}-000002-000003.parquet").unlink()
    (store_root / "evaluations" / "mini-demo" / f"{rome}-at-000004.parquet").unlink()
    before = {p: p.stat().st_mtime_ns for p in store_root.rglob("*")}
    for name in ("init", "remote"):
        monkeypatch.setattr(driver_module.ray, name, lambda *a, **k: pytest.fail("Ray was used"), raising=False)
    monkeypatch.setattr(driver_module.TrajectoryActor, "options", lambda **kw: pytest.fail("an actor started"))
    monkeypatch.setattr(driver_module.EvalActor, "options", lambda **kw: pytest.fail("an actor started"))

    assert cli.main(["run", str(directory / "spec.yaml"), "--store", str(store_root), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "2 trajectories, 1 complete" in out and "1 to run" in out and "nothing was started or written" in out
    store = Store(store_root)
    plan = Driver(load_spec(directory / "spec.yaml"), store, progress=False).plan()
    table = plan_table(store, plan).set_index("method")
    assert table.loc["rome-eac", "store"] == "complete" and table.loc["rome-eac", "seconds"] == 0
    assert table.loc["rome", "store"] == "resumes at 2/4"
    assert (table.loc["rome", "actor"], table.loc["rome", "checkpoints"]) == ("0.75 CPU, 0 GPU", "0,2,4")
    # Seconds per step measured in the store for the same model and method: the two steps left.
    edits = store.frame("edits").merge(store.frame("trajectories")[["trajectory_id", "model", "batch_size"]],
                                       on="trajectory_id")
    measured = edits[edits["method"] == "rome"]["seconds_total"]
    assert table.loc["rome", "measured steps"] == len(measured) == 2
    assert table.loc["rome", "seconds"] == pytest.approx(2 * measured.mean())

    # Twice the edits: new trajectories, costed from the same measurements; an unknown model is not.
    spec = write_spec(tmp_path, n_edits=8, checkpoints=[0, 4, 8], models=["tiny-gpt2", "tiny-llama"])
    assert cli.main(["run", str(spec), "--store", str(store_root), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "4 trajectories, 0 complete" in out and "(2 of 4 trajectories estimated" in out
    table = plan_table(store, Driver(load_spec(spec), store, progress=False).plan())
    costed = table.set_index(["model", "method"])["seconds"]
    assert costed[("tiny-gpt2", "rome")] == pytest.approx(8 * measured.mean())
    assert costed[["tiny-llama"]].isna().all() and set(table["store"]) == {"to run"}
    assert {p: p.stat().st_mtime_ns for p in store_root.rglob("*")} == before  # nothing written


@pytest.mark.parametrize("table, pattern", [("edits", "*-000000-*.parquet"), ("evaluations", "*-at-000002.parquet")])
def test_rows_moved_aside_from_a_completed_trajectory_are_redone(uninterrupted, tmp_path, table, pattern):
    directory, _ = uninterrupted
    shutil.copytree(directory / "store", tmp_path / "store")
    lost = sorted((tmp_path / "store" / table / "mini-demo").glob(pattern))[0]
    lost.rename(tmp_path / lost.name)  # what a StoreError message advises for an unreadable file
    result = run(directory / "spec.yaml", tmp_path / "store")
    assert result.exit_code == 0 and lost.is_file()
    uninterrupted_tables, redone = tables(directory / "store"), tables(tmp_path / "store")
    for name in uninterrupted_tables:
        assert_frame_equal(uninterrupted_tables[name], redone[name], check_exact=True)


def test_the_actor_edits_with_the_planned_hparams_even_when_the_yaml_changes_after_planning(tmp_path, data_root):
    """Settings are resolved once, with the spec: the trajectory id hashes the typed hyper-parameters
    the task carries, and the actor edits with those, not with what its copy of the YAML says later."""
    from workers.actors import TrajectoryRunner
    from workers.editing.delta import hparams_digest

    hparams_file = tmp_path / "rome-tiny.yaml"
    planned = {"layer": 1, "num_steps": 2, "lr": 0.5, "context_template_lengths": [[5, 2]],
               "stats_token_budget": 2000, "stats_max_length": 64}
    hparams_file.write_text(yaml.safe_dump(planned))
    spec = load_spec(write_spec(tmp_path, methods=[{"method": "rome", "hparams_file": str(hparams_file)}],
                                n_edits=1, checkpoints=[1], evaluation={}), data_root=data_root)
    (trajectory,) = Driver(spec, Store(tmp_path / "store"), progress=False, data_root=data_root).plan()
    assert trajectory.task.hparams.num_steps == 2 == trajectory.spec.resolved_hparams["num_steps"]

    hparams_file.write_text(yaml.safe_dump({**planned, "num_steps": 4, "layer": 2}))  # edited under the actor
    runner = TrajectoryRunner(trajectory.task)
    assert (runner.editor.hparams.num_steps, runner.editor.hparams.layer) == (2, 1)
    assert runner.binding["hparams_digest"] == hparams_digest(trajectory.spec.resolved_hparams)
    (edit, checkpoint) = list(runner.run())
    assert list(edit.record["relative_l1"]) == ["transformer.h.1.mlp.c_proj"] and edit.record["steps"] <= 2
    assert checkpoint.requests_done == 1


def store_bytes(root) -> dict[str, bytes]:
    """Every stored file's bytes but the lock's (it names the process that last held it)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*"))
            if p.is_file() and p.parts[len(Path(root).parts)] != "locks"}


def test_a_run_that_finds_its_work_done_once_it_holds_the_lock_leaves_every_file_as_it_was(
        uninterrupted, tmp_path):
    """Issue 36 item 7: a second `eac run` planned while the first was finishing took the lock the
    moment the first let it go and redid work from its stale plan (the stored files then differed).
    Here the other run's last file lands between this run's plan and its lock."""
    directory, _ = uninterrupted
    root = tmp_path / "store"
    shutil.copytree(directory / "store", root)
    expected = store_bytes(root)
    last = sorted((root / "evaluations" / "mini-demo").glob("*-at-000004.parquet"))[0]
    aside = tmp_path / last.name
    last.rename(aside)  # what this run's plan sees: one checkpoint still to score

    class FinishedMeanwhile(Store):
        @contextlib.contextmanager
        def lock(self, experiment):
            aside.rename(last)  # the other run stores its last file and lets the lock go
            with Store.lock(self, experiment):
                yield

    driver = Driver(load_spec(write_spec(tmp_path)), FinishedMeanwhile(root), progress=False)
    assert [t.finished for t in driver.plan()] != [True, True]
    result = driver.run()
    assert [t.status for t in result.trajectories] == ["completed", "completed"]
    assert store_bytes(root) == expected


def test_prune_at_evaluation_scores_the_restrained_sum_and_resumes_unrestrained(local_ray, data_root, tmp_path):
    """Issue 31 item 4, end to end: MEMIT-PRUNE as its paper applies it beside MEMIT, killed after its
    checkpoint at 2 edits and resumed. Its log is MEMIT's, delta for delta (edited unrestrained, also
    after the resume); each checkpoint's deviation rows measure W₀ + F(ΔW) of that log's sum."""
    import numpy as np
    import torch

    from workers.editing import EditLog
    from workers.models import edited_weight, load_model

    variant = {"name": "memit-prune-eval", "method": "memit-prune", "hparams": {"prune.apply": "evaluation"}}
    spec = write_spec(tmp_path, methods=["memit", variant],
                      evaluation={"tasks": {"wikitext": 1}, "perplexity_window": 32, "perplexity_stride": 32,
                                  "edit_metrics": ["toolkit"], "drift_examples": 0})
    killed, resumed = [], []

    def kill_after_checkpoint_2(kind, trajectory, event):
        if kind == "edit" and trajectory.spec.variant.name == "memit-prune-eval" and event.step == 2 and not killed:
            killed.append(trajectory.trajectory_id)
            ray.kill(trajectory.actor)

    assert run(spec, tmp_path / "store", observer=kill_after_checkpoint_2).exit_code == 1 and killed
    second = run(spec, tmp_path / "store", observer=lambda kind, t, event: resumed.append(
        (t.spec.variant.name, event.step)) if kind == "edit" else None)
    assert second.exit_code == 0 and resumed == [("memit-prune-eval", 2), ("memit-prune-eval", 3)]

    store = Store(tmp_path / "store")
    ids = {t.spec.variant.name: t.trajectory_id for t in second.trajectories}
    logs = {name: EditLog.load(store.log_path("mini-demo", tid)) for name, tid in ids.items()}
    assert len(logs["memit"]) == len(logs["memit-prune-eval"]) == 4
    for theirs, mine in zip(logs["memit"], logs["memit-prune-eval"]):
        assert [(a.module, a.left.tolist(), a.right.tolist()) for a in theirs.layers] == \
            [(b.module, b.left.tolist(), b.right.tolist()) for b in mine.layers]

    evaluations = store.frame("evaluations")
    scored = evaluations[evaluations["metric"] == "update_spectral_relative"].set_index(
        ["trajectory_id", "n_edits", "task"])["value"]
    model, _ = load_model("tiny-gpt2")
    modules = logs["memit"].modules()
    w0 = {m: edited_weight(model, m).double().numpy().copy() for m in modules}
    alpha = second.trajectories[1].spec.hparams.prune.alpha
    restrained = []
    for steps in (2, 4):
        logs["memit"][:steps].replay(model)
        for module in modules:
            u, sigma, vh = np.linalg.svd(edited_weight(model, module).double().numpy() - w0[module])
            bound = np.linalg.norm(w0[module], ord=2)
            mapped = np.where(sigma > bound, np.log(sigma / bound) / np.log(alpha) + bound, sigma)
            task = f"deviation/{module}"
            assert scored[ids["memit"], steps, task] == pytest.approx(sigma[0] / bound, rel=1e-5)
            assert scored[ids["memit-prune-eval"], steps, task] == pytest.approx(mapped.max() / bound, rel=1e-5)
            restrained.append(sigma[0] > bound)
        with torch.no_grad():
            for module in modules:
                edited_weight(model, module).copy_(torch.from_numpy(w0[module]))
    assert any(restrained), "MEMIT's sum reaches the bound here, so the two arms' scored weights differ"
