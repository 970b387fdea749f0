"""SmolLM2 exported in float16 vs float32 on ONNX Runtime (CPU): token agreement and decode speed,
dense and paper mode, on the first MT-Bench turns (issue export-scale).

    specee-compile export smollm2-135m -o exported/smollm2-135m
    specee-compile export smollm2-135m --dtype float16 -o /tmp/e16
    python benchmarks/fp16_agreement.py OUT.json   # expects the two directories above
"""
import json, sys
from specee_compile.api import generate_from_artifact
from specee_compile.config import Settings
from specee_compile.data import mtbench_first_turns
prompts = mtbench_first_turns()[:8]
rows = []
for mode in ("dense", "paper"):
    s = Settings(backend="onnx", max_new_tokens=48, specee=(mode == "paper"))
    for i, p in enumerate(prompts):
        r32, _ = generate_from_artifact("exported/smollm2-135m", p, s)
        r16, _ = generate_from_artifact("/tmp/e16", p, s)
        a, b = r32.token_ids, r16.token_ids
        n = min(len(a), len(b))
        first = next((j for j in range(n) if a[j] != b[j]), n)
        rows.append({"mode": mode, "prompt": i, "agree": sum(x == y for x, y in zip(a, b)) / max(1, n),
                     "first_divergence": first, "tokens": n, "identical": a == b,
                     "tok_s_fp32": r32.decode_steps / r32.decode_s, "tok_s_fp16": r16.decode_steps / r16.decode_s,
                     "layers_fp32": r32.avg_layers, "layers_fp16": r16.avg_layers})
        print(rows[-1], flush=True)
json.dump(rows, open(sys.argv[1], "w"), indent=1)
