# shellcheck shell=bash
# slurm/launch.sh: the launch helper every sbatch script in slurm/ sources. It prepares the environment of a
# vlmo_ds job (checkout, Python, CPU override, master address, NCCL, threads) and runs one srun step of
# `python -m MODULE ARGS` (one task per GPU), forwarding Slurm's time-limit warning to the training processes.
#
#   source "${VLMO_ROOT:-$SLURM_SUBMIT_DIR}/slurm/launch.sh"
#   vlmo_srun vlmo_ds.train RECIPE [key=value ...] [--stage NAME]
#
# Time limits and preemption (vlmo_ds/train/preemption.py):
#   `#SBATCH --signal=B:USR1@120` makes Slurm send SIGUSR1 to this batch shell about 120 s before the time limit
#   (Slurm looks every 30 s or so: never later, up to a minute earlier); vlmo_srun hands it to srun, which passes
#   it to every task. `scancel -s USR1 JOB` reaches the tasks directly ("checkpoint and requeue now"). On SIGUSR1,
#   or at train.deadline_minutes, all ranks stop after the same step, write a checkpoint, rank 0 runs
#   `scontrol requeue $SLURM_JOB_ID` (VLMO_REQUEUE=1 below), and the job ends with status 75 (EX_TEMPFAIL). The
#   requeued job (same id and command, log appended: --open-mode=append) continues from that checkpoint
#   (train.resume=auto). Rank 0 requeues, not this script: srun --kill-on-bad-exit=1 ends the step at the first
#   task that exits non-zero, so srun itself reports 143 (a task it terminated) as often as 75.
#   SIGTERM (scancel, a time limit reached without warning, preemption) also leaves a checkpoint when the ranks
#   reach a step boundary within KillWait, but never requeues: a cancelled job must stay cancelled.
#
# Environment, all optional (sbatch passes the submitting shell's environment to the job):
#   VLMO_ROOT       the vlmo_ds checkout (default: the folder sbatch ran in, $SLURM_SUBMIT_DIR)
#   VLMO_PYTHON     the Python interpreter (default: python3 on PATH, e.g. of the activated virtual environment)
#   VLMO_CPU=1      CPU override: every task a CPU process (gloo, DS_ACCELERATOR=cpu, no GPU visible); submit
#                   with --gpus-per-node=0 and the task counts you want, e.g. --ntasks-per-node=2 --cpus-per-task=1
#   VLMO_REQUEUE    1 (default): the job requeues itself after SIGUSR1 or the deadline; 0: it ends with status 75
#   VLMO_SRUN_ARGS  more srun options, split at spaces (e.g. "--mpi=pmix" for a library that needs PMIx)
#   MASTER_ADDR     host of rank 0 (default: the first host of the job's node list; set it to pick an interface,
#                   e.g. the InfiniBand name); MASTER_PORT defaults to one vlmo_ds derives from the job id

vlmo_env() {
    VLMO_ROOT=${VLMO_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
    if [[ ! -f "$VLMO_ROOT/vlmo_ds/train/__main__.py" ]]; then
        echo "slurm/launch.sh: no vlmo_ds checkout at $VLMO_ROOT; submit from the checkout or set VLMO_ROOT" >&2
        return 2
    fi
    cd "$VLMO_ROOT" || return 2
    VLMO_PYTHON=${VLMO_PYTHON:-python3}
    export VLMO_ROOT VLMO_PYTHON
    export PYTHONUNBUFFERED=1      # log lines reach the job's output file as they are written
    export VLMO_REQUEUE=${VLMO_REQUEUE:-1}
    # srun no longer inherits sbatch's --cpus-per-task (Slurm 22.05+): pass it on, and size the thread pools to it
    if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then
        export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK
    fi
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
    if [[ -z "${MASTER_ADDR:-}" && -n "${SLURM_JOB_NODELIST:-}" ]]; then
        MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
        export MASTER_ADDR
    fi
    if [[ "${VLMO_CPU:-0}" == 1 ]]; then
        export DS_ACCELERATOR=cpu CUDA_VISIBLE_DEVICES=""   # gloo on CPU processes, even on a GPU node
    else
        # A failed or stuck collective ends the process (and, with --kill-on-bad-exit, the step) instead of
        # hanging until the job's time limit. Site-specific NCCL settings (NCCL_SOCKET_IFNAME, NCCL_IB_HCA, ...)
        # belong in the submitting environment.
        export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
        export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
    fi
}

# vlmo_srun MODULE [ARG ...]: one srun step of `$VLMO_PYTHON -m MODULE ARG ...` over all tasks of the job; returns
# its exit status (75: stopped early with a checkpoint).
vlmo_srun() {
    vlmo_env || return $?
    local module=$1
    shift
    echo "vlmo_ds: job ${SLURM_JOB_ID:-?} restart ${SLURM_RESTART_COUNT:-0} | ${SLURM_JOB_NUM_NODES:-1} node(s)" \
         "${SLURM_JOB_NODELIST:-} | ${SLURM_NTASKS:-1} task(s) | master ${MASTER_ADDR:-?}" \
         "| $([[ "${VLMO_CPU:-0}" == 1 ]] && echo CPU || echo GPU) | $(date '+%F %T')"
    # shellcheck disable=SC2086  # VLMO_SRUN_ARGS is a list of options
    srun --kill-on-bad-exit=1 ${VLMO_SRUN_ARGS:-} "$VLMO_PYTHON" -m "$module" "$@" &
    local step=$!
    # SIGUSR1 for this shell (--signal=B:USR1@T): pass it to srun, which signals every task of the step.
    # shellcheck disable=SC2064  # the step's pid is fixed now
    trap "echo 'vlmo_ds: SIGUSR1 for the batch shell: passed to the training processes'; kill -USR1 $step" USR1
    # A trapped signal interrupts `wait` (status > 128) while srun runs on: wait again until srun has ended.
    while kill -0 "$step" 2>/dev/null; do
        wait "$step" || true
    done
    local status=0
    wait "$step" || status=$?
    trap - USR1
    echo "vlmo_ds: srun ended with status $status | $(date '+%F %T')"
    return "$status"
}
