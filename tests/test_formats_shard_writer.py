"""ShardWriter: shard limits, atomic shards, sizes.json last, a folder holding shards refused, nothing half-written."""

import json
import tarfile

import pytest

from test_formats_karpathy import read_split
from vlmo_ds.data.formats.report import ConversionReport
from vlmo_ds.data.formats.shard_writer import ShardWriter


def test_shards_split_by_count_and_bytes(tmp_path):
    with ShardWriter(tmp_path / "a", shard_size=3) as writer:
        for i in range(7):
            writer.write(f"{i:04d}", {"txt": f"t{i}".encode(), "json": b"{}"})
    assert json.loads((tmp_path / "a" / "sizes.json").read_text()) == {
        "shard-000000.tar": 3, "shard-000001.tar": 3, "shard-000002.tar": 1}
    samples = read_split(tmp_path / "a")
    assert [s["txt"] for s in samples] == [f"t{i}".encode() for i in range(7)]
    with tarfile.open(tmp_path / "a" / "shard-000000.tar") as tar:
        first = tar.getmembers()[0]
    assert (first.name, first.mtime, first.uid, first.uname) == ("0000.json", 0, 0, "")
    with ShardWriter(tmp_path / "b", shard_size=100, shard_bytes=2000) as writer:
        for i in range(4):
            writer.write(f"k{i}", {"bin": bytes(1500)})  # 512 header + 1536 data: past 2000 after each sample
    assert json.loads((tmp_path / "b" / "sizes.json").read_text()) == {f"shard-{i:06d}.tar": 1 for i in range(4)}


def test_folder_with_shards_is_refused_and_failure_leaves_no_partial_shard(tmp_path):
    folder = tmp_path / "split"
    with ShardWriter(folder, shard_size=1) as writer:
        for i in range(3):
            writer.write(f"k{i}", {"txt": b"x"})
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(FileExistsError, match="already holds"):
        ShardWriter(folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # another data set's shards stay whole
    fresh = tmp_path / "fresh"
    (fresh / "keep.txt").parent.mkdir()
    (fresh / "keep.txt").write_text("not a shard")
    with pytest.raises(RuntimeError):
        with ShardWriter(fresh, shard_size=2) as writer:
            writer.write("k0", {"txt": b"y"})
            writer.write("k1", {"txt": b"y"})
            writer.write("k2", {"txt": b"y"})
            raise RuntimeError("the conversion died")
    assert sorted(p.name for p in fresh.iterdir()) == ["keep.txt", "shard-000000.tar"]  # no .tmp, no sizes.json


@pytest.mark.parametrize("key, members, message", [
    ("a.b", {"txt": b""}, "no '.'"), ("", {"txt": b""}, "non-empty"), ("k", {}, "no members")])
def test_bad_samples_are_refused(tmp_path, key, members, message):
    writer = ShardWriter(tmp_path)
    with pytest.raises(ValueError, match=message):
        writer.write(key, members)
    writer.write("k", {"txt": b""})
    with pytest.raises(ValueError, match="twice"):
        writer.write("k", {"txt": b""})
    writer.abort()


def test_report_keeps_counts_past_the_name_limit(monkeypatch, tmp_path):
    monkeypatch.setattr("vlmo_ds.data.formats.report.MAX_NAMES", 2)
    report = ConversionReport("x")
    for i in range(3):
        report.split("train").problem("missing_image", f"img{i}")
    with pytest.raises(ValueError, match="unknown problem kind"):
        report.split("train").problem("lost", "img")
    saved = json.loads(report.save(tmp_path).read_text())
    assert saved["splits"]["train"]["problems"]["missing_image"] == {
        "count": 3, "names": ["img0", "img1"], "names_truncated": True}
    assert "skipped missing_image: 3 (img0, img1, ... (1 more))" in report.summary()
