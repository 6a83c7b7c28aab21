"""NAS (Norm-Anchor Scaling) and ENCORE (MPES + Frobenius-norm constrained MEMIT): the defining property
of each — the rescaled v* keeps its direction and takes the reference norm; MPES stops where its
criterion says on a scripted loss curve; ENCORE's update solves its own normal equations — the registry,
and sequential edits on the tiny models whose saved log replays bit for bit and whose resume rebuilds
ENCORE's key cache."""

import dataclasses

import pytest
import torch

from tests.test_editing import REQUESTS, moments
from workers.editing import METHODS, Editor, load_hparams
from workers.editing.context import EditContext
from workers.editing.encore import (EarlierKeys, MostProbableOptimiser, NormConstrainedSolve, encore_right_factor,
                                    most_probable_stop, norm_constrained_system)
from workers.editing.hparams import ENCOREHParams, NASHParams, TargetConfig, with_overrides
from workers.editing.memit import memit_right_factor
from workers.editing.nas import NormAnchoredOptimiser, rescaled_delta, trimmed_mean
from workers.editing.rome import apply_rome
from workers.editing.targets import LossParts, TargetBatch, optimise_deltas
from workers.models import load_model
from replay_check import assert_revert_and_replay_are_bit_exact

NEW_METHODS = ["rome-nas", "memit-nas", "alphaedit-nas", "memit-encore"]


def key_cache(editor) -> dict:
    """ENCORE's running Σ K_p K_pᵀ per layer in the editor's context."""
    return editor.ctx.running_state(EarlierKeys).key_cache


# ---- NAS -----------------------------------------------------------------------------------------


def test_rescaling_keeps_the_direction_and_sets_the_reference_norm_on_a_tiny_model():
    """On tiny-llama in float64, at MEMIT's residual site: the value vector v* = v0 + δ (v0 = the MLP
    output, not the residual z_init) is rescaled to the reference, the pre-MLP residual is untouched."""
    model, tokenizer = load_model("tiny-llama")
    model.double()
    config = TargetConfig(num_steps=3)
    problem = TargetBatch(model, tokenizer, REQUESTS[:2], 1, ["{}"], init_from="residual", config=config)
    v0 = problem.mlp_inits.double()
    assert not torch.allclose(v0, problem.v_inits.double())  # the residual holds more than the MLP output
    generator = torch.Generator().manual_seed(0)
    results = optimise_deltas(problem)
    for result in results:
        result.delta = torch.randn(v0.shape[1], generator=generator, dtype=torch.float64) * 3
    before = [v0[r] + res.delta for r, res in enumerate(results)]
    anchor = NormAnchoredOptimiser(NASHParams())
    anchor.reference = 0.731
    anchor.rescale(problem, results)
    for r, result in enumerate(results):
        after = v0[r] + result.delta
        assert float(after.norm()) == pytest.approx(0.731, rel=1e-12)
        cosine = float(after @ before[r] / (after.norm() * before[r].norm()))
        assert cosine == pytest.approx(1.0, abs=1e-12)
        # The target z = (z_init − v0) + v*: the pre-MLP part is kept, only v* is anchored.
        z = problem.v_inits[r].double() + result.delta
        assert torch.allclose(z - after, problem.v_inits[r].double() - v0[r], atol=1e-12)


def test_rescaled_delta_skips_like_the_authors_code_only_when_asked():
    v0, delta = torch.tensor([3.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 4.0], dtype=torch.float64)
    assert torch.allclose(v0 + rescaled_delta(v0, delta, 1.0), torch.tensor([0.6, 0.8], dtype=torch.float64))
    assert torch.equal(rescaled_delta(v0, delta, 1.0, skip_above=2.0), torch.zeros(2, dtype=torch.float64))
    assert torch.allclose(v0 + rescaled_delta(v0, delta, 3.0, skip_above=2.0), torch.tensor([1.8, 2.4], dtype=torch.float64))


def test_trimmed_mean_drops_the_largest_share():
    assert trimmed_mean([1.0, 2.0, 3.0, 100.0], 0.25) == pytest.approx(2.0)
    assert trimmed_mean([1.0, 2.0, 3.0, 100.0], 0.0) == pytest.approx(26.5)
    assert trimmed_mean([float(i) for i in range(20)], 0.05) == pytest.approx(9.0)  # the authors' 5%: 1 of 20


def test_rome_nas_writes_the_rescaled_v_star(tmp_path, data_root):
    """ROME's module output at the prompt key after the edit is v* with the reference norm."""
    model, tokenizer = load_model("tiny-llama")
    hp = load_hparams("rome-nas", model)
    ctx = EditContext(model, tokenizer, cache_dir=tmp_path, data_root=data_root,
                      second_moments=moments(model, [hp.layer]))
    anchor = NormAnchoredOptimiser(hp.nas)
    anchor.prepare(hp, ctx)
    assert anchor.reference > 0
    ctx.optimiser = anchor
    _, info = apply_rome(model, tokenizer, REQUESTS[:1], hp, ctx, "rome-nas")
    assert float(info.targets[0].norm()) == pytest.approx(anchor.reference, rel=1e-5)
    # Cached on disk: a second editor reads the same reference without solving again.
    assert len(list((tmp_path / "nas").glob("*.json"))) == 1
    again = NormAnchoredOptimiser(hp.nas)
    again.prepare(hp, ctx)
    assert again.reference == anchor.reference


# ---- ENCORE: MPES --------------------------------------------------------------------------------


class ScriptedProblem:
    """A one-request problem whose loss never reaches the early-stop threshold and whose
    most-probable flags follow a script, step by step (the rewriting prompts: bare first)."""

    def __init__(self, script):
        self.script, self.calls, self.n = script, 0, 1
        self.config = TargetConfig(num_steps=len(script), early_stop_loss=1e-9)
        self.v_inits = torch.ones(1, 4)

    def losses(self, deltas, requests=None):
        flags = torch.tensor(self.script[self.calls])
        self.calls += 1
        total = 1.0 + (deltas[0] - 0.3).pow(2).sum().unsqueeze(0)
        return LossParts(total, total.detach(), torch.zeros(1), torch.zeros(1), [flags])


SCRIPT = [[False, False, False], [True, False, True], [True, True, True], [False, True, True],
          [True, True, True], [True, True, True], [True, True, True], [True, True, True]]


@pytest.mark.parametrize("settings,steps", [
    (ENCOREHParams(mpes_hits=1), 3),                          # first step with every prompt on top: index 2
    (ENCOREHParams(mpes_hits=2), 5),                          # second such step: index 4 (index 3 misses one)
    (ENCOREHParams(mpes_hits=2, mpes_prompts="context"), 4),  # the bare prompt ignored: index 3 counts
    (ENCOREHParams(mpes_hits=4), 7),
])
def test_mpes_stops_where_its_criterion_says(settings, steps):
    problem = ScriptedProblem(SCRIPT)
    result = optimise_deltas(problem, stop=most_probable_stop(settings))[0]
    assert result.steps == steps and problem.calls == steps
    # No update at the stopping evaluation: the returned δ is the one that was evaluated last.
    unstopped = optimise_deltas(ScriptedProblem(SCRIPT), num_steps=steps, update_last=False)[0]
    assert torch.equal(result.delta, unstopped.delta)
    # ENCORE's target optimiser (the registry's optimiser hook) runs the shared loop with that rule.
    batched = MostProbableOptimiser(settings).optimise_batch(ScriptedProblem(SCRIPT))[0][0]
    assert batched.steps == steps and torch.equal(batched.delta, result.delta)


def test_without_a_stop_rule_the_script_runs_to_the_budget():
    assert optimise_deltas(ScriptedProblem(SCRIPT))[0].steps == len(SCRIPT)


# ---- ENCORE: the norm-constrained update ---------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_encore_update_satisfies_its_normal_equations(name, tmp_path):
    model, tokenizer = load_model(name)
    hp = with_overrides(load_hparams("memit-encore", model), {"encore.norm_weight": 3.0})
    layer = hp.layers[0]
    ctx = EditContext(model, tokenizer, cache_dir=tmp_path, second_moments=moments(model, [layer]))
    generator = torch.Generator().manual_seed(1)
    d_in, d_out = ctx.second_moment(layer).shape[0], 16
    keys = torch.randn(d_in, 3, generator=generator, dtype=torch.float64)
    earlier = torch.randn(d_in, 5, generator=generator, dtype=torch.float64)
    ctx.running_state(EarlierKeys).key_cache[layer] = earlier @ earlier.T
    residual = torch.randn(d_out, 3, generator=generator, dtype=torch.float64)
    delta_w = residual @ encore_right_factor(hp)(ctx, layer, keys).T
    moment = ctx.second_moment(layer).double()
    system = (hp.mom2_update_weight * (moment + moment.T) / 2 + earlier @ earlier.T
              + 3.0 * torch.eye(d_in, dtype=torch.float64) + keys @ keys.T)
    assert torch.allclose(norm_constrained_system(ctx, layer, keys, hp), system, rtol=1e-12, atol=1e-12)
    # ∂/∂ΔW [‖ΔW K − R‖² + λ‖ΔW K₀‖² + ‖ΔW K_p‖² + μ‖ΔW‖²] = 0  ⇔  ΔW S = R Kᵀ
    error = (delta_w @ system - residual @ keys.T).norm() / (residual @ keys.T).norm()
    assert float(error) < 1e-10, float(error)
    # μ = 0 and no earlier edits: exactly MEMIT's update; a larger μ gives a smaller ‖ΔW‖_F.
    plain = with_overrides(hp, {"encore.norm_weight": 0.0, "encore.preserve_earlier_edits": False})
    memit = residual @ memit_right_factor(plain)(ctx, layer, keys).T
    same = residual @ encore_right_factor(plain)(ctx, layer, keys).T
    # MEMIT solves through the Cholesky factor of C as estimated (float32, only nearly symmetric; the
    # factor reads one triangle), so the two agree to ~1e-4 on these test moments, not to round-off.
    assert float((same - memit).norm() / memit.norm()) < 1e-3
    stiffer = with_overrides(hp, {"encore.norm_weight": 30.0})
    assert (residual @ encore_right_factor(stiffer)(ctx, layer, keys).T).norm() < delta_w.norm()


# ---- registry, sequential edits, replay ----------------------------------------------------------


def test_registry_and_hyper_parameters():
    assert set(NEW_METHODS) <= set(METHODS)
    assert "rome-encore" not in METHODS and "ft-l-nas" not in METHODS
    for model in ("gpt2-xl", "llama3-8b", "llama2-13b", "smollm2-135m", "tiny"):
        for method in NEW_METHODS:
            load_hparams(method, model)
    assert load_hparams("memit-encore", "gpt2-xl").encore.mpes_hits == 4
    assert load_hparams("memit-encore", "llama3-8b").encore.norm_weight == 20.0
    assert load_hparams("rome-nas", "gpt2-xl").nas.reference_edits == 1000
    with pytest.raises(ValueError, match=r"overrides: field 'nas.trim_upper': must be below 1"):
        load_hparams("memit-nas", "gpt2-xl", overrides={"nas.trim_upper": 1.0})
    with pytest.raises(ValueError, match=r"field 'encore.mpes_hits': must be at least 1"):
        load_hparams("memit-encore", "gpt2-xl", overrides={"encore.mpes_hits": 0})


@pytest.mark.parametrize("method,name", [("rome-nas", "tiny-gpt2"), ("memit-nas", "tiny-llama"),
                                         ("alphaedit-nas", "tiny-gpt2"), ("memit-encore", "tiny-llama"),
                                         ("memit-encore", "tiny-gpt2")])
def test_sequential_edits_replay_exactly_and_resume(method, name, tmp_path, data_root):
    model, tokenizer = load_model(name)
    hp = load_hparams(method, model)
    layers = [hp.layer] if hasattr(hp, "layer") else list(hp.layers)
    second = moments(model, layers)
    editor = Editor(model, tokenizer, method, hp, cache_dir=tmp_path, data_root=data_root, second_moments=second)
    assert isinstance(editor.ctx.optimiser, MostProbableOptimiser if method == "memit-encore" else NormAnchoredOptimiser)
    assert isinstance(editor.ctx.layer_solve, NormConstrainedSolve) == (method == "memit-encore")
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    log = editor.apply(REQUESTS)
    assert len(log) == 3 and not any(r.skipped for r in editor.records)
    if method == "memit-encore":
        cache = {layer: gram.clone() for layer, gram in key_cache(editor).items()}
        assert sorted(cache) == layers and all(layer.keys is not None for d in log for layer in d.layers)
        # Resuming the saved log in a fresh editor rebuilds the running Σ K_p K_pᵀ.
        other_model, _ = load_model(name)
        other = Editor(other_model, tokenizer, method, hp, cache_dir=tmp_path, data_root=data_root,
                       second_moments=second)
        other.resume(log)
        assert all(torch.allclose(key_cache(other)[layer], cache[layer]) for layer in layers)
    assert_revert_and_replay_are_bit_exact(model, editor, log, base, tmp_path)
    assert not key_cache(editor)  # revert clears the running state


def test_a_failed_encore_step_restores_the_key_cache(tmp_path, monkeypatch):
    """All-or-nothing: a step that fails after the keys were remembered leaves no trace."""
    from workers.editing.errors import EditFailure

    model, tokenizer = load_model("tiny-llama")
    hp = load_hparams("memit-encore", model)
    editor = Editor(model, tokenizer, "memit-encore", hp, cache_dir=tmp_path, second_moments=moments(model, hp.layers))
    editor.apply(REQUESTS[:1])
    cache = {layer: gram.clone() for layer, gram in key_cache(editor).items()}
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    original = editor._base_method.apply

    def failing(*args, **kwargs):
        original(*args, **kwargs)
        raise EditFailure("injected after the update")

    monkeypatch.setattr(editor, "_base_method", dataclasses.replace(editor._base_method, apply=failing))
    record = editor.edit_step(REQUESTS[1:2])
    assert record.skipped and "injected" in record.error
    assert all(torch.equal(key_cache(editor)[layer], cache[layer]) for layer in cache)
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    assert len(editor.log) == 1  # nothing of the failed step was logged
