"""Evaluation on tiny models and hand-built cases: scoring under padding, metrics with known answers,
caches, configuration, deviation analysis, and evaluate_checkpoint leaving the model untouched."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from workers.data import EditRequest, MultipleChoiceExample, NLIExample, QAExample, SentimentExample, SummaryExample
from workers.editing.delta import EditLog, LayerDelta, WeightDelta, applied
from workers.evaluation import EvalConfig, MetricRow, ReferenceCache, TaskSuite, evaluate_checkpoint, model_key
from workers.evaluation.deviation import matrix_deviation, pca_view
from workers.evaluation.edit_metrics import edit_metric_rows, unedited_locality_argmax
from workers.evaluation.prompts import perplexity_windows, sample_examples, special_prefix
from workers.evaluation.scoring import encode_pair, next_token_logprobs, score_continuations
from workers.evaluation.tasks import kl_divergence, perplexity
from workers.evaluation.text_metrics import contains_answer, exact_match, normalize_answer, rouge_f1
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


def test_rouge_equals_rouge_score_package():
    from rouge_score import rouge_scorer

    predictions = ["the cat sat", "John and Mary are going to the cinema tonight", ""]
    references = ["the cat sat on the mat", "Mary and John will go to the cinema", "nothing here"]
    ours = rouge_f1(predictions, references, use_stemmer=True)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    for mine, prediction, reference in zip(ours, predictions, references):
        theirs = scorer.score(reference, prediction)
        assert mine == {name: theirs[name].fmeasure for name in ("rouge1", "rouge2", "rougeL")}
    # Hand-computed: 3 of 3 predicted unigrams match, 3 of 6 reference ones: F1 = 2·1·0.5/1.5.
    assert ours[0]["rouge1"] == pytest.approx(2 / 3)
    assert ours[0]["rouge2"] == pytest.approx(2 * 1 * 0.4 / 1.4)
    assert ours[2] == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}


# ---- sampling, windows, configuration -------------------------------------------------------------


def test_samples_are_distinct_seeded_and_bounded():
    pool = list(range(100))
    first = sample_examples(pool, 30, seed=0, task="nli")
    assert first == sample_examples(pool, 30, seed=0, task="nli")
    assert len(set(first)) == 30 and first == sorted(first)
    assert first != sample_examples(pool, 30, seed=1, task="nli")
    assert sample_examples(pool, 500, seed=0, task="nli") == pool


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


def test_evaluate_checkpoint_is_batch_size_invariant_and_leaves_the_model_bit_identical(tiny_llama):
    model, tokenizer = tiny_llama
    log = rank_one_log(model, scale=3.0)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    results = {}
    for batch_size in (1, 16):
        config = tiny_config(batch_size=batch_size, pca_examples=4, pca_folds=2, pca_task="sst2")
        suite = TaskSuite.build(tokenizer, config, TASK_EXAMPLES, wikitext=WIKITEXT,
                                pca_examples=TASK_EXAMPLES["sst2"] + TASK_EXAMPLES["sst2"])
        results[batch_size] = evaluate_checkpoint(model, tokenizer, log, REQUESTS, config, tasks=suite)
        for name, p in model.named_parameters():
            assert torch.equal(p, before[name]), f"{name} changed"
    single, batched = results[1], results[16]
    assert [(r.task, r.metric, r.n_examples) for r in single] == [(r.task, r.metric, r.n_examples) for r in batched]
    for a, b in zip(single, batched):
        assert a.value == pytest.approx(b.value, rel=1e-4, abs=1e-6, nan_ok=True), (a, b)
    tasks = {r.task for r in batched}
    assert {"edit/toolkit", "edit/counterfact", "edit/generative", "nli", "sst2", "nq", "samsum", "mmlu",
            "wikitext", "drift", "deviation/pca"} <= tasks
    values = {(r.task, r.metric): r.value for r in batched}
    assert values[("drift", "kl_mean")] > 0  # the edit changed the next-token distributions
    module = arch_spec(model).mlp_out_name(1)
    weight = before[f"{module}.weight"]
    update = log[0].layers[0].dense()
    assert values[(f"deviation/{module}", "update_frobenius_relative")] == pytest.approx(
        (update.norm() / weight.norm()).item(), rel=1e-5)
    assert values[(f"deviation/{module}", "l1_relative_change")] == pytest.approx(
        ((weight + update).abs().sum() / weight.abs().sum() - 1).item(), rel=1e-4)


def test_evaluate_checkpoint_restores_weights_when_evaluation_fails(tiny_gpt2):
    model, tokenizer = tiny_gpt2
    fingerprint = weights_fingerprint(model)
    broken = [EditRequest(9, "x is", "x", "y", None, (), ("z is",), ())]  # locality answers missing
    with pytest.raises(ValueError, match="request 9.*locality_answers"):
        evaluate_checkpoint(model, tokenizer, rank_one_log(model), broken, tiny_config(tasks={}),
                            tasks=TaskSuite.build(tokenizer, tiny_config(tasks={}), {}))
    assert weights_fingerprint(model) == fingerprint


def test_empty_log_gives_reference_scores_and_full_retention(tiny_gpt2, tmp_path):
    model, tokenizer = tiny_gpt2
    config = tiny_config(edit_metrics=("toolkit", "counterfact"))
    suite = TaskSuite.build(tokenizer, config, TASK_EXAMPLES, wikitext=WIKITEXT)
    rows = evaluate_checkpoint(model, tokenizer, EditLog(), REQUESTS, config, tasks=suite,
                               reference=ReferenceCache(tmp_path))
    values = {(r.task, r.metric): r.value for r in rows}
    assert values[("edit/toolkit", "locality")] == 1.0
    assert values[("drift", "kl_mean")] == pytest.approx(0.0, abs=1e-6)
    assert all(r.value == pytest.approx(1.0) for r in rows if r.metric.startswith("retention/"))
    assert any(r.metric == "retention/perplexity" for r in rows)
    assert not any(r.task.startswith("deviation/") for r in rows)  # nothing edited
    # The reference was written to the directory: a fresh cache reuses it.
    assert list(tmp_path.glob("*/task_rows.pt")) and list(tmp_path.glob("*/locality_argmax.pt"))


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
