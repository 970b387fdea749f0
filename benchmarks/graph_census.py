"""The kernel nodes of a captured CUDA graph with their launch and function attributes (driver API through
ctypes), and the differences between two graphs that run the same kernels.

The C++ runner's 30-layer chain idles ~0.4 us at every kernel boundary and the Python step's chain ~0.1
(GPU_NOTES, session 13), over the same kernels with the same grids and shared memory (session 10's DOT
census). What a DOT file does not print is read here, node by node: the node's launch attributes (priority,
memory sync domain, access policy window, cluster shape, shared-memory carveout, ...; a captured node takes
some from its capture stream) and its function's attributes (registers, shared memory, the dynamic shared
memory limit, cache configuration, ...). The runner writes the same fields for its own chain
(`SPECEE_GRAPH_ATTRS=DIR`: `cpp_layers_attrs.json`); `cpp_bench.py` writes the Python side's and prints
`attr_diff`.
"""

from __future__ import annotations

import ctypes
import struct

FUNC_ATTRS = {  # CUfunction_attribute
    "max_threads": 0, "static_smem": 1, "const_bytes": 2, "local_bytes": 3, "regs": 4, "ptx": 5, "binary": 6,
    "cache_mode_ca": 7, "max_dyn_smem": 8, "carveout": 9, "cluster_size_must_be_set": 10,
    "non_portable_cluster": 14, "cluster_sched": 15,
}
NODE_ATTRS = {  # CUlaunchAttributeID, valid for graph kernel nodes
    "access_policy_window": 1, "cooperative": 2, "cluster_dim": 4, "cluster_sched": 5,
    "programmatic_serialization": 6, "programmatic_event": 7, "priority": 8,
    "mem_sync_domain_map": 9, "mem_sync_domain": 10, "preferred_cluster_dim": 11, "launch_completion_event": 12,
    "device_updatable": 13, "smem_carveout": 14,
}
KERNEL_NODE = 0  # CU_GRAPH_NODE_TYPE_KERNEL
NODE_TYPES = {1: "memcpy", 2: "memset", 3: "host", 4: "child graph", 5: "empty", 6: "event wait", 7: "event record",
              8: "semaphore signal", 9: "semaphore wait", 10: "mem alloc", 11: "mem free", 12: "batch mem op",
              13: "conditional"}  # CUgraphNodeType, the non-kernel ones


def kernel_nodes(raw_graph: int) -> list[dict]:
    """Every kernel node of the graph (a `cudaGraph_t` as an int: `torch.cuda.CUDAGraph(keep_graph=True)
    .raw_cuda_graph()`) in node order: name, grid, block, dynamic shared memory, `deps` (its incoming edges),
    `edges` ([from port, to port, type] per incoming edge, where the driver has cuGraphNodeGetDependencies_v2),
    `func` {attribute: int} and `node` {attribute: the value's first words, or "error N" where the driver
    refuses the query}; `func` also holds the kernel's parameter count and bytes (`cuFuncGetParamInfo`); and
    the function's `handle` (a CUfunction, valid in this process only). Every other node is a record named
    `<its type>` with its `deps` (a node the capture added shows up in the diff as one side's only)."""
    cu = ctypes.CDLL("libcuda.so.1")
    get_params = getattr(cu, "cuGraphKernelNodeGetParams_v2", None) or cu.cuGraphKernelNodeGetParams
    raw = ctypes.c_void_p(raw_graph)
    n = ctypes.c_size_t(0)
    if cu.cuGraphGetNodes(raw, None, ctypes.byref(n)) != 0:
        raise RuntimeError("cuGraphGetNodes failed: is the graph kept (keep_graph=True)?")
    nodes = (ctypes.c_void_p * n.value)()
    cu.cuGraphGetNodes(raw, nodes, ctypes.byref(n))
    out = []
    for node in nodes:
        kind = ctypes.c_int(-1)
        cu.cuGraphNodeGetType(ctypes.c_void_p(node), ctypes.byref(kind))
        deps = ctypes.c_size_t(0)  # incoming edges (the _v2 entry point takes an edge-data argument)
        edges = []  # [from port, to port, type] per incoming edge (CUgraphEdgeData; a programmatic edge lets a
        # kernel launch before its producer completes)
        if hasattr(cu, "cuGraphNodeGetDependencies_v2"):
            cu.cuGraphNodeGetDependencies_v2(ctypes.c_void_p(node), None, None, ctypes.byref(deps))
            if deps.value:
                src, data = (ctypes.c_void_p * deps.value)(), (ctypes.c_ubyte * (8 * deps.value))()
                if cu.cuGraphNodeGetDependencies_v2(ctypes.c_void_p(node), src, data, ctypes.byref(deps)) == 0:
                    edges = [list(data[8 * e: 8 * e + 3]) for e in range(deps.value)]
        else:
            cu.cuGraphNodeGetDependencies(ctypes.c_void_p(node), None, ctypes.byref(deps))
        params = (ctypes.c_byte * 128)()
        if kind.value != KERNEL_NODE or get_params(ctypes.c_void_p(node), params) != 0:
            out.append({"name": f"<{NODE_TYPES.get(kind.value, kind.value)}>", "grid": [0, 0, 0],
                        "block": [0, 0, 0], "smem": 0, "deps": deps.value, "edges": edges, "func": {}, "node": {},
                        "handle": 0})
            continue
        func, gx, gy, gz, bx, by, bz, smem = struct.unpack_from("<Q7I", bytes(params), 0)
        name = ctypes.c_char_p()
        if func and hasattr(cu, "cuFuncGetName"):
            cu.cuFuncGetName(ctypes.byref(name), ctypes.c_void_p(func))
        fattrs = {}
        for key, attr in FUNC_ATTRS.items():
            v = ctypes.c_int(-99)
            rc = cu.cuFuncGetAttribute(ctypes.byref(v), attr, ctypes.c_void_p(func))
            fattrs[key] = v.value if rc == 0 else f"error {rc}"
        nparams, nbytes = 0, 0  # the kernel's parameters: count and bytes (the launch copies them per node)
        off, size = ctypes.c_size_t(0), ctypes.c_size_t(0)
        while hasattr(cu, "cuFuncGetParamInfo") and nparams < 512 and cu.cuFuncGetParamInfo(
                ctypes.c_void_p(func), ctypes.c_size_t(nparams), ctypes.byref(off), ctypes.byref(size)) == 0:
            nparams, nbytes = nparams + 1, off.value + size.value
        fattrs["params"], fattrs["param_bytes"] = nparams, nbytes
        nattrs = {}
        for key, attr in NODE_ATTRS.items():
            value = (ctypes.c_byte * 64)()
            rc = cu.cuGraphKernelNodeGetAttribute(ctypes.c_void_p(node), attr, value)
            nattrs[key] = list(struct.unpack_from("<4i", bytes(value), 0)) if rc == 0 else f"error {rc}"
        out.append({"name": (name.value or b"?").decode(), "grid": [gx, gy, gz], "block": [bx, by, bz],
                    "smem": smem, "deps": deps.value, "edges": edges, "func": fattrs, "node": nattrs, "handle": func})
    return out


def census(nodes: list[dict]) -> dict:
    """{kernel name: {field: sorted distinct values over its nodes}}: what a chain's nodes of one kernel hold
    (`count`: how many nodes it has)."""
    out: dict = {}
    counts: dict = {}
    for rec in nodes:
        fields = out.setdefault(rec["name"], {})
        counts[rec["name"]] = counts.get(rec["name"], 0) + 1
        for key, v in [("grid", rec["grid"]), ("block", rec["block"]), ("smem", rec["smem"]),
                       ("deps", rec.get("deps")), ("edges", rec.get("edges")),
                       *((f"func.{k}", x) for k, x in rec["func"].items()),
                       *((f"node.{k}", x) for k, x in rec["node"].items())]:
            vals = fields.setdefault(key, [])
            if v not in vals:
                vals.append(v)
    for name, fields in out.items():
        for key in fields:
            fields[key].sort(key=repr)
        fields["count"] = [counts[name]]
    return out


def attr_diff(a: list[dict], b: list[dict], labels=("cpp", "python")) -> list[str]:
    """Table rows, one per (kernel, field) whose values differ between the two graphs' nodes of that kernel;
    kernels are matched by name (a kernel only one side has is listed as such). Grids of Inductor's own
    pointwise kernels differ by design (their block sizes are tuned per compile) and are listed too."""
    ca, cb = census(a), census(b)
    rows = []
    for name in sorted(set(ca) | set(cb)):
        if name not in ca or name not in cb:
            rows.append(f"| {name[:60]} | (only in {labels[0] if name in ca else labels[1]}) | | |")
            continue
        for key in sorted(set(ca[name]) | set(cb[name])):
            va, vb = ca[name].get(key), cb[name].get(key)
            if va != vb:
                rows.append(f"| {name[:60]} | {key} | {va} | {vb} |")
    return rows
