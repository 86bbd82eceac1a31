//! Buffers: typed, shaped, zero-copy views over an allocation.
//!
//! A [`Buffer`] is a contiguous view: an allocation, a byte offset into it, a dtype and a shape.
//! Cloning one, slicing it, reshaping it or casting it never copies bytes; every view keeps the
//! allocation (and, for External storage, the caller's memory) alive.

mod external;
mod growable;
mod host;
mod page_buffer;

pub use external::HostMemory;
pub use growable::GrowableBuffer;
pub use host::{HostRead, HostWrite};
pub use page_buffer::PageBuffer;

use crate::allocation::Allocation;
use crate::dtype::DType;
use crate::error::{check_range, Error, Result};
use crate::storage::StorageMode;
use std::fmt;
use std::ops::Range;
use std::sync::Arc;

/// A typed, shaped view of device memory. Cheap to clone; clones share the memory.
///
/// ```
/// use unibuf::{DType, Device, StorageMode};
/// let dev = Device::open("cpu")?;
/// let x = dev.alloc(DType::F32, &[4, 8], StorageMode::Shared)?;
/// let row = x.rows(1..2)?;            // a view of row 1, no copy
/// assert_eq!(row.shape(), &[1, 8]);
/// assert_eq!(row.byte_offset(), 32);
/// let bytes = x.cast(DType::U8)?;     // the same bytes as u8
/// assert_eq!(bytes.shape(), &[4, 32]);
/// # Ok::<(), unibuf::Error>(())
/// ```
#[derive(Clone)]
pub struct Buffer {
    pub(crate) alloc: Arc<Allocation>,
    dtype: DType,
    shape: Vec<usize>,
    /// Offset of the first element within the allocation, in bytes.
    offset: usize,
    /// Elements in the view (the product of the shape).
    len: usize,
}

fn element_count(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |n, d| n.checked_mul(*d))
}

impl Buffer {
    pub(crate) fn from_allocation(
        alloc: Allocation,
        offset: usize,
        dtype: DType,
        shape: &[usize],
    ) -> Result<Buffer> {
        let len = Buffer::checked_len(dtype, shape)?;
        Ok(Buffer {
            alloc: Arc::new(alloc),
            dtype,
            shape: shape.to_vec(),
            offset,
            len,
        })
    }

    /// Elements of `shape`, checking that its byte size fits in `usize`.
    pub(crate) fn checked_len(dtype: DType, shape: &[usize]) -> Result<usize> {
        element_count(shape)
            .filter(|n| n.checked_mul(dtype.size()).is_some())
            .ok_or_else(|| {
                Error::invalid(
                    "shape",
                    format!("{shape:?} of {dtype} overflows the address space"),
                )
            })
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// The shape (row-major, contiguous).
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    /// Elements in the view.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether the view has no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Bytes in the view.
    pub fn byte_len(&self) -> usize {
        self.len * self.dtype.size()
    }
    /// Offset of the view within its allocation, in bytes.
    pub fn byte_offset(&self) -> usize {
        self.offset
    }
    /// The storage mode (never `Auto`: that resolves at allocation).
    pub fn mode(&self) -> StorageMode {
        self.alloc.mode
    }
    /// The label given at allocation.
    pub fn label(&self) -> &str {
        &self.alloc.label
    }
    /// Whether the host can read this buffer directly: Shared and External buffers, and
    /// Foreign buffers over host memory.
    pub fn is_host_accessible(&self) -> bool {
        self.alloc.host_accessible()
    }
    /// Whether the memory can be written (false for External buffers over read-only memory).
    pub fn is_writable(&self) -> bool {
        self.alloc.writable
    }
    /// Whether two views share one allocation.
    pub fn shares_memory_with(&self, other: &Buffer) -> bool {
        self.alloc.same(&other.alloc)
    }
    /// The byte range of the view within its allocation.
    pub(crate) fn byte_range(&self) -> Range<usize> {
        self.offset..self.offset + self.byte_len()
    }
    /// The device address of the first element (for passing to foreign kernels).
    pub fn device_address(&self) -> u64 {
        self.alloc.raw().addr + self.offset as u64
    }

    fn view(&self, offset: usize, dtype: DType, shape: Vec<usize>, len: usize) -> Buffer {
        Buffer {
            alloc: self.alloc.clone(),
            dtype,
            shape,
            offset,
            len,
        }
    }

    /// The same allocation as a 1-D view of `len` elements from its start (a growable buffer
    /// after growing; the caller checked the memory is there).
    pub(crate) fn with_len(&self, len: usize) -> Buffer {
        self.view(self.offset, self.dtype, vec![len], len)
    }

    /// A 1-D view of the elements `range` of the flattened buffer.
    pub fn slice(&self, range: Range<usize>) -> Result<Buffer> {
        if range.start > range.end {
            return Err(Error::OutOfBounds {
                what: "slice",
                start: range.start,
                end: range.end,
                len: self.len,
            });
        }
        let n = range.end - range.start;
        check_range("slice", range.start, n, self.len)?;
        Ok(self.view(
            self.offset + range.start * self.dtype.size(),
            self.dtype,
            vec![n],
            n,
        ))
    }

    /// A view of the rows `range` along the first dimension, keeping the other dimensions.
    pub fn rows(&self, range: Range<usize>) -> Result<Buffer> {
        let Some((&rows, inner)) = self.shape.split_first() else {
            return Err(Error::invalid("rows", "a 0-dimensional buffer has no rows"));
        };
        if range.start > range.end {
            return Err(Error::OutOfBounds {
                what: "rows",
                start: range.start,
                end: range.end,
                len: rows,
            });
        }
        check_range("rows", range.start, range.end - range.start, rows)?;
        let row_len = element_count(inner).unwrap_or(0);
        let mut shape = self.shape.clone();
        shape[0] = range.end - range.start;
        Ok(self.view(
            self.offset + range.start * row_len * self.dtype.size(),
            self.dtype,
            shape,
            (range.end - range.start) * row_len,
        ))
    }

    /// The same elements with another shape of the same element count.
    pub fn reshape(&self, shape: &[usize]) -> Result<Buffer> {
        let n = Buffer::checked_len(self.dtype, shape)?;
        if n != self.len {
            return Err(Error::ShapeMismatch {
                what: "reshape",
                expected: format!("{} elements (shape {:?})", self.len, self.shape),
                got: format!("{n} elements (shape {shape:?})"),
            });
        }
        Ok(self.view(self.offset, self.dtype, shape.to_vec(), n))
    }

    /// The same bytes as another dtype. The last dimension is rescaled by the size ratio and
    /// must come out whole; the view's offset must be aligned for the new dtype.
    pub fn cast(&self, dtype: DType) -> Result<Buffer> {
        let (from, to) = (self.dtype.size(), dtype.size());
        if !self.offset.is_multiple_of(to) {
            return Err(Error::Misaligned {
                what: "cast: view offset for the new dtype",
                value: self.offset,
                align: to,
            });
        }
        let mut shape = self.shape.clone();
        if shape.is_empty() {
            shape.push(1);
        }
        let last = shape.last_mut().expect("non-empty");
        let Some(bytes) = last.checked_mul(from) else {
            return Err(Error::invalid(
                "cast",
                format!(
                    "the last dimension {} of {} overflows in bytes",
                    *last, self.dtype
                ),
            ));
        };
        if bytes % to != 0 {
            return Err(Error::ShapeMismatch {
                what: "cast: last dimension in bytes",
                expected: format!("a multiple of {to} ({dtype})"),
                got: format!("{bytes} ({} x {})", *last, self.dtype),
            });
        }
        *last = bytes / to;
        let len = self.byte_len() / to;
        Ok(self.view(self.offset, dtype, shape, len))
    }

    pub(crate) fn check_dtype(&self, what: &'static str, dtype: DType) -> Result<()> {
        if self.dtype != dtype {
            return Err(Error::DTypeMismatch {
                what,
                expected: self.dtype,
                got: dtype,
            });
        }
        Ok(())
    }
}

impl fmt::Debug for Buffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Buffer")
            .field("label", &self.alloc.label)
            .field("dtype", &self.dtype)
            .field("shape", &self.shape)
            .field("mode", &self.alloc.mode)
            .field("byte_offset", &self.offset)
            .finish()
    }
}
