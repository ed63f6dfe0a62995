"""The planner's collective bytes per rank (vlmo_ds.plan.estimate.collective_bytes, from the traffic formulas)
equal what tools/bench.py's layout mode counts on gloo ranks (tiny, fp32, batch 2)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from vlmo_ds.model.config import preset
from vlmo_ds.plan.estimate import Layout, collective_bytes

BENCH = Path(__file__).resolve().parents[1] / "tools" / "bench.py"


def bench(tmp_path, *args) -> dict:
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, str(BENCH), "--preset", "tiny", "--batch", "2", "--steps", "1", "--json",
                    str(out), *args], check=True, capture_output=True, timeout=300)
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("args, layout", [
    (("--ranks", "2", "--zero-stage", "1"), Layout(1, 1, 2, 1, False, 2, 1)),
    (("--ranks", "2", "--zero-stage", "2", "--accumulation", "2"), Layout(1, 1, 2, 2, False, 2, 2)),
    (("--ranks", "2", "--zero-stage", "3"), Layout(1, 1, 2, 3, False, 2, 1)),
    (("--ranks", "2", "--tensor", "2"), Layout(2, 1, 1, 0, False, 2, 1)),
])
def test_planned_collective_bytes_equal_the_counted(tmp_path, args, layout):
    r = bench(tmp_path, *args)
    planned = collective_bytes(preset("tiny"), layout, "fp32")
    for key in ("gradient_reduction", "parameter_all_gather", "tensor_all_reduce"):
        counted = r[key]["counted"]
        print(f"{' '.join(args)} {key}: counted {counted:,.0f}, planned {planned[key]:,.0f}")
        assert planned[key] == pytest.approx(counted, rel=1e-4, abs=64)  # + the gradient norm's and padding's bytes
