"""Constrained fine-tuning baselines: FT-L and FT-M.

One MLP output projection W (the same module the locate-then-edit methods rewrite) is fine-tuned
through an additive D = W − W₀, Adam, at most ``num_steps`` steps, and after every step the box
constraint |D| ≤ ε element-wise (FT-L, Zhu et al. 2020 / ROME's baseline).
- ``objective="prompt_last"`` (FT-L as in ROME's baseline code): every target token is scored from
  the distribution at the last prompt token.
- ``objective="target"`` (FT-M): teacher-forced NLL of the target tokens given the prompt.
The loss gains the edit context's optimiser's ``weight_penalty`` of D where a constraint supplies one
(FT has no target vector: the registry's optimiser hook, ``methods.Constraint.optimise``, reaches FT
through this penalty alone).
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from workers.editing.context import EditContext
from workers.editing.delta import LayerDelta, WeightDelta
from workers.editing.hparams import FTHParams
from workers.editing.errors import EditFailure
from workers.editing.record import StepInfo
from workers.editing.tokens import check_length, right_padded, target_token_ids
from workers.hooks import patch_output
from workers.models import arch_spec, edited_weight


def _batch(tokenizer, requests, objective: str, device):
    sequences, rows, positions, tokens = [], [], [], []
    for row, request in enumerate(requests):
        prompt = tokenizer(request.prompt)["input_ids"]
        target = target_token_ids(tokenizer, request.target_new)
        if objective == "prompt_last":
            sequences.append(prompt)
            positions += [len(prompt) - 1] * len(target)
        else:
            sequences.append(prompt + target[:-1])
            positions += list(range(len(prompt) - 1, len(prompt) - 1 + len(target)))
        rows += [row] * len(target)
        tokens += target
    batch = right_padded(tokenizer, sequences, [0] * len(sequences), device)
    as_tensor = lambda values: torch.tensor(values, device=device)  # noqa: E731
    return batch, as_tensor(rows), as_tensor(positions), as_tensor(tokens)


def apply_ft(model, tokenizer, requests, hparams: FTHParams, ctx: EditContext, method: str = "ft-l"):
    start = time.perf_counter()
    module = arch_spec(model).mlp_out_name(hparams.layer)
    weight = edited_weight(model, module)
    device = weight.device
    batch, rows, positions, tokens = _batch(tokenizer, requests, hparams.objective, device)
    check_length(model, batch.input_ids.shape[1], "an FT prompt")
    n_requests = len(requests)

    addition = torch.zeros(weight.shape, dtype=torch.float32, device=device, requires_grad=True)
    optimiser = torch.optim.Adam([addition], lr=hparams.lr)
    penalty = ctx.optimiser.weight_penalty()
    lm_head = model.get_output_embeddings()

    def objective() -> tuple[torch.Tensor, torch.Tensor]:
        # W_eff k = W₀ k + D k: the projection's output gains its input times D. D is float32 whatever the
        # model's dtype (Adam's state and the written update), so D k is too, cast to the output's dtype once.
        with patch_output(model, module, lambda out, k: out + F.linear(k.float(), addition).to(out.dtype),
                          with_input=True):
            hidden = model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        logprobs = F.log_softmax(lm_head(hidden[rows, positions]).float(), dim=-1)
        token_nll = -logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)
        # Mean over each request's target tokens, then over requests.
        per_request = torch.zeros(n_requests, device=device).index_add(0, rows, token_nll)
        counts = torch.zeros(n_requests, device=device).index_add(0, rows, torch.ones_like(token_nll))
        nll = (per_request / counts).mean()
        total = nll if penalty is None else nll + penalty(addition)
        return total, nll

    loss, steps = math.inf, 0
    for step in range(hparams.num_steps):
        steps = step + 1
        optimiser.zero_grad(set_to_none=True)
        total, nll = objective()
        loss = float(total.detach())
        if not math.isfinite(loss):
            raise EditFailure(f"the FT loss became {loss} at step {step}")
        if loss < hparams.early_stop_loss:
            break
        total.backward()
        optimiser.step()
        if hparams.norm_constraint > 0:
            with torch.no_grad():
                addition.clamp_(-hparams.norm_constraint, hparams.norm_constraint)
    info = StepInfo(loss=loss, delta_norm=float(addition.detach().norm()), steps=steps)
    info.seconds["targets"] = time.perf_counter() - start
    start = time.perf_counter()
    layer_delta = LayerDelta(module, addition.detach().clone(), layer=hparams.layer)
    layer_delta.apply(model)
    info.seconds["update"] = time.perf_counter() - start
    return WeightDelta([layer_delta], [r.case_id for r in requests], method), info
