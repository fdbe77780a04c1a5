"""Keep freed memory in the process (glibc malloc), so CPU inference does not page-fault every call.

A CPU forward pass allocates its activations afresh on every call: megabytes per layer at the
batch sizes a server runs. glibc's malloc serves a block above its mmap threshold (128 KiB at
start, raised as such blocks are freed, at most 32 MiB) with a fresh ``mmap`` and unmaps it on
``free``, and gives a heap's free top back to the kernel above the trim threshold. The next call
then faults the same memory back in, zero-filled by the kernel, page by page: kernel time that
grows with the batch, and that differs between a full forward and an early-exit run (which frees
and allocates in another pattern), so it blurs what a latency profile predicts.

:func:`keep_freed_memory` raises both thresholds (``mallopt``): freed blocks stay in the process
and are reused. The price is memory: the process keeps its peak heap instead of shrinking after
it (a server's peak is bounded by its largest micro-batch). The same effect is what
``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` give from the environment, or jemalloc /
tcmalloc preloaded, as PyTorch's CPU performance guide suggests. Elsewhere than glibc (musl,
macOS, Windows) it does nothing and returns False.
"""

from __future__ import annotations

import ctypes
import platform

from pcee.settings import Settings

#: mallopt parameter numbers (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: default for both thresholds: blocks up to 1 GiB come from (and return to) the heap
KEEP_BYTES = 1 << 30


def keep_freed_memory(limit_bytes: int = KEEP_BYTES) -> bool:
    """Serve blocks below ``limit_bytes`` from the heap and keep up to that much free at its top,
    for the rest of the process. True where glibc accepted both settings, False where this is not
    glibc (nothing changed)."""
    limit = int(limit_bytes)
    if not 0 < limit < 2**31:  # mallopt takes a C int
        raise ValueError(f"limit_bytes must be in (0, 2**31), got {limit_bytes}")
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    mmap_ok = libc.mallopt(M_MMAP_THRESHOLD, limit)
    trim_ok = libc.mallopt(M_TRIM_THRESHOLD, limit)
    return bool(mmap_ok) and bool(trim_ok)


def keep_freed_memory_as_set() -> bool:
    """:func:`keep_freed_memory` unless ``PCEE_KEEP_FREED_MEMORY`` is false: what ``pcee serve``,
    ``pcee profile`` and the train flow's profiling call first, so that a latency profile is timed
    the way the server runs the model. True where applied."""

    return Settings().keep_freed_memory and keep_freed_memory()
