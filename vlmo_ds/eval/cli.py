r"""`python -m vlmo_ds.eval TASK --weights W.safetensors --data SPLIT --tokenizer TOK [...]`: evaluate consolidated
weights on one split, print the metrics table and append the metrics to metrics.jsonl.

TASK is one of
    retrieval          TR@1/5/10 and IR@1/5/10 of the dual encoder; --rerank-k K also re-ranks each query's K best
                       candidates with the fusion encoder's ITM head and reports both
    vqa                the official VQA score (annotated splits) and --submission FILE, the evaluation server's
                       results JSON (test-dev, test); the answer table is --answers, else the answer_vocab.json
                       beside the weights, else the split's (vlmo_ds.tasks.answers)
    nlvr2              accuracy (and consistency) on dev / test-P; --predictions FILE writes the official CSV
    export-embeddings  the image and caption embeddings of a retrieval set as safetensors shards with their ids
                       (--out DIR; vlmo_ds.eval.export)
W is a stage's weights.safetensors (RUN/stages/NAME/: its model config is inside; the metrics go to
RUN/metrics.jsonl) or a published / converted checkpoint with --preset. Run it alone or under any launcher (torchrun,
srun, mpirun): each rank then evaluates a slice and the results are gathered, with the same numbers as one process.
    python -m vlmo_ds.eval vqa --weights runs/tiny_ft/stages/vqa/weights.safetensors \
        --data data/synthetic/vqa_val --tokenizer data/synthetic/tok.model
    torchrun --nproc_per_node 8 -m vlmo_ds.eval retrieval --weights W --data coco/test --tokenizer vocab.txt \
        --rerank-k 16
Exit status: 0 done, 2 bad arguments or files.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch.distributed as dist

from vlmo_ds.data.formats.vqa2 import VOCAB_FILE
from vlmo_ds.data.tokenizer import load_tokenizer
from vlmo_ds.eval.export import DTYPES, export_embeddings
from vlmo_ds.eval.tables import task_table
from vlmo_ds.eval.weights import eval_model, weights_file
from vlmo_ds.parallel.device import device_of
from vlmo_ds.parallel.launch import discover, init_distributed
from vlmo_ds.tasks.answers import load_answer_vocab
from vlmo_ds.tasks.heads import head_answers
from vlmo_ds.tasks.kinds import evaluate_task
from vlmo_ds.train.metrics import METRICS_FILE
from vlmo_ds.train.stage_record import RECORD_FILE, STAGES_DIR

TASKS = ("retrieval", "vqa", "nlvr2", "export-embeddings")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m vlmo_ds.eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task", choices=TASKS, help="what to evaluate")
    p.add_argument("--weights", required=True, help="weights.safetensors of a stage (or a checkpoint with --preset)")
    p.add_argument("--data", required=True, help="the split's shards: a folder, brace pattern or list")
    p.add_argument("--tokenizer", required=True, help="the tokenizer the model was trained with (*.model, vocab.txt)")
    p.add_argument("--batch", type=int, default=64, help="examples per forward pass (default 64)")
    p.add_argument("--image-size", type=int, help="evaluate at this resolution (default: the weights')")
    p.add_argument("--text-len", type=int, help="text length (default: the weights' max_text_len)")
    p.add_argument("--preset", help="model preset of weights without a vlmo_ds config (base, large, ...)")
    p.add_argument("--rerank-k", type=int, default=0, help="retrieval: ITM re-ranking of the top K (default 0: off)")
    p.add_argument("--answers", help="vqa: the answer_vocab.json the head was trained with")
    p.add_argument("--submission", help="vqa: write the results JSON for the evaluation server here")
    p.add_argument("--predictions", help="nlvr2: write identifier,True|False lines here")
    p.add_argument("--out", help="export-embeddings: the output folder")
    p.add_argument("--shard-rows", type=int, default=10_000, help="export-embeddings: rows per shard")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="export-embeddings: stored precision")
    p.add_argument("--metrics", help="metrics.jsonl to append to (default: the run folder's, else beside W)")
    return p.parse_args(argv)


def stage_folder(weights: Path) -> tuple[Path, int]:
    """(where metrics.jsonl goes, the global step the weights were made at, 0 if unknown)."""
    record = weights.parent / RECORD_FILE
    step = json.loads(record.read_text()).get("global_step", 0) if record.is_file() else 0
    if weights.parent.parent.name == STAGES_DIR:
        return weights.parent.parent.parent, int(step)
    return weights.parent, int(step)


def find_answers(args: argparse.Namespace) -> list[str]:
    if args.answers:
        return load_answer_vocab(args.answers)
    beside = Path(args.weights).parent / VOCAB_FILE
    return load_answer_vocab(beside if beside.is_file() else args.data)


def append_metrics(path: Path, step: int, record: dict[str, Any]) -> None:
    with path.open("a") as handle:
        handle.write(json.dumps({"step": step, "time": time.time(), "event": "eval", **record}) + "\n")


def run(args: argparse.Namespace) -> dict[str, Any]:
    env = discover()
    if env.world_size > 1:
        init_distributed(env, use_deepspeed=False)
    device = device_of(env)
    task = "retrieval" if args.task == "export-embeddings" else args.task
    model = eval_model(args.weights, task, args.image_size, args.preset)
    cfg = model.cfg if args.text_len is None else model.cfg.replace(max_text_len=args.text_len)
    tokenizer = load_tokenizer(args.tokenizer)
    if tokenizer.vocab_size > model.cfg.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model {model.cfg.vocab_size}; "
                         "give the tokenizer the model was trained with")
    model.to(device)
    common = dict(batch_size=args.batch, rank=env.rank, world_size=env.world_size,
                  group=dist.group.WORLD if env.world_size > 1 else None, device=device)
    if args.task == "export-embeddings":
        if not args.out:
            raise ValueError("export-embeddings needs --out DIR")
        manifest = export_embeddings(model, args.data, tokenizer, args.out, cfg.image_size, cfg.max_text_len,
                                     shard_rows=args.shard_rows, dtype=args.dtype, **common)
        return {"image_count": manifest["image"]["count"], "text_count": manifest["text"]["count"]}
    answers = None
    if task == "vqa":
        state_answers = head_answers(dict(model.named_parameters()))
        answers = find_answers(args)
        if len(answers) != state_answers:
            raise ValueError(f"the answer table has {len(answers)} answers but the VQA head {state_answers}; give "
                             "the answer_vocab.json of its fine-tuning with --answers")
    return evaluate_task(task, model, args.data, tokenizer, cfg, answers=answers, rerank_k=args.rerank_k,
                         output=args.submission or args.predictions, **common)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        args.weights = str(weights_file(args.weights))
        metrics = run(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"vlmo_ds.eval: {err}", file=sys.stderr)
        return 2
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        weights = Path(args.weights)
        folder, step = stage_folder(weights)
        path = Path(args.metrics) if args.metrics else folder / METRICS_FILE
        append_metrics(path, step, {"task": args.task, "data": str(args.data), "weights": str(weights),
                                    **{f"eval/{args.task}/{k}": v for k, v in metrics.items()}})
        if args.task == "export-embeddings":
            print(f"wrote {metrics['image_count']} image and {metrics['text_count']} text embeddings to {args.out}")
        else:
            print(task_table(args.task, metrics))
        print(f"metrics appended to {path}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0
