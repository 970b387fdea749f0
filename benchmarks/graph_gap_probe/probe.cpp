// The C++ half of benchmarks/graph_gap_probe.py: chains of small kernels captured as one CUDA graph in a
// libtorch C++ process, timed per replay. The Python half times the same chains in a Python process; the
// difference per kernel says whether the C++ runner's extra idle per kernel boundary (cpp_bench, sessions
// 10-14) comes with the process (any kernel idles more) or with the AOTI-loaded kernels (only those do).
//   graph_gap_probe N [CUBIN NAME NUM_WARPS SHARED]
//   graph_gap_probe gemv SPEC   (the product's GEMV chain, by hand: see gemv_chain)
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

// ------------------------------------------------------------------------------------------ GEMV chain
// The product's `_gemv_kernel` (the Python half compiles it and writes a spec), launched by hand through the
// driver API on per-layer weight buffers: does the runner's extra idle (cpp_bench, session 16: only while the
// weights stream from HBM) come with any C++ launch of these cubins, or only with the AOTI package's?
// Spec lines: "layers L" and "kernel SLOT CUBIN NAME WARPS SHARED GRIDX GRIDY N K PRO HAS_RES EPS_BYTES".
struct Driver {
  using Load = int (*)(void**, const char*);
  using LoadData = int (*)(void**, const void*);
  using GetFn = int (*)(void**, void*, const char*);
  using Launch = int (*)(void*, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, void*,
                         void**, void**);
  using ParamInfo = int (*)(void*, size_t, size_t*, size_t*);
  Load load = nullptr;
  LoadData load_data = nullptr;
  GetFn get_fn = nullptr;
  Launch launch = nullptr;
  ParamInfo param_info = nullptr;
  Driver() {
    void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!lib) return;
    load = reinterpret_cast<Load>(dlsym(lib, "cuModuleLoad"));
    load_data = reinterpret_cast<LoadData>(dlsym(lib, "cuModuleLoadData"));
    get_fn = reinterpret_cast<GetFn>(dlsym(lib, "cuModuleGetFunction"));
    launch = reinterpret_cast<Launch>(dlsym(lib, "cuLaunchKernel"));
    param_info = reinterpret_cast<ParamInfo>(dlsym(lib, "cuFuncGetParamInfo"));
  }
  bool ok() const { return load && load_data && get_fn && launch && param_info; }
};

struct GemvKernel {
  std::string cubin, name;
  unsigned warps = 0, shared = 0, gx = 0, gy = 0;
  int64_t n = 0, k = 0;
  int pro = 0, has_res = 0, eps_bytes = 4;
  void* fn = nullptr;
};

// One launch's parameters, stored by value: the kernel's 8 pointers, N (i32), eps (f32 or f64), then the
// Triton launcher's scratch pointers (null), checked against cuFuncGetParamInfo.
struct Params {
  std::vector<std::array<unsigned char, 8>> store;
  std::vector<void*> ptrs;
};

bool make_params(const Driver& d, const GemvKernel& k, const std::array<void*, 8>& p, Params& out) {
  size_t off = 0, size = 0;
  std::vector<size_t> sizes;
  for (size_t i = 0; d.param_info(k.fn, i, &off, &size) == 0; ++i) sizes.push_back(size);
  if (sizes.size() < 10) return false;
  out.store.assign(sizes.size(), {});
  for (size_t i = 0; i < 8; ++i) {
    if (sizes[i] != 8) return false;
    std::memcpy(out.store[i].data(), &p[i], 8);
  }
  const int32_t n = int32_t(k.n);
  if (sizes[8] != 4 || sizes[9] != size_t(k.eps_bytes)) return false;
  std::memcpy(out.store[8].data(), &n, 4);
  if (k.eps_bytes == 8) {
    const double eps = 1e-5;
    std::memcpy(out.store[9].data(), &eps, 8);
  } else {
    const float eps = 1e-5f;
    std::memcpy(out.store[9].data(), &eps, 4);
  }
  for (size_t i = 10; i < sizes.size(); ++i)
    if (sizes[i] != 8) return false;  // the scratch pointers, left null
  for (auto& s : out.store) out.ptrs.push_back(s.data());
  return true;
}

// The chain of the four GEMVs per layer over `layers` layers (same: layer 0's weights every time), for the
// kernels loaded from their files (by_data: from memory, as Triton's launcher loads them).
std::vector<double> gemv_chain(const Driver& d, std::vector<GemvKernel> ks, int layers, bool same, bool by_data,
                               c10::cuda::CUDAStream stream) {
  for (auto& k : ks) {
    void* mod = nullptr;
    int rc;
    if (by_data) {
      FILE* f = std::fopen(k.cubin.c_str(), "rb");
      if (!f) return {};
      std::string bytes;
      char buf[65536];
      size_t got;
      while ((got = std::fread(buf, 1, sizeof buf, f)) > 0) bytes.append(buf, got);
      std::fclose(f);
      rc = d.load_data(&mod, bytes.data());
    } else {
      rc = d.load(&mod, k.cubin.c_str());
    }
    if (rc != 0 || d.get_fn(&k.fn, mod, k.name.c_str()) != 0) {
      std::fprintf(stderr, "cannot load %s from %s\n", k.name.c_str(), k.cubin.c_str());
      return {};
    }
  }
  const auto f32 = at::TensorOptions().dtype(at::kFloat).device(at::kCUDA);
  const int64_t D = ks[0].k;
  std::vector<std::vector<at::Tensor>> w(static_cast<size_t>(layers));
  for (auto& lw : w)
    for (const auto& k : ks) lw.push_back(at::randn({k.n, k.k}, f32) * 0.02);
  at::Tensor ln = at::ones({D}, f32), att = at::randn({D}, f32);
  std::vector<at::Tensor> h{at::randn({D}, f32)}, qkv, h1, gu;
  for (int i = 0; i < layers; ++i) {
    qkv.push_back(at::empty({ks[0].n}, f32));
    h1.push_back(at::empty({D}, f32));
    gu.push_back(at::empty({ks[2].n}, f32));
    h.push_back(at::empty({D}, f32));
  }
  std::vector<std::array<at::Tensor, 3>> ws;  // split-K scratch per kernel (zero at rest)
  for (const auto& k : ks)
    ws.push_back({at::zeros({k.n}, f32), at::zeros({k.n}, f32), at::zeros({k.n}, f32.dtype(at::kInt))});
  std::vector<Params> params;
  for (int i = 0; i < layers; ++i) {
    const auto& lw = w[size_t(same ? 0 : i)];
    // x, w, res (y when none), norm_w (x when none), y: the product's argument choices
    const std::array<std::array<at::Tensor, 5>, 4> io = {{
        {h[size_t(i)], lw[0], qkv[size_t(i)], ln, qkv[size_t(i)]},
        {att, lw[1], h[size_t(i)], att, h1[size_t(i)]},
        {h1[size_t(i)], lw[2], gu[size_t(i)], ln, gu[size_t(i)]},
        {gu[size_t(i)], lw[3], h1[size_t(i)], gu[size_t(i)], h[size_t(i) + 1]},
    }};
    for (size_t j = 0; j < 4; ++j) {
      Params p;
      std::array<void*, 8> ptr{};
      for (size_t a = 0; a < 5; ++a) ptr[a] = io[j][a].data_ptr();
      for (size_t a = 0; a < 3; ++a) ptr[5 + a] = ws[j][a].data_ptr();
      if (!make_params(d, ks[j], ptr, p)) {
        std::fprintf(stderr, "%s: its parameters are not the spec's layout\n", ks[j].name.c_str());
        return {};
      }
      params.push_back(std::move(p));
    }
  }
  stream.synchronize();
  const auto raw = stream.stream();
  return time_graph([&] {
    for (size_t c = 0; c < params.size(); ++c) {
      const auto& k = ks[c % 4];
      d.launch(k.fn, k.gx, k.gy, 1, k.warps * 32, 1, 1, k.shared, raw, params[c].ptrs.data(), nullptr);
    }
  }, stream);
}

// "f32" / "f64" / "pkg" kernel sets from the spec (SLOT f32_0..3, f64_0..3, pkg_0..3: an AOTI package's own cubins)
bool read_spec(const char* path, int& layers, std::vector<GemvKernel>& f32, std::vector<GemvKernel>& f64,
               std::vector<GemvKernel>& pkg) {
  FILE* f = std::fopen(path, "r");
  if (!f) return false;
  char word[64], slot[64], cubin[4096], name[512];
  while (std::fscanf(f, "%63s", word) == 1) {
    if (std::string(word) == "layers") {
      if (std::fscanf(f, "%d", &layers) != 1) break;
    } else if (std::string(word) == "kernel") {
      GemvKernel k;
      long long n = 0, kk = 0;
      if (std::fscanf(f, "%63s %4095s %511s %u %u %u %u %lld %lld %d %d %d", slot, cubin, name, &k.warps, &k.shared,
                      &k.gx, &k.gy, &n, &kk, &k.pro, &k.has_res, &k.eps_bytes) != 12)
        break;
      k.cubin = cubin;
      k.name = name;
      k.n = n;
      k.k = kk;
      const std::string s(slot);
      (s.rfind("f64", 0) == 0 ? f64 : s.rfind("pkg", 0) == 0 ? pkg : f32).push_back(k);
    }
  }
  std::fclose(f);
  return layers > 0 && f32.size() == 4 && (f64.empty() || f64.size() == 4) && (pkg.empty() || pkg.size() == 4);
}

}  // namespace

int main(int argc, char** argv) {
  auto stream = c10::cuda::getStreamFromPool(false, 0);
  c10::cuda::CUDAStreamGuard guard(stream);
  if (argc > 2 && std::string(argv[1]) == "gemv") {  // graph_gap_probe gemv SPEC
    int layers = 0;
    std::vector<GemvKernel> f32, f64, pkg;
    const Driver d;
    if (!d.ok() || !read_spec(argv[2], layers, f32, f64, pkg)) {
      std::fprintf(stderr, "cannot read the GEMV spec %s (or libcuda)\n", argv[2]);
      return 1;
    }
    std::string out = "{\"layers\": " + std::to_string(layers);
    auto put = [&](const char* key, const std::vector<double>& v) {
      out += std::string(", \"") + key + "\": " + list(v);
    };
    put("f32_hbm", gemv_chain(d, f32, layers, false, false, stream));
    put("f32_l2", gemv_chain(d, f32, layers, true, false, stream));
    put("f32_hbm_loaddata", gemv_chain(d, f32, layers, false, true, stream));
    if (!f64.empty()) {
      put("f64_hbm", gemv_chain(d, f64, layers, false, false, stream));
      put("f64_l2", gemv_chain(d, f64, layers, true, false, stream));
    }
    if (!pkg.empty()) {  // the package's own cubins, with its wrapper's grids (loaded from their files, as AOTI does)
      put("pkg_hbm", gemv_chain(d, pkg, layers, false, false, stream));
      put("pkg_l2", gemv_chain(d, pkg, layers, true, false, stream));
    }
    std::printf("%s}\n", out.c_str());
    return 0;
  }
  const int n = argc > 1 ? std::atoi(argv[1]) : 180;
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
