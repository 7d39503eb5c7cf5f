#!/usr/bin/env bash
# Shared body of the SLURM recipes (slurm/train_swinb.sh, slurm/train_swinl.sh): they hold only the
# #SBATCH defaults and a default config, then exec this file inside the batch job.
#
# What it does, in the batch shell on the allocation's first node:
#   1. starts launch/train.py on every node, either one `srun` task per GPU (MTLORA_LAUNCHER=srun,
#      the default) or one DeepSpeed launcher per node started by srun (MTLORA_LAUNCHER=deepspeed);
#   2. on USR1 (`--signal=B:USR1@grace` before the time limit, `scancel --signal=USR1 --batch`) or
#      TERM forwards USR1 to the training step: the trainer finishes its step, writes a checkpoint
#      and exits with status 3;
#   3. on status 3 requeues the job (`scontrol requeue`), up to MTLORA_MAX_RESTARTS times and only
#      while Slurm still counts it as running (not after scancel); the requeued job runs this script
#      again and the trainer resumes from the newest complete checkpoint in the run directory (local
#      or s3://). Any other status ends the job with that status, never requeued.
#
# Settings (environment; sbatch exports the submitting shell's environment by default):
#   MTLORA_CONFIG        YAML config (relative to the submit folder or the checkout); set by the recipe
#   MTLORA_RUN_DIR       run directory (local path or s3://...); default: the config's run_dir
#   MTLORA_OVERRIDES     extra key=value overrides, space separated (arguments after the script too)
#   MTLORA_LAUNCHER      srun | deepspeed                                         (default: srun)
#   MTLORA_MAX_RESTARTS  requeues allowed after preemption                        (default: 20)
#   MTLORA_PYTHON        interpreter; else MTLORA_VENV/bin/python, else <checkout>/.venv/bin/python,
#                        else python3 on PATH
#   MTLORA_PROCS_PER_NODE  deepspeed mode: ranks per node (default: GPUs on the node, else
#                        --ntasks-per-node, else 1)
#   MTLORA_SRUN_ARGS     extra srun arguments, space separated (e.g. "--cpu-bind=none")
#   MTLORA_SRUN_WAIT     seconds srun lets the other tasks run once one has ended (default: 600)
#   MASTER_ADDR/MASTER_PORT  rendezvous; default: first host of the allocation and a free port on it
set -euo pipefail

log() { echo "[mtlora-slurm $(date +%H:%M:%S)] $*"; }
die() { echo "[mtlora-slurm] error: $*" >&2; exit 2; }

[[ -n ${SLURM_JOB_ID:-} ]] || die "run this through sbatch (e.g. 'sbatch slurm/train_swinb.sh'), not directly"
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# ---------------------------------------------------------------------------------------- settings
source "$REPO/slurm/find_python.sh"
PYTHON=$(mtlora_python "$REPO")
command -v "$PYTHON" >/dev/null || die "python interpreter '$PYTHON' not found (set MTLORA_PYTHON or MTLORA_VENV)"

CONFIG=${MTLORA_CONFIG:?MTLORA_CONFIG is not set (the recipe scripts set it)}
# a relative config is looked up in the submit folder (the job's working directory), then the checkout
if [[ $CONFIG != /* && ! -f $CONFIG && -f $REPO/$CONFIG ]]; then
    CONFIG=$REPO/$CONFIG
fi
[[ -f $CONFIG ]] || die "config '$CONFIG' not found (MTLORA_CONFIG; relative paths are tried in $PWD and $REPO)"

LAUNCHER=${MTLORA_LAUNCHER:-srun}
[[ $LAUNCHER == srun || $LAUNCHER == deepspeed ]] || die "MTLORA_LAUNCHER must be 'srun' or 'deepspeed', not '$LAUNCHER'"
MAX_RESTARTS=${MTLORA_MAX_RESTARTS:-20}
[[ $MAX_RESTARTS =~ ^[0-9]+$ ]] || die "MTLORA_MAX_RESTARTS must be a whole number, not '$MAX_RESTARTS'"
RESTARTS=${SLURM_RESTART_COUNT:-0}

# `read -a` splits on whitespace without glob expansion, so overrides like model.img_size=[64,64] survive
read -r -a OVERRIDES <<<"${MTLORA_OVERRIDES:-}"
if [[ -n ${MTLORA_RUN_DIR:-} ]]; then OVERRIDES+=("run_dir=$MTLORA_RUN_DIR"); fi
OVERRIDES+=("$@")
read -r -a SRUN_ARGS <<<"${MTLORA_SRUN_ARGS:-}"
# When one task ends, srun stops the rest after --wait seconds: a rank that crashed must not leave the
# others blocked in a collective until the time limit. Not --kill-on-bad-exit: ranks that stop with
# status 3 after a checkpoint end within seconds of each other, and it would kill the slower ones.
SRUN_COMMON=(--wait="${MTLORA_SRUN_WAIT:-600}" "${SRUN_ARGS[@]}")

# ------------------------------------------------------------------------------------- rendezvous
# The batch script runs on the allocation's first node, so that node hosts rank 0's TCP store:
# a port that is free here now (the trainer's fallback, 29500 + job id, can clash between jobs
# sharing a node).
NODES=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
export MASTER_ADDR=${MASTER_ADDR:-$(head -n 1 <<<"$NODES")}
export MASTER_PORT=${MASTER_PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')}

# Defaults that only matter on GPUs (NCCL); site settings such as NCCL_SOCKET_IFNAME or NCCL_IB_HCA
# come from the environment (see docs/slurm.md). Async error handling turns a rank that died or hung
# into an error on the others instead of a job that sits in a collective until the time limit.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export NCCL_ASYNC_ERROR_HANDLING=${NCCL_ASYNC_ERROR_HANDLING:-$TORCH_NCCL_ASYNC_ERROR_HANDLING}  # torch < 2.2
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
# Since Slurm 22.05 srun no longer inherits the job's --cpus-per-task: without this every rank
# would get one CPU for itself and its data-loading workers
if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then
    export SRUN_CPUS_PER_TASK=${SRUN_CPUS_PER_TASK:-$SLURM_CPUS_PER_TASK}
fi
export PYTHONUNBUFFERED=1  # log lines reach the job's output file as they happen

TRAIN=("$REPO/launch/train.py" --config "$CONFIG" "${OVERRIDES[@]}")

# -------------------------------------------------------------------------------------- the step
start_step() {
    if [[ $LAUNCHER == srun ]]; then
        # one task per GPU; the trainer reads SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID
        srun "${SRUN_COMMON[@]}" "$PYTHON" "${TRAIN[@]}" &
    else
        # one DeepSpeed launcher per node (slurm/deepspeed_node.sh: --no_ssh with this node's rank),
        # each with `slots` ranks; the step gets the node's CPUs for them
        local slots=${MTLORA_PROCS_PER_NODE:-${SLURM_GPUS_ON_NODE:-${SLURM_NTASKS_PER_NODE:-1}}}
        srun --ntasks="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 --cpus-per-task="${SLURM_CPUS_ON_NODE:-1}" \
            "${SRUN_COMMON[@]}" \
            bash "$REPO/slurm/deepspeed_node.sh" "$slots" "$PYTHON" "${TRAIN[@]}" &
    fi
    STEP_PID=$!
}

# --signal=B:USR1 reaches this shell only (the B: in it); a preempting or time-limit TERM may reach
# it first. Either way: pass USR1 to the step once, then keep waiting for its exit status.
STOP_SENT=
on_stop_signal() {
    log "received $1: asking the trainer to checkpoint and stop"
    if [[ -z $STOP_SENT && -n ${STEP_PID:-} ]] && kill -0 "$STEP_PID" 2>/dev/null; then
        STOP_SENT=1
        kill -USR1 "$STEP_PID" 2>/dev/null || true  # srun forwards it to every process of the step
    fi
}
trap 'on_stop_signal USR1' USR1
trap 'on_stop_signal TERM' TERM

log "job $SLURM_JOB_ID on ${SLURM_JOB_NUM_NODES:-1} node(s) [$(tr '\n' ' ' <<<"$NODES")] | restart count $RESTARTS" \
    "| launcher $LAUNCHER | master $MASTER_ADDR:$MASTER_PORT"
log "python $PYTHON | config $CONFIG | overrides: ${OVERRIDES[*]:-none}"

start_step
# `wait` returns early (status > 128) whenever a trapped signal arrives: wait again until srun is gone
while :; do
    set +e
    wait "$STEP_PID"
    STATUS=$?
    set -e
    kill -0 "$STEP_PID" 2>/dev/null || break
done
trap - USR1 TERM

# Killed by the very USR1 passed on above: the ranks were still starting up (the trainer installs its
# handler once its engine is built), so there was nothing new to save and the newest checkpoint
# stands. That is a stop request as much as status 3 is, not an error.
if [[ -n $STOP_SENT && $STATUS == $((128 + $(kill -l USR1))) ]]; then
    log "the stop request reached the ranks before they were ready for it (status $STATUS): they had nothing new to save"
    STATUS=3
fi

case $STATUS in
    0)
        log "training finished (status 0)"
        ;;
    3)
        if ((RESTARTS >= MAX_RESTARTS)); then
            log "stopped on request (status 3), but this job was already requeued $RESTARTS times" \
                "(MTLORA_MAX_RESTARTS=$MAX_RESTARTS): not requeuing; resubmit to continue"
            exit 3
        fi
        # Requeue only a job Slurm still counts as running, i.e. one stopped by our USR1 request. After
        # scancel (TERM: the trainer checkpoints and exits 3 too), a hard time limit or a preemption
        # Slurm is already ending the job (COMPLETING) and decides: `scontrol requeue` would even bring
        # back a job someone cancelled.
        state=$(scontrol show job -o "$SLURM_JOB_ID" | grep -o 'JobState=[A-Z_]*' | cut -d= -f2 || true)
        if [[ $state != RUNNING ]]; then
            log "stopped with a checkpoint, but Slurm is ending the job (state ${state:-unknown}: cancelled," \
                "out of time or preempted): not requeuing; resubmit to continue"
            exit 3
        fi
        log "stopped on request (status 3): requeuing job $SLURM_JOB_ID (restart $((RESTARTS + 1)) of at most $MAX_RESTARTS)"
        scontrol requeue "$SLURM_JOB_ID" || { log "scontrol requeue failed: resubmit to continue"; exit 3; }
        ;;
    *)
        # 2: configuration error; 128+N: a rank was killed by signal N; anything else: an error above
        log "training failed with status $STATUS: not requeuing (see the errors above)"
        exit "$STATUS"
        ;;
esac
