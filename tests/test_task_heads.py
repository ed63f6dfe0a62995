"""Fine-tuning heads, losses and task models: published key names and shapes, hand-computed VQA / NLVR2 / retrieval
losses, the NLVR2 type row grown from the image row, fine-tuning at a new image size, head learning rates."""
import math

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from vlmo_ds.model import relative_position as rp
from vlmo_ds.model.config import preset
from vlmo_ds.model.flops import block_flops, patch_embed_flops
from vlmo_ds.model.published import export_published, import_published
from vlmo_ds.model.vlmo import VLMo
from vlmo_ds.objectives.itc import contrastive_loss
from vlmo_ds.tasks.heads import attach_head, head_answers
from vlmo_ds.tasks.kinds import task_loss_function, task_samples_and_tokens, task_step_flops
from vlmo_ds.tasks.nlvr2 import nlvr2_logits, nlvr2_losses
from vlmo_ds.tasks.optim import split_head_groups
from vlmo_ds.tasks.retrieval import retrieval_losses
from vlmo_ds.tasks.start import build_task_model, grow_type_rows, load_task_weights, task_model_config
from vlmo_ds.tasks.vqa import soft_score, vqa_bce, vqa_losses
from vlmo_ds.train.engine import set_lr
from vlmo_ds.train.optim import param_groups

TINY = preset("tiny", vocab_size=64, patch_size=16, max_text_len=8, drop_path_rate=0.0)  # D 128, 4x4 patches


def _model(task: str = "retrieval", cfg=TINY, answers: int | None = None) -> VLMo:
    torch.manual_seed(0)
    return build_task_model(task_model_config(cfg, task), task, answers)


def _batch(b: int = 3, cfg=TINY, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, cfg.vocab_size, (b, cfg.max_text_len), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    images = torch.randn(b, 3, cfg.image_size, cfg.image_size, generator=g)
    return {"text_ids": ids, "text_mask": mask, "image": images, "image_0": images,
            "image_1": torch.randn(b, 3, cfg.image_size, cfg.image_size, generator=g)}


def test_heads_have_the_published_keys_and_shapes():
    vqa = _model("vqa", answers=7)
    shapes = {k: tuple(v.shape) for k, v in vqa.state_dict().items() if k.startswith("vqa_classifier")}
    assert shapes == {"vqa_classifier.0.weight": (256, 128), "vqa_classifier.0.bias": (256,),
                      "vqa_classifier.1.weight": (256,), "vqa_classifier.1.bias": (256,),
                      "vqa_classifier.3.weight": (7, 256), "vqa_classifier.3.bias": (7,)}
    assert head_answers(vqa.state_dict()) == 7 and head_answers({}) is None
    nlvr2 = _model("nlvr2")
    shapes = {k: tuple(v.shape) for k, v in nlvr2.state_dict().items() if k.startswith("nlvr2_classifier")}
    assert shapes == {"nlvr2_classifier.0.weight": (256, 256), "nlvr2_classifier.0.bias": (256,),
                      "nlvr2_classifier.1.weight": (256,), "nlvr2_classifier.1.bias": (256,),
                      "nlvr2_classifier.3.weight": (2, 256), "nlvr2_classifier.3.bias": (2,)}
    assert nlvr2.token_type_embeddings.weight.shape == (3, 128)
    # published init: N(0, 0.02) weights, zero biases, unit LayerNorm
    head = nlvr2.nlvr2_classifier
    assert head[0].bias.abs().sum() == 0 and torch.equal(head[1].weight, torch.ones(256))
    assert 0.015 < head[0].weight.std().item() < 0.025
    assert not any(k.startswith(("vqa_", "nlvr2_")) for k in _model().state_dict())


def test_heads_travel_through_the_published_layout():
    source = _model("vqa", answers=5)
    exported = export_published(source)
    assert {"vqa_classifier.0.weight", "vqa_classifier.1.bias", "vqa_classifier.3.weight"} <= set(exported)
    target = _model("vqa", answers=5)
    for p in target.vqa_classifier.parameters():
        p.data.zero_()
    report = import_published(target, exported)
    assert not report.problems()
    assert torch.equal(target.vqa_classifier[3].weight, source.vqa_classifier[3].weight)


def test_attach_head_refuses_what_cannot_be_meant():
    model = VLMo(TINY)
    with pytest.raises(ValueError, match="num_answers"):
        attach_head(model, "vqa")
    with pytest.raises(ValueError, match="unknown fine-tuning task"):
        attach_head(model, "captioning")
    attach_head(model, "vqa", 4)
    with pytest.raises(ValueError, match="another shape"):
        attach_head(model, "vqa", 5)
    assert attach_head(model, "retrieval") is None
    with pytest.raises(ValueError, match="num_modality_types=3"):
        build_task_model(TINY, "nlvr2")


def test_vqa_loss_by_hand():
    logits = torch.tensor([[0.0, math.log(3.0)]])
    targets = torch.tensor([[1.0, 0.3]])
    # BCE(0, 1) = ln 2; BCE(ln 3, 0.3) = softplus(ln 3) - 0.3 ln 3 = ln 4 - 0.3 ln 3; mean x 2 answers
    assert vqa_bce(logits, targets).item() == pytest.approx(3 * math.log(2) - 0.3 * math.log(3), abs=1e-6)
    scores = torch.tensor([[0.0, 0.3, 1.0], [0.9, 0.0, 0.0]])
    assert soft_score(torch.tensor([[0.0, 2.0, 1.0], [5.0, 1.0, 1.0]]), scores).item() == pytest.approx(0.6)


def test_vqa_losses_run_the_fused_pass_and_the_head():
    model = _model("vqa", answers=4)
    batch = _batch()
    batch["vqa_targets"] = torch.tensor([[1.0, 0, 0, 0], [0, 0.3, 0.9, 0], [0, 0, 0, 0]])
    out = vqa_losses(model, batch, seed=0)
    fused = model.encode_pair(batch["text_ids"], batch["text_mask"], batch["image"])
    logits = model.vqa_classifier(model.pooler(fused))
    expected = F.binary_cross_entropy_with_logits(logits, batch["vqa_targets"]) * 4
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert out["loss"].requires_grad and not out["vqa_score"].requires_grad
    assert task_loss_function("vqa") is vqa_losses


def test_nlvr2_two_passes_with_image_types_one_and_two():
    model = _model("nlvr2")
    batch = _batch()
    batch["label"] = torch.tensor([1, 0, 1])
    logits = nlvr2_logits(model, batch["text_ids"], batch["text_mask"], batch["image_0"], batch["image_1"])
    pooled = [model.pooler(model.encode_pair(batch["text_ids"], batch["text_mask"], batch[f"image_{i}"],
                                             image_type=i + 1)) for i in (0, 1)]
    assert torch.allclose(logits, model.nlvr2_classifier(torch.cat(pooled, dim=-1)), atol=1e-6)
    out = nlvr2_losses(model, batch, seed=0)
    assert out["loss"].item() == pytest.approx(F.cross_entropy(logits, batch["label"]).item(), rel=1e-6)
    assert out["nlvr2_acc"].item() == pytest.approx((logits.argmax(-1) == batch["label"]).float().mean().item())
    # the second pass reads row 2 of the type table: changing it changes the logits (not by a constant: every
    # LayerNorm would take a shift of all features away)
    with torch.no_grad():
        row = model.token_type_embeddings.weight[2]
        row += torch.linspace(-1.0, 1.0, row.numel())
    assert not torch.allclose(logits, nlvr2_logits(model, batch["text_ids"], batch["text_mask"], batch["image_0"],
                                                   batch["image_1"]))


def test_nlvr2_type_row_two_starts_as_a_copy_of_row_one():
    source = VLMo(TINY)
    state = source.state_dict()
    grown = grow_type_rows(state)
    table = state["token_type_embeddings.weight"]
    assert grown["token_type_embeddings.weight"].shape == (3, 128)
    assert torch.equal(grown["token_type_embeddings.weight"][:2], table)
    assert torch.equal(grown["token_type_embeddings.weight"][2], table[1])
    assert grow_type_rows(grown) is grown and state["token_type_embeddings.weight"].shape == (2, 128)
    model = _model("nlvr2")
    report = load_task_weights(model, state, "nlvr2", TINY)
    assert torch.equal(model.token_type_embeddings.weight[2], table[1])
    assert sorted(report.kept_init) == sorted(k for k in model.state_dict() if k.startswith("nlvr2_classifier"))
    # with row 2 = row 1 the second image is seen as the first would be
    batch = _batch()
    with torch.no_grad():
        first = model.encode_pair(batch["text_ids"], batch["text_mask"], batch["image_1"], image_type=1)
        second = model.encode_pair(batch["text_ids"], batch["text_mask"], batch["image_1"], image_type=2)
    assert torch.equal(first, second)


def test_fine_tuning_at_a_larger_image_interpolates_the_relative_table():
    source = VLMo(TINY)
    cfg = task_model_config(TINY, "vqa", image_size=128)  # 4x4 -> 8x8 patches
    assert cfg.image_size == 128 and cfg.num_modality_types == 2
    model = build_task_model(cfg, "vqa", 3)
    report = load_task_weights(model, source.state_dict(), "vqa", TINY)
    table = source.relative_position_bias_table.detach()
    assert torch.equal(model.relative_position_bias_table.detach(), rp.resize_image_rows(table, 4, 8))
    assert any("relative_position_bias_table" in line for line in report.resized)
    with torch.no_grad():
        logits = vqa_losses(model, {**_batch(2, cfg), "vqa_targets": torch.zeros(2, 3)}, 0)["loss"]
    assert torch.isfinite(logits)


def test_retrieval_loss_is_main_path_itc():
    model = _model()
    batch = _batch(4)
    out = retrieval_losses(model, batch, seed=0)
    image = model.itc_image(model.encode_image(batch["image"]))[0]
    text = model.itc_text(model.encode_text(batch["text_ids"], batch["text_mask"]))[0]
    expected = contrastive_loss(image, text, model.logit_scale).loss
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    out["loss"].backward()
    assert model.itc_vl_image_proj.fc.weight.grad is None and model.itc_image_proj.fc.weight.grad is not None
    assert out["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-5)


def test_head_learning_rate_multiplier():
    model = _model("vqa", answers=3)
    groups = split_head_groups(param_groups(model, 0.01), model, 20.0)
    assert [g["name"] for g in groups] == ["decay", "decay_head", "no_decay", "no_decay_head"]
    head_ids = {id(p) for p in model.vqa_classifier.parameters()}
    assert {id(p) for g in groups if "lr_scale" in g for p in g["params"]} == head_ids
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    engine = SimpleNamespace(optimizer=torch.optim.AdamW(groups))  # the trainer's setter, on a real optimizer
    set_lr(engine, 1e-4)
    assert [g["lr"] for g in engine.optimizer.param_groups] == pytest.approx([1e-4, 2e-3, 1e-4, 2e-3])
    assert groups[1]["weight_decay"] == 0.01 and groups[3]["weight_decay"] == 0.0
    with pytest.raises(ValueError, match="positive"):
        split_head_groups(groups, model, 0.0)


def test_samples_and_tokens():
    assert task_samples_and_tokens("vqa", TINY, 4) == (4, 4 * (8 + 17))
    assert task_samples_and_tokens("nlvr2", TINY, 4) == (4, 8 * (8 + 17))


def test_step_flops():
    fused = TINY.depth * block_flops(TINY, 8 + 17)
    assert task_step_flops("vqa", TINY, 2) == 3 * 2 * fused + 2 * 2 * patch_embed_flops(TINY)
    assert task_step_flops("nlvr2", TINY, 2) == 2 * task_step_flops("vqa", TINY, 2)
    assert 0 < task_step_flops("retrieval", TINY, 2) < task_step_flops("vqa", TINY, 2)
