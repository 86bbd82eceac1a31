//! The copy ledger: every byte a transfer moves, where it was asked for, and how long it took.
//!
//! Each upload, download, copy and fill appends a [`CopyRecord`] (direction, storage modes,
//! bytes, label, the caller's source location via `#[track_caller]`, host time, and the fence
//! whose device time the backend reports). Zero-copy paths (wrapping, views, host access)
//! record nothing: that absence is the point. Totals are kept for the whole life of the device;
//! the detailed records and the submission log are kept in rings of bounded size so that a
//! long-running server does not grow without bound.
//!
//! The call site is the Rust caller's line ([`CallSite::caller`]); bindings for other
//! languages name their caller's line instead with [`CallSite::scoped`], so that a Python or C
//! program's audit points into its own code, not into the binding.

use crate::backend::Backend;
use crate::epoch::Fence;
use crate::storage::StorageMode;
use parking_lot::{Mutex, MutexGuard};
use std::cell::Cell;
use std::collections::HashSet;
use std::collections::{BTreeMap, VecDeque};
use std::fmt::{self, Write as _};
use std::panic::Location;
use std::sync::OnceLock;
use std::time::Instant;

/// Where in the caller's code a transfer was asked for: a file and a line.
///
/// ```
/// use unibuf::ledger::CallSite;
/// let here = CallSite::caller();
/// assert!(here.file().ends_with(".rs"));
/// let python = CallSite::new("model.py", 12);
/// assert_eq!(CallSite::scoped(python, CallSite::caller), python);
/// assert_eq!(python.to_string(), "model.py:12");
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CallSite {
    file: &'static str,
    line: u32,
}

thread_local! {
    /// The site a binding names for the calls it makes on this thread ([`CallSite::scoped`]).
    static SCOPED_SITE: Cell<Option<CallSite>> = const { Cell::new(None) };
}

impl CallSite {
    /// The site of the caller of the `#[track_caller]` function that calls this, unless a
    /// binding named one for this thread with [`CallSite::scoped`].
    #[track_caller]
    pub fn caller() -> CallSite {
        // Taken outside any closure: a closure is not `#[track_caller]`.
        let rust = Location::caller();
        SCOPED_SITE.get().unwrap_or_else(|| rust.into())
    }

    /// A site in another language's source (a binding's caller). File names are interned: a
    /// program has few of them, and each is kept once for the life of the process.
    pub fn new(file: &str, line: u32) -> CallSite {
        static FILES: OnceLock<Mutex<HashSet<&'static str>>> = OnceLock::new();
        let mut files = FILES.get_or_init(Default::default).lock();
        let file = match files.get(file) {
            Some(f) => *f,
            None => {
                let leaked: &'static str = Box::leak(file.to_owned().into_boxed_str());
                files.insert(leaked);
                leaked
            }
        };
        CallSite { file, line }
    }

    /// Runs `f` with `site` as the call site of every transfer it asks for on this thread
    /// (restored afterwards, also on unwinding).
    pub fn scoped<R>(site: CallSite, f: impl FnOnce() -> R) -> R {
        struct Restore(Option<CallSite>);
        impl Drop for Restore {
            fn drop(&mut self) {
                SCOPED_SITE.set(self.0);
            }
        }
        let _restore = Restore(SCOPED_SITE.replace(Some(site)));
        f()
    }

    /// The source file.
    pub fn file(&self) -> &'static str {
        self.file
    }

    /// The line.
    pub fn line(&self) -> u32 {
        self.line
    }
}

impl From<&'static Location<'static>> for CallSite {
    fn from(l: &'static Location<'static>) -> CallSite {
        CallSite {
            file: l.file(),
            line: l.line(),
        }
    }
}

impl fmt::Display for CallSite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file, self.line)
    }
}

/// Which way the bytes went.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    /// From caller host memory into a buffer.
    HostToDevice,
    /// From a buffer into caller host memory.
    DeviceToHost,
    /// From one buffer to another.
    DeviceToDevice,
    /// A pattern written over a buffer.
    Fill,
    /// Memory handed across a framework boundary without copying (a DLPack export or import,
    /// a foreign wrap): a zero-byte record, so that the audit shows where memory crossed.
    Shared,
}

impl Direction {
    /// A short name for reports.
    pub const fn name(self) -> &'static str {
        match self {
            Direction::HostToDevice => "host->device",
            Direction::DeviceToHost => "device->host",
            Direction::DeviceToDevice => "device->device",
            Direction::Fill => "fill",
            Direction::Shared => "shared",
        }
    }
}

/// One recorded transfer.
#[derive(Clone, Debug)]
pub struct CopyRecord {
    /// The direction.
    pub direction: Direction,
    /// The source's storage mode; `None` for caller host memory (and fills).
    pub src: Option<StorageMode>,
    /// The destination's storage mode; `None` for caller host memory.
    pub dst: Option<StorageMode>,
    /// Bytes moved for the caller.
    pub bytes: u64,
    /// Whether the bytes went through the staging pool (so they crossed memory twice).
    pub staged: bool,
    /// The label (the queue's label, else the buffer's).
    pub label: String,
    /// Where in the caller's code the transfer was asked for.
    pub site: CallSite,
    /// Host time at the start, in ns since the device opened.
    pub host_start_ns: u64,
    /// Host time spent in the call, in ns.
    pub host_ns: u64,
    /// The last submission of the transfer, if it used the device.
    pub fence: Option<Fence>,
}

/// One submission to a queue.
#[derive(Clone, Debug)]
pub struct SubmissionRecord {
    /// Its fence.
    pub fence: Fence,
    /// Its label (shared between consecutive submissions of the same label).
    pub label: std::sync::Arc<str>,
    /// Host time at the start of encoding, ns since the device opened.
    pub host_start_ns: u64,
    /// Host time spent encoding and submitting, ns.
    pub encode_ns: u64,
    /// Device-side waits for other queues inserted before its commands (0 on a single queue).
    pub waits: u32,
}

/// Totals of a group of transfers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    /// Transfers.
    pub count: u64,
    /// Bytes.
    pub bytes: u64,
    /// Of which staged.
    pub staged_bytes: u64,
    /// Host ns.
    pub host_ns: u64,
}

impl Totals {
    fn add(&mut self, r: &CopyRecord) {
        self.count += 1;
        self.bytes += r.bytes;
        if r.staged {
            self.staged_bytes += r.bytes;
        }
        self.host_ns += r.host_ns;
    }
}

struct Inner {
    records: VecDeque<CopyRecord>,
    submissions: VecDeque<SubmissionRecord>,
    by_direction: BTreeMap<Direction, Totals>,
    by_site: BTreeMap<(&'static str, u32, Direction), Totals>,
    dropped_records: u64,
    enabled: bool,
}

/// The copy ledger of a device. Get it with [`Device::ledger`](crate::Device::ledger).
pub struct Ledger {
    inner: Mutex<Inner>,
    capacity: usize,
    clock: Instant,
}

impl Ledger {
    pub(crate) fn new(capacity: usize) -> Ledger {
        Ledger {
            inner: Mutex::new(Inner {
                records: VecDeque::new(),
                submissions: VecDeque::new(),
                by_direction: BTreeMap::new(),
                by_site: BTreeMap::new(),
                dropped_records: 0,
                enabled: true,
            }),
            capacity,
            clock: Instant::now(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock()
    }

    pub(crate) fn now_ns(&self) -> u64 {
        self.clock.elapsed().as_nanos() as u64
    }

    /// Turns recording on or off (totals and records alike).
    pub fn set_enabled(&self, enabled: bool) {
        self.lock().enabled = enabled;
    }

    pub(crate) fn record(&self, r: CopyRecord) {
        let mut g = self.lock();
        if !g.enabled {
            return;
        }
        g.by_direction.entry(r.direction).or_default().add(&r);
        g.by_site
            .entry((r.site.file(), r.site.line(), r.direction))
            .or_default()
            .add(&r);
        if g.records.len() == self.capacity {
            g.records.pop_front();
            g.dropped_records += 1;
        }
        g.records.push_back(r);
    }

    /// Records memory crossing a framework boundary without a copy: `src` is unibuf's mode for
    /// an export, `dst` for an import.
    pub(crate) fn record_shared(
        &self,
        label: &str,
        src: Option<StorageMode>,
        dst: Option<StorageMode>,
        site: CallSite,
    ) {
        self.record(CopyRecord {
            direction: Direction::Shared,
            src,
            dst,
            bytes: 0,
            staged: false,
            label: label.to_owned(),
            site,
            host_start_ns: self.now_ns(),
            host_ns: 0,
            fence: None,
        });
    }

    pub(crate) fn record_submission(
        &self,
        fence: Fence,
        label: &str,
        waits: u32,
        host_start_ns: u64,
        encode_ns: u64,
    ) {
        let mut g = self.lock();
        if !g.enabled {
            return;
        }
        if g.submissions.len() == self.capacity {
            g.submissions.pop_front();
        }
        // A loop submits the same label again and again: share the last one's string.
        let label = match g.submissions.back() {
            Some(last) if *last.label == *label => last.label.clone(),
            _ => std::sync::Arc::from(label),
        };
        g.submissions.push_back(SubmissionRecord {
            fence,
            label,
            host_start_ns,
            encode_ns,
            waits,
        });
    }

    /// The detailed records still held (the most recent `capacity`).
    pub fn records(&self) -> Vec<CopyRecord> {
        self.lock().records.iter().cloned().collect()
    }

    /// The submissions still held.
    pub fn submissions(&self) -> Vec<SubmissionRecord> {
        self.lock().submissions.iter().cloned().collect()
    }

    /// Totals by direction over the life of the device.
    pub fn totals(&self) -> BTreeMap<Direction, Totals> {
        self.lock().by_direction.clone()
    }

    /// Totals over every direction.
    pub fn total(&self) -> Totals {
        let g = self.lock();
        let mut t = Totals::default();
        for d in g.by_direction.values() {
            t.count += d.count;
            t.bytes += d.bytes;
            t.staged_bytes += d.staged_bytes;
            t.host_ns += d.host_ns;
        }
        t
    }

    /// Forgets everything recorded so far.
    pub fn clear(&self) {
        let mut g = self.lock();
        g.records.clear();
        g.submissions.clear();
        g.by_direction.clear();
        g.by_site.clear();
        g.dropped_records = 0;
    }

    pub(crate) fn report(&self, backend: &dyn Backend) -> LedgerReport {
        let g = self.lock();
        let mut gpu_ns: BTreeMap<Direction, u64> = BTreeMap::new();
        for r in &g.records {
            if let Some(span) = r.fence.and_then(|f| backend.gpu_span(f.queue, f.epoch)) {
                *gpu_ns.entry(r.direction).or_default() += span.end_ns - span.start_ns;
            }
        }
        let mut sites: Vec<_> = g
            .by_site
            .iter()
            .map(|((file, line, dir), t)| (format!("{file}:{line}"), *dir, *t))
            .collect();
        sites.sort_by(|a, b| b.2.bytes.cmp(&a.2.bytes).then_with(|| a.0.cmp(&b.0)));
        LedgerReport {
            by_direction: g
                .by_direction
                .iter()
                .map(|(d, t)| (*d, *t, gpu_ns.get(d).copied()))
                .collect(),
            by_site: sites,
            dropped_records: g.dropped_records,
        }
    }

    pub(crate) fn chrome_trace(&self, backend: &dyn Backend, queue_names: &[String]) -> String {
        let g = self.lock();
        let mut out = String::from("{\"displayTimeUnit\":\"ns\",\"traceEvents\":[\n");
        let mut first = true;
        let mut event = |out: &mut String,
                         name: &str,
                         cat: &str,
                         tid: u64,
                         ts_ns: u64,
                         dur_ns: u64,
                         args: &str| {
            if !first {
                out.push_str(",\n");
            }
            first = false;
            let _ = write!(
                out,
                "{{\"name\":{},\"cat\":\"{cat}\",\"ph\":\"X\",\"pid\":1,\"tid\":{tid},\"ts\":{:.3},\"dur\":{:.3},\"args\":{{{args}}}}}",
                json_string(name),
                ts_ns as f64 / 1e3,
                dur_ns.max(1) as f64 / 1e3
            );
        };
        // Track 0 is the host; track q+1 is queue q.
        for r in &g.records {
            let name = format!("{} {}", r.direction.name(), fmt_bytes(r.bytes));
            let args = format!(
                "\"bytes\":{},\"label\":{},\"src\":\"{}\",\"dst\":\"{}\",\"staged\":{},\"site\":{}",
                r.bytes,
                json_string(&r.label),
                r.src.map_or("host", |m| m.name()),
                r.dst.map_or("host", |m| m.name()),
                r.staged,
                json_string(&r.site.to_string())
            );
            event(
                &mut out,
                &name,
                "copy",
                0,
                r.host_start_ns,
                r.host_ns,
                &args,
            );
        }
        for s in &g.submissions {
            let tid = u64::from(s.fence.queue.0) + 1;
            let args = format!(
                "\"epoch\":{},\"encode_ns\":{},\"waits\":{}",
                s.fence.epoch, s.encode_ns, s.waits
            );
            if let Some(span) = backend.gpu_span(s.fence.queue, s.fence.epoch) {
                event(
                    &mut out,
                    &s.label,
                    "gpu",
                    tid,
                    span.start_ns,
                    span.end_ns - span.start_ns,
                    &args,
                );
            }
        }
        let _ = write!(
            out,
            "{}{{\"name\":\"thread_name\",\"ph\":\"M\",\"pid\":1,\"tid\":0,\"args\":{{\"name\":\"host (copies)\"}}}}",
            if first { "" } else { ",\n" }
        );
        for (i, name) in queue_names.iter().enumerate() {
            let _ = write!(
                out,
                ",\n{{\"name\":\"thread_name\",\"ph\":\"M\",\"pid\":1,\"tid\":{},\"args\":{{\"name\":{}}}}}",
                i + 1,
                json_string(&format!("queue {i} ({name})"))
            );
        }
        out.push_str("\n]}\n");
        out
    }
}

/// The copy audit: totals by direction and by call site. `Display` prints it as tables.
#[derive(Clone, Debug)]
pub struct LedgerReport {
    /// Per direction: totals and device time of the records still held, where known.
    pub by_direction: Vec<(Direction, Totals, Option<u64>)>,
    /// Per call site ("file:line") and direction, most bytes first.
    pub by_site: Vec<(String, Direction, Totals)>,
    /// Detailed records dropped from the ring (totals still include them).
    pub dropped_records: u64,
}

impl fmt::Display for LedgerReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let total: u64 = self.by_direction.iter().map(|(_, t, _)| t.bytes).sum();
        let count: u64 = self.by_direction.iter().map(|(_, t, _)| t.count).sum();
        writeln!(
            f,
            "copy audit: {count} transfers, {} moved",
            fmt_bytes(total)
        )?;
        writeln!(
            f,
            "  {:<15} {:>7} {:>11} {:>11} {:>10} {:>10} {:>9}",
            "direction", "count", "bytes", "staged", "host ms", "device ms", "host GB/s"
        )?;
        for (d, t, gpu) in &self.by_direction {
            writeln!(
                f,
                "  {:<15} {:>7} {:>11} {:>11} {:>10.3} {:>10} {:>9.2}",
                d.name(),
                t.count,
                fmt_bytes(t.bytes),
                fmt_bytes(t.staged_bytes),
                t.host_ns as f64 / 1e6,
                gpu.map_or_else(|| "-".to_owned(), |g| format!("{:.3}", g as f64 / 1e6)),
                if t.host_ns > 0 {
                    t.bytes as f64 / t.host_ns as f64
                } else {
                    0.0
                }
            )?;
        }
        writeln!(f, "  by call site:")?;
        for (site, d, t) in &self.by_site {
            writeln!(
                f,
                "  {:<48} {:<15} {:>5} x {:>11}",
                site,
                d.name(),
                t.count,
                fmt_bytes(t.bytes)
            )?;
        }
        if self.dropped_records > 0 {
            writeln!(
                f,
                "  ({} older detailed records dropped; totals include them)",
                self.dropped_records
            )?;
        }
        Ok(())
    }
}

/// Formats a byte count with a binary unit ("1.50 MiB").
pub fn fmt_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

/// A JSON string literal. Hand-written because the trace is the crate's only JSON output and a
/// serializer dependency would be larger than these lines.
fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_strings_escape_controls_and_quotes() {
        assert_eq!(json_string("a\"b\\c\nd\u{1}"), "\"a\\\"b\\\\c\\nd\\u0001\"");
    }

    #[test]
    fn bytes_format_with_binary_units() {
        assert_eq!(fmt_bytes(512), "512 B");
        assert_eq!(fmt_bytes(1536), "1.50 KiB");
        assert_eq!(fmt_bytes(3 << 30), "3.00 GiB");
    }
}
