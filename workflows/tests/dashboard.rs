//! The web dashboard in a real browser: `pollen simulate --dashboard` as a user starts it,
//! Debian's Chromium (headless) driven over the DevTools protocol, a screenshot kept as a test
//! artifact (`target/test-artifacts/dashboard.png`).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

/// Kills the child when the test ends, however it ends.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn chromium() -> PathBuf {
    let path = std::env::var_os("POLLEN_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    assert!(
        path.exists(),
        "{} not found: the dashboard test needs Chromium (Debian: `apt-get install chromium`; \
         or set POLLEN_CHROMIUM to a Chrome/Chromium binary)",
        path.display()
    );
    path
}

/// Where test artifacts go: `<target dir>/test-artifacts`.
fn artifacts_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let dir = target.join("test-artifacts");
    std::fs::create_dir_all(&dir).expect("artifacts dir");
    dir
}

/// `pollen operator add NAME` into `file`: the token it prints.
fn add_operator(file: &Path, name: &str, roles: &str, fleets: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_pollen"))
        .args([
            "operator", "add", name, "--roles", roles, "--fleets", fleets, "--file",
        ])
        .arg(file)
        .output()
        .expect("pollen runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout)
        .expect("utf-8")
        .trim()
        .to_string();
    assert_eq!(token.len(), 64, "{token}");
    token
}

/// Starts `pollen simulate --dashboard --operators FILE` and returns it with the dashboard URL
/// it printed.
fn start_simulation(runs: &Path, operators: &Path) -> (Killed, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_pollen"))
        .args([
            "simulate",
            "--dashboard",
            // Far more rounds than the test needs: it ends the run itself.
            "--rounds",
            "1000",
            "--clients",
            "10",
            // Some devices fail, so that failures show up as a user would see them.
            "--failure-rate",
            "0.25",
            "--operators",
        ])
        .arg(operators)
        .arg("--runs-dir")
        .arg(runs)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("pollen starts");
    let stderr = child.stderr.take().expect("piped");
    let child = Killed(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("pollen: {line}");
            if let Some(rest) = line.strip_prefix("Dashboard on ") {
                let url = rest.split_whitespace().next().unwrap_or_default();
                let _ = tx.send(url.to_string());
            }
        }
    });
    let url = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("pollen simulate --dashboard prints `Dashboard on http://...`");
    (child, url)
}

/// GET `url` as the operator holding `token`.
async fn get(url: &str, token: &str) -> reqwest::Response {
    reqwest::Client::new()
        .get(url)
        .bearer_auth(token)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
}

async fn get_json(url: &str, token: &str) -> Value {
    let body = reqwest::Client::new()
        .get(url)
        .bearer_auth(token)
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
        .text()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {url}: not JSON: {e}: {body}"))
}

/// What the event stream at `url` sends `token`'s operator until its first `round` event, or
/// until `limit`.
async fn events_until_round(url: &str, token: &str, limit: Duration) -> String {
    use futures::StreamExt;
    let response = get(url, token).await;
    assert_eq!(response.status().as_u16(), 200, "{url}");
    let mut stream = response.bytes_stream();
    let mut heard = String::new();
    let _ = tokio::time::timeout(limit, async {
        while let Some(Ok(chunk)) = stream.next().await {
            heard.push_str(&String::from_utf8_lossy(&chunk));
            if heard.contains("event: round") {
                break;
            }
        }
    })
    .await;
    heard
}

/// Polls `check` every 200 ms until it returns `Some`, failing after `limit` with `what`.
async fn eventually<T, F: std::future::Future<Output = Option<T>>>(
    limit: Duration,
    what: &str,
    mut check: impl FnMut() -> F,
) -> T {
    let until = Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < until, "timed out after {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// What the page shows, read in the page: chart points and series, KPI values, device rows.
const PAGE_STATE: &str = r#"(() => {
    // Between about:blank and the dashboard there is a moment with no body yet.
    if (!document.body) return { rounds: 0, liveRounds: 0, devices: [], charts: {}, kpi: {} };
    const charts = {};
    for (const s of document.querySelectorAll('[data-chart]')) {
        const svg = s.querySelector('svg');
        charts[s.dataset.chart] = {
            points: Number(svg && svg.getAttribute('data-points')),
            series: s.querySelectorAll('[data-series]').length,
        };
    }
    const kpi = {};
    for (const k of document.querySelectorAll('[data-kpi]')) {
        kpi[k.dataset.kpi] = (k.querySelector('.value') || k).textContent.trim();
    }
    return {
        rounds: Number(document.body.dataset.rounds || 0),
        liveRounds: Number(document.body.dataset.liveRounds || 0),
        failures: document.querySelectorAll('#failures li[data-round]').length,
        devices: [...document.querySelectorAll('#devices tr[data-device]')]
            .map(r => [r.dataset.device, r.dataset.status]),
        charts, kpi,
        config: (document.querySelector('#config') || {}).textContent || '',
        title: document.title,
    };
})()"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_a_live_run_in_a_real_browser() {
    let chromium = chromium();
    let runs = tempfile::tempdir().expect("tempdir");
    let operators = runs.path().join("operators.toml");
    let admin = add_operator(&operators, "ada", "admin", "default");
    let viewer = add_operator(&operators, "vic", "viewer", "elsewhere");
    let (_sim, url) = start_simulation(runs.path(), &operators);
    assert!(
        url.starts_with("http://127.0.0.1:") && url.ends_with('/'),
        "{url}"
    );

    // The API first: the run is live and has rounds.
    let run_id = eventually(Duration::from_secs(120), "two recorded rounds", || async {
        let runs = get_json(&format!("{url}api/runs"), &admin).await;
        let run = runs["runs"].get(0)?.clone();
        (run["live"] == true && run["last_round"].as_u64()? >= 2)
            .then(|| run["id"].as_str().map(str::to_string))?
    })
    .await;

    // Without a token: 401 everywhere but the liveness probe. A viewer of another fleet: no
    // runs listed, 403 on this run and on /metrics (the default Cedar policy).
    for path in ["", "api/runs", "api/events", "metrics"] {
        let status = reqwest::get(format!("{url}{path}"))
            .await
            .expect("GET")
            .status();
        assert_eq!(status.as_u16(), 401, "/{path} without a token");
    }
    let healthz = reqwest::get(format!("{url}healthz")).await.expect("GET");
    assert_eq!(healthz.status().as_u16(), 200);
    assert_eq!(
        get(&format!("{url}api/runs"), "not-a-token")
            .await
            .status()
            .as_u16(),
        401
    );
    let listed = get_json(&format!("{url}api/runs"), &viewer).await;
    assert_eq!(
        listed["runs"],
        json!([]),
        "a viewer of another fleet sees no runs"
    );
    for path in [format!("api/runs/{run_id}"), "metrics".to_string()] {
        let denied = get(&format!("{url}{path}"), &viewer).await;
        assert_eq!(
            denied.status().as_u16(),
            403,
            "/{path} as a viewer of another fleet"
        );
        let why = denied.text().await.expect("body");
        assert!(why.contains("operator \"vic\" may not"), "{why}");
    }
    // The control API (`pollen serve`'s) is Cedar-checked before anything else: 401 without a
    // token, 403 for a viewer; an admin is told this endpoint takes no control requests.
    let client = reqwest::Client::new();
    let post = |path: String, token: Option<&str>| {
        let mut request = client.post(format!("{url}{path}")).body("rounds = 1\n");
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send()
    };
    for path in [
        "api/runs".to_string(),
        format!("api/runs/{run_id}/stop"),
        format!("api/runs/{run_id}/resume"),
    ] {
        let anonymous = post(path.clone(), None).await.expect("POST");
        assert_eq!(
            anonymous.status().as_u16(),
            401,
            "POST /{path} without a token"
        );
        let denied = post(path.clone(), Some(&viewer)).await.expect("POST");
        assert_eq!(denied.status().as_u16(), 403, "POST /{path} as a viewer");
        let why = denied.text().await.expect("body");
        assert!(why.contains("operator \"vic\" may not"), "{why}");
        let admitted = post(path.clone(), Some(&admin)).await.expect("POST");
        assert_eq!(
            admitted.status().as_u16(),
            404,
            "POST /{path} as an admin, no service here"
        );
    }
    // The event stream: both may watch, but the viewer of another fleet hears none of this
    // run's rounds while the admin hears them.
    let events = format!("{url}api/events");
    let (admin_heard, viewer_heard) = tokio::join!(
        events_until_round(&events, &admin, Duration::from_secs(60)),
        events_until_round(&events, &viewer, Duration::from_secs(20)),
    );
    assert!(admin_heard.contains("event: round"), "{admin_heard}");
    assert!(admin_heard.contains(&run_id), "{admin_heard}");
    assert!(!viewer_heard.contains("event: round"), "{viewer_heard}");
    assert!(!viewer_heard.contains(&run_id), "{viewer_heard}");

    let model = get(&format!("{url}api/runs/{run_id}/model"), &admin).await;
    assert_eq!(model.status().as_u16(), 200);
    assert!(model.bytes().await.expect("checkpoint").len() > 100_000);

    let profile = tempfile::tempdir().expect("tempdir");
    let mut browser = Browser::launch(&chromium, profile.path()).await;
    // The browser logs in once; the cookie then carries the token (event stream included).
    browser
        .call(
            "Page.navigate",
            json!({ "url": format!("{url}login?token={admin}") }),
        )
        .await
        .expect("navigate");

    // Charts and devices render with the run's real rounds.
    let page = browser
        .wait_for(
            Duration::from_secs(60),
            "charts with >= 5 rounds and 10 devices",
            PAGE_STATE,
            |v| {
                v["rounds"].as_u64() >= Some(5) && v["devices"].as_array().map(Vec::len) == Some(10)
            },
        )
        .await;
    for chart in ["accuracy", "loss", "clients", "durations"] {
        let c = &page["charts"][chart];
        assert!(
            c["points"].as_u64().unwrap_or(0) >= 2 && c["series"].as_u64().unwrap_or(0) >= 1,
            "chart {chart} has no data: {page:#}"
        );
    }
    // The reference dashboard's numbers: accuracy, loss, clients used, successful and failed
    // responses, run time.
    for kpi in [
        "round",
        "accuracy",
        "loss",
        "clients",
        "succeeded",
        "failed",
        "runtime",
    ] {
        let v = page["kpi"][kpi].as_str().unwrap_or_default();
        assert!(
            !v.is_empty() && v != "-" && v != "—",
            "KPI {kpi} empty: {page:#}"
        );
    }
    assert!(
        page["kpi"]["accuracy"]
            .as_str()
            .unwrap_or_default()
            .contains('%'),
        "{page:#}"
    );
    for d in page["devices"].as_array().expect("devices") {
        let (id, status) = (d[0].as_str().unwrap_or(""), d[1].as_str().unwrap_or(""));
        assert!(id.starts_with("sim-"), "{d}");
        assert!(
            ["online", "training"].contains(&status),
            "device {id} is {status}"
        );
    }
    assert!(
        page["config"].as_str().unwrap_or("").contains("[strategy]"),
        "{page:#}"
    );
    assert!(
        page["title"].as_str().unwrap_or("").contains(&run_id),
        "{page:#}"
    );

    // The failure count and list agree with the records of the rounds shown.
    let detail = get_json(&format!("{url}api/runs/{run_id}"), &admin).await;
    let shown_rounds = page["rounds"].as_u64().expect("rounds");
    let failed: u64 = detail["rounds"]
        .as_array()
        .expect("rounds")
        .iter()
        .filter(|r| r["round"].as_u64() <= Some(shown_rounds))
        .map(|r| r["failed"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(page["kpi"]["failed"], failed.to_string(), "{page:#}");
    assert_eq!(page["failures"].as_u64(), Some(failed.min(50)), "{page:#}");

    // New rounds arrive over the event stream, without a reload.
    let shown = page["rounds"].as_u64().expect("rounds");
    let live = browser
        .wait_for(
            Duration::from_secs(60),
            "a round pushed over SSE",
            PAGE_STATE,
            |v| v["rounds"].as_u64() > Some(shown) && v["liveRounds"].as_u64() >= Some(1),
        )
        .await;
    eprintln!(
        "dashboard went from {shown} to {} rounds live",
        live["rounds"]
    );

    let png = browser.screenshot().await;
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "a PNG");
    assert!(
        png.len() > 20_000,
        "a page with charts, not a blank one: {} bytes",
        png.len()
    );
    let path = artifacts_dir().join("dashboard.png");
    std::fs::write(&path, &png).expect("write screenshot");
    eprintln!("screenshot: {}", path.display());

    // The same numbers on /metrics, from the same server.
    let metrics = get(&format!("{url}metrics"), &admin)
        .await
        .text()
        .await
        .expect("body");
    for name in [
        "pollen_accuracy ",
        "pollen_loss ",
        "pollen_round_clients{outcome=\"succeeded\"} ",
        "pollen_client_results_total{result=\"success\"} ",
        "pollen_client_results_total{result=\"failure\"} ",
        "pollen_run_elapsed_seconds ",
        "pollen_rounds_total{status=\"ok\"} ",
    ] {
        assert!(
            metrics.lines().any(|l| l.starts_with(name)),
            "{name} missing from /metrics:\n{metrics}"
        );
    }
    browser.close().await;
}

/// Headless Chromium over the DevTools protocol (what Puppeteer and Playwright speak), on one
/// page target.
struct Browser {
    _process: Killed,
    ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    next_id: u64,
}

impl Browser {
    async fn launch(chromium: &Path, profile: &Path) -> Self {
        let process = Command::new(chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--hide-scrollbars",
                "--window-size=1400,1700",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", chromium.display()));
        let process = Killed(process);
        // Chromium writes the port it picked into the profile once it listens.
        let port_file = profile.join("DevToolsActivePort");
        let port = eventually(
            Duration::from_secs(30),
            "Chromium's DevToolsActivePort",
            || {
                let text = std::fs::read_to_string(&port_file).ok();
                async move { text?.lines().next()?.trim().parse::<u16>().ok() }
            },
        )
        .await;
        let list = format!("http://127.0.0.1:{port}/json/list");
        let ws_url = eventually(Duration::from_secs(30), "a page target", || {
            let list = list.clone();
            async move {
                let body = reqwest::get(&list).await.ok()?.text().await.ok()?;
                let targets: Value = serde_json::from_str(&body).ok()?;
                targets.as_array()?.iter().find(|t| t["type"] == "page")?["webSocketDebuggerUrl"]
                    .as_str()
                    .map(str::to_string)
            }
        })
        .await;
        let (ws, _) = tokio_tungstenite::connect_async(&ws_url)
            .await
            .unwrap_or_else(|e| panic!("DevTools websocket {ws_url}: {e}"));
        Self {
            _process: process,
            ws,
            next_id: 1,
        }
    }

    /// Sends one command and waits for its result (events in between are skipped).
    async fn call(&mut self, method: &str, params: Value) -> Result<Value, Value> {
        let id = self.next_id;
        self.next_id += 1;
        let msg = json!({ "id": id, "method": method, "params": params }).to_string();
        self.ws
            .send(Message::text(msg))
            .await
            .expect("DevTools send");
        let reply = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(msg) = self.ws.next().await {
                let Ok(Message::Text(text)) = msg else {
                    continue;
                };
                let v: Value = serde_json::from_str(&text).expect("DevTools sends JSON");
                if v["id"] == id {
                    return v;
                }
            }
            panic!("DevTools connection closed during {method}");
        })
        .await
        .unwrap_or_else(|_| panic!("no DevTools answer to {method} within 30 s"));
        match reply.get("error") {
            Some(e) => Err(e.clone()),
            None => Ok(reply["result"].clone()),
        }
    }

    /// Evaluates a JavaScript expression in the page and returns its value as JSON, or what
    /// went wrong.
    async fn try_eval(&mut self, expression: &str) -> Result<Value, String> {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({ "expression": expression, "returnByValue": true }),
            )
            .await
            .map_err(|e| format!("Runtime.evaluate failed: {e}"))?;
        if let Some(ex) = r.get("exceptionDetails") {
            return Err(format!("page script threw: {ex}"));
        }
        Ok(r["result"]["value"].clone())
    }

    /// Evaluates `expression` every 200 ms until `done` accepts its value.
    async fn wait_for(
        &mut self,
        limit: Duration,
        what: &str,
        expression: &str,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let until = Instant::now() + limit;
        loop {
            // While the page loads, its context may be replaced under an evaluation: retry.
            let v = match self.try_eval(expression).await {
                Ok(v) if done(&v) => return v,
                Ok(v) => v,
                Err(e) => json!({ "error": e }),
            };
            assert!(
                Instant::now() < until,
                "timed out after {limit:?} waiting for {what}; the page shows {v:#}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The whole page as a PNG.
    async fn screenshot(&mut self) -> Vec<u8> {
        use base64::Engine;
        let r = self
            .call(
                "Page.captureScreenshot",
                json!({ "format": "png", "captureBeyondViewport": true }),
            )
            .await
            .expect("screenshot");
        base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().expect("base64 data"))
            .expect("valid base64")
    }

    async fn close(mut self) {
        let _ = self.call("Browser.close", json!({})).await;
    }
}
