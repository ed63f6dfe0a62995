"""Parameter groups and freezing; weights handed between stages with the shapes re-sized by rule; VL init."""
import pytest
import torch

from vlmo_ds.config.groups import expand, group_of, present_groups
from vlmo_ds.config.schema import STAGE2_TRAINABLE, TRAINABLE_GROUPS
from vlmo_ds.model import relative_position as rp
from vlmo_ds.model.config import preset
from vlmo_ds.model.vlmo import VLMo
from vlmo_ds.train.freeze import apply_trainable, parameter_groups
from vlmo_ds.train.optim import param_groups
from vlmo_ds.train.transition import copy_text_to_vl, fit_state_dict, fit_table, load_start_weights

TINY = preset("tiny", vocab_size=64, patch_size=16, max_text_len=16)  # window 4, table text length 64


def model(**changes) -> VLMo:
    torch.manual_seed(0)
    return VLMo(TINY.replace(**changes))


@pytest.mark.parametrize("changes", [{"mim_targets": "pixels"}, {"rel_pos": False, "layer_scale_init": None}])
def test_every_parameter_in_exactly_one_group(changes):
    net = model(**changes)
    groups = parameter_groups(net)
    names = [name for members in groups.values() for name in members]
    assert sorted(names) == sorted(n for n, _ in net.named_parameters())
    assert set(groups) == present_groups(net.cfg)
    assert set(groups) | {"heads"} <= set(TRAINABLE_GROUPS) | {"heads"}


def test_group_names_follow_the_published_stage2_rule():
    # The published code trains these substrings in stage 2: text_embeddings, token_type_embeddings, mlp_text,
    # norm2_text, mlm_score, relative_position_bias_table, transformer.norm.
    published = ("text_embeddings", "token_type_embeddings", "mlp_text", "norm2_text", "mlm_score",
                 "relative_position_bias_table", "transformer.norm")
    net = model()
    wanted = expand(STAGE2_TRAINABLE)
    for name, _ in net.named_parameters():
        assert (group_of(name) in wanted) == any(part in name for part in published), name
    assert group_of("transformer.blocks.1.gamma_2") == "attention" and group_of("pooler.dense.weight") == "itm_head"
    assert group_of("vqa_classifier.0.weight") == group_of("nlvr2_classifier.3.bias") == "task_heads"
    assert group_of("vqa_head.0.weight") is None and expand(["heads"]) >= {"mlm_head", "mim_head", "task_heads"}


def test_apply_trainable_freezes_and_the_optimizer_never_sees_frozen():
    net = model()
    report = apply_trainable(net, STAGE2_TRAINABLE)
    frozen = [n for n, p in net.named_parameters() if not p.requires_grad]
    assert "transformer.blocks.0.attn.qkv.weight" in frozen and "transformer.blocks.0.mlp_imag.fc1.weight" in frozen
    assert "transformer.blocks.0.mlp_text.fc1.weight" not in frozen
    assert report.frozen == sum(p.numel() for n, p in net.named_parameters() if n in frozen)
    in_optimizer = {id(p) for group in param_groups(net, 0.01) for p in group["params"]}
    assert in_optimizer == {id(p) for p in net.parameters() if p.requires_grad}
    apply_trainable(net, ("relative_position",))  # no decayed tensor left: the empty group is omitted
    assert [g["name"] for g in param_groups(net, 0.01)] == ["no_decay"]
    with pytest.raises(ValueError, match="the trainable groups mim_head name no parameter"):
        apply_trainable(net, ("mim_head",))
    absolute = model(rel_pos=False)
    apply_trainable(absolute, STAGE2_TRAINABLE)  # no table to train: the rest of the set still applies
    assert absolute.transformer.blocks[0].mlp_text.fc1.weight.requires_grad


def test_text_rows_resize_keeps_every_shared_offset():
    table = torch.randn(rp.num_rows(4, 64), 16)
    dst = TINY.replace(table_text_len=32)
    out = fit_table(table, dst, TINY)
    assert out.shape == (rp.num_rows(4, 32), 16)
    # The same text positions read the same biases through the old and the new index (offsets up to 30 exist in both).
    old = table[rp.text_index(16, 4, 64)]
    new = out[rp.text_index(16, 4, 32)]
    assert torch.equal(old, new)
    assert torch.equal(out[: rp.num_image_rows(4) + 2], table[: rp.num_image_rows(4) + 2])


def test_image_rows_resize_and_inferred_source():
    table = torch.randn(rp.num_rows(4, 64), 16)
    dst = TINY.replace(image_size=128)  # window 8
    out = fit_table(table, dst, None)  # the source grid and text length inferred from the row count
    assert torch.equal(out, rp.resize_image_rows(table, 4, 8))
    published = torch.randn(rp.num_rows(4, 196), 16)  # a published-layout table (196 text rows) for our 64
    assert fit_table(published, TINY, None).shape == (rp.num_rows(4, 64), 16)
    with pytest.raises(ValueError, match="columns"):
        fit_table(torch.randn(rp.num_rows(4, 64), 12), TINY, TINY)


def test_absolute_positions_cut_or_interpolate_but_never_grow():
    src = TINY.replace(rel_pos=False, max_text_len=16)
    state = model(rel_pos=False).state_dict()
    short = fit_state_dict(state, src.replace(max_text_len=8), src)
    assert torch.equal(short["text_embeddings.position_embeddings.weight"],
                       state["text_embeddings.position_embeddings.weight"][:8])
    big = fit_state_dict(state, src.replace(image_size=128), src)["transformer.pos_embed"]
    assert big.shape == (1, 65, TINY.dim) and torch.equal(big[:, 0], state["transformer.pos_embed"][:, 0])
    flat = state["transformer.pos_embed"].clone()
    flat[:, 1:] = 0.5
    assert torch.allclose(fit_state_dict({"transformer.pos_embed": flat}, src.replace(image_size=128))
                          ["transformer.pos_embed"][:, 1:], torch.full((1, 64, TINY.dim), 0.5))
    with pytest.raises(ValueError, match="cannot grow"):
        fit_state_dict(state, src.replace(max_text_len=32, table_text_len=64), src)


def test_load_start_weights_reports_and_refuses_what_no_rule_fits():
    mim = model(mim_targets="pixels")
    with torch.no_grad():
        for p in mim.parameters():
            p.add_(1.0)
    text = model(max_text_len=64)  # the text stage: longer text, no MIM head
    report = load_start_weights(text, mim.state_dict(), mim.cfg)
    assert report.left_out == ["mim_head.bias", "mim_head.weight", "transformer.mask_token"]
    assert report.kept_init == [] and report.resized == []
    for name, value in text.state_dict().items():
        assert torch.equal(value, mim.state_dict()[name]), name
    again = model(mim_targets="pixels")  # back to an image stage: the MIM head is new
    assert load_start_weights(again, text.state_dict(), text.cfg).kept_init == [
        "mim_head.bias", "mim_head.weight", "transformer.mask_token"]
    wrong = {**text.state_dict(), "itm_score.fc.weight": torch.zeros(3, TINY.dim)}
    with pytest.raises(ValueError, match=r"no resize rule applies: itm_score.fc.weight \(3, 128\)"):
        load_start_weights(model(), wrong, TINY)


def test_vl_experts_copied_from_text_only_when_asked():
    net = model()
    top = net.transformer.blocks[-1]
    assert not torch.equal(top.mlp_vl.fc1.weight, top.mlp_text.fc1.weight)
    assert copy_text_to_vl(net) == 1
    assert torch.equal(top.mlp_vl.fc1.weight, top.mlp_text.fc1.weight)
    assert torch.equal(top.norm2_vl.weight, top.norm2_text.weight)
    assert top.mlp_vl.fc1.weight.data_ptr() != top.mlp_text.fc1.weight.data_ptr()  # a copy, not shared storage
