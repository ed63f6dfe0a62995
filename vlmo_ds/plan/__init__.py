"""Capacity planning: which layouts of a recipe fit which GPUs, with memory per rank and a step-time estimate.

    from vlmo_ds.plan import plan
    for e in plan("large", gpus=64, gpu="h100-80gb")[:5]:
        print(e.layout.describe(), e.memory.total, e.step_seconds, e.mfu)

`python -m vlmo_ds.plan --help` prints the same as a table. The models are in memory.py (bytes per rank),
timing.py and estimate.py (step time, MFU, collective bytes); measure.py's MemoryMeter is what the tests check the
memory model against.
"""
from __future__ import annotations

from vlmo_ds.plan.estimate import Estimate, Layout, estimate
from vlmo_ds.plan.gpus import GPUS
from vlmo_ds.plan.layouts import plan_model
from vlmo_ds.plan.recipe import RecipeStep, recipe_step

__all__ = ["Estimate", "Layout", "estimate", "plan", "recipe_step", "GPUS"]


def plan(recipe, gpus: int, gpu: str = "h100-80gb", overrides=()) -> list[Estimate]:
    """Every layout of the recipe's image-text stage on `gpus` GPUs of kind `gpu` (GPUS), estimated, best first
    (fitting layouts by samples/s, then the others by how much they are over). recipe: a shipped name, a YAML
    path, or a loaded RunConfig."""
    if gpu not in GPUS:
        raise ValueError(f"unknown GPU kind {gpu!r}; known: {', '.join(GPUS)}")
    step = recipe_step(recipe, overrides)
    return plan_model(step.model, gpus, step.global_batch, GPUS[gpu], step.precision, step.grad_clip)
