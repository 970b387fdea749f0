// The C++ half of benchmarks/graph_gap_probe.py: chains of small kernels captured as one CUDA graph in a
// libtorch C++ process, timed per replay. The Python half times the same chains in a Python process; the
// difference per kernel says whether the C++ runner's extra idle per kernel boundary (cpp_bench, sessions
// 10-14) comes with the process (any kernel idles more) or with the AOTI-loaded kernels (only those do).
//   graph_gap_probe N [CUBIN NAME NUM_WARPS SHARED]
// prints one JSON line: {"native_us": [per replay...], "triton_us": [...], "stream_us": [...]} (N kernels
// per replay).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAEvent.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <dlfcn.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

namespace {

// five timings of 20 replays each (CUDA events on the capture stream), us per replay
std::vector<double> time_graph(const std::function<void()>& body, c10::cuda::CUDAStream stream) {
  at::cuda::CUDAGraph graph;
  graph.capture_begin({0, 0}, cudaStreamCaptureModeRelaxed);
  body();
  graph.capture_end();
  for (int i = 0; i < 50; ++i) graph.replay();  // upload, clocks up
  stream.synchronize();
  std::vector<double> out;
  for (int r = 0; r < 5; ++r) {
    at::cuda::CUDAEvent a(cudaEventDefault), b(cudaEventDefault);
    a.record(stream);
    for (int i = 0; i < 20; ++i) graph.replay();
    b.record(stream);
    b.synchronize();
    out.push_back(a.elapsed_time(b) * 1000.0 / 20);
  }
  return out;
}

std::string list(const std::vector<double>& v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return s + "]";
}

}  // namespace

int main(int argc, char** argv) {
  const int n = argc > 1 ? std::atoi(argv[1]) : 180;
  auto stream = c10::cuda::getStreamFromPool(false, 0);
  c10::cuda::CUDAStreamGuard guard(stream);
  at::Tensor x = at::zeros({576}, at::TensorOptions().dtype(at::kHalf).device(at::kCUDA));
  x.add_(1);
  stream.synchronize();
  const auto native = time_graph([&] { for (int i = 0; i < n; ++i) x.add_(1); }, stream);
  // N sums, each over its own 2 MB fp32 buffer (360 MB in all at N = 180, far past the L2): every kernel
  // streams from HBM, as the decode chain's GEMVs do (session 16: the runner's extra idle follows that)
  std::vector<at::Tensor> bufs;
  for (int i = 0; i < n; ++i) bufs.push_back(at::ones({512 * 1024}, at::TensorOptions().dtype(at::kFloat).device(at::kCUDA)));
  at::Tensor y = at::zeros({}, bufs[0].options());
  stream.synchronize();
  const auto streaming = time_graph([&] { for (int i = 0; i < n; ++i) at::sum_out(y, bufs[size_t(i)], {0}); }, stream);
  std::vector<double> triton;
  if (argc > 5) {  // the Python half's Triton kernel, from its cubin, launched through the driver API
    using Load = int (*)(void**, const char*);
    using GetFn = int (*)(void**, void*, const char*);
    using Launch = int (*)(void*, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, void*,
                           void**, void**);
    using ParamInfo = int (*)(void*, size_t, size_t*, size_t*);
    void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    auto load = reinterpret_cast<Load>(dlsym(lib, "cuModuleLoad"));
    auto get_fn = reinterpret_cast<GetFn>(dlsym(lib, "cuModuleGetFunction"));
    auto launch = reinterpret_cast<Launch>(dlsym(lib, "cuLaunchKernel"));
    auto param_info = reinterpret_cast<ParamInfo>(dlsym(lib, "cuFuncGetParamInfo"));
    void* mod = nullptr;
    void* fn = nullptr;
    if (!load || load(&mod, argv[2]) != 0 || get_fn(&fn, mod, argv[3]) != 0 || !param_info) {
      std::fprintf(stderr, "cannot load %s from %s\n", argv[3], argv[2]);
      return 1;
    }
    const unsigned warps = unsigned(std::atoi(argv[4])), shared = unsigned(std::atoi(argv[5]));
    // the kernel's parameters by their sizes: the pointer first, the element count (i32), null scratch pointers
    std::vector<std::array<unsigned char, 8>> store;
    size_t off = 0, size = 0;
    for (size_t i = 0; param_info(fn, i, &off, &size) == 0; ++i) store.push_back({});
    void* ptr = x.data_ptr();
    int count = int(x.numel());
    std::memcpy(store[0].data(), &ptr, sizeof ptr);
    std::memcpy(store[1].data(), &count, sizeof count);
    std::vector<void*> params;
    for (auto& s : store) params.push_back(s.data());
    const auto raw = stream.stream();
    triton = time_graph([&] {
      for (int i = 0; i < n; ++i) launch(fn, 1, 1, 1, warps * 32, 1, 1, shared, raw, params.data(), nullptr);
    }, stream);
  }
  std::printf("{\"kernels\": %d, \"native_us\": %s, \"triton_us\": %s, \"stream_us\": %s}\n", n,
              list(native).c_str(), list(triton).c_str(), list(streaming).c_str());
  return 0;
}
