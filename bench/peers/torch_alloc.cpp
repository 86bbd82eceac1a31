// PyTorch's C++ CUDA caching allocator on the workloads of `unibuf bench alloc` and
// `unibuf replay`, built on the GPU machine against the torch installed there:
//
//   bash bench/peers/torch_alloc.sh TRACE.csv.gz     # builds, then runs default and expandable
//
// Prints, per workload: ns per event (raw_alloc / raw_delete) and, for the trace, peak reserved
// over peak live (live = bytes the trace has allocated and not freed).
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

using Clock = std::chrono::steady_clock;
namespace cca = c10::cuda::CUDACachingAllocator;

struct Event {
  bool alloc;
  unsigned long long addr;
  size_t size;
};

static std::vector<Event> read_trace(const char* path) {
  std::ifstream in(path);
  std::string line;
  std::getline(in, line);  // header
  std::vector<Event> ev;
  while (std::getline(in, line)) {
    std::stringstream ss(line);
    std::string action, addr, size;
    std::getline(ss, action, ',');
    std::getline(ss, addr, ',');
    std::getline(ss, size, ',');
    ev.push_back({action == "alloc", std::stoull(addr), (size_t)std::stoull(size)});
  }
  return ev;
}

static double hot_pairs(size_t size, int pairs) {
  auto* a = cca::get();
  a->raw_delete(a->raw_alloc(size));
  auto t = Clock::now();
  for (int i = 0; i < pairs; ++i) a->raw_delete(a->raw_alloc(size));
  return std::chrono::duration<double, std::nano>(Clock::now() - t).count() / (2.0 * pairs);
}

int main(int argc, char** argv) {
  // Outside Python nothing initialises the allocator for the devices: do it as torch does.
  cca::get()->init(c10::cuda::device_count());
  c10::cuda::set_device(0);
  const char* conf = std::getenv("PYTORCH_CUDA_ALLOC_CONF");
  std::printf("pytorch caching allocator (%s)\n", conf ? conf : "default");
  for (size_t size : {size_t(4) << 10, size_t(1) << 20, size_t(64) << 20})
    std::printf("hot alloc+free pair %8zu B: %.1f ns/event\n", size, hot_pairs(size, 100000));
  if (argc > 1) {
    auto ev = read_trace(argv[1]);
    cca::emptyCache();
    cca::resetPeakStats(0);
    auto* a = cca::get();
    std::unordered_map<unsigned long long, std::pair<void*, size_t>> live;
    size_t live_bytes = 0, peak_live = 0;
    auto t = Clock::now();
    for (auto& e : ev) {
      if (e.alloc) {
        live[e.addr] = {a->raw_alloc(e.size), e.size};
        live_bytes += e.size;
        if (live_bytes > peak_live) peak_live = live_bytes;
      } else {
        auto it = live.find(e.addr);
        a->raw_delete(it->second.first);
        live_bytes -= it->second.second;
        live.erase(it);
      }
    }
    double ns = std::chrono::duration<double, std::nano>(Clock::now() - t).count() / ev.size();
    auto stats = cca::getDeviceStats(0);
    size_t peak_reserved = stats.reserved_bytes[size_t(c10::CachingAllocator::StatType::AGGREGATE)].peak;
    std::printf("trace %s: %zu events, peak live %.2f MiB, peak reserved %.2f MiB, reserved/live %.3f, %.1f ns/event\n",
                argv[1], ev.size(), peak_live / 1048576.0, peak_reserved / 1048576.0,
                double(peak_reserved) / double(peak_live), ns);
    for (auto& kv : live) a->raw_delete(kv.second.first);
  }
  return 0;
}
