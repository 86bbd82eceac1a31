// On-device top-k / top-p sampling, one block of UB_SAMPLE_THREADS threads per row of logits
// (grid-stride over rows). The algorithm, shared with the CPU and Metal kernels:
//
// 1. Logits are widened to f32; NaN counts as -inf. Each becomes an order-preserving 32-bit key,
//    and candidates are ordered by (key descending, token id ascending): equal logits go to the
//    lower id first.
// 2. temperature == 0 (or k == 1): the first in that order (the argmax, lowest id on ties).
// 3. Else the k first in that order are selected: an exact radix select finds the key K of the
//    k-th (3 passes over the row of 11 + 11 + 10 bits, block histograms in shared memory with
//    warp-aggregated atomics), then one more pass gathers the keys above K and the lowest ids
//    equal to K. The k candidates (k <= 1024) are bitonic-sorted in shared memory.
// 4. p_i = exp((v_i - v_0) / temperature) (v_0 the largest; a non-finite v_0 picks candidate 0),
//    cum_i their inclusive prefix sums; the kept prefix is the first n with
//    cum_{n-1} >= top_p * cum_{k-1}; u = ub_sample_uniform(seed, step, row);
//    the pick is the first i < n with cum_i > u * cum_{n-1} (else n - 1).

#define UB_SAMPLE_MAX_K 1024
#define UB_SAMPLE_THREADS 1024

// NaN -> -inf; then the key orders like the float (-0 just below +0).
__device__ __forceinline__ unsigned int ub_sample_key(float v) {
    unsigned int u = __float_as_uint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) u = 0xff800000u;
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ float ub_sample_value(unsigned int k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// SplitMix64's finaliser after a golden-ratio increment.
__device__ __forceinline__ ub_u64 ub_sample_mix(ub_u64 z) {
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
// A uniform draw in [0, 1) with 24 random bits, a function of (seed, step, row) only.
__device__ __forceinline__ float ub_sample_uniform(ub_u64 seed, ub_u64 step, ub_u64 row) {
    ub_u64 h = ub_sample_mix(seed);
    h = ub_sample_mix(h ^ step);
    h = ub_sample_mix(h ^ row);
    return (float)(h >> 40) * (1.0f / 16777216.0f);
}

// Calls f(i, key, valid) for every element of the row, UB_SAMPLE_BATCH loads in flight per
// thread (the row is read from L2/HBM at latency, so loads are issued before use). Every lane of
// every warp makes the same calls (valid false past the row), so f may use warp collectives.
#define UB_SAMPLE_BATCH 16
template <typename S, typename F>
__device__ __forceinline__ void ub_sample_each(const S* lg, unsigned int vocab, F f) {
    const unsigned int bd = blockDim.x;
    for (unsigned int base = 0; base < vocab; base += bd * UB_SAMPLE_BATCH) {
        unsigned int keys[UB_SAMPLE_BATCH];
#pragma unroll
        for (int j = 0; j < UB_SAMPLE_BATCH; ++j) {
            const unsigned int i = base + j * bd + threadIdx.x;
            keys[j] = i < vocab ? ub_sample_key(ub_to_f32(lg[i])) : 0u;
        }
#pragma unroll
        for (int j = 0; j < UB_SAMPLE_BATCH; ++j) {
            const unsigned int i = base + j * bd + threadIdx.x;
            f(i, keys[j], i < vocab);
        }
    }
}

struct ub_sample_smem {
    ub_u64 cand[UB_SAMPLE_MAX_K];
    float cum[UB_SAMPLE_MAX_K];
    unsigned int hist[2048];
    unsigned int wu[32];
    float wf[32];
    ub_u64 wl[32];
    unsigned int sel_bin, sel_above, sel_count, n_gt, n_eq, cut, pick;
};

// Inclusive scan over the block; *total gets the block's sum. Ends with a barrier.
template <typename T>
__device__ __forceinline__ T ub_sample_scan(T v, T* scratch, T* total) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const T t = __shfl_up_sync(0xffffffffu, v, o);
        if (lane >= o) v += t;
    }
    if (lane == 31) scratch[warp] = v;
    __syncthreads();
    if (warp == 0) {
        T t = lane < warps ? scratch[lane] : (T)0;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const T s = __shfl_up_sync(0xffffffffu, t, o);
            if (lane >= o) t += s;
        }
        scratch[lane] = t;
    }
    __syncthreads();
    if (warp > 0) v += scratch[warp - 1];
    *total = scratch[warps - 1];
    __syncthreads();
    return v;
}

template <typename S>
__device__ __forceinline__ unsigned int ub_sample_argmax(const S* lg, unsigned int vocab,
                                                         ub_sample_smem& sh) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    ub_u64 best = 0;
    ub_sample_each<S>(lg, vocab, [&](unsigned int i, unsigned int key, bool valid) {
        const ub_u64 c = ((ub_u64)key << 32) | (0xffffffffu - i);
        if (valid && c > best) best = c;
    });
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const ub_u64 t = __shfl_xor_sync(0xffffffffu, best, o);
        best = t > best ? t : best;
    }
    if (lane == 0) sh.wl[warp] = best;
    __syncthreads();
    best = 0;
    for (int w = 0; w < warps; ++w) best = sh.wl[w] > best ? sh.wl[w] : best;
    __syncthreads();
    return 0xffffffffu - (unsigned int)(best & 0xffffffffull);
}

template <typename S>
__device__ __forceinline__ unsigned int ub_sample_topk(const S* lg, unsigned int vocab,
                                                       unsigned int k, float temperature,
                                                       float top_p, float u, ub_sample_smem& sh) {
    const unsigned int tid = threadIdx.x, bd = blockDim.x, lane = tid & 31u;
    // 1. Radix select of the k-th key.
    unsigned int need = k, prefix = 0, pmask = 0;
    const unsigned int shifts[3] = {21u, 10u, 0u};
    const unsigned int widths[3] = {11u, 11u, 10u};
    for (int pass = 0; pass < 3; ++pass) {
        const unsigned int shift = shifts[pass], nb = 1u << widths[pass];
        for (unsigned int i = tid; i < nb; i += bd) sh.hist[i] = 0;
        __syncthreads();
        ub_sample_each<S>(lg, vocab, [&](unsigned int, unsigned int key, bool valid) {
            const unsigned int bin =
                valid && (key & pmask) == prefix ? (key >> shift) & (nb - 1u) : 0xffffffffu;
            const unsigned int peers = __match_any_sync(0xffffffffu, bin);
            if (bin != 0xffffffffu && lane == (unsigned int)(__ffs(peers) - 1)) {
                atomicAdd(&sh.hist[bin], (unsigned int)__popc(peers));
            }
        });
        __syncthreads();
        // Bins from the top: thread t sums `per` of them, a block scan finds the one holding the
        // need-th largest.
        const unsigned int per = (nb + bd - 1u) / bd;
        unsigned int local = 0;
        for (unsigned int d = tid * per; d < (tid + 1u) * per && d < nb; ++d) {
            local += sh.hist[nb - 1u - d];
        }
        unsigned int total;
        const unsigned int incl = ub_sample_scan<unsigned int>(local, sh.wu, &total);
        const unsigned int excl = incl - local;
        if (excl < need && need <= incl) {
            unsigned int running = excl;
            for (unsigned int d = tid * per; d < (tid + 1u) * per && d < nb; ++d) {
                const unsigned int c = sh.hist[nb - 1u - d];
                if (running + c >= need) {
                    sh.sel_bin = nb - 1u - d;
                    sh.sel_above = running;
                    sh.sel_count = c;
                    break;
                }
                running += c;
            }
        }
        __syncthreads();
        need -= sh.sel_above;
        prefix |= sh.sel_bin << shift;
        pmask |= (nb - 1u) << shift;
        __syncthreads();
    }
    // 2. Gather: keys above K, and `need` of those equal to K (the lowest ids).
    const unsigned int K = prefix, n_gt = k - need, eq_count = sh.sel_count;
    if (tid == 0) {
        sh.n_gt = 0;
        sh.n_eq = 0;
    }
    __syncthreads();
    if (eq_count == need) {
        // Every element equal to K is taken: order does not matter.
        ub_sample_each<S>(lg, vocab, [&](unsigned int i, unsigned int key, bool valid) {
            const ub_u64 c = ((ub_u64)key << 32) | (0xffffffffu - i);
            if (valid && key > K) {
                sh.cand[atomicAdd(&sh.n_gt, 1u)] = c;
            } else if (valid && key == K) {
                sh.cand[n_gt + atomicAdd(&sh.n_eq, 1u)] = c;
            }
        });
    } else {
        // Ties straddle the cut: rank the equal ones in id order, tile by tile, until `need`
        // of them are placed; then only the keys above K remain to gather.
        unsigned int running = 0, base = 0;
        for (; base < vocab && running < need; base += bd) {
            const unsigned int i = base + tid;
            const unsigned int key = i < vocab ? ub_sample_key(ub_to_f32(lg[i])) : 0u;
            const ub_u64 c = ((ub_u64)key << 32) | (0xffffffffu - i);
            if (i < vocab && key > K) sh.cand[atomicAdd(&sh.n_gt, 1u)] = c;
            const bool eq = i < vocab && key == K;
            const unsigned int bal = __ballot_sync(0xffffffffu, eq);
            const unsigned int below = __popc(bal & ((1u << lane) - 1u));
            unsigned int tile_total;
            // Lane 0 of each warp adds its warp's count, so the inclusive scan at lane 0 is the
            // count of this warp and the ones before it.
            const unsigned int wincl = ub_sample_scan<unsigned int>(
                lane == 0u ? (unsigned int)__popc(bal) : 0u, sh.wu, &tile_total);
            const unsigned int wexcl = __shfl_sync(0xffffffffu, wincl, 0) - __popc(bal);
            const unsigned int rank = running + wexcl + below;
            if (eq && rank < need) sh.cand[n_gt + rank] = c;
            running += tile_total;
        }
        for (unsigned int i = base + tid; i < vocab; i += bd) {
            const unsigned int key = ub_sample_key(ub_to_f32(lg[i]));
            if (key > K) sh.cand[atomicAdd(&sh.n_gt, 1u)] = ((ub_u64)key << 32) | (0xffffffffu - i);
        }
    }
    __syncthreads();
    // 3. Sort the candidates descending (bitonic, padded with zeros, below every real key).
    unsigned int P = 1;
    while (P < k) P <<= 1;
    for (unsigned int i = k + tid; i < P; i += bd) sh.cand[i] = 0;
    __syncthreads();
    for (unsigned int size = 2; size <= P; size <<= 1) {
        for (unsigned int stride = size >> 1; stride > 0; stride >>= 1) {
            for (unsigned int t = tid; t < P / 2u; t += bd) {
                const unsigned int i = 2u * t - (t & (stride - 1u));
                const unsigned int j = i + stride;
                const ub_u64 a = sh.cand[i], b = sh.cand[j];
                const bool desc = (i & size) == 0u;
                if ((a < b) == desc) {
                    sh.cand[i] = b;
                    sh.cand[j] = a;
                }
            }
            __syncthreads();
        }
    }
    // 4. Softmax over the candidates, top-p cut, draw.
    const float v0 = ub_sample_value((unsigned int)(sh.cand[0] >> 32));
    unsigned int pick = 0;
    if ((__float_as_uint(v0) & 0x7f800000u) != 0x7f800000u) {  // finite
        float p = 0.0f;
        if (tid < k) {
            const float v = ub_sample_value((unsigned int)(sh.cand[tid] >> 32));
            p = expf((v - v0) / temperature);
        }
        float mass;
        const float cum = ub_sample_scan<float>(p, sh.wf, &mass);
        if (tid < k) sh.cum[tid] = cum;
        if (tid == 0) sh.cut = k - 1u;
        __syncthreads();
        if (tid < k && cum >= top_p * mass) atomicMin(&sh.cut, tid);
        __syncthreads();
        const unsigned int n = sh.cut + 1u;
        const float kept = sh.cum[n - 1u];
        if (tid == 0) sh.pick = n - 1u;
        __syncthreads();
        if (tid < n && cum > u * kept) atomicMin(&sh.pick, tid);
        __syncthreads();
        pick = sh.pick;
    }
    const unsigned int id = 0xffffffffu - (unsigned int)(sh.cand[pick] & 0xffffffffull);
    __syncthreads();
    return id;
}

template <typename S>
__device__ __forceinline__ void ub_sample(const S* logits, unsigned int* out, unsigned int rows,
                                          unsigned int vocab, unsigned int top_k,
                                          float temperature, float top_p, ub_u64 seed,
                                          ub_u64 step) {
    __shared__ ub_sample_smem sh;
    if (vocab == 0u || (blockDim.x & 31u) != 0u) return;
    unsigned int k = top_k == 0u ? UB_SAMPLE_MAX_K : top_k;
    if (k > UB_SAMPLE_MAX_K) k = UB_SAMPLE_MAX_K;
    if (k > blockDim.x) k = blockDim.x;
    if (k > vocab) k = vocab;
    // 64-bit: rows up to 2^32 - 1 with a grid of up to 2^31 - 1 must not wrap the counter.
    for (unsigned long long row = blockIdx.x; row < rows; row += gridDim.x) {
        const S* lg = logits + (ub_u64)row * vocab;
        unsigned int id;
        if (temperature == 0.0f || k == 1u) {
            id = ub_sample_argmax<S>(lg, vocab, sh);
        } else {
            const float u = ub_sample_uniform(seed, step, row);
            id = ub_sample_topk<S>(lg, vocab, k, temperature, top_p, u, sh);
        }
        if (threadIdx.x == 0) out[row] = id;
    }
}

extern "C" __global__ void __launch_bounds__(UB_SAMPLE_THREADS)
unibuf_sample_f32(const float* logits, unsigned int* out, unsigned int rows, unsigned int vocab,
                  unsigned int top_k, float temperature, float top_p, ub_u64 seed, ub_u64 step) {
    ub_sample<float>(logits, out, rows, vocab, top_k, temperature, top_p, seed, step);
}
extern "C" __global__ void __launch_bounds__(UB_SAMPLE_THREADS)
unibuf_sample_f16(const ub_f16* logits, unsigned int* out, unsigned int rows, unsigned int vocab,
                  unsigned int top_k, float temperature, float top_p, ub_u64 seed, ub_u64 step) {
    ub_sample<ub_f16>(logits, out, rows, vocab, top_k, temperature, top_p, seed, step);
}
extern "C" __global__ void __launch_bounds__(UB_SAMPLE_THREADS)
unibuf_sample_bf16(const ub_bf16* logits, unsigned int* out, unsigned int rows, unsigned int vocab,
                   unsigned int top_k, float temperature, float top_p, ub_u64 seed, ub_u64 step) {
    ub_sample<ub_bf16>(logits, out, rows, vocab, top_k, temperature, top_p, seed, step);
}
