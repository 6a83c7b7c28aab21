"""`eac report`: figures and the Markdown summary from a synthetic store alone."""

import re

import matplotlib.image as mpimg
import pytest

from scipy.stats import binom
from experiments.figures import build_report
from orchestrator import cli
from orchestrator.store import Store, edit_row
from workers.evaluation.config import mean_row
from read_only import read_only

MODEL = "tiny-llama"
# variant -> (method, group, seeds)
VARIANTS = {"rome": ("rome", None, (0, 1)), "rome-eac": ("rome-eac", None, (0,)),
            "memit": ("memit", None, (0,)), "memit-eac": ("memit-eac", None, (0,)),
            "rome-eac-no-saliency": ("rome-eac", "ablation", (0,))}
CHECKPOINTS = (0, 5, 10)


def reliability(variant: str, seed: int, n_edits: int) -> float:
    """Synthetic and distinct per variant: EAC forgets more slowly; seed 1 of rome is 0.2 higher."""
    slope = 0.01 if "eac" in variant else 0.04
    return 1.0 - slope * n_edits + (0.2 if seed == 1 else 0.0)


def qa_score(variant: str, n_edits: int) -> float:
    return 0.30 - (0.001 if "eac" in variant else 0.02) * n_edits


def fill(store: Store, experiment: str = "synth", dataset: str = "counterfact") -> None:
    for variant, (method, group, seeds) in VARIANTS.items():
        for seed in seeds:
            tid = f"{variant}-s{seed}"
            store.put_trajectory({"experiment": experiment, "trajectory_id": tid, "model": MODEL, "method": method,
                                  "variant": variant, "group": group, "dataset": dataset, "seed": seed,
                                  "n_edits": 10, "batch_size": 1, "hparams": "{}", "config": "{}",
                                  "status": "completed", "edits_done": 10, "updated_at": None})
            growth = 0.002 if "eac" in variant else 0.03
            records = [{"edit_index": i, "case_ids": [i], "method": method,
                        "seconds": {"targets": 1.0, "update": 0.5, "total": 1.5 + (1.0 if "memit" in method else 0)},
                        "loss": 0.1, "delta_norm": 1.0, "dw_l1": 1.0, "dw_fro": 1.0,
                        "relative_l1": {"model.layers.2.mlp.down_proj": 1 + growth * (i + 1)},
                        "anchors": 12 if "eac" in method else None} for i in range(10)]
            store.put_edits(experiment, tid, [edit_row(r) for r in records])
            for n in CHECKPOINTS:
                rows = [{"task": "edit/toolkit", "metric": m, "value": reliability(variant, seed, n), "n_examples": n}
                        for m in ("reliability", "generalisation", "locality")] if n else []
                rows += [{"task": "nq", "metric": "exact_match", "value": qa_score(variant, n), "n_examples": 20},
                         {"task": "nq", "metric": "contains_answer", "value": 0.5, "n_examples": 20},
                         {"task": "nq", "metric": "retention/exact_match", "value": qa_score(variant, n) / 0.30,
                          "n_examples": 20}]
                store.put_evaluations(experiment, tid, n, rows)


@pytest.fixture
def report(tmp_path):
    store = Store(tmp_path / "store")
    fill(store)
    path = build_report(store.root)
    return path, path.read_text()


def test_every_figure_with_data_is_drawn(report):
    path, text = report
    folder = path.parent / "synth"
    for name in ("fig2_l1_norm.png", "editing_metrics_counterfact.png", "general_tasks_counterfact.png",
                 "fig7_ablations.png", "retention.png"):
        image = mpimg.imread(folder / name)
        assert image.shape[0] > 200 and image.shape[1] > 300, name
        assert f"(synth/{name})" in text  # linked from the Markdown
    assert not (folder / "fig8_anchor_selection.png").exists()
    assert re.search(r"### Fig\. 8 — anchor-selection methods\s+_Skipped: no trajectory of the store is tagged "
                     r"group: anchor-selection", text)
    assert "Fig. 9 — editing metrics" in text and "Fig. 10 — general tasks" in text  # CounterFact numbering


def row_of(text: str, *cells: str) -> list[str]:
    for line in text.splitlines():
        parts = [p.strip() for p in line.strip().strip("|").split("|")]
        if all(c in parts for c in cells):
            return parts
    raise AssertionError(f"no table row with {cells}")


def test_tables_hold_the_stored_numbers(report):
    _, text = report
    # Table 1: MEMIT steps take 2.5 s, ROME 1.5 s; phases averaged too.
    times = text.split("### Table 1")[1]
    assert row_of(times, MODEL, "memit", "10")[3:6] == ["2.50", "1.00", "0.50"]
    assert row_of(times, MODEL, "rome-eac", "10")[3] == "1.50"
    assert row_of(times, MODEL, "rome", "20")[3] == "1.50"  # two seeds × 10 edits
    # Fig. 2 summary: relative L1 after 10 edits = 1 + 0.03 * 10 for ROME, i.e. +30 %.
    l1 = row_of(text, "counterfact", "rome", "10", "1.300")
    assert l1[-1] == "30.000"
    # Final editing metrics: rome averages seeds 0 and 1 (0.6 and 0.8 at 10 edits).
    section = text.split("### Fig. 9")[1].split("### Fig. 10")[0]
    assert row_of(section, MODEL, "rome", "10")[3:6] == ["0.700", "0.700", "0.700"]
    assert row_of(section, MODEL, "memit-eac", "10")[3] == "0.900"
    # Retention of QA exact match at 10 edits.
    retention = text.split("### Retention per task")[1]
    assert row_of(retention, "memit", "10")[-1] == f"{(0.30 - 0.2) / 0.30:.3f}"
    assert row_of(retention, "rome-eac", "10")[-1] == f"{(0.30 - 0.01) / 0.30:.3f}"


def test_the_evaluations_csv_holds_every_stored_row_with_its_labels(report):
    import pandas as pd

    path, text = report
    table = pd.read_csv(path.parent / "synth" / "evaluations.csv")
    assert "(synth/evaluations.csv)" in text
    # Per trajectory: 3 editing metrics at 5 and 10 edits, 3 NQ metrics at 0, 5 and 10.
    trajectories = sum(len(seeds) for _, _, seeds in VARIANTS.values())
    assert len(table) == trajectories * (3 * 2 + 3 * 3)
    row = table[(table["variant"] == "memit-eac") & (table["n_edits"] == 10) & (table["metric"] == "reliability")]
    assert row["value"].tolist() == [pytest.approx(reliability("memit-eac", 0, 10))]
    assert row["task"].tolist() == ["edit/toolkit"] and row["n_examples"].tolist() == [10]
    seed1 = table[(table["variant"] == "rome") & (table["seed"] == 1) & (table["metric"] == "exact_match")]
    assert seed1["n_edits"].tolist() == [0, 5, 10]
    assert seed1["value"].tolist() == pytest.approx([qa_score("rome", n) for n in (0, 5, 10)])
    assert set(table.loc[table["variant"] == "rome-eac-no-saliency", "group"]) == {"ablation"}


def test_ablation_variants_stay_out_of_the_main_figures(report):
    _, text = report
    main = text.split("### Fig. 7")[0]
    ablation = text.split("### Fig. 7")[1].split("### Fig. 8")[0]
    assert "rome-eac-no-saliency" not in main.split("### Table 1")[0].split("### Trajectories")[1].split("### Fig. 2")[1]
    assert "rome-eac-no-saliency" in ablation and "| rome |" in ablation and "memit" not in ablation


def test_an_empty_store_skips_every_figure(tmp_path):
    store = Store(tmp_path / "store")
    store.put_trajectory({"experiment": "bare", "trajectory_id": "t", "model": MODEL, "method": "rome",
                          "variant": "rome", "group": None, "dataset": "zsre", "seed": 0, "n_edits": 5,
                          "batch_size": 1, "hparams": "{}", "config": "{}", "status": "failed: actor died",
                          "edits_done": 0, "updated_at": None})
    path = build_report(store.root)
    text = path.read_text()
    assert not list(path.parent.rglob("*.png")) and not list(path.parent.rglob("*.csv"))
    # the summary, Figs. 2, 5/9, 6/10, 7, 8, norms, tuning trade-off, Table 1, retention, reliability trade-off,
    # paired comparison, the evaluations CSV
    assert text.count("_Skipped:") == 13
    assert "failed: actor died" in text


def test_eac_report_command(tmp_path, capsys):
    store = Store(tmp_path / "store")
    fill(store, experiment="a", dataset="zsre")
    out = tmp_path / "figures"
    assert cli.main(["report", str(store.root), "--out", str(out)]) == 0
    assert (out / "report.md").is_file() and (out / "a" / "editing_metrics_zsre.png").is_file()
    assert "Fig. 5 — editing metrics" in (out / "report.md").read_text()
    assert str(out / "report.md") in capsys.readouterr().out
    assert cli.main(["report", str(tmp_path / "nowhere")]) == 2
    assert "no such store" in capsys.readouterr().err


def test_eac_report_on_a_read_only_store_is_one_line_exit_2_and_draws_elsewhere(tmp_path, capsys):
    """Issue 12, item 4: the report of a store that cannot be written."""
    store = Store(tmp_path / "store")
    fill(store, experiment="a", dataset="zsre")
    with read_only(store.root):
        assert cli.main(["report", str(store.root)]) == 2
        error = capsys.readouterr().err
        assert len(error.splitlines()) == 1 and "Traceback" not in error
        assert str(store.root) in error and "cannot be written" in error and "--out" in error
        assert not (store.root / "report").exists()
        assert cli.main(["report", str(store.root), "--out", str(tmp_path / "elsewhere")]) == 0
    assert (tmp_path / "elsewhere" / "report.md").is_file()


def test_task_retention_falls_back_to_the_next_plotted_metric():
    import pandas as pd

    from workers.evaluation.metrics import task_retention

    rows = pd.DataFrame([  # the unedited model never answered "True"/"False": no ratio for accuracy_all
        {"task": "nli", "metric": "accuracy_all", "value": 0.0},
        {"task": "nli", "metric": "retention/label_ll_accuracy", "value": 0.9},
        {"task": "nq", "metric": "retention/exact_match", "value": 0.5},
        {"task": "nq", "metric": "retention/contains_answer", "value": 0.7},
        {"task": "drift", "metric": "kl_mean", "value": 0.1}])
    assert task_retention(rows) == {"nli": ("label_ll_accuracy", 0.9), "nq": ("exact_match", 0.5)}


# ---- intervals, chance levels, norms, the tuning trade-off ---------------------------------------------


def fill_general(store: Store, experiment: str = "gen") -> None:
    """Two arms scored at 0, 5 and 10 edits: NLI label log-likelihood accuracy at chance (0.5 and 0.5625 of
    16, stored with the interval the scorer computed), MMLU far above chance (0.6 of 400, stored without an
    interval, as an old store holds it), perplexity with a stored interval, drift, and deviation norms."""
    for variant in ("rome", "rome-eac"):
        tid = f"{variant}-s0"
        store.put_trajectory({"experiment": experiment, "trajectory_id": tid, "model": MODEL, "method": variant,
                              "variant": variant, "group": None, "dataset": "counterfact", "seed": 0, "n_edits": 10,
                              "batch_size": 1, "hparams": "{}", "config": "{}", "status": "completed",
                              "edits_done": 10, "updated_at": None})
        for n in CHECKPOINTS:
            nli = mean_row("nli", "label_ll_accuracy", [1.0] * (8 + (n == 10)) + [0.0] * (8 - (n == 10)))
            ppl = 30.0 + (0.1 if "eac" in variant else 0.4) * n
            rows = [nli.as_dict(),
                    {"task": "mmlu", "metric": "accuracy_letter", "value": 0.6, "n_examples": 400},
                    {"task": "wikitext", "metric": "perplexity", "value": ppl, "n_examples": 8,
                     "ci_low": ppl - 3, "ci_high": ppl + 4},
                    {"task": "drift", "metric": "kl_mean", "value": 0.01 * n, "n_examples": 32}]
            if n:
                growth = 0.002 if "eac" in variant else 0.03
                rows += [{"task": f"deviation/model.layers.{layer}.mlp.down_proj", "metric": metric,
                          "value": growth * n * scale, "n_examples": 1}
                         for layer in (2, 3) for metric, scale in (("l1_relative_change", 0.8),
                                                                   ("frobenius_relative_change", 1.0),
                                                                   ("update_l1_relative", 2.0 + layer),
                                                                   ("update_frobenius_relative", 0.5))]
            store.put_evaluations(experiment, tid, n, rows)


@pytest.fixture
def general_report(tmp_path, monkeypatch):
    """The report of ``fill_general``'s store, with every band and horizontal line drawn recorded."""
    import matplotlib.axes

    drawn = {"bands": [], "lines": [], "scales": []}
    fill_between, axhline = matplotlib.axes.Axes.fill_between, matplotlib.axes.Axes.axhline
    set_yscale = matplotlib.axes.Axes.set_yscale

    def record_band(ax, x, low, high, **kwargs):
        drawn["bands"].append((ax, list(x), list(low), list(high)))
        return fill_between(ax, x, low, high, **kwargs)

    def record_line(ax, y=0, **kwargs):
        drawn["lines"].append((ax, y, kwargs.get("linestyle"), kwargs.get("label")))
        return axhline(ax, y, **kwargs)

    def record_scale(ax, value, **kwargs):
        drawn["scales"].append((ax, value))
        return set_yscale(ax, value, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "fill_between", record_band)
    monkeypatch.setattr(matplotlib.axes.Axes, "set_yscale", record_scale)
    monkeypatch.setattr(matplotlib.axes.Axes, "axhline", record_line)
    store = Store(tmp_path / "store")
    fill_general(store)
    path = build_report(store.root)
    # Panel titles are set after the lines are drawn: read them now.
    drawn = {kind: [(ax.get_title(), *rest) for ax, *rest in calls] for kind, calls in drawn.items()}
    return path, path.read_text(), drawn


def cell(text: str, column: str, *cells: str) -> str:
    """The cell under ``column`` of the first table row holding ``cells``."""
    header = next(line for line in text.splitlines() if line.startswith("|") and column in line)
    names = [p.strip() for p in header.strip().strip("|").split("|")]
    return row_of(text, *cells)[names.index(column)]


def test_general_task_panels_carry_95_percent_intervals(general_report):
    _, text, drawn = general_report
    section = text.split("### Fig. 10")[1].split("###")[0]
    # The NLI score of 9 of 16 at 10 edits, with the scorer's interval (the binomial one, 8 of 16 ... 13 of 16).
    low, high = (int(binom.ppf(q, 16, 9 / 16)) / 16 for q in (0.025, 0.975))
    assert cell(section, "nli label_ll_accuracy", MODEL, "rome", "10") == f"0.562 [{low:.3f}, {high:.3f}]"
    # MMLU was stored without an interval: the report computes the same bootstrap interval from 0.6 and 400.
    low, high = (int(binom.ppf(q, 400, 0.6)) / 400 for q in (0.025, 0.975))
    assert cell(section, "mmlu accuracy_letter", MODEL, "rome", "10") == f"0.600 [{low:.3f}, {high:.3f}]"
    # A band per arm in every panel with intervals: NLI, MMLU, perplexity (drift rows hold none).
    band_panels = {title for title, *_ in drawn["bands"]}
    assert any("NLI" in t for t in band_panels) and any("MMLU" in t for t in band_panels)
    assert not any("drift" in t for t in band_panels)
    (ppl,) = [b for b in drawn["bands"] if "WikiText" in b[0] and b[2][-1] == pytest.approx(30.0 + 0.4 * 10 - 3)]
    assert ppl[1] == [0, 5, 10] and ppl[3] == pytest.approx([34.0, 36.0, 38.0])


def test_a_metric_at_chance_is_marked_in_the_figure_and_the_report(general_report):
    _, text, drawn = general_report
    chance_lines = {(title.split(" · ")[1], y) for title, y, style, label in drawn["lines"]
                    if style == "--" and label and label.startswith("chance")}
    assert chance_lines == {("NLI (RTE) (label_ll_accuracy)\n(at chance: every interval contains it)", 0.5),
                            ("MMLU (accuracy_letter)", 0.25)}
    section = text.split("### Fig. 10")[1].split("###")[0]
    note = section.split("**At chance**")[1].split("\n")[0]
    assert "NLI (RTE) (label_ll_accuracy) (chance 0.5)" in note
    assert "MMLU" not in note  # 0.6 of 400: its interval lies far above 0.25


def test_perplexity_is_drawn_on_a_log_scale_and_the_other_panels_are_not(general_report):
    """A collapsing arm (ROME at 2454 after 300 edits on the default model) drawn on a linear axis
    flattens every other arm's perplexity (31 to 75) into the bottom line of the panel."""
    _, _, drawn = general_report
    log_panels = {title.split(" · ")[1] for title, value in drawn["scales"] if value == "log"}
    assert log_panels == {"WikiText perplexity (perplexity, log scale)"}


def test_norms_and_drift_are_drawn_for_every_arm_over_the_sequence(general_report):
    path, text, _ = general_report
    assert mpimg.imread(path.parent / "gen" / "norms.png").shape[0] > 200
    section = text.split("### Norms of the edited matrices")[1].split("###")[0]
    # ‖ΔW‖₁ / ‖W₀‖₁ after 10 edits: the mean over layers 2 and 3 of 0.03 * 10 * (2 + layer), 0.3 * 4.5.
    assert [cell(section, name, MODEL, "rome", "10") for name in
            ("‖W‖₁ / ‖W₀‖₁", "‖W‖₂ / ‖W₀‖₂ (Frobenius)", "‖ΔW‖₁ / ‖W₀‖₁", "‖ΔW‖₂ / ‖W₀‖₂ (Frobenius)")] == \
        [f"{1 + 0.24:.3f}", f"{1 + 0.3:.3f}", f"{0.3 * 4.5:.3f}", f"{0.3 * 0.5:.3f}"]
    assert cell(text.split("### Fig. 10")[1].split("###")[0], "drift kl_mean", MODEL, "rome-eac", "10") == "0.100"


def test_tuning_trials_show_efficacy_against_the_update_norm(tmp_path):
    store = Store(tmp_path / "store")
    # variant -> (method, {checkpoint: (requests of 16 edited, relative L1 of the update)}); the trial at
    # gamma=80 was stopped after 8 edits, when its update (0.012) was smaller than gamma=60's at 16 (0.02)
    # but larger than the reference's own at 8 (0.01).
    trials = {"rome[reference]": ("rome", {8: (16, 0.01), 16: (15, 0.05)}),
              "rome-eac[gamma=60]": ("rome-eac", {8: (16, 0.005), 16: (14, 0.02)}),
              "rome-eac[gamma=80]": ("rome-eac", {8: (12, 0.012)}),
              "rome-eac[gamma=95]": ("rome-eac", {8: (10, 0.002), 16: (8, 0.004)})}
    for variant, (method, checkpoints) in trials.items():
        tid = variant.replace("[", "-").replace("]", "").replace("=", "")
        store.put_trajectory({"experiment": "tune-x", "trajectory_id": tid, "model": MODEL, "method": method,
                              "variant": variant, "group": "tune", "dataset": "counterfact-val", "seed": 0,
                              "n_edits": 16, "batch_size": 1, "hparams": "{}", "config": "{}",
                              "status": "completed", "edits_done": max(checkpoints), "updated_at": None})
        for n, (edited, l1) in checkpoints.items():
            store.put_evaluations("tune-x", tid, n, [
                mean_row("edit/counterfact", "efficacy", [1.0] * edited + [0.0] * (16 - edited)).as_dict(),
                {"task": "deviation/m", "metric": "update_l1_relative", "value": l1, "n_examples": 1}])
    text = build_report(store.root).read_text()
    assert (tmp_path / "store" / "report" / "tune-x" / "tuning_tradeoff.png").is_file()
    section = text.split("### Tuning — efficacy vs")[1].split("###")[0]
    # (update, efficacy − the reference's, update / the reference's), both at the trial's last checkpoint
    assert row_of(section, "rome-eac[gamma=60]")[2] == "16"
    assert row_of(section, "rome-eac[gamma=60]")[-3:] == ["0.02", "-0.0625", "0.4"]  # 14/16 - 15/16; 0.02/0.05
    assert row_of(section, "rome-eac[gamma=95]")[-3:] == ["0.004", "-0.4375", "0.08"]
    # stopped at 8: against the reference at 8 edits (16 of 16, 0.01), not at 16
    assert row_of(section, "rome-eac[gamma=80]")[2] == "8"
    assert row_of(section, "rome-eac[gamma=80]")[-3:] == ["0.012", "-0.25", "1.2"]
    assert row_of(section, "rome[reference]")[3] == "0.938 [0.812, 1.000]"  # 13 and 16 of 16: binomial percentiles
    assert "tune" not in text.split("### Tuning")[0].split("### Trajectories")[1].split("### Fig. 2")[1]


def test_retention_leaves_out_a_score_already_at_chance_before_editing_and_says_so(tmp_path):
    """MMLU 17 of 64 unedited (0.266, interval about [0.16, 0.38] around chance 0.25) falling to 16 of 64
    would read as retention 0 — "lost everything" — though there was nothing above chance to lose; NLI 52 of
    64 (0.81) has a margin, and its ratio is kept. The trajectory's status with no reason reads alone."""
    store = Store(tmp_path / "store")
    store.put_trajectory({"experiment": "ret", "trajectory_id": "t0", "model": MODEL, "method": "memit",
                          "variant": "memit", "group": None, "dataset": "counterfact", "seed": 0, "n_edits": 10,
                          "batch_size": 1, "hparams": "{}", "config": "{}", "status": "running", "reason": None,
                          "edits_done": 5, "updated_at": None})
    scores = {0: {"mmlu": 17, "nli": 52}, 10: {"mmlu": 16, "nli": 44}}
    for n, counts in scores.items():
        rows = [mean_row("mmlu", "accuracy_letter", [1.0] * counts["mmlu"] + [0.0] * (64 - counts["mmlu"])).as_dict(),
                mean_row("nli", "label_ll_accuracy", [1.0] * counts["nli"] + [0.0] * (64 - counts["nli"])).as_dict()]
        if n:
            rows += [{"task": "mmlu", "metric": "retention/accuracy_letter", "value": 0.0, "n_examples": 64},
                     {"task": "nli", "metric": "retention/label_ll_accuracy", "value": (44 / 64 - 0.5) / (52 / 64 - 0.5),
                      "n_examples": 64}]
        store.put_evaluations("ret", "t0", n, rows)
    text = build_report(store.root).read_text()
    section = text.split("### Retention per task")[1].split("###")[0]
    assert cell(section, "nli (label_ll_accuracy)", MODEL, "memit", "10") == f"{(44 / 64 - 0.5) / (52 / 64 - 0.5):.3f}"
    assert "mmlu (accuracy_letter)" not in section.split("Not shown:")[0]
    note = section.split("Not shown:")[1]
    assert note.startswith(" mmlu (accuracy_letter): unedited 0.266 [") and "chance 0.25" in note
    assert "nli" not in note
    trajectories = text.split("### Trajectories")[1].split("###")[0]
    assert cell(trajectories, "status", MODEL, "memit") == "running"


def test_the_summary_has_one_row_per_arm_with_perplexity_before_and_after_drift_and_norms(general_report):
    _, text, _ = general_report
    section = text.split("### Summary")[1].split("###")[0]
    rows = [line for line in section.splitlines() if line.startswith(f"| {MODEL} ")]
    assert len(rows) == 2  # rome, rome-eac
    assert cell(section, "edits", MODEL, "rome") == "10"
    assert cell(section, "WikiText ppl, unedited", MODEL, "rome") == "30.000"
    assert cell(section, "WikiText ppl", MODEL, "rome-eac") == f"{31.0:.3f} [{28.0:.3f}, {35.0:.3f}]"
    assert cell(section, "drift KL", MODEL, "rome") == "0.100"
    # the mean over layers 2 and 3 after 10 edits: 0.03 * 10 * 0.8, and 0.03 * 10 * (2 + layer)
    assert cell(section, "‖W‖₁ / ‖W₀‖₁ − 1", MODEL, "rome") == f"{0.24:.3f}"
    assert cell(section, "‖ΔW‖₁ / ‖W₀‖₁", MODEL, "rome-eac") == f"{0.002 * 10 * 4.5:.3f}"
    assert "CF efficacy" not in section  # no such rows in this store


def test_an_arm_scored_only_before_its_first_edit_is_named_not_summarised(tmp_path):
    """A study still running: memit scored at 0 and 10 edits, alphaedit only before its first edit. A
    row for alphaedit would read as an edited model with the unedited numbers (0 drift, perplexity 30)."""
    store = Store(tmp_path / "store")
    for tid, variant, checkpoints in (("t0", "memit", (0, 10)), ("t1", "alphaedit", (0,))):
        store.put_trajectory({"experiment": "wip", "trajectory_id": tid, "model": MODEL, "method": variant,
                              "variant": variant, "group": None, "dataset": "counterfact", "seed": 0, "n_edits": 10,
                              "batch_size": 1, "hparams": "{}", "config": "{}", "status": "running", "reason": None,
                              "edits_done": max(checkpoints), "updated_at": None})
        for n in checkpoints:
            store.put_evaluations("wip", tid, n, [
                {"task": "wikitext", "metric": "perplexity", "value": 30.0 + n, "n_examples": 8},
                {"task": "drift", "metric": "kl_mean", "value": 0.01 * n, "n_examples": 16}])
    section = build_report(store.root).read_text().split("### Summary")[1].split("###")[0]
    assert [line.split("|")[3].strip() for line in section.splitlines() if line.startswith(f"| {MODEL} ")] == ["memit"]
    assert cell(section, "WikiText ppl", MODEL, "memit") == "40.000"
    assert section.split("Not edited yet (only the unedited model scored): ")[1].startswith(
        f"alphaedit ({MODEL}, counterfact).")


def test_a_figure_of_many_arms_names_them_in_one_legend_below_the_panels(tmp_path, monkeypatch):
    """Eleven arms in a legend per panel covered the lines of every panel (the study's Fig. 10); past
    four arms one legend of the figure names them all, and no panel carries its own."""
    import matplotlib.axes
    import matplotlib.figure

    legends = {"panel": 0, "figure": []}
    panel_legend, figure_legend = matplotlib.axes.Axes.legend, matplotlib.figure.Figure.legend

    def record_panel(ax, *args, **kwargs):
        legends["panel"] += 1
        return panel_legend(ax, *args, **kwargs)

    def record_figure(fig, *args, **kwargs):
        legends["figure"].append([h.get_label() for h in kwargs["handles"]])
        return figure_legend(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "legend", record_panel)
    monkeypatch.setattr(matplotlib.figure.Figure, "legend", record_figure)
    store = Store(tmp_path / "store")
    arms = ["alphaedit", "memit", "memit-eac", "memit-prune", "rome"]
    for variant in arms:
        store.put_trajectory({"experiment": "many", "trajectory_id": variant, "model": MODEL, "method": variant,
                              "variant": variant, "group": None, "dataset": "counterfact", "seed": 0, "n_edits": 10,
                              "batch_size": 1, "hparams": "{}", "config": "{}", "status": "completed", "reason": None,
                              "edits_done": 10, "updated_at": None})
        for n in (0, 10):
            store.put_evaluations("many", variant, n, [
                {"task": "wikitext", "metric": "perplexity", "value": 30.0 + n, "n_examples": 8},
                {"task": "drift", "metric": "kl_mean", "value": 0.01 * n, "n_examples": 16}])
    build_report(store.root)
    assert legends["figure"] and all(labels == arms for labels in legends["figure"])
    assert legends["panel"] == 0
