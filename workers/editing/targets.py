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
Several requests (MEMIT/AlphaEdit batches) are optimised together: their rows run in one batched
forward, each with its own δ. Rows never mix (attention and every other layer act within a row), so
the gradient of the summed loss with respect to δ_r is request r's own gradient, Adam acts element
by element, and each request stops at its own step — the same as optimising them one at a time.
Tokenisation of the request is in tokens.py; the settings (TargetConfig) in hparams.py.

``TargetOptimiser`` is what a base method calls: the plain optimisation above, unless a constraint
supplies another through the registry (``methods.Constraint.optimise``: EAC's two phases, eac.py; NAS's
rescaling of the solved target, nas.py; ENCORE's most-probable early stop, encore.py, through ``stop``).
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
from workers.editing.prefix import FullRun, SuffixRun, select_rows
from workers.editing.tokens import (aligned_on_lookup, check_length, rewriting_prompts, right_padded,
                                    target_token_ids)
from workers.models import arch_spec, model_device, submodule_name
from workers.packed_linear import LinearCompute, PackCache, linear_names, swapped


@dataclass
class LossParts:
    """The loss and its terms: scalars for one request (TargetProblem), (n,) for a TargetBatch."""

    total: torch.Tensor
    nll: torch.Tensor
    kl: torch.Tensor
    weight_decay: torch.Tensor
    # Per request (in the order of the parts): one bool per rewriting prompt, True where every target
    # token is the most probable next token there (what a most-probable stopping rule reads).
    most_probable: list[torch.Tensor] | None = None


# (request index in the batch, its ``most_probable`` bools, its plain loss) -> stop now. Made fresh for
# each optimisation (a rule may count), called once per request per evaluated step.
StopRule = Callable[[int, torch.Tensor, float], bool]


class TargetBatch:
    """Everything that stays fixed while δ_1..δ_n are optimised for n requests at one layer.

    ``batch`` is the right-padded rewriting batch (per request: its rewriting rows, then its KL row)
    and ``target_rows``/``target_pos``/``target_tok`` the loss positions in each row's own sequence,
    whichever way ``run`` computes them. ``v_inits`` is (n, hidden).
    """

    def __init__(self, model, tokenizer, requests: Sequence[EditRequest], layer: int,
                 context_templates: Sequence[str], *, init_from: str, config: TargetConfig,
                 compute: LinearCompute | PackCache = LinearCompute()):
        if init_from not in ("mlp", "residual"):
            raise ValueError(f"init_from must be 'mlp' or 'residual', got {init_from!r}")
        if not requests:
            raise ValueError("no request to optimise a target for")
        self.model, self.layer, self.config = model, layer, config
        self.device = model_device(model)
        sequences, lookups, first_rows, kl_rows, counts = [], [], [], [], []
        target_rows, target_pos, target_tok = [], [], []
        for index, request in enumerate(requests):
            ids = target_token_ids(tokenizer, request.target_new)
            rows, row_lookups = rewriting_prompts(tokenizer, request, context_templates, ids)
            check_length(model, max(len(s) for s in rows), f"case {request.case_id}'s longest rewriting prompt")
            first = len(sequences)
            # Loss positions: logits at position p predict token p + 1, so the last len(ids) positions
            # of each rewriting row (the KL row, last, has none).
            for row, sequence in enumerate(rows[:-1]):
                target_rows += [first + row] * len(ids)
                target_pos += range(len(sequence) - len(ids), len(sequence))
                target_tok += ids
            first_rows.append(first)
            kl_rows.append(first + len(rows) - 1)
            counts.append((len(rows) - 1, len(ids)))
            sequences += rows
            lookups += row_lookups
        self.n = len(requests)
        self.counts = counts  # per request: (rewriting prompts, target tokens)
        self.batch = right_padded(tokenizer, sequences, lookups, self.device)
        as_tensor = lambda values: torch.tensor(values, device=self.device)  # noqa: E731
        self.target_rows, self.target_pos, self.target_tok = map(as_tensor, (target_rows, target_pos, target_tok))
        self.row_request = as_tensor([i for i, (prompts, _) in enumerate(counts) for _ in range(prompts + 1)])
        kl_rows_t = as_tensor(kl_rows)

        # One forward pass with the original weights: the cached output of ``layer``, v_init, and the
        # reference next-token distribution at each KL position.
        self.run = (SuffixRun(model, layer, aligned_on_lookup(sequences, lookups, tokenizer.pad_token_id, self.device))
                    if config.prefix_reuse else FullRun(model, layer, self.batch))
        offset, lookup = self.run.offset, self.batch.lookup
        self.target_cols = self.target_pos - offset[self.target_rows]
        self.kl_rows, self.kl_cols = kl_rows_t, lookup[kl_rows_t] - offset[kl_rows_t]
        setup = self.run.setup
        source = setup.mlp_out if init_from == "mlp" else setup.layer_out
        # ROME/MEMIT take v_init from the first rewriting prompt (the bare "{}" template).
        first_t = as_tensor(first_rows)
        self.v_inits = source[first_t, lookup[first_t] - offset[first_t]].detach().float().clone()
        # The MLP output of ``layer`` at the same position (= v_inits for init_from="mlp"): the value
        # vector v0 inside the residual target, so that v* = mlp_inits + δ in either case.
        self.mlp_inits = setup.mlp_out[first_t, lookup[first_t] - offset[first_t]].detach().float().clone()
        # Constant within the request, so computed once: ‖v_init‖² (weight decay) and P_0 at the KL token.
        self.v_init_sq_norms = self.v_inits.norm(dim=-1) ** 2
        lm_head = model.get_output_embeddings()
        self.kl_reference = F.log_softmax(lm_head(setup.final[self.kl_rows, self.kl_cols]).float(), dim=-1).detach()
        # Every step runs the same frozen weights of the layers above ``layer`` and of the LM head: packed
        # once for oneDNN (packed_linear.py; same products within float32 round-off, ~2x faster here),
        # or taken from the edit context's PackCache where an earlier step packed them.
        self.linears = compute.pack(model, upper_linear_names(model, layer))

    def losses(self, deltas: torch.Tensor, requests: Sequence[int] | None = None) -> LossParts:
        """The loss of each request at ``deltas`` (n, hidden): (n,) tensors; with ``requests`` (ascending
        indices), only theirs, in that order — and only their rows are run, so a batch whose other
        requests have stopped costs what the remaining ones cost."""
        if requests is None or len(requests) == self.n:
            requests, rows = list(range(self.n)), None
            row_of = torch.arange(len(self.row_request), device=self.device)
        else:
            if list(requests) != sorted(set(requests)):  # rows are picked in batch order
                raise ValueError(f"requests must be distinct and ascending, got {list(requests)}")
            wanted = torch.as_tensor(list(requests), device=self.device)
            rows = torch.isin(self.row_request, wanted).nonzero().squeeze(1)
            # Batch row -> its position among the rows run (-1: not run).
            row_of = torch.full_like(self.row_request, -1)
            row_of[rows] = torch.arange(len(rows), device=self.device)
        with swapped(self.linears):
            return self._losses(deltas, requests, rows, row_of)

    def _losses(self, deltas, requests, rows, row_of) -> LossParts:
        hidden = self.run.final_hidden(deltas[select_rows(self.row_request, rows)], rows)
        lm_head = self.model.get_output_embeddings()
        kept = row_of[self.target_rows] >= 0
        target_logits = lm_head(hidden[row_of[self.target_rows[kept]], self.target_cols[kept]]).float()
        target_tok = self.target_tok[kept]
        token_nll = -F.log_softmax(target_logits, dim=-1).gather(1, target_tok.unsqueeze(1)).squeeze(1)
        token_top = (target_logits.argmax(dim=-1) == target_tok).detach()
        # Mean over each prompt's target tokens, then over the request's prompts (all the same count).
        # The kept requests' tokens are contiguous and in request order, as in the full batch.
        nll, most_probable, start = [], [], 0
        for prompts, tokens in (self.counts[r] for r in requests):
            nll.append(token_nll[start:start + prompts * tokens].view(prompts, tokens).mean(dim=1).mean())
            most_probable.append(token_top[start:start + prompts * tokens].view(prompts, tokens).all(dim=1))
            start += prompts * tokens
        nll = torch.stack(nll)
        index = torch.as_tensor(requests, device=self.device)
        kl_rows, kl_cols = self.kl_rows[index], self.kl_cols[index]
        kl_logprobs = F.log_softmax(lm_head(hidden[row_of[kl_rows], kl_cols]).float(), dim=-1)
        kl = self.config.kl_factor * F.kl_div(self.kl_reference[index], kl_logprobs, log_target=True,
                                              reduction="none").sum(dim=-1)
        weight_decay = self.config.weight_decay * (deltas[index].norm(dim=-1) / self.v_init_sq_norms[index])
        return LossParts(nll + kl + weight_decay, nll, kl, weight_decay, most_probable)


def upper_linear_names(model, layer: int) -> list[str]:
    """The linear layers a target step runs: those of the decoder layers above ``layer`` and the LM head."""
    spec = arch_spec(model)
    upper = [spec.layer_name(i) for i in range(layer + 1, model.config.num_hidden_layers)]
    return linear_names(model, upper + [submodule_name(model, model.get_output_embeddings())])


class TargetProblem(TargetBatch):
    """One request: ``v_init`` (hidden,) and ``loss(δ)`` with scalar parts."""

    def __init__(self, model, tokenizer, request: EditRequest, layer: int, context_templates: Sequence[str],
                 *, init_from: str, config: TargetConfig, compute: LinearCompute | PackCache = LinearCompute()):
        super().__init__(model, tokenizer, [request], layer, context_templates, init_from=init_from, config=config,
                         compute=compute)
        self.v_init = self.v_inits[0]

    def loss(self, delta: torch.Tensor) -> LossParts:
        parts = self.losses(delta.unsqueeze(0))
        return LossParts(parts.total[0], parts.nll[0], parts.kl[0], parts.weight_decay[0], parts.most_probable)


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
                   record_gradients: bool = False, update_last: bool = False,
                   stop: StopRule | None = None) -> OptimisationResult:
    """Minimise ``problem.loss(δ) + penalty(δ)`` over δ with Adam, as ROME's compute_v does.

    ``mask`` (0/1 per dimension) restricts optimisation to those dimensions: δ = mask ⊙ θ, so the
    others stay exactly zero. ``record_gradients`` keeps the gradient of the optimised objective
    with respect to θ at every evaluated step (with no mask and no penalty: ∇L(δ), as EAC's probe needs).
    compute_v makes no update after its last evaluation (num_steps − 1 updates); ``update_last``
    makes one there too (num_steps updates, as the EAC authors' loops do), so the returned δ is one
    step past the last reported loss. An early stop (the plain loss ``problem.loss(δ).total`` below
    ``early_stop_loss``, whatever the penalty, or ``stop`` saying so) never updates.
    """
    return optimise_deltas(problem, num_steps=num_steps, lr=lr, init=None if init is None else init.unsqueeze(0),
                           mask=mask, penalty=penalty, record_gradients=record_gradients,
                           update_last=update_last, stop=stop)[0]


def optimise_deltas(problem: TargetBatch, *, num_steps: int | None = None, lr: float | None = None,
                    init: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                    penalty: Callable[[torch.Tensor], torch.Tensor] | None = None,
                    record_gradients: bool = False, update_last: bool = False,
                    stop: StopRule | None = None) -> list[OptimisationResult]:
    """``optimise_delta`` for every request of ``problem`` at once, one result per request.

    θ is (n, hidden), ``init`` (n, hidden), ``mask`` (hidden,) or (n, hidden), ``penalty`` a function
    of one request's δ. Each request keeps its own step count and stops at its own step: once it
    stops, its δ is frozen (put back after each later Adam step) and its rows are no longer run, so
    its result is the one it would have had alone and the later steps cost what the others cost.
    ``stop`` is an extra early-stopping rule (a constraint's, e.g. a most-probable criterion), read
    after the loss threshold at every evaluated step of every request still optimising.
    """
    config = problem.config
    num_steps = config.num_steps if num_steps is None else num_steps
    lr = config.lr if lr is None else lr
    device = problem.v_inits.device
    theta = (init.detach().clone().float() if init is not None
             else torch.zeros_like(problem.v_inits)).to(device).requires_grad_(True)
    mask_t = None if mask is None else mask.to(device=device, dtype=theta.dtype)
    optimiser = torch.optim.Adam([theta], lr=lr)
    max_norm = config.clamp_norm_factor * problem.v_inits.norm(dim=-1, keepdim=True)
    results = [OptimisationResult(delta=row.detach().clone(), loss=math.inf, nll=math.inf, steps=0) for row in theta]
    active = list(range(problem.n))

    def current(t: torch.Tensor) -> torch.Tensor:
        return t if mask_t is None else t * mask_t

    for step in range(num_steps):
        optimiser.zero_grad(set_to_none=True)
        delta = current(theta)
        # Only the requests still optimising are run: position i of the parts is request active[i].
        parts = problem.losses(delta, active)
        total = parts.total + (torch.stack([penalty(delta[r]) for r in active]) if penalty is not None else 0.0)
        values, plain, nll = total.detach().tolist(), parts.total.detach().tolist(), parts.nll.detach().tolist()
        stopping = []
        for i, r in enumerate(active):
            if not math.isfinite(values[i]):
                which = f" for request {r} of the batch" if problem.n > 1 else ""
                raise EditFailure(f"the target loss became {values[i]} at step {step}{which}")
            result = results[r]
            result.steps, result.loss, result.nll = step + 1, values[i], nll[i]
            result.losses.append(values[i])
            # The stopping rule reads the plain target loss, not the penalty (EAC's elastic net), so a
            # constrained run stops exactly when its base would.
            if plain[i] < config.early_stop_loss or (step == num_steps - 1 and not update_last):
                stopping.append(r)
            elif stop is not None and stop(r, parts.most_probable[i], plain[i]):
                stopping.append(r)
        backward = [i for i, r in enumerate(active) if record_gradients or r not in stopping]
        if backward:
            total[backward].sum().backward()
        if record_gradients:
            for r in active:
                results[r].gradients.append(theta.grad[r].detach().clone())
        active = [r for r in active if r not in stopping]
        if not active:
            break
        frozen = [r for r in range(problem.n) if r not in active]
        kept = theta.detach()[frozen].clone()
        optimiser.step()
        with torch.no_grad():
            if mask_t is not None:
                theta.mul_(mask_t)
            norm = current(theta).norm(dim=-1, keepdim=True)
            theta.mul_(torch.where(norm > max_norm, max_norm / norm, torch.ones_like(norm)))
            theta[frozen] = kept
    for result, row in zip(results, current(theta).detach()):
        result.delta = row.clone()
    return results


class TargetOptimiser:
    """How a base method finds its target δ: the plain optimisation (Eq. 9). The Editor hands the one
    a constraint supplies (``methods.Constraint.optimise``) to the edit context instead, so a base
    method never knows which it runs.

    ``optimise`` returns the result and a report: measures of the step (``record.StepMeasures``
    field -> value, averaged over a batch's requests; EAC: anchors, delta_norm_before).
    """

    # Whether ``optimise_batch`` runs a batch's requests together with each request's result as if
    # alone (optimise_deltas). A constraint whose optimisation is per request says False, and the
    # base method then calls ``optimise`` once per request.
    batches = True

    def prepare(self, hparams, ctx) -> None:
        """Called once by the Editor with the method's hyper-parameters and the edit context, on the
        unedited model, before any edit (NAS measures its reference norm there); nothing by default."""

    def optimise(self, problem: TargetProblem) -> tuple[OptimisationResult, dict]:
        return optimise_delta(problem), {}

    def optimise_batch(self, problem: TargetBatch) -> tuple[list[OptimisationResult], list[dict]]:
        results = optimise_deltas(problem)
        return results, [{} for _ in results]

    def weight_penalty(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """A penalty on a dense weight update, for a method that optimises the update itself (FT has
        no target vector); None: no penalty."""
        return None
