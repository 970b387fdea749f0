"""The eager `Segments` (runtime/contract.py) over a static KV cache; model backends subclass it.

The runtime (`runtime/decoder.py`) only calls the contract's methods, so it runs unchanged on every backend.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import Settings, check_device, torch_dtype
from ..model_step import ModelWeights, extract_weights, make_head_fn, make_layer_fn
from ..program import SpecEEProgram


@dataclass
class KVCache:
    k: torch.Tensor  # [L, Hkv, T, hd]
    v: torch.Tensor  # [L, Hkv, T, hd]
    valid: torch.Tensor  # [L, T] bool: layer l holds K/V for position t
    # set by whatever runs the step outside a generation (CUDA-graph warm-ups and captures, cost
    # measurements): those runs leave values in slots no position holds yet, and in fp16 some are inf or
    # NaN. A masked attention still multiplies them by a zero weight (SDPA with a mask: 0 * NaN = NaN), so
    # the next generation clears the values, not only `valid` (runtime/decoder.py `start`).
    junk: bool = False

    @classmethod
    def allocate(cls, spec, dtype, device) -> KVCache:
        shape = (spec.num_layers, spec.num_kv_heads, spec.max_len, spec.head_dim)
        return cls(
            k=torch.zeros(shape, dtype=dtype, device=device),
            v=torch.zeros(shape, dtype=dtype, device=device),
            valid=torch.zeros(spec.num_layers, spec.max_len, dtype=torch.bool, device=device),
        )

    def truncate(self, length: int) -> None:
        """Forget every position >= length in every layer (rollback)."""
        self.valid[:, length:] = False

    def reset(self) -> None:
        self.valid.zero_()

    def clear(self) -> None:
        """Forget every position and zero the values (after junk runs, see `junk`)."""
        self.k.zero_()
        self.v.zero_()
        self.valid.zero_()
        self.junk = False


class Segments:
    """Eager segments; subclasses swap in compiled versions of `_layer`, `_head`, `_exit`."""

    name = "eager"
    attn_bucket = 64  # attended cache prefix is rounded up to this (bounds recompiles)

    def __init__(self, model, settings: Settings, program: SpecEEProgram | None = None):
        dtype = torch_dtype(settings.dtype)
        check_device(settings.device)
        model = model.to(device=settings.device, dtype=dtype)
        max_pos = getattr(model.config, "max_position_embeddings", settings.max_context)
        self.max_len = min(settings.max_context, max_pos)
        self.weights: ModelWeights = extract_weights(model, self.max_len)
        self.spec = self.weights.spec
        self.settings = settings
        self.device = torch.device(settings.device)
        self.dtype = dtype
        self.cache = KVCache.allocate(self.spec, dtype, self.device)
        self.predictors = program.predictors.to(self.device) if program is not None else None
        self._layer = make_layer_fn(self.spec)
        self._head = make_head_fn(self.spec)
        # the matmul weights as the layer and head functions take them: on a CPU (float32) in the library the
        # probe timed faster here (`cpu_gemm.py`: MKL as they are, or a oneDNN-layout copy). The Inductor backend
        # runs its calls of several rows this way on a CPU (inductor.py)
        self.gemm, self.gemm_probe = "default", None
        self._mm_layers: list[tuple] | None = None
        self._mm_head: torch.Tensor | None = None
        if self.device.type == "cpu" and self.name in ("eager", "inductor") and dtype == torch.float32:
            from . import cpu_gemm

            self.gemm, self.gemm_probe = cpu_gemm.pick(self.weights)
            if self.gemm == "onednn":
                self._mm_layers = [tuple(map(cpu_gemm.onednn_form, lw.as_tuple())) for lw in self.weights.layers]
                self._mm_head = cpu_gemm.onednn_form(self.weights.head)
        from ..ops import exit_score

        self._exit = exit_score

    # ---- the segment calls the runtime makes ----
    def attn_len(self, max_pos: int) -> int:
        b = self.attn_bucket
        return min(self.max_len, (max_pos // b + 1) * b)

    def prefill(self, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        # ids [P] -> (logits [V] after the last row, final-normed hidden states hn [P, D])
        P = len(ids)
        pos = torch.arange(P, device=self.device)
        h = self.embed(torch.tensor(ids, device=self.device))
        S = self.attn_len(P - 1)
        for i in range(self.spec.num_layers):
            h = self.layer(i, h, pos, S)
        _, logits = self.head(h[:, -1:])
        return logits[0, -1], self.norm(h)[0]

    def head_rows(self, candidates: torch.Tensor) -> torch.Tensor:
        # candidates [k] -> their LM-head rows [k, D]
        return self.weights.head[candidates]

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        # ids [q] -> h [1, q, D]
        return self.weights.embed[ids][None]

    def layer_weights(self, i: int) -> tuple:
        """Layer i's weights as `model_step`'s layer function takes them (`LayerWeights.as_tuple()` order), the
        matmuls in this backend's chosen form (`gemm`)."""
        return self._mm_layers[i] if self._mm_layers is not None else self.weights.layers[i].as_tuple()

    def layer(self, i: int, h: torch.Tensor, pos: torch.Tensor, S: int) -> torch.Tensor:
        c = self.cache
        return self._layer(h, pos, c.valid[i], self.weights.cos, self.weights.sin, c.k[i], c.v[i], S,
                           *self.layer_weights(i))

    def head(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # h [1, q, D] -> (hn [1, q, D], logits [1, q, V])
        head = self._mm_head if self._mm_head is not None else self.weights.head
        return self._head(h, self.weights.norm, head)

    def norm(self, h: torch.Tensor) -> torch.Tensor:
        from ..model_step import rms_norm

        return rms_norm(h, self.weights.norm, self.spec.eps)

    def capture(self, fn, reset):
        """runtime.contract.Captures: on CUDA, fn as a CUDA graph (two warm-up runs compile and autotune
        outside it; one replay after capture uploads it, so the first real replay is not slower); every
        run here is preceded by reset(). Elsewhere fn itself."""
        if self.device.type != "cuda":
            return fn
        self.cache.junk = True  # the warm-ups run fn on whatever state reset() leaves
        if getattr(self, "_capture_pool", None) is None:
            self._capture_pool = torch.cuda.graph_pool_handle()
        for _ in range(2):
            reset()
            fn()
        torch.cuda.synchronize(self.device)
        g = torch.cuda.CUDAGraph()
        reset()
        self._capturing = g
        try:
            with torch.cuda.graph(g, pool=self._capture_pool):
                fn()
        finally:
            self._capturing = None
        reset()
        g.replay()
        torch.cuda.synchronize(self.device)
        return g.replay

    def branches(self) -> str | None:
        """runtime.contract.Captures: how `branch` decides ("host" off CUDA; on CUDA the IF-node backend,
        "torch" or "ext", or None where neither is available)."""
        if self.device.type != "cuda":
            return "host"
        if not hasattr(self, "_cond"):
            from ..plugins.cuda_graph_if import cond_backend, reserve_nesting

            self._cond = cond_backend()
            reserve_nesting(self.spec.num_layers + 4, self._cond)  # branches nest up to one per layer (tree_exits)
        return self._cond

    def branch(self, fn, a: torch.Tensor, b: torch.Tensor | None = None):
        """runtime.contract.Captures: fn() where the uint8 flags a[0] (and b[0]) are non-zero. Inside `capture`
        on CUDA: an IF node of the graph (the device decides on every replay); in its warm-ups: always (they
        compile what the node will hold); off CUDA: decided here, on the host."""
        if self.device.type != "cuda":
            return fn() if int(a[0]) and (b is None or int(b[0])) else None
        g = getattr(self, "_capturing", None)
        if g is None:
            return fn()
        from ..plugins.cuda_graph_if import if_node

        with if_node(g, a, b, backend=self.branches(), pool=self._capture_pool):
            return fn()

    def exit_score(self, i: int, h: torch.Tensor, rows: torch.Tensor, p_prev: torch.Tensor):
        # h [1, 1, D]; rows [k, D]; p_prev [k] -> (score [1], z [k], p [k]) float32
        P = self.predictors
        return self._exit(h, self.weights.norm, rows, p_prev, P.w1[i], P.b1[i], P.w2[i], P.b2[i], self.spec.eps)
