//! The platform's own ceiling for each transfer, measured in the same process as unibuf.
//!
//! On CUDA these are the driver's calls with nothing around them: cuMemcpy from pinned and from
//! pageable memory, cuMemcpyDtoD, cuMemsetD8/D32. On the CPU backend they are the C library's
//! memcpy and memset, which is what the CPU backend's transfers come down to.

/// The ceiling measurements one backend offers.
pub trait Ceiling {
    /// What the numbers are ("CUDA driver", "libc memcpy").
    fn name(&self) -> &'static str;
    /// Seconds for one transfer of `op` over `bytes` (median), or `None` if not measurable.
    fn seconds(&mut self, op: &str, bytes: usize, samples: usize) -> Option<f64>;
    /// Host seconds per launch of an empty kernel, `count` per sample timed in bursts of
    /// `burst` with the device drained between them (median of `samples`).
    fn launch_seconds(&mut self, _count: usize, _burst: usize, _samples: usize) -> Option<f64> {
        None
    }
    /// Nanoseconds per alloc+free pair of `size` bytes with the platform's own allocator.
    fn alloc_pair_ns(&mut self, _size: usize) -> Option<f64> {
        None
    }
}

/// memcpy and memset on host memory.
pub struct HostCeiling;

impl Ceiling for HostCeiling {
    fn name(&self) -> &'static str {
        "host memcpy/memset"
    }
    fn seconds(&mut self, op: &str, bytes: usize, samples: usize) -> Option<f64> {
        let src = vec![7u8; bytes];
        let mut dst = vec![1u8; bytes];
        let reps = super::reps_for(bytes);
        let t = match op {
            "fill_u8" | "fill_u32" | "fill_u64" => {
                super::median_seconds::<()>(samples, reps, || {
                    dst.fill(3);
                    std::hint::black_box(&dst);
                    Ok(())
                })
            }
            _ => super::median_seconds::<()>(samples, reps, || {
                dst.copy_from_slice(&src);
                std::hint::black_box(&dst);
                Ok(())
            }),
        };
        t.ok()
    }
}

#[cfg(feature = "cuda")]
pub use cuda::DriverCeiling;

#[cfg(feature = "cuda")]
mod cuda {
    use super::Ceiling;
    use cudarc::driver::sys::{self, CUresult};
    use std::ffi::c_void;

    fn ok(r: CUresult) -> Option<()> {
        (r == CUresult::CUDA_SUCCESS).then_some(())
    }

    /// The empty kernel compiled by NVRTC and loaded with the driver, for bare launches.
    fn noop_function() -> Option<sys::CUfunction> {
        let ptx = cudarc::nvrtc::compile_ptx(super::super::launch::NOOP_CUDA).ok()?;
        let image = std::ffi::CString::new(ptx.to_src()).ok()?;
        let mut module = std::ptr::null_mut();
        let mut function = std::ptr::null_mut();
        // SAFETY: a NUL-terminated PTX image; valid out-pointers; the module stays loaded for
        // the life of the process (a benchmark run).
        unsafe {
            ok(sys::cuModuleLoadData(&mut module, image.as_ptr().cast()))?;
            ok(sys::cuModuleGetFunction(
                &mut function,
                module,
                c"unibuf_bench_noop".as_ptr(),
            ))?;
        }
        Some(function)
    }

    /// Raw driver transfers on the primary context of GPU 0 with one stream.
    pub struct DriverCeiling {
        stream: sys::CUstream,
        held: Option<Held>,
    }

    /// The memory of the last size measured, kept so that samples of the ceiling can be
    /// interleaved with unibuf's without allocating (a GiB of pinned memory takes a fraction
    /// of a second to allocate) between them.
    struct Held {
        bytes: usize,
        device: sys::CUdeviceptr,
        device2: sys::CUdeviceptr,
        /// Null until an op needs pinned memory.
        pinned: *mut c_void,
        /// Empty until an op needs pageable memory.
        pageable: Vec<u8>,
    }

    impl Held {
        /// Frees everything; the stream must be idle.
        ///
        /// # Safety
        /// No work on the memory is pending.
        unsafe fn free(self) {
            // SAFETY: allocated by `DriverCeiling::held`; idle (the contract).
            unsafe {
                if !self.pinned.is_null() {
                    sys::cuMemFreeHost(self.pinned);
                }
                sys::cuMemFree_v2(self.device);
                sys::cuMemFree_v2(self.device2);
            }
        }
    }

    impl DriverCeiling {
        /// Device memory for `bytes`, with pinned or pageable host memory if asked; the
        /// previous size's memory is freed first.
        fn held(&mut self, bytes: usize, pinned: bool, pageable: bool) -> Option<&mut Held> {
            // SAFETY: plain driver calls with valid out-pointers on the stream's context;
            // memory is freed only after the stream is synchronised.
            unsafe {
                let mut c = std::ptr::null_mut();
                sys::cuStreamGetCtx(self.stream, &mut c);
                ok(sys::cuCtxSetCurrent(c))?;
                if self.held.as_ref().is_some_and(|h| h.bytes != bytes) {
                    sys::cuStreamSynchronize(self.stream);
                    if let Some(h) = self.held.take() {
                        h.free();
                    }
                }
                if self.held.is_none() {
                    let mut d: sys::CUdeviceptr = 0;
                    ok(sys::cuMemAlloc_v2(&mut d, bytes))?;
                    let mut d2: sys::CUdeviceptr = 0;
                    if ok(sys::cuMemAlloc_v2(&mut d2, bytes)).is_none() {
                        sys::cuMemFree_v2(d);
                        return None;
                    }
                    self.held = Some(Held {
                        bytes,
                        device: d,
                        device2: d2,
                        pinned: std::ptr::null_mut(),
                        pageable: Vec::new(),
                    });
                }
                let h = self.held.as_mut()?;
                if pinned && h.pinned.is_null() {
                    let mut p: *mut c_void = std::ptr::null_mut();
                    ok(sys::cuMemHostAlloc(&mut p, bytes, 0))?;
                    std::ptr::write_bytes(p.cast::<u8>(), 7, bytes);
                    h.pinned = p;
                }
                if pageable && h.pageable.is_empty() {
                    h.pageable = vec![7u8; bytes];
                }
                Some(h)
            }
        }
    }

    impl Drop for DriverCeiling {
        fn drop(&mut self) {
            if let Some(h) = self.held.take() {
                // SAFETY: the stream's context is made current, and the stream synchronised,
                // before the memory goes.
                unsafe {
                    let mut c = std::ptr::null_mut();
                    sys::cuStreamGetCtx(self.stream, &mut c);
                    sys::cuCtxSetCurrent(c);
                    sys::cuStreamSynchronize(self.stream);
                    h.free();
                }
            }
        }
    }

    impl DriverCeiling {
        /// Opens the driver; `None` if there is no usable GPU.
        pub fn open() -> Option<DriverCeiling> {
            // SAFETY: plain driver calls with valid out-pointers; the primary context is
            // retained for the life of the process (a benchmark run).
            unsafe {
                if !sys::is_culib_present() {
                    return None;
                }
                ok(sys::cuInit(0))?;
                let mut dev = 0;
                ok(sys::cuDeviceGet(&mut dev, 0))?;
                let mut ctx = std::ptr::null_mut();
                ok(sys::cuDevicePrimaryCtxRetain(&mut ctx, dev))?;
                ok(sys::cuCtxSetCurrent(ctx))?;
                let mut stream = std::ptr::null_mut();
                ok(sys::cuStreamCreate(&mut stream, 1))?;
                Some(DriverCeiling { stream, held: None })
            }
        }

        fn time(
            &self,
            bytes: usize,
            samples: usize,
            mut op: impl FnMut() -> Option<()>,
        ) -> Option<f64> {
            let stream = self.stream;
            super::super::median_seconds(samples, super::super::reps_for(bytes), || {
                op().ok_or(())?;
                // SAFETY: a live stream of the current context.
                ok(unsafe { sys::cuStreamSynchronize(stream) }).ok_or(())
            })
            .ok()
        }
    }

    impl Ceiling for DriverCeiling {
        fn name(&self) -> &'static str {
            "CUDA driver"
        }

        fn alloc_pair_ns(&mut self, size: usize) -> Option<f64> {
            // The stream-ordered allocator on the device's default pool, with its release
            // threshold raised so that freed memory stays in the pool (the tuned setting).
            // SAFETY: plain driver calls with valid pointers; every allocation is freed on the
            // stream before the final synchronisation.
            unsafe {
                let mut ctx = std::ptr::null_mut();
                sys::cuStreamGetCtx(self.stream, &mut ctx);
                ok(sys::cuCtxSetCurrent(ctx))?;
                let mut dev = 0;
                ok(sys::cuCtxGetDevice(&mut dev))?;
                let mut pool = std::ptr::null_mut();
                ok(sys::cuDeviceGetDefaultMemPool(&mut pool, dev))?;
                let mut threshold: u64 = u64::MAX;
                ok(sys::cuMemPoolSetAttribute(
                    pool,
                    sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                    (&mut threshold as *mut u64).cast(),
                ))?;
                let n = 100_000;
                let mut ptr: sys::CUdeviceptr = 0;
                ok(sys::cuMemAllocAsync(&mut ptr, size, self.stream))?;
                ok(sys::cuMemFreeAsync(ptr, self.stream))?;
                let t = std::time::Instant::now();
                for _ in 0..n {
                    ok(sys::cuMemAllocAsync(&mut ptr, size, self.stream))?;
                    ok(sys::cuMemFreeAsync(ptr, self.stream))?;
                }
                let ns = t.elapsed().as_nanos() as f64 / n as f64;
                ok(sys::cuStreamSynchronize(self.stream))?;
                Some(ns)
            }
        }

        fn launch_seconds(&mut self, count: usize, burst: usize, samples: usize) -> Option<f64> {
            let function = noop_function()?;
            let mut out: sys::CUdeviceptr = 0;
            // SAFETY: valid out-pointer; the context is current.
            ok(unsafe { sys::cuMemAlloc_v2(&mut out, 4) })?;
            let mut n: u32 = 0;
            let stream = self.stream;
            let t = super::super::launch::per_launch_seconds(
                count,
                burst,
                samples,
                || {
                    let mut params: [*mut c_void; 2] =
                        [(&mut out as *mut u64).cast(), (&mut n as *mut u32).cast()];
                    // SAFETY: a loaded kernel taking (unsigned int*, unsigned int); `params`
                    // points at values of those types, alive for the call.
                    ok(unsafe {
                        sys::cuLaunchKernel(
                            function,
                            1,
                            1,
                            1,
                            32,
                            1,
                            1,
                            0,
                            stream,
                            params.as_mut_ptr(),
                            std::ptr::null_mut(),
                        )
                    })
                    .ok_or(())
                },
                // SAFETY: a live stream.
                || ok(unsafe { sys::cuStreamSynchronize(stream) }).ok_or(()),
            );
            // SAFETY: allocated above; the stream is synchronised.
            unsafe {
                sys::cuStreamSynchronize(stream);
                sys::cuMemFree_v2(out);
            }
            t.ok()
        }

        fn seconds(&mut self, op: &str, bytes: usize, samples: usize) -> Option<f64> {
            let pinned_op = matches!(
                op,
                "h2d_pinned" | "h2d_external" | "d2h_pinned" | "d2h_external"
            );
            let pageable_op = matches!(op, "h2d_pageable" | "d2h_pageable");
            let s = self.stream;
            let held = self.held(bytes, pinned_op, pageable_op)?;
            let (d, d2, pinned) = (held.device, held.device2, held.pinned);
            let pageable = held.pageable.as_mut_ptr().cast::<c_void>();
            // SAFETY: every pointer was allocated by `held` for at least `bytes` bytes (the
            // pinned and pageable ones when the op needs them) and lives until the next size
            // or until the ceiling is dropped; each timed op ends with a stream synchronisation.
            unsafe {
                match op {
                    "h2d_pinned" | "h2d_external" => self.time(bytes, samples, || {
                        ok(sys::cuMemcpyHtoDAsync_v2(d, pinned, bytes, s))
                    }),
                    "d2h_pinned" | "d2h_external" => self.time(bytes, samples, || {
                        ok(sys::cuMemcpyDtoHAsync_v2(pinned, d, bytes, s))
                    }),
                    "h2d_pageable" => self.time(bytes, samples, || {
                        ok(sys::cuMemcpyHtoDAsync_v2(d, pageable, bytes, s))
                    }),
                    "d2h_pageable" => self.time(bytes, samples, || {
                        ok(sys::cuMemcpyDtoHAsync_v2(pageable, d, bytes, s))
                    }),
                    "d2d_copy" => self.time(bytes, samples, || {
                        ok(sys::cuMemcpyDtoDAsync_v2(d2, d, bytes, s))
                    }),
                    "fill_u8" => {
                        self.time(bytes, samples, || ok(sys::cuMemsetD8Async(d, 3, bytes, s)))
                    }
                    "fill_u32" | "fill_u64" => self.time(bytes, samples, || {
                        ok(sys::cuMemsetD32Async(d, 0x0102_0304, bytes / 4, s))
                    }),
                    _ => None,
                }
            }
        }
    }
}
