"""The target-vector optimisation shared by ROME (v*), MEMIT and AlphaEdit (z), and wrapped by EAC.

For one request, δ (hidden size) is added to the output of decoder layer ``layer`` at the subject's
last token of every rewriting prompt and of the KL prompt "{subject} is a". Adding δ to a decoder
layer's output equals adding it to that layer's MLP output (the residual sum is linear), so the
same code serves ROME (δ on the MLP output of the edited layer, v_init = that MLP output) and MEMIT
(δ on the residual stream after the last edited layer, v_init = that residual).

Loss (ROME Eq. 9, as the ROME code computes it), per step:
    L(δ) = mean_prompts[ mean_target_tokens −log P(o* | x_j + p) ]
           + kl_factor · KL(P_δ(· | p') ‖ P_0(· | p'))                 at the KL prompt's subject token
           + weight_decay · ‖δ‖₂ / ‖v_init‖₂²
Adam (lr), at most ``num_steps`` steps, stop as soon as L < early_stop_loss, no update after the last
evaluation, and after every step ‖δ‖ ≤ clamp_norm_factor · ‖v_init‖.

Work the loss does not need is not done (the two reasons this beats the naive loop):
- the hidden state entering layer ``layer + 1`` does not depend on δ except through δ itself, so it
  is computed once; during optimisation layers 0..layer are replaced by a replay of that cache;
- logits are needed only at the target positions and the KL position, so the LM head runs there only.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from workers.batching import pad_right
from workers.data import EditRequest
from workers.hooks import Trace
from workers.models import arch_spec


class EditFailure(RuntimeError):
    """An edit that cannot be made (bad input or a numerical fault); the model is left untouched."""


# --------------------------------------------------------------------------------------------
# Tokenisation of requests


def target_token_ids(tokenizer, target: str) -> list[int]:
    """Token ids of the target with one leading space and no special tokens (no BOS: a known bug of
    the released MEMIT code keeps LLaMA's BOS inside the target)."""
    ids = tokenizer(" " + target.strip(), add_special_tokens=False)["input_ids"] if target.strip() else []
    if not ids:
        raise EditFailure(f"target {target!r} tokenises to nothing")
    return ids


def subject_last_token_index(tokenizer, text: str, subject: str) -> int:
    """Index of the subject's last token in ``tokenizer(text)`` (its last occurrence), special tokens
    included — ROME's "subject_last" lookup."""
    end = text.rindex(subject) + len(subject)
    return len(tokenizer(text[:end])["input_ids"]) - 1


def check_length(model, n_tokens: int, what: str) -> None:
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if limit is not None and n_tokens > limit:
        raise EditFailure(f"{what} is {n_tokens} tokens, longer than the model's context ({limit})")


@dataclass
class PromptBatch:
    """Right-padded token ids with the positions the loss and the injection need."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    lookup: torch.Tensor  # (rows,) subject-last-token position per row


def right_padded(tokenizer, sequences: Sequence[list[int]], lookup: Sequence[int], device) -> PromptBatch:
    ids, mask = pad_right(sequences, tokenizer.pad_token_id, device)
    return PromptBatch(ids, mask, torch.tensor(list(lookup), device=device))


# --------------------------------------------------------------------------------------------
# Running the model from a cached hidden state


class _Passthrough(torch.nn.Module):
    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


class _Replay(torch.nn.Module):
    """Stands in for decoder layer ``layer``: returns its cached output with δ added at the lookups."""

    def __init__(self, cached: torch.Tensor, tuple_output: bool, inject: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.cached, self.tuple_output, self.inject = cached, tuple_output, inject

    def forward(self, hidden_states, *args, **kwargs):
        out = self.inject(self.cached)
        return (out,) if self.tuple_output else out


@contextmanager
def layers_replaced(model, layer: int, replacement: torch.nn.Module):
    """Within the block, decoder layers 0..layer-1 pass their input through and layer ``layer`` is
    ``replacement``; the original modules are put back on exit, whatever happens."""
    container = model.get_submodule(arch_spec(model).layers.rsplit(".", 1)[0])
    originals = [container[i] for i in range(layer + 1)]
    try:
        for i in range(layer):
            container[i] = _Passthrough()
        container[layer] = replacement
        yield
    finally:
        for i, module in enumerate(originals):
            container[i] = module


# --------------------------------------------------------------------------------------------
# The optimisation problem for one request


@dataclass
class LossParts:
    total: torch.Tensor
    nll: torch.Tensor
    kl: torch.Tensor
    weight_decay: torch.Tensor


@dataclass
class TargetConfig:
    """The shared optimiser's settings (a view of a method's hyper-parameters)."""

    num_steps: int = 20
    lr: float = 0.5
    weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    early_stop_loss: float = 5e-2


class TargetProblem:
    """Everything that stays fixed while δ is optimised for one request at one layer."""

    def __init__(self, model, tokenizer, request: EditRequest, layer: int, context_templates: Sequence[str],
                 *, init_from: str, config: TargetConfig):
        if init_from not in ("mlp", "residual"):
            raise ValueError(f"init_from must be 'mlp' or 'residual', got {init_from!r}")
        self.model, self.layer, self.config = model, layer, config
        spec = arch_spec(model)
        self.device = next(model.parameters()).device
        self.layer_name = spec.layer_name(layer)
        target_ids = target_token_ids(tokenizer, request.target_new)
        self.target_ids = torch.tensor(target_ids, device=self.device)

        # Rewriting prompts: template ∘ prompt, then the target tokens except the last (token ids are
        # concatenated, not re-tokenised, so the target is exactly what the loss scores).
        texts = [template.format(request.prompt_template).format(request.subject) for template in context_templates]
        sequences, lookups = [], []
        for text in texts:
            ids = tokenizer(text)["input_ids"]
            sequences.append(ids + target_ids[:-1])
            lookups.append(subject_last_token_index(tokenizer, text, request.subject))
        kl_text = f"{request.subject} is a"
        sequences.append(tokenizer(kl_text)["input_ids"])
        lookups.append(subject_last_token_index(tokenizer, kl_text, request.subject))
        check_length(model, max(len(s) for s in sequences), f"case {request.case_id}'s longest rewriting prompt")
        self.batch = right_padded(tokenizer, sequences, lookups, self.device)
        self.n_rewrite = len(texts)
        rows = len(sequences)
        self.rows = torch.arange(rows, device=self.device)

        # Loss positions: logits at position p predict token p + 1.
        n_target = len(target_ids)
        lengths = self.batch.attention_mask.sum(dim=1)
        first = lengths[: self.n_rewrite] - n_target
        offsets = torch.arange(n_target, device=self.device)
        self.target_rows = torch.arange(self.n_rewrite, device=self.device).repeat_interleave(n_target)
        self.target_pos = (first.unsqueeze(1) + offsets).reshape(-1)
        self.target_tok = self.target_ids.repeat(self.n_rewrite)
        self.kl_row, self.kl_pos = rows - 1, self.batch.lookup[-1]

        # One forward pass with the original weights: the cached output of ``layer``, v_init, and the
        # reference next-token distribution at the KL position.
        mlp_name = spec.mlp_out_name(layer)
        with torch.no_grad(), Trace(model, [self.layer_name, mlp_name], outputs=True) as trace:
            hidden = model.base_model(input_ids=self.batch.input_ids,
                                      attention_mask=self.batch.attention_mask).last_hidden_state
        self.tuple_output = trace.tuple_outputs[self.layer_name]
        self.cached_hidden = trace.outputs[self.layer_name]
        source = trace.outputs[mlp_name] if init_from == "mlp" else trace.outputs[self.layer_name]
        # ROME/MEMIT take v_init from the first rewriting prompt (the bare "{}" template).
        self.v_init = source[0, self.batch.lookup[0]].detach().float().clone()
        lm_head = model.get_output_embeddings()
        self.kl_reference = F.log_softmax(lm_head(hidden[self.kl_row, self.kl_pos]).float(), dim=-1).detach()

    def _inject(self, delta: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        def inject(cached: torch.Tensor) -> torch.Tensor:
            update = torch.zeros_like(cached)
            update = update.index_put((self.rows, self.batch.lookup), delta.to(cached.dtype).expand(len(self.rows), -1))
            return cached + update
        return inject

    def loss(self, delta: torch.Tensor) -> LossParts:
        model = self.model
        replay = _Replay(self.cached_hidden, self.tuple_output, self._inject(delta))
        with layers_replaced(model, self.layer, replay):
            hidden = model.base_model(input_ids=self.batch.input_ids,
                                      attention_mask=self.batch.attention_mask).last_hidden_state
        lm_head = model.get_output_embeddings()
        target_logits = lm_head(hidden[self.target_rows, self.target_pos]).float()
        token_nll = -F.log_softmax(target_logits, dim=-1).gather(1, self.target_tok.unsqueeze(1)).squeeze(1)
        # Mean over each prompt's target tokens, then over prompts (all prompts have the same count).
        nll = token_nll.view(self.n_rewrite, -1).mean(dim=1).mean()
        kl_logprobs = F.log_softmax(lm_head(hidden[self.kl_row, self.kl_pos]).float(), dim=-1)
        kl = self.config.kl_factor * F.kl_div(self.kl_reference, kl_logprobs, log_target=True, reduction="sum")
        weight_decay = self.config.weight_decay * (delta.norm() / self.v_init.norm() ** 2)
        return LossParts(nll + kl + weight_decay, nll, kl, weight_decay)


@dataclass
class OptimisationResult:
    delta: torch.Tensor
    loss: float
    nll: float
    steps: int  # loss evaluations made
    gradients: list[torch.Tensor] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)


def optimise_delta(problem: TargetProblem, *, num_steps: int | None = None, lr: float | None = None,
                   init: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                   penalty: Callable[[torch.Tensor], torch.Tensor] | None = None,
                   record_gradients: bool = False, update_last: bool = False) -> OptimisationResult:
    """Minimise ``problem.loss(δ) + penalty(δ)`` over δ with Adam, as ROME's compute_v does.

    ``mask`` (0/1 per dimension) restricts optimisation to those dimensions: δ = mask ⊙ θ, so the
    others stay exactly zero. ``record_gradients`` keeps the gradient of the optimised objective
    with respect to θ at every evaluated step (with no mask and no penalty: ∇L(δ), as EAC's probe needs).
    compute_v makes no update after its last evaluation (num_steps − 1 updates); ``update_last``
    makes one there too (num_steps updates, as the EAC authors' loops do), so the returned δ is one
    step past the last reported loss. An early stop never updates.
    """
    config = problem.config
    num_steps = config.num_steps if num_steps is None else num_steps
    lr = config.lr if lr is None else lr
    device = problem.v_init.device
    theta = (init.detach().clone().float() if init is not None
             else torch.zeros_like(problem.v_init)).to(device).requires_grad_(True)
    mask_t = None if mask is None else mask.to(device=device, dtype=theta.dtype)
    optimiser = torch.optim.Adam([theta], lr=lr)
    max_norm = config.clamp_norm_factor * problem.v_init.norm()
    result = OptimisationResult(delta=theta.detach().clone(), loss=math.inf, nll=math.inf, steps=0)

    def current(t: torch.Tensor) -> torch.Tensor:
        return t if mask_t is None else t * mask_t

    for step in range(num_steps):
        optimiser.zero_grad(set_to_none=True)
        delta = current(theta)
        parts = problem.loss(delta)
        total = parts.total + (penalty(delta) if penalty is not None else 0.0)
        value = float(total.detach())
        if not math.isfinite(value):
            raise EditFailure(f"the target loss became {value} at step {step}")
        result.steps, result.loss, result.nll = step + 1, value, float(parts.nll.detach())
        result.losses.append(value)
        stop = value < config.early_stop_loss or (step == num_steps - 1 and not update_last)
        if stop and not record_gradients:
            break
        total.backward()
        if record_gradients:
            result.gradients.append(theta.grad.detach().clone())
        if stop:
            break
        optimiser.step()
        with torch.no_grad():
            if mask_t is not None:
                theta.mul_(mask_t)
            norm = current(theta).norm()
            if norm > max_norm:
                theta.mul_(max_norm / norm)
    result.delta = current(theta).detach().clone()
    return result
