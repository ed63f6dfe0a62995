"""The layouts a recipe can run on N GPUs, each estimated, best first.

A layout is TP x PP x DP (the trainer's layout rules: vlmo_ds.parallel.layout_rules), a ZeRO stage, activation
checkpointing on or off and a micro batch that divides the recipe's global batch over DP ranks (the rest is
gradient accumulation). TP stays inside a node. Best first: the fitting layouts by samples/s, then the others by how
little they are over.
"""
from __future__ import annotations

from vlmo_ds.model.config import ModelConfig
from vlmo_ds.parallel.layout_rules import LayoutError, check_layout
from vlmo_ds.plan.estimate import Estimate, Layout, estimate
from vlmo_ds.plan.gpus import Machine

MICRO_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def candidate_layouts(cfg: ModelConfig, gpus: int, global_batch: int, machine: Machine,
                      grad_clip: float = 1.0) -> list[Layout]:
    out = []
    for tp in (1, 2, 4, 8):
        for pp in (1, 2, 4, 8, 16):
            if tp > machine.gpus_per_node or gpus % (tp * pp):
                continue
            for zero in (0, 1, 2, 3):
                try:
                    dp = check_layout(gpus, tp, pp, zero, cfg, grad_clip=grad_clip)
                except LayoutError:
                    continue
                for micro in MICRO_BATCHES:
                    if global_batch % (micro * dp):
                        continue
                    for checkpointing in (False, True):
                        out.append(Layout(tp, pp, dp, zero, checkpointing, micro, global_batch // (micro * dp)))
    return out


def ranked(estimates: list[Estimate]) -> list[Estimate]:
    fitting = sorted((e for e in estimates if e.fits), key=lambda e: -e.samples_per_second)
    over = sorted((e for e in estimates if not e.fits), key=lambda e: e.over_by)
    return fitting + over


def plan_model(cfg: ModelConfig, gpus: int, global_batch: int, machine: Machine, precision: str = "bf16",
               grad_clip: float = 1.0) -> list[Estimate]:
    """Every candidate layout of `cfg` on `gpus` GPUs of kind `machine`, estimated, best first."""
    return ranked([estimate(cfg, lay, machine, precision)
                   for lay in candidate_layouts(cfg, gpus, global_batch, machine, grad_clip)])


def single_process_estimate(cfg: ModelConfig, machine: Machine, precision: str, checkpointing: bool,
                            batch: int | None) -> Estimate:
    """One process, no data parallelism (the step tools/gpu_check.sh and the tests measure); batch None: the
    largest power of two that fits."""
    if batch is not None:
        return estimate(cfg, Layout(1, 1, 1, 0, checkpointing, batch), machine, precision)
    best = None
    for micro in MICRO_BATCHES:
        guess = estimate(cfg, Layout(1, 1, 1, 0, checkpointing, micro), machine, precision)
        if not guess.fits:
            break
        best = guess
    if best is None:
        raise ValueError(f"{machine.name}: not even micro batch 1 fits one process")
    return best
