#include <metal_stdlib>
using namespace metal;

// Softmax over the last dimension: y = exp(x - max) / sum(exp(x - max)), numerically stable for
// any row length.
//
// One threadgroup per row, striding over rows by the number of threadgroups. One read pass
// keeps a running (max, sum) per thread, rescaling the sum whenever the max grows; the
// threadgroup then agrees on the row's max, rescales each thread's sum to it and adds them; the
// write pass reads the row again. Storage is float, half or bfloat; arithmetic is float.

// Reductions over the threadgroup, returned to every thread. `scratch` holds one float per
// SIMD-group (128 covers 1024 threads at the narrowest SIMD width of 8); combining the partial
// results serially keeps this correct whatever the SIMD width is.
static float ub_threadgroup_max(float v, threadgroup float* scratch, uint lane, uint simdgroup,
                                uint simdgroups) {
    v = simd_max(v);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (lane == 0) {
        scratch[simdgroup] = v;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    float total = scratch[0];
    for (uint g = 1; g < simdgroups; ++g) {
        total = max(total, scratch[g]);
    }
    return total;
}

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

template <typename T>
static void ub_softmax(device const T* x, device T* y, uint rows, uint n,
                       threadgroup float* scratch, uint group, uint groups, uint tid, uint threads,
                       uint lane, uint simdgroup, uint simdgroups) {
    // The lowest finite float rather than -inf: Metal compiles with fast math by default,
    // which may assume no infinities. exp(v - lowest) underflows to 0 as exp(-inf) would.
    const float lowest = -FLT_MAX;
    for (ulong row = group; row < rows; row += groups) {  // 64-bit: no wrap near 2^32 rows
        const ulong base = ulong(row) * n;
        float m = lowest;
        float s = 0.0f;
        for (uint i = tid; i < n; i += threads) {
            const float v = float(x[base + i]);
            if (v > m) {
                s = s * exp(m - v) + 1.0f;
                m = v;
            } else {
                s += exp(v - m);
            }
        }
        const float row_max = ub_threadgroup_max(m, scratch, lane, simdgroup, simdgroups);
        const float mine = s * exp(m - row_max);
        const float total = ub_threadgroup_sum(mine, scratch, lane, simdgroup, simdgroups);
        const float inv = 1.0f / total;
        for (uint i = tid; i < n; i += threads) {
            y[base + i] = T(exp(float(x[base + i]) - row_max) * inv);
        }
    }
}

#define UB_SOFTMAX(SUFFIX, T)                                                                      \
    kernel void unibuf_softmax_##SUFFIX(                                                           \
        device const T* x [[buffer(0)]], device T* out [[buffer(1)]],                              \
        constant uint& rows [[buffer(2)]], constant uint& n [[buffer(3)]],                         \
        uint group [[threadgroup_position_in_grid]], uint groups [[threadgroups_per_grid]],        \
        uint tid [[thread_position_in_threadgroup]], uint threads [[threads_per_threadgroup]],     \
        uint lane [[thread_index_in_simdgroup]], uint simdgroup [[simdgroup_index_in_threadgroup]], \
        uint simdgroups [[simdgroups_per_threadgroup]]) {                                          \
        threadgroup float scratch[128];                                                            \
        ub_softmax<T>(x, out, rows, n, scratch, group, groups, tid, threads, lane, simdgroup,      \
                      simdgroups);                                                                 \
    }

UB_SOFTMAX(f32, float)
UB_SOFTMAX(f16, half)
// bfloat needs MSL 3.1 (macOS 14): older systems still get the f32 and f16 kernels.
#if __METAL_VERSION__ >= 310
UB_SOFTMAX(bf16, bfloat)
#endif
