//! Writing the Prometheus text exposition format (version 0.0.4), shared by every component
//! that serves `/metrics` (coordinator, proxy, agent).

use std::fmt::{Display, Write as _};

/// The `Content-Type` of a `/metrics` answer.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Escapes a label value as the format requires (label values may hold anything a device
/// reports).
pub fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A metric family with one unlabelled sample.
pub fn sample(out: &mut String, kind: &str, name: &str, help: &str, value: impl Display) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
    );
}

pub fn counter(out: &mut String, name: &str, help: &str, value: u64) {
    sample(out, "counter", name, help, value);
}

pub fn gauge(out: &mut String, name: &str, help: &str, value: impl Display) {
    sample(out, "gauge", name, help, value);
}

/// A metric family with one sample per value of the label `key`.
pub fn by_label<V: Display>(
    out: &mut String,
    kind: &str,
    name: &str,
    help: &str,
    key: &str,
    samples: impl IntoIterator<Item = (impl AsRef<str>, V)>,
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for (value, v) in samples {
        let _ = writeln!(out, "{name}{{{key}=\"{}\"}} {v}", label(value.as_ref()));
    }
}

/// A running `/metrics` endpoint.
#[cfg(feature = "metrics-http")]
pub struct MetricsServer {
    pub addr: std::net::SocketAddr,
    pub handle: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// Serves `/metrics` (what `render` returns at each scrape) and `/healthz` on `addr` (port 0:
/// any free port) until `shutdown`; for components without a dashboard (proxy, edge agent).
#[cfg(feature = "metrics-http")]
pub async fn serve(
    addr: std::net::SocketAddr,
    render: impl Fn() -> String + Clone + Send + Sync + 'static,
    shutdown: tokio_util::sync::CancellationToken,
) -> std::io::Result<MetricsServer> {
    use axum::routing::get;
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let render = render.clone();
                async move { ([(axum::http::header::CONTENT_TYPE, CONTENT_TYPE)], render()) }
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

    #[test]
    fn families_render_in_the_text_format() {
        let mut out = String::new();
        counter(&mut out, "x_total", "Xs.", 3);
        by_label(
            &mut out,
            "counter",
            "y_total",
            "Ys.",
            "reason",
            [("a\"b", 1u64)],
        );
        assert_eq!(
            out,
            "# HELP x_total Xs.\n# TYPE x_total counter\nx_total 3\n\
             # HELP y_total Ys.\n# TYPE y_total counter\ny_total{reason=\"a\\\"b\"} 1\n"
        );
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
