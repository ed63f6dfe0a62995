"""Peak memory of a block of code: CUDA's allocator statistics on GPUs, an exact live-tensor count on CPUs.

    with MemoryMeter(device) as m:
        loss = step(batch); loss.backward(); optimizer.step()
    print(m.peak, m.now)        # bytes above the level at entry: the highest seen, and at the time of reading

On CPU the process's resident size mixes the allocator's caching, the interpreter and freed pages the kernel has not
taken back, so it cannot be compared with a model of tensor memory. There the meter is a TorchDispatchMode: every
ATen op (autograd's backward ops and activation checkpointing's recomputation included: the CPU autograd engine runs
them on the calling thread, which carries the mode) shows it its outputs; each storage is counted once, with its
bytes, when first seen, and taken off when it dies (a weak-reference finalizer: torch keeps a storage's Python object
alive exactly as long as the storage). What it counts is what the planner models: the bytes of tensors. Not seen:
storages made before entry (their frees are not counted either) and scratch buffers a fused kernel frees before it
returns.
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class _LiveTensorBytes(TorchDispatchMode):
    """Bytes of the storages that ops on `device_type` have returned since entry and that are still alive."""

    def __init__(self, device_type: str) -> None:
        super().__init__()
        self.device_type = device_type
        self.sizes: dict[int, int] = {}  # the storage's C++ address -> its bytes, while it lives
        self.live = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # An output on an input's storage that was never counted existed before entry (a parameter's transpose, an
        # in-place add into a gradient made before): no new bytes.
        before = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if self._counts(t)}
        for leaf in tree_leaves(out):
            if self._counts(leaf):
                storage = leaf.untyped_storage()
                if storage._cdata in self.sizes or storage._cdata not in before:
                    self._see(storage)
        return out

    def _counts(self, x) -> bool:
        return isinstance(x, torch.Tensor) and x.device.type == self.device_type and x.layout == torch.strided

    def _see(self, storage: torch.UntypedStorage) -> None:
        key, size = storage._cdata, storage.nbytes()
        known = self.sizes.get(key)
        if known == size:  # a view, an in-place op, or an output handed back again
            return
        if known is None:
            weakref.finalize(storage, self._free, key)
        self.sizes[key] = size  # new, or resized in place (out= arguments)
        self.live += size - (known or 0)
        self.peak = max(self.peak, self.live)

    def _free(self, key: int) -> None:
        self.live -= self.sizes.pop(key)


class MemoryMeter:
    """Context manager: `peak` and `now`, in bytes above the memory in use at entry, on `device`."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self._mode: _LiveTensorBytes | None = None
        self._entry = 0

    def __enter__(self) -> MemoryMeter:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._entry = torch.cuda.memory_allocated(self.device)
        else:
            self._mode = _LiveTensorBytes(self.device.type)
            self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._mode is not None:
            self._mode.__exit__(*exc)
        else:
            torch.cuda.synchronize(self.device)

    @property
    def peak(self) -> int:
        """The highest memory in use since entry, less the memory in use at entry."""
        if self._mode is not None:
            return self._mode.peak
        return torch.cuda.max_memory_allocated(self.device) - self._entry

    @property
    def now(self) -> int:
        """The memory in use now, less the memory in use at entry (CPU: of the storages made since entry)."""
        if self._mode is not None:
            return self._mode.live
        return torch.cuda.memory_allocated(self.device) - self._entry
