"""VQA and NLVR2 evaluation: predictions over a split against a direct computation, the official scores of them,
the baselines by hand, the submission files, bad samples counted, and 2 gloo ranks against 1."""
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from distributed import run_ranks
from shard_fixtures import WordTokenizer, image_bytes, write_shards
from vlmo_ds.data.transforms import build_image_transform
from vlmo_ds.eval.nlvr2_eval import evaluate_nlvr2
from vlmo_ds.eval.tables import nlvr2_table, task_table, vqa_table
from vlmo_ds.eval.task_sets import load_task_set
from vlmo_ds.eval.vqa import vqa_score
from vlmo_ds.eval.vqa_eval import baselines, evaluate_vqa
from vlmo_ds.model.config import preset
from vlmo_ds.tasks.kinds import evaluate_task
from vlmo_ds.tasks.nlvr2 import nlvr2_logits
from vlmo_ds.tasks.start import build_task_model, task_model_config
from vlmo_ds.tasks.vqa import vqa_logits

CFG = preset("tiny", vocab_size=1000, patch_size=16, max_text_len=8, drop_path_rate=0.0)
ANSWERS = ["yes", "no", "1", "2", "red", "blue"]
WORDS = "what color is the shape how many are there red blue".split()


def _image(seed: int) -> bytes:
    return image_bytes(np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8))


def write_vqa(folder, n: int = 7, annotated: bool = True) -> list[dict]:
    rng = np.random.default_rng(0)
    samples = []
    for i in range(n):
        meta = {"question_id": 100 + i, "question": " ".join(rng.choice(WORDS, 4))}
        if annotated:
            meta.update(answers=list(rng.choice(ANSWERS[:4], 10)), answer_type=["yes/no", "number", "other"][i % 3],
                        multiple_choice_answer=ANSWERS[i % 3])
        samples.append({"__key__": f"{i:04d}", "jpg": _image(i), "json": meta})
    bad = {"__key__": "zz_noquestion", "jpg": _image(99), "json": {"question_id": 999}}
    write_shards(folder, samples[:3] + [bad] + samples[3:], per_shard=3)
    return samples


def write_nlvr2(folder, n: int = 7, official: bool = True) -> list[dict]:
    samples = []
    for i in range(n):
        identifier = f"dev-{i // 2}-{i % 2}-0" if official else f"dev-{i}"
        meta = {"identifier": identifier, "sentence": " ".join(WORDS[i % 5:i % 5 + 4]), "label": i % 3 != 0}
        samples.append({"__key__": f"{i:04d}", "left.png": _image(i), "right.jpg": _image(50 + i), "json": meta})
    bad = {"__key__": "zz_oneimage", "left.png": _image(98), "json": {"identifier": "x-1-1", "sentence": "a b"}}
    write_shards(folder, samples[:2] + [bad] + samples[2:], per_shard=4)
    return samples


def _model(task: str):
    torch.manual_seed(0)
    model = build_task_model(task_model_config(CFG, task), task, len(ANSWERS) if task == "vqa" else None)
    return model.eval()


def _direct_inputs(samples, image_keys):
    transform = build_image_transform(CFG.image_size, train=False)
    return [torch.stack([transform(Image.open(io.BytesIO(s[k])).convert("RGB")) for s in samples])
            for k in image_keys]


def test_task_set_index_skips_and_counts(tmp_path):
    write_vqa(tmp_path / "vqa")
    vqa = load_task_set(tmp_path / "vqa", "vqa")
    assert [e.fields["question_id"] for e in vqa.examples] == list(range(100, 107))
    assert dict(vqa.skipped) == {"bad_json": 1}
    write_nlvr2(tmp_path / "nlvr2")
    nlvr2 = load_task_set(tmp_path / "nlvr2", "nlvr2")
    assert len(nlvr2.examples) == 7 and dict(nlvr2.skipped) == {"no_image": 1}
    with pytest.raises(ValueError, match="no usable vqa example"):
        load_task_set(tmp_path / "nlvr2", "vqa")


def test_vqa_evaluation_matches_a_direct_computation(tmp_path):
    samples = write_vqa(tmp_path)
    model = _model("vqa")
    model.train()
    metrics = evaluate_vqa(model, tmp_path, WordTokenizer(), ANSWERS, CFG.image_size, CFG.max_text_len,
                           batch_size=3, submission=tmp_path / "results.json")
    assert model.training
    model.eval()
    (images,) = _direct_inputs(samples, ["jpg"])
    text = WordTokenizer().batch_encode([s["json"]["question"] for s in samples], CFG.max_text_len)
    with torch.no_grad():
        labels = vqa_logits(model, text["text_ids"], text["text_mask"], images).argmax(-1).tolist()
    predictions = {s["json"]["question_id"]: ANSWERS[label] for s, label in zip(samples, labels)}
    questions = [s["json"] for s in samples]
    expected = vqa_score(predictions, questions).as_metrics()
    assert {k: metrics[k] for k in expected} == pytest.approx(expected)
    assert metrics["skipped_samples"] == 1 and metrics["num_questions"] == 7
    written = json.loads((tmp_path / "results.json").read_text())
    assert written == [{"question_id": q, "answer": a} for q, a in sorted(predictions.items())]


def test_vqa_test_split_gets_predictions_only(tmp_path):
    write_vqa(tmp_path, annotated=False)
    metrics = evaluate_vqa(_model("vqa"), tmp_path, WordTokenizer(), ANSWERS, CFG.image_size, CFG.max_text_len,
                           submission=tmp_path / "test.json")
    assert "vqa_score" not in metrics and len(json.loads((tmp_path / "test.json").read_text())) == 7
    assert vqa_table(metrics) == "VQA, 7 questions (no answers in the split: predictions only)"
    with pytest.raises(ValueError, match="answer vocabulary has 2"):
        evaluate_vqa(_model("vqa"), tmp_path, WordTokenizer(), ["a", "b"], CFG.image_size, CFG.max_text_len)


def test_vqa_baselines_by_hand():
    questions = [{"question_id": 1, "answers": ["yes"] * 10, "answer_type": "yes/no", "multiple_choice_answer": "yes"},
                 {"question_id": 2, "answers": ["yes"] * 10, "answer_type": "yes/no", "multiple_choice_answer": "yes"},
                 {"question_id": 3, "answers": ["2"] * 2 + ["3"] * 8, "answer_type": "number",
                  "multiple_choice_answer": "3"}]
    # majority "yes": 1, 1, 0; type prior: yes, yes, 3 -> 1, 1, 1
    assert baselines(questions) == pytest.approx({"vqa_score_majority": 2 / 3, "vqa_score_type_prior": 1.0})


def test_nlvr2_evaluation_matches_a_direct_computation(tmp_path):
    samples = write_nlvr2(tmp_path)
    model = _model("nlvr2")
    metrics = evaluate_nlvr2(model, tmp_path, WordTokenizer(), CFG.image_size, CFG.max_text_len, batch_size=2,
                             predictions=tmp_path / "pred.csv")
    left, right = _direct_inputs(samples, ["left.png", "right.jpg"])
    text = WordTokenizer().batch_encode([s["json"]["sentence"] for s in samples], CFG.max_text_len)
    with torch.no_grad():
        predicted = nlvr2_logits(model, text["text_ids"], text["text_mask"], left, right).argmax(-1).tolist()
    labels = [s["json"]["label"] for s in samples]
    right_answers = [bool(p) == label for p, label in zip(predicted, labels)]
    assert metrics["accuracy"] == pytest.approx(sum(right_answers) / 7)
    sentences = {}
    for s, ok in zip(samples, right_answers):
        key = s["json"]["identifier"].split("-")
        sentences[(key[1], key[3])] = sentences.get((key[1], key[3]), True) and ok
    assert metrics["consistency"] == pytest.approx(sum(sentences.values()) / len(sentences))
    assert metrics["majority"] == pytest.approx(4 / 7) and metrics["skipped_samples"] == 1
    lines = (tmp_path / "pred.csv").read_text().splitlines()
    assert lines[0] == f"dev-0-0-0,{bool(predicted[0])}" and len(lines) == 7


def test_nlvr2_without_official_identifiers_reports_accuracy(tmp_path):
    write_nlvr2(tmp_path, official=False)
    metrics = evaluate_task("nlvr2", _model("nlvr2"), tmp_path, WordTokenizer(), CFG)
    assert "consistency" not in metrics and 0 <= metrics["accuracy"] <= 1
    assert nlvr2_table(metrics).splitlines()[1].startswith("accuracy %")


def test_tables():
    text = task_table("vqa", {"num_questions": 3, "vqa_score": 0.5, "vqa_score_yes_no": 0.75,
                              "vqa_score_majority": 0.25, "vqa_score_type_prior": 0.4})
    assert text.splitlines() == [
        "VQA, 3 questions",
        "VQA score %                50.00   majority answer 25.00, answer-type prior 40.00",
        "  yes_no                   75.00"]
    text = task_table("nlvr2", {"num_examples": 4, "accuracy": 0.75, "majority": 0.5, "consistency": 0.5})
    assert text.splitlines()[1:] == ["accuracy %                 75.00   majority label 50.00",
                                     "consistency %              50.00"]
    with pytest.raises(ValueError, match="no table"):
        task_table("caption", {})


def _rank_eval(rank, world, vqa_dir, nlvr2_dir):
    import torch.distributed as dist
    common = dict(batch_size=2, rank=rank, world_size=world, group=dist.group.WORLD)
    vqa = evaluate_vqa(_model("vqa"), vqa_dir, WordTokenizer(), ANSWERS, CFG.image_size, CFG.max_text_len, **common)
    nlvr2 = evaluate_nlvr2(_model("nlvr2"), nlvr2_dir, WordTokenizer(), CFG.image_size, CFG.max_text_len, **common)
    return vqa, nlvr2


@pytest.mark.slow
def test_two_ranks_give_the_single_rank_metrics(tmp_path):
    write_vqa(tmp_path / "vqa")
    write_nlvr2(tmp_path / "nlvr2")
    single_vqa = evaluate_vqa(_model("vqa"), tmp_path / "vqa", WordTokenizer(), ANSWERS, CFG.image_size,
                              CFG.max_text_len, batch_size=2)
    single_nlvr2 = evaluate_nlvr2(_model("nlvr2"), tmp_path / "nlvr2", WordTokenizer(), CFG.image_size,
                                  CFG.max_text_len, batch_size=2)
    for vqa, nlvr2 in run_ranks(_rank_eval, 2, str(tmp_path / "vqa"), str(tmp_path / "nlvr2")):
        assert {k: v for k, v in vqa.items() if k != "seconds"} == \
            {k: v for k, v in single_vqa.items() if k != "seconds"}
        assert {k: v for k, v in nlvr2.items() if k != "seconds"} == \
            {k: v for k, v in single_nlvr2.items() if k != "seconds"}
