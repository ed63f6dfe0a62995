"""Step time of one rank: compute, memory traffic, per-kernel overhead, and the communication that does not overlap.

    compute    model FLOPs of the rank's share (vlmo_ds.model.flops; + one forward of the blocks under activation
               checkpointing) / the machine's GEMM rate at the model's width (Machine.gemm_rate)
    traffic    the elementwise work (norms, bias adds, GELU, residuals, layer scale, drop path, softmax) and the
               GEMMs' activation operands, read and written once per op: VALUES_PER_TOKEN D values per token per
               block call forward, the attention probabilities SCORE_PASSES times (sdpa's math kernel;
               FlexAttention keeps scores on chip), backward twice the forward; the optimizer step reads and writes
               its state / memory bandwidth
    overhead   ops per step (counted: OPS_*) x the machine's per-op cost
    comm       bytes from vlmo_ds.parallel.traffic's formulas over the link the group spans (NVLink inside a node,
               the network across nodes); ZeRO's gradient reduction overlaps the backward of the last micro-batch
               (DeepSpeed's overlap_comm; not under pipeline parallelism), ZeRO-3's gathers overlap compute (prefetch);
               tensor-parallel all-reduces and the parameter all-gather after the step are exposed. Pipelines add
               1F1B's bubble: (PP - 1) / micro-batches of the compute.
"""
from __future__ import annotations

from dataclasses import dataclass

VALUES_PER_TOKEN = 56
"""Values one block call's forward reads + writes per token, in units of D: the elementwise ops' operands (about
40) and the GEMMs' activation operands (16: qkv, projection, fc1, fc2 in and out)."""
SCORE_PASSES = 4
"""Passes over the attention probabilities per forward on sdpa's math kernel (scores, mask add, softmax, @ v)."""
OPS_FORWARD, OPS_BACKWARD, OPS_RECOMPUTE = 100, 135, 220
"""Ops (ATen calls, views included: each costs the host a dispatch) per block call, counted in vlmo_ds's step:
forward, backward, and what activation checkpointing adds (the recomputed forward and its bookkeeping)."""
OPS_PER_TENSOR_ADAMW = 13
"""torch AdamW's single-tensor step (CPU) per parameter tensor; fused (GPU) steps cost about nothing per tensor."""
ADAMW_BYTES_PER_PARAMETER = 48
"""Reads and writes of one parameter's step: parameter, gradient, two moments, temporaries (fp32)."""


@dataclass
class StepTime:
    compute: float
    traffic: float
    overhead: float
    comm_exposed: float
    bubble: float
    comm_total: float

    @property
    def total(self) -> float:
        return self.compute + self.traffic + self.overhead + self.comm_exposed + self.bubble
