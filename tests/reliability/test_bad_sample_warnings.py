"""Bad samples are named where they are (shard and sample key); a data source of only bad samples stops training
with one line naming the source and what was wrong, the same way on every data-parallel rank.

(Not test_bad_samples.py: tests/test_bad_samples.py holds the counting tests, and pytest needs distinct names.)"""

import logging
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from shard_fixtures import WordTokenizer, image_bytes, plain_transform, write_shards
from train_cli import ENV, recipe_args
from vlmo_ds.data.pipelines import image_text_loader
from vlmo_ds.parallel.env_readers import free_port
from vlmo_ds.train.__main__ import main

TOK = WordTokenizer()
GOOD = image_bytes(np.zeros((16, 16, 3), np.uint8))


def _bad(folder: Path, shards: int = 2, per_shard: int = 3) -> list[Path]:
    """Shards of junk images and blank captions only."""
    samples = [{"__key__": f"bad{i}", "jpg": b"not an image", "txt": "a caption"} if i % 3 else
               {"__key__": f"bad{i}", "png": GOOD, "txt": "  "} for i in range(shards * per_shard)]
    return write_shards(folder, samples, per_shard=per_shard)


def _loader(folder, **options):
    return image_text_loader(folder, TOK, plain_transform, batch_size=2, text_len=6, open_shards=1, **options)


def test_warning_names_the_shard_and_the_sample_key(tmp_path, caplog):
    samples = [{"__key__": "good0", "png": GOOD, "txt": "a cat"}, {"__key__": "broken", "jpg": b"junk", "txt": "x"},
               {"__key__": "silent", "png": GOOD}, {"__key__": "good1", "png": GOOD, "txt": "a dog"}]
    (shard,) = write_shards(tmp_path, samples, per_shard=4)
    with caplog.at_level(logging.WARNING, logger="vlmo_ds.data.stream"):
        assert next(iter(_loader(tmp_path)))["key"] == ["good0", "good1"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(shard) in w and "sample broken" in w and "bad_image" in w for w in warnings), warnings
    assert any(str(shard) in w and "sample silent" in w and "no_caption" in w for w in warnings), warnings


def test_all_bad_source_stops_with_one_line_on_every_rank_alike(tmp_path):
    from vlmo_ds.data.errors import DataSourceError

    _bad(tmp_path, shards=4)
    messages = []
    for dp_rank in range(4):  # each rank reads its own shard, yet all decide from the same read of the source
        with pytest.raises(DataSourceError) as caught:
            next(iter(_loader(tmp_path, dp_rank=dp_rank, dp_size=4)))
        messages.append(re.sub(r" at 0x[0-9a-f]+", "", str(caught.value)))  # Pillow's message holds an address
    assert len(set(messages)) == 1 and len(messages[0].splitlines()) == 1, messages
    line = messages[0]
    assert str(tmp_path) in line and "bad_image x 8" in line and "no_caption x 4" in line
    assert "shard-000000.tar sample bad1" in line  # an example of what was wrong, where


def test_a_rank_whose_own_shards_are_all_bad_stops_with_one_line_from_its_worker(tmp_path):
    from vlmo_ds.data.errors import DataSourceError

    write_shards(tmp_path / "mixed", [{"__key__": f"ok{i}", "png": GOOD, "txt": "fine"} for i in range(3)],
                 per_shard=3)
    (tmp_path / "mixed" / "sizes.json").unlink()
    _bad(tmp_path / "bad", shards=1)
    (tmp_path / "bad" / "shard-000000.tar").rename(tmp_path / "mixed" / "shard-000001.tar")
    loader = _loader(tmp_path / "mixed", dp_rank=1, dp_size=2, num_workers=1, max_consecutive_skips=20)
    with pytest.raises(DataSourceError) as caught:  # the source check passes (shard 0 is good); rank 1's stream
        next(iter(loader))                          # reads shard 1 only, and gives up in its worker process
    line = str(caught.value)
    assert len(line.splitlines()) == 1 and "in a row" in line and "shard-000001.tar sample bad" in line, line
    assert "Traceback" not in line and "worker process" not in line


def test_training_on_an_all_bad_source_exits_2_with_one_line(run_data, tmp_path, capsys):
    _bad(tmp_path / "bad")
    args = recipe_args(run_data, tmp_path / "run", 2, 4, f"stages.0.data={tmp_path / 'bad'}", "train.num_workers=0")
    assert main(args) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("vlmo_ds.train")]
    assert len(err) == 1 and str(tmp_path / "bad") in err[0] and "bad_image" in err[0], err


@pytest.mark.slow
def test_two_ranks_on_an_all_bad_source_both_stop_at_once(run_data, tmp_path):
    _bad(tmp_path / "bad", shards=2)
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "vlmo_ds.train",
           *recipe_args(run_data, tmp_path / "run", 2, 4, "train.global_batch=8", f"stages.0.data={tmp_path / 'bad'}")]
    started = time.monotonic()
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=240)
    # each rank stops at its first batch with the same line; torchrun ends a rank still starting when the other exits
    lines = {re.sub(r" at 0x[0-9a-f]+", "", line) for line in proc.stderr.splitlines()
             if line.startswith("vlmo_ds.train: data source")}
    assert proc.returncode != 0 and len(lines) == 1 and str(tmp_path / "bad") in lines.pop(), proc.stderr[-3000:]
    assert "DataSourceError" not in proc.stderr and time.monotonic() - started < 120, proc.stderr[-3000:]
