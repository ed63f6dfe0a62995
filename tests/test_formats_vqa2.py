"""VQA v2 official files -> VQA shards + answer table -> the shards read back, and the official score on them."""

import json

import numpy as np
import pytest

from shard_fixtures import image_bytes
from test_formats_karpathy import load_tool, read_split
from vlmo_ds.data.decode import decode_image, decode_json, image_member
from vlmo_ds.data.formats.vqa2 import load_vocab
from vlmo_ds.eval.vqa import vqa_score

QUESTION_FILE = "v2_OpenEnded_mscoco_{}_questions.json"
ANNOTATION_FILE = "v2_mscoco_{}_annotations.json"


def answers_of(*pairs):
    """Ten official answer dicts from (answer, how many) pairs."""
    flat = [a for a, n in pairs for _ in range(n)]
    assert len(flat) == 10
    return [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(flat)]


def annotation(qid, image_id, major, answers, answer_type="other", question_type="what is"):
    return {"question_id": qid, "image_id": image_id, "multiple_choice_answer": major, "answers": answers,
            "answer_type": answer_type, "question_type": question_type}


def write_split(root, images, subtype, questions, annotations=None, image_folder=None, skip_images=()):
    folder = image_folder or subtype
    (root / QUESTION_FILE.format(subtype)).write_text(json.dumps({
        "info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "license": {}, "data_subtype": subtype,
        "questions": [{"image_id": i, "question": q, "question_id": qid} for qid, i, q in questions]}))
    if annotations is not None:
        (root / ANNOTATION_FILE.format(subtype)).write_text(json.dumps({
            "info": {}, "license": {}, "data_subtype": subtype, "annotations": annotations}))
    (images / folder).mkdir(parents=True, exist_ok=True)
    files = {}
    for _, image_id, _ in questions:
        if image_id in skip_images:
            continue
        path = images / folder / f"COCO_{folder}_{image_id:012d}.jpg"
        files[image_id] = image_bytes(np.full((10, 10, 3), image_id % 255, np.uint8), "JPEG")
        path.write_bytes(files[image_id])
    return files


@pytest.fixture()
def vqa_root(tmp_path):
    root, images = tmp_path / "vqa", tmp_path / "coco"
    root.mkdir()
    train_q = [(90, 9, "What is it?"), (91, 9, "How many dogs?"), (250, 25, "Is it red?"),
               (251, 25, "No answers here?"), (252, 25, "Not annotated?"), (260, 26, "Where is the image?")]
    train_a = [annotation(90, 9, "cat", answers_of(("cat", 6), ("a cat", 2), ("dog", 2))),
               annotation(91, 9, "2", answers_of(("two", 3), ("2", 5), ("3", 2)), "number", "how many"),
               annotation(250, 25, "yes", answers_of(("yes", 9), ("no", 1)), "yes/no", "is it"),
               annotation(251, 25, "", []),  # a question without answers
               annotation(260, 26, "yes", answers_of(("yes", 10)), "yes/no", "is it"),
               annotation(999, 25, "no", answers_of(("no", 10)), "yes/no", "is it")]  # unknown question
    files = write_split(root, images, "train2014", train_q, train_a, skip_images=(26,))
    val_q = [(420, 42, "What color?"), (421, 42, "Is it a cat?")]
    val_a = [annotation(420, 42, "Red.", answers_of(("red", 4), ("Red", 3), ("blue", 3))),
             annotation(421, 42, "yes", answers_of(("yes", 10)), "yes/no", "is it")]
    files.update(write_split(root, images, "val2014", val_q, val_a))
    test_q = [(700, 70, "What is this?")]
    files.update(write_split(root, images, "test-dev2015", test_q, image_folder="test2015"))
    return root, images, files


def test_vqa_round_trip(vqa_root, tmp_path):
    root, images, files = vqa_root
    out = tmp_path / "shards"
    assert load_tool().main(["vqa2", "--root", str(root), "--images", str(images), "--out", str(out),
                             "--min-count", "2", "--quiet"]) == 0
    # majority answers of train then val, normalised: cat, 2, yes, "", yes, no | red, yes -> counts >= 2
    assert load_vocab(out / "answer_vocab.json") == ["yes"]
    vocab = json.loads((out / "answer_vocab.json").read_text())
    assert vocab["min_count"] == 2 and vocab["sources"] == [ANNOTATION_FILE.format(s) for s in ("train2014",
                                                                                              "val2014")]
    train = {decode_json(s)["question_id"]: s for s in read_split(out / "train")}
    assert sorted(train) == [90, 91, 250]
    for qid, sample in train.items():
        assert image_member(sample) == files[decode_json(sample)["image_id"]]
        decode_image(image_member(sample))
    cat = decode_json(train[90])
    assert cat["answers"] == ["cat"] * 6 + ["a cat"] * 2 + ["dog"] * 2  # raw, in answer_id order
    assert cat["answer_counts"] == {"cat": 8, "dog": 2}  # "a cat" normalises to "cat"
    assert cat["labels"] == [] and cat["question"] == "What is it?" and cat["image_id"] == 9
    assert decode_json(train[91])["answer_counts"] == {"2": 8, "3": 2}
    yes = decode_json(train[250])
    assert (yes["labels"], yes["scores"], yes["answer_type"]) == ([0], [1.0], "yes/no")
    val = {decode_json(s)["question_id"]: decode_json(s) for s in read_split(out / "val")}
    assert val[420]["answer_counts"] == {"red": 7, "blue": 3} and val[420]["multiple_choice_answer"] == "Red."
    test_dev = [decode_json(s) for s in read_split(out / "test-dev")]
    assert test_dev == [{"question_id": 700, "image_id": 70, "question": "What is this?"}]

    report = json.loads((out / "conversion_report.json").read_text())
    problems = report["splits"]["train"]["problems"]
    assert problems["no_answers"]["names"] == ["question 251", "question 252"]
    assert problems["no_question"]["names"] == ["question 999"]
    assert problems["missing_image"]["count"] == 1
    assert problems["missing_image"]["names"][0].startswith("question 260: ")
    assert report["splits"]["train"]["notes"]["no_label"]["names"] == ["question 90", "question 91"]
    assert report["vocab_size"] == 1

    # the official score on the round-tripped annotations, by hand: 420 "red" 7 of 10 -> 1.0; 421 "no" -> 0
    score = vqa_score({420: "red", 421: "no"}, val.values())
    assert score.overall == pytest.approx(0.5) and score.per_answer_type == {"other": 1.0, "yes/no": 0.0}


def test_vocab_reuse_and_published_counting(vqa_root, tmp_path):
    root, images, _ = vqa_root
    table = tmp_path / "table.json"
    table.write_text(json.dumps({"answers": ["2", "cat", "yes"]}))
    out = tmp_path / "shards"
    assert load_tool().main(["vqa2", "--root", str(root), "--images", str(images), "--out", str(out),
                             "--vocab", str(table), "--splits", "train", "--count-raw-answers", "--quiet"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["answer_vocab.json", "conversion_report.json", "train"]
    train = {decode_json(s)["question_id"]: decode_json(s) for s in read_split(out / "train")}
    # raw counting: "two" does not count for "2", "a cat" not for "cat"
    assert (train[91]["labels"], train[91]["scores"]) == ([0], [1.0])
    assert list(train[91]["answer_counts"].items()) == [("two", 3), ("2", 5), ("3", 2)]  # first-answer order
    assert (train[90]["labels"], train[90]["scores"]) == ([1], [1.0])


def test_missing_questions_file_is_a_clear_error(tmp_path, capsys):
    assert load_tool().main(["vqa2", "--root", str(tmp_path), "--images", str(tmp_path), "--out",
                             str(tmp_path / "o"), "--quiet"]) == 2
    assert "no VQA v2 questions file" in capsys.readouterr().err
