"""Issue 12, item 1: an edit log is bound to the base weights, requests and hyper-parameters it was
made from, and a delta touches nothing but an edited projection, with the right shape, finite."""

import dataclasses

import pytest
import torch

from orchestrator.driver import Driver
from orchestrator.spec import spec_from_dict
from orchestrator.store import Store
from workers import actors
from workers.actors import Replica, TrajectoryRunner, TrajectoryTask
from workers.data import load_edit_dataset
from workers.editing import load_hparams
from workers.editing.delta import DeltaError, EditLog, LayerDelta, LogMismatch, WeightDelta, log_binding
from workers.models import load_model, mlp_out_weight


@pytest.fixture
def gpt2():
    return load_model("tiny-gpt2")[0]


@pytest.mark.parametrize("module, shape, fill, problem", [
    ("transformer.wte", None, 0.1, "not an MLP output projection"),
    ("transformer.h.0.attn.c_proj", None, 0.1, "not an MLP output projection"),
    ("transformer.h.0.mlp.c_proj", (1, 1), 0.1, "shape"),  # would broadcast over the whole matrix
    ("transformer.h.0.mlp.c_proj", None, float("nan"), "non-finite"),
])
def test_a_delta_that_is_not_an_edit_of_an_edited_matrix_is_refused(gpt2, module, shape, fill, problem):
    before = {name: p.clone() for name, p in gpt2.named_parameters()}
    out, inp = mlp_out_weight(gpt2, 0).shape
    left = torch.full(shape or (out, inp), fill)
    with pytest.raises(DeltaError, match=problem):
        WeightDelta([LayerDelta(module, left)]).apply(gpt2)
    assert all(torch.equal(before[name], p) for name, p in gpt2.named_parameters())


def test_a_well_formed_delta_still_applies(gpt2):
    out, inp = mlp_out_weight(gpt2, 1).shape
    before = mlp_out_weight(gpt2, 1).clone()
    LayerDelta("transformer.h.1.mlp.c_proj", torch.ones(out, 1), torch.ones(inp, 1)).apply(gpt2)
    assert torch.equal(mlp_out_weight(gpt2, 1), before + 1)


def task_for(tmp_path, requests, **changes):
    task = TrajectoryTask("t", Replica("tiny-gpt2"), "rome", load_hparams("rome", "tiny-gpt2"), tuple(requests), 1,
                          (1, 2), 0,
                          str(tmp_path / "log.safetensors"), str(tmp_path / "cache"), "")
    return dataclasses.replace(task, **changes)


@pytest.fixture(scope="module")
def saved_log(tmp_path_factory, data_root):
    """A two-step ROME trajectory on tiny-gpt2 run to the end: its log saved at 1 and 2 edits."""
    directory = tmp_path_factory.mktemp("binding")
    requests = load_edit_dataset("counterfact", data_root)[:2]
    task = task_for(directory, requests, data_root=str(data_root))
    events = list(TrajectoryRunner(task).run())
    assert len(events) == 4
    return task


def resume(task, start_step=1):
    return list(TrajectoryRunner(task).run(start_step))


def test_the_log_records_base_fingerprint_requests_and_hparams(saved_log):
    binding = EditLog.load(saved_log.log_path).metadata["binding"]
    assert binding["case_ids"] == [str(r.case_id) for r in saved_log.requests]
    assert set(binding) == {"case_ids", "requests_digest", "request_digests", "hparams_digest", "base_fingerprint"}
    assert len(resume(saved_log)) == 2  # the same inputs resume


def test_resuming_onto_other_base_weights_is_refused(saved_log, monkeypatch):
    def other_seed(name, **kwargs):
        from workers.models import build_tiny_model

        model, tokenizer = build_tiny_model(name, seed=1)
        return model.requires_grad_(False).eval(), tokenizer

    monkeypatch.setattr(actors, "load_model", other_seed)
    with pytest.raises(LogMismatch, match="base fingerprint"):
        resume(saved_log)


def test_resuming_with_other_requests_or_hparams_is_refused(saved_log):
    other = [dataclasses.replace(saved_log.requests[0], target_new="Berlin"), saved_log.requests[1]]
    with pytest.raises(LogMismatch, match="requests digest") as error:
        resume(dataclasses.replace(saved_log, requests=tuple(other)))
    assert "case ids" not in str(error.value)
    swapped = tuple(reversed(saved_log.requests))
    with pytest.raises(LogMismatch, match="case ids \\(request 0"):
        resume(dataclasses.replace(saved_log, requests=swapped))
    with pytest.raises(LogMismatch, match="hparams digest"):
        resume(dataclasses.replace(saved_log, hparams=dataclasses.replace(saved_log.hparams, num_steps=3)))


def test_the_driver_refuses_a_mismatched_log_before_ray_starts(tmp_path, data_root):
    spec = spec_from_dict({"experiment": "x", "models": ["tiny-gpt2"], "methods": ["rome"],
                           "datasets": ["counterfact"], "n_edits": 2, "selection": "first"})
    driver = Driver(spec, Store(tmp_path / "store"), progress=False, data_root=data_root)
    (trajectory,) = driver.plan()
    stranger = load_edit_dataset("counterfact", data_root)[5:7]
    log = EditLog(metadata={"steps_done": 1, "delta_steps": [],
                            "binding": log_binding(stranger, spec.trajectories()[0].resolved_hparams)})
    log.save(trajectory.task.log_path)
    with pytest.raises(LogMismatch, match="case ids .*requests digest"):
        driver.plan()
