"""Run the replicated study (experiments/configs/replicated-smollm2.yaml) round by round, in priority order.

A round is a set of arms and seeds: its spec is the study spec with the other arms and seeds left out and
every other field as written, so its trajectories are the study's own (checked: each round trajectory id is
one of the full spec's) and a later `eac run` of the full spec, or another round, finds them done. Each
round's `eac run` runs to the end; the whole plan is resumable (run it again: finished trajectories are
skipped, an interrupted one resumes from its saved edit log).

    EAC_DATA_DIR=... .venv/bin/python experiments/studies/replicated/run_rounds.py [STATE_DIR] [ROUND ...]
        ROUND: ARM[,ARM...]:SEED[,SEED...]   (default: the plan below)

STATE_DIR (default ~/eac-replicated) holds the store (`store/`), the round specs (`round-<k>.yaml`),
each round's run log (`run-round-<k>.log`) and this script's log (`rounds.log`)."""
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml
from orchestrator.spec import load_spec

SPEC = Path(__file__).resolve().parents[3] / "experiments" / "configs" / "replicated-smollm2.yaml"
# A whole seed of whole arms per round, so that a budget cut leaves complete pairs: MEMIT, MEMIT-EAC and
# the two matched-strength MEMIT arms first, seed by seed; then the paper-settings arm; then AlphaEdit's
# four arms seed by seed; then priorities 3-4.
MEMIT_ARMS = "memit,memit-eac,memit-matched,memit-norm-matched"
ALPHAEDIT_ARMS = "alphaedit,alphaedit-eac,alphaedit-matched,alphaedit-norm-matched"
PLAN = [f"{MEMIT_ARMS}:0", f"{MEMIT_ARMS}:1", f"{MEMIT_ARMS}:2", "memit-eac-paper:0,1,2",
        f"{ALPHAEDIT_ARMS}:0", f"{ALPHAEDIT_ARMS}:1", f"{ALPHAEDIT_ARMS}:2",
        "rome-mean-key,rome-mean-key-eac:0,1,2", "memit-prune,memit-prune-eval:0,1,2",
        "rome,rome-prune,rome-prune-eval:0,1,2"]


def variant_name(method) -> str:
    return method if isinstance(method, str) else method["name"]


def round_spec(full: dict, arms: list[str], seeds: list[int]) -> dict:
    names = [variant_name(m) for m in full["methods"]]
    unknown = sorted(set(arms) - set(names)) + sorted(set(seeds) - set(full["seeds"]))
    if unknown:
        raise SystemExit(f"{SPEC}: the round names {unknown}, which the study spec does not have")
    return {**full, "methods": [m for m in full["methods"] if variant_name(m) in arms], "seeds": seeds}


def main() -> None:
    state = Path(sys.argv[1] if len(sys.argv) > 1 else Path.home() / "eac-replicated").resolve()
    rounds = sys.argv[2:] or PLAN
    state.mkdir(parents=True, exist_ok=True)
    full = yaml.safe_load(SPEC.read_text())
    study_ids = {t.trajectory_id for t in load_spec(SPEC).trajectories()}
    eac = str(Path(sys.executable).parent / "eac")
    for k, one in enumerate(rounds, 1):
        arms, seeds = one.split(":")
        spec_path = state / f"round-{k}.yaml"
        spec_path.write_text(yaml.safe_dump(round_spec(full, arms.split(","), [int(s) for s in seeds.split(",")]),
                                            sort_keys=False))
        ids = {t.trajectory_id for t in load_spec(spec_path).trajectories()}
        assert ids <= study_ids, f"round {k}: trajectories not in the study spec: {sorted(ids - study_ids)}"
        with open(state / "rounds.log", "a") as log:
            log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} round {k} ({one}): {len(ids)} trajectories\n")
        with open(state / f"run-round-{k}.log", "a") as out:
            code = subprocess.call([eac, "run", str(spec_path), "--store", str(state / "store"), "--no-report",
                                    "--progress", "lines"], stdout=out, stderr=subprocess.STDOUT)
        with open(state / "rounds.log", "a") as log:
            log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} round {k}: eac run exited {code}\n")
        if code != 0:
            raise SystemExit(code)


if __name__ == "__main__":
    main()
