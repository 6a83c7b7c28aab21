"""The numbers behind the README's replicated-study results (issue 31), from its store alone.

    .venv/bin/python experiments/studies/replicated/claims.py [STORE] [--at N ...]
        STORE: default the committed store, experiments/results/replicated/store
        --experiment: default replicated-smollm2
        --at:  checkpoints to compare at (default: every shared one after the first edit)

Three tables:
1. **Coverage**: per arm, the seeds whose trajectory is complete, and those still running or failed —
   a comparison below pools only the seeds both of its arms completed.
2. **Marginals per arm and checkpoint**: the mean over the arm's complete seeds, with the seeds' range,
   of reliability (toolkit, CounterFact efficacy, generative), WikiText perplexity and its retention, next-token
   drift, known-fact recall; and the edit strength of the edits so far (mean ‖δ‖ of the optimised target,
   median final target loss) and the edited matrices' ‖W‖₁ growth at the checkpoint (Fig. 2).
3. **Paired comparisons** (`orchestrator.compare.compare_arms`): the pairs the study's design makes —
   each arm against MEMIT; MEMIT-EAC against each matched-strength MEMIT arm (the question the matched
   arms exist for: at the same edit strength, does EAC keep more?); each constraint against its base —
   per checkpoint, a paired difference (perplexity: ratio) pooled over the shared seeds by the cluster
   bootstrap, with its 95% interval, the between-seed spread and McNemar's test for binary scores.
   A pair whose arms are not both in the store is left out (named).
"""
import argparse
import statistics
from pathlib import Path

import pandas as pd

from experiments.figures import mean_relative_l1
from orchestrator.compare import HEADLINE_METRICS, compare_arms, format_table
from orchestrator.status import Status
from orchestrator.store import Store

STORE = Path(__file__).resolve().parents[3] / "experiments" / "results" / "replicated" / "store"
EXPERIMENT = "replicated-smollm2"
# (base, arm): in the order the README reads them.
PAIRS = [("memit", "memit-eac"), ("memit", "memit-eac-paper"), ("memit", "memit-matched"),
         ("memit", "memit-norm-matched"), ("memit-matched", "memit-eac"), ("memit-norm-matched", "memit-eac"),
         ("alphaedit", "alphaedit-eac"), ("alphaedit", "alphaedit-matched"), ("alphaedit", "alphaedit-norm-matched"),
         ("alphaedit-matched", "alphaedit-eac"), ("alphaedit-norm-matched", "alphaedit-eac"),
         ("rome-mean-key", "rome-mean-key-eac"), ("memit", "memit-prune"), ("memit", "memit-prune-eval"),
         ("rome", "rome-prune"), ("rome", "rome-prune-eval")]
PAIRED_METRICS = HEADLINE_METRICS + (("known", "recall"),)
MARGINALS = {  # column -> (task, metric)
    "reliability": ("edit/toolkit", "reliability"), "cf_efficacy": ("edit/counterfact", "efficacy"),
    "gen_reliability": ("edit/generative", "reliability"), "perplexity": ("wikitext", "perplexity"),
    "ppl_retention": ("wikitext", "retention/perplexity"),
    "drift_kl": ("drift", "kl_mean"), "known_recall": ("known", "recall")}


def spread(values: list[float]) -> str:
    """Mean over seeds, with the seeds' range when there are several."""
    values = [v for v in values if v is not None and v == v]
    if not values:
        return "-"
    mean = statistics.fmean(values)
    return f"{mean:.3f}" if len(values) == 1 else f"{mean:.3f} ({min(values):.3f}-{max(values):.3f})"


def coverage(trajectories: pd.DataFrame) -> tuple[str, dict[str, set[int]]]:
    complete: dict[str, set[int]] = {}
    lines = []
    for arm, runs in trajectories.groupby("arm", sort=True):
        done = runs[runs["status"] == Status.COMPLETED]
        complete[arm] = set(int(s) for s in done["seed"])
        other = runs[runs["status"] != Status.COMPLETED]
        rest = ", ".join(f"seed {int(r.seed)} {r.status} at {int(r.edits_done)} edits" for r in other.itertuples())
        lines.append(f"{arm:22s} complete seeds {sorted(complete[arm])}" + (f"; {rest}" if rest else ""))
    return "\n".join(lines), complete


def marginals(store: Store, experiment: str, trajectories: pd.DataFrame, complete: dict[str, set[int]]) -> pd.DataFrame:
    kept = trajectories[[int(s) in complete.get(a, ()) for a, s in zip(trajectories["arm"], trajectories["seed"])]]
    evaluations = store.frame("evaluations", experiment).merge(kept[["trajectory_id", "arm", "seed"]])
    edits = store.frame("edits", experiment).merge(kept[["trajectory_id", "arm", "seed"]])
    edits = edits[~edits["skipped"]]
    rows = []
    for (arm, n_edits), scored in evaluations.groupby(["arm", "n_edits"], sort=True):
        row = {"arm": arm, "edits": int(n_edits), "seeds": scored["seed"].nunique()}
        for column, (task, metric) in MARGINALS.items():
            row[column] = spread(list(scored[(scored["task"] == task) & (scored["metric"] == metric)]["value"]))
        so_far = edits[(edits["arm"] == arm) & (edits["edit_index"] < n_edits)]
        per_seed = so_far.groupby("seed")
        row["mean_delta_norm"] = spread(list(per_seed["delta_norm"].mean())) if n_edits else "-"
        row["median_loss"] = spread(list(per_seed["loss"].median())) if n_edits else "-"
        at = so_far[so_far["edit_index"] == n_edits - 1]
        row["l1_growth_pct"] = (spread([100 * (mean_relative_l1(p) - 1) for p in at["relative_l1"]])
                                if n_edits else "-")
        rows.append(row)
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store", nargs="?", default=str(STORE))
    parser.add_argument("--experiment", default=EXPERIMENT)
    parser.add_argument("--at", type=int, action="append", help="a checkpoint to compare at (repeatable)")
    args = parser.parse_args()
    store = Store(Path(args.store))
    trajectories = store.frame("trajectories", args.experiment)
    trajectories = trajectories.assign(arm=trajectories["variant"].fillna(trajectories["method"]))
    text, complete = coverage(trajectories)
    pd.set_option("display.width", 250)
    pd.set_option("display.max_columns", 30)
    print("1. Coverage\n" + text)
    print("\n2. Marginals per arm and checkpoint (mean over complete seeds; the seeds' range in brackets)")
    table = marginals(store, args.experiment, trajectories, complete)
    print(table.to_string(index=False) if len(table) else "no complete trajectory yet")
    print("\n3. Paired comparisons, pooled over the seeds both arms completed")
    for base, arm in PAIRS:
        if not (complete.get(base) and complete.get(arm)):
            print(f"-- {arm} vs {base}: not both in the store with a complete seed; left out")
            continue
        frames = [compare_arms(store, args.experiment, base, [arm], at, metrics=PAIRED_METRICS, complete_only=True)
                  for at in (args.at or [None])]
        print(format_table(pd.concat(frames, ignore_index=True)))


if __name__ == "__main__":
    main()
