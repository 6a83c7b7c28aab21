"""Issue 12, item 2: the local Ray instance `eac run` starts listens on the loopback interface only
(Ray has no authentication: a server on another interface lets anyone who reaches the machine run
code in the job). Runs in a fresh interpreter so that no Ray instance of another test is reused."""

import json
import subprocess
import sys
import textwrap

PROBE = textwrap.dedent("""
    import json, os, sys
    import psutil, ray
    from orchestrator.driver import connect

    assert connect()  # what `eac run` and `eac tune` do without --address
    try:
        @ray.remote
        def pid():
            return os.getpid()
        ray.get(pid.remote())  # a worker process is up too
        me = psutil.Process()
        processes = [me, *me.children(recursive=True)]
        listening = sorted({(c.laddr.ip, p.name()) for p in processes
                            for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN})
        print(json.dumps({"listening": listening, "node_ip": ray.util.get_node_ip_address()}))
    finally:
        ray.shutdown()
""")


def test_local_ray_listens_on_loopback_only(tmp_path):
    done = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path / "store")], capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["listening"], "no listening server found: the probe sees no Ray process"
    assert found["node_ip"] == "127.0.0.1"
    exposed = [(ip, name) for ip, name in found["listening"] if ip not in ("127.0.0.1", "::1", "::ffff:127.0.0.1")]
    assert not exposed, f"servers listening beyond loopback: {exposed}"
