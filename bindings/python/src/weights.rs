//! `unibuf.weights`: safetensors files loaded onto a device, and the streaming expert cache.

use crate::buffer::PyBuffer;
use crate::device::PyDevice;
use crate::dtype;
use crate::errors::{invalid, UbError, UbResult};
use crate::queue::{PyFence, PyQueue};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use std::path::PathBuf;
use unibuf::weights::{
    ExpertCache, ExpertHandle, ExpertLayout, LoadOptions, LoadReport, LoadedWeights, Route,
    Selection, WeightsFile,
};

/// An open safetensors or GGUF file whose header has been validated (no data read yet).
///
/// ``WeightsFile(path)`` opens ``path``; a malformed file is a ``FormatError`` naming the
/// tensor (or GGUF key) and the problem, a missing one an ``IoError``. A GGUF file's
/// block-format tensors (Q8_0, Q4_0, Q4_1, ...) load as their bytes: uint8 of shape
/// ``[rows, bytes per row]``.
#[pyclass(name = "WeightsFile", module = "unibuf.weights", frozen)]
pub struct PyWeightsFile {
    file: WeightsFile,
}

#[pymethods]
impl PyWeightsFile {
    #[new]
    fn new(py: Python<'_>, path: PathBuf) -> UbResult<PyWeightsFile> {
        let file = py.detach(|| WeightsFile::open(&path))?;
        Ok(PyWeightsFile { file })
    }

    /// The file's path.
    #[getter]
    fn path(&self) -> PathBuf {
        self.file.path().to_path_buf()
    }

    /// The tensors: ``[{"name", "dtype", "shape", "file_dtype", "byte_len"}]`` in file order.
    #[getter]
    fn tensors<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let l = PyList::empty(py);
        for t in self.file.tensors() {
            let d = PyDict::new(py);
            d.set_item("name", &t.name)?;
            d.set_item("dtype", dtype::py_name(t.dtype))?;
            d.set_item("shape", t.shape.clone())?;
            d.set_item("file_dtype", &t.file_dtype)?;
            d.set_item("byte_len", t.byte_len())?;
            l.append(d)?;
        }
        Ok(l)
    }

    /// "safetensors" or "gguf".
    #[getter]
    fn format(&self) -> &'static str {
        self.file.format()
    }

    /// The header's ``__metadata__`` strings (a GGUF file's key-value pairs as text).
    #[getter]
    fn metadata(&self) -> std::collections::BTreeMap<String, String> {
        self.file.metadata().clone()
    }

    /// Bytes of tensor data.
    #[getter]
    fn data_len(&self) -> u64 {
        self.file.data_len()
    }

    fn __repr__(&self) -> String {
        format!(
            "WeightsFile({:?}, {} tensors)",
            self.file.path(),
            self.file.tensors().len()
        )
    }
}

/// A `WeightsFile` argument: an open one, or a path to open (without the GIL).
fn weights_file(py: Python<'_>, file: &Bound<'_, PyAny>) -> PyResult<WeightsFile> {
    match file.cast::<PyWeightsFile>() {
        Ok(f) => Ok(f.get().file.clone()),
        Err(_) => {
            let path: PathBuf = file.extract()?;
            Ok(py
                .detach(|| WeightsFile::open(&path))
                .map_err(UbError::from)?)
        }
    }
}

/// Tensors loaded onto a device: a read-only mapping of name to ``Buffer``, with the load's
/// ``report``.
#[pyclass(name = "LoadedWeights", module = "unibuf.weights", frozen, mapping)]
pub struct PyLoadedWeights {
    device: PyDevice,
    weights: LoadedWeights,
}

fn report_dict<'py>(py: Python<'py>, r: &LoadReport) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("route", r.route.name())?;
    d.set_item("tensors", r.tensors)?;
    d.set_item("bytes", r.bytes)?;
    d.set_item("copied_bytes", r.copied_bytes)?;
    d.set_item("copied_tensors", r.copied_tensors)?;
    d.set_item("allocations", r.allocations)?;
    d.set_item("readers", r.readers)?;
    d.set_item("seconds", r.seconds)?;
    d.set_item("gbps", r.gbps())?;
    d.set_item("text", r.to_string())?;
    Ok(d)
}

#[pymethods]
impl PyLoadedWeights {
    fn __getitem__(&self, name: &str) -> PyResult<PyBuffer> {
        match self.weights.get(name) {
            Some(b) => Ok(PyBuffer::new(self.device.h.clone(), b.clone())),
            None => Err(pyo3::exceptions::PyKeyError::new_err(name.to_owned())),
        }
    }

    fn __contains__(&self, name: &Bound<'_, PyAny>) -> bool {
        name.extract::<String>()
            .is_ok_and(|n| self.weights.get(&n).is_some())
    }

    fn __len__(&self) -> usize {
        self.weights.len()
    }

    fn __iter__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        PyList::new(py, self.keys())?
            .into_any()
            .try_iter()
            .map(|i| i.into_any())
    }

    /// The tensor names, in load order.
    fn keys(&self) -> Vec<String> {
        self.weights.iter().map(|(n, _)| n.to_owned()).collect()
    }

    /// ``(name, Buffer)`` pairs, in load order.
    fn items(&self) -> Vec<(String, PyBuffer)> {
        self.weights
            .iter()
            .map(|(n, b)| {
                (
                    n.to_owned(),
                    PyBuffer::new(self.device.h.clone(), b.clone()),
                )
            })
            .collect()
    }

    /// The load's report: route, tensors, bytes, copied bytes, allocations, readers, seconds,
    /// GB/s, and the printed table as ``text``.
    #[getter]
    fn report<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        report_dict(py, self.weights.report())
    }
}

fn route(name: &str) -> UbResult<Route> {
    match name {
        "auto" => Ok(Route::Auto),
        "zero-copy" | "zero_copy" => Ok(Route::ZeroCopy),
        "staged" => Ok(Route::Staged),
        _ => Err(invalid(
            "route",
            format!("'{name}' is not a route (auto, zero-copy, staged)"),
        )),
    }
}

/// Loads tensors of a safetensors file onto ``device`` at line rate: zero-copy views of the
/// mapped file on unified memory, parallel reads through pinned staging into packed device
/// allocations on a discrete GPU. ``names`` (a list) or ``prefix`` select tensors (default:
/// all). ``route``: "auto" (the above), "zero-copy" (views of the mapped file, also on a
/// discrete GPU: read over the bus) or "staged" (always copied); ``queue``: the queue the
/// copies go on (default: the device's); ``readers``: threads reading the file on the staged
/// route (0: one per core, up to 16). ``file`` is a ``WeightsFile`` or a path. The GIL is
/// released while it loads.
#[pyfunction]
#[pyo3(signature = (device, file, *, names=None, prefix=None, route="auto", queue=None, readers=0))]
#[allow(clippy::too_many_arguments)]
pub fn load(
    py: Python<'_>,
    device: &PyDevice,
    file: &Bound<'_, PyAny>,
    names: Option<Vec<String>>,
    prefix: Option<String>,
    route: &str,
    queue: Option<&PyQueue>,
    readers: usize,
) -> PyResult<PyLoadedWeights> {
    let dev = device.h.get("weights.load")?;
    let file = weights_file(py, file)?;
    let selection = match (names, prefix) {
        (Some(_), Some(_)) => {
            return Err(invalid("selection", "give names or prefix, not both").into())
        }
        (Some(n), None) => Selection::names(n),
        (None, Some(p)) => Selection::Prefix(p),
        (None, None) => Selection::All,
    };
    let options = LoadOptions {
        route: self::route(route)?,
        readers,
        ..LoadOptions::default()
    };
    let q = match queue {
        Some(q) => q.get("weights.load")?.clone(),
        None => dev.queue(),
    };
    let weights = crate::site::detach(py, || file.load_with(dev, &q, &selection, &options))
        .map_err(UbError::from)?;
    Ok(PyLoadedWeights {
        device: PyDevice::from_handle(device.h.clone()),
        weights,
    })
}

/// An expert on the device: its tensors by short name (``expert["w1"]``), and the fence of
/// the copy that brought it. It keeps the memory alive after eviction.
#[pyclass(name = "Expert", module = "unibuf.weights", frozen, mapping)]
pub struct PyExpert {
    device: PyDevice,
    e: ExpertHandle,
}

#[pymethods]
impl PyExpert {
    fn __getitem__(&self, name: &str) -> PyResult<PyBuffer> {
        match self.e.get(name) {
            Some(b) => Ok(PyBuffer::new(self.device.h.clone(), b.clone())),
            None => Err(pyo3::exceptions::PyKeyError::new_err(name.to_owned())),
        }
    }

    fn __len__(&self) -> usize {
        self.e.tensors().count()
    }

    fn __contains__(&self, name: &Bound<'_, PyAny>) -> bool {
        name.extract::<String>()
            .is_ok_and(|n| self.e.get(&n).is_some())
    }

    fn __iter__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        PyList::new(py, self.keys())?
            .into_any()
            .try_iter()
            .map(|i| i.into_any())
    }

    /// The short tensor names.
    fn keys(&self) -> Vec<String> {
        self.e.tensors().map(|(n, _)| n.to_owned()).collect()
    }

    /// The layer.
    #[getter]
    fn layer(&self) -> usize {
        self.e.layer()
    }

    /// The expert's index in its layer.
    #[getter]
    fn expert(&self) -> usize {
        self.e.expert()
    }

    /// The fence of the copy that brought the expert (work using it waits by itself).
    #[getter]
    fn fence(&self) -> PyFence {
        self.e.fence().into()
    }
}

/// Streams the experts of a mixture-of-experts file through a per-layer device budget: a
/// miss reads the expert now, ``prefetch`` reads predicted experts in the background, the
/// least recently used is evicted. ``prefix`` is a format string naming expert ``e`` of
/// layer ``l``, e.g. ``"layers.{layer}.experts.{expert}."`` (end it with a separator).
///
/// ``ExpertCache(device, file, layers, experts, prefix, budget_per_layer)``: ``file`` is a
/// ``WeightsFile`` or a path; ``layers`` x ``experts`` experts are named by ``prefix``; at most
/// ``budget_per_layer`` experts (a count, at least 1) of each layer are kept on the device.
/// It makes its own copy queue and prefetch thread.
#[pyclass(name = "ExpertCache", module = "unibuf.weights", frozen)]
pub struct PyExpertCache {
    device: PyDevice,
    cache: ExpertCache,
}

#[pymethods]
impl PyExpertCache {
    #[new]
    #[pyo3(signature = (device, file, layers, experts, prefix, budget_per_layer))]
    fn new(
        py: Python<'_>,
        device: &PyDevice,
        file: &Bound<'_, PyAny>,
        layers: usize,
        experts: usize,
        prefix: &str,
        budget_per_layer: usize,
    ) -> PyResult<PyExpertCache> {
        let dev = device.h.get("ExpertCache")?;
        if !prefix.contains("{layer}") || !prefix.contains("{expert}") {
            return Err(invalid(
                "prefix",
                format!("'{prefix}' must contain {{layer}} and {{expert}}"),
            )
            .into());
        }
        let file = weights_file(py, file)?;
        let pattern = prefix.to_owned();
        let layout = ExpertLayout::by_prefix(&file, layers, experts, |l, e| {
            pattern
                .replace("{layer}", &l.to_string())
                .replace("{expert}", &e.to_string())
        })
        .map_err(UbError::from)?;
        let cache = py
            .detach(|| ExpertCache::new(dev, &file, layout, budget_per_layer))
            .map_err(UbError::from)?;
        Ok(PyExpertCache {
            device: PyDevice::from_handle(device.h.clone()),
            cache,
        })
    }

    /// Expert ``expert`` of ``layer`` on the device: a hit, a prefetch hit (waits for the
    /// read if still running) or a miss (reads now). Without the GIL.
    fn get(&self, py: Python<'_>, layer: usize, expert: usize) -> UbResult<PyExpert> {
        self.device.h.get("ExpertCache.get")?;
        let c = &self.cache;
        let e = crate::site::detach(py, || c.get(layer, expert))?;
        Ok(PyExpert {
            device: PyDevice::from_handle(self.device.h.clone()),
            e,
        })
    }

    /// Reads the predicted ``experts`` of ``layer`` in the background.
    fn prefetch(&self, layer: usize, experts: Vec<usize>) -> UbResult<()> {
        self.device.h.get("ExpertCache.prefetch")?;
        self.cache.prefetch(layer, &experts)?;
        Ok(())
    }

    /// Blocks (without the GIL) until the queued prefetches are done.
    fn wait_prefetches(&self, py: Python<'_>) {
        let c = &self.cache;
        py.detach(|| c.wait_prefetches());
    }

    /// The experts of ``layer`` on the device.
    fn resident(&self, layer: usize) -> Vec<usize> {
        self.cache.resident(layer)
    }

    /// Counters: hits, prefetch_hits, misses, evictions, prefetches, prefetch_dropped,
    /// bytes_read, stall_seconds, resident, hit_rate.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.cache.stats();
        let d = PyDict::new(py);
        d.set_item("hits", s.hits)?;
        d.set_item("prefetch_hits", s.prefetch_hits)?;
        d.set_item("misses", s.misses)?;
        d.set_item("evictions", s.evictions)?;
        d.set_item("prefetches", s.prefetches)?;
        d.set_item("prefetch_dropped", s.prefetch_dropped)?;
        d.set_item("bytes_read", s.bytes_read)?;
        d.set_item("stall_seconds", s.stall.as_secs_f64())?;
        d.set_item("resident", s.resident)?;
        d.set_item("hit_rate", s.hit_rate())?;
        Ok(d)
    }
}

/// Registers the weights classes and functions in `unibuf._unibuf.weights`.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyWeightsFile>()?;
    m.add_class::<PyLoadedWeights>()?;
    m.add_class::<PyExpert>()?;
    m.add_class::<PyExpertCache>()?;
    m.add_function(wrap_pyfunction!(load, m)?)?;
    Ok(())
}
