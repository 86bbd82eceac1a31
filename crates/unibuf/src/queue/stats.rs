//! Labelled submission stats: per label, how many submissions were made, the CPU time spent
//! encoding them and blocked waiting for them, and the device time they ran.
//!
//! Encode time is taken at submission and wait time when a wait returns, both by the core.
//! Device time comes from the backend (`Backend::gpu_span`: timestamps on Metal and the CPU,
//! timing events on CUDA when the device was opened with `gpu_timing(true)`), read lazily:
//! submissions wait in a bounded list until a snapshot (or the list filling up) finds them
//! complete.

use crate::backend::Backend;
use crate::epoch::{Epoch, Fence, QueueId};
use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::fmt;

/// Submissions kept for their device time and for attributing waits. When this many are held,
/// the completed ones are harvested; if the oldest has not completed, it loses its device
/// time. No more than a backend keeps spans for (CUDA: 4096 per queue).
const RECENT_MAX: usize = 4096;

/// The stats of one label.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LabelStats {
    /// The submission label (a queue handle's label, else what was submitted: a kernel's name,
    /// "upload", ...).
    pub label: String,
    /// Submissions.
    pub count: u64,
    /// CPU time spent checking, encoding and submitting them, ns.
    pub encode_ns: u64,
    /// CPU time spent blocked in waits for their fences, ns.
    pub wait_ns: u64,
    /// Waits for their fences that blocked (1 µs or longer: the work was still running).
    pub waits: u64,
    /// Device time of the timed submissions, ns.
    pub gpu_ns: u64,
    /// Submissions whose device time is known (and counted in `gpu_ns`).
    pub timed: u64,
}

impl LabelStats {
    /// Mean device time per timed submission, ns.
    pub fn gpu_mean_ns(&self) -> Option<f64> {
        (self.timed > 0).then(|| self.gpu_ns as f64 / self.timed as f64)
    }
}

/// Per-label stats of a device's submissions, from [`Device::submission_stats`].
///
/// Its `Display` is a table, one row per label, by device time then encode time.
///
/// [`Device::submission_stats`]: crate::Device::submission_stats
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SubmissionStats {
    /// One entry per label, by device time then encode time, largest first.
    pub labels: Vec<LabelStats>,
    /// Whether the backend records device times (see `DeviceBuilder::gpu_timing`).
    pub gpu_timing: bool,
}

impl SubmissionStats {
    /// The stats of `label`, if anything was submitted under it.
    pub fn get(&self, label: &str) -> Option<&LabelStats> {
        self.labels.iter().find(|l| l.label == label)
    }
}

impl fmt::Display for SubmissionStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let us = |ns: u64| ns as f64 / 1e3;
        writeln!(
            f,
            "{:<32} {:>9} {:>11} {:>9} {:>11} {:>12} {:>10}",
            "label", "count", "encode µs", "mean µs", "wait µs", "device µs", "mean µs"
        )?;
        for l in &self.labels {
            let mean = |total: u64, n: u64| {
                if n == 0 {
                    "-".to_owned()
                } else {
                    format!("{:.2}", us(total) / n as f64)
                }
            };
            let gpu = if l.timed > 0 {
                format!("{:.1}", us(l.gpu_ns))
            } else {
                "-".to_owned()
            };
            writeln!(
                f,
                "{:<32} {:>9} {:>11.1} {:>9} {:>11.1} {:>12} {:>10}",
                l.label,
                l.count,
                us(l.encode_ns),
                mean(l.encode_ns, l.count),
                us(l.wait_ns),
                gpu,
                mean(l.gpu_ns, l.timed),
            )?;
        }
        if !self.gpu_timing {
            writeln!(
                f,
                "(device times off: open the device with gpu_timing(true) to record them)"
            )?;
        }
        Ok(())
    }
}

/// A submission not yet complete, or whose device time was not read yet.
struct Recent {
    fence: Fence,
    label: usize,
}

#[derive(Default)]
struct Collector {
    index: HashMap<String, usize>,
    labels: Vec<LabelStats>,
    recent: VecDeque<Recent>,
    /// The last label's index: loops submit the same label over and over, and a string
    /// comparison is cheaper than hashing it.
    last: Option<usize>,
    /// Submissions since the last full harvest of a full window (see `submitted`).
    since_full_harvest: usize,
}

/// A full window whose oldest entry is still running is scanned whole at most this often: with
/// several queues, the completed entries of the others can be taken there, and the slow
/// queue's oldest keeps its wait and device time; with one lagging queue nothing is complete,
/// and the scan is paid once per this many submissions instead of on each.
const FULL_HARVEST_EVERY: usize = 256;

impl Collector {
    fn label_index(&mut self, label: &str) -> usize {
        if let Some(i) = self.last.filter(|&i| self.labels[i].label == label) {
            return i;
        }
        // A lookup by &str first: the common case (a label seen before) allocates nothing.
        if let Some(&i) = self.index.get(label) {
            self.last = Some(i);
            return i;
        }
        self.labels.push(LabelStats {
            label: label.to_owned(),
            ..LabelStats::default()
        });
        self.index.insert(label.to_owned(), self.labels.len() - 1);
        self.last = Some(self.labels.len() - 1);
        self.labels.len() - 1
    }

    /// Moves the device time of the oldest submissions into their labels while they are
    /// complete: one completion query per queue and the entries taken. Each queue's
    /// submissions are recorded in epoch order (under the device's submission lock), so on one
    /// queue this takes every completed one; behind another queue's incomplete submission the
    /// rest wait for a full `harvest`.
    fn harvest_completed_prefix(&mut self, backend: &dyn Backend) {
        let mut completed = CompletedCache::default();
        while let Some(r) = self.recent.front() {
            if completed.get(backend, r.fence.queue) < r.fence.epoch {
                break;
            }
            let r = self.recent.pop_front().expect("front checked above");
            add_span(&mut self.labels, backend, &r);
        }
    }

    /// Moves the device time of completed submissions into their labels.
    fn harvest(&mut self, backend: &dyn Backend) {
        let mut completed = CompletedCache::default();
        let labels = &mut self.labels;
        self.recent.retain(|r| {
            if completed.get(backend, r.fence.queue) < r.fence.epoch {
                return true;
            }
            add_span(labels, backend, r);
            false
        });
    }
}

/// Adds a completed submission's device time, if it was timed, to its label.
fn add_span(labels: &mut [LabelStats], backend: &dyn Backend, r: &Recent) {
    if let Some(span) = backend.gpu_span(r.fence.queue, r.fence.epoch) {
        let l = &mut labels[r.label];
        l.gpu_ns += span.end_ns.saturating_sub(span.start_ns);
        l.timed += 1;
    }
}

/// Each queue's completed epoch, asked of the backend once per harvest (a device has a
/// handful of queues: a linear search beats hashing).
#[derive(Default)]
struct CompletedCache(Vec<(QueueId, Epoch)>);

impl CompletedCache {
    fn get(&mut self, backend: &dyn Backend, queue: QueueId) -> Epoch {
        if let Some(&(_, e)) = self.0.iter().find(|(q, _)| *q == queue) {
            return e;
        }
        let e = backend.completed(queue).unwrap_or(0);
        self.0.push((queue, e));
        e
    }
}

/// The collector behind [`SubmissionStats`], one per device.
#[derive(Default)]
pub(crate) struct StatsCollector {
    inner: Mutex<Collector>,
}

impl StatsCollector {
    fn lock(&self) -> parking_lot::MutexGuard<'_, Collector> {
        self.inner.lock()
    }

    /// Counts a submission and its encode time.
    pub fn submitted(&self, backend: &dyn Backend, fence: Fence, label: &str, encode_ns: u64) {
        let mut c = self.lock();
        let i = c.label_index(label);
        let l = &mut c.labels[i];
        l.count += 1;
        l.encode_ns += encode_ns;
        c.recent.push_back(Recent { fence, label: i });
        c.since_full_harvest = c.since_full_harvest.saturating_add(1);
        // Harvested once the window is full with this submission in it: the backend has kept
        // this one's span too, and drops the oldest only on the next (CUDA keeps 4096).
        if c.recent.len() >= RECENT_MAX {
            // The completed prefix first: a full scan here on every submission cost 4096
            // entries each while the device lagged behind (the usual state of a decode loop).
            c.harvest_completed_prefix(backend);
            if c.recent.len() >= RECENT_MAX && c.since_full_harvest >= FULL_HARVEST_EVERY {
                c.harvest(backend);
                c.since_full_harvest = 0;
            }
            if c.recent.len() >= RECENT_MAX {
                c.recent.pop_front();
            }
        }
    }

    /// Counts a wait for `fence` that blocked `wait_ns`, for the label of the submission it
    /// names (or the latest earlier one of its queue still held; else nothing is counted).
    pub fn waited(&self, fence: Fence, wait_ns: u64) {
        let mut c = self.lock();
        let found = c
            .recent
            .iter()
            .rev()
            .find(|r| r.fence.queue == fence.queue && r.fence.epoch <= fence.epoch)
            .map(|r| r.label);
        if let Some(i) = found {
            let l = &mut c.labels[i];
            l.waits += 1;
            l.wait_ns += wait_ns;
        }
    }

    /// The stats so far, with the device time of every submission completed by now.
    pub fn snapshot(&self, backend: &dyn Backend) -> SubmissionStats {
        let mut c = self.lock();
        c.harvest(backend);
        let mut labels = c.labels.clone();
        labels.sort_by(|a, b| {
            (b.gpu_ns, b.encode_ns, &a.label).cmp(&(a.gpu_ns, a.encode_ns, &b.label))
        });
        SubmissionStats {
            labels,
            gpu_timing: backend.info().timestamps,
        }
    }

    /// Forgets everything counted so far.
    pub fn clear(&self) {
        let mut c = self.lock();
        c.labels.clear();
        c.index.clear();
        c.recent.clear();
        c.last = None;
    }
}
