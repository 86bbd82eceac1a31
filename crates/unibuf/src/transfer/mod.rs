//! Transfers: upload, download, copy and fill, synchronous or returning a fence.
//!
//! The route depends on the storage modes, never on the caller:
//! - host memory into or out of a host-visible buffer (Shared, External) is one host memcpy,
//!   after the device work it depends on (an async upload whose destination is still in use
//!   goes through staging instead, so that it does not block);
//! - host memory into or out of Private memory streams through the staging ring, one chunk per
//!   copy command, so host copies overlap device copies;
//! - buffer to buffer and fills are device commands on the queue, whatever the modes.
//!
//! Every transfer is recorded in the ledger with the caller's source location.

mod host_copy;
pub(crate) mod staging;
pub(crate) mod stream_in;

use crate::allocation::Allocation;
use crate::backend::{Command, FillPattern};
use crate::buffer::Buffer;
use crate::device::{Completion, Use};
use crate::dtype::Element;
use crate::epoch::{Access, Fence};
use crate::error::{Error, Result};
use crate::ledger::CallSite;
use crate::ledger::{CopyRecord, Direction};
use crate::queue::Queue;
use crate::storage::StorageMode;
use staging::StagingChunk;
use std::collections::VecDeque;
use std::marker::PhantomData;

/// A download whose device copy is in flight; [`PendingDownload::wait`] returns the data.
pub struct PendingDownload<T> {
    snapshot: Option<Allocation>,
    fence: Fence,
    len: usize,
    _element: PhantomData<T>,
}

impl<T: Element> PendingDownload<T> {
    /// The fence of the device copy.
    pub fn fence(&self) -> Fence {
        self.fence
    }

    /// Waits for the copy and returns the elements.
    pub fn wait(self) -> Result<Vec<T>> {
        let mut out = vec![T::zeroed(); self.len];
        if let Some(snapshot) = &self.snapshot {
            let bytes = std::mem::size_of_val(out.as_slice());
            let borrow =
                snapshot
                    .device
                    .host_borrow(snapshot, 0, bytes, Access::Read, "download")?;
            let src = snapshot.host_addr(0).expect("snapshots are Shared");
            // SAFETY: the snapshot is a Shared allocation of at least `bytes` bytes that only
            // this value owns; host_borrow waited for the device copy that wrote it.
            unsafe { std::ptr::copy_nonoverlapping(src, out.as_mut_ptr().cast::<u8>(), bytes) };
            snapshot.uses().remove_borrow(borrow);
        }
        Ok(out)
    }
}

/// Whether an upload may block on device work still using its destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Blocking {
    /// The caller waits for the upload anyway (`upload`): a direct host copy that first waits
    /// for the device is as good as any, and copies the bytes once.
    Allowed,
    /// The caller goes on with a fence (`upload_async`): a destination still in use is
    /// reached through staging instead, so that the call returns at once.
    Avoided,
}

/// How a transfer moved its bytes, as the ledger records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    /// One host copy, or a device command within device memory.
    Direct,
    /// Through the staging ring or a host-visible snapshot.
    Staged,
}

struct Audit {
    direction: Direction,
    src: Option<StorageMode>,
    dst: Option<StorageMode>,
    bytes: usize,
    site: CallSite,
    started: u64,
}

impl Queue {
    #[track_caller]
    fn audit_start(
        &self,
        direction: Direction,
        src: Option<&Buffer>,
        dst: Option<&Buffer>,
        bytes: usize,
    ) -> Audit {
        Audit {
            direction,
            src: src.map(|b| b.mode()),
            dst: dst.map(|b| b.mode()),
            bytes,
            site: CallSite::caller(),
            started: self.device.ledger.now_ns(),
        }
    }

    fn audit_end(&self, a: Audit, label: &str, route: Route, fence: Fence) {
        let ledger = &self.device.ledger;
        ledger.record(CopyRecord {
            direction: a.direction,
            src: a.src,
            dst: a.dst,
            bytes: a.bytes as u64,
            staged: route == Route::Staged,
            label: label.to_owned(),
            site: a.site,
            host_start_ns: a.started,
            host_ns: ledger.now_ns() - a.started,
            fence: (fence.epoch != 0).then_some(fence),
        });
    }

    fn transfer_label<'a>(&'a self, b: &'a Buffer) -> &'a str {
        self.submission_label(b.label())
    }

    /// Uploads `data` into `dst` and waits until it is there.
    ///
    /// `T` must be `dst`'s dtype and `data` exactly as long as `dst`.
    #[track_caller]
    pub fn upload<T: Element>(&self, dst: &Buffer, data: &[T]) -> Result<()> {
        let fence = self.upload_impl(dst, data, Blocking::Allowed)?;
        self.device.wait(fence)
    }

    /// Uploads `data` into `dst` and returns the fence that completes when it is there. `data`
    /// may be dropped at once: it has been copied to `dst` or into staging.
    #[track_caller]
    pub fn upload_async<T: Element>(&self, dst: &Buffer, data: &[T]) -> Result<Fence> {
        self.upload_impl(dst, data, Blocking::Avoided)
    }

    #[track_caller]
    fn upload_impl<T: Element>(
        &self,
        dst: &Buffer,
        data: &[T],
        blocking: Blocking,
    ) -> Result<Fence> {
        self.device.check_fault()?;
        self.check_buffer("upload destination", dst)?;
        dst.check_dtype("upload", T::DTYPE)?;
        if data.len() != dst.len() {
            return Err(Error::ShapeMismatch {
                what: "upload: elements",
                expected: format!("{} (shape {:?})", dst.len(), dst.shape()),
                got: data.len().to_string(),
            });
        }
        self.upload_bytes(dst, bytemuck::cast_slice(data), blocking)
    }

    /// Uploads raw bytes into `dst` (exactly its byte length; the caller checked the dtype),
    /// recorded in the ledger like every upload.
    #[track_caller]
    pub(crate) fn upload_bytes(
        &self,
        dst: &Buffer,
        bytes: &[u8],
        blocking: Blocking,
    ) -> Result<Fence> {
        debug_assert_eq!(bytes.len(), dst.byte_len());
        let audit = self.audit_start(Direction::HostToDevice, None, Some(dst), bytes.len());
        let label = self.transfer_label(dst);
        let direct = dst.is_host_accessible()
            && (blocking == Blocking::Allowed
                || !self
                    .device
                    .host_access_would_wait(&dst.alloc, Access::Write));
        let (fence, route) = if direct {
            self.host_copy_in(dst, bytes)?;
            (self.done_fence(), Route::Direct)
        } else {
            (self.staged_upload(dst, bytes, label)?, Route::Staged)
        };
        self.audit_end(audit, label, route, fence);
        Ok(fence)
    }

    /// One memcpy from caller memory into a host-visible buffer, under a host write borrow.
    fn host_copy_in(&self, dst: &Buffer, bytes: &[u8]) -> Result<()> {
        let r = dst.byte_range();
        let borrow =
            self.device
                .host_borrow(&dst.alloc, r.start, r.end, Access::Write, "upload")?;
        let ptr = dst
            .alloc
            .host_addr(r.start)
            .expect("host_borrow checked host access");
        // SAFETY: `ptr` addresses `bytes.len()` bytes inside the live allocation (the view's
        // range); the write borrow excludes device work and other host access to them.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), ptr, bytes.len()) };
        dst.alloc.uses().remove_borrow(borrow);
        Ok(())
    }

    fn staged_upload(&self, dst: &Buffer, bytes: &[u8], label: &str) -> Result<Fence> {
        let dev = &self.device;
        let mut fence = self.done_fence();
        let base = dst.byte_offset();
        let stores = dev.staging.upload_stores(bytes.len());
        for (i, piece) in bytes.chunks(dev.staging.chunk_bytes()).enumerate() {
            let off = base + i * dev.staging.chunk_bytes();
            let chunk = dev.staging.take(&*dev.backend)?;
            // SAFETY: the chunk is checked out to us, host-visible, at least chunk_bytes long,
            // and the copy that last used it has completed (StagingPool::take).
            unsafe {
                dev.staging
                    .copy_into_chunk(chunk.host(), piece.as_ptr(), piece.len(), stores)
            };
            let submitted = dev.submit(
                self.id(),
                label,
                "upload",
                &[Use {
                    alloc: &dst.alloc,
                    start: off,
                    end: off + piece.len(),
                    access: Access::Write,
                }],
                &[Command::Copy {
                    src: chunk.range(piece.len()),
                    dst: dst.alloc.range(off, piece.len()),
                }],
                Completion::Exact,
            );
            let ok = submitted.as_ref().ok().copied();
            dev.staging.put(chunk, ok);
            fence = submitted?;
        }
        Ok(fence)
    }

    /// Downloads `src` into a new `Vec`, waiting for the device work that writes it.
    #[track_caller]
    pub fn download<T: Element>(&self, src: &Buffer) -> Result<Vec<T>> {
        let mut out = vec![T::zeroed(); src.len()];
        self.download_into(src, &mut out)?;
        Ok(out)
    }

    /// Downloads `src` into `out`, which must be exactly as long.
    #[track_caller]
    pub fn download_into<T: Element>(&self, src: &Buffer, out: &mut [T]) -> Result<()> {
        self.device.check_fault()?;
        self.check_buffer("download source", src)?;
        src.check_dtype("download", T::DTYPE)?;
        if out.len() != src.len() {
            return Err(Error::ShapeMismatch {
                what: "download: elements",
                expected: format!("{} (shape {:?})", src.len(), src.shape()),
                got: out.len().to_string(),
            });
        }
        let out: &mut [u8] = bytemuck::cast_slice_mut(out);
        let audit = self.audit_start(Direction::DeviceToHost, Some(src), None, out.len());
        let label = self.transfer_label(src);
        let (fence, route) = if src.is_host_accessible() {
            let r = src.byte_range();
            let borrow =
                self.device
                    .host_borrow(&src.alloc, r.start, r.end, Access::Read, "download")?;
            let ptr = src
                .alloc
                .host_addr(r.start)
                .expect("host_borrow checked host access");
            // SAFETY: `ptr` addresses the view's bytes in the live allocation; the read borrow
            // waited for device writes and refuses new ones until removed.
            unsafe { std::ptr::copy_nonoverlapping(ptr, out.as_mut_ptr(), out.len()) };
            src.alloc.uses().remove_borrow(borrow);
            (self.done_fence(), Route::Direct)
        } else {
            (self.staged_download(src, out, label)?, Route::Staged)
        };
        self.audit_end(audit, label, route, fence);
        Ok(())
    }

    fn staged_download(&self, src: &Buffer, out: &mut [u8], label: &str) -> Result<Fence> {
        let dev = &self.device;
        let step = dev.staging.chunk_bytes();
        let mut in_flight: VecDeque<(StagingChunk, Fence, usize, usize)> = VecDeque::new();
        let mut last = self.done_fence();
        let finish = |(chunk, fence, at, n): (StagingChunk, Fence, usize, usize),
                      out: &mut [u8]|
         -> Result<()> {
            let waited = dev.wait(fence);
            if waited.is_ok() {
                // SAFETY: the copy into the chunk completed (waited), the chunk is checked out
                // to us and holds at least `n` bytes.
                unsafe {
                    dev.staging
                        .copy_out_of_chunk(out[at..at + n].as_mut_ptr(), chunk.host(), n)
                };
            }
            dev.staging.put(chunk, None);
            waited
        };
        let mut result = Ok(());
        for at in (0..out.len()).step_by(step.max(1)) {
            let n = step.min(out.len() - at);
            if in_flight.len() == dev.staging.depth() {
                let done = in_flight.pop_front().expect("non-empty");
                if let Err(e) = finish(done, out) {
                    result = Err(e);
                    break;
                }
            }
            // Holding chunks, this transfer must not wait for others' chunks: when none is
            // free it drains its own oldest first.
            let chunk = loop {
                match dev.staging.try_take(&*dev.backend) {
                    Ok(Some(c)) => break Ok(c),
                    Ok(None) => match in_flight.pop_front() {
                        Some(done) => {
                            if let Err(e) = finish(done, out) {
                                break Err(e);
                            }
                        }
                        None => break dev.staging.take(&*dev.backend),
                    },
                    Err(e) => break Err(e),
                }
            };
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            };
            let off = src.byte_offset() + at;
            match dev.submit(
                self.id(),
                label,
                "download",
                &[Use {
                    alloc: &src.alloc,
                    start: off,
                    end: off + n,
                    access: Access::Read,
                }],
                &[Command::Copy {
                    src: src.alloc.range(off, n),
                    dst: chunk.range(n),
                }],
                Completion::Exact,
            ) {
                Ok(fence) => {
                    last = fence;
                    in_flight.push_back((chunk, fence, at, n));
                }
                Err(e) => {
                    dev.staging.put(chunk, None);
                    result = Err(e);
                    break;
                }
            }
        }
        // Every chunk in flight is waited for and returned, also after an error.
        for done in in_flight {
            let r = finish(done, out);
            if result.is_ok() {
                result = r;
            }
        }
        result.map(|()| last)
    }

    /// Starts a download: the bytes of `src` as of this point in the queue's order are copied
    /// into a host-visible snapshot; [`PendingDownload::wait`] returns them.
    #[track_caller]
    pub fn download_async<T: Element>(&self, src: &Buffer) -> Result<PendingDownload<T>> {
        self.device.check_fault()?;
        self.check_buffer("download source", src)?;
        src.check_dtype("download", T::DTYPE)?;
        let bytes = src.byte_len();
        let audit = self.audit_start(Direction::DeviceToHost, Some(src), None, bytes);
        let label = self.transfer_label(src);
        if bytes == 0 {
            let fence = self.done_fence();
            self.audit_end(audit, label, Route::Direct, fence);
            return Ok(PendingDownload {
                snapshot: None,
                fence,
                len: 0,
                _element: PhantomData,
            });
        }
        let snapshot = self.device.allocate(
            StorageMode::Shared,
            bytes,
            format!("download snapshot of '{}'", src.label()),
        )?;
        let r = src.byte_range();
        let fence = self.device.submit(
            self.id(),
            label,
            "download",
            &[
                Use {
                    alloc: &src.alloc,
                    start: r.start,
                    end: r.end,
                    access: Access::Read,
                },
                Use {
                    alloc: &snapshot,
                    start: 0,
                    end: bytes,
                    access: Access::Write,
                },
            ],
            &[Command::Copy {
                src: src.alloc.range(r.start, bytes),
                dst: snapshot.range(0, bytes),
            }],
            Completion::Exact,
        )?;
        self.audit_end(audit, label, Route::Staged, fence);
        Ok(PendingDownload {
            snapshot: Some(snapshot),
            fence,
            len: src.len(),
            _element: PhantomData,
        })
    }

    /// Copies `src` to `dst` (same dtype and length; any storage modes) and waits.
    #[track_caller]
    pub fn copy(&self, src: &Buffer, dst: &Buffer) -> Result<()> {
        let fence = self.copy_async(src, dst)?;
        self.device.wait(fence)
    }

    /// Copies `src` to `dst` on the device and returns the fence.
    #[track_caller]
    pub fn copy_async(&self, src: &Buffer, dst: &Buffer) -> Result<Fence> {
        self.device.check_fault()?;
        self.check_buffer("copy source", src)?;
        self.check_buffer("copy destination", dst)?;
        dst.check_dtype("copy destination", src.dtype())?;
        if src.len() != dst.len() {
            return Err(Error::ShapeMismatch {
                what: "copy: elements",
                expected: format!("{} (source shape {:?})", src.len(), src.shape()),
                got: format!("{} (destination shape {:?})", dst.len(), dst.shape()),
            });
        }
        let (s, d) = (src.byte_range(), dst.byte_range());
        if src.shares_memory_with(dst) && s.start < d.end && d.start < s.end {
            return Err(Error::invalid(
                "copy",
                format!(
                    "source bytes {s:?} and destination bytes {d:?} of '{}' overlap",
                    src.label()
                ),
            ));
        }
        let audit = self.audit_start(Direction::DeviceToDevice, Some(src), Some(dst), s.len());
        let label = self.transfer_label(dst);
        let fence = if s.is_empty() {
            self.done_fence()
        } else {
            self.device.submit(
                self.id(),
                label,
                "copy",
                &[
                    Use {
                        alloc: &src.alloc,
                        start: s.start,
                        end: s.end,
                        access: Access::Read,
                    },
                    Use {
                        alloc: &dst.alloc,
                        start: d.start,
                        end: d.end,
                        access: Access::Write,
                    },
                ],
                &[Command::Copy {
                    src: src.alloc.range(s.start, s.len()),
                    dst: dst.alloc.range(d.start, d.len()),
                }],
                Completion::Queue,
            )?
        };
        self.audit_end(audit, label, Route::Direct, fence);
        Ok(fence)
    }

    /// Fills `dst` with a repeating pattern and waits. The view's byte offset and length must
    /// be multiples of the pattern's width.
    ///
    /// ```
    /// use unibuf::{DType, Device, FillPattern, StorageMode};
    /// let dev = Device::open("cpu")?;
    /// let b = dev.alloc(DType::F32, &[5], StorageMode::Shared)?;
    /// dev.queue().fill(&b, FillPattern::of(0.25f32))?;
    /// assert_eq!(&*b.read::<f32>()?, &[0.25; 5]);
    /// # Ok::<(), unibuf::Error>(())
    /// ```
    #[track_caller]
    pub fn fill(&self, dst: &Buffer, pattern: FillPattern) -> Result<()> {
        let fence = self.fill_async(dst, pattern)?;
        self.device.wait(fence)
    }

    /// Fills `dst` on the device and returns the fence.
    #[track_caller]
    pub fn fill_async(&self, dst: &Buffer, pattern: FillPattern) -> Result<Fence> {
        self.device.check_fault()?;
        self.check_buffer("fill destination", dst)?;
        let w = pattern.width();
        let d = dst.byte_range();
        if !d.start.is_multiple_of(w) {
            return Err(Error::Misaligned {
                what: "fill: view byte offset for the pattern width",
                value: d.start,
                align: w,
            });
        }
        if !d.len().is_multiple_of(w) {
            return Err(Error::Misaligned {
                what: "fill: view byte length for the pattern width",
                value: d.len(),
                align: w,
            });
        }
        let audit = self.audit_start(Direction::Fill, None, Some(dst), d.len());
        let label = self.transfer_label(dst);
        let fence = if d.is_empty() {
            self.done_fence()
        } else {
            self.device.submit(
                self.id(),
                label,
                "fill",
                &[Use {
                    alloc: &dst.alloc,
                    start: d.start,
                    end: d.end,
                    access: Access::Write,
                }],
                &[Command::Fill {
                    dst: dst.alloc.range(d.start, d.len()),
                    pattern,
                }],
                Completion::Queue,
            )?
        };
        self.audit_end(audit, label, Route::Direct, fence);
        Ok(fence)
    }
}
