"""`python -m vlmo_ds.train RECIPE [key=value ...] [--stage NAME]` under any launcher (none, torchrun, deepspeed, srun,
mpirun).

RECIPE is a YAML file or the name of a shipped recipe (tiny, tiny_image_text, base, large). Overrides use dotted keys:
    python -m vlmo_ds.train tiny optim.lr=5e-4 stages.0.steps=200 train.resume=none
    torchrun --nproc_per_node 8 -m vlmo_ds.train large parallel.zero_stage=3
The recipe is validated before any process group starts: a bad value exits with one line naming the key.

Stages run in order in one job, each starting from the previous one's final weights (RUN_DIR/stages/NAME/); a
killed or time-limited job continues where it stopped when started again (train.resume=auto), and a finished stage
never runs again. For one job per stage, give each job its stage; a job whose stage is finished does nothing:
    sbatch ... python -m vlmo_ds.train base --stage image_mim
    sbatch --dependency=afterok:$JOB1 ... python -m vlmo_ds.train base --stage text_mlm
    sbatch --dependency=afterok:$JOB2 ... python -m vlmo_ds.train base --stage image_text
(slurm/submit_stages.sh submits such a chain.)

SIGUSR1 (Slurm's warning before a time limit: sbatch --signal) or SIGTERM on any rank, or train.deadline_minutes,
makes every rank stop after the same step with a checkpoint; the exit status is then 75 (EX_TEMPFAIL) and the same
command continues. In jobs started by slurm/ (VLMO_REQUEUE=1) rank 0 requeues the job after SIGUSR1 or the deadline.
A run whose loss or gradient norm is not finite for train.max_bad_steps steps in a row stops with one line naming its
newest finite checkpoint (vlmo_ds.train.divergence).
A rank that makes no progress for train.collective_timeout_minutes (stopped, stuck) ends the job the same way (75,
requeued): every other rank exits with a line naming it. One job per run folder: a second one exits with 73.
Exit status: 0 done, 2 bad recipe, 65 diverged (lower the learning rate), 73 run folder in use by another job,
75 stopped early (resume with the same command).
"""
from __future__ import annotations

import argparse
import logging
import sys

import torch.distributed as dist

from vlmo_ds.ckpt.errors import CheckpointError
from vlmo_ds.config import ConfigError, check_files, load_config
from vlmo_ds.data.errors import DataSourceError
from vlmo_ds.parallel.device import configure_cuda
from vlmo_ds.parallel.launch import discover, init_distributed
from vlmo_ds.parallel.layout_rules import LayoutError
from vlmo_ds.train.divergence import EXIT_DIVERGED, DivergedError
from vlmo_ds.train.preemption import EXIT_STOPPED, StopSignals, requeue_slurm_job
from vlmo_ds.train.run_lock import EXIT_BUSY, RunFolderBusy, hold_run_folder
from vlmo_ds.train.schedule import plan_run
from vlmo_ds.train.watchdog import BACKSTOP_MINUTES, Watchdog


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m vlmo_ds.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="a recipe YAML file, or a shipped recipe name (tiny, tiny_finetune, base, "
                                  "base_finetune, ...: python -m vlmo_ds.config --help)")
    p.add_argument("overrides", nargs="*", help="key=value overrides with dotted keys (optim.lr=1e-4)")
    p.add_argument("--stage", metavar="NAME", default=None,
                   help="run this one stage, then exit (the same as train.only_stage=NAME): one job per stage")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    return p.parse_intermixed_args(argv)  # options may come between the overrides


def main(argv: list[str] | None = None) -> int:
    with StopSignals() as signals:  # first: a warning that comes while the recipe is checked is not lost
        return _run(argv, signals)


def _run(argv: list[str] | None, signals: StopSignals) -> int:
    args = parse_args(argv)
    try:
        env = discover()
        overrides = args.overrides + ([f"train.only_stage={args.stage}"] if args.stage else [])
        cfg = load_config(args.recipe, overrides, world_size=env.world_size)
        check_files(cfg)
        plan_run(cfg)  # stage order and run-folder state: a stage that cannot start is one line, not a traceback
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"vlmo_ds.train: {err}", file=sys.stderr)
        return 2
    from vlmo_ds.train.trainer import train  # heavy imports only once the recipe is sound

    logging.basicConfig(level=logging.INFO if env.rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {env.rank}] %(levelname)s %(name)s: %(message)s")
    configure_cuda(cfg.parallel.tensor, fp32=cfg.precision == "fp32")  # before CUDA starts (init_distributed)
    init_distributed(env, timeout_minutes=cfg.train.collective_timeout_minutes + BACKSTOP_MINUTES)
    try:
        try:
            with hold_run_folder(cfg.run_dir, env.rank) as lock, \
                    Watchdog(cfg.run_dir, env.rank, env.world_size, cfg.train.collective_timeout_minutes,
                             before_exit=lock.release if lock else None) as progress:
                result = train(cfg, env, signals, progress)
        except RunFolderBusy as err:  # another job trains in this run folder: every rank knows, rank 0 says
            if env.rank == 0:
                print(f"vlmo_ds.train: {err}", file=sys.stderr)
            return EXIT_BUSY
        except (LayoutError, CheckpointError, DataSourceError) as err:  # found once processes exist: a checkpoint
            # of another layout or model, pipeline stages without CUDA, a data source of only bad samples
            print(f"vlmo_ds.train: {err}", file=sys.stderr)
            return 2
        except DivergedError as err:  # every rank stops after the same step
            if env.rank == 0:
                print(f"vlmo_ds.train: {err}", file=sys.stderr)
            return EXIT_DIVERGED
        if result.stopped is not None:
            if env.rank == 0 and result.stopped.requeue:
                requeue_slurm_job()
            if dist.is_initialized():
                dist.barrier()  # no rank exits before the requeue: srun --kill-on-bad-exit would end the step
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if result.stopped:
        if env.rank == 0:
            logging.getLogger(__name__).warning("stopped early (%s) with a checkpoint in %s: exit status %d; the "
                                                "same command continues", result.stopped, cfg.run_dir, EXIT_STOPPED)
        return EXIT_STOPPED
    return 0


if __name__ == "__main__":
    sys.exit(main())
