"""The MoME model: published sizes, the three paths, attention numerics, padding, drop path."""
import math

import pytest
import torch
import torch.nn.functional as F

from vlmo_ds.model.attention import SDPA, AttentionInputs
from vlmo_ds.model.config import ModelConfig, preset
from vlmo_ds.model.vlmo import PassInputs, VLMo


def count(model: VLMo) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name, published", [("base", 202_445_470), ("large", 599_127_102)])
def test_published_parameter_counts(name, published):
    with torch.device("meta"):
        model = VLMo(preset(name))
    unused_text_positions = model.cfg.max_text_len * model.cfg.dim  # in the published files, never used
    assert count(model) + unused_text_positions == published


@pytest.mark.parametrize("name", ["giant", "huge2b"])
def test_presets_past_large_build_on_meta(name):
    with torch.device("meta"):
        model = VLMo(preset(name))
    assert count(model) > 1.5e9
    assert sum(b.with_vl for b in model.transformer.blocks) == model.cfg.depth - model.cfg.vlffn_start


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="not divisible by heads"):
        ModelConfig(dim=100, heads=3)
    with pytest.raises(ValueError, match="unknown model preset"):
        preset("enormous")
    with pytest.raises(ValueError, match="unknown model field"):
        preset("tiny", hidden=3)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = VLMo(preset("tiny", drop_path_rate=0.0)).eval()
    with torch.no_grad():  # random biases, gammas and relative table, so that every term matters
        model.relative_position_bias_table.normal_(0, 0.5)
        for block in model.transformer.blocks:
            block.attn.q_bias.normal_(0, 0.1)
            block.attn.v_bias.normal_(0, 0.1)
    return model


def text_batch(cfg, batch=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, cfg.vocab_size, (batch, cfg.max_text_len), generator=g)
    mask = torch.ones_like(ids)
    for b in range(batch):
        mask[b, cfg.max_text_len - 4 * b - 1 :] = 0
    return ids.masked_fill(mask == 0, 0), mask


def explicit_attention(attn, x, bias):
    """The published formula: q*scale @ k^T in fp32, + bias, softmax, @ v."""
    b, n, d = x.shape
    qkv = F.linear(x, attn.qkv.weight, torch.cat([attn.q_bias, torch.zeros_like(attn.v_bias), attn.v_bias]))
    q, k, v = qkv.reshape(b, n, 3, attn.local_heads, -1).permute(2, 0, 3, 1, 4)
    logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1) + bias
    return attn.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d))


def test_sdpa_attention_matches_the_published_formula(tiny):
    cfg = tiny.cfg
    ids, mask = text_batch(cfg)
    image = torch.randn(3, 3, cfg.image_size, cfg.image_size)
    x = torch.cat([tiny.embed_text(ids), tiny.embed_image(image)], dim=1)
    inputs = tiny.attention_inputs("fused", PassInputs(text_mask=mask), x.device)
    table = tiny.layer_table(1)
    key_mask = torch.cat([mask, mask.new_ones(3, cfg.image_len)], dim=1)
    padding = torch.zeros(key_mask.shape).masked_fill(key_mask == 0, float("-inf"))[:, None, None]
    bias = table[tiny.fused_index].permute(2, 0, 1)[None] + padding  # the dense [B, H, N, N] bias of old
    block = tiny.transformer.blocks[1]
    with torch.no_grad():
        assert torch.allclose(block.attn(x, inputs, table), explicit_attention(block.attn, x, bias), atol=1e-6)


def test_padding_never_changes_real_tokens(tiny):
    cfg = tiny.cfg
    ids, mask = text_batch(cfg)
    image = torch.randn(3, 3, cfg.image_size, cfg.image_size)
    other = ids.masked_fill(mask == 0, 7)  # different ids in the padded positions
    with torch.no_grad():
        a, b = tiny.encode_pair(ids, mask, image), tiny.encode_pair(other, mask, image)
        ta, tb = tiny.encode_text(ids, mask).hidden, tiny.encode_text(other, mask).hidden
    valid = torch.cat([mask, mask.new_ones(3, cfg.image_len)], 1).bool()
    assert torch.equal(a[valid], b[valid])
    assert torch.equal(ta[mask.bool()], tb[mask.bool()])


def test_paths_and_shapes(tiny):
    cfg = tiny.cfg
    ids, mask = text_batch(cfg)
    image = torch.randn(3, 3, cfg.image_size, cfg.image_size)
    with torch.no_grad():
        img = tiny.encode_image(image, vl_path=True)
        txt = tiny.encode_text(ids, mask, vl_path=True)
        fused = tiny.encode_pair(ids, mask, image)
        feats = tiny.itc_image(img) + tiny.itc_text(txt)
    assert img.hidden.shape == img.vl_hidden.shape == (3, cfg.image_len, cfg.dim)
    assert txt.hidden.shape == (3, cfg.max_text_len, cfg.dim)
    assert fused.shape == (3, cfg.max_text_len + cfg.image_len, cfg.dim)
    for f in feats:
        assert torch.allclose(f.norm(dim=-1), torch.ones(3))
    assert not torch.allclose(feats[0], feats[1])  # the VL path is a different function
    assert tiny.itm_logits(fused).shape == (3, 2)
    assert tiny.mlm_logits(fused[:, : cfg.max_text_len]).shape == (3, cfg.max_text_len, cfg.vocab_size)
    assert tiny.encode_image(image).vl_hidden is None


def test_vl_path_reruns_the_top_blocks(tiny):
    cfg = tiny.cfg
    image = torch.randn(2, 3, cfg.image_size, cfg.image_size)
    inputs = PassInputs(images=image)
    with torch.no_grad():
        below = tiny.run_blocks(tiny.embed("image", inputs), inputs, range(cfg.vlffn_start))["image"]
        top = tiny.run_blocks({"image_vl": below}, inputs, range(cfg.vlffn_start, cfg.depth))["image_vl"]
        expected = tiny.transformer.norm(top)
        assert torch.allclose(tiny.encode_image(image, vl_path=True).vl_hidden, expected, atol=1e-6)


def test_fused_block_without_vl_expert_routes_by_modality(tiny):
    block = tiny.transformer.blocks[0]
    assert not block.with_vl
    x = torch.randn(2, 5 + 4, tiny.cfg.dim)
    plain = AttentionInputs(9, None, None, SDPA, x.device)  # no relative bias, no padding
    with torch.no_grad():
        fused = block(x, "fused", plain, text_len=5)
        text = block(x, "text", plain)
        image = block(x, "image", plain)
    assert torch.allclose(fused[:, :5], text[:, :5], atol=1e-6)
    assert torch.allclose(fused[:, 5:], image[:, 5:], atol=1e-6)
    with pytest.raises(ValueError, match="vision-language expert"):
        block(x, "vl", plain)


def test_drop_path_is_per_sample_and_off_in_eval():
    torch.manual_seed(0)
    model = VLMo(preset("tiny", drop_path_rate=0.5))
    image = torch.randn(8, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model.encode_image(image).hidden, model.encode_image(image).hidden)
        model.train()
        a, b = model.encode_image(image).hidden, model.encode_image(image).hidden
    assert not torch.equal(a, b)


def test_wrong_image_size_is_a_clear_error(tiny):
    with pytest.raises(ValueError, match="image_size"):
        tiny.encode_image(torch.randn(1, 3, 32, 32))


def test_initialisation_follows_the_published_code():
    torch.manual_seed(0)
    model = VLMo(preset("tiny"))
    block = model.transformer.blocks[0]
    assert torch.equal(block.gamma_1, torch.full((128,), 0.1))
    assert torch.equal(block.attn.q_bias, torch.zeros(128))
    assert torch.equal(model.relative_position_bias_table, torch.zeros_like(model.relative_position_bias_table))
    assert math.isclose(model.logit_scale.item(), math.log(1 / 0.07), rel_tol=1e-6)
    assert abs(block.mlp_text.fc1.weight.std().item() - 0.02) < 0.002
    assert torch.equal(block.mlp_text.fc1.bias, torch.zeros(512))
    assert model.text_embeddings.LayerNorm.eps == 1e-12 and block.norm1.eps == 1e-6


# fused T_CLS [:3], fused last patch [:3], ITM logits of both pairs, text ITC feature [:3]
KNOWN_VALUES = [
    [0.809378, 1.364496, 0.830599],
    [0.355720, 1.264351, 0.250766],
    [0.028756, 0.003068, 0.021897, 0.049200],
    [0.040002, -0.033627, -0.102381],
]


def test_known_values_are_stable():
    """Pinned outputs of a seeded tiny model: a change in numerics shows up here."""
    torch.manual_seed(1234)
    model = VLMo(preset("tiny", drop_path_rate=0.0)).eval()
    with torch.no_grad():
        model.relative_position_bias_table.normal_(0, 0.5)
    ids, mask = text_batch(model.cfg, batch=2, seed=5)
    image = torch.linspace(-1, 1, 2 * 3 * 64 * 64).reshape(2, 3, 64, 64)
    with torch.no_grad():
        fused = model.encode_pair(ids, mask, image)
        itm = model.itm_logits(fused)
        text_feat, _ = model.itc_text(model.encode_text(ids, mask))
    got = [fused[0, 0, :3].tolist(), fused[1, -1, :3].tolist(), itm.flatten().tolist(), text_feat[0, :3].tolist()]
    for g, e in zip(got, KNOWN_VALUES):
        assert g == pytest.approx(e, abs=2e-5)


def test_absolute_position_variant_runs_every_path():
    """rel_pos=False (base_plus): image-only passes have no bias at all; positions come from the embeddings."""
    cfg = preset("tiny", rel_pos=False, layer_scale_init=None)
    model = VLMo(cfg).eval()
    ids, mask = text_batch(cfg)
    image = torch.randn(3, 3, cfg.image_size, cfg.image_size)
    with torch.no_grad():
        img = model.encode_image(image, vl_path=True)
        assert model.encode_pair(ids, mask, image).shape == (3, cfg.max_text_len + cfg.image_len, cfg.dim)
        shifted = model.encode_image(image.roll(cfg.patch_size, dims=-1)).hidden[:, 0]
    assert img.hidden.shape == (3, cfg.image_len, cfg.dim) and torch.isfinite(img.hidden).all()
    assert not torch.allclose(img.hidden[:, 0], shifted)  # moving the content moves the I_CLS output
