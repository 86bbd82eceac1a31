//! RoPE fused with the KV-cache append, and grouped-query attention over the caches, against f64
//! references written here from the formulas (RoPE from the angle `pos * theta^(-2i / d)`,
//! attention as `softmax(scale * q . k) v` over the cache rows `0..=pos`), on fresh random
//! inputs, in every combination of the query dtype and the cache dtype.
//!
//! Outputs are poisoned with NaN first, so that an element the kernels never write fails, and
//! the caches are views into bigger poisoned buffers, so that a write outside the rows the
//! positions name shows up. Cache rows past the longest row a call attends to hold NaN: a read
//! past a row's causal range turns its output into NaN.
//!
//! Tolerances are bounds of the f32 arithmetic (unit roundoff u = 2^-24) plus one rounding to
//! the output's dtype:
//! - RoPE: the angle `pos * inv_freq` carries the f32 error of `inv_freq = theta^(-2i/d)` (the
//!   exponent's rounding times `(2i/d) ln theta`, and a few ulps of pow), so its error is
//!   `angle * ((2i/d) ln theta + 8) u`; sin and cos add a few u; the rotated value errs by that
//!   times `|x_a| + |x_b|`.
//! - Attention: each score `scale * q . k` (computed in log2 units) errs by at most about
//!   `(d + 4) u` times `scale * sum |q_i k_i|`, so each softmax weight by a relative
//!   `eps = ((d + 16) * that + 16) u` (with the exponentials' and the split merge's errors), which
//!   moves the weighted mean by at most `2 eps max|v|`; the f32 sums over `n` keys add
//!   `4 (n + 8) u max|v|`.

use half::{bf16, f16};
use unibuf::ops::{self, RopeStyle};
use unibuf::{Buffer, DType, Device, Error, LaunchBatch, Queue, StorageMode};
use unibuf_conformance::{
    alloc, assert_dtype_mismatch, assert_invalid, assert_shape_mismatch, assert_within, device,
    distinct_positions, download_f64, poison_nan, poisoned, upload_f64, Rng, F32_ROUNDOFF,
    NAN_POISON,
};

const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

const U32: f64 = F32_ROUNDOFF;

/// `v` rounded to `dtype` (to nearest even), widened back.
///
/// Through f32: `half`'s f64 conversions drop the low 32 bits of the mantissa before rounding,
/// so a value of f32 precision exactly halfway between two bf16 values can round the other way
/// from the kernels' (correctly rounded) f32 conversion.
fn stored(v: f64, dtype: DType) -> f64 {
    let v = v as f32;
    match dtype {
        DType::F32 => f64::from(v),
        DType::F16 => f16::from_f32(v).to_f64(),
        _ => bf16::from_f32(v).to_f64(),
    }
}

/// `n` random values in [-scale, scale), each exactly representable in `dtype`.
fn values(rng: &mut Rng, n: usize, scale: f64, dtype: DType) -> Vec<f64> {
    (0..n)
        .map(|_| stored(f64::from(rng.f32()) * scale, dtype))
        .collect()
}

/// The bytes of a buffer.
fn bytes(q: &Queue, b: &Buffer) -> Vec<u8> {
    q.download::<u8>(&b.cast(DType::U8).expect("cast"))
        .expect("download")
}

/// A `[capacity, kv_heads, head_dim]` cache of `dtype` as rows `MARGIN..MARGIN + capacity` of a
/// NaN-poisoned buffer with `MARGIN` more rows on each side; returns (whole buffer, view).
const MARGIN: usize = 2;
fn cache_view(dev: &Device, dtype: DType, capacity: usize, row: [usize; 2]) -> (Buffer, Buffer) {
    let big = dev
        .alloc_labelled(
            "cache",
            dtype,
            &[capacity + 2 * MARGIN, row[0], row[1]],
            StorageMode::Auto,
        )
        .expect("alloc");
    poison_nan(dev, &big);
    let view = big.rows(MARGIN..MARGIN + capacity).expect("rows");
    (big, view)
}

/// Rotates `x` (`[tokens, heads, head_dim]`) at `pos` in f64; returns the rotation and, per
/// element, the bound of the f32 computation's error (before rounding to the output).
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
    let mut err = vec![0.0; x.len()];
    for (r, xh) in x.chunks_exact(head_dim).enumerate() {
        let p = f64::from(pos[r / heads]);
        for i in 0..half {
            let e = (2 * i) as f64 / head_dim as f64;
            let angle = p * theta.powf(-e);
            let (s, c) = angle.sin_cos();
            let (a, b) = match style {
                RopeStyle::Neox => (i, i + half),
                RopeStyle::Interleaved => (2 * i, 2 * i + 1),
            };
            let base = r * head_dim;
            y[base + a] = xh[a] * c - xh[b] * s;
            y[base + b] = xh[b] * c + xh[a] * s;
            let angle_err = angle * (e * theta.ln() + 8.0) * U32;
            let bound = (xh[a].abs() + xh[b].abs()) * (angle_err + 8.0 * U32);
            err[base + a] = bound;
            err[base + b] = bound;
        }
    }
    (y, err)
}

/// One geometry of the RoPE + append tests.
struct RopeCase {
    tokens: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    capacity: usize,
}

/// Runs `rope_kv_append_into` on fresh inputs with `pos` (some possibly past the capacity) and
/// checks everything it writes and everything it must not.
#[allow(clippy::too_many_arguments)]
fn check_rope_kv_append(
    dev: &Device,
    rng: &mut Rng,
    qd: DType,
    cd: DType,
    c: &RopeCase,
    pos: &[u32],
    theta: f32,
    style: RopeStyle,
) {
    let q = dev.queue();
    let (t, h, kvh, d, cap) = (c.tokens, c.heads, c.kv_heads, c.head_dim, c.capacity);
    let what = format!(
        "rope_kv_append {qd}/{cd} tokens {t} heads {h}/{kvh} head_dim {d} capacity {cap} \
         {style:?} positions {pos:?}"
    );
    let qv = values(rng, t * h * d, 4.0, qd);
    let kv = values(rng, t * kvh * d, 4.0, qd);
    let vv = values(rng, t * kvh * d, 4.0, qd);
    let query = upload_f64(dev, "query", qd, &[t, h, d], &qv);
    let key = upload_f64(dev, "key", qd, &[t, kvh, d], &kv);
    let value = upload_f64(dev, "value", qd, &[t, kvh, d], &vv);
    let positions = dev.from_slice("positions", pos, &[t]).expect("upload");
    let query_out = poisoned(dev, qd, &[t, h, d]);
    let (k_big, k_cache) = cache_view(dev, cd, cap, [kvh, d]);
    let (v_big, v_cache) = cache_view(dev, cd, cap, [kvh, d]);
    let fence = ops::rope_kv_append_into(
        &q, &query, &key, &value, &positions, theta, style, &query_out, &k_cache, &v_cache,
    )
    .expect("rope_kv_append_into");
    q.wait(fence).expect("wait");

    // The query: the f64 rotation, and bit for bit what ops::rope gives (same arithmetic).
    let theta64 = f64::from(theta);
    let (want_q, err_q) = rope_ref(&qv, pos, h, d, theta64, style);
    let got_q = download_f64(&q, &query_out);
    assert_within(&format!("{what}: query_out"), qd, &got_q, &want_q, &err_q);
    let roped = ops::rope(&q, &query, &positions, theta, style).expect("rope");
    assert_eq!(
        bytes(&q, &query_out),
        bytes(&q, &roped),
        "{what}: query_out differs from ops::rope"
    );

    // The caches: the rows at valid positions hold the rotated key and the value (rounded once
    // to the cache dtype); every other byte of the buffers is still the poison.
    let (want_k, err_k) = rope_ref(&kv, pos, kvh, d, theta64, style);
    let row = kvh * d;
    let got_k = download_f64(&q, &k_big);
    let got_v = download_f64(&q, &v_big);
    let k_bytes = bytes(&q, &k_big);
    let v_bytes = bytes(&q, &v_big);
    let row_bytes = row * cd.size();
    let key_roped = (qd == cd).then(|| {
        bytes(
            &q,
            &ops::rope(&q, &key, &positions, theta, style).expect("rope"),
        )
    });
    let mut written = vec![false; cap + 2 * MARGIN];
    for (ti, &p) in pos.iter().enumerate() {
        let p = p as usize;
        if p >= cap {
            continue;
        }
        let r = MARGIN + p;
        written[r] = true;
        let (src, dst) = (ti * row..(ti + 1) * row, r * row..(r + 1) * row);
        assert_within(
            &format!("{what}: k_cache row {p}"),
            cd,
            &got_k[dst.clone()],
            &want_k[src.clone()],
            &err_k[src.clone()],
        );
        if let Some(kr) = &key_roped {
            // Same dtype: bit for bit ops::rope of the key.
            assert_eq!(
                &k_bytes[r * row_bytes..(r + 1) * row_bytes],
                &kr[ti * row_bytes..(ti + 1) * row_bytes],
                "{what}: k_cache row {p} differs from ops::rope of the key"
            );
        }
        for (i, (&g, &v)) in got_v[dst].iter().zip(&vv[src]).enumerate() {
            assert_eq!(g, stored(v, cd), "{what}: v_cache row {p} element {i}");
        }
    }
    for (r, &w) in written.iter().enumerate() {
        if !w {
            let span = r * row_bytes..(r + 1) * row_bytes;
            assert!(
                k_bytes[span.clone()].iter().all(|&b| b == NAN_POISON)
                    && v_bytes[span].iter().all(|&b| b == NAN_POISON),
                "{what}: buffer row {r} (cache row {}) was written",
                r as isize - MARGIN as isize
            );
        }
    }
}

#[test]
fn rope_kv_append_matches_rope_and_the_f64_reference() {
    let dev = device();
    let mut rng = Rng::new("ops_rope_kv_append");
    let cases = [
        RopeCase {
            tokens: 1,
            heads: 1,
            kv_heads: 1,
            head_dim: 2,
            capacity: 1,
        },
        RopeCase {
            tokens: 5,
            heads: 4,
            kv_heads: 2,
            head_dim: 6,
            capacity: 37,
        },
        RopeCase {
            tokens: 3,
            heads: 9,
            kv_heads: 3,
            head_dim: 64,
            capacity: 300,
        },
        RopeCase {
            tokens: 7,
            heads: 2,
            kv_heads: 1,
            head_dim: 128,
            capacity: 7,
        },
        RopeCase {
            tokens: 2,
            heads: 2,
            kv_heads: 2,
            head_dim: 256,
            capacity: 9,
        },
    ];
    for qd in DTYPES {
        for cd in DTYPES {
            for (i, c) in cases.iter().enumerate() {
                let (style, theta) = if i.is_multiple_of(2) {
                    (RopeStyle::Neox, 10_000.0)
                } else {
                    (RopeStyle::Interleaved, 500_000.0)
                };
                // Distinct positions in random order (all of them where tokens == capacity).
                let pos = distinct_positions(&mut rng, c.tokens, c.capacity);
                check_rope_kv_append(&dev, &mut rng, qd, cd, c, &pos, theta, style);
            }
        }
    }
    // Large positions: the f32 angle's error grows with them.
    let c = RopeCase {
        tokens: 3,
        heads: 9,
        kv_heads: 3,
        head_dim: 64,
        capacity: 8192,
    };
    for style in [RopeStyle::Neox, RopeStyle::Interleaved] {
        check_rope_kv_append(
            &dev,
            &mut rng,
            DType::F32,
            DType::BF16,
            &c,
            &[8191, 0, 4097],
            1e4,
            style,
        );
        check_rope_kv_append(
            &dev,
            &mut rng,
            DType::F16,
            DType::F32,
            &c,
            &[5000, 8191, 1],
            5e5,
            style,
        );
    }
}

#[test]
fn rope_kv_append_skips_the_cache_write_past_the_capacity() {
    let dev = device();
    let mut rng = Rng::new("ops_rope_kv_append_past_capacity");
    let c = RopeCase {
        tokens: 5,
        heads: 4,
        kv_heads: 2,
        head_dim: 8,
        capacity: 6,
    };
    for cd in DTYPES {
        // Rows at 6 (the capacity), 7 and u32::MAX store nothing; their query_out is written.
        let pos = [6, 2, u32::MAX, 5, 7];
        check_rope_kv_append(
            &dev,
            &mut rng,
            DType::F32,
            cd,
            &c,
            &pos,
            1e4,
            RopeStyle::Neox,
        );
        let pos = [u32::MAX; 5];
        check_rope_kv_append(
            &dev,
            &mut rng,
            DType::BF16,
            cd,
            &c,
            &pos,
            1e4,
            RopeStyle::Interleaved,
        );
    }
}

/// The f64 attention of `query` over the caches at `pos` (NaN rows past the capacity), and per
/// element the bound of the f32 computation's error (before rounding to the output).
#[allow(clippy::too_many_arguments)]
fn attention_ref(
    query: &[f64],
    k: &[f64],
    v: &[f64],
    pos: &[u32],
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    capacity: usize,
    scale: f64,
) -> (Vec<f64>, Vec<f64>) {
    let group = heads / kv_heads;
    let mut out = vec![f64::NAN; query.len()];
    let mut err = vec![0.0; query.len()];
    for (t, &p) in pos.iter().enumerate() {
        let p = p as usize;
        if p >= capacity {
            continue;
        }
        for h in 0..heads {
            let kvh = h / group;
            let qr = &query[(t * heads + h) * head_dim..][..head_dim];
            let key = |r: usize| &k[(r * kv_heads + kvh) * head_dim..][..head_dim];
            let val = |r: usize| &v[(r * kv_heads + kvh) * head_dim..][..head_dim];
            // Each score, and the sum of its terms' magnitudes (the f32 error's scale).
            let (scores, magnitudes): (Vec<f64>, Vec<f64>) = (0..=p)
                .map(|r| {
                    qr.iter()
                        .zip(key(r))
                        .fold((0.0, 0.0), |(s, m), (a, b)| (s + a * b, m + (a * b).abs()))
                })
                .map(|(s, m)| (scale * s, scale * m))
                .unzip();
            let dot_bound = magnitudes.iter().copied().fold(0.0, f64::max);
            let vmax = (0..=p)
                .flat_map(|r| val(r).iter().map(|x| x.abs()))
                .fold(0.0, f64::max);
            let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let mut o = vec![0.0f64; head_dim];
            let mut total = 0.0;
            for (r, s) in scores.iter().enumerate() {
                let w = (s - m).exp();
                total += w;
                for (o, x) in o.iter_mut().zip(val(r)) {
                    *o += w * x;
                }
            }
            let eps = ((head_dim as f64 + 16.0) * dot_bound + 16.0) * U32;
            let bound = vmax * (2.2 * eps + 4.0 * (p as f64 + 9.0) * U32);
            let at = (t * heads + h) * head_dim;
            for (dd, o) in o.iter().enumerate() {
                out[at + dd] = o / total;
                err[at + dd] = bound;
            }
        }
    }
    (out, err)
}

/// An attention output `got` (`[tokens, heads, head_dim]` of `dtype`) against the reference
/// (`want`, `err`) from [`attention_ref`]: the rows of positions past the cache are all NaN,
/// every other element is within its bound.
fn assert_rows(
    what: &str,
    dtype: DType,
    got: &[f64],
    (want, err): (&[f64], &[f64]),
    positions: &[u32],
    heads: usize,
    head_dim: usize,
) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (row, (g, w)) in got
        .chunks_exact(head_dim)
        .zip(want.chunks_exact(head_dim))
        .enumerate()
    {
        if w[0].is_nan() {
            assert!(
                g.iter().all(|x| x.is_nan()),
                "{what}: row {row} (position {}) past the cache is not NaN: {g:?}",
                positions[row / heads]
            );
        }
    }
    let valid: Vec<usize> = (0..want.len()).filter(|&i| !want[i].is_nan()).collect();
    let pick = |v: &[f64]| valid.iter().map(|&i| v[i]).collect::<Vec<_>>();
    assert_within(what, dtype, &pick(got), &pick(want), &pick(err));
}

/// One geometry of the attention tests: the query's, the cache's capacity, the positions, and
/// the magnitude of query and key values (the scores' spread).
struct AttentionCase {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    capacity: usize,
    positions: Vec<u32>,
    magnitude: f64,
}

/// Runs both forms of the attention on fresh inputs and checks them against the reference.
fn check_attention(dev: &Device, rng: &mut Rng, qd: DType, cd: DType, c: &AttentionCase) {
    let q = dev.queue();
    let (t, h, kvh, d, cap) = (
        c.positions.len(),
        c.heads,
        c.kv_heads,
        c.head_dim,
        c.capacity,
    );
    let longest = c
        .positions
        .iter()
        .map(|&p| p as usize)
        .filter(|&p| p < cap)
        .max();
    let what = format!(
        "attention {qd}/{cd} tokens {t} heads {h}/{kvh} head_dim {d} capacity {cap} longest \
         row {longest:?}"
    );
    let qv = values(rng, t * h * d, c.magnitude, qd);
    // Rows past the longest one hold NaN: a read past a row's range makes its output NaN.
    let filled = longest.map_or(0, |p| p + 1) * kvh * d;
    let mut kv = values(rng, filled, c.magnitude, cd);
    let mut vv = values(rng, filled, 1.0, cd);
    kv.resize(cap * kvh * d, f64::NAN);
    vv.resize(cap * kvh * d, f64::NAN);
    let query = upload_f64(dev, "query", qd, &[t, h, d], &qv);
    let k_cache = upload_f64(dev, "k cache", cd, &[cap, kvh, d], &kv);
    let v_cache = upload_f64(dev, "v cache", cd, &[cap, kvh, d], &vv);
    let positions = dev
        .from_slice("positions", &c.positions, &[t])
        .expect("upload");
    let scale = (1.0 / (d as f64).sqrt()) as f32;
    let (want, err) = attention_ref(
        &qv,
        &kv,
        &vv,
        &c.positions,
        h,
        kvh,
        d,
        cap,
        f64::from(scale),
    );
    let check = |got: &[f64], form: &str| {
        let what = format!("{what} ({form})");
        assert_rows(&what, qd, got, (&want, &err), &c.positions, h, d);
    };
    let out = ops::attention(&q, &query, &k_cache, &v_cache, &positions, scale).expect("attention");
    assert_eq!((out.dtype(), out.shape()), (qd, &[t, h, d][..]));
    check(&download_f64(&q, &out), "attention");
    let out = poisoned(dev, qd, &[t, h, d]);
    let fence = ops::attention_into(&q, &query, &k_cache, &v_cache, &positions, scale, &out)
        .expect("attention_into");
    q.wait(fence).expect("wait");
    check(&download_f64(&q, &out), "attention_into");
}

fn decode(
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    capacity: usize,
    len: usize,
) -> AttentionCase {
    AttentionCase {
        heads,
        kv_heads,
        head_dim,
        capacity,
        positions: vec![len as u32 - 1],
        magnitude: 2.0,
    }
}

fn prefill(
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    capacity: usize,
    start: u32,
    tokens: u32,
) -> AttentionCase {
    AttentionCase {
        heads,
        kv_heads,
        head_dim,
        capacity,
        positions: (start..start + tokens).collect(),
        magnitude: 2.0,
    }
}

#[test]
fn attention_matches_the_f64_reference() {
    let dev = device();
    let mut rng = Rng::new("ops_attention");
    let mut cases = vec![
        decode(1, 1, 2, 1, 1),
        // Short caches: one split, the single kernel.
        decode(4, 2, 6, 20, 20),
        decode(9, 3, 64, 32, 32),
        // Batch-1 decode as SmolLM2 has it, over a cache long enough to be split.
        decode(9, 3, 64, 2048, 1),
        decode(9, 3, 64, 2048, 7),
        decode(9, 3, 64, 2048, 33),
        decode(9, 3, 64, 2048, 300),
        decode(9, 3, 64, 2048, 1500),
        decode(4, 2, 128, 4096, 1700),
        decode(2, 1, 256, 64, 64),
        decode(2, 1, 256, 200, 190), // 3 splits
        decode(4, 4, 96, 300, 299),
        // The longest cache SmolLM2 decode has: 88 splits, of 94 keys, or mostly empty.
        decode(9, 3, 64, 8192, 8192),
        decode(9, 3, 64, 8192, 16),
        // The most splits (128), each merging four query heads.
        decode(4, 1, 32, 8192, 5000),
        // Chunked prefill: causal positions from a start, a few tokens or many.
        prefill(4, 2, 6, 320, 263, 37),
        prefill(9, 3, 64, 600, 0, 5),
        prefill(9, 3, 16, 96, 0, 90), // 270 blocks per split: one split
        prefill(1, 1, 2, 1600, 1500, 37),
    ];
    // Unsorted positions, and a query head group wider than one block's (12 heads per kv head).
    cases.push(AttentionCase {
        heads: 9,
        kv_heads: 3,
        head_dim: 96,
        capacity: 300,
        positions: vec![100, 3, 57, 0, 299],
        magnitude: 2.0,
    });
    cases.push(AttentionCase {
        heads: 12,
        kv_heads: 1,
        head_dim: 32,
        capacity: 500,
        positions: vec![400, 12],
        magnitude: 2.0,
    });
    // Scores in the hundreds: the softmax must subtract the maximum (exp(300) overflows f32).
    cases.push(AttentionCase {
        heads: 2,
        kv_heads: 1,
        head_dim: 64,
        capacity: 700,
        positions: vec![650, 3],
        magnitude: 24.0,
    });
    // Every (query, cache) dtype pair on the small cases; on the long ones (which the CPU runs
    // slowly in a debug build) each cache dtype once, with a query dtype that rotates.
    for (i, c) in cases.iter().enumerate() {
        let work: usize = c
            .positions
            .iter()
            .map(|&p| (p as usize + 1).min(c.capacity) * c.heads * c.head_dim)
            .sum();
        for (j, cd) in DTYPES.into_iter().enumerate() {
            for (k, qd) in DTYPES.into_iter().enumerate() {
                if work <= 200_000 || k == (i + j) % 3 {
                    check_attention(&dev, &mut rng, qd, cd, c);
                }
            }
        }
    }
}

#[test]
fn attention_rows_past_the_cache_are_nan() {
    let dev = device();
    let mut rng = Rng::new("ops_attention_past_capacity");
    for qd in DTYPES {
        // Split (a long cache, few rows) and unsplit (a short cache).
        for capacity in [1000, 16] {
            let c = AttentionCase {
                heads: 4,
                kv_heads: 2,
                head_dim: 8,
                capacity,
                positions: vec![capacity as u32, 3, u32::MAX, capacity as u32 + 5, 0],
                magnitude: 2.0,
            };
            check_attention(&dev, &mut rng, qd, DType::F16, &c);
        }
    }
}

/// The decoder's use: one step (RoPE + append, then attention) recorded once into a launch
/// batch, replayed with the positions buffer rewritten between replays; the graph never
/// changes, the positions (device data) do.
#[test]
fn decode_step_in_a_launch_batch_follows_the_positions_buffer() {
    let dev = device();
    let q = dev.queue();
    let mut rng = Rng::new("ops_attention_launch_batch");
    let (h, kvh, d, cap) = (9usize, 3usize, 64usize, 512usize);
    let (qd, cd) = (DType::F32, DType::F16);
    let theta = 10_000.0f32;
    let scale = 0.125f32;
    let alloc = |dtype, shape: &[usize]| {
        dev.alloc(dtype, shape, StorageMode::Private)
            .expect("alloc")
    };
    let (query, key, value) = (
        alloc(qd, &[1, h, d]),
        alloc(qd, &[1, kvh, d]),
        alloc(qd, &[1, kvh, d]),
    );
    let position = alloc(DType::U32, &[1]);
    let rotated = alloc(qd, &[1, h, d]);
    let out = alloc(qd, &[1, h, d]);
    let k_cache = alloc(cd, &[cap, kvh, d]);
    let v_cache = alloc(cd, &[cap, kvh, d]);
    // Fill the caches with values, so that every row read is finite.
    let filler = values(&mut rng, cap * kvh * d, 1.0, cd);
    q.upload(
        &k_cache,
        &filler.iter().map(|&x| f16::from_f64(x)).collect::<Vec<_>>(),
    )
    .expect("upload");
    q.upload(
        &v_cache,
        &filler.iter().map(|&x| f16::from_f64(x)).collect::<Vec<_>>(),
    )
    .expect("upload");
    let mut step = LaunchBatch::new(&dev, "decode attention");
    step.push_with(|rq| {
        ops::rope_kv_append_into(
            rq,
            &query,
            &key,
            &value,
            &position,
            theta,
            RopeStyle::Neox,
            &rotated,
            &k_cache,
            &v_cache,
        )
    })
    .expect("record rope_kv_append");
    step.push_with(|rq| {
        ops::attention_into(rq, &rotated, &k_cache, &v_cache, &position, scale, &out)
    })
    .expect("record attention");
    // The split attention (a capacity of 512 splits the keys 8 ways) is one launch, which merges
    // the splits itself: its scratch and counters live in the batch.
    assert_eq!(step.len(), 2, "rope_kv_append, split attention");
    let host = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
    let mut replays = 0;
    for p in (0..24u32).chain([100, 101, 511, 200]) {
        let qv = values(&mut rng, h * d, 2.0, qd);
        let kv = values(&mut rng, kvh * d, 2.0, qd);
        let vv = values(&mut rng, kvh * d, 1.0, qd);
        q.upload(&query, &host(&qv)).expect("upload");
        q.upload(&key, &host(&kv)).expect("upload");
        q.upload(&value, &host(&vv)).expect("upload");
        q.upload(&position, &[p]).expect("upload");
        poison_nan(&dev, &out);
        q.launch_batch(&step).expect("launch batch");
        replays += 1;
        let what = format!("replay {replays} at position {p}");
        // The new cache row: the rotated key and the value, at p.
        let kc = download_f64(&q, &k_cache);
        let vc = download_f64(&q, &v_cache);
        let row = (p as usize) * kvh * d..(p as usize + 1) * kvh * d;
        let (want_k, err_k) = rope_ref(&kv, &[p], kvh, d, f64::from(theta), RopeStyle::Neox);
        assert_within(
            &format!("{what}: k_cache row"),
            cd,
            &kc[row.clone()],
            &want_k,
            &err_k,
        );
        for (i, (&g, &v)) in vc[row].iter().zip(&vv).enumerate() {
            assert_eq!(g, stored(v, cd), "{what}: v_cache element {i}");
        }
        // The attention of the rotated query over the caches as they are now.
        let rq = download_f64(&q, &rotated);
        let (want, err) = attention_ref(&rq, &kc, &vc, &[p], h, kvh, d, cap, f64::from(scale));
        assert_within(&what, qd, &download_f64(&q, &out), &want, &err);
    }
    assert_eq!(
        dev.submission_stats()
            .get("decode attention")
            .unwrap()
            .count,
        replays
    );
}

/// Random values of `dtype` uploaded into `b` (`n` of them, in [-scale, scale)); returns them.
fn upload_values(q: &Queue, rng: &mut Rng, b: &Buffer, scale: f64) -> Vec<f64> {
    let v = values(rng, b.len(), scale, b.dtype());
    match b.dtype() {
        DType::F32 => q.upload(b, &v.iter().map(|&x| x as f32).collect::<Vec<_>>()),
        DType::F16 => q.upload(b, &v.iter().map(|&x| f16::from_f64(x)).collect::<Vec<_>>()),
        _ => q.upload(b, &v.iter().map(|&x| bf16::from_f64(x)).collect::<Vec<_>>()),
    }
    .expect("upload");
    v
}

/// One geometry of the replay test.
struct Replayed {
    tokens: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    capacity: usize,
    query: DType,
    cache: DType,
}

/// A split attention recorded once into a launch batch (a CUDA graph) and replayed many times,
/// the positions changing between replays (growing, shrinking, past the cache): every replay
/// matches the f64 reference. The output is poisoned before each replay and only the last block
/// of each group of splits writes it, so a replay after one that left a counter non-zero fails.
#[test]
fn split_attention_replayed_in_a_launch_batch_matches_each_time() {
    let dev = device();
    let q = dev.queue();
    let mut rng = Rng::new("ops_attention_split_replays");
    let cases = [
        // Batch-1 decode as SmolLM2 has it: 16 splits of a capacity of 1024.
        Replayed {
            tokens: 1,
            heads: 9,
            kv_heads: 3,
            head_dim: 64,
            capacity: 1024,
            query: DType::F32,
            cache: DType::BF16,
        },
        // Three tokens over two kv heads of six query heads each (two groups of splits per
        // token and kv head, of 4 and 2 heads): 12 counters, 10 splits.
        Replayed {
            tokens: 3,
            heads: 12,
            kv_heads: 2,
            head_dim: 32,
            capacity: 700,
            query: DType::F16,
            cache: DType::F32,
        },
    ];
    for (i, c) in cases.iter().enumerate() {
        let (t, h, kvh, d, cap) = (c.tokens, c.heads, c.kv_heads, c.head_dim, c.capacity);
        let label = format!("split attention {i}");
        let scale = (1.0 / (d as f64).sqrt()) as f32;
        let k_cache = alloc(&dev, c.cache, &[cap, kvh, d]);
        let v_cache = alloc(&dev, c.cache, &[cap, kvh, d]);
        let kv = upload_values(&q, &mut rng, &k_cache, 2.0);
        let vv = upload_values(&q, &mut rng, &v_cache, 1.0);
        let query = alloc(&dev, c.query, &[t, h, d]);
        let positions = alloc(&dev, DType::U32, &[t]);
        let out = alloc(&dev, c.query, &[t, h, d]);
        let mut step = LaunchBatch::new(&dev, &label);
        step.push_with(|rq| {
            ops::attention_into(rq, &query, &k_cache, &v_cache, &positions, scale, &out)
        })
        .expect("record attention");
        assert_eq!(step.len(), 1, "the split attention is one launch");
        // Growing and shrinking rows, the first and last positions, and (in the middle) a row
        // past the cache.
        let last = cap as u32 - 1;
        let mut firsts: Vec<u32> = vec![0, 1, 31, 32, 33, 63, 64, 65, 100, 5, last, 0];
        firsts.extend([last - 1, 200, 201, 17, 500, 499, 640, 3, 2, last, 300, 150]);
        for (replay, &first) in firsts.iter().enumerate() {
            let mut pos: Vec<u32> = (0..t as u32)
                .map(|i| (first + 37 * i) % cap as u32)
                .collect();
            if replay == 9 {
                pos[t - 1] = cap as u32 + replay as u32;
            }
            let qv = upload_values(&q, &mut rng, &query, 2.0);
            q.upload(&positions, &pos).expect("upload");
            poison_nan(&dev, &out);
            q.launch_batch(&step).expect("launch batch");
            let what = format!(
                "{}/{} tokens {t} heads {h}/{kvh} head_dim {d} capacity {cap}: replay {} at \
                 positions {pos:?}",
                c.query,
                c.cache,
                replay + 1
            );
            let (want, err) = attention_ref(&qv, &kv, &vv, &pos, h, kvh, d, cap, f64::from(scale));
            let got = download_f64(&q, &out);
            assert_rows(&what, c.query, &got, (&want, &err), &pos, h, d);
        }
        let replays = dev.submission_stats().get(&label).unwrap().count;
        assert_eq!(replays, firsts.len() as u64);
    }
}

/// Two layers' split attentions in one batch, the second layer's query the first's output: each
/// call has its own scratch and counters, and each layer's output matches the reference over its
/// own caches at every replay.
#[test]
fn two_layers_split_attentions_in_one_launch_batch() {
    let dev = device();
    let q = dev.queue();
    let mut rng = Rng::new("ops_attention_two_layers");
    let (h, kvh, d) = (9usize, 3usize, 64usize);
    let scale = 0.125f32;
    // Different capacities and cache dtypes: 32 and 23 splits.
    let layers = [(2048usize, DType::F16), (1500, DType::BF16)];
    let caches: Vec<_> = layers
        .iter()
        .map(|&(cap, cd)| {
            let k = alloc(&dev, cd, &[cap, kvh, d]);
            let v = alloc(&dev, cd, &[cap, kvh, d]);
            let kv = upload_values(&q, &mut rng, &k, 2.0);
            let vv = upload_values(&q, &mut rng, &v, 1.0);
            (k, v, kv, vv)
        })
        .collect();
    let query = alloc(&dev, DType::F32, &[1, h, d]);
    let position = alloc(&dev, DType::U32, &[1]);
    let out0 = alloc(&dev, DType::F32, &[1, h, d]);
    let out1 = alloc(&dev, DType::F32, &[1, h, d]);
    let mut step = LaunchBatch::new(&dev, "two layers");
    let (c0, c1) = (&caches[0], &caches[1]);
    step.push_with(|rq| ops::attention_into(rq, &query, &c0.0, &c0.1, &position, scale, &out0))
        .expect("record layer 0");
    step.push_with(|rq| ops::attention_into(rq, &out0, &c1.0, &c1.1, &position, scale, &out1))
        .expect("record layer 1");
    assert_eq!(step.len(), 2, "one launch per layer");
    for (replay, p) in [0u32, 40, 1499, 700, 7, 1000, 64, 1200]
        .into_iter()
        .enumerate()
    {
        let qv = upload_values(&q, &mut rng, &query, 2.0);
        q.upload(&position, &[p]).expect("upload");
        poison_nan(&dev, &out0);
        poison_nan(&dev, &out1);
        q.launch_batch(&step).expect("launch batch");
        let got0 = download_f64(&q, &out0);
        let got1 = download_f64(&q, &out1);
        // Layer 1 attends with layer 0's output as it was stored.
        for (layer, (input, got)) in [(&qv, &got0), (&got0, &got1)].into_iter().enumerate() {
            let (cap, _) = layers[layer];
            let (_, _, kv, vv) = &caches[layer];
            let (want, err) = attention_ref(input, kv, vv, &[p], h, kvh, d, cap, f64::from(scale));
            let what = format!("replay {} at position {p}: layer {layer}", replay + 1);
            assert_rows(&what, DType::F32, got, (&want, &err), &[p], h, d);
        }
    }
}

#[track_caller]
fn assert_wrong_device<T: std::fmt::Debug>(r: unibuf::Result<T>) {
    match r {
        Err(Error::WrongDevice { .. }) => {}
        other => panic!("expected a wrong device, got {other:?}"),
    }
}

#[test]
fn attention_ops_refuse_bad_inputs_with_typed_errors() {
    let dev = device();
    let q = dev.queue();
    let f32s = |shape: &[usize]| alloc(&dev, DType::F32, shape);
    let query = f32s(&[2, 4, 8]);
    let (kc, vc) = (
        alloc(&dev, DType::F16, &[16, 2, 8]),
        alloc(&dev, DType::F16, &[16, 2, 8]),
    );
    let pos = alloc(&dev, DType::U32, &[2]);
    q.upload(&pos, &[3u32, 4]).expect("upload");
    let s = 0.25;
    assert!(ops::attention(&q, &query, &kc, &vc, &pos, s).is_ok());

    // Attention: dtypes.
    assert_invalid(
        ops::attention(&q, &alloc(&dev, DType::U32, &[2, 4, 8]), &kc, &vc, &pos, s),
        "U32",
    );
    assert_invalid(
        ops::attention(
            &q,
            &query,
            &alloc(&dev, DType::I32, &[16, 2, 8]),
            &vc,
            &pos,
            s,
        ),
        "I32",
    );
    assert_dtype_mismatch(ops::attention(
        &q,
        &query,
        &kc,
        &alloc(&dev, DType::BF16, &[16, 2, 8]),
        &pos,
        s,
    ));
    assert_dtype_mismatch(ops::attention(
        &q,
        &query,
        &kc,
        &vc,
        &alloc(&dev, DType::I32, &[2]),
        s,
    ));
    // Shapes.
    assert_shape_mismatch(ops::attention(&q, &f32s(&[2, 32]), &kc, &vc, &pos, s));
    assert_shape_mismatch(ops::attention(
        &q,
        &query,
        &alloc(&dev, DType::F16, &[16, 16]),
        &vc,
        &pos,
        s,
    ));
    assert_shape_mismatch(ops::attention(
        &q,
        &query,
        &kc,
        &alloc(&dev, DType::F16, &[15, 2, 8]),
        &pos,
        s,
    ));
    assert_shape_mismatch(ops::attention(
        &q,
        &query,
        &alloc(&dev, DType::F16, &[16, 2, 6]),
        &alloc(&dev, DType::F16, &[16, 2, 6]),
        &pos,
        s,
    ));
    assert_shape_mismatch(ops::attention(
        &q,
        &query,
        &kc,
        &vc,
        &alloc(&dev, DType::U32, &[3]),
        s,
    ));
    // Geometry.
    let odd = (f32s(&[2, 4, 7]), alloc(&dev, DType::F16, &[16, 2, 7]));
    assert_invalid(
        ops::attention(&q, &odd.0, &odd.1, &odd.1, &pos, s),
        "head_dim = 7",
    );
    let wide = (f32s(&[2, 4, 258]), alloc(&dev, DType::F16, &[16, 2, 258]));
    assert_invalid(
        ops::attention(&q, &wide.0, &wide.1, &wide.1, &pos, s),
        "head_dim = 258",
    );
    let kv3 = alloc(&dev, DType::F16, &[16, 3, 8]);
    assert_invalid(
        ops::attention(&q, &query, &kv3, &kv3, &pos, s),
        "not a multiple of kv_heads = 3",
    );
    let empty = alloc(&dev, DType::F16, &[0, 2, 8]);
    assert_invalid(
        ops::attention(&q, &query, &empty, &empty, &pos, s),
        "non-zero",
    );
    assert_invalid(
        ops::attention(
            &q,
            &f32s(&[0, 4, 8]),
            &kc,
            &vc,
            &alloc(&dev, DType::U32, &[0]),
            s,
        ),
        "non-zero",
    );
    // Scalars.
    for bad in [0.0, -1.0, f32::NAN, f32::INFINITY] {
        assert_invalid(ops::attention(&q, &query, &kc, &vc, &pos, bad), "scale");
    }
    // The output.
    assert_dtype_mismatch(ops::attention_into(
        &q,
        &query,
        &kc,
        &vc,
        &pos,
        s,
        &alloc(&dev, DType::F16, &[2, 4, 8]),
    ));
    assert_shape_mismatch(ops::attention_into(
        &q,
        &query,
        &kc,
        &vc,
        &pos,
        s,
        &f32s(&[2, 8, 4]),
    ));
    assert_invalid(
        ops::attention_into(&q, &query, &kc, &vc, &pos, s, &query),
        "overlaps",
    );
    // K, V and the output as views of one allocation: disjoint is fine, overlapping is not.
    let both = f32s(&[38, 2, 8]);
    let (k_view, v_view) = (
        both.rows(0..16).expect("rows"),
        both.rows(16..32).expect("rows"),
    );
    let view_out = |rows: std::ops::Range<usize>| {
        both.rows(rows)
            .expect("rows")
            .reshape(&[2, 4, 8])
            .expect("reshape")
    };
    assert!(ops::attention_into(&q, &query, &k_view, &v_view, &pos, s, &view_out(32..36)).is_ok());
    assert_invalid(
        ops::attention_into(&q, &query, &k_view, &v_view, &pos, s, &view_out(30..34)),
        "overlaps",
    );
    // Another device's buffers.
    let other = device();
    let foreign = other
        .alloc(DType::F32, &[2, 4, 8], StorageMode::Auto)
        .expect("alloc");
    assert_wrong_device(ops::attention(&q, &foreign, &kc, &vc, &pos, s));
    assert_wrong_device(ops::attention_into(&q, &query, &kc, &vc, &pos, s, &foreign));

    // RoPE + append.
    let (key, value) = (f32s(&[2, 2, 8]), f32s(&[2, 2, 8]));
    let rotated = f32s(&[2, 4, 8]);
    let style = RopeStyle::Neox;
    let append = |query: &Buffer,
                  key: &Buffer,
                  value: &Buffer,
                  theta: f32,
                  out: &Buffer,
                  k: &Buffer,
                  v: &Buffer| {
        ops::rope_kv_append_into(&q, query, key, value, &pos, theta, style, out, k, v)
    };
    assert!(append(&query, &key, &value, 1e4, &rotated, &kc, &vc).is_ok());
    assert_dtype_mismatch(append(
        &query,
        &alloc(&dev, DType::F16, &[2, 2, 8]),
        &value,
        1e4,
        &rotated,
        &kc,
        &vc,
    ));
    assert_dtype_mismatch(append(
        &query,
        &key,
        &alloc(&dev, DType::BF16, &[2, 2, 8]),
        1e4,
        &rotated,
        &kc,
        &vc,
    ));
    assert_shape_mismatch(append(
        &query,
        &f32s(&[1, 2, 8]),
        &value,
        1e4,
        &rotated,
        &kc,
        &vc,
    ));
    assert_shape_mismatch(append(
        &query,
        &key,
        &f32s(&[2, 2, 6]),
        1e4,
        &rotated,
        &kc,
        &vc,
    ));
    assert_dtype_mismatch(append(
        &query,
        &key,
        &value,
        1e4,
        &alloc(&dev, DType::F16, &[2, 4, 8]),
        &kc,
        &vc,
    ));
    assert_shape_mismatch(append(
        &query,
        &key,
        &value,
        1e4,
        &f32s(&[2, 4, 6]),
        &kc,
        &vc,
    ));
    assert_dtype_mismatch(append(
        &query,
        &key,
        &value,
        1e4,
        &rotated,
        &kc,
        &f32s(&[16, 2, 8]),
    ));
    assert_shape_mismatch(append(
        &query,
        &key,
        &value,
        1e4,
        &rotated,
        &kc,
        &alloc(&dev, DType::F16, &[16, 1, 16]),
    ));
    assert_invalid(
        append(&query, &key, &value, 1e4, &rotated, &kv3, &kv3),
        "not a multiple",
    );
    assert_invalid(
        append(
            &odd.0,
            &f32s(&[2, 2, 7]),
            &f32s(&[2, 2, 7]),
            1e4,
            &f32s(&[2, 4, 7]),
            &odd.1,
            &odd.1,
        ),
        "head_dim = 7",
    );
    for bad in [0.0, -2.0, f32::NAN, f32::INFINITY] {
        assert_invalid(
            append(&query, &key, &value, bad, &rotated, &kc, &vc),
            "theta_base",
        );
    }
    // Written buffers overlapping: the caches with each other, the output with an input.
    assert_invalid(
        append(&query, &key, &value, 1e4, &rotated, &kc, &kc),
        "overlaps",
    );
    assert_invalid(
        append(&query, &key, &value, 1e4, &query, &kc, &vc),
        "overlaps",
    );
    assert_wrong_device(append(
        &query,
        &key,
        &value,
        1e4,
        &rotated,
        &kc,
        &other
            .alloc(DType::F16, &[16, 2, 8], StorageMode::Auto)
            .expect("alloc"),
    ));

    // Nothing above reached the device as a fault.
    dev.drain().expect("no fault");
}
