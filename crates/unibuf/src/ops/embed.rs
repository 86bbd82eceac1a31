//! Embedding rows: `out[i] = table[ids[i]]`, gathered on the device from a table in a ggml block
//! format (Q8_0, Q4_0, Q4_1: dequantised as it is read) or in f32, f16 or bf16, into f32, f16
//! or bf16 rows. A decoder's first step, on the token ids the sampler left on the device.

use super::ggml_matvec::{block_bytes, dequantize_block, GgmlMatrix};
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
use half::{bf16, f16};

const NAMES: [&str; 3] = ["unibuf_embed_f32", "unibuf_embed_f16", "unibuf_embed_bf16"];

/// Threads per block: one block per output row, its threads over the columns.
const THREADS: u32 = 256;
/// The grid is capped here; the kernels grid-stride over the remaining rows.
const MAX_BLOCKS: u32 = 65_535;

const fn params(out: DType) -> [Param; 7] {
    [
        Param::input("table", DType::U8),
        Param::input("ids", DType::U32),
        Param::output("out", out),
        Param::scalar("n", ScalarType::U32),
        Param::scalar("cols", ScalarType::U32),
        Param::scalar("vocab", ScalarType::U32),
        Param::scalar("kind", ScalarType::U32),
    ]
}

const F32: [Param; 7] = params(DType::F32);
const F16: [Param; 7] = params(DType::F16);
const BF16: [Param; 7] = params(DType::BF16);

const CUDA: &str = concat!(
    include_str!("cuda/common.cuh"),
    include_str!("cuda/embed.cu")
);
const MSL: &str = include_str!("msl/embed.metal");

pub(crate) const KERNELS: &[KernelSource] = &super::row_common::float_kernels(
    NAMES,
    [&F32, &F16, &BF16],
    CUDA,
    MSL,
    [embed_cpu::<f32>, embed_cpu::<f16>, embed_cpu::<bf16>],
);

/// The table kinds of the plain dtypes (after the block formats' 0, 1, 2).
const KIND_F32: u32 = 3;
const KIND_F16: u32 = 4;
const KIND_BF16: u32 = 5;

/// An embedding table: `vocab` rows of `cols` values, in a ggml block format or in a float
/// dtype.
///
/// ```
/// use unibuf::ops::{self, EmbeddingTable};
/// use unibuf::DType;
/// let dev = unibuf::Device::open("cpu")?;
/// let q = dev.queue();
/// let table = dev.from_slice("embed", &[0.0f32, 1.0, 10.0, 11.0, 20.0, 21.0], &[3, 2])?;
/// let table = EmbeddingTable::rows(table)?;
/// let ids = dev.from_slice("ids", &[2u32, 0], &[2])?;
/// let x = ops::embed_rows(&q, &table, &ids, DType::F32)?;
/// assert_eq!(q.download::<f32>(&x)?, [20.0, 21.0, 0.0, 1.0]);
/// # Ok::<(), unibuf::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct EmbeddingTable {
    /// The table's bytes, U8 `[vocab, bytes per row]`.
    bytes: Buffer,
    vocab: usize,
    cols: usize,
    kind: u32,
}

impl EmbeddingTable {
    /// A table in a ggml block format: the matrix's rows are the vocabulary.
    pub fn blocks(m: &GgmlMatrix) -> EmbeddingTable {
        EmbeddingTable {
            bytes: m.bytes().clone(),
            vocab: m.rows(),
            cols: m.cols(),
            kind: m.kind(),
        }
    }

    /// A table of f32, f16 or bf16 values, `[vocab, cols]`.
    pub fn rows(table: Buffer) -> Result<EmbeddingTable> {
        expect_float("embedding table", &table)?;
        let &[vocab, cols] = table.shape() else {
            return Err(Error::ShapeMismatch {
                what: "embedding table",
                expected: "[vocab, cols]".to_owned(),
                got: format!("{:?}", table.shape()),
            });
        };
        if vocab == 0 || cols == 0 {
            return Err(Error::invalid(
                "embedding table",
                format!("shape {:?}: empty", table.shape()),
            ));
        }
        let kind = match table.dtype() {
            DType::F32 => KIND_F32,
            DType::F16 => KIND_F16,
            _ => KIND_BF16,
        };
        Ok(EmbeddingTable {
            bytes: table.cast(DType::U8)?,
            vocab,
            cols,
            kind,
        })
    }

    /// Rows in the table.
    pub fn vocab(&self) -> usize {
        self.vocab
    }

    /// Values per row.
    pub fn cols(&self) -> usize {
        self.cols
    }
}

/// The rows `ids` (U32 `[n]`) of `table` as a fresh `[n, cols]` buffer of `dtype` (f32, f16 or
/// bf16). An id at or past the vocabulary gives a row of NaN: the ids are on the device, where
/// the kernels cannot report an error, and NaN makes the bad id visible downstream.
pub fn embed_rows(q: &Queue, table: &EmbeddingTable, ids: &Buffer, dtype: DType) -> Result<Buffer> {
    let n = check_ids(table, ids)?;
    let out = output(q, "embed_rows", dtype, &[n, table.cols])?;
    embed_rows_into(q, table, ids, &out)?;
    Ok(out)
}

/// [`embed_rows`] into `out`, `[n, cols]` of f32, f16 or bf16. Returns the submission's fence.
pub fn embed_rows_into(
    q: &Queue,
    table: &EmbeddingTable,
    ids: &Buffer,
    out: &Buffer,
) -> Result<Fence> {
    let n = check_ids(table, ids)?;
    expect_float("embed_rows out", out)?;
    expect_shape("embed_rows out", out, &[n, table.cols])?;
    if out.alloc.device.id != table.bytes.alloc.device.id {
        return Err(Error::WrongDevice {
            what: "embed_rows out",
            expected: table.bytes.alloc.device.id,
            got: out.alloc.device.id,
        });
    }
    let n_u32 = index_u32("embed_rows ids", n)?;
    let cols = index_u32("embed_rows cols", table.cols)?;
    let vocab = index_u32("embed_rows vocab", table.vocab)?;
    let k = kernel(q, by_dtype("embed_rows", NAMES, out.dtype())?)?;
    q.launch(
        &k,
        LaunchDims::linear(n_u32.clamp(1, MAX_BLOCKS), THREADS),
        &[
            (&table.bytes).into(),
            ids.into(),
            out.into(),
            n_u32.into(),
            cols.into(),
            vocab.into(),
            table.kind.into(),
        ],
    )
}

/// The number of ids: U32 `[n]`, `n > 0`, on the table's device.
fn check_ids(table: &EmbeddingTable, ids: &Buffer) -> Result<usize> {
    expect_dtype("embed_rows ids", ids, DType::U32)?;
    let &[n] = ids.shape() else {
        return Err(Error::ShapeMismatch {
            what: "embed_rows ids",
            expected: "[n]".to_owned(),
            got: format!("{:?}", ids.shape()),
        });
    };
    if n == 0 {
        return Err(Error::invalid(
            "embed_rows ids",
            "no ids: need at least one",
        ));
    }
    if ids.alloc.device.id != table.bytes.alloc.device.id {
        return Err(Error::WrongDevice {
            what: "embed_rows ids",
            expected: table.bytes.alloc.device.id,
            got: ids.alloc.device.id,
        });
    }
    Ok(n)
}

fn embed_cpu<O: HostFloat>(args: &mut CpuKernelArgs<'_>) -> std::result::Result<(), String> {
    const NAME: &str = "unibuf_embed";
    let n = args.u32(3)? as usize;
    let cols = args.u32(4)? as usize;
    let vocab = args.u32(5)? as usize;
    let kind = args.u32(6)?;
    let row_bytes = match kind {
        0..=2 if cols.is_multiple_of(32) => cols / 32 * block_bytes(kind),
        KIND_F32 => cols * 4,
        KIND_F16 | KIND_BF16 => cols * 2,
        _ => return Err(format!("{NAME}: bad table kind {kind} for {cols} columns")),
    };
    let table = args.input::<u8>(0)?;
    let ids = args.input::<u32>(1)?;
    let out = args.output::<O>(2)?;
    expect_len(NAME, "table", table.len(), vocab * row_bytes)?;
    expect_len(NAME, "ids", ids.len(), n)?;
    expect_len(NAME, "out", out.len(), n * cols)?;
    let mut block = [0.0f32; 32];
    for (dst, &id) in out.chunks_exact_mut(cols).zip(ids) {
        let id = id as usize;
        if id >= vocab {
            dst.fill(O::from_f32(f32::NAN));
            continue;
        }
        let row = &table[id * row_bytes..(id + 1) * row_bytes];
        match kind {
            KIND_F32 => {
                for (d, b) in dst.iter_mut().zip(row.chunks_exact(4)) {
                    *d = O::from_f32(f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
                }
            }
            KIND_F16 => {
                for (d, b) in dst.iter_mut().zip(row.chunks_exact(2)) {
                    *d = O::from_f32(f16::from_le_bytes([b[0], b[1]]).to_f32());
                }
            }
            KIND_BF16 => {
                for (d, b) in dst.iter_mut().zip(row.chunks_exact(2)) {
                    *d = O::from_f32(bf16::from_le_bytes([b[0], b[1]]).to_f32());
                }
            }
            _ => {
                for (d, blk) in dst
                    .chunks_exact_mut(32)
                    .zip(row.chunks_exact(block_bytes(kind)))
                {
                    dequantize_block(kind, blk, &mut block);
                    for (o, v) in d.iter_mut().zip(block) {
                        *o = O::from_f32(v);
                    }
                }
            }
        }
    }
    Ok(())
}
