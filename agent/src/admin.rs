//! The admin HTTP server: /metrics, /healthz and /readyz. It only reads shared state; it never
//! blocks the agent's core loop.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use crate::telemetry::Metrics;

/// Readiness conditions: ready only after the first full list of both resources and the first
/// successful dataplane read.
#[derive(Debug, Default)]
pub struct Health {
    pub slices_listed: AtomicBool,
    pub services_listed: AtomicBool,
    pub dataplane_read: AtomicBool,
}

impl Health {
    pub fn not_ready_reasons(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        if !self.slices_listed.load(Ordering::Relaxed) {
            out.push("EndpointSlices not listed yet");
        }
        if !self.services_listed.load(Ordering::Relaxed) {
            out.push("Services not listed yet");
        }
        if !self.dataplane_read.load(Ordering::Relaxed) {
            out.push("no successful dataplane read yet");
        }
        out
    }
}

#[derive(Clone)]
struct AdminState {
    metrics: Metrics,
    health: Arc<Health>,
}

pub fn router(metrics: Metrics, health: Arc<Health>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(AdminState { metrics, health })
}

async fn metrics_handler(State(s): State<AdminState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.encode(),
    )
}

async fn readyz(State(s): State<AdminState>) -> impl IntoResponse {
    let reasons = s.health.not_ready_reasons();
    if reasons.is_empty() {
        (StatusCode::OK, "ready\n".to_string())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", reasons.join("; ")),
        )
    }
}

/// Binds the admin server; the returned future serves until dropped.
pub async fn serve(
    addr: SocketAddr,
    metrics: Metrics,
    health: Arc<Health>,
) -> std::io::Result<(SocketAddr, impl std::future::Future<Output = std::io::Result<()>>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    Ok((
        local,
        async move { axum::serve(listener, router(metrics, health)).await },
    ))
}
