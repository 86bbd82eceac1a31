//! The safetensors header: parsing and complete validation.
//!
//! A safetensors file is an 8-byte little-endian header length `n`, `n` bytes of JSON (an
//! object mapping tensor names to `{"dtype", "shape", "data_offsets"}` plus an optional
//! `"__metadata__"` map of strings), then the data section that the offsets index.
//!
//! The format's types come from the official `safetensors` crate: its [`safetensors::Dtype`]
//! and [`safetensors::tensor::TensorInfo`] deserialize each entry, and its
//! [`safetensors::tensor::Metadata::new`] validates the final table as a cross-check. Checks
//! are otherwise written here by hand, for three reasons the crate cannot serve:
//! - its errors do not say which tensor is wrong nor with which values (`TensorInvalidInfo`,
//!   `MetadataIncompleteBuffer`), and unibuf's errors must;
//! - it deserializes the JSON object into a `HashMap`, so a name that appears twice silently
//!   keeps the last entry; the walk here sees every key and refuses duplicates;
//! - it needs the whole file as one slice, while the loader reads only the header before
//!   deciding how to move the data (and a file shorter than its header claims must be refused
//!   before anything of that size is allocated).
//!
//! Nothing here panics on any input: every length is checked before it is used, sizes are
//! computed with overflow checks, and the counts are capped ([`MAX_HEADER_BYTES`],
//! [`MAX_TENSORS`], [`MAX_RANK`]).

use crate::dtype::DType;
use crate::error::{Error, Result};
use safetensors::Dtype;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::ops::Range;

/// Bytes of the little-endian header length that starts every file.
pub const LENGTH_BYTES: u64 = 8;

/// The largest header accepted, in bytes: the limit the safetensors crate (and so the Python
/// library) applies. A length past it is a corrupt or hostile file, refused before anything of
/// that size is read or allocated.
pub const MAX_HEADER_BYTES: u64 = 100_000_000;

/// The most tensors one file may name. Real checkpoints shard at a few thousand tensors per
/// file (a 405B-parameter model has about 1,300 per shard); a million means a corrupt or
/// hostile header, and the cap bounds the work of validating it.
pub const MAX_TENSORS: usize = 1 << 20;

/// The highest tensor rank accepted (NumPy's own limit is 64 dimensions).
pub const MAX_RANK: usize = 64;

/// One tensor of a file, as its header describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct TensorInfo {
    /// The tensor's name.
    pub name: String,
    /// The dtype of the buffer it loads into: the file's dtype where unibuf has it, else
    /// [`DType::U8`] (raw bytes; see [`TensorInfo::file_dtype`]).
    pub dtype: DType,
    /// The shape of the buffer it loads into: the file's shape, except for dtypes unibuf lacks
    /// that are not one byte wide (C64, F4, F6), which load as a 1-D run of bytes.
    pub shape: Vec<usize>,
    /// The dtype as the file names it ("F32", "BF16", "BOOL", "F8_E4M3", ...).
    pub file_dtype: String,
    /// The shape as the file gives it.
    pub file_shape: Vec<usize>,
    /// The tensor's bytes as absolute offsets in the file.
    pub range: Range<u64>,
}

impl TensorInfo {
    /// Bytes of data.
    pub fn byte_len(&self) -> u64 {
        self.range.end - self.range.start
    }

    /// Whether the buffer dtype is the file's own (false: raw bytes of a dtype unibuf lacks).
    pub fn is_native(&self) -> bool {
        self.dtype.name() == self.file_dtype
    }
}

/// A parsed and validated header.
#[derive(Clone, Debug)]
pub struct Header {
    /// Sorted by offset in the file.
    tensors: Vec<TensorInfo>,
    index: HashMap<String, usize>,
    metadata: BTreeMap<String, String>,
    /// Offset of the data section in the file (8 + header length).
    data_start: u64,
    file_len: u64,
}

/// A `Format` error about the header as a whole.
fn header_err(detail: impl Into<String>) -> Error {
    Error::Format {
        what: "header".to_owned(),
        detail: detail.into(),
    }
}

/// A `Format` error about one tensor.
fn tensor_err(name: &str, detail: impl Into<String>) -> Error {
    Error::Format {
        what: format!("tensor '{}'", name.escape_debug()),
        detail: detail.into(),
    }
}

/// The unibuf dtype and shape a file dtype loads as (see [`TensorInfo::dtype`]).
fn buffer_type(d: Dtype, shape: &[usize], bytes: usize) -> (DType, Vec<usize>) {
    let native = match d {
        Dtype::U8 => Some(DType::U8),
        Dtype::I8 => Some(DType::I8),
        Dtype::I16 => Some(DType::I16),
        Dtype::U16 => Some(DType::U16),
        Dtype::F16 => Some(DType::F16),
        Dtype::BF16 => Some(DType::BF16),
        Dtype::I32 => Some(DType::I32),
        Dtype::U32 => Some(DType::U32),
        Dtype::F32 => Some(DType::F32),
        Dtype::F64 => Some(DType::F64),
        Dtype::I64 => Some(DType::I64),
        Dtype::U64 => Some(DType::U64),
        _ => None,
    };
    match native {
        Some(t) => (t, shape.to_vec()),
        // One byte per element (BOOL, the F8 family): bytes keep the shape.
        None if d.bitsize() == 8 => (DType::U8, shape.to_vec()),
        // Complex numbers and sub-byte floats: the bytes as they are.
        None => (DType::U8, vec![bytes]),
    }
}

/// The header's top-level object as it appears, every key kept in order (duplicates too). The
/// values stay raw JSON text until each is parsed on its own, so that memory stays about the
/// size of the header whatever it holds.
struct Entries(Vec<(String, Box<RawValue>)>);

impl<'de> serde::Deserialize<'de> for Entries {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Entries, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Entries;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object of tensor entries")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Entries, A::Error> {
                let mut v = Vec::new();
                while let Some((k, val)) = map.next_entry::<String, Box<RawValue>>()? {
                    // `__metadata__` is the one entry that is not a tensor.
                    if v.len() > MAX_TENSORS {
                        return Err(serde::de::Error::custom(format!(
                            "more than {MAX_TENSORS} entries (MAX_TENSORS)"
                        )));
                    }
                    v.push((k, val));
                }
                Ok(Entries(v))
            }
        }
        d.deserialize_map(V)
    }
}

impl Header {
    /// Parses and validates the header of a whole file held in memory (a test vector, a fuzz
    /// input, a small file read at once).
    ///
    /// ```
    /// use unibuf::weights::Header;
    /// let json = br#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
    /// let mut file = (json.len() as u64).to_le_bytes().to_vec();
    /// file.extend_from_slice(json);
    /// file.extend_from_slice(&[0u8; 8]);
    /// let h = Header::parse(&file)?;
    /// assert_eq!(h.tensors()[0].shape, [2]);
    /// file.pop(); // one byte short
    /// assert!(Header::parse(&file).unwrap_err().to_string().contains("tensor 'w'"));
    /// # Ok::<(), unibuf::Error>(())
    /// ```
    pub fn parse(file: &[u8]) -> Result<Header> {
        Header::parse_prefix(file, file.len() as u64)
    }

    /// Parses the header from the first bytes of a file of `file_len` bytes. `prefix` holds at
    /// least the length and the header (`8 + n` bytes) when the file is that long; the data
    /// section need not be there.
    pub(crate) fn parse_prefix(prefix: &[u8], file_len: u64) -> Result<Header> {
        let n = header_len(prefix, file_len)?;
        let end = (LENGTH_BYTES + n) as usize;
        let Some(bytes) = prefix.get(LENGTH_BYTES as usize..end) else {
            return Err(header_err(format!(
                "the header length says {n} bytes but only {} were read",
                prefix.len().saturating_sub(LENGTH_BYTES as usize)
            )));
        };
        Header::parse_json(bytes, file_len)
    }

    /// Validates the JSON header `bytes` of a file of `file_len` bytes (whose length prefix was
    /// checked by [`header_len`]).
    pub(crate) fn parse_json(bytes: &[u8], file_len: u64) -> Result<Header> {
        let n = bytes.len() as u64;
        let data_start = LENGTH_BYTES + n;
        let data_len = file_len.checked_sub(data_start).ok_or_else(|| {
            header_err(format!(
                "the header length says {n} bytes but the file has only {} after the length",
                file_len.saturating_sub(LENGTH_BYTES)
            ))
        })?;
        let text = std::str::from_utf8(bytes).map_err(|e| {
            header_err(format!(
                "the header is not valid UTF-8 (names and metadata must be): invalid byte at \
                 header offset {}",
                e.valid_up_to()
            ))
        })?;
        let Entries(entries) = serde_json::from_str(text)
            .map_err(|e| header_err(format!("the header is not a valid JSON object: {e}")))?;

        let mut seen = HashSet::with_capacity(entries.len());
        let mut metadata = BTreeMap::new();
        let mut tensors = Vec::with_capacity(entries.len());
        for (name, value) in entries {
            if !seen.insert(name.clone()) {
                return Err(tensor_err(
                    &name,
                    "the name appears twice in the header (names must be unique)",
                ));
            }
            if name == "__metadata__" {
                let value = serde_json::from_str(value.get())
                    .map_err(|e| header_err(format!("__metadata__: {e}")))?;
                metadata = parse_metadata(value)?;
                continue;
            }
            tensors.push(parse_tensor(
                name, &value, data_start, data_len, file_len, n,
            )?);
        }
        if tensors.len() > MAX_TENSORS {
            return Err(header_err(format!(
                "{} tensors exceed the limit of {MAX_TENSORS} (MAX_TENSORS)",
                tensors.len()
            )));
        }
        check_layout(&mut tensors, data_start, data_len)?;
        cross_check(&tensors, &metadata, data_start)?;
        let index = tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(Header {
            tensors,
            index,
            metadata,
            data_start,
            file_len,
        })
    }

    /// The tensors, in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The tensor called `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    /// The `__metadata__` map (empty if the file has none).
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// Offset of the data section in the file.
    pub fn data_start(&self) -> u64 {
        self.data_start
    }

    /// The file's length in bytes.
    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    /// Bytes of tensor data.
    pub fn data_len(&self) -> u64 {
        self.file_len - self.data_start
    }
}

impl Header {
    /// The safetensors-shaped view of a GGUF header, so that a GGUF file loads, streams and
    /// feeds the expert cache through the same code as a safetensors file.
    ///
    /// Plain types (F32, F16, BF16, F64, the integers) load as that dtype in the row-major
    /// shape. Block formats (Q8_0, Q4_0, Q4_1, the K-quants, ...) load as their bytes, as they
    /// are in the file: [`DType::U8`] of shape `[outer dims..., bytes per row]`, which the
    /// kernels read natively (one row of blocks per row of the matrix). `file_dtype` is the
    /// ggml type's name and `file_shape` the elements' row-major shape. Metadata values are
    /// given as text (long arrays summarised); the typed values are the GGUF header's.
    pub(crate) fn from_gguf(g: &super::gguf::GgufHeader) -> Header {
        let mut tensors: Vec<TensorInfo> = g
            .tensors()
            .iter()
            .map(|t| {
                let file_shape = t.shape();
                let (dtype, shape) = match t.dtype() {
                    Some(d) => (d, file_shape.clone()),
                    None => {
                        let ty = t.ggml_type;
                        // Validated at parse time: a whole number of blocks per row.
                        let row_bytes = t.row_len() / ty.block_len() * ty.block_bytes();
                        let mut shape = file_shape.clone();
                        if let Some(last) = shape.last_mut() {
                            *last = row_bytes as usize;
                        }
                        (DType::U8, shape)
                    }
                };
                TensorInfo {
                    name: t.name.clone(),
                    dtype,
                    shape,
                    file_dtype: t.ggml_type.name().to_owned(),
                    file_shape,
                    range: t.range.clone(),
                }
            })
            .collect();
        tensors.sort_by_key(|t| t.range.start);
        let index = tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        let metadata = g
            .metadata()
            .iter()
            // Strings as they are (no quotes), as safetensors metadata holds them.
            .map(|(k, v)| {
                (
                    k.clone(),
                    v.as_str().map_or_else(|| v.to_string(), str::to_owned),
                )
            })
            .collect();
        Header {
            tensors,
            index,
            metadata,
            data_start: g.data_start(),
            file_len: g.file_len(),
        }
    }
}

/// Reads and checks the length prefix against the file's length and the caps.
pub(crate) fn header_len(prefix: &[u8], file_len: u64) -> Result<u64> {
    if file_len == 0 {
        return Err(header_err(
            "the file is empty (0 bytes); a safetensors file starts with an 8-byte header length",
        ));
    }
    if file_len < LENGTH_BYTES {
        return Err(header_err(format!(
            "the file has {file_len} bytes, fewer than the 8-byte header length (truncated)"
        )));
    }
    let Some(len_bytes) = prefix.get(..LENGTH_BYTES as usize) else {
        return Err(header_err(format!(
            "only {} of the 8 length bytes were read",
            prefix.len()
        )));
    };
    let mut b = [0u8; 8];
    b.copy_from_slice(len_bytes);
    let n = u64::from_le_bytes(b);
    if n > MAX_HEADER_BYTES {
        return Err(header_err(format!(
            "the header length {n} bytes exceeds the limit of {MAX_HEADER_BYTES} bytes \
             (MAX_HEADER_BYTES): a corrupt length or not a safetensors file"
        )));
    }
    if n > file_len - LENGTH_BYTES {
        return Err(header_err(format!(
            "the header length says {n} bytes but the file has only {} after the length \
             (a lying length or a truncated file)",
            file_len - LENGTH_BYTES
        )));
    }
    if n < 2 {
        return Err(header_err(format!(
            "a header of {n} bytes cannot hold a JSON object"
        )));
    }
    Ok(n)
}

fn parse_metadata(value: serde_json::Value) -> Result<BTreeMap<String, String>> {
    let serde_json::Value::Object(map) = value else {
        return Err(header_err(format!(
            "__metadata__ must be an object of strings, got {}",
            json_kind(&value)
        )));
    };
    map.into_iter()
        .map(|(k, v)| match v {
            serde_json::Value::String(s) => Ok((k, s)),
            other => Err(header_err(format!(
                "__metadata__ entry '{}' must be a string, got {}",
                k.escape_debug(),
                json_kind(&other)
            ))),
        })
        .collect()
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// One tensor entry: its fields through the crate's `TensorInfo`, then every per-tensor check.
fn parse_tensor(
    name: String,
    value: &RawValue,
    data_start: u64,
    data_len: u64,
    file_len: u64,
    header_bytes: u64,
) -> Result<TensorInfo> {
    let info: safetensors::tensor::TensorInfo = serde_json::from_str(value.get())
        .map_err(|e| tensor_err(&name, format!("invalid entry: {e}")))?;
    if info.shape.len() > MAX_RANK {
        return Err(tensor_err(
            &name,
            format!(
                "rank {} exceeds the limit of {MAX_RANK} dimensions (MAX_RANK)",
                info.shape.len()
            ),
        ));
    }
    let (begin, end) = info.data_offsets;
    let (begin, end) = (begin as u64, end as u64);
    let dtype = info.dtype;
    let elements = info
        .shape
        .iter()
        .try_fold(1u64, |n, &d| n.checked_mul(d as u64))
        .ok_or_else(|| {
            tensor_err(
                &name,
                format!(
                    "shape {:?} has more elements than 64 bits can count",
                    info.shape
                ),
            )
        })?;
    let bits = elements
        .checked_mul(dtype.bitsize() as u64)
        .ok_or_else(|| {
            tensor_err(
                &name,
                format!(
                    "shape {:?} of {dtype} overflows 64 bits in size",
                    info.shape
                ),
            )
        })?;
    if bits % 8 != 0 {
        return Err(tensor_err(
            &name,
            format!(
                "{elements} elements of {dtype} ({} bits each) are {bits} bits, not whole bytes",
                dtype.bitsize()
            ),
        ));
    }
    let bytes = bits / 8;
    if begin > end {
        return Err(tensor_err(
            &name,
            format!("data_offsets [{begin}, {end}] are reversed (begin > end)"),
        ));
    }
    if end > data_len {
        return Err(tensor_err(
            &name,
            format!(
                "data_offsets [{begin}, {end}] end past the data section of {data_len} bytes \
                 (file of {file_len} bytes, header of {header_bytes}): truncated file or bad offsets"
            ),
        ));
    }
    if end - begin != bytes {
        return Err(tensor_err(
            &name,
            format!(
                "data_offsets [{begin}, {end}] hold {} bytes but shape {:?} of {dtype} needs \
                 {bytes} ({elements} elements x {} bits)",
                end - begin,
                info.shape,
                dtype.bitsize()
            ),
        ));
    }
    let Ok(byte_count) = usize::try_from(bytes) else {
        return Err(tensor_err(
            &name,
            format!("{bytes} bytes do not fit in this machine's address space"),
        ));
    };
    let (buf_dtype, buf_shape) = buffer_type(dtype, &info.shape, byte_count);
    Ok(TensorInfo {
        name,
        dtype: buf_dtype,
        shape: buf_shape,
        file_dtype: dtype.to_string(),
        file_shape: info.shape,
        range: data_start + begin..data_start + end,
    })
}

/// Sorts by offset and checks that the tensors tile the data section: no overlap, no gap, no
/// trailing bytes (the layout the format prescribes and the crate enforces).
fn check_layout(tensors: &mut [TensorInfo], data_start: u64, data_len: u64) -> Result<()> {
    tensors.sort_by(|a, b| {
        (a.range.start, a.range.end, &a.name).cmp(&(b.range.start, b.range.end, &b.name))
    });
    let mut at = data_start;
    let mut prev: Option<&TensorInfo> = None;
    for t in tensors.iter() {
        let rel = |x: u64| x - data_start;
        if t.range.start < at {
            let p = prev.map_or(String::new(), |p| {
                format!(
                    " of tensor '{}' (data_offsets [{}, {}])",
                    p.name.escape_debug(),
                    rel(p.range.start),
                    rel(p.range.end)
                )
            });
            return Err(tensor_err(
                &t.name,
                format!(
                    "data_offsets [{}, {}] overlap the bytes{p}",
                    rel(t.range.start),
                    rel(t.range.end)
                ),
            ));
        }
        if t.range.start > at {
            return Err(tensor_err(
                &t.name,
                format!(
                    "data_offsets [{}, {}] leave a gap of {} bytes after byte {} of the data \
                     section (safetensors data is contiguous)",
                    rel(t.range.start),
                    rel(t.range.end),
                    t.range.start - at,
                    rel(at)
                ),
            ));
        }
        at = t.range.end;
        prev = Some(t);
    }
    if at - data_start != data_len {
        return Err(header_err(format!(
            "the tensors cover {} bytes of a data section of {data_len}: {} bytes trailing \
             (a padded or concatenated file)",
            at - data_start,
            data_len - (at - data_start)
        )));
    }
    Ok(())
}

/// Validates the table once more with the safetensors crate's own rules. After the checks above
/// it cannot fail; if it ever does, the crate knows a rule this file does not, and the file is
/// refused rather than loaded.
fn cross_check(
    tensors: &[TensorInfo],
    metadata: &BTreeMap<String, String>,
    data_start: u64,
) -> Result<()> {
    let mut table = Vec::with_capacity(tensors.len());
    for t in tensors {
        let dtype: Dtype = serde_json::from_value(serde_json::Value::String(t.file_dtype.clone()))
            .map_err(|e| tensor_err(&t.name, format!("dtype: {e}")))?;
        table.push((
            t.name.clone(),
            safetensors::tensor::TensorInfo {
                dtype,
                shape: t.file_shape.clone(),
                data_offsets: (
                    (t.range.start - data_start) as usize,
                    (t.range.end - data_start) as usize,
                ),
            },
        ));
    }
    let meta = (!metadata.is_empty()).then(|| {
        metadata
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    });
    safetensors::tensor::Metadata::new(meta, table)
        .map(|_| ())
        .map_err(|e| header_err(format!("refused by the safetensors crate: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A file from a JSON header and `data` bytes of data.
    fn file(json: &str, data: usize) -> Vec<u8> {
        let mut f = (json.len() as u64).to_le_bytes().to_vec();
        f.extend_from_slice(json.as_bytes());
        f.extend((0..data).map(|i| i as u8));
        f
    }

    fn format_err(bytes: &[u8]) -> (String, String) {
        match Header::parse(bytes) {
            Err(Error::Format { what, detail }) => (what, detail),
            other => panic!("expected a Format error, got {other:?}"),
        }
    }

    fn assert_err(bytes: &[u8], what: &str, detail_has: &[&str]) {
        let (w, d) = format_err(bytes);
        assert_eq!(w, what, "{d}");
        for s in detail_has {
            assert!(d.contains(s), "'{d}' lacks '{s}'");
        }
    }

    #[test]
    fn a_valid_header_parses_in_file_order() {
        let j = r#"{"__metadata__":{"format":"pt"},"b":{"dtype":"BF16","shape":[3],"data_offsets":[8,14]},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"c":{"dtype":"BOOL","shape":[1,2],"data_offsets":[14,16]},"d":{"dtype":"C64","shape":[1],"data_offsets":[16,24]}}"#;
        let h = Header::parse(&file(j, 24)).unwrap();
        let names: Vec<_> = h.tensors().iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "c", "d"]);
        let start = 8 + j.len() as u64;
        assert_eq!(h.data_start(), start);
        assert_eq!(h.tensor("b").unwrap().range, start + 8..start + 14);
        assert_eq!(h.tensor("b").unwrap().dtype, DType::BF16);
        let c = h.tensor("c").unwrap();
        assert_eq!((c.dtype, c.shape.as_slice()), (DType::U8, &[1, 2][..]));
        assert_eq!(c.file_dtype, "BOOL");
        assert!(!c.is_native());
        let d = h.tensor("d").unwrap();
        assert_eq!((d.dtype, d.shape.as_slice()), (DType::U8, &[8][..]));
        assert_eq!(h.metadata().get("format").map(String::as_str), Some("pt"));
    }

    #[test]
    fn empty_and_truncated_files() {
        assert_err(&[], "header", &["empty"]);
        assert_err(&[1, 0, 0], "header", &["3 bytes", "8-byte"]);
    }

    #[test]
    fn lying_and_absurd_header_lengths() {
        let mut f = file(
            r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#,
            1,
        );
        f[..8].copy_from_slice(&1000u64.to_le_bytes());
        assert_err(&f, "header", &["1000 bytes", "lying"]);
        f[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_err(&f, "header", &["MAX_HEADER_BYTES", &u64::MAX.to_string()]);
        f[..8].copy_from_slice(&1u64.to_le_bytes());
        assert_err(&f, "header", &["1 bytes cannot hold"]);
    }

    #[test]
    fn malformed_json_and_utf8() {
        assert_err(
            &file("{\"a\": [", 0),
            "header",
            &["not a valid JSON object"],
        );
        assert_err(&file("[1, 2]", 0), "header", &["not a valid JSON object"]);
        let mut f = file(
            r#"{"x":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#,
            1,
        );
        f[10] = 0xFF; // inside the name
        assert_err(&f, "header", &["UTF-8", "offset 2"]);
    }

    #[test]
    fn duplicate_names_are_refused() {
        let j = r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#;
        assert_err(&file(j, 2), "tensor 'a'", &["twice"]);
    }

    #[test]
    fn unknown_dtype_and_bad_fields_name_the_tensor() {
        let j = r#"{"w":{"dtype":"F7","shape":[1],"data_offsets":[0,1]}}"#;
        assert_err(&file(j, 1), "tensor 'w'", &["F7"]);
        let j = r#"{"w":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}"#;
        assert_err(&file(j, 4), "tensor 'w'", &["invalid entry"]);
        let j = r#"{"w":{"dtype":"F32","shape":[1]}}"#;
        assert_err(&file(j, 4), "tensor 'w'", &["data_offsets"]);
        let j = r#"{"w":7}"#;
        assert_err(&file(j, 0), "tensor 'w'", &["invalid entry"]);
    }

    #[test]
    fn offsets_out_of_range_reversed_and_wrong_sizes() {
        let j = r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
        assert_err(
            &file(j, 7),
            "tensor 'w'",
            &["[0, 8]", "7 bytes", "truncated"],
        );
        let j = r#"{"w":{"dtype":"F32","shape":[0],"data_offsets":[4,0]}}"#;
        assert_err(&file(j, 4), "tensor 'w'", &["reversed"]);
        let j = r#"{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#;
        assert_err(&file(j, 8), "tensor 'w'", &["hold 8 bytes", "needs 12"]);
        let j = r#"{"w":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}}"#;
        assert_err(&file(j, 2), "tensor 'w'", &["12 bits", "not whole bytes"]);
    }

    #[test]
    fn overflowing_shapes_and_ranks() {
        let big = u64::MAX / 2;
        let j = format!(r#"{{"w":{{"dtype":"F32","shape":[{big},{big}],"data_offsets":[0,4]}}}}"#);
        assert_err(&file(&j, 4), "tensor 'w'", &["64 bits"]);
        let j = format!(r#"{{"w":{{"dtype":"F64","shape":[{big}],"data_offsets":[0,4]}}}}"#);
        assert_err(&file(&j, 4), "tensor 'w'", &["overflows"]);
        let dims = vec!["1"; MAX_RANK + 1].join(",");
        let j = format!(r#"{{"w":{{"dtype":"U8","shape":[{dims}],"data_offsets":[0,1]}}}}"#);
        assert_err(&file(&j, 1), "tensor 'w'", &["MAX_RANK"]);
    }

    #[test]
    fn overlaps_gaps_and_trailing_bytes() {
        let j = r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}}"#;
        assert_err(
            &file(j, 6),
            "tensor 'b'",
            &["overlap", "tensor 'a'", "[0, 4]"],
        );
        let j = r#"{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[2],"data_offsets":[4,6]}}"#;
        assert_err(&file(j, 6), "tensor 'b'", &["gap of 2 bytes"]);
        let j = r#"{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}"#;
        assert_err(&file(j, 5), "header", &["3 bytes trailing"]);
    }

    #[test]
    fn metadata_must_be_strings() {
        let j = r#"{"__metadata__":{"k":1}}"#;
        assert_err(&file(j, 0), "header", &["'k'", "a number"]);
        let j = r#"{"__metadata__":[1]}"#;
        assert_err(&file(j, 0), "header", &["an array"]);
        let h = Header::parse(&file(r#"{"__metadata__":{}}"#, 0)).unwrap();
        assert!(h.tensors().is_empty());
    }

    #[test]
    fn zero_sized_tensors_and_scalars() {
        let j = r#"{"e":{"dtype":"F32","shape":[0,3],"data_offsets":[0,0]},"s":{"dtype":"F64","shape":[],"data_offsets":[0,8]}}"#;
        let h = Header::parse(&file(j, 8)).unwrap();
        assert_eq!(h.tensor("e").unwrap().byte_len(), 0);
        assert_eq!(h.tensor("s").unwrap().shape, Vec::<usize>::new());
    }

    #[test]
    fn agrees_with_the_crate_on_its_own_files() {
        let data: Vec<u8> = (0..40).collect();
        let views = vec![
            (
                "x",
                safetensors::tensor::TensorView::new(Dtype::F32, vec![2, 3], &data[..24]).unwrap(),
            ),
            (
                "y",
                safetensors::tensor::TensorView::new(Dtype::I16, vec![8], &data[24..40]).unwrap(),
            ),
        ];
        let bytes = safetensors::serialize(views, None).unwrap();
        let h = Header::parse(&bytes).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        for t in h.tensors() {
            let v = st.tensor(&t.name).unwrap();
            let r = t.range.start as usize..t.range.end as usize;
            assert_eq!(&bytes[r], v.data());
            assert_eq!(t.file_shape, v.shape());
        }
    }

    fn valid_file() -> impl Strategy<Value = Vec<u8>> {
        let dtypes = ["U8", "F16", "BF16", "F32", "I64", "BOOL", "F8_E4M3"];
        prop::collection::vec(
            (0..dtypes.len(), prop::collection::vec(0usize..5, 0..3)),
            0..6,
        )
        .prop_map(move |ts| {
            let mut entries = Vec::new();
            let mut at = 0usize;
            for (i, (d, shape)) in ts.iter().enumerate() {
                let size = match dtypes[*d] {
                    "F16" | "BF16" => 2,
                    "F32" => 4,
                    "I64" => 8,
                    _ => 1,
                };
                let n = shape.iter().product::<usize>() * size;
                entries.push(format!(
                    r#""t{i}":{{"dtype":"{}","shape":{:?},"data_offsets":[{at},{}]}}"#,
                    dtypes[*d],
                    shape,
                    at + n
                ));
                at += n;
            }
            file(&format!("{{{}}}", entries.join(",")), at)
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Random bytes never panic the parser.
        #[test]
        fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = Header::parse(&bytes);
        }

        /// Valid files parse, and every mutation of one either parses into a table that tiles
        /// the data section or gives a Format error; nothing panics.
        #[test]
        fn mutated_headers_parse_or_fail_cleanly(
            f in valid_file(),
            edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
            cut in any::<prop::sample::Index>(),
            truncate in any::<bool>(),
        ) {
            let h = Header::parse(&f);
            prop_assert!(h.is_ok(), "{:?}", h.err());
            let mut g = f.clone();
            for (i, b) in &edits {
                let i = i.index(g.len());
                g[i] = *b;
            }
            if truncate {
                g.truncate(cut.index(g.len() + 1));
            }
            match Header::parse(&g) {
                Ok(h) => {
                    let mut at = h.data_start();
                    for t in h.tensors() {
                        prop_assert_eq!(t.range.start, at);
                        at = t.range.end;
                    }
                    prop_assert_eq!(at, g.len() as u64);
                }
                Err(Error::Format { .. }) => {}
                Err(e) => prop_assert!(false, "not a Format error: {e:?}"),
            }
        }
    }
}
