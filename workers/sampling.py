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


def seeded_disjoint_sample(size: int, count: int, seed: int) -> list[int]:
    """``count`` indices of ``range(size)`` that share none with those of seeds ``0 … seed − 1`` drawn
    the same way, in ascending order: seed 0 draws ``seeded_sample(size, count, 0)``, and seed ``s``
    draws ``seeded_sample`` (seeded ``s``) among the indices the earlier seeds left. So a study
    replicated over seeds edits disjoint fact samples, and its seed 0 edits what ``random`` selection's
    seed 0 edits. Raises ``ValueError`` where the earlier seeds leave fewer than ``count``."""
    if (seed + 1) * count > size:
        raise ValueError(f"{seed + 1} disjoint samples of {count} need {(seed + 1) * count} records; "
                         f"there are {size}")
    left = list(range(size))
    for earlier in range(seed + 1):
        drawn = [left[i] for i in seeded_sample(len(left), count, earlier)]
        if earlier == seed:
            return drawn
        taken = set(drawn)
        left = [i for i in left if i not in taken]
    raise AssertionError("unreachable")
