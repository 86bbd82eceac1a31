// y = W x for W in a ggml block format, read natively (no dequantised copy):
//   kind 0, Q8_0: blocks of 32 as { f16 d; int8 q[32]; }             w = d * q        (34 bytes)
//   kind 1, Q4_0: blocks of 32 as { f16 d; u8 qs[16]; }              w = d * (nib - 8) (18 bytes)
//   kind 2, Q4_1: blocks of 32 as { f16 d; f16 m; u8 qs[16]; }       w = d * nib + m  (20 bytes)
// where in the 4-bit formats element j < 16 is the low nibble of qs[j] and element j + 16 its
// high nibble (ggml's layout).
//
// One warp per row of W. The lanes share blocks: lane l takes quarter l % 4 of block l / 4,
// then the next 8 blocks, and so on, so that one load instruction of the warp covers 8
// consecutive blocks (272 bytes of Q8_0, 160 of Q4_1) instead of 32 lanes reading 32 blocks
// apart byte by byte. A quarter is 8 weights: Q8_0 bytes q[8s..8s+8] (weights 8s..8s+7), in the
// 4-bit formats qs[4s..4s+4] (weights 4s..4s+3 from the low nibbles, 16+4s..16+4s+3 from the
// high ones). Every field of a block sits at an even offset and every block size is even, so
// when the matrix starts at an even address the reads are 16-bit loads; at an odd address
// (a view at any offset) they are byte loads. Each lane sums in f32 for up to UB_GM_MAX_BATCH
// rows of x, and the warp then reduces with shuffles. x is read through the read-only cache
// (it is small and shared by every row), four values at a time when it is aligned for that.
//
// The helpers (ub_gm_*) are shared with the fused kernels of ggml_fused.cu, which prepend this
// file with UB_GGML_HELPERS_ONLY defined (so that they do not compile these kernels again).

#define UB_GM_MAX_BATCH 8

// Where a row product reads x: as stored (scalar or 4-element vector loads), normalised in
// shared memory (f32 [batch, cols], 16-byte aligned), or normalised as it is read
// (x * scale[b] * norm_weight, scalar or vector loads).
#define UB_GM_X_RAW 0
#define UB_GM_X_RAW_VEC 1
#define UB_GM_X_SHARED 2
#define UB_GM_X_NORM 3
#define UB_GM_X_NORM_VEC 4

__device__ __forceinline__ unsigned int ub_gm_block_bytes(unsigned int kind) {
    return kind == 0u ? 34u : (kind == 1u ? 18u : 20u);
}

// The little-endian 16-bit value at p; A2: p is 2-byte aligned (one load), else two byte loads.
template <bool A2> __device__ __forceinline__ unsigned int ub_gm_u16(const unsigned char* p) {
    if (A2) return (unsigned int)*reinterpret_cast<const unsigned short*>(p);
    return (unsigned int)p[0] | ((unsigned int)p[1] << 8);
}

// The little-endian 32-bit value at p (2-byte aligned if A2) as two 16-bit reads.
template <bool A2> __device__ __forceinline__ unsigned int ub_gm_u32(const unsigned char* p) {
    return ub_gm_u16<A2>(p) | (ub_gm_u16<A2>(p + 2) << 16);
}

__device__ __forceinline__ float ub_gm_f16(unsigned int bits) {
    ub_f16 h;
    h.bits = (unsigned short)bits;
    return ub_to_f32(h);
}

// Byte i (0..3) of v read as a two's-complement int8.
__device__ __forceinline__ float ub_gm_i8(unsigned int v, int i) {
    const int b = (int)((v >> (8 * i)) & 0xffu);
    return (float)(b - ((b & 0x80) << 1));
}

// Quarter s (0..3) of the block at blk: its 8 weights as two runs of 4 consecutive columns,
// lo[] at columns o0..o0+3 and hi[] at o1..o1+3 of the block. The arithmetic is exact and the
// same as the CPU's (d * q, d * (nib - 8) and d * nib + m: each product is exact in f32).
template <bool A2>
__device__ __forceinline__ void ub_gm_quarter(const unsigned char* blk, unsigned int kind,
                                              unsigned int s, float* lo, float* hi,
                                              unsigned int& o0, unsigned int& o1) {
    const float d = ub_gm_f16(ub_gm_u16<A2>(blk));
    if (kind == 0u) {
        const unsigned char* q = blk + 2u + 8u * s;
        const unsigned int a = ub_gm_u32<A2>(q);
        const unsigned int b = ub_gm_u32<A2>(q + 4);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            lo[i] = d * ub_gm_i8(a, i);
            hi[i] = d * ub_gm_i8(b, i);
        }
        o0 = 8u * s;
        o1 = o0 + 4u;
    } else {
        // Q4_0 as d * nib - 8d (exact: d * (nib - 8) is representable), Q4_1 as d * nib + m.
        const float m = kind == 1u ? -8.0f * d : ub_gm_f16(ub_gm_u16<A2>(blk + 2));
        const unsigned int v = ub_gm_u32<A2>(blk + (kind == 1u ? 2u : 4u) + 4u * s);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            lo[i] = fmaf(d, (float)((v >> (8 * i)) & 15u), m);
            hi[i] = fmaf(d, (float)((v >> (8 * i + 4)) & 15u), m);
        }
        o0 = 4u * s;
        o1 = o0 + 16u;
    }
}

__device__ __forceinline__ float ub_gm_ld(const float* p) { return __ldg(p); }
__device__ __forceinline__ float ub_gm_ld(const ub_f16* p) {
    ub_f16 h;
    h.bits = __ldg(&p->bits);
    return ub_to_f32(h);
}
__device__ __forceinline__ float ub_gm_ld(const ub_bf16* p) {
    ub_bf16 h;
    h.bits = __ldg(&p->bits);
    return ub_to_f32(h);
}

// Four consecutive values at p (16-byte aligned for f32, 8-byte aligned for f16 and bf16).
__device__ __forceinline__ float4 ub_gm_ld4(const float* p) {
    return __ldg(reinterpret_cast<const float4*>(p));
}
template <typename H> __device__ __forceinline__ float4 ub_gm_ld4_16(const H* p) {
    const uint2 u = __ldg(reinterpret_cast<const uint2*>(p));
    H a, b, c, d;
    a.bits = (unsigned short)(u.x & 0xffffu);
    b.bits = (unsigned short)(u.x >> 16);
    c.bits = (unsigned short)(u.y & 0xffffu);
    d.bits = (unsigned short)(u.y >> 16);
    return make_float4(ub_to_f32(a), ub_to_f32(b), ub_to_f32(c), ub_to_f32(d));
}
__device__ __forceinline__ float4 ub_gm_ld4(const ub_f16* p) { return ub_gm_ld4_16(p); }
__device__ __forceinline__ float4 ub_gm_ld4(const ub_bf16* p) { return ub_gm_ld4_16(p); }

// What a row product reads x from (the fields its mode uses).
template <typename X> struct ub_gm_xsrc {
    const X* x;          // [batch, cols] in global memory (RAW, NORM)
    const X* nw;         // [cols], the norm weight (NORM)
    const float* xs;     // [batch, cols] normalised, in shared memory (SHARED)
    const float* scale;  // [batch] RMS scales, in shared memory (NORM)
    unsigned int cols;
};

// x[b, c..c+4] as the mode XS gives it (c a multiple of 4).
template <typename X, int XS>
__device__ __forceinline__ float4 ub_gm_x4(const ub_gm_xsrc<X>& s, unsigned int b, unsigned int c) {
    if constexpr (XS == UB_GM_X_SHARED) {
        return reinterpret_cast<const float4*>(s.xs)[(b * s.cols + c) >> 2];
    } else {
        const X* p = s.x + (ub_u64)b * s.cols + c;
        float4 v;
        if constexpr (XS == UB_GM_X_RAW_VEC || XS == UB_GM_X_NORM_VEC) {
            v = ub_gm_ld4(p);
        } else {
            v = make_float4(ub_gm_ld(p), ub_gm_ld(p + 1), ub_gm_ld(p + 2), ub_gm_ld(p + 3));
        }
        if constexpr (XS == UB_GM_X_NORM || XS == UB_GM_X_NORM_VEC) {
            // The same operations, in the same order, as the shared-memory fill of ggml_fused.cu.
            const float sc = s.scale[b];
            float4 w;
            if constexpr (XS == UB_GM_X_NORM_VEC) {
                w = ub_gm_ld4(s.nw + c);
            } else {
                w = make_float4(ub_gm_ld(s.nw + c), ub_gm_ld(s.nw + c + 1), ub_gm_ld(s.nw + c + 2),
                                ub_gm_ld(s.nw + c + 3));
            }
            v.x = v.x * sc * w.x;
            v.y = v.y * sc * w.y;
            v.z = v.z * sc * w.z;
            v.w = v.w * sc * w.w;
        }
        return v;
    }
}

// acc plus the 8 products of a quarter (lo with u, hi with v), as one fma chain in a fixed
// order, so that every kernel sums a row exactly alike.
__device__ __forceinline__ float ub_gm_quarter_dot(const float* lo, const float* hi, float4 u,
                                                   float4 v, float acc) {
    acc = fmaf(lo[0], u.x, acc);
    acc = fmaf(lo[1], u.y, acc);
    acc = fmaf(lo[2], u.z, acc);
    acc = fmaf(lo[3], u.w, acc);
    acc = fmaf(hi[0], v.x, acc);
    acc = fmaf(hi[1], v.y, acc);
    acc = fmaf(hi[2], v.z, acc);
    acc = fmaf(hi[3], v.w, acc);
    return acc;
}

// Adds this lane's share of row . x[b] to acc[b] for b < batch: the row's quarter blocks taken
// by the warp's 32 lanes in turn.
template <typename X, int XS, bool A2>
__device__ __forceinline__ void ub_gm_row_part(const unsigned char* row, unsigned int kind,
                                               unsigned int nblocks, unsigned int batch,
                                               const ub_gm_xsrc<X>& src, unsigned int lane,
                                               float* acc) {
    const unsigned int bb = ub_gm_block_bytes(kind);
    const unsigned int quarters = nblocks * 4u;
    // Unrolled so that the loads of several quarters are in flight together: the decode-sized
    // rows take only a few turns per lane, and each turn would otherwise wait out the memory
    // latency alone.
#pragma unroll 4
    for (unsigned int t = lane; t < quarters; t += 32u) {
        const unsigned int k = t >> 2;
        float lo[4], hi[4];
        unsigned int o0, o1;
        ub_gm_quarter<A2>(row + (ub_u64)k * bb, kind, t & 3u, lo, hi, o0, o1);
        const unsigned int c = k * 32u;
#pragma unroll
        for (unsigned int b = 0; b < UB_GM_MAX_BATCH; ++b) {
            if (b < batch) {
                const float4 u = ub_gm_x4<X, XS>(src, b, c + o0);
                const float4 v = ub_gm_x4<X, XS>(src, b, c + o1);
                acc[b] = ub_gm_quarter_dot(lo, hi, u, v, acc[b]);
            }
        }
    }
}

// acc[b] = row . x[b] for b < batch, on every lane of the warp (all 32 lanes must call it with
// the same row). `row` holds nblocks blocks of `kind`.
template <typename X, int XS>
__device__ __forceinline__ void ub_gm_row_dot(const unsigned char* row, unsigned int kind,
                                              unsigned int nblocks, unsigned int batch,
                                              const ub_gm_xsrc<X>& src, unsigned int lane,
                                              float* acc) {
#pragma unroll
    for (unsigned int b = 0; b < UB_GM_MAX_BATCH; ++b) acc[b] = 0.0f;
    // Rows are a whole number of even-sized blocks, so every row of a matrix at an even
    // address starts at an even address: the branch is uniform over the warp.
    if ((((ub_u64)row) & 1ull) == 0ull) {
        ub_gm_row_part<X, XS, true>(row, kind, nblocks, batch, src, lane, acc);
    } else {
        ub_gm_row_part<X, XS, false>(row, kind, nblocks, batch, src, lane, acc);
    }
#pragma unroll
    for (unsigned int b = 0; b < UB_GM_MAX_BATCH; ++b) {
        if (b < batch) acc[b] = ub_warp_sum(acc[b]);
    }
}

// Whether x (and the norm weight, if given) can be read 4 elements at a time: rows are a
// multiple of 32 elements, so an aligned base aligns every read.
template <typename X> __device__ __forceinline__ bool ub_gm_x_vec(const X* x, const X* nw) {
    const ub_u64 mask = 4ull * sizeof(X) - 1ull;
    return ((((ub_u64)x) | ((ub_u64)nw)) & mask) == 0ull;
}

// acc[b] = row . x[b] with x read from global memory as stored.
template <typename X>
__device__ __forceinline__ void ub_gm_row_dot_raw(const unsigned char* row, unsigned int kind,
                                                  unsigned int nblocks, unsigned int batch,
                                                  const ub_gm_xsrc<X>& src, bool xvec,
                                                  unsigned int lane, float* acc) {
    if (xvec) {
        ub_gm_row_dot<X, UB_GM_X_RAW_VEC>(row, kind, nblocks, batch, src, lane, acc);
    } else {
        ub_gm_row_dot<X, UB_GM_X_RAW>(row, kind, nblocks, batch, src, lane, acc);
    }
}

#ifndef UB_GGML_HELPERS_ONLY

template <typename X>
__device__ __forceinline__ void ub_ggml_matvec(const unsigned char* w, const X* x, float* y,
                                               unsigned int rows, unsigned int cols,
                                               unsigned int batch, unsigned int kind) {
    const unsigned int nblocks = cols / 32u;
    const ub_u64 row_bytes = (ub_u64)nblocks * ub_gm_block_bytes(kind);
    const unsigned int lane = threadIdx.x & 31u;
    const unsigned int warps = blockDim.x >> 5;
    ub_gm_xsrc<X> src;
    src.x = x;
    src.nw = x;
    src.xs = nullptr;
    src.scale = nullptr;
    src.cols = cols;
    const bool xvec = ub_gm_x_vec<X>(x, x);
    for (ub_u64 r = (ub_u64)blockIdx.x * warps + (threadIdx.x >> 5); r < rows;
         r += (ub_u64)gridDim.x * warps) {
        float acc[UB_GM_MAX_BATCH];
        ub_gm_row_dot_raw<X>(w + r * row_bytes, kind, nblocks, batch, src, xvec, lane, acc);
#pragma unroll
        for (unsigned int b = 0; b < UB_GM_MAX_BATCH; ++b) {
            if (b < batch && lane == 0u) y[(ub_u64)b * rows + r] = acc[b];
        }
    }
}

#define UB_GGML_MATVEC_KERNEL(SUFFIX, X)                                                         \
    extern "C" __global__ void unibuf_ggml_matvec_##SUFFIX(                                      \
        const unsigned char* w, const X* x, float* y, unsigned int rows, unsigned int cols,      \
        unsigned int batch, unsigned int kind) {                                                 \
        ub_ggml_matvec<X>(w, x, y, rows, cols, batch, kind);                                     \
    }

UB_GGML_MATVEC_KERNEL(f32, float)
UB_GGML_MATVEC_KERNEL(f16, ub_f16)
UB_GGML_MATVEC_KERNEL(bf16, ub_bf16)

#endif  // UB_GGML_HELPERS_ONLY
