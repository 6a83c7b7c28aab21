"""PRUNE and RECT, the weight-space constraints around ROME / MEMIT / AlphaEdit: the defining property of
each (singular values after PRUNE; the kept fraction and which elements after RECT), the registry,
and sequential edits on the tiny models whose saved log replays to the edited weights bit for bit."""

import math

import pytest
import torch

from tests.test_editing import REQUESTS, moments
from workers.editing import METHODS, Editor, load_hparams
from workers.editing.delta import LayerDelta, WeightDelta, WeightSnapshot
from workers.editing.hparams import PruneHParams, RectHParams
from workers.editing.methods import split_method
from workers.editing.prune import PruneRestraint, log_restraint
from workers.editing.rect import RectSparsifier, relative_change_mask
from workers.models import arch_spec, edited_weight, load_model
from replay_check import assert_revert_and_replay_are_bit_exact

COMBINATIONS = [f"{base}-{constraint}" for constraint in ("prune", "rect") for base in ("rome", "memit", "alphaedit")]


def singular_values(matrix: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(matrix.double())


# ---- PRUNE ---------------------------------------------------------------------------------------


def test_log_restraint_is_the_papers_function():
    sigma = torch.tensor([12.0, 6.0, 4.0, 3.9, 0.5], dtype=torch.float64)
    # α = e: F(σ) = ln σ − ln σ_max + σ_max above σ_max = 4; at and below it σ is kept.
    expected = [math.log(12) - math.log(4) + 4, math.log(6) - math.log(4) + 4, 4.0, 3.9, 0.5]
    assert log_restraint(sigma, 4.0, math.e).tolist() == pytest.approx(expected, rel=1e-12)
    # Another base: log_2.
    assert float(log_restraint(sigma[:1], 4.0, 2.0)) == pytest.approx(math.log2(12) - 2 + 4, rel=1e-12)


def prune_setting(model, module, spectrum_over_bound, seed=0):
    """W₀'s σ_max, and an accumulated update U diag(s) Vᵀ with s = spectrum_over_bound · σ_max."""
    weight = edited_weight(model, module)
    sigma_max = float(singular_values(weight)[0])
    out_dim, in_dim = weight.shape
    generator = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(out_dim, len(spectrum_over_bound), generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(in_dim, len(spectrum_over_bound), generator=generator, dtype=torch.float64))
    s = torch.tensor(spectrum_over_bound, dtype=torch.float64) * sigma_max
    return sigma_max, u, s, v


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_prune_compresses_only_the_singular_values_above_the_bound(name):
    model, _ = load_model(name)
    module = arch_spec(model).mlp_out_name(1)
    base = WeightSnapshot(model, [module])
    sigma_max, u, s, v = prune_setting(model, module, [3.0, 1.5, 0.7, 0.2])
    # α large enough that F compresses at this small σ_max (σ_max ln α ≥ 1).
    alpha = math.exp(2.0 / sigma_max)
    step = WeightDelta([LayerDelta(module, (u * s).float(), v.float())], [0], "rome-prune")
    step.apply(model)
    before = edited_weight(model, module).double() - base.original(module).double()

    restrained = PruneRestraint(PruneHParams(alpha=alpha), base)(model, step, before=base)
    after = singular_values(edited_weight(model, module).double() - base.original(module).double())
    expected = log_restraint(singular_values(before)[:4], sigma_max, alpha)
    assert after[:4].tolist() == pytest.approx(expected.tolist(), rel=1e-4)
    # The two above σ_max are compressed (each to F(σ) < σ), the two below are untouched.
    assert after[0] < s[0] and after[1] < s[1] and after[0] > sigma_max
    assert after[2:4].tolist() == pytest.approx(s[2:].tolist(), rel=1e-4)
    # The correction acts in the span of the compressed directions only: the others see no change.
    change = restrained.layers[-1].dense().double()
    assert torch.linalg.matrix_rank(change, rtol=1e-4) == 2
    assert (change @ v[:, 2:]).norm() / change.norm() < 1e-4
    # The step's delta is the change actually made: replaying it on W₀ gives the same weights.
    edited = edited_weight(model, module).clone()
    base.restore(model)
    restrained.apply(model)
    assert torch.equal(edited_weight(model, module), edited)


def test_prune_leaves_an_update_within_the_bound_alone():
    model, _ = load_model("tiny-llama")
    module = arch_spec(model).mlp_out_name(1)
    base = WeightSnapshot(model, [module])
    sigma_max, u, s, v = prune_setting(model, module, [0.9, 0.3])
    step = WeightDelta([LayerDelta(module, (u * s).float(), v.float())], [0], "rome-prune")
    step.apply(model)
    edited = edited_weight(model, module).clone()
    restrained = PruneRestraint(PruneHParams(alpha=math.exp(2.0 / sigma_max)), base)(model, step, before=base)
    assert len(restrained.layers) == 1 and torch.equal(edited_weight(model, module), edited)


def test_prune_refuses_an_alpha_under_which_f_would_grow_singular_values():
    model, _ = load_model("tiny-gpt2")  # σ_max(W₀) ≈ 0.16: ln σ grows faster than σ just above it
    module = arch_spec(model).mlp_out_name(1)
    with pytest.raises(ValueError, match=r"prune.alpha.*transformer.h.1.mlp.c_proj"):
        PruneRestraint(PruneHParams(alpha=math.e), WeightSnapshot(model, [module]))
    with pytest.raises(ValueError, match="field 'alpha': must be above 1"):
        PruneHParams(alpha=1.0)


# ---- RECT ----------------------------------------------------------------------------------------


def test_relative_change_mask_keeps_the_top_fraction():
    weight = torch.tensor([[1.0, -2.0, 0.5, 4.0], [0.1, 1.0, -1.0, 0.0]])
    update = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.05, -3.0, 0.01, 0.0]])
    # relative change: [.5, .25, 1, .125], [.5, 3, .01, 0/0 → 0]; top 25% of 8 = 2 elements.
    mask = relative_change_mask(update, weight, 0.25)
    assert mask.tolist() == [[False, False, True, False], [False, True, False, False]]
    # An element of a zero weight that changes is an infinite relative change: always kept.
    weight[0, 0] = 0.0
    assert relative_change_mask(update, weight, 0.125)[0, 0]
    with pytest.raises(ValueError, match="field 'keep_fraction': must be above 0"):
        RectHParams(keep_fraction=0.0)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_rect_writes_only_the_top_relative_changes(name):
    model, _ = load_model(name)
    module = arch_spec(model).mlp_out_name(1)
    before = WeightSnapshot(model, [module])
    out_dim, in_dim = edited_weight(model, module).shape
    generator = torch.Generator().manual_seed(3)
    left, right = torch.randn(out_dim, 2, generator=generator), torch.randn(in_dim, 2, generator=generator)
    step = WeightDelta([LayerDelta(module, left, right)], [0], "rome-rect")
    step.apply(model)

    sparse = RectSparsifier(RectHParams(keep_fraction=0.2), before)(model, step, before=before)
    change = edited_weight(model, module).double() - before.original(module).double()
    update = (left @ right.T).double()
    kept = change != 0
    assert int(kept.sum()) == round(0.2 * update.numel())
    # Kept elements carry the method's update (up to the weight's rounding), the rest are exactly W.
    assert torch.allclose(change[kept], update[kept], rtol=1e-5, atol=1e-6)
    # Which elements: every kept relative change is at least every dropped one.
    relative = update.abs() / before.original(module).double().abs()
    assert relative[kept].min() >= relative[~kept].max()
    # The step's delta is the change actually made: replaying it on the pre-edit weights.
    edited = edited_weight(model, module).clone()
    before.restore(model)
    sparse.apply(model)
    assert torch.equal(edited_weight(model, module), edited)


# ---- registry and hyper-parameters ---------------------------------------------------------------


def test_methods_and_hyper_parameters():
    assert set(COMBINATIONS) <= set(METHODS)
    assert "ft-l-prune" not in METHODS and "rome-eac" in METHODS
    assert split_method("memit-rect") == ("memit", "rect") and split_method("rome") == ("rome", None)
    assert split_method("alphaedit-eac") == ("alphaedit", "eac")
    prune = load_hparams("rome-prune", "gpt2-xl")
    assert prune.prune.alpha == pytest.approx(math.e) and prune.rect is None and prune.eac is None
    rect = load_hparams("memit-rect", "llama3-8b", overrides={"rect.keep_fraction": 0.3})
    assert rect.rect.keep_fraction == 0.3 and rect.mom2_update_weight == 15000 and rect.prune is None
    for model in ("gpt2-xl", "llama3-8b", "llama2-13b", "smollm2-135m", "tiny"):
        for method in COMBINATIONS:
            load_hparams(method, model)
    with pytest.raises(ValueError, match="need a prune method"):
        load_hparams("rome", "gpt2-xl", overrides={"prune.alpha": 2.0})
    with pytest.raises(ValueError, match=r"overrides: field 'prune.alpha': must be above 1"):
        load_hparams("rome-prune", "gpt2-xl", overrides={"prune.alpha": 0.5})


def test_yaml_without_the_constraint_section_is_refused(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("layer: 3\n")
    with pytest.raises(ValueError, match=r"mine.yaml: method rome-rect needs the 'rect' section"):
        load_hparams("rome-rect", path=path)
    path.write_text("layer: 3\nrect: {keep_fraction: 2}\n")
    with pytest.raises(ValueError, match=r"mine.yaml: field 'rect.keep_fraction': must be at most 1"):
        load_hparams("rome-rect", path=path)


# ---- sequential edits ----------------------------------------------------------------------------


# Each combination on one tiny model, so that both weight layouts (GPT-2's transposed Conv1D, LLaMA's
# Linear) meet both constraints; MEMIT-PRUNE on tiny-gpt2, where MEMIT's update reaches the bound.
SEQUENTIAL = [("rome-prune", "tiny-llama"), ("memit-prune", "tiny-gpt2"), ("alphaedit-prune", "tiny-llama"),
              ("rome-rect", "tiny-gpt2"), ("memit-rect", "tiny-llama"), ("alphaedit-rect", "tiny-gpt2")]


@pytest.mark.parametrize("method,name", SEQUENTIAL)
def test_sequential_edits_keep_the_property_and_replay_exactly(method, name, tmp_path):
    model, tokenizer = load_model(name)
    hp = load_hparams(method, model)
    layers = [hp.layer] if hasattr(hp, "layer") else list(hp.layers)
    editor = Editor(model, tokenizer, method, hp, cache_dir=tmp_path, second_moments=moments(model, layers))
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    log = editor.apply(REQUESTS)
    assert len(log) == 3 and not any(r.skipped for r in editor.records)
    _, constraint = split_method(method)
    last = log[-1]
    if constraint == "rect":
        for delta in log:
            assert all(layer.mask is not None for layer in delta.layers)
            for layer in delta.layers:
                assert int(layer.mask.sum()) == round(hp.rect.keep_fraction * layer.mask.numel())
    else:
        # The last step's correction maps the accumulated update's singular values above σ_max by F.
        corrections = last.layers[len(editor.modules):]
        if method != "alphaedit-prune":  # AlphaEdit's null-space updates stay under the bound here
            assert corrections, "these tiny edits are large enough to reach the bound"
        corrected = {c.module for c in corrections}
        for module in set(editor.modules) - corrected:
            w0 = editor.base.original(module).double()
            accumulated = edited_weight(model, module).double() - w0
            assert float(singular_values(accumulated)[0]) <= float(singular_values(w0)[0])
        for correction in corrections:
            module = correction.module
            w0 = editor.base.original(module).double()
            after = edited_weight(model, module).double() - w0
            before = after - correction.dense().double()
            sigma_max = float(singular_values(w0)[0])
            expected = log_restraint(singular_values(before), sigma_max, hp.prune.alpha)
            assert singular_values(after)[:4].tolist() == pytest.approx(expected[:4].tolist(), rel=1e-4, abs=1e-6)
            assert float(singular_values(after)[0]) < float(singular_values(before)[0])
    assert_revert_and_replay_are_bit_exact(model, editor, log, base, tmp_path)


def test_step_measures_count_each_matrix_once(tmp_path):
    """A batch of ROME requests (several rank-one deltas of one matrix) or a PRUNE correction gives a
    step more than one delta per matrix; the record's ‖ΔW‖₁ is still the change actually made."""
    model, tokenizer = load_model("tiny-gpt2")
    hp = load_hparams("rome", model)
    editor = Editor(model, tokenizer, "rome", hp, cache_dir=tmp_path, second_moments=moments(model, [hp.layer]))
    module = arch_spec(model).mlp_out_name(hp.layer)
    original = edited_weight(model, module).clone()
    record = editor.edit_step(REQUESTS[:2])
    change = (edited_weight(model, module) - original).double()
    assert record.dw_l1 == pytest.approx(float(change.abs().sum()), rel=1e-6)


def test_a_spec_runs_the_constraints_and_checks_their_fields(tmp_path, data_root):
    from orchestrator.spec import SpecError, load_spec
    from tests.test_spec import good_spec, write

    methods = ["memit-rect", {"name": "rome-prune-log2", "method": "rome-prune", "hparams": {"prune.alpha": 2000.0}}]
    spec = load_spec(write(tmp_path, good_spec(methods=methods, hparams={})))
    assert {t.method for t in spec.trajectories()} == {"memit-rect", "rome-prune"}
    bad = [{"name": "rect-all", "method": "rome-rect", "hparams": {"rect.keep_fraction": 1.5}}]
    with pytest.raises(SpecError, match=r"field 'methods\[0\].hparams.rect.keep_fraction'.*at most 1"):
        load_spec(write(tmp_path, good_spec(methods=bad, hparams={})))


def test_figures_draw_each_constraint_in_its_base_methods_colour_and_its_own_line():
    from experiments.figures import base_method, linestyle

    assert [base_method(m) for m in ("rome-prune", "memit-rect", "alphaedit-eac", "ft-l")] == \
        ["rome", "memit", "alphaedit", "ft-l"]
    assert len({linestyle(m) for m in ("memit", "memit-eac", "memit-prune", "memit-rect")}) == 4


def test_an_editor_for_a_constraint_needs_its_settings(tmp_path):
    model, tokenizer = load_model("tiny-gpt2")
    with pytest.raises(ValueError, match="method memit-rect needs hyper-parameters with a 'rect' section"):
        Editor(model, tokenizer, "memit-rect", load_hparams("memit", model), cache_dir=tmp_path)
