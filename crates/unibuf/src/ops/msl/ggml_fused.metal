// Fused products over ggml block matrices, mirroring cuda/ggml_fused.cu. Compiled after
// ggml_matvec.metal (with UB_GGML_HELPERS_ONLY defined), whose ub_gm_* helpers and x sources
// it uses, and which includes metal_stdlib.
//   unibuf_ggml_matvec_norm_*   y[b] = concat_i(W_i n[b]), n[b] = x[b] * rms_scale(x[b]) * nw
//   unibuf_ggml_matvec_add_*    y = residual + W x
//   unibuf_ggml_swiglu_norm_*   y = silu(G n) * (U n), silu(g) = g / (1 + exp(-g))
//   unibuf_ggml_dequantize_*    the weights as a dense [rows, cols] array
// One SIMD-group per output row. The norm kernels first compute, in every threadgroup, the
// RMS scale of each row of x (SIMD-group b sums row b) and, when batch * cols <= UB_GF_TG, the
// normalised x into threadgroup memory as float; beyond that the lanes normalise x as they read
// it, with the same operations in the same order.

// Floats of normalised x a threadgroup holds (24 KiB of the 32 KiB Apple GPUs give one).
#define UB_GF_TG 6144

// Every thread of the threadgroup must call this (it has barriers). Writes scale[b] for
// b < batch and, if it returns true, xs[b * cols + c] = n[b, c].
template <typename X>
static bool ub_gf_prologue(device const X* x, device const X* nw, uint cols, uint batch,
                           float eps, threadgroup float* xs, threadgroup float* scale, uint tid,
                           uint threads, uint sg, uint sgs, uint lane, uint width) {
    for (uint b = sg; b < batch; b += sgs) {
        device const X* xb = x + ulong(b) * cols;
        float acc = 0.0f;
        for (uint c = lane; c < cols; c += width) {
            const float v = float(xb[c]);
            acc = fma(v, v, acc);
        }
        acc = simd_sum(acc);
        if (lane == 0u) scale[b] = rsqrt(acc / float(cols) + eps);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    const bool shared = ulong(batch) * cols <= ulong(UB_GF_TG);
    if (shared) {
        const uint n = batch * cols;
        for (uint i = tid; i < n; i += threads) {
            const uint b = i / cols;
            xs[i] = float(x[i]) * scale[b] * float(nw[i - b * cols]);
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    return shared;
}

// acc[b] = row . n[b], n read as the prologue left it.
template <typename X>
static void ub_gf_row_dot_norm(device const uchar* row, uint kind, uint nblocks, uint batch,
                               device const X* x, device const X* nw, threadgroup const float* xs,
                               threadgroup const float* scale, uint cols, bool shared, uint lane,
                               uint width, thread float* acc) {
    if (shared) {
        const ub_gm_shared src = {xs, cols};
        ub_gm_row_dot(row, kind, nblocks, batch, src, lane, width, acc);
    } else {
        const ub_gm_norm<X> src = {x, nw, scale, cols};
        ub_gm_row_dot(row, kind, nblocks, batch, src, lane, width, acc);
    }
}

template <typename X>
static void ub_ggml_matvec_norm(device const uchar* w0, device const uchar* w1,
                                device const uchar* w2, device const X* x, device const X* nw,
                                device float* y, uint rows0, uint rows1, uint rows2, uint kind0,
                                uint kind1, uint kind2, uint cols, uint batch, float eps,
                                threadgroup float* xs, threadgroup float* scale, uint group,
                                uint groups, uint tid, uint threads, uint sg, uint sgs,
                                uint lane, uint width) {
    const bool shared =
        ub_gf_prologue<X>(x, nw, cols, batch, eps, xs, scale, tid, threads, sg, sgs, lane,
                          width);
    const uint nblocks = cols / 32u;
    const ulong end0 = rows0, end1 = end0 + rows1, total = end1 + rows2;
    for (ulong r = ulong(group) * sgs + sg; r < total; r += ulong(groups) * sgs) {
        device const uchar* w;
        uint kind;
        ulong local;
        if (r < end0) {
            w = w0;
            kind = kind0;
            local = r;
        } else if (r < end1) {
            w = w1;
            kind = kind1;
            local = r - end0;
        } else {
            w = w2;
            kind = kind2;
            local = r - end1;
        }
        device const uchar* row = w + local * (ulong(nblocks) * ub_gm_block_bytes(kind));
        float acc[UB_GM_MAX_BATCH];
        ub_gf_row_dot_norm<X>(row, kind, nblocks, batch, x, nw, xs, scale, cols, shared, lane,
                              width, acc);
        for (uint b = 0; b < UB_GM_MAX_BATCH; ++b) {
            if (b < batch && lane == 0u) y[ulong(b) * total + r] = acc[b];
        }
    }
}

template <typename X>
static void ub_ggml_swiglu_norm(device const uchar* gate, device const uchar* up,
                                device const X* x, device const X* nw, device float* y, uint rows,
                                uint kind_gate, uint kind_up, uint cols, uint batch, float eps,
                                threadgroup float* xs, threadgroup float* scale, uint group,
                                uint groups, uint tid, uint threads, uint sg, uint sgs,
                                uint lane, uint width) {
    const bool shared =
        ub_gf_prologue<X>(x, nw, cols, batch, eps, xs, scale, tid, threads, sg, sgs, lane,
                          width);
    const uint nblocks = cols / 32u;
    const ulong gate_bytes = ulong(nblocks) * ub_gm_block_bytes(kind_gate);
    const ulong up_bytes = ulong(nblocks) * ub_gm_block_bytes(kind_up);
    for (ulong r = ulong(group) * sgs + sg; r < rows; r += ulong(groups) * sgs) {
        float g[UB_GM_MAX_BATCH];
        float u[UB_GM_MAX_BATCH];
        ub_gf_row_dot_norm<X>(gate + r * gate_bytes, kind_gate, nblocks, batch, x, nw, xs, scale,
                              cols, shared, lane, width, g);
        ub_gf_row_dot_norm<X>(up + r * up_bytes, kind_up, nblocks, batch, x, nw, xs, scale, cols,
                              shared, lane, width, u);
        for (uint b = 0; b < UB_GM_MAX_BATCH; ++b) {
            if (b < batch && lane == 0u) {
                y[ulong(b) * rows + r] = g[b] / (1.0f + exp(-g[b])) * u[b];
            }
        }
    }
}

template <typename X>
static void ub_ggml_matvec_add(device const uchar* w, device const X* x,
                               device const float* residual, device float* y, uint rows,
                               uint cols, uint batch, uint kind, uint group, uint groups,
                               uint sg, uint sgs, uint lane, uint width) {
    const uint nblocks = cols / 32u;
    const ulong row_bytes = ulong(nblocks) * ub_gm_block_bytes(kind);
    const ub_gm_raw<X> src = {x, cols};
    for (ulong r = ulong(group) * sgs + sg; r < rows; r += ulong(groups) * sgs) {
        float acc[UB_GM_MAX_BATCH];
        ub_gm_row_dot(w + r * row_bytes, kind, nblocks, batch, src, lane, width, acc);
        for (uint b = 0; b < UB_GM_MAX_BATCH; ++b) {
            if (b < batch && lane == 0u) {
                const ulong i = ulong(b) * rows + r;
                y[i] = residual[i] + acc[b];
            }
        }
    }
}

// One thread per output element over a grid-stride loop.
template <typename T>
static void ub_ggml_dequantize(device const uchar* w, device T* out, uint rows, uint cols,
                               uint kind, ulong first, ulong stride) {
    const ulong n = ulong(rows) * cols;
    const uint bb = ub_gm_block_bytes(kind);
    const ulong row_bytes = ulong(cols / 32u) * bb;
    for (ulong i = first; i < n; i += stride) {
        const ulong r = i / cols;
        const uint c = uint(i - r * cols);
        const uint j = c & 31u;
        device const uchar* blk = w + r * row_bytes + ulong(c >> 5) * bb;
        const float d = ub_gm_half(blk);
        float v;
        if (kind == 0u) {
            v = d * float(as_type<char>(blk[2u + j]));
        } else {
            const uint q = uint(blk[(kind == 1u ? 2u : 4u) + (j & 15u)]);
            const float nib = float(j < 16u ? (q & 15u) : (q >> 4));
            v = kind == 1u ? d * (nib - 8.0f) : fma(d, nib, ub_gm_half(blk + 2));
        }
        out[i] = T(v);
    }
}

#define UB_GF_SIMD_ARGS                                                                            \
    uint group [[threadgroup_position_in_grid]], uint groups [[threadgroups_per_grid]],            \
        uint tid [[thread_position_in_threadgroup]], uint threads [[threads_per_threadgroup]],     \
        uint sg [[simdgroup_index_in_threadgroup]], uint sgs [[simdgroups_per_threadgroup]],   \
        uint lane [[thread_index_in_simdgroup]], uint width [[threads_per_simdgroup]]

// The kernels of one op per compiled source (the op's source defines UB_GF_NORM, UB_GF_SWIGLU,
// UB_GF_ADD or UB_GF_DEQUANTIZE), so that compiling one kernel compiles only its op's three.
#define UB_GF_NORM_KERNEL(SUFFIX, X)                                                               \
    kernel void unibuf_ggml_matvec_norm_##SUFFIX(                                                  \
        device const uchar* w0 [[buffer(0)]], device const uchar* w1 [[buffer(1)]],                \
        device const uchar* w2 [[buffer(2)]], device const X* x [[buffer(3)]],                     \
        device const X* norm_weight [[buffer(4)]], device float* y [[buffer(5)]],                  \
        constant uint& rows0 [[buffer(6)]], constant uint& rows1 [[buffer(7)]],                    \
        constant uint& rows2 [[buffer(8)]], constant uint& kind0 [[buffer(9)]],                    \
        constant uint& kind1 [[buffer(10)]], constant uint& kind2 [[buffer(11)]],                  \
        constant uint& cols [[buffer(12)]], constant uint& batch [[buffer(13)]],                   \
        constant float& eps [[buffer(14)]], UB_GF_SIMD_ARGS) {                                     \
        threadgroup float xs[UB_GF_TG];                                                            \
        threadgroup float scale[UB_GM_MAX_BATCH];                                                  \
        ub_ggml_matvec_norm<X>(w0, w1, w2, x, norm_weight, y, rows0, rows1, rows2, kind0, kind1,   \
                               kind2, cols, batch, eps, xs, scale, group, groups, tid, threads,    \
                               sg, sgs, lane, width);                                              \
    }
#define UB_GF_SWIGLU_KERNEL(SUFFIX, X)                                                             \
    kernel void unibuf_ggml_swiglu_norm_##SUFFIX(                                                  \
        device const uchar* gate [[buffer(0)]], device const uchar* up [[buffer(1)]],              \
        device const X* x [[buffer(2)]], device const X* norm_weight [[buffer(3)]],                \
        device float* y [[buffer(4)]], constant uint& rows [[buffer(5)]],                          \
        constant uint& kind_gate [[buffer(6)]], constant uint& kind_up [[buffer(7)]],              \
        constant uint& cols [[buffer(8)]], constant uint& batch [[buffer(9)]],                     \
        constant float& eps [[buffer(10)]], UB_GF_SIMD_ARGS) {                                     \
        threadgroup float xs[UB_GF_TG];                                                            \
        threadgroup float scale[UB_GM_MAX_BATCH];                                                  \
        ub_ggml_swiglu_norm<X>(gate, up, x, norm_weight, y, rows, kind_gate, kind_up, cols, batch, \
                               eps, xs, scale, group, groups, tid, threads, sg, sgs, lane, width); \
    }
#define UB_GF_ADD_KERNEL(SUFFIX, X)                                                                \
    kernel void unibuf_ggml_matvec_add_##SUFFIX(                                                   \
        device const uchar* w [[buffer(0)]], device const X* x [[buffer(1)]],                      \
        device const float* residual [[buffer(2)]], device float* y [[buffer(3)]],                 \
        constant uint& rows [[buffer(4)]], constant uint& cols [[buffer(5)]],                      \
        constant uint& batch [[buffer(6)]], constant uint& kind [[buffer(7)]], UB_GF_SIMD_ARGS) {  \
        ub_ggml_matvec_add<X>(w, x, residual, y, rows, cols, batch, kind, group, groups, sg, sgs,  \
                              lane, width);                                                        \
    }
#define UB_GF_DEQUANTIZE_KERNEL(SUFFIX, X)                                                         \
    kernel void unibuf_ggml_dequantize_##SUFFIX(                                                   \
        device const uchar* w [[buffer(0)]], device X* out [[buffer(1)]],                          \
        constant uint& rows [[buffer(2)]], constant uint& cols [[buffer(3)]],                      \
        constant uint& kind [[buffer(4)]], uint gid [[thread_position_in_grid]],                   \
        uint grid [[threads_per_grid]]) {                                                          \
        ub_ggml_dequantize<X>(w, out, rows, cols, kind, ulong(gid), ulong(grid));                  \
    }

#if defined(UB_GF_NORM)
#define UB_GF_KERNEL UB_GF_NORM_KERNEL
#elif defined(UB_GF_SWIGLU)
#define UB_GF_KERNEL UB_GF_SWIGLU_KERNEL
#elif defined(UB_GF_ADD)
#define UB_GF_KERNEL UB_GF_ADD_KERNEL
#else
#define UB_GF_KERNEL UB_GF_DEQUANTIZE_KERNEL
#endif

UB_GF_KERNEL(f32, float)
UB_GF_KERNEL(f16, half)
// bfloat needs MSL 3.1 (macOS 14): older systems still get the f32 and f16 kernels.
#if __METAL_VERSION__ >= 310
UB_GF_KERNEL(bf16, bfloat)
#endif
