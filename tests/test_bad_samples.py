"""Bad data is converted or counted and skipped, never a crash or a hang."""

from __future__ import annotations

import io
import itertools
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from vlmo_ds.data.errors import DataSourceError
from vlmo_ds.data.pipelines import image_loader, image_text_loader
from shard_fixtures import WordTokenizer, image_bytes, plain_transform, png_header_only, write_shards

TOK = WordTokenizer()
RED = np.zeros((16, 16, 3), dtype=np.uint8) + np.array([255, 0, 0], dtype=np.uint8)


def _palette_with_transparency() -> bytes:
    image = Image.fromarray(np.array([[0, 1] * 8] * 16, dtype=np.uint8), "P")
    image.putpalette([0, 0, 255, 10, 20, 30])
    return image_bytes(image, "PNG", transparency=0)  # palette index 0 is transparent


def _rgba() -> bytes:
    pixels = np.zeros((16, 16, 4), dtype=np.uint8)
    pixels[:, :8] = (255, 0, 0, 255)  # left half opaque red, right half fully transparent
    return image_bytes(pixels)


GOOD = {  # key -> (member, image bytes); every one must come out as RGB [3, 16, 16]
    "good_png": ("png", image_bytes(RED)),
    "grey": ("png", image_bytes(np.full((16, 16), 77, dtype=np.uint8))),
    "cmyk": ("jpg", image_bytes(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG")),
    "grey16": ("png", image_bytes(np.full((16, 16), 0x4000, dtype=np.uint16))),
    "palette": ("png", _palette_with_transparency()),
    "rgba": ("png", _rgba()),
    "grey_alpha": ("png", image_bytes(Image.new("LA", (16, 16), (50, 255)))),
    "good_jpg": ("jpg", image_bytes(RED, "JPEG")),
}
CAP = {"txt": "a caption"}
BAD = [  # (key, members, skip kind)
    ("not_an_image", {**CAP, "jpg": b"certainly not a JPEG"}, "bad_image"),
    ("cut_jpeg", {**CAP, "jpg": image_bytes(RED, "JPEG")[:200]}, "bad_image"),
    ("no_caption", {"png": image_bytes(RED)}, "no_caption"),
    ("blank_caption", {"png": image_bytes(RED), "txt": "  \n "}, "no_caption"),
    ("over_max_pixels", {**CAP, "png": png_header_only(10_000, 10_000)}, "huge_image"),  # 100 M > 8192^2
    ("pillow_bomb", {**CAP, "png": png_header_only(20_000, 20_000)}, "huge_image"),  # over Pillow's own hard limit
    ("caption_only", CAP, "no_image"),
    ("bad_json", {**CAP, "png": image_bytes(RED), "json": b"{not json"}, "bad_json"),
]


def _one_shard(tmp_path) -> None:
    """good, bad, bad, good, bad, good, ...: all bad kinds between good samples, and a good one last, so that a
    batch of len(GOOD) reads the shard exactly once."""
    bad = [{"__key__": key, **members} for key, members, _ in BAD]
    samples = []
    for i, (key, (ext, data)) in enumerate(GOOD.items()):
        samples += bad[:2] if i == 1 else bad[:1] if i > 1 else []
        bad = bad[2:] if i == 1 else bad[1:] if i > 1 else bad
        samples.append({"__key__": key, ext: data, "txt": "a caption"})
    assert not bad
    write_shards(tmp_path, samples, per_shard=len(samples))


def test_each_bad_kind_is_counted_and_modes_become_rgb(tmp_path):
    _one_shard(tmp_path)
    loader = image_text_loader(tmp_path, TOK, plain_transform, batch_size=len(GOOD), text_len=6, open_shards=1)
    batch = next(iter(loader))
    assert batch["key"] == list(GOOD)
    expected: dict[str, int] = {}
    for _, _, kind in BAD:
        expected[kind] = expected.get(kind, 0) + 1
    assert loader.skipped == dict(sorted(expected.items()))
    assert batch["image"].shape == (len(GOOD), 3, 16, 16)
    image = dict(zip(batch["key"], batch["image"]))
    assert torch.equal(image["grey"], torch.full((3, 16, 16), 77 / 255))
    assert torch.equal(image["grey16"], torch.full((3, 16, 16), 0x40 / 255))  # top 8 of 16 bits
    assert torch.equal(image["palette"][:, :, 0], torch.ones(3, 16))  # transparent -> white
    assert torch.equal(image["palette"][:, 0, 1], torch.tensor([10, 20, 30]) / 255)
    assert torch.equal(image["rgba"][:, 0, 0], torch.tensor([1.0, 0.0, 0.0]))
    assert torch.equal(image["rgba"][:, 0, 15], torch.ones(3))
    assert torch.equal(image["grey_alpha"], torch.full((3, 16, 16), 50 / 255))
    assert image["cmyk"][0].mean() > 0.9 and image["cmyk"][1:].mean() < 0.1  # CMYK (0, 255, 255, 0) is red


def _cut_shard(tmp_path, at_boundary: bool) -> None:
    """Three samples, the file cut right before the third one's first header, or inside its first member's data."""
    samples = [{"__key__": k, "png": image_bytes(RED), "txt": "a caption"} for k in ("a", "b", "c")]
    (path,) = write_shards(tmp_path, samples, per_shard=3)
    with tarfile.open(path) as tar:
        first = min((m for m in tar.getmembers() if m.name.startswith("c.")), key=lambda m: m.offset)
    data = path.read_bytes()
    path.write_bytes(data[:first.offset] if at_boundary else data[:first.offset_data + 40])


@pytest.mark.parametrize("at_boundary", [False, True])
def test_truncated_tar_loses_only_its_tail_and_resumes_exactly(tmp_path, at_boundary):
    _cut_shard(tmp_path, at_boundary)
    make = lambda: image_text_loader(tmp_path, TOK, plain_transform, batch_size=4, text_len=6,  # noqa: E731
                                     open_shards=1)
    loader = make()
    batches = iter(loader)
    assert next(batches)["key"] == ["a", "b", "a", "b"]  # one-shard set: resampled after the cut
    assert loader.skipped == {"truncated_tar": 1}
    state = json.loads(json.dumps(loader.state_dict()))
    want = [b["key"] for b in itertools.islice(batches, 2)]
    resumed = make()
    resumed.load_state_dict(state)
    assert [b["key"] for b in itertools.islice(iter(resumed), 2)] == want
    assert resumed.skipped == loader.skipped == {"truncated_tar": 5}  # 1 + 2 per batch of 4


def test_all_bad_data_raises_instead_of_hanging(tmp_path):
    write_shards(tmp_path, [{"__key__": f"{i}", "jpg": b"junk", "txt": "x"} for i in range(3)], per_shard=3)
    loader = image_text_loader(tmp_path, TOK, plain_transform, batch_size=2, text_len=6,
                               max_consecutive_skips=50)
    with pytest.raises(DataSourceError, match="held no usable sample"):
        next(iter(loader))


def test_vanished_shard_is_counted(tmp_path):
    paths = write_shards(tmp_path, [{"__key__": f"{i}", "png": image_bytes(RED), "txt": "x"} for i in range(4)],
                         per_shard=2)
    loader = image_text_loader(tmp_path, TOK, plain_transform, batch_size=6, text_len=6, seed=1)
    paths[0].unlink()
    batch = next(iter(loader))
    assert set(batch["key"]) <= {"2", "3"} and loader.skipped["unreadable_shard"] >= 1


def _vtok(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def test_visual_tokens_are_checked(tmp_path):
    ok = _vtok(np.arange(4, dtype=np.int32))
    samples = [{"__key__": "missing", "png": image_bytes(RED)},
               {"__key__": "floats", "png": image_bytes(RED), "vtok.npy": _vtok(np.zeros(4))},
               {"__key__": "short", "png": image_bytes(RED), "vtok.npy": _vtok(np.arange(3))},
               {"__key__": "junk", "png": image_bytes(RED), "vtok.npy": b"\x93NUMPY junk"},
               {"__key__": "good", "png": image_bytes(RED), "vtok.npy": ok}]
    write_shards(tmp_path, samples, per_shard=5)
    loader = image_loader(tmp_path, plain_transform, batch_size=1, vtok_len=4, open_shards=1)
    batch = next(iter(loader))
    assert batch["key"] == ["good"] and batch["vtok"].tolist() == [[0, 1, 2, 3]]
    assert loader.skipped == {"bad_vtok": 3, "no_vtok": 1}
