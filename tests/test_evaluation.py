"""Evaluation on tiny models and hand-built cases: scoring under padding, metrics with known answers,
caches, configuration, deviation analysis, and evaluate_checkpoint leaving the model untouched."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from workers.data import EditRequest, MultipleChoiceExample, NLIExample, QAExample, SentimentExample, SummaryExample
from workers.editing.delta import EditLog, LayerDelta, WeightDelta, applied
from workers.evaluation import EvalConfig, MetricRow, ReferenceCache, TaskSuite, evaluate_checkpoint, model_key
from workers.evaluation.checkpoint import retention_rows, suite_digest
from workers.evaluation.deviation import matrix_deviation, pca_view
from workers.evaluation.edit_metrics import edit_metric_rows, unedited_locality_argmax
from workers.evaluation.prompts import perplexity_windows, sample_examples, special_prefix
from workers.evaluation.reference import EVALUATION_CODE, evaluation_code_version, module_sources, source_digest
from workers.evaluation.scoring import encode_pair, next_token_logprobs, score_continuations
from workers.evaluation.tasks import general_task_rows, kl_divergence, perplexity
from workers.evaluation.text_metrics import contains_answer, exact_match, normalize_answer, rouge_f1
from workers.generation import begins_with, greedy_token_ids
from workers.models import arch_spec, weights_fingerprint

REQUESTS = [
    EditRequest(0, "The capital of France is", "France", "Rome", "Paris",
                ("France's capital city is", "The French capital is called"), ("The capital of Italy is",), ("Rome",)),
    EditRequest(1, "Danielle Darrieux speaks", "Danielle Darrieux", "English", "French",
                ("The language of Danielle Darrieux is",), ("Michel Rocard speaks", "Jean Gabin speaks"),
                ("French", "French")),
    EditRequest(2, "Apple was founded by", "Apple", "Bill Gates", "Steve Jobs", (), (), ()),
]

TASK_EXAMPLES = {
    "nli": [NLIExample("A cat sat on a mat.", "A cat sat.", True), NLIExample("It rained.", "It was dry.", False),
            NLIExample("Tom ran home.", "Tom moved.", True)],
    "sst2": [SentimentExample("a lovely film", True), SentimentExample("dull and long", False),
             SentimentExample("great fun", True)],
    "nq": [QAExample("who wrote it?", ("Ann",), "Ann wrote it."), QAExample("where?", ("Paris", "France"), "In Paris.")],
    "samsum": [SummaryExample("A: hi\nB: hello", "A greets B."), SummaryExample("A: lunch?\nB: yes", "They eat.")],
    "mmlu": [MultipleChoiceExample("2+2?", ("4", "5", "6", "7"), 0, "math"),
             MultipleChoiceExample("Sky colour?", ("red", "blue", "green", "pink"), 1, "")],
}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run faster on one thread (their matrices are too small to split), and on a busy
    2-CPU machine a second OpenMP thread waiting for a core slows them about a hundredfold."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


WIKITEXT = " The quick brown fox jumps over the lazy dog near the river bank . " * 12


def tiny_config(**overrides) -> EvalConfig:
    values = dict(tasks={"nli": 3, "sst2": 3, "nq": 2, "samsum": 2, "mmlu": 2, "wikitext": 3},
                  max_new_tokens={"nli": 1, "sst2": 2, "nq": 6, "samsum": 6}, drift_examples=2,
                  perplexity_window=48, perplexity_stride=24, progress=False)
    values.update(overrides)
    return EvalConfig(**values)


def rank_one_log(model, layer: int = 1, scale: float = 3.0, seed: int = 0) -> EditLog:
    spec = arch_spec(model)
    weight = model.get_submodule(spec.mlp_out_name(layer)).weight
    out_features, in_features = (weight.shape[1], weight.shape[0]) if spec.weight_transposed else weight.shape
    generator = torch.Generator().manual_seed(seed)
    left = torch.randn(out_features, 1, generator=generator) * scale
    right = torch.randn(in_features, 1, generator=generator)
    return EditLog([WeightDelta([LayerDelta(spec.mlp_out_name(layer), left, right)], case_ids=[0])])


# ---- scoring ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama"])
def test_scores_equal_full_forward_logprobs_and_do_not_depend_on_batching(fixture, request):
    model, tokenizer = request.getfixturevalue(fixture)
    pairs = [("The capital of France is", " Paris"), ("Hi", " there, friend"), ("A longer prompt here.", " x"),
             ("Hi", " t")]
    batched = score_continuations(model, tokenizer, pairs, batch_size=16)
    single = score_continuations(model, tokenizer, pairs, batch_size=1)
    for (prompt, continuation), a, b in zip(pairs, batched, single):
        pair = encode_pair(tokenizer, prompt, continuation)
        ids = torch.tensor([pair.ids])
        with torch.no_grad():
            full = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
        start, count = len(pair.prompt_ids), len(pair.continuation_ids)
        expected = full[start - 1:start - 1 + count].gather(1, ids[0, start:, None])[:, 0]
        torch.testing.assert_close(a.logprobs, expected, atol=1e-5, rtol=0)
        assert torch.equal(a.argmax_ids, full[start - 1:start - 1 + count].argmax(-1))
        torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=0)
        assert torch.equal(a.argmax_ids, b.argmax_ids)


def test_bos_is_part_of_the_prompt_never_of_the_target(tiny_llama, tiny_gpt2):
    _, llama_tok = tiny_llama
    _, gpt2_tok = tiny_gpt2
    pair = encode_pair(llama_tok, "ab", " cd")
    assert pair.prompt_ids[0] == llama_tok.bos_token_id
    assert pair.continuation_ids == tuple(llama_tok(" cd", add_special_tokens=False)["input_ids"])
    assert special_prefix(llama_tok) == (llama_tok.bos_token_id,)
    assert special_prefix(gpt2_tok) == ()
    assert encode_pair(gpt2_tok, "ab", " cd").prompt_ids == tuple(gpt2_tok("ab")["input_ids"])


def test_next_token_logprobs_read_the_last_real_token(tiny_llama):
    model, tokenizer = tiny_llama
    prompts = ["short", "a much longer prompt than the first"]
    batched = next_token_logprobs(model, tokenizer, prompts, batch_size=2)
    for prompt, row in zip(prompts, batched):
        with torch.no_grad():
            expected = torch.log_softmax(model(**tokenizer(prompt, return_tensors="pt")).logits[0, -1].float(), -1)
        torch.testing.assert_close(row, expected, atol=1e-5, rtol=0)


def test_kl_divergence_is_zero_for_equal_and_matches_the_formula():
    p = torch.log_softmax(torch.tensor([[1.0, 2.0, 3.0]]), -1)
    q = torch.log_softmax(torch.tensor([[3.0, 2.0, 1.0]]), -1)
    assert kl_divergence(p, p).item() == 0.0
    expected = sum(math.exp(a) * (a - b) for a, b in zip(p[0].tolist(), q[0].tolist()))
    assert kl_divergence(p, q).item() == pytest.approx(expected, rel=1e-6)


# ---- text metrics -----------------------------------------------------------------------------------


def test_squad_normalisation_edge_cases():
    assert normalize_answer("The  Beatles!") == "beatles"
    assert normalize_answer("an Apple, a pear.") == "apple pear"
    assert normalize_answer("Theatre") == "theatre"  # articles only as whole words
    assert normalize_answer("A.") == ""
    assert normalize_answer("U.S.A.") == "usa"
    assert exact_match("the Eiffel Tower.", ["Eiffel tower"])
    assert not exact_match("Eiffel", ["Eiffel Tower"])
    assert exact_match("Paris", ["London", "paris"])
    assert contains_answer("It is in Paris, France", ["paris"])
    assert not contains_answer("Parisian food", ["Paris"])


def test_rouge_f1_on_hand_computed_cases():
    """Values worked out by hand from Lin (2004), not read off the package the wrapper calls."""
    predictions = ["the cat sat", "John and Mary are going to the cinema tonight", "", "cats running"]
    references = ["the cat sat on the mat", "Mary and John will go to the cinema", "nothing here", "a cat runs"]
    ours = rouge_f1(predictions, references, use_stemmer=True)
    # 3 of 3 predicted unigrams match, 3 of 6 reference ones: F1 = 2·1·0.5/1.5; bigrams 2/2 and 2/5.
    assert ours[0] == pytest.approx({"rouge1": 2 / 3, "rouge2": 2 * 1 * 0.4 / 1.4, "rougeL": 2 / 3})
    # Unigrams: john, and, mary, go (going, stemmed), to, the, cinema match: P = 7/9, R = 7/8. Bigrams:
    # "go to", "to the", "the cinema" (3 of 8 predicted, 3 of 7 reference). LCS: the two orders of
    # john/and/mary share one word, then "go to the cinema": 5 -> 5/9 and 5/8.
    assert ours[1]["rouge1"] == pytest.approx(14 / 17)
    assert ours[1]["rouge2"] == pytest.approx(2 * (3 / 8) * (3 / 7) / (3 / 8 + 3 / 7))
    assert ours[1]["rougeL"] == pytest.approx(10 / 17)
    assert ours[2] == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    # The Porter stemmer makes cats/cat and running/runs the same word; without it nothing matches.
    assert ours[3]["rouge1"] == pytest.approx(2 * 1 * (2 / 3) / (1 + 2 / 3))
    assert rouge_f1(predictions[3:], references[3:], use_stemmer=False)[0]["rouge1"] == 0.0


# ---- sampling, windows, configuration -------------------------------------------------------------


def test_samples_are_distinct_seeded_and_bounded():
    pool = list(range(100))
    first = sample_examples(pool, 30, seed=0, task="nli")
    assert first == sample_examples(pool, 30, seed=0, task="nli")
    assert len(set(first)) == 30 and first == sorted(first)
    assert first != sample_examples(pool, 30, seed=1, task="nli")
    assert sample_examples(pool, 500, seed=0, task="nli") == pool


def test_sample_order_first_takes_the_data_set_in_order(tiny_gpt2):
    """Issue 17, item 12: ``sample_order: first`` takes the first ``count`` examples (the independent
    SAMSum reference's sample); a count of the data set's size is all of it (the paper's 818)."""
    pool = [SummaryExample(f"A: line {i}", f"summary {i}") for i in range(30)]
    assert sample_examples(pool, 5, seed=3, task="samsum", order="first") == pool[:5]
    assert sample_examples(pool, 5, seed=3, task="samsum") != pool[:5]
    _, tokenizer = tiny_gpt2
    first = TaskSuite.build(tokenizer, tiny_config(tasks={"samsum": 7}, sample_order="first"), {"samsum": pool})
    assert first.examples["samsum"] == pool[:7]
    assert TaskSuite.build(tokenizer, tiny_config(tasks={"samsum": 30}), {"samsum": pool}).examples["samsum"] == pool
    with pytest.raises(ValueError, match="sample_order"):
        tiny_config(sample_order="random")
    for name in ("samsum-first200.yaml", "samsum-paper.yaml"):
        config = EvalConfig.from_yaml(Path(__file__).resolve().parents[1] / "experiments/configs/eval" / name)
        assert config.sample_order == "first" and config.tasks == {"samsum": 200 if "200" in name else 818}


def test_examples_longer_than_the_context_are_replaced_by_ones_that_fit(tiny_gpt2):
    """tiny-gpt2 has 256 positions and a byte tokenizer: long premises must be passed over (they used
    to crash NLI/SST-2 scoring), the sample refilled from the rest, and a suite that fits is unchanged."""
    model, tokenizer = tiny_gpt2
    context = model.config.max_position_embeddings
    pool = [NLIExample(("long premise " * 40) if i % 2 else f"short premise {i}.", "A hypothesis.", bool(i % 3))
            for i in range(20)]
    config = tiny_config(tasks={"nli": 6})
    fitted = TaskSuite.build(tokenizer, config, {"nli": pool}, context_length=context)
    assert len(fitted.examples["nli"]) == 6
    assert all(x.premise.startswith("short") for x in fitted.examples["nli"])
    assert fitted.excluded["nli"] >= 1
    assert all(len(tokenizer(p)["input_ids"]) + 1 <= context for p in fitted.prompts["nli"])
    assert TaskSuite.build(tokenizer, config, {"nli": pool}, context_length=context).examples == fitted.examples
    # A context large enough for every prompt leaves the seeded sample exactly as before.
    unconstrained = TaskSuite.build(tokenizer, config, {"nli": pool})
    assert TaskSuite.build(tokenizer, config, {"nli": pool}, context_length=10**6).examples == unconstrained.examples
    rows = evaluate_checkpoint(model, tokenizer, None, [], tiny_config(tasks={"nli": 6}, edit_metrics=()),
                               tasks=fitted)
    assert {r.metric for r in rows if r.task == "nli"} >= {"accuracy_all", "label_ll_accuracy"}
    with pytest.raises(ValueError, match="task 'nli': none of its 10 examples fits"):
        TaskSuite.build(tokenizer, config, {"nli": [x for x in pool if x.premise.startswith("long")]},
                        context_length=context)


def test_perplexity_windows_score_each_token_once():
    tokens = list(range(1000, 1100))
    windows = perplexity_windows(tokens, window=20, stride=10, count=100, seed=0)
    scored = [t for w in windows for t in w.continuation_ids]
    assert scored == tokens[1:]  # disjoint, complete; the stream's first token has no predecessor
    assert windows[3].prompt_ids == tuple(tokens[20:30]) and windows[3].continuation_ids == tuple(tokens[30:40])
    with_bos = perplexity_windows(tokens, window=20, stride=10, count=100, seed=0, prefix=(7,))
    assert with_bos[0].prompt_ids == (7,) and with_bos[0].continuation_ids == tuple(tokens[:10])
    assert with_bos[1].prompt_ids == (7, *tokens[:10])


def test_config_from_yaml_and_errors_name_the_field(tmp_path):
    good = tmp_path / "eval.yaml"
    good.write_text("tasks: {nli: 10, wikitext: 2}\nseed: 3\nprompt_format: chat\nedit_metrics: [toolkit]\n")
    config = EvalConfig.from_yaml(good)
    assert config.tasks == {"nli": 10, "wikitext": 2} and config.seed == 3 and config.edit_metrics == ("toolkit",)
    assert config.max_new_tokens["samsum"] == 25
    bad = tmp_path / "bad.yaml"
    bad.write_text("tasks: {nli: 10, squad: 3}\n")
    with pytest.raises(ValueError, match=r"bad\.yaml.*'tasks'.*squad"):
        EvalConfig.from_yaml(bad)
    bad.write_text("prompt_formt: raw\n")
    with pytest.raises(ValueError, match=r"bad\.yaml.*prompt_formt"):
        EvalConfig.from_yaml(bad)
    assert EvalConfig(batch_size=1).digest() == EvalConfig(batch_size=16).digest()
    assert EvalConfig(seed=1).digest() != EvalConfig(seed=2).digest()


# ---- reference cache ------------------------------------------------------------------------------------


def test_reference_cache_computes_once_and_persists(tmp_path):
    calls = []

    def compute(missing):
        calls.append(list(missing))
        return [torch.tensor([float(i)]) for i in missing]

    cache = ReferenceCache(tmp_path)
    assert cache.get_or_compute("model", "ns", ["a", "b"], compute) == [torch.tensor([0.0]), torch.tensor([1.0])]
    cache.get_or_compute("model", "ns", ["b", "c"], compute)
    assert calls == [[0, 1], [1]]  # only "c" was missing the second time
    reopened = ReferenceCache(tmp_path)
    assert reopened.get_or_compute("model", "ns", ["c", "a"], compute)[1].item() == 0.0
    assert calls == [[0, 1], [1]]
    assert ReferenceCache().get_or_compute("other", "ns", ["a"], compute)
    assert len(calls) == 3  # another model key, another cache: recomputed


# ---- editing metrics ------------------------------------------------------------------------------------


def test_locality_is_exactly_one_unedited_and_drops_after_an_edit(tiny_llama):
    model, tokenizer = tiny_llama
    cache, key = ReferenceCache(), model_key(model, tokenizer)
    reference = unedited_locality_argmax(model, tokenizer, REQUESTS, cache, key, batch_size=1)
    rows = edit_metric_rows(model, tokenizer, REQUESTS, families=("toolkit",), locality_reference=reference,
                            batch_size=16)
    locality = {r.metric: r for r in rows}["locality"]
    assert locality.value == 1.0 and locality.n_examples == 2  # request 2 has no locality prompt
    with applied(model, rank_one_log(model, scale=30.0)):
        edited = edit_metric_rows(model, tokenizer, REQUESTS, families=("toolkit",), locality_reference=reference)
    assert {r.metric: r.value for r in edited}["locality"] < 1.0


def test_evaluate_checkpoint_scores_the_edit_and_leaves_the_model_bit_identical(tiny_llama):
    model, tokenizer = tiny_llama
    log = rank_one_log(model, scale=3.0)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    config = tiny_config(pca_examples=4, pca_folds=2, pca_task="sst2")
    suite = TaskSuite.build(tokenizer, config, TASK_EXAMPLES, wikitext=WIKITEXT,
                            pca_examples=TASK_EXAMPLES["sst2"] + TASK_EXAMPLES["sst2"])
    rows = evaluate_checkpoint(model, tokenizer, log, REQUESTS, config, tasks=suite)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), f"{name} changed"
    tasks = {r.task for r in rows}
    assert {"edit/toolkit", "edit/counterfact", "edit/generative", "nli", "sst2", "nq", "samsum", "mmlu",
            "wikitext", "drift", "deviation/pca"} <= tasks
    values = {(r.task, r.metric): r.value for r in rows}
    assert values[("drift", "kl_mean")] > 0  # the edit changed the next-token distributions
    module = arch_spec(model).mlp_out_name(1)
    weight = before[f"{module}.weight"]
    update = log[0].layers[0].dense()
    assert values[(f"deviation/{module}", "update_frobenius_relative")] == pytest.approx(
        (update.norm() / weight.norm()).item(), rel=1e-5)
    assert values[(f"deviation/{module}", "l1_relative_change")] == pytest.approx(
        ((weight + update).abs().sum() / weight.abs().sum() - 1).item(), rel=1e-4)
    # The general-task rows are the edited model's (computed here independently), not the reference's.
    with applied(model, log):
        direct = {(r.task, r.metric): r.value for r in general_task_rows(model, tokenizer, suite, config)}
    assert values[("wikitext", "perplexity")] == pytest.approx(direct[("wikitext", "perplexity")], rel=1e-6)


GENERATION_PROMPTS = ["Hi", "The capital of France is", "x y", "Danielle Darrieux speaks the language of",
                      "A much longer prompt about the history of the Roman empire and of its fall, which", "Apple"]


def greedy_without_padding(model, tokenizer, prompt: str, max_new_tokens: int) -> list[int]:
    """Greedy decoding by hand: one unpadded sequence, a full forward pass per token, no cache."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    out: list[int] = []
    for _ in range(max_new_tokens):
        with torch.no_grad():
            token = model(input_ids=ids).logits[0, -1].argmax().item()
        out.append(token)
        if token == tokenizer.eos_token_id:
            break
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return out


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_batched_generation_gives_the_token_ids_of_one_prompt_at_a_time(fixture, request):
    """Left padding, the attention mask and the position ids must leave every row's tokens as they are
    alone. Checked to fail on these models with an all-ones attention mask (padding attended) and with
    right padding, and on GPT-2 (absolute positions) with position ids counted from the padding; on
    LLaMA such a uniform offset cancels in the rotary attention and changes nothing."""
    model, tokenizer = request.getfixturevalue(fixture)
    batched = greedy_token_ids(model, tokenizer, GENERATION_PROMPTS, max_new_tokens=8,
                               batch_size=len(GENERATION_PROMPTS))
    single = [greedy_token_ids(model, tokenizer, [p], max_new_tokens=8, batch_size=1)[0] for p in GENERATION_PROMPTS]
    assert batched == single
    assert single == [greedy_without_padding(model, tokenizer, p, 8) for p in GENERATION_PROMPTS]
    assert len({tuple(ids) for ids in batched}) > 1  # the prompts lead to different tokens


def test_begins_with_needs_a_word_boundary():
    assert begins_with(" Paris is lovely", "Paris") and begins_with("Paris.", "Paris") and begins_with("Paris", "Paris")
    assert not begins_with(" Parisian food", "Paris")
    assert not begins_with("Englishman", "English") and begins_with("English-speaking", "English")
    assert begins_with(" 3.5 m", "3.5") and not begins_with("35", "3")
    assert begins_with("U.S.A", "U.S.")  # a target ending in punctuation ends a word by itself


def test_evaluate_checkpoint_restores_weights_when_evaluation_fails(tiny_gpt2):
    model, tokenizer = tiny_gpt2
    fingerprint = weights_fingerprint(model)
    broken = [EditRequest(9, "x is", "x", "y", None, (), ("z is",), ())]  # locality answers missing
    with pytest.raises(ValueError, match="request 9.*locality_answers"):
        evaluate_checkpoint(model, tokenizer, rank_one_log(model), broken, tiny_config(tasks={}),
                            tasks=TaskSuite.build(tokenizer, tiny_config(tasks={}), {}))
    assert weights_fingerprint(model) == fingerprint


def test_retention_formula_chance_levels_and_dropped_metrics():
    unedited = [MetricRow("nq", "exact_match", 0.4, 10), MetricRow("wikitext", "perplexity", 10.0, 5),
                MetricRow("nli", "label_ll_accuracy", 0.7, 10), MetricRow("sst2", "label_ll_accuracy", 0.5, 10),
                MetricRow("mmlu", "accuracy_letter", 0.45, 10), MetricRow("samsum", "rouge1", 0.0, 10),
                MetricRow("nli", "valid_rate", 0.8, 10)]
    edited = [MetricRow("nq", "exact_match", 0.1, 10), MetricRow("wikitext", "perplexity", 40.0, 5),
              MetricRow("nli", "label_ll_accuracy", 0.6, 10), MetricRow("sst2", "label_ll_accuracy", 0.55, 10),
              MetricRow("mmlu", "accuracy_letter", 0.25, 10), MetricRow("samsum", "rouge1", 0.1, 10),
              MetricRow("nli", "valid_rate", 0.4, 10), MetricRow("edit/toolkit", "reliability", 1.0, 3)]
    rows = {(r.task, r.metric): r.value for r in retention_rows(edited, unedited)}
    assert rows[("nq", "retention/exact_match")] == pytest.approx(0.25)  # edited / unedited, not the inverse
    assert rows[("wikitext", "retention/perplexity")] == pytest.approx(0.25)  # 4x the perplexity
    assert rows[("nli", "retention/label_ll_accuracy")] == pytest.approx(0.5)  # (0.6 - 0.5) / (0.7 - 0.5)
    assert rows[("mmlu", "retention/accuracy_letter")] == pytest.approx(0.0)  # back at chance (0.25)
    assert rows[("nli", "retention/valid_rate")] == pytest.approx(0.5)  # no chance level: a plain ratio
    # Unedited at chance (SST-2) or at 0 (ROUGE): no retention, listed with its margin.
    assert ("sst2", "retention/label_ll_accuracy") not in rows and ("samsum", "retention/rouge1") not in rows
    assert rows[("sst2", "retention_dropped/label_ll_accuracy")] == 0.0
    assert rows[("samsum", "retention_dropped/rouge1")] == 0.0
    assert not any(task.startswith("edit/") for task, _ in rows)


def test_perplexity_retention_is_unedited_over_edited_perplexity(tiny_gpt2):
    model, tokenizer = tiny_gpt2
    config = tiny_config(tasks={"wikitext": 3}, edit_metrics=(), drift_examples=0)
    suite = TaskSuite.build(tokenizer, config, {}, wikitext=WIKITEXT)
    log = rank_one_log(model, scale=30.0)
    base, _ = perplexity(model, tokenizer, suite.perplexity_windows)
    with applied(model, log):
        edited, _ = perplexity(model, tokenizer, suite.perplexity_windows)
    assert abs(edited / base - 1) > 0.01  # the edit moves perplexity, so the inverse ratio would differ
    rows = {(r.task, r.metric): r.value for r in evaluate_checkpoint(model, tokenizer, log, [], config, tasks=suite)}
    assert rows[("wikitext", "perplexity")] == pytest.approx(edited, rel=1e-6)
    assert rows[("wikitext", "retention/perplexity")] == pytest.approx(base / edited, rel=1e-6)


def test_reference_predictions_of_another_code_version_are_not_reused(tiny_gpt2, tmp_path):
    """Issue 17, item 10: a task score cached by other evaluation code (here planted under the version
    "old") must not become the baseline of the current code's retention."""
    model, tokenizer = tiny_gpt2
    config = tiny_config(tasks={"wikitext": 3}, edit_metrics=(), drift_examples=0)
    suite = TaskSuite.build(tokenizer, config, {}, wikitext=WIKITEXT)
    key = model_key(model, tokenizer)
    stale = ReferenceCache(tmp_path, code_version="old")
    stale.store(key, "task_rows", {suite_digest(suite, config): [["wikitext", "perplexity", 1.0, 3]]})

    def perplexity_of(reference):
        rows = evaluate_checkpoint(model, tokenizer, None, [], config, tasks=suite, reference=reference, base_key=key)
        return {(r.task, r.metric): r.value for r in rows}[("wikitext", "perplexity")]

    assert perplexity_of(ReferenceCache(tmp_path, code_version="old")) == 1.0  # the planted value is read back
    current = ReferenceCache(tmp_path)
    assert current.code_version == evaluation_code_version() != "old"
    assert perplexity_of(current) == pytest.approx(perplexity(model, tokenizer, suite.perplexity_windows)[0])


def test_evaluation_code_version_covers_the_evaluation_sources(tmp_path):
    files = module_sources(EVALUATION_CODE)
    names = {(f.parent.name, f.name) for f in files}
    assert {("evaluation", "text_metrics.py"), ("evaluation", "tasks.py"), ("evaluation", "scoring.py"),
            ("workers", "generation.py"), ("workers", "data.py"), ("workers", "batching.py")} <= names
    package = Path(evaluate_checkpoint.__code__.co_filename).parent  # workers/evaluation/
    assert {p.name for p in package.glob("*.py")} <= {f.name for f in files if f.parent == package}
    # A one-character change in any of them (a copy here) changes the version.
    copies = []
    for f in files:
        copy = tmp_path / f.parent.name / f.name
        copy.parent.mkdir(exist_ok=True)
        copy.write_bytes(f.read_bytes())
        copies.append(copy)
    assert source_digest(copies) == evaluation_code_version()
    copies[0].write_bytes(copies[0].read_bytes() + b"#")
    assert source_digest(copies) != evaluation_code_version()


# ---- perplexity --------------------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama"])
def test_perplexity_is_exp_of_mean_token_nll(fixture, request):
    model, tokenizer = request.getfixturevalue(fixture)
    ids = tokenizer(WIKITEXT, add_special_tokens=False)["input_ids"]
    windows = perplexity_windows(ids, window=64, stride=32, count=50, seed=0, prefix=special_prefix(tokenizer))
    value, n_tokens = perplexity(model, tokenizer, windows, batch_size=4)
    total, count = 0.0, 0
    for window in windows:  # independently: the model's own loss with the context masked out
        input_ids = torch.tensor([window.ids])
        labels = input_ids.clone()
        labels[0, :len(window.prompt_ids)] = -100
        with torch.no_grad():
            loss = model(input_ids=input_ids, labels=labels).loss.item()
        total += loss * len(window.continuation_ids)
        count += len(window.continuation_ids)
    assert n_tokens == count
    assert value == pytest.approx(math.exp(total / count), rel=1e-5)


# ---- deviation ------------------------------------------------------------------------------------------


def test_matrix_deviation_on_known_matrices():
    original = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    edited = torch.diag(torch.tensor([0.5, 2.0, 3.0, 6.0]))
    d = matrix_deviation("m", original, edited)
    assert (d.l1_original, d.l1_edited) == (10.0, 11.5)
    assert d.frobenius_original == pytest.approx(math.sqrt(30))
    assert (d.spectral_original, d.spectral_edited) == (4.0, 6.0)
    assert (d.condition_original, d.condition_edited) == (4.0, 12.0)
    assert (d.update_l1, d.update_spectral) == (2.5, 2.0)
    rows = {r.metric: r.value for r in d.rows()}
    assert rows["condition_number_ratio"] == 3.0 and rows["l1_relative_change"] == pytest.approx(0.15)


def test_pca_separability_tells_moved_states_from_unmoved():
    generator = torch.Generator().manual_seed(0)
    states = torch.randn(40, 16, generator=generator)
    same = pca_view(states, states.clone())
    assert same.separability <= 0.6
    assert same.original_points.shape == (40, 2) and np.allclose(same.original_points, same.edited_points)
    moved = pca_view(states, states + 3.0)
    assert moved.separability >= 0.95
    assert sum(moved.explained_variance_ratio) <= 1.0


def test_length_batches_cap_the_padding_of_long_unequal_rows_and_keep_short_ones_together():
    from workers.batching import BUCKET_MIN_POSITIONS, length_batches, right_padded_batches

    dialogues = [150, 500, 100, 300, 200]  # a sample of long texts of unequal length, fewer than a batch
    batches = length_batches(dialogues, 16, 0.2)
    assert sorted(i for batch in batches for i in batch) == list(range(len(dialogues)))
    assert [i for batch in batches for i in batch] == [1, 3, 4, 0, 2]  # longest first, order kept
    for batch in batches:
        lengths = [dialogues[i] for i in batch]
        assert 1 - sum(lengths) / (len(lengths) * max(lengths)) <= 0.2
    assert length_batches(dialogues, 16) == [[1, 3, 4, 0, 2]]  # without the cap: one batch, 37% padding
    prompts = [15, 9, 12, 7, 20, 11]  # short rows: below BUCKET_MIN_POSITIONS, never split for padding
    assert sum(prompts) < BUCKET_MIN_POSITIONS
    assert length_batches(prompts, 16, 0.2) == [[4, 0, 2, 5, 1, 3]]
    assert length_batches(prompts, 4, 0.2) == [[4, 0, 2, 5], [1, 3]]  # batch_size still bounds a batch
    sequences = [[1] * n for n in dialogues]
    widths = [ids.shape[1] for _, ids, _ in right_padded_batches(sequences, 16, 0, max_padding=0.2)]
    assert widths == [500, 200, 100]


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama"])
def test_scores_of_long_unequal_texts_are_the_same_bucketed_or_not(fixture, request, monkeypatch):
    """Bucketing by length changes which rows share a batch, never a row's scores."""
    from workers.batching import length_batches
    from workers.evaluation import scoring

    model, tokenizer = request.getfixturevalue(fixture)
    pairs = [("word " * n, " end") for n in (40, 5, 25, 15, 2)]
    lengths = [len(encode_pair(tokenizer, *pair).ids) - 1 for pair in pairs]
    assert len(length_batches(lengths, 16, scoring.SCORING_MAX_PADDING)) > 1  # the cap splits them
    bucketed = score_continuations(model, tokenizer, pairs, batch_size=16)
    monkeypatch.setattr(scoring, "SCORING_MAX_PADDING", None)
    plain = score_continuations(model, tokenizer, pairs, batch_size=16)
    for a, b in zip(bucketed, plain):
        torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=0)
        assert torch.equal(a.argmax_ids, b.argmax_ids)


def test_checkpoint_scoring_products_follow_the_compute_setting(tiny_llama):
    """Packed float32 layers score as PyTorch's own within round-off; compute_dtype bfloat16 reaches them."""
    from workers.packed_linear import LinearCompute

    model, tokenizer = tiny_llama
    log = rank_one_log(model)
    config = tiny_config(tasks={"wikitext": 3}, edit_metrics=("toolkit",), drift_examples=0, deviation_norms=False)
    suite = TaskSuite.build(tokenizer, config, TASK_EXAMPLES, wikitext=WIKITEXT)

    def perplexity(cfg, compute=None):
        rows = evaluate_checkpoint(model, tokenizer, log, REQUESTS, cfg, tasks=suite, compute=compute)
        return {(r.task, r.metric): r.value for r in rows}[("wikitext", "perplexity")]

    plain = perplexity(config, LinearCompute(packed=False))
    assert perplexity(config) == pytest.approx(plain, rel=1e-5)
    bf16 = perplexity(dataclasses.replace(config, compute_dtype="bfloat16"))
    assert bf16 != pytest.approx(plain, rel=1e-5) and bf16 == pytest.approx(plain, rel=0.05)
