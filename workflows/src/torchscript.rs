//! A run whose model is the user's TorchScript module (`model = { family = "torchscript", file =
//! "model.pt" }`): the coordinator side. The file is read once, named in the manifest by its
//! SHA-256 and size, and published beside the manifest for devices to fetch and verify; the
//! coordinator never loads it (it aggregates named tensors). Initial weights come from an
//! exported safetensors file the spec names (`initial`), or else from one device, as Flower
//! asks a client for them.

use anyhow::Context;
use bytes::Bytes;
use pollen_proto::Parameters;
use pollen_proto::blob::sha256_hex;
use pollen_train::manifest::TaskManifest;
use pollen_train::{ModelSpec, Task};

use crate::spec::resolve_path;

/// Largest TorchScript file a spec may name: the agents' limit for a task file.
pub const MAX_MODEL_FILE_BYTES: u64 = pollen_client::transfer::MAX_TASK_FILE_BYTES;

fn read(path: &str, what: &str) -> anyhow::Result<Bytes> {
    let resolved = resolve_path(std::path::Path::new(path));
    let bytes = std::fs::read(&resolved)
        .with_context(|| format!("reading {what} {}", resolved.display()))?;
    Ok(Bytes::from(bytes))
}

/// Reads the TorchScript file `manifest` names and writes its digest and size into the
/// manifest, so that devices can check what they fetch.
pub fn pin(manifest: &mut TaskManifest) -> anyhow::Result<()> {
    let ModelSpec::TorchScript(c) = &mut manifest.model else {
        return Ok(());
    };
    let Some(path) = c.file.clone() else {
        return Ok(());
    };
    let bytes = read(&path, "the TorchScript model")?;
    anyhow::ensure!(
        bytes.len() as u64 <= MAX_MODEL_FILE_BYTES,
        "the TorchScript model {path} is {} bytes; devices take at most {MAX_MODEL_FILE_BYTES}",
        bytes.len()
    );
    let sha256 = sha256_hex(&bytes);
    anyhow::ensure!(
        c.sha256.is_empty() || c.sha256.eq_ignore_ascii_case(&sha256),
        "model.sha256 = {} but the file {path} has SHA-256 {sha256}",
        c.sha256
    );
    c.sha256 = sha256;
    c.size_bytes = bytes.len() as u64;
    Ok(())
}

/// The files devices need besides the manifest: the TorchScript model's, checked against the
/// digest [`pin`] wrote (the file must not change under a run).
pub fn files(manifest: &TaskManifest) -> anyhow::Result<Vec<Bytes>> {
    let ModelSpec::TorchScript(c) = &manifest.model else {
        return Ok(Vec::new());
    };
    let path = c
        .file
        .as_deref()
        .context("model.file names the TorchScript file (torch.jit.script(model).save(path))")?;
    let bytes = read(path, "the TorchScript model")?;
    let sha256 = sha256_hex(&bytes);
    anyhow::ensure!(
        sha256.eq_ignore_ascii_case(&c.sha256),
        "the TorchScript model {path} changed since the run started: SHA-256 {sha256}, the manifest's {}",
        c.sha256
    );
    Ok(vec![bytes])
}

/// The task with its files, as the coordinator's own evaluation uses it.
pub fn task_with_files(manifest: TaskManifest, files: &[Bytes]) -> anyhow::Result<Task> {
    let digests: Vec<(String, Bytes)> = files.iter().map(|b| (sha256_hex(b), b.clone())).collect();
    Task::new(manifest)
        .context("the run's task")?
        .with_files(digests.iter().map(|(s, b)| (s.as_str(), b.clone())))
        .context("the run's task")
}

/// The run's initial weights when the coordinator can make them: a built-in family's from the
/// seed, a TorchScript module's from the exported file the spec names. `None` leaves them to a
/// device.
pub fn initial_parameters(task: &Task) -> anyhow::Result<Option<Parameters>> {
    match &task.manifest.model {
        ModelSpec::TorchScript(c) => {
            let Some(path) = &c.initial else {
                return Ok(None);
            };
            let bytes = read(path, "the initial weights")?;
            // `safetensors.torch.save_file(dict(model.named_parameters()), path)`: f32 tensors
            // named as the module's parameters.
            let params = Parameters::decode(&bytes, None)
                .with_context(|| format!("the initial weights {path}"))?;
            Ok(Some(params))
        }
        _ => Ok(Some(task.initial_parameters()?)),
    }
}
