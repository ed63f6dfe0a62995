"""One decode per replica: the tensor- and pipeline-parallel ranks of a data-parallel replica train on the same
batches, so one of them reads and decodes and the others receive each batch by broadcast.

Without it every TP x PP rank of a replica would run its own loader workers on the same samples: at TP 4 x PP 4,
sixteen times the decode, RandAugment and shard reads the replica needs, and sixteen times the CPU cores.

Per batch the reading rank (rank 0 of the model-parallel group: tensor rank 0 of pipeline stage 0) sends
1. a header (a pickled object, over a CPU channel): the tensors' names, shapes and dtypes, the batch's other
   entries (sample keys, meta), and the loader's position and skip counts after this batch;
2. the tensors, one broadcast each, from the device the group's backend works on (the CUDA device for NCCL,
   straight from pinned host memory; the CPU for gloo).
The receiving ranks build no loader and no workers. They allocate the announced tensors and receive into them; the
header travels over gloo even when the tensors go over NCCL, so a receiving rank learns shapes without a
device-to-host copy (no host synchronisation in the data path).

The checkpointed position is the replica's on every rank: each rank's ``state_dict()`` is the reading rank's
position after the last batch handed out, so whichever rank's file a resume reads, the replica continues exactly.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch
import torch.distributed as dist

from vlmo_ds.data.errors import DataSourceError
from vlmo_ds.data.workers import default_num_workers


class Loader(Protocol):
    """What the trainer uses of a loader (vlmo_ds.data.loader.StreamLoader, vlmo_ds.train.mixing.MixedLoader)."""

    skipped: dict[str, int]

    def __iter__(self) -> Iterator[dict[str, Any]]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


_HOST_GROUPS: dict[tuple[int, ...], Any] = {}  # gloo twins of NCCL model-parallel groups, made once per process


def host_group(group) -> Any:
    """A group for pickled objects with the ranks of `group`: itself under gloo, else a gloo group.

    dist.new_group is collective over the whole world, so every rank creates every replica's gloo group, in one
    order, once per process."""
    if str(dist.get_backend(group)) == "gloo":
        return group
    mine = tuple(dist.get_process_group_ranks(group))
    if mine not in _HOST_GROUPS:
        everyone: list[tuple[int, ...] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        for ranks in sorted(set(everyone)):
            made = dist.new_group(list(ranks), backend="gloo")
            if ranks == mine:
                _HOST_GROUPS[mine] = made
    return _HOST_GROUPS[mine]


class ReplicaLoader:
    """The replica's batches on every rank of `group` (the model-parallel group); `loader` on its rank 0 only.

    device: the rank's training device; tensors travel there when the group's backend is NCCL, else on the CPU.
    """

    def __init__(self, loader: Loader | None, group, device: torch.device) -> None:
        self.group = group
        self.reading = dist.get_rank(group) == 0
        if self.reading != (loader is not None):
            raise ValueError("the model-parallel group's rank 0 reads (pass its loader); the others pass None")
        self.loader = loader
        self.src = dist.get_global_rank(group, 0)
        self.host = host_group(group)
        self.device = device if "nccl" in str(dist.get_backend(group)) else torch.device("cpu")
        self._state: dict[str, Any] | None = None  # receiving ranks: the replica's position after the last batch
        self._skipped: dict[str, int] = {}

    @property
    def skipped(self) -> dict[str, int]:
        """The replica's skipped samples and shards by kind (the reading rank's counts)."""
        return self.loader.skipped if self.loader is not None else dict(self._skipped)

    def state_dict(self) -> dict[str, Any] | None:
        """The replica's position (the same on every rank); None on a receiving rank before its first batch."""
        if self.loader is not None:
            return self.loader.state_dict()
        return copy.deepcopy(self._state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state` (any rank's saved state of this replica); call it on every rank before iterating."""
        if self.loader is not None:
            self.loader.load_state_dict(state)
        else:
            self._state = copy.deepcopy(state)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self._send() if self.reading else self._receive()

    def _announce(self, header: dict[str, Any] | None) -> dict[str, Any] | None:
        box = [header]
        dist.broadcast_object_list(box, src=self.src, group=self.host)
        return box[0]

    def _send(self) -> Iterator[dict[str, Any]]:
        try:
            yield from self._send_batches()
        except Exception as err:  # the receivers would wait for a batch that never comes: they fail with us
            bad_source = str(err) if isinstance(err, DataSourceError) else None
            self._announce({"error": f"{type(err).__name__}: {err}", "data_source": bad_source})
            raise
        self._announce(None)  # a finite loader's end (an epoch): the receivers stop too

    def _send_batches(self) -> Iterator[dict[str, Any]]:
        for batch in self.loader:
            tensors = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()
                       if isinstance(v, torch.Tensor)}
            self._announce({"tensors": [(k, tuple(t.shape), t.dtype) for k, t in tensors.items()],
                            "other": {k: v for k, v in batch.items() if k not in tensors},
                            "state": self.loader.state_dict(), "skipped": self.loader.skipped})
            for tensor in tensors.values():
                dist.broadcast(tensor, src=self.src, group=self.group)
            yield {**batch, **tensors}

    def _receive(self) -> Iterator[dict[str, Any]]:
        while True:
            header = self._announce(None)
            if header is None:
                return
            if header.get("data_source"):  # a bad data source: the same one line on every rank of the replica
                raise DataSourceError(header["data_source"])
            if "error" in header:
                raise RuntimeError(f"the loader of this replica's reading rank {self.src} failed: {header['error']}")
            tensors = {}
            for name, shape, dtype in header["tensors"]:
                tensors[name] = torch.empty(shape, dtype=dtype, device=self.device)
                dist.broadcast(tensors[name], src=self.src, group=self.group)
            self._state, self._skipped = header["state"], header["skipped"]
            yield {**header["other"], **tensors}


def replica_loader(make: Callable[..., Loader], group, device: torch.device, *, num_workers: int | None,
                   local_world_size: int, slurm_tasks: bool = False) -> Loader:
    """The loader of this rank: `make(num_workers=...)` where this rank reads for its replica (group: the replica's
    model-parallel ranks; None or a group of one = the rank is its replica), a receiving ReplicaLoader on the
    replica's other ranks. num_workers None: sized by the cores of the replica's ranks on this node
    (vlmo_ds.data.workers); slurm_tasks: every rank is an srun task."""
    if group is None or dist.get_world_size(group) == 1:
        workers = default_num_workers(local_world_size, slurm_tasks) if num_workers is None else num_workers
        return make(num_workers=workers)
    if dist.get_rank(group) != 0:
        return ReplicaLoader(None, group, device)
    node = dist.get_rank() // local_world_size  # launchers number the ranks of a node contiguously
    here = sum(r // local_world_size == node for r in dist.get_process_group_ranks(group))
    workers = default_num_workers(local_world_size, slurm_tasks, here) if num_workers is None else num_workers
    return ReplicaLoader(make(num_workers=workers), group, device)
