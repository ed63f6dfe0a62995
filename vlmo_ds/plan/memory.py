"""Memory per rank of one layout of the image-text pre-training step, by kind.

Parameters, gradients and optimizer state (Adam's two moments, plus fp32 master weights under DeepSpeed's bf16),
partitioned by ZeRO over the data-parallel ranks and by TP x PP over the model: a rank holds its tensor shard of
its pipeline stage's blocks, the embeddings (first stage) or the heads (last stage), whichever stage is largest.

Activations, from what a block keeps for backward (vlmo_ds.model.vlmo's docstring, checked by tests/test_plan*.py
against MemoryMeter): per token of a block call, without checkpointing,
    10 D + 2 F values    the norm outputs, q, k, v, the attention output and projection, the residual, the block's
                         output, and the expert's fc1 and GELU outputs (F = mlp_dim); 1/t of them under TP
    + H N  (sdpa only)   the attention probabilities of the math kernel; FlexAttention keeps a log-sum-exp, H fp32
With checkpointing a block keeps its input (D per token), and backward holds one block's recomputation at a time;
both add backward's working set, the gradients of one block call ((D + F) per token of the largest call).
The passes of a micro-batch (ITC's image, text and their VL copies, the fused pass over 4B pairs) are summed:
they all live until backward. Under PP the first stage keeps min(PP, micro-batches) in flight (1F1B's warm-up).

Attention bias: the relative-position index [N, N] (int64) and key mask every pass shares, and on the sdpa kernel
the additive mask a block builds ([B, H, N, N] once broadcast with padding; alive for the call).
Communication buckets: ZeRO's reduce and all-gather buckets (DeepSpeed double-buffers the reduce bucket with
overlap_comm), ZeRO-3's prefetched and live gathered parameters (vlmo_ds.config.zero_settings). The optimizer step
of torch's AdamW (single-tensor on CPU) adds two temporaries the size of the largest parameter.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, fields

import torch

from vlmo_ds.model.config import ModelConfig
from vlmo_ds.parallel.pipeline_stage import split_blocks

PRECISION_BYTES = {
    # (parameter, gradient, optimizer state per parameter, activation)
    "fp32": (4, 4, 8, 4),
    "amp": (4, 4, 8, 2),  # fp32 parameters, bf16 autocast (the one-process check)
    "bf16": (2, 4, 12, 2),  # DeepSpeed bf16: fp32 master + Adam moments, gradients reduced in fp32
}


@dataclass
class MemoryBreakdown:
    """Bytes per rank at its peak."""

    parameters: float = 0
    gradients: float = 0
    optimizer: float = 0
    activations: float = 0
    attention_bias: float = 0
    buckets: float = 0
    reserve: float = 0

    @property
    def total(self) -> float:
        return sum(getattr(self, f.name) for f in fields(self))


@dataclass(frozen=True)
class ParameterSplit:
    """The model's parameters: in blocks (per block), and outside them (embeddings, heads, tables)."""

    per_block: tuple[int, ...]
    embeddings: int
    """Patch and text embeddings, modality types, the relative table (first stage)."""
    heads: int
    """Final norm, ITC projections, pooler, ITM and MLM heads (last stage)."""
    largest: int
    """The largest single parameter tensor (the optimizer step's temporaries)."""
    tensors: int
    """Parameter tensors (the optimizer step's ops)."""
    vectors: int
    """Parameters in tensors of at most mlp_dim elements (ZeRO-3 keeps them whole: zero_settings' threshold)."""


@functools.lru_cache(maxsize=None)
def parameter_split(cfg: ModelConfig) -> ParameterSplit:
    """Counted on the meta device (no memory, no initialisation)."""
    from vlmo_ds.model.vlmo import VLMo

    with torch.device("meta"):
        model = VLMo(cfg)
    blocks = tuple(sum(p.numel() for p in b.parameters()) for b in model.transformer.blocks)
    heads = sum(p.numel() for n, p in model.named_parameters()
                if n.startswith(("transformer.norm", "itc_", "pooler", "itm_", "mlm_", "mim_", "logit_")))
    total = sum(p.numel() for p in model.parameters())
    return ParameterSplit(blocks, total - sum(blocks) - heads, heads, max(p.numel() for p in model.parameters()),
                          len(list(model.parameters())),
                          sum(p.numel() for p in model.parameters() if p.numel() <= cfg.mlp_dim))


def rank_parameters(cfg: ModelConfig, tp: int, pp: int) -> float:
    """Parameters of the most loaded rank: its stage's blocks and end pieces, matrices split over tp ranks (the
    norms and layer scales, a small part, are counted as split too)."""
    split = parameter_split(cfg)
    stages = split_blocks(cfg.depth, pp)
    loads = [sum(split.per_block[i] for i in blocks) for blocks in stages]
    loads[0] += split.embeddings
    loads[-1] += split.heads
    return max(loads) / tp


def stream_calls(cfg: ModelConfig, batch: int, text_len: int) -> list[tuple[int, int, int]]:
    """(block calls, rows, sequence length) of one micro-batch: the image and text passes through every block,
    their VL copies through the top blocks, and the fused pass over 4B rows (MLM and the three ITM pairings)."""
    vl = cfg.depth - cfg.vlffn_start
    return [(cfg.depth, batch, cfg.image_len), (cfg.depth, batch, text_len), (vl, batch, cfg.image_len),
            (vl, batch, text_len), (cfg.depth, 4 * batch, text_len + cfg.image_len)]


def block_kept(cfg: ModelConfig, rows: int, seq: int, tp: int, act: int, kernel: str) -> float:
    """Bytes one block call keeps for backward without checkpointing (module docstring)."""
    tokens = rows * seq
    kept = tokens * (10 * cfg.dim + 2 * cfg.mlp_dim) * act / tp
    heads = cfg.heads / tp
    kept += rows * heads * seq * (seq * act if kernel == "sdpa" else 4)
    return kept


def activation_bytes(cfg: ModelConfig, batch: int, tp: int, pp: int, checkpointing: bool, act: int,
                     kernel: str, accumulation: int = 1) -> float:
    """Activations of the most loaded pipeline stage at the start of backward (module docstring)."""
    calls = stream_calls(cfg, batch, cfg.max_text_len)
    share = max(len(r) for r in split_blocks(cfg.depth, pp)) / cfg.depth  # the largest stage's share of a pass
    largest = max(calls, key=lambda call: call[1] * call[2])
    gradients = largest[1] * largest[2] * (cfg.dim + cfg.mlp_dim) * act / tp  # backward's working set of a block
    if checkpointing:
        kept = sum(n * rows * seq * cfg.dim * act for n, rows, seq in calls)  # block inputs, whole on every TP rank
        working = block_kept(cfg, largest[1], largest[2], tp, act, kernel) + gradients  # one block recomputed
    else:
        kept = sum(n * block_kept(cfg, rows, seq, tp, act, kernel) for n, rows, seq in calls)
        working = gradients
    in_flight = min(pp, accumulation)  # 1F1B's first stage runs pp forwards before its first backward
    return kept * share * in_flight + working + head_bytes(cfg, batch, tp, act)


def head_bytes(cfg: ModelConfig, batch: int, tp: int, act: int) -> float:
    """The MLM head over every text position (vlmo_ds.objectives.mlm): the loss's fp32 log-probabilities [B*T, V]
    kept, and two tensors of that size at the start of backward (their gradient, the logits'); the embeddings'
    outputs of the image, text and fused passes."""
    logits = 3 * batch * cfg.max_text_len * cfg.vocab_size * 4 / tp
    embeddings = 2 * 5 * batch * (cfg.image_len + cfg.max_text_len) * cfg.dim * act
    return logits + embeddings


def attention_bias_bytes(cfg: ModelConfig, batch: int, tp: int, act: int, kernel: str) -> float:
    """The shared relative index of each sequence kind and, on sdpa, one block's [4B, H, N, N] additive mask."""
    fused = cfg.max_text_len + cfg.image_len
    index = 8 * (fused**2 + cfg.image_len**2 + cfg.max_text_len**2)
    return index + (4 * batch * cfg.heads / tp * fused**2 * act if kernel == "sdpa" else 0)
