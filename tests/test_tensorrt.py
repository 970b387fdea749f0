"""TensorRT engine build (TensorRT-RTX ahead of time, no GPU) and the exit-score plugin's AOT PTX.

Engines built here target SM80/86/89/120; TensorRT-RTX cannot target Hopper, so nothing here runs an
engine. The plugin path needs full TensorRT (not installable here): only its PTX is checked.
"""

from __future__ import annotations

import sys

import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")

from transformers import LlamaConfig, LlamaForCausalLM

from specee_compile.backends.onnx_export import count_if_nodes, export_onnx
from specee_compile.config import Settings
from specee_compile.errors import BackendUnavailable, SpecEEError
from specee_compile.program import ExitPoint, Predictors, SpecEEProgram

L, K = 3, 4


def _have(mod: str) -> bool:
    try:
        __import__(mod)
        return True
    except Exception:  # noqa: BLE001
        return False


HAVE_RTX = _have("tensorrt_rtx")
HAVE_TRT = _have("tensorrt")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=L,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    g = torch.Generator().manual_seed(0)
    prog = SpecEEProgram(
        num_layers=L, exit_points=[ExitPoint(0, 0.5), ExitPoint(1, 0.5)],
        predictors=Predictors(torch.randn(L, 16, 3 * K, generator=g), torch.randn(L, 16, generator=g),
                              torch.randn(L, 16, generator=g), torch.randn(L, 1, generator=g), [0, 1]),
        offline_layers=[0], num_candidates=K, draft_kind="ngram")
    out = tmp_path_factory.mktemp("trt")
    info = export_onnx(model, prog, out, Settings(max_context=256), graphs=("decode_step",), trt_exit_plugin=True,
                       progress=False)
    return out, info


@pytest.mark.skipif(not HAVE_RTX, reason="tensorrt_rtx is not installed (pip install tensorrt-rtx-cu13==1.7.1.116)")
def test_rtx_builds_decode_step_engines(exported, tmp_path):
    from specee_compile.backends.tensorrt import build_engines

    out, _ = exported
    res = build_engines(out / "decode_step.onnx", tmp_path, targets=["SM86", "sm_120"])
    assert [r["target"] for r in res] == ["SM86", "SM120"]
    for r in res:
        assert r["flavour"] == "tensorrt_rtx"
        assert (tmp_path / r["file"]).stat().st_size == r["bytes"] > 100_000
        # the nested Ifs arrive as TensorRT conditionals: one per If node
        assert r["network"]["conditionals"] == count_if_nodes(out / "decode_step.onnx") == 4
        assert r["network"]["inputs"]["k_cache_0"][1] == [2, -1, 16]  # dynamic cache length


@pytest.mark.skipif(not HAVE_RTX, reason="tensorrt_rtx is not installed")
def test_too_deep_nesting_is_refused_before_parsing(exported, tmp_path, monkeypatch):
    from specee_compile.backends import tensorrt as mod

    out, _ = exported
    assert mod._if_depth(out / "decode_step.onnx") == 2  # nested, 2 exit points
    monkeypatch.setattr(mod, "MAX_IF_DEPTH", 1)
    with pytest.raises(SpecEEError, match="structure='flat'"):
        mod.build_engines(out / "decode_step.onnx", tmp_path, targets=["SM86"])


@pytest.mark.skipif(not HAVE_RTX, reason="tensorrt_rtx is not installed")
def test_rtx_refuses_hopper(exported, tmp_path):
    from specee_compile.backends.tensorrt import build_engines

    out, _ = exported
    with pytest.raises(SpecEEError, match="Hopper"):
        build_engines(out / "decode_step.onnx", tmp_path, targets=["SM90"])


@pytest.mark.skipif(not HAVE_RTX or HAVE_TRT, reason="checks the TensorRT-RTX refusal of plugin graphs")
def test_rtx_refuses_plugin_graph_without_parsing_it(exported, tmp_path):
    from specee_compile.backends.tensorrt import build_engines

    out, _ = exported
    with pytest.raises(SpecEEError, match="full TensorRT"):
        build_engines(out / "decode_step.plugin.onnx", tmp_path, targets=["SM86"])


def test_engine_written_without_a_stream_writer(tmp_path):
    """Builders without build_serialized_network_to_stream: the one plan buffer goes to the file as is."""
    from types import SimpleNamespace

    from specee_compile.backends.tensorrt import _build_to_file

    plan = bytes(range(256)) * 40
    ok = _build_to_file(SimpleNamespace(), SimpleNamespace(build_serialized_network=lambda n, c: plan), None, None,
                        tmp_path / "a.engine")
    assert ok and (tmp_path / "a.engine").read_bytes() == plan
    failed = SimpleNamespace(build_serialized_network=lambda n, c: None)
    assert not _build_to_file(SimpleNamespace(), failed, None, None, tmp_path / "b.engine")


def test_no_tensorrt_says_how_to_install(monkeypatch):
    from specee_compile.backends import tensorrt as mod

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", None)
    with pytest.raises(BackendUnavailable, match="pip install tensorrt-rtx-cu13"):
        mod.trt_flavour()


def test_plugin_graph_has_one_plugin_node_per_exit(exported):
    import onnx

    out, info = exported
    assert "decode_step.plugin.onnx" in info["files"]
    m = onnx.load(str(out / "decode_step.plugin.onnx"), load_external_data=False)
    nodes = []

    def walk(g):
        for n in g.node:
            if n.op_type == "exit_score":
                nodes.append(n)
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g)

    walk(m.graph)
    assert len(nodes) == 2
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
    assert attrs["plugin_namespace"] == b"specee" and attrs["aot"] == 1
    assert len(nodes[0].input) == 8 and len(nodes[0].output) == 3


@pytest.mark.skipif(not _have("triton"), reason="triton is not installed: no AOT PTX for the plugin")
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_plugin_ptx_for_hopper(dtype):
    from specee_compile.plugins.trt_exit_plugin import (
        NUM_PARAMS,
        entry_params,
        plugin_ptx,
        ptx_target,
        ptxas_check,
    )

    name, ptx, launch = plugin_ptx((90, 32), dtype, k=4, hidden=576, predictor_hidden=512, eps=1e-5)
    assert f".entry {name}" in ptx
    assert ptx_target(ptx) == "sm_90a"
    assert len(entry_params(ptx, name)) == NUM_PARAMS  # exactly what TensorRT passes: 8 inputs, 3 outputs
    assert launch["grid"] == (1, 1, 1) and launch["block_x"] == 128
    ok = ptxas_check(ptx)
    assert ok in (True, None)  # None: no ptxas bundled


def test_strip_refuses_used_params():
    from specee_compile.plugins.trt_exit_plugin import strip_unused_trailing_params

    ptx = ".entry k(\n .param .u64 k_param_0,\n .param .u64 k_param_1\n)\n{\n ld.param.b64 %rd1, [k_param_1];\n}"
    with pytest.raises(ValueError, match="k_param_1"):
        strip_unused_trailing_params(ptx, "k", 1)
    unused = ptx.replace("[k_param_1]", "[k_param_0]")
    assert "k_param_1" not in strip_unused_trailing_params(unused, "k", 1)


@pytest.mark.skipif(not HAVE_TRT, reason="full TensorRT is not installed (tensorrt.plugin QDP needs TensorRT >= 10.7)")
def test_full_tensorrt_plugin_registers():
    from specee_compile.plugins.trt_exit_plugin import register

    assert register((90, 32))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not _have("triton"), reason="needs CUDA and triton")
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_plugin_ptx_runs_like_the_op(dtype):
    """The AOT PTX launched as TensorRT's QDP launcher would, against the op's eager reference."""
    from specee_compile.plugins.trt_exit_plugin import gpu_self_test

    errors = gpu_self_test(dtype)
    assert 0.02 < errors.pop("score_value") < 0.98  # not saturated: the MLP is checked too
    assert max(errors.values()) < 2e-3, errors
