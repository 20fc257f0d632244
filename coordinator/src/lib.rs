//! pollen-coordinator: the federated-learning server.
//!
//! It aggregates named f32 tensors and never needs the model's code: a [`Strategy`] decides
//! who trains and how updates combine, the [`RoundDriver`] runs rounds over the clients the
//! gRPC [`FleetService`] has registered, and [`records`] keeps every run reproducible.
//!
//! # Layout
//! - [`strategy`]: the `Strategy` contract (Flower's vocabulary), FedAvg and the strategies
//!   built on it (FedAvgM, FedProx, FedAdam, FedYogi, FedAdagrad, FedMedian, FedTrimmedAvg,
//!   Krum, Bulyan), and the `[strategy]` table of a run spec.
//! - [`round`]: a synchronous round as a pure state machine (quorum, deadline, early close,
//!   late and duplicate answers) over an explicit clock.
//! - [`fedbuff`]: the asynchronous discipline's buffer (staleness weights, versions).
//! - [`privacy`]: central and local differential privacy and the Rényi-DP accountant.
//! - [`registry`]: connected clients and open requests (dedupe, late replies).
//! - [`service`]: the tonic `Fleet` service.
//! - [`driver`]: the round driver (fan-out, deadlines, folding, evaluation, records).
//! - [`records`]: run directories, `metrics.jsonl`, checkpoints, the SQLite run database.
//! - [`counters`]: what was rejected, dropped, sent and received.
//! - [`metrics`]: Prometheus metrics (a `prometheus-client` registry) from the counters and
//!   finished rounds, and the live events the dashboard (`pollen-dashboard`) streams.
//! - [`server`]: binds the service to a listener and wires shutdown.
//! - [`storage`]: weight blobs in object storage behind the `BlobStore` trait: S3 (presigned
//!   URLs), the embedded S3 server used when nothing else is configured, and an in-memory
//!   store for tests.
//! - [`task`]: the run's task manifest, opaque bytes every instruction references, and the
//!   statistics phase that fits it before round 1.
//! - [`statistics`]: clients' federated statistics combined into those of their union.

pub mod counters;
pub mod driver;
pub mod fedbuff;
pub mod metrics;
pub mod privacy;
pub mod records;
pub mod registry;
pub mod round;
pub mod server;
pub mod service;
pub mod statistics;
pub mod storage;
pub mod strategy;
pub mod task;

pub use counters::Counters;
pub use driver::{DriverConfig, DriverError, Resume, RoundDriver, RunSummary};
pub use metrics::Metrics;
pub use records::{RoundRecord, RunStore};
pub use registry::Registry;
pub use service::FleetService;
pub use storage::{BlobStore, MemoryStore, S3Store, StoreConfig};
pub use strategy::Strategy;
pub use strategy::config::StrategyConfig;
pub use strategy::fedavg;
pub use strategy::fedavg::{FedAvg, FedAvgConfig};
pub use task::{Fitted, TaskSetup};
