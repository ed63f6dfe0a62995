"""tools/bench_published.py without the published code (CI has no checkout of it): its argument and set-up errors,
the FLOP accounting of the published step, the published config, batch and timm stand-in it hands that code."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from vlmo_ds.model.config import preset
from vlmo_ds.model.flops import image_text_step_flops
from vlmo_ds.model.vlmo import VLMo

TOOLS = Path(__file__).resolve().parents[1] / "tools"
BENCH = TOOLS / "bench_published.py"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


published = load("published_vlmo")
bench = load("bench_published")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=120)


def test_help_says_how_to_get_the_published_code():
    out = run("--help")
    assert out.returncode == 0
    for words in ("--published", "published_requirements.txt", "microsoft/unilm", "interleaved"):
        assert words in out.stdout


def test_missing_checkout_is_one_line(tmp_path):
    out = run("--published", str(tmp_path))
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"error: no published VLMo code under {tmp_path} (expected vlmo/modules/vlmo_module.py there or in its vlmo/ "
        "folder); check out microsoft/unilm from GitHub (only its vlmo/ folder is needed) outside this repository "
        "and pass that folder"]


def test_missing_dependency_names_the_install_command(tmp_path):
    modules = tmp_path / "unilm" / "vlmo" / "vlmo" / "modules"  # found one level down, as in a unilm checkout
    modules.mkdir(parents=True)
    for package in (modules.parent, modules):
        (package / "__init__.py").write_text("")
    (modules / "vlmo_module.py").write_text("import a_package_that_is_not_installed\n")
    out = run("--published", str(tmp_path / "unilm"))
    assert out.returncode == 2
    line, = out.stderr.strip().splitlines()
    assert "a_package_that_is_not_installed" in line and "-r " in line and "published_requirements.txt" in line


@pytest.mark.parametrize("args, message", [(["--batch", "1"], "--batch must be at least 2"),
                                           (["--repeats", "0"], "--repeats must be at least 1"),
                                           (["--warmup", "0"], "--warmup must be at least 1"),
                                           (["--preset", "tiny"], "invalid choice: 'tiny'")])
def test_argument_errors(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args(["--published", "x", *args])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_published_step_counts_its_mlm_head_at_every_text_position():
    """The published step: the passes vlmo_ds.model.flops counts, plus the MLM head (fwd + bwd) at all B x T text
    positions (its mlm_score runs over every text feature)."""
    cfg = preset("tiny")
    b, t = 3, cfg.max_text_len
    model = VLMo(cfg)
    hidden = torch.randn(b * t, cfg.dim, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        model.mlm_logits(hidden).sum().backward()
    head = counter.get_total_flops()
    assert published.published_step_flops(cfg, b) - image_text_step_flops(cfg, b, mlm_ratio=0.0) == head
    assert round(published.published_step_flops(preset("base"), 4) / 4e9) == 662  # GFLOP per pair, base


def test_published_config_and_batch():
    cfg = preset("base")
    config = published.published_config(cfg, "base")
    assert config["model_arch"] == "vlmo_base_patch16"
    assert {k for k, v in config["loss_names"].items() if v} == {"itc", "itm", "mlm"}
    assert (config["max_text_len"], config["max_text_len_of_initckpt"], config["image_size"]) == (40, 196, 224)
    with pytest.raises(published.PublishedCodeError, match="no model for preset 'tiny'"):
        published.published_config(preset("tiny"), "tiny")

    batch = bench.random_batch(preset("tiny"), 4)
    out = published.published_batch(batch)
    assert out["image"][0] is batch["image"] and out["text_masks"] is batch["text_mask"]
    assert (out["text_labels"] == -100).all() and out["text_labels_mlm"] is batch["mlm_labels"]
    labelled = batch["mlm_labels"] != -100
    assert labelled.any(1).all() and not labelled[:, 0].any()
    assert (batch["text_mask"].bool() | ~labelled).all()  # padding is never a label
    assert (batch["mlm_ids"][labelled] == 103).all()


def test_timm_standin():
    modules = published._timm_standin()
    registry, layers = modules["timm.models.registry"], modules["timm.models.layers"]

    @registry.register_model
    def toy(pretrained=False, **kwargs):
        return pretrained, kwargs

    # create_model drops keyword arguments left at None, as timm does (the published call passes drop_block_rate)
    assert modules["timm.models"].create_model("toy", img_size=224, drop_block_rate=None) == (False, {"img_size": 224})
    assert layers.to_2tuple(16) == (16, 16) and layers.to_2tuple((3, 4)) == (3, 4)
    drop = layers.DropPath(0.5).train()
    x = torch.ones(64, 3)
    kept = drop(x)[:, 0]
    assert set(kept.tolist()) <= {0.0, 2.0} and 0 < kept.count_nonzero() < 64
    assert all(m.__spec__.name == name for name, m in modules.items())


def test_cpu_get_device_is_restored():
    x = torch.ones(2)
    with published.cpu_get_device():
        assert x.long().to(device=x.get_device()).device.type == "cpu"
    assert x.get_device() == -1


def test_report_ratio_and_figures(capsys):
    sample = bench.Sample
    samples = {"vlmo_ds": [sample(20.0, 40.0, 4.0, 2**30), sample(25.0, 40.0, 4.0, 2**30), sample(19.0, 38.0, 0.0, 0)],
               "published": [sample(22.0, 44.0, 0.0, 0), sample(23.0, 46.0, 0.0, 0), sample(21.0, 42.0, 0.0, 0)]}
    bench.report(samples, {"vlmo_ds": 400e9, "published": 404e9}, {"vlmo_ds": 396e9, "published": 404e9}, gemm=40e9,
                 batch=4, threads=2)
    ours, theirs, ratio = capsys.readouterr().out.splitlines()
    assert ours.startswith("vlmo_ds    samples/s 0.200 0.160 0.211 | 100.0 GFLOP per pair (99.0 analytic) | "
                           "20.0 GFLOP/s = 50% of")
    assert "CPU busy 80%-100% of 2 threads, 7% in the kernel, 0.7 GiB of fresh pages per step" in ours
    assert "published  samples/s 0.182 0.174 0.190 | 101.0 GFLOP per pair" in theirs
    assert ratio == ("speed vlmo_ds / published: 1.100x (per repetition 1.100 0.920 1.105); "
                     "per FLOP of each one's own work 1.111x")


def test_counted_flops_of_the_cpu_attention_kernel_equal_the_unfused_count():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (torch.randn(2, 3, 17, 8, requires_grad=True) for _ in range(3))

    def step():
        torch.nn.functional.scaled_dot_product_attention(q, k, v).sum().backward()

    with sdpa_kernel(SDPBackend.MATH):
        unfused = bench.counted(step)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        fused = bench.counted(step)
    assert fused == unfused == 3 * 2 * 2 * (2 * 3 * 17 * 17 * 8)  # fwd + 2x bwd of two [17, 8] x [8, 17] products
