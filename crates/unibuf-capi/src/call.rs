//! The boundary: the one helper every entry point goes through, and the checks of raw pointers
//! and sizes coming from C.
//!
//! `call` runs an entry point's body under `catch_unwind`, so that nothing unwinds into C: a
//! panic becomes `UB_STATUS_PANIC` with its message. It also records the last error (or clears
//! it on success).
//!
//! The pointer checks turn every malformed argument into a typed error instead of undefined
//! behaviour where that can be detected: NULL, misalignment for the pointee type, lengths that
//! overflow the address space, strings that are not UTF-8. What cannot be detected (a pointer
//! to freed memory, a length longer than the allocation) is the caller's contract, stated in
//! each function's `# Safety` section.

use crate::error::{clear_last, set_last, ub_status, CResult, Failure};
use std::ffi::{c_char, c_void, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Runs the body of the entry point `function`: its status, with the last error set on
/// failure and cleared on success; a panic is caught and reported as `UB_STATUS_PANIC`.
pub(crate) fn call(function: &'static str, body: impl FnOnce() -> CResult<()>) -> ub_status {
    // AssertUnwindSafe: after a panic the body's state is dropped, never observed again; the
    // objects it touched (handles in the registries) stay consistent because the registries
    // are only updated by single assignments under their lock.
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => {
            clear_last();
            ub_status::UB_STATUS_OK
        }
        Ok(Err(failure)) => set_last(function, failure),
        Err(payload) => {
            let text = payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "(a panic without a message)".to_owned());
            // Dropping the payload runs foreign code only for exotic payloads; keep even that
            // from unwinding.
            let _ = catch_unwind(AssertUnwindSafe(move || drop(payload)));
            set_last(
                function,
                Failure::new(
                    ub_status::UB_STATUS_PANIC,
                    format!("the library panicked (a bug in unibuf; please report it): {text}"),
                ),
            )
        }
    }
}

/// A checked out-pointer: non-NULL and aligned for `T`. Checked before the call does any work,
/// so that a bad out-pointer never leaves a created object behind.
pub(crate) struct Out<T> {
    ptr: *mut T,
}

impl<T> Out<T> {
    /// Checks `ptr`, the argument `what`.
    pub fn new(what: &'static str, ptr: *mut T) -> CResult<Out<T>> {
        if ptr.is_null() {
            return Err(Failure::null(what));
        }
        if !ptr.is_aligned() {
            return Err(unibuf::Error::Misaligned {
                what,
                value: ptr.addr(),
                align: std::mem::align_of::<T>(),
            }
            .into());
        }
        Ok(Out { ptr })
    }

    /// Checks `ptr` unless it is NULL (an optional output).
    pub fn optional(what: &'static str, ptr: *mut T) -> CResult<Option<Out<T>>> {
        if ptr.is_null() {
            Ok(None)
        } else {
            Out::new(what, ptr).map(Some)
        }
    }

    /// Writes the result.
    ///
    /// # Safety
    /// The pointer is valid for a write of `T` (the entry point's contract with its caller).
    pub unsafe fn write(self, value: T) {
        // SAFETY: non-NULL and aligned (checked in `new`); valid for writes by the caller's
        // contract. `write` does not drop the old contents, which may be uninitialised.
        unsafe { self.ptr.write(value) }
    }
}

impl<H> Out<*mut H> {
    /// Checks a handle out-pointer and sets it to NULL at once, so that the caller finds NULL
    /// there whenever the call fails later.
    ///
    /// # Safety
    /// As [`Out::write`].
    pub unsafe fn handle(what: &'static str, ptr: *mut *mut H) -> CResult<Out<*mut H>> {
        let out = Out::new(what, ptr)?;
        // SAFETY: checked non-NULL and aligned; valid for writes by the caller's contract.
        unsafe { out.ptr.write(std::ptr::null_mut()) };
        Ok(out)
    }
}

/// Checks a `(pointer, length)` pair of bytes; NULL is allowed only with length 0.
fn check_span(what: &'static str, addr: usize, is_null: bool, len: usize) -> CResult<()> {
    if len == 0 {
        return Ok(());
    }
    if is_null {
        return Err(Failure::null(what));
    }
    if len > isize::MAX as usize || addr.checked_add(len).is_none() {
        return Err(Failure::invalid(
            what,
            format!("{len} bytes from address {addr:#x} overflow the address space"),
        ));
    }
    Ok(())
}

/// The bytes `ptr[0..len]`, read-only.
///
/// # Safety
/// Unless `len` is 0, `ptr` points to `len` readable bytes that nothing writes while the
/// returned slice lives.
pub(crate) unsafe fn bytes_in<'a>(
    what: &'static str,
    ptr: *const c_void,
    len: usize,
) -> CResult<&'a [u8]> {
    check_span(what, ptr.addr(), ptr.is_null(), len)?;
    if len == 0 {
        return Ok(&[]);
    }
    // SAFETY: non-NULL, the span does not overflow (checked), and the caller guarantees `len`
    // readable bytes not written meanwhile; u8 has no alignment or validity requirement.
    Ok(unsafe { std::slice::from_raw_parts(ptr.cast::<u8>(), len) })
}

/// The bytes `ptr[0..len]`, writable.
///
/// # Safety
/// Unless `len` is 0, `ptr` points to `len` writable bytes that nothing else reads or writes
/// while the returned slice lives.
pub(crate) unsafe fn bytes_out<'a>(
    what: &'static str,
    ptr: *mut c_void,
    len: usize,
) -> CResult<&'a mut [u8]> {
    check_span(what, ptr.addr(), ptr.is_null(), len)?;
    if len == 0 {
        return Ok(&mut []);
    }
    // SAFETY: as in `bytes_in`; the caller guarantees exclusive access for the slice's life.
    Ok(unsafe { std::slice::from_raw_parts_mut(ptr.cast::<u8>(), len) })
}

/// The array `ptr[0..count]` of `T`; NULL is allowed only with `count` 0.
///
/// # Safety
/// Unless `count` is 0, `ptr` points to `count` initialised values of `T` not written while
/// the returned slice lives.
pub(crate) unsafe fn array_in<'a, T>(
    what: &'static str,
    ptr: *const T,
    count: usize,
) -> CResult<&'a [T]> {
    if count == 0 {
        return Ok(&[]);
    }
    if ptr.is_null() {
        return Err(Failure::null(what));
    }
    if !ptr.is_aligned() {
        return Err(unibuf::Error::Misaligned {
            what,
            value: ptr.addr(),
            align: std::mem::align_of::<T>(),
        }
        .into());
    }
    let Some(bytes) = count.checked_mul(std::mem::size_of::<T>()) else {
        return Err(Failure::invalid(
            what,
            format!("{count} elements overflow the address space"),
        ));
    };
    check_span(what, ptr.addr(), false, bytes)?;
    // SAFETY: non-NULL, aligned, the span fits the address space (checked), and the caller
    // guarantees `count` initialised values that nothing writes meanwhile.
    Ok(unsafe { std::slice::from_raw_parts(ptr, count) })
}

/// The most dimensions a shape passed to the library may have (as in weights files).
pub(crate) const MAX_RANK: usize = 64;

/// A shape: `rank` dimensions at `dims` (NULL allowed for rank 0).
///
/// # Safety
/// As [`array_in`].
pub(crate) unsafe fn shape_in<'a>(dims: *const usize, rank: usize) -> CResult<&'a [usize]> {
    if rank > MAX_RANK {
        return Err(Failure::invalid(
            "rank",
            format!("{rank} dimensions: at most {MAX_RANK} are supported"),
        ));
    }
    // SAFETY: forwarded contract.
    unsafe { array_in("shape", dims, rank) }
}

/// A NUL-terminated UTF-8 string.
///
/// # Safety
/// `ptr` is NULL or points to a NUL-terminated string that stays unchanged while the returned
/// reference lives.
pub(crate) unsafe fn str_in<'a>(what: &'static str, ptr: *const c_char) -> CResult<&'a str> {
    if ptr.is_null() {
        return Err(Failure::null(what));
    }
    // SAFETY: non-NULL and NUL-terminated by the caller's contract.
    let s = unsafe { CStr::from_ptr(ptr) };
    s.to_str().map_err(|e| {
        Failure::invalid(
            what,
            format!(
                "not UTF-8: invalid byte at offset {} of {:?}",
                e.valid_up_to(),
                s.to_string_lossy()
            ),
        )
    })
}

/// A string that may be NULL (then `default`).
///
/// # Safety
/// As [`str_in`].
pub(crate) unsafe fn opt_str_in<'a>(
    what: &'static str,
    ptr: *const c_char,
    default: &'a str,
) -> CResult<&'a str> {
    if ptr.is_null() {
        Ok(default)
    } else {
        // SAFETY: forwarded contract.
        unsafe { str_in(what, ptr) }
    }
}

/// Writes `s` as a NUL-terminated string into `buf` (`cap` bytes) and its length (without the
/// NUL) into `*len_out`. `buf` NULL with `cap` 0 asks for the length only. A `cap` too small is
/// `UB_STATUS_BUFFER_TOO_SMALL` (with the length written, nothing else).
///
/// # Safety
/// `buf` is NULL or valid for `cap` bytes of writes; `len_out` is valid for a write.
pub(crate) unsafe fn write_str(
    s: &str,
    buf: *mut c_char,
    cap: usize,
    len_out: *mut usize,
) -> CResult<()> {
    let len_out = Out::new("len_out", len_out)?;
    if buf.is_null() && cap != 0 {
        return Err(Failure::null("buf (with cap > 0)"));
    }
    // SAFETY: checked; valid by the caller's contract.
    unsafe { len_out.write(s.len()) };
    if buf.is_null() {
        return Ok(());
    }
    if cap <= s.len() {
        return Err(Failure::new(
            ub_status::UB_STATUS_BUFFER_TOO_SMALL,
            format!(
                "the string is {} bytes: buf needs {} bytes with the NUL, cap is {cap}",
                s.len(),
                s.len() + 1
            ),
        ));
    }
    // SAFETY: `buf` is valid for `cap` > s.len() bytes (caller's contract), and a Rust string
    // cannot overlap memory the caller handed in for writing.
    unsafe {
        std::ptr::copy_nonoverlapping(s.as_ptr(), buf.cast::<u8>(), s.len());
        buf.add(s.len()).write(0);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_a_status_with_its_message() {
        let s = call("ub_test_panics", || panic!("boom {}", 42));
        assert_eq!(s, ub_status::UB_STATUS_PANIC);
        // SAFETY: the message is a valid C string until the next call on this thread.
        let m = unsafe { CStr::from_ptr(crate::error::ub_last_error_message()) };
        let m = m.to_str().unwrap();
        assert!(m.starts_with("ub_test_panics: the library panicked"), "{m}");
        assert!(m.contains("boom 42"), "{m}");
        assert!(!crate::error::ub_last_error_retryable());
        let ok = call("ub_test_ok", || Ok(()));
        assert_eq!(ok, ub_status::UB_STATUS_OK);
        // SAFETY: as above.
        let m = unsafe { CStr::from_ptr(crate::error::ub_last_error_message()) };
        assert!(m.to_bytes().is_empty());
        assert_eq!(
            crate::error::ub_last_error_status(),
            ub_status::UB_STATUS_OK
        );
    }

    #[test]
    fn spans_are_checked() {
        // SAFETY: the checks fail before anything is read.
        unsafe {
            assert_eq!(
                bytes_in("src", std::ptr::null(), 4).unwrap_err().status,
                ub_status::UB_STATUS_NULL_POINTER
            );
            assert!(bytes_in("src", std::ptr::null(), 0).unwrap().is_empty());
            let top = std::ptr::without_provenance::<c_void>(usize::MAX - 2);
            assert_eq!(
                bytes_in("src", top, 16).unwrap_err().status,
                ub_status::UB_STATUS_INVALID_ARGUMENT
            );
            let odd = std::ptr::without_provenance::<usize>(3);
            assert_eq!(
                array_in("shape", odd, 2).unwrap_err().status,
                ub_status::UB_STATUS_MISALIGNED
            );
            let huge = std::ptr::without_provenance::<usize>(8);
            assert_eq!(
                array_in("shape", huge, usize::MAX / 4).unwrap_err().status,
                ub_status::UB_STATUS_INVALID_ARGUMENT
            );
            assert_eq!(
                shape_in(std::ptr::null(), 65).unwrap_err().status,
                ub_status::UB_STATUS_INVALID_ARGUMENT
            );
        }
    }

    #[test]
    fn strings_are_checked_and_written() {
        let bad = [0x66u8, 0xff, 0];
        // SAFETY: a NUL-terminated array.
        let e = unsafe { str_in("label", bad.as_ptr().cast()) }.unwrap_err();
        assert!(e.message.contains("not UTF-8"), "{}", e.message);
        let mut len = 0usize;
        // SAFETY: a size query writes only `len`.
        unsafe { write_str("hello", std::ptr::null_mut(), 0, &mut len) }.unwrap();
        assert_eq!(len, 5);
        let mut small = [0 as c_char; 5];
        // SAFETY: `small` has 5 bytes.
        let e = unsafe { write_str("hello", small.as_mut_ptr(), 5, &mut len) }.unwrap_err();
        assert_eq!(e.status, ub_status::UB_STATUS_BUFFER_TOO_SMALL);
        assert_eq!(small, [0; 5], "nothing written");
        let mut buf = [1 as c_char; 6];
        // SAFETY: `buf` has 6 bytes.
        unsafe { write_str("hello", buf.as_mut_ptr(), 6, &mut len) }.unwrap();
        // SAFETY: NUL-terminated by write_str.
        let s = unsafe { CStr::from_ptr(buf.as_ptr()) };
        assert_eq!(s.to_str().unwrap(), "hello");
    }
}
