import subprocess
import time

import pytest
import torch

from workers import models


def test_arch_specs_for_both_layouts(tiny_gpt2, tiny_llama):
    gpt2, _ = tiny_gpt2
    llama, _ = tiny_llama
    assert models.arch_spec(gpt2).mlp_out_name(2) == "transformer.h.2.mlp.c_proj"
    assert models.arch_spec(llama).mlp_out_name(2) == "model.layers.2.mlp.down_proj"
    # (out, in) views: GPT-2's Conv1D weight is stored (in, out) and must be transposed.
    assert models.mlp_out_weight(gpt2, 1).shape == (64, 256)
    assert models.mlp_out_weight(llama, 1).shape == (64, 160)


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama"])
def test_mlp_out_weight_is_a_view_of_the_parameter(fixture, request):
    model, _ = request.getfixturevalue(fixture)
    spec = models.arch_spec(model)
    view = models.mlp_out_weight(model, 0)
    with torch.no_grad():
        view[3, 5] = 123.0
    stored = models.get_module(model, spec.mlp_out_name(0)).weight
    assert (stored[5, 3] if spec.weight_transposed else stored[3, 5]).item() == 123.0


def test_one_context_length_one_device_one_weight_view_for_every_caller(tiny_gpt2):
    """The editor's prompt check and the evaluation's sequence check read one context length: a
    config that says ``n_positions`` only (GPT-2's own name) limits both. The edited weight by module
    name is the view ``mlp_out_weight`` gives by layer."""
    from types import SimpleNamespace

    from workers.editing.errors import EditFailure
    from workers.editing.tokens import check_length
    from workers.evaluation.scoring import check_fits

    model = torch.nn.Linear(2, 2, device="meta")
    model.config = SimpleNamespace(n_positions=8)
    assert models.context_length(model) == 8 and models.model_device(model) == torch.device("meta")
    with pytest.raises(EditFailure, match=r"context \(8\)"):
        check_length(model, 9, "a prompt")
    with pytest.raises(ValueError, match="context is 8"):
        check_fits(model, [8, 9])
    model.config = SimpleNamespace()
    assert models.context_length(model) is None
    check_fits(model, [10**6])

    gpt2, _ = tiny_gpt2
    name = models.arch_spec(gpt2).mlp_out_name(1)
    view = models.edited_weight(gpt2, name)
    assert view.data_ptr() == models.mlp_out_weight(gpt2, 1).data_ptr() and view.shape == (64, 256)


def test_unsupported_architecture_lists_supported(tiny_gpt2):
    model, _ = tiny_gpt2
    model.config.model_type = "bloom"
    with pytest.raises(models.UnsupportedArchitecture, match="gpt2.*llama"):
        models.arch_spec(model)


def test_tiny_tokenizers_bos_handling(tiny_gpt2, tiny_llama):
    _, gpt2_tok = tiny_gpt2
    _, llama_tok = tiny_llama
    assert gpt2_tok("ab").input_ids == [gpt2_tok.convert_tokens_to_ids("a"), gpt2_tok.convert_tokens_to_ids("b")]
    ids = llama_tok("ab").input_ids
    assert ids[0] == llama_tok.bos_token_id and len(ids) == 3
    assert llama_tok.decode(ids, skip_special_tokens=True) == "ab"


def test_tiny_models_are_deterministic_and_leave_global_rng_alone():
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    first, _ = models.build_tiny_model("tiny-llama")
    after = torch.rand(3)
    second, _ = models.build_tiny_model("tiny-llama")
    assert torch.equal(expected, after)
    assert models.weights_fingerprint(first) == models.weights_fingerprint(second)


def test_fingerprint_follows_weights(tiny_gpt2):
    model, _ = tiny_gpt2
    before = models.weights_fingerprint(model)
    with torch.no_grad():
        models.mlp_out_weight(model, 0)[0, 0] += 1e-3
    assert models.weights_fingerprint(model) != before


def test_default_model_is_llama_with_tied_head(default_model):
    model, tokenizer = default_model
    assert models.arch_spec(model).family == "llama"
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert tokenizer.pad_token is not None
    assert not any(p.requires_grad for p in model.parameters())


def test_second_pull_is_a_cache_hit(default_model, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("a cached model must not be downloaded again")

    monkeypatch.setattr(subprocess, "run", no_download)
    start = time.perf_counter()
    path = models.pull_model("smollm2-135m", progress=lambda *_: None)
    assert (path / ".complete").exists() and (path / "model.safetensors").exists()
    assert time.perf_counter() - start < 5


def test_missing_gguf_and_offline_hub_id_fail_clearly(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        models.pull_model(str(tmp_path / "absent.gguf"))
    monkeypatch.setenv("EAC_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="EAC_OFFLINE"):
        models.resolve_checkpoint("someone/some-model")
