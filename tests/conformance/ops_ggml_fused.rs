//! The fused GGUF block products (`ggml_matvec_norm`, `ggml_matvec_add`, `ggml_swiglu_norm`,
//! `ggml_qkv_rope_append_into`) and `ggml_dequantize` against f64 references computed here: the
//! weights decoded from the ggml layout by `ops_ggml`'s independent decoder, the RMS norm, SiLU,
//! RoPE and the sums all in f64, from the inputs as stored (rounded to their dtype). Outputs
//! are poisoned with NaN first.
//!
//! Tolerances (`U` = 2⁻²⁴, the f32 unit roundoff; `mag` = the sum of the products' magnitudes):
//! - a product of `cols` terms over x as stored: `(cols + 2) U mag`, the bound of an f32 sum;
//! - over the normalised x: `(1.5 cols + 16) U mag`: the sum, plus the f32 error of each
//!   normalised value (the mean of squares, an f32 sum of `cols` terms, moves the scale by at
//!   most half its relative error; `rsqrt` and the two products a few ulp more);
//! - SwiGLU: `1.1 |u| tol(g) + |silu(g)| tol(u) + 8 U |y|` (|silu'| < 1.1, and `exp`, the
//!   division and the product round a few times);
//! - the residual add: the product's bound over `mag + |residual|`;
//! - dequantisation: exact in f32; one rounding to f16 / bf16;
//! - QKV + RoPE + append: each product's bound over the normalised x (above); a rotated pair
//!   `(a, b)` errs by at most `tol(a) + tol(b)` (the rotation is orthogonal) plus RoPE's own
//!   f32 error, `(|a| + |b|) (angle_err + 8 U)` with `angle_err = angle ((2i/d) ln theta + 8) U`
//!   (the f32 inverse frequency and angle, as `ops_attention` derives it); then one rounding to
//!   the output's dtype. Against the two-op sequence (`ggml_matvec_norm` then
//!   `rope_kv_append_into`, the same arithmetic): the products' bound plus `4 U (|a| + |b|)`
//!   (the compiler may contract the rotation's products differently), and one ulp of the
//!   cache dtype.

use crate::ops_ggml::{random_blocks, reference_weights};
use unibuf::ops::{self, GgmlMatrix, RopeStyle, GGML_MAX_BATCH, GGML_MAX_STACKED};
use unibuf::weights::gguf::GgmlType;
use unibuf::{Buffer, DType, Device, Error, LaunchBatch, Queue, StorageMode};
use unibuf_conformance::{
    assert_within, device, distinct_positions, download_f64, poison_nan, poisoned, subnormal_floor,
    unit_roundoff, upload_f64, Rng, F32_ROUNDOFF, NAN_POISON,
};

const FORMATS: [GgmlType; 3] = [GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_1];
const X_DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];
/// The f32 unit roundoff.
const U: f64 = F32_ROUNDOFF;

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

// ---------------------------------------------------------------------------------------------
// ggml_qkv_rope_append_into

/// The bytes of a buffer.
fn bytes_of(q: &Queue, b: &Buffer) -> Vec<u8> {
    q.download::<u8>(&b.cast(DType::U8).unwrap()).unwrap()
}

/// Cache rows of margin on each side of a cache view.
const MARGIN: usize = 2;

/// A `[capacity, kv_heads, head_dim]` cache of `dtype` as rows `MARGIN..MARGIN + capacity` of a
/// NaN-poisoned buffer with `MARGIN` more rows on each side; returns (whole buffer, view).
fn cache_view(
    dev: &Device,
    dtype: DType,
    capacity: usize,
    kv_heads: usize,
    head_dim: usize,
) -> (Buffer, Buffer) {
    let big = dev
        .alloc_labelled(
            "cache",
            dtype,
            &[capacity + 2 * MARGIN, kv_heads, head_dim],
            StorageMode::Auto,
        )
        .unwrap();
    poison_nan(dev, &big);
    let view = big.rows(MARGIN..MARGIN + capacity).unwrap();
    (big, view)
}

/// The f64 reference of one output (`[tokens, rows]`), with per element the bound of the
/// kernels' error against it (`exact`, before the rounding to the output's dtype) and against
/// the two-op sequence (`seq`).
struct Expected {
    value: Vec<f64>,
    exact: Vec<f64>,
    seq: Vec<f64>,
}

/// `W n[t]` for every token, each with its bound over the normalised x.
fn products_ref(m: &Mat, n: &[f64], tokens: usize) -> Expected {
    let (rows, cols) = (m.m.rows(), m.m.cols());
    let mut e = Expected {
        value: Vec::with_capacity(tokens * rows),
        exact: Vec::with_capacity(tokens * rows),
        seq: Vec::with_capacity(tokens * rows),
    };
    for t in 0..tokens {
        for r in 0..rows {
            let (v, mag) = dot_ref(&m.w, r, cols, n, t);
            e.value.push(v);
            e.exact.push(norm_tol(cols, mag));
            e.seq.push(norm_tol(cols, mag));
        }
    }
    e
}

/// The pair `(a, b)` of pair `i` of a head in `style`.
fn pair_of(style: RopeStyle, i: usize, head_dim: usize) -> (usize, usize) {
    match style {
        RopeStyle::Neox => (i, i + head_dim / 2),
        RopeStyle::Interleaved => (2 * i, 2 * i + 1),
    }
}

/// Rotates the products `e` (`[tokens, rows]`, whole heads) at `pos` in f64, the bounds grown
/// by the rotation's (module docs).
fn rope_ref(e: &Expected, pos: &[u32], head_dim: usize, theta: f64, style: RopeStyle) -> Expected {
    let rows = e.value.len() / pos.len();
    let mut out = Expected {
        value: vec![0.0; e.value.len()],
        exact: vec![0.0; e.value.len()],
        seq: vec![0.0; e.value.len()],
    };
    for (t, &p) in pos.iter().enumerate() {
        for head in 0..rows / head_dim {
            for i in 0..head_dim / 2 {
                let (a, b) = pair_of(style, i, head_dim);
                let (a, b) = (
                    t * rows + head * head_dim + a,
                    t * rows + head * head_dim + b,
                );
                let ex = (2 * i) as f64 / head_dim as f64;
                let angle = f64::from(p) * theta.powf(-ex);
                let (s, c) = angle.sin_cos();
                let (ya, yb) = (e.value[a], e.value[b]);
                out.value[a] = ya * c - yb * s;
                out.value[b] = yb * c + ya * s;
                let angle_err = angle * (ex * theta.ln() + 8.0) * U;
                let mag = ya.abs() + yb.abs();
                let exact = e.exact[a] + e.exact[b] + mag * (angle_err + 8.0 * U);
                let seq = e.seq[a] + e.seq[b] + 4.0 * U * mag;
                for j in [a, b] {
                    out.exact[j] = exact;
                    out.seq[j] = seq;
                }
            }
        }
    }
    out
}

/// `got` against the two-op sequence's `seq`: within `err[i]` plus one ulp of `dtype`.
fn assert_near(what: &str, dtype: DType, got: &[f64], seq: &[f64], err: &[f64]) {
    assert_eq!(got.len(), seq.len(), "{what}: length");
    let u = unit_roundoff(dtype);
    for (i, (&g, &w)) in got.iter().zip(seq).enumerate() {
        let tol = err[i] * 1.01 + 2.0 * u * (w.abs() + err[i]) + 2.0 * subnormal_floor(dtype);
        assert!(
            (g - w).abs() <= tol,
            "{what}: element {i} of {}: fused {g}, two-op sequence {w} (tolerance {tol:e})",
            got.len()
        );
    }
}

/// One geometry of the QKV + RoPE + append tests.
#[derive(Clone, Copy, Debug)]
struct QkvCase {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    cols: usize,
    capacity: usize,
}

/// How one run of a case lays out its inputs and what it computes.
#[derive(Clone, Copy, Debug)]
struct QkvRun {
    formats: [GgmlType; 3],
    xd: DType,
    cd: DType,
    style: RopeStyle,
    theta: f32,
    eps: f32,
    /// Matrices at odd byte offsets.
    odd: bool,
    /// x, the norm weight and q_out one element into larger allocations.
    offset: bool,
    /// x as `[cols]` (one token).
    vector: bool,
}

/// The inputs of a QKV call, on the device and as the reference reads them.
struct QkvInputs {
    wq: Mat,
    wk: Mat,
    wv: Mat,
    x: Buffer,
    nw: Buffer,
    xr: Vec<f64>,
    nwr: Vec<f64>,
}

fn qkv_inputs(dev: &Device, rng: &mut Rng, c: &QkvCase, r: &QkvRun, tokens: usize) -> QkvInputs {
    let q = dev.queue();
    let (qr, kvr) = (c.heads * c.head_dim, c.kv_heads * c.head_dim);
    let wq = matrix(dev, rng, r.formats[0], qr, c.cols, r.odd);
    let wk = matrix(dev, rng, r.formats[1], kvr, c.cols, r.odd);
    let wv = matrix(dev, rng, r.formats[2], kvr, c.cols, r.odd);
    let xs: Vec<f64> = (0..tokens * c.cols).map(|_| f64::from(rng.f32())).collect();
    let nws: Vec<f64> = (0..c.cols)
        .map(|_| 1.0 + 0.5 * f64::from(rng.f32()))
        .collect();
    let x = float_input(
        dev,
        r.xd,
        &shape_of(tokens, c.cols, r.vector),
        &xs,
        r.offset,
    );
    let nw = float_input(dev, r.xd, &[c.cols], &nws, r.offset);
    let (xr, nwr) = (download_f64(&q, &x), download_f64(&q, &nw));
    QkvInputs {
        wq,
        wk,
        wv,
        x,
        nw,
        xr,
        nwr,
    }
}

/// The references of q_out, the k rows and the v rows (`[tokens, rows]` each) for the rows `xr`
/// of x (as stored) at `pos`.
fn qkv_ref(inp: &QkvInputs, xr: &[f64], c: &QkvCase, r: &QkvRun, pos: &[u32]) -> [Expected; 3] {
    let n = norm_ref(xr, &inp.nwr, c.cols, f64::from(r.eps));
    let t = pos.len();
    let theta = f64::from(r.theta);
    [
        rope_ref(
            &products_ref(&inp.wq, &n, t),
            pos,
            c.head_dim,
            theta,
            r.style,
        ),
        rope_ref(
            &products_ref(&inp.wk, &n, t),
            pos,
            c.head_dim,
            theta,
            r.style,
        ),
        products_ref(&inp.wv, &n, t),
    ]
}

/// Checks the caches (whole buffers, `MARGIN` rows around the view) after a call at `pos`:
/// each row at a valid position holds its token's reference, every other row is untouched
/// (compared with `before`, the bytes before the call). Returns the rows of the big buffers
/// each token wrote.
#[allow(clippy::too_many_arguments)]
fn check_caches(
    what: &str,
    q: &Queue,
    (k_big, v_big): (&Buffer, &Buffer),
    before: (&[u8], &[u8]),
    want: (&Expected, &Expected),
    pos: &[u32],
    capacity: usize,
    row: usize,
) {
    let cd = k_big.dtype();
    let (got_k, got_v) = (download_f64(q, k_big), download_f64(q, v_big));
    let (k_bytes, v_bytes) = (bytes_of(q, k_big), bytes_of(q, v_big));
    let row_bytes = row * cd.size();
    let mut written = vec![false; capacity + 2 * MARGIN];
    for (t, &p) in pos.iter().enumerate() {
        let p = p as usize;
        if p >= capacity {
            continue;
        }
        let r = MARGIN + p;
        written[r] = true;
        let (src, dst) = (t * row..(t + 1) * row, r * row..(r + 1) * row);
        assert_within(
            &format!("{what}: k_cache row {p}"),
            cd,
            &got_k[dst.clone()],
            &want.0.value[src.clone()],
            &want.0.exact[src.clone()],
        );
        assert_within(
            &format!("{what}: v_cache row {p}"),
            cd,
            &got_v[dst],
            &want.1.value[src.clone()],
            &want.1.exact[src],
        );
    }
    for (r, &w) in written.iter().enumerate() {
        if !w {
            let span = r * row_bytes..(r + 1) * row_bytes;
            assert!(
                k_bytes[span.clone()] == before.0[span.clone()]
                    && v_bytes[span.clone()] == before.1[span],
                "{what}: buffer row {r} (cache row {}) was written",
                r as isize - MARGIN as isize
            );
        }
    }
}

/// Runs `ggml_qkv_rope_append_into` on fresh inputs at `pos` (some possibly past the capacity)
/// and checks everything it writes against the f64 reference and the two-op sequence, and
/// that it writes nothing else.
fn check_qkv(dev: &Device, rng: &mut Rng, c: &QkvCase, r: &QkvRun, pos: &[u32]) {
    let q = dev.queue();
    let t = pos.len();
    let (h, kvh, d, cap) = (c.heads, c.kv_heads, c.head_dim, c.capacity);
    let what = format!("qkv_rope_append {c:?} {r:?} positions {pos:?}");
    let inp = qkv_inputs(dev, rng, c, r, t);
    let positions = dev.from_slice("positions", pos, &[t]).unwrap();
    let q_out = output(dev, &[t, h, d], r.offset);
    let (k_big, k_cache) = cache_view(dev, r.cd, cap, kvh, d);
    let (v_big, v_cache) = cache_view(dev, r.cd, cap, kvh, d);
    let fence = ops::ggml_qkv_rope_append_into(
        &q, &inp.wq.m, &inp.wk.m, &inp.wv.m, &inp.x, &inp.nw, r.eps, &positions, r.theta, r.style,
        &q_out, &k_cache, &v_cache,
    )
    .unwrap_or_else(|e| panic!("{what}: {e}"));
    q.wait(fence).unwrap();

    let [want_q, want_k, want_v] = qkv_ref(&inp, &inp.xr, c, r, pos);
    let got_q = download_f64(&q, &q_out);
    assert_within(
        &format!("{what}: q_out"),
        DType::F32,
        &got_q,
        &want_q.value,
        &want_q.exact,
    );
    let poison = vec![NAN_POISON; (cap + 2 * MARGIN) * kvh * d * r.cd.size()];
    check_caches(
        &what,
        &q,
        (&k_big, &v_big),
        (&poison, &poison),
        (&want_k, &want_v),
        pos,
        cap,
        kvh * d,
    );

    // The two-op sequence: the three products (ggml_matvec_norm), then rope_kv_append_into.
    let product = |m: &Mat, heads: usize| {
        ops::ggml_matvec_norm(&q, &[&m.m], &inp.x, &inp.nw, r.eps)
            .unwrap()
            .reshape(&[t, heads, d])
            .unwrap()
    };
    let (yq, yk, yv) = (
        product(&inp.wq, h),
        product(&inp.wk, kvh),
        product(&inp.wv, kvh),
    );
    let q_seq = poisoned(dev, DType::F32, &[t, h, d]);
    let (k_seq_big, k_seq) = cache_view(dev, r.cd, cap, kvh, d);
    let (v_seq_big, v_seq) = cache_view(dev, r.cd, cap, kvh, d);
    ops::rope_kv_append_into(
        &q, &yq, &yk, &yv, &positions, r.theta, r.style, &q_seq, &k_seq, &v_seq,
    )
    .unwrap();
    assert_near(
        &format!("{what}: q_out"),
        DType::F32,
        &got_q,
        &download_f64(&q, &q_seq),
        &want_q.seq,
    );
    let row = kvh * d;
    for (big, seq_big, want, name) in [
        (&k_big, &k_seq_big, &want_k, "k_cache"),
        (&v_big, &v_seq_big, &want_v, "v_cache"),
    ] {
        let (got, seq) = (download_f64(&q, big), download_f64(&q, seq_big));
        for (ti, &p) in pos.iter().enumerate() {
            let p = p as usize;
            if p < cap {
                let rows = (MARGIN + p) * row..(MARGIN + p + 1) * row;
                assert_near(
                    &format!("{what}: {name} row {p}"),
                    r.cd,
                    &got[rows.clone()],
                    &seq[rows],
                    &want.seq[ti * row..(ti + 1) * row],
                );
            }
        }
    }
}

#[test]
fn ggml_qkv_rope_append_matches_the_f64_reference_and_the_two_op_sequence() {
    let dev = device();
    let mut rng = Rng::new("ggml_qkv_rope_append");
    let case = |heads, kv_heads, head_dim, cols, capacity| QkvCase {
        heads,
        kv_heads,
        head_dim,
        cols,
        capacity,
    };
    // (case, every format rotation or only one per combination)
    let cases = [
        // SmolLM2-135M: hidden 576, 9 q heads and 3 kv heads of 64.
        (case(9, 3, 64, 576, 40), false),
        (case(4, 4, 2, 64, 9), true),
        (case(2, 1, 128, 128, 12), true),
        (case(2, 1, 2, 32, 8), true),
        // 8 tokens of 1088: more than the kernels keep in shared memory (x normalised as read).
        (case(2, 1, 64, 1088, 16), false),
    ];
    let tokens = [1usize, 3, GGML_MAX_BATCH];
    for (ci, &(c, all)) in cases.iter().enumerate() {
        for f in 0..3 {
            for j in 0..9 {
                if !all && j % 3 != f {
                    continue;
                }
                let k = j + f + ci;
                let t = tokens[(j + f) % 3];
                let style = if k % 2 == 0 {
                    RopeStyle::Neox
                } else {
                    RopeStyle::Interleaved
                };
                let run = QkvRun {
                    formats: [FORMATS[f], FORMATS[(f + 1) % 3], FORMATS[(f + 2) % 3]],
                    xd: X_DTYPES[j / 3],
                    cd: X_DTYPES[j % 3],
                    style,
                    theta: if style == RopeStyle::Neox { 1e4 } else { 5e5 },
                    eps: EPS[j % 3],
                    odd: k % 5 == 2,
                    offset: j % 4 == 1,
                    vector: t == 1 && j % 2 == 0,
                };
                // Distinct positions in random order; some at or past the capacity.
                let mut pos = distinct_positions(&mut rng, t, c.capacity);
                match k % 4 {
                    1 => pos[0] = c.capacity as u32,
                    3 => pos[t - 1] = u32::MAX,
                    _ => {}
                }
                check_qkv(&dev, &mut rng, &c, &run, &pos);
            }
        }
    }
    // Large positions: the f32 angle's error grows with them.
    let c = case(9, 3, 64, 576, 8192);
    for (i, style) in [RopeStyle::Neox, RopeStyle::Interleaved]
        .into_iter()
        .enumerate()
    {
        let run = QkvRun {
            formats: [GgmlType::Q4_1; 3],
            xd: X_DTYPES[i],
            cd: X_DTYPES[2 - i],
            style,
            theta: 1e4,
            eps: 1e-5,
            odd: false,
            offset: false,
            vector: false,
        };
        check_qkv(&dev, &mut rng, &c, &run, &[8191, 0, 4097]);
    }
}

/// The decoder's use: the step recorded once into a launch batch and replayed, the positions
/// buffer (and x) rewritten between replays. Each replay writes the cache rows its positions
/// name and nothing else (earlier rows keep what earlier replays wrote), and equals the op
/// launched directly, bit for bit.
#[test]
fn ggml_qkv_rope_append_in_a_launch_batch_follows_the_positions_buffer() {
    let dev = device();
    let q = dev.queue();
    let mut rng = Rng::new("ggml_qkv_rope_append_batch");
    // SmolLM2-135M's attention block: Q4_1, the GGUF rows permuted for the interleaved style.
    let c = QkvCase {
        heads: 9,
        kv_heads: 3,
        head_dim: 64,
        cols: 576,
        capacity: 48,
    };
    let (h, kvh, d, cap) = (c.heads, c.kv_heads, c.head_dim, c.capacity);
    for (tokens, steps) in [
        (
            1usize,
            vec![vec![0u32], vec![1], vec![2], vec![47], vec![48], vec![3]],
        ),
        (
            3,
            vec![
                vec![0, 1, 2],
                vec![3, 4, 5],
                vec![6, 48, 7],
                vec![20, 10, 30],
            ],
        ),
    ] {
        let run = QkvRun {
            formats: [GgmlType::Q4_1; 3],
            xd: DType::F32,
            cd: DType::F16,
            style: RopeStyle::Interleaved,
            theta: 1e5,
            eps: 1e-5,
            odd: false,
            offset: false,
            vector: false,
        };
        let inp = qkv_inputs(&dev, &mut rng, &c, &run, tokens);
        let alloc = |dtype, shape: &[usize]| dev.alloc(dtype, shape, StorageMode::Private).unwrap();
        let x = alloc(DType::F32, &[tokens, c.cols]);
        let positions = alloc(DType::U32, &[tokens]);
        let q_out = alloc(DType::F32, &[tokens, h, d]);
        let (k_big, k_cache) = cache_view(&dev, run.cd, cap, kvh, d);
        let (v_big, v_cache) = cache_view(&dev, run.cd, cap, kvh, d);
        let op = |rq: &Queue| {
            ops::ggml_qkv_rope_append_into(
                rq, &inp.wq.m, &inp.wk.m, &inp.wv.m, &x, &inp.nw, run.eps, &positions, run.theta,
                run.style, &q_out, &k_cache, &v_cache,
            )
        };
        let label = format!("qkv step {tokens}");
        let mut batch = LaunchBatch::new(&dev, &label);
        batch.push_with(|rq| op(rq)).unwrap();
        assert_eq!(batch.len(), 1, "one launch");
        for (step, pos) in steps.iter().enumerate() {
            let what = format!("{tokens} tokens, replay {step} at {pos:?}");
            let xs: Vec<f32> = (0..tokens * c.cols).map(|_| rng.f32()).collect();
            q.upload(&x, &xs).unwrap();
            q.upload(&positions, pos).unwrap();
            poison_nan(&dev, &q_out);
            let before = (bytes_of(&q, &k_big), bytes_of(&q, &v_big));
            q.launch_batch(&batch).unwrap();
            let replayed = [
                bytes_of(&q, &q_out),
                bytes_of(&q, &k_big),
                bytes_of(&q, &v_big),
            ];
            let xr: Vec<f64> = xs.iter().map(|&v| f64::from(v)).collect();
            let [want_q, want_k, want_v] = qkv_ref(&inp, &xr, &c, &run, pos);
            assert_within(
                &format!("{what}: q_out"),
                DType::F32,
                &download_f64(&q, &q_out),
                &want_q.value,
                &want_q.exact,
            );
            check_caches(
                &what,
                &q,
                (&k_big, &v_big),
                (&before.0, &before.1),
                (&want_k, &want_v),
                pos,
                cap,
                kvh * d,
            );
            // The op launched directly gives the same bytes.
            poison_nan(&dev, &q_out);
            q.wait(op(&q).unwrap()).unwrap();
            let direct = [
                bytes_of(&q, &q_out),
                bytes_of(&q, &k_big),
                bytes_of(&q, &v_big),
            ];
            assert!(replayed == direct, "{what}: the replay differs from the op");
        }
        assert_eq!(
            dev.submission_stats().get(label.as_str()).unwrap().count,
            steps.len() as u64
        );
    }
}

/// The arguments of one `ggml_qkv_rope_append_into` call, so that each bad-input case changes
/// one of them.
#[derive(Clone, Copy)]
struct QkvArgs<'a> {
    wq: &'a GgmlMatrix,
    wk: &'a GgmlMatrix,
    wv: &'a GgmlMatrix,
    x: &'a Buffer,
    nw: &'a Buffer,
    eps: f32,
    positions: &'a Buffer,
    theta: f32,
    q_out: &'a Buffer,
    k_cache: &'a Buffer,
    v_cache: &'a Buffer,
}

impl QkvArgs<'_> {
    fn run(&self, q: &Queue) -> unibuf::Result<unibuf::Fence> {
        ops::ggml_qkv_rope_append_into(
            q,
            self.wq,
            self.wk,
            self.wv,
            self.x,
            self.nw,
            self.eps,
            self.positions,
            self.theta,
            RopeStyle::Interleaved,
            self.q_out,
            self.k_cache,
            self.v_cache,
        )
    }
}

#[test]
fn ggml_qkv_rope_append_refuses_bad_input() {
    let dev = device();
    let q = dev.queue();
    let mut rng = Rng::new("ggml_qkv_rope_append_bad_input");
    // 4 heads and 2 kv heads of 8, 64 columns, 2 tokens, 16 cache rows.
    let (heads, kvh, d, cols, cap) = (4usize, 2usize, 8usize, 64usize, 16usize);
    let mut mat = |ty, rows, cols| matrix(&dev, &mut rng, ty, rows, cols, false).m;
    let wq = mat(GgmlType::Q4_1, heads * d, cols);
    let wk = mat(GgmlType::Q8_0, kvh * d, cols);
    let wv = mat(GgmlType::Q4_0, kvh * d, cols);
    let narrow = mat(GgmlType::Q4_1, kvh * d, 32);
    let short = mat(GgmlType::Q4_1, d, cols);
    let ragged = mat(GgmlType::Q4_1, 20, cols);
    let three_heads = mat(GgmlType::Q4_1, 3 * d, cols);
    let buf = |dtype: DType, shape: &[usize]| {
        let n: usize = shape.iter().product();
        upload_f64(&dev, "buf", dtype, shape, &vec![0.5; n])
    };
    let f32s = |shape: &[usize]| buf(DType::F32, shape);
    let x = f32s(&[2, cols]);
    let nw = f32s(&[cols]);
    let positions = dev.from_slice("positions", &[3u32, 4], &[2]).unwrap();
    let q_out = f32s(&[2, heads, d]);
    let kc = buf(DType::F16, &[cap, kvh, d]);
    let vc = buf(DType::F16, &[cap, kvh, d]);
    let base = QkvArgs {
        wq: &wq,
        wk: &wk,
        wv: &wv,
        x: &x,
        nw: &nw,
        eps: 1e-5,
        positions: &positions,
        theta: 1e4,
        q_out: &q_out,
        k_cache: &kc,
        v_cache: &vc,
    };
    base.run(&q).unwrap();
    let is = |args: QkvArgs<'_>, want: fn(&Error) -> bool, what: &str| match args.run(&q) {
        Err(e) if want(&e) => e,
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
    fn wrong_device(e: &Error) -> bool {
        matches!(e, Error::WrongDevice { .. })
    }
    let mentions = |e: Error, text: &str| {
        assert!(
            e.to_string().contains(text),
            "'{e}' should mention '{text}'"
        );
    };

    // The matrices.
    is(
        QkvArgs {
            wk: &narrow,
            ..base
        },
        shape,
        "wk cols",
    );
    is(
        QkvArgs {
            wv: &narrow,
            ..base
        },
        shape,
        "wv cols",
    );
    is(QkvArgs { wv: &short, ..base }, shape, "wv rows");
    is(
        QkvArgs {
            wk: &short,
            wv: &short,
            ..base
        },
        shape,
        "wk rows against the caches",
    );
    is(
        QkvArgs {
            wq: &ragged,
            ..base
        },
        shape,
        "wq rows not whole heads",
    );
    let three = f32s(&[2, 3, d]);
    let e = is(
        QkvArgs {
            wq: &three_heads,
            q_out: &three,
            ..base
        },
        invalid,
        "3 heads over 2 kv heads",
    );
    mentions(e, "not a multiple of kv_heads = 2");
    // x and the norm.
    let int_x = dev
        .from_slice("x", &vec![0i32; 2 * cols], &[2, cols])
        .unwrap();
    is(QkvArgs { x: &int_x, ..base }, invalid, "integer x");
    is(
        QkvArgs {
            x: &f32s(&[2, 32]),
            ..base
        },
        shape,
        "x cols",
    );
    let nine = (
        f32s(&[9, cols]),
        dev.from_slice("p", &[0u32; 9], &[9]).unwrap(),
    );
    let nine_out = f32s(&[9, heads, d]);
    is(
        QkvArgs {
            x: &nine.0,
            positions: &nine.1,
            q_out: &nine_out,
            ..base
        },
        shape,
        "9 tokens",
    );
    is(
        QkvArgs {
            x: &f32s(&[1, 2, cols]),
            ..base
        },
        shape,
        "x rank 3",
    );
    let f16_nw = buf(DType::F16, &[cols]);
    is(
        QkvArgs {
            nw: &f16_nw,
            ..base
        },
        dtype,
        "norm weight dtype",
    );
    is(
        QkvArgs {
            nw: &f32s(&[32]),
            ..base
        },
        shape,
        "norm weight shape",
    );
    for eps in [f32::NAN, -1e-5, f32::INFINITY] {
        mentions(is(QkvArgs { eps, ..base }, invalid, "bad eps"), "eps");
    }
    // Positions and theta.
    let i32_pos = dev.from_slice("positions", &[3i32, 4], &[2]).unwrap();
    is(
        QkvArgs {
            positions: &i32_pos,
            ..base
        },
        dtype,
        "positions dtype",
    );
    let three_pos = dev.from_slice("positions", &[3u32, 4, 5], &[3]).unwrap();
    is(
        QkvArgs {
            positions: &three_pos,
            ..base
        },
        shape,
        "positions shape",
    );
    for theta in [0.0, -1.0, f32::NAN, f32::INFINITY] {
        mentions(
            is(QkvArgs { theta, ..base }, invalid, "bad theta"),
            "theta_base",
        );
    }
    // q_out.
    let f16_out = buf(DType::F16, &[2, heads, d]);
    is(
        QkvArgs {
            q_out: &f16_out,
            ..base
        },
        dtype,
        "q_out dtype",
    );
    is(
        QkvArgs {
            q_out: &f32s(&[2, heads * d]),
            ..base
        },
        shape,
        "q_out rank 2",
    );
    is(
        QkvArgs {
            q_out: &f32s(&[2, heads, d + 2]),
            ..base
        },
        shape,
        "q_out shape",
    );
    // The caches.
    let int_cache = dev
        .from_slice("cache", &vec![0i32; cap * kvh * d], &[cap, kvh, d])
        .unwrap();
    is(
        QkvArgs {
            k_cache: &int_cache,
            v_cache: &int_cache,
            ..base
        },
        invalid,
        "integer caches",
    );
    let flat = buf(DType::F16, &[cap, kvh * d]);
    is(
        QkvArgs {
            k_cache: &flat,
            v_cache: &flat,
            ..base
        },
        shape,
        "caches of rank 2",
    );
    let bf16_vc = buf(DType::BF16, &[cap, kvh, d]);
    is(
        QkvArgs {
            v_cache: &bf16_vc,
            ..base
        },
        dtype,
        "v_cache dtype",
    );
    let short_vc = buf(DType::F16, &[cap - 1, kvh, d]);
    is(
        QkvArgs {
            v_cache: &short_vc,
            ..base
        },
        shape,
        "v_cache shape",
    );
    for (dim, text) in [(7usize, "head_dim = 7"), (258, "head_dim = 258")] {
        let c = buf(DType::F16, &[cap, 1, dim]);
        mentions(
            is(
                QkvArgs {
                    k_cache: &c,
                    v_cache: &c,
                    ..base
                },
                invalid,
                text,
            ),
            text,
        );
    }
    for empty in [[0usize, kvh, d], [cap, 0, d], [cap, kvh, 0]] {
        let c = dev.alloc(DType::F16, &empty, StorageMode::Auto).unwrap();
        is(
            QkvArgs {
                k_cache: &c,
                v_cache: &c,
                ..base
            },
            invalid,
            "empty caches",
        );
    }
    // Written buffers overlapping another argument: the caches with each other, q_out with x,
    // q_out with the k cache (views of one f32 allocation).
    mentions(
        is(
            QkvArgs {
                v_cache: &kc,
                ..base
            },
            invalid,
            "one cache for both",
        ),
        "overlaps",
    );
    let shared = f32s(&[2 * cols]);
    let x_view = shared.reshape(&[2, cols]).unwrap();
    let out_view = shared
        .slice(0..2 * heads * d)
        .unwrap()
        .reshape(&[2, heads, d])
        .unwrap();
    mentions(
        is(
            QkvArgs {
                x: &x_view,
                q_out: &out_view,
                ..base
            },
            invalid,
            "q_out overlaps x",
        ),
        "overlaps",
    );
    let f32_caches = f32s(&[2 * cap + 4, kvh, d]);
    let (k_view, v_view) = (
        f32_caches.rows(0..cap).unwrap(),
        f32_caches.rows(cap..2 * cap).unwrap(),
    );
    let rows_out = |rows: std::ops::Range<usize>| {
        f32_caches
            .rows(rows)
            .unwrap()
            .reshape(&[2, heads, d])
            .unwrap()
    };
    // Disjoint views of one allocation are fine; overlapping ones are not (q_out takes 4 rows).
    let disjoint = rows_out(2 * cap..2 * cap + 4);
    QkvArgs {
        q_out: &disjoint,
        k_cache: &k_view,
        v_cache: &v_view,
        ..base
    }
    .run(&q)
    .unwrap();
    let overlapping = rows_out(2 * cap - 2..2 * cap + 2);
    mentions(
        is(
            QkvArgs {
                q_out: &overlapping,
                k_cache: &k_view,
                v_cache: &v_view,
                ..base
            },
            invalid,
            "q_out overlaps the v cache",
        ),
        "overlaps",
    );
    // Another device's buffers.
    let other = device();
    let foreign = |dtype, shape: &[usize]| other.alloc(dtype, shape, StorageMode::Auto).unwrap();
    let foreign_x = foreign(DType::F32, &[2, cols]);
    is(
        QkvArgs {
            x: &foreign_x,
            ..base
        },
        wrong_device,
        "x",
    );
    let foreign_vc = foreign(DType::F16, &[cap, kvh, d]);
    is(
        QkvArgs {
            v_cache: &foreign_vc,
            ..base
        },
        wrong_device,
        "v_cache",
    );
    let foreign_pos = foreign(DType::U32, &[2]);
    is(
        QkvArgs {
            positions: &foreign_pos,
            ..base
        },
        wrong_device,
        "positions",
    );
    let foreign_wv = {
        let mut rng = Rng::new("ggml_qkv_rope_append_bad_input_foreign");
        matrix(&other, &mut rng, GgmlType::Q4_0, kvh * d, cols, false).m
    };
    is(
        QkvArgs {
            wv: &foreign_wv,
            ..base
        },
        wrong_device,
        "wv",
    );

    // Nothing refused reached the device: the queue still works, the good calls' outputs are
    // finite.
    q.drain().unwrap();
    assert!(download_f64(&q, &q_out).iter().all(|v| v.is_finite()));
    assert!(download_f64(&q, &disjoint).iter().all(|v| v.is_finite()));
}
