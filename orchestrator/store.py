"""The Parquet result store: four tables, one directory per experiment, append-only and idempotent.

Layout under the store root::

    trajectories/<experiment>/<trajectory_id>.parquet                       one row, rewritten as it runs
    edits/<experiment>/<trajectory_id>-<first>-<last>.parquet               one row per edit step
    evaluations/<experiment>/<trajectory_id>-at-<n_edits>.parquet           one row per task × metric
    examples/<experiment>/<trajectory_id>-at-<n_edits>.parquet              one row per scored example
    logs/<experiment>/<trajectory_id>.safetensors                           the edit log (checkpoint)

The ``examples`` table holds, for every evaluation row that is a score over examples, the value of
each example, keyed so that two arms scored on the same examples can be paired
(``orchestrator.compare``): ``example_id`` is the request's case id (editing metrics), the data-set
index (task examples), the window's token offset (WikiText) or ``<task>/<index>`` (drift prompts).
An aggregate row equals the mean of its example rows, except WikiText ``perplexity``, which is
exp(Σ window_nll / Σ window_tokens) over its windows (each window's ``value`` is its own NLL per
token). Rows that are not scores over examples have none: ``retention/*``, ``retention_dropped/*``,
``deviation/*`` (norms, condition numbers, PCA separability). A checkpoint's examples file is written
before its evaluations file (the evidence that the checkpoint is done), so a checkpoint with
evaluation rows has its examples; stores written before this table existed simply have none.

The root is a local directory or any URI ``pyarrow.fs`` opens (``s3://bucket/prefix``, ``gs://``,
``hdfs://``; see ``workers.storage``): every read, write and listing goes through its filesystem.

Every file is named by what it holds, so writing the same rows again (a re-run, a resumed
trajectory) replaces a file with the same content instead of adding a duplicate. Every write is
atomic (``workers.storage.write_bytes``: a hidden temporary file renamed into place on a POSIX path,
the final name at once on an object store, whose PUT is atomic), so a reader (and ``pyarrow.dataset``,
which skips names starting with '.') sees either the old file or the new one, never half of one.
Each table has a fixed schema, so ``pyarrow.dataset.dataset(root / "edits")`` and
``pandas.read_parquet(root / "edits")`` read every experiment's
files as one table; every file carries its ``experiment`` column.

A file that cannot be read raises ``StoreError`` naming it; the store never deletes or rewrites a file
it cannot read, so no stored row is lost behind the user's back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import posixpath
import re
import socket
import types
import typing
from collections import Counter
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from orchestrator.status import split_statuses
from workers import storage
from workers.editing.record import EditRecord, measure_names

SECONDS = pa.map_(pa.string(), pa.float64())
# The column type of an EditRecord field, by its annotation (``... | None``: the same, nullable).
ARROW_TYPES = {int: pa.int64(), float: pa.float64(), str: pa.string(), bool: pa.bool_(), dict[str, float]: SECONDS}
# EditRecord fields stored as two columns each (their values: ``edit_row``).
SPLIT_FIELDS = {"case_ids": (("case_id", pa.string()),  # the request's case id; a batch step joins its ids with ','
                             ("n_requests", pa.int64())),
                "seconds": (("seconds_total", pa.float64()),  # seconds["total"]
                            ("seconds", SECONDS))}  # per phase, e.g. {"targets": .., "update": .., "total": ..}


def record_fields() -> dict[str, type]:
    """The editor's per-edit record (``workers.editing.record.EditRecord``): field name -> its type,
    ``... | None`` reduced to the type; the record's own fields first, then the measures it inherits."""
    hints = typing.get_type_hints(EditRecord)
    out = {}
    for item in sorted(dataclasses.fields(EditRecord), key=lambda item: item.name in measure_names()):
        kind = hints[item.name]
        if isinstance(kind, types.UnionType):
            (kind,) = [arg for arg in typing.get_args(kind) if arg is not type(None)]
        out[item.name] = kind
    return out


def edits_schema() -> pa.Schema:
    """The ``edits`` table: experiment, trajectory_id, a column per record field (two for the fields
    of ``SPLIT_FIELDS``) and ``extra``, any further fields of a record, as JSON."""
    columns = [("experiment", pa.string()), ("trajectory_id", pa.string())]
    for name, kind in record_fields().items():
        columns += SPLIT_FIELDS[name] if name in SPLIT_FIELDS else [(name, ARROW_TYPES[kind])]
    return pa.schema(columns + [("extra", pa.string())])


SCHEMAS: dict[str, pa.Schema] = {
    "trajectories": pa.schema([
        ("experiment", pa.string()), ("trajectory_id", pa.string()), ("model", pa.string()),
        ("method", pa.string()), ("variant", pa.string()), ("group", pa.string()), ("dataset", pa.string()),
        ("seed", pa.int64()), ("n_edits", pa.int64()), ("batch_size", pa.int64()),
        ("hparams", pa.string()),  # the full hyper-parameters the editor ran with, as JSON
        ("config", pa.string()),  # the trajectory's spec (what its id hashes), as JSON
        ("status", pa.string()),  # an ``orchestrator.status.Status``: pending | running | completed | ...
        ("reason", pa.string()),  # why it failed, was interrupted or stopped; null otherwise
        ("edits_done", pa.int64()), ("updated_at", pa.timestamp("us", tz="UTC")),
    ]),
    "edits": edits_schema(),  # one column per field of the editor's EditRecord (+ "extra")
    "evaluations": pa.schema([
        ("experiment", pa.string()), ("trajectory_id", pa.string()),
        ("n_edits", pa.int64()),  # the checkpoint: edits applied when the model was scored
        ("task", pa.string()), ("metric", pa.string()), ("value", pa.float64()), ("n_examples", pa.int64()),
        ("ci_low", pa.float64()), ("ci_high", pa.float64()),  # bootstrap 95% interval over the examples
    ]),
    "examples": pa.schema([
        ("experiment", pa.string()), ("trajectory_id", pa.string()), ("n_edits", pa.int64()),
        ("task", pa.string()), ("metric", pa.string()),  # the evaluation row the example belongs to
        ("example_id", pa.string()),  # what pairs it across arms (see the module docstring)
        ("value", pa.float64()),
        ("case_id", pa.string()),  # editing metrics: the request's case id
        ("prompt_kind", pa.string()),  # edit | rephrase | locality (a request's mean over them); drift: task
        ("prompt_index", pa.int64()),  # the prompt's index within its kind, null for a mean over the kind
        ("example_index", pa.int64()),  # task examples and drift prompts: index in the data set's order
        ("window_start", pa.int64()),  # WikiText: token offset of the window's first scored token
        ("window_tokens", pa.int64()), ("window_nll", pa.float64()),  # WikiText: tokens scored, their summed NLL
    ]),
}
TABLES = tuple(SCHEMAS)
KEYS = {"trajectories": ("experiment", "trajectory_id"),
        "edits": ("experiment", "trajectory_id", "edit_index"),
        "evaluations": ("experiment", "trajectory_id", "n_edits", "task", "metric"),
        "examples": ("experiment", "trajectory_id", "n_edits", "task", "metric", "example_id")}
# Columns that stores written by earlier versions lack; an older file reads them as nulls (the
# trajectories' reason is then filled in from the old status string: ``split_statuses``).
ADDED_COLUMNS = {"trajectories": ("reason",), "evaluations": ("ci_low", "ci_high"),
                 "edits": ("steps",)}  # before it was a column, ``steps`` was kept in ``extra``
_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


class StoreError(RuntimeError):
    """A store file that cannot be read or rows that do not fit a table; names the file."""


class Store:
    """The store at ``root``: a local directory or a URI (``s3://bucket/prefix?endpoint_override=...``)."""

    def __init__(self, root: str | os.PathLike):
        # Local roots are made absolute: actors on other processes get locations under it.
        self.location = str(root) if storage.is_uri(root) else os.path.abspath(root)
        self.uri = storage.display(self.location)  # what messages show (no query options)
        try:
            self.filesystem, self.base = storage.resolve(self.location)
        except ValueError as exc:
            raise StoreError(f"store {exc}") from exc
        self.is_local = isinstance(self.filesystem, pafs.LocalFileSystem)

    def __repr__(self) -> str:
        return f"Store({self.uri!r})"

    @property
    def root(self) -> Path:
        """The store's local directory; a store on object storage has none."""
        if not self.is_local:
            raise StoreError(f"{self.uri}: this needs a store on a local (or mounted) path, not on object storage")
        return Path(self.base)

    # ---- paths ----

    def table_dir(self, table: str) -> str:
        if table not in SCHEMAS:
            raise ValueError(f"unknown table {table!r}; tables: {list(TABLES)}")
        return posixpath.join(self.base, table)

    def _experiment_dir(self, table: str, experiment: str) -> str:
        _check_name(experiment, "experiment")
        return posixpath.join(self.table_dir(table), experiment)

    def where(self, path: str) -> str:
        """A path of the store's filesystem as people know it (the URI's scheme in front)."""
        return path if self.is_local else f"{self.uri.split('://', 1)[0]}://{path}"

    def exists(self) -> bool:
        return storage.is_dir(self.filesystem, self.base) or any(
            storage.exists(self.filesystem, self.table_dir(table)) for table in TABLES)

    def log_path(self, experiment: str, trajectory_id: str) -> str:
        """The edit log's location (a path or URI that ``EditLog.save``/``load`` take, in any process)."""
        _check_name(experiment, "experiment")
        _check_name(trajectory_id, "trajectory_id")
        return storage.join(self.location, "logs", experiment, f"{trajectory_id}.safetensors")

    def upload(self, local_dir: str | os.PathLike, name: str) -> str:
        """Copy a local directory's files (e.g. a report) to ``<root>/<name>/``; return where they went."""
        _check_name(name, "directory name")
        local_dir = Path(local_dir)
        for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
            target = posixpath.join(self.base, name, path.relative_to(local_dir).as_posix())
            storage.write_bytes(self.filesystem, target, path.read_bytes())
        return self.where(posixpath.join(self.base, name))

    # ---- one run per experiment ----

    @contextlib.contextmanager
    def lock(self, experiment: str):
        """Hold ``locks/<experiment>.lock`` while a run writes the experiment's rows and logs, so two
        runs of one spec on one store do not interleave. An OS lock (``flock``), released by the
        kernel when its process dies however it dies, so no stale lock is left to clear by hand. A
        store on object storage has no such lock: one run per experiment is then up to the user."""
        _check_name(experiment, "experiment")
        if not self.is_local:
            yield
            return
        path = Path(self.base) / "locks" / f"{experiment}.lock"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(path, "a+", encoding="utf-8")
        except OSError as exc:  # locks/ a file, the lock a directory, a read-only store
            raise StoreError(f"{path}: cannot take the experiment's lock ({exc.strerror or exc}); a lock file "
                             "belongs there, in the directory locks/") from None
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                raise StoreError(f"{path}: experiment {experiment!r} is being run into this store by {holder}; "
                                 "wait for it to finish (or stop it) and run again") from None
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
            handle.flush()
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    # ---- writing ----

    def check_writable(self) -> None:
        """Write and remove a hidden probe file, so that a store that cannot be written fails before
        any actor starts, not at the first row."""
        probe = posixpath.join(self.base, f".eac-write-probe-{os.getpid()}")
        try:
            storage.write_bytes(self.filesystem, probe, b"")
            self.filesystem.delete_file(probe)
        except OSError as exc:
            raise StoreError(f"{self.uri}: the store cannot be written ({exc})") from exc

    def write(self, table: str, experiment: str, name: str, rows: Sequence[dict]) -> str:
        """Write ``rows`` as the file ``<table>/<experiment>/<name>.parquet``, atomically, replacing any
        file of that name. Rows must fit the table's schema; ``experiment`` is filled in."""
        _check_name(name, "file name")
        schema = SCHEMAS[table]
        rows = [{**row, "experiment": experiment} for row in rows]
        for row in rows:
            unknown = set(row) - set(schema.names)
            if unknown:
                raise StoreError(f"{table}: columns {sorted(unknown)} are not in the table "
                                 f"(columns: {schema.names})")
        try:
            data = pa.Table.from_pylist(rows, schema=schema)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise StoreError(f"{table}: rows do not fit the schema: {exc}") from exc
        path = posixpath.join(self._experiment_dir(table, experiment), f"{name}.parquet")
        sink = pa.BufferOutputStream()
        pq.write_table(data, sink)
        storage.write_bytes(self.filesystem, path, sink.getvalue().to_pybytes())
        return path

    def put_trajectory(self, row: dict) -> str:
        return self.write("trajectories", row["experiment"], row["trajectory_id"], [row])

    def put_edits(self, experiment: str, trajectory_id: str, rows: Sequence[dict]) -> str:
        """One file per contiguous run of edit steps, named by its first and last ``edit_index``."""
        if not rows:
            raise ValueError("no edit rows to write")
        indices = [row["edit_index"] for row in rows]
        if indices != list(range(indices[0], indices[0] + len(indices))):
            raise StoreError(f"edits of {trajectory_id}: edit_index not contiguous: {indices}")
        rows = [{**row, "trajectory_id": trajectory_id} for row in rows]
        return self.write("edits", experiment, f"{trajectory_id}-{indices[0]:06d}-{indices[-1]:06d}", rows)

    def put_evaluations(self, experiment: str, trajectory_id: str, n_edits: int, rows: Sequence[dict]) -> str:
        """All rows of one checkpoint in one file."""
        rows = [{**row, "trajectory_id": trajectory_id, "n_edits": n_edits} for row in rows]
        keys = [(r["task"], r["metric"]) for r in rows]
        if len(set(keys)) != len(keys):
            raise StoreError(f"evaluations of {trajectory_id} at {n_edits} edits: repeated task/metric in {keys}")
        return self.write("evaluations", experiment, f"{trajectory_id}-at-{n_edits:06d}", rows)

    def put_examples(self, experiment: str, trajectory_id: str, n_edits: int, rows: Sequence[dict]) -> str | None:
        """All example rows of one checkpoint in one file (none written for no rows)."""
        if not rows:
            return None
        rows = [{**row, "trajectory_id": trajectory_id, "n_edits": n_edits} for row in rows]
        keys = [(r["task"], r["metric"], r["example_id"]) for r in rows]
        if len(set(keys)) != len(keys):
            repeated = sorted(key for key, count in Counter(keys).items() if count > 1)[:3]
            raise StoreError(f"examples of {trajectory_id} at {n_edits} edits: repeated task/metric/example_id "
                             f"{repeated}")
        return self.write("examples", experiment, f"{trajectory_id}-at-{n_edits:06d}", rows)

    def put_checkpoint(self, experiment: str, trajectory_id: str, n_edits: int, rows: Sequence[dict]) -> str:
        """A checkpoint's scores: ``rows`` as an evaluation returns them (each aggregate may carry its
        ``examples``, a list of example dicts). The examples file goes first, then the evaluations file."""
        aggregates, examples = split_examples(rows)
        self.put_examples(experiment, trajectory_id, n_edits, examples)
        return self.put_evaluations(experiment, trajectory_id, n_edits, aggregates)

    # ---- reading ----

    def files(self, table: str, experiment: str | None = None, trajectory_id: str | None = None) -> list[str]:
        """The table's Parquet files (paths in the store's filesystem), sorted; hidden ones skipped."""
        base = self._experiment_dir(table, experiment) if experiment else self.table_dir(table)
        for directory in (self.base, self.table_dir(table), base):  # a file where a directory belongs
            if storage.exists(self.filesystem, directory) and not storage.is_dir(self.filesystem, directory):
                raise StoreError(f"{self.where(directory)}: a file where the store keeps a directory; move it aside")
        try:
            listing = self.filesystem.get_file_info(pafs.FileSelector(base, recursive=not experiment,
                                                                      allow_not_found=True))
        except OSError as exc:
            raise StoreError(f"{self.where(base)}: cannot list the store directory ({exc})") from None
        found = []
        for info in listing:
            parts = posixpath.relpath(info.path, self.table_dir(table)).split("/")
            if info.type != pafs.FileType.File or len(parts) != 2 or not parts[1].endswith(".parquet"):
                continue
            if any(part.startswith((".", "_")) for part in parts):
                continue
            stem = parts[1][: -len(".parquet")]
            # A prefix match alone would also take ids that merely start with this one.
            if trajectory_id and not (stem == trajectory_id or stem.startswith(trajectory_id + "-")):
                continue
            found.append(info.path)
        return sorted(found)

    def read(self, table: str, experiment: str | None = None, trajectory_id: str | None = None) -> pa.Table:
        """The table's rows (optionally of one experiment / trajectory), every file checked."""
        schema = SCHEMAS[table]
        parts = []
        seen: dict[tuple, str] = {}  # a row's key -> the file that holds it
        for path in self.files(table, experiment, trajectory_id):
            try:
                written = pq.read_schema(path, filesystem=self.filesystem)
                columns = written.names
                part = pq.read_table(path, schema=schema, filesystem=self.filesystem)
            except (OSError, pa.ArrowException) as exc:
                raise StoreError(f"{self.where(path)}: unreadable Parquet file in table {table!r} ({exc}). It was "
                                 "left in place; move it aside to redo the work it held, or restore it") from exc
            missing = [name for name in schema.names
                       if name not in columns and name not in ADDED_COLUMNS.get(table, ())]
            if missing:  # reading with the schema would fill them with nulls
                raise StoreError(f"{self.where(path)}: not a file of table {table!r} (columns {missing} missing). "
                                 "It was left in place; move it aside")
            # Reading with the schema casts what it can (edit_index "3" as a string becomes 3): a file
            # written by anything but this store would pass for valid rows.
            wrong = [f"{field.name} is {written.field(field.name).type}, not {field.type}" for field in schema
                     if field.name in written.names and not written.field(field.name).type.equals(field.type)]
            if wrong:
                raise StoreError(f"{self.where(path)}: not a file of table {table!r} (column {wrong[0]}). It was "
                                 "left in place; move it aside")
            if trajectory_id is not None:
                part = part.filter(ds.field("trajectory_id") == trajectory_id)
            if table == "trajectories":
                try:
                    part = split_statuses(part)
                except ValueError as exc:
                    raise StoreError(f"{self.where(path)}: {exc}") from exc
            # A stray copy of a file (another name, the same rows) would count its rows twice.
            for key in zip(*(part.column(name).to_pylist() for name in KEYS[table])):
                if key in seen:
                    raise StoreError(f"{self.where(path)}: row {dict(zip(KEYS[table], key))} of table {table!r} "
                                     f"is also in {self.where(seen[key])}; move the stray copy aside")
                seen[key] = path
            parts.append(part)
        return pa.concat_tables(parts) if parts else schema.empty_table()

    def frame(self, table: str, experiment: str | None = None, trajectory_id: str | None = None):
        """``read`` as a pandas DataFrame, sorted by the table's keys."""
        frame = self.read(table, experiment, trajectory_id).to_pandas()
        return frame.sort_values(list(KEYS[table]), ignore_index=True)

    def experiments(self) -> list[str]:
        """Experiments with a trajectory row (their names, from the trajectories table's files)."""
        return sorted({posixpath.basename(posixpath.dirname(path)) for path in self.files("trajectories")})

    # ---- progress of one trajectory ----

    def trajectory(self, experiment: str, trajectory_id: str) -> dict | None:
        rows = self.read("trajectories", experiment, trajectory_id).to_pylist()
        return rows[0] if rows else None

    def edit_steps_done(self, experiment: str, trajectory_id: str) -> int:
        """How many edit steps, counted from the first, have rows (the contiguous prefix)."""
        indices = set(self.read("edits", experiment, trajectory_id).column("edit_index").to_pylist())
        done = 0
        while done in indices:
            done += 1
        return done

    def evaluated_checkpoints(self, experiment: str, trajectory_id: str) -> set[int]:
        return set(self.read("evaluations", experiment, trajectory_id).column("n_edits").to_pylist())


def split_examples(rows: Sequence[dict]) -> tuple[list[dict], list[dict]]:
    """(aggregate rows without their ``examples``, example rows with their row's task and metric)."""
    aggregates, examples = [], []
    for row in rows:
        row = dict(row)
        for example in row.pop("examples", None) or ():
            examples.append({"task": row["task"], "metric": row["metric"], **example})
        aggregates.append(row)
    return aggregates, examples


def edit_row(record: Any) -> dict:
    """A row of the ``edits`` table from an editor's record (``EditRecord`` or a dict of its fields):
    the record's fields in their columns, anything else as JSON in ``extra``."""
    data = asdict(record) if is_dataclass(record) else dict(record)
    case_ids = data.pop("case_ids", None)
    if case_ids is None:
        case_ids = [data.pop("case_id")]
    seconds = {k: float(v) for k, v in (data.pop("seconds", None) or {}).items()}
    row = {"case_id": ",".join(str(c) for c in case_ids), "n_requests": len(case_ids),
           "seconds": seconds, "seconds_total": seconds.get("total")}
    for name, kind in record_fields().items():
        if name in SPLIT_FIELDS:
            continue
        value = data.pop(name, None)
        if kind is bool:
            row[name] = bool(value)  # a missing flag is False
        elif kind == dict[str, float]:
            row[name] = {k: float(v) for k, v in (value or {}).items()}
        else:
            row[name] = None if value is None else kind(value)
    row["extra"] = json.dumps(data, sort_keys=True, default=str) if data else None
    return row


def _check_name(value: str, what: str) -> None:
    if not isinstance(value, str) or not _SAFE.match(value):
        raise StoreError(f"{what} {value!r} cannot name a store file (letters, digits, '_', '.', '-')")
