//! `pollen serve` and its clients: `pollen submit`, `pollen stop`, `pollen resume`, and
//! `pollen runs` / `pollen status` with `--server`, over the control API
//! ([`pollen_dashboard::control`]).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use pollen_coordinator::metrics::Metrics;
use pollen_dashboard::control::Accepted;

use super::shutdown_on_ctrl_c;
use super::train::ServiceArgs;
use crate::serve::{Service, ServiceContext};

/// Arguments of `pollen serve`.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// The service's settings: TOML whose keys are the flags' names (see
    /// --print-default-config); flags given on the command line override the file.
    #[arg(long, env = "POLLEN_SERVE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Print the default settings, commented, and exit.
    #[arg(long)]
    pub print_default_config: bool,
    /// The fleet whose proxies and agents join this service: it runs only specs whose
    /// [devices] fleet is this one, and operators are authorized on it.
    #[arg(long, default_value = "default")]
    pub fleet: String,
    #[command(flatten)]
    pub service: ServiceArgs,
}

pub async fn serve(a: ServeArgs) -> anyhow::Result<()> {
    if a.print_default_config {
        print!("{}", super::service_config::DEFAULT_TOML);
        return Ok(());
    }
    let a = match &a.config {
        // `pollen serve ARGS...`: the file's settings, then ARGS over them.
        Some(path) => {
            let command_line: Vec<String> = std::env::args().skip(2).collect();
            super::service_config::with_file(path, &command_line)?
        }
        None => a,
    };
    let s = &a.service;
    let database = s.database()?;
    let runs = crate::run::open_records(&s.runs_dir, &database)?;
    let shutdown = shutdown_on_ctrl_c("stopping the service: the current run is interrupted");
    let coordinator = s.start().await?;
    let service = Service::new(runs, a.fleet.clone());
    let metrics = Arc::new(Metrics::new(coordinator.server.registry.clone()));
    let http = coordinator
        .service_endpoint(
            s.http,
            &s.runs_dir,
            &database,
            s.operators.access()?,
            service.clone(),
            &metrics,
        )
        .await?;
    let taken = service.take_up()?;
    if !taken.is_empty() {
        eprintln!("taken up: {} (queued, or interrupted)", taken.join(", "));
    }
    eprintln!(
        "serving: submit runs with `pollen submit SPEC --server http://{http}`; Ctrl-C to stop"
    );
    let ctx = ServiceContext {
        registry: coordinator.server.registry.clone(),
        store: coordinator.storage.store.clone(),
        metrics,
        wait_for_clients: s.wait_for_clients,
    };
    // The queue stops with Ctrl-C; the coordinator's own token (which the HTTP endpoint
    // shares) stops with it.
    service.run_queue(ctx, shutdown).await;
    coordinator.shut_down().await;
    Ok(())
}

/// Where a `pollen serve` is and who is asking.
#[derive(Args, Debug, Clone)]
pub struct ServerArgs {
    /// The service's HTTP endpoint, e.g. http://127.0.0.1:8080 (what `pollen serve` prints).
    #[arg(long, env = "POLLEN_SERVER", value_name = "URL")]
    pub server: Option<String>,
    /// An operator token (`pollen operator add`), when the service has operators.
    #[arg(
        long,
        env = "POLLEN_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
}

impl ServerArgs {
    fn url(&self) -> anyhow::Result<&str> {
        self.server
            .as_deref()
            .map(|s| s.trim_end_matches('/'))
            .context("--server URL (or POLLEN_SERVER) is required: the `pollen serve` endpoint")
    }

    fn client(&self) -> anyhow::Result<reqwest::Client> {
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(token) = &self.token {
            let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
                .context("the token is not a valid header value")?;
            value.set_sensitive(true);
            headers.insert(reqwest::header::AUTHORIZATION, value);
        }
        Ok(reqwest::Client::builder()
            .default_headers(headers)
            .build()?)
    }

    /// The response's body when it succeeded; its status and text as the error otherwise.
    async fn send(&self, request: reqwest::RequestBuilder) -> anyhow::Result<String> {
        let response = request.send().await.with_context(|| {
            format!("cannot reach the service at {}", self.url().unwrap_or("?"))
        })?;
        let status = response.status();
        let body = response.text().await?;
        anyhow::ensure!(status.is_success(), "{status}: {}", body.trim());
        Ok(body)
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<String> {
        let url = format!("{}{path}", self.url()?);
        self.send(self.client()?.get(url)).await
    }

    async fn post(&self, path: &str, body: String) -> anyhow::Result<Accepted> {
        let url = format!("{}{path}", self.url()?);
        let text = self
            .send(
                self.client()?
                    .post(url)
                    .header(reqwest::header::CONTENT_TYPE, "application/toml")
                    .body(body),
            )
            .await?;
        serde_json::from_str(&text).with_context(|| format!("unexpected answer: {text}"))
    }
}

/// Arguments of `pollen submit`.
#[derive(Args, Debug)]
pub struct SubmitArgs {
    /// The run spec (TOML).
    pub spec: PathBuf,
    #[command(flatten)]
    pub server: ServerArgs,
}

/// Arguments of `pollen stop` and `pollen resume`.
#[derive(Args, Debug)]
pub struct RunActionArgs {
    /// The run's id.
    pub run: String,
    #[command(flatten)]
    pub server: ServerArgs,
}

fn print(accepted: &Accepted) {
    println!("{} {}", accepted.id, accepted.status);
}

pub async fn submit(a: SubmitArgs) -> anyhow::Result<()> {
    let spec = std::fs::read_to_string(&a.spec)
        .with_context(|| format!("reading {}", a.spec.display()))?;
    print(&a.server.post("/api/runs", spec).await?);
    Ok(())
}

pub async fn stop(a: RunActionArgs) -> anyhow::Result<()> {
    print(
        &a.server
            .post(&format!("/api/runs/{}/stop", a.run), String::new())
            .await?,
    );
    Ok(())
}

pub async fn resume(a: RunActionArgs) -> anyhow::Result<()> {
    print(
        &a.server
            .post(&format!("/api/runs/{}/resume", a.run), String::new())
            .await?,
    );
    Ok(())
}
