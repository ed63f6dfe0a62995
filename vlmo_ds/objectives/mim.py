"""Masked image modelling (BEiT-style) for the image-only stage.

Targets: "pixels" - the masked patch's pixels, normalised per patch (mean 0, variance 1), regressed with MSE, which
needs nothing external; "tokens" - visual-token ids stored in the shards by an external image tokenizer, predicted
with cross-entropy. Every patch is scored and the masked ones are weighted in, divided by their count on the device:
no boolean gather, whose size the host would have to wait for. Shapes: B batch, P patches, p patch side, C channels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, P, p*p*C] in the patch embedding's row-major patch order."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def normalised_pixel_targets(images: torch.Tensor, patch: int, eps: float = 1e-6) -> torch.Tensor:
    """[B, P, p*p*C]: each patch's pixels standardised by its own mean and variance."""
    x = patchify(images.float(), patch)
    mean, var = x.mean(-1, keepdim=True), x.var(-1, keepdim=True, unbiased=False)
    return (x - mean) / (var + eps).sqrt()


def mim_loss(predictions: torch.Tensor, patch_mask: torch.Tensor, *, images: torch.Tensor | None = None,
             patch: int = 16, token_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, metric) over masked patches. predictions [B, P, K]; patch_mask [B, P] bool.

    Pixels (images given): MSE to normalised pixels; metric = the same MSE (1.0 is the mean predictor's level).
    Tokens (token_ids [B, P] given): cross-entropy; metric = accuracy.
    """
    weights = patch_mask.reshape(-1).float()  # [B*P]
    count = weights.sum().clamp(min=1.0)
    predicted = predictions.reshape(weights.shape[0], -1).float()  # [B*P, K]
    if token_ids is not None:
        targets = token_ids.reshape(-1).masked_fill(weights == 0, -100)  # unmasked ids are never read
        losses = F.cross_entropy(predicted, targets, ignore_index=-100, reduction="none")
        accuracy = ((predicted.detach().argmax(-1) == targets).float() * weights).sum() / count
        return (losses * weights).sum() / count, accuracy
    if images is None:
        raise ValueError("mim_loss needs images (pixel targets) or token_ids (visual-token targets)")
    targets = normalised_pixel_targets(images, patch).reshape(predicted.shape)
    loss = ((predicted - targets).square().mean(-1) * weights).sum() / count
    return loss, loss.detach()
