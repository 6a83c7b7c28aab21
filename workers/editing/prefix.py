"""Running the decoder layers above the edited one with δ added at the subject's last token.

Layers 0..``layer`` do not depend on δ (δ is added to layer ``layer``'s output), so their output is
computed once with the original weights and replayed at every step; the layers above see δ. Two ways
of running those upper layers, which give the same result up to float round-off:

- ``FullRun`` (``prefix_reuse: false``, the earlier implementation): every token of every
  right-padded row goes through the upper layers at every step.
- ``SuffixRun`` (``prefix_reuse: true``): attention is causal and δ enters at the subject's last
  token, so every position *before* that token is the same at every step in every layer. The rows
  are aligned on that token (tokens.aligned_on_lookup), the upper layers' keys/values of the prefix
  columns are taken from the one forward pass with the original weights, and each step runs only the
  suffix columns, attending to the cached prefix through an explicit mask (causal, padding masked)
  and each token's own position ids (so RoPE rotates it as in the unpadded sequence).

Both expose the setup pass's outputs and each step's final hidden states in *run coordinates*:
column = position in the row's own sequence − ``offset[row]``.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from transformers import DynamicCache

from workers.editing.tokens import AlignedBatch, PromptBatch
from workers.hooks import Trace, modules_replaced
from workers.models import arch_spec


class Passthrough(torch.nn.Module):
    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


class Replay(torch.nn.Module):
    """Stands in for decoder layer ``layer``: returns its cached output with δ added by ``inject``."""

    def __init__(self, cached: torch.Tensor, tuple_output: bool, inject: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.cached, self.tuple_output, self.inject = cached, tuple_output, inject

    def forward(self, hidden_states, *args, **kwargs):
        out = self.inject(self.cached)
        return (out,) if self.tuple_output else out


def layers_replaced(model, layer: int, replacement: torch.nn.Module):
    """Within the block, decoder layers 0..layer-1 pass their input through and layer ``layer`` is
    ``replacement`` (hooks.modules_replaced: put back on exit)."""
    spec = arch_spec(model)
    swaps = {spec.layer_name(i): Passthrough() for i in range(layer)}
    swaps[spec.layer_name(layer)] = replacement
    return modules_replaced(model, swaps)


class SetupOutputs:
    """The forward pass with the original weights, in run coordinates (rows, columns, hidden)."""

    def __init__(self, trace: Trace, layer_name: str, mlp_name: str, final: torch.Tensor, columns: slice):
        self.tuple_output = trace.tuple_outputs[layer_name]
        self.layer_out = trace.outputs[layer_name][:, columns]
        self.mlp_out = trace.outputs[mlp_name][:, columns]
        self.final = final[:, columns]


class FullRun:
    """Upper layers on every token at every step (the cached-hidden-state path)."""

    def __init__(self, model, layer: int, batch: PromptBatch):
        self.model, self.layer, self.batch = model, layer, batch
        spec = arch_spec(model)
        layer_name, mlp_name = spec.layer_name(layer), spec.mlp_out_name(layer)
        with torch.no_grad(), Trace(model, [layer_name, mlp_name], outputs=True) as trace:
            final = model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        self.setup = SetupOutputs(trace, layer_name, mlp_name, final, slice(None))
        self.offset = torch.zeros_like(batch.lookup)

    def final_hidden(self, deltas: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states with ``deltas`` (one per row run) added at each row's subject token; only
        the batch rows ``rows`` are run when given (in that order), every row otherwise."""
        pick = functools.partial(select_rows, rows=rows)
        lookup = pick(self.batch.lookup)
        positions = torch.arange(len(lookup), device=lookup.device)

        def inject(cached: torch.Tensor) -> torch.Tensor:
            update = torch.zeros_like(cached)
            update = update.index_put((positions, lookup), deltas.to(cached.dtype))
            return cached + update

        replay = Replay(pick(self.setup.layer_out), self.setup.tuple_output, inject)
        with layers_replaced(self.model, self.layer, replay):
            return self.model.base_model(input_ids=pick(self.batch.input_ids),
                                         attention_mask=pick(self.batch.attention_mask)).last_hidden_state


def select_rows(tensor: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """``tensor``'s batch rows ``rows`` (its first dimension), or all of it when ``rows`` is None."""
    return tensor if rows is None else tensor[rows]


def additive_mask(real: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(rows, 1, width, width) additive attention mask: causal, padding keys masked. A padding query
    may attend to itself, so no row of the softmax is empty (no NaN from sdpa); no real token ever
    attends to padding, so what padding computes never reaches the loss."""
    width = real.shape[1]
    index = torch.arange(width, device=real.device)
    causal = index.view(1, -1, 1) >= index.view(1, 1, -1)
    allowed = causal & (real.unsqueeze(1) | torch.eye(width, dtype=torch.bool, device=real.device))
    mask = torch.zeros(allowed.shape, dtype=dtype, device=real.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min).unsqueeze(1)


class SuffixRun:
    """Upper layers on the suffix columns only, attending to the prefix keys/values cached once."""

    def __init__(self, model, layer: int, batch: AlignedBatch):
        self.model, self.layer, self.batch = model, layer, batch
        spec = arch_spec(model)
        layer_name, mlp_name = spec.layer_name(layer), spec.mlp_out_name(layer)
        dtype = next(model.parameters()).dtype
        mask = additive_mask(batch.real, dtype)
        cache = DynamicCache(config=model.config)
        with torch.no_grad(), Trace(model, [layer_name, mlp_name], outputs=True) as trace:
            final = model.base_model(input_ids=batch.input_ids, attention_mask=mask, position_ids=batch.position_ids,
                                     cache=cache, use_cache=True).last_hidden_state
        prefix = batch.prefix
        self.setup = SetupOutputs(trace, layer_name, mlp_name, final, slice(prefix, None))
        # The prefix keys/values of every layer above ``layer`` (those below are never run again).
        self.prefix_kv = [(i, cache.layers[i].keys[:, :, :prefix], cache.layers[i].values[:, :, :prefix])
                          for i in range(layer + 1, model.config.num_hidden_layers)] if prefix else []
        self.suffix_ids = batch.input_ids[:, prefix:]
        self.suffix_mask = mask[:, :, prefix:]
        self.suffix_positions = batch.position_ids[:, prefix:]
        self.offset = batch.lookup

    def final_hidden(self, deltas: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states with ``deltas`` (one per row run) added at each row's subject token; only
        the batch rows ``rows`` are run when given (in that order), every row otherwise."""
        pick = functools.partial(select_rows, rows=rows)

        def inject(cached: torch.Tensor) -> torch.Tensor:
            # δ at column 0, the subject's last token of every row.
            return torch.cat([cached[:, :1] + deltas.to(cached.dtype).unsqueeze(1), cached[:, 1:]], dim=1)

        # A fresh cache per step: the layers append the suffix's keys/values to it.
        cache = DynamicCache(config=self.model.config)
        for i, keys, values in self.prefix_kv:
            cache.update(pick(keys), pick(values), i)
        replay = Replay(pick(self.setup.layer_out), self.setup.tuple_output, inject)
        with layers_replaced(self.model, self.layer, replay):
            return self.model.base_model(input_ids=pick(self.suffix_ids), attention_mask=pick(self.suffix_mask),
                                         position_ids=pick(self.suffix_positions), cache=cache,
                                         use_cache=True).last_hidden_state
