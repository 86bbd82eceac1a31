//! Host access guards: typed slices over Shared and External buffers.
//!
//! Taking a guard waits for the device work it depends on (a read waits for writes; a write for
//! reads too) and registers the byte range as borrowed, so that device work submitted while the
//! guard lives cannot write under a reader or touch the bytes of a writer: such a submission is
//! refused with `HostAccessConflict`.

use super::Buffer;
use crate::dtype::Element;
use crate::epoch::Access;
use crate::error::{Error, Result};
use std::ops::{Deref, DerefMut};

/// A read guard: derefs to `&[T]`.
pub struct HostRead<'a, T> {
    buffer: &'a Buffer,
    borrow: u64,
    data: &'a [T],
}

/// A write guard: derefs to `&mut [T]`.
pub struct HostWrite<'a, T> {
    buffer: &'a Buffer,
    borrow: u64,
    data: &'a mut [T],
}

impl Buffer {
    fn host_slice<T: Element>(&self, access: Access, what: &'static str) -> Result<(u64, *mut T)> {
        self.check_dtype(what, T::DTYPE)?;
        let range = self.byte_range();
        let borrow =
            self.alloc
                .device
                .host_borrow(&self.alloc, range.start, range.end, access, what)?;
        let ptr = self
            .alloc
            .host_addr(self.offset)
            .expect("host_borrow checked host access");
        if !(ptr as usize).is_multiple_of(std::mem::align_of::<T>()) {
            self.alloc.uses().remove_borrow(borrow);
            return Err(Error::Misaligned {
                what,
                value: ptr as usize,
                align: std::mem::align_of::<T>(),
            });
        }
        Ok((borrow, ptr.cast()))
    }

    /// Reads the view on the host, after the device writes it depends on complete.
    ///
    /// Errors: `NotHostAccessible` for Private buffers, `DTypeMismatch` if `T` is not the
    /// buffer's dtype, `HostAccessConflict` while a write guard overlaps.
    ///
    /// ```
    /// use unibuf::{DType, Device, StorageMode};
    /// let dev = Device::open("cpu")?;
    /// let b = dev.alloc(DType::U32, &[3], StorageMode::Shared)?;
    /// dev.queue().upload(&b, &[1u32, 2, 3])?;
    /// assert_eq!(&*b.read::<u32>()?, &[1, 2, 3]);
    /// # Ok::<(), unibuf::Error>(())
    /// ```
    pub fn read<T: Element>(&self) -> Result<HostRead<'_, T>> {
        let (borrow, ptr) = self.host_slice::<T>(Access::Read, "host read")?;
        let data = if self.len == 0 {
            &[][..]
        } else {
            // SAFETY: the view lies inside the allocation, which `self` keeps alive for 'a; the
            // pointer is aligned for T (checked) and T is Pod; device writes to it completed
            // (host_borrow waited) and new ones are refused while the borrow is registered.
            unsafe { std::slice::from_raw_parts(ptr, self.len) }
        };
        Ok(HostRead {
            buffer: self,
            borrow,
            data,
        })
    }

    /// Writes the view on the host, after device reads and writes of it complete.
    ///
    /// Errors as for [`Buffer::read`], plus `ReadOnly` for read-only External memory and
    /// `HostAccessConflict` while any other guard overlaps.
    pub fn write<T: Element>(&self) -> Result<HostWrite<'_, T>> {
        let (borrow, ptr) = self.host_slice::<T>(Access::Write, "host write")?;
        let data = if self.len == 0 {
            &mut [][..]
        } else {
            // SAFETY: as in `read`; in addition the write borrow excludes every other host
            // borrow of these bytes and all device access to them, so this `&mut` is unique.
            unsafe { std::slice::from_raw_parts_mut(ptr, self.len) }
        };
        Ok(HostWrite {
            buffer: self,
            borrow,
            data,
        })
    }

    /// Copies the view to a `Vec` on the host: a host read for host-accessible buffers,
    /// a staged download otherwise. Recorded in the ledger either way.
    #[track_caller]
    pub fn to_vec<T: Element>(&self) -> Result<Vec<T>> {
        let q = crate::Queue::default_of(&self.alloc.device);
        q.download(self)
    }
}

impl<T> Deref for HostRead<'_, T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        self.data
    }
}

impl<T> Drop for HostRead<'_, T> {
    fn drop(&mut self) {
        self.buffer.alloc.uses().remove_borrow(self.borrow);
    }
}

impl<T> Deref for HostWrite<'_, T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        self.data
    }
}

impl<T> DerefMut for HostWrite<'_, T> {
    fn deref_mut(&mut self) -> &mut [T] {
        self.data
    }
}

impl<T> Drop for HostWrite<'_, T> {
    fn drop(&mut self) {
        self.buffer.alloc.uses().remove_borrow(self.borrow);
    }
}
