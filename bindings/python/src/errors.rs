//! `unibuf::Error` as Python exceptions.
//!
//! The classes live in Python (`unibuf/errors.py`) so that each can also derive from the
//! builtin a caller would catch (`MemoryError`, `ValueError`, ...); pyo3's `create_exception!`
//! allows one base only. Here each variant is mapped to its class by name and its fields are set
//! as attributes, with `kind` and `is_retryable`.

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyDict;
use unibuf::Error;

/// `Result` of the bindings' Rust side: converts into the mapped Python exception by `?`.
pub type UbResult<T> = Result<T, UbError>;

/// A `unibuf::Error`, or a binding-level condition that has no Rust variant (a closed device).
#[derive(Debug)]
pub enum UbError {
    /// The core library's error.
    Core(Error),
    /// The device was closed from Python.
    Closed(&'static str),
}

impl From<Error> for UbError {
    fn from(e: Error) -> UbError {
        UbError::Core(e)
    }
}

static ERRORS: PyOnceLock<Py<PyModule>> = PyOnceLock::new();

fn errors_module(py: Python<'_>) -> PyResult<&Bound<'_, PyModule>> {
    ERRORS
        .get_or_try_init(py, || Ok(py.import("unibuf.errors")?.unbind()))
        .map(|m| m.bind(py))
}

/// The class name and the fields of a variant.
fn describe<'py>(
    py: Python<'py>,
    e: &Error,
) -> PyResult<(&'static str, &'static str, Bound<'py, PyDict>)> {
    let d = PyDict::new(py);
    let (class, kind) = match e {
        Error::OutOfMemory {
            requested,
            reserved,
            free,
            largest_free,
        } => {
            d.set_item("requested", requested)?;
            d.set_item("reserved", reserved)?;
            d.set_item("free", free)?;
            d.set_item("largest_free", largest_free)?;
            ("OutOfMemoryError", "OutOfMemory")
        }
        Error::NeverFits {
            requested,
            limit,
            limit_name,
        } => {
            d.set_item("requested", requested)?;
            d.set_item("limit", limit)?;
            d.set_item("limit_name", limit_name)?;
            ("NeverFitsError", "NeverFits")
        }
        Error::BudgetExceeded {
            which,
            requested,
            in_use,
            budget,
        } => {
            d.set_item("which", which)?;
            d.set_item("requested", requested)?;
            d.set_item("in_use", in_use)?;
            d.set_item("budget", budget)?;
            ("BudgetExceededError", "BudgetExceeded")
        }
        Error::OutOfBounds {
            what,
            start,
            end,
            len,
        } => {
            d.set_item("what", what)?;
            d.set_item("start", start)?;
            d.set_item("end", end)?;
            d.set_item("len", len)?;
            ("OutOfBoundsError", "OutOfBounds")
        }
        Error::ShapeMismatch {
            what,
            expected,
            got,
        } => {
            d.set_item("what", what)?;
            d.set_item("expected", expected)?;
            d.set_item("got", got)?;
            ("ShapeMismatchError", "ShapeMismatch")
        }
        Error::DTypeMismatch {
            what,
            expected,
            got,
        } => {
            d.set_item("what", what)?;
            d.set_item("expected", crate::dtype::py_name(*expected))?;
            d.set_item("got", crate::dtype::py_name(*got))?;
            ("DTypeMismatchError", "DTypeMismatch")
        }
        Error::Misaligned { what, value, align } => {
            d.set_item("what", what)?;
            d.set_item("value", value)?;
            d.set_item("align", align)?;
            ("MisalignedError", "Misaligned")
        }
        Error::NotHostAccessible { what, mode } => {
            d.set_item("what", what)?;
            d.set_item("mode", crate::convert::mode_name(*mode))?;
            ("NotHostAccessibleError", "NotHostAccessible")
        }
        Error::ReadOnly { what, label } => {
            d.set_item("what", what)?;
            d.set_item("label", label)?;
            ("ReadOnlyError", "ReadOnly")
        }
        Error::HostAccessConflict {
            what,
            label,
            start,
            end,
            held,
        } => {
            d.set_item("what", what)?;
            d.set_item("label", label)?;
            d.set_item("start", start)?;
            d.set_item("end", end)?;
            d.set_item("held", held)?;
            ("HostAccessConflictError", "HostAccessConflict")
        }
        Error::WrongDevice {
            what,
            expected,
            got,
        } => {
            d.set_item("what", what)?;
            d.set_item("expected", expected)?;
            d.set_item("got", got)?;
            ("WrongDeviceError", "WrongDevice")
        }
        Error::InvalidArgument { what, detail } => {
            d.set_item("what", what)?;
            d.set_item("detail", detail)?;
            ("InvalidArgumentError", "InvalidArgument")
        }
        Error::DeviceFault {
            kind,
            label,
            detail,
        } => {
            d.set_item("fault", kind.to_string())?;
            d.set_item("label", label)?;
            d.set_item("detail", detail)?;
            ("DeviceFaultError", "DeviceFault")
        }
        Error::Unsupported { backend, what } => {
            d.set_item("backend", backend)?;
            d.set_item("what", what)?;
            ("UnsupportedError", "Unsupported")
        }
        Error::BackendUnavailable { name, reason } => {
            d.set_item("name", name)?;
            d.set_item("reason", reason)?;
            ("BackendUnavailableError", "BackendUnavailable")
        }
        Error::Compile { kernel, log } => {
            d.set_item("kernel", kernel)?;
            d.set_item("log", log)?;
            ("CompileError", "Compile")
        }
        Error::Format { what, detail } => {
            d.set_item("what", what)?;
            d.set_item("detail", detail)?;
            ("FormatError", "Format")
        }
        Error::External { label, detail } => {
            d.set_item("label", label)?;
            d.set_item("detail", detail)?;
            ("ExternalError", "External")
        }
        Error::Io { what, detail } => {
            d.set_item("what", what)?;
            d.set_item("detail", detail)?;
            ("IoError", "Io")
        }
        // `unibuf::Error` is non-exhaustive: a variant added later maps to the base class
        // until it gets its own.
        _ => ("UnibufError", "Error"),
    };
    Ok((class, kind, d))
}

fn build(
    py: Python<'_>,
    class: &str,
    kind: &str,
    message: String,
    retryable: bool,
    fields: &Bound<'_, PyDict>,
) -> PyResult<PyErr> {
    let module = errors_module(py)?;
    let value = module.getattr(class)?.call1((message,))?;
    value.setattr("kind", kind)?;
    value.setattr("is_retryable", retryable)?;
    for (k, v) in fields.iter() {
        value.setattr(k.cast::<pyo3::types::PyString>()?, v)?;
    }
    Ok(PyErr::from_value(value))
}

impl From<UbError> for PyErr {
    fn from(e: UbError) -> PyErr {
        Python::attach(|py| {
            let made = match &e {
                UbError::Core(err) => describe(py, err).and_then(|(class, kind, fields)| {
                    build(
                        py,
                        class,
                        kind,
                        err.to_string(),
                        err.is_retryable(),
                        &fields,
                    )
                }),
                UbError::Closed(what) => {
                    let fields = PyDict::new(py);
                    build(
                        py,
                        "DeviceClosedError",
                        "DeviceClosed",
                        format!("{what}: the device was closed"),
                        false,
                        &fields,
                    )
                }
            };
            // The classes come with the package; without them (a broken install) the message
            // still reaches the caller.
            made.unwrap_or_else(|import_err| {
                PyRuntimeError::new_err(format!("{e:?} (and unibuf.errors failed: {import_err})"))
            })
        })
    }
}

/// A binding-level invalid argument (a dtype name, a mode name) as `unibuf::Error`, so it maps
/// to `InvalidArgumentError` like the core's own.
pub fn invalid(what: &'static str, detail: impl Into<String>) -> UbError {
    UbError::Core(Error::InvalidArgument {
        what,
        detail: detail.into(),
    })
}
