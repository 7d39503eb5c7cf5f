#!/usr/bin/env bash
# The GPU session on the bare, offline device machine: install the carried wheels (.whl/, made here by
# benchmarks/build_wheels.sh) into $SITE (default /tmp/site), then run benchmarks/gpu_session.py with its
# arguments. benchmarks/device_twin.sh runs this same script in a copy of that machine's environment.
#
#   bash benchmarks/gpu_session.sh [--budget 480] [--only STEP ...] [--smoke]
set -uo pipefail
cd "$(dirname "$0")/.."
SITE=${SITE:-/tmp/site}
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
        || { echo "installing the wheels in .whl/ failed" >&2; exit 1; }
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    export PATH="$SITE/bin:$PATH"  # console scripts of the carried packages (deepspeed, ...)
fi
export PYTHONUNBUFFERED=1
exec python3 benchmarks/gpu_session.py "$@"
