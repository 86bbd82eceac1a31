//! # unibuf
//!
//! The GPU memory and dispatch runtime for ML inference engines: typed buffers and zero-copy
//! views over Shared, Private and External storage; transfers that stage only where the
//! hardware needs it; a caching allocator; queues whose completion epochs make asynchronous
//! reuse and host access safe; a kernel registry with per-label submission stats and launch
//! batches (CUDA graphs); fused inference ops ([`ops`]); safetensors weights and a streaming
//! expert cache ([`weights`]); and a copy ledger that accounts for every byte moved. One API
//! over every backend: CUDA, the CPU and Metal (Apple targets, feature
//! `metal`; type-checked in CI, not yet run on a Mac) in this release.
//!
//! ```
//! use unibuf::{DType, Device, FillPattern, StorageMode};
//!
//! let dev = Device::open("cpu")?;                 // or Device::new(): UNIBUF_BACKEND / best
//! let q = dev.queue();
//! let x = dev.alloc_labelled("x", DType::F32, &[2, 4], StorageMode::Private)?;
//! q.upload(&x, &[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0])?;
//! let y = dev.alloc_labelled("y", DType::F32, &[2, 4], StorageMode::Shared)?;
//! q.fill(&y.rows(0..1)?, FillPattern::of(0.0f32))?;
//! q.copy(&x.rows(1..2)?, &y.rows(1..2)?)?;       // device copy between views
//! assert_eq!(&*y.read::<f32>()?, &[0.0, 0.0, 0.0, 0.0, 5.0, 6.0, 7.0, 8.0]);
//! println!("{}", dev.copy_report());               // the copy audit
//! # Ok::<(), unibuf::Error>(())
//! ```
//!
//! See the crate README and `docs/` for the architecture.

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]
// docs.rs (nightly rustdoc with `--cfg docsrs`) marks items that need a feature or a target.
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod alloc;
mod allocation;
pub mod backend;
mod buffer;
mod device;
mod dtype;
pub mod epoch;
mod error;
pub mod interop;
mod kernel;
pub mod ledger;
pub mod ops;
mod queue;
mod residency;
mod storage;
mod transfer;
pub mod weights;

pub use alloc::{Budget, MemoryStats};
pub use backend::cpu::{CpuKernelArgs, CpuKernelFn};
pub use backend::{BackendOptions, DeviceInfo, FillPattern, KernelCacheStats, LaunchDims};
pub use buffer::{Buffer, GrowableBuffer, HostMemory, HostRead, HostWrite, PageBuffer};
pub use device::{backends, BackendStatus, Device, DeviceBuilder, BACKEND_ENV};
pub use dtype::{DType, Element};
pub use epoch::{Access, Fence, QueueId};
pub use error::{Error, FaultKind, Result};
pub use kernel::{
    Constants, Kernel, KernelArg, KernelSource, Param, ParamKind, ScalarArg, ScalarType,
};
pub use ledger::{CopyRecord, Direction, LedgerReport};
pub use queue::{LabelStats, LaunchBatch, Queue, SubmissionStats};
pub use residency::ResidencyStats;
pub use storage::{MemoryAccess, MemoryKind, StorageMode};
pub use transfer::PendingDownload;

// The README's example compiles and runs as a doc test.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
struct ReadmeDoctests;

/// Re-exported so that callers can name f16 and bf16 elements without a direct dependency.
pub use half;
