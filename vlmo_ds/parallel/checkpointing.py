"""Activation checkpointing of MoME blocks: a checkpointed block keeps only its input during the forward pass and
runs its forward again during backward (torch.utils.checkpoint, non-reentrant), trading one extra forward of the
block for the memory of its activations.

It works on anything holding blocks - a VLMo, a pipeline stage, a model under DeepSpeed - and leaves parameter names
and state-dict keys alone (optimizer groups, frozen groups and checkpoints see the same model): the block's forward
is replaced on the instance, not wrapped in another module. The random state is restored for the recomputation, so
drop path draws the same masks and losses and gradients are those of the model without checkpointing.
"""
from __future__ import annotations

import types

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from vlmo_ds.model.block import Block


def _checkpointed_forward(block: Block, *args, **kwargs) -> torch.Tensor:
    # The block builds its attention bias inside this region (vlmo_ds.model.attention): only its input is kept.
    return checkpoint(type(block).forward, block, *args, use_reentrant=False, **kwargs)


def set_activation_checkpointing(module: nn.Module, every: int = 1) -> list[int]:
    """Checkpoint every `every`-th MoME block of `module` (1: all, 2: the 1st, 3rd, ...; 0: none, restoring plain
    blocks); returns the positions (in module order) of the checkpointed blocks."""
    if every < 0:
        raise ValueError(f"activation checkpointing every={every} must be 0 (off) or a positive block interval")
    chosen = []
    for position, block in enumerate(m for m in module.modules() if isinstance(m, Block)):
        block.__dict__.pop("forward", None)
        if every and position % every == 0:
            block.forward = types.MethodType(_checkpointed_forward, block)
            chosen.append(position)
    return chosen
