//! `pollen-agent`: the edge agent.
//!
//! - MQTT mode (default): `pollen-agent --config agent.toml` connects to the broker as one
//!   device and trains on its own data what each run's task asks, moving weights through
//!   presigned URLs. `--print-default-config` prints a commented config.
//! - Direct mode (`--coordinator URL` or `--client-id ID`): joins a coordinator over gRPC.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use pollen_agent::AgentConfig;
use pollen_client::Exit;
use pollen_train::{Backend, DataSource, Shard};
use tokio_util::sync::CancellationToken;

const DEFAULT_COORDINATOR: &str = "http://127.0.0.1:50051";

#[derive(Parser)]
#[command(
    name = "pollen-agent",
    version,
    about = "Pollen edge agent: an MQTT device agent (default), or a direct gRPC client (--coordinator)"
)]
struct Args {
    /// MQTT mode: the agent's TOML config (see --print-default-config).
    #[arg(long, env = "POLLEN_AGENT_CONFIG")]
    config: Option<PathBuf>,
    /// MQTT mode: print the default config, commented, and exit.
    #[arg(long)]
    print_default_config: bool,
    /// MQTT mode: check the configuration (file, environment, flags), the broker's TLS files
    /// and the device's data, print what the agent would run with, and exit; non-zero with the
    /// reason when something is wrong. Does not connect to the broker.
    #[arg(long)]
    check: bool,
    /// MQTT mode: this device's id (overrides the config file and POLLEN_DEVICE_ID).
    #[arg(long)]
    device_id: Option<String>,
    /// MQTT mode: broker url, mqtt://host:port or mqtts://host:port (overrides the config file
    /// and POLLEN_BROKER).
    #[arg(long)]
    broker: Option<String>,
    /// MQTT mode: the fleet (overrides the config file and POLLEN_FLEET).
    #[arg(long)]
    fleet: Option<String>,
    /// Direct mode: the coordinator's Fleet endpoint [default: http://127.0.0.1:50051].
    #[arg(long, env = "POLLEN_COORDINATOR")]
    coordinator: Option<String>,
    /// Direct mode: this client's id (letters, digits, '_', '.', '-').
    #[arg(long, env = "POLLEN_CLIENT_ID")]
    client_id: Option<String>,
    /// Direct mode: compress the gRPC stream with zstd both ways (inline weights on a metered
    /// link).
    #[arg(long)]
    grpc_compression: bool,
    /// Direct mode, https:// coordinator: PEM of the CA that signed its certificate.
    #[arg(long, env = "POLLEN_COORDINATOR_CA", value_name = "PEM")]
    coordinator_ca: Option<PathBuf>,
    /// Direct mode: this device's PEM certificate, for a coordinator that requires one (its
    /// common name must be --client-id).
    #[arg(
        long,
        env = "POLLEN_COORDINATOR_CERT",
        value_name = "PEM",
        requires = "coordinator_key"
    )]
    coordinator_cert: Option<PathBuf>,
    #[arg(
        long,
        env = "POLLEN_COORDINATOR_KEY",
        value_name = "PEM",
        requires = "coordinator_cert"
    )]
    coordinator_key: Option<PathBuf>,
    /// The object store's private CA (PEM), trusted for its HTTPS besides the public roots
    /// (overrides the config's storage.ca_file).
    #[arg(long, env = "POLLEN_STORAGE_CA", value_name = "PEM")]
    storage_ca: Option<PathBuf>,
    /// The device's data: a CSV file, a .npy features file or an MNIST folder [default:
    /// data/mnist, or the config's data.path].
    #[arg(long, alias = "data-dir")]
    data: Option<PathBuf>,
    /// npy: the labels (or targets) file.
    #[arg(long)]
    labels: Option<PathBuf>,
    /// Arrays only: which IID share of the examples this device holds, as INDEX/COUNT (e.g.
    /// 3/10) [default: all, or the config's data.shard].
    #[arg(long)]
    shard: Option<String>,
    /// Seed of the share's split (must match across the fleet for disjoint shares) [default:
    /// 42, or the config's data.seed].
    #[arg(long)]
    seed: Option<u64>,
    /// Which library trains: auto, burn or libtorch (builds with --features torch) [default:
    /// auto, or the config's backend].
    #[arg(long, value_parser = Backend::parse)]
    backend: Option<Backend>,
    /// MQTT mode: serve the agent's Prometheus metrics (commands by outcome, reconnects) at
    /// http://ADDR/metrics; off by default.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<std::net::SocketAddr>,
}

fn parse_shard(s: &str) -> anyhow::Result<Shard> {
    s.parse::<Shard>()
        .map_err(|e| anyhow::anyhow!("--shard {e}"))
}

/// Applies the data flags to `data`.
fn data_flags(args: &Args, data: &mut DataSource) -> anyhow::Result<()> {
    if let Some(path) = &args.data {
        data.path = path.clone();
    }
    if let Some(labels) = &args.labels {
        data.labels = Some(labels.clone());
    }
    if let Some(shard) = &args.shard {
        data.shard = Some(parse_shard(shard)?);
    }
    if let Some(seed) = args.seed {
        data.seed = seed;
    }
    Ok(())
}

/// A token cancelled by Ctrl-C.
fn ctrl_c() -> CancellationToken {
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            token.cancel();
        }
    });
    shutdown
}

/// The config file, then `POLLEN_*` variables, then flags; validated.
fn mqtt_config(args: &Args) -> anyhow::Result<AgentConfig> {
    let (mut config, origin) = match &args.config {
        Some(path) => (AgentConfig::load(path)?, path.display().to_string()),
        None => (AgentConfig::default(), "(no config file)".to_string()),
    };
    config.apply_env(|name| std::env::var(name).ok())?;
    if let Some(id) = &args.device_id {
        config.device_id = id.clone();
    }
    if let Some(url) = &args.broker {
        config.broker.url = url.clone();
    }
    if let Some(fleet) = &args.fleet {
        config.fleet = fleet.clone();
    }
    if let Some(ca) = &args.storage_ca {
        config.storage.ca_file = Some(ca.clone());
    }
    data_flags(args, &mut config.data)?;
    if let Some(backend) = args.backend {
        config.backend = backend;
    }
    config.validate(&origin)?;
    Ok(config)
}

async fn run(args: Args) -> anyhow::Result<()> {
    if args.print_default_config {
        print!("{}", AgentConfig::default_toml());
        return Ok(());
    }
    match (&args.coordinator, &args.client_id) {
        (_, Some(_)) if args.metrics.is_some() => anyhow::bail!(
            "--metrics serves the MQTT agent's counters; the direct mode (--client-id) has none"
        ),
        (coordinator, Some(id)) => {
            let coordinator = coordinator
                .clone()
                .unwrap_or_else(|| DEFAULT_COORDINATOR.to_string());
            let mut data = AgentConfig::default().data;
            data_flags(&args, &mut data)?;
            let backend = args.backend.unwrap_or_default();
            match pollen_agent::run_direct(
                &coordinator,
                id,
                data,
                backend,
                pollen_client::ClientOptions {
                    grpc_compression: args.grpc_compression,
                    tls: pollen_proto::grpc_tls::ClientTls {
                        ca_file: args.coordinator_ca.clone(),
                        cert_file: args.coordinator_cert.clone(),
                        key_file: args.coordinator_key.clone(),
                    },
                    object_store_ca: args.storage_ca.clone(),
                    ..Default::default()
                },
                ctrl_c(),
            )
            .await?
            {
                Exit::Stopped { reason } => eprintln!("stopped by the coordinator: {reason}"),
                Exit::Closed => eprintln!("the coordinator closed the stream"),
                Exit::Shutdown => eprintln!("interrupted"),
            }
            Ok(())
        }
        (Some(_), None) => anyhow::bail!("--coordinator needs --client-id (or POLLEN_CLIENT_ID)"),
        (None, None) if args.check => {
            let config = mqtt_config(&args)?;
            println!("ok: {}", pollen_agent::check(&config).await?);
            Ok(())
        }
        (None, None) => {
            let config = mqtt_config(&args)?;
            pollen_agent::run_mqtt(config, args.metrics, ctrl_c()).await
        }
    }
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // A log line that cannot be written (stderr closed under a supervisor) is lost;
        // reporting that on the same closed stderr would panic the task that logged.
        .log_internal_errors(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(run(args));
    // Training abandoned at shutdown may still occupy a blocking thread; do not wait for it.
    rt.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
