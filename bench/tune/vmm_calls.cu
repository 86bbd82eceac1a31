// What each virtual-memory driver call costs, one granule at a time and in larger pieces, to
// decide where the allocator's map/unmap time goes (cuMemCreate, cuMemMap, cuMemSetAccess,
// cuMemUnmap, cuMemRelease). Standalone: nvcc -O3 bench/tune/vmm_calls.cu -lcuda -o /tmp/vmmcalls
#include "driver.h"
#include <vector>

int main() {
    CUdevice dev = bind_primary_context();
    const VmmMemory vmm = vmm_device_memory();
    const CUmemAllocationProp& prop = vmm.prop;
    const size_t g = vmm.granule;
    const CUmemAccessDesc& access = vmm.access;
    const int n = 256;
    CUdeviceptr base;
    CK(cuMemAddressReserve(&base, n * g * 8, g, 0, 0));
    printf("granule %zu KiB, %d granules per row\n", g >> 10, n);
    printf("%-10s %10s %10s %10s %10s %10s  (us per call)\n", "piece", "create", "map", "access", "unmap", "release");
    for (int per : {1, 4, 16}) {
        const size_t piece = per * g;
        const int calls = n / per;
        std::vector<CUmemGenericAllocationHandle> h(calls);
        double t0 = now_us();
        for (int i = 0; i < calls; ++i) CK(cuMemCreate(&h[i], piece, &prop, 0));
        double t1 = now_us();
        for (int i = 0; i < calls; ++i) CK(cuMemMap(base + i * piece, piece, 0, h[i], 0));
        double t2 = now_us();
        for (int i = 0; i < calls; ++i) CK(cuMemSetAccess(base + i * piece, piece, &access, 1));
        double t3 = now_us();
        // Touch the memory so unmapping has real mappings to tear down.
        CK(cuMemsetD8(base, 1, n * g));
        CK(cuCtxSynchronize());
        double t4 = now_us();
        for (int i = 0; i < calls; ++i) CK(cuMemUnmap(base + i * piece, piece));
        double t5 = now_us();
        for (int i = 0; i < calls; ++i) CK(cuMemRelease(h[i]));
        double t6 = now_us();
        printf("%-7zu MiB %10.1f %10.1f %10.1f %10.1f %10.1f\n", piece >> 20, (t1 - t0) / calls,
               (t2 - t1) / calls, (t3 - t2) / calls, (t5 - t4) / calls, (t6 - t5) / calls);
    }
    // Remapping kept handles (no create/release): unmap one granule and map it back elsewhere.
    {
        std::vector<CUmemGenericAllocationHandle> h(n);
        for (int i = 0; i < n; ++i) CK(cuMemCreate(&h[i], g, &prop, 0));
        for (int i = 0; i < n; ++i) CK(cuMemMap(base + i * g, g, 0, h[i], 0));
        CK(cuMemSetAccess(base, n * g, &access, 1));
        double t0 = now_us();
        for (int i = 0; i < n; ++i) {
            CK(cuMemUnmap(base + i * g, g));
            CK(cuMemMap(base + (n + i) * g, g, 0, h[i], 0));
            CK(cuMemSetAccess(base + (n + i) * g, g, &access, 1));
        }
        double t1 = now_us();
        printf("remap a kept handle (unmap + map + access): %.1f us per granule\n", (t1 - t0) / n);
        // One access call over a range of separately mapped granules.
        t0 = now_us();
        CK(cuMemSetAccess(base + n * g, n * g, &access, 1));
        t1 = now_us();
        printf("access over %d separately mapped granules in one call: %.1f us\n", n, t1 - t0);
        t0 = now_us();
        CK(cuMemUnmap(base + n * g, n * g));
        t1 = now_us();
        printf("unmap of %d separately mapped granules in one call: %.1f us\n", n, t1 - t0);
        for (int i = 0; i < n; ++i) CK(cuMemRelease(h[i]));
    }
    CK(cuMemAddressFree(base, n * g * 8));
    // Moves as the allocator makes them: 150 granules mapped (the shared trace's peak), then
    // unmap one, map its handle further on, grant access; in a small reservation and in one of
    // twice the device's memory (the allocator's arena), to see whether the range's size or
    // the resident mappings change the price.
    size_t total = 0;
    CK(cuDeviceTotalMem(&total, dev));
    for (size_t reserve : {size_t(1024) * g, (2 * total + g - 1) / g * g}) {
        CUdeviceptr b;
        CK(cuMemAddressReserve(&b, reserve, g, 0, 0));
        const int live = 150, moves = 256;
        std::vector<CUmemGenericAllocationHandle> h(live);
        for (int i = 0; i < live; ++i) {
            CK(cuMemCreate(&h[i], g, &prop, 0));
            CK(cuMemMap(b + i * g, g, 0, h[i], 0));
        }
        CK(cuMemSetAccess(b, live * g, &access, 1));
        CK(cuMemsetD8(b, 1, live * g));
        CK(cuCtxSynchronize());
        double tu = 0, tm = 0, ta = 0;
        for (int k = 0; k < moves; ++k) {
            const int from = k % live, to = live + k;  // slides up by one granule per move
            (void)to;
            double t0 = now_us();
            CK(cuMemUnmap(b + size_t(k) * g, g));
            double t1 = now_us();
            CK(cuMemMap(b + size_t(k + live) * g, g, 0, h[from], 0));
            double t2 = now_us();
            CK(cuMemSetAccess(b + size_t(k + live) * g, g, &access, 1));
            double t3 = now_us();
            tu += t1 - t0, tm += t2 - t1, ta += t3 - t2;
        }
        printf("moves, %d granules mapped, reservation %zu GiB: unmap %.1f map %.1f access %.1f us\n",
               live, reserve >> 30, tu / moves, tm / moves, ta / moves);
        for (int k = moves; k < moves + live; ++k) CK(cuMemUnmap(b + size_t(k) * g, g));
        for (int i = 0; i < live; ++i) CK(cuMemRelease(h[i]));
        CK(cuMemAddressFree(b, reserve));
    }
    return 0;
}
