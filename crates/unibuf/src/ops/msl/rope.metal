#include <metal_stdlib>
using namespace metal;

// Rotary position embedding of x [tokens, heads, head_dim] at positions [tokens].
//
// Pair i of a head (i < head_dim / 2) turns by the angle pos * theta^(-2i / head_dim), in
// float. The pair is (i, i + head_dim/2) in the rotate-half layout of GPT-NeoX and Llama
// (style 0) and (2i, 2i + 1) in the interleaved layout of GPT-J (style 1). One thread per pair
// over a grid-stride loop. The precise:: functions keep large angles accurate under Metal's
// default fast math.

template <typename T>
static void ub_rope(device const T* x, device const uint* positions, device T* y, uint tokens,
                    uint heads, uint head_dim, float theta, uint style, ulong first,
                    ulong stride) {
    const uint half_dim = head_dim / 2;
    const ulong total = ulong(tokens) * heads * half_dim;
    for (ulong p = first; p < total; p += stride) {
        const uint i = uint(p % half_dim);
        const ulong token_head = p / half_dim;
        const uint token = uint(token_head / heads);
        const float inv_freq = precise::pow(theta, -(float(2 * i) / float(head_dim)));
        const float angle = float(positions[token]) * inv_freq;
        const float s = precise::sin(angle);
        const float c = precise::cos(angle);
        const ulong base = token_head * head_dim;
        const ulong a = style == 0 ? base + i : base + 2 * i;
        const ulong b = style == 0 ? a + half_dim : a + 1;
        const float xa = float(x[a]);
        const float xb = float(x[b]);
        y[a] = T(xa * c - xb * s);
        y[b] = T(xb * c + xa * s);
    }
}

#define UB_ROPE(SUFFIX, T)                                                                         \
    kernel void unibuf_rope_##SUFFIX(                                                              \
        device const T* x [[buffer(0)]], device const uint* positions [[buffer(1)]],               \
        device T* out [[buffer(2)]], constant uint& tokens [[buffer(3)]],                          \
        constant uint& heads [[buffer(4)]], constant uint& head_dim [[buffer(5)]],                 \
        constant float& theta [[buffer(6)]], constant uint& style [[buffer(7)]],                   \
        uint group [[threadgroup_position_in_grid]], uint groups [[threadgroups_per_grid]],        \
        uint tid [[thread_position_in_threadgroup]], uint threads [[threads_per_threadgroup]]) {   \
        ub_rope<T>(x, positions, out, tokens, heads, head_dim, theta, style,                       \
                   ulong(group) * threads + tid, ulong(groups) * threads);                         \
    }

UB_ROPE(f32, float)
UB_ROPE(f16, half)
// bfloat needs MSL 3.1 (macOS 14): older systems still get the f32 and f16 kernels.
#if __METAL_VERSION__ >= 310
UB_ROPE(bf16, bfloat)
#endif
