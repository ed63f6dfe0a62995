"""Image-text retrieval metrics of vlmo_ds: recall@K in both directions, its chance level, and a text table.

Shapes: I images, T texts (captions); ``sim`` [I, T] scores (higher = more similar), ``text_to_image`` [T] the
index of each caption's image. An image may have several captions (COCO and Flickr30K have five).

    tr@K  text retrieval, image -> text: an image is a hit when ANY of its captions is among its K best texts
    ir@K  image retrieval, text -> image: a caption is a hit when its own image is among its K best images

Ties count against the model: the rank of the right item is 1 + the number of WRONG items that score at least as
high as it (for TR, as high as the image's best caption). So a model whose scores are all equal gets R@K = 0
unless K reaches past every wrong item, and a result never depends on the order of the data. Images without any
caption are distractors for IR and left out of TR's average.

``chance_tr@K`` / ``chance_ir@K`` are the expected R@K of a uniformly random ranking for the same mapping, exactly:
IR@K = min(K, I) / I; TR@K = mean over captioned images of 1 - C(T - c, K) / C(T, K) for an image with c captions.
All values are fractions in [0, 1]; ``format_table`` prints percentages.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import torch

DEFAULT_KS = (1, 5, 10)
_ROW_CHUNK = 1024  # rows of sim handled at once: bounds the [rows, T] temporaries on 5k x 25k sets


def _check(sim: torch.Tensor, text_to_image: torch.Tensor, ks: Sequence[int]) -> None:
    if sim.dim() != 2:
        raise ValueError(f"sim must be [num_images, num_texts], got shape {tuple(sim.shape)}")
    num_images, num_texts = sim.shape
    if text_to_image.shape != (num_texts,):
        raise ValueError(f"text_to_image must have one entry per text ({num_texts}), got {tuple(text_to_image.shape)}")
    if num_images == 0 or num_texts == 0:
        raise ValueError("retrieval needs at least one image and one text")
    if text_to_image.min() < 0 or text_to_image.max() >= num_images:
        raise ValueError(f"text_to_image holds image indices outside [0, {num_images})")
    if not torch.isfinite(sim).all():
        raise ValueError("the similarity matrix holds NaN or inf: the model's features are not finite "
                         "(a diverged checkpoint, or fp16 overflow)")
    if not ks or min(ks) < 1:
        raise ValueError(f"ks={tuple(ks)} must be positive ranks, e.g. (1, 5, 10)")


def text_retrieval_ranks(sim: torch.Tensor, text_to_image: torch.Tensor) -> torch.Tensor:
    """[I] rank (1 = best) of each image's best caption among all texts, ties against it; 0 for uncaptioned images."""
    ranks = torch.zeros(sim.shape[0], dtype=torch.long)
    images = torch.arange(sim.shape[0], device=sim.device)
    for first in range(0, sim.shape[0], _ROW_CHUNK):
        rows = sim[first:first + _ROW_CHUNK]
        own = text_to_image[None, :] == images[first:first + _ROW_CHUNK, None]  # [rows, T]
        best = rows.masked_fill(~own, float("-inf")).amax(dim=1, keepdim=True)  # [rows, 1]
        wrong_above = ((rows >= best) & ~own).sum(dim=1)
        ranks[first:first + _ROW_CHUNK] = torch.where(own.any(dim=1), wrong_above + 1, 0).cpu()
    return ranks


def image_retrieval_ranks(sim: torch.Tensor, text_to_image: torch.Tensor) -> torch.Tensor:
    """[T] rank (1 = best) of each caption's own image among all images, ties against it."""
    ranks = torch.empty(sim.shape[1], dtype=torch.long)
    for first in range(0, sim.shape[1], _ROW_CHUNK):
        cols = sim[:, first:first + _ROW_CHUNK].t()  # [chunk, I]
        owner = text_to_image[first:first + _ROW_CHUNK]
        right = cols.gather(1, owner[:, None])  # [chunk, 1]
        # The own image is counted too, so the count is 1 + the wrong images scoring at least as high.
        ranks[first:first + _ROW_CHUNK] = (cols >= right).sum(dim=1).cpu()
    return ranks


def chance_recall(text_to_image: torch.Tensor, num_images: int, ks: Sequence[int]) -> dict[str, float]:
    """Expected recall of a uniformly random ranking: chance_tr@K and chance_ir@K for each K."""
    num_texts = text_to_image.numel()
    counts = torch.bincount(text_to_image.cpu(), minlength=num_images)
    counts = [int(c) for c in counts if c > 0]
    out = {}
    for k in ks:
        misses = [math.comb(num_texts - c, k) / math.comb(num_texts, k) if k <= num_texts else 0.0 for c in counts]
        out[f"chance_tr@{k}"] = 1.0 - sum(misses) / len(counts)
        out[f"chance_ir@{k}"] = min(k, num_images) / num_images
    return out


def recall_at_k(sim: torch.Tensor, text_to_image: torch.Tensor,
                ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """tr@K, ir@K, chance_tr@K, chance_ir@K for each K, and r_mean (the mean of all tr@K and ir@K)."""
    text_to_image = text_to_image.to(device=sim.device, dtype=torch.long)
    _check(sim, text_to_image, ks)
    tr_ranks = text_retrieval_ranks(sim, text_to_image)
    tr_ranks = tr_ranks[tr_ranks > 0]
    ir_ranks = image_retrieval_ranks(sim, text_to_image)
    out: dict[str, float] = {}
    for k in ks:
        out[f"tr@{k}"] = (tr_ranks <= k).double().mean().item()
    for k in ks:
        out[f"ir@{k}"] = (ir_ranks <= k).double().mean().item()
    out["r_mean"] = sum(out.values()) / (2 * len(ks))
    out.update(chance_recall(text_to_image, sim.shape[0], ks))
    return out


def format_table(metrics: Mapping[str, float]) -> str:
    """A text table of tr@K and ir@K in percent, each with its chance level in brackets, e.g.

                          R@1            R@5            R@10
        TR (image->text)  52.40 (0.50)   78.10 (2.49)   86.00 (4.96)
        IR (text->image)  40.10 (0.10)   70.20 (0.50)   80.00 (1.00)
        recall % (chance %); mean recall 67.80; 1000 images, 5000 texts
    """
    ks = sorted({int(m.group(1)) for key in metrics if (m := re.fullmatch(r"tr@(\d+)", key))})
    if not ks:
        raise ValueError("no tr@K entries in the metrics: pass the dict that recall_at_k or evaluate_retrieval returns")
    width = 15
    lines = [" " * 18 + "".join(f"R@{k}".ljust(width) for k in ks)]
    for label, prefix in (("TR (image->text)", "tr"), ("IR (text->image)", "ir")):
        cells = []
        for k in ks:
            chance = metrics.get(f"chance_{prefix}@{k}")
            cell = f"{100 * metrics[f'{prefix}@{k}']:.2f}"
            cells.append((cell if chance is None else f"{cell} ({100 * chance:.2f})").ljust(width))
        lines.append(label.ljust(18) + "".join(cells))
    footer = ["recall % (chance %)"]
    if "r_mean" in metrics:
        footer.append(f"mean recall {100 * metrics['r_mean']:.2f}")
    if "num_images" in metrics and "num_texts" in metrics:
        footer.append(f"{int(metrics['num_images'])} images, {int(metrics['num_texts'])} texts")
    lines.append("; ".join(footer))
    return "\n".join(line.rstrip() for line in lines)
