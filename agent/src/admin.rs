//! The admin HTTP server: /metrics, /healthz, /readyz and the preStop hold `/v1/hold`. It only
//! reads shared state and the API; it never blocks the agent's core loop.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::{Query, State};
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
    /// When the dataplane loop last went round (seconds since the Unix epoch; 0: not started).
    pub loop_beat: AtomicU64,
    /// How long the loop may go without a round before `/healthz` fails (seconds; 0: never).
    pub stall_after: AtomicU64,
    /// Why the live-traffic check (conntrack events) is unavailable, when it is. The agent
    /// still measures rules, so it stays ready; `/readyz` says what is missing.
    pub traffic_unavailable: std::sync::Mutex<Option<String>>,
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Health {
    /// Records a round of the dataplane loop.
    pub fn beat(&self) {
        self.loop_beat.store(unix_now(), Ordering::Relaxed);
    }

    /// Why the agent is not live at `now` (Unix seconds): its dataplane loop has been stuck
    /// (a kernel call that never returns, a task that hangs) for longer than its bound.
    pub fn stalled(&self, now: u64) -> Option<String> {
        let (beat, bound) = (
            self.loop_beat.load(Ordering::Relaxed),
            self.stall_after.load(Ordering::Relaxed),
        );
        let quiet = now.saturating_sub(beat);
        (beat > 0 && bound > 0 && quiet > bound)
            .then(|| format!("the dataplane loop has made no progress for {quiet} s (bound {bound} s)"))
    }

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

/// What the hold endpoint needs: API access, default options and a bound on concurrent holds.
#[derive(Clone)]
pub struct HoldContext {
    pub client: kube::Client,
    pub defaults: crate::hold::HoldOptions,
    pub slots: Arc<tokio::sync::Semaphore>,
    /// True once the agent is shutting down: new holds get 503, in-flight ones answer.
    pub stopping: tokio::sync::watch::Receiver<bool>,
}

#[derive(Clone)]
struct AdminState {
    metrics: Metrics,
    health: Arc<Health>,
    hold: Option<HoldContext>,
}

pub fn router(metrics: Metrics, health: Arc<Health>, hold: Option<HoldContext>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/v1/hold", get(hold_handler))
        .with_state(AdminState { metrics, health, hold })
}

fn json_response(code: StatusCode, body: serde_json::Value) -> axum::response::Response {
    (code, [(header::CONTENT_TYPE, "application/json")], format!("{body}\n")).into_response()
}

fn bad_request(message: String) -> axum::response::Response {
    json_response(StatusCode::BAD_REQUEST, serde_json::json!({"error": message}))
}

/// A Kubernetes object name (RFC 1123 subdomain): pods.
fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// An RFC 1123 label: namespaces.
fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// `GET /v1/hold?namespace=N&pod=P&timeout=T` (or `ip=`): 200 once the pod converged on every
/// node, 504 on timeout naming the nodes still waited on, 400/404 on bad input, 429 when too
/// many holds are in progress.
async fn hold_handler(
    State(s): State<AdminState>,
    Query(pairs): Query<Vec<(String, String)>>,
) -> axum::response::Response {
    use crate::hold::{hold_until_converged, HoldError, HoldTarget};
    let Some(ctx) = s.hold.clone() else {
        return json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"error": "holds are disabled on this agent"}),
        );
    };
    let mut q = std::collections::HashMap::new();
    for (k, v) in pairs {
        if q.insert(k.clone(), v).is_some() {
            return bad_request(format!("parameter {k:?} is given more than once"));
        }
    }
    for k in q.keys() {
        if ![
            "namespace",
            "pod",
            "ip",
            "timeout",
            "skipStaleAfter",
            "skipNotReady",
            "annotate",
        ]
        .contains(&k.as_str())
        {
            return bad_request(format!(
                "unknown parameter {k:?}; use namespace, pod, ip, timeout, skipStaleAfter, skipNotReady, annotate"
            ));
        }
    }
    let ip = match q.get("ip").map(|v| v.parse::<std::net::IpAddr>()) {
        Some(Ok(ip)) => Some(ip),
        Some(Err(_)) => return bad_request(format!("ip={:?} is not an IP address", q["ip"])),
        None => None,
    };
    let pod = q.get("pod").filter(|p| !p.is_empty()).cloned();
    let namespace = q.get("namespace").filter(|n| !n.is_empty()).cloned();
    if let Some(p) = &pod {
        if !is_dns_subdomain(p) {
            return bad_request(format!("pod={p:?} is not a valid pod name"));
        }
    }
    if let Some(n) = &namespace {
        if !is_dns_label(n) {
            return bad_request(format!("namespace={n:?} is not a valid namespace name"));
        }
    }
    if pod.is_none() && ip.is_none() {
        return bad_request("give pod= (with namespace=) or ip=".into());
    }
    if pod.is_some() && namespace.is_none() {
        return bad_request("pod= needs namespace=".into());
    }
    let mut opts = ctx.defaults.clone();
    if let Some(t) = q.get("timeout") {
        match crate::config::parse_duration(t) {
            Ok(d) if d > std::time::Duration::ZERO && d <= std::time::Duration::from_secs(3600) => opts.timeout = d,
            _ => return bad_request(format!("timeout={t:?}: use a duration between 1ms and 1h, e.g. 25s")),
        }
    }
    if let Some(t) = q.get("skipStaleAfter") {
        match crate::config::parse_duration(t) {
            Ok(d) => opts.skip_stale_after = Some(d),
            Err(e) => return bad_request(format!("skipStaleAfter: {e}")),
        }
    }
    match q.get("skipNotReady").map(String::as_str) {
        None | Some("false") => {}
        Some("true") => opts.skip_not_ready = true,
        Some(v) => return bad_request(format!("skipNotReady={v:?}: use true or false")),
    }
    let annotate = match q.get("annotate").map(String::as_str) {
        None | Some("false") | Some("0") => false,
        Some("true") | Some("1") => true,
        Some(v) => return bad_request(format!("annotate={v:?}: use true or false")),
    };
    let mut stopping = ctx.stopping.clone();
    if *stopping.borrow() {
        return json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"error": "this agent is shutting down; ask another node's agent"}),
        );
    }
    let Ok(_slot) = ctx.slots.clone().try_acquire_owned() else {
        return json_response(
            StatusCode::TOO_MANY_REQUESTS,
            serde_json::json!({"error": "too many holds in progress; retry"}),
        );
    };
    s.metrics.holds_in_progress.inc();
    let target = HoldTarget {
        namespace: namespace.unwrap_or_default(),
        pod,
        ip,
        ..Default::default()
    };
    let result = tokio::select! {
        r = hold_until_converged(&ctx.client, &target, &opts, |_| {}) => r,
        _ = stopping.wait_for(|stop| *stop) => {
            s.metrics.holds_in_progress.dec();
            s.metrics.holds.with_label_values(&["error"]).inc();
            return json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                serde_json::json!({"converged": false, "error": "this agent is shutting down before the pod converged everywhere; retry on another node's agent"}),
            );
        }
    };
    s.metrics.holds_in_progress.dec();
    match result {
        Ok(report) if report.converged => {
            s.metrics.holds.with_label_values(&["converged"]).inc();
            if annotate {
                if let Some(pod) = &report.pod {
                    crate::isolate::annotate_converged(&ctx.client, &report.namespace, pod).await;
                }
            }
            json_response(StatusCode::OK, serde_json::to_value(&report).unwrap_or_default())
        }
        Ok(report) => {
            s.metrics.holds.with_label_values(&["timeout"]).inc();
            let mut body = serde_json::to_value(&report).unwrap_or_default();
            body["error"] = serde_json::json!(format!(
                "timed out; still waiting on: {}",
                report.waiting_on().join(", ")
            ));
            json_response(StatusCode::GATEWAY_TIMEOUT, body)
        }
        Err(e @ (HoldError::PodNotFound { .. } | HoldError::PodHasNoIp { .. } | HoldError::IpNotFound { .. })) => {
            s.metrics.holds.with_label_values(&["not_found"]).inc();
            json_response(StatusCode::NOT_FOUND, serde_json::json!({"error": e.to_string()}))
        }
        Err(e @ HoldError::BadRequest(_)) => bad_request(e.to_string()),
        Err(e @ (HoldError::Api(_) | HoldError::Watch(_))) => {
            s.metrics.holds.with_label_values(&["error"]).inc();
            json_response(StatusCode::BAD_GATEWAY, serde_json::json!({"error": e.to_string()}))
        }
    }
}

async fn metrics_handler(State(s): State<AdminState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.encode(),
    )
}

async fn healthz(State(s): State<AdminState>) -> impl IntoResponse {
    match s.health.stalled(unix_now()) {
        None => (StatusCode::OK, "ok\n".to_string()),
        Some(why) => {
            s.metrics.liveness_failures.inc();
            (StatusCode::SERVICE_UNAVAILABLE, format!("unhealthy: {why}\n"))
        }
    }
}

async fn readyz(State(s): State<AdminState>) -> impl IntoResponse {
    let reasons = s.health.not_ready_reasons();
    let traffic = s.health.traffic_unavailable.lock().ok().and_then(|t| t.clone());
    if reasons.is_empty() {
        match traffic {
            None => (StatusCode::OK, "ready\n".to_string()),
            Some(why) => (
                StatusCode::OK,
                format!("ready; without the live-traffic check: {why}\n"),
            ),
        }
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
    hold: Option<HoldContext>,
) -> std::io::Result<(SocketAddr, impl std::future::Future<Output = std::io::Result<()>>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    Ok((local, async move {
        axum::serve(listener, router(metrics, health, hold)).await
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get(addr: SocketAddr, path: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    /// More concurrent holds than --max-holds: 429, before any API call.
    #[tokio::test]
    async fn holds_past_the_limit_get_429() {
        let metrics = Metrics::new().unwrap();
        let health = Arc::new(Health::default());
        let client = kube::Client::try_from(kube::Config::new("http://127.0.0.1:1".parse().unwrap())).unwrap();
        let (_stop, stopping) = tokio::sync::watch::channel(false);
        let hold = HoldContext {
            client,
            defaults: crate::hold::HoldOptions::default(),
            slots: Arc::new(tokio::sync::Semaphore::new(0)),
            stopping,
        };
        let (addr, server) = serve("127.0.0.1:0".parse().unwrap(), metrics, health, Some(hold))
            .await
            .unwrap();
        let task = tokio::spawn(server);
        let reply = get(addr, "/v1/hold?namespace=demo&pod=web-0&timeout=5s").await;
        assert!(reply.starts_with("HTTP/1.1 429"), "{reply}");
        assert!(reply.contains("too many holds"), "{reply}");
        task.abort();
    }

    #[test]
    fn a_loop_quiet_past_its_bound_is_stalled() {
        let h = Health::default();
        assert_eq!(h.stalled(1_000), None, "not started: not stalled");
        h.loop_beat.store(900, Ordering::Relaxed);
        h.stall_after.store(150, Ordering::Relaxed);
        assert_eq!(h.stalled(1_000), None);
        let why = h.stalled(1_100).unwrap();
        assert!(why.contains("200 s") && why.contains("150 s"), "{why}");
        h.stall_after.store(0, Ordering::Relaxed);
        assert_eq!(h.stalled(1_100), None, "no bound: never stalled");
    }

    /// A hung dataplane loop can no longer hide behind a 200 /healthz: the kubelet restarts it.
    #[tokio::test]
    async fn healthz_fails_and_counts_when_the_dataplane_loop_stalls() {
        let metrics = Metrics::new().unwrap();
        let health = Arc::new(Health::default());
        health.stall_after.store(60, Ordering::Relaxed);
        health.beat();
        let (addr, server) = serve("127.0.0.1:0".parse().unwrap(), metrics.clone(), health.clone(), None)
            .await
            .unwrap();
        let task = tokio::spawn(server);
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
        health.loop_beat.store(unix_now() - 120, Ordering::Relaxed);
        let reply = get(addr, "/healthz").await;
        assert!(reply.starts_with("HTTP/1.1 503"), "{reply}");
        assert!(reply.contains("no progress for 120 s"), "{reply}");
        assert_eq!(metrics.liveness_failures.get(), 1);
        task.abort();
    }
}
