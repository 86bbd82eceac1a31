// The driver's cost of the allocator's own map/unmap sequence on the shared llama trace,
// without the allocator: bench/tune/llama_vmm_sequence.txt lists, in order, each
// `map N G` / `unmap N G` (N granules from granule G of the arena) that the policy issued
// while replaying llama_varbatch_decode.csv.gz (recorded from the simulated replay). Played
// twice per round: "release" returns each unmapped granule's memory (cuMemRelease) and creates
// new memory for each map (cuMemCreate); "move" keeps unmapped memory for the next map, as the
// allocator does (VirtualMemory::unmap_for_reuse). Prints microseconds per call type and the
// total against the trace's 406,527 events.
// Standalone: nvcc -O3 -std=c++17 bench/tune/vmm_sequence.cu -lcuda -o /tmp/vmmseq
#include "driver.h"
#include <cstring>
#include <map>
#include <vector>

struct Op { bool map; int n; long g; };

int main(int argc, char** argv) {
    const char* path = argc > 1 ? argv[1] : "bench/tune/llama_vmm_sequence.txt";
    FILE* f = fopen(path, "r");
    if (!f) { printf("cannot open %s\n", path); return 1; }
    std::vector<Op> ops;
    char kind[16];
    int n;
    long g;
    while (fscanf(f, "%15s %d %ld", kind, &n, &g) == 3) ops.push_back({strcmp(kind, "map") == 0, n, g});
    fclose(f);
    CUdevice dev = bind_primary_context();
    const VmmMemory vmm = vmm_device_memory();
    const CUmemAllocationProp& prop = vmm.prop;
    const size_t gran = vmm.granule;
    const CUmemAccessDesc& access = vmm.access;
    size_t total = 0;
    CK(cuDeviceTotalMem(&total, dev));
    const size_t reserve = (2 * total + gran - 1) / gran * gran;  // as the allocator's arena
    printf("%zu ops; granule %zu KiB\n", ops.size(), gran >> 10);
    printf("%-8s %9s %9s %9s %9s %9s %10s %12s\n", "mode", "create", "map", "access", "unmap", "release",
           "total ms", "ns/event");
    for (int round = 0; round < 2; ++round) {
        for (bool move : {false, true}) {
            CUdeviceptr base;
            CK(cuMemAddressReserve(&base, reserve, gran, 0, 0));
            std::map<long, CUmemGenericAllocationHandle> mapped;
            std::vector<CUmemGenericAllocationHandle> kept;
            double t[5] = {0, 0, 0, 0, 0};
            int c[5] = {0, 0, 0, 0, 0};
            for (const Op& op : ops) {
                if (op.map) {
                    for (int i = 0; i < op.n; ++i) {
                        CUmemGenericAllocationHandle h;
                        if (!kept.empty()) {
                            h = kept.back();
                            kept.pop_back();
                        } else {
                            double a = now_us();
                            CK(cuMemCreate(&h, gran, &prop, 0));
                            t[0] += now_us() - a, c[0]++;
                        }
                        double a = now_us();
                        CK(cuMemMap(base + (op.g + i) * gran, gran, 0, h, 0));
                        t[1] += now_us() - a, c[1]++;
                        mapped[op.g + i] = h;
                    }
                    double a = now_us();
                    CK(cuMemSetAccess(base + op.g * gran, op.n * gran, &access, 1));
                    t[2] += now_us() - a, c[2]++;
                    for (CUmemGenericAllocationHandle h : kept) {
                        double b = now_us();
                        CK(cuMemRelease(h));
                        t[4] += now_us() - b, c[4]++;
                    }
                    kept.clear();
                } else {
                    for (int i = 0; i < op.n; ++i) {
                        CUmemGenericAllocationHandle h = mapped[op.g + i];
                        mapped.erase(op.g + i);
                        double a = now_us();
                        CK(cuMemUnmap(base + (op.g + i) * gran, gran));
                        t[3] += now_us() - a, c[3]++;
                        if (move) {
                            kept.push_back(h);
                        } else {
                            double b = now_us();
                            CK(cuMemRelease(h));
                            t[4] += now_us() - b, c[4]++;
                        }
                    }
                }
            }
            for (CUmemGenericAllocationHandle h : kept) CK(cuMemRelease(h));
            for (auto& [g, h] : mapped) {
                CK(cuMemUnmap(base + g * gran, gran));
                CK(cuMemRelease(h));
            }
            CK(cuMemAddressFree(base, reserve));
            double sum = t[0] + t[1] + t[2] + t[3] + t[4];
            printf("%-8s", move ? "move" : "release");
            for (int k = 0; k < 5; ++k) printf(" %9.1f", c[k] ? t[k] / c[k] : 0.0);
            printf(" %10.1f %12.1f\n", sum / 1e3, sum * 1e3 / 406527);
        }
    }
    printf("(us per call; access once per map call, the rest once per granule)\n");
    return 0;
}
