"""Issue 32, item 4: cluster/slurm/eac-ray.sh inside a fake two-node Slurm allocation.

The allocation is the SLURM_* variables and two shims on PATH: ``scontrol show hostnames`` expands
the node list, ``srun -w NODE CMD`` runs CMD here (it stands in for the remote node: each ``ray start`` gets its own
dashboard-agent port, as separate hosts would have, and the loopback address as its node address). What runs is real: the
script starts a Ray head and a worker (two raylets on loopback), waits for both to join, then runs
``eac run --address`` with a tiny spec whose trajectory and evaluation go through that cluster.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "cluster" / "slurm" / "eac-ray.sh"

SCONTROL = textwrap.dedent("""\
    #!/usr/bin/env bash
    # scontrol show hostnames "node[1-2]" or "node1,node2"
    [ "$1 $2" = "show hostnames" ] || { echo "fake scontrol: $*" >&2; exit 1; }
    list="$3"
    if [[ "$list" =~ ^([a-z]+)\\[([0-9]+)-([0-9]+)\\]$ ]]; then
        for i in $(seq "${BASH_REMATCH[2]}" "${BASH_REMATCH[3]}"); do echo "${BASH_REMATCH[1]}$i"; done
    else
        tr ',' '\\n' <<< "$list"
    fi
""")
SRUN = textwrap.dedent("""\
    #!/usr/bin/env bash
    # srun --nodes=1 --ntasks=1 -w NODE CMD...: runs CMD here, logging the node it was meant for.
    node=""
    while [ "$#" -gt 0 ]; do
        case "$1" in
            -w) node="$2"; shift 2 ;;
            --*) shift ;;
            *) break ;;
        esac
    done
    echo "$node $*" >> "$SRUN_LOG"
    if [ "$2" = "start" ]; then  # ray start: one agent port per fake host, every fake host on loopback
        port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
        [[ " $* " == *" --head "* ]] || set -- "$@" --node-ip-address=127.0.0.1
        exec "$@" --dashboard-agent-listen-port="$port"
    fi
    exec "$@"
""")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_the_slurm_launcher_runs_a_spec_on_a_two_node_ray_cluster(tmp_path, data_root):
    shims = tmp_path / "bin"
    shims.mkdir()
    for name, text in (("scontrol", SCONTROL), ("srun", SRUN)):
        (shims / name).write_text(text)
        (shims / name).chmod(0o755)
    spec = tmp_path / "tiny.yaml"
    spec.write_text(json.dumps({
        "experiment": "slurm", "models": ["tiny-gpt2"], "methods": ["rome"], "datasets": ["counterfact"],
        "n_edits": 2, "checkpoints": [0, 2], "selection": "first",
        "evaluation": {"tasks": {"nli": 2}, "edit_metrics": ["counterfact"], "drift_examples": 0},
        "resources": {"trajectory": {"num_cpus": 0.5}, "evaluation": {"num_cpus": 0.5, "actors": 1}},
    }))
    store = tmp_path / "store"
    # Ray's sockets live under its temp dir, and a Unix socket path has at most 107 bytes: pytest's
    # tmp_path is too deep for it (the head dies before it logs anything).
    ray_tmp = tempfile.mkdtemp(prefix="eac-ray-", dir="/tmp")
    env = {**os.environ, "PATH": f"{shims}:{Path(sys.executable).parent}:{os.environ['PATH']}",
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_CPUS_PER_TASK": "1",
           "SRUN_LOG": str(tmp_path / "srun.log"), "EAC_HEAD_IP": "127.0.0.1", "EAC_RAY_PORT": str(free_port()),
           "EAC_VENV": str(Path(sys.executable).parent.parent), "EAC_RAY_TMPDIR": ray_tmp,
           "EAC_DATA_DIR": str(data_root), "RAY_USAGE_STATS_ENABLED": "0"}
    done = subprocess.run([str(SCRIPT), "run", str(spec), "--store", str(store), "--progress", "lines"],
                          env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    assert "2 node(s) up" in done.stdout
    # The head on the first node, the worker on the second, each through srun; then the driver joined.
    launched = (tmp_path / "srun.log").read_text().splitlines()
    starts = {line.split()[0]: line for line in launched if " start " in line}
    assert sorted(starts) == ["node1", "node2"]
    assert "--head" in starts["node1"] and "--head" not in starts["node2"]
    scored = sorted(path.stem.rsplit("-at-", 1)[1] for path in (store / "evaluations" / "slurm").glob("*.parquet"))
    assert scored == ["000000", "000002"]
    assert pq.read_table(next((store / "evaluations" / "slurm").glob("*-at-000002.parquet"))).num_rows > 0
    # The script stopped its job steps: no raylet of this cluster is left.
    left = subprocess.run(["pgrep", "-f", ray_tmp], capture_output=True, text=True)
    assert not left.stdout.strip(), left.stdout
    shutil.rmtree(ray_tmp, ignore_errors=True)


def test_the_launcher_refuses_to_run_outside_an_allocation(tmp_path):
    env = {key: value for key, value in os.environ.items() if not key.startswith("SLURM_")}
    done = subprocess.run([str(SCRIPT), "run", "spec.yaml"], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert done.stderr.strip() == ("eac-ray.sh: not inside a Slurm allocation (SLURM_JOB_ID is unset): "
                                   "use sbatch or salloc")
