"""A resume runs no code from its checkpoint: a pickle payload planted in any file a resume reads (each DeepSpeed file
kind of ZeRO 0, 1 (bf16), 2 and 3 and of a pipeline checkpoint, the per-rank loader and RNG file) never runs, and the
resume refuses with one line naming the file; the checkpoint tools refuse it the same way. Real checkpoints of a small
model, written by DeepSpeed engines on gloo ranks (CPU processes)."""
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from distributed import run_ranks
from train_cli import ENV, recipe_args, train_command
from vlmo_ds.ckpt.cli import main as ckpt_main
from vlmo_ds.ckpt.errors import CheckpointError
from vlmo_ds.model.config import preset
from vlmo_ds.model.vlmo import VLMo
from vlmo_ds.objectives.pretrain import text_mlm_losses
from vlmo_ds.train import checkpoint

CFG = preset("tiny", dim=32, depth=2, heads=2, vlffn_start=1, image_size=16, patch_size=8, vocab_size=64,
             max_text_len=8, table_text_len=8, drop_path_rate=0.0)
ZERO_CASES = [(0, False), (1, True), (2, False), (3, False)]  # (ZeRO stage, bf16): bf16 names ZeRO files bf16_*


class Payload:
    """What a planted pickle does: run code while it is unpickled (here: create the file `marker`)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def plant(file: Path, marker: Path) -> None:
    state = torch.load(file, weights_only=False)  # a file this test has just written itself
    state["planted"] = Payload(marker)
    torch.save(state, file)


def planted_copy(folder: Path, names: list[str], markers: Path | None) -> Path:
    """A copy of checkpoint `folder` with a payload in each of the files `names` (markers None: the path only)."""
    copy = folder.parent.parent / "planted" / "+".join(names) / folder.name
    if markers is not None:
        shutil.copytree(folder, copy)
        for name in names:
            plant(copy / name, markers / name)
    return copy


def text_batch(rows: int = 2) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, CFG.vocab_size, (rows, CFG.max_text_len), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, 1:3] = ids[:, 1:3]
    return {"text_ids": ids, "text_mask": torch.ones_like(ids), "mlm_ids": ids.masked_fill(labels != -100, 4),
            "mlm_labels": labels}


def ds_config(zero: int, bf16: bool) -> dict:
    return {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "train_batch_size": 2,
            "zero_optimization": {"stage": zero}, "bf16": {"enabled": bf16}, "steps_per_print": 10**9}


def outcome(load) -> str:
    try:
        load()
        return "loaded"
    except CheckpointError as err:
        return f"refused: {err}"
    except Exception as err:  # what main did: a traceback (or the payload ran and loading went on)
        return f"{type(err).__name__}: {err}"


def zero_rank(rank, world, root):
    from vlmo_ds.train.engine import build_engine

    root, found = Path(root), {}
    for zero, bf16 in ZERO_CASES:
        def engine():
            torch.manual_seed(0)
            return build_engine(VLMo(CFG), ds_config(zero, bf16), 1e-3, (0.9, 0.98), 1e-8, 0.01)

        original = engine()
        original.backward(original(text_mlm_losses, text_batch())["loss"])
        original.step()
        trainer = {"step": 1, "stage": "vl", "layout": {"tensor": 1, "pipeline": 1, "data": 1, "zero_stage": zero}}
        folder = checkpoint.save(original, root / f"zero{zero}", 1, trainer, {"loader": {"rank": 0}}, rank, 1)
        found[(zero, "unplanted")] = outcome(lambda: checkpoint.load(engine(), folder, rank))
        for file in sorted(folder.glob("*.pt")):
            copy = planted_copy(folder, [file.name], root / "markers")
            found[(zero, file.name)] = outcome(lambda: checkpoint.load(engine(), copy, rank))
    return found


def assert_refused(found: dict, markers: Path) -> None:
    for (case, name), said in found.items():
        if name == "unplanted":
            assert said == "loaded", (case, said)
        else:
            assert said.startswith("refused: refusing to unpickle ") and name in said, (case, name, said)
            assert "io.open" in said and "\n" not in said, (case, name, said)
    assert not list(markers.glob("*")), "a planted payload ran"


@pytest.mark.slow
def test_payloads_planted_in_any_zero_checkpoint_file_never_run(tmp_path):
    (tmp_path / "markers").mkdir()
    (found,) = run_ranks(zero_rank, 1, str(tmp_path), use_deepspeed=True)
    kinds = {zero: sorted(name for case, name in found if case == zero and name != "unplanted")
             for zero, _ in ZERO_CASES}
    assert kinds == {0: ["mp_rank_00_model_states.pt", "rank_0.pt"],
                     1: ["bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", "mp_rank_00_model_states.pt", "rank_0.pt"],
                     2: ["mp_rank_00_model_states.pt", "rank_0.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"],
                     3: ["rank_0.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt",
                         "zero_pp_rank_0_mp_rank_00_optim_states.pt"]}
    assert_refused(found, tmp_path / "markers")


def pipeline_rank(rank, world, root):
    import deepspeed

    from megatron_cpu import install_cpu_shims
    from vlmo_ds.parallel.mpu import init_model_parallel
    from vlmo_ds.parallel.pipeline_stage import PipelineStage
    from vlmo_ds.train.optim import param_groups

    install_cpu_shims()
    mpu = init_model_parallel(1, 2, CFG, zero_stage=1)
    pp = mpu.get_pipeline_model_parallel_rank()

    def engine():
        torch.manual_seed(0)
        stage = PipelineStage(VLMo(CFG), pp, 2)
        optimizer = torch.optim.AdamW(param_groups(stage, 0.01), lr=1e-3)
        return deepspeed.initialize(model=stage, optimizer=optimizer, config=ds_config(1, False), mpu=mpu)[0]

    trainer = {"step": 1, "stage": "vl", "layout": {"tensor": 1, "pipeline": 2, "data": 1, "zero_stage": 1}}
    folder = checkpoint.save(engine(), Path(root) / "pipeline", 1, trainer, {"loader": {"rank": 0}}, rank, 1)
    found = {("pipeline", "unplanted"): outcome(lambda: checkpoint.load(engine(), folder, rank))}
    # each kind planted in both stages' files: every rank stops at the same read, before DeepSpeed's collectives
    for kind in ("mp_rank_0{}_model_states.pt", "zero_pp_rank_0_mp_rank_0{}_optim_states.pt", "rank_{}.pt"):
        names = [kind.format(r) for r in range(2)]
        copy = planted_copy(folder, names, Path(root) / "markers" if rank == 0 else None)
        torch.distributed.barrier()
        found[("pipeline", names[rank])] = outcome(lambda: checkpoint.load(engine(), copy, rank))
        torch.distributed.barrier()
    return found


@pytest.mark.slow
def test_payloads_planted_in_a_pipeline_checkpoint_never_run(tmp_path):
    (tmp_path / "markers").mkdir()
    ranks = run_ranks(pipeline_rank, 2, str(tmp_path), use_deepspeed=True)
    assert sorted(name for r in ranks for _, name in r) == sorted(
        ["unplanted"] * 2 + [f"{kind}{r}{rest}" for r in range(2) for kind, rest in
                             (("mp_rank_0", "_model_states.pt"), ("zero_pp_rank_0_mp_rank_0", "_optim_states.pt"),
                              ("rank_", ".pt"))])
    for found in ranks:
        assert_refused(found, tmp_path / "markers")


def test_a_planted_checkpoint_stops_the_trainer_and_the_tools_with_one_line(run_data, tmp_path, capsys):
    run_dir = tmp_path / "run"
    command = train_command(*recipe_args(run_data, run_dir, 4))
    stopped = subprocess.run(command + ["train.deadline_minutes=1e-6"], env=ENV, capture_output=True, timeout=300)
    folder = run_dir / "checkpoints" / "step_00000001"
    assert stopped.returncode == 75 and folder.is_dir(), stopped.stderr[-2000:]
    plant(folder / "mp_rank_00_model_states.pt", tmp_path / "ran")
    resumed = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    errors = [line for line in resumed.stderr.splitlines() if line.startswith("vlmo_ds.train:")]
    assert resumed.returncode == 2 and "Traceback" not in resumed.stderr, resumed.stderr[-3000:]
    assert len(errors) == 1 and "mp_rank_00_model_states.pt: it holds io.open" in errors[0], errors
    assert json.loads((folder / "trainer.json").read_text())["step"] == 1 and not (tmp_path / "ran").exists()
    for args in (["inspect", str(folder)], ["consolidate", str(folder), str(tmp_path / "out")]):
        with pytest.raises(SystemExit) as status:
            ckpt_main(args)
        err = capsys.readouterr().err
        assert status.value.code == 2, (args, err)
        assert err.count("\n") == 1 and "refusing to unpickle" in err and "io.open" in err, (args, err)
    assert not (tmp_path / "ran").exists()
