//! The trust commands as an operator runs them: `pollen fleet provision`, then Mosquitto with
//! the configuration it wrote, then `pollen devices` and `pollen run` against that broker with
//! their client certificates, its embedded S3 server serving HTTPS with the provisioned
//! coordinator certificate. The two gateways are edge agents in this process, training the
//! built-in MNIST spec on halves of `data/mnist` and trusting the fleet CA for the object
//! store. Needs the `mosquitto` binary.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use pollen_client::agent::{Agent, AgentOptions};
use pollen_proto::mqtt::BrokerConfig;
use pollen_train::{DataSource, Shard, TaskClient};
use tokio_util::sync::CancellationToken;

fn free_port() -> u16 {
    std::net::TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// Kills the process (the broker, a proxy) when the test ends, however it ends.
struct Broker(std::process::Child);

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn pollen(args: &[&str], repo: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_pollen"))
        .args(args)
        .current_dir(repo)
        .output()
        .expect("pollen runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_and_run_work_against_the_provisioned_tls_broker() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = dir.path().join("pki");
    let pki_s = pki.display().to_string();
    let port = free_port();
    let fleet = format!("cli-{:08x}", rand::random::<u32>());
    let out = pollen(
        &[
            "fleet",
            "provision",
            "--dir",
            &pki_s,
            "--fleet",
            &fleet,
            "--devices",
            "gw-0,gw-1",
            "--listen",
            &format!("127.0.0.1:{port}"),
        ],
        &repo,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The generated configuration as is; `user root` because the test runs as root and
    // Mosquitto would otherwise switch to a user that cannot read the keys.
    let conf = std::fs::read_to_string(pki.join("mosquitto.conf")).expect("conf");
    std::fs::write(dir.path().join("test.conf"), format!("user root\n{conf}")).expect("write");
    let _broker = Broker(
        Command::new("mosquitto")
            .arg("-c")
            .arg(dir.path().join("test.conf"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("the mosquitto binary is installed (apt install mosquitto)"),
    );
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut up = false;
    for _ in 0..100 {
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        up,
        "mosquitto with the generated configuration did not listen on {addr}"
    );

    let url = format!("mqtts://127.0.0.1:{port}");
    let stop = CancellationToken::new();
    for i in 0..2u32 {
        let id = format!("gw-{i}");
        let mut broker = BrokerConfig::new(url.clone());
        broker.ca_file = Some(pki.join("ca.pem"));
        broker.cert_file = Some(pki.join(format!("devices/{id}.pem")));
        broker.key_file = Some(pki.join(format!("devices/{id}.key")));
        let mut data = DataSource::new(repo.join("data/mnist"));
        data.shard = Some(Shard { index: i, count: 2 });
        let client = tokio::task::spawn_blocking(move || TaskClient::open(data, u64::from(i)))
            .await
            .expect("join")
            .expect("MNIST share");
        let mut options = AgentOptions::new(&id, &fleet, broker);
        options.heartbeat = Duration::from_secs(5);
        options.object_store_ca = Some(pki.join("ca.pem"));
        let agent = Agent::new(options, client).expect("agent");
        let token = stop.clone();
        tokio::spawn(async move {
            let _ = agent.run(token).await;
        });
    }

    let ca = pki.join("ca.pem").display().to_string();
    let cert = |p: &str| pki.join(p).display().to_string();
    let devices = pollen(
        &[
            "devices",
            "--fleet",
            &fleet,
            "--broker",
            &url,
            "--broker-ca",
            &ca,
            "--broker-cert",
            &cert("operators/admin.pem"),
            "--broker-key",
            &cert("operators/admin.key"),
            "--wait",
            "3s",
            "--json",
        ],
        &repo,
    );
    assert!(
        devices.status.success(),
        "{}",
        String::from_utf8_lossy(&devices.stderr)
    );
    let listed: Vec<serde_json::Value> = String::from_utf8_lossy(&devices.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON device per line"))
        .collect();
    let mut online: Vec<&str> = listed
        .iter()
        .filter(|d| d["online"] == true)
        .filter_map(|d| d["device_id"].as_str())
        .collect();
    online.sort_unstable();
    assert_eq!(online, ["gw-0", "gw-1"], "{listed:?}");

    // The operator's certificate may read statuses, not command devices: `pollen run` with it
    // would bridge nobody, so it runs as the provisioned proxy.
    let runs = dir.path().join("runs").display().to_string();
    let run = pollen(
        &[
            "run",
            "--rounds",
            "1",
            "--fleet",
            &fleet,
            "--devices",
            "2",
            "--broker",
            &url,
            "--broker-ca",
            &ca,
            "--broker-cert",
            &cert("proxies/proxy-0.pem"),
            "--broker-key",
            &cert("proxies/proxy-0.key"),
            "--s3-tls-cert",
            &cert("coordinator.pem"),
            "--s3-tls-key",
            &cert("coordinator.key"),
            "--s3-ca",
            &ca,
            "--runs-dir",
            &runs,
            "--json",
        ],
        &repo,
    );
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        stderr.contains("object storage: embedded S3 at https://127.0.0.1:"),
        "{stderr}"
    );
    let stdout = String::from_utf8_lossy(&run.stdout);
    let round: serde_json::Value =
        serde_json::from_str(stdout.lines().last().expect("a round line")).expect("JSON");
    assert_eq!(round["round"], 1, "{stdout}");
    assert_eq!(round["succeeded"], 2, "{stdout}");
    assert!(
        round["accuracy"].as_f64().expect("accuracy") > 0.8,
        "{stdout}"
    );

    // The same fleet with the coordinator and the proxy as processes of their own, every link
    // over TLS: the Fleet link mutual (the proxy's certificate), the broker mutual, the object
    // store HTTPS.
    let port = free_port();
    let coordinator = Command::new(env!("CARGO_BIN_EXE_pollen"))
        .args([
            "coordinator",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--rounds",
            "1",
            "--tls-cert",
            &cert("coordinator.pem"),
            "--tls-key",
            &cert("coordinator.key"),
            "--client-ca",
            &ca,
            "--s3-tls-cert",
            &cert("coordinator.pem"),
            "--s3-tls-key",
            &cert("coordinator.key"),
            "--s3-ca",
            &ca,
            "--wait-for-clients",
            "60s",
            "--runs-dir",
            &runs,
            "--json",
        ])
        .current_dir(&repo)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("pollen coordinator starts");
    let _proxy = Broker(
        Command::new(env!("CARGO_BIN_EXE_pollen"))
            .args([
                "proxy",
                "--coordinator",
                &format!("https://127.0.0.1:{port}"),
                "--coordinator-ca",
                &ca,
                "--coordinator-cert",
                &cert("proxies/proxy-0.pem"),
                "--coordinator-key",
                &cert("proxies/proxy-0.key"),
                "--fleet",
                &fleet,
                "--broker",
                &url,
                "--broker-ca",
                &ca,
                "--broker-cert",
                &cert("proxies/proxy-0.pem"),
                "--broker-key",
                &cert("proxies/proxy-0.key"),
            ])
            .current_dir(&repo)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("pollen proxy starts"),
    );
    let done = tokio::time::timeout(
        Duration::from_secs(240),
        tokio::task::spawn_blocking(move || coordinator.wait_with_output()),
    )
    .await
    .expect("the coordinator finishes its round")
    .expect("join")
    .expect("coordinator output");
    stop.cancel();
    let stderr = String::from_utf8_lossy(&done.stderr);
    assert!(done.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("Fleet gRPC API on https://127.0.0.1:{port}")),
        "{stderr}"
    );
    let stdout = String::from_utf8_lossy(&done.stdout);
    let round: serde_json::Value =
        serde_json::from_str(stdout.lines().last().expect("a round line")).expect("JSON");
    assert_eq!(round["succeeded"], 2, "{stdout}");
}
