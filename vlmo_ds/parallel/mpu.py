"""The model-parallel layout of a vlmo_ds run: its checks, megatron-core's parallel state, and the `mpu` object that
DeepSpeed asks for its process groups.

Ranks are laid out by megatron-core (order tp-dp-pp): tensor-parallel ranks are adjacent, pipeline stages the
slowest axis. One model replica is TP x PP ranks; the data-parallel size is what remains of the world, and all
TP/PP ranks of one replica see the same batch (vlmo_ds splits data by data-parallel rank).

`check_layout` holds the pure rules (vlmo_ds.parallel.layout_rules; config validation calls it without processes);
`init_model_parallel` applies them and builds megatron's groups once torch.distributed is up; `MegatronMPU` is what
`deepspeed.initialize(mpu=...)` reads. DeepSpeed's names and megatron's meanings:
    get_model_parallel_*          the TP x PP ranks of one replica (DeepSpeed's checkpoint file index mp_rank_XX, its
                                  overflow and gradient-norm reductions; megatron's "model parallel group")
    get_tensor_model_parallel_*   the TP ranks of one stage (ZeRO counts a replicated tensor on TP rank 0 only)
    get_pipeline_model_parallel_*, get_pipe_parallel_*   the stages of one replica
    get_data_parallel_*           the replicas (ZeRO partitions and averages over this group)
The object deliberately has no `initialize_sequence_parallel`: DeepSpeed takes an mpu with that method for its own
sequence-parallel groups and then ignores the model-parallel group.
"""
from __future__ import annotations

import logging

import torch.distributed as dist
from torch import nn

from vlmo_ds.model.config import ModelConfig
from vlmo_ds.parallel.layout_rules import check_layout, check_pipeline_device

__all__ = ["MegatronMPU", "check_layout", "check_pipeline_device", "init_model_parallel", "layout_summary"]

logger = logging.getLogger(__name__)


class MegatronMPU:
    """DeepSpeed's mpu interface over megatron-core's parallel state (initialised first: init_model_parallel)."""

    @staticmethod
    def _state():
        from megatron.core import parallel_state  # megatron-core is imported only by model-parallel runs

        if not parallel_state.model_parallel_is_initialized():
            raise ValueError("megatron-core's parallel state is not initialised; call "
                             "vlmo_ds.parallel.mpu.init_model_parallel(tp, pp, ...) before using the mpu")
        return parallel_state

    # TP x PP: one model replica
    def get_model_parallel_group(self) -> dist.ProcessGroup:
        return self._state().get_model_parallel_group()

    def get_model_parallel_rank(self) -> int:
        return dist.get_rank(self.get_model_parallel_group())

    def get_model_parallel_world_size(self) -> int:
        return dist.get_world_size(self.get_model_parallel_group())

    # tensor parallel
    def get_tensor_model_parallel_group(self) -> dist.ProcessGroup:
        return self._state().get_tensor_model_parallel_group()

    def get_tensor_model_parallel_rank(self) -> int:
        return self._state().get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_world_size(self) -> int:
        return self._state().get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_src_rank(self) -> int:
        """Global rank of TP rank 0 of this rank's group (DeepSpeed broadcasts inputs from it)."""
        return self._state().get_tensor_model_parallel_src_rank()

    # pipeline parallel (megatron's names and DeepSpeed's)
    def get_pipeline_model_parallel_group(self) -> dist.ProcessGroup:
        return self._state().get_pipeline_model_parallel_group()

    def get_pipeline_model_parallel_rank(self) -> int:
        return self._state().get_pipeline_model_parallel_rank()

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self._state().get_pipeline_model_parallel_world_size()

    get_pipe_parallel_group = get_pipeline_model_parallel_group
    get_pipe_parallel_rank = get_pipeline_model_parallel_rank
    get_pipe_parallel_world_size = get_pipeline_model_parallel_world_size

    # data parallel
    def get_data_parallel_group(self) -> dist.ProcessGroup:
        return self._state().get_data_parallel_group()

    def get_data_parallel_rank(self) -> int:
        return self._state().get_data_parallel_rank()

    def get_data_parallel_world_size(self) -> int:
        return self._state().get_data_parallel_world_size()

    def get_data_parallel_group_ranks(self) -> list[int]:
        """Global ranks of this rank's data-parallel group (DeepSpeed's checkpoint metadata)."""
        return dist.get_process_group_ranks(self.get_data_parallel_group())


def init_model_parallel(tp: int, pp: int, cfg: ModelConfig, zero_stage: int | None = None) -> MegatronMPU:
    """Check the layout and build megatron-core's TP / PP / DP groups over the running default process group.

    Calling it again with the same sizes keeps the groups; other sizes in the same process are refused (megatron's
    state is process-wide).
    """
    from megatron.core import parallel_state

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("init_model_parallel needs torch.distributed initialised first "
                         "(vlmo_ds.parallel.launch.init_distributed)")
    check_layout(dist.get_world_size(), tp, pp, zero_stage, cfg)
    if parallel_state.model_parallel_is_initialized():
        have = (parallel_state.get_tensor_model_parallel_world_size(),
                parallel_state.get_pipeline_model_parallel_world_size())
        if have != (tp, pp):
            raise ValueError(f"megatron-core's parallel state already holds TP x PP = {have[0]} x {have[1]}; "
                             f"one process runs one layout (asked for {tp} x {pp})")
        return MegatronMPU()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    return MegatronMPU()


def layout_summary(mpu: MegatronMPU, zero_stage: int, module: nn.Module) -> str:
    """One start-up line: TP x PP x DP, the ZeRO stage and this rank's parameter count (before ZeRO partitions it;
    a parameter already partitioned by zero.Init counts whole, by its ds_numel)."""
    params = sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())
    return (f"layout TP {mpu.get_tensor_model_parallel_world_size()} x PP "
            f"{mpu.get_pipeline_model_parallel_world_size()} x DP {mpu.get_data_parallel_world_size()}, "
            f"ZeRO {zero_stage}; this rank (stage {mpu.get_pipeline_model_parallel_rank()}, tensor rank "
            f"{mpu.get_tensor_model_parallel_rank()}) holds {params:,} parameters")
