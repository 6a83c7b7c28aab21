"""MEMIT/AlphaEdit batches: the requests' z are optimised in one batched forward per step, with the
same per-request losses, steps and δ as one request at a time."""

import dataclasses

import pytest
import torch

from workers.data import EditRequest
from workers.editing import load_hparams
from workers.editing.context import EditContext
from workers.editing.hparams import TargetConfig, with_overrides
from workers.editing.memit import apply_memit
from workers.editing.targets import TargetBatch, TargetProblem, optimise_delta, optimise_deltas
from workers.models import arch_spec, load_model

# Targets of 1, 2 and 3+ tokens; subjects ending at different positions.
REQUESTS = [
    EditRequest(0, "The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "English", "French"),
    EditRequest(1, "Who made the Apple A5 chip", "the Apple A5 chip", "Google", "Google Inc"),
    EditRequest(2, "A was created by", "A", "Google", "the Apple Computer company"),
]
TEMPLATES = ["{}", "x. {}", "Because the weather was bad, we stayed. {}"]


def sequential_and_batched(model, tokenizer, config, layer=2):
    one_by_one = [optimise_delta(TargetProblem(model, tokenizer, r, layer, TEMPLATES, init_from="residual",
                                               config=config)) for r in REQUESTS]
    batch = TargetBatch(model, tokenizer, REQUESTS, layer, TEMPLATES, init_from="residual", config=config)
    return one_by_one, optimise_deltas(batch)


def stop_step(losses, threshold):
    """The number of evaluations a run with these losses makes when it stops below ``threshold``."""
    return next((k + 1 for k, loss in enumerate(losses) if loss < threshold), len(losses))


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
@pytest.mark.parametrize("dtype,rtol,delta_rtol", [(torch.float32, 1e-4, 5e-4), (torch.float64, 1e-10, 1e-10)])
@pytest.mark.parametrize("prefix_reuse", [True, False])
def test_batched_targets_equal_one_at_a_time_with_per_request_early_stop(name, dtype, rtol, delta_rtol, prefix_reuse):
    """Every loss within ``rtol``; δ within ``delta_rtol`` of its scale. float32: losses 1e-4, δ 5e-4 of
    its scale — a batch of other shapes changes the GEMMs' round-off (first gradient ~1e-7 relative),
    and Adam's per-component normalisation amplifies it over the steps (measured on this machine: losses
    up to 1.5e-5 relative by step 10, δ up to 1.3e-4 of its scale in one component of 64). float64:
    1e-10, the real exactness check — a row mixed up between requests, a wrong target position or a
    shared early stop would not give it."""
    model, tokenizer = load_model(name)
    model.to(dtype)
    config = TargetConfig(num_steps=10, lr=0.2, early_stop_loss=0.0, prefix_reuse=prefix_reuse)
    full, _ = sequential_and_batched(model, tokenizer, config)
    # A threshold that the requests first go below at different steps: each must stop on its own.
    # (Midway between two neighbouring losses, the widest such gap: round-off cannot move a loss across.)
    values = sorted(l for r in full for l in r.losses)
    gaps = [(b - a, (a + b) / 2) for a, b in zip(values, values[1:])]
    threshold = max((gap, t) for gap, t in gaps if len({stop_step(r.losses, t) for r in full}) > 1)[1]
    alone, together = sequential_and_batched(model, tokenizer, dataclasses.replace(config, early_stop_loss=threshold))
    steps = [r.steps for r in alone]
    assert steps == [stop_step(r.losses, threshold) for r in full] and len(set(steps)) > 1, steps
    for single, batched in zip(alone, together):
        assert batched.steps == single.steps
        torch.testing.assert_close(torch.tensor(batched.losses), torch.tensor(single.losses), rtol=rtol, atol=0)
        scale = float(single.delta.abs().max())
        torch.testing.assert_close(batched.delta, single.delta, rtol=delta_rtol, atol=delta_rtol * scale)


def test_memit_batch_runs_one_forward_per_step(tmp_path):
    """Two requests in one MEMIT step: the layers above the edited one run once per optimisation step
    (plus one set-up pass), not once per request and step."""
    model, tokenizer = load_model("tiny-llama")
    hp = with_overrides(load_hparams("memit", model), {"layers": (1,), "num_steps": 4, "early_stop_loss": 0.0})
    d_in = model.get_submodule(arch_spec(model).mlp_out_name(1)).weight.shape[1]
    ctx = EditContext(model, tokenizer, cache_dir=tmp_path, second_moments={1: torch.eye(d_in)})
    ctx.context_templates(hp)
    runs = []
    handle = model.get_submodule(arch_spec(model).layer_name(2)).register_forward_hook(lambda *a: runs.append(1))
    try:
        _, info = apply_memit(model, tokenizer, REQUESTS[:2], hp, ctx)
    finally:
        handle.remove()
    assert info.steps == 2 * hp.num_steps
    # 1 set-up + 4 steps, then the keys and current-z passes stop at layer 1 (never reach layer 2).
    assert len(runs) == 1 + hp.num_steps


@pytest.mark.parametrize("prefix_reuse", [True, False])
def test_requests_that_have_stopped_are_not_run_again(prefix_reuse):
    """Once a request of the batch stops, later steps run only the other requests' rows (a stopped
    request used to go through the forward pass at every later step, for a loss nobody read)."""
    model, tokenizer = load_model("tiny-gpt2")
    config = TargetConfig(num_steps=10, lr=0.2, early_stop_loss=0.0, prefix_reuse=prefix_reuse)
    full, _ = sequential_and_batched(model, tokenizer, config)
    values = sorted(l for r in full for l in r.losses)
    gaps = [(b - a, (a + b) / 2) for a, b in zip(values, values[1:])]
    threshold = max((gap, t) for gap, t in gaps if len({stop_step(r.losses, t) for r in full}) > 1)[1]
    config = dataclasses.replace(config, early_stop_loss=threshold)
    batch = TargetBatch(model, tokenizer, REQUESTS, 2, TEMPLATES, init_from="residual", config=config)
    rows_run = []
    upper = model.get_submodule(arch_spec(model).layer_name(3))
    handle = upper.register_forward_hook(lambda module, args, output: rows_run.append(
        (output[0] if isinstance(output, tuple) else output).shape[0]))
    try:
        results = optimise_deltas(batch)
    finally:
        handle.remove()
    steps = [r.steps for r in results]
    assert len(set(steps)) > 1, steps  # the requests stop at different steps
    per_request = len(TEMPLATES) + 1  # its rewriting prompts and its KL prompt
    assert rows_run == [per_request * sum(s > step for s in steps) for step in range(max(steps))]
