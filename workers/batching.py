"""Right padding: the one way token sequences become (input_ids, attention_mask) batches.

Real tokens keep positions 0..n-1 and causal attention never lets them see the padding, so a padded
row computes exactly what the unpadded sequence would. Batches are formed longest first: rows of
similar length share a batch (little padding) and the peak memory shows up in the first batch.
Teacher-forced scoring also caps each batch's padding share (``SCORING_MAX_PADDING``): a fixed count of
rows sorted by length still pads a small sample of long, unequal texts (five dialogues, sixteen NLI
premises) to its longest; a row's result does not depend on the rows beside it. Generation keeps
sorted fixed-size batches (a split batch repeats every decoding step).
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
from tqdm.auto import tqdm

# The most padding a teacher-forced scoring batch may hold (share of its positions; padding measured by
# benchmarks/edit_sample.py). Only a batch of at least BUCKET_MIN_POSITIONS positions is closed for its
# padding: below that the matmuls lose more to their small size than the padding costs (float32 at 64
# rows runs at about half the rate of 512 rows, benchmarks/roofline.py). The statistics
# (workers/stats.py) keep plain fixed-size batches.
SCORING_MAX_PADDING = 0.2
BUCKET_MIN_POSITIONS = 256


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


def length_batches(lengths: Sequence[int], batch_size: int, max_padding: float | None = None) -> list[list[int]]:
    """Indices of ``lengths`` sorted longest first (a stable sort, so equal lengths keep their order), in
    batches of at most ``batch_size``. With ``max_padding``, a batch of at least ``BUCKET_MIN_POSITIONS``
    positions also closes before the row that would make more than that share of its positions padding
    (rows × the batch's longest length): rows
    of very different lengths — a sample of dialogues, premises of any length — go to batches of their
    own length instead of being padded to the longest one's."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    real = 0
    for index in order:
        batch = batches[-1] if batches else None
        longest = lengths[batch[0]] if batch else 0
        if (batch is None or len(batch) == batch_size or (
                max_padding is not None and len(batch) * longest >= BUCKET_MIN_POSITIONS
                and (real + lengths[index]) / ((len(batch) + 1) * longest) < 1 - max_padding)):
            batches.append([index])
            real = lengths[index]
        else:
            batch.append(index)
            real += lengths[index]
    return batches


def right_padded_batches(sequences: Sequence[Sequence[int]], batch_size: int, pad_id: int, device=None,
                         *, max_padding: float | None = None, progress: bool = False, desc: str = "batches"
                         ) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """Yield ``(indices, input_ids, attention_mask)`` over ``sequences`` in ``length_batches`` order;
    ``indices`` map each row back to ``sequences``."""
    batches = length_batches([len(s) for s in sequences], batch_size, max_padding)
    for indices in tqdm(batches, desc=desc, leave=False, disable=None if progress else True):
        yield (indices, *pad_right([sequences[i] for i in indices], pad_id, device))
