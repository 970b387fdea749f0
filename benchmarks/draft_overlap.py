"""Does the draft step hide behind the next step's first layers? ([engine], CUDA; --device cpu checks the setup).

    PYTHONPATH=. python benchmarks/draft_overlap.py [--layers 16] [--S 128] [--json F]

The SpecEE step ends with the EAGLE draft's step, which makes the next step's candidates (~215 us of the
~417 us of exit machinery per token at 7B shapes on the H200; `product_specee232_ratio` needs that machinery
under ~170 us, RESULTS.md). The candidates are first read at the next step's first exit point, so the draft
could run on a second stream beside the layers before it: a fork and a join inside the captured step. Both
sides are memory-bound, so what the overlap saves is a measurement, taken here before the step is changed.

On 7B shapes (random fp16 weights, K layers, the product's compiled layer `layer_direct` and its compiled
device draft step `DeviceEagleSource.device_step`), each captured as a CUDA graph and replayed:
    layers  the first K layers of a step;      draft   one draft step
    serial  the layers, then the draft (the work of today's step boundary, in its order)
    forked  the draft on a second stream beside the layers, joined before the end
It prints us per replay, the saving (serial - forked) against the draft's own time, and checks that the forked
graph computes what the serial one does (the layers' output and the draft's candidates).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    from specee_compile.eval.gpu_bench import DRAFT_ROWS, LLAMA2_7B, TINY

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=16, help="K: the layers before the first exit point")
    ap.add_argument("--S", type=int, default=128, help="the attended length (an attention bucket)")
    ap.add_argument("--device", default="cuda", help="cpu: run the parts once, eagerly (a check of the setup)")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("draft_overlap.py: no CUDA device (--device cpu checks the setup only)")
    shape = dict(LLAMA2_7B if dev.type == "cuda" else TINY, num_hidden_layers=a.layers)
    dt = torch.float16 if dev.type == "cuda" else torch.float32
    seg, src, prompt = build(shape, dt, dev, min(DRAFT_ROWS, shape["vocab_size"]), a.S)
    S, D = a.S, shape["hidden_size"]
    pos = torch.tensor([len(prompt)], device=dev)
    h0 = seg.embed(torch.tensor([prompt[-1]], device=dev)).view(1, 1, D)
    tok = torch.tensor([prompt[-1]], device=dev)
    feat = torch.randn(D, device=dev).to(dt)
    dpos = pos - 1
    out = torch.empty_like(h0)

    def layers():
        h = h0
        for i in range(a.layers):
            h = seg.layer_direct(i, h, pos, S)
        out.copy_(h)

    def draft():
        src.device_step(tok, feat, dpos, S)

    def serial():
        layers()
        draft()

    if dev.type != "cuda":  # the parts run (compiles, shapes, buffers); streams and graphs are CUDA's
        serial()
        print(f"cpu check: {a.layers} layers and one draft step ran; candidates {src.next_cands.tolist()}")
        return 0
    side = torch.cuda.Stream()

    def forked():
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            draft()
        layers()
        torch.cuda.current_stream().wait_stream(side)

    from specee_compile.backends.cuda_step import replay_time

    graphs, got = {}, {}
    for name, fn in (("layers", layers), ("draft", draft), ("serial", serial), ("forked", forked)):
        fn()  # warm-up: compiles, autotunes, allocates outside the capture
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        g.replay()
        torch.cuda.synchronize()
        graphs[name] = g
        got[name] = (out.clone(), src.next_cands.clone())
    same = all(torch.equal(got["forked"][j], got["serial"][j]) for j in (0, 1))
    us = {n: replay_time(g.replay, 50) * 1e6 for n, g in graphs.items()}
    rec = {"card": torch.cuda.get_device_name(), "layers": a.layers, "S": S, "us": {k: round(v, 1) for k, v in us.items()},
           "saved_us": round(us["serial"] - us["forked"], 1), "forked_equals_serial": same}
    print(f"{rec['card']}, 7B shapes fp16, K = {a.layers} layers, S = {S}, us per replay\n\n"
          "| layers | draft | serial | forked | saved (serial - forked) | of the draft | forked = serial |\n"
          "|---|---|---|---|---|---|---|\n"
          f"| {us['layers']:.1f} | {us['draft']:.1f} | {us['serial']:.1f} | {us['forked']:.1f} | "
          f"{rec['saved_us']:.1f} | {100 * rec['saved_us'] / us['draft']:.0f}% | {same} |")
    if a.json:
        Path(a.json).write_text(json.dumps(rec, indent=1) + "\n")
    return 0 if same else 1


def build(shape: dict, dt, dev, draft_rows: int, S: int):
    """The product's segments of a random model and its device draft, reset on a random prompt."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from specee_compile.backends import make_segments
    from specee_compile.config import Settings
    from specee_compile.draft.eagle import DeviceEagleSource, EagleDraft

    torch.manual_seed(0)
    cfg = LlamaConfig(**shape, initializer_range=0.02, tie_word_embeddings=False, pad_token_id=0)
    with torch.device(dev):
        model = LlamaForCausalLM._from_config(cfg, dtype=dt).eval().requires_grad_(False)
    settings = Settings(device=str(dev), backend="inductor", dtype=str(dt).replace("torch.", ""), max_context=2 * S)
    seg = make_segments(model, settings)
    draft = EagleDraft(model, vocab_ids=torch.arange(draft_rows))
    for p in draft.parameters():  # std 0.02 like the base model (as gpu_bench's random draft)
        torch.nn.init.normal_(p, std=0.02)
    draft.to(device=dev, dtype=dt).requires_grad_(False)
    src = DeviceEagleSource(draft, k=4, max_len=seg.max_len, compile=dev.type == "cuda")
    prompt = torch.randint(0, shape["vocab_size"], (S - 8,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():
        _, hn = seg.prefill(prompt)
    src.reset(prompt, hn)
    return seg, src, prompt


if __name__ == "__main__":
    with torch.no_grad():
        sys.exit(main())
