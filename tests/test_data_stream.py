"""Shard lists, the tar reader's offsets, and the layout of image-text, image-only and text-only batches."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from vlmo_ds.data.loader import StreamLoader
from vlmo_ds.data.pipelines import ImageTextPipeline, image_loader, image_text_loader, text_loader
from vlmo_ds.data.shard_reader import ShardReader
from vlmo_ds.data.shards import resolve_shards
from shard_fixtures import WordTokenizer, image_bytes, plain_transform, write_shards

TOK = WordTokenizer()


def _pixels(i: int) -> np.ndarray:
    return np.full((4, 6, 3), (i, 2 * i, 3 * i), dtype=np.uint8)  # H=4, W=6


def _pairs(n: int) -> list[dict]:
    return [{"__key__": f"{i:04d}", "png": image_bytes(_pixels(i)), "txt": f"a photo number{i}",
             "json": {"id": i}} for i in range(n)]


def test_resolve_folder_pattern_and_list(tmp_path):
    paths = write_shards(tmp_path, _pairs(7), per_shard=3)  # 3 + 3 + 1 samples
    (tmp_path / "notes.txt").write_text("not a shard")
    urls = tuple(str(p) for p in paths)
    by_folder = resolve_shards(tmp_path)
    assert by_folder.urls == urls and by_folder.sizes == (3, 3, 1) and by_folder.num_samples == 7
    assert resolve_shards(str(tmp_path / "shard-{000000..000002}.tar")).urls == urls
    assert resolve_shards([paths[2], str(paths[0])]).urls == (urls[2], urls[0])
    assert resolve_shards(tmp_path).for_rank(1, 2).urls == (urls[1],)
    assert resolve_shards(tmp_path).for_rank(0, 2).sizes == (3, 1)
    assert resolve_shards(tmp_path).for_rank(3, 4).urls == urls  # fewer shards than ranks: all of them
    (tmp_path / "sizes.json").unlink()
    assert resolve_shards(tmp_path).num_samples is None
    with pytest.raises(FileNotFoundError, match="do not exist"):
        resolve_shards(str(tmp_path / "shard-{000000..000003}.tar"))
    (tmp_path / "old.tar.gz").write_bytes(b"")
    with pytest.raises(ValueError, match="plain .tar"):
        resolve_shards([tmp_path / "old.tar.gz"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no \\*.tar shards"):
        resolve_shards(tmp_path / "empty")


def test_sizes_json_is_the_shard_list_read_once(tmp_path, monkeypatch, caplog):
    """With sizes.json a rank learns names and sizes from it: no listing, one stat (the first shard) per call."""
    paths = write_shards(tmp_path, _pairs(7), per_shard=3)
    (tmp_path / "shard-000003.tar").write_bytes(paths[2].read_bytes())  # on disk, not in sizes.json: not a shard
    paths[1].unlink()  # listed, gone: found by the stream (counted unreadable_shard), not by a stat at start-up
    stats, listings = [], []
    real_is_file, real_glob = Path.is_file, Path.glob
    monkeypatch.setattr(Path, "is_file", lambda self: stats.append(self.name) or real_is_file(self))
    monkeypatch.setattr(Path, "glob", lambda self, pattern: listings.append(pattern) or real_glob(self, pattern))
    shards = resolve_shards(tmp_path)
    assert [Path(u).name for u in shards.urls] == [p.name for p in paths] and shards.sizes == (3, 3, 1)
    assert resolve_shards(str(tmp_path / "shard-{000000..000002}.tar")).num_samples == 7
    assert stats == ["shard-000000.tar", "shard-000000.tar"] and listings == []
    stats.clear()
    (tmp_path / "sizes.json").unlink()
    with caplog.at_level(logging.WARNING, "vlmo_ds.data.shards"):
        fallback = [resolve_shards(tmp_path) for _ in range(2)]
    assert [Path(u).name for u in fallback[0].urls] == ["shard-000000.tar", "shard-000002.tar", "shard-000003.tar"]
    assert fallback[1].sizes is None and listings == ["*.tar", "*.tar"] and len(stats) == 6  # today's behaviour
    said = [r.getMessage() for r in caplog.records if "no sizes.json" in r.getMessage()]
    assert len(said) == 1 and str(tmp_path) in said[0]  # once per folder and process


def test_reader_reopens_at_any_sample_offset(tmp_path):
    (path,) = write_shards(tmp_path, _pairs(5), per_shard=5)
    reader, offsets, keys = ShardReader(str(path)), [], []
    while True:
        offsets.append(reader.next_offset)
        sample = reader.next_sample()
        if sample is None:
            break
        keys.append(sample["__key__"])
        assert set(sample) == {"__key__", "__url__", "png", "txt", "json"}
    reader.close()
    assert keys == [f"{i:04d}" for i in range(5)] and reader.done
    for i, offset in enumerate(offsets[:-1]):
        again = ShardReader(str(path), offset)
        assert again.next_sample()["txt"] == f"a photo number{i}".encode()
        again.close()


def test_image_text_batch(tmp_path):
    write_shards(tmp_path, _pairs(3), per_shard=3)
    loader = image_text_loader(tmp_path, TOK, plain_transform, batch_size=3, text_len=6, open_shards=1)
    batch = next(iter(loader))
    assert batch["key"] == ["0000", "0001", "0002"]
    assert batch["meta"] == [{"id": 0}, {"id": 1}, {"id": 2}]
    assert batch["image"].shape == (3, 3, 4, 6) and batch["image"].dtype == torch.float32
    assert torch.allclose(batch["image"][2, :, 0, 0], torch.tensor([2.0, 4.0, 6.0]) / 255)
    # "a photo number2": "number2" is 7 characters, two tokens, the second no word start
    w = TOK.word_id
    assert batch["text_ids"][2].tolist() == [2, w("a"), w("photo"), w("number"), w("2"), 3]
    assert batch["text_mask"][2].tolist() == [1] * 6 and batch["text_ids"].dtype == torch.int64
    assert batch["word_start"][2].tolist() == [True, True, True, True, False, True]
    short = image_text_loader(tmp_path, TOK, plain_transform, batch_size=1, text_len=8, open_shards=1)
    first = next(iter(short))
    assert first["text_ids"][0, 6:].tolist() == [TOK.pad_id] * 2 and first["text_mask"][0].tolist() == [1] * 6 + [0] * 2


def test_text_documents_are_cut_and_resume_inside_a_document(tmp_path):
    words = [f"w{i}" for i in range(10)]
    write_shards(tmp_path, [{"__key__": "doc", "txt": " ".join(words)}], per_shard=1)
    make = lambda: text_loader(tmp_path, TOK, batch_size=3, text_len=5, open_shards=1)  # noqa: E731
    loader = make()
    batches = iter(loader)
    first = next(batches)
    ids = [TOK.word_id(x) for x in words]
    assert first["key"] == ["doc#0", "doc#1", "doc#2"]
    assert first["text_ids"].tolist() == [[2, *ids[0:3], 3], [2, *ids[3:6], 3], [2, *ids[6:9], 3]]
    state = json.loads(json.dumps(loader.state_dict()))
    assert state["streams"][0]["slots"][0]["taken"] == 3
    resumed = make()
    resumed.load_state_dict(state)
    second = next(iter(resumed))
    assert second["key"] == ["doc#3", "doc#0", "doc#1"]  # the one-shard set is resampled after its end
    assert second["text_ids"][0].tolist() == [2, ids[9], 3, 0, 0]
    assert second["text_mask"][0].tolist() == [1, 1, 1, 0, 0]
    assert torch.equal(second["text_ids"], next(batches)["text_ids"])


def _vtok(values) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(values, dtype=np.int16))
    return buffer.getvalue()


def test_image_only_batch_with_visual_tokens(tmp_path):
    samples = [{"__key__": f"{i}", "webp": image_bytes(_pixels(i), "WEBP", lossless=True),
                "vtok.npy": _vtok([[i, i + 1], [i + 2, 7]])} for i in range(2)]
    write_shards(tmp_path, samples, per_shard=2)
    batch = next(iter(image_loader(tmp_path, plain_transform, batch_size=2, vtok_len=4, open_shards=1)))
    assert batch["image"].shape == (2, 3, 4, 6) and batch["key"] == ["0", "1"]
    assert batch["vtok"].dtype == torch.int64 and batch["vtok"].tolist() == [[0, 1, 2, 7], [1, 2, 3, 7]]
    plain = next(iter(image_loader(tmp_path, plain_transform, batch_size=2, open_shards=1)))
    assert "vtok" not in plain


def test_seeds_ranks_and_hook_drive_all_randomness(tmp_path):
    write_shards(tmp_path, _pairs(12), per_shard=2)

    def hook(batch, rng):
        return {**batch, "draw": torch.from_numpy(rng.random(2))}

    def keys(**kw):
        loader = image_text_loader(tmp_path, TOK, plain_transform, batch_size=2, text_len=6, batch_hook=hook,
                                   batches_per_epoch=4, **kw)
        return [(b["key"], b["draw"].tolist()) for b in loader]

    assert keys(seed=3) == keys(seed=3)
    assert keys(seed=3) != keys(seed=4)
    rank0, rank1 = keys(seed=3, dp_rank=0, dp_size=2), keys(seed=3, dp_rank=1, dp_size=2)
    assert not {k for ks, _ in rank0 for k in ks} & {k for ks, _ in rank1 for k in ks}  # disjoint shards


def test_loader_settings_are_checked(tmp_path):
    write_shards(tmp_path, _pairs(2), per_shard=2)
    pipeline = ImageTextPipeline(TOK, plain_transform, text_len=6)
    with pytest.raises(ValueError, match="multiple of num_workers"):
        StreamLoader(tmp_path, pipeline, 2, num_workers=2, num_streams=3)
    with pytest.raises(ValueError, match="dp_rank"):
        StreamLoader(tmp_path, pipeline, 2, dp_rank=2, dp_size=2)
    state = StreamLoader(tmp_path, pipeline, 2, seed=1).state_dict()
    with pytest.raises(ValueError, match="seed=1"):
        StreamLoader(tmp_path, pipeline, 2, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="batch_size=2"):
        StreamLoader(tmp_path, pipeline, 4, seed=1).load_state_dict(state)
