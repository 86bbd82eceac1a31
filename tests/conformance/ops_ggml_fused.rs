//! The fused GGUF block products (`ggml_matvec_norm`, `ggml_matvec_add`, `ggml_swiglu_norm`) and
//! `ggml_dequantize` against f64 references computed here: the weights decoded from the ggml
//! layout by `ops_ggml`'s independent decoder, the RMS norm, SiLU and the sums all in f64, from
//! the inputs as stored (rounded to their dtype). Outputs are poisoned with NaN first.
//!
//! Tolerances (`U` = 2⁻²⁴, the f32 unit roundoff; `mag` = the sum of the products' magnitudes):
//! - a product of `cols` terms over x as stored: `(cols + 2) U mag`, the bound of an f32 sum;
//! - over the normalised x: `(1.5 cols + 16) U mag`: the sum, plus the f32 error of each
//!   normalised value (the mean of squares, an f32 sum of `cols` terms, moves the scale by at
//!   most half its relative error; `rsqrt` and the two products a few ulp more);
//! - SwiGLU: `1.1 |u| tol(g) + |silu(g)| tol(u) + 8 U |y|` (|silu'| < 1.1, and `exp`, the
//!   division and the product round a few times);
//! - the residual add: the product's bound over `mag + |residual|`;
//! - dequantisation: exact in f32; one rounding to f16 / bf16.

use crate::ops_ggml::{random_blocks, reference_weights};
use unibuf::ops::{self, GgmlMatrix, GGML_MAX_BATCH, GGML_MAX_STACKED};
use unibuf::weights::gguf::GgmlType;
use unibuf::{Buffer, DType, Device, Error, LaunchBatch, Queue, StorageMode};
use unibuf_conformance::{device, download_f64, poison_nan, poisoned, upload_f64, Rng};

const FORMATS: [GgmlType; 3] = [GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_1];
const X_DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];
/// The f32 unit roundoff.
const U: f64 = 1.0 / (1u64 << 24) as f64;

/// A random matrix on the device with its reference weights (f64, row-major).
struct Mat {
    m: GgmlMatrix,
    w: Vec<f64>,
}

/// A random `rows x cols` matrix of `ty`; `odd` places its bytes at an odd offset of a larger
/// allocation (the kernels' byte-load path).
fn matrix(dev: &Device, rng: &mut Rng, ty: GgmlType, rows: usize, cols: usize, odd: bool) -> Mat {
    let bytes = random_blocks(rng, ty, rows, cols);
    let w = reference_weights(ty, &bytes, rows, cols);
    let row_bytes = bytes.len() / rows;
    let b = if odd {
        let all = dev
            .alloc_labelled("w (odd)", DType::U8, &[bytes.len() + 3], StorageMode::Auto)
            .unwrap();
        let view = all
            .slice(1..bytes.len() + 1)
            .unwrap()
            .reshape(&[rows, row_bytes])
            .unwrap();
        dev.queue().upload(&view, &bytes).unwrap();
        view
    } else {
        dev.from_slice("w", &bytes, &[rows, row_bytes]).unwrap()
    };
    Mat {
        m: GgmlMatrix::new(b, ty, rows, cols).unwrap(),
        w,
    }
}

/// `v` rounded to the dtype of `b` and uploaded into it (a view at any offset).
fn upload_into(q: &Queue, b: &Buffer, v: &[f64]) {
    match b.dtype() {
        DType::F32 => {
            let h: Vec<f32> = v.iter().map(|&x| x as f32).collect();
            q.upload(b, &h).unwrap();
        }
        DType::F16 => {
            let h: Vec<half::f16> = v.iter().map(|&x| half::f16::from_f64(x)).collect();
            q.upload(b, &h).unwrap();
        }
        DType::BF16 => {
            let h: Vec<half::bf16> = v.iter().map(|&x| half::bf16::from_f64(x)).collect();
            q.upload(b, &h).unwrap();
        }
        other => panic!("upload_into: {other} is not a float dtype"),
    }
}

/// A float buffer of `shape` holding `v`: fresh, or (`offset`) a view one element into a larger
/// NaN-poisoned allocation, so that it is aligned for no vector load.
fn float_input(dev: &Device, dtype: DType, shape: &[usize], v: &[f64], offset: bool) -> Buffer {
    if !offset {
        return upload_f64(dev, "x", dtype, shape, v);
    }
    let all = dev
        .alloc_labelled("x (offset)", dtype, &[v.len() + 2], StorageMode::Auto)
        .unwrap();
    poison_nan(dev, &all);
    let view = all.slice(1..v.len() + 1).unwrap().reshape(shape).unwrap();
    upload_into(&dev.queue(), &view, v);
    view
}

/// A NaN-poisoned f32 output of `shape`, fresh or one element into a larger allocation.
fn output(dev: &Device, shape: &[usize], offset: bool) -> Buffer {
    if !offset {
        return poisoned(dev, DType::F32, shape);
    }
    let n: usize = shape.iter().product();
    let all = poisoned(dev, DType::F32, &[n + 2]);
    all.slice(1..n + 1).unwrap().reshape(shape).unwrap()
}

/// `[cols]` for a batch of 1 given as a vector (when `vector`), else `[batch, cols]`.
fn shape_of(batch: usize, cols: usize, vector: bool) -> Vec<usize> {
    if batch == 1 && vector {
        vec![cols]
    } else {
        vec![batch, cols]
    }
}

/// The RMS-normalised rows of `x` in f64: `x / sqrt(mean(x²) + eps) * nw`.
fn norm_ref(x: &[f64], nw: &[f64], cols: usize, eps: f64) -> Vec<f64> {
    let mut n = Vec::with_capacity(x.len());
    for row in x.chunks_exact(cols) {
        let ms = row.iter().map(|v| v * v).sum::<f64>() / cols as f64;
        let s = 1.0 / (ms + eps).sqrt();
        n.extend(row.iter().zip(nw).map(|(v, w)| v * s * w));
    }
    n
}

/// `(w . x[b], sum |w_c x[b, c]|)` for row `r` of `w` (`cols` wide).
fn dot_ref(w: &[f64], r: usize, cols: usize, x: &[f64], b: usize) -> (f64, f64) {
    let (mut s, mut mag) = (0.0f64, 0.0f64);
    for c in 0..cols {
        let p = w[r * cols + c] * x[b * cols + c];
        s += p;
        mag += p.abs();
    }
    (s, mag)
}

fn norm_tol(cols: usize, mag: f64) -> f64 {
    (1.5 * cols as f64 + 16.0) * U * mag + 1e-30
}

fn silu(g: f64) -> f64 {
    g / (1.0 + (-g).exp())
}

/// The (batch, x dtype) pairs a case runs: all of them for narrow matrices, three for wide ones
/// (rotated with `turn`, so that every format meets every dtype).
fn combos(cols: usize, turn: usize) -> Vec<(usize, DType)> {
    let batches = [1usize, 3, GGML_MAX_BATCH];
    if cols <= 96 {
        batches
            .iter()
            .flat_map(|&b| X_DTYPES.iter().map(move |&d| (b, d)))
            .collect()
    } else {
        (0..3)
            .map(|i| (batches[i], X_DTYPES[(i + turn) % 3]))
            .collect()
    }
}

const EPS: [f32; 3] = [1e-6, 1e-5, 0.25];

/// Runs `ggml_matvec_norm_into` (and the allocating form) on `mats` and checks every output.
#[allow(clippy::too_many_arguments)]
fn check_matvec_norm(
    dev: &Device,
    rng: &mut Rng,
    mats: &[&Mat],
    batch: usize,
    xd: DType,
    eps: f32,
    vector: bool,
    offset: bool,
    what: &str,
) {
    let q = dev.queue();
    let cols = mats[0].m.cols();
    let total: usize = mats.iter().map(|m| m.m.rows()).sum();
    let xs: Vec<f64> = (0..batch * cols).map(|_| f64::from(rng.f32())).collect();
    let nws: Vec<f64> = (0..cols)
        .map(|_| 1.0 + 0.5 * f64::from(rng.f32()))
        .collect();
    let x = float_input(dev, xd, &shape_of(batch, cols, vector), &xs, offset);
    let nw = float_input(dev, xd, &[cols], &nws, offset);
    let (xr, nwr) = (download_f64(&q, &x), download_f64(&q, &nw));
    let n = norm_ref(&xr, &nwr, cols, f64::from(eps));
    let y = output(dev, &shape_of(batch, total, vector), offset);
    let ms: Vec<&GgmlMatrix> = mats.iter().map(|m| &m.m).collect();
    ops::ggml_matvec_norm_into(&q, &ms, &x, &nw, eps, &y).unwrap();
    let fresh = ops::ggml_matvec_norm(&q, &ms, &x, &nw, eps).unwrap();
    assert_eq!(fresh.shape(), y.shape());
    for got in [download_f64(&q, &y), download_f64(&q, &fresh)] {
        for b in 0..batch {
            let mut first = 0;
            for (i, m) in mats.iter().enumerate() {
                for r in 0..m.m.rows() {
                    let (want, mag) = dot_ref(&m.w, r, cols, &n, b);
                    let g = got[b * total + first + r];
                    assert!(
                        (g - want).abs() <= norm_tol(cols, mag),
                        "{what}: batch {batch} x {xd} eps {eps}: y[{b}, {}] (matrix {i} row {r}) \
                         = {g}, want {want} (|wn| sum {mag})",
                        first + r
                    );
                }
                first += m.m.rows();
            }
        }
    }
}

#[test]
fn ggml_matvec_norm_matches_the_f64_reference() {
    let dev = device();
    let mut rng = Rng::new("ggml_matvec_norm");
    // Row counts of the stacked matrices, per cols: one, two and three matrices.
    let cases: [(usize, &[&[usize]]); 4] = [
        (32, &[&[1], &[7, 33], &[33, 1, 7]]),
        (96, &[&[577], &[1, 7], &[7, 33, 1]]),
        (576, &[&[33], &[577, 7], &[576, 192, 192]]),
        (1536, &[&[7], &[1, 33], &[33, 7, 1]]),
    ];
    let mut turn = 0usize;
    for (cols, stacks) in cases {
        for rows in stacks {
            for f in 0..FORMATS.len() {
                // Matrix i in format f + i: every format first, and mixed stacks.
                let mats: Vec<Mat> = rows
                    .iter()
                    .enumerate()
                    .map(|(i, &r)| matrix(&dev, &mut rng, FORMATS[(f + i) % 3], r, cols, false))
                    .collect();
                let refs: Vec<&Mat> = mats.iter().collect();
                for (batch, xd) in combos(cols, f) {
                    turn += 1;
                    let what = format!(
                        "{:?} {rows:?} x {cols}",
                        (0..rows.len())
                            .map(|i| FORMATS[(f + i) % 3])
                            .collect::<Vec<_>>()
                    );
                    check_matvec_norm(
                        &dev,
                        &mut rng,
                        &refs,
                        batch,
                        xd,
                        EPS[turn % 3],
                        turn.is_multiple_of(2),
                        false,
                        &what,
                    );
                }
            }
        }
    }
}

#[test]
fn ggml_fused_ops_read_views_at_any_offset() {
    // Matrices at odd byte offsets, x / norm weight / outputs one element into their
    // allocations: the GPU kernels' byte-load and scalar-load paths, with normalised x held in
    // shared memory (3 x 96) and normalised as it is read (8 x 1536).
    let dev = device();
    let q = dev.queue();
    let mut rng = Rng::new("ggml_fused_views");
    for (f, &ty) in FORMATS.iter().enumerate() {
        for &(rows, cols, batch) in &[(33usize, 96usize, 3usize), (7, 1536, GGML_MAX_BATCH)] {
            let xd = X_DTYPES[f];
            let a = matrix(&dev, &mut rng, ty, rows, cols, true);
            let b = matrix(&dev, &mut rng, FORMATS[(f + 1) % 3], rows + 2, cols, true);
            let what = format!("{ty:?} views {rows} x {cols}");
            check_matvec_norm(
                &dev,
                &mut rng,
                &[&a, &b],
                batch,
                xd,
                1e-5,
                false,
                true,
                &what,
            );
            check_swiglu(&dev, &mut rng, &a, &a, batch, xd, 1e-5, true, &what);
            check_add(&dev, &q, &mut rng, &a, batch, xd, true, &what);
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn check_swiglu(
    dev: &Device,
    rng: &mut Rng,
    gate: &Mat,
    up: &Mat,
    batch: usize,
    xd: DType,
    eps: f32,
    offset: bool,
    what: &str,
) {
    let q = dev.queue();
    let (rows, cols) = (gate.m.rows(), gate.m.cols());
    let vector = batch == 1 && rng.range(0, 2) == 0;
    let xs: Vec<f64> = (0..batch * cols).map(|_| f64::from(rng.f32())).collect();
    let nws: Vec<f64> = (0..cols)
        .map(|_| 1.0 + 0.5 * f64::from(rng.f32()))
        .collect();
    let x = float_input(dev, xd, &shape_of(batch, cols, vector), &xs, offset);
    let nw = float_input(dev, xd, &[cols], &nws, offset);
    let (xr, nwr) = (download_f64(&q, &x), download_f64(&q, &nw));
    let n = norm_ref(&xr, &nwr, cols, f64::from(eps));
    let y = output(dev, &shape_of(batch, rows, vector), offset);
    ops::ggml_swiglu_norm_into(&q, &gate.m, &up.m, &x, &nw, eps, &y).unwrap();
    let fresh = ops::ggml_swiglu_norm(&q, &gate.m, &up.m, &x, &nw, eps).unwrap();
    assert_eq!(fresh.shape(), y.shape());
    for got in [download_f64(&q, &y), download_f64(&q, &fresh)] {
        for b in 0..batch {
            for r in 0..rows {
                let (g, gmag) = dot_ref(&gate.w, r, cols, &n, b);
                let (u, umag) = dot_ref(&up.w, r, cols, &n, b);
                let want = silu(g) * u;
                let tol = 1.1 * u.abs() * norm_tol(cols, gmag)
                    + silu(g).abs() * norm_tol(cols, umag)
                    + 8.0 * U * want.abs()
                    + 1e-30;
                let v = got[b * rows + r];
                assert!(
                    (v - want).abs() <= tol,
                    "{what}: swiglu batch {batch} x {xd}: y[{b}, {r}] = {v}, want {want} \
                     (gate {g}, up {u}, tolerance {tol})"
                );
            }
        }
    }
}

#[test]
fn ggml_swiglu_norm_matches_the_f64_reference() {
    let dev = device();
    let mut rng = Rng::new("ggml_swiglu_norm");
    let sizes = [(1usize, 32usize), (33, 96), (577, 96), (7, 576), (33, 1536)];
    let mut turn = 0usize;
    for (case, &(rows, cols)) in sizes.iter().enumerate() {
        for (f, &ty) in FORMATS.iter().enumerate() {
            let gate = matrix(&dev, &mut rng, ty, rows, cols, false);
            let up = matrix(&dev, &mut rng, FORMATS[(f + case) % 3], rows, cols, false);
            for (batch, xd) in combos(cols, f) {
                turn += 1;
                let what = format!("{ty:?} gate, {:?} up, {rows} x {cols}", up.m.ggml_type());
                check_swiglu(
                    &dev,
                    &mut rng,
                    &gate,
                    &up,
                    batch,
                    xd,
                    EPS[turn % 3],
                    false,
                    &what,
                );
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn check_add(
    dev: &Device,
    q: &Queue,
    rng: &mut Rng,
    w: &Mat,
    batch: usize,
    xd: DType,
    offset: bool,
    what: &str,
) {
    let (rows, cols) = (w.m.rows(), w.m.cols());
    let vector = batch == 1 && rng.range(0, 2) == 0;
    let xs: Vec<f64> = (0..batch * cols).map(|_| f64::from(rng.f32())).collect();
    let res: Vec<f64> = (0..batch * rows).map(|_| f64::from(rng.f32())).collect();
    let x = float_input(dev, xd, &shape_of(batch, cols, vector), &xs, offset);
    let residual = float_input(
        dev,
        DType::F32,
        &shape_of(batch, rows, vector),
        &res,
        offset,
    );
    let (xr, rr) = (download_f64(q, &x), download_f64(q, &residual));
    let y = output(dev, &shape_of(batch, rows, vector), offset);
    ops::ggml_matvec_add_into(q, &w.m, &x, &residual, &y).unwrap();
    let fresh = ops::ggml_matvec_add(q, &w.m, &x, &residual).unwrap();
    assert_eq!(fresh.shape(), y.shape());
    for got in [download_f64(q, &y), download_f64(q, &fresh)] {
        for b in 0..batch {
            for r in 0..rows {
                let (p, mag) = dot_ref(&w.w, r, cols, &xr, b);
                let i = b * rows + r;
                let want = rr[i] + p;
                let tol = (cols as f64 + 2.0) * U * (mag + rr[i].abs()) + 1e-30;
                assert!(
                    (got[i] - want).abs() <= tol,
                    "{what}: add batch {batch} x {xd}: y[{b}, {r}] = {}, want {want} \
                     (residual {}, product {p})",
                    got[i],
                    rr[i]
                );
            }
        }
    }
}

#[test]
fn ggml_matvec_add_matches_the_f64_reference() {
    let dev = device();
    let q = dev.queue();
    let mut rng = Rng::new("ggml_matvec_add");
    for &(rows, cols) in &[(1usize, 32usize), (7, 96), (577, 576), (33, 1536)] {
        for (f, &ty) in FORMATS.iter().enumerate() {
            let w = matrix(&dev, &mut rng, ty, rows, cols, false);
            for (batch, xd) in combos(cols, f) {
                let what = format!("{ty:?} {rows} x {cols}");
                check_add(&dev, &q, &mut rng, &w, batch, xd, false, &what);
            }
        }
    }
}

#[test]
fn ggml_dequantize_matches_the_reference_weights() {
    let dev = device();
    let q = dev.queue();
    let mut rng = Rng::new("ggml_dequantize");
    for &(rows, cols) in &[(1usize, 32usize), (7, 96), (33, 576), (2, 1536)] {
        for &ty in &FORMATS {
            for odd in [false, true] {
                let w = matrix(&dev, &mut rng, ty, rows, cols, odd);
                for dt in X_DTYPES {
                    let out = poisoned(&dev, dt, &[rows, cols]);
                    ops::ggml_dequantize_into(&q, &w.m, &out).unwrap();
                    let fresh = ops::ggml_dequantize(&q, &w.m, dt).unwrap();
                    assert_eq!(fresh.dtype(), dt);
                    for got in [download_f64(&q, &out), download_f64(&q, &fresh)] {
                        for (i, (&g, &want)) in got.iter().zip(&w.w).enumerate() {
                            // Exact in f32 (f16 scales, small integer codes); one rounding to
                            // f16 (also in its subnormal range) or bf16.
                            let tol = match dt {
                                DType::F32 => 0.0,
                                DType::F16 => want.abs() / 2048.0 + 1.0 / (1u64 << 25) as f64,
                                _ => want.abs() / 256.0,
                            };
                            assert!(
                                (g - want).abs() <= tol,
                                "{ty:?} {rows} x {cols} (odd {odd}) -> {dt}: element {i} \
                                 (row {}, col {}) = {g}, want {want}",
                                i / cols,
                                i % cols
                            );
                        }
                    }
                }
            }
        }
    }
}

/// A decoder step in miniature, recorded once into a launch batch and replayed: the fused QKV
/// projection, the output projection with its residual, SwiGLU's first half, the down
/// projection with its residual and the lm_head after the final norm. Each replay (with new
/// inputs written between them) equals the same ops launched one by one.
#[test]
fn ggml_fused_ops_record_into_a_launch_batch() {
    let dev = device();
    let q = dev.queue();
    let mut rng = Rng::new("ggml_fused_batch");
    let (hidden, kv, ffn, vocab) = (64usize, 32usize, 96usize, 160usize);
    let mut mat = |ty, rows, cols| matrix(&dev, &mut rng, ty, rows, cols, false);
    let wq = mat(GgmlType::Q4_1, hidden, hidden);
    let wk = mat(GgmlType::Q4_1, kv, hidden);
    let wv = mat(GgmlType::Q8_0, kv, hidden);
    let wo = mat(GgmlType::Q4_0, hidden, hidden);
    let gate = mat(GgmlType::Q4_1, ffn, hidden);
    let up = mat(GgmlType::Q4_1, ffn, hidden);
    let down = mat(GgmlType::Q4_1, hidden, ffn);
    let lm_head = mat(GgmlType::Q8_0, vocab, hidden);
    let ones = |n: usize| upload_f64(&dev, "norm", DType::F32, &[n], &vec![1.0; n]);
    let (attn_norm, ffn_norm, out_norm) = (ones(hidden), ones(hidden), ones(hidden));
    let alloc = |label: &str, n: usize| {
        dev.alloc_labelled(label, DType::F32, &[1, n], StorageMode::Auto)
            .unwrap()
    };
    let x = alloc("x", hidden);
    let qkv = alloc("qkv", hidden + 2 * kv);
    let h = alloc("h", hidden);
    let act = alloc("act", ffn);
    let x2 = alloc("x2", hidden);
    let logits = alloc("logits", vocab);
    // "Attention" is the identity on q here: its output is the q part of qkv.
    let attn = qkv.slice(0..hidden).unwrap().reshape(&[1, hidden]).unwrap();
    let eps = 1e-5f32;
    let steps = |q: &Queue| -> unibuf::Result<unibuf::Fence> {
        ops::ggml_matvec_norm_into(q, &[&wq.m, &wk.m, &wv.m], &x, &attn_norm, eps, &qkv)?;
        ops::ggml_matvec_add_into(q, &wo.m, &attn, &x, &h)?;
        ops::ggml_swiglu_norm_into(q, &gate.m, &up.m, &h, &ffn_norm, eps, &act)?;
        ops::ggml_matvec_add_into(q, &down.m, &act, &h, &x2)?;
        ops::ggml_matvec_norm_into(q, &[&lm_head.m], &x2, &out_norm, eps, &logits)
    };
    let mut batch = LaunchBatch::new(&dev, "fused decode step");
    batch.push_with(|q| steps(q)).unwrap();
    assert_eq!(batch.len(), 5);
    let outputs = [&qkv, &h, &act, &x2, &logits];
    for replay in 0..3 {
        let xs: Vec<f32> = (0..hidden).map(|_| rng.f32()).collect();
        q.upload(&x, &xs).unwrap();
        for o in outputs {
            poison_nan(&dev, o);
        }
        q.launch_batch(&batch).unwrap();
        let batched: Vec<Vec<f32>> = outputs.iter().map(|o| q.download(o).unwrap()).collect();
        for o in outputs {
            poison_nan(&dev, o);
        }
        steps(&q).unwrap();
        for (i, o) in outputs.iter().enumerate() {
            let eager: Vec<f32> = q.download(o).unwrap();
            assert!(
                eager.iter().all(|v| v.is_finite()),
                "replay {replay}: output {i}"
            );
            assert_eq!(
                batched[i].iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                eager.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "replay {replay}: output {i} of the batch differs from the eager ops"
            );
        }
        // And the first step against the reference (unit norm weights).
        let xr: Vec<f64> = xs.iter().map(|&v| f64::from(v)).collect();
        let n = norm_ref(&xr, &vec![1.0; hidden], hidden, f64::from(eps));
        let mut first = 0;
        for m in [&wq, &wk, &wv] {
            for r in 0..m.m.rows() {
                let (want, mag) = dot_ref(&m.w, r, hidden, &n, 0);
                let g = f64::from(batched[0][first + r]);
                assert!(
                    (g - want).abs() <= norm_tol(hidden, mag),
                    "qkv[{}]",
                    first + r
                );
            }
            first += m.m.rows();
        }
    }
    assert_eq!(
        dev.submission_stats()
            .get("fused decode step")
            .unwrap()
            .count,
        3
    );
}

#[test]
fn ggml_fused_ops_refuse_bad_input() {
    let dev = device();
    let q = dev.queue();
    let mut rng = Rng::new("ggml_fused_bad_input");
    let (rows, cols) = (7usize, 64usize);
    let a = matrix(&dev, &mut rng, GgmlType::Q4_1, rows, cols, false);
    let b = matrix(&dev, &mut rng, GgmlType::Q8_0, 3, cols, false);
    let narrow = matrix(&dev, &mut rng, GgmlType::Q4_0, rows, 32, false);
    let f32s = |shape: &[usize]| {
        let n: usize = shape.iter().product();
        upload_f64(&dev, "buf", DType::F32, shape, &vec![0.5; n])
    };
    let x = f32s(&[2, cols]);
    let nw = f32s(&[cols]);
    let out = f32s(&[2, rows + 3]);
    let is = |r: unibuf::Result<unibuf::Fence>, want: fn(&Error) -> bool, what: &str| match r {
        Err(e) if want(&e) => {}
        Err(e) => panic!("{what}: wrong error {e:?}"),
        Ok(_) => panic!("{what}: accepted"),
    };
    fn invalid(e: &Error) -> bool {
        matches!(e, Error::InvalidArgument { .. })
    }
    fn shape(e: &Error) -> bool {
        matches!(e, Error::ShapeMismatch { .. })
    }
    fn dtype(e: &Error) -> bool {
        matches!(e, Error::DTypeMismatch { .. })
    }

    // ggml_matvec_norm
    let norm = |ms: &[&GgmlMatrix], x: &Buffer, nw: &Buffer, eps: f32, out: &Buffer| {
        ops::ggml_matvec_norm_into(&q, ms, x, nw, eps, out)
    };
    let ab = [&a.m, &b.m];
    norm(&ab, &x, &nw, 1e-5, &out).unwrap();
    is(norm(&[], &x, &nw, 1e-5, &out), invalid, "no matrix");
    assert!(matches!(
        ops::ggml_matvec_norm(&q, &[], &x, &nw, 1e-5),
        Err(Error::InvalidArgument { .. })
    ));
    let four = [&a.m; GGML_MAX_STACKED + 1];
    is(
        norm(&four, &x, &nw, 1e-5, &f32s(&[2, 4 * rows])),
        invalid,
        "4 matrices",
    );
    is(
        norm(&[&a.m, &narrow.m], &x, &nw, 1e-5, &f32s(&[2, 2 * rows])),
        shape,
        "mismatched cols",
    );
    is(
        norm(&ab, &f32s(&[9, cols]), &nw, 1e-5, &f32s(&[9, rows + 3])),
        shape,
        "batch 9",
    );
    is(norm(&ab, &f32s(&[2, 32]), &nw, 1e-5, &out), shape, "x cols");
    is(
        norm(&ab, &f32s(&[1, 2, cols]), &nw, 1e-5, &out),
        shape,
        "x rank 3",
    );
    let int_x = dev
        .from_slice("x", &vec![0i32; 2 * cols], &[2, cols])
        .unwrap();
    is(norm(&ab, &int_x, &nw, 1e-5, &out), invalid, "integer x");
    let f16_nw = upload_f64(&dev, "nw", DType::F16, &[cols], &vec![1.0; cols]);
    is(
        norm(&ab, &x, &f16_nw, 1e-5, &out),
        dtype,
        "norm weight dtype",
    );
    is(
        norm(&ab, &x, &f32s(&[cols + 32]), 1e-5, &out),
        shape,
        "norm weight shape",
    );
    for eps in [f32::NAN, -1e-5, f32::INFINITY] {
        is(norm(&ab, &x, &nw, eps, &out), invalid, "bad eps");
    }
    let f16_out = upload_f64(
        &dev,
        "out",
        DType::F16,
        &[2, rows + 3],
        &vec![0.0; 2 * (rows + 3)],
    );
    is(norm(&ab, &x, &nw, 1e-5, &f16_out), dtype, "out dtype");
    is(
        norm(&ab, &x, &nw, 1e-5, &f32s(&[2, rows])),
        shape,
        "out shape",
    );
    // An output overlapping x.
    let shared = f32s(&[2 * cols]);
    let x_view = shared.reshape(&[2, cols]).unwrap();
    let out_view = shared
        .slice(0..2 * (rows + 3))
        .unwrap()
        .reshape(&[2, rows + 3])
        .unwrap();
    is(
        norm(&ab, &x_view, &nw, 1e-5, &out_view),
        invalid,
        "out overlaps x",
    );

    // ggml_matvec_add
    let residual = f32s(&[2, rows]);
    let add_out = f32s(&[2, rows]);
    ops::ggml_matvec_add_into(&q, &a.m, &x, &residual, &add_out).unwrap();
    let add =
        |x: &Buffer, res: &Buffer, out: &Buffer| ops::ggml_matvec_add_into(&q, &a.m, x, res, out);
    is(
        add(&x, &residual, &residual),
        invalid,
        "out is the residual",
    );
    let both = f32s(&[3 * rows]);
    let res_view = both
        .slice(0..2 * rows)
        .unwrap()
        .reshape(&[2, rows])
        .unwrap();
    let out_part = both
        .slice(rows..3 * rows)
        .unwrap()
        .reshape(&[2, rows])
        .unwrap();
    is(
        add(&x, &res_view, &out_part),
        invalid,
        "out overlaps the residual",
    );
    let f16_res = upload_f64(&dev, "res", DType::F16, &[2, rows], &vec![0.0; 2 * rows]);
    is(add(&x, &f16_res, &add_out), dtype, "residual dtype");
    assert!(matches!(
        ops::ggml_matvec_add(&q, &a.m, &x, &f16_res),
        Err(Error::DTypeMismatch { .. })
    ));
    is(
        add(&x, &f32s(&[1, rows]), &add_out),
        shape,
        "residual shape",
    );
    is(
        add(&x, &residual, &f32s(&[2, rows + 1])),
        shape,
        "add out shape",
    );
    is(
        add(&f32s(&[9, cols]), &f32s(&[9, rows]), &f32s(&[9, rows])),
        shape,
        "add batch 9",
    );
    is(
        add(&f32s(&[2, cols + 32]), &residual, &add_out),
        shape,
        "add x cols",
    );
    is(add(&int_x, &residual, &add_out), invalid, "add integer x");

    // ggml_swiglu_norm
    let act = f32s(&[2, rows]);
    let swiglu = |gate: &Mat, up: &Mat, x: &Buffer, nw: &Buffer, eps: f32, out: &Buffer| {
        ops::ggml_swiglu_norm_into(&q, &gate.m, &up.m, x, nw, eps, out)
    };
    swiglu(&a, &a, &x, &nw, 1e-5, &act).unwrap();
    is(swiglu(&a, &b, &x, &nw, 1e-5, &act), shape, "up rows");
    is(swiglu(&a, &narrow, &x, &nw, 1e-5, &act), shape, "up cols");
    is(
        swiglu(&a, &a, &f32s(&[9, cols]), &nw, 1e-5, &f32s(&[9, rows])),
        shape,
        "swiglu batch 9",
    );
    is(
        swiglu(&a, &a, &x, &f16_nw, 1e-5, &act),
        dtype,
        "swiglu norm weight dtype",
    );
    is(
        swiglu(&a, &a, &x, &f32s(&[32]), 1e-5, &act),
        shape,
        "swiglu norm weight shape",
    );
    is(
        swiglu(&a, &a, &x, &nw, f32::NAN, &act),
        invalid,
        "swiglu eps",
    );
    is(
        swiglu(&a, &a, &x, &nw, 1e-5, &f32s(&[2, rows + 1])),
        shape,
        "swiglu out shape",
    );
    is(
        swiglu(&a, &a, &int_x, &nw, 1e-5, &act),
        invalid,
        "swiglu integer x",
    );
    assert!(matches!(
        ops::ggml_swiglu_norm(&q, &a.m, &b.m, &x, &nw, 1e-5),
        Err(Error::ShapeMismatch { .. })
    ));

    // ggml_dequantize
    let int_out = dev
        .from_slice("out", &vec![0i32; rows * cols], &[rows, cols])
        .unwrap();
    is(
        ops::ggml_dequantize_into(&q, &a.m, &int_out),
        invalid,
        "dequantize to i32",
    );
    is(
        ops::ggml_dequantize_into(&q, &a.m, &f32s(&[rows, cols + 32])),
        shape,
        "dequantize shape",
    );
    assert!(matches!(
        ops::ggml_dequantize(&q, &a.m, DType::U8),
        Err(Error::InvalidArgument { .. })
    ));

    // Nothing refused reached the device: the queue still works and the good calls' outputs
    // are finite.
    q.drain().unwrap();
    for o in [&out, &add_out, &act] {
        assert!(download_f64(&q, o).iter().all(|v| v.is_finite()));
    }
}
