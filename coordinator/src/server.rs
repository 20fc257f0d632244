//! Serving the `Fleet` service on a listener until shutdown.

use std::net::SocketAddr;
use std::sync::Arc;

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

/// Binds `addr` (use port 0 for an ephemeral port) and serves until `shutdown` is cancelled.
pub async fn serve(addr: SocketAddr, shutdown: CancellationToken) -> std::io::Result<FleetServer> {
    let listener = TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let registry = Arc::new(Registry::new(Arc::new(Counters::default())));
    let service = FleetService::new(registry.clone());
    // The builder's `tcp_nodelay` only reaches listeners tonic binds itself; with Nagle on,
    // every small answer waited for the peer's delayed ACK (~40 ms a round, measured).
    let incoming = TcpListenerStream::new(listener).map(|accepted| {
        if let Ok(stream) = &accepted {
            let _ = stream.set_nodelay(true);
        }
        accepted
    });
    let handle = tokio::spawn(
        tonic::transport::Server::builder()
            // Many clients multiplex little traffic; small pings keep idle NAT paths open.
            .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
            .tcp_nodelay(true)
            // A proxy multiplexes one Join stream per device over a single connection; thousands
            // of devices means thousands of concurrent streams.
            .max_concurrent_streams(Some(1 << 20))
            .add_service(service.clone().into_server())
            .serve_with_incoming_shutdown(incoming, async move { shutdown.cancelled().await }),
    );
    tracing::info!(%addr, "Fleet service listening");
    Ok(FleetServer {
        addr,
        registry,
        service,
        handle,
    })
}
