//! Which library trains a task on this device: burn's pure-Rust CPU backend (every build), or
//! LibTorch through `tch` (builds with the `torch` feature, linking the system's LibTorch).
//!
//! A TorchScript module can only be trained by LibTorch. For the built-in families the choice
//! is the device's (`pollen-agent --backend`, `pollen simulate --backend`): `auto`, the
//! default, takes LibTorch for the convolutional families when it is compiled in (where burn's
//! CPU kernels are slower: `docs/BENCHMARKS.md`, local training) and burn otherwise (faster
//! for small fully connected models, and the only backend of a build without LibTorch).

use serde::{Deserialize, Serialize};

use crate::model::ModelSpec;

/// A device's choice of training library.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// LibTorch for TorchScript modules and, when compiled in, the convolutional families;
    /// burn for the rest.
    #[default]
    Auto,
    Burn,
    Libtorch,
}

/// The library that trains a given model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Burn,
    Libtorch,
}

/// Whether this build links LibTorch.
pub const LIBTORCH: bool = cfg!(feature = "torch");

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Auto => "auto",
            Backend::Burn => "burn",
            Backend::Libtorch => "libtorch",
        }
    }

    /// Parses `auto`, `burn` or `libtorch`, refusing `libtorch` in a build without it.
    pub fn parse(name: &str) -> Result<Self, String> {
        let backend = match name {
            "auto" => Backend::Auto,
            "burn" => Backend::Burn,
            "libtorch" => Backend::Libtorch,
            other => {
                return Err(format!(
                    "unknown backend {other:?}; use auto, burn or libtorch"
                ));
            }
        };
        if backend == Backend::Libtorch && !LIBTORCH {
            return Err(
                "backend libtorch: this build has no LibTorch (build with --features torch)".into(),
            );
        }
        Ok(backend)
    }

    /// The library that trains `model` on this device, or why none can.
    pub fn engine(self, model: &ModelSpec) -> Result<Engine, String> {
        let builtin_on_torch = matches!(model, ModelSpec::Mlp(_) | ModelSpec::Cnn2d(_));
        match (self, model) {
            (_, ModelSpec::TorchScript(_)) if LIBTORCH => Ok(Engine::Libtorch),
            (_, ModelSpec::TorchScript(_)) => Err(
                "the task's model is a TorchScript module, and this agent was built without LibTorch (pollen-agent --features torch)"
                    .into(),
            ),
            (Backend::Libtorch, _) if !LIBTORCH => Err(
                "backend libtorch: this build has no LibTorch (build with --features torch)".into(),
            ),
            (Backend::Libtorch, _) if !builtin_on_torch => Err(format!(
                "backend libtorch trains the mlp and cnn2d families; {} trains on burn (use backend auto or burn)",
                model.family()
            )),
            (Backend::Libtorch, _) => Ok(Engine::Libtorch),
            (Backend::Auto, ModelSpec::Cnn2d(_)) if LIBTORCH => Ok(Engine::Libtorch),
            _ => Ok(Engine::Burn),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Cnn2dConfig, MlpConfig, TorchScriptConfig};

    #[test]
    fn auto_trains_convolutions_on_libtorch_when_it_is_there_and_the_rest_on_burn() {
        let mlp = ModelSpec::Mlp(MlpConfig::new());
        let cnn = ModelSpec::Cnn2d(Cnn2dConfig::new());
        assert_eq!(Backend::Auto.engine(&mlp), Ok(Engine::Burn));
        let expected = if LIBTORCH {
            Engine::Libtorch
        } else {
            Engine::Burn
        };
        assert_eq!(Backend::Auto.engine(&cnn), Ok(expected));
        assert_eq!(Backend::Burn.engine(&cnn), Ok(Engine::Burn));
        let script = ModelSpec::TorchScript(TorchScriptConfig {
            file: None,
            sha256: "a".repeat(64),
            size_bytes: 1,
            initial: None,
        });
        match Backend::Burn.engine(&script) {
            Ok(e) => assert!(LIBTORCH && e == Engine::Libtorch),
            Err(e) => assert!(!LIBTORCH && e.contains("without LibTorch"), "{e}"),
        }
        assert!(Backend::parse("tensorflow").is_err());
        assert_eq!(Backend::parse("libtorch").is_ok(), LIBTORCH);
    }
}
