//! The 4-bit quantised matvec and on-device sampling ops against f64 references computed here
//! from the host copies of their inputs (the quantiser's output is downloaded and dequantised by
//! the test itself, so the reference does not trust the op's own code).

use half::{bf16, f16};
use unibuf::ops::{self, Q4Matrix, Sampling, SAMPLE_MAX_K};
use unibuf::{Buffer, DType, Device, Error, Queue};
use unibuf_conformance::{device, poison, poison_nan, Rng};

// ---------------------------------------------------------------------------------------------
// q4 matvec

/// Dequantises packed codes and scales independently of the library.
fn dequantize(packed: &[u8], scales: &[f16], rows: usize, cols: usize, group: usize) -> Vec<f64> {
    let mut w = vec![0.0f64; rows * cols];
    for r in 0..rows {
        for c in 0..cols {
            let byte = packed[r * cols / 2 + c / 2];
            let code = if c % 2 == 0 { byte & 15 } else { byte >> 4 };
            let s = f64::from(scales[r * (cols / group) + c / group].to_f32());
            w[r * cols + c] = (f64::from(code) - 8.0) * s;
        }
    }
    w
}

/// Checks y (f32 [batch, rows]) against the f64 product, relative to sum |w x| per output.
fn check_product(y: &[f32], w: &[f64], x: &[f64], rows: usize, cols: usize, what: &str) {
    let batch = x.len() / cols;
    assert_eq!(y.len(), batch * rows, "{what}");
    for b in 0..batch {
        for r in 0..rows {
            let (mut want, mut mag) = (0.0f64, 0.0f64);
            for c in 0..cols {
                let p = w[r * cols + c] * x[b * cols + c];
                want += p;
                mag += p.abs();
            }
            let got = f64::from(y[b * rows + r]);
            assert!(
                (got - want).abs() <= 1e-4 * mag + 1e-6,
                "{what}: y[{b}, {r}] = {got}, want {want} (sum |w x| = {mag})"
            );
        }
    }
}

/// Uploads x as f32 or f16 and returns it with its exact values.
fn upload_x(dev: &Device, rng: &mut Rng, dtype: DType, shape: &[usize]) -> (Buffer, Vec<f64>) {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.f32() * 2.0).collect();
    match dtype {
        DType::F16 => {
            let h: Vec<f16> = v.iter().map(|&f| f16::from_f32(f)).collect();
            let exact = h.iter().map(|h| f64::from(h.to_f32())).collect();
            (dev.from_slice("x", &h, shape).expect("x"), exact)
        }
        _ => {
            let exact = v.iter().map(|&f| f64::from(f)).collect();
            (dev.from_slice("x", &v, shape).expect("x"), exact)
        }
    }
}

/// A check of a product: (y, dequantised w, exact x, rows, cols, what).
type ProductCheck = fn(&[f32], &[f64], &[f64], usize, usize, &str);

/// Every group size, rows 1, 7 and 33, a one-group and a wide row (more than 256 threads'
/// worth of 32-code chunks for 7 rows, so the CUDA kernels' widest row groups and the second
/// pass of their chunk loops run too), each batch in `batches` and x f32 and f16: quantises
/// fresh random weights, uploads fresh x, poisons y, runs `product(m, x, y)` and hands the
/// result to `check(y, dequantised w, exact x, rows, cols, what)`.
fn sweep_q4_products(
    stream: &str,
    batches: &[usize],
    mut product: impl FnMut(&Queue, &Q4Matrix, &Buffer, &Buffer, &str),
    check: ProductCheck,
) {
    let dev = device();
    let q = dev.queue();
    let mut rng = Rng::new(stream);
    for group in [32, 64, 128] {
        for rows in [1, 7, 33] {
            let wide = if rows == 7 {
                16384 + group
            } else {
                4096 + group
            };
            for cols in [group, wide] {
                let w: Vec<f32> = (0..rows * cols).map(|_| rng.f32()).collect();
                let m = Q4Matrix::quantize(&dev, "w", &w, rows, cols, group).expect("quantize");
                let packed = q.download::<u8>(m.packed()).expect("packed");
                let scales = q.download::<f16>(m.scales()).expect("scales");
                let wq = dequantize(&packed, &scales, rows, cols, group);
                for &batch in batches {
                    for xd in [DType::F32, DType::F16] {
                        let what =
                            format!("{stream}: {rows}x{cols} group {group} batch {batch} x {xd}");
                        let shape = if batch == 1 && xd == DType::F32 {
                            vec![cols]
                        } else {
                            vec![batch, cols]
                        };
                        let (x, xv) = upload_x(&dev, &mut rng, xd, &shape);
                        let y_shape = if shape.len() == 1 {
                            vec![rows]
                        } else {
                            vec![batch, rows]
                        };
                        let y = dev
                            .alloc(DType::F32, &y_shape, unibuf::StorageMode::Auto)
                            .expect("y");
                        poison_nan(&dev, &y);
                        product(&q, &m, &x, &y, &what);
                        let got = q.download::<f32>(&y).expect("y");
                        check(&got, &wq, &xv, rows, cols, &what);
                    }
                }
            }
        }
    }
}

#[test]
fn q4_matvec_matches_an_f64_reference() {
    sweep_q4_products(
        "q4_matvec",
        &[1, 3],
        |q, m, x, y, what| {
            ops::q4_matvec_into(q, m, x, y).expect(what);
        },
        check_product,
    );
}

/// A q4 product over a matrix whose codes and scales start one element into larger buffers
/// (not 16-byte aligned) and over x views at odd offsets, in f32 and f16.
fn sweep_unaligned_views(
    stream: &str,
    product: impl Fn(&Queue, &Q4Matrix, &Buffer) -> Buffer,
    check: ProductCheck,
) {
    let dev = device();
    let q = dev.queue();
    let mut rng = Rng::new(stream);
    let (rows, cols, group) = (9, 192, 64);
    let w: Vec<f32> = (0..rows * cols).map(|_| rng.f32()).collect();
    let m = Q4Matrix::quantize(&dev, "w", &w, rows, cols, group).expect("quantize");
    let packed = q.download::<u8>(m.packed()).expect("packed");
    let scales = q.download::<f16>(m.scales()).expect("scales");
    let wq = dequantize(&packed, &scales, rows, cols, group);
    // The same codes and scales one element into larger buffers: not 16-byte aligned.
    let mut p1 = vec![0x5Au8];
    p1.extend_from_slice(&packed);
    let mut s1 = vec![f16::from_f32(3.0)];
    s1.extend_from_slice(&scales);
    let pb = dev.from_slice("packed+1", &p1, &[p1.len()]).expect("p");
    let sb = dev.from_slice("scales+1", &s1, &[s1.len()]).expect("s");
    let pv = pb
        .slice(1..p1.len())
        .unwrap()
        .reshape(&[rows, cols / 2])
        .unwrap();
    let sv = sb
        .slice(1..s1.len())
        .unwrap()
        .reshape(&[rows, cols / group])
        .unwrap();
    let m2 = Q4Matrix::from_parts(pv, sv, rows, cols, group).expect("from_parts");
    for xd in [DType::F32, DType::F16] {
        let (xb, xv) = upload_x(&dev, &mut rng, xd, &[2 * cols + 1]);
        let x = xb
            .slice(1..2 * cols + 1)
            .unwrap()
            .reshape(&[2, cols])
            .unwrap();
        let y = product(&q, &m2, &x);
        assert_eq!(y.shape(), &[2, rows]);
        let got = q.download::<f32>(&y).expect("y");
        check(
            &got,
            &wq,
            &xv[1..],
            rows,
            cols,
            &format!("{stream}, x {xd}"),
        );
    }
}

#[test]
fn q4_matvec_takes_views_at_unaligned_offsets() {
    sweep_unaligned_views(
        "q4_views",
        |q, m, x| ops::q4_matvec(q, m, x).expect("q4_matvec"),
        check_product,
    );
}

#[test]
fn q4_quantizer_follows_its_definition() {
    let dev = device();
    let q = dev.queue();
    let mut rng = Rng::new("q4_quantize");
    let (rows, cols, group) = (3, 128, 32);
    let mut w: Vec<f32> = (0..rows * cols).map(|_| rng.f32() * 3.0).collect();
    w[..group].fill(0.0); // an all-zero group
    let m = Q4Matrix::quantize(&dev, "w", &w, rows, cols, group).expect("quantize");
    assert_eq!((m.rows(), m.cols(), m.group()), (rows, cols, group));
    assert_eq!(m.weight_bytes(), rows * cols / 2 + rows * cols / group * 2);
    let scales = q.download::<f16>(m.scales()).expect("scales");
    let deq = m.dequantize_host(&q).expect("dequantize");
    for (g, chunk) in w.chunks(group).enumerate() {
        let max = chunk.iter().fold(0.0f32, |a, v| a.max(v.abs()));
        assert_eq!(scales[g], f16::from_f32(max / 7.0), "group {g}");
        let s = scales[g].to_f32();
        for (i, &v) in chunk.iter().enumerate() {
            let d = deq[g * group + i];
            assert!(
                (d - v).abs() <= s * 0.5 + s * 1e-3 + 1e-7,
                "w {v} -> {d} (scale {s})"
            );
        }
    }
    assert!(deq[..group].iter().all(|&d| d == 0.0));
}

fn expect_invalid<T: std::fmt::Debug>(r: Result<T, Error>, needle: &str) {
    match r {
        Err(Error::InvalidArgument { detail, what }) => assert!(
            detail.contains(needle) || what.contains(needle),
            "{what}: {detail} lacks '{needle}'"
        ),
        other => panic!("expected InvalidArgument ({needle}), got {other:?}"),
    }
}

#[test]
fn q4_rejects_bad_inputs() {
    let dev = device();
    let q = dev.queue();
    let w = vec![0.25f32; 2 * 64];
    expect_invalid(Q4Matrix::quantize(&dev, "w", &w, 2, 64, 48), "48");
    expect_invalid(Q4Matrix::quantize(&dev, "w", &w, 1, 128, 256), "256");
    expect_invalid(Q4Matrix::quantize(&dev, "w", &w[..96], 1, 96, 64), "96");
    assert!(matches!(
        Q4Matrix::quantize(&dev, "w", &w, 2, 32, 32),
        Err(Error::ShapeMismatch { .. })
    ));
    let mut bad = w.clone();
    bad[5] = f32::NAN;
    expect_invalid(Q4Matrix::quantize(&dev, "w", &bad, 2, 64, 32), "finite");
    bad[5] = 1e6;
    expect_invalid(Q4Matrix::quantize(&dev, "w", &bad, 2, 64, 32), "f16");

    let m = Q4Matrix::quantize(&dev, "w", &w, 2, 64, 32).expect("quantize");
    // from_parts: dtypes and shapes.
    let as_u16 = m.packed().cast(DType::U16).unwrap();
    assert!(matches!(
        Q4Matrix::from_parts(as_u16, m.scales().clone(), 2, 64, 32),
        Err(Error::DTypeMismatch {
            expected: DType::U8,
            got: DType::U16,
            ..
        })
    ));
    assert!(matches!(
        Q4Matrix::from_parts(m.packed().clone(), m.scales().clone(), 2, 64, 64),
        Err(Error::ShapeMismatch { .. })
    ));
    let f32_scales = dev.from_slice("s", &[1.0f32; 4], &[2, 2]).unwrap();
    assert!(matches!(
        Q4Matrix::from_parts(m.packed().clone(), f32_scales, 2, 64, 32),
        Err(Error::DTypeMismatch {
            expected: DType::F16,
            ..
        })
    ));
    // x: length, batch, dtype; y: shape, dtype.
    let x_short = dev.from_slice("x", &[1.0f32; 63], &[63]).unwrap();
    assert!(matches!(
        ops::q4_matvec(&q, &m, &x_short),
        Err(Error::ShapeMismatch { .. })
    ));
    let x9 = dev.from_slice("x", &[1.0f32; 9 * 64], &[9, 64]).unwrap();
    expect_invalid(ops::q4_matvec(&q, &m, &x9), "batch of 9");
    let x_bf = dev.from_slice("x", &[bf16::ONE; 64], &[64]).unwrap();
    expect_invalid(ops::q4_matvec(&q, &m, &x_bf), "f32 or f16");
    let x = dev.from_slice("x", &[1.0f32; 64], &[64]).unwrap();
    let y_bad = dev.from_slice("y", &[0.0f32; 3], &[3]).unwrap();
    assert!(matches!(
        ops::q4_matvec_into(&q, &m, &x, &y_bad),
        Err(Error::ShapeMismatch { .. })
    ));
    let y_f16 = dev.from_slice("y", &[f16::ZERO; 2], &[2]).unwrap();
    assert!(matches!(
        ops::q4_matvec_into(&q, &m, &x, &y_f16),
        Err(Error::DTypeMismatch {
            expected: DType::F32,
            ..
        })
    ));
    // Nothing above reached the device.
    q.drain().expect("no fault");
}

// ---------------------------------------------------------------------------------------------
// q4 matvec on int8 activations

/// Checks y (f32 [batch, rows]) of the integer path against the f64 product with the
/// *unquantised* x: each activation is within d_k / 2 of x (d_k = max |x| of its 32-block / 127,
/// recomputed here), so |y - ref| <= sum_k d_k / 2 * sum_{i in k} |w_ri| (times 1.001 for the f32
/// rounding of d), plus f32 rounding of the sums (1e-5 of sum |w x|).
fn check_q8_product(y: &[f32], w: &[f64], x: &[f64], rows: usize, cols: usize, what: &str) {
    let batch = x.len() / cols;
    assert_eq!(y.len(), batch * rows, "{what}");
    for b in 0..batch {
        let xr = &x[b * cols..(b + 1) * cols];
        let d: Vec<f64> = xr
            .chunks(32)
            .map(|blk| blk.iter().fold(0.0f64, |a, v| a.max(v.abs())) / 127.0)
            .collect();
        for r in 0..rows {
            let wr = &w[r * cols..(r + 1) * cols];
            let (mut want, mut mag, mut quant) = (0.0f64, 0.0f64, 0.0f64);
            for (c, (&wv, &xv)) in wr.iter().zip(xr).enumerate() {
                want += wv * xv;
                mag += (wv * xv).abs();
                quant += d[c / 32] / 2.0 * wv.abs();
            }
            let got = f64::from(y[b * rows + r]);
            let bound = quant * 1.001 + 1e-5 * mag + 1e-6;
            assert!(
                (got - want).abs() <= bound,
                "{what}: y[{b}, {r}] = {got}, want {want} (bound {bound}, sum |w x| = {mag})"
            );
        }
    }
}

#[test]
fn q4_matvec_q8_is_within_the_quantisation_bound() {
    sweep_q4_products(
        "q4_matvec_q8",
        &[1, 3, 8],
        |q, m, x, y, what| {
            let xq = ops::quantize_activations(q, x).expect(what);
            ops::q4_matvec_q8_into(q, m, &xq, y).expect(what);
        },
        check_q8_product,
    );
}

#[test]
fn q4_matvec_q8_takes_views_at_unaligned_offsets() {
    sweep_unaligned_views(
        "q4_q8_views",
        |q, m, x| {
            let xq = ops::quantize_activations(q, x).expect("quantize_activations");
            ops::q4_matvec_q8(q, m, &xq).expect("q4_matvec_q8")
        },
        check_q8_product,
    );
}

/// Activations as stored (each block in the product order documented at `Q8Activations`:
/// within each group of 8 values, the 4 even-numbered at bytes 4j.., the 4 odd-numbered 16
/// bytes on) back in plain order, by the test's own reading of that definition.
fn plain_order(stored: &[i8]) -> Vec<i8> {
    let mut plain = vec![0i8; stored.len()];
    for (block, out) in stored.chunks(32).zip(plain.chunks_mut(32)) {
        for j in 0..4 {
            for r in 0..4 {
                out[8 * j + 2 * r] = block[4 * j + r];
                out[8 * j + 2 * r + 1] = block[16 + 4 * j + r];
            }
        }
    }
    plain
}

#[test]
fn q8_quantisation_follows_its_definition() {
    let dev = device();
    let q = dev.queue();
    let mut rng = Rng::new("q8_quantize");
    let (batch, cols) = (3, 128);
    let (mut checked, mut ties) = (0usize, 0usize);
    for xd in [DType::F32, DType::F16] {
        let mut x: Vec<f32> = (0..batch * cols).map(|_| rng.f32() * 3.0).collect();
        x[32..64].fill(0.0); // row 0, block 1: all zero
        x[cols + 64..cols + 96].fill(0.0); // row 1, block 2: one nonzero value
        x[cols + 70] = -0.8125;
        // Row 2, block 0: max |x| = 127, so d = 1 exactly and the halves are exact ties.
        let ties_at = 2 * cols;
        let exact = [
            127.0f32, 2.5, -2.5, 0.5, -0.5, 1.5, -1.5, 126.5, -126.5, 3.0,
        ];
        x[ties_at..ties_at + 32].fill(0.0);
        x[ties_at..ties_at + exact.len()].copy_from_slice(&exact);
        let (xb, xv): (Buffer, Vec<f32>) = match xd {
            DType::F16 => {
                let h: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
                let v = h.iter().map(|h| h.to_f32()).collect();
                (dev.from_slice("x", &h, &[batch, cols]).unwrap(), v)
            }
            _ => (dev.from_slice("x", &x, &[batch, cols]).unwrap(), x.clone()),
        };
        let xq = ops::quantize_activations(&q, &xb).expect("quantize_activations");
        assert_eq!((xq.batch(), xq.cols()), (batch, cols));
        assert_eq!(xq.x_shape(), &[batch, cols]);
        assert_eq!(
            (xq.values().dtype(), xq.values().shape()),
            (DType::I8, &[batch, cols][..])
        );
        assert_eq!(
            (xq.scales().dtype(), xq.scales().shape()),
            (DType::F32, &[batch, cols / 32][..])
        );
        assert_eq!(
            (xq.sums().dtype(), xq.sums().shape()),
            (DType::I32, &[batch, cols / 32][..])
        );
        let stored = q.download::<i8>(xq.values()).expect("values");
        let values = plain_order(&stored);
        let scales = q.download::<f32>(xq.scales()).expect("scales");
        let sums = q.download::<i32>(xq.sums()).expect("sums");
        for (k, blk) in values.chunks(32).enumerate() {
            let want: i32 = blk.iter().map(|&v| i32::from(v)).sum();
            assert_eq!(sums[k], want, "x {xd}, block {k}: the stored sum");
        }
        for (k, blk) in xv.chunks(32).enumerate() {
            let what = format!("x {xd}, block {k}");
            let amax = blk.iter().fold(0.0f64, |a, &v| a.max(f64::from(v).abs()));
            let d_ref = amax / 127.0;
            let d = scales[k];
            let got = &values[32 * k..32 * (k + 1)];
            if k == ties_at / 32 {
                continue; // the deliberate ties, checked exactly below
            }
            if amax == 0.0 {
                assert_eq!(d, 0.0, "{what}");
                assert!(got.iter().all(|&v| v == 0), "{what}: {got:?}");
                continue;
            }
            let near = d_ref as f32;
            let ulp = f64::from(f32::from_bits(near.to_bits() + 1)) - f64::from(near);
            assert!(
                (f64::from(d) - d_ref).abs() <= ulp,
                "{what}: scale {d}, want {d_ref}"
            );
            for (i, (&v, &g)) in blk.iter().zip(got).enumerate() {
                let t = f64::from(v) / f64::from(d);
                if (t.abs().fract() - 0.5).abs() < 1e-5 {
                    ties += 1;
                    continue;
                }
                let want = t.round().clamp(-127.0, 127.0) as i8;
                assert_eq!(g, want, "{what}, value {i}: x = {v}, x / d = {t}");
                checked += 1;
            }
        }
        // The single nonzero value is the block's maximum: exactly -127, the rest 0.
        let single = &values[cols + 64..cols + 96];
        assert!(
            single
                .iter()
                .enumerate()
                .all(|(i, &v)| v == if i == 6 { -127 } else { 0 }),
            "x {xd}: {single:?}"
        );
        // Exact ties round half away from zero (to nearest even would give 2, -2, 0, 0, ...).
        assert_eq!(scales[ties_at / 32], 1.0, "x {xd}");
        assert_eq!(
            &values[ties_at..ties_at + exact.len()],
            &[127, 3, -3, 1, -1, 2, -2, 127, -127, 3],
            "x {xd}"
        );
        // Into existing activations: the same result.
        let again = ops::Q8Activations::alloc(&dev, "xq", &[batch, cols]).expect("alloc");
        poison(&dev, again.values());
        poison(&dev, again.scales());
        poison(&dev, again.sums());
        ops::quantize_activations_into(&q, &xb, &again).expect("into");
        assert_eq!(q.download::<i8>(again.values()).unwrap(), stored);
        assert_eq!(q.download::<f32>(again.scales()).unwrap(), scales);
        assert_eq!(q.download::<i32>(again.sums()).unwrap(), sums);
    }
    // Random values land within 1e-5 of a tie rarely: the check above must have compared
    // nearly all of them.
    assert!(checked > 40 * ties.max(1), "{checked} checked, {ties} ties");
    // A vector x: batch 1, and a product of shape [rows].
    let xb = dev.from_slice("x", &[0.5f32; 64], &[64]).unwrap();
    let xq = ops::quantize_activations(&q, &xb).expect("vector");
    assert_eq!(
        (xq.batch(), xq.cols(), xq.x_shape()),
        (1, 64, &[64usize][..])
    );
    let m = Q4Matrix::quantize(&dev, "w", &[0.25f32; 3 * 64], 3, 64, 32).expect("quantize");
    assert_eq!(ops::q4_matvec_q8(&q, &m, &xq).unwrap().shape(), &[3]);
}

#[test]
fn q8_rejects_bad_inputs() {
    let dev = device();
    let q = dev.queue();
    // Quantisation: cols, batch, dtype, rank, and the target's shape.
    let x40 = dev.from_slice("x", &[1.0f32; 40], &[40]).unwrap();
    expect_invalid(ops::quantize_activations(&q, &x40), "multiple of 32");
    let x0 = dev.from_slice::<f32>("x", &[], &[0, 32]).unwrap();
    expect_invalid(ops::quantize_activations(&q, &x0), "batch of 0");
    let x_bf = dev.from_slice("x", &[bf16::ONE; 64], &[64]).unwrap();
    expect_invalid(ops::quantize_activations(&q, &x_bf), "f32 or f16");
    let cube = dev.from_slice("x", &[1.0f32; 128], &[2, 2, 32]).unwrap();
    assert!(matches!(
        ops::quantize_activations(&q, &cube),
        Err(Error::ShapeMismatch { .. })
    ));
    expect_invalid(ops::Q8Activations::alloc(&dev, "xq", &[2, 33]), "33");
    let xq2 = ops::Q8Activations::alloc(&dev, "xq", &[2, 64]).unwrap();
    let x64 = dev.from_slice("x", &[1.0f32; 64], &[64]).unwrap();
    assert!(matches!(
        ops::quantize_activations_into(&q, &x64, &xq2),
        Err(Error::ShapeMismatch { .. })
    ));

    // The matvec: the activations' columns, batch and device; y's shape and dtype.
    let m = Q4Matrix::quantize(&dev, "w", &[0.25f32; 2 * 64], 2, 64, 32).expect("quantize");
    let x96 = dev.from_slice("x", &[1.0f32; 96], &[96]).unwrap();
    let xq96 = ops::quantize_activations(&q, &x96).unwrap();
    assert!(matches!(
        ops::q4_matvec_q8(&q, &m, &xq96),
        Err(Error::ShapeMismatch { .. })
    ));
    let x9 = dev.from_slice("x", &[1.0f32; 9 * 64], &[9, 64]).unwrap();
    let xq9 = ops::quantize_activations(&q, &x9).expect("any batch quantises");
    expect_invalid(ops::q4_matvec_q8(&q, &m, &xq9), "batch of 9");
    let xq = ops::quantize_activations(&q, &x64).unwrap();
    let y_bad = dev.from_slice("y", &[0.0f32; 3], &[3]).unwrap();
    assert!(matches!(
        ops::q4_matvec_q8_into(&q, &m, &xq, &y_bad),
        Err(Error::ShapeMismatch { .. })
    ));
    let y_batch = dev.from_slice("y", &[0.0f32; 2], &[1, 2]).unwrap();
    assert!(matches!(
        ops::q4_matvec_q8_into(&q, &m, &xq, &y_batch),
        Err(Error::ShapeMismatch { .. })
    ));
    let y_f16 = dev.from_slice("y", &[f16::ZERO; 2], &[2]).unwrap();
    assert!(matches!(
        ops::q4_matvec_q8_into(&q, &m, &xq, &y_f16),
        Err(Error::DTypeMismatch {
            expected: DType::F32,
            ..
        })
    ));
    let other = device();
    let x_other = other.from_slice("x", &[1.0f32; 64], &[64]).unwrap();
    let xq_other = ops::quantize_activations(&other.queue(), &x_other).unwrap();
    assert!(matches!(
        ops::q4_matvec_q8(&q, &m, &xq_other),
        Err(Error::WrongDevice { .. })
    ));
    // Nothing refused above reached a device.
    q.drain().expect("no fault");
    other.queue().drain().expect("no fault");
}

// ---------------------------------------------------------------------------------------------
// sampling

/// The exact algorithm in f64 for one row: `Some(token)`, or `None` when a decision lies within
/// 1e-5 (relative to the mass) of a boundary, where f32 sums on a device may go either way.
fn reference(row: &[f32], s: &Sampling, u: f32) -> Option<u32> {
    let mut order: Vec<usize> = (0..row.len()).collect();
    // Distinct or not, equal logits go to the lower id.
    let by = |a: &usize, b: &usize| row[*b].total_cmp(&row[*a]).then(a.cmp(b));
    let k = s.candidates(row.len());
    if s.temperature == 0.0 || k == 1 {
        return order.iter().copied().min_by(by).map(|i| i as u32);
    }
    if k < order.len() {
        order.select_nth_unstable_by(k - 1, by);
        order.truncate(k);
    }
    order.sort_unstable_by(by);
    let v0 = f64::from(row[order[0]]);
    let mut cum = Vec::with_capacity(k);
    let mut acc = 0.0f64;
    for &i in &order {
        acc += ((f64::from(row[i]) - v0) / f64::from(s.temperature)).exp();
        cum.push(acc);
    }
    let tol = 1e-5 * acc;
    let cut = f64::from(s.top_p) * acc;
    if cum.iter().any(|&c| (c - cut).abs() < tol) && s.top_p < 1.0 {
        return None;
    }
    let n = cum.iter().position(|&c| c >= cut).unwrap_or(k - 1) + 1;
    let thr = f64::from(u) * cum[n - 1];
    if cum[..n].iter().any(|&c| (c - thr).abs() < tol) {
        return None;
    }
    let pick = cum[..n].iter().position(|&c| c > thr).unwrap_or(n - 1);
    Some(order[pick] as u32)
}

/// `rows x vocab` distinct logits: a random permutation of an evenly spaced range of random
/// width, so that the softmax is neither flat nor one-hot.
fn distinct_logits(rng: &mut Rng, rows: usize, vocab: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows * vocab);
    for _ in 0..rows {
        let width = 2.0 + 10.0 * (rng.f32() + 1.0);
        let mut ids: Vec<usize> = (0..vocab).collect();
        for i in (1..vocab).rev() {
            ids.swap(i, rng.range(0, i + 1));
        }
        let offset = rng.f32() * 3.0;
        out.extend(
            ids.iter()
                .map(|&i| offset + width * (i as f32 / vocab as f32 - 0.5)),
        );
    }
    out
}

fn sample_once(q: &Queue, logits: &Buffer, s: &Sampling, step: u64, rows: usize) -> Vec<u32> {
    let dev = q.device();
    let out = dev
        .alloc(DType::U32, &[rows], unibuf::StorageMode::Auto)
        .expect("out");
    poison(&dev, &out);
    ops::sample_into(q, logits, s, step, &out).expect("sample");
    q.download::<u32>(&out).expect("tokens")
}

#[test]
fn sampling_matches_the_exact_algorithm() {
    let dev = device();
    let q = dev.queue();
    let mut rng = Rng::new("sample_reference");
    let rows = 3;
    let (mut checked, mut skipped) = (0usize, 0usize);
    for vocab in [1usize, 7, 4097, 65536] {
        let host = distinct_logits(&mut rng, rows, vocab);
        let logits = dev
            .from_slice("logits", &host, &[rows, vocab])
            .expect("logits");
        for top_k in [1u32, 5, 50, 0] {
            for top_p in [1.0f32, 0.9, 0.5] {
                for temperature in [0.0f32, 0.7, 1.3] {
                    let steps: &[u64] = if vocab > 5000 { &[3] } else { &[0, 11] };
                    for &step in steps {
                        let s = Sampling {
                            temperature,
                            top_k,
                            top_p,
                            seed: rng.next_u64(),
                        };
                        let got = sample_once(&q, &logits, &s, step, rows);
                        for (r, &g) in got.iter().enumerate() {
                            let row = &host[r * vocab..(r + 1) * vocab];
                            match reference(row, &s, s.uniform(step, r as u64)) {
                                Some(want) => {
                                    checked += 1;
                                    assert_eq!(g, want, "vocab {vocab} row {r} {s:?} step {step}");
                                }
                                None => skipped += 1,
                            }
                        }
                    }
                }
            }
        }
    }
    eprintln!("checked {checked} draws, skipped {skipped} near a boundary");
    assert!(
        checked >= 20 * skipped.max(1),
        "{checked} checked, {skipped} skipped"
    );
}

#[test]
fn greedy_and_top_1_are_the_argmax_for_every_dtype() {
    let dev = device();
    let q = dev.queue();
    let mut rng = Rng::new("sample_greedy");
    let (rows, vocab) = (4, 3001);
    let host: Vec<f32> = (0..rows * vocab).map(|_| rng.f32() * 8.0).collect();
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let (logits, widened): (Buffer, Vec<f32>) = match dtype {
            DType::F16 => {
                let h: Vec<f16> = host.iter().map(|&v| f16::from_f32(v)).collect();
                let w = h.iter().map(|v| v.to_f32()).collect();
                (dev.from_slice("l", &h, &[rows, vocab]).unwrap(), w)
            }
            DType::BF16 => {
                let h: Vec<bf16> = host.iter().map(|&v| bf16::from_f32(v)).collect();
                let w = h.iter().map(|v| v.to_f32()).collect();
                (dev.from_slice("l", &h, &[rows, vocab]).unwrap(), w)
            }
            _ => (
                dev.from_slice("l", &host, &[rows, vocab]).unwrap(),
                host.clone(),
            ),
        };
        let argmax: Vec<u32> = widened
            .chunks(vocab)
            .map(|row| {
                let mut best = 0;
                for (i, &v) in row.iter().enumerate() {
                    if v > row[best] {
                        best = i;
                    }
                }
                best as u32
            })
            .collect();
        let greedy = sample_once(&q, &logits, &Sampling::greedy(), 5, rows);
        assert_eq!(greedy, argmax, "greedy, {dtype}");
        let top1 = Sampling {
            temperature: 1.3,
            top_k: 1,
            top_p: 0.7,
            seed: 9,
        };
        assert_eq!(
            sample_once(&q, &logits, &top1, 5, rows),
            argmax,
            "top_k 1, {dtype}"
        );
        // Sampled draws of the f16/bf16 logits follow the reference over the widened values.
        let s = Sampling {
            temperature: 0.9,
            top_k: 40,
            top_p: 0.95,
            seed: 77,
        };
        let got = sample_once(&q, &logits, &s, 8, rows);
        let mut checked = 0;
        for (r, &g) in got.iter().enumerate() {
            let row = &widened[r * vocab..(r + 1) * vocab];
            if let Some(want) = reference(row, &s, s.uniform(8, r as u64)) {
                assert_eq!(g, want, "{dtype} row {r}");
                checked += 1;
            }
        }
        assert!(
            checked > 0,
            "{dtype}: every draw fell on a boundary; nothing was checked"
        );
    }
}

#[test]
fn sampling_orders_ties_by_id_and_never_picks_masked_tokens() {
    let dev = device();
    let q = dev.queue();
    // All equal: greedy and top-1 take token 0; top-2 takes 0 or 1 per the reference.
    let flat = dev.from_slice("flat", &[0.5f32; 2000], &[2000]).unwrap();
    assert_eq!(sample_once(&q, &flat, &Sampling::greedy(), 0, 1), [0]);
    for step in 0..20 {
        let s = Sampling {
            temperature: 1.0,
            top_k: 2,
            top_p: 1.0,
            seed: 3,
        };
        let got = sample_once(&q, &flat, &s, step, 1);
        let u = s.uniform(step, 0);
        if (u - 0.5).abs() > 1e-4 {
            assert_eq!(got, [u32::from(u >= 0.5)], "step {step}, u {u}");
        }
    }
    // Ties straddling the cut: 1500 equal values, k = 1024 of them (the lowest ids).
    let s = Sampling {
        temperature: 1.0,
        top_k: 0,
        top_p: 1.0,
        seed: 1,
    };
    for step in 0..8 {
        let t = sample_once(&q, &flat, &s, step, 1)[0];
        assert!(
            t < SAMPLE_MAX_K,
            "token {t} is not among the 1024 lowest ids"
        );
    }
    // -inf (and NaN) logits are never drawn while a finite one exists.
    let mut masked = vec![f32::NEG_INFINITY; 64];
    masked[10] = 1.0;
    masked[40] = 1.5;
    masked[50] = f32::NAN;
    let lg = dev.from_slice("masked", &masked, &[64]).unwrap();
    for step in 0..16 {
        let s = Sampling {
            temperature: 2.0,
            top_k: 0,
            top_p: 1.0,
            seed: 5,
        };
        let t = sample_once(&q, &lg, &s, step, 1)[0];
        assert!(t == 10 || t == 40, "token {t}");
    }
}

#[test]
fn sampling_is_deterministic_and_allocates_its_output() {
    let dev = device();
    let q = dev.queue();
    let mut rng = Rng::new("sample_determinism");
    let host = distinct_logits(&mut rng, 2, 500);
    let lg = dev.from_slice("l", &host, &[2, 500]).unwrap();
    let s = Sampling {
        seed: 123,
        ..Default::default()
    };
    let a = ops::sample(&q, &lg, &s, 4).expect("sample");
    assert_eq!((a.dtype(), a.shape()), (DType::U32, &[2usize][..]));
    let b = ops::sample(&q, &lg, &s, 4).expect("sample");
    assert_eq!(
        q.download::<u32>(&a).unwrap(),
        q.download::<u32>(&b).unwrap()
    );
    let one = ops::sample(&q, &lg.rows(0..1).unwrap().reshape(&[500]).unwrap(), &s, 4).unwrap();
    assert_eq!(one.shape(), &[1]);
    assert_eq!(
        q.download::<u32>(&one).unwrap()[0],
        q.download::<u32>(&a).unwrap()[0]
    );
}

#[test]
fn sampling_rejects_bad_inputs() {
    let dev = device();
    let q = dev.queue();
    let lg = dev.from_slice("l", &[0.0f32; 12], &[3, 4]).unwrap();
    let ok = Sampling::default();
    for (s, needle) in [
        (
            Sampling {
                temperature: -0.5,
                ..ok
            },
            "temperature",
        ),
        (
            Sampling {
                temperature: f32::NAN,
                ..ok
            },
            "temperature",
        ),
        (Sampling { top_p: 0.0, ..ok }, "top_p"),
        (Sampling { top_p: 1.5, ..ok }, "top_p"),
        (
            Sampling {
                top_p: f32::NAN,
                ..ok
            },
            "top_p",
        ),
        (
            Sampling {
                top_k: SAMPLE_MAX_K + 1,
                ..ok
            },
            "top_k",
        ),
    ] {
        expect_invalid(ops::sample(&q, &lg, &s, 0), needle);
    }
    let ints = dev.from_slice("i", &[0u32; 12], &[3, 4]).unwrap();
    expect_invalid(ops::sample(&q, &ints, &ok, 0), "f32, f16 or bf16");
    let cube = dev.from_slice("c", &[0.0f32; 8], &[2, 2, 2]).unwrap();
    assert!(matches!(
        ops::sample(&q, &cube, &ok, 0),
        Err(Error::ShapeMismatch { .. })
    ));
    let empty = dev.from_slice::<f32>("e", &[], &[2, 0]).unwrap();
    assert!(matches!(
        ops::sample(&q, &empty, &ok, 0),
        Err(Error::ShapeMismatch { .. })
    ));
    let out_short = dev.from_slice("o", &[0u32; 2], &[2]).unwrap();
    assert!(matches!(
        ops::sample_into(&q, &lg, &ok, 0, &out_short),
        Err(Error::ShapeMismatch { .. })
    ));
    let out_f32 = dev.from_slice("o", &[0.0f32; 3], &[3]).unwrap();
    assert!(matches!(
        ops::sample_into(&q, &lg, &ok, 0, &out_f32),
        Err(Error::DTypeMismatch {
            expected: DType::U32,
            ..
        })
    ));
    q.drain().expect("no fault");
}

/// The draw is SplitMix64's finaliser chained over (seed, step, row), top 24 bits: known
/// answers computed by an independent implementation (Python), so that a change to the hash,
/// which the sampling reference above shares with the kernels, cannot pass unnoticed.
#[test]
fn the_draw_matches_known_answers() {
    for (seed, step, row, bits) in [
        (0u64, 0u64, 0u64, 2_327_157u32),
        (42, 7, 3, 16_080_450),
        (0xdead_beef, 123_456, 65_535, 11_001_678),
    ] {
        let s = Sampling {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed,
        };
        assert_eq!(
            s.uniform(step, row),
            bits as f32 / 16_777_216.0,
            "seed {seed} step {step} row {row}"
        );
    }
}
