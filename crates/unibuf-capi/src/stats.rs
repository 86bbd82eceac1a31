//! Accounting: memory stats, the copy audit (as text and as counts), and the live handle
//! counts.

use crate::call::{call, write_str, Out};
use crate::device::{device, ub_device, DEVICES};
use crate::error::ub_status;
use std::ffi::c_char;
use unibuf::Direction;

/// A snapshot of a device's memory accounting (as PyTorch's `memory_stats`). Filled by
/// `ub_device_memory_stats`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ub_memory_stats {
    /// Bytes of live buffers, after size-class rounding.
    pub active_bytes: usize,
    /// Live allocations (a view does not count; its allocation does).
    pub active_count: usize,
    /// Bytes the live buffers asked for.
    pub requested_bytes: usize,
    /// High-water mark of `active_bytes`.
    pub peak_active_bytes: usize,
    /// Bytes held from the backend: active plus cached.
    pub reserved_bytes: usize,
    /// High-water mark of `reserved_bytes`.
    pub peak_reserved_bytes: usize,
    /// Bytes held but not in use (kept for reuse).
    pub cached_bytes: usize,
    /// Blocks (or mapped granules) kept for reuse.
    pub cached_count: usize,
    /// Whether blocks live in virtual memory mapped in granules.
    pub virtual_memory: bool,
    /// Allocations served from the cache.
    pub cache_hits: u64,
    /// Calls to the backend's allocate (or granule ranges mapped).
    pub device_allocs: u64,
    /// Calls to the backend's release (or granule ranges unmapped).
    pub device_frees: u64,
    /// Nanoseconds spent in those backend calls.
    pub device_call_ns: u64,
    /// Times an allocation released the cache or waited and tried again.
    pub oom_retries: u64,
    /// Allocations that failed with OUT_OF_MEMORY or BUDGET_EXCEEDED.
    pub ooms: u64,
    /// Bytes of wrapped caller memory (External buffers), page-rounded.
    pub external_bytes: usize,
    /// Wrapped caller regions alive.
    pub external_count: usize,
    /// Bytes of memory other frameworks own (Foreign buffers).
    pub foreign_bytes: usize,
    /// Foreign regions alive.
    pub foreign_count: usize,
    /// Bytes of pinned staging chunks held by the transfer engine.
    pub staging_bytes: usize,
    /// Bytes mapped for growable buffers.
    pub growable_bytes: usize,
    /// Growable buffers alive.
    pub growable_count: usize,
}

/// Writes the device's memory accounting into `*stats_out`.
///
/// # Safety
/// `stats_out` is valid for a write of `ub_memory_stats`.
#[no_mangle]
pub unsafe extern "C" fn ub_device_memory_stats(
    dev: *mut ub_device,
    stats_out: *mut ub_memory_stats,
) -> ub_status {
    call("ub_device_memory_stats", || {
        let out = Out::new("stats_out", stats_out)?;
        let s = device(dev)?.memory_stats();
        let c = ub_memory_stats {
            active_bytes: s.active_bytes,
            active_count: s.active_count,
            requested_bytes: s.requested_bytes,
            peak_active_bytes: s.peak_active_bytes,
            reserved_bytes: s.reserved_bytes,
            peak_reserved_bytes: s.peak_reserved_bytes,
            cached_bytes: s.cached_bytes,
            cached_count: s.cached_count,
            virtual_memory: s.virtual_memory,
            cache_hits: s.cache_hits,
            device_allocs: s.device_allocs,
            device_frees: s.device_frees,
            device_call_ns: s.device_call_ns,
            oom_retries: s.oom_retries,
            ooms: s.ooms,
            external_bytes: s.external_bytes,
            external_count: s.external_count,
            foreign_bytes: s.foreign_bytes,
            foreign_count: s.foreign_count,
            staging_bytes: s.staging_bytes,
            growable_bytes: s.growable_bytes,
            growable_count: s.growable_count,
        };
        // SAFETY: checked; valid by the caller's contract.
        unsafe { out.write(c) };
        Ok(())
    })
}

/// Totals of one direction of the copy audit.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ub_copy_totals {
    /// Transfers recorded.
    pub count: u64,
    /// Bytes moved.
    pub bytes: u64,
    /// Of which went through staging.
    pub staged_bytes: u64,
    /// Host nanoseconds spent.
    pub host_ns: u64,
}

/// The copy audit as counts, per direction. Filled by `ub_device_copy_report`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ub_copy_report {
    /// Caller host memory into buffers (uploads).
    pub host_to_device: ub_copy_totals,
    /// Buffers into caller host memory (downloads).
    pub device_to_host: ub_copy_totals,
    /// Buffer to buffer.
    pub device_to_device: ub_copy_totals,
    /// Patterns written over buffers.
    pub fill: ub_copy_totals,
    /// Zero-byte hand-overs across a framework boundary (foreign wraps, DLPack).
    pub shared: ub_copy_totals,
    /// Detailed records dropped from the ledger's ring (the totals include them).
    pub dropped_records: u64,
}

/// Writes the copy audit's totals per direction into `*report_out`.
///
/// # Safety
/// `report_out` is valid for a write of `ub_copy_report`.
#[no_mangle]
pub unsafe extern "C" fn ub_device_copy_report(
    dev: *mut ub_device,
    report_out: *mut ub_copy_report,
) -> ub_status {
    call("ub_device_copy_report", || {
        let out = Out::new("report_out", report_out)?;
        let r = device(dev)?.copy_report();
        let mut c = ub_copy_report {
            dropped_records: r.dropped_records,
            ..Default::default()
        };
        for (dir, t, _) in &r.by_direction {
            let slot = match dir {
                Direction::HostToDevice => &mut c.host_to_device,
                Direction::DeviceToHost => &mut c.device_to_host,
                Direction::DeviceToDevice => &mut c.device_to_device,
                Direction::Fill => &mut c.fill,
                Direction::Shared => &mut c.shared,
            };
            *slot = ub_copy_totals {
                count: t.count,
                bytes: t.bytes,
                staged_bytes: t.staged_bytes,
                host_ns: t.host_ns,
            };
        }
        // SAFETY: checked; valid by the caller's contract.
        unsafe { out.write(c) };
        Ok(())
    })
}

/// The copy audit as the table `unibuf` prints (by direction and by call site), written as
/// `ub_device_name` writes strings. Call with `buf` NULL and `cap` 0 for the length; the text
/// may grow between the two calls if other threads transfer meanwhile (then the second call
/// is `UB_STATUS_BUFFER_TOO_SMALL` with the new length).
///
/// # Safety
/// `buf` is NULL or valid for `cap` bytes of writes; `len_out` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ub_device_copy_report_text(
    dev: *mut ub_device,
    buf: *mut c_char,
    cap: usize,
    len_out: *mut usize,
) -> ub_status {
    call("ub_device_copy_report_text", || {
        let text = device(dev)?.copy_report().to_string();
        // SAFETY: the caller's contract.
        unsafe { write_str(&text, buf, cap, len_out) }
    })
}

/// Forgets the copy ledger's records and totals (to audit one phase of a program).
#[no_mangle]
pub extern "C" fn ub_device_clear_copy_ledger(dev: *mut ub_device) -> ub_status {
    call("ub_device_clear_copy_ledger", || {
        device(dev)?.ledger().clear();
        Ok(())
    })
}

/// Handles alive in this process, by kind. Filled by `ub_live_handles`: a program that
/// released everything it made reads all zeros.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ub_handle_counts {
    /// `ub_device` handles.
    pub devices: usize,
    /// `ub_queue` handles.
    pub queues: usize,
    /// `ub_buffer` handles.
    pub buffers: usize,
    /// `ub_mapping` handles.
    pub mappings: usize,
    /// `ub_download` handles.
    pub downloads: usize,
    /// `ub_weights` handles.
    pub weights: usize,
    /// `ub_loaded_weights` handles.
    pub loaded_weights: usize,
    /// `ub_host_signal` handles.
    pub host_signals: usize,
    /// `ub_ggml_matrix` handles (since ABI 1.1).
    pub ggml_matrices: usize,
    /// `ub_launch_batch` handles (since ABI 1.1; their recording queues count as `queues`).
    pub launch_batches: usize,
}

/// Counts the live handles of every kind into `*counts_out`: a leak check for programs and
/// tests.
///
/// # Safety
/// `counts_out` is valid for a write of `ub_handle_counts`.
#[no_mangle]
pub unsafe extern "C" fn ub_live_handles(counts_out: *mut ub_handle_counts) -> ub_status {
    call("ub_live_handles", || {
        let out = Out::new("counts_out", counts_out)?;
        let c = ub_handle_counts {
            devices: DEVICES.live(),
            queues: crate::queue::QUEUES.live(),
            buffers: crate::buffer::BUFFERS.live(),
            mappings: crate::host::live_mappings(),
            downloads: crate::transfer::live_downloads(),
            weights: crate::weights::live_weights(),
            loaded_weights: crate::weights::live_loaded(),
            host_signals: crate::interop::live_host_signals(),
            ggml_matrices: crate::ggml::live_matrices(),
            launch_batches: crate::batch::live_batches(),
        };
        // SAFETY: checked; valid by the caller's contract.
        unsafe { out.write(c) };
        Ok(())
    })
}
