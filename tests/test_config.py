"""vlmo_ds.config: recipes, overrides, typing, validation messages, per-stage plans, shipped recipes."""
from __future__ import annotations

import ast
import dataclasses
import json
import re
import tarfile
from pathlib import Path

import pytest
import yaml

from vlmo_ds.config import (
    STAGE2_TRAINABLE,
    ConfigError,
    MissingFileError,
    check_files,
    load_config,
    main_errors,
    model_config,
    shipped_recipes,
    stage_plan,
    to_dict,
)
from vlmo_ds.config.load import RECIPES
from vlmo_ds.model.config import PRESETS
from vlmo_ds.tasks.optim import head_lr_mult

SCHEMA = Path(__file__).resolve().parents[1] / "vlmo_ds" / "config" / "schema.py"


def good_tree() -> dict:
    """A small valid recipe: tiny model, CPU DeepSpeed config, one image-text stage."""
    return {
        "model": {"preset": "tiny", "vocab_size": "auto"},
        "tokenizer": "data/synthetic/tok.model",
        "deepspeed": "ds_configs/cpu.json",
        "train": {"micro_batch": 8, "global_batch": 32},
        "stages": [{"name": "pairs", "kind": "image_text", "data": "data/synthetic/pretrain_pairs", "steps": 100}],
    }


def write(tmp_path: Path, tree: dict | str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(tree if isinstance(tree, str) else yaml.safe_dump(tree))
    return path


def edited(**changes) -> dict:
    tree = good_tree()
    for key, value in changes.items():
        node = tree
        *head, last = key.split("__")
        for part in head:
            node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
        node[last] = value
    return tree


def two_stages(kind2: str = "text_mlm", name2: str = "text") -> dict:
    tree = good_tree()
    tree["stages"].append({"name": name2, "kind": kind2, "data": "data/text", "steps": 100})
    return tree


def case(expected: str, *overrides: str, tree: dict | str | None = "good", **kwargs) -> tuple:
    """(recipe tree, YAML text or None for a missing file; overrides; load_config kwargs; text the message holds)."""
    return (good_tree() if tree == "good" else tree), list(overrides), kwargs, expected


WITHOUT_STAGES = {k: v for k, v in good_tree().items() if k != "stages"}
WITHOUT_TOKENIZER = {k: v for k, v in good_tree().items() if k != "tokenizer"}

BAD = {
    "unknown top-level key": case("unknown key 'learning_rate' (did you mean 'optim.lr'?)",
                                  tree=edited(learning_rate=1e-3)),
    "key in the wrong section": case("unknown key 'lr' (did you mean 'optim.lr'?)", tree=edited(lr=1e-3)),
    "unknown nested key": case("unknown key 'optim.learning_rate' (did you mean 'optim.lr'?)",
                               "optim.learning_rate=1e-4"),
    "misspelt nested key": case("unknown key 'train.micro_bach' (did you mean 'train.micro_batch'?)",
                                "train.micro_bach=4"),
    "unknown stage key": case("unknown key 'stages.0.stpes' (did you mean 'stages.0.steps'?)", "stages.0.stpes=5"),
    "str for int": case("train.micro_batch: must be an integer, got 'abc' (a string)", "train.micro_batch=abc"),
    "list for float": case("optim.lr: must be a number, got [1, 2] (a list)", "optim.lr=[1, 2]"),
    "bool for int": case("seed: must be an integer, got true (a boolean)", "seed=true"),
    "float for int": case("stages.0.steps: must be an integer, got 1.5", "stages.0.steps=1.5"),
    "negative lr": case("optim.lr: must be > 0, got -0.001", "optim.lr=-0.001"),
    "zero lr": case("optim.lr: must be > 0, got 0.0", tree=edited(optim={"lr": 0})),
    "zero stage lr": case("stages.0.lr: must be > 0", "stages.0.lr=0"),
    "warmup >= steps": case("optim.warmup: 100 warm-up steps is not below stages.0.steps=100", "optim.warmup=100"),
    "warmup fraction 1.0": case("stages.0.warmup: a fractional warm-up must be in [0, 1)", "stages.0.warmup=1.0"),
    "beta out of range": case("optim.betas.1: must be in [0, 1), got 1.0", "optim.betas=[0.9, 1.0]"),
    "betas length": case("optim.betas: must be a list of 2 numbers, got [0.9] (a list)", "optim.betas=[0.9]"),
    "global not multiple of micro": case("train.global_batch: 36 is not divisible by", "train.global_batch=36"),
    "global not multiple of micro x dp": case(
        "train.global_batch: 32 is not divisible by micro_batch x data-parallel ranks = 8 x 8 = 64", world_size=8),
    "stage global batch": case("stages.0.global_batch: 12 is not divisible", "stages.0.global_batch=12"),
    "micro_batch 0": case("train.micro_batch: must be > 0, got 0", "train.micro_batch=0"),
    "missing recipe file": case("recipe: ", tree=None),
    "invalid yaml": case("invalid YAML at line", tree="model: {preset: tiny\nstages: ["),
    "top level not a mapping": case("the top level must be a mapping", tree="- a\n- b\n"),
    "duplicate yaml key": case("seed: written twice in one mapping (line 2)", tree="seed: 1\nseed: 2\n"),
    "unknown preset": case("model.preset: unknown preset 'bse' (did you mean 'base'?)", "model.preset=bse"),
    "missing preset": case("model.preset: required", tree=edited(model={"dim": 64})),
    "unknown model field": case("unknown key 'model.dimm' (did you mean 'model.dim'?)", "model.dimm=64"),
    "model field type": case("model.depth: must be an integer", "model.depth=deep"),
    "dim not divisible by heads": case(
        "model.dim / model.heads: invalid model config: dim=102 is not divisible by heads=4", "model.dim=102"),
    "zero stage 4": case("parallel.zero_stage: must be 0, 1, 2 or 3, got 4", "parallel.zero_stage=4"),
    "pipeline with zero 2": case(
        "parallel.pipeline=2 needs ZeRO stage 0 or 1 (DeepSpeed cannot partition gradients across pipeline stages); "
        "set parallel.zero_stage=1", "parallel.pipeline=2", "parallel.zero_stage=2"),
    "pipeline with zero 0 and clipping": case(
        "parallel.pipeline=2 with ZeRO stage 0 clips by a wrong gradient norm", "parallel.pipeline=2",
        "parallel.zero_stage=0", "optim.grad_clip=1.0"),
    "pipeline with retrieval evaluation": case(
        "eval.retrieval: retrieval evaluation needs the whole model on every rank, not parallel.pipeline=2 stages",
        "parallel.pipeline=2", "parallel.zero_stage=1", "eval.retrieval=data/test"),
    "tensor parallel with text MLM evaluation": case(
        "eval.text_mlm: the held-out text MLM evaluation runs on whole models only", "parallel.tensor=2",
        "eval.text_mlm=data/text"),
    "tensor not dividing heads": case(
        "model.heads=4 is not divisible by the tensor-parallel size 3; choose a tensor-parallel size that divides",
        "parallel.tensor=3"),
    "tensor not dividing vocab": case(
        "model.vocab_size: 1001 is not divisible by parallel.tensor=2; set model.vocab_size=1002",
        "parallel.tensor=2", "model.vocab_size=1001"),
    "pipeline > depth": case("parallel.pipeline=5 exceeds model.depth=4 (every stage needs at least one block); "
                             "set parallel.pipeline to at most 4", "parallel.pipeline=5"),
    "world not divisible by layout": case(
        "parallel: 3 ranks are not divisible by parallel.tensor x parallel.pipeline = 2 x 1 = 2", "parallel.tensor=2",
        world_size=3),
    "unknown stage kind": case("stages.0.kind: unknown stage kind 'image-text' (did you mean 'image_text'?)",
                               "stages.0.kind=image-text"),
    "duplicate stage names": case("stages.1.name: duplicate stage name 'pairs'", tree=two_stages(name2="pairs")),
    "bad stage name": case("stages.0.name: 'a/b' must start with a letter", "stages.0.name=a/b"),
    "numeric stage name": case("stages.0.name: '7' must start with a letter", "stages.0.name='7'"),
    "no stages": case("stages: at least one stage is required", tree=edited(stages=[])),
    "stages missing": case("stages: required", tree=WITHOUT_STAGES),
    "stages not a list": case("stages: must be a list of stages", tree=edited(stages={"name": "x"})),
    "unknown loss weight": case("unknown key 'stages.0.loss_weights.itcc' (did you mean 'itc'?)",
                                "stages.0.loss_weights.itcc=1"),
    "loss weight of another kind": case("unknown key 'stages.1.loss_weights.itc'; text_mlm stages weigh mlm",
                                        "stages.1.loss_weights.itc=1", tree=two_stages()),
    "all loss weights zero": case("stages.1.loss_weights: every weight is 0", "stages.1.loss_weights.mlm=0",
                                  tree=two_stages()),
    "unknown trainable group": case("stages.0.trainable: unknown group 'image_expert' (did you mean 'image_experts'?)",
                                    "stages.0.trainable=[attention, image_expert]"),
    "trainable word": case("stages.0.trainable: must be 'all' or a non-empty list", "stages.0.trainable=some"),
    "precision fp16": case("precision: 'fp16' is not supported", "precision=fp16"),
    "missing ds config": case("deepspeed: ds_configs/nope.json not found", "deepspeed=ds_configs/nope.json"),
    "malformed override": case("override 'optim.lr': expected key=value", "optim.lr"),
    "override bad value yaml": case("override optim.betas: invalid YAML", "optim.betas=[0.9,"),
    "override nonexistent index": case("stages.3: stages has 1 entry (index 0)", "stages.3.steps=5"),
    "override unknown stage name": case("stages.pretrain: no entry of stages", "stages.pretrain.steps=5"),
    "override inside a scalar": case("stages.0.steps: is a single value", "stages.0.steps.x=1"),
    "resume path missing": case("train.resume: checkpoint /no/such/ckpt does not exist", "train.resume=/no/such/ckpt"),
    "resume null": case("train.resume: must be a string, got null", "train.resume=null"),
    "text_len > table": case(
        "stages.0.text_len / model.table_text_len: invalid model config: max_text_len=100 exceeds",
        "stages.0.text_len=100"),
    "image size not multiple of patch": case("stages.0.image_size / model.patch_size:", "stages.0.image_size=100"),
    "mim stage without head": case("stages.1.kind: image_mim stages need a masked-image head",
                                   tree=two_stages("image_mim")),
    "data weight 0": case("stages.0.data.0.weight: must be > 0", "stages.0.data=[{shards: a, weight: 0}]"),
    "data entry unknown key": case("unknown key 'stages.0.data.0.shard' (did you mean 'stages.0.data.0.shards'?)",
                                   "stages.0.data=[{shard: a}]"),
    "mlm_prob 1.5": case("stages.0.mlm_prob: must be in (0, 1), got 1.5", "stages.0.mlm_prob=1.5"),
    "end_lr above lr": case("optim.end_lr: 0.5 is above stages.0's peak lr", "optim.end_lr=0.5"),
    "eval every negative": case("eval.every: must be >= 0, got -1", "eval.every=-1"),
    "ckpt_every 0": case("train.ckpt_every: must be > 0, got 0", "train.ckpt_every=0"),
    "section not a mapping": case("optim: must be a mapping of keys, got 3", "optim=3"),
    "tokenizer missing": case("tokenizer: required", tree=WITHOUT_TOKENIZER),
}


@pytest.mark.parametrize("tree, overrides, kwargs, expected", BAD.values(), ids=BAD.keys())
def test_bad_recipe_is_one_line_naming_the_key(tmp_path, capsys, tree, overrides, kwargs, expected):
    path = tmp_path / "absent.yaml" if tree is None else write(tmp_path, tree)
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides, **kwargs)
    assert expected in str(info.value)
    assert "\n" not in str(info.value)
    with pytest.raises(SystemExit) as stop:
        main_errors(load_config)(path, overrides, **kwargs)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and expected in err


def test_ds_json_with_optimizer_or_offload_mismatch(tmp_path):
    js = tmp_path / "mine.json"
    js.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    with pytest.raises(ConfigError, match=r"^deepspeed: .*mine.json sets 'optimizer'; remove it"):
        load_config(write(tmp_path, good_tree()), [f"deepspeed={js}"])
    with pytest.raises(ConfigError, match="parallel.zero_stage: .* offloads parameters, which needs ZeRO 3"):
        load_config(write(tmp_path, good_tree()), ["deepspeed=ds_configs/zero3_offload_bf16.json",
                                                  "parallel.zero_stage=1"])
    js.write_text("{not json")
    with pytest.raises(ConfigError, match="deepspeed: .* is not valid JSON"):
        load_config(write(tmp_path, good_tree()), [f"deepspeed={js}"])


def test_good_recipe_values_and_defaults(tmp_path):
    cfg = load_config(write(tmp_path, good_tree(), "my_run.yaml"))
    assert cfg.run_dir == "runs/my_run"
    assert cfg.precision == "fp32" and cfg.parallel.zero_stage == 0  # from cpu.json
    assert Path(cfg.deepspeed).is_absolute() and Path(cfg.deepspeed).name == "cpu.json"
    assert cfg.optim.betas == (0.9, 0.98) and cfg.optim.warmup == 0.1 and cfg.train.resume == "auto"
    stage = cfg.stages[0]
    assert stage.data[0].shards == "data/synthetic/pretrain_pairs" and stage.data[0].weight == 1.0
    assert stage.loss_weights == {"itc": 1.0, "itm": 1.0, "mlm": 0.25}
    assert stage.trainable == "all" and stage.whole_word is False
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 3


def test_overrides_are_yaml_typed(tmp_path):
    cfg = load_config(write(tmp_path, good_tree()), [
        "optim.lr=1e-4", "optim.betas=[0.9, 0.95]", "optim.warmup=10", "stages.pairs.steps=50",
        "model.image_size=128", "eval.retrieval=data/x", "train.resume=none", "run_dir=/tmp/r", "seed=7",
        "parallel.activation_checkpointing=true",
    ])
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.betas == (0.9, 0.95)
    assert cfg.optim.warmup == 10 and isinstance(cfg.optim.warmup, int)
    assert cfg.stages[0].steps == 50
    assert cfg.model.overrides == {"vocab_size": "auto", "image_size": 128}
    assert (cfg.eval.retrieval, cfg.train.resume, cfg.run_dir, cfg.seed) == ("data/x", "none", "/tmp/r", 7)
    assert cfg.parallel.activation_checkpointing is True
    assert load_config(write(tmp_path, good_tree()), ["eval.retrieval=null"]).eval.retrieval is None


def test_exponent_floats_in_recipe_text(tmp_path):
    text = yaml.safe_dump(good_tree()) + "optim:\n  lr: 1e-3\n  eps: 1E-8\n"
    cfg = load_config(write(tmp_path, text))
    assert cfg.optim.lr == 1e-3 and cfg.optim.eps == 1e-8


def test_json_decides_zero_stage_and_precision_when_recipe_is_silent(tmp_path):
    path = write(tmp_path, edited(deepspeed="ds_configs/zero3_bf16.json"))
    cfg = load_config(path)
    assert (cfg.parallel.zero_stage, cfg.precision) == (3, "bf16")
    cfg = load_config(path, ["parallel.zero_stage=1", "precision=fp32"])
    assert (cfg.parallel.zero_stage, cfg.precision) == (1, "fp32")


def test_kind_defaults_and_loss_weight_merge(tmp_path):
    tree = two_stages()
    tree["stages"][0]["loss_weights"] = {"mlm": 0.5}
    cfg = load_config(write(tmp_path, tree))
    assert cfg.stages[0].loss_weights == {"itc": 1.0, "itm": 1.0, "mlm": 0.5}
    text = cfg.stages[1]
    assert text.trainable == STAGE2_TRAINABLE and text.whole_word is True and text.loss_weights == {"mlm": 1.0}
    cfg = load_config(write(tmp_path, tree), ["stages.1.trainable=all", "stages.1.whole_word=false"])
    assert cfg.stages[1].trainable == "all" and cfg.stages[1].whole_word is False


def test_stage_plan_resolves_fallbacks(tmp_path):
    tree = two_stages()
    tree["optim"] = {"lr": 1e-3, "warmup": 0.15}
    tree["stages"][1].update(lr=5e-4, warmup=7, micro_batch=4, global_batch=48, text_len=64, steps=30)
    cfg = load_config(write(tmp_path, tree))
    first = stage_plan(cfg, "pairs", dp_size=2)
    assert (first.lr, first.warmup_steps, first.micro_batch, first.global_batch, first.accumulation) == (
        1e-3, 15, 8, 32, 2)  # floor(0.15 x 100) = 15; 32 / (8 x 2) = 2
    assert (first.image_size, first.text_len) == (64, 32)  # the tiny preset's
    second = stage_plan(cfg, 1, dp_size=3)
    assert (second.lr, second.warmup_steps, second.accumulation, second.text_len) == (5e-4, 7, 4, 64)  # 48 / (4 x 3)
    with pytest.raises(ConfigError, match=r"^stages.1.global_batch: 48 is not divisible .* 4 x 5 = 20"):
        stage_plan(cfg, "text", dp_size=5)
    with pytest.raises(ConfigError, match="stages: no stage 'vqa'"):
        stage_plan(cfg, "vqa", dp_size=1)


def test_model_config_vocab_and_stage(tmp_path):
    cfg = load_config(write(tmp_path, good_tree()), ["stages.0.text_len=48"])
    assert model_config(cfg, vocab_size=777).vocab_size == 777
    assert model_config(cfg, vocab_size=777, stage=0).max_text_len == 48
    assert model_config(cfg, vocab_size=777) == PRESETS["tiny"].replace(vocab_size=777)
    with pytest.raises(ConfigError, match="model.vocab_size: 'auto' takes the tokenizer's size"):
        model_config(cfg)
    fixed = load_config(write(tmp_path, good_tree()), ["model.vocab_size=500"])
    assert model_config(fixed).vocab_size == 500
    with pytest.raises(ConfigError, match="model.vocab_size: 500 is smaller than the tokenizer's 1000 tokens"):
        model_config(fixed, vocab_size=1000)
    split = load_config(write(tmp_path, good_tree()), ["parallel.tensor=4"])
    with pytest.raises(ConfigError, match="30522 is not divisible by parallel.tensor=4; set model.vocab_size=30524"):
        model_config(split, vocab_size=30522)


def test_shipped_recipes():
    assert shipped_recipes() == ["base", "base_finetune", "large", "large_finetune", "tiny", "tiny_finetune",
                                 "tiny_image_text"]
    tiny = load_config("tiny")
    assert tiny.run_dir == "runs/tiny" and tiny.model.preset == "tiny"
    assert tiny.model.overrides == {"vocab_size": "auto", "patch_size": 16, "max_text_len": 64, "rel_pos": False,
                                   "layer_scale_init": None, "drop_path_rate": 0.0}
    assert (tiny.tokenizer, tiny.eval.retrieval) == ("data/synthetic/tok.model", "data/synthetic/retrieval_test")
    assert Path(tiny.deepspeed).name == "cpu.json" and tiny.precision == "fp32"
    assert [(s.name, s.kind, s.steps) for s in tiny.stages] == [
        ("image_mim", "image_mim", 150), ("text_mlm", "text_mlm", 150), ("image_text", "image_text", 1800)]
    assert (tiny.train.micro_batch, tiny.train.global_batch, tiny.optim.lr) == (32, 32, 1e-3)
    assert [s.data[0].shards for s in tiny.stages] == [
        "data/synthetic/images", "data/synthetic/text", "data/synthetic/pretrain_pairs"]
    assert load_config("tiny.yaml") == load_config(RECIPES / "tiny.yaml") == tiny
    alone = load_config("tiny_image_text")
    assert alone.run_dir == "runs/tiny_image_text" and alone.model.overrides["max_text_len"] == 16
    assert [(s.name, s.kind, s.steps) for s in alone.stages] == [("image_text", "image_text", 2000)]
    assert alone.stages[0].loss_weights == tiny.stages[2].loss_weights and alone.optim == tiny.optim
    for name, lr, micro in (("base", 2e-4, 32), ("large", 5e-5, 16)):
        cfg = load_config(name, world_size=8)
        assert cfg.model.preset == name and cfg.precision == "bf16" and cfg.parallel.zero_stage == 1
        optim = cfg.optim
        assert (optim.lr, optim.betas, optim.weight_decay, optim.warmup) == (lr, (0.9, 0.98), 0.01, 2500)
        assert cfg.model.overrides["drop_path_rate"] == 0.1 and cfg.train.global_batch == 1024
        assert [s.kind for s in cfg.stages] == ["image_mim", "text_mlm", "image_text"]
        assert [s.steps for s in cfg.stages] == [200000] * 3
        assert cfg.stages[1].text_len == 196 and cfg.stages[1].trainable == STAGE2_TRAINABLE
        assert cfg.stages[2].text_len == 40 and cfg.stages[2].whole_word is True
        assert stage_plan(cfg, 2, dp_size=8).accumulation == 1024 // (micro * 8)


def test_shipped_finetuning_recipes_hold_the_published_numbers():
    published = {  # stage: (lr base, lr large, image size, global batch, drop path base, drop path large)
        "coco_retrieval": (3e-5, 2e-5, 384, 3072, 0.2, 0.2), "f30k_retrieval": (3e-5, 2e-5, 384, 3072, 0.15, 0.2),
        "vqa": (3e-5, 1.5e-5, 480, 128, 0.15, 0.15), "nlvr2": (5e-5, 3e-5, 384, 128, None, 0.15)}
    for column, name in enumerate(("base", "large")):
        cfg = load_config(f"{name}_finetune", world_size=8)
        assert [s.kind for s in cfg.stages] == ["retrieval", "retrieval", "vqa", "nlvr2"]
        for stage in cfg.stages:
            lr, size, batch, drop = (published[stage.name][column], *published[stage.name][2:4],
                                     published[stage.name][4 + column])
            assert (stage.lr, stage.image_size, stage.global_batch or cfg.train.global_batch) == (lr, size, batch)
            assert stage.drop_path_rate == drop and stage.init_from == f"runs/{name}/stages/image_text/weights.safetensors"
        assert [s.steps for s in cfg.stages][:2] == [3000, 1500] and cfg.stages[0].loss_weights == {"itc": 1.0, "itm": 0.0}
        assert head_lr_mult(cfg.stages[2]) == 20.0 and cfg.optim.warmup == 0.1


def test_shipped_recipes_comment_every_number():
    for path in RECIPES.glob("*.yaml"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            assert not re.search(r"\d", code) or "#" in line, f"{path.name}:{number} has a number without a comment"


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config("base", ["stages.0.data=[{shards: a, weight: 2.0}, b]", "train.deadline_minutes=30"])
    assert [(d.shards, d.weight) for d in cfg.stages[0].data] == [("a", 2.0), ("b", 1.0)]
    again = load_config(write(tmp_path, yaml.safe_dump(to_dict(cfg))))
    assert again == cfg


def test_every_schema_field_has_a_docstring():
    tree = ast.parse(SCHEMA.read_text())
    classes = [node for node in tree.body if isinstance(node, ast.ClassDef)]
    assert len(classes) == 9
    for cls in classes:
        body = cls.body
        for i, node in enumerate(body):
            if isinstance(node, ast.AnnAssign):
                follow = body[i + 1] if i + 1 < len(body) else None
                assert isinstance(follow, ast.Expr) and isinstance(follow.value, ast.Constant), (
                    f"{cls.name}.{node.target.id} has no docstring")


def _tar(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w"):
        pass


def test_check_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(write(tmp_path, good_tree()), ["eval.retrieval=data/test"])
    with pytest.raises(MissingFileError, match="^tokenizer: data/synthetic/tok.model does not exist"):
        check_files(cfg)
    (tmp_path / "data/synthetic").mkdir(parents=True)
    (tmp_path / "data/synthetic/tok.model").write_bytes(b"")
    with pytest.raises(MissingFileError, match="^stages.0.data.0.shards: "):
        check_files(cfg)
    _tar(tmp_path / "data/synthetic/pretrain_pairs/shard-000000.tar")
    with pytest.raises(FileNotFoundError, match="^eval.retrieval: "):
        check_files(cfg)
    _tar(tmp_path / "data/test/shard-000000.tar")
    check_files(cfg)


def test_main_errors_passes_results_and_other_errors_through():
    assert main_errors(lambda x: x + 1)(1) == 2
    with pytest.raises(KeyError):
        main_errors(lambda: {}["x"])()


def test_config_cli_prints_resolved_recipe_and_plans(capsys):
    from vlmo_ds.config.__main__ import main

    main(["tiny_image_text", "stages.0.steps=50", "--world-size", "1"])
    out = capsys.readouterr().out
    assert yaml.safe_load(out)["stages"][0]["steps"] == 50  # the trailing lines are YAML comments
    assert "# stage 0 image_text (image_text): 50 steps, lr 0.001 after 2 warm-up steps, 32 micro x 1 accum" in out
    with pytest.raises(SystemExit) as stop:
        main(["tiny", "optim.lr=-1"])
    assert stop.value.code == 2 and capsys.readouterr().err == "error: optim.lr: must be > 0, got -1.0\n"
