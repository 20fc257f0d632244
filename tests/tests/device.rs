//! The device path end to end: coordinator --gRPC--> proxy --MQTT (Mosquitto)--> edge agents,
//! weights through the embedded S3 server and presigned URLs.
//!
//! Needs Mosquitto on 127.0.0.1:1883 (`mosquitto -d`); the broker-restart test starts a private
//! `mosquitto` on a free port. Every test uses a fleet name of its own, so tests sharing the
//! broker never see each other's devices.

mod harness;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use harness::{
    Behaviour, Harness, TestClient, all_of, model, mosquitto, test_agent_options, unique, values,
};
use pollen_client::agent::Agent;
use pollen_client::{Client, ClientError, ClientEvaluate, ClientFit, Work};
use pollen_coordinator::records::RoundStatus;
use pollen_coordinator::{DriverConfig, FedAvg, FedAvgConfig, RoundDriver};
use pollen_proto::device::{Command, CommandKind, DeviceStatus, FitReply, Reply, reply};
use pollen_proto::fleet::Codec;
use pollen_proto::limits::MAX_MQTT_PAYLOAD_BYTES;
use pollen_proto::mqtt::{BrokerConfig, mqtt_options};
use pollen_proto::scalar::ScalarMap;
use pollen_proto::{Parameters, topics};
use prost::Message;
use rumqttc::{AsyncClient, Event, EventLoop, Packet, QoS};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fedavg_over_mqtt_and_s3_equals_the_weighted_average() {
    let h = Harness::start(mosquitto()).await;
    let _a = h.agent("dev-a", TestClient(Behaviour::Shift(1.0, 10)));
    let _b = h.agent("dev-b", TestClient(Behaviour::Shift(4.0, 30)));
    let summary = h
        .run(2, all_of(2), Duration::from_secs(20), model([0.0; 4]))
        .await;
    // Round 1: (1*10 + 4*30) / 40 = 3.25; round 2 adds the same again.
    for r in &summary.rounds {
        assert_eq!(
            r.succeeded, 2,
            "round {} failures: {:?}",
            r.round, r.failures
        );
    }
    for v in values(&summary.parameters) {
        assert!((v - 6.5).abs() < 1e-5, "{v}");
    }
    // Update objects are deleted once folded; the global models stay.
    let stats = h.proxy().stats();
    assert!(stats.commands_published >= 4, "{stats:?}");
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_killed_mid_fit_is_cut_off_and_a_restarted_one_rejoins() {
    let h = Harness::start(mosquitto()).await;
    let _a = h.agent("dev-a", TestClient(Behaviour::Shift(1.0, 10)));
    let _b = h.agent("dev-b", TestClient(Behaviour::Shift(1.0, 10)));
    let started = Arc::new(AtomicBool::new(false));
    let (victim, _) = h.agent("dev-c", TestClient(Behaviour::Hang(started.clone())));
    // Kill dev-c's agent once it is training: the process dies, its connection drops.
    let killer = {
        let started = started.clone();
        tokio::spawn(async move {
            while !started.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            victim.abort();
        })
    };
    let config = FedAvgConfig {
        fraction_fit: 1.0,
        min_fit_clients: 2,
        min_available_clients: 3,
        ..Default::default()
    };
    let strategy = FedAvg::new(config).with_initial_parameters(model([0.0; 4]));
    let registry = h.server.registry.clone();
    let store = h.store.clone();
    let restarted = Arc::new(AtomicUsize::new(0));
    let restart_flag = restarted.clone();
    let (fleet, broker, stop) = (h.fleet.clone(), h.broker.clone(), h.stop.clone());
    let mut driver = RoundDriver::new(
        registry,
        Box::new(strategy),
        DriverConfig {
            num_rounds: 2,
            round_timeout: Duration::from_secs(4),
            wait_for_clients: Duration::from_secs(30),
            primary_metric: None,
            seed: 7,
            ..Default::default()
        },
    )
    .with_store(store);
    // After round 1, dev-c comes back (a restarted agent, same device id, healthy now).
    driver = driver.on_round(move |r| {
        if r.round == 1 {
            restart_flag.store(1, Ordering::SeqCst);
            let agent = Agent::new(
                test_agent_options("dev-c", &fleet, &broker),
                TestClient(Behaviour::Shift(1.0, 10)),
            )
            .expect("valid agent options");
            let t = stop.child_token();
            tokio::spawn(async move {
                let _ = agent.run(t).await;
            });
        }
    });
    let summary = driver.run(CancellationToken::new()).await.expect("run");
    killer.await.expect("killer task");
    assert_eq!(restarted.load(Ordering::SeqCst), 1);

    let r1 = &summary.rounds[0];
    assert_eq!(r1.succeeded, 2, "{:?}", r1.failures);
    assert_eq!(r1.failed, 1);
    assert_eq!(r1.failures[0].client, "dev-c");
    assert!(
        matches!(
            r1.failures[0].reason.as_str(),
            "timeout" | "client_error" | "disconnected"
        ),
        "{:?}",
        r1.failures
    );
    let r2 = &summary.rounds[1];
    assert!(
        r2.participants.iter().any(|p| p == "dev-c"),
        "restarted dev-c did not serve round 2: {r2:?}"
    );
    assert_eq!(r2.succeeded, 3, "{:?}", r2.failures);
    h.shutdown().await;
}

/// A device played by the test itself, answering commands the way it is told to.
struct RawDevice {
    client: AsyncClient,
    task: JoinHandle<()>,
}

#[derive(Clone, Copy)]
enum Raw {
    /// Uploads the global weights back unchanged but reports a wrong digest.
    WrongDigest,
    /// Answers correctly, twice (a duplicate reply).
    Twice,
    /// Answers correctly, but only after the command's deadline.
    AfterDeadline,
}

async fn raw_device(h: &Harness, id: &str, how: Raw) -> RawDevice {
    let mut options = mqtt_options(&h.broker, &format!("raw-{}-{id}", h.fleet)).expect("options");
    options.set_keep_alive(Duration::from_secs(5));
    let (client, mut events): (AsyncClient, EventLoop) = AsyncClient::new(options, 64);
    let (fleet, device) = (h.fleet.clone(), id.to_string());
    let publisher = client.clone();
    let task = tokio::spawn(async move {
        let http = reqwest::Client::new();
        loop {
            let event = match events.poll().await {
                Ok(e) => e,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            match event {
                Event::Incoming(Packet::ConnAck(_)) => {
                    let _ = publisher
                        .subscribe(topics::command(&fleet, &device), QoS::AtLeastOnce)
                        .await;
                    let status = DeviceStatus {
                        device_id: device.clone(),
                        online: true,
                        num_examples: 10,
                        ..Default::default()
                    };
                    let _ = publisher
                        .publish(
                            topics::status(&fleet, &device),
                            QoS::AtLeastOnce,
                            true,
                            status.encode_to_vec(),
                        )
                        .await;
                }
                Event::Incoming(Packet::Publish(p)) => {
                    let Ok(cmd) = Command::decode(p.payload.as_ref()) else {
                        continue;
                    };
                    if cmd.kind != CommandKind::Fit as i32 {
                        continue;
                    }
                    let (publisher, http, fleet, device) = (
                        publisher.clone(),
                        http.clone(),
                        fleet.clone(),
                        device.clone(),
                    );
                    tokio::spawn(async move {
                        let global = cmd.global_weights.clone().unwrap_or_default();
                        let Ok(bytes) = http.get(&global.url).send().await else {
                            return;
                        };
                        let Ok(bytes) = bytes.bytes().await else {
                            return;
                        };
                        let put = http.put(&cmd.upload_url).body(bytes.clone()).send().await;
                        assert!(put.is_ok_and(|r| r.status().is_success()));
                        let sha256 = match how {
                            Raw::WrongDigest => "0".repeat(64),
                            _ => global.sha256.clone(),
                        };
                        let reply = Reply {
                            request_id: cmd.request_id.clone(),
                            device_id: device.clone(),
                            round: cmd.round,
                            body: Some(reply::Body::Fit(FitReply {
                                sha256,
                                size_bytes: bytes.len() as u64,
                                codec: Codec::SafetensorsF32 as i32,
                                num_examples: 10,
                                metrics: Default::default(),
                            })),
                        }
                        .encode_to_vec();
                        if let Raw::AfterDeadline = how {
                            let now = std::time::SystemTime::now()
                                .duration_since(std::time::UNIX_EPOCH)
                                .expect("clock")
                                .as_millis() as u64;
                            let wait = cmd.deadline_unix_ms.saturating_sub(now) + 1500;
                            tokio::time::sleep(Duration::from_millis(wait)).await;
                        }
                        let times = if let Raw::Twice = how { 2 } else { 1 };
                        for _ in 0..times {
                            let _ = publisher
                                .publish(
                                    topics::reply(&fleet, &device),
                                    QoS::AtLeastOnce,
                                    false,
                                    reply.clone(),
                                )
                                .await;
                        }
                    });
                }
                _ => {}
            }
        }
    });
    RawDevice { client, task }
}

impl Drop for RawDevice {
    fn drop(&mut self) {
        self.task.abort();
        let _ = self.client.try_disconnect();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_with_a_wrong_digest_is_rejected_and_the_model_stays_clean() {
    let h = Harness::start(mosquitto()).await;
    let _a = h.agent("dev-a", TestClient(Behaviour::Shift(2.0, 10)));
    let _b = h.agent("dev-b", TestClient(Behaviour::Shift(2.0, 10)));
    let _liar = raw_device(&h, "dev-liar", Raw::WrongDigest).await;
    let summary = h
        .run(
            1,
            FedAvgConfig {
                fraction_fit: 1.0,
                min_fit_clients: 2,
                min_available_clients: 3,
                ..Default::default()
            },
            Duration::from_secs(20),
            model([0.0; 4]),
        )
        .await;
    let r = &summary.rounds[0];
    assert_eq!(r.succeeded, 2, "{:?}", r.failures);
    assert_eq!(r.rejected_updates, 1);
    let f = &r.failures[0];
    assert_eq!(
        (f.client.as_str(), f.reason.as_str()),
        ("dev-liar", "rejected")
    );
    assert!(f.message.contains("digest mismatch"), "{}", f.message);
    // Only the honest updates count: the model moved by exactly 2.
    assert_eq!(values(&summary.parameters), vec![2.0; 4]);
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_and_late_replies_are_dropped_and_counted() {
    let h = Harness::start(mosquitto()).await;
    let _a = h.agent("dev-a", TestClient(Behaviour::Shift(1.0, 10)));
    let _twice = raw_device(&h, "dev-twice", Raw::Twice).await;
    let _late = raw_device(&h, "dev-late", Raw::AfterDeadline).await;
    let config = FedAvgConfig {
        fraction_fit: 1.0,
        min_fit_clients: 2,
        min_available_clients: 3,
        ..Default::default()
    };
    let summary = h
        .run(2, config, Duration::from_secs(3), model([0.0; 4]))
        .await;
    // The late device misses round 1's deadline; its reply arrives while round 2 runs (or
    // after), for a request that is closed.
    let r1 = &summary.rounds[0];
    assert_eq!(r1.succeeded, 2, "{:?}", r1.failures);
    assert_eq!(r1.failures[0].client, "dev-late");
    tokio::time::sleep(Duration::from_secs(2)).await;
    // The same story on the coordinator's Prometheus endpoint.
    let response = reqwest::get(format!("{}/metrics", h.http))
        .await
        .expect("GET /metrics");
    assert_eq!(
        response.headers()["content-type"],
        pollen_proto::prometheus::CONTENT_TYPE
    );
    let text = response.text().await.expect("body");
    assert!(text.ends_with("# EOF\n"), "{text}");
    for line in [
        "pollen_rounds_total{status=\"ok\"} 2",
        "pollen_client_results_total{result=\"success\"} 4",
        "pollen_client_results_total{result=\"failure\"} 2",
        "pollen_client_failures_total{reason=\"timeout\"} 2",
        "pollen_round_duration_seconds_count 2",
        "pollen_accuracy 1.0",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }
    assert!(
        text.lines()
            .any(|l| l.starts_with("pollen_received_bytes_total ") && !l.ends_with(" 0")),
        "{text}"
    );
    assert!(text.contains("# TYPE pollen_clients_connected gauge"));
    let stats = h.proxy().stats();
    assert!(stats.replies_duplicate >= 1, "{stats:?}");
    assert!(stats.replies_late >= 1, "{stats:?}");
    // dev-a moves by 1 per round, dev-twice echoes the global: the average of each round is
    // global + 0.5, whatever the duplicates did.
    assert_eq!(values(&summary.parameters), vec![1.0; 4]);
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_reply_and_status_topics_is_counted_and_rounds_go_on() {
    let h = Harness::start(mosquitto()).await;
    let _a = h.agent("dev-a", TestClient(Behaviour::Shift(1.0, 10)));
    let _b = h.agent("dev-b", TestClient(Behaviour::Shift(1.0, 10)));
    let mut options = mqtt_options(&h.broker, &unique("vandal")).expect("options");
    options.set_clean_session(true);
    let (vandal, mut events) = AsyncClient::new(options, 16);
    let pump = tokio::spawn(async move { while events.poll().await.is_ok() {} });
    // Once both bridges are up, the proxy is subscribed and sees what follows.
    assert!(h.proxy().wait_for_bridges(2, Duration::from_secs(20)).await);
    for (topic, payload) in [
        (
            topics::reply(&h.fleet, "dev-a"),
            vec![0xff, 0x00, 0x13, 0x37],
        ),
        (topics::status(&h.fleet, "dev-x"), b"{not protobuf".to_vec()),
        (topics::reply(&h.fleet, "nobody"), vec![0x0a; 300]),
    ] {
        vandal
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .expect("queued");
    }
    let summary = h
        .run(2, all_of(2), Duration::from_secs(20), model([0.0; 4]))
        .await;
    assert!(summary.rounds.iter().all(|r| r.succeeded == 2));
    let stats = h.proxy().stats();
    assert!(stats.replies_malformed >= 1, "{stats:?}");
    assert!(stats.status_malformed >= 1, "{stats:?}");
    let _ = vandal.disconnect().await;
    pump.abort();
    h.shutdown().await;
}

/// Every payload on the fleet's topics, as an observer subscribed to `pollen/<fleet>/#` sees
/// them.
/// (topic, payload) pairs an observer saw.
type Seen = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

async fn observe(broker: &BrokerConfig, fleet: &str) -> (Seen, JoinHandle<()>) {
    let mut options = mqtt_options(broker, &unique("observer")).expect("options");
    options.set_clean_session(true);
    let (client, mut events) = AsyncClient::new(options, 16);
    client
        .subscribe(format!("pollen/{fleet}/#"), QoS::AtLeastOnce)
        .await
        .expect("queued");
    let seen: Seen = Arc::default();
    let s = seen.clone();
    let task = tokio::spawn(async move {
        let _client = client;
        while let Ok(event) = events.poll().await {
            if let Event::Incoming(Packet::Publish(p)) = event {
                s.lock()
                    .expect("lock")
                    .push((p.topic.clone(), p.payload.to_vec()));
            }
        }
    });
    (seen, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_payloads_stay_small_and_carry_no_storage_secret_for_a_cnn_sized_model() {
    let h = Harness::start(mosquitto()).await;
    let (seen, observer) = observe(&h.broker, &h.fleet).await;
    let _a = h.agent("dev-a", TestClient(Behaviour::Shift(0.5, 10)));
    let _b = h.agent("dev-b", TestClient(Behaviour::Shift(0.5, 10)));
    let io = pollen_train::model::ModelIo {
        kind: pollen_train::TaskKind::Classification,
        input: vec![1, 28, 28],
        outputs: 10,
    };
    let preset = pollen_train::ModelSpec::preset("mnist-cnn").expect("preset");
    let cnn = pollen_train::model::initial_parameters(&preset, &io, 1).expect("cnn init");
    assert_eq!(cnn.num_params(), 1_663_370);
    let summary = h.run(1, all_of(2), Duration::from_secs(60), cnn).await;
    assert_eq!(
        summary.rounds[0].succeeded, 2,
        "{:?}",
        summary.rounds[0].failures
    );
    observer.abort();
    let seen = seen.lock().expect("lock").clone();
    let commands: Vec<Command> = seen
        .iter()
        .filter(|(t, _)| t.ends_with("/cmd"))
        .filter_map(|(_, p)| Command::decode(p.as_slice()).ok())
        .collect();
    assert!(commands.len() >= 2, "observer saw {} messages", seen.len());
    let largest = seen.iter().map(|(_, p)| p.len()).max().unwrap_or(0);
    assert!(
        largest < MAX_MQTT_PAYLOAD_BYTES,
        "largest MQTT payload is {largest} bytes"
    );
    for (topic, payload) in seen.iter() {
        let text = String::from_utf8_lossy(payload);
        assert!(
            !text.contains(&h.s3_secret),
            "the S3 secret key went out on {topic}"
        );
    }
    for c in &commands {
        let get = &c.global_weights.as_ref().expect("fit has weights").url;
        // Presigned: signed, short-lived, and scoped to one object.
        assert!(
            get.contains("X-Amz-Signature=") && get.contains("X-Amz-Expires="),
            "{get}"
        );
        assert!(get.contains("global.safetensors"), "{get}");
        assert!(c.upload_url.contains("/updates/") && c.upload_url.contains("X-Amz-Signature="));
    }
    // A presigned URL opens its own object only: the same signature on another key is refused.
    let http = reqwest::Client::new();
    let get = &commands[0].global_weights.as_ref().expect("weights").url;
    let ok = http.get(get).send().await.expect("GET");
    assert!(ok.status().is_success(), "{}", ok.status());
    let forged = get.replace("global.safetensors", "other.safetensors");
    let refused = http.get(&forged).send().await.expect("GET");
    assert_eq!(
        refused.status().as_u16(),
        403,
        "a forged key must be refused"
    );
    h.shutdown().await;
}

/// A private Mosquitto on a free port, so the test can kill and restart it.
struct PrivateBroker {
    port: u16,
    child: std::process::Child,
}

impl PrivateBroker {
    fn start_on(port: u16) -> Self {
        let child = std::process::Command::new("mosquitto")
            .args(["-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("the mosquitto binary is installed (apt install mosquitto)");
        // From here on Drop kills and reaps it, whatever happens.
        let broker = Self { port, child };
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        for _ in 0..100 {
            if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
                return broker;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("private mosquitto did not listen on {addr}");
    }

    fn start() -> Self {
        let port = std::net::TcpListener::bind(("127.0.0.1", 0))
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        Self::start_on(port)
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        self.kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_mid_round_does_not_lose_the_run() {
    mosquitto();
    let mut broker = PrivateBroker::start();
    let config = BrokerConfig::new(format!("mqtt://127.0.0.1:{}", broker.port));
    let h = Harness::start(config).await;
    let started = Arc::new(AtomicBool::new(false));
    let _a = h.agent("dev-a", TestClient(Behaviour::Shift(1.0, 10)));
    let _b = h.agent("dev-b", TestClient(Behaviour::Shift(1.0, 10)));
    // dev-c takes its time in round 1, so the broker dies while work is outstanding.
    struct Slow(Arc<AtomicBool>);
    impl Client for Slow {
        fn num_examples(&self) -> u64 {
            10
        }
        fn get_parameters(&mut self, _: &Work<'_>) -> Result<Parameters, ClientError> {
            Ok(model([0.0; 4]))
        }
        fn fit(&mut self, _: &Work<'_>, g: Parameters) -> Result<ClientFit, ClientError> {
            self.0.store(true, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(1500));
            let mut p = g;
            p.tensors[0].data.iter_mut().for_each(|x| *x += 1.0);
            Ok(ClientFit {
                parameters: p,
                num_examples: 10,
                metrics: ScalarMap::new(),
            })
        }
        fn evaluate(
            &mut self,
            _work: &Work<'_>,
            _: Parameters,
        ) -> Result<ClientEvaluate, ClientError> {
            Err(ClientError::training("not used"))
        }
    }
    let token = h.stop.child_token();
    let slow = Agent::new(
        test_agent_options("dev-c", &h.fleet, &h.broker),
        Slow(started.clone()),
    )
    .expect("agent");
    tokio::spawn(async move {
        let _ = slow.run(token).await;
    });
    let port = broker.port;
    let restarter = tokio::spawn(async move {
        while !started.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        broker.kill();
        tokio::time::sleep(Duration::from_millis(800)).await;
        PrivateBroker::start_on(port)
    });
    let config = FedAvgConfig {
        fraction_fit: 1.0,
        min_fit_clients: 1,
        min_available_clients: 3,
        ..Default::default()
    };
    let summary = h
        .run(3, config, Duration::from_secs(8), model([0.0; 4]))
        .await;
    let _restarted = restarter.await.expect("restarted broker");
    // Round 1 completes with whoever made it or fails cleanly; later rounds run normally.
    assert_eq!(summary.rounds.len(), 3);
    let last = summary.rounds.last().expect("rounds");
    assert!(matches!(last.status, RoundStatus::Ok), "{last:?}");
    assert!(last.succeeded >= 2, "{last:?}");
    h.shutdown().await;
}

/// A CA, a broker certificate for 127.0.0.1 and a device certificate, all signed by the CA
/// (made by pollen-trust, as `pollen fleet provision` makes them).
fn test_pki(dir: &std::path::Path) {
    use pollen_trust::pki::{FleetCa, IdentityFiles, Usage};
    let ca = FleetCa::create("tls").expect("CA");
    std::fs::write(dir.join("ca.pem"), &ca.cert_pem).expect("write");
    let server = ca
        .issue("pollen-broker", &["127.0.0.1".to_string()], Usage::Server)
        .expect("server certificate");
    IdentityFiles::new(dir, "server")
        .write(&server)
        .expect("write");
    let device = ca
        .issue("dev-tls", &[], Usage::Client)
        .expect("device certificate");
    IdentityFiles::new(dir, "device")
        .write(&device)
        .expect("write");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_authenticates_to_an_mqtts_broker_with_its_x509_certificate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    test_pki(d);
    let port = std::net::TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    // Mutual TLS, as AWS IoT Core does it: no certificate, no connection.
    std::fs::write(
        d.join("mosquitto.conf"),
        format!(
            "user root\nlistener {port} 127.0.0.1\ncafile {0}/ca.pem\ncertfile {0}/server.pem\nkeyfile {0}/server.key\nrequire_certificate true\nallow_anonymous true\n",
            d.display()
        ),
    )
    .expect("write");
    let mut child = std::process::Command::new("mosquitto")
        .arg("-c")
        .arg(d.join("mosquitto.conf"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("the mosquitto binary is installed (apt install mosquitto)");
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut listening = false;
    for _ in 0..100 {
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
            listening = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(listening, "mosquitto with TLS did not listen on {addr}");

    let mut broker = BrokerConfig::new(format!("mqtts://127.0.0.1:{port}"));
    broker.ca_file = Some(d.join("ca.pem"));
    broker.cert_file = Some(d.join("device.pem"));
    broker.key_file = Some(d.join("device.key"));
    let fleet = unique("tls");
    let token = CancellationToken::new();
    let agent = Agent::new(
        test_agent_options("dev-tls", &fleet, &broker),
        TestClient(Behaviour::Shift(1.0, 10)),
    )
    .expect("agent options");
    let t = token.clone();
    let task = tokio::spawn(async move { agent.run(t).await });
    // Discovery over the same TLS broker (with the same client certificate) sees it online.
    let mut seen = Vec::new();
    for _ in 0..20 {
        seen = pollen_proxy::discover(&broker, &fleet, Duration::from_millis(500))
            .await
            .expect("discover over mqtts");
        if seen.iter().any(|d| d.device_id == "dev-tls" && d.online) {
            break;
        }
    }
    assert!(
        seen.iter()
            .any(|d| d.device_id == "dev-tls" && d.online && d.num_examples == 10),
        "{seen:?}"
    );
    // Without a client certificate the broker refuses the connection.
    let mut anonymous = broker.clone();
    anonymous.cert_file = None;
    anonymous.key_file = None;
    assert!(
        pollen_proxy::discover(&anonymous, &fleet, Duration::from_millis(500))
            .await
            .is_err(),
        "a client without a certificate must not get in"
    );
    token.cancel();
    let _ = task.await;
    let _ = child.kill();
    let _ = child.wait();
}
