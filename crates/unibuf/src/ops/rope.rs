//! Rotary position embedding (RoPE) of queries or keys `[tokens, heads, head_dim]` at integer
//! positions, in either of the two layouts models use.

use super::row_common::{by_dtype, expect_len, float_kernels, HostFloat};
use super::{expect_dtype, expect_float, expect_shape, index_u32, kernel, output};
use crate::backend::cpu::CpuKernelArgs;
use crate::backend::LaunchDims;
use crate::buffer::Buffer;
use crate::dtype::DType;
use crate::epoch::Fence;
use crate::error::{Error, Result};
use crate::kernel::{KernelSource, Param, ScalarType};
use crate::queue::Queue;

/// Which elements of a head rotate together.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RopeStyle {
    /// Rotate-half: pair `i` is `(i, i + head_dim / 2)`. The layout of GPT-NeoX, Llama and the
    /// Hugging Face transformers implementations.
    Neox,
    /// Interleaved: pair `i` is `(2i, 2i + 1)`. The layout of GPT-J and the original RoFormer.
    Interleaved,
}

impl RopeStyle {
    /// The kernels' `style` argument.
    pub(super) fn code(self) -> u32 {
        match self {
            RopeStyle::Neox => 0,
            RopeStyle::Interleaved => 1,
        }
    }
}

const NAMES: [&str; 3] = ["unibuf_rope_f32", "unibuf_rope_f16", "unibuf_rope_bf16"];

const CUDA: &str = concat!(
    include_str!("cuda/common.cuh"),
    include_str!("cuda/rope.cu")
);
const MSL: &str = include_str!("msl/rope.metal");

/// Threads per block of the launch.
const THREADS: u32 = 256;

/// Blocks at most; the kernel grid-strides over the rest.
const MAX_BLOCKS: u64 = 65_535;

const fn params(dtype: DType) -> [Param; 8] {
    [
        Param::input("x", dtype),
        Param::input("positions", DType::U32),
        Param::output("out", dtype),
        Param::scalar("tokens", ScalarType::U32),
        Param::scalar("heads", ScalarType::U32),
        Param::scalar("head_dim", ScalarType::U32),
        Param::scalar("theta_base", ScalarType::F32),
        Param::scalar("style", ScalarType::U32),
    ]
}

const F32: [Param; 8] = params(DType::F32);
const F16: [Param; 8] = params(DType::F16);
const BF16: [Param; 8] = params(DType::BF16);

pub(crate) const KERNELS: &[KernelSource] = &float_kernels(
    NAMES,
    [&F32, &F16, &BF16],
    CUDA,
    MSL,
    [
        rope_cpu::<f32>,
        rope_cpu::<half::f16>,
        rope_cpu::<half::bf16>,
    ],
);

/// Rotary embedding of `x` (`[tokens, heads, head_dim]`, f32, f16 or bf16, `head_dim` even)
/// at `positions` (u32, `[tokens]`), into a fresh buffer of the shape and dtype of `x`.
///
/// Pair `i` of each head turns by `pos * theta_base^(-2i / head_dim)` (`theta_base` is 10000
/// for most models). The inverse frequency and the angle are computed in f32, as the reference
/// implementations do: the angle's rounding error grows with the position (about 1e-3 rad at
/// position 8192), so results differ from an exact computation by about that much times the
/// values' magnitude. Returns once queued.
pub fn rope(
    q: &Queue,
    x: &Buffer,
    positions: &Buffer,
    theta_base: f32,
    style: RopeStyle,
) -> Result<Buffer> {
    check(x, positions, theta_base)?;
    let out = output(q, "rope", x.dtype(), x.shape())?;
    rope_into(q, x, positions, theta_base, style, &out)?;
    Ok(out)
}

/// [`rope`] into `out` (the dtype and shape of `x`, not overlapping the inputs). Returns the
/// fence of the submission.
pub fn rope_into(
    q: &Queue,
    x: &Buffer,
    positions: &Buffer,
    theta_base: f32,
    style: RopeStyle,
    out: &Buffer,
) -> Result<Fence> {
    let [tokens, heads, head_dim] = check(x, positions, theta_base)?;
    expect_dtype("rope: out", out, x.dtype())?;
    expect_shape("rope: out", out, x.shape())?;
    let k = kernel(q, by_dtype("rope", NAMES, x.dtype())?)?;
    // One thread per (token, pair); each loops over the heads.
    let pairs = u64::from(tokens) * u64::from(head_dim / 2);
    let blocks = pairs.div_ceil(u64::from(THREADS)).clamp(1, MAX_BLOCKS) as u32;
    q.launch(
        &k,
        LaunchDims::linear(blocks, THREADS),
        &[
            x.into(),
            positions.into(),
            out.into(),
            tokens.into(),
            heads.into(),
            head_dim.into(),
            theta_base.into(),
            style.code().into(),
        ],
    )
}

/// Validates the inputs; returns [tokens, heads, head_dim] as kernel arguments.
fn check(x: &Buffer, positions: &Buffer, theta_base: f32) -> Result<[u32; 3]> {
    expect_float("rope", x)?;
    let &[tokens, heads, head_dim] = x.shape() else {
        return Err(Error::ShapeMismatch {
            what: "rope: x",
            expected: "[tokens, heads, head_dim]".to_owned(),
            got: format!("{:?}", x.shape()),
        });
    };
    if tokens == 0 || heads == 0 || head_dim == 0 || head_dim % 2 != 0 {
        return Err(Error::invalid(
            "rope",
            format!(
                "'{}' has shape {:?}: tokens, heads and head_dim must be non-zero and head_dim \
                 even (head_dim = {head_dim})",
                x.label(),
                x.shape()
            ),
        ));
    }
    expect_dtype("rope: positions", positions, DType::U32)?;
    expect_shape("rope: positions", positions, &[tokens])?;
    if !(theta_base.is_finite() && theta_base > 0.0) {
        return Err(Error::invalid(
            "rope: theta_base",
            format!("{theta_base} must be finite and positive"),
        ));
    }
    Ok([
        index_u32("rope: tokens", tokens)?,
        index_u32("rope: heads", heads)?,
        index_u32("rope: head_dim", head_dim)?,
    ])
}

fn rope_cpu<T: HostFloat>(args: &mut CpuKernelArgs<'_>) -> Result<(), String> {
    const NAME: &str = "rope";
    let tokens = args.u32(3)? as usize;
    let heads = args.u32(4)? as usize;
    let head_dim = args.u32(5)? as usize;
    let theta = args.f32(6)?;
    let style = args.u32(7)?;
    let x = args.input::<T>(0)?;
    let positions = args.input::<u32>(1)?;
    let out = args.output::<T>(2)?;
    if head_dim == 0 || !head_dim.is_multiple_of(2) || style > 1 {
        return Err(format!(
            "{NAME}: head_dim {head_dim} must be even and non-zero, style {style} 0 or 1"
        ));
    }
    let n = tokens
        .checked_mul(heads)
        .and_then(|v| v.checked_mul(head_dim))
        .ok_or_else(|| format!("{NAME}: {tokens} x {heads} x {head_dim} overflows"))?;
    expect_len(NAME, "x", x.len(), n)?;
    expect_len(NAME, "positions", positions.len(), tokens)?;
    expect_len(NAME, "out", out.len(), n)?;
    // The rotation of each pair at each token, the same f32 arithmetic as the GPU kernels.
    let inv_freq = inverse_frequencies(theta, head_dim);
    let mut rot = Vec::with_capacity(inv_freq.len());
    let row = heads * head_dim;
    for ((xt, yt), &pos) in x
        .chunks_exact(row)
        .zip(out.chunks_exact_mut(row))
        .zip(positions)
    {
        rotations(&inv_freq, pos, &mut rot);
        rotate_heads(xt, yt, &rot, head_dim, style);
    }
    Ok(())
}

/// The inverse frequency of each pair `i` of a head, `theta^(-2i / head_dim)`, in f32 as the
/// kernels compute it (shared by the CPU versions of [`rope`], [`rope_kv_rows`] and
/// [`rope_kv_append_into`](super::rope_kv_append_into)).
pub(super) fn inverse_frequencies(theta: f32, head_dim: usize) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|i| theta.powf(-((2 * i) as f32 / head_dim as f32)))
        .collect()
}

/// `(sin, cos)` of each pair's angle `pos * inv_freq` (f32) at position `pos`, into `rot`.
pub(super) fn rotations(inv_freq: &[f32], pos: u32, rot: &mut Vec<(f32, f32)>) {
    let pos = pos as f32;
    rot.clear();
    rot.extend(inv_freq.iter().map(|f| (pos * f).sin_cos()));
}

/// Turns every head of `x` by `rot` into `y` (both whole heads of `head_dim`, `rot` one entry
/// per pair), the pairs laid out as `style`'s kernel code says (0 rotate-half, 1 interleaved).
/// Each output is computed in f32 and rounded once to `Y`.
pub(super) fn rotate_heads<X: HostFloat, Y: HostFloat>(
    x: &[X],
    y: &mut [Y],
    rot: &[(f32, f32)],
    head_dim: usize,
    style: u32,
) {
    let half_dim = head_dim / 2;
    for (xh, yh) in x.chunks_exact(head_dim).zip(y.chunks_exact_mut(head_dim)) {
        for (i, &(s, c)) in rot.iter().enumerate() {
            let (a, b) = if style == 0 {
                (i, i + half_dim)
            } else {
                (2 * i, 2 * i + 1)
            };
            let (xa, xb) = (xh[a].to_f32(), xh[b].to_f32());
            yh[a] = Y::from_f32(xa * c - xb * s);
            yh[b] = Y::from_f32(xb * c + xa * s);
        }
    }
}

/// The CPU arithmetic of RoPE with the KV-cache append, shared by the CPU versions of
/// [`rope_kv_append_into`](super::rope_kv_append_into) and
/// [`ggml_qkv_rope_append_into`](super::ggml_qkv_rope_append_into) (whose query, key and value
/// are its f32 products). Token `t` is at `positions[t]`: `query_out[t] = rope(query[t])` and,
/// when that position is below the capacity (`k_cache.len() / kv_row`),
/// `k_cache[pos] = rope(key[t])` and `v_cache[pos] = value[t]`; no other cache row is touched.
/// The rotation is [`rope`]'s, each output computed in f32 and rounded once to its dtype.
///
/// `query` and `query_out` hold one row of whole heads per token, `key` and `value` one row of
/// `kv_row` values (whole heads) per token, the caches `kv_row` values per position; the
/// callers have checked those lengths.
#[allow(clippy::too_many_arguments)]
pub(super) fn rope_kv_rows<Q: HostFloat, C: HostFloat>(
    query: &[Q],
    key: &[Q],
    value: &[Q],
    positions: &[u32],
    query_out: &mut [Q],
    k_cache: &mut [C],
    v_cache: &mut [C],
    head_dim: usize,
    theta: f32,
    style: u32,
) {
    let tokens = positions.len();
    if tokens == 0 || head_dim == 0 {
        return;
    }
    let q_row = query.len() / tokens;
    let kv_row = key.len() / tokens;
    let capacity = k_cache.len().checked_div(kv_row).unwrap_or(0);
    let inv_freq = inverse_frequencies(theta, head_dim);
    let mut rot = Vec::with_capacity(inv_freq.len());
    for (t, &pos) in positions.iter().enumerate() {
        rotations(&inv_freq, pos, &mut rot);
        let rows = t * q_row..(t + 1) * q_row;
        rotate_heads(
            &query[rows.clone()],
            &mut query_out[rows],
            &rot,
            head_dim,
            style,
        );
        let p = pos as usize;
        if p >= capacity {
            continue; // past the cache: nothing stored
        }
        let src = t * kv_row..(t + 1) * kv_row;
        let dst = p * kv_row..(p + 1) * kv_row;
        rotate_heads(
            &key[src.clone()],
            &mut k_cache[dst.clone()],
            &rot,
            head_dim,
            style,
        );
        for (c, v) in v_cache[dst].iter_mut().zip(&value[src]) {
            *c = C::from_f32(v.to_f32());
        }
    }
}
