"""The analytic FLOP count agrees with torch's own counter, and the benchmark runs end to end."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from vlmo_ds.model.config import preset
from vlmo_ds.model.flops import block_flops, image_text_step_flops
from vlmo_ds.model.vlmo import VLMo
from vlmo_ds.objectives.pretrain import LossWeights, image_text_losses


def test_block_flops_by_hand():
    cfg = preset("tiny", dim=4, heads=2, mlp_ratio=4)
    # 2*3*(3*16 + 16 + 2*4*16) for the linears, 2*2*3*3*4 for scores and weighted sum
    assert block_flops(cfg, 3) == 1152 + 144


def test_step_count_matches_torch_flop_counter():
    cfg = preset("tiny")
    torch.manual_seed(0)
    model = VLMo(cfg)
    b, t = 4, cfg.max_text_len
    ids = torch.randint(5, cfg.vocab_size, (b, t))
    labels = torch.full_like(ids, -100)
    labels[:, 1:6] = ids[:, 1:6]  # exactly 5 masked tokens per row
    batch = {"image": torch.randn(b, 3, cfg.image_size, cfg.image_size), "text_ids": ids,
             "text_mask": torch.ones_like(ids), "mlm_ids": ids, "mlm_labels": labels}
    with FlopCounterMode(display=False) as counter:
        image_text_losses(model, batch, LossWeights(), seed=0)["loss"].backward()
    analytic = image_text_step_flops(cfg, b)  # the MLM head scores every text position
    assert abs(analytic - counter.get_total_flops()) / counter.get_total_flops() < 2e-3


@pytest.mark.slow
def test_bench_runs_and_prints_its_figures():
    bench = Path(__file__).resolve().parents[1] / "tools" / "bench.py"
    out = subprocess.run([sys.executable, str(bench), "--preset", "tiny", "--batch", "2", "--steps", "1",
                          "--warmup", "0", "--gemm-size", "256"], capture_output=True, text=True, check=True).stdout
    for figure in ("samples/s", "achieved", "GEMM", "ratio to GEMM", "peak memory"):
        assert figure in out
