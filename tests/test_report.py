"""`eac report`: figures and the Markdown summary from a synthetic store alone."""

import re

import matplotlib.image as mpimg
import pytest

from experiments.figures import build_report
from orchestrator import cli
from orchestrator.store import Store, edit_row
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
    assert not list(path.parent.rglob("*.png"))
    assert text.count("_Skipped:") == 7  # Figs. 2, 5/9, 6/10, 7, 8, Table 1, retention
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
