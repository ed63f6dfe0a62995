"""The training log for clusters: one greppable line per log interval with every field, no progress bar (no carriage
returns) when stderr is a file."""
import logging
import re
import subprocess

import pytest

from test_metrics import FakeClock, make_logger, run_steps
from train_cli import ENV, recipe_args, train_command
from vlmo_ds.train.log_line import duration, log_line

FIELDS = ("lr", "grad_norm", "samples/s", "tflops", "mfu", "mem", "data_wait", "eta")
LINE = re.compile(r": (step (\d+)/(\d+) (\S+) \| .*)$")


def fields(line: str) -> dict[str, str]:
    return dict(pair.split("=", 1) for pair in line.split() if "=" in pair)


def test_line_holds_every_field():
    scalars = {"train/itc": 1.02, "train/loss": 3.21412, "opt/lr": 1e-4, "opt/grad_norm": 1.371}
    perf = {"perf/step_time_s": 2.0, "perf/samples_per_s": 52.14, "perf/tflops": 0.4123, "perf/mfu": 0.123,
            "perf/peak_mem_mib": 1556.0, "perf/data_wait_frac": 0.031}
    assert log_line(120, 1800, "image_text", scalars, perf) == (
        "step 120/1800 image_text | loss=3.214 itc=1.02 | lr=1.00e-04 grad_norm=1.371 | samples/s=52.1 "
        "tflops=0.412 mfu=12.3% mem=1.52GiB data_wait=3.1% eta=56m00s")


def test_unmeasured_values_are_dashes():
    line = log_line(2, 4, "text_mlm", {"train/loss": 2.0}, {"perf/step_time_s": 0.0, "perf/peak_mem_mib": 512.0})
    assert line == ("step 2/4 text_mlm | loss=2 | lr=- grad_norm=- | samples/s=- tflops=- mfu=- mem=0.50GiB "
                    "data_wait=- eta=0s")


@pytest.mark.parametrize("seconds, text", [(0, "0s"), (45.4, "45s"), (185, "3m05s"), (3720, "1h02m"),
                                           (180000, "2d02h"), (float("inf"), "-")])
def test_duration(seconds, text):
    assert duration(seconds) == text


def test_logger_writes_one_line_per_interval(tmp_path, caplog):
    clock = FakeClock()
    logger, wall = make_logger(tmp_path / "run", clock)  # log_interval 2, 10 steps in all, MFU peak known
    with caplog.at_level(logging.INFO, logger="vlmo_ds.train.metrics"), logger:
        run_steps(logger, clock, wall, range(1, 6))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert [line.split()[1] for line in lines] == ["2/10", "4/10", "5/10"]  # the last, short window at close
    assert lines[0] == ("step 2/10 pretrain | loss=3 | lr=- grad_norm=- | samples/s=16.0 tflops=3 mfu=30.0% "
                        f"mem={fields(lines[0])['mem']} data_wait=25.0% eta=16s")


@pytest.mark.slow
def test_training_log_in_a_file_has_the_lines_and_no_bar(run_data, tmp_path):
    log_file = tmp_path / "train.log"
    with open(log_file, "w") as stderr:  # not a terminal, as in a Slurm job
        subprocess.run(train_command(*recipe_args(run_data, tmp_path / "run", 4, 4, "train.log_every=2")), env=ENV,
                       check=True, stdout=stderr, stderr=stderr)
    text = log_file.read_text()
    assert "\r" not in text and "step/s]" not in text  # no tqdm bar
    found = [LINE.search(line) for line in text.splitlines()]
    lines = [m.group(1) for m in found if m]
    assert [line.split()[1] for line in lines] == ["2/4", "4/4"], text[-3000:]
    for line in lines:
        assert line.startswith(f"step {line.split()[1]} image_text | loss=")  # the total loss first
        values = fields(line)
        for name in ("loss", "itc", "itm", "mlm", *FIELDS):
            assert values.get(name, "-") != "-", (name, line)
    assert fields(lines[-1])["eta"] == "0s"
