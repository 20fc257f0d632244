//! The commands that talk to a fleet's broker (`pollen proxy`, `pollen devices`), the broker
//! options they share with `pollen run`, and `pollen fleet provision`.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use pollen_proto::mqtt::BrokerConfig;
use pollen_proxy::{Proxy, ProxyConfig, ProxyShard};

use super::report::print_devices;
use super::shutdown_on_ctrl_c;

/// The broker commands use when none is given.
pub const DEFAULT_BROKER: &str = "mqtt://127.0.0.1:1883";

/// Where the fleet's broker is and who this process is to it.
#[derive(Args, Debug, Clone)]
pub struct BrokerArgs {
    /// mqtt://host[:1883], or mqtts://host[:8883] with --broker-ca; a username and password
    /// may be given in the URL [default: mqtt://127.0.0.1:1883].
    #[arg(long, env = "POLLEN_BROKER")]
    pub broker: Option<String>,
    /// PEM file of the CA that signed the broker's certificate (mqtts).
    #[arg(long, env = "POLLEN_BROKER_CA", value_name = "PEM")]
    pub broker_ca: Option<PathBuf>,
    /// PEM client certificate, for brokers that identify clients by certificate (Mosquitto
    /// with `use_identity_as_username`, AWS IoT Core).
    #[arg(
        long,
        env = "POLLEN_BROKER_CERT",
        value_name = "PEM",
        requires = "broker_key"
    )]
    pub broker_cert: Option<PathBuf>,
    /// PEM private key of --broker-cert.
    #[arg(
        long,
        env = "POLLEN_BROKER_KEY",
        value_name = "PEM",
        requires = "broker_cert"
    )]
    pub broker_key: Option<PathBuf>,
}

impl BrokerArgs {
    pub fn config(&self) -> BrokerConfig {
        let mut config = BrokerConfig::new(DEFAULT_BROKER);
        self.apply(&mut config);
        config
    }

    /// Overrides what these arguments give in `config` (a config file's).
    pub fn apply(&self, config: &mut BrokerConfig) {
        if let Some(url) = &self.broker {
            config.url = url.clone();
        }
        if let Some(ca) = &self.broker_ca {
            config.ca_file = Some(ca.clone());
        }
        if let (Some(cert), Some(key)) = (&self.broker_cert, &self.broker_key) {
            config.cert_file = Some(cert.clone());
            config.key_file = Some(key.clone());
        }
    }
}

/// How a proxy reaches an `https://` coordinator.
#[derive(Args, Debug, Clone)]
pub struct CoordinatorTlsArgs {
    /// PEM of the CA that signed the coordinator's certificate.
    #[arg(long, env = "POLLEN_COORDINATOR_CA", value_name = "PEM")]
    pub coordinator_ca: Option<PathBuf>,
    /// PEM client certificate for a coordinator that requires one (`pollen fleet provision`
    /// writes DIR/proxies/<id>.pem).
    #[arg(
        long,
        env = "POLLEN_COORDINATOR_CERT",
        value_name = "PEM",
        requires = "coordinator_key"
    )]
    pub coordinator_cert: Option<PathBuf>,
    #[arg(
        long,
        env = "POLLEN_COORDINATOR_KEY",
        value_name = "PEM",
        requires = "coordinator_cert"
    )]
    pub coordinator_key: Option<PathBuf>,
}

impl CoordinatorTlsArgs {
    pub fn config(&self) -> pollen_proto::grpc_tls::ClientTls {
        pollen_proto::grpc_tls::ClientTls {
            ca_file: self.coordinator_ca.clone(),
            cert_file: self.coordinator_cert.clone(),
            key_file: self.coordinator_key.clone(),
        }
    }
}

/// How a proxy shares its fleet with others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardArg {
    /// With whichever proxies are live (announced on the broker).
    Auto,
    Static(ProxyShard),
}

impl std::str::FromStr for ShardArg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s == "auto" {
            return Ok(Self::Auto);
        }
        s.parse()
            .map(Self::Static)
            .map_err(|e| format!("{e}; or \"auto\""))
    }
}

/// Arguments of `pollen proxy`.
#[derive(Args, Debug)]
pub struct ProxyArgs {
    /// The proxy's TOML config (see --print-default-config); the flags below override it.
    #[arg(long, env = "POLLEN_PROXY_CONFIG")]
    pub config: Option<PathBuf>,
    /// Print the default config, commented, and exit.
    #[arg(long)]
    pub print_default_config: bool,
    /// Coordinator Fleet endpoint [default: http://127.0.0.1:50051].
    #[arg(long)]
    pub coordinator: Option<String>,
    #[command(flatten)]
    pub coordinator_tls: CoordinatorTlsArgs,
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// [default: default]
    #[arg(long)]
    pub fleet: Option<String>,
    /// Names this proxy's persistent MQTT session; give each proxy of a fleet its own
    /// [default: proxy-0].
    #[arg(long)]
    pub proxy_id: Option<String>,
    /// Only these devices (comma-separated); all online devices when absent.
    #[arg(long, value_delimiter = ',')]
    pub devices: Option<Vec<String>>,
    #[arg(long)]
    pub min_examples: Option<u64>,
    #[arg(long)]
    pub max_devices: Option<usize>,
    /// Share the fleet with other proxies. `auto`: with every live proxy started with
    /// `--shard auto` (each with its own --proxy-id); they split the devices by rendezvous
    /// hashing over their ids and take over a dead proxy's devices. INDEX/COUNT (e.g. 0/3): a
    /// static share; run COUNT proxies with indexes 0..COUNT.
    #[arg(long, value_name = "auto|INDEX/COUNT")]
    pub shard: Option<ShardArg>,
    /// Serve the proxy's Prometheus metrics (bridges, devices online, dropped replies,
    /// timeouts, live proxies) at http://ADDR/metrics.
    #[arg(long, value_name = "ADDR")]
    pub http: Option<SocketAddr>,
}

/// The proxy's configuration: its file (or the defaults), then the flags.
pub fn proxy_config(a: &ProxyArgs) -> anyhow::Result<ProxyConfig> {
    let mut config = match &a.config {
        Some(path) => ProxyConfig::load(path)?,
        None => ProxyConfig::new(
            "default",
            "http://127.0.0.1:50051",
            BrokerConfig::new(DEFAULT_BROKER),
        ),
    };
    if let Some(coordinator) = &a.coordinator {
        config.coordinator = coordinator.clone();
    }
    let tls = a.coordinator_tls.config();
    if tls.ca_file.is_some() {
        config.coordinator_tls.ca_file = tls.ca_file;
    }
    if tls.cert_file.is_some() {
        config.coordinator_tls.cert_file = tls.cert_file;
        config.coordinator_tls.key_file = tls.key_file;
    }
    a.broker.apply(&mut config.broker);
    if let Some(fleet) = &a.fleet {
        config.fleet = fleet.clone();
    }
    if let Some(id) = &a.proxy_id {
        config.proxy_id = id.clone();
    }
    if let Some(devices) = &a.devices {
        config.selection.devices = Some(devices.iter().cloned().collect());
    }
    if let Some(min) = a.min_examples {
        config.selection.min_examples = min;
    }
    if let Some(max) = a.max_devices {
        config.selection.max_devices = Some(max);
    }
    match a.shard {
        Some(ShardArg::Auto) => {
            config.auto_shard = true;
            config.selection.shard = None;
        }
        Some(ShardArg::Static(shard)) => {
            config.auto_shard = false;
            config.selection.shard = Some(shard);
        }
        None => {}
    }
    config.validate()?;
    Ok(config)
}

pub async fn proxy(a: ProxyArgs) -> anyhow::Result<()> {
    if a.print_default_config {
        print!("{}", ProxyConfig::default_toml());
        return Ok(());
    }
    let config = proxy_config(&a)?;
    let shutdown = shutdown_on_ctrl_c("stopping the proxy");
    let (fleet, coordinator) = (config.fleet.clone(), config.coordinator.clone());
    let broker = config.broker.redacted_url();
    let sharing = match (config.auto_shard, config.selection.shard) {
        (true, _) => format!(", shared automatically as {:?}", config.proxy_id),
        (false, Some(shard)) => format!(", shard {shard}"),
        (false, None) => String::new(),
    };
    let proxy = Proxy::start(config, shutdown.clone()).await?;
    eprintln!(
        "proxy for fleet {fleet:?}{sharing}: broker {broker}, coordinator {coordinator}; Ctrl-C to stop"
    );
    if let Some(addr) = a.http {
        let server =
            pollen_proto::prometheus::serve(addr, proxy.metrics_registry(), shutdown.clone())
                .await
                .with_context(|| format!("serving metrics on {addr}"))?;
        eprintln!("Prometheus metrics on http://{}/metrics", server.addr);
    }
    shutdown.cancelled().await;
    let stats = proxy.stats();
    proxy.join().await;
    eprintln!("proxy stopped: {stats:?}");
    Ok(())
}

/// Arguments of `pollen devices`.
#[derive(Args, Debug)]
pub struct DevicesArgs {
    #[command(flatten)]
    pub broker: BrokerArgs,
    #[arg(long, default_value = "default")]
    pub fleet: String,
    /// How long to collect status messages.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub wait: std::time::Duration,
    #[arg(long)]
    pub json: bool,
}

pub async fn devices(a: DevicesArgs) -> anyhow::Result<()> {
    let devices = pollen_proxy::discover(&a.broker.config(), &a.fleet, a.wait).await?;
    if a.json {
        for d in &devices {
            println!("{}", serde_json::to_string(d)?);
        }
    } else {
        print_devices(&devices);
        eprintln!("{} devices in fleet {:?}", devices.len(), a.fleet);
    }
    Ok(())
}

/// `pollen fleet ...`.
#[derive(clap::Subcommand, Debug)]
pub enum FleetCommand {
    /// Make (or extend) a fleet's identities and broker policy in a directory: a fleet CA,
    /// an X.509 certificate per device (CN = device id), per proxy and per operator, the
    /// broker's and the coordinator's server certificates, a Mosquitto configuration with its
    /// ACL (each device confined to its own topics), and AWS IoT Core policy documents. Run
    /// again with more --devices to add devices; what exists is kept.
    Provision(ProvisionArgs),
    /// Run simulated edge agents in this process against a broker (and the object store its
    /// coordinator hands out), over the real protocols: shard INDEX/COUNT of a fleet of
    /// --devices, so that a large simulated fleet spreads over processes or pods. Prints one
    /// JSON line once every device of the shard is online (agents, start-up time, memory,
    /// open files), then serves until Ctrl-C.
    Simulate(FleetSimulateArgs),
}

/// Arguments of `pollen fleet simulate`.
#[derive(Args, Debug)]
pub struct FleetSimulateArgs {
    /// Devices in the whole simulated fleet, over every shard.
    #[arg(long)]
    pub devices: usize,
    /// This process's part of them, INDEX/COUNT (device k is here when k % COUNT = INDEX).
    #[arg(long, value_name = "INDEX/COUNT", default_value = "0/1")]
    pub shard: pollen_train::Shard,
    #[command(flatten)]
    pub broker: BrokerArgs,
    #[arg(long, default_value = "default")]
    pub fleet: String,
    /// Device ids are PREFIX-000000, PREFIX-000001, ...
    #[arg(long, default_value = "sim")]
    pub prefix: String,
    /// train: the spec's model on each device's share of the spec's data; noop: answer with
    /// the model received (load tests).
    #[arg(long, value_enum, default_value_t = crate::fleet_sim::Workload::Train)]
    pub workload: crate::fleet_sim::Workload,
    /// The spec whose data (split over --devices) and model the devices train; the built-in
    /// MNIST 2NN when absent.
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long, default_value = "auto", value_parser = pollen_train::Backend::parse)]
    pub backend: pollen_train::Backend,
    /// The object store's private CA (PEM), which the devices trust.
    #[arg(long, env = "POLLEN_STORAGE_CA", value_name = "PEM")]
    pub storage_ca: Option<PathBuf>,
    /// How long the devices may take to come online.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub wait_online: std::time::Duration,
}

/// `pollen fleet simulate`.
pub async fn simulate(a: FleetSimulateArgs) -> anyhow::Result<()> {
    let spec = match &a.config {
        Some(path) => crate::spec::RunSpec::load(path)?.0,
        None => crate::spec::RunSpec::default_spec(),
    };
    let options = crate::fleet_sim::FleetSimOptions {
        devices: a.devices,
        shard: a.shard,
        broker: a.broker.config(),
        fleet: a.fleet,
        prefix: a.prefix,
        workload: a.workload,
        spec,
        backend: a.backend,
        object_store_ca: a.storage_ca,
        wait_online: a.wait_online,
    };
    crate::fleet_sim::run(
        options,
        |report| match serde_json::to_string(report) {
            Ok(line) => println!("{line}"),
            Err(e) => eprintln!("report not printed: {e}"),
        },
        shutdown_on_ctrl_c("stopping the simulated devices"),
    )
    .await
}

/// Arguments of `pollen fleet provision`.
#[derive(Args, Debug)]
pub struct ProvisionArgs {
    /// Directory holding the fleet's CA, identities and policies.
    #[arg(long)]
    pub dir: PathBuf,
    #[arg(long, default_value = "default")]
    pub fleet: String,
    /// Device ids to issue certificates for (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub devices: Vec<String>,
    /// Proxy ids (their --proxy-id) to issue certificates for.
    #[arg(long, value_delimiter = ',', default_value = "proxy-0")]
    pub proxies: Vec<String>,
    /// Operators who may list the fleet's devices.
    #[arg(long, value_delimiter = ',', default_value = "admin")]
    pub operators: Vec<String>,
    /// Names (DNS or IP) the broker is reached by: its certificate is valid for these.
    #[arg(long, value_delimiter = ',', default_value = "localhost,127.0.0.1")]
    pub broker_names: Vec<String>,
    /// Names (DNS or IP) the coordinator is reached by.
    #[arg(long, value_delimiter = ',', default_value = "localhost,127.0.0.1")]
    pub coordinator_names: Vec<String>,
    /// The broker's mutual-TLS listener in mosquitto.conf.
    #[arg(long, default_value = "0.0.0.0:8883")]
    pub listen: SocketAddr,
    /// Also give every identity a password (DIR/<kind>/<id>.password, hashed in
    /// mosquitto.passwd) and open a TLS listener on this port for username/password logins
    /// under the same ACL.
    #[arg(long, value_name = "PORT")]
    pub password_port: Option<u16>,
    /// AWS region and account of the IoT Core policies' ARNs (`*`: any).
    #[arg(long, default_value = "*")]
    pub aws_region: String,
    #[arg(long, default_value = "*")]
    pub aws_account: String,
    /// Where the broker host has Mosquitto's dynamic-security plugin, for
    /// mosquitto-dynsec.conf (the eclipse-mosquitto image: /usr/lib/mosquitto_dynamic_security.so).
    #[arg(long, default_value = pollen_trust::dynsec::DEBIAN_PLUGIN)]
    pub dynsec_plugin: String,
}

pub async fn fleet(command: FleetCommand) -> anyhow::Result<()> {
    match command {
        FleetCommand::Simulate(a) => simulate(a).await,
        FleetCommand::Provision(a) => {
            let done = pollen_trust::Provision {
                fleet: a.fleet.clone(),
                dir: a.dir.clone(),
                devices: a.devices,
                proxies: a.proxies,
                operators: a.operators,
                broker_names: a.broker_names,
                coordinator_names: a.coordinator_names,
                listen_host: a.listen.ip().to_string(),
                listen_port: a.listen.port(),
                password_port: a.password_port,
                aws_region: a.aws_region,
                aws_account: a.aws_account,
                dynsec_plugin: a.dynsec_plugin,
            }
            .run()?;
            eprintln!(
                "fleet {:?} in {}: {} devices, {} proxies, {} operators ({} files written, {} kept)",
                a.fleet,
                a.dir.display(),
                done.devices,
                done.proxies,
                done.operators,
                done.created.len(),
                done.kept.len()
            );
            eprintln!(
                "broker: mosquitto -c {} (or {}, which also refuses subscriptions beyond an identity's topics); devices connect to mqtts://<broker>:{} with --broker-ca {}",
                a.dir.join("mosquitto.conf").display(),
                a.dir.join("mosquitto-dynsec.conf").display(),
                a.listen.port(),
                a.dir.join("ca.pem").display()
            );
            Ok(())
        }
    }
}
