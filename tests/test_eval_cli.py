"""`python -m vlmo_ds.eval` on the test synthetic data: a stage record's weights, every task, the table printed and
the metrics appended to the run folder's metrics.jsonl; weights without the task's head refused with exit status 2."""
import json
import subprocess
import sys

import pytest
import torch

from vlmo_ds.data.synthetic.questions import answer_vocabulary
from vlmo_ds.eval.cli import main
from vlmo_ds.eval.export import read_embeddings
from vlmo_ds.model.config import preset
from vlmo_ds.tasks.start import build_task_model, task_model_config
from vlmo_ds.train.stage_record import write_record

CFG = preset("tiny", vocab_size=120, patch_size=16, max_text_len=16, drop_path_rate=0.0)


def _weights(run_dir, task: str):
    torch.manual_seed(0)
    cfg = task_model_config(CFG, task)
    model = build_task_model(cfg, task, len(answer_vocabulary()) if task == "vqa" else None)
    folder = write_record(run_dir, task, model.state_dict(), cfg, {"name": task, "global_step": 42}, rank=0)
    return folder / "weights.safetensors"


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _args(task, weights, data, run_data, *extra):
    return [task, "--weights", str(weights), "--data", str(run_data / data), "--tokenizer",
            str(run_data / "tok.model"), "--batch", "8", *extra]


def test_vqa_and_nlvr2(tmp_path, run_data, capsys):
    run = tmp_path / "run"
    assert main(_args("vqa", _weights(run, "vqa"), "vqa_val", run_data, "--submission", str(tmp_path / "s.json"))) == 0
    out = capsys.readouterr().out
    assert "VQA score %" in out and "majority answer" in out
    (record,) = _records(run)
    assert record["step"] == 42 and record["event"] == "eval" and record["task"] == "vqa"
    assert 0 <= record["eval/vqa/vqa_score"] <= 1 and record["eval/vqa/num_questions"] == 20
    assert len(json.loads((tmp_path / "s.json").read_text())) == 20
    assert main(_args("nlvr2", _weights(run, "nlvr2"), "nlvr2_dev", run_data,
                      "--predictions", str(tmp_path / "p.csv"))) == 0
    assert "accuracy %" in capsys.readouterr().out
    assert _records(run)[-1]["eval/nlvr2/num_examples"] == 10
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 10


def test_retrieval_with_reranking_and_export(tmp_path, run_data, capsys):
    run = tmp_path / "run"
    weights = _weights(run, "retrieval")
    assert main(_args("retrieval", weights, "retrieval_test", run_data, "--rerank-k", "2")) == 0
    out = capsys.readouterr().out
    assert "re-ranked by ITM, top 2 candidates" in out and "metrics appended to" in out
    assert {"eval/retrieval/tr@1", "eval/retrieval/rerank_ir@1"} <= set(_records(run)[-1])
    out_dir = tmp_path / "emb"
    assert main(_args("export-embeddings", weights, "retrieval_test", run_data, "--out", str(out_dir),
                      "--dtype", "float16", "--metrics", str(tmp_path / "m.jsonl"))) == 0
    ids, vectors, _ = read_embeddings(out_dir, "image")
    assert len(ids) == 5 and vectors.shape == (5, CFG.dim) and vectors.dtype == torch.float16
    assert json.loads((tmp_path / "m.jsonl").read_text())["eval/export-embeddings/image_count"] == 5


def test_refusals(tmp_path, run_data, capsys):
    weights = _weights(tmp_path / "run", "retrieval")
    assert main(_args("vqa", weights, "vqa_val", run_data)) == 2
    assert "holds no vqa_classifier" in capsys.readouterr().err
    vqa = _weights(tmp_path / "run", "vqa")
    answers = tmp_path / "answers.json"
    answers.write_text(json.dumps({"answers": ["yes", "no"]}))
    assert main(_args("vqa", vqa, "vqa_val", run_data, "--answers", str(answers))) == 2
    assert "2 answers but the VQA head 24" in capsys.readouterr().err
    assert main(_args("export-embeddings", weights, "retrieval_test", run_data)) == 2
    assert "--out" in capsys.readouterr().err


@pytest.mark.slow
def test_help():
    result = subprocess.run([sys.executable, "-m", "vlmo_ds.eval", "--help"], capture_output=True, text=True,
                            check=True)
    assert "export-embeddings" in result.stdout and "--rerank-k" in result.stdout
