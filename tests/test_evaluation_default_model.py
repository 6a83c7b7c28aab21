"""Evaluation on the default model (SmolLM2-135M-Instruct): a wrapper that always emits one token gives
exactly the accuracies the data imply; a real checkpoint evaluation on small samples leaves the
shared model bit-identical."""

from __future__ import annotations

import math

import pytest
import torch

from workers import data
from workers.data import EditRequest, QAExample, SummaryExample
from workers.editing.delta import EditLog, LayerDelta, WeightDelta, applied
from workers.evaluation import EvalConfig, ReferenceCache, TaskSuite, evaluate_checkpoint, model_key
from workers.evaluation.edit_metrics import edit_metric_rows, unedited_locality_argmax
from workers.evaluation.prompts import PromptFormat
from workers.evaluation.scoring import encode_pair
from workers.evaluation.tasks import general_task_rows
from workers.generation import greedy_token_ids
from workers.hooks import patch_output
from workers.models import arch_spec, weights_fingerprint

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def one_thread():
    """Decoding runs one token at a time: its matrix products are too small to gain from a second
    thread, and on a shared 2-CPU machine a second OpenMP thread waiting for a core made ten greedy
    steps 15-40x slower (0.6 s on one thread against 10-34 s on two, measured under load)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def always_emits(model, token_id: int):
    """Make the LM head put all probability mass on one token (log-probability ≈ 0 for it, −30 for
    every other token), for prompts of any length, in forward passes and in generate()."""

    def fixed(logits: torch.Tensor) -> torch.Tensor:
        out = torch.full_like(logits, -30.0)
        out[..., token_id] = 0.0
        return out

    return patch_output(model, "lm_head", fixed)


def token(tokenizer, text: str) -> int:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1, f"{text!r} is not one token: {ids}"
    return ids[0]


def values_of(rows) -> dict[tuple[str, str], float]:
    return {(r.task, r.metric): r.value for r in rows}


def small_config(**overrides) -> EvalConfig:
    values = dict(tasks={}, max_new_tokens={"nli": 1, "sst2": 1, "nq": 1, "samsum": 2}, drift_examples=0,
                  progress=False, batch_size=8)
    values.update(overrides)
    return EvalConfig(**values)


def test_fixed_token_model_gives_the_accuracies_the_labels_imply(default_model, data_root):
    model, tokenizer = default_model
    config = small_config(tasks={"nli": 6, "sst2": 6, "mmlu": 4})
    suite = TaskSuite.build(tokenizer, config, {"nli": data.load_rte(data_root), "sst2": data.load_sst2(data_root),
                                                "mmlu": data.load_mmlu(data_root)})
    entailed = sum(x.entailment for x in suite.examples["nli"]) / 6
    positive = sum(x.positive for x in suite.examples["sst2"]) / 6
    answer_a = sum(x.answer == 0 for x in suite.examples["mmlu"]) / 4
    assert 0 < entailed < 1 and 0 < positive < 1  # the sample has both labels: a wrong scorer would show

    with always_emits(model, token(tokenizer, " True")):
        nli = values_of(general_task_rows(model, tokenizer, suite, small_config(tasks={"nli": 6})))
    assert nli[("nli", "valid_rate")] == 1.0
    assert nli[("nli", "accuracy_all")] == pytest.approx(entailed)
    assert nli[("nli", "accuracy_valid")] == pytest.approx(entailed)
    assert nli[("nli", "label_ll_accuracy")] == pytest.approx(entailed)

    with always_emits(model, token(tokenizer, " positive")):
        sst2 = values_of(general_task_rows(model, tokenizer, suite, small_config(tasks={"sst2": 6})))
    assert sst2[("sst2", "accuracy_all")] == pytest.approx(positive)
    assert sst2[("sst2", "label_ll_accuracy")] == pytest.approx(positive)

    with always_emits(model, token(tokenizer, " A")):
        mmlu = values_of(general_task_rows(model, tokenizer, suite, small_config(tasks={"mmlu": 4})))
    assert mmlu[("mmlu", "accuracy_letter")] == pytest.approx(answer_a)


def test_fixed_token_model_on_qa_summaries_and_edits(default_model):
    model, tokenizer = default_model
    config = small_config(tasks={"nq": 3, "samsum": 1})
    suite = TaskSuite.build(tokenizer, config, {
        "nq": [QAExample("q1?", ("Paris",), "p"), QAExample("q2?", ("the Paris.",), "p"),
               QAExample("q3?", ("London",), "p")],
        "samsum": [SummaryExample("A: hi\nB: hello", "Paris is nice")]})
    requests = [
        EditRequest(0, "The capital of France is", "France", "Paris", "London", ("France's capital is",),
                    ("The capital of Italy is",), ("Rome",)),
        EditRequest(1, "The capital of England is", "England", "London", "Paris", ("England's capital is",),
                    ("The capital of Spain is",), ("Paris",)),
        EditRequest(2, "The twin cities are", "twin", "Paris London", "Rome", ("Two cities:",), (), ()),
    ]
    assert encode_pair(tokenizer, requests[2].prompt, " Paris London").continuation_ids == (
        token(tokenizer, " Paris"), token(tokenizer, " London"))
    with always_emits(model, token(tokenizer, " Paris")):
        tasks = values_of(general_task_rows(model, tokenizer, suite, config))
        reference = unedited_locality_argmax(model, tokenizer, requests, ReferenceCache(), "fixed", batch_size=2)
        edits = values_of(edit_metric_rows(model, tokenizer, requests, locality_reference=reference, batch_size=2))
    assert tasks[("nq", "exact_match")] == pytest.approx(2 / 3)  # "Paris" matches "Paris" and "the Paris."
    # " Paris Paris" against "Paris is nice": 1 overlapping unigram, P = 1/2, R = 1/3, F1 = 0.4.
    assert tasks[("samsum", "rouge1")] == pytest.approx(0.4)
    # Token level: targets Paris (1 of 1 tokens), London (0 of 1), "Paris London" (1 of 2).
    assert edits[("edit/toolkit", "reliability")] == pytest.approx(0.5)
    assert edits[("edit/toolkit", "generalisation")] == pytest.approx(0.5)
    assert edits[("edit/toolkit", "locality")] == 1.0
    # Mean NLL ≈ 0 for " Paris", 30 for other tokens: new beats true for requests 0 and 2.
    assert edits[("edit/counterfact", "efficacy")] == pytest.approx(2 / 3)
    assert edits[("edit/counterfact", "paraphrase")] == pytest.approx(2 / 3)
    assert edits[("edit/counterfact", "neighbourhood")] == pytest.approx(0.5)  # Rome loses to Paris; Paris wins
    # Decoding " Paris Paris ...": begins with "Paris" only for request 0.
    assert edits[("edit/generative", "reliability")] == pytest.approx(1 / 3)
    assert edits[("edit/generative", "generalisation")] == pytest.approx(1 / 3)


def test_checkpoint_on_the_default_model_small_sample(default_model, data_root):
    model, tokenizer = default_model
    config = EvalConfig(tasks={"nli": 2, "sst2": 2, "nq": 1, "samsum": 1, "mmlu": 2, "wikitext": 1},
                        max_new_tokens={"nq": 4, "samsum": 4}, drift_examples=1, perplexity_window=128,
                        perplexity_stride=128, progress=False)
    suite = TaskSuite.load(tokenizer, config, data_root)
    requests = data.load_counterfact("edit", data_root)[:2]
    layer = arch_spec(model).mlp_out_name(12)
    generator = torch.Generator().manual_seed(0)
    log = EditLog([WeightDelta([LayerDelta(layer, torch.randn(576, 1, generator=generator) * 2.0,
                                           torch.randn(1536, 1, generator=generator))], case_ids=[0])])
    fingerprint = weights_fingerprint(model)
    reference = ReferenceCache()
    base_key = model_key(model, tokenizer)
    unedited = values_of(evaluate_checkpoint(model, tokenizer, None, requests, config, tasks=suite,
                                             reference=reference, base_key=base_key))
    edited = values_of(evaluate_checkpoint(model, tokenizer, log, requests, config, tasks=suite,
                                           reference=reference, base_key=base_key))
    assert weights_fingerprint(model) == fingerprint
    # Perplexity from the model's own loss over the same window, unedited and edited: the rows must be
    # these, and the retention their ratio the right way up (unedited / edited).
    window = suite.perplexity_windows[0]
    labels = torch.tensor([window.ids])
    labels[0, :len(window.prompt_ids)] = -100

    def own_perplexity() -> float:
        with torch.no_grad():
            return math.exp(model(input_ids=torch.tensor([window.ids]), labels=labels).loss.item())

    base = own_perplexity()
    with applied(model, log):
        moved = own_perplexity()
    assert abs(moved / base - 1) > 1e-3
    assert unedited[("wikitext", "perplexity")] == pytest.approx(base, rel=1e-4)
    assert edited[("wikitext", "perplexity")] == pytest.approx(moved, rel=1e-4)
    assert edited[("wikitext", "retention/perplexity")] == pytest.approx(base / moved, rel=1e-4)
    assert edited[("drift", "kl_mean")] > 0
    assert edited[(f"deviation/{layer}", "update_frobenius_relative")] > 0
    for (task, metric), value in edited.items():
        if metric in ("accuracy_all", "valid_rate", "label_ll_accuracy", "exact_match", "rouge_mean") or \
                task.startswith("edit/"):
            assert 0.0 <= value <= 1.0, (task, metric, value)


def test_chat_format_wraps_prompts_in_the_template(default_model, tiny_llama, data_root):
    model, tokenizer = default_model
    rendered = PromptFormat("chat").render(tokenizer, "Is it True or False? answer:")
    assert rendered.rstrip().endswith("<|im_start|>assistant") and "True or False" in rendered
    config = small_config(tasks={"nli": 2}, prompt_format="chat")
    suite = TaskSuite.build(tokenizer, config, {"nli": data.load_rte(data_root)[:2]})
    assert suite.prompts["nli"][0].startswith("<|im_start|>")
    rows = values_of(general_task_rows(model, tokenizer, suite, config))
    assert 0 <= rows[("nli", "valid_rate")] <= 1 and 0 <= rows[("nli", "label_ll_accuracy")] <= 1
    with pytest.raises(ValueError, match="no chat template"):
        PromptFormat("chat").render(tiny_llama[1], "hi")


def test_samsum_first_dialogues_in_order(default_model, data_root):
    """Issue 17, item 12: the unedited 0.090 (a seeded sample of 100) and the independent 0.117 (the
    first 200 in order) are different samples. benchmarks/samsum_reference.py -n 200 --order first
    reproduces 0.117 with this code (0.1172; 404 s for the 200 generations on a loaded 2-CPU machine,
    one thread), too slow here; the first 20, through the same path, gave 0.1072 (94 s loaded)."""
    model, tokenizer = default_model
    config = EvalConfig.from_yaml("experiments/configs/eval/samsum-first200.yaml")
    config = EvalConfig.from_dict({**vars(config), "tasks": {"samsum": 20}, "progress": False})
    suite = TaskSuite.load(tokenizer, config, data_root)
    assert suite.examples["samsum"] == data.load_samsum(data_root)[:20]
    rows = values_of(general_task_rows(model, tokenizer, suite, config))
    assert rows[("samsum", "rouge_mean")] == pytest.approx(0.1072, abs=0.002)


def test_batched_generation_on_the_default_model_matches_one_prompt_at_a_time(default_model):
    model, tokenizer = default_model
    prompts = ["Hi", "The capital of France is", "Danielle Darrieux's mother tongue is",
               "Summarise: the meeting moved to Monday because the room was booked on Friday.\nTL;DR:"]
    batched = greedy_token_ids(model, tokenizer, prompts, max_new_tokens=6, batch_size=len(prompts))
    assert batched == [greedy_token_ids(model, tokenizer, [p], max_new_tokens=6, batch_size=1)[0] for p in prompts]
