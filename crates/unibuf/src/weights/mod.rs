//! Weights: safetensors and GGUF files into device buffers, and a streaming cache of MoE
//! experts.
//!
//! [`WeightsFile::open`] reads and validates a safetensors header, or a GGUF header (the file
//! starts with `GGUF`; see [`gguf`]), completely (see [`Header`]): a bad file is an
//! [`Error::Format`] naming the tensor (or key) and the problem, before any data moves. A GGUF
//! file's block-format tensors (Q8_0, Q4_0, Q4_1, ...) load as their bytes, `U8` of shape
//! `[rows, bytes per row]`, for the kernels that read them natively. [`WeightsFile::load`] then puts all or chosen tensors on a device, the way the
//! device wants them:
//!
//! - **Unified memory** (the CPU backend, Metal): zero copy. The file is mapped once and wrapped
//!   as one External buffer; every tensor is a view of it. Nothing is copied and the ledger
//!   records nothing, except for a tensor whose offset in the file is not a multiple of its
//!   element size: viewing it would hand kernels a misaligned pointer, so it is copied into a
//!   fresh buffer (one recorded upload) instead. The views are read-only.
//! - **Discrete memory** (CUDA): several threads `pread` the file straight into the pinned
//!   staging chunks and each chunk is copied to the device on the caller's queue while the next
//!   ones are read. The tensors are packed, 256-byte aligned, into a few large Private
//!   allocations (up to [`LoadOptions::group_bytes`] each) and returned as views of them.
//!
//! [`Route`] forces either path on any device, so the CPU backend tests the discrete path too.
//!
//! Dtypes unibuf lacks load as raw bytes: BOOL and the FP8 family as [`DType::U8`] of the
//! file's shape, complex and sub-byte floats (C64, F4, F6) as a 1-D run of bytes. The file's
//! own dtype and shape stay in [`TensorInfo::file_dtype`] and [`TensorInfo::file_shape`].
//!
//! ```
//! use unibuf::weights::{Selection, WeightsFile};
//! # let dir = std::env::temp_dir().join(format!("unibuf-doc-{}", std::process::id()));
//! # std::fs::create_dir_all(&dir).unwrap();
//! # let path = dir.join("tiny.safetensors");
//! # let data: Vec<u8> = [1.5f32, -2.0, 0.25].iter().flat_map(|x| x.to_le_bytes()).collect();
//! # let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![3], &data).unwrap();
//! # safetensors::serialize_to_file([("w", view)], None, &path).unwrap();
//! let dev = unibuf::Device::open("cpu")?;
//! let file = WeightsFile::open(&path)?;
//! let weights = file.load(&dev, &dev.queue(), &Selection::All)?;
//! let w = weights.get("w").expect("in the file");
//! assert_eq!(w.to_vec::<f32>()?, [1.5, -2.0, 0.25]);
//! println!("{}", weights.report()); // GB/s and a table by dtype
//! # Ok::<(), unibuf::Error>(())
//! ```
//!
//! [`ExpertCache`] keeps a budgeted number of a mixture-of-experts layer's experts on the
//! device, reads misses from the file and prefetches predicted experts in the background.
//!
//! [`DType::U8`]: crate::DType::U8
//! [`Error::Format`]: crate::Error::Format

mod expert_cache;
pub mod gguf;
mod header;
mod load;

pub use expert_cache::{ExpertCache, ExpertHandle, ExpertLayout, ExpertStats};
pub use header::{Header, TensorInfo, MAX_HEADER_BYTES, MAX_RANK, MAX_TENSORS};
pub use load::{DTypeRow, LoadOptions, LoadReport, LoadedWeights, Route, Selection};

use crate::error::{Error, Result};
use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

/// An open safetensors or GGUF file whose header has been validated. Cheap to clone.
#[derive(Clone)]
pub struct WeightsFile {
    inner: Arc<FileInner>,
}

struct FileInner {
    path: PathBuf,
    file: File,
    header: Header,
    /// The GGUF header, for a GGUF file (typed metadata, ggml types).
    gguf: Option<gguf::GgufHeader>,
    /// The read-only mapping, made on first use by a zero-copy load.
    map: OnceLock<Arc<memmap2::Mmap>>,
}

impl WeightsFile {
    /// Opens `path` and validates its header (nothing of the data is read).
    ///
    /// Errors: `Io` if the file cannot be opened or read, `Format` naming the tensor (or the
    /// header, or the GGUF key) and the problem if it is not a valid safetensors or GGUF file,
    /// `Unsupported` for a GGUF version other than 2 or 3.
    pub fn open(path: impl AsRef<Path>) -> Result<WeightsFile> {
        let path = path.as_ref().to_path_buf();
        let shown = path.display().to_string();
        let file = File::open(&path).map_err(|e| Error::io(shown.clone(), e))?;
        let file_len = file
            .metadata()
            .map_err(|e| Error::io(shown.clone(), e))?
            .len();
        let in_file = |e: Error| match e {
            Error::Format { what, detail } => Error::Format {
                what: format!("{shown}: {what}"),
                detail,
            },
            other => other,
        };
        let mut len = [0u8; 8];
        let got = (file_len as usize).min(8);
        read_exact_at(&file, &mut len[..got], 0, &shown, "the header length")?;
        // A safetensors file starts with its header's length, which as a little-endian u64
        // would be at least 0x4655_4747 ("GGUF") bytes: more than any header may hold, so the
        // magic cannot be mistaken for one.
        if len[..got].starts_with(&gguf::MAGIC) {
            let g = gguf::GgufHeader::read_open(&file, file_len, &shown)?;
            return Ok(WeightsFile {
                inner: Arc::new(FileInner {
                    path,
                    file,
                    header: Header::from_gguf(&g),
                    gguf: Some(g),
                    map: OnceLock::new(),
                }),
            });
        }
        let n = header::header_len(&len[..got], file_len).map_err(in_file)?;
        // `n` is at most MAX_HEADER_BYTES and at most the file's length: safe to allocate.
        let mut json = vec![0u8; n as usize];
        read_exact_at(&file, &mut json, header::LENGTH_BYTES, &shown, "the header")?;
        let header = Header::parse_json(&json, file_len).map_err(in_file)?;
        Ok(WeightsFile {
            inner: Arc::new(FileInner {
                path,
                file,
                header,
                gguf: None,
                map: OnceLock::new(),
            }),
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The validated header (for a GGUF file, its safetensors-shaped view: see
    /// [`WeightsFile::gguf`] for the GGUF header itself).
    pub fn header(&self) -> &Header {
        &self.inner.header
    }

    /// The GGUF header, for a GGUF file: typed metadata (the tokenizer's vocabulary and
    /// merges, the model's hyperparameters) and the tensors' ggml types.
    pub fn gguf(&self) -> Option<&gguf::GgufHeader> {
        self.inner.gguf.as_ref()
    }

    /// The file's format: "safetensors" or "gguf".
    pub fn format(&self) -> &'static str {
        if self.inner.gguf.is_some() {
            "gguf"
        } else {
            "safetensors"
        }
    }

    /// The tensors in file order: name, dtype, shape and byte range.
    pub fn tensors(&self) -> &[TensorInfo] {
        self.inner.header.tensors()
    }

    /// The tensor called `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.inner.header.tensor(name)
    }

    /// The file's `__metadata__` (for a GGUF file, its key-value pairs as text).
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        self.inner.header.metadata()
    }

    /// Bytes of tensor data in the file.
    pub fn data_len(&self) -> u64 {
        self.inner.header.data_len()
    }

    /// Reads the bytes of `tensor` (of this file) from `offset` within it into `out`, with
    /// `pread` (no seek, safe from several threads).
    pub fn read_tensor(&self, tensor: &TensorInfo, offset: u64, out: &mut [u8]) -> Result<()> {
        let end = offset.checked_add(out.len() as u64);
        if end.is_none_or(|e| e > tensor.byte_len()) {
            return Err(Error::OutOfBounds {
                what: "read_tensor",
                start: offset as usize,
                end: end.map_or(usize::MAX, |e| e as usize),
                len: tensor.byte_len() as usize,
            });
        }
        read_exact_at(
            &self.inner.file,
            out,
            tensor.range.start + offset,
            &self.shown(),
            &format!("tensor '{}'", tensor.name.escape_debug()),
        )
    }

    /// The file mapped read-only, shared by every zero-copy load of it.
    pub(crate) fn map(&self) -> Result<Arc<memmap2::Mmap>> {
        if let Some(m) = self.inner.map.get() {
            return Ok(m.clone());
        }
        // SAFETY: the mapping is read-only and private to this process. Its contents are only
        // ever read as plain bytes (never as references to typed data with invariants), so a
        // concurrent truncation or rewrite of the file by another process can at worst fault
        // with SIGBUS, as for any mapped file, and cannot break Rust's aliasing rules here.
        let m = unsafe { memmap2::MmapOptions::new().map(&self.inner.file) }
            .map_err(|e| Error::io(format!("{}: mapping", self.shown()), e))?;
        if (m.len() as u64) != self.inner.header.file_len() {
            return Err(Error::Format {
                what: self.shown(),
                detail: format!(
                    "the file changed size since it was opened ({} bytes, now {})",
                    self.inner.header.file_len(),
                    m.len()
                ),
            });
        }
        Ok(self.inner.map.get_or_init(|| Arc::new(m)).clone())
    }

    pub(crate) fn file(&self) -> &File {
        &self.inner.file
    }

    pub(crate) fn shown(&self) -> String {
        self.inner.path.display().to_string()
    }
}

impl std::fmt::Debug for WeightsFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WeightsFile")
            .field("path", &self.inner.path)
            .field("tensors", &self.inner.header.tensors().len())
            .field("data_len", &self.inner.header.data_len())
            .finish()
    }
}

/// `pread` of exactly `out.len()` bytes at `offset`; a short file is a `Format` error (it
/// shrank since its header was validated), anything else an `Io` error.
pub(crate) fn read_exact_at(
    file: &File,
    out: &mut [u8],
    offset: u64,
    path: &str,
    what: &str,
) -> Result<()> {
    file.read_exact_at(out, offset).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            Error::Format {
                what: format!("{path}: {what}"),
                detail: format!(
                    "the file ended before byte {} (truncated while open?)",
                    offset + out.len() as u64
                ),
            }
        } else {
            Error::io(format!("{path}: reading {what} at byte {offset}"), e)
        }
    })
}
