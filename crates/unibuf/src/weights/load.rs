//! Loading tensors onto a device: zero copy on unified memory, streamed through pinned staging
//! chunks into a few large Private allocations on discrete memory.

use super::header::TensorInfo;
use super::{read_exact_at, WeightsFile};
use crate::buffer::Buffer;
use crate::device::Device;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::ledger::fmt_bytes;
use crate::ledger::CallSite;
use crate::queue::Queue;
use crate::storage::StorageMode;
use crate::transfer::stream_in::StreamPiece;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::time::Instant;

/// Alignment of each tensor within a packed device allocation: enough for any dtype and for
/// vectorised (128-bit) GPU loads, and the CUDA allocation granule of cudaMalloc.
pub const TENSOR_ALIGN: usize = 256;

/// Which tensors to load.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selection {
    /// Every tensor of the file.
    All,
    /// These tensors; a name the file lacks is an error.
    Names(Vec<String>),
    /// The tensors whose names start with this.
    Prefix(String),
}

impl Selection {
    /// The tensors named by `names`.
    pub fn names<S: Into<String>>(names: impl IntoIterator<Item = S>) -> Selection {
        Selection::Names(names.into_iter().map(Into::into).collect())
    }
}

/// How the bytes get to the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Route {
    /// Zero copy on unified memory, staged on discrete memory.
    Auto,
    /// Views of the mapped file, wrapped as External memory (on CUDA: a read-only registered
    /// mapping that kernels read over the bus).
    ZeroCopy,
    /// Read into pinned staging chunks and copied into Private device memory.
    Staged,
}

impl Route {
    /// A short name for reports.
    pub const fn name(self) -> &'static str {
        match self {
            Route::Auto => "auto",
            Route::ZeroCopy => "zero-copy",
            Route::Staged => "staged",
        }
    }
}

/// Options of [`WeightsFile::load_with`].
#[derive(Clone)]
pub struct LoadOptions {
    /// The route (default [`Route::Auto`]).
    pub route: Route,
    /// The most bytes of tensors packed into one device allocation on the staged route
    /// (default 1 GiB); a larger tensor gets an allocation of its own.
    pub group_bytes: usize,
    /// Threads reading the file on the staged route; 0 (the default) picks one per core, up
    /// to 16.
    pub readers: usize,
    /// Told the bytes of each piece as it is handed to the device (for progress bars).
    pub progress: Option<Arc<dyn Fn(u64) + Send + Sync>>,
}

impl Default for LoadOptions {
    fn default() -> LoadOptions {
        LoadOptions {
            route: Route::Auto,
            group_bytes: 1 << 30,
            readers: 0,
            progress: None,
        }
    }
}

impl fmt::Debug for LoadOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadOptions")
            .field("route", &self.route)
            .field("group_bytes", &self.group_bytes)
            .field("readers", &self.readers)
            .field("progress", &self.progress.is_some())
            .finish()
    }
}

/// Tensors and bytes of one file dtype in a load.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DTypeRow {
    /// The dtype as the file names it.
    pub dtype: String,
    /// Tensors of it.
    pub tensors: usize,
    /// Their bytes.
    pub bytes: u64,
}

/// What a load did and how fast.
#[derive(Clone, Debug)]
pub struct LoadReport {
    /// The route taken (never `Auto`).
    pub route: Route,
    /// Tensors loaded.
    pub tensors: usize,
    /// Bytes of tensor data loaded.
    pub bytes: u64,
    /// Of which copied (everything on the staged route; misaligned tensors on zero copy).
    pub copied_bytes: u64,
    /// Tensors copied rather than viewed on the zero-copy route.
    pub copied_tensors: usize,
    /// Device allocations (or wrapped regions) made.
    pub allocations: usize,
    /// Reader threads used (staged route).
    pub readers: usize,
    /// Wall time from the call to the data being on the device.
    pub seconds: f64,
    /// Tensors and bytes per file dtype, most bytes first.
    pub by_dtype: Vec<DTypeRow>,
}

impl LoadReport {
    /// Bytes loaded per second, in GB/s (10^9).
    pub fn gbps(&self) -> f64 {
        if self.seconds > 0.0 {
            self.bytes as f64 / self.seconds / 1e9
        } else {
            0.0
        }
    }
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "loaded {} tensors, {} in {:.3} s: {:.2} GB/s ({} route, {} allocations, {} copied)",
            self.tensors,
            fmt_bytes(self.bytes),
            self.seconds,
            self.gbps(),
            self.route.name(),
            self.allocations,
            fmt_bytes(self.copied_bytes)
        )?;
        writeln!(f, "{:<12} {:>8} {:>12}", "dtype", "tensors", "bytes")?;
        for r in &self.by_dtype {
            writeln!(
                f,
                "{:<12} {:>8} {:>12}",
                r.dtype,
                r.tensors,
                fmt_bytes(r.bytes)
            )?;
        }
        Ok(())
    }
}

/// Tensors on a device, by name, with the report of their load.
#[derive(Clone, Debug)]
pub struct LoadedWeights {
    tensors: Vec<(String, Buffer)>,
    index: HashMap<String, usize>,
    report: LoadReport,
}

impl LoadedWeights {
    /// The buffer of tensor `name`.
    pub fn get(&self, name: &str) -> Option<&Buffer> {
        self.index.get(name).map(|&i| &self.tensors[i].1)
    }

    /// Name and buffer of every loaded tensor, in file order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Buffer)> {
        self.tensors.iter().map(|(n, b)| (n.as_str(), b))
    }

    /// Tensors loaded.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether nothing was loaded.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// What the load did and how fast.
    pub fn report(&self) -> &LoadReport {
        &self.report
    }

    /// The buffers by name.
    pub fn into_buffers(self) -> Vec<(String, Buffer)> {
        self.tensors
    }
}

impl WeightsFile {
    /// Loads the `selection` onto `dev` with the default options; `queue` (of `dev`) carries
    /// the copies (a queue of its own, `dev.new_queue("weights")`, lets them overlap other
    /// work). Returns once the data is on the device.
    #[track_caller]
    pub fn load(
        &self,
        dev: &Device,
        queue: &Queue,
        selection: &Selection,
    ) -> Result<LoadedWeights> {
        self.load_with(dev, queue, selection, &LoadOptions::default())
    }

    /// Loads the `selection` with `options`. See the [module docs](super) for the routes.
    ///
    /// Errors: `InvalidArgument` for a name the file lacks, `Io`/`Format` if the file cannot
    /// be read as validated, allocation errors; on error nothing stays allocated.
    #[track_caller]
    pub fn load_with(
        &self,
        dev: &Device,
        queue: &Queue,
        selection: &Selection,
        options: &LoadOptions,
    ) -> Result<LoadedWeights> {
        let location = CallSite::caller();
        if queue.device.id != dev.id() {
            return Err(Error::WrongDevice {
                what: "queue",
                expected: dev.id(),
                got: queue.device.id,
            });
        }
        let started = Instant::now();
        let chosen = self.select(selection)?;
        let route = match options.route {
            Route::Auto if dev.info().unified_memory => Route::ZeroCopy,
            Route::Auto => Route::Staged,
            r => r,
        };
        let mut report = LoadReport {
            route,
            tensors: chosen.len(),
            bytes: chosen.iter().map(|t| t.byte_len()).sum(),
            copied_bytes: 0,
            copied_tensors: 0,
            allocations: 0,
            readers: 0,
            seconds: 0.0,
            by_dtype: by_dtype(&chosen),
        };
        let progress = options.progress.clone();
        let tick = |b: u64| {
            if let Some(p) = &progress {
                p(b);
            }
        };
        let buffers = match route {
            Route::Staged => {
                self.load_staged(dev, queue, &chosen, options, location, &tick, &mut report)?
            }
            _ => self.load_zero_copy(dev, queue, &chosen, &tick, &mut report)?,
        };
        report.seconds = started.elapsed().as_secs_f64();
        let index = buffers
            .iter()
            .enumerate()
            .map(|(i, (n, _))| (n.clone(), i))
            .collect();
        Ok(LoadedWeights {
            tensors: buffers,
            index,
            report,
        })
    }

    /// The selected tensors in file order.
    fn select(&self, selection: &Selection) -> Result<Vec<&TensorInfo>> {
        Ok(match selection {
            Selection::All => self.tensors().iter().collect(),
            Selection::Prefix(p) => self
                .tensors()
                .iter()
                .filter(|t| t.name.starts_with(p.as_str()))
                .collect(),
            Selection::Names(names) => {
                let mut want = HashSet::with_capacity(names.len());
                for n in names {
                    if self.tensor(n).is_none() {
                        return Err(Error::invalid(
                            "selection",
                            format!(
                                "tensor '{}' is not in {} ({} tensors)",
                                n.escape_debug(),
                                self.shown(),
                                self.tensors().len()
                            ),
                        ));
                    }
                    want.insert(n.as_str());
                }
                self.tensors()
                    .iter()
                    .filter(|t| want.contains(t.name.as_str()))
                    .collect()
            }
        })
    }

    /// Views of the mapped file; misaligned tensors copied.
    fn load_zero_copy(
        &self,
        dev: &Device,
        queue: &Queue,
        chosen: &[&TensorInfo],
        tick: &(dyn Fn(u64) + Sync),
        report: &mut LoadReport,
    ) -> Result<Vec<(String, Buffer)>> {
        let map = self.map()?;
        let len = map.len();
        let whole = dev.wrap_external(
            &format!("weights {}", self.shown()),
            map.clone(),
            DType::U8,
            &[len],
        )?;
        report.allocations = 1;
        let mut out = Vec::with_capacity(chosen.len());
        for t in chosen {
            let (start, end) = (t.range.start as usize, t.range.end as usize);
            // The mapping starts on a page, so file offsets and addresses align alike.
            let aligned = start % t.dtype.size() == 0 || start == end;
            let at = if start == end { 0 } else { start };
            let b = if aligned {
                whole
                    .slice(at..at + (end - start))?
                    .cast(t.dtype)?
                    .reshape(&t.shape)?
            } else {
                // A view would start at an address that is not a multiple of the element
                // size: kernels (and host reads as `&[T]`) need aligned elements, so copy.
                let b = dev.alloc_labelled(&t.name, t.dtype, &t.shape, StorageMode::Auto)?;
                let bytes = b.cast(DType::U8)?.reshape(&[end - start])?;
                queue.upload(&bytes, &map[start..end])?;
                report.copied_bytes += (end - start) as u64;
                report.copied_tensors += 1;
                report.allocations += 1;
                b
            };
            tick(t.byte_len());
            out.push((t.name.clone(), b));
        }
        Ok(out)
    }

    /// Packs the tensors into groups, reads them into staging chunks on several threads and
    /// copies each chunk into its group on `queue`.
    #[allow(clippy::too_many_arguments)]
    fn load_staged(
        &self,
        dev: &Device,
        queue: &Queue,
        chosen: &[&TensorInfo],
        options: &LoadOptions,
        location: CallSite,
        tick: &(dyn Fn(u64) + Sync),
        report: &mut LoadReport,
    ) -> Result<Vec<(String, Buffer)>> {
        let plan = pack(chosen, options.group_bytes.max(TENSOR_ALIGN));
        let mut groups = Vec::with_capacity(plan.groups.len());
        for (g, used) in plan.groups.iter().enumerate() {
            let label = format!("weights {} [{g}]", self.shown());
            groups.push(dev.alloc_labelled(
                &label,
                DType::U8,
                &[(*used).max(1)],
                StorageMode::Private,
            )?);
        }
        report.allocations = groups.len();
        // Pieces of at most one staging chunk, each within one group; a piece may hold the end
        // of one tensor and the start of the next (and the padding between, left unwritten).
        let step = queue.stream_piece_bytes();
        let mut pieces = Vec::new();
        for (g, used) in plan.groups.iter().enumerate() {
            for at in (0..*used).step_by(step) {
                pieces.push(StreamPiece {
                    dst: &groups[g],
                    offset: at,
                    len: step.min(used - at),
                });
            }
        }
        // For each piece, the tensors it overlaps: those of its group, sorted by offset.
        let mut by_group: Vec<Vec<usize>> = vec![Vec::new(); groups.len()];
        for (i, p) in plan.places.iter().enumerate() {
            by_group[p.group].push(i);
        }
        let piece_group: Vec<usize> = plan
            .groups
            .iter()
            .enumerate()
            .flat_map(|(g, used)| std::iter::repeat_n(g, used.div_ceil(step)))
            .collect();
        let shown = self.shown();
        let file = self.file();
        let fill = |i: usize, chunk: &mut [u8]| -> Result<()> {
            let p = &pieces[i];
            let (lo, hi) = (p.offset, p.offset + p.len);
            let members = &by_group[piece_group[i]];
            // The first tensor that ends after `lo`.
            let first = members.partition_point(|&k| {
                let pl = &plan.places[k];
                pl.offset + chosen[k].byte_len() as usize <= lo
            });
            for &k in &members[first..] {
                let pl = &plan.places[k];
                let t = chosen[k];
                let (ts, te) = (pl.offset, pl.offset + t.byte_len() as usize);
                if ts >= hi {
                    break;
                }
                let (s, e) = (ts.max(lo), te.min(hi));
                if s < e {
                    read_exact_at(
                        file,
                        &mut chunk[s - lo..e - lo],
                        t.range.start + (s - ts) as u64,
                        &shown,
                        &format!("tensor '{}'", t.name.escape_debug()),
                    )?;
                }
            }
            Ok(())
        };
        let readers = if options.readers == 0 {
            std::thread::available_parallelism().map_or(4, |n| n.get().min(16))
        } else {
            options.readers
        };
        report.readers = readers;
        let fence = queue.stream_in(&pieces, readers, location, &fill, tick)?;
        dev.wait(fence)?;
        report.copied_bytes = report.bytes;
        let mut out = Vec::with_capacity(chosen.len());
        for (t, pl) in chosen.iter().zip(&plan.places) {
            let n = t.byte_len() as usize;
            let b = groups[pl.group]
                .slice(pl.offset..pl.offset + n)?
                .cast(t.dtype)?
                .reshape(&t.shape)?;
            out.push((t.name.clone(), b));
        }
        Ok(out)
    }
}

/// Where one tensor goes: its group and its byte offset there.
struct Place {
    group: usize,
    offset: usize,
}

/// The packing of tensors into groups.
struct Plan {
    /// Per tensor (in the order given).
    places: Vec<Place>,
    /// Bytes used per group.
    groups: Vec<usize>,
}

/// Packs tensors (in file order) into groups of at most `group_bytes`, each at a multiple of
/// [`TENSOR_ALIGN`]; a tensor larger than a group gets one of its own.
fn pack(tensors: &[&TensorInfo], group_bytes: usize) -> Plan {
    let mut places = Vec::with_capacity(tensors.len());
    let mut groups: Vec<usize> = Vec::new();
    for t in tensors {
        let n = t.byte_len() as usize;
        let at = groups.last().map(|u| u.next_multiple_of(TENSOR_ALIGN));
        let fits = at.is_some_and(|a| a + n <= group_bytes);
        if !fits {
            groups.push(0);
        }
        let g = groups.len() - 1;
        let offset = if fits { at.unwrap_or(0) } else { 0 };
        groups[g] = offset + n;
        places.push(Place { group: g, offset });
    }
    Plan { places, groups }
}

fn by_dtype(chosen: &[&TensorInfo]) -> Vec<DTypeRow> {
    let mut m: BTreeMap<&str, (usize, u64)> = BTreeMap::new();
    for t in chosen {
        let e = m.entry(t.file_dtype.as_str()).or_default();
        e.0 += 1;
        e.1 += t.byte_len();
    }
    let mut rows: Vec<DTypeRow> = m
        .into_iter()
        .map(|(d, (n, b))| DTypeRow {
            dtype: d.to_owned(),
            tensors: n,
            bytes: b,
        })
        .collect();
    rows.sort_by(|a, b| b.bytes.cmp(&a.bytes).then_with(|| a.dtype.cmp(&b.dtype)));
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(bytes: u64) -> TensorInfo {
        TensorInfo {
            name: String::new(),
            dtype: DType::U8,
            shape: vec![bytes as usize],
            file_dtype: "U8".to_owned(),
            file_shape: vec![bytes as usize],
            range: 0..bytes,
        }
    }

    #[test]
    fn packing_aligns_and_splits_groups() {
        let ts: Vec<TensorInfo> = [10u64, 300, 0, 700, 2000, 5]
            .into_iter()
            .map(info)
            .collect();
        let refs: Vec<&TensorInfo> = ts.iter().collect();
        let p = pack(&refs, 1024);
        let at: Vec<(usize, usize)> = p.places.iter().map(|p| (p.group, p.offset)).collect();
        assert_eq!(at, [(0, 0), (0, 256), (0, 768), (1, 0), (2, 0), (3, 0)]);
        assert_eq!(p.groups, [768, 700, 2000, 5]);
        for pl in &p.places {
            assert_eq!(pl.offset % TENSOR_ALIGN, 0);
        }
    }
}
