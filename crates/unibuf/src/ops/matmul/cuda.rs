//! The CUDA product: cuBLAS's `cublasGemmEx` on the queue's stream, as external work.
//!
//! cuBLAS is column-major; a row-major `C [m, n]` is the column-major `C^T [n, m]`, so the
//! product is computed as `C^T = B^T A^T`: cuBLAS's "A" is our `b` and its "B" our `a`, with the
//! sizes `(n, m, k)`. A row-major `a [m, k]` read column-major is `a^T` with leading dimension
//! `k`; a row-major `b [k, n]` is `b^T` with leading dimension `n` (no transpose needed), and a
//! row-major `b [n, k]` is `b` itself read transposed (`CUBLAS_OP_T`, leading dimension `k`).
//!
//! Precision: `CUBLAS_COMPUTE_32F` for every dtype. For f16 and bf16 that is f32 accumulation on
//! the tensor cores; for f32 it is full FP32 (TF32 would need `CUBLAS_COMPUTE_32F_FAST_TF32` or
//! the TF32 math mode, neither of which is set, as PyTorch's default `allow_tf32 = False`). The
//! handle's math mode also sets `CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION`, so that a
//! split-k product reduces its partial sums in f32 rather than in the output dtype: the result
//! is rounded once, as on the CPU (PyTorch allows the reduced-precision reduction by default).
//!
//! # The handles
//!
//! One cuBLAS handle per device, created on the device's first product (in the closure, with the
//! device's context current), used under a mutex (a handle is not thread-safe; submissions are
//! serialised per device anyway). Queues have streams of their own, so the handle is pointed at
//! the queue's stream with `cublasSetStream` whenever it differs from the last one set (a
//! device's queue streams live as long as the device, so an address stays one queue's). This is
//! cuBLAS's documented multi-stream pattern; `cublasSetStream` also moves the handle to that
//! stream's default workspace.
//!
//! Each device keeps its handle in its BLAS slot (`DeviceInner::blas`), created on the first
//! product. The device empties the slot in its drop, right after draining its queues and before
//! the backend releases the context, so the handle is destroyed with its context alive. The
//! handle also retains the primary context itself (`cuDevicePrimaryCtxRetain`), so that it stays
//! valid whatever order other owners of the context let go in.

use super::{Gemm, Layout};
use crate::buffer::Buffer;
use crate::epoch::Fence;
use crate::error::{Error, Result};
use crate::interop::{NativeBuffer, NativeDevice, NativeEncoder, NativeHandle};
use crate::queue::Queue;
use crate::DType;
use cudarc::cublas::sys as cublas;
use cudarc::driver::sys as cu;
use parking_lot::Mutex;
use std::ffi::c_void;
use std::sync::{Arc, OnceLock};

/// Whether the cuBLAS library loads (probed once).
fn library_present() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    // SAFETY: only tries to load the library by its candidate names and closes it again.
    *PRESENT.get_or_init(|| unsafe { cublas::is_culib_present() })
}

/// The checks the CUDA path adds before anything is allocated or submitted: the library is
/// there, and the sizes fit cuBLAS's `int` dimensions.
pub(super) fn check(g: &Gemm) -> Result<()> {
    if !library_present() {
        let names: Vec<String> = cudarc::get_lib_name_candidates("cublas")
            .into_iter()
            .filter(|n| n.starts_with("libcublas.so") || n.ends_with(".dll"))
            .collect();
        return Err(Error::Unsupported {
            backend: "cuda",
            what: format!(
                "ops::matmul ({g}): the cuBLAS library was not found (looked for {}); install \
                 CUDA's cuBLAS or add the folder holding it to LD_LIBRARY_PATH",
                names.join(", ")
            ),
        });
    }
    for (name, v) in [("m", g.m), ("n", g.n), ("k", g.k)] {
        if v > i32::MAX as usize {
            return Err(Error::invalid(
                "matmul",
                format!(
                    "{name} = {v} in {g}: cuBLAS takes dimensions up to {}",
                    i32::MAX
                ),
            ));
        }
    }
    Ok(())
}

/// A cuBLAS handle with the retain of the primary context it was created in.
struct Handle {
    raw: cublas::cublasHandle_t,
    ctx: cu::CUcontext,
    device: cu::CUdevice,
    /// The stream last given to `cublasSetStream` (null: none yet), so that a run of products on
    /// one queue sets it once.
    stream: NativeHandle,
}

// SAFETY: a cuBLAS handle may be used from any thread, one at a time (it is only used under its
// slot's mutex); the context handle is a value usable from any thread once made current.
unsafe impl Send for Handle {}

impl Handle {
    /// Creates a handle for `device`, whose primary context `current` is current on this thread.
    fn create(device: cu::CUdevice, current: NativeHandle) -> std::result::Result<Handle, String> {
        let mut ctx: cu::CUcontext = std::ptr::null_mut();
        // SAFETY: a valid out-pointer and device; released in Drop (or below on failure).
        let r = unsafe { cu::cuDevicePrimaryCtxRetain(&mut ctx, device) };
        if r != cu::CUresult::CUDA_SUCCESS {
            return Err(format!(
                "cuDevicePrimaryCtxRetain returned {r:?} (retaining the context for cuBLAS)"
            ));
        }
        if ctx.cast::<c_void>() != current.as_ptr() {
            // SAFETY: retained just above.
            unsafe { cu::cuDevicePrimaryCtxRelease_v2(device) };
            return Err(format!(
                "the queue's context {current:?} is not GPU {device}'s primary context \
                 {ctx:?}: ops::matmul creates its cuBLAS handle in the primary context"
            ));
        }
        let mut raw: cublas::cublasHandle_t = std::ptr::null_mut();
        // SAFETY: a valid out-pointer; the context is current (the external-work contract).
        let s = unsafe { cublas::cublasCreate_v2(&mut raw) };
        if s != cublas::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            // SAFETY: retained just above.
            unsafe { cu::cuDevicePrimaryCtxRelease_v2(device) };
            return Err(status_message("cublasCreate_v2", s, "creating the handle"));
        }
        let handle = Handle {
            raw,
            ctx,
            device,
            stream: NativeHandle::from_ptr(std::ptr::null_mut()),
        };
        // SAFETY: a live handle.
        let s = unsafe {
            cublas::cublasSetMathMode(
                raw,
                cublas::cublasMath_t::CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION,
            )
        };
        if s != cublas::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            return Err(status_message(
                "cublasSetMathMode",
                s,
                "disallowing reduced-precision reductions",
            ));
        }
        Ok(handle)
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: the handle is live and no longer used (its slot is being emptied: its device is
        // being dropped, or creation failed); its context is alive, retained by this handle. Pushing and
        // popping leaves whatever context the thread had current (and unibuf's record of it)
        // as it was. cublasDestroy synchronises the device first.
        unsafe {
            if cu::cuCtxPushCurrent_v2(self.ctx) == cu::CUresult::CUDA_SUCCESS {
                cublas::cublasDestroy_v2(self.raw);
                let mut popped: cu::CUcontext = std::ptr::null_mut();
                cu::cuCtxPopCurrent_v2(&mut popped);
            }
            cu::cuDevicePrimaryCtxRelease_v2(self.device);
        }
    }
}

/// One device's handle, created on its first product. It lives in the device's BLAS slot
/// (`DeviceInner::blas`), which the device empties in its drop right after draining, while the
/// backend still holds the context.
struct Slot {
    device: cu::CUdevice,
    handle: Mutex<Option<Handle>>,
}

/// The slot of `q`'s device, made on first use.
fn slot(q: &Queue) -> Result<Arc<Slot>> {
    let NativeDevice::Cuda { device, .. } = q.device().native() else {
        return Err(Error::invalid(
            "matmul",
            "the CUDA path was given a queue of another backend",
        ));
    };
    let any = q.device.blas.get_or_init(|| {
        Arc::new(Slot {
            device,
            handle: Mutex::new(None),
        })
    });
    any.clone().downcast::<Slot>().map_err(|_| {
        Error::invalid(
            "matmul",
            "the device's BLAS slot holds another library's state",
        )
    })
}

/// The device address of a view.
fn device_ptr(what: &'static str, b: &Buffer) -> Result<u64> {
    match b.native()? {
        NativeBuffer::Cuda { device_ptr, .. } => Ok(device_ptr),
        other => Err(Error::invalid(
            what,
            format!("the CUDA backend gave {other:?} for '{}'", b.label()),
        )),
    }
}

/// Queues the product on `q`'s stream. The caller checked shapes, dtypes, alignment, the
/// library and the sizes ([`check`]), that `out` is writable and overlaps neither input, and
/// that `m`, `n` and `k` are non-zero.
pub(super) fn submit(q: &Queue, a: &Buffer, b: &Buffer, out: &Buffer, g: Gemm) -> Result<Fence> {
    let slot = slot(q)?;
    let pa = device_ptr("matmul: a", a)?;
    let pb = device_ptr("matmul: b", b)?;
    let po = device_ptr("matmul: out", out)?;
    q.external(&[a, b], &[out], move |encoder| {
        let NativeEncoder::Cuda { stream, context } = encoder else {
            return Err(format!("ops::matmul on CUDA was handed {encoder:?}").into());
        };
        let mut handle = slot.handle.lock();
        let h = match &mut *handle {
            Some(h) => h,
            empty => empty.insert(Handle::create(slot.device, context)?),
        };
        // SAFETY: the external-work contract: the closure runs at submission with the queue's
        // context current and `stream` the queue's; the three buffers stay alive (their memory
        // unreused) until this submission's fence completes, and the epochs have made `stream`
        // wait for earlier writes of `a` and `b` and earlier uses of `out`, and order later uses
        // after it. The views hold m*k, k*n (or n*k) and m*n elements of `g.dtype` at
        // element-aligned device addresses, `out` overlaps neither input, and the sizes fit in
        // `int` (all checked by the op). The handle is used under its mutex.
        unsafe { gemm_ex(h, stream, g, pa, pb, po) }.map_err(Into::into)
    })
}

/// `cublasSetStream` (when the stream changed) and `cublasGemmEx` of the product.
///
/// # Safety
/// `handle` is live and used by no other thread; its context is current; `stream` is a stream
/// of that context; the addresses hold the elements `g` names, valid until the work completes,
/// `c` overlapping neither input; the sizes fit in `int`.
unsafe fn gemm_ex(
    h: &mut Handle,
    stream: NativeHandle,
    g: Gemm,
    a: u64,
    b: u64,
    c: u64,
) -> std::result::Result<(), String> {
    let handle = h.raw;
    if h.stream != stream {
        // SAFETY: a live handle and a stream of its context.
        let s = unsafe { cublas::cublasSetStream_v2(handle, stream.as_ptr().cast()) };
        if s != cublas::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            return Err(status_message(
                "cublasSetStream_v2",
                s,
                &format!("{g}, stream {stream:?}"),
            ));
        }
        h.stream = stream;
    }
    let ty = match g.dtype {
        DType::F32 => cublas::cudaDataType::CUDA_R_32F,
        DType::F16 => cublas::cudaDataType::CUDA_R_16F,
        _ => cublas::cudaDataType::CUDA_R_16BF,
    };
    // Column-major C^T [n, m] = B^T [n, k] x A^T [k, m]; see the module's notes.
    let (op_b, ld_b) = match g.layout {
        Layout::KxN => (cublas::cublasOperation_t::CUBLAS_OP_N, g.n),
        Layout::NxK => (cublas::cublasOperation_t::CUBLAS_OP_T, g.k),
    };
    let (m, n, k) = (g.m as i32, g.n as i32, g.k as i32);
    // With CUBLAS_COMPUTE_32F the scalars are f32, read from the host at the call.
    let (alpha, beta) = (1.0f32, 0.0f32);
    // SAFETY: the caller's contract; beta = 0, so `c` is only written (its poison or stale
    // contents are never read).
    let s = unsafe {
        cublas::cublasGemmEx(
            handle,
            op_b,
            cublas::cublasOperation_t::CUBLAS_OP_N,
            n,
            m,
            k,
            (&alpha as *const f32).cast(),
            b as *const c_void,
            ty,
            ld_b as i32,
            a as *const c_void,
            ty,
            k,
            (&beta as *const f32).cast(),
            c as *mut c_void,
            ty,
            n,
            cublas::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            cublas::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    };
    if s != cublas::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        return Err(status_message("cublasGemmEx", s, &g.to_string()));
    }
    Ok(())
}

/// "`call` returned NAME (what it means) for `context`".
fn status_message(call: &str, s: cublas::cublasStatus_t, context: &str) -> String {
    use cublas::cublasStatus_t::*;
    let meaning = match s {
        CUBLAS_STATUS_SUCCESS => "success",
        CUBLAS_STATUS_NOT_INITIALIZED => {
            "the library was not initialised: the CUDA runtime inside cuBLAS could not start \
             (a driver older than the library, or no usable GPU)"
        }
        CUBLAS_STATUS_ALLOC_FAILED => "cuBLAS could not allocate its resources (GPU memory)",
        CUBLAS_STATUS_INVALID_VALUE => "an argument was out of range (a size or leading dimension)",
        CUBLAS_STATUS_ARCH_MISMATCH => "this GPU lacks a feature the product needs (e.g. bf16)",
        CUBLAS_STATUS_MAPPING_ERROR => "a GPU memory access failed (texture binding)",
        CUBLAS_STATUS_EXECUTION_FAILED => "the kernel failed to launch on the GPU",
        CUBLAS_STATUS_INTERNAL_ERROR => "an internal cuBLAS operation failed",
        CUBLAS_STATUS_NOT_SUPPORTED => "this combination of types and sizes is not supported",
        CUBLAS_STATUS_LICENSE_ERROR => "a licence check failed",
    };
    format!("{call} returned {s:?} ({meaning}) for {context}")
}
