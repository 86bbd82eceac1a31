//! The row-wise and elementwise ops (RMSNorm with and without the residual add, softmax,
//! SwiGLU, RoPE) against f64 references computed here from the host copies of the inputs, in
//! every storage dtype, over single rows of 1 to 65536 elements, several rows, and views at
//! offsets that are and are not 16-byte aligned. Outputs of the `_into` forms are poisoned
//! first, so an element the kernel never writes shows up.

use half::{bf16, f16};
use unibuf::ops::{self, RopeStyle};
use unibuf::{Buffer, DType, Queue};
use unibuf_conformance::{
    alloc, assert_dtype_mismatch, assert_invalid, assert_shape_mismatch, device, download_f64,
    poisoned, upload_f64, Rng, NAN_POISON,
};

const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// Row-op shapes: one row of 1, 7, 4097 and 65536, several rows, and ranks 1 and 3.
const ROW_SHAPES: [&[usize]; 8] = [
    &[1, 1],
    &[1, 7],
    &[1, 4097],
    &[1, 65536],
    &[3, 4097],
    &[33, 256],
    &[7],
    &[2, 3, 64],
];

/// Relative tolerance: a few roundings of f32 arithmetic, else about four half-ulps of the
/// storage dtype (the result is rounded once, and the f32 value before rounding may sit on
/// the other side of a rounding boundary than the exact one).
fn rel_tol(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-5,
        DType::F16 => 2e-3,
        _ => 1.6e-2,
    }
}

/// `v` as stored in `dtype`, widened to f64.
fn stored(v: f32, dtype: DType) -> f64 {
    match dtype {
        DType::F32 => f64::from(v),
        DType::F16 => f16::from_f32(v).to_f64(),
        _ => bf16::from_f32(v).to_f64(),
    }
}

/// `n` random values in [-scale, scale), none zero, each exactly representable in `dtype`
/// (so the reference sees what the device sees).
fn values(rng: &mut Rng, n: usize, scale: f32, dtype: DType) -> Vec<f64> {
    (0..n)
        .map(|_| loop {
            let v = stored(rng.f32() * scale, dtype);
            if v != 0.0 {
                break v;
            }
        })
        .collect()
}

/// Every element within `rel_tol(dtype) * |want| + abs(i)` of the reference (NaN fails).
fn assert_close(what: &str, dtype: DType, got: &[f64], want: &[f64], abs: impl Fn(usize) -> f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let rel = rel_tol(dtype);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let tol = rel * w.abs() + abs(i);
        assert!(
            (g - w).abs() <= tol,
            "{what} ({dtype}): element {i} of {}: got {g}, want {w} (tolerance {tol})",
            got.len()
        );
    }
}

/// An absolute floor below which differences are noise: f32 rounding of terms near `scale`,
/// or half the smallest f16 subnormal step.
fn abs_floor(dtype: DType, scale: f64) -> f64 {
    match dtype {
        DType::F16 => 1e-7 + scale * 1e-6,
        _ => scale * 1e-6,
    }
}

fn last_dim(shape: &[usize]) -> usize {
    *shape.last().expect("rank >= 1")
}

fn rms_norm_ref(x: &[f64], w: &[f64], eps: f64) -> Vec<f64> {
    let hidden = w.len();
    x.chunks_exact(hidden)
        .flat_map(|row| {
            let ms = row.iter().map(|v| v * v).sum::<f64>() / hidden as f64;
            let s = 1.0 / (ms + f64::from(eps as f32)).sqrt();
            row.iter().zip(w).map(move |(v, w)| v * s * w)
        })
        .collect()
}

fn softmax_ref(x: &[f64], n: usize) -> Vec<f64> {
    x.chunks_exact(n)
        .flat_map(|row| {
            let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let total: f64 = row.iter().map(|v| (v - max).exp()).sum();
            row.iter().map(move |v| (v - max).exp() / total)
        })
        .collect()
}

fn swiglu_ref(g: &[f64], u: &[f64]) -> Vec<f64> {
    g.iter()
        .zip(u)
        .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
        .collect()
}

#[test]
fn rms_norm_matches_f64_reference() {
    let dev = device();
    let q = dev.queue();
    let mut rng = Rng::new("ops_rms_norm");
    let eps = 1e-5f32;
    for dtype in DTYPES {
        for shape in ROW_SHAPES {
            let hidden = last_dim(shape);
            let n: usize = shape.iter().product();
            let xv = values(&mut rng, n, 8.0, dtype);
            let wv = values(&mut rng, hidden, 2.0, dtype);
            let x = upload_f64(&dev, "x", dtype, shape, &xv);
            let w = upload_f64(&dev, "w", dtype, &[hidden], &wv);
            let want = rms_norm_ref(&xv, &wv, f64::from(eps));
            let what = format!("rms_norm {shape:?}");
            let y = ops::rms_norm(&q, &x, &w, eps).expect("rms_norm");
            assert_eq!((y.dtype(), y.shape()), (dtype, shape));
            let floor = abs_floor(dtype, 4.0);
            assert_close(&what, dtype, &download_f64(&q, &y), &want, |_| floor);
            let out = poisoned(&dev, dtype, shape);
            let fence = ops::rms_norm_into(&q, &x, &w, eps, &out).expect("rms_norm_into");
            q.wait(fence).expect("wait");
            assert_close(&what, dtype, &download_f64(&q, &out), &want, |_| floor);
        }
    }
}

#[test]
fn rms_norm_residual_matches_rms_norm_of_the_rounded_sum() {
    let dev = device();
    let q = dev.queue();
    let mut rng = Rng::new("ops_rms_norm_residual");
    let eps = 1e-6f32;
    for dtype in DTYPES {
        for shape in ROW_SHAPES {
            let hidden = last_dim(shape);
            let n: usize = shape.iter().product();
            let xv = values(&mut rng, n, 8.0, dtype);
            let rv = values(&mut rng, n, 8.0, dtype);
            let wv = values(&mut rng, hidden, 2.0, dtype);
            let x = upload_f64(&dev, "x", dtype, shape, &xv);
            let r = upload_f64(&dev, "residual", dtype, shape, &rv);
            let w = upload_f64(&dev, "w", dtype, &[hidden], &wv);
            let want_sum: Vec<f64> = xv.iter().zip(&rv).map(|(a, b)| a + b).collect();
            let what = format!("rms_norm_residual {shape:?}");
            let floor = abs_floor(dtype, 16.0);
            let check = |normed: &Buffer, sum: &Buffer| {
                let got_sum = download_f64(&q, sum);
                assert_close(&format!("{what} sum"), dtype, &got_sum, &want_sum, |_| {
                    floor
                });
                // The norm is of the sum as stored, exactly what rms_norm(sum) would see.
                let want = rms_norm_ref(&got_sum, &wv, f64::from(eps));
                assert_close(&what, dtype, &download_f64(&q, normed), &want, |_| floor);
            };
            let (normed, sum) =
                ops::rms_norm_residual(&q, &x, &r, &w, eps).expect("rms_norm_residual");
            check(&normed, &sum);
            let (normed, sum) = (poisoned(&dev, dtype, shape), poisoned(&dev, dtype, shape));
            let fence = ops::rms_norm_residual_into(&q, &x, &r, &w, eps, &normed, &sum)
                .expect("rms_norm_residual_into");
            q.wait(fence).expect("wait");
            check(&normed, &sum);
        }
    }
}

#[test]
fn softmax_matches_f64_reference() {
    let dev = device();
    let q = dev.queue();
    let mut rng = Rng::new("ops_softmax");
    let shapes = ROW_SHAPES.iter().copied().chain([&[1, 131_072][..]]);
    for dtype in DTYPES {
        for shape in shapes.clone() {
            let n = last_dim(shape);
            let count: usize = shape.iter().product();
            let xv = values(&mut rng, count, 10.0, dtype);
            let x = upload_f64(&dev, "x", dtype, shape, &xv);
            let want = softmax_ref(&xv, n);
            let what = format!("softmax {shape:?}");
            // Probabilities are tiny in long rows: the floor is well below every one of them
            // that the dtype can represent (f16 flushes the smallest to its subnormals).
            let floor = if dtype == DType::F16 { 1e-7 } else { 1e-12 };
            let y = ops::softmax(&q, &x).expect("softmax");
            assert_close(&what, dtype, &download_f64(&q, &y), &want, |_| floor);
            let out = poisoned(&dev, dtype, shape);
            q.wait(ops::softmax_into(&q, &x, &out).expect("softmax_into"))
                .expect("wait");
            let got = download_f64(&q, &out);
            assert_close(&what, dtype, &got, &want, |_| floor);
            for row in got.chunks_exact(n) {
                let total: f64 = row.iter().sum();
                assert!(
                    (total - 1.0).abs() < 4.0 * rel_tol(dtype) + 1e-4,
                    "{what}: a row sums to {total}"
                );
            }
        }
    }
}

#[test]
fn softmax_of_a_row_with_a_huge_spread_is_finite() {
    let dev = device();
    let q = dev.queue();
    // exp(x) alone would overflow f32 at 1000; the max-subtracted form must not.
    let x = dev
        .from_slice("x", &[1000.0f32, 999.0, -1000.0, 0.0], &[1, 4])
        .expect("upload");
    let got = q
        .download::<f32>(&ops::softmax(&q, &x).expect("softmax"))
        .expect("download");
    let e = (-1.0f64).exp();
    let want = [1.0 / (1.0 + e), e / (1.0 + e), 0.0, 0.0];
    for (g, w) in got.iter().zip(want) {
        assert!((f64::from(*g) - w).abs() < 1e-6, "{got:?}");
    }
}

#[test]
fn swiglu_matches_f64_reference() {
    let dev = device();
    let q = dev.queue();
    let mut rng = Rng::new("ops_swiglu");
    let shapes: [&[usize]; 7] = [&[1], &[7], &[4097], &[65536], &[33, 256], &[3, 4097], &[]];
    for dtype in DTYPES {
        for shape in shapes {
            let n: usize = shape.iter().product();
            let gv = values(&mut rng, n, 8.0, dtype);
            let uv = values(&mut rng, n, 4.0, dtype);
            let g = upload_f64(&dev, "gate", dtype, shape, &gv);
            let u = upload_f64(&dev, "up", dtype, shape, &uv);
            let want = swiglu_ref(&gv, &uv);
            let what = format!("swiglu {shape:?}");
            let floor = abs_floor(dtype, 32.0);
            let y = ops::swiglu(&q, &g, &u).expect("swiglu");
            assert_close(&what, dtype, &download_f64(&q, &y), &want, |_| floor);
            let out = poisoned(&dev, dtype, shape);
            q.wait(ops::swiglu_into(&q, &g, &u, &out).expect("swiglu_into"))
                .expect("wait");
            assert_close(&what, dtype, &download_f64(&q, &out), &want, |_| floor);
        }
    }
}

/// The f64 rotation and, per element, the angle at which it was taken.
fn rope_ref(
    x: &[f64],
    pos: &[u32],
    heads: usize,
    head_dim: usize,
    theta: f64,
    style: RopeStyle,
) -> (Vec<f64>, Vec<f64>) {
    let half = head_dim / 2;
    let mut y = vec![0.0; x.len()];
    let mut angles = vec![0.0; x.len()];
    for (h, xh) in x.chunks_exact(head_dim).enumerate() {
        let p = f64::from(pos[h / heads]);
        for i in 0..half {
            let angle = p * theta.powf(-((2 * i) as f64) / head_dim as f64);
            let (s, c) = angle.sin_cos();
            let (a, b) = match style {
                RopeStyle::Neox => (i, i + half),
                RopeStyle::Interleaved => (2 * i, 2 * i + 1),
            };
            let base = h * head_dim;
            y[base + a] = xh[a] * c - xh[b] * s;
            y[base + b] = xh[b] * c + xh[a] * s;
            angles[base + a] = angle;
            angles[base + b] = angle;
        }
    }
    (y, angles)
}

#[test]
fn rope_matches_f64_reference_in_both_layouts() {
    let dev = device();
    let q = dev.queue();
    let mut rng = Rng::new("ops_rope");
    let shapes: [[usize; 3]; 5] = [[1, 1, 2], [3, 4, 64], [7, 3, 6], [5, 2, 128], [2, 1, 4098]];
    for dtype in DTYPES {
        for [tokens, heads, head_dim] in shapes {
            for (style, theta) in [
                (RopeStyle::Neox, 10_000.0f32),
                (RopeStyle::Interleaved, 500_000.0),
            ] {
                let shape = [tokens, heads, head_dim];
                let n = tokens * heads * head_dim;
                let xv = values(&mut rng, n, 4.0, dtype);
                // Positions up to 8192, the first token at 0 and the last at 8191.
                let mut pos: Vec<u32> = (0..tokens).map(|_| rng.range(0, 8192) as u32).collect();
                pos[0] = 0;
                if tokens > 1 {
                    pos[tokens - 1] = 8191;
                }
                let x = upload_f64(&dev, "x", dtype, &shape, &xv);
                let p = dev
                    .from_slice("positions", &pos, &[tokens])
                    .expect("upload");
                let (want, angles) = rope_ref(&xv, &pos, heads, head_dim, f64::from(theta), style);
                // The device turns by an f32 angle: its error is a few f32 ulps of the angle
                // (about 1e-3 rad at 8192), times the magnitude of the rotated pair (< 8).
                let floor = |i: usize| 8.0 * (angles[i] * 2.4e-7 + 1e-6) + abs_floor(dtype, 0.0);
                let what = format!("rope {style:?} theta {theta} {shape:?}");
                let y = ops::rope(&q, &x, &p, theta, style).expect("rope");
                assert_close(&what, dtype, &download_f64(&q, &y), &want, floor);
                let out = poisoned(&dev, dtype, &shape);
                q.wait(ops::rope_into(&q, &x, &p, theta, style, &out).expect("rope_into"))
                    .expect("wait");
                assert_close(&what, dtype, &download_f64(&q, &out), &want, floor);
            }
        }
    }
}

/// Bytes of `big` outside the rows `range` (of `rows` rows) are still the poison.
fn assert_untouched(q: &Queue, big: &Buffer, rows: usize, range: std::ops::Range<usize>) {
    let bytes = q
        .download::<u8>(&big.cast(DType::U8).expect("cast"))
        .expect("download");
    let row_bytes = bytes.len() / rows;
    for (i, b) in bytes.iter().enumerate() {
        if !range.contains(&(i / row_bytes)) {
            assert_eq!(*b, NAN_POISON, "byte {i} outside the view was written");
        }
    }
}

#[test]
fn row_ops_on_views_at_aligned_and_unaligned_offsets() {
    let dev = device();
    let q = dev.queue();
    let mut rng = Rng::new("ops_views");
    let eps = 1e-5f32;
    // Row 1 of 7 elements starts 14 or 28 bytes in; of 4104 elements, at a multiple of 16.
    for (rows, hidden, range) in [(5usize, 7usize, 1..4), (4, 4104, 1..3)] {
        for dtype in DTYPES {
            let shape = [rows, hidden];
            let n = rows * hidden;
            let (lo, hi) = (range.start * hidden, range.end * hidden);
            let xv = values(&mut rng, n, 8.0, dtype);
            let rv = values(&mut rng, n, 8.0, dtype);
            let wv = values(&mut rng, hidden, 2.0, dtype);
            let x_big = upload_f64(&dev, "x", dtype, &shape, &xv);
            let r_big = upload_f64(&dev, "residual", dtype, &shape, &rv);
            let w = upload_f64(&dev, "w", dtype, &[hidden], &wv);
            let x = x_big.rows(range.clone()).expect("rows");
            let r = r_big.rows(range.clone()).expect("rows");
            let what = format!("view {range:?} of {shape:?}");
            let floor = abs_floor(dtype, 16.0);
            let view_out = |big: &Buffer| big.rows(range.clone()).expect("rows");

            let out = poisoned(&dev, dtype, &shape);
            q.wait(ops::rms_norm_into(&q, &x, &w, eps, &view_out(&out)).expect("rms_norm"))
                .expect("wait");
            let want = rms_norm_ref(&xv[lo..hi], &wv, f64::from(eps));
            let got = download_f64(&q, &view_out(&out));
            assert_close(&format!("rms_norm {what}"), dtype, &got, &want, |_| floor);
            assert_untouched(&q, &out, rows, range.clone());

            let (normed, sum) = (poisoned(&dev, dtype, &shape), poisoned(&dev, dtype, &shape));
            let fence = ops::rms_norm_residual_into(
                &q,
                &x,
                &r,
                &w,
                eps,
                &view_out(&normed),
                &view_out(&sum),
            )
            .expect("rms_norm_residual");
            q.wait(fence).expect("wait");
            let got_sum = download_f64(&q, &view_out(&sum));
            let want_sum: Vec<f64> = (lo..hi).map(|i| xv[i] + rv[i]).collect();
            assert_close(&format!("sum {what}"), dtype, &got_sum, &want_sum, |_| {
                floor
            });
            let want = rms_norm_ref(&got_sum, &wv, f64::from(eps));
            let got = download_f64(&q, &view_out(&normed));
            assert_close(&format!("normed {what}"), dtype, &got, &want, |_| floor);
            assert_untouched(&q, &normed, rows, range.clone());
            assert_untouched(&q, &sum, rows, range.clone());

            let out = poisoned(&dev, dtype, &shape);
            q.wait(ops::softmax_into(&q, &x, &view_out(&out)).expect("softmax"))
                .expect("wait");
            let want = softmax_ref(&xv[lo..hi], hidden);
            let got = download_f64(&q, &view_out(&out));
            assert_close(&format!("softmax {what}"), dtype, &got, &want, |_| 1e-7);
            assert_untouched(&q, &out, rows, range.clone());

            let out = poisoned(&dev, dtype, &shape);
            q.wait(ops::swiglu_into(&q, &x, &r, &view_out(&out)).expect("swiglu"))
                .expect("wait");
            let want = swiglu_ref(&xv[lo..hi], &rv[lo..hi]);
            let got = download_f64(&q, &view_out(&out));
            assert_close(&format!("swiglu {what}"), dtype, &got, &want, |_| {
                abs_floor(dtype, 32.0)
            });
            assert_untouched(&q, &out, rows, range.clone());
        }
    }
}

#[test]
fn ops_refuse_bad_inputs_with_typed_errors() {
    let dev = device();
    let q = dev.queue();
    let x = alloc(&dev, DType::F32, &[2, 8]);
    let w = alloc(&dev, DType::F32, &[8]);
    let w16 = alloc(&dev, DType::F16, &[8]);
    let out16 = alloc(&dev, DType::F16, &[2, 8]);
    let scalar = alloc(&dev, DType::F32, &[]);
    let ints = alloc(&dev, DType::U32, &[2, 8]);
    let no_rows = alloc(&dev, DType::F32, &[0, 8]);

    // RMSNorm.
    assert_dtype_mismatch(ops::rms_norm(&q, &x, &w16, 1e-5));
    assert_shape_mismatch(ops::rms_norm(&q, &x, &alloc(&dev, DType::F32, &[9]), 1e-5));
    assert_dtype_mismatch(ops::rms_norm_into(&q, &x, &w, 1e-5, &out16));
    assert_shape_mismatch(ops::rms_norm_into(
        &q,
        &x,
        &w,
        1e-5,
        &alloc(&dev, DType::F32, &[16]),
    ));
    assert_invalid(ops::rms_norm(&q, &scalar, &w, 1e-5), "shape []");
    assert_invalid(ops::rms_norm(&q, &ints, &w, 1e-5), "U32");
    assert_invalid(ops::rms_norm(&q, &no_rows, &w, 1e-5), "[0, 8]");
    assert_invalid(ops::rms_norm(&q, &x, &w, -1.0), "-1");
    assert_invalid(ops::rms_norm(&q, &x, &w, f32::NAN), "NaN");
    // Writing over an input is refused by the launch check.
    assert_invalid(ops::rms_norm_into(&q, &x, &w, 1e-5, &x), "overlaps");
    let r16 = alloc(&dev, DType::F16, &[2, 8]);
    assert_dtype_mismatch(ops::rms_norm_residual(&q, &x, &r16, &w, 1e-5));
    let r_short = alloc(&dev, DType::F32, &[1, 8]);
    assert_shape_mismatch(ops::rms_norm_residual(&q, &x, &r_short, &w, 1e-5));
    let r = alloc(&dev, DType::F32, &[2, 8]);
    let normed = alloc(&dev, DType::F32, &[2, 8]);
    assert_shape_mismatch(ops::rms_norm_residual_into(
        &q,
        &x,
        &r,
        &w,
        1e-5,
        &normed,
        &alloc(&dev, DType::F32, &[2, 9]),
    ));

    // Softmax.
    assert_invalid(ops::softmax(&q, &scalar), "shape []");
    assert_invalid(ops::softmax(&q, &alloc(&dev, DType::F32, &[3, 0])), "empty");
    assert_dtype_mismatch(ops::softmax_into(&q, &x, &out16));
    assert_shape_mismatch(ops::softmax_into(&q, &x, &alloc(&dev, DType::F32, &[8, 2])));

    // SwiGLU.
    assert_dtype_mismatch(ops::swiglu(&q, &x, &out16));
    assert_shape_mismatch(ops::swiglu(&q, &x, &alloc(&dev, DType::F32, &[16])));
    assert_invalid(ops::swiglu(&q, &ints, &ints), "U32");
    assert_invalid(ops::swiglu(&q, &no_rows, &no_rows), "no elements");

    // RoPE.
    let xr = alloc(&dev, DType::BF16, &[2, 3, 8]);
    let pos = alloc(&dev, DType::U32, &[2]);
    let style = RopeStyle::Neox;
    assert!(ops::rope(&q, &xr, &pos, 10_000.0, style).is_ok());
    assert_invalid(
        ops::rope(&q, &alloc(&dev, DType::F32, &[2, 3, 7]), &pos, 1e4, style),
        "head_dim = 7",
    );
    assert_invalid(
        ops::rope(&q, &alloc(&dev, DType::F32, &[2, 0, 8]), &pos, 1e4, style),
        "[2, 0, 8]",
    );
    assert_shape_mismatch(ops::rope(&q, &x, &pos, 1e4, style));
    assert_shape_mismatch(ops::rope(&q, &scalar, &pos, 1e4, style));
    assert_dtype_mismatch(ops::rope(
        &q,
        &xr,
        &alloc(&dev, DType::I32, &[2]),
        1e4,
        style,
    ));
    assert_shape_mismatch(ops::rope(
        &q,
        &xr,
        &alloc(&dev, DType::U32, &[3]),
        1e4,
        style,
    ));
    assert_invalid(ops::rope(&q, &xr, &pos, 0.0, style), "theta_base");
    assert_invalid(ops::rope(&q, &xr, &pos, f32::INFINITY, style), "theta_base");
    assert_dtype_mismatch(ops::rope_into(
        &q,
        &xr,
        &pos,
        1e4,
        style,
        &alloc(&dev, DType::F32, &[2, 3, 8]),
    ));

    // Nothing above reached the device as a fault.
    dev.drain().expect("no fault");
}
