//! Queues: in-order streams of submissions, each with its own completion epochs.

mod batch;
mod stats;

pub use batch::LaunchBatch;
pub(crate) use stats::StatsCollector;
pub use stats::{LabelStats, SubmissionStats};

use crate::backend::{Command, LaunchArg, LaunchDims};
use crate::buffer::Buffer;
use crate::device::{Completion, DeviceInner, Use};
use crate::epoch::{Access, Fence, QueueId};
use crate::error::{Error, Result};
use crate::kernel::{Kernel, KernelArg, ParamKind};
use std::sync::Arc;

/// A queue of one device. Cheap to clone. Work on one queue runs in submission order; work on
/// different queues runs concurrently, ordered only where it shares memory.
///
/// A queue handle may carry a label ([`Queue::labelled`]) that names its submissions in stats,
/// faults, the ledger and traces.
#[derive(Clone)]
pub struct Queue {
    pub(crate) device: Arc<DeviceInner>,
    id: QueueId,
    label: Option<Arc<str>>,
    /// Set on the queue [`LaunchBatch::push_with`] hands to its closure: launches are recorded
    /// into the batch instead of submitted.
    recorder: Option<Arc<parking_lot::Mutex<batch::Recorded>>>,
}

impl Queue {
    pub(crate) fn new(device: &Arc<DeviceInner>, id: QueueId) -> Queue {
        Queue {
            device: device.clone(),
            id,
            label: None,
            recorder: None,
        }
    }

    pub(crate) fn default_of(device: &Arc<DeviceInner>) -> Queue {
        Queue::new(device, device.default_queue)
    }

    /// The queue's id on its device.
    pub fn id(&self) -> QueueId {
        self.id
    }

    /// The same queue, naming the submissions made through this handle `label`.
    ///
    /// ```
    /// let dev = unibuf::Device::open("cpu")?;
    /// let q = dev.queue().labelled("load weights");
    /// assert_eq!(q.label(), Some("load weights"));
    /// # Ok::<(), unibuf::Error>(())
    /// ```
    pub fn labelled(&self, label: &str) -> Queue {
        Queue {
            label: Some(label.into()),
            ..self.clone()
        }
    }

    /// A fence of this queue that is complete from the start (for work done on the host).
    pub(crate) fn done_fence(&self) -> Fence {
        Fence::done(self.device.id, self.id)
    }

    /// The device this queue belongs to.
    pub fn device(&self) -> crate::Device {
        crate::Device {
            inner: self.device.clone(),
        }
    }

    /// The handle's label, if it has one.
    pub fn label(&self) -> Option<&str> {
        self.label.as_deref()
    }

    /// The label for a submission: the handle's, else `fallback`.
    pub(crate) fn submission_label<'a>(&'a self, fallback: &'a str) -> &'a str {
        self.label.as_deref().unwrap_or(fallback)
    }

    /// Waits for a fence (of any queue of this device).
    pub fn wait(&self, fence: Fence) -> Result<()> {
        self.device.wait(fence)
    }

    /// Waits for everything submitted on this queue so far.
    pub fn drain(&self) -> Result<()> {
        self.device.wait(Fence {
            device: self.device.id,
            queue: self.id,
            epoch: self.device.last_submitted(self.id),
        })
    }

    /// The fence of the last submission on this queue (complete from the start if none).
    pub fn last_fence(&self) -> Fence {
        Fence {
            device: self.device.id,
            queue: self.id,
            epoch: self.device.last_submitted(self.id),
        }
    }

    pub(crate) fn check_buffer(&self, what: &'static str, b: &Buffer) -> Result<()> {
        if b.alloc.device.id != self.device.id {
            return Err(Error::WrongDevice {
                what,
                expected: self.device.id,
                got: b.alloc.device.id,
            });
        }
        Ok(())
    }

    /// The checks of [`Queue::launch`]: the backend's arguments and the uses to record.
    pub(crate) fn check_launch<'a>(
        &self,
        kernel: &Kernel,
        dims: LaunchDims,
        args: &[KernelArg<'a>],
    ) -> Result<(Vec<LaunchArg>, Vec<Use<'a>>)> {
        if kernel.device_id != self.device.id {
            return Err(Error::WrongDevice {
                what: "kernel",
                expected: self.device.id,
                got: kernel.device_id,
            });
        }
        let params = kernel.params();
        if args.len() != params.len() {
            return Err(Error::ShapeMismatch {
                what: "kernel arguments",
                expected: format!("{} for '{}'", params.len(), kernel.name()),
                got: args.len().to_string(),
            });
        }
        // The limits every GPU backend shares (CUDA's; Metal allows no more threads per
        // threadgroup), checked here so that a bad geometry is an argument error at the call,
        // not a driver failure after earlier commands were encoded.
        let threads = dims.block.iter().map(|&b| u64::from(b)).product::<u64>();
        if threads > 1024 || dims.block[2] > 64 {
            return Err(Error::invalid(
                "launch dims",
                format!(
                    "block {:?} is {threads} threads: at most 1024 per block, and 64 in z",
                    dims.block
                ),
            ));
        }
        if dims.grid[0] > i32::MAX as u32 || dims.grid[1] > 65_535 || dims.grid[2] > 65_535 {
            return Err(Error::invalid(
                "launch dims",
                format!(
                    "grid {:?}: at most 2^31 - 1 blocks in x and 65535 in y and z",
                    dims.grid
                ),
            ));
        }
        if dims.grid.contains(&0) || dims.block.contains(&0) {
            return Err(Error::invalid(
                "launch dims",
                format!(
                    "grid {:?} x block {:?} has a zero dimension",
                    dims.grid, dims.block
                ),
            ));
        }
        let mut launch_args = Vec::with_capacity(args.len());
        let mut uses: Vec<Use<'_>> = Vec::new();
        for (i, (param, arg)) in params.iter().zip(args).enumerate() {
            match (param.kind, arg) {
                (ParamKind::Buffer { dtype, access }, KernelArg::Buffer(b)) => {
                    self.check_buffer("kernel argument", b)?;
                    if b.dtype() != dtype {
                        return Err(Error::DTypeMismatch {
                            what: "kernel argument",
                            expected: dtype,
                            got: b.dtype(),
                        });
                    }
                    let r = b.byte_range();
                    launch_args.push(LaunchArg::Buffer {
                        range: b.alloc.range(r.start, r.end - r.start),
                        dtype,
                        writable: access == Access::Write,
                    });
                    uses.push(Use {
                        alloc: &b.alloc,
                        start: r.start,
                        end: r.end,
                        access,
                    });
                }
                (ParamKind::Scalar(ty), KernelArg::Scalar(s)) if s.scalar_type() == ty => {
                    launch_args.push(LaunchArg::Scalar(*s));
                }
                (kind, _) => {
                    return Err(Error::invalid(
                        "kernel argument",
                        format!(
                            "argument {i} ('{}') of '{}' must be {kind:?}, got {arg:?}",
                            param.name,
                            kernel.name()
                        ),
                    ));
                }
            }
        }
        check_write_overlaps(&uses, kernel.name())?;
        Ok((launch_args, uses))
    }

    /// Launches a kernel. Every argument is checked against the kernel's parameters (count,
    /// dtype, scalar type, writability, device) and writable buffers must not overlap other
    /// arguments, before anything is recorded. Returns the submission's fence.
    pub fn launch(
        &self,
        kernel: &Kernel,
        dims: LaunchDims,
        args: &[KernelArg<'_>],
    ) -> Result<Fence> {
        let (launch_args, uses) = self.check_launch(kernel, dims, args)?;
        if let Some(recorder) = &self.recorder {
            recorder.lock().add(kernel, dims, launch_args, args, &uses);
            return Ok(self.done_fence());
        }
        let label = self.submission_label(kernel.name());
        self.device.submit(
            self.id,
            label,
            "launch",
            &uses,
            &[Command::Launch {
                pipeline: kernel.pipeline,
                dims,
                args: launch_args,
            }],
            Completion::Queue,
        )
    }
}

/// Refuses uses where a written range overlaps another use of the same allocation: one
/// submission's arguments must not alias where one of them is written. `what` names the work.
pub(crate) fn check_write_overlaps(uses: &[Use<'_>], what: &str) -> Result<()> {
    for (i, a) in uses.iter().enumerate() {
        for b in &uses[i + 1..] {
            let overlap = a.alloc.same(b.alloc) && a.start < b.end && b.start < a.end;
            if overlap && (a.access == Access::Write || b.access == Access::Write) {
                return Err(Error::invalid(
                    "kernel arguments",
                    format!(
                        "a written buffer overlaps another argument of '{what}' (bytes {}..{} and {}..{} of '{}')",
                        a.start, a.end, b.start, b.end, a.alloc.label
                    ),
                ));
            }
        }
    }
    Ok(())
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("id", &self.id)
            .field("label", &self.label)
            .finish()
    }
}
