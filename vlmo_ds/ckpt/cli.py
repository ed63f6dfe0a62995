"""`python tools/ckpt.py SUBCOMMAND ...`: the checkpoint tools on the command line.

Every sub-command has --help. A problem a user can fix (missing or truncated file, another model than asked, an
unsafe name, an unsupported layout) prints one line `ckpt.py: error: ...` and exits with status 2.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from vlmo_ds.ckpt.errors import CheckpointError
from vlmo_ds.model.config import PRESETS

log = logging.getLogger("vlmo_ds.ckpt")

EPILOG = """inputs: a checkpoint folder (RUN_DIR/checkpoints/step_N), a run folder (its newest checkpoint),
a consolidated folder, a stage record folder (RUN_DIR/stages/NAME) or a weights .safetensors file"""

RESHARD_HELP = """Write a checkpoint folder for another layout (OUT/checkpoints/step_N) that the trainer resumes from:
train.resume=OUT/checkpoints/step_N (or train.run_dir=OUT train.resume=auto: the source run's finished stage records
are copied along). One CPU process per target rank builds that layout's DeepSpeed engine and saves it, so run it
where the memory for every shard is.

kept: weights exactly; AdamW moments, step and hyper-parameters exactly across data-parallel, ZeRO, tensor- and
pipeline-parallel changes (a source without optimizer state, e.g. consolidated with --weights-only, gives a fresh
AdamW and says so); loader positions per data-parallel rank when --data is unchanged, otherwise the data order
restarts at the checkpoint's step (a warning says so; the rank files hold loader null); RNG states of the source
rank with the same data-parallel index. The target ZeRO settings come from the source's DeepSpeed config (or
--deepspeed JSON, which the resumed run should also use); CPU offload settings are dropped (they do not change the
files)."""


def _model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=sorted(PRESETS),
                        help="check the model against this preset; for checkpoints that name no model config, build "
                             "it from the preset (vocab size, MIM head and image size are read from the weights)")
    parser.add_argument("--set", dest="overrides", action="append", metavar="FIELD=VALUE",
                        help="a model config field for checkpoints that name none (repeatable), e.g. max_text_len=40")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ckpt.py", description="vlmo_ds checkpoint tools", epilog=EPILOG)
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")

    p = sub.add_parser("consolidate", help="any checkpoint -> OUT/weights.safetensors + config.json",
                       description="Merge every rank of a checkpoint (any TP x PP x DP layout, ZeRO 0-3, fp32 or bf16 "
                                   "with fp32 masters, which are taken) into OUT/weights.safetensors (the stage-record "
                                   "format: init_from and stage transitions read it) and OUT/config.json, with the "
                                   "AdamW state in OUT/optimizer.safetensors and the per-rank loader files.",
                       epilog=EPILOG)
    p.add_argument("checkpoint", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--weights-only", action="store_true", help="leave the optimizer state out")
    p.add_argument("--trainable", help="a ZeRO 0 stage's trainable groups, comma-separated, when it froze parameters "
                                       "and trainer.json does not list them (e.g. text_embeddings,text_experts)")
    _model_options(p)

    p = sub.add_parser("reshard", help="-> a checkpoint of another TP x PP x DP layout / ZeRO stage",
                       description=RESHARD_HELP, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--tensor", type=int, default=1, help="tensor-parallel size (default 1)")
    p.add_argument("--pipeline", type=int, default=1, help="pipeline stages (default 1)")
    p.add_argument("--data", type=int, required=True, help="data-parallel size")
    p.add_argument("--zero-stage", type=int, required=True, choices=(0, 1, 2, 3))
    p.add_argument("--precision", choices=("bf16", "fp32"), help="default: the source's")
    p.add_argument("--deepspeed", type=Path, help="the DeepSpeed JSON the resumed run uses (ds_configs/*.json)")
    p.add_argument("--trainable", help="the stage's trainable groups, comma-separated: for a source without optimizer "
                                       "state whose stage freezes parameters (otherwise as for consolidate)")
    _model_options(p)

    p = sub.add_parser("export-official", help="ours -> a .pth in the published VLMo layout",
                       description="Write our weights in the published VLMo layout (microsoft/unilm vlmo loads it: "
                                   "torch.load(path)['state_dict']). The MIM parameters are ours only and left out.",
                       epilog=EPILOG)
    p.add_argument("ours", type=Path)
    p.add_argument("out", type=Path, help="the .pth file to write")
    _model_options(p)

    p = sub.add_parser("import-official", help="a published VLMo checkpoint -> OUT/ in our layout",
                       description="Read a published VLMo checkpoint (.pth / .ckpt / .safetensors; weights under "
                                   "state_dict, module or model) into OUT/weights.safetensors + config.json. Its "
                                   "preset is found from the shapes unless --preset is given.")
    p.add_argument("published", type=Path)
    p.add_argument("out", type=Path)
    _model_options(p)

    p = sub.add_parser("import-beit", help="a BEiT checkpoint -> the image side of VLMo, for the image-only stage",
                       description="Map a BEiT checkpoint (microsoft/unilm beit keys, shared or per-layer relative "
                                   "tables, or timm's Beit keys) onto VLMo: attention, layer scales, image experts "
                                   "(norm2, mlp), patch embedding, CLS token, final norm, the image rows of the "
                                   "relative table, and BEiT's MIM token head. Writes partial weights (a stage's "
                                   "init_from); prints the keys it did not map.")
    p.add_argument("beit", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--preset", required=True, choices=sorted(PRESETS), help="the VLMo preset of the BEiT's size")
    p.add_argument("--set", dest="overrides", action="append", metavar="FIELD=VALUE",
                   help="a model config field of the image-only stage (repeatable)")

    p = sub.add_parser("inspect", help="print a checkpoint's layout, step, stage, size, dtype and config",
                       description="Describe a checkpoint, run, consolidated or stage folder, or a weights file "
                                   "(.safetensors, or a published / BEiT .pth).", epilog=EPILOG)
    p.add_argument("checkpoint", type=Path)
    return parser


def _groups(value: str | None) -> list[str] | None:
    return [g.strip() for g in value.split(",") if g.strip()] if value else None


def run(args: argparse.Namespace) -> None:
    from vlmo_ds.ckpt import consolidated
    from vlmo_ds.ckpt.layout import Layout, parse_overrides
    from vlmo_ds.ckpt.safe_write import OutDir

    overrides = parse_overrides(getattr(args, "overrides", None))
    if args.command == "inspect":
        from vlmo_ds.ckpt.describe import describe

        print("\n".join(describe(args.checkpoint)))
        return
    if args.command in ("consolidate", "reshard", "export-official"):
        from vlmo_ds.ckpt.consolidate import load

        source = getattr(args, "checkpoint", None) or getattr(args, "source", None) or args.ours
        state = load(source, args.preset, overrides, _groups(getattr(args, "trainable", None)))
    if args.command == "consolidate":
        written = consolidated.write(state, OutDir(args.out), with_optimizer=not args.weights_only)
        log.info("wrote %s", ", ".join(str(p) for p in written))
    elif args.command == "reshard":
        from vlmo_ds.ckpt.reshard import reshard
        from vlmo_ds.config.ds_json import read_ds_json

        ds_json = read_ds_json(args.deepspeed) if args.deepspeed else None
        print(reshard(state, args.out, Layout(args.tensor, args.pipeline, args.data, args.zero_stage),
                      args.precision, ds_json, _groups(args.trainable)))
    elif args.command == "export-official":
        from vlmo_ds.ckpt.official import export_official

        left_out = export_official(state, args.out)
        log.info("wrote %s%s", args.out, f" (left out, ours only: {', '.join(left_out)})" if left_out else "")
    elif args.command == "import-official":
        from vlmo_ds.ckpt.official import import_official

        consolidated.write(import_official(args.published, args.preset, overrides), OutDir(args.out))
        log.info("wrote %s", args.out)
    elif args.command == "import-beit":
        _import_beit(args, overrides)


def _import_beit(args: argparse.Namespace, overrides: dict) -> None:
    from vlmo_ds.ckpt import consolidated
    from vlmo_ds.ckpt.beit import beit_config, import_beit
    from vlmo_ds.ckpt.consolidated import Consolidated
    from vlmo_ds.ckpt.layout import check_shapes
    from vlmo_ds.ckpt.official import read_tensors
    from vlmo_ds.ckpt.safe_write import OutDir

    state = read_tensors(args.beit)
    cfg = beit_config(state, args.preset, overrides)
    result = import_beit(state, cfg)
    check_shapes(cfg, {k: tuple(v.shape) for k, v in result.weights.items()}, str(args.beit), partial=True)
    consolidated.write(Consolidated(cfg, result.weights, source=str(args.beit), partial="image"), OutDir(args.out))
    log.info("mapped %d BEiT tensors (%s relative table) into %s; checked against ours and dropped %d derived "
             "buffers (relative_position_index, k_bias)", len(result.mapped),
             "one shared" if result.shared_table else "per-layer", args.out, len(result.checked))
    if result.unmapped:
        log.warning("not mapped: %s", ", ".join(result.unmapped))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s",
                        stream=sys.stderr)
    try:
        run(args)
    except (CheckpointError, ValueError, FileNotFoundError) as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        parser.exit(2, f"{parser.prog}: error: {message}\n")
    return 0
