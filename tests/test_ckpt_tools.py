"""The checkpoint tools in one process: safe writing and reading, layouts, the published round trip, the BEiT key
mapping (BEiT-base shapes, both key layouts), inspect, and the one-line errors of the command line.
(DeepSpeed checkpoints, consolidation and resharding under several processes: test_ckpt_deepspeed.py.)"""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from vlmo_ds.ckpt import consolidated
from vlmo_ds.ckpt.beit import SHARED_TABLE, beit_config, export_beit, import_beit
from vlmo_ds.ckpt.cli import main
from vlmo_ds.ckpt.consolidated import Consolidated
from vlmo_ds.ckpt.errors import CheckpointError
from vlmo_ds.ckpt.layout import Layout, check_resume_model, config_from_preset, model_shapes, parse_overrides
from vlmo_ds.ckpt.safe_read import load_torch, read_safetensors
from vlmo_ds.ckpt.safe_write import OutDir, check_name
from vlmo_ds.model import relative_position as rp
from vlmo_ds.model.config import preset
from vlmo_ds.model.vlmo import VLMo
from vlmo_ds.train.stage_record import weights_config, write_record

REPO = Path(__file__).resolve().parents[1]
TINY = preset("tiny", mim_targets="pixels")


def cli(*argv, capsys) -> tuple[int, str, str]:
    """Run the command line in this process: (exit status, stdout, stderr)."""
    try:
        status = main([str(a) for a in argv])
    except SystemExit as stop:
        status = stop.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def tiny_folder(tmp_path: Path, name: str = "tiny") -> tuple[Path, dict]:
    """A consolidated folder of the tiny model, every tensor moved off its initial value."""
    torch.manual_seed(0)
    model = VLMo(TINY)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape))
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    consolidated.write(Consolidated(TINY, weights, trainer={"step": 7, "stage": "vl"}), OutDir(tmp_path / name))
    return tmp_path / name, weights


# ---- safe writing and reading -----------------------------------------------------------------------------------
def test_names_from_metadata_are_single_components_and_nothing_escapes_the_output(tmp_path):
    for bad in ("..", ".", "", "a/b", "../x", "/etc/passwd", "a\\b"):
        with pytest.raises(CheckpointError, match="refusing the name"):
            check_name(bad, "trainer.json")
    assert check_name("step_00000010", "latest") == "step_00000010"
    out = OutDir(tmp_path / "out")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "out").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / "out" / "link")
    with pytest.raises(CheckpointError, match="resolves outside the output folder"):
        out.write_text("link", "x.txt", text="no")
    written = out.write_json("a", "b.json", obj={"k": 1})
    assert json.loads(written.read_text()) == {"k": 1}
    assert sorted(p.name for p in (tmp_path / "out" / "a").iterdir()) == ["b.json"]  # no temporary left behind
    assert list((tmp_path / "elsewhere").iterdir()) == []


def test_truncated_files_and_foreign_objects_give_one_clear_error(tmp_path):
    torch.save({"w": torch.arange(1000.0)}, tmp_path / "ok.pt")
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut.pt is truncated or corrupt \(.*\); copy it again"):
        load_torch(tmp_path / "cut.pt")
    save_file({"w": torch.arange(1000.0)}, str(tmp_path / "ok.safetensors"))
    data = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match="cut.safetensors is truncated or corrupt"):
        read_safetensors(tmp_path / "cut.safetensors")
    torch.save({"when": __import__("datetime").timedelta(days=1)}, tmp_path / "pickle.pt")
    with pytest.raises(CheckpointError, match="refusing to unpickle .* datetime.timedelta"):
        load_torch(tmp_path / "pickle.pt")


def test_layout_ranks_follow_megatron_order():
    layout = Layout(tensor=2, pipeline=2, data=3, zero_stage=1)
    assert [layout.mp_rank(tp, pp) for pp in range(2) for tp in range(2)] == [0, 1, 2, 3]
    assert layout.global_rank(tp=1, dp=2, pp=1) == 1 + 2 * (2 + 3 * 1) == 11
    assert [layout.coords(r) for r in (0, 1, 2, 6, 11)] == [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 2, 1)]
    assert str(layout) == "TP 2 x PP 2 x DP 3, ZeRO 1" and layout.world == 12


def test_a_preset_config_takes_recipe_fields_from_the_weights_and_overrides():
    assert parse_overrides(["max_text_len=40", "mim_targets=pixels", "layer_scale_init=null"]) == {
        "max_text_len": 40, "mim_targets": "pixels", "layer_scale_init": None}
    with pytest.raises(CheckpointError, match="write FIELD=VALUE"):
        parse_overrides(["vocab_size"])
    shapes = {"text_embeddings.word_embeddings.weight": (30522, 128), "mim_head.weight": (192, 128),
              "relative_position_bias_table": (rp.num_rows(4, 64), 16)}
    cfg = config_from_preset("tiny", {"max_text_len": 20}, shapes)
    assert (cfg.vocab_size, cfg.mim_targets, cfg.image_size, cfg.max_text_len) == (30522, "pixels", 32, 20)


def test_resuming_a_checkpoint_of_another_model_is_refused_in_one_line(tmp_path):
    (tmp_path / "trainer.json").write_text(json.dumps({"step": 3, "model": dataclasses.asdict(TINY)}))
    check_resume_model(tmp_path, TINY)
    with pytest.raises(CheckpointError, match=r"holds a tiny model: dim 128 \(this run 1024\), depth 4 \(this run "
                                              r"24\).*; resume with the model settings it was trained with") as err:
        check_resume_model(tmp_path, preset("large", mim_targets="pixels"))
    assert "\n" not in str(err.value)
    (tmp_path / "trainer.json").write_text(json.dumps({"step": 3}))
    check_resume_model(tmp_path, preset("large"))  # a checkpoint that names no model passes


# ---- published VLMo ---------------------------------------------------------------------------------------------
def test_export_official_then_import_official_is_exact(tmp_path, capsys):
    folder, weights = tiny_folder(tmp_path)
    assert cli("export-official", folder, tmp_path / "vlmo.pth", capsys=capsys)[0] == 0
    published = load_torch(tmp_path / "vlmo.pth")["state_dict"]
    assert "transformer.mask_token" not in published and published["logit_scale"].shape == ()
    status, out, _ = cli("inspect", tmp_path / "vlmo.pth", capsys=capsys)
    assert status == 0 and "published VLMo layout" in out
    assert cli("import-official", tmp_path / "vlmo.pth", tmp_path / "back", capsys=capsys)[0] == 0  # preset found
    back, meta = read_safetensors(tmp_path / "back" / "weights.safetensors")
    ours_only = {"transformer.mask_token", "mim_head.weight", "mim_head.bias"}
    assert set(back) == set(weights) - ours_only
    assert all(torch.equal(back[k], weights[k]) for k in back)
    assert weights_config(tmp_path / "back" / "weights.safetensors") == TINY.replace(mim_targets=None)
    assert json.loads((tmp_path / "back" / "config.json").read_text())["dim"] == 128


def test_a_checkpoint_of_another_preset_is_refused_in_one_line(tmp_path, capsys):
    folder, _ = tiny_folder(tmp_path)
    status, _, err = cli("export-official", folder, tmp_path / "x.pth", "--preset", "large", capsys=capsys)
    assert status == 2 and err.count("\n") == 1
    assert "is not a large model: dim 128 (preset 1024)" in err and "pass --preset tiny" in err
    assert not (tmp_path / "x.pth").exists()


def test_cli_errors_for_a_truncated_file_and_a_traversing_latest_pointer(tmp_path, capsys):
    folder, _ = tiny_folder(tmp_path)
    data = (folder / "weights.safetensors").read_bytes()
    (folder / "weights.safetensors").write_bytes(data[: len(data) // 3])
    status, _, err = cli("inspect", folder, capsys=capsys)
    assert status == 2 and err.count("\n") == 1 and "weights.safetensors is truncated or corrupt" in err
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("../../../etc")
    status, _, err = cli("consolidate", run, tmp_path / "out", capsys=capsys)
    assert status == 2 and err.count("\n") == 1 and "refusing the name '../../../etc'" in err


def test_inspect_describes_a_consolidated_folder(tmp_path, capsys):
    folder, weights = tiny_folder(tmp_path)
    status, out, _ = cli("inspect", folder, capsys=capsys)
    lines = out.splitlines()
    assert status == 0
    rows = {line[:12].strip(): line[12:] for line in lines}
    assert rows["kind"] == "consolidated weights" and rows["stage"] == "vl" and rows["dtype"] == "F32"
    assert rows["parameters"] == f"{sum(v.numel() for v in weights.values()):,} in {len(weights)} tensors"
    assert rows["model"].startswith("preset tiny: dim 128, depth 4, heads 4, image 64")


def test_a_stage_record_consolidates_to_the_same_weights(tmp_path, capsys):
    _, weights = tiny_folder(tmp_path)
    record = write_record(tmp_path / "run", "vl", weights, TINY, {"kind": "image_text", "global_step": 7}, rank=0)
    assert cli("consolidate", record, tmp_path / "out", capsys=capsys)[0] == 0
    back, meta = read_safetensors(tmp_path / "out" / "weights.safetensors")
    assert meta["stage"] == "vl" and weights_config(tmp_path / "out" / "weights.safetensors") == TINY
    assert set(back) == set(weights) and all(torch.equal(back[k], v) for k, v in weights.items())
    status, out, _ = cli("inspect", record, capsys=capsys)
    assert status == 0 and "stage record" in out and "image_text stage" in out


def test_every_subcommand_has_help():
    for command in ("consolidate", "reshard", "export-official", "import-official", "import-beit", "inspect"):
        with pytest.raises(SystemExit) as stop:
            main([command, "--help"])
        assert stop.value.code == 0
    done = subprocess.run([sys.executable, str(REPO / "tools" / "ckpt.py"), "reshard", "--help"],
                          capture_output=True, text=True, check=True)
    assert "loader positions per data-parallel rank when --data is unchanged" in done.stdout


# ---- BEiT -------------------------------------------------------------------------------------------------------
D, DEPTH, HEADS, FFN, WINDOW = 768, 12, 12, 3072, 14


def beit_base(layout: str) -> dict[str, torch.Tensor]:
    """A BEiT-base state dict by the published key lists: "unilm" is BEiT pre-training (one shared relative table,
    mask token, visual-token head), "timm" is timm's Beit (a table and index per layer, k_bias buffers, pooled
    classification head). Every tensor holds distinct values (an arange plus its own offset)."""
    nrd = rp.num_image_rows(WINDOW)
    shapes = {"cls_token": (1, 1, D), "patch_embed.proj.weight": (D, 3, 16, 16), "patch_embed.proj.bias": (D,)}
    for i in range(DEPTH):
        block = {"norm1.weight": (D,), "norm1.bias": (D,), "attn.qkv.weight": (3 * D, D), "attn.q_bias": (D,),
                 "attn.v_bias": (D,), "attn.proj.weight": (D, D), "attn.proj.bias": (D,), "norm2.weight": (D,),
                 "norm2.bias": (D,), "mlp.fc1.weight": (FFN, D), "mlp.fc1.bias": (FFN,), "mlp.fc2.weight": (D, FFN),
                 "mlp.fc2.bias": (D,), "gamma_1": (D,), "gamma_2": (D,)}
        if layout == "timm":
            block["attn.relative_position_bias_table"] = (nrd, HEADS)
        shapes |= {f"blocks.{i}.{k}": v for k, v in block.items()}
    if layout == "unilm":
        shapes |= {"mask_token": (1, 1, D), SHARED_TABLE: (nrd, HEADS), "norm.weight": (D,), "norm.bias": (D,),
                   "lm_head.weight": (8192, D), "lm_head.bias": (8192,)}
    else:
        shapes |= {"fc_norm.weight": (D,), "fc_norm.bias": (D,), "head.weight": (1000, D), "head.bias": (1000,)}
    state = {k: torch.arange(torch.Size(s).numel(), dtype=torch.float32).reshape(s) * 1e-6 + i
             for i, (k, s) in enumerate(shapes.items())}
    index = rp.image_index(WINDOW)  # the derived buffers BEiT files carry
    if layout == "unilm":
        state["rel_pos_bias.relative_position_index"] = index
    else:
        for i in range(DEPTH):
            state[f"blocks.{i}.attn.relative_position_index"] = index.clone()
            state[f"blocks.{i}.attn.k_bias"] = torch.zeros(D)
    return state


@pytest.mark.parametrize("layout", ["unilm", "timm"])
def test_beit_base_maps_every_key_and_exports_back_exactly(layout):
    state = beit_base(layout)
    cfg = beit_config(state, "base")
    result = import_beit(state, cfg)
    heads = {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"} if layout == "timm" else set()
    assert set(result.unmapped) == heads
    assert set(result.mapped) | set(result.checked) | heads == set(state)
    assert result.shared_table == (layout == "unilm")
    assert (cfg.image_size, cfg.mim_targets) == ((224, "tokens") if layout == "unilm" else (224, None))
    assert set(result.weights) <= set(model_shapes(cfg))
    ours = result.weights
    assert torch.equal(ours["transformer.blocks.3.mlp_imag.fc2.weight"], state["blocks.3.mlp.fc2.weight"])
    assert torch.equal(ours["transformer.blocks.0.norm2_imag.bias"], state["blocks.0.norm2.bias"])
    table, nrd = ours["relative_position_bias_table"], rp.num_image_rows(WINDOW)
    source = state[SHARED_TABLE] if layout == "unilm" else state["blocks.5.attn.relative_position_bias_table"]
    assert torch.equal(table[:nrd, 5 * HEADS:6 * HEADS], source)
    assert not table[nrd:].any()  # the text rows stay zero
    back = export_beit(ours, cfg, shared_table=layout == "unilm")
    assert set(back) == set(result.mapped)
    assert all(torch.equal(back[k], state[k]) for k in back)


def test_beit_of_another_size_or_order_is_refused():
    state = beit_base("unilm")
    with pytest.raises(CheckpointError, match=r"has dim 768, depth 12, heads 12, .* but --preset large has dim 1024"):
        beit_config(state, "large")
    state["rel_pos_bias.relative_position_index"] = state["rel_pos_bias.relative_position_index"].T.contiguous()
    with pytest.raises(CheckpointError, match="orders its relative offsets another way"):
        import_beit(state, beit_config(state, "base"))


def test_import_beit_command_writes_partial_weights_a_stage_loads(tmp_path, capsys):
    state = beit_base("timm")
    save_file({f"module.{k}": v for k, v in state.items()}, str(tmp_path / "beit.safetensors"))
    assert cli("import-beit", tmp_path / "beit.safetensors", tmp_path / "out", "--preset", "base",
               capsys=capsys)[0] == 0
    weights, meta = read_safetensors(tmp_path / "out" / "weights.safetensors")
    assert meta["partial"] == "image" and weights_config(tmp_path / "out" / "weights.safetensors").image_size == 224
    assert torch.equal(weights["transformer.cls_token"], state["cls_token"])
    assert "text_embeddings.word_embeddings.weight" not in weights
