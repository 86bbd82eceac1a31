#include <metal_stdlib>
using namespace metal;

// The integer path of the 4-bit matvec: x quantised to int8 per block of 32 values
// (`unibuf_quantize_q8_*`), then y[b, r] = sum_k scale[r, k / (group / 32)] * d[b, k] * isum,
// isum = sum over the block's 32 columns of (code - 8) * q, exact in integers
// (`unibuf_q4_matvec_q8`). `packed` is [rows, cols / 2] bytes, the low nibble the even column;
// `scales` is half [rows, cols / group]; `xq` is char (int8) [batch, cols] in product order
// (value i of a block at ub_q8_slot(i): see cuda/q4_q8.cu), `xd` float [batch, cols / 32] the
// block scales and `xs` int [batch, cols / 32] the block sums. The semantics are those of
// cuda/q4_q8.cu; Metal has no four-way byte dot product, so the sums are plain integer
// multiply-adds (which need no block sums).
//
// The matvec is structured as msl/q4.metal: one SIMD-group per output row (grid-stride over
// rows); the lanes take consecutive 16-byte chunks, so the SIMD-group's loads are contiguous;
// simd_sum adds the lanes. The quantisation runs one thread per block of 32 values (grid-stride
// over the blocks), so it does not depend on the SIMD-group width.

// Where value i of a block goes in product order (`Q8Activations::slot` in q8.rs).
static inline uint ub_q8_slot(uint i) {
    return (i & 1u) * 16u + ((i >> 3) << 2) + ((i & 7u) >> 1);
}

// amax = max |x| over the block's non-NaN values, d = amax / 127 (IEEE division: the library is
// compiled without fast math), q = round(x / d) (half away from zero) clamped to [-127, 127];
// d == 0 and a NaN quotient give q = 0, so non-finite x never reaches a float-to-int conversion.
template <typename X>
static inline void ub_quantize_q8(const device X* x, device char* values, device float* scales,
                                  device int* sums, uint blocks, uint gid, uint gsize) {
    for (ulong k = gid; k < blocks; k += gsize) {
        const device X* xb = x + k * 32;
        float amax = 0.0f;
        for (uint i = 0; i < 32; ++i) {
            const float v = float(xb[i]);
            amax = isnan(v) ? amax : fmax(amax, fabs(v));
        }
        const float d = amax / 127.0f;
        int sum = 0;
        for (uint i = 0; i < 32; ++i) {
            int q = 0;
            if (d != 0.0f) {
                const float t = float(xb[i]) / d;
                if (!isnan(t)) {
                    q = int(clamp(round(t), -127.0f, 127.0f));
                }
            }
            values[k * 32 + ub_q8_slot(i)] = char(q);
            sum += q;
        }
        scales[k] = d;
        sums[k] = sum;
    }
}

kernel void unibuf_quantize_q8_f32(const device float* x [[buffer(0)]],
                                   device char* values [[buffer(1)]],
                                   device float* scales [[buffer(2)]],
                                   device int* sums [[buffer(3)]],
                                   constant uint& blocks [[buffer(4)]],
                                   uint gid [[thread_position_in_grid]],
                                   uint gsize [[threads_per_grid]]) {
    ub_quantize_q8<float>(x, values, scales, sums, blocks, gid, gsize);
}

kernel void unibuf_quantize_q8_f16(const device half* x [[buffer(0)]],
                                   device char* values [[buffer(1)]],
                                   device float* scales [[buffer(2)]],
                                   device int* sums [[buffer(3)]],
                                   constant uint& blocks [[buffer(4)]],
                                   uint gid [[thread_position_in_grid]],
                                   uint gsize [[threads_per_grid]]) {
    ub_quantize_q8<half>(x, values, scales, sums, blocks, gid, gsize);
}

kernel void unibuf_q4_matvec_q8(const device uchar* packed [[buffer(0)]],
                                const device half* scales [[buffer(1)]],
                                const device char* xq [[buffer(2)]],
                                const device float* xd [[buffer(3)]],
                                const device int* xs [[buffer(4)]],
                                device float* y [[buffer(5)]],
                                constant uint& rows [[buffer(6)]],
                                constant uint& cols [[buffer(7)]],
                                constant uint& group [[buffer(8)]],
                                constant uint& batch [[buffer(9)]],
                                uint tg [[threadgroup_position_in_grid]],
                                uint tgs [[threadgroups_per_grid]],
                                uint sg [[simdgroup_index_in_threadgroup]],
                                uint sgs [[simdgroups_per_threadgroup]],
                                uint lane [[thread_index_in_simdgroup]],
                                uint width [[threads_per_simdgroup]]) {
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
            int w[32];
            for (uint i = 0; i < 16; ++i) {
                const uint byte = uint(p[i]);
                w[2 * i] = int(byte & 15u) - 8;
                w[2 * i + 1] = int(byte >> 4) - 8;
            }
            for (uint b = 0; b < batch; ++b) {
                const device char* xr = xq + ulong(b) * cols + ulong(c) * 32;
                int isum = 0;
                for (uint i = 0; i < 32; ++i) {
                    isum += w[i] * int(xr[ub_q8_slot(i)]);
                }
                const float d = xd[ulong(b) * chunks + c];
                acc[b] = fma(s * d, float(isum), acc[b]);
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
