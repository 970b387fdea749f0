#!/usr/bin/env bash
# Set up, then run the main job on the embedded default model (SmolLM2-135M-Instruct, no hub needed):
# export the conditional ONNX decode graph + artifacts, then generate from that artifact directory.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
specee-compile export smollm2-135m -o exported/smollm2-135m
specee-compile generate exported/smollm2-135m "What is the capital of France?" --backend onnx --specee \
  --max-new-tokens 64 --stats-json exported/smollm2-135m-stats.json
