"""`specee-compile export MODEL --format aoti`: AOTInductor packages for the C++ runner (`cpp/`).

Why AOTInductor + libtorch: the torch wheel ships libtorch's headers and libraries (and the AOTI package
loader, `torch/csrc/inductor/aoti_package/model_package_loader.h`), so the C++ runner builds on any
machine that has the wheel, CPU or CUDA, with nothing else from a registry. ONNX Runtime's PyPI wheel
ships no C/C++ headers, so a C++ ONNX Runtime runner cannot be built from registry packages alone.

What lands in the artifact directory (exported/README.md, "C++ runner (AOTInductor)"):
    layer.pt2        model_step's layer function, weights as inputs: one package serves every layer.
                     (h [1,q,D], pos [q], keys [S], valid [T], cos, sin [max_len,hd], k_cache,
                     v_cache [Hkv,T,hd], ln1, wqkv, (bqkv), wo, ln2, wgu, wd) -> h [1,q,D];
                     writes K/V of its rows into the cache views and marks them valid (the KV
                     contract of `model_step`); `keys` only carries the attended length S.
    layer1.pt2       the same for one row (the decode step); the runner uses it for q = 1. On CUDA with the
                     Python CUDA step's fused Triton kernels embedded (`specee_aoti::fused_linear` /
                     `decode_attention` / `rope_append`, triton_op twins of the Python custom ops, which a
                     package cannot call); on a CPU its static one row lets `plugins/inductor_cpu_gemv.py`
                     turn the matmuls into Inductor's parallel vectorized reductions (the dynamic package
                     calls a BLAS that runs a one-row product on one thread).
                     With the fused attention (`layer1_attn_counters`) two inputs follow v_cache, the
                     attention kernel's state: its per-head arrival counters (int32 [H], zero between
                     calls) and its split workspace (fp32 [`layer1_attn_workspace`], any contents)
    head.pt2         (h [1,q,D], sel [n], norm_w, head_w) -> (hn [1,q,D], logits [1,n,V]):
                     final norm of every row, full LM head of the rows `sel`
    head1.pt2        the same for one row, static shapes: (h [1,1,D], norm_w, head_w) -> (hn, logits) (a CPU
                     export's matmul a reduction, as in layer1.pt2)
    exit_score.pt2   (h [1,1,D], norm_w, rows [k,D], p_prev [k], w1, b1, w2, b2) -> (score [1],
                     z [k], p [k], hn [D]): `specee::exit_score`'s reference + the normed state
    draft.pt2        EAGLE draft step (feats [T,D], next_ids [T], positions [T], past_k, past_v
                     [n,Hkv,C,hd], cos, sin, embed_w, head_rows [nv,D], draft weights...) ->
                     (g [D], k_rows, v_rows [n,Hkv,T,hd], logits [nv]) for the last new position
    weights.safetensors  model, predictor and draft weights, RoPE tables, draft vocab ids
    manifest.json    everything the runner needs (`info.cpp`), every file with sha256 and size

The cache holds T = max_len + 1 positions (torch.export proves a slice `[:S]` with S <= T - 1).
Embedding and LM-head row gathers are index_select calls in the runner (no package).
"""

from __future__ import annotations

import contextlib
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import Settings, torch_dtype
from ..errors import SpecEEError
from ..model_step import extract_weights, make_head_fn, make_layer_fn, rms_norm
from ..plugins import pdl

AOTI_FORMAT = "specee-aoti"
AOTI_VERSION = 1
LAYER_KEYS = ("ln1", "wqkv", "bqkv", "wo", "ln2", "wgu", "wd")
PACKAGES = ("layer", "head", "exit_score", "draft")


# ------------------------------------------------------------------------------------ functions
class LayerFn(torch.nn.Module):
    def __init__(self, spec, has_bias: bool, fused: tuple[str, ...] = (), ops: str = "specee"):
        super().__init__()
        self.fn = make_layer_fn(spec, fused=fused, ops=ops)
        self.has_bias = has_bias

    def forward(self, h, pos, keys, valid, cos, sin, k_cache, v_cache, *w):
        return self._run(h, pos, keys, valid, cos, sin, k_cache, v_cache, w)

    def _run(self, h, pos, keys, valid, cos, sin, k_cache, v_cache, w, attn_state=()):
        ln1, wqkv, *rest = w
        bqkv = rest.pop(0) if self.has_bias else None
        wo, ln2, wgu, wd = rest
        return self.fn(h, pos, valid, cos, sin, k_cache, v_cache, keys.shape[0], ln1, wqkv, bqkv, wo, ln2, wgu, wd,
                       attn_state=attn_state)


class RowLayerFn(LayerFn):
    """`layer1.pt2` with the fused attention: the attention kernel's state comes in after v_cache, since a
    package owns no state: its arrival counters (int32 [H], zero between calls) and its split workspace
    (fp32). The runner keeps one of each, shared by every layer (their calls run one after another on one
    stream), as the Python step does."""

    def forward(self, h, pos, keys, valid, cos, sin, k_cache, v_cache, counters, ws, *w):
        return self._run(h, pos, keys, valid, cos, sin, k_cache, v_cache, w, (counters, ws))


class HeadFn(torch.nn.Module):
    def __init__(self, spec):
        super().__init__()
        self.head = make_head_fn(spec)
        self.eps = spec.eps

    def forward(self, h, sel, norm_w, head_w):
        _, logits = self.head(h[:, sel], norm_w, head_w)  # the eager head on the selected rows
        return rms_norm(h, norm_w, self.eps), logits


class Head1Fn(torch.nn.Module):
    """`head1.pt2`: the head of one row, traced with static shapes as the Python CUDA step compiles it (a
    row-count-dynamic matmul is a cuBLAS call: 43 us against Inductor's 29 us for SmolLM2's head on the H200,
    `benchmarks/one_row_kernels.py`; on a CPU, the one-row shape is what `inductor_cpu_gemv` rewrites)."""

    def __init__(self, spec):
        super().__init__()
        self.head = make_head_fn(spec)

    def forward(self, h, norm_w, head_w):
        return self.head(h, norm_w, head_w)


class ExitFn(torch.nn.Module):
    def __init__(self, spec):
        super().__init__()
        self.eps = spec.eps

    def forward(self, h, norm_w, rows, p_prev, w1, b1, w2, b2):
        from ..ops import exit_score_reference

        score, z, p = exit_score_reference(h, norm_w, rows, p_prev, w1, b1, w2, b2, self.eps)
        return score, z, p, rms_norm(h, norm_w, self.eps)[0, 0]


def draft_weight_names(draft) -> list[str]:
    return sorted(k for k in draft.state_dict() if k != "vocab_ids")


class DraftFn(torch.nn.Module):
    """One EAGLE draft step over T new pairs with weights as inputs (EagleDraft.forward's math; the
    attention is written with one general mask j <= C + i, which equals its three shape cases)."""

    def __init__(self, draft):
        super().__init__()
        cfg = draft.base_config
        a = draft.layers[0].self_attn
        self.names = draft_weight_names(draft)
        self.n = len(draft.layers)
        self.H, self.Hkv, self.hd = a.num_heads, a.num_kv_heads, a.head_dim
        self.eps = getattr(cfg, "rms_norm_eps", 1e-6)
        self.input_norm = draft.input_norm
        self.act = draft.layers[0].mlp.act_fn

    def _norm(self, x, w):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return w * xf.to(x.dtype)

    def forward(self, feats, next_ids, positions, past_k, past_v, cos, sin, embed_w, head_rows, *weights):
        W = dict(zip(self.names, weights))
        T, C = feats.shape[0], past_k.shape[2]
        H, Hkv, hd = self.H, self.Hkv, self.hd
        emb = F.embedding(next_ids, embed_w)
        x = F.linear(torch.cat([emb, feats], dim=-1), W["fc.weight"], W.get("fc.bias"))  # [T, D]
        c, s = cos[positions][None], sin[positions][None]  # [1, T, hd]
        i = torch.arange(T, device=feats.device)[:, None]
        j = torch.arange(C + T, device=feats.device)[None, :]
        mask = j <= C + i  # [T, C+T]
        ks, vs = [], []
        for li in range(self.n):
            p = f"layers.{li}."
            hx = self._norm(x, W[p + "input_layernorm.weight"]) if self.input_norm else x
            q = F.linear(hx, W[p + "self_attn.q_proj.weight"], W.get(p + "self_attn.q_proj.bias"))
            k = F.linear(hx, W[p + "self_attn.k_proj.weight"], W.get(p + "self_attn.k_proj.bias"))
            v = F.linear(hx, W[p + "self_attn.v_proj.weight"], W.get(p + "self_attn.v_proj.bias"))
            q = q.view(T, H, hd).transpose(0, 1)  # [H, T, hd]
            k = k.view(T, Hkv, hd).transpose(0, 1)
            v = v.view(T, Hkv, hd).transpose(0, 1)
            half = hd // 2
            q = q * c + torch.cat((-q[..., half:], q[..., :half]), -1) * s
            k = k * c + torch.cat((-k[..., half:], k[..., :half]), -1) * s
            ks.append(k)
            vs.append(v)
            kk = torch.cat([past_k[li], k], dim=1)  # [Hkv, C+T, hd]
            vv = torch.cat([past_v[li], v], dim=1)
            rep = H // Hkv
            if rep > 1:
                kk = kk.repeat_interleave(rep, dim=0)
                vv = vv.repeat_interleave(rep, dim=0)
            o = F.scaled_dot_product_attention(q[None], kk[None], vv[None], attn_mask=mask[None, None])[0]
            o = o.transpose(0, 1).reshape(T, H * hd)
            x = x + F.linear(o, W[p + "self_attn.o_proj.weight"], W.get(p + "self_attn.o_proj.bias"))
            hm = self._norm(x, W[p + "post_attention_layernorm.weight"])
            g = F.linear(hm, W[p + "mlp.gate_proj.weight"], W.get(p + "mlp.gate_proj.bias"))
            u = F.linear(hm, W[p + "mlp.up_proj.weight"], W.get(p + "mlp.up_proj.bias"))
            x = x + F.linear(self.act(g) * u, W[p + "mlp.down_proj.weight"], W.get(p + "mlp.down_proj.bias"))
        g_last = x[-1]
        return g_last, torch.stack(ks), torch.stack(vs), g_last @ head_rows.T


# ------------------------------------------------------------------------------------ export
def one_row_fused(spec, device: torch.device) -> tuple[str, ...]:
    """The fused ops of the one-row layer package (`layer1.pt2`): on CUDA with triton, the Python step's
    (`model_step.CUDA_FUSED`) as their `specee_aoti` twins; attention only for a power-of-two head_dim
    (the kernel's tile). () elsewhere (a CPU's one-row package is the plain layer: `one_row_packages`)."""
    from ..model_step import CUDA_FUSED
    from ..plugins import HAVE_TRITON

    if device.type != "cuda" or not HAVE_TRITON:
        return ()
    hd = spec.head_dim
    return tuple(f for f in CUDA_FUSED if f != "attn" or hd & (hd - 1) == 0)


def _tune_one_row(spec, fused, layer_w) -> None:
    """Pick the GEMV twins' configs on real tensors of the layer's four shapes (`triton_gemv.tune_for_aoti`);
    the twins read them while the package is traced."""
    from ..plugins.triton_gemv import tune_for_aoti

    ln1, wqkv, *rest = layer_w
    wo, ln2, wgu, wd = rest[-4:]
    dev, dt, D = wqkv.device, wqkv.dtype, spec.hidden

    def x(n):
        return torch.randn(1, 1, n, device=dev).to(dt)

    with torch.no_grad():
        if "qkv" in fused:
            tune_for_aoti(x(D), wqkv, None, ln1, spec.eps, "rmsnorm" if ln1 is not None else "none")
        if "o" in fused:
            tune_for_aoti(x(wo.shape[1]), wo, x(D))
        if "gate_up" in fused:
            tune_for_aoti(x(D), wgu, None, ln2, spec.eps, "rmsnorm")
        if "down" in fused:
            tune_for_aoti(x(2 * wd.shape[1]), wd, x(D), None, 0.0, "silu_mul")
    torch.cuda.synchronize()


def _compile(module, args, dynamic_shapes, path: Path, progress: bool) -> float:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    t0 = time.perf_counter()
    # On CUDA (torch 2.11, the H200 machine) the attention's GQA strides give guards on the attended length
    # S that hold for every S >= 0 but that export's solver cannot prove (min(64*S, 192*S) == 64*S): there
    # they become run-time asserts instead of an error; SDPA's math formulation keeps the shape checks simple
    cuda = next((a.device for a in args if isinstance(a, torch.Tensor) and a.is_cuda), None)
    with torch.no_grad(), (sdpa_kernel([SDPBackend.MATH]) if cuda else contextlib.nullcontext()), \
            warnings.catch_warnings():
        # torch 2.13's own pytree deprecation, printed once per package while it pickles the export's specs: not the
        # user's to act on (every other warning still shows)
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated",
                                category=FutureWarning)
        ep = torch.export.export(module, args, dynamic_shapes=dynamic_shapes, strict=False,
                                 **({"prefer_deferred_runtime_asserts_over_guards": True} if cuda else {}))
        # the Python step's Inductor options (backends/inductor.py): on CUDA M=1 matmuls and reductions tuned, and
        # PDL's waits where the export asks for them (`pdl.package_mode`); on a CPU one-row matmuls as reductions
        # (`inductor_cpu_gemv`: the one-row packages)
        from ..plugins.inductor_cpu_gemv import inductor_options

        configs = ({"coordinate_descent_tuning": True, **pdl.package_inductor_options(cuda)} if cuda else
                   inductor_options(torch.device("cpu")))
        torch._inductor.aoti_compile_and_package(ep, package_path=str(path), inductor_configs=configs or None)
    dt = time.perf_counter() - t0
    if progress:
        print(f"  {path.name}: {dt:.0f} s", file=sys.stderr)
    return dt


def attended_dim(max_len: int, bucket: int):
    """The attended length S of the one-row package as an export Dim. The runner only passes attention
    bucket lengths (`attn_len`: multiples of `bucket`, or max_len). Where all of them are multiples of 16
    (and at least 32), S is exported as 16 * Dim, so Inductor knows S % 16 == 0 and compiles the attention
    kernel with the divisibility hint Triton's JIT gives the Python step's kernel for S = 64, 128, ... (the
    package's attention took 4.77 us per launch against the Python kernel's 3.85 on the H200, session 14);
    otherwise a plain Dim 1 .. max_len."""
    if max_len % 16 == 0 and bucket % 16 == 0 and min(bucket, max_len) >= 32:
        return 16 * torch.export.Dim("S16", min=2, max=max_len // 16)
    return torch.export.Dim("S", min=1, max=max_len)


def one_row_packages(w, out: Path, info: dict, progress: bool = True, S=None) -> None:
    """The one-row packages: `layer1.pt2`, the decode step's layer, and `head1.pt2`, the head with static shapes.
    On CUDA the layer embeds the Python CUDA step's fused Triton kernels (where triton is present). On a CPU
    (float32) both are the plain layer and head with one static row, whose matmuls `plugins/inductor_cpu_gemv.py`
    compiles as parallel reductions (`mm` in the dynamic packages runs a one-row product on one BLAS thread, most
    of a CPU decode step); none where that pass is off. Adds them to info["packages"] with their manifest facts
    and compile seconds. w: `extract_weights` output on the device; S: the export's attended-length Dim
    (default: `attended_dim`)."""
    from ..plugins.inductor_cpu_gemv import inductor_options

    spec, dev, dtype = w.spec, w.head.device, w.head.dtype
    cpu = dev.type != "cuda"
    if cpu and not (dtype == torch.float32 and inductor_options(dev)):
        return
    D, Hkv, hd, T = spec.hidden, spec.num_kv_heads, spec.head_dim, info["cache_len"]
    S = S if S is not None else attended_dim(info["max_len"], info["attn_bucket"])
    lw = [t for t in w.layers[0].as_tuple() if t is not None]
    has_bias = w.layers[0].bqkv is not None
    times, pk = info.setdefault("compile_s", {}), info.setdefault("packages", {})
    fused1 = one_row_fused(spec, dev)
    if cpu or fused1:
        from ..plugins.triton_decode_attention import workspace_numel

        counters = "attn" in fused1  # the attention kernel's state (counters, workspace), after v_cache
        n_ws = workspace_numel(spec.num_heads, hd) if counters else 0
        row_args = (torch.randn(1, 1, D, device=dev).to(dtype), torch.tensor([5], device=dev),
                    torch.arange(64, device=dev), torch.zeros(T, dtype=torch.bool, device=dev), w.cos, w.sin,
                    torch.zeros(Hkv, T, hd, dtype=dtype, device=dev), torch.zeros(Hkv, T, hd, dtype=dtype, device=dev),
                    *([torch.zeros(spec.num_heads, dtype=torch.int32, device=dev),
                       torch.empty(n_ws, dtype=torch.float32, device=dev)] if counters else []), *lw)
        if fused1:
            _tune_one_row(spec, fused1, lw)
        ds1 = (None, None, {0: S}) + (None,) * (7 if counters else 5) + ((None,) * len(lw),)
        fn = (RowLayerFn if counters else LayerFn)(spec, has_bias, fused1, ops="specee_aoti" if fused1 else "specee")
        times["layer1"] = _compile(fn, row_args, ds1, out / "layer1.pt2", progress)
        pk["layer1"] = "layer1.pt2"
        info["layer1_fused"] = list(fused1)
        info["layer1_cpu_gemv"] = cpu
        info["layer1_attn_counters"] = counters
        info["layer1_attn_workspace"] = n_ws
    times["head1"] = _compile(Head1Fn(spec), (torch.randn(1, 1, D, device=dev).to(dtype), w.norm, w.head), None,
                              out / "head1.pt2", progress)
    pk["head1"] = "head1.pt2"


def export_aoti(model, program, out_dir, settings: Settings, draft=None, *, device: str = "cpu",
                progress: bool = True, eos_ids=()) -> dict:
    """Write the packages and weights.safetensors into `out_dir`; return the manifest's `cpp` info."""
    from ..artifacts import save_tensors

    out = Path(out_dir)
    dtype = torch_dtype(settings.dtype)
    dev = torch.device(device)
    model = model.to(device=dev, dtype=dtype)
    max_pos = getattr(model.config, "max_position_embeddings", settings.max_context)
    max_len = min(settings.max_context, max_pos)
    w = extract_weights(model, max_len)
    spec = w.spec
    L, D, Hkv, hd, V = spec.num_layers, spec.hidden, spec.num_kv_heads, spec.head_dim, spec.vocab
    T = max_len + 1
    has_bias = w.layers[0].bqkv is not None
    tensors: dict[str, torch.Tensor] = {"embed": w.embed, "norm": w.norm, "head": w.head, "cos": w.cos, "sin": w.sin}
    for i, lw in enumerate(w.layers):
        for key, t in zip(LAYER_KEYS, lw.as_tuple()):
            if t is not None:
                tensors[f"layers.{i}.{key}"] = t
    info: dict = {"format": AOTI_FORMAT, "version": AOTI_VERSION, "device": dev.type, "dtype": settings.dtype,
                  "num_layers": L, "hidden": D, "num_heads": spec.num_heads, "num_kv_heads": Hkv, "head_dim": hd,
                  "vocab": V, "eps": spec.eps, "max_len": max_len, "cache_len": T, "qkv_bias": has_bias,
                  "eos_ids": sorted(int(t) for t in eos_ids), "attn_bucket": 64, "packages": {}, "compile_s": {},
                  "pdl": pdl.package_mode(dev)}
    if info["pdl"] == "all":  # the kernels the runner may let launch before the one before them completes
        info["pdl_waiting_kernels"] = list(pdl.PACKAGE_WAITING_KERNELS)
    times = info["compile_s"]
    if progress:
        print(f"AOTInductor packages ({dev.type}, {settings.dtype}, max_len {max_len}):", file=sys.stderr)

    def ex(*shape, dt=dtype):
        return torch.randn(*shape, device=dev).to(dt)

    # ---- layer (q rows, S attended positions dynamic)
    q, n, S = torch.export.Dim("q", min=1, max=max_len), torch.export.Dim("n", min=1, max=max_len), \
        torch.export.Dim("S", min=1, max=max_len)
    lw = [t for t in w.layers[0].as_tuple() if t is not None]
    layer_args = (ex(1, 3, D), torch.tensor([0, 1, 2], device=dev), torch.arange(64, device=dev),
                  torch.zeros(T, dtype=torch.bool, device=dev), w.cos, w.sin,
                  torch.zeros(Hkv, T, hd, dtype=dtype, device=dev), torch.zeros(Hkv, T, hd, dtype=dtype, device=dev),
                  *lw)
    ds = ({1: q}, {0: q}, {0: S}) + (None,) * 5 + ((None,) * len(lw),)  # *w is one varargs entry
    times["layer"] = _compile(LayerFn(spec, has_bias), layer_args, ds, out / "layer.pt2", progress)
    # ---- head
    head_args = (ex(1, 3, D), torch.tensor([1, 2], device=dev), w.norm, w.head)
    times["head"] = _compile(HeadFn(spec), head_args, ({1: q}, {0: n}, None, None), out / "head.pt2", progress)
    info["packages"] = {"layer": "layer.pt2", "head": "head.pt2"}
    one_row_packages(w, out, info, progress)

    if program is not None:
        P = program.predictors
        k, Hm = program.num_candidates, P.w1.shape[1]
        for name, t in (("w1", P.w1), ("b1", P.b1), ("w2", P.w2), ("b2", P.b2)):
            tensors[f"predictors.{name}"] = t.to(device=dev, dtype=torch.float32)
        exit_args = (ex(1, 1, D), w.norm, ex(k, D), torch.zeros(k, device=dev), ex(Hm, 3 * k, dt=torch.float32),
                     ex(Hm, dt=torch.float32), ex(Hm, dt=torch.float32), ex(1, dt=torch.float32))
        times["exit_score"] = _compile(ExitFn(spec), exit_args, None, out / "exit_score.pt2", progress)
        info["packages"]["exit_score"] = "exit_score.pt2"
        info.update(num_candidates=k, predictor_hidden=Hm,
                    exit_points=[[ep.layer, float(ep.threshold)] for ep in program.exit_points],
                    predictor_layers=[int(x) for x in P.layers],
                    offline_layers=[int(x) for x in program.offline_layers],
                    exit_rates={str(k_): float(v) for k_, v in program.exit_rates.items()},
                    eval_share={str(k_): float(v) for k_, v in program.eval_share.items()},
                    exit_precision=program.exit_precision)
    if draft is not None:
        draft = draft.to(device=dev, dtype=dtype)
        names = draft_weight_names(draft)
        sd = draft.state_dict()
        for nm in names:
            tensors[f"draft.{nm}"] = sd[nm]
        tensors["draft.vocab_ids"] = draft.vocab_ids.to(dev)
        a = draft.layers[0].self_attn
        nl, dkv, dhd = len(draft.layers), a.num_kv_heads, a.head_dim
        if dhd != hd:
            raise SpecEEError(f"the draft's head_dim {dhd} differs from the model's {hd}; the C++ runner shares "
                              "the RoPE tables")
        Td, Cd = torch.export.Dim("T", min=1, max=max_len), torch.export.Dim("C", min=0, max=max_len)
        draft_args = (ex(3, D), torch.tensor([5, 6, 7], device=dev), torch.tensor([2, 3, 4], device=dev),
                      ex(nl, dkv, 2, dhd), ex(nl, dkv, 2, dhd), w.cos, w.sin, w.embed,
                      w.head[draft.vocab_ids.to(dev)], *(sd[nm] for nm in names))
        ds = ({0: Td}, {0: Td}, {0: Td}, {2: Cd}, {2: Cd}) + (None,) * 4 + ((None,) * len(names),)
        times["draft"] = _compile(DraftFn(draft), draft_args, ds, out / "draft.pt2", progress)
        info["packages"]["draft"] = "draft.pt2"
        info["draft"] = {"kind": "eagle", "weights": names, "num_layers": nl, "num_kv_heads": dkv, "head_dim": dhd,
                         "num_vocab_ids": int(draft.vocab_ids.numel()), "vocab_size": int(draft.vocab_size),
                         "context_vocab": True}
    # safetensors refuses shared storage (tied embeddings): every tensor gets its own copy
    save_tensors({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()},
                 out / "weights.safetensors", metadata={"format": AOTI_FORMAT})
    info["weights"] = "weights.safetensors"
    return info


def export_aoti_dir(model, program, out_dir, settings: Settings, draft=None, *, model_name: str = "model",
                    fingerprint: str = "", device: str = "cpu", eos_ids=(), tokenizer=None, force: bool = False,
                    progress: bool = True) -> dict:
    """Export into `out_dir` atomically (artifacts.atomic_directory) and write the manifest; returns it."""
    from ..artifacts import atomic_directory, read_manifest, write_manifest

    t0 = time.perf_counter()
    with atomic_directory(out_dir, force=force) as tmp:
        cpp = export_aoti(model, program, tmp, settings, draft, device=device, progress=progress, eos_ids=eos_ids)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        info = {"kind": "export-aoti", "format": "aoti", "dtype": settings.dtype, "num_layers": cpp["num_layers"],
                "max_context": cpp["max_len"], "eos_ids": cpp["eos_ids"],
                "exit_layers": program.exit_layers if program is not None else [],
                "thresholds": {str(ep.layer): ep.threshold for ep in program.exit_points} if program else {},
                "schedule": {"offline_layers": list(program.offline_layers)} if program is not None else {},
                "cpp": cpp, "export_s": round(time.perf_counter() - t0, 1)}
        manifest = write_manifest(tmp, model=model_name, fingerprint=fingerprint, info=info)
    read_manifest(out_dir)
    return manifest


def export_aoti_command(model_name: str, output: str | None, *, artifacts=None, max_context: int = 1024,
                        dtype: str = "float32", device: str = "cpu", force: bool = False) -> dict:
    """`specee-compile export MODEL --format aoti [-o DIR]`."""
    from ..api import default_artifacts_dir, eos_ids, load_program
    from ..artifacts import plan_output
    from ..config import check_device
    from ..draft import EagleSource
    from ..export import _alias
    from ..models import load_model

    check_device(device)
    settings = Settings(specee=True, max_context=max_context, dtype=dtype, artifacts=artifacts, device=device)
    if output is not None:
        plan_output(output, force=force)
    loaded = load_model(model_name)
    out = Path(output or Path("exported") / _alias(loaded, model_name))
    if output is None:
        plan_output(out, force=force)
    source = Path(artifacts) if artifacts else default_artifacts_dir(loaded)
    program = draft = None
    if source is not None:
        program, src, _, src_manifest = load_program(source, loaded, settings)
        if isinstance(src, EagleSource):
            draft = src.draft
        schedule = src_manifest.get("schedule", {})
        if schedule.get("offline_layers") is not None:
            program.offline_layers = list(schedule["offline_layers"])
    else:
        print(f"no SpecEE artifacts for {loaded.name}: exporting a dense decode step", file=sys.stderr)
    t0 = time.perf_counter()
    print(f"exporting {loaded.name} to {out} (AOTInductor) ...", file=sys.stderr)
    manifest = export_aoti_dir(loaded.model, program, out, settings, draft, model_name=loaded.name,
                               fingerprint=loaded.fingerprint, device=device, eos_ids=eos_ids(loaded),
                               tokenizer=loaded.tokenizer, force=force)
    print(f"wrote {out}: {len(manifest['files'])} files, {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return manifest


__all__ = ["AOTI_FORMAT", "PACKAGES", "attended_dim", "export_aoti", "export_aoti_command", "export_aoti_dir"]
