//! What the process-level tests share: killing the processes they start, reading their
//! output, a free port, a metric of a `/metrics` page, and the usual cast (Mosquitto, a
//! simulated fleet, a one-off proxy). Each test file uses part of it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

/// Kills the process when the test ends, however it ends.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Fails the test with how to start Mosquitto unless it listens on 127.0.0.1:1883.
pub fn require_mosquitto() {
    assert!(
        std::net::TcpStream::connect_timeout(
            &"127.0.0.1:1883".parse().expect("addr"),
            Duration::from_secs(2)
        )
        .is_ok(),
        "Mosquitto is not listening on 127.0.0.1:1883: start it with `mosquitto -d`"
    );
}

/// A port free now, for a process that must come back on the same address.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// The lines a stream prints, as they come. The reader keeps draining after the test stops
/// listening, so that the process never writes into a closed pipe.
pub fn lines(stream: impl Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    rx
}

/// The rest of the first line of `rx` after `marker`, trimmed.
pub fn wait_for(rx: &Receiver<String>, marker: &str, what: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx
            .recv_timeout(left)
            .unwrap_or_else(|e| panic!("{what} never printed {marker:?}: {e}"));
        if let Some((_, rest)) = line.split_once(marker) {
            return rest.trim().to_string();
        }
    }
}

/// The body of `http://ADDR/PATH` when it answers 200, over HTTP/1.0 (the server closes when
/// done).
pub fn http_get(url: &str) -> Option<String> {
    use std::io::Write;
    let (addr, path) = url.strip_prefix("http://")?.split_once('/')?;
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET /{path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    (head.split_whitespace().nth(1) == Some("200")).then(|| body.to_string())
}

/// One counter or gauge (`name` with its labels, if any) of a `/metrics` page.
pub fn metric(metrics_url: &str, name: &str) -> Option<u64> {
    http_get(metrics_url)?
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// `pollen fleet simulate --devices N --fleet F` (training devices), once every device is
/// online.
pub fn simulated_fleet(repo: &Path, fleet: &str, devices: u64) -> Killed {
    let mut child = Command::new(env!("CARGO_BIN_EXE_pollen"))
        .args([
            "fleet",
            "simulate",
            "--devices",
            &devices.to_string(),
            "--fleet",
            fleet,
        ])
        .current_dir(repo)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("pollen fleet simulate starts");
    let report = lines(child.stdout.take().expect("piped"));
    let child = Killed(child);
    wait_for(&report, "\"agents\"", "pollen fleet simulate");
    child
}

/// A `pollen proxy` from a config file in `dir`: `fleet`'s devices on the shared Mosquitto,
/// bridged to the coordinator on `listen`, with a one-off MQTT session (a test leaves nothing
/// queued on the broker). Its stderr, for what it prints.
pub fn one_off_proxy(
    dir: &Path,
    fleet: &str,
    listen: &str,
    extra: &[&str],
) -> (Killed, Receiver<String>) {
    let config: PathBuf = dir.join("proxy.toml");
    std::fs::write(
        &config,
        format!(
            "fleet = \"{fleet}\"\ncoordinator = \"http://{listen}\"\npersistent_session = false\n[broker]\nurl = \"mqtt://127.0.0.1:1883\"\n"
        ),
    )
    .expect("write proxy config");
    let mut child = Command::new(env!("CARGO_BIN_EXE_pollen"))
        .arg("proxy")
        .arg("--config")
        .arg(&config)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("pollen proxy starts");
    let log = lines(child.stderr.take().expect("piped"));
    (Killed(child), log)
}
