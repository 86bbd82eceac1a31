//! The matrix-vector product over a GGUF matrix in its own block format, read natively: `y = W x`
//! where `W` holds ggml blocks of 32 weights ([`GgmlMatrix`]: Q8_0, Q4_0 or Q4_1), the bytes of
//! the file as [`WeightsFile`](crate::weights::WeightsFile) loads them. Nothing is dequantised
//! ahead: each block's scale (and Q4_1's offset) is applied as the block is read.
//!
//! | format | block (32 weights) | weight |
//! |---|---|---|
//! | Q8_0 | `f16 d`, `i8 q[32]` (34 bytes) | `d * q[j]` |
//! | Q4_0 | `f16 d`, `u8 qs[16]` (18 bytes) | `d * (nibble - 8)` |
//! | Q4_1 | `f16 d`, `f16 m`, `u8 qs[16]` (20 bytes) | `d * nibble + m` |
//!
//! In the 4-bit formats weight `j < 16` of a block is the low nibble of `qs[j]` and weight
//! `j + 16` its high nibble, as ggml lays them out. Arithmetic is f32: per block a sum of 32
//! products, accumulated over the row's blocks (in block order on the CPU; on a GPU the 32
//! lanes of a warp take quarter blocks of 8 weights in turn, each lane sums its share, and the
//! lanes are summed as a tree).
//!
//! The fused forms for a decoder step (the input norm fused into the product, the residual add
//! into the output projection, SwiGLU's gate and up together) are in
//! [`ggml_matvec_norm`](crate::ops::ggml_matvec_norm) and its neighbours; they share this
//! module's block decoding, on every backend.

use super::row_common::{by_dtype, expect_len, HostFloat};
use super::{expect_dtype, expect_float, expect_shape, index_u32, kernel, output};
use crate::backend::cpu::CpuKernelArgs;
use crate::backend::LaunchDims;
use crate::buffer::Buffer;
use crate::dtype::DType;
use crate::epoch::Fence;
use crate::error::{Error, Result};
use crate::kernel::{KernelSource, Param, ScalarType};
use crate::queue::Queue;
use crate::weights::gguf::GgmlType;
use crate::weights::TensorInfo;
use half::f16;

/// The most rows of `x` one [`ggml_matvec`] takes.
pub const GGML_MAX_BATCH: usize = 8;

const NAMES: [&str; 3] = [
    "unibuf_ggml_matvec_f32",
    "unibuf_ggml_matvec_f16",
    "unibuf_ggml_matvec_bf16",
];

/// Threads per block (8 warps, one row of `W` each).
pub(super) const THREADS: u32 = 256;
/// Rows of `W` per block of the launch.
pub(super) const ROWS_PER_BLOCK: u32 = THREADS / 32;
/// The grid is capped here; the kernels grid-stride over the remaining rows.
pub(super) const MAX_BLOCKS: u32 = 65_535;

const fn params(x: DType) -> [Param; 7] {
    [
        Param::input("w", DType::U8),
        Param::input("x", x),
        Param::output("y", DType::F32),
        Param::scalar("rows", ScalarType::U32),
        Param::scalar("cols", ScalarType::U32),
        Param::scalar("batch", ScalarType::U32),
        Param::scalar("kind", ScalarType::U32),
    ]
}

const F32: [Param; 7] = params(DType::F32);
const F16: [Param; 7] = params(DType::F16);
const BF16: [Param; 7] = params(DType::BF16);

const CUDA: &str = concat!(
    include_str!("cuda/common.cuh"),
    include_str!("cuda/ggml_matvec.cu")
);
const MSL: &str = include_str!("msl/ggml_matvec.metal");

pub(crate) const KERNELS: &[KernelSource] = &super::row_common::float_kernels(
    NAMES,
    [&F32, &F16, &BF16],
    CUDA,
    MSL,
    [
        matvec_cpu::<f32>,
        matvec_cpu::<half::f16>,
        matvec_cpu::<half::bf16>,
    ],
);

/// The block formats the kernels read, as their `kind` argument.
pub(super) fn kind(t: GgmlType) -> Option<u32> {
    match t {
        GgmlType::Q8_0 => Some(0),
        GgmlType::Q4_0 => Some(1),
        GgmlType::Q4_1 => Some(2),
        _ => None,
    }
}

/// Bytes of one block of `kind`.
pub(super) const fn block_bytes(kind: u32) -> usize {
    match kind {
        0 => 34,
        1 => 18,
        _ => 20,
    }
}

/// The 32 weights of one block of `kind` (`blk` is exactly its bytes).
pub(super) fn dequantize_block(kind: u32, blk: &[u8], out: &mut [f32; 32]) {
    let half_at = |i: usize| f16::from_le_bytes([blk[i], blk[i + 1]]).to_f32();
    let d = half_at(0);
    match kind {
        0 => {
            for (o, &q) in out.iter_mut().zip(&blk[2..34]) {
                *o = d * f32::from(q as i8);
            }
        }
        1 => {
            for (j, &q) in blk[2..18].iter().enumerate() {
                out[j] = d * (f32::from(q & 15) - 8.0);
                out[j + 16] = d * (f32::from(q >> 4) - 8.0);
            }
        }
        _ => {
            let m = half_at(2);
            for (j, &q) in blk[4..20].iter().enumerate() {
                out[j] = d * f32::from(q & 15) + m;
                out[j + 16] = d * f32::from(q >> 4) + m;
            }
        }
    }
}

/// The dot product of one decoded block with 32 values of x, summed in 8 lanes (so that it
/// vectorises) and then across them.
fn dot32(w: &[f32; 32], x: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    for (wc, xc) in w.chunks_exact(8).zip(x.chunks_exact(8)) {
        for ((l, &w), &x) in lanes.iter_mut().zip(wc).zip(xc) {
            *l += w * x;
        }
    }
    lanes.iter().sum()
}

/// Adds `row · x[b]` to `acc[b]` for every `b < acc.len()`: `row` is one row's blocks of `kind`
/// (exactly), `xs` holds `acc.len()` rows of `cols` f32 values. Blocks are decoded one at a
/// time into 32 f32 and reused for every row of x (the CPU kernels' inner loop).
pub(super) fn row_dot(kind: u32, row: &[u8], xs: &[f32], cols: usize, acc: &mut [f32]) {
    let mut block = [0.0f32; 32];
    for (k, blk) in row.chunks_exact(block_bytes(kind)).enumerate() {
        dequantize_block(kind, blk, &mut block);
        for (b, a) in acc.iter_mut().enumerate() {
            let at = b * cols + k * 32;
            *a += dot32(&block, &xs[at..at + 32]);
        }
    }
}

/// A `rows x cols` matrix in a ggml block format (Q8_0, Q4_0 or Q4_1): the blocks of each row
/// one after the other, as a GGUF file stores them.
///
/// ```
/// use unibuf::ops::{self, GgmlMatrix};
/// use unibuf::weights::gguf::GgmlType;
/// let dev = unibuf::Device::open("cpu")?;
/// let q = dev.queue();
/// // One Q8_0 row of 32 weights: scale 0.5 (f16 0x3800), codes 0, 1, ..., 31.
/// let mut row = vec![0x00u8, 0x38];
/// row.extend(0..32u8);
/// let w = dev.from_slice("w", &row, &[1, 34])?;
/// let m = GgmlMatrix::new(w, GgmlType::Q8_0, 1, 32)?;
/// let x = dev.from_slice("x", &[1.0f32; 32], &[32])?;
/// let y = q.download::<f32>(&ops::ggml_matvec(&q, &m, &x)?)?;
/// assert_eq!(y, [0.5 * (0..32).sum::<i32>() as f32]);
/// # Ok::<(), unibuf::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct GgmlMatrix {
    bytes: Buffer,
    ggml_type: GgmlType,
    kind: u32,
    rows: usize,
    cols: usize,
}

impl GgmlMatrix {
    /// A matrix over `bytes`, U8 `[rows, bytes per row]` (a view at any offset), checked
    /// against the format and the geometry: `cols` a non-zero multiple of 32.
    pub fn new(bytes: Buffer, ggml_type: GgmlType, rows: usize, cols: usize) -> Result<GgmlMatrix> {
        let Some(kind) = kind(ggml_type) else {
            return Err(Error::Unsupported {
                backend: "ops",
                what: format!(
                    "ggml_matvec over {}: the formats read natively are Q8_0, Q4_0 and Q4_1",
                    ggml_type.name()
                ),
            });
        };
        if rows == 0 || cols == 0 || !cols.is_multiple_of(32) {
            return Err(Error::invalid(
                "ggml matrix",
                format!("{rows} x {cols}: need rows > 0 and cols a non-zero multiple of 32"),
            ));
        }
        expect_dtype("ggml matrix bytes", &bytes, DType::U8)?;
        expect_shape(
            "ggml matrix bytes",
            &bytes,
            &[rows, cols / 32 * block_bytes(kind)],
        )?;
        Ok(GgmlMatrix {
            bytes,
            ggml_type,
            kind,
            rows,
            cols,
        })
    }

    /// The matrix of a loaded GGUF tensor: `info` from the file, `buffer` what the load gave
    /// for it (its rows are the file's outer dimensions, flattened).
    pub fn from_tensor(info: &TensorInfo, buffer: Buffer) -> Result<GgmlMatrix> {
        let ggml_type = [GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_1]
            .into_iter()
            .find(|t| t.name() == info.file_dtype)
            .ok_or_else(|| Error::Unsupported {
                backend: "ops",
                what: format!(
                    "ggml_matvec over tensor '{}' of {}: the formats read natively are Q8_0, \
                     Q4_0 and Q4_1",
                    info.name, info.file_dtype
                ),
            })?;
        let Some((&cols, outer)) = info.file_shape.split_last() else {
            return Err(Error::invalid(
                "ggml matrix",
                format!("tensor '{}' has no dimensions", info.name),
            ));
        };
        let rows = outer.iter().product::<usize>();
        let bytes =
            buffer.reshape(&[rows, cols / 32 * block_bytes(kind(ggml_type).unwrap_or(0))])?;
        GgmlMatrix::new(bytes, ggml_type, rows, cols)
    }

    /// The blocks, U8 `[rows, bytes per row]`.
    pub fn bytes(&self) -> &Buffer {
        &self.bytes
    }

    /// The kernels' `kind` of the format (0 Q8_0, 1 Q4_0, 2 Q4_1).
    pub(super) fn kind(&self) -> u32 {
        self.kind
    }

    /// The block format.
    pub fn ggml_type(&self) -> GgmlType {
        self.ggml_type
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns (weights per row).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The dequantised weights, row-major `rows x cols`, downloaded through `q` (for tests and
    /// references).
    pub fn dequantize_host(&self, q: &Queue) -> Result<Vec<f32>> {
        let bytes = q.download::<u8>(&self.bytes)?;
        let mut w = Vec::with_capacity(self.rows * self.cols);
        let mut block = [0.0f32; 32];
        for blk in bytes.chunks_exact(block_bytes(self.kind)) {
            dequantize_block(self.kind, blk, &mut block);
            w.extend_from_slice(&block);
        }
        Ok(w)
    }
}

/// (batch, output shape) for `x` (`what`) of `[cols]` or `[batch, cols]` multiplied by `m`,
/// giving `rows` outputs per row of x: `[rows]` or `[batch, rows]`.
pub(super) fn batch_of(
    what: &'static str,
    m: &GgmlMatrix,
    x: &Buffer,
    rows: usize,
) -> Result<(usize, Vec<usize>)> {
    expect_float(what, x)?;
    let (batch, shape) = match *x.shape() {
        [c] if c == m.cols => (1, vec![rows]),
        [b, c] if c == m.cols && (1..=GGML_MAX_BATCH).contains(&b) => (b, vec![b, rows]),
        _ => {
            return Err(Error::ShapeMismatch {
                what,
                expected: format!("[{}] or [batch <= {GGML_MAX_BATCH}, {}]", m.cols, m.cols),
                got: format!("{:?}", x.shape()),
            })
        }
    };
    if m.bytes.alloc.device.id != x.alloc.device.id {
        return Err(Error::WrongDevice {
            what,
            expected: m.bytes.alloc.device.id,
            got: x.alloc.device.id,
        });
    }
    Ok((batch, shape))
}

/// `y = m x` for `x` (f32, f16 or bf16) of `[cols]` or `[batch, cols]` (batch up to
/// [`GGML_MAX_BATCH`]), into a fresh f32 `[rows]` / `[batch, rows]`. Returns once queued.
pub fn ggml_matvec(q: &Queue, m: &GgmlMatrix, x: &Buffer) -> Result<Buffer> {
    let (_, y_shape) = batch_of("ggml_matvec x", m, x, m.rows)?;
    let y = output(q, "ggml_matvec", DType::F32, &y_shape)?;
    ggml_matvec_into(q, m, x, &y)?;
    Ok(y)
}

/// [`ggml_matvec`] into `y`, f32 of the shape it returns. Returns the submission's fence.
pub fn ggml_matvec_into(q: &Queue, m: &GgmlMatrix, x: &Buffer, y: &Buffer) -> Result<Fence> {
    let (batch, y_shape) = batch_of("ggml_matvec x", m, x, m.rows)?;
    expect_dtype("ggml_matvec y", y, DType::F32)?;
    expect_shape("ggml_matvec y", y, &y_shape)?;
    let rows = index_u32("ggml_matvec rows", m.rows)?;
    let cols = index_u32("ggml_matvec cols", m.cols)?;
    let k = kernel(q, by_dtype("ggml_matvec", NAMES, x.dtype())?)?;
    let blocks = rows.div_ceil(ROWS_PER_BLOCK).clamp(1, MAX_BLOCKS);
    q.launch(
        &k,
        LaunchDims::linear(blocks, THREADS),
        &[
            (&m.bytes).into(),
            x.into(),
            y.into(),
            rows.into(),
            cols.into(),
            (batch as u32).into(),
            m.kind.into(),
        ],
    )
}

fn matvec_cpu<X: HostFloat>(args: &mut CpuKernelArgs<'_>) -> std::result::Result<(), String> {
    const NAME: &str = "unibuf_ggml_matvec";
    let rows = args.u32(3)? as usize;
    let cols = args.u32(4)? as usize;
    let batch = args.u32(5)? as usize;
    let kind = args.u32(6)?;
    if kind > 2 || cols == 0 || !cols.is_multiple_of(32) || batch == 0 || batch > GGML_MAX_BATCH {
        return Err(format!(
            "{NAME}: bad geometry kind {kind}, cols {cols}, batch {batch}"
        ));
    }
    let w = args.input::<u8>(0)?;
    let x = args.input::<X>(1)?;
    let y = args.output::<f32>(2)?;
    let bb = block_bytes(kind);
    let nblocks = cols / 32;
    expect_len(NAME, "w", w.len(), rows * nblocks * bb)?;
    expect_len(NAME, "x", x.len(), batch * cols)?;
    expect_len(NAME, "y", y.len(), batch * rows)?;
    let xf: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
    for (r, row) in w.chunks_exact(nblocks * bb).enumerate() {
        let mut acc = [0.0f32; GGML_MAX_BATCH];
        row_dot(kind, row, &xf, cols, &mut acc[..batch]);
        for (b, a) in acc.iter().take(batch).enumerate() {
            y[b * rows + r] = *a;
        }
    }
    Ok(())
}
