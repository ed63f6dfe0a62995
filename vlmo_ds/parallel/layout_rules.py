"""The rules a parallel layout of VLMo must satisfy, as pure functions of sizes and the model config.

They import nothing heavy (no torch), so recipe validation (`python -m vlmo_ds.config`, run on a login node before a
job is queued) applies exactly the rules the trainer applies at start-up. Each raises a LayoutError (a ValueError)
whose one-line message names the setting to change; entry points print it and exit. vlmo_ds.parallel.mpu and
vlmo_ds.parallel.tp_convert re-export them.
"""
from __future__ import annotations

from vlmo_ds.model.config import ModelConfig


class LayoutError(ValueError):
    """A parallel layout that cannot run (or a checkpoint saved in another layout); the message is one line that
    names the setting to change."""


def check_tensor_parallel(cfg: ModelConfig, tp_size: int) -> None:
    """Raise a one-line LayoutError if the model cannot be split over `tp_size` ranks.

    The FFN width (mlp_ratio * dim, dim = heads * head_dim) divides whenever the heads do, so heads and vocabulary
    are the two checks.
    """
    if tp_size < 1:
        raise LayoutError(f"tensor-parallel size {tp_size} must be at least 1")
    if cfg.heads % tp_size:
        raise LayoutError(f"model.heads={cfg.heads} is not divisible by the tensor-parallel size {tp_size}; "
                          f"choose a tensor-parallel size that divides the number of attention heads")
    if cfg.vocab_size % tp_size:
        padded = -(-cfg.vocab_size // tp_size) * tp_size
        raise LayoutError(f"model.vocab_size={cfg.vocab_size} is not divisible by the tensor-parallel size "
                          f"{tp_size}; pad the vocabulary to model.vocab_size={padded} or change the tensor-parallel "
                          "size")


def check_layout(world_size: int, tp: int, pp: int, zero_stage: int | None, cfg: ModelConfig, *,
                 grad_clip: float = 0.0) -> int:
    """The data-parallel size of `world_size` ranks split into TP x PP replicas; a one-line LayoutError naming the
    setting to change when the layout cannot run. zero_stage None skips the ZeRO rules (stage not known yet).

    grad_clip: the clipping norm (0: off). DeepSpeed's ZeRO-0 clipping, given an mpu, counts a tensor that is not
    tensor-parallel only on model-parallel rank 0, i.e. only on the first pipeline stage: a wrong norm under PP
    (ZeRO 1 counts it on tensor rank 0 of every stage, which is right)."""
    for key, value in (("parallel.tensor", tp), ("parallel.pipeline", pp)):
        if value < 1:
            raise LayoutError(f"{key}={value} must be at least 1")
    if world_size < 1 or world_size % (tp * pp):
        raise LayoutError(f"parallel: {world_size} ranks are not divisible by parallel.tensor x parallel.pipeline "
                          f"= {tp} x {pp} = {tp * pp}; change the layout or the number of ranks")
    check_tensor_parallel(cfg, tp)
    if pp > cfg.depth:
        raise LayoutError(f"parallel.pipeline={pp} exceeds model.depth={cfg.depth} (every stage needs at least one "
                          f"block); set parallel.pipeline to at most {cfg.depth}")
    if zero_stage is not None:
        if zero_stage not in (0, 1, 2, 3):
            raise LayoutError(f"parallel.zero_stage={zero_stage} must be 0, 1, 2 or 3")
        if pp > 1 and zero_stage >= 2:
            raise LayoutError(f"parallel.pipeline={pp} needs ZeRO stage 0 or 1 (DeepSpeed cannot partition gradients "
                              f"across pipeline stages); set parallel.zero_stage=1")
        if pp > 1 and zero_stage == 0 and grad_clip > 0:
            raise LayoutError(f"parallel.pipeline={pp} with ZeRO stage 0 clips by a wrong gradient norm (DeepSpeed "
                              f"counts only the first stage's replicated tensors); set parallel.zero_stage=1 or "
                              f"optim.grad_clip=0")
    return world_size // (tp * pp)


def check_pipeline_device(pp: int, cuda_available: bool) -> None:
    """Pipeline stages run megatron-core's schedules, which allocate their buffers on CUDA devices: refuse PP > 1
    on a machine without them (the caller passes torch.cuda.is_available())."""
    if pp > 1 and not cuda_available:
        raise LayoutError(f"parallel.pipeline={pp} needs CUDA devices (megatron-core's pipeline schedules allocate "
                          f"their buffers on the GPU); on CPU set parallel.pipeline=1")
