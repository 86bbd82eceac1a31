//! `unibuf.CopyReport`: the copy audit of a device.

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use unibuf::LedgerReport;

/// The copy audit: the bytes moved per direction ("host->device", "device->host",
/// "device->device", "fill", and "shared" for zero-byte hand-overs such as DLPack exchanges)
/// and per call site. ``str(report)`` is the table ``unibuf`` prints.
#[pyclass(name = "CopyReport", module = "unibuf", frozen)]
pub struct CopyReport {
    report: LedgerReport,
}

impl CopyReport {
    pub fn new(report: LedgerReport) -> CopyReport {
        CopyReport { report }
    }
}

#[pymethods]
impl CopyReport {
    /// Per direction: ``{name: {"count", "bytes", "staged_bytes", "host_ns", "device_ns"}}``
    /// (``device_ns`` None where the backend does not time copies).
    #[getter]
    fn directions<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (dir, t, device_ns) in &self.report.by_direction {
            let e = PyDict::new(py);
            e.set_item("count", t.count)?;
            e.set_item("bytes", t.bytes)?;
            e.set_item("staged_bytes", t.staged_bytes)?;
            e.set_item("host_ns", t.host_ns)?;
            e.set_item("device_ns", *device_ns)?;
            d.set_item(dir.name(), e)?;
        }
        Ok(d)
    }

    /// Per call site and direction, most bytes first: ``[{"site", "direction", "count",
    /// "bytes", "staged_bytes"}]``. Sites are ``file:line`` of the caller into unibuf.
    #[getter]
    fn sites<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let l = PyList::empty(py);
        for (site, dir, t) in &self.report.by_site {
            let e = PyDict::new(py);
            e.set_item("site", site)?;
            e.set_item("direction", dir.name())?;
            e.set_item("count", t.count)?;
            e.set_item("bytes", t.bytes)?;
            e.set_item("staged_bytes", t.staged_bytes)?;
            l.append(e)?;
        }
        Ok(l)
    }

    /// Bytes moved in every direction together (zero-byte "shared" records add nothing).
    #[getter]
    fn total_bytes(&self) -> u64 {
        self.report
            .by_direction
            .iter()
            .map(|(_, t, _)| t.bytes)
            .sum()
    }

    /// Detailed records dropped from the ring (the totals still include them).
    #[getter]
    fn dropped_records(&self) -> u64 {
        self.report.dropped_records
    }

    fn __str__(&self) -> String {
        self.report.to_string()
    }

    fn __repr__(&self) -> String {
        let count: u64 = self
            .report
            .by_direction
            .iter()
            .map(|(_, t, _)| t.count)
            .sum();
        format!("CopyReport({count} records, {} bytes)", self.total_bytes())
    }
}
