"""Counting the bytes that collectives move, and the least a ZeRO stage must move, for tools/bench.py.

Bytes per rank. A collective over a group of N ranks on a buffer of S bytes is counted as the bytes ONE rank sends
in the bandwidth-optimal ring algorithm, which is also the total that crosses the links divided by N:
    all-reduce                                  2 (N-1)/N * S   (reduce-scatter then all-gather; S = the tensor)
    all-gather, reduce-scatter                    (N-1)/N * S   (S = the whole buffer: the gathered output, the
                                                                 scattered input; each rank holds S/N of it)
    reduce, broadcast, gather, scatter, all-to-all (N-1)/N * S   (every byte that must leave its rank, once)
    send / isend                                          S     (point to point; recv counts calls, not bytes)
    barrier                                               0
Every call also keeps S itself ("payload") and the group size, so other cost models can be applied afterwards.

Where it counts. Public collectives of torch.distributed (what vlmo_ds's objectives call, and what DeepSpeed's
backend forwards to) are wrapped, and so are the methods of DeepSpeed's communication backend (deepspeed.comm.comm.cdb,
the one object that every deepspeed.comm function dispatches to). The backend is wrapped as well because it keeps its
own references to torch's all_gather_into_tensor / reduce_scatter_tensor, taken at start-up, which a wrapper of torch
alone would miss; for the same reason the references megatron-core's tensor-parallel mappings take at import
(HELD_REFERENCES) are wrapped, labelled "megatron". Any other reference taken before the block (`from
torch.distributed import all_reduce`, `f = torch.distributed.all_gather_into_tensor`) is not seen: add it to
HELD_REFERENCES. Only the outermost wrapped call of a thread counts (DeepSpeed's all_reduce calling torch's, torch's
deprecated _all_gather_base calling all_gather_single, all_gather_object calling all_gather: one call each), and it is
labelled by the layer it entered through ("deepspeed", "megatron" or "torch"), which separates ZeRO's parameter and
gradient traffic from the objectives' own gathers.

Least traffic of a ZeRO stage per training step, per rank, for a data-parallel group of N ranks, f = (N-1)/N, and
Psi = P * B (P trainable parameters of B bytes each), A micro-batches per step:
    stage 0    gradient all-reduce once per step                           2 f Psi
    stage 1    gradient reduce-scatter once per step + parameter all-gather    f Psi +     f Psi
    stage 2    gradient reduce-scatter per micro-batch + parameter all-gather A f Psi +     f Psi
    stage 3    gradient reduce-scatter per micro-batch                      A f Psi_3
               + parameter all-gather, forward and backward, per micro-batch             2 A f Psi_3
               where Psi_3 = (P - Pp) * B; the Pp "persistent" parameters (stage3_param_persistence_threshold) stay
               whole on every rank and cost as in stage 2: A f Pp B + f Pp B
A single forward pass per micro-batch, and a release after each use, are assumed. vlmo_ds's image-text step runs
several passes through the shared blocks (vlmo_ds.parallel.pipeline_passes), and ZeRO-3 gathers a parameter again for
each use it released it after. DeepSpeed keeps a gathered parameter while its next use is within
stage3_max_reuse_distance elements: when that exceeds the model (ds_configs/zero3_*.json: 1e9), every partitioned
parameter is gathered once per micro-batch, half the all-gather above.
"""
from __future__ import annotations

import contextlib
import functools
import sys
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

RING_FACTOR: dict[str, Callable[[int], float]] = {
    "all_reduce": lambda n: 2 * (n - 1) / n,
    "all_gather": lambda n: (n - 1) / n,
    "reduce_scatter": lambda n: (n - 1) / n,
    "reduce": lambda n: (n - 1) / n,
    "broadcast": lambda n: (n - 1) / n,
    "gather": lambda n: (n - 1) / n,
    "scatter": lambda n: (n - 1) / n,
    "all_to_all": lambda n: (n - 1) / n,
    "p2p": lambda n: 1.0,
    "barrier": lambda n: 0.0,
}


def _nbytes(x: Any) -> int:
    """Bytes of a tensor, or of every tensor in a (nested) list; None counts nothing."""
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(item) for item in x)
    return 0


class _Args:
    """A call's arguments by position or by any of the names torch and DeepSpeed give them."""

    def __init__(self, args: tuple, kwargs: dict) -> None:
        self.args, self.kwargs = args, kwargs

    def get(self, index: int, *names: str) -> Any:
        for name in names:
            if name in self.kwargs:
                return self.kwargs[name]
        return self.args[index] if index < len(self.args) else None


@dataclass(frozen=True)
class _Spec:
    kind: str  # a key of RING_FACTOR
    group_at: int  # position of the group argument
    payload: Callable[[_Args, int], int]  # S in bytes, given the arguments and the group size


def _at(index: int, *names: str, times_n: bool = False) -> Callable[[_Args, int], int]:
    return lambda a, n: _nbytes(a.get(index, *names)) * (n if times_n else 1)


_OUT = ("output_tensor", "output", "tensor_list", "output_tensors", "output_tensor_lists")
_IN = ("input", "input_tensor", "input_list", "input_tensor_list")
SPECS: dict[str, _Spec] = {
    "all_reduce": _Spec("all_reduce", 2, _at(0, "tensor")),
    "inference_all_reduce": _Spec("all_reduce", 2, _at(0, "tensor")),
    "all_reduce_coalesced": _Spec("all_reduce", 2, _at(0, "tensors")),
    "all_gather": _Spec("all_gather", 2, _at(0, *_OUT)),
    "all_gather_single": _Spec("all_gather", 2, _at(0, *_OUT)),
    "all_gather_into_tensor": _Spec("all_gather", 2, _at(0, *_OUT)),
    "_all_gather_base": _Spec("all_gather", 2, _at(0, *_OUT)),
    "all_gather_base": _Spec("all_gather", 2, _at(0, *_OUT)),
    "all_gather_coalesced": _Spec("all_gather", 2, _at(0, *_OUT)),
    "reduce_scatter": _Spec("reduce_scatter", 3, _at(1, *_IN)),
    "reduce_scatter_single": _Spec("reduce_scatter", 3, _at(1, *_IN)),
    "reduce_scatter_tensor": _Spec("reduce_scatter", 3, _at(1, *_IN)),
    "_reduce_scatter_base": _Spec("reduce_scatter", 3, _at(1, *_IN)),
    "reduce": _Spec("reduce", 3, _at(0, "tensor")),
    "broadcast": _Spec("broadcast", 2, _at(0, "tensor")),
    "gather": _Spec("gather", 3, _at(0, "tensor", times_n=True)),
    "scatter": _Spec("scatter", 3, _at(0, "tensor", times_n=True)),
    "all_to_all": _Spec("all_to_all", 2, _at(1, *_IN)),
    "all_to_all_single": _Spec("all_to_all", 4, _at(1, "input", "tensor")),
    "send": _Spec("p2p", 2, _at(0, "tensor")),
    "isend": _Spec("p2p", 2, _at(0, "tensor")),
    "recv": _Spec("p2p", 2, lambda a, n: 0),
    "irecv": _Spec("p2p", 2, lambda a, n: 0),
    "barrier": _Spec("barrier", 0, lambda a, n: 0),
    "monitored_barrier": _Spec("barrier", 0, lambda a, n: 0),
}


# Modules that keep their own references to torch's collectives: {module: {attribute: op}}; wrapped when imported.
HELD_REFERENCES: dict[str, dict[str, str]] = {
    "megatron.core.tensor_parallel.mappings": {"dist_all_gather_func": "all_gather_into_tensor",
                                               "dist_reduce_scatter_func": "reduce_scatter_tensor"},
}


@dataclass
class OpCount:
    """Calls of one collective on groups of one size, entered through one layer."""

    calls: int = 0
    payload: int = 0  # sum of S, the collective's whole buffer in bytes
    per_rank: float = 0.0  # bytes one rank sends in the ring algorithm (module docstring)


class TrafficCounter:
    """Counts by (op, via, group size); via is "torch", "deepspeed" or "megatron", the layer the call entered."""

    def __init__(self) -> None:
        self.ops: dict[tuple[str, str, int], OpCount] = defaultdict(OpCount)

    def add(self, op: str, via: str, group_size: int, payload: int) -> None:
        count = self.ops[(op, via, group_size)]
        count.calls += 1
        count.payload += payload
        count.per_rank += RING_FACTOR[SPECS[op].kind](group_size) * payload

    def total(self, kinds: tuple[str, ...] | None = None, via: str | None = None) -> OpCount:
        """The sum over ops of the given kinds (keys of RING_FACTOR; None: all) entered through `via` (None: any)."""
        out = OpCount()
        for (op, layer, _), count in self.ops.items():
            if (kinds is None or SPECS[op].kind in kinds) and (via is None or layer == via):
                out.calls += count.calls
                out.payload += count.payload
                out.per_rank += count.per_rank
        return out


_local = threading.local()


def _counted(original: Callable, op: str, via: str, counter: TrafficCounter) -> Callable:
    spec = SPECS[op]

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if getattr(_local, "inside", False):  # a collective called by a counted one: already counted
            return original(*args, **kwargs)
        a = _Args(args, kwargs)
        group = a.get(spec.group_at, "group")
        size = dist.get_world_size(group) if group is not None else dist.get_world_size()
        if size > 0:  # -1: this rank is not in the group, and torch skips the call
            counter.add(op, via, size, spec.payload(a, size))
        _local.inside = True
        try:
            return original(*args, **kwargs)
        finally:
            _local.inside = False

    return wrapper


_active = threading.Lock()


@contextlib.contextmanager
def count_collectives() -> Iterator[TrafficCounter]:
    """Within the block, every collective of this process is counted in the TrafficCounter it yields.

    torch.distributed must be initialised, and DeepSpeed's backend too if DeepSpeed is used (deepspeed.initialize or
    deepspeed.init_distributed before entering). One counting block at a time per process.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("count_collectives needs torch.distributed to be initialised first "
                           "(vlmo_ds.parallel.launch.init_distributed)")
    if not _active.acquire(blocking=False):
        raise RuntimeError("count_collectives is already counting in this process; use the one counter it yields")
    counter = TrafficCounter()
    restore: list[Callable[[], None]] = []
    try:
        for module in dict.fromkeys([dist, c10d]):  # torch.distributed re-exports distributed_c10d's functions
            for op in SPECS:
                if callable(getattr(module, op, None)):
                    original = getattr(module, op)
                    setattr(module, op, _counted(original, op, "torch", counter))
                    restore.append(functools.partial(setattr, module, op, original))
        backend = getattr(sys.modules.get("deepspeed.comm.comm"), "cdb", None)  # only when DeepSpeed is in use
        for op in SPECS if backend is not None else ():
            if callable(getattr(backend, op, None)):
                had = op in vars(backend)
                original = getattr(backend, op)
                setattr(backend, op, _counted(original, op, "deepspeed", counter))
                restore.append(functools.partial(setattr, backend, op, original) if had
                               else functools.partial(delattr, backend, op))
        for name, attributes in HELD_REFERENCES.items():
            module = sys.modules.get(name)
            for attribute, op in attributes.items() if module is not None else ():
                original = getattr(module, attribute)
                setattr(module, attribute, _counted(original, op, name.split(".")[0], counter))
                restore.append(functools.partial(setattr, module, attribute, original))
        yield counter
    finally:
        for undo in reversed(restore):
            undo()
        _active.release()


def zero_minimum(stage: int, dp_size: int, params: int, bytes_per_param: int, persistent: int = 0,
                 accumulation: int = 1) -> dict[str, float]:
    """The least bytes per rank per training step of ZeRO `stage` (formulas in the module docstring).

    {"gradient_reduction": all-reduce (stage 0) or reduce-scatter (1-3) of the gradients, "parameter_all_gather":
    the all-gathers of the parameters}. params: trainable parameters; persistent: how many of them ZeRO-3 keeps
    whole on every rank (ds_persist).
    """
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage must be 0, 1, 2 or 3, got {stage}")
    if dp_size < 1 or accumulation < 1 or not 0 <= persistent <= params:
        raise ValueError(f"need dp_size >= 1, accumulation >= 1 and 0 <= persistent <= params; got dp_size="
                         f"{dp_size}, accumulation={accumulation}, persistent={persistent}, params={params}")
    f = (dp_size - 1) / dp_size
    psi = params * bytes_per_param
    if stage == 0:
        return {"gradient_reduction": 2 * f * psi, "parameter_all_gather": 0.0}
    if stage == 1:
        return {"gradient_reduction": f * psi, "parameter_all_gather": f * psi}
    if stage == 2:
        return {"gradient_reduction": accumulation * f * psi, "parameter_all_gather": f * psi}
    partitioned, kept = (params - persistent) * bytes_per_param, persistent * bytes_per_param
    return {"gradient_reduction": accumulation * f * psi,
            "parameter_all_gather": 2 * accumulation * f * partitioned + f * kept}
