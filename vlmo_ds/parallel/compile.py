"""Opt-in torch.compile of each MoME block (recipe key parallel.compile_blocks): the block's elementwise work
(layer norms, GELU, biases, layer scales, residual adds, drop path) fused into a few generated kernels around the
GEMMs and attention, instead of one kernel per operation.

Applied like activation checkpointing (vlmo_ds.parallel.checkpointing): per block, in place, on anything holding
blocks (a VLMo, a pipeline stage, a model under DeepSpeed). nn.Module.compile makes the block's own call run a
compiled version of itself, so parameter names, state-dict keys and hooks stay as they are; the compiled call traces
whatever forward the block has when it runs, so it composes with checkpointing in either order (torch.compile keeps a
non-reentrant checkpoint region as one: recomputed in backward, not saved). Block instances share one compiled code
per call signature (each mode, each sequence shape), not one per block.

Under torch.compile the drop-path masks come from the compiled kernels' own random stream, not torch's eager one:
the same distribution, other draws (set torch._inductor.config.fallback_random=True to draw as eagerly).
"""
from __future__ import annotations

import torch
from torch import nn

from vlmo_ds.model.block import Block

RECOMPILE_LIMIT = 64
"""Compiled variants kept per code object: modes x sequence shapes x VL / plain blocks, well past torch's default 8
(beyond the limit a block silently runs eagerly)."""


def compile_blocks(module: nn.Module) -> int:
    """torch.compile every MoME block of `module` in place; returns how many."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    blocks = [m for m in module.modules() if isinstance(m, Block)]
    for block in blocks:
        block.compile()
    return len(blocks)
