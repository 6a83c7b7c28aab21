"""Where the editing core must match the reference code (ROME, MEMIT, AlphaEdit, the EAC authors'
code and the EAC paper). Each test failed on the code before the fix it covers."""

from pathlib import Path

import pytest
import torch

from orchestrator.spec import load_spec
from workers.editing import EditLog, Editor, load_hparams
from workers.editing import alphaedit as alphaedit_module
from workers.editing import context as context_module
from workers.editing import templates as templates_module
from workers.editing.alphaedit import apply_alphaedit
from workers.editing.eac import optimise_with_anchors
from workers.editing.hparams import EACHParams, RomeHParams, authors_eac_overrides, with_overrides
from workers.editing.keys import at_subject, template_weights
from workers.editing.rome import apply_rome
from workers.editing.errors import EditFailure
from workers.editing.targets import TargetProblem
from workers.models import arch_spec, edited_weight, get_module, load_model

from test_editing import REQUESTS, context, moments

CONFIGS = Path(__file__).resolve().parent.parent / "experiments" / "configs"


# ---- item 1: context templates once per trajectory, from the unedited model ---------------------

def test_templates_are_generated_once_from_the_unedited_model_and_survive_resume(tmp_path, monkeypatch):
    model, tokenizer = load_model("tiny-llama")
    hp = load_hparams("rome", model)
    generations, fingerprints = [], []
    real_generate, real_fingerprint = templates_module.generate_context_templates, context_module.weights_fingerprint
    monkeypatch.setattr(templates_module, "generate_context_templates",
                        lambda *a, **k: generations.append(1) or real_generate(*a, **k))
    monkeypatch.setattr(context_module, "weights_fingerprint",
                        lambda m: fingerprints.append(1) or real_fingerprint(m))
    unedited = real_generate(model, tokenizer, hp.context_template_lengths, hp.context_seed)

    editor = Editor(model, tokenizer, "rome", hp, cache_dir=tmp_path, second_moments=moments(model, [hp.layer]))
    assert len(fingerprints) == 1  # the base model's, at construction
    log = editor.apply([REQUESTS[i % 3] for i in range(4)])
    assert not any(r.skipped for r in editor.records)
    assert len(fingerprints) == 1 and len(generations) == 1
    assert len(list((tmp_path / "context_templates").iterdir())) == 1
    assert editor.ctx.context_templates(hp) == ["{}"] + unedited

    # A resumed trajectory (fresh process: same base weights, same cache) gets the same templates.
    path = log.save(tmp_path / "log.safetensors")
    fresh, _ = load_model("tiny-llama")
    resumed = Editor(fresh, tokenizer, "rome", hp, cache_dir=tmp_path, second_moments=moments(fresh, [hp.layer]))
    resumed.resume(EditLog.load(path))
    assert resumed.ctx.context_templates(hp) == ["{}"] + unedited
    assert len(generations) == 1


# ---- item 2: ROME's residual includes GPT-2's Conv1D bias --------------------------------------

@pytest.mark.parametrize("residual_key", ["prompt", "mean"])
def test_rome_on_gpt2_with_a_bias_writes_v_star_at_the_residual_key(residual_key, tmp_path):
    model, tokenizer = load_model("tiny-gpt2")
    hp = with_overrides(load_hparams("rome", model), {"residual_key": residual_key})
    module_name = arch_spec(model).mlp_out_name(hp.layer)
    module = get_module(model, module_name)
    with torch.no_grad():
        module.bias.copy_(torch.randn(module.bias.shape, generator=torch.Generator().manual_seed(1)))
    ctx = context(model, tokenizer, [hp.layer], tmp_path)
    templates = ctx.context_templates(hp) if residual_key == "mean" else ["{}"]
    key = at_subject(model, tokenizer, [REQUESTS[0]], module_name, templates, inputs=True)[0]
    _, info = apply_rome(model, tokenizer, [REQUESTS[0]], hp, ctx)
    with torch.no_grad():
        output = module(key.unsqueeze(0))[0]
    torch.testing.assert_close(output, info.targets[0], rtol=1e-4, atol=1e-4)


# ---- item 3: EAC's μ is the optimiser's weight decay; no extra squared term by default ---------

def test_eac_mu_is_the_weight_decay_and_no_second_squared_term():
    assert EACHParams().l2_weight == 0.0
    paper_mu = {"gpt2-xl": 0.5, "llama3-8b": 1e-3}
    for model, mu in paper_mu.items():
        for method in ("rome-eac", "memit-eac"):
            hp = load_hparams(method, model)
            assert hp.eac.l2_weight == 0.0, (method, model)
            assert hp.weight_decay == mu, (method, model)
    # The base methods keep their published weight decay (MEMIT LLaMA-3-8B: 0.5).
    assert load_hparams("memit", "llama3-8b").weight_decay == 0.5
    for method in ("rome-eac", "memit-eac", "alphaedit-eac"):
        assert load_hparams(method, "smollm2-135m").eac.l2_weight == 0.0
    # Still reachable by configuration.
    assert load_hparams("rome-eac", "gpt2-xl", overrides={"eac.l2_weight": 0.5}).eac.l2_weight == 0.5


def test_eac_yaml_base_section_errors_name_the_file(tmp_path, monkeypatch):
    from workers.editing import methods as methods_module

    for part in ("rome", "eac/rome"):
        (tmp_path / part).mkdir(parents=True)
    (tmp_path / "rome" / "tiny.yaml").write_text("layer: 1\n")
    (tmp_path / "eac" / "rome" / "tiny.yaml").write_text("base: {weight_decy: 0.1}\nprobe_steps: 2\n")
    monkeypatch.setattr(methods_module, "HPARAMS_DIR", tmp_path)
    with pytest.raises(ValueError, match=r"eac/rome/tiny.yaml: base: unknown field\(s\) \['weight_decy'\]"):
        load_hparams("rome-eac", "tiny")


# ---- item 4: CounterFact paper configs use the CounterFact γ (Table 2) --------------------------

@pytest.mark.parametrize("config, gamma", [("counterfact-gpt2-xl.yaml", {"rome-eac": 85, "memit-eac": 85}),
                                           ("counterfact-llama3-8b.yaml", {"rome-eac": 95, "memit-eac": 95}),
                                           ("zsre-gpt2-xl.yaml", {"rome-eac": 80, "memit-eac": 80}),
                                           ("zsre-llama3-8b.yaml", {"rome-eac": 90, "memit-eac": 95})])
def test_paper_configs_use_the_gamma_of_their_data_set(config, gamma, data_root):
    spec = load_spec(CONFIGS / config, check_models=False)
    seen = {}
    for trajectory in spec.trajectories():
        if trajectory.variant.method in gamma:
            seen[trajectory.variant.method] = trajectory.resolved_hparams["eac"]["gamma_percentile"]
    assert seen == gamma


# ---- item 5: MEMIT/AlphaEdit keys are MEMIT's two-level mean; ROME's stays uniform ---------------

def test_memit_family_keys_are_half_bare_prompt_half_generated_templates(tmp_path):
    model, tokenizer = load_model("tiny-llama")
    hp = with_overrides(load_hparams("alphaedit", model), {"layers": (1,)})
    ctx = context(model, tokenizer, [1], tmp_path)
    module = arch_spec(model).mlp_out_name(1)
    templates = ctx.context_templates(hp)
    assert len(templates) > 2
    bare = at_subject(model, tokenizer, REQUESTS[:2], module, ["{}"], inputs=True)
    generated = at_subject(model, tokenizer, REQUESTS[:2], module, templates[1:], inputs=True)
    uniform = at_subject(model, tokenizer, REQUESTS[:2], module, templates, inputs=True)
    delta, _ = apply_alphaedit(model, tokenizer, REQUESTS[:2], hp, ctx)
    stored = delta.layers[0].keys.T  # (n, d_in)
    torch.testing.assert_close(stored, 0.5 * bare + 0.5 * generated, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(stored, uniform, rtol=1e-3, atol=1e-4)
    assert template_weights(["{}"]) == [1.0]


# ---- item 6: a failed AlphaEdit step rolls back the key cache with the weights ------------------

def test_failed_alphaedit_step_restores_the_key_cache(tmp_path, monkeypatch):
    model, tokenizer = load_model("tiny-llama")
    hp = load_hparams("alphaedit", model)
    editor = Editor(model, tokenizer, "alphaedit", hp, cache_dir=tmp_path, second_moments=moments(model, hp.layers))
    assert not editor.edit_step(REQUESTS[:1]).skipped
    state = editor.ctx.running_state(alphaedit_module.AlphaEditState)
    cache = {layer: gram.clone() for layer, gram in state.key_cache.items()}
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    real = alphaedit_module.remember_keys

    def remember_then_fail(ctx, delta):
        real(ctx, delta)
        raise EditFailure("injected after remember_keys")

    monkeypatch.setattr(alphaedit_module, "remember_keys", remember_then_fail)
    record = editor.edit_step(REQUESTS[1:2])
    assert record.skipped and "injected" in record.error
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    assert set(state.key_cache) == set(cache)
    assert all(torch.equal(state.key_cache[l], cache[l]) for l in cache)


# ---- item 7: the authors' step counts and MEMIT-EAC's retrain from zero ------------------------

def count_adam_updates(monkeypatch) -> list:
    updates = []
    real = torch.optim.Adam.step

    def step(self, *args, **kwargs):
        updates.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    return updates


@pytest.mark.parametrize("authors_loops", [False, True])
def test_eac_adam_updates_per_phase(authors_loops, tmp_path, monkeypatch):
    model, tokenizer = load_model("tiny-llama")
    hp = with_overrides(load_hparams("rome-eac", model), {"early_stop_loss": 0.0, "eac.probe_steps": 4,
                                                            "eac.retrain_steps": 3,
                                                            "eac.authors_loops": authors_loops})
    ctx = context(model, tokenizer, [hp.layer], tmp_path)
    problem = TargetProblem(model, tokenizer, REQUESTS[0], hp.layer, ctx.context_templates(hp), init_from="mlp",
                            config=hp.target_config())
    updates = count_adam_updates(monkeypatch)
    result, _ = optimise_with_anchors(problem, hp.eac)
    # ROME's compute_v loop: the last evaluation makes no update; the authors' loops update every step.
    assert len(updates) == (4 + 3 if authors_loops else 3 + 2)
    assert result.steps == 4 + 3


def test_authors_memit_eac_retrains_from_zero_with_the_authors_loops(tmp_path):
    overrides = authors_eac_overrides("memit")
    hp = load_hparams("memit-eac", "tiny", overrides=overrides)
    assert hp.eac.retrain_init == "zero" and hp.eac.authors_loops
    assert (hp.eac.score_vector, hp.eac.gradient, hp.eac.anchor_rule) == ("delta", "mean", "top_fraction")
    rome = load_hparams("rome-eac", "tiny", overrides=authors_eac_overrides("rome"))
    assert rome.eac.retrain_init == "probe" and not rome.eac.elastic_net
    model, tokenizer = load_model("tiny-llama")
    ctx = context(model, tokenizer, list(hp.layers), tmp_path)
    problem = TargetProblem(model, tokenizer, REQUESTS[0], hp.layers[-1], ctx.context_templates(hp),
                            init_from="residual", config=hp.target_config())
    result, _ = optimise_with_anchors(problem, hp.eac)
    # The retrain's first evaluation is at δ = 0 (its elastic net is 0 there).
    zero = float(problem.loss(torch.zeros_like(problem.v_init)).total)
    assert result.losses[0] == pytest.approx(zero, rel=1e-5)


# ---- item 8: ROME's residual key defaults to the bare prompt's, as the reference code -------------

def test_rome_default_residual_key_is_the_bare_prompt(tmp_path):
    assert RomeHParams().residual_key == "prompt"
    for model in ("gpt2-xl", "llama3-8b", "llama2-13b", "smollm2-135m", "tiny"):
        for method in ("rome", "rome-eac"):
            assert load_hparams(method, model).residual_key == "prompt", (method, model)
    model, tokenizer = load_model("tiny-llama")
    hp = load_hparams("rome", model)
    ctx = context(model, tokenizer, [hp.layer], tmp_path)
    module = arch_spec(model).mlp_out_name(hp.layer)
    bare = at_subject(model, tokenizer, [REQUESTS[0]], module, ["{}"], inputs=True)[0]
    k_star = at_subject(model, tokenizer, [REQUESTS[0]], module, ctx.context_templates(hp), inputs=True)[0]
    _, info = apply_rome(model, tokenizer, [REQUESTS[0]], hp, ctx)
    after = edited_weight(model, module)
    torch.testing.assert_close(after @ bare, info.targets[0], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(after @ k_star, info.targets[0], rtol=1e-3, atol=1e-3)
