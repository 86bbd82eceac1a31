//! The arena: placement of blocks in one reserved virtual address range, with physical memory
//! mapped in granules only where live blocks are.
//!
//! Blocks are placed best-fit (the smallest free extent that fits, lowest address among equals)
//! at 512-byte granularity, and freed extents coalesce, so blocks of any size pack next to each
//! other and neighbours share granules: memory held is the live bytes plus, per gap between live
//! blocks, at most the partial granules at its ends. Granules whose last block was freed stay
//! mapped ("cached") and are reused first; they are unmapped when the mapped total passes
//! (1 + slack) times the largest live total seen, on `trim`, and under memory pressure.
//!
//! On the shared decode trace (llama, variable batch) this placement holds peak reserved / peak
//! live at 1.03 with about one map per 400 events, where caching freed blocks by size class
//! reaches 4.8. The arena is pure policy: it says which granules to map and unmap, and the
//! allocator asks the backend to do it.

use super::snapshot::{RangeSnapshot, RangeState};
use crate::epoch::{Fence, FenceSet};
use std::collections::{BTreeMap, BTreeSet};

/// A set of granule indices as bits: membership changes on every placement and release of
/// every granule a block spans, so they must cost a few instructions; the rare unmapping pass
/// scans for the highest members.
#[derive(Debug)]
struct GranuleSet {
    words: Vec<u64>,
    len: u64,
    /// No word at or above this index has a member: `pop_last` starts here instead of at the
    /// top of an address range that may span half a million granules.
    top: usize,
}

impl GranuleSet {
    fn new(granules: u64) -> GranuleSet {
        GranuleSet {
            words: vec![0; granules.div_ceil(64) as usize],
            len: 0,
            top: 0,
        }
    }
    fn insert(&mut self, g: u64) -> bool {
        let (w, bit) = ((g / 64) as usize, 1u64 << (g % 64));
        let fresh = self.words[w] & bit == 0;
        self.words[w] |= bit;
        self.len += u64::from(fresh);
        self.top = self.top.max(w + 1);
        fresh
    }
    fn remove(&mut self, g: u64) -> bool {
        let (w, bit) = ((g / 64) as usize, 1u64 << (g % 64));
        let present = self.words[w] & bit != 0;
        self.words[w] &= !bit;
        self.len -= u64::from(present);
        present
    }
    /// Sets (`on`) or clears every member of `r` a word at a time; the inner granules of a
    /// large block change together on every quick-list release and reuse.
    fn set_range(&mut self, r: Range<u64>, on: bool) {
        let mut g = r.start;
        while g < r.end {
            let (w, lo) = ((g / 64) as usize, g % 64);
            let n = (r.end - g).min(64 - lo);
            let mask = if n == 64 { !0 } else { ((1u64 << n) - 1) << lo };
            let before = self.words[w];
            self.words[w] = if on { before | mask } else { before & !mask };
            let changed = u64::from((before ^ self.words[w]).count_ones());
            self.len = if on {
                self.len + changed
            } else {
                self.len - changed
            };
            if on {
                self.top = self.top.max(w + 1);
            }
            g += n;
        }
    }
    fn contains(&self, g: u64) -> bool {
        self.words[(g / 64) as usize] & (1u64 << (g % 64)) != 0
    }
    fn pop_last(&mut self) -> Option<u64> {
        if self.len == 0 {
            self.top = 0;
            return None;
        }
        let w = self.words[..self.top].iter().rposition(|w| *w != 0)?;
        self.top = w + 1;
        let g = w as u64 * 64 + 63 - u64::from(self.words[w].leading_zeros());
        self.remove(g);
        Some(g)
    }
    fn len(&self) -> u64 {
        self.len
    }
}
use std::ops::Range;

/// Placement granularity: every block starts and ends on a multiple of this.
pub const BLOCK_ALIGN: u64 = 512;

/// A freed block waiting in the quick list for a request of exactly its size.
#[derive(Debug)]
struct QuickBlock {
    offset: u64,
    bytes: u64,
    fences: FenceSet,
}

/// Quick-list buckets: one per power of two of the size in `BLOCK_ALIGN` units.
const QUICK_BUCKETS: usize = 48;

/// A free extent (keyed by its end): its start and the fences of the work that last used any
/// part of it.
#[derive(Debug)]
struct Extent {
    start: u64,
    fences: FenceSet,
}

/// A block placed in the arena.
#[derive(Debug)]
pub(crate) struct Placement {
    /// Offset from the arena's base.
    pub offset: u64,
    /// Bytes reserved for the block (the request rounded to `BLOCK_ALIGN`).
    pub bytes: u64,
    /// The fences of earlier work on this memory, inherited by the new owner.
    pub fences: FenceSet,
    /// Granule ranges (indices) that must be mapped before the block is used.
    pub to_map: Vec<Range<u64>>,
}

/// The placement state of one address range.
#[derive(Debug)]
pub(crate) struct Arena {
    granule: u64,
    /// log2 of `granule`: granule indices come from shifts, not divisions, on every
    /// placement and release (a 64-bit division costs tens of cycles).
    granule_shift: u32,
    len: u64,
    /// Free extents by end address. Keyed by the end, not the start: a block placed at an
    /// extent's start leaves the rest under the same key, and a block freed just before an
    /// extent joins it in place, so most placements and frees cost one tree operation fewer
    /// (the tree operations are most of the policy's time on a decode trace).
    free_by_end: BTreeMap<u64, Extent>,
    /// Free extents as (length, start): best fit is the first at or above a length.
    free_by_size: BTreeSet<(u64, u64)>,
    /// Live blocks overlapping each granule, and the large slot's block for the granules
    /// wholly inside it (see `large`).
    refs: Vec<u32>,
    /// Mapped granules that no live block overlaps, ready for reuse or unmapping; the large
    /// slot's inner granules are not among them while it holds them (`cached_granules` adds
    /// them).
    cached: GranuleSet,
    mapped: u64,
    /// Freed blocks kept whole for a request of the same size: an alloc/free pair of a size
    /// in use costs no tree operation. They drop their granule references (so their granules
    /// count as cached in the stats), stay out of the free space, and are flushed into it
    /// before any granule is unmapped. Bounded by `quick_limit` bytes.
    quick: Vec<Vec<QuickBlock>>,
    quick_bytes: u64,
    quick_limit: u64,
    /// The last freed block too large for the quick list, kept whole the same way: a hot
    /// alloc/free pair of a large size (a per-step activation) then costs no tree operation
    /// either. A separate slot, so that it never crowds the small blocks out of the list.
    /// Unlike the quick list's blocks it keeps the references of the granules wholly inside
    /// it: those are its alone, so keeping them changes no other block's accounting, and a
    /// hot pair of a 64 MiB block skips rewriting 32 of them twice. They count as cached
    /// (`cached_granules`) and become so when the slot is flushed.
    large: Option<QuickBlock>,
}

impl Arena {
    /// An arena over `len` bytes of address space mapped in `granule`-byte units.
    pub fn new(len: u64, granule: u64) -> Arena {
        debug_assert!(
            granule.is_power_of_two() && granule >= BLOCK_ALIGN && len.is_multiple_of(granule)
        );
        let mut a = Arena {
            granule,
            granule_shift: granule.trailing_zeros(),
            len,
            free_by_end: BTreeMap::new(),
            free_by_size: BTreeSet::new(),
            refs: vec![0; (len / granule) as usize],
            cached: GranuleSet::new(len / granule),
            mapped: 0,
            quick: (0..QUICK_BUCKETS).map(|_| Vec::new()).collect(),
            quick_bytes: 0,
            quick_limit: 0,
            large: None,
        };
        a.insert_free(0, len, FenceSet::new());
        a
    }

    /// Mapped granules (live and cached).
    #[cfg(test)]
    pub fn mapped_granules(&self) -> u64 {
        self.mapped
    }

    /// Mapped granules no live block uses (the large slot's inner granules included).
    pub fn cached_granules(&self) -> u64 {
        let held = self.large.as_ref().map_or(0, |q| {
            let (_, inner, _) = self.split_granules(q.offset, q.bytes);
            inner.end - inner.start
        });
        self.cached.len() + held
    }

    /// The granule size.
    pub fn granule(&self) -> u64 {
        self.granule
    }

    /// The largest free extent, in bytes.
    #[cfg(test)]
    pub fn largest_free(&self) -> u64 {
        self.free_by_size.last().map_or(0, |(len, _)| *len)
    }

    fn insert_free(&mut self, start: u64, len: u64, fences: FenceSet) {
        self.free_by_size.insert((len, start));
        self.free_by_end
            .insert(start + len, Extent { start, fences });
    }

    fn granules_of(&self, offset: u64, bytes: u64) -> Range<u64> {
        let round_up = self.granule - 1;
        offset >> self.granule_shift..(offset + bytes + round_up) >> self.granule_shift
    }

    /// Granules of the block at `offset..offset + bytes` that no other block references: those
    /// the block alone keeps mapped.
    pub fn sole_granules(&self, offset: u64, bytes: u64) -> u64 {
        self.granules_of(offset, bytes)
            .filter(|g| self.refs[*g as usize] == 1)
            .count() as u64
    }

    /// Whether `release` would keep a block of `bytes` whole now (in the quick list or the
    /// large slot) rather than return it to the free space.
    fn keeps_whole(&self, bytes: u64) -> bool {
        self.quick_bytes + bytes <= self.quick_limit
            || (self.quick_limit > 0 && bytes > self.quick_limit)
    }

    /// Takes quick-list room for a freed block the caller keeps outside the arena with its
    /// granule references (the allocator's front block): false if `release` would not put it
    /// in the quick list. The block is counted as if it were in the list, so the arena keeps
    /// whole what it would have kept and placement is unchanged (the allocator flushes the
    /// block before a request for another size of its bucket, whose `swap_remove` would have
    /// moved it). The caller gives
    /// the room back with `unreserve_quick` when it reuses the block, or hands the block over
    /// with `push_reserved_quick` — before anything flushes the quick list.
    pub fn reserve_quick(&mut self, bytes: u64) -> bool {
        let fits = self.quick_bytes + bytes <= self.quick_limit;
        if fits {
            self.quick_bytes += bytes;
        }
        fits
    }

    /// Gives back the room `reserve_quick` took for a block reused from outside the arena.
    pub fn unreserve_quick(&mut self, bytes: u64) {
        self.quick_bytes -= bytes;
    }

    /// Puts a block whose room `reserve_quick` took into the quick list.
    pub fn push_reserved_quick(&mut self, offset: u64, bytes: u64, fences: FenceSet) {
        self.drop_block_refs(offset, bytes);
        self.quick[Self::quick_bucket(bytes)].push(QuickBlock {
            offset,
            bytes,
            fences,
        });
    }

    /// Sets the quick list's byte bound; blocks over it go to the free space directly.
    pub fn set_quick_limit(&mut self, bytes: u64) {
        self.quick_limit = bytes;
    }

    /// Whether the large slot holds a block of exactly `bytes` (a multiple of `BLOCK_ALIGN`):
    /// `place` takes it before anything in the quick list.
    pub fn large_holds(&self, bytes: u64) -> bool {
        self.large.as_ref().is_some_and(|q| q.bytes == bytes)
    }

    /// Bytes waiting in the quick list and the large slot.
    pub fn quick_bytes(&self) -> u64 {
        self.quick_bytes + self.large.as_ref().map_or(0, |q| q.bytes)
    }

    pub(crate) fn quick_bucket(bytes: u64) -> usize {
        ((u64::BITS - (bytes / BLOCK_ALIGN).leading_zeros()) as usize).min(QUICK_BUCKETS - 1)
    }

    /// Moves every quick-list block into the free space, so that its granules can be cached
    /// and unmapped.
    pub fn flush_quick(&mut self, retired: &mut dyn FnMut(Fence) -> bool) {
        // Their granule references were dropped on release: only the free space changes.
        for b in 0..QUICK_BUCKETS {
            for q in std::mem::take(&mut self.quick[b]) {
                self.free_range(q.offset, q.bytes, q.fences, retired);
            }
        }
        self.quick_bytes = 0;
        if let Some(q) = self.large.take() {
            self.release_large_to_free(q, retired);
        }
    }

    /// Takes the large slot's block if it is `bytes` long (a multiple of `BLOCK_ALIGN`): its
    /// offset and fences. What `place` hands out first; the allocator asks directly on its hot
    /// path, which then builds no placement.
    pub fn take_large(&mut self, bytes: u64) -> Option<(u64, FenceSet)> {
        if self.large.as_ref().is_none_or(|q| q.bytes != bytes) {
            return None;
        }
        let q = self.large.take().expect("checked above");
        // The inner granules kept their references in the slot.
        let (head, _, tail) = self.split_granules(q.offset, bytes);
        for g in head.chain(tail) {
            self.take_ref(g);
        }
        Some((q.offset, q.fences))
    }

    /// Places a block of `bytes` (rounded up to `BLOCK_ALIGN`); `None` if no extent fits.
    ///
    /// `retired` says whether a fence's work has completed: those fences are dropped from the
    /// extent the block is cut from, so that memory no pending work touches inherits no wait.
    pub fn place(
        &mut self,
        bytes: u64,
        retired: &mut dyn FnMut(Fence) -> bool,
    ) -> Option<Placement> {
        let bytes = bytes.max(1).checked_next_multiple_of(BLOCK_ALIGN)?;
        if let Some((offset, fences)) = self.take_large(bytes) {
            return Some(Placement {
                offset,
                bytes,
                fences,
                to_map: Vec::new(),
            });
        }
        let list = &mut self.quick[Self::quick_bucket(bytes)];
        if let Some(i) = list.iter().rposition(|q| q.bytes == bytes) {
            let q = list.swap_remove(i);
            self.quick_bytes -= bytes;
            self.take_refs(q.offset, bytes);
            return Some(Placement {
                offset: q.offset,
                bytes,
                fences: q.fences,
                to_map: Vec::new(),
            });
        }
        let &(len, start) = self.free_by_size.range((bytes, 0)..).next()?;
        self.free_by_size.remove(&(len, start));
        let end = start + len;
        let fences = if len > bytes {
            // The rest keeps the extent's key (its end) and its fences.
            let rest = self
                .free_by_end
                .get_mut(&end)
                .expect("a free extent ends here");
            rest.fences.retain_pending(&mut *retired);
            rest.start = start + bytes;
            self.free_by_size.insert((len - bytes, start + bytes));
            rest.fences.clone()
        } else {
            let mut extent = self
                .free_by_end
                .remove(&end)
                .expect("a free extent ends here");
            extent.fences.retain_pending(&mut *retired);
            extent.fences
        };
        let mut to_map: Vec<Range<u64>> = Vec::new();
        for g in self.granules_of(start, bytes) {
            let r = &mut self.refs[g as usize];
            if *r == 0 && !self.cached.remove(g) {
                self.mapped += 1;
                match to_map.last_mut() {
                    Some(last) if last.end == g => last.end = g + 1,
                    _ => to_map.push(g..g + 1),
                }
            }
            *r += 1;
        }
        Some(Placement {
            offset: start,
            bytes,
            fences,
            to_map,
        })
    }

    /// Returns a block: to the quick list while it has room, else to the free space (with the
    /// fences of its last use), where granules no live block overlaps any more become cached.
    pub fn release(
        &mut self,
        offset: u64,
        bytes: u64,
        fences: FenceSet,
        retired: &mut dyn FnMut(Fence) -> bool,
    ) {
        // A zero limit turns whole-block keeping off altogether (the large slot included).
        if !self.keeps_whole(bytes) {
            self.release_to_free(offset, bytes, fences, retired);
            return;
        }
        if self.quick_bytes + bytes <= self.quick_limit {
            self.drop_block_refs(offset, bytes);
            self.quick_bytes += bytes;
            self.quick[Self::quick_bucket(bytes)].push(QuickBlock {
                offset,
                bytes,
                fences,
            });
            return;
        }
        // Into the large slot, keeping the inner granules' references.
        let (head, _, tail) = self.split_granules(offset, bytes);
        for g in head.chain(tail) {
            self.drop_ref(g);
        }
        let block = QuickBlock {
            offset,
            bytes,
            fences,
        };
        if let Some(q) = self.large.replace(block) {
            self.release_large_to_free(q, retired);
        }
    }

    /// Returns the large slot's block to the free space, dropping the inner granules'
    /// references it kept.
    fn release_large_to_free(&mut self, q: QuickBlock, retired: &mut dyn FnMut(Fence) -> bool) {
        let (_, inner, _) = self.split_granules(q.offset, q.bytes);
        self.set_inner_refs(inner, false);
        self.free_range(q.offset, q.bytes, q.fences, retired);
    }

    /// Re-references the granules of a block taken back from the quick list: they are still
    /// mapped (granules are unmapped only after the list is flushed), so nothing is mapped.
    fn take_refs(&mut self, offset: u64, bytes: u64) {
        // Most blocks of a hot pair lie within one granule: the head alone, no inner range.
        let (head, inner, tail) = self.split_granules(offset, bytes);
        for g in head.chain(tail) {
            self.take_ref(g);
        }
        self.set_inner_refs(inner, true);
    }

    /// References (`held`) or releases a block's inner granules, which it alone overlaps: their
    /// counts are 1 or 0 together, and unreferenced they are cached.
    fn set_inner_refs(&mut self, inner: Range<u64>, held: bool) {
        if !inner.is_empty() {
            self.refs[inner.start as usize..inner.end as usize].fill(u32::from(held));
            self.cached.set_range(inner, !held);
        }
    }

    fn take_ref(&mut self, g: u64) {
        let r = &mut self.refs[g as usize];
        if *r == 0 {
            self.cached.remove(g);
        }
        *r += 1;
    }

    /// Drops a block's granule references; those left unreferenced become cached.
    fn drop_block_refs(&mut self, offset: u64, bytes: u64) {
        let (head, inner, tail) = self.split_granules(offset, bytes);
        for g in head.chain(tail) {
            self.drop_ref(g);
        }
        self.set_inner_refs(inner, false);
    }

    /// A block's granules as (partial head, inner, partial tail). Blocks never overlap, so the
    /// inner granules, wholly inside the block, are referenced by it alone: their counts are 1
    /// or 0 together and change as a range.
    fn split_granules(&self, offset: u64, bytes: u64) -> (Range<u64>, Range<u64>, Range<u64>) {
        let all = self.granules_of(offset, bytes);
        let first_whole = (offset + self.granule - 1) >> self.granule_shift;
        let end_whole = (offset + bytes) >> self.granule_shift;
        if first_whole >= end_whole {
            return (all, 0..0, 0..0);
        }
        (
            all.start..first_whole,
            first_whole..end_whole,
            end_whole..all.end,
        )
    }

    fn release_to_free(
        &mut self,
        offset: u64,
        bytes: u64,
        fences: FenceSet,
        retired: &mut dyn FnMut(Fence) -> bool,
    ) {
        self.drop_block_refs(offset, bytes);
        self.free_range(offset, bytes, fences, retired);
    }

    /// Undoes a placement whose mapping failed: the granules it would have mapped count as
    /// unmapped again; the rest are released as usual.
    pub fn unplace(&mut self, p: Placement) {
        for g in self.granules_of(p.offset, p.bytes) {
            if p.to_map.iter().any(|r| r.contains(&g)) {
                self.refs[g as usize] -= 1;
                self.mapped -= 1;
            } else {
                self.drop_ref(g);
            }
        }
        self.free_range(p.offset, p.bytes, p.fences, &mut |_| false);
    }

    /// Puts granules taken for unmapping back in the cache (their work is still running).
    pub fn recache(&mut self, granules: Range<u64>) {
        for g in granules {
            if self.refs[g as usize] == 0 && self.cached.insert(g) {
                self.mapped += 1;
            }
        }
    }

    fn drop_ref(&mut self, g: u64) {
        let r = &mut self.refs[g as usize];
        *r -= 1;
        if *r == 0 {
            self.cached.insert(g);
        }
    }

    /// Adds `offset..offset + bytes` to the free space, coalescing with its neighbours; fences
    /// that `retired` says completed are dropped from the merged extent.
    fn free_range(
        &mut self,
        offset: u64,
        bytes: u64,
        fences: FenceSet,
        retired: &mut dyn FnMut(Fence) -> bool,
    ) {
        let (mut start, mut merged) = (offset, fences);
        // The extent ending where the block starts.
        if let Some(prev) = self.free_by_end.remove(&offset) {
            self.free_by_size.remove(&(offset - prev.start, prev.start));
            start = prev.start;
            merged.extend(&prev.fences);
        }
        // The extent starting where the block ends, if any, is the first to end after it: the
        // merged extent takes its place under its key.
        let end = offset + bytes;
        if let Some((&next_end, next)) = self.free_by_end.range_mut(end + 1..).next() {
            if next.start == end {
                self.free_by_size.remove(&(next_end - end, end));
                merged.extend(&next.fences);
                merged.retain_pending(&mut *retired);
                next.start = start;
                next.fences = merged;
                self.free_by_size.insert((next_end - start, start));
                return;
            }
        }
        merged.retain_pending(&mut *retired);
        self.insert_free(start, end - start, merged);
    }

    /// Picks up to `max` cached granules to unmap, highest addresses first (best-fit fills low
    /// addresses, so those are the least likely to be reused), each with the fences that must
    /// complete before it is unmapped. They stop counting as mapped.
    pub fn take_cached(
        &mut self,
        max: u64,
        retired: &mut dyn FnMut(Fence) -> bool,
    ) -> Vec<(Range<u64>, FenceSet)> {
        // Quick-list blocks lie on cached granules outside the free space: return them first.
        self.flush_quick(&mut *retired);
        let mut out: Vec<(Range<u64>, FenceSet)> = Vec::new();
        let mut taken = 0;
        while taken < max {
            let Some(g) = self.cached.pop_last() else {
                break;
            };
            self.mapped -= 1;
            taken += 1;
            let mut fences = self.fences_at(g * self.granule);
            fences.retain_pending(&mut *retired);
            match out.last_mut() {
                Some((r, f)) if r.start == g + 1 => {
                    r.start = g;
                    f.extend(&fences);
                }
                _ => out.push((g..g + 1, fences)),
            }
        }
        out
    }

    /// The fences of the free extent containing `addr` (a cached granule lies in one extent).
    fn fences_at(&self, addr: u64) -> FenceSet {
        self.free_by_end
            .range(addr + 1..)
            .next()
            .filter(|(_, e)| e.start <= addr)
            .map_or_else(FenceSet::new, |(_, e)| e.fences.clone())
    }

    /// Address-space length.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Used, kept and free ranges in address order, covering the address space.
    pub fn ranges(&self) -> Vec<RangeSnapshot> {
        let mut marked: Vec<RangeSnapshot> = self
            .free_by_end
            .iter()
            .map(|(&end, e)| RangeSnapshot {
                offset: e.start,
                bytes: end - e.start,
                state: RangeState::Free,
            })
            .chain(
                self.quick
                    .iter()
                    .flatten()
                    .chain(&self.large)
                    .map(|q| RangeSnapshot {
                        offset: q.offset,
                        bytes: q.bytes,
                        state: RangeState::Kept,
                    }),
            )
            .collect();
        marked.sort_unstable_by_key(|r| r.offset);
        // Whatever lies between free and kept ranges is live blocks.
        let mut out = Vec::with_capacity(marked.len() * 2 + 1);
        let mut at = 0;
        for r in marked {
            if r.offset > at {
                out.push(RangeSnapshot {
                    offset: at,
                    bytes: r.offset - at,
                    state: RangeState::Used,
                });
            }
            at = r.offset + r.bytes;
            out.push(r);
        }
        if at < self.len {
            out.push(RangeSnapshot {
                offset: at,
                bytes: self.len - at,
                state: RangeState::Used,
            });
        }
        out
    }

    /// Runs of mapped granules (live or cached), as byte ranges.
    pub fn mapped_ranges(&self) -> Vec<Range<u64>> {
        let mut out: Vec<Range<u64>> = Vec::new();
        for (g, r) in self.refs.iter().enumerate() {
            let g = g as u64;
            if *r == 0 && !self.cached.contains(g) {
                continue;
            }
            let (start, end) = (g * self.granule, (g + 1) * self.granule);
            match out.last_mut() {
                Some(last) if last.end == start => last.end = end,
                _ => out.push(start..end),
            }
        }
        out
    }
}

#[cfg(test)]
#[allow(clippy::single_range_in_vec_init)] // granule ranges, one of them, are what is meant
mod tests {
    use super::*;
    use proptest::prelude::*;

    const G: u64 = 2 << 20;

    #[test]
    fn neighbours_share_granules_and_frees_coalesce() {
        let mut a = Arena::new(64 * G, G);
        let p1 = a.place(3 * G / 2, &mut |_| false).unwrap(); // granules 0 and 1
        assert_eq!((p1.offset, p1.to_map.clone()), (0, vec![0..2]));
        let p2 = a.place(G, &mut |_| false).unwrap(); // 1.5 G .. 2.5 G: granules 1 and 2
        assert_eq!(p2.offset, 3 * G / 2);
        assert_eq!(
            p2.to_map,
            vec![2..3],
            "granule 1 is shared with the first block"
        );
        assert_eq!(a.mapped_granules(), 3);
        a.release(p1.offset, p1.bytes, FenceSet::new(), &mut |_| false);
        assert_eq!(
            a.cached_granules(),
            1,
            "granule 1 still holds the second block's head"
        );
        a.release(p2.offset, p2.bytes, FenceSet::new(), &mut |_| false);
        assert_eq!(a.cached_granules(), 3);
        assert_eq!(a.largest_free(), 64 * G, "everything coalesced");
        let p3 = a.place(2 * G, &mut |_| false).unwrap();
        assert!(
            p3.to_map.is_empty(),
            "cached granules are reused before mapping new ones"
        );
        let taken: Vec<_> = a
            .take_cached(10, &mut |_| false)
            .into_iter()
            .map(|(r, _)| r)
            .collect();
        assert_eq!(taken, vec![2..3], "only the granule no live block uses");
        a.release(p3.offset, p3.bytes, FenceSet::new(), &mut |_| false);
        let taken: Vec<_> = a
            .take_cached(10, &mut |_| false)
            .into_iter()
            .map(|(r, _)| r)
            .collect();
        assert_eq!(taken, vec![0..2]);
        assert_eq!(a.mapped_granules(), 0);
    }

    #[test]
    fn best_fit_prefers_the_smallest_hole() {
        let mut a = Arena::new(64 * G, G);
        let blocks: Vec<_> = [4096u64, 8192, 4096, 16384, 4096]
            .iter()
            .map(|b| a.place(*b, &mut |_| false).unwrap())
            .collect();
        a.release(
            blocks[1].offset,
            blocks[1].bytes,
            FenceSet::new(),
            &mut |_| false,
        ); // 8 KiB hole
        a.release(
            blocks[3].offset,
            blocks[3].bytes,
            FenceSet::new(),
            &mut |_| false,
        ); // 16 KiB hole
        let p = a.place(6000, &mut |_| false).unwrap();
        assert_eq!(p.offset, blocks[1].offset);
        assert_eq!(p.bytes, 6144);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Random place/release sequences: blocks never overlap, granule accounting matches a
        /// recount, and releasing everything restores one free extent.
        #[test]
        fn random_sequences_keep_the_invariants(
            ops in prop::collection::vec((any::<bool>(), 1u64..(6 << 20)), 1..300),
            // 2 MiB sends blocks over it to the large slot; with 8 MiB none goes there (blocks
            // that do not fit the list go to the free space).
            quick_limit in prop_oneof![Just(0u64), Just(2u64 << 20), Just(8u64 << 20)],
        ) {
            let mut a = Arena::new(256 * G, G);
            a.set_quick_limit(quick_limit);
            let mut live: Vec<Placement> = Vec::new();
            for (release, size) in ops {
                if release && !live.is_empty() {
                    let p = live.swap_remove((size as usize) % live.len());
                    a.release(p.offset, p.bytes, FenceSet::new(), &mut |_| false);
                } else if let Some(p) = a.place(size, &mut |_| false) {
                    prop_assert!(p.bytes >= size && p.offset % BLOCK_ALIGN == 0);
                    live.push(p);
                }
                // Quick-list blocks stay out of the free space (no live block may overlap
                // them); they hold no granule references, the large slot's block only those of
                // its inner granules.
                let quick = a.quick.iter().flatten().chain(&a.large).map(|q| (q.offset, q.bytes));
                let mut sorted: Vec<_> = live.iter().map(|p| (p.offset, p.bytes)).chain(quick).collect();
                sorted.sort_unstable();
                for w in sorted.windows(2) {
                    prop_assert!(w[0].0 + w[0].1 <= w[1].0, "overlap {:?}", w);
                }
                let mut refs = vec![0u32; 256];
                for (o, b) in live.iter().map(|p| (p.offset, p.bytes)) {
                    for g in o / G..(o + b).div_ceil(G) {
                        refs[g as usize] += 1;
                    }
                }
                let used = refs.iter().filter(|r| **r > 0).count() as u64;
                // The large slot's block keeps the references of the granules wholly inside it.
                if let Some(q) = &a.large {
                    for g in q.offset.div_ceil(G)..(q.offset + q.bytes) / G {
                        refs[g as usize] += 1;
                    }
                }
                prop_assert_eq!(&refs, &a.refs);
                prop_assert_eq!(a.mapped_granules(), used + a.cached_granules());
                // The snapshot's ranges tile the address space and agree with the model.
                let ranges = a.ranges();
                let mut at = 0;
                for r in &ranges {
                    prop_assert_eq!(r.offset, at);
                    at += r.bytes;
                }
                prop_assert_eq!(at, a.len());
                let in_state = |s: RangeState| -> u64 {
                    ranges.iter().filter(|r| r.state == s).map(|r| r.bytes).sum()
                };
                prop_assert_eq!(in_state(RangeState::Used), live.iter().map(|p| p.bytes).sum::<u64>());
                prop_assert_eq!(in_state(RangeState::Kept), a.quick_bytes());
                let mapped: u64 = a.mapped_ranges().iter().map(|r| r.end - r.start).sum();
                prop_assert_eq!(mapped, a.mapped_granules() * G);
            }
            for p in live.drain(..) {
                a.release(p.offset, p.bytes, FenceSet::new(), &mut |_| false);
            }
            a.flush_quick(&mut |_| false);
            prop_assert_eq!(a.quick_bytes(), 0);
            prop_assert_eq!(a.largest_free(), 256 * G);
            a.take_cached(u64::MAX, &mut |_| false);
            prop_assert_eq!(a.mapped_granules(), 0);
        }
    }
}
