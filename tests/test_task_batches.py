"""Fine-tuning batches from shards: VQA soft-score targets (from raw answers and from the shards' labels), NLVR2
image pairs and labels, one of several captions per retrieval draw, bad samples counted; the answer table's lookup."""
import json

import numpy as np
import pytest
import torch

from shard_fixtures import WordTokenizer, image_bytes, plain_transform, write_shards
from vlmo_ds.data.decode import SampleSkipped
from vlmo_ds.data.synthetic import SyntheticConfig, write_synthetic
from vlmo_ds.data.synthetic.questions import answer_vocabulary
from vlmo_ds.data.task_batches import (Nlvr2Pipeline, RetrievalPipeline, VqaPipeline, dense_targets, nlvr2_loader,
                                       vqa_loader)
from vlmo_ds.tasks.answers import answer_vocab_text, load_answer_vocab
from vlmo_ds.tasks.kinds import build_task_loader

ANSWERS = ["yes", "no", "2", "red", "blue"]
TOK = WordTokenizer()


def _pixels(value: int) -> bytes:
    return image_bytes(np.full((8, 8, 3), value, dtype=np.uint8))


def _vqa_samples() -> list[dict]:
    return [
        {"__key__": "q0", "jpg": _pixels(10),
         "json": {"question_id": 0, "question": "what color is it?", "answers": ["red"] * 7 + ["blue"] * 3}},
        {"__key__": "q1", "jpg": _pixels(20),  # the VQA v2 shards' own targets win over the raw answers
         "json": {"question_id": 1, "question": "how many?", "answers": ["two"] * 10, "labels": [2, 0],
                  "scores": [1.0, 0.3]}},
        {"__key__": "q2", "jpg": _pixels(30), "json": {"question_id": 2, "question": "is it?", "answers": ["maybe"]}},
        {"__key__": "q3", "jpg": _pixels(40), "json": {"question_id": 3, "answers": ["yes"]}},  # no question
    ]


def test_dense_targets():
    targets = dense_targets([[0, 3], [], [4]], [[1.0, 0.3], [], [0.6]], 5)
    assert torch.allclose(targets, torch.tensor([[1.0, 0, 0, 0.3, 0], [0] * 5, [0, 0, 0, 0, 0.6]]))
    with pytest.raises(ValueError, match="2 labels but 1 scores"):
        dense_targets([[0, 1]], [[1.0]], 5)


def test_vqa_pipeline_targets_from_answers_and_from_labels():
    pipe = VqaPipeline(TOK, plain_transform, 6, ANSWERS)
    items = [pipe.expand({k: json.dumps(v).encode() if isinstance(v, dict) else v for k, v in s.items()})[0]
             for s in _vqa_samples()[:3]]
    # 7 humans said red (1.0), 3 said blue (0.9); "two" is normalised to "2" but the shard's labels are used
    assert (items[0]["labels"], items[0]["scores"]) == ([3, 4], [1.0, 0.9])
    assert (items[1]["labels"], items[1]["scores"]) == ([2, 0], [1.0, 0.3])
    assert items[2]["labels"] == []  # no answer in the vocabulary: all-zero targets
    rng = np.random.default_rng(0)
    batch = pipe.collate([pipe.finish(it, rng) for it in items])
    assert torch.allclose(batch["vqa_targets"], torch.tensor([[0, 0, 0, 1.0, 0.9], [0.3, 0, 1.0, 0, 0], [0] * 5]))
    assert batch["text_ids"].shape == (3, 6) and batch["image"].shape == (3, 3, 8, 8)
    assert batch["text_ids"][0, 1].item() == TOK.word_id("what") and batch["key"] == ["q0", "q1", "q2"]
    with pytest.raises(SampleSkipped, match="no question"):
        pipe.expand({"__key__": "q3", "jpg": _pixels(1), "json": b'{"answers": ["yes"]}'})
    with pytest.raises(SampleSkipped, match="outside the 5-answer vocabulary"):
        pipe.expand({"__key__": "q", "jpg": _pixels(1), "json": b'{"question": "a", "labels": [9], "scores": [1]}'})


def test_vqa_loader_counts_bad_samples(tmp_path):
    write_shards(tmp_path, _vqa_samples(), per_shard=2)
    loader = vqa_loader(tmp_path, TOK, plain_transform, ANSWERS, batch_size=3, text_len=6, batches_per_epoch=2)
    batches = list(loader)
    assert len(batches) == 2 and all(b["vqa_targets"].shape == (3, 5) for b in batches)
    assert loader.skipped.get("bad_json", 0) >= 1 and set(k for b in batches for k in b["key"]) <= {"q0", "q1", "q2"}


def _nlvr2_samples() -> list[dict]:
    return [{"__key__": f"p{i}", "left.png": _pixels(10 * i), "right.jpg": _pixels(10 * i + 5),
             "json": {"identifier": f"dev-{i}-0-0", "sentence": "both images have a red shape", "label": i % 2 == 0}}
            for i in range(3)]


def test_nlvr2_pipeline_keeps_left_and_right_and_the_label(tmp_path):
    pipe = Nlvr2Pipeline(TOK, plain_transform, 8)
    samples = [{k: json.dumps(v).encode() if isinstance(v, dict) else v for k, v in s.items()}
               for s in _nlvr2_samples()]
    rng = np.random.default_rng(0)
    batch = pipe.collate([pipe.finish(pipe.expand(s)[0], rng) for s in samples])
    assert batch["label"].tolist() == [1, 0, 1]
    assert batch["image_0"][1].mul(255).round().unique().tolist() == [10.0]
    assert batch["image_1"][1].mul(255).round().unique().tolist() == [15.0]
    unlabelled = dict(samples[0], json=b'{"sentence": "x", "label": null}')
    with pytest.raises(SampleSkipped, match="not true/false"):
        pipe.expand(unlabelled)
    write_shards(tmp_path, _nlvr2_samples(), per_shard=2)
    loader = nlvr2_loader(tmp_path, TOK, plain_transform, batch_size=2, text_len=8, batches_per_epoch=1)
    (first,) = list(loader)
    assert first["image_0"].shape == first["image_1"].shape == (2, 3, 8, 8) and first["label"].dtype == torch.long


def test_retrieval_pipeline_draws_one_caption_per_draw():
    pipe = RetrievalPipeline(TOK, plain_transform, 4)
    captions = ["red", "blue", "green"]
    item = pipe.expand({"__key__": "i0", "jpg": _pixels(5), "json": json.dumps({"captions": captions}).encode()})[0]
    rng = np.random.default_rng(3)
    drawn = [pipe.finish(item, rng)["ids"][1] for _ in range(60)]
    assert set(drawn) == {TOK.word_id(c) for c in captions}
    replay = np.random.default_rng(3)
    assert [pipe.finish(item, replay)["ids"][1] for _ in range(60)] == drawn
    only_txt = pipe.expand({"__key__": "i1", "jpg": _pixels(5), "txt": b"purple"})[0]
    assert [ids[1] for ids, _ in only_txt["encoded"]] == [TOK.word_id("purple")]


def test_task_loader_builder(tmp_path):
    write_shards(tmp_path, _vqa_samples(), per_shard=4)
    common = dict(micro_batch=2, text_len=6, dp_rank=0, dp_size=1, num_workers=0, open_shards=1, seed=0)
    loader = build_task_loader("vqa", tmp_path, TOK, plain_transform, answers=ANSWERS, **common)
    assert next(iter(loader))["vqa_targets"].shape == (2, 5) and loader.batches_per_epoch is None
    with pytest.raises(ValueError, match="answer table"):
        build_task_loader("vqa", tmp_path, TOK, plain_transform, **common)
    with pytest.raises(ValueError, match="unknown fine-tuning task"):
        build_task_loader("caption", tmp_path, TOK, plain_transform, **common)


def test_answer_table_lookup(tmp_path):
    synthetic = tmp_path / "synthetic"
    write_synthetic(synthetic, SyntheticConfig(**{**{s: 0 for s in SyntheticConfig().sizes}, "vqa_train": 2}))
    assert load_answer_vocab(synthetic / "vqa_train") == answer_vocabulary()
    manifest = json.loads((synthetic / "manifest.json").read_text())
    (synthetic / "manifest.json").write_text(json.dumps({**manifest, "version": 1}))
    with pytest.raises(ValueError, match="version 1"):
        load_answer_vocab(synthetic / "vqa_train")
    shards = tmp_path / "vqa" / "val"
    shards.mkdir(parents=True)
    (tmp_path / "vqa" / "answer_vocab.json").write_text(answer_vocab_text(ANSWERS, "test"))
    assert load_answer_vocab(shards) == ANSWERS == load_answer_vocab(tmp_path / "vqa" / "answer_vocab.json")
    (tmp_path / "plain" / "val").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="answer_vocab.json"):
        load_answer_vocab(tmp_path / "plain" / "val")
    with pytest.raises(FileNotFoundError, match="no answer vocabulary"):
        load_answer_vocab(tmp_path / "missing")


def test_synthetic_answer_table():
    table = answer_vocabulary()
    assert table[:7] == ["yes", "no", "0", "1", "2", "3", "4"] and len(table) == len(set(table)) == 24
    assert {"red", "lime", "small", "large", "top", "middle", "bottom"} <= set(table)
