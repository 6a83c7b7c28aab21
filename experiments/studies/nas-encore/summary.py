"""The issue-34 comparison's numbers from its store: per arm, at its last scored checkpoint, reliability
and generalisation (toolkit, with intervals), CounterFact efficacy and neighbourhood, generative reliability, WikiText perplexity and
retention, and the edited matrices' ‖W‖₁ change (mean over the edited matrices of relative_l1 − 1) with
the largest single-step jump.

    .venv/bin/python experiments/studies/nas-encore/summary.py STORE
"""
import glob
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

store = Path(sys.argv[1] if len(sys.argv) > 1 else "experiments/results/nas-encore/store")
experiment = "nas-encore-smollm2"


def table(kind: str, pattern: str = "*") -> list[dict]:
    files = sorted(glob.glob(str(store / kind / experiment / f"{pattern}.parquet")))
    return pa.concat_tables([pq.read_table(f) for f in files]).to_pylist() if files else []


WANTED = [("edit/toolkit", "reliability"), ("edit/toolkit", "generalisation"), ("edit/counterfact", "efficacy"),
          ("edit/counterfact", "neighbourhood"), ("edit/generative", "reliability"), ("wikitext", "perplexity"),
          ("wikitext", "retention/perplexity")]
for trajectory in table("trajectories"):
    tid, method = trajectory["trajectory_id"], trajectory["method"]
    evaluations = table("evaluations", f"{tid}-at-*")
    last = max((r["n_edits"] for r in evaluations), default=None)
    if not last:
        print(f"{method:13s} not scored after editing yet")
        continue
    rows = {(r["task"], r["metric"]): r for r in evaluations if r["n_edits"] == last}
    parts = []
    for task, metric in WANTED:
        r = rows.get((task, metric))
        if r is not None:
            interval = f" [{r['ci_low']:.3f}, {r['ci_high']:.3f}]" if r.get("ci_low") is not None else ""
            parts.append(f"{r['task']}/{r['metric']} {r['value']:.3f}{interval}")
    edits = sorted(table("edits", f"{tid}-*"), key=lambda r: r["edit_index"])
    growth = [sum(v for _, v in e["relative_l1"]) / len(e["relative_l1"]) for e in edits]
    jumps = [b - a for a, b in zip([1.0] + growth[:-1], growth)]
    if growth:
        parts.append(f"L1 {100 * (growth[-1] - 1):+.2f}% (largest step {100 * max(jumps):+.2f} points)")
    print(f"{method:13s} at {last} edits: " + "; ".join(parts))
