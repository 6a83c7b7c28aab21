"""Issue 36, item 1: an edit log carries a digest of its own content beside the digests of the base
model and requests it was made from, and every reader — ``EditLog.load``, ``eac eval``, the
evaluation actors, resume and planning — verifies all three and refuses with one line naming the
file and what differs. No Ray: each reader is called as the actors call it."""

import json

import pytest
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from log_tampering import reheadered
from orchestrator import cli
from workers.actors import CheckpointEvaluator
from workers.data import EditRequest
from workers.editing.delta import (DeltaError, EditLog, LayerDelta, LegacyLogWarning, LogMismatch, WeightDelta,
                                   log_binding, safetensors_metadata)
from workers.models import arch_spec, build_tiny_model, edited_weight, weights_fingerprint

RECORD = {"prompt": "The capital of France is", "subject": "France", "target_new": "Rome",
          "ground_truth": "Paris", "rephrase_prompt": "France's capital is", "locality_prompt": "Spain's capital is",
          "locality_ground_truth": "Madrid"}
ZSRE = {"src": "What is the capital of France?", "subject": "France", "alt": "Rome",
        "rephrase": "France's capital?", "loc": "nq question: who?", "loc_ans": "me", "answers": ["Paris"]}


def bound_log(model, requests, steps=2, seed=0) -> EditLog:
    """A log of ``steps`` rank-one steps on layer 0's MLP output projection, bound as `eac run` binds."""
    module = arch_spec(model).mlp_out_name(0)
    out, inp = edited_weight(model, module).shape
    generator = torch.Generator().manual_seed(seed)
    deltas = [WeightDelta([LayerDelta(module, 1e-2 * torch.randn(out, 1, generator=generator),
                                      torch.randn(inp, 1, generator=generator))], [r.case_id], "rome")
              for r in requests[:steps]]
    return EditLog(deltas, {"steps_done": steps, "requests_done": steps, "delta_steps": list(range(steps)),
                            "binding": log_binding(requests, {"layer": 0}, weights_fingerprint(model))})


def rewrite(path, tensors=None, metadata=None):
    """The saved log with its tensors and/or metadata changed and its header (digest too) kept."""
    path.write_bytes(reheadered(path.read_bytes(), tensors, metadata, str(path)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    directory = tmp_path_factory.mktemp("digest")
    data = directory / "edits.json"
    data.write_text(json.dumps([{"case_id": i, **RECORD, "target_new": f"Rome{i}"} for i in range(3)]))
    from workers.data import load_edit_dataset

    requests = load_edit_dataset(str(data))
    model, _ = build_tiny_model("tiny-gpt2")
    return directory, data, requests, model


def saved(setup, name="log.safetensors", **kwargs):
    directory, _, requests, model = setup
    path = directory / name
    bound_log(model, requests, **kwargs).save(path)
    return path


TAMPERING = {
    "tensors ×50": dict(tensors=lambda t: t.update({"0.0.left": t["0.0.left"] * 50})),
    "tensors negated": dict(tensors=lambda t: t.update({"1.0.right": -t["1.0.right"]})),
    "steps_done edited": dict(metadata=lambda m: m.update(steps_done=3)),
    "delta_steps edited": dict(metadata=lambda m: m.update(delta_steps=[0, 2])),
}


@pytest.mark.parametrize("case", TAMPERING)
def test_load_refuses_a_log_whose_content_changed_under_an_intact_header(case, setup):
    path = saved(setup, f"{case}.safetensors")
    EditLog.load(path)  # intact: read
    rewrite(path, **TAMPERING[case])
    with pytest.raises(LogMismatch, match="content differs from its digest") as error:
        EditLog.load(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_a_log_without_a_content_digest_is_read_as_legacy_with_a_warning(setup):
    path = saved(setup, "legacy.safetensors")
    data = path.read_bytes()
    header = safetensors_metadata(data, path)
    legacy = {k: v for k, v in header.items() if k != "digest"} | {"format": "eac-edit-log/1"}
    path.write_bytes(save_tensors(load_tensors(data), metadata=legacy))
    with pytest.warns(LegacyLogWarning, match=str(path)):
        assert len(EditLog.load(path)) == 2
    stripped = {k: v for k, v in header.items() if k != "digest"}  # the current format without its digest
    path.write_bytes(save_tensors(load_tensors(data), metadata=stripped))
    with pytest.raises(LogMismatch, match="no content digest"):
        EditLog.load(path)


def eval_args(log, data, model="tiny-gpt2"):
    return ["eval", "--model", model, "--edit-log", str(log), "--dataset", str(data), "--tasks", "wikitext=1"]


def assert_one_line(argv, named, what, capsys):
    code = cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert str(named) in err and what in err, err


def test_eac_eval_refuses_a_tampered_log(setup, capsys):
    path = saved(setup, "eval-tampered.safetensors")
    rewrite(path, **TAMPERING["tensors ×50"])
    assert_one_line(eval_args(path, setup[1]), path, "content differs", capsys)


def test_eac_eval_refuses_a_log_made_on_other_base_weights(setup, capsys):
    directory, data, requests, _ = setup
    other, _ = build_tiny_model("tiny-gpt2", seed=1)
    path = directory / "other-base.safetensors"
    bound_log(other, requests).save(path)
    assert_one_line(eval_args(path, data), path, "base fingerprint", capsys)


def test_eac_eval_refuses_a_gpt2_log_on_a_llama_model(setup, capsys):
    path = saved(setup, "gpt2-on-llama.safetensors")
    assert_one_line(eval_args(path, setup[1], model="tiny-llama"), path, "base fingerprint", capsys)
    llama, _ = build_tiny_model("tiny-llama")
    before = {n: p.clone() for n, p in llama.named_parameters()}
    with pytest.raises(DeltaError, match="another architecture"):  # from Python: refused, nothing changed
        EditLog.load(path).replay(llama)
    assert all(torch.equal(before[n], p) for n, p in llama.named_parameters())


def test_eac_eval_refuses_records_other_than_those_the_log_edited(setup, capsys):
    directory, data, requests, model = setup
    path = saved(setup, "other-requests.safetensors")
    # The same case ids with other targets ...
    other = directory / "other-targets.json"
    other.write_text(json.dumps([{"case_id": i, **RECORD, "target_new": f"Berlin{i}"} for i in range(3)]))
    assert_one_line(eval_args(path, other), path, "other requests", capsys)
    # ... and zsRE records that share the CounterFact log's case ids 0-2.
    zsre = directory / "zsre.json"
    zsre.write_text(json.dumps([{"case_id": i, **ZSRE} for i in range(3)]))
    assert_one_line(eval_args(path, zsre), path, "other requests", capsys)


def test_the_evaluation_actor_refuses_other_requests_and_tampered_logs(setup, tmp_path, data_root):
    directory, data, requests, model = setup
    evaluator = CheckpointEvaluator(str(tmp_path / "cache"), str(data_root))
    path = saved(setup, "actor.safetensors")
    stranger = [EditRequest(1, RECORD["prompt"], RECORD["subject"], "Berlin")]
    from workers.evaluation import EvalConfig

    fields = EvalConfig.from_dict({"tasks": {"wikitext": 1}, "perplexity_window": 64, "perplexity_stride": 64},
                                  source="test")
    with pytest.raises(LogMismatch, match="other requests"):
        evaluator.evaluate("tiny-gpt2", "float32", str(path), 2, stranger, fields)
    rewrite(path, **TAMPERING["tensors negated"])
    with pytest.raises(LogMismatch, match="content differs"):
        evaluator.evaluate("tiny-gpt2", "float32", str(path), 2, list(requests[:2]), fields)
