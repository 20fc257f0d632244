//! Coordinator behaviour over real gRPC on loopback: quorum, deadlines, late replies,
//! update validation and malformed messages.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use pollen_client::{Client, ClientError, ClientEvaluate, ClientFit, ClientOptions, Work};
use pollen_coordinator::server::{FleetServer, serve};
use pollen_coordinator::{DriverConfig, FedAvg, FedAvgConfig, RoundDriver, RunStore};
use pollen_proto::fleet::{
    ClientMessage, FitRes, Join, ServerMessage, client_message::Msg as ClientMsg,
    fleet_client::FleetClient, server_message::Msg as ServerMsg, weights::Body,
};
use pollen_proto::scalar::ScalarMap;
use pollen_proto::{NamedTensor, Parameters};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

fn model(a: f32, b: [f32; 3]) -> Parameters {
    Parameters::new(vec![
        NamedTensor::new("layer.bias", vec![1], vec![a]),
        NamedTensor::new("layer.weight", vec![3], b.to_vec()),
    ])
    .expect("valid")
}

/// How a scripted client behaves on fit.
#[derive(Clone)]
enum Behaviour {
    /// Returns the given model trained on `n` examples.
    Answer(Parameters, u64),
    /// Reports a training error.
    Fail,
    /// Blocks for this long before answering with the global model.
    Stall(Duration),
}

struct Scripted(Behaviour);

impl Client for Scripted {
    /// What it announces when it joins: as many examples as it will claim (more would be
    /// refused).
    fn num_examples(&self) -> u64 {
        match &self.0 {
            Behaviour::Answer(_, n) => *n,
            _ => 10,
        }
    }
    fn get_parameters(&mut self, _: &Work<'_>) -> Result<Parameters, ClientError> {
        Ok(model(0.0, [0.0; 3]))
    }
    fn fit(&mut self, _: &Work<'_>, global: Parameters) -> Result<ClientFit, ClientError> {
        match &self.0 {
            Behaviour::Answer(p, n) => Ok(ClientFit {
                parameters: p.clone(),
                num_examples: *n,
                metrics: ScalarMap::new(),
            }),
            Behaviour::Fail => Err(ClientError::training("simulated out-of-memory in fit")),
            Behaviour::Stall(d) => {
                std::thread::sleep(*d);
                Ok(ClientFit {
                    parameters: global,
                    num_examples: 10,
                    metrics: ScalarMap::new(),
                })
            }
        }
    }
    /// Reports a loss of n / 10 on n examples (n from `Answer`, else 1).
    fn evaluate(&mut self, _work: &Work<'_>, _: Parameters) -> Result<ClientEvaluate, ClientError> {
        let n = match &self.0 {
            Behaviour::Answer(_, n) => *n,
            _ => 1,
        };
        Ok(ClientEvaluate {
            loss: n as f64 / 10.0,
            num_examples: n,
            metrics: ScalarMap::new(),
        })
    }
}

struct Harness {
    server: FleetServer,
    stop: CancellationToken,
    runs: tempfile::TempDir,
}

impl Harness {
    async fn start() -> Self {
        let stop = CancellationToken::new();
        let server = serve(SocketAddr::from(([127, 0, 0, 1], 0)), stop.clone())
            .await
            .expect("bind port 0");
        Self {
            server,
            stop,
            runs: tempfile::tempdir().expect("tempdir"),
        }
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.server.addr)
    }

    fn spawn_client(&self, id: &str, behaviour: Behaviour) {
        let (endpoint, id, stop) = (self.endpoint(), id.to_string(), self.stop.clone());
        tokio::spawn(async move {
            let _ = pollen_client::run_client(
                &endpoint,
                &id,
                Scripted(behaviour),
                ClientOptions::default(),
                stop,
            )
            .await;
        });
    }

    /// Runs FedAvg over every connected client (fraction 1.0) from `initial`.
    async fn run(
        &self,
        rounds: u64,
        min_fit: usize,
        min_available: usize,
        timeout: Duration,
        initial: Parameters,
    ) -> pollen_coordinator::RunSummary {
        let config = FedAvgConfig {
            fraction_fit: 1.0,
            min_fit_clients: min_fit,
            min_available_clients: min_available,
            ..Default::default()
        };
        self.run_from(rounds, config, timeout, Some(initial)).await
    }

    /// Like `run`; without `initial` the driver asks a client for its parameters.
    async fn run_from(
        &self,
        rounds: u64,
        config: FedAvgConfig,
        timeout: Duration,
        initial: Option<Parameters>,
    ) -> pollen_coordinator::RunSummary {
        let store = RunStore::open(self.runs.path()).expect("run store");
        let run = Arc::new(store.create_run("test", "spec", 1, rounds).expect("run"));
        let mut strategy = FedAvg::new(config);
        if let Some(initial) = initial {
            strategy = strategy.with_initial_parameters(initial);
        }
        RoundDriver::new(
            self.server.registry.clone(),
            Box::new(strategy),
            DriverConfig {
                num_rounds: rounds,
                round_timeout: timeout,
                wait_for_clients: Duration::from_secs(20),
                primary_metric: None,
                seed: 1,
                ..Default::default()
            },
        )
        .with_run(run)
        .run(CancellationToken::new())
        .await
        .expect("run completes")
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A client speaking the raw protocol, for replies no well-behaved client would send.
struct RawClient {
    tx: mpsc::Sender<ClientMessage>,
    inbound: tonic::Streaming<ServerMessage>,
}

impl RawClient {
    async fn join(endpoint: &str, id: &str) -> Self {
        let mut grpc = FleetClient::connect(endpoint.to_string())
            .await
            .expect("connect");
        let (tx, rx) = mpsc::channel(8);
        tx.send(ClientMessage {
            msg: Some(ClientMsg::Join(Join {
                client_id: id.into(),
                agent_version: "raw".into(),
                num_examples: 10,
                properties: HashMap::new(),
                data: None,
            })),
        })
        .await
        .expect("send join");
        let inbound = grpc
            .join(ReceiverStream::new(rx))
            .await
            .expect("joined")
            .into_inner();
        Self { tx, inbound }
    }

    /// The next fit instruction: (request id, round, global model bytes).
    async fn next_fit(&mut self) -> (u64, u64, Parameters) {
        loop {
            let msg = self.inbound.message().await.expect("stream").expect("open");
            if let Some(ServerMsg::Fit(fit)) = msg.msg {
                let p =
                    Parameters::from_wire(&fit.weights.expect("weights"), None).expect("decode");
                return (fit.request_id, fit.round, p);
            }
        }
    }

    async fn send_fit(&self, request_id: u64, round: u64, weights: pollen_proto::fleet::Weights) {
        self.tx
            .send(ClientMessage {
                msg: Some(ClientMsg::Fit(FitRes {
                    request_id,
                    round,
                    weights: Some(weights),
                    num_examples: 10,
                    metrics: HashMap::new(),
                })),
            })
            .await
            .expect("send fit");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fedavg_over_grpc_equals_the_hand_computed_weighted_average() {
    let h = Harness::start().await;
    h.spawn_client("a", Behaviour::Answer(model(1.0, [1.0, 2.0, 3.0]), 10));
    h.spawn_client("b", Behaviour::Answer(model(4.0, [4.0, 0.0, -3.0]), 30));
    let s = h
        .run(1, 2, 2, Duration::from_secs(20), model(0.0, [0.0; 3]))
        .await;
    // (10 * x_a + 30 * x_b) / 40
    let expected = model(3.25, [3.25, 0.5, -1.5]);
    for (got, want) in s.parameters.tensors.iter().zip(&expected.tensors) {
        for (g, w) in got.data.iter().zip(&want.data) {
            assert!((g - w).abs() < 1e-6, "{} {g} != {w}", got.name);
        }
    }
    let r = &s.rounds[0];
    assert_eq!((r.sampled, r.succeeded, r.failed), (2, 2, 0));
    assert!(r.bytes_sent > 0 && r.bytes_received > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_fails_mid_fit_does_not_fail_a_round_that_keeps_its_quorum() {
    let h = Harness::start().await;
    h.spawn_client("good-1", Behaviour::Answer(model(1.0, [1.0; 3]), 10));
    h.spawn_client("good-2", Behaviour::Answer(model(3.0, [3.0; 3]), 10));
    h.spawn_client("broken", Behaviour::Fail);
    let s = h
        .run(2, 2, 3, Duration::from_secs(20), model(0.0, [0.0; 3]))
        .await;
    for r in &s.rounds {
        assert_eq!(r.status, pollen_coordinator::records::RoundStatus::Ok);
        assert_eq!((r.sampled, r.succeeded, r.failed), (3, 2, 1));
        assert_eq!(r.failures_by_reason.get("client_error"), Some(&1));
        assert_eq!(r.failures[0].client, "broken");
        assert!(
            r.failures[0].message.contains("simulated out-of-memory"),
            "{:?}",
            r.failures
        );
    }
    assert_eq!(s.parameters.tensors[0].data, vec![2.0]);
    // The failure is in the run's records too.
    let run_dir = std::fs::read_dir(h.runs.path())
        .expect("runs dir")
        .filter_map(Result::ok)
        .find(|e| e.path().is_dir())
        .expect("run dir")
        .path();
    let lines = std::fs::read_to_string(run_dir.join("metrics.jsonl")).expect("metrics.jsonl");
    assert_eq!(lines.lines().count(), 2);
    assert!(lines.contains("simulated out-of-memory"));
    // Each round's global model is a safetensors file a PyTorch user can load.
    let ckpt = std::fs::read(run_dir.join("models/round-0002.safetensors")).expect("checkpoint");
    assert_eq!(
        Parameters::decode(&ckpt, None).expect("decodes"),
        *s.parameters
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_never_answers_is_cut_off_at_the_deadline() {
    let h = Harness::start().await;
    h.spawn_client("fast-1", Behaviour::Answer(model(1.0, [1.0; 3]), 10));
    h.spawn_client("fast-2", Behaviour::Answer(model(1.0, [1.0; 3]), 10));
    h.spawn_client("stuck", Behaviour::Stall(Duration::from_secs(5)));
    // The stuck client would answer after 5 s; the round deadline is 1.5 s.
    let s = h
        .run(1, 2, 3, Duration::from_millis(1500), model(0.0, [0.0; 3]))
        .await;
    let r = &s.rounds[0];
    assert_eq!((r.succeeded, r.failed), (2, 1));
    assert_eq!(r.failures_by_reason.get("timeout"), Some(&1));
    assert_eq!(r.failures[0].client, "stuck");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_late_reply_is_rejected_and_counted_and_never_reaches_the_model() {
    let h = Harness::start().await;
    h.spawn_client("on-time-1", Behaviour::Answer(model(1.0, [1.0; 3]), 10));
    h.spawn_client("on-time-2", Behaviour::Answer(model(1.0, [1.0; 3]), 10));
    let endpoint = h.endpoint();
    let late = tokio::spawn(async move {
        let mut raw = RawClient::join(&endpoint, "late").await;
        let (id, round, _) = raw.next_fit().await;
        // Answer after the 1 s deadline with a model that would be visible in the average.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        raw.send_fit(id, round, model(1000.0, [1000.0; 3]).encode().to_inline())
            .await;
        // A second, duplicate copy of the same reply.
        raw.send_fit(id, round, model(1000.0, [1000.0; 3]).encode().to_inline())
            .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        raw
    });
    let s = h
        .run(1, 2, 3, Duration::from_secs(1), model(0.0, [0.0; 3]))
        .await;
    let _raw = late.await.expect("late client");
    assert_eq!(s.rounds[0].failures_by_reason.get("timeout"), Some(&1));
    assert_eq!(s.parameters.tensors[0].data, vec![1.0]);
    let c = h.server.registry.counters().snapshot();
    assert_eq!(c.replies_late, 2, "{c:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_updates_are_rejected_with_the_tensor_named_and_the_model_unchanged() {
    let h = Harness::start().await;
    let initial = model(0.5, [0.5; 3]);
    let endpoint = h.endpoint();
    let mut bad = Vec::new();
    for kind in ["shape", "nan", "digest"] {
        let endpoint = endpoint.clone();
        bad.push(tokio::spawn(async move {
            let mut raw = RawClient::join(&endpoint, kind).await;
            let (id, round, global) = raw.next_fit().await;
            let weights = match kind {
                "shape" => Parameters::new(vec![
                    NamedTensor::new("layer.bias", vec![1], vec![9.0]),
                    NamedTensor::new("layer.weight", vec![1, 3], vec![9.0; 3]),
                ])
                .expect("valid")
                .encode()
                .to_inline(),
                "nan" => {
                    let mut p = global.clone();
                    p.tensors[1].data[2] = f32::NAN;
                    p.encode().to_inline()
                }
                _ => {
                    let mut w = model(9.0, [9.0; 3]).encode().to_inline();
                    if let Some(Body::Inline(b)) = w.body.as_mut() {
                        b.sha256 = "0".repeat(64);
                    }
                    w
                }
            };
            raw.send_fit(id, round, weights).await;
            tokio::time::sleep(Duration::from_secs(3)).await;
            raw
        }));
    }
    let s = h
        .run(1, 1, 3, Duration::from_secs(10), initial.clone())
        .await;
    for b in bad {
        b.await.expect("bad client");
    }
    let r = &s.rounds[0];
    assert_eq!(r.status, pollen_coordinator::records::RoundStatus::Failed);
    assert_eq!(
        r.failures_by_reason.get("rejected"),
        Some(&3),
        "{:?}",
        r.failures
    );
    let msg = |client: &str| {
        r.failures
            .iter()
            .find(|f| f.client == client)
            .map(|f| f.message.clone())
            .expect("failure recorded")
    };
    assert_eq!(
        msg("shape"),
        "client shape, round 1: tensor \"layer.weight\" has shape [1, 3], expected [3]"
    );
    assert!(msg("nan").contains("client nan, round 1: tensor \"layer.weight\" holds a non-finite value (NaN) at flat index 2"), "{}", msg("nan"));
    assert!(
        msg("digest").starts_with("client digest, round 1: digest mismatch"),
        "{}",
        msg("digest")
    );
    assert_eq!(
        *s.parameters, initial,
        "a rejected update must not touch the global model"
    );
    assert_eq!(h.server.registry.counters().snapshot().updates_rejected, 3);
}

/// Sends raw bytes as a gRPC message, bypassing protobuf encoding.
#[derive(Clone, Default)]
struct RawCodec;

struct RawEncoder;
struct RawDecoder;

impl tonic::codec::Encoder for RawEncoder {
    type Item = Bytes;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Bytes,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), Self::Error> {
        use bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawDecoder {
    type Item = Bytes;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Bytes>, Self::Error> {
        use bytes::Buf;
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

impl tonic::codec::Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_malformed_grpc_message_ends_that_clients_stream_not_the_coordinator() {
    use prost::Message;
    let h = Harness::start().await;
    let channel = tonic::transport::Endpoint::from_shared(h.endpoint())
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("ready");
    let join = ClientMessage {
        msg: Some(ClientMsg::Join(Join {
            client_id: "garbler".into(),
            agent_version: "raw".into(),
            num_examples: 1,
            properties: HashMap::new(),
            data: None,
        })),
    }
    .encode_to_vec();
    // Field 3 (fit) declared as a 100-byte message, with only 3 bytes following: undecodable.
    let garbage = Bytes::from_static(&[0x1a, 0x64, 0x01, 0x02, 0x03]);
    let outbound = tokio_stream::iter(vec![Bytes::from(join), garbage]);
    let path = http::uri::PathAndQuery::from_static("/pollen.fleet.v1.Fleet/Join");
    let response = grpc
        .streaming(tonic::Request::new(outbound), path, RawCodec)
        .await
        .expect("stream opened");
    let mut inbound = response.into_inner();
    let mut ended_with = None;
    while ended_with.is_none() {
        match inbound.message().await {
            Ok(Some(_welcome)) => continue,
            Ok(None) => ended_with = Some(tonic::Code::Ok),
            Err(status) => {
                assert!(status.message().contains("garbler"), "{status:?}");
                ended_with = Some(status.code());
            }
        }
    }
    assert_eq!(ended_with, Some(tonic::Code::InvalidArgument));
    assert_eq!(
        h.server.registry.counters().snapshot().messages_malformed,
        1
    );
    // The coordinator still serves: a well-behaved client joins and trains.
    h.spawn_client("ok-1", Behaviour::Answer(model(2.0, [2.0; 3]), 10));
    h.spawn_client("ok-2", Behaviour::Answer(model(2.0, [2.0; 3]), 10));
    let s = h
        .run(1, 2, 2, Duration::from_secs(20), model(0.0, [0.0; 3]))
        .await;
    assert_eq!(s.rounds[0].succeeded, 2);
    assert!(!s.rounds[0].participants.contains(&"garbler".to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_initial_parameters_the_coordinator_asks_a_client_for_them() {
    let h = Harness::start().await;
    h.spawn_client("a", Behaviour::Stall(Duration::from_millis(10)));
    h.spawn_client("b", Behaviour::Stall(Duration::from_millis(10)));
    let config = FedAvgConfig {
        fraction_fit: 1.0,
        ..Default::default()
    };
    let s = h.run_from(1, config, Duration::from_secs(20), None).await;
    // Both clients return the global model they got, which came from get_parameters.
    assert_eq!(*s.parameters, model(0.0, [0.0; 3]));
    assert_eq!(s.rounds[0].succeeded, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn federated_evaluation_is_weighted_by_the_clients_examples() {
    let h = Harness::start().await;
    h.spawn_client("a", Behaviour::Answer(model(1.0, [1.0; 3]), 10));
    h.spawn_client("b", Behaviour::Answer(model(1.0, [1.0; 3]), 30));
    let config = FedAvgConfig {
        fraction_fit: 1.0,
        fraction_evaluate: 1.0,
        ..Default::default()
    };
    let s = h
        .run_from(
            1,
            config,
            Duration::from_secs(20),
            Some(model(0.0, [0.0; 3])),
        )
        .await;
    // (10 * 1.0 + 30 * 3.0) / 40; no centralized evaluation, so it is also the round's loss.
    let r = &s.rounds[0];
    assert_eq!(r.federated_loss, Some(2.5));
    assert_eq!(r.loss, Some(2.5));
}
