"""Where one model replica lives: CPU, one accelerator, several (layers spread with accelerate), or
DeepSpeed tensor-parallel inference — the only module that knows about DeepSpeed (imported lazily).

An actor's GPUs come from the spec (``resources.trajectory.num_gpus`` / ``resources.evaluation.num_gpus``);
Ray makes exactly those visible to the actor's process. ``plan_placement`` decides, as plain data, what
the replica does with what it sees, and says why when it falls back:

=====================  =========================================================================
strategy               when
=====================  =========================================================================
``cpu``                no GPU asked for, or none visible (no CUDA): plain transformers on CPU
``single-device``      one GPU (or a fraction of one): the whole model on it
``device-map``         several GPUs for one replica (e.g. LLaMA-2-13B in fp16, ~26 GB): decoder
                       layers spread over them, balanced, each layer whole (accelerate)
``deepspeed``          an evaluation replica asking ``engine: deepspeed`` in a process group of one
                       process per GPU (``WORLD_SIZE`` > 1, as the ``deepspeed`` launcher sets it):
                       ``deepspeed.init_inference`` with tensor parallelism over the group
=====================  =========================================================================

DeepSpeed's tensor parallelism is SPMD — one process per GPU. A lone process (a Ray actor holding
several GPUs) therefore falls back to ``device-map``; so does a process without DeepSpeed installed.
The evaluation pool gives a sharded engine its processes: ``plan_evaluation_group`` decides, from the
spec's ``resources.evaluation`` and the cluster, whether an evaluation replica is a group of ranks
(``workers.sharded``, one Ray actor per rank) and what the ranks shard with:

=====================  =========================================================================
engine                 evaluation replica
=====================  =========================================================================
``transformers``       one actor (``plan_placement`` above)
``deepspeed``          ``num_gpus`` ranks, one GPU each: ``deepspeed.init_inference`` where
                       DeepSpeed is installed, PyTorch tensor parallelism (NCCL) where it is not;
                       one unsharded actor where the cluster has fewer GPUs than ranks
``tp``                 ``ranks`` ranks, PyTorch tensor parallelism (``torch.distributed.tensor``),
                       one GPU each (NCCL) or none (gloo on CPU: how the group is tested)
=====================  =========================================================================
Editing always keeps the model's own modules (it needs gradients through, and in-place updates of, the
edited projection), so a trajectory replica never takes the DeepSpeed path. Sharding replaces the
model's linear layers with per-rank slices, so a replica given to DeepSpeed must already hold its final
weights (the edit log replayed first): ``shard_for_inference`` takes the model as it is.
"""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass

import torch

ROLES = ("trajectory", "evaluation")
ENGINES = ("transformers", "deepspeed", "tp")
SHARDINGS = ("deepspeed", "torch")  # what a rank of an evaluation group shards its replica with
STRATEGIES = ("cpu", "single-device", "device-map", "deepspeed")


@dataclass(frozen=True)
class PlacementRequest:
    """What the spec asks for one actor: its role, its GPUs, and (evaluation only) the engine."""

    role: str
    num_gpus: float = 0.0
    engine: str = "transformers"
    memory_fraction: float = 0.85  # of each GPU's memory for weights; the rest for activations, statistics

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"placement role {self.role!r} is not one of {list(ROLES)}")
        if self.engine not in ENGINES:
            raise ValueError(f"engine {self.engine!r} is not one of {list(ENGINES)}")
        if self.engine == "deepspeed" and self.role != "evaluation":
            raise ValueError("engine 'deepspeed' is for evaluation actors only: editing needs the model's own "
                             "modules (gradients through the edited layer, in-place weight updates)")
        if self.num_gpus < 0 or not 0 < self.memory_fraction <= 1:
            raise ValueError(f"num_gpus must be >= 0 and memory_fraction in (0, 1], got {self.num_gpus}, "
                             f"{self.memory_fraction}")


@dataclass(frozen=True)
class Environment:
    """What the actor's process sees."""

    accelerators: int  # GPUs visible to this process
    deepspeed_installed: bool
    world_size: int = 1  # processes in the torch.distributed group this process belongs to (1: alone)
    rank: int = 0

    @classmethod
    def detect(cls) -> "Environment":
        return cls(accelerators=torch.accelerator.device_count() if torch.accelerator.is_available() else 0,
                   deepspeed_installed=deepspeed_installed(),
                   world_size=int(os.environ.get("WORLD_SIZE", "1")), rank=int(os.environ.get("RANK", "0")))


@dataclass(frozen=True)
class Placement:
    strategy: str
    devices: int  # GPUs this process uses (0 on CPU)
    tensor_parallel: int = 1  # DeepSpeed ranks sharing the model (1 unless strategy is deepspeed)
    memory_fraction: float = 0.85
    reason: str = ""

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"placement strategy {self.strategy!r} is not one of {list(STRATEGIES)}")


def gpus_for_one_replica(num_gpus: float) -> int:
    """Whole GPUs a replica spreads over: a fraction shares one GPU, 2.0 spans two."""
    return 0 if num_gpus <= 0 else max(1, math.floor(num_gpus))


def plan_placement(request: PlacementRequest, environment: Environment) -> Placement:
    """The path a replica takes, and why (see the module docstring's table)."""
    wanted = gpus_for_one_replica(request.num_gpus)
    fraction = request.memory_fraction
    if wanted == 0:
        return Placement("cpu", 0, memory_fraction=fraction, reason="no GPU asked for")
    if environment.accelerators == 0:
        return Placement("cpu", 0, memory_fraction=fraction,
                         reason=f"{wanted} GPU(s) asked for, but no accelerator is visible: plain transformers on CPU")
    if environment.accelerators < wanted:
        raise RuntimeError(f"the {request.role} actor asked for {wanted} GPUs but its process sees "
                           f"{environment.accelerators}")
    fallback = ""
    if request.engine == "deepspeed":
        if not environment.deepspeed_installed:
            fallback = "DeepSpeed is not installed (pip install 'eac[deepspeed]'); "
        elif environment.world_size > 1:
            # One process per GPU (SPMD): this process drives one GPU, its group shares the model.
            return Placement("deepspeed", 1, tensor_parallel=environment.world_size, memory_fraction=fraction,
                             reason=f"DeepSpeed inference, tensor parallel over {environment.world_size} processes")
        elif wanted > 1:
            fallback = ("DeepSpeed tensor parallelism needs one process per GPU (WORLD_SIZE > 1) and this "
                        "actor is a single process; ")
        else:
            fallback = "one GPU: nothing for DeepSpeed to shard; "
    if wanted == 1:
        return Placement("single-device", 1, memory_fraction=fraction, reason=fallback + "the model on one GPU")
    return Placement("device-map", wanted, memory_fraction=fraction,
                     reason=fallback + f"layers spread over {wanted} GPUs (accelerate)")


@dataclass(frozen=True)
class EvaluationGroupPlan:
    """One evaluation replica: ``ranks`` processes (1: an unsharded actor), the GPUs of each, what they
    shard with (``SHARDINGS``; empty for one rank) and why, when it is not what the spec asked."""

    ranks: int = 1
    gpus_per_rank: float = 0.0
    sharding: str = ""
    reason: str = ""

    def __post_init__(self):
        if self.ranks < 1 or (self.ranks > 1) != (self.sharding in SHARDINGS):
            raise ValueError(f"an evaluation group of {self.ranks} rank(s) with sharding {self.sharding!r}")


def plan_evaluation_group(engine: str, ranks: int, num_gpus: float, cluster_gpus: float,
                          deepspeed_installed: bool) -> EvaluationGroupPlan:
    """The evaluation replica for ``resources.evaluation`` (``engine``, ``ranks``, ``num_gpus`` of the
    whole replica) on a cluster with ``cluster_gpus`` GPUs (``math.inf`` for one that may add GPU nodes);
    see the module docstring's second table."""
    if engine not in ENGINES:
        raise ValueError(f"engine {engine!r} is not one of {list(ENGINES)}")
    if engine == "transformers" or ranks < 2:
        return EvaluationGroupPlan()
    if engine == "tp":
        return EvaluationGroupPlan(ranks, 1.0 if num_gpus > 0 else 0.0, "torch")
    if num_gpus == 0:  # ranks on CPU: DeepSpeed's CPU accelerator, collectives over gloo
        if not deepspeed_installed:
            return EvaluationGroupPlan(ranks, 0.0, "torch", reason=(
                "DeepSpeed is not installed (pip install 'eac[deepspeed]'): the CPU evaluation ranks shard "
                "with PyTorch tensor parallelism instead"))
        return EvaluationGroupPlan(ranks, 0.0, "deepspeed")
    if num_gpus < ranks or cluster_gpus < ranks:
        missing = "DeepSpeed is not installed" if not deepspeed_installed else "DeepSpeed needs GPUs"
        return EvaluationGroupPlan(reason=(
            f"engine 'deepspeed' asks for {ranks} GPUs, one per rank, and the cluster has {cluster_gpus:g} "
            f"({missing}): one unsharded evaluation replica per actor instead"))
    if not deepspeed_installed:
        return EvaluationGroupPlan(ranks, 1.0, "torch", reason=(
            "DeepSpeed is not installed (pip install 'eac[deepspeed]'): the evaluation ranks shard with "
            "PyTorch tensor parallelism instead"))
    return EvaluationGroupPlan(ranks, 1.0, "deepspeed")


def deepspeed_installed() -> bool:
    return importlib.util.find_spec("deepspeed") is not None


def plan_for_actor(role: str, num_gpus: float, engine: str = "transformers") -> Placement:
    """``plan_placement`` for this process, as it is."""
    return plan_placement(PlacementRequest(role, num_gpus, engine), Environment.detect())


# --------------------------------------------------------------------------------------------
# Acting on a placement


def device_map_for(model, budgets: dict[int, int]) -> dict[str, int]:
    """Which GPU holds each module, spreading the decoder layers evenly over ``budgets`` (bytes of weights
    per GPU index), each layer whole; tied parameters (embeddings / LM head) stay together."""
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    no_split = sorted(getattr(model, "_no_split_modules", None) or [])
    dtype = next(model.parameters()).dtype
    limits = {**budgets, "cpu": 0}  # never offload: a replica that does not fit is an error
    balanced = get_balanced_memory(model, max_memory=limits, no_split_module_classes=no_split, dtype=dtype)
    device_map = infer_auto_device_map(model, max_memory=balanced, no_split_module_classes=no_split, dtype=dtype)
    misplaced = sorted({str(device) for device in device_map.values() if device not in budgets})
    if misplaced:
        total = sum(p.numel() * p.element_size() for p in model.parameters())
        raise RuntimeError(f"the model ({total / 2**30:.1f} GiB of weights) does not fit {len(budgets)} GPU(s) with "
                           f"budgets {budgets} bytes; ask for more GPUs per actor (resources.*.num_gpus)")
    return dict(device_map)


def gpu_budgets(devices: int, memory_fraction: float) -> dict[int, int]:
    """``memory_fraction`` of each visible GPU's free memory, in bytes."""
    return {index: int(torch.accelerator.get_memory_info(index)[0] * memory_fraction) for index in range(devices)}


def place_model(model, placement: Placement):
    """Put a model (loaded on CPU) where ``placement`` says; returns the model to use."""
    if placement.strategy == "cpu":
        return model
    if placement.strategy == "single-device":
        return model.to(torch.accelerator.current_accelerator())
    if placement.strategy == "device-map":
        from accelerate import dispatch_model

        device_map = device_map_for(model, gpu_budgets(placement.devices, placement.memory_fraction))
        return dispatch_model(model, device_map=device_map)
    return shard_for_inference(model, placement)


def deepspeed_inference_config(placement: Placement, dtype: torch.dtype) -> dict:
    """The keyword arguments of ``deepspeed.init_inference``: AutoTP tensor parallelism over the
    placement's ranks, the model's dtype, and no kernel injection (the model's own attention and MLP
    code runs, so its scores match the transformers path)."""
    if placement.strategy != "deepspeed":
        raise ValueError(f"not a DeepSpeed placement: {placement.strategy}")
    return {"tensor_parallel": {"tp_size": placement.tensor_parallel}, "dtype": dtype,
            "replace_with_kernel_inject": False}


def shard_for_inference(model, placement: Placement):
    """``deepspeed.init_inference`` on this process's rank of the group; the model's weights must be
    final (see the module docstring). Returns the sharded module, called like the model.

    On a CPU rank (the model on the CPU: DeepSpeed's CPU accelerator, ``DS_ACCELERATOR=cpu``) the
    row-parallel sums go through the group's gloo ``all_reduce``: DeepSpeed's shared-memory all-reduce
    kernel is switched off, because it is compiled at first use (minutes, and a compiler on every node)
    and, unless ``LOCAL_SIZE`` names the world size, runs without its shared buffers and crashes the
    rank (DeepSpeed 0.19.8: SIGSEGV in ``inference_all_reduce_``)."""
    import deepspeed  # only here: CPU machines and editing never need it

    on_cpu = next(model.parameters()).device.type == "cpu" and not torch.accelerator.is_available()
    if on_cpu:
        disable_shared_memory_all_reduce()
    # DeepSpeed's communication layer wraps the torch.distributed group when one is already
    # initialised (an evaluation group's rank joined it): it starts one only where none is.
    deepspeed.init_distributed()
    if not on_cpu:
        torch.accelerator.set_device_index(int(os.environ.get("LOCAL_RANK", "0")))
    dtype = next(model.parameters()).dtype
    engine = deepspeed.init_inference(model, **deepspeed_inference_config(placement, dtype))
    return engine.module


def disable_shared_memory_all_reduce() -> None:
    """Mark DeepSpeed's CPU shared-memory communication op as not buildable, before its communication
    backend starts (it reads the table once, at ``init_distributed``): collectives then go through
    ``torch.distributed`` (gloo)."""
    from deepspeed import ops
    from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder

    ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False
