// 4-bit group-quantised matrix-vector product: y[b, r] = sum_c (code[r, c] - 8) * scale[r, c / group]
// * x[b, c], for `batch` rows of x (1..=8). `packed` is [rows, cols / 2] bytes, the low nibble the
// even column; `scales` is f16 [rows, cols / group]; group is 32, 64 or 128, so cols is a multiple
// of 32 and a row is a whole number of 16-byte chunks of 32 codes, each inside one group.
//
// Memory-bound design, for decode (batch 1): the weight stream must keep every SM's memory
// pipeline full, so the work is split finely and every thread issues its loads up front.
// - A block of 256 threads owns UB_Q4_R rows per row group; a row's 32-code chunks are spread
//   over the group's threads (`tpg`, the smallest power of two with tpg * UB_Q4_CPT >= chunks,
//   32..256), so a row of 8192 columns is two 16-byte loads per thread: about a thousand
//   blocks, no long serial loop per row. Narrow matrices put several row groups in a block.
// - Each thread first loads its UB_Q4_CPT chunks of all UB_Q4_R rows (8 x 16 bytes in flight,
//   streamed past L1), then walks x 8 values at a time (read-only path: every block reads the
//   same x, so it is served from L1/L2; 8 at a time keeps registers low enough for 3 blocks per
//   SM), and reduces over the warp and, through shared memory, the group.
// Measured on an H200 (bench/tune/q4_variants.cu): this shape beat 1 or 4 chunks per thread,
// 1, 2 or 8 rows per group, and x held 32 values at a time, by 10-40%.
// - Codes become floats without integer-to-float conversions: a byte permute puts the code in
//   the mantissa of 0.5 (f = 0.5 + code / 256), so sum (code - 8) x = 256 sum f x - 136 sum x,
//   with sum x shared by the rows.
// The 16-byte loads are used when `packed` is 16-byte aligned (then every chunk is: a row is a
// whole number of chunks); else byte loads. Blocks grid-stride over row sets.

#define UB_Q4_R 4
#define UB_Q4_CPT 2
#define UB_Q4_THREADS 256

// The batch size a compiled kernel handles at most: a specialisation constant (the launcher
// compiles variants 1, 2, 4 and 8), so that the registers of a batch-1 product are not sized
// for eight.
#ifndef UB_Q4_NB
#define UB_Q4_NB 8
#endif

// The 16 bytes (32 codes) at p; VEC: p is 16-byte aligned.
template <bool VEC> __device__ __forceinline__ uint4 ub_q4_load_codes(const unsigned char* p) {
    if (VEC) {
        return __ldcs(reinterpret_cast<const uint4*>(p));
    } else {
        unsigned int w[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            w[j] = (unsigned int)p[4 * j] | ((unsigned int)p[4 * j + 1] << 8) |
                   ((unsigned int)p[4 * j + 2] << 16) | ((unsigned int)p[4 * j + 3] << 24);
        }
        return make_uint4(w[0], w[1], w[2], w[3]);
    }
}

// Byte i of `nibbles` (a value 0..15) as the float 0.5 + code / 256.
__device__ __forceinline__ float ub_q4_code(unsigned int nibbles, int i) {
    return __uint_as_float(__byte_perm(nibbles, 0x3f000000u, 0x7054u | ((unsigned int)i << 8)));
}

// The 8 values of x at x + i (i a multiple of 8; `vec`: x is 16-byte aligned).
__device__ __forceinline__ void ub_q4_x8(const float* x, unsigned long long i, bool vec, float* v) {
    if (vec) {
        const float4* p = reinterpret_cast<const float4*>(x + i);
        const float4 a = __ldg(p), b = __ldg(p + 1);
        v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
        v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
    } else {
#pragma unroll
        for (int k = 0; k < 8; ++k) v[k] = __ldg(x + i + k);
    }
}
__device__ __forceinline__ void ub_q4_x8(const ub_f16* x, unsigned long long i, bool vec, float* v) {
    if (vec) {
        const uint4 q = __ldg(reinterpret_cast<const uint4*>(x + i));
        const unsigned int w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            ub_f16 lo, hi;
            lo.bits = (unsigned short)(w[j] & 0xffffu);
            hi.bits = (unsigned short)(w[j] >> 16);
            v[2 * j] = ub_to_f32(lo);
            v[2 * j + 1] = ub_to_f32(hi);
        }
    } else {
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            ub_f16 h;
            h.bits = __ldg(&x[i + k].bits);
            v[k] = ub_to_f32(h);
        }
    }
}

// Threads per row group: the smallest power of two covering the chunks UB_Q4_CPT at a time,
// from 32 to 256 (mirrored by `rows_per_block` in q4.rs).
__device__ __forceinline__ unsigned int ub_q4_group_threads(unsigned int chunks) {
    unsigned int t = 32u;
    while (t * UB_Q4_CPT < chunks && t < (unsigned int)UB_Q4_THREADS) t <<= 1;
    return t;
}

template <typename X, bool VEC>
__device__ __forceinline__ void ub_q4_matvec(const unsigned char* __restrict__ packed,
                                             const ub_f16* __restrict__ scales,
                                             const X* __restrict__ x, float* __restrict__ y,
                                             unsigned int rows, unsigned int cols,
                                             unsigned int group, unsigned int nb, bool xvec) {
    __shared__ float partial[UB_Q4_THREADS / 32][UB_Q4_R * UB_Q4_NB];
    const unsigned int chunks = cols >> 5;
    const unsigned int tpg = ub_q4_group_threads(chunks);
    const unsigned int groups = UB_Q4_THREADS / tpg;
    const unsigned int g = threadIdx.x / tpg, t = threadIdx.x % tpg;
    const unsigned int lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    const unsigned int warps_per_group = tpg >> 5;
    const unsigned int chunk_shift = group == 32u ? 0u : (group == 64u ? 1u : 2u);
    const unsigned long long ngroups = cols / group;
    const unsigned long long pitch = cols >> 1;
    const unsigned long long per_block = (unsigned long long)groups * UB_Q4_R;

    for (unsigned long long blk = blockIdx.x; blk * per_block < rows; blk += gridDim.x) {
        const unsigned long long r0 = blk * per_block + (unsigned long long)g * UB_Q4_R;
        float acc[UB_Q4_R][UB_Q4_NB];
#pragma unroll
        for (int r = 0; r < UB_Q4_R; ++r)
#pragma unroll
            for (int b = 0; b < UB_Q4_NB; ++b) acc[r][b] = 0.0f;

        for (unsigned int c0 = t; c0 < chunks; c0 += tpg * UB_Q4_CPT) {
            uint4 w[UB_Q4_CPT][UB_Q4_R];
            float s[UB_Q4_CPT][UB_Q4_R];
#pragma unroll
            for (int k = 0; k < UB_Q4_CPT; ++k) {
                const unsigned int c = c0 + k * tpg;
#pragma unroll
                for (int r = 0; r < UB_Q4_R; ++r) {
                    if (r0 + r < rows && c < chunks) {
                        w[k][r] = ub_q4_load_codes<VEC>(packed + (r0 + r) * pitch + 16ull * c);
                        s[k][r] = ub_to_f32(scales[(r0 + r) * ngroups + (c >> chunk_shift)]);
                    } else {
                        w[k][r] = make_uint4(0u, 0u, 0u, 0u);
                        s[k][r] = 0.0f;
                    }
                }
            }
#pragma unroll
            for (int k = 0; k < UB_Q4_CPT; ++k) {
                const unsigned int c = c0 + k * tpg;
                if (c >= chunks) break;
#pragma unroll
                for (int b = 0; b < UB_Q4_NB; ++b) {
                    if (b >= (int)nb) break;
                    float dot[UB_Q4_R];
#pragma unroll
                    for (int r = 0; r < UB_Q4_R; ++r) dot[r] = 0.0f;
                    float sx = 0.0f;
#pragma unroll
                    for (int j = 0; j < 4; ++j) {
                        float xv[8];
                        ub_q4_x8(x, (unsigned long long)b * cols + 32ull * c + 8u * j, xvec, xv);
#pragma unroll
                        for (int i = 0; i < 8; ++i) sx += xv[i];
#pragma unroll
                        for (int r = 0; r < UB_Q4_R; ++r) {
                            const unsigned int word =
                                j == 0 ? w[k][r].x : (j == 1 ? w[k][r].y : (j == 2 ? w[k][r].z : w[k][r].w));
                            const unsigned int lo = word & 0x0f0f0f0fu;
                            const unsigned int hi = (word >> 4) & 0x0f0f0f0fu;
#pragma unroll
                            for (int i = 0; i < 4; ++i) {
                                dot[r] = fmaf(ub_q4_code(lo, i), xv[2 * i], dot[r]);
                                dot[r] = fmaf(ub_q4_code(hi, i), xv[2 * i + 1], dot[r]);
                            }
                        }
                    }
#pragma unroll
                    for (int r = 0; r < UB_Q4_R; ++r)
                        acc[r][b] = fmaf(s[k][r], fmaf(256.0f, dot[r], -136.0f * sx), acc[r][b]);
                }
            }
        }
        // Reduce over the warp, then over the group's warps through shared memory.
#pragma unroll
        for (int r = 0; r < UB_Q4_R; ++r)
#pragma unroll
            for (int b = 0; b < UB_Q4_NB; ++b) acc[r][b] = ub_warp_sum(acc[r][b]);
        if (warps_per_group > 1u) {
            __syncthreads();  // the previous row set's partials are read
            if (lane == 0u) {
#pragma unroll
                for (int r = 0; r < UB_Q4_R; ++r)
#pragma unroll
                    for (int b = 0; b < UB_Q4_NB; ++b) partial[warp][r * UB_Q4_NB + b] = acc[r][b];
            }
            __syncthreads();
            if (t == 0u) {
                const unsigned int w0 = warp;
                for (unsigned int k = 1; k < warps_per_group; ++k) {
#pragma unroll
                    for (int r = 0; r < UB_Q4_R; ++r)
#pragma unroll
                        for (int b = 0; b < UB_Q4_NB; ++b) acc[r][b] += partial[w0 + k][r * UB_Q4_NB + b];
                }
            }
        }
        if (t == 0u) {
#pragma unroll
            for (int r = 0; r < UB_Q4_R; ++r)
#pragma unroll
                for (int b = 0; b < UB_Q4_NB; ++b)
                    if (r0 + r < rows && b < (int)nb) y[(unsigned long long)b * rows + r0 + r] = acc[r][b];
        }
    }
}

template <typename X>
__device__ __forceinline__ void ub_q4_entry(const unsigned char* packed, const ub_f16* scales,
                                            const X* x, float* y, unsigned int rows,
                                            unsigned int cols, unsigned int group,
                                            unsigned int batch) {
    if (batch == 0u || batch > (unsigned int)UB_Q4_NB || cols == 0u || (cols & 31u) != 0u ||
        (group != 32u && group != 64u && group != 128u) || cols % group != 0u ||
        blockDim.x != (unsigned int)UB_Q4_THREADS) {
        return;  // the launcher validated these; a launch with bad scalars writes nothing
    }
    const bool vec = (((unsigned long long)packed) & 15ull) == 0ull;
    // x rows start 32 elements apart from an aligned x only if x itself is 16-byte aligned.
    const bool xvec = (((unsigned long long)x) & 15ull) == 0ull;
    if (vec) {
        ub_q4_matvec<X, true>(packed, scales, x, y, rows, cols, group, batch, xvec);
    } else {
        ub_q4_matvec<X, false>(packed, scales, x, y, rows, cols, group, batch, xvec);
    }
}

extern "C" __global__ void __launch_bounds__(UB_Q4_THREADS, 3)
unibuf_q4_matvec_f32(const unsigned char* packed, const ub_f16* scales, const float* x, float* y,
                     unsigned int rows, unsigned int cols, unsigned int group, unsigned int batch) {
    ub_q4_entry<float>(packed, scales, x, y, rows, cols, group, batch);
}

extern "C" __global__ void __launch_bounds__(UB_Q4_THREADS, 3)
unibuf_q4_matvec_f16(const unsigned char* packed, const ub_f16* scales, const ub_f16* x, float* y,
                     unsigned int rows, unsigned int cols, unsigned int group, unsigned int batch) {
    ub_q4_entry<ub_f16>(packed, scales, x, y, rows, cols, group, batch);
}
