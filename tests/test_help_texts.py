"""--help of the entry points a user meets first: usage and what the command does, exit 0, nothing run."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def help_of(*command: str) -> str:
    done = subprocess.run([*command, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_model_table_help_explains_and_runs_nothing():
    out = help_of(sys.executable, "-m", "vlmo_ds.model")
    assert out.startswith("usage: python -m vlmo_ds.model") and "GFLOP" in out and "smoke test:" not in out


def test_submit_stages_help_prints_its_usage():
    out = help_of("bash", "slurm/submit_stages.sh")
    assert "slurm/submit_stages.sh [SBATCH_OPTION ...] -- RECIPE [key=value ...]" in out and "afterok" in out


def test_make_synthetic_help_describes_the_current_data_set():
    out = help_of(sys.executable, "tools/make_synthetic.py")
    assert "12 colours" in out and "never the shapes themselves" in out
