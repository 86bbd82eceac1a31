//! The handle registry: how opaque C handles name Rust objects soundly.
//!
//! # Design
//! A handle (`ub_buffer*`, `ub_device*`, ...) is **not** a pointer to memory. It is a 64-bit
//! value `[generation: 32 | kind: 8 | slot + 1: 24]` that the library never dereferences; the
//! C types are opaque so that C code cannot either. Each kind of object has a `Registry`: a
//! table of slots, each holding the object (behind an `Arc`) and the slot's generation.
//!
//! - **Lookup** locks the table, checks the kind tag, the slot index and the generation, and
//!   clones the `Arc`; the call then runs with the lock released, so a long transfer on one
//!   thread does not block another thread's calls.
//! - **Release** checks the same, takes the object out, bumps the slot's generation and puts
//!   the slot on the free list. The object is dropped after the lock is released (dropping a
//!   device may wait for its queues).
//! - **A double release, or any use after release,** finds the slot's generation moved on (or
//!   the slot empty) and returns `UB_STATUS_INVALID_HANDLE` naming the handle, the slot and
//!   both generations. No freed memory is ever read: the check reads only the table, which is
//!   never freed (it is a `static`). The same holds for a forged or garbage handle (an index
//!   past the table, a wrong kind tag) and for a handle of another kind passed by a cast.
//! - A slot whose generation would wrap is retired (never reused), so a stale handle can never
//!   name a later object, however long the program runs.
//! - `NULL` (0) is never issued: generations start at 1. Releasing NULL is a no-op; passing
//!   NULL where an object is needed is `UB_STATUS_NULL_POINTER`.
//!
//! Because lookups clone an `Arc`, an object released on one thread while another thread is
//! inside a call with it stays alive until that call returns. The handle is dead from the
//! release on.
//!
//! The encoding assumes 64-bit pointers (checked at compile time below).

use crate::error::{ub_status, CResult, Failure};
use parking_lot::{Mutex, MutexGuard};
use std::sync::Arc;

#[cfg(not(target_pointer_width = "64"))]
compile_error!("unibuf-capi encodes handles in 64-bit pointers: 32-bit targets are not supported");

/// Bits of the slot index (plus one) in a handle.
const INDEX_BITS: u32 = 24;
/// Bits of the kind tag.
const KIND_BITS: u32 = 8;
/// Slots per kind at most: about 16.7 million live handles of one kind.
const MAX_SLOTS: usize = (1 << INDEX_BITS) - 1;

/// What a handle names. The tag is part of the handle, so that a buffer handle passed where
/// a queue handle belongs is reported as such.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Kind {
    Device = 1,
    Queue = 2,
    Buffer = 3,
    Mapping = 4,
    Download = 5,
    Weights = 6,
    Loaded = 7,
    HostSignal = 8,
    GgmlMatrix = 9,
    LaunchBatch = 10,
}

impl Kind {
    const ALL: [Kind; 10] = [
        Kind::Device,
        Kind::Queue,
        Kind::Buffer,
        Kind::Mapping,
        Kind::Download,
        Kind::Weights,
        Kind::Loaded,
        Kind::HostSignal,
        Kind::GgmlMatrix,
        Kind::LaunchBatch,
    ];

    /// The C type's name, for messages.
    pub const fn name(self) -> &'static str {
        match self {
            Kind::Device => "ub_device",
            Kind::Queue => "ub_queue",
            Kind::Buffer => "ub_buffer",
            Kind::Mapping => "ub_mapping",
            Kind::Download => "ub_download",
            Kind::Weights => "ub_weights",
            Kind::Loaded => "ub_loaded_weights",
            Kind::HostSignal => "ub_host_signal",
            Kind::GgmlMatrix => "ub_ggml_matrix",
            Kind::LaunchBatch => "ub_launch_batch",
        }
    }

    fn from_tag(tag: u64) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| *k as u64 == tag)
    }
}

/// One slot: its current generation and, while a handle of that generation is live, the
/// object.
struct Slot<T> {
    generation: u32,
    value: Option<Arc<T>>,
}

struct Table<T> {
    slots: Vec<Slot<T>>,
    /// Empty slots that may be reused (retired slots are never listed).
    free: Vec<u32>,
    live: usize,
}

/// The live objects of one kind, named by handles. Used as a `static`: never freed.
pub(crate) struct Registry<T> {
    kind: Kind,
    table: Mutex<Table<T>>,
}

/// A handle's fields.
#[derive(Clone, Copy, Debug)]
struct Decoded {
    generation: u32,
    tag: u64,
    index: usize,
}

fn decode(h: usize) -> Option<Decoded> {
    let h = h as u64;
    let slot_plus_one = h & ((1 << INDEX_BITS) - 1);
    if slot_plus_one == 0 {
        return None;
    }
    Some(Decoded {
        generation: (h >> (INDEX_BITS + KIND_BITS)) as u32,
        tag: (h >> INDEX_BITS) & ((1 << KIND_BITS) - 1),
        index: slot_plus_one as usize - 1,
    })
}

fn encode(kind: Kind, index: usize, generation: u32) -> usize {
    ((u64::from(generation) << (INDEX_BITS + KIND_BITS))
        | ((kind as u64) << INDEX_BITS)
        | (index as u64 + 1)) as usize
}

impl<T> Registry<T> {
    /// An empty registry for `kind`.
    pub const fn new(kind: Kind) -> Registry<T> {
        Registry {
            kind,
            table: Mutex::new(Table {
                slots: Vec::new(),
                free: Vec::new(),
                live: 0,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Table<T>> {
        // parking_lot's lock does not poison: nothing panics while it is held (only Vec
        // pushes, which abort on OOM), and every update is a single assignment.
        self.table.lock()
    }

    /// Registers `value` and returns its handle.
    pub fn insert(&self, value: T) -> CResult<usize> {
        let value = Arc::new(value);
        let mut t = self.lock();
        let index = match t.free.pop() {
            Some(i) => i as usize,
            None => {
                if t.slots.len() >= MAX_SLOTS {
                    return Err(Failure::new(
                        ub_status::UB_STATUS_OUT_OF_MEMORY,
                        format!(
                            "the {} table is full: {MAX_SLOTS} handles are live or retired; \
                             release some",
                            self.kind.name()
                        ),
                    ));
                }
                t.slots.push(Slot {
                    generation: 1,
                    value: None,
                });
                t.slots.len() - 1
            }
        };
        let slot = &mut t.slots[index];
        slot.value = Some(value);
        let generation = slot.generation;
        t.live += 1;
        Ok(encode(self.kind, index, generation))
    }

    /// Why `h` names no live object of this kind.
    fn stale(&self, t: &Table<T>, what: &str, h: usize) -> Failure {
        let message = match decode(h) {
            None => format!(
                "{what} ({h:#x}) is not a {} handle: no slot index",
                self.kind.name()
            ),
            Some(d) if d.tag != self.kind as u64 => match Kind::from_tag(d.tag) {
                Some(other) => format!(
                    "{what} ({h:#x}) is a {} handle, not a {} handle",
                    other.name(),
                    self.kind.name()
                ),
                None => format!(
                    "{what} ({h:#x}) is not a {} handle (kind tag {})",
                    self.kind.name(),
                    d.tag
                ),
            },
            Some(d) => match t.slots.get(d.index) {
                None => format!(
                    "{what} ({h:#x}) was never issued: slot {} is past the {} slots of the {} \
                     table",
                    d.index,
                    t.slots.len(),
                    self.kind.name()
                ),
                Some(s) => format!(
                    "{what} ({h:#x}) was already released (or never issued): {} slot {} is at \
                     generation {}, the handle names generation {}",
                    self.kind.name(),
                    d.index,
                    s.generation,
                    d.generation
                ),
            },
        };
        Failure::new(ub_status::UB_STATUS_INVALID_HANDLE, message)
    }

    /// The object `h` names. `what` names the argument in errors.
    pub fn get(&self, what: &str, h: usize) -> CResult<Arc<T>> {
        if h == 0 {
            return Err(Failure::null(what));
        }
        let t = self.lock();
        if let Some(d) = decode(h).filter(|d| d.tag == self.kind as u64) {
            if let Some(Slot {
                generation,
                value: Some(v),
            }) = t.slots.get(d.index)
            {
                if *generation == d.generation {
                    return Ok(v.clone());
                }
            }
        }
        Err(self.stale(&t, what, h))
    }

    /// Ends `h`: the object is dropped once no call is using it. NULL is a no-op; a handle
    /// already released is `INVALID_HANDLE`.
    pub fn release(&self, h: usize) -> CResult<()> {
        if h == 0 {
            return Ok(());
        }
        let taken = {
            let mut t = self.lock();
            let found = decode(h).filter(|d| d.tag == self.kind as u64).filter(|d| {
                t.slots
                    .get(d.index)
                    .is_some_and(|s| s.generation == d.generation && s.value.is_some())
            });
            let Some(d) = found else {
                return Err(self.stale(&t, "the handle", h));
            };
            let slot = &mut t.slots[d.index];
            let value = slot.value.take();
            // A slot whose generation would wrap is retired: a later handle of it could equal
            // a stale one.
            if let Some(g) = slot.generation.checked_add(1) {
                slot.generation = g;
                t.free.push(d.index as u32);
            }
            t.live -= 1;
            value
        };
        // Dropped outside the lock: releasing the last handle of a device drains it.
        drop(taken);
        Ok(())
    }

    /// Handles of this kind alive now.
    pub fn live(&self) -> usize {
        self.lock().live
    }
}

/// Converts between the opaque handle pointer types and the registry's values. The pointer is
/// an integer in pointer clothing: it has no provenance and is never dereferenced.
pub(crate) fn to_ptr<H>(h: usize) -> *mut H {
    std::ptr::without_provenance_mut(h)
}

/// The value of a handle pointer (no dereference).
pub(crate) fn from_ptr<H>(p: *const H) -> usize {
    p.addr()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_round_trip_and_stale_ones_are_refused() {
        let r: Registry<String> = Registry::new(Kind::Buffer);
        let a = r.insert("a".into()).unwrap();
        let b = r.insert("b".into()).unwrap();
        assert_ne!(a, b);
        assert_eq!(*r.get("a", a).unwrap(), "a");
        assert_eq!(r.live(), 2);
        r.release(a).unwrap();
        let e = r.release(a).unwrap_err();
        assert_eq!(e.status, ub_status::UB_STATUS_INVALID_HANDLE);
        assert!(e.message.contains("already released"), "{}", e.message);
        assert!(e.message.contains("generation 2"), "{}", e.message);
        let e = r.get("x", a).unwrap_err();
        assert_eq!(e.status, ub_status::UB_STATUS_INVALID_HANDLE);
        // The slot is reused with a new generation: the old handle stays dead.
        let c = r.insert("c".into()).unwrap();
        assert_eq!(decode(c).unwrap().index, decode(a).unwrap().index);
        assert_ne!(c, a);
        assert!(r.get("x", a).is_err());
        assert_eq!(*r.get("c", c).unwrap(), "c");
        assert_eq!(r.live(), 2);
        r.release(0).unwrap();
        assert_eq!(
            r.get("x", 0).unwrap_err().status,
            ub_status::UB_STATUS_NULL_POINTER
        );
    }

    #[test]
    fn kinds_and_garbage_are_told_apart() {
        let bufs: Registry<u32> = Registry::new(Kind::Buffer);
        let queues: Registry<u32> = Registry::new(Kind::Queue);
        let q = queues.insert(7).unwrap();
        let e = bufs.get("buffer", q).unwrap_err();
        assert!(
            e.message
                .contains("is a ub_queue handle, not a ub_buffer handle"),
            "{}",
            e.message
        );
        let e = bufs.get("buffer", 0x1000).unwrap_err();
        assert_eq!(e.status, ub_status::UB_STATUS_INVALID_HANDLE);
        let e = bufs.get("buffer", encode(Kind::Buffer, 99, 1)).unwrap_err();
        assert!(e.message.contains("never issued"), "{}", e.message);
        assert!(bufs.release(q).is_err());
        assert_eq!(queues.live(), 1);
    }

    #[test]
    fn concurrent_inserts_and_releases_never_alias() {
        static R: Registry<(usize, usize)> = Registry::new(Kind::Weights);
        let threads: Vec<_> = (0..4)
            .map(|t| {
                std::thread::spawn(move || {
                    let mut stale = Vec::new();
                    for i in 0..500 {
                        let h = R.insert((t, i)).unwrap();
                        assert_eq!(*R.get("h", h).unwrap(), (t, i));
                        R.release(h).unwrap();
                        stale.push(h);
                    }
                    // Other threads reuse the slots meanwhile: no stale handle comes back.
                    for h in stale {
                        assert!(R.get("h", h).is_err());
                        assert!(R.release(h).is_err());
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(R.live(), 0);
    }

    #[test]
    fn a_slot_whose_generation_would_wrap_is_retired() {
        let r: Registry<u8> = Registry::new(Kind::Device);
        let h = r.insert(1).unwrap();
        let index = decode(h).unwrap().index;
        r.lock().slots[index].generation = u32::MAX;
        let last = encode(Kind::Device, index, u32::MAX);
        r.release(last).unwrap();
        assert!(r.lock().free.is_empty(), "the slot is not reused");
        let next = r.insert(2).unwrap();
        assert_ne!(decode(next).unwrap().index, index);
    }
}
