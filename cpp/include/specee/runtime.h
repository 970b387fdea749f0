// specee_runtime: the SpecEE decode loop over an exported AOTInductor artifact directory
// (`specee-compile export MODEL --format aoti -o DIR`). This header does not include torch, so a
// host application compiles against it quickly; the library links libtorch from the torch wheel.
//
//   specee::Options opt;  opt.mode = "approximate";            // dense | approximate | lossless
//   specee::Runtime rt("exported/smollm2-135m", opt);          // verifies the manifest (sizes, sha256)
//   specee::Result r = rt.generate({1, 2, 3});                  // token ids in (tokenize on the host)
//   std::cout << r.to_json() << "\n";                           // ids, exit layers, timing out
//
// Semantics follow specee_compile/runtime/decoder.py exactly (the parity tests compare token ids and
// exit layers with the Python runtime): dense prefill; per step the EAGLE draft proposes k candidates,
// layers run in order, the exit op scores the state after each active layer (offline set U online
// window +- offsets), approximate mode verifies the full-head argmax is a candidate, lossless mode
// emits the candidate argmax and verifies it by backfill (rollback on mismatch); KV policy skip or
// backfill (pending rows pushed through the layers they skipped, at most max_pending).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace specee {

// Every error the runtime raises (bad artifact, bad input): what() is one line that says what to do.
struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Options {
  std::string mode = "dense";     // dense | approximate | lossless
  std::string kv = "skip";        // skip | backfill (lossless needs backfill)
  int max_new_tokens = 128;
  double threshold = -1.0;        // < 0: each exit point's own threshold from the manifest
  int max_pending = 8;            // backfill: at most this many exited rows wait
  int min_exit_layer = 0;
  bool use_schedule = true;       // false: every exit point is evaluated
  int online_window = 5;
  std::vector<int> online_offsets{-2, 0, 2};
  std::string device = "cpu";     // cpu | cuda | cuda:N (the packages must be exported for it)
  bool verify_sha256 = true;      // sizes are always checked
  int threads = 0;                // CPU threads for libtorch + the packages (0: libtorch default)
  bool use_manifest_eos = true;   // stop at the manifest's eos_ids
  std::vector<int64_t> eos_ids;   // extra stop tokens
  bool exit_cost_check = true;    // keep only exit points that pay for themselves (see Result::exit_points_kept)
  // the cost check's inputs pinned instead of measured (keys layer_us (one layer), decision_us, draft_us,
  // check_us (the full head), row_us (backfill's extra row per layer)): a decision reproduced exactly, e.g.
  // the one the Python runtime took (its GenerationResult exit_program.step_costs); empty = measure
  std::map<std::string, double> step_costs;
  // CUDA: dense steps (dense mode, or SpecEE with no exit point kept) replay captured graphs, one per
  // attention length, captured at the first generate (Result::capture_s); false: per-layer package calls
  bool cuda_graphs = true;
  // CUDA: time the dense step's parts at capture (graph_layer_us, graph_layers_us, graph_head_us), each after
  // 0.2 s of warm-up replays: ~1 s more start-up, so only on request (--time-parts, cpp_bench)
  bool time_parts = false;
  // CUDA (sm_90+): where the packages were compiled to wait (exported under PDL `all`, the default on sm_90+; the
  // manifest names the kernels), the captured dense step lets each such kernel launch before the one it follows
  // completes (programmatic dependent launch; Result::pdl_edges); false: every edge stays a full dependency
  bool pdl = true;
};

struct Result {
  int prompt_len = 0;
  int num_layers = 0;
  std::vector<int64_t> token_ids;  // generated (prompt excluded)
  std::vector<int> exit_layers;    // per token: 0-based layer its step exited after (L-1 = full depth)
  int64_t layer_passes = 0, layer_rows = 0, decode_steps = 0, rollbacks = 0, predictor_calls = 0, head_calls = 0;
  double load_s = 0, prefill_s = 0, decode_s = 0, capture_s = 0;  // capture_s: CUDA graphs (first generate)
  double graph_step_us = 0;  // CUDA graphs: one dense step's device time (back-to-back replays, CUDA events)
  double graph_step_one_us = 0;  // the same, replaying one graph instance (the loop alternates two)
  // its parts, each captured alone: one layer call, the L-layer chain, the head, and layer 0's call L times
  // in a chain (the same weights and cache every call: whether the chain's cost depends on what it reads)
  double graph_layer_us = 0, graph_layers_us = 0, graph_head_us = 0, graph_layers_same_us = 0;
  double graph_layers_w0_us = 0, graph_layers_c0_us = 0;  // layer 0's weights / layer 0's cache in the chain
  // the chain on copies of the weights: cloned, written by a kernel, packed in one allocation
  double graph_layers_wclone_us = 0, graph_layers_wkernel_us = 0, graph_layers_wpack_us = 0;
  bool cuda_graphs = false;                                         // this generate's dense steps replayed graphs
  int pdl_edges = 0;  // edges of a captured dense step made programmatic (0: no PDL; -1: the driver cannot)
  bool one_row_package = false;                                     // one-row steps ran layer1.pt2
  // the exit points that pay for themselves on this device (runtime/exit_costs.py's rule, measured by this
  // runner at its first generate); none kept = SpecEE decodes as dense. Empty `step_costs`: no check ran
  std::vector<int> exit_points_kept;
  std::vector<std::pair<int, std::string>> exit_points_dropped;  // layer, why
  std::string step_costs;  // how the costs were measured
  std::string to_json() const;     // the keys of the Python GenerationResult.stats() that apply
};

class Runtime {
 public:
  Runtime(const std::string& artifact_dir, const Options& options);
  ~Runtime();
  Runtime(const Runtime&) = delete;
  Runtime& operator=(const Runtime&) = delete;
  Result generate(const std::vector<int64_t>& prompt_ids);
  int num_layers() const;
  int max_len() const;
  int vocab() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  double load_s_ = 0;
};

}  // namespace specee
