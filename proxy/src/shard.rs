//! Static sharding of one fleet across several proxy processes: proxy `i` of `n` bridges the
//! devices whose rendezvous hash picks shard `i`, so that every device has exactly one bridge
//! and the shards need no coordination. Rendezvous (highest random weight) hashing moves only
//! the devices of the added or removed shard when `n` changes. The hash is FNV-1a, fixed by
//! this file, so that every proxy build agrees on it (std's hasher is randomly keyed).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Shard `index` of `count` (`index < count`), written `INDEX/COUNT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ProxyShard {
    pub index: u32,
    pub count: u32,
}

impl ProxyShard {
    /// The shard that owns `device_id` among `count` shards.
    pub fn owner(device_id: &str, count: u32) -> u32 {
        (0..count)
            .max_by_key(|&shard| (weight(device_id, shard), shard))
            .unwrap_or(0)
    }

    /// Whether this shard bridges `device_id`.
    pub fn owns(&self, device_id: &str) -> bool {
        Self::owner(device_id, self.count) == self.index
    }
}

/// FNV-1a over the device id and the shard number, finished with a 64-bit mix (splitmix64's)
/// so that ids differing in their last bytes still spread over all shards.
fn weight(device_id: &str, shard: u32) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in device_id.bytes().chain(shard.to_le_bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

impl FromStr for ProxyShard {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (i, n) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not INDEX/COUNT (e.g. 0/3)"))?;
        let index: u32 = i
            .trim()
            .parse()
            .map_err(|_| format!("{s:?}: index {i:?} is not a whole number"))?;
        let count: u32 = n
            .trim()
            .parse()
            .map_err(|_| format!("{s:?}: count {n:?} is not a whole number"))?;
        if count == 0 || index >= count {
            return Err(format!(
                "{s:?}: the index must be below the count (0/{count}..)"
            ));
        }
        Ok(Self { index, count })
    }
}

impl TryFrom<String> for ProxyShard {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<ProxyShard> for String {
    fn from(s: ProxyShard) -> String {
        s.to_string()
    }
}

impl fmt::Display for ProxyShard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("gw-{i:04}")).collect()
    }

    #[test]
    fn every_device_has_exactly_one_shard_and_shards_are_balanced() {
        let devices = ids(3000);
        let shards: Vec<ProxyShard> = (0..3).map(|index| ProxyShard { index, count: 3 }).collect();
        let mut sizes = [0usize; 3];
        for d in &devices {
            let owners: Vec<u32> = shards
                .iter()
                .filter(|s| s.owns(d))
                .map(|s| s.index)
                .collect();
            assert_eq!(owners.len(), 1, "{d}: {owners:?}");
            sizes[owners[0] as usize] += 1;
        }
        // 1000 each in expectation; the binomial sd is ~26.
        assert!(
            sizes.iter().all(|&s| (880..=1120).contains(&s)),
            "{sizes:?}"
        );
    }

    #[test]
    fn adding_a_shard_moves_only_the_devices_the_new_shard_takes() {
        let devices = ids(2000);
        let mut moved = 0;
        for d in &devices {
            let before = ProxyShard::owner(d, 4);
            let after = ProxyShard::owner(d, 5);
            if before != after {
                assert_eq!(after, 4, "{d} moved from {before} to an old shard {after}");
                moved += 1;
            }
        }
        // A fifth of the fleet in expectation.
        assert!((300..=500).contains(&moved), "{moved} moved");
    }

    #[test]
    fn shards_parse_print_and_reject_nonsense() {
        let s: ProxyShard = "2/5".parse().expect("valid");
        assert_eq!((s.index, s.count, s.to_string()), (2, 5, "2/5".to_string()));
        for bad in ["5/5", "1/0", "x/3", "3", "-1/3"] {
            let e = bad.parse::<ProxyShard>().expect_err(bad);
            assert!(e.contains(bad), "{e}");
        }
        assert_eq!(ProxyShard::owner("anything", 1), 0);
    }
}
