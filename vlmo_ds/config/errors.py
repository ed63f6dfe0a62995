"""Config errors for people: one line that names the key path and the fix, and the CLI wrapper that prints it.

Every problem load_config finds raises ConfigError("optim.lr: must be > 0, got -0.001"); the training entry point
wraps its main in main_errors so that a user sees that single line on stderr (exit status 2), not a traceback.
"""
from __future__ import annotations

import difflib
import functools
import sys
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

T = TypeVar("T")

# Names people carry over from other trainers, mapped to ours (difflib alone ranks e.g. end_lr above lr).
ALIASES = {
    "learning_rate": "lr", "max_lr": "lr", "wd": "weight_decay", "warmup_steps": "warmup", "warmup_ratio": "warmup",
    "clip_grad": "grad_clip", "gradient_clipping": "grad_clip", "max_steps": "steps", "batch_size": "global_batch",
    "train_batch_size": "global_batch", "per_gpu_batchsize": "micro_batch", "micro_batch_size": "micro_batch",
    "tp": "tensor", "pp": "pipeline", "zero": "zero_stage", "type": "kind", "loss_names": "loss_weights",
    "max_text_len": "text_len", "output_dir": "run_dir", "log_dir": "run_dir",
}


class ConfigError(ValueError):
    """A recipe or override problem; the message is one line: '<key path>: <what is wrong>; <fix>'."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


class MissingFileError(ConfigError, FileNotFoundError):
    """A file the config names (tokenizer, shards, checkpoint, DeepSpeed JSON) does not exist."""


def show(value: Any) -> str:
    """A value as the user wrote it in YAML, with its kind: 'abc' (a string), [1, 2] (a list), true (a boolean)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    kinds = {str: "a string", int: "an integer", float: "a number", list: "a list", dict: "a mapping"}
    kind = next((name for t, name in kinds.items() if isinstance(value, t)), type(value).__name__)
    return f"{value!r} ({kind})"


def suggest(word: str, choices: Iterable[str]) -> str | None:
    """The closest choice to `word` (difflib), or None when nothing is close."""
    choices = list(choices)
    leaf = word.rsplit(".", 1)[-1]
    if leaf in ALIASES:
        wanted = word[: len(word) - len(leaf)] + ALIASES[leaf]
        if wanted in choices:
            return wanted
        ends = [c for c in choices if c.rsplit(".", 1)[-1] == ALIASES[leaf]]
        if ends:
            return ends[0]
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    if close:
        return close[0]
    # A key put in the wrong section ("lr" at the top level): match its last part against every key's last part.
    same_leaf = [c for c in choices if c.rsplit(".", 1)[-1] == leaf]
    return same_leaf[0] if same_leaf else None


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """The text " (did you mean 'x'?)" for the closest choice, or "" when nothing is close."""
    hint = suggest(word, choices)
    return f" (did you mean '{hint}'?)" if hint else ""


def main_errors(fn: Callable[..., T]) -> Callable[..., T]:
    """Decorate a CLI main: a ConfigError becomes its one-line message on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        except ConfigError as err:
            sys.stderr.write(f"error: {err}\n")
            raise SystemExit(2) from None

    return wrapper
