// The integer path of the 4-bit matvec: x quantised to int8 per block of 32 values
// (`unibuf_quantize_q8_*`), then y[b, r] = sum_k scale[r, k / (group / 32)] * d[b, k] * isum,
// isum = sum over the block's 32 columns of (code - 8) * q, exact in integers
// (`unibuf_q4_matvec_q8`). `packed` is [rows, cols / 2] bytes, the low nibble the even column;
// `scales` is f16 [rows, cols / group]; `xq` is int8 [batch, cols] in product order (below), `xd`
// f32 [batch, cols / 32] the block scales and `xs` int [batch, cols / 32] the block sums.
//
// Why: the f32 kernel (q4.cu) spends a byte permute and an FMA per code and row, so on an H200
// it is bound by instruction issue (57% of copy bandwidth where a read-only kernel over the same
// bytes reaches 94%). With int8 activations, __dp4a multiplies four codes by four activations in
// one instruction, as llama.cpp's mmvq does for q4_0: per 32-bit word of codes (8 codes) a mask,
// a shift and mask, and two __dp4a; about 1.5 instructions per weight byte instead of 5 to 8.
//
// Layout and schedule follow q4.cu: 256 threads, UB_Q8_R rows per row group, `tpg` threads per
// group (the smallest power of two with tpg * UB_Q8_CPT >= chunks, 32..256), each thread first
// loading its UB_Q8_CPT 16-byte chunks of all UB_Q8_R rows (streamed past L1 with __ldcs), then a
// warp and shared-memory reduction; blocks grid-stride over row sets; UB_Q4_NB is the batch a
// variant is compiled for. With the cheaper inner loop the best shape differs from q4.cu's: one
// chunk per thread and 4 blocks per SM (for batches of 1 and 2; 3 for larger ones, whose
// accumulators need the registers). Measured on an H200 (bench/tune/q8_variants.cu, batch 1,
// group 64): 3,479 GB/s on 28672x8192 against 3,244 for two chunks per thread and 3 blocks, and
// 2-18% faster on the decode shapes; 2 or 8 rows per group, 2 to 8 chunks per thread and a
// persistent double-buffered grid were slower.
// - Codes: in a word w, byte k holds code 2k (low nibble) and 2k + 1 (high nibble), so
//   lo = w & 0x0f0f0f0f holds codes 0, 2, 4, 6 and hi = (w >> 4) & 0x0f0f0f0f codes 1, 3, 5, 7.
//   Codes are 0..15, so reading them as signed bytes changes nothing and the signed
//   __dp4a(int, int, int) serves.
// - Product order: the quantisation stores each block's values so that word j (bytes 4j..4j+3)
//   holds values 8j, 8j+2, 8j+4, 8j+6 and word 4 + j values 8j+1, 8j+3, 8j+5, 8j+7: the partners
//   of lo and hi of code word j, with no byte permutes here. It also stores each block's sum q,
//   for the -8 offset: sum (code - 8) q = sum code q - 8 sum q. Together they save 16
//   instructions per block and batch row (3,627 against 3,472 GB/s on 28672x8192 in the
//   harness). |isum| is at most 32 * 8 * 127, so the integer sums are exact and convert to float
//   exactly.
// - The 32 activations of a chunk are two 16-byte __ldg (every block reads the same xq, so it is
//   served from L1/L2), their scale one more.
// The 16-byte loads are used when `packed` (and, separately, `xq`) is 16-byte aligned (then every
// chunk is: a row is a whole number of chunks); else byte loads.
//
// Quantisation (one warp per block of 32 values, lane = value, written to its slot in product
// order; the block sum by shuffles): amax = max |x| over the block's
// non-NaN values, d = amax / 127 (IEEE division: NVRTC's default -prec-div=true), and
// q = roundf(x / d) (half away from zero) clamped to [-127, 127]; d == 0 gives q = 0, and so does
// a NaN quotient (a NaN x, or an infinite x, which also makes d infinite): non-finite x yields
// meaningless but defined values, never a conversion of NaN to an integer.

#define UB_Q8_R 4
#define UB_Q8_CPT 1

// 1: the variant for 16-byte aligned codes and activations (a specialisation constant the
// launcher sets from their addresses); 0: the general one, with byte loads where unaligned.
#ifndef UB_Q8_ALIGNED
#define UB_Q8_ALIGNED 0
#endif
#define UB_Q8_THREADS 256

// The batch size a compiled matvec handles at most: a specialisation constant (the launcher
// compiles variants 1, 2, 4 and 8), so that the registers of a batch-1 product are not sized
// for eight.
#ifndef UB_Q4_NB
#define UB_Q4_NB 8
#endif

// The signed four-way byte dot product, in one place so that its overload is chosen once:
// int __dp4a(int, int, int) (sm_61 and later).
__device__ __forceinline__ int ub_dp4a(int a, int b, int c) { return __dp4a(a, b, c); }

// The 16 bytes at p as four little-endian words; VEC: p is 16-byte aligned (streamed past L1).
template <bool VEC> __device__ __forceinline__ uint4 ub_q8_load_codes(const unsigned char* p) {
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

// The 32 int8 activations of a block at p as eight words (bytes 4j..4j+3 are word j); `vec`: p is
// 16-byte aligned. Read-only path: every block reads the same activations.
__device__ __forceinline__ void ub_q8_load_x(const signed char* p, bool vec, int* v) {
    if (vec) {
        const int4* q = reinterpret_cast<const int4*>(p);
        const int4 a = __ldg(q), b = __ldg(q + 1);
        v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
        v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
    } else {
        const unsigned char* u = reinterpret_cast<const unsigned char*>(p);
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            v[j] = (int)((unsigned int)__ldg(u + 4 * j) | ((unsigned int)__ldg(u + 4 * j + 1) << 8) |
                         ((unsigned int)__ldg(u + 4 * j + 2) << 16) |
                         ((unsigned int)__ldg(u + 4 * j + 3) << 24));
        }
    }
}

// Threads per row group: the smallest power of two covering the chunks UB_Q8_CPT at a time,
// from 32 to 256 (mirrored by `rows_per_block` in q4.rs).
__device__ __forceinline__ unsigned int ub_q8_group_threads(unsigned int chunks) {
    unsigned int t = 32u;
    while (t * UB_Q8_CPT < chunks && t < (unsigned int)UB_Q8_THREADS) t <<= 1;
    return t;
}

template <bool VEC>
__device__ __forceinline__ void ub_q4_q8_matvec(const unsigned char* __restrict__ packed,
                                                const ub_f16* __restrict__ scales,
                                                const signed char* __restrict__ xq,
                                                const float* __restrict__ xd,
                                                const int* __restrict__ xs,
                                                float* __restrict__ y, unsigned int rows,
                                                unsigned int cols, unsigned int group,
                                                unsigned int nb, bool xvec) {
    __shared__ float partial[UB_Q8_THREADS / 32][UB_Q8_R * UB_Q4_NB];
    const unsigned int chunks = cols >> 5;
    const unsigned int tpg = ub_q8_group_threads(chunks);
    const unsigned int groups = UB_Q8_THREADS / tpg;
    const unsigned int g = threadIdx.x / tpg, t = threadIdx.x % tpg;
    const unsigned int lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    const unsigned int warps_per_group = tpg >> 5;
    const unsigned int chunk_shift = group == 32u ? 0u : (group == 64u ? 1u : 2u);
    // cols / group without a division (group is 32 << chunk_shift for every valid group).
    const unsigned long long ngroups = cols >> (5u + chunk_shift);
    const unsigned long long pitch = cols >> 1;
    const unsigned long long per_block = (unsigned long long)groups * UB_Q8_R;

    for (unsigned long long blk = blockIdx.x; blk * per_block < rows; blk += gridDim.x) {
        const unsigned long long r0 = blk * per_block + (unsigned long long)g * UB_Q8_R;
        float acc[UB_Q8_R][UB_Q4_NB];
#pragma unroll
        for (int r = 0; r < UB_Q8_R; ++r)
#pragma unroll
            for (int b = 0; b < UB_Q4_NB; ++b) acc[r][b] = 0.0f;

        for (unsigned int c0 = t; c0 < chunks; c0 += tpg * UB_Q8_CPT) {
            uint4 w[UB_Q8_CPT][UB_Q8_R];
            float s[UB_Q8_CPT][UB_Q8_R];
#pragma unroll
            for (int k = 0; k < UB_Q8_CPT; ++k) {
                const unsigned int c = c0 + k * tpg;
#pragma unroll
                for (int r = 0; r < UB_Q8_R; ++r) {
                    if (r0 + r < rows && c < chunks) {
                        w[k][r] = ub_q8_load_codes<VEC>(packed + (r0 + r) * pitch + 16ull * c);
                        s[k][r] = ub_to_f32(scales[(r0 + r) * ngroups + (c >> chunk_shift)]);
                    } else {
                        w[k][r] = make_uint4(0u, 0u, 0u, 0u);
                        s[k][r] = 0.0f;
                    }
                }
            }
#pragma unroll
            for (int k = 0; k < UB_Q8_CPT; ++k) {
                const unsigned int c = c0 + k * tpg;
                if (c >= chunks) break;
#pragma unroll
                for (int b = 0; b < UB_Q4_NB; ++b) {
                    if (b >= (int)nb) break;
                    // The block's values in product order: words 0-3 the even-numbered
                    // values of each group of 8, words 4-7 the odd ones; and their sum.
                    int xv[8];
                    ub_q8_load_x(xq + (unsigned long long)b * cols + 32ull * c, xvec, xv);
                    const unsigned long long blk_index = (unsigned long long)b * chunks + c;
                    const float d = __ldg(xd + blk_index);
                    // isum = sum code * q - 8 * sum q: start every row's sum at the second term.
                    const int base = -8 * __ldg(xs + blk_index);
#pragma unroll
                    for (int r = 0; r < UB_Q8_R; ++r) {
                        int isum = base;
#pragma unroll
                        for (int j = 0; j < 4; ++j) {
                            const unsigned int word =
                                j == 0 ? w[k][r].x : (j == 1 ? w[k][r].y : (j == 2 ? w[k][r].z : w[k][r].w));
                            const unsigned int lo = word & 0x0f0f0f0fu;
                            const unsigned int hi = (word >> 4) & 0x0f0f0f0fu;
                            isum = ub_dp4a((int)lo, xv[j], isum);
                            isum = ub_dp4a((int)hi, xv[4 + j], isum);
                        }
                        acc[r][b] = fmaf(s[k][r] * d, (float)isum, acc[r][b]);
                    }
                }
            }
        }
        // Reduce over the warp, then over the group's warps through shared memory.
#pragma unroll
        for (int r = 0; r < UB_Q8_R; ++r)
#pragma unroll
            for (int b = 0; b < UB_Q4_NB; ++b) acc[r][b] = ub_warp_sum(acc[r][b]);
        if (warps_per_group > 1u) {
            __syncthreads();  // the previous row set's partials are read
            if (lane == 0u) {
#pragma unroll
                for (int r = 0; r < UB_Q8_R; ++r)
#pragma unroll
                    for (int b = 0; b < UB_Q4_NB; ++b) partial[warp][r * UB_Q4_NB + b] = acc[r][b];
            }
            __syncthreads();
            if (t == 0u) {
                const unsigned int w0 = warp;
                for (unsigned int k = 1; k < warps_per_group; ++k) {
#pragma unroll
                    for (int r = 0; r < UB_Q8_R; ++r)
#pragma unroll
                        for (int b = 0; b < UB_Q4_NB; ++b) acc[r][b] += partial[w0 + k][r * UB_Q4_NB + b];
                }
            }
        }
        if (t == 0u) {
#pragma unroll
            for (int r = 0; r < UB_Q8_R; ++r)
#pragma unroll
                for (int b = 0; b < UB_Q4_NB; ++b)
                    if (r0 + r < rows && b < (int)nb) y[(unsigned long long)b * rows + r0 + r] = acc[r][b];
        }
    }
}

// Blocks per SM the registers must allow (see the header).
#define UB_Q8_MIN_BLOCKS (UB_Q4_NB <= 2 ? 4 : 3)

extern "C" __global__ void __launch_bounds__(UB_Q8_THREADS, UB_Q8_MIN_BLOCKS)
unibuf_q4_matvec_q8(const unsigned char* __restrict__ packed, const ub_f16* __restrict__ scales,
                    const signed char* __restrict__ xq, const float* __restrict__ xd,
                    const int* __restrict__ xs, float* __restrict__ y, unsigned int rows, unsigned int cols,
                    unsigned int group, unsigned int batch) {
    // The launcher validates the geometry; the kernel checks only what its own memory safety
    // rests on: the block size (the shared partial sums are sized for it). Checking the
    // geometry here too cost 10-15% on an H200 (the compiler scheduled the loads worse; the
    // f32 kernel of q4.cu, bound by instruction issue, was 5% slower without its checks).
    if (blockDim.x != (unsigned int)UB_Q8_THREADS) {
        return;
    }
    const bool vec = (((unsigned long long)packed) & 15ull) == 0ull;
    // xq rows start 32 bytes apart, so they are all 16-byte aligned if xq itself is.
    const bool xvec = (((unsigned long long)xq) & 15ull) == 0ull;
#if UB_Q8_ALIGNED
    // The variant for aligned codes and activations, chosen by the launcher: one instantiation
    // with 16-byte loads throughout. A misaligned launch writes nothing rather than fault.
    if (vec && xvec) {
        ub_q4_q8_matvec<true>(packed, scales, xq, xd, xs, y, rows, cols, group, batch, true);
    }
#else
    if (vec) {
        ub_q4_q8_matvec<true>(packed, scales, xq, xd, xs, y, rows, cols, group, batch, xvec);
    } else {
        ub_q4_q8_matvec<false>(packed, scales, xq, xd, xs, y, rows, cols, group, batch, xvec);
    }
#endif
}

// The position of value `lane` of a block in product order (`Q8Activations::slot` in q8.rs).
__device__ __forceinline__ unsigned int ub_q8_slot(unsigned int lane) {
    return (lane & 1u) * 16u + ((lane >> 3) << 2) + ((lane & 7u) >> 1);
}

// One block of 32 values per warp (lane = value), warps grid-striding over the blocks; every
// lane of a warp takes the same path, so the warp-wide shuffles see all 32 lanes.
template <typename X>
__device__ __forceinline__ void ub_quantize_q8(const X* __restrict__ x,
                                               signed char* __restrict__ values,
                                               float* __restrict__ scales,
                                               int* __restrict__ sums, unsigned int blocks) {
    if ((blockDim.x & 31u) != 0u) {
        return;  // the launcher uses whole warps
    }
    const unsigned int lane = threadIdx.x & 31u;
    const unsigned long long warps = blockDim.x >> 5;
    const unsigned long long first = (unsigned long long)blockIdx.x * warps + (threadIdx.x >> 5);
    for (unsigned long long k = first; k < blocks; k += (unsigned long long)gridDim.x * warps) {
        const float v = ub_to_f32(x[32ull * k + lane]);
        const float amax = ub_warp_max(v == v ? fabsf(v) : 0.0f);
        const float d = amax / 127.0f;
        int q = 0;
        if (d != 0.0f) {
            const float t = v / d;
            if (t == t) q = (int)fminf(fmaxf(roundf(t), -127.0f), 127.0f);
        }
        values[32ull * k + ub_q8_slot(lane)] = (signed char)q;
        int sum = q;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
        if (lane == 0u) {
            scales[k] = d;
            sums[k] = sum;
        }
    }
}

extern "C" __global__ void __launch_bounds__(UB_Q8_THREADS)
unibuf_quantize_q8_f32(const float* x, signed char* values, float* scales, int* sums,
                       unsigned int blocks) {
    ub_quantize_q8<float>(x, values, scales, sums, blocks);
}

extern "C" __global__ void __launch_bounds__(UB_Q8_THREADS)
unibuf_quantize_q8_f16(const ub_f16* x, signed char* values, float* scales, int* sums,
                       unsigned int blocks) {
    ub_quantize_q8<ub_f16>(x, values, scales, sums, blocks);
}
