"""What each kind of stage needs: its loader (data, transforms, masking) and its loss function.

    image_text  image-text pairs: ITC (both paths) + ITM with hard negatives + MLM, fused passes batched
    text_mlm    text-only documents: masked language modelling through the text experts
    image_mim   images alone: masked image modelling through the image experts (pixel or visual-token targets)
    retrieval, vqa, nlvr2  the fine-tuning tasks (vlmo_ds.tasks.kinds); a retrieval stage with an ITM weight
                trains ITC + ITM with hard negatives (no MLM), the published one ITC alone
A pre-training stage with several data sources mixes them by weight (vlmo_ds.train.mixing).
"""
from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Callable

from vlmo_ds.config import TASK_KINDS
from vlmo_ds.data.hooks import PatchMasking, TextMasking
from vlmo_ds.data.loader import StreamLoader
from vlmo_ds.data.pipelines import image_loader, image_text_loader, text_loader
from vlmo_ds.data.tokenizer import Tokenizer
from vlmo_ds.data.transforms import build_image_transform
from vlmo_ds.model.config import ModelConfig
from vlmo_ds.model.flops import image_text_step_flops, patch_embed_flops, unimodal_flops
from vlmo_ds.objectives.pretrain import LossWeights, image_mim_losses, image_text_losses, text_mlm_losses
from vlmo_ds.tasks.kinds import build_task_loader, task_loss_function, task_samples_and_tokens, task_step_flops
from vlmo_ds.train.mixing import MixedLoader, chunks_per_batch, source_seed, worker_shares

LossFn = Callable[..., dict]
Loader = StreamLoader | MixedLoader


def build_loader(stage, model_cfg: ModelConfig, tokenizer: Tokenizer, *, micro_batch: int, dp_rank: int,
                 dp_size: int, num_workers: int, open_shards: int, seed: int,
                 answers: Sequence[str] | None = None, pin_memory: bool = False) -> Loader:
    """The stage's training batches: one StreamLoader for one source, a MixedLoader over several (by weight);
    answers: a vqa stage's answer table; pin_memory: batches in page-locked memory (for CUDA copies)."""
    sources = stage.data
    if stage.kind in TASK_KINDS:
        return build_task_loader(stage.kind, sources[0].shards, tokenizer, _train_transform(stage, model_cfg),
                                 micro_batch=micro_batch, text_len=model_cfg.max_text_len, dp_rank=dp_rank,
                                 dp_size=dp_size, num_workers=num_workers, open_shards=open_shards, seed=seed,
                                 answers=answers, pin_memory=pin_memory)
    if len(sources) == 1:
        return _source_loader(stage, model_cfg, tokenizer, sources[0].shards, batch_size=micro_batch,
                              dp_rank=dp_rank, dp_size=dp_size, num_workers=num_workers, open_shards=open_shards,
                              seed=seed, pin_memory=pin_memory)
    weights = [source.weight for source in sources]
    chunks = chunks_per_batch(micro_batch)
    loaders = [_source_loader(stage, model_cfg, tokenizer, source.shards, batch_size=micro_batch // chunks,
                              dp_rank=dp_rank, dp_size=dp_size, num_workers=workers, open_shards=open_shards,
                              seed=source_seed(seed, j), pin_memory=pin_memory)
               for j, (source, workers) in enumerate(zip(sources, worker_shares(num_workers, weights)))]
    return MixedLoader(loaders, weights, chunks=chunks, seed=seed, dp_rank=dp_rank)


def _source_loader(stage, model_cfg: ModelConfig, tokenizer: Tokenizer, source: str, *, batch_size: int,
                   **common) -> StreamLoader:
    common["batches_per_epoch"] = None
    if stage.kind == "image_text":
        transform = _train_transform(stage, model_cfg)
        hook = TextMasking.for_tokenizer(tokenizer, stage.mlm_prob, stage.whole_word)
        return image_text_loader(source, tokenizer, transform, batch_size=batch_size,
                                 text_len=model_cfg.max_text_len, batch_hook=hook, **common)
    if stage.kind == "text_mlm":
        hook = TextMasking.for_tokenizer(tokenizer, stage.mlm_prob, stage.whole_word)
        return text_loader(source, tokenizer, batch_size=batch_size, text_len=model_cfg.max_text_len,
                           batch_hook=hook, **common)
    vtok_len = model_cfg.num_patches if model_cfg.mim_targets == "tokens" else None  # ids read from KEY.vtok.npy
    return image_loader(source, _train_transform(stage, model_cfg), batch_size=batch_size, vtok_len=vtok_len,
                        batch_hook=PatchMasking(model_cfg.window, stage.mim_ratio), **common)


def _train_transform(stage, model_cfg: ModelConfig):
    return build_image_transform(model_cfg.image_size, train=True, randaug=stage.randaug, hflip=stage.hflip,
                                 crop_scale=stage.crop_scale)


def loss_function(stage, itc_local_rows: bool, tp_group=None) -> LossFn:
    """fn(model, batch, seed, group) -> {"loss": ..., per-objective values}; group is the data-parallel group,
    tp_group the tensor-parallel group of a model with vocabulary-parallel MLM logits (None: whole logits)."""
    if stage.kind == "image_text":
        weights = LossWeights(**stage.loss_weights)
        return partial(_image_text, weights=weights, itc_local_rows=itc_local_rows, tp_group=tp_group)
    if stage.kind == "text_mlm":
        return partial(_text_mlm, tp_group=tp_group)
    if stage.kind == "retrieval" and stage.loss_weights["itm"]:
        weights = LossWeights(mlm=0.0, **stage.loss_weights)
        return partial(_image_text, weights=weights, itc_local_rows=itc_local_rows, tp_group=tp_group)
    if stage.kind in TASK_KINDS:
        return task_loss_function(stage.kind, itc_local_rows)
    return _image_mim


def _image_text(model, batch, seed, group, *, weights, itc_local_rows, tp_group):
    return image_text_losses(model, batch, weights, seed, group, itc_local_rows, tp_group)


def _text_mlm(model, batch, seed, group, *, tp_group):
    return text_mlm_losses(model, batch, tp_group)


def _image_mim(model, batch, seed, group):
    return image_mim_losses(model, batch)


def samples_and_tokens(stage, model_cfg: ModelConfig, batch: int) -> tuple[int, int]:
    """Samples and input tokens of one micro-batch (for throughput)."""
    if stage.kind in TASK_KINDS:
        return task_samples_and_tokens(stage.kind, model_cfg, batch)
    if stage.kind == "image_text":
        return batch, batch * (model_cfg.max_text_len + model_cfg.image_len)
    if stage.kind == "text_mlm":
        return batch, batch * model_cfg.max_text_len
    return batch, batch * model_cfg.image_len


def step_flops(stage, model_cfg: ModelConfig, batch: int) -> int:
    """Analytic FLOPs of one optimizer step over `batch` samples (forward + backward = 3x forward; the backward of a
    stage with frozen parameters skips their weight gradients, so its count is an upper bound)."""
    if stage.kind == "retrieval" and stage.loss_weights["itm"]:
        return image_text_step_flops(model_cfg, batch, mlm=False, itm=True)
    if stage.kind in TASK_KINDS:
        return task_step_flops(stage.kind, model_cfg, batch)
    if stage.kind == "image_text":
        weights = LossWeights(**stage.loss_weights)
        return image_text_step_flops(model_cfg, batch, mlm=bool(weights.mlm), itm=bool(weights.itm))
    d = model_cfg.dim  # the MLM and MIM heads score every position (losses mask the unlabelled ones)
    if stage.kind == "text_mlm":
        head = batch * model_cfg.max_text_len * 2 * (d * d + d * model_cfg.vocab_size)
        return 3 * (batch * unimodal_flops(model_cfg, model_cfg.max_text_len, False) + head)
    out = model_cfg.mim_vocab_size if model_cfg.mim_targets == "tokens" else model_cfg.patch_size ** 2 * 3
    head = batch * model_cfg.num_patches * 2 * d * out
    return 3 * (batch * unimodal_flops(model_cfg, model_cfg.image_len, False) + head) \
        + 2 * batch * patch_embed_flops(model_cfg)
