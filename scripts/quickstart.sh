#!/usr/bin/env bash
# Set up, then run the main job on the embedded default model (SmolLM2-135M-Instruct, no hub needed).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
specee-compile generate smollm2-135m "What is the capital of France?" --max-new-tokens 64 \
  --specee --mode lossless --kv backfill --stats-json exported/quickstart-stats.json
