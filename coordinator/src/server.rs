//! Serving the `Fleet` service on a listener until shutdown.

use std::net::SocketAddr;
use std::sync::Arc;

use pollen_proto::grpc_tls::ServerTls;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;

use crate::counters::Counters;
use crate::registry::Registry;
use crate::service::FleetService;

/// A running Fleet endpoint.
pub struct FleetServer {
    pub addr: SocketAddr,
    pub registry: Arc<Registry>,
    /// The service itself, for clients in this process ([`FleetService::join_local`]).
    pub service: FleetService,
    pub handle: JoinHandle<Result<(), tonic::transport::Error>>,
}

/// Binds `addr` (use port 0 for an ephemeral port) and serves plaintext until `shutdown` is
/// cancelled.
pub async fn serve(addr: SocketAddr, shutdown: CancellationToken) -> std::io::Result<FleetServer> {
    serve_tls(addr, None, shutdown).await
}

/// [`serve`], over TLS when `tls` is given; with its `client_ca_file`, mutual TLS where every
/// Join must match its client certificate (see [`FleetService::with_client_identities`]).
pub async fn serve_tls(
    addr: SocketAddr,
    tls: Option<&ServerTls>,
    shutdown: CancellationToken,
) -> std::io::Result<FleetServer> {
    let tls_config = tls
        .map(ServerTls::config)
        .transpose()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let listener = TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let registry = Arc::new(Registry::new(Arc::new(Counters::default())));
    let mut service = FleetService::new(registry.clone());
    if tls.is_some_and(|t| t.client_ca_file.is_some()) {
        service = service.with_client_identities();
    }
    let mut builder = tonic::transport::Server::builder();
    if let Some(config) = tls_config {
        builder = builder
            .tls_config(config)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    }
    // The builder's `tcp_nodelay` only reaches listeners tonic binds itself; with Nagle on,
    // every small answer waited for the peer's delayed ACK (~40 ms a round, measured).
    let incoming = TcpListenerStream::new(listener).map(|accepted| {
        if let Ok(stream) = &accepted {
            let _ = stream.set_nodelay(true);
        }
        accepted
    });
    let handle = tokio::spawn(
        builder
            // Many clients multiplex little traffic; small pings keep idle NAT paths open.
            .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
            .tcp_nodelay(true)
            // A proxy multiplexes one Join stream per device over a single connection; thousands
            // of devices means thousands of concurrent streams.
            .max_concurrent_streams(Some(1 << 20))
            .add_service(service.clone().into_server())
            .serve_with_incoming_shutdown(incoming, async move { shutdown.cancelled().await }),
    );
    tracing::info!(%addr, tls = tls.is_some(), "Fleet service listening");
    Ok(FleetServer {
        addr,
        registry,
        service,
        handle,
    })
}
