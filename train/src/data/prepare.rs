//! Raw data + a task's input schema -> the examples the model sees: feature columns selected,
//! labels mapped to classes (or targets read), missing values refused or dropped, long-format
//! series cut into windows. Every mismatch names the file, and the line and column when a cell
//! is at fault.

use std::collections::HashMap;

use super::table::{label_of, number_label, preview};
use super::window;
use super::{Arrays, DataError, Examples, Raw, Table};
use crate::manifest::{Missing, TaskKind, TaskSpec};

/// The examples `task` asks for from `raw`.
pub fn prepare(raw: &Raw, task: &TaskSpec) -> Result<Examples, DataError> {
    match raw {
        Raw::Table(t) => from_table(t, task),
        Raw::Arrays(a) => from_arrays(a, task),
    }
}

/// Maps label names to class indices: the task's classes when it has them, else the labels
/// found, sorted (numerically when they are all numbers).
struct Labels {
    names: Vec<String>,
    index: HashMap<String, u32>,
}

impl Labels {
    fn new(task: &TaskSpec, found: impl Iterator<Item = String>) -> Self {
        let names = match (&task.kind, &task.classes) {
            (TaskKind::Anomaly, _) => vec!["normal".to_string(), "anomaly".to_string()],
            (_, Some(classes)) => classes.clone(),
            (_, None) => sorted_labels(found.collect()),
        };
        let index = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), i as u32))
            .collect();
        Self { names, index }
    }
}

/// Distinct labels, in numeric order when every label is a number, else in text order.
pub fn sorted_labels(mut labels: Vec<String>) -> Vec<String> {
    labels.sort();
    labels.dedup();
    if labels.iter().all(|l| l.parse::<f64>().is_ok()) {
        labels.sort_by(|a, b| {
            let (x, y) = (
                a.parse::<f64>().unwrap_or(0.0),
                b.parse::<f64>().unwrap_or(0.0),
            );
            x.total_cmp(&y)
        });
    }
    labels
}

fn require<'a>(field: &'a Option<String>, what: &str) -> Result<&'a str, String> {
    field
        .as_deref()
        .ok_or_else(|| format!("the task names no {what} column"))
}

fn from_table(t: &Table, task: &TaskSpec) -> Result<Examples, DataError> {
    let mismatch = |reason: String| DataError::Mismatch {
        origin: t.origin.clone(),
        reason,
    };
    let features = task.features.as_ref().ok_or_else(|| {
        mismatch("the task lists no feature columns (task.features), which CSV data needs".into())
    })?;
    let missing: Vec<&String> = features.iter().filter(|f| !t.has(f)).collect();
    if !missing.is_empty() {
        return Err(mismatch(format!(
            "the task's feature column{} {} {} not in this file; its header has {}",
            if missing.len() == 1 { "" } else { "s" },
            missing
                .iter()
                .map(|m| format!("{m:?}"))
                .collect::<Vec<_>>()
                .join(", "),
            if missing.len() == 1 { "is" } else { "are" },
            preview(t.names())
        )));
    }
    let columns: Vec<Vec<Option<f64>>> = features
        .iter()
        .map(|f| t.numbers(f))
        .collect::<Result<_, _>>()?;
    let rows = t.rows();
    let mut keep = vec![true; rows];
    let mut drop_or_fail = |row: usize, column: &str, what: &str| -> Result<(), DataError> {
        match task.missing {
            Missing::Drop => {
                keep[row] = false;
                Ok(())
            }
            Missing::Error => Err(t.cell_error(
                row,
                column,
                format!(
                    "the {what} is missing (set task.missing = \"drop\" to leave such rows out)"
                ),
            )),
        }
    };
    for (f, values) in features.iter().zip(&columns) {
        for (row, v) in values.iter().enumerate() {
            if v.is_none() {
                drop_or_fail(row, f, "value")?;
            }
        }
    }
    let label_cells = match task.kind {
        TaskKind::Classification => {
            let column = require(&task.label, "label").map_err(&mismatch)?;
            Some((column, t.labels(column)?))
        }
        TaskKind::Anomaly => match &task.label {
            Some(column) => Some((column.as_str(), t.labels(column)?)),
            None => None,
        },
        TaskKind::Regression => None,
    };
    if let Some((column, cells)) = &label_cells {
        for (row, c) in cells.iter().enumerate() {
            if c.is_none() {
                drop_or_fail(row, column, "label")?;
            }
        }
    }
    let targets = match task.kind {
        TaskKind::Regression => {
            let column = require(&task.target, "target").map_err(&mismatch)?;
            let values = t.numbers(column)?;
            for (row, v) in values.iter().enumerate() {
                if v.is_none() {
                    drop_or_fail(row, column, "target")?;
                }
            }
            Some(values)
        }
        _ => None,
    };
    let groups: Vec<u32> = match &task.group {
        Some(column) => {
            let mut ids: HashMap<&str, u32> = HashMap::new();
            t.texts(column)?
                .into_iter()
                .map(|key| {
                    let next = ids.len() as u32;
                    *ids.entry(key).or_insert(next)
                })
                .collect()
        }
        None => vec![0; rows],
    };
    let times = match &task.time {
        Some(column) => Some(times(t, column)?),
        None => None,
    };
    let kept: Vec<usize> = (0..rows).filter(|&r| keep[r]).collect();
    if kept.is_empty() {
        return Err(mismatch(if rows == 0 {
            "the file has a header but no rows".into()
        } else {
            format!("none of its {rows} rows is complete")
        }));
    }

    // Labels of kept rows, mapped to class indices.
    let labels = label_cells.as_ref().map(|(_, cells)| {
        let found = kept.iter().filter_map(|&r| cells[r].clone());
        Labels::new(task, found)
    });
    let class_of = |row: usize| -> Result<u32, DataError> {
        let (Some((column, cells)), Some(labels)) = (&label_cells, &labels) else {
            return Ok(0);
        };
        let label = cells[row].as_deref().unwrap_or_default();
        if task.kind == TaskKind::Anomaly {
            return Ok(u32::from(label != label_of(task.normal_label())));
        }
        labels.index.get(label).copied().ok_or_else(|| {
            t.cell_error(
                row,
                column,
                format!(
                    "label {label:?} is not one of the task's classes ({})",
                    preview(&labels.names)
                ),
            )
        })
    };
    let channels = features.len();
    match &task.window {
        None => {
            let mut x = Vec::with_capacity(kept.len() * channels);
            let mut ys = Vec::with_capacity(kept.len());
            let mut series = Vec::with_capacity(kept.len());
            for &r in &kept {
                x.extend(columns.iter().map(|c| c[r].unwrap_or_default() as f32));
                ys.push(class_of(r)?);
                // Without a group, each row is its own series.
                series.push(if task.group.is_some() {
                    groups[r]
                } else {
                    r as u32
                });
            }
            Ok(Examples {
                shape: vec![channels],
                x,
                labels: label_cells.as_ref().map(|_| ys),
                targets: targets.as_ref().map(|v| {
                    kept.iter()
                        .map(|&r| v[r].unwrap_or_default() as f32)
                        .collect()
                }),
                position: kept.iter().map(|&r| r as u32).collect(),
                series,
                span: 1,
            })
        }
        Some(spec) => {
            let length = spec.length;
            let kept_groups: Vec<u32> = kept.iter().map(|&r| groups[r]).collect();
            let kept_times: Option<Vec<f64>> =
                times.as_ref().map(|t| kept.iter().map(|&r| t[r]).collect());
            let cut = window::cut(
                &kept_groups,
                kept_times.as_deref(),
                length,
                spec.stride(),
                spec.max_gap,
            );
            if cut.windows.is_empty() {
                let series = kept_groups
                    .iter()
                    .collect::<std::collections::HashSet<_>>()
                    .len();
                return Err(mismatch(format!(
                    "too few rows for one window of {length} readings: {} rows in {series} series ({} segments), the longest has {} rows",
                    kept.len(),
                    cut.segments,
                    cut.longest_segment
                )));
            }
            let n = cut.windows.len();
            let mut x = Vec::with_capacity(n * channels * length);
            let mut ys = Vec::with_capacity(n);
            let mut ts = Vec::with_capacity(n);
            let num_classes = labels.as_ref().map_or(1, |l| l.names.len());
            let mut votes = vec![0u32; num_classes];
            for w in &cut.windows {
                let rows: Vec<usize> = cut.order[w.start..w.start + length]
                    .iter()
                    .map(|&k| kept[k])
                    .collect();
                for c in &columns {
                    x.extend(rows.iter().map(|&r| c[r].unwrap_or_default() as f32));
                }
                if label_cells.is_some() {
                    // The window's label is its most frequent one (ties: the lower class).
                    votes.iter_mut().for_each(|v| *v = 0);
                    for &r in &rows {
                        votes[class_of(r)? as usize] += 1;
                    }
                    let best = (0..num_classes)
                        .max_by_key(|&k| (votes[k], std::cmp::Reverse(k)))
                        .unwrap_or(0);
                    ys.push(best as u32);
                }
                if let Some(v) = &targets {
                    let last = *rows.last().expect("a window has readings");
                    ts.push(v[last].unwrap_or_default() as f32);
                }
            }
            Ok(Examples {
                shape: vec![channels, length],
                x,
                labels: label_cells.as_ref().map(|_| ys),
                targets: targets.as_ref().map(|_| ts),
                series: cut.windows.iter().map(|w| w.series).collect(),
                position: cut.windows.iter().map(|w| w.position).collect(),
                span: length as u32,
            })
        }
    }
}

/// A time column as seconds: numbers as they are, or timestamps.
fn times(t: &Table, column: &str) -> Result<Vec<f64>, DataError> {
    let cells = t.texts(column)?;
    cells
        .iter()
        .enumerate()
        .map(|(row, cell)| {
            parse_time(cell).ok_or_else(|| {
                t.cell_error(
                    row,
                    column,
                    format!(
                        "{cell:?} is not a time: use a number, or a timestamp like 2024-05-01T12:00:00Z or 2024-05-01 12:00:00.015"
                    ),
                )
            })
        })
        .collect()
}

/// Seconds since the Unix epoch (timestamps), or the number itself.
pub fn parse_time(cell: &str) -> Option<f64> {
    if let Ok(x) = cell.parse::<f64>() {
        return x.is_finite().then_some(x);
    }
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(cell) {
        return Some(t.timestamp_micros() as f64 / 1e6);
    }
    for format in [
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%d %H:%M",
    ] {
        if let Ok(t) = chrono::NaiveDateTime::parse_from_str(cell, format) {
            return Some(t.and_utc().timestamp_micros() as f64 / 1e6);
        }
    }
    None
}

fn from_arrays(a: &Arrays, task: &TaskSpec) -> Result<Examples, DataError> {
    let mismatch = |reason: String| DataError::Mismatch {
        origin: a.origin.clone(),
        reason,
    };
    let shape = match &task.shape {
        Some(want) => {
            let (w, have): (usize, usize) = (want.iter().product(), a.shape.iter().product());
            if w != have {
                return Err(mismatch(format!(
                    "examples have shape {:?} ({have} values); the task's input is {want:?} ({w} values)",
                    a.shape
                )));
            }
            want.clone()
        }
        None => a.shape.clone(),
    };
    if task.window.is_some() || task.features.is_some() {
        return Err(mismatch(
            "the task reads CSV columns (task.features / task.window); this device holds arrays"
                .into(),
        ));
    }
    if a.is_empty() {
        return Err(mismatch("no examples".into()));
    }
    let needs_y = matches!(task.kind, TaskKind::Classification | TaskKind::Regression);
    let y = match (&a.y, needs_y) {
        (None, true) => {
            return Err(mismatch(format!(
                "a {} task needs labels; this device has none (data.labels)",
                task.kind.name()
            )));
        }
        (y, _) => y.as_ref(),
    };
    let mut labels = None;
    let mut targets = None;
    match (task.kind, y) {
        (TaskKind::Regression, Some(y)) => {
            targets = Some(y.iter().map(|&v| v as f32).collect());
        }
        (TaskKind::Classification, Some(y)) => {
            let names: Vec<String> = y.iter().map(|&v| number_label(v)).collect();
            let map = Labels::new(task, names.iter().cloned());
            labels = Some(
                names
                    .iter()
                    .enumerate()
                    .map(|(i, n)| {
                        map.index.get(n).copied().ok_or_else(|| {
                            mismatch(format!(
                                "example {i}: label {n:?} is not one of the task's classes ({})",
                                preview(&map.names)
                            ))
                        })
                    })
                    .collect::<Result<Vec<u32>, _>>()?,
            );
        }
        (TaskKind::Anomaly, Some(y)) => {
            let normal = label_of(task.normal_label());
            labels = Some(
                y.iter()
                    .map(|&v| u32::from(number_label(v) != normal))
                    .collect(),
            );
        }
        _ => {}
    }
    let n = a.len();
    Ok(Examples {
        shape,
        x: a.x.clone(),
        labels,
        targets,
        series: (0..n as u32).collect(),
        position: (0..n as u32).collect(),
        span: 1,
    })
}

/// The label names of `examples` under `task`, as [`prepare`] mapped them (statistics count
/// examples per name).
pub fn label_names(raw: &Raw, task: &TaskSpec) -> Result<Vec<String>, DataError> {
    if task.kind == TaskKind::Anomaly {
        return Ok(vec!["normal".into(), "anomaly".into()]);
    }
    if let Some(classes) = &task.classes {
        return Ok(classes.clone());
    }
    let found: Vec<String> = match raw {
        Raw::Table(t) => match &task.label {
            Some(column) => t.labels(column)?.into_iter().flatten().collect(),
            None => Vec::new(),
        },
        Raw::Arrays(a) => {
            a.y.as_ref()
                .map(|y| y.iter().map(|&v| number_label(v)).collect())
                .unwrap_or_default()
        }
    };
    Ok(sorted_labels(found))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::WindowSpec;

    fn table(text: &str) -> Raw {
        Raw::Table(Table::from_reader(text.as_bytes(), "d.csv").expect("valid"))
    }

    fn task(kind: TaskKind) -> TaskSpec {
        TaskSpec::new(kind)
    }

    #[test]
    fn rows_become_examples_with_their_classes() {
        let raw = table("a,b,y\n1,2,cat\n3,4,dog\n5,6,cat\n");
        let mut t = task(TaskKind::Classification);
        t.features = Some(vec!["b".into(), "a".into()]);
        t.label = Some("y".into());
        let e = prepare(&raw, &t).expect("fits");
        assert_eq!(e.shape, vec![2]);
        assert_eq!(e.x, vec![2.0, 1.0, 4.0, 3.0, 6.0, 5.0]);
        assert_eq!(e.labels, Some(vec![0, 1, 0]));
        t.classes = Some(vec!["dog".into(), "cat".into()]);
        assert_eq!(prepare(&raw, &t).expect("fits").labels, Some(vec![1, 0, 1]));
        t.classes = Some(vec!["dog".into(), "bird".into()]);
        let e = prepare(&raw, &t).expect_err("cat").to_string();
        assert_eq!(
            e,
            "d.csv: line 2, column \"y\": label \"cat\" is not one of the task's classes (\"dog\", \"bird\")"
        );
    }

    #[test]
    fn a_missing_column_or_value_is_named() {
        let raw = table("a,y\n1,x\n,y\n");
        let mut t = task(TaskKind::Classification);
        t.features = Some(vec!["a".into(), "temp".into()]);
        t.label = Some("y".into());
        let e = prepare(&raw, &t).expect_err("temp").to_string();
        assert!(
            e.starts_with("d.csv: the task's feature column \"temp\" is not in this file"),
            "{e}"
        );
        t.features = Some(vec!["a".into()]);
        let e = prepare(&raw, &t).expect_err("empty a").to_string();
        assert!(
            e.starts_with("d.csv: line 3, column \"a\": the value is missing"),
            "{e}"
        );
        t.missing = Missing::Drop;
        assert_eq!(prepare(&raw, &t).expect("dropped").len(), 1);
    }

    #[test]
    fn windows_take_the_majority_label_and_the_last_target() {
        let raw = table(
            "series,t,v,state,power\nA,0,1,on,10\nA,1,2,on,11\nA,2,3,off,12\nB,0,4,off,20\nB,1,5,off,21\nB,2,6,on,22\n",
        );
        let mut t = task(TaskKind::Classification);
        t.features = Some(vec!["v".into()]);
        t.label = Some("state".into());
        t.group = Some("series".into());
        t.time = Some("t".into());
        t.window = Some(WindowSpec {
            length: 3,
            stride: None,
            max_gap: None,
        });
        let e = prepare(&raw, &t).expect("fits");
        assert_eq!(e.shape, vec![1, 3]);
        assert_eq!(e.x, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        // Classes sorted: off = 0, on = 1.
        assert_eq!(e.labels, Some(vec![1, 0]));
        assert_eq!(e.series, vec![0, 1]);
        let mut r = task(TaskKind::Regression);
        r.features = Some(vec!["v".into()]);
        r.target = Some("power".into());
        r.group = Some("series".into());
        r.window = t.window.clone();
        assert_eq!(
            prepare(&raw, &r).expect("fits").targets,
            Some(vec![12.0, 22.0])
        );
        r.window = Some(WindowSpec {
            length: 4,
            stride: None,
            max_gap: None,
        });
        let e = prepare(&raw, &r).expect_err("short").to_string();
        assert!(
            e.contains("too few rows for one window of 4 readings"),
            "{e}"
        );
        assert!(e.contains("the longest has 3 rows"), "{e}");
    }

    #[test]
    fn timestamps_parse_to_seconds() {
        assert_eq!(parse_time("12.5"), Some(12.5));
        assert_eq!(parse_time("1970-01-01 00:04:40.015"), Some(280.015));
        assert_eq!(parse_time("1970-01-01T00:00:01Z"), Some(1.0));
        assert_eq!(parse_time("noon"), None);
    }

    #[test]
    fn arrays_must_hold_as_many_values_as_the_input() {
        let a = Raw::Arrays(Arrays {
            origin: "x.npy".into(),
            shape: vec![4],
            x: vec![0.0; 8],
            y: Some(vec![1.0, 0.0]),
        });
        let mut t = task(TaskKind::Classification);
        t.shape = Some(vec![2, 2]);
        let e = prepare(&a, &t).expect("reshaped");
        assert_eq!(
            (e.shape.clone(), e.labels.clone()),
            (vec![2, 2], Some(vec![1, 0]))
        );
        t.shape = Some(vec![5]);
        let e = prepare(&a, &t).expect_err("5").to_string();
        assert!(e.contains("shape [4]") && e.contains("[5]"), "{e}");
    }
}
