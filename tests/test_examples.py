"""The examples table: every score over examples keeps its per-example values, keyed so that arms can
be paired, and the stored aggregate is exactly what its example rows give."""

from __future__ import annotations

import math

import pyarrow.parquet as pq
import pytest
import torch

from orchestrator.store import SCHEMAS, Store, StoreError
from workers import data
from workers.editing.delta import EditLog, LayerDelta, WeightDelta
from workers.evaluation import EvalConfig, ReferenceCache, TaskSuite, evaluate_checkpoint, model_key
from workers.models import arch_spec

# Rows that are not a mean of examples (the schema's docstring says so): they carry none.
NOT_OVER_EXAMPLES = ("retention/", "retention_dropped/")


def _checkpoint_rows(model, tokenizer, data_root, log):
    config = EvalConfig(tasks={"nli": 3, "sst2": 3, "nq": 2, "samsum": 2, "mmlu": 3, "wikitext": 2},
                        max_new_tokens={"nq": 3, "samsum": 3}, drift_examples=2, perplexity_window=96,
                        perplexity_stride=96, progress=False, batch_size=8)
    suite = TaskSuite.load(tokenizer, config, data_root)
    requests = data.load_counterfact("edit", data_root)[:3]
    reference = ReferenceCache()
    base_key = model_key(model, tokenizer)
    unedited = evaluate_checkpoint(model, tokenizer, None, requests, config, tasks=suite, reference=reference,
                                   base_key=base_key)
    edited = evaluate_checkpoint(model, tokenizer, log, requests, config, tasks=suite, reference=reference,
                                 base_key=base_key)
    return suite, requests, unedited, edited


@pytest.mark.slow
def test_every_aggregate_of_a_default_model_checkpoint_is_the_mean_of_its_example_rows(default_model, data_root,
                                                                                      tmp_path):
    torch.set_num_threads(1)
    model, tokenizer = default_model
    layer = arch_spec(model).mlp_out_name(12)
    generator = torch.Generator().manual_seed(0)
    log = EditLog([WeightDelta([LayerDelta(layer, torch.randn(576, 1, generator=generator) * 2.0,
                                           torch.randn(1536, 1, generator=generator))], case_ids=[0])])
    suite, requests, unedited, edited = _checkpoint_rows(model, tokenizer, data_root, log)
    store = Store(tmp_path / "store")
    for n_edits, rows in ((0, unedited), (1, edited)):
        # As the evaluation actor returns them, through the store, and read back.
        store.put_checkpoint("e", "t", n_edits, [{**r.as_dict(), "examples": [x.as_dict() for x in r.examples]}
                                                 for r in rows])
    examples = store.frame("examples", "e")
    aggregates = store.frame("evaluations", "e")
    checked = set()
    for row in aggregates.itertuples():
        mine = examples[(examples["n_edits"] == row.n_edits) & (examples["task"] == row.task)
                        & (examples["metric"] == row.metric)]
        if row.task.startswith("deviation/") or row.metric.startswith(NOT_OVER_EXAMPLES):
            assert not len(mine), (row.task, row.metric)
            continue
        if row.n_examples == 0:  # e.g. accuracy over valid answers when no answer was a label word
            assert not len(mine) and math.isnan(row.value)
            continue
        assert len(mine) == row.n_examples, (row.task, row.metric)
        assert mine["example_id"].is_unique
        if (row.task, row.metric) == ("wikitext", "perplexity"):
            assert row.value == pytest.approx(math.exp(mine["window_nll"].sum() / mine["window_tokens"].sum()),
                                              rel=1e-12)
            assert list(mine["window_start"]) == suite.perplexity_starts
            assert (mine["value"] == mine["window_nll"] / mine["window_tokens"]).all()
        else:
            assert row.value == pytest.approx(mine["value"].mean(), rel=1e-12, abs=1e-15), (row.task, row.metric)
        checked.add((row.task, row.metric))
    # Every family of metric was checked, at both checkpoints' rows.
    for wanted in [("edit/toolkit", "reliability"), ("edit/toolkit", "generalisation"), ("edit/toolkit", "locality"),
                   ("edit/counterfact", "efficacy"), ("edit/counterfact", "neighbourhood"),
                   ("edit/generative", "reliability"), ("nli", "label_ll_accuracy"), ("sst2", "valid_rate"),
                   ("nq", "contains_answer"), ("samsum", "rouge_mean"), ("mmlu", "accuracy_cloze"),
                   ("wikitext", "perplexity"), ("nli", "drift_kl"), ("drift", "kl_mean")]:
        assert wanted in checked, wanted
    # The ids say what the example is: case ids for edits, data-set indices for tasks, task/index for drift.
    case_ids = [str(r.case_id) for r in requests]
    efficacy = examples[(examples["metric"] == "efficacy") & (examples["n_edits"] == 1)]
    assert list(efficacy["example_id"]) == case_ids and set(efficacy["prompt_kind"]) == {"edit"}
    nli = examples[(examples["task"] == "nli") & (examples["metric"] == "accuracy_all") & (examples["n_edits"] == 1)]
    assert sorted(nli["example_index"]) == suite.indices["nli"]
    drift = examples[(examples["task"] == "drift") & (examples["n_edits"] == 1)]
    assert set(drift["example_id"]) == {f"{task}/{index}" for task in ("nli", "sst2", "nq", "samsum", "mmlu")
                                        for index in suite.indices[task][:2]}
    # The unedited checkpoint (its task rows come from the reference cache) keeps its examples too.
    assert len(examples[(examples["n_edits"] == 0) & (examples["task"] == "wikitext")]) == 2


def test_checkpoint_examples_are_written_atomically_idempotently_and_before_the_aggregates(tmp_path):
    store = Store(tmp_path / "store")
    rows = [{"task": "nli", "metric": "accuracy_all", "value": 0.5, "n_examples": 2, "ci_low": 0.0, "ci_high": 1.0,
             "examples": [{"example_id": "3", "value": 1.0, "example_index": 3},
                          {"example_id": "8", "value": 0.0, "example_index": 8}]},
            {"task": "deviation/m", "metric": "l1_relative_change", "value": 0.1, "n_examples": 1, "examples": []}]
    written = []
    original = store.write
    store.write = lambda table, *args, **kwargs: written.append(table) or original(table, *args, **kwargs)
    store.put_checkpoint("e", "t", 5, rows)
    store.put_checkpoint("e", "t", 5, rows)  # a re-run replaces the same files
    assert written == ["examples", "evaluations"] * 2
    files = store.files("examples", "e")
    assert [f.rsplit("/", 1)[1] for f in files] == ["t-at-000005.parquet"]
    table = pq.read_table(files[0])
    assert table.schema.equals(SCHEMAS["examples"])
    frame = store.frame("examples", "e")
    assert list(frame["example_id"]) == ["3", "8"] and list(frame["n_edits"]) == [5, 5]
    assert sorted(store.frame("evaluations", "e")["metric"]) == ["accuracy_all", "l1_relative_change"]
    with pytest.raises(StoreError, match="repeated task/metric/example_id"):
        store.put_examples("e", "t", 6, [{"task": "nli", "metric": "a", "example_id": "1", "value": 1.0}] * 2)


def test_a_store_written_before_the_examples_table_reads_as_no_examples(tmp_path):
    store = Store(tmp_path / "old")
    store.put_evaluations("e", "t", 0, [{"task": "nli", "metric": "accuracy_all", "value": 0.5, "n_examples": 2}])
    assert len(store.frame("examples", "e")) == 0
    assert list(store.frame("examples").columns) == SCHEMAS["examples"].names
