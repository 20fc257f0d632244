//! A device's own data: read from the files devices write, turned into the examples a task
//! asks for, split into training data and a local holdout, scaled, and summarised as
//! federated statistics.
//!
//! ```text
//! DataSource (path, format) --read--> Raw (Table | Arrays) --prepare(task)--> Examples
//!   --split(holdout)--> LocalData { train, holdout } --scale(fitted)--> what the trainer reads
//! ```

pub mod arrays;
pub mod partition;
pub mod prepare;
mod source;
mod split;
pub mod stats;
pub mod table;
pub mod window;

pub use arrays::Arrays;
pub use prepare::prepare;
pub use source::{DataSource, Format, Shard};
pub use split::split;
pub use table::Table;

use crate::manifest::Scaling;

/// Why data cannot be read or does not fit a task. Messages name the file, and the line and
/// column when one cell is at fault.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: line {line}: {reason}")]
    Csv {
        path: String,
        line: u64,
        reason: String,
    },
    #[error("{path}: line {line}, column {column:?}: {reason}")]
    Cell {
        path: String,
        line: u64,
        column: String,
        reason: String,
    },
    #[error("{path}: {reason}")]
    Format { path: String, reason: String },
    /// The data is readable but does not fit the task (schema, shape, labels).
    #[error("{origin}: {reason}")]
    Mismatch { origin: String, reason: String },
}

/// Data as read from a device's files, before any task is applied.
#[derive(Debug, Clone, PartialEq)]
pub enum Raw {
    Table(Table),
    Arrays(Arrays),
}

impl Raw {
    pub fn origin(&self) -> &str {
        match self {
            Raw::Table(t) => &t.origin,
            Raw::Arrays(a) => &a.origin,
        }
    }

    /// Rows (tables) or examples (arrays).
    pub fn rows(&self) -> usize {
        match self {
            Raw::Table(t) => t.rows(),
            Raw::Arrays(a) => a.len(),
        }
    }

    /// The rows (examples) `rows`, in that order.
    pub fn select(&self, rows: &[usize]) -> Raw {
        match self {
            Raw::Table(t) => Raw::Table(t.select(rows)),
            Raw::Arrays(a) => Raw::Arrays(a.select(rows)),
        }
    }

    /// What a device announces about this data.
    pub fn schema(&self, format: Format) -> pollen_proto::fleet::DataSchema {
        match self {
            Raw::Table(t) => pollen_proto::fleet::DataSchema {
                format: format.name().into(),
                columns: t.names().to_vec(),
                example_shape: Vec::new(),
                rows: t.rows() as u64,
                columns_omitted: false,
            },
            Raw::Arrays(a) => pollen_proto::fleet::DataSchema {
                format: format.name().into(),
                columns: Vec::new(),
                example_shape: a.shape.iter().map(|&d| d as u64).collect(),
                rows: a.len() as u64,
                columns_omitted: false,
            },
        }
    }
}

/// Examples as the model sees them.
#[derive(Debug, Clone, PartialEq)]
pub struct Examples {
    /// The shape of one example.
    pub shape: Vec<usize>,
    /// `len * prod(shape)` values, example-major (windows channel-major).
    pub x: Vec<f32>,
    /// Class index (classification), or 0 normal / 1 anomaly (labelled anomaly detection).
    pub labels: Option<Vec<u32>>,
    /// Regression targets, in the target's own units.
    pub targets: Option<Vec<f32>>,
    /// The series each example belongs to (its group, or the example itself): the holdout
    /// keeps a series together.
    pub series: Vec<u32>,
    /// Position of the example's first reading within its series.
    pub position: Vec<u32>,
    /// Readings an example spans (the window length; 1 for rows and arrays), so that a
    /// temporal holdout leaves no overlap with training windows.
    pub span: u32,
}

impl Examples {
    pub fn len(&self) -> usize {
        self.series.len()
    }

    pub fn is_empty(&self) -> bool {
        self.series.is_empty()
    }

    /// Values per example.
    pub fn width(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn example(&self, i: usize) -> &[f32] {
        let w = self.width();
        &self.x[i * w..(i + 1) * w]
    }

    /// Channels: features of a vector, the first dimension otherwise.
    pub fn channels(&self) -> usize {
        match self.shape.as_slice() {
            [features] => *features,
            [channels, ..] => *channels,
            [] => 0,
        }
    }

    /// Standardises every value with its channel's mean and standard deviation.
    pub fn scale(&mut self, scaling: &Scaling) {
        let channels = self.channels();
        let per_channel = self.width() / channels.max(1);
        let factors: Vec<(f32, f32)> = (0..channels)
            .map(|c| (scaling.mean[c] as f32, (1.0 / scaling.std_or_one(c)) as f32))
            .collect();
        for example in self
            .x
            .chunks_mut(self.shape.iter().product::<usize>().max(1))
        {
            if self.shape.len() == 1 {
                for (v, (mean, inv)) in example.iter_mut().zip(&factors) {
                    *v = (*v - mean) * inv;
                }
            } else {
                for (c, block) in example.chunks_mut(per_channel).enumerate() {
                    let (mean, inv) = factors[c];
                    for v in block {
                        *v = (*v - mean) * inv;
                    }
                }
            }
        }
    }
}

/// A device's examples, split into training data and its local holdout.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalData {
    pub examples: Examples,
    pub train: Vec<usize>,
    pub holdout: Vec<usize>,
}
