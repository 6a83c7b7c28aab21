"""Tensor-parallel evaluation: one model replica sharded over a group of processes (ranks), SPMD.

A sharded evaluation replica is ``ranks`` processes (Ray actors in ``workers.actors.EvalGroup``) that
form one ``torch.distributed`` group — rank 0 publishes the rendezvous address (``rendezvous_address``),
every rank joins it (``join_group``; NCCL on GPUs, gloo on CPU). Each rank loads the base model whole
and scores a checkpoint exactly as an unsharded evaluator does (``CheckpointEvaluator``), with one
difference: the forward passes run on a *sharded copy* of the model holding its final weights (base +
the log's steps replayed, then sharded — sharding replaces the projections by per-rank slices, so it
cannot be undone, and the edit log is applied to the whole weights first; ``TensorParallelScorer``).
Every rank runs the same batches in the same order (every collective of a forward pass needs all of
them); rank 0 returns the rows.

Two shardings, behind the same group code (``workers.placement.plan_evaluation_group`` picks one):

- ``deepspeed``: ``deepspeed.init_inference`` with AutoTP over the group (``placement.shard_for_inference``),
  wherever DeepSpeed is installed: NCCL on GPUs, DeepSpeed's CPU accelerator and gloo on CPU (tested here);
- ``torch``: PyTorch's own tensor parallelism (``torch.distributed.tensor.parallel``) with the model's
  published plan (``config.base_model_tp_plan``: Megatron-style column-parallel q/k/v, gate and up
  projections, row-parallel o and down projections, so each decoder block needs two all-reduces),
  over a device mesh of the group — NCCL on GPUs; gloo on CPU (tested here too).

Round-off: a row-parallel projection sums the ranks' partial products in another order than one
matrix product does, so scores differ from the unsharded ones in the last bits (float32: about 1e-6
relative); greedy generations are identical unless two tokens tie to that precision.

The unedited model's cached predictions (``ReferenceCache``) are kept in memory per rank, never shared
on disk: a rank that found a prediction another process had just written would skip a forward pass
the others run, and the group would wait forever in its next collective.
"""

from __future__ import annotations

import copy
import socket
from datetime import timedelta

import torch

from workers.placement import Placement, shard_for_inference

COLLECTIVE_TIMEOUT = timedelta(minutes=30)  # a rank that waits this long for the others fails


def backend_for(use_accelerator: bool) -> str:
    return "nccl" if use_accelerator else "gloo"


def rendezvous_address(host: str) -> str:
    """``host:port`` where rank 0 will listen: ``host`` (its node's address, as Ray knows it: loopback
    on a local instance) and a port free now on it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port = probe.getsockname()[1]
    return f"{host}:{port}"


def join_group(rank: int, world_size: int, address: str, backend: str) -> None:
    """Join the group whose rank 0 listens at ``address`` (blocks until every rank has joined)."""
    if torch.distributed.is_initialized():
        raise RuntimeError("this process already belongs to a torch.distributed group")
    torch.distributed.init_process_group(backend, init_method=f"tcp://{address}", rank=rank,
                                         world_size=world_size, timeout=COLLECTIVE_TIMEOUT)


def tensor_parallel_plan(model) -> dict:
    """``parallelize_module``'s plan from the model's published one (``config.base_model_tp_plan``,
    names relative to the base model), as PyTorch's parallel styles."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    published = getattr(model.config, "base_model_tp_plan", None)
    if not published:
        raise ValueError(f"{type(model).__name__} publishes no tensor-parallel plan (config.base_model_tp_plan); "
                         "evaluate it with engine 'transformers'")
    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    unknown = sorted({style for style in published.values() if style not in styles})
    if unknown:
        raise ValueError(f"{type(model).__name__}'s tensor-parallel plan uses styles {unknown}; "
                         f"only {sorted(styles)} are supported")
    prefix = model.base_model_prefix
    return {f"{prefix}.{name}": styles[style]() for name, style in published.items()}


def check_divisible(model, ranks: int) -> None:
    """Column-parallel q/k/v split whole attention heads: each rank needs the same number of them."""
    config = model.config
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if heads is None or heads % ranks or kv_heads % ranks:
        raise ValueError(f"{ranks} tensor-parallel ranks cannot split {heads} attention heads and {kv_heads} "
                         "key/value heads evenly; ask for a number of ranks that divides both")


def shard_with_torch(model, ranks: int, use_accelerator: bool):
    """The model sharded in place over the default group with PyTorch tensor parallelism."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    check_divisible(model, ranks)
    device = torch.accelerator.current_accelerator() if use_accelerator else torch.device("cpu")
    model.to(device)  # the replicated modules (embeddings, norms) live on the rank's device too
    mesh = init_device_mesh(device.type, (ranks,))
    return parallelize_module(model, mesh, tensor_parallel_plan(model))


class TensorParallelScorer:
    """The modules a rank runs its forward passes on: ``base`` (a sharded copy of the unedited model,
    kept for the replica's life) and ``edited`` (a sharded copy of the model as it is now, i.e. inside
    ``methods.scored_weights(model, log)``; dropped after the checkpoint). The model itself stays whole
    and unsharded: edit logs are applied to it and deviations measured on it."""

    def __init__(self, sharding: str, ranks: int, use_accelerator: bool):
        self.sharding, self.ranks, self.use_accelerator = sharding, ranks, use_accelerator
        self.sharded_base = None

    def shard(self, model):
        replica = copy.deepcopy(model)
        if self.sharding == "deepspeed":
            return shard_for_inference(replica, Placement("deepspeed", 1, tensor_parallel=self.ranks))
        return shard_with_torch(replica, self.ranks, self.use_accelerator)

    def base(self, model):
        if self.sharded_base is None:
            self.sharded_base = self.shard(model)
        return self.sharded_base

    def edited(self, model):
        return self.shard(model)

    def parallel_layers(self) -> int:
        """Modules of the sharded base that the sharding replaced: DeepSpeed's AutoTP layers
        (``deepspeed.module_inject``) or modules holding PyTorch DTensor weights."""
        if self.sharded_base is None:
            return 0
        if self.sharding == "deepspeed":
            return sum(type(m).__module__.startswith("deepspeed.") for m in self.sharded_base.modules())
        from torch.distributed.tensor import DTensor

        return sum(isinstance(getattr(m, "weight", None), DTensor) for m in self.sharded_base.modules())
