"""Issues 13 and 32: sharded evaluation replicas (workers/sharded.py, workers.actors.EvalGroup) on CPU.

Both shardings run here, over a gloo group of two Ray actors: DeepSpeed itself (``deepspeed.init_inference``
with AutoTP, ``replace_with_kernel_inject: false``, DeepSpeed's CPU accelerator; installed from
lock/deepspeed.lock by ``make setup``) and PyTorch's own tensor parallelism (``torch.distributed.tensor.parallel``
with the model's published plan, ``config.base_model_tp_plan``). Each must give the rows the unsharded
evaluator gives: scores up to float32 round-off (a row-parallel projection sums the two ranks' partial
products in another order: 1e-4 relative is the bound, see ROUND_OFF), and every metric computed from
greedy generations (generative reliability and generalisation, NQ exact match) exactly. The generated
token ids of the same sharding against the unsharded model are compared one by one in
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
# The default model: fewer examples (each forward pass costs ~100× tiny-llama's).
DEFAULT_MODEL_FIELDS = EvalConfig.from_dict(
    {"tasks": {"nq": 2, "nli": 2, "wikitext": 1}, "perplexity_window": 64, "perplexity_stride": 64,
     "edit_metrics": ["toolkit", "counterfact", "generative"], "generative_max_new_tokens": 6,
     "drift_examples": 1, "batch_size": 4}, source="test_sharded")
ROUND_OFF = 1e-4  # relative; float32 sums in another order (see the module docstring): measured up to
# 2.5e-5 on the drift KL (a difference of nearby log-probabilities), 3e-8 on perplexity
# Rows read from greedily generated tokens: equal only if the tokens are.
GENERATED = {("edit/generative", "reliability"), ("edit/generative", "generalisation"), ("nq", "exact_match")}


@pytest.fixture(scope="module")
def two_cpu_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
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


def edit_log_for_default_model(path, requests, steps=3):
    """A few rank-one steps on the default model's down projections (layers 4-6, where MEMIT writes),
    each the size of a real edit's update (‖ΔW‖_F ≈ 5): sharding must score base + log as the whole
    model does, whatever wrote the log."""
    model, _ = load_model("smollm2-135m")
    generator = torch.Generator().manual_seed(1)
    deltas = []
    for step in range(steps):
        left = torch.randn(model.config.hidden_size, 1, generator=generator)
        right = torch.randn(model.config.intermediate_size, 1, generator=generator)
        left, right = left / left.norm() * 5.0, right / right.norm()
        deltas.append(WeightDelta([LayerDelta(f"model.layers.{4 + step}.mlp.down_proj", left, right)], [requests[step % len(requests)].case_id], "rome"))
    log = EditLog(deltas, {"delta_steps": list(range(steps)), "steps_done": steps,
                           "binding": log_binding(requests, {}, weights_fingerprint(model))})
    log.save(path)
    return str(path), steps


def assert_rows_match(want_rows, got_rows):
    assert [(r["task"], r["metric"], r["n_examples"]) for r in got_rows] == \
           [(r["task"], r["metric"], r["n_examples"]) for r in want_rows]
    for w, g in zip(want_rows, got_rows):
        if (w["task"], w["metric"]) in GENERATED:
            assert g["value"] == w["value"], (w, g)
        else:
            assert g["value"] == pytest.approx(w["value"], rel=ROUND_OFF, abs=1e-6, nan_ok=True), (w, g)


def perplexity_of(rows):
    return next(r["value"] for r in rows if r["task"] == "wikitext" and r["metric"] == "perplexity")


# tiny-llama under both shardings; the default model (9 attention heads, 3 key/value heads) under
# DeepSpeed, whose AutoTP splits heads unevenly over 2 ranks — PyTorch's plan cannot (check_divisible).
@pytest.mark.parametrize("model, sharding", [("tiny-llama", "torch"), ("tiny-llama", "deepspeed"),
                                             ("smollm2-135m", "deepspeed")])
def test_a_two_rank_gloo_group_scores_like_the_unsharded_evaluator(two_cpu_ray, data_root, tmp_path, model, sharding):
    requests = load_edit_dataset("counterfact", data_root)[:2]
    if model == "tiny-llama":
        log_path, steps = edit_log_for_tiny_llama(tmp_path / "log.safetensors", requests), 1
        fields = EVAL_FIELDS
    else:
        log_path, steps = edit_log_for_default_model(tmp_path / "log.safetensors", requests)
        fields = DEFAULT_MODEL_FIELDS
    unsharded = CheckpointEvaluator(str(tmp_path / "cache"), str(data_root))
    expected = unsharded.evaluate(model, "float32", log_path, steps, requests, fields)
    base = unsharded.evaluate(model, "float32", None, 0, requests, fields)

    group = EvalGroup(EvaluationGroupPlan(2, 0.0, sharding), 2.0, str(tmp_path / "cache"), str(data_root))
    try:
        # Two checkpoints in a row on the same ranks: the base, then base + log (sharded afresh).
        base_ref = group.evaluate.remote(model, "float32", None, 0, requests, fields)
        edited_ref = group.evaluate.remote(model, "float32", log_path, steps, requests, fields)
        sharded_base, sharded = ray.get([base_ref, edited_ref], timeout=900)
        if sharding == "deepspeed":  # DeepSpeed's own layers ran, not a stand-in
            assert ray.get(group.ranks[0].sharded_layers.remote(), timeout=60) > 0
    finally:
        group.kill()

    for want, got in ((base, sharded_base), (expected, sharded)):
        assert_rows_match(want, got)
    assert {(r["task"], r["metric"]) for r in expected} >= GENERATED
    # The edit changed what the model predicts: equal rows are not both the base model's.
    assert not math.isclose(perplexity_of(expected), perplexity_of(base), rel_tol=1e-6)


@pytest.mark.parametrize("engine, ranks, num_gpus, cluster, deepspeed, want", [
    ("deepspeed", 2, 0.0, 0.0, False, (2, 0.0, "torch")),  # CPU ranks, no DeepSpeed: PyTorch's TP
    ("deepspeed", 2, 0.0, 0.0, True, (2, 0.0, "deepspeed")),  # CPU ranks: DeepSpeed's CPU accelerator, gloo
    ("deepspeed", 2, 2.0, 1.0, False, (1, 0.0, "")),  # one GPU in the cluster for two ranks
    ("deepspeed", 2, 2.0, 0.0, True, (1, 0.0, "")),  # GPUs asked for, none in the cluster
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


@pytest.mark.parametrize("installed", [True, False])
def test_a_deepspeed_spec_on_a_cpu_machine_shards_over_cpu_ranks_and_says_why(data_root, tmp_path, capsys,
                                                                             monkeypatch, installed):
    """The driver's plan for its evaluation pool, before any actor starts: no Ray instance is needed
    for it, so the cluster is a two-CPU one as Ray would report it. The spec's GPUs fall back to CPU,
    and its two ranks run there: DeepSpeed's CPU accelerator where DeepSpeed is installed (make setup
    installs it), PyTorch's tensor parallelism where it is not."""
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    monkeypatch.setattr(driver_module, "deepspeed_installed", lambda: installed)
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
    assert resources.evaluation.num_gpus == 0
    assert (group.ranks, group.gpus_per_rank, group.sharding) == (2, 0.0, "deepspeed" if installed else "torch")
    said = capsys.readouterr().out
    assert "no GPU on this machine: the spec's GPU actors run on CPU" in said
    assert ("DeepSpeed is not installed" in said) == (not installed)


BASE_SPEC = {"experiment": "ds", "models": ["tiny-llama"], "methods": ["rome"], "datasets": ["counterfact"],
             "n_edits": 1, "checkpoints": [1]}


@pytest.mark.parametrize("evaluation, field, problem", [
    ({"num_gpus": 2, "engine": "vllm"}, "resources.evaluation.engine", "not one of"),
    ({"num_gpus": 0, "engine": "deepspeed"}, "resources.evaluation.ranks", "needs the number of ranks"),
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
