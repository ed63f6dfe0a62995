"""Optional Weights & Biases logging (log.wandb=PROJECT): every scalar at its step in one W&B run per run folder,
an offline run with the real package when it is installed, and one line naming `pip install wandb` when it is not."""
import importlib.util
import sys
from types import SimpleNamespace

import pytest

from test_metrics import FakeClock, make_logger, run_steps
from train_cli import recipe_args
from vlmo_ds.config import load_config, to_dict
from vlmo_ds.train.__main__ import main
from vlmo_ds.train.metrics import read_metrics
from vlmo_ds.train.wandb_log import ID_FILE


RECIPE = load_config("tiny_image_text")


class FakeWandb:
    """Records wandb.init calls and the lines each run logs."""

    def __init__(self) -> None:
        self.runs: list[dict] = []

    def init(self, **kwargs):
        record = {"init": kwargs, "lines": [], "finished": False}
        self.runs.append(record)
        return SimpleNamespace(log=lambda values, step: record["lines"].append((step, values)),
                               finish=lambda: record.update(finished=True))


def two_stages(run_dir):
    """Two stages, each with its own metrics logger, as the trainer runs them."""
    clock = FakeClock()
    for stage, steps in (("a", range(1, 5)), ("b", range(5, 7))):
        logger, wall = make_logger(run_dir, clock, wandb="vlmo-test", run_config=RECIPE)
        with logger:
            run_steps(logger, clock, wall, steps, stage=stage)


def test_every_scalar_reaches_one_wandb_run(monkeypatch, tmp_path):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    two_stages(tmp_path / "run")
    run_id = (tmp_path / "run" / ID_FILE).read_text().strip()
    assert [r["init"]["id"] for r in fake.runs] == [run_id, run_id]
    assert all(r["init"]["project"] == "vlmo-test" and r["init"]["resume"] == "allow" and r["finished"]
               and r["init"]["config"] == to_dict(RECIPE) for r in fake.runs)
    logged = [(step, name, value) for r in fake.runs for step, values in r["lines"] for name, value in values.items()]
    jsonl = [(r["step"], name, value) for r in read_metrics(tmp_path / "run" / "metrics.jsonl")
             for name, value in r.items() if name not in ("step", "time", "stage", "event")]
    assert logged == jsonl


def test_offline_run_with_the_real_package(monkeypatch, tmp_path):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    two_stages(tmp_path / "run")
    run_id = (tmp_path / "run" / ID_FILE).read_text().strip()
    runs = sorted((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all((run / f"run-{run_id}.wandb").stat().st_size > 0 for run in runs)


def test_missing_wandb_is_one_line(monkeypatch, capsys, run_data, tmp_path):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    assert main(recipe_args(run_data, tmp_path / "run", 2) + ["log.wandb=vlmo-test"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "log.wandb" in err and "pip install wandb" in err, err
    assert not (tmp_path / "run").exists()  # nothing started
