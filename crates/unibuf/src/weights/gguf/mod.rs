//! GGUF files: parsing and complete validation of the header (format versions 2 and 3).
//!
//! A GGUF file (the format of llama.cpp and ggml) is, all little-endian:
//!
//! ```text
//! magic "GGUF" | version u32 | tensor_count u64 | kv_count u64
//! kv_count × (key: string, value_type u32, value)
//! tensor_count × (name: string, n_dims u32, dims n_dims × u64, ggml_type u32, offset u64)
//! padding to `general.alignment` (default 32)
//! tensor data: each tensor at data_start + its offset
//! ```
//!
//! where a string is a u64 byte length and that many bytes of UTF-8, and an array value is an
//! element type (u32), a u64 count and the elements (arrays of arrays are allowed). Version 1
//! had u32 counts and lengths and is not read; versions 2 and 3 share this layout (3 added
//! big-endian files, which are refused here: every real file is little-endian).
//!
//! [`GgufHeader::parse`] reads and validates all of it to the standard of the safetensors
//! header (see [`crate::weights::Header`]): a bad file is an [`Error::Format`] whose `what`
//! names the key (`key 'general.name'`, or `key #3` before its name could be read), the tensor
//! (`tensor 'blk.0.attn_q.weight'`, `tensor #7`) or the `header`, and whose `detail` gives the
//! values and file offsets involved. An unread version is [`Error::Unsupported`]. Nothing here
//! panics on any input, and nothing is allocated from an untrusted count or length until the
//! bytes it claims are known to be in the file (so allocation is bounded by a small multiple
//! of the file's size), with counts capped ([`MAX_TENSORS`], [`MAX_KVS`]) and array nesting
//! bounded ([`MAX_ARRAY_DEPTH`]) so that recursion cannot exhaust the stack.
//!
//! What is refused, beyond a file that ends early or a length that runs past it: an unknown
//! value type or ggml type, invalid UTF-8 in a key, string or tensor name, a key or tensor
//! name that appears twice, a bool byte other than 0 or 1, a `general.alignment` that is not a
//! u32 power of two, a tensor of 0 or more than [`MAX_DIMS`] dimensions, a dimension of 0, an
//! element count past `i64::MAX` (ggml counts elements in an `int64_t`), a row length
//! (`dims[0]`) that is not a whole number of blocks of a block format, a data offset that is
//! not a multiple of the alignment, and tensor data that overlaps another tensor's or runs
//! past the end of the file.
//!
//! Keys and names are checked for UTF-8 and uniqueness only: the spec's lower_snake_case
//! convention for keys and ggml's 64-byte limit on tensor names are not enforced (neither
//! matters to a loader). Padding bytes are not checked to be zero.
//!
//! Two choices are deliberately stricter or looser than they could be:
//! - **A dimension of 0 is refused.** No model has an empty tensor, an empty tensor has no
//!   bytes for its offset to locate, and ggml's own reader divides by the dimensions while
//!   checking them, so it cannot read such a file either. A 0 is far more likely corruption.
//! - **Gaps between tensors are allowed** (llama.cpp requires each tensor to start exactly at
//!   the previous one's end rounded up to the alignment). Padding is harmless to a loader and
//!   some writers pad differently; only overlaps and data past the file's end matter.
//!
//! Dimensions are kept in ggml's order, fastest-varying first: `dims[0]` is the row length
//! (the contiguous one, along which blocks run) and [`GgufTensor::shape`] gives the usual
//! row-major shape, outermost first. A 576 × 49152 token embedding of 49152 rows of 576 is
//! `dims == [576, 49152]`, `shape() == [49152, 576]`.
//!
//! ```
//! use unibuf::weights::gguf::{GgmlType, GgufHeader};
//! // A file with one key and one F32 tensor of 2 elements at offset 0.
//! let mut f = b"GGUF".to_vec();
//! f.extend(3u32.to_le_bytes()); // version
//! f.extend(1u64.to_le_bytes()); // tensors
//! f.extend(1u64.to_le_bytes()); // key-value pairs
//! f.extend(20u64.to_le_bytes());
//! f.extend(b"general.architecture");
//! f.extend(8u32.to_le_bytes()); // string
//! f.extend(5u64.to_le_bytes());
//! f.extend(b"llama");
//! f.extend(1u64.to_le_bytes());
//! f.extend(b"w");
//! f.extend(1u32.to_le_bytes()); // one dimension
//! f.extend(2u64.to_le_bytes());
//! f.extend(0u32.to_le_bytes()); // F32
//! f.extend(0u64.to_le_bytes()); // offset
//! f.resize(f.len().next_multiple_of(32), 0);
//! f.extend(1.5f32.to_le_bytes());
//! f.extend(2.5f32.to_le_bytes());
//! let h = GgufHeader::parse(&f)?;
//! assert_eq!(h.get_str("general.architecture")?, "llama");
//! let w = h.tensor("w").expect("in the file");
//! assert_eq!((w.ggml_type, w.byte_len()), (GgmlType::F32, 8));
//! assert_eq!(w.range.start, h.data_start());
//! f.pop(); // one byte short
//! assert!(GgufHeader::parse(&f).unwrap_err().to_string().contains("tensor 'w'"));
//! # Ok::<(), unibuf::Error>(())
//! ```

mod ggml;
#[cfg(test)]
mod tests;
mod value;

pub use ggml::GgmlType;
pub use value::{GgufArray, GgufValue, GgufValueType};

use crate::dtype::DType;
use crate::error::{Error, Result};
use std::collections::HashMap;
use std::fs::File;
use std::ops::Range;
use std::path::Path;

/// The four bytes every GGUF file starts with.
pub const MAGIC: [u8; 4] = *b"GGUF";

/// The alignment of tensor data when the file has no `general.alignment`.
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// The key that sets the alignment (a u32 power of two).
pub const ALIGNMENT_KEY: &str = "general.alignment";

/// ggml's `GGML_MAX_DIMS`: a tensor has 1 to 4 dimensions.
pub const MAX_DIMS: usize = 4;

/// The most tensor infos one file may declare. A large model has a few thousand tensors per
/// file; a million is a corrupt count, and the cap bounds the work of refusing it.
pub const MAX_TENSORS: u64 = 1 << 20;

/// The most metadata key-value pairs one file may declare (real files have tens).
pub const MAX_KVS: u64 = 1 << 20;

/// The deepest nesting of arrays accepted (an array of arrays is depth 2). Real files use 1;
/// the bound keeps the recursive reader's stack use small whatever the file says.
pub const MAX_ARRAY_DEPTH: usize = 8;

/// The fewest bytes a key-value pair can take: key length, value type, a one-byte value.
const MIN_KV_BYTES: u64 = 8 + 4 + 1;

/// The fewest bytes a tensor info can take: name length, n_dims, one dimension, type, offset.
const MIN_TENSOR_BYTES: u64 = 8 + 4 + 8 + 4 + 8;

/// The first read of [`GgufHeader::read`]; headers are mostly the tokenizer (a few MB).
const FIRST_READ_BYTES: u64 = 4 << 20;

/// One tensor of a file, as its tensor info describes it (validated).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct GgufTensor {
    /// The tensor's name.
    pub name: String,
    /// The dimensions in ggml's order, fastest-varying (the row length) first; 1 to
    /// [`MAX_DIMS`] of them, none 0.
    pub dims: Vec<u64>,
    /// The element type.
    pub ggml_type: GgmlType,
    /// The data offset as the file gives it, relative to [`GgufHeader::data_start`] (a
    /// multiple of the alignment).
    pub offset: u64,
    /// The tensor's bytes as absolute offsets in the file.
    pub range: Range<u64>,
}

impl GgufTensor {
    /// The number of elements (at most `i64::MAX`).
    pub fn elements(&self) -> u64 {
        // Validated at parse time not to overflow; saturating keeps this total anyway.
        self.dims.iter().fold(1u64, |n, &d| n.saturating_mul(d))
    }

    /// Bytes of data.
    pub fn byte_len(&self) -> u64 {
        self.range.end - self.range.start
    }

    /// The row length, `dims[0]`: the contiguous dimension, a whole number of blocks.
    pub fn row_len(&self) -> u64 {
        self.dims.first().copied().unwrap_or(1)
    }

    /// The row-major shape, outermost first (`dims` reversed), as unibuf's buffers take it.
    pub fn shape(&self) -> Vec<usize> {
        self.dims
            .iter()
            .rev()
            .map(|&d| usize::try_from(d).unwrap_or(usize::MAX))
            .collect()
    }

    /// The unibuf dtype of the elements, for the plain types unibuf has (F32, F16, BF16, F64
    /// and the signed integers); `None` for the block formats.
    pub fn dtype(&self) -> Option<DType> {
        self.ggml_type.dtype()
    }
}

/// A parsed and validated GGUF header: metadata, tensor infos and the data section's layout.
#[derive(Clone, Debug)]
pub struct GgufHeader {
    version: u32,
    /// In file order.
    metadata: Vec<(String, GgufValue)>,
    meta_index: HashMap<String, usize>,
    /// In file order (the order of the tensor infos).
    tensors: Vec<GgufTensor>,
    tensor_index: HashMap<String, usize>,
    alignment: u64,
    header_len: u64,
    data_start: u64,
    file_len: u64,
}

/// Where the reader is, for the `what` of its errors.
enum Ctx {
    Header,
    Key { index: u64, name: Option<String> },
    Tensor { index: u64, name: Option<String> },
}

impl Ctx {
    fn what(&self) -> String {
        match self {
            Ctx::Header => "header".to_owned(),
            Ctx::Key {
                name: Some(name), ..
            } => key_what(name),
            Ctx::Key { index, name: None } => format!("key #{index}"),
            Ctx::Tensor {
                name: Some(name), ..
            } => tensor_what(name),
            Ctx::Tensor { index, name: None } => format!("tensor #{index}"),
        }
    }
}

fn key_what(key: &str) -> String {
    format!("key '{}'", key.escape_debug())
}

fn tensor_what(name: &str) -> String {
    format!("tensor '{}'", name.escape_debug())
}

/// A `Format` error about the metadata entry `key`.
fn key_err(key: &str, detail: impl Into<String>) -> Error {
    Error::Format {
        what: key_what(key),
        detail: detail.into(),
    }
}

/// A `Format` error about the tensor `name`.
fn tensor_err(name: &str, detail: impl Into<String>) -> Error {
    Error::Format {
        what: tensor_what(name),
        detail: detail.into(),
    }
}

/// A bounds-checked little-endian cursor over the bytes held of a file.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    /// The whole file's length; `buf` may be only its first bytes.
    file_len: u64,
    ctx: Ctx,
    /// Set when a read ran past the bytes held but would have fit in the file, so that
    /// [`GgufHeader::read`] can try again with more of it.
    short: bool,
}

impl<'a> Reader<'a> {
    fn err(&self, detail: impl Into<String>) -> Error {
        Error::Format {
            what: self.ctx.what(),
            detail: detail.into(),
        }
    }

    fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }

    /// The error for `need` bytes of `field` wanted at the current position that are not
    /// there: past the end of the file, or only past the bytes read of it.
    fn short_err(&mut self, need: u64, field: &str) -> Error {
        let at = self.pos as u64;
        let held = self.buf.len() as u64;
        if held < self.file_len && at.saturating_add(need) <= self.file_len {
            self.short = true;
            self.err(format!(
                "{field} ({need} bytes at byte {at}) lies past the {held} bytes read of the \
                 {}-byte file",
                self.file_len
            ))
        } else {
            self.err(format!(
                "{field} needs {need} bytes at byte {at} but the file ends at byte {} \
                 (truncated, or a corrupt length or count)",
                self.file_len.min(held)
            ))
        }
    }

    fn take(&mut self, n: u64, field: impl FnOnce() -> String) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(self.short_err(n, &field()));
        }
        // `n` fits in what remains of `buf`, so it fits in usize and the slice is in bounds.
        let s = &self.buf[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, field: impl FnOnce() -> String) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N as u64, field)?);
        Ok(a)
    }

    fn u32(&mut self, field: impl FnOnce() -> String) -> Result<u32> {
        self.array(field).map(u32::from_le_bytes)
    }

    fn u64(&mut self, field: impl FnOnce() -> String) -> Result<u64> {
        self.array(field).map(u64::from_le_bytes)
    }

    /// Checks that `count` items of at least `min` bytes each can lie in what remains, before
    /// anything is allocated for them; returns `count` as a usize (then at most the bytes
    /// left, so a safe capacity). `field` says what claims them ("the value (an array of 5000
    /// string)").
    fn room(&mut self, count: u64, min: u64, field: impl FnOnce() -> String) -> Result<usize> {
        let need = u128::from(count) * u128::from(min);
        if need > u128::from(self.remaining()) {
            let field = field();
            let need = u64::try_from(need).unwrap_or(u64::MAX);
            let e = self.short_err(need, &field);
            if self.short {
                return Err(e);
            }
            return Err(self.err(format!(
                "{field}: at least {need} bytes are needed but only {} remain in the file after \
                 byte {} (a corrupt count)",
                self.remaining(),
                self.pos
            )));
        }
        // need <= remaining <= usize::MAX, and min >= 1, so count fits in usize.
        Ok(count as usize)
    }

    /// A string: u64 length, then that many bytes of UTF-8.
    fn string(&mut self, field: &dyn Fn() -> String) -> Result<String> {
        let len = self.u64(|| format!("the length of {}", field()))?;
        let at = self.pos;
        // `take` refuses a length past the bytes left before anything is allocated.
        let bytes = self.take(len, || format!("{} ({len} bytes long)", field()))?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_owned()),
            Err(e) => Err(self.err(format!(
                "{} is not valid UTF-8: invalid byte at file offset {} ({len}-byte string at \
                 byte {at})",
                field(),
                at + e.valid_up_to()
            ))),
        }
    }

    /// A value of type `ty`, inside `depth` arrays.
    fn value(
        &mut self,
        ty: GgufValueType,
        depth: usize,
        field: &dyn Fn() -> String,
    ) -> Result<GgufValue> {
        Ok(match ty {
            GgufValueType::U8 => GgufValue::U8(u8::from_le_bytes(self.array(field)?)),
            GgufValueType::I8 => GgufValue::I8(i8::from_le_bytes(self.array(field)?)),
            GgufValueType::U16 => GgufValue::U16(u16::from_le_bytes(self.array(field)?)),
            GgufValueType::I16 => GgufValue::I16(i16::from_le_bytes(self.array(field)?)),
            GgufValueType::U32 => GgufValue::U32(u32::from_le_bytes(self.array(field)?)),
            GgufValueType::I32 => GgufValue::I32(i32::from_le_bytes(self.array(field)?)),
            GgufValueType::F32 => GgufValue::F32(f32::from_le_bytes(self.array(field)?)),
            GgufValueType::U64 => GgufValue::U64(u64::from_le_bytes(self.array(field)?)),
            GgufValueType::I64 => GgufValue::I64(i64::from_le_bytes(self.array(field)?)),
            GgufValueType::F64 => GgufValue::F64(f64::from_le_bytes(self.array(field)?)),
            GgufValueType::Bool => {
                let at = self.pos;
                let [b] = self.array(field)?;
                GgufValue::Bool(self.bool(b, at, field)?)
            }
            GgufValueType::String => GgufValue::String(self.string(field)?),
            GgufValueType::Array => GgufValue::Array(self.array_value(depth + 1, field)?),
        })
    }

    fn bool(&self, b: u8, at: usize, field: &dyn Fn() -> String) -> Result<bool> {
        match b {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(self.err(format!(
                "{} is a bool of byte value {b} at file offset {at}; a bool is 0 or 1",
                field()
            ))),
        }
    }

    /// An array value (element type, count, elements) at nesting `depth` (1 for the outermost).
    fn array_value(&mut self, depth: usize, field: &dyn Fn() -> String) -> Result<GgufArray> {
        if depth > MAX_ARRAY_DEPTH {
            return Err(self.err(format!(
                "{} nests arrays deeper than {MAX_ARRAY_DEPTH} levels (MAX_ARRAY_DEPTH)",
                field()
            )));
        }
        let code = self.u32(|| format!("the element type of {}", field()))?;
        let Some(ty) = GgufValueType::from_code(code) else {
            return Err(self.err(format!(
                "{} is an array of element type code {code}, which is no GGUF value type \
                 (0 to 12)",
                field()
            )));
        };
        let count = self.u64(|| format!("the element count of {}", field()))?;
        let n = self.room(count, ty.min_size(), || {
            format!("{}, an array of {count} {ty} elements", field())
        })?;
        /// Fixed-size elements: one bounds check for all of them, then a conversion.
        macro_rules! fixed {
            ($v:ident, $t:ty) => {{
                const SIZE: usize = std::mem::size_of::<$t>();
                let bytes = self.take((n * SIZE) as u64, field)?;
                GgufArray::$v(
                    bytes
                        .chunks_exact(SIZE)
                        .map(|c| {
                            let mut a = [0u8; SIZE];
                            a.copy_from_slice(c);
                            <$t>::from_le_bytes(a)
                        })
                        .collect(),
                )
            }};
        }
        Ok(match ty {
            GgufValueType::U8 => fixed!(U8, u8),
            GgufValueType::I8 => fixed!(I8, i8),
            GgufValueType::U16 => fixed!(U16, u16),
            GgufValueType::I16 => fixed!(I16, i16),
            GgufValueType::U32 => fixed!(U32, u32),
            GgufValueType::I32 => fixed!(I32, i32),
            GgufValueType::F32 => fixed!(F32, f32),
            GgufValueType::U64 => fixed!(U64, u64),
            GgufValueType::I64 => fixed!(I64, i64),
            GgufValueType::F64 => fixed!(F64, f64),
            GgufValueType::Bool => {
                let at = self.pos;
                let bytes = self.take(n as u64, field)?;
                let mut v = Vec::with_capacity(n);
                for (i, &b) in bytes.iter().enumerate() {
                    v.push(self.bool(b, at + i, &|| format!("element {i} of {}", field()))?);
                }
                GgufArray::Bool(v)
            }
            GgufValueType::String => {
                let mut v = Vec::with_capacity(n);
                for i in 0..n {
                    v.push(self.string(&|| format!("element {i} of {}", field()))?);
                }
                GgufArray::String(v)
            }
            GgufValueType::Array => {
                let mut v = Vec::with_capacity(n);
                for i in 0..n {
                    v.push(self.array_value(depth + 1, &|| format!("element {i} of {}", field()))?);
                }
                GgufArray::Array(v)
            }
        })
    }
}

/// Generates the strict typed getters of [`GgufHeader`].
macro_rules! getters {
    ($( $get:ident, $as:ident, $t:ty; )*) => {
        impl GgufHeader {
            $(
                #[doc = concat!(
                    "The value of `key` if it is a `", stringify!($t), "`. Errors: `Format` ",
                    "naming the key if it is missing or of another type (no conversion; see ",
                    "[`GgufHeader::get_uint`] for sizes)."
                )]
                pub fn $get(&self, key: &str) -> Result<$t> {
                    self.typed(key, stringify!($t), GgufValue::$as)
                }
            )*
        }
    };
}

getters! {
    get_u8, as_u8, u8;
    get_i8, as_i8, i8;
    get_u16, as_u16, u16;
    get_i16, as_i16, i16;
    get_u32, as_u32, u32;
    get_i32, as_i32, i32;
    get_f32, as_f32, f32;
    get_bool, as_bool, bool;
    get_u64, as_u64, u64;
    get_i64, as_i64, i64;
    get_f64, as_f64, f64;
}

/// Generates the typed array getters of [`GgufHeader`].
macro_rules! array_getters {
    ($( $(#[$extra:meta])* $get:ident, $as:ident, $t:ty, $name:literal; )*) => {
        impl GgufHeader {
            $(
                #[doc = concat!(
                    "The elements of `key` if it is an array of ", $name, ". Errors: `Format` ",
                    "naming the key if it is missing or of another type."
                )]
                ///
                $(#[$extra])*
                pub fn $get(&self, key: &str) -> Result<&[$t]> {
                    self.typed(key, concat!("array of ", $name), |v| {
                        v.as_array().and_then(GgufArray::$as)
                    })
                }
            )*
        }
    };
}

array_getters! {
    get_u8s, as_u8s, u8, "u8";
    get_i32s, as_i32s, i32, "i32";
    get_u32s, as_u32s, u32, "u32";
    get_f32s, as_f32s, f32, "f32";
    get_u64s, as_u64s, u64, "u64";
    get_i64s, as_i64s, i64, "i64";
    /// The tokenizer's vocabulary and merges are these: `tokenizer.ggml.tokens`,
    /// `tokenizer.ggml.merges`.
    get_strings, as_strings, String, "string";
}

impl GgufHeader {
    /// Parses and validates the header of a whole file held in memory.
    ///
    /// Errors: `Format` naming the key, tensor or header and the values if the file is not a
    /// valid GGUF file (see the [module docs](self)); `Unsupported` naming the version if it is
    /// not 2 or 3.
    pub fn parse(file: &[u8]) -> Result<GgufHeader> {
        GgufHeader::parse_prefix(file, file.len() as u64)
    }

    /// Parses the header from the first bytes of a file of `file_len` bytes: `prefix` must
    /// hold the whole header (through the last tensor info); the data section need not be
    /// there, but every tensor's data must lie within `file_len`.
    pub fn parse_prefix(prefix: &[u8], file_len: u64) -> Result<GgufHeader> {
        parse_reader(&mut Reader {
            buf: prefix,
            pos: 0,
            file_len,
            ctx: Ctx::Header,
            short: false,
        })
    }

    /// Reads and validates the header of the file at `path`, reading only as much of the file
    /// as the header takes (the first 4 MiB, more if the header is longer), never its data.
    ///
    /// Errors: `Io` if the file cannot be opened or read; otherwise as [`GgufHeader::parse`],
    /// with the path in the error's `what`.
    pub fn read(path: impl AsRef<Path>) -> Result<GgufHeader> {
        let path = path.as_ref();
        let shown = path.display().to_string();
        let file = File::open(path).map_err(|e| Error::io(shown.clone(), e))?;
        let file_len = file
            .metadata()
            .map_err(|e| Error::io(shown.clone(), e))?
            .len();
        GgufHeader::read_open(&file, file_len, &shown)
    }

    /// [`GgufHeader::read`] of a file already open, of `file_len` bytes, shown as `shown`.
    pub(crate) fn read_open(file: &File, file_len: u64, shown: &str) -> Result<GgufHeader> {
        let mut want = file_len.min(FIRST_READ_BYTES);
        loop {
            // At most the file's length: allocation is bounded by the file, not by its header.
            let mut buf = vec![0u8; want as usize];
            super::read_exact_at(file, &mut buf, 0, shown, "the GGUF header")?;
            let mut r = Reader {
                buf: &buf,
                pos: 0,
                file_len,
                ctx: Ctx::Header,
                short: false,
            };
            match parse_reader(&mut r) {
                Ok(h) => return Ok(h),
                // The header is longer than what was read: read 4 times as much.
                Err(_) if r.short && want < file_len => want = file_len.min(want * 4),
                Err(Error::Format { what, detail }) => {
                    return Err(Error::Format {
                        what: format!("{shown}: {what}"),
                        detail,
                    })
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The format version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The metadata in file order.
    pub fn metadata(&self) -> &[(String, GgufValue)] {
        &self.metadata
    }

    /// The value of `key`, of whatever type.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.meta_index.get(key).map(|&i| &self.metadata[i].1)
    }

    fn typed<'a, T>(
        &'a self,
        key: &str,
        want: &str,
        as_t: impl FnOnce(&'a GgufValue) -> Option<T>,
    ) -> Result<T> {
        let v = self
            .get(key)
            .ok_or_else(|| key_err(key, "missing: the file has no such key"))?;
        as_t(v).ok_or_else(|| key_err(key, format!("has type {}, expected {want}", shown(v))))
    }

    /// The value of `key` if it is a string. Errors: `Format` naming the key if it is missing
    /// or of another type.
    pub fn get_str(&self, key: &str) -> Result<&str> {
        self.typed(key, "string", GgufValue::as_str)
    }

    /// The value of `key` if it is an array (of any element type). Errors: `Format` naming the
    /// key if it is missing or not an array.
    pub fn get_array(&self, key: &str) -> Result<&GgufArray> {
        self.typed(key, "array", GgufValue::as_array)
    }

    /// The value of `key` as a u64 if it is a non-negative integer of any type: the way to
    /// read sizes, whose integer type differs between writers (see [`GgufValue::as_uint`]).
    /// Errors: `Format` naming the key if it is missing, negative or not an integer.
    pub fn get_uint(&self, key: &str) -> Result<u64> {
        self.typed(key, "a non-negative integer", GgufValue::as_uint)
    }

    /// `general.architecture` ("llama", "qwen2", ...), which prefixes the model's own keys
    /// (`llama.block_count`, ...).
    pub fn architecture(&self) -> Result<&str> {
        self.get_str("general.architecture")
    }

    /// The tensors in file order (the order of the tensor infos).
    pub fn tensors(&self) -> &[GgufTensor] {
        &self.tensors
    }

    /// The tensor called `name`.
    pub fn tensor(&self, name: &str) -> Option<&GgufTensor> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// The alignment of tensor data: `general.alignment`, or [`DEFAULT_ALIGNMENT`].
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Bytes of the header proper: the prefix, metadata and tensor infos, without padding.
    pub fn header_len(&self) -> u64 {
        self.header_len
    }

    /// Offset of the data section in the file: the header's end rounded up to the alignment.
    /// (For a file without tensors it may lie past the end of the file.)
    pub fn data_start(&self) -> u64 {
        self.data_start
    }

    /// The file's length in bytes.
    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    /// Bytes of the file after the data section's start (0 if it starts past the end).
    pub fn data_len(&self) -> u64 {
        self.file_len.saturating_sub(self.data_start)
    }
}

/// A value's type for messages, with the value itself where it is short (a scalar).
fn shown(v: &GgufValue) -> String {
    match v {
        GgufValue::String(_) | GgufValue::Array(_) => v.describe(),
        v => format!("{} ({v})", v.value_type()),
    }
}

/// The whole parse, on a reader at the start of the file.
fn parse_reader(r: &mut Reader<'_>) -> Result<GgufHeader> {
    if r.file_len == 0 {
        return Err(r.err("the file is empty (0 bytes); a GGUF file starts with \"GGUF\""));
    }
    let magic: [u8; 4] = r.array(|| "the magic \"GGUF\"".into())?;
    if magic != MAGIC {
        return Err(r.err(format!(
            "the file starts with {magic:02x?} (\"{}\"), not the GGUF magic \"GGUF\"",
            magic.escape_ascii()
        )));
    }
    let version = r.u32(|| "the version".into())?;
    match version {
        2 | 3 => {}
        v if matches!(v.swap_bytes(), 1..=3) => {
            return Err(Error::Unsupported {
                backend: "gguf",
                what: format!(
                    "big-endian GGUF files (version {} byte-swapped, read as {v}); only \
                     little-endian files are read",
                    v.swap_bytes()
                ),
            })
        }
        v => {
            return Err(Error::Unsupported {
                backend: "gguf",
                what: format!("GGUF version {v} (versions 2 and 3 are read)"),
            })
        }
    }
    let n_tensors = r.u64(|| "the tensor count".into())?;
    let n_kvs = r.u64(|| "the key-value count".into())?;
    if n_tensors > MAX_TENSORS {
        return Err(r.err(format!(
            "the tensor count {n_tensors} exceeds the limit of {MAX_TENSORS} (MAX_TENSORS): a \
             corrupt count"
        )));
    }
    if n_kvs > MAX_KVS {
        return Err(r.err(format!(
            "the key-value count {n_kvs} exceeds the limit of {MAX_KVS} (MAX_KVS): a corrupt \
             count"
        )));
    }
    // Both counts are capped, so this cannot overflow.
    let min_bytes = n_kvs * MIN_KV_BYTES + n_tensors * MIN_TENSOR_BYTES;
    r.room(min_bytes, 1, || {
        format!("the counts of {n_kvs} key-value pairs and {n_tensors} tensor infos")
    })?;

    // Capacities are bounded by the bytes left (checked just above).
    let mut metadata = Vec::with_capacity(n_kvs as usize);
    let mut meta_index: HashMap<String, usize> = HashMap::with_capacity(n_kvs as usize);
    for index in 0..n_kvs {
        r.ctx = Ctx::Key { index, name: None };
        let key = r.string(&|| "the key".into())?;
        r.ctx = Ctx::Key {
            index,
            name: Some(key.clone()),
        };
        if let Some(&first) = meta_index.get(&key) {
            return Err(r.err(format!(
                "the key appears twice (entries #{first} and #{index}); keys must be unique"
            )));
        }
        let code = r.u32(|| "the value type".into())?;
        let Some(ty) = GgufValueType::from_code(code) else {
            return Err(r.err(format!(
                "value type code {code} is no GGUF value type (0 to 12)"
            )));
        };
        let value = r.value(ty, 0, &|| "the value".into())?;
        meta_index.insert(key.clone(), metadata.len());
        metadata.push((key, value));
    }

    let alignment = match meta_index.get(ALIGNMENT_KEY).map(|&i| &metadata[i].1) {
        None => DEFAULT_ALIGNMENT,
        Some(GgufValue::U32(a)) if a.is_power_of_two() => u64::from(*a),
        Some(GgufValue::U32(a)) => {
            return Err(key_err(
                ALIGNMENT_KEY,
                format!("the alignment {a} is not a power of two (nor 0)"),
            ))
        }
        Some(v) => {
            return Err(key_err(
                ALIGNMENT_KEY,
                format!("has type {}, expected u32", shown(v)),
            ))
        }
    };

    let mut tensors = Vec::with_capacity(n_tensors as usize);
    let mut tensor_index: HashMap<String, usize> = HashMap::with_capacity(n_tensors as usize);
    for index in 0..n_tensors {
        r.ctx = Ctx::Tensor { index, name: None };
        let name = r.string(&|| "the name".into())?;
        r.ctx = Ctx::Tensor {
            index,
            name: Some(name.clone()),
        };
        if let Some(&first) = tensor_index.get(&name) {
            return Err(r.err(format!(
                "the name appears twice (tensor infos #{first} and #{index}); names must be \
                 unique"
            )));
        }
        let n_dims = r.u32(|| "the dimension count".into())?;
        if n_dims == 0 || n_dims as usize > MAX_DIMS {
            return Err(r.err(format!(
                "{n_dims} dimensions; a ggml tensor has 1 to {MAX_DIMS} (GGML_MAX_DIMS)"
            )));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for d in 0..n_dims {
            dims.push(r.u64(|| format!("dimension {d}"))?);
        }
        let code = r.u32(|| "the ggml type".into())?;
        let Some(ggml_type) = GgmlType::from_code(code) else {
            return Err(r.err(format!(
                "ggml type code {code} is not a type this reader knows (retired, or newer \
                 than it)"
            )));
        };
        let offset = r.u64(|| "the data offset".into())?;
        let byte_len = tensor_bytes(&name, &dims, ggml_type)?;
        if !offset.is_multiple_of(alignment) {
            return Err(r.err(format!(
                "the data offset {offset} is not a multiple of the alignment {alignment}"
            )));
        }
        tensor_index.insert(name.clone(), tensors.len());
        tensors.push(GgufTensor {
            name,
            dims,
            ggml_type,
            offset,
            // Made absolute below, once the data section's start is known.
            range: 0..byte_len,
        });
    }

    let header_len = r.pos as u64;
    // header_len is at most the bytes held and alignment at most 2^31: no overflow.
    let data_start = header_len.next_multiple_of(alignment);
    let file_len = r.file_len;
    for t in &mut tensors {
        let byte_len = t.range.end;
        let start = data_start.checked_add(t.offset);
        let end = start.and_then(|s| s.checked_add(byte_len));
        match (start, end) {
            (Some(start), Some(end)) if end <= file_len => t.range = start..end,
            _ => {
                return Err(tensor_err(
                    &t.name,
                    format!(
                        "its {byte_len} bytes at data offset {offset} (file bytes {} to {}) run \
                         past the end of the {file_len}-byte file (truncated, or a corrupt \
                         offset)",
                        start.map_or("past 2^64".to_owned(), |s| s.to_string()),
                        end.map_or("past 2^64".to_owned(), |s| s.to_string()),
                        offset = t.offset,
                    ),
                ))
            }
        }
    }
    check_overlaps(&tensors)?;

    Ok(GgufHeader {
        version,
        metadata,
        meta_index,
        tensors,
        tensor_index,
        alignment,
        header_len,
        data_start,
        file_len,
    })
}

/// Validates a tensor's dimensions against its type and returns its size in bytes.
fn tensor_bytes(name: &str, dims: &[u64], ty: GgmlType) -> Result<u64> {
    if let Some(d) = dims.iter().position(|&d| d == 0) {
        return Err(tensor_err(
            name,
            format!(
                "dimension {d} of {dims:?} is 0; empty tensors are refused (no model has one, \
                 and ggml's reader cannot read one)"
            ),
        ));
    }
    let elements = dims
        .iter()
        .try_fold(1u64, |n, &d| n.checked_mul(d))
        .filter(|&n| i64::try_from(n).is_ok())
        .ok_or_else(|| {
            tensor_err(
                name,
                format!(
                    "dims {dims:?} hold more than i64::MAX elements (ggml counts elements in \
                     an int64_t)"
                ),
            )
        })?;
    let row = dims[0];
    if !row.is_multiple_of(ty.block_len()) {
        return Err(tensor_err(
            name,
            format!(
                "the row length {row} (dimension 0 of {dims:?}) is not a multiple of {ty}'s \
                 block of {} elements",
                ty.block_len()
            ),
        ));
    }
    ty.byte_len(elements).ok_or_else(|| {
        tensor_err(
            name,
            format!("{elements} elements of {ty} take more than 2^64 bytes"),
        )
    })
}

/// Refuses tensors whose data overlap (gaps are allowed; see the module docs).
fn check_overlaps(tensors: &[GgufTensor]) -> Result<()> {
    let mut order: Vec<&GgufTensor> = tensors.iter().collect();
    order.sort_by_key(|t| (t.range.start, t.range.end));
    for pair in order.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        if b.range.start < a.range.end {
            return Err(tensor_err(
                &b.name,
                format!(
                    "its data at file bytes {} to {} overlap those of tensor '{}' ({} to {})",
                    b.range.start,
                    b.range.end,
                    a.name.escape_debug(),
                    a.range.start,
                    a.range.end
                ),
            ));
        }
    }
    Ok(())
}
