"""The editing core on tiny models: exact algebra of each update, sequential logs, faults."""

import pytest
import torch

from orchestrator.store import edit_row
from workers.data import EditRequest
from workers.editing import Editor, load_hparams
from workers.editing.alphaedit import AlphaEditState, apply_alphaedit
from workers.editing.context import EditContext
from workers.editing.hparams import with_overrides
from workers.editing.keys import at_subject, template_weights
from workers.editing.memit import apply_memit
from workers.editing.rome import apply_rome
from workers.models import arch_spec, edited_weight, load_model
from replay_check import assert_revert_and_replay_are_bit_exact

REQUESTS = [
    EditRequest(0, "The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "English", "French"),
    EditRequest(1, "The official religion of Edwin of Northumbria is", "Edwin of Northumbria", "Islam", "Christianity"),
    EditRequest(2, "Apple A5 was created by", "Apple A5", "Google", "Apple"),
]
MODELS = ["tiny-gpt2", "tiny-llama"]


def split_moment(dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An SPD second moment whose first half of directions is "preserved knowledge" (eigenvalue 5)
    and whose other half lies below AlphaEdit's null-space threshold; returns (C, preserved basis)."""
    basis, _ = torch.linalg.qr(torch.randn(dim, dim, generator=torch.Generator().manual_seed(seed)))
    eigenvalues = torch.cat([torch.full((dim // 2,), 5.0), torch.full((dim - dim // 2,), 1e-3)])
    return (basis * eigenvalues) @ basis.T, basis[:, : dim // 2]


def key_dim(model, layer: int) -> int:
    return edited_weight(model, arch_spec(model).mlp_out_name(layer)).shape[1]


def moments(model, layers, seed=0, identity=False):
    return {l: torch.eye(key_dim(model, l)) if identity else split_moment(key_dim(model, l), seed + l)[0] for l in layers}


def context(model, tokenizer, layers, tmp_path, **kwargs):
    return EditContext(model, tokenizer, cache_dir=tmp_path, second_moments=moments(model, layers, **kwargs))


@pytest.mark.parametrize("name", MODELS)
def test_rome_writes_v_star_at_k_star(name, tmp_path):
    model, tokenizer = load_model(name)
    hp = with_overrides(load_hparams("rome", model), {"residual_key": "mean"})  # Eq. 7 as written
    ctx = context(model, tokenizer, [hp.layer], tmp_path)
    module = arch_spec(model).mlp_out_name(hp.layer)
    k_star = at_subject(model, tokenizer, [REQUESTS[0]], module, ctx.context_templates(hp), inputs=True)[0]
    before = edited_weight(model, module).clone()
    delta, info = apply_rome(model, tokenizer, [REQUESTS[0]], hp, ctx)
    after = edited_weight(model, module)
    v_star = info.targets[0]
    assert not torch.allclose(before @ k_star, v_star, atol=1e-3)
    torch.testing.assert_close(after @ k_star, v_star, rtol=1e-4, atol=1e-4)
    # The applied change is exactly the stored rank-one factors.
    assert delta.layers[0].rank == 1
    torch.testing.assert_close(after - before, delta.layers[0].dense(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_rome_with_identity_moment_is_the_plain_rank_one_formula(name, tmp_path):
    model, tokenizer = load_model(name)
    hp = with_overrides(load_hparams("rome", model), {"residual_key": "mean"})  # k: ROME's uniform mean
    ctx = context(model, tokenizer, [hp.layer], tmp_path, identity=True)
    module = arch_spec(model).mlp_out_name(hp.layer)
    k = at_subject(model, tokenizer, [REQUESTS[1]], module, ctx.context_templates(hp), inputs=True)[0].double()
    weight = edited_weight(model, module).double().clone()
    delta, info = apply_rome(model, tokenizer, [REQUESTS[1]], hp, ctx)
    v = info.targets[0].double()
    expected = torch.outer(v - weight @ k, k) / (k @ k)
    torch.testing.assert_close(delta.layers[0].dense().double(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_one_layer_memit_is_the_regularised_least_squares_solution(name, tmp_path):
    model, tokenizer = load_model(name)
    hp = with_overrides(load_hparams("memit", model), {"layers": (2,), "mom2_update_weight": 3.0})
    ctx = context(model, tokenizer, [2], tmp_path)
    spec = arch_spec(model)
    templates = ctx.context_templates(hp)
    keys = at_subject(model, tokenizer, REQUESTS, spec.mlp_out_name(2), templates, inputs=True,
                      weights=template_weights(templates)).double()  # (n, d_in), MEMIT's compute_ks
    z_now = at_subject(model, tokenizer, REQUESTS, spec.layer_name(2), ["{}"], inputs=False).double()  # (n, d)
    delta, info = apply_memit(model, tokenizer, REQUESTS, hp, ctx)
    residual = torch.stack(info.targets).double() - z_now  # (n, d)
    # min ‖ΔW K − R‖² + λ tr(ΔW C ΔWᵀ) as one stacked least-squares problem: [Kᵀ; √λ Lᵀ] ΔWᵀ = [Rᵀ; 0].
    chol = torch.linalg.cholesky(ctx.second_moment(2).double())
    system = torch.cat([keys, (3.0 ** 0.5) * chol.T])
    rhs = torch.cat([residual, torch.zeros(chol.shape[0], residual.shape[1], dtype=torch.float64)])
    expected = torch.linalg.lstsq(system, rhs).solution.T
    # atol 2e-5: the stored factors are float32 (one tiny-llama entry is off by 1.2e-5 with these keys).
    torch.testing.assert_close(delta.layers[0].dense().double(), expected, rtol=1e-3, atol=2e-5)
    assert delta.layers[0].rank == len(REQUESTS)


@pytest.mark.parametrize("name", MODELS)
def test_alphaedit_leaves_preserved_keys_alone(name, tmp_path):
    model, tokenizer = load_model(name)
    hp = load_hparams("alphaedit", model)
    splits = {layer: split_moment(key_dim(model, layer), layer) for layer in hp.layers}
    ctx = EditContext(model, tokenizer, cache_dir=tmp_path, second_moments={l: c for l, (c, _) in splits.items()})
    preserved = {l: basis for l, (_, basis) in splits.items()}
    delta, _ = apply_alphaedit(model, tokenizer, REQUESTS[:2], hp, ctx)
    for layer_delta, layer in zip(delta.layers, hp.layers):
        update = layer_delta.dense().double()
        assert update.norm() > 1e-6
        assert (update @ preserved[layer].double()).norm() / update.norm() < 1e-5
    # Each batch adds its keys to the running cache used by the next one.
    assert set(ctx.running_state(AlphaEditState).key_cache) == set(hp.layers)


@pytest.mark.parametrize("method", ["rome", "memit", "alphaedit", "ft-l", "ft-m"])
def test_ten_sequential_edits_revert_and_replay_bit_exactly(method, tmp_path):
    model, tokenizer = load_model("tiny-llama")
    hp = load_hparams(method, model)
    layers = [hp.layer] if hasattr(hp, "layer") else list(hp.layers)
    editor = Editor(model, tokenizer, method, hp, cache_dir=tmp_path, second_moments=moments(model, layers))
    base = {name: p.detach().clone() for name, p in model.named_parameters()}
    requests = [REQUESTS[i % 3] for i in range(10)]
    log = editor.apply(requests, batch_size=1 if method == "rome" else 2)
    assert len(log) == (10 if method == "rome" else 5) and log.n_requests() == 10
    assert not any(r.skipped for r in editor.records)
    assert_revert_and_replay_are_bit_exact(model, editor, log, base, tmp_path)


def test_edit_records_measure_the_change(tmp_path):
    model, tokenizer = load_model("tiny-gpt2")
    hp = load_hparams("rome", model)
    editor = Editor(model, tokenizer, "rome", hp, cache_dir=tmp_path, second_moments=moments(model, [hp.layer]))
    module = arch_spec(model).mlp_out_name(hp.layer)
    original = edited_weight(model, module).clone()
    record = editor.edit_step([REQUESTS[0]])
    change = (edited_weight(model, module) - original).double()
    assert record.dw_l1 == pytest.approx(float(change.abs().sum()), rel=1e-6)
    assert record.dw_fro == pytest.approx(float(change.norm()), rel=1e-6)
    assert record.relative_l1[module] == pytest.approx(
        float(edited_weight(model, module).double().abs().sum() / original.double().abs().sum()), rel=1e-9)
    assert record.seconds["total"] >= record.seconds["targets"] > 0
    row = edit_row(record)
    assert row["case_id"] == "0" and "targets" in row["seconds"]


@pytest.mark.parametrize("bad", [
    EditRequest(9, "The capital of France is", "France", "   "),
    EditRequest(9, "x" * 400 + " The capital of France is", "France", "Rome"),
])
def test_bad_requests_are_skipped_and_leave_the_model_untouched(bad, tmp_path):
    model, tokenizer = load_model("tiny-gpt2")
    hp = load_hparams("rome", model)
    editor = Editor(model, tokenizer, "rome", hp, cache_dir=tmp_path, second_moments=moments(model, [hp.layer]))
    editor.apply([REQUESTS[0]])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    record = editor.edit_step([bad])
    assert record.skipped and record.error
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    # The trajectory goes on.
    assert not editor.edit_step([REQUESTS[1]]).skipped
    assert len(editor.log) == 2
    with pytest.raises(Exception):
        Editor(model, tokenizer, "rome", hp, cache_dir=tmp_path, second_moments=moments(model, [hp.layer]),
               on_error="raise").edit_step([bad])


@pytest.mark.parametrize("fill,reason", [(float("nan"), "non-finite"), (0.0, "singular")])
def test_singular_statistics_are_a_skipped_edit(tmp_path, fill, reason):
    model, tokenizer = load_model("tiny-llama")
    hp = load_hparams("memit", model)
    broken = {l: torch.full((key_dim(model, l),) * 2, fill) for l in hp.layers}
    editor = Editor(model, tokenizer, "memit", hp, cache_dir=tmp_path, second_moments=broken)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    record = editor.edit_step(REQUESTS[:2])
    assert record.skipped and reason in record.error, record.error
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_hparams_overrides_and_errors():
    hp = load_hparams("rome-eac", "gpt2-xl", overrides={"eac.gamma_percentile": 90, "layer": 16})
    assert hp.layer == 16 and hp.eac.gamma_percentile == 90 and hp.eac.l2_weight == 0.0
    assert load_hparams("memit", "llama3-8b").mom2_update_weight == 15000
    assert load_hparams("rome", "gpt2-xl").eac is None
    with pytest.raises(ValueError, match="unknown method"):
        load_hparams("rome2", "gpt2-xl")
    with pytest.raises(ValueError, match="unknown field"):
        load_hparams("rome", "gpt2-xl", overrides={"layr": 3})
    with pytest.raises(ValueError, match="no hyper-parameters are known"):
        load_hparams("rome", "bloom-7b")
