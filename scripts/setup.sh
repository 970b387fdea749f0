#!/usr/bin/env bash
# Create .venv (once) and install specee-compile with its extras. Idempotent: a second run is quick.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.specee-setup-$(sha256sum pyproject.toml | cut -c1-16)-${SPECEE_EXTRAS:-onnx,dev,trt}
if [ ! -f "$stamp" ]; then
  python -m pip install -q --upgrade pip
  # torch 2.13.0 is the CPU wheel this environment keeps on disk; elsewhere pip fetches it.
  python -m pip install -q "torch==2.13.0" || python -m pip install -q "torch>=2.9,<2.15"
  python -m pip install -q -e ".[${SPECEE_EXTRAS:-onnx,dev,trt}]"
  rm -f .venv/.specee-setup-*
  touch "$stamp"
fi
