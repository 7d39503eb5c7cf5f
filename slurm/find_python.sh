# Sourced by the scripts in slurm/: which interpreter runs the job. MTLORA_PYTHON, else MTLORA_VENV's,
# else the checkout's .venv, else python3 on the PATH.
mtlora_python() {
    local repo=$1
    if [[ -n ${MTLORA_PYTHON:-} ]]; then
        echo "$MTLORA_PYTHON"
    elif [[ -n ${MTLORA_VENV:-} ]]; then
        echo "$MTLORA_VENV/bin/python"
    elif [[ -x $repo/.venv/bin/python ]]; then
        echo "$repo/.venv/bin/python"
    else
        echo python3
    fi
}
