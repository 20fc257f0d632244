//! Sharding of one fleet across several proxy processes. Statically (`--shard i/n`), proxy `i`
//! of `n` bridges the devices whose rendezvous hash picks shard `i`, so that every device has
//! exactly one bridge and the shards need no coordination; automatically (`--shard auto`), the
//! live proxies split the fleet by the same hash over their ids ([`crate::membership`]). Rendezvous (highest random weight) hashing moves only
//! the devices of the added or removed shard when `n` changes. The hash is FNV-1a, fixed by
//! this file, so that every proxy build agrees on it (std's hasher is randomly keyed).

/// Shard `index` of `count`, written `INDEX/COUNT` (`pollen proxy --shard 0/3`).
pub type ProxyShard = pollen_proto::Part;

/// The shard that owns `device_id` among `count` shards.
pub fn owner(device_id: &str, count: u32) -> u32 {
    (0..count)
        .max_by_key(|&shard| (weight(device_id, &shard.to_le_bytes()), shard))
        .unwrap_or(0)
}

/// Whether `shard` bridges `device_id`.
pub fn owns(shard: ProxyShard, device_id: &str) -> bool {
    owner(device_id, shard.count) == shard.index
}

/// FNV-1a over the device id and the shard (a static shard's number, or a live proxy's id),
/// finished with a 64-bit mix (splitmix64's) so that ids differing in their last bytes still
/// spread over all shards.
pub(crate) fn weight(device_id: &str, shard: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in device_id.bytes().chain(shard.iter().copied()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
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
                .filter(|s| owns(**s, d))
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
            let before = owner(d, 4);
            let after = owner(d, 5);
            if before != after {
                assert_eq!(after, 4, "{d} moved from {before} to an old shard {after}");
                moved += 1;
            }
        }
        // A fifth of the fleet in expectation.
        assert!((300..=500).contains(&moved), "{moved} moved");
    }
}
