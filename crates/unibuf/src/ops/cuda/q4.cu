// 4-bit group-quantised matrix-vector product: y[b, r] = sum_c (code[r, c] - 8) * scale[r, c / group]
// * x[b, c], for `batch` rows of x (1..=8). `packed` is [rows, cols / 2] bytes, the low nibble the
// even column; `scales` is f16 [rows, cols / group]; group is 32, 64 or 128, so cols is a multiple
// of 32 and a row is a whole number of 16-byte chunks of 32 codes, each inside one group.
//
// Memory-bound design: a block of UB_Q4_WARPS warps owns UB_Q4_WARPS * UB_Q4_ROWS rows (block
// grid-stride over row sets); each warp computes UB_Q4_ROWS rows at once, each lane taking
// 32-column chunks: one 16-byte load (streamed past L1) per row per chunk, so a warp's loads are
// 512 contiguous bytes. x is staged tile by tile in shared memory as f32 (coalesced global
// reads, bank-conflict-free float4 reads) and shared by the rows; the next tile's codes and x
// are loaded into registers while the current one is computed. Codes become floats without
// integer-to-float conversions: a byte permute puts the code into the mantissa of 0.5
// (f = 0.5 + code / 256), so sum (code - 8) x = 256 sum f x - 136 sum x, with sum x shared by
// the rows. The 16-byte loads are used when the actual address of `packed` is 16-byte aligned
// (every row then is: a row is a whole number of 16-byte chunks); else byte loads.

#define UB_Q4_ROWS 4

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

// Columns of x staged in shared memory per step: 32 chunks per lane-column, U per lane.
#define UB_Q4_WARPS 8
#define UB_Q4_U (UB_Q4_NB <= 2 ? 2 : 1)
#define UB_Q4_TILE (1024 * UB_Q4_U)
// 4 floats of padding after every 32: a lane reads its chunk's 32 x values as float4s at a
// 144-byte pitch from its neighbours, which keeps a quarter-warp on distinct banks.
#define UB_Q4_PADDED (UB_Q4_TILE + UB_Q4_TILE / 8)
#define UB_Q4_XREG (UB_Q4_NB * UB_Q4_TILE / (32 * UB_Q4_WARPS))

__device__ __forceinline__ float ub_q4_x(const float* x, unsigned long long i) { return x[i]; }
__device__ __forceinline__ float ub_q4_x(const ub_f16* x, unsigned long long i) {
    return ub_to_f32(x[i]);
}

// Block-level loop over sets of UB_Q4_WARPS * UB_Q4_ROWS rows; inside, tiles of UB_Q4_TILE
// columns: x is staged (as f32) in shared memory, each warp multiplies its rows' codes of the
// tile, and the next tile's codes, scales and x values are loaded into registers before the
// current tile is computed, so the loads overlap the arithmetic.
template <typename X, bool VEC>
__device__ __forceinline__ void ub_q4_matvec(const unsigned char* __restrict__ packed,
                                             const ub_f16* __restrict__ scales,
                                             const X* __restrict__ x, float* __restrict__ y,
                                             unsigned int rows, unsigned int cols,
                                             unsigned int group, unsigned int nb,
                                             float (*xs)[UB_Q4_PADDED]) {
    const unsigned int lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    const unsigned int chunks = cols >> 5;
    const unsigned int chunk_shift = group == 32u ? 0u : (group == 64u ? 1u : 2u);
    const unsigned long long ngroups = cols / group;
    const unsigned long long pitch = cols >> 1;
    const unsigned int ntiles = (cols + UB_Q4_TILE - 1u) / UB_Q4_TILE;
    const unsigned long long per_block = UB_Q4_WARPS * UB_Q4_ROWS;

    for (unsigned long long blk = blockIdx.x; blk * per_block < rows; blk += gridDim.x) {
        const unsigned long long r0 = blk * per_block + warp * UB_Q4_ROWS;
        float acc[UB_Q4_ROWS][UB_Q4_NB];
#pragma unroll
        for (int r = 0; r < UB_Q4_ROWS; ++r)
#pragma unroll
            for (int b = 0; b < UB_Q4_NB; ++b) acc[r][b] = 0.0f;

        uint4 w[UB_Q4_U][UB_Q4_ROWS];
        float s[UB_Q4_U][UB_Q4_ROWS];
        float xr[UB_Q4_XREG];
        auto load = [&](unsigned int t, uint4 (&wl)[UB_Q4_U][UB_Q4_ROWS],
                        float (&sl)[UB_Q4_U][UB_Q4_ROWS], float (&xl)[UB_Q4_XREG]) {
#pragma unroll
            for (int u = 0; u < UB_Q4_U; ++u) {
                const unsigned int c = t * (32u * UB_Q4_U) + 32u * u + lane;
#pragma unroll
                for (int r = 0; r < UB_Q4_ROWS; ++r) {
                    if (r0 + r < rows && c < chunks) {
                        wl[u][r] = ub_q4_load_codes<VEC>(packed + (r0 + r) * pitch + 16ull * c);
                        sl[u][r] = ub_to_f32(scales[(r0 + r) * ngroups + (c >> chunk_shift)]);
                    } else {
                        wl[u][r] = make_uint4(0u, 0u, 0u, 0u);
                        sl[u][r] = 0.0f;
                    }
                }
            }
#pragma unroll
            for (int e = 0; e < UB_Q4_XREG; ++e) {
                const unsigned int idx = threadIdx.x + e * (32u * UB_Q4_WARPS);
                const unsigned int b = idx / UB_Q4_TILE, c = idx % UB_Q4_TILE;
                const unsigned int col = t * UB_Q4_TILE + c;
                xl[e] = (b < nb && col < cols) ? ub_q4_x(x, (unsigned long long)b * cols + col) : 0.0f;
            }
        };
        load(0u, w, s, xr);
        for (unsigned int t = 0; t < ntiles; ++t) {
            __syncthreads();  // the previous tile's x is no longer read
#pragma unroll
            for (int e = 0; e < UB_Q4_XREG; ++e) {
                const unsigned int idx = threadIdx.x + e * (32u * UB_Q4_WARPS);
                const unsigned int b = idx / UB_Q4_TILE, c = idx % UB_Q4_TILE;
                xs[b][c + (c >> 5) * 4u] = xr[e];
            }
            __syncthreads();
            uint4 wn[UB_Q4_U][UB_Q4_ROWS];
            float sn[UB_Q4_U][UB_Q4_ROWS];
            float xn[UB_Q4_XREG];
            const bool more = t + 1u < ntiles;
            if (more) load(t + 1u, wn, sn, xn);
#pragma unroll
            for (int u = 0; u < UB_Q4_U; ++u) {
                const unsigned int lc = 32u * u + lane;  // chunk within the tile
                float dot[UB_Q4_ROWS][UB_Q4_NB];
                float sx[UB_Q4_NB];
#pragma unroll
                for (int b = 0; b < UB_Q4_NB; ++b) {
                    sx[b] = 0.0f;
#pragma unroll
                    for (int r = 0; r < UB_Q4_ROWS; ++r) dot[r][b] = 0.0f;
                }
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    float f[UB_Q4_ROWS][8];
#pragma unroll
                    for (int r = 0; r < UB_Q4_ROWS; ++r) {
                        const unsigned int word =
                            j == 0 ? w[u][r].x : (j == 1 ? w[u][r].y : (j == 2 ? w[u][r].z : w[u][r].w));
                        const unsigned int lo = word & 0x0f0f0f0fu;
                        const unsigned int hi = (word >> 4) & 0x0f0f0f0fu;
#pragma unroll
                        for (int i = 0; i < 4; ++i) {
                            f[r][2 * i] = ub_q4_code(lo, i);
                            f[r][2 * i + 1] = ub_q4_code(hi, i);
                        }
                    }
#pragma unroll
                    for (int b = 0; b < UB_Q4_NB; ++b) {
                        if (b < (int)nb) {
                            const float4* px = reinterpret_cast<const float4*>(&xs[b][lc * 36u + 8u * j]);
                            const float4 xa = px[0], xb = px[1];
                            const float xv[8] = {xa.x, xa.y, xa.z, xa.w, xb.x, xb.y, xb.z, xb.w};
#pragma unroll
                            for (int i = 0; i < 8; ++i) {
                                sx[b] += xv[i];
#pragma unroll
                                for (int r = 0; r < UB_Q4_ROWS; ++r) dot[r][b] = fmaf(f[r][i], xv[i], dot[r][b]);
                            }
                        }
                    }
                }
#pragma unroll
                for (int r = 0; r < UB_Q4_ROWS; ++r)
#pragma unroll
                    for (int b = 0; b < UB_Q4_NB; ++b)
                        acc[r][b] = fmaf(s[u][r], fmaf(256.0f, dot[r][b], -136.0f * sx[b]), acc[r][b]);
            }
            if (more) {
#pragma unroll
                for (int u = 0; u < UB_Q4_U; ++u)
#pragma unroll
                    for (int r = 0; r < UB_Q4_ROWS; ++r) {
                        w[u][r] = wn[u][r];
                        s[u][r] = sn[u][r];
                    }
#pragma unroll
                for (int e = 0; e < UB_Q4_XREG; ++e) xr[e] = xn[e];
            }
        }
#pragma unroll
        for (int r = 0; r < UB_Q4_ROWS; ++r)
#pragma unroll
            for (int b = 0; b < UB_Q4_NB; ++b) acc[r][b] = ub_warp_sum(acc[r][b]);
        if (lane == 0) {
#pragma unroll
            for (int r = 0; r < UB_Q4_ROWS; ++r)
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
        (group != 32u && group != 64u && group != 128u) || cols % group != 0u) {
        return;  // the launcher validated these; never read out of bounds on a bad launch
    }
    __shared__ __align__(16) float xs[UB_Q4_NB][UB_Q4_PADDED];
    const bool vec = (((unsigned long long)packed) & 15ull) == 0ull;
    if (vec) {
        ub_q4_matvec<X, true>(packed, scales, x, y, rows, cols, group, batch, xs);
    } else {
        ub_q4_matvec<X, false>(packed, scales, x, y, rows, cols, group, batch, xs);
    }
}

extern "C" __global__ void __launch_bounds__(256)
unibuf_q4_matvec_f32(const unsigned char* packed, const ub_f16* scales, const float* x, float* y,
                     unsigned int rows, unsigned int cols, unsigned int group, unsigned int batch) {
    ub_q4_entry<float>(packed, scales, x, y, rows, cols, group, batch);
}

extern "C" __global__ void __launch_bounds__(256)
unibuf_q4_matvec_f16(const unsigned char* packed, const ub_f16* scales, const ub_f16* x, float* y,
                     unsigned int rows, unsigned int cols, unsigned int group, unsigned int batch) {
    ub_q4_entry<ub_f16>(packed, scales, x, y, rows, cols, group, batch);
}
