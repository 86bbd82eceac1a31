// Rotary position embedding of x [tokens, heads, head_dim] at positions [tokens].
//
// Pair i of a head (i < head_dim / 2) turns by the angle pos * theta^(-2i / head_dim), in f32
// as in the reference implementations (the f32 rounding of that angle is what limits accuracy
// at large positions). The pair is (i, i + head_dim/2) in the rotate-half layout of GPT-NeoX
// and Llama (style 0) and (2i, 2i + 1) in the interleaved layout of GPT-J (style 1).
//
// One thread per (token, pair), grid-stride, looping over the heads: the angle's pow and sincos
// (the costly part) are computed once per token rather than once per head. Consecutive threads
// take consecutive pairs of a head, so the loads of a warp coalesce in either layout.

template <typename S>
__device__ __forceinline__ void ub_rope(const S* x, const unsigned int* positions, S* y,
                                        unsigned int tokens, unsigned int heads,
                                        unsigned int head_dim, float theta, unsigned int style) {
    const unsigned int half_dim = head_dim / 2;
    const ub_u64 total = (ub_u64)tokens * half_dim;
    const ub_u64 stride = (ub_u64)gridDim.x * blockDim.x;
    for (ub_u64 p = (ub_u64)blockIdx.x * blockDim.x + threadIdx.x; p < total; p += stride) {
        const unsigned int i = (unsigned int)(p % half_dim);
        const unsigned int token = (unsigned int)(p / half_dim);
        const float inv_freq = powf(theta, -((float)(2 * i) / (float)head_dim));
        const float angle = (float)positions[token] * inv_freq;
        float s, c;
        sincosf(angle, &s, &c);
        const ub_u64 first = (ub_u64)token * heads * head_dim + (style == 0 ? i : 2 * i);
        const unsigned int partner = style == 0 ? half_dim : 1;
        // The angle depends on (token, i) only: one sincos serves every head.
        for (unsigned int h = 0; h < heads; ++h) {
            const ub_u64 a = first + (ub_u64)h * head_dim;
            const float xa = ub_to_f32(x[a]), xb = ub_to_f32(x[a + partner]);
            y[a] = ub_from_f32<S>(xa * c - xb * s);
            y[a + partner] = ub_from_f32<S>(xb * c + xa * s);
        }
    }
}

#define UB_ROPE_KERNEL(SUFFIX, S)                                                                \
    extern "C" __global__ void unibuf_rope_##SUFFIX(                                             \
        const S* x, const unsigned int* positions, S* out, unsigned int tokens,                  \
        unsigned int heads, unsigned int head_dim, float theta, unsigned int style) {            \
        ub_rope<S>(x, positions, out, tokens, heads, head_dim, theta, style);                    \
    }

UB_ROPE_KERNEL(f32, float)
UB_ROPE_KERNEL(f16, ub_f16)
UB_ROPE_KERNEL(bf16, ub_bf16)
