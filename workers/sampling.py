"""Seeded choices of records: which edit requests a trajectory edits, which examples a task scores,
which edited requests a checkpoint scores. One generator per choice, seeded by a value that names it
(``"0:nli"``: seed 0, task nli), so adding a task or a checkpoint changes no other choice, and the
same seed draws the same records on every machine (``random.Random`` with an int or str seed is
deterministic across processes and platforms, unlike ``hash``).
"""

from __future__ import annotations

import random


def seeded_sample(size: int, count: int, seed: int | str) -> list[int]:
    """``min(count, size)`` distinct indices of ``range(size)``, drawn by a generator seeded with
    ``seed``, in ascending (data-set) order."""
    return sorted(random.Random(seed).sample(range(size), min(count, size)))


def seeded_order(size: int, seed: int | str) -> list[int]:
    """A permutation of ``range(size)``, shuffled by a generator seeded with ``seed`` (the order in
    which ``random.Random(seed).shuffle`` would put any sequence of that length)."""
    order = list(range(size))
    random.Random(seed).shuffle(order)
    return order
