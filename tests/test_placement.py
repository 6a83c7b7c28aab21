"""Placement of a replica (workers/placement.py), on CPU: which path each actor takes for the GPUs it asks
for and sees, the fallbacks when CUDA or DeepSpeed is absent, the layer split over several GPUs, and
the GPUs a Tune trial reserves for its actors."""

import sys

import pytest
import torch

from workers.actors import Replica, load_replica
from workers.placement import (Environment, Placement, PlacementRequest, deepspeed_inference_config,
                               device_map_for, place_model, plan_for_actor, plan_placement)

NO_GPU = Environment(accelerators=0, deepspeed_installed=False)


def gpus(n, deepspeed=False, world_size=1):
    return Environment(accelerators=n, deepspeed_installed=deepspeed, world_size=world_size)


@pytest.mark.parametrize("request_, environment, strategy, devices, tensor_parallel, reason", [
    (PlacementRequest("trajectory", 0), NO_GPU, "cpu", 0, 1, "no GPU asked for"),
    (PlacementRequest("trajectory", 2), NO_GPU, "cpu", 0, 1, "no accelerator is visible"),
    (PlacementRequest("trajectory", 1), gpus(1), "single-device", 1, 1, "one GPU"),
    (PlacementRequest("trajectory", 0.5), gpus(1), "single-device", 1, 1, "one GPU"),  # a shared GPU
    (PlacementRequest("trajectory", 2), gpus(2), "device-map", 2, 1, "spread over 2 GPUs"),
    (PlacementRequest("evaluation", 4), gpus(4), "device-map", 4, 1, "spread over 4 GPUs"),
    # DeepSpeed asked for by an evaluation actor:
    (PlacementRequest("evaluation", 2, "deepspeed"), gpus(2, deepspeed=False), "device-map", 2, 1,
     "DeepSpeed is not installed"),
    (PlacementRequest("evaluation", 2, "deepspeed"), gpus(2, deepspeed=True), "device-map", 2, 1,
     "one process per GPU"),  # a lone Ray actor cannot be a tensor-parallel group
    (PlacementRequest("evaluation", 1, "deepspeed"), gpus(1, deepspeed=True, world_size=4), "deepspeed", 1, 4,
     "tensor parallel over 4"),
    (PlacementRequest("evaluation", 1, "deepspeed"), gpus(1, deepspeed=False, world_size=4), "single-device", 1, 1,
     "DeepSpeed is not installed"),
    (PlacementRequest("evaluation", 1, "deepspeed"), gpus(1, deepspeed=True), "single-device", 1, 1,
     "nothing for DeepSpeed to shard"),
    (PlacementRequest("evaluation", 2, "deepspeed"), NO_GPU, "cpu", 0, 1, "no accelerator is visible"),
])
def test_plan_placement(request_, environment, strategy, devices, tensor_parallel, reason):
    placement = plan_placement(request_, environment)
    assert (placement.strategy, placement.devices, placement.tensor_parallel) == (strategy, devices, tensor_parallel)
    assert reason in placement.reason


def test_bad_requests_fail_clearly():
    with pytest.raises(ValueError, match="evaluation actors only"):
        PlacementRequest("trajectory", 2, "deepspeed")
    with pytest.raises(ValueError, match="engine"):
        PlacementRequest("evaluation", 1, "vllm")
    with pytest.raises(RuntimeError, match="asked for 4 GPUs but its process sees 2"):
        plan_placement(PlacementRequest("trajectory", 4), gpus(2))


def test_this_machine_takes_the_cpu_path_without_importing_deepspeed():
    sys.modules.pop("deepspeed", None)
    environment = Environment.detect()
    assert environment.accelerators == torch.accelerator.device_count() == 0
    placement = plan_for_actor("evaluation", 2, "deepspeed")
    assert placement.strategy == "cpu" and "deepspeed" not in sys.modules
    # The actors' loader asks for the accelerator and falls back to CPU, weights untouched.
    model, _ = load_replica(Replica("tiny-llama", use_accelerator=True), role="evaluation")
    assert {p.device.type for p in model.parameters()} == {"cpu"}


def test_cpu_placement_leaves_the_model_as_it_is(tiny_gpt2):
    model, _ = tiny_gpt2
    before = {name: p.clone() for name, p in model.named_parameters()}
    assert place_model(model, Placement("cpu", 0)) is model
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())


def test_device_map_spreads_whole_layers_over_two_gpus_and_keeps_tied_weights_together(tiny_llama):
    model, _ = tiny_llama
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    device_map = device_map_for(model, {0: size, 1: size})
    assert set(device_map.values()) == {0, 1}  # balanced: both GPUs hold layers, not all on GPU 0
    layers = {name: device for name, device in device_map.items() if name.startswith("model.layers.")}
    assert all(name.count(".") == 2 for name in layers)  # every decoder layer whole on one GPU
    assert sorted(layers.values()) == list(layers.values())  # in order: 0 … 0, 1 … 1
    assert device_map["model.embed_tokens"] == device_map["lm_head"]  # tied (SmolLM2 / LLaMA layout)
    for name, _ in model.named_parameters():  # every weight has a place
        assert any(name == key or name.startswith(key + ".") for key in device_map), name
    with pytest.raises(RuntimeError, match="does not fit 2 GPU"):
        device_map_for(model, {0: size // 8, 1: size // 8})


def test_deepspeed_inference_config():
    config = deepspeed_inference_config(Placement("deepspeed", 1, tensor_parallel=2), torch.float16)
    assert config == {"tensor_parallel": {"tp_size": 2}, "dtype": torch.float16, "replace_with_kernel_inject": False}
    with pytest.raises(ValueError, match="not a DeepSpeed placement"):
        deepspeed_inference_config(Placement("device-map", 2), torch.float16)


def test_a_tune_trial_reserves_the_gpus_of_its_actors(data_root):
    from orchestrator.tune_spec import tune_spec_from_dict
    from orchestrator.tuning import trial_resources

    spec = tune_spec_from_dict({
        "experiment": "big", "models": ["meta-llama/Llama-2-13b-hf"], "methods": ["rome-eac"],
        "datasets": ["counterfact"], "n_edits": 10, "checkpoints": [5, 10], "evaluation": {"tasks": {"nli": 10}},
        "resources": {"trajectory": {"num_cpus": 4, "num_gpus": 2},
                      "evaluation": {"num_cpus": 2, "num_gpus": 1, "actors": 2}}}, check_models=False)
    factory = trial_resources(spec.experiment)
    assert factory.head_bundle_is_empty  # the trial itself only waits on its actors
    assert factory.bundles == [{"CPU": 4.0, "GPU": 2.0}, {"CPU": 2.0, "GPU": 1.0}, {"CPU": 2.0, "GPU": 1.0}]
    assert factory.required_resources == {"CPU": 8.0, "GPU": 4.0}


@pytest.mark.parametrize("environment", [gpus(2, deepspeed=True, world_size=2), gpus(2, deepspeed=True)])
def test_a_trajectory_replica_over_two_gpus_spreads_its_layers_even_inside_a_process_group(environment):
    """Editing needs the model's own modules: a trajectory replica never shards with DeepSpeed, even in a
    process that belongs to a tensor-parallel group (WORLD_SIZE > 1) with DeepSpeed installed."""
    placement = plan_placement(PlacementRequest("trajectory", 2), environment)
    assert (placement.strategy, placement.devices, placement.tensor_parallel) == ("device-map", 2, 1)
