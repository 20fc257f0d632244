//! Splitting a data set across simulated clients, deterministically from a seed.
//!
//! What is split are *units*: rows, or whole series when the task has a group column (a
//! series never spans two devices, so windows never cross a device either). Label-based
//! partitions use each unit's label (a series' most frequent one).
//!
//! - `iid`: shuffle, then equal slices (McMahan et al.'s IID setting).
//! - `shards`: sort by label, cut into `num_shards` shards, give each client
//!   `shards_per_client` (McMahan's pathological non-IID: 200 shards of 300, 2 per client).
//! - `dirichlet`: for each class, split its examples across clients in proportions drawn from
//!   Dirichlet(alpha) (Hsu et al., 2019); small alpha means more skew.
//! - `column`: one client per value of a column (a site, a subject, a machine): the natural
//!   partition of a real fleet.

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Gamma};
use serde::{Deserialize, Serialize};

/// How to split the data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Partition {
    Iid,
    Shards {
        #[serde(default = "default_shards")]
        num_shards: usize,
        #[serde(default = "default_shards_per_client")]
        shards_per_client: usize,
    },
    Dirichlet {
        alpha: f64,
    },
    /// One client per distinct value of `column`, in order of first appearance.
    Column {
        column: String,
    },
}

fn default_shards() -> usize {
    200
}
fn default_shards_per_client() -> usize {
    2
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PartitionError {
    #[error("cannot split {examples} examples across {clients} clients")]
    TooFew { examples: usize, clients: usize },
    #[error(
        "shards: {clients} clients x {per_client} shards per client needs {needed} shards, but num_shards = {num_shards}"
    )]
    Shards {
        clients: usize,
        per_client: usize,
        needed: usize,
        num_shards: usize,
    },
    #[error("dirichlet: alpha = {0} must be a positive number")]
    Alpha(f64),
    #[error("at least one client is needed")]
    NoClients,
    #[error("partition {0} splits by class labels; this task has none")]
    NeedsLabels(&'static str),
    #[error("a column partition is made from the column's values, not by counting clients")]
    ByColumn,
}

/// The IID split of `n` examples into `count` equal parts (what `Partition::Iid` does, and a
/// device's `data.shard`).
pub fn iid_split(n: usize, count: usize, seed: u64) -> Vec<Vec<usize>> {
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    let per = (n / count.max(1)).max(1);
    let mut parts: Vec<Vec<usize>> = idx.chunks(per).take(count).map(<[usize]>::to_vec).collect();
    parts.resize(count, Vec::new());
    parts
}

/// One part per distinct key, in order of first appearance.
pub fn by_key<K: std::hash::Hash + Eq>(keys: &[K]) -> Vec<Vec<usize>> {
    let mut index: std::collections::HashMap<&K, usize> = std::collections::HashMap::new();
    let mut parts: Vec<Vec<usize>> = Vec::new();
    for (i, k) in keys.iter().enumerate() {
        let next = parts.len();
        let p = *index.entry(k).or_insert(next);
        if p == parts.len() {
            parts.push(Vec::new());
        }
        parts[p].push(i);
    }
    parts
}

impl Partition {
    pub fn name(&self) -> &'static str {
        match self {
            Partition::Iid => "iid",
            Partition::Shards { .. } => "shards",
            Partition::Dirichlet { .. } => "dirichlet",
            Partition::Column { .. } => "column",
        }
    }

    /// Indices of the units each of `clients` clients holds; `labels` are the units' classes
    /// (`None` when the task has none). A `column` partition is made by [`by_key`] instead.
    pub fn split(
        &self,
        labels: Option<&[u32]>,
        units: usize,
        clients: usize,
        seed: u64,
    ) -> Result<Vec<Vec<usize>>, PartitionError> {
        if clients == 0 {
            return Err(PartitionError::NoClients);
        }
        if units < clients {
            return Err(PartitionError::TooFew {
                examples: units,
                clients,
            });
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let labelled = || labels.ok_or(PartitionError::NeedsLabels(self.name()));
        match *self {
            Partition::Iid => Ok(iid_split(units, clients, seed)),
            Partition::Column { .. } => Err(PartitionError::ByColumn),
            Partition::Shards {
                num_shards,
                shards_per_client,
            } => {
                let labels = labelled()?;
                let needed = clients * shards_per_client;
                if needed > num_shards || num_shards > labels.len() {
                    return Err(PartitionError::Shards {
                        clients,
                        per_client: shards_per_client,
                        needed,
                        num_shards,
                    });
                }
                let mut idx: Vec<usize> = (0..labels.len()).collect();
                // Stable sort by label keeps the original order within a label, as in the paper.
                idx.sort_by_key(|&i| labels[i]);
                let size = labels.len() / num_shards;
                let mut shard_ids: Vec<usize> = (0..num_shards).collect();
                shard_ids.shuffle(&mut rng);
                Ok(shard_ids
                    .chunks(shards_per_client)
                    .take(clients)
                    .map(|shards| {
                        shards
                            .iter()
                            .flat_map(|&s| idx[s * size..(s + 1) * size].iter().copied())
                            .collect()
                    })
                    .collect())
            }
            Partition::Dirichlet { alpha } => {
                let labels = labelled()?;
                if !(alpha.is_finite() && alpha > 0.0) {
                    return Err(PartitionError::Alpha(alpha));
                }
                let classes = labels.iter().max().map_or(0, |&m| m + 1);
                // Dirichlet(alpha, ..., alpha) as normalised Gamma(alpha, 1) draws.
                let gamma = Gamma::new(alpha, 1.0).map_err(|_| PartitionError::Alpha(alpha))?;
                let mut out = vec![Vec::new(); clients];
                for class in 0..classes {
                    let mut members: Vec<usize> =
                        (0..labels.len()).filter(|&i| labels[i] == class).collect();
                    members.shuffle(&mut rng);
                    let draws: Vec<f64> = (0..clients).map(|_| gamma.sample(&mut rng)).collect();
                    let total: f64 = draws.iter().sum::<f64>().max(f64::MIN_POSITIVE);
                    let p: Vec<f64> = draws.iter().map(|d| d / total).collect();
                    let mut start = 0;
                    let mut acc = 0.0;
                    for (c, share) in p.iter().enumerate() {
                        acc += share;
                        let end = if c + 1 == clients {
                            members.len()
                        } else {
                            ((acc * members.len() as f64).round() as usize).min(members.len())
                        };
                        out[c].extend_from_slice(&members[start..end.max(start)]);
                        start = end.max(start);
                    }
                }
                // A client left empty by the draw gets one example from the largest client, so
                // that every simulated client can train.
                for c in 0..clients {
                    if out[c].is_empty() {
                        let donor = (0..clients)
                            .max_by_key(|&d| out[d].len())
                            .expect("clients > 0");
                        let moved = out[donor].pop().expect("largest client is not empty");
                        out[c].push(moved);
                    }
                }
                for part in &mut out {
                    part.shuffle(&mut rng);
                }
                Ok(out)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn labels(n: usize) -> Vec<u32> {
        (0..n).map(|i| (i % 10) as u32).collect()
    }

    fn disjoint(parts: &[Vec<usize>]) -> bool {
        let mut seen = HashSet::new();
        parts.iter().flatten().all(|i| seen.insert(*i))
    }

    #[test]
    fn iid_gives_equal_disjoint_slices_and_is_reproducible() {
        let l = labels(60_000);
        let a = Partition::Iid
            .split(Some(&l), l.len(), 100, 1)
            .expect("split");
        assert_eq!(a.len(), 100);
        assert!(a.iter().all(|p| p.len() == 600));
        assert!(disjoint(&a));
        assert_eq!(
            a,
            Partition::Iid
                .split(Some(&l), l.len(), 100, 1)
                .expect("split")
        );
        assert_ne!(
            a,
            Partition::Iid
                .split(Some(&l), l.len(), 100, 2)
                .expect("split")
        );
    }

    #[test]
    fn shards_give_each_client_at_most_two_labels() {
        let mut l = labels(60_000);
        l.sort();
        let p = Partition::Shards {
            num_shards: 200,
            shards_per_client: 2,
        };
        let parts = p.split(Some(&l), l.len(), 100, 3).expect("split");
        assert!(parts.iter().all(|p| p.len() == 600));
        assert!(disjoint(&parts));
        for part in &parts {
            let distinct: HashSet<u32> = part.iter().map(|&i| l[i]).collect();
            assert!(distinct.len() <= 2, "{distinct:?}");
        }
        let too_many = p
            .split(Some(&l), l.len(), 101, 3)
            .expect_err("needs 202 shards");
        assert!(too_many.to_string().contains("202"));
    }

    #[test]
    fn dirichlet_covers_every_example_once_and_skews_with_small_alpha() {
        let l = labels(10_000);
        let parts = Partition::Dirichlet { alpha: 0.1 }
            .split(Some(&l), l.len(), 20, 5)
            .expect("split");
        assert!(disjoint(&parts));
        assert_eq!(parts.iter().map(Vec::len).sum::<usize>(), 10_000);
        assert!(parts.iter().all(|p| !p.is_empty()));
        // With alpha = 0.1 most clients are dominated by few labels.
        let dominated = parts
            .iter()
            .filter(|p| {
                let mut counts = [0usize; 10];
                p.iter().for_each(|&i| counts[l[i] as usize] += 1);
                *counts.iter().max().expect("10 classes") * 2 > p.len()
            })
            .count();
        assert!(
            dominated >= 10,
            "{dominated} of 20 clients dominated by one label"
        );
        assert!(
            Partition::Dirichlet { alpha: 0.0 }
                .split(Some(&l), l.len(), 20, 5)
                .is_err()
        );
    }

    #[test]
    fn a_column_partition_gives_one_client_per_value_and_label_partitions_need_labels() {
        let parts = by_key(&["b", "a", "b", "c", "a"]);
        assert_eq!(parts, vec![vec![0, 2], vec![1, 4], vec![3]]);
        let e = Partition::Dirichlet { alpha: 1.0 }
            .split(None, 10, 2, 1)
            .expect_err("no labels");
        assert!(e.to_string().contains("dirichlet"), "{e}");
    }
}
