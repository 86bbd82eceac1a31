//! The Python bindings of unibuf: a thin layer over the Rust API (never a second
//! implementation), built with maturin into the `unibuf` package (`unibuf._unibuf`).
//!
//! One concept per file: `device.rs` (Device and the closed state its queues and buffers
//! share), `queue.rs` (Queue, Fence), `buffer.rs` (Buffer, its views and DLPack export),
//! `dlpack.rs` (imports), `host.rs` (host arrays and bytes for transfers), `ops.rs`,
//! `weights.rs`, `report.rs` (the copy audit), `errors.rs` (the exception mapping).
//!
//! Every call that can block (waits, drains, synchronous transfers, loads, exports without a
//! stream) releases the GIL; launches do not block and keep it.

mod buffer;
mod convert;
mod device;
mod dlpack;
mod dtype;
mod errors;
mod host;
mod ops;
mod queue;
mod report;
mod site;
mod weights;

use pyo3::prelude::*;

#[pymodule]
fn _unibuf(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add_class::<device::PyDevice>()?;
    m.add_class::<queue::PyQueue>()?;
    m.add_class::<queue::PyFence>()?;
    m.add_class::<buffer::PyBuffer>()?;
    m.add_class::<report::CopyReport>()?;
    m.add_function(wrap_pyfunction!(device::backends, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    let features: Vec<&str> = [
        ("cuda", cfg!(feature = "cuda")),
        ("metal", cfg!(feature = "metal")),
    ]
    .into_iter()
    .filter_map(|(n, on)| on.then_some(n))
    .collect();
    m.add("FEATURES", features)?;

    // Submodules registered in sys.modules under their full names, so that
    // `import unibuf._unibuf.ops` works as for a package.
    let modules = py.import("sys")?.getattr("modules")?;
    let ops_mod = PyModule::new(py, "unibuf._unibuf.ops")?;
    ops::register(&ops_mod)?;
    m.add("ops", &ops_mod)?;
    modules.set_item("unibuf._unibuf.ops", &ops_mod)?;
    let weights_mod = PyModule::new(py, "unibuf._unibuf.weights")?;
    weights::register(&weights_mod)?;
    m.add("weights", &weights_mod)?;
    modules.set_item("unibuf._unibuf.weights", &weights_mod)?;
    Ok(())
}
