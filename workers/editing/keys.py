"""Keys and values at the subject's last token: the inputs (k) and outputs of edited modules."""

from __future__ import annotations

from typing import Sequence

import torch

from workers.data import EditRequest
from workers.editing.tokens import check_length, right_padded, subject_last_token_index
from workers.hooks import Trace
from workers.models import model_device


def template_weights(templates: Sequence[str]) -> list[float]:
    """MEMIT's compute_ks average over ``["{}", generated...]``: ½ to the bare prompt and ½ spread
    evenly over the generated templates (a mean of the two groups' means, not a uniform mean over all
    templates, which ROME's k* is). With no generated template the bare prompt gets everything."""
    if len(templates) == 1:
        return [1.0]
    generated = len(templates) - 1
    return [0.5] + [0.5 / generated] * generated


def at_subject(model, tokenizer, requests: Sequence[EditRequest], module: str, templates: Sequence[str],
               *, inputs: bool, weights: Sequence[float] | None = None) -> torch.Tensor:
    """For each request, the input (``inputs=True``) or output of ``module`` at the subject's last
    token, averaged over ``templates`` (each a ``"...{}"`` string that receives the prompt) — a
    uniform mean, or the weighted sum with ``weights`` (one per template, summing to 1).

    Returns (n_requests, dim) in float32. One batched forward pass, stopped right after ``module``.
    """
    if weights is not None and len(weights) != len(templates):
        raise ValueError(f"{len(weights)} template weights for {len(templates)} templates")
    per_template = per_template_at_subject(model, tokenizer, requests, module, templates, inputs=inputs)
    if weights is None:
        return per_template.mean(dim=1)
    w = torch.tensor(list(weights), dtype=per_template.dtype, device=per_template.device)
    return (per_template * w.view(1, -1, 1)).sum(dim=1)


@torch.no_grad()
def per_template_at_subject(model, tokenizer, requests: Sequence[EditRequest], module: str,
                            templates: Sequence[str], *, inputs: bool) -> torch.Tensor:
    """(n_requests, n_templates, dim) float32: ``at_subject``'s values before the average, so a
    caller that needs both the mean and one template's value (ROME: k* and the bare prompt's key)
    gets them from one forward pass."""
    sequences, lookups = [], []
    for request in requests:
        for template in templates:
            text = template.format(request.prompt_template).format(request.subject)
            sequences.append(tokenizer(text)["input_ids"])
            lookups.append(subject_last_token_index(tokenizer, text, request.subject))
    check_length(model, max(len(s) for s in sequences), "a key prompt")
    batch = right_padded(tokenizer, sequences, lookups, model_device(model))
    with Trace(model, [module], inputs=inputs, outputs=not inputs, stop_after=module) as trace:
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    values = (trace.inputs if inputs else trace.outputs)[module]
    picked = values[torch.arange(len(sequences), device=values.device), batch.lookup].float()
    return picked.view(len(requests), len(templates), -1)
