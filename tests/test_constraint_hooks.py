"""Constraints wrap the base methods through the registry's hooks (issue 30): the Editor builds the
constraint's target optimiser and hands it to the edit context, the bases ask it only what it does;
AlphaEdit's running state is its own object; a delta carries its layer through a saved log."""

import dataclasses

import pytest
import torch

from workers.data import EditRequest
from workers.editing import EditLog, Editor, load_hparams, methods
from workers.editing.alphaedit import AlphaEditState
from workers.editing.eac import AnchoredOptimiser
from workers.editing.hparams import with_overrides
from workers.editing.record import StepInfo
from workers.editing.targets import OptimisationResult, TargetOptimiser
from workers.faults import fault_point
from workers.models import arch_spec, edited_weight, load_model

REQUESTS = [
    EditRequest(0, "The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "English", "French"),
    EditRequest(1, "The official religion of Edwin of Northumbria is", "Edwin of Northumbria", "Islam", "Christianity"),
    EditRequest(2, "Apple A5 was created by", "Apple A5", "Google", "Apple"),
]


def moments(model, layers):
    return {layer: torch.eye(edited_weight(model, arch_spec(model).mlp_out_name(layer)).shape[1]) for layer in layers}


class CountingOptimiser(TargetOptimiser):
    """The plain optimiser, counting how the base calls it and reporting a measure per request."""

    def __init__(self, settings, batches: bool):
        self.batches, self.calls = batches, []

    def optimise(self, problem):
        self.calls.append(("one", problem.n))
        result, _ = super().optimise(problem)
        return result, {"anchors": 3}

    def optimise_batch(self, problem):
        self.calls.append(("batch", problem.n))
        results, _ = super().optimise_batch(problem)
        return results, [{"anchors": 5} for _ in results]


@pytest.mark.parametrize("batches", [True, False])
def test_the_editor_hands_the_constraints_optimiser_to_the_base(batches, tmp_path, monkeypatch):
    """A constraint's optimiser replaces the plain one in MEMIT, which asks it only whether it batches;
    what it reports per request lands in the step's record."""
    model, tokenizer = load_model("tiny-llama")
    built = []

    def build(settings):
        built.append(CountingOptimiser(settings, batches))
        return built[-1]

    monkeypatch.setitem(methods.CONSTRAINTS, "eac", dataclasses.replace(methods.CONSTRAINTS["eac"], optimise=build))
    hp = with_overrides(load_hparams("memit-eac", model), {"layers": (1, 2), "num_steps": 2})
    editor = Editor(model, tokenizer, "memit-eac", hp, cache_dir=tmp_path, second_moments=moments(model, hp.layers))
    assert editor.ctx.optimiser is built[0]
    record = editor.edit_step(REQUESTS[:2])
    assert not record.skipped
    assert built[0].calls == ([("batch", 2)] if batches else [("one", 1), ("one", 1)])
    assert record.anchors == (5 if batches else 3)


def test_ft_takes_the_elastic_net_from_the_eac_optimiser(tmp_path):
    """FT has no target vector: EAC reaches it as the optimiser's penalty on the weight update
    (λ‖D‖₁ + μ‖D‖², Eq. 4 with every α_i = 1), and a heavy λ shrinks the update."""
    model, tokenizer = load_model("tiny-llama")
    plain = load_hparams("ft-m", model)
    constrained = with_overrides(load_hparams("ft-m-eac", model), {"eac.l1_weight": 1e-2, "eac.l2_weight": 0.5})
    editor = Editor(model, tokenizer, "ft-m-eac", constrained, cache_dir=tmp_path)
    assert isinstance(editor.ctx.optimiser, AnchoredOptimiser)
    update = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    assert float(editor.ctx.optimiser.weight_penalty()(update)) == pytest.approx(
        1e-2 * float(update.abs().sum()) + 0.5 * float(update.pow(2).sum()), rel=1e-6)
    with_net = editor.edit_step(REQUESTS[:1]).dw_l1
    editor.revert()
    without = Editor(model, tokenizer, "ft-m", plain, cache_dir=tmp_path).edit_step(REQUESTS[:1]).dw_l1
    assert with_net < 0.9 * without
    assert Editor(model, tokenizer, "ft-m", plain, cache_dir=tmp_path).ctx.optimiser.weight_penalty() is None


def test_a_report_naming_no_measure_of_the_record_is_refused():
    result = OptimisationResult(delta=torch.ones(2), loss=1.0, nll=1.0, steps=2)
    info = StepInfo()
    info.absorb([result, result], [{"anchors": 2}, {"anchors": 3}])
    assert info.anchors == 2 and info.steps == 4  # round(2.5): integer measures stay integers
    with pytest.raises(KeyError, match="anchor_count"):
        StepInfo().absorb([result], [{"anchor_count": 2}])


def test_a_saved_log_keeps_layer_numbers_and_an_older_log_resumes_alphaedit_alike(tmp_path):
    """The key cache is keyed on the layer each delta carries; a log saved before deltas carried it
    gets the number back from the Editor's own layers on resume (never from parsing a module name)."""
    model, tokenizer = load_model("tiny-llama")
    hp = with_overrides(load_hparams("alphaedit", model), {"layers": (1, 2), "num_steps": 2})
    editor = Editor(model, tokenizer, "alphaedit", hp, cache_dir=tmp_path, second_moments=moments(model, hp.layers))
    editor.apply(REQUESTS[:2])
    expected = editor.ctx.running_state(AlphaEditState).key_cache
    editor.log.save(tmp_path / "log.safetensors")
    saved = EditLog.load(tmp_path / "log.safetensors")
    assert [[layer.layer for layer in delta.layers] for delta in saved] == [[1, 2], [1, 2]]
    for delta in saved:  # as an older log loads
        for layer_delta in delta.layers:
            layer_delta.layer = None
    editor.resume(saved)
    resumed = editor.ctx.running_state(AlphaEditState).key_cache
    assert set(resumed) == {1, 2} and all(torch.equal(resumed[layer], expected[layer]) for layer in (1, 2))


def test_a_fault_point_must_be_a_known_place():
    with pytest.raises(ValueError, match="unknown fault point 'edits'"):
        fault_point("edits", step=0)
    fault_point("edit", step=0)  # known, and off without a plan
