//! Warm start: a run that begins from an earlier run's checkpoint rather than fresh weights
//! (fine-tuning on new devices, more rounds after a run ended, a model trained centrally).
//!
//! ```toml
//! [warm_start]
//! run = "mnist-2nn-20261207-101500-1a2b"   # its latest checkpoint, under the runs directory
//! # round = 20                             # that round's checkpoint instead
//! # checkpoint = "path/to/round-0050.safetensors"   # or a checkpoint file
//! ```
//!
//! The checkpoint must be a Pollen checkpoint of the same model: its header's task manifest
//! names the model, which must equal this run's (a different model would fail on every
//! device instead).

use std::path::{Path, PathBuf};

use anyhow::Context;
use pollen_proto::Parameters;
use pollen_train::TaskManifest;
use serde::{Deserialize, Serialize};

/// The spec's `[warm_start]` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WarmStartSpec {
    /// A checkpoint file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<PathBuf>,
    /// An earlier run in the same runs directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<String>,
    /// With `run`: the checkpoint after this round rather than the latest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub round: Option<u64>,
}

impl WarmStartSpec {
    pub fn validate(&self) -> Result<(), String> {
        match (&self.checkpoint, &self.run, self.round) {
            (Some(_), None, None) | (None, Some(_), _) => Ok(()),
            (Some(_), Some(_), _) => Err("warm_start: give checkpoint or run, not both".into()),
            (Some(_), None, Some(_)) => {
                Err("warm_start.round picks a checkpoint of warm_start.run".into())
            }
            (None, None, _) => Err("warm_start needs checkpoint or run".into()),
        }
    }

    /// The checkpoint file this names, runs being under `runs_dir`.
    pub fn path(&self, runs_dir: &Path) -> anyhow::Result<PathBuf> {
        if let Some(path) = &self.checkpoint {
            return Ok(path.clone());
        }
        let run = self
            .run
            .as_deref()
            .context("warm_start needs checkpoint or run")?;
        pollen_proto::topics::validate_id("warm_start.run", run)?;
        let models = runs_dir.join(run).join("models");
        if let Some(round) = self.round {
            let path = models.join(format!("round-{round:04}.safetensors"));
            anyhow::ensure!(
                path.exists(),
                "warm_start: run {run:?} has no checkpoint after round {round} ({})",
                path.display()
            );
            return Ok(path);
        }
        let mut checkpoints: Vec<PathBuf> = std::fs::read_dir(&models)
            .with_context(|| {
                format!(
                    "warm_start: no run {run:?} in {} (`pollen runs` lists them)",
                    runs_dir.display()
                )
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("round-") && n.ends_with(".safetensors"))
            })
            .collect();
        checkpoints.sort();
        checkpoints
            .pop()
            .with_context(|| format!("warm_start: run {run:?} has no checkpoint yet"))
    }
}

/// The global model in the checkpoint at `path`, checked to be of `manifest`'s model.
pub fn load(path: &Path, manifest: &TaskManifest) -> anyhow::Result<Parameters> {
    let bytes = std::fs::read(path)
        .with_context(|| format!("warm_start: cannot read {}", path.display()))?;
    let parameters = Parameters::decode(&bytes, None)
        .with_context(|| format!("warm_start: {} is not a usable checkpoint", path.display()))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .with_context(|| format!("warm_start: {} has no safetensors header", path.display()))?;
    let theirs = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get("pollen.manifest"))
        .with_context(|| {
            format!(
                "warm_start: {} is not a Pollen checkpoint (no pollen.manifest in its header)",
                path.display()
            )
        })?;
    let theirs = TaskManifest::parse(theirs.as_bytes())
        .with_context(|| format!("warm_start: {}'s manifest", path.display()))?;
    let model = |m: &TaskManifest| serde_json::to_value(&m.model).unwrap_or_default();
    anyhow::ensure!(
        model(&theirs) == model(manifest),
        "warm_start: {} holds a {} model, this run trains a {} ({} vs {})",
        path.display(),
        theirs.model.family(),
        manifest.model.family(),
        model(&theirs),
        model(manifest)
    );
    Ok(parameters)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_warm_start_names_one_source() {
        let ok = |c: Option<&str>, r: Option<&str>, n: Option<u64>| {
            WarmStartSpec {
                checkpoint: c.map(PathBuf::from),
                run: r.map(str::to_string),
                round: n,
            }
            .validate()
        };
        assert!(ok(Some("a.safetensors"), None, None).is_ok());
        assert!(ok(None, Some("r1"), Some(3)).is_ok());
        assert!(ok(Some("a"), Some("r1"), None).is_err());
        assert!(ok(Some("a"), None, Some(2)).is_err());
        assert!(ok(None, None, None).is_err());
    }

    #[test]
    fn a_run_resolves_to_its_latest_or_named_checkpoint() {
        let dir = tempfile::tempdir().expect("tempdir");
        let models = dir.path().join("r1/models");
        std::fs::create_dir_all(&models).expect("mkdir");
        for n in [1, 2, 10] {
            std::fs::write(models.join(format!("round-{n:04}.safetensors")), b"x").expect("w");
        }
        let spec = |round| WarmStartSpec {
            checkpoint: None,
            run: Some("r1".into()),
            round,
        };
        assert_eq!(
            spec(None).path(dir.path()).expect("latest"),
            models.join("round-0010.safetensors")
        );
        assert_eq!(
            spec(Some(2)).path(dir.path()).expect("round 2"),
            models.join("round-0002.safetensors")
        );
        let e = spec(Some(3)).path(dir.path()).expect_err("no round 3");
        assert!(e.to_string().contains("after round 3"), "{e}");
        let missing = WarmStartSpec {
            run: Some("r2".into()),
            ..spec(None)
        };
        let e = missing.path(dir.path()).expect_err("no run");
        assert!(e.to_string().contains("no run \"r2\""), "{e}");
    }
}
