"""MetricsLogger: TensorBoard scalars and metrics.jsonl read back, exact throughput/MFU with a fake clock, resume."""
import json
import time

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from vlmo_ds.train.metrics import METRICS_FILE, TB_DIR, MetricsLogger, read_metrics
from vlmo_ds.train.progress import ThroughputMeter

FLOPS, PEAK, SAMPLES, TOKENS = 6e12, 1e13, 32, 1280
WALL0 = 1_700_000_000.0


class FakeClock:
    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def make_logger(run_dir, clock, enabled=True, **kwargs):
    wall = FakeClock(WALL0)
    kwargs.setdefault("log_interval", 2)
    logger = MetricsLogger(run_dir, enabled, 10, FLOPS, kwargs.pop("peak_flops", PEAK), SAMPLES, TOKENS,
                           clock=clock, wall_clock=wall, device="cpu", progress=False, **kwargs)
    return logger, wall


def run_steps(logger, clock, wall, steps, wait=0.5, compute=1.5, loss=lambda s: 4.0 - 0.5 * s, stage="pretrain"):
    """Each step: `wait` s fetching data, `compute` s of work; wall time advances 1 s per step."""
    out = {}
    for step in steps:
        with logger.data_wait():
            clock.t += wait
        clock.t += compute
        wall.t += 1.0
        logger.log(step, {"train/loss": loss(step), "lr": 1e-3}, stage=stage)
        out[step] = logger.step_done(step)
    return out


def scalars(run_dir):
    acc = EventAccumulator(str(run_dir / TB_DIR))
    acc.Reload()
    return acc, {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


EXPECTED_PERF = {
    "perf/step_time_s": 2.0, "perf/data_wait_s": 0.5, "perf/data_wait_frac": 0.25,
    "perf/samples_per_s": 16.0, "perf/tokens_per_s": 640.0, "perf/tflops": 3.0, "perf/mfu": 0.3,
}


def test_tensorboard_and_jsonl_round_trip(tmp_path):
    clock = FakeClock()
    logger, wall = make_logger(tmp_path / "run", clock)
    with logger:
        perf = run_steps(logger, clock, wall, range(1, 5))
    assert perf[1] == {} and perf[3] == {}
    for step in (2, 4):
        assert {k: v for k, v in perf[step].items() if k != "perf/peak_mem_mib"} == pytest.approx(EXPECTED_PERF)
        assert perf[step]["perf/peak_mem_mib"] > 1.0  # this process's max RSS

    _, tb = scalars(tmp_path / "run")
    assert set(tb) == {"train/loss", "lr", *EXPECTED_PERF, "perf/peak_mem_mib"}
    assert tb["train/loss"] == [(1, 3.5), (2, 3.0), (3, 2.5), (4, 2.0)]
    assert [s for s, _ in tb["lr"]] == [1, 2, 3, 4] and tb["lr"][0][1] == pytest.approx(1e-3)
    assert [s for s, _ in tb["perf/mfu"]] == [2, 4]
    assert [v for _, v in tb["perf/mfu"]] == pytest.approx([0.3, 0.3])

    lines = [json.loads(line) for line in (tmp_path / "run" / METRICS_FILE).read_text().splitlines()]
    assert lines[0] == {"step": 1, "time": WALL0 + 1, "stage": "pretrain", "train/loss": 3.5, "lr": 1e-3}
    assert [(r["step"], "perf/mfu" in r) for r in lines] == [(1, False), (2, False), (2, True), (3, False),
                                                             (4, False), (4, True)]
    assert lines[2]["perf/samples_per_s"] == pytest.approx(16.0) and lines[2]["stage"] == "pretrain"


def test_jsonl_is_flushed_at_every_line(tmp_path):
    clock = FakeClock()
    logger, wall = make_logger(tmp_path, clock)
    run_steps(logger, clock, wall, [1])
    assert json.loads((tmp_path / METRICS_FILE).read_text())["step"] == 1  # before close
    logger.close()
    logger.close()


def test_mfu_left_out_without_peak_and_nonfinite_written_as_null(tmp_path):
    clock = FakeClock()
    logger, wall = make_logger(tmp_path, clock, peak_flops=None, log_interval=1)
    with logger:
        perf = run_steps(logger, clock, wall, [1], loss=lambda s: float("nan"))
    assert "perf/mfu" not in perf[1] and perf[1]["perf/tflops"] == pytest.approx(3.0)
    first = json.loads((tmp_path / METRICS_FILE).read_text().splitlines()[0])
    assert first["train/loss"] is None


def test_reset_timer_and_first_data_wait_exclude_other_work(tmp_path):
    clock = FakeClock()
    logger, wall = make_logger(tmp_path, clock, log_interval=3)
    clock.t += 50.0  # model set-up after the logger was built: not step time
    run_steps(logger, clock, wall, [1])
    clock.t += 30.0  # a checkpoint save
    logger.reset_timer()
    clock.t += 7.0  # the next step starts at its first data wait
    run_steps(logger, clock, wall, [2])
    logger.step_done(3)  # no data wait: the step lasts from the previous step_done, here 0 s
    perf = logger.last_perf
    assert perf["perf/step_time_s"] == pytest.approx(4.0 / 3)
    assert perf["perf/data_wait_frac"] == pytest.approx(1.0 / 4.0)
    logger.close()


def test_set_stage_closes_the_window_and_changes_counts(tmp_path):
    clock = FakeClock()
    logger, wall = make_logger(tmp_path, clock, log_interval=100)
    run_steps(logger, clock, wall, [1, 2, 3])
    logger.set_stage("text_only", samples_per_step=64, flops_per_step=1e12)
    assert logger.last_perf["perf/samples_per_s"] == pytest.approx(16.0)
    run_steps(logger, clock, wall, [4], stage=None)
    logger.close()  # closes the one-step window of the new stage
    assert logger.last_perf["perf/samples_per_s"] == pytest.approx(32.0)
    assert logger.last_perf["perf/mfu"] == pytest.approx(1e12 / 2.0 / PEAK)
    records = [r for r in read_metrics(tmp_path / METRICS_FILE) if "perf/mfu" in r]
    assert [(r["step"], r["stage"]) for r in records] == [(3, "pretrain"), (4, "text_only")]


def test_resume_appends_and_tensorboard_drops_steps_past_the_checkpoint(tmp_path):
    clock = FakeClock()
    logger, wall = make_logger(tmp_path, clock, log_interval=100)
    with logger:
        run_steps(logger, clock, wall, range(1, 7), loss=float)
    # TensorBoard orders event files by the second in their name: the resumed run's file must sort after.
    time.sleep(1.05)
    logger, wall = make_logger(tmp_path, clock, log_interval=100, resume_step=3)
    with logger:
        run_steps(logger, clock, wall, [4, 5], loss=lambda s: 100.0 + s)
    _, tb = scalars(tmp_path)
    assert tb["train/loss"] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 104.0), (5, 105.0)]
    raw = (tmp_path / METRICS_FILE).read_text().splitlines()
    assert len([line for line in raw if '"train/loss"' in line]) == 8  # appended, nothing rewritten
    kept = [(r["step"], r.get("train/loss", r.get("event"))) for r in read_metrics(tmp_path / METRICS_FILE)
            if "perf/mfu" not in r]
    assert kept == [(1, 1.0), (2, 2.0), (3, 3.0), (3, "resume"), (4, 104.0), (5, 105.0)]


def test_read_metrics_ignores_a_cut_last_line(tmp_path):
    path = tmp_path / METRICS_FILE
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    assert read_metrics(path) == [{"step": 1, "loss": 2.0}]
    path.write_text('{"step": 1\n{"step": 2}\n')
    with pytest.raises(ValueError, match="line 1"):
        read_metrics(path)


def test_disabled_logger_writes_nothing(tmp_path):
    clock = FakeClock()
    logger, wall = make_logger(tmp_path / "run", clock, enabled=False)
    with logger:
        perf = run_steps(logger, clock, wall, range(1, 5))
    assert perf == {1: {}, 2: {}, 3: {}, 4: {}}
    assert not (tmp_path / "run").exists()


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="peak_flops"):
        make_logger(tmp_path, FakeClock(), peak_flops=0.0)
    with pytest.raises(ValueError, match="log_interval"):
        make_logger(tmp_path, FakeClock(), log_interval=0)


def test_meter_without_elapsed_time_reports_no_rates():
    import torch

    meter = ThroughputMeter(1, 1, 1.0, 1.0, torch.device("cpu"), clock=FakeClock())
    assert meter.close_window() == {}
    meter.step_done()
    perf = meter.close_window()
    assert perf["perf/step_time_s"] == 0.0 and "perf/samples_per_s" not in perf


def test_a_line_written_after_its_step_keeps_the_step_time(tmp_path):
    """The trainer writes an interval's lines at its end (vlmo_ds.train.scalars): each carries its own step's time."""
    logger, wall = make_logger(tmp_path, FakeClock())
    with logger:
        logger.log(1, {"train/loss": 2.0}, wall=WALL0 - 5)
        logger.log(2, {"train/loss": 1.0})
    assert [r["time"] for r in read_metrics(tmp_path / METRICS_FILE)] == [WALL0 - 5, WALL0]
    acc, _ = scalars(tmp_path)
    assert [e.wall_time for e in acc.Scalars("train/loss")] == [WALL0 - 5, WALL0]
