"""A trajectory's status as data: one of ``Status`` in ``trajectories.status``, and why (for a failed,
interrupted or stopped trajectory) in ``trajectories.reason``.

Stores written before the ``reason`` column held both in one string — ``"failed: <reason>"``,
``"stopped: <reason>"``, ``"interrupted (<reason>)"`` — and are still read: ``split_statuses`` turns
such rows into a status and a reason when the store reads them.
"""

from __future__ import annotations

import enum

import pyarrow as pa


class Status(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"  # every edit stored and every checkpoint scored
    FAILED = "failed"  # an error in the editor, the evaluation or the driver; not retried by a re-run
    INTERRUPTED = "interrupted"  # stopped from outside (Ctrl-C); a re-run resumes it
    STOPPED = "stopped"  # cut by a Tune scheduler

    @property
    def finished(self) -> bool:
        """A re-run leaves it as it is."""
        return self in (Status.COMPLETED, Status.FAILED)


# How the old single-string statuses wrote their reason: (prefix, suffix) around it.
LEGACY_FORMS = ((Status.FAILED, "failed: ", ""), (Status.STOPPED, "stopped: ", ""),
                (Status.INTERRUPTED, "interrupted (", ")"))


def parse_status(text: str, reason: str | None = None) -> tuple[Status, str | None]:
    """``(status, reason)`` from a stored status and reason, or from an old status string that holds
    its reason; ValueError for anything else."""
    if text in {status.value for status in Status}:
        return Status(text), reason
    for status, prefix, suffix in LEGACY_FORMS:
        if reason is None and text.startswith(prefix) and text.endswith(suffix):
            return status, text[len(prefix):len(text) - len(suffix)]
    raise ValueError(f"status {text!r} is not one of {[s.value for s in Status]}")


def status_text(status: Status | str, reason: str | None) -> str:
    """One line for people: ``failed: actor died: ...``, or the status alone (also for a missing reason
    read from a table, where pandas gives NaN)."""
    return f"{status}: {reason}" if isinstance(reason, str) and reason else str(status)


def split_statuses(table: pa.Table) -> pa.Table:
    """A trajectories table whose ``status`` column holds only ``Status`` values and whose ``reason``
    column says why (old rows' reasons moved out of their status strings)."""
    parsed = [parse_status(text, reason) for text, reason in
              zip(table.column("status").to_pylist(), table.column("reason").to_pylist())]
    table = table.set_column(table.schema.get_field_index("status"), table.schema.field("status"),
                             pa.array([status.value for status, _ in parsed], pa.string()))
    return table.set_column(table.schema.get_field_index("reason"), table.schema.field("reason"),
                            pa.array([reason for _, reason in parsed], pa.string()))
