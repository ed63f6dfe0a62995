"""Optional Weights & Biases logging of a vlmo_ds run (recipe key log.wandb=PROJECT), beside TensorBoard and
metrics.jsonl: the same scalars at the same global steps, and the resolved recipe as the W&B run's config.

One W&B run per run folder: its id is kept in RUN_DIR/wandb_id, so every stage (each opens its own metrics logger)
and a resumed job continue the same W&B run. W&B's files go to RUN_DIR/wandb; with WANDB_MODE=offline nothing leaves
the machine (`wandb sync RUN_DIR/wandb/offline-run-*` uploads later). W&B keeps no step below the last one it holds:
after a resume, the values of steps that the killed job logged past its checkpoint stay as that job logged them
(metrics.jsonl and TensorBoard take the new ones).
"""
from __future__ import annotations

import secrets
from collections.abc import Mapping
from pathlib import Path

from vlmo_ds.config import RunConfig, to_dict

ID_FILE = "wandb_id"


class WandbRun:
    """The run folder's W&B run, open until close(). Only rank 0 makes one."""

    def __init__(self, project: str, run_dir: str | Path, recipe: RunConfig | None) -> None:
        import wandb  # optional: config.check_files refuses log.wandb with one line when it is not installed

        run_dir = Path(run_dir)
        id_file = run_dir / ID_FILE
        if not id_file.exists():
            id_file.write_text(secrets.token_hex(6) + "\n")
        self._run = wandb.init(project=project, dir=str(run_dir), id=id_file.read_text().strip(), resume="allow",
                               name=run_dir.resolve().name,
                               config=None if recipe is None else to_dict(recipe))

    def log(self, step: int, values: Mapping[str, float]) -> None:
        self._run.log(dict(values), step=step)

    def close(self) -> None:
        self._run.finish()
