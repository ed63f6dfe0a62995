"""How fast a vlmo_ds training run advances: step timing, throughput, MFU, peak memory, and the rank-0 progress bar.

The trainer brackets its work with two hooks: ``with meter.data_wait():`` around fetching a batch, and
``meter.step_done()`` after the optimizer step. A step lasts from the previous ``step_done`` (or ``reset``) to this one,
so everything the loop does, waiting for data included, is counted once. Steps are grouped into windows; when the
trainer closes a window (every log interval, at a stage change, at the end) the meter reports the window's averages:

    perf/step_time_s     mean seconds per step
    perf/samples_per_s   samples_per_step * steps / seconds
    perf/tokens_per_s    tokens_per_step * steps / seconds
    perf/data_wait_s     mean seconds per step spent waiting for data
    perf/data_wait_frac  share of the window's time spent waiting for data (near 0 when the loader keeps up)
    perf/tflops          flops_per_step * steps / seconds / 1e12 (achieved, from the analytic count)
    perf/mfu             achieved FLOP/s / peak_flops (omitted when peak_flops is None)
    perf/peak_mem_mib    CUDA max_memory_allocated of the device on GPU, else the process's maximum RSS, in MiB

The per-step counts must share one scope: vlmo_ds passes the global batch (all data-parallel ranks) and the summed
peak of all devices, so samples/s is the job's throughput and MFU is the job's; per-rank values give the same MFU.
"""
from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from tqdm import tqdm

MIB = 1 << 20


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory in MiB: allocated CUDA memory on a GPU (the caching allocator's view), else the process max RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / MIB
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / MIB if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux


class ThroughputMeter:
    """Step and data-wait timer over windows of steps; ``clock`` (seconds, monotonic) is injectable for tests."""

    def __init__(self, samples_per_step: float, tokens_per_step: float, flops_per_step: float,
                 peak_flops: float | None, device: torch.device,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        if peak_flops is not None and peak_flops <= 0:
            raise ValueError(f"peak_flops={peak_flops} must be positive (FLOP/s), or None to leave MFU out")
        self.samples_per_step, self.tokens_per_step = samples_per_step, tokens_per_step
        self.flops_per_step, self.peak_flops = flops_per_step, peak_flops
        self.device, self.clock = device, clock
        self._window_steps, self._window_time, self._window_wait = 0, 0.0, 0.0
        self.reset()

    def reset(self) -> None:
        """Forget the time since the last step (evaluation, checkpoint saves, stage set-up are not step time).

        The next step starts when the loop first enters ``data_wait`` after this, or now if it calls ``step_done``
        first.
        """
        self._step_start = self.clock()
        self._step_wait = 0.0
        self._fresh = True

    @contextmanager
    def data_wait(self) -> Iterator[None]:
        """Time the body as waiting for data (part of the current step)."""
        start = self.clock()
        if self._fresh:
            self._step_start, self._fresh = start, False
        try:
            yield
        finally:
            self._step_wait += self.clock() - start

    def step_done(self) -> None:
        """End the current step: its time and data wait join the open window; the next step starts now."""
        now = self.clock()
        self._window_steps += 1
        self._window_time += now - self._step_start
        self._window_wait += self._step_wait
        self._step_start, self._step_wait, self._fresh = now, 0.0, False

    @property
    def window_steps(self) -> int:
        """Steps in the open window."""
        return self._window_steps

    def close_window(self) -> dict[str, float]:
        """The open window's perf/* scalars ({} if it holds no step); a new window opens.

        On a GPU the device is synchronised first, so the window's time covers the kernels its steps queued.
        """
        if self._window_steps == 0:
            return {}
        if self.device.type == "cuda":
            # The wait for queued kernels belongs to the window's steps, not to the next step.
            before = self.clock()
            torch.cuda.synchronize(self.device)
            waited = self.clock() - before
            self._window_time += waited
            self._step_start += waited
        steps, seconds, wait = self._window_steps, self._window_time, self._window_wait
        self._window_steps, self._window_time, self._window_wait = 0, 0.0, 0.0
        out = {"perf/step_time_s": seconds / steps, "perf/data_wait_s": wait / steps}
        if seconds > 0:  # a zero-length window (a coarse or fake clock) has no rates
            out["perf/samples_per_s"] = self.samples_per_step * steps / seconds
            out["perf/tokens_per_s"] = self.tokens_per_step * steps / seconds
            out["perf/data_wait_frac"] = wait / seconds
            achieved = self.flops_per_step * steps / seconds
            out["perf/tflops"] = achieved / 1e12
            if self.peak_flops is not None:
                out["perf/mfu"] = achieved / self.peak_flops
        out["perf/peak_mem_mib"] = peak_memory_mib(self.device)
        return out


class ProgressBar:
    """tqdm bar on stderr: step/total, the last loss and samples/s. Inert when not enabled (ranks other than 0) and
    when stderr is not a terminal: in a log file (Slurm, nohup) a bar is one line joined by carriage returns, and the
    log lines (vlmo_ds.train.log_line) say more."""

    def __init__(self, total_steps: int, initial: int, enabled: bool) -> None:
        self._bar = None
        if enabled and sys.stderr.isatty():
            self._bar = tqdm(total=total_steps, initial=initial, file=sys.stderr, dynamic_ncols=True,
                             mininterval=0.5, unit="step")
        self._postfix: dict[str, str] = {}

    def update(self, step: int, loss: float | None = None, samples_per_s: float | None = None) -> None:
        """Move the bar forward to ``step`` (steps completed; never back) and show the latest loss / throughput."""
        if self._bar is None:
            return
        if loss is not None:
            self._postfix["loss"] = f"{loss:.4g}"
        if samples_per_s is not None:
            self._postfix["samples/s"] = f"{samples_per_s:.1f}"
        self._bar.set_postfix(self._postfix, refresh=False)
        self._bar.update(max(0, step - self._bar.n))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
