//! External work: foreign libraries' work on unibuf buffers, ordered by the epochs.
//!
//! [`Queue::external`] is one submission like a launch. unibuf first makes the queue's native
//! stream (or command buffer) wait for the earlier fences of the buffers named, then hands the
//! stream to the closure, which enqueues the foreign work (a cuBLAS call, an MPS kernel, a
//! kernel of the engine's own), and finally records the submission's fence on the buffers as a
//! read or a write. Reuse of freed memory, host access and residency then wait for that work as
//! they wait for unibuf's own.

use crate::buffer::Buffer;
use crate::device::{Completion, Use};
use crate::epoch::{Access, Fence};
use crate::error::{Error, Result};
use crate::interop::NativeEncoder;
use crate::queue::Queue;
use parking_lot::Mutex;
use std::fmt;
use std::sync::Arc;

/// The error a closure of [`Queue::external`] returns: any error type of the foreign library.
pub type ExternalError = Box<dyn std::error::Error + Send + Sync>;

type Work = Box<dyn FnOnce(NativeEncoder) -> std::result::Result<(), ExternalError> + Send>;

/// A closure that enqueues foreign work, carried by a command to the backend, which runs it
/// exactly once: at submission on CUDA and Metal (with the queue's stream or command buffer), on
/// the queue's worker in queue order on the CPU.
#[derive(Clone)]
pub struct ExternalWork {
    work: Arc<Mutex<Option<Work>>>,
}

impl ExternalWork {
    pub(crate) fn new(
        f: impl FnOnce(NativeEncoder) -> std::result::Result<(), ExternalError> + Send + 'static,
    ) -> ExternalWork {
        ExternalWork {
            work: Arc::new(Mutex::new(Some(Box::new(f)))),
        }
    }

    /// Runs the closure with `encoder`, catching a panic. `label` names the submission in the
    /// error. A second run (a command cloned and encoded twice) is refused.
    pub fn run(&self, encoder: NativeEncoder, label: &str) -> Result<()> {
        let work = self.work.lock().take();
        let Some(work) = work else {
            return Err(Error::External {
                label: label.to_owned(),
                detail: "the closure already ran (external work runs once)".to_owned(),
            });
        };
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(encoder))) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Error::External {
                label: label.to_owned(),
                detail: e.to_string(),
            }),
            Err(panic) => Err(Error::External {
                label: label.to_owned(),
                detail: format!(
                    "the closure panicked: {}",
                    panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "(no message)".to_owned())
                ),
            }),
        }
    }
}

impl fmt::Debug for ExternalWork {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pending = self.work.lock().is_some();
        f.debug_struct("ExternalWork")
            .field("pending", &pending)
            .finish()
    }
}

impl Queue {
    /// Runs foreign work on this queue under the epochs, and returns its fence.
    ///
    /// `reads` and `writes` are the buffers the work touches. Before the closure runs, the
    /// queue waits (device-side) for earlier work on them: writes by other queues before a read,
    /// also reads before a write. The closure then enqueues its work on the queue's own stream:
    /// - **CUDA:** `NativeEncoder::Cuda { stream, .. }`, at this call, with the context current;
    /// - **Metal:** `NativeEncoder::Metal { command_buffer }`, a command buffer of the queue that
    ///   unibuf commits after the closure returns;
    /// - **CPU:** `NativeEncoder::Cpu`, on the queue's worker thread in queue order (so the
    ///   closure is `'static`: it runs after this call returns).
    ///
    /// The returned fence is recorded on every buffer as a read or a write, so freeing, reuse,
    /// host access and residency wait for the foreign work as for unibuf's own.
    ///
    /// The closure must enqueue work only on the stream or command buffer it is given, touch
    /// only the buffers named (and memory of its own), and not call back into this device: on
    /// CUDA and Metal it runs under the queue's submission lock. An error it returns, or a
    /// panic, is [`Error::External`]; on CUDA and Metal this call returns it (on CUDA, work the
    /// closure enqueued before failing is finished first; on Metal the command buffer is dropped
    /// uncommitted, so none of it runs); on the CPU it becomes the queue's sticky
    /// [`Error::DeviceFault`], as a failing kernel does.
    ///
    /// ```
    /// use unibuf::{interop::NativeBuffer, DType, Device, StorageMode};
    /// let dev = Device::open("cpu")?;
    /// let q = dev.queue();
    /// let x = dev.from_slice("x", &[1.0f32, 2.0, 3.0], &[3])?;
    /// let y = dev.alloc(DType::F32, &[3], StorageMode::Shared)?;
    /// let (NativeBuffer::Host { ptr: src, .. }, NativeBuffer::Host { ptr: dst, .. }) =
    ///     (x.native()?, y.native()?) else { unreachable!() };
    /// let fence = q.external(&[&x], &[&y], move |_| {
    ///     // A "foreign library": doubles x into y through raw pointers.
    ///     // SAFETY: both buffers are alive until the fence completes and hold 3 f32s; the
    ///     // epochs order this after x's upload and before y's read.
    ///     unsafe {
    ///         let (s, d) = (src.as_ptr() as *const f32, dst.as_ptr() as *mut f32);
    ///         for i in 0..3 { *d.add(i) = 2.0 * *s.add(i); }
    ///     }
    ///     Ok(())
    /// })?;
    /// dev.wait(fence)?;
    /// assert_eq!(&*y.read::<f32>()?, &[2.0, 4.0, 6.0]);
    /// # Ok::<(), unibuf::Error>(())
    /// ```
    pub fn external(
        &self,
        reads: &[&Buffer],
        writes: &[&Buffer],
        f: impl FnOnce(NativeEncoder) -> std::result::Result<(), ExternalError> + Send + 'static,
    ) -> Result<Fence> {
        let uses = self.external_uses(reads, writes)?;
        let label = self.submission_label("external");
        self.device.submit(
            self.id(),
            label,
            "external work",
            &uses,
            &[crate::backend::Command::External(ExternalWork::new(f))],
            Completion::Queue,
        )
    }

    /// The uses of external work: every buffer of this device, no written range overlapping
    /// another buffer named.
    fn external_uses<'a>(
        &self,
        reads: &[&'a Buffer],
        writes: &[&'a Buffer],
    ) -> Result<Vec<Use<'a>>> {
        let mut uses = Vec::with_capacity(reads.len() + writes.len());
        for (list, access) in [(reads, Access::Read), (writes, Access::Write)] {
            for b in list {
                self.check_buffer("external work buffer", b)?;
                let r = b.byte_range();
                uses.push(Use {
                    alloc: &b.alloc,
                    start: r.start,
                    end: r.end,
                    access,
                });
            }
        }
        crate::queue::check_write_overlaps(&uses, "external work")?;
        Ok(uses)
    }
}
