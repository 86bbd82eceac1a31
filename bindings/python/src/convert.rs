//! Small conversions shared by the classes: storage modes, shapes, ranges.

use crate::errors::{invalid, UbResult};
use unibuf::StorageMode;

/// The Python name of a storage mode (`Buffer.mode`).
pub fn mode_name(m: StorageMode) -> &'static str {
    match m {
        StorageMode::Shared => "shared",
        StorageMode::Private => "private",
        StorageMode::External => "external",
        StorageMode::Foreign => "foreign",
        StorageMode::Auto => "auto",
    }
}

/// Parses the modes an allocation can ask for.
pub fn parse_alloc_mode(name: &str) -> UbResult<StorageMode> {
    match name.to_ascii_lowercase().as_str() {
        "auto" => Ok(StorageMode::Auto),
        "shared" => Ok(StorageMode::Shared),
        "private" => Ok(StorageMode::Private),
        _ => Err(invalid(
            "mode",
            format!(
                "'{name}' is not a mode to allocate in (auto, shared, private; external and \
                 foreign memory is wrapped, not allocated)"
            ),
        )),
    }
}

/// Resolves a Python-style `start:stop` pair (negative counts from the end, as in a slice)
/// against a length; the core checks the bounds.
pub fn resolve_range(
    start: Option<isize>,
    stop: Option<isize>,
    len: usize,
) -> std::ops::Range<usize> {
    let fix = |i: isize| -> usize {
        if i < 0 {
            len.saturating_sub(i.unsigned_abs())
        } else {
            i as usize
        }
    };
    let s = start.map_or(0, fix);
    let e = stop.map_or(len, fix);
    s..e.max(s)
}
