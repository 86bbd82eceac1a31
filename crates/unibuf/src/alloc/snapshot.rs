//! A snapshot of the allocator's memory: segments (one reserved address range per memory kind
//! where the backend has virtual memory) with their used, kept and free ranges and mapped
//! granules, and the whole blocks cached where it has not.
//!
//! Runs of adjacent live blocks appear as one `Used` range: live blocks are owned by their
//! buffers and not indexed by the allocator, which keeps every alloc/free pair off a shared
//! index. Per-label ownership is [`Device::memory_by_label`](crate::Device::memory_by_label).

use crate::ledger::fmt_bytes;
use crate::storage::MemoryKind;
use std::fmt;
use std::ops::Range;

/// What a range of a segment holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RangeState {
    /// One or more adjacent live blocks.
    Used,
    /// A freed block kept whole for the next request of its size.
    Kept,
    /// Free address space (mapped or not: see `SegmentSnapshot::mapped`).
    Free,
}

/// A range of a segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RangeSnapshot {
    /// Offset from the segment's base.
    pub offset: u64,
    /// Length in bytes.
    pub bytes: u64,
    /// What it holds.
    pub state: RangeState,
}

/// One reserved address range and what lies in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentSnapshot {
    /// The memory kind it serves.
    pub kind: MemoryKind,
    /// Its base address.
    pub base: u64,
    /// Reserved address space, bytes.
    pub address_space: u64,
    /// The mapping granule, bytes.
    pub granule: u64,
    /// Runs of mapped granules, as byte offsets from the base.
    pub mapped: Vec<Range<u64>>,
    /// Used, kept and free ranges in address order; together they cover the address space.
    pub ranges: Vec<RangeSnapshot>,
}

impl SegmentSnapshot {
    /// Mapped bytes.
    pub fn mapped_bytes(&self) -> u64 {
        self.mapped.iter().map(|r| r.end - r.start).sum()
    }

    /// Bytes in ranges of `state`.
    pub fn bytes_in(&self, state: RangeState) -> u64 {
        self.ranges
            .iter()
            .filter(|r| r.state == state)
            .map(|r| r.bytes)
            .sum()
    }
}

/// A whole block cached for reuse (backends without virtual memory).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CachedBlockSnapshot {
    /// The memory kind.
    pub kind: MemoryKind,
    /// Its address.
    pub addr: u64,
    /// Its size (a size class).
    pub bytes: usize,
}

/// The allocator's memory at one moment, from [`Device::memory_snapshot`](crate::Device::memory_snapshot).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemorySnapshot {
    /// Segments, one per memory kind with an address range.
    pub segments: Vec<SegmentSnapshot>,
    /// Whole blocks cached outside segments.
    pub cached_blocks: Vec<CachedBlockSnapshot>,
}

impl fmt::Display for MemorySnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for s in &self.segments {
            writeln!(
                f,
                "segment {:?} at {:#x}: {} address space, {} mapped in {} runs of {} granules; \
                 used {}, kept {}",
                s.kind,
                s.base,
                fmt_bytes(s.address_space),
                fmt_bytes(s.mapped_bytes()),
                s.mapped.len(),
                fmt_bytes(s.granule),
                fmt_bytes(s.bytes_in(RangeState::Used)),
                fmt_bytes(s.bytes_in(RangeState::Kept)),
            )?;
            for r in &s.ranges {
                writeln!(
                    f,
                    "  {:>#14x} {:>12} {:?}",
                    r.offset,
                    fmt_bytes(r.bytes),
                    r.state
                )?;
            }
        }
        for b in &self.cached_blocks {
            writeln!(
                f,
                "cached block {:?} at {:#x}: {}",
                b.kind,
                b.addr,
                fmt_bytes(b.bytes as u64)
            )?;
        }
        Ok(())
    }
}
