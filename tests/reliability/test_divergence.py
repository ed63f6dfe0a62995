"""The divergence guard (vlmo_ds.train.divergence): a run whose learning rate makes it diverge stops with one line and
exit status 65 after train.max_bad_steps non-finite steps, the newest finite checkpoint survives keep_last, and
neither a checkpoint nor a stage record is written with non-finite weights; at ZeRO 0 in fp32 (no DeepSpeed check) a
step with a non-finite gradient leaves weights and AdamW state exactly as they were, and DeepSpeed's own overflow
skipping (bf16 at ZeRO 0, ZeRO 1) counts the same way, on every data-parallel rank alike.

The runs train the tiny image-text recipe on the synthetic test data for at most 6 steps of 4 samples, with a
checkpoint after every step and keep_last 2. At lr 1e6 step 1 is finite and throws the weights to ~1e6, and every
later loss is NaN: steps 2-4 are the 3 bad steps in a row (the default limit). Before the guard such a run went on to
its end, exited 0 and kept only checkpoints 5 and 6 (step 1's rotated away) and a "finished" NaN stage record.
"""
import math
import subprocess
from types import SimpleNamespace

import pytest
import torch

from distributed import run_ranks
from train_cli import ENV, recipe_args, train_command
from vlmo_ds.ckpt.consolidate import load as load_checkpoint
from vlmo_ds.config import ConfigError, load_config
from vlmo_ds.train import checkpoint, stage_record
from vlmo_ds.train.divergence import EXIT_DIVERGED, DivergedError, DivergenceGuard, skip_if_not_finite
from vlmo_ds.train.scalars import StepLine

STEPS = 6


def diverging_args(data, run_dir, lr: str, *extra: str) -> list[str]:
    return recipe_args(data, run_dir, STEPS, 4, "train.ckpt_every=1", "train.keep_last=2", f"optim.lr={lr}",
                       "optim.warmup=0", *extra)


def diverging_run(data, run_dir, lr: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(train_command(*diverging_args(data, run_dir, lr, *extra)), env=ENV, capture_output=True,
                          text=True, timeout=300)


def error_lines(done: subprocess.CompletedProcess) -> list[str]:
    return [line for line in done.stderr.splitlines() if line.startswith("vlmo_ds.train:")]


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["parallel.zero_stage=1"], ["precision=bf16"],
                                   ["precision=bf16", "parallel.zero_stage=1"]],
                         ids=["zero0", "zero1", "zero0-bf16", "zero1-bf16"])
def test_a_diverging_run_stops_and_keeps_its_newest_finite_checkpoint(run_data, tmp_path, extra):
    run_dir = tmp_path / "run"
    done = diverging_run(run_data, run_dir, "1e6", *extra)
    assert done.returncode == EXIT_DIVERGED, done.stderr[-3000:]
    newest = checkpoint.root_of(run_dir) / "step_00000001"
    assert error_lines(done) == [
        "vlmo_ds.train: training diverged: 3 steps in a row (2-4) had a non-finite loss or gradient norm "
        f"(train.max_bad_steps=3); the newest finite checkpoint is step 1 ({newest}): lower optim.lr (or raise "
        "optim.warmup) and run again (train.resume=auto continues from it, train.resume=none starts afresh)"]
    assert "update was skipped (3 in a row" in done.stderr
    assert sorted(p.name for p in checkpoint.root_of(run_dir).glob("step_*")) == ["step_00000001"]
    assert checkpoint.find_resume(run_dir, "auto") == newest
    state = load_checkpoint(run_dir)  # the `latest` pointer's checkpoint, consolidated
    assert state.trainer["step"] == 1
    for name, value in {**state.weights, **state.exp_avg, **state.exp_avg_sq}.items():
        assert torch.isfinite(value).all(), name
    assert not stage_record.is_finished(run_dir, "image_text")


@pytest.mark.slow
def test_weights_that_overflow_are_never_saved(run_data, tmp_path):
    """lr 1e39 overflows float32: step 1's gradient is finite, its update makes the weights inf."""
    run_dir = tmp_path / "run"
    done = diverging_run(run_data, run_dir, "1e39")
    assert done.returncode == EXIT_DIVERGED, done.stderr[-3000:]
    assert error_lines(done) == [
        "vlmo_ds.train: training diverged: the weights are not finite after step 1 (no checkpoint written); no "
        "checkpoint was written yet: lower optim.lr (or raise optim.warmup) and start again"]
    assert checkpoint.find_resume(run_dir, "auto") is None
    assert not stage_record.is_finished(run_dir, "image_text")


def train_until_stopped(rank: int, world: int, args: list[str]) -> str | None:
    """The trainer on one of `world` gloo ranks: the DivergedError it stopped with, None if it ran to the end."""
    from vlmo_ds.parallel.launch import DistEnv
    from vlmo_ds.train.trainer import train

    try:
        train(load_config(args[0], args[1:], world_size=world),
              DistEnv(rank, world, rank, world, 0, "127.0.0.1", 0, "torchrun"))
    except DivergedError as err:
        return str(err)
    return None


@pytest.mark.slow
def test_every_data_parallel_rank_stops_after_the_same_step(run_data, tmp_path):
    """Two ranks, ZeRO 1: both stop at step 4 with the same line (none waits in a collective of a later step)."""
    run_dir = tmp_path / "run"
    args = diverging_args(run_data, run_dir, "1e6", "parallel.zero_stage=1", "train.micro_batch=2")
    stopped = run_ranks(train_until_stopped, 2, args, use_deepspeed=True)
    assert stopped[0] == stopped[1] and stopped[0].startswith("training diverged: 3 steps in a row (2-4)")
    assert sorted(p.name for p in checkpoint.root_of(run_dir).glob("step_*")) == ["step_00000001"]


def test_a_non_finite_gradient_leaves_a_fused_adamw_exactly_as_it_was():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(3))]
    optimizer = torch.optim.AdamW(params, lr=0.1, weight_decay=0.1, fused=True)
    engine = SimpleNamespace(optimizer=optimizer)
    for p in params:
        p.grad = torch.randn_like(p)
    skip_if_not_finite(engine, torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
    optimizer.step()  # a finite step: applied
    before = [(p.detach().clone(), {k: v.clone() for k, v in optimizer.state[p].items()}) for p in params]
    params[1].grad[0] = math.nan
    skip_if_not_finite(engine, torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
    optimizer.step()
    for p, (weights, state) in zip(params, before):
        assert torch.equal(p, weights)
        assert all(torch.equal(optimizer.state[p][k], v) for k, v in state.items())
    assert optimizer.state[params[0]]["step"].item() == 1


def line(step: int, loss: float, grad_norm: float | None = 1.0) -> StepLine:
    return StepLine(step, {"loss": loss, "itc": 1.0}, grad_norm, {}, 0.0)


def test_only_bad_steps_in_a_row_stop_the_run(tmp_path):
    guard = DivergenceGuard(3, tmp_path, torch.device("cpu"), rank=0)
    finite = [guard.count(line(1, math.nan)), guard.count(line(2, 1.0, math.inf)), guard.count(line(3, 2.0))]
    assert finite == [False, False, True]
    guard.stop_if_diverged()  # two in a row, then a finite step: no stop
    for step in (4, 5):
        guard.count(line(step, 1.0, math.nan))
    guard.stop_if_diverged()
    assert not guard.count(line(6, math.inf, None))
    with pytest.raises(DivergedError, match=r"^training diverged: 3 steps in a row \(4-6\) .* no checkpoint"):
        guard.stop_if_diverged()


def test_max_bad_steps_must_be_positive():
    with pytest.raises(ConfigError, match=r"^train.max_bad_steps: must be > 0, got 0$"):
        load_config("tiny", ["train.max_bad_steps=0"])
