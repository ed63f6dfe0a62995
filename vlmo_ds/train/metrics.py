"""Training metrics of a vlmo_ds run: TensorBoard scalars, a metrics.jsonl file, throughput, one log line per log
interval (vlmo_ds.train.log_line) and a progress bar on a terminal.

Every run folder gets
    tb/            TensorBoard event files (``tensorboard --logdir RUN/tb``)
    metrics.jsonl  one JSON object per line, e.g. {"step": 120, "time": 1767000000.5, "stage": "itc_itm_mlm",
                   "train/loss": 3.2, "lr": 1e-4}; perf/* lines (see vlmo_ds.train.progress) every log interval
Only the logger built with ``enabled=True`` (global rank 0) writes; the others are inert, so every rank can call it.

Steps count optimizer steps completed: the first step is logged as step 1, and a checkpoint taken after step s
resumes with ``resume_step=s``. A resumed run appends to both outputs:
- TensorBoard: the writer opens with ``purge_step=s + 1``, so TensorBoard hides the events of steps > s that the
  previous run wrote after its checkpoint; the new run's values for those steps replace them.
- metrics.jsonl: a line {"step": s, "time": ..., "event": "resume"} is appended; ``read_metrics`` drops the earlier
  lines with step > s when it meets it. Tools that read the file themselves should do the same.
The file is flushed after every line, so ``tail -f`` shows each line at once and a killed run loses at most the
line being written. Non-finite values (a diverged loss) are written as null in metrics.jsonl, as NaN/inf to
TensorBoard.
"""
from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import IO, Any

import torch

from vlmo_ds.config import RunConfig
from vlmo_ds.train.log_line import log_line
from vlmo_ds.train.progress import ProgressBar, ThroughputMeter
from vlmo_ds.train.wandb_log import WandbRun

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"


def _json_value(value: float) -> float | None:
    return value if math.isfinite(value) else None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl in order, with the lines a resumed run superseded dropped.

    A final line cut short by a killed run is ignored.
    """
    records: list[dict[str, Any]] = []
    lines = Path(path).read_text().splitlines()
    for number, line in enumerate(lines):
        try:
            record = json.loads(line)
        except ValueError:
            if number == len(lines) - 1:
                break
            raise ValueError(f"{path}: line {number + 1} is not JSON: {line[:80]!r}") from None
        if record.get("event") == "resume":
            records = [r for r in records if r["step"] <= record["step"]]
        records.append(record)
    return records


class MetricsLogger(AbstractContextManager):
    """TensorBoard + metrics.jsonl + throughput + progress bar for one training run.

    ``flops_per_step``, ``samples_per_step`` and ``tokens_per_step`` describe one optimizer step, ``peak_flops`` the
    hardware (FLOP/s: the datasheet peak on GPUs, a measured GEMM rate on CPU; None leaves MFU out); use one scope for
    all of them (vlmo_ds passes whole-job values). ``log_interval``: perf/* scalars are logged every that many steps.
    ``clock`` and ``wall_clock`` are injectable for tests (seconds; monotonic and Unix time). ``wandb``: a Weights &
    Biases project that gets every scalar too (vlmo_ds.train.wandb_log), with ``run_config`` (the recipe) as the W&B run's config.
    """

    def __init__(self, run_dir: str | Path, enabled: bool, total_steps: int, flops_per_step: float,
                 peak_flops: float | None, samples_per_step: float, tokens_per_step: float, *,
                 log_interval: int = 10, resume_step: int = 0, stage: str = "", progress: bool = True,
                 device: torch.device | str | None = None, clock: Callable[[], float] = time.perf_counter,
                 wall_clock: Callable[[], float] = time.time, wandb: str | None = None,
                 run_config: RunConfig | None = None) -> None:
        if log_interval < 1:
            raise ValueError(f"log_interval={log_interval} must be >= 1 (steps between perf/* scalars)")
        if resume_step < 0:
            raise ValueError(f"resume_step={resume_step} must be >= 0 (optimizer steps done before this run)")
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.enabled, self.log_interval, self.stage, self.total_steps = enabled, log_interval, stage, total_steps
        self.wall_clock = wall_clock
        self.last_perf: dict[str, float] = {}
        self._last_step_values: dict[str, float] = {}  # the last logged step's train/* and opt/* for the log line
        self.meter = ThroughputMeter(samples_per_step, tokens_per_step, flops_per_step, peak_flops,
                                     torch.device(device), clock)
        self._bar = ProgressBar(total_steps, resume_step, enabled and progress)
        self._file: IO[str] | None = None
        self._tb = None
        self._wandb: WandbRun | None = None
        self._last_step = resume_step
        if not enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        # Imported here: tensorboard costs a second to import and only rank 0 needs it.
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(str(run_dir / TB_DIR), purge_step=resume_step + 1 if resume_step else None,
                                 flush_secs=30)
        self._file = open(run_dir / METRICS_FILE, "a", encoding="utf-8")
        if resume_step:
            self._write_line({"step": resume_step, "time": self.wall_clock(), "event": "resume"})
        if wandb:
            self._wandb = WandbRun(wandb, run_dir, run_config)

    def _write_line(self, record: Mapping[str, Any]) -> None:
        assert self._file is not None
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()

    def log(self, step: int, scalars: Mapping[str, float], stage: str | None = None, *,
            wall: float | None = None) -> None:
        """Write scalars (losses, accuracies, lr, grad_norm, skipped-sample counts, ...) for ``step``.

        Values may be floats, ints or 0-d tensors (a tensor is read here: the trainer passes floats it read once per
        log interval). ``stage`` names the stage on the jsonl line (default: the last stage given here or to
        ``set_stage``). ``wall``: the Unix time of the values (default: now), for lines written after their step.
        """
        if stage is not None:
            self.stage = stage
        if not self.enabled:
            return
        if self._tb is None:
            raise RuntimeError("MetricsLogger.log after close(): log before closing, or build a new logger")
        values = {name: float(value) for name, value in scalars.items()}
        wall = self.wall_clock() if wall is None else wall
        for name, value in values.items():
            self._tb.add_scalar(name, value, step, walltime=wall)
        record = {"step": step, "time": wall, "stage": self.stage}
        record.update({name: _json_value(value) for name, value in values.items()})
        self._write_line(record)
        if self._wandb is not None:
            self._wandb.log(step, values)
        step_values = {k: v for k, v in values.items() if k.startswith(("train/", "opt/"))}
        if step_values:
            self._last_step_values = step_values
        loss = values.get("train/loss", next((v for k, v in values.items() if k.endswith("loss")), None))
        self._bar.update(step, loss=loss)

    def data_wait(self) -> AbstractContextManager[None]:
        """``with logger.data_wait(): batch = next(loader)``: the body counts as data-wait time of the current step."""
        return self.meter.data_wait() if self.enabled else nullcontext()

    def step_done(self, step: int) -> dict[str, float]:
        """Call after the optimizer step that completes ``step``. Every ``log_interval`` steps the perf/* scalars of
        the window are logged and returned; otherwise returns {}."""
        if not self.enabled:
            return {}
        self.meter.step_done()
        self._last_step = step
        if step % self.log_interval == 0:
            return self._flush_window(step)
        self._bar.update(step)
        return {}

    def reset_timer(self) -> None:
        """Call after work that is not training (evaluation, checkpoint saves) so it does not count as step time."""
        self.meter.reset()

    def set_stage(self, stage: str, *, samples_per_step: float | None = None, tokens_per_step: float | None = None,
                  flops_per_step: float | None = None) -> None:
        """Start a new stage: logs the open perf window, sets the per-step counts that change, resets the timer."""
        self._flush_window(self._last_step)
        self.stage = stage
        meter = self.meter
        meter.samples_per_step = meter.samples_per_step if samples_per_step is None else samples_per_step
        meter.tokens_per_step = meter.tokens_per_step if tokens_per_step is None else tokens_per_step
        meter.flops_per_step = meter.flops_per_step if flops_per_step is None else flops_per_step
        meter.reset()

    def _flush_window(self, step: int) -> dict[str, float]:
        if not self.enabled or self.meter.window_steps == 0:
            return {}
        perf = self.meter.close_window()
        self.last_perf = perf
        self.log(step, perf)
        log.info("%s", log_line(step, self.total_steps, self.stage, self._last_step_values, perf))
        self._bar.update(step, samples_per_s=perf.get("perf/samples_per_s"))
        return perf

    def flush(self) -> None:
        """Push TensorBoard events to disk (metrics.jsonl is always flushed)."""
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        """Log the open perf window, then flush and close the files and the bar. Safe to call twice."""
        if self.enabled and self._file is not None:
            self._flush_window(self._last_step)
        self._bar.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb is not None:
            self._wandb.close()
            self._wandb = None

    def __exit__(self, *exc_info: object) -> None:
        self.close()

