"""The start-up check of vlmo_ds.config and the trainer: one line when the run's layout is predicted not to fit the
GPU it runs on (nothing on CPUs or GPUs the table does not know)."""
from __future__ import annotations

from vlmo_ds.config.plan import stage_plan
from vlmo_ds.config.schema import RunConfig
from vlmo_ds.plan.estimate import Layout, estimate
from vlmo_ds.plan.gpus import GPUS, gpu_kind
from vlmo_ds.plan.recipe import recipe_step


def detected_gpu() -> str | None:
    import torch

    return gpu_kind(torch.cuda.get_device_name()) if torch.cuda.is_available() else None


def fit_warning(cfg: RunConfig, world_size: int, gpu: str | None = None) -> str | None:
    """The warning line for the image-text stage of `cfg` on `world_size` GPUs of kind `gpu` (default: this
    machine's), or None when it is predicted to fit, there is no known GPU or no image-text stage."""
    gpu = gpu or detected_gpu()
    index = next((i for i, s in enumerate(cfg.stages) if s.kind == "image_text"), None)
    if gpu is None or index is None:
        return None
    par = cfg.parallel
    dp = world_size // (par.tensor * par.pipeline)
    batches = stage_plan(cfg, index, dp)
    lay = Layout(par.tensor, par.pipeline, dp, par.zero_stage, par.activation_checkpointing, batches.micro_batch,
                 batches.accumulation)
    e = estimate(recipe_step(cfg).model, lay, GPUS[gpu], cfg.precision)
    if e.fits:
        return None
    return (f"warning: the capacity planner predicts {e.memory.total / 2**30:.1f} GiB per rank for {lay.describe()} "
            f"on {gpu} ({e.capacity / 2**30:.1f} GiB), over by {e.over_by / 2**30:.1f} GiB; "
            f"`python -m vlmo_ds.plan RECIPE --gpus {world_size} --gpu {gpu}` lists layouts that fit")
