//! Interop: memory, streams and work that unibuf does not own.
//!
//! Engines mix unibuf with PyTorch tensors, candle or cudarc buffers, MLX arrays, cuBLAS and MPS
//! calls and kernels of their own. The rule is the one unibuf follows inside: every use of a
//! buffer is a fence.
//! - **Native handles out** ([`NativeBuffer`] and its kin): [`Buffer::native`],
//!   [`Queue::native`], [`Device::native`]: device pointers, streams, contexts, `MTLBuffer`s.
//! - **External work** ([`Queue::external`]): foreign work enqueued on a unibuf queue's own
//!   stream or command buffer, after the waits its buffers need, with its fence recorded on
//!   them.
//! - **Foreign streams** ([`Queue::wait_foreign`], [`Device::order_native`]): event waits in
//!   both directions, never a device-wide sync.
//! - **Foreign memory in** ([`Device::wrap_foreign`]): zero-copy, never freed by unibuf, its
//!   owner released after the last view and the last fence.
//! - **DLPack** ([`dlpack`]): versioned and legacy managed tensors out of and into unibuf,
//!   with the array-API stream rules; each exchange a zero-byte record in the copy ledger.
//!
//! The proof that a real library works on unibuf buffers this way is
//! [`ops::matmul`](crate::ops::matmul): the `gemm` crate on the CPU and cuBLAS on CUDA, each
//! run through [`Queue::external`].
//!
//! [`Buffer::native`]: crate::Buffer::native
//! [`Queue::native`]: crate::Queue::native
//! [`Device::native`]: crate::Device::native
//! [`Queue::external`]: crate::Queue::external
//! [`Queue::wait_foreign`]: crate::Queue::wait_foreign
//! [`Device::order_native`]: crate::Device::order_native
//! [`Device::wrap_foreign`]: crate::Device::wrap_foreign

pub mod dlpack;
mod external;
mod foreign;
mod native;
mod signal;

pub use external::{ExternalError, ExternalWork};
pub use foreign::{ForeignAccess, ForeignMemory};
pub use native::{NativeBuffer, NativeDevice, NativeEncoder, NativeHandle, NativeQueue};
pub use signal::{ForeignSignal, HostSignal, NativeWaiter};
