#!/usr/bin/env bash
# The GPU session on the bare, offline device machine: install the carried wheels (.whl/, made here by
# benchmarks/build_wheels.sh at the pins of benchmarks/gpu_wheels.txt) into $SITE (default /tmp/site),
# check that the machine's timm runs the model (else install the carried one from .whl/fallback/), then
# run benchmarks/gpu_session.py with its arguments. benchmarks/device_twin.sh runs this same script in a
# copy of that machine's environment.
#
#   bash benchmarks/gpu_session.sh [--budget 330] [--only STEP ...] [--rerun-failed [SESSION_JSONL]] [--smoke]
set -uo pipefail
cd "$(dirname "$0")/.."
SITE=${SITE:-/tmp/site}
install() {
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$@" \
        || { echo "installing $* failed" >&2; exit 1; }
}
if compgen -G ".whl/*.whl" > /dev/null; then
    install .whl/*.whl
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    export PATH="$SITE/bin:$PATH"  # console scripts of the carried packages (deepspeed, ...)
fi
if ! python3 benchmarks/env_report.py --check-timm; then
    if compgen -G ".whl/fallback/timm-*.whl" > /dev/null; then
        echo "installing the carried timm instead"
        install .whl/fallback/timm-*.whl
        [[ :${PYTHONPATH:-}: == *":$SITE:"* ]] || export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
        python3 benchmarks/env_report.py --check-timm  # the environment step reports (and fails on) it
    else
        echo "no carried timm in .whl/fallback/ (bash benchmarks/build_wheels.sh makes it)" >&2
    fi
fi
export PYTHONUNBUFFERED=1
exec python3 benchmarks/gpu_session.py "$@"
