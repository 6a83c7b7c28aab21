"""Second-moment statistics: exact against an independent computation, one pass for many layers,
early stop, and a cache that follows the weights that matter, the text, the tokenizer and the budget."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from workers import stats
from workers.models import arch_spec, load_model, mlp_out_weight
from workers.stats import SecondMomentCache, StatsConfig, second_moments

# Byte-level tiny tokenizers: one token per byte. The first paragraph is longer than MAX_LENGTH, so
# it is split; headings are skipped; paragraph lengths differ, so batches are padded.
PARAGRAPHS = [
    "The quick brown fox jumps over the lazy dog, and then it runs far away into the forest.",
    "Short one.",
    "A paragraph of middling length, here.",
    "Tiny",
    "Another sentence that is a little longer than the others.",
]
CORPUS_TEXT = "\n = A heading = \n\n" + "\n\n".join(PARAGRAPHS) + "\n"
MAX_LENGTH = 24


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(CORPUS_TEXT, encoding="utf-8")
    return str(path)


def direct_second_moments(model, tokenizer, layers, budget: int, *, adds_bos: bool) -> dict[int, torch.Tensor]:
    """Independent reference: each sequence alone (no padding, no early stop), keys from plain
    forward hooks on the projections, the first ``budget`` keys in corpus order, float64."""
    prefix = [tokenizer.bos_token_id] if adds_bos else []
    piece = MAX_LENGTH - len(prefix)
    sequences = []
    for paragraph in PARAGRAPHS:
        content = tokenizer(paragraph, add_special_tokens=False)["input_ids"]
        sequences += [prefix + content[i:i + piece] for i in range(0, len(content), piece)]
    collected = {layer: [] for layer in layers}
    handles = []
    for layer in layers:
        module = model.get_submodule(arch_spec(model).mlp_out_name(layer))
        handles.append(module.register_forward_hook(
            lambda mod, args, out, layer=layer: collected[layer].append(args[0][0].double())))
    try:
        with torch.no_grad():
            for ids in sequences:
                model(input_ids=torch.tensor([ids]))
    finally:
        for handle in handles:
            handle.remove()
    references = {}
    for layer in layers:
        keys = torch.cat(collected[layer])[:budget]
        assert len(keys) == budget
        references[layer] = keys.T @ keys / budget
    return references


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("name, adds_bos", [("tiny-gpt2", False), ("tiny-llama", True)])
def test_equals_direct_computation_with_padding_bos_and_split_paragraphs(name, adds_bos, corpus):
    model, tokenizer = load_model(name)
    budget = 150  # cuts into the last paragraph: checks the budget is met exactly
    config = StatsConfig(corpus=corpus, token_budget=budget, max_length=MAX_LENGTH, batch_size=3)
    result = second_moments(model, tokenizer, [1, 3], config=config, progress=False)
    references = direct_second_moments(model, tokenizer, [1, 3], budget, adds_bos=adds_bos)
    for layer in (1, 3):
        width = mlp_out_weight(model, layer).shape[1]
        assert result[layer].shape == (width, width) and result[layer].dtype == torch.float32
        assert relative_error(result[layer], references[layer]) < 1e-6


def test_bf16_model_gives_float32_statistics_of_its_own_keys(corpus):
    model, tokenizer = load_model("tiny-llama", dtype=torch.bfloat16)
    config = StatsConfig(corpus=corpus, token_budget=100, max_length=MAX_LENGTH, batch_size=2)
    result = second_moments(model, tokenizer, [2], config=config, progress=False)[2]
    assert result.dtype == torch.float32
    reference = direct_second_moments(model, tokenizer, [2], 100, adds_bos=True)[2]
    assert relative_error(result, reference) < 1e-2  # bf16 forward: batched vs single rounding


def test_one_pass_for_several_layers_equals_separate_passes(tiny_llama, corpus):
    model, tokenizer = tiny_llama
    config = StatsConfig(corpus=corpus, token_budget=120, max_length=MAX_LENGTH, batch_size=4)
    together = second_moments(model, tokenizer, [3, 0, 2], config=config, progress=False)
    assert sorted(together) == [0, 2, 3]
    for layer in (0, 2, 3):
        alone = second_moments(model, tokenizer, [layer], config=config, progress=False)[layer]
        assert torch.equal(together[layer], alone)
    assert not torch.allclose(together[0], together[2])


def test_forward_pass_stops_after_the_last_requested_layer(tiny_gpt2, corpus):
    model, tokenizer = tiny_gpt2
    spec = arch_spec(model)
    final_norm = "transformer.ln_f"  # GPT-2's final layer norm, after every decoder layer
    fired = {name: 0 for name in (spec.mlp_out_name(1), spec.layer_name(2), spec.layer_name(3), final_norm)}

    def counter(name):
        def hook(module, args, output):
            fired[name] += 1
        return hook

    handles = [model.get_submodule(name).register_forward_hook(counter(name)) for name in fired]
    try:
        config = StatsConfig(corpus=corpus, token_budget=100, max_length=MAX_LENGTH, batch_size=2)
        second_moments(model, tokenizer, [0, 1], config=config, progress=False)
    finally:
        for handle in handles:
            handle.remove()
    assert fired[spec.mlp_out_name(1)] > 0
    assert fired[spec.layer_name(2)] == fired[spec.layer_name(3)] == fired[final_norm] == 0


def _forbid_recomputation(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("recomputed although the cache holds a valid entry")
    monkeypatch.setattr(stats, "accumulate_second_moments", refuse)


def test_cache_hit_returns_identical_tensors_without_recomputing(tiny_llama, corpus, tmp_path, monkeypatch):
    model, tokenizer = tiny_llama
    cache = SecondMomentCache(tmp_path / "stats")
    config = StatsConfig(corpus=corpus, token_budget=120, max_length=MAX_LENGTH, batch_size=4)
    first = second_moments(model, tokenizer, [1, 2], config=config, cache=cache, progress=False)
    files = sorted(p.name for p in (tmp_path / "stats").iterdir())
    assert len(files) == 2 and all(f.endswith(".safetensors") for f in files)  # no temporary leftovers
    _forbid_recomputation(monkeypatch)
    second = second_moments(model, tokenizer, [2, 1], config=config, cache=cache, progress=False)
    for layer in (1, 2):
        assert torch.equal(first[layer], second[layer])


def test_cache_follows_the_weights_that_feed_the_keys(tiny_llama, corpus, tmp_path, monkeypatch):
    model, tokenizer = tiny_llama
    spec = arch_spec(model)
    cache = SecondMomentCache(tmp_path / "stats")
    config = StatsConfig(corpus=corpus, token_budget=120, max_length=MAX_LENGTH, batch_size=4)
    before = second_moments(model, tokenizer, [2], config=config, cache=cache, progress=False)[2]
    with torch.no_grad():
        # The layer's own projection and later layers cannot change its keys: still a cache hit.
        mlp_out_weight(model, 2).mul_(3.0)
        model.get_submodule(spec.layer_name(3)).mlp.up_proj.weight.add_(0.5)
    with monkeypatch.context() as patched:
        _forbid_recomputation(patched)
        hit = second_moments(model, tokenizer, [2], config=config, cache=cache, progress=False)[2]
    assert torch.equal(hit, before)
    assert torch.equal(second_moments(model, tokenizer, [2], config=config, progress=False)[2], before)
    # A weight below the layer changes the keys: the entry must not be used.
    with torch.no_grad():
        model.get_submodule(spec.layer_name(0)).mlp.up_proj.weight.mul_(1.5)
    changed = second_moments(model, tokenizer, [2], config=config, cache=cache, progress=False)[2]
    assert relative_error(changed, before) > 1e-3
    assert torch.equal(changed, second_moments(model, tokenizer, [2], config=config, progress=False)[2])
    assert len(list(cache.directory.glob("*.safetensors"))) == 2


def test_cache_entry_for_another_budget_is_not_reused(tiny_gpt2, corpus, tmp_path):
    model, tokenizer = tiny_gpt2
    cache = SecondMomentCache(tmp_path / "stats")
    large = StatsConfig(corpus=corpus, token_budget=150, max_length=MAX_LENGTH)
    small = StatsConfig(corpus=corpus, token_budget=80, max_length=MAX_LENGTH)
    second_moments(model, tokenizer, [1], config=large, cache=cache, progress=False)
    from_cache = second_moments(model, tokenizer, [1], config=small, cache=cache, progress=False)[1]
    uncached = second_moments(model, tokenizer, [1], config=small, progress=False)[1]
    assert torch.equal(from_cache, uncached)
    assert len(list(cache.directory.glob("*.safetensors"))) == 2


def test_cache_follows_the_corpus_text_and_the_tokenizer(tiny_llama, corpus, tmp_path):
    from workers.models import byte_tokenizer

    model, tokenizer = tiny_llama
    cache = SecondMomentCache(tmp_path / "stats")
    config = StatsConfig(corpus=corpus, token_budget=80, max_length=MAX_LENGTH)
    first = second_moments(model, tokenizer, [1], config=config, cache=cache, progress=False)[1]
    # The same tokens without BOS: another tokenizer, so another entry.
    without_bos = byte_tokenizer(add_bos=False)
    other_tokenizer = second_moments(model, without_bos, [1], config=config, cache=cache, progress=False)[1]
    assert torch.equal(other_tokenizer, second_moments(model, without_bos, [1], config=config, progress=False)[1])
    assert relative_error(other_tokenizer, first) > 1e-3
    # The same file name with other text: another entry.
    Path(corpus).write_text(CORPUS_TEXT.replace("quick brown fox", "slow grey wolf"), encoding="utf-8")
    edited = second_moments(model, tokenizer, [1], config=config, cache=cache, progress=False)[1]
    assert torch.equal(edited, second_moments(model, tokenizer, [1], config=config, progress=False)[1])
    assert relative_error(edited, first) > 1e-3
    assert len(list(cache.directory.glob("*.safetensors"))) == 3


def test_only_missing_layers_are_computed(tiny_llama, corpus, tmp_path, monkeypatch):
    model, tokenizer = tiny_llama
    cache = SecondMomentCache(tmp_path / "stats")
    config = StatsConfig(corpus=corpus, token_budget=100, max_length=MAX_LENGTH)
    second_moments(model, tokenizer, [1], config=config, cache=cache, progress=False)
    computed_layers = []
    real = stats.accumulate_second_moments

    def recording(model, sequences, layers, **kwargs):
        computed_layers.append(list(layers))
        return real(model, sequences, layers, **kwargs)

    monkeypatch.setattr(stats, "accumulate_second_moments", recording)
    second_moments(model, tokenizer, [1, 3], config=config, cache=cache, progress=False)
    assert computed_layers == [[3]]


def test_interrupted_write_leaves_no_entry(tiny_gpt2, corpus, tmp_path, monkeypatch):
    import safetensors.torch

    model, tokenizer = tiny_gpt2
    cache = SecondMomentCache(tmp_path / "stats")
    config = StatsConfig(corpus=corpus, token_budget=60, max_length=MAX_LENGTH)

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        second_moments(model, tokenizer, [0], config=config, cache=cache, progress=False)
    assert list(cache.directory.iterdir()) == []


def test_file_holding_another_key_is_not_trusted(tiny_gpt2, corpus, tmp_path):
    model, tokenizer = tiny_gpt2
    cache = SecondMomentCache(tmp_path / "stats")
    config = StatsConfig(corpus=corpus, token_budget=60, max_length=MAX_LENGTH)
    right = second_moments(model, tokenizer, [0], config=config, cache=cache, progress=False)[0]
    (path,) = cache.directory.glob("*.safetensors")
    other = stats.StatsKey(1, "elsewhere", "0" * 64, "other", "0" * 64, "0" * 64, 60, MAX_LENGTH)
    cache.save(other, torch.zeros_like(right)).replace(path)
    with pytest.warns(UserWarning, match="differs"):
        again = second_moments(model, tokenizer, [0], config=config, cache=cache, progress=False)[0]
    assert torch.equal(again, right)


def test_bad_requests_fail_with_clear_errors(tiny_gpt2, corpus, tmp_path):
    model, tokenizer = tiny_gpt2
    with pytest.raises(ValueError, match=r"holds only \d+ tokens"):
        second_moments(model, tokenizer, [0], config=StatsConfig(corpus=corpus, token_budget=10_000,
                                                                 max_length=MAX_LENGTH), progress=False)
    with pytest.raises(ValueError, match="layers 0..3"):
        second_moments(model, tokenizer, [4], config=StatsConfig(corpus=corpus, token_budget=10), progress=False)
    with pytest.raises(FileNotFoundError, match="no-such-corpus"):
        second_moments(model, tokenizer, [0], config=StatsConfig(corpus=str(tmp_path / "no-such-corpus")),
                       progress=False)
    with pytest.raises(ValueError, match="token_budget"):
        StatsConfig(token_budget=0)


def test_default_budget_fits_the_default_corpus(default_model, data_root):
    _, tokenizer = default_model
    config = StatsConfig()
    text = stats.load_corpus(config.corpus, data_root)
    sequences = stats.sample_sequences(tokenizer, text, token_budget=config.token_budget, max_length=config.max_length)
    assert sum(len(s) for s in sequences) == config.token_budget
    assert max(len(s) for s in sequences) <= config.max_length


def test_cli_precomputes_into_the_cache(data_root, tmp_path, capsys, monkeypatch):
    from orchestrator import cli

    monkeypatch.setenv("EAC_CACHE_DIR", str(tmp_path))  # the CLI sets it; restored after the test
    assert cli.main(["stats", "--model", "tiny-llama", "--layers", "1-2", "--token-budget", "300",
                     "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "layer 1" in out and "layer 2" in out
    assert len(list((tmp_path / "stats").glob("layer*-300tok-*.safetensors"))) == 2


def test_no_progress_bar_where_stderr_is_not_a_terminal(tiny_gpt2, corpus, capsys):
    """An actor's output goes to a log file (and to `ray job logs`): a bar there is one line per redraw."""
    model, tokenizer = tiny_gpt2
    config = StatsConfig(corpus=corpus, token_budget=120, max_length=MAX_LENGTH, batch_size=4)
    second_moments(model, tokenizer, [0], config=config)  # progress asked for, as the editor does
    captured = capsys.readouterr()
    assert "second moments" not in captured.err + captured.out
