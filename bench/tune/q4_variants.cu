// Tuning harness for the q4 matvec kernel (crates/unibuf/src/ops/cuda/q4.cu): variants of rows
// per group (R), 32-code chunks per thread (CPT), load flavour (LD), minimum blocks per SM (MINB)
// and x read 8 values at a time (PIECE), timed with CUDA events on the shapes of
// `unibuf bench kernels`, results checked against the first variant, beside a 1 GiB device copy.
// Standalone (nvcc, no Rust): on a GPU machine, from the repository root,
//
//     nvcc -O3 -arch=sm_90 -std=c++17 bench/tune/q4_variants.cu -o /tmp/q4v && /tmp/q4v
//
#include "../../crates/unibuf/src/ops/cuda/common.cuh"

__device__ __forceinline__ float ub_q4_code(unsigned int nibbles, int i) {
    return __uint_as_float(__byte_perm(nibbles, 0x3f000000u, 0x7054u | ((unsigned int)i << 8)));
}
__device__ __forceinline__ void x32(const ub_f16* x, unsigned long long i, float* v) {
    const uint4* p = reinterpret_cast<const uint4*>(x + i);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        const uint4 q = __ldg(p + k);
        const unsigned int w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            ub_f16 lo, hi; lo.bits = (unsigned short)(w[j] & 0xffffu); hi.bits = (unsigned short)(w[j] >> 16);
            v[8 * k + 2 * j] = ub_to_f32(lo); v[8 * k + 2 * j + 1] = ub_to_f32(hi);
        }
    }
}
template <int R, int CPT, int LD, int MINB = 1, int PIECE = 0>
__global__ void __launch_bounds__(256, MINB) q4(const unsigned char* __restrict__ packed, const ub_f16* __restrict__ scales,
        const ub_f16* __restrict__ x, float* __restrict__ y, unsigned rows, unsigned cols, unsigned group) {
    __shared__ float partial[8][R];
    const unsigned chunks = cols >> 5;
    unsigned tpg = 32; while (tpg * CPT < chunks && tpg < 256) tpg <<= 1;
    const unsigned groups = 256 / tpg, g = threadIdx.x / tpg, t = threadIdx.x % tpg;
    const unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5, wpg = tpg >> 5;
    const unsigned shift = group == 32 ? 0 : (group == 64 ? 1 : 2);
    const unsigned long long ng = cols / group, pitch = cols >> 1, per_block = (unsigned long long)groups * R;
    for (unsigned long long blk = blockIdx.x; blk * per_block < rows; blk += gridDim.x) {
        const unsigned long long r0 = blk * per_block + (unsigned long long)g * R;
        float acc[R];
#pragma unroll
        for (int r = 0; r < R; ++r) acc[r] = 0.f;
        for (unsigned c0 = t; c0 < chunks; c0 += tpg * CPT) {
            uint4 w[CPT][R]; float s[CPT][R];
#pragma unroll
            for (int k = 0; k < CPT; ++k)
#pragma unroll
                for (int r = 0; r < R; ++r) {
                    const unsigned c = c0 + k * tpg;
                    if (r0 + r < rows && c < chunks) {
                        const uint4* p = reinterpret_cast<const uint4*>(packed + (r0 + r) * pitch + 16ull * c);
                        w[k][r] = LD == 0 ? __ldcs(p) : (LD == 1 ? __ldg(p) : *p);
                        s[k][r] = ub_to_f32(scales[(r0 + r) * ng + (c >> shift)]);
                    } else { w[k][r] = make_uint4(0,0,0,0); s[k][r] = 0.f; }
                }
#pragma unroll
            for (int k = 0; k < CPT; ++k) {
                const unsigned c = c0 + k * tpg;
                if (c >= chunks) break;
                if (PIECE) {
                    float dot[R]; float sx = 0.f;
#pragma unroll
                    for (int r = 0; r < R; ++r) dot[r] = 0.f;
                    const uint4* px = reinterpret_cast<const uint4*>(x + 32ull * c);
#pragma unroll
                    for (int j = 0; j < 4; ++j) {
                        const uint4 q = __ldg(px + j);
                        const unsigned hw[4] = {q.x, q.y, q.z, q.w};
                        float xv[8];
#pragma unroll
                        for (int i = 0; i < 4; ++i) {
                            ub_f16 lo, hi; lo.bits = (unsigned short)(hw[i] & 0xffffu); hi.bits = (unsigned short)(hw[i] >> 16);
                            xv[2 * i] = ub_to_f32(lo); xv[2 * i + 1] = ub_to_f32(hi);
                            sx += xv[2 * i] + xv[2 * i + 1];
                        }
#pragma unroll
                        for (int r = 0; r < R; ++r) {
                            const unsigned word = j == 0 ? w[k][r].x : (j == 1 ? w[k][r].y : (j == 2 ? w[k][r].z : w[k][r].w));
                            const unsigned lo = word & 0x0f0f0f0fu, hi = (word >> 4) & 0x0f0f0f0fu;
#pragma unroll
                            for (int i = 0; i < 4; ++i) {
                                dot[r] = fmaf(ub_q4_code(lo, i), xv[2 * i], dot[r]);
                                dot[r] = fmaf(ub_q4_code(hi, i), xv[2 * i + 1], dot[r]);
                            }
                        }
                    }
#pragma unroll
                    for (int r = 0; r < R; ++r) acc[r] = fmaf(s[k][r], fmaf(256.f, dot[r], -136.f * sx), acc[r]);
                } else {
                float xv[32]; x32(x, 32ull * c, xv);
                float sx = 0.f;
#pragma unroll
                for (int i = 0; i < 32; ++i) sx += xv[i];
#pragma unroll
                for (int r = 0; r < R; ++r) {
                    const unsigned words[4] = {w[k][r].x, w[k][r].y, w[k][r].z, w[k][r].w};
                    float dot = 0.f;
#pragma unroll
                    for (int j = 0; j < 4; ++j) {
                        const unsigned lo = words[j] & 0x0f0f0f0fu, hi = (words[j] >> 4) & 0x0f0f0f0fu;
#pragma unroll
                        for (int i = 0; i < 4; ++i) {
                            dot = fmaf(ub_q4_code(lo, i), xv[8 * j + 2 * i], dot);
                            dot = fmaf(ub_q4_code(hi, i), xv[8 * j + 2 * i + 1], dot);
                        }
                    }
                    acc[r] = fmaf(s[k][r], fmaf(256.f, dot, -136.f * sx), acc[r]);
                }
                }
            }
        }
#pragma unroll
        for (int r = 0; r < R; ++r) acc[r] = ub_warp_sum(acc[r]);
        if (wpg > 1) {
            __syncthreads();
            if (lane == 0) for (int r = 0; r < R; ++r) partial[warp][r] = acc[r];
            __syncthreads();
            if (t == 0) for (unsigned k = 1; k < wpg; ++k) for (int r = 0; r < R; ++r) acc[r] += partial[warp + k][r];
        }
        if (t == 0) for (int r = 0; r < R; ++r) if (r0 + r < rows) y[r0 + r] = acc[r];
    }
}
#include <cstdio>
#include <cmath>
#include <vector>
#include <cstdlib>

// ---- tensor-core variant: exact f16 codes (code - 8) times f16 x on mma.m16n8k16 with f32
// accumulation; B's columns separate the four 32-column chunks a warp covers per step, so every
// chunk's partial sum gets its own group scale in f32.
__device__ __forceinline__ unsigned tc_lop3(unsigned a, unsigned b, unsigned c) {
    unsigned d; asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(d) : "r"(a), "r"(b), "r"(c)); return d;
}
__device__ __forceinline__ unsigned tc_hsub2(unsigned a, unsigned b) {
    unsigned d; asm("sub.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b)); return d;
}
__device__ __forceinline__ void tc_mma(float* d, unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0, unsigned b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
// Code pairs (c_j, c_{j+4}) of a word as f16x2 (code - 8), j = 0..3.
__device__ __forceinline__ void tc_unpack(unsigned w, unsigned* p) {
#pragma unroll
    for (int j = 0; j < 4; ++j) p[j] = tc_hsub2(tc_lop3(w >> (4 * j), 0x000f000fu, 0x64006400u), 0x64086408u);
}
template <int WARPS, int UNROLL>
__global__ void __launch_bounds__(WARPS * 32) q4tc(const unsigned char* __restrict__ packed, const ub_f16* __restrict__ scales,
        const ub_f16* __restrict__ x, float* __restrict__ y, unsigned rows, unsigned cols, unsigned group) {
    __shared__ float partial[WARPS][16];
    const unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const unsigned chunks = cols >> 5, quads = (chunks + 3) >> 2;
    const unsigned shift = group == 32 ? 0 : (group == 64 ? 1 : 2);
    const unsigned long long ng = cols / group, pitch = cols >> 1;
    for (unsigned long long blk = blockIdx.x; blk * 16 < rows; blk += gridDim.x) {
        const unsigned long long r0 = blk * 16 + g, r1 = r0 + 8;
        const bool ok0 = r0 < rows, ok1 = r1 < rows;
        float acc0 = 0.f, acc1 = 0.f;
        for (unsigned q0 = warp; q0 < quads; q0 += WARPS * UNROLL) {
            uint4 w0[UNROLL], w1[UNROLL], xv[UNROLL][4];
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                const unsigned q = q0 + u * WARPS, c = q * 4 + t;
                const bool cin = q < quads && c < chunks;
                w0[u] = (cin && ok0) ? __ldcs(reinterpret_cast<const uint4*>(packed + r0 * pitch + 16ull * c)) : make_uint4(0,0,0,0);
                w1[u] = (cin && ok1) ? __ldcs(reinterpret_cast<const uint4*>(packed + r1 * pitch + 16ull * c)) : make_uint4(0,0,0,0);
                // B: only the lane whose n (= g) is its own chunk t supplies x; the rest are zero.
#pragma unroll
                for (int k = 0; k < 4; ++k)
                    xv[u][k] = (cin && g == t) ? __ldg(reinterpret_cast<const uint4*>(x + 32ull * c) + k) : make_uint4(0,0,0,0);
            }
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                const unsigned q = q0 + u * WARPS;
                if (q >= quads) break;
                float d[4] = {0.f, 0.f, 0.f, 0.f};
                const unsigned ww0[4] = {w0[u].x, w0[u].y, w0[u].z, w0[u].w};
                const unsigned ww1[4] = {w1[u].x, w1[u].y, w1[u].z, w1[u].w};
                const unsigned X[16] = {xv[u][0].x, xv[u][0].y, xv[u][0].z, xv[u][0].w, xv[u][1].x, xv[u][1].y, xv[u][1].z, xv[u][1].w,
                                        xv[u][2].x, xv[u][2].y, xv[u][2].z, xv[u][2].w, xv[u][3].x, xv[u][3].y, xv[u][3].z, xv[u][3].w};
#pragma unroll
                for (int w = 0; w < 4; ++w) {
                    unsigned p0[4], p1[4];
                    tc_unpack(ww0[w], p0);
                    tc_unpack(ww1[w], p1);
#pragma unroll
                    for (int h = 0; h < 2; ++h) {
                        const unsigned xa = X[4 * w + h], xb = X[4 * w + h + 2];
                        const unsigned b0 = __byte_perm(xa, xb, 0x5410), b1 = __byte_perm(xa, xb, 0x7632);
                        tc_mma(d, p0[2 * h], p1[2 * h], p0[2 * h + 1], p1[2 * h + 1], b0, b1);
                    }
                }
                // d = D[g][2t], D[g][2t+1], D[g+8][2t], D[g+8][2t+1]: chunks n = 2t, 2t+1 (< 4).
                if (t < 2) {
#pragma unroll
                    for (int j = 0; j < 2; ++j) {
                        const unsigned c = q * 4 + 2 * t + j;
                        if (c < chunks) {
                            if (ok0) acc0 = fmaf(d[j], ub_to_f32(scales[r0 * ng + (c >> shift)]), acc0);
                            if (ok1) acc1 = fmaf(d[2 + j], ub_to_f32(scales[r1 * ng + (c >> shift)]), acc1);
                        }
                    }
                }
            }
        }
        acc0 += __shfl_xor_sync(0xffffffffu, acc0, 1); acc0 += __shfl_xor_sync(0xffffffffu, acc0, 2);
        acc1 += __shfl_xor_sync(0xffffffffu, acc1, 1); acc1 += __shfl_xor_sync(0xffffffffu, acc1, 2);
        __syncthreads();
        if (t == 0) { partial[warp][g] = acc0; partial[warp][g + 8] = acc1; }
        __syncthreads();
        if (threadIdx.x < 16) {
            float v = 0.f;
#pragma unroll
            for (int k = 0; k < WARPS; ++k) v += partial[k][threadIdx.x];
            const unsigned long long r = blk * 16 + threadIdx.x;
            if (r < rows) y[r] = v;
        }
    }
}
template <int WARPS, int UNROLL>
void run_tc(const char* name, const unsigned char* p, const ub_f16* s, const ub_f16* x, float* y, unsigned rows, unsigned cols, std::vector<float>* ref) {
    unsigned blocks = (rows + 15) / 16;
    cudaEvent_t a, b; cudaEventCreate(&a); cudaEventCreate(&b);
    for (int i = 0; i < 5; ++i) q4tc<WARPS, UNROLL><<<blocks, WARPS * 32>>>(p, s, x, y, rows, cols, 64);
    cudaEventRecord(a);
    const int iters = 200;
    for (int i = 0; i < iters; ++i) q4tc<WARPS, UNROLL><<<blocks, WARPS * 32>>>(p, s, x, y, rows, cols, 64);
    cudaEventRecord(b); cudaEventSynchronize(b);
    float ms; cudaEventElapsedTime(&ms, a, b);
    cudaError_t e = cudaGetLastError();
    double us = ms * 1000.0 / iters;
    double bytes = (double)rows * cols / 2 + (double)rows * (cols / 64) * 2;
    std::vector<float> out(rows); cudaMemcpy(out.data(), y, rows * 4, cudaMemcpyDeviceToHost);
    double maxd = 0; for (unsigned i = 0; i < rows; ++i) { double dd = fabs(out[i] - (*ref)[i]) / (1 + fabs((*ref)[i])); if (dd > maxd) maxd = dd; }
    printf("%-28s %5ux%-5u blocks %6u  %7.2f us  %6.0f GB/s  maxdiff %.2e %s\n", name, rows, cols, blocks, us, bytes / us / 1e3, maxd, cudaGetErrorString(e));
}

// Pure read of `bytes` (16-byte loads, grid-stride, one word written per block): the read
// bandwidth a kernel can reach at this size, launch and tail included.
__global__ void __launch_bounds__(256) read_only(const uint4* __restrict__ p, unsigned long long n, unsigned* out) {
    unsigned acc = 0;
    for (unsigned long long i = blockIdx.x * 256ull + threadIdx.x; i < n; i += gridDim.x * 256ull) {
        const uint4 v = __ldcs(p + i);
        acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    if (acc == 0x12345678u) out[blockIdx.x] = acc;
}
void run_read(const unsigned char* p, size_t bytes, unsigned* out) {
    int sms = 0; cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
    const unsigned blocks = sms * 8;
    cudaEvent_t a, b; cudaEventCreate(&a); cudaEventCreate(&b);
    for (int i = 0; i < 5; ++i) read_only<<<blocks, 256>>>(reinterpret_cast<const uint4*>(p), bytes / 16, out);
    cudaEventRecord(a);
    for (int i = 0; i < 200; ++i) read_only<<<blocks, 256>>>(reinterpret_cast<const uint4*>(p), bytes / 16, out);
    cudaEventRecord(b); cudaEventSynchronize(b);
    float ms; cudaEventElapsedTime(&ms, a, b);
    const double us = ms * 1000.0 / 200;
    printf("%-28s %10zu bytes        %7.2f us  %6.0f GB/s\n", "read-only kernel, same bytes", bytes, us, bytes / us / 1e3);
}
template <int R, int CPT, int LD, int MINB = 1, int PIECE = 0>
void run(const char* name, const unsigned char* p, const ub_f16* s, const ub_f16* x, float* y, unsigned rows, unsigned cols, std::vector<float>* ref, int grid_div) {
    unsigned chunks = cols >> 5, tpg = 32; while (tpg * CPT < chunks && tpg < 256) tpg <<= 1;
    unsigned per_block = (256 / tpg) * R;
    unsigned blocks = (rows + per_block - 1) / per_block; blocks = blocks / grid_div; if (blocks < 1) blocks = 1;
    cudaEvent_t a, b; cudaEventCreate(&a); cudaEventCreate(&b);
    for (int i = 0; i < 5; ++i) q4<R, CPT, LD, MINB, PIECE><<<blocks, 256>>>(p, s, x, y, rows, cols, 64);
    cudaEventRecord(a);
    const int iters = 200;
    for (int i = 0; i < iters; ++i) q4<R, CPT, LD, MINB, PIECE><<<blocks, 256>>>(p, s, x, y, rows, cols, 64);
    cudaEventRecord(b); cudaEventSynchronize(b);
    float ms; cudaEventElapsedTime(&ms, a, b);
    double us = ms * 1000.0 / iters;
    double bytes = (double)rows * cols / 2 + (double)rows * (cols / 64) * 2;
    std::vector<float> out(rows); cudaMemcpy(out.data(), y, rows * 4, cudaMemcpyDeviceToHost);
    double maxd = 0; if (ref->empty()) *ref = out; else for (unsigned i = 0; i < rows; ++i) { double d = fabs(out[i] - (*ref)[i]) / (1 + fabs((*ref)[i])); if (d > maxd) maxd = d; }
    printf("%-28s %5ux%-5u blocks %6u  %7.2f us  %6.0f GB/s  maxdiff %.2e\n", name, rows, cols, blocks, us, bytes / us / 1e3, maxd);
}
int main() {
    unsigned shapes[5][2] = {{8192, 8192}, {14336, 4096}, {4096, 14336}, {28672, 8192}, {8192, 28672}};
    for (auto& sh : shapes) {
        unsigned rows = sh[0], cols = sh[1];
        size_t pb = (size_t)rows * cols / 2, sb = (size_t)rows * (cols / 64);
        std::vector<unsigned char> hp(pb); std::vector<unsigned short> hs(sb), hx(cols);
        for (auto& v : hp) v = rand() & 255;
        for (auto& v : hs) v = 0x2000 + (rand() & 0x3ff);
        for (auto& v : hx) v = 0x3000 + (rand() & 0x3ff) + ((rand() & 1) << 15);
        unsigned char* p; ub_f16 *s, *x; float* y;
        cudaMalloc(&p, pb); cudaMalloc(&s, sb * 2); cudaMalloc(&x, cols * 2); cudaMalloc(&y, rows * 4);
        cudaMemcpy(p, hp.data(), pb, cudaMemcpyHostToDevice); cudaMemcpy(s, hs.data(), sb * 2, cudaMemcpyHostToDevice);
        cudaMemcpy(x, hx.data(), cols * 2, cudaMemcpyHostToDevice);
        std::vector<float> ref;
        run<4, 2, 0, 3, 1>("R4 CPT2 piece minb3 (shipped)", p, s, x, y, rows, cols, &ref, 1);
        run_tc<8, 1>("tc warps8 unroll1", p, s, x, y, rows, cols, &ref);
        run_tc<16, 1>("tc warps16 unroll1", p, s, x, y, rows, cols, &ref);
        run_read(p, pb, reinterpret_cast<unsigned*>(y));
        cudaFree(p); cudaFree(s); cudaFree(x); cudaFree(y);
        // copy ceiling
    }
    size_t n = 1ull << 30; void *a, *b; cudaMalloc(&a, n); cudaMalloc(&b, n);
    cudaEvent_t e0, e1; cudaEventCreate(&e0); cudaEventCreate(&e1);
    cudaMemcpy(b, a, n, cudaMemcpyDeviceToDevice); cudaEventRecord(e0);
    for (int i = 0; i < 10; ++i) cudaMemcpy(b, a, n, cudaMemcpyDeviceToDevice);
    cudaEventRecord(e1); cudaEventSynchronize(e1); float ms; cudaEventElapsedTime(&ms, e0, e1);
    printf("d2d copy 1 GiB: %.0f GB/s (read+write)\n", 2.0 * n * 10 / (ms / 1000) / 1e9);
    return 0;
}
