// Fused products over ggml block matrices (Q8_0, Q4_0, Q4_1; see ggml_matvec.cu, whose helpers
// this file uses: it is compiled as common.cuh + ggml_matvec.cu (helpers only) + this file):
//   unibuf_ggml_matvec_norm_*   y[b] = concat_i(W_i n[b]), n[b] = x[b] * rms_scale(x[b]) * nw,
//                               up to 3 matrices of equal cols stacked in the output rows
//   unibuf_ggml_matvec_add_*    y = residual + W x
//   unibuf_ggml_swiglu_norm_*   y = silu(G n) * (U n), silu(g) = g / (1 + exp(-g))
//   unibuf_ggml_dequantize_*    the weights as a dense [rows, cols] array
// The suffix is the dtype of x (and of the norm weight), or of the output for dequantize.
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

// The kernels of one op per compiled source (the op's source defines UB_GF_NORM, UB_GF_SWIGLU,
// UB_GF_ADD or UB_GF_DEQUANTIZE), so that compiling one kernel compiles only its op's three.
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
UB_GF_KERNEL(f16, ub_f16)
UB_GF_KERNEL(bf16, ub_bf16)
