//! Launch batches: a fixed sequence of kernel launches, checked once when recorded and
//! submitted as one submission, so that a decode step of many small kernels pays the host cost
//! of one. On CUDA the batch becomes a graph, instantiated on its first submission and launched
//! with one driver call afterwards; the CPU backend runs the launches in order; Metal encodes
//! them into one command buffer.

use super::Queue;
use crate::backend::{BatchedLaunch, Command, LaunchArg, LaunchDims};
use crate::buffer::Buffer;
use crate::device::{Completion, Device, DeviceInner, Use};
use crate::epoch::{Access, Fence};
use crate::error::{Error, Result};
use crate::kernel::{Kernel, KernelArg};
use parking_lot::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

static NEXT_BATCH_ID: AtomicU64 = AtomicU64::new(1);

/// Launches recorded for a batch, with every buffer argument (kept alive) and its access.
#[derive(Default)]
pub(crate) struct Recorded {
    launches: Vec<BatchedLaunch>,
    buffers: Vec<(Buffer, Access)>,
}

impl Recorded {
    /// Records a launch that `Queue::check_launch` accepted: `uses` has one entry per buffer
    /// argument, in order.
    pub fn add(
        &mut self,
        kernel: &Kernel,
        dims: LaunchDims,
        launch_args: Vec<LaunchArg>,
        args: &[KernelArg<'_>],
        uses: &[Use<'_>],
    ) {
        let buffers = args.iter().filter_map(|a| match a {
            KernelArg::Buffer(b) => Some(*b),
            KernelArg::Scalar(_) => None,
        });
        for (b, u) in buffers.zip(uses) {
            self.buffers.push((b.clone(), u.access));
        }
        self.launches.push(BatchedLaunch {
            pipeline: kernel.pipeline,
            dims,
            args: launch_args,
        });
    }
}

/// A fixed sequence of kernel launches on one device, replayed by [`Queue::launch_batch`].
///
/// Arguments are fixed when a launch is recorded (the buffers and scalar values; the batch keeps
/// its buffers alive), which is what lets a backend prepare the whole sequence once: on CUDA a
/// graph, launched with one driver call however many kernels it holds. The batch is one
/// submission: it waits for earlier work on the memory it uses, and later work waits for all
/// of it.
///
/// ```
/// use unibuf::{ops, DType, Device, LaunchBatch, StorageMode};
/// let dev = Device::open("cpu")?;
/// let x = dev.from_slice("x", &[1.0f32, -2.0, 3.0, 0.5], &[1, 4])?;
/// let w = dev.from_slice("w", &[1.0f32; 4], &[4])?;
/// let y = dev.alloc(DType::F32, &[1, 4], StorageMode::Shared)?;
/// let p = dev.alloc(DType::F32, &[1, 4], StorageMode::Shared)?;
/// let mut step = LaunchBatch::new(&dev, "decode step");
/// step.push_with(|q| ops::rms_norm_into(q, &x, &w, 1e-6, &y))?;
/// step.push_with(|q| ops::softmax_into(q, &y, &p))?;
/// let q = dev.queue();
/// for _ in 0..3 {
///     q.launch_batch(&step)?;
/// }
/// q.drain()?;
/// assert!((p.read::<f32>()?.iter().sum::<f32>() - 1.0).abs() < 1e-6);
/// assert_eq!(dev.submission_stats().get("decode step").unwrap().count, 3);
/// # Ok::<(), unibuf::Error>(())
/// ```
pub struct LaunchBatch {
    device: Arc<DeviceInner>,
    label: String,
    id: u64,
    recorded: Recorded,
    /// The launches as submitted, shared with the backend's commands; built by the first
    /// submission, dropped (with a new id) when a launch is added.
    frozen: OnceLock<Arc<[BatchedLaunch]>>,
}

impl LaunchBatch {
    /// An empty batch of `device`'s kernels; `label` names its submissions.
    pub fn new(device: &Device, label: &str) -> LaunchBatch {
        LaunchBatch {
            device: device.inner.clone(),
            label: label.to_owned(),
            id: NEXT_BATCH_ID.fetch_add(1, Ordering::Relaxed),
            recorded: Recorded::default(),
            frozen: OnceLock::new(),
        }
    }

    /// Appends a launch, checked like [`Queue::launch`] (argument count, dtypes, scalar types,
    /// writability, device, overlaps) before anything is recorded.
    pub fn push(
        &mut self,
        kernel: &Kernel,
        dims: LaunchDims,
        args: &[KernelArg<'_>],
    ) -> Result<()> {
        let q = Queue::default_of(&self.device);
        let (launch_args, uses) = q.check_launch(kernel, dims, args)?;
        self.recorded.add(kernel, dims, launch_args, args, &uses);
        self.invalidate();
        Ok(())
    }

    /// Appends the launches `record` makes on the queue it is given, which records launches
    /// into this batch instead of submitting them: this is how ops (such as
    /// [`ops::rms_norm_into`](crate::ops::rms_norm_into)) go into a batch. Only launches are
    /// recorded: a transfer made on that queue runs at once. If `record` fails, nothing it
    /// launched is kept.
    pub fn push_with(&mut self, record: impl FnOnce(&Queue) -> Result<Fence>) -> Result<()> {
        let recorder = Arc::new(Mutex::new(Recorded::default()));
        let q = Queue {
            recorder: Some(recorder.clone()),
            ..Queue::default_of(&self.device)
        };
        let outcome = record(&q);
        drop(q);
        outcome?;
        let mut new = std::mem::take(&mut *recorder.lock());
        self.recorded.launches.append(&mut new.launches);
        self.recorded.buffers.append(&mut new.buffers);
        self.invalidate();
        Ok(())
    }

    /// Launches in the batch.
    pub fn len(&self) -> usize {
        self.recorded.launches.len()
    }

    /// Whether the batch has no launch.
    pub fn is_empty(&self) -> bool {
        self.recorded.launches.is_empty()
    }

    /// The label its submissions carry.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// A changed sequence is a new batch for the backend: what it prepared for the old one is
    /// dropped, and the next submission prepares anew.
    fn invalidate(&mut self) {
        if self.frozen.take().is_some() {
            self.device.backend.forget_batch(self.id);
            self.id = NEXT_BATCH_ID.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Drop for LaunchBatch {
    fn drop(&mut self) {
        if self.frozen.get().is_some() {
            self.device.backend.forget_batch(self.id);
        }
    }
}

impl std::fmt::Debug for LaunchBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LaunchBatch")
            .field("label", &self.label)
            .field("launches", &self.len())
            .finish()
    }
}

impl Queue {
    /// Submits every launch of `batch`, in order, as one submission labelled with the queue
    /// handle's label, else the batch's; returns its fence.
    pub fn launch_batch(&self, batch: &LaunchBatch) -> Result<Fence> {
        if batch.device.id != self.device.id {
            return Err(Error::WrongDevice {
                what: "launch batch",
                expected: self.device.id,
                got: batch.device.id,
            });
        }
        if batch.is_empty() {
            return Err(Error::invalid(
                "launch batch",
                format!("'{}' has no launch", batch.label),
            ));
        }
        if self.recorder.is_some() {
            return Err(Error::invalid(
                "launch batch",
                "a batch cannot be recorded into another batch",
            ));
        }
        let launches = batch
            .frozen
            .get_or_init(|| Arc::from(batch.recorded.launches.clone()))
            .clone();
        let uses: Vec<Use<'_>> = batch
            .recorded
            .buffers
            .iter()
            .map(|(b, access)| {
                let r = b.byte_range();
                Use {
                    alloc: &b.alloc,
                    start: r.start,
                    end: r.end,
                    access: *access,
                }
            })
            .collect();
        self.device.submit(
            self.id(),
            self.submission_label(&batch.label),
            "launch batch",
            &uses,
            &[Command::Batch {
                id: batch.id,
                launches,
            }],
            Completion::Queue,
        )
    }
}
