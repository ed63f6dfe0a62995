"""Fine-tuning stages through the trainer: the tiny_finetune recipe's retrieval, vqa and nlvr2 stages start from a
pre-training run's weights, train their task, evaluate it on the held-out split and leave what the evaluation command
reads (weights with the head, the VQA answer table, predictions); recipe mistakes about them are one line each."""
import csv
import json
import shutil
import subprocess

import pytest
import torch

from train_cli import ENV, recipe_args, train_command
from vlmo_ds.config import ConfigError, check_files, load_config
from vlmo_ds.data.synthetic.questions import answer_vocabulary
from vlmo_ds.eval.cli import main as eval_main
from vlmo_ds.eval.tables import summary_table
from vlmo_ds.model.published import read_state_dict
from vlmo_ds.quickstart import FINETUNE, recipe_overrides
from vlmo_ds.train.metrics import read_metrics
from vlmo_ds.tasks.optim import head_lr_mult
from vlmo_ds.train.stage_loop import StageOutcome

STEPS = 3


def finetune_args(data, run_dir, weights, *extra):
    steps = [f"stages.{name}.steps={STEPS}" for name in ("retrieval", "vqa", "nlvr2")]
    return [FINETUNE, f"run_dir={run_dir}", *recipe_overrides(FINETUNE, data, weights), *steps,
            "train.micro_batch=4", "train.global_batch=4", "eval.batch=8", "eval.rerank_k=2", *extra]


def record(run_dir, stage):
    return json.loads((run_dir / "stages" / stage / "stage.json").read_text())


@pytest.fixture(scope="module")
def tuned(run_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    subprocess.run(train_command(*recipe_args(run_data, root / "pretrain", 4)), env=ENV, check=True,
                   capture_output=True, text=True)
    weights = root / "pretrain" / "stages" / "image_text" / "weights.safetensors"
    run = subprocess.run(train_command(*finetune_args(run_data, root / "tasks", weights)), env=ENV,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    return root / "tasks", weights, run.stderr


def test_stages_start_from_the_pretrained_weights_and_evaluate(tuned):
    run_dir, weights, log = tuned
    for stage in ("retrieval", "vqa", "nlvr2"):
        assert f"stage {stage} starts from {weights}" in log
    retrieval = record(run_dir, "retrieval")["task"]
    assert retrieval["num_images"] == 5 and retrieval["rerank_k"] == 2 and 0 <= retrieval["rerank_tr@1"] <= 1
    vqa = record(run_dir, "vqa")["task"]
    assert vqa["num_questions"] == 20 and 0 <= vqa["vqa_score"] <= 1 and 0 < vqa["vqa_score_majority"] <= 1
    nlvr2 = record(run_dir, "nlvr2")["task"]
    assert nlvr2["num_examples"] == 10 and 0 <= nlvr2["accuracy"] <= 1
    logged = {key for r in read_metrics(run_dir / "metrics.jsonl") for key in r}
    assert {"eval/vqa/vqa_score", "eval/nlvr2/accuracy", "eval/retrieval/rerank_ir@1", "train/itm"} <= logged
    assert {"train/vqa_bce", "train/vqa_score", "train/nlvr2_ce", "train/nlvr2_acc"} <= logged  # each task's loss


def test_stage_folders_hold_heads_answer_table_and_predictions(tuned):
    run_dir, weights, _ = tuned
    pretrained = read_state_dict(weights)
    vqa = read_state_dict(run_dir / "stages" / "vqa" / "weights.safetensors")
    assert vqa["vqa_classifier.3.weight"].shape[0] == len(answer_vocabulary())
    table = json.loads((run_dir / "stages" / "vqa" / "answer_vocab.json").read_text())
    assert table["answers"] == answer_vocabulary()
    nlvr2 = read_state_dict(run_dir / "stages" / "nlvr2" / "weights.safetensors")
    types = nlvr2["token_type_embeddings.weight"]
    assert types.shape[0] == 3 and pretrained["token_type_embeddings.weight"].shape[0] == 2
    assert "nlvr2_classifier.0.weight" in nlvr2 and not any(k.startswith("vqa_classifier") for k in nlvr2)
    retrieval = read_state_dict(run_dir / "stages" / "retrieval" / "weights.safetensors")
    assert not torch.equal(retrieval["itm_score.fc.weight"], pretrained["itm_score.fc.weight"])  # ITM trained too
    answers = json.loads((run_dir / "predictions" / "vqa.json").read_text())
    assert len(answers) == 20 and all(a["answer"] in table["answers"] for a in answers)
    rows = list(csv.reader((run_dir / "predictions" / "nlvr2.csv").read_text().splitlines()))
    assert len(rows) == 10


def test_evaluation_command_repeats_the_stage_evaluation(tuned, run_data, capsys):
    """The VQA score and NLVR2 accuracy the stage recorded, again from its weights (the answer table beside them)."""
    run_dir, _, _ = tuned
    for task, split, key in (("vqa", "vqa_val", "vqa_score"), ("nlvr2", "nlvr2_dev", "accuracy")):
        code = eval_main([task, "--weights", str(run_dir / "stages" / task / "weights.safetensors"), "--data",
                          str(run_data / split), "--tokenizer", str(run_data / "tok.model"), "--batch", "8"])
        assert code == 0
        again = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("event") == "eval"][-1]
        assert again[f"eval/{task}/{key}"] == pytest.approx(record(run_dir, task)["task"][key], abs=1e-9)
    capsys.readouterr()


def test_summary_table_puts_every_metric_beside_its_baseline(tuned):
    run_dir, _, _ = tuned
    outcomes = {}
    for stage in ("retrieval", "vqa", "nlvr2"):
        found = record(run_dir, stage)
        outcomes[stage] = StageOutcome(stage, found["global_step"], True, found["final"], None, None, found["task"])
    table = summary_table(outcomes)
    for row in ("retrieval: fine-tuned retrieval TR@1", "fine-tuned retrieval, re-ranked by ITM (top 2) IR@1",
                "vqa: VQA score", "nlvr2: NLVR2 accuracy", "chance", "majority answer", "majority label"):
        assert row in table, table
    assert len(table.splitlines()) == 1 + 4 + 1 + 1


def test_a_task_stage_resumes_with_the_same_losses(tuned, run_data, tmp_path):
    """NLVR2 (the grown type table, its head) continued from a checkpoint inside the stage: the same losses."""
    _, weights, _ = tuned
    extra = ["train.only_stage=nlvr2", "stages.nlvr2.steps=4", "train.ckpt_every=2", "train.keep_last=3"]
    run_dir = tmp_path / "nlvr2"
    subprocess.run(train_command(*finetune_args(run_data, run_dir, weights, *extra)), env=ENV, check=True,
                   capture_output=True)
    whole = {r["step"]: r["train/loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "train/loss" in r}
    middle = run_dir / "checkpoints" / f"step_{2 * STEPS + 2:08d}"  # nlvr2's second step: after retrieval and vqa
    assert middle.is_dir() and sorted(whole) == list(range(2 * STEPS + 1, 2 * STEPS + 5))
    subprocess.run(train_command(*finetune_args(run_data, run_dir, weights, *extra, f"train.resume={middle}")),
                   env=ENV, check=True, capture_output=True)
    again = {r["step"]: r["train/loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "train/loss" in r}
    assert again == pytest.approx(whole, rel=1e-6, abs=1e-7)


def test_head_learning_rate_multiplier():
    cfg = load_config(FINETUNE, ["stages.nlvr2.head_lr_mult=5"])
    mults = {stage.name: head_lr_mult(stage) for stage in cfg.stages}
    assert mults == {"retrieval": None, "vqa": 20.0, "nlvr2": 5.0}


BAD = [
    ("eval data on a pre-training stage", "tiny", ["stages.image_text.eval_data=x"],
     "stages.2.eval_data: only fine-tuning stages have it"),
    ("answers on nlvr2", FINETUNE, ["stages.nlvr2.answers=x"], "stages.2.answers: only vqa stages have it"),
    ("head multiplier on retrieval", FINETUNE, ["stages.retrieval.head_lr_mult=2"],
     "stages.0.head_lr_mult: only vqa and nlvr2 stages"),
    ("start from a later stage", FINETUNE, ["stages.retrieval.init_from=vqa"],
     "stages.0.init_from: stage 'vqa' does not run before stage 'retrieval'"),
    ("unknown objective", FINETUNE, ["stages.vqa.loss_weights.itc=1"], "unknown key 'stages.1.loss_weights.itc'"),
    ("tensor parallel", FINETUNE, ["parallel.tensor=2"], "stages.0.kind: retrieval fine-tuning runs data-parallel"),
    ("two sources", FINETUNE, ["stages.vqa.data=[a, b]"], "stages.1.data: a vqa stage reads one shard source"),
]


@pytest.mark.parametrize("recipe, extra, expected", [case[1:] for case in BAD], ids=[case[0] for case in BAD])
def test_bad_task_stage_is_one_line(recipe, extra, expected):
    with pytest.raises(ConfigError) as err:
        load_config(recipe, extra)
    assert expected in str(err.value) and "\n" not in str(err.value), err.value


def test_missing_files_are_named(run_data, tmp_path):
    weights = tmp_path / "none.safetensors"
    cfg = load_config(FINETUNE, recipe_overrides(FINETUNE, run_data, weights))
    with pytest.raises(ConfigError, match=r"^stages.0.init_from: .*none.safetensors is neither an earlier stage"):
        check_files(cfg)
    weights.write_bytes(b"")
    shutil.copytree(run_data / "vqa_val", tmp_path / "vqa_val")  # outside the synthetic folder: no answer table
    cfg = load_config(FINETUNE, recipe_overrides(FINETUNE, run_data, weights) +
                      [f"stages.vqa.data={tmp_path / 'vqa_val'}"])
    with pytest.raises(ConfigError, match=r"^stages.1.answers: no answer_vocab.json in"):
        check_files(cfg)
