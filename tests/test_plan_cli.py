"""The planner's command line, its function form and the start-up warning."""
import subprocess
import sys

import pytest
import torch

from vlmo_ds.config.load import load_config
from vlmo_ds.plan import plan
from vlmo_ds.plan.startup import fit_warning


def run(*args):
    return subprocess.run([sys.executable, "-m", "vlmo_ds.plan", *args], capture_output=True, text=True, timeout=120)


def test_help_explains_the_columns():
    text = run("--help").stdout
    for word in ("--gpus", "--gpu", "a100-40gb", "h200", "params", "reserve", "MFU", "do not fit"):
        assert word in text


def test_table_lists_fitting_layouts_best_first_and_says_by_how_much_others_are_over():
    out = run("large", "--gpus", "8", "--gpu", "a100-40gb", "--top", "3", "--over", "2")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("# large on 8 x a100-40gb") and "layouts fit" in lines[0]
    rows = [line for line in lines[2:] if not line.startswith("#")]
    assert len(rows) == 5 and sum("over by" in r for r in rows) == 2
    rates = [float(r.split()[8]) for r in rows[:3]]
    assert rates == sorted(rates, reverse=True)


def test_unknown_gpu_is_one_line():
    out = run("large", "--gpus", "8", "--gpu", "v100")
    assert out.returncode != 0 and "invalid choice: 'v100'" in out.stderr


def test_function_form_and_memory_arithmetic():
    estimates = plan("large", gpus=64, gpu="h100-80gb")
    best = estimates[0]
    assert best.fits and best.ranks == 64 and 0 < best.mfu < 1
    lay = best.layout
    assert lay.micro_batch * lay.accumulation * lay.data == 1024  # the recipe's global batch
    assert [e.fits for e in estimates] == sorted((e.fits for e in estimates), reverse=True)
    # ZeRO partitions: the optimizer state of ZeRO-1 on 64 ranks is 1/64 of ZeRO-0's, the rest equal
    by_stage = {e.layout.zero_stage: e for e in estimates
                if e.layout.tensor == e.layout.pipeline == 1 and not e.layout.checkpointing
                and e.layout.micro_batch == 16}
    assert by_stage[1].memory.optimizer == pytest.approx(by_stage[0].memory.optimizer / 64, rel=0.02)
    assert by_stage[3].memory.parameters < by_stage[1].memory.parameters


def test_startup_warning_names_the_overage_only_when_over():
    too_big = load_config("large", ["train.micro_batch=128"])
    line = fit_warning(too_big, 8, "h100-80gb")
    assert line.startswith("warning: the capacity planner predicts") and "over by" in line and "\n" not in line
    assert fit_warning(load_config("large"), 8, "h100-80gb") is None
    if not torch.cuda.is_available():
        assert fit_warning(too_big, 8) is None  # no GPU here: nothing to fit
