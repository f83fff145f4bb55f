//! Prometheus metrics and log setup. One registry is built at start-up and each metric family
//! is registered here; metric labels never carry pod names, endpoint IPs or error text.

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::model::Timestamp;
use crate::tracker::{LagSample, Outcome, PendingState, Tracker};

/// Lag buckets: 1 ms doubling to 16.4 s (kube-proxy's sync_proxy_rules buckets) merged with
/// the landmarks of kube-proxy's network_programming_duration buckets up to 300 s.
pub const LAG_BUCKETS: &[f64] = &[
    0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.25, 0.256, 0.5, 0.512, 1.0, 1.024, 2.0, 2.048, 4.096,
    5.0, 8.192, 10.0, 16.384, 30.0, 60.0, 120.0, 180.0, 240.0, 300.0,
];

const READ_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub lag: HistogramVec,
    pub end_to_end_lag: HistogramVec,
    pub lag_clamped: IntCounterVec,
    pub changes: IntCounterVec,
    pub pending: IntGaugeVec,
    pub oldest_pending: prometheus::Gauge,
    pub stale_endpoints: IntGauge,
    pub draining_endpoints: IntGauge,
    pub draining_connections: IntGaugeVec,
    pub holds_in_progress: IntGauge,
    pub holds: IntCounterVec,
    pub dataplane_reads: IntCounterVec,
    pub dataplane_read_errors: IntCounterVec,
    pub dataplane_read_duration: Histogram,
    pub watch_restarts: IntCounterVec,
    pub watch_errors: IntCounterVec,
    pub status_writes: IntCounterVec,
    pub malformed: IntCounterVec,
    pub liveness_failures: IntCounter,
    pub connections_after_removal: IntCounterVec,
    pub traffic_check_available: IntGauge,
    pub traffic_events_lost: IntCounter,
    pub info: GaugeVec,
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help).namespace("kube_converge")
}

fn hist(name: &str, help: &str, buckets: &[f64]) -> HistogramOpts {
    HistogramOpts::new(name, help)
        .namespace("kube_converge")
        .buckets(buckets.to_vec())
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let m = Self {
            lag: HistogramVec::new(
                hist("lag_seconds", "Time from the agent observing an endpoint change to this node's kernel reflecting it.", LAG_BUCKETS),
                &["mode", "change", "reason"],
            )?,
            end_to_end_lag: HistogramVec::new(
                hist("end_to_end_lag_seconds", "Time from the API-side trigger of an endpoint change to this node's kernel reflecting it (negative values clamped to 0).", LAG_BUCKETS),
                &["mode", "change", "reason", "trigger_source"],
            )?,
            lag_clamped: IntCounterVec::new(
                opts("lag_clamped_total", "Lags clamped to zero: `lag` when kube-proxy was faster than the agent's watch, `end_to_end` on clock skew."),
                &["lag"],
            )?,
            changes: IntCounterVec::new(
                opts("changes_total", "Endpoint changes by outcome (converged, converged_unsampled, timed_out, superseded)."),
                &["change", "outcome"],
            )?,
            pending: IntGaugeVec::new(opts("pending_changes", "Endpoint changes not yet reflected in this node's kernel, by state."), &["state"])?,
            oldest_pending: prometheus::Gauge::with_opts(opts(
                "oldest_pending_change_seconds",
                "Age of the oldest pending change; a growing value means kube-proxy is stuck on this node.",
            ))?,
            stale_endpoints: IntGauge::with_opts(opts("stale_endpoints", "Endpoints this node still routes that are no longer expected and no longer pending."))?,
            draining_endpoints: IntGauge::with_opts(opts(
                "draining_endpoints",
                "IPVS destinations with weight 0: they take no new connections while old ones drain.",
            ))?,
            draining_connections: IntGaugeVec::new(
                opts("draining_connections", "Connections still on draining IPVS destinations, by state (active, inactive)."),
                &["state"],
            )?,
            holds_in_progress: IntGauge::with_opts(opts("holds_in_progress", "Hold requests currently waiting for convergence."))?,
            holds: IntCounterVec::new(
                opts("holds_total", "Finished hold requests by outcome (converged, timeout, not_found, error)."),
                &["outcome"],
            )?,
            dataplane_reads: IntCounterVec::new(
                opts("dataplane_reads_total", "Dataplane reads by trigger (event, poll, pending, initial) and scope (full, or targeted at the service ports with pending changes)."),
                &["trigger", "scope"],
            )?,
            dataplane_read_errors: IntCounterVec::new(opts("dataplane_read_errors_total", "Dataplane read errors by kind."), &["kind"])?,
            dataplane_read_duration: Histogram::with_opts(hist("dataplane_read_duration_seconds", "Duration of one full dataplane read.", READ_BUCKETS))?,
            watch_restarts: IntCounterVec::new(opts("watch_restarts_total", "Relists of a watched resource (after 410 Gone or a broken watch)."), &["resource"])?,
            watch_errors: IntCounterVec::new(opts("watch_errors_total", "Watch errors by resource and kind."), &["resource", "kind"])?,
            status_writes: IntCounterVec::new(opts("status_writes_total", "Node status writes by result."), &["result"])?,
            malformed: IntCounterVec::new(opts("malformed_objects_total", "Objects or endpoints skipped as malformed, by reason."), &["reason"])?,
            liveness_failures: IntCounter::with_opts(opts(
                "liveness_failures_total",
                "/healthz answers that failed because the dataplane loop made no progress within its bound.",
            ))?,
            connections_after_removal: IntCounterVec::new(
                opts(
                    "connections_after_removal_total",
                    "New connections this node still sent to a removed endpoint (conntrack), by removal reason and phase: before_converged (the lag's cost) or after_converged (after the agent reported the removal programmed: a safety violation).",
                ),
                &["reason", "phase"],
            )?,
            traffic_check_available: IntGauge::with_opts(opts(
                "traffic_check_available",
                "1 while conntrack events can be read (the live-traffic check works), 0 when they cannot (see /readyz), -1 before the first removal needed them.",
            ))?,
            traffic_events_lost: IntCounter::with_opts(opts(
                "traffic_events_lost_total",
                "Times the conntrack event socket overflowed: some connections were not counted.",
            ))?,
            info: GaugeVec::new(opts("info", "Agent information: dataplane mode, backend and version."), &["mode", "backend", "version"])?,
            registry,
        };
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(m.lag.clone()),
            Box::new(m.end_to_end_lag.clone()),
            Box::new(m.lag_clamped.clone()),
            Box::new(m.changes.clone()),
            Box::new(m.pending.clone()),
            Box::new(m.oldest_pending.clone()),
            Box::new(m.stale_endpoints.clone()),
            Box::new(m.draining_endpoints.clone()),
            Box::new(m.draining_connections.clone()),
            Box::new(m.holds_in_progress.clone()),
            Box::new(m.holds.clone()),
            Box::new(m.dataplane_reads.clone()),
            Box::new(m.dataplane_read_errors.clone()),
            Box::new(m.dataplane_read_duration.clone()),
            Box::new(m.watch_restarts.clone()),
            Box::new(m.watch_errors.clone()),
            Box::new(m.status_writes.clone()),
            Box::new(m.malformed.clone()),
            Box::new(m.liveness_failures.clone()),
            Box::new(m.connections_after_removal.clone()),
            Box::new(m.traffic_check_available.clone()),
            Box::new(m.traffic_events_lost.clone()),
            Box::new(m.info.clone()),
        ];
        for c in collectors {
            m.registry.register(c)?;
        }
        // Known label values start at zero, so every series exists from the first scrape and
        // rate() and alerts see a 0 -> 1 step instead of a series appearing.
        for state in ["pending", "unknown", "timed_out"] {
            m.pending.with_label_values(&[state]).set(0);
        }
        for kind in [
            "generation_changed",
            "generation_unreadable",
            "unparseable",
            "netns",
            "netlink",
            "not_found",
            "partial",
        ] {
            m.dataplane_read_errors.with_label_values(&[kind]);
        }
        for resource in ["endpointslices", "services"] {
            m.watch_restarts.with_label_values(&[resource]);
        }
        for outcome in ["converged", "timeout", "not_found", "error"] {
            m.holds.with_label_values(&[outcome]);
        }
        for result in ["ok", "forbidden", "conflict", "api_error", "timeout", "error"] {
            m.status_writes.with_label_values(&[result]);
        }
        for change in ["removed", "added"] {
            for outcome in ["converged", "converged_unsampled", "timed_out", "superseded"] {
                m.changes.with_label_values(&[change, outcome]);
            }
        }
        for trigger in ["event", "poll", "pending", "initial"] {
            for scope in ["full", "targeted"] {
                m.dataplane_reads.with_label_values(&[trigger, scope]);
            }
        }
        for state in ["active", "inactive"] {
            m.draining_connections.with_label_values(&[state]).set(0);
        }
        for reason in ["deleted", "isolated", "unready", "service_deleted"] {
            for phase in ["before_converged", "after_converged"] {
                m.connections_after_removal.with_label_values(&[reason, phase]);
            }
        }
        m.traffic_check_available.set(-1);
        m.set_info("unknown", "unknown");
        for lag in ["lag", "end_to_end"] {
            m.lag_clamped.with_label_values(&[lag]);
        }
        for resource in ["endpointslices", "services"] {
            for kind in ["initial_list", "watch_start", "watch_error", "watch_failed", "other"] {
                m.watch_errors.with_label_values(&[resource, kind]);
            }
        }
        for reason in [
            "bad_protocol",
            "invalid_ip",
            "missing_port",
            "no_address",
            "missing_service_label",
            "fqdn",
        ] {
            m.malformed.with_label_values(&[reason]);
        }
        Ok(m)
    }

    #[cfg(test)]
    fn families(&self) -> Vec<String> {
        self.registry.gather().iter().map(|f| f.name().to_string()).collect()
    }

    pub fn set_info(&self, mode: &str, backend: &str) {
        self.info.reset();
        self.info
            .with_label_values(&[mode, backend, env!("CARGO_PKG_VERSION")])
            .set(1.0);
        // The lag series of this mode exist at zero before the first change: a series that
        // appears with its first observation already at 1 shows no increase() or rate(), so
        // the dashboard's lag panels would miss the first removal.
        use crate::model::{ChangeKind, ChangeReason, TriggerSource};
        let pairs = [
            (ChangeKind::Removed, ChangeReason::Deleted),
            (ChangeKind::Removed, ChangeReason::Isolated),
            (ChangeKind::Removed, ChangeReason::Unready),
            (ChangeKind::Removed, ChangeReason::ServiceDeleted),
            (ChangeKind::Added, ChangeReason::Added),
        ];
        for (change, reason) in pairs {
            let (c, r) = (change.as_str(), reason.as_str());
            self.lag.with_label_values(&[mode, c, r]);
            for source in [
                TriggerSource::LastChangeTriggerTime,
                TriggerSource::PodDeletion,
                TriggerSource::ManagedFields,
            ] {
                self.end_to_end_lag.with_label_values(&[mode, c, r, source.as_str()]);
            }
        }
    }

    pub fn record_outcomes(&self, mode: &str, outcomes: &[Outcome]) {
        for o in outcomes {
            match o {
                Outcome::Converged(s) => self.record_sample(mode, s),
                Outcome::ConvergedUnsampled { kind, .. } => self
                    .changes
                    .with_label_values(&[kind.as_str(), "converged_unsampled"])
                    .inc(),
                Outcome::TimedOut { kind, .. } => self.changes.with_label_values(&[kind.as_str(), "timed_out"]).inc(),
                Outcome::Superseded { kind, .. } => {
                    self.changes.with_label_values(&[kind.as_str(), "superseded"]).inc()
                }
            }
        }
    }

    fn record_sample(&self, mode: &str, s: &LagSample) {
        let (change, reason) = (s.kind.as_str(), s.reason.as_str());
        self.changes.with_label_values(&[change, "converged"]).inc();
        self.lag.with_label_values(&[mode, change, reason]).observe(s.lag);
        if s.lag_clamped {
            self.lag_clamped.with_label_values(&["lag"]).inc();
        }
        if let Some((e2e, source)) = s.end_to_end {
            self.end_to_end_lag
                .with_label_values(&[mode, change, reason, source.as_str()])
                .observe(e2e);
        }
        if s.end_to_end_clamped {
            self.lag_clamped.with_label_values(&["end_to_end"]).inc();
        }
    }

    /// Refreshes the gauges derived from the tracker's state.
    pub fn refresh_gauges(&self, tracker: &Tracker, now: Timestamp) {
        let (mut pending, mut unknown, mut timed_out) = (0, 0, 0);
        for c in tracker.pending() {
            match c.state {
                PendingState::Pending => pending += 1,
                PendingState::Unknown => unknown += 1,
                PendingState::TimedOut => timed_out += 1,
            }
        }
        self.pending.with_label_values(&["pending"]).set(pending);
        self.pending.with_label_values(&["unknown"]).set(unknown);
        self.pending.with_label_values(&["timed_out"]).set(timed_out);
        self.oldest_pending.set(tracker.oldest_pending_age(now));
        self.stale_endpoints.set(tracker.stale_endpoints() as i64);
    }

    pub fn encode(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Logs go to stderr; `RUST_LOG` overrides the default filter (`default_level`).
pub fn init_logging(format: LogFormat, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// Hands heap pages that are free again back to the kernel. glibc keeps memory freed by large
/// transient structures (a full dataplane read, the initial lists) in its per-thread arenas,
/// where it counts as the agent's RSS until the next peak reuses it. The agent binary's Rust
/// heap is jemalloc's (main.rs), but libnftnl's rule objects still come from glibc's malloc.
/// Costs a few milliseconds.
#[allow(unsafe_code)] // one libc call with no preconditions
pub fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns unused pages of glibc's own heaps to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Completes on SIGINT or SIGTERM (what an SRE's Ctrl-C and a `kill` or a container stop send).
pub async fn stop_signal() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn lag_series_exist_at_zero_once_the_mode_is_known() {
        let m = Metrics::new().unwrap();
        m.set_info("iptables", "nft");
        let text = m.encode();
        for want in [
            r#"kube_converge_lag_seconds_count{change="removed",mode="iptables",reason="deleted"} 0"#,
            r#"kube_converge_lag_seconds_count{change="added",mode="iptables",reason="added"} 0"#,
            r#"kube_converge_end_to_end_lag_seconds_count{change="removed",mode="iptables",reason="isolated",trigger_source="last_change_trigger_time"} 0"#,
        ] {
            assert!(text.contains(want), "{want} missing");
        }
    }
    use super::*;

    /// Issue 17: every metric of the README's table is in the first scrape (counters at zero),
    /// except histograms with labels, whose series appear with their first sample.
    #[test]
    fn every_documented_metric_is_exported_from_the_start() {
        let readme = include_str!("../../README.md");
        let m = Metrics::new().unwrap();
        let families = m.families();
        let mut checked = 0;
        for line in readme.lines() {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let [_, name, kind, labels, ..] = cells.as_slice() else {
                continue;
            };
            let Some(name) = name.strip_prefix('`').and_then(|n| n.strip_suffix('`')) else {
                continue;
            };
            if !["counter", "gauge", "histogram"].contains(kind) || (*kind == "histogram" && !labels.is_empty()) {
                continue;
            }
            let full = format!("kube_converge_{name}");
            assert!(
                families.contains(&full),
                "{full} is documented but not in the first scrape: {families:?}"
            );
            checked += 1;
        }
        assert!(checked >= 15, "read only {checked} metrics from the README's table");
    }

    #[test]
    fn buckets_are_sorted_and_span_1ms_to_300s() {
        assert!(LAG_BUCKETS.windows(2).all(|w| w[0] < w[1]));
        assert_eq!((LAG_BUCKETS[0], *LAG_BUCKETS.last().unwrap()), (0.001, 300.0));
    }

    #[test]
    fn registry_exports_every_family() {
        let m = Metrics::new().unwrap();
        m.set_info("iptables", "nft");
        m.dataplane_reads.with_label_values(&["event", "full"]).inc();
        let text = m.encode();
        for name in [
            "kube_converge_info",
            "kube_converge_pending_changes",
            "kube_converge_dataplane_reads_total",
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
    }
}
