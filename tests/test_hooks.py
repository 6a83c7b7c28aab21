"""workers/hooks.py: module replacement and output patching undo themselves."""

import pytest
import torch

from workers.editing.delta import edited_weight
from workers.hooks import modules_replaced, patch_output
from workers.models import arch_spec


def test_modules_replaced_puts_the_originals_back_after_an_error(tiny_llama):
    model, _ = tiny_llama
    names = [arch_spec(model).layer_name(i) for i in (0, 2)]
    originals = [model.get_submodule(n) for n in names]
    with pytest.raises(RuntimeError, match="inside"):
        with modules_replaced(model, {n: torch.nn.Identity() for n in names}):
            assert all(isinstance(model.get_submodule(n), torch.nn.Identity) for n in names)
            raise RuntimeError("inside")
    assert [model.get_submodule(n) for n in names] == originals


def test_patch_output_with_input_adds_a_weight_change(tiny_gpt2):
    """FT's use: the projection's output plus D k equals the output of W + D (GPT-2's Conv1D)."""
    model, _ = tiny_gpt2
    name = arch_spec(model).mlp_out_name(1)
    module = model.get_submodule(name)
    k = torch.randn(3, edited_weight(model, name).shape[1])
    change = torch.randn(edited_weight(model, name).shape) * 0.1
    with patch_output(model, name, lambda out, key: out + key @ change.T, with_input=True):
        patched = module(k)
    plain = module(k)  # the hook is gone
    with torch.no_grad():
        edited_weight(model, name).add_(change)
    torch.testing.assert_close(patched, module(k), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(plain, patched, atol=1e-3)
