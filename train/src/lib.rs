//! pollen-train: what a federated run learns, and from which data.
//!
//! The framework (coordinator, proxy, agent) moves named f32 tensors, metrics and an opaque
//! task manifest. This crate gives the manifest its meaning: a [`TaskManifest`] names the task
//! (classification, regression, anomaly detection), the model family and its settings, the
//! input schema and the local-training config; a [`TaskClient`] reads a device's own files,
//! prepares them for whatever task an instruction names, and trains with burn (or, with the
//! `torch` feature, LibTorch: TorchScript modules and, by choice, the MLP and 2-D CNN).
//!
//! # Layout
//! - [`manifest`]: the task manifest (task, input schema, model, training, fitted scaling).
//! - [`model`]: model families as burn `Config`s (MLP, 1-D CNN, GRU/LSTM, 2-D CNN,
//!   autoencoder), the MNIST presets, weights in PyTorch layout.
//! - [`data`]: CSV, NumPy and MNIST readers, windows over long-format series, the local
//!   holdout, partitions for simulation, federated statistics.
//! - [`trainer`]: minibatch training (SGD, Adam, AdamW, clipping) and evaluation with burn;
//!   `epochs`: the epoch loop both libraries share (batch order, time budget, bookkeeping).
//! - `torch` (feature `torch`): the same on LibTorch; [`backend`]: which library trains.
//! - [`metrics`]: evaluation sums that aggregate exactly across devices, and the metrics of
//!   their union (accuracy, macro-F1, RMSE, MAE, R², ROC AUC, anomaly threshold).
//! - [`task`]: a parsed manifest and the operations on it.
//! - [`client`]: [`TaskClient`], the `pollen_client::Client` devices and simulations run.

pub mod backend;
pub mod client;
pub mod data;
mod epochs;
pub mod manifest;
pub mod metrics;
pub mod model;
pub mod task;
#[cfg(feature = "torch")]
pub mod torch;
#[cfg(not(feature = "torch"))]
#[path = "torch_off.rs"]
mod torch;
pub mod trainer;

pub use backend::Backend;
pub use client::TaskClient;
pub use data::{DataSource, Format, Shard};
pub use manifest::{TaskKind, TaskManifest, TaskSpec, TrainSpec};
pub use model::ModelSpec;
pub use task::{Task, TaskError};
