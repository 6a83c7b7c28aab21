"""Issue 12, item 2: the local Ray instance `eac run` starts listens on the loopback interface only
(a server on another interface lets anyone who reaches the machine and passes Ray's authentication,
if it is on at all, run code in the job). Runs in a fresh interpreter so that no Ray instance of another test is reused.
A second driver joins that instance by its address, as `eac run --address 127.0.0.1:PORT` does."""

import json
import os
import subprocess
import sys
import textwrap

JOIN = textwrap.dedent("""
    import sys
    import ray
    from orchestrator.cluster import connect

    assert connect(sys.argv[1])
    assert ray.cluster_resources()["CPU"] > 0
    ray.shutdown()
""")
PROBE = textwrap.dedent("""
    import json, os, subprocess, sys
    import psutil, ray
    from orchestrator.cluster import connect
    JOIN = sys.argv[2]

    assert connect()  # what `eac run` and `eac tune` do without --address
    try:
        @ray.remote
        def pid():
            return os.getpid()
        ray.get(pid.remote())  # a worker process is up too
        # Another driver joins by the address (a driver taking the routable node address waited for
        # a raylet there without end).
        joined = subprocess.run([sys.executable, "-c", JOIN, ray.get_runtime_context().gcs_address],
                                capture_output=True, text=True, timeout=90)
        assert joined.returncode == 0, joined.stderr[-2000:]
        me = psutil.Process()
        processes = [me, *me.children(recursive=True)]
        listening = sorted({(c.laddr.ip, p.name()) for p in processes
                            for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN})
        token = os.path.expanduser("~/.ray/auth_token")
        session = ray._private.worker._global_node.get_session_dir_path()
        modes = {name: os.stat(path).st_mode & 0o777 for name, path in
                 (("token", token), ("token_dir", os.path.dirname(token)), ("session", session))}
        print(json.dumps({"listening": listening, "node_ip": ray.util.get_node_ip_address(), "modes": modes}))
    finally:
        ray.shutdown()
""")


def test_local_ray_listens_on_loopback_only(tmp_path):
    # Issue 36 item 6: a token Ray wrote world-readable before is made private, the session directory too.
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("0" * 64)
    (home / ".ray" / "auth_token").chmod(0o644)
    env = {key: value for key, value in os.environ.items() if key not in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    # RAY_ADDRESS names a cluster (here a dead port): with no address, ray.init joins the cluster that
    # RAY_ADDRESS or the last `ray start` on the machine names, so two runs shared one instance and
    # another cluster's shutdown killed this run's actors. A run without --address starts its own.
    done = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path / "store"), JOIN], capture_output=True,
                          text=True, timeout=180, env={**env, "HOME": str(home), "RAY_ADDRESS": "127.0.0.1:9"})
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["listening"], "no listening server found: the probe sees no Ray process"
    assert found["node_ip"] == "127.0.0.1"
    exposed = [(ip, name) for ip, name in found["listening"] if ip not in ("127.0.0.1", "::1", "::ffff:127.0.0.1")]
    assert not exposed, f"servers listening beyond loopback: {exposed}"
    assert found["modes"] == {"token": 0o600, "token_dir": 0o700, "session": 0o700}, found["modes"]


def test_only_host_port_addresses_on_loopback_join_as_a_loopback_node():
    from orchestrator.cluster import is_loopback_address

    assert all(is_loopback_address(a) for a in ("127.0.0.1:6379", "localhost:6379", "[::1]:6379"))
    # A routable cluster keeps its own network settings; `auto` and Ray Client addresses are Ray's to resolve.
    assert not any(is_loopback_address(a) for a in ("10.0.0.5:6379", "auto", "ray://127.0.0.1:10001", "127.0.0.1"))

