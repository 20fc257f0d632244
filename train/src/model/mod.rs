//! Model families: burn `Config`s (`XConfig { .. }.init(&io, &device)`), their modules, and
//! weights as framework-independent [`Parameters`] in PyTorch layout.
//!
//! Every model maps a batch of flattened examples `[batch, prod(shape)]` to `[batch, outputs]`
//! and reshapes internally (a 1-D CNN to `[batch, channels, length]`, ...), so the trainer
//! needs no per-family code. Adding a family is one file with its config and module, and one
//! line in the `families!` list below.

mod autoencoder;
mod cnn1d;
mod cnn2d;
mod mlp;
mod rnn;
mod torchscript;

use burn::nn::{Linear, LinearConfig};
use burn::prelude::*;
use burn::store::burn_pack::{Bytes, DType, Tensor as PackTensor};
use burn::store::{BurnToPyTorchAdapter, ModuleSnapshot, PyTorchToBurnAdapter};
use pollen_proto::{NamedTensor, Parameters};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

pub use autoencoder::{Autoencoder, AutoencoderConfig};
pub use cnn1d::{Cnn1d, Cnn1dConfig};
pub use cnn2d::{Cnn2d, Cnn2dConfig};
pub use mlp::{Mlp, MlpConfig};
pub use rnn::{Cell, Rnn, RnnConfig};
pub use torchscript::TorchScriptConfig;

use crate::manifest::TaskKind;

/// What a model consumes and produces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelIo {
    pub kind: TaskKind,
    /// One example: `[features]`, `[channels, length]` or `[channels, height, width]`.
    pub input: Vec<usize>,
    /// Logits per class, the regression output, or the reconstruction.
    pub outputs: usize,
}

impl ModelIo {
    /// Values per example.
    pub fn input_len(&self) -> usize {
        self.input.iter().product()
    }

    /// Channels of the input: features of a vector, the first dimension otherwise.
    pub fn channels(&self) -> usize {
        match self.input.as_slice() {
            [features] => *features,
            [channels, ..] => *channels,
            [] => 0,
        }
    }
}

/// Why a model cannot be built.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("model {family}: {reason}")]
pub struct ModelError {
    pub family: &'static str,
    pub reason: String,
}

impl ModelError {
    pub fn new(family: &'static str, reason: impl Into<String>) -> Self {
        Self {
            family,
            reason: reason.into(),
        }
    }
}

/// Activation between layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    #[default]
    Relu,
    Tanh,
    Gelu,
    Sigmoid,
}

impl Activation {
    pub fn apply<const D: usize>(self, x: Tensor<D>) -> Tensor<D> {
        use burn::tensor::activation;
        match self {
            Activation::Relu => activation::relu(x),
            Activation::Tanh => activation::tanh(x),
            Activation::Gelu => activation::gelu(x),
            Activation::Sigmoid => activation::sigmoid(x),
        }
    }
}

/// Dropout masks drawn from a seeded generator, not the backend's (whose seed is global to the
/// process and shared by every simulated device training in it), so that training is
/// reproducible. `None` during evaluation: no dropout.
pub struct Noise(Option<ChaCha8Rng>);

impl Noise {
    pub fn training(seed: u64) -> Self {
        Noise(Some(ChaCha8Rng::seed_from_u64(seed)))
    }

    pub fn evaluating() -> Self {
        Noise(None)
    }

    /// Inverted dropout: zeroes each value with probability `p`, scales the rest by 1/(1-p).
    pub fn dropout<const D: usize>(&mut self, x: Tensor<D>, p: f64) -> Tensor<D> {
        let Some(rng) = self.0.as_mut() else {
            return x;
        };
        if p <= 0.0 {
            return x;
        }
        let dims = x.dims();
        let n: usize = dims.iter().product();
        let keep = (1.0 / (1.0 - p)) as f32;
        let mask: Vec<f32> = (0..n)
            .map(|_| if rng.random::<f64>() < p { 0.0 } else { keep })
            .collect();
        let mask = Tensor::<D>::from_data(TensorData::new(mask, dims), &x.device());
        x * mask
    }
}

/// Checks a dropout probability.
fn check_dropout(family: &'static str, p: f64) -> Result<(), ModelError> {
    if (0.0..1.0).contains(&p) {
        Ok(())
    } else {
        Err(ModelError::new(
            family,
            format!("dropout = {p} must be at least 0 and below 1"),
        ))
    }
}

/// Layer sizes must be positive.
fn check_sizes(family: &'static str, field: &str, sizes: &[usize]) -> Result<(), ModelError> {
    if sizes.contains(&0) {
        return Err(ModelError::new(
            family,
            format!("{field} = {sizes:?} has a zero"),
        ));
    }
    Ok(())
}

/// Families other than the autoencoder serve classification and regression.
fn not_anomaly(family: &'static str, io: &ModelIo) -> Result<(), ModelError> {
    if io.kind == TaskKind::Anomaly {
        return Err(ModelError::new(
            family,
            "anomaly detection trains family = \"autoencoder\"",
        ));
    }
    Ok(())
}

/// The `[channels, length]` of windows, which sequence models need.
fn windows_of(family: &'static str, io: &ModelIo) -> Result<[usize; 2], ModelError> {
    match io.input.as_slice() {
        &[channels, length] => Ok([channels, length]),
        other => Err(ModelError::new(
            family,
            format!(
                "needs windows [channels, length]; the input is {other:?} (set task.window, or task.shape for arrays)"
            ),
        )),
    }
}

/// Fully connected layers through `widths`, input side first.
fn dense(widths: &[usize], device: &Device) -> Vec<Linear> {
    widths
        .windows(2)
        .map(|w| LinearConfig::new(w[0], w[1]).init(device))
        .collect()
}

/// `fcs` in turn, with the activation and dropout between them (none after the last).
fn dense_forward(
    fcs: &[Linear],
    mut x: Tensor<2>,
    activation: Activation,
    dropout: f64,
    noise: &mut Noise,
) -> Tensor<2> {
    let last = fcs.len().saturating_sub(1);
    for (i, fc) in fcs.iter().enumerate() {
        x = fc.forward(x);
        if i < last {
            x = noise.dropout(activation.apply(x), dropout);
        }
    }
    x
}

macro_rules! families {
    ($( $variant:ident($config:ty, $module:ty) = $tag:literal, )*) => {
        /// A model family and its settings, as `[model]` of a run spec (or a preset name) and
        /// `model` of a manifest. `TorchScript` is the user's own PyTorch module, which burn
        /// does not build: LibTorch trains it (the `torch` feature).
        #[derive(Debug, Clone, PartialEq, Serialize)]
        #[serde(tag = "family")]
        pub enum ModelSpec {
            $( #[serde(rename = $tag)] $variant($config), )*
            #[serde(rename = "torchscript")]
            TorchScript(TorchScriptConfig),
        }

        #[derive(Deserialize)]
        #[serde(tag = "family")]
        enum Tagged {
            $( #[serde(rename = $tag)] $variant($config), )*
        }

        /// A built model.
        #[derive(Module, Debug)]
        pub enum Model {
            $( $variant($module), )*
        }

        /// Family names, as `family = "..."` takes them.
        pub const FAMILIES: &[&str] = &[$($tag,)* "torchscript"];

        impl ModelSpec {
            pub fn family(&self) -> &'static str {
                match self {
                    $( ModelSpec::$variant(_) => $tag, )*
                    ModelSpec::TorchScript(_) => "torchscript",
                }
            }

            /// Builds the model for `io` (weights initialised by burn; [`import`] replaces them).
            pub fn init(&self, io: &ModelIo, device: &Device) -> Result<Model, ModelError> {
                match self {
                    $( ModelSpec::$variant(c) => Ok(Model::$variant(c.init(io, device)?)), )*
                    ModelSpec::TorchScript(_) => Err(ModelError::new(
                        "torchscript",
                        "a TorchScript module is trained by LibTorch, not burn",
                    )),
                }
            }

            /// A family's settings with their defaults (burn's `Config` deserialization needs
            /// every field, so what a spec leaves out is taken from here).
            fn defaults(family: &str) -> Option<serde_json::Map<String, serde_json::Value>> {
                let default = match family {
                    $( $tag => serde_json::to_value(<$config>::new()), )*
                    _ => return None,
                };
                match default {
                    Ok(serde_json::Value::Object(map)) => Some(map),
                    _ => Some(serde_json::Map::new()),
                }
            }

            fn from_tagged(t: Tagged) -> Self {
                match t { $( Tagged::$variant(c) => ModelSpec::$variant(c), )* }
            }
        }

        impl Model {
            /// `[batch, prod(input)]` -> `[batch, outputs]`.
            pub fn forward(&self, x: Tensor<2>, noise: &mut Noise) -> Tensor<2> {
                match self { $( Model::$variant(m) => m.forward(x, noise), )* }
            }
        }
    };
}

families! {
    Mlp(MlpConfig, Mlp) = "mlp",
    Cnn1d(Cnn1dConfig, Cnn1d) = "cnn1d",
    Rnn(RnnConfig, Rnn) = "rnn",
    Cnn2d(Cnn2dConfig, Cnn2d) = "cnn2d",
    Autoencoder(AutoencoderConfig, Autoencoder) = "autoencoder",
}

/// Named models: the MNIST models of McMahan et al. (2017), which existing specs name.
pub const PRESETS: &[&str] = &["mnist-2nn", "mnist-cnn"];

impl ModelSpec {
    /// A preset by name.
    pub fn preset(name: &str) -> Option<Self> {
        match name {
            // 784-200-200-10 with ReLU ("2NN"): 199,210 parameters.
            "mnist-2nn" => Some(ModelSpec::Mlp(MlpConfig::new().with_hidden(vec![200, 200]))),
            // 5x5 conv 32 -> 2x2 max-pool -> 5x5 conv 64 -> 2x2 max-pool -> fc 512 -> fc 10,
            // 'same' padding ("CNN"): 1,663,370 parameters.
            "mnist-cnn" => Some(ModelSpec::Cnn2d(Cnn2dConfig::new())),
            _ => None,
        }
    }

    /// A preset name, or a table with `family` and that family's settings. Unknown families
    /// and settings are refused by name.
    pub fn from_value(value: serde_json::Value) -> Result<Self, String> {
        use serde_json::Value;
        match value {
            Value::String(name) => Self::preset(&name).ok_or_else(|| {
                format!(
                    "unknown model {name:?}; presets are {}, or give a table with family = {}",
                    PRESETS.join(", "),
                    FAMILIES.join(" | ")
                )
            }),
            Value::Object(map) => {
                let family = match map.get("family") {
                    Some(Value::String(f)) => f.clone(),
                    Some(other) => return Err(format!("model.family = {other} is not a name")),
                    None => {
                        return Err(format!(
                            "model needs family = {} (or a preset name: {})",
                            FAMILIES.join(" | "),
                            PRESETS.join(", ")
                        ));
                    }
                };
                if family == "torchscript" {
                    let mut map = map;
                    map.remove("family");
                    let config: TorchScriptConfig = serde_json::from_value(Value::Object(map))
                        .map_err(|e| {
                            format!(
                                "model (torchscript): {e}; its settings are file, sha256, size_bytes, initial"
                            )
                        })?;
                    config.validate()?;
                    return Ok(ModelSpec::TorchScript(config));
                }
                let Some(mut settings) = Self::defaults(&family) else {
                    return Err(format!(
                        "unknown model family {family:?}; families are {}",
                        FAMILIES.join(", ")
                    ));
                };
                if let Some(unknown) = map
                    .keys()
                    .find(|k| k.as_str() != "family" && !settings.contains_key(k.as_str()))
                {
                    let names: Vec<&str> = settings.keys().map(String::as_str).collect();
                    return Err(format!(
                        "model.{unknown} is not a setting of family {family:?}; its settings are {}",
                        names.join(", ")
                    ));
                }
                settings.extend(map);
                serde_json::from_value::<Tagged>(Value::Object(settings))
                    .map(Self::from_tagged)
                    .map_err(|e| format!("model ({family}): {e}"))
            }
            other => Err(format!(
                "model = {other} must be a preset name or a table with family = ..."
            )),
        }
    }

    /// Checks the model fits the task and input without keeping the weights. A TorchScript
    /// module is checked where LibTorch runs it: on the devices, when it arrives.
    pub fn check(&self, io: &ModelIo) -> Result<(), ModelError> {
        if matches!(self, ModelSpec::TorchScript(_)) {
            return Ok(());
        }
        self.init(io, &Device::flex()).map(drop)
    }

    /// Whether burn builds this model (every family but a TorchScript module).
    pub fn is_builtin(&self) -> bool {
        !matches!(self, ModelSpec::TorchScript(_))
    }
}

impl<'de> Deserialize<'de> for ModelSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = serde_json::Value::deserialize(d)?;
        ModelSpec::from_value(value).map_err(serde::de::Error::custom)
    }
}

/// Model families name their layers in a list field such as `fcs`; checkpoints name them as a
/// PyTorch user would (`fc1`, `fc2`, ...): `fcs.0.weight` <-> `fc1.weight`.
fn torch_name(burn_path: &str) -> String {
    let mut parts = burn_path.splitn(3, '.');
    if let (Some(list), Some(index), rest) = (parts.next(), parts.next(), parts.next())
        && let Some(stem) = list.strip_suffix('s')
        && let Ok(i) = index.parse::<usize>()
    {
        return match rest {
            Some(rest) => format!("{stem}{}.{rest}", i + 1),
            None => format!("{stem}{}", i + 1),
        };
    }
    burn_path.to_string()
}

/// The inverse of [`torch_name`].
fn burn_name(torch: &str) -> String {
    let (head, rest) = torch.split_once('.').unwrap_or((torch, ""));
    let digits = head.len() - head.trim_end_matches(|c: char| c.is_ascii_digit()).len();
    if digits > 0 && digits < head.len() {
        let (stem, number) = head.split_at(head.len() - digits);
        if let Ok(n) = number.parse::<usize>()
            && n >= 1
        {
            return if rest.is_empty() {
                format!("{stem}s.{}", n - 1)
            } else {
                format!("{stem}s.{}.{rest}", n - 1)
            };
        }
    }
    torch.to_string()
}

#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("model weights could not be read: {0}")]
    Read(String),
    #[error(
        "weights do not fit the model: missing {missing:?}, not in the model {unused:?}, errors {errors}"
    )]
    Mismatch {
        missing: Vec<String>,
        unused: Vec<String>,
        errors: String,
    },
}

/// The model's weights in PyTorch layout (`Linear` weights transposed to `[out, in]`).
pub fn export(model: &Model) -> Result<Parameters, WeightsError> {
    let tensors = model
        .collect(None, Some(Box::new(BurnToPyTorchAdapter)), true)
        .into_iter()
        .map(|t| {
            let (name, dtype, shape, _, bytes) = t
                .into_parts()
                .map_err(|e| WeightsError::Read(e.to_string()))?;
            if dtype != DType::F32 {
                return Err(WeightsError::Read(format!("{name} has dtype {dtype:?}")));
            }
            let data = bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            Ok(NamedTensor::new(
                torch_name(&name),
                shape.as_slice().to_vec(),
                data,
            ))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Parameters::new(tensors).map_err(|e| WeightsError::Read(e.to_string()))
}

/// Loads PyTorch-layout weights into `model`; every model tensor must be given, no more.
pub fn import(model: &mut Model, params: &Parameters) -> Result<(), WeightsError> {
    let tensors = params
        .tensors
        .iter()
        .map(|t| {
            PackTensor::new(
                burn_name(&t.name),
                DType::F32,
                t.shape.clone(),
                None,
                Bytes::from_elems(t.data.clone()),
            )
        })
        .collect();
    let result = model.apply(tensors, None, Some(Box::new(PyTorchToBurnAdapter)), true);
    if !result.missing.is_empty() || !result.unused.is_empty() || !result.errors.is_empty() {
        return Err(WeightsError::Mismatch {
            missing: result
                .missing
                .into_iter()
                .map(|(p, _)| torch_name(&p))
                .collect(),
            unused: result.unused.iter().map(|p| torch_name(p)).collect(),
            errors: format!("{:?}", result.errors),
        });
    }
    Ok(())
}

/// Freshly initialised weights of `spec` for `io`, reproducible from `seed` whatever else runs.
///
/// PyTorch's default for `Linear`, `Conv1d`, `Conv2d` and recurrent gates: weights and biases
/// uniform in `±1/sqrt(fan_in)`. Drawn from our own seeded generator rather than the
/// backend's, whose seed may be process-global and shared with concurrent work.
pub fn initial_parameters(
    spec: &ModelSpec,
    io: &ModelIo,
    seed: u64,
) -> Result<Parameters, WeightsError> {
    let device = Device::flex();
    let model = spec
        .init(io, &device)
        .map_err(|e| WeightsError::Read(e.to_string()))?;
    let template = export(&model)?;
    let fan_in = |layer: &str| -> usize {
        template
            .get(&format!("{layer}.weight"))
            .map_or(1, |w| w.shape[1..].iter().product())
    };
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let tensors = template
        .tensors
        .iter()
        .map(|t| {
            let layer = t.name.rsplit_once('.').map_or(t.name.as_str(), |(l, _)| l);
            let bound = 1.0 / (fan_in(layer).max(1) as f32).sqrt();
            let data = (0..t.data.len())
                .map(|_| rng.random_range(-bound..bound))
                .collect();
            NamedTensor::new(t.name.clone(), t.shape.clone(), data)
        })
        .collect();
    Parameters::new(tensors).map_err(|e| WeightsError::Read(e.to_string()))
}

/// The model's outputs for `batch` flattened examples `x` with weights `params`, as evaluation
/// computes them (no dropout): `[batch, outputs]`, row by row. For checking another
/// implementation of a family (LibTorch's, `python/pollen_models.py`) against burn's.
pub fn forward_values(
    spec: &ModelSpec,
    io: &ModelIo,
    params: &Parameters,
    x: Vec<f32>,
    batch: usize,
) -> Result<Vec<f32>, WeightsError> {
    if x.len() != batch * io.input_len() {
        return Err(WeightsError::Read(format!(
            "{} input values for {batch} examples of {} values",
            x.len(),
            io.input_len()
        )));
    }
    let device = Device::flex();
    let mut model = spec
        .init(io, &device)
        .map_err(|e| WeightsError::Read(e.to_string()))?;
    import(&mut model, params)?;
    let x = Tensor::<2>::from_data(TensorData::new(x, [batch, io.input_len()]), &device);
    let out = model.forward(x, &mut Noise::evaluating());
    out.into_data()
        .try_into_vec::<f32>()
        .map_err(|e| WeightsError::Read(format!("{e:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mnist_io() -> ModelIo {
        ModelIo {
            kind: TaskKind::Classification,
            input: vec![1, 28, 28],
            outputs: 10,
        }
    }

    #[test]
    fn the_presets_have_the_papers_parameter_counts_and_pytorch_names() {
        let two_nn = ModelSpec::preset("mnist-2nn").expect("preset");
        let p = initial_parameters(&two_nn, &mnist_io(), 1).expect("export");
        assert_eq!(p.num_params(), 199_210);
        let names: Vec<_> = p.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "fc1.bias",
                "fc1.weight",
                "fc2.bias",
                "fc2.weight",
                "fc3.bias",
                "fc3.weight"
            ]
        );
        assert_eq!(p.get("fc1.weight").expect("fc1").shape, vec![200, 784]);
        let cnn = ModelSpec::preset("mnist-cnn").expect("preset");
        let c = initial_parameters(&cnn, &mnist_io(), 1).expect("export");
        assert_eq!(c.num_params(), 1_663_370);
        assert_eq!(
            c.get("conv2.weight").expect("conv2").shape,
            vec![64, 32, 5, 5]
        );
        assert_eq!(c.get("fc1.weight").expect("fc1").shape, vec![512, 3136]);
    }

    #[test]
    fn weights_round_trip_through_pytorch_layout_for_every_family() {
        let cases: Vec<(ModelSpec, ModelIo)> = vec![
            (
                ModelSpec::Mlp(MlpConfig::new().with_dropout(0.2)),
                ModelIo {
                    kind: TaskKind::Regression,
                    input: vec![7],
                    outputs: 1,
                },
            ),
            (
                ModelSpec::Cnn1d(Cnn1dConfig::new()),
                ModelIo {
                    kind: TaskKind::Classification,
                    input: vec![3, 40],
                    outputs: 4,
                },
            ),
            (
                ModelSpec::Rnn(RnnConfig::new()),
                ModelIo {
                    kind: TaskKind::Classification,
                    input: vec![3, 20],
                    outputs: 4,
                },
            ),
            (
                ModelSpec::Rnn(RnnConfig::new().with_cell(Cell::Lstm)),
                ModelIo {
                    kind: TaskKind::Regression,
                    input: vec![2, 10],
                    outputs: 1,
                },
            ),
            (ModelSpec::Cnn2d(Cnn2dConfig::new()), mnist_io()),
            (
                ModelSpec::Autoencoder(AutoencoderConfig::new()),
                ModelIo {
                    kind: TaskKind::Anomaly,
                    input: vec![6, 10],
                    outputs: 60,
                },
            ),
        ];
        for (spec, io) in cases {
            let p = initial_parameters(&spec, &io, 3).expect("export");
            let device = Device::flex();
            let mut model = spec.init(&io, &device).expect("init");
            import(&mut model, &p).unwrap_or_else(|e| panic!("{}: {e}", spec.family()));
            assert_eq!(export(&model).expect("export"), p, "{}", spec.family());
            let x = Tensor::<2>::zeros([2, io.input_len()], &device);
            assert_eq!(
                model.forward(x, &mut Noise::evaluating()).dims(),
                [2, io.outputs],
                "{}",
                spec.family()
            );
        }
    }

    #[test]
    fn same_seed_gives_same_initial_weights_and_other_models_are_refused() {
        let spec = ModelSpec::preset("mnist-2nn").expect("preset");
        let a = initial_parameters(&spec, &mnist_io(), 7).expect("export");
        assert_eq!(
            a,
            initial_parameters(&spec, &mnist_io(), 7).expect("export")
        );
        let cnn = initial_parameters(
            &ModelSpec::preset("mnist-cnn").expect("preset"),
            &mnist_io(),
            1,
        )
        .expect("export");
        let mut m = spec.init(&mnist_io(), &Device::flex()).expect("init");
        assert!(import(&mut m, &cnn).is_err());
    }

    #[test]
    fn model_tables_name_unknown_families_and_settings() {
        let v = serde_json::json!({"family": "cnn1d", "channels": [8], "kernal_size": 3});
        let e = ModelSpec::from_value(v).expect_err("typo");
        assert!(
            e.contains("model.kernal_size") && e.contains("kernel_size"),
            "{e}"
        );
        let e = ModelSpec::from_value(serde_json::json!({"family": "transformer"}))
            .expect_err("unknown");
        assert!(e.contains("transformer") && e.contains("cnn1d"), "{e}");
        let e = ModelSpec::from_value(serde_json::json!("mnist-3nn")).expect_err("preset");
        assert!(e.contains("mnist-2nn"), "{e}");
        let spec = ModelSpec::from_value(serde_json::json!({"family": "mlp", "hidden": [16]}))
            .expect("ok");
        // The manifest form names the family and every setting, and reads back the same.
        let json = serde_json::to_value(&spec).expect("serializes");
        assert_eq!(json["family"], "mlp");
        assert_eq!(ModelSpec::from_value(json).expect("round trip"), spec);
    }

    #[test]
    fn layer_lists_get_pytorch_names() {
        assert_eq!(torch_name("fcs.0.weight"), "fc1.weight");
        assert_eq!(
            torch_name("rnns.1.update_gate.input_transform.bias"),
            "rnn2.update_gate.input_transform.bias"
        );
        assert_eq!(torch_name("head.weight"), "head.weight");
        assert_eq!(burn_name("fc1.weight"), "fcs.0.weight");
        assert_eq!(burn_name("conv12.bias"), "convs.11.bias");
        assert_eq!(burn_name("head.weight"), "head.weight");
    }
}
