//! Streaming host data into device memory: several threads fill staging chunks straight from
//! their source (a file read with `pread`, say) and each full chunk is copied to its
//! destination on the queue at once, so that filling the next chunks overlaps the copies.
//!
//! `upload` needs the bytes in memory already and copies them into staging once more; a
//! weights file read this way crosses host memory once (page cache into the pinned chunk) and
//! the bus once. The threads are scoped to the call: `pread` blocks in the kernel, which the
//! host-copy pool's memcpy threads must not do, and a few thread spawns are nothing next to a
//! transfer of gigabytes.

use super::{Audit, Route};
use crate::backend::Command;
use crate::buffer::Buffer;
use crate::device::{Completion, Use};
use crate::epoch::{Access, Fence};
use crate::error::{check_range, Error, Result};
use crate::ledger::CallSite;
use crate::ledger::Direction;
use crate::queue::Queue;
use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// One piece of a stream: `len` bytes (at most a staging chunk) for `dst` at byte `offset` of
/// the view.
pub(crate) struct StreamPiece<'a> {
    pub dst: &'a Buffer,
    pub offset: usize,
    pub len: usize,
}

/// Fills a piece's bytes: called with the piece's index and a slice of exactly its length.
pub(crate) type Fill<'f> = dyn Fn(usize, &mut [u8]) -> Result<()> + Sync + 'f;

impl Queue {
    /// Bytes one stream piece may carry: the staging chunk size.
    pub(crate) fn stream_piece_bytes(&self) -> usize {
        self.device.staging.chunk_bytes()
    }

    /// Streams `pieces` into their destinations: `threads` threads each take the next piece,
    /// check a staging chunk out, run `fill` on it and submit the chunk's copy on this queue.
    /// `progress` is told the bytes of each piece once its copy is submitted. One ledger record
    /// per piece, with `location` as the call site.
    ///
    /// Returns the fence of the last copy submitted: every copy is on this queue, which runs
    /// in order, so it completes after all of them. On error the first error is returned once
    /// every thread stopped; copies already submitted still complete, and the destinations
    /// stay alive for them through their recorded fences.
    pub(crate) fn stream_in(
        &self,
        pieces: &[StreamPiece<'_>],
        threads: usize,
        location: CallSite,
        fill: &Fill<'_>,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<Fence> {
        self.device.check_fault()?;
        let dev = &self.device;
        let chunk = dev.staging.chunk_bytes();
        for p in pieces {
            self.check_buffer("stream destination", p.dst)?;
            if p.len > chunk {
                return Err(Error::invalid(
                    "stream piece",
                    format!("{} bytes exceed the staging chunk of {chunk} bytes", p.len),
                ));
            }
            check_range("stream piece", p.offset, p.len, p.dst.byte_len())?;
        }
        // A thread holds one chunk at a time, so more threads than chunks would only wait.
        let threads = threads
            .clamp(1, (dev.staging.depth() * 2).max(1))
            .min(pieces.len().max(1));
        let next = AtomicUsize::new(0);
        let stop = AtomicBool::new(false);
        let first_error: Mutex<Option<Error>> = Mutex::new(None);
        let last: Mutex<Fence> = Mutex::new(self.done_fence());
        let fail = |e: Error| {
            stop.store(true, Ordering::Relaxed);
            first_error.lock().get_or_insert(e);
        };
        let worker = || {
            while !stop.load(Ordering::Relaxed) {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(p) = pieces.get(i) else { break };
                match self.stream_piece(i, p, location, fill) {
                    Ok(fence) => {
                        let mut l = last.lock();
                        if fence.epoch > l.epoch {
                            *l = fence;
                        }
                        drop(l);
                        progress(p.len as u64);
                    }
                    Err(e) => fail(e),
                }
            }
        };
        std::thread::scope(|s| {
            for _ in 1..threads {
                s.spawn(worker);
            }
            worker();
        });
        if let Some(e) = first_error.into_inner() {
            return Err(e);
        }
        Ok(last.into_inner())
    }

    /// One piece: a chunk, its fill, its copy, its ledger record.
    fn stream_piece(
        &self,
        index: usize,
        p: &StreamPiece<'_>,
        location: CallSite,
        fill: &Fill<'_>,
    ) -> Result<Fence> {
        let dev = &self.device;
        let audit = Audit {
            direction: Direction::HostToDevice,
            src: None,
            dst: Some(p.dst.mode()),
            bytes: p.len,
            site: location,
            started: dev.ledger.now_ns(),
        };
        if p.len == 0 {
            return Ok(self.done_fence());
        }
        // This thread holds no chunk here, so it may wait for one.
        let chunk = dev.staging.take(&*dev.backend)?;
        // SAFETY: the chunk is checked out to this thread alone, host-visible, at least
        // chunk_bytes >= p.len long (checked in stream_in), and the copy that last used it has
        // completed (StagingPool::take); the slice is dropped before the chunk is put back.
        let host = unsafe { std::slice::from_raw_parts_mut(chunk.host(), p.len) };
        if let Err(e) = fill(index, host) {
            dev.staging.put(chunk, None);
            return Err(e);
        }
        let off = p.dst.byte_offset() + p.offset;
        let label = self.transfer_label(p.dst);
        let submitted = dev.submit(
            self.id(),
            label,
            "stream",
            &[Use {
                alloc: &p.dst.alloc,
                start: off,
                end: off + p.len,
                access: Access::Write,
            }],
            &[Command::Copy {
                src: chunk.range(p.len),
                dst: p.dst.alloc.range(off, p.len),
            }],
            Completion::Exact,
        );
        dev.staging.put(chunk, submitted.as_ref().ok().copied());
        let fence = submitted?;
        self.audit_end(audit, label, Route::Staged, fence);
        Ok(fence)
    }
}

#[cfg(test)]
mod tests {
    use crate::ledger::CallSite;
    use crate::{DType, Device, StorageMode};
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::StreamPiece;

    #[test]
    fn pieces_land_in_order_and_are_recorded() {
        let dev = Device::builder()
            .backend("cpu")
            .staging(4096, 3)
            .open()
            .unwrap();
        let q = dev.new_queue("stream").unwrap();
        let n = 4096 * 5 + 123;
        let dst = dev.alloc(DType::U8, &[n], StorageMode::Private).unwrap();
        let step = q.stream_piece_bytes();
        let pieces: Vec<_> = (0..n)
            .step_by(step)
            .map(|at| StreamPiece {
                dst: &dst,
                offset: at,
                len: step.min(n - at),
            })
            .collect();
        let done = AtomicU64::new(0);
        let fence = q
            .stream_in(
                &pieces,
                4,
                CallSite::caller(),
                &|i, b| {
                    for (j, x) in b.iter_mut().enumerate() {
                        *x = ((i * step + j) * 7 % 251) as u8;
                    }
                    Ok(())
                },
                &|b| {
                    done.fetch_add(b, Ordering::Relaxed);
                },
            )
            .unwrap();
        dev.wait(fence).unwrap();
        assert_eq!(done.load(Ordering::Relaxed), n as u64);
        let back = dst.to_vec::<u8>().unwrap();
        assert!(back
            .iter()
            .enumerate()
            .all(|(j, x)| *x == (j * 7 % 251) as u8));
        let staged = dev.ledger().total().staged_bytes;
        assert!(staged >= n as u64, "{staged}");
    }

    #[test]
    fn a_failed_fill_stops_the_stream_and_returns_its_error() {
        let dev = Device::builder()
            .backend("cpu")
            .staging(4096, 2)
            .open()
            .unwrap();
        let q = dev.queue();
        let dst = dev
            .alloc(DType::U8, &[4096 * 8], StorageMode::Private)
            .unwrap();
        let pieces: Vec<_> = (0..8)
            .map(|i| StreamPiece {
                dst: &dst,
                offset: i * 4096,
                len: 4096,
            })
            .collect();
        let e = q
            .stream_in(
                &pieces,
                2,
                CallSite::caller(),
                &|i, _| {
                    if i == 3 {
                        Err(crate::Error::invalid("fill", "boom"))
                    } else {
                        Ok(())
                    }
                },
                &|_| {},
            )
            .unwrap_err();
        assert!(e.to_string().contains("boom"));
        drop(dst);
        dev.drain().unwrap();
        assert_eq!(dev.memory_stats().active_bytes, 0);
    }
}
