"""Zero-shot / fine-tuned image-text retrieval evaluation of a VLMo dual encoder over WebDataset shards.

``evaluate_retrieval`` indexes the set (vlmo_ds.eval.retrieval_set: captions and byte offsets, no image decoded),
then each data-parallel rank encodes a contiguous slice of the images and of the captions, the features are
all-gathered (vlmo_ds.eval.sharded), and every rank scores the full similarity matrix with
``vlmo_ds.eval.metrics.recall_at_k``, so all ranks return the same metrics. Optionally the best ``rerank_k``
candidates of every query are re-ranked by the fusion encoder's ITM score (vlmo_ds.eval.rerank), the ranks again
sharing the work; both the plain and the re-ranked recalls are returned.

Shapes: I images, T captions, D feature size, S image size, L text length.
"""
from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from vlmo_ds.data.shards import ShardSource
from vlmo_ds.data.tokenizer import Tokenizer
from vlmo_ds.eval.metrics import DEFAULT_KS, recall_at_k
from vlmo_ds.eval.rerank import rerank_retrieval
from vlmo_ds.eval.retrieval_set import (RetrievalImage, RetrievalInputs, RetrievalSet, iter_images,
                                        load_retrieval_set)
from vlmo_ds.eval.sharded import (balanced_calls, batched, evaluating, gather_rows, model_dtype, progress,
                                  rank_slice, slice_sizes, steps_needed)

__all__ = ["RetrievalImage", "RetrievalInputs", "RetrievalSet", "encode_features", "evaluate_retrieval",
           "iter_images", "load_retrieval_set"]


def _image_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    return model.itc_image(model.encode_image(images))[0]


def _text_features(model: nn.Module, text_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
    return model.itc_text(model.encode_text(text_ids, text_mask))[0]


def encode_features(model: nn.Module, inputs: RetrievalInputs, image_rows: range, text_rows: range,
                    steps: tuple[int, int], batch_size: int, bar: tqdm | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """ITC features [i, D] of the images and [t, D] of the captions in the given rows, float32, with exactly
    steps = (image calls, text calls) model calls (padded with dummy batches)."""
    data = inputs.data

    def image_batches() -> Iterator[tuple[torch.Tensor]]:
        for batch in batched(inputs.images(data.images[image_rows.start:image_rows.stop]), batch_size):
            yield (torch.stack(batch),)  # [B, 3, S, S]

    def text_batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in batched(iter(data.captions[text_rows.start:text_rows.stop]), batch_size):
            yield inputs.texts(batch)  # [B, L] each

    dummy_text = inputs.texts([""])
    image = balanced_calls(model, _image_features, image_batches(), steps[0], (inputs.dummy_image(),), bar)
    text = balanced_calls(model, _text_features, text_batches(), steps[1], dummy_text, bar)
    empty = torch.zeros(0, getattr(model, "module", model).cfg.dim, device=inputs.device)  # a rank with no rows
    return (torch.cat(image).float() if image else empty), (torch.cat(text).float() if text else empty)


def evaluate_retrieval(model: nn.Module, shards: ShardSource, tokenizer: Tokenizer, image_size: int, text_len: int,
                       batch_size: int = 64, rank: int = 0, world_size: int = 1,
                       group: dist.ProcessGroup | None = None, device: str | torch.device = "cpu",
                       ks: Sequence[int] = DEFAULT_KS, rerank_k: int = 0) -> dict[str, float]:
    """Image-text retrieval of ``model``'s ITC features over ``shards``.

    ``model`` is a VLMo (or a wrapper whose forward(fn, *args) calls fn(model, *args), such as a DeepSpeed engine);
    it runs in eval mode under no_grad, and its train/eval mode is restored afterwards. ``rank``/``world_size``/
    ``group`` are the DATA-parallel rank, size and group: tensor-parallel peers encode the same slice. Returns
    recall_at_k's metrics (tr@K, ir@K, r_mean, chance_*) plus num_images, num_texts, skipped_samples and seconds
    (wall time of the whole evaluation), the same on every rank. ``rerank_k`` > 0 also re-ranks each query's
    ``rerank_k`` best candidates by the fusion encoder's ITM score (vlmo_ds.eval.rerank) and adds rerank_tr@K,
    rerank_ir@K, rerank_r_mean and rerank_k.
    """
    if world_size > 1 and not dist.is_initialized():
        raise ValueError(f"world_size={world_size} needs torch.distributed initialised (or pass world_size=1)")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if rerank_k < 0:
        raise ValueError(f"rerank_k={rerank_k} must be >= 0 (0: no re-ranking)")
    start = time.perf_counter()
    data = load_retrieval_set(shards)
    num_images, num_texts = len(data.images), len(data.captions)
    inputs = RetrievalInputs(data, tokenizer, image_size, text_len, torch.device(device), model_dtype(model))
    image_part, text_part = rank_slice(num_images, rank, world_size), rank_slice(num_texts, rank, world_size)
    steps = (steps_needed(num_images, world_size, batch_size), steps_needed(num_texts, world_size, batch_size))
    bar = progress(len(image_part) + len(text_part), "retrieval eval", rank)
    try:
        with evaluating(model):
            image_feats, text_feats = encode_features(model, inputs, image_part, text_part, steps, batch_size, bar)
    finally:
        bar.close()
    image_feats = gather_rows(image_feats, slice_sizes(num_images, world_size), group)  # [I, D]
    text_feats = gather_rows(text_feats, slice_sizes(num_texts, world_size), group)  # [T, D]
    sim = image_feats @ text_feats.t()  # [I, T]
    metrics = recall_at_k(sim, data.text_to_image, ks)
    if rerank_k:
        with evaluating(model):
            metrics.update(rerank_retrieval(model, inputs, sim, rerank_k, batch_size, rank, world_size, group, ks))
    metrics.update(num_images=num_images, num_texts=num_texts, skipped_samples=sum(data.skipped.values()),
                   seconds=time.perf_counter() - start)
    return metrics
