"""Write exact weights and AdamW state into a DeepSpeed engine that was just built (any ZeRO stage, fp32 or bf16),
so that engine.save_checkpoint writes DeepSpeed's own files for them.

The module is loaded with the float32 weights before deepspeed.initialize (so its low-precision copies and every
ZeRO partition start right); this module then overwrites what initialize derived from them:
    the float32 masters   (bf16 runs keep them apart from the module and initialise them from the rounded values)
    exp_avg, exp_avg_sq, step   (AdamW creates its state lazily; it is created here on every flat partition)
Where each parameter's slice lives (DeepSpeed 0.19, as its safe_get/set_full_* helpers read it):
    ZeRO 0      fp32: the module's parameters are the torch AdamW's; bf16: DeepSpeed's unfused optimizer pairs
                fp16_groups (module) with fp32_groups (masters, stepped by the torch AdamW)
    ZeRO 1, 2   optimizer.single_partition_of_fp32_groups[i] holds this rank's slice of flat group i; a parameter's
                _hp_mapping gives its piece there (hp_fragment_address) and in itself (lp_fragment_address)
    ZeRO 3      optimizer.fp32_partitioned_groups_flat[i] per sub-group; grad_position gives a parameter's
                sub-group, offset and padded partition size (its slice on partition rank r starts at r * size)
Every rank calls `load_into_engine` with the whole tensors of its own model-parallel shard.
"""
from __future__ import annotations

import torch

ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def _adam_state(like: torch.Tensor, step: float) -> dict[str, torch.Tensor]:
    return {"step": torch.tensor(float(step), dtype=torch.float32), "exp_avg": torch.zeros_like(like),
            "exp_avg_sq": torch.zeros_like(like)}


def load_into_engine(engine, weights: dict[str, torch.Tensor], moments: dict[str, dict[str, torch.Tensor]],
                     step: float | None) -> None:
    """weights: every parameter of this rank's shard (float32, whole); moments: {"exp_avg": {name: tensor},
    "exp_avg_sq": {...}} for the trainable ones, empty (with step None) to keep a fresh optimizer."""
    stage = engine.zero_optimization_stage()
    fill = {0: _zero0, 1: _zero12, 2: _zero12, 3: _zero3}[stage]
    with torch.no_grad():
        fill(engine, weights, moments if step is not None else {}, step)


def _named(engine) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]


def _zero0(engine, weights, moments, step) -> None:
    optimizer = engine.optimizer
    if hasattr(optimizer, "fp32_groups") and hasattr(optimizer, "fp16_groups"):  # bf16: masters apart
        names = {id(p): n for n, p in engine.module.named_parameters()}
        pairs = [(names[id(low)], low, high) for lows, highs in zip(optimizer.fp16_groups, optimizer.fp32_groups)
                 for low, high in zip(lows, highs)]
        adam = optimizer.optimizer
    else:
        pairs = [(n, p, p) for n, p in _named(engine)]
        adam = optimizer
    for name, low, high in pairs:
        high.copy_(weights[name])
        low.copy_(weights[name].to(low.dtype))
        if moments:
            adam.state[high] = _adam_state(high, step)
            for key in ADAM_KEYS:
                adam.state[high][key].copy_(moments[key][name])


def _zero12(engine, weights, moments, step) -> None:
    optimizer = engine.optimizer
    names = {id(p): n for n, p in engine.module.named_parameters()}
    # DeepSpeed's ZeRO 1-2 optimizer, or its BF16_Optimizer (bf16 ZeRO 1 with fp32 gradient accumulation)
    flats = getattr(optimizer, "single_partition_of_fp32_groups", None) or optimizer.fp32_groups_flat_partition
    lows = getattr(optimizer, "bit16_groups", None) or optimizer.bf16_groups
    for i, flat in enumerate(flats):
        state = {"fp32": flat}
        if moments:
            optimizer.optimizer.state[flat] = _adam_state(flat, step)
            state.update({key: optimizer.optimizer.state[flat][key] for key in ADAM_KEYS})
        for param in lows[i]:
            name = names[id(param)]
            param.copy_(weights[name].to(param.dtype))
            mapping = param._hp_mapping
            if mapping is None:  # no piece of this parameter in this rank's slice
                continue
            hp, lp = mapping.hp_fragment_address, mapping.lp_fragment_address
            sources = {"fp32": weights[name]} | {key: moments[key][name] for key in ADAM_KEYS if moments}
            for key, target in state.items():
                target.narrow(0, hp.start, hp.numel).copy_(sources[key].flatten().narrow(0, lp.start, lp.numel))
    if moments:  # DeepSpeed links its helpers' views of the state on the first step, one group short: redo it
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()


def _zero3(engine, weights, moments, step) -> None:
    optimizer = engine.optimizer
    flats = optimizer.fp32_partitioned_groups_flat
    states = [{"fp32": flat} for flat in flats]
    if moments:
        for flat, state in zip(flats, states):
            optimizer.optimizer.state[flat] = _adam_state(flat, step)
            state.update({key: optimizer.optimizer.state[flat][key] for key in ADAM_KEYS})
    for name, param in _named(engine):
        # This rank holds values [rank * part, (rank + 1) * part) of the flattened parameter at `offset` in flat
        # sub-group i, zero-padded past its end (DeepSpeed's safe_set_full_* overrun on a rank with padding only).
        i, offset, part = optimizer.grad_position[optimizer.get_param_id(param)]
        start = optimizer._get_param_partition_rank(param) * part
        real = max(0, min(part, param.ds_numel - start))
        sources = {"fp32": weights[name]} | {key: moments[key][name] for key in ADAM_KEYS if moments}
        for key, target in states[i].items():
            piece = target.narrow(0, offset, part)
            piece.zero_()
            piece[:real].copy_(sources[key].flatten().narrow(0, start, real))
