#include <metal_stdlib>
using namespace metal;

// RMSNorm, optionally fused with the residual add: y = v / sqrt(mean(v^2) + eps) * w, where v is
// the row of x, or the row of x + residual rounded to the storage type (also written to `sum`,
// so that the normed output equals feeding that stored sum into the plain norm).
//
// One threadgroup per row, striding over rows by the number of threadgroups. Storage is float,
// half or bfloat; arithmetic is float. Element loads: Metal's memory system coalesces the
// consecutive accesses of a SIMD-group.

// The sum of `v` over the threadgroup, returned to every thread. `scratch` holds one float per
// SIMD-group (128 covers 1024 threads at the narrowest SIMD width of 8); adding the partial sums
// serially keeps this correct whatever the SIMD width is.
static float ub_threadgroup_sum(float v, threadgroup float* scratch, uint lane, uint simdgroup,
                                uint simdgroups) {
    v = simd_sum(v);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (lane == 0) {
        scratch[simdgroup] = v;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    float total = 0.0f;
    for (uint g = 0; g < simdgroups; ++g) {
        total += scratch[g];
    }
    return total;
}

template <typename T, bool RES>
static void ub_rms_norm(device const T* x, device const T* residual, device const T* weight,
                        device T* y, device T* sum, uint rows, uint hidden, float eps,
                        threadgroup float* scratch, uint group, uint groups, uint tid,
                        uint threads, uint lane, uint simdgroup, uint simdgroups) {
    for (ulong row = group; row < rows; row += groups) {  // 64-bit: no wrap near 2^32 rows
        const ulong base = ulong(row) * hidden;
        float acc = 0.0f;
        for (uint i = tid; i < hidden; i += threads) {
            float v = float(x[base + i]);
            if (RES) {
                const T s = T(v + float(residual[base + i]));
                sum[base + i] = s;
                v = float(s);
            }
            acc = fma(v, v, acc);
        }
        const float total = ub_threadgroup_sum(acc, scratch, lane, simdgroup, simdgroups);
        const float scale = rsqrt(total / float(hidden) + eps);
        // Each thread reads back only the elements of `sum` it wrote itself.
        for (uint i = tid; i < hidden; i += threads) {
            const float v = RES ? float(sum[base + i]) : float(x[base + i]);
            y[base + i] = T(v * scale * float(weight[i]));
        }
    }
}

#define UB_THREAD_ARGS                                                                             \
    uint group [[threadgroup_position_in_grid]], uint groups [[threadgroups_per_grid]],            \
        uint tid [[thread_position_in_threadgroup]], uint threads [[threads_per_threadgroup]],     \
        uint lane [[thread_index_in_simdgroup]], uint simdgroup [[simdgroup_index_in_threadgroup]], \
        uint simdgroups [[simdgroups_per_threadgroup]]

#define UB_RMS_NORM(SUFFIX, T)                                                                     \
    kernel void unibuf_rms_norm_##SUFFIX(                                                          \
        device const T* x [[buffer(0)]], device const T* weight [[buffer(1)]],                     \
        device T* out [[buffer(2)]], constant uint& rows [[buffer(3)]],                            \
        constant uint& hidden [[buffer(4)]], constant float& eps [[buffer(5)]], UB_THREAD_ARGS) {   \
        threadgroup float scratch[128];                                                            \
        ub_rms_norm<T, false>(x, x, weight, out, out, rows, hidden, eps, scratch, group, groups,   \
                              tid, threads, lane, simdgroup, simdgroups);                          \
    }                                                                                              \
    kernel void unibuf_rms_norm_residual_##SUFFIX(                                                 \
        device const T* x [[buffer(0)]], device const T* residual [[buffer(1)]],                   \
        device const T* weight [[buffer(2)]], device T* normed [[buffer(3)]],                      \
        device T* sum [[buffer(4)]], constant uint& rows [[buffer(5)]],                            \
        constant uint& hidden [[buffer(6)]], constant float& eps [[buffer(7)]], UB_THREAD_ARGS) {   \
        threadgroup float scratch[128];                                                            \
        ub_rms_norm<T, true>(x, residual, weight, normed, sum, rows, hidden, eps, scratch, group,  \
                             groups, tid, threads, lane, simdgroup, simdgroups);                   \
    }

UB_RMS_NORM(f32, float)
UB_RMS_NORM(f16, half)
// bfloat needs MSL 3.1 (macOS 14): older systems still get the f32 and f16 kernels.
#if __METAL_VERSION__ >= 310
UB_RMS_NORM(bf16, bfloat)
#endif
