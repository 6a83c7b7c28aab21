"""Issue 36, items 5 and 6: SIGTERM (what `ray job stop` and batch schedulers send) stops `eac run`
as Ctrl-C does — trajectories `interrupted`, one exit code (143), the resume hint — and a run reaps
the Ray processes that a SIGKILLed run left behind; the token that guards a local instance is its
owner's alone. One `eac run` process, stopped as soon as its Ray instance is up."""

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from orchestrator import cluster
from orchestrator.store import Store

SPEC = {"experiment": "signals", "models": ["tiny-gpt2"], "methods": ["rome"], "datasets": ["counterfact"],
        "n_edits": 4, "checkpoints": [0, 4], "evaluation": {"tasks": {"wikitext": 1}, "perplexity_window": 64,
                                                            "perplexity_stride": 64},
        "resources": {"trajectory": {"num_cpus": 1}, "evaluation": {"num_cpus": 1, "actors": 1}}}


def start_run(spec, store, env):
    return subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "run", str(spec), "--store", str(store),
                             "--no-report", "--progress", "lines"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=Path(__file__).resolve().parent.parent)


def wait_for_record(directory: Path, pid: int, process, timeout=120.0) -> dict:
    """The run's record of its local Ray instance, once Ray is up."""
    path = directory / f"{pid}.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return json.loads(path.read_text())
        if process.poll() is not None:
            pytest.fail(f"eac run ended ({process.returncode}) before Ray started: {process.stderr.read()[-2000:]}")
        time.sleep(0.2)
    process.kill()
    pytest.fail("eac run's Ray instance did not start")


def alive(record: dict) -> list[int]:
    return [pid for pid, start in record["processes"] if cluster.process_start(pid) == start]


# A driver as a SIGKILLed `eac run` leaves one: its record written, a child (standing for Ray's agents) left.
KILLED_DRIVER = """
import subprocess, sys, time
from orchestrator import cluster
child = subprocess.Popen(["sleep", "600"])
print(cluster.record_instance(), flush=True)
time.sleep(600)
"""


def test_sigterm_interrupts_like_ctrl_c_and_a_run_reaps_what_a_killed_one_left(tmp_path, data_root):
    spec, store = tmp_path / "spec.yaml", tmp_path / "store"
    spec.write_text(yaml.safe_dump(SPEC))
    env = {**os.environ, "EAC_CACHE_DIR": str(tmp_path / "cache"), "EAC_DATA_DIR": str(data_root)}
    records = tmp_path / "cache" / "ray-instances"

    killed = subprocess.Popen([sys.executable, "-c", KILLED_DRIVER], stdout=subprocess.PIPE, text=True, env=env,
                              cwd=Path(__file__).resolve().parent.parent)
    left = json.loads(Path(killed.stdout.readline().strip()).read_text())
    assert left["processes"], "the driver recorded no child"
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=30)
    assert alive(left), "the child died with its driver: nothing left to reap"

    terminated = start_run(spec, store, env)
    wait_for_record(records, terminated.pid, terminated)  # its Ray is up: the leftovers were reaped before
    assert not alive(left), f"processes of the killed run still alive: {alive(left)}"
    assert not (records / f"{killed.pid}.json").exists()
    time.sleep(1.0)
    terminated.send_signal(signal.SIGTERM)
    out, err = terminated.communicate(timeout=120)
    assert terminated.returncode == 143, err[-3000:]
    assert "again resumes from the store" in err and "Traceback" not in err, err[-3000:]
    (row,) = Store(store).frame("trajectories").to_dict("records")
    assert row["status"] == "interrupted"
    assert not (records / f"{terminated.pid}.json").exists()  # shut down cleanly: nothing left to reap


def test_reaping_spares_a_live_driver_and_a_reused_pid(tmp_path, monkeypatch):
    """Only the very processes recorded (pid and start time) of a driver that is gone are stopped."""
    monkeypatch.setenv("EAC_CACHE_DIR", str(tmp_path))
    bystander = subprocess.Popen(["sleep", "600"])
    try:
        records = cluster.instances_dir()
        records.mkdir(parents=True)
        start = cluster.process_start(bystander.pid)
        # A live driver (this process) and a dead one whose pid now names another process (wrong start).
        (records / "live.json").write_text(json.dumps({"driver": [os.getpid(), cluster.process_start(os.getpid())],
                                                       "processes": [[bystander.pid, start]]}))
        (records / "reused.json").write_text(json.dumps({"driver": [2**22 + 7, "1"],
                                                         "processes": [[bystander.pid, str(int(start) - 1)]]}))
        cluster.reap_leftovers(grace=0.5)
        assert bystander.poll() is None and (records / "live.json").exists() and not (records / "reused.json").exists()
    finally:
        bystander.kill()


def test_the_ray_token_is_written_0600_in_a_0700_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    token = tmp_path / ".ray" / "auth_token"
    cluster.private_token()  # none yet: written by us, never readable by others
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and stat.S_IMODE(token.parent.stat().st_mode) == 0o700
    assert len(token.read_text()) >= 32
    token.chmod(0o644)  # as Ray writes it
    token.parent.chmod(0o755)
    before = token.read_text()
    cluster.private_token()
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and stat.S_IMODE(token.parent.stat().st_mode) == 0o700
    assert token.read_text() == before  # the same token: instances already started with it still accept it
