//! The backend trait: the small unsafe surface each platform implements.
//!
//! A backend hands out raw memory by [`MemoryKind`], runs ordered submissions of [`Command`]s on
//! queues, reports completed epochs (surfacing faults), and compiles kernels. It knows nothing of
//! buffers, views, dtypes, pools, staging, hazards or the ledger: that policy lives once in the
//! core above this trait, so every backend behaves alike and the CPU backend tests it in CI.
//!
//! The trait's unsafe methods state their contracts under `# Safety`; the core is their only
//! caller and upholds them.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(all(feature = "metal", target_vendor = "apple"))]
pub mod metal;

use crate::epoch::{Epoch, Fence, QueueId};
use crate::error::Result;
use crate::interop::{
    ExternalWork, ForeignMemory, ForeignSignal, NativeBuffer, NativeDevice, NativeQueue,
    NativeWaiter,
};
use crate::kernel::{Constants, KernelSource, ScalarArg};
use crate::storage::{MemoryAccess, MemoryKind};
use crate::DType;
use std::ptr::NonNull;

/// What a device is and what it can do.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    /// The device's name ("NVIDIA H200", "Apple M3 Max", "CPU (16 threads)").
    pub name: String,
    /// The backend's name: "cpu", "cuda" or "metal".
    pub backend: &'static str,
    /// Whether host and device share memory, so that `Auto` means `Shared`.
    pub unified_memory: bool,
    /// Total memory of the device in bytes.
    pub total_memory: usize,
    /// The host page size; External memory is wrapped in whole pages of this size.
    pub page_size: usize,
    /// The largest single allocation the backend accepts.
    pub max_buffer_len: usize,
    /// The alignment of every address `allocate` returns.
    pub alloc_alignment: usize,
    /// Whether the backend reports device-side execution times of submissions.
    pub timestamps: bool,
}

/// Raw memory owned by the core, returned to the backend only through [`Backend::release`].
#[derive(Debug)]
pub struct RawAlloc {
    /// The address the device uses (a host address on the CPU backend).
    pub addr: u64,
    /// The backend's own handle (an object pointer, an index); opaque to the core.
    pub handle: u64,
    /// Length in bytes.
    pub bytes: usize,
    /// What kind of memory it is.
    pub kind: MemoryKind,
}

impl RawAlloc {
    /// A byte range of this allocation, for commands. The caller checks the bounds.
    pub fn range(&self, offset: usize, bytes: usize) -> RawRange {
        debug_assert!(offset + bytes <= self.bytes);
        RawRange {
            addr: self.addr,
            handle: self.handle,
            offset,
            bytes,
        }
    }
}

/// A byte range of a [`RawAlloc`], as commands name memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawRange {
    /// The allocation's base address.
    pub addr: u64,
    /// The allocation's backend handle.
    pub handle: u64,
    /// Offset of the range within the allocation.
    pub offset: usize,
    /// Length of the range in bytes.
    pub bytes: usize,
}

/// A repeating byte pattern of width 1, 2, 4 or 8 for fills.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FillPattern {
    bytes: [u8; 8],
    width: u8,
}

impl FillPattern {
    /// A one-byte pattern.
    pub const fn u8(v: u8) -> FillPattern {
        FillPattern::from_bytes(&[v])
    }
    /// A two-byte pattern in native byte order.
    pub const fn u16(v: u16) -> FillPattern {
        FillPattern::from_bytes(&v.to_ne_bytes())
    }
    /// A four-byte pattern in native byte order (an f32 via `to_bits`).
    pub const fn u32(v: u32) -> FillPattern {
        FillPattern::from_bytes(&v.to_ne_bytes())
    }
    /// An eight-byte pattern in native byte order.
    pub const fn u64(v: u64) -> FillPattern {
        FillPattern::from_bytes(&v.to_ne_bytes())
    }
    /// The pattern that fills with `value` of any element type of size 1, 2, 4 or 8.
    ///
    /// ```
    /// let p = unibuf::FillPattern::of(1.5f32);
    /// assert_eq!(p.width(), 4);
    /// ```
    pub fn of<T: crate::Element>(value: T) -> FillPattern {
        FillPattern::from_bytes(bytemuck::bytes_of(&value))
    }
    const fn from_bytes(b: &[u8]) -> FillPattern {
        let mut bytes = [0u8; 8];
        let mut i = 0;
        while i < b.len() {
            bytes[i] = b[i];
            i += 1;
        }
        FillPattern {
            bytes,
            width: b.len() as u8,
        }
    }
    /// Bytes per repetition: 1, 2, 4 or 8.
    pub const fn width(&self) -> usize {
        self.width as usize
    }
    /// The pattern's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes[..self.width as usize]
    }
}

/// A compiled kernel, as the backend identifies it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PipelineId(pub u64);

/// One argument of a launch, already validated by the core.
#[derive(Clone, Copy, Debug)]
pub enum LaunchArg {
    /// A buffer range. Writable ranges overlap no other argument of the same launch.
    Buffer {
        /// The bytes.
        range: RawRange,
        /// The element type the kernel sees.
        dtype: DType,
        /// Whether the kernel may write it.
        writable: bool,
    },
    /// A scalar passed by value.
    Scalar(ScalarArg),
}

/// Launch geometry: a grid of blocks (CUDA) / threadgroups (Metal) of `block` threads.
/// The CPU backend passes it to the kernel, which decides how to use it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchDims {
    /// Blocks in x, y, z.
    pub grid: [u32; 3],
    /// Threads per block in x, y, z.
    pub block: [u32; 3],
}

impl LaunchDims {
    /// `blocks` blocks of `threads` threads along x.
    pub const fn linear(blocks: u32, threads: u32) -> LaunchDims {
        LaunchDims {
            grid: [blocks, 1, 1],
            block: [threads, 1, 1],
        }
    }
}

/// One command of a submission; a queue executes its commands in order.
#[derive(Clone, Debug)]
pub enum Command {
    /// Copy `src.bytes` bytes from `src` to `dst` (same length; they do not overlap).
    Copy {
        /// Source range.
        src: RawRange,
        /// Destination range.
        dst: RawRange,
    },
    /// Fill `dst` with a repeating pattern; `dst.bytes` and its address are multiples of the width.
    Fill {
        /// Destination range.
        dst: RawRange,
        /// The pattern.
        pattern: FillPattern,
    },
    /// Run a compiled kernel.
    Launch {
        /// The pipeline from [`Backend::compile`].
        pipeline: PipelineId,
        /// Launch geometry.
        dims: LaunchDims,
        /// Arguments in kernel order.
        args: Vec<LaunchArg>,
    },
    /// Wait until another queue's fence completes before running the rest (a device-side wait:
    /// cuStreamWaitEvent, an MTLSharedEvent wait).
    Wait(Fence),
    /// Run foreign work (`Queue::external`): call the closure once with the queue's native
    /// stream or command buffer (CUDA, Metal: while encoding; CPU: on the worker, in order).
    External(ExternalWork),
    /// Wait for work unibuf did not submit before running the rest (a device-side wait on a
    /// foreign event; on the CPU, a host signal).
    WaitForeign(ForeignSignal),
    /// Run a fixed sequence of launches recorded once (a [`LaunchBatch`](crate::LaunchBatch)),
    /// in order. A backend may prepare it once and replay it as a unit (CUDA: a graph
    /// instantiated on first use and launched with one call).
    Batch {
        /// Identifies the batch for a backend's cache; unique in the process.
        id: u64,
        /// The launches, in order.
        launches: std::sync::Arc<[BatchedLaunch]>,
    },
}

/// One launch of a [`Command::Batch`].
#[derive(Clone, Debug)]
pub struct BatchedLaunch {
    /// The pipeline from [`Backend::compile`].
    pub pipeline: PipelineId,
    /// Launch geometry.
    pub dims: LaunchDims,
    /// Arguments in kernel order.
    pub args: Vec<LaunchArg>,
}

/// An ordered list of commands with the label that names it in stats and faults.
#[derive(Clone, Copy, Debug)]
pub struct Submission<'a> {
    /// The label.
    pub label: &'a str,
    /// The commands, run in order.
    pub commands: &'a [Command],
    /// Whether the caller will wait for this very submission while later ones are in flight
    /// (staging chunks): then its completion must be observable on its own, even where the
    /// backend otherwise tracks completion only for the queue as a whole.
    pub exact_completion: bool,
}

/// Device-side start and end of a submission, in nanoseconds on the backend's own clock,
/// whose zero is the backend's creation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GpuSpan {
    /// Start in ns.
    pub start_ns: u64,
    /// End in ns.
    pub end_ns: u64,
}

/// Options a backend is opened with.
#[derive(Clone, Debug, Default)]
pub struct BackendOptions {
    /// The kernel cache directory: `None` for the default, `Some(None)` for no disk cache.
    pub kernel_cache_dir: Option<Option<std::path::PathBuf>>,
    /// Record device-side times of every submission where that costs extra (CUDA: two timing
    /// events per submission). Backends that time for free (CPU, Metal) always do.
    pub gpu_timing: bool,
}

/// Counts of the pipeline cache's layers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelCacheStats {
    /// Pipelines built by compiling source.
    pub compiled: u64,
    /// Pipelines built from a binary in the disk cache (nothing compiled).
    pub disk_hits: u64,
    /// Lookups answered by the in-memory pipeline cache.
    pub memory_hits: u64,
}

/// Virtual memory: an address range reserved once, with physical memory mapped into it and
/// out of it in granules. The allocator places blocks in such a range so that freed memory can
/// go back to the system page by page, whatever sizes come and go (CUDA's cuMemAddressReserve /
/// cuMemCreate / cuMemMap; anonymous mappings on the CPU).
pub trait VirtualMemory: Send + Sync {
    /// The mapping granule in bytes (a power of two).
    fn granularity(&self) -> usize;

    /// Reserves `bytes` (a multiple of the granularity) of address space for `kind` memory;
    /// returns its base. Nothing is mapped yet.
    ///
    /// # Safety
    /// Released only through `unreserve`, after every granule was unmapped.
    unsafe fn reserve(&self, kind: MemoryKind, bytes: usize) -> Result<u64>;

    /// Maps physical memory at `addr..addr + bytes` (granule-aligned, inside a reservation).
    ///
    /// # Safety
    /// The range lies in a reservation of this backend and is not mapped.
    unsafe fn map(&self, kind: MemoryKind, addr: u64, bytes: usize) -> Result<()>;

    /// Unmaps `addr..addr + bytes`, returning its physical memory.
    ///
    /// # Safety
    /// The range is mapped, and no pending work and no live buffer uses it.
    unsafe fn unmap(&self, kind: MemoryKind, addr: u64, bytes: usize);

    /// Unmaps `addr..addr + bytes` like `unmap`, but may keep its physical memory for the next
    /// `map` of `kind` memory instead of returning it. The allocator moves memory this way when
    /// it must unmap idle granules to stay within its bound right before mapping new ones:
    /// where creating and releasing physical memory costs driver calls (CUDA: about 10 µs each
    /// per granule), a move then costs only the unmap and the map. The default returns the
    /// memory, as `unmap` does.
    ///
    /// # Safety
    /// As `unmap`; and the caller calls `release_kept(kind)` before it returns to its own
    /// caller, so that kept memory never outlives the allocation that prompted the move.
    unsafe fn unmap_for_reuse(&self, kind: MemoryKind, addr: u64, bytes: usize) {
        // SAFETY: the caller's contract is `unmap`'s.
        unsafe { self.unmap(kind, addr, bytes) }
    }

    /// Returns the physical memory that `unmap_for_reuse` kept and no `map` took.
    fn release_kept(&self, kind: MemoryKind) {
        let _ = kind;
    }

    /// Releases a reservation.
    ///
    /// # Safety
    /// Nothing in it is mapped.
    unsafe fn unreserve(&self, kind: MemoryKind, base: u64, bytes: usize);
}

/// Residency control for backends that page memory in and out of the device's working set
/// (Metal residency sets). The core batches additions and defers removals by epoch.
pub trait ResidencyHooks: Send + Sync {
    /// Asks for allocations (by handle) to become resident at the next commit.
    fn add(&self, handles: &[u64]);
    /// Drops allocations from the resident set at the next commit.
    ///
    /// # Safety
    /// No submitted work that uses these allocations may still be pending.
    unsafe fn remove(&self, handles: &[u64]);
    /// Applies the pending additions and removals; called once per submission at most.
    fn commit(&self);
    /// Bytes currently resident through this set.
    fn resident_bytes(&self) -> usize;
}

/// The queue `id` of a backend's queue list, or an error naming the queues there are.
pub(crate) fn queue_by_id<Q>(
    queues: &parking_lot::RwLock<Vec<std::sync::Arc<Q>>>,
    id: QueueId,
) -> Result<std::sync::Arc<Q>> {
    let queues = queues.read();
    queues.get(id.0 as usize).cloned().ok_or_else(|| {
        crate::Error::invalid(
            "queue",
            format!("{id} does not exist ({} queues)", queues.len()),
        )
    })
}

/// Whether `fence` has retired: its queue completed it, or its queue faulted, so that the work
/// will never run and the memory it named is no longer in use. For freeing and reuse.
pub(crate) fn fence_retired(backend: &dyn Backend, fence: Fence) -> bool {
    fence.epoch == 0
        || match backend.completed(fence.queue) {
            Ok(c) => c >= fence.epoch,
            // A faulted queue discards its pending work (also across `reset`).
            Err(crate::Error::DeviceFault { .. }) => true,
            Err(_) => false,
        }
}

/// Whether every fence of `fences` has retired (see `fence_retired`).
pub(crate) fn fences_retired(backend: &dyn Backend, fences: &crate::epoch::FenceSet) -> bool {
    fences.iter().all(|f| fence_retired(backend, f))
}

/// A platform's memory, queues and kernels.
pub trait Backend: Send + Sync {
    /// What the device is.
    fn info(&self) -> &DeviceInfo;

    /// Allocates `bytes` bytes of `kind` memory, aligned to `info().alloc_alignment`.
    ///
    /// # Safety
    /// `kind` is not `HostRegistered` (that memory comes from `wrap_host`). The returned memory is
    /// released only through `release`, once no pending work uses it.
    unsafe fn allocate(&self, kind: MemoryKind, bytes: usize) -> Result<RawAlloc>;

    /// Returns memory to the platform (or unregisters wrapped host memory).
    ///
    /// # Safety
    /// `raw` came from this backend, and no submitted work that uses it is still pending.
    unsafe fn release(&self, raw: RawAlloc);

    /// Makes caller memory addressable by the device without copying.
    ///
    /// # Safety
    /// `ptr` and `bytes` are multiples of `info().page_size`, the memory is valid for reads (and
    /// writes if `access` is `ReadWrite`) for `bytes` bytes, and it stays valid until `release`
    /// returns.
    unsafe fn wrap_host(
        &self,
        ptr: NonNull<u8>,
        bytes: usize,
        access: MemoryAccess,
    ) -> Result<RawAlloc>;

    /// The host address of host-visible memory (`HostShared`, `HostRegistered`); `None` for
    /// memory the host must not touch.
    fn host_ptr(&self, raw: &RawAlloc) -> Option<NonNull<u8>>;

    /// Creates a queue: an in-order stream of submissions.
    fn create_queue(&self) -> Result<QueueId>;

    /// Enqueues a submission and returns its epoch on `queue` (the previous epoch + 1).
    ///
    /// # Safety
    /// Every range the commands name lies inside memory of this backend that stays allocated
    /// until the returned epoch completes; writable ranges are not accessed by the host until
    /// then; launch arguments match the pipeline's parameters; `Wait` names a fence already
    /// submitted.
    unsafe fn submit(&self, queue: QueueId, submission: Submission<'_>) -> Result<Epoch>;

    /// The latest completed epoch of `queue`, or the fault that stopped it.
    fn completed(&self, queue: QueueId) -> Result<Epoch>;

    /// Blocks until `epoch` of `queue` completes, or returns the fault that stopped it.
    fn wait(&self, queue: QueueId, epoch: Epoch) -> Result<()>;

    /// Device-side timing of a completed submission, where the backend records it.
    fn gpu_span(&self, queue: QueueId, epoch: Epoch) -> Option<GpuSpan>;

    /// Drops whatever the backend prepared for batch `id` (it will not be submitted again).
    /// Submissions already made with it still run to completion.
    fn forget_batch(&self, _id: u64) {}

    /// Compiles (or looks up) a kernel for this backend with the given constants.
    fn compile(&self, kernel: &KernelSource, constants: &Constants) -> Result<PipelineId>;

    /// How many pipelines were compiled and how many came from the disk cache.
    fn kernel_cache_stats(&self) -> KernelCacheStats {
        KernelCacheStats::default()
    }

    /// Clears a sticky fault so that queues run again; memory written by faulted work is undefined.
    fn reset(&self) -> Result<()>;

    /// Free device memory in bytes, where the platform reports it.
    fn free_memory(&self) -> Option<usize> {
        None
    }

    /// Virtual memory for `kind`, for backends that can map memory in granules; without it the
    /// allocator caches whole blocks from `allocate`.
    fn virtual_memory(&self, _kind: MemoryKind) -> Option<&dyn VirtualMemory> {
        None
    }

    /// Residency control, for backends that have it.
    fn residency(&self) -> Option<&dyn ResidencyHooks> {
        None
    }

    /// The platform's name for a range of memory of this backend (the caller checked bounds).
    fn native_buffer(&self, range: &RawRange) -> Result<NativeBuffer>;

    /// The platform object of a queue.
    fn native_queue(&self, queue: QueueId) -> Result<NativeQueue>;

    /// The platform objects of the device.
    fn native_device(&self) -> NativeDevice;

    /// Makes `bytes` of memory another framework owns addressable as a `Foreign` allocation,
    /// without copying; `release` forgets it without freeing it. Refuses memory this device
    /// cannot address (another device's, a kind foreign to the backend) or, where the platform
    /// can tell, a range not inside one allocation.
    ///
    /// # Safety
    /// The memory is valid for `bytes` bytes until `release` returns.
    unsafe fn wrap_foreign(&self, memory: &ForeignMemory, bytes: usize) -> Result<RawAlloc>;

    /// Makes foreign work wait for a submitted `fence` of this backend (device-side):
    /// `NativeWaiter::Host` is handled by the core.
    ///
    /// # Safety
    /// The waiter's handle is a live object of this device, usable as the variant says.
    unsafe fn order_native(&self, fence: Fence, waiter: NativeWaiter) -> Result<()>;
}
