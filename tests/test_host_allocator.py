"""Timing tools keep freed host memory for reuse (as torch's CUDA caching allocator does): a tensor above glibc's
mmap threshold, made again and again, stops faulting fresh pages in; with glibc's defaults, and again after the
block, every one does."""
import subprocess
import sys

import pytest

LOOP = """
import resource, sys
from vlmo_ds.plan.host_allocator import freed_memory_kept
import torch

def fresh_pages() -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        grad = torch.empty(30522, 768)  # 94 MB: base's vocabulary gradient
        grad.fill_(0)
        del grad
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

outside = fresh_pages()
with freed_memory_kept() as kept:
    fresh_pages()  # the heap grows once
    inside = fresh_pages()
print(kept, outside, inside, fresh_pages())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_freed_memory_is_reused_inside_the_block_only():
    out = subprocess.run([sys.executable, "-c", LOOP], capture_output=True, text=True, check=True).stdout
    kept, outside, inside, after = out.split()
    pages = 30522 * 768 * 4 // 4096
    assert kept == "True"
    assert int(outside) >= pages  # the tensor's 4 KiB pages, zeroed by the kernel again
    assert int(inside) == 0
    assert int(after) >= pages  # glibc's settled thresholds are back
