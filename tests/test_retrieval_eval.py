"""Retrieval evaluation: recall@K by hand (ties, several captions per image), exact chance levels, the shard index,
evaluate_retrieval against a direct computation, and 2 gloo ranks against 1."""
import io
import json
import random
from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image

from distributed import run_ranks
from shard_fixtures import WordTokenizer, image_bytes, write_shards
from vlmo_ds.data.transforms import build_image_transform
from vlmo_ds.eval import metrics as eval_metrics
from vlmo_ds.eval.metrics import format_table, image_retrieval_ranks, recall_at_k, text_retrieval_ranks
from vlmo_ds.eval.retrieval import evaluate_retrieval, iter_images, load_retrieval_set
from vlmo_ds.model.config import preset
from vlmo_ds.model.vlmo import VLMo

# 3 images, 4 texts; image 0 owns t0 and t1.
SIM = torch.tensor([[0.1, 0.9, 0.5, 0.2],
                    [0.8, 0.3, 0.4, 0.1],
                    [0.2, 0.6, 0.7, 0.9]])
OWNERS = torch.tensor([0, 0, 1, 2])


def test_recall_by_hand_with_several_captions_per_image():
    # TR ranks: i0 best caption t1 (0.9) beats every wrong text -> 1; i1's t2 (0.4) is below t0 (0.8) -> 2; i2 -> 1.
    assert text_retrieval_ranks(SIM, OWNERS).tolist() == [1, 2, 1]
    # IR ranks: t0 0.1 is the lowest of its column -> 3; t1 -> 1; t2 0.4 below 0.5 and 0.7 -> 3; t3 -> 1.
    assert image_retrieval_ranks(SIM, OWNERS).tolist() == [3, 1, 3, 1]
    m = recall_at_k(SIM, OWNERS, ks=(1, 2, 3))
    expected = {"tr@1": 2 / 3, "tr@2": 1.0, "tr@3": 1.0, "ir@1": 0.5, "ir@2": 0.5, "ir@3": 1.0,
                "r_mean": 7 / 9,
                # IR: K / I.  TR: mean over images of 1 - C(4 - c, K) / C(4, K) with c = 2, 1, 1.
                "chance_ir@1": 1 / 3, "chance_ir@2": 2 / 3, "chance_ir@3": 1.0,
                "chance_tr@1": 1 / 3, "chance_tr@2": 11 / 18, "chance_tr@3": 5 / 6}
    assert m == pytest.approx(expected, abs=1e-12)
    assert set(recall_at_k(SIM, OWNERS)) >= {"tr@1", "tr@5", "tr@10", "ir@1", "ir@5", "ir@10"}


def test_ties_count_against_the_model():
    flat = torch.zeros(2, 2)
    m = recall_at_k(flat, torch.tensor([0, 1]), ks=(1, 2))
    assert (m["tr@1"], m["tr@2"], m["ir@1"], m["ir@2"]) == (0.0, 1.0, 0.0, 1.0)
    # Image 0's two captions tie with each other (harmless) and one of them with a wrong caption (rank 2).
    sim = torch.tensor([[0.5, 0.5, 0.5], [0.0, 0.0, 1.0]])
    assert text_retrieval_ranks(sim, torch.tensor([0, 0, 1])).tolist() == [2, 1]
    sim = torch.tensor([[0.5, 0.5, 0.2], [0.1, 0.0, 1.0]])
    assert text_retrieval_ranks(sim, torch.tensor([0, 0, 1])).tolist() == [1, 1]
    # Caption 0's own image ties with image 1: rank 2.
    assert image_retrieval_ranks(torch.tensor([[0.3], [0.3], [0.1]]), torch.tensor([0])).tolist() == [2]


def _brute_force_ranks(sim, owners):
    """Sort with wrong items first among equal scores; the rank is the first right item's position."""
    tr = []
    for i in range(sim.shape[0]):
        order = sorted(range(sim.shape[1]), key=lambda t: (-sim[i, t].item(), owners[t].item() == i))
        hits = [pos for pos, t in enumerate(order, 1) if owners[t] == i]
        tr.append(hits[0] if hits else 0)
    ir = []
    for t in range(sim.shape[1]):
        order = sorted(range(sim.shape[0]), key=lambda i: (-sim[i, t].item(), i == owners[t].item()))
        ir.append(order.index(owners[t].item()) + 1)
    return tr, ir


def test_ranks_match_brute_force_with_many_ties_and_chunking(monkeypatch):
    g = torch.Generator().manual_seed(0)
    sim = torch.randint(0, 4, (9, 20), generator=g).float()  # four score levels: ties everywhere
    owners = torch.randint(0, 8, (20,), generator=g)  # image 8 (and maybe others) have no caption
    tr, ir = _brute_force_ranks(sim, owners)
    assert text_retrieval_ranks(sim, owners).tolist() == tr
    assert image_retrieval_ranks(sim, owners).tolist() == ir
    monkeypatch.setattr(eval_metrics, "_ROW_CHUNK", 2)
    assert text_retrieval_ranks(sim, owners).tolist() == tr
    assert image_retrieval_ranks(sim, owners).tolist() == ir
    captioned = [r for r in tr if r > 0]
    assert recall_at_k(sim, owners, ks=(3,))["tr@3"] == pytest.approx(sum(r <= 3 for r in captioned) / len(captioned))


def test_chance_tr_is_exact_hypergeometric():
    owners = torch.tensor([0] * 5 + [1] * 5 + [2] * 2)  # 12 texts
    chance = recall_at_k(torch.randn(4, 12), owners, ks=(1, 5))  # image 3 is a distractor
    def hit(c, k):
        miss = Fraction(1)
        for j in range(k):
            miss *= Fraction(12 - c - j, 12 - j)
        return 1 - miss
    assert chance["chance_tr@5"] == pytest.approx(float((hit(5, 5) * 2 + hit(2, 5)) / 3), abs=1e-12)
    assert chance["chance_tr@1"] == pytest.approx(4 / 12)
    assert chance["chance_ir@1"] == 0.25 and chance["chance_ir@5"] == 1.0


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="NaN"):
        recall_at_k(torch.tensor([[float("nan")]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="one entry per text"):
        recall_at_k(SIM, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="outside"):
        recall_at_k(SIM, torch.tensor([0, 0, 1, 3]))


def test_format_table():
    m = recall_at_k(SIM, OWNERS, ks=(1, 2, 3))
    m.update(num_images=3, num_texts=4)
    assert format_table(m).splitlines() == [
        "                  R@1            R@2            R@3",
        "TR (image->text)  66.67 (33.33)  100.00 (61.11) 100.00 (83.33)",
        "IR (text->image)  50.00 (33.33)  50.00 (66.67)  100.00 (100.00)",
        "recall % (chance %); mean recall 77.78; 3 images, 4 texts",
    ]
    with pytest.raises(ValueError, match="tr@K"):
        format_table({"loss": 1.0})


# ---- shards -> model -> metrics -------------------------------------------------------------------------------------
CFG = preset("tiny", drop_path_rate=0.0)
WORDS = "red blue green small large circle square triangle left right above below".split()


def _samples(num_images: int) -> list[dict]:
    rng = random.Random(1)
    out = []
    for i in range(num_images):
        pixels = np.random.default_rng(i).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        captions = [" ".join(rng.choices(WORDS, k=rng.randint(3, 8))) for _ in range(rng.randint(1, 3))]
        sample = {"__key__": f"{i:06d}", "png": image_bytes(pixels), "txt": captions[0]}
        if i % 3 != 2:  # every third sample has only its .txt (one caption), as plain img2dataset output
            sample["json"] = {"captions": captions, "image_id": 100 + i}
        out.append(sample)
    return out


def _write(folder, num_images: int) -> list[dict]:
    samples = _samples(num_images)
    bad = {"__key__": "zzz_nocaption", "png": samples[0]["png"]}  # no caption: skipped by the index
    write_shards(folder, samples[:3] + [bad] + samples[3:], per_shard=4)
    return samples


def _model():
    torch.manual_seed(0)
    return VLMo(CFG)


def test_index_keeps_the_samples_before_a_cut_in_a_shard(tmp_path):
    _write(tmp_path, 7)  # shards of 4 samples: 0 1 2 bad | 3 4 5 6
    second = tmp_path / "shard-000001.tar"
    second.write_bytes(second.read_bytes()[:len(second.read_bytes()) // 2])
    data = load_retrieval_set(tmp_path)
    assert data.skipped["truncated_tar"] == 1
    assert [e.key for e in data.images][:3] == ["000000", "000001", "000002"] and 3 <= len(data.images) < 7


def test_index_reads_captions_in_order(tmp_path):
    samples = _write(tmp_path, 7)
    data = load_retrieval_set(tmp_path)
    assert [e.key for e in data.images] == [s["__key__"] for s in samples]
    expected = [json.loads(json.dumps(s["json"]))["captions"] if "json" in s else [s["txt"]] for s in samples]
    assert data.captions == [c for caps in expected for c in caps]
    assert data.text_to_image.tolist() == [i for i, caps in enumerate(expected) for _ in caps]
    assert data.images[0].image_id == 100 and data.images[2].image_id == "000002"
    assert dict(data.skipped) == {"no_caption": 1}
    transform = build_image_transform(CFG.image_size, train=False)
    first = next(iter_images(data.images[4:5], transform))
    assert first.shape == (3, 64, 64)
    direct = transform(Image.open(io.BytesIO(samples[4]["png"])).convert("RGB"))
    assert torch.equal(first, direct)


def _direct_metrics(model, samples_dir):
    """Encode everything in one batch by hand: what evaluate_retrieval must reproduce."""
    data = load_retrieval_set(samples_dir)
    transform = build_image_transform(CFG.image_size, train=False)
    images = torch.stack(list(iter_images(data.images, transform)))
    text = WordTokenizer().batch_encode(data.captions, CFG.max_text_len)
    with torch.no_grad():
        img = model.itc_image(model.encode_image(images))[0]
        txt = model.itc_text(model.encode_text(text["text_ids"], text["text_mask"]))[0]
    return recall_at_k(img @ txt.t(), data.text_to_image)


def test_evaluate_retrieval_matches_direct_computation(tmp_path):
    samples = _write(tmp_path, 7)
    model = _model()
    model.train()
    metrics = evaluate_retrieval(model, tmp_path, WordTokenizer(), CFG.image_size, CFG.max_text_len, batch_size=3)
    assert model.training  # mode restored
    num_texts = sum(len(s["json"]["captions"]) if "json" in s else 1 for s in samples)
    assert (metrics["num_images"], metrics["num_texts"], metrics["skipped_samples"]) == (7, num_texts, 1)
    assert all(0.0 <= metrics[k] <= 1.0 for k in metrics if "@" in k or k == "r_mean")
    assert metrics["seconds"] > 0
    model.eval()
    direct = _direct_metrics(model, tmp_path)
    assert {k: metrics[k] for k in direct} == pytest.approx(direct)
    evaluate_retrieval(model, tmp_path, WordTokenizer(), CFG.image_size, CFG.max_text_len)
    assert not model.training


def _rank_fn(rank, world, folder):
    model = _model()
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(args[0].__name__))
    metrics = evaluate_retrieval(model, folder, WordTokenizer(), CFG.image_size, CFG.max_text_len, batch_size=3,
                                 rank=rank, world_size=world)
    return metrics, calls


@pytest.mark.slow
def test_two_ranks_give_the_single_rank_metrics(tmp_path):
    _write(tmp_path, 7)
    single = evaluate_retrieval(_model(), tmp_path, WordTokenizer(), CFG.image_size, CFG.max_text_len, batch_size=3)
    results = run_ranks(_rank_fn, 2, str(tmp_path))
    keys = [k for k in single if k != "seconds"]
    for metrics, _ in results:
        assert {k: metrics[k] for k in keys} == pytest.approx({k: single[k] for k in keys})
    # 7 images split 3 / 4 in batches of 3: rank 0 runs one dummy batch so both ranks call the model equally often.
    (_, calls0), (_, calls1) = results
    assert calls0 == calls1 and calls0.count("_image_features") == 2
