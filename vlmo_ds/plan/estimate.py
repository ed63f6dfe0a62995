"""One layout's estimate: memory per rank (vlmo_ds.plan.memory), step time and MFU (vlmo_ds.plan.timing's model),
collective bytes per rank (vlmo_ds.parallel.traffic's formulas)."""
from __future__ import annotations

from dataclasses import dataclass, field

from vlmo_ds.model.config import ModelConfig
from vlmo_ds.model.flops import block_flops, image_text_step_flops
from vlmo_ds.parallel.pipeline_stage import split_blocks
from vlmo_ds.parallel.traffic import ImageTextShape, pipeline_p2p, tensor_parallel_all_reduce, zero_minimum
from vlmo_ds.plan import timing
from vlmo_ds.plan.gpus import Machine
from vlmo_ds.plan.memory import (PRECISION_BYTES, MemoryBreakdown, activation_bytes, attention_bias_bytes,
                                 parameter_split, rank_parameters, stream_calls)


@dataclass(frozen=True)
class Layout:
    tensor: int
    pipeline: int
    data: int
    zero_stage: int
    checkpointing: bool
    micro_batch: int
    accumulation: int = 1

    def describe(self) -> str:
        return (f"TP{self.tensor} x PP{self.pipeline} x DP{self.data} ZeRO-{self.zero_stage} "
                f"AC {'on' if self.checkpointing else 'off'} micro {self.micro_batch} x {self.accumulation}")


@dataclass
class Estimate:
    layout: Layout
    machine: str
    precision: str
    memory: MemoryBreakdown
    capacity: float
    """Bytes a rank may use (the GPU's memory)."""
    step: timing.StepTime
    model_flops: float
    """Model FLOPs of one training step over all ranks (no recomputation)."""
    peak_flops: float
    """The machine's datasheet FLOP/s per rank at this precision."""
    ranks: int
    collectives: dict = field(default_factory=dict)
    """Bytes one rank sends per training step: gradient_reduction, parameter_all_gather, tensor_all_reduce,
    pipeline_p2p (the formulas of vlmo_ds.parallel.traffic)."""

    @property
    def fits(self) -> bool:
        return self.memory.total <= self.capacity

    @property
    def over_by(self) -> float:
        return self.memory.total - self.capacity

    @property
    def step_seconds(self) -> float:
        return self.step.total

    @property
    def mfu(self) -> float:
        return self.model_flops / self.step.total / (self.peak_flops * self.ranks)

    @property
    def samples_per_second(self) -> float:
        lay = self.layout
        return lay.micro_batch * lay.accumulation * lay.data / self.step.total


def zero_bucket_bytes(cfg: ModelConfig, lay: Layout, precision: str, machine: Machine) -> float:
    """DeepSpeed's staging buffers with vlmo_ds's ZeRO settings (vlmo_ds.config.zero_settings)."""
    if lay.zero_stage == 0 or lay.data == 1:
        return 0.0
    from vlmo_ds.config.zero_settings import zero_settings

    ds_precision = "fp32" if precision == "fp32" else "bf16"
    zero = zero_settings(cfg, lay.zero_stage, lay.tensor * lay.pipeline, ds_precision,
                         machine.hbm_bytes // 5)["zero_optimization"]
    grad = PRECISION_BYTES[precision][1]
    param = PRECISION_BYTES[precision][0]
    buckets = 2 * zero["reduce_bucket_size"] * grad  # overlap_comm double-buffers the reduction
    if lay.zero_stage < 3:
        return buckets + zero["allgather_bucket_size"] * param
    live = min(zero["stage3_max_live_parameters"], rank_parameters(cfg, lay.tensor, lay.pipeline))
    return buckets + (zero["stage3_prefetch_bucket_size"] + live) * param


def collective_bytes(cfg: ModelConfig, lay: Layout, precision: str, kept_for_step: bool = True) -> dict[str, float]:
    """Per rank per training step, from vlmo_ds.parallel.traffic (ZeRO-3: parameters kept for the step when
    zero_settings keeps them: one gather per micro-batch)."""
    param_b, grad_b, _, act = PRECISION_BYTES[precision]
    params = rank_parameters(cfg, lay.tensor, lay.pipeline)
    persistent = parameter_split(cfg).vectors / (lay.tensor * lay.pipeline) if lay.zero_stage == 3 else 0
    grad_comm = 4 if precision == "bf16" else grad_b  # communication_data_type fp32 for bf16 runs
    zero = zero_minimum(lay.zero_stage, lay.data, params, param_b, persistent, lay.accumulation,
                        bytes_per_grad=grad_comm)
    if lay.zero_stage == 3 and kept_for_step:
        f = (lay.data - 1) / lay.data
        kept = f * persistent * param_b
        zero["parameter_all_gather"] = (zero["parameter_all_gather"] - kept) / 2 + kept
    # M: the MLM head and its vocabulary-parallel loss run over every text position (vlmo_ds.objectives.mlm)
    shape = ImageTextShape(lay.micro_batch, cfg.max_text_len, cfg.image_len, cfg.dim, cfg.depth, cfg.vlffn_start,
                           lay.micro_batch * cfg.max_text_len, act)
    starts = [blocks.start for blocks in split_blocks(cfg.depth, lay.pipeline)[1:]]
    return {**zero,
            "tensor_all_reduce": lay.accumulation * tensor_parallel_all_reduce(shape, lay.tensor, lay.pipeline)[
                "per_rank"],
            "pipeline_p2p": lay.accumulation * pipeline_p2p(shape, starts)["per_rank"]}


def step_time(cfg: ModelConfig, lay: Layout, precision: str, machine: Machine, comm: dict[str, float],
              ranks: int) -> timing.StepTime:
    act = PRECISION_BYTES[precision][3]
    mp = lay.tensor * lay.pipeline
    micro_flops = image_text_step_flops(cfg, lay.micro_batch)
    calls = stream_calls(cfg, lay.micro_batch, cfg.max_text_len)
    if lay.checkpointing:  # one more forward of every block call
        micro_flops += sum(n * rows * block_flops(cfg, seq) for n, rows, seq in calls)
    compute = lay.accumulation * micro_flops / mp / machine.gemm_rate(precision, cfg.dim // lay.tensor)
    values = 0.0
    ops = 0.0
    for n, rows, seq in calls:
        per_call = rows * seq * timing.VALUES_PER_TOKEN * cfg.dim / lay.tensor
        if machine.attention_kernel == "sdpa":
            per_call += timing.SCORE_PASSES * rows * cfg.heads / lay.tensor * seq * seq
        values += n * per_call * (4 if lay.checkpointing else 3)  # forward, backward (2x), recomputation
        ops += n * (timing.OPS_FORWARD + timing.OPS_BACKWARD + (timing.OPS_RECOMPUTE if lay.checkpointing else 0))
    params = rank_parameters(cfg, lay.tensor, lay.pipeline)
    shard = lay.data if lay.zero_stage else 1
    optimizer_bytes = timing.ADAMW_BYTES_PER_PARAMETER * params / shard
    optimizer_ops = 0 if machine.fused_optimizer else timing.OPS_PER_TENSOR_ADAMW * parameter_split(cfg).tensors
    traffic = (lay.accumulation * values * act / lay.pipeline + optimizer_bytes) / machine.memory_bandwidth
    overhead = (lay.accumulation * ops / lay.pipeline + optimizer_ops) * machine.kernel_overhead
    comm_exposed, comm_total = communication(lay, machine, comm, ranks, compute + traffic)
    bubble = (lay.pipeline - 1) / lay.accumulation * (compute + traffic) if lay.pipeline > 1 else 0.0
    return timing.StepTime(compute, traffic, overhead, comm_exposed, bubble, comm_total)


def communication(lay: Layout, machine: Machine, comm: dict[str, float], ranks: int,
                  busy: float) -> tuple[float, float]:
    """(exposed, total) seconds of the step's collectives (timing's docstring)."""
    node = machine.gpus_per_node
    tp_bw = machine.intra_node_bandwidth if lay.tensor <= node else machine.inter_node_bandwidth
    pp_bw = machine.intra_node_bandwidth if lay.tensor * lay.pipeline <= node else machine.inter_node_bandwidth
    dp_bw = machine.intra_node_bandwidth if ranks <= node else machine.inter_node_bandwidth
    grads = comm["gradient_reduction"] / dp_bw
    gathers = comm["parameter_all_gather"] / dp_bw
    tensor = comm["tensor_all_reduce"] / tp_bw
    p2p = comm["pipeline_p2p"] / pp_bw
    backward = 2 / 3 * busy / lay.accumulation  # the last micro-batch's backward
    if lay.pipeline > 1:  # overlap_comm is off under pipeline parallelism
        exposed_grads = grads
    elif lay.zero_stage >= 2:  # reduced during every micro-batch's backward
        exposed_grads = max(0.0, grads - lay.accumulation * backward)
    else:
        exposed_grads = max(0.0, grads - backward)
    exposed_gathers = max(0.0, gathers - busy) if lay.zero_stage == 3 else gathers
    return exposed_grads + exposed_gathers + tensor + p2p, grads + gathers + tensor + p2p


def estimate(cfg: ModelConfig, lay: Layout, machine: Machine, precision: str = "bf16") -> Estimate:
    param_b, grad_b, opt_b, act = PRECISION_BYTES[precision]
    if precision == "bf16" and lay.zero_stage < 2:  # DeepSpeed accumulates in bf16 there (zero_settings)
        grad_b = 2
    params = rank_parameters(cfg, lay.tensor, lay.pipeline)
    dp = lay.data
    zero = lay.zero_stage
    memory = MemoryBreakdown(
        parameters=params * param_b / (dp if zero == 3 else 1),
        gradients=params * grad_b / (dp if zero >= 2 else 1),
        optimizer=params * opt_b / (dp if zero >= 1 else 1),
        buckets=zero_bucket_bytes(cfg, lay, precision, machine),
        reserve=machine.reserve_bytes)
    # The peak is at the start of backward (activations all alive; gradients only where they persist between
    # micro-batches: accumulation, ZeRO-2/3's partitioned buffers) or in the optimizer step (every gradient, and
    # torch AdamW's two temporaries of the largest tensor), whichever is higher.
    backward = MemoryBreakdown(**vars(memory))
    if lay.accumulation == 1 and zero < 2:
        backward.gradients = 0
    backward.activations = activation_bytes(cfg, lay.micro_batch, lay.tensor, lay.pipeline, lay.checkpointing, act,
                                            machine.attention_kernel, lay.accumulation)
    backward.attention_bias = attention_bias_bytes(cfg, lay.micro_batch, lay.tensor, act, machine.attention_kernel)
    memory.optimizer += 2 * parameter_split(cfg).largest * 4 / lay.tensor
    memory = max(backward, memory, key=lambda m: m.total)
    ranks = lay.tensor * lay.pipeline * dp
    comm = collective_bytes(cfg, lay, precision)
    step = step_time(cfg, lay, precision, machine, comm, ranks)
    flops = lay.accumulation * dp * image_text_step_flops(cfg, lay.micro_batch)
    return Estimate(lay, machine.name, precision, memory, machine.hbm_bytes, step, flops,
                    machine.flops[precision], ranks, comm)
