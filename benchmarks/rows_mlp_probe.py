"""An ad-hoc probe (session 41, H100): `specee::rows_mlp` per config, fused (barriers) and phased, each phase alone,
and the rows ops in sequence, at a SmolLM2 layer (fp32, 25 rows). Run: `PYTHONPATH=. python3 benchmarks/rows_mlp_probe.py`."""
import sys

import torch

sys.path.insert(0, '.')
from specee_compile.plugins import triton_rows_mlp as M
from specee_compile.plugins.triton_gemv import _graph_us

torch.manual_seed(0)
def inp(rows, D, KO, I, dt):
    r = lambda *s, sc=1.0: (torch.randn(*s, device='cuda') * sc).to(dt)
    return r(1, rows, KO), r(1, rows, D), r(D, KO, sc=KO**-.5), 1 + r(D, sc=.1), r(2*I, D, sc=D**-.5), r(D, I, sc=I**-.5)
for dt, shape in ((torch.float32, (576, 576, 1536)),):
    a, h, wo, ln, wgu, wd = inp(25, *shape, dt)
    for cfg in M.configs(dt) + [(16, 64, 16, 4, 4, 2), (16, 64, 32, 4, 4, 3)]:
        P = M.programs(cfg, shape[0], shape[2], h.device)
        t0 = _graph_us(lambda i: M.launch(cfg, a, h, wo, ln, wgu, wd, 1e-5), 20)
        tph = _graph_us(lambda i: M.launch(cfg, a, h, wo, ln, wgu, wd, 1e-5, phased=True), 20)
        print(cfg, "P", P, "fused %.1f us" % t0, "phased(3 launches) %.1f us" % tph, flush=True)
    # the phases alone (phased launches each)
    cfg = M.configs(dt)[0]
    import specee_compile.plugins.triton_rows_mlp as MM
    D, KO, I = shape
    h1, act, ws, cnt, bar = MM._workspace(h.device, dt, 25, 32, D, I, cfg[3])
    out = torch.empty_like(h)
    kw = {"D": D, "KO": KO, "I": I, "MP": 32, "BN": cfg[0], "BK": cfg[1], "BJ": cfg[2], "SPLIT": cfg[3], "PREC": "tf32x3", "num_warps": 4, "num_stages": 3}
    args = (a, h, wo, ln, wgu, wd, h1, act, out, ws, cnt, bar, 25, 1e-5)
    for ph, tiles in ((1, -(-D // cfg[0])), (2, -(-I // cfg[2])), (3, -(-D // cfg[0]) * cfg[3])):
        t = _graph_us(lambda i: MM._rows_mlp_kernel[(tiles,)](*args, **kw, PHASE=ph), 20)
        print("phase", ph, "tiles", tiles, "%.1f us" % t, flush=True)
    # P=1 barrier-free lower bound on barrier cost: empty-ish? time fused with tiny shapes
    # the current 5-op sequence in eager
    from specee_compile.ops import multi_row_kernel, register_cuda_kernels
    register_cuda_kernels()
    import torch.nn.functional as F

    from specee_compile.model_step import rms_norm
    def seq():
        h1 = torch.ops.specee.fused_linear(a, wo, h)
        gu = torch.ops.specee.fused_linear(rms_norm(h1, ln, 1e-5), wgu)
        g, u = gu.chunk(2, -1)
        return torch.ops.specee.fused_linear(F.silu(g) * u, wd, h1)
    with multi_row_kernel():
        seq()
        print("eager sequence (rows ops, eager norm/silu) %.1f us" % _graph_us(lambda i: seq(), 20), flush=True)
