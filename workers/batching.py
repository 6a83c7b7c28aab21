"""Right padding: the one way token sequences become (input_ids, attention_mask) batches.

Real tokens keep positions 0..n-1 and causal attention never lets them see the padding, so a padded
row computes exactly what the unpadded sequence would. Batches are formed longest first: rows of
similar length share a batch (little padding) and the peak memory shows up in the first batch.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
from tqdm.auto import tqdm


def pad_right(sequences: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, both (rows, longest length) long tensors on ``device``."""
    if not sequences:
        raise ValueError("no sequences to pad")
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, :len(ids)] = torch.as_tensor(list(ids), dtype=torch.long)
        attention_mask[row, :len(ids)] = 1
    return input_ids.to(device), attention_mask.to(device)


def right_padded_batches(sequences: Sequence[Sequence[int]], batch_size: int, pad_id: int, device=None,
                         *, progress: bool = False, desc: str = "batches"
                         ) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """Yield ``(indices, input_ids, attention_mask)`` over ``sequences`` sorted longest first (a stable
    sort, so equal lengths keep their order); ``indices`` map each row back to ``sequences``."""
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc=desc, leave=False, disable=None if progress else True):
        indices = order[start:start + batch_size]
        yield (indices, *pad_right([sequences[i] for i in indices], pad_id, device))
