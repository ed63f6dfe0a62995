"""Data of the stages: several sources mixed by weight (deterministic, resumable), visual-token MIM targets from the
shards, and the held-out text MLM score beside its unigram baseline."""
import io
import math
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from shard_fixtures import WordTokenizer, image_bytes, write_shards
from vlmo_ds.config import load_config, model_config
from vlmo_ds.data.hooks import TextMasking
from vlmo_ds.data.pipelines import text_loader
from vlmo_ds.data.tokenizer import load_tokenizer
from vlmo_ds.model.vlmo import VLMo
from vlmo_ds.objectives.pretrain import image_mim_losses
from vlmo_ds.train.mixing import MixedLoader, chunks_per_batch, worker_shares
from vlmo_ds.train.stages import build_loader
from vlmo_ds.train.text_eval import evaluate_text_mlm, held_out_batches

TOK = WordTokenizer()


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    for name in ("a", "b"):
        docs = [{"__key__": f"{name}{i:03d}", "txt": f"{name} doc {i} " + "word " * (i % 5)} for i in range(30)]
        write_shards(root / name, docs, per_shard=10)
    return root


def mixed(root, weights=(3.0, 1.0), chunks=4, chunk=2) -> MixedLoader:
    hook = TextMasking.for_tokenizer(TOK, 0.15)
    loaders = [text_loader(str(root / name), TOK, batch_size=chunk, text_len=12, batch_hook=hook, seed=j,
                           num_workers=0, open_shards=2) for j, name in enumerate(("a", "b"))]
    return MixedLoader(loaders, list(weights), chunks=chunks, seed=5, dp_rank=0)


def take(loader_iter, n):
    return [next(loader_iter) for _ in range(n)]


def test_mix_follows_the_weights_and_is_a_pure_function_of_the_position(sources):
    loader = mixed(sources)
    other = mixed(sources)
    assert [loader.picks(b) for b in range(20)] == [other.picks(b) for b in range(20)]
    other.seed = 6
    assert [loader.picks(b) for b in range(20)] != [other.picks(b) for b in range(20)]
    picks = [s for b in range(500) for s in loader.picks(b)]
    assert abs(picks.count(0) / len(picks) - 0.75) < 0.03
    batch = next(iter(loader))
    assert batch["text_ids"].shape == (8, 12) and batch["mlm_labels"].shape == (8, 12) and len(batch["key"]) == 8
    expected = [src for src in loader.picks(0) for _ in range(2)]
    assert [0 if key.startswith("a") else 1 for key in batch["key"]] == expected


def test_mixed_loader_resumes_exactly(sources):
    whole = iter(mixed(sources))
    first = take(whole, 12)
    killed = mixed(sources)
    it = iter(killed)
    take(it, 7)
    state = killed.state_dict()
    resumed = mixed(sources)
    resumed.load_state_dict(state)
    again = take(iter(resumed), 5)
    assert [b["key"] for b in again] == [b["key"] for b in first[7:12]]
    assert all(torch.equal(x["mlm_ids"], y["mlm_ids"]) for x, y in zip(again, first[7:12]))
    with pytest.raises(ValueError, match="weights"):
        mixed(sources, weights=(1.0, 1.0)).load_state_dict(state)
    with pytest.raises(ValueError, match="not a mixed-loader state"):
        mixed(sources).load_state_dict(state["sources"][0])


def test_chunks_and_worker_shares():
    assert [chunks_per_batch(b) for b in (32, 12, 4, 7)] == [8, 4, 4, 1]
    assert worker_shares(8, [3.0, 0.86, 0.57, 5.4]) == [2, 1, 1, 4] and worker_shares(0, [1.0, 2.0]) == [0, 0]


class Echo(nn.Module):
    """Predicts, at every position, the token it is given: right exactly where the masking kept the original."""

    def forward(self, fn, *args):
        return fn(self, *args)

    def encode_text(self, ids, mask):
        return SimpleNamespace(hidden=F.one_hot(ids, TOK.vocab_size).float())

    def mlm_logits(self, hidden):
        return hidden


def test_held_out_accuracy_and_unigram_baseline(sources):
    batches = held_out_batches(str(sources / "a"), TOK, 8, 4, 0.5, whole_word=True)
    again = held_out_batches(str(sources / "a"), TOK, 8, 4, 0.5, whole_word=True)
    assert all(torch.equal(x["mlm_ids"], y["mlm_ids"]) for x, y in zip(batches, again))  # fixed masking
    ids = torch.cat([b["mlm_ids"] for b in batches])
    labels = torch.cat([b["mlm_labels"] for b in batches])
    picked = labels != -100
    found = evaluate_text_mlm(Echo(), batches, TOK.vocab_size)
    assert found["masked"] == picked.sum().item()
    assert found["accuracy"] == pytest.approx((ids[picked] == labels[picked]).float().mean().item())
    assert 0 < found["accuracy"] < 0.5  # 80% of the chosen tokens are [MASK], which is never the label
    top = Counter(labels[picked].tolist()).most_common(1)[0][1]
    assert found["unigram"] == pytest.approx(top / picked.sum().item())


def test_a_stage_with_two_image_text_sources_mixes_real_shards(run_data):
    pairs, extra = run_data / "pretrain_pairs", run_data / "retrieval_train"
    cfg = load_config("tiny", [f"tokenizer={run_data / 'tok.model'}",
                                         f"stages.2.data=[{{shards: {pairs}, weight: 1.0}}, {{shards: {extra}}}]"])
    tokenizer = load_tokenizer(cfg.tokenizer)
    loader = build_loader(cfg.stages[2], model_config(cfg, tokenizer.vocab_size, stage=2), tokenizer, micro_batch=8,
                          dp_rank=0, dp_size=1, num_workers=0, open_shards=2, seed=0)
    assert isinstance(loader, MixedLoader) and loader.chunks == 8
    batch = next(iter(loader))
    assert batch["image"].shape == (8, 3, 64, 64) and batch["mlm_ids"].shape == (8, 16) and len(batch["meta"]) == 8
    from_extra = ["captions" in meta for meta in batch["meta"]]  # retrieval_train samples carry caption lists
    assert from_extra == [source == 1 for source in loader.picks(0)]


def test_mim_stage_reads_visual_tokens_from_the_shards(run_data, tmp_path):
    rng = np.random.default_rng(0)
    samples = []
    for i in range(6):
        ids = io.BytesIO()
        np.save(ids, rng.integers(0, 8192, size=(4, 4)))
        samples.append({"__key__": f"im{i}", "png": image_bytes(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)),
                        "vtok.npy": ids.getvalue()})
    write_shards(tmp_path / "images", samples, per_shard=3)
    cfg = load_config("tiny", [f"tokenizer={run_data / 'tok.model'}", f"stages.0.data={tmp_path / 'images'}",
                                         "stages.0.mim_target=tokens"])
    tokenizer = load_tokenizer(cfg.tokenizer)
    model_cfg = model_config(cfg, tokenizer.vocab_size, stage=0)
    assert model_cfg.mim_targets == "tokens" and model_config(cfg, tokenizer.vocab_size, stage=1).mim_targets is None
    loader = build_loader(cfg.stages[0], model_cfg, tokenizer, micro_batch=4, dp_rank=0, dp_size=1, num_workers=0,
                          open_shards=2, seed=0)
    batch = next(iter(loader))
    assert batch["vtok"].shape == (4, 16) and batch["patch_mask"].sum(1).tolist() == [6] * 4  # 40% of 16 patches
    torch.manual_seed(0)
    out = image_mim_losses(VLMo(model_cfg), batch)
    assert set(out) == {"loss", "mim", "mim_acc"} and out["loss"].item() == pytest.approx(math.log(8192), rel=0.1)
