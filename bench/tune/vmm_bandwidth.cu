// Device copy bandwidth over memory mapped through the virtual-memory API in pieces of various
// sizes (one physical allocation per piece, as the allocator's arena maps granules), beside
// cuMemAlloc. Standalone: nvcc -O3 -arch=sm_90 bench/tune/vmm_bandwidth.cu -lcuda -o /tmp/vmmbw
#include <cuda.h>
#include <cuda_runtime.h>
#include <cstdio>
#include <vector>

#define CK(x) do { CUresult r = (x); if (r != CUDA_SUCCESS) { const char* s; cuGetErrorString(r, &s); printf("%s: %s\n", #x, s); return 0; } } while (0)

static CUdeviceptr vmm(size_t bytes, size_t piece, std::vector<CUmemGenericAllocationHandle>& hs) {
    CUmemAllocationProp prop = {};
    prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
    prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    prop.location.id = 0;
    CUdeviceptr base;
    if (cuMemAddressReserve(&base, bytes, 2 << 20, 0, 0) != CUDA_SUCCESS) return 0;
    for (size_t at = 0; at < bytes; at += piece) {
        CUmemGenericAllocationHandle h;
        if (cuMemCreate(&h, piece, &prop, 0) != CUDA_SUCCESS) return 0;
        if (cuMemMap(base + at, piece, 0, h, 0) != CUDA_SUCCESS) return 0;
        hs.push_back(h);
    }
    CUmemAccessDesc access = {};
    access.location = prop.location;
    access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
    if (cuMemSetAccess(base, bytes, &access, 1) != CUDA_SUCCESS) return 0;
    return base;
}

// how: 0 cudaMemcpyAsync(DeviceToDevice), 1 cuMemcpyAsync (unified), 2 cuMemcpyDtoDAsync,
// 3 cuMemsetD8Async (dst only; counts bytes written once), 4 cuMemsetD32Async.
static double gbps(int how, CUdeviceptr dst, CUdeviceptr src, size_t bytes) {
    auto op = [&]() {
        switch (how) {
            case 0: cudaMemcpyAsync((void*)dst, (void*)src, bytes, cudaMemcpyDeviceToDevice); break;
            case 1: cuMemcpyAsync(dst, src, bytes, 0); break;
            case 2: cuMemcpyDtoDAsync(dst, src, bytes, 0); break;
            case 3: cuMemsetD8Async(dst, 3, bytes, 0); break;
            default: cuMemsetD32Async(dst, 0x01020304u, bytes / 4, 0); break;
        }
    };
    cudaEvent_t a, b; cudaEventCreate(&a); cudaEventCreate(&b);
    op(); cudaDeviceSynchronize();
    cudaEventRecord(a);
    for (int i = 0; i < 10; ++i) op();
    cudaEventRecord(b); cudaEventSynchronize(b);
    float ms; cudaEventElapsedTime(&ms, a, b);
    return (how >= 3 ? 1.0 : 2.0) * bytes * 10 / (ms / 1e3) / 1e9;
}

int main() {
    cudaFree(0);
    const size_t bytes = 1ull << 30;
    void *p, *q; cudaMalloc(&p, bytes); cudaMalloc(&q, bytes);
    const char* names[5] = {"cudaMemcpyAsync D2D", "cuMemcpyAsync", "cuMemcpyDtoDAsync", "cuMemsetD8Async", "cuMemsetD32Async"};
    for (int how = 0; how < 5; ++how)
        printf("cuMemAlloc 1 GiB       %-20s %6.0f GB/s\n", names[how], gbps(how, (CUdeviceptr)q, (CUdeviceptr)p, bytes));
    for (size_t piece : {2ull << 20, 1ull << 30}) {
        std::vector<CUmemGenericAllocationHandle> hs;
        CUdeviceptr s = vmm(bytes, piece, hs), d = vmm(bytes, piece, hs);
        if (!s || !d) { printf("vmm %zu MiB pieces: failed\n", piece >> 20); continue; }
        for (int how = 0; how < 5; ++how)
            printf("vmm %4zu MiB pieces  %-20s %6.0f GB/s\n", piece >> 20, names[how], gbps(how, d, s, bytes));
    }
    return 0;
}
