"""Teacher-forced scoring, batched and exact under padding.

Every score in the evaluation comes from one forward pass over ``prompt tokens + continuation
tokens``: the log-probability of each continuation token given what precedes it, and the model's
argmax at that position.

Tokenisation. A continuation's tokens are the tokens that follow the prompt's when the two are
tokenised jointly (``prompt + continuation``, with the tokenizer's special tokens, so a BOS token is
added where the tokenizer adds one — tiny-llama does, SmolLM2 does not). When joint tokenisation
merges across the boundary (the prompt's own tokens are then not a prefix of the joint ones), the
continuation is tokenised on its own and appended to the prompt's tokens: the model is always
scored on the prompt exactly as it would see it.

Padding. Sequences are right-padded (the real tokens keep positions 0..n-1, and causal attention
never lets them see the padding), sorted by length, and a batch holds at most
``batching.SCORING_MAX_PADDING`` of padding, so that little padding is computed. Only the
positions that are scored go through the LM head, in chunks, so memory stays bounded by
``batch × length × hidden`` instead of ``batch × length × vocabulary``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from workers.batching import SCORING_MAX_PADDING, right_padded_batches
from workers.models import context_length, model_device

# Rows of hidden states sent through the LM head at once (bounds the logits' memory).
LM_HEAD_CHUNK = 1024


@dataclass(frozen=True)
class EncodedPair:
    """Token ids of a prompt and of the continuation scored after it."""

    prompt_ids: tuple[int, ...]
    continuation_ids: tuple[int, ...]

    @property
    def ids(self) -> tuple[int, ...]:
        return self.prompt_ids + self.continuation_ids


@dataclass(frozen=True)
class ContinuationScore:
    """Per continuation token: its id, its log-probability and the model's argmax at its position."""

    token_ids: torch.Tensor  # (n,) long
    logprobs: torch.Tensor  # (n,) float32
    argmax_ids: torch.Tensor  # (n,) long

    @property
    def token_accuracy(self) -> float:
        """Share of continuation tokens the model predicts as its top token (toolkit protocol)."""
        return (self.argmax_ids == self.token_ids).float().mean().item()

    @property
    def mean_nll(self) -> float:
        """Mean negative log-likelihood per token (ROME's comparison of targets)."""
        return -self.logprobs.mean().item()

    @property
    def total_logprob(self) -> float:
        return self.logprobs.sum().item()


def encode_pair(tokenizer, prompt: str, continuation: str, *, add_special_tokens: bool = True) -> EncodedPair:
    """Tokens of ``prompt`` and of ``continuation`` after it (see the module docstring)."""
    if not continuation:
        raise ValueError(f"empty continuation after prompt {prompt[:60]!r}")
    prompt_ids = tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]
    joint = tokenizer(prompt + continuation, add_special_tokens=add_special_tokens)["input_ids"]
    if joint[:len(prompt_ids)] == prompt_ids and len(joint) > len(prompt_ids):
        continuation_ids = joint[len(prompt_ids):]
    else:
        continuation_ids = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    if not continuation_ids:
        raise ValueError(f"continuation {continuation!r} has no tokens")
    return EncodedPair(tuple(prompt_ids), tuple(continuation_ids))


def encode_prompts(tokenizer, prompts: Sequence[str], *, add_special_tokens: bool = True) -> list[tuple[int, ...]]:
    encoded = tokenizer(list(prompts), add_special_tokens=add_special_tokens)["input_ids"]
    for prompt, ids in zip(prompts, encoded):
        if not ids:
            raise ValueError(f"prompt {prompt[:60]!r} has no tokens")
    return [tuple(ids) for ids in encoded]


def check_fits(model, lengths: Sequence[int], what: str = "sequence") -> None:
    """Fail clearly when a sequence is longer than the model's context."""
    limit = context_length(model)
    if limit is None:
        return
    for index, length in enumerate(lengths):
        if length > limit:
            raise ValueError(f"{what} {index} has {length} tokens; the model's context is {limit}")


def final_hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The hidden states the LM head reads (after the final norm), shape (batch, length, hidden)."""
    return model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state


def log_softmax_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """float32 log-probabilities over the vocabulary for rows of final hidden states (M, hidden)."""
    head = model.get_output_embeddings()
    # Each chunk goes in as one (1, rows, hidden) batch: DeepSpeed's AutoTP head (LmHeadLinearAllreduce,
    # in a sharded evaluator) slices its input as (batch, sequence, hidden) and rejects rows alone.
    return torch.cat([torch.log_softmax(head(chunk.unsqueeze(0)).squeeze(0).float(), dim=-1)
                      for chunk in hidden.split(LM_HEAD_CHUNK)]) if len(hidden) else hidden.new_zeros((0, 0))


def _pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token (load_model sets one)")
    return tokenizer.pad_token_id


@torch.no_grad()
def score_encoded(model, tokenizer, pairs: Sequence[EncodedPair], *, batch_size: int = 16,
                  progress: bool = False, desc: str = "scoring") -> list[ContinuationScore]:
    """Score each pair's continuation tokens given its prompt tokens.

    The model reads ``ids[:-1]`` of a pair (the last token is only predicted), so pairs that need
    the same input — e.g. single-token label words after one prompt — share one forward row.
    """
    for index, pair in enumerate(pairs):
        if not pair.prompt_ids or not pair.continuation_ids:
            raise ValueError(f"pair {index}: the prompt and the continuation need at least one token each")
    inputs: dict[tuple[int, ...], list[int]] = {}
    for index, pair in enumerate(pairs):
        inputs.setdefault(pair.ids[:-1], []).append(index)
    sequences = list(inputs)
    check_fits(model, [len(s) + 1 for s in sequences])
    results: list[ContinuationScore | None] = [None] * len(pairs)
    device = model_device(model)
    for rows_of, input_ids, attention_mask in right_padded_batches(
            sequences, batch_size, _pad_id(tokenizer), device, max_padding=SCORING_MAX_PADDING, progress=progress,
            desc=desc):
        hidden = final_hidden_states(model, input_ids, attention_mask)
        members = [(row, index) for row, sequence_index in enumerate(rows_of)
                   for index in inputs[sequences[sequence_index]]]
        rows, cols, spans = [], [], []
        for row, index in members:
            start, count = len(pairs[index].prompt_ids), len(pairs[index].continuation_ids)
            # Position t predicts token t+1: continuation token j is predicted at start - 1 + j.
            rows.extend([row] * count)
            cols.extend(range(start - 1, start - 1 + count))
            spans.append(count)
        logprobs = log_softmax_logits(model, hidden[rows, cols])
        targets = torch.tensor([t for _, index in members for t in pairs[index].continuation_ids],
                               dtype=torch.long, device=logprobs.device)
        chosen = logprobs.gather(1, targets[:, None])[:, 0]
        argmax = logprobs.argmax(dim=-1)
        for (_, index), token_ids, lp, am in zip(members, targets.split(spans), chosen.split(spans),
                                                 argmax.split(spans)):
            results[index] = ContinuationScore(token_ids.cpu(), lp.cpu(), am.cpu())
    return results  # type: ignore[return-value]


def score_continuations(model, tokenizer, pairs: Sequence[tuple[str, str]], *, batch_size: int = 16,
                        add_special_tokens: bool = True, progress: bool = False,
                        desc: str = "scoring") -> list[ContinuationScore]:
    """Score text continuations: ``pairs`` of (prompt, continuation). The continuation carries its own
    leading space where one belongs (``" " + target``)."""
    encoded = [encode_pair(tokenizer, p, c, add_special_tokens=add_special_tokens) for p, c in pairs]
    return score_encoded(model, tokenizer, encoded, batch_size=batch_size, progress=progress, desc=desc)


@torch.no_grad()
def map_last_positions(model, tokenizer, prompts: Sequence[str], read: Callable[[torch.Tensor], torch.Tensor],
                       *, batch_size: int = 16, add_special_tokens: bool = True, progress: bool = False,
                       desc: str = "prompts") -> torch.Tensor:
    """``read(final hidden states)`` at each prompt's last token, stacked in prompt order."""
    sequences = encode_prompts(tokenizer, prompts, add_special_tokens=add_special_tokens)
    check_fits(model, [len(s) for s in sequences], "prompt")
    outputs: list[torch.Tensor | None] = [None] * len(prompts)
    for indices, input_ids, attention_mask in right_padded_batches(
            sequences, batch_size, _pad_id(tokenizer), model_device(model), max_padding=SCORING_MAX_PADDING,
            progress=progress, desc=desc):
        hidden = final_hidden_states(model, input_ids, attention_mask)
        last = attention_mask.sum(dim=1) - 1
        values = read(hidden[torch.arange(len(indices), device=hidden.device), last])
        for row, index in enumerate(indices):
            outputs[index] = values[row].cpu()
    if not outputs:
        return torch.zeros((0, 0))
    return torch.stack(outputs)  # type: ignore[arg-type]


def next_token_logprobs(model, tokenizer, prompts: Sequence[str], **kwargs) -> torch.Tensor:
    """(n_prompts, vocabulary) float32 log-probabilities of the token after each prompt."""
    return map_last_positions(model, tokenizer, prompts, lambda h: log_softmax_logits(model, h), **kwargs)
