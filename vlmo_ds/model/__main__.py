"""Print the table of model presets: `python -m vlmo_ds.model`.

Every preset is built on the meta device (no memory), so the counts are exact even for the multi-billion ones; the
tiny model is then built for real and run once through the three paths as a smoke test of this install.
"""
from __future__ import annotations

import argparse
import time

import torch

from vlmo_ds.model.config import PRESETS
from vlmo_ds.model.flops import image_text_step_flops
from vlmo_ds.model.vlmo import VLMo


def preset_rows() -> list[tuple]:
    rows = []
    for name, cfg in PRESETS.items():
        with torch.device("meta"):
            model = VLMo(cfg)
        params = sum(p.numel() for p in model.parameters())
        rows.append((name, cfg.depth, cfg.dim, cfg.heads, cfg.depth - cfg.vlffn_start, f"{cfg.image_size}/{cfg.patch_size}",
                     cfg.max_text_len, f"{params / 1e6:,.1f}M", f"{image_text_step_flops(cfg, 1) / 1e9:,.1f}"))
    return rows


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(prog="python -m vlmo_ds.model", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter,
                            epilog="Columns: layers, width, heads, blocks with a vision-language expert, image size / "
                                   "patch size, text length, parameters, model GFLOP of one image-text pair's "
                                   "training step.").parse_args(argv)
    header = ("preset", "layers", "dim", "heads", "VL blocks", "image/patch", "text", "parameters", "GFLOP/pair")
    rows = [header] + preset_rows()
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(header))]
    for i, row in enumerate(rows):
        print("  ".join(str(v).rjust(w) for v, w in zip(row, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print("(parameters include the pre-training heads; GFLOP/pair: one image-text training step, forward + backward)")

    torch.manual_seed(0)
    model = VLMo(PRESETS["tiny"]).eval()
    cfg = model.cfg
    start = time.perf_counter()
    with torch.no_grad():
        ids = torch.randint(5, cfg.vocab_size, (2, cfg.max_text_len))
        mask = torch.ones_like(ids)
        image = torch.randn(2, cfg.in_chans, cfg.image_size, cfg.image_size)
        fused = model.encode_pair(ids, mask, image)
        model.encode_image(image, vl_path=True), model.encode_text(ids, mask, vl_path=True)
    print(f"\ntiny smoke test: image, text and fused paths ran, fused output {tuple(fused.shape)}, "
          f"{time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main()
