// specee_runner: run the SpecEE decode loop over an exported AOTInductor directory.
//
//   specee_runner DIR --ids 1,2,3 [--mode dense|approximate|lossless] [--kv skip|backfill]
//                 [--max-new-tokens N] [--threshold X] [--max-pending N] [--min-exit-layer N]
//                 [--no-schedule] [--online-window N] [--online-offsets -2,0,2] [--device cpu|cuda]
//                 [--no-verify] [--threads N] [--eos ID,...] [--no-manifest-eos] [--repeat N]
//                 [--no-exit-cost-check] [--step-costs ...] [--no-cuda-graphs] [--time-parts]
//                 [--no-pdl]
//   specee_runner DIR --ids-json FILE        (FILE: {"prompt_ids": [...]} or a bare [...] list)
//
// Prints one JSON object on stdout: token ids, per-token exit layers, timing. Errors are one line on
// stderr ("specee_runner: error: ...") with exit code 2.
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "specee/runtime.h"

namespace {
[[noreturn]] void usage_error(const std::string& msg) { throw specee::Error(msg + " (see the usage in cpp/src/main.cpp)"); }

long long to_int(const std::string& flag, const std::string& v) {
  char* end = nullptr;
  errno = 0;
  long long x = std::strtoll(v.c_str(), &end, 10);
  if (v.empty() || *end != '\0' || errno) usage_error(flag + " expects an integer, got '" + v + "'");
  return x;
}

std::vector<long long> int_list(const std::string& flag, const std::string& v) {
  std::vector<long long> out;
  std::string item;
  std::stringstream ss(v);
  while (std::getline(ss, item, ',')) {
    size_t a = item.find_first_not_of(" \t\n[]"), b = item.find_last_not_of(" \t\n[]");
    if (a == std::string::npos) continue;
    out.push_back(to_int(flag, item.substr(a, b - a + 1)));
  }
  return out;
}

std::vector<long long> ids_from_json(const std::string& path) {
  std::ifstream f(path);
  if (!f) usage_error("--ids-json " + path + " cannot be read");
  std::stringstream ss;
  ss << f.rdbuf();
  std::string s = ss.str();
  size_t key = s.find("\"prompt_ids\"");
  size_t a = s.find('[', key == std::string::npos ? 0 : key), b = s.find(']', a);
  if (a == std::string::npos || b == std::string::npos) usage_error("--ids-json " + path + " holds no [ids] list");
  return int_list("--ids-json", s.substr(a + 1, b - a - 1));
}
}  // namespace

int main(int argc, char** argv) {
  try {
    std::vector<std::string> args(argv + 1, argv + argc);
    std::string dir;
    std::vector<long long> ids;
    bool have_ids = false;
    int repeat = 1;
    specee::Options opt;
    for (size_t i = 0; i < args.size(); ++i) {
      const std::string& a = args[i];
      auto val = [&]() -> std::string {
        if (i + 1 >= args.size()) usage_error(a + " needs a value");
        return args[++i];
      };
      if (a == "--ids") { ids = int_list(a, val()); have_ids = true; }
      else if (a == "--ids-json") { ids = ids_from_json(val()); have_ids = true; }
      else if (a == "--mode") opt.mode = val();
      else if (a == "--kv") opt.kv = val();
      else if (a == "--max-new-tokens") opt.max_new_tokens = int(to_int(a, val()));
      else if (a == "--threshold") {
        std::string v = val();
        char* end = nullptr;
        opt.threshold = std::strtod(v.c_str(), &end);
        if (v.empty() || *end || opt.threshold < 0 || opt.threshold > 1) usage_error("--threshold expects a number in [0, 1]");
      }
      else if (a == "--max-pending") opt.max_pending = int(to_int(a, val()));
      else if (a == "--min-exit-layer") opt.min_exit_layer = int(to_int(a, val()));
      else if (a == "--no-schedule") opt.use_schedule = false;
      else if (a == "--online-window") opt.online_window = int(to_int(a, val()));
      else if (a == "--online-offsets") {
        opt.online_offsets.clear();
        for (auto o : int_list(a, val())) opt.online_offsets.push_back(int(o));
      }
      else if (a == "--device") opt.device = val();
      else if (a == "--no-verify") opt.verify_sha256 = false;
      else if (a == "--threads") opt.threads = int(to_int(a, val()));
      else if (a == "--eos") { for (auto e : int_list(a, val())) opt.eos_ids.push_back(e); }
      else if (a == "--no-manifest-eos") opt.use_manifest_eos = false;
      else if (a == "--no-exit-cost-check") opt.exit_cost_check = false;
      else if (a == "--no-cuda-graphs") opt.cuda_graphs = false;
      else if (a == "--no-pdl") opt.pdl = false;
      else if (a == "--time-parts") opt.time_parts = true;
      else if (a == "--step-costs") {  // layer_us=X,decision_us=X,draft_us=X,check_us=X[,row_us=X]
        std::string v = val(), item;
        std::stringstream ss(v);
        while (std::getline(ss, item, ',')) {
          const auto eq = item.find('=');
          const std::string key = item.substr(0, eq);
          char* end = nullptr;
          const double x = eq == std::string::npos ? -1 : std::strtod(item.c_str() + eq + 1, &end);
          if ((key != "layer_us" && key != "decision_us" && key != "draft_us" && key != "check_us" && key != "row_us") ||
              eq == std::string::npos || eq + 1 == item.size() || *end || x < 0)
            usage_error("--step-costs expects layer_us=X,decision_us=X,draft_us=X,check_us=X[,row_us=X] "
                        "(microseconds, >= 0); got '" + item + "'");
          opt.step_costs[key] = x;
        }
        for (const char* k : {"layer_us", "decision_us", "draft_us", "check_us"})
          if (!opt.step_costs.count(k)) usage_error(std::string("--step-costs is missing ") + k);
      }
      else if (a == "--repeat") repeat = int(to_int(a, val()));
      else if (a == "-h" || a == "--help") {
        std::cout << "usage: specee_runner DIR --ids 1,2,3 [--mode dense|approximate|lossless] [--kv skip|backfill] "
                     "[--max-new-tokens N] [--threshold X] [--max-pending N] [--min-exit-layer N] [--no-schedule] "
                     "[--online-window N] [--online-offsets -2,0,2] [--device cpu|cuda] [--no-verify] [--threads N] [--eos IDS] "
                     "[--no-manifest-eos] [--no-exit-cost-check] [--step-costs layer_us=X,decision_us=X,draft_us=X,check_us=X] "
                     "[--no-cuda-graphs] [--time-parts] [--no-pdl] "
                     "[--repeat N]\n";
        return 0;
      }
      else if (!a.empty() && a[0] == '-') usage_error("unknown option " + a);
      else if (dir.empty()) dir = a;
      else usage_error("unexpected argument " + a);
    }
    if (dir.empty()) usage_error("no artifact directory given");
    if (!have_ids) usage_error("no prompt: pass --ids 1,2,3 or --ids-json FILE");
    if (repeat < 1) usage_error("--repeat must be >= 1");
    if (opt.max_new_tokens < 1) usage_error("--max-new-tokens must be >= 1");
    specee::Runtime rt(dir, opt);
    std::vector<int64_t> prompt(ids.begin(), ids.end());
    specee::Result r;
    for (int i = 0; i < repeat; ++i) r = rt.generate(prompt);  // --repeat: warm runs, the last one reported
    std::cout << r.to_json() << std::endl;
    return 0;
  } catch (const std::exception& e) {
    std::string msg = e.what();
    std::cerr << "specee_runner: error: " << msg.substr(0, msg.find('\n')) << std::endl;
    return 2;
  }
}
