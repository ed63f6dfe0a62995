"""The quick start's recipe plumbing: data paths per stage kind, the ablation's baseline, the comparison table."""
from pathlib import Path

from vlmo_ds.config import load_config
from vlmo_ds.quickstart import FINETUNE, image_text_only, pretrained_weights, recipe_overrides, side_by_side


def test_every_stage_reads_its_kind_of_split():
    root = Path("/data/syn")
    cfg = load_config("tiny", recipe_overrides("tiny", root))
    assert [(s.name, s.data[0].shards) for s in cfg.stages] == [
        ("image_mim", "/data/syn/images"), ("text_mlm", "/data/syn/text"), ("image_text", "/data/syn/pretrain_pairs")]
    assert (cfg.tokenizer, cfg.eval.retrieval, cfg.eval.text_mlm) == (
        "/data/syn/tok.model", "/data/syn/retrieval_test", "/data/syn/text_heldout")
    tiny = load_config("tiny_image_text", recipe_overrides("tiny_image_text", root))
    assert [s.data[0].shards for s in tiny.stages] == ["/data/syn/pretrain_pairs"] and tiny.eval.text_mlm is None


def test_fine_tuning_reads_each_task_split_from_the_pretrained_weights():
    root = Path("/data/syn")
    weights = pretrained_weights(load_config("tiny", ["run_dir=/runs/q"]))
    assert weights == Path("/runs/q/stages/image_text/weights.safetensors")
    cfg = load_config(FINETUNE, recipe_overrides(FINETUNE, root, weights))
    assert [(s.kind, s.data[0].shards, s.eval_data, s.init_from) for s in cfg.stages] == [
        (kind, f"/data/syn/{train}", f"/data/syn/{held_out}", str(weights))
        for kind, train, held_out in (("retrieval", "retrieval_train", "retrieval_test"),
                                      ("vqa", "vqa_train", "vqa_val"), ("nlvr2", "nlvr2_train", "nlvr2_dev"))]


def test_ablation_baseline_is_the_image_text_stage_for_all_steps():
    cfg = load_config("tiny", ["run_dir=/runs/q", "stages.image_mim.steps=7", "stages.text_mlm.steps=5",
                                         "stages.image_text.steps=11"])
    baseline = image_text_only(cfg)
    (stage,) = baseline.stages
    assert (stage.name, stage.kind, stage.steps, baseline.run_dir) == ("image_text", "image_text", 23, "/runs/q_image_text_only")
    assert stage.text_len == cfg.stages[2].text_len and cfg.stages[2].steps == 11  # the recipe itself is unchanged


def test_side_by_side_table():
    runs = {"stagewise": {f"{p}@{k}": 0.5 + k / 100 for p in ("tr", "ir") for k in (1, 5, 10)},
            "image-text only": {f"{p}@{k}": 0.25 for p in ("tr", "ir") for k in (1, 5, 10)}}
    lines = side_by_side(runs).splitlines()
    assert lines[0].split() == ["recall", "%", "stagewise", "image-text", "only"]
    assert lines[1].split() == ["TR@1", "51.00", "25.00"] and lines[6].split() == ["IR@10", "60.00", "25.00"]
