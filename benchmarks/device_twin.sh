#!/usr/bin/env bash
# The lent GPU machine's Python environment, rebuilt on this CPU machine, running the prepared GPU run's
# CPU smoke mode: whatever would fail there for a missing or mismatched package fails here first.
#
#   bash benchmarks/device_twin.sh [--rebuild] [gpu_session.py arguments ...]
#
# What the twin holds, as the device tool's KINDS.md documents the machine (2026-11):
#   - Python 3.12 (pyenv's; the machine has 3.12.3) in a venv of its own, not this checkout's .venv;
#   - torch 2.11.0 and torchvision 0.26.0 from the package index (CUDA 13 builds, ~5 GB);
#   - of the image's other packages, the ones the project or its carried wheels import (IMAGE below;
#     every name is on the image's list), at the index's current versions;
#   - the carried wheels exactly as the GPU run installs them: benchmarks/build_wheels.sh makes .whl/ at
#     the pins of benchmarks/gpu_wheels.txt (with the twin's own Python: nothing of a local .venv is
#     needed, so it runs from a clean clone), benchmarks/gpu_session.sh installs them with
#     pip --no-index --no-deps --target $SITE and checks timm as it does there.
# Then `SMOKE=1 bash benchmarks/gpu_session.sh --plan all` (or the arguments given): every step of both
# plans runs on the CPU at tiny sizes, the steps that need CUDA say so. The step table lands in $OUT
# (default runs/device_twin)/summary.md.
# Needs the package index (to build the twin and the wheels) and ~6 GB of disk; about 5 minutes the
# first time, then the twin is reused (--rebuild starts it over).
set -euo pipefail
cd "$(dirname "$0")/.."

TWIN=${TWIN_DIR:-$HOME/.cache/mtlora-dist/twin}
OUT=${OUT:-runs/device_twin}
TORCH=(torch==2.11.0 torchvision==0.26.0)
IMAGE=(timm numpy pillow opencv-python-headless scipy matplotlib tqdm pyyaml safetensors fsspec msgpack ninja
       psutil py-cpuinfo einops packaging filelock huggingface-hub typing-extensions rich)

if [[ ${1:-} == --rebuild ]]; then
    rm -rf "$TWIN"
    shift
fi

python312() {
    local root
    root=$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")
    ls -d "$root"/versions/3.12.*/bin/python3 2>/dev/null | sort -V | tail -n 1
}

if [[ ! -x $TWIN/bin/python3 ]] || ! "$TWIN/bin/python3" -c 'import torch, timm, cv2' 2>/dev/null; then
    PY312=$(python312)
    [[ -n $PY312 ]] || { echo "no Python 3.12 under pyenv: pyenv install 3.12" >&2; exit 1; }
    echo "building the twin in $TWIN with $PY312"
    rm -rf "$TWIN"
    "$PY312" -m venv "$TWIN"
    "$TWIN/bin/pip" install -q --disable-pip-version-check "${TORCH[@]}"
    "$TWIN/bin/pip" install -q --disable-pip-version-check "${IMAGE[@]}"
fi
"$TWIN/bin/python3" -c 'import sys, torch; print(f"twin: Python {sys.version.split()[0]}, torch {torch.__version__}")'

PYTHON="$TWIN/bin/python3" bash benchmarks/build_wheels.sh .whl

SITE=$(mktemp -d "${TMPDIR:-/tmp}/mtlora-twin-site-XXXXXX")
trap 'rm -rf "$SITE"' EXIT
mkdir -p "$OUT"
# the twin's python3 first on PATH, nothing of this checkout's venv on PYTHONPATH: as on the lent machine
(($#)) || set -- --plan all
env -u PYTHONPATH -u VIRTUAL_ENV PATH="$TWIN/bin:/usr/local/bin:/usr/bin:/bin" SITE="$SITE" OUT="$OUT" SMOKE=1 \
    bash benchmarks/gpu_session.sh "$@"
echo "step table: $OUT/summary.md"
cat "$OUT/summary.md"
