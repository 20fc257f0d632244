//! Trust on a shared broker: a fleet provisioned by `pollen fleet provision` (pollen-trust),
//! a private Mosquitto started with the generated configuration, and a device with a valid
//! certificate of its own trying to impersonate another.
//!
//! Needs the `mosquitto` binary (apt install mosquitto); the private broker listens on free
//! ports. Also needs Mosquitto on 127.0.0.1:1883 for the over-claim test.

mod harness;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use harness::{
    Behaviour, Harness, TestClient, all_of, model, mosquitto, test_agent_options, unique, values,
};
use pollen_client::agent::Agent;
use pollen_client::{Client, ClientOptions, fleet::FleetClientError};
use pollen_proto::device::{Command, CommandKind, DeviceStatus, FitReply, Reply, reply};
use pollen_proto::grpc_tls::{ClientTls, ServerTls};
use pollen_proto::mqtt::BrokerConfig;
use pollen_proto::{Parameters, topics};
use prost::Message;
use rumqttc::{AsyncClient, Event, EventLoop, Packet, QoS, SubscribeReasonCode};
use tokio_util::sync::CancellationToken;

fn free_port() -> u16 {
    std::net::TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// A fleet provisioned into a temporary directory, and Mosquitto running its configuration.
struct TrustedFleet {
    fleet: String,
    dir: tempfile::TempDir,
    port: u16,
    password_port: u16,
    child: std::process::Child,
}

impl TrustedFleet {
    /// `conf` is one of the generated broker configurations: `mosquitto.conf` (ACL file) or
    /// `mosquitto-dynsec.conf` (dynamic-security plugin).
    fn start(conf: &str, devices: &[&str], proxies: &[&str]) -> Self {
        let fleet = unique("trust");
        let dir = tempfile::tempdir().expect("tempdir");
        let (port, password_port) = (free_port(), free_port());
        pollen_trust::Provision {
            fleet: fleet.clone(),
            dir: dir.path().to_path_buf(),
            devices: devices.iter().map(|d| d.to_string()).collect(),
            proxies: proxies.iter().map(|p| p.to_string()).collect(),
            operators: vec!["admin".into()],
            broker_names: vec!["127.0.0.1".into()],
            coordinator_names: vec!["127.0.0.1".into()],
            listen_host: "127.0.0.1".into(),
            listen_port: port,
            password_port: Some(password_port),
            aws_region: "*".into(),
            aws_account: "*".into(),
            dynsec_plugin: pollen_trust::dynsec::DEBIAN_PLUGIN.into(),
        }
        .run()
        .expect("provision");
        // The generated configuration as is; only `user root` is added because the test runs
        // as root and Mosquitto would otherwise switch to a user that cannot read the keys.
        let conf = std::fs::read_to_string(dir.path().join(conf)).expect("conf");
        let test_conf = dir.path().join("test-mosquitto.conf");
        std::fs::write(&test_conf, format!("user root\n{conf}")).expect("write conf");
        let child = std::process::Command::new("mosquitto")
            .arg("-c")
            .arg(&test_conf)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("the mosquitto binary is installed (apt install mosquitto)");
        let fleet = Self {
            fleet,
            dir,
            port,
            password_port,
            child,
        };
        for p in [port, password_port] {
            let addr = SocketAddr::from(([127, 0, 0, 1], p));
            let up = (0..100).any(|_| {
                let ok =
                    std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok();
                if !ok {
                    std::thread::sleep(Duration::from_millis(50));
                }
                ok
            });
            assert!(
                up,
                "mosquitto with the generated configuration did not listen on {addr}"
            );
        }
        fleet
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// The broker as the identity whose files are `<kind>/<name>.pem|.key`.
    fn identity(&self, kind: &str, name: &str) -> BrokerConfig {
        let mut b = BrokerConfig::new(format!("mqtts://127.0.0.1:{}", self.port));
        b.ca_file = Some(self.path("ca.pem"));
        b.cert_file = Some(self.path(&format!("{kind}/{name}.pem")));
        b.key_file = Some(self.path(&format!("{kind}/{name}.key")));
        b
    }

    /// The coordinator's side of mutual TLS on the Fleet link.
    fn coordinator_tls(&self) -> ServerTls {
        ServerTls {
            cert_file: self.path("coordinator.pem"),
            key_file: self.path("coordinator.key"),
            client_ca_file: Some(self.path("ca.pem")),
        }
    }

    /// What `<kind>/<name>` presents to the coordinator.
    fn grpc_identity(&self, kind: &str, name: &str) -> ClientTls {
        ClientTls {
            ca_file: Some(self.path("ca.pem")),
            cert_file: Some(self.path(&format!("{kind}/{name}.pem"))),
            key_file: Some(self.path(&format!("{kind}/{name}.key"))),
        }
    }

    /// The password listener, logging in as `user` with `password`.
    fn login(&self, user: &str, password: &str) -> BrokerConfig {
        let mut b = BrokerConfig::new(format!(
            "mqtts://{user}:{password}@127.0.0.1:{}",
            self.password_port
        ));
        b.ca_file = Some(self.path("ca.pem"));
        b
    }

    fn agent(&self, id: &str, client: impl Client + 'static, stop: &CancellationToken) {
        let mut options = test_agent_options(id, &self.fleet, &self.identity("devices", id));
        options.object_store_ca = Some(self.path("ca.pem"));
        let agent = Agent::new(options, client).expect("agent options");
        let t = stop.child_token();
        tokio::spawn(async move {
            let _ = agent.run(t).await;
        });
    }
}

impl Drop for TrustedFleet {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A raw MQTT client as `broker`'s identity, its event loop driven in the background; every
/// SUBACK's return codes and every message received are recorded.
struct RawClient {
    client: AsyncClient,
    subacks: Arc<Mutex<Vec<Vec<SubscribeReasonCode>>>>,
    received: Arc<Mutex<Vec<(String, Bytes)>>>,
}

impl RawClient {
    async fn connect(broker: &BrokerConfig, client_id: &str) -> Self {
        let options = pollen_proto::mqtt::mqtt_options(broker, client_id).expect("options");
        let (client, eventloop) = AsyncClient::new(options, 64);
        let subacks = Arc::new(Mutex::new(Vec::new()));
        let received = Arc::new(Mutex::new(Vec::new()));
        let connected = Arc::new(tokio::sync::Notify::new());
        tokio::spawn(drive(
            eventloop,
            subacks.clone(),
            received.clone(),
            connected.clone(),
        ));
        tokio::time::timeout(Duration::from_secs(10), connected.notified())
            .await
            .unwrap_or_else(|_| panic!("{client_id} could not connect to {broker:?}"));
        Self {
            client,
            subacks,
            received,
        }
    }

    /// Subscribes and returns the broker's answer.
    async fn subscribe(&self, filter: &str) -> SubscribeReasonCode {
        let before = self.subacks.lock().expect("lock").len();
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .expect("queue subscribe");
        for _ in 0..200 {
            if let Some(codes) = self.subacks.lock().expect("lock").get(before) {
                return codes[0];
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("no SUBACK for {filter}");
    }

    async fn publish(&self, topic: &str, retain: bool, payload: Vec<u8>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, retain, payload)
            .await
            .expect("queue publish");
    }

    fn received_on(&self, topic: &str) -> Vec<Bytes> {
        self.received
            .lock()
            .expect("lock")
            .iter()
            .filter(|(t, _)| t == topic)
            .map(|(_, p)| p.clone())
            .collect()
    }
}

async fn drive(
    mut eventloop: EventLoop,
    subacks: Arc<Mutex<Vec<Vec<SubscribeReasonCode>>>>,
    received: Arc<Mutex<Vec<(String, Bytes)>>>,
    connected: Arc<tokio::sync::Notify>,
) {
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => connected.notify_one(),
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                subacks.lock().expect("lock").push(ack.return_codes)
            }
            Ok(Event::Incoming(Packet::Publish(p))) => received
                .lock()
                .expect("lock")
                .push((p.topic.clone(), p.payload)),
            Ok(_) => {}
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

const CLAIMED: u64 = 10_000_000;

/// What the impersonator publishes: a fit reply in `victim`'s name claiming ten million
/// examples for the global model times -5 (it cannot know the request id; a forged reply
/// that guessed it would be no different to the broker).
fn forged_reply(victim: &str, round: u64) -> Vec<u8> {
    Reply {
        request_id: format!("forged-{round}"),
        device_id: victim.into(),
        round,
        body: Some(reply::Body::Fit(FitReply {
            sha256: "0".repeat(64),
            size_bytes: 64,
            num_examples: CLAIMED,
            ..Default::default()
        })),
    }
    .encode_to_vec()
}

fn forged_status(device: &str, online: bool) -> Vec<u8> {
    DeviceStatus {
        device_id: device.into(),
        online,
        num_examples: CLAIMED,
        model: "test-4".into(),
        ..Default::default()
    }
    .encode_to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_with_its_own_certificate_cannot_impersonate_another_over_mutual_tls() {
    mosquitto();
    let t = TrustedFleet::start(
        "mosquitto-dynsec.conf",
        &["dev-a", "dev-b", "dev-c", "evil"],
        &["proxy-0", "spy"],
    );
    let fleet = t.fleet.clone();

    // A client without a certificate does not get in at all.
    let mut anonymous = t.identity("devices", "dev-a");
    (anonymous.cert_file, anonymous.key_file) = (None, None);
    assert!(
        pollen_proxy::discover(&anonymous, &fleet, Duration::from_millis(500))
            .await
            .is_err(),
        "a client without a certificate must be refused"
    );

    // The impersonator: a provisioned device with a valid certificate of its own. It tries to
    // listen to everything; the broker refuses every subscription but its own command topic
    // (and what it could not subscribe to never reaches it: asserted at the end).
    let evil = RawClient::connect(&t.identity("devices", "evil"), "pollen-agent-evil").await;
    for filter in [
        topics::command(&fleet, "dev-b"),
        format!("pollen/{fleet}/+/cmd"),
        topics::all_replies(&fleet),
        format!("pollen/{fleet}/#"),
        "#".to_string(),
    ] {
        assert_eq!(
            evil.subscribe(&filter).await,
            SubscribeReasonCode::Failure,
            "evil's subscription to {filter} must be refused"
        );
    }
    assert!(matches!(
        evil.subscribe(&topics::command(&fleet, "evil")).await,
        SubscribeReasonCode::Success(_)
    ));

    // A listener with the proxy's rights sees what the proxy would.
    let spy = RawClient::connect(&t.identity("proxies", "spy"), "pollen-proxy-spy").await;
    for filter in [topics::all_replies(&fleet), topics::all_status(&fleet)] {
        assert!(matches!(
            spy.subscribe(&filter).await,
            SubscribeReasonCode::Success(_)
        ));
    }
    // Positive control: what a proxy sends evil reaches it; what it sends dev-b does not.
    for device in ["evil", "dev-b"] {
        let probe = Command {
            request_id: format!("probe-{device}"),
            kind: CommandKind::Cancel as i32,
            ..Default::default()
        };
        spy.publish(
            &topics::command(&fleet, device),
            false,
            probe.encode_to_vec(),
        )
        .await;
    }

    // TLS on every link: the Fleet link too, where the proxy presents its certificate.
    let h = Harness::start_secure(
        t.identity("proxies", "proxy-0"),
        &fleet,
        t.coordinator_tls(),
        t.grpc_identity("proxies", "proxy-0"),
    )
    .await;
    let stop = CancellationToken::new();
    for id in ["dev-a", "dev-b", "dev-c"] {
        t.agent(id, TestClient(Behaviour::Shift(1.0, 10)), &stop);
    }

    // While the run goes on, evil forges everything the original attack forged.
    let attacking = CancellationToken::new();
    let attack = {
        let fleet = fleet.clone();
        let attacking = attacking.clone();
        tokio::spawn(async move {
            let mut round = 1;
            while !attacking.is_cancelled() {
                evil.publish(
                    &topics::reply(&fleet, "dev-b"),
                    false,
                    forged_reply("dev-b", round),
                )
                .await;
                // In its own name but with dev-b's id in the payload: reaches the proxy, which
                // drops it.
                evil.publish(
                    &topics::reply(&fleet, "evil"),
                    false,
                    forged_reply("dev-b", round),
                )
                .await;
                evil.publish(
                    &topics::status(&fleet, "dev-b"),
                    true,
                    forged_status("dev-b", false),
                )
                .await;
                evil.publish(
                    &topics::status(&fleet, "ghost"),
                    true,
                    forged_status("ghost", true),
                )
                .await;
                let command = Command {
                    request_id: "forged-command".into(),
                    kind: CommandKind::GetParameters as i32,
                    ..Default::default()
                };
                evil.publish(
                    &topics::command(&fleet, "dev-a"),
                    false,
                    command.encode_to_vec(),
                )
                .await;
                round = round % 3 + 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            evil
        })
    };

    let summary = h
        .run(3, all_of(3), Duration::from_secs(20), model([0.0; 4]))
        .await;
    attacking.cancel();
    let evil = attack.await.expect("attack task");
    // evil heard its own command topic and nothing else: no command of another device, no
    // reply, no status.
    let heard: Vec<String> = evil
        .received
        .lock()
        .expect("lock")
        .iter()
        .map(|(topic, _)| topic.clone())
        .collect();
    assert!(
        heard.contains(&topics::command(&fleet, "evil")),
        "the control command to evil was delivered: {heard:?}"
    );
    assert!(
        heard
            .iter()
            .all(|topic| *topic == topics::command(&fleet, "evil")),
        "evil received messages of other devices: {heard:?}"
    );

    // The global model is exactly the honest devices' (each adds 1 per round).
    assert_eq!(summary.rounds.len(), 3);
    for r in &summary.rounds {
        assert_eq!(r.succeeded, 3, "round {}: {:?}", r.round, r.failures);
        assert!(r.rejections.is_empty(), "{:?}", r.rejections);
    }
    assert_close(&summary.parameters, 3.0);

    // The weights went over HTTPS under the fleet CA: a client that does not trust that CA
    // gets no connection, one that does gets the S3 server's answer.
    assert!(h.s3_endpoint.starts_with("https://"), "{}", h.s3_endpoint);
    let refused = pollen_client::transfer::http_client(None)
        .expect("client")
        .get(&h.s3_endpoint)
        .send()
        .await
        .expect_err("the fleet CA is not a public root");
    assert!(
        error_chain(&refused).contains("UnknownIssuer"),
        "{}",
        error_chain(&refused)
    );
    let ca = std::fs::read(t.path("ca.pem")).expect("ca");
    let answered = pollen_client::transfer::http_client(Some(&ca))
        .expect("client")
        .get(&h.s3_endpoint)
        .send()
        .await
        .expect("TLS with the fleet CA");
    assert_eq!(
        answered.status(),
        reqwest::StatusCode::FORBIDDEN,
        "an unsigned request is refused by S3, over TLS"
    );

    // Nothing evil published on another device's topics reached a proxy's subscription.
    let claims = |payloads: Vec<Bytes>| {
        payloads
            .iter()
            .filter(|p| {
                Reply::decode(p.as_ref()).is_ok_and(|r| {
                    matches!(r.body, Some(reply::Body::Fit(ref f)) if f.num_examples == CLAIMED)
                })
            })
            .count()
    };
    let dev_b_replies = spy.received_on(&topics::reply(&fleet, "dev-b"));
    assert!(
        dev_b_replies.len() >= 3,
        "dev-b's own replies arrive: {}",
        dev_b_replies.len()
    );
    assert_eq!(
        claims(dev_b_replies),
        0,
        "a forged reply on dev-b's topic got through"
    );
    assert!(
        claims(spy.received_on(&topics::reply(&fleet, "evil"))) > 0,
        "evil may publish on its own reply topic"
    );
    assert!(spy.received_on(&topics::status(&fleet, "ghost")).is_empty());
    for status in spy.received_on(&topics::status(&fleet, "dev-b")) {
        let s = DeviceStatus::decode(status.as_ref()).expect("status");
        assert_ne!(
            s.num_examples, CLAIMED,
            "a forged status of dev-b got through"
        );
    }
    // dev-a never ran the forged command: it would have answered it.
    for reply in spy.received_on(&topics::reply(&fleet, "dev-a")) {
        let r = Reply::decode(reply.as_ref()).expect("reply");
        assert_ne!(r.request_id, "forged-command");
    }
    let stats = h.proxy().stats();
    assert!(
        stats.replies_malformed > 0,
        "the proxy drops a payload naming another device than its topic: {stats:?}"
    );
    assert_eq!(stats.subscriptions_refused, 0, "{stats:?}");
    stop.cancel();
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_logins_get_the_same_acl_and_wrong_passwords_are_refused() {
    password_logins("mosquitto.conf").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_logins_get_the_same_rules_from_the_dynamic_security_plugin() {
    password_logins("mosquitto-dynsec.conf").await;
}

async fn password_logins(conf: &str) {
    let t = TrustedFleet::start(conf, &["dev-a", "dev-b"], &["proxy-0"]);
    let password = std::fs::read_to_string(t.path("devices/dev-a.password")).expect("password");
    let dev_a = RawClient::connect(&t.login("dev-a", password.trim()), "pollen-agent-pw").await;
    assert!(matches!(
        dev_a.subscribe(&topics::command(&t.fleet, "dev-a")).await,
        SubscribeReasonCode::Success(_)
    ));
    // The plugin refuses the subscription; the ACL file grants it and delivers nothing.
    let refuses = conf == "mosquitto-dynsec.conf";
    let code = dev_a.subscribe(&topics::command(&t.fleet, "dev-b")).await;
    assert_eq!(code == SubscribeReasonCode::Failure, refuses, "{code:?}");
    // The proxy (by password too) commands both devices; dev-a hears only its own.
    let proxy_password =
        std::fs::read_to_string(t.path("proxies/proxy-0.password")).expect("password");
    let proxy = RawClient::connect(
        &t.login("pollen-proxy.proxy-0", proxy_password.trim()),
        "pollen-proxy-pw",
    )
    .await;
    for device in ["dev-a", "dev-b"] {
        proxy
            .publish(&topics::command(&t.fleet, device), false, b"probe".to_vec())
            .await;
    }
    let mut heard = Vec::new();
    for _ in 0..50 {
        heard = dev_a.received_on(&topics::command(&t.fleet, "dev-a"));
        if !heard.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(heard.len(), 1, "dev-a's own command arrives");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        dev_a
            .received_on(&topics::command(&t.fleet, "dev-b"))
            .is_empty(),
        "dev-b's command must not reach dev-a"
    );
    let wrong = t.login("dev-a", "not-the-password");
    assert!(
        pollen_proxy::discover(&wrong, &t.fleet, Duration::from_millis(500))
            .await
            .is_err(),
        "a wrong password must be refused"
    );
    // The operator reads statuses and nothing else.
    let admin = RawClient::connect(&t.identity("operators", "admin"), "pollen-ops").await;
    assert!(matches!(
        admin.subscribe(&topics::all_status(&t.fleet)).await,
        SubscribeReasonCode::Success(_)
    ));
    let code = admin.subscribe(&topics::all_replies(&t.fleet)).await;
    assert_eq!(code == SubscribeReasonCode::Failure, refuses, "{code:?}");
    proxy
        .publish(&topics::reply(&t.fleet, "dev-a"), false, b"x".to_vec())
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        admin
            .received_on(&topics::reply(&t.fleet, "dev-a"))
            .is_empty()
    );
}

/// Joins the TLS coordinator at `endpoint` as `id` with `tls`; the error if it is refused.
async fn join(endpoint: &str, id: &str, tls: ClientTls) -> Result<(), FleetClientError> {
    let stop = CancellationToken::new();
    let options = ClientOptions {
        tls,
        connect_attempts: 1,
        ..Default::default()
    };
    let s = stop.clone();
    // A client that got in serves until stopped; give it a moment, then stop it.
    let stopper = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(2)).await;
        s.cancel();
    });
    let outcome = pollen_client::run_client(
        endpoint,
        id,
        TestClient(Behaviour::Shift(1.0, 10)),
        options,
        stop,
    )
    .await;
    stopper.abort();
    outcome.map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_link_admits_only_certificates_naming_the_client_id() {
    let t = TrustedFleet::start("mosquitto.conf", &["dev-a"], &["proxy-0"]);
    let stop = CancellationToken::new();
    let server = pollen_coordinator::server::serve_tls(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        Some(&t.coordinator_tls()),
        stop.clone(),
    )
    .await
    .expect("serve");
    let endpoint = format!("https://{}", server.addr);

    // No certificate: the handshake fails, nothing joins.
    let anonymous = ClientTls {
        ca_file: Some(t.path("ca.pem")),
        ..Default::default()
    };
    assert!(join(&endpoint, "dev-a", anonymous).await.is_err());
    // Plaintext to a TLS coordinator fails too.
    assert!(
        join(
            &format!("http://{}", server.addr),
            "dev-a",
            ClientTls::default()
        )
        .await
        .is_err()
    );
    // dev-a's own certificate, but the id of another device.
    match join(&endpoint, "dev-b", t.grpc_identity("devices", "dev-a")).await {
        Err(FleetClientError::Refused(status)) => {
            assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
            assert!(
                status.message().contains("names \"dev-a\"")
                    && status.message().contains("\"dev-b\""),
                "{status:?}"
            );
        }
        other => panic!("dev-a joining as dev-b must be refused: {other:?}"),
    }
    assert_eq!(server.registry.counters().joins_refused.get(), 1);
    assert!(server.registry.clients().is_empty(), "nobody joined");
    // As itself it gets in.
    join(&endpoint, "dev-a", t.grpc_identity("devices", "dev-a"))
        .await
        .expect("dev-a joins as itself");
    stop.cancel();
}

/// Every weight of `p` is `expected` (within float rounding of the averages).
/// An error and every cause under it, for asserting on the root cause.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(&format!(": {c}"));
        cause = c.source();
    }
    text
}

fn assert_close(p: &Parameters, expected: f32) {
    let v = values(p);
    assert!(
        v.iter().all(|x| (x - expected).abs() < 1e-5),
        "{v:?} != {expected}"
    );
}
