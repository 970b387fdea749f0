// The SpecEE decode loop in C++ over AOTInductor packages (see include/specee/runtime.h).
//
// A line-for-line port of specee_compile/runtime/decoder.py (Decoder._step, _dense_step, _rollback),
// draft/eagle.py (EagleSource) and predictors/schedule.py (OnlineScheduler): the model math lives in
// the packages (layer, head, exit_score, draft: the Python functions, compiled by AOTInductor); this
// file holds only the loop, the caches and the bookkeeping. Shapes (batch 1): h [1, q, D]; pos [q];
// the KV cache K, V [L, Hkv, T, hd] with T = max_len + 1, valid [L, T] (each row 64-byte aligned).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <sys/stat.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/cuda.h>
#ifdef SPECEE_CUDA
#include <ATen/cuda/CUDAEvent.h>
#include <torch/csrc/autograd/profiler_kineto.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <dlfcn.h>
#include <optional>
#endif

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <fstream>
#include <functional>
#include <map>
#include <set>
#include <tuple>
#include <sstream>

#include "json.h"
#include "sha256.h"
#include "specee/runtime.h"

namespace specee {
namespace {

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

std::string read_file(const std::string& path, size_t limit) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) throw Error(path + " does not exist");
  if (!S_ISREG(st.st_mode)) throw Error(path + " is not a regular file");
  if (static_cast<size_t>(st.st_size) > limit) throw Error(path + " is too large to be what it claims");
  std::ifstream f(path, std::ios::binary);
  if (!f) throw Error("cannot read " + path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// ---------------------------------------------------------------------------------- safetensors
// 8-byte little-endian header size N, N bytes of JSON {name: {dtype, shape, data_offsets}}, data.
std::map<std::string, at::Tensor> load_safetensors(const std::string& path) {
  std::ifstream f(path, std::ios::binary | std::ios::ate);
  if (!f) throw Error("cannot read " + path);
  const uint64_t size = static_cast<uint64_t>(f.tellg());
  f.seekg(0);
  uint64_t n = 0;
  unsigned char hb[8];
  if (size < 8 || !f.read(reinterpret_cast<char*>(hb), 8)) throw Error(path + " is truncated (no safetensors header)");
  for (int i = 7; i >= 0; --i) n = (n << 8) | hb[i];
  if (n > size - 8 || n > (100u << 20)) throw Error(path + ": safetensors header size " + std::to_string(n) +
                                                    " exceeds the file (" + std::to_string(size) + " bytes): corrupt");
  std::string header(n, '\0');
  f.read(header.data(), static_cast<std::streamsize>(n));
  json::Value h;
  try {
    h = json::parse(header);
  } catch (const Error& e) {
    throw Error(path + ": " + e.what());
  }
  if (h.kind != json::Value::Object) throw Error(path + ": safetensors header is not a JSON object");
  const uint64_t data0 = 8 + n, data_size = size - data0;
  std::map<std::string, at::Tensor> out;
  for (const auto& [name, meta] : h.obj) {
    if (name == "__metadata__") continue;
    try {
      const std::string& dt = meta.at("dtype").string();
      at::ScalarType st;
      size_t esize;
      if (dt == "F32") { st = at::kFloat; esize = 4; }
      else if (dt == "F16") { st = at::kHalf; esize = 2; }
      else if (dt == "BF16") { st = at::kBFloat16; esize = 2; }
      else if (dt == "I64") { st = at::kLong; esize = 8; }
      else if (dt == "I32") { st = at::kInt; esize = 4; }
      else if (dt == "BOOL") { st = at::kBool; esize = 1; }
      else throw Error("dtype " + dt + " is not supported");
      std::vector<int64_t> shape;
      uint64_t numel = 1;
      for (const auto& d : meta.at("shape").arr) {
        shape.push_back(d.integer());
        numel *= static_cast<uint64_t>(d.integer());
      }
      const auto& off = meta.at("data_offsets").arr;
      if (off.size() != 2) throw Error("data_offsets is not [begin, end]");
      uint64_t b = off[0].integer(), e = off[1].integer();
      if (b > e || e > data_size || e - b != numel * esize)
        throw Error("data_offsets [" + std::to_string(b) + ", " + std::to_string(e) + "] do not fit its shape or the file");
      at::Tensor t = at::empty(shape, at::TensorOptions().dtype(st));
      f.seekg(static_cast<std::streamoff>(data0 + b));
      if (numel && !f.read(static_cast<char*>(t.data_ptr()), static_cast<std::streamsize>(e - b)))
        throw Error("cannot read its data");
      out.emplace(name, t);
    } catch (const Error& e) {
      throw Error(path + ": tensor '" + name + "': " + e.what() + " (corrupt weights: re-export)");
    }
  }
  return out;
}

// A copy of t [N, ...] whose rows t[i] each start 64-byte aligned (same sizes; dim 0's stride padded).
// AOTInductor's CUDA packages copy an input whose address is not 16-byte aligned before their Triton
// kernels read it: a per-call clone, and for an input the package writes (the cache's `valid` rows) the
// writes land in the clone and are lost (seen on the H200: decode after the prefill went wrong).
at::Tensor row_aligned(const at::Tensor& t) {
  const int64_t n = t.size(0), row = t.numel() / std::max<int64_t>(n, 1);
  const int64_t per = std::max<int64_t>(1, 64 / int64_t(t.element_size()));
  const int64_t padded = (row + per - 1) / per * per;
  at::Tensor buf = at::zeros({n, padded}, t.options());
  buf.narrow(1, 0, row).copy_(t.reshape({n, row}));
  std::vector<int64_t> strides = t.contiguous().strides().vec();
  strides[0] = padded;
  return buf.as_strided(t.sizes(), strides);
}

// ---------------------------------------------------------------------------------- packages
struct Package {
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> loader;
  std::vector<at::Tensor> run(const std::vector<at::Tensor>& in) { return loader->run(in); }
};

}  // namespace

// ================================================================================== Impl
struct Runtime::Impl {
  Options opt;
  std::string dir;
  at::Device dev{at::kCPU};
  at::ScalarType dtype = at::kFloat;
  // model facts
  int L = 0, D = 0, Hkv = 0, hd = 0, V = 0, max_len = 0, T = 0, bucket = 64, k = 0;
  bool specee = false, lossless = false, backfill = false;
  std::set<int64_t> eos;
  // the manifest's `pdl_waiting_kernels` (packages exported under PDL `all`, the default on sm_90+): name patterns
  // of the kernels that wait for the kernel before them before any global access (plugins/pdl.py); empty: none does
  std::vector<std::string> pdl_waiting;
  // weights (on dev)
  at::Tensor embed, norm, head, cos, sin, keys;
  at::Tensor attn_cnt;  // layer1's fused attention: per-head arrival counters (int32 [H], zero between calls)
  at::Tensor attn_ws;   // and its split workspace (fp32, any contents), one for every layer as the Python step's
  std::vector<std::vector<at::Tensor>> layer_w;
  at::Tensor pw1, pb1, pw2, pb2;
  std::vector<at::Tensor> draft_w;
  at::Tensor vocab_ids, head_rows_static;
  std::vector<int64_t> vocab_ids_host;
  // packages
  // layer1: one row (CUDA: fused kernels; CPU: GEMV reductions); head1: one row, static shapes
  Package layer_pkg, layer1_pkg, head_pkg, head1_pkg, exit_pkg, draft_pkg;
  // program
  std::vector<int> exit_layers;         // exit points < L-1
  std::map<int, double> thresholds;
  std::set<int> offline, pred_layers;
  std::map<int, double> exit_rates, eval_share;  // held-out exit / evaluation share per exit point
  double exit_precision = -1;                    // held-out share of exits the dense model confirms (< 0: unknown)
  bool selected = false, as_dense = false;       // the cost check ran; no exit point pays: decode dense
  std::vector<int> kept_points;
  std::vector<std::pair<int, std::string>> dropped_points;
  std::string costs_source;
  // KV cache
  at::Tensor K, Vc, valid;
  // set by runs of the step outside a generation (graph warm-ups and captures, cost timing): they leave values in
  // slots no position holds yet, inf / NaN in fp16, and a masked attention still multiplies masked slots by zero
  // (0 * NaN = NaN). start() then zeroes the values of the cache and the draft, not only `valid`.
  bool junk = false;
  // decode state
  struct Row {
    int64_t pos;
    int done;
    at::Tensor h;  // [1, 1, D]
  };
  std::vector<int64_t> seq;
  std::vector<Row> pending;
  std::deque<int> history;  // OnlineScheduler: the last `online_window` exit layers
  Result res;
  // EagleSource state
  int dn = 0, dkv = 0, dhd = 0;
  std::vector<int64_t> d_ids;
  at::Tensor d_feats, d_k, d_v, d_extra_rows, d_proposal;
  int64_t d_cache_len = 0;
  std::vector<int64_t> d_extra_ids, d_extra_first;
  std::set<int64_t> d_extra_set, d_static;
  bool context_vocab = true;
  Result captured;  // what capture measures once (capture_s, graph_*_us): every generate's result starts from it
#ifdef SPECEE_CUDA
  // The dense step as CUDA graphs, one per attention length (the Python runtime's whole-step graph):
  // the token is fed forward on the device (out -> tok, pos + 1 inside the graph), so step t+1 is
  // launched before step t's token reaches the host (a pinned two-slot ring + one event per slot).
  struct StepGraphs {
    at::Tensor tok, pos, out, sel0, ring;  // device int64 [1] x 3, device {0}, pinned host int64 [2]
    // two instances per length, replayed alternately: a graph's launch is ordered behind that executable's
    // previous launch, so with one instance step t+1's launch waited for step t (the Python step's finding)
    std::map<int, std::array<std::unique_ptr<at::cuda::CUDAGraph>, 2>> by_len;
    std::optional<c10::cuda::CUDAStream> stream;
    at::cuda::CUDAEvent ev[2];
  };
  std::unique_ptr<StepGraphs> graphs;
#endif

  // ---------------------------------------------------------------------------- load
  void load(const std::string& directory, const Options& o) {
    opt = o;
    dir = directory;
    if (opt.mode != "dense" && opt.mode != "approximate" && opt.mode != "lossless")
      throw Error("mode '" + opt.mode + "' is not one of dense, approximate, lossless");
    if (opt.kv != "skip" && opt.kv != "backfill") throw Error("kv '" + opt.kv + "' is not one of skip, backfill");
    if (opt.mode == "lossless" && opt.kv != "backfill")
      throw Error("mode=lossless needs kv=backfill (the backfill pass is what verifies exits); pass --kv backfill");
    if (opt.max_new_tokens < 1) throw Error("max_new_tokens must be >= 1");
    if (opt.max_pending < 0) throw Error("max_pending must be >= 0");
    if (opt.threshold > 1.0) throw Error("threshold must be in [0, 1]");
    if (opt.threads > 0) at::set_num_threads(opt.threads);
    specee = opt.mode != "dense";
    lossless = opt.mode == "lossless";
    backfill = opt.kv == "backfill";
    try {
      dev = at::Device(opt.device);
    } catch (const c10::Error&) {
      throw Error("unknown device '" + opt.device + "': expected cpu, cuda or cuda:N");
    }
    if (dev.is_cuda() && !torch::cuda::is_available())
      throw Error("device " + opt.device + " asked for, but this libtorch has no usable CUDA device");

    struct stat st;
    if (::stat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode))
      throw Error("artifact directory " + dir + " does not exist; export it with "
                  "`specee-compile export MODEL --format aoti -o " + dir + "`");
    const std::string mpath = dir + "/manifest.json";
    if (::stat(mpath.c_str(), &st) != 0)
      throw Error(dir + " has no manifest.json: not an exported artifact directory, or a partial write; re-export it");
    json::Value m;
    try {
      m = json::parse(read_file(mpath, 64u << 20));
    } catch (const Error& e) {
      throw Error(mpath + ": " + e.what() + "; re-export the directory");
    }
    const json::Value* cpp = nullptr;
    try {
      if (m.at("format_version").integer() != 1) throw Error("format_version is not 1");
      if (!m.has("cpp") || m.at("cpp").at("format").string() != "specee-aoti")
        throw Error("holds no AOTInductor export (manifest 'cpp' section); export it with --format aoti");
      cpp = &m.at("cpp");
      verify_files(m.at("files"), *cpp);
      read_facts(*cpp);
    } catch (const Error& e) {
      const std::string msg = e.what();
      if (msg.rfind(dir, 0) == 0) throw;
      throw Error(mpath + ": " + msg);
    }
    load_weights(*cpp);
    load_packages(*cpp);
    const auto f = at::TensorOptions().dtype(dtype).device(dev);
    K = at::zeros({L, Hkv, T, hd}, f);
    Vc = at::zeros({L, Hkv, T, hd}, f);
    valid = row_aligned(at::zeros({L, T}, at::TensorOptions().dtype(at::kBool).device(dev)));  // the layer writes it
    keys = at::arange(max_len, at::TensorOptions().dtype(at::kLong).device(dev));
    if (layer1_pkg.loader && cpp->has("layer1_attn_counters") && cpp->at("layer1_attn_counters").b)
      attn_cnt = at::zeros({cpp->at("num_heads").integer()}, at::TensorOptions().dtype(at::kInt).device(dev));
    if (attn_cnt.defined() && cpp->has("layer1_attn_workspace") && cpp->at("layer1_attn_workspace").integer() > 0)
      attn_ws = at::empty({cpp->at("layer1_attn_workspace").integer()},
                          at::TensorOptions().dtype(at::kFloat).device(dev));
  }

  void verify_files(const json::Value& files, const json::Value& cpp) {
    if (files.kind != json::Value::Object) throw Error("'files' is not an object");
    std::vector<std::string> need = {cpp.at("weights").string()};
    for (const auto& [name, rel] : cpp.at("packages").obj)
      if (specee || (name != "exit_score" && name != "draft")) need.push_back(rel.string());
    for (const auto& rel : need)
      if (!files.has(rel)) throw Error("does not list " + rel + " (needed by the runner); re-export the directory");
    for (const auto& [rel, meta] : files.obj) {
      if (rel.empty() || rel[0] == '/' || rel.find("..") != std::string::npos)
        throw Error("lists a path outside the directory: " + rel);
      const std::string p = dir + "/" + rel;
      struct stat st;
      if (::stat(p.c_str(), &st) != 0) throw Error(dir + ": " + rel + " is missing (listed in manifest.json); re-export");
      if (!S_ISREG(st.st_mode)) throw Error(dir + ": " + rel + " is not a regular file");
      const long long want = meta.at("bytes").integer();
      if (st.st_size != want)
        throw Error(dir + ": " + rel + " has " + std::to_string(st.st_size) + " bytes, the manifest says " +
                    std::to_string(want) + " (partial or corrupt); re-export");
      if (opt.verify_sha256 && sha256_file(p) != meta.at("sha256").string())
        throw Error(dir + ": " + rel + " checksum differs from the manifest (corrupt or modified); re-export");
    }
  }

  void read_facts(const json::Value& c) {
    L = int(c.at("num_layers").integer());
    D = int(c.at("hidden").integer());
    Hkv = int(c.at("num_kv_heads").integer());
    hd = int(c.at("head_dim").integer());
    V = int(c.at("vocab").integer());
    max_len = int(c.at("max_len").integer());
    T = int(c.at("cache_len").integer());
    bucket = int(c.at("attn_bucket").integer());
    const std::string& dt = c.at("dtype").string();
    dtype = dt == "float16" ? at::kHalf : dt == "bfloat16" ? at::kBFloat16 : at::kFloat;
    const std::string& pdev = c.at("device").string();
    if (pdev != (dev.is_cuda() ? "cuda" : "cpu"))
      throw Error("the packages were compiled for " + pdev + ", not " + opt.device +
                  "; re-export with --device " + (dev.is_cuda() ? "cuda" : "cpu") + " or pass --device " + pdev);
    if (c.has("pdl") && c.at("pdl").string() == "all" && c.has("pdl_waiting_kernels"))
      for (const auto& p : c.at("pdl_waiting_kernels").arr) pdl_waiting.push_back(p.string());
    if (opt.use_manifest_eos)
      for (const auto& e : c.at("eos_ids").arr) eos.insert(e.integer());
    for (auto e : opt.eos_ids) eos.insert(e);
    if (!specee) return;
    if (!c.has("exit_points") || !c.at("packages").has("draft"))
      throw Error("mode " + opt.mode + " needs exit predictors and an EAGLE draft, and this export has " +
                  (c.has("exit_points") ? "no EAGLE draft" : "none") + "; use --mode dense or export with SpecEE artifacts");
    k = int(c.at("num_candidates").integer());
    for (const auto& ep : c.at("exit_points").arr) {
      int layer = int(ep.arr.at(0).integer());
      double thr = ep.arr.at(1).number();
      thresholds[layer] = opt.threshold >= 0 ? opt.threshold : thr;
      if (layer < L - 1) exit_layers.push_back(layer);
    }
    std::sort(exit_layers.begin(), exit_layers.end());
    for (const auto& x : c.at("offline_layers").arr) offline.insert(int(x.integer()));
    if (c.has("exit_rates"))
      for (const auto& [layer, r] : c.at("exit_rates").obj) exit_rates[std::stoi(layer)] = r.number();
    if (c.has("eval_share"))
      for (const auto& [layer, r] : c.at("eval_share").obj) eval_share[std::stoi(layer)] = r.number();
    if (c.has("exit_precision") && c.at("exit_precision").kind != json::Value::Null)
      exit_precision = c.at("exit_precision").number();
    for (const auto& x : c.at("predictor_layers").arr) pred_layers.insert(int(x.integer()));
    const auto& d = c.at("draft");
    dn = int(d.at("num_layers").integer());
    dkv = int(d.at("num_kv_heads").integer());
    dhd = int(d.at("head_dim").integer());
    context_vocab = d.at("context_vocab").b;
  }

  at::Tensor take(std::map<std::string, at::Tensor>& w, const std::string& name, std::vector<int64_t> shape,
                  bool to_dtype = true) {
    auto it = w.find(name);
    if (it == w.end()) throw Error(dir + "/weights.safetensors has no tensor '" + name + "'; re-export");
    at::Tensor t = it->second;
    if (!shape.empty() && t.sizes().vec() != shape) {
      std::ostringstream s;
      s << dir << "/weights.safetensors: '" << name << "' has shape " << t.sizes() << ", the manifest implies "
        << at::IntArrayRef(shape) << "; re-export";
      throw Error(s.str());
    }
    return to_dtype ? t.to(dev, dtype).contiguous() : t.to(dev).contiguous();
  }

  void load_weights(const json::Value& c) {
    auto w = load_safetensors(dir + "/" + c.at("weights").string());
    embed = take(w, "embed", {V, D});
    norm = take(w, "norm", {D});
    head = take(w, "head", {V, D});
    cos = take(w, "cos", {max_len, hd});
    sin = take(w, "sin", {max_len, hd});
    static const char* keys_[] = {"ln1", "wqkv", "bqkv", "wo", "ln2", "wgu", "wd"};
    const bool bias = c.at("qkv_bias").b;
    for (int i = 0; i < L; ++i) {
      std::vector<at::Tensor> lw;
      for (const char* kname : keys_) {
        if (std::string(kname) == "bqkv" && !bias) continue;
        lw.push_back(take(w, "layers." + std::to_string(i) + "." + kname, {}));
      }
      layer_w.push_back(std::move(lw));
    }
    if (!specee) return;
    pw1 = row_aligned(take(w, "predictors.w1", {}, false).to(at::kFloat));  // indexed per layer: pw1[i]
    pb1 = row_aligned(take(w, "predictors.b1", {}, false).to(at::kFloat));
    pw2 = row_aligned(take(w, "predictors.w2", {}, false).to(at::kFloat));
    pb2 = row_aligned(take(w, "predictors.b2", {}, false).to(at::kFloat));
    if (pw1.dim() != 3 || pw1.size(0) != L || pw1.size(2) != 3 * k)
      throw Error(dir + "/weights.safetensors: predictors.w1 does not fit " + std::to_string(L) + " layers and k=" +
                  std::to_string(k) + "; re-export");
    for (const auto& nm : c.at("draft").at("weights").arr) draft_w.push_back(take(w, "draft." + nm.string(), {}));
    vocab_ids = take(w, "draft.vocab_ids", {}, false);
    if (vocab_ids.scalar_type() != at::kLong || vocab_ids.dim() != 1 || vocab_ids.numel() == 0)
      throw Error(dir + "/weights.safetensors: draft.vocab_ids is not a non-empty int64 vector; re-export");
    at::Tensor vh = vocab_ids.cpu();
    vocab_ids_host.assign(vh.data_ptr<int64_t>(), vh.data_ptr<int64_t>() + vh.numel());
    for (auto t : vocab_ids_host) {
      if (t < 0 || t >= V) throw Error(dir + ": draft.vocab_ids holds " + std::to_string(t) + ", outside the vocabulary");
      d_static.insert(t);
    }
    head_rows_static = head.index_select(0, vocab_ids).contiguous();
  }

  void load_package(Package& p, const json::Value& c, const std::string& name) {
    const std::string path = dir + "/" + c.at("packages").at(name).string();
    try {
      // run_single_threaded: one runner, no per-run event record or wait (a stream capture forbids the wait)
      p.loader = std::make_unique<torch::inductor::AOTIModelPackageLoader>(path, "model", true, 1,
                                                                           dev.is_cuda() ? dev.index() : -1);
    } catch (const c10::Error& e) {
      throw Error("cannot load " + path + ": " + e.what_without_backtrace() + " (corrupt, or exported by another torch?)");
    }
  }

  void load_packages(const json::Value& c) {
    load_package(layer_pkg, c, "layer");
    if (c.at("packages").has("layer1")) load_package(layer1_pkg, c, "layer1");
    load_package(head_pkg, c, "head");
    if (c.at("packages").has("head1")) load_package(head1_pkg, c, "head1");
    if (!specee) return;
    load_package(exit_pkg, c, "exit_score");
    load_package(draft_pkg, c, "draft");
  }

  // ---------------------------------------------------------------------------- segments
  int attn_len(int64_t p) const { return int(std::min<int64_t>(max_len, (p / bucket + 1) * bucket)); }

  at::Tensor ids_tensor(const std::vector<int64_t>& v) const {
    return at::tensor(v, at::TensorOptions().dtype(at::kLong)).to(dev);
  }
  at::Tensor embed_ids(const std::vector<int64_t>& ids) { return embed.index_select(0, ids_tensor(ids)).unsqueeze(0); }

  // layer i's weights on the cache rows of layer c (c = i but in time_graph_parts' probes)
  at::Tensor layer(int i, const at::Tensor& h, const at::Tensor& pos, int S, int c = -1) {
    const bool one_row = h.size(1) == 1 && layer1_pkg.loader;
    if (c < 0) c = i;
    std::vector<at::Tensor> in = {h.contiguous(), pos, keys.slice(0, 0, S), valid[c], cos, sin, K[c], Vc[c]};
    if (one_row && attn_cnt.defined()) in.push_back(attn_cnt);
    if (one_row && attn_ws.defined()) in.push_back(attn_ws);
    in.insert(in.end(), layer_w[i].begin(), layer_w[i].end());
    return (one_row ? layer1_pkg : layer_pkg).run(in)[0];
  }
  // -> (hn [1, q, D], logits [1, n, V] of the rows `sel`)
  std::pair<at::Tensor, at::Tensor> head_fn(const at::Tensor& h, const std::vector<int64_t>& sel) {
    auto out = h.size(1) == 1 && sel.size() == 1 && sel[0] == 0 && head1_pkg.loader
                   ? head1_pkg.run({h.contiguous(), norm, head})
                   : head_pkg.run({h.contiguous(), ids_tensor(sel), norm, head});
    return {out[0], out[1]};
  }

  // ---------------------------------------------------------------------------- EagleSource
  void draft_reset(const std::vector<int64_t>& prompt, const at::Tensor& hid) {
    d_ids = prompt;
    const auto f = at::TensorOptions().dtype(dtype).device(dev);
    if (!d_feats.defined()) {  // room for every position the cache can hold
      d_feats = at::zeros({T + 1, D}, f);
      d_k = at::zeros({dn, dkv, T + 1, dhd}, f);
      d_v = at::zeros({dn, dkv, T + 1, dhd}, f);
      d_extra_rows = at::zeros({T + 1, D}, f);
    }
    d_cache_len = 0;
    d_proposal = at::Tensor();
    d_feats.slice(0, 0, int64_t(prompt.size())).copy_(hid.reshape({-1, D}));
    d_extra_ids.clear();
    d_extra_first.clear();
    d_extra_set.clear();
    for (size_t j = 0; j < prompt.size(); ++j) draft_add_context(prompt[j], int64_t(j));
  }

  void draft_add_context(int64_t tok, int64_t pos) {
    if (!context_vocab || d_static.count(tok) || d_extra_set.count(tok)) return;
    if (tok < 0 || tok >= V) return;
    d_extra_rows[int64_t(d_extra_ids.size())].copy_(head[tok]);
    d_extra_ids.push_back(tok);
    d_extra_first.push_back(pos);
    d_extra_set.insert(tok);
  }

  static void fill_unique(std::vector<int64_t>& out, int64_t vocab, int kk) {
    std::set<int64_t> seen(out.begin(), out.end());
    for (int64_t t = 0; t < vocab && int(out.size()) < kk; ++t)
      if (seen.insert(t).second) out.push_back(t);
  }

  at::Tensor draft_propose() {
    if (d_proposal.defined()) return d_proposal;
    const int64_t n = int64_t(d_ids.size());
    std::vector<int64_t> out;
    if (n < 2) {  // no (feature, next token) pair yet: most frequent tokens
      for (int i = 0; i < k && i < int(vocab_ids_host.size()); ++i) out.push_back(vocab_ids_host[i]);
      fill_unique(out, V, k);
      d_proposal = ids_tensor(out);
      return d_proposal;
    }
    const int64_t end = n - 1;
    const int64_t c = std::min(d_cache_len, end - 1);
    std::vector<int64_t> nxt(d_ids.begin() + c + 1, d_ids.begin() + n), pos;
    for (int64_t t = c; t < end; ++t) pos.push_back(t);
    std::vector<at::Tensor> in = {d_feats.slice(0, c, end), ids_tensor(nxt), ids_tensor(pos),
                                  d_k.slice(2, 0, c).contiguous(), d_v.slice(2, 0, c).contiguous(),
                                  cos, sin, embed, head_rows_static};
    in.insert(in.end(), draft_w.begin(), draft_w.end());
    auto r = draft_pkg.run(in);  // g [D], k_rows, v_rows [n, Hkv, T, hd], logits [nv]
    d_k.slice(2, c, end).copy_(r[1]);
    d_v.slice(2, c, end).copy_(r[2]);
    d_cache_len = end;
    at::Tensor logits = r[3];
    const int64_t ne = int64_t(d_extra_ids.size());
    if (ne) logits = at::cat({logits, at::matmul(d_extra_rows.slice(0, 0, ne), r[0])});
    const int kk = int(std::min<int64_t>(k, logits.size(0)));
    at::Tensor top = std::get<1>(at::topk(logits, kk)).cpu();
    const int64_t nstatic = int64_t(vocab_ids_host.size());
    for (int i = 0; i < kk; ++i) {
      int64_t j = top[i].item<int64_t>();
      out.push_back(j < nstatic ? vocab_ids_host[j] : d_extra_ids[j - nstatic]);
    }
    if (kk < k) fill_unique(out, V, k);
    d_proposal = ids_tensor(out);
    return d_proposal;
  }

  void draft_observe(int64_t token, const at::Tensor& hidden) {
    const int64_t p = int64_t(d_ids.size()) - 1;
    d_feats[p].copy_(hidden.reshape({-1}));
    d_ids.push_back(token);
    draft_add_context(token, p + 1);
    d_cache_len = std::min(d_cache_len, p);
    d_proposal = at::Tensor();
  }

  void draft_truncate(int64_t length) {
    d_ids.resize(length);
    while (!d_extra_first.empty() && d_extra_first.back() >= length) {
      d_extra_first.pop_back();
      d_extra_set.erase(d_extra_ids.back());
      d_extra_ids.pop_back();
    }
    d_cache_len = std::min(d_cache_len, length - 1);
    d_proposal = at::Tensor();
  }

  // ---------------------------------------------------------------------------- the loop
  bool finished() const {
    return int64_t(seq.size()) - res.prompt_len >= opt.max_new_tokens || eos.count(seq.back());
  }
  bool done() const { return finished() && !(!pending.empty() && lossless); }

  void append(int64_t tok, int layer) {
    seq.push_back(tok);
    res.exit_layers.push_back(layer);
  }

  void emit(int64_t token, const at::Tensor& hn, int layer) {
    draft_observe(token, hn);
    if (layer < L - 1 && opt.online_window > 0) {
      history.push_back(layer);
      while (int(history.size()) > opt.online_window) history.pop_front();
    }
    append(token, layer);
  }

  std::set<int> active_layers() const {
    std::set<int> act;
    if (!opt.use_schedule) {
      act.insert(exit_layers.begin(), exit_layers.end());
    } else {
      std::set<int> sched(offline.begin(), offline.end());
      for (int e : history)
        for (int o : opt.online_offsets) sched.insert(e + o);
      for (int l : exit_layers)
        if (sched.count(l) && pred_layers.count(l)) act.insert(l);
    }
    std::set<int> out;
    for (int l : act)
      if (l >= opt.min_exit_layer) out.insert(l);
    return out;
  }

  void start(const std::vector<int64_t>& prompt) {
    if (prompt.empty()) throw Error("the prompt is empty: pass some token ids to generate from");
    for (auto t : prompt)
      if (t < 0 || t >= V)
        throw Error("prompt token id " + std::to_string(t) + " is outside the vocabulary [0, " + std::to_string(V) + ")");
    const int64_t need = int64_t(prompt.size()) + opt.max_new_tokens;
    if (need > max_len)
      throw Error("prompt (" + std::to_string(prompt.size()) + " tokens) + max_new_tokens (" +
                  std::to_string(opt.max_new_tokens) + ") = " + std::to_string(need) + " exceeds the context of " +
                  std::to_string(max_len) + " tokens; shorten the prompt, lower --max-new-tokens, or re-export with "
                  "a larger --max-context");
    if (specee && !selected) {
      select_exit_points();
      junk = true;
    }
    if (graph_decoding() && !graph_ready()) {
      capture_graphs();
      junk = true;
    }
    if (junk) {
      for (auto* t : {&K, &Vc, &d_feats, &d_k, &d_v, &d_extra_rows})
        if (t->defined()) t->zero_();
      junk = false;
    }
    valid.zero_();
    res = captured;
    res.cuda_graphs = graph_decoding();
    res.one_row_package = bool(layer1_pkg.loader);
    res.exit_points_kept = kept_points;
    res.exit_points_dropped = dropped_points;
    res.step_costs = costs_source;
    res.prompt_len = int(prompt.size());
    res.num_layers = L;
    seq = prompt;
    pending.clear();
    history.clear();
    const auto t0 = Clock::now();
    const int64_t P = int64_t(prompt.size());
    at::Tensor pos = at::arange(P, at::TensorOptions().dtype(at::kLong).device(dev));
    at::Tensor h = embed_ids(prompt);
    const int S = attn_len(P - 1);
    for (int i = 0; i < L; ++i) h = layer(i, h, pos, S);
    auto [hn, logits] = head_fn(h, {P - 1});  // hn [1, P, D], logits [1, 1, V]
    const int64_t first = logits[0][-1].argmax().item<int64_t>();
    if (specee && !as_dense) {
      draft_reset(prompt, hn[0]);
      draft_observe(first, hn[0][P - 1]);
    }
    sync();
    res.prefill_s = seconds_since(t0);
    append(first, L - 1);
  }

  void sync() {
    if (dev.is_cuda()) torch::cuda::synchronize();
  }

  void dense_step() {
    const int64_t p = int64_t(seq.size()) - 1;
    res.layer_passes += L;
    res.layer_rows += L;
    res.decode_steps += 1;
    at::Tensor pos = ids_tensor({p});
    at::Tensor h = embed_ids({seq.back()});
    const int S = attn_len(p);
    for (int i = 0; i < L; ++i) h = layer(i, h, pos, S);
    auto [hn, logits] = head_fn(h, {0});
    append(logits[0][-1].argmax().item<int64_t>(), L - 1);
  }

  void step() {
    if (finished()) {
      if (!pending.empty() && lossless) specee_step(false);  // flush: verify pending exits before stopping
      return;
    }
    if (specee && !as_dense) specee_step(true);
    else dense_step();
  }

  // ---------------------------------------------------------------------------- CUDA graphs (dense steps)
  // Dense mode, or SpecEE where the cost check kept no exit point, decodes through captured graphs on
  // CUDA; steps with exits keep the per-layer calls above (their decisions are read on the host).
  bool graph_decoding() const { return dev.is_cuda() && opt.cuda_graphs && (!specee || (selected && as_dense)); }
#ifdef SPECEE_CUDA
  bool graph_ready() const { return graphs != nullptr; }

  void dense_body(int S) {  // the dense step on device state: tok, pos -> out; tok = out, pos += 1
    auto& g = *graphs;
    at::Tensor h = embed.index_select(0, g.tok).unsqueeze(0);
    for (int i = 0; i < L; ++i) h = layer(i, h, g.pos, S);
    auto o = head1_pkg.loader ? head1_pkg.run({h.contiguous(), norm, head})
                              : head_pkg.run({h.contiguous(), g.sel0, norm, head});
    at::argmax_out(g.out, o[1].reshape({-1}), 0, /*keepdim=*/true);
    g.tok.copy_(g.out);
    g.pos.add_(1);
  }

  // Every attention length is captured before the first token (a warm-up run first loads the packages'
  // kernels and cuBLAS's workspace on the capture stream); the graphs share one memory pool, since they
  // replay one at a time, in order, on one stream.
  void capture_graphs() {
    const auto t0 = Clock::now();
    graphs = std::make_unique<StepGraphs>();
    auto& g = *graphs;
    const auto li = at::TensorOptions().dtype(at::kLong).device(dev);
    g.tok = at::zeros({1}, li);
    g.pos = at::zeros({1}, li);
    g.out = at::zeros({1}, li);
    g.sel0 = at::zeros({1}, li);
    g.ring = at::zeros({2}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
    g.stream = c10::cuda::getStreamFromPool(false, dev.index());
    sync();
    c10::cuda::CUDAStreamGuard guard(*g.stream);
    at::cuda::MempoolId_t pool{0, 0};
    const bool pdl = pdl_capture();
    for (int64_t p = 0; p < max_len; p += bucket) {
      const int S = attn_len(p);
      if (g.by_len.count(S)) continue;
      g.pos.fill_(S - 1);  // a position inside this length; start() clears `valid` afterwards
      dense_body(S);       // warm-up, outside the capture
      g.stream->synchronize();
      auto& pair = g.by_len[S];
      for (auto& graph : pair) {
        g.pos.fill_(S - 1);
        graph = std::make_unique<at::cuda::CUDAGraph>(/*keep_graph=*/pdl);  // kept: its edges change first
        graph->capture_begin(pool, cudaStreamCaptureModeRelaxed);
        dense_body(S);
        graph->capture_end();
        if (pdl) captured.pdl_edges = programmatic_edges(graph->raw_cuda_graph(), pdl_waiting);
        pool = graph->pool();
        graph->replay();  // the first launch instantiates (a kept graph) and uploads it: not on a token's time
      }
    }
    g.stream->synchronize();
    time_graph_step();
    captured.capture_s = seconds_since(t0);
  }

  // PDL in the captured step (--no-pdl: off): where the packages' kernels were compiled to wait (the manifest's
  // `pdl_waiting_kernels`) and the device has PDL (sm_90+). AOTInductor launches every kernel plainly, so the
  // edges come out of capture full; `programmatic_edges` then does what stream capture does with a PDL launch.
  bool pdl_capture() const {
    return opt.pdl && !pdl_waiting.empty() && at::cuda::getDeviceProperties(dev.index())->major >= 9;
  }

  // Turns each edge of `graph` from a kernel node into a kernel node whose function name holds one of `waiting`
  // into a programmatic edge (from the upstream kernel's programmatic port): the downstream kernel may then launch
  // before the upstream one completes, and its griddepcontrol.wait, before any global access, holds it until the
  // upstream kernel has completed with its writes visible. So a waiting kernel that passes its wait knows every
  // node before it has completed (by induction over the edges: an edge into a kernel that does not wait, or from
  // or to any other node, stays a full dependency). The driver API through dlopen, as `write_graph_attrs`.
  // Returns the number of edges changed; -1 where the driver lacks the edge API (the graph is left as captured).
  static int programmatic_edges(cudaGraph_t graph, const std::vector<std::string>& waiting) {
    void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!lib) return -1;
    using GetEdges = int (*)(cudaGraph_t, void**, void**, void*, size_t*);  // CUDA >= 12.3: with edge data
    using EditDeps = int (*)(cudaGraph_t, void* const*, void* const*, const void*, size_t);
    using NodeType = int (*)(void*, int*);
    using NodeParams = int (*)(void*, void*);
    using FuncName = int (*)(const char**, void*);
    auto get_edges = reinterpret_cast<GetEdges>(dlsym(lib, "cuGraphGetEdges_v2"));
    auto remove = reinterpret_cast<EditDeps>(dlsym(lib, "cuGraphRemoveDependencies_v2"));
    auto add = reinterpret_cast<EditDeps>(dlsym(lib, "cuGraphAddDependencies_v2"));
    auto node_type = reinterpret_cast<NodeType>(dlsym(lib, "cuGraphNodeGetType"));
    void* params_sym = dlsym(lib, "cuGraphKernelNodeGetParams_v2");
    auto node_params = reinterpret_cast<NodeParams>(params_sym ? params_sym : dlsym(lib, "cuGraphKernelNodeGetParams"));
    auto func_name = reinterpret_cast<FuncName>(dlsym(lib, "cuFuncGetName"));
    size_t n = 0;
    if (!get_edges || !remove || !add || !node_type || !node_params || !func_name ||
        get_edges(graph, nullptr, nullptr, nullptr, &n) != 0) {
      dlclose(lib);
      return -1;
    }
    std::vector<void*> from(n), to(n);
    std::vector<std::array<unsigned char, 8>> data(n);  // CUgraphEdgeData: from port, to port, type, 5 reserved
    if (n > 0 && get_edges(graph, from.data(), to.data(), data.data(), &n) != 0) {
      dlclose(lib);
      return -1;
    }
    std::map<void*, int> kind;  // 0: not a kernel, 1: a kernel that does not wait, 2: a kernel that waits
    auto classify = [&](void* node) {
      auto it = kind.find(node);
      if (it != kind.end()) return it->second;
      int type = -1, k = 0;
      alignas(8) unsigned char params[128] = {};  // CUDA_KERNEL_NODE_PARAMS: the function handle first
      if (node_type(node, &type) == 0 && type == 0 && node_params(node, params) == 0) {
        void* func = nullptr;
        std::memcpy(&func, params, sizeof func);
        const char* name = nullptr;
        k = 1;
        if (func && func_name(&name, func) == 0 && name)
          for (const auto& w : waiting)
            if (std::strstr(name, w.c_str())) k = 2;
      }
      return kind[node] = k;
    };
    constexpr unsigned char kProgrammaticPort = 1, kProgrammaticType = 1;  // CU_GRAPH_*_PROGRAMMATIC
    int changed = 0;
    for (size_t e = 0; e < n; ++e) {
      if (data[e][2] != 0 || classify(from[e]) == 0 || classify(to[e]) != 2) continue;
      std::array<unsigned char, 8> prog{};
      prog[0] = kProgrammaticPort;
      prog[2] = kProgrammaticType;
      if (remove(graph, &from[e], &to[e], data[e].data(), 1) != 0) continue;
      if (add(graph, &from[e], &to[e], prog.data(), 1) == 0) {
        ++changed;
      } else if (add(graph, &from[e], &to[e], data[e].data(), 1) != 0) {  // put the full edge back
        dlclose(lib);
        throw Error("PDL: a graph edge could not be restored after the driver refused a programmatic one; "
                    "rerun with --no-pdl");
      }
    }
    dlclose(lib);
    return changed;
  }

  // One dense step's own device time: replays of the first length's graph back to back (positions 0..n-1 of
  // that length; start() clears what they write). Against 1 / decode tok/s it splits the loop's per-token
  // time into the step's kernels and what the loop adds (launch ordering, the token's read).
  void time_graph_step() {
    auto& g = *graphs;
    auto& pair = g.by_len.begin()->second;
    const int n = std::max(1, std::min(16, g.by_len.begin()->first - 1));
    if (opt.time_parts) {
      warm_clocks([&] {
        g.pos.fill_(0);
        for (int i = 0; i < n; ++i) pair[0]->replay();
      });
    } else {
      g.pos.fill_(0);
      pair[0]->replay();  // warm
    }
    g.pos.fill_(0);
    captured.graph_step_us = replay_us([&](int i) { pair[size_t(i % 2)]->replay(); }, n);
    g.pos.fill_(0);
    // one instance, as the Python costs time it
    captured.graph_step_one_us = replay_us([&](int) { pair[0]->replay(); }, n);
    if (opt.time_parts) time_graph_parts(g.by_len.begin()->first);
  }

  // Runs `batch` for 0.2 s before a timing: the card idled while the packages loaded, and an idle card runs
  // its first milliseconds of work at lower clocks (the parts' timing windows are that short)
  template <class F>
  void warm_clocks(F batch) {
    const auto t0 = Clock::now();
    while (seconds_since(t0) < 0.2) {
      batch();
      graphs->stream->synchronize();
    }
  }

  // Microseconds per call of run(i), i = 0..n-1, back to back on the step stream (CUDA events).
  template <class F>
  double replay_us(F run, int n) {
    at::cuda::CUDAEvent a(cudaEventDefault), b(cudaEventDefault);
    a.record(*graphs->stream);
    for (int i = 0; i < n; ++i) run(i);
    b.record(*graphs->stream);
    b.synchronize();
    return 1000.0 * double(a.elapsed_time(b)) / n;
  }

  // SPECEE_PROFILE_DIR=DIR (with --time-parts): each part's kernels over 10 replays, by the CUDA profiler
  // (kineto, as torch.profiler): DIR/cpp_<part>_kernels.json = {kernel name: [launches, device us in all]} and
  // DIR/cpp_<part>_timeline.json = [[kernel name, start us, end us], ...] in start order (from the first
  // kernel's start), beside cpp_bench's python_<part>_*.json: where the gaps between kernels fall
  template <class F>
  void profile_kernels(const std::string& path, const std::string& timeline_path, F replay) {
    namespace prof = torch::autograd::profiler;
    const torch::profiler::impl::ProfilerConfig cfg(torch::profiler::impl::ProfilerState::KINETO);
    const std::set<torch::profiler::impl::ActivityType> acts{torch::profiler::impl::ActivityType::CUDA};
    prof::prepareProfiler(cfg, acts);
    prof::enableProfiler(cfg, acts);
    for (int i = 0; i < 10; ++i) replay();
    graphs->stream->synchronize();
    const auto result = prof::disableProfiler();
    std::map<std::string, std::pair<int64_t, double>> by_name;
    std::vector<std::tuple<uint64_t, uint64_t, std::string>> spans;
    for (const auto& e : result->events()) {
      if (e.deviceType() != c10::DeviceType::CUDA) continue;
      auto& slot = by_name[e.name()];
      slot.first += 1;
      slot.second += double(e.durationNs()) / 1000.0;
      spans.emplace_back(e.startNs(), e.endNs(), e.name());
    }
    std::sort(spans.begin(), spans.end());
    {
      std::ofstream t(timeline_path);
      t << "[";
      const uint64_t t0 = spans.empty() ? 0 : std::get<0>(spans.front());
      const char* tsep = "";
      for (const auto& [start, end, name] : spans) {
        t << tsep << "\n [" << json::quote(name) << ", " << double(start - t0) / 1000.0 << ", "
          << double(end - t0) / 1000.0 << "]";
        tsep = ",";
      }
      t << "\n]\n";
      if (!t) std::fprintf(stderr, "cannot write %s\n", timeline_path.c_str());
    }
    std::ofstream f(path);
    f << "{";
    const char* sep = "";
    for (const auto& [name, v] : by_name) {
      f << sep << "\n " << json::quote(name) << ": [" << v.first << ", " << v.second << "]";
      sep = ",";
    }
    f << "\n}\n";
    if (!f) std::fprintf(stderr, "cannot write %s\n", path.c_str());
  }

  // A captured graph's kernel nodes with their launch attributes and their functions' attributes, as JSON in
  // node order: the fields and attribute ids of benchmarks/graph_census.py, which reads the Python step's
  // graph the same way (cpp_bench prints where the two differ). The driver API through dlopen: nothing links
  // libcuda itself.
  static void write_graph_attrs(cudaGraph_t graph, const std::string& path) {
    void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
      std::fprintf(stderr, "SPECEE_GRAPH_ATTRS: cannot open libcuda.so.1: %s\n", dlerror());
      return;
    }
    auto sym = [&](const char* a, const char* b = nullptr) {
      void* p = dlsym(lib, a);
      return p || !b ? p : dlsym(lib, b);
    };
    using GetNodes = int (*)(cudaGraph_t, void**, size_t*);
    using NodeType = int (*)(void*, int*);
    using NodeParams = int (*)(void*, void*);
    using FuncName = int (*)(const char**, void*);
    using FuncAttr = int (*)(int*, int, void*);
    using NodeAttr = int (*)(void*, int, void*);
    auto get_nodes = reinterpret_cast<GetNodes>(sym("cuGraphGetNodes"));
    auto node_type = reinterpret_cast<NodeType>(sym("cuGraphNodeGetType"));
    auto node_params = reinterpret_cast<NodeParams>(sym("cuGraphKernelNodeGetParams_v2", "cuGraphKernelNodeGetParams"));
    auto func_name = reinterpret_cast<FuncName>(sym("cuFuncGetName"));
    auto func_attr = reinterpret_cast<FuncAttr>(sym("cuFuncGetAttribute"));
    auto node_attr = reinterpret_cast<NodeAttr>(sym("cuGraphKernelNodeGetAttribute"));
    // incoming edges: the _v2 entry point (node, deps, edge data, count) where the driver has it (CUDA >= 12.3)
    using NodeDeps2 = int (*)(void*, void**, void*, size_t*);
    using NodeDeps = int (*)(void*, void**, size_t*);
    auto node_deps2 = reinterpret_cast<NodeDeps2>(sym("cuGraphNodeGetDependencies_v2"));
    auto node_deps = reinterpret_cast<NodeDeps>(sym("cuGraphNodeGetDependencies"));
    using ParamInfo = int (*)(void*, size_t, size_t*, size_t*);
    auto param_info = reinterpret_cast<ParamInfo>(sym("cuFuncGetParamInfo"));
    size_t n = 0;
    if (!get_nodes || !node_type || !node_params || !func_attr || !node_attr || get_nodes(graph, nullptr, &n) != 0) {
      std::fprintf(stderr, "SPECEE_GRAPH_ATTRS: the driver does not answer the graph queries\n");
      dlclose(lib);
      return;
    }
    static const std::pair<const char*, int> kFunc[] = {
        {"max_threads", 0}, {"static_smem", 1}, {"const_bytes", 2}, {"local_bytes", 3}, {"regs", 4}, {"ptx", 5},
        {"binary", 6}, {"cache_mode_ca", 7}, {"max_dyn_smem", 8}, {"carveout", 9}, {"cluster_size_must_be_set", 10},
        {"non_portable_cluster", 14}, {"cluster_sched", 15}};
    static const std::pair<const char*, int> kNode[] = {
        {"access_policy_window", 1}, {"cooperative", 2}, {"cluster_dim", 4}, {"cluster_sched", 5},
        {"programmatic_serialization", 6}, {"programmatic_event", 7}, {"priority", 8}, {"mem_sync_domain_map", 9},
        {"mem_sync_domain", 10}, {"preferred_cluster_dim", 11}, {"launch_completion_event", 12},
        {"device_updatable", 13}, {"smem_carveout", 14}};
    // CUgraphNodeType names of the non-kernel nodes, as graph_census.NODE_TYPES
    static const char* kTypes[] = {"kernel", "memcpy", "memset", "host", "child graph", "empty", "event wait",
                                   "event record", "semaphore signal", "semaphore wait", "mem alloc", "mem free",
                                   "batch mem op", "conditional"};
    std::vector<void*> nodes(n);
    get_nodes(graph, nodes.data(), &n);
    std::ofstream f(path);
    f << "[";
    const char* sep = "";
    for (void* node : nodes) {
      int kind = -1;
      alignas(8) unsigned char params[128] = {};
      size_t deps = 0;  // incoming edges; with the _v2 entry point also each edge's data (CUgraphEdgeData:
      // from port, to port, type): a programmatic edge lets a kernel launch before its producer completes
      std::string edges = "[]";
      if (node_deps2 && node_deps2(node, nullptr, nullptr, &deps) == 0 && deps > 0) {
        std::vector<void*> from(deps);
        std::vector<unsigned char> data(8 * deps);
        if (node_deps2(node, from.data(), data.data(), &deps) == 0) {
          edges = "[";
          for (size_t e = 0; e < deps; ++e)
            edges += (e ? ", [" : "[") + std::to_string(data[8 * e]) + ", " + std::to_string(data[8 * e + 1]) +
                     ", " + std::to_string(data[8 * e + 2]) + "]";
          edges += "]";
        }
      } else if (!node_deps2 && node_deps) {
        node_deps(node, nullptr, &deps);
      }
      if (node_type(node, &kind) != 0 || kind != 0 || node_params(node, params) != 0) {  // any other node
        const std::string type = kind > 0 && kind < 14 ? kTypes[kind] : std::to_string(kind);
        f << sep << "\n {\"name\": " << json::quote("<" + type + ">") << ", \"grid\": [0, 0, 0], \"block\": [0, 0, 0], "
          << "\"smem\": 0, \"deps\": " << deps << ", \"edges\": " << edges << ", \"func\": {}, \"node\": {}}";
        sep = ",";
        continue;
      }
      void* func = nullptr;
      uint32_t dims[7];  // grid x y z, block x y z, dynamic shared memory: after the function handle
      std::memcpy(&func, params, sizeof func);
      std::memcpy(dims, params + 8, sizeof dims);
      const char* name = nullptr;
      if (!func_name || func_name(&name, func) != 0 || !name) name = "?";
      f << sep << "\n {\"name\": " << json::quote(name) << ", \"grid\": [" << dims[0] << ", " << dims[1] << ", "
        << dims[2] << "], \"block\": [" << dims[3] << ", " << dims[4] << ", " << dims[5] << "], \"smem\": "
        << dims[6] << ", \"deps\": " << deps << ", \"edges\": " << edges << ", \"func\": {";
      const char* s2 = "";
      for (const auto& [key, id] : kFunc) {
        int v = -99;
        const int rc = func_attr(&v, id, func);
        f << s2 << "\"" << key << "\": ";
        if (rc == 0) f << v; else f << "\"error " << rc << "\"";
        s2 = ", ";
      }
      size_t nparams = 0, nbytes = 0, off = 0, size = 0;  // the kernel's parameters: count and bytes
      while (param_info && nparams < 512 && param_info(func, nparams, &off, &size) == 0) {
        ++nparams;
        nbytes = off + size;
      }
      f << ", \"params\": " << nparams << ", \"param_bytes\": " << nbytes << "}, \"node\": {";
      s2 = "";
      for (const auto& [key, id] : kNode) {
        alignas(8) int32_t v[16] = {};  // CUlaunchAttributeValue: a 64-byte union; its first words are printed
        const int rc = node_attr(node, id, v);
        f << s2 << "\"" << key << "\": ";
        if (rc == 0) f << "[" << v[0] << ", " << v[1] << ", " << v[2] << ", " << v[3] << "]";
        else f << "\"error " << rc << "\"";
        s2 = ", ";
      }
      f << "}}";
      sep = ",";
    }
    f << "\n]\n";
    if (!f) std::fprintf(stderr, "cannot write %s\n", path.c_str());
    dlclose(lib);
  }

  // The step's parts at the first length, each captured alone and replayed back to back: one layer call, the
  // chain of L layer calls, the head (cpp_bench sets them beside the Python step's parts). The layers write K/V
  // at slot S - 1, which start() invalidates.
  void time_graph_parts(int S) {
    auto& g = *graphs;
    g.pos.fill_(S - 1);
    const at::Tensor h = embed.index_select(0, g.tok).unsqueeze(0).contiguous();  // a static [1, 1, D] input
    // SPECEE_GRAPH_DUMP=DIR writes each part's graph as DIR/cpp_<part>.dot (cudaGraphDebugDotPrint): its kernel
    // nodes, their grids and parameters, beside cpp_bench's python_<part>.dot
    const char* dump = std::getenv("SPECEE_GRAPH_DUMP");
    // SPECEE_GRAPH_ATTRS=DIR writes the chain's kernel nodes with their attributes as DIR/cpp_layers_attrs.json
    const char* attrs = std::getenv("SPECEE_GRAPH_ATTRS");
    auto part = [&](const char* name, auto body) {
      const bool census = attrs != nullptr && std::string(name) == "layers", pdl = pdl_capture();
      // a kept graph can be printed, read, and have its edges changed (PDL, as the step's graphs)
      at::cuda::CUDAGraph graph(/*keep_graph=*/dump != nullptr || census || pdl);
      graph.capture_begin({0, 0}, cudaStreamCaptureModeRelaxed);
      body();
      graph.capture_end();
      if (pdl) programmatic_edges(graph.raw_cuda_graph(), pdl_waiting);
      if (census) write_graph_attrs(graph.raw_cuda_graph(), std::string(attrs) + "/cpp_layers_attrs.json");
      if (dump) {
        const std::string path = std::string(dump) + "/cpp_" + name + ".dot";
        const cudaError_t e = cudaGraphDebugDotPrint(graph.raw_cuda_graph(), path.c_str(), cudaGraphDebugDotFlagsVerbose);
        if (e != cudaSuccess) std::fprintf(stderr, "cannot write %s: %s\n", path.c_str(), cudaGetErrorString(e));
      }
      graph.replay();  // instantiate, upload
      warm_clocks([&] { graph.replay(); });
      const double us = replay_us([&](int) { graph.replay(); }, 20);
      if (const char* prof = std::getenv("SPECEE_PROFILE_DIR"))
        profile_kernels(std::string(prof) + "/cpp_" + name + "_kernels.json",
                        std::string(prof) + "/cpp_" + name + "_timeline.json", [&] { graph.replay(); });
      return us;
    };
    // The chain of L layer calls: layer w's weights (w < 0: layer i's) on layer c's cache rows (c < 0: layer i's)
    auto chain = [&](int w, int c) {
      at::Tensor x = h;
      for (int i = 0; i < L; ++i) x = layer(w < 0 ? i : w, x, g.pos, S, c < 0 ? i : c);
    };
    captured.graph_layer_us = part("layer", [&] { layer(0, h, g.pos, S); });
    // the step's layer chain alone: what the step adds around it is the rest
    captured.graph_layers_us = part("layers", [&] { chain(-1, -1); });
    captured.graph_head_us = part("head", [&] { head_fn(h, {0}); });
    // layer 0's call L times (the same weights and cache), then layer 0's weights on every layer's cache and
    // every layer's weights on layer 0's cache: which of the two the chain's extra idle follows
    captured.graph_layers_same_us = part("layers_same", [&] { chain(0, 0); });
    captured.graph_layers_w0_us = part("layers_w0", [&] { chain(0, -1); });
    captured.graph_layers_c0_us = part("layers_c0", [&] { chain(-1, 0); });
    // The chain on copies of the layer weights (the idle follows the weights: session 16): written by a copy
    // (clone), by a kernel (mul), or packed into one allocation. The loaded weights are restored after each.
    // Each copy holds the layer weights twice at once: skipped (left 0) where the device lacks that room.
    const auto loaded = layer_w;
    size_t weight_bytes = 0, free_b = 0, total_b = 0;
    for (const auto& lw : loaded)
      for (const auto& t : lw) weight_bytes += t.nbytes();
    if (cudaMemGetInfo(&free_b, &total_b) != cudaSuccess || free_b < weight_bytes + (size_t(512) << 20)) {
      std::fprintf(stderr, "time_parts: the weight-copy chains skipped (%zu MB of weights, %zu MB free)\n",
                   weight_bytes >> 20, free_b >> 20);
      return;
    }
    auto remade = [&](const char* name, auto make) {
      for (auto& lw : layer_w)
        for (auto& t : lw) t = make(t);
      torch::cuda::synchronize();
      const double us = part(name, [&] { chain(-1, -1); });
      layer_w = loaded;
      return us;
    };
    captured.graph_layers_wclone_us = remade("layers_wclone", [](const at::Tensor& t) { return t.clone(); });
    captured.graph_layers_wkernel_us = remade("layers_wkernel", [](const at::Tensor& t) { return t.mul(1); });
    int64_t total = 0;
    for (const auto& lw : loaded)
      for (const auto& t : lw) total += (t.numel() + 127) / 128 * 128;
    at::Tensor pack = at::empty({total}, loaded[0][0].options());
    int64_t off = 0;
    captured.graph_layers_wpack_us = remade("layers_wpack", [&](const at::Tensor& t) {
      at::Tensor v = pack.narrow(0, off, t.numel()).view(t.sizes());
      off += (t.numel() + 127) / 128 * 128;
      v.copy_(t);
      return v;
    });
  }

  // One replay per token, run ahead by one: step t+1 is launched before step t's token is read. A step
  // launched past the end (EOS) writes one cache slot that the next start() invalidates.
  void graph_decode() {
    auto& g = *graphs;
    c10::cuda::CUDAStreamGuard guard(*g.stream);
    const int64_t p0 = int64_t(seq.size()) - 1;
    g.tok.fill_(seq.back());
    g.pos.fill_(p0);
    int64_t launched = 0, taken = 0;
    const int64_t* ring = g.ring.data_ptr<int64_t>();
    auto launch = [&] {
      g.by_len.at(attn_len(p0 + launched))[size_t(launched % 2)]->replay();
      const int slot = int(launched % 2);
      g.ring.select(0, slot).copy_(g.out.select(0, 0), /*non_blocking=*/true);
      g.ev[slot].record(*g.stream);
      ++launched;
    };
    launch();
    while (true) {
      const int64_t have = int64_t(seq.size()) - res.prompt_len + (launched - taken);
      if (have < opt.max_new_tokens) launch();  // the next step goes out before this token is read
      const int slot = int(taken % 2);
      g.ev[slot].synchronize();
      const int64_t tok = ring[slot];
      ++taken;
      res.layer_passes += L;
      res.layer_rows += L;
      res.decode_steps += 1;
      append(tok, L - 1);
      if (finished()) break;
    }
    g.stream->synchronize();
  }
#else
  bool graph_ready() const { return true; }
  void capture_graphs() {}
  void graph_decode() { throw Error("this runner was built without CUDA; rebuild it against a CUDA libtorch"); }
#endif

  // ---------------------------------------------------------------------------- never slower than dense
  // runtime/exit_costs.py's rule with this runner's own costs, timed at the last cache slot before the
  // first prefill: the layers of a dense step, one exit decision read on the host, the draft's step for one
  // new token, the full head of approximate mode's check, with backfill one more row through the layers.
  // Point l is kept iff rate[l] * (L-1-l) * (layer - row) > eval_share[l] * decision + rate[l] * check
  // + rate[l] * (1 - precision) * step / (1 - total rate) (lossless rollbacks); the kept set iff its net
  // saving beats the draft's cost.
  void select_exit_points() {
    selected = true;
    kept_points = exit_layers;
    if (!opt.exit_cost_check || exit_rates.empty() || exit_layers.empty()) {
      costs_source = opt.exit_cost_check && exit_rates.empty() ? "the artifacts carry no exit rates: every exit point kept" : "";
      return;
    }
    double t_layers, t_head, row_s = 0, t_dec, t_draft;  // seconds
    char buf[320];
    if (!opt.step_costs.empty()) {
      auto us = [&](const char* key) { return opt.step_costs.count(key) ? opt.step_costs.at(key) * 1e-6 : 0.0; };
      t_layers = us("layer_us") * L;
      t_head = us("check_us");
      row_s = us("row_us");
      t_dec = us("decision_us");
      t_draft = us("draft_us");
      std::snprintf(buf, sizeof buf, "pinned by --step-costs: %d layers %.0f us, one decision %.0f us, the draft's step "
                    "%.0f us, the full head %.0f us", L, t_layers * 1e6, t_dec * 1e6, t_draft * 1e6, t_head * 1e6);
    } else {
      const int64_t p = max_len - 1;
      const at::Tensor pos = ids_tensor({p});
      const int S = attn_len(p);
      auto best = [&](const std::function<void()>& fn) {
        double b = 1e30;
        for (int r = 0; r < 4; ++r) {  // the first call warms up
          sync();
          const auto t = Clock::now();
          fn();
          sync();
          if (r > 0) b = std::min(b, seconds_since(t));
        }
        return b;
      };
      const at::Tensor h0 = embed_ids({0});
      at::Tensor h;
      t_layers = best([&] {
        h = h0;
        for (int i = 0; i < L; ++i) h = layer(i, h, pos, S);
      });
      t_head = best([&] { head_fn(h, {0}); });
      // backfill: what one more row adds to a layer pass
      if (backfill) {
        const at::Tensor pos2 = ids_tensor({p - 1, p}), h2 = embed_ids({0, 0});
        const double t2 = best([&] {
          at::Tensor x = h2;
          for (int i = 0; i < L; ++i) x = layer(i, x, pos2, S);
        });
        row_s = std::max(0.0, t2 - t_layers) / L;
      }
      const int l0 = exit_layers.front();
      const at::Tensor rows = head_rows_static.slice(0, 0, k).contiguous();
      const at::Tensor p0 = at::zeros({k}, at::TensorOptions().dtype(at::kFloat).device(dev));
      t_dec = best([&] {
        auto o = exit_pkg.run({h, norm, rows, p0, pw1[l0], pb1[l0], pw2[l0], pb2[l0]});
        (void)o[0].item<float>();
      });
      std::vector<int64_t> ids(8);
      for (int j = 0; j < 8; ++j) ids[j] = j;
      const at::Tensor hn = at::zeros({8, D}, at::TensorOptions().dtype(dtype).device(dev));
      draft_reset(ids, hn);
      t_draft = best([&] {
        draft_observe(0, hn[0]);
        draft_propose();
      });
      valid.zero_();
      std::snprintf(buf, sizeof buf, "the C++ runner on %s: %d layers %.0f us, one decision %.0f us, the draft's step %.0f us, "
                    "the full head %.0f us", dev.is_cuda() ? "cuda" : "cpu", L, t_layers * 1e6, t_dec * 1e6, t_draft * 1e6,
                    t_head * 1e6);
    }
    const double layer_s = t_layers / L, check = lossless ? 0.0 : t_head, step_s = t_layers + t_head;
    const double miss = lossless && exit_precision >= 0 ? 1.0 - exit_precision : 0.0;  // rolled-back exits
    double total = 0;
    for (int l : exit_layers) total += exit_rates.count(l) ? exit_rates.at(l) : 0.0;
    const double run = 1.0 / std::max(0.05, 1.0 - total);  // steps a rollback throws away
    costs_source = buf;
    kept_points.clear();
    double net = 0;
    for (int l : exit_layers) {
      const double r = exit_rates.count(l) ? exit_rates.at(l) : 0.0;
      const double e = eval_share.count(l) ? eval_share.at(l) : 1.0;
      const double save = r * (L - 1 - l) * std::max(0.0, layer_s - row_s);
      const double cost = e * t_dec + r * check + r * miss * step_s * run;
      if (save > cost) {
        kept_points.push_back(l);
        net += save - cost;
      } else {
        std::snprintf(buf, sizeof buf, "saves %.1f us/token (exit rate %.3f x %d layers), costs %.1f us/token",
                      save * 1e6, r, L - 1 - l, cost * 1e6);
        dropped_points.emplace_back(l, buf);
      }
    }
    if (!kept_points.empty() && net <= t_draft) {
      std::snprintf(buf, sizeof buf, "all kept points together save %.1f us/token net, less than the exit program's "
                    "fixed cost %.1f us/token (draft, gating): decoding as dense", net * 1e6, t_draft * 1e6);
      for (int l : kept_points) dropped_points.emplace_back(l, buf);
      kept_points.clear();
    }
    std::sort(dropped_points.begin(), dropped_points.end());
    exit_layers = kept_points;
    as_dense = kept_points.empty();
  }

  void specee_step(bool current) {
    const int64_t p = int64_t(seq.size()) - 1;
    std::vector<Row> rows;
    at::Tensor cands, w_rows, p_prev;
    std::vector<int64_t> cands_host;
    std::set<int> active;
    if (current) {
      cands = draft_propose();
      at::Tensor ch = cands.cpu();
      cands_host.assign(ch.data_ptr<int64_t>(), ch.data_ptr<int64_t>() + ch.numel());
      if (int(pending.size()) < opt.max_pending) active = active_layers();
      rows.push_back(Row{p, -1, embed_ids({seq.back()})});
      w_rows = head.index_select(0, cands).contiguous();
      p_prev = at::zeros({int64_t(cands_host.size())}, at::TensorOptions().dtype(at::kFloat).device(dev));
    }
    std::vector<Row> waiting;
    if (backfill) {
      waiting = pending;
      std::stable_sort(waiting.begin(), waiting.end(), [](const Row& a, const Row& b) { return a.done < b.done; });
    }
    int joined = 0;
    const int S = attn_len(p);
    int exit_layer = -1;
    int64_t token = -1;
    at::Tensor hn_cur;
    for (int i = 0; i < L; ++i) {
      while (!waiting.empty() && waiting.front().done == i - 1) {  // pending rows that skipped layer i join
        rows.insert(rows.begin(), waiting.front());
        waiting.erase(waiting.begin());
        ++joined;
      }
      if (rows.empty()) continue;
      at::Tensor h;
      std::vector<int64_t> posv;
      if (rows.size() > 1) {
        std::vector<at::Tensor> hs;
        for (auto& r : rows) hs.push_back(r.h);
        h = at::cat(hs, 1);
      } else {
        h = rows[0].h;
      }
      for (auto& r : rows) posv.push_back(r.pos);
      h = layer(i, h, ids_tensor(posv), S);
      res.layer_passes += 1;
      res.layer_rows += int64_t(rows.size());
      for (size_t j = 0; j < rows.size(); ++j) {
        rows[j].h = rows.size() > 1 ? h.slice(1, int64_t(j), int64_t(j) + 1).contiguous() : h;
        rows[j].done = i;
      }
      if (!active.count(i)) continue;
      auto out = exit_pkg.run({rows.back().h, norm, w_rows, p_prev, pw1[i], pb1[i], pw2[i], pb2[i]});
      p_prev = out[2];
      res.predictor_calls += 1;
      const double score = static_cast<double>(out[0].item<float>());
      if (!(score > thresholds.at(i))) continue;
      if (lossless) {  // exit token = argmax over the candidate logits (no full head)
        exit_layer = i;
        token = cands_host[out[1].argmax().item<int64_t>()];
        hn_cur = out[3];
        break;
      }
      auto [hn, logits] = head_fn(rows.back().h, {0});
      res.head_calls += 1;
      const int64_t t = logits[0][0].argmax().item<int64_t>();
      if (std::find(cands_host.begin(), cands_host.end(), t) != cands_host.end()) {
        exit_layer = i;
        token = t;
        hn_cur = hn[0][0];
        break;
      }
    }
    if (current) res.decode_steps += 1;

    if (exit_layer >= 0) {  // early exit: rows stay pending (backfill) or are dropped (skip)
      if (backfill) {
        pending = rows;
        pending.insert(pending.end(), waiting.begin(), waiting.end());
      }
      emit(token, hn_cur, exit_layer);
      return;
    }
    // full depth: every row reached the last layer
    pending.clear();
    std::vector<at::Tensor> hs;
    std::vector<int64_t> sel;
    for (size_t j = 0; j < rows.size(); ++j) {
      hs.push_back(rows[j].h);
      sel.push_back(int64_t(j));
    }
    auto [hn, logits] = head_fn(hs.size() > 1 ? at::cat(hs, 1) : hs[0], sel);
    at::Tensor dense_t = logits[0].argmax(-1).cpu();
    std::vector<int64_t> dense(dense_t.data_ptr<int64_t>(), dense_t.data_ptr<int64_t>() + dense_t.numel());
    if (lossless) {
      std::vector<std::pair<int64_t, size_t>> checked;
      const size_t nchk = current ? rows.size() - 1 : rows.size();
      for (size_t j = 0; j < nchk; ++j) checked.emplace_back(rows[j].pos, j);
      std::sort(checked.begin(), checked.end());  // earliest disagreement wins
      for (auto [rpos, j] : checked) {
        if (seq[rpos + 1] != dense[j]) {
          rollback(rpos, dense[j], hn[0][int64_t(j)]);
          return;
        }
      }
    }
    if (current) emit(dense.back(), hn[0][-1], L - 1);
  }

  void rollback(int64_t pos, int64_t token, const at::Tensor& hn) {
    const int64_t keep = pos + 1;
    res.rollbacks += 1;
    valid.slice(1, keep).fill_(false);
    seq.resize(keep);
    res.exit_layers.resize(keep - res.prompt_len);
    draft_truncate(keep);
    draft_observe(token, hn);
    append(token, L - 1);
  }

  Result generate(const std::vector<int64_t>& prompt) {
    start(prompt);
    const auto t0 = Clock::now();
    if (graph_decoding()) {
      if (!done()) graph_decode();
    } else {
      while (!done()) step();
    }
    sync();
    res.decode_s = seconds_since(t0);
    res.token_ids.assign(seq.begin() + res.prompt_len, seq.end());
    return res;
  }
};

// ================================================================================== public
Runtime::Runtime(const std::string& artifact_dir, const Options& options) : impl_(std::make_unique<Impl>()) {
  const auto t0 = Clock::now();
  try {
    impl_->load(artifact_dir, options);
  } catch (const c10::Error& e) {
    throw Error(std::string("loading ") + artifact_dir + " failed: " + e.what_without_backtrace());
  }
  impl_->res.load_s = seconds_since(t0);
  load_s_ = impl_->res.load_s;
}

Runtime::~Runtime() = default;

Result Runtime::generate(const std::vector<int64_t>& prompt_ids) {
  at::InferenceMode guard;
  try {
    Result r = impl_->generate(prompt_ids);
    r.load_s = load_s_;
    return r;
  } catch (const c10::Error& e) {
    std::string msg = e.what_without_backtrace();
    throw Error("decode failed in libtorch: " + msg.substr(0, msg.find('\n')));
  }
}

int Runtime::num_layers() const { return impl_->L; }
int Runtime::max_len() const { return impl_->max_len; }
int Runtime::vocab() const { return impl_->V; }

std::string Result::to_json() const {
  std::ostringstream o;
  o.precision(17);
  auto list = [&](const auto& v) {
    o << "[";
    for (size_t i = 0; i < v.size(); ++i) o << (i ? ", " : "") << v[i];
    o << "]";
  };
  const double avg_layers = decode_steps ? double(layer_passes) / double(decode_steps) : double(num_layers);
  const double avg_rows = decode_steps ? double(layer_rows) / double(decode_steps) : double(num_layers);
  const double total = prefill_s + decode_s;
  o << "{\"token_ids\": ";
  list(token_ids);
  o << ", \"exit_layers\": ";
  list(exit_layers);
  o << ", \"prompt_len\": " << prompt_len << ", \"num_layers\": " << num_layers << ", \"avg_layers\": " << avg_layers
    << ", \"avg_layer_rows\": " << avg_rows
    << ", \"tokens_per_s\": " << (total > 0 ? double(token_ids.size()) / total : 0.0)
    << ", \"decode_tokens_per_s\": " << (decode_s > 0 ? double(decode_steps) / decode_s : 0.0)
    << ", \"load_s\": " << load_s << ", \"prefill_s\": " << prefill_s << ", \"decode_s\": " << decode_s
    << ", \"layer_passes\": " << layer_passes << ", \"layer_rows\": " << layer_rows
    << ", \"decode_steps\": " << decode_steps << ", \"rollbacks\": " << rollbacks
    << ", \"predictor_calls\": " << predictor_calls << ", \"head_calls\": " << head_calls
    << ", \"capture_s\": " << capture_s << ", \"cuda_graphs\": " << (cuda_graphs ? "true" : "false")
    << ", \"pdl_edges\": " << pdl_edges
    << ", \"one_row_package\": " << (one_row_package ? "true" : "false") << ", \"graph_step_us\": " << graph_step_us
    << ", \"graph_step_one_us\": " << graph_step_one_us << ", \"graph_layer_us\": " << graph_layer_us
    << ", \"graph_layers_us\": " << graph_layers_us << ", \"graph_head_us\": " << graph_head_us
    << ", \"graph_layers_same_us\": " << graph_layers_same_us
    << ", \"graph_layers_w0_us\": " << graph_layers_w0_us << ", \"graph_layers_c0_us\": " << graph_layers_c0_us
    << ", \"graph_layers_wclone_us\": " << graph_layers_wclone_us << ", \"graph_layers_wkernel_us\": "
    << graph_layers_wkernel_us << ", \"graph_layers_wpack_us\": " << graph_layers_wpack_us;
  if (!step_costs.empty()) {  // the cost check's outcome (what the Python runtime calls exit_program)
    o << ", \"exit_points_kept\": ";
    list(exit_points_kept);
    o << ", \"exit_points_dropped\": {";
    for (size_t i = 0; i < exit_points_dropped.size(); ++i)
      o << (i ? ", " : "") << "\"" << exit_points_dropped[i].first << "\": \"" << exit_points_dropped[i].second << "\"";
    o << "}, \"step_costs\": \"" << step_costs << "\"";
  }
  o << ", \"runtime\": \"cpp\"}";
  return o.str();
}

}  // namespace specee
