"""The training log's one line per log interval, for cluster log files (Slurm, nohup) that a progress bar garbles.

A line (shown here in two parts; one line in the log):

    step 120/1800 image_text | loss=3.214 itc=1.02 itm=0.61 mlm=1.58 | lr=1.00e-04 grad_norm=1.37 |
        samples/s=52.1 tflops=0.412 mfu=12.3% mem=1.52GiB data_wait=3.1% eta=1h02m

``grep ': step '`` lists them; every field after the stage is ``key=value``. The values are the ones the metrics
logger already holds on the host at the interval's end, so the line costs no device read: the last step's train/*
scalars (losses and accuracies, averaged over ranks) and opt/* scalars, and the window's perf/* scalars
(vlmo_ds.train.progress: mem is the peak GPU memory allocated, or the process's peak RSS on CPU; data_wait the share
of the window's time spent waiting for batches). A value the window could not measure (MFU without a known peak,
rates of a zero-length window) is written as ``-``. ``eta`` is the time to step ``total`` at the window's mean step
time.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

MIB_PER_GIB = 1024


def duration(seconds: float) -> str:
    """A duration for people: 45s, 3m05s, 1h02m, 2d03h."""
    if not math.isfinite(seconds):
        return "-"
    seconds = max(0, round(seconds))
    minutes, secs = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def _value(values: Mapping[str, float], key: str, fmt: str, scale: float = 1.0, unit: str = "") -> str:
    return f"{values[key] * scale:{fmt}}{unit}" if key in values else "-"


def log_line(step: int, total: int, stage: str, scalars: Mapping[str, float], perf: Mapping[str, float]) -> str:
    """The line for global step ``step`` of ``total`` in ``stage``: ``scalars`` are a step's metric values
    (train/<name>, opt/lr, opt/grad_norm), ``perf`` the window's perf/* values."""
    names = sorted((name for name in scalars if name.startswith("train/")), key=lambda name: name != "train/loss")
    losses = " ".join(f"{name.removeprefix('train/')}={scalars[name]:.4g}" for name in names)  # the total loss first
    eta = perf["perf/step_time_s"] * (total - step) if "perf/step_time_s" in perf else math.inf
    return " | ".join([
        f"step {step}/{total} {stage}",
        losses or "loss=-",
        f"lr={_value(scalars, 'opt/lr', '.2e')} grad_norm={_value(scalars, 'opt/grad_norm', '.4g')}",
        f"samples/s={_value(perf, 'perf/samples_per_s', '.1f')} tflops={_value(perf, 'perf/tflops', '.3g')} "
        f"mfu={_value(perf, 'perf/mfu', '.1f', 100, '%')} "
        f"mem={_value(perf, 'perf/peak_mem_mib', '.2f', 1 / MIB_PER_GIB, 'GiB')} "
        f"data_wait={_value(perf, 'perf/data_wait_frac', '.1f', 100, '%')} eta={duration(eta)}",
    ])
