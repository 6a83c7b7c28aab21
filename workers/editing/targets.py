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

Work the loss does not need is not done (why this beats the naive loop):
- the hidden state entering layer ``layer + 1`` does not depend on δ except through δ itself, so it
  is computed once; during optimisation layers 0..layer are replaced by a replay of that cache;
- with ``prefix_reuse`` (default), the positions before the subject's last token do not depend on δ
  in any layer (causal attention), so their keys/values are cached once and each step runs the
  upper layers on the suffix only (prefix.py); ``prefix_reuse: false`` runs every token (prefix.FullRun);
- logits are needed only at the target positions and the KL position, so the LM head runs there only.
Tokenisation of the request is in tokens.py; the settings (TargetConfig) in hparams.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from workers.data import EditRequest
from workers.editing.errors import EditFailure
from workers.editing.hparams import TargetConfig
from workers.editing.prefix import FullRun, SuffixRun
from workers.editing.tokens import (aligned_on_lookup, check_length, rewriting_prompts, right_padded,
                                    target_token_ids)
from workers.models import model_device


@dataclass
class LossParts:
    total: torch.Tensor
    nll: torch.Tensor
    kl: torch.Tensor
    weight_decay: torch.Tensor


class TargetProblem:
    """Everything that stays fixed while δ is optimised for one request at one layer.

    ``batch`` is the right-padded rewriting batch (KL prompt last) and ``target_rows``/``target_pos``
    /``target_tok`` the loss positions in each row's own sequence, whichever way ``run`` computes them.
    """

    def __init__(self, model, tokenizer, request: EditRequest, layer: int, context_templates: Sequence[str],
                 *, init_from: str, config: TargetConfig):
        if init_from not in ("mlp", "residual"):
            raise ValueError(f"init_from must be 'mlp' or 'residual', got {init_from!r}")
        self.model, self.layer, self.config = model, layer, config
        self.device = model_device(model)
        target_ids = target_token_ids(tokenizer, request.target_new)
        self.target_ids = torch.tensor(target_ids, device=self.device)
        sequences, lookups = rewriting_prompts(tokenizer, request, context_templates, target_ids)
        check_length(model, max(len(s) for s in sequences), f"case {request.case_id}'s longest rewriting prompt")
        self.batch = right_padded(tokenizer, sequences, lookups, self.device)
        self.n_rewrite = len(sequences) - 1

        # Loss positions: logits at position p predict token p + 1.
        n_target = len(target_ids)
        lengths = self.batch.attention_mask.sum(dim=1)
        first = lengths[: self.n_rewrite] - n_target
        offsets = torch.arange(n_target, device=self.device)
        self.target_rows = torch.arange(self.n_rewrite, device=self.device).repeat_interleave(n_target)
        self.target_pos = (first.unsqueeze(1) + offsets).reshape(-1)
        self.target_tok = self.target_ids.repeat(self.n_rewrite)
        self.kl_row, self.kl_pos = len(sequences) - 1, self.batch.lookup[-1]

        # One forward pass with the original weights: the cached output of ``layer``, v_init, and the
        # reference next-token distribution at the KL position.
        self.run = (SuffixRun(model, layer, aligned_on_lookup(sequences, lookups, tokenizer.pad_token_id, self.device))
                    if config.prefix_reuse else FullRun(model, layer, self.batch))
        self.target_cols = self.target_pos - self.run.offset[self.target_rows]
        self.kl_col = self.kl_pos - self.run.offset[self.kl_row]
        setup = self.run.setup
        source = setup.mlp_out if init_from == "mlp" else setup.layer_out
        # ROME/MEMIT take v_init from the first rewriting prompt (the bare "{}" template).
        self.v_init = source[0, self.batch.lookup[0] - self.run.offset[0]].detach().float().clone()
        lm_head = model.get_output_embeddings()
        self.kl_reference = F.log_softmax(lm_head(setup.final[self.kl_row, self.kl_col]).float(), dim=-1).detach()

    def loss(self, delta: torch.Tensor) -> LossParts:
        hidden = self.run.final_hidden(delta)
        lm_head = self.model.get_output_embeddings()
        target_logits = lm_head(hidden[self.target_rows, self.target_cols]).float()
        token_nll = -F.log_softmax(target_logits, dim=-1).gather(1, self.target_tok.unsqueeze(1)).squeeze(1)
        # Mean over each prompt's target tokens, then over prompts (all prompts have the same count).
        nll = token_nll.view(self.n_rewrite, -1).mean(dim=1).mean()
        kl_logprobs = F.log_softmax(lm_head(hidden[self.kl_row, self.kl_col]).float(), dim=-1)
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
    step past the last reported loss. An early stop (the plain loss ``problem.loss(δ).total`` below
    ``early_stop_loss``, whatever the penalty) never updates.
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
        # The stopping rule reads the plain target loss, not the penalty (EAC's elastic net), so a
        # constrained run stops exactly when its base would.
        stop = float(parts.total.detach()) < config.early_stop_loss or (step == num_steps - 1 and not update_last)
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
