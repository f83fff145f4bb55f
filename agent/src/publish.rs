//! Publication of this node's state as the status of its `NodeConvergence` object. Writes are
//! coalesced: at most one per `status_interval` while the state changes, otherwise one
//! heartbeat per `heartbeat_interval` — the budget of kubelet's node leases. It reads a draft
//! the core hands over; it never touches the tracker.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::api::{Patch, PatchParams, PostParams};
use kube::Api;
use tokio::sync::{mpsc, watch};

use crate::crd::{
    ConvergedEndpoint, NodeConvergence, NodeConvergenceSpec, NodeConvergenceStatus, PendingEndpoint, StaleEndpoint,
};
use crate::k8s::WatchScope;
use crate::model::EndpointKey;
use crate::model::Timestamp;
use crate::telemetry::Metrics;
use crate::tracker::{LagSample, PendingChange, PendingState, Tracker};

/// At most this many pending changes are listed in the status; the rest are counted.
pub const MAX_PENDING_LISTED: usize = 100;
const RECENT_LISTED: usize = 32;
const LAG_WINDOW: usize = 1000;
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything the status says except the heartbeat time.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StatusDraft {
    pub status: NodeConvergenceStatus,
    pub observed_resource_version: u64,
    pub observed_service_resource_version: u64,
}

/// Recent lags for percentiles and the `recent` list.
#[derive(Debug, Default)]
pub struct RecentLags {
    lags: VecDeque<f64>,
    recent: VecDeque<ConvergedEndpoint>,
}

impl RecentLags {
    pub fn push(&mut self, s: &LagSample) {
        self.lags.push_back(s.lag);
        if self.lags.len() > LAG_WINDOW {
            self.lags.pop_front();
        }
        self.recent.push_front(ConvergedEndpoint {
            namespace: s.key.port_name.service.namespace.clone(),
            service: s.key.port_name.service.name.clone(),
            endpoint: s.key.endpoint.to_string(),
            ip: s.key.endpoint.ip().to_string(),
            change: s.kind.as_str().into(),
            reason: s.reason.as_str().into(),
            lag_seconds: round_ms(s.lag),
            end_to_end_seconds: s.end_to_end.map(|e| round_ms(e.0)),
            programmed_time: s.programmed_at.to_rfc3339(),
        });
        self.recent.truncate(RECENT_LISTED);
    }

    fn percentile(&self, q: f64) -> Option<f64> {
        if self.lags.is_empty() {
            return None;
        }
        let mut v: Vec<f64> = self.lags.iter().copied().collect();
        v.sort_by(f64::total_cmp);
        Some(round_ms(v[((v.len() - 1) as f64 * q).round() as usize]))
    }
}

fn round_ms(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

fn pending_entry(c: &PendingChange) -> PendingEndpoint {
    PendingEndpoint {
        namespace: c.key.port_name.service.namespace.clone(),
        service: c.key.port_name.service.name.clone(),
        port: c.key.port_name.port.clone(),
        protocol: c.key.protocol.as_str().into(),
        endpoint: c.key.endpoint.to_string(),
        ip: c.key.endpoint.ip().to_string(),
        change: c.kind.as_str().into(),
        reason: c.reason.as_str().into(),
        state: match c.state {
            PendingState::Pending => "pending",
            PendingState::Unknown => "unknown",
            PendingState::TimedOut => "timed_out",
        }
        .into(),
        observed_time: c.observed.to_rfc3339(),
    }
}

fn stale_entry(k: &EndpointKey) -> StaleEndpoint {
    StaleEndpoint {
        namespace: k.port_name.service.namespace.clone(),
        service: k.port_name.service.name.clone(),
        port: k.port_name.port.clone(),
        protocol: k.protocol.as_str().into(),
        endpoint: k.endpoint.to_string(),
        ip: k.endpoint.ip().to_string(),
    }
}

/// Removed endpoints listed with their connection counts, at most (the most recent removals
/// of a large rollout are enough to read the cost).
const MAX_TRAFFIC_LISTED: usize = 100;

fn traffic_entry(t: &crate::traffic::EndpointTraffic) -> crate::crd::RemovedEndpointTraffic {
    let k = &t.key;
    crate::crd::RemovedEndpointTraffic {
        namespace: k.port_name.service.namespace.clone(),
        service: k.port_name.service.name.clone(),
        port: k.port_name.port.clone(),
        protocol: k.protocol.as_str().into(),
        endpoint: k.endpoint.to_string(),
        ip: k.endpoint.ip().to_string(),
        reason: t.reason.as_str().into(),
        before_converged: t.before_converged,
        after_converged: t.after_converged,
        converged: t.converged,
    }
}

/// Builds the draft from the core's state.
pub fn draft(
    tracker: &Tracker,
    lags: &RecentLags,
    (mode, backend): (&str, &str),
    health: (&str, Option<String>),
    (observed_resource_version, observed_service_resource_version): (u64, u64),
    scope: &WatchScope,
    traffic: &[crate::traffic::EndpointTraffic],
) -> StatusDraft {
    let pending: Vec<PendingEndpoint> = tracker.pending().take(MAX_PENDING_LISTED).map(pending_entry).collect();
    let count = tracker.pending_count();
    let stale: Vec<StaleEndpoint> = tracker.stale().take(MAX_PENDING_LISTED).map(stale_entry).collect();
    StatusDraft {
        observed_resource_version,
        observed_service_resource_version,
        status: NodeConvergenceStatus {
            mode: mode.into(),
            backend: backend.into(),
            health: health.0.into(),
            health_message: health.1,
            pending_truncated: count.saturating_sub(pending.len()) as u32,
            pending_count: count as u32,
            pending,
            stale_truncated: tracker.stale_endpoints().saturating_sub(stale.len()) as u32,
            stale,
            stale_unknown: ["ipv4", "ipv6"]
                .iter()
                .zip(tracker.stale_unknown())
                .filter(|(_, unknown)| *unknown)
                .map(|(f, _)| f.to_string())
                .collect(),
            observed_resource_version: observed_resource_version.to_string(),
            observed_service_resource_version: observed_service_resource_version.to_string(),
            watch_namespace: scope.namespace.clone().filter(|n| !n.is_empty()),
            watch_label_selector: scope.label_selector.clone().filter(|s| !s.is_empty()),
            lag_p50_seconds: lags.percentile(0.5),
            lag_p99_seconds: lags.percentile(0.99),
            lag_samples: lags.lags.len() as u32,
            recent: lags.recent.iter().cloned().collect(),
            // Violations first, so that they are never cut.
            traffic: {
                let mut t: Vec<_> = traffic.iter().collect();
                t.sort_by_key(|t| std::cmp::Reverse(t.after_converged));
                t.into_iter().take(MAX_TRAFFIC_LISTED).map(traffic_entry).collect()
            },
            heartbeat_time: String::new(),
            agent_version: env!("CARGO_PKG_VERSION").into(),
        },
    }
}

pub struct Publisher {
    pub api: Api<NodeConvergence>,
    pub node: String,
    pub status_interval: Duration,
    pub heartbeat_interval: Duration,
    /// Sustained budget: on average at most one write per this interval (kubelet's node lease
    /// renews every 10 s), with bursts of up to `burst` writes at `status_interval`.
    pub budget_interval: Duration,
    pub burst: u32,
    pub metrics: Metrics,
}

/// A token bucket: `burst` tokens, refilled at one per `every`.
#[derive(Debug)]
pub struct WriteBudget {
    tokens: f64,
    burst: f64,
    every: Duration,
    refilled: Instant,
}

impl WriteBudget {
    pub fn new(burst: u32, every: Duration, now: Instant) -> Self {
        Self {
            tokens: f64::from(burst),
            burst: f64::from(burst),
            every,
            refilled: now,
        }
    }

    /// When the next write may happen (`now` if a token is available).
    pub fn next_allowed(&mut self, now: Instant) -> Instant {
        let gained = now.saturating_duration_since(self.refilled).as_secs_f64() / self.every.as_secs_f64().max(1e-9);
        self.tokens = (self.tokens + gained).min(self.burst);
        self.refilled = now;
        if self.tokens >= 1.0 {
            now
        } else {
            now + self.every.mul_f64(1.0 - self.tokens)
        }
    }

    pub fn spend(&mut self) {
        self.tokens -= 1.0;
    }
}

/// The publisher's request for a status draft, answered by the agent's core.
pub type DraftRequest = tokio::sync::oneshot::Sender<Arc<StatusDraft>>;

impl Publisher {
    /// Writes the status on its own schedule: woken by `changed` (or the heartbeat), it waits
    /// out the status interval and its write budget, then pulls a fresh draft through `pull`
    /// and writes it if it differs from the last one written (or a heartbeat is due).
    pub async fn run(self, mut changed: watch::Receiver<u64>, pull: mpsc::Sender<DraftRequest>) -> anyhow::Result<()> {
        let mut written: Option<Arc<StatusDraft>> = None;
        let mut last_write: Option<Instant> = None;
        let mut budget = WriteBudget::new(self.burst.max(1), self.budget_interval, Instant::now());
        loop {
            let heartbeat_due = last_write.map_or_else(Instant::now, |t| t + self.heartbeat_interval);
            tokio::select! {
                c = changed.changed() => if c.is_err() { return Ok(()) },
                _ = tokio::time::sleep_until(heartbeat_due.into()) => {}
            }
            // Coalesce: no more than one write per status interval, and within the budget.
            if let Some(t) = last_write {
                tokio::time::sleep_until((t + self.status_interval).into()).await;
            }
            let allowed = budget.next_allowed(Instant::now());
            tokio::time::sleep_until(allowed.into()).await;
            changed.borrow_and_update();
            let (reply, answer) = tokio::sync::oneshot::channel();
            if pull.send(reply).await.is_err() {
                return Ok(());
            }
            let Ok(draft) = answer.await else { return Ok(()) };
            let heartbeat = last_write.is_none_or(|t| t.elapsed() >= self.heartbeat_interval);
            if !heartbeat && written.as_deref() == Some(&*draft) {
                continue;
            }
            last_write = Some(Instant::now());
            budget.spend();
            match tokio::time::timeout(WRITE_TIMEOUT, self.write(&draft)).await {
                Ok(Ok(())) => {
                    self.metrics.status_writes.with_label_values(&["ok"]).inc();
                    written = Some(draft);
                }
                Ok(Err(e)) => {
                    self.metrics.status_writes.with_label_values(&[error_kind(&e)]).inc();
                    tracing::warn!(node = %self.node, error = %e, "writing the NodeConvergence status failed; retrying (RBAC: the agent needs get/create on nodeconvergences and patch on nodeconvergences/status)");
                }
                Err(_) => {
                    self.metrics.status_writes.with_label_values(&["timeout"]).inc();
                    tracing::warn!(node = %self.node, "writing the NodeConvergence status timed out");
                }
            }
        }
    }

    async fn write(&self, draft: &StatusDraft) -> Result<(), kube::Error> {
        let mut status = draft.status.clone();
        status.heartbeat_time = Timestamp::now().to_rfc3339();
        let patch = crate::crd::status_merge_patch(&status);
        match self
            .api
            .patch_status(&self.node, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Err(kube::Error::Api(e)) if e.code == 404 => {
                let obj = NodeConvergence::new(
                    &self.node,
                    NodeConvergenceSpec {
                        node_name: self.node.clone(),
                    },
                );
                match self.api.create(&PostParams::default(), &obj).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(e)) if e.code == 409 => {}
                    Err(e) => return Err(e),
                }
                self.api
                    .patch_status(&self.node, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .map(|_| ())
            }
            other => other.map(|_| ()),
        }
    }
}

fn error_kind(e: &kube::Error) -> &'static str {
    match e {
        kube::Error::Api(s) if s.code == 403 => "forbidden",
        kube::Error::Api(s) if s.code == 409 => "conflict",
        kube::Error::Api(_) => "api_error",
        _ => "error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_allows_bursts_then_one_write_per_interval() {
        let t0 = Instant::now();
        let mut b = WriteBudget::new(3, Duration::from_secs(10), t0);
        for _ in 0..3 {
            assert_eq!(b.next_allowed(t0), t0);
            b.spend();
        }
        let next = b.next_allowed(t0);
        assert_eq!(next, t0 + Duration::from_secs(10));
        assert_eq!(
            b.next_allowed(t0 + Duration::from_secs(10)),
            t0 + Duration::from_secs(10)
        );
        b.spend();
        assert!(b.next_allowed(t0 + Duration::from_secs(15)) > t0 + Duration::from_secs(15));
    }

    #[test]
    fn percentiles_and_recent_list_are_bounded() {
        let mut lags = RecentLags::default();
        assert_eq!(lags.percentile(0.99), None);
        let key = crate::model::EndpointKey::new(
            crate::model::ServicePortName::new("ns", "svc", "p"),
            crate::model::Protocol::Tcp,
            "10.0.0.1:80".parse().unwrap(),
        );
        for i in 0..2000 {
            lags.push(&LagSample {
                key: key.clone(),
                kind: crate::model::ChangeKind::Removed,
                reason: crate::model::ChangeReason::Deleted,
                lag: f64::from(i) / 1000.0,
                lag_clamped: false,
                end_to_end: None,
                end_to_end_clamped: false,
                programmed_at: Timestamp::from_millis(0),
                error_bound: Duration::ZERO,
                read_trigger: crate::tracker::ReadTrigger::Event,
                resource_version: 1,
                trigger: None,
            });
        }
        assert_eq!(lags.lags.len(), LAG_WINDOW);
        assert_eq!(lags.recent.len(), RECENT_LISTED);
        assert_eq!(lags.percentile(0.5), Some(1.5));
        assert_eq!(lags.percentile(0.99), Some(1.989));
    }
}
