//! Allocation traces: the CSV format `action,addr,size,stream` (action `alloc` or `free`),
//! plain or gzip-compressed, as recorded from inference runs.

use crate::error::{Error, Result};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

/// One event of a trace. Blocks are named by slot: the recorded addresses are mapped at parse
/// time to small indices, reused once freed, so that a replay needs no hashing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TraceEvent {
    /// Allocate `size` bytes for the block in slot `id` on `stream`.
    Alloc {
        /// The block's slot.
        id: u64,
        /// Bytes requested.
        size: usize,
        /// The stream (queue) it was allocated on.
        stream: u32,
    },
    /// Free the block in slot `id`.
    Free {
        /// The block's slot.
        id: u64,
    },
}

/// A validated trace: every free names a live block, no live block is allocated twice.
#[derive(Clone, Debug, Default)]
pub struct Trace {
    /// The events in order.
    pub events: Vec<TraceEvent>,
    /// Slots used: every slot is below this.
    pub slots: usize,
}

impl Trace {
    /// Reads a trace file; `.gz` files (by their magic bytes) are decompressed.
    pub fn read(path: &Path) -> Result<Trace> {
        let what = path.display().to_string();
        let file = std::fs::File::open(path).map_err(|e| Error::io(what.clone(), e))?;
        let mut reader = BufReader::new(file);
        let gzipped = reader
            .fill_buf()
            .map_err(|e| Error::io(what.clone(), e))?
            .starts_with(&[0x1f, 0x8b]);
        if gzipped {
            Trace::parse(
                BufReader::new(flate2::read::MultiGzDecoder::new(reader)),
                &what,
            )
        } else {
            Trace::parse(reader, &what)
        }
    }

    /// Parses CSV text with the header `action,addr,size,stream`.
    pub fn parse(input: impl Read, what: &str) -> Result<Trace> {
        let format = |line: usize, detail: String| Error::Format {
            what: what.to_owned(),
            detail: format!("line {line}: {detail}"),
        };
        let mut lines = BufReader::new(input).lines();
        let header = match lines.next() {
            Some(h) => h.map_err(|e| Error::io(what.to_owned(), e))?,
            None => return Err(format(1, "the file is empty".to_owned())),
        };
        if header.trim() != "action,addr,size,stream" {
            return Err(format(
                1,
                format!(
                    "expected the header 'action,addr,size,stream', found '{}'",
                    header.trim()
                ),
            ));
        }
        let mut events = Vec::new();
        // Recorded address -> slot of the live block; freed slots are reused.
        let mut live: HashMap<u64, u64> = HashMap::new();
        let mut free_slots: Vec<u64> = Vec::new();
        let mut slots = 0u64;
        for (i, line) in lines.enumerate() {
            let n = i + 2;
            let line = line.map_err(|e| Error::io(what.to_owned(), e))?;
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let fields: Vec<&str> = line.split(',').collect();
            let [action, addr, size, stream] = fields[..] else {
                return Err(format(
                    n,
                    format!("expected 4 fields, found {}", fields.len()),
                ));
            };
            let num = |name: &str, v: &str| {
                v.trim()
                    .parse::<u64>()
                    .map_err(|_| format(n, format!("{name} '{v}' is not a number")))
            };
            let addr = num("addr", addr)?;
            match action.trim() {
                "alloc" => {
                    let size = usize::try_from(num("size", size)?)
                        .map_err(|_| format(n, format!("size {size} does not fit")))?;
                    let stream = u32::try_from(num("stream", stream)?)
                        .map_err(|_| format(n, format!("stream {stream} does not fit")))?;
                    if live.contains_key(&addr) {
                        let detail = format!("block {addr} is allocated while still live");
                        return Err(format(n, detail));
                    }
                    let slot = free_slots.pop().unwrap_or_else(|| {
                        slots += 1;
                        slots - 1
                    });
                    live.insert(addr, slot);
                    events.push(TraceEvent::Alloc {
                        id: slot,
                        size,
                        stream,
                    });
                }
                "free" => {
                    let Some(slot) = live.remove(&addr) else {
                        return Err(format(n, format!("block {addr} is freed but not live")));
                    };
                    free_slots.push(slot);
                    events.push(TraceEvent::Free { id: slot });
                }
                other => {
                    return Err(format(
                        n,
                        format!("action '{other}' is neither alloc nor free"),
                    ))
                }
            }
        }
        Ok(Trace {
            events,
            slots: slots as usize,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_validates() {
        let t = Trace::parse(
            "action,addr,size,stream\nalloc,16,100,0\nalloc,32,7,1\nfree,16,100,0\n".as_bytes(),
            "t",
        )
        .unwrap();
        assert_eq!(t.events.len(), 3);
        assert_eq!(
            t.events[1],
            TraceEvent::Alloc {
                id: 1,
                size: 7,
                stream: 1
            },
            "slot 1: slot 0 is still live"
        );
        assert_eq!(t.events[2], TraceEvent::Free { id: 0 });
        assert_eq!(t.slots, 2);
        for (text, needle) in [
            ("", "empty"),
            ("a,b\n", "header"),
            (
                "action,addr,size,stream\nalloc,1,2\n",
                "line 2: expected 4 fields",
            ),
            ("action,addr,size,stream\nalloc,x,2,0\n", "addr 'x'"),
            (
                "action,addr,size,stream\nfree,1,2,0\n",
                "freed but not live",
            ),
            (
                "action,addr,size,stream\nalloc,1,2,0\nalloc,1,2,0\n",
                "line 3: block 1 is allocated while still live",
            ),
            (
                "action,addr,size,stream\nmove,1,2,0\n",
                "neither alloc nor free",
            ),
        ] {
            let e = Trace::parse(text.as_bytes(), "t").unwrap_err().to_string();
            assert!(e.contains(needle), "{text:?}: {e}");
        }
    }
}
