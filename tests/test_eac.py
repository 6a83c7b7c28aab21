"""EAC: anchors, the scored elastic net, the ablation flags, and the wrapper around the optimiser."""

import dataclasses

import pytest
import torch

from workers.editing import load_hparams
from workers.editing.context import EditContext
from workers.editing.eac import AnchoredOptimiser, anchor_mask, elastic_net, optimise_with_anchors, plan_anchors
from workers.editing.hparams import EACHParams
from workers.editing.rome import apply_rome
from workers.editing.targets import TargetProblem
from workers.models import load_model

from test_editing import REQUESTS, moments


def test_percentile_rule_keeps_the_right_count():
    scores = torch.arange(1, 101, dtype=torch.float32)
    mask = anchor_mask(scores, 80)
    assert int(mask.sum()) == 20 and mask[80:].eq(1).all() and mask[:80].eq(0).all()
    assert int(anchor_mask(scores, 95).sum()) == 5
    assert int(anchor_mask(scores.flip(0), 80, "top_fraction").sum()) == 20
    assert anchor_mask(scores.flip(0), 80, "top_fraction")[:20].eq(1).all()


def test_ties_and_zero_scores():
    tied = torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0, 2.0])
    # γ = P50 = 1.0: every tied dimension reaches it; the zero score never does.
    assert anchor_mask(tied, 50).tolist() == [0, 1, 1, 1, 1, 1]
    # top_fraction keeps exactly round(0.5 · 6) = 3; ties are broken by position (stable).
    assert anchor_mask(tied, 50, "top_fraction").tolist() == [0, 1, 1, 0, 0, 1]
    assert anchor_mask(torch.zeros(10), 80).sum() == 0
    assert anchor_mask(torch.zeros(10), 80, "top_fraction").sum() == 0


def test_elastic_net_value_and_gradient_by_hand():
    alpha = torch.tensor([1.0, 2.0, 0.5])
    delta = torch.tensor([1.0, -2.0, 0.0], requires_grad=True)
    penalty = elastic_net(alpha, l1_weight=0.1, l2_weight=0.25)(delta)
    # 0.1·(1·1 + 2·2 + 0.5·0) + 0.25·(1 + 4 + 0) = 0.5 + 1.25
    assert penalty.item() == pytest.approx(1.75)
    penalty.backward()
    # ∂/∂δ_i = λ α_i sign(δ_i) + 2 μ δ_i  (sign(0) = 0)
    assert delta.grad.tolist() == pytest.approx([0.1 + 0.5, -0.2 - 1.0, 0.0])


def test_each_ablation_flag_changes_exactly_what_it_names():
    vector = torch.tensor([4.0, -1.0, 0.5, 2.0, -3.0, 0.1, 1.0, -0.2, 0.3, 5.0])
    gradient = torch.tensor([0.1, 2.0, 1.0, -0.3, 0.05, 4.0, 0.2, 0.1, -0.5, 0.01])
    base = EACHParams(gamma_percentile=70)
    mask, alpha = plan_anchors(vector, gradient, base)
    saliency = (vector * gradient).abs()
    assert mask.tolist() == anchor_mask(saliency, 70).tolist()
    torch.testing.assert_close(alpha, 1 / (saliency + base.epsilon))

    no_mask, same_alpha = plan_anchors(vector, gradient, dataclasses.replace(base, saliency_mask=False))
    assert no_mask.eq(1).all()
    torch.testing.assert_close(same_alpha, alpha)

    grad_mask, _ = plan_anchors(vector, gradient, dataclasses.replace(base, score="gradient"))
    mag_mask, _ = plan_anchors(vector, gradient, dataclasses.replace(base, score="magnitude"))
    rand_mask, _ = plan_anchors(vector, gradient, dataclasses.replace(base, score="random"))
    assert grad_mask.tolist() == anchor_mask(gradient.abs(), 70).tolist()
    assert mag_mask.tolist() == anchor_mask(vector.abs(), 70).tolist()
    assert len({tuple(m.tolist()) for m in (mask, grad_mask, mag_mask)}) == 3
    assert int(rand_mask.sum()) == int(mask.sum())
    again, _ = plan_anchors(vector, gradient, dataclasses.replace(base, score="random"))
    assert torch.equal(again, rand_mask)  # seeded


@pytest.fixture
def tiny_problem(tmp_path):
    model, tokenizer = load_model("tiny-llama")
    hp = load_hparams("rome-eac", model)
    ctx = EditContext(model, tokenizer, cache_dir=tmp_path, second_moments=moments(model, [hp.layer]),
                      optimiser=AnchoredOptimiser(hp.eac))  # as the Editor builds it for rome-eac
    problem = TargetProblem(model, tokenizer, REQUESTS[0], hp.layer, ctx.context_templates(hp), init_from="mlp",
                            config=hp.target_config())
    return model, tokenizer, hp, ctx, problem


def test_non_anchor_dimensions_of_the_delta_are_exactly_zero(tiny_problem):
    _, _, hp, _, problem = tiny_problem
    result, extra = optimise_with_anchors(problem, hp.eac)
    nonzero = int((result.delta != 0).sum())
    assert 0 < extra["anchors"] < problem.v_init.numel()
    assert nonzero <= extra["anchors"]
    expected_anchors = round((1 - hp.eac.gamma_percentile / 100) * problem.v_init.numel())
    assert abs(extra["anchors"] - expected_anchors) <= 1


def test_elastic_net_flag_adds_exactly_the_scored_penalty(tiny_problem):
    _, _, hp, _, problem = tiny_problem
    from workers.editing.targets import optimise_delta

    probe = optimise_delta(problem, num_steps=hp.eac.probe_steps, record_gradients=True)
    mask, alpha = plan_anchors(problem.v_init + probe.delta, probe.gradients[-1], hp.eac)
    start = probe.delta * mask
    with_net, with_extra = optimise_with_anchors(problem, hp.eac)
    without, without_extra = optimise_with_anchors(problem, dataclasses.replace(hp.eac, elastic_net=False))
    assert with_extra == without_extra  # same anchors: the probe is deterministic
    plain = float(problem.loss(start).total)
    penalty = float(elastic_net(alpha, hp.eac.l1_weight, hp.eac.l2_weight)(start))
    assert without.losses[0] == pytest.approx(plain, rel=1e-5)
    assert with_net.losses[0] == pytest.approx(plain + penalty, rel=1e-5)


def test_all_zero_gradient_gives_no_anchors_and_no_change(tiny_problem, monkeypatch):
    _, _, hp, _, problem = tiny_problem
    import workers.editing.eac as eac_module

    real = eac_module.optimise_delta

    def probe_with_zero_gradient(*args, **kwargs):
        result = real(*args, **kwargs)
        if kwargs.get("record_gradients"):
            result.gradients = [torch.zeros_like(g) for g in result.gradients]
        return result

    monkeypatch.setattr(eac_module, "optimise_delta", probe_with_zero_gradient)
    result, extra = optimise_with_anchors(problem, hp.eac)
    assert extra["anchors"] == 0 and torch.equal(result.delta, torch.zeros_like(result.delta))


def test_rome_eac_reports_anchor_counts(tiny_problem):
    model, tokenizer, hp, ctx, _ = tiny_problem
    delta, info = apply_rome(model, tokenizer, [REQUESTS[1]], hp, ctx, method="rome-eac")
    assert info.anchors is not None and info.delta_norm_before is not None
    assert delta.method == "rome-eac"


def test_retrain_stops_early_on_the_plain_loss_like_the_base(tiny_problem):
    """The elastic net is part of the retrain's objective but not of the stopping rule: once the plain
    target loss is below early_stop_loss the retrain stops, as the base optimiser would."""
    _, _, hp, _, problem = tiny_problem
    from workers.editing.targets import optimise_delta

    start = torch.full_like(problem.v_init, 1e-3)
    plain = float(problem.loss(start).total)
    problem.config = dataclasses.replace(problem.config, early_stop_loss=plain * 2)
    heavy = elastic_net(torch.full_like(problem.v_init, 1e9), l1_weight=1.0, l2_weight=0.0)
    result = optimise_delta(problem, num_steps=5, init=start, penalty=heavy)
    assert result.steps == 1
    assert result.losses[0] > problem.config.early_stop_loss  # the objective itself is far above it
    torch.testing.assert_close(result.delta, start)  # an early stop makes no update
