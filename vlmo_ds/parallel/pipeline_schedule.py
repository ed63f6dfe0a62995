"""One pass of micro-batches through the pipeline stages with megatron-core's schedule (1F1B without interleaving;
no pipelining at one stage), and the small collectives that move step results between stages.

megatron's schedules read `config`, `model_type` and `set_input_tensor` from the model they are given; these live
on a small adapter, not on the stage, so that the stage stays a plain module (a DeepSpeed engine wrapping it has a
`config` of its own, which megatron would read instead).

Stream tensors change shape from pass to pass (unimodal vs fused) and with the text length, so the schedule
exchanges shapes before each tensor (variable_seq_lengths); activations are sent as [B, N, D] (megatron's usual
[N, B, D] order is only a convention of its own models). Each sent activation is freed right after sending, its
autograd node kept (deallocate_pipeline_outputs), as in megatron's own training.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import ModelParallelConfig, parallel_state
from megatron.core.enums import ModelType
from megatron.core.pipeline_parallel import get_forward_backward_func

from vlmo_ds.model.vlmo import PassInputs
from vlmo_ds.parallel.pipeline_stage import PipelineStage, stage_pass


@dataclass
class _ScheduleConfig(ModelParallelConfig):
    """ModelParallelConfig plus the TransformerConfig fields megatron-core 0.16's schedules read. (TransformerConfig
    itself validates megatron's own transformer - MoE dispatchers, layer counts - which VLMo is not.)"""

    hidden_size: int = 0
    """Sizes megatron's default receive buffers; the real shapes travel with the tensors (variable_seq_lengths)."""
    calculate_per_token_loss: bool = False
    """False: each micro-batch's loss is divided by the number of micro-batches (a mean, as on one process)."""
    fine_grained_activation_offloading: bool = False


class _ScheduleModel:
    """The attributes megatron's schedules read from the model they run (the stage is called by run_pass)."""

    model_type = ModelType.encoder_or_decoder

    def __init__(self, config: ModelParallelConfig):
        self.config = config
        self.input_tensor: torch.Tensor | None = None

    def set_input_tensor(self, tensors) -> None:
        self.input_tensor = tensors[0] if isinstance(tensors, list) else tensors


def schedule_config(stage: PipelineStage, dtype: torch.dtype) -> ModelParallelConfig:
    """megatron's config for running `stage` under the current parallel state; activations travel in `dtype`."""
    return _ScheduleConfig(tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
                           pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
                           pipeline_dtype=dtype, variable_seq_lengths=True, deallocate_pipeline_outputs=True,
                           use_cpu_initialization=True, gradient_accumulation_fusion=False,
                           sequence_parallel=False, hidden_size=stage.cfg.dim)


LossFn = Callable[[int, dict], torch.Tensor]
"""loss_fn(micro-batch index, {stream: [B, L, D] after the final norm}) -> scalar loss of that micro-batch (on the last
stage); results other than the loss are kept by the caller's closure."""


def run_pass(stage: PipelineStage, kind: str, inputs: Sequence[PassInputs], loss_fn: LossFn, *,
             forward_only: bool = False) -> None:
    """Forward (and backward unless forward_only) of pass `kind` for every micro-batch, 1F1B across the stages.

    Gradients accumulate into the stage's .grad, each micro-batch's loss divided by the number of micro-batches
    (gradient accumulation: the mean over micro-batches); nothing is reduced over data-parallel ranks here.
    """
    dtype = next(stage.parameters()).dtype
    model = _ScheduleModel(schedule_config(stage, dtype))

    def forward_step(micro: Iterator[int], _model: _ScheduleModel):
        m = next(micro)
        out = stage(stage_pass, kind, inputs[m], model.input_tensor)

        def loss(output: dict):
            # A fresh tensor: the schedule divides it in place by the number of micro-batches.
            return loss_fn(m, output) * 1.0, {}

        return out, loss

    schedule = get_forward_backward_func()
    with torch.no_grad() if forward_only else torch.enable_grad():
        # seq_length / micro_batch_size only size megatron's default buffers; the real shapes are exchanged.
        schedule(forward_step_func=forward_step, data_iterator=iter(range(len(inputs))), model=model,
                 num_microbatches=len(inputs), seq_length=1, micro_batch_size=1, forward_only=forward_only)


def broadcast_from_last_stage(values: torch.Tensor) -> torch.Tensor:
    """`values` of the last pipeline stage on every stage of this rank's pipeline (same shape and dtype on all)."""
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(values, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                       group=parallel_state.get_pipeline_model_parallel_group())
    return values
