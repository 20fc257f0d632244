//! `/metrics` for every component that serves one (coordinator, proxy, agent): each keeps its
//! metrics in its own `prometheus-client` [`Registry`], encoded here in the OpenMetrics text
//! format.

use prometheus_client::registry::Registry;

/// The `Content-Type` of what [`encode`] writes.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Everything `registry` holds, with the values of now, ending with `# EOF`.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::with_capacity(4096);
    // The encoder fails only when its writer does (Pollen's collectors only write), and writing
    // to a String cannot fail.
    prometheus_client::encoding::text::encode(&mut out, registry)
        .expect("encoding into a String cannot fail");
    out
}

/// A running `/metrics` endpoint.
#[cfg(feature = "metrics-http")]
pub struct MetricsServer {
    pub addr: std::net::SocketAddr,
    pub handle: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// Serves `/metrics` (what `registry` holds at each scrape) and `/healthz` on `addr` (port 0:
/// any free port) until `shutdown`; for components without a dashboard (proxy, edge agent).
#[cfg(feature = "metrics-http")]
pub async fn serve(
    addr: std::net::SocketAddr,
    registry: Registry,
    shutdown: tokio_util::sync::CancellationToken,
) -> std::io::Result<MetricsServer> {
    use axum::routing::get;
    let registry = std::sync::Arc::new(registry);
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let registry = registry.clone();
                async move {
                    (
                        [(axum::http::header::CONTENT_TYPE, CONTENT_TYPE)],
                        encode(&registry),
                    )
                }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }));
    serve_router(addr, app, shutdown).await
}

/// Serves `app` on `addr` until `shutdown`, with graceful shutdown.
#[cfg(feature = "metrics-http")]
pub async fn serve_router(
    addr: std::net::SocketAddr,
    app: axum::Router,
    shutdown: tokio_util::sync::CancellationToken,
) -> std::io::Result<MetricsServer> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let handle = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await
    });
    Ok(MetricsServer { addr, handle })
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;

    #[test]
    fn counters_gain_their_suffix_and_the_exposition_ends_with_eof() {
        let mut registry = Registry::default();
        let counter: Counter = Counter::default();
        counter.inc_by(3);
        registry.register("x", "Xs", counter);
        assert_eq!(
            encode(&registry),
            "# HELP x Xs.\n# TYPE x counter\nx_total 3\n# EOF\n"
        );
    }
}
