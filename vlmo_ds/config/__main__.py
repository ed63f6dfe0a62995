"""Check a recipe without training: `python -m vlmo_ds.config RECIPE [key=value ...] [--world-size N]`.

Prints the resolved config as YAML (every default filled in) and one line per stage with its schedule and batch
arithmetic, so a cluster job can be checked before it is queued. A bad recipe prints one error line, exit status 2.
"""
from __future__ import annotations

import argparse
import sys

import yaml

from vlmo_ds.config.errors import main_errors
from vlmo_ds.config.load import load_config, shipped_recipes, to_dict
from vlmo_ds.config.plan import stage_plan
from vlmo_ds.plan.startup import fit_warning


@main_errors
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vlmo_ds.config", description=__doc__.split("\n")[0])
    parser.add_argument("recipe", help=f"recipe YAML path or shipped name ({', '.join(shipped_recipes())})")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. optim.lr=1e-4 stages.0.steps=50")
    parser.add_argument("--world-size", type=int, default=1, help="total ranks the run will use (default 1)")
    args = parser.parse_intermixed_args(argv)  # options may come between the overrides
    cfg = load_config(args.recipe, args.overrides, world_size=args.world_size)
    dp = args.world_size // (cfg.parallel.tensor * cfg.parallel.pipeline)
    out = sys.stdout
    if warning := fit_warning(cfg, args.world_size):  # the capacity planner, on a GPU it knows (not on CPUs)
        sys.stderr.write(warning + "\n")
    out.write(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    out.write(f"# layout: {args.world_size} ranks = tensor {cfg.parallel.tensor} x pipeline {cfg.parallel.pipeline} "
              f"x data {dp}, ZeRO stage {cfg.parallel.zero_stage} over the {dp} data-parallel ranks, "
              f"activation checkpointing {'on' if cfg.parallel.activation_checkpointing else 'off'}\n")
    for index in range(len(cfg.stages)):
        plan = stage_plan(cfg, index, dp)
        out.write(f"# stage {index} {plan.stage.name} ({plan.stage.kind}): {plan.stage.steps} steps, lr {plan.lr:g} "
                  f"after {plan.warmup_steps} warm-up steps, {plan.micro_batch} micro x {plan.accumulation} accum "
                  f"x {dp} ranks = {plan.global_batch}, image {plan.image_size}, text {plan.text_len}\n")


if __name__ == "__main__":
    main()
