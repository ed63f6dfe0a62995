"""What each kind of stage needs: its loader (data, transforms, masking) and its loss function.

    image_text  image-text pairs: ITC (both paths) + ITM with hard negatives + MLM, fused passes batched
    text_mlm    text-only documents: masked language modelling through the text experts
    image_mim   images alone: masked image modelling through the image experts
"""
from __future__ import annotations

from functools import partial
from typing import Callable

from vlmo_ds.data.hooks import PatchMasking, TextMasking
from vlmo_ds.data.loader import StreamLoader
from vlmo_ds.data.pipelines import image_loader, image_text_loader, text_loader
from vlmo_ds.data.tokenizer import Tokenizer
from vlmo_ds.data.transforms import build_image_transform
from vlmo_ds.model.config import ModelConfig
from vlmo_ds.objectives.pretrain import LossWeights, image_mim_losses, image_text_losses, text_mlm_losses

LossFn = Callable[..., dict]


def shard_source(stage) -> str:
    """A stage's data: one shard source (a folder or a brace pattern)."""
    if len(stage.data) > 1:
        raise ValueError(f"stage {stage.name!r} lists {len(stage.data)} data sources; this version reads one per "
                         "stage (mixing several by weight comes with the stage scheduler)")
    return stage.data[0].shards


def build_loader(stage, model_cfg: ModelConfig, tokenizer: Tokenizer, *, micro_batch: int, dp_rank: int,
                 dp_size: int, num_workers: int, open_shards: int, seed: int) -> StreamLoader:
    common = dict(dp_rank=dp_rank, dp_size=dp_size, num_workers=num_workers, open_shards=open_shards, seed=seed,
                  batches_per_epoch=None)
    source = shard_source(stage)
    if stage.kind == "image_text":
        transform = _train_transform(stage, model_cfg)
        hook = TextMasking.for_tokenizer(tokenizer, stage.mlm_prob, stage.whole_word)
        return image_text_loader(source, tokenizer, transform, batch_size=micro_batch,
                                 text_len=model_cfg.max_text_len, batch_hook=hook, **common)
    if stage.kind == "text_mlm":
        hook = TextMasking.for_tokenizer(tokenizer, stage.mlm_prob, stage.whole_word)
        return text_loader(source, tokenizer, batch_size=micro_batch, text_len=model_cfg.max_text_len,
                           batch_hook=hook, **common)
    return image_loader(source, _train_transform(stage, model_cfg), batch_size=micro_batch,
                        batch_hook=PatchMasking(model_cfg.window, stage.mim_ratio), **common)


def _train_transform(stage, model_cfg: ModelConfig):
    return build_image_transform(model_cfg.image_size, train=True, randaug=stage.randaug, hflip=stage.hflip,
                                 crop_scale=stage.crop_scale)


def loss_function(stage, itc_local_rows: bool) -> LossFn:
    """fn(model, batch, seed, group) -> {"loss": ..., per-objective values}."""
    if stage.kind == "image_text":
        weights = LossWeights(**stage.loss_weights)
        return partial(_image_text, weights=weights, itc_local_rows=itc_local_rows)
    if stage.kind == "text_mlm":
        return _text_mlm
    return _image_mim


def _image_text(model, batch, seed, group, *, weights, itc_local_rows):
    return image_text_losses(model, batch, weights, seed, group, itc_local_rows)


def _text_mlm(model, batch, seed, group):
    return text_mlm_losses(model, batch)


def _image_mim(model, batch, seed, group):
    return image_mim_losses(model, batch)


def samples_and_tokens(stage, model_cfg: ModelConfig, batch: int) -> tuple[int, int]:
    """Samples and input tokens of one micro-batch (for throughput)."""
    if stage.kind == "image_text":
        return batch, batch * (model_cfg.max_text_len + model_cfg.image_len)
    if stage.kind == "text_mlm":
        return batch, batch * model_cfg.max_text_len
    return batch, batch * model_cfg.image_len
