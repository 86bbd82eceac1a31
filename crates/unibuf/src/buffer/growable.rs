//! Growable buffers: capacity reserved up front, memory added as the contents grow, the
//! address unchanged. What a KV cache wants: views taken before a grow stay valid, and no byte
//! is copied to make room.

use super::Buffer;
use crate::device::{Device, GrowableRegion};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::storage::StorageMode;
use std::sync::Arc;

enum Growth {
    /// Mapped in place: the address never changes.
    InPlace(Arc<GrowableRegion>),
    /// No virtual memory on this backend: growing allocates anew and copies.
    Reallocate { reallocations: usize },
}

/// A 1-D buffer that can grow up to a capacity set at creation.
///
/// ```
/// use unibuf::{DType, Device, StorageMode};
/// let dev = Device::open("cpu")?;
/// let mut kv = dev.alloc_growable("kv cache", DType::F16, 1024, 1 << 24, StorageMode::Private)?;
/// let first = kv.buffer().clone();
/// kv.grow(1 << 20)?;                         // more memory, same address
/// assert!(kv.address_stable());
/// assert_eq!(kv.buffer().device_address(), first.device_address());
/// assert_eq!(kv.len(), 1 << 20);
/// # Ok::<(), unibuf::Error>(())
/// ```
pub struct GrowableBuffer {
    device: Device,
    buffer: Buffer,
    capacity: usize,
    label: String,
    mode: StorageMode,
    growth: Growth,
}

impl GrowableBuffer {
    /// The current contents as a buffer of `len()` elements.
    pub fn buffer(&self) -> &Buffer {
        &self.buffer
    }
    /// Elements now.
    pub fn len(&self) -> usize {
        self.buffer.len()
    }
    /// Whether it holds no elements.
    pub fn is_empty(&self) -> bool {
        self.buffer.is_empty()
    }
    /// Elements it can grow to.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
    /// Whether growing keeps the address (the backend has virtual memory); otherwise it
    /// reallocates and copies, and earlier views keep the old memory.
    pub fn address_stable(&self) -> bool {
        matches!(self.growth, Growth::InPlace(_))
    }
    /// Times growing had to allocate anew and copy (0 where the address is stable).
    pub fn reallocations(&self) -> usize {
        match self.growth {
            Growth::InPlace(_) => 0,
            Growth::Reallocate { reallocations } => reallocations,
        }
    }

    /// Grows to `len` elements (at most the capacity); shrinking is refused. New elements are
    /// unspecified until written.
    #[track_caller]
    pub fn grow(&mut self, len: usize) -> Result<()> {
        let current = self.buffer.len();
        if len < current || len > self.capacity {
            return Err(Error::OutOfBounds {
                what: "grow: new length",
                start: current,
                end: len,
                len: self.capacity,
            });
        }
        let dtype = self.buffer.dtype();
        let bytes = len * dtype.size();
        match &mut self.growth {
            Growth::InPlace(region) => {
                self.device.inner.grow_region(region, bytes, &self.label)?;
                self.buffer = self.buffer.with_len(len);
            }
            Growth::Reallocate { reallocations } => {
                let bigger = self
                    .device
                    .alloc_labelled(&self.label, dtype, &[len], self.mode)?;
                if current > 0 {
                    self.device
                        .queue()
                        .copy(&self.buffer, &bigger.slice(0..current)?)?;
                }
                self.buffer = bigger;
                *reallocations += 1;
            }
        }
        Ok(())
    }
}

impl Device {
    /// A 1-D buffer of `len` elements that can grow to `capacity` elements. On backends with
    /// virtual memory (CUDA, the CPU) the capacity is reserved as address space and memory is
    /// mapped only as the buffer grows, so its address never changes; elsewhere growing
    /// reallocates and copies (`GrowableBuffer::address_stable` says which).
    pub fn alloc_growable(
        &self,
        label: &str,
        dtype: DType,
        len: usize,
        capacity: usize,
        mode: StorageMode,
    ) -> Result<GrowableBuffer> {
        if len > capacity {
            return Err(Error::OutOfBounds {
                what: "alloc_growable: initial length",
                start: 0,
                end: len,
                len: capacity,
            });
        }
        Buffer::checked_len(dtype, &[capacity])?;
        let mode = mode.resolve(self.info().unified_memory);
        if mode == StorageMode::External {
            return Err(Error::invalid(
                "mode",
                "growable buffers are Shared or Private, not External",
            ));
        }
        match self
            .inner
            .reserve_region(mode, capacity * dtype.size(), len * dtype.size(), label)?
        {
            Some((alloc, region)) => Ok(GrowableBuffer {
                device: self.clone(),
                buffer: Buffer::from_allocation(alloc, 0, dtype, &[len])?,
                capacity,
                label: label.to_owned(),
                mode,
                growth: Growth::InPlace(region),
            }),
            None => Ok(GrowableBuffer {
                device: self.clone(),
                buffer: self.alloc_labelled(label, dtype, &[len], mode)?,
                capacity,
                label: label.to_owned(),
                mode,
                growth: Growth::Reallocate { reallocations: 0 },
            }),
        }
    }
}
