#!/usr/bin/env bash
# The GPU session on the bare, offline device machine: install the carried wheels (.whl/, made here by
# benchmarks/build_wheels.sh) into /tmp/site, then run benchmarks/gpu_session.py with its arguments.
#
#   bash benchmarks/gpu_session.sh [--budget 480] [--only STEP ...] [--smoke]
set -uo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "installing the wheels in .whl/ failed" >&2; exit 1; }
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
exec python3 benchmarks/gpu_session.py "$@"
