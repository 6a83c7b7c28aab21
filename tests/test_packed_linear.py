"""Packed oneDNN linear layers compute the plain layers' products (within float32 round-off), pass the
gradient to the input, and leave the model as it was; the target optimisation gives the same run with them."""

import dataclasses

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from workers.data import EditRequest
from workers.editing.hparams import TargetConfig
from workers.editing.targets import TargetProblem, optimise_delta, upper_linear_names
from workers.models import load_model
from workers.packed_linear import LinearCompute, PackedLinear, PackedLinears, linear_names, onednn_available

needs_onednn = pytest.mark.skipif(not onednn_available(torch.zeros(1)), reason="PyTorch without oneDNN")


def layers():
    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 80).requires_grad_(False)
    conv = Conv1D(80, 48).requires_grad_(False)  # GPT-2's layout: weight (in, out)
    torch.nn.init.normal_(conv.bias)
    return linear, conv


@needs_onednn
@pytest.mark.parametrize("which", [0, 1])
def test_packed_layer_gives_the_product_and_the_input_gradient(which):
    module = layers()[which]
    x = torch.randn(2, 7, 48, requires_grad=True)
    x_plain = x.detach().clone().requires_grad_(True)
    packed = PackedLinear(module)
    y, y_plain = packed(x), module(x_plain)
    torch.testing.assert_close(y, y_plain, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_plain.backward(grad)
    torch.testing.assert_close(x.grad, x_plain.grad, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_packed_bfloat16_compute_rounds_the_products_only():
    linear, _ = layers()
    x = torch.randn(5, 48)
    y = PackedLinear(linear, compute_dtype=torch.bfloat16)(x)
    exact = linear(x)
    assert y.dtype == torch.float32
    assert not torch.equal(y, exact)  # the product was rounded: bf16 ran
    torch.testing.assert_close(y, exact, rtol=3e-2, atol=3e-2)


def test_trainable_weights_are_refused():
    with pytest.raises(ValueError, match="frozen"):
        PackedLinear(torch.nn.Linear(4, 4))


@needs_onednn
def test_swapped_runs_the_packed_layers_and_puts_the_originals_back():
    model, _ = load_model("tiny-llama")
    names = linear_names(model, ["model.layers.3", "lm_head"])
    assert "model.layers.3.mlp.down_proj" in names and "lm_head" in names and "model.layers.2.mlp.down_proj" not in names
    originals = {name: model.get_submodule(name) for name in names}
    packed = PackedLinears(model, names)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        plain = model(ids).logits
        with packed.swapped():
            assert all(isinstance(model.get_submodule(name), PackedLinear) for name in names)
            fast = model(ids).logits
    assert all(model.get_submodule(name) is module for name, module in originals.items())
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)


@needs_onednn
@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_target_optimisation_is_the_same_run_with_packed_layers(name):
    model, tokenizer = load_model(name)
    request = EditRequest(0, "The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "English", "French")
    config = TargetConfig(num_steps=6, lr=0.2, early_stop_loss=0.0)
    runs = {}
    for packed in (False, True):
        problem = TargetProblem(model, tokenizer, request, 1, ["{}", "x. {}"], init_from="mlp", config=config,
                                compute=LinearCompute(packed=packed))
        assert (problem.linears is not None) == packed
        runs[packed] = optimise_delta(problem, record_gradients=True)
    assert runs[True].steps == runs[False].steps == 6
    torch.testing.assert_close(torch.tensor(runs[True].losses), torch.tensor(runs[False].losses), rtol=1e-5, atol=0)
    # The first gradient (at δ = 0) agrees to round-off; later ones are taken at δs that differ by it.
    old = runs[False].gradients[0]
    assert float((runs[True].gradients[0] - old).norm() / old.norm()) < 1e-5
    # Adam divides each element's step by its gradient's running scale, so round-off in a near-zero
    # gradient element moves that element of δ more than the loss: compared as a whole.
    delta = runs[False].delta
    assert float((runs[True].delta - delta).norm() / delta.norm()) < 1e-3
    # The layers run are those above the edited one and the LM head.
    upper = upper_linear_names(model, 1)
    assert not any(".0." in n or ".1." in n for n in upper) and any(".2." in n for n in upper)


def test_scoring_compute_dtype_is_checked_and_leaves_the_default_digest_unchanged():
    from workers.evaluation.config import EvalConfig
    from workers.fields import FieldError

    # The digest of the default settings, as computed before the field existed (reference caches stay valid).
    assert EvalConfig().digest() == "6e2aeafa629cae68"
    assert EvalConfig(compute_dtype="bfloat16").digest() != EvalConfig().digest()
    assert EvalConfig(compute_dtype="bfloat16").products_dtype == torch.bfloat16
    assert EvalConfig().products_dtype is None  # the model's own dtype
    with pytest.raises(FieldError, match="compute_dtype"):
        EvalConfig.from_dict({"compute_dtype": "float16"})


def test_a_compute_dtype_needs_packed_layers():
    with pytest.raises(ValueError, match="packed"):
        LinearCompute(packed=False, dtype=torch.bfloat16)


@needs_onednn
def test_an_edit_context_packs_unchanged_layers_once_and_again_after_a_write():
    from workers.packed_linear import PackCache

    model, _ = load_model("tiny-llama")
    cache = PackCache(LinearCompute())
    names = upper_linear_names(model, 0)
    first = cache.pack(model, names)
    assert first is not None and cache.pack(model, names) is first  # unchanged weights: the same packing
    name = names[0]
    weight = model.get_submodule(name).weight
    x = torch.randn(3, weight.shape[1])
    with torch.no_grad():
        weight.t().add_(0.5)  # an in-place write through a view, as an edit or a revert makes
    second = cache.pack(model, names)
    assert second is not first  # the stale packing is not handed out again
    torch.testing.assert_close(second.replacements[name](x), torch.nn.functional.linear(x, weight, None
                               if model.get_submodule(name).bias is None else model.get_submodule(name).bias),
                               rtol=1e-5, atol=1e-5)
