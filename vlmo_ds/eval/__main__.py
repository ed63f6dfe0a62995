"""Entry point of `python -m vlmo_ds.eval` (see vlmo_ds.eval.cli)."""
import sys

from vlmo_ds.eval.cli import main

if __name__ == "__main__":
    sys.exit(main())
