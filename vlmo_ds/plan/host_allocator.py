"""Time CPU steps with freed memory kept for reuse, as torch's CUDA caching allocator keeps it on GPUs.

glibc's malloc hands every allocation above its mmap threshold (32 MiB at most) back to the operating system when it
is freed and maps fresh pages, zeroed by the kernel, for the next one. A batched step makes many such tensors (base,
batch 4: the fused pass's [16, 237, 3072] activations, the [16, 12, 237, 237] attention scores, the [30522, 768]
vocabulary gradients), so on a 2-core CPU here 1-4 GiB of pages are faulted in per step: 1-5 s of kernel CPU time
per ~11 s step, varying with the machine's load. On a GPU the caching allocator never returns memory mid-run, so
that cost does not exist on the path the planner and the benches speak for. Inside `freed_memory_kept()` glibc keeps
freed memory in the process for reuse (the resident size stays at its high-water mark, as on a GPU); on leaving,
glibc's settled thresholds come back and the free memory is returned. The timing tools use it and say so; training
itself keeps glibc's defaults.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
from collections.abc import Iterator

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
KEEP_MMAP_THRESHOLD = 2**30  # allocations below 1 GiB come from the heap, so they are reused
KEEP_TRIM_THRESHOLD = 2**31 - 1  # never give the heap's free top back to the OS
SETTLED_MMAP_THRESHOLD = 32 * 2**20  # where glibc's own threshold settles after large frees (its maximum) ...
SETTLED_TRIM_THRESHOLD = 2 * SETTLED_MMAP_THRESHOLD  # ... with the trim threshold it sets beside it


def _glibc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.mallopt, libc.malloc_trim  # noqa: B018 (glibc only)
    except (OSError, AttributeError, TypeError):
        return None
    return libc


@contextlib.contextmanager
def freed_memory_kept() -> Iterator[bool]:
    """Keep freed memory for reuse inside the block; yields False where the C library is not glibc (nothing
    changes there)."""
    libc = _glibc()
    kept = bool(libc and libc.mallopt(M_MMAP_THRESHOLD, KEEP_MMAP_THRESHOLD)
                and libc.mallopt(M_TRIM_THRESHOLD, KEEP_TRIM_THRESHOLD))
    try:
        yield kept
    finally:
        if kept:
            libc.mallopt(M_MMAP_THRESHOLD, SETTLED_MMAP_THRESHOLD)
            libc.mallopt(M_TRIM_THRESHOLD, SETTLED_TRIM_THRESHOLD)
            libc.malloc_trim(0)
