"""The fine-tuning tasks as stage kinds: for each of retrieval, vqa and nlvr2 a loader, a loss function with the
stage loss signature, and the evaluation a stage runs at its end.

    loader      build_task_loader(task, shards, tokenizer, transform, ...) -> StreamLoader of the task's batches
                (vlmo_ds.data.task_batches), endless, resumable like the pre-training loaders
    loss        task_loss_function(task, itc_local_rows) -> fn(model, batch, seed, group) -> {"loss", ...}: the
                signature of vlmo_ds.train.stages.loss_function (seed and group as there); task_samples_and_tokens
                and task_step_flops for the throughput meter
    evaluation  evaluate_task(task, model, data, ...) -> flat metrics: retrieval recalls (plain and ITM re-ranked),
                the VQA score with baselines, NLVR2 accuracy with the majority baseline; every rank gets the same
                values, the work split across the data-parallel ranks
The model of a task stage comes from vlmo_ds.tasks.start (type rows, image size, head); its head learning rate from
vlmo_ds.tasks.optim; a VQA stage's answer table from vlmo_ds.tasks.answers.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from vlmo_ds.data.loader import StreamLoader
from vlmo_ds.data.pipelines import ImageTransform
from vlmo_ds.data.shards import ShardSource
from vlmo_ds.data.task_batches import nlvr2_loader, retrieval_loader, vqa_loader
from vlmo_ds.data.tokenizer import Tokenizer
from vlmo_ds.eval.nlvr2_eval import evaluate_nlvr2
from vlmo_ds.eval.retrieval import evaluate_retrieval
from vlmo_ds.eval.vqa_eval import evaluate_vqa
from vlmo_ds.model.config import ModelConfig
from vlmo_ds.model.flops import block_flops, patch_embed_flops, unimodal_flops
from vlmo_ds.tasks.nlvr2 import nlvr2_losses
from vlmo_ds.tasks.retrieval import retrieval_losses
from vlmo_ds.tasks.start import TASKS, check_task
from vlmo_ds.tasks.vqa import vqa_losses

LossFn = Callable[..., dict]


def build_task_loader(task: str, shards: ShardSource, tokenizer: Tokenizer, image_transform: ImageTransform, *,
                      micro_batch: int, text_len: int, dp_rank: int, dp_size: int, num_workers: int,
                      open_shards: int, seed: int, answers: Sequence[str] | None = None,
                      pin_memory: bool = False) -> StreamLoader:
    """The task's training batches for one data-parallel rank (answers: the VQA answer table)."""
    check_task(task)
    options = dict(batch_size=micro_batch, text_len=text_len, dp_rank=dp_rank, dp_size=dp_size,
                   num_workers=num_workers, open_shards=open_shards, seed=seed, batches_per_epoch=None,
                   pin_memory=pin_memory)
    if task == "vqa":
        if answers is None:
            raise ValueError("a VQA loader needs the answer table (vlmo_ds.tasks.answers.load_answer_vocab)")
        return vqa_loader(shards, tokenizer, image_transform, answers, **options)
    if task == "nlvr2":
        return nlvr2_loader(shards, tokenizer, image_transform, **options)
    return retrieval_loader(shards, tokenizer, image_transform, **options)


def task_loss_function(task: str, itc_local_rows: bool = False) -> LossFn:
    """fn(model, batch, seed, group) -> {"loss": ..., per-task values}; group is the data-parallel group."""
    check_task(task)
    if task == "vqa":
        return vqa_losses
    if task == "nlvr2":
        return nlvr2_losses
    return partial(retrieval_losses, local_rows=itc_local_rows)


def task_samples_and_tokens(task: str, cfg: ModelConfig, batch: int) -> tuple[int, int]:
    """Samples and input tokens of `batch` examples (for throughput): NLVR2 runs two fused sequences each."""
    check_task(task)
    fused = cfg.max_text_len + cfg.image_len
    return batch, batch * (2 * fused if task == "nlvr2" else fused)


def task_step_flops(task: str, cfg: ModelConfig, batch: int) -> int:
    """Analytic FLOPs of one optimizer step over `batch` examples (forward + backward = 3x forward; the patch
    embedding's backward 1x, no pixel gradients); the heads are left out (under 0.1% of a base step)."""
    check_task(task)
    if task == "retrieval":
        forward = batch * (unimodal_flops(cfg, cfg.image_len, False) + unimodal_flops(cfg, cfg.max_text_len, False))
        return 3 * forward + 2 * batch * patch_embed_flops(cfg)
    passes = batch * (2 if task == "nlvr2" else 1)
    return 3 * passes * cfg.depth * block_flops(cfg, cfg.max_text_len + cfg.image_len) \
        + 2 * passes * patch_embed_flops(cfg)


def evaluate_task(task: str, model: nn.Module, data: ShardSource, tokenizer: Tokenizer, cfg: ModelConfig, *,
                  batch_size: int = 64, rank: int = 0, world_size: int = 1, group: dist.ProcessGroup | None = None,
                  device: str | torch.device = "cpu", answers: Sequence[str] | None = None, rerank_k: int = 0,
                  output: str | os.PathLike | None = None) -> dict[str, Any]:
    """The task's evaluation of `model` (a VLMo or an engine wrapping one) on the split `data`.

    cfg gives the image size and text length; answers is the VQA answer table; rerank_k > 0 adds ITM re-ranked
    retrieval recalls; output is the VQA submission JSON or the NLVR2 predictions CSV (written by rank 0).
    """
    common = dict(batch_size=batch_size, rank=rank, world_size=world_size, group=group, device=device)
    if task == "retrieval":
        return evaluate_retrieval(model, data, tokenizer, cfg.image_size, cfg.max_text_len, rerank_k=rerank_k,
                                  **common)
    if task == "vqa":
        if answers is None:
            raise ValueError("VQA evaluation needs the answer table the model was fine-tuned with")
        return evaluate_vqa(model, data, tokenizer, answers, cfg.image_size, cfg.max_text_len, submission=output,
                            **common)
    if task == "nlvr2":
        return evaluate_nlvr2(model, data, tokenizer, cfg.image_size, cfg.max_text_len, predictions=output,
                              **common)
    raise ValueError(f"unknown fine-tuning task {task!r}; choose one of {', '.join(TASKS)}")
