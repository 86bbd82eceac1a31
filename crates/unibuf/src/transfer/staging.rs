//! The staging pool: host-visible chunks that carry bytes to and from Private memory.
//!
//! A chunk is reused only once the copy that last used it has completed (its fence). The pool
//! grows to `max_chunks`; past that, a transfer waits for the oldest chunk in flight, so a large
//! transfer streams through a bounded ring instead of allocating its own size in staging memory.

use super::host_copy::{HostCopyPool, Stores};
use crate::backend::{fence_retired, Backend, RawAlloc, RawRange};
use crate::epoch::Fence;
use crate::error::{Error, Result};
use crate::storage::MemoryKind;
use parking_lot::{Condvar, Mutex, MutexGuard};
use std::sync::OnceLock;

/// Sizes of the staging ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StagingConfig {
    /// Bytes per chunk.
    pub chunk_bytes: usize,
    /// Chunks at most.
    pub max_chunks: usize,
}

impl StagingConfig {
    /// The ring for a device: on a discrete GPU, chunks large enough that per-copy overheads
    /// vanish next to PCIe time and enough of them to keep the copy engine and the host copies
    /// busy at once; on unified memory staging only serves Private buffers, so a small ring.
    pub fn for_device(unified_memory: bool) -> StagingConfig {
        if unified_memory {
            StagingConfig {
                chunk_bytes: 4 << 20,
                max_chunks: 4,
            }
        } else {
            // Swept on an H100 host (PCIe Gen5) for 256 MiB and 1 GiB transfers: 16 MiB chunks
            // beat 8, 32 and 64 MiB; 16 of them keep both directions fed (256 MiB pinned).
            StagingConfig {
                chunk_bytes: 16 << 20,
                max_chunks: 16,
            }
        }
    }
}

struct Chunk {
    raw: RawAlloc,
    host: usize,
    /// The last copy that used it; `None` once known complete.
    fence: Option<Fence>,
    busy: bool,
    /// Order of last use, so waits go to the oldest chunk.
    used_at: u64,
}

/// A chunk checked out of the pool; give it back with [`StagingPool::put`].
pub(crate) struct StagingChunk {
    index: usize,
    raw_range: RawRange,
    host: *mut u8,
}

impl StagingChunk {
    pub fn range(&self, bytes: usize) -> RawRange {
        RawRange {
            bytes,
            ..self.raw_range
        }
    }
    pub fn host(&self) -> *mut u8 {
        self.host
    }
}

/// The ring's chunks, a use clock for oldest-first waits, and chunks being allocated.
struct Ring {
    chunks: Vec<Chunk>,
    clock: u64,
    growing: usize,
}

pub(crate) struct StagingPool {
    config: StagingConfig,
    chunks: Mutex<Ring>,
    /// Signalled when a chunk is returned or a growth attempt ends.
    returned: Condvar,
    /// Threads that split host copies into and out of chunks; started on first use.
    copier: OnceLock<HostCopyPool>,
    /// `UNIBUF_STAGING_UPLOAD_STORES` (`streaming` or `cached`): one way of filling chunks for
    /// every upload, for comparison; unset, `upload_stores` decides per upload.
    stores_override: Option<Stores>,
}

/// What a take does when every chunk is checked out by other transfers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WhenAllCheckedOut {
    /// Wait for one to come back (`take`: the caller holds no chunk).
    Wait,
    /// Return `None` (`try_take`: the caller holds chunks, and waiting could deadlock).
    ReturnNone,
}

enum Pick {
    Ready(usize),
    Wait(usize, Fence),
    Grow,
}

impl StagingPool {
    pub fn new(config: StagingConfig) -> StagingPool {
        StagingPool {
            config,
            chunks: Mutex::new(Ring {
                chunks: Vec::new(),
                clock: 0,
                growing: 0,
            }),
            returned: Condvar::new(),
            copier: OnceLock::new(),
            stores_override: match std::env::var("UNIBUF_STAGING_UPLOAD_STORES").as_deref() {
                Ok("streaming") => Some(Stores::Streaming),
                Ok("cached") => Some(Stores::Cached),
                _ => None,
            },
        }
    }

    /// Chunks a single transfer keeps in flight: half the ring, so that another transfer
    /// running at the same time still finds chunks.
    pub fn depth(&self) -> usize {
        (self.config.max_chunks / 2).max(1)
    }

    /// How an upload of `bytes` fills its chunks: the `UNIBUF_STAGING_UPLOAD_STORES` choice
    /// when set, else through the cache for a long upload (`is_long_upload`) and streaming
    /// otherwise.
    ///
    /// A long upload writes through the cache: from its second pass over the ring on, the
    /// chunks' lines are still in the last-level cache from the previous fill, so the stores
    /// cost no DRAM reads, and the copy engine reads much of each chunk from the cache too.
    /// Shorter uploads stream, since through the cache every store of a first fill reads its
    /// line from DRAM. Measured on H200 hosts (pageable→device, GB/s, streaming / cached):
    /// 1 GiB 39.5–43.2 / 42.4–52.6 (medians 41.8 / 51.1); 256 MiB 38.6–43.5 / 24.7–47.5, a
    /// wash; 16 MiB, one chunk, 22.9–30.5 / 13.4–18.4. Streaming the first pass and caching
    /// the rest was worse than either at 256 MiB (33.8–35.3): the refills then miss the cache.
    pub fn upload_stores(&self, bytes: usize) -> Stores {
        self.stores_override
            .unwrap_or(if self.is_long_upload(bytes) {
                Stores::Cached
            } else {
                Stores::Streaming
            })
    }

    /// Copies host memory into a chunk (an upload) with the copy threads, writing it with
    /// `stores` (`upload_stores`).
    ///
    /// # Safety
    /// `src` is valid for reads and `chunk` for writes of `len` bytes; they do not overlap.
    pub unsafe fn copy_into_chunk(
        &self,
        chunk: *mut u8,
        src: *const u8,
        len: usize,
        stores: Stores,
    ) {
        let pool = self.copier.get_or_init(HostCopyPool::for_this_machine);
        // SAFETY: the caller's contract.
        unsafe { pool.copy(chunk, src, len, stores) };
    }

    /// Copies a chunk out to host memory (a download) with the copy threads, bypassing the
    /// cache on the destination.
    ///
    /// # Safety
    /// `chunk` is valid for reads and `dst` for writes of `len` bytes; they do not overlap.
    pub unsafe fn copy_out_of_chunk(&self, dst: *mut u8, chunk: *const u8, len: usize) {
        let pool = self.copier.get_or_init(HostCopyPool::for_this_machine);
        // SAFETY: the caller's contract.
        unsafe { pool.copy(dst, chunk, len, Stores::Streaming) };
    }

    /// Whether an upload of `bytes` is long enough to fill through the cache
    /// (`copy_into_chunk`): at least two passes over the ring (an upload cycles through all of
    /// its chunks, waiting for the oldest), 512 MiB with the default ring of 16 × 16 MiB.
    pub fn is_long_upload(&self, bytes: usize) -> bool {
        bytes.div_ceil(self.config.chunk_bytes) >= 2 * self.config.max_chunks
    }

    pub fn chunk_bytes(&self) -> usize {
        self.config.chunk_bytes
    }

    fn lock(&self) -> MutexGuard<'_, Ring> {
        self.chunks.lock()
    }

    pub fn bytes(&self) -> usize {
        self.lock().chunks.iter().map(|c| c.raw.bytes).sum()
    }

    /// Checks out a chunk whose last copy has completed, growing the pool, waiting for the
    /// oldest chunk in flight, or, when every chunk is checked out by other transfers, waiting
    /// for one of them to come back.
    ///
    /// Only a caller that holds no chunk may wait (else two transfers could each hold chunks
    /// while waiting for the other's); callers holding chunks use `try_take`.
    pub fn take(&self, backend: &dyn Backend) -> Result<StagingChunk> {
        Ok(self
            .take_or_wait(backend, WhenAllCheckedOut::Wait)?
            .expect("a blocking take returns a chunk"))
    }

    /// As `take`, but `None` instead of waiting when every chunk is checked out.
    pub fn try_take(&self, backend: &dyn Backend) -> Result<Option<StagingChunk>> {
        self.take_or_wait(backend, WhenAllCheckedOut::ReturnNone)
    }

    fn take_or_wait(
        &self,
        backend: &dyn Backend,
        when_all_out: WhenAllCheckedOut,
    ) -> Result<Option<StagingChunk>> {
        let mut g = self.lock();
        loop {
            g.clock += 1;
            let clock = g.clock;
            let complete = |f: &Option<Fence>| f.is_none_or(|f| fence_retired(backend, f));
            let pick = if let Some(i) = g.chunks.iter().position(|c| !c.busy && complete(&c.fence))
            {
                Pick::Ready(i)
            } else if g.chunks.len() + g.growing < self.config.max_chunks {
                Pick::Grow
            } else if let Some((i, c)) = g
                .chunks
                .iter()
                .enumerate()
                .filter(|(_, c)| !c.busy)
                .min_by_key(|(_, c)| c.used_at)
            {
                Pick::Wait(i, c.fence.expect("incomplete chunks have a fence"))
            } else {
                // Every chunk is checked out by concurrent transfers: wait for one.
                if when_all_out == WhenAllCheckedOut::ReturnNone {
                    return Ok(None);
                }
                self.returned.wait(&mut g);
                continue;
            };
            match pick {
                Pick::Ready(i) => {
                    g.chunks[i].busy = true;
                    g.chunks[i].used_at = clock;
                    return Ok(Some(checkout(&g.chunks, i)));
                }
                Pick::Wait(i, fence) => {
                    g.chunks[i].busy = true;
                    g.chunks[i].used_at = clock;
                    let chunk = checkout(&g.chunks, i);
                    drop(g);
                    // A failed copy leaves nothing in flight: the chunk is free either way, and
                    // the fault surfaces on the transfer that owns that fence.
                    let _ = backend.wait(fence.queue, fence.epoch);
                    return Ok(Some(chunk));
                }
                Pick::Grow => {
                    g.growing += 1;
                    drop(g);
                    let grown = self.grow(backend);
                    g = self.lock();
                    g.growing -= 1;
                    self.returned.notify_all();
                    let chunk = grown?;
                    g.chunks.push(Chunk {
                        busy: true,
                        used_at: clock,
                        ..chunk
                    });
                    return Ok(Some(checkout(&g.chunks, g.chunks.len() - 1)));
                }
            }
        }
    }

    /// Allocates one chunk (outside the lock: it can take milliseconds on a GPU).
    fn grow(&self, backend: &dyn Backend) -> Result<Chunk> {
        // SAFETY: HostShared memory, released only in `trim` once idle.
        let raw = unsafe { backend.allocate(MemoryKind::HostShared, self.config.chunk_bytes)? };
        let Some(host) = backend.host_ptr(&raw) else {
            // SAFETY: just allocated, never used.
            unsafe { backend.release(raw) };
            return Err(Error::Unsupported {
                backend: backend.info().backend,
                what: "host-visible staging memory".to_owned(),
            });
        };
        Ok(Chunk {
            raw,
            host: host.as_ptr() as usize,
            fence: None,
            busy: false,
            used_at: 0,
        })
    }

    /// Returns a chunk; `fence` is the copy that still uses it, if any.
    pub fn put(&self, chunk: StagingChunk, fence: Option<Fence>) {
        let mut g = self.lock();
        let c = &mut g.chunks[chunk.index];
        c.busy = false;
        c.fence = fence.filter(|f| f.epoch != 0);
        self.returned.notify_one();
    }

    /// Releases every chunk, waiting for copies still using them; returns bytes released.
    /// Does nothing while a transfer has a chunk checked out, since chunks are found by index.
    pub fn trim(&self, backend: &dyn Backend) -> usize {
        let mut g = self.lock();
        if g.growing > 0 || g.chunks.iter().any(|c| c.busy) {
            return 0;
        }
        let mut released = 0;
        for c in std::mem::take(&mut g.chunks) {
            if let Some(f) = c.fence {
                let _ = backend.wait(f.queue, f.epoch);
            }
            released += c.raw.bytes;
            // SAFETY: the chunk is idle and its last copy completed (waited above).
            unsafe { backend.release(c.raw) };
        }
        released
    }
}

/// The handle of chunk `i`.
fn checkout(chunks: &[Chunk], i: usize) -> StagingChunk {
    let c = &chunks[i];
    StagingChunk {
        index: i,
        raw_range: c.raw.range(0, c.raw.bytes),
        host: c.host as *mut u8,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uploads_of_two_passes_over_the_ring_are_long() {
        // A ring of 4 chunks: long from 8 chunks on.
        let pool = StagingPool::new(StagingConfig {
            chunk_bytes: 1 << 20,
            max_chunks: 4,
        });
        for (bytes, long) in [
            (0, false),
            (1, false),
            (7 << 20, false),
            ((7 << 20) + 1, true),
            (8 << 20, true),
            (1 << 30, true),
        ] {
            assert_eq!(pool.is_long_upload(bytes), long, "{bytes} bytes");
        }
        let default = StagingPool::new(StagingConfig::for_device(false));
        assert!(!default.is_long_upload(256 << 20) && default.is_long_upload(1 << 30));
    }
}
