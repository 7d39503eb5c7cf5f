#!/usr/bin/env bash
# Wheels of the Python packages that the bare GPU machine lacks, at exactly the versions installed in
# the local venv, into .whl/ (git-ignored), for benchmarks/gpu_session.py to install there offline.
#
#   bash benchmarks/build_wheels.sh [OUT_DIR]        # default .whl; needs PyPI, run it here, not there
#
# The GPU machine (Python 3.12, torch, timm, numpy, scipy, matplotlib, pillow, tqdm, fsspec, PyYAML,
# safetensors, msgpack, ninja, psutil, py-cpuinfo, einops already there) lacks DeepSpeed with its
# pydantic stack, Hydra/OmegaConf, webdataset and the fast decoders simplejpeg/pyspng (without them the
# loader decodes with PIL, slower: the loader step would not measure what users get). Left out on purpose, to keep the folder small:
# s3fs/aiobotocore/botocore (the session reads local shards) and wandb (the session disables it).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-.whl}
PY=${PYTHON:-.venv/bin/python}
TARGET_PYTHON=3.12

# py3-none-any wheels, and compiled ones fetched for CPython 3.12 on manylinux x86-64
WHEELS=(hjson pydantic pydantic-core annotated-types typing-inspection typing-extensions
        hydra-core omegaconf webdataset braceexpand simplejpeg pyspng)
# published as source only: built here into pure-Python wheels (DeepSpeed without its C++/CUDA ops,
# which it compiles on first use; the project's optimizer is torch's AdamW and needs none)
SDISTS=(deepspeed antlr4-python3-runtime)

version() { "$PY" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$1"; }
pin() { local name; for name in "$@"; do echo "$name==$(version "$name")"; done; }

mkdir -p "$OUT"
rm -f "$OUT"/*.whl  # one version of each: two of one package stop the install there
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$TARGET_PYTHON" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$OUT" $(pin "${WHEELS[@]}")
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$OUT" $(pin "${SDISTS[@]}")
ls -l "$OUT"
du -sh "$OUT"
