"""Tokenisation of edit requests: target ids, the subject's last token, rewriting prompts, padding.

Two layouts of the same token sequences:
- right-padded (``right_padded``): real tokens keep positions 0..n-1, as every plain forward pass;
- aligned on the subject's last token (``aligned_on_lookup``): each row's prefix (the tokens before
  its subject's last token) is left-padded to the longest prefix P and its suffix (from that token
  on) right-padded, so the token that receives δ sits in column P of every row. The target
  optimiser then caches the prefix once and runs only the suffix (targets.py, prefix.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from workers.batching import pad_right
from workers.data import EditRequest
from workers.editing.errors import EditFailure
from workers.models import context_length


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
    limit = context_length(model)
    if limit is not None and n_tokens > limit:
        raise EditFailure(f"{what} is {n_tokens} tokens, longer than the model's context ({limit})")


def rewriting_prompts(tokenizer, request: EditRequest, templates: Sequence[str],
                      target_ids: list[int]) -> tuple[list[list[int]], list[int]]:
    """Token ids and subject-last-token indices of the rewriting prompts (template ∘ prompt, then the
    target tokens except the last), followed by the KL prompt "{subject} is a" as the last row. Token
    ids are concatenated, not re-tokenised, so the target is exactly what the loss scores."""
    sequences, lookups = [], []
    for template in templates:
        text = template.format(request.prompt_template).format(request.subject)
        sequences.append(tokenizer(text)["input_ids"] + target_ids[:-1])
        lookups.append(subject_last_token_index(tokenizer, text, request.subject))
    kl_text = f"{request.subject} is a"
    sequences.append(tokenizer(kl_text)["input_ids"])
    lookups.append(subject_last_token_index(tokenizer, kl_text, request.subject))
    return sequences, lookups


@dataclass
class PromptBatch:
    """Right-padded token ids with the positions the loss and the injection need."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    lookup: torch.Tensor  # (rows,) subject-last-token position per row


def right_padded(tokenizer, sequences: Sequence[list[int]], lookup: Sequence[int], device) -> PromptBatch:
    ids, mask = pad_right(sequences, tokenizer.pad_token_id, device)
    return PromptBatch(ids, mask, torch.tensor(list(lookup), device=device))


@dataclass
class AlignedBatch:
    """Rows aligned on the subject's last token: columns [0, prefix) hold the left-padded prefixes,
    column ``prefix`` every row's subject's last token, then the right-padded suffixes."""

    input_ids: torch.Tensor     # (rows, prefix + suffix width)
    real: torch.Tensor          # (rows, width) bool: a token, not padding
    position_ids: torch.Tensor  # (rows, width): each token's position in its own sequence (0 on padding)
    prefix: int                 # P = the longest prefix
    lookup: torch.Tensor        # (rows,) the subject's last token's position in its own sequence


def aligned_on_lookup(sequences: Sequence[list[int]], lookups: Sequence[int], pad_id: int, device) -> AlignedBatch:
    for row, (ids, lookup) in enumerate(zip(sequences, lookups)):
        if not 0 <= lookup < len(ids):
            raise ValueError(f"row {row}: subject's last token {lookup} outside its {len(ids)} tokens")
    prefix = max(lookups)
    width = prefix + max(len(ids) - lookup for ids, lookup in zip(sequences, lookups))
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    real = torch.zeros((len(sequences), width), dtype=torch.bool)
    position_ids = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, (ids, lookup) in enumerate(zip(sequences, lookups)):
        start = prefix - lookup  # the column of the row's first token
        input_ids[row, start:start + len(ids)] = torch.as_tensor(list(ids), dtype=torch.long)
        real[row, start:start + len(ids)] = True
        position_ids[row, start:start + len(ids)] = torch.arange(len(ids))
    return AlignedBatch(input_ids.to(device), real.to(device), position_ids.to(device), prefix,
                        torch.tensor(list(lookups), device=device))
