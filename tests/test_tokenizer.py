"""Tokenizers: WordPiece against hand-computed splits, sentencepiece training and runtime, load_tokenizer, the CLI."""

from __future__ import annotations

import importlib.util
import io
import tarfile
from pathlib import Path

import pytest
import torch

from vlmo_ds.data.tokenizer import SentencePieceTokenizer, load_tokenizer, train_sentencepiece
from vlmo_ds.data.wordpiece import WordPieceTokenizer, basic_tokenize

ROOT = Path(__file__).resolve().parents[1]

# Specials deliberately away from BERT's ids, so that a tokenizer that hard-codes 0/100/101/102/103 fails.
VOCAB = [
    "[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
    "un", "##aff", "##able", "run", "##ning", "!", ",", "?", "[", "]", "mask",
    "want", "##want", "##ed", "wa", "##n", "cafe", "a", "x", "##x", "中", "国",
]  # fmt: skip
ID = {t: i for i, t in enumerate(VOCAB)}

CAPTIONS = [
    "A man riding a horse on the beach.",
    "Two dogs play with a red ball in the park.",
    "A small cat sitting on a blue sofa.",
    "People standing near a bus on the street.",
    "A large green tree next to a white house.",
    "A woman holding an umbrella in the rain.",
] * 5


@pytest.fixture
def wp(tmp_path: Path) -> WordPieceTokenizer:
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    return WordPieceTokenizer(path)


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_sentencepiece(CAPTIONS, tmp_path_factory.mktemp("sp") / "tok", vocab_size=1000)


def test_basic_tokenize_cleans_lowercases_strips_accents_and_splits_punctuation() -> None:
    assert basic_tokenize("Hello, World!  Ça\tva?") == ["hello", ",", "world", "!", "ca", "va", "?"]
    assert basic_tokenize("a\x00b\nc\u200bd\ufffd\ue000") == ["ab", "cd"]  # NUL, U+FFFD, format, private use
    assert basic_tokenize("中国abc 日本") == ["中", "国", "abc", "日", "本"]
    assert basic_tokenize("$5^`x") == ["$", "5", "^", "`", "x"]  # ASCII symbols count as punctuation
    assert basic_tokenize("Ça, Va", lower_case=False) == ["Ça", ",", "Va"]
    assert basic_tokenize("  \u3000 ") == []


def test_wordpiece_hand_computed(wp: WordPieceTokenizer) -> None:
    assert wp.tokenize("Unaffable running!") == ["un", "##aff", "##able", "run", "##ning", "!"]
    assert wp.tokenize("UNwant\u00e9d,running") == ["un", "##want", "##ed", ",", "run", "##ning"]  # ##ning beats ##n
    assert wp.tokenize("CAFÉ") == ["cafe"]
    assert wp.tokenize("unq zebra") == ["[UNK]", "[UNK]"]  # "un" matches but "##q" does not: the whole word is UNK
    assert wp.tokenize("中国") == ["中", "国"]
    assert wp.tokenize("[MASK]") == ["[", "mask", "]"]  # text never yields special tokens


def test_wordpiece_long_words(wp: WordPieceTokenizer) -> None:
    assert wp.tokenize("x" * 100) == ["x"] + ["##x"] * 99
    assert wp.tokenize("x" * 101) == ["[UNK]"]


def test_wordpiece_ids_read_from_file(wp: WordPieceTokenizer, tmp_path: Path) -> None:
    assert (wp.pad_id, wp.unk_id, wp.cls_id, wp.sep_id, wp.mask_id) == (0, 2, 3, 4, 5)
    assert wp.vocab_size == len(VOCAB)
    assert wp.special_ids == {0, 2, 3, 4, 5}
    bad = tmp_path / "bad" / "vocab.txt"
    bad.parent.mkdir()
    bad.write_text("[PAD]\n[UNK]\nhello\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"\[CLS\]"):
        WordPieceTokenizer(bad)


def test_wordpiece_encode_word_starts_and_truncation(wp: WordPieceTokenizer) -> None:
    ids, starts = wp.encode("Unaffable running!", max_len=16)
    names = ["[CLS]", "un", "##aff", "##able", "run", "##ning", "!", "[SEP]"]
    assert ids == [ID[n] for n in names]
    assert starts == [True, True, False, False, True, False, True, True]
    assert wp.encode("Unaffable running!", max_len=4) == ([ID["[CLS]"], ID["un"], ID["##aff"], ID["[SEP]"]],
                                                         [True, True, False, True])
    assert wp.encode("Unaffable", max_len=2) == ([ID["[CLS]"], ID["[SEP]"]], [True, True])
    assert wp.encode("", max_len=8) == ([ID["[CLS]"], ID["[SEP]"]], [True, True])
    with pytest.raises(ValueError, match="max_len"):
        wp.encode("run", max_len=1)


def test_wordpiece_decode(wp: WordPieceTokenizer) -> None:
    ids, _ = wp.encode("Unaffable running!", max_len=16)
    assert wp.decode(ids + [wp.pad_id, wp.mask_id]) == "unaffable running !"
    assert wp.decode(torch.tensor([ID["un"], ID["##want"], ID["##ed"]])) == "unwanted"


def test_batch_encode_pads_and_masks(wp: WordPieceTokenizer) -> None:
    batch = wp.batch_encode(["run!", "Unaffable running!", ""], max_len=6)
    assert batch["text_ids"].dtype == torch.int64 and batch["text_mask"].dtype == torch.int64
    assert batch["word_start"].dtype == torch.bool
    c, s = ID["[CLS]"], ID["[SEP]"]
    assert batch["text_ids"].tolist() == [
        [c, ID["run"], ID["!"], s, 0, 0],
        [c, ID["un"], ID["##aff"], ID["##able"], ID["run"], s],
        [c, s, 0, 0, 0, 0],
    ]
    assert batch["text_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [1] * 6, [1, 1, 0, 0, 0, 0]]
    assert batch["word_start"].tolist() == [
        [True, True, True, True, False, False],
        [True, True, False, False, True, True],
        [True, True, False, False, False, False],
    ]


def test_sentencepiece_reserved_ids_and_soft_vocab_limit(sp_model: Path) -> None:
    tok = SentencePieceTokenizer(sp_model)
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 1, 2, 3, 4)
    assert [tok.sp.id_to_piece(i) for i in range(5)] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert 5 < tok.vocab_size < 1000  # a tiny corpus gives fewer pieces than asked for, without an error


def test_sentencepiece_encode_lowercases_and_marks_words(sp_model: Path) -> None:
    tok = SentencePieceTokenizer(sp_model)
    text = "A small cat sitting on a blue sofa."
    ids, starts = tok.encode(text, max_len=64)
    assert ids == tok.encode(text.upper(), max_len=64)[0]
    assert ids[0] == tok.cls_id and ids[-1] == tok.sep_id and len(ids) == len(starts)
    assert sum(starts[1:-1]) == len(text.split())  # exactly one "▁"-piece per whitespace word
    assert all(s == tok.sp.id_to_piece(i).startswith("\u2581") for i, s in zip(ids[1:-1], starts[1:-1]))
    assert tok.decode(ids) == text.lower()
    assert tok.sep_id not in tok.encode("[SEP] [MASK]", max_len=64)[0][1:-1]
    assert tok.unk_id in tok.encode("zqj", max_len=64)[0]  # characters never seen in training
    short_ids, short_starts = tok.encode(text, max_len=4)
    assert short_ids == ids[:3] + [tok.sep_id] and short_starts == starts[:3] + [True]


def test_sentencepiece_batch_matches_single(sp_model: Path) -> None:
    tok = SentencePieceTokenizer(sp_model)
    texts = ["Two dogs play.", "A woman holding an umbrella in the rain at night."]
    batch = tok.batch_encode(texts, max_len=12)
    for row, text in enumerate(texts):
        ids, starts = tok.encode(text, max_len=12)
        assert batch["text_ids"][row, : len(ids)].tolist() == ids
        assert batch["word_start"][row, : len(ids)].tolist() == starts
        assert batch["text_mask"][row].sum().item() == len(ids)
        assert (batch["text_ids"][row, len(ids) :] == tok.pad_id).all()


def test_train_sentencepiece_bpe_and_errors(tmp_path: Path) -> None:
    path = train_sentencepiece(iter(CAPTIONS + ["", "  "]), tmp_path / "bpe" / "tok", 80, model_type="bpe")
    assert path == tmp_path / "bpe" / "tok.model" and path.is_file()
    assert SentencePieceTokenizer(path).vocab_size <= 80
    with pytest.raises(ValueError, match="too small"):
        train_sentencepiece(CAPTIONS, tmp_path / "small", vocab_size=10)
    with pytest.raises(ValueError, match="no text"):
        train_sentencepiece(["", "  "], tmp_path / "empty", vocab_size=100)
    with pytest.raises(ValueError, match="model_type"):
        train_sentencepiece(CAPTIONS, tmp_path / "wp", vocab_size=100, model_type="wordpiece")


def test_sentencepiece_rejects_foreign_models(tmp_path: Path) -> None:
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CAPTIONS),
        model_prefix=str(tmp_path / "plain"),
        vocab_size=60,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    with pytest.raises(ValueError, match="retrain"):
        SentencePieceTokenizer(tmp_path / "plain.model")


def test_load_tokenizer_picks_kind(wp: WordPieceTokenizer, sp_model: Path, tmp_path: Path) -> None:
    assert isinstance(load_tokenizer(tmp_path / "vocab.txt"), WordPieceTokenizer)
    assert isinstance(load_tokenizer(tmp_path), WordPieceTokenizer)  # folder with a vocab.txt
    assert isinstance(load_tokenizer(sp_model), SentencePieceTokenizer)
    assert isinstance(load_tokenizer(sp_model.parent), SentencePieceTokenizer)  # folder with one *.model
    with pytest.raises(FileNotFoundError, match="train_tokenizer"):
        load_tokenizer(tmp_path / "missing.model")
    (tmp_path / "tok.json").write_text("{}")
    with pytest.raises(ValueError, match="kind"):
        load_tokenizer(tmp_path / "tok.json")


def _write_shard(path: Path, captions: list[str]) -> None:
    with tarfile.open(path, "w") as tar:
        for index, caption in enumerate(captions):
            for ext, data in (("txt", caption.encode()), ("jpg", b"\xff\xd8 not text"), ("json", b'{"a": 1}')):
                info = tarfile.TarInfo(f"{index:06d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _load_tool():
    spec = importlib.util.spec_from_file_location("train_tokenizer", ROOT / "tools" / "train_tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_tokenizer_cli_reads_text_and_shards(tmp_path: Path) -> None:
    tool = _load_tool()
    shards = tmp_path / "shards"
    shards.mkdir()
    _write_shard(shards / "000000.tar", CAPTIONS[:3])
    _write_shard(shards / "000001.tar", CAPTIONS[3:6])
    (tmp_path / "extra.txt").write_text("zebras graze\n\nquietly\n", encoding="utf-8")

    files = tool.expand_inputs([str(shards / "{000000..000001}.tar"), str(tmp_path / "extra.txt")])
    assert files == [shards / "000000.tar", shards / "000001.tar", tmp_path / "extra.txt"]
    assert tool.expand_inputs([str(shards)]) == files[:2]
    assert list(tool.iter_lines(files)) == CAPTIONS[:6] + ["zebras graze", "", "quietly"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tool.expand_inputs([str(tmp_path / "nope.tar")])

    out = tool.main([str(shards), str(tmp_path / "extra.txt"), "--vocab-size", "200", "--out", str(tmp_path / "t")])
    tok = SentencePieceTokenizer(out)
    assert tok.unk_id not in tok.encode("zebras graze quietly", max_len=32)[0]
    limited = tool.main([str(shards), "--max-sentences", "1", "--vocab-size", "200", "--out", str(tmp_path / "one")])
    assert tok.unk_id in SentencePieceTokenizer(limited).encode("people", max_len=32)[0]  # only caption 1 was read
