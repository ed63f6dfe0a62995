"""The VQA answer normalisation, accuracy, answer table and submission file against hand-checked official rules."""

import json

import pytest

from vlmo_ds.data.formats.vqa_answers import (CONTRACTIONS, answer_counts, answer_targets, build_answer_vocab,
                                              normalize_answer, process_punctuation, soft_score, vocab_index)
from vlmo_ds.eval.vqa import vqa_accuracy, vqa_score, write_submission


@pytest.mark.parametrize("raw, normal", [
    # periods: dropped unless a digit follows
    ("Yes.", "yes"), ("3.5", "3.5"), ("Mr. Smith", "mr smith"),
    # punctuation touching a space is deleted, elsewhere replaced by a space
    ("red, white", "red white"), ("red,white", "red white"), ("t-shirt", "t shirt"), ("black - white", "black white"),
    ("yes!", "yes"), ("hot-dog (2)", "hot dog 2"), ("it's", "it's"),
    # a digit-comma-digit anywhere deletes every mark instead
    ("1,000", "1000"), ("1,000 t-shirts", "1000 tshirts"),
    # articles and number words
    ("the dog", "dog"), ("a man", "man"), ("An apple", "apple"), ("the the", ""),
    ("two", "2"), ("Ten", "10"), ("none", "0"), ("zero", "0"), ("eleven", "eleven"),
    # contractions get their apostrophe; the official table's capitalised keys never match after lower-casing
    ("dont", "don't"), ("isnt", "isn't"), ("Whats", "what's"), ("Im", "im"), ("somebody'd", "somebodyd"),
    # white space
    ("  two\n", "2"), ("left\tside", "left side"),
])
def test_official_normalisation(raw, normal):
    assert normalize_answer(raw) == normal


def test_punctuation_checks_the_original_text_and_period_limit():
    # ";" touches a space in the original, so it is deleted even though "/" before it was replaced
    assert process_punctuation("a/b ;c") == "a b c"
    # the official call passes re.UNICODE (32) as the count: only the first 32 periods go
    assert process_punctuation("." * 40 + "x") == "." * 8 + "x"


def test_contraction_table_is_the_official_one():
    assert len(CONTRACTIONS) == 120
    assert CONTRACTIONS["youre"] == "you're" and CONTRACTIONS["ow's'at"] == "'ow's'at"
    assert all(k.replace("'", "") == v.replace("'", "") for k, v in CONTRACTIONS.items())


@pytest.mark.parametrize("humans, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (7, 1.0), (10, 1.0)])
def test_accuracy_averages_the_ten_leave_one_out_subsets(humans, expected):
    # k humans say "cat": a human who said it leaves k-1 matches, another leaves k; 3 matches give full credit
    answers = ["cat"] * humans + ["dog"] * (10 - humans)
    by_hand = (humans * min(1, (humans - 1) / 3) + (10 - humans) * min(1, humans / 3)) / 10 if humans else 0.0
    assert vqa_accuracy("cat", answers) == pytest.approx(by_hand)
    assert vqa_accuracy("cat", answers) == pytest.approx(expected)
    assert soft_score(humans) == expected  # the training target is the same function of the count


def test_normalisation_only_when_humans_disagree():
    # unanimous: raw strings compared (the official rule), so the digit form scores nothing
    assert vqa_accuracy("2", ["two"] * 10) == 0.0
    assert vqa_accuracy("two", ["two"] * 10) == 1.0
    assert vqa_accuracy(" two\n", ["two"] * 10) == 1.0  # white space is always cleaned
    # humans disagree: everything is normalised, "two", "2" and "Two." agree
    answers = ["two"] * 8 + ["2", "Two."]
    assert vqa_accuracy("2", answers) == 1.0
    assert vqa_accuracy("the two", answers) == 1.0
    # 2 of 10 humans say "a red one" ~ "red 1": 2 x (1/3) + 8 x (2/3) over 10
    assert vqa_accuracy("red 1", ["a red one", "red one"] + ["blue"] * 8) == pytest.approx(0.6)


def test_vqa_score_overall_and_per_type():
    questions = [
        {"question_id": 1, "answers": ["yes"] * 10, "answer_type": "yes/no", "question_type": "is the"},
        {"question_id": 2, "answers": ["2"] * 3 + ["3"] * 7, "answer_type": "number", "question_type": "how many"},
        {"question_id": 3, "answers": ["red"] + ["blue"] * 9, "answer_type": "other", "question_type": "what color"},
        {"question_id": 4, "answers": ["no"] * 10, "answer_type": "yes/no", "question_type": "is the"},
    ]
    predictions = {1: "yes", 2: "two", 3: "red", 4: "yes"}  # 1.0, 0.9, 0.3, 0.0
    score = vqa_score(predictions, questions)
    assert score.overall == pytest.approx((1.0 + 0.9 + 0.3 + 0.0) / 4)
    assert score.per_answer_type == pytest.approx({"yes/no": 0.5, "number": 0.9, "other": 0.3})
    assert score.per_question_type["is the"] == pytest.approx(0.5)
    assert score.per_question == pytest.approx({1: 1.0, 2: 0.9, 3: 0.3, 4: 0.0})
    metrics = score.as_metrics()
    assert metrics["vqa_score_yes_no"] == pytest.approx(0.5) and metrics["num_questions"] == 4


def test_vqa_score_requires_one_prediction_per_question():
    questions = [{"question_id": 1, "answers": ["yes"] * 10}, {"question_id": 2, "answers": ["no"] * 10}]
    with pytest.raises(ValueError, match="no prediction for question 2"):
        vqa_score({1: "yes"}, questions)
    with pytest.raises(ValueError, match="not in the set"):
        vqa_score({1: "yes", 2: "no", 3: "no"}, questions)
    assert vqa_score({1: "yes", 3: "x"}, questions, strict=False).overall == 0.5
    with pytest.raises(ValueError, match="at least one human answer"):
        vqa_accuracy("yes", [])


def test_answer_vocabulary_and_targets():
    majors = ["Yes", "yes", "yes.", "two", "2", "2", "cat", "dog", "dog"]
    assert build_answer_vocab(majors, min_count=3) == ["yes", "2"]  # first-occurrence order, normalised
    assert build_answer_vocab(majors, min_count=2) == ["yes", "2", "dog"]
    assert build_answer_vocab(["a", "A", "the", "b"], min_count=3) == [""]  # articles normalise to "", kept
    counts = answer_counts(["Dog", "dog", "cat", "Two", "2", "2", "2", "yes", "dogs"])
    assert counts == {"dog": 2, "cat": 1, "2": 4, "yes": 1, "dogs": 1}
    assert answer_counts(["Dog", "dog"], normalize=False) == {"Dog": 1, "dog": 1}
    labels, scores = answer_targets(counts, vocab_index(["yes", "2", "dog"]))
    assert labels == [2, 1, 0] and scores == [0.6, 1.0, 0.3]
    with pytest.raises(ValueError, match="repeats"):
        vocab_index(["yes", "no", "yes"])


def test_submission_file(tmp_path):
    path = write_submission(tmp_path / "vqa_test-dev2015_vlmo_results.json", {42: "yes", 7: "2"})
    assert json.loads(path.read_text()) == [{"question_id": 7, "answer": "2"}, {"question_id": 42, "answer": "yes"}]
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(ValueError, match="int question id"):
        write_submission(tmp_path / "bad.json", {"7": "yes"})
