"""The whole data path feeds the model: synthetic shards -> sentencepiece -> loaders with transforms and masking ->
the losses of each pre-training stage, with gradients."""
import math

import pytest

from vlmo_ds.data.hooks import PatchMasking, TextMasking
from vlmo_ds.data.pipelines import image_loader, image_text_loader, text_loader
from vlmo_ds.data.synthetic import SyntheticConfig, write_synthetic
from vlmo_ds.data.tokenizer import SentencePieceTokenizer, train_sentencepiece
from vlmo_ds.data.transforms import build_image_transform
from vlmo_ds.model.config import preset
from vlmo_ds.model.vlmo import VLMo
from vlmo_ds.objectives.pretrain import LossWeights, image_mim_losses, image_text_losses, text_mlm_losses


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic(root, SyntheticConfig(shard_size=50).scaled(0.01))
    captions = [line for p in sorted((root / "text").glob("*.tar")) for line in _texts(p)]
    tok = SentencePieceTokenizer(train_sentencepiece(captions, root / "tok", vocab_size=200))
    return root, tok


def _texts(path):
    import tarfile
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            if member.name.endswith(".txt"):
                yield tar.extractfile(member).read().decode()


def finite_with_grads(model, losses):
    losses["loss"].backward()
    assert all(math.isfinite(v.item()) for v in losses.values())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_image_text_batches_train_the_model(synthetic):
    root, tok = synthetic
    cfg = preset("tiny", vocab_size=tok.vocab_size)
    loader = image_text_loader(root / "pretrain_pairs", tok, build_image_transform(cfg.image_size, train=True),
                               batch_size=4, text_len=cfg.max_text_len, batch_hook=TextMasking.for_tokenizer(tok),
                               batches_per_epoch=1)
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 3, 64, 64) and batch["text_ids"].shape == (4, cfg.max_text_len)
    assert (batch["mlm_labels"] != -100).any(dim=1).all()
    model = VLMo(cfg)
    finite_with_grads(model, image_text_losses(model, batch, LossWeights(), seed=0))


def test_image_only_batches_train_masked_image_modelling(synthetic):
    root, _ = synthetic
    cfg = preset("tiny", mim_targets="pixels")
    loader = image_loader(root / "images", build_image_transform(cfg.image_size, train=True), batch_size=4,
                          batch_hook=PatchMasking(cfg.window, min_block=4), batches_per_epoch=1)
    batch = next(iter(loader))
    assert batch["patch_mask"].sum(dim=1).tolist() == [round(0.4 * cfg.num_patches)] * 4
    model = VLMo(cfg)
    finite_with_grads(model, image_mim_losses(model, batch))
    assert model.transformer.mask_token.grad.abs().sum() > 0


def test_text_only_batches_train_masked_language_modelling(synthetic):
    root, tok = synthetic
    cfg = preset("tiny", vocab_size=tok.vocab_size)
    loader = text_loader(root / "text", tok, batch_size=4, text_len=cfg.max_text_len,
                         batch_hook=TextMasking.for_tokenizer(tok, whole_word=True), batches_per_epoch=1)
    model = VLMo(cfg)
    finite_with_grads(model, text_mlm_losses(model, next(iter(loader))))
