"""``eac run SPEC --dry-run``: what a run would do, from the spec and the store alone.

Nothing starts (no Ray, no actor) and nothing is written. For every trajectory of the plan: what it
is, what the store already holds of it, the resources its actor asks for, and what its remaining
edits should cost, from the seconds per edit step the store has measured for the same model, method
and batch size (in any experiment). Checkpoint evaluations run alongside the edits on the evaluation
pool and are not in the estimate.
"""

from __future__ import annotations

import math
from datetime import timedelta
from pathlib import Path

import pandas as pd

from orchestrator.driver import Trajectory
from orchestrator.spec import Resources
from orchestrator.status import Status
from orchestrator.store import Store

COST_KEYS = ["model", "method", "batch_size"]


def measured_step_seconds(store: Store) -> pd.DataFrame:
    """Mean wall-clock seconds per edit step and the steps measured, per (model, method, batch size)."""
    edits = store.frame("edits")
    if not len(edits):
        return pd.DataFrame(columns=[*COST_KEYS, "seconds", "steps"])
    # The edits table's method is the editor's; the trajectory's names the spec's method (e.g. rome-eac).
    trajectories = store.frame("trajectories")[["experiment", "trajectory_id", *COST_KEYS]]
    timed = edits[edits["seconds_total"].notna() & ~edits["skipped"]].drop(columns=["method"])
    timed = timed.merge(trajectories, on=["experiment", "trajectory_id"], how="inner")
    return (timed.groupby(COST_KEYS)["seconds_total"].agg(seconds="mean", steps="count").reset_index())


def plan_table(store: Store, plan: list[Trajectory]) -> pd.DataFrame:
    """One row per trajectory: what it is, its state in the store, its actor's resources, its cost."""
    measured = {tuple(row[k] for k in COST_KEYS): (row["seconds"], row["steps"])
                for row in measured_step_seconds(store).to_dict("records")}
    rows = []
    for trajectory in plan:
        spec, task = trajectory.spec, trajectory.task
        left = task.n_steps - trajectory.start_step
        if trajectory.status == Status.COMPLETED:
            state, left = "complete", 0
        elif trajectory.start_step:
            state = f"resumes at {task.requests_after(trajectory.start_step)}/{spec.n_edits}"
        else:
            state = "to run"
        found = measured.get((spec.model, spec.method, spec.batch_size))
        seconds = math.nan if found is None else left * found[0]
        res = spec.resources.trajectory
        rows.append({"model": spec.model, "method": spec.variant.name, "dataset": Path(spec.dataset).stem,
                     "seed": spec.seed, "edits": spec.n_edits, "batch": spec.batch_size,
                     "checkpoints": ",".join(map(str, spec.checkpoints)), "store": state,
                     "actor": f"{res.num_cpus:g} CPU, {res.num_gpus:g} GPU",
                     "s/step": math.nan if found is None else found[0],
                     "measured steps": 0 if found is None else int(found[1]),
                     "estimate": "–" if found is None else _duration(seconds), "seconds": seconds})
    return pd.DataFrame(rows)


def format_dry_run(store: Store, plan: list[Trajectory], resources: Resources) -> str:
    table = plan_table(store, plan)
    todo = table[table["store"] != "complete"]
    known = todo["seconds"].notna()
    evaluation = resources.evaluation
    lines = [table.drop(columns=["seconds"]).to_string(index=False, float_format=lambda x: f"{x:.3g}",
                                                        na_rep="–"),
             "",
             f"{len(plan)} trajectories, {len(plan) - len(todo)} complete in {store.uri}, {len(todo)} to run",
             f"evaluation pool: {resources.eval_actors} actor(s) × {evaluation.num_cpus:g} CPU, "
             f"{evaluation.num_gpus:g} GPU" + _engine(resources)
             + (f"; at most {resources.max_parallel_trajectories} trajectories at once"
                if resources.max_parallel_trajectories else ""),
             f"editing time left: {_duration(todo.loc[known, 'seconds'].sum())} in one actor's time "
             f"({int(known.sum())} of {len(todo)} trajectories estimated from the store's measured seconds per "
             "step; checkpoint evaluations not included)" if len(todo) else "nothing to run",
             "dry run: nothing was started or written"]
    return "\n".join(lines)


def _engine(resources: Resources) -> str:
    """How each evaluation replica is sharded, when it is (``Resources.eval_engine``)."""
    if resources.eval_engine == "transformers":
        return ""
    per_rank = "one GPU each" if resources.evaluation.num_gpus else "CPU, gloo"
    how = {"deepspeed": "DeepSpeed tensor parallelism (PyTorch's where DeepSpeed is missing; one unsharded "
                        "replica where the cluster has fewer GPUs)",
           "tp": "PyTorch tensor parallelism"}[resources.eval_engine]
    return f", engine {resources.eval_engine}: {resources.eval_ranks} ranks per actor ({per_rank}), {how}"


def _duration(seconds: float) -> str:
    return str(timedelta(seconds=math.ceil(seconds)))
