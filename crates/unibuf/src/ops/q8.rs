//! Activations quantised to int8 per block of 32 values ([`Q8Activations`], where the
//! definition is), the input of the integer path of the 4-bit matvec
//! ([`q4_matvec_q8`](super::q4_matvec_q8)).

use super::q4::XFloat;
use super::row_common::expect_len;
use super::{index_u32, output};
use crate::backend::cpu::CpuKernelArgs;
use crate::backend::LaunchDims;
use crate::buffer::Buffer;
use crate::device::Device;
use crate::dtype::DType;
use crate::epoch::Fence;
use crate::error::{Error, Result};
use crate::kernel::{KernelSource, Param, ScalarType};
use crate::queue::Queue;
use crate::storage::StorageMode;
use half::f16;

/// Values per quantisation block of [`Q8Activations`] (one scale each); the columns of `x`
/// must be a multiple of it.
pub const Q8_BLOCK: usize = 32;

const F32_KERNEL: &str = "unibuf_quantize_q8_f32";
const F16_KERNEL: &str = "unibuf_quantize_q8_f16";

/// Threads per block of the CUDA kernel (one warp per 32-value block).
const THREADS: u32 = 256;
/// The grid is capped here; the kernels grid-stride over the remaining blocks.
const MAX_BLOCKS: u32 = 65_535;

/// The CUDA source of the quantisation and of the integer matvec (one file: they share the
/// definition of the activations).
pub(super) const CUDA: &str = concat!(
    include_str!("cuda/common.cuh"),
    include_str!("cuda/q4_q8.cu")
);
/// The Metal source of the quantisation and of the integer matvec.
pub(super) const MSL: &str = include_str!("msl/q4_q8.metal");

const fn params(x: DType) -> [Param; 5] {
    [
        Param::input("x", x),
        Param::output("values", DType::I8),
        Param::output("scales", DType::F32),
        Param::output("sums", DType::I32),
        Param::scalar("blocks", ScalarType::U32),
    ]
}

const PARAMS_F32: [Param; 5] = params(DType::F32);
const PARAMS_F16: [Param; 5] = params(DType::F16);

pub(crate) const KERNELS: &[KernelSource] = &[
    KernelSource {
        name: F32_KERNEL,
        params: &PARAMS_F32,
        cuda: Some(CUDA),
        msl: Some(MSL),
        cpu: Some(quantize_cpu::<f32>),
    },
    KernelSource {
        name: F16_KERNEL,
        params: &PARAMS_F16,
        cuda: Some(CUDA),
        msl: Some(MSL),
        cpu: Some(quantize_cpu::<f16>),
    },
];

/// Activations `x` (`[cols]` or `[batch, cols]`) quantised to int8 per block of [`Q8_BLOCK`]
/// consecutive values of a row:
///
/// - `values`: I8 `[batch, cols]`, each block's 32 values in the order the integer product
///   reads them: value `i` of row `b` at `b * cols + Q8Activations::slot(i)` (within each
///   group of 8 values, the even-numbered 4 and then, 16 bytes on, the odd-numbered 4; see
///   [`slot`](Q8Activations::slot));
/// - `scales`: F32 `[batch, cols / 32]`, the `d` of each block;
/// - `sums`: I32 `[batch, cols / 32]`, the sum of each block's `q`.
///
/// The order and the sums are what the 4-bit codes need (a byte holds two neighbouring
/// columns, so four-way byte dot products pair the even columns of a word with one activation
/// word and the odd ones with another): storing them so costs the quantisation nothing and
/// saves each product 16 instructions per block (measured on an H200: 3,627 against 3,472
/// GB/s on a 28672 x 8192 matrix, `bench/tune/q8_variants.cu`).
///
/// The definition, identical on every backend: for each block, `amax = max |x|` (in f32, over
/// the block's non-NaN values), `d = amax / 127` (an f32 division) and `q = round(x / d)` (an
/// f32 division, rounded half away from zero, clamped to `[-127, 127]`); `d == 0` (an all-zero
/// block) gives `q = 0`. Dequantised, `q * d` is within `d / 2` of `x`: at most 1/254 of the
/// block's largest magnitude. Non-finite `x` is the caller's to avoid: it gives meaningless
/// values (an infinity makes its block's `d` infinite and its values 0; a NaN quantises to 0),
/// never undefined behaviour.
///
/// Made by [`quantize_activations`] (or [`Q8Activations::alloc`] and
/// [`quantize_activations_into`]); quantise once and reuse the result for every matrix that
/// reads the same `x` (the Q, K and V projections; gate and up), so the quantisation is paid
/// once per activation vector, not once per product.
#[derive(Clone, Debug)]
pub struct Q8Activations {
    values: Buffer,
    sums: Buffer,
    scales: Buffer,
    /// The shape of the `x` they stand for: `[cols]` or `[batch, cols]`.
    x_shape: Vec<usize>,
    batch: usize,
    cols: usize,
}

/// (batch, cols) of an `x` of shape `[cols]` or `[batch, cols]`, checked for quantisation.
fn x_geometry(what: &'static str, shape: &[usize]) -> Result<(usize, usize)> {
    let (batch, cols) = match *shape {
        [c] => (1, c),
        [b, c] => (b, c),
        _ => {
            return Err(Error::ShapeMismatch {
                what,
                expected: "[cols] or [batch, cols]".to_owned(),
                got: format!("{shape:?}"),
            })
        }
    };
    if cols == 0 || cols % Q8_BLOCK != 0 {
        return Err(Error::invalid(
            what,
            format!("{cols} columns are not a positive multiple of {Q8_BLOCK}"),
        ));
    }
    if batch == 0 {
        return Err(Error::invalid(what, "a batch of 0 rows"));
    }
    let n = batch
        .checked_mul(cols)
        .ok_or_else(|| Error::invalid(what, format!("{batch} x {cols} overflows")))?;
    index_u32(what, n / Q8_BLOCK)?;
    Ok((batch, cols))
}

impl Q8Activations {
    /// Buffers (labelled `label`, on `dev`, uninitialised) for the activations of an `x` of
    /// shape `x_shape` (`[cols]` or `[batch, cols]`, `cols` a multiple of 32), to be filled by
    /// [`quantize_activations_into`] at every step, without allocating.
    pub fn alloc(dev: &Device, label: &str, x_shape: &[usize]) -> Result<Q8Activations> {
        let (batch, cols) = x_geometry("q8 activations shape", x_shape)?;
        let values = dev.alloc_labelled(label, DType::I8, &[batch, cols], StorageMode::Auto)?;
        let scales = dev.alloc_labelled(
            label,
            DType::F32,
            &[batch, cols / Q8_BLOCK],
            StorageMode::Auto,
        )?;
        let sums = dev.alloc_labelled(
            label,
            DType::I32,
            &[batch, cols / Q8_BLOCK],
            StorageMode::Auto,
        )?;
        Ok(Q8Activations {
            values,
            sums,
            scales,
            x_shape: x_shape.to_vec(),
            batch,
            cols,
        })
    }

    /// The int8 values, I8 `[batch, cols]`, in the order of [`slot`](Self::slot).
    pub fn values(&self) -> &Buffer {
        &self.values
    }
    /// The sum of each block's values, I32 `[batch, cols / 32]`.
    pub fn sums(&self) -> &Buffer {
        &self.sums
    }
    /// Where value `i` of a row sits in the row's `values`: its block's start, then, for
    /// `j = (i % 32) / 8` and `r = i % 8`, byte `4 j + r / 2` for even `r` and `16 + 4 j + r / 2`
    /// for odd `r`.
    ///
    /// ```
    /// use unibuf::ops::Q8Activations;
    /// assert_eq!((0..8).map(Q8Activations::slot).collect::<Vec<_>>(), [0, 16, 1, 17, 2, 18, 3, 19]);
    /// assert_eq!(Q8Activations::slot(32 + 9), 32 + 20);
    /// ```
    pub const fn slot(i: usize) -> usize {
        let (block, j, r) = (i / Q8_BLOCK * Q8_BLOCK, (i % Q8_BLOCK) / 8, i % 8);
        block + (r % 2) * 16 + 4 * j + r / 2
    }
    /// The block scales, F32 `[batch, cols / 32]`.
    pub fn scales(&self) -> &Buffer {
        &self.scales
    }
    /// Rows of `x` (1 for an `x` of shape `[cols]`).
    pub fn batch(&self) -> usize {
        self.batch
    }
    /// Values per row.
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// The shape of the `x` these activations stand for (`[cols]` or `[batch, cols]`): a
    /// product's `y` is `[rows]` for the first, `[batch, rows]` for the second.
    pub fn x_shape(&self) -> &[usize] {
        &self.x_shape
    }
}

fn x_kernel(x: &Buffer) -> Result<&'static str> {
    match x.dtype() {
        DType::F32 => Ok(F32_KERNEL),
        DType::F16 => Ok(F16_KERNEL),
        other => Err(Error::invalid(
            "quantize_activations x",
            format!("'{}' is {other}: this op takes f32 or f16", x.label()),
        )),
    }
}

/// Quantises `x` (f32 or f16, `[cols]` or `[batch, cols]`, `cols` a multiple of 32, any batch)
/// to int8 per block of 32 values (defined at [`Q8Activations`]), into fresh buffers, in one
/// launch. Quantise once per activation vector and pass the result to every
/// [`q4_matvec_q8`](super::q4_matvec_q8) that reads it.
///
/// ```
/// use unibuf::{ops, Device};
/// let dev = Device::open("cpu")?;
/// let q = dev.queue();
/// let x: Vec<f32> = (0..64).map(|i| (i as f32 - 31.5) / 8.0).collect();
/// let xb = dev.from_slice("x", &x, &[64])?;
/// let xq = ops::quantize_activations(&q, &xb)?;
/// assert_eq!((xq.batch(), xq.cols()), (1, 64));
/// let values = q.download::<i8>(xq.values())?;
/// let scales = q.download::<f32>(xq.scales())?;
/// for (i, &v) in x.iter().enumerate() {
///     let d = scales[i / 32];
///     let q = f32::from(values[ops::Q8Activations::slot(i)]);
///     assert!((q * d - v).abs() <= d / 2.0 * 1.0001);
/// }
/// # Ok::<(), unibuf::Error>(())
/// ```
pub fn quantize_activations(q: &Queue, x: &Buffer) -> Result<Q8Activations> {
    let (batch, cols) = x_geometry("quantize_activations x", x.shape())?;
    x_kernel(x)?;
    let values = output(q, "quantize_activations", DType::I8, &[batch, cols])?;
    let blocks_shape = [batch, cols / Q8_BLOCK];
    let scales = output(q, "quantize_activations", DType::F32, &blocks_shape)?;
    let sums = output(q, "quantize_activations", DType::I32, &blocks_shape)?;
    let xq = Q8Activations {
        values,
        sums,
        scales,
        x_shape: x.shape().to_vec(),
        batch,
        cols,
    };
    quantize_activations_into(q, x, &xq)?;
    Ok(xq)
}

/// [`quantize_activations`] into existing activations (from [`Q8Activations::alloc`] or an
/// earlier quantisation), made for an `x` of exactly this shape. Returns the submission's fence.
pub fn quantize_activations_into(q: &Queue, x: &Buffer, xq: &Q8Activations) -> Result<Fence> {
    let (batch, cols) = x_geometry("quantize_activations x", x.shape())?;
    let name = x_kernel(x)?;
    if x.shape() != xq.x_shape.as_slice() {
        return Err(Error::ShapeMismatch {
            what: "quantize_activations x",
            expected: format!("{:?} (the shape the activations were made for)", xq.x_shape),
            got: format!("{:?}", x.shape()),
        });
    }
    let blocks = index_u32("quantize_activations x", batch * cols / Q8_BLOCK)?;
    let k = super::kernel(q, name)?;
    let warps = THREADS / 32;
    let grid = blocks.div_ceil(warps).clamp(1, MAX_BLOCKS);
    q.launch(
        &k,
        LaunchDims::linear(grid, THREADS),
        &[
            x.into(),
            (&xq.values).into(),
            (&xq.scales).into(),
            (&xq.sums).into(),
            blocks.into(),
        ],
    )
}

/// The int8 value of `v` in a block of scale `d` (the definition at [`Q8Activations`]).
fn quantize_value(v: f32, d: f32) -> i8 {
    if d == 0.0 {
        return 0;
    }
    let t = v / d;
    if t.is_nan() {
        0
    } else {
        // In range after the clamp: the conversion is exact.
        t.round().clamp(-127.0, 127.0) as i8
    }
}

fn quantize_cpu<X: XFloat>(args: &mut CpuKernelArgs<'_>) -> std::result::Result<(), String> {
    const NAME: &str = "unibuf_quantize_q8";
    let blocks = args.u32(4)? as usize;
    let x = args.input::<X>(0)?;
    let n = blocks * Q8_BLOCK;
    expect_len(NAME, "x", x.len(), n)?;
    // Outputs are distinct buffers, borrowed for the whole call.
    let values = args.output::<i8>(1)?;
    let scales = args.output::<f32>(2)?;
    let sums = args.output::<i32>(3)?;
    expect_len(NAME, "values", values.len(), n)?;
    expect_len(NAME, "scales", scales.len(), blocks)?;
    expect_len(NAME, "sums", sums.len(), blocks)?;
    let mut xf = [0.0f32; Q8_BLOCK];
    for (k, xb) in x.chunks_exact(Q8_BLOCK).enumerate() {
        for (f, v) in xf.iter_mut().zip(xb) {
            *f = v.f32();
        }
        let amax = xf
            .iter()
            .filter(|f| !f.is_nan())
            .fold(0.0f32, |a, f| a.max(f.abs()));
        let d = amax / 127.0;
        scales[k] = d;
        sums[k] = 0;
        for (i, &v) in xf.iter().enumerate() {
            let q = quantize_value(v, d);
            values[Q8Activations::slot(k * Q8_BLOCK + i)] = q;
            sums[k] += i32::from(q);
        }
    }
    Ok(())
}
