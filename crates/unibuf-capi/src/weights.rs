//! Weights: safetensors and GGUF files, their tensors, and loading them onto a device.

use crate::buffer::{new_buffer_handle, ub_buffer};
use crate::call::{array_in, call, str_in, Out};
use crate::device::{device, ub_device};
use crate::error::{ub_status, CResult, Failure};
use crate::handle::{from_ptr, to_ptr, Kind, Registry};
use crate::queue::{queue, ub_queue};
use crate::types::{dtype_out, ub_dtype};
use std::ffi::{c_char, CStr, CString};
use std::sync::Arc;
use unibuf::weights::{LoadOptions, LoadedWeights, Route, Selection, WeightsFile};

/// An open safetensors or GGUF file whose header has been validated (no data read yet).
/// Opaque; release with `ub_weights_release`.
pub struct ub_weights {
    _opaque: [u8; 0],
}

/// A file and the C strings of its tensors' names and file dtypes, made once at open so that
/// `ub_tensor_info` can point at them.
pub(crate) struct Weights {
    pub(crate) file: WeightsFile,
    names: Vec<CString>,
    file_dtypes: Vec<CString>,
}

static WEIGHTS: Registry<Weights> = Registry::new(Kind::Weights);

/// The open file `w` names.
pub(crate) fn weights(w: *mut ub_weights) -> CResult<Arc<Weights>> {
    WEIGHTS.get("weights", from_ptr(w))
}

/// Live weights files (for the handle counts).
pub(crate) fn live_weights() -> usize {
    WEIGHTS.live()
}

/// A C string of a name from a file, or the `Format` error saying why C cannot name it.
fn c_name(file: &WeightsFile, what: &str, s: &str) -> CResult<CString> {
    CString::new(s).map_err(|e| {
        unibuf::Error::Format {
            what: file.path().display().to_string(),
            detail: format!(
                "{what} {:?} contains a NUL byte at {}: C strings cannot name it",
                s,
                e.nul_position()
            ),
        }
        .into()
    })
}

/// Opens the safetensors or GGUF file at `path` and validates its header completely (no data
/// is read).
///
/// Errors: `UB_STATUS_IO` if it cannot be opened or read, `UB_STATUS_FORMAT` naming the tensor
/// (or GGUF key) and the problem if it is malformed (also for a tensor name containing a NUL
/// byte), `UB_STATUS_UNSUPPORTED` for a GGUF version other than 2 or 3.
///
/// # Safety
/// `path` is a NUL-terminated UTF-8 string; `weights_out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ub_weights_open(
    path: *const c_char,
    weights_out: *mut *mut ub_weights,
) -> ub_status {
    call("ub_weights_open", || {
        // SAFETY: the caller's contract.
        let out = unsafe { Out::handle("weights_out", weights_out) }?;
        // SAFETY: the caller's contract.
        let path = unsafe { str_in("path", path) }?;
        let file = WeightsFile::open(path)?;
        let mut names = Vec::with_capacity(file.tensors().len());
        let mut file_dtypes = Vec::with_capacity(file.tensors().len());
        for t in file.tensors() {
            names.push(c_name(&file, "tensor name", &t.name)?);
            file_dtypes.push(c_name(&file, "file dtype", &t.file_dtype)?);
        }
        let h = WEIGHTS.insert(Weights {
            file,
            names,
            file_dtypes,
        })?;
        // SAFETY: checked by `Out::handle`.
        unsafe { out.write(to_ptr(h)) };
        Ok(())
    })
}

/// Releases a weights file handle (buffers loaded from it stay valid). NULL is a no-op;
/// releasing twice is `UB_STATUS_INVALID_HANDLE`.
#[no_mangle]
pub extern "C" fn ub_weights_release(weights: *mut ub_weights) -> ub_status {
    call("ub_weights_release", || WEIGHTS.release(from_ptr(weights)))
}

/// The file's format, `"safetensors"` or `"gguf"` (a static string), into `*format_out`.
///
/// # Safety
/// `format_out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ub_weights_format(
    weights: *mut ub_weights,
    format_out: *mut *const c_char,
) -> ub_status {
    call("ub_weights_format", || {
        let out = Out::new("format_out", format_out)?;
        let f: &'static CStr = match self::weights(weights)?.file.format() {
            "gguf" => c"gguf",
            _ => c"safetensors",
        };
        // SAFETY: checked; valid by the caller's contract.
        unsafe { out.write(f.as_ptr()) };
        Ok(())
    })
}

/// The number of tensors in the file, into `*count_out`.
///
/// # Safety
/// `count_out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ub_weights_tensor_count(
    weights: *mut ub_weights,
    count_out: *mut usize,
) -> ub_status {
    call("ub_weights_tensor_count", || {
        let out = Out::new("count_out", count_out)?;
        let n = self::weights(weights)?.file.tensors().len();
        // SAFETY: checked; valid by the caller's contract.
        unsafe { out.write(n) };
        Ok(())
    })
}

/// A tensor of a weights file, as `ub_weights_tensor_info` describes it. Its pointers belong
/// to the weights handle and stay valid until it is released.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ub_tensor_info {
    /// The tensor's name, NUL-terminated.
    pub name: *const c_char,
    /// The dtype it loads as (a GGUF block format loads as `UB_DTYPE_U8` bytes).
    pub dtype: ub_dtype,
    /// Dimensions of the shape it loads as.
    pub rank: usize,
    /// The shape it loads as (`rank` values; a block-format tensor: `[rows, bytes per row]`).
    pub shape: *const usize,
    /// The file's own dtype name ("F32", "BF16", "Q8_0", "BOOL", ...).
    pub file_dtype: *const c_char,
    /// Bytes of its data.
    pub byte_len: u64,
    /// Offset of its data in the file.
    pub file_offset: u64,
}

/// Describes tensor `index` (in file order) into `*info_out`.
///
/// Errors: `UB_STATUS_OUT_OF_RANGE` for an index past the last tensor.
///
/// # Safety
/// `info_out` is valid for a write of `ub_tensor_info`.
#[no_mangle]
pub unsafe extern "C" fn ub_weights_tensor_info(
    weights: *mut ub_weights,
    index: usize,
    info_out: *mut ub_tensor_info,
) -> ub_status {
    call("ub_weights_tensor_info", || {
        let out = Out::new("info_out", info_out)?;
        let w = self::weights(weights)?;
        let tensors = w.file.tensors();
        let Some(t) = tensors.get(index) else {
            return Err(unibuf::Error::OutOfBounds {
                what: "tensor index",
                start: index,
                end: index.saturating_add(1),
                len: tensors.len(),
            }
            .into());
        };
        let info = ub_tensor_info {
            name: w.names[index].as_ptr(),
            dtype: dtype_out(t.dtype),
            rank: t.shape.len(),
            shape: t.shape.as_ptr(),
            file_dtype: w.file_dtypes[index].as_ptr(),
            byte_len: t.byte_len(),
            file_offset: t.range.start,
        };
        // SAFETY: checked; valid by the caller's contract. The pointers are into `w`, which
        // the registry keeps until the handle is released.
        unsafe { out.write(info) };
        Ok(())
    })
}

/// How a load moves the bytes: one of the `UB_ROUTE_*` values.
pub type ub_route = u32;
/// Zero copy on unified memory (views of the mapped file), staged on a discrete GPU.
pub const UB_ROUTE_AUTO: ub_route = 0;
/// Views of the mapped file, wrapped as External memory (read over the bus on a discrete GPU).
pub const UB_ROUTE_ZERO_COPY: ub_route = 1;
/// Read into pinned staging and copied into Private device memory.
pub const UB_ROUTE_STAGED: ub_route = 2;

fn route_in(v: ub_route) -> CResult<Route> {
    Ok(match v {
        UB_ROUTE_AUTO => Route::Auto,
        UB_ROUTE_ZERO_COPY => Route::ZeroCopy,
        UB_ROUTE_STAGED => Route::Staged,
        other => {
            return Err(Failure::invalid(
                "route",
                format!("{other} is not a ub_route (UB_ROUTE_AUTO = 0 .. UB_ROUTE_STAGED = 2)"),
            ))
        }
    })
}

/// Tensors of a file loaded onto a device, by name. Opaque; release with
/// `ub_loaded_weights_release` (buffers taken from it stay valid).
pub struct ub_loaded_weights {
    _opaque: [u8; 0],
}

static LOADED: Registry<LoadedWeights> = Registry::new(Kind::Loaded);

/// Live loaded-weights sets (for the handle counts).
pub(crate) fn live_loaded() -> usize {
    LOADED.live()
}

/// Loads tensors of `weights` onto `dev`: the `n_names` tensors named in `names`, or all with
/// `n_names` 0, by `route`, with the copies on `queue` (NULL: the device's default queue).
///
/// Errors: `UB_STATUS_INVALID_ARGUMENT` for a name the file lacks or an unknown route;
/// `UB_STATUS_IO` and `UB_STATUS_FORMAT` if the data cannot be read; allocation errors.
///
/// # Safety
/// `names` is NULL with `n_names` 0, or points to `n_names` NUL-terminated strings;
/// `loaded_out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ub_weights_load(
    weights: *mut ub_weights,
    dev: *mut ub_device,
    queue: *mut ub_queue,
    names: *const *const c_char,
    n_names: usize,
    route: ub_route,
    loaded_out: *mut *mut ub_loaded_weights,
) -> ub_status {
    call("ub_weights_load", || {
        // SAFETY: the caller's contract.
        let out = unsafe { Out::handle("loaded_out", loaded_out) }?;
        // SAFETY: the caller's contract.
        let list = unsafe { array_in("names", names, n_names) }?;
        let selection = if list.is_empty() {
            Selection::All
        } else {
            let mut v = Vec::with_capacity(list.len());
            for p in list {
                // SAFETY: the caller's contract: each entry is a NUL-terminated string.
                v.push(unsafe { str_in("names[i]", *p) }?.to_owned());
            }
            Selection::names(v)
        };
        let w = self::weights(weights)?;
        let d = device(dev)?;
        let q = if queue.is_null() {
            d.queue()
        } else {
            (*self::queue(queue)?).clone()
        };
        let options = LoadOptions {
            route: route_in(route)?,
            ..LoadOptions::default()
        };
        let loaded = w.file.load_with(&d, &q, &selection, &options)?;
        // SAFETY: checked by `Out::handle`.
        unsafe { out.write(to_ptr(LOADED.insert(loaded)?)) };
        Ok(())
    })
}

/// Loads the one tensor `name` of `weights` onto `dev` (route auto, default queue) as a buffer.
///
/// Errors as `ub_weights_load`.
///
/// # Safety
/// `name` is a NUL-terminated string; `buf_out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ub_weights_get_tensor(
    weights: *mut ub_weights,
    dev: *mut ub_device,
    name: *const c_char,
    buf_out: *mut *mut ub_buffer,
) -> ub_status {
    call("ub_weights_get_tensor", || {
        // SAFETY: the caller's contract.
        let out = unsafe { Out::handle("buf_out", buf_out) }?;
        // SAFETY: the caller's contract.
        let name = unsafe { str_in("name", name) }?;
        let w = self::weights(weights)?;
        let d = device(dev)?;
        let loaded = w.file.load(&d, &d.queue(), &Selection::names([name]))?;
        let b = loaded.get(name).cloned().ok_or_else(|| {
            Failure::invalid("name", format!("the load returned no tensor '{name}'"))
        })?;
        // SAFETY: checked by `Out::handle`.
        unsafe { out.write(new_buffer_handle(b)?) };
        Ok(())
    })
}

/// Releases a loaded-weights handle (buffers taken from it stay valid). NULL is a no-op;
/// releasing twice is `UB_STATUS_INVALID_HANDLE`.
#[no_mangle]
pub extern "C" fn ub_loaded_weights_release(loaded: *mut ub_loaded_weights) -> ub_status {
    call("ub_loaded_weights_release", || {
        LOADED.release(from_ptr(loaded))
    })
}

/// The number of tensors loaded, into `*count_out`.
///
/// # Safety
/// `count_out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ub_loaded_weights_count(
    loaded: *mut ub_loaded_weights,
    count_out: *mut usize,
) -> ub_status {
    call("ub_loaded_weights_count", || {
        let out = Out::new("count_out", count_out)?;
        let n = LOADED.get("loaded", from_ptr(loaded))?.len();
        // SAFETY: checked; valid by the caller's contract.
        unsafe { out.write(n) };
        Ok(())
    })
}

/// The loaded tensor `name` as a new buffer handle (a view; release it with
/// `ub_buffer_release`).
///
/// Errors: `UB_STATUS_INVALID_ARGUMENT` for a name that was not loaded.
///
/// # Safety
/// `name` is a NUL-terminated string; `buf_out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ub_loaded_weights_get(
    loaded: *mut ub_loaded_weights,
    name: *const c_char,
    buf_out: *mut *mut ub_buffer,
) -> ub_status {
    call("ub_loaded_weights_get", || {
        // SAFETY: the caller's contract.
        let out = unsafe { Out::handle("buf_out", buf_out) }?;
        // SAFETY: the caller's contract.
        let name = unsafe { str_in("name", name) }?;
        let l = LOADED.get("loaded", from_ptr(loaded))?;
        let b = l.get(name).cloned().ok_or_else(|| {
            Failure::invalid(
                "name",
                format!("no tensor '{name}' was loaded ({} tensors were)", l.len()),
            )
        })?;
        // SAFETY: checked by `Out::handle`.
        unsafe { out.write(new_buffer_handle(b)?) };
        Ok(())
    })
}

/// What a load did. Filled by `ub_loaded_weights_report`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ub_load_report {
    /// The route taken (`UB_ROUTE_ZERO_COPY` or `UB_ROUTE_STAGED`).
    pub route: ub_route,
    /// Tensors loaded.
    pub tensors: usize,
    /// Bytes of tensor data.
    pub bytes: u64,
    /// Bytes copied (0 for a zero-copy load, unless a misaligned tensor had to be copied).
    pub copied_bytes: u64,
    /// Tensors copied.
    pub copied_tensors: usize,
    /// Device allocations made.
    pub allocations: usize,
    /// Threads that read the file.
    pub readers: usize,
    /// Wall time of the load.
    pub seconds: f64,
}

/// Writes what the load did into `*report_out`.
///
/// # Safety
/// `report_out` is valid for a write of `ub_load_report`.
#[no_mangle]
pub unsafe extern "C" fn ub_loaded_weights_report(
    loaded: *mut ub_loaded_weights,
    report_out: *mut ub_load_report,
) -> ub_status {
    call("ub_loaded_weights_report", || {
        let out = Out::new("report_out", report_out)?;
        let l = LOADED.get("loaded", from_ptr(loaded))?;
        let r = l.report();
        let c = ub_load_report {
            route: match r.route {
                Route::Auto => UB_ROUTE_AUTO,
                Route::ZeroCopy => UB_ROUTE_ZERO_COPY,
                Route::Staged => UB_ROUTE_STAGED,
            },
            tensors: r.tensors,
            bytes: r.bytes,
            copied_bytes: r.copied_bytes,
            copied_tensors: r.copied_tensors,
            allocations: r.allocations,
            readers: r.readers,
            seconds: r.seconds,
        };
        // SAFETY: checked; valid by the caller's contract.
        unsafe { out.write(c) };
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_are_checked() {
        assert_eq!(route_in(UB_ROUTE_STAGED).unwrap(), Route::Staged);
        let e = route_in(3).unwrap_err();
        assert!(e.message.contains("3 is not a ub_route"), "{}", e.message);
    }
}
