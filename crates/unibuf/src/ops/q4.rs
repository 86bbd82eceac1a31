//! The 4-bit group-quantised matrix-vector product, with dequantisation fused into the read of
//! the weights: `y = W x` where `W` is stored as 4-bit codes plus one f16 scale per group of
//! columns ([`Q4Matrix`]).
//!
//! Two arithmetic paths:
//! - [`q4_matvec`] takes `x` as it is (f32 or f16) and computes in f32: the product of the
//!   dequantised weights with `x`, to f32 rounding. On a GPU it is bound by instruction issue
//!   rather than memory (an f32 multiply-add per code and row).
//! - [`q4_matvec_q8`] takes `x` quantised to int8 per block of 32 values
//!   ([`quantize_activations`](super::quantize_activations)) and sums codes times activations
//!   exactly in integers (four per instruction with CUDA's `__dp4a`), which brings the product
//!   close to the memory bandwidth of reading the weights. The price is the activations'
//!   rounding: each is off by at most `d / 2`, 1/254 of its block's largest magnitude, far below
//!   the 4-bit weights' own error (up to 1/14 of a group's largest magnitude).
//!
//! Use the integer path for decode-time products where the weights' bytes dominate, quantising
//! `x` once for every matrix that reads it; the f32 path where `x` must enter unrounded.

use super::q8::{Q8Activations, CUDA as Q8_CUDA, MSL as Q8_MSL};
use super::row_common::expect_len;
use super::{expect_dtype, expect_shape, index_u32, output};
use crate::backend::cpu::CpuKernelArgs;
use crate::backend::LaunchDims;
use crate::buffer::Buffer;
use crate::device::Device;
use crate::dtype::DType;
use crate::epoch::Fence;
use crate::error::{Error, Result};
use crate::kernel::{Constants, KernelSource, Param, ScalarType};
use crate::queue::Queue;
use half::f16;

/// The group sizes (columns per scale) a [`Q4Matrix`] may have.
pub const Q4_GROUPS: [usize; 3] = [32, 64, 128];

/// The most rows of `x` (the batch) one [`q4_matvec`] or [`q4_matvec_q8`] takes.
pub const Q4_MAX_BATCH: usize = 8;

const F32_KERNEL: &str = "unibuf_q4_matvec_f32";
const F16_KERNEL: &str = "unibuf_q4_matvec_f16";
const Q8_KERNEL: &str = "unibuf_q4_matvec_q8";

/// Rows of `W` one row group computes at once (`UB_Q4_R` in `cuda/q4.cu`).
const ROWS_PER_GROUP: u32 = 4;
/// 32-code chunks of each row a CUDA thread loads at once (`UB_Q4_CPT` in `cuda/q4.cu`).
const CHUNKS_PER_THREAD: u32 = 2;
/// The same for the int8-activation kernel (`UB_Q8_CPT` in `cuda/q4_q8.cu`).
const Q8_CHUNKS_PER_THREAD: u32 = 1;
/// Threads per block of the CUDA and Metal kernels (8 warps / SIMD-groups).
const THREADS: u32 = 256;
/// The grid is capped here; the kernels grid-stride over the remaining rows.
const MAX_BLOCKS: u32 = 65_535;

/// Rows one block computes: a row's 32-code chunks are spread over a power of two of threads
/// (32 to 256, the fewest that cover them `per_thread` at a time), so narrow matrices fit several
/// row groups in a block (`ub_q4_group_threads` in `cuda/q4.cu`, `ub_q8_group_threads` in `cuda/q4_q8.cu`,
/// which share this schedule; the Metal kernels grid-stride on their own row sets, so any grid
/// is correct there).
fn rows_per_block(cols: u32, per_thread: u32) -> u32 {
    let chunks = cols / 32;
    let mut per_group = 32;
    while per_group * per_thread < chunks && per_group < THREADS {
        per_group *= 2;
    }
    (THREADS / per_group) * ROWS_PER_GROUP
}

/// The grid for `rows` rows at `rows_per_block`: at least one block, at most `MAX_BLOCKS`.
fn blocks_for(rows: u32, cols: u32, per_thread: u32) -> u32 {
    rows.div_ceil(rows_per_block(cols, per_thread))
        .clamp(1, MAX_BLOCKS)
}

const fn params(x: DType) -> [Param; 8] {
    [
        Param::input("packed", DType::U8),
        Param::input("scales", DType::F16),
        Param::input("x", x),
        Param::output("y", DType::F32),
        Param::scalar("rows", ScalarType::U32),
        Param::scalar("cols", ScalarType::U32),
        Param::scalar("group", ScalarType::U32),
        Param::scalar("batch", ScalarType::U32),
    ]
}

const PARAMS_F32: [Param; 8] = params(DType::F32);
const PARAMS_F16: [Param; 8] = params(DType::F16);

const PARAMS_Q8: [Param; 10] = [
    Param::input("packed", DType::U8),
    Param::input("scales", DType::F16),
    Param::input("xq", DType::I8),
    Param::input("xd", DType::F32),
    Param::input("xs", DType::I32),
    Param::output("y", DType::F32),
    Param::scalar("rows", ScalarType::U32),
    Param::scalar("cols", ScalarType::U32),
    Param::scalar("group", ScalarType::U32),
    Param::scalar("batch", ScalarType::U32),
];

const CUDA: &str = concat!(include_str!("cuda/common.cuh"), include_str!("cuda/q4.cu"));
const MSL: &str = include_str!("msl/q4.metal");

pub(crate) const KERNELS: &[KernelSource] = &[
    KernelSource {
        name: F32_KERNEL,
        params: &PARAMS_F32,
        cuda: Some(CUDA),
        msl: Some(MSL),
        cpu: Some(q4_cpu::<f32>),
    },
    KernelSource {
        name: F16_KERNEL,
        params: &PARAMS_F16,
        cuda: Some(CUDA),
        msl: Some(MSL),
        cpu: Some(q4_cpu::<f16>),
    },
    KernelSource {
        name: Q8_KERNEL,
        params: &PARAMS_Q8,
        cuda: Some(Q8_CUDA),
        msl: Some(Q8_MSL),
        cpu: Some(q4_q8_cpu),
    },
];

/// A matrix of `rows x cols` weights quantised to 4 bits, symmetric per group of `group`
/// consecutive columns of a row: `w = (code - 8) * scale`.
///
/// - `packed`: U8 `[rows, cols / 2]`, two codes (0..=15) per byte, the low nibble the even
///   column;
/// - `scales`: F16 `[rows, cols / group]`.
///
/// `group` is 32, 64 or 128 ([`Q4_GROUPS`]) and `cols` a multiple of it.
#[derive(Clone, Debug)]
pub struct Q4Matrix {
    packed: Buffer,
    scales: Buffer,
    rows: usize,
    cols: usize,
    group: usize,
}

/// Checks the geometry of a quantised matrix.
fn check_geometry(rows: usize, cols: usize, group: usize) -> Result<()> {
    if !Q4_GROUPS.contains(&group) {
        return Err(Error::invalid(
            "q4 group",
            format!("group size {group} is not one of 32, 64 or 128"),
        ));
    }
    if rows == 0 || cols == 0 {
        return Err(Error::invalid(
            "q4 shape",
            format!("a {rows} x {cols} matrix is empty"),
        ));
    }
    if !cols.is_multiple_of(group) {
        return Err(Error::invalid(
            "q4 cols",
            format!("{cols} columns are not a multiple of the group size {group}"),
        ));
    }
    index_u32("q4 rows", rows)?;
    index_u32("q4 cols", cols)?;
    Ok(())
}

/// Quantises one group: the f16 scale (max |w| / 7, rounded to f16) and the codes.
fn quantize_group(w: &[f32], codes: &mut [u8]) -> Result<f16> {
    let mut max = 0.0f32;
    for &v in w {
        if !v.is_finite() {
            return Err(Error::invalid(
                "q4 weights",
                format!("weight {v} is not finite"),
            ));
        }
        max = max.max(v.abs());
    }
    let scale = f16::from_f32(max / 7.0);
    if !scale.is_finite() {
        return Err(Error::invalid(
            "q4 weights",
            format!(
                "max |w| = {max} of a group needs a scale {} beyond f16",
                max / 7.0
            ),
        ));
    }
    let s = scale.to_f32();
    for (c, &v) in codes.iter_mut().zip(w) {
        *c = if s == 0.0 {
            8
        } else {
            ((v / s).round() + 8.0).clamp(0.0, 15.0) as u8
        };
    }
    Ok(scale)
}

impl Q4Matrix {
    /// Quantises the row-major `rows x cols` `weights` on the host (per group: scale =
    /// max |w| / 7 rounded to f16, code = clamp(round(w / scale) + 8, 0, 15); an all-zero group
    /// gets scale 0 and code 8) and uploads the codes and scales to `dev` (buffers labelled
    /// `label`). A group whose largest weight is below about 4e-7 (7 times the smallest f16
    /// subnormal) also rounds to scale 0, and scales below 6.1e-5 are f16 subnormals with fewer
    /// significant bits: such weights are better scaled up before quantising.
    ///
    /// Errors: a group size other than 32/64/128, `cols` not a multiple of it, `weights` not
    /// `rows * cols` long, a non-finite weight or a scale beyond f16.
    pub fn quantize(
        dev: &Device,
        label: &str,
        weights: &[f32],
        rows: usize,
        cols: usize,
        group: usize,
    ) -> Result<Q4Matrix> {
        check_geometry(rows, cols, group)?;
        let n = rows
            .checked_mul(cols)
            .ok_or_else(|| Error::invalid("q4 shape", format!("{rows} x {cols} overflows")))?;
        if weights.len() != n {
            return Err(Error::ShapeMismatch {
                what: "q4 weights",
                expected: format!("{n} values ({rows} x {cols})"),
                got: weights.len().to_string(),
            });
        }
        let mut packed = vec![0u8; n / 2];
        let mut scales = Vec::with_capacity(n / group);
        let mut codes = vec![0u8; group];
        for (g, w) in weights.chunks_exact(group).enumerate() {
            scales.push(quantize_group(w, &mut codes)?);
            let out = &mut packed[g * group / 2..(g + 1) * group / 2];
            for (byte, pair) in out.iter_mut().zip(codes.chunks_exact(2)) {
                *byte = pair[0] | (pair[1] << 4);
            }
        }
        let packed = dev.from_slice(label, &packed, &[rows, cols / 2])?;
        let scales = dev.from_slice(label, &scales, &[rows, cols / group])?;
        Q4Matrix::from_parts(packed, scales, rows, cols, group)
    }

    /// A matrix over existing buffers: `packed` U8 `[rows, cols / 2]` and `scales` F16
    /// `[rows, cols / group]` (views at any offset are fine), checked against the geometry.
    pub fn from_parts(
        packed: Buffer,
        scales: Buffer,
        rows: usize,
        cols: usize,
        group: usize,
    ) -> Result<Q4Matrix> {
        check_geometry(rows, cols, group)?;
        expect_dtype("q4 packed codes", &packed, DType::U8)?;
        expect_dtype("q4 scales", &scales, DType::F16)?;
        expect_shape("q4 packed codes", &packed, &[rows, cols / 2])?;
        expect_shape("q4 scales", &scales, &[rows, cols / group])?;
        if packed.alloc.device.id != scales.alloc.device.id {
            return Err(Error::WrongDevice {
                what: "q4 scales",
                expected: packed.alloc.device.id,
                got: scales.alloc.device.id,
            });
        }
        Ok(Q4Matrix {
            packed,
            scales,
            rows,
            cols,
            group,
        })
    }

    /// The packed codes, U8 `[rows, cols / 2]`.
    pub fn packed(&self) -> &Buffer {
        &self.packed
    }
    /// The scales, F16 `[rows, cols / group]`.
    pub fn scales(&self) -> &Buffer {
        &self.scales
    }
    /// Rows (outputs).
    pub fn rows(&self) -> usize {
        self.rows
    }
    /// Columns (inputs).
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// Columns per scale.
    pub fn group(&self) -> usize {
        self.group
    }
    /// Bytes of weights a product reads: the codes plus the scales.
    pub fn weight_bytes(&self) -> usize {
        self.packed.byte_len() + self.scales.byte_len()
    }

    /// The dequantised weights, row-major `rows x cols`, downloaded through `q` (for tests and
    /// references).
    pub fn dequantize_host(&self, q: &Queue) -> Result<Vec<f32>> {
        let packed = q.download::<u8>(&self.packed)?;
        let scales = q.download::<f16>(&self.scales)?;
        let ngroups = self.cols / self.group;
        let mut w = Vec::with_capacity(self.rows * self.cols);
        for (i, byte) in packed.iter().enumerate() {
            let (row, col) = (2 * i / self.cols, 2 * i % self.cols);
            let s = scales[row * ngroups + col / self.group].to_f32();
            w.push((f32::from(byte & 15) - 8.0) * s);
            w.push((f32::from(byte >> 4) - 8.0) * s);
        }
        Ok(w)
    }
}

/// The batch of `x` (`[cols]` or `[batch, cols]`) and the shape of `y` it calls for.
fn batch_of(m: &Q4Matrix, x: &Buffer) -> Result<(usize, Vec<usize>)> {
    let (batch, y_shape) = match *x.shape() {
        [c] if c == m.cols => (1, vec![m.rows]),
        [b, c] if c == m.cols => (b, vec![b, m.rows]),
        _ => {
            return Err(Error::ShapeMismatch {
                what: "q4_matvec x",
                expected: format!("[{c}] or [batch, {c}]", c = m.cols),
                got: format!("{:?}", x.shape()),
            })
        }
    };
    if batch == 0 || batch > Q4_MAX_BATCH {
        return Err(Error::invalid(
            "q4_matvec x",
            format!("a batch of {batch} rows of x; this op takes 1 to {Q4_MAX_BATCH}"),
        ));
    }
    Ok((batch, y_shape))
}

/// The batch variants a launch picks from (`UB_Q4_NB`): the batch rounded up to a power of two.
const BATCH_VARIANTS: [i64; 4] = [1, 2, 4, 8];

/// The specialisation constants of the variant for `batch` rows of x.
fn batch_constants(batch: usize) -> Constants {
    Constants::new().with("UB_Q4_NB", batch.next_power_of_two() as i64)
}

/// The constants of the int8-activation variant for `batch` rows of x, aligned or not
/// (`UB_Q8_ALIGNED`: the codes and the activations start 16-byte aligned, as every buffer from
/// the allocator does, and the kernel is compiled with 16-byte loads only).
fn q8_constants(batch: usize, aligned: bool) -> Constants {
    batch_constants(batch).with("UB_Q8_ALIGNED", i64::from(aligned))
}

/// Compiles every variant a launch can ask for, for [`Device::warm_all`](crate::Device::warm_all).
pub(crate) fn warm(dev: &crate::Device) -> Result<()> {
    for nb in BATCH_VARIANTS {
        for name in [F32_KERNEL, F16_KERNEL] {
            dev.kernel_with(name, &batch_constants(nb as usize))?;
        }
        for aligned in [true, false] {
            dev.kernel_with(Q8_KERNEL, &q8_constants(nb as usize, aligned))?;
        }
    }
    Ok(())
}

fn x_kernel(x: &Buffer) -> Result<&'static str> {
    match x.dtype() {
        DType::F32 => Ok(F32_KERNEL),
        DType::F16 => Ok(F16_KERNEL),
        other => Err(Error::invalid(
            "q4_matvec x",
            format!("'{}' is {other}: this op takes f32 or f16", x.label()),
        )),
    }
}

/// `y = W x` for a 4-bit matrix `W` ([`Q4Matrix`]), into a new f32 buffer: `x` is f32 or f16,
/// `[cols]` (then `y` is `[rows]`) or `[batch, cols]` with `batch` at most [`Q4_MAX_BATCH`]
/// (then `y` is `[batch, rows]`). Arithmetic is in f32.
///
/// ```
/// use unibuf::{ops, Device};
/// let dev = Device::open("cpu")?;
/// let q = dev.queue();
/// let (rows, cols) = (2, 64);
/// let w: Vec<f32> = (0..rows * cols).map(|i| ((i % 15) as f32 - 7.0) / 7.0).collect();
/// let m = ops::Q4Matrix::quantize(&dev, "w", &w, rows, cols, 32)?;
/// let x = dev.from_slice("x", &vec![1.0f32; cols], &[cols])?;
/// let y = q.download::<f32>(&ops::q4_matvec(&q, &m, &x)?)?;
/// let wq = m.dequantize_host(&q)?;
/// for r in 0..rows {
///     let want: f32 = wq[r * cols..(r + 1) * cols].iter().sum();
///     assert!((y[r] - want).abs() < 1e-4);
/// }
/// # Ok::<(), unibuf::Error>(())
/// ```
pub fn q4_matvec(q: &Queue, m: &Q4Matrix, x: &Buffer) -> Result<Buffer> {
    let (_, y_shape) = batch_of(m, x)?;
    x_kernel(x)?;
    let y = output(q, "q4_matvec", DType::F32, &y_shape)?;
    q4_matvec_into(q, m, x, &y)?;
    Ok(y)
}

/// [`q4_matvec`] into `y`, f32 `[rows]` for `x` of shape `[cols]`, `[batch, rows]` for
/// `[batch, cols]`. Returns the submission's fence.
pub fn q4_matvec_into(q: &Queue, m: &Q4Matrix, x: &Buffer, y: &Buffer) -> Result<Fence> {
    let (batch, y_shape) = batch_of(m, x)?;
    let name = x_kernel(x)?;
    expect_dtype("q4_matvec y", y, DType::F32)?;
    expect_shape("q4_matvec y", y, &y_shape)?;
    let rows = index_u32("q4 rows", m.rows)?;
    let cols = index_u32("q4 cols", m.cols)?;
    // A variant compiled for the batch rounded up to 1, 2, 4 or 8 (CUDA `UB_Q4_NB`).
    let k = q.device().kernel_with(name, &batch_constants(batch))?;
    let blocks = blocks_for(rows, cols, CHUNKS_PER_THREAD);
    q.launch(
        &k,
        LaunchDims::linear(blocks, THREADS),
        &[
            (&m.packed).into(),
            (&m.scales).into(),
            x.into(),
            y.into(),
            rows.into(),
            cols.into(),
            (m.group as u32).into(),
            (batch as u32).into(),
        ],
    )
}

/// The batch of quantised activations and the shape of `y` they call for, checked against `m`.
fn batch_of_q8(m: &Q4Matrix, xq: &Q8Activations) -> Result<(usize, Vec<usize>)> {
    if xq.cols() != m.cols {
        return Err(Error::ShapeMismatch {
            what: "q4_matvec_q8 activations",
            expected: format!("{} columns (the matrix's)", m.cols),
            got: format!("{} columns", xq.cols()),
        });
    }
    let batch = xq.batch();
    if batch > Q4_MAX_BATCH {
        return Err(Error::invalid(
            "q4_matvec_q8 activations",
            format!("a batch of {batch} rows of x; this op takes 1 to {Q4_MAX_BATCH}"),
        ));
    }
    if xq.values().alloc.device.id != m.packed.alloc.device.id {
        return Err(Error::WrongDevice {
            what: "q4_matvec_q8 activations",
            expected: m.packed.alloc.device.id,
            got: xq.values().alloc.device.id,
        });
    }
    let y_shape = if xq.x_shape().len() == 1 {
        vec![m.rows]
    } else {
        vec![batch, m.rows]
    };
    Ok((batch, y_shape))
}

/// `y = W x` for a 4-bit matrix `W` ([`Q4Matrix`]) and `x` quantised to int8
/// ([`quantize_activations`](super::quantize_activations)), into a new f32 buffer: `[rows]`
/// when the activations came from an `x` of shape `[cols]`, else `[batch, rows]` (`batch` at
/// most [`Q4_MAX_BATCH`]).
///
/// `y[b, r] = sum over 32-column blocks k of scale(r, k) * d(b, k) * isum(b, r, k)`, where
/// `isum = sum (code - 8) * q` over the block is exact (integers) and the rest is f32. Against
/// the product with the unquantised `x`, the error is at most `d(b, k) / 2 * sum |w|` per block
/// (plus f32 rounding): see the module docs for when to prefer [`q4_matvec`].
///
/// ```
/// use unibuf::{ops, Device};
/// let dev = Device::open("cpu")?;
/// let q = dev.queue();
/// let (rows, cols) = (2, 64);
/// let w: Vec<f32> = (0..rows * cols).map(|i| ((i % 15) as f32 - 7.0) / 7.0).collect();
/// let m = ops::Q4Matrix::quantize(&dev, "w", &w, rows, cols, 32)?;
/// let x: Vec<f32> = (0..cols).map(|i| (i as f32 - 31.5) / 16.0).collect();
/// let xq = ops::quantize_activations(&q, &dev.from_slice("x", &x, &[cols])?)?;
/// let y = q.download::<f32>(&ops::q4_matvec_q8(&q, &m, &xq)?)?;
/// let wq = m.dequantize_host(&q)?;
/// for r in 0..rows {
///     let row = &wq[r * cols..(r + 1) * cols];
///     let want: f32 = row.iter().zip(&x).map(|(w, x)| w * x).sum();
///     // Each activation is within d / 2 of x, d = max |x| of its block / 127.
///     let bound: f32 = row.iter().map(|w| w.abs() * (31.5 / 16.0) / 254.0).sum();
///     assert!((y[r] - want).abs() <= bound * 1.01 + 1e-4);
/// }
/// # Ok::<(), unibuf::Error>(())
/// ```
pub fn q4_matvec_q8(q: &Queue, m: &Q4Matrix, xq: &Q8Activations) -> Result<Buffer> {
    let (_, y_shape) = batch_of_q8(m, xq)?;
    let y = output(q, "q4_matvec_q8", DType::F32, &y_shape)?;
    q4_matvec_q8_into(q, m, xq, &y)?;
    Ok(y)
}

/// [`q4_matvec_q8`] into `y`, f32 `[rows]` for activations of an `x` of shape `[cols]`,
/// `[batch, rows]` for `[batch, cols]`. Returns the submission's fence.
pub fn q4_matvec_q8_into(q: &Queue, m: &Q4Matrix, xq: &Q8Activations, y: &Buffer) -> Result<Fence> {
    let (batch, y_shape) = batch_of_q8(m, xq)?;
    expect_dtype("q4_matvec_q8 y", y, DType::F32)?;
    expect_shape("q4_matvec_q8 y", y, &y_shape)?;
    let rows = index_u32("q4 rows", m.rows)?;
    let cols = index_u32("q4 cols", m.cols)?;
    // A variant compiled for the batch rounded up to 1, 2, 4 or 8 (CUDA `UB_Q4_NB`), and for
    // 16-byte aligned codes and activations when they are.
    let aligned = m.packed.device_address().is_multiple_of(16)
        && xq.values().device_address().is_multiple_of(16);
    let k = q
        .device()
        .kernel_with(Q8_KERNEL, &q8_constants(batch, aligned))?;
    let blocks = blocks_for(rows, cols, Q8_CHUNKS_PER_THREAD);
    q.launch(
        &k,
        LaunchDims::linear(blocks, THREADS),
        &[
            (&m.packed).into(),
            (&m.scales).into(),
            xq.values().into(),
            xq.scales().into(),
            xq.sums().into(),
            y.into(),
            rows.into(),
            cols.into(),
            (m.group as u32).into(),
            (batch as u32).into(),
        ],
    )
}

/// An element of x as the CPU kernels read it.
pub(super) trait XFloat: crate::dtype::Element + Copy {
    fn f32(self) -> f32;
}
impl XFloat for f32 {
    fn f32(self) -> f32 {
        self
    }
}
impl XFloat for f16 {
    fn f32(self) -> f32 {
        self.to_f32()
    }
}

/// The scalar arguments of a CPU q4 kernel, checked as the launchers check them.
fn cpu_geometry(
    name: &str,
    cols: usize,
    group: usize,
    batch: usize,
) -> std::result::Result<(), String> {
    if !Q4_GROUPS.contains(&group) || cols == 0 || !cols.is_multiple_of(group) {
        return Err(format!("{name}: bad geometry cols {cols}, group {group}"));
    }
    if batch == 0 || batch > Q4_MAX_BATCH {
        return Err(format!("{name}: batch {batch} is not 1..={Q4_MAX_BATCH}"));
    }
    Ok(())
}

fn q4_cpu<X: XFloat>(args: &mut CpuKernelArgs<'_>) -> std::result::Result<(), String> {
    const NAME: &str = "unibuf_q4_matvec";
    let rows = args.u32(4)? as usize;
    let cols = args.u32(5)? as usize;
    let group = args.u32(6)? as usize;
    let batch = args.u32(7)? as usize;
    let packed = args.input::<u8>(0)?;
    let scales = args.input::<f16>(1)?;
    let x = args.input::<X>(2)?;
    let y = args.output::<f32>(3)?;
    cpu_geometry(NAME, cols, group, batch)?;
    let ngroups = cols / group;
    let check = |what: &str, have: usize, want: usize| expect_len(NAME, what, have, want);
    check("packed", packed.len(), rows * cols / 2)?;
    check("scales", scales.len(), rows * ngroups)?;
    check("x", x.len(), batch * cols)?;
    check("y", y.len(), batch * rows)?;
    let xf: Vec<f32> = x.iter().map(|v| v.f32()).collect();
    let mut w = vec![0.0f32; group];
    for r in 0..rows {
        let mut acc = vec![0.0f32; batch];
        for g in 0..ngroups {
            let s = scales[r * ngroups + g].to_f32();
            let bytes = &packed[(r * cols + g * group) / 2..(r * cols + (g + 1) * group) / 2];
            for (pair, byte) in w.chunks_exact_mut(2).zip(bytes) {
                pair[0] = f32::from(byte & 15) - 8.0;
                pair[1] = f32::from(byte >> 4) - 8.0;
            }
            for (b, a) in acc.iter_mut().enumerate() {
                let xs = &xf[b * cols + g * group..b * cols + (g + 1) * group];
                let dot: f32 = w.iter().zip(xs).map(|(w, x)| w * x).sum();
                *a += s * dot;
            }
        }
        for (b, a) in acc.iter().enumerate() {
            y[b * rows + r] = *a;
        }
    }
    Ok(())
}

/// The integer path: per 32-column block an exact integer sum of (code - 8) * q, scaled in f32
/// and accumulated in f32 in block order.
fn q4_q8_cpu(args: &mut CpuKernelArgs<'_>) -> std::result::Result<(), String> {
    const NAME: &str = "unibuf_q4_matvec_q8";
    let rows = args.u32(6)? as usize;
    let cols = args.u32(7)? as usize;
    let group = args.u32(8)? as usize;
    let batch = args.u32(9)? as usize;
    let packed = args.input::<u8>(0)?;
    let scales = args.input::<f16>(1)?;
    let xq = args.input::<i8>(2)?;
    let xd = args.input::<f32>(3)?;
    let xs = args.input::<i32>(4)?;
    let y = args.output::<f32>(5)?;
    cpu_geometry(NAME, cols, group, batch)?;
    let (chunks, ngroups) = (cols / 32, cols / group);
    let check = |what: &str, have: usize, want: usize| expect_len(NAME, what, have, want);
    check("packed", packed.len(), rows * cols / 2)?;
    check("scales", scales.len(), rows * ngroups)?;
    check("xq", xq.len(), batch * cols)?;
    check("xd", xd.len(), batch * chunks)?;
    check("xs", xs.len(), batch * chunks)?;
    check("y", y.len(), batch * rows)?;
    let mut w = [0i32; 32];
    for r in 0..rows {
        let mut acc = [0.0f32; Q4_MAX_BATCH];
        for c in 0..chunks {
            let s = scales[r * ngroups + c * 32 / group].to_f32();
            let bytes = &packed[(r * cols + 32 * c) / 2..(r * cols + 32 * (c + 1)) / 2];
            for (pair, byte) in w.chunks_exact_mut(2).zip(bytes) {
                pair[0] = i32::from(byte & 15) - 8;
                pair[1] = i32::from(byte >> 4) - 8;
            }
            for (b, a) in acc[..batch].iter_mut().enumerate() {
                // The values in the order of `Q8Activations::slot`; the block sums go unused
                // here (the CPU multiplies signed codes directly).
                let isum: i32 = w
                    .iter()
                    .enumerate()
                    .map(|(i, &w)| w * i32::from(xq[b * cols + Q8Activations::slot(32 * c + i)]))
                    .sum();
                *a += s * xd[b * chunks + c] * isum as f32;
            }
        }
        for (b, a) in acc[..batch].iter().enumerate() {
            y[b * rows + r] = *a;
        }
    }
    Ok(())
}
