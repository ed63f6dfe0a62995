"""The stage scheduler's decisions from the run folder: which stages run, where the first continues, which weights a
fresh stage starts from, what is stale; and stage records written whole."""
import json

import pytest
import torch

from vlmo_ds.config import ConfigError, load_config
from vlmo_ds.model.config import preset
from vlmo_ds.model.published import read_state_dict
from vlmo_ds.train import stage_record
from vlmo_ds.train.schedule import clear_stale, plan_run, start_weights


def config(run_dir, *extra):
    return load_config("tiny", [f"run_dir={run_dir}", *extra])


def finish(run_dir, name):
    folder = stage_record.stage_dir(run_dir, name)
    folder.mkdir(parents=True)
    (folder / stage_record.RECORD_FILE).write_text("{}")


def checkpoint_of(run_dir, step, stage):
    folder = run_dir / "checkpoints" / f"step_{step:08d}"
    folder.mkdir(parents=True)
    (folder / "trainer.json").write_text(json.dumps({"step": step, "stage": stage}))
    return folder


def test_auto_continues_the_first_unfinished_stage(tmp_path):
    run = plan_run(config(tmp_path))
    assert (run.first, run.stop, run.resume_from, run.finished) == (0, 3, None, ())
    finish(tmp_path, "image_mim")
    checkpoint_of(tmp_path, 400, "image_mim")
    newest = checkpoint_of(tmp_path, 500, "text_mlm")
    checkpoint_of(tmp_path, 450, "text_mlm")
    run = plan_run(config(tmp_path))
    assert (run.first, run.stop, run.resume_from, run.finished) == (1, 3, newest, ("image_mim",))
    fresh = plan_run(config(tmp_path, "train.resume=none"))
    assert (fresh.first, fresh.stop, fresh.resume_from, fresh.finished) == (0, 3, None, ())


def test_one_stage_per_job(tmp_path):
    with pytest.raises(ConfigError, match=r"^stages.1: stage 'text_mlm' starts from the final weights of stage "
                                          r"'image_mim', which has not finished .* \(--stage image_mim\)"):
        plan_run(config(tmp_path, "train.only_stage=text_mlm"))
    finish(tmp_path, "image_mim")
    run = plan_run(config(tmp_path, "train.only_stage=text_mlm"))
    assert (run.first, run.stop, run.resume_from) == (1, 2, None)
    done = plan_run(config(tmp_path, "train.only_stage=image_mim"))
    assert done.first == done.stop == 3  # finished: a re-queued job does nothing
    weights = tmp_path / "beit.safetensors"
    weights.write_bytes(b"")
    run = plan_run(config(tmp_path, "train.only_stage=image_text", f"stages.2.init_from={weights}"))
    assert (run.first, run.stop) == (2, 3)  # init_from: the previous stage need not have finished


def test_explicit_checkpoint_picks_its_stage(tmp_path):
    path = checkpoint_of(tmp_path, 420, "text_mlm")
    run = plan_run(config(tmp_path, f"train.resume={path}"))
    assert (run.first, run.stop, run.resume_from) == (1, 3, path)
    with pytest.raises(ConfigError, match="belongs to stage 'text_mlm' but train.only_stage=image_text"):
        plan_run(config(tmp_path, f"train.resume={path}", "train.only_stage=image_text"))


def test_start_weights_and_stale_state(tmp_path):
    cfg = config(tmp_path)
    assert start_weights(cfg, 0) is None
    assert start_weights(cfg, 2) == tmp_path / "stages/text_mlm/weights.safetensors"
    assert str(start_weights(config(tmp_path, f"stages.0.init_from={__file__}"), 0)) == __file__
    for step, name in ((400, "image_mim"), (800, "text_mlm"), (900, "image_text")):
        finish(tmp_path, name)
        checkpoint_of(tmp_path, step, name)
    clear_stale(cfg, 1, fresh=False)
    assert [stage_record.is_finished(tmp_path, n) for n in ("image_mim", "text_mlm", "image_text")] == [
        True, True, False]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000400", "step_00000800"]
    clear_stale(cfg, 1, fresh=True)
    assert not stage_record.is_finished(tmp_path, "text_mlm") and stage_record.is_finished(tmp_path, "image_mim")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000400"]


def test_stage_record_round_trip(tmp_path):
    cfg = preset("tiny", vocab_size=64, max_text_len=16)
    state = {"a": torch.randn(3, 4), "b": torch.arange(5.0)}
    stage_record.write_record(tmp_path, "text_mlm", state, cfg, {"steps": 7}, rank=0)
    assert stage_record.is_finished(tmp_path, "text_mlm") and stage_record.read_record(tmp_path, "text_mlm") == {
        "steps": 7}
    path = stage_record.stage_dir(tmp_path, "text_mlm") / stage_record.WEIGHTS_FILE
    assert stage_record.weights_config(path) == cfg
    loaded = read_state_dict(path)
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    stage_record.write_record(tmp_path, "text_mlm", {"a": torch.zeros(1)}, cfg, {"steps": 8}, rank=0)  # replaced
    assert list(read_state_dict(path)) == ["a"] and not (tmp_path / "stages/text_mlm.tmp").exists()
