"""`--draft-dtype` (draft/eagle.py `EagleDraft.cast`): an fp32 model's EAGLE draft computing in 16 bits. Only the
candidates can change: the greedy tree (host step and fixed program) and lossless SpecEE stay dense greedy's. The
cast leaves the base model and the draft's rotary angles alone, and the stats say what the draft ran in."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama
from test_draft import draft, tiny_model  # noqa: F401  # fixtures
from test_draft_quant import PROMPT, _fresh

from specee_compile.config import Settings
from specee_compile.draft.eagle import DeviceEagleSource, EagleSource
from specee_compile.errors import SpecEEError


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("program", ["host", "fixed"])
def test_greedy_tree_with_a_16_bit_draft_equals_dense(tiny_model_dir, program, dtype):
    from specee_compile.api import build_decoder
    from specee_compile.models import load_model

    loaded = load_model(str(tiny_model_dir))
    base = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
    dense = build_decoder(loaded, Settings(max_new_tokens=30)).generate(PROMPT)
    d = _fresh(loaded.model)
    inv_freq = d.rotary.inv_freq.clone()
    s = Settings(max_new_tokens=30, speculate="tree", tree_program=program, draft_dtype=dtype, tree_budget=12,
                 tree_depth=4, tree_topk=4)
    dec = build_decoder(loaded, s, draft=EagleSource(d, k=4))
    res = dec.generate(PROMPT)
    assert res.token_ids == dense.token_ids and res.verify_steps > 0
    assert res.accepted_per_step > 1  # the draft still proposes tokens the target accepts
    assert res.stats()["draft_dtype"] == dtype and dense.stats()["draft_dtype"] is None
    want = getattr(torch, dtype)
    assert {d.fc.weight.dtype, d.head_rows.dtype, d.embed_weight.dtype, d.fused_layers()[0].wqkv.dtype} == {want}
    assert d.rotary.inv_freq.dtype == inv_freq.dtype and torch.equal(d.rotary.inv_freq, inv_freq)
    d.use_cpu_gemm("onednn")  # the CPU matmul library timed fp32: a 16-bit draft keeps F.linear
    assert d._gemm is None
    for n, p in loaded.model.named_parameters():  # the target is untouched
        assert p.dtype == torch.float32 and torch.equal(p, base[n]), n


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("quant", ["none", "int8", "auto"])
def test_cuda_fixed_tree_with_a_16_bit_draft_equals_dense(tiny_model_dir, quant):
    """On CUDA the fp32 target verifies in the captured fixed program while its draft's levels run the 16-bit
    rows ops (and, with int8, the int8 pairs): dense greedy's tokens. auto (the default) takes int8 here: a
    16-bit draft on CUDA (`Settings.draft_quant_for`)."""
    from specee_compile.api import build_decoder
    from specee_compile.models import load_model

    loaded = load_model(str(tiny_model_dir), device="cuda")
    base = {"max_new_tokens": 40, "device": "cuda", "backend": "inductor"}
    dense = build_decoder(loaded, Settings(**base)).generate(PROMPT * 3)
    s = Settings(**base, speculate="tree", draft_dtype="float16", draft_quant=quant, tree_guard=False,
                 tree_budget=12, tree_depth=4, tree_topk=4)
    dec = build_decoder(loaded, s, draft=EagleSource(_fresh(loaded.model), k=4))
    assert dec.draft._dt == torch.float16
    for _ in range(2):  # the second call replays the captured graphs
        res = dec.generate(PROMPT * 3)
        assert res.token_ids == dense.token_ids and res.verify_steps > 0 and res.draft_dtype == "float16"
        assert dec.tree._fixed_on and res.draft_quant == ("none" if quant == "none" else "int8")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_draft_of_a_model_loaded_on_the_host_follows_it_to_the_device(tiny_model_dir):
    """`build_decoder` on a model loaded on the host with Settings(device="cuda"), as the API's docstring shows: the
    segments move the model and the EAGLE draft follows, head and buffers (session 31: `cpp_bench`'s paper mode
    failed on an index across devices in the draft's device step). The same tokens and exits as the model and
    draft loaded on the device, and lossless: dense greedy's."""
    from test_tree import always_exit_program

    from specee_compile.api import build_decoder
    from specee_compile.models import load_model

    s = Settings(max_new_tokens=30, device="cuda", backend="inductor", specee=True, mode="lossless",
                 kv_policy="backfill", min_exit_layer=1, exit_cost_check=False)
    runs = []
    for device in ("cpu", "cuda"):
        loaded = load_model(str(tiny_model_dir), device=device)
        L = loaded.config.num_hidden_layers
        dec = build_decoder(loaded, s, program=always_exit_program(L, 4), draft=EagleSource(_fresh(loaded.model), k=4))
        assert dec.draft.draft.fc.weight.device.type == "cuda"
        runs.append(dec.generate(PROMPT))
    dense = build_decoder(loaded, s.replace(specee=False)).generate(PROMPT)
    assert (runs[0].token_ids, runs[0].exit_layers) == (runs[1].token_ids, runs[1].exit_layers)
    assert runs[0].token_ids == dense.token_ids and runs[0].avg_layers < L


def test_lossless_specee_and_an_int8_draft_in_16_bits_equal_dense():
    """The host SpecEE source (built before the cast) re-allocates its buffers; int8 rounds the cast weights."""
    from test_tree import always_exit_program, dense

    from specee_compile.api import prepare_draft
    from specee_compile.backends import make_segments
    from specee_compile.runtime.decoder import Decoder

    model = make_tiny_llama(num_hidden_layers=6)
    ref = dense(model, PROMPT, 30)
    src = EagleSource(_fresh(model), k=4)
    s = Settings(max_new_tokens=30, specee=True, mode="lossless", kv_policy="backfill", min_exit_layer=2,
                 exit_cost_check=False, draft_dtype="bfloat16", draft_quant="int8")
    prepare_draft(src, s)
    assert src._dt == src._feats.dtype == src._k[0].dtype == src._extra_rows.dtype == torch.bfloat16
    assert src.draft.quant == "int8"
    prog = always_exit_program(6, 4)
    res = Decoder(make_segments(model, s, prog), s, program=prog, draft=src).generate(PROMPT)
    assert res.token_ids == ref.token_ids and res.avg_layers < 6
    assert res.draft_dtype == "bfloat16" and res.draft_quant == "int8"


def test_a_device_source_built_before_the_cast_proposes_as_one_built_after(tiny_model):  # noqa: F811
    """`retype` on the device source (its buffers, bound weights and rotary tables follow the cast): the same
    proposals, context vocabulary included, as a device source built on the cast draft."""
    from test_device_draft import _steps

    from specee_compile.api import prepare_draft

    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 256, (40,), generator=g).tolist()
    hid = torch.randn(40, 64, generator=g)
    d = _fresh(tiny_model, torch.arange(128), scale=0.2)
    early = DeviceEagleSource(d, k=4, max_len=64, fused_ops=False)
    prepare_draft(early, Settings(speculate="tree", draft_dtype="bfloat16"))
    assert early._dt == early._k[0].dtype == early._extra_rows.dtype == early._cos.dtype == torch.bfloat16
    assert early._lw[0][1].dtype == torch.bfloat16  # wqkv
    want = _steps(DeviceEagleSource(d, k=4, max_len=64, fused_ops=False), ids, hid, 8, 24, device_path="ahead")
    assert _steps(early, ids, hid, 8, 24, device_path="ahead") == want


def test_a_cast_after_quantizing_is_refused(tiny_model):  # noqa: F811
    """(The flag's refusals where no draft runs: tests/test_draft_quant.py.)"""
    d = _fresh(tiny_model)
    d.quantize("int8")
    with pytest.raises(SpecEEError, match="cast a draft before quantizing"):
        d.cast(torch.float16)
