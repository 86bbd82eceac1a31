// y = W x for W in a ggml block format, read natively (no dequantised copy):
//   kind 0, Q8_0: blocks of 32 as { f16 d; int8 q[32]; }             w = d * q        (34 bytes)
//   kind 1, Q4_0: blocks of 32 as { f16 d; u8 qs[16]; }              w = d * (nib - 8) (18 bytes)
//   kind 2, Q4_1: blocks of 32 as { f16 d; f16 m; u8 qs[16]; }       w = d * nib + m  (20 bytes)
// where in the 4-bit formats element j < 16 is the low nibble of qs[j] and element j + 16 its
// high nibble (ggml's layout). One warp per row of W: each lane takes whole blocks, strided by
// 32, and sums block by block in f32 for up to UB_GM_MAX_BATCH rows of x at once; the warp
// then reduces with shuffles. Blocks are byte-addressed (34- and 18-byte blocks leave the
// scales only 2-byte aligned), and x is read through the cache (it is small and shared by
// every row).

#define UB_GM_MAX_BATCH 8

__device__ __forceinline__ float ub_gm_half(const unsigned char* p) {
    ub_f16 h;
    h.bits = (unsigned short)p[0] | ((unsigned short)p[1] << 8);
    return ub_to_f32(h);
}

template <typename X>
__device__ __forceinline__ void ub_ggml_matvec(const unsigned char* w, const X* x, float* y,
                                               unsigned int rows, unsigned int cols,
                                               unsigned int batch, unsigned int kind) {
    const unsigned int block_bytes = kind == 0 ? 34u : (kind == 1 ? 18u : 20u);
    const unsigned int nblocks = cols / 32u;
    const ub_u64 row_bytes = (ub_u64)nblocks * block_bytes;
    const unsigned int lane = threadIdx.x & 31u;
    const unsigned int warps = blockDim.x >> 5;
    const unsigned int warp = threadIdx.x >> 5;
    for (unsigned int r = blockIdx.x * warps + warp; r < rows; r += gridDim.x * warps) {
        float acc[UB_GM_MAX_BATCH];
#pragma unroll
        for (unsigned int b = 0; b < UB_GM_MAX_BATCH; ++b) acc[b] = 0.0f;
        const unsigned char* row = w + (ub_u64)r * row_bytes;
        for (unsigned int k = lane; k < nblocks; k += 32u) {
            const unsigned char* blk = row + (ub_u64)k * block_bytes;
            const float d = ub_gm_half(blk);
            float wv[32];
            if (kind == 0) {
                const signed char* q = reinterpret_cast<const signed char*>(blk + 2);
#pragma unroll
                for (int j = 0; j < 32; ++j) wv[j] = d * (float)q[j];
            } else if (kind == 1) {
                const unsigned char* qs = blk + 2;
#pragma unroll
                for (int j = 0; j < 16; ++j) {
                    wv[j] = d * (float)((int)(qs[j] & 15u) - 8);
                    wv[j + 16] = d * (float)((int)(qs[j] >> 4) - 8);
                }
            } else {
                const float m = ub_gm_half(blk + 2);
                const unsigned char* qs = blk + 4;
#pragma unroll
                for (int j = 0; j < 16; ++j) {
                    wv[j] = d * (float)(qs[j] & 15u) + m;
                    wv[j + 16] = d * (float)(qs[j] >> 4) + m;
                }
            }
            for (unsigned int b = 0; b < batch; ++b) {
                const X* xb = x + (ub_u64)b * cols + (ub_u64)k * 32u;
                float s = 0.0f;
#pragma unroll
                for (int j = 0; j < 32; ++j) s += wv[j] * ub_to_f32(xb[j]);
                acc[b] += s;
            }
        }
        for (unsigned int b = 0; b < batch; ++b) {
            float v = acc[b];
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
            if (lane == 0) y[(ub_u64)b * rows + r] = v;
        }
    }
}

#define UB_GGML_MATVEC_KERNEL(SUFFIX, X)                                                         \
    extern "C" __global__ void unibuf_ggml_matvec_##SUFFIX(                                      \
        const unsigned char* w, const X* x, float* y, unsigned int rows, unsigned int cols,      \
        unsigned int batch, unsigned int kind) {                                                 \
        ub_ggml_matvec<X>(w, x, y, rows, cols, batch, kind);                                     \
    }

UB_GGML_MATVEC_KERNEL(f32, float)
UB_GGML_MATVEC_KERNEL(f16, ub_f16)
UB_GGML_MATVEC_KERNEL(bf16, ub_bf16)
