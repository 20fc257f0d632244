//! `pollen data`: getting a CSV file ready for a run.

use std::path::PathBuf;

use clap::Subcommand;

use crate::data::SplitBy;

#[derive(Subcommand, Debug)]
pub enum DataCommand {
    /// What a CSV file holds (columns, kinds, ranges; a label column's values) and a draft
    /// [task] section for it.
    Inspect {
        file: PathBuf,
        /// A column whose values are labels.
        #[arg(long)]
        label: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Write one CSV file per device: by a column's values (--by site), or into --parts N
    /// files that keep each --group series whole.
    Split {
        file: PathBuf,
        /// Folder for the files (FILE-<part>.csv).
        #[arg(long)]
        out: PathBuf,
        /// One file per value of this column.
        #[arg(long, conflicts_with = "parts")]
        by: Option<String>,
        /// This many files of about equal size.
        #[arg(long)]
        parts: Option<usize>,
        /// With --parts: rows with the same value here stay in one file.
        #[arg(long, requires = "parts")]
        group: Option<String>,
        #[arg(long, default_value_t = 42)]
        seed: u64,
    },
}

pub fn data(command: DataCommand) -> anyhow::Result<()> {
    match command {
        DataCommand::Inspect { file, label, json } => {
            let inspection = crate::data::inspect(&file, label.as_deref())?;
            if json {
                println!("{}", serde_json::to_string(&inspection)?);
            } else {
                print!("{}", inspection.human(label.as_deref()));
            }
        }
        DataCommand::Split {
            file,
            out,
            by,
            parts,
            group,
            seed,
        } => {
            let how = match (by, parts) {
                (Some(column), _) => SplitBy::Column(column),
                (None, Some(parts)) => SplitBy::Parts { parts, group, seed },
                (None, None) => anyhow::bail!("say how to split: --by COLUMN or --parts N"),
            };
            for (path, rows) in crate::data::split(&file, &how, &out)? {
                println!("{}\t{rows} rows", path.display());
            }
        }
    }
    Ok(())
}
