#!/usr/bin/env bash
# One-GPU check of the GPU path, under 8 minutes: the bf16 image-text pre-training step (ITC both paths, ITM with
# hard negatives, MLM; backward; AdamW) of `base` and `large` at the micro batch the capacity planner picks for this
# GPU, printing samples/s, MFU, peak memory beside the planner's prediction and the attention kernel used; then
# `giant` under ZeRO-3 with CPU offload for 2 steps through the trainer's layout code and DeepSpeed engine
# (tools/bench.py's layout mode, one rank), as a smoke test.
#   tools/gpu_check.sh                 # on a machine with one CUDA GPU (the kind is read from torch)
#   DEVICE=cpu DTYPE=fp32 PRESETS=tiny BATCH=2 STEPS=1 OFFLOAD_PRESET=tiny OFFLOAD_BATCH=2 tools/gpu_check.sh
#                                      # the same commands on CPU (the offload smoke in fp32 there)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bf16}
PRESETS=${PRESETS:-base large}
BATCH=${BATCH:-auto}          # auto: the largest micro batch the planner fits on one GPU of this kind
STEPS=${STEPS:-5}
OFFLOAD=${OFFLOAD:-1}
OFFLOAD_PRESET=${OFFLOAD_PRESET:-giant}
OFFLOAD_BATCH=${OFFLOAD_BATCH:-8}
GPU=${GPU:-$($PY -c "import torch; from vlmo_ds.plan.gpus import gpu_kind; \
print(gpu_kind(torch.cuda.get_device_name()) or 'h100-80gb') if torch.cuda.is_available() else print('h100-80gb')")}
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}

for preset in $PRESETS; do
    echo "== $preset, $DTYPE, planner for $GPU"
    timeout 180 $PY -m vlmo_ds.plan.step_check --preset "$preset" --batch "$BATCH" --device "$DEVICE" \
        --dtype "$DTYPE" --gpu "$GPU" --steps "$STEPS"
done

if [ "$OFFLOAD" = 1 ]; then
    echo "== $OFFLOAD_PRESET, ZeRO-3 with parameters and optimizer offloaded to the CPU (DeepSpeed CPU Adam), smoke test"
    timeout 300 $PY tools/bench.py --ranks 1 --zero-stage 3 --ds-config ds_configs/zero3_offload_bf16.json \
        --preset "$OFFLOAD_PRESET" --dtype "$DTYPE" --batch "$OFFLOAD_BATCH" --steps 2 --warmup 1
fi
