"""An edit step does no avoidable work: no repeated key pass, no per-edit d × d factorisation."""

import pytest
import torch

from workers.data import EditRequest
from workers.editing.alphaedit import AlphaEditState
from workers.editing.context import EditContext
from workers.editing.delta import edited_weight
from workers.editing.hparams import with_overrides
from workers.editing import load_hparams
from workers.editing.memit import apply_memit
from workers.editing.rome import apply_rome
from workers.models import arch_spec, load_model

REQUESTS = [
    EditRequest(0, "The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "English", "French"),
    EditRequest(1, "Apple A5 was created by", "Apple A5", "Google", "Apple"),
]


def spd(dim: int, seed: int) -> torch.Tensor:
    a = torch.randn(dim, 2 * dim, generator=torch.Generator().manual_seed(seed))
    return a @ a.T / (2 * dim) + 0.1 * torch.eye(dim)


def moments(model, layers):
    """A random SPD second moment per layer, of the edited projection's input size."""
    return {l: spd(edited_weight(model, arch_spec(model).mlp_out_name(l)).shape[1], l) for l in layers}


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_memit_factorises_each_second_moment_once_not_once_per_edit(name, tmp_path, monkeypatch):
    """Two MEMIT edits over two layers: C is Cholesky-factorised once per layer, and no d_in × d_in
    system is solved per edit (the old code formed and LU-solved λC + KKᵀ at every layer of every
    edit)."""
    model, tokenizer = load_model(name)
    hp = with_overrides(load_hparams("memit", model), {"layers": (1, 2), "num_steps": 2, "mom2_update_weight": 3.0})
    ctx = EditContext(model, tokenizer, cache_dir=tmp_path, second_moments=moments(model, hp.layers))
    d_in = ctx.second_moment(1).shape[0]
    solved, factorised = [], []
    solve_ex, cholesky_ex = torch.linalg.solve_ex, torch.linalg.cholesky_ex
    monkeypatch.setattr(torch.linalg, "solve_ex", lambda a, b, **k: solved.append(tuple(a.shape)) or solve_ex(a, b, **k))
    monkeypatch.setattr(torch.linalg, "cholesky_ex",
                        lambda a, **k: factorised.append(tuple(a.shape)) or cholesky_ex(a, **k))
    for request in REQUESTS:
        apply_memit(model, tokenizer, [request], hp, ctx)
    assert factorised == [(d_in, d_in)] * 2  # one per layer, over both edits
    assert solved and all(shape[0] < d_in for shape in solved)


def test_memit_right_factor_equals_the_direct_solve(tmp_path):
    from workers.editing.memit import memit_right_factor

    model, tokenizer = load_model("tiny-llama")
    hp = with_overrides(load_hparams("memit", model), {"mom2_update_weight": 7.0})
    ctx = EditContext(model, tokenizer, cache_dir=tmp_path, second_moments=moments(model, [1]))
    c = ctx.second_moment(1).double()
    keys = torch.randn(c.shape[0], 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    direct = torch.linalg.solve(7.0 * c + keys @ keys.T, keys)
    torch.testing.assert_close(memit_right_factor(hp)(ctx, 1, keys), direct, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("residual_key", ["prompt", "mean"])
def test_rome_computes_its_keys_in_one_pass(residual_key, tmp_path):
    """One ROME edit runs the bottom layer twice: once for the keys (k* and the bare prompt's key
    together) and once for the target optimiser's set-up; every optimisation step replays the cached
    bottom layers. The old code ran a second key pass for the bare prompt's key (3 runs)."""
    model, tokenizer = load_model("tiny-llama")
    hp = with_overrides(load_hparams("rome", model), {"num_steps": 3, "residual_key": residual_key})
    ctx = EditContext(model, tokenizer, cache_dir=tmp_path, second_moments=moments(model, [hp.layer]))
    ctx.context_templates(hp)
    first_layer = model.get_submodule(arch_spec(model).layer_name(0))
    runs = []
    handle = first_layer.register_forward_hook(lambda *args: runs.append(1))
    try:
        apply_rome(model, tokenizer, [REQUESTS[0]], hp, ctx)
    finally:
        handle.remove()
    assert len(runs) == 2


def released_alphaedit_right_factor(hparams):
    """The released code's form: solve(P (K Kᵀ + K_p K_pᵀ) + α I, P K), P times the whole running sum."""
    def right(ctx, layer, keys):
        state = ctx.running_state(AlphaEditState)
        projector = state.null_space_projector(layer, hparams.null_space_threshold)
        earlier = state.key_cache.get(layer)
        gram = keys @ keys.T + (earlier if earlier is not None else 0.0)
        return torch.linalg.solve(projector @ gram + hparams.l2 * torch.eye(keys.shape[0], dtype=keys.dtype),
                                  projector @ keys)
    return right


def alphaedit_hparams(model):
    return with_overrides(load_hparams("alphaedit", model), {"layers": (1, 2), "num_steps": 2})


THREE = REQUESTS + [EditRequest(2, "The official religion of Edwin of Northumbria is", "Edwin of Northumbria",
                                "Islam", "Christianity")]


def test_alphaedit_projects_the_running_key_sum_once_per_layer_not_once_per_edit(tmp_path, monkeypatch):
    """Three AlphaEdit edits over two layers: P (d × d) is multiplied by a d × d matrix once per layer
    (after the first edit, to start P K_p K_pᵀ), not at every edit (the released form's P (K Kᵀ + K_p K_pᵀ))."""
    from workers.editing import alphaedit

    model, tokenizer = load_model("tiny-llama")
    hp = alphaedit_hparams(model)
    ctx = EditContext(model, tokenizer, cache_dir=tmp_path, second_moments=moments(model, hp.layers))
    d_in = ctx.second_moment(1).shape[0]
    state = ctx.running_state(alphaedit.AlphaEditState)
    for layer in hp.layers:
        state.null_space_projector(layer, hp.null_space_threshold)  # made before counting
    square_products = []
    real_projector = state.null_space_projector

    class CountedProjector:
        """P as the AlphaEdit code uses it (``.to(device) @ X``), noting each product with a d × d X."""

        def __init__(self, layer, threshold):
            self.layer, self.matrix = layer, real_projector(layer, threshold)

        def to(self, *args, **kwargs):
            return self

        def __matmul__(self, other):
            if other.shape == (d_in, d_in):
                square_products.append(self.layer)
            return self.matrix @ other

    counted_projector = CountedProjector
    monkeypatch.setattr(state, "null_space_projector", counted_projector)
    for request in THREE:
        alphaedit.apply_alphaedit(model, tokenizer, [request], hp, ctx)
    assert sorted(square_products) == [1, 2]


def test_alphaedit_updates_equal_the_released_form_also_after_a_resume(tmp_path, monkeypatch):
    from workers.editing import Editor, alphaedit
    from workers.editing.delta import EditLog

    model, tokenizer = load_model("tiny-llama")
    hp = alphaedit_hparams(model)
    stats = moments(model, hp.layers)

    def run(requests, resume_from=None):
        editor = Editor(model, tokenizer, "alphaedit", hp, cache_dir=tmp_path, second_moments=stats, on_error="raise")
        if resume_from is not None:
            editor.resume(resume_from)
        for request in requests:
            editor.edit_step([request])
        log = editor.log
        editor.revert()
        return log

    ours = run(THREE)
    resumed = run(THREE[2:], resume_from=EditLog(ours.deltas[:2], dict(ours.metadata)))
    monkeypatch.setattr(alphaedit, "alphaedit_right_factor", released_alphaedit_right_factor)
    released = run(THREE)
    for mine, theirs in ((ours, released), (resumed, released)):
        assert len(mine.deltas) == len(theirs.deltas) == 3
        for a, b in zip(mine.deltas, theirs.deltas):
            for la, lb in zip(a.layers, b.layers):
                torch.testing.assert_close(la.dense().double(), lb.dense().double(), rtol=1e-6, atol=1e-9)
