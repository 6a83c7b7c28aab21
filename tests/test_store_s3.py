"""The store on object storage, against a real S3-compatible server (moto's server mode) that the test
starts on 127.0.0.1: the three tables, the edit logs and the report go through ``pyarrow.fs``; a
re-run skips completed work; a killed run resumes with no row lost or duplicated."""

import boto3
import pytest
import ray
import torch
from moto.server import ThreadedMotoServer
from pandas.testing import assert_frame_equal
from test_driver import tables, write_spec

from orchestrator import cli
from orchestrator import driver as driver_module
from orchestrator.driver import Driver
from orchestrator.spec import load_spec
from orchestrator.store import Store, StoreError
from workers.editing.delta import saved_log_steps
from workers.editing import EditLog, LayerDelta, WeightDelta

BUCKET = "eac-test"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.fixture(scope="module")
def s3():
    """(URI maker, boto3 client) for a bucket on a fresh S3 server; its credentials in the environment
    before Ray starts, so that the actors' processes have them too."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    with pytest.MonkeyPatch.context() as patch:
        for name, value in CREDENTIALS.items():
            patch.setenv(name, value)
        client = boto3.client("s3", endpoint_url=f"http://{host}:{port}", region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)

        def uri(prefix: str) -> str:
            return f"s3://{BUCKET}/{prefix}?endpoint_override={host}:{port}&scheme=http&region=us-east-1"

        yield uri, client
    server.stop()


@pytest.fixture(scope="module")
def local_ray(s3):
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


def keys(client, prefix: str) -> dict[str, str]:
    """Every object under the prefix, with its ETag (its content's digest)."""
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix + "/")
    return {item["Key"].removeprefix(prefix + "/"): item["ETag"] for page in pages for item in page.get("Contents", [])}


def test_rows_and_edit_logs_round_trip_through_s3(s3):
    uri, client = s3
    store = Store(uri("unit"))
    row = {"experiment": "exp", "trajectory_id": "t1", "model": "m", "method": "rome", "variant": "rome",
           "group": None, "dataset": "counterfact", "seed": 0, "n_edits": 1, "batch_size": 1, "hparams": "{}",
           "config": "{}", "status": "running", "edits_done": 0, "updated_at": None}
    store.put_trajectory(row)
    store.put_trajectory({**row, "status": "completed"})  # the same file, replaced
    store.put_evaluations("exp", "t1", 1, [{"task": "nli", "metric": "accuracy", "value": 0.5, "n_examples": 2}])
    assert store.experiments() == ["exp"] and store.exists()
    assert store.frame("trajectories")["status"].tolist() == ["completed"]
    assert store.evaluated_checkpoints("exp", "t1") == {1}

    log = EditLog([WeightDelta([LayerDelta("h.0.mlp", torch.arange(6.0).reshape(3, 2), torch.ones(4, 2))],
                               [7], "rome")], {"steps_done": 1, "delta_steps": [0]})
    location = store.log_path("exp", "t1")
    log.save(location)
    assert saved_log_steps(location) == 1 and saved_log_steps(store.log_path("exp", "t2")) == 0
    loaded = EditLog.load(location)
    assert torch.equal(loaded[0].layers[0].left, log[0].layers[0].left) and loaded[0].case_ids == [7]

    # Written under their final names: no temporary object, no directory marker.
    assert sorted(keys(client, "unit")) == ["evaluations/exp/t1-at-000001.parquet", "logs/exp/t1.safetensors",
                                            "trajectories/exp/t1.parquet"]
    client.put_object(Bucket=BUCKET, Key="unit/evaluations/exp/t9-at-000001.parquet", Body=b"not parquet")
    with pytest.raises(StoreError, match=f"s3://{BUCKET}/unit/evaluations/exp/t9-at-000001.parquet: unreadable"):
        store.read("evaluations")


@pytest.fixture(scope="module")
def s3_run(local_ray, s3, data_root, tmp_path_factory):
    """A small run (`eac run` with --store s3://...) into the bucket, and a report drawn from it."""
    uri, client = s3
    directory = tmp_path_factory.mktemp("s3-run")
    spec = write_spec(directory, methods=["rome"])
    assert cli.main(["run", str(spec), "--store", uri("run"), "--no-progress"]) == 0
    return spec, uri("run")


def test_a_run_writes_its_tables_logs_and_report_to_s3(s3_run, s3, tmp_path, capsys):
    spec, location = s3_run
    _, client = s3
    objects = keys(client, "run")
    (tid,) = {key.split("/")[-1].removesuffix(".parquet") for key in objects if key.startswith("trajectories/")}
    assert {f"edits/mini-demo/{tid}-000000-000001.parquet", f"edits/mini-demo/{tid}-000002-000003.parquet",
            f"evaluations/mini-demo/{tid}-at-000000.parquet", f"evaluations/mini-demo/{tid}-at-000002.parquet",
            f"evaluations/mini-demo/{tid}-at-000004.parquet", f"logs/mini-demo/{tid}.safetensors",
            "report/report.md"} <= set(objects)
    assert not [key for key in objects if ".tmp" in key]
    store = Store(location)
    assert store.trajectory("mini-demo", tid)["status"] == "completed" and saved_log_steps(
        store.log_path("mini-demo", tid)) == 4
    assert store.frame("edits")["edit_index"].tolist() == [0, 1, 2, 3]

    assert cli.main(["report", location, "--out", str(tmp_path / "report")]) == 0
    text = (tmp_path / "report" / "report.md").read_text()
    assert f"# Report: s3://{BUCKET}/run" in text and "Experiment `mini-demo`" in text
    assert "mini-demo/fig2_l1_norm.png" in text and (tmp_path / "report" / "mini-demo" / "fig2_l1_norm.png").is_file()


def test_rerunning_on_s3_skips_the_completed_work(s3_run, s3, monkeypatch):
    spec, location = s3_run
    _, client = s3
    before = keys(client, "run")
    monkeypatch.setattr(driver_module.TrajectoryActor, "options", lambda **kw: pytest.fail("an actor started"))
    monkeypatch.setattr(driver_module.EvalActor, "options", lambda **kw: pytest.fail("an actor started"))
    result = Driver(load_spec(spec), Store(location), progress=False).run()
    assert result.exit_code == 0 and [t.status for t in result.trajectories] == ["completed"]
    assert keys(client, "run") == before  # nothing rewritten


def test_a_killed_run_on_s3_resumes_with_no_row_lost_or_duplicated(s3_run, s3):
    spec, location = s3_run
    uri, _ = s3
    killed, resumed = [], []

    def kill_at_step_3(kind, trajectory, event):
        if kind == "edit" and event.step == 2 and not killed:  # after the checkpoint at 2, one unsaved edit
            killed.append(trajectory.trajectory_id)
            ray.kill(trajectory.actor)

    first = Driver(load_spec(spec), Store(uri("killed")), progress=False, observer=kill_at_step_3).run()
    assert killed and first.exit_code == 1
    assert Store(uri("killed")).edit_steps_done("mini-demo", killed[0]) == 2
    second = Driver(load_spec(spec), Store(uri("killed")), progress=False,
                    observer=lambda kind, t, event: resumed.append(event.step) if kind == "edit" else None).run()
    assert second.exit_code == 0 and resumed == [2, 3]
    uninterrupted, resumed_tables = tables(location), tables(uri("killed"))
    for name in uninterrupted:
        assert_frame_equal(uninterrupted[name], resumed_tables[name], check_exact=True)
