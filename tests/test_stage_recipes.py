"""Malformed stagewise recipes stop before any training with one line naming the key: unknown objective or kind,
missing stage data, a trainable set naming nothing, a text length change without a resize rule, a stage whose start
weights do not exist yet; and the shipped stagewise recipes load with their published numbers."""
from pathlib import Path

import pytest
import yaml

from vlmo_ds.config import STAGE2_TRAINABLE, ConfigError, load_config
from vlmo_ds.config.load import RECIPES
from vlmo_ds.config.schema import STAGE1_TRAINABLE
from vlmo_ds.train.__main__ import main


def stagewise_args(data: Path, run_dir: Path, *extra: str) -> list[str]:
    """tiny on the test data, two steps a stage."""
    return ["tiny", f"run_dir={run_dir}", f"tokenizer={data / 'tok.model'}",
            f"stages.image_mim.data={data / 'images'}", f"stages.text_mlm.data={data / 'text'}",
            f"stages.image_text.data={data / 'pretrain_pairs'}", "eval.retrieval=null",
            f"eval.text_mlm={data / 'text_heldout'}", "stages.image_mim.steps=2", "stages.text_mlm.steps=2",
            "stages.image_text.steps=2", "train.micro_batch=4", "train.global_batch=4", *extra]


BAD = [
    ("unknown objective", ["stages.image_text.loss_weights.itx=1"], "unknown key 'stages.2.loss_weights.itx'"),
    ("unknown kind", ["stages.0.kind=video"], "stages.0.kind: unknown stage kind 'video'"),
    ("stage data empty", ["stages.1.data=[]"], "stages.1.data: no shard sources"),
    ("stage data absent", ["stages.1.data=/no/such/shards"], "stages.1.data.0.shards:"),
    ("trainable empty", ["stages.1.trainable=[]"], "stages.1.trainable: must be 'all' or a non-empty list"),
    ("trainable group absent from the stage", ["stages.1.trainable=[mim_head]"],
     "stages.1.trainable: group 'mim_head' names no parameter of this stage's model"),
    ("trainable unknown group", ["stages.1.trainable=[wings]"], "stages.1.trainable: unknown group 'wings'"),
    ("trainable only an absent table", ["model.rel_pos=false", "stages.1.trainable=[relative_position]"],
     "stages.1.trainable: names no parameter of this stage's model"),
    ("text grows without a rule", ["model.rel_pos=false", "stages.1.text_len=8"],
     "stages.2.text_len: 16 is longer than stages.1's 8, and absolute text positions"),
    ("mim target on a text stage", ["stages.1.mim_target=pixels"], "stages.1.mim_target: only image_mim stages"),
    ("mim target unknown", ["stages.0.mim_target=pixel"], "stages.0.mim_target: must be pixels or tokens"),
    ("mim stage without target", ["stages.0.mim_target=null"], "stages.0.kind: image_mim stages need a masked-image"),
    ("unknown stage to run", ["--stage", "text"], "train.only_stage: no stage 'text' (did you mean 'text_mlm'?)"),
    ("init_from missing", ["stages.1.init_from=/no/such/weights.safetensors"], "stages.1.init_from: /no/such/weights"),
    ("held-out text missing", ["eval.text_mlm=/no/such/text"], "eval.text_mlm:"),
    ("stage before it has not finished", ["--stage", "text_mlm"],
     "stages.1: stage 'text_mlm' starts from the final weights of stage 'image_mim', which has not finished"),
]


@pytest.mark.parametrize("extra, expected", [case[1:] for case in BAD], ids=[case[0] for case in BAD])
def test_bad_stagewise_recipe_is_one_line(extra, expected, capsys, run_data, tmp_path):
    assert main(stagewise_args(run_data, tmp_path / "run", *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err
    assert not (tmp_path / "run").exists()  # nothing started


def test_stage_without_data_key(tmp_path):
    tree = yaml.safe_load((RECIPES / "tiny.yaml").read_text())
    del tree["stages"][1]["data"]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree))
    with pytest.raises(ConfigError, match=r"^stages.1.data: required"):
        load_config(path)


def test_stage_with_init_from_needs_no_previous_stage(run_data, tmp_path):
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"")
    cfg = load_config("tiny", [f"stages.2.init_from={weights}", "model.rel_pos=false",
                                         "stages.1.text_len=8"])  # no rule needed: stage 2 does not follow stage 1
    assert cfg.stages[2].init_from == str(weights)


def test_shipped_stagewise_recipes():
    tiny = load_config("tiny")
    assert [(s.name, s.kind) for s in tiny.stages] == [("image_mim", "image_mim"), ("text_mlm", "text_mlm"),
                                                        ("image_text", "image_text")]
    assert tiny.stages[0].trainable == STAGE1_TRAINABLE and tiny.stages[1].trainable == STAGE2_TRAINABLE
    assert tiny.stages[0].mim_target == "pixels" and tiny.eval.text_mlm == "data/synthetic/text_heldout"
    assert (tiny.stages[1].text_len, tiny.stages[2].text_len) == (64, 16)
    for name in ("base", "large"):
        cfg = load_config(name, world_size=8)
        mim, text, pairs = cfg.stages
        assert (mim.kind, mim.mim_target, mim.trainable) == ("image_mim", "pixels", STAGE1_TRAINABLE)
        assert (text.text_len, text.whole_word, text.trainable) == (196, True, STAGE2_TRAINABLE)
        assert (pairs.text_len, pairs.trainable, pairs.init_vl_from_text) == (40, "all", False)
        assert [d.weight for d in pairs.data] == [3.0, 0.86, 0.57, 5.4]
