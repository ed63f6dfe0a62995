"""Tests of the synthetic shapes data set: determinism, shard layout, held-out captions, truth of captions, VQA
answers and NLVR2 labels (checked against the stored scenes by code written independently here), flip invariance."""

from __future__ import annotations

import importlib.util
import io
import json
import random
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image, ImageOps

from vlmo_ds.data.synthetic import SPLITS, SyntheticConfig, ensure_synthetic, write_synthetic
from vlmo_ds.data.synthetic.captions import caption_vocabulary, phrasings, plural, with_article
from vlmo_ds.data.synthetic.nlvr import sample_statement, sentence, statement_holds
from vlmo_ds.data.synthetic.questions import answer_vocabulary, sample_question
from vlmo_ds.data.synthetic.render import render
from vlmo_ds.data.synthetic.scene import (
    COLORS,
    SHAPES,
    Composition,
    Part,
    Scene,
    SceneObject,
    composition_holds,
    enumerate_compositions,
    flip_scene,
    sample_mixed_scene,
    sample_scene,
)
from vlmo_ds.data.synthetic.splits import Plan

REPO = Path(__file__).resolve().parents[1]
SMALL = SyntheticConfig(
    pretrain_pairs=40, retrieval_train=30, retrieval_test=25, images=10, text=12, text_heldout=6,
    vqa_train=60, vqa_val=10, nlvr2_train=40, nlvr2_dev=6, shard_size=16,
)  # fmt: skip
MEMBERS = {
    "pretrain_pairs": {"jpg", "txt", "json"}, "retrieval_train": {"jpg", "txt", "json"},
    "retrieval_test": {"jpg", "txt", "json"}, "images": {"jpg"}, "text": {"txt"}, "text_heldout": {"txt"},
    "vqa_train": {"jpg", "json"}, "vqa_val": {"jpg", "json"},
    "nlvr2_train": {"left.jpg", "right.jpg", "json"}, "nlvr2_dev": {"left.jpg", "right.jpg", "json"},
}  # fmt: skip
WORD_NUMBERS = {"one": 1, "two": 2, "three": 3, "four": 4}


def read_split(root: Path, split: str) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted((root / split).glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic(root, SMALL)
    return root


def random_scenes(n: int, seed: int = 0) -> list[Scene]:
    rng, comps = random.Random(seed), enumerate_compositions()
    return [sample_scene(rng.choice(comps), rng) if i % 2 else sample_mixed_scene(rng) for i in range(n)]


# ---------------------------------------------------------------- determinism and layout


def test_same_seed_same_bytes_other_seed_other_bytes(small_set: Path, tmp_path: Path) -> None:
    write_synthetic(tmp_path / "again", SMALL)
    assert all_files(tmp_path / "again") == all_files(small_set)
    other = SyntheticConfig(**{**SMALL.to_json(), "seed": 1})
    write_synthetic(tmp_path / "seed1", other)
    first, second = all_files(small_set), all_files(tmp_path / "seed1")
    assert first.keys() - {"manifest.json"} == second.keys() - {"manifest.json"}
    assert all(first[k] != second[k] for k in first if k.endswith(".tar"))


def test_two_workers_write_the_same_bytes(small_set: Path, tmp_path: Path) -> None:
    write_synthetic(tmp_path, SMALL, workers=2)
    assert all_files(tmp_path) == all_files(small_set)


def test_layout_members_sizes_and_manifest(small_set: Path) -> None:
    manifest = json.loads((small_set / "manifest.json").read_text())
    assert manifest["version"] == 6 and manifest["seed"] == 0 and manifest["image_size"] == 64
    assert manifest["counts"] == SMALL.sizes and manifest["compositions"]["total"] == 1057
    for split in SPLITS:
        n = SMALL.sizes[split]
        sizes = json.loads((small_set / split / "sizes.json").read_text())
        expected = {f"shard-{i:06d}.tar": min(16, n - 16 * i) for i in range((n + 15) // 16)}
        assert sizes == expected and manifest["shards"][split] == len(expected)
        samples = read_split(small_set, split)
        assert sorted(samples) == [f"{i:08d}" for i in range(n)]
        assert all(set(members) == MEMBERS[split] for members in samples.values())
        for members in samples.values():
            for ext in (e for e in members if e.endswith("jpg")):
                image = Image.open(io.BytesIO(members[ext]))
                assert image.format == "JPEG" and image.mode == "RGB" and image.size == (64, 64)


def test_json_fields(small_set: Path) -> None:
    for members in read_split(small_set, "pretrain_pairs").values():
        meta = json.loads(members["json"])
        assert meta["caption"] == members["txt"].decode() and Scene.from_json(meta["scene"]).objects
    for split in ("retrieval_train", "retrieval_test"):
        for key, members in read_split(small_set, split).items():
            meta = json.loads(members["json"])
            assert meta["image_id"] == int(key) and len(set(meta["captions"])) == 5
            assert members["txt"].decode() == meta["captions"][0]
    for key, members in read_split(small_set, "vqa_train").items():
        meta = json.loads(members["json"])
        assert meta["question_id"] == meta["image_id"] == int(key) and meta["question"].endswith("?")
        assert len(meta["answers"]) == 10 and meta["answer_type"] in ("yes/no", "number", "other")
    for key, members in read_split(small_set, "nlvr2_dev").items():
        meta = json.loads(members["json"])
        assert meta["identifier"] == f"dev-{int(key)}" and isinstance(meta["label"], bool)
    for members in read_split(small_set, "text").values():
        sentences = members["txt"].decode().split(". ")
        assert 3 <= len(sentences) <= 6 and members["txt"].endswith(b".")


def test_webdataset_groups_members_by_key(small_set: Path) -> None:
    urls = [str(p) for p in sorted((small_set / "nlvr2_train").glob("*.tar"))]
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    assert len(samples) == 40 and {"left.jpg", "right.jpg", "json"} <= set(samples[0])


def test_rewrite_removes_stale_shards_and_ensure_skips(tmp_path: Path) -> None:
    write_synthetic(tmp_path, SMALL)
    fewer = SyntheticConfig(**{**SMALL.to_json(), "pretrain_pairs": 5})
    manifest = ensure_synthetic(tmp_path, fewer)
    assert sorted(p.name for p in (tmp_path / "pretrain_pairs").iterdir()) == ["shard-000000.tar", "sizes.json"]
    assert manifest["counts"]["pretrain_pairs"] == 5
    stamp = (tmp_path / "images" / "shard-000000.tar").stat().st_mtime_ns
    assert ensure_synthetic(tmp_path, fewer) == manifest
    assert (tmp_path / "images" / "shard-000000.tar").stat().st_mtime_ns == stamp


def test_config_errors_name_the_fix() -> None:
    with pytest.raises(ValueError, match="raise holdout_fraction"):
        SyntheticConfig(holdout_fraction=0.1)  # holds out 109 < 500 test images
    with pytest.raises(ValueError, match="images=-1"):
        SyntheticConfig(images=-1)
    with pytest.raises(ValueError, match="captions_per_image"):
        SyntheticConfig(captions_per_image=9)
    assert SyntheticConfig().scaled(0.01).sizes["retrieval_test"] == 5


# ---------------------------------------------------------------- captions and held-out compositions


def test_composition_counts_and_vocabulary() -> None:
    comps = enumerate_compositions()
    families = [c.family for c in comps]
    assert [families.count(f) for f in ("single", "count", "relation", "pair", "trio", "quartet")] == [
        72, 72, 132, 66, 220, 495]
    assert len({c.key for c in comps}) == 1057
    assert len(caption_vocabulary()) == 52
    assert not set(SHAPES) & set(caption_vocabulary())  # captions never say which shape
    assert plural("cross") == "crosses" and plural("shape") == "shapes"
    assert with_article("orange shape") == "an orange shape" and with_article("large red object") == "a large red object"


def test_every_caption_names_one_composition_and_never_left_or_right() -> None:
    owner: dict[str, str] = {}
    for comp in enumerate_compositions():
        captions = phrasings(comp)
        assert len(captions) >= 8
        for caption in captions:
            assert owner.setdefault(caption, comp.key) == comp.key
            assert not {"left", "right"} & set(caption.split())
    relation = Composition("relation", (Part("red"), Part("blue")))
    assert "a red shape above a blue shape" in phrasings(relation)
    assert "a blue object below a red object" in phrasings(relation)
    trio = Composition("trio", (Part("red"), Part("blue"), Part("green")))
    assert "red blue and green shapes" in phrasings(trio) and "three objects green red and blue" in phrasings(trio)


def test_held_out_captions_are_distinct_and_unseen_in_training(small_set: Path) -> None:
    test_split = read_split(small_set, "retrieval_test").values()
    test_captions = [c for m in test_split for c in json.loads(m["json"])["captions"]]
    assert len(test_captions) == 25 * 5 == len(set(test_captions))
    seen = {m["txt"].decode() for m in read_split(small_set, "pretrain_pairs").values()}
    seen |= {c for m in read_split(small_set, "retrieval_train").values() for c in json.loads(m["json"])["captions"]}
    seen |= {s for m in read_split(small_set, "text").values() for s in m["txt"].decode()[:-1].split(". ")}
    assert not seen & set(test_captions)
    plan = Plan.build(SMALL)  # the same holds for all phrasings of all compositions, not only the ones drawn
    train = {p for f in plan.train for c in plan.train[f] for p in phrasings(c)}
    held_out = {p for f in plan.held_out for c in plan.held_out[f] for p in phrasings(c)}
    assert not train & held_out and seen <= train
    docs = [m["txt"].decode()[:-1].split(". ") for m in read_split(small_set, "text_heldout").values()]
    assert all(s in held_out for doc in docs for s in doc)


def test_captions_and_stored_scenes_agree(small_set: Path) -> None:
    by_key = {c.key: c for c in enumerate_compositions()}
    for split in ("pretrain_pairs", "retrieval_test"):
        for members in read_split(small_set, split).values():
            meta = json.loads(members["json"])
            scene = Scene.from_json(meta["scene"])
            comp = by_key[scene.composition]
            assert composition_holds(comp, scene.objects)
            assert set(meta.get("captions", [meta.get("caption")])) <= set(phrasings(comp))


def test_composition_holds_hand_cases() -> None:
    def obj(shape: str, color: str, size: str, x: float, y: float) -> SceneObject:
        return SceneObject(shape, color, size, x, y, 0.1, COLORS[color])

    red_top, blue_low = obj("circle", "red", "large", 0.3, 0.25), obj("square", "blue", "small", 0.7, 0.75)
    above = Composition("relation", (Part("red"), Part("blue")))
    below = Composition("relation", (Part("blue"), Part("red")))
    assert composition_holds(above, (blue_low, red_top)) and not composition_holds(below, (red_top, blue_low))
    single = Composition("single", (Part("red", "large"),), where="top")
    assert composition_holds(single, (red_top,)) and not composition_holds(single, (red_top, blue_low))
    assert not composition_holds(Composition("single", (Part("red", "small"),), where="top"), (red_top,))
    pair = Composition("pair", (Part("red"), Part("blue")))
    side = obj("square", "blue", "small", 0.75, 0.3)
    assert composition_holds(pair, (red_top, side)) and not composition_holds(pair, (red_top, blue_low))
    trio = Composition("trio", (Part("red"), Part("green"), Part("blue")))
    green = obj("star", "green", "small", 0.5, 0.5)
    assert composition_holds(trio, (blue_low, green, red_top)) and not composition_holds(trio, (blue_low, red_top))
    assert not composition_holds(trio, (blue_low, green, red_top, side))


def test_flip_keeps_captions_true_and_mirrors_pixels() -> None:
    rng, comps = random.Random(3), enumerate_compositions()
    for comp in rng.sample(comps, 400):
        scene = sample_scene(comp, rng)
        flipped = flip_scene(scene)
        assert composition_holds(comp, scene.objects) and composition_holds(comp, flipped.objects)
        assert all(0.069 <= o.x - o.r and o.x + o.r <= 0.931 and 0.069 <= o.y - o.r <= o.y + o.r <= 0.931
                   for o in scene.objects)  # fmt: skip
    for scene in random_scenes(20, seed=4):
        plain = Scene(scene.objects, {**scene.background, "texture": "plain"})
        mirrored = np.asarray(ImageOps.mirror(render(plain, 64)), dtype=float)
        assert np.abs(np.asarray(render(flip_scene(plain), 64), dtype=float) - mirrored).mean() < 1.5


def test_rendered_objects_have_their_colours() -> None:
    rng = random.Random(5)
    for comp in rng.sample([c for c in enumerate_compositions() if c.family == "single"], 40):
        scene = sample_scene(comp, rng)
        (o,) = scene.objects
        image = Image.open(io.BytesIO(_jpeg(scene))).convert("RGB")
        pixel = np.asarray(image, dtype=float)[round(o.y * 64 - 0.5), round(o.x * 64 - 0.5)]
        assert np.abs(pixel - np.array(o.rgb)).max() < 40, (comp.key, pixel, o.rgb)


def _jpeg(scene: Scene) -> bytes:
    buffer = io.BytesIO()
    render(scene, 64).save(buffer, format="JPEG", quality=90, subsampling=0)
    return buffer.getvalue()


# ---------------------------------------------------------------- VQA and NLVR2, checked independently
# (generator version 6: colours, sizes, counts and places only; the tiny ViT learns shapes too slowly)

BANDS = {"top": (0.0, 0.35), "middle": (0.43, 0.57), "bottom": (0.65, 1.0)}
FORBIDDEN = set(SHAPES) | {s + "s" for s in SHAPES} | {"crosses", "left", "right"}


def vqa_truth(question: str, objects: tuple[SceneObject, ...]) -> str:
    count = lambda pred: str(sum(map(pred, objects)))  # noqa: E731
    yes = lambda pred: "yes" if any(map(pred, objects)) else "no"  # noqa: E731
    if question == "how many shapes are there?":
        return str(len(objects))
    if m := re.fullmatch(r"how many (\w+) shapes are there\?", question):
        return count(lambda o: o.color == m[1])
    if m := re.fullmatch(r"is there an? (\w+) shape\?", question):
        return yes(lambda o: o.color == m[1])
    if m := re.fullmatch(r"is there an? (small|large) (\w+) shape\?", question):
        return yes(lambda o: o.size == m[1] and o.color == m[2])
    if m := re.fullmatch(r"is there an? (\w+) shape (?:at|in) the (top|middle|bottom)\?", question):
        lo, hi = BANDS[m[2]]
        return yes(lambda o: o.color == m[1] and lo <= o.y <= hi)
    place = lambda o: next(p for p, (lo, hi) in BANDS.items() if lo <= o.y <= hi)  # noqa: E731
    if question in ("what color is the shape?", "what color are the shapes?"):
        (answer,) = {o.color for o in objects}  # asked only when every object has it
        return answer
    if question in ("what size is the shape?", "what size are the shapes?"):
        (answer,) = {o.size for o in objects}
        return answer
    if question == "where is the shape?":
        (only,) = objects
        return place(only)
    raise AssertionError(f"unexpected question {question!r}")


def test_vqa_answers_agree_with_the_scene_and_never_name_a_shape(small_set: Path) -> None:
    rng = random.Random(3)
    drawn = [(s, sample_question(s, rng)) for s in random_scenes(1500, seed=4)]
    stored = [(Scene.from_json(meta["scene"]), meta)
              for meta in (json.loads(m["json"]) for m in read_split(small_set, "vqa_train").values())]
    for scene, q in stored:
        assert q["multiple_choice_answer"] == vqa_truth(q["question"], scene.objects), q
    types = []
    for scene, q in drawn:
        truth = vqa_truth(q["question"], scene.objects)
        assert q["multiple_choice_answer"] == truth and q["answers"].count(truth) >= 6, q
        assert truth in answer_vocabulary()
        assert not FORBIDDEN & set(q["question"][:-1].split()), q["question"]
        flipped = flip_scene(scene).objects
        assert vqa_truth(q["question"], flipped) == truth
        types.append(q["answer_type"])
    yes_no = [q["multiple_choice_answer"] for _, q in drawn if q["answer_type"] == "yes/no"]
    assert 0.42 < yes_no.count("yes") / len(yes_no) < 0.58
    shares = {t: types.count(t) / len(types) for t in ("yes/no", "number", "other")}
    assert 0.45 < shares["yes/no"] < 0.6 and 0.28 < shares["number"] < 0.38 and 0.08 < shares["other"] < 0.2
    asked = {re.sub(r"\b(" + "|".join(COLORS) + r"|small|large|top|middle|bottom)\b", "X", q["question"])
             for _, q in drawn}
    assert asked == {"how many shapes are there?", "how many X shapes are there?", "is there a X shape?",
                     "is there an X shape?", "is there a X X shape?",
                     "is there a X shape at the X?", "is there an X shape at the X?", "is there a X shape in the X?",
                     "is there an X shape in the X?", "what color is the shape?", "what color are the shapes?",
                     "what size is the shape?", "what size are the shapes?", "where is the shape?"}


def nlvr_truth(text: str, left: tuple[SceneObject, ...], right: tuple[SceneObject, ...]) -> bool:
    def count(objs, words: str) -> int:
        return sum(all(w in (o.color, o.size) for w in words.split()) for o in objs)

    if m := re.fullmatch(r"both images have an? ((?:\w+ )*)shape", text):
        return count(left, m[1]) > 0 and count(right, m[1]) > 0
    if m := re.fullmatch(r"both images have no ((?:\w+ )*)shape", text):
        return count(left + right, m[1]) == 0
    if m := re.fullmatch(r"both images have (one|two|three|four) ((?:\w+ )?)shapes?", text):
        return count(left, m[2]) == count(right, m[2]) == WORD_NUMBERS[m[1]]
    raise AssertionError(f"unexpected statement {text!r}")


def test_nlvr2_labels_agree_with_the_two_scenes(small_set: Path) -> None:
    rng, pool = random.Random(8), random_scenes(1600, seed=9)
    drawn = [(a, b, sample_statement(a.objects, b.objects, rng)) for a, b in zip(pool[::2], pool[1::2])]
    stored = [(Scene.from_json(meta["scenes"]["left"]), Scene.from_json(meta["scenes"]["right"]), meta)
              for meta in (json.loads(m["json"]) for m in read_split(small_set, "nlvr2_train").values())]
    for left, right, meta in stored:
        assert nlvr_truth(meta["sentence"], left.objects, right.objects) == meta["label"], meta["sentence"]
    kinds = set()
    for left, right, meta in drawn:
        assert statement_holds(meta["statement"], left.objects, right.objects) == meta["label"]
        assert sentence(meta["statement"]) == meta["sentence"]
        assert nlvr_truth(meta["sentence"], left.objects, right.objects) == meta["label"], meta["sentence"]
        assert nlvr_truth(meta["sentence"], flip_scene(left).objects, flip_scene(right).objects) == meta["label"]
        assert not FORBIDDEN & set(meta["sentence"].split()), meta["sentence"]
        kinds.add(meta["statement"]["kind"])
    assert 0.42 < sum(m["label"] for *_, m in drawn) / len(drawn) < 0.58
    assert kinds == {"has", "lacks", "count"}


def test_nlvr2_sentences_hand_cases() -> None:
    assert sentence({"kind": "has", "color": "red", "size": "small"}) == "both images have a small red shape"
    assert sentence({"kind": "has", "color": "orange", "size": None}) == "both images have an orange shape"
    assert sentence({"kind": "lacks", "color": None, "size": "large"}) == "both images have no large shape"
    assert sentence({"kind": "count", "color": None, "n": 2}) == "both images have two shapes"
    assert sentence({"kind": "count", "color": "red", "n": 1}) == "both images have one red shape"
    red = SceneObject("circle", "red", "small", 0.5, 0.2, 0.08, (220, 40, 40))
    blue = SceneObject("star", "blue", "large", 0.5, 0.7, 0.15, (40, 80, 225))
    assert statement_holds({"kind": "has", "color": "red"}, (red, blue), (red,))
    assert not statement_holds({"kind": "has", "color": "blue"}, (red, blue), (red,))
    assert statement_holds({"kind": "lacks", "color": None, "size": "large"}, (red,), (red, red))
    assert not statement_holds({"kind": "lacks", "color": "blue"}, (red,), (blue,))
    assert statement_holds({"kind": "count", "color": "red", "n": 1}, (red, blue), (red,))
    assert not statement_holds({"kind": "count", "color": None, "n": 1}, (red, blue), (red,))
    with pytest.raises(ValueError, match="unknown NLVR2 statement kind"):
        statement_holds({"kind": "more"}, (), ())


# ---------------------------------------------------------------- the command line tool


def test_tool_help_and_function(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(REPO / "tools" / "make_synthetic.py"), "--help"],
                            capture_output=True, text=True, check=True)  # fmt: skip
    assert "--out" in result.stdout and "--seed" in result.stdout and "nlvr2_train/" in result.stdout
    spec = importlib.util.spec_from_file_location("make_synthetic", REPO / "tools" / "make_synthetic.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(["--out", str(tmp_path), "--scale", "0.001", "--quiet", "--workers", "1"]) == 0
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["counts"]["pretrain_pairs"] == 20 and manifest["counts"]["retrieval_test"] == 1
    assert tool.main(["--out", str(tmp_path), "--holdout-fraction", "0.1", "--quiet"]) == 2
