//! The streaming expert cache for mixture-of-experts layers.
//!
//! A MoE model has far more expert weights than a token uses: each layer routes a token to a
//! few of its experts. [`ExpertCache`] keeps at most a budgeted number of experts per layer on
//! the device, evicting the least recently used, and reads the others from the weights file
//! when asked:
//!
//! - [`ExpertCache::get`] returns an expert's buffers, reading it on a miss (the caller blocks:
//!   that time is the stall time);
//! - [`ExpertCache::prefetch`] starts reading predicted experts on a background thread, whose
//!   copies run on the cache's own copy queue, so that reading overlaps compute.
//!
//! A read goes through host buffers aligned to 2 MiB (whole huge pages, and whole pages for
//! CUDA's registration), wrapped once as External memory: `pread` fills one, and a device copy
//! moves it into the expert's own allocation on the copy queue. Reuse of a read buffer waits
//! for the copy out of it (the runtime's epochs), and work that uses an expert on another
//! queue waits for its copy on the device, not on the host: the hazard tracker inserts that
//! wait. An evicted expert's memory is freed through the same epochs, so eviction never frees
//! memory that submitted work still reads, and a handle the caller keeps stays valid.

use super::header::TensorInfo;
use super::load::TENSOR_ALIGN;
use super::WeightsFile;
use crate::buffer::{Buffer, HostMemory, PageBuffer};
use crate::device::Device;
use crate::dtype::DType;
use crate::epoch::Fence;
use crate::error::{Error, Result};
use crate::queue::Queue;
use crate::storage::StorageMode;
use parking_lot::{Condvar, Mutex};
use std::collections::HashMap;
use std::sync::mpsc::{channel, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Alignment (and size granule) of the host buffers reads go through.
pub const READ_ALIGN: usize = 2 << 20;

/// Read buffers: one for the prefetch thread, one for misses on the caller's thread, one more
/// so that a read can start while the previous buffer's copy is still in flight.
const READ_BUFFERS: usize = 3;

/// Which tensors make each expert of each layer.
#[derive(Clone, Debug)]
pub struct ExpertLayout {
    layers: usize,
    experts: usize,
    /// `[layer][expert]`: the expert's tensors, as (short name, tensor).
    members: Vec<Vec<Vec<(String, TensorInfo)>>>,
}

impl ExpertLayout {
    /// The experts of `layers` layers of `experts` experts each, where expert `e` of layer
    /// `l` is every tensor whose name starts with `prefix(l, e)` (end the prefix with a
    /// separator: `"layers.1.experts.1."` must not also match expert 10). Each tensor's short
    /// name is the rest of its name ("w1", "w2", ...).
    ///
    /// Errors: `Format` if an expert has no tensor.
    pub fn by_prefix(
        file: &WeightsFile,
        layers: usize,
        experts: usize,
        prefix: impl Fn(usize, usize) -> String,
    ) -> Result<ExpertLayout> {
        if layers == 0 || experts == 0 {
            return Err(Error::invalid(
                "expert layout",
                format!("{layers} layers x {experts} experts: need at least one of each"),
            ));
        }
        let mut sorted: Vec<&TensorInfo> = file.tensors().iter().collect();
        sorted.sort_by(|a, b| a.name.cmp(&b.name));
        let mut members = Vec::with_capacity(layers);
        for l in 0..layers {
            let mut row = Vec::with_capacity(experts);
            for e in 0..experts {
                let p = prefix(l, e);
                let first = sorted.partition_point(|t| t.name.as_str() < p.as_str());
                let ts: Vec<(String, TensorInfo)> = sorted[first..]
                    .iter()
                    .take_while(|t| t.name.starts_with(p.as_str()))
                    .map(|t| (t.name[p.len()..].to_owned(), (*t).clone()))
                    .collect();
                if ts.is_empty() {
                    return Err(Error::Format {
                        what: file.shown(),
                        detail: format!(
                            "expert {e} of layer {l}: no tensor is named '{}...'",
                            p.escape_debug()
                        ),
                    });
                }
                row.push(ts);
            }
            members.push(row);
        }
        Ok(ExpertLayout {
            layers,
            experts,
            members,
        })
    }

    /// Layers.
    pub fn layers(&self) -> usize {
        self.layers
    }

    /// Experts per layer.
    pub fn experts(&self) -> usize {
        self.experts
    }

    /// Bytes of one expert as packed on the device (each tensor 256-byte aligned).
    pub fn expert_bytes(&self, layer: usize, expert: usize) -> Option<usize> {
        let ts = self.members.get(layer)?.get(expert)?;
        Some(packed(ts).1)
    }
}

/// Offsets of an expert's tensors packed at [`TENSOR_ALIGN`], and the bytes used.
fn packed(ts: &[(String, TensorInfo)]) -> (Vec<usize>, usize) {
    let mut at = 0usize;
    let mut offsets = Vec::with_capacity(ts.len());
    for (_, t) in ts {
        at = at.next_multiple_of(TENSOR_ALIGN);
        offsets.push(at);
        at += t.byte_len() as usize;
    }
    (offsets, at)
}

/// An expert on the device: its tensors by short name. Cheap to clone; it keeps the memory
/// alive after eviction.
#[derive(Clone, Debug)]
pub struct ExpertHandle {
    layer: usize,
    expert: usize,
    tensors: Arc<[(String, Buffer)]>,
    /// The expert's whole allocation, as bytes.
    whole: Buffer,
    fence: Fence,
}

impl ExpertHandle {
    /// The tensor with short name `name` ("w1").
    pub fn get(&self, name: &str) -> Option<&Buffer> {
        self.tensors.iter().find(|(n, _)| n == name).map(|(_, b)| b)
    }

    /// Short name and buffer of every tensor of the expert.
    pub fn tensors(&self) -> impl Iterator<Item = (&str, &Buffer)> {
        self.tensors.iter().map(|(n, b)| (n.as_str(), b))
    }

    /// The layer.
    pub fn layer(&self) -> usize {
        self.layer
    }

    /// The expert's index in its layer.
    pub fn expert(&self) -> usize {
        self.expert
    }

    /// The fence of the copy that brought the expert to the device. Work submitted with these
    /// buffers waits for it on the device by itself; wait on it only to time the copy.
    pub fn fence(&self) -> Fence {
        self.fence
    }
}

/// Counters of an expert cache.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ExpertStats {
    /// `get` calls that found the expert on the device (or being read by a prefetch), not
    /// counting a prefetched expert's first use.
    pub hits: u64,
    /// `get` calls that were the first use of a prefetched expert.
    pub prefetch_hits: u64,
    /// `get` calls that read the expert themselves.
    pub misses: u64,
    /// Experts evicted to make room.
    pub evictions: u64,
    /// Reads started by `prefetch`.
    pub prefetches: u64,
    /// Prefetch requests dropped because the layer's budget was taken by experts being read.
    pub prefetch_dropped: u64,
    /// Bytes read from the file.
    pub bytes_read: u64,
    /// Time `get` spent blocked: reading misses and waiting for prefetches still reading.
    pub stall: Duration,
    /// Experts resident (or being read) now.
    pub resident: usize,
}

impl ExpertStats {
    /// Share of `get` calls served without reading: (hits + prefetch hits) / all.
    pub fn hit_rate(&self) -> f64 {
        let all = self.hits + self.prefetch_hits + self.misses;
        if all == 0 {
            0.0
        } else {
            (self.hits + self.prefetch_hits) as f64 / all as f64
        }
    }
}

impl std::fmt::Display for ExpertStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "hit rate {:.1}% ({} hits, {} prefetch hits, {} misses), {} evictions, {} prefetches \
             ({} dropped), {} read, stall {:.3} ms, {} resident",
            100.0 * self.hit_rate(),
            self.hits,
            self.prefetch_hits,
            self.misses,
            self.evictions,
            self.prefetches,
            self.prefetch_dropped,
            crate::ledger::fmt_bytes(self.bytes_read),
            self.stall.as_secs_f64() * 1e3,
            self.resident
        )
    }
}

enum Status {
    /// Being read (by a miss on a caller's thread or by the prefetch thread).
    Loading,
    Ready,
    Failed(Error),
}

struct Entry {
    status: Status,
    handle: ExpertHandle,
    /// The clock of the last `get`.
    last_use: u64,
    /// Brought in by a prefetch and not used yet.
    prefetched: bool,
}

struct State {
    layers: Vec<HashMap<usize, Entry>>,
    clock: u64,
    stats: ExpertStats,
}

struct Shared {
    dev: Device,
    file: WeightsFile,
    layout: ExpertLayout,
    budget: usize,
    queue: Queue,
    state: Mutex<State>,
    /// Signalled when an entry leaves `Loading`.
    changed: Condvar,
    /// 2 MiB-aligned read buffers (External, U8), each behind a lock held while it is filled.
    reads: Vec<Mutex<Buffer>>,
}

struct Job {
    layer: usize,
    expert: usize,
    handle: ExpertHandle,
}

/// A cache of MoE experts on a device, streamed from a safetensors file.
///
/// ```
/// use unibuf::weights::{ExpertCache, ExpertLayout, WeightsFile};
/// # let dir = std::env::temp_dir().join(format!("unibuf-doc-experts-{}", std::process::id()));
/// # std::fs::create_dir_all(&dir).unwrap();
/// # let path = dir.join("moe.safetensors");
/// # let data = vec![1u8; 64];
/// # let names: Vec<String> = (0..4).map(|e| format!("l0.e{e}.w")).collect();
/// # let views: Vec<_> = names.iter().map(|n| (n.as_str(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![16], &data).unwrap())).collect();
/// # safetensors::serialize_to_file(views, None, &path).unwrap();
/// let dev = unibuf::Device::open("cpu")?;
/// let file = WeightsFile::open(&path)?;
/// let layout = ExpertLayout::by_prefix(&file, 1, 4, |l, e| format!("l{l}.e{e}."))?;
/// let cache = ExpertCache::new(&dev, &file, layout, 2)?; // 2 experts per layer on the device
/// cache.prefetch(0, &[3])?;                              // predicted: read in the background
/// let e = cache.get(0, 1)?;                              // a miss: read now
/// assert_eq!(e.get("w").unwrap().shape(), &[16]);
/// let _ = cache.get(0, 3)?;                              // a prefetch hit
/// let s = cache.stats();
/// assert_eq!((s.misses, s.prefetch_hits), (1, 1));
/// # Ok::<(), unibuf::Error>(())
/// ```
pub struct ExpertCache {
    shared: Arc<Shared>,
    jobs: Option<Sender<Job>>,
    worker: Option<JoinHandle<()>>,
}

impl ExpertCache {
    /// A cache over `file`'s experts as `layout` names them, holding at most
    /// `budget_per_layer` experts of each layer on `dev`. Creates its copy queue and a prefetch
    /// thread.
    pub fn new(
        dev: &Device,
        file: &WeightsFile,
        layout: ExpertLayout,
        budget_per_layer: usize,
    ) -> Result<ExpertCache> {
        if budget_per_layer == 0 {
            return Err(Error::invalid(
                "budget_per_layer",
                "must be at least 1 expert",
            ));
        }
        let largest = layout
            .members
            .iter()
            .flatten()
            .map(|ts| packed(ts).1)
            .max()
            .unwrap_or(0)
            .max(1);
        let mut reads = Vec::with_capacity(READ_BUFFERS);
        for i in 0..READ_BUFFERS {
            let mem = PageBuffer::aligned(largest.next_multiple_of(READ_ALIGN), READ_ALIGN)?;
            let len = mem.byte_len();
            let b =
                dev.wrap_external(&format!("expert read buffer {i}"), mem, DType::U8, &[len])?;
            reads.push(Mutex::new(b));
        }
        let queue = dev.new_queue("experts")?;
        let shared = Arc::new(Shared {
            dev: dev.clone(),
            file: file.clone(),
            state: Mutex::new(State {
                layers: (0..layout.layers).map(|_| HashMap::new()).collect(),
                clock: 0,
                stats: ExpertStats::default(),
            }),
            layout,
            budget: budget_per_layer,
            queue,
            changed: Condvar::new(),
            reads,
        });
        let (tx, rx) = channel::<Job>();
        let worker_shared = shared.clone();
        let worker = std::thread::Builder::new()
            .name("unibuf-experts".to_owned())
            .spawn(move || {
                for job in rx {
                    let r = worker_shared.read(&job.handle, 1);
                    worker_shared.finish(job.layer, job.expert, r);
                }
            })
            .map_err(|e| Error::io("spawning the expert prefetch thread", e))?;
        Ok(ExpertCache {
            shared,
            jobs: Some(tx),
            worker: Some(worker),
        })
    }

    /// The queue the expert copies run on.
    pub fn queue(&self) -> &Queue {
        &self.shared.queue
    }

    /// The layout.
    pub fn layout(&self) -> &ExpertLayout {
        &self.shared.layout
    }

    /// The counters.
    pub fn stats(&self) -> ExpertStats {
        let st = self.shared.state.lock();
        let mut s = st.stats;
        s.resident = st.layers.iter().map(HashMap::len).sum();
        s
    }

    /// The experts of `layer` on the device (or being read), by index.
    pub fn resident(&self, layer: usize) -> Vec<usize> {
        let st = self.shared.state.lock();
        let mut v: Vec<usize> = st
            .layers
            .get(layer)
            .map(|m| m.keys().copied().collect())
            .unwrap_or_default();
        v.sort_unstable();
        v
    }

    fn check(&self, layer: usize, expert: usize) -> Result<()> {
        let l = &self.shared.layout;
        if layer >= l.layers {
            return Err(Error::OutOfBounds {
                what: "expert cache: layer",
                start: layer,
                end: layer + 1,
                len: l.layers,
            });
        }
        if expert >= l.experts {
            return Err(Error::OutOfBounds {
                what: "expert cache: expert",
                start: expert,
                end: expert + 1,
                len: l.experts,
            });
        }
        Ok(())
    }

    /// Expert `expert` of `layer` on the device: at once on a hit; after the prefetch reading
    /// it finishes its host part; or read now on a miss, evicting the least recently used
    /// expert of the layer if its budget is full. Use the buffers on any queue: device work
    /// waits for the expert's copy by itself.
    pub fn get(&self, layer: usize, expert: usize) -> Result<ExpertHandle> {
        self.check(layer, expert)?;
        let sh = &self.shared;
        let started = Instant::now();
        let mut blocked = false;
        let mut st = sh.state.lock();
        loop {
            st.clock += 1;
            let clock = st.clock;
            match st.layers[layer].get_mut(&expert) {
                Some(e) => match &e.status {
                    Status::Ready => {
                        e.last_use = clock;
                        let first_use = std::mem::take(&mut e.prefetched);
                        let h = e.handle.clone();
                        if first_use {
                            st.stats.prefetch_hits += 1;
                        } else {
                            st.stats.hits += 1;
                        }
                        if blocked {
                            st.stats.stall += started.elapsed();
                        }
                        return Ok(h);
                    }
                    Status::Loading => {
                        blocked = true;
                        sh.changed.wait(&mut st);
                        continue;
                    }
                    Status::Failed(err) => {
                        // A later `get` tries again.
                        let err = err.clone();
                        st.layers[layer].remove(&expert);
                        if blocked {
                            st.stats.stall += started.elapsed();
                        }
                        return Err(err);
                    }
                },
                None => {
                    // A miss: make room first (possibly waiting for a read to finish, after
                    // which the expert may have arrived: look again).
                    if st.layers[layer].len() >= sh.budget && !evict_lru(&mut st, layer, &[]) {
                        blocked = true;
                        sh.changed.wait(&mut st);
                        continue;
                    }
                    break;
                }
            }
        }
        st.stats.misses += 1;
        let handle = match sh.allocate(layer, expert) {
            Ok(h) => h,
            Err(e) => {
                st.stats.stall += started.elapsed();
                return Err(e);
            }
        };
        let clock = st.clock;
        st.layers[layer].insert(
            expert,
            Entry {
                status: Status::Loading,
                handle: handle.clone(),
                last_use: clock,
                prefetched: false,
            },
        );
        drop(st);
        let r = sh.read(&handle, 0);
        let fence = r.as_ref().ok().copied();
        sh.finish(layer, expert, r);
        let mut st = sh.state.lock();
        st.stats.stall += started.elapsed();
        match fence {
            Some(fence) => {
                let clock = st.clock;
                if let Some(e) = st.layers[layer].get_mut(&expert) {
                    e.last_use = clock;
                    e.prefetched = false;
                }
                Ok(ExpertHandle { fence, ..handle })
            }
            None => match st.layers[layer].remove(&expert) {
                Some(Entry {
                    status: Status::Failed(err),
                    ..
                }) => Err(err),
                _ => Err(Error::invalid("expert cache", "the read failed")),
            },
        }
    }

    /// Starts reading `experts` of `layer` in the background, in order, as far as the layer's
    /// budget allows: experts already resident are skipped, and when the budget is full the
    /// least recently used expert not in `experts` is evicted; if every resident expert is
    /// being read or is in `experts`, the request is dropped (counted). Never blocks on I/O.
    pub fn prefetch(&self, layer: usize, experts: &[usize]) -> Result<()> {
        for &e in experts {
            self.check(layer, e)?;
        }
        let sh = &self.shared;
        let mut st = sh.state.lock();
        for &e in experts {
            if st.layers[layer].contains_key(&e) {
                continue;
            }
            if st.layers[layer].len() >= sh.budget && !evict_lru(&mut st, layer, experts) {
                st.stats.prefetch_dropped += 1;
                continue;
            }
            let handle = sh.allocate(layer, e)?;
            let clock = st.clock;
            st.layers[layer].insert(
                e,
                Entry {
                    status: Status::Loading,
                    handle: handle.clone(),
                    last_use: clock,
                    prefetched: true,
                },
            );
            st.stats.prefetches += 1;
            let sent = self.jobs.as_ref().is_some_and(|tx| {
                tx.send(Job {
                    layer,
                    expert: e,
                    handle,
                })
                .is_ok()
            });
            if !sent {
                st.layers[layer].remove(&e);
                return Err(Error::invalid(
                    "expert cache",
                    "the prefetch thread has stopped",
                ));
            }
        }
        Ok(())
    }

    /// Waits until no prefetch is reading: every expert resident is ready (or failed).
    pub fn wait_prefetches(&self) {
        let sh = &self.shared;
        let mut st = sh.state.lock();
        while st
            .layers
            .iter()
            .flat_map(|m| m.values())
            .any(|e| matches!(e.status, Status::Loading))
        {
            sh.changed.wait(&mut st);
        }
    }
}

/// Evicts the least recently used ready expert of `layer` that is not in `keep`; false if
/// there is none.
fn evict_lru(st: &mut State, layer: usize, keep: &[usize]) -> bool {
    let victim = st.layers[layer]
        .iter()
        .filter(|(k, e)| matches!(e.status, Status::Ready) && !keep.contains(k))
        .min_by_key(|(_, e)| e.last_use)
        .map(|(k, _)| *k);
    match victim {
        Some(k) => {
            // Dropping the buffers frees the memory once the work using it completes.
            st.layers[layer].remove(&k);
            st.stats.evictions += 1;
            true
        }
        None => false,
    }
}

impl Shared {
    /// A fresh allocation for an expert, viewed per tensor.
    fn allocate(&self, layer: usize, expert: usize) -> Result<ExpertHandle> {
        let ts = &self.layout.members[layer][expert];
        let (offsets, used) = packed(ts);
        let alloc = self.dev.alloc_labelled(
            &format!("expert {layer}.{expert}"),
            DType::U8,
            &[used.max(1)],
            StorageMode::Auto,
        )?;
        let mut tensors = Vec::with_capacity(ts.len());
        for ((name, t), off) in ts.iter().zip(offsets) {
            let n = t.byte_len() as usize;
            let b = alloc
                .slice(off..off + n)?
                .cast(t.dtype)?
                .reshape(&t.shape)?;
            tensors.push((name.clone(), b));
        }
        Ok(ExpertHandle {
            layer,
            expert,
            tensors: tensors.into(),
            whole: alloc,
            fence: self.queue.done_fence(),
        })
    }

    /// Reads an expert into a read buffer (starting with `first`, taking the first one free)
    /// and copies it into the expert's allocation on the copy queue; returns the copy's fence.
    fn read(&self, handle: &ExpertHandle, first: usize) -> Result<Fence> {
        let ts = &self.layout.members[handle.layer][handle.expert];
        let (offsets, used) = packed(ts);
        if used == 0 {
            return Ok(self.queue.done_fence());
        }
        let n = self.reads.len();
        let slot = (0..n)
            .find_map(|i| self.reads[(first + i) % n].try_lock())
            .unwrap_or_else(|| self.reads[first % n].lock());
        {
            // Waits for the copy out of this buffer from its last use.
            let mut host = slot.write::<u8>()?;
            for ((_, t), off) in ts.iter().zip(&offsets) {
                let len = t.byte_len() as usize;
                self.file.read_tensor(t, 0, &mut host[*off..*off + len])?;
            }
        }
        let src = slot.slice(0..used)?;
        let dst = handle.whole.slice(0..used)?;
        let fence = self.queue.copy_async(&src, &dst)?;
        drop(slot);
        let mut st = self.state.lock();
        st.stats.bytes_read += ts.iter().map(|(_, t)| t.byte_len()).sum::<u64>();
        Ok(fence)
    }

    /// Records the end of a read: ready with its fence, or failed with its error.
    fn finish(&self, layer: usize, expert: usize, r: Result<Fence>) {
        let mut st = self.state.lock();
        if let Some(e) = st.layers[layer].get_mut(&expert) {
            match r {
                Ok(fence) => {
                    e.handle.fence = fence;
                    e.status = Status::Ready;
                }
                Err(err) => e.status = Status::Failed(err),
            }
        }
        drop(st);
        self.changed.notify_all();
    }
}

impl Drop for ExpertCache {
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

impl std::fmt::Debug for ExpertCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExpertCache")
            .field("file", &self.shared.file.path())
            .field("layers", &self.shared.layout.layers)
            .field("experts", &self.shared.layout.experts)
            .field("budget_per_layer", &self.shared.budget)
            .finish()
    }
}
