#!/usr/bin/env bash
# Wheels of the Python packages that the bare GPU machine lacks, at the versions pinned in
# benchmarks/gpu_wheels.txt (never "whatever a local venv holds"), into .whl/ (git-ignored), for
# benchmarks/gpu_session.sh to install there offline.
#
#   bash benchmarks/build_wheels.sh [OUT_DIR]   # default .whl; needs the package index: run it here, not there
#   PYTHON=/path/to/python3 bash benchmarks/build_wheels.sh   # any Python 3 with pip (default: python3)
#
# The GPU machine (Python 3.12, torch, timm, numpy, scipy, matplotlib, pillow, tqdm, fsspec, PyYAML,
# safetensors, msgpack, ninja, psutil, py-cpuinfo, einops already there) lacks DeepSpeed with its
# pydantic stack, Hydra/OmegaConf, webdataset, torchjd with its QP solvers quadprog/qpsolvers (loss
# balancing), submitit with cloudpickle (sweeps) and the fast decoders simplejpeg/pyspng (without them the
# loader decodes with PIL, slower: the loader step would not measure what users get). timm is carried
# as a fallback (.whl/fallback/), installed there only when the machine's timm lacks what the model uses.
# Left out on purpose, to keep the folder small: s3fs/aiobotocore/botocore (the session reads local
# shards) and wandb (the session disables it).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-.whl}
PY=${PYTHON:-python3}
PINS=benchmarks/gpu_wheels.txt
TARGET_PYTHON=3.12

command -v "$PY" > /dev/null || { echo "build_wheels.sh: no Python at '$PY'; set PYTHON=/path/to/python3" >&2; exit 2; }
"$PY" -m pip --version > /dev/null 2>&1 || { echo "build_wheels.sh: '$PY' has no pip; set PYTHON to a Python with pip" >&2; exit 2; }

pins() {  # the pins tagged $1 ("" for untagged)
    awk -v tag="${1:-}" '!/^#/ && NF { if ((($2 == "#") ? $3 : "") == tag) print $1 }' "$PINS"
}
BINARY=($(pins)); SDISTS=($(pins sdist)); FALLBACK=($(pins fallback))
download() {  # py3-none-any wheels, and compiled ones for CPython 3.12 on manylinux x86-64
    "$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
        --python-version "$TARGET_PYTHON" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$@"
}

mkdir -p "$OUT/fallback"
rm -f "$OUT"/*.whl "$OUT"/fallback/*.whl  # one version of each: two of one package stop the install there
download "$OUT" "${BINARY[@]}"
download "$OUT/fallback" "${FALLBACK[@]}"
# published as source only: built into pure-Python wheels (DeepSpeed without its C++/CUDA ops, which it
# compiles on first use; the project's optimizer is torch's AdamW and needs none)
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --disable-pip-version-check --no-deps -w "$OUT" "${SDISTS[@]}"
ls -l "$OUT" "$OUT/fallback"
du -sh "$OUT"
