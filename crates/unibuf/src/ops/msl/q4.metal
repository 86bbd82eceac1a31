#include <metal_stdlib>
using namespace metal;

// 4-bit group-quantised matrix-vector product: y[b, r] = sum_c (code[r, c] - 8) * scale[r, c / group]
// * x[b, c] for `batch` (1..=8) rows of x. `packed` is [rows, cols / 2] bytes, the low nibble the
// even column; `scales` is half [rows, cols / group]; group is 32, 64 or 128, so a row is a whole
// number of 32-column chunks (16 bytes), each inside one group.
//
// One SIMD-group per output row (grid-stride over rows); the lanes take consecutive 16-byte
// chunks, so the SIMD-group's loads are contiguous; simd_sum adds the lanes.

template <typename X>
static inline void ub_q4_matvec(const device uchar* packed, const device half* scales,
                                const device X* x, device float* y, uint rows, uint cols,
                                uint group, uint batch, uint tg, uint tgs, uint sg, uint sgs,
                                uint lane, uint width) {
    if (batch == 0 || batch > 8 || cols == 0 || (cols & 31) != 0 ||
        (group != 32 && group != 64 && group != 128) || cols % group != 0) {
        return;
    }
    const uint chunks = cols / 32;
    const uint chunks_per_group = group / 32;
    const ulong ngroups = cols / group;
    const ulong pitch = cols / 2;
    const ulong stride = ulong(tgs) * sgs;
    for (ulong r = ulong(tg) * sgs + sg; r < rows; r += stride) {
        float acc[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
        for (uint c = lane; c < chunks; c += width) {
            const device uchar* p = packed + r * pitch + ulong(c) * 16;
            const float s = float(scales[r * ngroups + c / chunks_per_group]);
            float w[32];
            for (uint i = 0; i < 16; ++i) {
                const uint byte = uint(p[i]);
                w[2 * i] = float(int(byte & 15u) - 8);
                w[2 * i + 1] = float(int(byte >> 4) - 8);
            }
            for (uint b = 0; b < batch; ++b) {
                const device X* xr = x + ulong(b) * cols + ulong(c) * 32;
                float dot = 0.0f;
                for (uint i = 0; i < 32; ++i) {
                    dot = fma(w[i], float(xr[i]), dot);
                }
                acc[b] = fma(s, dot, acc[b]);
            }
        }
        for (uint b = 0; b < batch; ++b) {
            const float total = simd_sum(acc[b]);
            if (lane == 0) {
                y[ulong(b) * rows + r] = total;
            }
        }
    }
}

kernel void unibuf_q4_matvec_f32(const device uchar* packed [[buffer(0)]],
                                 const device half* scales [[buffer(1)]],
                                 const device float* x [[buffer(2)]],
                                 device float* y [[buffer(3)]],
                                 constant uint& rows [[buffer(4)]],
                                 constant uint& cols [[buffer(5)]],
                                 constant uint& group [[buffer(6)]],
                                 constant uint& batch [[buffer(7)]],
                                 uint tg [[threadgroup_position_in_grid]],
                                 uint tgs [[threadgroups_per_grid]],
                                 uint sg [[simdgroup_index_in_threadgroup]],
                                 uint sgs [[simdgroups_per_threadgroup]],
                                 uint lane [[thread_index_in_simdgroup]],
                                 uint width [[threads_per_simdgroup]]) {
    ub_q4_matvec<float>(packed, scales, x, y, rows, cols, group, batch, tg, tgs, sg, sgs, lane,
                        width);
}

kernel void unibuf_q4_matvec_f16(const device uchar* packed [[buffer(0)]],
                                 const device half* scales [[buffer(1)]],
                                 const device half* x [[buffer(2)]],
                                 device float* y [[buffer(3)]],
                                 constant uint& rows [[buffer(4)]],
                                 constant uint& cols [[buffer(5)]],
                                 constant uint& group [[buffer(6)]],
                                 constant uint& batch [[buffer(7)]],
                                 uint tg [[threadgroup_position_in_grid]],
                                 uint tgs [[threadgroups_per_grid]],
                                 uint sg [[simdgroup_index_in_threadgroup]],
                                 uint sgs [[simdgroups_per_threadgroup]],
                                 uint lane [[thread_index_in_simdgroup]],
                                 uint width [[threads_per_simdgroup]]) {
    ub_q4_matvec<half>(packed, scales, x, y, rows, cols, group, batch, tg, tgs, sg, sgs, lane,
                       width);
}
