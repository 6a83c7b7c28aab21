"""The target optimiser's prefix reuse is exact: the same losses, steps and δ as running every token."""

import dataclasses

import pytest
import torch

from workers.data import EditRequest
from workers.editing.hparams import TargetConfig
from workers.editing.prefix import SuffixRun
from workers.editing.targets import TargetProblem, optimise_delta
from workers.editing.tokens import aligned_on_lookup
from workers.models import load_model

# Subjects that end at different positions: at the very start (one token without BOS on the byte
# tokenizers' "A"), in the middle, at the end; templates with prefixes of different lengths.
REQUESTS = [
    EditRequest(0, "The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "English", "French"),
    EditRequest(1, "A was created by", "A", "Google", "Apple"),
    EditRequest(2, "Who made the Apple A5 chip", "the Apple A5 chip", "Google Inc", "Apple"),
]
TEMPLATES = ["{}", "x. {}", "Because the weather was bad, we stayed. {}"]


def both_paths(model, tokenizer, request, layer, init_from, config):
    results = {}
    for reuse in (False, True):
        problem = TargetProblem(model, tokenizer, request, layer, TEMPLATES, init_from=init_from,
                                config=dataclasses.replace(config, prefix_reuse=reuse))
        results[reuse] = (problem, optimise_delta(problem, record_gradients=True))
    return results


def assert_same_run(old, new, rtol, delta_rtol):
    """Same number of steps, every step's loss within ``rtol``, δ within ``delta_rtol`` of its scale."""
    assert new.steps == old.steps
    torch.testing.assert_close(torch.tensor(new.losses), torch.tensor(old.losses), rtol=rtol, atol=0)
    scale = float(old.delta.abs().max())
    torch.testing.assert_close(new.delta, old.delta, rtol=delta_rtol, atol=delta_rtol * scale)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])  # no BOS / BOS
@pytest.mark.parametrize("init_from,layer", [("mlp", 1), ("residual", 2), ("mlp", 0)])
@pytest.mark.parametrize("dtype,rtol,delta_rtol", [(torch.float32, 1e-5, 1e-4), (torch.float64, 1e-12, 1e-12)])
def test_prefix_reuse_gives_the_same_losses_steps_and_delta(name, init_from, layer, dtype, rtol, delta_rtol):
    """float32: every loss within 1e-5 (measured ≤ 1.4e-6) and δ within 1e-4 of its scale, not 1e-5.
    Why δ cannot meet 1e-5 in float32: the two paths compute the same sums in different orders
    (GEMMs of 66 suffix tokens vs 462 padded tokens pick different CPU blockings; attention sums the
    cached prefix and the suffix in other chunks), so the first gradient already differs by ~3e-7
    relative; Adam divides each component by its own √v, so in components whose gradient is near zero
    that relative noise becomes an O(lr) difference in the step, and over 8 steps δ differs by up to
    4.3e-5 of its scale (tiny-gpt2; tiny-llama 7.5e-6). It is not the prefix cache: the *same* full
    path run on a batch with 7 extra padding columns differs from itself by 5.3e-5 (tiny-gpt2), and
    forcing the math SDPA kernel on both paths gives 5.1e-5 — so no kernel choice or padding fix can
    make float32 meet 1e-5. float64 removes the round-off: everything to 1e-12 (measured: bit-equal),
    which a wrong mask, position or cached value would not give."""
    model, tokenizer = load_model(name)
    model.to(dtype)
    config = TargetConfig(num_steps=8, early_stop_loss=0.0)
    for request in REQUESTS:
        results = both_paths(model, tokenizer, request, layer, init_from, config)
        (old_problem, old), (new_problem, new) = results[False], results[True]
        assert isinstance(new_problem.run, SuffixRun)
        # It does run fewer tokens: every row's suffix only.
        assert new_problem.run.suffix_ids.shape[1] < old_problem.batch.input_ids.shape[1]
        torch.testing.assert_close(new_problem.v_init, old_problem.v_init, rtol=rtol,
                                   atol=rtol * float(old_problem.v_init.abs().max()))
        assert old.steps == config.num_steps
        assert_same_run(old, new, rtol, delta_rtol)
        if dtype == torch.float64:
            for g_new, g_old in zip(new.gradients, old.gradients):
                torch.testing.assert_close(g_new, g_old, rtol=1e-10, atol=1e-12)
        assert new.delta.norm() > 0


def test_bos_and_position_layout(tiny_llama):
    """Rows are aligned on the subject's last token; positions are each token's own (RoPE sees the
    unpadded sequence); the BOS of tiny-llama sits at position 0 of every row."""
    model, tokenizer = tiny_llama
    sequences = [[256, 5, 6, 7, 8], [256, 9], [256, 1, 2, 3]]
    batch = aligned_on_lookup(sequences, [3, 1, 2], tokenizer.pad_token_id, "cpu")
    assert batch.prefix == 3
    assert batch.input_ids[:, 3].tolist() == [7, 9, 2]
    assert batch.input_ids[0].tolist()[:5] == [256, 5, 6, 7, 8]
    assert batch.position_ids[1].tolist()[2:4] == [0, 1] and batch.real[1].tolist() == [False, False, True, True, False]
    with pytest.raises(ValueError, match="row 1"):
        aligned_on_lookup(sequences, [3, 2, 2], 0, "cpu")


def test_early_stop_is_reached_at_the_same_step(tiny_gpt2):
    model, tokenizer = tiny_gpt2
    # A threshold between the first and the last loss of a full run: both paths stop at the same step.
    config = TargetConfig(num_steps=8, lr=0.05, weight_decay=1e-3, early_stop_loss=0.0)
    full = both_paths(model, tokenizer, REQUESTS[2], 1, "mlp", config)
    losses = full[False][1].losses
    k = next(k for k in range(1, len(losses)) if losses[k] < min(losses[:k]))  # the first step below all before
    threshold = (losses[k] + min(losses[:k])) / 2
    stopped = both_paths(model, tokenizer, REQUESTS[2], 1, "mlp", dataclasses.replace(config, early_stop_loss=threshold))
    assert stopped[True][1].steps == stopped[False][1].steps == k + 1


@pytest.mark.slow
def test_prefix_reuse_is_exact_on_the_default_model(default_model):
    model, tokenizer = default_model
    config = TargetConfig(num_steps=4, early_stop_loss=0.0, weight_decay=1e-3)
    results = both_paths(model, tokenizer, REQUESTS[0], 5, "mlp", config)
    assert_same_run(results[False][1], results[True][1], 1e-5, 1e-4)
