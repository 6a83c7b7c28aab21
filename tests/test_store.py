"""The Parquet store: readable by pyarrow and pandas, idempotent, atomic, loud about corrupt files."""

import math
import os
from pathlib import Path
from dataclasses import dataclass, field

import pandas as pd
import pyarrow.dataset as ds
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator import store as store_module
from orchestrator.store import Store, StoreError, edit_row


@dataclass
class FakeRecord:  # the fields of workers.editing.EditRecord, plus one the store does not know
    edit_index: int
    case_ids: list
    method: str
    seconds: dict = field(default_factory=dict)
    loss: float = float("nan")
    delta_norm: float = 1.0
    dw_l1: float = 2.0
    dw_fro: float = 3.0
    relative_l1: dict = field(default_factory=dict)
    anchors: int | None = None
    delta_norm_before: float | None = None
    skipped: bool = False
    error: str | None = None
    future_field: str = "kept"


def edits(first, last, method="rome", anchors=None):
    return [edit_row(FakeRecord(i, [100 + i], method, {"targets": 0.5, "total": 1.0 + i}, loss=0.1 * i,
                                relative_l1={"model.layers.3.mlp.down_proj": 1 + 0.01 * i}, anchors=anchors))
            for i in range(first, last + 1)]


def evaluation_rows(value=0.5):
    return [{"task": "edit/toolkit", "metric": "reliability", "value": value, "n_examples": 4},
            {"task": "nli", "metric": "accuracy", "value": value / 2, "n_examples": 8}]


def trajectory_row(tid, status, experiment="exp", method="rome"):
    return {"experiment": experiment, "trajectory_id": tid, "model": "tiny-gpt2", "method": method,
            "variant": method, "group": None, "dataset": "counterfact", "seed": 0, "n_edits": 4, "batch_size": 1,
            "hparams": "{}", "config": "{}", "status": status, "edits_done": 0, "updated_at": None}


@pytest.fixture
def store(tmp_path):
    return Store(tmp_path / "store")


def test_tables_read_with_pyarrow_and_pandas(store):
    store.put_trajectory(trajectory_row("t1", "running"))
    store.put_trajectory(trajectory_row("t2", "completed", experiment="other", method="rome-eac"))
    store.put_edits("exp", "t1", edits(0, 1))  # anchors null here ...
    store.put_edits("other", "t2", edits(0, 1, method="rome-eac", anchors=57))  # ... integers there
    store.put_evaluations("exp", "t1", 2, evaluation_rows())

    table = ds.dataset(store.root / "edits").to_table()
    assert table.num_rows == 4 and set(table.column("experiment").to_pylist()) == {"exp", "other"}
    frame = pd.read_parquet(store.root / "edits")
    assert sorted(frame["anchors"].dropna().tolist()) == [57, 57]
    assert frame.set_index(["trajectory_id", "edit_index"]).loc[("t1", 1), "seconds_total"] == 2.0
    row = frame.set_index(["trajectory_id", "edit_index"]).loc[("t1", 1)]
    assert dict(row["seconds"]) == {"targets": 0.5, "total": 2.0}
    assert row["case_id"] == "101" and row["n_requests"] == 1 and '"future_field": "kept"' in row["extra"]
    assert len(pd.read_parquet(store.root / "trajectories")) == 2
    assert pd.read_parquet(store.root / "evaluations")["n_edits"].tolist() == [2, 2]
    assert store.experiments() == ["exp", "other"]


def test_rewriting_the_same_rows_never_duplicates(store):
    for _ in range(2):  # a re-run, or a trajectory resumed after its actor died
        store.put_trajectory(trajectory_row("t1", "running"))
        store.put_edits("exp", "t1", edits(0, 2))
        store.put_edits("exp", "t1", edits(3, 3))
        store.put_evaluations("exp", "t1", 3, evaluation_rows())
    store.put_trajectory(trajectory_row("t1", "completed"))
    assert ds.dataset(store.root / "edits").count_rows() == 4
    assert ds.dataset(store.root / "evaluations").count_rows() == 2
    assert store.frame("trajectories")["status"].tolist() == ["completed"]
    frame = store.frame("edits")
    assert not frame.duplicated(["trajectory_id", "edit_index"]).any()
    assert store.edit_steps_done("exp", "t1") == 4 and store.evaluated_checkpoints("exp", "t1") == {3}



# The trajectories table before it had a ``reason`` column: the reason was inside the status string.
OLD_TRAJECTORIES = pa.schema([f for f in store_module.SCHEMAS["trajectories"] if f.name != "reason"])


def write_old_trajectory(store, tid, status):
    path = store.root / "trajectories" / "exp" / f"{tid}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist([trajectory_row(tid, status)], schema=OLD_TRAJECTORIES), path)
    return path


def test_an_old_store_reads_as_a_status_and_a_reason(store):
    old = {"t-failed": "failed: actor died: node lost", "t-stopped": "stopped: early stopping, scored at 2 of 4 edits",
           "t-int": "interrupted (KeyboardInterrupt)", "t-done": "completed", "t-run": "running"}
    for tid, status in old.items():
        write_old_trajectory(store, tid, status)
    store.put_trajectory({**trajectory_row("t-new", "failed"), "reason": "evaluation at 2 edits: boom"})
    rows = {row["trajectory_id"]: (row["status"], row["reason"]) for row in store.read("trajectories").to_pylist()}
    assert rows == {"t-failed": ("failed", "actor died: node lost"),
                    "t-stopped": ("stopped", "early stopping, scored at 2 of 4 edits"),
                    "t-int": ("interrupted", "KeyboardInterrupt"), "t-done": ("completed", None),
                    "t-run": ("running", None), "t-new": ("failed", "evaluation at 2 edits: boom")}
    assert store.trajectory("exp", "t-failed")["reason"] == "actor died: node lost"


def test_a_status_that_is_no_status_names_its_file(store):
    path = write_old_trajectory(store, "t1", "exploded")
    with pytest.raises(StoreError, match=f"{path}.*'exploded' is not one of"):
        store.read("trajectories")

def test_progress_counts_only_the_contiguous_prefix(store):
    store.put_edits("exp", "t1", edits(0, 1))
    store.put_edits("exp", "t1", edits(4, 5))  # a gap: steps 2-3 were lost
    store.put_edits("exp", "t10", edits(0, 7))  # an id that starts like t1 is another trajectory
    assert store.edit_steps_done("exp", "t1") == 2
    assert store.edit_steps_done("exp", "t10") == 8
    assert store.edit_steps_done("exp", "missing") == 0


def test_a_failed_write_leaves_the_old_file_and_no_partial_one(store, monkeypatch):
    path = Path(store.put_evaluations("exp", "t1", 2, evaluation_rows(0.5)))

    def crash(tmp, target):
        raise OSError("disk full")

    monkeypatch.setattr(store_module.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        store.put_evaluations("exp", "t1", 2, evaluation_rows(0.9))
    monkeypatch.undo()
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # the temporary file is gone
    assert store.frame("evaluations")["value"].tolist() == [0.5, 0.25]


def test_a_writer_killed_mid_file_leaves_nothing_readers_see(store):
    store.put_edits("exp", "t1", edits(0, 1))
    directory = store.root / "edits" / "exp"
    # What a process killed while writing leaves behind: a hidden, truncated temporary file.
    (directory / ".t1-000002-000003.parquet.1234abcd.tmp").write_bytes(b"PAR1\x00\x01")
    assert ds.dataset(store.root / "edits").count_rows() == 2
    assert len(pd.read_parquet(store.root / "edits")) == 2
    assert store.edit_steps_done("exp", "t1") == 2


def test_a_corrupt_file_is_named_and_kept(store):
    store.put_edits("exp", "t1", edits(0, 1))
    bad = store.root / "edits" / "exp" / "t2-000000-000000.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(StoreError) as info:
        store.read("edits")
    assert str(bad) in str(info.value) and "left in place" in str(info.value)
    assert bad.read_bytes() == b"not parquet at all"  # never deleted or rewritten
    assert store.edit_steps_done("exp", "t1") == 2  # other trajectories' files still read
    assert pq.read_table(store.root / "edits" / "exp" / "t1-000000-000001.parquet").num_rows == 2


def test_rows_that_do_not_fit_are_refused(store):
    with pytest.raises(StoreError, match="not in the table"):
        store.put_evaluations("exp", "t1", 1, [{"task": "nli", "metric": "accuracy", "value": 1.0,
                                               "n_examples": 1, "colour": "blue"}])
    with pytest.raises(StoreError, match="repeated task/metric"):
        store.put_evaluations("exp", "t1", 1, evaluation_rows() + evaluation_rows())
    with pytest.raises(StoreError, match="not contiguous"):
        store.put_edits("exp", "t1", edits(0, 0) + edits(2, 2))
    with pytest.raises(StoreError, match="cannot name a store file"):
        store.put_edits("../escape", "t1", edits(0, 0))
    assert not (store.root / "evaluations").exists() or not list((store.root / "evaluations").rglob("*.parquet"))


def test_edit_row_of_a_batch_and_of_a_skipped_step():
    row = edit_row(FakeRecord(3, [7, "a8"], "memit", {"total": 2.5}, skipped=True, error="singular solve"))
    assert row["case_id"] == "7,a8" and row["n_requests"] == 2 and row["seconds_total"] == 2.5
    assert row["skipped"] is True and row["error"] == "singular solve" and math.isnan(row["loss"])


def test_a_second_run_of_an_experiment_is_refused_while_the_first_holds_its_lock(tmp_path, capsys):
    """Issue 12, item 8: two runs of one spec on one store wrote the same files at once."""
    import yaml

    from orchestrator import cli

    store = Store(tmp_path / "store")
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"experiment": "locked", "models": ["tiny-gpt2"], "methods": ["rome"],
                                    "datasets": ["counterfact"], "n_edits": 1}))
    with store.lock("locked"):
        code = cli.main(["run", str(spec), "--store", str(tmp_path / "store"), "--no-progress", "--no-report"])
        error = capsys.readouterr().err.strip()
    assert code == 2 and len(error.splitlines()) == 1
    assert "locked.lock" in error and f"pid {os.getpid()}" in error
    assert not (tmp_path / "store" / "trajectories").exists()  # nothing of the run was written
    with store.lock("locked"):  # released: taken again at once
        pass


def test_a_stray_copy_or_a_foreign_file_is_refused_not_counted(store):
    """Issue 12, item 6: a copy of an edits file under another name showed 3 edits for a 2-edit
    trajectory; a file of another schema was read with its missing columns as nulls."""
    import shutil

    path = store.put_edits("e", "t", [edit_row({"edit_index": i, "case_id": i}) for i in range(2)])
    shutil.copy(path, path.replace("-000000-", "-copy-"))
    with pytest.raises(StoreError, match="is also in"):
        store.edit_steps_done("e", "t")
    os.remove(path.replace("-000000-", "-copy-"))
    assert store.edit_steps_done("e", "t") == 2
    foreign = os.path.join(store.table_dir("edits"), "e", "t-000002-000002.parquet")
    pq.write_table(pa.table({"experiment": ["e"], "trajectory_id": ["t"], "edit_index": [2]}), foreign)
    with pytest.raises(StoreError, match="columns .* missing"):
        store.read("edits", "e", "t")
