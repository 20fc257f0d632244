//! pollen-client: the edge side of Pollen.
//!
//! Trains models locally with burn (pure-Rust `flex` CPU backend) and answers instructions
//! with a [`Client`]: either directly over a gRPC Fleet stream ([`run_client`]), or as an MQTT
//! edge agent ([`Agent`]) that receives commands from a proxy and moves weights through
//! presigned object-storage URLs.
//!
//! # Layout
//! - [`mnist`]: the IDX loader.
//! - [`partition`]: IID, pathological shards and Dirichlet splits across clients.
//! - [`model`]: the 2NN and CNN of McMahan et al. and weight export/import (PyTorch layout).
//! - [`trainer`]: minibatch SGD and evaluation.
//! - [`fleet`]: the `Client` trait and the gRPC Fleet client loop.
//! - [`trainer_client`]: a `Client` that trains with [`trainer`].
//! - [`agent`]: the MQTT edge agent (session, heartbeats, command queue, outbox), its config
//!   file, and [`agent::transfer`] (presigned-URL download and upload, reusable by any client).

pub mod agent;
pub mod fleet;
pub mod mnist;
pub mod model;
pub mod partition;
pub mod trainer;
pub mod trainer_client;

pub use agent::{Agent, AgentConfig, AgentError, AgentOptions, AgentStats};
pub use fleet::{Client, ClientError, ClientOptions, Exit, run_client};
pub use model::ModelKind;
pub use trainer_client::TrainerClient;
