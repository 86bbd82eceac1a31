// Shared prelude of the ops' CUDA kernels, prepended to each op's source with concat!.
//
// NVRTC is given no include path, so the half-precision types are declared here rather than
// taken from cuda_fp16.h / cuda_bf16.h: storage is the 16-bit pattern in a tagged struct (so
// that overloads tell f16 from bf16), converted with PTX `cvt` (f16) and bit operations (bf16).
// Arithmetic is always f32.

typedef unsigned long long ub_u64;

struct ub_f16 { unsigned short bits; };
struct ub_bf16 { unsigned short bits; };

__device__ __forceinline__ float ub_to_f32(float v) { return v; }
__device__ __forceinline__ float ub_to_f32(ub_f16 v) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.bits));
    return f;
}
__device__ __forceinline__ float ub_to_f32(ub_bf16 v) {
    return __uint_as_float(((unsigned int)v.bits) << 16);
}

template <typename S> __device__ __forceinline__ S ub_from_f32(float f);
template <> __device__ __forceinline__ float ub_from_f32<float>(float f) { return f; }
template <> __device__ __forceinline__ ub_f16 ub_from_f32<ub_f16>(float f) {
    ub_f16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h.bits) : "f"(f));
    return h;
}
// Round to nearest even; NaN stays a (quiet) NaN.
template <> __device__ __forceinline__ ub_bf16 ub_from_f32<ub_bf16>(float f) {
    unsigned int u = __float_as_uint(f);
    ub_bf16 b;
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        b.bits = (unsigned short)((u >> 16) | 0x40u);
    } else {
        b.bits = (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    }
    return b;
}

__device__ __forceinline__ float ub_warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float ub_warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
// `scratch` is __shared__ float[32]; the call may be repeated with the same scratch.
__device__ __forceinline__ float ub_block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = ub_warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : 0.0f;
    return ub_warp_sum(v);
}
// Maximum over the block, as ub_block_sum.
__device__ __forceinline__ float ub_block_max(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = ub_warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : __int_as_float(0xff800000);  // -inf (no math.h)
    return ub_warp_max(v);
}
