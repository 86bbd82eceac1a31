// RMSNorm, optionally fused with the residual add: y = v / sqrt(mean(v^2) + eps) * w, where v is
// the row of x, or the row of x + residual rounded to the storage dtype (also written out, so
// that the normed output equals feeding that stored sum into the plain norm).
//
// One block per row (grid-stride over rows, so any row count works with a capped grid). The op
// is bandwidth-bound, so the aim is to move each byte once:
// - 16-byte loads and stores whenever every pointer is 16-byte aligned and the row length is a
//   whole number of vectors (then every row start is aligned too); otherwise element loads.
//   The test is on the actual addresses, so views at any offset take the right path.
// - In the vector path the row stays in registers between the sum of squares and the write
//   (up to UB_NORM_REG_VECS vectors per thread; the launcher sizes the block so that rows up to
//   4096 vectors fit); a longer row is read twice, the second time mostly from L2.

#define UB_NORM_REG_VECS 4

// Eight f16/bf16 or four f32 values in one 16-byte vector.
template <typename S> union ub_norm_vec {
    uint4 raw;
    S v[16 / sizeof(S)];
};

template <typename S> __device__ __forceinline__ float ub_norm_sumsq(uint4 raw) {
    ub_norm_vec<S> u;
    u.raw = raw;
    float acc = 0.0f;
#pragma unroll
    for (int j = 0; j < (int)(16 / sizeof(S)); ++j) {
        const float f = ub_to_f32(u.v[j]);
        acc = fmaf(f, f, acc);
    }
    return acc;
}

// The elementwise sum of two vectors, rounded to S.
template <typename S> __device__ __forceinline__ uint4 ub_norm_add(uint4 a, uint4 b) {
    ub_norm_vec<S> ua, ub, out;
    ua.raw = a;
    ub.raw = b;
#pragma unroll
    for (int j = 0; j < (int)(16 / sizeof(S)); ++j) {
        out.v[j] = ub_from_f32<S>(ub_to_f32(ua.v[j]) + ub_to_f32(ub.v[j]));
    }
    return out.raw;
}

template <typename S> __device__ __forceinline__ uint4 ub_norm_scale(uint4 x, uint4 w, float scale) {
    ub_norm_vec<S> ux, uw, out;
    ux.raw = x;
    uw.raw = w;
#pragma unroll
    for (int j = 0; j < (int)(16 / sizeof(S)); ++j) {
        out.v[j] = ub_from_f32<S>(ub_to_f32(ux.v[j]) * scale * ub_to_f32(uw.v[j]));
    }
    return out.raw;
}

// One row through 16-byte vectors. RES: v = x + residual, stored to `sum`.
template <typename S, bool RES>
__device__ __forceinline__ void ub_norm_row_vec(const S* x, const S* residual, const S* w, S* y,
                                                S* sum, unsigned int hidden, float eps,
                                                float* scratch) {
    const unsigned int nvec = hidden / (16 / sizeof(S));
    const uint4* xv = reinterpret_cast<const uint4*>(x);
    const uint4* rv = reinterpret_cast<const uint4*>(residual);
    const uint4* wv = reinterpret_cast<const uint4*>(w);
    uint4* yv = reinterpret_cast<uint4*>(y);
    uint4* sv = reinterpret_cast<uint4*>(sum);
    const bool in_regs = nvec <= UB_NORM_REG_VECS * blockDim.x;
    float acc = 0.0f;
    uint4 keep[UB_NORM_REG_VECS];
    if (in_regs) {
        // All loads first, so that they are in flight together.
#pragma unroll
        for (int k = 0; k < UB_NORM_REG_VECS; ++k) {
            const unsigned int i = threadIdx.x + k * blockDim.x;
            if (i < nvec) keep[k] = xv[i];
        }
        if (RES) {
#pragma unroll
            for (int k = 0; k < UB_NORM_REG_VECS; ++k) {
                const unsigned int i = threadIdx.x + k * blockDim.x;
                if (i < nvec) {
                    keep[k] = ub_norm_add<S>(keep[k], rv[i]);
                    sv[i] = keep[k];
                }
            }
        }
#pragma unroll
        for (int k = 0; k < UB_NORM_REG_VECS; ++k) {
            const unsigned int i = threadIdx.x + k * blockDim.x;
            if (i < nvec) acc += ub_norm_sumsq<S>(keep[k]);
        }
    } else {
        for (unsigned int i = threadIdx.x; i < nvec; i += blockDim.x) {
            uint4 v = xv[i];
            if (RES) {
                v = ub_norm_add<S>(v, rv[i]);
                sv[i] = v;
            }
            acc += ub_norm_sumsq<S>(v);
        }
    }
    const float scale = rsqrtf(ub_block_sum(acc, scratch) / (float)hidden + eps);
    if (in_regs) {
#pragma unroll
        for (int k = 0; k < UB_NORM_REG_VECS; ++k) {
            const unsigned int i = threadIdx.x + k * blockDim.x;
            if (i < nvec) yv[i] = ub_norm_scale<S>(keep[k], wv[i], scale);
        }
    } else {
        // The same thread wrote sv[i] above, so reading it back needs no barrier.
        for (unsigned int i = threadIdx.x; i < nvec; i += blockDim.x) {
            yv[i] = ub_norm_scale<S>(RES ? sv[i] : xv[i], wv[i], scale);
        }
    }
}

// One row element by element (unaligned views, or a row length that is no whole number of
// vectors): read twice, the second time mostly from L1/L2.
template <typename S, bool RES>
__device__ __forceinline__ void ub_norm_row_scalar(const S* x, const S* residual, const S* w, S* y,
                                                   S* sum, unsigned int hidden, float eps,
                                                   float* scratch) {
    float acc = 0.0f;
    for (unsigned int i = threadIdx.x; i < hidden; i += blockDim.x) {
        float v = ub_to_f32(x[i]);
        if (RES) {
            const S s = ub_from_f32<S>(v + ub_to_f32(residual[i]));
            sum[i] = s;
            v = ub_to_f32(s);
        }
        acc = fmaf(v, v, acc);
    }
    const float scale = rsqrtf(ub_block_sum(acc, scratch) / (float)hidden + eps);
    for (unsigned int i = threadIdx.x; i < hidden; i += blockDim.x) {
        const float v = ub_to_f32(RES ? sum[i] : x[i]);
        y[i] = ub_from_f32<S>(v * scale * ub_to_f32(w[i]));
    }
}

template <typename S, bool RES>
__device__ __forceinline__ void ub_norm(const S* x, const S* residual, const S* w, S* y, S* sum,
                                        unsigned int rows, unsigned int hidden, float eps) {
    __shared__ float scratch[32];
    // Aligned bases and whole vectors per row make every row's start aligned; the branch is
    // uniform over the grid.
    unsigned long long addrs = (unsigned long long)x | (unsigned long long)w |
                               (unsigned long long)y;
    if (RES) addrs |= (unsigned long long)residual | (unsigned long long)sum;
    const bool vec = (addrs & 15ull) == 0 && hidden % (16 / sizeof(S)) == 0;
    // 64-bit: rows up to 2^32 - 1 with a grid of up to 2^31 - 1 must not wrap the counter.
    for (unsigned long long row = blockIdx.x; row < rows; row += gridDim.x) {
        const unsigned long long base = (unsigned long long)row * hidden;
        const S* r = RES ? residual + base : nullptr;
        S* s = RES ? sum + base : nullptr;
        if (vec) {
            ub_norm_row_vec<S, RES>(x + base, r, w, y + base, s, hidden, eps, scratch);
        } else {
            ub_norm_row_scalar<S, RES>(x + base, r, w, y + base, s, hidden, eps, scratch);
        }
    }
}

#define UB_NORM_KERNELS(SUFFIX, S)                                                               \
    extern "C" __global__ void __launch_bounds__(1024)                                           \
        unibuf_rms_norm_##SUFFIX(const S* x, const S* weight, S* out, unsigned int rows,          \
                                 unsigned int hidden, float eps) {                               \
        ub_norm<S, false>(x, nullptr, weight, out, nullptr, rows, hidden, eps);                  \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(1024) unibuf_rms_norm_residual_##SUFFIX(        \
        const S* x, const S* residual, const S* weight, S* normed, S* sum, unsigned int rows,    \
        unsigned int hidden, float eps) {                                                        \
        ub_norm<S, true>(x, residual, weight, normed, sum, rows, hidden, eps);                   \
    }

UB_NORM_KERNELS(f32, float)
UB_NORM_KERNELS(f16, ub_f16)
UB_NORM_KERNELS(bf16, ub_bf16)
