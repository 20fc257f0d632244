//! The proxy between a fake coordinator (a tonic Fleet server on 127.0.0.1:0) and a fake device
//! (an MQTT client), over a real Mosquitto on 127.0.0.1:1883.
//!
//! Start the broker with `mosquitto -d`. Every test uses its own fleet name, so tests run in
//! parallel and never see each other's retained statuses.

use std::future::Future;
use std::time::Duration;

use pollen_proto::device::{Command, CommandKind, DeviceStatus, FitReply, Reply, reply::Body};
use pollen_proto::fleet::{
    BlobRef, ClientMessage, Codec, FailureCode, FitIns, InlineBlob, Join, ServerMessage, Stop,
    Upload, Weights, Welcome, client_message::Msg as ClientMsg, fleet_server,
    server_message::Msg as ServerMsg, weights::Body as WeightsBody,
};
use pollen_proto::mqtt::BrokerConfig;
use pollen_proto::{scalar, topics};
use pollen_proxy::{Proxy, ProxyConfig, ProxyHandle, ProxyStatsSnapshot, discover};
use prost::Message;
use rumqttc::{AsyncClient, Event, LastWill, Packet, QoS};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

const BROKER: &str = "mqtt://127.0.0.1:1883";
/// Bound on waiting for something that should happen; never a measured duration.
const PATIENCE: Duration = Duration::from_secs(20);

fn broker() -> BrokerConfig {
    if std::net::TcpStream::connect_timeout(
        &"127.0.0.1:1883".parse().expect("address"),
        Duration::from_secs(2),
    )
    .is_err()
    {
        panic!("these tests need an MQTT broker on 127.0.0.1:1883; start it with `mosquitto -d`");
    }
    BrokerConfig::new(BROKER)
}

fn unique_fleet(test: &str) -> String {
    format!("t-{test}-{:08x}", rand::random::<u32>())
}

fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64
}

async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(PATIENCE, f)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

// ---- fake coordinator ----

/// One Fleet stream as the fake coordinator sees it: the Join, a sender for instructions and
/// the client's further messages.
struct Joined {
    join: Join,
    to_client: mpsc::Sender<Result<ServerMessage, Status>>,
    from_client: Streaming<ClientMessage>,
}

impl Joined {
    async fn send(&self, msg: ServerMsg) {
        self.to_client
            .send(Ok(ServerMessage { msg: Some(msg) }))
            .await
            .expect("stream open");
    }

    async fn next(&mut self) -> ClientMsg {
        within("a message from the proxy", self.from_client.message())
            .await
            .expect("stream healthy")
            .expect("stream open")
            .msg
            .expect("message has a body")
    }
}

#[derive(Clone)]
struct FakeFleet {
    joined: mpsc::Sender<Joined>,
}

#[tonic::async_trait]
impl fleet_server::Fleet for FakeFleet {
    type JoinStream = ReceiverStream<Result<ServerMessage, Status>>;

    async fn join(
        &self,
        request: Request<Streaming<ClientMessage>>,
    ) -> Result<Response<Self::JoinStream>, Status> {
        let mut from_client = request.into_inner();
        let first = from_client
            .message()
            .await?
            .ok_or_else(|| Status::cancelled("closed before Join"))?;
        let Some(ClientMsg::Join(join)) = first.msg else {
            return Err(Status::failed_precondition("first message must be Join"));
        };
        let (to_client, rx) = mpsc::channel(16);
        let welcome = ServerMsg::Welcome(Welcome {
            coordinator_version: "fake".into(),
            max_message_bytes: 1 << 20,
        });
        let _ = to_client
            .send(Ok(ServerMessage { msg: Some(welcome) }))
            .await;
        let _ = self
            .joined
            .send(Joined {
                join,
                to_client,
                from_client,
            })
            .await;
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

struct FakeCoordinator {
    endpoint: String,
    joins: mpsc::Receiver<Joined>,
    stop: CancellationToken,
    server: JoinHandle<()>,
}

impl FakeCoordinator {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let endpoint = format!("http://{}", listener.local_addr().expect("address"));
        let (joined, joins) = mpsc::channel(16);
        let stop = CancellationToken::new();
        let server = tonic::transport::Server::builder()
            .add_service(fleet_server::FleetServer::new(FakeFleet { joined }))
            .serve_with_incoming_shutdown(
                TcpListenerStream::new(listener),
                stop.clone().cancelled_owned(),
            );
        let server = tokio::spawn(async move {
            let _ = server.await;
        });
        Self {
            endpoint,
            joins,
            stop,
            server,
        }
    }

    async fn next_join(&mut self) -> Joined {
        within("a Join", self.joins.recv())
            .await
            .expect("server running")
    }

    async fn stop(self) {
        self.stop.cancel();
        drop(self.joins);
        let _ = self.server.await;
    }
}

// ---- fake device ----

fn device_status(device: &str, online: bool) -> DeviceStatus {
    DeviceStatus {
        device_id: device.into(),
        online,
        agent_version: "test-agent".into(),
        num_examples: 600,
        model: "mnist-2nn".into(),
        free_disk_bytes: 1 << 30,
        timestamp_unix_ms: now_unix_ms(),
        properties: [("site".to_string(), scalar::string("lab"))].into(),
        data: None,
    }
}

/// An edge agent reduced to its MQTT session: a retained online status with an offline
/// last-will, commands received on a channel, replies published on demand.
struct FakeDevice {
    fleet: String,
    id: String,
    client: AsyncClient,
    commands: mpsc::Receiver<Command>,
    connection: JoinHandle<()>,
}

impl FakeDevice {
    async fn connect(fleet: &str, id: &str) -> Self {
        let status_topic = topics::status(fleet, id);
        let mut options = pollen_proto::mqtt::mqtt_options(
            &broker(),
            &format!("dev-{fleet}-{id}-{:04x}", rand::random::<u16>()),
        )
        .expect("options");
        options
            .set_clean_session(true)
            .set_keep_alive(Duration::from_secs(5))
            .set_last_will(LastWill::new(
                status_topic.clone(),
                device_status(id, false).encode_to_vec(),
                QoS::AtLeastOnce,
                true,
            ));
        let (client, mut eventloop) = AsyncClient::new(options, 64);
        client
            .subscribe(topics::command(fleet, id), QoS::AtLeastOnce)
            .await
            .expect("subscribe");
        client
            .publish(
                status_topic,
                QoS::AtLeastOnce,
                true,
                device_status(id, true).encode_to_vec(),
            )
            .await
            .expect("publish status");
        let (tx, commands) = mpsc::channel(64);
        let connection = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let command = Command::decode(p.payload).expect("proxy sends Commands");
                        if tx.send(command).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => panic!("fake device lost its broker: {e}"),
                }
            }
        });
        Self {
            fleet: fleet.into(),
            id: id.into(),
            client,
            commands,
            connection,
        }
    }

    async fn next_command(&mut self) -> Command {
        within("a command on the device", self.commands.recv())
            .await
            .expect("device connected")
    }

    async fn publish_raw(&self, channel_topic: String, payload: Vec<u8>) {
        self.client
            .publish(channel_topic, QoS::AtLeastOnce, false, payload)
            .await
            .expect("publish");
    }

    async fn reply(&self, reply: &Reply) {
        self.publish_raw(topics::reply(&self.fleet, &self.id), reply.encode_to_vec())
            .await;
    }

    /// Drops the connection without DISCONNECT, as a crash or a lost link does: the broker
    /// publishes the device's last-will.
    async fn crash(self) {
        self.connection.abort();
        let _ = self.connection.await;
    }
}

/// Removes the retained status of `device`, so the broker does not keep test leftovers.
async fn clear_status(fleet: &str, device: &str) {
    let options = pollen_proto::mqtt::mqtt_options(
        &broker(),
        &format!("clear-{:08x}", rand::random::<u32>()),
    )
    .expect("options");
    let (client, mut eventloop) = AsyncClient::new(options, 8);
    client
        .publish(
            topics::status(fleet, device),
            QoS::AtLeastOnce,
            true,
            Vec::new(),
        )
        .await
        .expect("queue");
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
}

// ---- the proxy ----

struct Running {
    handle: ProxyHandle,
    shutdown: CancellationToken,
}

impl Running {
    async fn start(fleet: &str, coordinator: &FakeCoordinator) -> Self {
        let mut config = ProxyConfig::new(fleet, coordinator.endpoint.clone(), broker());
        config.keep_alive = Duration::from_secs(5);
        let shutdown = CancellationToken::new();
        let handle = Proxy::start(config, shutdown.clone())
            .await
            .expect("proxy starts");
        Self { handle, shutdown }
    }

    /// Waits until the proxy's counters satisfy `check`.
    async fn stats_until(&self, what: &str, check: impl Fn(&ProxyStatsSnapshot) -> bool) {
        within(what, async {
            while !check(&self.handle.stats()) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
    }

    async fn stop(self) {
        self.shutdown.cancel();
        within("the proxy to stop", self.handle.join()).await;
    }
}

// ---- instructions and replies ----

const GET_URL: &str = "http://s3.test/bucket/runs/r1/global-0001.safetensors?X-Amz-Signature=get";
const PUT_URL: &str =
    "http://s3.test/bucket/runs/r1/updates/0001/gw-1.safetensors?X-Amz-Signature=put";
const UPDATE_KEY: &str = "runs/r1/updates/0001/gw-1.safetensors";

fn fit_ins(request_id: u64, round: u64, deadline_unix_ms: u64) -> ServerMsg {
    ServerMsg::Fit(FitIns {
        request_id,
        round,
        weights: Some(Weights {
            body: Some(WeightsBody::Reference(BlobRef {
                location: "runs/r1/global-0001.safetensors".into(),
                sha256: "ab".repeat(32),
                size_bytes: 795_000,
                codec: Codec::SafetensorsF32 as i32,
                url: GET_URL.into(),
            })),
        }),
        config: [("epochs".to_string(), scalar::int(1))].into(),
        deadline_unix_ms,
        upload: Some(Upload {
            location: UPDATE_KEY.into(),
            url: PUT_URL.into(),
        }),
        run_id: "r1".into(),
        task: None,
    })
}

fn fit_reply(device: &str, command: &Command) -> Reply {
    Reply {
        request_id: command.request_id.clone(),
        device_id: device.into(),
        round: command.round,
        body: Some(Body::Fit(FitReply {
            sha256: "cd".repeat(32),
            size_bytes: 795_123,
            codec: Codec::SafetensorsF32 as i32,
            num_examples: 600,
            metrics: [("train_loss".to_string(), scalar::f64(0.42))].into(),
        })),
    }
}

fn far_deadline() -> u64 {
    now_unix_ms() + 600_000
}

// ---- tests ----

#[tokio::test]
async fn proxy_joins_for_a_device_and_bridges_a_fit_by_reference() {
    let fleet = unique_fleet("fit");
    let mut coordinator = FakeCoordinator::start().await;
    let mut device = FakeDevice::connect(&fleet, "gw-1").await;
    let proxy = Running::start(&fleet, &coordinator).await;

    let mut stream = coordinator.next_join().await;
    assert_eq!(stream.join.client_id, "gw-1");
    assert_eq!(stream.join.num_examples, 600);
    assert_eq!(stream.join.agent_version, "test-agent");
    let transport = stream.join.properties.get("transport");
    assert_eq!(transport.and_then(scalar::as_str), Some("mqtt"));
    assert!(proxy.handle.wait_for_bridges(1, PATIENCE).await);

    // Inline weights cannot reach a device: refused at once, nothing published.
    stream
        .send(ServerMsg::Fit(FitIns {
            request_id: 1,
            round: 1,
            weights: Some(Weights {
                body: Some(WeightsBody::Inline(InlineBlob::default())),
            }),
            ..FitIns::default()
        }))
        .await;
    let ClientMsg::Failure(refused) = stream.next().await else {
        panic!("expected a failure for inline weights");
    };
    assert_eq!(refused.request_id, 1);
    assert_eq!(refused.code, FailureCode::BadInstruction as i32);
    assert!(
        refused
            .message
            .contains("needs weights and task manifests by reference"),
        "{}",
        refused.message
    );
    assert_eq!(proxy.handle.stats().commands_published, 0);

    // A fit by reference becomes a command with the presigned URLs...
    stream.send(fit_ins(7, 1, far_deadline())).await;
    let command = device.next_command().await;
    assert_eq!(command.kind, CommandKind::Fit as i32);
    assert!(command.request_id.ends_with("-7"), "{}", command.request_id);
    assert_eq!((command.run_id.as_str(), command.round), ("r1", 1));
    let get = command.global_weights.clone().expect("global weights");
    assert_eq!(get.url, GET_URL);
    assert_eq!(get.size_bytes, 795_000);
    assert_eq!(command.upload_url, PUT_URL);

    // ... and the device's reply becomes a FitRes naming the upload's key.
    device.reply(&fit_reply("gw-1", &command)).await;
    let ClientMsg::Fit(res) = stream.next().await else {
        panic!("expected FitRes");
    };
    assert_eq!((res.request_id, res.round, res.num_examples), (7, 1, 600));
    let Some(WeightsBody::Reference(update)) = res.weights.and_then(|w| w.body) else {
        panic!("expected weights by reference");
    };
    assert_eq!(update.location, UPDATE_KEY);
    assert_eq!(update.sha256, "cd".repeat(32));
    assert_eq!(update.size_bytes, 795_123);
    assert!(update.url.is_empty());

    // The same reply again is a duplicate: dropped and counted.
    device.reply(&fit_reply("gw-1", &command)).await;
    proxy
        .stats_until("the duplicate to be counted", |s| s.replies_duplicate == 1)
        .await;

    // Garbage on the reply and status topics, and a reply naming another device, are counted
    // and the proxy keeps working.
    device
        .publish_raw(topics::reply(&fleet, "gw-1"), b"\xff garbage".to_vec())
        .await;
    device
        .publish_raw(topics::status(&fleet, "gw-1"), b"\xff garbage".to_vec())
        .await;
    let mut impostor = fit_reply("gw-2", &command);
    impostor.request_id = format!("{}-x", command.request_id);
    device.reply(&impostor).await;
    proxy
        .stats_until("garbage to be counted", |s| {
            s.replies_malformed == 2 && s.status_malformed == 1
        })
        .await;

    stream.send(fit_ins(8, 2, far_deadline())).await;
    let second = device.next_command().await;
    assert!(second.request_id.ends_with("-8"), "{}", second.request_id);
    device.reply(&fit_reply("gw-1", &second)).await;
    let ClientMsg::Fit(res) = stream.next().await else {
        panic!("expected a second FitRes");
    };
    assert_eq!((res.request_id, res.round), (8, 2));

    let stats = proxy.handle.stats();
    assert_eq!(stats.commands_published, 2);
    assert_eq!(stats.replies_received, 5);
    assert_eq!((stats.replies_late, stats.replies_unknown), (0, 0));
    let known = proxy.handle.devices();
    assert_eq!(known.len(), 1);
    assert!(known[0].online);

    proxy.stop().await;
    clear_status(&fleet, "gw-1").await;
    coordinator.stop().await;
}

#[tokio::test]
async fn a_reply_after_the_deadline_yields_timeout_and_is_counted_late() {
    let fleet = unique_fleet("deadline");
    let mut coordinator = FakeCoordinator::start().await;
    let mut device = FakeDevice::connect(&fleet, "gw-1").await;
    let proxy = Running::start(&fleet, &coordinator).await;
    let mut stream = coordinator.next_join().await;

    stream.send(fit_ins(3, 5, now_unix_ms() + 300)).await;
    let command = device.next_command().await;

    // The device stays silent past the deadline: the coordinator hears TIMEOUT...
    let ClientMsg::Failure(failure) = stream.next().await else {
        panic!("expected a failure");
    };
    assert_eq!((failure.request_id, failure.round), (3, 5));
    assert_eq!(failure.code, FailureCode::Timeout as i32);
    assert_eq!(
        failure.message,
        "device gw-1 did not answer fit for round 5 by its deadline"
    );
    // ... and the device is told to drop the work.
    let cancel = device.next_command().await;
    assert_eq!(cancel.kind, CommandKind::Cancel as i32);
    assert_eq!(cancel.request_id, command.request_id);

    device.reply(&fit_reply("gw-1", &command)).await;
    proxy
        .stats_until("the late reply to be counted", |s| s.replies_late == 1)
        .await;
    let stats = proxy.handle.stats();
    assert_eq!((stats.timeouts, stats.replies_duplicate), (1, 0));

    proxy.stop().await;
    clear_status(&fleet, "gw-1").await;
    coordinator.stop().await;
}

#[tokio::test]
async fn the_last_will_makes_the_bridge_leave_and_fails_open_work_as_offline() {
    let fleet = unique_fleet("will");
    let mut coordinator = FakeCoordinator::start().await;
    let mut device = FakeDevice::connect(&fleet, "gw-1").await;
    let proxy = Running::start(&fleet, &coordinator).await;
    let mut stream = coordinator.next_join().await;
    assert!(proxy.handle.wait_for_bridges(1, PATIENCE).await);

    stream.send(fit_ins(4, 2, far_deadline())).await;
    device.next_command().await;
    device.crash().await;

    let ClientMsg::Failure(failure) = stream.next().await else {
        panic!("expected a failure");
    };
    assert_eq!((failure.request_id, failure.round), (4, 2));
    assert_eq!(failure.code, FailureCode::DeviceOffline as i32);
    // The bridge left: the coordinator sees the stream end.
    let end = within("the stream to end", stream.from_client.message()).await;
    assert!(matches!(end, Ok(None)), "{end:?}");
    drop(stream);
    proxy
        .stats_until("the bridge to close", |s| s.bridges_open == 0)
        .await;
    assert!(!proxy.handle.devices()[0].online);

    // Back online, the device gets a new bridge.
    let _device = FakeDevice::connect(&fleet, "gw-1").await;
    let again = coordinator.next_join().await;
    assert_eq!(again.join.client_id, "gw-1");

    proxy.stop().await;
    clear_status(&fleet, "gw-1").await;
    coordinator.stop().await;
}

#[tokio::test]
async fn a_stop_cancels_open_work_and_the_bridge_joins_again() {
    let fleet = unique_fleet("stop");
    let mut coordinator = FakeCoordinator::start().await;
    let mut device = FakeDevice::connect(&fleet, "gw-1").await;
    let proxy = Running::start(&fleet, &coordinator).await;
    let stream = coordinator.next_join().await;

    stream.send(fit_ins(9, 1, far_deadline())).await;
    let command = device.next_command().await;
    stream
        .send(ServerMsg::Stop(Stop {
            reason: "run finished".into(),
            reconnect: true,
            reconnect_after_ms: 50,
        }))
        .await;
    let cancel = device.next_command().await;
    assert_eq!(cancel.kind, CommandKind::Cancel as i32);
    assert_eq!(cancel.request_id, command.request_id);
    drop(stream);

    let mut next_run = coordinator.next_join().await;
    assert_eq!(next_run.join.client_id, "gw-1");
    // Ids of the new session never collide with the old one, even for the same coordinator id.
    next_run.send(fit_ins(9, 1, far_deadline())).await;
    let fresh = device.next_command().await;
    assert_eq!(fresh.kind, CommandKind::Fit as i32);
    assert_ne!(fresh.request_id, command.request_id);
    device.reply(&fit_reply("gw-1", &command)).await;
    proxy
        .stats_until("the stale reply to be counted late", |s| {
            s.replies_late == 1
        })
        .await;
    device.reply(&fit_reply("gw-1", &fresh)).await;
    let ClientMsg::Fit(res) = next_run.next().await else {
        panic!("expected FitRes");
    };
    assert_eq!(res.request_id, 9);

    proxy.stop().await;
    clear_status(&fleet, "gw-1").await;
    coordinator.stop().await;
}

#[tokio::test]
async fn a_device_that_misses_its_heartbeats_loses_its_bridge_until_it_is_heard_again() {
    let fleet = unique_fleet("stale");
    let mut coordinator = FakeCoordinator::start().await;
    let device = FakeDevice::connect(&fleet, "gw-1").await;
    let mut config = ProxyConfig::new(&fleet, coordinator.endpoint.clone(), broker());
    config.stale_after = Duration::from_secs(1);
    let shutdown = CancellationToken::new();
    let proxy = Running {
        handle: Proxy::start(config, shutdown.clone())
            .await
            .expect("proxy starts"),
        shutdown,
    };

    // The fake device sends no heartbeats: a second after its status it counts as offline.
    let mut stream = coordinator.next_join().await;
    let end = within("the stream to end", stream.from_client.message()).await;
    assert!(matches!(end, Ok(None)), "{end:?}");
    drop(stream);
    proxy
        .stats_until("the bridge to close", |s| s.bridges_open == 0)
        .await;
    assert!(!proxy.handle.devices()[0].online);

    // A heartbeat brings it back.
    device
        .publish_raw(
            topics::status(&fleet, "gw-1"),
            device_status("gw-1", true).encode_to_vec(),
        )
        .await;
    let again = coordinator.next_join().await;
    assert_eq!(again.join.client_id, "gw-1");

    proxy.stop().await;
    clear_status(&fleet, "gw-1").await;
    coordinator.stop().await;
}

/// Discovers `fleet` until `done` holds for what is seen.
async fn discover_until(
    fleet: &str,
    what: &str,
    done: impl Fn(&[pollen_proxy::DeviceRecord]) -> bool,
) -> Vec<pollen_proxy::DeviceRecord> {
    within(what, async {
        loop {
            let devices = discover(&broker(), fleet, Duration::from_millis(300))
                .await
                .expect("discover");
            if done(&devices) {
                return devices;
            }
        }
    })
    .await
}

#[tokio::test]
async fn discover_lists_the_devices_of_a_fleet() {
    let fleet = unique_fleet("discover");
    let _online = FakeDevice::connect(&fleet, "gw-1").await;
    let gone = FakeDevice::connect(&fleet, "gw-2").await;
    // The broker must hold gw-2's online status before it crashes, so that its last-will is
    // what remains.
    discover_until(&fleet, "both devices online", |d| {
        d.len() == 2 && d.iter().all(|r| r.online)
    })
    .await;
    gone.crash().await;

    let devices = discover_until(&fleet, "gw-2 offline", |d| d.len() == 2 && !d[1].online).await;
    assert_eq!(devices[0].device_id, "gw-1");
    assert!(devices[0].online);
    assert_eq!(devices[0].num_examples, 600);
    assert_eq!(devices[0].model, "mnist-2nn");
    assert_eq!(devices[0].agent_version, "test-agent");
    assert_eq!(devices[0].properties["site"], serde_json::json!("lab"));
    assert_eq!(devices[1].device_id, "gw-2");

    clear_status(&fleet, "gw-1").await;
    clear_status(&fleet, "gw-2").await;
}
