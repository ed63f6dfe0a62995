"""Import and export of the published VLMo checkpoint layout."""
import pytest
import torch
from safetensors.torch import save_file

from vlmo_ds.model import relative_position as rp
from vlmo_ds.model.config import preset
from vlmo_ds.model.published import export_published, import_published, read_state_dict, save_published
from vlmo_ds.model.vlmo import VLMo


def published_keys(depth: int, vlffn_start: int) -> set[str]:
    """The published state-dict keys, enumerated from the reference description (not from our module tree)."""
    keys = set()
    for i in range(depth):
        p = f"transformer.blocks.{i}."
        keys |= {p + k for k in ("gamma_1", "gamma_2", "attn.q_bias", "attn.v_bias", "attn.qkv.weight")}
        experts = ("text", "imag", "vl") if i >= vlffn_start else ("text", "imag")
        for name in ["norm1", "attn.proj"] + [f"norm2_{e}" for e in experts] + \
                    [f"mlp_{e}.{fc}" for e in experts for fc in ("fc1", "fc2")]:
            keys |= {p + name + ".weight", p + name + ".bias"}
    keys |= {"transformer.cls_token", "transformer.patch_embed.proj.weight", "transformer.patch_embed.proj.bias",
             "transformer.norm.weight", "transformer.norm.bias", "relative_position_bias_table",
             "text_embeddings.word_embeddings.weight", "text_embeddings.position_embeddings.weight",
             "text_embeddings.token_type_embeddings.weight", "text_embeddings.LayerNorm.weight",
             "text_embeddings.LayerNorm.bias", "text_embeddings.position_ids", "token_type_embeddings.weight",
             "pooler.dense.weight", "pooler.dense.bias", "itm_score.fc.weight", "itm_score.fc.bias",
             "itc_text_proj.fc.weight", "itc_image_proj.fc.weight", "itc_vl_text_proj.fc.weight",
             "itc_vl_image_proj.fc.weight", "logit_scale", "logit_vl_scale", "mlm_score.transform.dense.weight",
             "mlm_score.transform.dense.bias", "mlm_score.transform.LayerNorm.weight",
             "mlm_score.transform.LayerNorm.bias", "mlm_score.decoder.weight", "mlm_score.bias"}
    return keys


@pytest.mark.parametrize("name, dim, depth, vl, heads", [("base", 768, 12, 10, 12), ("large", 1024, 24, 21, 16)])
def test_export_has_exactly_the_published_keys_and_shapes(name, dim, depth, vl, heads):
    with torch.device("meta"):
        model = VLMo(preset(name))
    state = export_published(model)
    assert set(state) == published_keys(depth, vl)
    assert state["relative_position_bias_table"].shape == (1126, depth * heads)
    assert state["transformer.blocks.0.attn.qkv.weight"].shape == (3 * dim, dim)
    assert state["transformer.blocks.0.mlp_text.fc1.weight"].shape == (4 * dim, dim)
    assert state["text_embeddings.word_embeddings.weight"].shape == (30522, dim)
    assert state["text_embeddings.position_embeddings.weight"].shape == (40, dim)
    assert state["text_embeddings.position_ids"].shape == (1, 40)
    assert state["token_type_embeddings.weight"].shape == (2, dim)
    assert state["mlm_score.decoder.weight"].shape == (30522, dim)
    assert state["itm_score.fc.weight"].shape == (2, dim)
    assert state["transformer.patch_embed.proj.weight"].shape == (dim, 3, 16, 16)


def random_tiny(seed=0, **overrides):
    torch.manual_seed(seed)
    model = VLMo(preset("tiny", **overrides))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model


def test_round_trip_is_exact():
    first = export_published(random_tiny())
    other = random_tiny(seed=1)
    report = import_published(other, first)
    second = export_published(other)
    assert set(first) == set(second)
    for key in first:
        assert torch.equal(first[key], second[key]), key
    assert set(report.dropped) == {"text_embeddings.position_ids", "text_embeddings.position_embeddings.weight"}


@pytest.mark.parametrize("container", ["top", "state_dict", "module", "model", "safetensors"])
def test_checkpoint_containers_and_module_prefix(tmp_path, container):
    state = export_published(random_tiny())
    if container == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file(state, str(path))
    else:
        path = tmp_path / "w.ckpt"
        prefixed = {("module." + k if container == "module" else k): v for k, v in state.items()}
        payload = prefixed if container == "top" else {container: prefixed, "epoch": 3}
        torch.save(payload, path)
    loaded = read_state_dict(path)
    assert set(loaded) == set(state)
    model = random_tiny(seed=2)
    import_published(model, loaded)
    assert torch.equal(model.relative_position_bias_table, state["relative_position_bias_table"])


def test_saved_file_reads_back_as_the_published_code_reads_it(tmp_path):
    model = random_tiny()
    save_published(model, tmp_path / "vlmo.pth")
    ckpt = torch.load(tmp_path / "vlmo.pth", map_location="cpu", weights_only=True)
    assert set(ckpt["state_dict"]) == set(export_published(model))
    assert not list(tmp_path.glob("*.tmp"))


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "hook": print}, path)  # a callable needs full unpickling
    with pytest.raises(ValueError, match="weights-only"):
        read_state_dict(path)
    with pytest.raises(FileNotFoundError):
        read_state_dict(tmp_path / "missing.pth")


def test_unknown_missing_and_mismatched_keys_are_named():
    state = export_published(random_tiny())
    state["vqa_classifier.0.weight"] = torch.zeros(3, 3)
    del state["pooler.dense.bias"]
    state["itm_score.fc.weight"] = torch.zeros(3, 128)
    model = random_tiny(seed=3)
    with pytest.raises(ValueError) as err:
        import_published(model, state)
    for name in ("vqa_classifier.0.weight", "pooler.dense.bias", "itm_score.fc.weight"):
        assert name in str(err.value)
    report = import_published(model, state, strict=False)
    assert report.unexpected == ["vqa_classifier.0.weight"] and report.missing == ["pooler.dense.bias"]
    assert torch.equal(model.itc_text_proj.fc.weight, state["itc_text_proj.fc.weight"])


def test_mim_parameters_are_ours_only():
    model = random_tiny(mim_targets="pixels")
    state = export_published(model)
    assert not any(k.startswith(("mim_head", "transformer.mask_token")) for k in state)
    assert set(state) == set(export_published(random_tiny()))


def test_table_for_another_image_size_is_resized():
    small = random_tiny()  # 64 px, 8 px patches: an 8x8 grid
    state = export_published(small)
    big = random_tiny(seed=4, image_size=96)  # a 12x12 grid
    report = import_published(big, state)
    assert report.resized
    table = big.relative_position_bias_table
    assert table.shape[0] == rp.num_rows(12, 64)
    src_rest = state["relative_position_bias_table"][15 * 15 :]
    assert torch.equal(table[23 * 23 :], src_rest)  # I_CLS and text rows carried over
    centre_src = state["relative_position_bias_table"][7 * 15 + 7]  # offset (0, 0)
    assert torch.allclose(table[11 * 23 + 11], centre_src, atol=1e-5)
