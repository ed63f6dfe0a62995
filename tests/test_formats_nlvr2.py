"""NLVR2 JSON lines + image pairs -> NLVR2 shards -> read back; NLVR2 accuracy and consistency by hand."""

import json

import numpy as np
import pytest

from shard_fixtures import image_bytes
from test_formats_karpathy import load_tool, read_split
from vlmo_ds.data.decode import SampleSkipped, decode_image, decode_json
from vlmo_ds.data.formats.nlvr2 import pair_image_names, pair_members
from vlmo_ds.eval.nlvr2 import nlvr2_metrics, sentence_key, write_predictions


def example(identifier, sentence, label, **extra):
    return {"identifier": identifier, "sentence": sentence, "label": label, "writer": "7", "synset": "dog",
            "query": "dogs", "left_url": "http://x/l.jpg", "right_url": "http://x/r.jpg",
            "extra_validations": {}, **extra}


def picture(value, fmt):
    return image_bytes(np.full((8, 8, 3), value, np.uint8), fmt)


@pytest.fixture()
def nlvr2_data(tmp_path):
    data, images = tmp_path / "nlvr" / "nlvr2" / "data", tmp_path / "nlvr2_images"
    data.mkdir(parents=True)
    files = {}

    def put(folder, identifier, fmt="PNG"):
        folder.mkdir(parents=True, exist_ok=True)
        for name in pair_image_names(identifier):
            files[name] = picture(len(files) * 10 % 255, fmt)
            (folder / name).write_bytes(files[name])

    train = [example("train-10171-0-0", "Two dogs.", "True", directory=61),
             example("train-10171-1-0", "Two dogs.", "False", directory=61),
             example("train-3-0-1", "A cat.", "True", directory="3")]
    put(images / "images" / "train" / "61", "train-10171-0-0")
    put(images / "images" / "train" / "61", "train-10171-1-0", fmt="JPEG")  # *.png files holding JPEG data
    put(images / "images" / "train" / "3", "train-3-0-1")
    dev = [example("dev-850-0-0", "One bird.", "False"), example("dev-850-1-0", "One bird.", "True"),
           example("dev-851-0-0", "No image.", "True"), example("dev-852-0-0", "Odd label.", "maybe")]
    put(images / "dev", "dev-850-0-0")
    put(images / "dev", "dev-850-1-0")
    put(images / "dev", "dev-852-0-0")  # dev-851's images are missing
    lines = [json.dumps(e) for e in dev]
    lines.insert(2, '{"identifier": "dev-9-0-0", "sentence": ')  # a malformed line (line 3)
    lines.insert(3, json.dumps({"identifier": "dev-9", "sentence": "short id"}))  # line 4
    (data / "train.json").write_text("\n".join(json.dumps(e) for e in train) + "\n")
    (data / "dev.json").write_text("\n".join(lines) + "\n")
    test1 = [example("test1-5-0-0", "Unlabelled.", "True")]
    del test1[0]["label"]
    put(images / "test1", "test1-5-0-0")
    (data / "test1.json").write_text(json.dumps(test1[0]) + "\n")
    return data, images, files, {"train": train, "dev": dev}


def test_nlvr2_round_trip(nlvr2_data, tmp_path):
    data, images, files, examples = nlvr2_data
    out = tmp_path / "shards"
    assert load_tool().main(["nlvr2", "--data", str(data), "--images", str(images), "--out", str(out),
                             "--quiet"]) == 0
    train = {decode_json(s)["identifier"]: s for s in read_split(out / "train")}
    assert sorted(train) == sorted(e["identifier"] for e in examples["train"])
    for e in examples["train"]:
        sample, meta = train[e["identifier"]], decode_json(train[e["identifier"]])
        assert meta["sentence"] == e["sentence"] and meta["label"] == (e["label"] == "True")
        assert meta["directory"] == str(e["directory"])
        left, right = pair_members(sample)
        assert (left, right) == (files[meta["left_image"]], files[meta["right_image"]])
        decode_image(left), decode_image(right)
    assert "left.jpg" in train["train-10171-1-0"] and "left.png" in train["train-10171-0-0"]
    assert decode_json(train["train-3-0-1"])["left_image"] == "train-3-0-img0.png"
    dev = [decode_json(s) for s in read_split(out / "dev")]
    assert sorted((d["identifier"], d["label"]) for d in dev) == [("dev-850-0-0", False), ("dev-850-1-0", True)]
    assert [decode_json(s)["label"] for s in read_split(out / "test1")] == [None]

    report = json.loads((out / "conversion_report.json").read_text())["splits"]
    problems = report["dev"]["problems"]
    assert problems["bad_line"]["count"] == 2
    assert [n.split(" ")[0] for n in problems["bad_line"]["names"]] == ["dev.json:3", "dev.json:4"]
    assert problems["missing_image"]["names"][0].startswith("dev-851-0-0: ")
    assert problems["bad_label"]["names"][0].startswith("dev-852-0-0 ")
    assert report["test1"]["notes"]["unlabelled"]["names"] == ["test1-5-0-0"]
    assert report["train"]["problems"] == {}


def test_pair_members_needs_both_images():
    assert pair_members({"left.jpg": b"l", "right.png": b"r"}) == (b"l", b"r")
    with pytest.raises(SampleSkipped, match="no right image"):
        pair_members({"__key__": "k", "left.jpg": b"l"})


def test_nlvr2_metrics_by_hand(tmp_path):
    labels = {"dev-1-0-0": True, "dev-1-1-0": False, "dev-1-0-1": True, "dev-2-0-0": False}
    predictions = {"dev-1-0-0": True, "dev-1-1-0": True, "dev-1-0-1": True, "dev-2-0-0": False}
    # 3 of 4 right; sentences dev-1--0 (one wrong), dev-1--1 and dev-2--0 (all right) -> 2 of 3 consistent
    metrics = nlvr2_metrics(predictions, labels)
    assert metrics == {"accuracy": 0.75, "consistency": pytest.approx(2 / 3), "num_examples": 4.0,
                       "num_sentences": 3.0}
    assert sentence_key("test1-12-3-1") == "test1-12--1"
    with pytest.raises(ValueError, match="no prediction for dev-2-0-0"):
        nlvr2_metrics({k: v for k, v in predictions.items() if k != "dev-2-0-0"}, labels)
    partial = nlvr2_metrics({"dev-1-0-0": True}, labels, strict=False)
    assert partial["accuracy"] == 0.25 and partial["consistency"] == 0.0
    with pytest.raises(ValueError, match="True or False"):
        nlvr2_metrics({"dev-1-0-0": "True"}, {"dev-1-0-0": True})
    path = write_predictions(tmp_path / "predictions.csv", {"dev-1-1-0": False, "dev-1-0-0": True})
    assert path.read_text() == "dev-1-0-0,True\ndev-1-1-0,False\n"
