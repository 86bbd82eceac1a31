#include <metal_stdlib>
using namespace metal;

// On-device top-k / top-p sampling, one threadgroup per row of logits (grid-stride over rows);
// the algorithm of the CUDA kernel (cuda/sample.cu) and the CPU kernel (sample.rs):
// NaN as -inf; candidates ordered by (logit descending, token id ascending); temperature 0 or
// k == 1 picks the first; else an exact radix select (11 + 11 + 10 bits) finds the k-th key,
// a gather collects the k candidates, a bitonic sort orders them, and the draw
// u = uniform(seed, step, row) picks the first kept candidate whose running probability exceeds
// u times the kept mass. The threadgroup must have at least UB_MAX_K threads (the launcher uses
// 1024), a multiple of the SIMD width.

#define UB_MAX_K 1024u

static inline uint ub_key(float v) {
    uint u = as_type<uint>(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) u = 0xff800000u;
    return (u & 0x80000000u) != 0u ? ~u : (u | 0x80000000u);
}
static inline float ub_value(uint k) {
    return as_type<float>((k & 0x80000000u) != 0u ? (k & 0x7fffffffu) : ~k);
}
static inline ulong ub_mix(ulong z) {
    z += 0x9e3779b97f4a7c15ul;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ul;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebul;
    return z ^ (z >> 31);
}
static inline float ub_uniform(ulong seed, ulong step, ulong row) {
    ulong h = ub_mix(seed);
    h = ub_mix(h ^ step);
    h = ub_mix(h ^ row);
    return float(uint(h >> 40)) * (1.0f / 16777216.0f);
}

struct ub_ctx {
    uint tid, bd, lane, width, sg, nsg;
};

// Inclusive scan over the threadgroup; `total` gets the sum. Ends with a barrier.
template <typename T>
static inline T ub_scan(T v, threadgroup T* scratch, thread T& total, ub_ctx c) {
    T incl = simd_prefix_inclusive_sum(v);
    if (c.lane == c.width - 1u) scratch[c.sg] = incl;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (c.sg == 0u) {
        T t = c.lane < c.nsg ? scratch[c.lane] : T(0);
        t = simd_prefix_inclusive_sum(t);
        if (c.lane < c.nsg) scratch[c.lane] = t;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (c.sg > 0u) incl += scratch[c.sg - 1u];
    total = scratch[c.nsg - 1u];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    return incl;
}

static inline ulong ub_cand(uint key, uint i) {
    return (ulong(key) << 32) | ulong(0xffffffffu - i);
}

template <typename S>
static inline uint ub_sample_row(const device S* lg, uint vocab, uint k, float temperature,
                                 float top_p, float u, threadgroup ulong* cand,
                                 threadgroup float* cum, threadgroup atomic_uint* hist,
                                 threadgroup uint* wu, threadgroup float* wf,
                                 threadgroup atomic_uint* counters, threadgroup uint* sel,
                                 ub_ctx c) {
    const uint tid = c.tid, bd = c.bd;
    if (temperature == 0.0f || k == 1u) {
        ulong best = 0;
        for (uint i = tid; i < vocab; i += bd) {
            best = max(best, ub_cand(ub_key(float(lg[i])), i));
        }
        cand[tid] = best;
        threadgroup_barrier(mem_flags::mem_threadgroup);
        uint p = 1;
        while (p < bd) p <<= 1;
        for (uint s = p >> 1; s > 0u; s >>= 1) {
            if (tid < s && tid + s < bd) cand[tid] = max(cand[tid], cand[tid + s]);
            threadgroup_barrier(mem_flags::mem_threadgroup);
        }
        const uint id = 0xffffffffu - uint(cand[0] & 0xfffffffful);
        threadgroup_barrier(mem_flags::mem_threadgroup);
        return id;
    }
    // 1. Radix select of the k-th key.
    uint need = k, prefix = 0, pmask = 0;
    for (uint pass = 0; pass < 3u; ++pass) {
        const uint shift = pass == 0u ? 21u : (pass == 1u ? 10u : 0u);
        const uint nb = pass == 2u ? 1024u : 2048u;
        for (uint i = tid; i < nb; i += bd) atomic_store_explicit(&hist[i], 0u, memory_order_relaxed);
        threadgroup_barrier(mem_flags::mem_threadgroup);
        for (uint i = tid; i < vocab; i += bd) {
            const uint key = ub_key(float(lg[i]));
            if ((key & pmask) == prefix) {
                atomic_fetch_add_explicit(&hist[(key >> shift) & (nb - 1u)], 1u, memory_order_relaxed);
            }
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
        const uint per = (nb + bd - 1u) / bd;
        uint local = 0;
        for (uint d = tid * per; d < (tid + 1u) * per && d < nb; ++d) {
            local += atomic_load_explicit(&hist[nb - 1u - d], memory_order_relaxed);
        }
        uint total;
        const uint incl = ub_scan<uint>(local, wu, total, c);
        const uint excl = incl - local;
        if (excl < need && need <= incl) {
            uint running = excl;
            for (uint d = tid * per; d < (tid + 1u) * per && d < nb; ++d) {
                const uint cnt = atomic_load_explicit(&hist[nb - 1u - d], memory_order_relaxed);
                if (running + cnt >= need) {
                    sel[0] = nb - 1u - d;
                    sel[1] = running;
                    sel[2] = cnt;
                    break;
                }
                running += cnt;
            }
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
        need -= sel[1];
        prefix |= sel[0] << shift;
        pmask |= (nb - 1u) << shift;
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    // 2. Gather the keys above K and `need` of those equal to K (the lowest ids).
    const uint K = prefix, n_gt = k - need, eq_count = sel[2];
    if (tid == 0u) {
        atomic_store_explicit(&counters[0], 0u, memory_order_relaxed);
        atomic_store_explicit(&counters[1], 0u, memory_order_relaxed);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (eq_count == need) {
        for (uint i = tid; i < vocab; i += bd) {
            const uint key = ub_key(float(lg[i]));
            if (key > K) {
                cand[atomic_fetch_add_explicit(&counters[0], 1u, memory_order_relaxed)] = ub_cand(key, i);
            } else if (key == K) {
                cand[n_gt + atomic_fetch_add_explicit(&counters[1], 1u, memory_order_relaxed)] = ub_cand(key, i);
            }
        }
    } else {
        uint running = 0, base = 0;
        for (; base < vocab && running < need; base += bd) {
            const uint i = base + tid;
            const uint key = i < vocab ? ub_key(float(lg[i])) : 0u;
            if (i < vocab && key > K) {
                cand[atomic_fetch_add_explicit(&counters[0], 1u, memory_order_relaxed)] = ub_cand(key, i);
            }
            const uint eq = (i < vocab && key == K) ? 1u : 0u;
            uint tile_total;
            const uint rank = running + ub_scan<uint>(eq, wu, tile_total, c) - eq;
            if (eq != 0u && rank < need) cand[n_gt + rank] = ub_cand(key, i);
            running += tile_total;
        }
        for (uint i = base + tid; i < vocab; i += bd) {
            const uint key = ub_key(float(lg[i]));
            if (key > K) {
                cand[atomic_fetch_add_explicit(&counters[0], 1u, memory_order_relaxed)] = ub_cand(key, i);
            }
        }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    // 3. Bitonic sort, descending, padded with zeros (below every real candidate).
    uint P = 1;
    while (P < k) P <<= 1;
    for (uint i = k + tid; i < P; i += bd) cand[i] = 0;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint size = 2; size <= P; size <<= 1) {
        for (uint stride = size >> 1; stride > 0u; stride >>= 1) {
            for (uint t = tid; t < P / 2u; t += bd) {
                const uint i = 2u * t - (t & (stride - 1u));
                const uint j = i + stride;
                const ulong a = cand[i], b = cand[j];
                const bool desc = (i & size) == 0u;
                if ((a < b) == desc) {
                    cand[i] = b;
                    cand[j] = a;
                }
            }
            threadgroup_barrier(mem_flags::mem_threadgroup);
        }
    }
    // 4. Softmax over the candidates, top-p cut, draw.
    const float v0 = ub_value(uint(cand[0] >> 32));
    uint pick = 0;
    if (isfinite(v0)) {
        float p = 0.0f;
        if (tid < k) {
            p = exp((ub_value(uint(cand[tid] >> 32)) - v0) / temperature);
        }
        float mass;
        const float cm = ub_scan<float>(p, wf, mass, c);
        if (tid < k) cum[tid] = cm;
        if (tid == 0u) atomic_store_explicit(&counters[2], k - 1u, memory_order_relaxed);
        threadgroup_barrier(mem_flags::mem_threadgroup);
        if (tid < k && cm >= top_p * mass) {
            atomic_fetch_min_explicit(&counters[2], tid, memory_order_relaxed);
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
        const uint n = atomic_load_explicit(&counters[2], memory_order_relaxed) + 1u;
        const float kept = cum[n - 1u];
        if (tid == 0u) atomic_store_explicit(&counters[3], n - 1u, memory_order_relaxed);
        threadgroup_barrier(mem_flags::mem_threadgroup);
        if (tid < n && cm > u * kept) {
            atomic_fetch_min_explicit(&counters[3], tid, memory_order_relaxed);
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
        pick = atomic_load_explicit(&counters[3], memory_order_relaxed);
    }
    const uint id = 0xffffffffu - uint(cand[pick] & 0xfffffffful);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    return id;
}

#define UB_SAMPLE_KERNEL(NAME, S)                                                                  \
    kernel void NAME(const device S* logits [[buffer(0)]], device uint* out [[buffer(1)]],         \
                     constant uint& rows [[buffer(2)]], constant uint& vocab [[buffer(3)]],        \
                     constant uint& top_k [[buffer(4)]], constant float& temperature [[buffer(5)]], \
                     constant float& top_p [[buffer(6)]], constant ulong& seed [[buffer(7)]],      \
                     constant ulong& step [[buffer(8)]],                                           \
                     uint tg [[threadgroup_position_in_grid]],                                     \
                     uint tgs [[threadgroups_per_grid]],                                           \
                     uint tid [[thread_position_in_threadgroup]],                                  \
                     uint bd [[threads_per_threadgroup]],                                          \
                     uint lane [[thread_index_in_simdgroup]],                                      \
                     uint width [[threads_per_simdgroup]],                                         \
                     uint sg [[simdgroup_index_in_threadgroup]],                                   \
                     uint nsg [[simdgroups_per_threadgroup]]) {                                    \
        threadgroup ulong cand[UB_MAX_K];                                                          \
        threadgroup float cum[UB_MAX_K];                                                           \
        threadgroup atomic_uint hist[2048];                                                        \
        threadgroup uint wu[32];                                                                   \
        threadgroup float wf[32];                                                                  \
        threadgroup atomic_uint counters[4];                                                       \
        threadgroup uint sel[3];                                                                   \
        if (vocab == 0u) return;                                                                   \
        uint k = top_k == 0u ? UB_MAX_K : min(top_k, UB_MAX_K);                                    \
        k = min(min(k, bd), vocab);                                                                \
        const ub_ctx c = {tid, bd, lane, width, sg, nsg};                                          \
        for (ulong row = tg; row < rows; row += tgs) {                                             \
            const float u = ub_uniform(seed, step, ulong(row));                                    \
            const uint id = ub_sample_row<S>(logits + ulong(row) * vocab, vocab, k, temperature,   \
                                             top_p, u, cand, cum, hist, wu, wf, counters, sel, c); \
            if (tid == 0u) out[row] = id;                                                          \
        }                                                                                          \
    }

UB_SAMPLE_KERNEL(unibuf_sample_f32, float)
UB_SAMPLE_KERNEL(unibuf_sample_f16, half)
// bfloat needs MSL 3.1 (macOS 14): older systems still get the f32 and f16 kernels.
#if __METAL_VERSION__ >= 310
UB_SAMPLE_KERNEL(unibuf_sample_bf16, bfloat)
#endif
