//! The matvec over GGUF block formats (Q8_0, Q4_0, Q4_1) against an f64 reference that decodes
//! the blocks here, from the ggml layout, independently of the library. The tolerance is the
//! bound of an f32 sum of `cols` products, `cols * 2^-24` of the sum of their magnitudes.

use half::f16;
use unibuf::ops::{self, GgmlMatrix, GGML_MAX_BATCH};
use unibuf::weights::gguf::GgmlType;
use unibuf::{DType, Error};
use unibuf_conformance::{device, download_f64, poisoned, upload_f64, Rng};

/// Random blocks of `ty` for `rows x cols`: scales (and Q4_1 offsets) random finite f16 in
/// about ±0.05, codes random. (Shared with the fused ops' tests.)
pub(crate) fn random_blocks(rng: &mut Rng, ty: GgmlType, rows: usize, cols: usize) -> Vec<u8> {
    let blocks = rows * cols / 32;
    let mut out = Vec::new();
    let scale = |rng: &mut Rng| f16::from_f32(rng.f32() * 0.05).to_le_bytes();
    for _ in 0..blocks {
        out.extend(scale(rng));
        match ty {
            GgmlType::Q8_0 => out.extend(rng.bytes(32)),
            GgmlType::Q4_0 => out.extend(rng.bytes(16)),
            _ => {
                out.extend(scale(rng));
                out.extend(rng.bytes(16));
            }
        }
    }
    out
}

/// The weights of the blocks, decoded from the ggml layout in f64 (independently of the
/// library). (Shared with the fused ops' tests.)
pub(crate) fn reference_weights(ty: GgmlType, bytes: &[u8], rows: usize, cols: usize) -> Vec<f64> {
    let bb = match ty {
        GgmlType::Q8_0 => 34,
        GgmlType::Q4_0 => 18,
        _ => 20,
    };
    let mut w = vec![0.0f64; rows * cols];
    for (i, blk) in bytes.chunks_exact(bb).enumerate() {
        let h = |at: usize| f64::from(f16::from_le_bytes([blk[at], blk[at + 1]]).to_f32());
        let d = h(0);
        for j in 0..32 {
            w[i * 32 + j] = match ty {
                GgmlType::Q8_0 => d * f64::from(blk[2 + j] as i8),
                GgmlType::Q4_0 => {
                    let q = blk[2 + j % 16];
                    let nib = if j < 16 { q & 15 } else { q >> 4 };
                    d * (f64::from(nib) - 8.0)
                }
                _ => {
                    let q = blk[4 + j % 16];
                    let nib = if j < 16 { q & 15 } else { q >> 4 };
                    d * f64::from(nib) + h(2)
                }
            };
        }
    }
    w
}

#[test]
fn ggml_matvec_matches_the_f64_product() {
    let dev = device();
    let q = dev.queue();
    let mut rng = Rng::new("ggml_matvec");
    for ty in [GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_1] {
        for &(rows, cols) in &[(67usize, 96usize), (5, 576), (1, 32)] {
            let bytes = random_blocks(&mut rng, ty, rows, cols);
            let want_w = reference_weights(ty, &bytes, rows, cols);
            let row_bytes = bytes.len() / rows;
            let wb = dev.from_slice("w", &bytes, &[rows, row_bytes]).unwrap();
            let m = GgmlMatrix::new(wb, ty, rows, cols).unwrap();
            // The library's own decoding agrees with the reference exactly (f16 scales, small
            // integer codes: every product is exact in f32).
            let lib_w = m.dequantize_host(&q).unwrap();
            for (a, b) in lib_w.iter().zip(&want_w) {
                assert_eq!(f64::from(*a), *b, "{ty:?} dequantize");
            }
            for batch in [1usize, 3, GGML_MAX_BATCH] {
                for xd in [DType::F32, DType::F16, DType::BF16] {
                    let xs: Vec<f64> = (0..batch * cols).map(|_| f64::from(rng.f32())).collect();
                    let shape: Vec<usize> = if batch == 1 {
                        vec![cols]
                    } else {
                        vec![batch, cols]
                    };
                    let x = upload_f64(&dev, "x", xd, &shape, &xs);
                    let xr = download_f64(&q, &x); // x as stored (rounded to its dtype)
                    let y_shape: Vec<usize> = if batch == 1 {
                        vec![rows]
                    } else {
                        vec![batch, rows]
                    };
                    let y = poisoned(&dev, DType::F32, &y_shape);
                    ops::ggml_matvec_into(&q, &m, &x, &y).unwrap();
                    let fresh = ops::ggml_matvec(&q, &m, &x).unwrap();
                    for got in [download_f64(&q, &y), download_f64(&q, &fresh)] {
                        for b in 0..batch {
                            for r in 0..rows {
                                let (mut want, mut mag) = (0.0f64, 0.0f64);
                                for c in 0..cols {
                                    let p = want_w[r * cols + c] * xr[b * cols + c];
                                    want += p;
                                    mag += p.abs();
                                }
                                let g = got[b * rows + r];
                                assert!(
                                    (g - want).abs() <= 4e-5 * mag + 1e-30,
                                    "{ty:?} {rows}x{cols} batch {batch} x {xd}: y[{b},{r}] = {g}, \
                                     want {want} (|wx| sum {mag})"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn ggml_matvec_runs_on_a_loaded_gguf_tensor_shape() {
    // A Q4_1 tensor as the loader gives it: U8 [rows, bytes per row], with its TensorInfo.
    let dev = device();
    let q = dev.queue();
    let mut rng = Rng::new("ggml_matvec_from_tensor");
    let (rows, cols) = (9usize, 64usize);
    let bytes = random_blocks(&mut rng, GgmlType::Q4_1, rows, cols);
    let buf = dev
        .from_slice("blk.0.ffn_up.weight", &bytes, &[rows, 40])
        .unwrap();
    let x = upload_f64(&dev, "x", DType::F32, &[cols], &vec![1.0; cols]);
    let m = GgmlMatrix::new(buf.clone(), GgmlType::Q4_1, rows, cols).unwrap();
    let y = q
        .download::<f32>(&ops::ggml_matvec(&q, &m, &x).unwrap())
        .unwrap();
    let w = reference_weights(GgmlType::Q4_1, &bytes, rows, cols);
    for r in 0..rows {
        let want: f64 = w[r * cols..(r + 1) * cols].iter().sum();
        assert!(
            (f64::from(y[r]) - want).abs() < 1e-4,
            "row {r}: {} vs {want}",
            y[r]
        );
    }
}

#[test]
fn ggml_matvec_refuses_bad_input() {
    let dev = device();
    let q = dev.queue();
    let w = dev.from_slice("w", &[0u8; 2 * 34], &[2, 34]).unwrap();
    let e = GgmlMatrix::new(w.clone(), GgmlType::Q4_K, 2, 32).unwrap_err();
    assert!(matches!(e, Error::Unsupported { .. }), "{e}");
    let e = GgmlMatrix::new(w.clone(), GgmlType::Q8_0, 2, 48).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument { .. }), "{e}");
    let e = GgmlMatrix::new(w.clone(), GgmlType::Q4_0, 2, 32).unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e}");
    let m = GgmlMatrix::new(w, GgmlType::Q8_0, 2, 32).unwrap();
    let bad_x = dev.from_slice("x", &[0.0f32; 31], &[31]).unwrap();
    assert!(matches!(
        ops::ggml_matvec(&q, &m, &bad_x),
        Err(Error::ShapeMismatch { .. })
    ));
    let too_many = dev.from_slice("x", &[0.0f32; 9 * 32], &[9, 32]).unwrap();
    assert!(matches!(
        ops::ggml_matvec(&q, &m, &too_many),
        Err(Error::ShapeMismatch { .. })
    ));
    let int_x = dev.from_slice("x", &[0i32; 32], &[32]).unwrap();
    assert!(matches!(
        ops::ggml_matvec(&q, &m, &int_x),
        Err(Error::InvalidArgument { .. })
    ));
    let x = dev.from_slice("x", &[0.0f32; 32], &[32]).unwrap();
    let wrong_y = dev.from_slice("y", &[0.0f32; 3], &[3]).unwrap();
    assert!(matches!(
        ops::ggml_matvec_into(&q, &m, &x, &wrong_y),
        Err(Error::ShapeMismatch { .. })
    ));
}

// ---------------------------------------------------------------------------------------------
// embedding rows

#[test]
fn embed_rows_gathers_block_and_float_tables() {
    use unibuf::ops::EmbeddingTable;
    let dev = device();
    let q = dev.queue();
    let mut rng = Rng::new("embed_rows");
    let (vocab, cols) = (37usize, 96usize);
    let ids_host: Vec<u32> = (0..11).map(|_| rng.range(0, vocab) as u32).collect();
    let ids = dev.from_slice("ids", &ids_host, &[ids_host.len()]).unwrap();
    let mut tables: Vec<(String, EmbeddingTable, Vec<f64>)> = Vec::new();
    for ty in [GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_1] {
        let bytes = random_blocks(&mut rng, ty, vocab, cols);
        let w = reference_weights(ty, &bytes, vocab, cols);
        let b = dev
            .from_slice("embed", &bytes, &[vocab, bytes.len() / vocab])
            .unwrap();
        let m = GgmlMatrix::new(b, ty, vocab, cols).unwrap();
        tables.push((format!("{ty:?}"), EmbeddingTable::blocks(&m), w));
    }
    for dt in [DType::F32, DType::F16, DType::BF16] {
        let v: Vec<f64> = (0..vocab * cols).map(|_| f64::from(rng.f32())).collect();
        let b = upload_f64(&dev, "embed", dt, &[vocab, cols], &v);
        let stored = download_f64(&q, &b);
        tables.push((format!("{dt}"), EmbeddingTable::rows(b).unwrap(), stored));
    }
    for (name, table, w) in &tables {
        assert_eq!((table.vocab(), table.cols()), (vocab, cols));
        for out_dt in [DType::F32, DType::F16, DType::BF16] {
            let out = poisoned(&dev, out_dt, &[ids_host.len(), cols]);
            ops::embed_rows_into(&q, table, &ids, &out).unwrap();
            let fresh = ops::embed_rows(&q, table, &ids, out_dt).unwrap();
            for got in [download_f64(&q, &out), download_f64(&q, &fresh)] {
                for (i, &id) in ids_host.iter().enumerate() {
                    for c in 0..cols {
                        let want = w[id as usize * cols + c];
                        // One rounding to the output dtype.
                        let tol = match out_dt {
                            DType::F32 => 1e-7,
                            DType::F16 => 1e-3,
                            _ => 8e-3,
                        } * want.abs()
                            + 1e-7;
                        let g = got[i * cols + c];
                        assert!(
                            (g - want).abs() <= tol,
                            "{name} -> {out_dt}: row {i} (id {id}) col {c}: {g} vs {want}"
                        );
                    }
                }
            }
        }
    }
    // An id past the vocabulary: a row of NaN, the others untouched.
    let bad = dev.from_slice("ids", &[1u32, vocab as u32], &[2]).unwrap();
    let (_, table, w) = &tables[0];
    let got = download_f64(&q, &ops::embed_rows(&q, table, &bad, DType::F32).unwrap());
    assert!(got[cols..].iter().all(|v| v.is_nan()));
    for c in 0..cols {
        assert!((got[c] - w[cols + c]).abs() <= 1e-7 * w[cols + c].abs() + 1e-7);
    }
}

#[test]
fn embed_rows_refuses_bad_input() {
    use unibuf::ops::EmbeddingTable;
    let dev = device();
    let q = dev.queue();
    let t = EmbeddingTable::rows(dev.from_slice("t", &[0.0f32; 6], &[3, 2]).unwrap()).unwrap();
    let e = EmbeddingTable::rows(dev.from_slice("t", &[0u8; 6], &[3, 2]).unwrap()).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument { .. }), "{e}");
    let e = EmbeddingTable::rows(dev.from_slice("t", &[0.0f32; 6], &[6]).unwrap()).unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e}");
    let i32_ids = dev.from_slice("ids", &[0i32], &[1]).unwrap();
    assert!(matches!(
        ops::embed_rows(&q, &t, &i32_ids, DType::F32),
        Err(Error::DTypeMismatch { .. })
    ));
    let ids = dev.from_slice("ids", &[0u32, 1], &[2]).unwrap();
    assert!(matches!(
        ops::embed_rows(&q, &t, &ids, DType::I32),
        Err(Error::InvalidArgument { .. })
    ));
    let wrong = dev.from_slice("out", &[0.0f32; 3], &[1, 3]).unwrap();
    assert!(matches!(
        ops::embed_rows_into(&q, &t, &ids, &wrong),
        Err(Error::ShapeMismatch { .. })
    ));
}
