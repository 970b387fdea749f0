"""The Inductor backend: the captured, passed segments compiled by torch.compile.

Where the segments come from: `capture.segment_weights` traces the decode step (torch.export) and
runs the passes; this backend traces a 2-layer prefix of the model (enough for one layer segment and
one exit point; every layer runs the same `model_step` function, and segment_layers reports that the
traced layer segments are identical) and compiles three of the resulting GraphModules with
`torch.compile(fullgraph=True, dynamic=False)`:

    layer  `layers[0]` of the SegmentedProgram, called for *every* layer with that layer's weights,
           cache and validity row (weights are segment inputs, and all layer segments have the same
           code, so compile time does not grow with depth)
    head   final norm + LM head
    exit   the exit-point module (`specee::exit_score`; Inductor calls the op as an extern kernel:
           on CPU the eager reference, so scores equal the eager backend's bit for bit; on CUDA the
           fused Triton kernel from `plugins/triton_exit_score.py` where triton is installed)
Embedding (a gather) and the draft's final norm run eagerly, as in `Segments`.

Shapes and recompiles: static shapes everywhere except the row count q (1 + pending rows, or the
prompt in prefill) and the attended length S (bucketed by `Segments.attn_bucket`), which are marked
dynamic (`maybe_mark_dynamic`), so Inductor generates one kernel set for all q >= 2 and all S. Dynamo
still specialises q = 1 (its 0/1 rule) and S = T (the full-context slice is contiguous), so a
segment compiles at most 4 times (`compile_stats()` counts them; the limit of 8 is never reached).

KV cache: the layer segment writes K/V and validity in place (`index_copy_` / `index_fill_` on its
cache inputs, exactly as the eager function); AOTAutograd turns that into a functional update plus a
copy back to the input, which Inductor re-inplaces into a scatter on the cache.

CUDA graphs (settings.cuda_graphs on a CUDA device): every compiled segment call of a decode-sized
row count (q <= 1 + max_pending) is recorded once per (segment, layer, q, S) as a
`torch.cuda.CUDAGraph` over static input buffers: h, pos (and the exit op's candidate rows and
p_prev) are copied in, the layer's weights and cache are captured by address (the cache is
allocated once and never moved). The first call of a key runs the compiled code directly (warm-up),
the second records the graph, later ones replay it. Outputs are cloned out of the graph's static
buffers, because the runtime keeps hidden states of pending rows across steps.
`mode="reduce-overhead"` is not used: its CUDA-graph trees skip graphs that mutate inputs, which
every layer does (the cache). Exit decisions sync with the host (`float(score)` in the runtime).

On CUDA (with triton) the layer is traced with the ops of `model_step.CUDA_FUSED`: its matmuls as
`specee::fused_linear` (one Triton GEMV each, RMSNorm / SiLU*up / residual folded in) and attention
as `specee::decode_attention` (split-S Triton kernel that builds the validity mask itself), with the
rows' RoPE, K/V cache writes and validity mark before it as `specee::rope_append` (one Triton kernel
where Inductor made four; a mutating op that Inductor calls in place on the cache inputs); the exit
op runs the fused Triton exit kernel; Inductor compiles the rest with coordinate-descent tuning. Rows
q > 1 fall back to cuBLAS / SDPA / the plain cache writes inside the ops.

On a CPU (float32) the one-row calls are compiled with their matmuls as reductions
(`plugins/inductor_cpu_gemv.py`: Inductor's parallel vectorized loops, where MKL runs a one-row product
on one thread), and compiled before the prefill (`prepare`). Calls of several rows (the prefill, pending
rows, a tree's verification) run as the eager backend runs them where its probe picks oneDNN
(`backends/cpu_gemm.py`, `_rows_eager`): Inductor would call MKL for them.
"""

from __future__ import annotations

import time

import torch

from ..config import Settings
from ..errors import SpecEEError
from ..program import SpecEEProgram
from .base import Segments

CAPTURE_LAYERS = 2  # layers traced for the compiled segments: one layer segment + an exit point after it


class InductorSegments(Segments):
    name = "inductor"

    def __init__(self, model, settings: Settings, program: SpecEEProgram | None = None):
        super().__init__(model, settings, program)
        from ..capture import segment_weights

        t0 = time.perf_counter()
        on_cuda = self.device.type == "cuda"
        fused = ()
        if on_cuda:
            from ..model_step import CUDA_FUSED
            from ..ops import register_cuda_kernels

            fused = CUDA_FUSED if register_cuda_kernels() else ()
        self.fused = fused
        # Only layer 0's segment is compiled (all layer segments have the same code), so capture a
        # 2-layer prefix: same segments and exit point, without tracing every layer (~20 s for 30).
        self.segmented = segment_weights(self.weights, settings, num_layers=CAPTURE_LAYERS, fused=fused)
        self.capture_s = time.perf_counter() - t0
        if not self.segmented.pass_counts["segment_layers"]["uniform_layers"]:
            raise SpecEEError(
                "the traced layer segments differ from each other; one compiled layer cannot "
                "serve every layer (report this with the model's config)"
            )
        # GPU: M=1 matmuls as Inductor's coordinate-descent-tuned Triton reductions (+12% over its
        # default cuBLAS calls on the H100, benchmarks/GPU_NOTES.md)
        # CPU: one-row float32 matmuls as Inductor's parallel reductions, not one-thread BLAS calls
        # (plugins/inductor_cpu_gemv.py; the q = 1 compiles, which Dynamo specializes)
        from ..plugins import inductor_cpu_gemv

        self._config = inductor_cpu_gemv.inductor_options(self.device)
        if on_cuda:
            from ..plugins import pdl

            self._config = {"coordinate_descent_tuning": True, **pdl.inductor_options()}
        self._compiles: dict[str, int] = {}
        self._compile_s: dict[str, float] = {}
        seg = self.segmented
        self._layer_c = self._compile("layer", seg.layers[0])
        self._head_c = self._compile("head", seg.head)
        self._exit_c = self._compile("exit", seg.exit_point) if seg.exit_point is not None else None
        self._keys: dict[int, torch.Tensor] = {}  # S -> [S] tensor whose length carries S
        use_graphs = settings.cuda_graphs and self.device.type == "cuda"
        self._graphs = _CudaGraphs(self.device) if use_graphs else None
        self._graph_rows = 1 + settings.max_pending  # decode-sized calls get CUDA graphs
        self._whole_step = None  # cuda_step.CudaWholeStep, built on first use (CUDA graphs only)
        self._warm = False

    # ---- compilation ----
    def _compile(self, name: str, gm: torch.fx.GraphModule):
        from torch._inductor.compile_fx import compile_fx

        def backend(graph, example_inputs):
            t0 = time.perf_counter()
            out = compile_fx(graph, example_inputs, config_patches=self._config)
            self._compiles[name] = self._compiles.get(name, 0) + 1
            self._compile_s[name] = self._compile_s.get(name, 0.0) + time.perf_counter() - t0
            return out

        return torch.compile(gm, backend=backend, fullgraph=True, dynamic=False)

    def compile_stats(self) -> dict:
        """Compiles per segment and seconds spent in Inductor (dynamo tracing not included)."""
        return {
            "capture_s": self.capture_s,
            "compiles": dict(self._compiles),
            "compile_s": {k: round(v, 3) for k, v in self._compile_s.items()},
            "cuda_graphs": len(self._graphs.entries) if self._graphs is not None else 0,
            "fused_ops": list(self.fused),
        }

    def _keys_for(self, S: int) -> torch.Tensor:
        t = self._keys.get(S)
        if t is None:
            t = self._keys[S] = torch.empty(S, dtype=torch.int8, device=self.device)
        return t

    def _call(self, key, fn, args, per_call: tuple[int, ...], dyn: tuple[tuple[int, int], ...], rows: int):
        """Run a compiled segment. per_call: indices of inputs that change every call (copied into a
        CUDA graph's static buffers); dyn: (input, dim) pairs marked dynamic (q, S)."""
        # per-call inputs get canonical strides: the runtime passes row views (h[:, j:j+1]) whose
        # strides differ from call to call, and dynamo would recompile on each new stride
        args = list(args)
        for j in per_call:
            args[j] = _contiguous(args[j])
        for j, dim in dyn:
            torch._dynamo.maybe_mark_dynamic(args[j], dim)
        with torch.no_grad():
            if self._graphs is None or rows > self._graph_rows:
                return fn(*args)
            return self._graphs.run(key, fn, args, per_call, dyn)

    # ---- the whole step (runtime.contract.WholeStep): CUDA graphs of the whole decode step ----
    def _whole(self):
        if self._whole_step is None and self._graphs is not None:
            from .cuda_step import CudaWholeStep

            self._whole_step = CudaWholeStep(self)
        return self._whole_step

    def can_run(self, plan) -> bool:
        w = self._whole()
        return w is not None and w.can_run(plan)

    def prepare(self, plan, max_pos: int) -> None:
        """Compile everything a generate call will run before its prefill, so neither the prefill nor the first
        decode step waits for Inductor: the prefill shape (q >= 2: one dynamic kernel set) and, on CUDA, the
        whole decode step captured per attention bucket; on a CPU the one-row layer and head (Dynamo
        specializes q = 1; their matmuls are `inductor_cpu_gemv`'s reductions), run once through every layer so
        the first token does not also wait for the weights' first touch (mapped from the safetensors file).
        Leaves the cache empty."""
        w = self._whole()
        if w is not None and w.can_run(plan):
            w.prepare(plan, max_pos)
        if not self._warm:
            pos = torch.tensor([0, 1], device=self.device)  # slots the reset below frees again
            h = self.embed(torch.zeros(2, dtype=torch.long, device=self.device))
            S = self.attn_len(1)
            self.head(self.layer(0, h, pos, S)[:, -1:])  # (a CPU's oneDNN rows compile nothing: `_rows_eager`)
            if w is None:  # (CUDA: the whole step's capture compiled the one-row shapes)
                x, pos1 = self.embed(pos[:1]), pos[1:].clone()  # (a view of pos: another compile, guarded on its base)
                for i in range(self.spec.num_layers):
                    x = self.layer(i, x, pos1, S)
                self.head(x)
            self._warm = True
        self.cache.reset()

    def run_step(self, plan):
        return self._whole().run_step(plan)

    def can_run_ahead(self, plan) -> bool:
        w = self._whole()
        return w is not None and w.can_run_ahead(plan)

    def launch(self, plan):
        return self._whole().launch(plan)

    def collect(self, launched):
        return self._whole().collect(launched)

    def step_costs(self, plan):
        """Measured per-token costs of the plan's exit program (runtime/exit_costs.py); None off CUDA."""
        w = self._whole()
        return w.step_costs(plan) if w is not None else None

    def dense_step_time(self, S: int) -> float | None:
        """The tree guard's measure (runtime/tree.py): seconds per dense whole step at bucket S; None off CUDA."""
        w = self._whole()
        return w.dense_step_time(S) if w is not None else None

    @staticmethod
    def program_time(run, reps: int = 10) -> float:
        """Seconds per call of `run`, a captured program's replay (the tree guard's other measure)."""
        from .cuda_step import replay_time

        return replay_time(run, reps)

    def layer_direct(self, i: int, h: torch.Tensor, pos: torch.Tensor, S: int) -> torch.Tensor:
        """The compiled layer without a per-layer graph (what the whole-step capture records)."""
        c = self.cache
        args = list(self.segmented.layer_args(self.weights, i, h, pos, self._keys_for(S), c.valid[i], c.k[i], c.v[i]))
        for j, dim in ((0, 1), (1, 0), (2, 0)):
            torch._dynamo.maybe_mark_dynamic(args[j], dim)
        return self._layer_c(*args)

    def head_direct(self, h: torch.Tensor):
        torch._dynamo.maybe_mark_dynamic(h, 1)
        return self._head_c(h, self.weights.norm, self.weights.head)

    # ---- the segment calls the runtime makes ----
    def _rows_eager(self, h: torch.Tensor) -> bool:
        """A call of several rows on a CPU whose probe chose oneDNN (`cpu_gemm.py`): the eager function over the
        oneDNN weights runs it, as in the eager backend. Inductor hands several-row matmuls to MKL, which took
        76 ms for SmolLM2's 30 layers at 3 rows against oneDNN's 17 on the 2-core AMD EPYC (2026-12-05,
        benchmarks/cpu_gemm_rows.py), and oneDNN's weights are opaque to it. One row stays compiled
        (`inductor_cpu_gemv`)."""
        return self._mm_layers is not None and h.shape[1] > 1

    def layer(self, i: int, h: torch.Tensor, pos: torch.Tensor, S: int) -> torch.Tensor:
        # h [1, q, D], pos [q] -> h [1, q, D]; writes layer i's K/V and validity at pos
        if self._rows_eager(h):
            return super().layer(i, h, pos, S)
        c = self.cache
        args = self.segmented.layer_args(
            self.weights, i, h, pos, self._keys_for(S), c.valid[i], c.k[i], c.v[i]
        )
        q = h.shape[1]
        return self._call(("layer", i, q, S), self._layer_c, args, (0, 1), ((0, 1), (1, 0), (2, 0)), q)

    def head(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # h [1, q, D] -> (hn [1, q, D], logits [1, q, V])
        if self._rows_eager(h):
            return super().head(h)
        q = h.shape[1]
        return self._call(
            ("head", q), self._head_c, (h, self.weights.norm, self.weights.head), (0,), ((0, 1),), q
        )

    def exit_score(self, i: int, h: torch.Tensor, rows: torch.Tensor, p_prev: torch.Tensor):
        # h [1, 1, D]; rows [k, D]; p_prev [k] -> (score [1], z [k], p [k]) float32
        P = self.predictors
        args = (h, self.weights.norm, rows, p_prev, P.w1[i], P.b1[i], P.w2[i], P.b2[i])
        return self._call(("exit", i, rows.shape[0]), self._exit_c, args, (0, 2, 3), (), 1)


def _contiguous(t: torch.Tensor) -> torch.Tensor:
    expected, acc = [], 1
    for size in reversed(t.shape):
        expected.append(acc)
        acc *= size
    if tuple(reversed(expected)) == t.stride():
        return t
    return t.clone(memory_format=torch.contiguous_format)


class _CudaGraphs:
    """One CUDA graph per key over static copies of the per-call inputs (see module docstring)."""

    def __init__(self, device):
        self.device = device
        self.pool = torch.cuda.graph_pool_handle()
        self.entries: dict = {}

    def run(self, key, fn, args, per_call, dyn):
        entry = self.entries.get(key)
        if entry is None:  # first call of this key: plain run (compiles, warms up cuBLAS/allocator)
            self.entries[key] = "warm"
            return fn(*args)
        if entry == "warm":
            static = list(args)
            for j in per_call:
                static[j] = args[j].clone()
            for j, dim in dyn:  # same dynamo markings as the warm call, so capture hits its compile
                torch._dynamo.maybe_mark_dynamic(static[j], dim)
            graph = torch.cuda.CUDAGraph()
            torch.cuda.synchronize(self.device)
            with torch.cuda.graph(graph, pool=self.pool):
                out = fn(*static)
            entry = self.entries[key] = (graph, static, out)
        graph, static, out = entry
        for j in per_call:
            static[j].copy_(args[j])
        graph.replay()
        if isinstance(out, tuple):
            return tuple(o.clone() for o in out)
        return out.clone()
