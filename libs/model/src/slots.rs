//! Hash slots: the key → slot function of Redis Cluster and inclusive slot ranges.
//!
//! Must stay bit-for-bit identical to Redis (`keyHashSlot` in cluster.c):
//! clients compute slots themselves and any disagreement means misrouting.

use std::fmt;

use crate::ModelError;

/// Number of hash slots in a Redis cluster.
pub const SLOT_COUNT: u16 = 16384;

/// A hash slot, `0..SLOT_COUNT`.
pub type Slot = u16;

const CRC16: crc::Crc<u16> = crc::Crc::<u16>::new(&crc::CRC_16_XMODEM);

/// Slot of a key: CRC16/XMODEM of the key, or of the first non-empty
/// `{hashtag}`, modulo 16384.
pub fn key_slot(key: &[u8]) -> Slot {
    (CRC16.checksum(hash_tag(key)) & (SLOT_COUNT - 1)) as Slot
}

/// The part of a key that is hashed: the content of the first `{...}` if it
/// is non-empty, else the whole key (Redis semantics, including `{}` and an
/// unterminated `{`).
fn hash_tag(key: &[u8]) -> &[u8] {
    if let Some(open) = key.iter().position(|&b| b == b'{') {
        if let Some(len) = key[open + 1..].iter().position(|&b| b == b'}') {
            if len > 0 {
                return &key[open + 1..open + 1 + len];
            }
        }
    }
    key
}

/// An inclusive, non-empty range of slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SlotRange {
    start: Slot,
    end: Slot,
}

impl SlotRange {
    /// A validated range: `start <= end < SLOT_COUNT`.
    pub fn new(start: u32, end: u32) -> Result<Self, ModelError> {
        if start > end {
            return Err(ModelError::invalid(
                "range",
                format!("slot range {start}-{end} is reversed"),
            ));
        }
        if end >= u32::from(SLOT_COUNT) {
            return Err(ModelError::invalid(
                "range",
                format!("slot {end} is out of range (0-{})", SLOT_COUNT - 1),
            ));
        }
        Ok(Self {
            start: start as Slot,
            end: end as Slot,
        })
    }

    /// The whole slot space.
    pub const fn all() -> Self {
        Self {
            start: 0,
            end: SLOT_COUNT - 1,
        }
    }

    /// First slot.
    pub fn start(&self) -> Slot {
        self.start
    }

    /// Last slot (inclusive).
    pub fn end(&self) -> Slot {
        self.end
    }

    /// Number of slots.
    pub fn len(&self) -> usize {
        usize::from(self.end - self.start) + 1
    }

    /// Never true: ranges hold at least one slot. Present for clippy's sake.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Whether `slot` lies in the range.
    pub fn contains(&self, slot: Slot) -> bool {
        self.start <= slot && slot <= self.end
    }

    /// Iterates the slots.
    pub fn slots(&self) -> impl Iterator<Item = Slot> {
        self.start..=self.end
    }
}

impl fmt::Display for SlotRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.start == self.end {
            write!(f, "{}", self.start)
        } else {
            write!(f, "{}-{}", self.start, self.end)
        }
    }
}

/// Splits the slot space into `parts` contiguous ranges whose sizes differ by
/// at most one, larger ones first.
pub fn spread_evenly(parts: usize) -> Vec<SlotRange> {
    let total = usize::from(SLOT_COUNT);
    let parts = parts.clamp(1, total);
    let (base, extra) = (total / parts, total % parts);
    let mut start = 0usize;
    (0..parts)
        .map(|i| {
            let len = base + usize::from(i < extra);
            let range = SlotRange {
                start: start as Slot,
                end: (start + len - 1) as Slot,
            };
            start += len;
            range
        })
        .collect()
}

/// Merges sorted slots into maximal ranges.
pub fn ranges_from_sorted(slots: impl IntoIterator<Item = Slot>) -> Vec<SlotRange> {
    let mut out: Vec<SlotRange> = Vec::new();
    for slot in slots {
        match out.last_mut() {
            Some(last) if last.end.checked_add(1) == Some(slot) => last.end = slot,
            _ => out.push(SlotRange {
                start: slot,
                end: slot,
            }),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_redis() {
        // Values from Redis's own test suite and `CLUSTER KEYSLOT`.
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"bar"), 5061);
        assert_eq!(key_slot(b"123456789"), 12739);
        assert_eq!(key_slot(b""), 0);
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        assert_eq!(key_slot(b"foo{}{bar}"), key_slot(b"foo{}{bar}"));
        assert_ne!(key_slot(b"foo{}{bar}"), key_slot(b"bar"));
        assert_eq!(key_slot(b"foo{{bar}}zap"), key_slot(b"{bar"));
        assert_eq!(key_slot(b"foo{bar}{zap}"), key_slot(b"bar"));
        assert_eq!(key_slot(b"{unterminated"), key_slot(b"{unterminated"));
    }

    #[test]
    fn spread_covers_everything_evenly() {
        for parts in [1, 2, 3, 4, 6, 8, 100, 16384] {
            let ranges = spread_evenly(parts);
            assert_eq!(ranges.len(), parts);
            assert_eq!(ranges[0].start(), 0);
            assert_eq!(ranges.last().unwrap().end(), SLOT_COUNT - 1);
            for pair in ranges.windows(2) {
                assert_eq!(pair[0].end() + 1, pair[1].start());
                assert!(pair[0].len().abs_diff(pair[1].len()) <= 1);
            }
        }
        let three = spread_evenly(3);
        assert_eq!(
            three.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["0-5461", "5462-10922", "10923-16383"]
        );
    }

    #[test]
    fn range_validation() {
        assert!(SlotRange::new(5, 4).is_err());
        assert!(SlotRange::new(0, 16384).is_err());
        assert_eq!(SlotRange::new(7, 7).unwrap().len(), 1);
        assert_eq!(SlotRange::new(7, 7).unwrap().to_string(), "7");
    }

    #[test]
    fn merge_ranges() {
        let r = ranges_from_sorted([1, 2, 3, 7, 9, 10]);
        assert_eq!(
            r.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["1-3", "7", "9-10"]
        );
    }
}
