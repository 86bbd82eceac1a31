//! The device: the entry point of unibuf.

mod deferred;
mod faults;
mod hazards;
mod inner;
mod labels;
mod memory;
mod regions;

pub(crate) use hazards::{plan_waits, Waiter};
pub(crate) use inner::{Completion, DeviceInner, Use};
pub(crate) use regions::GrowableRegion;

use crate::alloc::{Budget, MemoryStats};
use crate::backend::{cpu::CpuBackend, Backend, BackendOptions, DeviceInfo, KernelCacheStats};
use crate::buffer::Buffer;
use crate::dtype::{DType, Element};
use crate::epoch::Fence;
use crate::error::{Error, Result};
use crate::kernel::{Constants, Kernel, KernelSource};
use crate::ledger::{Ledger, LedgerReport};
use crate::queue::{Queue, SubmissionStats};
use crate::residency::ResidencyStats;
use crate::storage::StorageMode;
use crate::transfer::staging::StagingConfig;
use std::sync::Arc;

/// The environment variable that picks the backend for [`Device::new`].
pub const BACKEND_ENV: &str = "UNIBUF_BACKEND";

/// A backend's availability, as `unibuf info` prints it.
#[derive(Clone, Debug)]
pub struct BackendStatus {
    /// The backend's name.
    pub name: &'static str,
    /// Whether this build includes it (cargo feature).
    pub compiled: bool,
    /// Whether a device of it was found at run time.
    pub found: bool,
    /// The device name, or why it is not available.
    pub detail: String,
}

/// Every backend, best first, with whether it is compiled in and found.
pub fn backends() -> Vec<BackendStatus> {
    let mut v = Vec::new();
    for name in ["metal", "cuda", "cpu"] {
        let status = match open_backend(name, &BackendOptions::default()) {
            Ok(b) => BackendStatus {
                name,
                compiled: true,
                found: true,
                detail: b.info().name.clone(),
            },
            Err(e) => BackendStatus {
                name,
                compiled: !matches!(&e, Error::BackendUnavailable { reason, .. } if reason.starts_with("not compiled")),
                found: false,
                detail: e.to_string(),
            },
        };
        v.push(status);
    }
    v
}

#[cfg_attr(
    not(any(feature = "cuda", all(feature = "metal", target_vendor = "apple"))),
    allow(unused_variables)
)] // only GPU backends take options
fn open_backend(name: &str, options: &BackendOptions) -> Result<Box<dyn Backend>> {
    match name {
        "cpu" => Ok(Box::new(CpuBackend::new()?)),
        #[cfg(feature = "cuda")]
        "cuda" => Ok(Box::new(crate::backend::cuda::CudaBackend::new(
            cuda_ordinal(),
            options,
        )?)),
        #[cfg(not(feature = "cuda"))]
        "cuda" => Err(Error::BackendUnavailable {
            name: name.to_owned(),
            reason: "not compiled into this build (enable the cargo feature `cuda`)".to_owned(),
        }),
        #[cfg(all(feature = "metal", target_vendor = "apple"))]
        "metal" => Ok(Box::new(crate::backend::metal::MetalBackend::new(options)?)),
        #[cfg(all(feature = "metal", not(target_vendor = "apple")))]
        "metal" => Err(Error::BackendUnavailable {
            name: name.to_owned(),
            reason: "not compiled into this build (the `metal` feature builds the backend on \
                     Apple targets only)"
                .to_owned(),
        }),
        #[cfg(not(feature = "metal"))]
        "metal" => Err(Error::BackendUnavailable {
            name: name.to_owned(),
            reason: format!("not compiled into this build (enable the cargo feature `{name}`)"),
        }),
        other => Err(Error::BackendUnavailable {
            name: other.to_owned(),
            reason: "unknown backend; known: cpu, cuda, metal".to_owned(),
        }),
    }
}

/// Options for opening a device.
///
/// ```
/// let dev = unibuf::Device::builder()
///     .backend("cpu")
///     .memory_limit(1 << 30)
///     .open()?;
/// assert_eq!(dev.info().backend, "cpu");
/// # Ok::<(), unibuf::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct DeviceBuilder {
    backend: Option<String>,
    budget: Budget,
    /// `None`: the ring suited to the device (see `StagingConfig::for_device`).
    staging: Option<StagingConfig>,
    ledger_capacity: usize,
    options: BackendOptions,
}

impl DeviceBuilder {
    /// Where compiled kernels are cached on disk (default: `UNIBUF_CACHE_DIR`, else the user's
    /// cache directory); `None` turns the disk cache off.
    pub fn kernel_cache_dir(mut self, dir: Option<std::path::PathBuf>) -> Self {
        self.options.kernel_cache_dir = Some(dir);
        self
    }
    /// Records the device-side time of every submission for [`Device::submission_stats`] and
    /// Chrome traces where that costs extra (CUDA: two timing events, about a microsecond of
    /// CPU per submission). The CPU and Metal backends always time submissions.
    pub fn gpu_timing(mut self, on: bool) -> Self {
        self.options.gpu_timing = on;
        self
    }
    /// Picks the backend by name ("cpu", "cuda", "metal"); without it, [`Device::new`]'s rule.
    pub fn backend(mut self, name: &str) -> Self {
        self.backend = Some(name.to_owned());
        self
    }
    /// Caps the bytes the allocator may hold from the backend (live plus cached).
    pub fn memory_limit(mut self, bytes: usize) -> Self {
        self.budget.memory_limit = Some(bytes);
        self
    }
    /// Caps the bytes of freed blocks kept for reuse.
    pub fn cache_limit(mut self, bytes: usize) -> Self {
        self.budget.cache_limit = Some(bytes);
        self
    }
    /// Sets the staging ring: chunk size in bytes and number of chunks.
    pub fn staging(mut self, chunk_bytes: usize, max_chunks: usize) -> Self {
        self.staging = Some(StagingConfig {
            chunk_bytes,
            max_chunks,
        });
        self
    }
    /// How many detailed copy and submission records the ledger keeps (totals are unbounded).
    pub fn ledger_capacity(mut self, records: usize) -> Self {
        self.ledger_capacity = records;
        self
    }
    /// Opens the device.
    pub fn open(self) -> Result<Device> {
        if let Some(s) = self.staging {
            if s.chunk_bytes < 4096 || s.max_chunks == 0 {
                return Err(Error::invalid(
                    "staging",
                    format!(
                        "chunks of {} bytes x {}: need at least 4096 bytes and one chunk",
                        s.chunk_bytes, s.max_chunks
                    ),
                ));
            }
        }
        if self.ledger_capacity == 0 {
            return Err(Error::invalid("ledger_capacity", "must be at least 1"));
        }
        let backend = match &self.backend {
            Some(name) => open_backend(name, &self.options)?,
            None => match std::env::var(BACKEND_ENV) {
                Ok(name) if !name.is_empty() => open_backend(&name, &self.options)?,
                _ => best_backend(&self.options)?,
            },
        };
        let staging = self
            .staging
            .unwrap_or_else(|| StagingConfig::for_device(backend.info().unified_memory));
        let inner = DeviceInner::open(backend, self.budget, staging, self.ledger_capacity)?;
        tracing::info!(
            device = inner.id,
            backend = inner.info.backend,
            name = %inner.info.name,
            "device opened"
        );
        Ok(Device { inner })
    }
}

/// The GPU the CUDA backend opens: `UNIBUF_CUDA_DEVICE`, else 0.
#[cfg(feature = "cuda")]
fn cuda_ordinal() -> i32 {
    std::env::var("UNIBUF_CUDA_DEVICE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

fn best_backend(options: &BackendOptions) -> Result<Box<dyn Backend>> {
    let mut reasons = Vec::new();
    for name in ["metal", "cuda", "cpu"] {
        match open_backend(name, options) {
            Ok(b) => return Ok(b),
            Err(e) => reasons.push(e.to_string()),
        }
    }
    Err(Error::BackendUnavailable {
        name: "any".to_owned(),
        reason: reasons.join("; "),
    })
}

/// A device: memory, queues, kernels and the copy ledger of one GPU (or the CPU).
///
/// ```
/// use unibuf::{DType, Device, StorageMode};
/// let dev = Device::open("cpu")?;
/// let q = dev.queue();
/// let w = dev.alloc(DType::F32, &[2, 3], StorageMode::Private)?;
/// q.upload(&w, &[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0])?;   // staged: Private is device-only
/// let back: Vec<f32> = q.download(&w.rows(1..2)?)?;
/// assert_eq!(back, [4.0, 5.0, 6.0]);
/// # Ok::<(), unibuf::Error>(())
/// ```
#[derive(Clone)]
pub struct Device {
    pub(crate) inner: Arc<DeviceInner>,
}

impl Device {
    /// Opens the backend named by `UNIBUF_BACKEND`, or else the best available (Metal, CUDA,
    /// then the CPU). Naming a backend that is absent is an error, never a fallback.
    pub fn new() -> Result<Device> {
        Device::builder().open()
    }

    /// Opens the named backend with default options.
    pub fn open(backend: &str) -> Result<Device> {
        Device::builder().backend(backend).open()
    }

    /// Options for opening a device.
    pub fn builder() -> DeviceBuilder {
        DeviceBuilder {
            backend: None,
            budget: Budget::default(),
            staging: None,
            ledger_capacity: 1 << 20,
            options: BackendOptions::default(),
        }
    }

    /// What the device is.
    pub fn info(&self) -> &DeviceInfo {
        &self.inner.info
    }

    /// A process-unique id, named in `WrongDevice` errors.
    pub fn id(&self) -> u64 {
        self.inner.id
    }

    /// The default queue.
    pub fn queue(&self) -> Queue {
        Queue::default_of(&self.inner)
    }

    /// Creates another queue; work on it runs concurrently with other queues, ordered against
    /// them only where memory is shared (a device-side wait, never a device-wide sync).
    pub fn new_queue(&self, label: &str) -> Result<Queue> {
        let id = self.inner.create_queue(label)?;
        Ok(Queue::new(&self.inner, id))
    }

    /// Allocates a buffer of `dtype` x `shape`. Contents are unspecified until written.
    pub fn alloc(&self, dtype: DType, shape: &[usize], mode: StorageMode) -> Result<Buffer> {
        self.alloc_labelled("", dtype, shape, mode)
    }

    /// Allocates a buffer with a label, which names it in errors, stats and the ledger.
    pub fn alloc_labelled(
        &self,
        label: &str,
        dtype: DType,
        shape: &[usize],
        mode: StorageMode,
    ) -> Result<Buffer> {
        let len = Buffer::checked_len(dtype, shape)?;
        let alloc = self
            .inner
            .allocate(mode, len * dtype.size(), label.to_owned())?;
        Buffer::from_allocation(alloc, 0, dtype, shape)
    }

    /// A new buffer (`StorageMode::Auto`) of `shape` holding `data`, uploaded on the default
    /// queue; `data` must have exactly as many elements as `shape`.
    ///
    /// ```
    /// let dev = unibuf::Device::open("cpu")?;
    /// let w = dev.from_slice("w", &[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3])?;
    /// assert_eq!(dev.queue().download::<f32>(&w.rows(1..2)?)?, [4.0, 5.0, 6.0]);
    /// # Ok::<(), unibuf::Error>(())
    /// ```
    #[track_caller]
    pub fn from_slice<T: Element>(
        &self,
        label: &str,
        data: &[T],
        shape: &[usize],
    ) -> Result<Buffer> {
        let b = self.alloc_labelled(label, T::DTYPE, shape, StorageMode::Auto)?;
        self.queue().upload(&b, data)?;
        Ok(b)
    }

    /// Per-label submission stats: count, CPU encode and wait time, device time (see
    /// [`DeviceBuilder::gpu_timing`] for CUDA). Labels are a queue handle's label, else what
    /// was submitted (a kernel's name, "upload", ...). Print it for a table.
    ///
    /// ```
    /// use unibuf::{DType, Device, FillPattern, StorageMode};
    /// let dev = Device::open("cpu")?;
    /// let b = dev.alloc(DType::F32, &[1 << 16], StorageMode::Private)?;
    /// let q = dev.queue().labelled("clear cache");
    /// for _ in 0..3 {
    ///     q.fill(&b, FillPattern::of(0.0f32))?;
    /// }
    /// let stats = dev.submission_stats();
    /// let clear = stats.get("clear cache").unwrap();
    /// assert_eq!(clear.count, 3);
    /// assert_eq!(clear.timed, 3, "the CPU backend times every submission");
    /// println!("{stats}");
    /// # Ok::<(), unibuf::Error>(())
    /// ```
    pub fn submission_stats(&self) -> SubmissionStats {
        self.inner.submission_stats.snapshot(&*self.inner.backend)
    }

    /// Forgets the submission stats counted so far (to measure one phase of a program).
    pub fn reset_submission_stats(&self) {
        self.inner.submission_stats.clear();
    }

    /// Memory accounting.
    pub fn memory_stats(&self) -> MemoryStats {
        self.inner.memory_stats()
    }

    /// Memory held by live allocations, per label given at allocation (or wrapping): label,
    /// bytes (after rounding) and allocations, most bytes first. A view counts with its
    /// allocation.
    ///
    /// ```
    /// use unibuf::{DType, Device, StorageMode};
    /// let dev = Device::open("cpu")?;
    /// let _kv = dev.alloc_labelled("kv cache", DType::F16, &[4096], StorageMode::Private)?;
    /// assert_eq!(dev.memory_by_label()[0].0, "kv cache");
    /// # Ok::<(), unibuf::Error>(())
    /// ```
    pub fn memory_by_label(&self) -> Vec<(String, usize, usize)> {
        self.inner.owners()
    }

    /// The allocator's segments (used, kept and free ranges, mapped granules) and cached
    /// blocks as they are now. Print it for a listing.
    ///
    /// ```
    /// use unibuf::alloc::RangeState;
    /// use unibuf::{DType, Device, StorageMode};
    /// let dev = Device::open("cpu")?;
    /// let a = dev.alloc(DType::F32, &[1 << 20], StorageMode::Private)?;
    /// let snap = dev.memory_snapshot();
    /// let used: u64 = snap.segments.iter().map(|s| s.bytes_in(RangeState::Used)).sum();
    /// assert!(used >= 4 << 20);
    /// # drop(a);
    /// # Ok::<(), unibuf::Error>(())
    /// ```
    pub fn memory_snapshot(&self) -> crate::alloc::MemorySnapshot {
        self.inner.memory_snapshot()
    }

    /// Starts recording every allocation and free of Shared and Private buffers (those the
    /// caching allocator serves) to `path`, as an allocation trace: CSV with the columns
    /// `action,addr,size,stream`, gzip-compressed when the name ends in `.gz`. Replay it with
    /// `unibuf replay` (or [`alloc::Trace::read`](crate::alloc::Trace::read) and
    /// [`alloc::replay_simulated`](crate::alloc::replay_simulated)) to see how the allocator's
    /// policy does on the program's own pattern.
    ///
    /// Sizes are the bytes asked for; frees of buffers allocated before the recording started
    /// are left out, so the file is a valid trace on its own. Growable buffers map their own
    /// memory and are not in it; the format has no column for the memory kind, so a replay
    /// places Shared and Private blocks alike in device memory. Each allocation and free then
    /// also formats and writes a line (buffered) under the allocator's lock. Errors if a
    /// recording is already running or the file cannot be created.
    ///
    /// ```
    /// use unibuf::{DType, Device, StorageMode};
    /// let dev = Device::open("cpu")?;
    /// let path = std::env::temp_dir().join(format!("unibuf-doc-{}.csv", std::process::id()));
    /// dev.record_alloc_trace(&path)?;
    /// let a = dev.alloc(DType::F32, &[1000], StorageMode::Private)?;
    /// drop(a);
    /// let summary = dev.finish_alloc_trace()?;
    /// assert_eq!((summary.allocs, summary.frees, summary.peak_live_bytes), (1, 1, 4000));
    /// let trace = unibuf::alloc::Trace::read(&path)?;
    /// assert_eq!(unibuf::alloc::replay_simulated(&trace, Default::default())?.peak_live_bytes, 4000);
    /// # std::fs::remove_file(&path).ok();
    /// # Ok::<(), unibuf::Error>(())
    /// ```
    pub fn record_alloc_trace(&self, path: impl AsRef<std::path::Path>) -> Result<()> {
        self.inner.record_alloc_trace(path.as_ref())
    }

    /// Stops the recording [`Device::record_alloc_trace`] started, finishes its file and says
    /// what it holds; errors if none runs or the file could not be written.
    pub fn finish_alloc_trace(&self) -> Result<crate::alloc::TraceSummary> {
        self.inner.finish_alloc_trace()
    }

    /// Releases cached blocks and idle staging chunks to the backend; returns bytes released.
    pub fn trim(&self) -> usize {
        self.inner.trim()
    }

    /// The allocator's limits.
    pub fn budget(&self) -> Budget {
        self.inner.budget()
    }

    /// Changes the allocator's limits; they apply from the next allocation.
    pub fn set_budget(&self, budget: Budget) {
        self.inner.set_budget(budget);
    }

    /// Waits for everything submitted on every queue; surfaces a fault if one happened.
    pub fn drain(&self) -> Result<()> {
        self.inner.drain()
    }

    /// Waits for a fence.
    pub fn wait(&self, fence: Fence) -> Result<()> {
        self.inner.wait(fence)
    }

    /// Whether a fence has completed.
    pub fn is_complete(&self, fence: Fence) -> Result<bool> {
        self.inner.is_complete(fence)
    }

    /// The sticky fault, if the device is in one. Asks every queue, so that a fault in work
    /// nobody has waited for yet is found (and becomes the sticky state).
    pub fn fault(&self) -> Option<Error> {
        self.inner.poll_fault().err()
    }

    /// Leaves the fault state. Memory written by the faulted work (and work queued behind it,
    /// which was discarded) is undefined.
    pub fn reset(&self) -> Result<()> {
        self.inner.reset()
    }

    /// The copy ledger.
    pub fn ledger(&self) -> &Ledger {
        &self.inner.ledger
    }

    /// The copy audit: totals by direction and by call site, with device times where known.
    pub fn copy_report(&self) -> LedgerReport {
        self.inner.ledger.report(&*self.inner.backend)
    }

    /// The ledger's copies and every queue's submissions as Chrome trace JSON (loads in
    /// Perfetto and chrome://tracing).
    pub fn chrome_trace(&self) -> String {
        let names: Vec<String> = (0..self.inner.queue_count())
            .map(|i| self.inner.queue_label(crate::epoch::QueueId(i as u32)))
            .collect();
        self.inner.ledger.chrome_trace(&*self.inner.backend, &names)
    }

    /// Writes [`Device::chrome_trace`] to a file.
    pub fn write_chrome_trace(&self, path: impl AsRef<std::path::Path>) -> Result<()> {
        let path = path.as_ref();
        std::fs::write(path, self.chrome_trace())
            .map_err(|e| Error::io(path.display().to_string(), e))
    }

    /// Registers a kernel by name; it compiles on first use (or in [`Device::warm_all`]).
    pub fn register_kernel(&self, source: KernelSource) -> Result<()> {
        self.inner.kernels.write().register(source)
    }

    /// Names of the registered kernels, sorted.
    pub fn kernel_names(&self) -> Vec<&'static str> {
        self.inner.kernels.read().names()
    }

    /// The registered kernel `name` without constants, compiled (and cached) on first use.
    pub fn kernel(&self, name: &str) -> Result<Kernel> {
        self.kernel_with(name, &Constants::new())
    }

    /// The registered kernel `name` specialised with `constants`, compiled on first use.
    pub fn kernel_with(&self, name: &str, constants: &Constants) -> Result<Kernel> {
        // Constants become `-D NAME=value` (CUDA) or function constants (Metal): identifiers only.
        for (n, _) in constants.iter() {
            let mut chars = n.chars();
            let ok = chars
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !ok {
                return Err(Error::invalid(
                    "constants",
                    format!(
                        "'{}' is not an identifier ([A-Za-z_][A-Za-z0-9_]*)",
                        n.escape_debug()
                    ),
                ));
            }
        }
        let source = self.inner.kernels.read().source(name)?;
        let cached = self.inner.kernels.read().pipeline(source.name, constants);
        let pipeline = match cached {
            Some(p) => p,
            None => {
                let p = self.inner.backend.compile(&source, constants)?;
                self.inner
                    .kernels
                    .write()
                    .insert_pipeline(source.name, constants.clone(), p);
                p
            }
        };
        Ok(Kernel {
            source,
            constants: constants.clone(),
            pipeline,
            device_id: self.inner.id,
        })
    }

    /// How many kernels were compiled, loaded from the disk cache, or found in memory.
    pub fn kernel_cache_stats(&self) -> KernelCacheStats {
        let mut s = self.inner.backend.kernel_cache_stats();
        s.memory_hits = self.inner.kernels.read().memory_hits();
        s
    }

    /// Compiles every registered kernel (without constants) now, and the specialised variants
    /// the built-in ops launch, so that the first launch of each does not pay for compilation.
    /// Returns how many pipelines the cache holds.
    pub fn warm_all(&self) -> Result<usize> {
        for name in self.kernel_names() {
            self.kernel(name)?;
        }
        crate::ops::warm_variants(self)?;
        Ok(self.inner.kernels.read().pipeline_count())
    }

    /// Marks a buffer's allocation resident: it joins the device's working set with the next
    /// submission. Fails with `BudgetExceeded` past the residency budget.
    pub fn make_resident(&self, buffer: &Buffer) -> Result<()> {
        self.check_owned(buffer)?;
        let raw = buffer.alloc.raw();
        self.inner.residency.add(raw.handle, raw.bytes)
    }

    /// Drops a buffer's allocation from the working set once the work that used it completes.
    /// Returns false if it was not resident.
    pub fn evict(&self, buffer: &Buffer) -> Result<bool> {
        self.check_owned(buffer)?;
        let fences = buffer.alloc.uses().all_fences();
        let removed = self
            .inner
            .residency
            .remove(buffer.alloc.raw().handle, &fences);
        self.inner.poll_deferred();
        Ok(removed)
    }

    /// Whether a buffer's allocation is marked resident.
    pub fn is_resident(&self, buffer: &Buffer) -> bool {
        self.inner.residency.contains(buffer.alloc.raw().handle)
    }

    /// Sets the residency budget in bytes (`None`: unlimited).
    pub fn set_residency_budget(&self, bytes: Option<usize>) {
        self.inner.residency.set_budget(bytes);
    }

    /// Replays an allocation trace through a fresh allocator over this device's Private memory
    /// (with this device's budget), releasing everything at the end.
    pub fn replay(&self, trace: &crate::alloc::Trace) -> Result<crate::alloc::ReplayReport> {
        self.inner.check_fault()?;
        crate::alloc::replay::replay(
            &*self.inner.backend,
            crate::storage::MemoryKind::Device,
            trace,
            self.inner.budget(),
        )
    }

    /// Residency figures.
    pub fn residency_stats(&self) -> ResidencyStats {
        self.inner.poll_deferred();
        self.inner.residency.stats()
    }

    fn check_owned(&self, buffer: &Buffer) -> Result<()> {
        if buffer.alloc.device.id != self.inner.id {
            return Err(Error::WrongDevice {
                what: "buffer",
                expected: self.inner.id,
                got: buffer.alloc.device.id,
            });
        }
        Ok(())
    }
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("id", &self.inner.id)
            .field("backend", &self.inner.info.backend)
            .field("name", &self.inner.info.name)
            .finish()
    }
}
