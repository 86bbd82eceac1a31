//! Parallel host copies for staging.
//!
//! One thread's memcpy between pageable and pinned memory runs at 10–20 GB/s, well below what a
//! PCIe Gen5 copy engine moves (about 55 GB/s). Each staging chunk is therefore split across a
//! small pool of persistent threads (spawning per chunk would cost more than the copy of a few
//! MiB). Written by hand because the job is one fork-join over raw ranges, which a general
//! thread-pool dependency would not make simpler.

use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

/// Below this, one thread copies alone: waking helpers costs more than it saves.
const PARALLEL_MIN: usize = 1 << 20;
/// The smallest piece a helper gets.
const PIECE_MIN: usize = 512 << 10;

/// Counts outstanding pieces; the caller sleeps until it reaches zero.
struct Latch {
    remaining: Mutex<usize>,
    zero: Condvar,
}

impl Latch {
    fn done(&self) {
        let mut r = self.remaining.lock().unwrap_or_else(|e| e.into_inner());
        *r -= 1;
        if *r == 0 {
            self.zero.notify_all();
        }
    }
    fn wait(&self) {
        let mut r = self.remaining.lock().unwrap_or_else(|e| e.into_inner());
        while *r > 0 {
            r = self.zero.wait(r).unwrap_or_else(|e| e.into_inner());
        }
    }
}

struct Piece {
    src: usize,
    dst: usize,
    len: usize,
    latch: Arc<Latch>,
}

/// A fixed set of copy threads.
pub(crate) struct HostCopyPool {
    senders: Vec<Mutex<Sender<Piece>>>,
    threads: Vec<JoinHandle<()>>,
}

impl HostCopyPool {
    /// A pool with `helpers` threads besides the caller's (0: every copy is done inline).
    pub fn new(helpers: usize) -> HostCopyPool {
        let mut senders = Vec::new();
        let mut threads = Vec::new();
        for i in 0..helpers {
            let (tx, rx) = channel::<Piece>();
            let spawned = std::thread::Builder::new()
                .name(format!("unibuf-copy-{i}"))
                .spawn(move || {
                    for p in rx {
                        // SAFETY: `copy` blocks until every piece is done, so both ranges stay
                        // valid; they do not overlap (the caller's contract).
                        unsafe {
                            std::ptr::copy_nonoverlapping(
                                p.src as *const u8,
                                p.dst as *mut u8,
                                p.len,
                            )
                        };
                        p.latch.done();
                    }
                });
            match spawned {
                Ok(t) => {
                    senders.push(Mutex::new(tx));
                    threads.push(t);
                }
                // Fewer helpers only means slower copies.
                Err(_) => break,
            }
        }
        HostCopyPool { senders, threads }
    }

    /// The pool size for this machine: up to 8 threads in all, leaving a core for the caller's
    /// other work.
    pub fn for_this_machine() -> HostCopyPool {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        HostCopyPool::new(cores.saturating_sub(1).min(7))
    }

    /// Copies `len` bytes from `src` to `dst`, split across the pool.
    ///
    /// # Safety
    /// `src` is valid for reads and `dst` for writes of `len` bytes, and they do not overlap.
    pub unsafe fn copy(&self, dst: *mut u8, src: *const u8, len: usize) {
        let parts = (len / PIECE_MIN).min(self.senders.len() + 1);
        if len < PARALLEL_MIN || parts < 2 {
            // SAFETY: the caller's contract.
            unsafe { std::ptr::copy_nonoverlapping(src, dst, len) };
            return;
        }
        // Pieces of equal size rounded to cache lines; the caller takes the first.
        let piece = len.div_ceil(parts).next_multiple_of(64);
        let latch = Arc::new(Latch {
            remaining: Mutex::new(0),
            zero: Condvar::new(),
        });
        let mut sent = 0;
        let mut at = piece;
        for tx in &self.senders {
            if at >= len {
                break;
            }
            let n = piece.min(len - at);
            *latch.remaining.lock().unwrap_or_else(|e| e.into_inner()) += 1;
            let p = Piece {
                src: src as usize + at,
                dst: dst as usize + at,
                len: n,
                latch: latch.clone(),
            };
            if tx
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .send(p)
                .is_err()
            {
                // A helper is gone: copy its piece here.
                // SAFETY: the caller's contract covers every sub-range.
                unsafe { std::ptr::copy_nonoverlapping(src.add(at), dst.add(at), n) };
                latch.done();
            }
            sent += 1;
            at += n;
        }
        // SAFETY: the caller's contract; the first piece and any remainder are ours.
        unsafe { std::ptr::copy_nonoverlapping(src, dst, piece.min(len)) };
        if at < len {
            // SAFETY: as above.
            unsafe { std::ptr::copy_nonoverlapping(src.add(at), dst.add(at), len - at) };
        }
        if sent > 0 {
            latch.wait();
        }
    }
}

impl Drop for HostCopyPool {
    fn drop(&mut self) {
        self.senders.clear();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parallel_copies_are_exact_at_odd_sizes() {
        for helpers in [0, 1, 3] {
            let pool = HostCopyPool::new(helpers);
            for len in [
                0usize,
                1,
                4095,
                PARALLEL_MIN - 1,
                PARALLEL_MIN,
                3 * PARALLEL_MIN + 17,
            ] {
                let src: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8).collect();
                let mut dst = vec![0xA5u8; len + 1];
                // SAFETY: both buffers hold at least `len` bytes and are distinct.
                unsafe { pool.copy(dst.as_mut_ptr(), src.as_ptr(), len) };
                assert_eq!(&dst[..len], &src[..], "{helpers} helpers, {len} bytes");
                assert_eq!(dst[len], 0xA5, "wrote past the end");
            }
        }
    }
}
