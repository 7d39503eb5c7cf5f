#!/usr/bin/env bash
# Convert one split of a dataset into webdataset shards as a SLURM array job: array task i converts part
# i of N (N = the array's size; launch/convert.py reads SLURM_ARRAY_TASK_ID/_MIN/_COUNT), resumably, and
# the last part to finish merges the parts into manifest.json. Submit from the checkout with
# launch/convert.py's arguments:
#     sbatch slurm/convert_array.sh DATASET --root DIR --split train --out s3://bucket/prefix [--shard-size-mb 256]
#     sbatch --array=0-63 slurm/convert_array.sh ...                       # 64 parts instead of 16
# sbatch flags override the defaults below; keep --array a contiguous range. Each task encodes with as many
# processes as CPUs SLURM gave it (--workers). Submitting the same command again after tasks died or ran out
# of time resumes the unfinished parts; finished ones are left as they are (docs/data.md, 'Conversion at scale').
# Interpreter: MTLORA_PYTHON, else MTLORA_VENV/bin/python, else <checkout>/.venv/bin/python, else python3.
#SBATCH --job-name=mtlora-convert
#SBATCH --array=0-15
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=8
#SBATCH --time=4:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%A_%a.out
set -euo pipefail
if [[ -z ${SLURM_JOB_ID:-} ]]; then
    echo "error: run this through sbatch, not directly: sbatch $0 DATASET --root DIR --split SPLIT --out URL" \
        "(docs/data.md, 'Conversion at scale')" >&2
    exit 2
fi

# sbatch runs a copy of this file from slurmd's spool folder: the checkout is the submitted file's
# (its path is the first word of the job's Command), else $MTLORA_HOME or the submit folder
command=$(scontrol show job "$SLURM_JOB_ID" | sed -n 's/^ *Command=//p' | head -n 1)
REPO=$(cd "$(dirname "${command%% *}")/.." 2>/dev/null && pwd || true)
[[ -n $REPO && -f $REPO/launch/convert.py ]] || REPO=${MTLORA_HOME:-$SLURM_SUBMIT_DIR}
[[ -f $REPO/launch/convert.py ]] || { echo "error: no launch/convert.py in $REPO (set MTLORA_HOME to the checkout)" >&2; exit 2; }

source "$REPO/slurm/find_python.sh"
PYTHON=$(mtlora_python "$REPO")

WORKERS=${SLURM_CPUS_PER_TASK:-$(nproc)}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # one process per CPU already: no threads on top
export PYTHONUNBUFFERED=1
echo "[mtlora-convert $(date +%H:%M:%S)] job $SLURM_JOB_ID: array task ${SLURM_ARRAY_TASK_ID:-none}" \
    "(${SLURM_ARRAY_TASK_MIN:-0}..${SLURM_ARRAY_TASK_MAX:-0}) on $(hostname) | $WORKERS worker(s)" \
    "| restart count ${SLURM_RESTART_COUNT:-0} | python $PYTHON"
# --workers first: one given after the script's arguments wins
exec "$PYTHON" "$REPO/launch/convert.py" --workers "$WORKERS" "$@"
