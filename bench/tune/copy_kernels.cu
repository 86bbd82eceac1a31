// Device copies and fills over memory mapped through the virtual-memory API, to decide how the
// CUDA backend should copy and fill arena memory: the driver's cuMemcpyDtoD / cuMemsetD8/D32
// over cuMemAlloc memory (the ceiling), over 2 MiB granules each its own physical allocation
// (as the allocator's arena maps them; mapped in shuffled order, as a long-running arena ends
// up), over one physical allocation per 32 MiB, and copy / fill kernels over the granules.
// Standalone: nvcc -O3 -arch=sm_90 -std=c++17 bench/tune/copy_kernels.cu -lcuda -o /tmp/ck && /tmp/ck
#include "driver.h"
#include <algorithm>
#include <random>
#include <vector>

// 16-byte copy, UNROLL loads in flight per thread, grid-stride.
template <int UNROLL>
__global__ void __launch_bounds__(256) copy16(const uint4* __restrict__ src, uint4* __restrict__ dst, unsigned long long n) {
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    for (; i + (UNROLL - 1) * stride < n; i += UNROLL * stride) {
        uint4 v[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) v[u] = __ldcs(src + i + u * stride);
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) __stcs(dst + i + u * stride, v[u]);
    }
    for (; i < n; i += stride) __stcs(dst + i, __ldcs(src + i));
}
template <int UNROLL>
__global__ void __launch_bounds__(256) fill16(uint4* __restrict__ dst, uint4 v, unsigned long long n) {
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    for (; i + (UNROLL - 1) * stride < n; i += UNROLL * stride) {
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) __stcs(dst + i + u * stride, v);
    }
    for (; i < n; i += stride) __stcs(dst + i, v);
}

static CUmemAllocationProp prop() {
    CUmemAllocationProp p = {};
    p.type = CU_MEM_ALLOCATION_TYPE_PINNED;
    p.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    p.location.id = 0;
    return p;
}

// `bytes` of address space backed by pieces of `piece` bytes, each its own allocation, created
// in order and mapped in shuffled order (so physically scattered like a long-lived arena's).
// `reserve`: address space reserved around it (0: just `bytes`), as the arena reserves twice
// the device's memory up front.
static CUdeviceptr vmm(size_t bytes, size_t piece, bool shuffle, size_t reserve = 0) {
    CUmemAllocationProp p = prop();
    CUdeviceptr base;
    CK(cuMemAddressReserve(&base, std::max(bytes, reserve), 2 << 20, 0, 0));
    size_t n = bytes / piece;
    std::vector<CUmemGenericAllocationHandle> hs(n);
    for (auto& h : hs) CK(cuMemCreate(&h, piece, &p, 0));
    std::vector<size_t> order(n);
    for (size_t i = 0; i < n; ++i) order[i] = i;
    if (shuffle) std::shuffle(order.begin(), order.end(), std::mt19937(7));
    for (size_t i = 0; i < n; ++i) CK(cuMemMap(base + order[i] * piece, piece, 0, hs[i], 0));
    CUmemAccessDesc a = {};
    a.location = p.location;
    a.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
    CK(cuMemSetAccess(base, bytes, &a, 1));
    return base;
}

static CUstream stream;
static CUevent e0, e1;

template <typename F> static double gbps(size_t bytes, double factor, F op) {
    int reps = (int)std::max<size_t>(3, std::min<size_t>(200, (size_t(8) << 30) / bytes));
    op();
    CK(cuStreamSynchronize(stream));
    float best = 1e30f;
    for (int s = 0; s < 5; ++s) {
        CK(cuEventRecord(e0, stream));
        for (int i = 0; i < reps; ++i) op();
        CK(cuEventRecord(e1, stream));
        CK(cuEventSynchronize(e1));
        float ms;
        CK(cuEventElapsedTime(&ms, e0, e1));
        best = std::min(best, ms / reps);
    }
    return factor * bytes / (best * 1e-3) / 1e9;
}

int main() {
    CUdevice dev = bind_primary_context();
    CK(cuStreamCreate(&stream, CU_STREAM_NON_BLOCKING));
    CK(cuEventCreate(&e0, 0));
    CK(cuEventCreate(&e1, 0));
    int sms;
    CK(cuDeviceGetAttribute(&sms, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, dev));
    printf("%-10s %-34s %10s %10s %10s\n", "size", "memory", "DtoD", "memsetD8", "memsetD32");
    for (size_t bytes : {size_t(16) << 20, size_t(256) << 20, size_t(1) << 30}) {
        CUdeviceptr a, b;
        CK(cuMemAlloc(&a, bytes));
        CK(cuMemAlloc(&b, bytes));
        struct Mem { const char* name; CUdeviceptr a, b; } mems[] = {
            {"cuMemAlloc", a, b},
            {"2 MiB granules, in order", vmm(bytes, 2 << 20, false), vmm(bytes, 2 << 20, false)},
            {"2 MiB granules, shuffled", vmm(bytes, 2 << 20, true), vmm(bytes, 2 << 20, true)},
            {"32 MiB pieces", bytes >= (32u << 20) ? vmm(bytes, 32 << 20, false) : 0,
             bytes >= (32u << 20) ? vmm(bytes, 32 << 20, false) : 0},
            {"2 MiB granules in 256 GiB reserved", vmm(2 * bytes, 2 << 20, false, size_t(256) << 30), 0},
        };
        mems[4].b = mems[4].a + bytes;  // both buffers in one large reservation, as in the arena
        for (auto& m : mems) {
            if (!m.a) continue;
            double c = gbps(bytes, 2.0, [&] { CK(cuMemcpyDtoDAsync(m.b, m.a, bytes, stream)); });
            double f8 = gbps(bytes, 1.0, [&] { CK(cuMemsetD8Async(m.a, 3, bytes, stream)); });
            double f32 = gbps(bytes, 1.0, [&] { CK(cuMemsetD32Async(m.a, 0x01020304u, bytes / 4, stream)); });
            printf("%-7zu MiB %-34s %10.0f %10.0f %10.0f\n", bytes >> 20, m.name, c, f8, f32);
        }
        // Kernels over the shuffled granules.
        CUdeviceptr ga = mems[2].a, gb = mems[2].b;
        unsigned long long n = bytes / 16;
        for (int mult : {2, 4, 8}) {
            unsigned grid = sms * mult;
            double c1 = gbps(bytes, 2.0, [&] { copy16<1><<<grid, 256, 0, (cudaStream_t)stream>>>((const uint4*)ga, (uint4*)gb, n); });
            double c4 = gbps(bytes, 2.0, [&] { copy16<4><<<grid, 256, 0, (cudaStream_t)stream>>>((const uint4*)ga, (uint4*)gb, n); });
            double f1 = gbps(bytes, 1.0, [&] { fill16<1><<<grid, 256, 0, (cudaStream_t)stream>>>((uint4*)ga, make_uint4(1, 2, 3, 4), n); });
            double f4 = gbps(bytes, 1.0, [&] { fill16<4><<<grid, 256, 0, (cudaStream_t)stream>>>((uint4*)ga, make_uint4(1, 2, 3, 4), n); });
            printf("%-7zu MiB kernels, grid %3u x SMs, shuffled     copy u1 %6.0f u4 %6.0f   fill u1 %6.0f u4 %6.0f\n",
                   bytes >> 20, mult, c1, c4, f1, f4);
        }
        unsigned grid = (unsigned)std::min<unsigned long long>((n + 255) / 256, 1u << 20);
        double c1 = gbps(bytes, 2.0, [&] { copy16<1><<<grid, 256, 0, (cudaStream_t)stream>>>((const uint4*)ga, (uint4*)gb, n); });
        double f1 = gbps(bytes, 1.0, [&] { fill16<1><<<grid, 256, 0, (cudaStream_t)stream>>>((uint4*)ga, make_uint4(1, 2, 3, 4), n); });
        printf("%-7zu MiB kernels, one thread per 16 B, shuffled copy %6.0f   fill %6.0f\n", bytes >> 20, c1, f1);
        CK(cuStreamSynchronize(stream));
    }
    return 0;
}
