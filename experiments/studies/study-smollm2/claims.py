"""The numbers behind the README's Results section, per arm and checkpoint, from a study store.

    python experiments/studies/study-smollm2/claims.py [STORE]   # default: the committed store,
                                                                 # experiments/results/study-smollm2/store

One table per claim: norm growth of the edited matrices (Fig. 2, from the edit rows, every edit),
general abilities (Figs. 6/10: WikiText perplexity and its retention, next-token drift, SAMSum
retention), retention of the edited facts (Fig. 5: reliability on all edits so far), and the
anchor-selection arms (Fig. 8). Arms are compared at the same checkpoint only."""
import sys
from pathlib import Path

import pandas as pd

from experiments.figures import mean_relative_l1
from orchestrator.store import Store

STORE = Path(__file__).resolve().parents[2] / "results" / "study-smollm2" / "store"
METRICS = {  # column -> (task, metric)
    "ppl": ("wikitext", "perplexity"), "ppl_retention": ("wikitext", "retention/perplexity"),
    "drift_kl": ("drift", "kl_mean"), "samsum_retention": ("samsum", "retention/rouge_mean"),
    "reliability": ("edit/toolkit", "reliability"), "efficacy": ("edit/counterfact", "efficacy"),
    "generalisation": ("edit/toolkit", "generalisation"), "locality": ("edit/toolkit", "locality"),
}


def main(root: Path) -> None:
    store = Store(root)
    arms = store.frame("trajectories")[["trajectory_id", "experiment", "variant"]]
    evaluations = store.frame("evaluations").merge(arms, on=["trajectory_id", "experiment"])
    wide = evaluations.assign(key=list(zip(evaluations.task, evaluations.metric)))
    rows = []
    for (experiment, variant, n_edits), group in wide.groupby(["experiment", "variant", "n_edits"]):
        values = dict(zip(group.key, group.value))
        rows.append({"experiment": experiment, "arm": variant, "edits": n_edits,
                     **{column: values.get(key) for column, key in METRICS.items()}})
    scores = pd.DataFrame(rows).sort_values(["experiment", "arm", "edits"])
    edits = store.frame("edits").merge(arms, on=["trajectory_id", "experiment"])
    edits["l1_change_pct"] = [100 * (mean_relative_l1(pairs) - 1) for pairs in edits.relative_l1]
    norms = edits[edits.edit_index % 50 == 49].assign(edits=lambda d: d.edit_index + 1)
    pd.set_option("display.width", 200)
    print("Fig. 2 -- ||W||_1 / ||W0||_1 - 1 (%) after each 50 edits")
    print(norms.pivot_table(index="edits", columns=["experiment", "variant"], values="l1_change_pct").round(1).to_string())
    print("\nFigs. 5, 6, 10 -- at each scored checkpoint")
    print(scores.round(3).to_string(index=False))


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else STORE)
