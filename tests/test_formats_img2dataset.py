"""img2dataset output is read as it is: the tool writes only sizes.json and names what the loader will skip."""

import io
import json
import tarfile
from pathlib import Path

import numpy as np

from shard_fixtures import WordTokenizer, image_bytes, plain_transform
from test_formats_karpathy import load_tool, read_split
from vlmo_ds.data.decode import decode_json, decode_text
from vlmo_ds.data.pipelines import ImageTextPipeline, image_text_loader
from vlmo_ds.data.shards import resolve_shards


def img2dataset_shard(path, samples):
    """A tar as img2dataset's webdataset writer makes it: KEY.jpg, KEY.txt, KEY.json per downloaded image."""
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def sample(shard, index, caption=True):
    key = f"{shard:05d}{index:04d}"
    members = {"jpg": image_bytes(np.full((6, 6, 3), 10 * index, np.uint8), "JPEG")}
    if caption:
        members["txt"] = f"caption {key}".encode()
    members["json"] = json.dumps({"url": f"http://x/{key}.jpg", "key": key, "status": "success",
                                  "caption": f"caption {key}", "width": 6, "height": 6}).encode()
    return key, members


def img2dataset_folder(folder):
    folder.mkdir()
    img2dataset_shard(folder / "00000.tar", [sample(0, i) for i in range(3)])
    img2dataset_shard(folder / "00001.tar", [sample(1, 0), sample(1, 1, caption=False)])
    for shard, successes in ((0, 3), (1, 2)):
        (folder / f"{shard:05d}_stats.json").write_text(json.dumps({
            "count": 4, "successes": successes, "failed_to_download": 4 - successes, "failed_to_resize": 0}))
        (folder / f"{shard:05d}.parquet").write_bytes(b"PAR1 not read")


def test_img2dataset_read_as_is(tmp_path):
    folder = tmp_path / "laion"
    img2dataset_folder(folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert load_tool().main(["img2dataset", str(folder), "--quiet"]) == 0
    assert json.loads((folder / "sizes.json").read_text()) == {"00000.tar": 3, "00001.tar": 2}
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.name in before} == before  # nothing converted
    assert resolve_shards(folder).num_samples == 5
    report = json.loads((folder / "conversion_report.json").read_text())
    assert report["img2dataset_stats"] == {"count": 8, "successes": 5, "failed_to_download": 3, "failed_to_resize": 0}
    split = report["splits"]["laion"]
    assert split["written"] == 4 and split["problems"]["no_caption"]["names"] == ["00001.tar:000010001"]

    # the training loader reads the shards directly; the sample without a caption is the one it skips
    pipeline = ImageTextPipeline(WordTokenizer(), plain_transform, text_len=6)
    usable = [s for s in read_split(folder) if "txt" in s]
    for s in usable:
        (item,) = pipeline.expand(s)
        assert item["meta"] == decode_json(s) and decode_text(s) == f"caption {s['__key__']}"
    loader = image_text_loader(folder, WordTokenizer(), plain_transform, batch_size=4, text_len=6)
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 3, 6, 6)
    assert all(key in {s["__key__"] for s in usable} for key in batch["key"])


def test_bad_shard_is_left_out_and_dry_run_writes_nothing(tmp_path, capsys):
    folder = tmp_path / "cc12m"
    img2dataset_folder(folder)
    (folder / "00002.tar").write_bytes(b"\x00garbage" * 100)
    assert load_tool().main(["img2dataset", str(folder), "--dry-run", "--quiet"]) == 0
    assert not (folder / "sizes.json").exists() and not (folder / "conversion_report.json").exists()
    assert load_tool().main(["img2dataset", str(folder), "--quiet"]) == 0
    assert json.loads((folder / "sizes.json").read_text()) == {"00000.tar": 3, "00001.tar": 2}
    shards = resolve_shards(folder)  # sizes.json is the shard list: the bad shard is left out of training too
    assert shards.num_samples == 5 and [Path(u).name for u in shards.urls] == ["00000.tar", "00001.tar"]
    report = json.loads((folder / "conversion_report.json").read_text())
    assert report["splits"]["cc12m"]["problems"]["bad_shard"]["names"][0].startswith("00002.tar (")
    assert "skipped bad_shard: 1 (00002.tar" in capsys.readouterr().out


def test_no_shards_is_a_clear_error(tmp_path, capsys):
    assert load_tool().main(["img2dataset", str(tmp_path), "--quiet"]) == 2
    assert "no *.tar shards" in capsys.readouterr().err
