#!/usr/bin/env bash
# MTLORA_LAUNCHER=deepspeed: the one srun task on each node (started by slurm/launch.sh). Runs the
# DeepSpeed launcher for this node's ranks with --no_ssh and this node's rank, so a multi-node job
# needs no ssh/pdsh between nodes; the hostfile is written here, on each node, so it needs no
# shared /tmp.
#     deepspeed_node.sh SLOTS PYTHON launch/train.py ARGS...
set -euo pipefail
slots=$1
python=$2
shift 2

hostfile=$(mktemp "${TMPDIR:-/tmp}/mtlora-hostfile-${SLURM_JOB_ID:-x}.XXXXXX")
trap 'rm -f "$hostfile"' EXIT
scontrol show hostnames "$SLURM_JOB_NODELIST" | sed "s/\$/ slots=$slots/" >"$hostfile"

# Slurm delivers a step's signals to every process of the step. USR1 is the trainer's "checkpoint
# and stop" request (it installs its own handler); the DeepSpeed launcher has none and would die of
# it, so it inherits "ignore" from here and keeps waiting for the ranks' status 3, which it passes
# on. TERM is ignored by this shell for the same reason (the launcher sets its own TERM handler).
trap '' USR1 TERM
set +e
"$python" -u -m deepspeed.launcher.runner --hostfile "$hostfile" --no_ssh --node_rank "$SLURM_NODEID" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" "$@"
status=$?
exit "$status"
