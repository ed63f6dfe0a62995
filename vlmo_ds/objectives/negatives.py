"""The ITM hard negatives' images and texts, fetched from the data-parallel ranks that hold them: only the chosen
rows travel, not every rank's batch.

Every rank draws global indices (vlmo_ds.objectives.itm.sample_hard_negatives): a negative image for each of its
texts, a negative text for each of its images; global row g lives on rank g // B. The exchange:
    1. all-gather the index lists of the group: [W, 2, B] int64 (16 W B bytes), so every rank knows what every
       other rank wants from it, and in which order;
    2. the number of rows each rank sends to each other rank, [W, W, 2], copied to the host once: all_to_all needs
       its split sizes as host ints. This is the exchange's one device-to-host synchronisation per micro-step, in
       multi-rank runs only (one process indexes its own batch: no exchange, no synchronisation);
    3. one all_to_all_single for the images and one for the texts (ids and key mask packed into one int64
       tensor), each sending exactly the requested rows, a row once per request;
    4. the received rows put back in the order of this rank's draw.
Bytes per rank per micro-step: the B negative images and B negative texts it uses (each B/W of them, on average,
already its own), instead of an all-gather of W B images and texts.
Shapes: B local batch, W data-parallel ranks, T text length.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from vlmo_ds.parallel.collectives import all_gather_nograd, group_rank, group_size


def exchange_negatives(neg_image: torch.Tensor, neg_text: torch.Tensor, images: torch.Tensor | None,
                       text_ids: torch.Tensor | None, text_mask: torch.Tensor, group=None):
    """(negative images [B, C, H, W], negative text ids [B, T], negative text mask [B, T]) for global indices
    neg_image / neg_text [B]; images / text_ids None (a pipeline stage that does not embed): None comes back."""
    b = text_mask.shape[0]
    if group_size(group) == 1:
        return (None if images is None else images[neg_image], None if text_ids is None else text_ids[neg_text],
                text_mask[neg_text])
    world, rank = group_size(group), group_rank(group)
    wanted = all_gather_nograd(torch.stack([neg_image, neg_text])[None], group)  # [W, 2, B]
    owner = torch.div(wanted, b, rounding_mode="floor")
    # counts[d, s, k]: rows of kind k (0 image, 1 text) that rank d wants from rank s
    counts = (owner[:, :, None, :] == torch.arange(world, device=owner.device)[:, None]).sum(-1)  # [d, k, s]
    counts = counts.transpose(1, 2).tolist()  # the one host synchronisation (module docstring)
    texts = text_mask if text_ids is None else torch.cat([text_ids, text_mask.to(text_ids.dtype)], dim=1)
    got_images = None if images is None else _exchange(images, wanted[:, 0], owner[:, 0], counts, 0, rank, group)
    got_texts = _exchange(texts, wanted[:, 1], owner[:, 1], counts, 1, rank, group)
    if text_ids is None:
        return got_images, None, got_texts.to(text_mask.dtype)
    t = text_ids.shape[1]
    return got_images, got_texts[:, :t], got_texts[:, t:].to(text_mask.dtype)


def _exchange(rows: torch.Tensor, wanted: torch.Tensor, owner: torch.Tensor, counts: list, kind: int, rank: int,
              group) -> torch.Tensor:
    """rows [B, ...] of this rank; wanted / owner [W, B] every rank's global indices and their owners; returns the
    rows this rank wanted, [B, ...], in its own order."""
    world, b = wanted.shape
    send_sizes = [counts[d][rank][kind] for d in range(world)]
    receive_sizes = [counts[rank][s][kind] for s in range(world)]
    # rows for rank 0, then rank 1, ...: each rank's requests from this rank, in the order of its draw (a stable
    # sort puts them first, so no boolean gather needs the host)
    mine = (owner != rank).flatten().to(torch.int8).argsort(stable=True)[: sum(send_sizes)]
    send = rows[wanted.flatten()[mine] - rank * b]
    received = rows.new_empty((b,) + rows.shape[1:])
    dist.all_to_all_single(received, send.contiguous(), receive_sizes, send_sizes, group=group)
    # received: from rank 0, then rank 1, ...; each source's rows in the order of this rank's draw
    order = owner[rank].argsort(stable=True)
    out = torch.empty_like(received)
    out[order] = received
    return out
