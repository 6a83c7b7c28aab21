"""Fault injection for the reliability tests (tests/test_fault_property.py). Off unless the environment
variable ``EAC_FAULTS`` names a fault plan; nothing in a normal run sets it.

The actors call ``fault_point(point, **where)`` where a process can die with work in flight:

- ``edit`` (trajectory actor): an edit step has been computed, its event has not left the actor;
- ``checkpoint-save``: the checkpoint's last edit event has left, its edit log is not saved yet;
- ``checkpoint-event``: the edit log is saved, the checkpoint's event has not left the actor;
- ``scoring`` (evaluation actor): the checkpoint's model is being scored, no row has left.

A plan is a JSON list of faults ``{"id": ..., "point": ..., "where": {...}, "action": ...}``; ``where``
holds values the call's context must match (``trajectory_id``, ``step``; ``steps`` for scoring). The first
matching call of a fault not yet fired creates ``<plan>.fired/<id>`` (exclusively, so each fault fires
once, and the restarted actor goes on) holding the process's id, then acts:

- ``kill`` (the default): SIGKILL to its own process: no handler, no clean-up, as when the kernel kills
  an actor for memory;
- ``pause``: the process waits at this point until ``<plan>.fired/<id>.release`` exists, its work in
  flight, so that a test can take its whole node away at a known moment (tests/test_multinode.py).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

FAULTS_ENV = "EAC_FAULTS"
POINTS = ("edit", "checkpoint-save", "checkpoint-event", "scoring")  # every place that calls fault_point
ACTIONS = ("kill", "pause")
PAUSE_POLL_SECONDS = 0.1


def fault_point(point: str, **where) -> None:
    """Kill this process here if the plan named by ``EAC_FAULTS`` holds an unfired fault for this place."""
    if point not in POINTS:  # a misspelt place would never fire, and its test would pass for nothing
        raise ValueError(f"unknown fault point {point!r}; known: {list(POINTS)}")
    plan = os.environ.get(FAULTS_ENV)
    if not plan:
        return
    for fault in json.loads(Path(plan).read_text(encoding="utf-8")):
        if fault["point"] not in POINTS:
            raise ValueError(f"{plan}: fault {fault.get('id')!r} names unknown point {fault['point']!r}; "
                             f"known: {list(POINTS)}")
        if fault["point"] != point or any(where.get(key) != value for key, value in fault["where"].items()):
            continue
        action = fault.get("action", "kill")
        if action not in ACTIONS:
            raise ValueError(f"{plan}: fault {fault.get('id')!r} names unknown action {action!r}; known: {list(ACTIONS)}")
        marker = Path(f"{plan}.fired") / str(fault["id"])
        marker.parent.mkdir(exist_ok=True)
        try:
            descriptor = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            continue
        os.write(descriptor, str(os.getpid()).encode())
        os.close(descriptor)
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        release = Path(f"{marker}.release")
        while not release.exists():
            time.sleep(PAUSE_POLL_SECONDS)
