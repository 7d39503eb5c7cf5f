#!/usr/bin/env bash
# MTLoRA on Swin-L (configs/pascal_swin_l.yaml): 2 nodes x 8 GPUs, one srun task per GPU, requeued
# from its newest checkpoint when preempted or out of time. Submit from the checkout:
#     sbatch slurm/train_swinl.sh [key=value ...]
# sbatch flags override the defaults below (e.g. sbatch --nodes=4 --time=4:00:00 ...); the MTLORA_*
# variables are described in slurm/launch.sh and docs/slurm.md.
#SBATCH --job-name=mtlora-swinl
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@600
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail
if [[ -z ${SLURM_JOB_ID:-} ]]; then
    echo "error: run this through sbatch, not directly: sbatch $0 [key=value ...] (docs/slurm.md)" >&2
    exit 2
fi
export MTLORA_CONFIG=${MTLORA_CONFIG:-configs/pascal_swin_l.yaml}

# sbatch runs a copy of this file from slurmd's spool folder: launch.sh lies beside the submitted
# file (its path is the first word of the job's Command), else in $MTLORA_HOME or the submit folder
command=$(scontrol show job "$SLURM_JOB_ID" | sed -n 's/^ *Command=//p')
here=$(dirname "${command%% *}")
[[ -f $here/launch.sh ]] || here=${MTLORA_HOME:-$SLURM_SUBMIT_DIR}/slurm
exec bash "$here/launch.sh" "$@"
