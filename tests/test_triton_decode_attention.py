"""`specee::decode_attention` (masked attention over a layer's valid cache prefix) against SDPA, on
CPU (reference, the Triton kernel in the interpreter) and on CUDA."""

from __future__ import annotations

import textwrap

import pytest
import torch
from conftest import run_in_triton_interpreter

from specee_compile.ops import decode_attention_reference

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (CI has none)")


def _inputs(H, Hkv, S, T, hd, pos, dtype, device, seed, holes=True):
    """q [H, 1, hd]; k, v views [Hkv, S, hd] of a [Hkv, T, hd] cache; valid with holes (skipped
    positions of an early-exited token) before pos; entries after pos hold stale data."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(H, 1, hd, generator=g).to(dtype).to(device)
    kc = torch.randn(Hkv, T, hd, generator=g).to(dtype).to(device)
    vc = torch.randn(Hkv, T, hd, generator=g).to(dtype).to(device)
    valid = torch.ones(S, dtype=torch.bool)
    if holes:
        valid[torch.randperm(pos, generator=g)[: pos // 3]] = False
    valid[pos] = True
    valid[pos + 1 :] = torch.rand(S - pos - 1, generator=g) < 0.5  # beyond pos: masked by causality
    return q, kc[:, :S], vc[:, :S], valid.to(device), torch.tensor([pos], device=device)


def test_reference_masks_invalid_and_future_keys():
    q, k, v, valid, pos = _inputs(4, 2, 16, 32, 8, 9, torch.float32, "cpu", 0)
    out = decode_attention_reference(q, k, v, valid, pos)
    keep = valid.clone()
    keep[10:] = False
    kk = k.repeat_interleave(2, 0)[:, keep]
    vv = v.repeat_interleave(2, 0)[:, keep]
    want = torch.softmax(q @ kk.transpose(1, 2) / 8**0.5, -1) @ vv
    assert torch.allclose(out, want, atol=1e-5)


_INTERP = textwrap.dedent(
    """
    import math, torch
    from specee_compile.ops import decode_attention_reference as ref
    from specee_compile.plugins import triton_decode_attention as A
    torch.manual_seed(0)
    for H, Hkv, S, pos in ((4, 4, 64, 40), (4, 2, 200, 150), (2, 1, 130, 129), (3, 1, 1100, 1000)):
        T, hd = S + 16, 16
        q = torch.randn(H, 1, hd); kc = torch.randn(Hkv, T, hd); vc = torch.randn(Hkv, T, hd)
        valid = torch.rand(S) < 0.7
        valid[pos] = True
        k, v = kc[:, :S], vc[:, :S]
        p = torch.tensor([pos])
        for bs, maxs in ((16, 4), (64, 16)):  # several blocks per split; one block per split
            A.BLOCK_S, A.MAX_SPLITS = bs, maxs
            A._WORKSPACES.clear()
            out = A.triton_decode_attention(q, k, v, valid, p)
            e = float((out - ref(q, k, v, valid, p)).abs().max())
            assert e < 1e-5, (H, Hkv, S, pos, bs, e)
            assert int(A._WORKSPACES[(q.device, H, hd)][1].abs().sum()) == 0  # counters reset
            # the AOTI twin (the kernel itself where one block per split serves every S, else one launch on a fixed
            # grid whose idle splits return; the caller's counters and workspace): the same bits,
            # and the counters back at zero, so the next call (and layer) can take them as they are;
            # the workspace's contents do not matter (garbage in it from the last call or anywhere)
            cnt = torch.zeros(H, dtype=torch.int32)
            ws = torch.full((A.workspace_numel(H, hd),), float("nan"))
            for _ in range(2):
                got = torch.ops.specee_aoti.decode_attention(q, k, v, valid, p, cnt, ws)
                assert torch.equal(got, out), (H, S, bs)
                assert int(cnt.abs().sum()) == 0
    print("INTERP_OK")
    """
)


def test_kernel_logic_in_triton_interpreter_on_cpu():
    """The kernel against SDPA, and its AOTI twin (`specee_aoti::decode_attention`) against the kernel."""
    run_in_triton_interpreter(_INTERP)


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("H,Hkv,S,pos,hd", [(32, 32, 320, 300, 128), (9, 3, 128, 70, 64), (8, 2, 4096, 4000, 128)])
def test_cuda_kernel_matches_sdpa(dtype, H, Hkv, S, pos, hd):
    from specee_compile.plugins.triton_decode_attention import triton_decode_attention

    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    for seed in range(3):  # repeated calls: the merge counters reset themselves
        a = _inputs(H, Hkv, S, S + 64, hd, pos, dtype, "cuda", seed)
        got = triton_decode_attention(*a)
        want = decode_attention_reference(*[t.float() if t.is_floating_point() else t for t in a])
        assert got.dtype == dtype and got.shape == (H, 1, hd)
        assert float((got.float() - want).abs().max()) < tol


@cuda
def test_registered_op_dispatches_and_more_rows_fall_back():
    from specee_compile.ops import register_cuda_kernels
    from specee_compile.plugins.triton_decode_attention import triton_decode_attention

    assert register_cuda_kernels()
    a = _inputs(8, 8, 128, 192, 64, 100, torch.float16, "cuda", 4)
    assert torch.equal(torch.ops.specee.decode_attention(*a), triton_decode_attention(*a))
    q3 = torch.randn(8, 3, 64, dtype=torch.float16, device="cuda")
    p3 = torch.tensor([98, 99, 100], device="cuda")
    args = (q3, a[1], a[2], a[3], p3)
    assert torch.equal(torch.ops.specee.decode_attention(*args), decode_attention_reference(*args))


def test_aoti_twin_state_is_a_declared_mutated_input_of_the_package():
    """The one-row layer package (`layer1.pt2`) takes the attention's state as inputs after v_cache (the
    arrival counters and the split workspace), and the export sees the op mutate them: Inductor then
    updates them in place (no copy and no allocation per call), and the package's signature says the caller
    owns state. (The traced graph only: no compile here.)"""
    pytest.importorskip("triton")
    from transformers import LlamaConfig, LlamaForCausalLM

    from specee_compile.backends.aoti_export import RowLayerFn, attended_dim
    from specee_compile.model_step import extract_weights
    from specee_compile.plugins.triton_decode_attention import workspace_numel

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128)
    w = extract_weights(LlamaForCausalLM(cfg).eval(), 64)
    T, lw = 65, [t for t in w.layers[0].as_tuple() if t is not None]
    args = (torch.randn(1, 1, 64), torch.tensor([5]), torch.arange(32), torch.zeros(T, dtype=torch.bool), w.cos, w.sin,
            torch.zeros(2, T, 16), torch.zeros(2, T, 16), torch.zeros(4, dtype=torch.int32),
            torch.empty(workspace_numel(4, 16)), *lw)
    S = attended_dim(64, 64)  # the export's own choice for max_len 64, bucket 64: 16 * Dim
    ds = (None, None, {0: S}) + (None,) * 7 + ((None,) * len(lw),)
    fn = RowLayerFn(w.spec, False, ("attn",), ops="specee_aoti")
    ep = torch.export.export(fn, args, dynamic_shapes=ds, strict=False).run_decompositions()
    mutated = set(ep.graph_signature.user_inputs_to_mutate.values())
    assert {"counters", "ws", "k_cache", "v_cache", "valid"} <= mutated
    # the rows' RoPE, K/V writes and validity mark are the rope_append twin's one kernel, not plain cache ops
    code = ep.graph_module.print_readable(print_output=False)
    assert "specee_aoti.rope_append" in code and "index_copy" not in code and "index_fill" not in code
    # the attended length stays a multiple of 16 in the traced graph (Inductor's divisibility hint for S)
    keys = next(n for n in ep.graph.nodes if n.op == "placeholder" and n.name == "keys")
    expr = keys.meta["val"].shape[0].node.expr
    assert expr.is_Mul and 16 in expr.args, expr


def test_attended_dim_is_a_multiple_of_16_only_where_every_bucket_length_is():
    """`attended_dim`: 16 * Dim where the runner's lengths (bucket multiples, or max_len) are all multiples
    of 16 and at least 32; a plain Dim otherwise (max_len off 16, a bucket off 16, lengths under 32)."""
    import sympy

    from specee_compile.backends.aoti_export import attended_dim

    for max_len, bucket in ((1000, 64), (1024, 24), (16, 16)):
        d = attended_dim(max_len, bucket)
        assert not hasattr(d, "root") and d.max == max_len and d.min == 1, (max_len, bucket)
    derived = attended_dim(1024, 64)  # 16 * S16
    assert derived.fn(sympy.Integer(3)) == 48 and derived.root.max == 64 and derived.root.min == 2
