"""The constrained tuning objective: efficacy within a tolerance of the base method's, then the smallest
update; its validation; and the shipped tune spec for the default model."""

from pathlib import Path

import pytest

from orchestrator.spec import MethodVariant, SpecError
from orchestrator.tune_spec import Objective, load_tune_spec, tune_spec_from_dict
from orchestrator.tuning import reference_variant, write_best_hparams

TUNE_SPEC = Path(__file__).resolve().parent.parent / "experiments" / "configs" / "tune" / "counterfact-val-smollm2.yaml"
EFFICACY = ("edit/counterfact", "efficacy")


def rows(efficacy: float, l1_per_matrix: tuple[float, ...]) -> dict[tuple[str, str], float]:
    values = {EFFICACY: efficacy, ("edit/counterfact", "paraphrase"): 0.1}
    for i, l1 in enumerate(l1_per_matrix):
        values[(f"deviation/model.layers.{i}.mlp.down_proj", "update_l1_relative")] = l1
        values[(f"deviation/model.layers.{i}.mlp.down_proj", "l1_relative_change")] = 9.0  # not the update
    return values


def test_within_the_tolerance_the_smallest_update_wins_and_every_such_trial_beats_any_other():
    objective = Objective(combine="constrained", tolerance=0.05, reference=((10, 0.80), (20, 0.90)))
    trials = {"close, mid-size update": rows(0.86, (0.02, 0.04)),     # 0.86 >= 0.90 - 0.05
              "exact, big update": rows(0.90, (0.10, 0.10)),
              "at the bar, small update": rows(0.85, (0.01, 0.01)),
              "short by 0.01, tiny update": rows(0.84, (0.001, 0.001)),
              "short by 0.35": rows(0.50, (0.0, 0.0))}
    scored = {name: objective.terms(values, 20) for name, values in trials.items()}
    assert scored["close, mid-size update"]["update_l1"] == pytest.approx(0.03)  # mean over the matrices
    assert scored["close, mid-size update"]["objective"] == pytest.approx(1 / 1.03)
    assert scored["short by 0.01, tiny update"]["objective"] == pytest.approx(-0.01)
    ranking = sorted(scored, key=lambda name: scored[name]["objective"], reverse=True)
    assert ranking == ["at the bar, small update", "close, mid-size update", "exact, big update",
                       "short by 0.01, tiny update", "short by 0.35"]
    # Each checkpoint is held to the base method's score at that checkpoint: 0.76 passes at 10 (0.80).
    assert objective.terms(rows(0.76, (0.5,)), 10)["objective"] > 0 > objective.terms(rows(0.76, (0.5,)), 20)["objective"]
    with pytest.raises(ValueError, match="no reference edit/counterfact:efficacy of the base method at 15 edits"):
        objective.terms(rows(0.9, (0.1,)), 15)
    with pytest.raises(ValueError, match="update norm"):
        objective.terms({EFFICACY: 0.9}, 20)


def test_the_reference_is_the_base_method_without_the_constraint_settings():
    variant = MethodVariant("memit-eac", "memit-eac", {"eac.gamma_percentile": 80, "layers": [4, 5], "v_lr": 0.1})
    reference = reference_variant(variant)
    assert (reference.method, reference.group) == ("memit", "tune")
    assert reference.hparams == {"layers": [4, 5], "v_lr": 0.1}


SMALL = {"experiment": "t", "models": ["tiny-gpt2"], "methods": ["rome-eac"], "datasets": ["counterfact"],
         "seeds": [0], "n_edits": 4, "checkpoints": [2, 4],
         "evaluation": {"tasks": {}, "edit_metrics": ["counterfact"]},
         "search": {"objective": {"combine": "constrained"}}}


@pytest.mark.parametrize("change, field", [
    ({"methods": ["rome"]}, "methods[0]"),  # no constraint, nothing to compare with its base
    ({"search": {"objective": {"combine": "constrained", "constraint": "edit/toolkit:reliability"}}},
     "search.objective.constraint"),  # the evaluation computes only the counterfact family
    ({"search": {"objective": {"combine": "constrained", "tolerance": -0.1}}}, "search.objective.tolerance"),
    ({"search": {"objective": {"combine": "constrained", "tolerance": float("nan")}}},
     "search.objective.tolerance"),  # NaN passes "tolerance < 0"
    ({"evaluation": {"tasks": {}, "edit_metrics": ["counterfact"], "deviation_norms": False}},
     "search.objective.combine"),
    ({"search": {"objective": {"combine": "constrained", "edit": ["edit/counterfact:efficacy"]}}},
     "search.objective.edit"),
    ({"search": {"objective": {"tolerance": 0.1}}}, "search.objective.tolerance"),  # not constrained
])
def test_a_bad_constrained_objective_names_the_field(change, field):
    with pytest.raises(SpecError) as error:
        tune_spec_from_dict({**SMALL, **change}, source="t.yaml", check_models=False, check_data=False)
    assert error.value.field == field and "t.yaml" in str(error.value)


def test_the_default_model_tune_spec(data_root):
    spec = load_tune_spec(TUNE_SPEC, data_root=data_root)
    assert [v.method for _, v in spec.searches()] == ["rome-eac", "memit-eac", "alphaedit-eac"]
    assert spec.experiment.datasets == ("counterfact-val",) and spec.experiment.batch_size == 1
    space = {d.name: (d.distribution, d.values) for d in spec.search.space}
    assert space["eac.gamma_percentile"] == ("uniform", (50, 95))
    assert space["eac.retrain_steps"][0] == "randint" and space["eac.l1_weight"][0] == "loguniform"
    objective = spec.search.objective
    assert (objective.combine, objective.constraint, objective.tolerance) == ("constrained", EFFICACY, 0.05)


def test_the_best_configuration_file_takes_an_integer_sample(tmp_path):
    """A randint dimension (the retrain step budget) comes back from Tune's results as a numpy integer,
    which the JSON header of the best-configuration file could not write (seen in a smoke run)."""
    import numpy as np
    import yaml

    path = write_best_hparams(tmp_path / "best.yaml", {"eac": {"retrain_steps": 7}},
                              {"method": "rome-eac", "sampled": {"eac.retrain_steps": np.int64(7),
                                                                 "eac.gamma_percentile": np.float64(72.5)}})
    text = path.read_text()
    assert '# sampled: {"eac.retrain_steps": 7, "eac.gamma_percentile": 72.5}' in text
    assert yaml.safe_load(text) == {"eac": {"retrain_steps": 7}}
