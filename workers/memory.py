"""Keep a long-lived editing or scoring process's heap from growing with the number of edits.

glibc serves an allocation above its mmap threshold with a fresh mapping, returned to the system when
freed; below it, from the heap, where freed blocks are reused only by requests that fit them. The
threshold is dynamic by default: freeing a mapped block raises it to that block's size (up to 32 MiB).
An AlphaEdit step allocates and frees float64 d_in × d_in matrices (the running key sums and their
projections, 18.9 MB on the default model) between the target optimisation's and ``_measure``'s
megabyte-sized tensors; once the threshold has risen past them they come from the heap, and the
interleaving leaves holes no later request fits. A trajectory actor running 300 AlphaEdit edits grew to
14.8 GB (Ray's memory monitor killed it beside two MEMIT trajectories of 2 GB each); the Python objects
alive stayed constant (a tensor census after 4 and 8 edits is identical but for the log's key vectors),
and fixing the threshold keeps the process flat (2.2 GB after 12 edits, against +10 MB per edit).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

# Above this an allocation is mapped (and unmapped when freed) rather than carved from the heap. 4 MiB:
# the float64 d_in² matrices and the float64 copies ``_measure`` makes of an edited matrix (7 MB) are
# above it; activations of the target optimisation's few hundred tokens mostly below.
MMAP_THRESHOLD = 4 << 20
M_MMAP_THRESHOLD = -3  # mallopt's parameter number, glibc's malloc.h


@functools.cache
def bound_heap_growth(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold for this process (once; later calls are no-ops). Returns whether it
    was set: False off glibc (macOS, musl), where nothing is changed."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, threshold))
