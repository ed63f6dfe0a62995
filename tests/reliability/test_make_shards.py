"""tools/make_shards.py trusts neither annotation paths nor its output folder: an image path outside --images is a
counted, named problem and never read; an --out holding data is refused; --overwrite removes only the files an
earlier make_shards run there wrote."""

import json

import numpy as np

import vlmo_ds.data.formats.convert as convert
from shard_fixtures import image_bytes, write_shards
from test_formats_karpathy import coco_fixture, load_tool, read_split


def _image(value: int) -> bytes:
    return image_bytes(np.full((8, 8, 3), value, np.uint8), "JPEG")


def _files(folder):
    """{relative path: bytes} of every file under folder."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_image_paths_outside_images_are_named_and_never_read(tmp_path, monkeypatch, capsys):
    images, secrets = tmp_path / "images", tmp_path / "private"
    images.mkdir()
    secrets.mkdir()
    (images / "inside.jpg").write_bytes(_image(10))
    (tmp_path / "beside.jpg").write_bytes(_image(20))
    (secrets / "key.jpg").write_bytes(_image(30))
    escaping = ["../beside.jpg", str(secrets / "key.jpg"), "sub/../../beside.jpg"]
    entries = [{"filename": name, "split": "test", "sentences": [{"raw": f"caption {i}"}], "imgid": i}
               for i, name in enumerate(["inside.jpg", *escaping])]
    (tmp_path / "karpathy.json").write_text(json.dumps({"images": entries}))
    tsv = tmp_path / "captions.tsv"
    tsv.write_text("".join(f"caption {i}\t{name}\n" for i, name in enumerate(["inside.jpg", *escaping])))
    opened = []
    read = convert.read_image_file
    monkeypatch.setattr(convert, "read_image_file", lambda path: opened.append(path) or read(path))
    tool = load_tool()
    runs = {"karpathy": (["coco-karpathy", "--json", str(tmp_path / "karpathy.json")], "test"),
            "tsv": (["caption-tsv", "--tsv", str(tsv)], "tsv")}
    for name, (command, split) in runs.items():
        out = tmp_path / name
        assert tool.main([*command, "--images", str(images), "--out", str(out), "--quiet"]) == 0
        assert [s["jpg"] for s in read_split(out / split if name == "karpathy" else out)] == [_image(10)]
        problems = json.loads((out / "conversion_report.json").read_text())["splits"][split]["problems"]
        assert problems["escaping_path"]["count"] == 3
        assert all(any(bad in named for named in problems["escaping_path"]["names"]) for bad in escaping)
        assert "skipped escaping_path: 3" in capsys.readouterr().out
    assert [p.name for p in opened] == ["inside.jpg", "inside.jpg"]  # nothing outside --images was opened


def test_out_holding_another_data_set_is_refused_and_untouched(tmp_path, capsys):
    path, _, _ = coco_fixture(tmp_path / "coco")
    out = tmp_path / "sbu"  # another converter's shards, e.g. the synthetic writer's or a copied data set
    write_shards(out, [{"__key__": f"{i}", "jpg": _image(i), "txt": "x"} for i in range(4)], per_shard=2)
    (out / "train").mkdir()
    write_shards(out / "train", [{"__key__": "a", "jpg": _image(1), "txt": "y"}], per_shard=1)
    before = _files(out)
    tool = load_tool()
    args = ["coco-karpathy", "--json", str(path), "--images", str(tmp_path / "coco"), "--out", str(out), "--quiet"]
    for extra, says in (([], "already holds data"), (["--overwrite"], "lists as its own")):
        assert tool.main(args + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0] and str(out) in err[0], err
        assert _files(out) == before


def test_overwrite_removes_only_what_the_tool_wrote(tmp_path, capsys):
    path, _, _ = coco_fixture(tmp_path / "coco")
    out, victim = tmp_path / "shards", tmp_path / "victim"
    tool = load_tool()
    args = ["coco-karpathy", "--json", str(path), "--images", str(tmp_path / "coco"), "--out", str(out), "--quiet"]
    assert tool.main([*args, "--shard-size", "1", "--restval", "restval"]) == 0
    assert len(list((out / "train").glob("shard-*.tar"))) == 2
    write_shards(victim, [{"__key__": "v", "jpg": _image(5), "txt": "v"}], per_shard=1)
    (out / "README.txt").write_text("notes of a person")
    (out / "train" / "notes.txt").write_text("more notes")
    (out / "elsewhere").mkdir()
    (out / "elsewhere" / "data.tar").write_bytes(b"someone's tar")
    report = json.loads((out / "conversion_report.json").read_text())
    # a tampered record: files outside --out, and files of other names, are never removed
    report["files"] = report.get("files", []) + ["../victim/shard-000000.tar", "README.txt", "elsewhere/data.tar"]
    (out / "conversion_report.json").write_text(json.dumps(report))
    kept = {name: data for name, data in _files(out).items() if name.endswith((".txt", "data.tar"))}
    victim_before = _files(victim)
    capsys.readouterr()

    assert tool.main([*args, "--overwrite"]) == 0
    after = _files(out)
    assert {name: after[name] for name in kept} == kept and _files(victim) == victim_before
    assert sorted(n for n in after if n.startswith("train/")) == ["train/notes.txt", "train/shard-000000.tar",
                                                                   "train/sizes.json"]
    assert not (out / "restval").exists() or not list((out / "restval").iterdir())  # restval merged into train now
    assert len(read_split(out / "train")) == 3
