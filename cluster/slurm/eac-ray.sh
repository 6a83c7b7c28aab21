#!/usr/bin/env bash
# Start a Ray cluster inside a Slurm allocation and run eac on it — Ray's documented pattern for Slurm:
# the head on the allocation's first node, one worker on each other node (both through `srun`, each
# blocking in its job step), then the driver on the head node joins with `--address`.
#
#   sbatch cluster/slurm/eac.sbatch experiments/configs/counterfact-llama3-8b.yaml /shared/eac-store
#   # or, inside an allocation (salloc) — the arguments after the script go to `eac`:
#   cluster/slurm/eac-ray.sh run experiments/configs/counterfact-llama3-8b.yaml --store /shared/eac-store
#
# Every node runs the same locked environment `make setup` builds (the checkout on a shared file
# system; EAC_VENV, default ./.venv), like every cluster.yaml node. The store must be a path every
# node sees (or s3://...). Settings (environment):
#   EAC_VENV          the virtual environment (default: .venv beside this checkout)
#   EAC_RAY_PORT      the head's GCS port (default 6379)
#   EAC_HEAD_IP       the head's address (default: `hostname --ip-address` on the first node, via srun)
#   EAC_RAY_TMPDIR    Ray's temp dir on each node (default: Ray's own)
#   EAC_RAY_WAIT      seconds to wait for all nodes to join (default 120)
#   RAY_AUTH_TOKEN    Ray's token (default: a fresh one for the job, passed to every job step)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
venv="${EAC_VENV:-$here/.venv}"
ray="$venv/bin/ray"
eac="$venv/bin/eac"
port="${EAC_RAY_PORT:-6379}"
wait_s="${EAC_RAY_WAIT:-120}"

die() { echo "eac-ray.sh: $*" >&2; exit 2; }
[ -n "${SLURM_JOB_ID:-}" ] || die "not inside a Slurm allocation (SLURM_JOB_ID is unset): use sbatch or salloc"
[ -n "${SLURM_JOB_NODELIST:-}" ] || die "SLURM_JOB_NODELIST is unset"
[ -x "$ray" ] || die "no Ray at $ray: run 'make setup' on the shared checkout (or set EAC_VENV)"
[ "$#" -ge 1 ] || die "usage: eac-ray.sh <eac command and arguments, e.g. run spec.yaml --store DIR>"

mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
[ "${#nodes[@]}" -ge 1 ] || die "no node in SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST"
head_node="${nodes[0]}"
head_ip="${EAC_HEAD_IP:-$(srun --nodes=1 --ntasks=1 -w "$head_node" hostname --ip-address | awk '{print $1}')}"
address="$head_ip:$port"
cpus="${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}"
gpus="${SLURM_GPUS_PER_TASK:-0}"
tmp_args=()
[ -n "${EAC_RAY_TMPDIR:-}" ] && tmp_args=(--temp-dir "$EAC_RAY_TMPDIR")

# Ray's token authentication, one token per job: every job step inherits the environment (srun's
# default --export=ALL), so the head, the workers and the driver share it and nobody else has it.
export RAY_AUTH_MODE=token
if [ -z "${RAY_AUTH_TOKEN:-}" ] && [ -z "${RAY_AUTH_TOKEN_PATH:-}" ]; then
    RAY_AUTH_TOKEN="$("$venv/bin/python" -c 'import secrets; print(secrets.token_hex(32))')"
    export RAY_AUTH_TOKEN
fi

steps=()
cleanup() {
    for pid in "${steps[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT

echo "eac-ray.sh: head $head_node ($address), ${#nodes[@]} node(s), $cpus CPU(s) and $gpus GPU(s) each"
srun --nodes=1 --ntasks=1 -w "$head_node" \
    "$ray" start --head --node-ip-address="$head_ip" --port="$port" --num-cpus="$cpus" --num-gpus="$gpus" \
    --include-dashboard=false --disable-usage-stats "${tmp_args[@]}" --block &
steps+=("$!")
for node in "${nodes[@]:1}"; do
    srun --nodes=1 --ntasks=1 -w "$node" \
        "$ray" start --address="$address" --num-cpus="$cpus" --num-gpus="$gpus" --disable-usage-stats --block &
    steps+=("$!")
done

# Wait until every node has joined (Ray's example sleeps; this asks the head instead).
timeout "$((wait_s + 30))" "$venv/bin/python" - "$address" "${#nodes[@]}" "$wait_s" <<'PY'
import sys, time
import ray

address, expected, limit = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
deadline = time.monotonic() + limit
while True:
    try:
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        alive = 0
        while alive < expected and time.monotonic() < deadline:
            alive = sum(node["Alive"] for node in ray.nodes())
            if alive < expected:
                time.sleep(1)
        ray.shutdown()
        break
    except ConnectionError:
        if time.monotonic() > deadline:
            raise SystemExit(f"eac-ray.sh: no Ray head at {address} after {limit:g} s")
        time.sleep(1)
if alive < expected:
    raise SystemExit(f"eac-ray.sh: {alive} of {expected} nodes joined within {limit:g} s")
print(f"eac-ray.sh: {alive} node(s) up", flush=True)
PY

"$eac" "$@" --address "$address"
