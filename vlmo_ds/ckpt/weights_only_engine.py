"""DeepSpeed's own reads of a resumed checkpoint, weights-only: no code from a checkpoint file runs.

DeepSpeed's TorchCheckpointEngine.load is torch.load(weights_only=False), so a file whose pickle names a callable (a
payload planted in a run folder on a shared file system) runs it on every rank that resumes. In DeepSpeed 0.19 every
file engine.load_checkpoint reads goes through that one method, engine.checkpoint_engine.load:
    mp_rank_XX_model_states.pt                   weights of model-parallel rank XX (tensor x pipeline), ZeRO 0's
                                                 optimizer state; read by its state-dict loader (SDLoader)
    [bf16_]zero_pp_rank_D_mp_rank_XX_optim_states.pt   ZeRO 1-3 optimizer partitions
    zero_pp_rank_D_mp_rank_XX_model_states.pt    ZeRO 3's per-partition model file
    layer_NN-model_states.pt                     a DeepSpeed PipelineModule's layers (PipelineModule.load_state_dir
                                                 is handed the engine's checkpoint_engine; vlmo_ds's pipeline stages
                                                 are plain modules and write mp_rank files)
`weights_only_loads` makes that method weights-only. Chosen over checking every file with our reader before DeepSpeed
opens it: each file is still read once, as DeepSpeed reads it, instead of a second full read of a checkpoint that can
be hundreds of GB; and there is no window between the check and DeepSpeed's own read in which a file can be swapped.
The objects DeepSpeed keeps in its optimizer files (its loss scaler, the ZeRO stage enum, fragment addresses) load as
their real classes, which the resumed optimizer needs: the weights-only unpickler builds them from plain fields and
calls nothing a file names. Anything else is refused with a CheckpointError naming the file.
DeepSpeed reads with plain torch.load only where vlmo_ds never asks it to: a universal checkpoint (refused here) and
ZeRO 3 without optimizer states (vlmo_ds.train.checkpoint.load always loads them). tests/reliability/test_safe_resume.py
plants payloads in every file kind and would see a new DeepSpeed read that bypasses this.
"""
from __future__ import annotations

from typing import Any

from vlmo_ds.ckpt.errors import CheckpointError
from vlmo_ds.ckpt.safe_read import load_torch


def deepspeed_classes() -> list[type]:
    """The DeepSpeed classes its ZeRO optimizer files hold (imported here: vlmo_ds.ckpt reads files without them)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


class WeightsOnlyLoads:
    """An engine's checkpoint engine with a weights-only `load`; saving and everything else is the wrapped one's."""

    def __init__(self, wrapped) -> None:
        self.wrapped = wrapped

    def __getattr__(self, name: str) -> Any:
        return getattr(self.wrapped, name)

    def load(self, path: str, map_location: Any = None) -> Any:
        return load_torch(path, allowed=deepspeed_classes(), map_location=map_location)


def weights_only_loads(engine) -> None:
    """Make every read of engine.load_checkpoint weights-only (idempotent); refuse DeepSpeed's universal checkpoints,
    which its optimizers read with torch.load(weights_only=False) past the checkpoint engine."""
    if engine.load_universal_checkpoint():
        raise CheckpointError("the DeepSpeed config sets checkpoint.load_universal, whose files DeepSpeed reads with "
                              "full unpickling; remove it (vlmo_ds resumes its own checkpoints, `python tools/ckpt.py "
                              "reshard` converts them between layouts)")
    if not isinstance(engine.checkpoint_engine, WeightsOnlyLoads):
        engine.checkpoint_engine = WeightsOnlyLoads(engine.checkpoint_engine)
