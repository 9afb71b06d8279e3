#!/usr/bin/env bash
# The one prepared GPU check (issue 21); everything is in benchmarks/device_check.py, whose
# header says how to prepare what travels. On the GPU machine, from the repository root:
#   bash benchmarks/device_check.sh --out "$OUT"
# Here and in CI (the same script end to end, CI-sized):
#   bash benchmarks/device_check.sh --cpu --quick --out /tmp/device_check
set -euo pipefail
cd "$(dirname "$0")/.."
# $PYTHON, else this checkout's .venv, else python3 (the GPU machine's, which holds torch)
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
# Carried wheels (.whl/, see the header) for what the GPU machine lacks: installed aside.
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1 && ! "$PYTHON" -c "import webdataset, pydantic" 2>/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 WANDB_MODE=disabled
exec "$PYTHON" -m benchmarks.device_check "$@"
