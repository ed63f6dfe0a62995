"""Text tokenizers for vlmo_ds: the common interface, the sentencepiece runtime, training, and ``load_tokenizer``.

Two kinds serve vlmo_ds users:
- sentencepiece models trained on the user's own captions with ``train_sentencepiece`` (or tools/train_tokenizer.py).
  They reserve pad=0 ("[PAD]"), unk=1 ("[UNK]"), [CLS]=2, [SEP]=3, [MASK]=4, and fold case in the model's own
  normalisation rule (nmt_nfkc_cf), so text is lower-cased the way the published uncased model saw it.
- BERT WordPiece from a ``vocab.txt`` (vlmo_ds.data.wordpiece) for published checkpoints (bert-base-uncased vocabulary).

Every tokenizer returns ``[CLS] + pieces + [SEP]`` with a word-start flag per token, which whole-word masking
(vlmo_ds.data.masking.mask_tokens) uses to mask all pieces of a word together. Special tokens are never produced from
text; they are only inserted by id.

Shapes: B = batch size, T = max_len.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import sentencepiece as spm
import torch

logger = logging.getLogger(__name__)

SP_PAD, SP_UNK = "[PAD]", "[UNK]"
SP_CONTROL = ("[CLS]", "[SEP]", "[MASK]")
WORD_BOUNDARY = "\u2581"  # sentencepiece's "▁", marks a piece that follows whitespace


class Tokenizer(ABC):
    """What the data pipelines and objectives use; subclasses set the ids and implement ``_pieces`` and ``decode``."""

    vocab_size: int
    pad_id: int
    cls_id: int
    sep_id: int
    mask_id: int
    unk_id: int

    @abstractmethod
    def _pieces(self, text: str) -> tuple[list[int], list[bool]]:
        """Piece ids of ``text`` (no [CLS]/[SEP]) and whether each piece begins a word."""

    @abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text, skipping [PAD], [CLS], [SEP] and [MASK]."""

    def _pieces_batch(self, texts: Sequence[str]) -> list[tuple[list[int], list[bool]]]:
        return [self._pieces(t) for t in texts]

    @property
    def special_ids(self) -> set[int]:
        """Ids that masking never selects nor draws as random replacements."""
        return {self.pad_id, self.cls_id, self.sep_id, self.mask_id, self.unk_id}

    def _frame(self, ids: list[int], starts: list[bool], max_len: int) -> tuple[list[int], list[bool]]:
        if max_len < 2:
            raise ValueError(f"max_len={max_len} leaves no room for [CLS] and [SEP]; use max_len >= 2")
        keep = max_len - 2
        return [self.cls_id, *ids[:keep], self.sep_id], [True, *starts[:keep], True]

    def encode(self, text: str, max_len: int) -> tuple[list[int], list[bool]]:
        """``[CLS] + pieces + [SEP]`` truncated to at most ``max_len`` (SEP kept last), unpadded, and word starts."""
        ids, starts = self._pieces(text)
        return self._frame(ids, starts, max_len)

    def batch_encode(self, texts: Sequence[str], max_len: int) -> dict[str, torch.Tensor]:
        """Encode and pad to ``max_len`` = T.

        Returns text_ids [B, T] int64 (padded with pad_id), text_mask [B, T] int64 (1 = real token) and
        word_start [B, T] bool (False on padding).
        """
        framed = [self._frame(ids, starts, max_len) for ids, starts in self._pieces_batch(texts)]
        return pad_encoded(framed, max_len, self.pad_id)


def pad_encoded(rows: Sequence[tuple[Sequence[int], Sequence[bool]]], max_len: int,
                pad_id: int) -> dict[str, torch.Tensor]:
    """(ids, word starts) rows of at most max_len -> text_ids [B, T] (pad_id-padded), text_mask [B, T] int64,
    word_start [B, T] bool (False on padding)."""
    text_ids = torch.full((len(rows), max_len), pad_id, dtype=torch.int64)
    text_mask = torch.zeros((len(rows), max_len), dtype=torch.int64)
    word_start = torch.zeros((len(rows), max_len), dtype=torch.bool)
    for row, (ids, starts) in enumerate(rows):
        text_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
        text_mask[row, : len(ids)] = 1
        word_start[row, : len(ids)] = torch.tensor(starts, dtype=torch.bool)
    return {"text_ids": text_ids, "text_mask": text_mask, "word_start": word_start}


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model with the vlmo_ds special pieces ([PAD], [UNK], [CLS], [SEP], [MASK])."""

    def __init__(self, model_file: str | Path) -> None:
        model_file = Path(model_file)
        if not model_file.is_file():
            raise FileNotFoundError(
                f"sentencepiece model {model_file} does not exist; train one with tools/train_tokenizer.py"
            )
        self.model_file = model_file
        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        self.vocab_size = self.sp.get_piece_size()
        self.pad_id = self.sp.pad_id()
        self.unk_id = self.sp.unk_id()
        self.cls_id, self.sep_id, self.mask_id = (self._control_id(p) for p in SP_CONTROL)
        if self.pad_id < 0:
            raise ValueError(f"{model_file} has no padding piece; retrain it with tools/train_tokenizer.py")

    def _control_id(self, piece: str) -> int:
        index = self.sp.piece_to_id(piece)
        if index == self.sp.unk_id() or not self.sp.is_control(index):
            raise ValueError(
                f"{self.model_file} has no control piece {piece!r}; vlmo_ds needs {', '.join(SP_CONTROL)}: "
                "retrain it with tools/train_tokenizer.py (or train_sentencepiece)"
            )
        return index

    def _pieces(self, text: str) -> tuple[list[int], list[bool]]:
        return self._pieces_batch([text])[0]

    def _pieces_batch(self, texts: Sequence[str]) -> list[tuple[list[int], list[bool]]]:
        # Two batched calls: ids carry [UNK] for unknown characters, strings carry the "▁" word marks.
        ids = self.sp.encode(list(texts), out_type=int)
        pieces = self.sp.encode(list(texts), out_type=str)
        return [(i, [p.startswith(WORD_BOUNDARY) for p in ps]) for i, ps in zip(ids, pieces)]

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text; specials are skipped, unknown pieces read " ⁇ " (sentencepiece's habit)."""
        skip = {self.pad_id, self.cls_id, self.sep_id, self.mask_id}
        return self.sp.decode([int(i) for i in ids if int(i) not in skip])


class _SentenceStream:
    """Stripped, non-empty lines of ``texts``, at most ``limit`` of them, counted as sentencepiece pulls them."""

    def __init__(self, texts: Iterable[str], limit: int | None) -> None:
        self.texts = texts
        self.limit = limit
        self.count = 0

    def __iter__(self) -> Iterator[str]:
        for text in self.texts:
            text = text.strip()
            if not text:
                continue
            if self.limit is not None and self.count >= self.limit:
                return
            self.count += 1
            yield text


def train_sentencepiece(
    texts: Iterable[str],
    out_prefix: str | Path,
    vocab_size: int,
    model_type: str = "unigram",
    max_sentences: int | None = None,
    character_coverage: float = 0.9995,
    byte_fallback: bool = False,
    seed: int = 0,
    num_threads: int = 2,
) -> Path:
    """Train a sentencepiece model with vlmo_ds's special pieces; returns the path of ``{out_prefix}.model``.

    ``vocab_size`` is a ceiling: a small corpus yields fewer pieces (sentencepiece's soft limit), so read the real size
    from ``SentencePieceTokenizer(path).vocab_size``. It must still exceed the corpus's distinct characters plus 5.
    Empty lines are dropped; at most ``max_sentences`` lines are used. ``byte_fallback`` removes [UNK] at the cost of
    256 byte pieces.
    """
    if model_type not in ("unigram", "bpe"):
        raise ValueError(f"model_type={model_type!r}; use 'unigram' or 'bpe'")
    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    sentences = _SentenceStream(texts, max_sentences)
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_prefix=str(out_prefix),
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            byte_fallback=byte_fallback,
            pad_id=0,
            unk_id=1,
            bos_id=-1,
            eos_id=-1,
            pad_piece=SP_PAD,
            unk_piece=SP_UNK,
            # Control symbols get ids 2, 3, 4 and, unlike user-defined symbols, never match text such as "[SEP]".
            control_symbols=list(SP_CONTROL),
            normalization_rule_name="nmt_nfkc_cf",
            hard_vocab_limit=False,
            num_threads=num_threads,
            minloglevel=2,
        )
    except RuntimeError as err:
        if sentences.count == 0:
            raise ValueError("no text to train the tokenizer on: the input was empty or every line was blank") from err
        if "smaller than required_chars" in str(err):
            raise ValueError(
                f"vocab_size={vocab_size} is too small for the characters of this corpus ({err}); raise vocab_size "
                "or lower character_coverage"
            ) from err
        raise
    model_path = out_prefix.with_name(out_prefix.name + ".model")
    logger.info("trained %s tokenizer on %d sentences: %s", model_type, sentences.count, model_path)
    return model_path


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Pick the tokenizer from the file: ``*.model`` -> sentencepiece, ``*.txt`` (vocab.txt) -> WordPiece.

    A folder is searched for ``vocab.txt`` or a single ``*.model``.
    """
    from vlmo_ds.data.wordpiece import WordPieceTokenizer  # wordpiece imports this module

    path = Path(path)
    if path.is_dir():
        models = sorted(path.glob("*.model"))
        if (path / "vocab.txt").is_file():
            path = path / "vocab.txt"
        elif len(models) == 1:
            path = models[0]
        else:
            raise FileNotFoundError(
                f"{path} holds no vocab.txt and {len(models)} *.model files; point to the tokenizer file itself"
            )
    if not path.is_file():
        raise FileNotFoundError(
            f"tokenizer {path} does not exist; train one with tools/train_tokenizer.py or pass a BERT vocab.txt"
        )
    if path.suffix == ".model":
        return SentencePieceTokenizer(path)
    if path.suffix == ".txt":
        return WordPieceTokenizer(path)
    raise ValueError(f"cannot tell the tokenizer kind of {path}; expected a sentencepiece *.model or a BERT vocab.txt")
