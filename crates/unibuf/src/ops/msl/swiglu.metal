#include <metal_stdlib>
using namespace metal;

// SwiGLU's gate: out = silu(gate) * up = gate / (1 + exp(-gate)) * up, elementwise, one
// element per thread over a grid-stride loop. Storage is float, half or bfloat; arithmetic is
// float.

template <typename T>
static void ub_swiglu(device const T* gate, device const T* up, device T* out, ulong n,
                      ulong first, ulong stride) {
    for (ulong i = first; i < n; i += stride) {
        const float g = float(gate[i]);
        out[i] = T(g / (1.0f + exp(-g)) * float(up[i]));
    }
}

#define UB_SWIGLU(SUFFIX, T)                                                                       \
    kernel void unibuf_swiglu_##SUFFIX(                                                            \
        device const T* gate [[buffer(0)]], device const T* up [[buffer(1)]],                      \
        device T* out [[buffer(2)]], constant ulong& n [[buffer(3)]],                              \
        uint group [[threadgroup_position_in_grid]], uint groups [[threadgroups_per_grid]],        \
        uint tid [[thread_position_in_threadgroup]], uint threads [[threads_per_threadgroup]]) {   \
        ub_swiglu<T>(gate, up, out, n, ulong(group) * threads + tid, ulong(groups) * threads);     \
    }

UB_SWIGLU(f32, float)
UB_SWIGLU(f16, half)
// bfloat needs MSL 3.1 (macOS 14): older systems still get the f32 and f16 kernels.
#if __METAL_VERSION__ >= 310
UB_SWIGLU(bf16, bfloat)
#endif
