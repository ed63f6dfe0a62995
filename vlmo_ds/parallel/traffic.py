"""Counting the bytes that collectives move, by process group, and the least each kind of traffic must move, for
tools/bench.py.

Bytes per rank. A collective over a group of N ranks on a buffer of S bytes is counted as the bytes ONE rank sends
in the bandwidth-optimal ring algorithm, which is also the total that crosses the links divided by N:
    all-reduce                                  2 (N-1)/N * S   (reduce-scatter then all-gather; S = the tensor)
    all-gather, reduce-scatter                    (N-1)/N * S   (S = the whole buffer: the gathered output, the
                                                                 scattered input; each rank holds S/N of it)
    reduce, broadcast, gather, scatter, all-to-all (N-1)/N * S   (every byte that must leave its rank, once)
    send / isend                                          S     (point to point; recv counts calls, not bytes)
    barrier                                               0
Every call also keeps S itself ("payload") and the group size, so other cost models can be applied afterwards.

Where it counts. Public collectives of torch.distributed (what vlmo_ds's objectives and megatron-core's
tensor-parallel layers and pipeline schedules call at run time, and what DeepSpeed's backend forwards to) are
wrapped, and so are the methods of DeepSpeed's communication backend (deepspeed.comm.comm.cdb, the one object that
every deepspeed.comm function dispatches to). The backend is wrapped as well because it keeps its own references to
torch's all_gather_into_tensor / reduce_scatter_tensor, taken at start-up, which a wrapper of torch alone would miss;
for the same reason the references megatron-core's tensor-parallel mappings take at import (HELD_REFERENCES) are
wrapped, labelled "megatron". Any other reference taken before the block (`from torch.distributed import all_reduce`)
is not seen: add it to HELD_REFERENCES. One function has one wrapper however many modules export it, so identity
checks still hold (torch's batch_isend_irecv tells a send by `op is isend`). Only the outermost wrapped call of a
thread counts (DeepSpeed's all_reduce calling torch's, all_gather_object calling all_gather: one call each), and it
is labelled by the layer it entered through ("deepspeed", "megatron" or "torch") and by the kind of its process group.

Group kinds. count_collectives(groups={"tensor": tp_group, "data": dp_group, ...}) names the groups of a layout
(megatron's parallel_state groups); a call's group is the named group it IS, else the first named group with the
same ranks (DeepSpeed and megatron keep copies: megatron's data-parallel group with context parallelism, DeepSpeed's
clone of the world), else "other". A group given as None is the default (world) group.

Least traffic of a ZeRO stage per training step, per rank, for a data-parallel group of N ranks, f = (N-1)/N, and
Psi = P * B (P trainable parameters of this rank, B bytes each: under TP x PP a rank holds its tensor shard of its
stage, about 1/(TP x PP) of the model plus the replicated norms and heads), Psi_g = P * B_g with B_g the bytes of a
gradient as it is reduced (DeepSpeed's communication_data_type: fp32 for vlmo_ds's bf16 runs, B_g = 4 > B = 2),
A micro-batches per step:
    stage 0    gradient all-reduce once per step                           2 f Psi_g
    stage 1    gradient reduce-scatter once per step + parameter all-gather    f Psi_g +     f Psi
    stage 2    gradient reduce-scatter per micro-batch + parameter all-gather A f Psi_g +     f Psi
    stage 3    gradient reduce-scatter per micro-batch                      A f Psi_g
               + parameter all-gather, forward and backward, per micro-batch             2 A f Psi_3
               where Psi_3 = (P - Pp) * B; the Pp "persistent" parameters (stage3_param_persistence_threshold) stay
               whole on every rank and are gathered once after the step: f Pp B
A reduce to each partition's owner (DeepSpeed's use_multi_rank_bucket_allreduce=false, vlmo_ds's setting) moves the
reduce-scatter's bytes: N reduces of S/N bytes, (N-1)/N x S/N each.
A single forward pass per micro-batch, and a release after each use, are assumed. vlmo_ds's image-text step runs
several passes through the shared blocks (vlmo_ds.parallel.pipeline_passes), and ZeRO-3 gathers a parameter again for
each use it released it after. DeepSpeed keeps a gathered parameter while its next use is within
stage3_max_reuse_distance elements: when that covers the step's trace (vlmo_ds.config.zero_settings, for a model
whose gathered parameters fit its budget), every partitioned parameter is gathered once per micro-batch, half the
all-gather above ("kept for the step": A f Psi_3 + f Pp B).

The image-text step's activation traffic, per micro-batch (ImageTextShape): B pairs, text length T, image length
I = 1 + patches, width D, depth L, VL experts from block S, F = 4B fused rows (B masked-text rows for MLM, then the
positive, negative-image and negative-text pairs for ITM), M = B T text positions the MLM head scores (every one:
the loss masks the unlabelled ones, vlmo_ds.objectives.mlm), e bytes per activation value.
Block calls: image and text passes through all L blocks plus their VL paths through L - S, and the fused pass:
    X = L B I + L B T + (L - S) B (I + T) + L F (T + I)   tokens through blocks
Tensor parallel over t ranks: the all-reduces of megatron-core's layers, payload
    4 X D e     per block call 2 forward (attention output projection and expert fc2, row-parallel) and 2 backward
                (input gradients of the column-parallel qkv and expert fc1), each [b, l, D]
    + (B + F) T D e   the vocabulary-parallel word embedding's forward (text pass and fused pass)
    + M D e           the input gradient of the column-parallel MLM decoder
    + 3 M 4           vocab-parallel cross-entropy in float32: the row maximum, the target logit, the sum of exps
and per rank 2 (t-1)/t of that (without activation checkpointing, which repeats a block's 2 forward all-reduces in
its backward). Under PP each stage's ranks do their blocks' share (the embedding on the first, the MLM head on the
last): summed over the stages it is the whole, so the mean over all ranks is 1/PP of it.
Pipeline parallel over P stages: megatron-core's 1F1B schedule sends, per micro-batch and pass, each stage
boundary's activation forward and its gradient backward; stage s starting at block b_s (s = 1..P-1) receives
    unimodal pass  [B, (I + T) k, D], k = 2 when b_s > S (the VL copies travel too), else 1
    fused pass     [F, T + I, D]
so sent bytes = sum over boundaries of 2 (B (I + T) k + F (T + I)) D e, plus the shape message that precedes every
sent tensor (variable_seq_lengths: 3 int64, 24 B; 4 per boundary). Every tensor rank of a stage sends its own copy;
the mean over all ranks is 1/P of the sum over boundaries.
"""
from __future__ import annotations

import contextlib
import functools
import sys
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

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


class OpKey(NamedTuple):
    """What a count is kept by: the collective, the layer it entered through ("torch", "deepspeed", "megatron"),
    its group's size and kind (a name given to count_collectives, or "other")."""

    op: str
    via: str
    group_size: int
    group: str


@dataclass
class OpCount:
    """Calls of one collective on groups of one size and kind, entered through one layer."""

    calls: float = 0  # a float once averaged over ranks (TrafficCounter.mean)
    payload: float = 0  # sum of S, the collective's whole buffer in bytes
    per_rank: float = 0.0  # bytes one rank sends in the ring algorithm (module docstring)


class TrafficCounter:
    """Counts by OpKey (op, via, group size, group kind)."""

    def __init__(self) -> None:
        self.ops: dict[OpKey, OpCount] = defaultdict(OpCount)

    def add(self, op: str, via: str, group_size: int, payload: int, group: str = "world") -> None:
        count = self.ops[OpKey(op, via, group_size, group)]
        count.calls += 1
        count.payload += payload
        count.per_rank += RING_FACTOR[SPECS[op].kind](group_size) * payload

    def total(self, kinds: tuple[str, ...] | None = None, via: str | None = None,
              group: str | None = None) -> OpCount:
        """The sum over ops of the given kinds (keys of RING_FACTOR; None: all) entered through `via` on groups of
        kind `group` (None: any)."""
        out = OpCount()
        for key, count in self.ops.items():
            if ((kinds is None or SPECS[key.op].kind in kinds) and via in (None, key.via)
                    and group in (None, key.group)):
                out.calls += count.calls
                out.payload += count.payload
                out.per_rank += count.per_rank
        return out

    @classmethod
    def mean(cls, counters: Sequence[TrafficCounter]) -> TrafficCounter:
        """The mean over ranks: every count summed over `counters` and divided by their number."""
        out = cls()
        for counter in counters:
            for key, count in counter.ops.items():
                into = out.ops[OpKey(*key)]
                into.calls += count.calls / len(counters)
                into.payload += count.payload / len(counters)
                into.per_rank += count.per_rank / len(counters)
        return out


class _GroupKinds:
    """A process group's kind: the named group it is, else the first named group with the same ranks, else other."""

    def __init__(self, named: Mapping[str, Any]) -> None:
        self.world = c10d._get_default_group()
        self.by_id: dict[int, tuple[Any, str]] = {}
        self.by_ranks: dict[tuple[int, ...], str] = {}
        for name, group in named.items():
            group = self.world if group is None else group
            self.by_id.setdefault(id(group), (group, name))  # the group is kept, so its id is not reused
            self.by_ranks.setdefault(tuple(dist.get_process_group_ranks(group)), name)

    def __call__(self, group: Any) -> str:
        group = self.world if group is None else group
        found = self.by_id.get(id(group))
        if found is None:
            found = (group, self.by_ranks.get(tuple(dist.get_process_group_ranks(group)), "other"))
            self.by_id[id(group)] = found
        return found[1]


_local = threading.local()


def _counted(original: Callable, op: str, via: str, counter: TrafficCounter, kinds: _GroupKinds) -> Callable:
    spec = SPECS[op]

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if getattr(_local, "inside", False):  # a collective called by a counted one: already counted
            return original(*args, **kwargs)
        a = _Args(args, kwargs)
        group = a.get(spec.group_at, "group")
        size = dist.get_world_size(group) if group is not None else dist.get_world_size()
        if size > 0:  # -1: this rank is not in the group, and torch skips the call
            counter.add(op, via, size, spec.payload(a, size), kinds(group))
        _local.inside = True
        try:
            return original(*args, **kwargs)
        finally:
            _local.inside = False

    return wrapper


_active = threading.Lock()


@contextlib.contextmanager
def count_collectives(groups: Mapping[str, Any] | None = None) -> Iterator[TrafficCounter]:
    """Within the block, every collective of this process is counted in the TrafficCounter it yields.

    groups: {kind: process group} naming the groups of a layout, in order of precedence for groups that are copies
    (module docstring); None: {"world": None}. torch.distributed must be initialised, and DeepSpeed's backend too if
    DeepSpeed is used (deepspeed.initialize or deepspeed.init_distributed before entering). One counting block at a
    time per process.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("count_collectives needs torch.distributed to be initialised first "
                           "(vlmo_ds.parallel.launch.init_distributed)")
    if not _active.acquire(blocking=False):
        raise RuntimeError("count_collectives is already counting in this process; use the one counter it yields")
    counter = TrafficCounter()
    kinds = _GroupKinds({"world": None} if groups is None else groups)
    made: dict[tuple[int, str], Callable] = {}  # one wrapper per function and layer, whichever module exports it

    def wrap(owner: Any, attribute: str, op: str, via: str) -> Callable[[], None]:
        original = getattr(owner, attribute)
        key = (id(original), via)
        if key not in made:
            made[key] = _counted(original, op, via, counter, kinds)
        had = attribute in vars(owner)
        setattr(owner, attribute, made[key])
        return functools.partial(setattr, owner, attribute, original) if had \
            else functools.partial(delattr, owner, attribute)

    restore: list[Callable[[], None]] = []
    try:
        for module in dict.fromkeys([dist, c10d]):  # torch.distributed re-exports distributed_c10d's functions
            restore += [wrap(module, op, op, "torch") for op in SPECS if callable(getattr(module, op, None))]
        backend = getattr(sys.modules.get("deepspeed.comm.comm"), "cdb", None)  # only when DeepSpeed is in use
        for op in SPECS if backend is not None else ():
            if callable(getattr(backend, op, None)):
                restore.append(wrap(backend, op, op, "deepspeed"))
        for name, attributes in HELD_REFERENCES.items():
            module = sys.modules.get(name)
            for attribute, op in attributes.items() if module is not None else ():
                restore.append(wrap(module, attribute, op, name.split(".")[0]))
        yield counter
    finally:
        for undo in reversed(restore):
            undo()
        _active.release()


def zero_minimum(stage: int, dp_size: int, params: float, bytes_per_param: int, persistent: float = 0,
                 accumulation: int = 1, bytes_per_grad: int | None = None) -> dict[str, float]:
    """The least bytes per rank per training step of ZeRO `stage` (formulas in the module docstring).

    {"gradient_reduction": all-reduce (stage 0) or reduce-scatter (1-3) of the gradients, "parameter_all_gather":
    the all-gathers of the parameters}. params: this rank's trainable parameters; persistent: how many of them
    ZeRO-3 keeps whole on every rank (ds_persist); bytes_per_grad: B_g, the reduced gradient's bytes (None: B).
    """
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage must be 0, 1, 2 or 3, got {stage}")
    if dp_size < 1 or accumulation < 1 or not 0 <= persistent <= params:
        raise ValueError(f"need dp_size >= 1, accumulation >= 1 and 0 <= persistent <= params; got dp_size="
                         f"{dp_size}, accumulation={accumulation}, persistent={persistent}, params={params}")
    f = (dp_size - 1) / dp_size
    psi = params * bytes_per_param
    psi_g = params * (bytes_per_param if bytes_per_grad is None else bytes_per_grad)
    if stage == 0:
        return {"gradient_reduction": 2 * f * psi_g, "parameter_all_gather": 0.0}
    if stage == 1:
        return {"gradient_reduction": f * psi_g, "parameter_all_gather": f * psi}
    if stage == 2:
        return {"gradient_reduction": accumulation * f * psi_g, "parameter_all_gather": f * psi}
    partitioned, kept = (params - persistent) * bytes_per_param, persistent * bytes_per_param
    return {"gradient_reduction": accumulation * f * psi_g,
            "parameter_all_gather": 2 * accumulation * f * partitioned + f * kept}


@dataclass(frozen=True)
class ImageTextShape:
    """The sizes of one micro-batch of the image-text step (ITC, ITM with hard negatives, MLM; module docstring)."""

    batch: int
    """B: image-text pairs."""
    text_len: int
    """T."""
    image_len: int
    """I: 1 + patches."""
    dim: int
    """D."""
    depth: int
    """L: MoME blocks."""
    vlffn_start: int
    """S: the first block with VL experts."""
    masked: int
    """M: text positions the MLM head scores (B T: every one)."""
    bytes_per_value: int
    """e: bytes of one activation value (4 for fp32, 2 for bf16)."""

    @property
    def fused_rows(self) -> int:
        """F = 4B: B masked-text rows (MLM), then positive, negative-image and negative-text pairs (ITM)."""
        return 4 * self.batch

    def block_tokens(self) -> int:
        """X: the tokens that pass through blocks, summed over every block call."""
        b, t, i, depth = self.batch, self.text_len, self.image_len, self.depth
        return depth * b * (i + t) + (depth - self.vlffn_start) * b * (i + t) + depth * self.fused_rows * (t + i)


def tensor_parallel_all_reduce(shape: ImageTextShape, tp: int, pp: int = 1) -> dict[str, float]:
    """The tensor-parallel all-reduces of one micro-batch (module docstring): {"payload": bytes summed over calls,
    "per_rank": the ring bytes of one rank, averaged over the pipeline's stages}; zero at tp = 1."""
    if tp < 1 or pp < 1:
        raise ValueError(f"tensor- and pipeline-parallel sizes must be at least 1, got tp={tp}, pp={pp}")
    s, e = shape, shape.bytes_per_value
    payload = (4 * s.block_tokens() * s.dim * e + (s.batch + s.fused_rows) * s.text_len * s.dim * e
               + s.masked * s.dim * e + 3 * s.masked * 4) if tp > 1 else 0
    return {"payload": payload, "per_rank": RING_FACTOR["all_reduce"](tp) * payload / pp}


SHAPE_MESSAGE = 3 * 8
"""Bytes of the [3] int64 shape megatron-core sends before each tensor when sequence lengths vary."""


def pipeline_p2p(shape: ImageTextShape, stage_starts: Sequence[int]) -> dict[str, float]:
    """The pipeline's point-to-point sends of one micro-batch (module docstring): {"payload": bytes sent over every
    stage boundary, "per_rank": its mean over the ranks}. stage_starts: the first block of each stage after the
    first (vlmo_ds.parallel.pipeline_stage.split_blocks); empty without pipeline parallelism."""
    s, e = shape, shape.bytes_per_value
    fused = s.fused_rows * (s.text_len + s.image_len) * s.dim * e
    payload = 0
    for start in stage_starts:
        streams = 2 if start > s.vlffn_start else 1
        unimodal = s.batch * (s.image_len + s.text_len) * streams * s.dim * e
        payload += 2 * (unimodal + fused) + 4 * SHAPE_MESSAGE
    return {"payload": payload, "per_rank": payload / (len(stage_starts) + 1)}
