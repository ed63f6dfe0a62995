"""VQA answers as the official VQA evaluation sees them, and the answer table VLMo's VQA head is trained on.

Normalisation follows the official evaluation (GT-Vision-Lab/VQA, vqaEval.py), quirks included, because a score is
only comparable when the rules are identical:
- punctuation: each of ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` is deleted where it touches a space in the
  original text (or anywhere, if the text holds a digit-comma-digit such as "1,000"), else replaced by a space;
  then periods not followed by a digit are deleted (the official call passes ``re.UNICODE`` where the count goes,
  so at most 32 of them); the official look-behind is misspelled and never tests the character before;
- words: lower-cased, split on white space, number words "none", "zero" ... "ten" become digits, the articles
  "a", "an", "the" are dropped, and 120 apostrophe-less contractions ("dont", "isnt", ...) get their apostrophe
  (the official table, with its oddities: capitalised keys that never match, "somebody'd" -> "somebodyd").

Training targets follow the published VLMo / ViLT answer table: the vocabulary is every normalised
``multiple_choice_answer`` of the annotation files that occurs at least 9 times (3129 answers for VQA v2
train + val), in order of first occurrence, so that label indices line up with published VQA heads; a question's
target gives each vocabulary answer a soft score by how many of the humans gave it: 1 -> 0.3, 2 -> 0.6, 3 -> 0.9,
4 or more -> 1.0.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                "?", "!")
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
# The official pattern, kept as is: "(?!<=\d)" is a look-AHEAD for "<=" and a digit, so it never tests the
# character before the period.
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_PERIOD_LIMIT = re.UNICODE.value  # the official code passes re.UNICODE (32) as re.sub's count
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset(("a", "an", "the"))
_CONTRACTION_TABLE = """
    aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've
    couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've
    hadn'tve=hadn't've hasnt=hasn't havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's
    howd=how'd howll=how'll hows=how's Id've=I'd've I'dve=I'd've Im=I'm Ive=I've isnt=isn't itd=it'd
    itd've=it'd've it'dve=it'd've itll=it'll let's=let's maam=ma'am mightnt=mightn't mightnt've=mightn't've
    mightn'tve=mightn't've mightve=might've mustnt=mustn't mustve=must've neednt=needn't notve=not've
    oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at 'ow'sat='ow's'at shant=shan't
    shed've=she'd've she'dve=she'd've she's=she's shouldve=should've shouldnt=shouldn't
    shouldnt've=shouldn't've shouldn'tve=shouldn't've somebody'd=somebodyd somebodyd've=somebody'd've
    somebody'dve=somebody'd've somebodyll=somebody'll somebodys=somebody's someoned=someone'd
    someoned've=someone'd've someone'dve=someone'd've someonell=someone'll someones=someone's
    somethingd=something'd somethingd've=something'd've something'dve=something'd've
    somethingll=something'll thats=that's thered=there'd thered've=there'd've there'dve=there'd've
    therere=there're theres=there's theyd=they'd theyd've=they'd've they'dve=they'd've theyll=they'll
    theyre=they're theyve=they've twas='twas wasnt=wasn't wed've=we'd've we'dve=we'd've weve=we've
    werent=weren't whatll=what'll whatre=what're whats=what's whatve=what've whens=when's whered=where'd
    wheres=where's whereve=where've whod=who'd whod've=who'd've who'dve=who'd've wholl=who'll whos=who's
    whove=who've whyll=why'll whyre=why're whys=why's wont=won't wouldve=would've wouldnt=wouldn't
    wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll y'allll=y'all'll
    yall'd've=y'all'd've y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've
    you'dve=you'd've youll=you'll youre=you're youve=you've"""
CONTRACTIONS: dict[str, str] = dict(pair.split("=", 1) for pair in _CONTRACTION_TABLE.split())
SOFT_SCORES = (0.0, 0.3, 0.6, 0.9, 1.0)  # by the number of humans that gave the answer: 0, 1, 2, 3, 4 or more
DEFAULT_MIN_COUNT = 9


def clean_whitespace(text: str) -> str:
    """New lines and tabs to spaces, then stripped: what the official evaluation does to every answer first."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def process_punctuation(text: str) -> str:
    """The official punctuation rule (see the module docstring)."""
    out = text
    strip_all = _COMMA_BETWEEN_DIGITS.search(text) is not None
    for mark in _PUNCTUATION:
        # the test looks at the ORIGINAL text, not at the text as earlier marks left it
        if strip_all or mark + " " in text or " " + mark in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out, count=_PERIOD_LIMIT)


def process_digit_article(text: str) -> str:
    """The official word rule: lower case, number words to digits, no articles, contractions restored."""
    words = [_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES)


def normalize_answer(text: str) -> str:
    """An answer in the official normal form: whitespace cleaned, punctuation, then digits and articles."""
    return process_digit_article(process_punctuation(clean_whitespace(text)))


def soft_score(count: int) -> float:
    """The training target of an answer that ``count`` humans gave: 0, 0.3, 0.6, 0.9, then 1.0 from 4 on."""
    if count < 0:
        raise ValueError(f"an answer count cannot be negative, got {count}")
    return SOFT_SCORES[min(count, len(SOFT_SCORES) - 1)]


def answer_counts(answers: Iterable[str], normalize: bool = True) -> dict[str, int]:
    """How many humans gave each answer, in order of first appearance.

    ``normalize=False`` counts the raw strings, as the published VLMo / ViLT table scripts did (so "2" and "two"
    count apart there); vlmo_ds normalises by default, as the official evaluation compares them.
    """
    counts: dict[str, int] = {}
    for answer in answers:
        key = normalize_answer(answer) if normalize else answer
        counts[key] = counts.get(key, 0) + 1
    return counts


def build_answer_vocab(major_answers: Iterable[str], min_count: int = DEFAULT_MIN_COUNT) -> list[str]:
    """The answer vocabulary: normalised answers occurring at least ``min_count`` times, by first occurrence.

    Nothing else is filtered, as in the published table: an answer that normalises to "" (e.g. "a", an article)
    is an entry like any other if it is frequent enough.
    """
    if min_count < 1:
        raise ValueError(f"min_count={min_count} must be at least 1")
    counts = Counter(normalize_answer(a) for a in major_answers)
    return [answer for answer, n in counts.items() if n >= min_count]


def answer_targets(counts: Mapping[str, int], vocab_index: Mapping[str, int]) -> tuple[list[int], list[float]]:
    """(labels, scores) of one question: the vocabulary answers among ``counts``, each with its soft score."""
    labels, scores = [], []
    for answer, count in counts.items():
        label = vocab_index.get(answer)
        if label is not None:
            labels.append(label)
            scores.append(soft_score(count))
    return labels, scores


def vocab_index(vocab: Sequence[str]) -> dict[str, int]:
    """answer -> label; raises ValueError on a repeated answer (the table would be ambiguous)."""
    index = {answer: label for label, answer in enumerate(vocab)}
    if len(index) != len(vocab):
        repeated = [a for a, n in Counter(vocab).items() if n > 1]
        raise ValueError(f"the answer vocabulary repeats {repeated[:5]}; rebuild it with build_answer_vocab")
    return index
