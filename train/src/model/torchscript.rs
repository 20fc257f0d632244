//! `torchscript`: a model defined in PyTorch and exported with `torch.jit.script(model).save`,
//! trained on devices by LibTorch (the `torch` feature of `pollen-train` and `pollen-agent`).
//! The manifest names the file by its SHA-256; the coordinator stores it and every
//! instruction carries a presigned URL for it, as for the manifest. Parameters travel as the
//! module's `state_dict()` names.

use serde::{Deserialize, Serialize};

/// Settings of the `torchscript` family.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TorchScriptConfig {
    /// The `.pt` file, as the run spec names it (relative to where the run is started, or to
    /// the Pollen checkout); devices get it by digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// Lower-case hex SHA-256 of the file; filled in from the file when a spec leaves it out.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sha256: String,
    /// Bytes of the file.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub size_bytes: u64,
    /// A safetensors file of initial weights, the module's parameters as PyTorch exports them
    /// (`safetensors.torch.save_file(dict(model.named_parameters()), path)`); without it the
    /// coordinator asks a device for the module's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial: Option<String>,
}

fn is_zero(x: &u64) -> bool {
    *x == 0
}

impl TorchScriptConfig {
    /// Checks the reference: a hex SHA-256 once the file was read.
    pub fn validate(&self) -> Result<(), String> {
        if self.file.is_none() && self.sha256.is_empty() {
            return Err(
                "model.file names the TorchScript file (torch.jit.script(m).save(...))".into(),
            );
        }
        if !self.sha256.is_empty()
            && (self.sha256.len() != 64 || !self.sha256.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return Err(format!(
                "model.sha256 = {:?} is not a hex SHA-256",
                self.sha256
            ));
        }
        Ok(())
    }
}
