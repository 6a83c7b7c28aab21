"""Batched greedy decoding, correct under padding.

Prompts are left-padded so that every row's next token sits in the last column; the attention mask
hides the padding and transformers derives position ids from it.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from workers.batching import length_batches
from workers.models import model_device


@contextmanager
def padding_side(tokenizer, side: str):
    """Temporarily set the tokenizer's padding side (the caller's tokenizer is left as it was)."""
    previous = tokenizer.padding_side
    tokenizer.padding_side = side
    try:
        yield tokenizer
    finally:
        tokenizer.padding_side = previous


@torch.no_grad()
def greedy_token_ids(model, tokenizer, prompts: list[str], max_new_tokens: int = 8, batch_size: int = 16, *,
                     add_special_tokens: bool = True, sort_by_length: bool = False,
                     progress: bool = False) -> list[list[int]]:
    """The greedily generated token ids after each prompt, up to and including the first EOS (the
    padding ``generate`` puts after a finished row is dropped), in the order of ``prompts``.

    ``add_special_tokens=False`` for prompts that already carry them (a rendered chat template).
    ``sort_by_length`` batches prompts of similar length together (less padding, same outputs).
    """
    from tqdm.auto import tqdm

    outputs: list[list[int] | None] = [None] * len(prompts)
    device = model_device(model)
    # Sorted, not bucketed: splitting a batch for its padding would save prefill positions but repeat
    # every one of the ``max_new_tokens`` decoding steps, which cost per call, not per row.
    lengths = ([len(ids) for ids in tokenizer(list(prompts), add_special_tokens=add_special_tokens)["input_ids"]]
               if sort_by_length else None)
    batches = (length_batches(lengths, batch_size) if lengths is not None else
               [list(range(start, min(start + batch_size, len(prompts)))) for start in range(0, len(prompts), batch_size)])
    eos = tokenizer.eos_token_id
    for indices in tqdm(batches, desc="generating", leave=False, disable=None if progress else True):
        chunk = [prompts[i] for i in indices]
        with padding_side(tokenizer, "left"):
            enc = tokenizer(chunk, return_tensors="pt", padding=True,
                            add_special_tokens=add_special_tokens).to(device)
        generated = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                   pad_token_id=tokenizer.pad_token_id, num_beams=1,
                                   temperature=None, top_p=None, top_k=None)
        for index, row in zip(indices, generated[:, enc["input_ids"].shape[1]:].tolist()):
            outputs[index] = row[:row.index(eos) + 1] if eos is not None and eos in row else row
    return outputs  # type: ignore[return-value]


def greedy_continuations(model, tokenizer, prompts: list[str], max_new_tokens: int = 8,
                         batch_size: int = 16, *, add_special_tokens: bool = True,
                         sort_by_length: bool = False, progress: bool = False) -> list[str]:
    """Greedy continuation of each prompt (``greedy_token_ids`` decoded, without special tokens)."""
    ids = greedy_token_ids(model, tokenizer, prompts, max_new_tokens, batch_size, add_special_tokens=add_special_tokens,
                           sort_by_length=sort_by_length, progress=progress)
    return tokenizer.batch_decode(ids, skip_special_tokens=True)


def begins_with(generated: str, target: str) -> bool:
    """Whether a generated continuation begins with the target as whole words (leading whitespace
    ignored): "Paris is" and "Paris." begin with "Paris", "Parisian" does not — a target ending in a
    letter or digit must not run on into one."""
    text, target = generated.lstrip(), target.strip()
    if not text.startswith(target):
        return False
    rest = text[len(target):]
    return not (target and rest and target[-1].isalnum() and rest[0].isalnum())
