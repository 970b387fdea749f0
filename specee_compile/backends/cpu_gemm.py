"""Which library runs the eager backend's float32 matmuls on a CPU: MKL (`F.linear`, torch's default) or oneDNN
(`mkldnn._linear_pointwise` over weights reordered once into oneDNN's blocked layout), picked by timing both on
this machine before the first token.

Why: the two differ by machine far more than their names suggest. On the 2-core AMD EPYC of 2026-12-04
(`benchmarks/cpu_gemm_rows.py`, SmolLM2's shapes, 2 threads): the 30 layers' GEMMs of one row took 35.4 ms with
MKL and 20.6 ms with oneDNN, and of 3 rows (the CPU tree's verification) 68.6 ms against 23.3 ms; MKL's LM head
took 9.4 ms for one row and 33.9 ms for three. On the Intel hosts of earlier sessions MKL streamed its weights
once per 3 rows (RESULTS.md, session 5). A fixed choice is wrong on one of them; the probe times the LM head (the
largest weight) at 1 and 3 rows each way and keeps the faster sum.

oneDNN computes the same float32 sums in another order: outputs can differ from MKL's in the last bits (greedy
tokens matched on the SmolLM2 prompts tried). The oneDNN copy costs one more copy of the matmul weights in memory,
so it is skipped where that would not fit in a quarter of the available memory. The copy is reordered for a
batch of ROWS_HINT rows (`mkldnn._reorder_linear_weight`, as Inductor's weight prepacking does): the LM head's 1 / 3 /
8 / 25 rows took 4.0 / 5.3 / 7.0 / 11.0 ms in `to_mkldnn`'s default layout and 4.3 / 3.6 / 4.2 / 10.0 reordered for
8 rows (`benchmarks/cpu_gemm_rows.py`, same host).
`SPECEE_CPU_GEMM=mkl|onednn|auto` pins the choice (default auto). The probe runs once per process and LM-head shape
(`_TIMED`): every decoder built in one process runs the same library, so their outputs round alike.
"""

from __future__ import annotations

import os
import time

import torch

from ..errors import SettingError

CHOICES = ("auto", "mkl", "onednn")
# (LM head shape, dtype) -> the probe's times: decoders built in one process (the bench's rows, a PDL twin) would
# otherwise each time it again, and under a loaded CPU pick differently, rounding their outputs apart
_TIMED: dict[tuple, dict] = {}
ROWS_HINT = 8  # the batch the oneDNN weights are laid out for: a decode row, the CPU tree's 3, up to 8 pending rows


def setting() -> str:
    v = os.environ.get("SPECEE_CPU_GEMM", "auto") or "auto"
    if v not in CHOICES:
        raise SettingError(f"SPECEE_CPU_GEMM={v!r}: expected one of {', '.join(CHOICES)}; unset it for auto")
    return v


def _available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _best_ms(fn, reps: int = 5) -> float:
    fn()  # warm-up (first-touch, oneDNN's primitive cache)
    vals = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        vals.append(time.perf_counter() - t)
    return min(vals) * 1e3


def matmul_weights(weights) -> list[torch.Tensor]:
    """The 2-D matmul weights of a `model_step.ModelWeights`: every layer's q|k|v, o, gate|up, down and the LM head."""
    ws = [t for lw in weights.layers for t in (lw.wqkv, lw.wo, lw.wgu, lw.wd)]
    return [*ws, weights.head]


def pick(weights) -> tuple[str, dict]:
    """(choice, what was measured): "onednn" where oneDNN ran the LM head's 1 and 3 rows faster in sum than MKL
    (and its copy fits), else "mkl". Float32 weights on the CPU only."""
    want = setting()
    info: dict = {"setting": want}
    if want == "mkl":
        return "mkl", info
    if not torch.backends.mkldnn.is_available():
        info["reason"] = "this torch has no oneDNN"
        if want == "onednn":
            raise SettingError("SPECEE_CPU_GEMM=onednn: this torch build has no oneDNN; unset it or pick mkl")
        return "mkl", info
    nbytes = sum(w.numel() * w.element_size() for w in matmul_weights(weights))
    avail = _available_bytes()
    if want == "auto" and avail is not None and nbytes > avail // 4:
        info["reason"] = f"a oneDNN copy of the weights ({nbytes / 1e9:.2f} GB) would not fit a quarter of the free memory"
        return "mkl", info
    if want == "onednn":
        return "onednn", info
    head = weights.head
    key = (tuple(head.shape), head.dtype)
    if key not in _TIMED:  # once per process and shape: every decoder built here then runs the same library
        packed = onednn_form(head)
        ms = {}
        with torch.no_grad():
            for rows in (1, 3):
                x = torch.randn(1, rows, head.shape[1], dtype=head.dtype)
                ms[f"mkl_{rows}"] = round(_best_ms(lambda x=x: torch.nn.functional.linear(x, head)), 3)
                ms[f"onednn_{rows}"] = round(_best_ms(lambda x=x: linear_onednn(x, packed)), 3)
        _TIMED[key] = ms
    ms = info["lm_head_ms"] = dict(_TIMED[key])
    onednn = ms["onednn_1"] + ms["onednn_3"] < ms["mkl_1"] + ms["mkl_3"]
    return ("onednn" if onednn else "mkl"), info


def linear_onednn(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w.T (+ b) with w a oneDNN (`to_mkldnn`) weight."""
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), w, b, "none", [], "")


def onednn_form(t: torch.Tensor | None) -> torch.Tensor | None:
    """A 2-D float weight in oneDNN's layout for ROWS_HINT rows (a copy); anything else as it is."""
    if t is None or t.dim() != 2:
        return t
    return torch.ops.mkldnn._reorder_linear_weight(t.contiguous(), ROWS_HINT)


class OneDnnWeights:
    """oneDNN-layout copies of weights held elsewhere (a draft's modules and head rows), made on first use and
    made again when the tensor is replaced or changed in place (its version counter moves): `linear(x, w, b)`
    is F.linear with w's copy. For inference only."""

    def __init__(self) -> None:
        self._copies: dict[int, tuple[torch.Tensor, int, torch.Tensor]] = {}

    def linear(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        got = self._copies.get(id(w))
        if got is None or got[0] is not w or got[1] != w._version:
            got = self._copies[id(w)] = (w, w._version, onednn_form(w.detach()))
        return linear_onednn(x, got[2], b)
