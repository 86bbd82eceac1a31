//! The CPU backend: host memory, one worker thread per queue, kernels as Rust functions.
//!
//! It is the embedded default and what CI runs, so it behaves like a discrete GPU wherever the
//! core's policy is concerned: work is asynchronous (a queue's submissions run on its own
//! thread), Private memory is refused to the host and reached through staging, and faults are
//! sticky. That makes hazards, epochs and staging real, and tested, on every machine.

mod kernel_abi;
mod queue;

pub use kernel_abi::{CpuKernelArgs, CpuKernelFn};

use crate::backend::{
    Backend, DeviceInfo, GpuSpan, KernelCacheStats, PipelineId, RawAlloc, Submission, VirtualMemory,
};
use crate::backend::{Command, RawRange};
use crate::epoch::{Epoch, Fence, QueueId};
use crate::error::{Error, Result};
use crate::interop::{
    ForeignMemory, ForeignSignal, NativeBuffer, NativeDevice, NativeHandle, NativeQueue,
    NativeWaiter,
};
use crate::kernel::{Constants, KernelSource};
use crate::storage::{MemoryAccess, MemoryKind};
use parking_lot::RwLock;
use queue::CpuQueue;
use std::alloc::Layout;
use std::ptr::NonNull;
use std::sync::Arc;
use std::time::Instant;

/// Alignment of every CPU allocation: enough for any dtype and for 256-bit vector loads of a
/// whole cache line pair, matching the CUDA driver's allocation alignment.
const ALIGN: usize = 256;

/// From this size on, memory comes from anonymous mappings: page-aligned (more than `ALIGN`)
/// and zeroed lazily by the OS, so a large allocation costs no upfront zeroing pass.
const MAP_THRESHOLD: usize = 1 << 20;

/// Compiled CPU pipelines: the kernel function and its constants, by pipeline id.
#[derive(Default)]
pub(crate) struct Pipelines(RwLock<Vec<(CpuKernelFn, Constants, &'static str)>>);

impl Pipelines {
    fn get(&self, id: PipelineId) -> Option<(CpuKernelFn, Constants)> {
        let v = self.0.read();
        v.get(id.0 as usize).map(|(f, c, _)| (*f, c.clone()))
    }
}

/// The CPU backend. Created through [`Device::open`](crate::Device::open)`("cpu")`.
pub struct CpuBackend {
    info: DeviceInfo,
    queues: Arc<RwLock<Vec<Arc<CpuQueue>>>>,
    pipelines: Arc<Pipelines>,
    clock: Instant,
    next_wrap: std::sync::atomic::AtomicU64,
}

impl CpuBackend {
    /// Opens the CPU backend.
    pub fn new() -> Result<CpuBackend> {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let page_size = host_page_size();
        let total_memory = physical_memory(page_size);
        Ok(CpuBackend {
            info: DeviceInfo {
                name: format!("CPU ({threads} threads)"),
                backend: "cpu",
                unified_memory: true,
                total_memory,
                page_size,
                max_buffer_len: total_memory,
                alloc_alignment: ALIGN,
                timestamps: true,
            },
            queues: Arc::new(RwLock::new(Vec::new())),
            pipelines: Arc::new(Pipelines::default()),
            clock: Instant::now(),
            next_wrap: std::sync::atomic::AtomicU64::new(1),
        })
    }

    /// A handle for wrapped memory. Two wraps can cover the same pages: a handle of its own for
    /// each, so that residency (keyed by handle) tells them apart. The high bit keeps these
    /// apart from the addresses other kinds use as handles.
    fn wrap_handle(&self) -> u64 {
        (1 << 63)
            | self
                .next_wrap
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    fn queue(&self, id: QueueId) -> Result<Arc<CpuQueue>> {
        crate::backend::queue_by_id(&self.queues, id)
    }
}

impl Drop for CpuBackend {
    fn drop(&mut self) {
        let queues = std::mem::take(&mut *self.queues.write());
        for q in queues {
            q.shutdown();
        }
    }
}

impl Backend for CpuBackend {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    unsafe fn allocate(&self, kind: MemoryKind, bytes: usize) -> Result<RawAlloc> {
        debug_assert_ne!(kind, MemoryKind::HostRegistered);
        let oom = || Error::OutOfMemory {
            requested: bytes,
            reserved: 0,
            free: self.free_memory().unwrap_or(0),
            largest_free: 0,
        };
        let ptr = if bytes >= MAP_THRESHOLD {
            // SAFETY: an anonymous private mapping has no preconditions. Its pages are zero and
            // are only touched (and backed) when first written, unlike an over-aligned
            // `alloc_zeroed`, which zeroes every byte up front.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    bytes,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(oom());
            }
            p.cast::<u8>()
        } else {
            let layout = Layout::from_size_align(bytes.max(1), ALIGN).map_err(|_| oom())?;
            // SAFETY: the layout has a non-zero size. Zeroed so that host reads of a buffer
            // never written are defined.
            let p = unsafe { std::alloc::alloc_zeroed(layout) };
            if p.is_null() {
                return Err(oom());
            }
            p
        };
        Ok(RawAlloc {
            addr: ptr as u64,
            handle: ptr as u64,
            bytes,
            kind,
        })
    }

    unsafe fn release(&self, raw: RawAlloc) {
        if matches!(raw.kind, MemoryKind::HostRegistered | MemoryKind::Foreign) {
            return; // wrapped caller or foreign memory: the core drops its owner
        }
        if raw.bytes >= MAP_THRESHOLD {
            // SAFETY: `raw` came from `allocate`, which mapped exactly this range (same size
            // rule), and no pending work uses it (the contract).
            unsafe { libc::munmap(raw.addr as *mut libc::c_void, raw.bytes) };
            return;
        }
        // SAFETY: `raw` came from `allocate` with this size and alignment (the contract), so
        // the layout matches the one it was allocated with.
        unsafe {
            std::alloc::dealloc(
                raw.addr as *mut u8,
                Layout::from_size_align_unchecked(raw.bytes.max(1), ALIGN),
            )
        };
    }

    unsafe fn wrap_host(
        &self,
        ptr: NonNull<u8>,
        bytes: usize,
        _access: MemoryAccess,
    ) -> Result<RawAlloc> {
        Ok(RawAlloc {
            addr: ptr.as_ptr() as u64,
            handle: self.wrap_handle(),
            bytes,
            kind: MemoryKind::HostRegistered,
        })
    }

    fn host_ptr(&self, raw: &RawAlloc) -> Option<NonNull<u8>> {
        match raw.kind {
            // Private memory is host memory here, but the API refuses to map it so that code
            // tested on the CPU also works on a discrete GPU.
            MemoryKind::Device => None,
            MemoryKind::HostShared | MemoryKind::HostRegistered | MemoryKind::Foreign => {
                NonNull::new(raw.addr as *mut u8)
            }
        }
    }

    fn create_queue(&self) -> Result<QueueId> {
        let mut queues = self.queues.write();
        let id = QueueId(queues.len() as u32);
        let q = CpuQueue::spawn(
            id,
            Arc::downgrade(&self.queues),
            self.pipelines.clone(),
            self.clock,
        )?;
        queues.push(Arc::new(q));
        Ok(id)
    }

    unsafe fn submit(&self, queue: QueueId, submission: Submission<'_>) -> Result<Epoch> {
        // Refused here, not on the worker: a wait that cannot be carried out is an argument
        // error of this call, not a fault of the queue.
        for c in submission.commands {
            if let Command::WaitForeign(signal) = c {
                if !matches!(signal, ForeignSignal::Host(_)) {
                    return Err(Error::Unsupported {
                        backend: "cpu",
                        what: format!(
                            "waiting for {signal:?}: the CPU has no native streams or events (use a HostSignal)"
                        ),
                    });
                }
            }
        }
        self.queue(queue)?
            .submit(submission.label, submission.commands.to_vec())
    }

    fn completed(&self, queue: QueueId) -> Result<Epoch> {
        self.queue(queue)?.shared.completed()
    }

    fn wait(&self, queue: QueueId, epoch: Epoch) -> Result<()> {
        self.queue(queue)?.shared.wait(epoch)
    }

    fn gpu_span(&self, queue: QueueId, epoch: Epoch) -> Option<GpuSpan> {
        self.queue(queue).ok()?.shared.span(epoch)
    }

    fn compile(&self, kernel: &KernelSource, constants: &Constants) -> Result<PipelineId> {
        let f = kernel.cpu.ok_or_else(|| Error::Compile {
            kernel: kernel.name.to_owned(),
            log: "no CPU implementation was given".to_owned(),
        })?;
        let mut v = self.pipelines.0.write();
        v.push((f, constants.clone(), kernel.name));
        Ok(PipelineId(v.len() as u64 - 1))
    }

    fn kernel_cache_stats(&self) -> KernelCacheStats {
        let compiled = self.pipelines.0.read().len() as u64;
        KernelCacheStats {
            compiled,
            ..KernelCacheStats::default()
        }
    }

    fn reset(&self) -> Result<()> {
        for q in self.queues.read().iter() {
            q.shared.reset();
        }
        Ok(())
    }

    fn virtual_memory(&self, kind: MemoryKind) -> Option<&dyn VirtualMemory> {
        (kind != MemoryKind::HostRegistered).then_some(self as &dyn VirtualMemory)
    }

    #[cfg(target_os = "linux")]
    fn free_memory(&self) -> Option<usize> {
        // SAFETY: sysconf has no preconditions.
        let pages = unsafe { libc::sysconf(libc::_SC_AVPHYS_PAGES) };
        usize::try_from(pages).ok().map(|p| p * self.info.page_size)
    }

    fn native_buffer(&self, range: &RawRange) -> Result<NativeBuffer> {
        Ok(NativeBuffer::Host {
            ptr: NativeHandle::from_addr(range.addr as usize + range.offset),
            bytes: range.bytes,
        })
    }

    fn native_queue(&self, queue: QueueId) -> Result<NativeQueue> {
        self.queue(queue)?;
        Ok(NativeQueue::Cpu { queue })
    }

    fn native_device(&self) -> NativeDevice {
        NativeDevice::Cpu
    }

    unsafe fn wrap_foreign(&self, memory: &ForeignMemory, bytes: usize) -> Result<RawAlloc> {
        let ForeignMemory::Host { ptr } = *memory else {
            return Err(Error::Unsupported {
                backend: "cpu",
                what: format!("foreign memory {memory:?}: only host memory (DLPack kDLCPU) is addressable here"),
            });
        };
        Ok(RawAlloc {
            addr: ptr.addr() as u64,
            handle: self.wrap_handle(),
            bytes,
            kind: MemoryKind::Foreign,
        })
    }

    unsafe fn order_native(&self, _fence: Fence, waiter: NativeWaiter) -> Result<()> {
        Err(Error::Unsupported {
            backend: "cpu",
            what: format!("ordering {waiter:?} (the CPU has no native streams; wait on the host, NativeWaiter::Host)"),
        })
    }

    // `_SC_AVPHYS_PAGES` is Linux-only (macOS has no sysconf for free memory): elsewhere the
    // figure is unknown, as the trait allows.
    #[cfg(not(target_os = "linux"))]
    fn free_memory(&self) -> Option<usize> {
        None
    }
}

/// Host virtual memory: a reservation is an inaccessible anonymous mapping; mapping makes pages
/// readable and writable (the OS backs them, zeroed, on first touch); unmapping gives the
/// physical pages back and makes them inaccessible again.
impl VirtualMemory for CpuBackend {
    fn granularity(&self) -> usize {
        CPU_GRANULE
    }

    unsafe fn reserve(&self, _kind: MemoryKind, bytes: usize) -> Result<u64> {
        // SAFETY: a fresh anonymous mapping; NORESERVE: address space only, no memory commit.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(Error::OutOfMemory {
                requested: bytes,
                reserved: 0,
                free: 0,
                largest_free: 0,
            });
        }
        Ok(p as u64)
    }

    unsafe fn map(&self, _kind: MemoryKind, addr: u64, bytes: usize) -> Result<()> {
        // SAFETY: the range lies in our reservation (the contract).
        let r = unsafe {
            libc::mprotect(
                addr as *mut libc::c_void,
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
            )
        };
        if r != 0 {
            return Err(Error::OutOfMemory {
                requested: bytes,
                reserved: 0,
                free: self.free_memory().unwrap_or(0),
                largest_free: 0,
            });
        }
        Ok(())
    }

    unsafe fn unmap(&self, _kind: MemoryKind, addr: u64, bytes: usize) {
        // SAFETY: the range is mapped and unused (the contract). DONTNEED drops the pages (they
        // read as zero if mapped again); PROT_NONE makes stray accesses fault.
        unsafe {
            libc::madvise(addr as *mut libc::c_void, bytes, libc::MADV_DONTNEED);
            libc::mprotect(addr as *mut libc::c_void, bytes, libc::PROT_NONE);
        }
    }

    unsafe fn unreserve(&self, _kind: MemoryKind, base: u64, bytes: usize) {
        // SAFETY: our reservation, with nothing mapped in it (the contract).
        unsafe { libc::munmap(base as *mut libc::c_void, bytes) };
    }
}

/// The CPU backend's mapping granule: the 2 MiB of a huge page, the same as CUDA's, so that
/// allocation behaviour (and fragmentation) tested on the CPU is what a GPU sees.
const CPU_GRANULE: usize = 2 << 20;

/// The host's page size.
pub(crate) fn host_page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(p)
        .ok()
        .filter(|p| p.is_power_of_two())
        .unwrap_or(4096)
}

fn physical_memory(page_size: usize) -> usize {
    // SAFETY: sysconf has no preconditions.
    let pages = unsafe { libc::sysconf(libc::_SC_PHYS_PAGES) };
    usize::try_from(pages).map_or(usize::MAX / 2, |p| p.saturating_mul(page_size))
}

#[cfg(test)]
mod tests {
    use super::queue::fill;
    use crate::backend::FillPattern;

    #[test]
    fn fill_repeats_every_width_over_odd_lengths() {
        for pattern in [
            FillPattern::u8(0xA5),
            FillPattern::u16(0xBEEF),
            FillPattern::u32(0xDEAD_BEEF),
            FillPattern::u64(0x0123_4567_89AB_CDEF),
        ] {
            let w = pattern.width();
            for reps in [1usize, 2, 3, 7, 100, 1023] {
                let mut buf = vec![0x11u8; reps * w];
                fill(&mut buf, &pattern);
                for chunk in buf.chunks(w) {
                    assert_eq!(chunk, pattern.bytes(), "width {w}, {reps} repetitions");
                }
            }
        }
    }
}
