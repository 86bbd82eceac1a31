// Fused products over ggml block matrices (Q8_0, Q4_0, Q4_1; see ggml_matvec.cu, whose helpers
// this file uses: it is compiled as common.cuh + ggml_matvec.cu (helpers only) + this file):
//   unibuf_ggml_matvec_norm_*   y[b] = concat_i(W_i n[b]), n[b] = x[b] * rms_scale(x[b]) * nw,
//                               up to 3 matrices of equal cols stacked in the output rows
//   unibuf_ggml_matvec_add_*    y = residual + W x
//   unibuf_ggml_swiglu_norm_*   y = silu(G n) * (U n), silu(g) = g / (1 + exp(-g))
//   unibuf_ggml_dequantize_*    the weights as a dense [rows, cols] array
//   unibuf_ggml_qkv_rope_append_X_C   q_out[t] = rope(Wq n[t]), k_cache[pos] = rope(Wk n[t]),
//                               v_cache[pos] = Wv n[t] at pos = positions[t] (see below)
// The suffix is the dtype of x (and of the norm weight), or of the output for dequantize; the
// QKV kernels' second suffix is the dtype of the caches.
//
// The products are one warp per output row, as in ggml_matvec (8 warps per block, grid-stride
// over the rows). The norm kernels first compute, in every block, the RMS scale of each row of
// x (warp b sums the squares of row b: 1 / sqrt(mean(x^2) + eps), as rms_norm computes it) and,
// when batch * cols <= UB_GF_SMEM, the normalised x into shared memory as f32,
// x * scale * weight; beyond that the warps normalise x as they read it, with the same
// operations in the same order (so the results are the same either way). n is never rounded
// to the storage dtype.

// Floats of normalised x a block holds in shared memory (32 KiB; static shared memory is at
// most 48 KiB per block).
#define UB_GF_SMEM 8192

// Every thread of the block must call this (it has barriers). Writes scale[b] for b < batch
// and, if it returns true, xs[b * cols + c] = n[b, c].
template <typename X>
__device__ __forceinline__ bool ub_gf_prologue(const X* x, const X* nw, unsigned int cols,
                                               unsigned int batch, float eps, float* xs,
                                               float* scale) {
    const unsigned int lane = threadIdx.x & 31u;
    const unsigned int warps = blockDim.x >> 5;
    for (unsigned int b = threadIdx.x >> 5; b < batch; b += warps) {
        const X* xb = x + (ub_u64)b * cols;
        float acc = 0.0f;
        for (unsigned int c = lane; c < cols; c += 32u) {
            const float v = ub_to_f32(xb[c]);
            acc = fmaf(v, v, acc);
        }
        acc = ub_warp_sum(acc);
        if (lane == 0u) scale[b] = rsqrtf(acc / (float)cols + eps);
    }
    __syncthreads();
    const bool shared = (ub_u64)batch * cols <= (ub_u64)UB_GF_SMEM;
    if (shared) {
        const unsigned int n = batch * cols;
        for (unsigned int i = threadIdx.x; i < n; i += blockDim.x) {
            const unsigned int b = i / cols;
            xs[i] = ub_to_f32(x[i]) * scale[b] * ub_to_f32(nw[i - b * cols]);
        }
        __syncthreads();
    }
    return shared;
}

// acc[b] = row . n[b], n read as the prologue left it.
template <typename X>
__device__ __forceinline__ void ub_gf_row_dot_norm(const unsigned char* row, unsigned int kind,
                                                   unsigned int nblocks, unsigned int batch,
                                                   const ub_gm_xsrc<X>& src, bool shared,
                                                   bool xvec, unsigned int lane, float* acc) {
    if (shared) {
        ub_gm_row_dot<X, UB_GM_X_SHARED>(row, kind, nblocks, batch, src, lane, acc);
    } else if (xvec) {
        ub_gm_row_dot<X, UB_GM_X_NORM_VEC>(row, kind, nblocks, batch, src, lane, acc);
    } else {
        ub_gm_row_dot<X, UB_GM_X_NORM>(row, kind, nblocks, batch, src, lane, acc);
    }
}

template <typename X>
__device__ __forceinline__ ub_gm_xsrc<X> ub_gf_src(const X* x, const X* nw, const float* xs,
                                                   const float* scale, unsigned int cols) {
    ub_gm_xsrc<X> s;
    s.x = x;
    s.nw = nw;
    s.xs = xs;
    s.scale = scale;
    s.cols = cols;
    return s;
}

template <typename X>
__device__ __forceinline__ void ub_ggml_matvec_norm(
    const unsigned char* w0, const unsigned char* w1, const unsigned char* w2, const X* x,
    const X* nw, float* y, unsigned int rows0, unsigned int rows1, unsigned int rows2,
    unsigned int kind0, unsigned int kind1, unsigned int kind2, unsigned int cols,
    unsigned int batch, float eps, float* xs, float* scale) {
    const bool shared = ub_gf_prologue<X>(x, nw, cols, batch, eps, xs, scale);
    const ub_gm_xsrc<X> src = ub_gf_src<X>(x, nw, xs, scale, cols);
    const bool xvec = ub_gm_x_vec<X>(x, nw);
    const unsigned int nblocks = cols / 32u;
    const unsigned int lane = threadIdx.x & 31u;
    const unsigned int warps = blockDim.x >> 5;
    const ub_u64 end0 = rows0, end1 = end0 + rows1, total = end1 + rows2;
    for (ub_u64 r = (ub_u64)blockIdx.x * warps + (threadIdx.x >> 5); r < total;
         r += (ub_u64)gridDim.x * warps) {
        // The warp's matrix, by its row (uniform over the warp).
        const unsigned char* w;
        unsigned int kind;
        ub_u64 local;
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
        const unsigned char* row = w + local * ((ub_u64)nblocks * ub_gm_block_bytes(kind));
        float acc[UB_GM_MAX_BATCH];
        ub_gf_row_dot_norm<X>(row, kind, nblocks, batch, src, shared, xvec, lane, acc);
#pragma unroll
        for (unsigned int b = 0; b < UB_GM_MAX_BATCH; ++b) {
            if (b < batch && lane == 0u) y[(ub_u64)b * total + r] = acc[b];
        }
    }
}

template <typename X>
__device__ __forceinline__ void ub_ggml_swiglu_norm(const unsigned char* gate,
                                                    const unsigned char* up, const X* x,
                                                    const X* nw, float* y, unsigned int rows,
                                                    unsigned int kind_gate, unsigned int kind_up,
                                                    unsigned int cols, unsigned int batch,
                                                    float eps, float* xs, float* scale) {
    const bool shared = ub_gf_prologue<X>(x, nw, cols, batch, eps, xs, scale);
    const ub_gm_xsrc<X> src = ub_gf_src<X>(x, nw, xs, scale, cols);
    const bool xvec = ub_gm_x_vec<X>(x, nw);
    const unsigned int nblocks = cols / 32u;
    const ub_u64 gate_bytes = (ub_u64)nblocks * ub_gm_block_bytes(kind_gate);
    const ub_u64 up_bytes = (ub_u64)nblocks * ub_gm_block_bytes(kind_up);
    const unsigned int lane = threadIdx.x & 31u;
    const unsigned int warps = blockDim.x >> 5;
    for (ub_u64 r = (ub_u64)blockIdx.x * warps + (threadIdx.x >> 5); r < rows;
         r += (ub_u64)gridDim.x * warps) {
        float g[UB_GM_MAX_BATCH], u[UB_GM_MAX_BATCH];
        ub_gf_row_dot_norm<X>(gate + r * gate_bytes, kind_gate, nblocks, batch, src, shared, xvec,
                              lane, g);
        ub_gf_row_dot_norm<X>(up + r * up_bytes, kind_up, nblocks, batch, src, shared, xvec, lane,
                              u);
#pragma unroll
        for (unsigned int b = 0; b < UB_GM_MAX_BATCH; ++b) {
            if (b < batch && lane == 0u) {
                y[(ub_u64)b * rows + r] = g[b] / (1.0f + expf(-g[b])) * u[b];
            }
        }
    }
}

template <typename X>
__device__ __forceinline__ void ub_ggml_matvec_add(const unsigned char* w, const X* x,
                                                   const float* residual, float* y,
                                                   unsigned int rows, unsigned int cols,
                                                   unsigned int batch, unsigned int kind) {
    const unsigned int nblocks = cols / 32u;
    const ub_u64 row_bytes = (ub_u64)nblocks * ub_gm_block_bytes(kind);
    const unsigned int lane = threadIdx.x & 31u;
    const unsigned int warps = blockDim.x >> 5;
    const ub_gm_xsrc<X> src = ub_gf_src<X>(x, x, nullptr, nullptr, cols);
    const bool xvec = ub_gm_x_vec<X>(x, x);
    for (ub_u64 r = (ub_u64)blockIdx.x * warps + (threadIdx.x >> 5); r < rows;
         r += (ub_u64)gridDim.x * warps) {
        float acc[UB_GM_MAX_BATCH];
        ub_gm_row_dot_raw<X>(w + r * row_bytes, kind, nblocks, batch, src, xvec, lane, acc);
#pragma unroll
        for (unsigned int b = 0; b < UB_GM_MAX_BATCH; ++b) {
            if (b < batch && lane == 0u) {
                const ub_u64 i = (ub_u64)b * rows + r;
                y[i] = residual[i] + acc[b];
            }
        }
    }
}

// One thread per output element, grid-stride; byte reads (neighbouring threads read the same
// block, so the loads coalesce).
template <typename T>
__device__ __forceinline__ void ub_ggml_dequantize(const unsigned char* w, T* out,
                                                   unsigned int rows, unsigned int cols,
                                                   unsigned int kind) {
    const ub_u64 n = (ub_u64)rows * cols;
    const unsigned int bb = ub_gm_block_bytes(kind);
    const ub_u64 row_bytes = (ub_u64)(cols / 32u) * bb;
    for (ub_u64 i = (ub_u64)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (ub_u64)gridDim.x * blockDim.x) {
        const ub_u64 r = i / cols;
        const unsigned int c = (unsigned int)(i - r * cols);
        const unsigned int j = c & 31u;
        const unsigned char* blk = w + r * row_bytes + (ub_u64)(c >> 5) * bb;
        const float d = ub_gm_f16(ub_gm_u16<false>(blk));
        float v;
        if (kind == 0u) {
            v = d * (float)reinterpret_cast<const signed char*>(blk)[2u + j];
        } else {
            const unsigned int q = blk[(kind == 1u ? 2u : 4u) + (j & 15u)];
            const float nib = (float)(j < 16u ? (q & 15u) : (q >> 4));
            v = kind == 1u ? d * (nib - 8.0f) : fmaf(d, nib, ub_gm_f16(ub_gm_u16<false>(blk + 2)));
        }
        out[i] = ub_from_f32<T>(v);
    }
}

// ---- QKV + RoPE + append
//
// One warp per pair of rows that rotate together (rows a and b of a head: (i, i + head_dim/2)
// in the rotate-half layout, style 0; (2i, 2i + 1) interleaved, style 1), over the pairs of Wq,
// then Wk, then Wv (V rows are paired the same way but not rotated), 8 warps per block,
// grid-stride. The warp computes both rows in one pass over n (ub_gf_pair_part: the quarter
// blocks of ub_gm_row_part for two rows, each accumulator summed in exactly ub_gm_row_part's
// order, so each product equals unibuf_ggml_matvec_norm's). Then lane t < tokens takes token t:
// it rotates (y_a, y_b) by token t's angle with rope.cu's arithmetic term for term (the f32
// inverse frequency powf(theta, -(2i / head_dim)), the f32 angle pos * inv_freq, sincosf, the
// rotation in f32) and stores it: Q into q_out (f32), K into k_cache row positions[t] and V
// (unrotated) into v_cache row positions[t], converted to the cache dtype. A position at or
// past the capacity skips the cache stores (q_out is still written): positions are device
// data, which the kernel cannot refuse, and it never writes out of bounds.

// Adds this lane's share of row_a . x[b] to acc_a[b] and of row_b . x[b] to acc_b[b], b < batch:
// two rows of one matrix (one format) in one pass over x, each x value loaded once for both.
template <typename X, int XS, bool A2>
__device__ __forceinline__ void ub_gf_pair_part(const unsigned char* row_a,
                                                const unsigned char* row_b, unsigned int kind,
                                                unsigned int nblocks, unsigned int batch,
                                                const ub_gm_xsrc<X>& src, unsigned int lane,
                                                float* acc_a, float* acc_b) {
    const unsigned int bb = ub_gm_block_bytes(kind);
    const unsigned int quarters = nblocks * 4u;
    // Two turns in flight: four quarter loads per lane before the first one is used.
#pragma unroll 2
    for (unsigned int t = lane; t < quarters; t += 32u) {
        const unsigned int k = t >> 2;
        float la[4], ha[4], lb[4], hb[4];
        unsigned int o0, o1;
        ub_gm_quarter<A2>(row_a + (ub_u64)k * bb, kind, t & 3u, la, ha, o0, o1);
        ub_gm_quarter<A2>(row_b + (ub_u64)k * bb, kind, t & 3u, lb, hb, o0, o1);
        const unsigned int c = k * 32u;
#pragma unroll
        for (unsigned int b = 0; b < UB_GM_MAX_BATCH; ++b) {
            if (b < batch) {
                const float4 u = ub_gm_x4<X, XS>(src, b, c + o0);
                const float4 v = ub_gm_x4<X, XS>(src, b, c + o1);
                acc_a[b] = ub_gm_quarter_dot(la, ha, u, v, acc_a[b]);
                acc_b[b] = ub_gm_quarter_dot(lb, hb, u, v, acc_b[b]);
            }
        }
    }
}

// acc_a[b] = row_a . x[b] and acc_b[b] = row_b . x[b] for b < batch, on every lane of the warp
// (all 32 lanes call it with the same rows), as ub_gm_row_dot computes each.
template <typename X, int XS>
__device__ __forceinline__ void ub_gf_pair_dot(const unsigned char* row_a,
                                               const unsigned char* row_b, unsigned int kind,
                                               unsigned int nblocks, unsigned int batch,
                                               const ub_gm_xsrc<X>& src, unsigned int lane,
                                               float* acc_a, float* acc_b) {
#pragma unroll
    for (unsigned int b = 0; b < UB_GM_MAX_BATCH; ++b) {
        acc_a[b] = 0.0f;
        acc_b[b] = 0.0f;
    }
    // Rows of one matrix are a whole number of even-sized rows apart: both have row_a's parity,
    // uniform over the warp.
    if ((((ub_u64)row_a) & 1ull) == 0ull) {
        ub_gf_pair_part<X, XS, true>(row_a, row_b, kind, nblocks, batch, src, lane, acc_a, acc_b);
    } else {
        ub_gf_pair_part<X, XS, false>(row_a, row_b, kind, nblocks, batch, src, lane, acc_a, acc_b);
    }
#pragma unroll
    for (unsigned int b = 0; b < UB_GM_MAX_BATCH; ++b) {
        if (b < batch) {
            acc_a[b] = ub_warp_sum(acc_a[b]);
            acc_b[b] = ub_warp_sum(acc_b[b]);
        }
    }
}

// The pair's products over n, read as the prologue left it (as ub_gf_row_dot_norm).
template <typename X>
__device__ __forceinline__ void ub_gf_pair_dot_norm(const unsigned char* row_a,
                                                    const unsigned char* row_b, unsigned int kind,
                                                    unsigned int nblocks, unsigned int batch,
                                                    const ub_gm_xsrc<X>& src, bool shared,
                                                    bool xvec, unsigned int lane, float* acc_a,
                                                    float* acc_b) {
    if (shared) {
        ub_gf_pair_dot<X, UB_GM_X_SHARED>(row_a, row_b, kind, nblocks, batch, src, lane, acc_a,
                                          acc_b);
    } else if (xvec) {
        ub_gf_pair_dot<X, UB_GM_X_NORM_VEC>(row_a, row_b, kind, nblocks, batch, src, lane, acc_a,
                                            acc_b);
    } else {
        ub_gf_pair_dot<X, UB_GM_X_NORM>(row_a, row_b, kind, nblocks, batch, src, lane, acc_a,
                                        acc_b);
    }
}

template <typename X, typename C>
__device__ __forceinline__ void ub_ggml_qkv_rope_append(
    const unsigned char* wq, const unsigned char* wk, const unsigned char* wv, const X* x,
    const X* nw, const unsigned int* positions, float* q_out, C* k_cache, C* v_cache,
    unsigned int q_rows, unsigned int kv_rows, unsigned int kind_q, unsigned int kind_k,
    unsigned int kind_v, unsigned int cols, unsigned int tokens, unsigned int head_dim,
    unsigned int capacity, float eps, float theta, unsigned int style, float* xs,
    float* scale) {
    const bool shared = ub_gf_prologue<X>(x, nw, cols, tokens, eps, xs, scale);
    const ub_gm_xsrc<X> src = ub_gf_src<X>(x, nw, xs, scale, cols);
    const bool xvec = ub_gm_x_vec<X>(x, nw);
    const unsigned int nblocks = cols / 32u;
    const unsigned int lane = threadIdx.x & 31u;
    const unsigned int warps = blockDim.x >> 5;
    const unsigned int half_dim = head_dim / 2u;
    const ub_u64 end_q = q_rows / 2u, end_k = end_q + kv_rows / 2u, pairs = end_k + kv_rows / 2u;
    // Lane t < tokens stores token t; its position, read once.
    const unsigned int pos = lane < tokens ? positions[lane] : 0u;
    const bool cached = lane < tokens && pos < capacity;
    for (ub_u64 p = (ub_u64)blockIdx.x * warps + (threadIdx.x >> 5); p < pairs;
         p += (ub_u64)gridDim.x * warps) {
        // The warp's matrix (0 Q, 1 K, 2 V) and its pair there, by p (uniform over the warp).
        unsigned int m;
        ub_u64 pair;
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
        const unsigned char* w = m == 0u ? wq : (m == 1u ? wk : wv);
        const unsigned int kind = m == 0u ? kind_q : (m == 1u ? kind_k : kind_v);
        const unsigned int head = (unsigned int)(pair / half_dim);
        const unsigned int i = (unsigned int)(pair - (ub_u64)head * half_dim);
        const unsigned int ra = head * head_dim + (style == 0u ? i : 2u * i);
        const unsigned int rb = ra + (style == 0u ? half_dim : 1u);
        const ub_u64 row_bytes = (ub_u64)nblocks * ub_gm_block_bytes(kind);
        float acc_a[UB_GM_MAX_BATCH], acc_b[UB_GM_MAX_BATCH];
        ub_gf_pair_dot_norm<X>(w + ra * row_bytes, w + rb * row_bytes, kind, nblocks, tokens, src,
                               shared, xvec, lane, acc_a, acc_b);
        // Token `lane`'s products (every lane holds every sum): selects over the unrolled loop,
        // so that the arrays stay in registers.
        float ya = 0.0f, yb = 0.0f;
#pragma unroll
        for (unsigned int b = 0; b < UB_GM_MAX_BATCH; ++b) {
            if (b == lane) {
                ya = acc_a[b];
                yb = acc_b[b];
            }
        }
        if (m == 2u) {
            if (cached) {
                const ub_u64 at = (ub_u64)pos * kv_rows;
                v_cache[at + ra] = ub_from_f32<C>(ya);
                v_cache[at + rb] = ub_from_f32<C>(yb);
            }
        } else if (lane < tokens) {
            // rope.cu's arithmetic, term for term.
            const float inv_freq = powf(theta, -((float)(2 * i) / (float)head_dim));
            const float angle = (float)pos * inv_freq;
            float s, c;
            sincosf(angle, &s, &c);
            const float oa = ya * c - yb * s;
            const float ob = yb * c + ya * s;
            if (m == 0u) {
                const ub_u64 at = (ub_u64)lane * q_rows;
                q_out[at + ra] = oa;
                q_out[at + rb] = ob;
            } else if (cached) {
                const ub_u64 at = (ub_u64)pos * kv_rows;
                k_cache[at + ra] = ub_from_f32<C>(oa);
                k_cache[at + rb] = ub_from_f32<C>(ob);
            }
        }
    }
}

// The kernels of one op per compiled source (the op's source defines UB_GF_NORM, UB_GF_SWIGLU,
// UB_GF_ADD or UB_GF_DEQUANTIZE), so that compiling one kernel compiles only its op's three;
// a QKV source defines UB_GF_QKV as the index of its one kernel (3 * x dtype + cache dtype, in
// the order f32, f16, bf16).
#define UB_GF_NORM_KERNEL(SUFFIX, X)                                                             \
    extern "C" __global__ void unibuf_ggml_matvec_norm_##SUFFIX(                                 \
        const unsigned char* w0, const unsigned char* w1, const unsigned char* w2, const X* x,   \
        const X* norm_weight, float* y, unsigned int rows0, unsigned int rows1,                  \
        unsigned int rows2, unsigned int kind0, unsigned int kind1, unsigned int kind2,          \
        unsigned int cols, unsigned int batch, float eps) {                                      \
        __shared__ float4 xs[UB_GF_SMEM / 4];                                                    \
        __shared__ float scale[UB_GM_MAX_BATCH];                                                 \
        ub_ggml_matvec_norm<X>(w0, w1, w2, x, norm_weight, y, rows0, rows1, rows2, kind0, kind1, \
                               kind2, cols, batch, eps, reinterpret_cast<float*>(xs), scale);    \
    }
#define UB_GF_SWIGLU_KERNEL(SUFFIX, X)                                                           \
    extern "C" __global__ void unibuf_ggml_swiglu_norm_##SUFFIX(                                 \
        const unsigned char* gate, const unsigned char* up, const X* x, const X* norm_weight,    \
        float* y, unsigned int rows, unsigned int kind_gate, unsigned int kind_up,               \
        unsigned int cols, unsigned int batch, float eps) {                                      \
        __shared__ float4 xs[UB_GF_SMEM / 4];                                                    \
        __shared__ float scale[UB_GM_MAX_BATCH];                                                 \
        ub_ggml_swiglu_norm<X>(gate, up, x, norm_weight, y, rows, kind_gate, kind_up, cols,      \
                               batch, eps, reinterpret_cast<float*>(xs), scale);                 \
    }
#define UB_GF_ADD_KERNEL(SUFFIX, X)                                                              \
    extern "C" __global__ void unibuf_ggml_matvec_add_##SUFFIX(                                  \
        const unsigned char* w, const X* x, const float* residual, float* y, unsigned int rows,  \
        unsigned int cols, unsigned int batch, unsigned int kind) {                              \
        ub_ggml_matvec_add<X>(w, x, residual, y, rows, cols, batch, kind);                       \
    }
#define UB_GF_DEQUANTIZE_KERNEL(SUFFIX, X)                                                       \
    extern "C" __global__ void unibuf_ggml_dequantize_##SUFFIX(                                  \
        const unsigned char* w, X* out, unsigned int rows, unsigned int cols,                    \
        unsigned int kind) {                                                                     \
        ub_ggml_dequantize<X>(w, out, rows, cols, kind);                                         \
    }
#define UB_GF_QKV_KERNEL(XS, X, CS, C)                                                           \
    extern "C" __global__ void unibuf_ggml_qkv_rope_append_##XS##_##CS(                          \
        const unsigned char* wq, const unsigned char* wk, const unsigned char* wv, const X* x,   \
        const X* norm_weight, const unsigned int* positions, float* q_out, C* k_cache,           \
        C* v_cache, unsigned int q_rows, unsigned int kv_rows, unsigned int kind_q,              \
        unsigned int kind_k, unsigned int kind_v, unsigned int cols, unsigned int tokens,        \
        unsigned int head_dim, unsigned int capacity, float eps, float theta,                    \
        unsigned int style) {                                                                    \
        __shared__ float4 xs[UB_GF_SMEM / 4];                                                    \
        __shared__ float scale[UB_GM_MAX_BATCH];                                                 \
        ub_ggml_qkv_rope_append<X, C>(wq, wk, wv, x, norm_weight, positions, q_out, k_cache,     \
                                      v_cache, q_rows, kv_rows, kind_q, kind_k, kind_v, cols,    \
                                      tokens, head_dim, capacity, eps, theta, style,             \
                                      reinterpret_cast<float*>(xs), scale);                      \
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
UB_GF_KERNEL(f16, ub_f16)
UB_GF_KERNEL(bf16, ub_bf16)
#endif

#if !defined(UB_GF_QKV)
#elif UB_GF_QKV == 0
UB_GF_QKV_KERNEL(f32, float, f32, float)
#elif UB_GF_QKV == 1
UB_GF_QKV_KERNEL(f32, float, f16, ub_f16)
#elif UB_GF_QKV == 2
UB_GF_QKV_KERNEL(f32, float, bf16, ub_bf16)
#elif UB_GF_QKV == 3
UB_GF_QKV_KERNEL(f16, ub_f16, f32, float)
#elif UB_GF_QKV == 4
UB_GF_QKV_KERNEL(f16, ub_f16, f16, ub_f16)
#elif UB_GF_QKV == 5
UB_GF_QKV_KERNEL(f16, ub_f16, bf16, ub_bf16)
#elif UB_GF_QKV == 6
UB_GF_QKV_KERNEL(bf16, ub_bf16, f32, float)
#elif UB_GF_QKV == 7
UB_GF_QKV_KERNEL(bf16, ub_bf16, f16, ub_f16)
#elif UB_GF_QKV == 8
UB_GF_QKV_KERNEL(bf16, ub_bf16, bf16, ub_bf16)
#endif
