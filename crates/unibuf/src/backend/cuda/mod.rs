//! The CUDA backend, on cudarc's driver and NVRTC bindings with dynamic loading (so a build
//! needs no CUDA install, and a machine without a driver reports the backend as not found).
//!
//! Storage: Private is device memory (cuMemAlloc); Shared is pinned host memory mapped into the
//! device (cuMemHostAlloc with DEVICEMAP, never write-combined); External is caller memory
//! registered with cuMemHostRegister. Queues are non-blocking streams; see `stream.rs` for how
//! epochs use events only once a second queue exists. Kernels are CUDA C compiled by NVRTC to
//! CUBINs cached on disk (`compile.rs`).
//!
//! The driver's own raw API is used rather than cudarc's safe layer: unibuf's epochs already
//! track every use of memory, and the safe layer's per-allocation event tracking would add
//! event calls to every operation of a single-stream program.

mod compile;
mod driver;
mod graph;
mod interop;
mod memory;
mod stream;
mod timing;
mod vmm;

use crate::backend::{BackendOptions, KernelCacheStats};

use crate::backend::{
    Backend, Command, DeviceInfo, GpuSpan, LaunchArg, LaunchDims, PipelineId, RawAlloc, Submission,
};
use crate::epoch::{Epoch, QueueId};
use crate::error::{Error, Result};
use crate::interop::{
    ForeignMemory, NativeBuffer, NativeDevice, NativeHandle, NativeQueue, NativeWaiter,
};
use crate::kernel::{Constants, KernelSource, Param, ScalarArg, ScalarType};
use crate::storage::{MemoryAccess, MemoryKind};
use crate::DType;
use compile::CompileCounters;
use cudarc::driver::sys::{self, CUdevice_attribute};
use driver::{check, Context, CuError};
use memory::Registrations;
use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::ffi::c_void;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use stream::{CudaQueue, Event};

/// A compiled kernel: its module (kept loaded) and entry point.
struct Pipeline {
    module: sys::CUmodule,
    function: sys::CUfunction,
}

// SAFETY: module and function handles are immutable and usable from any thread with the
// context current.
unsafe impl Send for Pipeline {}
// SAFETY: as above.
unsafe impl Sync for Pipeline {}

/// Fills with 8-byte patterns: the driver has memsets of 1, 2 and 4 bytes only.
const FILL64: KernelSource = KernelSource {
    name: "unibuf_fill64",
    params: &[
        Param::output("dst", DType::U64),
        Param::scalar("value", ScalarType::U64),
        Param::scalar("n", ScalarType::U64),
    ],
    cuda: Some(
        r#"extern "C" __global__ void unibuf_fill64(unsigned long long* dst, unsigned long long value, unsigned long long n) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        dst[i] = value;
    }
}"#,
    ),
    msl: None,
    cpu: None,
};

/// Copies 16 bytes per thread: device-to-device copies within the allocator's arena (see
/// `encode`).
const COPY16: KernelSource = KernelSource {
    name: "unibuf_copy16",
    params: &[
        Param::input("src", DType::U64),
        Param::output("dst", DType::U64),
        Param::scalar("n", ScalarType::U64),
    ],
    cuda: Some(
        r#"extern "C" __global__ void unibuf_copy16(const uint4* __restrict__ src, uint4* __restrict__ dst, unsigned long long n) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        dst[i] = src[i];
    }
}"#,
    ),
    msl: None,
    cpu: None,
};

/// Fills 16 bytes per thread with a pattern repeated to 16 bytes (`lo`, `hi`).
const FILL16: KernelSource = KernelSource {
    name: "unibuf_fill16",
    params: &[
        Param::output("dst", DType::U64),
        Param::scalar("lo", ScalarType::U64),
        Param::scalar("hi", ScalarType::U64),
        Param::scalar("n", ScalarType::U64),
    ],
    cuda: Some(
        r#"extern "C" __global__ void unibuf_fill16(uint4* __restrict__ dst, unsigned long long lo, unsigned long long hi, unsigned long long n) {
    const uint4 v = make_uint4((unsigned int)lo, (unsigned int)(lo >> 32), (unsigned int)hi, (unsigned int)(hi >> 32));
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        dst[i] = v;
    }
}"#,
    ),
    msl: None,
    cpu: None,
};

/// Blocks of 256 threads for `n` 16-byte elements, one element per thread up to a million
/// blocks (then the kernels grid-stride).
fn bulk_blocks(n: u64) -> u32 {
    n.div_ceil(256).clamp(1, 1 << 20) as u32
}

/// On a lone queue, every this-many-th submission records an event (see `submit`).
const COMPLETION_STRIDE: u64 = 64;

/// Caller memory registered for the device: the host address and the registrations it holds.
struct Wrapped {
    host: usize,
    registrations: Vec<usize>,
}

/// The CUDA backend. Opened through [`Device::open`](crate::Device::open)`("cuda")`.
pub struct CudaBackend {
    info: DeviceInfo,
    compute_capability: (i32, i32),
    queues: RwLock<Vec<Arc<CudaQueue>>>,
    /// Set when the second queue is created: from then on every submission records an event.
    multi_queue: AtomicBool,
    events: Mutex<Vec<Event>>,
    registrations: Mutex<Registrations>,
    wrapped: Mutex<HashMap<u64, Wrapped>>,
    /// Foreign memory wrapped (`wrap_foreign`), by handle: never freed here.
    foreign: Mutex<HashMap<u64, interop::ForeignRegion>>,
    /// The GPU's ordinal, which foreign memory must name.
    ordinal: i32,
    next_wrap: AtomicU64,
    pipelines: RwLock<Vec<Pipeline>>,
    fill64: OnceLock<Result<PipelineId>>,
    copy16: OnceLock<Result<PipelineId>>,
    fill16: OnceLock<Result<PipelineId>>,
    /// `UNIBUF_CUDA_DRIVER_COPIES` set (to any value): arena copies and fills use the driver's
    /// calls too (to compare the two).
    driver_copies: bool,
    /// `UNIBUF_CUDA_RELEASE_UNMAPPED` set: physical memory the allocator moves is released and
    /// created again instead (to compare the two).
    pub(super) release_unmapped: bool,
    cache_dir: Option<std::path::PathBuf>,
    counters: CompileCounters,
    /// The virtual-memory granule for device memory, where the GPU supports the VMM API.
    vmm_granule: Option<usize>,
    mappings: vmm::Mappings,
    /// Timing events around every submission, when `BackendOptions::gpu_timing` asked for them.
    timer: Option<timing::Timer>,
    /// Launch batches captured as graphs, by batch id.
    graphs: graph::Graphs,
    /// Declared last: dropped after everything above has been destroyed with it current.
    ctx: Context,
}

fn unavailable(reason: impl Into<String>) -> Error {
    Error::BackendUnavailable {
        name: "cuda".to_owned(),
        reason: reason.into(),
    }
}

impl CudaBackend {
    /// Opens GPU `ordinal` (0 for the first).
    pub fn new(ordinal: i32, options: &BackendOptions) -> Result<CudaBackend> {
        // SAFETY: only probes whether the driver library can be loaded.
        if !unsafe { sys::is_culib_present() } {
            return Err(unavailable(
                "the NVIDIA driver library (libcuda.so) was not found",
            ));
        }
        let cu = |e: CuError| unavailable(format!("{} returned {}", e.call, e.name()));
        // SAFETY: cuInit has no preconditions.
        check(unsafe { sys::cuInit(0) }, "cuInit").map_err(cu)?;
        let mut count = 0;
        // SAFETY: valid out-pointer.
        check(
            unsafe { sys::cuDeviceGetCount(&mut count) },
            "cuDeviceGetCount",
        )
        .map_err(cu)?;
        if ordinal >= count {
            return Err(unavailable(format!(
                "GPU {ordinal} requested, {count} present"
            )));
        }
        let mut device: sys::CUdevice = 0;
        // SAFETY: valid out-pointer; ordinal checked.
        check(
            unsafe { sys::cuDeviceGet(&mut device, ordinal) },
            "cuDeviceGet",
        )
        .map_err(cu)?;
        let mut raw: sys::CUcontext = std::ptr::null_mut();
        // SAFETY: valid out-pointer and device.
        check(
            unsafe { sys::cuDevicePrimaryCtxRetain(&mut raw, device) },
            "cuDevicePrimaryCtxRetain",
        )
        .map_err(cu)?;
        let ctx = Context::new(raw, device);
        ctx.bind().map_err(cu)?;
        let attr = |a: CUdevice_attribute| {
            let mut v = 0;
            // SAFETY: valid out-pointer and device.
            unsafe { sys::cuDeviceGetAttribute(&mut v, a, device) };
            v
        };
        let cc = (
            attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR),
            attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR),
        );
        let mut name = [0 as std::ffi::c_char; 256];
        // SAFETY: the buffer holds 256 bytes as passed.
        unsafe { sys::cuDeviceGetName(name.as_mut_ptr(), 256, device) };
        // SAFETY: the driver NUL-terminates within the buffer.
        let name = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }
            .to_string_lossy()
            .into_owned();
        let mut total = 0usize;
        // SAFETY: valid out-pointer and device.
        unsafe { sys::cuDeviceTotalMem_v2(&mut total, device) };
        let timer = if options.gpu_timing {
            Some(timing::Timer::new().map_err(|e| e.into_error("creating the timing base event"))?)
        } else {
            None
        };
        Ok(CudaBackend {
            info: DeviceInfo {
                name,
                backend: "cuda",
                unified_memory: false,
                total_memory: total,
                page_size: crate::backend::cpu::host_page_size(),
                max_buffer_len: total,
                alloc_alignment: 256,
                timestamps: timer.is_some(),
            },
            compute_capability: cc,
            queues: RwLock::new(Vec::new()),
            multi_queue: AtomicBool::new(false),
            events: Mutex::new(Vec::new()),
            registrations: Mutex::new(Registrations::default()),
            wrapped: Mutex::new(HashMap::new()),
            foreign: Mutex::new(HashMap::new()),
            ordinal,
            next_wrap: AtomicU64::new(1),
            pipelines: RwLock::new(Vec::new()),
            fill64: OnceLock::new(),
            copy16: OnceLock::new(),
            fill16: OnceLock::new(),
            driver_copies: std::env::var_os("UNIBUF_CUDA_DRIVER_COPIES").is_some(),
            release_unmapped: std::env::var_os("UNIBUF_CUDA_RELEASE_UNMAPPED").is_some(),
            cache_dir: options
                .kernel_cache_dir
                .clone()
                .unwrap_or_else(compile::cache_dir),
            counters: CompileCounters::default(),
            vmm_granule: if std::env::var_os("UNIBUF_CUDA_NO_VMM").is_some() {
                None
            } else {
                vmm::granularity(device)
            },
            mappings: vmm::Mappings::default(),
            timer,
            graphs: graph::Graphs::default(),
            ctx,
        })
    }

    /// The compute capability (major, minor).
    pub fn compute_capability(&self) -> (i32, i32) {
        self.compute_capability
    }

    fn bind(&self) -> Result<()> {
        self.ctx
            .bind()
            .map_err(|e| e.into_error("binding the CUDA context"))
    }

    fn queue(&self, id: QueueId) -> Result<Arc<CudaQueue>> {
        crate::backend::queue_by_id(&self.queues, id)
    }

    fn take_event(&self) -> Result<Event, CuError> {
        if let Some(e) = self.events.lock().pop() {
            return Ok(e);
        }
        let mut ev: sys::CUevent = std::ptr::null_mut();
        // SAFETY: valid out-pointer; context current. Timing disabled: cheaper to record.
        check(
            unsafe {
                sys::cuEventCreate(&mut ev, sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32)
            },
            "cuEventCreate",
        )?;
        Ok(Event(ev))
    }

    fn recycle(&self, events: Vec<Event>) {
        if !events.is_empty() {
            self.events.lock().extend(events);
        }
    }

    fn fill64(&self) -> Result<PipelineId> {
        self.fill64
            .get_or_init(|| self.compile(&FILL64, &Constants::new()))
            .clone()
    }

    /// The pipeline of `source` (COPY16 or FILL16) when a copy or fill of `ranges` goes through
    /// the 16-byte kernels: arena memory, whole 16-byte words at 16-byte aligned addresses;
    /// `None` (the driver's calls serve) otherwise, or where the kernel cannot be built (no
    /// NVRTC on this machine). It is compiled on first use into `slot`.
    ///
    /// Over arena memory the driver's cuMemcpy and cuMemsetD8/D32 ran at 0.73-0.94 of their
    /// speed on cuMemAlloc memory (H200, 16 MiB to 1 GiB), the kernels at 0.95-1.03
    /// (docs/BENCHMARKS.md); a standalone program mapping granules the same way did not show
    /// the loss, so it comes from the process's mapping history, which an engine's allocator
    /// has too.
    fn bulk_pipeline(
        &self,
        ranges: &[&crate::backend::RawRange],
        slot: &OnceLock<Result<PipelineId>>,
        source: &KernelSource,
    ) -> Option<PipelineId> {
        let eligible = |r: &crate::backend::RawRange| {
            let addr = r.addr + r.offset as u64;
            addr.is_multiple_of(16)
                && r.bytes.is_multiple_of(16)
                && self.mappings.reserved(addr, r.bytes)
        };
        if self.driver_copies || !ranges.iter().all(|r| eligible(r)) {
            return None;
        }
        slot.get_or_init(|| self.compile(source, &Constants::new()))
            .as_ref()
            .ok()
            .copied()
    }

    /// Launches a 16-byte kernel over `n` 16-byte elements.
    fn launch_bulk(
        &self,
        stream: sys::CUstream,
        pipeline: PipelineId,
        n: u64,
        args: &[LaunchArg],
    ) -> Result<()> {
        self.launch(
            stream,
            pipeline,
            LaunchDims::linear(bulk_blocks(n), 256),
            args,
        )
    }

    /// The event a queue must wait on for `fence`, and whether it was recorded just for this
    /// wait (then it goes back to the pool once the wait is encoded). A fresh one is recorded on
    /// the producer's stream when no event marks that epoch (work from before a second queue).
    fn wait_event(&self, fence: crate::epoch::Fence) -> Result<Option<(Event, bool)>> {
        let other = self.queue(fence.queue)?;
        let mut st = other.lock();
        let mut recycle = Vec::new();
        let completed = other.refresh(&mut st, &mut recycle);
        self.recycle(recycle);
        if completed? >= fence.epoch {
            return Ok(None);
        }
        if let Some(ev) = CudaQueue::event_for(&st, fence.epoch) {
            return Ok(Some((ev, false)));
        }
        let ev = self
            .take_event()
            .map_err(|e| e.into_error("recording a cross-queue event"))?;
        // SAFETY: pooled event, the producer's live stream; the record covers every submission
        // so far on it, the fence's included.
        check(
            unsafe { sys::cuEventRecord(ev.0, other.stream) },
            "cuEventRecord",
        )
        .map_err(|e| e.into_error("recording a cross-queue event"))?;
        // cuStreamWaitEvent captures the record at the time of the call, so the event can go
        // back to the pool right after the wait is encoded; the caller does that.
        Ok(Some((ev, true)))
    }

    /// Encodes one command on `stream`.
    ///
    /// # Safety
    /// As `Backend::submit`: the ranges are live memory of this device.
    unsafe fn encode(
        &self,
        stream: sys::CUstream,
        cmd: &Command,
        label: &str,
        fresh: &mut Vec<Event>,
    ) -> Result<(), Error> {
        let at = |r: &crate::backend::RawRange| r.addr + r.offset as u64;
        let cu = |e: CuError| e.into_error("encoding a submission");
        match cmd {
            Command::Copy { src, dst } => {
                if let Some(pipeline) = self.bulk_pipeline(&[src, dst], &self.copy16, &COPY16) {
                    let n = (src.bytes / 16) as u64;
                    let args = [
                        LaunchArg::Buffer {
                            range: *src,
                            dtype: DType::U64,
                            writable: false,
                        },
                        LaunchArg::Buffer {
                            range: *dst,
                            dtype: DType::U64,
                            writable: true,
                        },
                        LaunchArg::Scalar(ScalarArg::U64(n)),
                    ];
                    return self.launch_bulk(stream, pipeline, n, &args);
                }
                // SAFETY: caller's contract; unified addressing resolves every kind of memory.
                check(
                    unsafe { sys::cuMemcpyAsync(at(dst), at(src), src.bytes, stream) },
                    "cuMemcpyAsync",
                )
                .map_err(cu)
            }
            Command::Fill { dst, pattern } => {
                let p = pattern.bytes();
                if let Some(pipeline) = self.bulk_pipeline(&[dst], &self.fill16, &FILL16) {
                    // The pattern repeated to 16 bytes (its width divides 16).
                    let mut v = [0u8; 16];
                    for (i, b) in v.iter_mut().enumerate() {
                        *b = p[i % p.len()];
                    }
                    let half = |h: &[u8]| u64::from_ne_bytes(h.try_into().expect("8 bytes"));
                    let n = (dst.bytes / 16) as u64;
                    let args = [
                        LaunchArg::Buffer {
                            range: *dst,
                            dtype: DType::U64,
                            writable: true,
                        },
                        LaunchArg::Scalar(ScalarArg::U64(half(&v[..8]))),
                        LaunchArg::Scalar(ScalarArg::U64(half(&v[8..]))),
                        LaunchArg::Scalar(ScalarArg::U64(n)),
                    ];
                    return self.launch_bulk(stream, pipeline, n, &args);
                }
                let d = at(dst);
                // SAFETY: caller's contract; the core checked the range's alignment to the width.
                let r = unsafe {
                    match pattern.width() {
                        1 => check(
                            sys::cuMemsetD8Async(d, p[0], dst.bytes, stream),
                            "cuMemsetD8Async",
                        ),
                        2 => check(
                            sys::cuMemsetD16Async(
                                d,
                                u16::from_ne_bytes([p[0], p[1]]),
                                dst.bytes / 2,
                                stream,
                            ),
                            "cuMemsetD16Async",
                        ),
                        4 => check(
                            sys::cuMemsetD32Async(
                                d,
                                u32::from_ne_bytes([p[0], p[1], p[2], p[3]]),
                                dst.bytes / 4,
                                stream,
                            ),
                            "cuMemsetD32Async",
                        ),
                        _ => {
                            let value = u64::from_ne_bytes(p.try_into().expect("width 8"));
                            let n = (dst.bytes / 8) as u64;
                            let blocks = n.div_ceil(256).clamp(1, 4096) as u32;
                            let args = [
                                LaunchArg::Buffer {
                                    range: *dst,
                                    dtype: DType::U64,
                                    writable: true,
                                },
                                LaunchArg::Scalar(ScalarArg::U64(value)),
                                LaunchArg::Scalar(ScalarArg::U64(n)),
                            ];
                            let pipeline = self.fill64()?;
                            return self.launch(
                                stream,
                                pipeline,
                                LaunchDims::linear(blocks, 256),
                                &args,
                            );
                        }
                    }
                };
                r.map_err(cu)
            }
            Command::Launch {
                pipeline,
                dims,
                args,
            } => self.launch(stream, *pipeline, *dims, args),
            Command::Batch { id, launches } => {
                let exec = self.graphs.exec(*id, launches, |s, l| {
                    self.launch(s, l.pipeline, l.dims, &l.args)
                })?;
                // SAFETY: an executable graph of this context (its buffers are kept alive by
                // the batch and the submission's recorded uses), on a live stream.
                check(unsafe { sys::cuGraphLaunch(exec, stream) }, "cuGraphLaunch").map_err(cu)
            }
            Command::External(work) => work.run(
                crate::interop::NativeEncoder::Cuda {
                    stream: NativeHandle::from_ptr(stream.cast()),
                    context: NativeHandle::from_ptr(self.ctx.raw.cast()),
                },
                label,
            ),
            // SAFETY: the stream is the queue's; the signal's handles are the caller's
            // (`Queue::wait_foreign`'s contract).
            Command::WaitForeign(signal) => unsafe { self.encode_wait_foreign(stream, signal) },
            Command::Wait(fence) => {
                let Some((ev, recorded_here)) = self.wait_event(*fence)? else {
                    return Ok(());
                };
                // SAFETY: a live stream and a recorded event of this context.
                let r = check(
                    unsafe { sys::cuStreamWaitEvent(stream, ev.0, 0) },
                    "cuStreamWaitEvent",
                );
                if recorded_here {
                    fresh.push(ev);
                }
                r.map_err(cu)
            }
        }
    }

    fn launch(
        &self,
        stream: sys::CUstream,
        pipeline: PipelineId,
        dims: LaunchDims,
        args: &[LaunchArg],
    ) -> Result<()> {
        let function = {
            let p = self.pipelines.read();
            p.get(pipeline.0 as usize)
                .map(|p| p.function)
                .ok_or_else(|| {
                    Error::invalid("pipeline", format!("{} does not exist", pipeline.0))
                })?
        };
        // Each argument's value in an 8-byte slot; the driver copies them at launch. On the
        // stack up to `STACK_ARGS` arguments (every kernel here has far fewer), so that a
        // launch allocates nothing here: this runs once per kernel, on the host's critical
        // path.
        const STACK_ARGS: usize = 32;
        let mut slot_array = [[0u8; 8]; STACK_ARGS];
        let mut param_array = [std::ptr::null_mut::<c_void>(); STACK_ARGS];
        let (mut slot_vec, mut param_vec);
        let (slots, params): (&mut [[u8; 8]], &mut [*mut c_void]) = if args.len() <= STACK_ARGS {
            (
                &mut slot_array[..args.len()],
                &mut param_array[..args.len()],
            )
        } else {
            slot_vec = vec![[0u8; 8]; args.len()];
            param_vec = vec![std::ptr::null_mut::<c_void>(); args.len()];
            (&mut slot_vec[..], &mut param_vec[..])
        };
        for (slot, a) in slots.iter_mut().zip(args) {
            *slot = match a {
                LaunchArg::Buffer { range, .. } => (range.addr + range.offset as u64).to_ne_bytes(),
                LaunchArg::Scalar(ScalarArg::U32(v)) => u64::from(*v).to_ne_bytes(),
                LaunchArg::Scalar(ScalarArg::I32(v)) => {
                    let mut s = [0u8; 8];
                    s[..4].copy_from_slice(&v.to_ne_bytes());
                    s
                }
                LaunchArg::Scalar(ScalarArg::F32(v)) => {
                    let mut s = [0u8; 8];
                    s[..4].copy_from_slice(&v.to_ne_bytes());
                    s
                }
                LaunchArg::Scalar(ScalarArg::U64(v)) => v.to_ne_bytes(),
            };
        }
        for (param, slot) in params.iter_mut().zip(slots.iter_mut()) {
            *param = slot.as_mut_ptr().cast();
        }
        let [gx, gy, gz] = dims.grid;
        let [bx, by, bz] = dims.block;
        // SAFETY: `function` is a loaded kernel whose parameters the core checked against the
        // declared signature; each slot holds the argument's value in its native layout (the
        // low bytes, little-endian); `params` outlives the call, which copies the values.
        check(
            unsafe {
                sys::cuLaunchKernel(
                    function,
                    gx,
                    gy,
                    gz,
                    bx,
                    by,
                    bz,
                    0,
                    stream,
                    params.as_mut_ptr(),
                    std::ptr::null_mut(),
                )
            },
            "cuLaunchKernel",
        )
        .map_err(|e| e.into_error("launching a kernel"))
    }
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        if self.ctx.bind().is_err() {
            return;
        }
        let queues = std::mem::take(&mut *self.queues.write());
        for q in &queues {
            // SAFETY: a live stream; waiting before its destruction.
            unsafe { sys::cuStreamSynchronize(q.stream) };
        }
        drop(queues);
        for e in std::mem::take(&mut *self.events.lock()) {
            // SAFETY: pooled events, no longer used by any stream (all synchronised).
            unsafe { sys::cuEventDestroy_v2(e.0) };
        }
        for p in std::mem::take(&mut *self.pipelines.write()) {
            // SAFETY: loaded by `compile`; no work is pending.
            unsafe { sys::cuModuleUnload(p.module) };
        }
    }
}

impl Backend for CudaBackend {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    unsafe fn allocate(&self, kind: MemoryKind, bytes: usize) -> Result<RawAlloc> {
        self.bind()?;
        let oom = |e: CuError| match e.code {
            sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY => Error::OutOfMemory {
                requested: bytes,
                reserved: 0,
                free: self.free_memory().unwrap_or(0),
                largest_free: 0,
            },
            _ => e.into_error("allocating memory"),
        };
        let bytes = bytes.max(1);
        match kind {
            MemoryKind::Device => {
                let ptr = memory::alloc_device(bytes).map_err(oom)?;
                Ok(RawAlloc {
                    addr: ptr,
                    handle: ptr,
                    bytes,
                    kind,
                })
            }
            MemoryKind::HostShared => {
                let (dev, host) = memory::alloc_mapped_host(bytes).map_err(oom)?;
                Ok(RawAlloc {
                    addr: dev,
                    handle: host as u64,
                    bytes,
                    kind,
                })
            }
            MemoryKind::HostRegistered | MemoryKind::Foreign => Err(Error::invalid(
                "kind",
                "registered and foreign memory come from wrap_host and wrap_foreign",
            )),
        }
    }

    unsafe fn release(&self, raw: RawAlloc) {
        if self.bind().is_err() {
            return;
        }
        match raw.kind {
            // SAFETY: the trait's contract: ours, and no pending work uses it.
            MemoryKind::Device => unsafe { memory::free_device(raw.addr) },
            // SAFETY: as above.
            MemoryKind::HostShared => unsafe { memory::free_mapped_host(raw.handle as *mut u8) },
            MemoryKind::Foreign => {
                // Foreign memory is its owner's to free: only the record goes.
                self.foreign.lock().remove(&raw.handle);
            }
            MemoryKind::HostRegistered => {
                let w = self.wrapped.lock().remove(&raw.handle);
                if let Some(w) = w {
                    let mut regs = self.registrations.lock();
                    // SAFETY: as above.
                    unsafe { regs.release(&w.registrations) };
                }
            }
        }
    }

    unsafe fn wrap_host(
        &self,
        ptr: NonNull<u8>,
        bytes: usize,
        access: MemoryAccess,
    ) -> Result<RawAlloc> {
        self.bind()?;
        let host = ptr.as_ptr() as usize;
        let registrations = self.registrations.lock().register(host, bytes, access)?;
        let addr = match Registrations::device_pointer(host) {
            Ok(a) => a,
            Err(e) => {
                let mut regs = self.registrations.lock();
                // SAFETY: registered just above and never used by any work.
                unsafe { regs.release(&registrations) };
                return Err(e.into_error("mapping registered host memory"));
            }
        };
        let handle = self.next_wrap.fetch_add(1, Ordering::Relaxed);
        self.wrapped.lock().insert(
            handle,
            Wrapped {
                host,
                registrations,
            },
        );
        Ok(RawAlloc {
            addr,
            handle,
            bytes,
            kind: MemoryKind::HostRegistered,
        })
    }

    fn host_ptr(&self, raw: &RawAlloc) -> Option<NonNull<u8>> {
        match raw.kind {
            MemoryKind::Device => None,
            MemoryKind::HostShared => NonNull::new(raw.handle as *mut u8),
            MemoryKind::HostRegistered => {
                let w = self.wrapped.lock();
                w.get(&raw.handle)
                    .and_then(|w| NonNull::new(w.host as *mut u8))
            }
            MemoryKind::Foreign => {
                let f = self.foreign.lock();
                f.get(&raw.handle)
                    .and_then(|f| f.host)
                    .and_then(|h| NonNull::new(h as *mut u8))
            }
        }
    }

    fn create_queue(&self) -> Result<QueueId> {
        self.bind()?;
        let mut queues = self.queues.write();
        let id = QueueId(queues.len() as u32);
        let q = CudaQueue::create(id).map_err(|e| e.into_error("creating a stream"))?;
        if !queues.is_empty() && !self.multi_queue.swap(true, Ordering::SeqCst) {
            // From now on epochs need events; mark the existing queues' latest work with one.
            for other in queues.iter() {
                let ev = self
                    .take_event()
                    .map_err(|e| e.into_error("creating an event"))?;
                let mut st = other.lock();
                if !other
                    .catch_up(&mut st, ev)
                    .map_err(|e| e.into_error("recording an event"))?
                {
                    self.recycle(vec![ev]);
                }
            }
        }
        queues.push(Arc::new(q));
        Ok(id)
    }

    unsafe fn submit(&self, queue: QueueId, submission: Submission<'_>) -> Result<Epoch> {
        self.bind()?;
        let q = self.queue(queue)?;
        // Waits a stream cannot make are refused before anything is encoded.
        for c in submission.commands {
            if let Command::WaitForeign(signal) = c {
                Self::check_signal(signal)?;
            }
        }
        let mut st = q.lock();
        if let Some(f) = CudaQueue::fault_state(&st) {
            return Err(f);
        }
        // The start mark goes after the cross-queue waits (they lead the commands), so that a
        // span is the submission's own work, not time blocked on another queue.
        let waits = submission
            .commands
            .iter()
            .take_while(|c| matches!(c, Command::Wait(_)))
            .count();
        let mut timed_start = None;
        let mut fresh = Vec::new();
        for (i, cmd) in submission.commands.iter().enumerate() {
            if i == waits {
                if let Some(t) = &self.timer {
                    // Timing is best effort: a failed mark leaves this submission untimed.
                    timed_start = t.mark(q.stream).ok();
                }
            }
            // SAFETY: the trait's contract covers every range of the commands.
            if let Err(e) = unsafe { self.encode(q.stream, cmd, submission.label, &mut fresh) } {
                // Commands already encoded would run untracked: drain them before failing, so
                // that no memory they use is reused under them.
                // SAFETY: a live stream.
                unsafe { sys::cuStreamSynchronize(q.stream) };
                self.recycle(fresh);
                if let (Some(t), Some(start)) = (&self.timer, timed_start) {
                    t.recycle([start]);
                }
                return Err(e);
            }
        }
        self.recycle(fresh);
        // The end mark goes before the completion event: both complete with the same work.
        let timed = match (&self.timer, timed_start) {
            (Some(t), Some(start)) => match t.mark(q.stream) {
                Ok(end) => Some((t, start, end)),
                Err(_) => {
                    // Timing is best effort: the submission itself is on the stream and stands.
                    t.recycle([start]);
                    None
                }
            },
            _ => None,
        };
        // One queue: no event unless the caller will wait for this submission alone (a staging
        // chunk), since a stream synchronisation would also wait for everything after it.
        // One event in `COMPLETION_STRIDE` submissions even on a lone queue, so that completion
        // advances (and cached memory, deferred releases and the in-flight record drain) while
        // the stream never goes idle.
        let periodic = (st.submitted + 1) % COMPLETION_STRIDE == 0;
        let event =
            if submission.exact_completion || periodic || self.multi_queue.load(Ordering::SeqCst) {
                let recorded = self.take_event().and_then(|ev| {
                    // SAFETY: a pooled event and a live stream.
                    match check(
                        unsafe { sys::cuEventRecord(ev.0, q.stream) },
                        "cuEventRecord",
                    ) {
                        Ok(()) => Ok(ev),
                        Err(e) => {
                            self.recycle(vec![ev]);
                            Err(e)
                        }
                    }
                });
                match recorded {
                    Ok(ev) => Some(ev),
                    Err(e) => {
                        if let Some((t, start, end)) = timed {
                            t.recycle([start, end]);
                        }
                        // The commands are on the stream but would be untracked: finish them before
                        // reporting the failure, as for an encoding error.
                        // SAFETY: a live stream.
                        unsafe { sys::cuStreamSynchronize(q.stream) };
                        return Err(e.into_error("recording an event"));
                    }
                }
            } else {
                None
            };
        let epoch = CudaQueue::push(&mut st, submission.label, event);
        if let Some((t, start, end)) = timed {
            t.keep(queue, epoch, start, end);
        }
        Ok(epoch)
    }

    fn completed(&self, queue: QueueId) -> Result<Epoch> {
        self.bind()?;
        let q = self.queue(queue)?;
        let mut recycle = Vec::new();
        let r = {
            let mut st = q.lock();
            q.refresh(&mut st, &mut recycle)
        };
        self.recycle(recycle);
        r
    }

    fn wait(&self, queue: QueueId, epoch: Epoch) -> Result<()> {
        self.bind()?;
        let q = self.queue(queue)?;
        // The record is checked without asking the device: a wait is usually for work still
        // running, and blocking tells completion (or the fault) by itself.
        let (target, upto) = {
            let st = q.lock();
            if let Some(f) = CudaQueue::fault_state(&st) {
                return Err(f);
            }
            if CudaQueue::completed_epoch(&st) >= epoch {
                return Ok(());
            }
            if epoch > st.submitted {
                return Err(Error::invalid(
                    "epoch",
                    format!(
                        "{queue} has submitted {} epochs; cannot wait for {epoch}",
                        st.submitted
                    ),
                ));
            }
            match CudaQueue::wait_target(&st, epoch) {
                Some((event, at)) => (Some(event), at),
                None => (None, st.submitted),
            }
        };
        q.block(target).map_err(|e| q.fail(e))?;
        let mut recycle = Vec::new();
        CudaQueue::mark_completed(&mut q.lock(), upto, &mut recycle);
        self.recycle(recycle);
        Ok(())
    }

    fn forget_batch(&self, id: u64) {
        if self.bind().is_ok() {
            // Best effort: a graph that cannot be destroyed leaks its handle, nothing else.
            let _ = self.graphs.forget(id);
        }
    }

    fn gpu_span(&self, queue: QueueId, epoch: Epoch) -> Option<GpuSpan> {
        let timer = self.timer.as_ref()?;
        self.bind().ok()?;
        timer.span(queue, epoch)
    }

    fn compile(&self, kernel: &KernelSource, constants: &Constants) -> Result<PipelineId> {
        let source = kernel.cuda.ok_or_else(|| Error::Compile {
            kernel: kernel.name.to_owned(),
            log: "no CUDA source was given".to_owned(),
        })?;
        let cubin = compile::cubin(
            kernel.name,
            source,
            constants,
            self.compute_capability,
            self.cache_dir.as_deref(),
            &self.counters,
        )?;
        self.bind()?;
        let mut module: sys::CUmodule = std::ptr::null_mut();
        // SAFETY: `cubin` is a complete CUBIN image that outlives the call.
        check(
            unsafe { sys::cuModuleLoadData(&mut module, cubin.as_ptr().cast()) },
            "cuModuleLoadData",
        )
        .map_err(|e| Error::Compile {
            kernel: kernel.name.to_owned(),
            log: format!("{} returned {}", e.call, e.name()),
        })?;
        let name = std::ffi::CString::new(kernel.name).map_err(|_| Error::Compile {
            kernel: kernel.name.to_owned(),
            log: "the name contains a NUL byte".to_owned(),
        })?;
        let mut function: sys::CUfunction = std::ptr::null_mut();
        // SAFETY: a loaded module and a NUL-terminated name.
        if let Err(e) = check(
            unsafe { sys::cuModuleGetFunction(&mut function, module, name.as_ptr()) },
            "cuModuleGetFunction",
        ) {
            // SAFETY: loaded above, unused.
            unsafe { sys::cuModuleUnload(module) };
            return Err(Error::Compile {
                kernel: kernel.name.to_owned(),
                log: format!(
                    "no extern \"C\" entry point '{}' ({})",
                    kernel.name,
                    e.name()
                ),
            });
        }
        let mut p = self.pipelines.write();
        p.push(Pipeline { module, function });
        Ok(PipelineId(p.len() as u64 - 1))
    }

    fn kernel_cache_stats(&self) -> KernelCacheStats {
        KernelCacheStats {
            compiled: self.counters.compiled.load(Ordering::Relaxed),
            disk_hits: self.counters.disk_hits.load(Ordering::Relaxed),
            memory_hits: 0,
        }
    }

    fn reset(&self) -> Result<()> {
        Err(Error::Unsupported {
            backend: "cuda",
            what: "recovering from a device fault: the CUDA context is lost with its memory; drop \
                   every buffer and open a new Device"
                .to_owned(),
        })
    }

    fn virtual_memory(&self, kind: MemoryKind) -> Option<&dyn crate::backend::VirtualMemory> {
        (kind == MemoryKind::Device && self.vmm_granule.is_some())
            .then_some(self as &dyn crate::backend::VirtualMemory)
    }

    fn native_buffer(&self, range: &crate::backend::RawRange) -> Result<NativeBuffer> {
        Ok(NativeBuffer::Cuda {
            device_ptr: range.addr + range.offset as u64,
            bytes: range.bytes,
        })
    }

    fn native_queue(&self, queue: QueueId) -> Result<NativeQueue> {
        Ok(NativeQueue::Cuda {
            stream: NativeHandle::from_ptr(self.queue(queue)?.stream.cast()),
        })
    }

    fn native_device(&self) -> NativeDevice {
        NativeDevice::Cuda {
            context: NativeHandle::from_ptr(self.ctx.raw.cast()),
            device: self.ctx.device,
        }
    }

    unsafe fn wrap_foreign(&self, memory: &ForeignMemory, bytes: usize) -> Result<RawAlloc> {
        self.wrap_foreign_memory(memory, bytes)
    }

    unsafe fn order_native(&self, fence: crate::epoch::Fence, waiter: NativeWaiter) -> Result<()> {
        // SAFETY: the trait's contract is the one `order_native_stream` needs.
        unsafe { self.order_native_stream(fence, waiter) }
    }

    fn free_memory(&self) -> Option<usize> {
        self.bind().ok()?;
        let (mut free, mut total) = (0usize, 0usize);
        // SAFETY: valid out-pointers; context current.
        check(
            unsafe { sys::cuMemGetInfo_v2(&mut free, &mut total) },
            "cuMemGetInfo",
        )
        .ok()?;
        Some(free)
    }
}
