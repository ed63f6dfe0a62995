"""BERT WordPiece tokenizer read from a ``vocab.txt`` (the format published BERT checkpoints ship).

Published VLMo checkpoints were trained with the bert-base-uncased vocabulary (30522 tokens), so loading them in vlmo_ds
needs the exact same text pipeline:

1. basic tokenisation: drop NUL, U+FFFD and control / format / unassigned characters, map every whitespace
   character to a space, put spaces around CJK ideographs, split on whitespace, lower-case and strip accents
   (uncased vocabularies), split every punctuation character off as its own word;
2. WordPiece: per word, greedy longest-match-first against the vocabulary, continuation pieces carry a ``##`` prefix;
   a word longer than ``max_word_chars`` characters, or one with a part no piece matches, becomes ``[UNK]`` as a whole.

Special-token ids are read from the vocabulary file, never assumed. Special tokens are never produced from text: a
caption that contains the string "[MASK]" is tokenised as the punctuation and letters it is made of.
"""

from __future__ import annotations

import unicodedata
from pathlib import Path

from vlmo_ds.data.tokenizer import Tokenizer

# Unicode blocks of CJK ideographs (not Hangul or kana: those are written with spaces and split like other scripts).
_CJK_RANGES = (
    (0x4E00, 0x9FFF),
    (0x3400, 0x4DBF),
    (0x20000, 0x2A6DF),
    (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F),
    (0x2B820, 0x2CEAF),
    (0xF900, 0xFAFF),
    (0x2F800, 0x2FA1F),
)

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def _is_whitespace(ch: str) -> bool:
    return ch in " \t\n\r" or unicodedata.category(ch) == "Zs"


def _is_control(ch: str) -> bool:
    # \t \n \r are control characters to Unicode but whitespace to the tokenizer; every other "C*" category
    # (control, format, surrogate, private use, unassigned) is dropped.
    return ch not in "\t\n\r" and unicodedata.category(ch).startswith("C")


def _is_punctuation(ch: str) -> bool:
    # All non-alphanumeric printable ASCII counts ("$", "^", "`" are symbols, not punctuation, to Unicode).
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_cjk(ch: str) -> bool:
    cp = ord(ch)
    return any(lo <= cp <= hi for lo, hi in _CJK_RANGES)


def _strip_accents(word: str) -> str:
    return "".join(ch for ch in unicodedata.normalize("NFD", word) if unicodedata.category(ch) != "Mn")


def basic_tokenize(text: str, lower_case: bool = True) -> list[str]:
    """Split text into words the way BERT's basic tokenizer does (see the module docstring, step 1)."""
    cleaned = []
    for ch in text:
        if ch in ("\x00", "\ufffd") or _is_control(ch):
            continue
        if _is_whitespace(ch):
            cleaned.append(" ")
        elif _is_cjk(ch):
            cleaned.append(f" {ch} ")
        else:
            cleaned.append(ch)
    words = []
    for token in "".join(cleaned).split():
        if lower_case:
            token = _strip_accents(token.lower())
        current = ""
        for ch in token:
            if _is_punctuation(ch):
                if current:
                    words.append(current)
                    current = ""
                words.append(ch)
            else:
                current += ch
        if current:
            words.append(current)
    return words


def load_vocab(path: str | Path) -> dict[str, int]:
    """Read a BERT ``vocab.txt``: one token per line, the id is the line number (0-based)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"WordPiece vocabulary {path} does not exist; pass the vocab.txt of a BERT checkpoint")
    vocab: dict[str, int] = {}
    with path.open(encoding="utf-8") as f:
        for index, line in enumerate(f):
            vocab[line.rstrip("\r\n")] = index
    return vocab


class WordPieceTokenizer(Tokenizer):
    """BERT WordPiece over a ``vocab.txt``; ``lower_case=False`` for cased vocabularies (accents are then kept too)."""

    def __init__(self, vocab_file: str | Path, lower_case: bool = True, max_word_chars: int = 100) -> None:
        self.vocab = load_vocab(vocab_file)
        missing = [t for t in SPECIAL_TOKENS if t not in self.vocab]
        if missing:
            raise ValueError(
                f"{vocab_file} lacks the special tokens {missing}; a BERT vocab.txt must contain "
                f"{', '.join(SPECIAL_TOKENS)}"
            )
        self.inverse = {i: t for t, i in self.vocab.items()}
        self.lower_case = lower_case
        self.max_word_chars = max_word_chars
        self.vocab_size = max(self.vocab.values()) + 1
        self.pad_id = self.vocab["[PAD]"]
        self.unk_id = self.vocab["[UNK]"]
        self.cls_id = self.vocab["[CLS]"]
        self.sep_id = self.vocab["[SEP]"]
        self.mask_id = self.vocab["[MASK]"]

    def wordpiece(self, word: str) -> list[str]:
        """Greedy longest-match-first pieces of one basic word; ``["[UNK]"]`` when it cannot be covered."""
        if len(word) > self.max_word_chars:
            return ["[UNK]"]
        pieces = []
        start = 0
        while start < len(word):
            end = len(word)
            match = None
            while end > start:
                candidate = word[start:end] if start == 0 else "##" + word[start:end]
                if candidate in self.vocab:
                    match = candidate
                    break
                end -= 1
            if match is None:
                return ["[UNK]"]
            pieces.append(match)
            start = end
        return pieces

    def tokenize(self, text: str) -> list[str]:
        """Text -> WordPiece strings (no [CLS] / [SEP])."""
        return [piece for word in basic_tokenize(text, self.lower_case) for piece in self.wordpiece(word)]

    def _pieces(self, text: str) -> tuple[list[int], list[bool]]:
        ids: list[int] = []
        starts: list[bool] = []
        for word in basic_tokenize(text, self.lower_case):
            for k, piece in enumerate(self.wordpiece(word)):
                ids.append(self.vocab[piece])
                starts.append(k == 0)
        return ids, starts

    def decode(self, ids) -> str:
        """Join pieces with spaces and glue ``##`` continuations; [PAD]/[CLS]/[SEP]/[MASK] are skipped."""
        skip = {self.pad_id, self.cls_id, self.sep_id, self.mask_id}
        tokens = [self.inverse.get(int(i), "[UNK]") for i in ids if int(i) not in skip]
        return " ".join(tokens).replace(" ##", "")
