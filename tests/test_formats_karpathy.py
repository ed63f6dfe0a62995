"""COCO / Flickr30K Karpathy splits -> retrieval shards -> the retrieval loader, on fixtures in the official format."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from shard_fixtures import image_bytes
from vlmo_ds.data.decode import decode_image, decode_json, decode_text, image_member
from vlmo_ds.data.shard_reader import ShardReader
from vlmo_ds.data.shards import resolve_shards
from vlmo_ds.eval.retrieval import load_retrieval_set

REPO = Path(__file__).resolve().parents[1]


def load_tool():
    spec = importlib.util.spec_from_file_location("make_shards", REPO / "tools" / "make_shards.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def read_split(folder):
    """Every sample of a split folder, in shard and file order."""
    samples = []
    for url in resolve_shards(folder).urls:
        reader = ShardReader(url)
        while (sample := reader.next_sample()) is not None:
            samples.append(sample)
        reader.close()
    return samples


def solid(color, fmt="JPEG"):
    return image_bytes(np.full((12, 16, 3), color, np.uint8), fmt)


def coco_fixture(root: Path):
    """dataset_coco.json in Karpathy's format and the images in train2014/ and val2014/; returns (json, images)."""
    entries, files = [], {}
    specs = [("train2014", 9, "train", ["A cat on a mat.", "a cat sleeping"]),
             ("train2014", 25, "train", ["Two dogs."]),
             ("val2014", 42, "restval", ["a red bus", "bus in the street"]),
             ("val2014", 73, "val", ["a kite"]),
             ("val2014", 74, "test", [f"caption {i}" for i in range(6)])]
    for imgid, (folder, cocoid, split, captions) in enumerate(specs):
        filename = f"COCO_{folder}_{cocoid:012d}.jpg"
        data = solid((imgid * 40, 100, 200))
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / filename).write_bytes(data)
        files[filename] = data
        entries.append({"filepath": folder, "filename": filename, "imgid": imgid, "split": split, "cocoid": cocoid,
                        "sentids": list(range(10 * imgid, 10 * imgid + len(captions))),
                        "sentences": [{"tokens": c.lower().split(), "raw": c, "imgid": imgid,
                                       "sentid": 10 * imgid + i} for i, c in enumerate(captions)]})
    path = root / "dataset_coco.json"
    path.write_text(json.dumps({"images": entries, "dataset": "coco"}))
    return path, {e["filename"]: e for e in entries}, files


def test_coco_round_trip(tmp_path):
    path, entries, files = coco_fixture(tmp_path / "coco")
    out = tmp_path / "shards"
    assert load_tool().main(["coco-karpathy", "--json", str(path), "--images", str(tmp_path / "coco"),
                             "--out", str(out), "--quiet", "--shard-size", "2"]) == 0
    expected = {"train": ["COCO_train2014_000000000009.jpg", "COCO_train2014_000000000025.jpg",
                          "COCO_val2014_000000000042.jpg"],  # restval joins train
                "val": ["COCO_val2014_000000000073.jpg"], "test": ["COCO_val2014_000000000074.jpg"]}
    for split, names in expected.items():
        samples = read_split(out / split)
        assert resolve_shards(out / split).num_samples == len(names)
        got = {}
        for sample in samples:
            meta = decode_json(sample)
            got[meta["filename"]] = meta
            assert image_member(sample) == files[meta["filename"]]  # bytes unchanged
            assert decode_text(sample) == meta["captions"][0]
            decode_image(image_member(sample))
        assert sorted(got) == sorted(names)
        for name, meta in got.items():
            entry = entries[name]
            assert meta["captions"] == [s["raw"] for s in entry["sentences"]]
            assert meta["image_id"] == entry["cocoid"] and meta["split"] == entry["split"]
            assert meta["sentids"] == entry["sentids"]
    assert len(read_split(out / "train")[0]) >= 4 and len(list((out / "train").glob("*.tar"))) == 2
    test_set = load_retrieval_set(out / "test")  # the retrieval evaluation reads the shards as they are
    assert test_set.captions == [f"caption {i}" for i in range(6)]
    assert [im.image_id for im in test_set.images] == [74]
    report = json.loads((out / "conversion_report.json").read_text())
    assert report["splits"]["train"]["written"] == 3 and report["splits"]["test"]["problems"] == {}


def test_restval_split_and_order_options(tmp_path):
    path, _, _ = coco_fixture(tmp_path / "coco")
    out = tmp_path / "shards"
    tool = load_tool()
    args = ["coco-karpathy", "--json", str(path), "--images", str(tmp_path / "coco"), "--quiet"]
    assert tool.main([*args, "--out", str(out), "--restval", "restval", "--keep-order"]) == 0
    assert [decode_json(s)["image_id"] for s in read_split(out / "train")] == [9, 25]
    assert [decode_json(s)["image_id"] for s in read_split(out / "restval")] == [42]
    assert [s["__key__"] for s in read_split(out / "train")] == ["00000000", "00000001"]
    again = tmp_path / "again"
    for folder in (out, again):  # the seeded order writes identical bytes; out is rewritten in place
        assert tool.main([*args, "--out", str(folder), "--shuffle-seed", "3", "--overwrite"]) == 0
    assert not (out / "restval" / "shard-000000.tar").exists()  # the earlier run's own files are gone
    assert (out / "train" / "shard-000000.tar").read_bytes() == (again / "train" / "shard-000000.tar").read_bytes()


def test_flickr_and_problems_are_named(tmp_path, capsys):
    images = tmp_path / "flickr30k-images"
    images.mkdir()
    entries = []
    for i, stem in enumerate(["1000092795", "10002456", "1000268201", "1000344755", "1000366164"]):
        entries.append({"filename": f"{stem}.jpg", "imgid": i, "split": "test", "sentids": [i],
                        "sentences": [{"raw": f"photo {i}", "tokens": ["photo", str(i)]}]})
    (images / "1000092795.jpg").write_bytes(solid((255, 0, 0)))
    (images / "10002456.jpg").write_bytes(solid((0, 255, 0), "PNG"))  # a PNG named .jpg is stored as png
    (images / "1000268201.jpg").write_bytes(b"not an image at all")
    # 1000344755.jpg is missing
    (images / "1000366164.jpg").write_bytes(solid((0, 0, 255)))
    entries[4]["sentences"] = [{"raw": "   "}]  # no caption
    entries.append({"imgid": 5, "split": "test", "sentences": [{"raw": "no file name"}]})  # malformed record
    path = tmp_path / "dataset_flickr30k.json"
    path.write_text(json.dumps({"images": entries, "dataset": "flickr30k"}))
    out = tmp_path / "shards"
    assert load_tool().main(["flickr30k-karpathy", "--json", str(path), "--images", str(images), "--out", str(out),
                             "--quiet", "--keep-order", "--workers", "2"]) == 0
    samples = read_split(out / "test")
    assert [decode_json(s)["image_id"] for s in samples] == [1000092795, 10002456]
    assert "jpg" in samples[0] and "png" in samples[1]
    report = json.loads((out / "conversion_report.json").read_text())
    test = report["splits"]["test"]["problems"]
    assert test["bad_image"]["count"] == 1 and test["bad_image"]["names"][0].startswith("1000268201.jpg: ")
    assert test["missing_image"] == {"count": 1, "names": [f"1000344755.jpg: {images / '1000344755.jpg'}"],
                                     "names_truncated": False}
    assert test["no_caption"]["names"] == ["1000366164.jpg"]
    assert report["splits"]["(input)"]["problems"]["bad_record"]["count"] == 1
    printed = capsys.readouterr().out
    assert "skipped missing_image: 1 (1000344755.jpg" in printed and "4 records skipped" in printed


def test_not_a_karpathy_file(tmp_path, capsys):
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"annotations": []}))
    assert load_tool().main(["coco-karpathy", "--json", str(path), "--images", str(tmp_path),
                             "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "no 'images' list" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--help"], ["coco-karpathy", "--help"], ["vqa2", "--help"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_tool().main(argv)
    assert exit_info.value.code == 0 and "usage" in capsys.readouterr().out
