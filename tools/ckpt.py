#!/usr/bin/env python
"""vlmo_ds checkpoint tools: consolidate, reshard, export-official, import-official, import-beit, inspect.

    python tools/ckpt.py inspect runs/base/checkpoints/step_00020000
    python tools/ckpt.py consolidate runs/base out/base_step20k
    python tools/ckpt.py reshard runs/base/checkpoints/step_00020000 runs/base_dp16 --data 16 --zero-stage 3
    python tools/ckpt.py reshard out/base_step20k runs/base_tp2 --tensor 2 --data 4 --zero-stage 1
    python tools/ckpt.py export-official out/base_step20k vlmo_base.pth
    python tools/ckpt.py import-official vlmo_base_patch16_224.pt out/vlmo_base
    python tools/ckpt.py import-beit beit_base_patch16_224_pt22k.pth out/beit_base --preset base

Every sub-command has --help (vlmo_ds.ckpt.cli); errors a user can fix exit with status 2 and one line.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from vlmo_ds.ckpt.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
