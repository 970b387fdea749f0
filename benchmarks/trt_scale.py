"""[export-scale] item 5 helpers: what `export --backend tensorrt` (TensorRT-RTX, CPU-only AOT) costs in
memory at scale, measured without needing the memory (RESULTS.md [export-scale], 2026-12-02).

    python benchmarks/trt_scale.py checkpoint 7b DIR [--tokenizer T]
        a random fp16 Llama checkpoint (export7b.SHAPES) written tensor by tensor: peak memory is one
        tensor (1.4 GB at 7B), where save_pretrained holds the model plus safetensors' bytes copy
    python benchmarks/trt_scale.py build ART/decode_step.onnx ENGINE [--target SM89] [--kill-rss GB]
        one engine built the way backends/tensorrt.py builds it (streamed to ENGINE) in a child process;
        its VmSize / VmRSS / RssAnon / RssFile are sampled every 50 ms (one line a second) and the
        child is killed when VmRSS passes --kill-rss: how far a build that cannot fit gets, safely
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def checkpoint(shape: str, out: Path, tokenizer: str | None) -> dict:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from export7b import SHAPES

    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    cfg = LlamaConfig(**SHAPES[shape], tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    cfg.dtype = "float16"
    cfg.architectures = ["LlamaForCausalLM"]
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in LlamaForCausalLM(cfg).state_dict().items()}
    cfg.save_pretrained(out)
    header, off = {}, 0
    for k, s in shapes.items():
        n = 2 * math.prod(s)
        header[k] = {"dtype": "F16", "shape": list(s), "data_offsets": [off, off + n]}
        off += n
    header["__metadata__"] = {"format": "pt"}
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    g = torch.Generator().manual_seed(0)
    with (out / "model.safetensors").open("wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        for k, s in shapes.items():  # norms 1, the rest N(0, 0.02)
            t = torch.ones(s, dtype=torch.float16) if "norm" in k else (torch.randn(s, generator=g) * 0.02).half()
            f.write(t.numpy().tobytes())
    if tokenizer is None:
        from export7b import vocab_tokenizer

        from specee_compile.models import resolve

        tokenizer = str(vocab_tokenizer(resolve("smollm2-135m"), SHAPES[shape]["vocab_size"], out.parent / "tokenizer"))
    AutoTokenizer.from_pretrained(tokenizer).save_pretrained(out)
    return {"params": sum(math.prod(s) for s in shapes.values()), "bytes": off,
            "wall_s": round(time.perf_counter() - t0, 1),
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}


def _build_child(onnx_path: str, engine: str, target: str) -> None:
    import tensorrt_rtx as trt

    from specee_compile.backends.tensorrt import _build_to_file, _max_len, _parse, _profile

    t0 = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = _parse(trt, builder, logger, Path(onnx_path), "tensorrt_rtx")
    print("PARSED", round(time.perf_counter() - t0, 1), flush=True)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, 4 << 30)
    config.num_compute_capabilities = 1
    config.set_compute_capability(getattr(trt.ComputeCapability, target), 0)
    profile = _profile(trt, builder, network, _max_len(Path(onnx_path)))
    if profile is not None:
        config.add_optimization_profile(profile)
    ok = _build_to_file(trt, builder, network, config, Path(engine))
    print("BUILT", json.dumps({"ok": ok, "build_s": round(time.perf_counter() - t0, 1),
                               "engine_bytes": Path(engine).stat().st_size}), flush=True)


def _status(pid: int) -> dict:
    d = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, v = line.split(":", 1)
            if k in ("VmSize", "VmRSS", "RssAnon", "RssFile"):
                d[k] = round(int(v.split()[0]) / 2**20, 2)
    return d


def build(onnx_path: str, engine: str, target: str, kill_rss: float) -> dict:
    p = subprocess.Popen([sys.executable, __file__, "_child", onnx_path, engine, target])
    t0, last, peak, killed = time.time(), -1, {}, None
    while p.poll() is None:
        try:
            d = _status(p.pid)
        except (OSError, ValueError):
            break
        for k, v in d.items():  # (a zombie's status has no Vm lines)
            peak[k] = max(peak.get(k, 0), v)
        t = time.time() - t0
        if int(t) != last:
            last = int(t)
            print("SAMPLE", json.dumps({"t": round(t, 1), **d}), flush=True)
        if d.get("VmRSS", 0) > kill_rss:
            killed = {"t": round(t, 1), **d}
            os.kill(p.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    p.wait()
    return {"rc": p.returncode, "killed_at": killed, "peak_gb": peak, "wall_s": round(time.time() - t0, 1),
            "engine_bytes": Path(engine).stat().st_size if Path(engine).exists() else None}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_child":
        _build_child(*argv[1:4])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("checkpoint")
    c.add_argument("shape", choices=["7b", "1b", "tiny"])
    c.add_argument("dir")
    c.add_argument("--tokenizer")
    b = sub.add_parser("build")
    b.add_argument("onnx")
    b.add_argument("engine")
    b.add_argument("--target", default="SM89")
    b.add_argument("--kill-rss", type=float, default=15.5, help="GiB of VmRSS at which the build is killed")
    a = ap.parse_args(argv)
    r = checkpoint(a.shape, Path(a.dir), a.tokenizer) if a.cmd == "checkpoint" else \
        build(a.onnx, a.engine, a.target, a.kill_rss)
    print("RESULT " + json.dumps(r), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
