"""The captured step's control kernels (plugins/triton_step_ctrl.py) and the predicated exit decision,
run on the CPU through the Triton interpreter and checked against their Python references."""

from __future__ import annotations

import textwrap

import pytest
from conftest import run_in_triton_interpreter

pytest.importorskip("triton", reason="triton is not installed")

_CODE = textwrap.dedent(
    """
    import random
    import torch
    from specee_compile.plugins.triton_step_ctrl import reference_schedule, step_epilogue, step_prologue
    from specee_compile.plugins.triton_exit_score import torch_exit_decide, triton_exit_decide
    offs = dict(ALIVE=0, FORCED=1, EXIT=2, PROPOSED=3, NEEDHEAD=4, HEADS=5)
    L, ACT0 = 30, 8
    # prologue: host token vs the device's own; the per-step header
    tok = torch.tensor([77])
    ctrl = torch.full((ACT0 + L,), 9, dtype=torch.uint8)
    step_prologue(torch.tensor([5, 17, 123, 1]), tok, ctrl, L, offs)
    assert tok.tolist() == [123], tok
    assert ctrl[:6].tolist() == [1, 17, L - 1, 1, 1, 0] and ctrl[ACT0:].tolist() == [9] * L, ctrl
    step_prologue(torch.tensor([6, 255, 55, 0]), tok, None, L)
    assert tok.tolist() == [123]
    # epilogue: token feedback, then the online schedule against the Python reference
    rng = random.Random(0)
    for N, offsets in ((5, (-2, 0, 2)), (1, (0,)), (3, (-1, 1, 3, 4))):
        hist = [-1000] * N
        hist_t = torch.tensor(hist, dtype=torch.long)
        base = {20, 23}
        elig = set(range(10, 29))
        base_t = torch.zeros(L, dtype=torch.uint8); base_t[list(base)] = 1
        elig_t = torch.zeros(L, dtype=torch.uint8); elig_t[list(elig)] = 1
        offs_t = torch.tensor(offsets, dtype=torch.long)
        for step in range(12):
            e = rng.choice([L - 1, L - 1, rng.randrange(8, L - 1)])
            out = torch.tensor([400 + step, e, 0])
            c = torch.zeros(ACT0 + L, dtype=torch.uint8)
            step_epilogue(out, tok, L, (hist_t, base_t, elig_t, offs_t, c, ACT0))
            hist, act = reference_schedule(hist, e, L - 1, base, elig, offsets)
            assert tok.tolist() == [400 + step]
            assert hist_t.tolist() == hist, (hist_t, hist)
            assert {i for i in range(L) if c[ACT0 + i]} == act, (step, act)
        step_epilogue(torch.tensor([3, 4, 0]), tok, L)
        assert tok.tolist() == [3]
    # the predicated decision: a no-op unless alive and active; same as the torch reference
    D, k = 576, 4
    h = torch.randn(1, 1, D) * 3
    nw = 1 + 0.1 * torch.randn(D)
    rows = torch.randn(k, D) * 0.05
    w1, b1, w2, b2 = torch.randn(512, 3 * k) * 0.3, torch.randn(512) * 0.1, torch.randn(512) * 0.1, torch.randn(1)
    pp = torch.softmax(torch.randn(k), 0)
    for alive, act in ((1, 1), (0, 1), (1, 0)):
        res = []
        for fn in (triton_exit_decide, torch_exit_decide):
            c = torch.tensor([alive, 7, 31, 0, act], dtype=torch.uint8)
            hx = torch.zeros(D)
            p2 = pp.clone()
            fn(h, nw, rows, p2, w1, b1, w2, b2, 1e-5, layer=9, ctrl=c, hexit=hx, score=torch.zeros(1),
               z=torch.zeros(k), forced=True, alive_off=0, forced_off=1, exit_off=2, gate_off=4)
            res.append((c.tolist(), bool(torch.equal(hx, h.reshape(-1))), bool(torch.equal(p2, pp))))
        assert res[0][0] == res[1][0] and res[0][1] == res[1][1] and res[0][2] == res[1][2], res
        if alive and act:
            assert res[0][0][:3] == [0, 7, 9] and res[0][1] and not res[0][2], res
        else:
            assert res[0][0] == [alive, 7, 31, 0, act] and not res[0][1] and res[0][2], res
    print("INTERP_OK")
    """
)


def test_step_control_kernels_in_triton_interpreter():
    run_in_triton_interpreter(_CODE)
