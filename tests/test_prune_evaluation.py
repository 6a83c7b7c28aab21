"""PRUNE as its paper applies it (``prune.apply: evaluation``): the edits run unrestrained, and a
checkpoint is scored with W₀ + F(ΔW) of the accumulated update; the per-step default is unchanged.
The end-to-end run through the driver (scored and resumed) is in test_driver.py."""

import math

import numpy as np
import pytest
import torch

from tests.test_editing import REQUESTS, moments
from workers.editing import Editor, EditLog, applied, load_hparams
from workers.editing.hparams import with_overrides
from workers.editing.methods import checkpoint_rewrite, scored_weights
from workers.evaluation import EvalConfig, evaluate_checkpoint
from workers.models import edited_weight, load_model

EVALUATION = {"prune.apply": "evaluation"}


def paper_restraint(w0: np.ndarray, accumulated: np.ndarray, alpha: float) -> np.ndarray:
    """W₀ + U diag(F(σ)) Vᵀ, written out from the paper's F with numpy: σ above σ_max(W₀) becomes
    log_α σ − log_α σ_max + σ_max, the others stay."""
    u, sigma, vh = np.linalg.svd(accumulated, full_matrices=False)
    sigma_max = np.linalg.svd(w0, compute_uv=False)[0]
    mapped = np.where(sigma > sigma_max, np.log(sigma) / math.log(alpha) - np.log(sigma_max) / math.log(alpha)
                      + sigma_max, sigma)
    return w0 + (u * mapped) @ vh


@pytest.fixture(scope="module")
def edited(tmp_path_factory):
    """MEMIT and MEMIT-PRUNE at evaluation, three sequential edits each on tiny-gpt2 in float64 (same
    statistics, same seeds): the weights after every step, the logs, the base weights."""
    cache = tmp_path_factory.mktemp("cache")
    runs = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 64-wide matrices gain nothing from a second thread, and lose much on a busy machine
    for method, overrides in (("memit", None), ("memit-prune", EVALUATION)):
        model, tokenizer = load_model("tiny-gpt2", dtype=torch.float64)
        hparams = with_overrides(load_hparams(method, model), overrides)
        editor = Editor(model, tokenizer, method, hparams, cache_dir=cache,
                        second_moments=moments(model, list(hparams.layers)))
        base = {m: editor.base.original(m).clone() for m in editor.modules}
        steps = []
        torch.manual_seed(0)
        editor.apply(REQUESTS, on_edit=lambda record: steps.append(
            {m: edited_weight(model, m).clone() for m in editor.modules}))
        runs[method] = dict(model=model, tokenizer=tokenizer, editor=editor, hparams=hparams, base=base, steps=steps)
    torch.set_num_threads(threads)
    return runs


def test_at_evaluation_the_trajectory_edits_exactly_as_the_unconstrained_base(edited):
    plain, prune = edited["memit"], edited["memit-prune"]
    assert prune["hparams"].prune.apply == "evaluation" and len(prune["steps"]) == len(REQUESTS)
    for step, (theirs, mine) in enumerate(zip(plain["steps"], prune["steps"])):
        for module in theirs:
            assert torch.equal(theirs[module], mine[module]), f"step {step}, {module}"
    # The log holds what the base wrote, one delta per edited matrix and step: no correction.
    assert all(len(delta.layers) == len(prune["editor"].modules) for delta in prune["editor"].log)
    # The accumulated update is above the bound here, so a per-step PRUNE would have changed the weights.
    w0 = prune["base"]
    assert any(torch.linalg.matrix_norm(prune["steps"][-1][m] - w0[m], ord=2) >
               torch.linalg.matrix_norm(w0[m], ord=2) for m in w0)


def test_a_checkpoint_is_scored_with_the_restrained_accumulated_update(edited, tmp_path):
    run = edited["memit-prune"]
    model, editor, alpha = run["model"], run["editor"], run["hparams"].prune.alpha
    path = editor.log.save(tmp_path / "log.safetensors")
    editor.revert()
    log = EditLog.load(path)  # what an evaluator reads: the settings come from the log
    restrained = []
    for steps in range(1, len(REQUESTS) + 1):  # every checkpoint, each from the log's first steps
        expected = {m: paper_restraint(w0.numpy(), (run["steps"][steps - 1][m] - w0).numpy(), alpha)
                    for m, w0 in run["base"].items()}
        with applied(model, log[:steps]):  # the log replays the trajectory's unrestrained weights exactly
            assert all(torch.equal(edited_weight(model, m), run["steps"][steps - 1][m]) for m in expected)
        with scored_weights(model, log[:steps]):
            for module, weight in expected.items():
                assert np.allclose(edited_weight(model, module).numpy(), weight, rtol=0, atol=1e-12), module
            restrained.append(any(not torch.equal(edited_weight(model, m), run["steps"][steps - 1][m])
                                  for m in expected))
        assert all(torch.equal(edited_weight(model, m), w0) for m, w0 in run["base"].items())  # restored
    # Under the bound the scored weights are the trajectory's; once it is reached (here at the last
    # step), they are not.
    assert restrained[-1], restrained

    # The evaluator scores those weights: its deviation rows measure W₀ + F(ΔW), not the replayed log.
    config = EvalConfig(tasks={}, edit_metrics=("toolkit",), drift_examples=0, progress=False)
    rows = evaluate_checkpoint(model, run["tokenizer"], log, list(REQUESTS), config)
    spectral = {r.task.removeprefix("deviation/"): r.value for r in rows if r.metric == "update_spectral_relative"}
    for module, w0 in run["base"].items():
        w0 = w0.numpy()
        update = paper_restraint(w0, (run["steps"][-1][module].numpy() - w0), alpha) - w0
        relative = np.linalg.norm(update, ord=2) / np.linalg.norm(w0, ord=2)
        assert spectral[module] == pytest.approx(relative, rel=1e-9)


def test_per_step_prune_is_the_default_and_its_checkpoints_are_scored_as_replayed():
    hparams = load_hparams("memit-prune", "tiny")
    assert hparams.prune.apply == "step"
    log = EditLog(metadata={"method": "memit-prune", "hparams": {"prune": {"alpha": 1000.0}}})  # an older log
    assert checkpoint_rewrite(log) is None
    assert checkpoint_rewrite(EditLog()) is None  # a log that names no method
    assert checkpoint_rewrite(EditLog(metadata={"method": "memit", "hparams": {}})) is None
    with pytest.raises(ValueError, match=r"memit-prune records no 'prune' settings"):
        checkpoint_rewrite(EditLog(metadata={"method": "memit-prune", "hparams": {}}))
    with pytest.raises(ValueError, match=r"field 'prune.apply': 'always' is not one of \['step', 'evaluation'\]"):
        load_hparams("rome-prune", "tiny", overrides={"prune.apply": "always"})


def test_the_setting_is_asked_for_in_a_spec_and_leaves_the_other_ids_alone(tmp_path):
    from orchestrator.spec import SpecError, spec_from_dict
    from tests.test_spec import good_spec

    variant = {"name": "memit-prune-eval", "method": "memit-prune", "hparams": EVALUATION}
    spec = spec_from_dict(good_spec(methods=["memit-prune", variant], hparams={}), check_data=False)
    per_step, at_evaluation = [t for t in spec.trajectories() if t.seed == 0]
    assert at_evaluation.hparams.prune.apply == "evaluation" and per_step.hparams.prune.apply == "step"
    # The id and the log binding hash the settings PRUNE had before the switch existed, unless it is set.
    assert per_step.resolved_hparams["prune"] == {"alpha": 1000.0}
    assert at_evaluation.resolved_hparams["prune"] == {"alpha": 1000.0, "apply": "evaluation"}
    assert per_step.trajectory_id != at_evaluation.trajectory_id
    bad = {**variant, "hparams": {"prune.apply": "at-the-end"}}
    with pytest.raises(SpecError, match=r"'methods\[0\].hparams.prune.apply'.*not one of"):
        spec_from_dict(good_spec(methods=[bad], hparams={}), check_data=False)
