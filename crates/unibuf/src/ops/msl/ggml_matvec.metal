#include <metal_stdlib>
using namespace metal;

// y = W x for W in a ggml block format, read natively (see cuda/ggml_matvec.cu for the block
// layouts of Q8_0, Q4_0 and Q4_1, `kind` 0, 1 and 2). One SIMD-group per row of W: each lane
// takes whole blocks, strided by the SIMD width, sums block by block in float for up to 8 rows
// of x, then the group reduces with simd_sum. Blocks are read byte by byte (their scales are
// only 2-byte aligned).

static float ub_gm_half(device const uchar* p) {
    return float(as_type<half>(ushort(p[0]) | (ushort(p[1]) << 8)));
}

template <typename X>
static void ub_ggml_matvec(device const uchar* w, device const X* x, device float* y, uint rows,
                           uint cols, uint batch, uint kind, uint first_row, uint row_stride,
                           uint lane, uint width) {
    const uint block_bytes = kind == 0 ? 34u : (kind == 1 ? 18u : 20u);
    const uint nblocks = cols / 32u;
    const ulong row_bytes = ulong(nblocks) * block_bytes;
    for (uint r = first_row; r < rows; r += row_stride) {
        float acc[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
        device const uchar* row = w + ulong(r) * row_bytes;
        for (uint k = lane; k < nblocks; k += width) {
            device const uchar* blk = row + ulong(k) * block_bytes;
            const float d = ub_gm_half(blk);
            float wv[32];
            if (kind == 0) {
                for (uint j = 0; j < 32; ++j) wv[j] = d * float(as_type<char>(blk[2 + j]));
            } else if (kind == 1) {
                for (uint j = 0; j < 16; ++j) {
                    wv[j] = d * float(int(blk[2 + j] & 15u) - 8);
                    wv[j + 16] = d * float(int(blk[2 + j] >> 4) - 8);
                }
            } else {
                const float m = ub_gm_half(blk + 2);
                for (uint j = 0; j < 16; ++j) {
                    wv[j] = d * float(blk[4 + j] & 15u) + m;
                    wv[j + 16] = d * float(blk[4 + j] >> 4) + m;
                }
            }
            for (uint b = 0; b < batch; ++b) {
                device const X* xb = x + ulong(b) * cols + ulong(k) * 32u;
                float s = 0.0f;
                for (uint j = 0; j < 32; ++j) s += wv[j] * float(xb[j]);
                acc[b] += s;
            }
        }
        for (uint b = 0; b < batch; ++b) {
            const float v = simd_sum(acc[b]);
            if (lane == 0) y[ulong(b) * rows + r] = v;
        }
    }
}

#define UB_GGML_MATVEC(SUFFIX, X)                                                                 \
    kernel void unibuf_ggml_matvec_##SUFFIX(                                                      \
        device const uchar* w [[buffer(0)]], device const X* x [[buffer(1)]],                     \
        device float* y [[buffer(2)]], constant uint& rows [[buffer(3)]],                         \
        constant uint& cols [[buffer(4)]], constant uint& batch [[buffer(5)]],                    \
        constant uint& kind [[buffer(6)]], uint group [[threadgroup_position_in_grid]],           \
        uint groups [[threadgroups_per_grid]], uint simd [[simdgroup_index_in_threadgroup]],      \
        uint simds [[simdgroups_per_threadgroup]], uint lane [[thread_index_in_simdgroup]],       \
        uint width [[threads_per_simdgroup]]) {                                                   \
        ub_ggml_matvec<X>(w, x, y, rows, cols, batch, kind, group * simds + simd, groups * simds, \
                          lane, width);                                                           \
    }

UB_GGML_MATVEC(f32, float)
UB_GGML_MATVEC(f16, half)
// bfloat needs MSL 3.1 (macOS 14): older systems still get the f32 and f16 kernels.
#if __METAL_VERSION__ >= 310
UB_GGML_MATVEC(bf16, bfloat)
#endif
