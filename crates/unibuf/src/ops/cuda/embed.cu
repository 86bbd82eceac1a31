// Embedding rows: out[i, :] = table[ids[i], :], dequantised or converted to the output dtype.
// The table is bytes of `kind`: 0 Q8_0, 1 Q4_0, 2 Q4_1 (ggml blocks of 32, layouts as in
// ggml_matvec.cu), 3 f32, 4 f16, 5 bf16, row after row. One block of the launch per output row
// (grid-strided), its threads over the columns. An id at or past `vocab` gives a row of NaN:
// the kernel cannot report an error, and NaN makes the bad id visible downstream.

__device__ __forceinline__ float ub_em_half(const unsigned char* p) {
    ub_f16 h;
    h.bits = (unsigned short)p[0] | ((unsigned short)p[1] << 8);
    return ub_to_f32(h);
}

__device__ __forceinline__ float ub_em_value(const unsigned char* row, unsigned int c,
                                             unsigned int kind) {
    if (kind >= 3) {
        if (kind == 3) return reinterpret_cast<const float*>(row)[c];
        const unsigned short bits = reinterpret_cast<const unsigned short*>(row)[c];
        if (kind == 4) {
            ub_f16 h;
            h.bits = bits;
            return ub_to_f32(h);
        }
        ub_bf16 b;
        b.bits = bits;
        return ub_to_f32(b);
    }
    const unsigned int block_bytes = kind == 0 ? 34u : (kind == 1 ? 18u : 20u);
    const unsigned char* blk = row + (c / 32u) * block_bytes;
    const unsigned int j = c % 32u;
    const float d = ub_em_half(blk);
    if (kind == 0) return d * (float)reinterpret_cast<const signed char*>(blk + 2)[j];
    const unsigned char q = blk[(kind == 1 ? 2u : 4u) + (j % 16u)];
    const unsigned int nib = j < 16u ? (q & 15u) : (q >> 4);
    if (kind == 1) return d * (float)((int)nib - 8);
    return d * (float)nib + ub_em_half(blk + 2);
}

template <typename O>
__device__ __forceinline__ void ub_embed(const unsigned char* table, const unsigned int* ids,
                                         O* out, unsigned int n, unsigned int cols,
                                         unsigned int vocab, unsigned int kind) {
    const ub_u64 row_bytes = kind == 3   ? (ub_u64)cols * 4u
                             : kind >= 4 ? (ub_u64)cols * 2u
                                         : (ub_u64)(cols / 32u) * (kind == 0 ? 34u : (kind == 1 ? 18u : 20u));
    for (unsigned int i = blockIdx.x; i < n; i += gridDim.x) {
        const unsigned int id = ids[i];
        O* dst = out + (ub_u64)i * cols;
        if (id >= vocab) {
            for (unsigned int c = threadIdx.x; c < cols; c += blockDim.x)
                dst[c] = ub_from_f32<O>(__int_as_float(0x7fc00000));
            continue;
        }
        const unsigned char* row = table + (ub_u64)id * row_bytes;
        for (unsigned int c = threadIdx.x; c < cols; c += blockDim.x)
            dst[c] = ub_from_f32<O>(ub_em_value(row, c, kind));
    }
}

#define UB_EMBED_KERNEL(SUFFIX, O)                                                               \
    extern "C" __global__ void unibuf_embed_##SUFFIX(const unsigned char* table,                 \
                                                     const unsigned int* ids, O* out,            \
                                                     unsigned int n, unsigned int cols,          \
                                                     unsigned int vocab, unsigned int kind) {    \
        ub_embed<O>(table, ids, out, n, cols, vocab, kind);                                      \
    }

UB_EMBED_KERNEL(f32, float)
UB_EMBED_KERNEL(f16, ub_f16)
UB_EMBED_KERNEL(bf16, ub_bf16)
