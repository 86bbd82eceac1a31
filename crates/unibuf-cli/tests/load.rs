//! End-to-end tests of `unibuf load` and `unibuf bench load` on generated safetensors and GGUF
//! files.
//!
//! The tests inherit `UNIBUF_BACKEND`, so on a GPU machine they exercise that backend.

mod common;

use common::unibuf;
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use std::path::{Path, PathBuf};

/// A file removed on drop.
struct Temp(PathBuf);

impl Drop for Temp {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn temp(tag: &str) -> Temp {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    Temp(std::env::temp_dir().join(format!(
        "unibuf-cli-load-{tag}-{}-{nanos}.safetensors",
        std::process::id()
    )))
}

/// A few tensors of several dtypes with bytes from a simple generator.
fn write_file(path: &Path) -> usize {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut bytes = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    };
    let specs = [
        ("layers.0.attn.wq", Dtype::BF16, vec![33, 17]),
        ("layers.0.norm", Dtype::F32, vec![17]),
        ("layers.0.mask", Dtype::BOOL, vec![5, 3]),
        ("embed", Dtype::F16, vec![101, 7]),
        ("head.q", Dtype::I8, vec![999]),
    ];
    let data: Vec<Vec<u8>> = specs
        .iter()
        .map(|(_, d, s)| bytes(s.iter().product::<usize>() * d.bitsize() / 8))
        .collect();
    let views: Vec<(&str, TensorView<'_>)> = specs
        .iter()
        .zip(&data)
        .map(|((n, d, s), b)| (*n, TensorView::new(*d, s.clone(), b).expect("a valid view")))
        .collect();
    safetensors::serialize_to_file(views, None, path).expect("serialize");
    specs.len()
}

#[test]
fn load_verifies_every_tensor_and_reports_json() {
    let f = temp("ok");
    let n = write_file(&f.0);
    let path = f.0.to_str().expect("a UTF-8 temp path");
    for route in ["auto", "staged", "zero-copy"] {
        let o = unibuf(&["load", path, "--verify", "--json", "--route", route]);
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success(),
            "{route}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(out.contains(&format!("\"tensors\":{n}")), "{out}");
        assert_eq!(out.matches("\"ok\":true").count(), n, "{out}");
        assert!(!out.contains("\"ok\":false"), "{out}");
        assert!(out.contains("\"dtype\":\"BOOL\""), "{out}");
    }
    let o = unibuf(&["load", path, "--verify", "--only", "layers.0."]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.contains("loaded 3 tensors"), "{out}");
    assert!(out.contains("GB/s"), "{out}");
    assert!(out.contains("verified 3 tensors"), "{out}");
}

/// A GGUF v3 file written field by field (the format's own layout): one key, an F32 norm of
/// 17 values and a Q8_0 matrix of 3 rows of 64, data aligned to 32 bytes.
fn write_gguf(path: &Path) {
    let mut f = b"GGUF".to_vec();
    f.extend(3u32.to_le_bytes());
    f.extend(2u64.to_le_bytes()); // tensors
    f.extend(1u64.to_le_bytes()); // key-value pairs
    let string = |f: &mut Vec<u8>, s: &str| {
        f.extend((s.len() as u64).to_le_bytes());
        f.extend(s.as_bytes());
    };
    string(&mut f, "general.architecture");
    f.extend(8u32.to_le_bytes()); // a string value
    string(&mut f, "llama");
    let tensor = |f: &mut Vec<u8>, name: &str, dims: &[u64], ggml: u32, offset: u64| {
        string(f, name);
        f.extend((dims.len() as u32).to_le_bytes());
        dims.iter().for_each(|d| f.extend(d.to_le_bytes()));
        f.extend(ggml.to_le_bytes());
        f.extend(offset.to_le_bytes());
    };
    tensor(&mut f, "norm", &[17], 0, 0); // F32: 68 bytes
    tensor(&mut f, "w", &[64, 3], 8, 96); // Q8_0: 3 rows x 2 blocks x 34 bytes
    f.resize(f.len().next_multiple_of(32), 0);
    f.extend((0..96 + 204).map(|i| (i * 7 % 251) as u8));
    std::fs::write(path, f).expect("write the GGUF file");
}

#[test]
fn load_takes_gguf_files_and_verifies_them() {
    let f = temp("gguf");
    write_gguf(&f.0);
    let path = f.0.to_str().expect("a UTF-8 temp path");
    for route in ["staged", "zero-copy"] {
        let o = unibuf(&["load", path, "--verify", "--json", "--route", route]);
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success(),
            "{route}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(out.contains("\"tensors\":2"), "{out}");
        assert_eq!(out.matches("\"ok\":true").count(), 2, "{out}");
        assert!(out.contains("\"dtype\":\"Q8_0\""), "{out}");
    }
    let mut bytes = std::fs::read(&f.0).expect("read back");
    bytes.truncate(bytes.len() - 1);
    std::fs::write(&f.0, &bytes).expect("rewrite");
    let o = unibuf(&["load", path]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("format error") && err.contains("tensor 'w'"),
        "{err}"
    );
}

#[test]
fn bad_files_fail_with_one_error_line_naming_the_tensor() {
    let f = temp("bad");
    write_file(&f.0);
    let mut bytes = std::fs::read(&f.0).expect("read back");
    bytes.truncate(bytes.len() - 3);
    std::fs::write(&f.0, &bytes).expect("rewrite");
    let o = unibuf(&["load", f.0.to_str().expect("UTF-8")]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("error: opening the weights file: format error"),
        "{err}"
    );
    assert!(err.contains("tensor '"), "{err}");
    let o = unibuf(&["load", "/nonexistent/x.safetensors"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("I/O error"));
}

#[test]
fn bench_load_reports_the_rate_beside_the_ceiling() {
    let f = temp("bench");
    write_file(&f.0);
    let json = temp("bench-json");
    let o = unibuf(&[
        "bench",
        "load",
        f.0.to_str().expect("UTF-8"),
        "--samples",
        "1",
        "--json",
        json.0.to_str().expect("UTF-8"),
    ]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.contains("unibuf load ("), "{out}");
    assert!(out.contains("ceiling"), "{out}");
    let j = std::fs::read_to_string(&json.0).expect("the JSON file");
    assert!(
        j.contains("\"gbps\":") && j.contains("\"ceiling_gbps\":"),
        "{j}"
    );
}
