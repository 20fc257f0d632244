//! The MQTT edge agent against a real Mosquitto broker on 127.0.0.1:1883, with the test playing
//! the proxy (an MQTT client on the device's topics) and object storage (a small HTTP server on
//! an ephemeral port serving GET and PUT, standing in for presigned URLs).
//!
//! Each test uses its own fleet name, so tests run in parallel and never see each other's
//! retained messages. The client trains nothing: it adds 1.0 to every weight.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use pollen_client::agent::{Agent, AgentOptions, AgentStats};
use pollen_client::{Client, ClientError, ClientEvaluate, ClientFit, Work};
use pollen_proto::blob::{NamedTensor, Parameters, sha256_hex};
use pollen_proto::device::{BlobGet, Command, CommandKind, DeviceStatus, Reply, reply::Body};
use pollen_proto::fleet::{Codec, FailureCode};
use pollen_proto::mqtt::{BrokerConfig, mqtt_options};
use pollen_proto::scalar::{self, ScalarMap};
use pollen_proto::topics;
use prost::Message;
use rumqttc::{AsyncClient, Event, Packet, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const BROKER: &str = "127.0.0.1:1883";
/// A safety net against a hung test, not a performance assertion.
const PATIENCE: Duration = Duration::from_secs(60);
/// What a presigned URL's query looks like; it must never show up in a reply.
const SIGNATURE: &str = "X-Amz-Signature=very-secret";

// ---------------------------------------------------------------------------------------------
// The device's client: adds 1.0 to every weight, optionally waiting at a gate first.

/// Lets a fit proceed only when the test opens it.
#[derive(Default)]
struct Gate {
    permits: Mutex<usize>,
    opened: Condvar,
}

impl Gate {
    fn open(&self, n: usize) {
        *self.permits.lock().expect("gate lock") += n;
        self.opened.notify_all();
    }

    fn pass(&self) {
        let guard = self.permits.lock().expect("gate lock");
        // Bounded so that a failing test cannot leave a blocking thread waiting forever.
        let (mut permits, _) = self
            .opened
            .wait_timeout_while(guard, PATIENCE, |p| *p == 0)
            .expect("gate lock");
        *permits = permits.saturating_sub(1);
    }
}

struct PlusOne {
    gate: Option<Arc<Gate>>,
}

const NUM_EXAMPLES: u64 = 123;

fn global_weights() -> Parameters {
    Parameters::new(vec![
        NamedTensor::new("fc.weight", vec![2, 2], vec![1.0, 2.0, 3.0, 4.0]),
        NamedTensor::new("fc.bias", vec![2], vec![0.5, -0.5]),
    ])
    .expect("valid parameters")
}

fn plus_one(p: &Parameters) -> Parameters {
    Parameters::new(
        p.tensors
            .iter()
            .map(|t| {
                NamedTensor::new(
                    t.name.clone(),
                    t.shape.clone(),
                    t.data.iter().map(|v| v + 1.0).collect(),
                )
            })
            .collect(),
    )
    .expect("valid parameters")
}

impl Client for PlusOne {
    fn num_examples(&self) -> u64 {
        NUM_EXAMPLES
    }

    fn get_parameters(&mut self, _: &Work<'_>) -> Result<Parameters, ClientError> {
        Ok(global_weights())
    }

    fn fit(&mut self, _work: &Work<'_>, parameters: Parameters) -> Result<ClientFit, ClientError> {
        if let Some(gate) = &self.gate {
            gate.pass();
        }
        let mut metrics = ScalarMap::new();
        metrics.insert("loss".into(), scalar::f64(0.25));
        Ok(ClientFit {
            parameters: plus_one(&parameters),
            num_examples: NUM_EXAMPLES,
            metrics,
        })
    }

    fn evaluate(
        &mut self,
        _work: &Work<'_>,
        parameters: Parameters,
    ) -> Result<ClientEvaluate, ClientError> {
        let mut metrics = ScalarMap::new();
        metrics.insert("accuracy".into(), scalar::f64(0.75));
        Ok(ClientEvaluate {
            loss: parameters.tensors.iter().flat_map(|t| &t.data).sum::<f32>() as f64,
            num_examples: 10,
            metrics,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Object storage: a minimal HTTP/1.1 server (one request per connection).

#[derive(Default)]
struct Store {
    objects: Mutex<HashMap<String, Bytes>>,
    /// "METHOD /path" of every request, in arrival order.
    requests: Mutex<Vec<String>>,
}

impl Store {
    fn put(&self, path: &str, bytes: Bytes) {
        self.objects
            .lock()
            .expect("store lock")
            .insert(path.to_string(), bytes);
    }

    fn get(&self, path: &str) -> Option<Bytes> {
        self.objects.lock().expect("store lock").get(path).cloned()
    }

    fn count(&self, request: &str) -> usize {
        let requests = self.requests.lock().expect("store lock");
        requests.iter().filter(|r| r.as_str() == request).count()
    }
}

struct Storage {
    store: Arc<Store>,
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Storage {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let store = Arc::new(Store::default());
        let shared = store.clone();
        let task = tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                tokio::spawn(serve(socket, shared.clone()));
            }
        });
        Self { store, addr, task }
    }

    /// A "presigned" URL for `path`: the server ignores the query, the agent must hide it.
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}?{SIGNATURE}", self.addr)
    }

    /// Stores a task manifest at `path` and returns the reference a command carries.
    fn publish_task(&self, path: &str, manifest: &str) -> pollen_proto::fleet::TaskRef {
        self.store
            .put(path, Bytes::copy_from_slice(manifest.as_bytes()));
        pollen_proto::fleet::TaskRef {
            sha256: sha256_hex(manifest.as_bytes()),
            size_bytes: manifest.len() as u64,
            url: self.url(path),
            ..Default::default()
        }
    }

    /// Stores `p` at `path` and returns the download the command names.
    fn publish(&self, path: &str, p: &Parameters) -> BlobGet {
        let blob = p.encode();
        self.store.put(path, blob.bytes.clone());
        BlobGet {
            url: self.url(path),
            sha256: blob.sha256,
            size_bytes: blob.bytes.len() as u64,
            codec: Codec::SafetensorsF32 as i32,
        }
    }
}

impl Drop for Storage {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(mut socket: TcpStream, store: Arc<Store>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break pos + 4;
        }
        match socket.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.lines();
    let mut request_line = lines.next().unwrap_or_default().split_whitespace();
    let method = request_line.next().unwrap_or_default().to_string();
    let target = request_line.next().unwrap_or_default();
    let path = target.split('?').next().unwrap_or_default().to_string();
    let length: usize = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0);
    let mut body = buf[head_end..].to_vec();
    while body.len() < length {
        match socket.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => body.extend_from_slice(&chunk[..n]),
        }
    }
    store
        .requests
        .lock()
        .expect("store lock")
        .push(format!("{method} {path}"));
    let (status, answer) = match method.as_str() {
        "GET" => match store.get(&path) {
            Some(bytes) => ("200 OK", bytes),
            None => ("404 Not Found", Bytes::from_static(b"NoSuchKey")),
        },
        "PUT" if path.starts_with("/deny/") => (
            "403 Forbidden",
            Bytes::from_static(
                b"<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>",
            ),
        ),
        "PUT" => {
            store.put(&path, Bytes::from(body));
            ("200 OK", Bytes::new())
        }
        _ => ("405 Method Not Allowed", Bytes::new()),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        answer.len()
    );
    let _ = socket.write_all(head.as_bytes()).await;
    let _ = socket.write_all(&answer).await;
    let _ = socket.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// The proxy's side of MQTT.

fn require_broker() {
    if std::net::TcpStream::connect_timeout(
        &BROKER.parse().expect("broker address"),
        Duration::from_secs(2),
    )
    .is_err()
    {
        panic!(
            "no MQTT broker on {BROKER}: these tests need Mosquitto; start it with `mosquitto -d`"
        );
    }
}

fn unique_fleet(test: &str) -> String {
    format!(
        "t-{test}-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    )
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64
}

enum Seen {
    Subscribed,
    Message(String, Bytes),
}

/// An MQTT client subscribed to one device's replies and status.
struct Proxy {
    client: AsyncClient,
    seen: mpsc::UnboundedReceiver<Seen>,
    task: JoinHandle<()>,
    fleet: String,
    device: String,
}

impl Proxy {
    async fn connect(fleet: &str, device: &str) -> Self {
        let id = format!("test-proxy-{:08x}", rand::random::<u32>());
        let mut options =
            mqtt_options(&BrokerConfig::new(format!("mqtt://{BROKER}")), &id).expect("options");
        options.set_keep_alive(Duration::from_secs(5));
        let (client, mut eventloop) = AsyncClient::new(options, 64);
        let (tx, seen) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = tx.send(Seen::Subscribed);
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let _ = tx.send(Seen::Message(p.topic, p.payload));
                    }
                    Ok(_) => {}
                    Err(e) => panic!("test proxy lost the broker: {e}"),
                }
            }
        });
        let mut proxy = Self {
            client,
            seen,
            task,
            fleet: fleet.to_string(),
            device: device.to_string(),
        };
        for topic in [topics::reply(fleet, device), topics::status(fleet, device)] {
            proxy
                .client
                .subscribe(topic, QoS::AtLeastOnce)
                .await
                .expect("subscribe");
        }
        for _ in 0..2 {
            proxy
                .next(|seen| matches!(seen, Seen::Subscribed).then_some(()))
                .await;
        }
        proxy
    }

    async fn next<T>(&mut self, mut want: impl FnMut(&Seen) -> Option<T>) -> T {
        let wait = async {
            loop {
                let seen = self.seen.recv().await.expect("proxy event loop alive");
                if let Some(found) = want(&seen) {
                    return found;
                }
            }
        };
        tokio::time::timeout(PATIENCE, wait)
            .await
            .expect("the expected message never came")
    }

    /// The next status of the device that satisfies `want`.
    async fn status(&mut self, want: impl Fn(&DeviceStatus) -> bool) -> DeviceStatus {
        let topic = topics::status(&self.fleet, &self.device);
        self.next(|seen| match seen {
            Seen::Message(t, payload) if *t == topic => DeviceStatus::decode(payload.as_ref())
                .ok()
                .filter(|s| want(s)),
            _ => None,
        })
        .await
    }

    /// The next reply that is not progress.
    async fn reply(&mut self) -> Reply {
        let topic = topics::reply(&self.fleet, &self.device);
        self.next(|seen| match seen {
            Seen::Message(t, payload) if *t == topic => {
                let reply = Reply::decode(payload.as_ref()).expect("agent replies decode");
                (!matches!(reply.body, Some(Body::Progress(_)))).then_some(reply)
            }
            _ => None,
        })
        .await
    }

    /// Every reply up to and including the final reply for `request_id`.
    async fn replies_until(&mut self, request_id: &str) -> Vec<Reply> {
        let topic = topics::reply(&self.fleet, &self.device);
        let mut all = Vec::new();
        loop {
            let reply = self
                .next(|seen| match seen {
                    Seen::Message(t, payload) if *t == topic => {
                        Some(Reply::decode(payload.as_ref()).expect("agent replies decode"))
                    }
                    _ => None,
                })
                .await;
            let last =
                reply.request_id == request_id && !matches!(reply.body, Some(Body::Progress(_)));
            all.push(reply);
            if last {
                return all;
            }
        }
    }

    async fn send(&self, command: &Command) {
        self.send_raw(command.encode_to_vec()).await;
    }

    async fn send_raw(&self, payload: Vec<u8>) {
        self.client
            .publish(
                topics::command(&self.fleet, &self.device),
                QoS::AtLeastOnce,
                false,
                payload,
            )
            .await
            .expect("publish");
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------------------------
// The agent under test.

struct Running {
    task: JoinHandle<()>,
    shutdown: CancellationToken,
    stats: Arc<AgentStats>,
}

fn start_agent(
    fleet: &str,
    device: &str,
    gate: Option<Arc<Gate>>,
    work_dir: Option<PathBuf>,
) -> Running {
    let mut options =
        AgentOptions::new(device, fleet, BrokerConfig::new(format!("mqtt://{BROKER}")));
    options.heartbeat = Duration::from_secs(1);
    options.keep_alive = Duration::from_secs(5);
    options.model = "plus-one".into();
    options.work_dir = work_dir;
    let agent = Agent::new(options, PlusOne { gate }).expect("agent options are valid");
    let stats = agent.stats();
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    let task = tokio::spawn(async move {
        agent.run(token).await.expect("agent runs");
    });
    Running {
        task,
        shutdown,
        stats,
    }
}

impl Running {
    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(PATIENCE, self.task)
            .await
            .expect("the agent stops")
            .expect("the agent task ends cleanly");
    }
}

/// Leaves the broker as the test found it: clears the device's retained status and ends the
/// agent's persistent session (connecting with its client id and a clean session does both
/// for the session). Call it once the agent is gone.
async fn forget_device(fleet: &str, device: &str) {
    let client_id = format!("pollen-agent-{fleet}-{device}");
    let mut options =
        mqtt_options(&BrokerConfig::new(format!("mqtt://{BROKER}")), &client_id).expect("options");
    options.set_clean_session(true);
    let (client, mut eventloop) = AsyncClient::new(options, 8);
    client
        .publish(
            topics::status(fleet, device),
            QoS::AtLeastOnce,
            true,
            Vec::new(),
        )
        .await
        .expect("publish");
    client.disconnect().await.expect("disconnect");
    let drained = tokio::time::timeout(PATIENCE, async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_) => return,
                Ok(_) => {}
            }
        }
    });
    drained.await.expect("the broker takes the cleanup");
}

fn command(id: &str, kind: CommandKind, round: u64) -> Command {
    Command {
        request_id: id.into(),
        kind: kind as i32,
        run_id: "run-1".into(),
        round,
        deadline_unix_ms: now_ms() + 10 * 60 * 1000,
        ..Default::default()
    }
}

/// Waits until `condition` holds (checked every few milliseconds, for at most [`PATIENCE`]).
async fn wait_until(condition: impl Fn() -> bool) {
    let wait = async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(PATIENCE, wait)
        .await
        .expect("the condition never came true");
}

fn failure_of(reply: &Reply) -> (FailureCode, String) {
    match &reply.body {
        Some(Body::Failure(f)) => (
            FailureCode::try_from(f.code).expect("known failure code"),
            f.message.clone(),
        ),
        other => panic!("expected a failure, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Behaviour.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_announces_itself_with_a_retained_online_status() {
    require_broker();
    let fleet = unique_fleet("status");
    let agent = start_agent(&fleet, "gw-1", None, None);
    let mut proxy = Proxy::connect(&fleet, "gw-1").await;
    let status = proxy.status(|s| s.online).await;
    assert_eq!(status.device_id, "gw-1");
    assert_eq!(status.num_examples, NUM_EXAMPLES);
    assert_eq!(status.model, "plus-one");
    assert!(!status.agent_version.is_empty());
    assert!(status.timestamp_unix_ms > 0);
    assert!(status.properties.contains_key("busy"));
    agent.stop().await;
    forget_device(&fleet, "gw-1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fit_uploads_the_trained_weights_and_replies_with_their_digest_once() {
    require_broker();
    let fleet = unique_fleet("fit");
    let storage = Storage::start().await;
    let agent = start_agent(&fleet, "gw-1", None, None);
    let mut proxy = Proxy::connect(&fleet, "gw-1").await;
    proxy.status(|s| s.online).await;

    let mut fit = command("fit-1", CommandKind::Fit, 4);
    fit.global_weights = Some(storage.publish("/global/round-4", &global_weights()));
    fit.upload_url = storage.url("/updates/fit-1");
    proxy.send(&fit).await;

    let replies = proxy.replies_until("fit-1").await;
    assert!(
        replies.iter().any(|r| matches!(&r.body,
            Some(Body::Progress(p)) if p.message.contains("training"))),
        "training progress is reported: {replies:?}"
    );
    let reply = replies.last().expect("a final reply");
    assert_eq!((reply.device_id.as_str(), reply.round), ("gw-1", 4));
    let Some(Body::Fit(result)) = &reply.body else {
        panic!("expected a fit reply, got {reply:?}");
    };
    let uploaded = storage
        .store
        .get("/updates/fit-1")
        .expect("the update was uploaded");
    assert_eq!(result.sha256, sha256_hex(&uploaded));
    assert_eq!(result.size_bytes, uploaded.len() as u64);
    assert_eq!(result.codec, Codec::SafetensorsF32 as i32);
    assert_eq!(result.num_examples, NUM_EXAMPLES);
    assert_eq!(
        result.metrics.get("loss").and_then(scalar::as_f64),
        Some(0.25)
    );
    let update = Parameters::decode(&uploaded, None).expect("the upload is a blob");
    assert_eq!(update, plus_one(&global_weights()));

    // QoS 1 may deliver a command twice: the reply is republished, the work is not redone.
    proxy.send(&fit).await;
    let again = proxy.reply().await;
    assert_eq!(again.request_id, "fit-1");
    assert_eq!(again.body, reply.body);
    assert_eq!(storage.store.count("PUT /updates/fit-1"), 1);
    let stats = agent.stats.snapshot();
    assert_eq!(stats.fits_done, 1);
    assert_eq!(stats.commands_duplicate, 1);
    agent.stop().await;
    forget_device(&fleet, "gw-1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evaluate_and_get_parameters_answer_as_the_contract_says() {
    require_broker();
    let fleet = unique_fleet("eval");
    let storage = Storage::start().await;
    let agent = start_agent(&fleet, "gw-1", None, None);
    let mut proxy = Proxy::connect(&fleet, "gw-1").await;
    proxy.status(|s| s.online).await;

    let mut evaluate = command("eval-1", CommandKind::Evaluate, 2);
    evaluate.global_weights = Some(storage.publish("/global/round-2", &global_weights()));
    proxy.send(&evaluate).await;
    let reply = proxy.reply().await;
    let Some(Body::Evaluate(result)) = &reply.body else {
        panic!("expected an evaluation, got {reply:?}");
    };
    assert_eq!(result.loss, 10.0);
    assert_eq!(result.num_examples, 10);
    assert_eq!(
        result.metrics.get("accuracy").and_then(scalar::as_f64),
        Some(0.75)
    );

    let mut params = command("params-1", CommandKind::GetParameters, 0);
    params.upload_url = storage.url("/init/params-1");
    proxy.send(&params).await;
    let reply = proxy.reply().await;
    let Some(Body::Fit(result)) = &reply.body else {
        panic!("expected parameters, got {reply:?}");
    };
    let uploaded = storage.store.get("/init/params-1").expect("uploaded");
    assert_eq!(result.sha256, sha256_hex(&uploaded));
    assert_eq!(result.num_examples, NUM_EXAMPLES);
    assert!(result.metrics.is_empty());
    assert_eq!(
        Parameters::decode(&uploaded, None).expect("a blob"),
        global_weights()
    );
    let stats = agent.stats.snapshot();
    assert_eq!((stats.evaluations_done, stats.parameters_done), (1, 1));
    agent.stop().await;
    forget_device(&fleet, "gw-1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_with_the_wrong_digest_fails_with_blob_transfer_naming_the_digest() {
    require_broker();
    let fleet = unique_fleet("digest");
    let storage = Storage::start().await;
    let agent = start_agent(&fleet, "gw-1", None, None);
    let mut proxy = Proxy::connect(&fleet, "gw-1").await;
    proxy.status(|s| s.online).await;

    let mut fit = command("fit-bad", CommandKind::Fit, 1);
    let mut get = storage.publish("/global/round-1", &global_weights());
    let claimed = "0".repeat(64);
    get.sha256 = claimed.clone();
    fit.global_weights = Some(get);
    fit.upload_url = storage.url("/updates/fit-bad");
    proxy.send(&fit).await;

    let reply = proxy.reply().await;
    assert_eq!(reply.request_id, "fit-bad");
    let (code, message) = failure_of(&reply);
    assert_eq!(code, FailureCode::BlobTransfer);
    assert!(message.contains(&claimed), "{message}");
    assert!(message.contains("/global/round-1"), "{message}");
    assert!(
        !message.contains("very-secret"),
        "the signature leaked: {message}"
    );
    assert_eq!(storage.store.count("PUT /updates/fit-bad"), 0);
    assert_eq!(agent.stats.snapshot().failures_sent, 1);
    agent.stop().await;
    forget_device(&fleet, "gw-1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_upload_fails_with_the_storage_answer() {
    require_broker();
    let fleet = unique_fleet("upload");
    let storage = Storage::start().await;
    let agent = start_agent(&fleet, "gw-1", None, None);
    let mut proxy = Proxy::connect(&fleet, "gw-1").await;
    proxy.status(|s| s.online).await;

    let mut fit = command("fit-denied", CommandKind::Fit, 1);
    fit.global_weights = Some(storage.publish("/global/round-1", &global_weights()));
    fit.upload_url = storage.url("/deny/fit-denied");
    proxy.send(&fit).await;

    let (code, message) = failure_of(&proxy.reply().await);
    assert_eq!(code, FailureCode::BlobTransfer);
    assert!(
        message.contains("403") && message.contains("AccessDenied"),
        "{message}"
    );
    assert!(
        !message.contains("very-secret"),
        "the signature leaked: {message}"
    );
    agent.stop().await;
    forget_device(&fleet, "gw-1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_bad_commands_are_answered_or_ignored_and_the_agent_keeps_serving() {
    require_broker();
    let fleet = unique_fleet("garbage");
    let storage = Storage::start().await;
    let agent = start_agent(&fleet, "gw-1", None, None);
    let mut proxy = Proxy::connect(&fleet, "gw-1").await;
    proxy.status(|s| s.online).await;

    proxy
        .send_raw(b"\xff\xfe definitely not protobuf".to_vec())
        .await;
    proxy.send_raw(Vec::new()).await;
    // Decodes, but names no weights to train on: a bad instruction, answered.
    proxy.send(&command("no-upload", CommandKind::Fit, 1)).await;
    let (code, message) = failure_of(&proxy.reply().await);
    assert_eq!(code, FailureCode::BadInstruction);
    assert!(message.contains("global_weights.url"), "{message}");

    // Past its deadline already: not worked on, answered TIMEOUT, nothing downloaded.
    let mut late = command("late", CommandKind::Evaluate, 1);
    late.global_weights = Some(storage.publish("/global/late", &global_weights()));
    late.deadline_unix_ms = now_ms() - 1000;
    proxy.send(&late).await;
    let reply = proxy.reply().await;
    assert_eq!(reply.request_id, "late");
    assert_eq!(failure_of(&reply).0, FailureCode::Timeout);
    assert_eq!(storage.store.count("GET /global/late"), 0);

    let mut params = command("params-after-garbage", CommandKind::GetParameters, 0);
    params.upload_url = storage.url("/init/p");
    proxy.send(&params).await;
    let reply = proxy.reply().await;
    assert_eq!(reply.request_id, "params-after-garbage");
    assert!(matches!(reply.body, Some(Body::Fit(_))), "{reply:?}");
    let stats = agent.stats.snapshot();
    assert_eq!(stats.commands_malformed, 2);
    assert_eq!(stats.commands_expired, 1);
    assert_eq!(stats.commands_received, 5);
    agent.stop().await;
    forget_device(&fleet, "gw-1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_queued_command_gets_no_reply() {
    require_broker();
    let fleet = unique_fleet("cancel");
    let storage = Storage::start().await;
    let gate = Arc::new(Gate::default());
    let agent = start_agent(&fleet, "gw-1", Some(gate.clone()), None);
    let mut proxy = Proxy::connect(&fleet, "gw-1").await;
    proxy.status(|s| s.online).await;

    let get = storage.publish("/global/round-1", &global_weights());
    let fit = |id: &str| {
        let mut c = command(id, CommandKind::Fit, 1);
        c.global_weights = Some(get.clone());
        c.upload_url = storage.url(&format!("/updates/{id}"));
        c
    };
    proxy.send(&fit("first")).await;
    // "first" is training (held at the gate) once its progress says so.
    let reply_topic = topics::reply(&fleet, "gw-1");
    proxy
        .next(|seen| match seen {
            Seen::Message(t, payload) if *t == reply_topic => {
                let r = Reply::decode(payload.as_ref()).expect("decodes");
                (r.request_id == "first" && matches!(r.body, Some(Body::Progress(_)))).then_some(())
            }
            _ => None,
        })
        .await;
    proxy.send(&fit("second")).await;
    proxy.send(&command("second", CommandKind::Cancel, 1)).await;
    proxy.send(&fit("third")).await;
    // Publishing only queues the messages: let the agent take all four before "first" ends,
    // so that the cancel finds "second" still waiting.
    let stats = agent.stats.clone();
    wait_until(move || stats.snapshot().commands_received == 4).await;
    gate.open(3);

    // Commands run in order, so "second" would have answered before "third".
    let replies = proxy.replies_until("third").await;
    let ids: Vec<&str> = replies
        .iter()
        .filter(|r| !matches!(r.body, Some(Body::Progress(_))))
        .map(|r| r.request_id.as_str())
        .collect();
    assert_eq!(ids, ["first", "third"]);
    assert!(
        replies.iter().all(|r| r.request_id != "second"),
        "{replies:?}"
    );
    assert_eq!(storage.store.count("PUT /updates/second"), 0);
    let stats = agent.stats.snapshot();
    assert_eq!((stats.commands_cancelled, stats.fits_done), (1, 2));
    agent.stop().await;
    forget_device(&fleet, "gw-1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_agent_leaves_a_retained_offline_status() {
    require_broker();
    let fleet = unique_fleet("stop");
    let agent = start_agent(&fleet, "gw-1", None, None);
    let mut proxy = Proxy::connect(&fleet, "gw-1").await;
    proxy.status(|s| s.online).await;
    agent.stop().await;
    proxy.status(|s| !s.online).await;

    // Someone who looks later still sees the device offline: the status is retained.
    let mut late_viewer = Proxy::connect(&fleet, "gw-1").await;
    let status = late_viewer.status(|_| true).await;
    assert!(!status.online, "{status:?}");
    assert_eq!(status.device_id, "gw-1");
    forget_device(&fleet, "gw-1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_dies_is_declared_offline_by_its_last_will() {
    require_broker();
    let fleet = unique_fleet("will");
    let agent = start_agent(&fleet, "gw-1", None, None);
    let mut proxy = Proxy::connect(&fleet, "gw-1").await;
    proxy.status(|s| s.online).await;

    // No goodbye: the connection just drops.
    agent.task.abort();
    let status = proxy.status(|s| !s.online).await;
    assert_eq!(status.device_id, "gw-1");
    assert_eq!(status.num_examples, NUM_EXAMPLES);
    let mut late_viewer = Proxy::connect(&fleet, "gw-1").await;
    assert!(!late_viewer.status(|_| true).await.online);
    forget_device(&fleet, "gw-1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_redelivers_its_last_reply_and_does_not_redo_the_work() {
    require_broker();
    let fleet = unique_fleet("restart");
    let storage = Storage::start().await;
    let work_dir = tempfile::tempdir().expect("tempdir");
    let first = start_agent(&fleet, "gw-1", None, Some(work_dir.path().to_path_buf()));
    let mut proxy = Proxy::connect(&fleet, "gw-1").await;
    proxy.status(|s| s.online).await;
    let mut fit = command("fit-1", CommandKind::Fit, 1);
    fit.global_weights = Some(storage.publish("/global/round-1", &global_weights()));
    fit.upload_url = storage.url("/updates/fit-1");
    proxy.send(&fit).await;
    let reply = proxy.reply().await;
    assert!(matches!(reply.body, Some(Body::Fit(_))), "{reply:?}");
    assert!(
        work_dir.path().join("outbox/fit-1.pb").exists(),
        "the reply is kept on disk"
    );
    first.task.abort();
    proxy.status(|s| !s.online).await;
    drop(proxy);

    // A proxy that missed the reply gets it when the agent comes back.
    let mut proxy = Proxy::connect(&fleet, "gw-1").await;
    let second = start_agent(&fleet, "gw-1", None, Some(work_dir.path().to_path_buf()));
    let again = proxy.reply().await;
    assert_eq!(again.request_id, "fit-1");
    assert_eq!(again.body, reply.body);
    // The same command redelivered to the new process is not run again.
    proxy.send(&fit).await;
    let third = proxy.reply().await;
    assert_eq!(third.body, reply.body);
    assert_eq!(storage.store.count("PUT /updates/fit-1"), 1);
    let stats = second.stats.snapshot();
    assert_eq!((stats.fits_done, stats.commands_duplicate), (0, 1));
    second.stop().await;
    forget_device(&fleet, "gw-1").await;
}

/// The MNIST 2NN task as a coordinator publishes it (what `pollen-train` reads).
const MNIST_2NN_TASK: &str = r#"{
  "version": 1, "name": "agent-test", "seed": 1,
  "task": {"kind": "classification", "classes": ["0","1","2","3","4","5","6","7","8","9"],
           "shape": [1, 28, 28], "holdout": 0.0, "normalize": "none"},
  "model": {"family": "mlp", "hidden": [200, 200], "activation": "relu", "dropout": 0.0},
  "train": {"local_epochs": 1, "batch_size": 10, "learning_rate": 0.1}
}"#;

/// The `pollen-agent` binary, which `cargo test --workspace` builds next to this test.
fn agent_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    let bin = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|dir| dir.join("pollen-agent"))
        .expect("target folder");
    assert!(
        bin.exists(),
        "{} is missing: `cargo test --workspace` builds it (or cargo build --bin pollen-agent)",
        bin.display()
    );
    bin
}

/// `pollen-agent` in MQTT mode, as an operator runs it: it announces its data, trains a real
/// model on its MNIST shard for the task a command names, and Ctrl-C makes it say goodbye.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_binary_trains_on_command_and_leaves_on_ctrl_c() {
    require_broker();
    let fleet = unique_fleet("bin");
    let storage = Storage::start().await;
    let work_dir = tempfile::tempdir().expect("tempdir");
    let mut proxy = Proxy::connect(&fleet, "gw-bin").await;
    let mut agent = std::process::Command::new(agent_binary())
        .args([
            "--device-id",
            "gw-bin",
            "--broker",
            &format!("mqtt://{BROKER}"),
        ])
        .args(["--shard", "0/60", "--data-dir"])
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../data/mnist"))
        .env("POLLEN_FLEET", &fleet)
        .env("POLLEN_WORK_DIR", work_dir.path())
        .env_remove("POLLEN_COORDINATOR")
        .env_remove("POLLEN_CLIENT_ID")
        .env_remove("POLLEN_AGENT_CONFIG")
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("agent starts");
    let status = proxy.status(|s| s.online).await;
    assert_eq!(status.num_examples, 1000);
    let data = status.data.expect("the agent announces its data");
    assert_eq!((data.format.as_str(), data.rows), ("mnist", 1000));
    assert_eq!(data.example_shape, vec![1, 28, 28]);
    let task = storage.publish_task("/task.json", MNIST_2NN_TASK);

    let mut params = command("init", CommandKind::GetParameters, 0);
    params.task = Some(task.clone());
    params.upload_url = storage.url("/init");
    proxy.send(&params).await;
    assert!(matches!(proxy.reply().await.body, Some(Body::Fit(_))));
    let initial = storage.store.get("/init").expect("initial model uploaded");
    let initial = Parameters::decode(&initial, None).expect("a blob");
    assert_eq!(initial.num_params(), 199_210);

    let mut fit = command("fit-1", CommandKind::Fit, 1);
    fit.task = Some(task);
    fit.global_weights = Some(storage.publish("/global/round-1", &initial));
    fit.upload_url = storage.url("/updates/fit-1");
    fit.config.insert("batch_size".into(), scalar::int(50));
    proxy.send(&fit).await;
    let reply = proxy.reply().await;
    let Some(Body::Fit(result)) = &reply.body else {
        panic!("expected a fit reply, got {reply:?}");
    };
    assert_eq!(result.num_examples, 1000);
    let update = storage
        .store
        .get("/updates/fit-1")
        .expect("update uploaded");
    assert_eq!(result.sha256, sha256_hex(&update));
    let update = Parameters::decode(&update, Some(&initial.specs())).expect("same model");
    assert_ne!(update, initial, "training changed the weights");

    let interrupted = std::process::Command::new("kill")
        .args(["-INT", &agent.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(interrupted.success());
    proxy.status(|s| !s.online).await;
    let exit = tokio::task::spawn_blocking(move || agent.wait())
        .await
        .expect("joined")
        .expect("agent exits");
    assert!(exit.success(), "{exit:?}");
    forget_device(&fleet, "gw-bin").await;
}
