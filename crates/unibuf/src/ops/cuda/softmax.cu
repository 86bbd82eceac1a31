// Softmax over the last dimension: y = exp(x - max) / sum(exp(x - max)), numerically stable for
// any row length.
//
// One block per row (grid-stride over rows). A single read pass keeps a running (max, sum) per
// thread, rescaling the sum whenever the max grows (the "online softmax"); the block then
// agrees on the row's max, rescales each thread's sum to it and adds them.
// - 16-byte loads and stores when every pointer is 16-byte aligned and the row is a whole
//   number of vectors (so every row start is aligned); element accesses otherwise. The test is
//   on the actual addresses, so views at any offset take the right path.
// - In the vector path the row stays in registers for the write pass when it fits
//   (UB_SOFTMAX_REG_VECS vectors per thread); otherwise, and in the element path, the write
//   pass reads the row again, mostly from L2.
// -inf entries (masked logits) get probability 0.

#define UB_SOFTMAX_REG_VECS 4

template <typename S> union ub_softmax_vec {
    uint4 raw;
    S v[16 / sizeof(S)];
};

// Folds one value into a thread's running (max, sum of exp(v - max)).
__device__ __forceinline__ void ub_softmax_add(float v, float& m, float& s) {
    if (v > m) {
        s = s * expf(m - v) + 1.0f;
        m = v;
    } else if (m != __int_as_float(0xff800000)) {
        // (-inf entries add nothing; -inf - -inf would be NaN.)
        s += expf(v - m);
    }
}

template <typename S> __device__ __forceinline__ void ub_softmax_add_vec(uint4 raw, float& m, float& s) {
    ub_softmax_vec<S> u;
    u.raw = raw;
#pragma unroll
    for (int j = 0; j < (int)(16 / sizeof(S)); ++j) ub_softmax_add(ub_to_f32(u.v[j]), m, s);
}

template <typename S>
__device__ __forceinline__ uint4 ub_softmax_out_vec(uint4 raw, float row_max, float inv) {
    ub_softmax_vec<S> u, o;
    u.raw = raw;
#pragma unroll
    for (int j = 0; j < (int)(16 / sizeof(S)); ++j) {
        o.v[j] = ub_from_f32<S>(expf(ub_to_f32(u.v[j]) - row_max) * inv);
    }
    return o.raw;
}

// The row's max and 1 / sum(exp(v - max)) from each thread's running pair.
__device__ __forceinline__ void ub_softmax_combine(float m, float s, float* scratch,
                                                   float& row_max, float& inv) {
    row_max = ub_block_max(m, scratch);
    const float mine = m == __int_as_float(0xff800000) ? 0.0f : s * expf(m - row_max);
    inv = 1.0f / ub_block_sum(mine, scratch);
}

template <typename S>
__device__ __forceinline__ void ub_softmax_row_vec(const S* x, S* y, unsigned int n,
                                                   float* scratch) {
    const unsigned int nvec = n / (16 / sizeof(S));
    const uint4* xv = reinterpret_cast<const uint4*>(x);
    uint4* yv = reinterpret_cast<uint4*>(y);
    const bool in_regs = nvec <= UB_SOFTMAX_REG_VECS * blockDim.x;
    float m = __int_as_float(0xff800000), s = 0.0f;
    uint4 keep[UB_SOFTMAX_REG_VECS];
    if (in_regs) {
        // All loads first, so that they are in flight together.
#pragma unroll
        for (int k = 0; k < UB_SOFTMAX_REG_VECS; ++k) {
            const unsigned int i = threadIdx.x + k * blockDim.x;
            if (i < nvec) keep[k] = xv[i];
        }
#pragma unroll
        for (int k = 0; k < UB_SOFTMAX_REG_VECS; ++k) {
            if (threadIdx.x + k * blockDim.x < nvec) ub_softmax_add_vec<S>(keep[k], m, s);
        }
    } else {
        for (unsigned int i = threadIdx.x; i < nvec; i += blockDim.x) {
            ub_softmax_add_vec<S>(xv[i], m, s);
        }
    }
    float row_max, inv;
    ub_softmax_combine(m, s, scratch, row_max, inv);
    if (in_regs) {
#pragma unroll
        for (int k = 0; k < UB_SOFTMAX_REG_VECS; ++k) {
            const unsigned int i = threadIdx.x + k * blockDim.x;
            if (i < nvec) yv[i] = ub_softmax_out_vec<S>(keep[k], row_max, inv);
        }
    } else {
        for (unsigned int i = threadIdx.x; i < nvec; i += blockDim.x) {
            yv[i] = ub_softmax_out_vec<S>(xv[i], row_max, inv);
        }
    }
}

template <typename S>
__device__ __forceinline__ void ub_softmax_row_scalar(const S* x, S* y, unsigned int n,
                                                      float* scratch) {
    float m = __int_as_float(0xff800000), s = 0.0f;
    for (unsigned int i = threadIdx.x; i < n; i += blockDim.x) ub_softmax_add(ub_to_f32(x[i]), m, s);
    float row_max, inv;
    ub_softmax_combine(m, s, scratch, row_max, inv);
    for (unsigned int i = threadIdx.x; i < n; i += blockDim.x) {
        y[i] = ub_from_f32<S>(expf(ub_to_f32(x[i]) - row_max) * inv);
    }
}

template <typename S>
__device__ __forceinline__ void ub_softmax(const S* x, S* y, unsigned int rows, unsigned int n) {
    __shared__ float scratch[32];
    const bool vec = (((unsigned long long)x | (unsigned long long)y) & 15ull) == 0 &&
                     n % (16 / sizeof(S)) == 0;
    // 64-bit: rows up to 2^32 - 1 with a grid of up to 2^31 - 1 must not wrap the counter.
    for (unsigned long long row = blockIdx.x; row < rows; row += gridDim.x) {
        const unsigned long long base = (unsigned long long)row * n;
        if (vec) {
            ub_softmax_row_vec<S>(x + base, y + base, n, scratch);
        } else {
            ub_softmax_row_scalar<S>(x + base, y + base, n, scratch);
        }
    }
}

#define UB_SOFTMAX_KERNEL(SUFFIX, S)                                                             \
    extern "C" __global__ void __launch_bounds__(1024)                                           \
        unibuf_softmax_##SUFFIX(const S* x, S* out, unsigned int rows, unsigned int n) {          \
        ub_softmax<S>(x, out, rows, n);                                                          \
    }

UB_SOFTMAX_KERNEL(f32, float)
UB_SOFTMAX_KERNEL(f16, ub_f16)
UB_SOFTMAX_KERNEL(bf16, ub_bf16)
