"""No device-to-host synchronisation inside a pre-training micro-step (forward + backward of each pre-training stage's
loss function on the tiny model, one process), and none in the trainer's per-step bookkeeping between log intervals.

On a CPU nothing really waits for a device, so the counter counts what WOULD make the host wait for a GPU: aten ops
whose output size or value the host must read (_local_scalar_dense behind item / float / int / bool / `if t:`,
nonzero, masked_select, a boolean index, unique, repeat_interleave without output_size, bincount, equal, ...), plus
Tensor.cpu / .tolist / .numpy / .item and torch.cuda.synchronize called from Python. It sees the backward pass too (the
autograd engine runs CPU backward under the caller's dispatch mode), as the first tests prove.
"""
from __future__ import annotations

import traceback
from collections import Counter
from contextlib import ExitStack

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from distributed import run_ranks
from train_cli import recipe_args
from vlmo_ds.config import load_config, model_config
from vlmo_ds.data.hooks import PatchMasking, TextMasking
from vlmo_ds.model.vlmo import VLMo
from vlmo_ds.train.scalars import StepScalars
from vlmo_ds.train.stages import loss_function

VOCAB = 120
SYNCING_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "masked_scatter", "unique", "_unique", "_unique2",
               "unique_dim", "unique_consecutive", "unique_dim_consecutive", "bincount", "equal", "is_nonzero",
               "allclose", "histc"}
"""aten ops (overload packets) whose result the host needs before it can go on."""
BOOLEAN_INDEXED = {"index", "index_put", "index_put_", "_index_put_impl_"}
"""aten ops that sync when one of their indices is boolean (they become nonzero)."""
HOST_METHODS = ("cpu", "tolist", "numpy", "item")


class HostSyncs(TorchDispatchMode):
    """Counts, by name, the operations that would synchronise a GPU with the host while it is active; `places`
    counts them by the innermost calling line in vlmo_ds ("vlmo_ds/train/scalars.py:73"), else the library
    ("deepspeed", "megatron") or "other"."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.places: Counter[str] = Counter()
        self._patches = ExitStack()

    def count(self, label: str) -> None:
        self.counts[label] += 1
        self.places[_place()] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in SYNCING_OPS:
            self.count(f"aten.{name}")
        elif name in BOOLEAN_INDEXED and _boolean_gather(name, args, kwargs):
            self.count(f"aten.{name}[bool]")
        elif name == "repeat_interleave" and func._overloadname != "self_int" and kwargs.get("output_size") is None:
            self.count("aten.repeat_interleave")
        return func(*args, **kwargs)

    def __enter__(self):
        for method in HOST_METHODS:
            self._patches.enter_context(_counting(torch.Tensor, method, self, f"Tensor.{method}"))
        self._patches.enter_context(_counting(torch.cuda, "synchronize", self, "torch.cuda.synchronize"))
        return super().__enter__()

    def __exit__(self, *exc):
        self._patches.close()
        return super().__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def _boolean_gather(name: str, args, kwargs) -> bool:
    """Whether an indexing op has a boolean index that ATen turns into nonzero. Not `x[mask] = scalar`: ATen runs
    that as masked_fill_ (one boolean index, a one-element value on the CPU, no accumulation)."""
    indices = args[1] if len(args) > 1 else kwargs.get("indices")
    indices = [i for i in (indices or ()) if i is not None]
    if not any(i.dtype in (torch.bool, torch.uint8) for i in indices):
        return False
    if name == "index":
        return True
    value = args[2] if len(args) > 2 else kwargs["values"]
    accumulate = args[3] if len(args) > 3 else kwargs.get("accumulate", False)
    return accumulate or len(indices) > 1 or value.numel() != 1 or value.device.type != "cpu"


def _place() -> str:
    for frame in reversed(traceback.extract_stack()[:-2]):
        path = frame.filename.replace("\\", "/")
        if "/vlmo_ds/" in path:
            return f"vlmo_ds/{path.rsplit('/vlmo_ds/', 1)[1]}:{frame.lineno}"
        for library in ("deepspeed", "megatron"):
            if f"/site-packages/{library}/" in path:
                return library
    return "other"


class _counting:
    """Replaces owner.name by a wrapper that counts its calls, for the duration of a with block."""

    def __init__(self, owner, name: str, syncs: HostSyncs, label: str) -> None:
        self.owner, self.name, self.syncs, self.label = owner, name, syncs, label

    def __enter__(self):
        self.original = original = getattr(self.owner, self.name)
        syncs, label = self.syncs, self.label

        def wrapper(*args, **kwargs):
            syncs.count(label)
            return original(*args, **kwargs)

        setattr(self.owner, self.name, wrapper)

    def __exit__(self, *exc):
        setattr(self.owner, self.name, self.original)


# ---- the counter counts what it should ---------------------------------------------------------------------------
class _ItemInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        return grad * float(grad.sum())


def test_the_counter_sees_known_syncs_in_forward_and_backward():
    x = torch.randn(6, requires_grad=True)
    mask = x.detach() > 0
    with HostSyncs() as syncs:
        x[mask].sum()
        x.sum().item()
        x.detach().tolist()
        x.detach().cpu()
        torch.unique(x.detach())
        torch.repeat_interleave(torch.tensor([1, 2]))
        if x.detach().sum() > -100:
            pass
    assert syncs.counts["aten.index[bool]"] == 1
    assert syncs.counts["Tensor.item"] == 1 and syncs.counts["Tensor.tolist"] == 1 and syncs.counts["Tensor.cpu"] == 1
    assert syncs.counts["aten._unique2"] == 1 and syncs.counts["aten.repeat_interleave"] == 1
    assert syncs.counts["aten._local_scalar_dense"] == 2  # .item() and `if tensor:`
    with HostSyncs() as syncs:
        _ItemInBackward.apply(x).sum().backward()
    assert syncs.counts == Counter({"aten._local_scalar_dense": 1})


def test_device_only_work_is_not_counted():
    x = torch.randn(4, 5, requires_grad=True)
    labels = torch.tensor([1, -100, 3, -100])
    with HostSyncs() as syncs:
        loss = torch.nn.functional.cross_entropy(x, labels, ignore_index=-100, reduction="none")
        (loss * (labels != -100)).sum().backward()
        x.detach()[torch.tensor([0, 2])].argmax(-1)
    assert syncs.total == 0, syncs.counts


# ---- the pre-training micro-steps --------------------------------------------------------------------------------
def _batch(cfg, kind: str, batch: int, rng: np.random.Generator) -> dict:
    g = torch.Generator().manual_seed(1)
    t = cfg.max_text_len
    lengths = torch.randint(4, t + 1, (batch, 1), generator=g)
    text_mask = (torch.arange(t)[None] < lengths).long()
    out = {"image": torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=g),
           "text_ids": torch.randint(5, VOCAB, (batch, t), generator=g) * text_mask, "text_mask": text_mask,
           "word_start": torch.ones(batch, t, dtype=torch.bool)}
    if kind in ("image_text", "text_mlm"):
        out = TextMasking(mask_id=4, vocab_size=VOCAB, special_ids=(0, 1, 2, 3))(out, rng)
    if kind == "image_mim":
        out = PatchMasking(cfg.window, 0.4)(out, rng)
    return out


@pytest.mark.parametrize("index", [0, 1, 2], ids=["image_mim", "text_mlm", "image_text"])
def test_a_pretraining_micro_step_does_not_sync(index):
    run = load_config("tiny")
    stage, cfg = run.stages[index], model_config(run, VOCAB, stage=index)
    torch.manual_seed(0)
    model = VLMo(cfg)
    batch = _batch(cfg, stage.kind, 4, np.random.default_rng(0))
    loss_fn = loss_function(stage, itc_local_rows=False)
    with HostSyncs() as syncs:
        out = model(loss_fn, batch, 8, None)
        out["loss"].backward()
    assert syncs.total == 0, dict(syncs.counts)
    assert all(v.numel() == 1 and torch.isfinite(v) for v in out.values())
    assert sum(p.grad.count_nonzero() for p in model.parameters() if p.grad is not None) > 0  # backward ran


def test_the_step_bookkeeping_stays_on_the_device_between_log_intervals():
    """What the stage loop does with each step's losses and gradient norm: nothing reaches the host until the flush
    at the log interval (one transfer for the whole interval)."""
    scalars = StepScalars()
    values = [{"loss": torch.tensor(2.0 + s), "itc": torch.tensor(1.0)} for s in range(3)]
    with HostSyncs() as syncs:
        for s, found in enumerate(values):
            scalars.add(s + 1, found, torch.tensor(0.5), {"opt/lr": 1e-3})
    assert syncs.total == 0, dict(syncs.counts)
    with HostSyncs() as syncs:
        lines = scalars.flush()
    assert syncs.counts == Counter({"Tensor.tolist": 1})
    assert [line.step for line in lines] == [1, 2, 3] and len(scalars) == 0
    assert lines[2].scalars() == {"train/itc": 1.0, "train/loss": 4.0, "opt/grad_norm": 0.5, "opt/lr": 1e-3}


def _counted_steps(rank: int, world: int, args: list[str]) -> list[dict]:
    """Train the tiny image_text recipe in one process (DeepSpeed engine, ZeRO 0); each optimizer step's work in
    StageRunner._step (data wait, micro-steps, backward, optimizer step, bookkeeping) counted by place."""
    from vlmo_ds.parallel.launch import DistEnv
    from vlmo_ds.train import stage_loop
    from vlmo_ds.train.trainer import train

    counted, step = [], stage_loop.StageRunner._step

    def counting_step(runner, *step_args):
        with HostSyncs() as syncs:
            keys = step(runner, *step_args)
        counted.append(dict(syncs.places))
        return keys

    stage_loop.StageRunner._step = counting_step
    train(load_config(args[0], args[1:], world_size=world), DistEnv(rank, world, rank, world, 0, "127.0.0.1", 0, "torchrun"))
    return counted


@pytest.mark.slow
def test_the_trainers_steps_read_nothing_of_vlmo_ds_between_log_intervals(run_data, tmp_path):
    """vlmo_ds's own code in a training step reads the device only at the log interval's step (one read: the
    interval's losses and gradient norms). Not counted: the loader (vlmo_ds/data works on host tensors, before
    to_device: starting its workers reads a CPU seed) and DeepSpeed's engine (here torch's Adam reading each
    parameter's step counter, a CPU tensor on GPUs too: 2 x 110 per step on the tiny model)."""
    args = recipe_args(run_data, tmp_path / "run", 4, 4, "train.log_every=3", "train.ckpt_every=100")
    steps = run_ranks(_counted_steps, 1, args, use_deepspeed=True)[0]
    ours = [{place: n for place, n in step.items() if place.startswith("vlmo_ds/")
             and not place.startswith("vlmo_ds/data/")} for step in steps]
    flush = [place for place in ours[2] if place.startswith("vlmo_ds/train/scalars.py:")]
    assert ours == [{}, {}, {flush[0]: 1}, {}], steps
