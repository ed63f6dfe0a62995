"""The typed run configuration of vlmo_ds: one frozen dataclass per recipe section.

A recipe YAML mirrors these classes key for key (`optim: {lr: 2e-4}` is `RunConfig.optim.lr`), except the model
section, which is flat: `model: {preset: base, image_size: 384}` names a preset of vlmo_ds.model.config.PRESETS and
overrides single ModelConfig fields. Lists in a recipe become tuples here so that a loaded config cannot change.
load_config (vlmo_ds.config.load) builds and validates these; nothing else should construct them from user input.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

PRETRAIN_KINDS = ("image_text", "text_mlm", "image_mim")
TASK_KINDS = ("retrieval", "vqa", "nlvr2")
"""Fine-tuning stages (vlmo_ds.tasks): they start from a pre-training stage's weights and end with their task's
evaluation on the stage's eval_data."""
STAGE_KINDS = PRETRAIN_KINDS + TASK_KINDS

LOSS_KEYS: dict[str, tuple[str, ...]] = {
    "image_text": ("itc", "itm", "mlm"),
    "text_mlm": ("mlm",),
    "image_mim": ("mim",),
    "retrieval": ("itc", "itm"),
    "vqa": ("vqa",),
    "nlvr2": ("nlvr2",),
}

# Parameter groups a stage's `trainable` list names; vlmo_ds.config.groups says which parameters each holds.
TRAINABLE_GROUPS = (
    "text_embeddings", "modality_types", "attention", "image_experts", "text_experts", "vl_experts",
    "relative_position", "final_norm", "heads", "mlm_head", "itc_heads", "itm_head", "mim_head", "patch_embed",
    "task_heads",
)

# The image-only stage: everything an image passes through learns; text embeddings, text and VL experts and the
# text heads stay as they are (the published stage 1 is BEiT, which has none of them).
STAGE1_TRAINABLE = ("patch_embed", "modality_types", "attention", "image_experts", "relative_position", "final_norm",
                    "mim_head")

# The published text-only stage: attention and image experts stay frozen; the text expert, text embeddings, modality
# types, relative position table, final norm and MLM head learn (shared/reference/vlmo-official.md, "Stage 2").
STAGE2_TRAINABLE = ("text_embeddings", "modality_types", "text_experts", "relative_position", "final_norm", "mlm_head")

# Defaults that depend on a stage's kind; load_config fills them in where the recipe leaves the key out.
KIND_DEFAULTS: dict[str, dict[str, Any]] = {
    "image_text": {"loss_weights": {"itc": 1.0, "itm": 1.0, "mlm": 0.25}, "whole_word": False, "trainable": "all"},
    "text_mlm": {"loss_weights": {"mlm": 1.0}, "whole_word": True, "trainable": STAGE2_TRAINABLE},
    "image_mim": {"loss_weights": {"mim": 1.0}, "whole_word": False, "trainable": STAGE1_TRAINABLE},
    # published retrieval fine-tuning is ITC alone; itm > 0 also trains the ITM head that re-ranking uses
    "retrieval": {"loss_weights": {"itc": 1.0, "itm": 0.0}, "whole_word": False, "trainable": "all"},
    "vqa": {"loss_weights": {"vqa": 1.0}, "whole_word": False, "trainable": "all"},
    "nlvr2": {"loss_weights": {"nlvr2": 1.0}, "whole_word": False, "trainable": "all"},
}

RESUME_WORDS = ("auto", "none")
RESUME_CHANGES = ("steps", "global_batch", "schedule")
"""Recipe changes train.allow_resume_changes may accept inside a stage (vlmo_ds.train.resume_check)."""
MIM_TARGETS = ("pixels", "tokens")


@dataclass(frozen=True, kw_only=True)
class ModelSection:
    """A model preset and the ModelConfig fields a recipe changes."""

    preset: str
    """Name in vlmo_ds.model.config.PRESETS (tiny, base, base_plus, large, giant, huge2b)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """ModelConfig fields to change, e.g. {"image_size": 384}; vocab_size may be "auto" (the tokenizer's size)."""


@dataclass(frozen=True, kw_only=True)
class ParallelSection:
    """How one model replica is split over ranks; the data-parallel size is what remains of the world."""

    tensor: int = 1
    """Tensor-parallel ranks per replica (megatron-core); must divide model.heads and model.vocab_size."""
    pipeline: int = 1
    """Pipeline stages per replica; at most model.depth, and only with ZeRO 0-1."""
    zero_stage: int | None = None
    """ZeRO stage 0-3; null in a recipe = the stage in the deepspeed JSON (load_config fills it in)."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass (less memory, ~30% more compute)."""
    itc_local_rows: bool = False
    """ITC: each rank builds only its own rows of the global logits ([B, N], not [N, N]: B/N of the memory)."""
    compile_blocks: bool = False
    """torch.compile each MoME block (fused elementwise kernels; compiling costs a minute or more at start-up);
    with ZeRO 0-2 and parallel.tensor=1."""


@dataclass(frozen=True, kw_only=True)
class OptimSection:
    """AdamW and its learning-rate schedule: linear warm-up, then linear decay to end_lr, per stage."""

    lr: float = 2e-4
    """Peak learning rate (stages may override it)."""
    betas: tuple[float, float] = (0.9, 0.98)
    """AdamW betas, each in [0, 1)."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.01
    """Decoupled (AdamW) weight decay."""
    warmup: float | int = 0.1
    """Warm-up: a float in [0, 1) = that fraction of the stage's steps, an integer = that many steps."""
    end_lr: float = 0.0
    """Learning rate reached at the stage's last step."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""


@dataclass(frozen=True, kw_only=True)
class TrainSection:
    """Batching, data loading, logging and checkpointing."""

    micro_batch: int = 8
    """Samples per data-parallel rank per forward pass."""
    global_batch: int = 64
    """Samples per optimizer step = micro_batch x gradient accumulation x data-parallel ranks."""
    num_workers: int | None = None
    """DataLoader worker processes per rank; null = the CPU cores per local GPU less one (vlmo_ds.data.workers)."""
    open_shards: int = 4
    """Shards each loader reads at once (samples are mixed across them)."""
    log_every: int = 10
    """Steps between metric lines (metrics.jsonl, TensorBoard, the training log's line: vlmo_ds.train.log_line)."""
    ckpt_every: int = 200
    """Steps between checkpoints (each stage also ends with one)."""
    keep_last: int = 3
    """Checkpoints kept in the run folder; older ones are deleted."""
    max_bad_steps: int = 3
    """Stop the run (exit status 65) after this many steps in a row with a non-finite loss or gradient norm."""
    resume: str = "auto"
    """"auto" = the run folder's latest checkpoint if any, "none" = start afresh, or a checkpoint path."""
    deadline_minutes: float | None = None
    """Stop with a checkpoint this many minutes after start (for time-limited jobs); null = no limit."""
    collective_timeout_minutes: float = 30.0
    """A rank that makes no progress in a step or checkpoint for this long ends the job: every other rank exits with
    one line naming it, status 75 (requeued under slurm/); collectives time out a minute later (vlmo_ds.train.watchdog).
    Fractions are allowed (0.5 = 30 s)."""
    record_samples: bool = False
    """Write the sample keys of every step to RUN_DIR/samples_rank<r>.jsonl (audits the data order across resumes)."""
    only_stage: str | None = None
    """Run this one stage (by name), then exit: one job per stage (`--stage NAME` sets it); null = every stage."""
    allow_resume_changes: str | tuple[str, ...] = ()
    """Recipe changes a resume accepts (a list, or names joined by commas): steps (the decay is re-planned from the
    checkpoint's step; fewer steps than the stage has trained are always refused), global_batch, schedule (lr,
    warmup, end_lr). Any other change to the stage a checkpoint belongs to is refused."""


@dataclass(frozen=True, kw_only=True)
class EvalSection:
    """Zero-shot evaluation during pre-training."""

    retrieval: str | None = None
    """Shards of an image-text retrieval test set (folder or pattern); null = no retrieval evaluation."""
    every: int = 0
    """Steps between evaluations; 0 = only at the end of each stage."""
    batch: int = 64
    """Samples per rank per evaluation forward pass."""
    text_mlm: str | None = None
    """Held-out text shards: MLM accuracy (beside the unigram baseline) at the end of each text_mlm stage."""
    rerank_k: int = 0
    """Retrieval evaluations also re-rank each query's k best candidates with the ITM head (0: off)."""


@dataclass(frozen=True, kw_only=True)
class LogSection:
    """Where training metrics go besides metrics.jsonl, TensorBoard and the log lines."""

    wandb: str | None = None
    """Weights & Biases project to log to (needs `pip install wandb`; WANDB_MODE=offline keeps it on disk);
    null = no W&B."""


@dataclass(frozen=True, kw_only=True)
class DataSource:
    """One shard source of a stage and its share of the samples."""

    shards: str
    """A folder of *.tar shards or a brace pattern (shard-{000000..000099}.tar)."""
    weight: float = 1.0
    """Relative sampling weight (> 0) against the stage's other sources."""


@dataclass(frozen=True, kw_only=True)
class StageConfig:
    """One stage: pre-training (image_text, text_mlm, image_mim) or fine-tuning (retrieval, vqa, nlvr2): its data,
    objectives, trainable parameters and schedule."""

    name: str
    """Unique name: a letter, then letters, digits, '_', '-', '.'; checkpoints, logs and overrides use it."""
    kind: str
    """image_text (ITC + ITM + MLM), text_mlm (text-only MLM), image_mim (image-only masked image modelling), or a
    fine-tuning task: retrieval (ITC of the dual encoder, optionally ITM), vqa (soft-score BCE on the published head),
    nlvr2 (two fused passes, the published head)."""
    data: tuple[DataSource, ...]
    """Shard sources; a recipe may give one path, or a list of paths and {shards, weight} mappings (mixed by weight
    in chunks of each micro-batch)."""
    steps: int
    """Optimizer steps in this stage."""
    loss_weights: dict[str, float] = field(default_factory=dict)
    """Weight per objective, merged into the kind's: image_text {itc: 1, itm: 1, mlm: 0.25}, text_mlm / image_mim 1."""
    lr: float | None = None
    """Peak learning rate of this stage; null = optim.lr."""
    warmup: float | int | None = None
    """Warm-up of this stage (as optim.warmup); null = optim.warmup."""
    micro_batch: int | None = None
    """Per-rank batch of this stage; null = train.micro_batch."""
    global_batch: int | None = None
    """Samples per optimizer step in this stage; null = train.global_batch."""
    image_size: int | None = None
    """Image resolution of this stage; null = the model's image_size."""
    text_len: int | None = None
    """Text length of this stage; null = the model's max_text_len; at most model.table_text_len."""
    drop_path_rate: float | None = None
    """Stochastic depth of this stage; null = the model's drop_path_rate (published fine-tuning: 0.1-0.2 by task)."""
    trainable: str | tuple[str, ...] = "all"
    """"all" or a list of parameter groups (TRAINABLE_GROUPS); text_mlm defaults to the published stage-2 set,
    image_mim to the image path (STAGE1_TRAINABLE). The rest is frozen: no gradient, no optimizer state."""
    mlm_prob: float = 0.15
    """Fraction of text tokens masked for MLM."""
    whole_word: bool = False
    """Mask whole words rather than single tokens (default True for text_mlm)."""
    mim_ratio: float = 0.4
    """Fraction of image patches masked (blockwise) for MIM."""
    mim_target: str | None = None
    """image_mim: "pixels" (normalised patch pixels) or "tokens" (visual-token ids, KEY.vtok.npy in the shards);
    null = model.mim_targets."""
    init_from: str | None = None
    """Start this stage from other weights than the previous stage's: the name of an earlier stage of this recipe
    (its final weights: fine-tuning stages all start from the pre-trained ones), or a file (.safetensors or a
    weights-only .pt/.pth state dict, e.g. a converted BEiT or published VLMo checkpoint). null = the previous
    stage's."""
    init_vl_from_text: bool = False
    """At this stage's start, copy each VL block's text expert into its VL expert (published: VL experts random)."""
    randaug: bool = True
    """RandAugment (2 ops, magnitude 7) on training images."""
    hflip: bool = True
    """Random horizontal flip of training images."""
    crop_scale: tuple[float, float] = (0.5, 1.0)
    """Area range of the random resized crop (published 0.5-1; a narrower range keeps positions in captions true)."""
    eval_data: str | None = None
    """Fine-tuning stages: the held-out split evaluated at the stage's end (retrieval test images with captions,
    VQA val, NLVR2 dev or test-P); a retrieval stage falls back to eval.retrieval; null = no evaluation."""
    answers: str | None = None
    """vqa: the answer table (answer_vocab.json, or a folder holding it); null = the one beside the training shards
    (tools/make_shards.py vqa2 writes it there; the synthetic splits carry theirs)."""
    head_lr_mult: float | None = None
    """Fine-tuning: the task head's learning rate is lr x this; null = published (vqa 20, nlvr2 1)."""


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Everything one `python -m vlmo_ds.train RECIPE.yaml key=value ...` run needs."""

    run_dir: str
    """Folder for checkpoints, metrics.jsonl and TensorBoard events; default runs/<recipe name>."""
    seed: int = 0
    """Seed of parameter initialisation, data order and masking."""
    model: ModelSection
    """Model preset and field overrides."""
    tokenizer: str
    """Sentencepiece *.model or BERT vocab.txt; checked by check_files, since the quick start may create it later."""
    parallel: ParallelSection = field(default_factory=ParallelSection)
    """Tensor, pipeline and ZeRO layout."""
    precision: str | None = None
    """"fp32" or "bf16"; null in a recipe = as the deepspeed JSON's bf16.enabled says (load_config fills it in)."""
    deepspeed: str
    """DeepSpeed JSON (ds_configs/*.json); relative paths are looked up in the working folder, then the repository."""
    optim: OptimSection = field(default_factory=OptimSection)
    """Optimizer and schedule."""
    train: TrainSection = field(default_factory=TrainSection)
    """Batching, loading, logging, checkpoints."""
    eval: EvalSection = field(default_factory=EvalSection)
    """Evaluation during training."""
    log: LogSection = field(default_factory=LogSection)
    """Optional metric sinks (Weights & Biases)."""
    stages: tuple[StageConfig, ...]
    """Pre-training stages, run in order (at least one)."""
