"""Conditional IF nodes inside a CUDA-graph capture: what lets one captured decode step skip the layers
after an exit without a host round trip.

torch >= 2.12 exposes `CUDAGraph.begin_capture_to_if_node`; torch 2.11 (the GPU machine's) does not, so
a small extension (built once with nvcc through `torch.utils.cpp_extension.load_inline`, cached on
disk) does the same: a 1-thread kernel sets the node's handle from device flags, the body is captured
on a side stream straight into the IF node's body graph, and the caching allocator routes the body's
allocations to the graph's pool. Measured (benchmarks/GPU_NOTES.md, H100): 31 IF nodes cost ~6% of a
dense 7B step; the skipped layers then cost nothing.

What a node costs (session 42, `benchmarks/if_gate_probe.py`, H100, 7B-wide GEMV layers under PDL): ~10 us
where its body is entered and ~6 us where it is evaluated and not taken, whatever the body holds; launching
the handle-setting kernel with PDL changes nothing. So the callers nest their gates (each stretch's IF inside
the previous one's body): a token that exits evaluates one node not taken, not one per later exit point.

    with if_node(graph, flag_a, flag_b, pool=pool):   # body runs when a[0] != 0 and b[0] != 0
        ...
"""

from __future__ import annotations

import contextlib
import os
import sys

import torch


def log(*a):
    print("[cuda-if]", *a, file=sys.stderr, flush=True)


COND_CPP = r"""
// Conditional IF nodes inside a torch CUDA-graph capture (what torch >= 2.12 exposes as
// CUDAGraph.begin_capture_to_if_node), for torch builds without it. Mirrors torch's implementation:
// a kernel sets the node's handle from device flags; the body is captured on a side stream straight
// into the IF node's body graph; the caching allocator routes the body's allocations to the graph's pool.
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <memory>
#include <vector>

void specee_launch_set_cond(cudaGraphConditionalHandle h, const void* a, const void* b, cudaStream_t s);

#define SPECEE_CK(x)                                                                  \
  do {                                                                                \
    cudaError_t e_ = (x);                                                             \
    TORCH_CHECK(e_ == cudaSuccess, #x " failed: ", cudaGetErrorString(e_));           \
  } while (0)

namespace {
using Id = unsigned long long;
struct Frame {
  c10::cuda::CUDAStream parent;
  c10::cuda::CUDAStream child;
  std::shared_ptr<Id> child_id;
};
std::vector<Frame> frames;
std::shared_ptr<Id> root_id;
// Bodies are captured on streams of our own: torch's stream pool is round-robin over 32 streams and
// also serves torch.cuda.graph's capture stream, so after ~32 IF nodes a pool stream can BE the
// parent capture stream (cudaStreamBeginCaptureToGraph then fails: cudaErrorIllegalState).
std::vector<cudaStream_t> own_streams;

std::function<bool(cudaStream_t)> filter_for(std::shared_ptr<Id> id) {
  return [id](cudaStream_t s) {
    cudaStreamCaptureStatus st{};
    Id sid = 0;
    if (cudaStreamGetCaptureInfo(s, &st, &sid) != cudaSuccess) return false;
    return st == cudaStreamCaptureStatusActive && sid == *id;
  };
}
c10::cuda::MempoolId_t pool_of(int64_t p0, int64_t p1) {
  return c10::cuda::MempoolId_t{static_cast<c10::cuda::CaptureId_t>(p0), static_cast<c10::cuda::CaptureId_t>(p1)};
}
}  // namespace

void init_streams(int64_t n) {
  while (static_cast<int64_t>(own_streams.size()) < n) {
    cudaStream_t st{};
    SPECEE_CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    own_streams.push_back(st);
  }
}

void begin_if(torch::Tensor a, c10::optional<torch::Tensor> b, int64_t pool0, int64_t pool1) {
  TORCH_CHECK(a.is_cuda() && a.numel() == 1 && a.element_size() == 1, "begin_if: a must be a 1-byte CUDA scalar");
  auto dev = c10::cuda::current_device();
  auto pool = pool_of(pool0, pool1);
  auto parent = c10::cuda::getCurrentCUDAStream();
  cudaStreamCaptureStatus st{};
  Id pid = 0;
  cudaGraph_t g{};
  SPECEE_CK(cudaStreamGetCaptureInfo(parent.stream(), &st, &pid, &g));
  TORCH_CHECK(st == cudaStreamCaptureStatusActive, "begin_if: the current stream is not capturing");
  if (frames.empty()) root_id = std::make_shared<Id>(pid);
  cudaGraphConditionalHandle h{};
  SPECEE_CK(cudaGraphConditionalHandleCreate(&h, g, 0, 0));
  const void* bp = nullptr;
  if (b.has_value()) {
    TORCH_CHECK(b->is_cuda() && b->numel() == 1 && b->element_size() == 1, "begin_if: b must be a 1-byte CUDA scalar");
    bp = b->data_ptr();
  }
  specee_launch_set_cond(h, a.data_ptr(), bp, parent.stream());
  SPECEE_CK(cudaGetLastError());
  const cudaGraphNode_t* deps = nullptr;
  const cudaGraphEdgeData* edges = nullptr;
  size_t ndeps = 0;
#if CUDART_VERSION >= 13000
  SPECEE_CK(cudaStreamGetCaptureInfo(parent.stream(), &st, nullptr, &g, &deps, &edges, &ndeps));
#else
  SPECEE_CK(cudaStreamGetCaptureInfo_v3(parent.stream(), &st, nullptr, &g, &deps, &edges, &ndeps));
#endif
  cudaGraphNodeParams params{};
  params.type = cudaGraphNodeTypeConditional;
  params.conditional.handle = h;
  params.conditional.type = cudaGraphCondTypeIf;
  params.conditional.size = 1;
  cudaGraphNode_t node{};
#if CUDART_VERSION >= 13000
  SPECEE_CK(cudaGraphAddNode(&node, g, deps, edges, ndeps, &params));
  SPECEE_CK(cudaStreamUpdateCaptureDependencies(parent.stream(), &node, nullptr, 1, cudaStreamSetCaptureDependencies));
#else
  SPECEE_CK(cudaGraphAddNode_v2(&node, g, deps, edges, ndeps, &params));
  SPECEE_CK(cudaStreamUpdateCaptureDependencies_v2(parent.stream(), &node, nullptr, 1, cudaStreamSetCaptureDependencies));
#endif
  cudaGraph_t body = params.conditional.phGraph_out[0];
  TORCH_CHECK(frames.size() < own_streams.size(), "begin_if: call init_streams(depth) before capturing");
  auto child = c10::cuda::getStreamFromExternal(own_streams[frames.size()], dev);
  TORCH_CHECK(child.stream() != parent.stream(), "begin_if: body stream equals the capture stream");
  auto cid = std::make_shared<Id>(0);
  SPECEE_CK(cudaStreamBeginCaptureToGraph(child.stream(), body, nullptr, nullptr, 0, cudaStreamCaptureModeGlobal));
  SPECEE_CK(cudaStreamGetCaptureInfo(child.stream(), &st, cid.get()));
  TORCH_CHECK(st == cudaStreamCaptureStatusActive, "begin_if: body capture did not start");
  c10::cuda::CUDACachingAllocator::endAllocateToPool(dev, pool);
  c10::cuda::CUDACachingAllocator::beginAllocateToPool(dev, pool, filter_for(cid));
  frames.push_back(Frame{parent, child, cid});
  c10::cuda::setCurrentCUDAStream(child);
}

void end_if(int64_t pool0, int64_t pool1) {
  TORCH_CHECK(!frames.empty(), "end_if without begin_if");
  auto dev = c10::cuda::current_device();
  auto pool = pool_of(pool0, pool1);
  Frame f = frames.back();
  frames.pop_back();
  cudaGraph_t body{};
  SPECEE_CK(cudaStreamEndCapture(f.child.stream(), &body));
  c10::cuda::setCurrentCUDAStream(f.parent);
  c10::cuda::CUDACachingAllocator::endAllocateToPool(dev, pool);
  c10::cuda::CUDACachingAllocator::beginAllocateToPool(
      dev, pool, filter_for(frames.empty() ? root_id : frames.back().child_id));
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("begin_if", &begin_if, "open an IF node (taken when a[0] != 0 and, if given, b[0] != 0)");
  m.def("end_if", &end_if, "close the innermost IF node");
  m.def("init_streams", &init_streams, "create the body-capture streams (one per nesting level)");
}
"""

COND_CU = r"""
#include <cuda_runtime.h>
__global__ void specee_set_cond_kernel(cudaGraphConditionalHandle h, const unsigned char* a, const unsigned char* b) {
  unsigned int v = a[0] != 0;
  if (b != nullptr) v = v && (b[0] != 0);
  cudaGraphSetConditional(h, v);
}
void specee_launch_set_cond(cudaGraphConditionalHandle h, const void* a, const void* b, cudaStream_t s) {
  specee_set_cond_kernel<<<1, 1, 0, s>>>(h, (const unsigned char*)a, (const unsigned char*)b);
}
"""

_COND_EXT = None


def cond_ext():
    """Build (once, cached on disk) and load the IF-node extension. Needs nvcc (the GPU machine has it)."""
    global _COND_EXT
    if _COND_EXT is None:
        from torch.utils.cpp_extension import load_inline

        if torch.cuda.is_available() and "TORCH_CUDA_ARCH_LIST" not in os.environ:
            os.environ["TORCH_CUDA_ARCH_LIST"] = "{}.{}".format(*torch.cuda.get_device_capability())
        ext = load_inline(name="specee_graph_if", cpp_sources=[COND_CPP], cuda_sources=[COND_CU],
                          extra_cflags=["-O2"], extra_cuda_cflags=["-O2"], verbose=False)
        if torch.cuda.is_available():
            ext.init_streams(4)
        _COND_EXT = ext
    return _COND_EXT


def reserve_nesting(depth: int, backend: str | None) -> None:
    """Before a capture that nests IF nodes `depth` deep: the extension captures each level's body on a stream of
    its own, created here (outside any capture). torch's own IF nodes need nothing."""
    if backend == "ext":
        cond_ext().init_streams(max(4, int(depth)))


def cond_backend() -> str | None:
    """'torch' (CUDAGraph.begin_capture_to_if_node, torch >= 2.12), 'ext' (our extension), or None."""
    if hasattr(torch.cuda.CUDAGraph, "begin_capture_to_if_node"):
        return "torch"
    try:
        cond_ext()
        return "ext"
    except Exception as ex:  # noqa: BLE001
        log("IF-node extension unavailable:", repr(ex)[:1500])
        return None


@contextlib.contextmanager
def if_node(g, a, b=None, backend: str = "ext", pool=None):
    """Capture the block into an IF node of graph `g`: taken when a[0] (and b[0], if given) != 0.
    `pool`: the mempool handle `g` is being captured with (torch 2.11 cannot report it mid-capture)."""
    if backend == "torch":
        with contextlib.ExitStack() as st:
            for pred in (a, b):
                if pred is not None:
                    g.begin_capture_to_if_node(pred)
                    st.callback(g.end_capture_to_conditional_node)
            yield
        return
    ext = cond_ext()
    p0, p1 = pool if pool is not None else g.pool()
    ext.begin_if(a, b, p0, p1)
    try:
        yield
    finally:
        ext.end_if(p0, p1)


__all__ = ["cond_backend", "cond_ext", "if_node", "reserve_nesting"]
