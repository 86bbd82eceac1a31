// Tuning harness for the RMSNorm kernel (crates/unibuf/src/ops/cuda/norm.cu): the shipped kernel
// beside variants, on f16 8192x8192, timed with CUDA events over 200 back-to-back launches and
// checked against the shipped kernel's output, beside a 1 GiB device copy. Standalone (nvcc):
//
//     nvcc -O3 -arch=sm_90 -std=c++17 bench/tune/norm_variants.cu -o /tmp/normv && /tmp/normv
#include "../../crates/unibuf/src/ops/cuda/common.cuh"
#include "../../crates/unibuf/src/ops/cuda/norm.cu"
#include <cstdio>
#include <cmath>
#include <vector>
#include <cstdlib>

// Persistent blocks: the weight row stays in registers across the rows a block normalises;
// PREFETCH loads the next row while the current one is reduced and written.
template <int VPT, bool PREFETCH>
__global__ void __launch_bounds__(256) norm_persistent(const ub_f16* x, const ub_f16* w, ub_f16* y,
                                                       unsigned rows, unsigned hidden, float eps) {
    __shared__ float scratch[32];
    const unsigned nvec = hidden / 8;
    const uint4* wv = reinterpret_cast<const uint4*>(w);
    uint4 wk[VPT];
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
        const unsigned i = threadIdx.x + k * blockDim.x;
        if (i < nvec) wk[k] = __ldg(wv + i);
    }
    uint4 cur[VPT], nxt[VPT];
    unsigned row = blockIdx.x;
    auto load = [&](unsigned r, uint4 (&dst)[VPT]) {
        const uint4* xv = reinterpret_cast<const uint4*>(x + (unsigned long long)r * hidden);
#pragma unroll
        for (int k = 0; k < VPT; ++k) {
            const unsigned i = threadIdx.x + k * blockDim.x;
            if (i < nvec) dst[k] = xv[i];
        }
    };
    if (row < rows) load(row, cur);
    for (; row < rows; row += gridDim.x) {
        const unsigned next = row + gridDim.x;
        if (PREFETCH && next < rows) load(next, nxt);
        float acc = 0.f;
#pragma unroll
        for (int k = 0; k < VPT; ++k) {
            const unsigned i = threadIdx.x + k * blockDim.x;
            if (i < nvec) acc += ub_norm_sumsq<ub_f16>(cur[k]);
        }
        const float scale = rsqrtf(ub_block_sum(acc, scratch) / (float)hidden + eps);
        uint4* yv = reinterpret_cast<uint4*>(y + (unsigned long long)row * hidden);
#pragma unroll
        for (int k = 0; k < VPT; ++k) {
            const unsigned i = threadIdx.x + k * blockDim.x;
            if (i < nvec) yv[i] = ub_norm_scale<ub_f16>(cur[k], wk[k], scale);
        }
        if (PREFETCH) {
#pragma unroll
            for (int k = 0; k < VPT; ++k) cur[k] = nxt[k];
        } else if (next < rows) {
            load(next, cur);
        }
    }
}

static double time_us(void (*launch)(void*), void* ctx) {
    cudaEvent_t a, b; cudaEventCreate(&a); cudaEventCreate(&b);
    for (int i = 0; i < 5; ++i) launch(ctx);
    cudaEventRecord(a);
    for (int i = 0; i < 200; ++i) launch(ctx);
    cudaEventRecord(b); cudaEventSynchronize(b);
    float ms; cudaEventElapsedTime(&ms, a, b);
    return ms * 1000.0 / 200;
}

struct Ctx { ub_f16 *x, *w, *y; unsigned rows, hidden, threads, grid; };
static Ctx C;
template <int VPT, bool PF> void launch_p(void*) { norm_persistent<VPT, PF><<<C.grid, C.threads>>>(C.x, C.w, C.y, C.rows, C.hidden, 1e-6f); }
void launch_shipped(void*) { unibuf_rms_norm_f16<<<C.rows, C.threads>>>(C.x, C.w, C.y, C.rows, C.hidden, 1e-6f); }

int main() {
    const unsigned rows = 8192, hidden = 8192;
    const size_t n = (size_t)rows * hidden;
    std::vector<unsigned short> hx(n), hw(hidden);
    for (auto& v : hx) v = 0x3000 + (rand() & 0x3ff) + ((rand() & 1) << 15);
    for (auto& v : hw) v = 0x3800 + (rand() & 0x3ff);
    cudaMalloc(&C.x, n * 2); cudaMalloc(&C.w, hidden * 2); cudaMalloc(&C.y, n * 2);
    cudaMemcpy(C.x, hx.data(), n * 2, cudaMemcpyHostToDevice);
    cudaMemcpy(C.w, hw.data(), hidden * 2, cudaMemcpyHostToDevice);
    C.rows = rows; C.hidden = hidden;
    int sms = 0; cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
    std::vector<unsigned short> ref(n), out(n);
    auto report = [&](const char* name, double us) {
        cudaMemcpy(out.data(), C.y, n * 2, cudaMemcpyDeviceToHost);
        size_t diff = 0; for (size_t i = 0; i < n; ++i) diff += out[i] != ref[i];
        printf("%-40s %8.2f us  %6.0f GB/s  %zu elements differ  %s\n", name, us, 2.0 * n * 2 / us / 1e3, diff,
               cudaGetErrorString(cudaGetLastError()));
    };
    C.threads = 256;
    double us = time_us(launch_shipped, nullptr);
    cudaMemcpy(ref.data(), C.y, n * 2, cudaMemcpyDeviceToHost);
    report("shipped (block per row, 256 threads)", us);
    for (unsigned per_sm : {4u, 6u, 8u}) {
        C.grid = sms * per_sm; C.threads = 256;
        char name[64];
        snprintf(name, 64, "persistent %u/SM, w in regs", per_sm); report(name, time_us(launch_p<4, false>, nullptr));
        snprintf(name, 64, "persistent %u/SM, w in regs, prefetch", per_sm); report(name, time_us(launch_p<4, true>, nullptr));
    }
    C.grid = sms * 4; C.threads = 128;
    report("persistent 4/SM, 128 threads x 8 vec, prefetch", time_us(launch_p<8, true>, nullptr));
    C.grid = sms * 8; C.threads = 128;
    report("persistent 8/SM, 128 threads x 8 vec", time_us(launch_p<8, false>, nullptr));
    size_t cb = 1ull << 30; void *a, *b; cudaMalloc(&a, cb); cudaMalloc(&b, cb);
    cudaEvent_t e0, e1; cudaEventCreate(&e0); cudaEventCreate(&e1);
    cudaMemcpy(b, a, cb, cudaMemcpyDeviceToDevice); cudaEventRecord(e0);
    for (int i = 0; i < 10; ++i) cudaMemcpy(b, a, cb, cudaMemcpyDeviceToDevice);
    cudaEventRecord(e1); cudaEventSynchronize(e1); float ms; cudaEventElapsedTime(&ms, e0, e1);
    printf("d2d copy 1 GiB: %.0f GB/s (read+write); 256 MiB copy would take %.1f us\n", 2.0 * cb * 10 / (ms / 1000) / 1e9,
           (2.0 * n * 2) / (2.0 * cb * 10 / (ms / 1000)) * 1e6);
    return 0;
}
