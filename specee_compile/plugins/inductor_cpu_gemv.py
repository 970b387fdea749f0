"""One-row float32 matmuls on a CPU as Inductor reductions: a post-grad pass for our Inductor compiles.

Why: a decode step multiplies one row by every weight, and Inductor hands `aten.mm` / `aten.addmm` to a BLAS
(`extern_kernels.mm`, `aoti_torch_cpu_mm_out` in an AOTInductor package). MKL runs a one-row product of a
transposed weight (`F.linear`'s layout) on one thread, below the memory's speed. Written as a multiply and a sum
over K, the same product is a reduction Inductor's C++ code generator compiles into one vectorized loop, parallel
over the output columns (OpenMP), and fuses with the norm or activation before it. On the 2-core AMD EPYC of
2026-12-05, 2 threads: SmolLM2-135M's 30 layers' one-row matmuls took 16.0-18.7 ms this way against 36.8-39.5
through MKL (and 19.0-20.3 in the eager backend's oneDNN), its LM head 2.9 ms against 9.7
(`benchmarks/cpu_gemm_rows.py`), and the C++ runner's dense decode went from 21.8 to 57.6 tok/s
(`benchmarks/cpp_bench.py`; benchmarks/RESULTS.md, session 24).

What it rewrites: `mm(a, b)` and `addmm(bias, a, b)` whose `a` has exactly one row (a static 1, not a symbol:
Dynamo's q = 1 specialization, a one-row AOTI package), float32, on the CPU, into
`sum(permute(a) * b, dim=0, keepdim=True)` (+ bias). Everything else is left to the BLAS: several rows reuse
each weight row, which only a blocked GEMM exploits. The sum's order differs from the BLAS's: outputs agree to
rounding (tests/test_inductor_cpu_gemv.py).

Used by the Inductor backend on a CPU (`backends/inductor.py`) and by AOTInductor CPU exports
(`backends/aoti_export.py`, whose one-row packages `layer1.pt2` / `head1.pt2` exist for it).
`SPECEE_CPU_GEMV=0` turns it off (A/B runs).
"""

from __future__ import annotations

import os

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

aten = torch.ops.aten


def enabled() -> bool:
    v = os.environ.get("SPECEE_CPU_GEMV", "1")
    if v not in ("0", "1"):
        from ..errors import SettingError

        raise SettingError(f"SPECEE_CPU_GEMV={v!r}: expected 0 or 1; unset it for the default (1)")
    return v == "1"


def _val(x):
    return x.meta.get("val") if isinstance(x, torch.fx.Node) else x


def one_row_cpu_f32(a, b) -> bool:
    """Whether `mm(a, b)` is what the pass rewrites: a's row count a static 1, float32 on the CPU."""
    va, vb = _val(a), _val(b)
    if not isinstance(va, torch.Tensor) or not isinstance(vb, torch.Tensor):
        return False
    return (va.device.type == "cpu" and va.dtype == torch.float32 and vb.dtype == torch.float32
            and va.dim() == 2 and type(va.shape[0]) is int and va.shape[0] == 1)


class CpuGemvPass(CustomGraphPass):
    """The post-grad pass (`torch._inductor.config.post_grad_custom_post_pass`); `uuid` keys Inductor's cache."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        for node in list(graph.nodes):
            if node.op != "call_function" or node.kwargs:
                continue
            if node.target is aten.mm.default:
                bias, (a, b) = None, node.args
            elif node.target is aten.addmm.default and len(node.args) == 3:
                bias, a, b = node.args
            else:
                continue
            if not one_row_cpu_f32(a, b):
                continue
            with graph.inserting_before(node):
                out = _call(graph, aten.sum.dim_IntList, _call(graph, aten.mul.Tensor,
                                                               _call(graph, aten.permute.default, a, [1, 0]), b),
                            [0], True)
                if bias is not None:
                    out = _call(graph, aten.add.Tensor, out, bias)
            node.replace_all_uses_with(out)
            graph.erase_node(node)

    def uuid(self):
        return get_hash_for_files((__file__,))


def _call(graph: torch.fx.Graph, op, *args) -> torch.fx.Node:
    """A new node of `op` with its fake value in meta["val"] (what Inductor's lowering reads)."""
    n = graph.call_function(op, args)
    vals = [_val(x) for x in args]
    fake = next(v.fake_mode for v in vals if isinstance(v, torch.Tensor))
    with fake:
        n.meta["val"] = op(*vals)
    return n


def inductor_options(device: torch.device) -> dict:
    """The Inductor config patch for our compiles on `device`: the pass on a CPU (unless SPECEE_CPU_GEMV=0)."""
    if device.type != "cpu" or not enabled():
        return {}
    return {"post_grad_custom_post_pass": CpuGemvPass()}
