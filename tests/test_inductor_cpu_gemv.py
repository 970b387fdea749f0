"""`plugins/inductor_cpu_gemv.py`: one-row float32 matmuls on a CPU rewritten into Inductor reductions.

The pass on small hand-built graphs (what it rewrites, what it leaves), then through Inductor: the one-row
compile calls no BLAS and agrees with F.linear to rounding, a compile of several rows keeps its `mm`."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

from specee_compile.errors import SettingError
from specee_compile.plugins.inductor_cpu_gemv import CpuGemvPass, inductor_options

aten = torch.ops.aten


def _graph(fn, *args):
    """fn traced to ATen with fake values in meta["val"], as Inductor's post-grad graph carries them."""
    return make_fx(fn, tracing_mode="fake")(*args)


def _targets(gm) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("bias", [False, True])
def test_one_row_matmul_becomes_a_multiply_and_sum(bias):
    torch.manual_seed(0)
    x, w, b = torch.randn(1, 48), torch.randn(80, 48), torch.randn(80)
    gm = _graph(lambda x, w, b: F.linear(x, w, b if bias else None), x, w, b)
    assert (aten.addmm.default if bias else aten.mm.default) in _targets(gm)
    CpuGemvPass()(gm.graph)
    gm.recompile()
    got = _targets(gm)
    assert aten.mm.default not in got and aten.addmm.default not in got
    assert aten.sum.dim_IntList in got and aten.mul.Tensor in got
    (out,) = [n.args[0] for n in gm.graph.nodes if n.op == "output"]
    assert tuple(out.meta["val"].shape) == (1, 80)
    torch.testing.assert_close(gm(x, w, b), F.linear(x, w, b if bias else None), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["rows", "bf16", "symbolic"])
def test_what_the_pass_leaves_to_the_blas(case):
    """Several rows (each weight row is reused: a blocked GEMM's case), other dtypes, and a symbolic row count
    (the dynamic prefill compile) keep their `mm`."""
    if case == "symbolic":
        gm = make_fx(lambda x, w: x @ w.t(), tracing_mode="symbolic")(torch.randn(3, 16), torch.randn(8, 16))
    else:
        dt = torch.bfloat16 if case == "bf16" else torch.float32
        n = 1 if case == "bf16" else 4
        gm = _graph(lambda x, w: x @ w.t(), torch.randn(n, 16, dtype=dt), torch.randn(8, 16, dtype=dt))
    before = _targets(gm)
    CpuGemvPass()(gm.graph)
    assert _targets(gm) == before and aten.mm.default in before


def test_inductor_compiles_the_one_row_layer_without_a_blas_call():
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(1)
    w1, w2 = torch.randn(96, 64), torch.randn(64, 96)

    def mlp(x):
        return x + F.linear(F.silu(F.linear(x, w1)), w2)

    for rows, blas in ((1, False), (3, True)):
        torch._dynamo.reset()
        x = torch.randn(rows, 64)
        with torch._inductor.config.patch(inductor_options(torch.device("cpu"))):
            got, code = run_and_get_code(torch.compile(mlp, fullgraph=True), x)
        assert bool(re.search(r"extern_kernels\.(add)?mm\(", "\n".join(code))) is blas, rows
        torch.testing.assert_close(got, mlp(x), rtol=1e-5, atol=1e-5)


def test_setting(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert isinstance(inductor_options(cpu)["post_grad_custom_post_pass"], CpuGemvPass)
    assert inductor_options(cuda) == {}
    monkeypatch.setenv("SPECEE_CPU_GEMV", "0")
    assert inductor_options(cpu) == {}
    monkeypatch.setenv("SPECEE_CPU_GEMV", "yes")
    with pytest.raises(SettingError, match="SPECEE_CPU_GEMV"):
        inductor_options(cpu)
    from specee_compile.config import Settings

    with pytest.raises(SettingError, match="SPECEE_CPU_GEMV"):  # checked with the settings, before a model loads
        Settings(backend="inductor")
