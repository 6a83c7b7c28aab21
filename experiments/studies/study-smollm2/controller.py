"""Run the study's arms in rounds: each round's `eac run` is stopped (SIGINT, resumable) once every arm
of the round has its evaluation at the round's target checkpoint. Trajectories are those of the full
study specs (same fields), so they resume later from the same store.

    cd WORKDIR && EAC_DATA_DIR=... STUDY_PLAN="2:300" /path/to/eac/.venv/bin/python \
        /path/to/eac/experiments/studies/study-smollm2/controller.py

The round files (`round<N>.yaml`) are read from beside this script; the store (`STUDY_STORE`, default
`store`), the controller's log and each round's run log are in the working directory (`STUDY_DIR`,
default the current one); `eac` is the one installed beside the Python that runs this script."""
import os, signal, subprocess, sys, time
from pathlib import Path
from orchestrator.spec import load_spec

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
STUDY = Path(os.environ.get("STUDY_DIR", ".")).resolve(); EAC = str(Path(sys.executable).parent / "eac")
# A second store lets a round of the same experiment run beside another (each store locks its experiment);
# its tables are per trajectory id, so merging it into the main store later is a plain file copy.
STORE = STUDY / os.environ.get("STUDY_STORE", "store")
# Whole rounds, longest first: the edit logs a resume needs do not outlive a session (see README), so a
# session finishes the rounds it starts; a round's run is stopped early only when a later PLAN says so.
PLAN = [(int(r), int(t)) for r, t in (x.split(":") for x in os.environ.get(
    "STUDY_PLAN", "1:300 2:300 5:100 3:300 4:300").split())]

def log(msg):
    with open(STUDY / "controller.log", "a") as f:
        f.write(time.strftime("%H:%M:%S ") + msg + "\n")

def alive(pid):
    return os.path.exists(f"/proc/{pid}") and "Z" not in open(f"/proc/{pid}/stat").read().split()[2]

def stop_when_reached(pid, wanted, what):
    """Wait for the run; SIGINT it (resumable) once every wanted evaluation file exists."""
    while alive(pid):
        if all(p.exists() for p in wanted.values()):
            log(f"{what}: reached; stopping"); os.kill(pid, signal.SIGINT)
            for _ in range(60):
                if not alive(pid):
                    break
                time.sleep(5)
            else:
                os.killpg(pid, signal.SIGKILL)
            break
        time.sleep(20)
    log(f"{what}: run ended")

for rnd, target in PLAN:
    spec_path = HERE / f"round{rnd}.yaml"
    spec = load_spec(spec_path)
    wanted = {t.label: STORE / "evaluations" / t.experiment / f"{t.trajectory_id}-at-{target:06d}.parquet"
              for t in spec.trajectories()}
    if all(p.exists() for p in wanted.values()):
        log(f"round {rnd} target {target}: already there"); continue
    log(f"round {rnd} target {target}: start {list(wanted)}")
    running = subprocess.run(["pgrep", "-f", f"eac run {spec_path}"], capture_output=True, text=True).stdout.split()
    if running:  # adopt a run this controller's previous instance started
        pid = int(running[0]); log(f"adopting pid {pid}")
    else:
        out = open(STUDY / f"run-round{rnd}.log", "a")
        pid = subprocess.Popen([EAC, "run", str(spec_path), "--store", str(STORE), "--no-report",
                                "--progress", "lines"], stdout=out, stderr=subprocess.STDOUT,
                               cwd=REPO, start_new_session=True).pid
    stop_when_reached(pid, wanted, f"round {rnd} target {target}")
    # What the run's own shutdown left of its Ray instance (it is the process group's leader); not a
    # global pkill, which would take down another experiment's round running beside this one.
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    time.sleep(5)
log("plan done")
