"""Paired comparison of arms from the store's ``examples`` table (``eac compare``).

Within one spec every arm edits the same facts in the same order and is scored on the same task
examples and WikiText windows, so two arms are compared example by example, not by whether their
marginal intervals overlap. For every arm against a base arm, at each checkpoint both were scored at
(after at least one edit), for each metric both hold examples of:

- **paired difference** arm − base of the metric, with a percentile-bootstrap 95% interval that
  resamples example ids *jointly* (an example drawn once carries both arms' values), so what the two
  arms share cancels (Efron & Tibshirani 1993, ch. 13; the same resampling as
  ``workers.evaluation.intervals``);
- for WikiText perplexity, the **paired log-perplexity ratio** log(ppl_arm / ppl_base) =
  Σ_w (NLL_arm,w − NLL_base,w) / Σ_w tokens_w over the windows w, with windows resampled jointly;
  reported as the ratio ppl_arm / ppl_base and its interval;
- for an outcome that is 0/1 per example in both arms (CounterFact efficacy, generative reliability,
  token-argmax reliability of single-token targets), the **exact McNemar test**: of the b examples the
  base gets right and the arm wrong and the c the other way round, the two-sided binomial test of
  b against Binomial(b + c, 1/2) (McNemar 1947; the exact form, which small counts need);
- with **several seeds** (fact samples) in both arms, a **cluster bootstrap**: each replicate draws
  seeds with replacement, then examples within each drawn seed, and pools them; the between-seed
  spread (standard deviation of the per-seed differences) and each seed's own paired estimate
  (``per_seed``: whether the samples agree in direction) are reported beside it. Seeds pair by seed
  value (the same seed draws the same facts).

**Edit strength** is paired the same way, from the ``edits`` table: at a checkpoint of n edits, the
first n edit steps of the two arms are the same facts in the same order, so per step the arm's ‖δ‖ (the
optimised target's change, ``delta_norm``), final target loss (``loss``) and ‖ΔW‖_F (``dw_fro``) are
compared with the base's (task ``edit/strength``; its "examples" are edit steps, ``example_id`` the step's
index). A constraint that keeps general abilities by making weaker edits shows here beside the gain.

Two arms that were not scored on the same examples (different facts, task samples or windows) are
not paired: the row says so and carries no interval. Every statistic is a ratio of sums over
examples (a mean: values over ones), so one vectorised bootstrap serves them all.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from orchestrator.status import Status
from orchestrator.store import Store
from workers.evaluation.intervals import RESAMPLES, SEED, percentiles
from workers.evaluation.tasks import PERPLEXITY_TASK

PERPLEXITY = (PERPLEXITY_TASK, "perplexity")  # compared as the paired per-window log ratio
STRENGTH_TASK = "edit/strength"  # per edit step, from the edits table
STRENGTH_METRICS = ("delta_norm", "loss", "dw_fro")
# Per base arm, the metrics the report's table shows (the full set goes to compare.csv).
HEADLINE_METRICS = (("edit/counterfact", "efficacy"), ("edit/toolkit", "reliability"),
                    ("edit/generative", "reliability"), ("edit/toolkit", "generalisation"),
                    ("edit/toolkit", "locality"), ("edit/counterfact", "neighbourhood"), PERPLEXITY,
                    ("drift", "kl_mean"), (STRENGTH_TASK, "delta_norm"), (STRENGTH_TASK, "loss"))
COLUMNS = ["model", "dataset", "base", "arm", "n_edits", "task", "metric", "statistic", "seeds", "n_examples",
           "base_value", "arm_value", "estimate", "ci_low", "ci_high", "seed_sd", "per_seed", "mcnemar_b",
           "mcnemar_c", "mcnemar_p", "marginal_overlap", "note"]


class CompareError(ValueError):
    """A comparison that cannot be made as asked (an unknown arm or checkpoint); names what exists."""


@dataclass(frozen=True)
class Paired:
    """One seed's paired examples: per example the two arms' numerators and the shared denominator
    (a mean: values and ones; perplexity: summed NLLs and token counts)."""

    base: np.ndarray
    arm: np.ndarray
    weight: np.ndarray


def cluster_bootstrap(seeds: list[Paired], *, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """Bootstrap replicates of Σ(arm − base) / Σ weight over the pooled examples: each replicate draws
    ``len(seeds)`` seeds with replacement, then within each drawn seed its examples with replacement
    (one seed: the plain paired bootstrap). Example indices are drawn once per example, so both arms'
    values of an example move together."""
    rng = np.random.default_rng(seed)
    count = len(seeds)
    # For every seed and every (replicate, slot), the sums of one within-seed resample.
    numerators = np.empty((count, resamples, count))
    weights = np.empty((count, resamples, count))
    for k, paired in enumerate(seeds):
        index = rng.integers(0, len(paired.weight), size=(resamples, count, len(paired.weight)))
        numerators[k] = (paired.arm - paired.base)[index].sum(axis=-1)
        weights[k] = paired.weight[index].sum(axis=-1)
    chosen = rng.integers(0, count, size=(resamples, count)) if count > 1 else np.zeros((resamples, 1), dtype=int)
    replicate, slot = np.indices((resamples, count))
    return (numerators[chosen, replicate, slot].sum(axis=1) / weights[chosen, replicate, slot].sum(axis=1))


def mcnemar(base: np.ndarray, arm: np.ndarray) -> tuple[int, int, float]:
    """(b, c, p): b examples right (1) in the base and wrong (0) in the arm, c the reverse, and the exact
    two-sided McNemar p-value, P(|X − n/2| ≥ |b − n/2|) for X ~ Binomial(n = b + c, 1/2)."""
    from scipy.stats import binomtest

    b = int(np.sum((base == 1) & (arm == 0)))
    c = int(np.sum((base == 0) & (arm == 1)))
    return b, c, 1.0 if b + c == 0 else float(binomtest(b, b + c, 0.5).pvalue)


def _binary(values: np.ndarray) -> bool:
    return bool(len(values)) and bool(np.isin(values, (0.0, 1.0)).all())


def pair_examples(base: pd.DataFrame, arm: pd.DataFrame, task: str, metric: str) -> Paired | str:
    """The two arms' examples of one seed, checkpoint and metric, aligned by ``example_id``; or why they
    cannot be paired (a text)."""
    if set(base["example_id"]) != set(arm["example_id"]):
        shared = len(set(base["example_id"]) & set(arm["example_id"]))
        return (f"not scored on the same examples ({len(base)} base, {len(arm)} arm, {shared} shared): "
                "not paired")
    base = base.sort_values("example_id")
    arm = arm.sort_values("example_id")
    if (task, metric) == PERPLEXITY:
        tokens = base["window_tokens"].to_numpy(dtype=float)
        if not np.array_equal(tokens, arm["window_tokens"].to_numpy(dtype=float)):
            return "the windows score different token counts: not paired"
        return Paired(base["window_nll"].to_numpy(dtype=float), arm["window_nll"].to_numpy(dtype=float), tokens)
    return Paired(base["value"].to_numpy(dtype=float), arm["value"].to_numpy(dtype=float), np.ones(len(base)))


def compare_metric(seeds: dict[int, tuple[pd.DataFrame, pd.DataFrame]], task: str, metric: str, *,
                   resamples: int = RESAMPLES) -> dict:
    """One metric at one checkpoint: ``seeds`` maps each seed both arms have to (base examples, arm
    examples). The paired estimate, its (cluster) bootstrap interval, McNemar where 0/1, or a note."""
    paired: list[Paired] = []
    for seed_value, (base, arm) in sorted(seeds.items()):
        result = pair_examples(base, arm, task, metric)
        if isinstance(result, str):
            return {"seeds": len(seeds), "note": f"seed {seed_value}: {result}"}
        paired.append(result)
    base_sum = sum(p.base.sum() for p in paired)
    arm_sum = sum(p.arm.sum() for p in paired)
    weight = sum(p.weight.sum() for p in paired)
    if not weight:
        return {"seeds": len(seeds), "note": "no examples"}
    estimate = (arm_sum - base_sum) / weight
    low, high = percentiles(cluster_bootstrap(paired, resamples=resamples))
    per_seed = [(p.arm.sum() - p.base.sum()) / p.weight.sum() for p in paired]
    ratio = (task, metric) == PERPLEXITY
    row = {"seeds": len(paired), "n_examples": int(sum(len(p.weight) for p in paired)),
           "base_value": base_sum / weight, "arm_value": arm_sum / weight,
           "statistic": "mean difference", "estimate": estimate, "ci_low": low, "ci_high": high,
           "seed_sd": float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else math.nan,
           "per_seed": " ".join(f"{s}:×{math.exp(d):.3g}" if ratio else f"{s}:{d:+.3g}"
                                for s, d in zip(sorted(seeds), per_seed)),
           "note": ""}
    if ratio:
        # Reported as the ratio ppl_arm / ppl_base = exp(paired log ratio); the values as perplexities.
        row.update(statistic="perplexity ratio", estimate=math.exp(estimate), ci_low=math.exp(low),
                   ci_high=math.exp(high), base_value=math.exp(row["base_value"]),
                   arm_value=math.exp(row["arm_value"]))
    else:
        bases = np.concatenate([p.base for p in paired])
        arms = np.concatenate([p.arm for p in paired])
        if _binary(bases) and _binary(arms):
            row["mcnemar_b"], row["mcnemar_c"], row["mcnemar_p"] = mcnemar(bases, arms)
    return row


def strength_examples(edits: pd.DataFrame, n_edits: int) -> dict[tuple[str, str], pd.DataFrame]:
    """One trajectory's edit steps up to checkpoint ``n_edits`` as example rows of ``edit/strength``:
    ``example_id`` the step's index, ``value`` its ``delta_norm``, ``loss`` or ``dw_fro``. A step without
    the value (a skipped step) is left out, so an arm that skipped a step the base made is not paired."""
    steps = edits[edits["edit_index"] < n_edits]
    out = {}
    for metric in STRENGTH_METRICS:
        kept = steps[steps[metric].notna()]
        if len(kept):
            out[(STRENGTH_TASK, metric)] = pd.DataFrame({"example_id": kept["edit_index"].astype(int).astype(str),
                                                         "value": kept[metric].astype(float)})
    return out


def _arms(trajectories: pd.DataFrame) -> pd.DataFrame:
    return trajectories.assign(arm=trajectories["variant"].fillna(trajectories["method"]))


def _marginal_overlap(evaluations: pd.DataFrame, base_ids, arm_ids, n_edits: int, task: str, metric: str):
    """Whether the two arms' stored marginal 95% intervals (mean over seeds) overlap; None without them."""
    rows = evaluations[(evaluations["n_edits"] == n_edits) & (evaluations["task"] == task)
                       & (evaluations["metric"] == metric)]
    base = rows[rows["trajectory_id"].isin(base_ids)][["ci_low", "ci_high"]].mean()
    arm = rows[rows["trajectory_id"].isin(arm_ids)][["ci_low", "ci_high"]].mean()
    if base.isna().any() or arm.isna().any():
        return None
    return bool(base["ci_low"] <= arm["ci_high"] and arm["ci_low"] <= base["ci_high"])


def compare_arms(store: Store, experiment: str, base: str, arms: list[str] | None = None, at: int | None = None,
                 *, metrics: tuple[tuple[str, str], ...] | None = None, resamples: int = RESAMPLES,
                 complete_only: bool = False) -> pd.DataFrame:
    """Every arm (default: all others of the experiment) against ``base``, per model and data set, at each
    shared checkpoint after the first edit (or only ``at``), for every metric with examples (or
    ``metrics``). One row per (model, data set, arm, checkpoint, metric); columns ``COLUMNS``.

    ``complete_only`` pairs only finished trajectories: while a study runs, a seed still editing would
    otherwise cut every shared checkpoint back to the ones it has reached."""
    trajectories = _arms(store.frame("trajectories", experiment))
    known = sorted(set(trajectories["arm"]))
    wanted = arms or [a for a in known if a != base]
    unknown = [a for a in [base, *wanted] if a not in known]
    if unknown:
        raise CompareError(f"experiment {experiment!r} has no arm(s) {unknown}; its arms: {known}")
    if complete_only:
        trajectories = trajectories[trajectories["status"] == Status.COMPLETED]
        unfinished = [a for a in [base, *wanted] if a not in set(trajectories["arm"])]
        if unfinished:
            raise CompareError(f"experiment {experiment!r}: arm(s) {unfinished} have no complete trajectory yet")
    examples = store.frame("examples", experiment)
    if not len(examples):
        raise CompareError(f"experiment {experiment!r} has no examples table (a store written before per-example "
                           "results were kept): re-score its checkpoints to compare arms paired")
    evaluations = store.frame("evaluations", experiment)
    # trajectory -> checkpoint -> (task, metric) -> its example rows, grouped once.
    scored: dict[str, dict[int, dict[tuple[str, str], pd.DataFrame]]] = {}
    for (tid, n_edits, task, metric), part in examples.groupby(["trajectory_id", "n_edits", "task", "metric"],
                                                               sort=False):
        scored.setdefault(tid, {}).setdefault(int(n_edits), {})[(task, metric)] = part
    edits = store.frame("edits", experiment)
    for tid, steps in (edits.groupby("trajectory_id", sort=False) if len(edits) else ()):
        for n_edits, at_checkpoint in scored.get(tid, {}).items():
            if n_edits > 0:
                at_checkpoint.update(strength_examples(steps, n_edits))
    rows = []
    for (model, dataset), setting in trajectories.groupby(["model", "dataset"], sort=True):
        base_runs = setting[setting["arm"] == base]
        if not len(base_runs):
            continue
        for arm in wanted:
            arm_runs = setting[setting["arm"] == arm]
            if not len(arm_runs) or arm == base:
                continue
            label = {"model": model, "dataset": dataset, "base": base, "arm": arm}
            shared_seeds = sorted(set(base_runs["seed"]) & set(arm_runs["seed"]))
            if not shared_seeds:
                rows.append({**label, "note": f"no shared seed (base {sorted(base_runs['seed'])}, "
                                              f"arm {sorted(arm_runs['seed'])}): not paired"})
                continue
            by_seed = {s: (base_runs.loc[base_runs["seed"] == s, "trajectory_id"].iloc[0],
                           arm_runs.loc[arm_runs["seed"] == s, "trajectory_id"].iloc[0]) for s in shared_seeds}
            base_ids = [b for b, _ in by_seed.values()]
            arm_ids = [a for _, a in by_seed.values()]
            checkpoints = None
            for b, a in by_seed.values():
                both = set(scored.get(b, {})) & set(scored.get(a, {}))
                checkpoints = both if checkpoints is None else checkpoints & both
            checkpoints = sorted(n for n in checkpoints if n > 0)
            if at is not None:
                if at not in checkpoints:
                    raise CompareError(f"{arm} vs {base} ({model}, {dataset}): no shared checkpoint at {at} edits; "
                                       f"shared: {checkpoints}")
                checkpoints = [at]
            for n_edits in checkpoints:
                keys = None
                for b, a in by_seed.values():
                    pairs = set(scored[b][n_edits]) & set(scored[a][n_edits])
                    keys = pairs if keys is None else keys & pairs
                for task, metric in sorted(keys):
                    if metrics is not None and (task, metric) not in metrics:
                        continue
                    seeds = {s: (scored[b][n_edits][(task, metric)], scored[a][n_edits][(task, metric)])
                             for s, (b, a) in by_seed.items()}
                    result = compare_metric(seeds, task, metric, resamples=resamples)
                    overlap = _marginal_overlap(evaluations, base_ids, arm_ids, n_edits, task, metric)
                    rows.append({**label, "n_edits": n_edits, "task": task, "metric": metric,
                                 "marginal_overlap": overlap, **result})
    return pd.DataFrame(rows, columns=COLUMNS)


def constraint_pairs(trajectories: pd.DataFrame) -> list[tuple[str, str]]:
    """(base arm, arm) for every arm that is a base method with a constraint, not tagged with a group,
    paired with the arm that runs its base method with the same overrides, the constraint's own aside:
    ``rome-eac`` → ``rome``; ``{rome-eac, residual_key: mean}`` → ``{rome, residual_key: mean}``, not plain
    ``rome``; ``{memit-prune, prune.apply: evaluation}`` → ``memit``. An arm with no such base is left out."""
    from workers.editing.methods import split_method

    trajectories = _arms(trajectories)
    main = trajectories[trajectories["group"].isna()].drop_duplicates("arm")
    overrides = {arm: _overrides(config) for arm, config in zip(main["arm"], main["config"])}
    pairs = set()
    for arm, method in zip(main["arm"], main["method"]):
        base, constraint = split_method(method)
        if not constraint:
            continue
        own = {k: v for k, v in overrides[arm].items() if k != constraint and not k.startswith(constraint + ".")}
        candidates = sorted(b for b, m in zip(main["arm"], main["method"]) if m == base and overrides[b] == own)
        if candidates:
            pairs.add((base if base in candidates else candidates[0], arm))
    return sorted(pairs)


def _overrides(config: str) -> dict:
    """A trajectory's hyper-parameter overrides as written in its spec (its ``config`` JSON)."""
    return dict(json.loads(config).get("hparams") or {})


def decided(row) -> bool | None:
    """Whether the paired interval excludes no change (0 for a difference, 1 for a ratio)."""
    if pd.isna(row["ci_low"]):
        return None
    null = 1.0 if row["statistic"] == "perplexity ratio" else 0.0
    return bool(row["ci_low"] > null or row["ci_high"] < null)


def format_table(frame: pd.DataFrame) -> str:
    """The comparison as a terminal table: one line per (arm, checkpoint, metric)."""
    if not len(frame):
        return "no pairs to compare"
    lines = [f"{'arm vs base':28s} {'edits':>5s} {'metric':32s} {'base':>8s} {'arm':>8s} {'paired Δ [95%]':>27s} "
             f"{'McNemar b/c p':>18s} {'seeds':>5s} {'marg.':>5s}  per seed"]
    for record in frame.to_dict("records"):
        row = pd.Series(record)
        name = f"{row.arm} vs {row.base}"
        if isinstance(row.note, str) and row.note:
            lines.append(f"{name:28s} {'' if pd.isna(row.n_edits) else int(row.n_edits):>5} "
                         f"{'' if pd.isna(row.task) else row.task + ' ' + row.metric:32s} {row.note}")
            continue
        ratio = row.statistic == "perplexity ratio"
        shown = f"{'×' if ratio else ''}{row.estimate:+.4f} [{row.ci_low:+.4f}, {row.ci_high:+.4f}]"
        if ratio:
            shown = f"×{row.estimate:.4f} [{row.ci_low:.4f}, {row.ci_high:.4f}]"
        mc = "" if pd.isna(row.mcnemar_b) else f"{int(row.mcnemar_b)}/{int(row.mcnemar_c)} p={row.mcnemar_p:.3g}"
        overlap = "" if row.marginal_overlap is None or pd.isna(row.marginal_overlap) else (
            "overl" if row.marginal_overlap else "apart")
        star = "*" if decided(record) else " "
        lines.append(f"{name:28s} {int(row.n_edits):>5d} {row.task + ' ' + row.metric:32s} {row.base_value:8.4f} "
                     f"{row.arm_value:8.4f} {shown:>26s}{star} {mc:>18s} {int(row.seeds):>5d} {overlap:>5s}"
                     + (f"  {row.per_seed}" if row.seeds > 1 else ""))
    lines.append("* the paired 95% interval excludes no change; marg.: whether the arms' marginal 95% intervals "
                 "overlap (overl) or not (apart); per seed: each fact sample's own paired estimate (seed:value)")
    return "\n".join(lines)


def write_csv(frame: pd.DataFrame, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False, float_format="%.6g")
    return path
