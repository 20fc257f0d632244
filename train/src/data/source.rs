//! Where a device's data lives: the `[data]` section of an agent's config (and of a run spec,
//! for simulation and server-side evaluation).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::arrays::{MnistSplit, read_mnist};
use super::partition::iid_split;
use super::{Arrays, DataError, Raw, Table};

/// A data file format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// A CSV file with a header (`.csv`, or gzip-compressed `.csv.gz`).
    Csv,
    /// NumPy arrays: `path` holds the features `[examples, ...]`, `labels` the labels or
    /// targets `[examples]`.
    Npy,
    /// A folder of MNIST IDX files.
    Mnist,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Csv => "csv",
            Format::Npy => "npy",
            Format::Mnist => "mnist",
        }
    }

    /// The format a path's name implies.
    pub fn guess(path: &Path) -> Option<Format> {
        let name = path.file_name()?.to_string_lossy().to_ascii_lowercase();
        if name.ends_with(".csv") || name.ends_with(".csv.gz") {
            Some(Format::Csv)
        } else if name.ends_with(".npy") {
            Some(Format::Npy)
        } else if path.is_dir() {
            Some(Format::Mnist)
        } else {
            None
        }
    }
}

/// An IID share of a data set: the `index`-th of `count` equal parts, written `INDEX/COUNT`.
pub type Shard = pollen_proto::Part;

/// A device's local data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSource {
    /// A CSV file, a `.npy` features file, or a folder of MNIST IDX files. Relative paths are
    /// relative to the working directory.
    #[serde(alias = "dir")]
    pub path: PathBuf,
    /// `csv`, `npy` or `mnist`; guessed from `path` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<Format>,
    /// npy: the labels (or regression targets), one per example.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<PathBuf>,
    /// Use only this IID share of the examples (arrays; for demos on one shared data set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard: Option<Shard>,
    /// Seed of the share's split: the same across a fleet, so that shares are disjoint.
    #[serde(default = "default_seed")]
    pub seed: u64,
}

fn default_seed() -> u64 {
    42
}

impl DataSource {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            format: None,
            labels: None,
            shard: None,
            seed: default_seed(),
        }
    }

    /// The format, given or guessed.
    pub fn format(&self) -> Result<Format, DataError> {
        match self.format.or_else(|| Format::guess(&self.path)) {
            Some(f) => Ok(f),
            None => Err(DataError::Format {
                path: self.path.display().to_string(),
                reason: "cannot tell the format from the name; set data.format = \"csv\", \"npy\" or \"mnist\""
                    .into(),
            }),
        }
    }

    /// Reads the data (the share of it, with `shard`). MNIST reads its training split.
    pub fn read(&self) -> Result<Raw, DataError> {
        self.read_split(MnistSplit::Train)
    }

    /// Reads the data; MNIST reads `split`.
    pub fn read_split(&self, split: MnistSplit) -> Result<Raw, DataError> {
        let format = self.format()?;
        if let Some(shard) = self.shard
            && !shard.is_valid()
        {
            return Err(DataError::Format {
                path: self.path.display().to_string(),
                reason: format!(
                    "data.shard {shard}: the index must be below the count, at most {}",
                    pollen_proto::part::MAX_COUNT
                ),
            });
        }
        match format {
            Format::Csv => {
                if self.shard.is_some() {
                    return Err(DataError::Format {
                        path: self.path.display().to_string(),
                        reason: "data.shard splits arrays; give each device a CSV file of its own (`pollen data split` writes them)".into(),
                    });
                }
                Ok(Raw::Table(Table::read(&self.path)?))
            }
            Format::Npy => {
                let arrays = Arrays::read_npy(&self.path, self.labels.as_deref())?;
                Ok(Raw::Arrays(match self.shard {
                    None => arrays,
                    Some(shard) => {
                        let mut rows = iid_split(arrays.len(), shard.count as usize, self.seed)
                            .swap_remove(shard.index as usize);
                        rows.sort_unstable();
                        arrays.select(&rows)
                    }
                }))
            }
            Format::Mnist => {
                let keep = match self.shard {
                    None => None,
                    Some(shard) => {
                        let labels = super::arrays::mnist_labels(&self.path, split)?;
                        Some(
                            iid_split(labels.len(), shard.count as usize, self.seed)
                                .swap_remove(shard.index as usize),
                        )
                    }
                };
                Ok(Raw::Arrays(read_mnist(&self.path, split, keep)?))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_are_guessed_from_names() {
        assert_eq!(Format::guess(Path::new("a/b.csv")), Some(Format::Csv));
        assert_eq!(Format::guess(Path::new("b.CSV.gz")), Some(Format::Csv));
        assert_eq!(Format::guess(Path::new("x.npy")), Some(Format::Npy));
        let e = DataSource::new("x.parquet")
            .format()
            .expect_err("unknown")
            .to_string();
        assert!(e.contains("data.format"), "{e}");
    }

    #[test]
    fn an_mnist_shard_is_that_share_of_the_training_split() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/mnist");
        let mut source = DataSource::new(&dir);
        source.shard = Some(Shard {
            index: 3,
            count: 100,
        });
        let Raw::Arrays(a) = source.read().expect("reads") else {
            panic!("arrays")
        };
        assert_eq!(a.len(), 600);
        assert_eq!(a.x.len(), 600 * 784);
    }
}
