//! Attention of a Llama-style decoder with grouped-query attention (GQA): RoPE on the query and
//! key fused with appending key and value to the KV caches ([`rope_kv_append_into`]), and
//! causal attention of the queries over the caches ([`attention`]), for batch-1 decode and for
//! chunked prefill alike.
//!
//! The caches are `[capacity, kv_heads, head_dim]`, one row per position (views of a
//! [`GrowableBuffer`](crate::GrowableBuffer) or of any buffer, reshaped). Positions are a U32
//! buffer on the device, not scalars: a decode step recorded once into a
//! [`LaunchBatch`](crate::LaunchBatch) (a CUDA graph) serves every position, the caller
//! rewriting the positions between replays. The kernels cannot report an error, so a position
//! at or past the capacity never reads or writes out of bounds: [`rope_kv_append_into`] skips
//! that row's cache write and [`attention`] gives that query row NaN, which makes the bad
//! position visible downstream (as [`embed_rows`](super::embed_rows) does for a bad id).
//!
//! The query, key, value and output share one float dtype (f32, f16 or bf16); the caches have
//! one float dtype of their own (so an f32 model can keep an f16 or bf16 cache). Arithmetic is
//! f32, and every value is rounded once when it is stored.
//!
//! On a GPU the attention splits each row's keys over several blocks (flash-decoding) when the
//! rows alone would leave the GPU mostly idle, as batch-1 decode does. It stays one launch: each
//! block leaves its split's maximum score, sum of exponentials and unnormalised output in f32
//! scratch that the op allocates, counts itself in on its group's counter (U32 scratch, zeroed
//! once when allocated), and the last block of each group to finish merges the group's splits
//! (online softmax) into the output and sets the counter back to zero, ready for the next launch
//! or graph replay (the "last block" pattern). The number of splits is chosen on the host from
//! the capacity and the number of rows; each split's share of the keys follows the row's actual
//! length on the device. The CPU runs the same kernels, the split one computing every split's
//! partial and then merging them.

use super::rope::{rope_kv_rows, RopeStyle};
use super::row_common::{expect_len, HostFloat};
use super::{expect_dtype, expect_float, expect_shape, index_u32, kernel, output};
use crate::backend::cpu::{CpuKernelArgs, CpuKernelFn};
use crate::backend::{FillPattern, LaunchDims};
use crate::buffer::Buffer;
use crate::dtype::DType;
use crate::epoch::Fence;
use crate::error::{Error, Result};
use crate::kernel::{KernelSource, Param, ScalarType};
use crate::queue::Queue;
use half::{bf16, f16};
use std::ops::Range;

/// The largest head dimension the attention kernels take (eight elements per lane of a warp).
const MAX_HEAD_DIM: usize = 256;
/// The largest capacity: the kernels index keys in 32 bits with headroom.
const MAX_CAPACITY: usize = 1 << 31;
/// Query heads of one kv head that one block of the attention kernels takes.
const GROUP: usize = 4;
/// Threads per block of the attention kernels: 8 warps.
const THREADS: u32 = 256;
/// Keys a split takes at least on the device: one step of a block (8 warps x 4 keys).
const MIN_CHUNK: usize = 32;
/// Keys of a full-capacity row that the split count leaves each split at least (two steps of a
/// block); see [`split_count`].
const MIN_SPLIT_KEYS: usize = 64;
/// Splits at most (the merging block's shared weights hold this many per head).
const MAX_SPLITS: usize = 128;
/// Blocks the split heuristic aims for: two per SM of an H100 (132 SMs), 16 warps per SM.
const TARGET_BLOCKS: usize = 264;
/// Threads per block of the RoPE + append kernel, one per (token, pair).
const ROPE_THREADS: u32 = 256;
/// Blocks at most of the RoPE + append kernel; it grid-strides over the rest.
const ROPE_MAX_BLOCKS: u64 = 65_535;

/// The float dtypes, in the order of the kernel tables.
const FLOATS: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// Kernels of each (query dtype, cache dtype) pair at index `3 * query + cache`.
const ROPE_NAMES: [&str; 9] = [
    "unibuf_rope_kv_append_f32_f32",
    "unibuf_rope_kv_append_f32_f16",
    "unibuf_rope_kv_append_f32_bf16",
    "unibuf_rope_kv_append_f16_f32",
    "unibuf_rope_kv_append_f16_f16",
    "unibuf_rope_kv_append_f16_bf16",
    "unibuf_rope_kv_append_bf16_f32",
    "unibuf_rope_kv_append_bf16_f16",
    "unibuf_rope_kv_append_bf16_bf16",
];
const ATTENTION_NAMES: [&str; 9] = [
    "unibuf_attention_f32_f32",
    "unibuf_attention_f32_f16",
    "unibuf_attention_f32_bf16",
    "unibuf_attention_f16_f32",
    "unibuf_attention_f16_f16",
    "unibuf_attention_f16_bf16",
    "unibuf_attention_bf16_f32",
    "unibuf_attention_bf16_f16",
    "unibuf_attention_bf16_bf16",
];
const SPLIT_NAMES: [&str; 9] = [
    "unibuf_attention_split_f32_f32",
    "unibuf_attention_split_f32_f16",
    "unibuf_attention_split_f32_bf16",
    "unibuf_attention_split_f16_f32",
    "unibuf_attention_split_f16_f16",
    "unibuf_attention_split_f16_bf16",
    "unibuf_attention_split_bf16_f32",
    "unibuf_attention_split_bf16_f16",
    "unibuf_attention_split_bf16_bf16",
];
/// The source of pair `n`: the whole file with `UB_AT_PAIR` set, so that compiling one kernel
/// compiles only its pair's three entry points rather than all twenty-seven.
macro_rules! cuda_pair {
    ($n:literal) => {
        concat!(
            "#define UB_AT_PAIR ",
            $n,
            "\n",
            include_str!("cuda/common.cuh"),
            include_str!("cuda/attention.cu")
        )
    };
}
macro_rules! msl_pair {
    ($n:literal) => {
        concat!(
            "#define UB_AT_PAIR ",
            $n,
            "\n",
            include_str!("msl/attention.metal")
        )
    };
}

const CUDA: [&str; 9] = [
    cuda_pair!(0),
    cuda_pair!(1),
    cuda_pair!(2),
    cuda_pair!(3),
    cuda_pair!(4),
    cuda_pair!(5),
    cuda_pair!(6),
    cuda_pair!(7),
    cuda_pair!(8),
];
const MSL: [&str; 9] = [
    msl_pair!(0),
    msl_pair!(1),
    msl_pair!(2),
    msl_pair!(3),
    msl_pair!(4),
    msl_pair!(5),
    msl_pair!(6),
    msl_pair!(7),
    msl_pair!(8),
];

const fn rope_params(q: DType, c: DType) -> [Param; 14] {
    [
        Param::input("query", q),
        Param::input("key", q),
        Param::input("value", q),
        Param::input("positions", DType::U32),
        Param::output("query_out", q),
        Param::output("k_cache", c),
        Param::output("v_cache", c),
        Param::scalar("tokens", ScalarType::U32),
        Param::scalar("heads", ScalarType::U32),
        Param::scalar("kv_heads", ScalarType::U32),
        Param::scalar("head_dim", ScalarType::U32),
        Param::scalar("capacity", ScalarType::U32),
        Param::scalar("theta_base", ScalarType::F32),
        Param::scalar("style", ScalarType::U32),
    ]
}

const fn attention_params(q: DType, c: DType) -> [Param; 11] {
    [
        Param::input("query", q),
        Param::input("k_cache", c),
        Param::input("v_cache", c),
        Param::input("positions", DType::U32),
        Param::output("out", q),
        Param::scalar("tokens", ScalarType::U32),
        Param::scalar("heads", ScalarType::U32),
        Param::scalar("kv_heads", ScalarType::U32),
        Param::scalar("head_dim", ScalarType::U32),
        Param::scalar("capacity", ScalarType::U32),
        Param::scalar("scale", ScalarType::F32),
    ]
}

/// The split kernel's: the output, the f32 partials it merges, and the counters (read and
/// written: outputs, so that the launch checks and the hazard tracking see them).
const fn split_params(q: DType, c: DType) -> [Param; 15] {
    [
        Param::input("query", q),
        Param::input("k_cache", c),
        Param::input("v_cache", c),
        Param::input("positions", DType::U32),
        Param::output("out", q),
        Param::output("partial_out", DType::F32),
        Param::output("partial_stats", DType::F32),
        Param::output("counters", DType::U32),
        Param::scalar("tokens", ScalarType::U32),
        Param::scalar("heads", ScalarType::U32),
        Param::scalar("kv_heads", ScalarType::U32),
        Param::scalar("head_dim", ScalarType::U32),
        Param::scalar("capacity", ScalarType::U32),
        Param::scalar("scale", ScalarType::F32),
        Param::scalar("splits", ScalarType::U32),
    ]
}

/// One table entry per pair `3 * query + cache`, built by `make`.
macro_rules! pair_table {
    ($make:ident) => {
        [
            $make(FLOATS[0], FLOATS[0]),
            $make(FLOATS[0], FLOATS[1]),
            $make(FLOATS[0], FLOATS[2]),
            $make(FLOATS[1], FLOATS[0]),
            $make(FLOATS[1], FLOATS[1]),
            $make(FLOATS[1], FLOATS[2]),
            $make(FLOATS[2], FLOATS[0]),
            $make(FLOATS[2], FLOATS[1]),
            $make(FLOATS[2], FLOATS[2]),
        ]
    };
}

const ROPE_PARAMS: [[Param; 14]; 9] = pair_table!(rope_params);
const ATTENTION_PARAMS: [[Param; 11]; 9] = pair_table!(attention_params);
const SPLIT_PARAMS: [[Param; 15]; 9] = pair_table!(split_params);

const fn source(
    name: &'static str,
    params: &'static [Param],
    cuda: &'static str,
    msl: &'static str,
    cpu: CpuKernelFn,
) -> KernelSource {
    KernelSource {
        name,
        params,
        cuda: Some(cuda),
        msl: Some(msl),
        cpu: Some(cpu),
    }
}

/// The three kernels of pair `n` (query storage `$q`, cache storage `$c`).
macro_rules! pair_kernels {
    ($n:literal, $q:ty, $c:ty) => {
        [
            source(
                ROPE_NAMES[$n],
                &ROPE_PARAMS[$n],
                CUDA[$n],
                MSL[$n],
                rope_kv_cpu::<$q, $c>,
            ),
            source(
                ATTENTION_NAMES[$n],
                &ATTENTION_PARAMS[$n],
                CUDA[$n],
                MSL[$n],
                attention_cpu::<$q, $c>,
            ),
            source(
                SPLIT_NAMES[$n],
                &SPLIT_PARAMS[$n],
                CUDA[$n],
                MSL[$n],
                split_cpu::<$q, $c>,
            ),
        ]
    };
}

const PAIRS: [[KernelSource; 3]; 9] = [
    pair_kernels!(0, f32, f32),
    pair_kernels!(1, f32, f16),
    pair_kernels!(2, f32, bf16),
    pair_kernels!(3, f16, f32),
    pair_kernels!(4, f16, f16),
    pair_kernels!(5, f16, bf16),
    pair_kernels!(6, bf16, f32),
    pair_kernels!(7, bf16, f16),
    pair_kernels!(8, bf16, bf16),
];

const fn flatten(pairs: [[KernelSource; 3]; 9]) -> [KernelSource; 27] {
    let mut all = [pairs[0][0]; 27];
    let mut i = 0;
    while i < 27 {
        all[i] = pairs[i / 3][i % 3];
        i += 1;
    }
    all
}

pub(crate) const KERNELS: &[KernelSource] = &flatten(PAIRS);

/// The index of a float dtype in the kernel tables.
fn float_index(op: &'static str, b: &Buffer) -> Result<usize> {
    expect_float(op, b)?;
    Ok(FLOATS.iter().position(|&d| d == b.dtype()).unwrap_or(0))
}

/// What the checks call each argument, per op.
struct Names {
    op: &'static str,
    query: &'static str,
    k_cache: &'static str,
    v_cache: &'static str,
    positions: &'static str,
}

const ROPE_KV: Names = Names {
    op: "rope_kv_append",
    query: "rope_kv_append: query",
    k_cache: "rope_kv_append: k_cache",
    v_cache: "rope_kv_append: v_cache",
    positions: "rope_kv_append: positions",
};

const ATTENTION: Names = Names {
    op: "attention",
    query: "attention: query",
    k_cache: "attention: k_cache",
    v_cache: "attention: v_cache",
    positions: "attention: positions",
};

/// The geometry of a call, checked, as kernel arguments; `pair` indexes the kernel tables.
#[derive(Clone, Copy, Debug)]
struct Geometry {
    tokens: u32,
    heads: u32,
    kv_heads: u32,
    head_dim: u32,
    capacity: u32,
    pair: usize,
}

/// The three dimensions of `b`, or a shape mismatch naming `layout`.
fn dims3(what: &'static str, b: &Buffer, layout: &str) -> Result<[usize; 3]> {
    match *b.shape() {
        [x, y, z] => Ok([x, y, z]),
        _ => Err(Error::ShapeMismatch {
            what,
            expected: layout.to_owned(),
            got: format!("{:?}", b.shape()),
        }),
    }
}

/// The checks both ops share: the query, the caches and the positions, on `q`'s device.
fn check_common(
    n: &Names,
    q: &Queue,
    query: &Buffer,
    k_cache: &Buffer,
    v_cache: &Buffer,
    positions: &Buffer,
) -> Result<Geometry> {
    q.check_buffer(n.query, query)?;
    q.check_buffer(n.k_cache, k_cache)?;
    q.check_buffer(n.v_cache, v_cache)?;
    q.check_buffer(n.positions, positions)?;
    let query_index = float_index(n.query, query)?;
    let cache_index = float_index(n.k_cache, k_cache)?;
    let [tokens, heads, head_dim] = dims3(n.query, query, "[tokens, heads, head_dim]")?;
    let [capacity, kv_heads, cache_dim] =
        dims3(n.k_cache, k_cache, "[capacity, kv_heads, head_dim]")?;
    expect_dtype(n.v_cache, v_cache, k_cache.dtype())?;
    expect_shape(n.v_cache, v_cache, k_cache.shape())?;
    if [tokens, heads, head_dim, capacity, kv_heads].contains(&0) {
        return Err(Error::invalid(
            n.op,
            format!(
                "query '{}' {:?} and k_cache '{}' {:?}: tokens, heads, head_dim, capacity and \
                 kv_heads must be non-zero",
                query.label(),
                query.shape(),
                k_cache.label(),
                k_cache.shape()
            ),
        ));
    }
    if cache_dim != head_dim {
        return Err(Error::ShapeMismatch {
            what: n.k_cache,
            expected: format!("[capacity, kv_heads, {head_dim}] (the query's head_dim)"),
            got: format!("{:?}", k_cache.shape()),
        });
    }
    if !head_dim.is_multiple_of(2) || head_dim > MAX_HEAD_DIM {
        return Err(Error::invalid(
            n.op,
            format!("head_dim = {head_dim}: must be even and at most {MAX_HEAD_DIM}"),
        ));
    }
    if !heads.is_multiple_of(kv_heads) {
        return Err(Error::invalid(
            n.op,
            format!(
                "heads = {heads} is not a multiple of kv_heads = {kv_heads} (each kv head serves \
                 heads / kv_heads query heads)"
            ),
        ));
    }
    if capacity > MAX_CAPACITY {
        return Err(Error::invalid(
            n.op,
            format!("capacity = {capacity} positions: at most {MAX_CAPACITY}"),
        ));
    }
    expect_dtype(n.positions, positions, DType::U32)?;
    expect_shape(n.positions, positions, &[tokens])?;
    Ok(Geometry {
        tokens: index_u32(n.query, tokens)?,
        heads: index_u32(n.query, heads)?,
        kv_heads: index_u32(n.k_cache, kv_heads)?,
        head_dim: index_u32(n.query, head_dim)?,
        capacity: index_u32(n.k_cache, capacity)?,
        pair: 3 * query_index + cache_index,
    })
}

/// RoPE on `query` and `key` at `positions`, with the rotated key and the value appended to the
/// caches at those positions: `query_out[t] = rope(query[t], positions[t])`,
/// `k_cache[positions[t]] = rope(key[t], positions[t])` and `v_cache[positions[t]] = value[t]`.
///
/// `query` is `[tokens, heads, head_dim]`, `key` and `value` `[tokens, kv_heads, head_dim]`, all
/// of one float dtype (f32, f16 or bf16); `positions` U32 `[tokens]`; `query_out` the shape and
/// dtype of `query`; `k_cache` and `v_cache` each `[capacity, kv_heads, head_dim]` of one float
/// dtype, which may differ from the query's. `head_dim` is even and at most 256, `heads` a
/// multiple of `kv_heads`, `theta_base` finite and positive. The rotation is the arithmetic of
/// [`rope`](super::rope) exactly (the same f32 inverse frequency, angle and rotation, rounded
/// once to each output's dtype), in either [`RopeStyle`].
///
/// A position at or past `capacity` (device data, which the kernel cannot refuse) leaves the
/// caches untouched for that row; its `query_out` row is still written, and [`attention`] gives
/// it NaN. Positions within one call should differ: for two rows at one position, which one the
/// caches keep is unspecified. Nothing written may overlap an input or another output. Returns
/// the fence of the submission.
#[allow(clippy::too_many_arguments)]
pub fn rope_kv_append_into(
    q: &Queue,
    query: &Buffer,
    key: &Buffer,
    value: &Buffer,
    positions: &Buffer,
    theta_base: f32,
    style: RopeStyle,
    query_out: &Buffer,
    k_cache: &Buffer,
    v_cache: &Buffer,
) -> Result<Fence> {
    let n = &ROPE_KV;
    let g = check_common(n, q, query, k_cache, v_cache, positions)?;
    let kv_shape = [g.tokens as usize, g.kv_heads as usize, g.head_dim as usize];
    for (what, b) in [
        ("rope_kv_append: key", key),
        ("rope_kv_append: value", value),
    ] {
        q.check_buffer(what, b)?;
        expect_dtype(what, b, query.dtype())?;
        expect_shape(what, b, &kv_shape)?;
    }
    q.check_buffer("rope_kv_append: query_out", query_out)?;
    expect_dtype("rope_kv_append: query_out", query_out, query.dtype())?;
    expect_shape("rope_kv_append: query_out", query_out, query.shape())?;
    if !(theta_base.is_finite() && theta_base > 0.0) {
        return Err(Error::invalid(
            "rope_kv_append: theta_base",
            format!("{theta_base} must be finite and positive"),
        ));
    }
    let k = kernel(q, ROPE_NAMES[g.pair])?;
    // One thread per (token, pair); each loops over the heads.
    let pairs = u64::from(g.tokens) * u64::from(g.head_dim / 2);
    let blocks = pairs
        .div_ceil(u64::from(ROPE_THREADS))
        .clamp(1, ROPE_MAX_BLOCKS) as u32;
    q.launch(
        &k,
        LaunchDims::linear(blocks, ROPE_THREADS),
        &[
            query.into(),
            key.into(),
            value.into(),
            positions.into(),
            query_out.into(),
            k_cache.into(),
            v_cache.into(),
            g.tokens.into(),
            g.heads.into(),
            g.kv_heads.into(),
            g.head_dim.into(),
            g.capacity.into(),
            theta_base.into(),
            style.code().into(),
        ],
    )
}

/// Causal grouped-query attention over the KV caches, into a fresh buffer of the shape and
/// dtype of `query`: query row `t`, head `h` attends to the cache rows `0..=positions[t]` of kv
/// head `h / (heads / kv_heads)`, `out = softmax(scale * q . k) v`.
///
/// `query` is `[tokens, heads, head_dim]` of f32, f16 or bf16; `k_cache` and `v_cache`
/// `[capacity, kv_heads, head_dim]` of one float dtype (not necessarily the query's), filled by
/// [`rope_kv_append_into`]; `positions` U32 `[tokens]`, for chunked prefill typically
/// `start..start + tokens` after appending those tokens. `head_dim` is even and at most 256,
/// `heads` a multiple of `kv_heads`, `scale` finite and positive (`1 / sqrt(head_dim)` for most
/// models). A position at or past `capacity` gives that query row NaN: positions are device
/// data, which the kernels cannot refuse, and NaN makes the bad one visible.
///
/// Scores, softmax and the weighted sum are f32 (the exponentials as `exp2` of scores scaled
/// by `log2 e`), the output rounded once to its dtype. Returns once queued.
///
/// ```
/// use unibuf::ops::{self, RopeStyle};
/// use unibuf::{DType, Device, StorageMode};
/// let dev = Device::open("cpu")?;
/// let q = dev.queue();
/// // A cache of 8 positions, one kv head of head_dim 2, for one query head.
/// let k_cache = dev.alloc(DType::F32, &[8, 1, 2], StorageMode::Shared)?;
/// let v_cache = dev.alloc(DType::F32, &[8, 1, 2], StorageMode::Shared)?;
/// // Prefill two tokens at positions 0 and 1: RoPE, append k and v, attend.
/// let query = dev.from_slice("query", &[1.0f32, 0.0, 0.0, 1.0], &[2, 1, 2])?;
/// let key = dev.from_slice("key", &[1.0f32, 0.0, 1.0, 0.0], &[2, 1, 2])?;
/// let value = dev.from_slice("value", &[1.0f32, 2.0, 3.0, 4.0], &[2, 1, 2])?;
/// let positions = dev.from_slice("positions", &[0u32, 1], &[2])?;
/// let rotated = dev.alloc(DType::F32, &[2, 1, 2], StorageMode::Shared)?;
/// ops::rope_kv_append_into(
///     &q, &query, &key, &value, &positions, 10_000.0, RopeStyle::Neox, &rotated, &k_cache,
///     &v_cache,
/// )?;
/// let out = ops::attention(&q, &rotated, &k_cache, &v_cache, &positions, 1.0)?;
/// let out = q.download::<f32>(&out)?;
/// // Token 0 sees only itself: its output is its value.
/// assert_eq!(&out[..2], &[1.0, 2.0]);
/// // Token 1 averages both values: each output lies between them.
/// assert!(out[2] > 1.0 && out[2] < 3.0 && out[3] > 2.0 && out[3] < 4.0);
/// # Ok::<(), unibuf::Error>(())
/// ```
pub fn attention(
    q: &Queue,
    query: &Buffer,
    k_cache: &Buffer,
    v_cache: &Buffer,
    positions: &Buffer,
    scale: f32,
) -> Result<Buffer> {
    check_attention(q, query, k_cache, v_cache, positions, scale)?;
    let out = output(q, "attention", query.dtype(), query.shape())?;
    attention_into(q, query, k_cache, v_cache, positions, scale, &out)?;
    Ok(out)
}

/// [`attention`] into `out` (the shape and dtype of `query`, overlapping no input). Returns the
/// fence of its one launch.
///
/// When the keys are split (see the module docs), the op allocates its scratch itself: f32
/// partials and one U32 counter per group of split blocks, which it zeroes with a fill right
/// away (outside any [`LaunchBatch`](crate::LaunchBatch) being recorded, and ordered before the
/// launch by the counters' use tracking). The kernel leaves the counters at zero, so a batch
/// that records this call (and keeps the scratch alive) can be replayed any number of times;
/// each call gets scratch of its own, so the attentions of several layers can share a batch.
pub fn attention_into(
    q: &Queue,
    query: &Buffer,
    k_cache: &Buffer,
    v_cache: &Buffer,
    positions: &Buffer,
    scale: f32,
    out: &Buffer,
) -> Result<Fence> {
    let g = check_attention(q, query, k_cache, v_cache, positions, scale)?;
    q.check_buffer("attention: out", out)?;
    expect_dtype("attention: out", out, query.dtype())?;
    expect_shape("attention: out", out, query.shape())?;
    expect_disjoint("attention: out", out, &[query, k_cache, v_cache, positions])?;
    let group = (g.heads / g.kv_heads) as usize;
    let blocks_per_split = g.tokens as usize * g.kv_heads as usize * group.div_ceil(GROUP);
    let splits = split_count(blocks_per_split, g.capacity as usize);
    let dims = |splits: usize| {
        let items = blocks_per_split as u64 * splits as u64;
        LaunchDims::linear(items.min(i32::MAX as u64) as u32, THREADS)
    };
    if splits == 1 {
        let k = kernel(q, ATTENTION_NAMES[g.pair])?;
        return q.launch(
            &k,
            dims(1),
            &[
                query.into(),
                k_cache.into(),
                v_cache.into(),
                positions.into(),
                out.into(),
                g.tokens.into(),
                g.heads.into(),
                g.kv_heads.into(),
                g.head_dim.into(),
                g.capacity.into(),
                scale.into(),
            ],
        );
    }
    // The kernel before any allocation: a compile failure leaves nothing half done.
    let split = kernel(q, SPLIT_NAMES[g.pair])?;
    let rows = g.tokens as usize * g.heads as usize * splits;
    let outs = rows * g.head_dim as usize;
    let scratch = output(q, "attention: partials", DType::F32, &[outs + 2 * rows])?;
    let partial_out = scratch.slice(0..outs)?;
    let partial_stats = scratch.slice(outs..outs + 2 * rows)?;
    // One counter per group of split blocks (a token, a kv head, a chunk of its query heads),
    // zeroed once here: a transfer, which runs now even on a queue recording a batch.
    let counters = output(
        q,
        "attention: split counters",
        DType::U32,
        &[blocks_per_split],
    )?;
    q.fill_async(&counters, FillPattern::of(0u32))?;
    let splits = index_u32("attention: splits", splits)?;
    q.launch(
        &split,
        dims(splits as usize),
        &[
            query.into(),
            k_cache.into(),
            v_cache.into(),
            positions.into(),
            out.into(),
            (&partial_out).into(),
            (&partial_stats).into(),
            (&counters).into(),
            g.tokens.into(),
            g.heads.into(),
            g.kv_heads.into(),
            g.head_dim.into(),
            g.capacity.into(),
            scale.into(),
            splits.into(),
        ],
    )
}

/// The checks of [`attention`] before its output.
fn check_attention(
    q: &Queue,
    query: &Buffer,
    k_cache: &Buffer,
    v_cache: &Buffer,
    positions: &Buffer,
    scale: f32,
) -> Result<Geometry> {
    let g = check_common(&ATTENTION, q, query, k_cache, v_cache, positions)?;
    if !(scale.is_finite() && scale > 0.0) {
        return Err(Error::invalid(
            "attention: scale",
            format!("{scale} must be finite and positive"),
        ));
    }
    Ok(g)
}

/// Refuses `out` overlapping any of `inputs` (checked before the first of several launches,
/// so that none runs).
fn expect_disjoint(what: &'static str, out: &Buffer, inputs: &[&Buffer]) -> Result<()> {
    let o = out.byte_range();
    for b in inputs {
        let r = b.byte_range();
        if out.shares_memory_with(b) && o.start < r.end && r.start < o.end {
            return Err(Error::invalid(
                what,
                format!(
                    "'{}' (bytes {}..{}) overlaps an input (bytes {}..{} of the same allocation)",
                    out.label(),
                    o.start,
                    o.end,
                    r.start,
                    r.end
                ),
            ));
        }
    }
    Ok(())
}

/// How many splits the keys of each row get: one when the rows alone make `TARGET_BLOCKS`
/// blocks (prefill), else enough splits to reach it, but no more than leave each split
/// `MIN_SPLIT_KEYS` keys of a row at full capacity, and at most `MAX_SPLITS`.
/// `blocks_per_split` is tokens x kv_heads x ceil(heads per kv head / `GROUP`).
///
/// A heuristic, reasoned rather than measured. With the merge folded into the split kernel, a
/// split costs no launch; what it costs is one block's fixed work (a dependent read of the
/// position, the query load, the warps' merge through shared memory, the fenced partial store
/// and the atomic), which runs in parallel with the other blocks as long as they all fit on the
/// GPU at once, plus one more partial for the merging block to read (8 warps take the splits in
/// turn). A block's keys cost one dependent step per 32 (8 warps x 4 keys). So for batch-1
/// decode of SmolLM2-135M (9 query heads over 3 kv heads: 3 blocks per split):
/// - about two blocks per SM (264 on an H100's 132 SMs, 88 splits) keep every block resident in
///   one wave, and reach the HBM bandwidth a long row needs (at 8192 keys, 94 keys and 3 steps a
///   block); more splits would start a second wave and lengthen the merge;
/// - at least 64 keys per split of a full row balance the steps against the merge: halving a
///   split to 32 keys saves one step but doubles the partials to merge;
/// - rows shorter than the capacity keep the device's chunk of at least `MIN_CHUNK` keys (one
///   step), so a short row spreads over a few blocks and the other splits are empty: they only
///   store (-inf, 0) and count in, and their partial outputs are not read.
///
/// That gives 88 splits from a capacity of 5632 on (every length from 16 to 8192 then takes 1
/// to 3 steps a block), 32 at 2048, 16 at 1024, and one split (the single kernel) below 128.
fn split_count(blocks_per_split: usize, capacity: usize) -> usize {
    if blocks_per_split >= TARGET_BLOCKS {
        return 1;
    }
    TARGET_BLOCKS
        .div_ceil(blocks_per_split.max(1))
        .min(capacity / MIN_SPLIT_KEYS)
        .clamp(1, MAX_SPLITS)
}

/// The keys split `s` of `splits` takes of a row of `len` keys, as the kernels compute it:
/// chunks of `max(ceil(len / splits), MIN_CHUNK)` keys, so that the splits follow the row's
/// length (trailing splits of a short row are empty).
fn split_range(len: usize, splits: usize, s: usize) -> Range<usize> {
    let chunk = len.div_ceil(splits).max(MIN_CHUNK);
    let begin = (s * chunk).min(len);
    begin..(begin + chunk).min(len)
}

/// `dims` multiplied, or an error naming the kernel (bad scalars from a direct launch).
fn product(kernel: &str, dims: &[usize]) -> Result<usize, String> {
    dims.iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or_else(|| format!("{kernel}: {dims:?} overflows"))
}

fn rope_kv_cpu<Q: HostFloat, C: HostFloat>(args: &mut CpuKernelArgs<'_>) -> Result<(), String> {
    const NAME: &str = "rope_kv_append";
    let tokens = args.u32(7)? as usize;
    let heads = args.u32(8)? as usize;
    let kv_heads = args.u32(9)? as usize;
    let head_dim = args.u32(10)? as usize;
    let capacity = args.u32(11)? as usize;
    let theta = args.f32(12)?;
    let style = args.u32(13)?;
    if heads == 0 || kv_heads == 0 || head_dim == 0 || !head_dim.is_multiple_of(2) || style > 1 {
        return Err(format!(
            "{NAME}: heads {heads}, kv_heads {kv_heads}, head_dim {head_dim} must be non-zero \
             and head_dim even, style {style} 0 or 1"
        ));
    }
    let q_row = heads * head_dim;
    let kv_row = kv_heads * head_dim;
    let query = args.input::<Q>(0)?;
    let key = args.input::<Q>(1)?;
    let value = args.input::<Q>(2)?;
    let positions = args.input::<u32>(3)?;
    let query_out = args.output::<Q>(4)?;
    let k_cache = args.output::<C>(5)?;
    let v_cache = args.output::<C>(6)?;
    let n_query = product(NAME, &[tokens, q_row])?;
    let n_kv = product(NAME, &[tokens, kv_row])?;
    let n_cache = product(NAME, &[capacity, kv_row])?;
    expect_len(NAME, "query", query.len(), n_query)?;
    expect_len(NAME, "key", key.len(), n_kv)?;
    expect_len(NAME, "value", value.len(), n_kv)?;
    expect_len(NAME, "positions", positions.len(), tokens)?;
    expect_len(NAME, "query_out", query_out.len(), n_query)?;
    expect_len(NAME, "k_cache", k_cache.len(), n_cache)?;
    expect_len(NAME, "v_cache", v_cache.len(), n_cache)?;
    // The arithmetic of `ops::rope`, shared with its CPU version and the fused QKV kernel's.
    rope_kv_rows(
        query, key, value, positions, query_out, k_cache, v_cache, head_dim, theta, style,
    );
    Ok(())
}

/// The scalars the attention kernels share, from argument `at` on: tokens, heads, kv_heads,
/// head_dim, capacity and scale.
struct CpuGeometry {
    tokens: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    capacity: usize,
    scale: f32,
}

impl CpuGeometry {
    fn read(name: &str, args: &CpuKernelArgs<'_>, at: usize) -> Result<CpuGeometry, String> {
        let g = CpuGeometry {
            tokens: args.u32(at)? as usize,
            heads: args.u32(at + 1)? as usize,
            kv_heads: args.u32(at + 2)? as usize,
            head_dim: args.u32(at + 3)? as usize,
            capacity: args.u32(at + 4)? as usize,
            scale: args.f32(at + 5)?,
        };
        if g.kv_heads == 0
            || g.heads == 0
            || !g.heads.is_multiple_of(g.kv_heads)
            || g.head_dim == 0
            || g.head_dim > MAX_HEAD_DIM
        {
            return Err(format!(
                "{name}: heads {} must be a non-zero multiple of kv_heads {}, head_dim {} in \
                 1..={MAX_HEAD_DIM}",
                g.heads, g.kv_heads, g.head_dim
            ));
        }
        Ok(g)
    }

    /// Checks the buffers' lengths against the geometry.
    fn expect_lens(
        &self,
        name: &str,
        query: usize,
        k: usize,
        v: usize,
        pos: usize,
    ) -> Result<(), String> {
        let n_query = product(name, &[self.tokens, self.heads, self.head_dim])?;
        let n_cache = product(name, &[self.capacity, self.kv_heads, self.head_dim])?;
        expect_len(name, "query", query, n_query)?;
        expect_len(name, "k_cache", k, n_cache)?;
        expect_len(name, "v_cache", v, n_cache)?;
        expect_len(name, "positions", pos, self.tokens)
    }
}

/// Where the attention of each (token, head) row goes: the output (one split), or the partials
/// of each of `splits` splits.
enum Sink<'a, Q> {
    Out(&'a mut [Q]),
    Partials {
        out: &'a mut [f32],
        stats: &'a mut [f32],
        splits: usize,
    },
}

/// Rows `0..len` of kv head `h` of a cache `[capacity, kv_heads, head_dim]`, widened to f32
/// into `dst` (`len x head_dim`): once per kv head, for every query head and token it serves.
fn widen_head<C: HostFloat>(
    cache: &[C],
    kv_heads: usize,
    head_dim: usize,
    h: usize,
    len: usize,
    dst: &mut Vec<f32>,
) {
    dst.clear();
    for r in 0..len {
        let at = (r * kv_heads + h) * head_dim;
        dst.extend(cache[at..at + head_dim].iter().map(|v| v.to_f32()));
    }
}

/// `a . b` in f32, with eight partial sums (which the compiler keeps in vector registers).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (a8, a_rest) = a.split_at(a.len() - a.len() % 8);
    let (b8, b_rest) = b.split_at(a8.len());
    for (x, y) in a8.chunks_exact(8).zip(b8.chunks_exact(8)) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let tail: f32 = a_rest.iter().zip(b_rest).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

/// One query row `q` (scaled into log2 units) over the keys `range` of one kv head (`kf`, `vf`:
/// its rows widened to f32): the scores into `scores`, their maximum `m` and the sum `l` of
/// `2^(score - m)` returned, the unnormalised output `sum 2^(score - m) v` into `acc`. An empty
/// range gives `(-inf, 0)` and zeros.
fn attend(
    q: &[f32],
    kf: &[f32],
    vf: &[f32],
    range: Range<usize>,
    scores: &mut Vec<f32>,
    acc: &mut [f32],
) -> (f32, f32) {
    let head_dim = q.len();
    acc.fill(0.0);
    scores.clear();
    scores.extend(
        range
            .clone()
            .map(|k| dot(q, &kf[k * head_dim..(k + 1) * head_dim])),
    );
    let m = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut l = 0.0f32;
    for (k, &s) in range.zip(scores.iter()) {
        let p = (s - m).exp2();
        l += p;
        for (a, &v) in acc.iter_mut().zip(&vf[k * head_dim..(k + 1) * head_dim]) {
            *a += p * v;
        }
    }
    (m, l)
}

/// The attention of every (token, head) row into `sink`, the CPU version of both attention
/// kernels: per kv head, the cache rows up to the longest valid row are widened once, then
/// each query head it serves attends to its rows (two passes in f32: scores, then weights).
fn attention_rows<Q: HostFloat, C: HostFloat>(
    g: &CpuGeometry,
    query: &[Q],
    k_cache: &[C],
    v_cache: &[C],
    positions: &[u32],
    mut sink: Sink<'_, Q>,
) {
    let hd = g.head_dim;
    let group = g.heads / g.kv_heads;
    let max_len = positions
        .iter()
        .map(|&p| p as usize)
        .filter(|&p| p < g.capacity)
        .map(|p| p + 1)
        .max()
        .unwrap_or(0);
    let qscale = g.scale * std::f32::consts::LOG2_E;
    let (mut kf, mut vf, mut scores) = (Vec::new(), Vec::new(), Vec::new());
    let mut qf = vec![0.0f32; hd];
    let mut acc = vec![0.0f32; hd];
    for kvh in 0..g.kv_heads {
        widen_head(k_cache, g.kv_heads, hd, kvh, max_len, &mut kf);
        widen_head(v_cache, g.kv_heads, hd, kvh, max_len, &mut vf);
        for (t, &pos) in positions.iter().enumerate() {
            let pos = pos as usize;
            let valid = pos < g.capacity;
            for h in kvh * group..(kvh + 1) * group {
                let row = t * g.heads + h;
                for (f, x) in qf.iter_mut().zip(&query[row * hd..(row + 1) * hd]) {
                    *f = x.to_f32() * qscale;
                }
                match &mut sink {
                    Sink::Out(out) => {
                        let dst = &mut out[row * hd..(row + 1) * hd];
                        if !valid {
                            dst.fill(Q::from_f32(f32::NAN));
                            continue;
                        }
                        let (_, l) = attend(&qf, &kf, &vf, 0..pos + 1, &mut scores, &mut acc);
                        for (o, a) in dst.iter_mut().zip(&acc) {
                            *o = Q::from_f32(a / l);
                        }
                    }
                    Sink::Partials { out, stats, splits } => {
                        let splits = *splits;
                        for s in 0..splits {
                            let range = if valid {
                                split_range(pos + 1, splits, s)
                            } else {
                                0..0
                            };
                            let (m, l) = attend(&qf, &kf, &vf, range, &mut scores, &mut acc);
                            let at = row * splits + s;
                            out[at * hd..(at + 1) * hd].copy_from_slice(&acc);
                            stats[2 * at] = m;
                            stats[2 * at + 1] = l;
                        }
                    }
                }
            }
        }
    }
}

fn attention_cpu<Q: HostFloat, C: HostFloat>(args: &mut CpuKernelArgs<'_>) -> Result<(), String> {
    const NAME: &str = "attention";
    let g = CpuGeometry::read(NAME, args, 5)?;
    let query = args.input::<Q>(0)?;
    let k_cache = args.input::<C>(1)?;
    let v_cache = args.input::<C>(2)?;
    let positions = args.input::<u32>(3)?;
    let out = args.output::<Q>(4)?;
    g.expect_lens(
        NAME,
        query.len(),
        k_cache.len(),
        v_cache.len(),
        positions.len(),
    )?;
    expect_len(NAME, "out", out.len(), query.len())?;
    attention_rows(&g, query, k_cache, v_cache, positions, Sink::Out(out));
    Ok(())
}

/// The split kernel: every split's partial into the scratch (as the GPU's blocks leave them),
/// then the merge the last block of each group does, into `out`. Sequential, so no split counts
/// in; the counters must be zero, as the op leaves them and as the GPU kernels need them (a
/// non-zero counter is an error here, where on a GPU it would silently skip a merge).
fn split_cpu<Q: HostFloat, C: HostFloat>(args: &mut CpuKernelArgs<'_>) -> Result<(), String> {
    const NAME: &str = "attention_split";
    let g = CpuGeometry::read(NAME, args, 8)?;
    let splits = args.u32(14)? as usize;
    if splits == 0 || splits > MAX_SPLITS {
        return Err(format!(
            "{NAME}: splits {splits} must be in 1..={MAX_SPLITS}"
        ));
    }
    let query = args.input::<Q>(0)?;
    let k_cache = args.input::<C>(1)?;
    let v_cache = args.input::<C>(2)?;
    let positions = args.input::<u32>(3)?;
    let out = args.output::<Q>(4)?;
    let partial_out = args.output::<f32>(5)?;
    let stats = args.output::<f32>(6)?;
    let counters = args.output::<u32>(7)?;
    g.expect_lens(
        NAME,
        query.len(),
        k_cache.len(),
        v_cache.len(),
        positions.len(),
    )?;
    expect_len(NAME, "out", out.len(), query.len())?;
    let rows = product(NAME, &[g.tokens, g.heads, splits])?;
    expect_len(
        NAME,
        "partial_out",
        partial_out.len(),
        product(NAME, &[rows, g.head_dim])?,
    )?;
    expect_len(
        NAME,
        "partial_stats",
        stats.len(),
        product(NAME, &[rows, 2])?,
    )?;
    let chunks = (g.heads / g.kv_heads).div_ceil(GROUP);
    let groups = product(NAME, &[g.tokens, g.kv_heads, chunks])?;
    expect_len(NAME, "counters", counters.len(), groups)?;
    if let Some(i) = counters.iter().position(|&c| c != 0) {
        return Err(format!(
            "{NAME}: counter {i} is {}, not 0: the counters must start at zero",
            counters[i]
        ));
    }
    let sink = Sink::Partials {
        out: &mut *partial_out,
        stats: &mut *stats,
        splits,
    };
    attention_rows(&g, query, k_cache, v_cache, positions, sink);
    merge_splits(&g, partial_out, stats, positions, splits, out);
    Ok(())
}

/// The merge of each (token, head) row's `splits` partials into `out` (NaN for a row whose
/// position is past the cache), as the last block of each group of splits does on a GPU.
fn merge_splits<Q: HostFloat>(
    g: &CpuGeometry,
    partial_out: &[f32],
    stats: &[f32],
    positions: &[u32],
    splits: usize,
    out: &mut [Q],
) {
    let head_dim = g.head_dim;
    let mut acc = vec![0.0f32; head_dim];
    for (row, dst) in out.chunks_exact_mut(head_dim).enumerate() {
        if positions[row / g.heads] as usize >= g.capacity {
            dst.fill(Q::from_f32(f32::NAN));
            continue;
        }
        let st = &stats[row * splits * 2..(row + 1) * splits * 2];
        let po = &partial_out[row * splits * head_dim..(row + 1) * splits * head_dim];
        let mm = st
            .iter()
            .step_by(2)
            .copied()
            .fold(f32::NEG_INFINITY, f32::max);
        acc.fill(0.0);
        let mut ll = 0.0f32;
        for (ml, o) in st.chunks_exact(2).zip(po.chunks_exact(head_dim)) {
            let w = if ml[0] != f32::NEG_INFINITY {
                (ml[0] - mm).exp2()
            } else {
                0.0
            };
            ll += w * ml[1];
            // An empty split's partial is not read (the kernels may leave anything there).
            if w != 0.0 {
                for (a, &v) in acc.iter_mut().zip(o) {
                    *a += w * v;
                }
            }
        }
        for (d, a) in dst.iter_mut().zip(&acc) {
            *d = Q::from_f32(a / ll);
        }
    }
}
