//! The models of McMahan et al. (2017) for MNIST, in burn, and their weights as
//! framework-independent [`Parameters`] in PyTorch layout.

use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use burn::nn::{Linear, LinearConfig, PaddingConfig2d};
use burn::prelude::*;
use burn::store::burn_pack::{Bytes, DType, Tensor as PackTensor};
use burn::store::{BurnToPyTorchAdapter, ModuleSnapshot, PyTorchToBurnAdapter};
use burn::tensor::activation::relu;
use pollen_proto::{NamedTensor, Parameters};
use serde::{Deserialize, Serialize};

use crate::mnist::{IMAGE_PIXELS, IMAGE_SIDE, NUM_CLASSES};

/// Which model a run trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ModelKind {
    /// MLP 784-200-200-10 with ReLU ("2NN"): 199,210 parameters.
    #[serde(rename = "mnist-2nn")]
    Mnist2nn,
    /// 5x5 conv 32 -> 2x2 max-pool -> 5x5 conv 64 -> 2x2 max-pool -> fc 512 -> fc 10, 'same'
    /// padding ("CNN"): 1,663,370 parameters.
    MnistCnn,
}

impl ModelKind {
    pub fn name(self) -> &'static str {
        match self {
            ModelKind::Mnist2nn => "mnist-2nn",
            ModelKind::MnistCnn => "mnist-cnn",
        }
    }
}

impl std::str::FromStr for ModelKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "mnist-2nn" => Ok(ModelKind::Mnist2nn),
            "mnist-cnn" => Ok(ModelKind::MnistCnn),
            other => Err(format!(
                "unknown model {other:?}; known models: mnist-2nn, mnist-cnn"
            )),
        }
    }
}

/// A classifier of flattened 28x28 images into 10 classes.
pub trait Classifier: Module + ModuleSnapshot + Sized + 'static {
    fn new(device: &Device) -> Self;
    /// `[batch, 784]` -> logits `[batch, 10]`.
    fn forward(&self, images: Tensor<2>) -> Tensor<2>;
}

#[derive(Module, Debug)]
pub struct Mnist2nn {
    fc1: Linear,
    fc2: Linear,
    fc3: Linear,
}

impl Classifier for Mnist2nn {
    fn new(device: &Device) -> Self {
        Self {
            fc1: LinearConfig::new(IMAGE_PIXELS, 200).init(device),
            fc2: LinearConfig::new(200, 200).init(device),
            fc3: LinearConfig::new(200, NUM_CLASSES).init(device),
        }
    }

    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let x = relu(self.fc1.forward(x));
        let x = relu(self.fc2.forward(x));
        self.fc3.forward(x)
    }
}

#[derive(Module, Debug)]
pub struct MnistCnn {
    conv1: Conv2d,
    conv2: Conv2d,
    pool: MaxPool2d,
    fc1: Linear,
    fc2: Linear,
}

impl Classifier for MnistCnn {
    fn new(device: &Device) -> Self {
        let conv = |c_in, c_out| {
            Conv2dConfig::new([c_in, c_out], [5, 5])
                .with_padding(PaddingConfig2d::Same)
                .init(device)
        };
        Self {
            conv1: conv(1, 32),
            conv2: conv(32, 64),
            pool: MaxPool2dConfig::new([2, 2]).init(),
            fc1: LinearConfig::new(64 * 7 * 7, 512).init(device),
            fc2: LinearConfig::new(512, NUM_CLASSES).init(device),
        }
    }

    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let [batch, _] = x.dims();
        let x = x.reshape([batch, 1, IMAGE_SIDE, IMAGE_SIDE]);
        let x = self.pool.forward(relu(self.conv1.forward(x)));
        let x = self.pool.forward(relu(self.conv2.forward(x)));
        let x: Tensor<2> = x.flatten(1, 3);
        let x = relu(self.fc1.forward(x));
        self.fc2.forward(x)
    }
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
pub fn export<M: Classifier>(model: &M) -> Result<Parameters, WeightsError> {
    let tensors = model
        .collect(None, Some(Box::new(BurnToPyTorchAdapter)), false)
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
            Ok(NamedTensor::new(name, shape.as_slice().to_vec(), data))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Parameters::new(tensors).map_err(|e| WeightsError::Read(e.to_string()))
}

/// Loads PyTorch-layout weights into `model`; every model tensor must be given, no more.
pub fn import<M: Classifier>(model: &mut M, params: &Parameters) -> Result<(), WeightsError> {
    let tensors = params
        .tensors
        .iter()
        .map(|t| {
            PackTensor::new(
                t.name.clone(),
                DType::F32,
                t.shape.clone(),
                None,
                Bytes::from_elems(t.data.clone()),
            )
        })
        .collect();
    let result = model.apply(tensors, None, Some(Box::new(PyTorchToBurnAdapter)), false);
    if !result.missing.is_empty() || !result.unused.is_empty() || !result.errors.is_empty() {
        return Err(WeightsError::Mismatch {
            missing: result.missing.into_iter().map(|(p, _)| p).collect(),
            unused: result.unused,
            errors: format!("{:?}", result.errors),
        });
    }
    Ok(())
}

/// Freshly initialised weights of `kind`, reproducible from `seed` whatever else runs.
///
/// PyTorch's default for `Linear` and `Conv2d` (and burn's): weights and biases uniform in
/// `±1/sqrt(fan_in)`. Drawn from our own seeded generator rather than the backend's, whose seed
/// may be process-global and shared with concurrent work.
pub fn initial_parameters(kind: ModelKind, seed: u64) -> Result<Parameters, WeightsError> {
    use rand::{Rng, SeedableRng};
    let device = Device::flex();
    let template = match kind {
        ModelKind::Mnist2nn => export(&Mnist2nn::new(&device))?,
        ModelKind::MnistCnn => export(&MnistCnn::new(&device))?,
    };
    let fan_in = |layer: &str| -> usize {
        template
            .get(&format!("{layer}.weight"))
            .map_or(1, |w| w.shape[1..].iter().product())
    };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let tensors = template
        .tensors
        .iter()
        .map(|t| {
            let layer = t.name.rsplit_once('.').map_or(t.name.as_str(), |(l, _)| l);
            let bound = 1.0 / (fan_in(layer) as f32).sqrt();
            let data = (0..t.data.len())
                .map(|_| rng.random_range(-bound..bound))
                .collect();
            NamedTensor::new(t.name.clone(), t.shape.clone(), data)
        })
        .collect();
    Parameters::new(tensors).map_err(|e| WeightsError::Read(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_counts_match_the_paper() {
        let device = Device::flex();
        assert_eq!(Mnist2nn::new(&device).num_params(), 199_210);
        assert_eq!(MnistCnn::new(&device).num_params(), 1_663_370);
        let p = initial_parameters(ModelKind::MnistCnn, 1).expect("export");
        assert_eq!(p.num_params(), 1_663_370);
    }

    #[test]
    fn linear_weights_are_exported_in_pytorch_layout_and_round_trip() {
        let p = initial_parameters(ModelKind::Mnist2nn, 1).expect("export");
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
        let device = Device::flex();
        let mut m = Mnist2nn::new(&device);
        import(&mut m, &p).expect("import");
        assert_eq!(export(&m).expect("export"), p);
        let c = initial_parameters(ModelKind::MnistCnn, 1).expect("export");
        assert_eq!(
            c.get("conv2.weight").expect("conv2").shape,
            vec![64, 32, 5, 5]
        );
        assert_eq!(c.get("fc1.weight").expect("fc1").shape, vec![512, 3136]);
    }

    #[test]
    fn same_seed_gives_same_initial_weights() {
        let a = initial_parameters(ModelKind::Mnist2nn, 7).expect("export");
        let b = initial_parameters(ModelKind::Mnist2nn, 7).expect("export");
        assert_eq!(a, b);
    }

    #[test]
    fn import_refuses_weights_of_another_model() {
        let cnn = initial_parameters(ModelKind::MnistCnn, 1).expect("export");
        let mut m = Mnist2nn::new(&Device::flex());
        assert!(import(&mut m, &cnn).is_err());
    }
}
