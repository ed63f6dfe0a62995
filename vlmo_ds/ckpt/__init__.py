"""Checkpoint tools: read any vlmo_ds checkpoint (DeepSpeed's files under any tensor x pipeline x data layout and
ZeRO stage), consolidate it into one safetensors file in our layout, reshard it into another layout the trainer
resumes from, convert to and from the published VLMo layout, import BEiT image weights, and describe a checkpoint.

Modules, one job each:
    errors         CheckpointError: the one-line user-facing error every tool raises
    safe_write     OutDir: atomic writes that never leave the output folder
    safe_read      weights-only torch loads (DeepSpeed's files included) and safetensors reads, with clear errors
    weights_only_engine   DeepSpeed's own reads of a resumed checkpoint made weights-only
    layout         a checkpoint's layout (TP x PP x DP, ZeRO stage) and model config; preset checks
    ds_files       DeepSpeed's files of one model-parallel rank -> whole fp32 weights and Adam state by name
    consolidated   one whole model with its Adam state; the consolidated folder format, read and written
    consolidate    any checkpoint -> consolidated: every rank merged (PP, then TP)
    engine_state   weights and Adam state written into a built DeepSpeed engine (any ZeRO stage)
    reshard        a consolidated state -> a checkpoint of another layout, written by that layout's engines
    reshard_worker one rank of that layout (a spawned CPU process)
    official       our layout <-> the published VLMo layout
    beit           BEiT (unilm / timm keys) -> the image side of VLMo, and back
    describe       what `inspect` prints
    cli            `python tools/ckpt.py SUBCOMMAND`
"""
