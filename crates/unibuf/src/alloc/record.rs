//! Recording allocation traces: every allocation and free a device's caching allocator serves,
//! written as it happens in the CSV format that [`Trace`](super::Trace) reads
//! (`action,addr,size,stream`), so that an engine's own pattern can be replayed against the
//! allocator's policy (`unibuf replay`) without the engine.

use crate::error::{Error, Result};
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// What a finished recording holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceSummary {
    /// The file written.
    pub path: PathBuf,
    /// `alloc` lines written.
    pub allocs: u64,
    /// `free` lines written.
    pub frees: u64,
    /// The most bytes live at once among the recorded blocks, as requested.
    pub peak_live_bytes: usize,
    /// Recorded blocks still live when the recording finished (the trace ends with them
    /// allocated, which a replay accepts).
    pub live_at_end: usize,
}

/// The file being written: plain CSV, or gzip when the name ends in `.gz` (a decode run
/// allocates millions of times; the shared traces are stored compressed too).
enum Sink {
    Plain(BufWriter<File>),
    Gzip(flate2::write::GzEncoder<BufWriter<File>>),
}

impl Sink {
    fn writer(&mut self) -> &mut dyn Write {
        match self {
            Sink::Plain(w) => w,
            Sink::Gzip(w) => w,
        }
    }

    /// Flushes everything, the gzip trailer included.
    fn finish(self) -> std::io::Result<()> {
        match self {
            Sink::Plain(mut w) => w.flush(),
            Sink::Gzip(w) => w.finish()?.flush(),
        }
    }
}

/// Writes allocation events to a trace file as they happen, under the allocator's lock.
///
/// Blocks allocated before the recording started are not in it: their frees are left out, so
/// that the file is a valid trace on its own. Write errors do not fail the allocations being
/// recorded; the first one is kept and returned by [`TraceRecorder::finish`]. Dropped without
/// `finish` (a device dropped while recording), the file is flushed then and errors go
/// unreported.
pub(crate) struct TraceRecorder {
    sink: Sink,
    path: PathBuf,
    /// Recorded blocks still live, by address, with their requested sizes.
    live: HashMap<u64, usize>,
    live_bytes: usize,
    peak_live_bytes: usize,
    allocs: u64,
    frees: u64,
    error: Option<std::io::Error>,
}

impl TraceRecorder {
    /// Creates `path` (gzip-compressed when its name ends in `.gz`) and writes the header.
    pub fn create(path: &Path) -> Result<TraceRecorder> {
        let what = || format!("allocation trace {}", path.display());
        let file = File::create(path).map_err(|e| Error::io(what(), e))?;
        let file = BufWriter::with_capacity(1 << 16, file);
        let gzip = path.extension().is_some_and(|e| e == "gz");
        let mut sink = if gzip {
            Sink::Gzip(flate2::write::GzEncoder::new(
                file,
                flate2::Compression::fast(),
            ))
        } else {
            Sink::Plain(file)
        };
        writeln!(sink.writer(), "action,addr,size,stream").map_err(|e| Error::io(what(), e))?;
        Ok(TraceRecorder {
            sink,
            path: path.to_owned(),
            live: HashMap::new(),
            live_bytes: 0,
            peak_live_bytes: 0,
            allocs: 0,
            frees: 0,
            error: None,
        })
    }

    /// The file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records the allocation of `size` requested bytes at `addr`. unibuf's buffers are not
    /// allocated on a queue (a freed block's fences say where it may be reused), so the
    /// stream column is 0.
    pub fn alloc(&mut self, addr: u64, size: usize) {
        let previous = self.live.insert(addr, size);
        debug_assert!(previous.is_none(), "two live blocks at {addr:#x}");
        self.live_bytes += size;
        self.peak_live_bytes = self.peak_live_bytes.max(self.live_bytes);
        self.allocs += 1;
        self.write(format_args!("alloc,{addr},{size},0"));
    }

    /// Records the free of the block at `addr`, if its allocation was recorded.
    pub fn free(&mut self, addr: u64) {
        let Some(size) = self.live.remove(&addr) else {
            return;
        };
        self.live_bytes -= size;
        self.frees += 1;
        self.write(format_args!("free,{addr},{size},0"));
    }

    fn write(&mut self, line: std::fmt::Arguments<'_>) {
        if self.error.is_none() {
            if let Err(e) = writeln!(self.sink.writer(), "{line}") {
                self.error = Some(e);
            }
        }
    }

    /// Flushes the file and says what it holds; the first write error, if any, instead.
    pub fn finish(self) -> Result<TraceSummary> {
        let what = format!("allocation trace {}", self.path.display());
        if let Some(e) = self.error {
            return Err(Error::io(what, e));
        }
        self.sink.finish().map_err(|e| Error::io(what, e))?;
        Ok(TraceSummary {
            path: self.path,
            allocs: self.allocs,
            frees: self.frees,
            peak_live_bytes: self.peak_live_bytes,
            live_at_end: self.live.len(),
        })
    }
}

impl std::fmt::Debug for TraceRecorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TraceRecorder")
            .field("path", &self.path)
            .field("allocs", &self.allocs)
            .field("frees", &self.frees)
            .finish()
    }
}
