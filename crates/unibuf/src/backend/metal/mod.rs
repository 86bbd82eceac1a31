//! The Metal backend, on objc2-metal. Apple targets only (`cargo` feature `metal`).
//!
//! Storage (`memory.rs`): Shared is `MTLStorageModeShared`, Private is `MTLStorageModePrivate`
//! (reached from the host through the core's staging pool and blit copies), External wraps the
//! caller's pages with `newBufferWithBytesNoCopy`. Allocations longer than the device's
//! `maxBufferLength` are split into several buffers.
//!
//! Queues (`queue.rs`): one MTLCommandQueue per unibuf queue; each submission is one labelled
//! command buffer that signals the queue's MTLSharedEvent with its epoch; completion handlers
//! record GPU start and end times and classify failures into sticky `DeviceFault`s.
//! Copies and one-byte fills are blits where macOS allows them; other fills, and copies that are
//! not 4-byte aligned, are the backend's own kernels (`fill.rs`). Cross-queue waits are
//! `encodeWaitForEvent:value:` on the producer's shared event: a device-side wait.
//!
//! Kernels (`compile.rs`): MSL compiled from the embedded source, constants as function
//! constants, pipelines cached by (name, constants). Parameter `i` is `[[buffer(i)]]`.
//!
//! Residency (`residency.rs`): MTLResidencySets where the OS has them (macOS 15), behind the
//! core's budget and epoch-deferred removal.
//!
//! Interop (`interop.rs`): buffers, queues and the device hand out their `id<MTL…>` pointers;
//! foreign `MTLBuffer`s of this device are retained and wrapped as Foreign allocations; external
//! work encodes into the submission's own command buffer, in order with the other commands;
//! foreign shared events are waited for like other queues' events, and foreign command buffers
//! wait for a fence on the queue's shared event.
//!
//! Device, queues, events, libraries and pipelines are Send and Sync in objc2-metal; buffers and
//! residency sets are shared under the rules their wrappers state; command buffers and encoders,
//! which are not thread-safe, live and die inside one `submit` call on one thread.

mod compile;
mod fill;
mod interop;
mod memory;
mod queue;
mod residency;

use crate::backend::{
    Backend, BackendOptions, Command, DeviceInfo, GpuSpan, KernelCacheStats, LaunchArg, LaunchDims,
    PipelineId, RawAlloc, RawRange, ResidencyHooks, Submission,
};
use crate::epoch::{Epoch, Fence, QueueId};
use crate::error::{check_range, Error, Result};
use crate::interop::{
    ExternalWork, ForeignMemory, NativeBuffer, NativeDevice, NativeEncoder, NativeQueue,
    NativeWaiter,
};
use crate::kernel::{Constants, KernelSource, ScalarArg};
use crate::storage::{MemoryAccess, MemoryKind};
use compile::Compiler;
use memory::{Buffers, MetalAlloc, Part};
use objc2::rc::{autoreleasepool, Retained};
use objc2::runtime::ProtocolObject;
use objc2::sel;
use objc2_foundation::{NSObjectProtocol, NSRange, NSString};
use objc2_metal::{
    MTLBlitCommandEncoder, MTLBuffer, MTLCommandBuffer, MTLCommandEncoder, MTLCommandQueue,
    MTLComputeCommandEncoder, MTLComputePipelineState, MTLCreateSystemDefaultDevice, MTLDevice,
    MTLSharedEvent, MTLSize,
};
use parking_lot::RwLock;
use queue::MetalQueue;
use residency::Residency;
use std::ffi::c_void;
use std::ptr::NonNull;
use std::sync::{Arc, Once, OnceLock};

// `MTLCreateSystemDefaultDevice` returns a device on macOS only if the program links Core
// Graphics, as Apple's documentation of the function says; objc2-metal links Metal alone.
#[link(name = "CoreGraphics", kind = "framework")]
extern "C" {}

/// The environment variable that relaxes the AGX driver's context-store timeout.
const RELAX_TIMEOUT_VAR: &str = "AGX_RELAX_CDM_CTXSTORE_TIMEOUT";

/// Metal binds at most 31 buffers (and `setBytes` values) per compute kernel.
const MAX_BINDINGS: usize = 31;

static RELAX_TIMEOUT: Once = Once::new();

/// Sets `AGX_RELAX_CDM_CTXSTORE_TIMEOUT=1` once, before the first device is opened.
///
/// While the display is active, Apple's GPU driver (AGX) preempts long-running compute command
/// buffers to keep the interface responsive, and fails those that do not yield in time
/// (`kIOGPUCommandBufferCallbackErrorImpactingInteractivity`): a long prefill or a large matmul
/// then faults although the kernel is correct. This variable relaxes that context-store
/// deadline; llama.cpp and MLX set it for the same reason. The driver reads it when a device is
/// opened, so it is set here, once, before the first `MTLCreateSystemDefaultDevice`. A value the
/// user set (`0` to keep the watchdog strict) is kept.
fn relax_context_store_timeout() {
    RELAX_TIMEOUT.call_once(|| {
        if std::env::var_os(RELAX_TIMEOUT_VAR).is_none() {
            // The process environment is shared: a C library reading it on another thread at
            // this instant could race with the write. This runs once, before any Metal device
            // exists and so before Metal's own threads start; the crate does not read the
            // environment from other threads meanwhile. (`set_var` is safe in edition 2021.)
            std::env::set_var(RELAX_TIMEOUT_VAR, "1");
        }
    });
}

fn unavailable(reason: impl Into<String>) -> Error {
    Error::BackendUnavailable {
        name: "metal".to_owned(),
        reason: reason.into(),
    }
}

fn unsupported(what: impl Into<String>) -> Error {
    Error::Unsupported {
        backend: "metal",
        what: what.into(),
    }
}

/// Bytes the device can still use with good performance: its recommended working set less what
/// it has allocated.
pub(super) fn free_bytes(device: &ProtocolObject<dyn MTLDevice>) -> usize {
    let recommended = usize::try_from(device.recommendedMaxWorkingSetSize()).unwrap_or(usize::MAX);
    recommended.saturating_sub(device.currentAllocatedSize())
}

/// The built-in pipelines (`fill.rs`).
#[derive(Clone, Copy)]
struct Builtins {
    fills: [PipelineId; 4],
    copy: PipelineId,
}

/// One bound argument of a dispatch.
enum Bind {
    Buffer {
        buffer: Retained<ProtocolObject<dyn MTLBuffer>>,
        offset: usize,
    },
    /// A scalar by value: its bytes and length (4 or 8).
    Bytes([u8; 8], usize),
}

/// A command resolved to Metal objects, ready to encode. Resolution checks everything it can;
/// encoding fails only where Metal hands out no encoder or external work fails, and then drops
/// the command buffer uncommitted, so a failed submission never leaves half its commands on the
/// GPU.
enum Op {
    Copy {
        src: Retained<ProtocolObject<dyn MTLBuffer>>,
        src_offset: usize,
        dst: Retained<ProtocolObject<dyn MTLBuffer>>,
        dst_offset: usize,
        bytes: usize,
    },
    Fill {
        dst: Retained<ProtocolObject<dyn MTLBuffer>>,
        offset: usize,
        bytes: usize,
        value: u8,
    },
    Dispatch {
        state: Retained<ProtocolObject<dyn MTLComputePipelineState>>,
        binds: Vec<Bind>,
        dims: LaunchDims,
    },
    /// A wait for another queue's event (`Command::Wait`) or a foreign one
    /// (`Command::WaitForeign`).
    Wait {
        event: Retained<ProtocolObject<dyn MTLSharedEvent>>,
        value: Epoch,
    },
    /// Foreign work, run with the command buffer while it is encoded (`Command::External`).
    External(ExternalWork),
}

/// The encoder open on a command buffer; consecutive blits share one, as do consecutive
/// dispatches (a serial compute encoder runs them in order).
enum Active {
    None,
    Blit(Retained<ProtocolObject<dyn MTLBlitCommandEncoder>>),
    Compute(Retained<ProtocolObject<dyn MTLComputeCommandEncoder>>),
}

impl Active {
    fn end(&mut self) {
        match std::mem::replace(self, Active::None) {
            Active::None => {}
            Active::Blit(e) => e.endEncoding(),
            Active::Compute(e) => e.endEncoding(),
        }
    }
}

/// The Metal backend. Opened through [`Device::open`](crate::Device::open)`("metal")`.
pub struct MetalBackend {
    info: DeviceInfo,
    device: Retained<ProtocolObject<dyn MTLDevice>>,
    buffers: Arc<Buffers>,
    queues: RwLock<Vec<Arc<MetalQueue>>>,
    compiler: Compiler,
    builtins: OnceLock<Result<Builtins>>,
    residency: Option<Residency>,
    /// Whether buffers answer `gpuAddress` (macOS 13 and later).
    has_gpu_address: bool,
    /// `queue::host_seconds()` at creation: the zero of GPU spans.
    origin: f64,
}

impl MetalBackend {
    /// Opens the system's default Metal device.
    pub fn new(_options: &BackendOptions) -> Result<MetalBackend> {
        relax_context_store_timeout();
        let device = MTLCreateSystemDefaultDevice()
            .ok_or_else(|| unavailable("MTLCreateSystemDefaultDevice found no Metal device"))?;
        let max_part = device.maxBufferLength();
        let recommended =
            usize::try_from(device.recommendedMaxWorkingSetSize()).unwrap_or(usize::MAX);
        let page_size = crate::backend::cpu::host_page_size();
        let buffers = Arc::new(Buffers::new(max_part, page_size));
        // Probed on a fresh object rather than assumed from the OS version: Apple's advice for
        // APIs newer than the deployment target.
        let has_gpu_address = device
            .newBufferWithLength_options(16, objc2_metal::MTLResourceOptions::StorageModeShared)
            .is_some_and(|b| b.respondsToSelector(sel!(gpuAddress)));
        let residency = Residency::new(&device, buffers.clone());
        Ok(MetalBackend {
            info: DeviceInfo {
                name: device.name().to_string(),
                backend: "metal",
                // Every Metal device gives the CPU and the GPU the same bytes through
                // StorageModeShared (on Apple silicon with no copy at all), so Auto is Shared
                // here, as design.md's table says.
                unified_memory: true,
                total_memory: recommended,
                page_size,
                // Longer allocations than one MTLBuffer holds are split (`memory.rs`); the
                // limit is what the GPU can use at all.
                max_buffer_len: recommended.max(max_part),
                // Metal documents no alignment of buffer addresses beyond the 16 bytes of the
                // widest shader type, so no more is promised.
                alloc_alignment: 16,
                timestamps: true,
            },
            device,
            buffers,
            queues: RwLock::new(Vec::new()),
            compiler: Compiler::default(),
            builtins: OnceLock::new(),
            residency,
            has_gpu_address,
            origin: queue::host_seconds(),
        })
    }

    /// The largest single MTLBuffer the device makes (`maxBufferLength`). Longer allocations
    /// are split into parts of this size (rounded down to pages); kernel arguments are bound to
    /// one buffer, so a view passed to a kernel must lie inside one part.
    pub fn max_part_len(&self) -> usize {
        self.buffers.max_part
    }

    fn queue(&self, id: QueueId) -> Result<Arc<MetalQueue>> {
        crate::backend::queue_by_id(&self.queues, id)
    }

    fn builtins(&self) -> Result<Builtins> {
        self.builtins
            .get_or_init(|| {
                let mut fills = [PipelineId(0); 4];
                for (slot, k) in fills.iter_mut().zip(&fill::FILLS) {
                    *slot = self.compiler.compile_builtin(&self.device, k)?;
                }
                Ok(Builtins {
                    fills,
                    copy: self.compiler.compile_builtin(&self.device, &fill::COPY)?,
                })
            })
            .clone()
    }

    /// The live allocation a range names, bounds-checked.
    fn alloc_of(&self, r: &RawRange, what: &'static str) -> Result<Arc<MetalAlloc>> {
        let a = self.buffers.get(r.handle)?;
        check_range(what, r.offset, r.bytes, a.bytes)?;
        Ok(a)
    }

    /// Resolves one command into `ops`.
    ///
    /// # Safety
    /// `Backend::submit`'s contract for `cmd` (a foreign signal's handle is a live object of
    /// this device: `Queue::wait_foreign`'s contract).
    unsafe fn resolve(&self, queue: QueueId, cmd: &Command, ops: &mut Vec<Op>) -> Result<()> {
        match cmd {
            Command::Copy { src, dst } => self.resolve_copy(src, dst, ops),
            Command::Fill { dst, pattern } => {
                let a = self.alloc_of(dst, "fill destination")?;
                let width = pattern.width();
                if !dst.offset.is_multiple_of(width) || !dst.bytes.is_multiple_of(width) {
                    return Err(Error::Misaligned {
                        what: "fill: destination offset and length need the pattern's width",
                        value: if !dst.offset.is_multiple_of(width) {
                            dst.offset
                        } else {
                            dst.bytes
                        },
                        align: width,
                    });
                }
                for (part, offset, bytes) in a.pieces(dst.offset, dst.bytes) {
                    // Blits take offsets in the buffer (`Part::at`); kernels take ranges of
                    // the allocation, located again in `resolve_launch`.
                    if let Some(value) = fill::blit_fill_byte(pattern, part.at(offset), bytes) {
                        ops.push(Op::Fill {
                            dst: part.buffer.clone(),
                            offset: part.at(offset),
                            bytes,
                            value,
                        });
                    } else {
                        let piece = RawRange {
                            offset: part.start + offset,
                            bytes,
                            ..*dst
                        };
                        let pipeline = self.builtins()?.fills[fill::fill_index(width)];
                        let n = (bytes / width) as u64;
                        self.resolve_launch(
                            pipeline,
                            fill::dims(n),
                            &fill::fill_args(piece, pattern),
                            ops,
                        )?;
                    }
                }
                Ok(())
            }
            Command::Launch {
                pipeline,
                dims,
                args,
            } => self.resolve_launch(*pipeline, *dims, args, ops),
            // One command buffer holds every launch of the batch already: encoding them in
            // order is Metal's replay.
            Command::Batch { launches, .. } => {
                for l in launches.iter() {
                    self.resolve_launch(l.pipeline, l.dims, &l.args, ops)?;
                }
                Ok(())
            }
            Command::Wait(fence) => self.resolve_wait(queue, *fence, ops),
            // Run while encoding, in order with the commands around it (`encode`).
            Command::External(work) => {
                ops.push(Op::External(work.clone()));
                Ok(())
            }
            // SAFETY: the caller's contract covers the signal's handle.
            Command::WaitForeign(signal) => unsafe { self.resolve_wait_foreign(signal, ops) },
        }
    }

    fn resolve_copy(&self, src: &RawRange, dst: &RawRange, ops: &mut Vec<Op>) -> Result<()> {
        if src.bytes != dst.bytes {
            return Err(Error::ShapeMismatch {
                what: "copy: source and destination lengths",
                expected: src.bytes.to_string(),
                got: dst.bytes.to_string(),
            });
        }
        let (sa, da) = (
            self.alloc_of(src, "copy source")?,
            self.alloc_of(dst, "copy destination")?,
        );
        let mut done = 0;
        while done < src.bytes {
            // The longest stretch from here that lies in one part of each side.
            let (sp, so, sn) = sa.piece_at(src.offset + done);
            let (dp, dof, dn) = da.piece_at(dst.offset + done);
            let n = sn.min(dn).min(src.bytes - done);
            // Blits take offsets in the buffers (`Part::at`); the kernel takes ranges of the
            // allocations, located again in `resolve_launch`.
            if fill::blit_copy_ok(sp.at(so), dp.at(dof), n) {
                ops.push(Op::Copy {
                    src: sp.buffer.clone(),
                    src_offset: sp.at(so),
                    dst: dp.buffer.clone(),
                    dst_offset: dp.at(dof),
                    bytes: n,
                });
            } else {
                let piece = |r: &RawRange, part: &Part, off: usize| RawRange {
                    offset: part.start + off,
                    bytes: n,
                    ..*r
                };
                let args = fill::copy_args(piece(src, sp, so), piece(dst, dp, dof));
                let pipeline = self.builtins()?.copy;
                self.resolve_launch(pipeline, fill::dims(n as u64), &args, ops)?;
            }
            done += n;
        }
        Ok(())
    }

    fn resolve_launch(
        &self,
        pipeline: PipelineId,
        dims: LaunchDims,
        args: &[LaunchArg],
        ops: &mut Vec<Op>,
    ) -> Result<()> {
        let (state, max_threads, name) = self
            .compiler
            .with(pipeline, |p| (p.state.clone(), p.max_threads, p.name))?;
        let threads: u64 = dims.block.iter().map(|&b| u64::from(b)).product();
        if threads == 0 || threads > max_threads as u64 || dims.grid.contains(&0) {
            return Err(Error::invalid(
                "dims",
                format!(
                    "'{name}' launched with grid {:?} of blocks {:?}: every extent must be at \
                     least 1 and a block at most {max_threads} threads (the pipeline's \
                     maxTotalThreadsPerThreadgroup)",
                    dims.grid, dims.block
                ),
            ));
        }
        if args.len() > MAX_BINDINGS {
            return Err(unsupported(format!(
                "'{name}' with {} arguments: Metal binds at most {MAX_BINDINGS}",
                args.len()
            )));
        }
        let mut binds = Vec::with_capacity(args.len());
        for arg in args {
            binds.push(match arg {
                LaunchArg::Buffer { range, .. } => {
                    let a = self.alloc_of(range, "kernel argument")?;
                    let Some((part, offset)) = a.locate(range.offset, range.bytes) else {
                        return Err(unsupported(format!(
                            "binding bytes {}..{} of a {}-byte allocation to '{name}': the range \
                             crosses the boundary of the Metal buffers it is split into \
                             (maxBufferLength {} bytes)",
                            range.offset,
                            range.offset + range.bytes,
                            a.bytes,
                            self.buffers.max_part
                        )));
                    };
                    // An empty view may sit at the very end of a buffer; the kernel reads
                    // nothing through it, so it is bound at the buffer's start. Other views are
                    // bound at their offset in the buffer (`Part::at`).
                    let offset = if offset >= part.len {
                        0
                    } else {
                        part.at(offset)
                    };
                    Bind::Buffer {
                        buffer: part.buffer.clone(),
                        offset,
                    }
                }
                LaunchArg::Scalar(s) => {
                    let mut b = [0u8; 8];
                    let len = match *s {
                        ScalarArg::U32(v) => {
                            b[..4].copy_from_slice(&v.to_ne_bytes());
                            4
                        }
                        ScalarArg::I32(v) => {
                            b[..4].copy_from_slice(&v.to_ne_bytes());
                            4
                        }
                        ScalarArg::F32(v) => {
                            b[..4].copy_from_slice(&v.to_ne_bytes());
                            4
                        }
                        ScalarArg::U64(v) => {
                            b.copy_from_slice(&v.to_ne_bytes());
                            8
                        }
                    };
                    Bind::Bytes(b, len)
                }
            });
        }
        ops.push(Op::Dispatch { state, binds, dims });
        Ok(())
    }

    fn resolve_wait(&self, queue: QueueId, fence: Fence, ops: &mut Vec<Op>) -> Result<()> {
        if fence.queue == queue || fence.epoch == 0 {
            return Ok(()); // queue order already covers it
        }
        let other = self.queue(fence.queue)?;
        if fence.epoch >= other.next_epoch() {
            return Err(Error::invalid(
                "wait",
                format!(
                    "{} has not submitted epoch {} yet: a device-side wait for it could never end",
                    fence.queue, fence.epoch
                ),
            ));
        }
        match other.completed() {
            Ok(done) if done >= fence.epoch => Ok(()),
            // The producer faulted: its work will not run again and its handler raised its
            // event, so there is nothing to wait for (the fault is reported on its own queue).
            Err(Error::DeviceFault { .. }) => Ok(()),
            _ => {
                ops.push(Op::Wait {
                    event: other.event.clone(),
                    value: fence.epoch,
                });
                Ok(())
            }
        }
    }

    /// Encodes `ops` on a new command buffer of `q` with `label` and commits it as `epoch`.
    fn encode(&self, q: &MetalQueue, ops: Vec<Op>, label: &str, epoch: Epoch) -> Result<()> {
        let cb = q
            .queue
            .commandBuffer()
            .ok_or_else(|| unsupported("creating a command buffer: commandBuffer returned nil"))?;
        cb.setLabel(Some(&NSString::from_str(label)));
        let mut active = Active::None;
        let no_encoder = |what: &str| unsupported(format!("{what} returned nil"));
        for op in ops {
            match op {
                Op::Copy {
                    src,
                    src_offset,
                    dst,
                    dst_offset,
                    bytes,
                } => {
                    // On failure the previous encoder is already ended; the command buffer is
                    // dropped uncommitted, so none of its commands run.
                    let blit = blit_encoder(&cb, &mut active)
                        .ok_or_else(|| no_encoder("blitCommandEncoder"))?;
                    // SAFETY: both ranges were bounds-checked against their buffers in
                    // `resolve`, are 4-byte aligned as macOS requires (`blit_copy_ok`), and do
                    // not overlap (the trait's contract); the buffers stay alive until the
                    // command buffer completes (`submit`'s contract, and the command buffer
                    // retains them).
                    unsafe {
                        blit.copyFromBuffer_sourceOffset_toBuffer_destinationOffset_size(
                            &src, src_offset, &dst, dst_offset, bytes,
                        )
                    };
                }
                Op::Fill {
                    dst,
                    offset,
                    bytes,
                    value,
                } => {
                    // On failure the previous encoder is already ended; the command buffer is
                    // dropped uncommitted, so none of its commands run.
                    let blit = blit_encoder(&cb, &mut active)
                        .ok_or_else(|| no_encoder("blitCommandEncoder"))?;
                    blit.fillBuffer_range_value(&dst, NSRange::new(offset, bytes), value);
                }
                Op::Dispatch { state, binds, dims } => {
                    // On failure the previous encoder is already ended; the command buffer is
                    // dropped uncommitted, so none of its commands run.
                    let enc = compute_encoder(&cb, &mut active)
                        .ok_or_else(|| no_encoder("computeCommandEncoder"))?;
                    enc.setComputePipelineState(&state);
                    for (i, bind) in binds.iter().enumerate() {
                        match bind {
                            // SAFETY: the range was bounds-checked against this part and the
                            // core checked the argument against the kernel's declared
                            // parameter (`submit`'s contract); the offset is a multiple of the
                            // element size, as Metal requires; i < 31 (checked in `resolve`).
                            Bind::Buffer { buffer, offset } => unsafe {
                                enc.setBuffer_offset_atIndex(Some(buffer), *offset, i)
                            },
                            // SAFETY: `b` holds `len` valid bytes, which Metal copies now;
                            // i < 31 as above.
                            Bind::Bytes(b, len) => unsafe {
                                enc.setBytes_length_atIndex(
                                    NonNull::from(b).cast::<c_void>(),
                                    *len,
                                    i,
                                )
                            },
                        }
                    }
                    let size = |v: [u32; 3]| MTLSize {
                        width: v[0] as usize,
                        height: v[1] as usize,
                        depth: v[2] as usize,
                    };
                    enc.dispatchThreadgroups_threadsPerThreadgroup(
                        size(dims.grid),
                        size(dims.block),
                    );
                }
                Op::Wait { event, value } => {
                    // Event waits are command-buffer commands, between passes.
                    active.end();
                    cb.encodeWaitForEvent_value(ProtocolObject::from_ref(&*event), value);
                }
                Op::External(work) => {
                    // The closure encodes passes of its own on the command buffer: none of ours
                    // may be open. If it fails, the command buffer is dropped uncommitted, so
                    // nothing of this submission runs (what the closure encoded included) and
                    // the epoch is not used.
                    active.end();
                    work.run(
                        NativeEncoder::Metal {
                            command_buffer: interop::handle(&cb),
                        },
                        label,
                    )?;
                }
            }
        }
        active.end();
        cb.encodeSignalEvent_value(ProtocolObject::from_ref(&*q.event), epoch);
        q.commit(&cb, epoch, label);
        Ok(())
    }
}

fn blit_encoder<'a>(
    cb: &ProtocolObject<dyn MTLCommandBuffer>,
    active: &'a mut Active,
) -> Option<&'a ProtocolObject<dyn MTLBlitCommandEncoder>> {
    if !matches!(active, Active::Blit(_)) {
        active.end();
        *active = Active::Blit(cb.blitCommandEncoder()?);
    }
    match active {
        Active::Blit(e) => Some(e),
        _ => None,
    }
}

fn compute_encoder<'a>(
    cb: &ProtocolObject<dyn MTLCommandBuffer>,
    active: &'a mut Active,
) -> Option<&'a ProtocolObject<dyn MTLComputeCommandEncoder>> {
    if !matches!(active, Active::Compute(_)) {
        active.end();
        *active = Active::Compute(cb.computeCommandEncoder()?);
    }
    match active {
        Active::Compute(e) => Some(e),
        _ => None,
    }
}

impl Drop for MetalBackend {
    fn drop(&mut self) {
        // Command buffers in flight hold completion handlers that touch the queues' records:
        // let them all run before anything goes away.
        for q in self.queues.read().iter() {
            q.drain();
        }
    }
}

impl Backend for MetalBackend {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    unsafe fn allocate(&self, kind: MemoryKind, bytes: usize) -> Result<RawAlloc> {
        let bytes = bytes.max(1); // Metal makes no empty buffers
        let (handle, alloc) =
            autoreleasepool(|_| self.buffers.allocate(&self.device, kind, bytes))?;
        Ok(RawAlloc {
            addr: alloc.address(self.has_gpu_address, handle << 32),
            handle,
            bytes,
            kind,
        })
    }

    unsafe fn release(&self, raw: RawAlloc) {
        // No pending work uses it (the contract), so it may leave its residency set now, even
        // if the core's deferred removal has not been applied yet.
        if let Some(r) = &self.residency {
            r.forget(raw.handle);
        }
        // For Foreign memory this drops unibuf's retain of the foreign MTLBuffer (or its
        // no-copy buffer over foreign host memory) and nothing else: the memory is its owner's.
        drop(self.buffers.remove(raw.handle));
    }

    unsafe fn wrap_host(
        &self,
        ptr: NonNull<u8>,
        bytes: usize,
        _access: MemoryAccess,
    ) -> Result<RawAlloc> {
        // Metal has no read-only no-copy buffers; the core refuses device writes to memory
        // that is not writable before any command is recorded.
        // SAFETY: the trait's contract: whole pages, valid until `release` returns, which
        // drops the no-copy buffers first.
        let (handle, alloc) =
            autoreleasepool(|_| unsafe { self.buffers.wrap(&self.device, ptr, bytes) })?;
        Ok(RawAlloc {
            addr: alloc.address(self.has_gpu_address, handle << 32),
            handle,
            bytes,
            kind: MemoryKind::HostRegistered,
        })
    }

    fn host_ptr(&self, raw: &RawAlloc) -> Option<NonNull<u8>> {
        match raw.kind {
            MemoryKind::Device => None,
            // Foreign memory is host-visible where it is host memory or a Shared MTLBuffer
            // (`wrap_foreign` recorded the address then).
            MemoryKind::HostShared | MemoryKind::HostRegistered | MemoryKind::Foreign => {
                self.buffers.get(raw.handle).ok()?.host
            }
        }
    }

    fn create_queue(&self) -> Result<QueueId> {
        let mut queues = self.queues.write();
        let id = QueueId(queues.len() as u32);
        let q = autoreleasepool(|_| MetalQueue::create(&self.device, id, self.origin))?;
        if let Some(r) = &self.residency {
            r.attach(&q);
        }
        queues.push(Arc::new(q));
        Ok(id)
    }

    unsafe fn submit(&self, queue: QueueId, submission: Submission<'_>) -> Result<Epoch> {
        let q = self.queue(queue)?;
        if let Some(f) = q.fault() {
            return Err(f);
        }
        autoreleasepool(|_| {
            let mut ops = Vec::with_capacity(submission.commands.len());
            for cmd in submission.commands {
                // SAFETY: this call's contract is the one `resolve` needs.
                unsafe { self.resolve(queue, cmd, &mut ops) }?;
            }
            let _order = q.encoding.lock();
            let epoch = q.next_epoch();
            self.encode(&q, ops, submission.label, epoch)?;
            Ok(epoch)
        })
    }

    fn completed(&self, queue: QueueId) -> Result<Epoch> {
        self.queue(queue)?.completed()
    }

    fn wait(&self, queue: QueueId, epoch: Epoch) -> Result<()> {
        if epoch == 0 {
            return self.queue(queue)?.fault().map_or(Ok(()), Err);
        }
        self.queue(queue)?.wait(epoch)
    }

    fn gpu_span(&self, queue: QueueId, epoch: Epoch) -> Option<GpuSpan> {
        self.queue(queue).ok()?.span(epoch)
    }

    fn compile(&self, kernel: &KernelSource, constants: &Constants) -> Result<PipelineId> {
        autoreleasepool(|_| self.compiler.compile(&self.device, kernel, constants))
    }

    fn kernel_cache_stats(&self) -> KernelCacheStats {
        self.compiler.stats()
    }

    fn reset(&self) -> Result<()> {
        // A failed command buffer leaves the device and its queues usable (unlike a CUDA
        // context), so clearing the record is the whole recovery; memory the failed work wrote
        // is undefined, as the trait says.
        for q in self.queues.read().iter() {
            q.reset();
        }
        Ok(())
    }

    fn free_memory(&self) -> Option<usize> {
        Some(free_bytes(&self.device))
    }

    fn residency(&self) -> Option<&dyn ResidencyHooks> {
        self.residency.as_ref().map(|r| r as &dyn ResidencyHooks)
    }

    fn native_buffer(&self, range: &RawRange) -> Result<NativeBuffer> {
        self.native_buffer_of(range)
    }

    fn native_queue(&self, queue: QueueId) -> Result<NativeQueue> {
        Ok(NativeQueue::Metal {
            command_queue: interop::handle(&self.queue(queue)?.queue),
        })
    }

    fn native_device(&self) -> NativeDevice {
        NativeDevice::Metal {
            device: interop::handle(&self.device),
        }
    }

    unsafe fn wrap_foreign(&self, memory: &ForeignMemory, bytes: usize) -> Result<RawAlloc> {
        // SAFETY: the trait's contract is the one `wrap_foreign_memory` needs.
        autoreleasepool(|_| unsafe { self.wrap_foreign_memory(memory, bytes) })
    }

    unsafe fn order_native(&self, fence: Fence, waiter: NativeWaiter) -> Result<()> {
        // SAFETY: the trait's contract is the one `order_command_buffer` needs.
        autoreleasepool(|_| unsafe { self.order_command_buffer(fence, waiter) })
    }
}
