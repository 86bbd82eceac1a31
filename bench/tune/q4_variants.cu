// Tuning harness for the q4 matvec kernel (crates/unibuf/src/ops/cuda/q4.cu): variants of rows
// per group (R), 32-code chunks per thread (CPT), load flavour (LD), minimum blocks per SM (MINB)
// and x read 8 values at a time (PIECE), timed with CUDA events on the shapes of
// `unibuf bench kernels`, results checked against the first variant, beside a 1 GiB device copy.
// Standalone (nvcc, no Rust): on a GPU machine, from the repository root,
//
//     nvcc -O3 -arch=sm_90 -std=c++17 bench/tune/q4_variants.cu -o /tmp/q4v && /tmp/q4v
//
// The shared prelude (common.cuh) is pasted in below.
// Shared prelude of the ops' CUDA kernels, prepended to each op's source with concat!.
//
// NVRTC is given no include path, so the half-precision types are declared here rather than
// taken from cuda_fp16.h / cuda_bf16.h: storage is the 16-bit pattern in a tagged struct (so
// that overloads tell f16 from bf16), converted with PTX `cvt` (f16) and bit operations (bf16).
// Arithmetic is always f32.

typedef unsigned long long ub_u64;

struct ub_f16 { unsigned short bits; };
struct ub_bf16 { unsigned short bits; };

__device__ __forceinline__ float ub_to_f32(float v) { return v; }
__device__ __forceinline__ float ub_to_f32(ub_f16 v) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.bits));
    return f;
}
__device__ __forceinline__ float ub_to_f32(ub_bf16 v) {
    return __uint_as_float(((unsigned int)v.bits) << 16);
}

template <typename S> __device__ __forceinline__ S ub_from_f32(float f);
template <> __device__ __forceinline__ float ub_from_f32<float>(float f) { return f; }
template <> __device__ __forceinline__ ub_f16 ub_from_f32<ub_f16>(float f) {
    ub_f16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h.bits) : "f"(f));
    return h;
}
// Round to nearest even; NaN stays a (quiet) NaN.
template <> __device__ __forceinline__ ub_bf16 ub_from_f32<ub_bf16>(float f) {
    unsigned int u = __float_as_uint(f);
    ub_bf16 b;
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        b.bits = (unsigned short)((u >> 16) | 0x40u);
    } else {
        b.bits = (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    }
    return b;
}

__device__ __forceinline__ float ub_warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float ub_warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
// `scratch` is __shared__ float[32]; the call may be repeated with the same scratch.
__device__ __forceinline__ float ub_block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = ub_warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : 0.0f;
    return ub_warp_sum(v);
}
// Maximum over the block, as ub_block_sum.
__device__ __forceinline__ float ub_block_max(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = ub_warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : __int_as_float(0xff800000);  // -inf (no math.h)
    return ub_warp_max(v);
}

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
    unsigned shapes[3][2] = {{8192, 8192}, {14336, 4096}, {4096, 14336}};
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
        run<4, 1, 0>("R4 CPT1 (shipped)", p, s, x, y, rows, cols, &ref, 1);
        run<4, 2, 0>("R4 CPT2", p, s, x, y, rows, cols, &ref, 1);
        run<4, 2, 0, 1, 1>("R4 CPT2 piece", p, s, x, y, rows, cols, &ref, 1);
        run<4, 2, 0, 3, 1>("R4 CPT2 piece minb3", p, s, x, y, rows, cols, &ref, 1);
        run<4, 2, 0, 4, 1>("R4 CPT2 piece minb4", p, s, x, y, rows, cols, &ref, 1);
        run<4, 4, 0, 2, 1>("R4 CPT4 piece minb2", p, s, x, y, rows, cols, &ref, 1);
        run<4, 4, 0, 3, 1>("R4 CPT4 piece minb3", p, s, x, y, rows, cols, &ref, 1);
        run<8, 2, 0, 2, 1>("R8 CPT2 piece minb2", p, s, x, y, rows, cols, &ref, 1);
        run<8, 1, 0, 3, 1>("R8 CPT1 piece minb3", p, s, x, y, rows, cols, &ref, 1);
        run<2, 4, 0, 4, 1>("R2 CPT4 piece minb4", p, s, x, y, rows, cols, &ref, 1);
        run<2, 8, 0, 3, 1>("R2 CPT8 piece minb3", p, s, x, y, rows, cols, &ref, 1);
        run<4, 2, 0, 4, 0>("R4 CPT2 minb4", p, s, x, y, rows, cols, &ref, 1);
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
