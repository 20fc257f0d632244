//! CSV files as devices write them: a header, then one row per reading or per example,
//! optionally gzip-compressed (`.csv.gz`).
//!
//! A [`Table`] keeps every cell's text (columns stored as one string buffer each, so memory is
//! about the file's size) and parses numbers only when a task asks for a column, so that an
//! error can name the file, the line and the column of the first bad cell.

use std::io::Read;
use std::path::Path;

use super::DataError;

/// One column's cells, as text.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct TextColumn {
    text: String,
    /// End of each cell in `text`.
    ends: Vec<u32>,
}

impl TextColumn {
    fn cell(&self, row: usize) -> &str {
        let start = if row == 0 {
            0
        } else {
            self.ends[row - 1] as usize
        };
        &self.text[start..self.ends[row] as usize]
    }

    fn push(&mut self, cell: &str) {
        self.text.push_str(cell.trim());
        self.ends.push(self.text.len() as u32);
    }
}

/// A CSV file in memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    /// The file it came from (or what stands for it), for errors.
    pub origin: String,
    names: Vec<String>,
    columns: Vec<TextColumn>,
    /// File line of each row (the header is line 1).
    lines: Vec<u32>,
}

/// A cell that reads as a number prints like one: `1.0` and `1` are the same label.
pub fn number_label(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{}", x as i64)
    } else {
        format!("{x}")
    }
}

/// The label a cell stands for: numbers canonically, text trimmed.
pub fn label_of(cell: &str) -> String {
    match cell.parse::<f64>() {
        Ok(x) if x.is_finite() => number_label(x),
        _ => cell.to_string(),
    }
}

impl Table {
    /// Reads a CSV file (`.gz` decompressed) with a header row.
    pub fn read(path: &Path) -> Result<Self, DataError> {
        let origin = path.display().to_string();
        let file = std::fs::File::open(path).map_err(|source| DataError::Io {
            path: origin.clone(),
            source,
        })?;
        let reader: Box<dyn Read> = if path.extension().is_some_and(|e| e == "gz") {
            Box::new(flate2::read::GzDecoder::new(std::io::BufReader::new(file)))
        } else {
            Box::new(std::io::BufReader::new(file))
        };
        Self::from_reader(reader, &origin)
    }

    /// Parses CSV text; `origin` names it in errors.
    pub fn from_reader(reader: impl Read, origin: &str) -> Result<Self, DataError> {
        let mut csv = csv::ReaderBuilder::new()
            .has_headers(true)
            .trim(csv::Trim::All)
            .from_reader(reader);
        let at = |e: csv::Error| {
            let line = e.position().map_or(0, csv::Position::line);
            let reason = match e.kind() {
                csv::ErrorKind::UnequalLengths {
                    expected_len, len, ..
                } => format!("has {len} fields where the header has {expected_len}"),
                csv::ErrorKind::Io(io) => io.to_string(),
                csv::ErrorKind::Utf8 { err, .. } => format!("not UTF-8 text ({err})"),
                _ => e.to_string(),
            };
            DataError::Csv {
                path: origin.to_string(),
                line,
                reason,
            }
        };
        let names: Vec<String> = csv
            .headers()
            .map_err(at)?
            .iter()
            .map(|h| h.trim_start_matches('\u{feff}').to_string())
            .collect();
        if names.is_empty() || names.iter().all(String::is_empty) {
            return Err(DataError::Format {
                path: origin.to_string(),
                reason: "the file is empty: a CSV file needs a header row naming its columns"
                    .into(),
            });
        }
        if let Some(i) = names.iter().position(String::is_empty) {
            return Err(DataError::Format {
                path: origin.to_string(),
                reason: format!("column {} of the header has no name", i + 1),
            });
        }
        {
            let mut seen = std::collections::HashSet::new();
            if let Some(dup) = names.iter().find(|n| !seen.insert(n.as_str())) {
                return Err(DataError::Format {
                    path: origin.to_string(),
                    reason: format!("the header names column {dup:?} twice"),
                });
            }
        }
        let mut columns = vec![TextColumn::default(); names.len()];
        let mut lines = Vec::new();
        let mut record = csv::StringRecord::new();
        while csv.read_record(&mut record).map_err(at)? {
            let line = record.position().map_or(0, csv::Position::line);
            for (column, cell) in columns.iter_mut().zip(record.iter()) {
                column.push(cell);
            }
            lines.push(u32::try_from(line).unwrap_or(u32::MAX));
        }
        Ok(Self {
            origin: origin.to_string(),
            names,
            columns,
            lines,
        })
    }

    pub fn names(&self) -> &[String] {
        &self.names
    }

    pub fn rows(&self) -> usize {
        self.lines.len()
    }

    /// File line of `row`.
    pub fn line(&self, row: usize) -> u64 {
        u64::from(self.lines[row])
    }

    fn index(&self, column: &str) -> Result<usize, DataError> {
        self.names
            .iter()
            .position(|n| n == column)
            .ok_or_else(|| DataError::Mismatch {
                origin: self.origin.clone(),
                reason: format!(
                    "no column {column:?}; the header has {}",
                    preview(&self.names)
                ),
            })
    }

    pub fn has(&self, column: &str) -> bool {
        self.names.iter().any(|n| n == column)
    }

    /// The text of one cell.
    pub fn cell(&self, column: usize, row: usize) -> &str {
        self.columns[column].cell(row)
    }

    /// A column's values as numbers; empty cells are `None`. The first cell that is not a
    /// number is an error naming its line.
    pub fn numbers(&self, column: &str) -> Result<Vec<Option<f64>>, DataError> {
        let c = self.index(column)?;
        (0..self.rows())
            .map(|row| {
                let cell = self.cell(c, row);
                if cell.is_empty() {
                    return Ok(None);
                }
                match cell.parse::<f64>() {
                    Ok(x) if x.is_finite() => Ok(Some(x)),
                    Ok(x) => {
                        Err(self.cell_error(row, column, format!("{x} is not a finite number")))
                    }
                    Err(_) => {
                        Err(self.cell_error(row, column, format!("{cell:?} is not a number")))
                    }
                }
            })
            .collect()
    }

    /// A column's cells as labels ([`label_of`]); empty cells are `None`.
    pub fn labels(&self, column: &str) -> Result<Vec<Option<String>>, DataError> {
        let c = self.index(column)?;
        Ok((0..self.rows())
            .map(|row| {
                let cell = self.cell(c, row);
                (!cell.is_empty()).then(|| label_of(cell))
            })
            .collect())
    }

    /// A column's cells as they are (group keys, timestamps).
    pub fn texts(&self, column: &str) -> Result<Vec<&str>, DataError> {
        let c = self.index(column)?;
        Ok((0..self.rows()).map(|row| self.cell(c, row)).collect())
    }

    /// An error about one cell.
    pub fn cell_error(&self, row: usize, column: &str, reason: String) -> DataError {
        DataError::Cell {
            path: self.origin.clone(),
            line: self.line(row),
            column: column.to_string(),
            reason,
        }
    }

    /// The rows `rows` (in that order), as a table of their own that keeps their line numbers.
    pub fn select(&self, rows: &[usize]) -> Table {
        let columns = self
            .columns
            .iter()
            .map(|c| {
                let mut out = TextColumn::default();
                for &r in rows {
                    out.push(c.cell(r));
                }
                out
            })
            .collect();
        Table {
            origin: self.origin.clone(),
            names: self.names.clone(),
            columns,
            lines: rows.iter().map(|&r| self.lines[r]).collect(),
        }
    }
}

/// A list of names, shortened for an error message.
pub fn preview(names: &[String]) -> String {
    const SHOWN: usize = 12;
    let shown: Vec<String> = names.iter().take(SHOWN).map(|n| format!("{n:?}")).collect();
    if names.len() > SHOWN {
        format!("{} and {} more", shown.join(", "), names.len() - SHOWN)
    } else {
        shown.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(text: &str) -> Result<Table, DataError> {
        Table::from_reader(text.as_bytes(), "t.csv")
    }

    #[test]
    fn cells_are_kept_as_text_and_parsed_on_demand() {
        let t = table("a,b,label\n1, 2.5 ,x\n\"3\",,\"y, z\"\n").expect("valid");
        assert_eq!(t.rows(), 2);
        assert_eq!(t.numbers("a").expect("numeric"), vec![Some(1.0), Some(3.0)]);
        assert_eq!(t.numbers("b").expect("numeric"), vec![Some(2.5), None]);
        assert_eq!(
            t.labels("label").expect("labels"),
            vec![Some("x".into()), Some("y, z".into())]
        );
        assert_eq!(t.line(1), 3);
        let sub = t.select(&[1]);
        assert_eq!(sub.rows(), 1);
        assert_eq!(sub.line(0), 3);
        assert_eq!(label_of("1.0"), "1");
        assert_eq!(label_of("01"), "1");
    }

    #[test]
    fn bad_files_are_named_with_line_and_column() {
        let e = table("t,temp\n1,20.5\n2,warm\n")
            .expect("reads")
            .numbers("temp");
        let e = e.expect_err("not a number").to_string();
        assert_eq!(
            e,
            "t.csv: line 3, column \"temp\": \"warm\" is not a number"
        );
        let e = table("t,temp\n1,20.5\n2\n")
            .expect_err("ragged")
            .to_string();
        assert_eq!(e, "t.csv: line 3: has 1 fields where the header has 2");
        let e = table("").expect_err("empty").to_string();
        assert!(e.contains("t.csv") && e.contains("empty"), "{e}");
        let e = table("a,b\n1,2\n").expect("reads").numbers("c");
        let e = e.expect_err("missing").to_string();
        assert!(
            e.contains("no column \"c\"") && e.contains("\"a\", \"b\""),
            "{e}"
        );
        let e = table("a,a\n1,2\n").expect_err("twice").to_string();
        assert!(e.contains("twice"), "{e}");
    }
}
