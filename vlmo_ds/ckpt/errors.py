"""The error the checkpoint tools raise for anything a user can fix: a bad path, a truncated file, a checkpoint of
another model than asked. Its message is one line that names the problem and what to do; the command line prints it
and exits with status 2."""
from __future__ import annotations


class CheckpointError(ValueError):
    """A user-facing checkpoint problem (one line: what is wrong and what to do)."""
