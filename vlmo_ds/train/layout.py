"""How the ranks of a run hold the model: the layout (tensor x pipeline x data, ZeRO stage), this rank's place in
it, the module this rank trains, and the pipelined step.

    TP x PP = 1 x 1  the whole model on every rank, data parallel over all of them (megatron-core is not imported)
    TP > 1           VLMo built with megatron-core's layers (vlmo_ds.parallel.tensor_layers), holding this tensor
                     rank's shard of the one-process initialisation (tp_convert.shard_state_dict): a TP run starts
                     from exactly the weights one process would; under ZeRO-3 the shard is built inside zero.Init
    PP > 1           the PipelineStage of this rank cut from that (TP or whole) model; a step runs megatron-core's
                     1F1B schedule (vlmo_ds.parallel.pipeline_step) and DeepSpeed ZeRO 0/1 averages and steps
Ranks are megatron's (order tp-dp-pp); data splitting, ITC gathers and ITM negatives use the data-parallel rank and
group, so every TP/PP rank of one replica reads the same batch and draws the same negatives.

Every rank first builds the one-process model from the stage's seed (and its start weights), then keeps its part:
the extra memory is one copy of the fp32 model per process at start-up, the price of starting every layout from
the same numbers. The RNG state after that build is restored once the part is made, so drop path draws what it
draws on one process.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from vlmo_ds.config import RunConfig
from vlmo_ds.model.config import ModelConfig
from vlmo_ds.model.vlmo import VLMo
from vlmo_ds.parallel import layout_rules
from vlmo_ds.parallel.launch import DistEnv

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Layout:
    """The sizes of a run's layout: tensor x pipeline x data = world size; the ZeRO stage over the data ranks."""

    tensor: int
    pipeline: int
    data: int
    zero_stage: int

    @property
    def model_parallel(self) -> bool:
        return self.tensor * self.pipeline > 1

    def as_dict(self) -> dict[str, int]:
        """The form trainer.json keeps ("layout": {"tensor", "pipeline", "data", "zero_stage"})."""
        return asdict(self)


@dataclass(frozen=True)
class Placement:
    """This rank in the layout. Groups are None when TP x PP = 1 (the default group is the data-parallel group)."""

    layout: Layout
    mpu: Any
    """vlmo_ds.parallel.mpu.MegatronMPU for DeepSpeed (None when TP x PP = 1)."""
    dp_rank: int
    dp_group: Any = None
    tp_rank: int = 0
    tp_group: Any = None
    pp_rank: int = 0
    mp_group: Any = None
    """The TP x PP ranks of this replica (DeepSpeed's model-parallel group)."""

    @property
    def pipelined(self) -> bool:
        return self.layout.pipeline > 1


def layout_of(cfg: RunConfig, world_size: int, model_cfg: ModelConfig) -> Layout:
    """The run's layout, checked by the rules recipe validation applies (one-line ValueError)."""
    par = cfg.parallel
    data = layout_rules.check_layout(world_size, par.tensor, par.pipeline, par.zero_stage, model_cfg,
                                     grad_clip=cfg.optim.grad_clip)
    return Layout(par.tensor, par.pipeline, data, par.zero_stage)


def place(cfg: RunConfig, env: DistEnv, model_cfg: ModelConfig) -> Placement:
    """This rank's placement; for TP x PP > 1 it builds megatron-core's parallel state (once per process)."""
    layout = layout_of(cfg, env.world_size, model_cfg)
    if not layout.model_parallel:
        return Placement(layout, None, env.rank)
    layout_rules.check_pipeline_device(layout.pipeline, torch.cuda.is_available())
    from vlmo_ds.parallel.mpu import init_model_parallel

    mpu = init_model_parallel(layout.tensor, layout.pipeline, model_cfg, layout.zero_stage)
    return Placement(layout, mpu, mpu.get_data_parallel_rank(), mpu.get_data_parallel_group(),
                     mpu.get_tensor_model_parallel_rank(), mpu.get_tensor_model_parallel_group(),
                     mpu.get_pipeline_model_parallel_rank(), mpu.get_model_parallel_group())


def rank_module(full: VLMo, where: Placement, ds_config: dict, device: torch.device) -> nn.Module:
    """This rank's module on `device`, made from `full`, the one-process model (taken apart: do not use it after)."""
    layout = where.layout
    rng = torch.get_rng_state()
    module: nn.Module = full
    if layout.tensor > 1:
        module = _tensor_shard(full, where, ds_config)
    if layout.pipeline > 1:
        from vlmo_ds.parallel.pipeline_stage import PipelineStage

        module = PipelineStage(module, where.pp_rank, layout.pipeline)
    torch.set_rng_state(rng)
    if not _zero_init_used(layout):
        return module.to(device)
    for buffer in module.buffers():  # zero.Init placed the parameter partitions; the index buffers follow
        buffer.data = buffer.data.to(device)
    return module


def _zero_init_used(layout: Layout) -> bool:
    return layout.tensor > 1 and layout.zero_stage == 3


def _tensor_shard(full: VLMo, where: Placement, ds_config: dict) -> VLMo:
    from vlmo_ds.parallel.tensor_layers import TensorParallelLayers
    from vlmo_ds.parallel.tp_convert import shard_state_dict

    cfg, tp = full.cfg, where.layout.tensor
    shard = shard_state_dict(full.state_dict(), where.tp_rank, tp, cfg)
    del full
    zero3 = _zero_init_used(where.layout)
    with _zero_init(where, ds_config) if zero3 else contextlib.nullcontext():
        model = VLMo(cfg, TensorParallelLayers(where.tp_group))
    if zero3:
        _load_partitioned(model, shard)
    else:
        model.load_state_dict(shard, strict=True)
    return model


def _zero_init(where: Placement, ds_config: dict):
    """deepspeed.zero.Init over the data-parallel group: each parameter is partitioned as its module is built, so a
    rank never holds its whole TP shard in accelerator memory."""
    import deepspeed

    return deepspeed.zero.Init(data_parallel_group=where.dp_group, mpu=where.mpu, config_dict_or_path=ds_config)


def _load_partitioned(model: VLMo, shard: dict[str, torch.Tensor]) -> None:
    """Fill zero.Init-partitioned parameters with the shard of the one-process initialisation.

    zero.Init partitions each parameter right after its module's constructor, so the model's own initialisation
    ran on empty partitions and megatron's draw never matched one process anyway; the values that keep a ZeRO-3 TP
    run equal to one process are the sharded one-process weights. Each parameter is gathered, overwritten (every
    data rank writes the same values; data rank 0's are kept) and re-partitioned from rank 0; one at a time, so the
    accelerator holds at most one whole parameter beyond the partitions.
    """
    import deepspeed

    names = set()
    for name, param in model.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            with torch.no_grad():
                param.copy_(shard[name].to(param.device, param.dtype))
        names.add(name)
    for name, buffer in model.named_buffers():
        if name in shard:
            buffer.copy_(shard[name])
            names.add(name)
    missing = set(shard) - names
    if missing:
        raise ValueError(f"the tensor-parallel model has no entries {sorted(missing)[:5]} of the one-process "
                         "weights; the model and its tensor-parallel layers disagree")


def engine_config(ds_config: dict, where: Placement, micro_batch: int, accumulation: int) -> dict:
    """The DeepSpeed config of this layout. Under PP the schedule runs all micro-batches of a step itself, so
    DeepSpeed sees one accumulation step of micro_batch x accumulation samples (the same global batch), and
    overlap_comm is off: with it ZeRO-1 reduces each gradient in a backward hook, and the pipelined step runs one
    backward per pass, so a second pass would reduce a gradient again ("has already been reduced");
    reduce_stage_gradients reduces once after the schedule instead."""
    if not where.pipelined:
        return ds_config
    zero = {**ds_config.get("zero_optimization", {}), "overlap_comm": False}
    return {**ds_config, "train_micro_batch_size_per_gpu": micro_batch * accumulation,
            "gradient_accumulation_steps": 1, "zero_optimization": zero}


def describe(where: Placement, module: nn.Module) -> str:
    """The start-up layout line (mpu.layout_summary's, also without megatron-core)."""
    if where.mpu is not None:
        from vlmo_ds.parallel.mpu import layout_summary

        return layout_summary(where.mpu, where.layout.zero_stage, module)
    params = sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())
    return (f"layout TP 1 x PP 1 x DP {where.layout.data}, ZeRO {where.layout.zero_stage}; this rank (stage 0, "
            f"tensor rank 0) holds {params:,} parameters")


def pipeline_step(engine, stage, micro_batches: list[dict], seeds: list[int], where: Placement,
                  itc_local_rows: bool) -> dict[str, torch.Tensor]:
    """Forward and backward of one optimizer step of `stage` (its config) on the engine's pipeline stage: every
    micro-batch, one 1F1B schedule per pass, then the gradients averaged over the data-parallel group, ready for
    engine.step(). Returns the replica's mean of each loss over the micro-batches as 0-dim device tensors, the same
    on every stage (nothing is copied to the host here)."""
    from vlmo_ds.objectives.pretrain import LossWeights
    from vlmo_ds.parallel.pipeline_deepspeed import reduce_stage_gradients
    from vlmo_ds.parallel.pipeline_step import image_mim_step, image_text_step, text_mlm_step

    stage_module = engine.module

    if stage.kind == "image_text":
        out = image_text_step(stage_module, micro_batches, LossWeights(**stage.loss_weights), seeds,
                              dp_group=where.dp_group, tp_group=where.tp_group, itc_local_rows=itc_local_rows)
    elif stage.kind == "text_mlm":
        out = text_mlm_step(stage_module, micro_batches, tp_group=where.tp_group)
    else:
        out = image_mim_step(stage_module, micro_batches)
    reduce_stage_gradients(engine)
    return out.metrics
