//! The networks LibTorch trains: the user's TorchScript module, or Pollen's `mlp` and `cnn2d`
//! families written with LibTorch's own operators (same parameter names and shapes as the burn
//! models, so that a device on either library joins the same run). Every call goes through
//! tch's `Result` API: a module that does not fit the task fails the instruction, never the
//! agent.

use std::collections::HashMap;

use pollen_proto::{NamedTensor, Parameters};
use tch::{CModule, Device, Kind, TchError, Tensor};

use crate::model::{Activation, Cnn2dConfig, MlpConfig, ModelIo, ModelSpec};

/// A LibTorch error as a person reads it: LibTorch appends a C++ backtrace and TorchScript
/// puts the cause on its last `RuntimeError:` line (after source paths of the machine that
/// exported the module).
pub fn short(e: &TchError) -> String {
    let s = e.to_string();
    if let Some(line) = s
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with("RuntimeError:"))
    {
        return line.trim().to_string();
    }
    let cut = s.find("\nException raised from").unwrap_or(s.len());
    s[..cut].trim().to_string()
}

/// A network with named parameters.
pub enum Net {
    /// A TorchScript module; `input` is the shape of one example it takes.
    Script { module: CModule, input: Vec<i64> },
    /// One of Pollen's families.
    Builtin(Builtin),
}

impl std::fmt::Debug for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Net::Script { input, .. } => write!(f, "TorchScript module taking {input:?}"),
            Net::Builtin(b) => write!(f, "{b:?}"),
        }
    }
}

impl Net {
    /// The network for `model` on `io`; `script` is the TorchScript file's bytes when the
    /// model is one.
    pub fn new(model: &ModelSpec, io: &ModelIo, script: Option<&[u8]>) -> Result<Self, String> {
        match model {
            ModelSpec::TorchScript(_) => {
                let bytes = script.ok_or("the TorchScript file did not come with the task")?;
                let module = CModule::load_data(&mut &bytes[..]).map_err(|e| {
                    format!(
                        "the model file is not a TorchScript module ({}); save it with torch.jit.script(model).save(path)",
                        short(&e)
                    )
                })?;
                let input = io.input.iter().map(|&d| d as i64).collect();
                Ok(Net::Script { module, input })
            }
            ModelSpec::Mlp(c) => Ok(Net::Builtin(Builtin::mlp(c, io))),
            ModelSpec::Cnn2d(c) => Builtin::cnn2d(c, io).map(Net::Builtin),
            other => Err(format!(
                "LibTorch trains the mlp, cnn2d and torchscript families, not {}",
                other.family()
            )),
        }
    }

    /// The trainable parameters by name (a TorchScript module's `state_dict()` keys), sharing
    /// storage with the network.
    pub fn parameters(&self) -> Result<Vec<(String, Tensor)>, String> {
        match self {
            Net::Script { module, .. } => module
                .named_parameters()
                .map(|ps| ps.into_iter().filter(|(_, t)| t.requires_grad()).collect())
                .map_err(|e| short(&e)),
            Net::Builtin(b) => Ok(b
                .params
                .iter()
                .map(|(n, t)| (n.clone(), t.shallow_clone()))
                .collect()),
        }
    }

    /// Training mode (dropout on, batch statistics updated) or evaluation mode.
    pub fn set_train(&mut self, train: bool) -> Result<(), String> {
        match self {
            Net::Script { module, .. } => if train {
                module.f_set_train()
            } else {
                module.f_set_eval()
            }
            .map_err(|e| short(&e)),
            Net::Builtin(b) => {
                b.train = train;
                Ok(())
            }
        }
    }

    /// `[batch, prod(input)]` flattened examples in, the network's output out.
    pub fn forward(&self, x: &Tensor, batch: i64) -> Result<Tensor, String> {
        match self {
            Net::Script { module, input } => {
                let mut shape = vec![batch];
                shape.extend(input);
                let x = x.f_reshape(&shape).map_err(|e| short(&e))?;
                module.forward_ts(&[x]).map_err(|e| {
                    format!(
                        "the TorchScript module's forward failed on a batch shaped {shape:?} ({})",
                        short(&e)
                    )
                })
            }
            Net::Builtin(b) => b.forward(x, batch).map_err(|e| short(&e)),
        }
    }

    /// Loads `params` (every parameter by name, same shapes, no more).
    pub fn load(&self, params: &Parameters) -> Result<(), String> {
        let mut own: HashMap<String, Tensor> = self.parameters()?.into_iter().collect();
        let mut unused = Vec::new();
        for t in &params.tensors {
            let Some(mut target) = own.remove(&t.name) else {
                unused.push(t.name.clone());
                continue;
            };
            let shape: Vec<i64> = t.shape.iter().map(|&d| d as i64).collect();
            // `copy_` would broadcast a wrong shape silently.
            if target.size() != shape {
                return Err(format!(
                    "tensor {:?} is {shape:?}; the module's is {:?}",
                    t.name,
                    target.size()
                ));
            }
            let src = Tensor::f_of_slice(&t.data)
                .and_then(|s| s.f_reshape(&shape))
                .map_err(|e| short(&e))?;
            tch::no_grad(|| target.f_copy_(&src)).map_err(|e| short(&e))?;
        }
        if !own.is_empty() || !unused.is_empty() {
            let mut missing: Vec<String> = own.into_keys().collect();
            missing.sort();
            return Err(format!(
                "weights do not fit the module: missing {missing:?}, not in the module {unused:?}"
            ));
        }
        Ok(())
    }

    /// The parameters as named f32 tensors (PyTorch layout, sorted by name).
    pub fn export(&self) -> Result<Parameters, String> {
        let tensors = self
            .parameters()?
            .into_iter()
            .map(|(name, t)| {
                let n = t.numel();
                let mut data = vec![0f32; n];
                t.f_to_kind(Kind::Float)
                    .and_then(|t| t.f_copy_data(&mut data, n))
                    .map_err(|e| short(&e))?;
                let shape = t.size().iter().map(|&d| d.max(0) as usize).collect();
                Ok(NamedTensor::new(name, shape, data))
            })
            .collect::<Result<Vec<_>, String>>()?;
        Parameters::new(tensors).map_err(|e| e.to_string())
    }
}

/// Pollen's `mlp` or `cnn2d` in LibTorch: parameters named as the burn models export them
/// (`conv1.weight`, `fc1.weight`, ...), the same forward pass.
pub struct Builtin {
    params: Vec<(String, Tensor)>,
    /// Convolutions: (kernel size, pool); `None` for an MLP.
    conv: Option<(i64, i64)>,
    convs: usize,
    fcs: usize,
    input: Vec<i64>,
    activation: Activation,
    dropout: f64,
    train: bool,
}

impl std::fmt::Debug for Builtin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} on LibTorch ({} convolutions, {} dense layers)",
            if self.conv.is_some() { "cnn2d" } else { "mlp" },
            self.convs,
            self.fcs
        )
    }
}

fn param(shape: &[i64]) -> Tensor {
    // Values come from the global model before any use; zeros keep construction infallible.
    Tensor::zeros(shape, (Kind::Float, Device::Cpu)).set_requires_grad(true)
}

impl Builtin {
    fn dense(params: &mut Vec<(String, Tensor)>, widths: &[i64]) -> usize {
        for (i, w) in widths.windows(2).enumerate() {
            params.push((format!("fc{}.weight", i + 1), param(&[w[1], w[0]])));
            params.push((format!("fc{}.bias", i + 1), param(&[w[1]])));
        }
        widths.len() - 1
    }

    fn mlp(c: &MlpConfig, io: &ModelIo) -> Self {
        let mut widths = vec![io.input_len() as i64];
        widths.extend(c.hidden.iter().map(|&h| h as i64));
        widths.push(io.outputs as i64);
        let mut params = Vec::new();
        let fcs = Self::dense(&mut params, &widths);
        Self {
            params,
            conv: None,
            convs: 0,
            fcs,
            input: vec![io.input_len() as i64],
            activation: c.activation,
            dropout: c.dropout,
            train: false,
        }
    }

    fn cnn2d(c: &Cnn2dConfig, io: &ModelIo) -> Result<Self, String> {
        let &[channels, height, width] = io.input.as_slice() else {
            return Err(format!("cnn2d needs images, the input is {:?}", io.input));
        };
        let (k, pool) = (c.kernel_size as i64, c.pool.max(1) as i64);
        let mut params = Vec::new();
        let (mut c_in, mut h, mut w) = (channels as i64, height as i64, width as i64);
        for (i, &c_out) in c.channels.iter().enumerate() {
            let c_out = c_out as i64;
            params.push((format!("conv{}.weight", i + 1), param(&[c_out, c_in, k, k])));
            params.push((format!("conv{}.bias", i + 1), param(&[c_out])));
            c_in = c_out;
            (h, w) = (h / pool, w / pool);
        }
        let mut widths = vec![c_in * h * w];
        widths.extend(c.hidden.iter().map(|&h| h as i64));
        widths.push(io.outputs as i64);
        let fcs = Self::dense(&mut params, &widths);
        Ok(Self {
            params,
            conv: Some((k, pool)),
            convs: c.channels.len(),
            fcs,
            input: vec![channels as i64, height as i64, width as i64],
            activation: c.activation,
            dropout: c.dropout,
            train: false,
        })
    }

    fn get(&self, name: &str) -> Result<&Tensor, TchError> {
        self.params
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t)
            .ok_or_else(|| TchError::Torch(format!("no parameter {name}")))
    }

    fn activate(&self, x: &Tensor) -> Result<Tensor, TchError> {
        match self.activation {
            Activation::Relu => x.f_relu(),
            Activation::Tanh => x.f_tanh(),
            Activation::Gelu => x.f_gelu("none"),
            Activation::Sigmoid => x.f_sigmoid(),
        }
    }

    fn forward(&self, x: &Tensor, batch: i64) -> Result<Tensor, TchError> {
        let mut x = x.shallow_clone();
        if let Some((k, pool)) = self.conv {
            let mut shape = vec![batch];
            shape.extend(&self.input);
            x = x.f_reshape(&shape)?;
            for i in 1..=self.convs {
                let (wt, b) = (
                    self.get(&format!("conv{i}.weight"))?,
                    self.get(&format!("conv{i}.bias"))?,
                );
                x = self.activate(&x.f_conv2d(
                    wt,
                    Some(b),
                    &[1, 1],
                    &[k / 2, k / 2],
                    &[1, 1],
                    1,
                )?)?;
                if pool > 1 {
                    x = x.f_max_pool2d(&[pool, pool], &[pool, pool], &[0, 0], &[1, 1], false)?;
                }
            }
            x = x.f_flatten(1, -1)?;
        }
        for i in 1..=self.fcs {
            let (wt, b) = (
                self.get(&format!("fc{i}.weight"))?,
                self.get(&format!("fc{i}.bias"))?,
            );
            x = x.f_linear(wt, Some(b))?;
            if i < self.fcs {
                x = self.activate(&x)?.f_dropout(self.dropout, self.train)?;
            }
        }
        Ok(x)
    }
}
