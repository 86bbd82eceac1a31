//! The Python caller's file and line as the copy ledger's call site, so that the copy audit
//! of a Python program points into that program (the first frame outside the unibuf package),
//! not into these bindings.

use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use unibuf::ledger::CallSite;

/// `sys._getframe` and the package's directory, looked up once.
struct Lookup {
    getframe: Py<PyAny>,
    package_dir: String,
}

static LOOKUP: PyOnceLock<Lookup> = PyOnceLock::new();

fn lookup(py: Python<'_>) -> PyResult<&Lookup> {
    LOOKUP.get_or_try_init(py, || {
        let getframe = py.import("sys")?.getattr("_getframe")?.unbind();
        let file: String = py.import("unibuf")?.getattr("__file__")?.extract()?;
        let package_dir = std::path::Path::new(&file)
            .parent()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        Ok(Lookup {
            getframe,
            package_dir,
        })
    })
}

/// The first Python frame outside the unibuf package: its file and line.
fn python_caller(py: Python<'_>) -> PyResult<Option<CallSite>> {
    let l = lookup(py)?;
    let mut frame = l.getframe.bind(py).call0()?;
    // A bounded walk: wrappers in the package are a frame or two deep.
    for _ in 0..16 {
        if frame.is_none() {
            return Ok(None);
        }
        let file: String = frame.getattr("f_code")?.getattr("co_filename")?.extract()?;
        if l.package_dir.is_empty() || !file.starts_with(&l.package_dir) {
            let line: u32 = frame.getattr("f_lineno")?.extract().unwrap_or(0);
            return Ok(Some(CallSite::new(&file, line)));
        }
        frame = frame.getattr("f_back")?;
    }
    Ok(None)
}

/// Runs `f` with the Python caller as the call site of the transfers it records. Where the
/// frame cannot be read, the sites stay those of the bindings.
pub fn scoped<R>(py: Python<'_>, f: impl FnOnce() -> R) -> R {
    match python_caller(py) {
        Ok(Some(site)) => CallSite::scoped(site, f),
        _ => f(),
    }
}

/// [`scoped`] around `py.detach(f)`: a blocking call, without the GIL, whose transfers are
/// recorded at the Python caller's line.
pub fn detach<T: Send>(py: Python<'_>, f: impl FnOnce() -> T + Send) -> T {
    scoped(py, || py.detach(f))
}
