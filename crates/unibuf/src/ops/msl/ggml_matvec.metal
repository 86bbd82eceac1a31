#include <metal_stdlib>
using namespace metal;

// y = W x for W in a ggml block format, read natively (see cuda/ggml_matvec.cu for the block
// layouts of Q8_0, Q4_0 and Q4_1, `kind` 0, 1 and 2). One SIMD-group per row of W, its lanes
// sharing blocks as in the CUDA kernel: lane l takes quarter l % 4 of block l / 4 (8 weights),
// then the next SIMD-width / 4 blocks, so neighbouring lanes read neighbouring bytes. Each lane
// sums in float for up to 8 rows of x, then the group reduces with simd_sum. Blocks are read
// byte by byte (their scales are only 2-byte aligned, and views may start at any byte).
//
// The helpers (ub_gm_*) are shared with the fused kernels of ggml_fused.metal, which is
// compiled after this file with UB_GGML_HELPERS_ONLY defined (so that these kernels are not
// compiled again).

#define UB_GM_MAX_BATCH 8

static inline uint ub_gm_block_bytes(uint kind) {
    return kind == 0u ? 34u : (kind == 1u ? 18u : 20u);
}

static inline float ub_gm_half(device const uchar* p) {
    return float(as_type<half>(ushort(uint(p[0]) | (uint(p[1]) << 8))));
}

// Quarter s (0..3) of the block at blk: its 8 weights as two runs of 4 consecutive columns,
// lo at columns o0..o0+3 and hi at o1..o1+3 of the block (exact, as on the CPU).
static inline void ub_gm_quarter(device const uchar* blk, uint kind, uint s, thread float* lo,
                                 thread float* hi, thread uint& o0, thread uint& o1) {
    const float d = ub_gm_half(blk);
    if (kind == 0u) {
        device const uchar* q = blk + 2u + 8u * s;
        for (uint i = 0; i < 4u; ++i) {
            lo[i] = d * float(as_type<char>(q[i]));
            hi[i] = d * float(as_type<char>(q[4u + i]));
        }
        o0 = 8u * s;
        o1 = o0 + 4u;
    } else {
        // Q4_0 as d * nib - 8d (exact: d * (nib - 8) is representable), Q4_1 as d * nib + m.
        const float m = kind == 1u ? -8.0f * d : ub_gm_half(blk + 2);
        device const uchar* q = blk + (kind == 1u ? 2u : 4u) + 4u * s;
        for (uint i = 0; i < 4u; ++i) {
            lo[i] = fma(d, float(uint(q[i]) & 15u), m);
            hi[i] = fma(d, float(uint(q[i]) >> 4), m);
        }
        o0 = 4u * s;
        o1 = o0 + 16u;
    }
}

// Where a row product reads x: `load(b, c)` is x[b, c..c+4] (c a multiple of 4).
// As stored:
template <typename X> struct ub_gm_raw {
    device const X* x;
    uint cols;
    float4 load(uint b, uint c) const {
        device const X* p = x + ulong(b) * cols + c;
        return float4(float(p[0]), float(p[1]), float(p[2]), float(p[3]));
    }
};

// Normalised as it is read, x * scale[b] * nw (the operations of the threadgroup fill of
// ggml_fused.metal, in the same order):
template <typename X> struct ub_gm_norm {
    device const X* x;
    device const X* nw;
    threadgroup const float* scale;
    uint cols;
    float4 load(uint b, uint c) const {
        device const X* p = x + ulong(b) * cols + c;
        const float sc = scale[b];
        return float4(float(p[0]) * sc * float(nw[c]), float(p[1]) * sc * float(nw[c + 1u]),
                      float(p[2]) * sc * float(nw[c + 2u]), float(p[3]) * sc * float(nw[c + 3u]));
    }
};

// Normalised in threadgroup memory, float [batch, cols]:
struct ub_gm_shared {
    threadgroup const float* xs;
    uint cols;
    float4 load(uint b, uint c) const {
        threadgroup const float* p = xs + (b * cols + c);
        return float4(p[0], p[1], p[2], p[3]);
    }
};

// acc[b] = row . x[b] for b < batch, on every lane of the SIMD-group (all its lanes call it
// with the same row). `row` holds nblocks blocks of `kind`.
template <typename S>
static void ub_gm_row_dot(device const uchar* row, uint kind, uint nblocks, uint batch,
                          thread const S& src, uint lane, uint width, thread float* acc) {
    for (uint b = 0; b < UB_GM_MAX_BATCH; ++b) acc[b] = 0.0f;
    const uint bb = ub_gm_block_bytes(kind);
    const uint quarters = nblocks * 4u;
    for (uint t = lane; t < quarters; t += width) {
        const uint k = t >> 2;
        float lo[4], hi[4];
        uint o0, o1;
        ub_gm_quarter(row + ulong(k) * bb, kind, t & 3u, lo, hi, o0, o1);
        const uint c = k * 32u;
        const float4 wl = float4(lo[0], lo[1], lo[2], lo[3]);
        const float4 wh = float4(hi[0], hi[1], hi[2], hi[3]);
        for (uint b = 0; b < UB_GM_MAX_BATCH; ++b) {
            if (b < batch) {
                acc[b] += dot(wl, src.load(b, c + o0)) + dot(wh, src.load(b, c + o1));
            }
        }
    }
    for (uint b = 0; b < UB_GM_MAX_BATCH; ++b) {
        if (b < batch) acc[b] = simd_sum(acc[b]);
    }
}

#ifndef UB_GGML_HELPERS_ONLY

template <typename X>
static void ub_ggml_matvec(device const uchar* w, device const X* x, device float* y, uint rows,
                           uint cols, uint batch, uint kind, uint first_row, uint row_stride,
                           uint lane, uint width) {
    const uint nblocks = cols / 32u;
    const ulong row_bytes = ulong(nblocks) * ub_gm_block_bytes(kind);
    const ub_gm_raw<X> src = {x, cols};
    for (ulong r = first_row; r < rows; r += row_stride) {
        float acc[UB_GM_MAX_BATCH];
        ub_gm_row_dot(w + r * row_bytes, kind, nblocks, batch, src, lane, width, acc);
        for (uint b = 0; b < UB_GM_MAX_BATCH; ++b) {
            if (b < batch && lane == 0u) y[ulong(b) * rows + r] = acc[b];
        }
    }
}

#define UB_GGML_MATVEC(SUFFIX, X)                                                                 \
    kernel void unibuf_ggml_matvec_##SUFFIX(                                                      \
        device const uchar* w [[buffer(0)]], device const X* x [[buffer(1)]],                     \
        device float* y [[buffer(2)]], constant uint& rows [[buffer(3)]],                         \
        constant uint& cols [[buffer(4)]], constant uint& batch [[buffer(5)]],                    \
        constant uint& kind [[buffer(6)]], uint group [[threadgroup_position_in_grid]],           \
        uint groups [[threadgroups_per_grid]], uint sg [[simdgroup_index_in_threadgroup]],      \
        uint sgs [[simdgroups_per_threadgroup]], uint lane [[thread_index_in_simdgroup]],       \
        uint width [[threads_per_simdgroup]]) {                                                   \
        ub_ggml_matvec<X>(w, x, y, rows, cols, batch, kind, group * sgs + sg, groups * sgs, \
                          lane, width);                                                           \
    }

UB_GGML_MATVEC(f32, float)
UB_GGML_MATVEC(f16, half)
// bfloat needs MSL 3.1 (macOS 14): older systems still get the f32 and f16 kernels.
#if __METAL_VERSION__ >= 310
UB_GGML_MATVEC(bf16, bfloat)
#endif

#endif  // UB_GGML_HELPERS_ONLY
