#include <metal_stdlib>
using namespace metal;

// Embedding rows: out[i, :] = table[ids[i], :] (see cuda/embed.cu for the table kinds: 0 Q8_0,
// 1 Q4_0, 2 Q4_1, 3 float, 4 half, 5 bfloat). One threadgroup per output row (grid-strided),
// its threads over the columns; an id at or past `vocab` gives a row of NaN.

static float ub_em_half(device const uchar* p) {
    return float(as_type<half>(ushort(p[0]) | (ushort(p[1]) << 8)));
}

static float ub_em_value(device const uchar* row, uint c, uint kind) {
    if (kind == 3) return ((device const float*)row)[c];
    if (kind == 4) return float(((device const half*)row)[c]);
    if (kind == 5) return as_type<float>(uint(((device const ushort*)row)[c]) << 16);
    const uint block_bytes = kind == 0 ? 34u : (kind == 1 ? 18u : 20u);
    device const uchar* blk = row + (c / 32u) * block_bytes;
    const uint j = c % 32u;
    const float d = ub_em_half(blk);
    if (kind == 0) return d * float(as_type<char>(blk[2 + j]));
    const uchar q = blk[(kind == 1 ? 2u : 4u) + (j % 16u)];
    const uint nib = j < 16u ? uint(q & 15u) : uint(q >> 4);
    if (kind == 1) return d * float(int(nib) - 8);
    return d * float(nib) + ub_em_half(blk + 2);
}

template <typename O>
static void ub_embed(device const uchar* table, device const uint* ids, device O* out, uint n,
                     uint cols, uint vocab, uint kind, uint group, uint groups, uint tid,
                     uint threads) {
    const ulong row_bytes = kind == 3 ? ulong(cols) * 4u
                            : kind >= 4 ? ulong(cols) * 2u
                                        : ulong(cols / 32u) * (kind == 0 ? 34u : (kind == 1 ? 18u : 20u));
    for (uint i = group; i < n; i += groups) {
        const uint id = ids[i];
        device O* dst = out + ulong(i) * cols;
        if (id >= vocab) {
            for (uint c = tid; c < cols; c += threads) dst[c] = O(NAN);
            continue;
        }
        device const uchar* row = table + ulong(id) * row_bytes;
        for (uint c = tid; c < cols; c += threads) dst[c] = O(ub_em_value(row, c, kind));
    }
}

#define UB_EMBED(SUFFIX, O)                                                                        \
    kernel void unibuf_embed_##SUFFIX(                                                             \
        device const uchar* table [[buffer(0)]], device const uint* ids [[buffer(1)]],             \
        device O* out [[buffer(2)]], constant uint& n [[buffer(3)]],                               \
        constant uint& cols [[buffer(4)]], constant uint& vocab [[buffer(5)]],                     \
        constant uint& kind [[buffer(6)]], uint group [[threadgroup_position_in_grid]],            \
        uint groups [[threadgroups_per_grid]], uint tid [[thread_position_in_threadgroup]],        \
        uint threads [[threads_per_threadgroup]]) {                                                \
        ub_embed<O>(table, ids, out, n, cols, vocab, kind, group, groups, tid, threads);           \
    }

UB_EMBED(f32, float)
UB_EMBED(f16, half)
// bfloat needs MSL 3.1 (macOS 14): older systems still get the f32 and f16 kernels.
#if __METAL_VERSION__ >= 310
UB_EMBED(bf16, bfloat)
#endif
