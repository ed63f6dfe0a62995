"""Counting the forward work of a training step in block calls, so that layouts can be compared (tools/bench.py).

A "forward pass" is one sequence batch through all `depth` blocks; the count is taken with forward pre-hooks on the
MoME blocks, so it reads the same for the one-process model and for a pipeline stage (which holds a share of the
blocks: sum the stages' counts, or all-reduce them over the pipeline group). Recomputation by activation
checkpointing calls a block's forward without its hooks and is not counted here: each checkpointed block adds one
forward of its own during backward (vlmo_ds.parallel.checkpointing).

The image-text step of one micro-batch, per model (D = depth, S = vlffn_start):
    image pass D blocks + (D - S) VL-path blocks, the same for text, one fused pass D blocks:
    (3D + 2(D - S)) / D passes; tiny (D 4, S 3): 3.5; base (12, 10): 3.33.
"""
from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator

from torch import nn

from vlmo_ds.model.block import Block


def image_text_passes(depth: int, vlffn_start: int) -> float:
    """Forward passes per micro-batch of the image-text step (the formula in the module docstring)."""
    return (3 * depth + 2 * (depth - vlffn_start)) / depth


@contextlib.contextmanager
def count_block_calls(module: nn.Module) -> Iterator[Counter]:
    """Within the block, a Counter {mode: MoME block forward calls in `module`} ("image", "text", "vl", "fused").

    Its total divided by the model depth is the number of forward passes (summed over pipeline stages).
    """
    calls: Counter = Counter()

    def hook(block: nn.Module, args: tuple, kwargs: dict) -> None:
        calls[args[1] if len(args) > 1 else kwargs["mode"]] += 1

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in module.modules() if isinstance(m, Block)]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()
