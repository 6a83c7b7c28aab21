"""Keep a long-lived editing or scoring process's resident memory from growing with the number of edits.

glibc serves an allocation above its mmap threshold with a fresh mapping, returned to the system when
freed; below it, from the heap, where freed blocks stay resident until a request that fits reuses them.
The threshold is dynamic: freeing a mapped block raises it to that block's size (up to 32 MiB). An
AlphaEdit step allocates and frees float64 d_in × d_in matrices (its running key sums and their
projections, 18.9 MB on the default model) between the target optimisation's and ``_measure``'s
megabyte-sized tensors; once the threshold has risen past them they come from the heap, and the
interleaving leaves free holes no later request fits. A trajectory actor running 300 AlphaEdit edits grew
to 14.8 GB (Ray's memory monitor killed it beside two MEMIT trajectories of 2 GB each), while the Python
objects alive stayed constant (a tensor census after 4 and 8 edits is identical but for the log's key
vectors).

The remedy is glibc's ``malloc_trim(0)`` after each edit step and each scored checkpoint: it hands the
free pages inside the heap back to the system, so the resident set is what is alive plus one step's
working set. Measured with ``benchmarks/heap_bound.py`` (16 AlphaEdit edits, paired per edit, under
load): resident growth +15.8 MiB per edit with glibc's default, +0.7 with the trim, at 1.03× the CPU per
edit; fixing the mmap threshold instead (4 or 16 MiB) also stops the growth but costs 1.06-1.09× (every
large activation, the LM head's logits among them, becomes a fresh mapping at every optimisation step).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from pathlib import Path


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None off glibc (macOS, musl), where nothing is done."""
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_free_heap() -> bool:
    """Return the heap's free pages to the system (``malloc_trim(0)``); False where the C library has
    no such call. Cheap next to an edit step or a checkpoint's scoring (milliseconds)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def resident_mib() -> float:
    """The process's resident set size now (not its peak), from /proc (Linux)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
