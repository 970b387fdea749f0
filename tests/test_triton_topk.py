"""`specee::topk_rows` (the fixed draft tree's top k per row) against torch.topk, on CPU (the op's reference,
the Triton kernel in the interpreter) and on CUDA."""

from __future__ import annotations

import textwrap

import pytest
import torch
from conftest import run_in_triton_interpreter

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (CI has none)")

CASES = [((8, 8704), 8), ((8704,), 4), ((3, 600), 1), ((2, 100), 8), ((1, 64), 8), ((8,), 8), ((4, 5), 5)]


@pytest.mark.parametrize("shape,k", CASES)
def test_topk_rows_gives_the_top_k(shape, k):
    from specee_compile.draft.tree import topk_rows

    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).clamp(max=1.0)  # ties at the top
    v, i = topk_rows(x, k)
    assert torch.equal(v, torch.topk(x, k).values)
    assert torch.equal(torch.gather(x, -1, i), v)
    assert (i.sort(-1).values.diff(dim=-1) > 0).all()  # k distinct columns


_CHECK = textwrap.dedent(
    """
    def check(topk, device):
        import torch
        g = torch.Generator().manual_seed(1)
        for shape, k in CASES:
            for dt in (torch.float32, torch.float16):
                x = torch.randn(*shape, generator=g).to(dt)
                x[..., ::7] = x[..., ::7].clamp(max=0.5)  # ties
                if x.shape[-1] > 3:
                    x[..., 1] = float("-inf")
                x = x.to(device)
                v, i = topk(x, k)
                assert v.dtype == x.dtype and i.dtype == torch.long and v.shape == i.shape == (*shape[:-1], k)
                assert torch.equal(v, torch.topk(x, k).values), (shape, k, dt)
                assert torch.equal(torch.gather(x, -1, i), v), (shape, k, dt)
                assert (i.sort(-1).values.diff(dim=-1) > 0).all(), (shape, k, dt)
                # ties go to the lowest column: among equal values the columns rise
                same = v[..., 1:] == v[..., :-1]
                assert (i[..., 1:] > i[..., :-1])[same].all(), (shape, k, dt)
        # a row of -inf: k distinct columns all the same
        x = torch.full((2, 40), float("-inf"), device=device)
        v, i = topk(x, 6)
        assert torch.equal(i, torch.arange(6, device=device).expand(2, 6)) and torch.isinf(v).all()
        # the same over rows split into chunks, and ties at the top spread over the chunks
        x = torch.full((2, 1100), float("-inf"), device=device)
        v, i = topk(x, 6)
        assert torch.equal(i, torch.arange(6, device=device).expand(2, 6)) and torch.isinf(v).all()
        x = torch.zeros(3, 2000, device=device)
        x[:, 3::500] = 1.0
        v, i = topk(x, 5)
        assert torch.equal(i[:, :4], torch.tensor([3, 503, 1003, 1503], device=device).expand(3, 4))
        assert torch.equal(i[:, 4], torch.zeros(3, dtype=torch.long, device=device)) and (v[:, :4] == 1).all()
        # a view of every other row (strided rows)
        x = torch.randn(6, 300, generator=g).to(device)[::2]
        assert torch.equal(topk(x, 3)[0], torch.topk(x, 3).values)
    """
)

_INTERP = _CHECK + textwrap.dedent(
    """
    from specee_compile.plugins.triton_topk import triton_topk_rows
    check(triton_topk_rows, "cpu")
    print("INTERP_OK")
    """
)


def test_kernel_logic_in_triton_interpreter_on_cpu():
    """The one-program kernel (rows of up to CHUNK columns) and the chunked one (longer rows: (8, 8704),
    (8704,), (3, 600) among CASES) against torch.topk."""
    run_in_triton_interpreter(f"CASES = {CASES!r}\n" + _INTERP)


@cuda
def test_cuda_kernel_matches_topk():
    from specee_compile.plugins.triton_topk import register_cuda_impl

    assert register_cuda_impl()
    scope: dict = {"CASES": CASES}
    exec(_CHECK, scope)  # noqa: S102  # the interpreter test's checks, on the device
    scope["check"](lambda x, k: torch.ops.specee.topk_rows(x, k), "cuda")
