//! The coordinator's HTTP endpoint: Prometheus metrics at `/metrics`, liveness at `/healthz`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::registry::Registry;

#[derive(Clone)]
struct AppState {
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
}

/// A running HTTP endpoint.
pub struct HttpServer {
    pub addr: SocketAddr,
    pub handle: JoinHandle<std::io::Result<()>>,
}

async fn render_metrics(State(s): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(&s.registry),
    )
}

/// Binds `addr` (port 0: any free port) and serves until `shutdown` fires.
pub async fn serve_http(
    addr: SocketAddr,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> std::io::Result<HttpServer> {
    let listener = TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(AppState { registry, metrics });
    let handle = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await
    });
    tracing::info!(%addr, "HTTP endpoint listening");
    Ok(HttpServer { addr, handle })
}
