// Fused products over ggml block matrices, mirroring cuda/ggml_fused.cu. Compiled after
// ggml_matvec.metal (with UB_GGML_HELPERS_ONLY defined), whose ub_gm_* helpers and x sources
// it uses, and which includes metal_stdlib.
//   unibuf_ggml_matvec_norm_*   y[b] = concat_i(W_i n[b]), n[b] = x[b] * rms_scale(x[b]) * nw
//   unibuf_ggml_matvec_add_*    y = residual + W x
//   unibuf_ggml_swiglu_norm_*   y = silu(G n) * (U n), silu(g) = g / (1 + exp(-g))
//   unibuf_ggml_dequantize_*    the weights as a dense [rows, cols] array
//   unibuf_ggml_qkv_rope_append_X_C   q_out[t] = rope(Wq n[t]), k_cache[pos] = rope(Wk n[t]),
//                               v_cache[pos] = Wv n[t] at pos = positions[t] (see below)
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

// ---- QKV + RoPE + append (cuda/ggml_fused.cu describes the design)
//
// One SIMD-group per pair of rows that rotate together ((i, i + head_dim/2) for style 0,
// (2i, 2i + 1) for style 1), over the pairs of Wq, Wk and Wv (V pairs are not rotated): both
// rows in one pass over n, then lane t < tokens rotates token t's pair with rope.metal's
// arithmetic term for term (precise pow, sin and cos) and stores it into q_out, or into row
// positions[t] of the k or v cache (none at or past the capacity).

// acc_a[b] = row_a . x[b] and acc_b[b] = row_b . x[b] for b < batch, on every lane of the
// SIMD-group (all its lanes call it with the same rows): ub_gm_row_dot for two rows of one
// matrix, each x value loaded once for both, each sum formed as ub_gm_row_dot forms it.
template <typename S>
static void ub_gf_pair_dot(device const uchar* row_a, device const uchar* row_b, uint kind,
                           uint nblocks, uint batch, thread const S& src, uint lane, uint width,
                           thread float* acc_a, thread float* acc_b) {
    for (uint b = 0; b < UB_GM_MAX_BATCH; ++b) {
        acc_a[b] = 0.0f;
        acc_b[b] = 0.0f;
    }
    const uint bb = ub_gm_block_bytes(kind);
    const uint quarters = nblocks * 4u;
    for (uint t = lane; t < quarters; t += width) {
        const uint k = t >> 2;
        float la[4], ha[4], lb[4], hb[4];
        uint o0, o1;
        ub_gm_quarter(row_a + ulong(k) * bb, kind, t & 3u, la, ha, o0, o1);
        ub_gm_quarter(row_b + ulong(k) * bb, kind, t & 3u, lb, hb, o0, o1);
        const uint c = k * 32u;
        const float4 wla = float4(la[0], la[1], la[2], la[3]);
        const float4 wha = float4(ha[0], ha[1], ha[2], ha[3]);
        const float4 wlb = float4(lb[0], lb[1], lb[2], lb[3]);
        const float4 whb = float4(hb[0], hb[1], hb[2], hb[3]);
        for (uint b = 0; b < UB_GM_MAX_BATCH; ++b) {
            if (b < batch) {
                const float4 u = src.load(b, c + o0);
                const float4 v = src.load(b, c + o1);
                acc_a[b] += dot(wla, u) + dot(wha, v);
                acc_b[b] += dot(wlb, u) + dot(whb, v);
            }
        }
    }
    for (uint b = 0; b < UB_GM_MAX_BATCH; ++b) {
        if (b < batch) {
            acc_a[b] = simd_sum(acc_a[b]);
            acc_b[b] = simd_sum(acc_b[b]);
        }
    }
}

// The pair's products over n, read as the prologue left it (as ub_gf_row_dot_norm).
template <typename X>
static void ub_gf_pair_dot_norm(device const uchar* row_a, device const uchar* row_b, uint kind,
                                uint nblocks, uint batch, device const X* x, device const X* nw,
                                threadgroup const float* xs, threadgroup const float* scale,
                                uint cols, bool shared, uint lane, uint width,
                                thread float* acc_a, thread float* acc_b) {
    if (shared) {
        const ub_gm_shared src = {xs, cols};
        ub_gf_pair_dot(row_a, row_b, kind, nblocks, batch, src, lane, width, acc_a, acc_b);
    } else {
        const ub_gm_norm<X> src = {x, nw, scale, cols};
        ub_gf_pair_dot(row_a, row_b, kind, nblocks, batch, src, lane, width, acc_a, acc_b);
    }
}

template <typename X, typename C>
static void ub_ggml_qkv_rope_append(
    device const uchar* wq, device const uchar* wk, device const uchar* wv, device const X* x,
    device const X* nw, device const uint* positions, device float* q_out, device C* k_cache,
    device C* v_cache, uint q_rows, uint kv_rows, uint kind_q, uint kind_k, uint kind_v,
    uint cols, uint tokens, uint head_dim, uint capacity, float eps, float theta, uint style,
    threadgroup float* xs, threadgroup float* scale, uint group, uint groups, uint tid,
    uint threads, uint sg, uint sgs, uint lane, uint width) {
    const bool shared =
        ub_gf_prologue<X>(x, nw, cols, tokens, eps, xs, scale, tid, threads, sg, sgs, lane,
                          width);
    const uint nblocks = cols / 32u;
    const uint half_dim = head_dim / 2u;
    const ulong end_q = q_rows / 2u, end_k = end_q + kv_rows / 2u, pairs = end_k + kv_rows / 2u;
    // Lane t < tokens stores token t; its position, read once.
    const uint pos = lane < tokens ? positions[lane] : 0u;
    const bool cached = lane < tokens && pos < capacity;
    for (ulong p = ulong(group) * sgs + sg; p < pairs; p += ulong(groups) * sgs) {
        // The SIMD-group's matrix (0 Q, 1 K, 2 V) and its pair there, by p (uniform).
        uint m;
        ulong pair;
        if (p < end_q) {
            m = 0u;
            pair = p;
        } else if (p < end_k) {
            m = 1u;
            pair = p - end_q;
        } else {
            m = 2u;
            pair = p - end_k;
        }
        device const uchar* w = m == 0u ? wq : (m == 1u ? wk : wv);
        const uint kind = m == 0u ? kind_q : (m == 1u ? kind_k : kind_v);
        const uint head = uint(pair / half_dim);
        const uint i = uint(pair - ulong(head) * half_dim);
        const uint ra = head * head_dim + (style == 0u ? i : 2u * i);
        const uint rb = ra + (style == 0u ? half_dim : 1u);
        const ulong row_bytes = ulong(nblocks) * ub_gm_block_bytes(kind);
        float acc_a[UB_GM_MAX_BATCH];
        float acc_b[UB_GM_MAX_BATCH];
        ub_gf_pair_dot_norm<X>(w + ulong(ra) * row_bytes, w + ulong(rb) * row_bytes, kind,
                               nblocks, tokens, x, nw, xs, scale, cols, shared, lane, width,
                               acc_a, acc_b);
        // Token `lane`'s products (every lane holds every sum), selected without an indexed
        // read of the arrays.
        float ya = 0.0f;
        float yb = 0.0f;
        for (uint b = 0; b < UB_GM_MAX_BATCH; ++b) {
            if (b == lane) {
                ya = acc_a[b];
                yb = acc_b[b];
            }
        }
        if (m == 2u) {
            if (cached) {
                const ulong at = ulong(pos) * kv_rows;
                v_cache[at + ra] = C(ya);
                v_cache[at + rb] = C(yb);
            }
        } else if (lane < tokens) {
            // rope.metal's arithmetic, term for term.
            const float inv_freq = precise::pow(theta, -(float(2 * i) / float(head_dim)));
            const float angle = float(pos) * inv_freq;
            const float s = precise::sin(angle);
            const float c = precise::cos(angle);
            const float oa = ya * c - yb * s;
            const float ob = yb * c + ya * s;
            if (m == 0u) {
                const ulong at = ulong(lane) * q_rows;
                q_out[at + ra] = oa;
                q_out[at + rb] = ob;
            } else if (cached) {
                const ulong at = ulong(pos) * kv_rows;
                k_cache[at + ra] = C(oa);
                k_cache[at + rb] = C(ob);
            }
        }
    }
}

#define UB_GF_SIMD_ARGS                                                                            \
    uint group [[threadgroup_position_in_grid]], uint groups [[threadgroups_per_grid]],            \
        uint tid [[thread_position_in_threadgroup]], uint threads [[threads_per_threadgroup]],     \
        uint sg [[simdgroup_index_in_threadgroup]], uint sgs [[simdgroups_per_threadgroup]],   \
        uint lane [[thread_index_in_simdgroup]], uint width [[threads_per_simdgroup]]

// The kernels of one op per compiled source (the op's source defines UB_GF_NORM, UB_GF_SWIGLU,
// UB_GF_ADD or UB_GF_DEQUANTIZE), so that compiling one kernel compiles only its op's three;
// a QKV source defines UB_GF_QKV as the index of its one kernel (3 * x dtype + cache dtype, in
// the order f32, f16, bf16).
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
#define UB_GF_QKV_KERNEL(XS, X, CS, C)                                                             \
    kernel void unibuf_ggml_qkv_rope_append_##XS##_##CS(                                           \
        device const uchar* wq [[buffer(0)]], device const uchar* wk [[buffer(1)]],                \
        device const uchar* wv [[buffer(2)]], device const X* x [[buffer(3)]],                     \
        device const X* norm_weight [[buffer(4)]], device const uint* positions [[buffer(5)]],     \
        device float* q_out [[buffer(6)]], device C* k_cache [[buffer(7)]],                        \
        device C* v_cache [[buffer(8)]], constant uint& q_rows [[buffer(9)]],                      \
        constant uint& kv_rows [[buffer(10)]], constant uint& kind_q [[buffer(11)]],               \
        constant uint& kind_k [[buffer(12)]], constant uint& kind_v [[buffer(13)]],                \
        constant uint& cols [[buffer(14)]], constant uint& tokens [[buffer(15)]],                  \
        constant uint& head_dim [[buffer(16)]], constant uint& capacity [[buffer(17)]],            \
        constant float& eps [[buffer(18)]], constant float& theta [[buffer(19)]],                  \
        constant uint& style [[buffer(20)]], UB_GF_SIMD_ARGS) {                                    \
        threadgroup float xs[UB_GF_TG];                                                            \
        threadgroup float scale[UB_GM_MAX_BATCH];                                                  \
        ub_ggml_qkv_rope_append<X, C>(wq, wk, wv, x, norm_weight, positions, q_out, k_cache,       \
                                      v_cache, q_rows, kv_rows, kind_q, kind_k, kind_v, cols,      \
                                      tokens, head_dim, capacity, eps, theta, style, xs, scale,    \
                                      group, groups, tid, threads, sg, sgs, lane, width);          \
    }

#if defined(UB_GF_NORM)
#define UB_GF_KERNEL UB_GF_NORM_KERNEL
#elif defined(UB_GF_SWIGLU)
#define UB_GF_KERNEL UB_GF_SWIGLU_KERNEL
#elif defined(UB_GF_ADD)
#define UB_GF_KERNEL UB_GF_ADD_KERNEL
#elif defined(UB_GF_DEQUANTIZE)
#define UB_GF_KERNEL UB_GF_DEQUANTIZE_KERNEL
#endif

#ifdef UB_GF_KERNEL
UB_GF_KERNEL(f32, float)
UB_GF_KERNEL(f16, half)
// bfloat needs MSL 3.1 (macOS 14): older systems still get the f32 and f16 kernels.
#if __METAL_VERSION__ >= 310
UB_GF_KERNEL(bf16, bfloat)
#endif
#endif

// The QKV kernels with a bfloat x or cache need MSL 3.1 too.
#if !defined(UB_GF_QKV)
#elif UB_GF_QKV == 0
UB_GF_QKV_KERNEL(f32, float, f32, float)
#elif UB_GF_QKV == 1
UB_GF_QKV_KERNEL(f32, float, f16, half)
#elif UB_GF_QKV == 3
UB_GF_QKV_KERNEL(f16, half, f32, float)
#elif UB_GF_QKV == 4
UB_GF_QKV_KERNEL(f16, half, f16, half)
#elif __METAL_VERSION__ < 310
#elif UB_GF_QKV == 2
UB_GF_QKV_KERNEL(f32, float, bf16, bfloat)
#elif UB_GF_QKV == 5
UB_GF_QKV_KERNEL(f16, half, bf16, bfloat)
#elif UB_GF_QKV == 6
UB_GF_QKV_KERNEL(bf16, bfloat, f32, float)
#elif UB_GF_QKV == 7
UB_GF_QKV_KERNEL(bf16, bfloat, f16, half)
#elif UB_GF_QKV == 8
UB_GF_QKV_KERNEL(bf16, bfloat, bf16, bfloat)
#endif
