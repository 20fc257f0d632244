//! `pollen data`: getting a CSV file ready for a run. `inspect` shows what a file holds and
//! drafts the spec's `[task]` for it; `split` writes one file per device (by a column's
//! values, or into equal parts that keep series whole), as a fleet's devices would hold them.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::Context;
use pollen_train::data::Table;
use pollen_train::data::partition::{by_key, iid_split};

/// What one column holds.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ColumnSummary {
    pub name: String,
    /// `number` or `text`.
    pub kind: &'static str,
    pub empty: usize,
    pub distinct: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
}

/// What a CSV file holds.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Inspection {
    pub file: String,
    pub rows: usize,
    pub columns: Vec<ColumnSummary>,
    /// Rows per value of the label column, when one was named.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, usize>>,
}

/// Reads `path` and summarises its columns (and the `label` column's values).
pub fn inspect(path: &Path, label: Option<&str>) -> anyhow::Result<Inspection> {
    let table = Table::read(path)?;
    let mut columns = Vec::new();
    for name in table.names() {
        let texts = table.texts(name)?;
        let empty = texts.iter().filter(|t| t.is_empty()).count();
        let distinct = texts.iter().collect::<BTreeSet<_>>().len();
        let numbers: Option<Vec<f64>> = texts
            .iter()
            .filter(|t| !t.is_empty())
            .map(|t| t.parse::<f64>().ok().filter(|x| x.is_finite()))
            .collect();
        let (kind, min, max) = match numbers {
            Some(v) if !v.is_empty() => (
                "number",
                v.iter().copied().reduce(f64::min),
                v.iter().copied().reduce(f64::max),
            ),
            _ => ("text", None, None),
        };
        columns.push(ColumnSummary {
            name: name.clone(),
            kind,
            empty,
            distinct,
            min,
            max,
        });
    }
    let labels = match label {
        None => None,
        Some(column) => {
            let mut counts = BTreeMap::new();
            for l in table.labels(column)?.into_iter().flatten() {
                *counts.entry(l).or_insert(0) += 1;
            }
            Some(counts)
        }
    };
    Ok(Inspection {
        file: path.display().to_string(),
        rows: table.rows(),
        columns,
        labels,
    })
}

impl Inspection {
    /// The summary as a person reads it, with a draft `[task]` section.
    pub fn human(&self, label: Option<&str>) -> String {
        let mut out = format!(
            "{}: {} rows, {} columns\n",
            self.file,
            self.rows,
            self.columns.len()
        );
        out.push_str(&format!(
            "{:<24} {:<7} {:>8} {:>8} {:>12} {:>12}\n",
            "COLUMN", "KIND", "EMPTY", "DISTINCT", "MIN", "MAX"
        ));
        let num = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.6}"));
        for c in &self.columns {
            out.push_str(&format!(
                "{:<24} {:<7} {:>8} {:>8} {:>12} {:>12}\n",
                c.name,
                c.kind,
                c.empty,
                c.distinct,
                num(c.min),
                num(c.max)
            ));
        }
        if let Some(labels) = &self.labels {
            out.push_str(&format!("labels of {:?}:", label.unwrap_or_default()));
            for (l, n) in labels {
                out.push_str(&format!(" {l}={n}"));
            }
            out.push('\n');
        }
        // Columns named as times are the usual time column, not a feature; text columns other
        // than the label usually name series (a recording, a machine).
        const TIME_NAMES: &[&str] = &["time", "timestamp", "ts", "t", "date", "datetime"];
        let is_time =
            |c: &ColumnSummary| TIME_NAMES.contains(&c.name.to_ascii_lowercase().as_str());
        let features: Vec<String> = self
            .columns
            .iter()
            .filter(|c| c.kind == "number" && Some(c.name.as_str()) != label && !is_time(c))
            .map(|c| format!("{:?}", c.name))
            .collect();
        out.push_str("\nA [task] for it (see the README's \"Run specs\" for windows):\n[task]\n");
        match label {
            Some(l) => out.push_str(&format!("kind = \"classification\"\nlabel = {l:?}\n")),
            None => out.push_str(
                "kind = \"regression\"   # or classification / anomaly\ntarget = \"...\"\n",
            ),
        }
        for c in self.columns.iter().filter(|c| is_time(c)) {
            out.push_str(&format!("time = {:?}\n", c.name));
        }
        for c in self
            .columns
            .iter()
            .filter(|c| c.kind == "text" && Some(c.name.as_str()) != label && !is_time(c))
        {
            out.push_str(&format!(
                "group = {:?}     # if each value is one series (a recording, a machine)\n",
                c.name
            ));
        }
        out.push_str(&format!("features = [{}]\n", features.join(", ")));
        out
    }
}

/// How `pollen data split` divides a file.
#[derive(Debug, Clone)]
pub enum SplitBy {
    /// One file per value of this column.
    Column(String),
    /// This many files of about equal size; `group` rows stay together.
    Parts {
        parts: usize,
        group: Option<String>,
        seed: u64,
    },
}

/// Writes the rows of `path` into files in `out` (named after the file and the part), and
/// returns them with their row counts.
pub fn split(path: &Path, by: &SplitBy, out: &Path) -> anyhow::Result<Vec<(PathBuf, usize)>> {
    let table = Table::read(path)?;
    let parts: Vec<(String, Vec<usize>)> = match by {
        SplitBy::Column(column) => {
            let keys = table.texts(column)?;
            by_key(&keys)
                .into_iter()
                .map(|rows| (sanitize(keys[rows[0]]), rows))
                .collect()
        }
        SplitBy::Parts { parts, group, seed } => {
            anyhow::ensure!(*parts >= 1, "--parts must be at least 1");
            let units: Vec<Vec<usize>> = match group {
                Some(g) => by_key(&table.texts(g)?),
                None => (0..table.rows()).map(|r| vec![r]).collect(),
            };
            anyhow::ensure!(
                units.len() >= *parts,
                "{} holds {} {}; it cannot be split into {parts} parts",
                path.display(),
                units.len(),
                if group.is_some() { "series" } else { "rows" }
            );
            iid_split(units.len(), *parts, *seed)
                .into_iter()
                .enumerate()
                .map(|(i, us)| {
                    let mut rows: Vec<usize> = us.iter().flat_map(|&u| units[u].clone()).collect();
                    rows.sort_unstable();
                    (format!("{i}"), rows)
                })
                .collect()
        }
    };
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let stem = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let stem = stem
        .trim_end_matches(".gz")
        .trim_end_matches(".csv")
        .to_string();
    let mut written = Vec::new();
    for (name, rows) in parts {
        let file = out.join(format!("{stem}-{name}.csv"));
        let mut w =
            csv::Writer::from_path(&file).with_context(|| format!("writing {}", file.display()))?;
        w.write_record(table.names())?;
        for &r in &rows {
            w.write_record((0..table.names().len()).map(|c| table.cell(c, r)))?;
        }
        w.flush()?;
        written.push((file, rows.len()));
    }
    Ok(written)
}

/// A column value as part of a file name.
fn sanitize(value: &str) -> String {
    let s: String = value
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if s.is_empty() { "empty".into() } else { s }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_splits_by_column_and_into_parts_that_keep_series_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log.csv");
        std::fs::write(
            &path,
            "site,series,v\nnorth,a,1\nsouth,b,2\nnorth,a,3\nsouth,c,4\nnorth,d,5\n",
        )
        .expect("write");
        let files = split(
            &path,
            &SplitBy::Column("site".into()),
            &dir.path().join("by"),
        )
        .expect("split");
        let names: Vec<String> = files
            .iter()
            .map(|(f, n)| format!("{}:{n}", f.file_name().expect("name").to_string_lossy()))
            .collect();
        assert_eq!(names, ["log-north.csv:3", "log-south.csv:2"]);
        let north = Table::read(&files[0].0).expect("reads");
        assert_eq!(north.texts("v").expect("v"), ["1", "3", "5"]);
        let parts = split(
            &path,
            &SplitBy::Parts {
                parts: 2,
                group: Some("series".into()),
                seed: 1,
            },
            &dir.path().join("parts"),
        )
        .expect("split");
        for (file, _) in &parts {
            let t = Table::read(file).expect("reads");
            let series: BTreeSet<&str> = t.texts("series").expect("series").into_iter().collect();
            // Series a has two rows: they stay in one file.
            if series.contains("a") {
                assert_eq!(
                    t.texts("series")
                        .expect("s")
                        .iter()
                        .filter(|s| **s == "a")
                        .count(),
                    2
                );
            }
        }
        assert_eq!(parts.iter().map(|(_, n)| n).sum::<usize>(), 5);
        let i = inspect(&path, Some("site")).expect("inspects");
        assert_eq!(i.rows, 5);
        assert_eq!(i.columns[2].kind, "number");
        assert_eq!(i.labels.expect("labels")["north"], 3);
    }
}
