"""`specee::rope_append` (the decode step's rotary embedding, K/V cache write and validity mark in one op)
against the layer's plain math, on CPU (reference, the Triton kernel in the interpreter) and on CUDA."""

from __future__ import annotations

import textwrap

import pytest
import torch
from conftest import run_in_triton_interpreter

from specee_compile.model_step import rope, split_qkv
from specee_compile.ops import rope_append_reference

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (CI has none)")

SHAPES = ((9, 3, 64, 40, 17), (4, 4, 32, 16, 0), (2, 1, 16, 8, 7))  # H, Hkv, hd, T, pos (SmolLM2's GQA first)


def _inputs(H, Hkv, hd, T, rows, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(1, rows, (H + 2 * Hkv) * hd, generator=g).to(dtype).to(device)
    ang = torch.rand(T, hd // 2, generator=g) * 6.0
    cos = torch.cat([ang.cos(), ang.cos()], -1).to(dtype).to(device)
    sin = torch.cat([ang.sin(), ang.sin()], -1).to(dtype).to(device)
    kc = torch.randn(Hkv, T, hd, generator=g).to(dtype).to(device)  # stale contents stay where not written
    vc = torch.randn(Hkv, T, hd, generator=g).to(dtype).to(device)
    valid = (torch.rand(T, generator=g) < 0.3).to(device)
    return qkv, cos, sin, kc, vc, valid


def test_reference_rotates_writes_and_marks_only_the_rows_slots():
    H, Hkv, hd, T = 4, 2, 8, 12
    qkv, cos, sin, kc, vc, valid = _inputs(H, Hkv, hd, T, 2, torch.float32, "cpu", 0)
    k0, v0, ok0 = kc.clone(), vc.clone(), valid.clone()
    pos = torch.tensor([3, 7])
    q = rope_append_reference(qkv, cos, sin, pos, kc, vc, valid)
    qh, kh, vh = split_qkv(qkv, H, Hkv, hd)
    assert torch.equal(q, rope(qh, cos[pos], sin[pos]))
    assert torch.equal(kc[:, pos], rope(kh, cos[pos], sin[pos])) and torch.equal(vc[:, pos], vh)
    other = torch.ones(T, dtype=torch.bool)
    other[pos] = False
    assert torch.equal(kc[:, other], k0[:, other]) and torch.equal(vc[:, other], v0[:, other])
    assert valid[pos].all() and torch.equal(valid[other], ok0[other])


def test_reference_writes_at_the_slots_when_given():
    """Tree rows share RoPE positions but not cache slots: rotated at `pos`, written and marked at `slots`."""
    H, Hkv, hd, T = 4, 2, 8, 12
    qkv, cos, sin, kc, vc, valid = _inputs(H, Hkv, hd, T, 3, torch.float32, "cpu", 2)
    k0, ok0 = kc.clone(), valid.clone()
    pos, slots = torch.tensor([4, 5, 5]), torch.tensor([4, 5, 6])
    q = rope_append_reference(qkv, cos, sin, pos, kc, vc, valid, slots)
    qh, kh, vh = split_qkv(qkv, H, Hkv, hd)
    assert torch.equal(q, rope(qh, cos[pos], sin[pos]))
    assert torch.equal(kc[:, slots], rope(kh, cos[pos], sin[pos])) and torch.equal(vc[:, slots], vh)
    other = torch.ones(T, dtype=torch.bool)
    other[slots] = False
    assert torch.equal(kc[:, other], k0[:, other]) and torch.equal(valid[other], ok0[other]) and valid[slots].all()


def test_tree_rows_through_the_fused_layer_equal_the_plain_layer():
    """`model_step`'s layer with the fused ops takes tree rows (slots + mask) through `rope_append` (one op
    writing the cache in place) and gives the plain layer's output, cache and validity."""
    from types import SimpleNamespace

    from specee_compile.model_step import make_layer_fn

    H, Hkv, hd, T, D, F = 4, 2, 8, 16, 32, 48
    spec = SimpleNamespace(num_heads=H, num_kv_heads=Hkv, head_dim=hd, eps=1e-5, hidden=D, max_len=T)
    g = torch.Generator().manual_seed(3)
    w = (torch.rand(D, generator=g) + 0.5, torch.randn((H + 2 * Hkv) * hd, D, generator=g) * 0.1, None,
         torch.randn(D, H * hd, generator=g) * 0.1, torch.rand(D, generator=g) + 0.5,
         torch.randn(2 * F, D, generator=g) * 0.1, torch.randn(D, F, generator=g) * 0.1)
    ang = torch.rand(T, hd // 2, generator=g) * 6.0
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)
    h = torch.randn(1, 4, D, generator=g)
    pos, slots = torch.tensor([6, 7, 7, 8]), torch.tensor([6, 7, 8, 9])  # a root, two siblings, a grandchild
    keys = torch.arange(T)
    anc = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]], dtype=torch.bool)
    mask = (keys < 6)[None] | (((keys >= 6) & (keys < 10))[None] & anc[:, (keys - 6).clamp(0, 3)])
    from torch.utils._python_dispatch import TorchDispatchMode

    class Calls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(str(func))
            return func(*args, **(kwargs or {}))

    outs, calls = [], []
    for fused in ((), ("attn",)):
        kc, vc = torch.randn(Hkv, T, hd, generator=torch.Generator().manual_seed(4)), torch.zeros(Hkv, T, hd)
        valid = keys < 6
        layer = make_layer_fn(spec, fused=fused)
        with Calls() as seen:
            y = layer(h, pos, valid, cos, sin, kc, vc, T, *w, slots=slots, mask=mask)
        outs.append((y, kc, vc, valid))
        calls.append(seen.names)
    for a, b in zip(*outs):
        assert torch.allclose(a.float(), b.float(), atol=1e-6, rtol=1e-5)
    assert outs[1][3][slots].all()
    # the fused layer writes the cache through the op (no index_copy in the traced graph for Inductor to copy),
    # and attends through `tree_attention` (no SDPA and mask ops around it)
    assert "specee.rope_append.default" in calls[1] and not any("index_copy" in n for n in calls[1])
    assert "specee.tree_attention.default" in calls[1] and not any("scaled_dot" in n for n in calls[1])
    assert any("index_copy" in n for n in calls[0]) and any("scaled_dot" in n for n in calls[0])


def test_op_through_the_dispatcher_equals_the_reference():
    qkv, cos, sin, kc, vc, valid = _inputs(4, 2, 8, 12, 1, torch.float32, "cpu", 1)
    ref = [t.clone() for t in (kc, vc, valid)]
    pos = torch.tensor([5])
    want = rope_append_reference(qkv, cos, sin, pos, *ref)
    got = torch.ops.specee.rope_append(qkv, cos, sin, pos, kc, vc, valid)
    assert torch.equal(got, want) and all(torch.equal(a, b) for a, b in zip((kc, vc, valid), ref))


_INTERP = textwrap.dedent(
    """
    import torch
    from specee_compile.ops import rope_append_reference as ref
    from specee_compile.plugins.triton_rope_append import triton_rope_append  # also defines the AOTI twin
    for H, Hkv, hd, T, pos in SHAPES:
        for dt in (torch.float32, torch.float16):
            g = torch.Generator().manual_seed(pos)
            qkv = torch.randn(1, 1, (H + 2 * Hkv) * hd, generator=g).to(dt)
            ang = torch.rand(T, hd // 2, generator=g) * 6.0
            cos = torch.cat([ang.cos(), ang.cos()], -1).to(dt)
            sin = torch.cat([ang.sin(), ang.sin()], -1).to(dt)
            caches = [torch.randn(2, Hkv, T, hd, generator=g).to(dt)[1] for _ in range(2)]  # views, as per layer
            valid = torch.rand(T, generator=g) < 0.3
            mine = [caches[0].clone(), caches[1].clone(), valid.clone()]
            p = torch.tensor([pos])
            want = ref(qkv, cos, sin, p, *caches, valid)
            got = triton_rope_append(qkv, cos, sin, p, *mine)
            for a, b in ((got, want), (mine[0], caches[0]), (mine[1], caches[1])):
                # fp32: the same bits; fp16: one rounding against eager's three (a few units of the last place)
                tol = 0 if dt == torch.float32 else 4 * 2 ** -10 * float(b.float().abs().max())
                assert a.shape == b.shape and float((a.float() - b.float()).abs().max()) <= tol + 1e-6, (H, dt)
            assert torch.equal(mine[2], valid), (H, dt)
            # the AOTI twin (bool validity as the package passes it) gives the Python op's bits
            twin = [caches[0].clone(), caches[1].clone(), valid.clone()]
            twin[2][pos] = False
            try:
                got2 = torch.ops.specee_aoti.rope_append(qkv, cos, sin, p, *twin)
            except RuntimeError as e:  # torch < 2.13's wrap_triton refuses the interpreter's kernels
                if "wrap_triton only works" not in str(e):
                    raise
                continue  # the twin is checked on the GPU (cpp_bench: identical ids) and under torch >= 2.13
            assert all(torch.equal(a, b) for a, b in zip((got2, *twin), (got, *mine))), (H, dt)
            # rows at slots of their own (a tree's: siblings share a position), one launch of the same kernel
            R = 5
            qkv5 = torch.randn(1, R, (H + 2 * Hkv) * hd, generator=g).to(dt)
            p5 = torch.tensor([pos, pos, pos + 1, pos + 1, pos + 2]) % T
            if H == 4:  # one position for every row (a draft tree level's), an expanded view: stride 0
                p5 = torch.tensor(pos % T).expand(R)
            s5 = (torch.tensor([0, 1, 2, 3, 4]) + pos) % T
            ref5 = [caches[0].clone(), caches[1].clone(), valid.clone()]
            mine5 = [caches[0].clone(), caches[1].clone(), valid.clone()]
            want = ref(qkv5, cos, sin, p5, *ref5, s5)
            got = triton_rope_append(qkv5, cos, sin, p5, *mine5, s5)
            for a, b in ((got, want), (mine5[0], ref5[0]), (mine5[1], ref5[1])):
                tol = 0 if dt == torch.float32 else 4 * 2 ** -10 * float(b.float().abs().max())
                assert a.shape == b.shape and float((a.float() - b.float()).abs().max()) <= tol + 1e-6, (H, dt, R)
            assert torch.equal(mine5[2], ref5[2]), (H, dt, R)
    print("INTERP_OK")
    """
)


def test_kernel_logic_in_triton_interpreter_on_cpu():
    run_in_triton_interpreter(f"SHAPES = {SHAPES!r}\n" + _INTERP)


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_cuda_kernel_matches_reference(dtype, shape):
    from specee_compile.plugins.triton_rope_append import register_cuda_impl

    assert register_cuda_impl()
    H, Hkv, hd, T, pos = shape
    qkv, cos, sin, kc, vc, valid = _inputs(H, Hkv, hd, T, 1, dtype, "cuda", pos)
    ref = [t.clone() for t in (kc, vc, valid)]
    p = torch.tensor([pos], device="cuda")
    want = rope_append_reference(qkv, cos, sin, p, *ref)
    got = torch.ops.specee.rope_append(qkv, cos, sin, p, kc, vc, valid)
    # fp32: the same bits up to contraction; half dtypes: one rounding against eager's three
    eps = {torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7, torch.float32: 2 ** -22}[dtype]
    for a, b in ((got, want), (kc, ref[0])):
        assert float((a.float() - b.float()).abs().max()) <= 4 * eps * float(b.float().abs().max()) + 1e-6
    assert torch.equal(vc, ref[1]) and torch.equal(valid, ref[2])
    # more rows (prefill) take the reference, bit for bit
    qkv3, cos3, sin3, kc3, vc3, valid3 = _inputs(H, Hkv, hd, T, 3, dtype, "cuda", pos + 1)
    ref3 = [t.clone() for t in (kc3, vc3, valid3)]
    p3 = torch.tensor([0, 1, 2], device="cuda")
    assert torch.equal(torch.ops.specee.rope_append(qkv3, cos3, sin3, p3, kc3, vc3, valid3),
                       rope_append_reference(qkv3, cos3, sin3, p3, *ref3))
    assert torch.equal(kc3, ref3[0]) and torch.equal(valid3, ref3[2])
    # rows at slots of their own (tree rows: siblings share a position) take the kernel
    qkv4, cos4, sin4, kc4, vc4, valid4 = _inputs(H, Hkv, hd, T, 4, dtype, "cuda", pos + 2)
    ref4 = [t.clone() for t in (kc4, vc4, valid4)]
    p4 = torch.tensor([pos, pos + 1, pos + 1, pos + 2], device="cuda") % T
    s4 = torch.tensor([pos, pos + 1, pos + 2, pos + 3], device="cuda") % T
    want4 = rope_append_reference(qkv4, cos4, sin4, p4, *ref4, s4)
    got4 = torch.ops.specee.rope_append(qkv4, cos4, sin4, p4, kc4, vc4, valid4, s4)
    for a, b in ((got4, want4), (kc4, ref4[0])):
        assert float((a.float() - b.float()).abs().max()) <= 4 * eps * float(b.float().abs().max()) + 1e-6
    assert torch.equal(vc4, ref4[1]) and torch.equal(valid4, ref4[2])
