// Attention of a Llama-style decoder with grouped-query attention (GQA), over KV caches of
// [capacity, kv_heads, head_dim] rows indexed by position, with positions in device memory so
// that a decode step recorded once (a CUDA graph) serves every position.
//
//   unibuf_rope_kv_append_Q_C   RoPE on query and key at positions[t]; the rotated key and the
//                               value are stored at row positions[t] of the caches.
//   unibuf_attention_Q_C        causal attention, each row's whole key range in one block.
//   unibuf_attention_split_Q_C  the same over `splits` ranges of keys (flash-decoding): each
//                               block leaves its split's maximum score, sum of exp and
//                               unnormalised output in f32 scratch, and the last block of each
//                               group of splits to finish merges them (online softmax) into the
//                               output, so that a split attention is one launch.
//
// Q is the dtype of query, key, value and output, C that of the caches (each f32, f16 or bf16);
// arithmetic is f32 and each value is rounded once when stored. Positions are device data and a
// kernel cannot report an error, so a position >= capacity never reads or writes out of bounds:
// rope_kv_append skips that row's cache write (query_out is still written), attention writes a
// row of NaN.
//
// Each (Q, C) pair is compiled from this source with UB_AT_PAIR set to its index (3 * Q + C, in
// the order f32, f16, bf16), so that NVRTC compiles that pair's kernels only, not all 27.

#define UB_AT_WARPS 8          // warps per block of the attention kernels (256 threads)
#define UB_AT_THREADS 256
#define UB_AT_KEYS 4           // keys a warp takes per step
#define UB_AT_GROUP 4          // query heads (of one kv head) per block
#define UB_AT_MIN_CHUNK 32     // keys a split takes at least: one step of the block
#define UB_AT_MAX_DIM 256
#define UB_AT_MAX_SPLITS 128
#define UB_AT_LOG2E 1.4426950408889634f

__device__ __forceinline__ float ub_at_neg_inf() { return __int_as_float(0xff800000); }
__device__ __forceinline__ float ub_at_nan() { return __int_as_float(0x7fc00000); }
__device__ __forceinline__ unsigned int ub_at_min(unsigned int a, unsigned int b) {
    return a < b ? a : b;
}

// ---------------------------------------------------------------------------------------------
// RoPE + KV append. One thread per (token, pair), grid-stride, looping over the heads as
// rope.cu does, with the arithmetic of rope.cu term for term (the f32 inverse frequency, the f32
// angle, sincosf, the rotation), so query_out equals ops::rope of the query.

template <typename Q, typename C>
__device__ __forceinline__ void ub_rope_kv_append(
    const Q* query, const Q* key, const Q* value, const unsigned int* positions, Q* query_out,
    C* k_cache, C* v_cache, unsigned int tokens, unsigned int heads, unsigned int kv_heads,
    unsigned int head_dim, unsigned int capacity, float theta, unsigned int style) {
    const unsigned int half_dim = head_dim / 2;
    const ub_u64 total = (ub_u64)tokens * half_dim;
    const ub_u64 stride = (ub_u64)gridDim.x * blockDim.x;
    for (ub_u64 p = (ub_u64)blockIdx.x * blockDim.x + threadIdx.x; p < total; p += stride) {
        const unsigned int i = (unsigned int)(p % half_dim);
        const unsigned int token = (unsigned int)(p / half_dim);
        const unsigned int pos = positions[token];
        const float inv_freq = powf(theta, -((float)(2 * i) / (float)head_dim));
        const float angle = (float)pos * inv_freq;
        float s, c;
        sincosf(angle, &s, &c);
        const unsigned int off = style == 0 ? i : 2 * i;
        const unsigned int partner = style == 0 ? half_dim : 1;
        const ub_u64 q_first = (ub_u64)token * heads * head_dim + off;
        for (unsigned int h = 0; h < heads; ++h) {
            const ub_u64 a = q_first + (ub_u64)h * head_dim;
            const float xa = ub_to_f32(query[a]), xb = ub_to_f32(query[a + partner]);
            query_out[a] = ub_from_f32<Q>(xa * c - xb * s);
            query_out[a + partner] = ub_from_f32<Q>(xb * c + xa * s);
        }
        // A position past the cache: nothing is stored (the attention of that row gives NaN).
        if (pos >= capacity) continue;
        const ub_u64 src_first = (ub_u64)token * kv_heads * head_dim + off;
        const ub_u64 dst_first = (ub_u64)pos * kv_heads * head_dim + off;
        for (unsigned int h = 0; h < kv_heads; ++h) {
            const ub_u64 src = src_first + (ub_u64)h * head_dim;
            const ub_u64 dst = dst_first + (ub_u64)h * head_dim;
            const float ka = ub_to_f32(key[src]), kb = ub_to_f32(key[src + partner]);
            k_cache[dst] = ub_from_f32<C>(ka * c - kb * s);
            k_cache[dst + partner] = ub_from_f32<C>(kb * c + ka * s);
            v_cache[dst] = ub_from_f32<C>(ub_to_f32(value[src]));
            v_cache[dst + partner] = ub_from_f32<C>(ub_to_f32(value[src + partner]));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Attention. A block takes one work item (token t, kv head, chunk of up to UB_AT_GROUP of the
// query heads sharing that kv head, split s), grid-stride over the items, so the K/V rows it
// reads serve every head of the chunk. Query row t attends to cache rows 0..=positions[t]; split
// s of `splits` takes the keys [s * chunk, (s + 1) * chunk) of them, chunk =
// max(ceil(len / splits), UB_AT_MIN_CHUNK): the splits follow the row's actual length, which
// only the device knows.
//
// Within a block, warp w takes UB_AT_KEYS consecutive keys per step (the block UB_AT_WARPS *
// UB_AT_KEYS), lane l holding elements l, l + 32, ... of a head (E = head_dim / 32 rounded up
// to 1, 2, 4 or 8), so that each load of a warp reads 32 consecutive elements of a row. The
// warp sums its lanes' products with shuffles (UB_AT_GROUP * UB_AT_KEYS sums interleaved) and
// keeps an online softmax per head: the running maximum m of the scores (in log2 units: the
// query is scaled by scale * log2(e), so exp2 serves), the sum l of 2^(score - m) and the
// unnormalised output. The warps are merged through shared memory at the end of the item.

__device__ __forceinline__ void ub_at_range(unsigned int len, unsigned int splits,
                                            unsigned int s, unsigned int* begin,
                                            unsigned int* end) {
    ub_u64 chunk = ((ub_u64)len + splits - 1) / splits;
    if (chunk < UB_AT_MIN_CHUNK) chunk = UB_AT_MIN_CHUNK;
    const ub_u64 b = (ub_u64)s * chunk;
    const ub_u64 e = b + chunk;
    *begin = (unsigned int)(b < len ? b : len);
    *end = (unsigned int)(e < len ? e : len);
}

// The last block of a group merges its splits (SPLIT true, below): per head g of the group,
// the maximum M of the splits' maxima m_s, the weights w_s = 2^(m_s - M) (0 for an empty split,
// whose partial is not read) and L = sum_s w_s l_s, then out = sum_s w_s o_s / L, the warps
// taking the splits in turn (lane l holding elements l, l + 32, ... of each head) and their sums
// added through shared memory. The partials are read through volatile pointers, which bypass
// the (incoherent) L1: a line of them may be cached there from an earlier group's merge on
// this SM. `valid` and `ng` are the same for the whole block.
template <typename Q, int E>
__device__ __forceinline__ void ub_at_merge_splits(
    const float* part_o, const float* part_ml, Q* out, ub_u64 head_row0, unsigned int ng,
    unsigned int head_dim, unsigned int splits, bool valid, unsigned int lane,
    unsigned int warp, unsigned int warps, float* sh_w, float* sh_ll, float* sh_o) {
    if (!valid) {  // a position past the cache: the rows are NaN, no partial is read
        for (unsigned int idx = threadIdx.x; idx < ng * head_dim; idx += blockDim.x)
            out[head_row0 * head_dim + idx] = ub_from_f32<Q>(ub_at_nan());
        return;
    }
    const volatile float* ml = part_ml;
    const volatile float* po = part_o;
    // Warp g: head g's maximum, weights and weighted sum of l.
    for (unsigned int g = warp; g < ng; g += warps) {
        const ub_u64 base = (head_row0 + g) * splits;
        float mx = ub_at_neg_inf();
        for (unsigned int s = lane; s < splits; s += 32u) mx = fmaxf(mx, ml[(base + s) * 2]);
        const float mm = ub_warp_max(mx);
        float lw = 0.0f;
        for (unsigned int s = lane; s < splits; s += 32u) {
            const float ms = ml[(base + s) * 2];
            const float w = ms != ub_at_neg_inf() ? exp2f(ms - mm) : 0.0f;
            sh_w[g * splits + s] = w;
            lw += w * ml[(base + s) * 2 + 1];
        }
        lw = ub_warp_sum(lw);
        if (lane == 0) sh_ll[g] = lw;
    }
    __syncthreads();
    float acc[UB_AT_GROUP][E];
#pragma unroll
    for (int g = 0; g < UB_AT_GROUP; ++g) {
#pragma unroll
        for (int j = 0; j < E; ++j) acc[g][j] = 0.0f;
    }
    if (warp < warps) {
#pragma unroll 2
        for (unsigned int s = warp; s < splits; s += warps) {
#pragma unroll
            for (int g = 0; g < UB_AT_GROUP; ++g) {
                if ((unsigned int)g >= ng) continue;
                const float w = sh_w[g * splits + s];
                if (w == 0.0f) continue;  // an empty split: its partial is not read
                const volatile float* ps = po + ((head_row0 + g) * splits + s) * head_dim;
#pragma unroll
                for (int j = 0; j < E; ++j) {
                    const unsigned int d = (unsigned int)j * 32u + lane;
                    if (d < head_dim) acc[g][j] += w * ps[d];
                }
            }
        }
#pragma unroll
        for (int g = 0; g < UB_AT_GROUP; ++g) {
#pragma unroll
            for (int j = 0; j < E; ++j) {
                const unsigned int d = (unsigned int)j * 32u + lane;
                if ((unsigned int)g < ng && d < head_dim)
                    sh_o[(warp * UB_AT_GROUP + g) * head_dim + d] = acc[g][j];
            }
        }
    }
    __syncthreads();
    for (unsigned int idx = threadIdx.x; idx < ng * head_dim; idx += blockDim.x) {
        const unsigned int g = idx / head_dim;
        const unsigned int d = idx - g * head_dim;
        float o = 0.0f;
        for (unsigned int w = 0; w < warps; ++w) o += sh_o[(w * UB_AT_GROUP + g) * head_dim + d];
        out[(head_row0 + g) * head_dim + d] = ub_from_f32<Q>(o / sh_ll[g]);
    }
}

// SPLIT false: writes `out` (splits is 1). SPLIT true: writes the partials of each (row, split):
// part_o[((t * heads + h) * splits + s) * head_dim + d] (unnormalised output) and
// part_ml[((t * heads + h) * splits + s) * 2 + {0, 1}] (maximum score in log2 units, sum of
// 2^(score - maximum)); an empty split, or a row whose position is past the cache, leaves
// (-inf, 0) and zeros. Then the split counts itself in on its group's counter (the group: the
// item without its split, tk * chunks + hc), and the block that counts the last of the group's
// `splits` merges them all into `out` and sets the counter back to 0 for the next launch.
// This is the "last block" pattern of the threadFenceReduction sample: every thread fences its
// partial stores before the block's barrier, thread 0's atomicAdd then publishes them, and the
// last block fences after its atomicAdd before reading the others' partials. No block waits
// for another, so the blocks may run in any order, any number at a time.
template <typename Q, typename C, int E, bool SPLIT>
__device__ __forceinline__ void ub_attention_items(
    const Q* query, const C* k_cache, const C* v_cache, const unsigned int* positions, Q* out,
    float* part_o, float* part_ml, unsigned int* counters, unsigned int tokens,
    unsigned int heads, unsigned int kv_heads, unsigned int head_dim, unsigned int capacity,
    float scale, unsigned int splits, float* sh_m, float* sh_l, float* sh_o, float* sh_w,
    float* sh_ll, unsigned int* sh_last) {
    const unsigned int lane = threadIdx.x & 31u;
    const unsigned int warp = threadIdx.x >> 5;
    // The shared arrays hold UB_AT_WARPS warps; warps past them (a bigger block) stay idle.
    const unsigned int warps = ub_at_min(blockDim.x >> 5, UB_AT_WARPS);
    const bool active = warp < warps;
    const unsigned int group = heads / kv_heads;
    const unsigned int chunks = (group + UB_AT_GROUP - 1) / UB_AT_GROUP;
    const ub_u64 row_stride = (ub_u64)kv_heads * head_dim;
    const ub_u64 items = (ub_u64)tokens * kv_heads * chunks * splits;
    const float qscale = scale * UB_AT_LOG2E;
    for (ub_u64 item = blockIdx.x; item < items; item += gridDim.x) {
        const unsigned int s = (unsigned int)(item % splits);
        const ub_u64 row = item / splits;
        const unsigned int hc = (unsigned int)(row % chunks);
        const ub_u64 tk = row / chunks;
        const unsigned int kvh = (unsigned int)(tk % kv_heads);
        const unsigned int t = (unsigned int)(tk / kv_heads);
        const unsigned int h0 = kvh * group + hc * UB_AT_GROUP;
        const unsigned int ng = ub_at_min(UB_AT_GROUP, group - hc * UB_AT_GROUP);
        const unsigned int pos = positions[t];
        const bool valid = pos < capacity;
        unsigned int begin = 0, end = 0;
        if (valid) ub_at_range(pos + 1u, splits, s, &begin, &end);
        const ub_u64 head_row0 = (ub_u64)t * heads + h0;

        float qv[UB_AT_GROUP][E];
        float m[UB_AT_GROUP], l[UB_AT_GROUP], acc[UB_AT_GROUP][E];
#pragma unroll
        for (int g = 0; g < UB_AT_GROUP; ++g) {
            m[g] = ub_at_neg_inf();
            l[g] = 0.0f;
#pragma unroll
            for (int j = 0; j < E; ++j) {
                const unsigned int d = (unsigned int)j * 32u + lane;
                acc[g][j] = 0.0f;
                qv[g][j] = ((unsigned int)g < ng && d < head_dim)
                               ? ub_to_f32(query[(head_row0 + g) * head_dim + d]) * qscale
                               : 0.0f;
            }
        }

        const C* kb = k_cache + (ub_u64)kvh * head_dim;
        const C* vb = v_cache + (ub_u64)kvh * head_dim;
        const unsigned int step = warps * UB_AT_KEYS;
        for (unsigned int k0 = begin + warp * UB_AT_KEYS; active && k0 < end; k0 += step) {
            const unsigned int left = end - k0;  // keys k0 .. k0 + left - 1 remain
            float kr[UB_AT_KEYS][E], vr[UB_AT_KEYS][E];
#pragma unroll
            for (int i = 0; i < UB_AT_KEYS; ++i) {
                const bool ok = (unsigned int)i < left;
                const ub_u64 at = (ub_u64)(k0 + (ok ? (unsigned int)i : 0u)) * row_stride;
#pragma unroll
                for (int j = 0; j < E; ++j) {
                    const unsigned int d = (unsigned int)j * 32u + lane;
                    const bool in = ok && d < head_dim;
                    kr[i][j] = in ? ub_to_f32(kb[at + d]) : 0.0f;
                    vr[i][j] = in ? ub_to_f32(vb[at + d]) : 0.0f;
                }
            }
            float sc[UB_AT_GROUP][UB_AT_KEYS];
#pragma unroll
            for (int g = 0; g < UB_AT_GROUP; ++g) {
#pragma unroll
                for (int i = 0; i < UB_AT_KEYS; ++i) {
                    float dot = 0.0f;
#pragma unroll
                    for (int j = 0; j < E; ++j) dot += qv[g][j] * kr[i][j];
                    sc[g][i] = dot;
                }
            }
            // Sum over the warp; every lane gets each score. `ng` is the same for the whole
            // warp, so the shuffles run on all 32 lanes.
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) {
#pragma unroll
                for (int g = 0; g < UB_AT_GROUP; ++g) {
                    if ((unsigned int)g < ng) {
#pragma unroll
                        for (int i = 0; i < UB_AT_KEYS; ++i)
                            sc[g][i] += __shfl_xor_sync(0xffffffffu, sc[g][i], o);
                    }
                }
            }
#pragma unroll
            for (int g = 0; g < UB_AT_GROUP; ++g) {
                if ((unsigned int)g >= ng) continue;
                float mx = ub_at_neg_inf();
#pragma unroll
                for (int i = 0; i < UB_AT_KEYS; ++i)
                    if ((unsigned int)i < left) mx = fmaxf(mx, sc[g][i]);
                const float mn = fmaxf(m[g], mx);
                const float corr = exp2f(m[g] - mn);  // 0 while m is -inf
                float p[UB_AT_KEYS];
                float psum = 0.0f;
#pragma unroll
                for (int i = 0; i < UB_AT_KEYS; ++i) {
                    p[i] = (unsigned int)i < left ? exp2f(sc[g][i] - mn) : 0.0f;
                    psum += p[i];
                }
#pragma unroll
                for (int j = 0; j < E; ++j) {
                    float a = acc[g][j] * corr;
#pragma unroll
                    for (int i = 0; i < UB_AT_KEYS; ++i) a += p[i] * vr[i][j];
                    acc[g][j] = a;
                }
                l[g] = l[g] * corr + psum;
                m[g] = mn;
            }
        }

        // Merge the warps: each thread takes (head, element) pairs of the chunk.
        if (active) {
            if (lane == 0) {
#pragma unroll
                for (int g = 0; g < UB_AT_GROUP; ++g) {
                    sh_m[warp * UB_AT_GROUP + g] = m[g];
                    sh_l[warp * UB_AT_GROUP + g] = l[g];
                }
            }
#pragma unroll
            for (int g = 0; g < UB_AT_GROUP; ++g) {
#pragma unroll
                for (int j = 0; j < E; ++j) {
                    const unsigned int d = (unsigned int)j * 32u + lane;
                    if ((unsigned int)g < ng && d < head_dim)
                        sh_o[(warp * UB_AT_GROUP + g) * head_dim + d] = acc[g][j];
                }
            }
        }
        __syncthreads();
        for (unsigned int idx = threadIdx.x; idx < ng * head_dim; idx += blockDim.x) {
            const unsigned int g = idx / head_dim;
            const unsigned int d = idx - g * head_dim;
            float mm = ub_at_neg_inf();
            for (unsigned int w = 0; w < warps; ++w) mm = fmaxf(mm, sh_m[w * UB_AT_GROUP + g]);
            float ll = 0.0f, o = 0.0f;
            for (unsigned int w = 0; w < warps; ++w) {
                const float mw = sh_m[w * UB_AT_GROUP + g];
                if (mw != ub_at_neg_inf()) {
                    const float wt = exp2f(mw - mm);
                    ll += sh_l[w * UB_AT_GROUP + g] * wt;
                    o += sh_o[(w * UB_AT_GROUP + g) * head_dim + d] * wt;
                }
            }
            if (SPLIT) {
                const ub_u64 pi = (head_row0 + g) * splits + s;
                part_o[pi * head_dim + d] = o;
                if (d == 0) {
                    part_ml[pi * 2] = mm;
                    part_ml[pi * 2 + 1] = ll;
                }
            } else {
                out[(head_row0 + g) * head_dim + d] = ub_from_f32<Q>(valid ? o / ll : ub_at_nan());
            }
        }
        if (SPLIT) {
            // Publish this split's partials (every thread fences its own stores; the barrier
            // also ends the reads of sh_o above), then count the split in.
            __threadfence();
            __syncthreads();
            if (threadIdx.x == 0) {
                const unsigned int arrived = atomicAdd(counters + row, 1u);
                const unsigned int last = arrived == splits - 1u ? 1u : 0u;
                if (last) {
                    // Every split of the group has arrived: nothing else touches the counter in
                    // this launch, and the next launch (a graph replay) starts from 0.
                    atomicExch(counters + row, 0u);
                    __threadfence();  // the others' partials are read after their arrivals
                }
                *sh_last = last;
            }
            __syncthreads();
            if (*sh_last)
                ub_at_merge_splits<Q, E>(part_o, part_ml, out, head_row0, ng, head_dim, splits,
                                         valid, lane, warp, warps, sh_w, sh_ll, sh_o);
        }
        __syncthreads();  // the next item reuses the shared arrays
    }
}

template <typename Q, typename C, bool SPLIT>
__device__ __forceinline__ void ub_attention(
    const Q* query, const C* k_cache, const C* v_cache, const unsigned int* positions, Q* out,
    float* part_o, float* part_ml, unsigned int* counters, unsigned int tokens,
    unsigned int heads, unsigned int kv_heads, unsigned int head_dim, unsigned int capacity,
    float scale, unsigned int splits, float* sh_m, float* sh_l, float* sh_o, float* sh_w,
    float* sh_ll, unsigned int* sh_last) {
    // The op refuses these; a direct launch with them does nothing rather than fault.
    if (head_dim == 0 || head_dim > UB_AT_MAX_DIM || kv_heads == 0 || heads < kv_heads ||
        splits == 0 || (SPLIT && splits > UB_AT_MAX_SPLITS))
        return;
    if (head_dim <= 32)
        ub_attention_items<Q, C, 1, SPLIT>(query, k_cache, v_cache, positions, out, part_o,
                                           part_ml, counters, tokens, heads, kv_heads, head_dim,
                                           capacity, scale, splits, sh_m, sh_l, sh_o, sh_w,
                                           sh_ll, sh_last);
    else if (head_dim <= 64)
        ub_attention_items<Q, C, 2, SPLIT>(query, k_cache, v_cache, positions, out, part_o,
                                           part_ml, counters, tokens, heads, kv_heads, head_dim,
                                           capacity, scale, splits, sh_m, sh_l, sh_o, sh_w,
                                           sh_ll, sh_last);
    else if (head_dim <= 128)
        ub_attention_items<Q, C, 4, SPLIT>(query, k_cache, v_cache, positions, out, part_o,
                                           part_ml, counters, tokens, heads, kv_heads, head_dim,
                                           capacity, scale, splits, sh_m, sh_l, sh_o, sh_w,
                                           sh_ll, sh_last);
    else
        ub_attention_items<Q, C, 8, SPLIT>(query, k_cache, v_cache, positions, out, part_o,
                                           part_ml, counters, tokens, heads, kv_heads, head_dim,
                                           capacity, scale, splits, sh_m, sh_l, sh_o, sh_w,
                                           sh_ll, sh_last);
}

// ---------------------------------------------------------------------------------------------
// Entry points.

#define UB_AT_PAIR_KERNELS(QS, Q, CS, C)                                                         \
    extern "C" __global__ void unibuf_rope_kv_append_##QS##_##CS(                                \
        const Q* query, const Q* key, const Q* value, const unsigned int* positions,             \
        Q* query_out, C* k_cache, C* v_cache, unsigned int tokens, unsigned int heads,           \
        unsigned int kv_heads, unsigned int head_dim, unsigned int capacity, float theta,        \
        unsigned int style) {                                                                    \
        ub_rope_kv_append<Q, C>(query, key, value, positions, query_out, k_cache, v_cache,       \
                                tokens, heads, kv_heads, head_dim, capacity, theta, style);      \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(UB_AT_THREADS) unibuf_attention_##QS##_##CS(    \
        const Q* query, const C* k_cache, const C* v_cache, const unsigned int* positions,       \
        Q* out, unsigned int tokens, unsigned int heads, unsigned int kv_heads,                  \
        unsigned int head_dim, unsigned int capacity, float scale) {                             \
        __shared__ float sh_m[UB_AT_WARPS * UB_AT_GROUP];                                        \
        __shared__ float sh_l[UB_AT_WARPS * UB_AT_GROUP];                                        \
        __shared__ float sh_o[UB_AT_WARPS * UB_AT_GROUP * UB_AT_MAX_DIM];                        \
        ub_attention<Q, C, false>(query, k_cache, v_cache, positions, out, nullptr, nullptr,     \
                                  nullptr, tokens, heads, kv_heads, head_dim, capacity, scale,   \
                                  1u, sh_m, sh_l, sh_o, nullptr, nullptr, nullptr);              \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(UB_AT_THREADS)                                  \
        unibuf_attention_split_##QS##_##CS(                                                      \
            const Q* query, const C* k_cache, const C* v_cache, const unsigned int* positions,   \
            Q* out, float* part_o, float* part_ml, unsigned int* counters, unsigned int tokens,  \
            unsigned int heads, unsigned int kv_heads, unsigned int head_dim,                    \
            unsigned int capacity, float scale, unsigned int splits) {                           \
        __shared__ float sh_m[UB_AT_WARPS * UB_AT_GROUP];                                        \
        __shared__ float sh_l[UB_AT_WARPS * UB_AT_GROUP];                                        \
        __shared__ float sh_o[UB_AT_WARPS * UB_AT_GROUP * UB_AT_MAX_DIM];                        \
        __shared__ float sh_w[UB_AT_GROUP * UB_AT_MAX_SPLITS];                                   \
        __shared__ float sh_ll[UB_AT_GROUP];                                                     \
        __shared__ unsigned int sh_last;                                                         \
        ub_attention<Q, C, true>(query, k_cache, v_cache, positions, out, part_o, part_ml,       \
                                 counters, tokens, heads, kv_heads, head_dim, capacity, scale,   \
                                 splits, sh_m, sh_l, sh_o, sh_w, sh_ll, &sh_last);               \
    }

// The pair (Q, C) has index 3 * Q + C.
#if !defined(UB_AT_PAIR) || UB_AT_PAIR == 0
UB_AT_PAIR_KERNELS(f32, float, f32, float)
#endif
#if !defined(UB_AT_PAIR) || UB_AT_PAIR == 1
UB_AT_PAIR_KERNELS(f32, float, f16, ub_f16)
#endif
#if !defined(UB_AT_PAIR) || UB_AT_PAIR == 2
UB_AT_PAIR_KERNELS(f32, float, bf16, ub_bf16)
#endif
#if !defined(UB_AT_PAIR) || UB_AT_PAIR == 3
UB_AT_PAIR_KERNELS(f16, ub_f16, f32, float)
#endif
#if !defined(UB_AT_PAIR) || UB_AT_PAIR == 4
UB_AT_PAIR_KERNELS(f16, ub_f16, f16, ub_f16)
#endif
#if !defined(UB_AT_PAIR) || UB_AT_PAIR == 5
UB_AT_PAIR_KERNELS(f16, ub_f16, bf16, ub_bf16)
#endif
#if !defined(UB_AT_PAIR) || UB_AT_PAIR == 6
UB_AT_PAIR_KERNELS(bf16, ub_bf16, f32, float)
#endif
#if !defined(UB_AT_PAIR) || UB_AT_PAIR == 7
UB_AT_PAIR_KERNELS(bf16, ub_bf16, f16, ub_f16)
#endif
#if !defined(UB_AT_PAIR) || UB_AT_PAIR == 8
UB_AT_PAIR_KERNELS(bf16, ub_bf16, bf16, ub_bf16)
#endif
