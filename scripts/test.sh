#!/usr/bin/env bash
# Set up, then run the test suite (CPU only; GPU tests skip themselves without CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
# the C++ runner (cpp/, tests/test_cpp.py): built once per source digest into the SPECEE cache (~1 min)
if command -v cmake >/dev/null && command -v g++ >/dev/null; then
  python -c "from specee_compile.backends.cpp_runner import build_runner; print('C++ runner:', build_runner())"
fi
python -m pytest -q -ra "$@"
