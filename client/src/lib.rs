//! pollen-client: the edge side of Pollen.
//!
//! Trains models locally with burn (pure-Rust `flex` CPU backend) and answers the coordinator's
//! instructions over a gRPC Fleet stream. The MQTT edge agent builds on the same trainer.
//!
//! # Layout
//! - [`mnist`]: the IDX loader.
//! - [`partition`]: IID, pathological shards and Dirichlet splits across clients.
//! - [`model`]: the 2NN and CNN of McMahan et al. and weight export/import (PyTorch layout).
//! - [`trainer`]: minibatch SGD and evaluation.
//! - [`fleet`]: the `Client` trait and the gRPC Fleet client loop.
//! - [`trainer_client`]: a `Client` that trains with [`trainer`].

pub mod fleet;
pub mod mnist;
pub mod model;
pub mod partition;
pub mod trainer;
pub mod trainer_client;

pub use fleet::{Client, ClientError, ClientOptions, Exit, run_client};
pub use model::ModelKind;
pub use trainer_client::TrainerClient;
