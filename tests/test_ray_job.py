"""Issue 32, item 2: `eac run` submitted as a Ray job to a head whose servers, its job server included,
listen on loopback only (``ray start --head`` with Ray's single-node switch, a per-test token).

The job's runtime environment sets ``EAC_DATA_DIR`` and ``EAC_CACHE_DIR`` (as a user does with
``ray job submit --runtime-env-json``): `eac run` inside the job used to set them again in its own
``ray.init`` and Ray refused it ("Failed to merge the Job's runtime env"). The cache is empty, so the
trajectory actor computes its statistics: its progress bar was a line per redraw in the job's log.
The log must read as plain lines. 75 s at moderate load, 179 s under heavy load (the head's start-up,
then the run's two actors).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq

BIN = Path(sys.executable).parent
SUBMIT_SECONDS = 120  # the head's job agent registers some seconds after `ray start` returns
JOB_SECONDS = 600


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def processes_under(directory: str) -> list[psutil.Process]:
    """The head's processes (their command lines name its temp dir) and their children."""
    found = {}
    for process in psutil.process_iter(["cmdline"]):
        if directory in " ".join(process.info["cmdline"] or []):
            found[process.pid] = process
            try:
                found.update({child.pid: child for child in process.children(recursive=True)})
            except psutil.Error:
                pass
    return list(found.values())


def stop(processes: list[psutil.Process]) -> None:
    """This test's head only (`ray stop` would stop every Ray instance on the machine)."""
    for process in processes:
        try:
            process.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(processes, timeout=10)
    for process in alive:
        try:
            process.kill()
        except psutil.Error:
            pass


def test_a_run_submitted_as_a_ray_job_logs_plain_lines(tmp_path, data_root):
    from ray.job_submission import JobStatus, JobSubmissionClient

    spec = tmp_path / "spec.yaml"
    spec.write_text(json.dumps({
        "experiment": "job", "models": ["tiny-gpt2"], "methods": ["rome"], "datasets": ["counterfact"],
        "n_edits": 2, "checkpoints": [0, 2], "selection": "first",
        "evaluation": {"tasks": {"nli": 2}, "edit_metrics": ["counterfact"], "drift_examples": 0},
        "resources": {"trajectory": {"num_cpus": 0.5}, "evaluation": {"num_cpus": 0.5, "actors": 1}}}))
    ray_tmp = tempfile.mkdtemp(prefix="eac-job-", dir="/tmp")  # short: Ray's Unix socket paths
    dashboard = free_port()
    token = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env = {**os.environ, **token, "RAY_USAGE_STATS_ENABLED": "0", "PATH": f"{BIN}:{os.environ['PATH']}",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # Ray's single-node switch: every server on loopback
    started = subprocess.run(
        [str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={free_port()}",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         f"--dashboard-agent-listen-port={free_port()}", "--num-cpus=2", f"--temp-dir={ray_tmp}",
         "--disable-usage-stats"], env=env, capture_output=True, text=True, timeout=180)
    try:
        assert started.returncode == 0, started.stderr[-3000:]
        # The token as a header: this process's Ray read its (absent) auth settings when it started.
        client = JobSubmissionClient(f"http://127.0.0.1:{dashboard}",
                                     headers={"Authorization": f"Bearer {token['RAY_AUTH_TOKEN']}"})
        runtime_env = {"env_vars": {"EAC_DATA_DIR": str(data_root), "EAC_CACHE_DIR": str(tmp_path / "cache")}}
        entrypoint = f"{BIN / 'eac'} run {spec} --store {tmp_path / 'store'} --address auto --no-report"
        deadline = time.monotonic() + SUBMIT_SECONDS
        while True:
            try:
                job = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
                break
            except RuntimeError as exc:
                if "No available agent" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(1)
        listening = sorted({(c.laddr.ip, p.name()) for p in processes_under(ray_tmp)
                            for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN})
        deadline = time.monotonic() + JOB_SECONDS
        while client.get_job_status(job) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            assert time.monotonic() < deadline, client.get_job_logs(job)[-3000:]
            time.sleep(1)
        status, log = client.get_job_status(job), client.get_job_logs(job)
    finally:
        stop(processes_under(ray_tmp))
        shutil.rmtree(ray_tmp, ignore_errors=True)

    assert listening and all(ip in ("127.0.0.1", "::1", "::ffff:127.0.0.1") for ip, _ in listening), listening
    assert status == JobStatus.SUCCEEDED, log[-3000:]
    assert "\r" not in log and "%|" not in log, log[-3000:]  # no progress bar, the driver's or an actor's
    lines = log.splitlines()
    assert any("tiny-gpt2/rome/counterfact/seed0: 2/2 edits" in line for line in lines), log[-3000:]
    assert any(line.endswith("tiny-gpt2/rome/counterfact/seed0: completed") for line in lines), log[-3000:]
    assert list((tmp_path / "cache" / "stats").glob("*.safetensors"))  # the actor did compute statistics
    scored = sorted((tmp_path / "store" / "evaluations" / "job").glob("*.parquet"))
    assert [path.stem.rsplit("-at-", 1)[1] for path in scored] == ["000000", "000002"]
    assert pq.read_table(scored[-1]).num_rows > 0
