"""A pipeline stage under a DeepSpeed engine (ZeRO 0 or 1 over the data-parallel group, groups from MegatronMPU).

The stage's forward and backward run in megatron-core's schedule (vlmo_ds.parallel.pipeline_step), not in
engine.backward, so the engine has not reduced anything when the schedule returns: `reduce_stage_gradients` averages
the gradients over the data-parallel group the way DeepSpeed's own PipelineEngine does after its schedule, and
engine.step() follows. One optimizer step per call: the micro-batches of gradient accumulation are the schedule's
(DeepSpeed's gradient_accumulation_steps stays 1).

    engine = deepspeed.initialize(model=stage, optimizer=..., config=ds_config, mpu=MegatronMPU())[0]
    out = image_text_step(stage, micro_batches, weights, seeds)   # the stage itself runs the forward
    reduce_stage_gradients(engine)
    engine.step()
"""
from __future__ import annotations

from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
from deepspeed.runtime.engine import MEMORY_OPT_ALLREDUCE_SIZE


def reduce_stage_gradients(engine) -> None:
    """Average the stage's .grad over the data-parallel group (ZeRO 1: into the optimizer's partitions)."""
    if engine.mpu is None:
        raise ValueError("the DeepSpeed engine of a pipeline stage needs the model-parallel groups: pass "
                         "mpu=vlmo_ds.parallel.mpu.MegatronMPU() to deepspeed.initialize")
    stage = engine.zero_optimization_stage()
    if stage >= 2:
        raise ValueError(f"pipeline stages need ZeRO stage 0 or 1 (DeepSpeed cannot partition gradients across "
                         f"pipeline stages), the engine runs ZeRO {stage}; set parallel.zero_stage=1")
    if stage == 0 and engine.gradient_clipping() > 0 and engine.mpu.get_pipeline_model_parallel_world_size() > 1:
        raise ValueError("pipeline stages with ZeRO stage 0 would clip by a wrong gradient norm (DeepSpeed counts "
                         "only the first stage's replicated tensors); set parallel.zero_stage=1 or optim.grad_clip=0")
    if stage == 1 and not isinstance(engine.optimizer, BF16_Optimizer):
        engine.optimizer.reduce_gradients(pipeline_parallel=True)
    else:
        engine.buffered_allreduce_fallback(grads=None, elements_per_buffer=MEMORY_OPT_ALLREDUCE_SIZE)
