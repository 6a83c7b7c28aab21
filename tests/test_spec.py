"""Experiment specs: validated at the door, errors name the file and the field; stable trajectory ids."""

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from orchestrator.spec import SpecError, load_spec, resolve_hparams, spec_from_dict
from workers.editing import METHODS

CONFIGS = Path(__file__).resolve().parent.parent / "experiments" / "configs"


def good_spec(**changes) -> dict:
    spec = {
        "experiment": "unit",
        "models": ["tiny-gpt2"],
        "methods": ["rome", {"name": "rome-eac-p90", "method": "rome-eac", "hparams": {"eac.gamma_percentile": 90}}],
        "datasets": ["counterfact"],
        "seeds": [0, 1],
        "n_edits": 6,
        "batch_size": 2,
        "checkpoints": [0, 2, 4],
        "evaluation": {"tasks": {"nli": 4, "sst2": 4}},
        "resources": {"trajectory": {"num_cpus": 1}, "evaluation": {"num_cpus": 1, "actors": 2}},
        "hparams": {"rome-eac": {"eac.gamma_percentile": 80, "eac.l1_weight": 5e-7}},
    }
    spec.update(changes)
    return spec


def write(tmp_path, data, name="spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_good_spec_expands_the_grid(tmp_path, data_root):
    spec = load_spec(write(tmp_path, good_spec()))
    trajectories = spec.trajectories()
    assert len(trajectories) == 1 * 2 * 1 * 2  # models × methods × datasets × seeds
    assert spec.checkpoints == (0, 2, 4, 6)  # the final model is always a checkpoint
    eac = [t for t in trajectories if t.method == "rome-eac"][0]
    # Variant overrides win over the per-method block, which still contributes its other keys.
    assert eac.variant.hparams == {"eac.gamma_percentile": 90, "eac.l1_weight": 5e-7}
    hparams = resolve_hparams(eac.model, eac.variant)  # the typed hyper-parameters the trajectory runs with
    assert hparams.eac.gamma_percentile == 90 and hparams.eac.l1_weight == 5e-7
    assert eac.variant.name == "rome-eac-p90"
    assert spec.resources.eval_actors == 2 and spec.resources.trajectory.num_gpus == 0
    assert {t.seed for t in trajectories} == {0, 1}
    assert eac.edit_checkpoints() == (2, 4, 6)


def test_hyper_parameters_are_resolved_once_per_model_and_variant_and_the_trajectories_carry_them(monkeypatch):
    """Settings typed once: the validator resolves each (model, variant) once; the trajectory ids, the
    trajectories and what the actors get reuse those objects instead of reading the YAML again."""
    from orchestrator import spec as spec_module

    calls = []
    real = spec_module.load_hparams

    def counted(method, model=None, **kwargs):
        calls.append((method, model))
        return real(method, model, **kwargs)

    monkeypatch.setattr(spec_module, "load_hparams", counted)
    spec = spec_from_dict(good_spec(evaluation={"tasks": {"wikitext": 2}}), check_data=False)
    trajectories = spec.trajectories()
    assert [t.trajectory_id for t in trajectories] and [t.resolved_hparams for t in trajectories]
    assert sorted(calls) == [("rome", "tiny-gpt2"), ("rome-eac", "tiny-gpt2")]
    eac = [t for t in trajectories if t.method == "rome-eac"]
    assert eac[0].hparams is eac[1].hparams and eac[0].hparams.eac.gamma_percentile == 90  # one object per variant
    assert spec.evaluation.config.tasks == {"wikitext": 2} and trajectories[0].evaluation.config is spec.evaluation.config


def test_trajectory_ids_are_stable_and_distinct(tmp_path, data_root):
    first = [t.trajectory_id for t in load_spec(write(tmp_path, good_spec())).trajectories()]
    again = [t.trajectory_id for t in load_spec(write(tmp_path, good_spec(), "copy.yaml")).trajectories()]
    assert first == again and len(set(first)) == len(first)
    changed = good_spec(hparams={"rome-eac": {"eac.gamma_percentile": 80, "eac.l1_weight": 1e-6}})
    other = [t.trajectory_id for t in load_spec(write(tmp_path, changed, "changed.yaml")).trajectories()]
    assert other[:2] == first[:2]  # rome's trajectories are untouched
    assert set(other[2:]).isdisjoint(first[2:])  # a new λ is new work (the variant's own γ still wins)
    more_examples = good_spec(evaluation={"tasks": {"nli": 8, "sst2": 4}})
    assert set(t.trajectory_id for t in load_spec(write(tmp_path, more_examples, "m.yaml")).trajectories()
               ).isdisjoint(first)


@pytest.mark.parametrize("change, field, words", [
    ({"methods": ["rome", "rome-eca"]}, "methods[1].method", "unknown method 'rome-eca'"),
    ({"n_edits": -3}, "n_edits", "at least 1"),
    ({"datasets": ["counterfact", "missing.json"]}, "datasets[1]", "does not exist"),
    ({"evaluation": {"tasks": {"nli": 4, "squad": 3}}}, "evaluation.tasks.squad", "unknown task"),
    ({"evaluation": {"tasks": {"nli": 0}}}, "evaluation.tasks.nli", "at least 1"),
    ({"evaluation": {"tasks": {"nli": 4}, "prompt_fromat": "raw"}}, "evaluation.prompt_fromat", "unknown field"),
    ({"methods": [{"method": "rome", "hparams_file": "none.yaml"}]}, "methods[0].hparams_file", "does not exist"),
    ({"checkpoints": [0, 3]}, "checkpoints[1]", "multiple of batch_size"),
    ({"checkpoints": [0, 9]}, "checkpoints[1]", "beyond n_edits"),
    ({"batch_size": True}, "batch_size", "expected an integer"),
    ({"n_egits": 4}, "n_egits", "unknown field"),
    ({"methods": [{"method": "rome", "hparam": {}}]}, "methods[0].hparam", "unknown field"),
    ({"methods": ["rome", {"method": "rome"}]}, "methods[1].name", "used twice"),
    ({"methods": [{"name": "x", "method": "rome", "group": "figure-9"}]}, "methods[0].group", "not one of"),
    ({"resources": {"trajectory": {"num_gpus": -1}}}, "resources.trajectory.num_gpus", "at least 0"),
    ({"hparams": {"rome": "nowhere.yaml"}}, "hparams.rome", "does not exist"),
    ({"hparams": {"rome-eac": {"eac.gamma_percentil": 80}}}, "hparams.rome-eac.eac.gamma_percentil",
     "unknown field"),
    ({"models": ["./no/such/model"]}, "models[0]", "does not exist"),
    ({"experiment": "a/b"}, "experiment", "not a name"),
])
def test_bad_spec_names_file_and_field(tmp_path, data_root, change, field, words):
    path = write(tmp_path, good_spec(**change))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert info.value.field == field
    assert str(path) in str(info.value) and repr(field) in str(info.value) and words in str(info.value)


# Issue 12, item 5: hyper-parameter values are checked against their declared types and ranges when
# the spec is loaded (they used to reach the actors and fail after the model and statistics loaded).
EAC_VARIANT = {"name": "rome-eac-p90", "method": "rome-eac"}


@pytest.mark.parametrize("change, field, words", [
    ({"hparams": {"rome": {"lr": "fast"}}}, "hparams.rome.lr", "expected a number, got 'fast'"),
    ({"hparams": {"rome": {"lr": float("nan")}}}, "hparams.rome.lr", "finite"),
    ({"hparams": {"rome": {"num_steps": -2}}}, "hparams.rome.num_steps", "at least 1"),
    ({"hparams": {"rome": {"num_steps": 2.5}}}, "hparams.rome.num_steps", "expected an integer"),
    ({"methods": ["rome", {**EAC_VARIANT, "hparams": {"eac.gamma_percentile": 500}}], "hparams": {}},
     "methods[1].hparams.eac.gamma_percentile", "below 100"),
    ({"hparams": {"rome-eac": {"eac.score": "best"}}}, "hparams.rome-eac.eac.score", "not one of ['saliency'"),
    ({"hparams": {"rome-eac": {"eac.elastic_net": "no"}}}, "hparams.rome-eac.eac.elastic_net", "true or false"),
    ({"hparams": {"rome": {"layer": 999}}}, "hparams.rome.layer", "tiny-gpt2 has 4 (layers 0-3)"),
    ({"hparams": {"rome": {"layer": -1}}}, "hparams.rome.layer", "at least 0"),
    ({"methods": ["memit"], "hparams": {"memit": {"layers": [1, 9]}}}, "hparams.memit.layers", "layer(s) [9]"),
    ({"methods": ["memit"], "hparams": {"memit": {"layers": "1,2"}}}, "hparams.memit.layers", "expected a list"),
    ({"methods": ["rome-prune"], "hparams": {"rome-prune": {"prune.alpha": 1}}}, "hparams.rome-prune.prune.alpha",
     "above 1"),
    ({"evaluation": {"tasks": {"nli": 4}, "drift_examples": -1}}, "evaluation.drift_examples", "at least 0"),
    ({"evaluation": {"tasks": {"nli": 4}, "seed": "x"}}, "evaluation.seed", "expected an integer"),
    ({"hparams": {"rome": {}, "memit": {"layers": [1]}}}, "hparams.memit", "no variant in `methods` runs"),
    ({"experiment": "e" * 121}, "experiment", "at most 120"),
])
def test_bad_hyper_parameter_values_are_refused_at_the_door(tmp_path, data_root, change, field, words):
    path = write(tmp_path, good_spec(**change))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert info.value.field == field
    assert str(path) in str(info.value) and words in str(info.value)


def test_the_layer_count_of_a_model_on_disk_is_read_from_its_config(tmp_path, data_root):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    path = write(tmp_path, good_spec(models=[str(model)], methods=[{"method": "rome", "hparams_file": "rome.yaml"}],
                                     hparams={}))
    (tmp_path / "rome.yaml").write_text("layer: 2\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert info.value.field == "methods[0].hparams_file" and "has 2 (layers 0-1)" in str(info.value)
    (tmp_path / "rome.yaml").write_text("layer: 1\n")
    assert load_spec(path).methods[0].method == "rome"


def test_missing_required_field(tmp_path, data_root):
    data = good_spec()
    del data["datasets"]
    with pytest.raises(SpecError, match=r"'datasets': missing"):
        load_spec(write(tmp_path, data))


def test_missing_data_file_in_the_data_directory(tmp_path, data_root):
    (tmp_path / "data" / "counterfact").mkdir(parents=True)
    with pytest.raises(SpecError) as info:
        load_spec(write(tmp_path, good_spec()), data_root=tmp_path / "data")
    assert info.value.field == "datasets[0]" and "counterfact-edit.json" in str(info.value)


def test_hparams_from_a_yaml_file_relative_to_the_spec(tmp_path, data_root):
    (tmp_path / "best.yaml").write_text("eac.gamma_percentile: 95\neac.l2_weight: 0.001\n")
    spec = load_spec(write(tmp_path, good_spec(methods=[{"method": "rome-eac", "hparams": "best.yaml"}])))
    assert spec.methods[0].hparams == {"eac.gamma_percentile": 95, "eac.l1_weight": 5e-7, "eac.l2_weight": 0.001}


def test_a_complete_hparams_file_for_a_model_without_defaults(tmp_path, data_root):
    model_dir = tmp_path / "my-model"  # a local model the shipped hyper-parameters know nothing about
    model_dir.mkdir()
    bare = good_spec(models=[str(model_dir)], methods=["rome"], hparams={})
    with pytest.raises(SpecError) as info:
        load_spec(write(tmp_path, bare))
    assert info.value.field == "models[0]" and "no hyper-parameters" in str(info.value)
    (tmp_path / "rome.yaml").write_text("layer: 2\nnum_steps: 3\n")
    spec = load_spec(write(tmp_path, {**bare, "methods": [{"method": "rome", "hparams_file": "rome.yaml",
                                                             "hparams": {"lr": 0.1}}]}))
    hparams = resolve_hparams(spec.models[0], spec.methods[0])
    assert (hparams.layer, hparams.num_steps, hparams.lr) == (2, 3, 0.1)


def test_checkpoints_every(tmp_path, data_root):
    spec = spec_from_dict(good_spec(n_edits=10, batch_size=1, checkpoints={"every": 4}))
    assert spec.checkpoints == (0, 4, 8, 10)


def test_every_shipped_config_is_valid(data_root):
    paths = sorted(CONFIGS.glob("*.yaml"))
    assert any(p.name == "demo.yaml" for p in paths)
    methods = set()
    for path in paths:
        # Paper configs name hub models that this machine does not hold; their data must be here.
        spec = load_spec(path, check_models=(path.name == "demo.yaml"))
        methods |= {v.method for v in spec.methods}
        assert spec.trajectories()
    assert methods <= set(METHODS)
    assert {"rome", "rome-eac", "memit", "memit-eac"} <= methods


def test_new_shipped_defaults_make_new_trajectories(tmp_path, data_root, monkeypatch):
    from orchestrator import spec as spec_module

    before = [t.trajectory_id for t in load_spec(write(tmp_path, good_spec())).trajectories()]
    real = spec_module.load_hparams

    def retuned(method, model, **kwargs):  # as if workers/hparams/rome/tiny.yaml had been re-calibrated
        hparams = real(method, model, **kwargs)
        return dataclasses.replace(hparams, num_steps=hparams.num_steps + 1) if method == "rome" else hparams

    monkeypatch.setattr(spec_module, "load_hparams", retuned)
    after = [t.trajectory_id for t in load_spec(write(tmp_path, good_spec())).trajectories()]
    assert after[2:] == before[2:] and set(after[:2]).isdisjoint(before[:2])


def test_perplexity_on_the_statistics_text_is_refused_unless_allowed(data_root):
    """Issue 17, item 9: second moments default to wikitext-valid, perplexity is scored on wikitext-test;
    an evaluation scoring perplexity on the statistics' own text (by name or by path) is refused."""
    evaluation = {"tasks": {"nli": 4, "wikitext": 2}}
    spec = spec_from_dict(good_spec(evaluation=evaluation), data_root=data_root)  # the defaults are disjoint
    assert resolve_hparams("tiny-gpt2", spec.methods[0]).stats_corpus == "wikitext-valid"
    same_by_path = str(data_root / "text" / "wikitext-2-raw-test.txt")
    for corpus in ("wikitext-test", same_by_path):
        with pytest.raises(SpecError, match=r"evaluation\.perplexity_corpus.*rome on tiny-gpt2.*allow_statistics_text"):
            spec_from_dict(good_spec(evaluation=evaluation, hparams={"rome": {"stats_corpus": corpus}}),
                           data_root=data_root)
    with pytest.raises(SpecError, match="perplexity_corpus"):
        spec_from_dict(good_spec(evaluation={**evaluation, "perplexity_corpus": "wikitext-valid"}), data_root=data_root)
    allowed = {**evaluation, "perplexity_corpus": "wikitext-valid", "allow_statistics_text": True}
    assert spec_from_dict(good_spec(evaluation=allowed), data_root=data_root).trajectories()
    # Without perplexity in the evaluation nothing is compared.
    assert spec_from_dict(good_spec(hparams={"rome": {"stats_corpus": "wikitext-test"}}), data_root=data_root)


def test_edit_sample_follows_one_order_across_checkpoints(data_root):
    """Issue 17, item 11: the requests scored at each checkpoint come from one seeded order of the
    trajectory's requests: a request scored later was scored at every earlier checkpoint after its
    edit (a fresh sample per checkpoint, the old behaviour, breaks this within a few checkpoints)."""
    spec = spec_from_dict(good_spec(n_edits=60, batch_size=1, checkpoints={"every": 5},
                                    evaluation={"tasks": {"nli": 4}, "edit_sample": 8}), data_root=data_root)
    trajectory = spec.trajectories()[0]
    samples = {c: trajectory.evaluated_requests(c) for c in trajectory.edit_checkpoints()}
    assert samples[5] == [0, 1, 2, 3, 4]  # fewer edited than the sample: all of them
    for checkpoint, sample in samples.items():
        assert len(sample) == min(8, checkpoint) and sample == sorted(set(sample)) and sample[-1] < checkpoint
    for early in samples:
        for late in samples:
            if early < late:
                assert {i for i in samples[late] if i < early} <= set(samples[early]), (early, late)
    assert trajectory.evaluated_requests(60) == spec.trajectories()[0].evaluated_requests(60)  # seeded
    other_seed = [t for t in spec.trajectories() if t.seed == 1][0]
    assert other_seed.evaluated_requests(60) != trajectory.evaluated_requests(60)


def test_trajectory_ids_follow_the_data_file_and_the_model_by_content(tmp_path):
    """Issue 12, item 1: ids hashed the data set's and model's names only, so a changed data file or
    re-converted weights resumed onto the old trajectory's rows and log."""
    from orchestrator.spec import model_fingerprint

    records = [{"case_id": i, "prompt": "The capital of France is", "subject": "France", "target_new": "Rome",
                "ground_truth": "Paris", "rephrase_prompt": "France's capital is",
                "locality_prompt": "Spain's capital is", "locality_ground_truth": "Madrid"} for i in range(2)]
    data = tmp_path / "edits.json"
    raw = {"experiment": "x", "models": ["tiny-gpt2"], "methods": ["rome"], "datasets": [str(data)], "n_edits": 1}
    data.write_text(json.dumps(records))
    first = spec_from_dict(raw, check_data=False).trajectories()[0]
    records[1]["target_new"] = "Berlin"
    data.write_text(json.dumps(records))
    changed = spec_from_dict(raw, check_data=False).trajectories()[0]
    assert first.trajectory_id != changed.trajectory_id and first.data_digest != changed.data_digest
    assert first.config()["data_digest"] == first.data_digest

    for name, weights in (("a", b"\0" * 64), ("b", b"\0" * 63 + b"\1")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(weights)
        (tmp_path / name / "config.json").write_text("{}")
    assert model_fingerprint(str(tmp_path / "a")) != model_fingerprint(str(tmp_path / "b"))
