"""TensorRT engines from the exported ONNX graphs.

`build_engines(onnx_path, out_dir, targets=None)` parses one graph (decode_step.onnx's nested `If`s
become TensorRT conditional layers) and serializes an engine per target:

* full TensorRT (`import tensorrt`, >= 10): the standard builder / ONNX parser /
  `build_serialized_network` path, one engine for the GPU of this machine (TensorRT engines are
  specific to the GPU model they are built on). Written against the documented API, but *unverified*
  here: full TensorRT cannot be installed in this environment (ENVIRONMENT.md).
* TensorRT-RTX (`import tensorrt_rtx`, PyPI `tensorrt-rtx-cu13`): ahead-of-time builds without a GPU
  for the compute capabilities TensorRT-RTX supports (SM75, SM80 A100/A30, SM86 RTX 30xx/A10/A40,
  SM89 RTX 40xx/L4/L40, SM120 RTX 50xx/RTX PRO Blackwell, SM121 GB10), chosen with
  `IBuilderConfig.set_compute_capability`. TensorRT-RTX does NOT support Hopper (SM90: H100, H200) or
  datacenter Blackwell (SM100): those engines cannot run on our GPU machine; deserializing one there
  fails with "compute capability 9.0 ... not supported".

Dynamic axes (cache length T, prompt length P, draft lengths T/C) get one optimization profile
covering 1 .. max_len (opt: 256, or max_len if smaller).

Graph structure matters: TensorRT refuses If nesting deeper than 24 and builds deep nests very
slowly (TensorRT-RTX, 32-layer toy model, 7 exit points: nested 627 s, flat 37 s; 31 exit points:
nested does not parse, flat 36 s). Build engines from a decode step exported with structure="flat".
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..errors import BackendUnavailable, SpecEEError

INSTALL_HINT = (
    "TensorRT is not installed. Full TensorRT (engines for this machine's GPU, Hopper included): "
    "`pip install tensorrt` from NVIDIA's index (https://pypi.nvidia.com). TensorRT-RTX (ahead-of-time "
    "engines for SM80/86/89/120 GPUs, no GPU needed to build, no Hopper): "
    "`pip install tensorrt-rtx-cu13==1.7.1.116`."
)
RTX_DEFAULT_TARGETS = ("SM80", "SM86", "SM89", "SM120")
RTX_GPUS = {
    "SM75": "Turing (RTX 20xx, T4)",
    "SM80": "Ampere datacenter (A100, A30)",
    "SM86": "Ampere (RTX 30xx, A10, A40)",
    "SM89": "Ada (RTX 40xx, L4, L40)",
    "SM120": "Blackwell consumer/workstation (RTX 50xx, RTX PRO 6000)",
    "SM121": "Blackwell GB10 (DGX Spark)",
}
OPT_LEN = 256


def trt_flavour():
    """(module, "tensorrt" | "tensorrt_rtx"); BackendUnavailable with the install hint when neither."""
    try:
        import tensorrt as trt

        return trt, "tensorrt"
    except ImportError:
        pass
    try:
        import tensorrt_rtx as trt

        return trt, "tensorrt_rtx"
    except ImportError:
        raise BackendUnavailable(INSTALL_HINT) from None


def _max_len(onnx_path: Path) -> int:
    import onnx

    m = onnx.load(str(onnx_path), load_external_data=False)
    meta = {p.key: p.value for p in m.metadata_props}
    try:
        return int(json.loads(meta.get("max_len", "2048")))
    except ValueError:
        return 2048


MAX_IF_DEPTH = 24  # TensorRT-RTX 1.7 refuses deeper If nesting (measured: depth 24 parses, 25 does not)


def _if_depth(onnx_path: Path) -> int:
    """Deepest nesting of If nodes in the graph."""
    import onnx

    def walk(g, d):
        best = d
        for node in g.node:
            for a in node.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    best = max(best, walk(a.g, d + (node.op_type == "If")))
        return best

    return walk(onnx.load(str(onnx_path), load_external_data=False).graph, 0)


def _plugin_nodes(onnx_path: Path) -> int:
    """How many `specee::exit_score` plugin nodes the graph holds (decode_step.plugin.onnx)."""
    from .onnx_export import count_nodes

    return count_nodes(onnx_path, "exit_score")


def _parse(trt, builder, logger, onnx_path: Path, flavour: str):
    flags = 0
    if flavour == "tensorrt" and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)  # keep the ONNX dtypes (fp16 stays fp16)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # resolves external data next to the file
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise SpecEEError(f"TensorRT could not parse {onnx_path.name}:\n  " + "\n  ".join(errors[:10]))
    return network


def _profile(trt, builder, network, max_len: int):
    """One optimization profile: every dynamic axis from 1 (0 for the draft's past length C) to max_len."""
    profile = builder.create_optimization_profile()
    dynamic = False
    for i in range(network.num_inputs):
        t = network.get_input(i)
        shape = list(t.shape)
        if all(d >= 0 for d in shape):
            continue
        dynamic = True
        lo = [d if d >= 0 else (0 if t.name.startswith("past_") else 1) for d in shape]
        opt = [d if d >= 0 else min(OPT_LEN, max_len) for d in shape]
        hi = [d if d >= 0 else max_len for d in shape]
        profile.set_shape(t.name, lo, opt, hi)
    return profile if dynamic else None


def _describe(network) -> dict:
    ins = {network.get_input(i).name: [str(network.get_input(i).dtype), list(network.get_input(i).shape)]
           for i in range(network.num_inputs)}
    outs = {network.get_output(i).name: [str(network.get_output(i).dtype), list(network.get_output(i).shape)]
            for i in range(network.num_outputs)}
    conditionals = 0
    for i in range(network.num_layers):
        conditionals += str(network.get_layer(i).type).endswith("CONDITION")  # one per If
    return {"layers": network.num_layers, "conditionals": conditionals, "inputs": ins, "outputs": outs}


def build_engines(onnx_path, out_dir, *, targets=None, workspace_gb: float = 4.0, verbose: bool = False) -> list[dict]:
    """Build TensorRT engine(s) for one ONNX graph into out_dir.

    targets: TensorRT-RTX only: compute capabilities ("SM86", "sm_89", "86", ...); default
        RTX_DEFAULT_TARGETS, one engine each (`<graph>.sm86.engine`). Full TensorRT builds for the
        GPU of this machine (`<graph>.engine`); targets must then be None.
    Returns one dict per engine: file, flavour, target, gpus, bytes, build_s, network summary.
    """
    trt, flavour = trt_flavour()
    onnx_path, out = Path(onnx_path), Path(out_dir)
    if not onnx_path.is_file():
        raise SpecEEError(f"{onnx_path} not found; export the model first")
    out.mkdir(parents=True, exist_ok=True)
    max_len = _max_len(onnx_path)
    depth = _if_depth(onnx_path)
    if depth > MAX_IF_DEPTH:
        raise SpecEEError(
            f"{onnx_path.name} nests If nodes {depth} deep; TensorRT accepts about {MAX_IF_DEPTH}. Export the "
            "decode step with structure='flat' (`export_onnx(..., structure=\"flat\")`): same results, nesting "
            "depth 2, and much faster engine builds"
        )
    if _plugin_nodes(onnx_path):
        if flavour != "tensorrt":  # TensorRT-RTX 1.7.1 aborts the whole process on a custom op: never parse it
            raise SpecEEError(
                f"{onnx_path.name} holds specee::exit_score plugin nodes, which need full TensorRT >= 10.7 "
                "(TensorRT-RTX cannot load plugins); build decode_step.onnx (built-in layers) instead"
            )
        from ..plugins.trt_exit_plugin import register

        if not register():
            raise BackendUnavailable("the exit-score plugin needs `tensorrt.plugin` (TensorRT >= 10.7)")
    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    stem = onnx_path.stem
    results = []
    if flavour == "tensorrt":
        if targets:
            raise SpecEEError(
                "full TensorRT builds for the GPU of this machine; pick targets only with TensorRT-RTX "
                f"(asked for {list(targets)})"
            )
        plan = [(None, out / f"{stem}.engine")]
    else:
        plan = []
        for tgt in targets or RTX_DEFAULT_TARGETS:
            name = _cc_name(tgt)
            if not hasattr(trt.ComputeCapability, name):
                raise SpecEEError(
                    f"TensorRT-RTX cannot target {tgt!r}; it supports "
                    f"{', '.join(n for n in trt.ComputeCapability.__members__ if n.startswith('SM'))} "
                    "(no Hopper SM90 / SM100: use full TensorRT there)"
                )
            plan.append((name, out / f"{stem}.{name.lower()}.engine"))

    for target, path in plan:
        t0 = time.perf_counter()
        builder = trt.Builder(logger)
        network = _parse(trt, builder, logger, onnx_path, flavour)
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
        if target is not None:
            config.num_compute_capabilities = 1
            if not config.set_compute_capability(getattr(trt.ComputeCapability, target), 0):
                raise SpecEEError(f"TensorRT-RTX refused compute capability {target}")
        profile = _profile(trt, builder, network, max_len)
        if profile is not None:
            config.add_optimization_profile(profile)
        if not _build_to_file(trt, builder, network, config, path):
            path.unlink(missing_ok=True)
            raise SpecEEError(
                f"TensorRT could not build {onnx_path.name} for {target or 'this GPU'}; rerun with verbose=True "
                "for the builder log"
            )
        results.append({
            "file": path.name, "flavour": flavour, "version": trt.__version__,
            "target": target or "this GPU", "gpus": RTX_GPUS.get(target, "the GPU it was built on"),
            "bytes": path.stat().st_size, "build_s": round(time.perf_counter() - t0, 2), "network": _describe(network),
        })
        del builder, network, config, profile  # free this target's builder state before the next build
    return results


def _build_to_file(trt, builder, network, config, path: Path) -> bool:
    """Serialize the engine straight into `path`: where the builder has `build_serialized_network_to_stream`
    (TensorRT-RTX 1.7 does) the plan arrives in chunks (~65 MB) and is never whole in memory; otherwise the
    one host buffer is written without a Python copy. (Before: the plan plus a bytes copy of it, both alive
    while the next target built: 12.98 GB peak for a 2.2 GB model's 4 engines; RESULTS.md [export-scale].)"""
    with path.open("wb") as f:
        if hasattr(builder, "build_serialized_network_to_stream") and hasattr(trt, "IStreamWriter"):

            class _Writer(trt.IStreamWriter):
                def __init__(self):
                    trt.IStreamWriter.__init__(self)

                def write(self, data) -> int:
                    return f.write(data)

            return bool(builder.build_serialized_network_to_stream(network, config, _Writer()))
        blob = builder.build_serialized_network(network, config)
        if blob is None:
            return False
        f.write(memoryview(blob))
        return True


def _cc_name(tgt) -> str:
    s = str(tgt).upper().replace("SM_", "SM").replace(".", "")
    if s.isdigit():
        s = "SM" + s
    return s


__all__ = ["INSTALL_HINT", "RTX_DEFAULT_TARGETS", "RTX_GPUS", "build_engines", "trt_flavour"]
