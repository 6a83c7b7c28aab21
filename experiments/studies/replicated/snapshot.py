"""Copy the replicated study's complete trajectories from a running study's store into the committed one.

    .venv/bin/python experiments/studies/replicated/snapshot.py STATE_STORE [COMMITTED_STORE]
        COMMITTED_STORE: default experiments/results/replicated/store

Only trajectories whose status is completed are copied, with every table file of theirs (trajectories,
edits, evaluations, examples) and not their edit logs (megabytes of weight deltas each; a completed
trajectory is never replayed), so the committed store, its report and `claims.py` read the same
finished arms and seeds. A running study can go on writing its own store meanwhile: files are copied
whole (each is written under a temporary name and renamed). A study resumed on another machine can
start from the committed store: copy it to its state directory, and what is complete is skipped.
"""
import shutil
import sys
from pathlib import Path

from orchestrator.status import Status
from orchestrator.store import TABLES, Store

EXPERIMENT = "replicated-smollm2"
COMMITTED = Path(__file__).resolve().parents[3] / "experiments" / "results" / "replicated" / "store"


def main() -> None:
    source = Store(Path(sys.argv[1]))
    target = Path(sys.argv[2]) if len(sys.argv) > 2 else COMMITTED
    trajectories = source.frame("trajectories", EXPERIMENT)
    complete = set(trajectories.loc[trajectories["status"] == Status.COMPLETED, "trajectory_id"])
    copied = 0
    for table in TABLES:
        destination = target / table / EXPERIMENT
        destination.mkdir(parents=True, exist_ok=True)
        for trajectory_id in sorted(complete):
            for path in source.files(table, EXPERIMENT, trajectory_id):
                shutil.copy2(path, destination / Path(path).name)
                copied += 1
    print(f"{len(complete)} complete trajectories, {copied} table files -> {target}")


if __name__ == "__main__":
    main()
