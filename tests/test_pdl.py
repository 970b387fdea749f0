"""Programmatic dependent launch for the plugin kernels (`plugins/pdl.py`, SPECEE_PDL): the setting, and each
kernel compiled for sm_90 on the CPU with PDL on: it waits for the kernel before it (griddepcontrol.wait) before any
global load, store or atomic, lets the next one launch only after that wait, and carries Triton's launch_pdl
option; with PDL off neither instruction is there. Unset, the setting is `all` on sm_90+ and `0` elsewhere. On
CUDA (sm_90+) the greedy tree and dense decode give the same tokens with it on as with it off."""

from __future__ import annotations

import contextlib
import re

import pytest
import torch

from specee_compile.errors import SettingError
from specee_compile.plugins import pdl


def test_setting_is_checked(monkeypatch):
    monkeypatch.setenv("SPECEE_PDL", "0")
    assert pdl.mode() == "0" and pdl.kernel_args(torch.device("cuda")) == {} and pdl.inductor_options() == {}
    monkeypatch.setenv("SPECEE_PDL", "all")
    assert pdl.inductor_options() == {"triton.enable_pdl": True}
    assert pdl.kernel_args(torch.device("cpu")) == {}  # no PDL off CUDA
    monkeypatch.setenv("SPECEE_PDL", "ops")
    assert pdl.inductor_options() == {}
    monkeypatch.setenv("SPECEE_PDL", "1")
    with pytest.raises(SettingError, match=r"SPECEE_PDL='1': expected one of 0, ops, all"):
        pdl.mode()


@pytest.fixture
def fresh_default():
    pdl.default.cache_clear()
    pdl._capable.cache_clear()
    yield
    pdl.default.cache_clear()
    pdl._capable.cache_clear()


@pytest.mark.parametrize("cuda,capability,inductor_known,want", [
    (False, None, True, "0"),     # a CPU-only process
    (True, (8, 0), True, "0"),    # no PDL before sm_90
    (True, (9, 0), True, "all"),  # Hopper: the plugin kernels and Inductor's
    (True, (10, 0), False, "ops"),  # an Inductor whose PDL waits we do not know: the plugin kernels only
])
def test_unset_means_the_devices_default(monkeypatch, fresh_default, cuda, capability, inductor_known, want):
    """Unset, SPECEE_PDL is `all` on an sm_90+ card (measured: RESULTS.md, session 29), `0` elsewhere."""
    from torch._inductor.codegen.triton import TritonKernel

    monkeypatch.delenv("SPECEE_PDL", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    monkeypatch.setattr(torch.version, "hip", None)
    if not inductor_known:
        monkeypatch.delattr(TritonKernel, "_handle_pdl_before_access")
    assert pdl.default() == want and pdl.mode() == want
    assert (pdl.kernel_args(torch.device("cuda", 0)) != {}) == (want != "0")
    assert pdl.kernel_args(torch.device("cpu")) == {}
    monkeypatch.setenv("SPECEE_PDL", "0")  # the setting wins over the default
    assert pdl.mode() == "0" and pdl.kernel_args(torch.device("cuda", 0)) == {}
    monkeypatch.setenv("SPECEE_PDL", "sometimes")
    with pytest.raises(SettingError, match=rf"unset it for the default \({want} here\)"):
        pdl.mode()


def test_stats_say_whether_pdl_was_on(monkeypatch):
    from conftest import make_tiny_llama
    from test_tree import PROMPT, dense

    monkeypatch.setenv("SPECEE_PDL", "all")
    assert dense(make_tiny_llama(), PROMPT, 4).stats()["pdl"] is None  # off CUDA: no PDL whatever the setting


def _kernels():
    """(name, kernel, signature, constexprs) of every kernel the plugin ops launch with PDL."""
    from specee_compile.plugins.triton_decode_attention import _decode_attn_kernel
    from specee_compile.plugins.triton_exit_score import _exit_score_kernel
    from specee_compile.plugins.triton_gemv import _gemv_kernel, _rows_k_kernel, _rows_kernel, _rows_t_kernel
    from specee_compile.plugins.triton_rope_append import _rope_append_kernel
    from specee_compile.plugins.triton_topk import _topk_chunks_kernel, _topk_kernel
    from specee_compile.plugins.triton_tree_attention import _tree_attn_kernel

    h = "*fp16"
    lin = {"x_ptr": h, "w_ptr": h, "s_ptr": "*fp32", "res_ptr": h, "nw_ptr": h, "y_ptr": h}
    return [
        ("gemv", _gemv_kernel, {**lin, "ws_ptr": "*fp32", "ss_ptr": "*fp32", "cnt_ptr": "*i32", "N": "i32",
                                "eps": "fp32"},
         {"K": 4096, "PRO": 1, "HAS_RES": True, "BLOCK_N": 4, "BLOCK_K": 1024, "SPLIT": 2, "W8": False}),
        ("rows", _rows_kernel, {**lin, "M": "i32", "N": "i32", "eps": "fp32"},
         {"K": 4096, "XS": 4096, "PRO": 0, "HAS_RES": False, "MP": 16, "IEEE": False, "BLOCK_N": 32,
          "BLOCK_K": 128, "W8": False}),
        ("rows_t", _rows_t_kernel, {**lin, "ws_ptr": "*fp32", "cnt_ptr": "*i32", "M": "i32", "N": "i32",
                                    "eps": "fp32"},
         {"K": 4096, "XS": 4096, "PRO": 0, "HAS_RES": True, "MP": 32, "BLOCK_N": 64, "BLOCK_K": 128, "SPLIT": 2,
          "W8": False, "PREC": ""}),
        ("rows_k", _rows_k_kernel, {**lin, "M": "i32", "N": "i32", "eps": "fp32"},
         {"K": 576, "XS": 1152, "PRO": 2, "HAS_RES": True, "MP": 32, "BLOCK_N": 4, "BLOCK_K": 1024, "RB": 4,
          "W8": False}),
        ("tree_attention", _tree_attn_kernel,
         {"q_ptr": h, "k_ptr": h, "v_ptr": h, "valid_ptr": "*u8", "mask_ptr": "*u8", "o_ptr": h, "ws_ptr": "*fp32",
          "cnt_ptr": "*i32", **{n: "i32" for n in ("R", "S")}, "sm_scale": "fp32",
          **{n: "i32" for n in ("stride_qh", "stride_qr", "stride_kh", "stride_ks", "stride_vh", "stride_vs",
                                "stride_mr", "stride_ms")}},
         {"HD": 64, "REP": 3, "BR": 32, "BLOCK_S": 64, "PER": 2, "NSP": 4, "PREC": ""}),
        ("decode_attention", _decode_attn_kernel,
         {"q_ptr": h, "k_ptr": h, "v_ptr": h, "valid_ptr": "*u8", "pos_ptr": "*i64", "o_ptr": h, "ws_ptr": "*fp32",
          "cnt_ptr": "*i32", "S": "i32", "sm_scale": "fp32",
          **{n: "i32" for n in ("stride_kh", "stride_ks", "stride_vh", "stride_vs")}},
         {"HD": 64, "REP": 3, "BLOCK_S": 64, "BLOCKS_PER_SPLIT": 2, "MAX_SPLITS": 16}),
        ("rope_append", _rope_append_kernel,
         {"qkv_ptr": h, "cos_ptr": h, "sin_ptr": h, "pos_ptr": "*i64", "slot_ptr": "*i64", "k_ptr": h, "v_ptr": h,
          "valid_ptr": "*u8", "q_out_ptr": h,
          **{n: "i32" for n in ("stride_kh", "stride_ks", "stride_vh", "stride_vs", "rows", "stride_pos",
                                "stride_slot")}},
         {"H": 9, "HKV": 3, "HD": 64}),
        ("exit_score", _exit_score_kernel,
         {"h_ptr": h, "nw_ptr": h, "rows_ptr": h, "pprev_ptr": "*fp32", "w1_ptr": "*fp32", "b1_ptr": "*fp32",
          "w2_ptr": "*fp32", "b2_ptr": "*fp32", "score_ptr": "*fp32", "z_ptr": "*fp32", "p_ptr": "*fp32",
          "ctrl_ptr": "*u8", "hexit_ptr": h, "eps": "fp32", "threshold": "fp32", "layer": "i32"},
         {"D": 576, "HM": 512, "ALIVE_OFF": 0, "FORCED_OFF": 1, "EXIT_OFF": 2, "K": 4, "KP": 4, "BLOCK_D": 512,
          "BLOCK_H": 128, "ROUND_X": True, "ROUND_HN": True, "HN_BF16": False, "MODE": 1, "GATE_OFF": 3}),
        ("topk", _topk_kernel, {"x_ptr": h, "v_ptr": h, "i_ptr": "*i64", "N": "i32", "stride": "i32"},
         {"K": 8, "BLOCK": 512}),
        ("topk_chunks", _topk_chunks_kernel,
         {"x_ptr": h, "v_ptr": h, "i_ptr": "*i64", "wv_ptr": "*fp32", "wi_ptr": "*i32", "cnt_ptr": "*i32",
          "N": "i32", "stride": "i32"},
         {"K": 8, "CHUNK": 512, "NCH": 16, "MERGE": 128}),
    ]


@pytest.mark.parametrize("name", ["gemv", "rows", "rows_t", "rows_k", "tree_attention", "decode_attention",
                                  "rope_append", "exit_score", "topk", "topk_chunks"])
def test_each_kernel_waits_before_any_memory_access_and_launches_pdl_for_hopper(name):
    triton = pytest.importorskip("triton")
    from triton.backends import backends
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if "nvidia" not in backends:
        pytest.skip("this triton has no NVIDIA backend")
    _, kernel, sig, consts = next(k for k in _kernels() if k[0] == name)

    def compile_(on: bool, **more):
        c = {**consts, "PDL": on, **more}
        src = ASTSource(kernel, {**sig, **{k: "constexpr" for k in c}}, c, {})
        return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": 4, "num_stages": 2, "launch_pdl": on})

    on, off = compile_(True), compile_(False)
    body = _body(on)
    wait = body.index("griddepcontrol.wait")
    assert wait < _first(body, r"(ld|st|atom|red|cp\.async)\.global"), f"{name}: a global access before the wait"
    assert wait < body.index("griddepcontrol.launch_dependents")
    sass = _sass(on)  # and as ptxas left it: the kernels a package embeds wait through a pure asm value
    if sass is not None:  # (pdl.wait_token), which only the data dependence keeps ahead of the accesses
        wait = sass.index("ACQBULK")
        assert wait < _first(sass, r"(LDG|STG|ATOMG?|RED|LDGSTS)\b"), f"{name}: a global access before the wait"
        assert wait < sass.index("PREEXIT")
    assert on.metadata.launch_pdl and not off.metadata.launch_pdl
    assert "griddepcontrol" not in off.asm["ptx"]
    if "EARLY_W" in kernel.arg_names:  # as launched with PDL: the first weight tile's loads come before the wait
        early = _body(compile_(True, EARLY_W=True))
        wait = early.index("griddepcontrol.wait")
        assert _first(early, r"ld\.global") < wait < _first(early, r"(st|atom|red)\.global")


def _inductor_pdl_sources(monkeypatch, fn, *args) -> list[str]:
    """The Triton kernels Inductor generates for fn(*args) with its PDL codegen on, on the CPU: Inductor's Triton
    backend for the CPU writes them (its PDL codegen forced on, as it is for sm_90+); compiling them then fails here
    (no Triton CPU backend), after their source was kept."""
    pytest.importorskip("triton")
    import torch._dynamo
    import torch._inductor.config as cfg
    import torch.utils._triton as tu
    from torch._inductor.codegen import triton as it

    monkeypatch.setattr(it.TritonKernel, "_enable_pdl_codegen", staticmethod(lambda: True))
    for mod in (tu, it):  # (it asks the active GPU driver for a hash; there is none)
        monkeypatch.setattr(mod, "triton_hash_with_backend", lambda: "cpu-test", raising=False)
    sources: list[str] = []
    codegen = it.TritonKernel.codegen_kernel

    def keep(self, *a, **k):
        src = codegen(self, *a, **k)
        sources.append(src)
        return src

    monkeypatch.setattr(it.TritonKernel, "codegen_kernel", keep)
    torch._dynamo.reset()
    # (Inductor's own patch: its config module is not restored correctly by monkeypatch)
    with cfg.patch({"cpu_backend": "triton", "compile_threads": 1, "triton.enable_pdl": True}), \
            contextlib.suppress(Exception):
        torch.compile(fn)(*args)
    torch._dynamo.reset()
    return sources


def test_inductor_kernels_wait_before_any_memory_access_under_all(monkeypatch):
    """SPECEE_PDL=all holds Inductor's kernels to the plugin kernels' contract: `gdc_wait` before the first global
    load or store, `gdc_launch_dependents` only after it. Inductor's own placement leaves a kernel that only stores
    (here `torch.ones`) with neither, so the kernel after it could read ahead of an earlier one still running."""

    def f(x, y, z):  # a reduction in one block, one in a loop (its wait is hoisted before the loop), a fill
        return (x + 1).sum(-1) * y, (z * z).sum(), torch.ones(4)

    def check(src: str) -> bool:
        body = src[re.search(r"^def ", src, re.MULTILINE).start():].splitlines()  # (named later: def KERNEL_NAME)
        first = next(i for i, ln in enumerate(body) if re.search(r"tl\.(load|store|atomic)", ln))
        waits = [i for i, ln in enumerate(body) if "gdc_wait" in ln]
        launches = [i for i, ln in enumerate(body) if "gdc_launch_dependents" in ln]
        return bool(waits) and waits[0] < first and all(i > waits[0] for i in launches)

    from torch._inductor.codegen.triton import TritonKernel

    inductors = getattr(TritonKernel, "_specee_inductor_placement", TritonKernel._handle_pdl_before_access)
    monkeypatch.setattr(TritonKernel, "_handle_pdl_before_access", inductors)
    args = (torch.randn(8, 64), torch.randn(8), torch.randn(1 << 18))
    plain = _inductor_pdl_sources(monkeypatch, f, *args)
    assert len(plain) >= 3 and any("for r0_offset in" in src for src in plain) and not all(map(check, plain))  # Inductor's placement: the store-only kernel waits not
    monkeypatch.setenv("SPECEE_PDL", "all")
    pdl._inductor_waits_first.cache_clear()
    assert pdl.inductor_options() == {"triton.enable_pdl": True}  # installs the wait-first placement
    assert TritonKernel._handle_pdl_before_access is pdl.wait_before_access
    held = _inductor_pdl_sources(monkeypatch, f, *args)
    assert len(held) >= 3 and all(map(check, held)), "\n\n".join(held)


def _body(kernel) -> str:
    ptx = kernel.asm["ptx"]
    return ptx[ptx.index(".entry"):]


def _sass(kernel) -> str | None:
    """The kernel's SASS instructions, one per line, through the cuobjdump Triton ships (None without it)."""
    import os
    import subprocess
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.access(tool, os.X_OK):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(kernel.asm["cubin"])
        out = subprocess.run([tool, "-sass", cubin], capture_output=True, text=True, check=True).stdout
    return "\n".join(m.group(1) for m in re.finditer(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z]\S*)", out))


def _first(body: str, pattern: str) -> int:
    return min(m.start() for m in re.finditer(r"\b" + pattern, body))


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="needs CUDA sm_90+ (programmatic dependent launch)")
@pytest.mark.parametrize("mode", ["ops", "all"])
def test_cuda_greedy_tree_and_dense_with_pdl_equal_dense_without(monkeypatch, mode):
    from conftest import make_tiny_llama
    from test_tree import PROMPT, _fixed_vs_host, dense

    model = make_tiny_llama()
    monkeypatch.setenv("SPECEE_PDL", "0")
    ref = dense(model, PROMPT * 3, 40, device="cuda", backend="inductor")
    monkeypatch.setenv("SPECEE_PDL", mode)
    got = dense(model, PROMPT * 3, 40, device="cuda", backend="inductor")
    assert got.token_ids == ref.token_ids
    assert got.stats()["pdl"] == mode and ref.stats()["pdl"] == "0"
    out = _fixed_vs_host(model, device="cuda", backend="inductor", lookup=True, prompt=PROMPT * 3, tree_budget=12,
                         tree_depth=4, tree_topk=4)
    assert out["fixed"][0].token_ids == ref.token_ids and out["fixed"][0].verify_steps > 0


def test_a_bad_setting_is_one_line_before_any_work(monkeypatch, capsys, tiny_model_dir):
    from specee_compile.cli import main

    monkeypatch.setenv("SPECEE_PDL", "yes")
    capsys.readouterr()
    rc = main(["generate", str(tiny_model_dir), "hi", "--device", "cuda"])
    err = capsys.readouterr().err
    assert rc == 2 and "SPECEE_PDL='yes': expected one of 0, ops, all" in err and len(err.strip().splitlines()) == 1


def test_all_on_a_torch_whose_inductor_pdl_is_unknown_is_refused_in_one_line(monkeypatch, capsys, tiny_model_dir):
    """Under `all` the plugin replaces how Inductor places its waits; a torch without that method is refused
    before any work, not run with Inductor's unknown placement."""
    from torch._inductor.codegen.triton import TritonKernel

    from specee_compile.cli import main

    monkeypatch.delattr(TritonKernel, "_handle_pdl_before_access")
    pdl._inductor_waits_first.cache_clear()
    monkeypatch.setenv("SPECEE_PDL", "all")
    capsys.readouterr()
    rc = main(["generate", str(tiny_model_dir), "hi", "--device", "cuda"])
    err = capsys.readouterr().err
    assert rc == 2 and "places its PDL waits in a way this plugin does not know" in err and "SPECEE_PDL=ops" in err
    assert len(err.strip().splitlines()) == 1
    pdl._inductor_waits_first.cache_clear()


_INTERP_EARLY = """
import torch, triton
from specee_compile.plugins.triton_gemv import PROLOGUES, _gemv_kernel, _rows_t_kernel, _rows_workspace, _workspace
from specee_compile.plugins.triton_gemv import rows_args
torch.manual_seed(0)
for pro in ("none", "rmsnorm", "silu_mul"):
    n, k = 40, 96
    kin = 2 * k if pro == "silu_mul" else k
    for dt in (torch.float16, torch.float32):
        w = (torch.randn(n, k) * 0.1).to(dt)
        nw = (1 + 0.1 * torch.randn(k)).to(dt)
        r = torch.randn(1, 1, n).to(dt)
        x = (torch.randn(1, 1, kin) * 2).to(dt)
        for bn, bk, sp in ((16, 32, 1), (8, 16, 3)):  # several K blocks; split-K
            ys = []
            for early in (False, True):
                y = torch.full((1, 1, n), float("nan"), dtype=dt)
                _gemv_kernel[(triton.cdiv(n, bn), sp)](x, w, w, r, nw, y, *_workspace(torch.device("cpu"), n), n,
                                                       1e-5, K=k, PRO=PROLOGUES[pro], HAS_RES=True, BLOCK_N=bn,
                                                       BLOCK_K=bk, SPLIT=sp, W8=False, EARLY_W=early)
                ys.append(y)
            assert torch.equal(ys[0], ys[1]) and not ys[0].isnan().any(), ("gemv", pro, dt, bn, bk, sp)
        xr = (torch.randn(1, 5, kin) * 2).to(dt)
        for bn, bk, sp in ((16, 32, 1), (16, 16, 2)):
            ys = []
            for early in (False, True):
                y, args, kw = rows_args(xr, w, None, nw, 1e-5, PROLOGUES[pro])
                kw.pop("IEEE")
                ws, cnt = _rows_workspace(xr.device, n, kw["MP"])
                _rows_t_kernel[(triton.cdiv(n, bn), sp)](*args[:6], ws, cnt, *args[6:], **kw, BLOCK_N=bn, BLOCK_K=bk,
                                                          SPLIT=sp, PREC="ieee" if dt == torch.float32 else "",
                                                          EARLY_W=early)
                ys.append(y)
            assert torch.equal(ys[0], ys[1]) and not ys[0].isnan().any(), ("rows_t", pro, dt, bn, bk, sp)
print("INTERP_OK")
"""


def test_the_first_weight_tile_early_sums_the_same_blocks_in_the_same_order():
    """EARLY_W (what PDL launches run: the first K block's weight tile before the wait) gives the same bits as the
    loop alone, in the Triton interpreter: the one-row kernel and the turned rows kernel, every prologue, fp16 and
    fp32, several K blocks, whole-K and split-K."""
    from conftest import run_in_triton_interpreter

    run_in_triton_interpreter(_INTERP_EARLY)


@pytest.mark.parametrize("env, capable, want", [(None, True, "all"), ("0", True, "0"), ("ops", True, "0"),
                                                 ("all", True, "all"), ("all", False, "0")])
def test_packages_take_pdl_where_the_mode_is_all(monkeypatch, env, capable, want):
    """Packages are compiled with PDL's waits where the mode is `all` (set, or the default of an sm_90+ machine) and
    the device has PDL; the manifest then names the kernels that wait, and the export's Inductor options carry the
    wait-first placement."""
    if env is None:
        monkeypatch.delenv("SPECEE_PDL", raising=False)
        monkeypatch.setattr(pdl, "default", lambda: "all")  # an sm_90+ machine's
    else:
        monkeypatch.setenv("SPECEE_PDL", env)
    monkeypatch.setattr(pdl, "_capable", lambda device: capable)
    dev = torch.device("cuda")
    assert pdl.package_mode(dev) == want
    assert pdl.twin_args(dev, early_w=True) == {"PDL": want == "all", "EARLY_W": want == "all"}
    assert pdl.package_inductor_options(dev) == ({"triton.enable_pdl": True} if want == "all" else {})
    monkeypatch.setenv("SPECEE_PDL", "1")
    with pytest.raises(SettingError, match="SPECEE_PDL='1'"):
        pdl.package_mode(dev)


LAUNCH_OPTIONS = {"num_warps", "num_stages", "launch_pdl"}


def _twin_launches(monkeypatch, S: int) -> list:
    """(kernel, {argument: value}) of each AOTI twin's launch on small CPU tensors, recorded at `wrap_triton`,
    with PDL as the package asks (the device patched to have it)."""
    monkeypatch.setattr(pdl, "_capable", lambda device: True)
    from specee_compile.plugins import triton_decode_attention as att
    from specee_compile.plugins import triton_gemv as gemv
    from specee_compile.plugins import triton_rope_append as rope

    launches = []

    class Recorded:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kw):
                launches.append((self.kernel, {**dict(zip(self.kernel.arg_names, args)),
                                               **{k: v for k, v in kw.items() if k not in LAUNCH_OPTIONS}}))
            return launch

    for mod in (att, gemv, rope):
        monkeypatch.setattr(mod, "wrap_triton", Recorded)
    H, Hkv, hd, K, N = 4, 2, 16, 32, 48
    gemv._aoti_fused_linear(torch.randn(1, K), torch.randn(N, K))
    cache = lambda: torch.zeros(Hkv, S, hd)
    rope._aoti_rope_append(torch.randn(1, 1, (H + 2 * Hkv) * hd), torch.randn(S, hd), torch.randn(S, hd),
                           torch.tensor([3]), cache(), cache(), torch.zeros(S, dtype=torch.bool))
    att._aoti_attention(torch.randn(H, 1, hd), cache(), cache(), torch.ones(S, dtype=torch.bool), torch.tensor([3]),
                        torch.zeros(H, dtype=torch.int32), torch.zeros(att.workspace_numel(H, hd)))
    return launches


@pytest.mark.parametrize("S", [64, 64 * 16 + 1])  # the twin's two kernels: one block per split, and the fixed grid
@pytest.mark.parametrize("mode", ["0", "all"])
def test_the_aoti_twins_name_every_constexpr_of_their_kernels(monkeypatch, S, mode):
    """An AOTInductor package's launch of a user kernel counts its arguments: one short by a defaulted constexpr
    (PDL, EARLY_W) fails Inductor's autotuning block on the GPU ("launcher() missing ... '_grid_1'"). Each twin's
    launch, recorded here on the CPU, names every argument of its kernel, with PDL as the package asks, and each
    kernel that takes PDL is one the manifest names as waiting."""
    monkeypatch.setenv("SPECEE_PDL", mode)
    launches = _twin_launches(monkeypatch, S)
    assert len(launches) == 3
    for kernel, args in launches:
        name = kernel.fn.__name__
        assert sorted(args) == sorted(kernel.arg_names), name
        takes_pdl = "PDL" in kernel.arg_names
        assert args.get("PDL") == (mode == "all" if takes_pdl else None), name
        assert takes_pdl == any(p in name for p in pdl.PACKAGE_WAITING_KERNELS), name


def test_inductor_reads_what_each_twin_writes_under_pdl(monkeypatch):
    """Inductor functionalizes a package's Triton launch by reading the kernel's TTIR for the tensors it writes.
    Where it cannot (an asm statement with side effects, as Triton's `gdc_wait`) it assumes the launch writes every
    input, and the package clones each one per call, the weights and the cache included: session 31's H100 run,
    the runner at 0.40x Python. Under PDL each twin's launch reads as writing just what it writes without PDL
    (its kernels wait through `pdl.wait_token`). Torch's own analysis, on the CPU: a stand-in driver names sm_90."""
    triton = pytest.importorskip("triton")
    from torch._higher_order_ops import triton_kernel_wrap as tkw
    from triton.backends import backends
    from triton.backends.compiler import GPUTarget

    if "nvidia" not in backends:
        pytest.skip("this triton has no NVIDIA backend")

    class Sm90:
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    monkeypatch.setattr(triton.runtime.driver, "_active", Sm90())
    written = {}
    for mode in ("0", "all"):
        monkeypatch.setenv("SPECEE_PDL", mode)
        for kernel, args in _twin_launches(monkeypatch, 64):
            tensors = {k: v for k, v in args.items() if isinstance(v, torch.Tensor)}
            consts = {k: v for k, v in args.items() if k not in tensors}
            idx, cidx = tkw.kernel_side_table.add_kernel(kernel), tkw.kernel_side_table.add_constant_args(consts)
            written[mode, kernel.fn.__name__] = sorted(tkw.get_mutated_tensors(idx, cidx, tensors, {}))
    assert written["0", "_gemv_kernel"] == ["y_ptr"]
    assert written["0", "_rope_append_kernel"] == sorted(["k_ptr", "v_ptr", "valid_ptr", "q_out_ptr"])
    assert written["0", "_decode_attn_kernel"] == sorted(["o_ptr", "ws_ptr", "cnt_ptr"])
    for name in ("_gemv_kernel", "_rope_append_kernel", "_decode_attn_kernel"):
        assert written["all", name] == written["0", name], name
