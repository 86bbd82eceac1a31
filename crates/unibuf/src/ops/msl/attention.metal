#include <metal_stdlib>
using namespace metal;

// Attention of a Llama-style decoder with grouped-query attention over KV caches
// [capacity, kv_heads, head_dim], mirroring cuda/attention.cu (see there for the layouts):
//
//   unibuf_rope_kv_append_Q_C   RoPE on query and key, key and value stored at row positions[t]
//   unibuf_attention_Q_C        causal attention, each row's keys in one threadgroup
//   unibuf_attention_split_Q_C  the same over `splits` ranges of keys, leaving f32 partials that
//                               the last threadgroup of each group of splits merges (online
//                               softmax) into the output: one dispatch
//
// A position >= capacity never reads or writes out of bounds: the append skips that row's
// cache write, attention writes a row of NaN. Storage is float, half or bfloat; arithmetic is
// float (the library compiles with fast math off, so -INFINITY and NaN behave as in IEEE).
// Each (Q, C) pair is compiled with UB_AT_PAIR set to its index, 3 * Q + C.
//
// The SIMD-group is taken to be 32 wide (Apple GPUs): lane l holds elements l, l + width, ...
// of a head, at most 8 of them, so head_dim <= 8 * width.

#define UB_AT_SIMDS 8        // SIMD-groups per threadgroup that take part (256 threads)
#define UB_AT_KEYS 4         // keys a SIMD-group takes per step
#define UB_AT_GROUP 4        // query heads (of one kv head) per threadgroup
#define UB_AT_MIN_CHUNK 32   // keys a split takes at least
#define UB_AT_MAX_DIM 256
#define UB_AT_MAX_SPLITS 128
#define UB_AT_LOG2E 1.4426950408889634f

// Merging the splits in the dispatch that computes them needs the partials one threadgroup
// writes to be visible to another within the dispatch: coherent(device) memory and
// device-scope fences, which MSL 3.2 (macOS 15) introduced. Before it, the split kernel falls
// back to attending to each row's whole key range in split 0 (correct, one dispatch, but no
// faster than the unsplit kernel).
#if __METAL_VERSION__ >= 320
#define UB_AT_FUSED 1
#define UB_AT_PARTIAL coherent(device) device float*
#else
#define UB_AT_FUSED 0
#define UB_AT_PARTIAL device float*
#endif

// ---------------------------------------------------------------------------------------------
// RoPE + KV append: one thread per (token, pair), looping over the heads, with the arithmetic
// of rope.metal term for term (precise pow, sin and cos), so query_out equals ops::rope.

template <typename Q, typename C>
static void ub_rope_kv_append(device const Q* query, device const Q* key, device const Q* value,
                              device const uint* positions, device Q* query_out,
                              device C* k_cache, device C* v_cache, uint tokens, uint heads,
                              uint kv_heads, uint head_dim, uint capacity, float theta,
                              uint style, ulong first, ulong stride) {
    const uint half_dim = head_dim / 2;
    const ulong total = ulong(tokens) * half_dim;
    for (ulong p = first; p < total; p += stride) {
        const uint i = uint(p % half_dim);
        const uint token = uint(p / half_dim);
        const uint pos = positions[token];
        const float inv_freq = precise::pow(theta, -(float(2 * i) / float(head_dim)));
        const float angle = float(pos) * inv_freq;
        const float s = precise::sin(angle);
        const float c = precise::cos(angle);
        const uint off = style == 0 ? i : 2 * i;
        const uint partner = style == 0 ? half_dim : 1;
        const ulong q_first = ulong(token) * heads * head_dim + off;
        for (uint h = 0; h < heads; ++h) {
            const ulong a = q_first + ulong(h) * head_dim;
            const float xa = float(query[a]);
            const float xb = float(query[a + partner]);
            query_out[a] = Q(xa * c - xb * s);
            query_out[a + partner] = Q(xb * c + xa * s);
        }
        if (pos >= capacity) {
            continue;  // past the cache: nothing stored
        }
        const ulong src_first = ulong(token) * kv_heads * head_dim + off;
        const ulong dst_first = ulong(pos) * kv_heads * head_dim + off;
        for (uint h = 0; h < kv_heads; ++h) {
            const ulong src = src_first + ulong(h) * head_dim;
            const ulong dst = dst_first + ulong(h) * head_dim;
            const float ka = float(key[src]);
            const float kb = float(key[src + partner]);
            k_cache[dst] = C(ka * c - kb * s);
            k_cache[dst + partner] = C(kb * c + ka * s);
            v_cache[dst] = C(float(value[src]));
            v_cache[dst + partner] = C(float(value[src + partner]));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Attention: a threadgroup per work item (token, kv head, chunk of up to UB_AT_GROUP query
// heads, split), SIMD-group per UB_AT_KEYS keys per step, scores summed with simd_sum, an
// online softmax per SIMD-group and head (scores in log2 units), then the SIMD-groups merged.
// Threadgroup memory is 32 KB on Apple GPUs, so the merge adds the SIMD-groups' outputs into
// one [UB_AT_GROUP, head_dim] array in turn rather than keeping all of them.

// [begin, end) of split s of `splits` for a row of `len` keys (as cuda/attention.cu).
static uint2 ub_at_range(uint len, uint splits, uint s) {
    ulong chunk = (ulong(len) + splits - 1) / splits;
    if (chunk < UB_AT_MIN_CHUNK) {
        chunk = UB_AT_MIN_CHUNK;
    }
    const ulong b = ulong(s) * chunk;
    const ulong e = b + chunk;
    return uint2(uint(b < ulong(len) ? b : ulong(len)), uint(e < ulong(len) ? e : ulong(len)));
}

#if UB_AT_FUSED
// The last threadgroup of a group merges its splits (as cuda/attention.cu): per head g, the
// maximum M of the splits' maxima, the weights 2^(m_s - M) (0 for an empty split, whose partial
// is not read) and L = sum_s w_s l_s, then out = sum_s w_s o_s / L, the SIMD-groups taking the
// splits in turn and adding their sums into one [UB_AT_GROUP, head_dim] array in turn. The
// partials are read through coherent(device) pointers, after the device-scope fences that pair
// with the other threadgroups' through the counter. `valid` and `ng` are the same for the whole
// threadgroup.
template <typename Q, int E>
static void ub_at_merge_splits(UB_AT_PARTIAL part_o, UB_AT_PARTIAL part_ml, device Q* out,
                               ulong head_row0, uint ng, uint head_dim, uint splits, bool valid,
                               threadgroup float* sh_w, threadgroup float* sh_ll,
                               threadgroup float* sh_o, uint tid, uint threads, uint lane,
                               uint simd, uint simds, uint width) {
    if (!valid) {  // a position past the cache: the rows are NaN, no partial is read
        for (uint idx = tid; idx < ng * head_dim; idx += threads) {
            out[head_row0 * head_dim + idx] = Q(NAN);
        }
        return;
    }
    // SIMD-group g: head g's maximum, weights and weighted sum of l.
    for (uint g = simd; g < ng; g += simds) {
        const ulong base = (head_row0 + g) * splits;
        float mx = -INFINITY;
        for (uint s = lane; s < splits; s += width) {
            mx = fmax(mx, part_ml[(base + s) * 2]);
        }
        const float mm = simd_max(mx);
        float lw = 0.0f;
        for (uint s = lane; s < splits; s += width) {
            const float ms = part_ml[(base + s) * 2];
            const float w = ms != -INFINITY ? exp2(ms - mm) : 0.0f;
            sh_w[g * splits + s] = w;
            lw += w * part_ml[(base + s) * 2 + 1];
        }
        lw = simd_sum(lw);
        if (lane == 0) {
            sh_ll[g] = lw;
        }
    }
    for (uint idx = tid; idx < UB_AT_GROUP * head_dim; idx += threads) {
        sh_o[idx] = 0.0f;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    float acc[UB_AT_GROUP][E];
    for (uint g = 0; g < UB_AT_GROUP; ++g) {
        for (uint j = 0; j < uint(E); ++j) {
            acc[g][j] = 0.0f;
        }
    }
    if (simd < simds) {
        for (uint s = simd; s < splits; s += simds) {
            for (uint g = 0; g < UB_AT_GROUP; ++g) {
                if (g >= ng) {
                    continue;
                }
                const float w = sh_w[g * splits + s];
                if (w == 0.0f) {
                    continue;  // an empty split: its partial is not read
                }
                const ulong at = ((head_row0 + g) * splits + s) * head_dim;
                for (uint j = 0; j < uint(E); ++j) {
                    const uint d = j * width + lane;
                    if (d < head_dim) {
                        acc[g][j] += w * part_o[at + d];
                    }
                }
            }
        }
    }
    for (uint w = 0; w < simds; ++w) {
        if (simd == w) {
            for (uint g = 0; g < UB_AT_GROUP; ++g) {
                if (g >= ng) {
                    continue;
                }
                for (uint j = 0; j < uint(E); ++j) {
                    const uint d = j * width + lane;
                    if (d < head_dim) {
                        sh_o[g * head_dim + d] += acc[g][j];
                    }
                }
            }
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    for (uint idx = tid; idx < ng * head_dim; idx += threads) {
        const uint g = idx / head_dim;
        const uint d = idx - g * head_dim;
        out[(head_row0 + g) * head_dim + d] = Q(sh_o[g * head_dim + d] / sh_ll[g]);
    }
}
#endif

// SPLIT false: writes `out`. SPLIT true with UB_AT_FUSED: writes the partials of each (row,
// split) (layouts as cuda/attention.cu), counts the split in on its group's counter, and the
// threadgroup that counts the last of the group's `splits` merges them all into `out` and sets
// the counter back to 0 for the next dispatch. SPLIT true without UB_AT_FUSED: split 0 of each
// group attends to the whole row and writes `out`, the other splits do nothing (correct, but
// as slow as one split; the counters stay 0 and the partials unused).
template <typename Q, typename C, int E, bool SPLIT>
static void ub_attention_items(device const Q* query, device const C* k_cache,
                               device const C* v_cache, device const uint* positions,
                               device Q* out, UB_AT_PARTIAL part_o, UB_AT_PARTIAL part_ml,
                               device atomic_uint* counters, uint tokens, uint heads,
                               uint kv_heads, uint head_dim, uint capacity, float scale,
                               uint splits, threadgroup float* sh_m, threadgroup float* sh_l,
                               threadgroup float* sh_o, threadgroup float* sh_w,
                               threadgroup float* sh_ll, threadgroup uint* sh_last, uint tg,
                               uint tgs, uint tid, uint threads, uint lane, uint simd,
                               uint simds_in, uint width) {
    // Whether this call leaves partials (else it writes the output itself).
    const bool partials = SPLIT && UB_AT_FUSED;
    const uint simds = min(simds_in, uint(UB_AT_SIMDS));
    const bool active = simd < simds;
    const uint group = heads / kv_heads;
    const uint chunks = (group + UB_AT_GROUP - 1) / UB_AT_GROUP;
    const ulong row_stride = ulong(kv_heads) * head_dim;
    const ulong items = ulong(tokens) * kv_heads * chunks * splits;
    const float qscale = scale * UB_AT_LOG2E;
    for (ulong item = tg; item < items; item += tgs) {
        const uint s = uint(item % splits);
        if (SPLIT && !partials && s != 0) {
            continue;  // the same for the whole threadgroup
        }
        const ulong row = item / splits;
        const uint hc = uint(row % chunks);
        const ulong tk = row / chunks;
        const uint kvh = uint(tk % kv_heads);
        const uint t = uint(tk / kv_heads);
        const uint h0 = kvh * group + hc * UB_AT_GROUP;
        const uint ng = min(uint(UB_AT_GROUP), group - hc * UB_AT_GROUP);
        const uint pos = positions[t];
        const bool valid = pos < capacity;
        const uint2 range =
            valid ? ub_at_range(pos + 1u, partials ? splits : 1u, partials ? s : 0u)
                  : uint2(0u, 0u);
        const uint begin = range.x;
        const uint end = range.y;
        const ulong head_row0 = ulong(t) * heads + h0;

        float qv[UB_AT_GROUP][E];
        float m[UB_AT_GROUP];
        float l[UB_AT_GROUP];
        float acc[UB_AT_GROUP][E];
        for (uint g = 0; g < UB_AT_GROUP; ++g) {
            m[g] = -INFINITY;
            l[g] = 0.0f;
            for (uint j = 0; j < uint(E); ++j) {
                const uint d = j * width + lane;
                acc[g][j] = 0.0f;
                qv[g][j] = (g < ng && d < head_dim)
                               ? float(query[(head_row0 + g) * head_dim + d]) * qscale
                               : 0.0f;
            }
        }

        device const C* kb = k_cache + ulong(kvh) * head_dim;
        device const C* vb = v_cache + ulong(kvh) * head_dim;
        if (active) {
            for (uint k0 = begin + simd * UB_AT_KEYS; k0 < end; k0 += simds * UB_AT_KEYS) {
                const uint left = end - k0;
                float kr[UB_AT_KEYS][E];
                float vr[UB_AT_KEYS][E];
                for (uint i = 0; i < UB_AT_KEYS; ++i) {
                    const bool ok = i < left;
                    const ulong at = ulong(k0 + (ok ? i : 0u)) * row_stride;
                    for (uint j = 0; j < uint(E); ++j) {
                        const uint d = j * width + lane;
                        const bool in = ok && d < head_dim;
                        kr[i][j] = in ? float(kb[at + d]) : 0.0f;
                        vr[i][j] = in ? float(vb[at + d]) : 0.0f;
                    }
                }
                float sc[UB_AT_GROUP][UB_AT_KEYS];
                for (uint g = 0; g < UB_AT_GROUP; ++g) {
                    for (uint i = 0; i < UB_AT_KEYS; ++i) {
                        float dot = 0.0f;
                        for (uint j = 0; j < uint(E); ++j) {
                            dot += qv[g][j] * kr[i][j];
                        }
                        // ng is the same for the whole SIMD-group.
                        sc[g][i] = g < ng ? simd_sum(dot) : 0.0f;
                    }
                }
                // Constant trip counts (with the heads past ng skipped) keep the arrays in
                // registers.
                for (uint g = 0; g < UB_AT_GROUP; ++g) {
                    if (g >= ng) {
                        continue;
                    }
                    float mx = -INFINITY;
                    for (uint i = 0; i < UB_AT_KEYS; ++i) {
                        if (i < left) {
                            mx = fmax(mx, sc[g][i]);
                        }
                    }
                    const float mn = fmax(m[g], mx);
                    const float corr = exp2(m[g] - mn);  // 0 while m is -inf
                    float p[UB_AT_KEYS];
                    float psum = 0.0f;
                    for (uint i = 0; i < UB_AT_KEYS; ++i) {
                        p[i] = i < left ? exp2(sc[g][i] - mn) : 0.0f;
                        psum += p[i];
                    }
                    for (uint j = 0; j < uint(E); ++j) {
                        float a = acc[g][j] * corr;
                        for (uint i = 0; i < UB_AT_KEYS; ++i) {
                            a += p[i] * vr[i][j];
                        }
                        acc[g][j] = a;
                    }
                    l[g] = l[g] * corr + psum;
                    m[g] = mn;
                }
            }
        }

        // Merge: every SIMD-group's (m, l), then each adds its weighted output in turn.
        if (active && lane == 0) {
            for (uint g = 0; g < UB_AT_GROUP; ++g) {
                sh_m[simd * UB_AT_GROUP + g] = m[g];
                sh_l[simd * UB_AT_GROUP + g] = l[g];
            }
        }
        for (uint idx = tid; idx < UB_AT_GROUP * head_dim; idx += threads) {
            sh_o[idx] = 0.0f;
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
        float wt[UB_AT_GROUP];
        for (uint g = 0; g < UB_AT_GROUP; ++g) {
            float mm = -INFINITY;
            for (uint w = 0; w < simds; ++w) {
                mm = fmax(mm, sh_m[w * UB_AT_GROUP + g]);
            }
            wt[g] = (active && m[g] != -INFINITY) ? exp2(m[g] - mm) : 0.0f;
        }
        for (uint w = 0; w < simds; ++w) {
            if (simd == w) {
                for (uint g = 0; g < UB_AT_GROUP; ++g) {
                    if (g >= ng || wt[g] == 0.0f) {
                        continue;
                    }
                    for (uint j = 0; j < uint(E); ++j) {
                        const uint d = j * width + lane;
                        if (d < head_dim) {
                            sh_o[g * head_dim + d] += acc[g][j] * wt[g];
                        }
                    }
                }
            }
            threadgroup_barrier(mem_flags::mem_threadgroup);
        }
        for (uint idx = tid; idx < ng * head_dim; idx += threads) {
            const uint g = idx / head_dim;
            const uint d = idx - g * head_dim;
            float mm = -INFINITY;
            for (uint w = 0; w < simds; ++w) {
                mm = fmax(mm, sh_m[w * UB_AT_GROUP + g]);
            }
            float ll = 0.0f;
            for (uint w = 0; w < simds; ++w) {
                const float mw = sh_m[w * UB_AT_GROUP + g];
                if (mw != -INFINITY) {
                    ll += sh_l[w * UB_AT_GROUP + g] * exp2(mw - mm);
                }
            }
            const float o = sh_o[g * head_dim + d];
            if (partials) {
                const ulong pi = (head_row0 + g) * splits + s;
                part_o[pi * head_dim + d] = o;
                if (d == 0) {
                    part_ml[pi * 2] = mm;
                    part_ml[pi * 2 + 1] = ll;
                }
            } else {
                out[(head_row0 + g) * head_dim + d] = Q(valid ? o / ll : NAN);
            }
        }
#if UB_AT_FUSED
        if (SPLIT) {
            // Publish this split's partials device-wide (every thread fences its own stores;
            // the barrier also ends the reads of sh_o above), then count the split in.
            atomic_thread_fence(mem_flags::mem_device, memory_order_seq_cst, thread_scope_device);
            threadgroup_barrier(mem_flags::mem_device | mem_flags::mem_threadgroup);
            if (tid == 0) {
                const uint arrived =
                    atomic_fetch_add_explicit(counters + row, 1u, memory_order_relaxed);
                const uint last = arrived == splits - 1u ? 1u : 0u;
                if (last != 0u) {
                    // Every split of the group has arrived: nothing else touches the counter
                    // in this dispatch, and the next one starts from 0.
                    atomic_store_explicit(counters + row, 0u, memory_order_relaxed);
                }
                sh_last[0] = last;
            }
            threadgroup_barrier(mem_flags::mem_threadgroup);
            if (sh_last[0] != 0u) {  // the same for the whole threadgroup
                // The others' partials are read after their arrivals.
                atomic_thread_fence(mem_flags::mem_device, memory_order_seq_cst,
                                    thread_scope_device);
                ub_at_merge_splits<Q, E>(part_o, part_ml, out, head_row0, ng, head_dim, splits,
                                         valid, sh_w, sh_ll, sh_o, tid, threads, lane, simd,
                                         simds, width);
            }
        }
#endif
        threadgroup_barrier(mem_flags::mem_threadgroup);  // the next item reuses the arrays
    }
}

template <typename Q, typename C, bool SPLIT>
static void ub_attention(device const Q* query, device const C* k_cache, device const C* v_cache,
                         device const uint* positions, device Q* out, UB_AT_PARTIAL part_o,
                         UB_AT_PARTIAL part_ml, device atomic_uint* counters, uint tokens,
                         uint heads, uint kv_heads, uint head_dim, uint capacity, float scale,
                         uint splits, threadgroup float* sh_m, threadgroup float* sh_l,
                         threadgroup float* sh_o, threadgroup float* sh_w,
                         threadgroup float* sh_ll, threadgroup uint* sh_last, uint tg, uint tgs,
                         uint tid, uint threads, uint lane, uint simd, uint simds, uint width) {
    // The op refuses these; a direct launch with them does nothing rather than fault.
    if (head_dim == 0 || head_dim > UB_AT_MAX_DIM || kv_heads == 0 || heads < kv_heads ||
        splits == 0 || (SPLIT && splits > UB_AT_MAX_SPLITS) || width == 0) {
        return;
    }
    const uint need = (head_dim + width - 1) / width;
    if (need <= 1) {
        ub_attention_items<Q, C, 1, SPLIT>(query, k_cache, v_cache, positions, out, part_o,
                                           part_ml, counters, tokens, heads, kv_heads, head_dim,
                                           capacity, scale, splits, sh_m, sh_l, sh_o, sh_w,
                                           sh_ll, sh_last, tg, tgs, tid, threads, lane, simd,
                                           simds, width);
    } else if (need <= 2) {
        ub_attention_items<Q, C, 2, SPLIT>(query, k_cache, v_cache, positions, out, part_o,
                                           part_ml, counters, tokens, heads, kv_heads, head_dim,
                                           capacity, scale, splits, sh_m, sh_l, sh_o, sh_w,
                                           sh_ll, sh_last, tg, tgs, tid, threads, lane, simd,
                                           simds, width);
    } else if (need <= 4) {
        ub_attention_items<Q, C, 4, SPLIT>(query, k_cache, v_cache, positions, out, part_o,
                                           part_ml, counters, tokens, heads, kv_heads, head_dim,
                                           capacity, scale, splits, sh_m, sh_l, sh_o, sh_w,
                                           sh_ll, sh_last, tg, tgs, tid, threads, lane, simd,
                                           simds, width);
    } else if (need <= 8) {
        ub_attention_items<Q, C, 8, SPLIT>(query, k_cache, v_cache, positions, out, part_o,
                                           part_ml, counters, tokens, heads, kv_heads, head_dim,
                                           capacity, scale, splits, sh_m, sh_l, sh_o, sh_w,
                                           sh_ll, sh_last, tg, tgs, tid, threads, lane, simd,
                                           simds, width);
    }
}

// ---------------------------------------------------------------------------------------------
// Entry points.

#define UB_AT_GRID_ARGS                                                                            \
    uint tg [[threadgroup_position_in_grid]], uint tgs [[threadgroups_per_grid]],                  \
        uint tid [[thread_position_in_threadgroup]], uint threads [[threads_per_threadgroup]],     \
        uint lane [[thread_index_in_simdgroup]], uint simd [[simdgroup_index_in_threadgroup]],     \
        uint simds [[simdgroups_per_threadgroup]], uint width [[threads_per_simdgroup]]

#define UB_AT_PAIR_KERNELS(QS, Q, CS, C)                                                           \
    kernel void unibuf_rope_kv_append_##QS##_##CS(                                                 \
        device const Q* query [[buffer(0)]], device const Q* key [[buffer(1)]],                    \
        device const Q* value [[buffer(2)]], device const uint* positions [[buffer(3)]],           \
        device Q* query_out [[buffer(4)]], device C* k_cache [[buffer(5)]],                        \
        device C* v_cache [[buffer(6)]], constant uint& tokens [[buffer(7)]],                      \
        constant uint& heads [[buffer(8)]], constant uint& kv_heads [[buffer(9)]],                 \
        constant uint& head_dim [[buffer(10)]], constant uint& capacity [[buffer(11)]],            \
        constant float& theta [[buffer(12)]], constant uint& style [[buffer(13)]],                 \
        uint tg [[threadgroup_position_in_grid]], uint tgs [[threadgroups_per_grid]],              \
        uint tid [[thread_position_in_threadgroup]], uint threads [[threads_per_threadgroup]]) {   \
        ub_rope_kv_append<Q, C>(query, key, value, positions, query_out, k_cache, v_cache,         \
                                tokens, heads, kv_heads, head_dim, capacity, theta, style,         \
                                ulong(tg) * threads + tid, ulong(tgs) * threads);                  \
    }                                                                                              \
    kernel void unibuf_attention_##QS##_##CS(                                                      \
        device const Q* query [[buffer(0)]], device const C* k_cache [[buffer(1)]],                \
        device const C* v_cache [[buffer(2)]], device const uint* positions [[buffer(3)]],         \
        device Q* out [[buffer(4)]], constant uint& tokens [[buffer(5)]],                          \
        constant uint& heads [[buffer(6)]], constant uint& kv_heads [[buffer(7)]],                 \
        constant uint& head_dim [[buffer(8)]], constant uint& capacity [[buffer(9)]],              \
        constant float& scale [[buffer(10)]], UB_AT_GRID_ARGS) {                                   \
        threadgroup float sh_m[UB_AT_SIMDS * UB_AT_GROUP];                                         \
        threadgroup float sh_l[UB_AT_SIMDS * UB_AT_GROUP];                                         \
        threadgroup float sh_o[UB_AT_GROUP * UB_AT_MAX_DIM];                                       \
        threadgroup uint sh_last[1];                                                               \
        ub_attention<Q, C, false>(query, k_cache, v_cache, positions, out, nullptr, nullptr,       \
                                  nullptr, tokens, heads, kv_heads, head_dim, capacity, scale, 1u, \
                                  sh_m, sh_l, sh_o, sh_m, sh_l, sh_last, tg, tgs, tid, threads,    \
                                  lane, simd, simds, width);                                       \
    }                                                                                              \
    kernel void unibuf_attention_split_##QS##_##CS(                                                \
        device const Q* query [[buffer(0)]], device const C* k_cache [[buffer(1)]],                \
        device const C* v_cache [[buffer(2)]], device const uint* positions [[buffer(3)]],         \
        device Q* out [[buffer(4)]], UB_AT_PARTIAL part_o [[buffer(5)]],                           \
        UB_AT_PARTIAL part_ml [[buffer(6)]], device atomic_uint* counters [[buffer(7)]],           \
        constant uint& tokens [[buffer(8)]], constant uint& heads [[buffer(9)]],                   \
        constant uint& kv_heads [[buffer(10)]], constant uint& head_dim [[buffer(11)]],            \
        constant uint& capacity [[buffer(12)]], constant float& scale [[buffer(13)]],              \
        constant uint& splits [[buffer(14)]], UB_AT_GRID_ARGS) {                                   \
        threadgroup float sh_m[UB_AT_SIMDS * UB_AT_GROUP];                                         \
        threadgroup float sh_l[UB_AT_SIMDS * UB_AT_GROUP];                                         \
        threadgroup float sh_o[UB_AT_GROUP * UB_AT_MAX_DIM];                                       \
        threadgroup float sh_w[UB_AT_GROUP * UB_AT_MAX_SPLITS];                                    \
        threadgroup float sh_ll[UB_AT_GROUP];                                                      \
        threadgroup uint sh_last[1];                                                               \
        ub_attention<Q, C, true>(query, k_cache, v_cache, positions, out, part_o, part_ml,         \
                                 counters, tokens, heads, kv_heads, head_dim, capacity, scale,     \
                                 splits, sh_m, sh_l, sh_o, sh_w, sh_ll, sh_last, tg, tgs, tid,     \
                                 threads, lane, simd, simds, width);                               \
    }

// The pair (Q, C) has index 3 * Q + C.
// bfloat needs MSL 3.1 (macOS 14): older systems still get the float and half kernels.
#if !defined(UB_AT_PAIR) || UB_AT_PAIR == 0
UB_AT_PAIR_KERNELS(f32, float, f32, float)
#endif
#if !defined(UB_AT_PAIR) || UB_AT_PAIR == 1
UB_AT_PAIR_KERNELS(f32, float, f16, half)
#endif
#if !defined(UB_AT_PAIR) || UB_AT_PAIR == 3
UB_AT_PAIR_KERNELS(f16, half, f32, float)
#endif
#if !defined(UB_AT_PAIR) || UB_AT_PAIR == 4
UB_AT_PAIR_KERNELS(f16, half, f16, half)
#endif
#if __METAL_VERSION__ >= 310
#if !defined(UB_AT_PAIR) || UB_AT_PAIR == 2
UB_AT_PAIR_KERNELS(f32, float, bf16, bfloat)
#endif
#if !defined(UB_AT_PAIR) || UB_AT_PAIR == 5
UB_AT_PAIR_KERNELS(f16, half, bf16, bfloat)
#endif
#if !defined(UB_AT_PAIR) || UB_AT_PAIR == 6
UB_AT_PAIR_KERNELS(bf16, bfloat, f32, float)
#endif
#if !defined(UB_AT_PAIR) || UB_AT_PAIR == 7
UB_AT_PAIR_KERNELS(bf16, bfloat, f16, half)
#endif
#if !defined(UB_AT_PAIR) || UB_AT_PAIR == 8
UB_AT_PAIR_KERNELS(bf16, bfloat, bf16, bfloat)
#endif
#endif
