//! Page-aligned host memory, the natural owner of External buffers.

use super::external::HostMemory;
use crate::error::{Error, Result};
use std::alloc::Layout;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// Zeroed host memory that starts on a page boundary and spans whole pages, so that wrapping it
/// as External storage shares no page with other memory. CUDA registers whole pages and cannot
/// register a page twice; memory from `Vec` can share its first and last pages with other
/// allocations.
///
/// ```
/// use unibuf::{DType, Device, PageBuffer};
/// let dev = Device::open("cpu")?;
/// let mut mem = PageBuffer::new(4 * 1000)?;
/// mem[..4].copy_from_slice(&7u32.to_ne_bytes());
/// let b = dev.wrap_external("staging", mem, DType::U32, &[1000])?;
/// assert_eq!(b.read::<u32>()?[0], 7);
/// # Ok::<(), unibuf::Error>(())
/// ```
pub struct PageBuffer {
    ptr: NonNull<u8>,
    len: usize,
    layout: Layout,
}

// SAFETY: PageBuffer owns its memory exclusively, like Box<[u8]>.
unsafe impl Send for PageBuffer {}
// SAFETY: shared access is read-only through `Deref`, like Box<[u8]>.
unsafe impl Sync for PageBuffer {}

impl PageBuffer {
    /// `len` zeroed bytes, page-aligned; the allocation is rounded up to whole pages.
    pub fn new(len: usize) -> Result<PageBuffer> {
        PageBuffer::aligned(len, crate::backend::cpu::host_page_size())
    }

    /// `len` zeroed bytes starting on a multiple of `align` (a power of two; the page size or
    /// more, e.g. 2 MiB for huge pages); the allocation is rounded up to a multiple of `align`.
    pub fn aligned(len: usize, align: usize) -> Result<PageBuffer> {
        let page = crate::backend::cpu::host_page_size();
        if !align.is_power_of_two() || align < page {
            return Err(Error::invalid(
                "PageBuffer alignment",
                format!("{align} is not a power of two of at least the page size ({page})"),
            ));
        }
        let size = len
            .max(1)
            .checked_next_multiple_of(align)
            .ok_or(Error::NeverFits {
                requested: len,
                limit: isize::MAX as usize,
                limit_name: "host address space",
            })?;
        let layout = Layout::from_size_align(size, align).map_err(|_| Error::NeverFits {
            requested: len,
            limit: isize::MAX as usize,
            limit_name: "host address space",
        })?;
        // SAFETY: the layout has a non-zero size.
        let ptr = NonNull::new(unsafe { std::alloc::alloc_zeroed(layout) }).ok_or(
            Error::OutOfMemory {
                requested: size,
                reserved: 0,
                free: 0,
                largest_free: 0,
            },
        )?;
        Ok(PageBuffer { ptr, len, layout })
    }

    /// A page-aligned copy of `bytes`.
    pub fn from_slice(bytes: &[u8]) -> Result<PageBuffer> {
        let mut b = PageBuffer::new(bytes.len())?;
        b.copy_from_slice(bytes);
        Ok(b)
    }
}

impl Deref for PageBuffer {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` holds `layout.size() >= len` initialised (zeroed) bytes owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for PageBuffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for PageBuffer {
    fn drop(&mut self) {
        // SAFETY: allocated in `aligned` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) };
    }
}

// SAFETY: the memory is owned, does not move with the value, and is written only through
// `&mut self` (which a buffer owning it never hands out).
unsafe impl HostMemory for PageBuffer {
    fn as_bytes_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }
    fn byte_len(&self) -> usize {
        self.len
    }
    fn writable(&self) -> bool {
        true
    }
}

impl std::fmt::Debug for PageBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageBuffer")
            .field("len", &self.len)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_memory_starts_on_the_alignment_and_bad_alignments_are_refused() {
        let b = PageBuffer::aligned(10, 2 << 20).unwrap();
        assert_eq!(b.as_bytes_ptr() as usize % (2 << 20), 0);
        assert_eq!((b.len(), b.iter().all(|&v| v == 0)), (10, true));
        for align in [3, 64, 3 << 20] {
            assert!(matches!(
                PageBuffer::aligned(10, align),
                Err(Error::InvalidArgument { .. })
            ));
        }
    }
}
