// SwiGLU's gate: out = silu(gate) * up = gate / (1 + exp(-gate)) * up, elementwise.
//
// Grid-stride over 16-byte vectors when all three pointers are 16-byte aligned (the branch is
// uniform), then the tail that is no whole vector element by element; element loads
// throughout for unaligned views.

template <typename S> __device__ __forceinline__ float ub_swiglu_one(S g, S u) {
    const float gf = ub_to_f32(g);
    return gf / (1.0f + expf(-gf)) * ub_to_f32(u);
}

template <typename S>
__device__ __forceinline__ void ub_swiglu(const S* gate, const S* up, S* out, ub_u64 n) {
    constexpr unsigned int N = 16 / sizeof(S);
    union vec {
        uint4 raw;
        S v[N];
    };
    const ub_u64 stride = (ub_u64)gridDim.x * blockDim.x;
    const ub_u64 tid = (ub_u64)blockIdx.x * blockDim.x + threadIdx.x;
    const ub_u64 addrs = (ub_u64)gate | (ub_u64)up | (ub_u64)out;
    ub_u64 start = 0;
    if ((addrs & 15ull) == 0) {
        const ub_u64 nvec = n / N;
        const uint4* gv = reinterpret_cast<const uint4*>(gate);
        const uint4* uv = reinterpret_cast<const uint4*>(up);
        uint4* ov = reinterpret_cast<uint4*>(out);
        for (ub_u64 i = tid; i < nvec; i += stride) {
            vec g, u, o;
            g.raw = gv[i];
            u.raw = uv[i];
#pragma unroll
            for (unsigned int j = 0; j < N; ++j) o.v[j] = ub_from_f32<S>(ub_swiglu_one(g.v[j], u.v[j]));
            ov[i] = o.raw;
        }
        start = nvec * N;
    }
    for (ub_u64 i = start + tid; i < n; i += stride) {
        out[i] = ub_from_f32<S>(ub_swiglu_one(gate[i], up[i]));
    }
}

#define UB_SWIGLU_KERNEL(SUFFIX, S)                                                              \
    extern "C" __global__ void unibuf_swiglu_##SUFFIX(const S* gate, const S* up, S* out,        \
                                                      ub_u64 n) {                                \
        ub_swiglu<S>(gate, up, out, n);                                                          \
    }

UB_SWIGLU_KERNEL(f32, float)
UB_SWIGLU_KERNEL(f16, ub_f16)
UB_SWIGLU_KERNEL(bf16, ub_bf16)
