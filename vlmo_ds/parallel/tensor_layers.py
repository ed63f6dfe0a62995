"""megatron-core tensor-parallel layers behind the model's `Layers` factory.

`VLMo(cfg, TensorParallelLayers(tp_group))` builds one tensor-parallel shard of the model: qkv, expert fc1 and the MLM
decoder are column-parallel (each rank holds a block of output rows), the attention projection and expert fc2 are
row-parallel (each rank holds a block of input columns; the partial products are summed over the group and the bias,
held whole on every rank, is added once after the sum), the word embedding is vocabulary-parallel. Everything else
(norms, pooler, ITC/ITM heads, modality embeddings) is replicated: after a row-parallel layer or the embedding the
hidden states are whole and equal on every rank, so replicated parameters get equal gradients too.

Each layer here is called input -> output tensor, like the torch layers of `Layers` (megatron's return (out, bias)),
and keeps the state-dict keys `weight` / `bias`, so a shard's keys are the consolidated keys
(vlmo_ds.parallel.tp_convert maps the values).

Initialisation: megatron's CPU path draws the full [out, in] matrix on every rank from torch's RNG and keeps this
rank's slice, with our init (truncated normal 0.02 for the blocks, normal 0.02 for the vocabulary layers). The draw
order differs from the single-process model, so a TP model and a one-process model built from the same seed start
from different (equally distributed) weights. To start a TP run from given weights, build or load the consolidated
weights and load `tp_convert.shard_state_dict(full, rank, size, cfg)` into each shard. Every rank of a TP group
draws the same numbers, so with one seed per replica the replicated parameters start equal on every rank.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist
from megatron.core import ModelParallelConfig, parallel_state
from megatron.core.tensor_parallel import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                           set_tensor_model_parallel_attributes)
from torch import nn

from vlmo_ds.model.layers import Layers, trunc_normal_

_normal_002 = partial(nn.init.normal_, mean=0.0, std=0.02)


def _no_extra_state(module: nn.Module) -> None:
    """Keep megatron's `_extra_state` (always None outside TransformerEngine) out of loading, so that shard keys equal
    the consolidated keys: megatron's own pre-hook adds the key to every incoming state dict; this one drops it."""
    def drop(module, state_dict, prefix, *args) -> None:
        state_dict.pop(prefix + "_extra_state", None)

    module.register_load_state_dict_pre_hook(drop)


class _Column(ColumnParallelLinear):
    """Column-parallel linear returning this rank's output features only: [..., in] -> [..., out / tp]."""

    get_extra_state, set_extra_state = nn.Module.get_extra_state, nn.Module.set_extra_state

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _no_extra_state(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # megatron's backward flattens 3-D activations only: give it 2-D rows and restore the leading shape.
        out, _ = super().forward(x.reshape(-1, x.shape[-1]))
        return out.reshape(*x.shape[:-1], out.shape[-1])


class _Row(RowParallelLinear):
    """Row-parallel linear taking this rank's input features: [..., in / tp] -> [..., out] summed over the group."""

    get_extra_state, set_extra_state = nn.Module.get_extra_state, nn.Module.set_extra_state

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _no_extra_state(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = super().forward(x.reshape(-1, x.shape[-1]))
        return out.reshape(*x.shape[:-1], out.shape[-1])


class TensorParallelLayers(Layers):
    """megatron-core layers over one tensor-parallel group (the model holds no rank logic: it asks this factory).

    tp_group: the tensor-parallel process group; None takes megatron's (parallel_state.initialize_model_parallel).
    params_dtype: dtype of the parallel layers' parameters (the rest of the model follows the usual .to()).
    """

    def __init__(self, tp_group: dist.ProcessGroup | None = None, params_dtype: torch.dtype = torch.float32):
        if tp_group is None:
            if not parallel_state.model_parallel_is_initialized():
                raise ValueError("TensorParallelLayers needs a tensor-parallel group: pass tp_group, or call "
                                 "megatron.core.parallel_state.initialize_model_parallel first")
            tp_group = parallel_state.get_tensor_model_parallel_group()
        self.tp_group = tp_group
        self.tp_size = dist.get_world_size(tp_group)
        self.tp_rank = dist.get_rank(tp_group)
        self.config = ModelParallelConfig(tensor_model_parallel_size=self.tp_size, use_cpu_initialization=True,
                                          gradient_accumulation_fusion=False, sequence_parallel=False,
                                          params_dtype=params_dtype)

    def shard_parameter(self, param: nn.Parameter, dim: int) -> nn.Parameter:
        # megatron's attributes, read by its and DeepSpeed's gradient-norm code to count a shard on every rank.
        set_tensor_model_parallel_attributes(param, is_parallel=True, dim=dim, stride=1)
        return param

    def column(self, in_features: int, out_features: int, bias: bool = True) -> nn.Module:
        self.local(out_features, "column-parallel output features")
        return _Column(in_features, out_features, config=self.config, init_method=trunc_normal_, bias=bias,
                       gather_output=False, tp_group=self.tp_group)

    def row(self, in_features: int, out_features: int, bias: bool = True) -> nn.Module:
        self.local(in_features, "row-parallel input features")
        return _Row(in_features, out_features, config=self.config, init_method=trunc_normal_, bias=bias,
                    input_is_parallel=True, skip_bias_add=False, tp_group=self.tp_group)

    def vocab_embedding(self, num_embeddings: int, dim: int) -> nn.Module:
        self.local(num_embeddings, "vocab_size")
        return VocabParallelEmbedding(num_embeddings, dim, init_method=_normal_002, config=self.config,
                                      tp_group=self.tp_group)

    def vocab_output(self, dim: int, vocab_size: int) -> nn.Module:
        """[..., D] -> [..., V / tp]: logits of this rank's vocabulary rows (the loss is vocabulary-parallel too)."""
        self.local(vocab_size, "vocab_size")
        return _Column(dim, vocab_size, config=self.config, init_method=_normal_002, bias=False,
                       gather_output=False, tp_group=self.tp_group)
