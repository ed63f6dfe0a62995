"""CC3M / SBU style caption TSV + images on disk -> image-text shards -> the image-text training loader."""

import json

import numpy as np
import pytest

from shard_fixtures import WordTokenizer, image_bytes, plain_transform
from test_formats_karpathy import load_tool, read_split
from vlmo_ds.data.decode import decode_json, image_member
from vlmo_ds.data.formats.caption_tsv import TsvLayout
from vlmo_ds.data.pipelines import ImageTextPipeline, image_text_loader


def cc3m_fixture(tmp_path):
    """Train_GCC-training.tsv (caption<TAB>url, no header) and images saved by row number as 00000000.jpg, ..."""
    images = tmp_path / "cc3m"
    images.mkdir()
    rows = ['a "quoted" dog runs\thttp://example.com/a/dog.jpg?w=300',
            "a cat\thttp://example.com/cat.jpg",
            "only one column",
            "\thttp://example.com/blank-caption.jpg",
            "missing image\thttp://example.com/gone.jpg",
            "a bird\thttp://example.com/bird.png"]
    files = {}
    for index in (0, 1, 5):
        files[index] = image_bytes(np.full((9, 7, 3), 40 * index, np.uint8), "JPEG")
        (images / f"{index:08d}.jpg").write_bytes(files[index])
    tsv = tmp_path / "Train_GCC-training.tsv"
    tsv.write_text("\n".join(rows) + "\n")
    return tsv, images, files


def test_cc3m_round_trip_through_the_loader(tmp_path):
    tsv, images, files = cc3m_fixture(tmp_path)
    out = tmp_path / "shards"
    assert load_tool().main(["caption-tsv", "--tsv", str(tsv), "--images", str(images), "--out", str(out),
                             "--image-pattern", "{index:08d}.jpg", "--quiet"]) == 0
    samples = read_split(out)
    captions = {1: 'a "quoted" dog runs', 2: "a cat", 6: "a bird"}  # by line number
    assert sorted(decode_json(s)["line"] for s in samples) == sorted(captions)
    pipeline = ImageTextPipeline(WordTokenizer(), plain_transform, text_len=8)
    for sample in samples:
        meta = decode_json(sample)
        assert meta["caption"] == captions[meta["line"]] and image_member(sample) == files[meta["line"] - 1]
        (item,) = pipeline.expand(sample)  # the training loader's decoding of one sample
        assert item["meta"] == meta and item["image"].size == (7, 9)
        assert item["ids"][1] == WordTokenizer().word_id(captions[meta["line"]].split()[0])
    assert decode_json(samples[0])["image"].startswith("http://example.com/")
    loader = image_text_loader(out, WordTokenizer(), plain_transform, batch_size=3, text_len=8)
    batch = next(iter(loader))
    assert batch["image"].shape == (3, 3, 9, 7) and batch["text_ids"].shape == (3, 8)

    problems = json.loads((out / "conversion_report.json").read_text())["splits"]["shards"]["problems"]
    assert problems["bad_line"]["names"] == ["Train_GCC-training.tsv:3 (1 columns)"]
    assert problems["no_caption"]["names"] == ["Train_GCC-training.tsv:4"]
    assert problems["missing_image"]["names"] == [f"line 5: {images / '00000004.jpg'}"]


def test_header_named_columns_and_relative_paths(tmp_path):
    images = tmp_path / "sbu"
    (images / "sub").mkdir(parents=True)
    (images / "sub" / "x.webp").write_bytes(image_bytes(np.zeros((4, 4, 3), np.uint8), "WEBP"))
    (images / "y.gif").write_bytes(image_bytes(np.zeros((4, 4), np.uint8), "GIF"))
    tsv = tmp_path / "sbu.tsv"
    tsv.write_text("path\tcaption\nsub/x.webp\tblack square\ny.gif\ta gif\n")
    out = tmp_path / "sbu_shards"
    assert load_tool().main(["caption-tsv", "--tsv", str(tsv), "--images", str(images), "--out", str(out),
                             "--header", "--caption-col", "caption", "--image-col", "path", "--keep-order",
                             "--quiet"]) == 0
    first, second = read_split(out)
    assert first["txt"] == b"black square" and "webp" in first
    assert second["txt"] == b"a gif" and "png" in second  # GIF is not a loader format: stored as PNG, noted
    report = json.loads((out / "conversion_report.json").read_text())
    assert report["splits"]["sbu_shards"]["notes"]["reencoded"]["count"] == 1


@pytest.mark.parametrize("layout, message", [
    (TsvLayout(image_pattern="{url}"), "does not format"),
    (TsvLayout(caption_col="caption"), "is a name"),
])
def test_layout_errors(tmp_path, capsys, layout, message):
    tsv = tmp_path / "c.tsv"
    tsv.write_text("a\tb\n")
    argv = ["caption-tsv", "--tsv", str(tsv), "--images", str(tmp_path), "--out", str(tmp_path / "o"), "--quiet",
            "--caption-col", str(layout.caption_col), "--image-pattern", layout.image_pattern, "--keep-order"]
    assert load_tool().main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # refused before anything was written
