"""tools/bench_loader.py writes realistic shards, measures the training loader per core and asks the planner."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np

TOOL = Path(__file__).resolve().parents[1] / "tools" / "bench_loader.py"


def load_tool():
    spec = importlib.util.spec_from_file_location("bench_loader", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_loader_bench_prints_rates_per_core_beside_the_planner(tmp_path, capsys):
    out = tmp_path / "loader.json"
    assert load_tool().main(["--samples", "12", "--sizes", "224", "--batch", "4", "--seconds", "0.3",
                             "--json", str(out)]) == 0
    found = json.loads(out.read_text())
    (row,) = found["loader"]
    assert row["size"] == 224 and row["pairs"] >= 4 and row["pairs_per_s_per_core"] > 0
    need = found["planner"]
    assert need["recipe"] == "large" and need["image_size"] == 224 and need["pairs_per_s_per_gpu"] > 0
    assert abs(need["cores_per_gpu"] - need["pairs_per_s_per_gpu"] / row["pairs_per_s_per_core"]) < 1e-9
    printed = capsys.readouterr().out
    assert "wrote 12 pairs" in printed and "pairs/s per GPU at 224 px" in printed and "cores per GPU" in printed


def test_written_pairs_look_like_web_photos(tmp_path):
    tool = load_tool()
    tool.write_pairs(tmp_path, 3)
    sizes = json.loads((tmp_path / "sizes.json").read_text())
    assert sizes == {"shard-000000.tar": 3}
    jpeg = tool.photo(np.random.default_rng(1))
    assert jpeg[:2] == b"\xff\xd8" and 30_000 < len(jpeg) < 90_000
    assert 8 <= len(tool.caption(np.random.default_rng(2)).split()) <= 16
