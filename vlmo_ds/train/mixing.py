"""Several shard sources of one stage mixed by weight, deterministically and resumably.

Each source is a StreamLoader of its own (vlmo_ds.data.loader) that yields chunks of c = B / k samples; a micro-batch
of B samples is k chunks, and chunk j of batch b comes from source s with probability weight_s / sum(weights). The
choice is a pure function of (seed, data-parallel rank, b), so the mix position is the batch count alone: the
state after b batches is (b, every source loader's own state), and a resumed run draws the same sources in the same
order and gets the same samples from each. Mixing chunks rather than whole batches keeps every micro-batch (and so
every contrastive batch) a blend of sources, as the published code's concatenated data sets do.

Batches (B = k x c): whatever the sources' pipeline yields, chunks concatenated along dim 0; list entries (key,
meta) concatenated in the same order.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from vlmo_ds.data.loader import StreamLoader

STATE_FORMAT = "vlmo_ds.mixed_loader/1"
MAX_CHUNKS = 8  # chunks per micro-batch: finer mixing costs one DataLoader hand-off per chunk


def chunks_per_batch(batch_size: int) -> int:
    """k = gcd(B, 8): the most chunks (up to 8) that split a micro-batch of B samples evenly."""
    return math.gcd(batch_size, MAX_CHUNKS)


def source_seed(seed: int, source: int) -> int:
    """The seed of source `source`'s loader (its streams, transforms and masking)."""
    return int(np.random.SeedSequence([seed, 0x6D6978, source]).generate_state(1)[0])


def worker_shares(num_workers: int, weights: Sequence[float]) -> list[int]:
    """DataLoader workers per source: proportional to its weight, at least one each (none when num_workers is 0)."""
    if num_workers == 0:
        return [0] * len(weights)
    total = sum(weights)
    return [max(1, round(num_workers * w / total)) for w in weights]


def concat_batches(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Chunks -> one batch: tensors concatenated along dim 0, lists joined."""
    out: dict[str, Any] = {}
    for key in parts[0]:
        values = [part[key] for part in parts]
        out[key] = torch.cat(values) if isinstance(values[0], torch.Tensor) else [v for vs in values for v in vs]
    return out


class MixedLoader:
    """Endless batches of `chunks` chunks, each drawn from one of `loaders` by weight (see the module docstring)."""

    def __init__(self, loaders: Sequence[StreamLoader], weights: Sequence[float], *, chunks: int, seed: int,
                 dp_rank: int) -> None:
        if len(loaders) != len(weights) or not loaders:
            raise ValueError(f"{len(loaders)} loaders and {len(weights)} weights: give one weight per source")
        if any(w <= 0 for w in weights):
            raise ValueError(f"source weights {list(weights)} must all be > 0")
        self.loaders = list(loaders)
        self.weights = [float(w) for w in weights]
        self.probs = np.array(self.weights) / sum(self.weights)
        self.chunks, self.seed, self.dp_rank = chunks, seed, dp_rank
        self._batches = 0

    @property
    def batches(self) -> int:
        """Batches handed out so far."""
        return self._batches

    @property
    def skipped(self) -> dict[str, int]:
        """Skipped samples and shards by kind, summed over the sources."""
        total: dict[str, int] = {}
        for loader in self.loaders:
            for kind, n in loader.skipped.items():
                total[kind] = total.get(kind, 0) + n
        return dict(sorted(total.items()))

    def picks(self, batch: int) -> list[int]:
        """The source of each chunk of batch number `batch` (a pure function of seed, rank and batch)."""
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, self.dp_rank, batch])))
        return rng.choice(len(self.loaders), size=self.chunks, p=self.probs).tolist()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for loader in self.loaders:  # every source now, not when this rank first draws it: all ranks stop alike
            loader.check_source()
        streams: list[Iterator[dict[str, Any]] | None] = [None] * len(self.loaders)
        while True:
            parts = []
            for source in self.picks(self._batches):
                if streams[source] is None:
                    streams[source] = iter(self.loaders[source])
                parts.append(next(streams[source]))
            self._batches += 1
            yield concat_batches(parts)

    def state_dict(self) -> dict[str, Any]:
        """JSON-able: the batch count (the mix position) and every source's loader state."""
        return {"format": STATE_FORMAT, "batches": self._batches, "weights": self.weights, "chunks": self.chunks,
                "seed": self.seed, "sources": [loader.state_dict() for loader in self.loaders]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`; the sources, weights, chunks and seed must be those it was saved with."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a mixed-loader state (format {state.get('format')!r}, expected {STATE_FORMAT!r}): "
                             "the stage's data sources changed since the checkpoint; resume with the same data")
        for name in ("weights", "chunks", "seed"):
            if state[name] != getattr(self, name):
                raise ValueError(f"the saved data mix has {name}={state[name]!r} but this stage "
                                 f"{getattr(self, name)!r}; resume with the same data settings")
        if len(state["sources"]) != len(self.loaders):
            raise ValueError(f"the saved data mix has {len(state['sources'])} sources, this stage "
                             f"{len(self.loaders)}; resume with the same data sources")
        for loader, saved in zip(self.loaders, state["sources"]):
            loader.load_state_dict(saved)
        self._batches = int(state["batches"])
