//! `unibuf bench transfers`: every transfer path of unibuf beside the platform's ceiling.
//!
//! Rows: host->device and device->host from pinned (a Shared buffer), pageable (a `Vec`,
//! staged) and External (wrapped, registered) host memory; device->device copy (bytes read plus
//! written); fills of 1, 4 and 8 bytes. Each is the median of several samples, on one queue,
//! synchronous, after a warm-up; the ceiling of the same operation is measured in the same run.

use super::ceiling::Ceiling;
use super::{median_seconds, reps_for};
use unibuf::{Buffer, DType, Device, FillPattern, PageBuffer, Result, StorageMode};

/// One measured operation at one size.
#[derive(Clone, Debug)]
pub struct Row {
    /// The operation ("h2d_pageable").
    pub op: &'static str,
    /// Bytes per transfer.
    pub bytes: usize,
    /// unibuf, GB/s.
    pub unibuf_gbps: f64,
    /// The ceiling of the line (pinned memory for host transfers), GB/s.
    pub ceiling_gbps: Option<f64>,
    /// The platform's own call on the same kind of memory, where it differs from the ceiling.
    pub same_path_gbps: Option<f64>,
}

/// (op, bytes counted per byte transferred, ceiling op, same-path op)
const OPS: [(&str, f64, &str, Option<&str>); 10] = [
    ("h2d_pinned", 1.0, "h2d_pinned", None),
    ("h2d_pageable", 1.0, "h2d_pinned", Some("h2d_pageable")),
    ("h2d_external", 1.0, "h2d_pinned", None),
    ("d2h_pinned", 1.0, "d2h_pinned", None),
    ("d2h_pageable", 1.0, "d2h_pinned", Some("d2h_pageable")),
    ("d2h_external", 1.0, "d2h_pinned", None),
    ("d2d_copy", 2.0, "d2d_copy", None),
    ("fill_u8", 1.0, "fill_u8", None),
    ("fill_u32", 1.0, "fill_u32", None),
    ("fill_u64", 1.0, "fill_u32", None),
];

struct Buffers {
    private: Buffer,
    private2: Buffer,
    shared: Buffer,
    external: Buffer,
    pageable: Vec<u8>,
}

fn buffers(dev: &Device, bytes: usize) -> Result<Buffers> {
    let private = dev.alloc_labelled("bench private", DType::U8, &[bytes], StorageMode::Private)?;
    let private2 =
        dev.alloc_labelled("bench private 2", DType::U8, &[bytes], StorageMode::Private)?;
    let shared = dev.alloc_labelled("bench pinned", DType::U8, &[bytes], StorageMode::Shared)?;
    let mut host = PageBuffer::new(bytes)?;
    host.fill(5);
    let external = dev.wrap_external("bench external", host, DType::U8, &[bytes])?;
    let q = dev.queue();
    q.fill(&private, FillPattern::u8(1))?;
    q.fill(&shared, FillPattern::u8(2))?;
    // Pageable memory that is really there: touched, so that no page fault is timed.
    let pageable: Vec<u8> = (0..bytes).map(|i| i as u8).collect();
    Ok(Buffers {
        private,
        private2,
        shared,
        external,
        pageable,
    })
}

fn ours(dev: &Device, b: &mut Buffers, op: &str, bytes: usize, samples: usize) -> Result<f64> {
    let q = dev.queue().labelled("bench");
    let reps = reps_for(bytes);
    let u64s = b.private.cast(DType::U64);
    match op {
        "h2d_pinned" => median_seconds(samples, reps, || q.copy(&b.shared, &b.private)),
        "h2d_pageable" => {
            let src = &b.pageable;
            median_seconds(samples, reps, || q.upload(&b.private, src))
        }
        "h2d_external" => median_seconds(samples, reps, || q.copy(&b.external, &b.private)),
        "d2h_pinned" => median_seconds(samples, reps, || q.copy(&b.private, &b.shared)),
        "d2h_pageable" => {
            let (private, out) = (&b.private, &mut b.pageable);
            median_seconds(samples, reps, || q.download_into(private, out))
        }
        "d2h_external" => median_seconds(samples, reps, || q.copy(&b.private, &b.external)),
        "d2d_copy" => median_seconds(samples, reps, || q.copy(&b.private, &b.private2)),
        "fill_u8" => median_seconds(samples, reps, || q.fill(&b.private, FillPattern::u8(3))),
        "fill_u32" => median_seconds(samples, reps, || {
            q.fill(&b.private, FillPattern::u32(0x0102_0304))
        }),
        _ => {
            let view = u64s?;
            median_seconds(samples, reps, || {
                q.fill(&view, FillPattern::u64(0x0102_0304_0506_0708))
            })
        }
    }
}

/// Measures every operation whose name contains `only` at every size.
pub fn run(
    dev: &Device,
    ceiling: &mut dyn Ceiling,
    sizes: &[usize],
    samples: usize,
    only: &str,
    mut progress: impl FnMut(&Row),
) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for &bytes in sizes {
        // Whole 8-byte words, so that every fill width divides the size.
        let bytes = bytes.next_multiple_of(8);
        let mut b = buffers(dev, bytes)?;
        for (op, factor, ceiling_op, same_op) in OPS.into_iter().filter(|o| o.0.contains(only)) {
            // Samples alternate between unibuf and the ceiling, so that both see the same
            // clocks: measured one after the other, whichever ran first after a stretch of
            // host-bound transfers paid for the GPU ramping its clocks back up (device copies
            // read 0.88-0.93 of the driver that way in a full run, 0.99-1.00 run alone).
            let (mut t, mut c, mut same) = (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..samples.max(1) {
                t.push(ours(dev, &mut b, op, bytes, 1)?);
                c.extend(ceiling.seconds(ceiling_op, bytes, 1));
                same.extend(same_op.and_then(|o| ceiling.seconds(o, bytes, 1)));
            }
            let gbps = |secs: f64| factor * bytes as f64 / secs / 1e9;
            let row = Row {
                op,
                bytes,
                unibuf_gbps: median(&mut t).map_or(0.0, gbps),
                ceiling_gbps: median(&mut c).map(gbps),
                same_path_gbps: median(&mut same).map(gbps),
            };
            progress(&row);
            rows.push(row);
        }
        drop(b);
        dev.trim();
    }
    Ok(rows)
}

/// The median of `v`, `None` when empty.
fn median(v: &mut [f64]) -> Option<f64> {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied()
}
