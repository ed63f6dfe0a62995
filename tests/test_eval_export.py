"""Embedding export: ids and vectors read back equal the features computed directly, shard layout and manifest,
float16, a missing manifest refused, and 2 gloo ranks writing the same files as 1."""
import json

import pytest
import torch
from safetensors import safe_open

from distributed import run_ranks
from shard_fixtures import WordTokenizer
from test_retrieval_eval import _write as write_retrieval
from vlmo_ds.data.transforms import build_image_transform
from vlmo_ds.eval.export import export_embeddings, read_embeddings
from vlmo_ds.eval.retrieval import iter_images, load_retrieval_set
from vlmo_ds.model.config import preset
from vlmo_ds.model.vlmo import VLMo

CFG = preset("tiny", drop_path_rate=0.0)


def _model():
    torch.manual_seed(0)
    return VLMo(CFG).eval()


def _direct(folder):
    model = _model()
    data = load_retrieval_set(folder)
    images = torch.stack(list(iter_images(data.images, build_image_transform(CFG.image_size, train=False))))
    text = WordTokenizer().batch_encode(data.captions, CFG.max_text_len)
    with torch.no_grad():
        return (data, model.itc_image(model.encode_image(images))[0],
                model.itc_text(model.encode_text(text["text_ids"], text["text_mask"]))[0])


def test_export_round_trip(tmp_path):
    samples = write_retrieval(tmp_path / "set", 7)
    manifest = export_embeddings(_model(), tmp_path / "set", WordTokenizer(), tmp_path / "out", CFG.image_size,
                                 CFG.max_text_len, batch_size=2, shard_rows=3)
    data, image_feats, text_feats = _direct(tmp_path / "set")
    assert manifest["image"]["shards"] == ["image-000000.safetensors", "image-000001.safetensors",
                                           "image-000002.safetensors"]
    assert manifest["image"]["count"] == 7 and manifest["text"]["count"] == len(data.captions)
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == manifest
    ids, vectors, extra = read_embeddings(tmp_path / "out", "image")
    expected_ids = [s["json"]["image_id"] if "json" in s else s["__key__"] for s in samples]
    assert ids == expected_ids and torch.allclose(vectors, image_feats, atol=1e-6)
    assert torch.allclose(vectors.norm(dim=1), torch.ones(7), atol=1e-5)
    ids, vectors, extra = read_embeddings(tmp_path / "out", "text")
    assert ids == list(range(len(data.captions))) and torch.allclose(vectors, text_feats, atol=1e-6)
    assert extra["captions"] == data.captions
    assert extra["image_ids"] == [expected_ids[i] for i in data.text_to_image.tolist()]
    with safe_open(str(tmp_path / "out" / "image-000001.safetensors"), framework="pt") as handle:
        assert handle.get_tensor("rows").tolist() == [3, 4, 5]


def test_export_in_float16_and_errors(tmp_path):
    write_retrieval(tmp_path / "set", 4)
    export_embeddings(_model(), tmp_path / "set", WordTokenizer(), tmp_path / "out", CFG.image_size,
                      CFG.max_text_len, dtype="float16")
    _, vectors, _ = read_embeddings(tmp_path / "out", "image")
    assert vectors.dtype == torch.float16 and vectors.shape == (4, CFG.dim)
    with pytest.raises(ValueError, match="dtype"):
        export_embeddings(_model(), tmp_path / "set", WordTokenizer(), tmp_path / "x", CFG.image_size,
                          CFG.max_text_len, dtype="int8")
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        read_embeddings(tmp_path / "set", "image")


def _rank_fn(rank, world, folder, out):
    model = _model()
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(args[0].__name__))
    export_embeddings(model, folder, WordTokenizer(), out, CFG.image_size, CFG.max_text_len, batch_size=2,
                      shard_rows=3, rank=rank, world_size=world)
    return calls


@pytest.mark.slow
def test_two_ranks_write_what_one_writes(tmp_path):
    write_retrieval(tmp_path / "set", 7)
    export_embeddings(_model(), tmp_path / "set", WordTokenizer(), tmp_path / "one", CFG.image_size,
                      CFG.max_text_len, batch_size=2, shard_rows=3)
    calls0, calls1 = run_ranks(_rank_fn, 2, str(tmp_path / "set"), str(tmp_path / "two"))
    assert calls0 == calls1  # lockstep: ZeRO-3 gathers need every rank in the same call
    for kind in ("image", "text"):
        ids1, vectors1, extra1 = read_embeddings(tmp_path / "one", kind)
        ids2, vectors2, extra2 = read_embeddings(tmp_path / "two", kind)
        assert ids1 == ids2 and extra1 == extra2 and torch.allclose(vectors1, vectors2, atol=1e-6)
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == sorted(p.name for p in (tmp_path / "two").iterdir())
