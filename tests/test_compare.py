"""Paired comparison of arms (``orchestrator.compare``, ``eac compare``) on hand-made example tables."""

from __future__ import annotations

import math

import numpy as np
import pytest

from orchestrator.cli import main
from orchestrator.compare import CompareError, compare_arms, mcnemar
from orchestrator.store import Store

EXPERIMENT = "pairs"


def trajectory(store: Store, tid: str, method: str, seed: int = 0) -> None:
    store.put_trajectory({"experiment": EXPERIMENT, "trajectory_id": tid, "model": "m", "method": method,
                          "variant": method, "group": None, "dataset": "counterfact", "seed": seed, "n_edits": 10,
                          "batch_size": 1, "hparams": "{}", "config": "{}", "status": "completed",
                          "edits_done": 10, "updated_at": None})


def scores(store: Store, tid: str, n_edits: int, task: str, metric: str, values, ids=None, **columns) -> None:
    ids = [str(i) for i in (ids if ids is not None else range(len(values)))]
    rows = [{"task": task, "metric": metric, "example_id": i, "value": float(v),
             **{k: c[j] for k, c in columns.items()}} for j, (i, v) in enumerate(zip(ids, values))]
    existing = store.frame("examples", EXPERIMENT, tid)
    existing = existing[(existing["n_edits"] == n_edits) & ~((existing["task"] == task) & (existing["metric"] == metric))]
    existing = existing.drop(columns=["experiment", "trajectory_id", "n_edits"])
    rows = [{k: v for k, v in r.items() if not (isinstance(v, float) and math.isnan(v))}
            for r in existing.to_dict("records")] + rows
    store.put_examples(EXPERIMENT, tid, n_edits, rows)


def one(frame, task="nli", metric="accuracy_all"):
    (row,) = frame[(frame["task"] == task) & (frame["metric"] == metric)].to_dict("records")
    return row


@pytest.fixture
def store(tmp_path):
    return Store(tmp_path / "store")


def test_the_pairing_joins_example_by_example_and_a_shuffled_pairing_widens_the_interval(store):
    rng = np.random.default_rng(1)
    base = rng.normal(0.5, 0.3, 200)  # examples differ a lot from each other ...
    arm = base + 0.04 + rng.normal(0, 0.01, 200)  # ... and the arm moves each by +0.04
    trajectory(store, "b", "rome")
    trajectory(store, "a", "rome-eac")
    scores(store, "b", 10, "nli", "accuracy_all", base)
    scores(store, "a", 10, "nli", "accuracy_all", arm)
    row = one(compare_arms(store, EXPERIMENT, "rome"))
    assert row["estimate"] == pytest.approx(0.04, abs=0.002)
    assert 0.037 < row["ci_low"] < row["ci_high"] < 0.043  # paired: the examples' spread cancels
    # The same values with the arm's ids shuffled: a pairing that joined the wrong examples.
    scores(store, "a", 10, "nli", "accuracy_all", arm, ids=rng.permutation(200))
    shuffled = one(compare_arms(store, EXPERIMENT, "rome"))
    assert shuffled["estimate"] == pytest.approx(row["estimate"])  # the means do not notice ...
    assert shuffled["ci_high"] - shuffled["ci_low"] > 10 * (row["ci_high"] - row["ci_low"])  # ... the pairing does


def test_the_difference_is_arm_minus_base(store):
    trajectory(store, "b", "memit")
    trajectory(store, "a", "memit-eac")
    scores(store, "b", 5, "edit/toolkit", "reliability", [0.2, 0.4, 0.6, 0.2])
    scores(store, "a", 5, "edit/toolkit", "reliability", [0.9, 0.8, 1.0, 0.7])
    row = one(compare_arms(store, EXPERIMENT, "memit"), "edit/toolkit", "reliability")
    assert (row["base"], row["arm"]) == ("memit", "memit-eac")
    assert row["base_value"] == pytest.approx(0.35) and row["arm_value"] == pytest.approx(0.85)
    assert row["estimate"] == pytest.approx(0.5) and 0 < row["ci_low"] <= row["ci_high"]
    reverse = one(compare_arms(store, EXPERIMENT, "memit-eac"), "edit/toolkit", "reliability")
    assert reverse["estimate"] == pytest.approx(-0.5) and reverse["ci_high"] < 0


def test_mcnemar_counts_a_hand_made_two_by_two_table(store):
    # base right / arm wrong: 7; base wrong / arm right: 1; both right: 5; both wrong: 3.
    base = [1] * 7 + [0] * 1 + [1] * 5 + [0] * 3
    arm = [0] * 7 + [1] * 1 + [1] * 5 + [0] * 3
    b, c, p = mcnemar(np.array(base, float), np.array(arm, float))
    assert (b, c) == (7, 1)
    assert p == pytest.approx(2 * (1 + 8) / 2 ** 8)  # two-sided exact: 2 P(X <= 1), X ~ Bin(8, 1/2)
    trajectory(store, "b", "rome")
    trajectory(store, "a", "rome-eac")
    scores(store, "b", 10, "edit/counterfact", "efficacy", base)
    scores(store, "a", 10, "edit/counterfact", "efficacy", arm)
    row = one(compare_arms(store, EXPERIMENT, "rome"), "edit/counterfact", "efficacy")
    assert (row["mcnemar_b"], row["mcnemar_c"]) == (7, 1) and row["mcnemar_p"] == pytest.approx(p)
    scores(store, "a", 10, "edit/toolkit", "locality", [0.5] * 16)  # not 0/1: no McNemar
    scores(store, "b", 10, "edit/toolkit", "locality", [0.25] * 16)
    assert math.isnan(one(compare_arms(store, EXPERIMENT, "rome"), "edit/toolkit", "locality")["mcnemar_b"])


def test_the_cluster_bootstrap_widens_when_seeds_disagree(tmp_path):
    def interval(shifts):
        store = Store(tmp_path / "-".join(map(str, shifts)))
        rng = np.random.default_rng(0)
        for seed, shift in enumerate(shifts):
            trajectory(store, f"b{seed}", "rome", seed)
            trajectory(store, f"a{seed}", "rome-eac", seed)
            base = rng.normal(0.5, 0.1, 60)
            scores(store, f"b{seed}", 10, "nli", "accuracy_all", base)
            scores(store, f"a{seed}", 10, "nli", "accuracy_all", base + shift + rng.normal(0, 0.01, 60))
        return one(compare_arms(store, EXPERIMENT, "rome"))

    agree = interval([0.1, 0.1, 0.1])
    disagree = interval([-0.2, 0.1, 0.4])
    assert agree["seeds"] == disagree["seeds"] == 3
    assert agree["estimate"] == pytest.approx(disagree["estimate"], abs=0.01)
    assert disagree["ci_high"] - disagree["ci_low"] > 5 * (agree["ci_high"] - agree["ci_low"])
    assert disagree["seed_sd"] == pytest.approx(0.3, abs=0.01) and agree["seed_sd"] < 0.01
    # Each sample's own estimate, labelled by its seed, shows that they disagree in direction.
    per_seed = dict(item.split(":") for item in disagree["per_seed"].split())
    assert sorted(per_seed) == ["0", "1", "2"]
    assert [float(per_seed[s]) for s in "012"] == pytest.approx([-0.2, 0.1, 0.4], abs=0.01)


def test_arms_scored_on_different_examples_are_not_paired(store):
    trajectory(store, "b", "rome")
    trajectory(store, "a", "rome-eac")
    scores(store, "b", 10, "edit/counterfact", "efficacy", [1, 0, 1], ids=[4, 7, 9])
    scores(store, "a", 10, "edit/counterfact", "efficacy", [1, 1, 1], ids=[4, 7, 12])  # other facts
    row = one(compare_arms(store, EXPERIMENT, "rome"), "edit/counterfact", "efficacy")
    assert "not scored on the same examples" in row["note"] and math.isnan(row["ci_low"])
    with pytest.raises(CompareError, match="no arm"):
        compare_arms(store, EXPERIMENT, "memit")


def test_perplexity_is_compared_as_the_paired_per_window_ratio(store):
    trajectory(store, "b", "rome")
    trajectory(store, "a", "rome-eac")
    tokens = [100, 100, 50]
    base_nll = [300.0, 500.0, 100.0]
    arm_nll = [330.0, 520.0, 115.0]
    for tid, nll in (("b", base_nll), ("a", arm_nll)):
        scores(store, tid, 10, "wikitext", "perplexity", [n / t for n, t in zip(nll, tokens)], ids=[0, 512, 1024],
               window_start=[0, 512, 1024], window_tokens=tokens, window_nll=nll)
    row = one(compare_arms(store, EXPERIMENT, "rome"), "wikitext", "perplexity")
    assert row["statistic"] == "perplexity ratio"
    assert row["estimate"] == pytest.approx(math.exp((965 - 900) / 250))
    assert row["per_seed"] == f"0:×{math.exp((965 - 900) / 250):.3g}"
    assert row["base_value"] == pytest.approx(math.exp(900 / 250))
    assert 1 < row["ci_low"] <= row["estimate"] <= row["ci_high"]


def test_eac_compare_prints_the_table_and_writes_compare_csv(store, tmp_path, capsys):
    trajectory(store, "b", "rome")
    trajectory(store, "a", "rome-eac")
    scores(store, "b", 10, "edit/counterfact", "efficacy", [1, 0, 0, 0])
    scores(store, "a", 10, "edit/counterfact", "efficacy", [1, 1, 1, 0])
    out = tmp_path / "cmp"
    assert main(["compare", str(store.root), "--experiment", EXPERIMENT, "--base", "rome", "--at", "10",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "rome-eac vs rome" in printed and "counterfact efficacy" in printed and "0/2" in printed
    assert (out / "compare.csv").read_text().count("\n") == 2
    assert main(["compare", str(store.root), "--experiment", EXPERIMENT, "--base", "rome", "--at", "7"]) == 1
    assert "no shared checkpoint at 7" in capsys.readouterr().err


def test_the_report_pairs_each_constrained_arm_with_its_base_and_draws_the_tradeoff(store, tmp_path):
    from experiments.figures import build_report

    rng = np.random.default_rng(3)
    windows = [0, 512, 1024, 1536]
    unedited_nll = rng.uniform(300, 400, len(windows))
    for tid, method, nll_growth, reliable in (("b", "rome", 1.30, 0.6), ("a", "rome-eac", 1.02, 0.5)):
        trajectory(store, tid, method)
        for n in (0, 5, 10):
            nll = unedited_nll * (1 + (nll_growth - 1) * n / 10)
            scores(store, tid, n, "wikitext", "perplexity", nll / 128, ids=windows, window_start=windows,
                   window_tokens=[128] * 4, window_nll=list(nll))
            rows = [{"task": "wikitext", "metric": "perplexity", "value": math.exp(nll.sum() / 512), "n_examples": 4},
                    {"task": "wikitext", "metric": "retention/perplexity",
                     "value": math.exp((unedited_nll.sum() - nll.sum()) / 512), "n_examples": 4},
                    {"task": "nq", "metric": "exact_match", "value": 0.0, "n_examples": 8, "ci_low": 0.0, "ci_high": 0.0},
                    {"task": "drift", "metric": "kl_mean", "value": 0.01 * n * nll_growth, "n_examples": 8}]
            if n:
                outcome = (rng.random(40) < reliable).astype(float)
                scores(store, tid, n, "edit/toolkit", "reliability", outcome)
                rows.append({"task": "edit/toolkit", "metric": "reliability", "value": outcome.mean(), "n_examples": 40})
            store.put_evaluations(EXPERIMENT, tid, n, rows)
    text = build_report(store.root, tmp_path / "report").read_text()
    section = text.split("### Paired comparison")[1].split("###")[0]
    assert "| rome-eac | rome | 10 | wikitext perplexity |" in section
    expected = math.exp((1.02 - 1.30) * unedited_nll.sum() / 512)  # exp(Σ_w ΔNLL_w / Σ_w tokens_w)
    assert f"×{expected:.3f} [" in section
    assert (tmp_path / "report" / EXPERIMENT / "compare.csv").exists()
    assert (tmp_path / "report" / EXPERIMENT / "tradeoff.png").exists()
    assert "**Identically 0** — not drawn: Open-domain QA (NQ) exact_match" in text
    assert "perplexity divided by its own unedited perplexity" in text


def test_edit_strength_is_paired_step_by_step_from_the_edits_table(store):
    # Issue 31: a constraint that keeps abilities by making weaker edits must show it. The arm's ‖δ‖ is
    # the base's halved step by step; steps past the checkpoint are not counted.
    rng = np.random.default_rng(3)
    base_norms = rng.uniform(50, 150, 12)
    for tid, method, norms in (("b", "memit", base_norms), ("a", "memit-eac", base_norms / 2)):
        trajectory(store, tid, method)
        store.put_edits(EXPERIMENT, tid, [{"edit_index": i, "case_id": str(i), "n_requests": 1, "method": method,
                                           "dw_l1": 1.0, "dw_fro": float(n) / 10, "relative_l1": {}, "skipped": False,
                                           "seconds_total": 1.0, "seconds": {}, "loss": 0.1, "delta_norm": float(n),
                                           "steps": 5} for i, n in enumerate(norms)])
        scores(store, tid, 10, "nli", "accuracy_all", [1, 0, 1])
    frame = compare_arms(store, EXPERIMENT, "memit")
    row = one(frame, "edit/strength", "delta_norm")
    assert row["n_examples"] == 10  # the first 10 steps: the checkpoint's
    assert row["base_value"] == pytest.approx(base_norms[:10].mean())
    assert row["estimate"] == pytest.approx(-base_norms[:10].mean() / 2)
    assert row["ci_high"] < 0
    assert one(frame, "edit/strength", "dw_fro")["estimate"] == pytest.approx(-base_norms[:10].mean() / 20)
    assert one(frame, "edit/strength", "loss")["estimate"] == pytest.approx(0.0)
    # ``metrics`` picks among them (the edits table's rows included), in a store that has an edits table.
    picked = compare_arms(store, EXPERIMENT, "memit", metrics=(("edit/strength", "delta_norm"), ("nli", "accuracy_all")))
    assert sorted(zip(picked["task"], picked["metric"])) == [("edit/strength", "delta_norm"), ("nli", "accuracy_all")]


def test_complete_only_pairs_finished_trajectories_and_keeps_their_later_checkpoints(store):
    # Seed 0 finished (scored at 5 and 10); seed 1 is still editing (scored at 5 only). Pairing every
    # trajectory cuts the shared checkpoints back to 5; pairing the finished ones keeps 10.
    rng = np.random.default_rng(3)
    for seed in (0, 1):
        trajectory(store, f"b{seed}", "rome", seed)
        trajectory(store, f"a{seed}", "rome-eac", seed)
        for n_edits in ((5, 10) if seed == 0 else (5,)):
            values = rng.integers(0, 2, 40)
            scores(store, f"b{seed}", n_edits, "nli", "accuracy_all", values)
            scores(store, f"a{seed}", n_edits, "nli", "accuracy_all", values)
    store.put_trajectory({**store.trajectory(EXPERIMENT, "a1"), "status": "running", "edits_done": 6})
    everything = compare_arms(store, EXPERIMENT, "rome")
    assert sorted(everything["n_edits"]) == [5] and set(everything["seeds"]) == {2}
    finished = compare_arms(store, EXPERIMENT, "rome", complete_only=True)
    assert sorted(finished["n_edits"]) == [5, 10] and set(finished["seeds"]) == {1}
    with pytest.raises(CompareError, match="no complete trajectory"):
        store.put_trajectory({**store.trajectory(EXPERIMENT, "a0"), "status": "running", "edits_done": 6})
        compare_arms(store, EXPERIMENT, "rome", complete_only=True)


def test_a_constrained_variant_pairs_with_the_base_that_has_its_other_overrides():
    import json as json_module

    import pandas as pd

    from orchestrator.compare import constraint_pairs

    def arm(variant, method, hparams, group=None):
        return {"variant": variant, "method": method, "group": group,
                "config": json_module.dumps({"hparams": hparams})}

    trajectories = pd.DataFrame([
        arm("rome", "rome", {}), arm("rome-eac", "rome-eac", {}),
        arm("rome-mean-key", "rome", {"residual_key": "mean"}),
        arm("rome-mean-key-eac", "rome-eac", {"residual_key": "mean"}),
        arm("memit", "memit", {}), arm("memit-matched", "memit", {"num_steps": 10}),
        arm("memit-eac-paper", "memit-eac", {"eac.gamma_percentile": 95, "eac.retrain_steps": 15}),
        arm("memit-prune-eval", "memit-prune", {"prune.apply": "evaluation"}),
        arm("alphaedit-eac", "alphaedit-eac", {"num_steps": 10}),  # no AlphaEdit arm with 10 steps
        arm("rome-eac-random", "rome-eac", {"eac.score": "random"}, group="anchor-selection"),
    ])
    assert constraint_pairs(trajectories) == [
        ("memit", "memit-eac-paper"), ("memit", "memit-prune-eval"), ("rome", "rome-eac"),
        ("rome-mean-key", "rome-mean-key-eac")]


def test_the_tradeoff_figure_draws_only_the_seeds_every_arm_has(store, tmp_path):
    # The base finished seeds 0 and 1, the arm only seed 0: a mean over the base's two samples against
    # the arm's one would compare different facts. The figure's table holds seed 0's values only.
    section = tradeoff_section(store, tmp_path, [("b0", "rome", 0, 0.9, 0.5), ("b1", "rome", 1, 0.3, 0.1),
                                                 ("a0", "rome-eac", 0, 0.7, 0.8)])
    assert "left out: rome seed 1" in section
    table_rows = [line for line in section.splitlines() if line.startswith("| m | counterfact | rome |")]
    assert table_rows and "0.900" in table_rows[0] and "0.500" in table_rows[0]  # seed 0's, not the mean 0.6/0.3


def test_the_tradeoff_figure_draws_each_base_methods_arms_on_their_own_shared_seeds(store, tmp_path):
    # ROME's arms both finished seeds 0 and 1; MEMIT's arm only seed 0. ROME's row is not cut back to
    # MEMIT's seeds: its table row is the mean over seeds 0 and 1.
    section = tradeoff_section(store, tmp_path, [("r0", "rome", 0, 0.9, 0.5), ("r1", "rome", 1, 0.5, 0.5),
                                                 ("e0", "rome-eac", 0, 0.7, 0.5), ("e1", "rome-eac", 1, 0.3, 0.5),
                                                 ("m0", "memit", 0, 0.8, 0.5)])
    assert "left out" not in section.split("\n\n")[0]
    (rome,) = [line for line in section.splitlines() if line.startswith("| m | counterfact | rome |")]
    assert "0.700" in rome  # the mean of seeds 0 and 1 (0.9, 0.5)
    (memit,) = [line for line in section.splitlines() if line.startswith("| m | counterfact | memit |")]
    assert "0.800" in memit


def tradeoff_section(store, tmp_path, runs) -> str:
    """The report's trade-off section for trajectories (id, method, seed, reliability, perplexity retention),
    each scored at 0 and 10 edits."""
    from experiments.figures import build_report

    for tid, method, seed, reliable, kept in runs:
        trajectory(store, tid, method, seed)
        for n in (0, 10):
            rows = [{"task": "wikitext", "metric": "retention/perplexity", "value": 1.0 if n == 0 else kept,
                     "n_examples": 4}]
            if n:
                rows.append({"task": "edit/toolkit", "metric": "reliability", "value": reliable, "n_examples": 40})
            store.put_evaluations(EXPERIMENT, tid, n, rows)
    text = build_report(store.root, tmp_path / "report").read_text()
    return text.split("## Trade-off")[1] if "## Trade-off" in text else text.split("Trade-off")[1]
