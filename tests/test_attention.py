"""Attention without a dense bias per layer (vlmo_ds.model.attention): the padded-length kernels and FlexAttention's
score modification and block mask give the numbers of the plain SDPA path; the kernel is chosen and logged once.

FlexAttention has no CPU backward, so its equality is checked forward-only here (eager); its training path runs on
CUDA (compiled).
"""
import logging
import warnings

import pytest
import torch

from vlmo_ds.model import attention, vlmo
from vlmo_ds.model.attention import FLEX, SDPA, AttentionInputs, Kernel, attend, kernel_for
from vlmo_ds.model.config import preset
from vlmo_ds.model.vlmo import VLMo

PADDED_SDPA = Kernel("sdpa", 8)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = preset("tiny", drop_path_rate=0.0, max_text_len=13)  # fused length 13 + 65 = 78: padded to 80
    net = VLMo(cfg).eval()
    with torch.no_grad():
        net.relative_position_bias_table.normal_(0, 0.5)
    return net


def batch(cfg, b=3):
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(5, cfg.vocab_size, (b, cfg.max_text_len), generator=g)
    mask = (torch.arange(cfg.max_text_len)[None] < torch.tensor([[13], [7], [2]])[:b]).long()
    image = torch.randn(b, 3, cfg.image_size, cfg.image_size, generator=g)
    return ids.masked_fill(mask == 0, 0), mask, image


def with_kernel(monkeypatch, kernel: Kernel):
    monkeypatch.setattr(vlmo, "kernel_for", lambda device_type: kernel)


def outputs(net):
    ids, mask, image = batch(net.cfg)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex_attention's "eager mode is slow" notice on CPU
        return [net.encode_pair(ids, mask, image), net.encode_image(image, vl_path=True).vl_hidden,
                net.encode_text(ids, mask).hidden]


@pytest.mark.parametrize("kernel", [PADDED_SDPA, FLEX], ids=["sdpa-padded-to-8", "flex-eager"])
def test_every_path_gives_the_sdpa_numbers(model, monkeypatch, kernel):
    plain = outputs(model)
    with_kernel(monkeypatch, kernel)
    for got, want in zip(outputs(model), plain):
        assert got.shape == want.shape
        assert torch.allclose(got, want, atol=2e-5, rtol=1e-5)


def test_padding_to_8_masks_keys_and_drops_query_rows():
    inputs = AttentionInputs(5, torch.arange(25).reshape(5, 5), torch.tensor([[1, 1, 1, 0, 1]]), PADDED_SDPA, "cpu")
    assert inputs.padded == 8 and inputs.index.shape == (8, 8) and torch.equal(inputs.index[:5, :5],
                                                                              torch.arange(25).reshape(5, 5))
    assert inputs.key_mask.tolist() == [[True, True, True, False, True, False, False, False]]
    unmasked = AttentionInputs(6, None, None, PADDED_SDPA, "cpu")  # padded keys need a mask even without padding
    assert unmasked.key_mask.tolist() == [[True] * 6 + [False] * 2] and unmasked.index is None
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4, generator=g) for _ in range(3))
    table = torch.randn(25, 3, generator=g)
    exact = AttentionInputs(5, torch.arange(25).reshape(5, 5), torch.tensor([[1, 1, 1, 0, 1]] * 2), SDPA, "cpu")
    padded = AttentionInputs(5, torch.arange(25).reshape(5, 5), torch.tensor([[1, 1, 1, 0, 1]] * 2), PADDED_SDPA,
                             "cpu")
    want = attend(q, k, v, table, exact)
    assert attend(q, k, v, table, padded).shape == want.shape == (2, 3, 5, 4)
    assert torch.allclose(attend(q, k, v, table, padded), want, atol=1e-6)


def test_gradients_reach_the_table_through_the_block_bias(model):
    ids, mask, image = batch(model.cfg)
    model.zero_grad()
    model.encode_pair(ids, mask, image).sum().backward()
    grad = model.relative_position_bias_table.grad
    assert grad is not None and grad.abs().sum() > 0
    model.zero_grad()


def test_the_kernel_is_chosen_and_logged_once(caplog):
    kernel_for.cache_clear()
    with caplog.at_level(logging.INFO, "vlmo_ds.model.attention"):
        assert kernel_for("cpu") is SDPA and kernel_for("cpu") is SDPA
    said = [r.getMessage() for r in caplog.records if r.name == attention.log.name]
    assert said == ["attention kernel on cpu: sdpa (scaled_dot_product_attention, additive mask built per block)"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention trains on CUDA only")
def test_flex_trains_like_sdpa_on_cuda(monkeypatch):
    torch.manual_seed(0)
    net = VLMo(preset("tiny", drop_path_rate=0.0, max_text_len=13)).cuda()
    with torch.no_grad():
        net.relative_position_bias_table.normal_(0, 0.5)
    ids, mask, image = (t.cuda() for t in batch(net.cfg))
    grads = []
    for kernel in (attention.SDPA_CUDA, FLEX):
        with_kernel(monkeypatch, kernel)
        net.zero_grad()
        out = net.encode_pair(ids, mask, image)
        out.square().mean().backward()
        grads.append((out.detach(), net.relative_position_bias_table.grad.clone(),
                      net.transformer.blocks[0].attn.qkv.weight.grad.clone()))
    for flex, sdpa in zip(grads[1], grads[0]):
        assert torch.allclose(flex, sdpa, atol=1e-4, rtol=1e-3)
