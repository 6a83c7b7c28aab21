"""Issue 13: sharded evaluation replicas (workers/sharded.py, workers.actors.EvalGroup) on CPU.

DeepSpeed is not installed on this machine (it is a GPU-node extra, lock/deepspeed.lock) and there is
no GPU, so the CPU stand-in behind the same group code is PyTorch's own tensor parallelism
(``torch.distributed.tensor.parallel`` with the model's published plan, ``config.base_model_tp_plan``)
over a gloo group of two Ray actors. It must give the rows the unsharded evaluator gives: scores up to
float32 round-off (a row-parallel projection sums the two ranks' partial products in another order:
1e-4 relative is the bound, see ROUND_OFF), and every metric computed from greedy generations
(generative reliability and generalisation, NQ exact match) exactly. The generated token ids of the
same sharding against the unsharded model are compared one by one in
tests/test_gpu_sharding_benchmark.py (benchmarks/gpu_sharding.py --tiny).
"""

import math

import pytest
import ray
import torch

from orchestrator import driver as driver_module
from orchestrator.driver import Driver
from orchestrator.spec import spec_from_dict
from orchestrator.store import Store
from workers.actors import CheckpointEvaluator, EvalGroup
from workers.data import load_edit_dataset
from workers.editing.delta import EditLog, LayerDelta, WeightDelta, log_binding
from workers.models import load_model, weights_fingerprint
from workers.evaluation import EvalConfig
from workers.placement import EvaluationGroupPlan, plan_evaluation_group

EVAL_FIELDS = EvalConfig.from_dict(
    {"tasks": {"nq": 3, "nli": 3, "wikitext": 1}, "perplexity_window": 64, "perplexity_stride": 64,
     "edit_metrics": ["toolkit", "counterfact", "generative"], "generative_max_new_tokens": 6,
     "drift_examples": 2, "batch_size": 4}, source="test_sharded")  # evaluators take the typed config
ROUND_OFF = 1e-4  # relative; float32 sums in another order (see the module docstring): measured up to
# 2.5e-5 on the drift KL (a difference of nearby log-probabilities), 3e-8 on perplexity
# Rows read from greedily generated tokens: equal only if the tokens are.
GENERATED = {("edit/generative", "reliability"), ("edit/generative", "generalisation"), ("nq", "exact_match")}


@pytest.fixture(scope="module")
def two_cpu_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


def edit_log_for_tiny_llama(path, requests):
    """One rank-one step on a row-parallel projection (its input dimension is split over the ranks):
    the sharded ranks must replay it on the whole matrix before they shard it."""
    model, _ = load_model("tiny-llama")
    generator = torch.Generator().manual_seed(0)
    left, right = torch.randn(64, 1, generator=generator), torch.randn(160, 1, generator=generator)
    delta = LayerDelta("model.layers.1.mlp.down_proj", left * 0.5, right)
    log = EditLog([WeightDelta([delta], [requests[0].case_id], "rome")],
                  {"delta_steps": [0], "steps_done": 1,
                   "binding": log_binding(requests, {}, weights_fingerprint(model))})
    log.save(path)
    return str(path)


def test_a_two_rank_gloo_group_scores_like_the_unsharded_evaluator(two_cpu_ray, data_root, tmp_path):
    requests = load_edit_dataset("counterfact", data_root)[:2]
    log_path = edit_log_for_tiny_llama(tmp_path / "log.safetensors", requests)
    unsharded = CheckpointEvaluator(str(tmp_path / "cache"), str(data_root))
    expected = unsharded.evaluate("tiny-llama", "float32", log_path, 1, requests, EVAL_FIELDS)
    base = unsharded.evaluate("tiny-llama", "float32", None, 0, requests, EVAL_FIELDS)

    group = EvalGroup(EvaluationGroupPlan(2, 0.0, "torch"), 2.0, str(tmp_path / "cache"), str(data_root))
    try:
        # Two checkpoints in a row on the same ranks: the base, then base + log (sharded afresh).
        base_ref = group.evaluate.remote("tiny-llama", "float32", None, 0, requests, EVAL_FIELDS)
        edited_ref = group.evaluate.remote("tiny-llama", "float32", log_path, 1, requests, EVAL_FIELDS)
        sharded_base, sharded = ray.get([base_ref, edited_ref], timeout=600)
    finally:
        group.kill()

    for want, got in ((base, sharded_base), (expected, sharded)):
        assert [(r["task"], r["metric"], r["n_examples"]) for r in got] == \
               [(r["task"], r["metric"], r["n_examples"]) for r in want]
        for w, g in zip(want, got):
            if (w["task"], w["metric"]) in GENERATED:
                assert g["value"] == w["value"], (w, g)
            else:
                assert g["value"] == pytest.approx(w["value"], rel=ROUND_OFF, abs=1e-6, nan_ok=True), (w, g)
    assert {(r["task"], r["metric"]) for r in expected} >= GENERATED
    # The edit changed what the model predicts: equal rows are not both the base model's.
    changed = [w for w, b in zip(expected, base) if w["task"] == "wikitext" and w["metric"] == "perplexity"]
    assert changed and not math.isclose(changed[0]["value"], next(
        b["value"] for b in base if b["task"] == "wikitext" and b["metric"] == "perplexity"), rel_tol=1e-6)


@pytest.mark.parametrize("engine, ranks, num_gpus, cluster, deepspeed, want", [
    ("deepspeed", 2, 0.0, 0.0, False, (1, 0.0, "")),  # a CPU machine: one unsharded replica
    ("deepspeed", 2, 2.0, 1.0, False, (1, 0.0, "")),  # one GPU in the cluster for two ranks
    ("deepspeed", 2, 0.0, 0.0, True, (1, 0.0, "")),  # DeepSpeed but no GPU
    ("deepspeed", 2, 2.0, 2.0, False, (2, 1.0, "torch")),  # GPUs, no DeepSpeed: the PyTorch stand-in
    ("deepspeed", 4, 4.0, math.inf, True, (4, 1.0, "deepspeed")),
    ("tp", 2, 0.0, 0.0, False, (2, 0.0, "torch")),  # the CPU group (gloo)
    ("tp", 2, 2.0, 8.0, True, (2, 1.0, "torch")),
    ("transformers", 1, 2.0, 8.0, True, (1, 0.0, "")),
])
def test_evaluation_group_plan(engine, ranks, num_gpus, cluster, deepspeed, want):
    plan = plan_evaluation_group(engine, ranks, num_gpus, cluster, deepspeed)
    assert (plan.ranks, plan.gpus_per_rank, plan.sharding) == want
    falls_back = engine == "deepspeed" and plan.ranks == 1
    assert ("one unsharded evaluation replica" in plan.reason) == falls_back
    assert ("DeepSpeed is not installed" in plan.reason) == (engine == "deepspeed" and not deepspeed)


def test_a_deepspeed_spec_on_a_cpu_machine_falls_back_to_one_replica_and_says_why(data_root, tmp_path, capsys,
                                                                                   monkeypatch):
    """The driver's plan for its evaluation pool, before any actor starts: no Ray instance is needed
    for it, so the cluster is a two-CPU one as Ray would report it."""
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    spec = spec_from_dict({"experiment": "ds", "models": ["tiny-llama"], "methods": ["rome"],
                           "datasets": ["counterfact"], "n_edits": 1, "checkpoints": [1],
                           "resources": {"evaluation": {"num_cpus": 1, "num_gpus": 2, "engine": "deepspeed"}}})
    assert (spec.resources.eval_engine, spec.resources.eval_ranks) == ("deepspeed", 2)
    pools = []

    class Stop(Exception):
        pass

    def recording_pool(spec, resources, cache_dir, data_root, group):
        pools.append((resources, group))
        raise Stop  # no actor needs to start: the pool's plan is what is tested

    monkeypatch.setattr(driver_module, "EvalPool", recording_pool)
    with pytest.raises(Stop):
        Driver(spec, Store(tmp_path / "store"), progress="lines").run()
    (resources, group), = pools
    assert group.ranks == 1 and resources.evaluation.num_gpus == 0
    said = capsys.readouterr().out
    assert "engine 'deepspeed' asks for 2 GPUs" in said and "one unsharded evaluation replica" in said


BASE_SPEC = {"experiment": "ds", "models": ["tiny-llama"], "methods": ["rome"], "datasets": ["counterfact"],
             "n_edits": 1, "checkpoints": [1]}


@pytest.mark.parametrize("evaluation, field, problem", [
    ({"num_gpus": 2, "engine": "vllm"}, "resources.evaluation.engine", "not one of"),
    ({"num_gpus": 0, "engine": "deepspeed"}, "resources.evaluation.num_gpus", "needs GPUs"),
    ({"num_gpus": 1, "engine": "deepspeed"}, "resources.evaluation.num_gpus", "at least 2"),
    ({"num_gpus": 2.5, "engine": "deepspeed"}, "resources.evaluation.num_gpus", "whole number"),
    ({"num_gpus": 2, "engine": "deepspeed", "ranks": 4}, "resources.evaluation.ranks", "each rank holds one GPU"),
    ({"num_gpus": 0, "engine": "tp"}, "resources.evaluation.ranks", "needs the number of ranks"),
    ({"num_gpus": 0, "engine": "tp", "ranks": 1}, "resources.evaluation.ranks", "at least 2"),
    ({"num_gpus": 2, "ranks": 2}, "resources.evaluation.ranks", "sharded engine"),
])
def test_the_spec_validator_checks_the_evaluation_engine(evaluation, field, problem):
    from orchestrator.spec import SpecError

    with pytest.raises(SpecError, match=problem) as raised:
        spec_from_dict({**BASE_SPEC, "resources": {"evaluation": evaluation}}, check_data=False)
    assert raised.value.field == field


def test_dry_run_shows_the_sharded_evaluator(data_root, tmp_path):
    from orchestrator.dry_run import format_dry_run

    spec = spec_from_dict({**BASE_SPEC, "resources": {"evaluation": {"num_cpus": 2, "engine": "tp", "ranks": 2}}},
                          check_data=False)
    assert (spec.resources.eval_engine, spec.resources.eval_ranks) == ("tp", 2)
    store = Store(tmp_path / "store")
    text = format_dry_run(store, Driver(spec, store, progress=False).plan(), spec.resources)
    assert "engine tp: 2 ranks per actor (CPU, gloo), PyTorch tensor parallelism" in text
    ds = spec_from_dict({**BASE_SPEC, "resources": {"evaluation": {"num_gpus": 4, "engine": "deepspeed"}}},
                        check_data=False)
    text = format_dry_run(store, Driver(ds, store, progress=False).plan(), ds.resources)
    assert "engine deepspeed: 4 ranks per actor (one GPU each)" in text
