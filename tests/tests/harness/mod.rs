//! What the device-path tests share: a coordinator with the embedded S3 server and one proxy
//! (or one per shard) for a fleet of its own, and test devices whose answers are predictable.
//! Each test binary uses part of it.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use pollen_client::agent::{Agent, AgentOptions};
use pollen_client::{Client, ClientError, ClientEvaluate, ClientFit, Work};
use pollen_coordinator::server::{FleetServer, serve_tls};
use pollen_coordinator::storage::embedded::{EmbeddedS3, EmbeddedTls};
use pollen_coordinator::strategy::Evaluation;
use pollen_coordinator::{
    BlobStore, DriverConfig, FedAvg, FedAvgConfig, Metrics, RoundDriver, RunSummary, S3Store,
};
use pollen_dashboard::{HttpSources, serve_http};
use pollen_proto::grpc_tls::{ClientTls, ServerTls};
use pollen_proto::mqtt::BrokerConfig;
use pollen_proto::scalar::ScalarMap;
use pollen_proto::{NamedTensor, Parameters};
use pollen_proxy::{Proxy, ProxyConfig, ProxyHandle, ProxyShard, Selection};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The shared Mosquitto, checked first so that a missing broker fails with instructions.
pub fn mosquitto() -> BrokerConfig {
    BrokerConfig::new(pollen_tests::mosquitto_url())
}

pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{:08x}", rand::random::<u32>())
}

pub fn model(values: [f32; 4]) -> Parameters {
    Parameters::new(vec![NamedTensor::new("w", vec![4], values.to_vec())]).expect("valid")
}

/// What a test device does on fit.
#[derive(Clone)]
pub enum Behaviour {
    /// Answers `global + delta`, trained on `n` examples.
    Shift(f32, u64),
    /// Signals `started`, then never answers in time (stands for a device that dies mid-fit).
    Hang(Arc<AtomicBool>),
}

pub struct TestClient(pub Behaviour);

impl Client for TestClient {
    fn num_examples(&self) -> u64 {
        match &self.0 {
            Behaviour::Shift(_, n) => *n,
            Behaviour::Hang(_) => 10,
        }
    }
    fn get_parameters(&mut self, _: &Work<'_>) -> Result<Parameters, ClientError> {
        Ok(model([0.0; 4]))
    }
    fn fit(&mut self, _: &Work<'_>, global: Parameters) -> Result<ClientFit, ClientError> {
        match &self.0 {
            Behaviour::Shift(delta, n) => {
                let mut p = global;
                for t in &mut p.tensors {
                    t.data.iter_mut().for_each(|x| *x += delta);
                }
                Ok(ClientFit {
                    parameters: p,
                    num_examples: *n,
                    metrics: ScalarMap::new(),
                })
            }
            Behaviour::Hang(started) => {
                started.store(true, Ordering::SeqCst);
                std::thread::sleep(Duration::from_secs(6));
                Err(ClientError::training("hung device woke up"))
            }
        }
    }
    fn evaluate(&mut self, _work: &Work<'_>, _: Parameters) -> Result<ClientEvaluate, ClientError> {
        Ok(ClientEvaluate {
            loss: 1.0,
            num_examples: self.num_examples(),
            metrics: ScalarMap::new(),
        })
    }
}

/// A test device's agent: heartbeats and keep-alive short enough for tests.
pub fn test_agent_options(id: &str, fleet: &str, broker: &BrokerConfig) -> AgentOptions {
    let mut options = AgentOptions::new(id, fleet, broker.clone());
    options.heartbeat = Duration::from_secs(5);
    options.keep_alive = Duration::from_secs(5);
    options.model = "test-4".into();
    options
}

/// Coordinator + embedded S3 + one proxy for a fleet of its own.
pub struct Harness {
    pub fleet: String,
    pub broker: BrokerConfig,
    pub stop: CancellationToken,
    pub server: FleetServer,
    pub store: Arc<dyn BlobStore>,
    pub s3_secret: String,
    /// `http(s)://127.0.0.1:PORT`: the embedded S3 server.
    pub s3_endpoint: String,
    /// One proxy, or one per shard of the fleet.
    pub proxies: Vec<ProxyHandle>,
    pub metrics: Arc<Metrics>,
    /// `http://127.0.0.1:PORT`: the coordinator's `/metrics`.
    pub http: String,
    _dir: tempfile::TempDir,
}

impl Harness {
    pub async fn start(broker: BrokerConfig) -> Self {
        Self::start_with_proxies(broker, vec![Selection::default()], &unique("t"), None).await
    }

    /// One proxy (`proxy-0`) for `fleet`, whose devices the test starts with identities of
    /// their own.
    pub async fn start_for_fleet(broker: BrokerConfig, fleet: &str) -> Self {
        Self::start_with_proxies(broker, vec![Selection::default()], fleet, None).await
    }

    /// [`start_for_fleet`](Self::start_for_fleet) with the Fleet link over TLS: the
    /// coordinator serves `server`, the proxy connects with `client`.
    pub async fn start_secure(
        broker: BrokerConfig,
        fleet: &str,
        server: ServerTls,
        client: ClientTls,
    ) -> Self {
        Self::start_with_proxies(
            broker,
            vec![Selection::default()],
            fleet,
            Some((server, client)),
        )
        .await
    }

    /// One proxy per shard of the fleet, `proxy-<i>` bridging shard `i/shards`.
    pub async fn start_sharded(broker: BrokerConfig, shards: u32) -> Self {
        let selections = (0..shards)
            .map(|index| Selection {
                shard: Some(ProxyShard {
                    index,
                    count: shards,
                }),
                ..Selection::default()
            })
            .collect();
        Self::start_with_proxies(broker, selections, &unique("t"), None).await
    }

    async fn start_with_proxies(
        broker: BrokerConfig,
        selections: Vec<Selection>,
        fleet: &str,
        tls: Option<(ServerTls, ClientTls)>,
    ) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let stop = CancellationToken::new();
        // With TLS on the Fleet link, the object store serves HTTPS with the same certificate.
        let s3_tls = tls.as_ref().map(|(server, _)| EmbeddedTls {
            cert_file: server.cert_file.clone(),
            key_file: server.key_file.clone(),
            ca_file: server
                .client_ca_file
                .clone()
                .expect("a secure harness has a fleet CA"),
        });
        let s3 = EmbeddedS3::start(
            &dir.path().join("s3"),
            SocketAddr::from(([127, 0, 0, 1], 0)),
            s3_tls.as_ref(),
            stop.clone(),
        )
        .await
        .expect("embedded S3 starts");
        let store = Arc::new(
            S3Store::connect(&s3.store_config("pollen"))
                .await
                .expect("bucket"),
        );
        let server = serve_tls(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            tls.as_ref().map(|(server, _)| server),
            stop.clone(),
        )
        .await
        .expect("bind port 0");
        let metrics = Arc::new(Metrics::new(server.registry.clone()));
        let http = serve_http(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            HttpSources {
                registry: Some(server.registry.clone()),
                metrics: Some(metrics.clone()),
                runs: None,
                access: None,
                control: None,
            },
            stop.clone(),
        )
        .await
        .expect("bind port 0");
        let fleet = fleet.to_string();
        let mut proxies = Vec::new();
        for (i, selection) in selections.into_iter().enumerate() {
            let proxy = Proxy::start(
                ProxyConfig {
                    fleet: fleet.clone(),
                    proxy_id: format!("proxy-{i}"),
                    coordinator: match tls {
                        Some(_) => format!("https://{}", server.addr),
                        None => format!("http://{}", server.addr),
                    },
                    coordinator_tls: tls.as_ref().map(|(_, c)| c.clone()).unwrap_or_default(),
                    broker: broker.clone(),
                    selection,
                    stale_after: Duration::from_secs(30),
                    keep_alive: Duration::from_secs(5),
                    persistent_session: false,
                    auto_shard: false,
                    heartbeat: pollen_proxy::config::DEFAULT_HEARTBEAT,
                },
                stop.clone(),
            )
            .await
            .expect("proxy starts");
            proxies.push(proxy);
        }
        Self {
            fleet,
            broker,
            stop,
            server,
            store,
            s3_secret: s3.secret_key().to_string(),
            s3_endpoint: s3.endpoint.clone(),
            proxies,
            metrics,
            http: format!("http://{}", http.addr),
            _dir: dir,
        }
    }

    /// The (first) proxy.
    pub fn proxy(&self) -> &ProxyHandle {
        &self.proxies[0]
    }

    /// Starts an edge agent task; cancel the returned token to stop it cleanly, or abort the
    /// handle to kill it (its TCP connection drops, the broker publishes its last-will).
    pub fn agent(&self, id: &str, client: TestClient) -> (JoinHandle<()>, CancellationToken) {
        let token = self.stop.child_token();
        let agent = Agent::new(test_agent_options(id, &self.fleet, &self.broker), client)
            .expect("valid agent options");
        let t = token.clone();
        let handle = tokio::spawn(async move {
            let _ = agent.run(t).await;
        });
        (handle, token)
    }

    pub async fn run(
        &self,
        rounds: u64,
        config: FedAvgConfig,
        timeout: Duration,
        initial: Parameters,
    ) -> RunSummary {
        // "Accuracy" of the global model: its first weight, so tests can predict it.
        let strategy = FedAvg::new(config)
            .with_initial_parameters(initial)
            .with_evaluate_fn(Box::new(|_, p| {
                Some(Evaluation {
                    loss: 1.0,
                    metrics: [("accuracy".to_string(), f64::from(p.tensors[0].data[0]))].into(),
                })
            }));
        RoundDriver::new(
            self.server.registry.clone(),
            Box::new(strategy),
            DriverConfig {
                num_rounds: rounds,
                round_timeout: timeout,
                wait_for_clients: Duration::from_secs(30),
                primary_metric: None,
                seed: 7,
                ..Default::default()
            },
        )
        .with_store(self.store.clone())
        .with_metrics(self.metrics.clone())
        .run(CancellationToken::new())
        .await
        .expect("run completes")
    }

    pub async fn shutdown(self) {
        self.stop.cancel();
        for p in self.proxies {
            p.join().await;
        }
    }
}

pub fn all_of(n: usize) -> FedAvgConfig {
    FedAvgConfig {
        fraction_fit: 1.0,
        min_fit_clients: n,
        min_available_clients: n,
        ..Default::default()
    }
}

pub fn values(p: &Parameters) -> Vec<f32> {
    p.tensors[0].data.clone()
}
