#!/bin/bash
# Submit a recipe's pre-training stages as a chain of Slurm jobs: one slurm/pretrain.sbatch job per stage
# (`python -m vlmo_ds.train RECIPE ... --stage NAME`), each held until the one before it has ended successfully.
#
#   slurm/submit_stages.sh [SBATCH_OPTION ...] -- RECIPE [key=value ...]
#   slurm/submit_stages.sh -p gpu --nodes=4 -- base run_dir=runs/base
#   slurm/submit_stages.sh -- tiny                 # without sbatch options
#
# Prints one line per stage: its name and job id. The recipe is checked first (python -m vlmo_ds.config), so a bad
# value stops here with one line and nothing is queued. Each stage job starts from the previous stage's final
# weights (RUN_DIR/stages/NAME/). A job that stops early requeues itself under the same id, so the next stage keeps
# waiting for it (afterok); a stage that fails cancels the jobs after it (--kill-on-invalid-dep). Submitting the
# same chain again is safe: the job of a finished stage ends at once without training.
# Environment: VLMO_PYTHON (default python3) and VLMO_ROOT (default: this checkout) as in slurm/launch.sh.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export VLMO_ROOT=${VLMO_ROOT:-$(dirname "$here")}   # the jobs find the checkout wherever this is run from
python=${VLMO_PYTHON:-python3}

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    sed -n '2,/^set -euo/{/^set -euo/d; s/^# \{0,1\}//; p}' "${BASH_SOURCE[0]}"
    exit 0
fi

sbatch_options=()
if [[ " $* " == *" -- "* ]]; then
    while [[ "$1" != "--" ]]; do
        sbatch_options+=("$1")
        shift
    done
    shift
fi
if [[ $# -eq 0 ]]; then
    echo "usage: slurm/submit_stages.sh [SBATCH_OPTION ...] -- RECIPE [key=value ...]" >&2
    exit 2
fi

# The stage names, in order, from the checked recipe ("# stage 0 NAME (kind): ..." lines).
stages=$(cd "$VLMO_ROOT" && "$python" -m vlmo_ds.config "$@" | sed -n 's/^# stage [0-9]* \([^ ]*\) .*/\1/p')
if [[ -z "$stages" ]]; then
    echo "slurm/submit_stages.sh: the recipe lists no stages" >&2
    exit 2
fi

previous=""
for stage in $stages; do
    after=()
    if [[ -n "$previous" ]]; then
        after=(--dependency="afterok:$previous" --kill-on-invalid-dep=yes)
    fi
    job=$(sbatch --parsable --job-name="vlmo-$stage" "${after[@]}" "${sbatch_options[@]}" \
          "$here/pretrain.sbatch" "$@" --stage "$stage")
    previous=${job%%;*}   # --parsable prints ID or ID;CLUSTER
    echo "$stage $previous"
done
