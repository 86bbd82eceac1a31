//! Live bytes and allocations per label (`Device::memory_by_label`), counted on every
//! allocation and free.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// Live bytes and allocations per label. Entries stay at zero when their last allocation goes
/// (an alloc/free loop of one label would otherwise insert and remove the label, with its
/// string, every time); they are swept when they are most of the table.
#[derive(Default)]
pub(crate) struct LabelFigures {
    by_label: LabelMap<(usize, usize)>,
    /// Entries at zero allocations.
    zeros: usize,
}

impl LabelFigures {
    /// Counts an allocation's bytes for its label.
    pub fn own(&mut self, label: &str, bytes: usize) {
        if let Some(e) = self.by_label.get_mut(label) {
            self.zeros -= usize::from(e.1 == 0);
            e.0 += bytes;
            e.1 += 1;
            return;
        }
        // A new label: sweep the labels left at zero first if they are most of the table, so
        // that a program naming each buffer differently does not grow it without bound. Each
        // sweep removes at least half the table, so it costs O(1) per label added.
        if self.by_label.len() >= 64 && 2 * self.zeros > self.by_label.len() {
            self.by_label.retain(|_, e| e.1 > 0);
            self.zeros = 0;
        }
        self.by_label.insert(label.to_owned(), (bytes, 1));
    }

    /// Adds bytes to a label's count (a growable buffer that grew).
    pub fn add_bytes(&mut self, label: &str, bytes: usize) {
        if let Some(e) = self.by_label.get_mut(label) {
            e.0 += bytes;
        }
    }

    /// Stops counting an allocation's bytes for its label.
    pub fn disown(&mut self, label: &str, bytes: usize) {
        if let Some(e) = self.by_label.get_mut(label) {
            e.0 -= bytes;
            e.1 -= 1;
            self.zeros += usize::from(e.1 == 0);
        }
    }

    /// (label, bytes, allocations) of every label with live allocations, most bytes first.
    pub fn live(&self) -> Vec<(String, usize, usize)> {
        let mut v: Vec<_> = self
            .by_label
            .iter()
            .filter(|(_, (_, n))| *n > 0)
            .map(|(l, (b, n))| (l.clone(), *b, *n))
            .collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        v
    }
}

/// Labels to their figures, hashed with FNV-1a: std's SipHash resists collision attacks, which
/// labels the program picks itself do not need, and hashing a label twice was a fifth of an
/// alloc + drop. Written here for want of such a hasher in the allowed crates.
type LabelMap<V> = HashMap<String, V, BuildHasherDefault<LabelHasher>>;

/// FNV-1a over the bytes, finished with a multiply and a fold of the high half into the low:
/// the table picks buckets with the low bits, which in FNV-1a depend only on the low bits of
/// each byte.
struct LabelHasher(u64);

impl Default for LabelHasher {
    fn default() -> LabelHasher {
        LabelHasher(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for LabelHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
    }
    fn finish(&self) -> u64 {
        let h = self.0.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        h ^ (h >> 32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Labels left at zero are swept once they are most of the table; live ones never are.
    #[test]
    fn zero_entries_are_swept_and_live_ones_kept() {
        let mut f = LabelFigures::default();
        f.own("kept", 7);
        for i in 0..1000 {
            f.own(&format!("t{i}"), 10);
            f.disown(&format!("t{i}"), 10);
        }
        assert!(f.by_label.len() <= 130, "{} entries", f.by_label.len());
        assert_eq!(f.zeros, f.by_label.values().filter(|e| e.1 == 0).count());
        f.own("kept", 3);
        f.add_bytes("kept", 5);
        assert_eq!(f.live(), vec![("kept".to_owned(), 15, 2)]);
    }
}
