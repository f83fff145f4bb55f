//! The node agent's runtime: watchers and the dataplane loop feed one core task that owns the
//! caches and the tracker. Work flows stream → bounded channel → core; the core never does
//! I/O itself, so a slow API server or a slow read cannot corrupt its state.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::ResourceExt;
use tokio::sync::mpsc;

use crate::admin::{self, Health};
use crate::dataplane::conntrack::{self, ConntrackEvent};
use crate::dataplane::{iptables::Backend, DataplaneSnapshot, Mode, ReadError};
use crate::expected::{expect_service_with, Semantics, ServiceSpec, SliceRecord};
use crate::k8s::{self, SliceError, SliceProblem, WatchMsg, WatchScope};
use crate::model::{ServiceRef, Timestamp};
use crate::netns::NetNs;
use crate::resolve::Resolver;
use crate::telemetry::Metrics;
use crate::tracker::{Reading, ReadingMeta, ReadingOutcome, Tracker, TrackerConfig};
use crate::traffic::TrafficWatch;
use schedule::{ReadPlan, ReadScheduler};

#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub node_name: String,
    pub scope: WatchScope,
    pub mode: Option<Mode>,
    pub backend: Option<Backend>,
    pub netns: NetNs,
    pub poll_interval: Duration,
    pub resync_interval: Duration,
    pub change_timeout: Duration,
    pub listen: SocketAddr,
    /// Sees every finished lag measurement (the simulation plugs in its table).
    pub observer: Option<Arc<dyn LagObserver>>,
    /// Publication of the NodeConvergence status; `None` disables it.
    pub status: Option<StatusConfig>,
    /// Concurrent `/v1/hold` requests served at most.
    pub max_holds: usize,
    /// How long connections to a removed endpoint are still counted after its removal
    /// converged (conntrack); zero turns the live-traffic check off.
    pub traffic_window: Duration,
    /// Test-only: a deliberately broken agent whose readings drop every endpoint being
    /// removed, so it reports removals converged before the kernel made them. The live-traffic check
    /// must catch it (its `after_converged` count). Never set outside tests.
    #[doc(hidden)]
    pub fault_report_removals_early: bool,
}

/// Sees every finished lag measurement as the agent records it. The agent itself needs none;
/// the simulated cluster plugs one in to compare each node's lag with its kernel truth.
pub trait LagObserver: Send + Sync + std::fmt::Debug {
    fn lag_measured(&self, sample: &crate::tracker::LagSample);
}

#[derive(Clone, Copy, Debug)]
pub struct StatusConfig {
    pub status_interval: Duration,
    pub heartbeat_interval: Duration,
    pub budget_interval: Duration,
    pub burst: u32,
}

type SliceId = (String, String);

#[derive(Debug)]
struct SliceItem {
    id: SliceId,
    resource_version: u64,
    record: Result<(SliceRecord, Vec<SliceProblem>), SliceError>,
}

#[derive(Debug)]
struct ServiceItem {
    service: ServiceRef,
    spec: Option<ServiceSpec>,
    resource_version: u64,
}

#[derive(Debug)]
enum Input {
    Slice(WatchMsg<SliceItem>),
    Service(WatchMsg<ServiceItem>),
    Reading {
        mode: Mode,
        backend: String,
        result: Result<DataplaneSnapshot, ReadError>,
        meta: ReadingMeta,
        took: Duration,
    },
    ReaderUnavailable(ReadError, ReadingMeta),
    /// This node's zone label changed.
    Zone(Option<String>),
    /// New connections to watched endpoints, or the conntrack listener's trouble.
    Traffic(ConntrackEvent),
    /// Whether conntrack events can be read (`Err`: why not).
    TrafficCheck(Result<(), String>),
}

/// How long a shutting-down agent waits for its in-flight holds' replies to go out.
const SHUTDOWN_DRAIN: Duration = Duration::from_secs(5);

/// Runs the agent with kube's standard config discovery until an error or Ctrl-C.
pub async fn run(client: kube::Client, config: AgentConfig, metrics: Metrics) -> anyhow::Result<()> {
    // SIGTERM (what the kubelet sends, also to PID 1, which has no default handler) and
    // SIGINT are handled alike.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let interrupted = async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        }
    };
    run_with_client(client, config, metrics, interrupted).await
}

/// Runs the agent with a given client (tests and the simulation use the fake API server) until
/// a task fails or `shutdown` completes.
pub async fn run_with_client(
    client: kube::Client,
    config: AgentConfig,
    metrics: Metrics,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let health = Arc::new(Health::default());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let slots = Arc::new(tokio::sync::Semaphore::new(config.max_holds));
    let hold = admin::HoldContext {
        client: client.clone(),
        defaults: crate::hold::HoldOptions::default(),
        slots: slots.clone(),
        stopping: stop_rx,
    };
    let (addr, server) = admin::serve(config.listen, metrics.clone(), health.clone(), Some(hold))
        .await
        .with_context(|| format!("binding the admin server to {}", config.listen))?;
    tracing::info!(%addr, node = %config.node_name, "admin server listening (/metrics, /healthz, /readyz)");

    let (tx, rx) = mpsc::channel::<Input>(1024);
    let scope = config.scope.clone();
    let slices = k8s::watch::<EndpointSlice, _>(client.clone(), &scope, |s| SliceItem {
        id: (s.namespace().unwrap_or_default(), s.name_any()),
        resource_version: s.resource_version().and_then(|v| v.parse().ok()).unwrap_or(0),
        record: k8s::slice_record(s),
    });
    let services = k8s::watch::<Service, _>(client.clone(), &scope, |s| ServiceItem {
        service: ServiceRef::new(s.namespace().unwrap_or_default(), s.name_any()),
        spec: k8s::service_spec(s),
        resource_version: s.resource_version().and_then(|v| v.parse().ok()).unwrap_or(0),
    });
    let (plan_tx, plan_rx) = tokio::sync::watch::channel(ReadPlan::default());

    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(async move { server.await.context("admin server failed") });
    tasks.spawn(forward(slices, tx.clone(), Input::Slice));
    tasks.spawn(forward(services, tx.clone(), Input::Service));
    tasks.spawn(watch_zone(client.clone(), config.node_name.clone(), tx.clone()));
    // Liveness: the loop goes round at least every resync interval (or 5 s without a reader),
    // plus one read whose every kernel reply has a deadline.
    let bound = (config.resync_interval.max(Duration::from_secs(5)) * 3 + Duration::from_secs(60)).as_secs();
    health.stall_after.store(bound, Ordering::Relaxed);
    health.beat();
    let (targets_tx, targets_rx) = tokio::sync::watch::channel(Arc::new(TrafficTargets::default()));
    if !config.traffic_window.is_zero() {
        tasks.spawn(traffic_listener(config.netns.clone(), targets_rx, tx.clone()));
    }
    tasks.spawn(ReadScheduler::new(config.clone(), tx, plan_rx, health.clone()).run());
    // The publisher pulls a status draft from the core when it is about to write (at most once
    // per status interval and within its budget); the core only tells it that something changed.
    let (changed_tx, changed_rx) = tokio::sync::watch::channel(0u64);
    let (pull_tx, pull_rx) = mpsc::channel::<crate::publish::DraftRequest>(1);
    if let Some(sc) = config.status {
        let publisher = crate::publish::Publisher {
            api: kube::Api::all(client.clone()),
            node: config.node_name.clone(),
            status_interval: sc.status_interval,
            heartbeat_interval: sc.heartbeat_interval,
            budget_interval: sc.budget_interval,
            burst: sc.burst,
            metrics: metrics.clone(),
        };
        tasks.spawn(publisher.run(changed_rx, pull_tx));
    }
    let mut core = Core::new(&config, metrics, health, plan_tx, changed_tx);
    core.traffic_targets = targets_tx;
    tasks.spawn(core.run(rx, pull_rx));

    // Every task runs for the agent's lifetime: the first one to end, ends the agent.
    let first = tokio::select! {
        r = tasks.join_next() => r,
        _ = shutdown => {
            // New holds get 503 and the ones in flight answer now (not converged yet); give
            // their replies a bounded moment to go out, then stop.
            let _ = stop_tx.send(true);
            let drained = async {
                while slots.available_permits() < config.max_holds {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            };
            if tokio::time::timeout(SHUTDOWN_DRAIN, drained).await.is_err() {
                tracing::warn!("holds still answering after {SHUTDOWN_DRAIN:?}; stopping anyway");
            }
            tasks.abort_all();
            return Ok(());
        }
    };
    tasks.abort_all();
    task_outcome(first)
}

/// What the first agent task to end means. Every task runs for the agent's life: one that
/// ends, even without an error, leaves the agent blind. Fail loudly (exit 1) so the kubelet
/// restarts it, rather than run on half.
fn task_outcome(first: Option<Result<anyhow::Result<()>, tokio::task::JoinError>>) -> anyhow::Result<()> {
    match first {
        None => Ok(()),
        Some(Ok(Ok(()))) => Err(anyhow::anyhow!(
            "an agent task stopped unexpectedly; exiting so that the agent is restarted whole"
        )),
        Some(Ok(Err(e))) => Err(e),
        Some(Err(e)) => Err(anyhow::anyhow!("agent task panicked: {e}")),
    }
}

/// Follows this node's `topology.kubernetes.io/zone` label (kube-proxy applies zone hints
/// against it).
async fn watch_zone(client: kube::Client, node: String, tx: mpsc::Sender<Input>) -> anyhow::Result<()> {
    use kube::runtime::watcher;
    let api: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(client);
    let config = watcher::Config::default().fields(&format!("metadata.name={node}"));
    let mut stream = std::pin::pin!(watcher::watcher(api, config));
    let mut failures = 0u32;
    while let Some(ev) = stream.next().await {
        let zone = match ev {
            Ok(watcher::Event::Apply(n) | watcher::Event::InitApply(n)) => n.labels().get(k8s::ZONE_LABEL).cloned(),
            Ok(_) => continue,
            Err(e) => {
                failures = failures.saturating_add(1);
                if failures == 1 {
                    let cause = k8s::failure_cause(&e.to_string());
                    tracing::warn!(error = %e, node, "watching this node's zone label failed, retrying with backoff: {cause}");
                }
                tokio::time::sleep(k8s::retry_delay(failures, k8s::jitter())).await;
                continue;
            }
        };
        failures = 0;
        if tx.send(Input::Zone(zone)).await.is_err() {
            break;
        }
    }
    Ok(())
}

async fn forward<T>(
    stream: impl Stream<Item = WatchMsg<T>> + Send + 'static,
    tx: mpsc::Sender<Input>,
    wrap: fn(WatchMsg<T>) -> Input,
) -> anyhow::Result<()> {
    let mut stream = std::pin::pin!(stream);
    let mut failures = 0u32;
    while let Some(msg) = stream.next().await {
        if let WatchMsg::Failed { .. } = &msg {
            // kube-runtime's watcher retries on the next poll; back off exponentially, with
            // jitter, so an unreachable API server is not hammered by every agent in step.
            let failed = tx.send(wrap(msg)).await.is_err();
            if failed {
                break;
            }
            failures = failures.saturating_add(1);
            tokio::time::sleep(k8s::retry_delay(failures, k8s::jitter())).await;
            continue;
        }
        failures = 0;
        if tx.send(wrap(msg)).await.is_err() {
            break;
        }
    }
    Ok(())
}

/// The endpoints whose new connections the conntrack listener reports.
type TrafficTargets = std::collections::HashSet<(crate::model::Protocol, SocketAddr)>;

/// A connection after its removal converged: the agent said "programmed" and the kernel still
/// sent a new connection there. Logged loudly; the metric's `after_converged` counts it.
fn report_violations(violations: &[crate::traffic::Violation]) {
    for v in violations {
        tracing::error!(key = %v.key, reason = v.reason.as_str(), programmed_at = %v.programmed_at.to_rfc3339(),
            connection_at = %v.connection_at.to_rfc3339(),
            "a new connection reached a removed endpoint after this node reported the removal programmed");
    }
}

/// Resolves when nothing is watched any more (`Err`: the core is gone).
async fn idle(targets: &mut tokio::sync::watch::Receiver<Arc<TrafficTargets>>) -> Result<(), ()> {
    targets.wait_for(|t| t.is_empty()).await.map(|_| ()).map_err(|_| ())
}

/// Runs the conntrack listener while there are endpoints to watch, and stops it when there are
/// none (an idle node pays nothing). Says once per start whether events can be read.
async fn traffic_listener(
    netns: NetNs,
    mut targets: tokio::sync::watch::Receiver<Arc<TrafficTargets>>,
    tx: mpsc::Sender<Input>,
) -> anyhow::Result<()> {
    use std::sync::atomic::AtomicBool;
    loop {
        let watched = targets.wait_for(|t| !t.is_empty()).await.map(|_| ());
        if watched.is_err() {
            return Ok(());
        }
        let ns = netns.clone();
        let filter = targets.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let (etx, mut events) = mpsc::unbounded_channel();
        let stop_thread = stop.clone();
        let started = tokio::task::spawn_blocking(move || {
            conntrack::availability(&ns)?;
            conntrack::spawn_listener(
                &ns,
                move |c| filter.borrow().contains(&(c.protocol, c.target)),
                stop_thread,
                etx,
            )
            .map_err(|e| format!("cannot subscribe to conntrack events: {e}"))
        })
        .await?;
        let handle = match started {
            Ok(handle) => handle,
            Err(why) => {
                if tx.send(Input::TrafficCheck(Err(why))).await.is_err() {
                    return Ok(());
                }
                // Checked again later: the module may be loaded, the setting changed.
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(60)) => {}
                    r = idle(&mut targets) => if r.is_err() { return Ok(()) },
                }
                continue;
            }
        };
        if tx.send(Input::TrafficCheck(Ok(()))).await.is_err() {
            return Ok(());
        }
        let mut failed = false;
        loop {
            tokio::select! {
                event = events.recv() => match event {
                    Some(e) => {
                        failed |= matches!(e, ConntrackEvent::Failed(_));
                        if tx.send(Input::Traffic(e)).await.is_err() {
                            return Ok(());
                        }
                        if failed {
                            break;
                        }
                    }
                    None => break,
                },
                r = idle(&mut targets) => {
                    if r.is_err() {
                        return Ok(());
                    }
                    break;
                }
            }
        }
        // The thread stops within its batch interval; what it still had is forwarded.
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        while let Some(e) = events.recv().await {
            if tx.send(Input::Traffic(e)).await.is_err() {
                return Ok(());
            }
        }
        let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        if failed {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// The core: owns caches and tracker, turns inputs into metrics.
struct Core {
    node: String,
    /// What the agent watches, published for holds.
    scope: WatchScope,
    tracker: Tracker,
    slices: HashMap<SliceId, SliceRecord>,
    /// A sorted list, not a set: a Service has one slice or a few, and a B-tree node holds
    /// eleven.
    by_service: HashMap<ServiceRef, Vec<SliceId>>,
    services: HashMap<ServiceRef, ServiceSpec>,
    slice_init: Option<Vec<SliceItem>>,
    service_init: Option<Vec<ServiceItem>>,
    slice_lists: u64,
    service_lists: u64,
    /// Each resource's first list is complete (the core's own state; /readyz gets a copy).
    slices_listed: bool,
    services_listed: bool,
    metrics: Metrics,
    health: Arc<Health>,
    mode_label: String,
    /// This node's zone label.
    zone: Option<String>,
    semantics: Semantics,
    observer: Option<Arc<dyn LagObserver>>,
    /// What the read scheduler should read; its `wake` is raised when new changes are pending.
    plan: tokio::sync::watch::Sender<ReadPlan>,
    /// Names the routes of each dataplane snapshot.
    resolver: Resolver,
    /// Connections to removed endpoints (None: the check is off).
    traffic: Option<TrafficWatch>,
    /// The endpoints the conntrack listener should report.
    traffic_targets: tokio::sync::watch::Sender<Arc<TrafficTargets>>,
    /// Test-only fault (see `AgentConfig::fault_report_removals_early`).
    fault_report_removals_early: bool,
    /// Raised after every input: the publisher's cue that a new draft may differ.
    changed: tokio::sync::watch::Sender<u64>,
    lags: crate::publish::RecentLags,
    /// The highest EndpointSlice resourceVersion processed.
    observed_rv: u64,
    /// The highest Service resourceVersion processed (a policy change moves what is expected).
    observed_service_rv: u64,
    backend: String,
    /// The cause of each resource's last watch failure, logged once per change.
    watch_causes: HashMap<&'static str, &'static str>,
    /// The last read: Ok(warnings) or Err(error kind).
    last_read: Option<Result<usize, &'static str>>,
}

impl Core {
    fn new(
        config: &AgentConfig,
        metrics: Metrics,
        health: Arc<Health>,
        plan: tokio::sync::watch::Sender<ReadPlan>,
        changed: tokio::sync::watch::Sender<u64>,
    ) -> Self {
        Self {
            node: config.node_name.clone(),
            scope: config.scope.clone(),
            tracker: Tracker::new(TrackerConfig {
                change_timeout: config.change_timeout,
            }),
            slices: HashMap::new(),
            by_service: HashMap::new(),
            services: HashMap::new(),
            slice_init: None,
            service_init: None,
            slice_lists: 0,
            service_lists: 0,
            slices_listed: false,
            services_listed: false,
            metrics,
            health,
            mode_label: "unknown".into(),
            zone: None,
            semantics: Semantics::default(),
            observer: config.observer.clone(),
            plan,
            resolver: Resolver::default(),
            fault_report_removals_early: config.fault_report_removals_early,
            traffic: (!config.traffic_window.is_zero()).then(|| TrafficWatch::new(config.traffic_window)),
            traffic_targets: tokio::sync::watch::channel(Arc::default()).0,
            changed,
            lags: Default::default(),
            observed_rv: 0,
            observed_service_rv: 0,
            backend: "unknown".into(),
            last_read: None,
            watch_causes: HashMap::new(),
        }
    }

    /// Hands the read plan to the scheduler: what is pending, which service ports, whether a
    /// full read is wanted; `wake` raises its `wake` so it reads now instead of at its timer.
    fn share_plan(&self, wake: bool) {
        // A full read is wanted until the tracker settles, and while the last reads could not
        // tell which endpoints are stale (holds wait on that), and while a pending change has
        // no frontend a targeted read could find (its Service was deleted).
        let full_wanted = self.tracker.is_synced()
            && (!self.tracker.is_settled()
                || self.tracker.wants_full_read()
                || self.tracker.pending_without_frontends());
        let pending = self.tracker.pending_count();
        let targets = self.tracker.pending_targets();
        self.plan.send_if_modified(|plan| {
            let next = ReadPlan {
                pending,
                targets,
                full_wanted,
                wake: plan.wake + u64::from(wake),
            };
            let modified = *plan != next;
            *plan = next;
            modified
        });
    }

    fn health(&self) -> (&'static str, Option<String>) {
        let unknown = self
            .tracker
            .pending()
            .filter(|c| c.state == crate::tracker::PendingState::Unknown)
            .count();
        match self.last_read {
            None => ("Unknown", Some("no dataplane read yet".into())),
            Some(Err(kind)) => (
                "Degraded",
                Some(format!("dataplane reads fail ({kind}); changes are unknown")),
            ),
            Some(Ok(w)) if w > 0 => ("Degraded", Some(format!("{w} dataplane rules not understood"))),
            Some(Ok(_)) if unknown > 0 => ("Degraded", Some(format!("{unknown} changes unknown"))),
            Some(Ok(_)) => ("Healthy", None),
        }
    }

    /// The NodeConvergence status as of now, built when the publisher asks for it (two sorts
    /// of up to 1,000 lags: not on every input).
    fn draft(&self) -> crate::publish::StatusDraft {
        // Safety: until the first full reading after the lists has adopted what the kernel has
        // not caught up with (e.g. right after a restart), an empty pending list proves
        // nothing: publish no observed version, so holds treat this node as lagging.
        let observed = if self.tracker.is_settled() {
            (self.observed_rv, self.observed_service_rv)
        } else {
            (0, 0)
        };
        crate::publish::draft(
            &self.tracker,
            &self.lags,
            (&self.mode_label, &self.backend),
            self.health(),
            observed,
            &self.scope,
            &self.traffic.as_ref().map(TrafficWatch::summary).unwrap_or_default(),
        )
    }

    async fn run(
        mut self,
        mut rx: mpsc::Receiver<Input>,
        mut pulls: mpsc::Receiver<crate::publish::DraftRequest>,
    ) -> anyhow::Result<()> {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                msg = rx.recv() => match msg {
                    Some(input) => self.handle(input),
                    None => return Ok(()),
                },
                Some(reply) = pulls.recv() => {
                    let _ = reply.send(Arc::new(self.draft()));
                    continue;
                }
                _ = tick.tick() => {
                    if let Some(t) = &mut self.traffic {
                        t.expire(Timestamp::now());
                    }
                    let outcomes = self.tracker.expire(Timestamp::now());
                    self.note_traffic_outcomes(&outcomes, Timestamp::now());
                    for o in &outcomes {
                        if let crate::tracker::Outcome::TimedOut { key, reason, .. } = o {
                            tracing::warn!(%key, reason = reason.as_str(), "change still not reflected in the kernel after the change timeout");
                        }
                    }
                    self.metrics.record_outcomes(&self.mode_label, &outcomes);
                }
            }
            self.metrics.refresh_gauges(&self.tracker, Timestamp::now());
            self.share_plan(false);
            self.share_traffic_targets();
            self.changed.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    fn handle(&mut self, input: Input) {
        match input {
            Input::Slice(msg) => self.on_slice(msg),
            Input::Zone(zone) => {
                self.zone = zone;
                self.update_semantics(Timestamp::now());
            }
            Input::Service(msg) => self.on_service(msg),
            Input::Traffic(event) => self.on_traffic(event),
            Input::TrafficCheck(result) => {
                self.metrics.traffic_check_available.set(i64::from(result.is_ok()));
                if let Err(why) = &result {
                    tracing::warn!(reason = %why, "connections to removed endpoints cannot be counted on this node");
                }
                if let Ok(mut t) = self.health.traffic_unavailable.lock() {
                    *t = result.err();
                }
            }
            Input::Reading {
                mode,
                backend,
                result,
                meta,
                took,
            } => {
                self.metrics.dataplane_read_duration.observe(took.as_secs_f64());
                self.set_mode(mode, &backend, meta.started);
                let scope = match &result {
                    Ok(snap) if snap.scope.is_some() => "targeted",
                    _ => "full",
                };
                self.metrics
                    .dataplane_reads
                    .with_label_values(&[meta.trigger.as_str(), scope])
                    .inc();
                let full_read = matches!(&result, Ok(snap) if snap.scope.is_none());
                let outcome = match result {
                    Ok(snap) => {
                        self.last_read = Some(Ok(snap.warnings.len()));
                        for w in &snap.warnings {
                            tracing::warn!(warning = %w, "dataplane rule not understood; affected endpoints are unknown");
                        }
                        let draining = snap.draining.filter(|_| snap.scope.is_none()).unwrap_or_default();
                        self.metrics.draining_endpoints.set(draining.endpoints as i64);
                        self.metrics
                            .draining_connections
                            .with_label_values(&["active"])
                            .set(draining.active_connections as i64);
                        self.metrics
                            .draining_connections
                            .with_label_values(&["inactive"])
                            .set(draining.inactive_connections as i64);
                        if !snap.warnings.is_empty() {
                            self.metrics.dataplane_read_errors.with_label_values(&["partial"]).inc();
                        }
                        self.health.dataplane_read.store(true, Ordering::Relaxed);
                        let mut view = self.resolver.resolve(&self.tracker, &snap);
                        if self.fault_report_removals_early {
                            // The broken reader: whatever is being removed reads as gone.
                            for c in self
                                .tracker
                                .pending()
                                .filter(|c| c.kind == crate::model::ChangeKind::Removed)
                            {
                                view.named
                                    .remove(&(c.key.port_name.clone(), c.key.protocol, c.key.endpoint));
                                view.unattributed.remove(&(c.key.protocol, c.key.endpoint));
                            }
                        }
                        ReadingOutcome::Routed(view)
                    }
                    Err(e) => {
                        self.last_read = Some(Err(e.kind()));
                        tracing::warn!(error = %e, "dataplane read failed; pending changes are unknown");
                        self.metrics.dataplane_read_errors.with_label_values(&[e.kind()]).inc();
                        ReadingOutcome::Failed { kind: e.kind() }
                    }
                };
                self.apply_reading(Reading { meta, outcome });
                if full_read {
                    // A full read's snapshot and decoded rules are gone now; without this glibc
                    // keeps their pages in its arenas and the agent's RSS stays at the peak.
                    crate::telemetry::release_freed_memory();
                }
            }
            Input::ReaderUnavailable(e, meta) => {
                self.last_read = Some(Err(e.kind()));
                self.metrics.dataplane_read_errors.with_label_values(&[e.kind()]).inc();
                self.mode_label = "unknown".into();
                self.metrics.set_info("unknown", "unknown");
                self.apply_reading(Reading {
                    meta,
                    outcome: ReadingOutcome::Failed { kind: e.kind() },
                });
            }
        }
    }

    /// Records the dataplane mode; what kube-proxy programs differs slightly per mode, so a
    /// change of mode recomputes every expectation.
    fn set_mode(&mut self, mode: Mode, backend: &str, at: Timestamp) {
        self.backend = backend.to_string();
        if self.mode_label != mode.as_str() {
            self.mode_label = mode.as_str().into();
            self.metrics.set_info(mode.as_str(), backend);
            self.update_semantics(at);
        }
    }

    /// What kube-proxy programs depends on the mode and on this node's zone: a change of
    /// either recomputes every expectation.
    fn update_semantics(&mut self, at: Timestamp) {
        let semantics = Semantics {
            local_falls_back_to_cluster: self.mode_label == Mode::Ipvs.as_str(),
            zone: self.zone.clone(),
        };
        if semantics != self.semantics {
            self.semantics = semantics;
            let all = self.services.keys().chain(self.by_service.keys()).cloned().collect();
            self.recompute_all(all, at);
        }
    }

    fn apply_reading(&mut self, reading: Reading) {
        let outcomes = self.tracker.apply_reading(&reading);
        self.note_traffic_outcomes(&outcomes, reading.meta.programmed_at);
        for o in &outcomes {
            if let crate::tracker::Outcome::Converged(s) = o {
                if let Some(observer) = &self.observer {
                    observer.lag_measured(s);
                }
                self.lags.push(s);
                tracing::info!(key = %s.key, change = s.kind.as_str(), reason = s.reason.as_str(), lag_seconds = s.lag,
                    end_to_end_seconds = s.end_to_end.map(|e| e.0), trigger = s.read_trigger.as_str(), "converged");
            }
        }
        self.metrics.record_outcomes(&self.mode_label, &outcomes);
    }

    fn on_slice(&mut self, msg: WatchMsg<SliceItem>) {
        match msg {
            WatchMsg::InitStart => {
                self.slice_lists += 1;
                if self.slice_lists > 1 {
                    self.metrics.watch_restarts.with_label_values(&["endpointslices"]).inc();
                }
                self.slice_init = Some(Vec::new());
            }
            // A (re)list's versions count only once the list is applied: until then the
            // tracker does not know its changes, and a hold must not see them as processed.
            WatchMsg::InitItem(item) => self.slice_init.get_or_insert_with(Vec::new).push(item),
            WatchMsg::InitDone(at) => {
                let items = self.slice_init.take().unwrap_or_default();
                let listed = items.iter().map(|i| i.resource_version).max().unwrap_or(0);
                self.observed_rv = self.observed_rv.max(listed);
                let mut touched: BTreeSet<ServiceRef> = self.by_service.keys().cloned().collect();
                self.slices.clear();
                self.by_service.clear();
                for item in items {
                    if let Some(svc) = self.insert_slice(item) {
                        touched.insert(svc);
                    }
                }
                self.slices_listed = true;
                self.health.slices_listed.store(true, Ordering::Relaxed);
                self.recompute_all(touched, at);
            }
            WatchMsg::Apply(item, at) => {
                self.observed_rv = self.observed_rv.max(item.resource_version);
                let mut touched = BTreeSet::new();
                if let Some(old) = self.remove_slice(&item.id) {
                    touched.insert(old);
                }
                if let Some(svc) = self.insert_slice(item) {
                    touched.insert(svc);
                }
                self.recompute_all(touched, at);
            }
            WatchMsg::Delete(item, at) => {
                self.observed_rv = self.observed_rv.max(item.resource_version);
                let touched: BTreeSet<_> = self.remove_slice(&item.id).into_iter().collect();
                self.recompute_all(touched, at);
            }
            WatchMsg::Failed { kind, message } => self.watch_failed("endpointslices", kind, &message),
        }
    }

    fn on_service(&mut self, msg: WatchMsg<ServiceItem>) {
        match msg {
            WatchMsg::InitStart => {
                self.service_lists += 1;
                if self.service_lists > 1 {
                    self.metrics.watch_restarts.with_label_values(&["services"]).inc();
                }
                self.service_init = Some(Vec::new());
            }
            WatchMsg::InitItem(item) => self.service_init.get_or_insert_with(Vec::new).push(item),
            WatchMsg::InitDone(at) => {
                let items = self.service_init.take().unwrap_or_default();
                let listed = items.iter().map(|i| i.resource_version).max().unwrap_or(0);
                self.observed_service_rv = self.observed_service_rv.max(listed);
                let mut touched: BTreeSet<ServiceRef> = self.services.keys().cloned().collect();
                self.services.clear();
                for item in items {
                    touched.insert(item.service.clone());
                    if let Some(spec) = item.spec {
                        self.services.insert(item.service, spec);
                    }
                }
                self.services_listed = true;
                self.health.services_listed.store(true, Ordering::Relaxed);
                self.recompute_all(touched, at);
            }
            WatchMsg::Apply(item, at) => {
                self.observed_service_rv = self.observed_service_rv.max(item.resource_version);
                match item.spec {
                    Some(spec) => self.services.insert(item.service.clone(), spec),
                    None => self.services.remove(&item.service),
                };
                self.recompute_all([item.service].into(), at);
            }
            WatchMsg::Delete(item, at) => {
                self.observed_service_rv = self.observed_service_rv.max(item.resource_version);
                self.services.remove(&item.service);
                self.recompute_all([item.service].into(), at);
            }
            WatchMsg::Failed { kind, message } => self.watch_failed("services", kind, &message),
        }
    }

    fn watch_failed(&mut self, resource: &'static str, kind: &'static str, message: &str) {
        self.metrics.watch_errors.with_label_values(&[resource, kind]).inc();
        // One line per change of cause, not one per retry.
        let cause = k8s::failure_cause(message);
        if self.watch_causes.insert(resource, cause) != Some(cause) {
            tracing::warn!(resource, kind, error = %message, "watch failed, retrying with backoff: {cause}");
        } else {
            tracing::debug!(resource, kind, error = %message, "watch failed again");
        }
    }

    fn insert_slice(&mut self, item: SliceItem) -> Option<ServiceRef> {
        match item.record {
            Ok((record, problems)) => {
                for p in problems {
                    self.metrics.malformed.with_label_values(&[p.reason]).inc();
                    tracing::warn!(problem = %p.detail, "skipping malformed part of an EndpointSlice, as kube-proxy does");
                }
                let svc = record.service.clone();
                // Sorted, as a set would be: the expectation must not depend on arrival order.
                let ids = self.by_service.entry(svc.clone()).or_default();
                if let Err(at) = ids.binary_search(&item.id) {
                    ids.insert(at, item.id.clone());
                }
                self.slices.insert(item.id, record);
                Some(svc)
            }
            Err(e) => {
                let reason = match e {
                    SliceError::MissingServiceLabel(_) => "missing_service_label",
                    SliceError::Fqdn(_) => "fqdn",
                };
                self.metrics.malformed.with_label_values(&[reason]).inc();
                tracing::debug!(error = %e, "ignoring EndpointSlice");
                None
            }
        }
    }

    fn remove_slice(&mut self, id: &SliceId) -> Option<ServiceRef> {
        let old = self.slices.remove(id)?;
        if let Some(set) = self.by_service.get_mut(&old.service) {
            set.retain(|x| x != id);
            if set.is_empty() {
                self.by_service.remove(&old.service);
            }
        }
        Some(old.service)
    }

    /// Watches the endpoints whose removal became pending at `at` (connections to them are
    /// counted from now on).
    fn watch_new_removals(&mut self, at: Timestamp) {
        let Some(traffic) = &mut self.traffic else { return };
        for c in self
            .tracker
            .pending()
            .filter(|c| c.observed == at && c.kind == crate::model::ChangeKind::Removed)
        {
            let frontends = self
                .tracker
                .service(&c.key.port_name.service)
                .and_then(|e| e.frontends.get(&c.key.port_name, c.key.protocol))
                .unwrap_or_default();
            traffic.removal_pending(&c.key, c.reason, frontends);
        }
    }

    /// Removals that converged (at their programming time, or `at` when unsampled) or were
    /// dropped (reverted, timed out) settle what their watch saw so far.
    fn note_traffic_outcomes(&mut self, outcomes: &[crate::tracker::Outcome], at: Timestamp) {
        use crate::model::ChangeKind::Removed;
        use crate::tracker::Outcome;
        let Some(traffic) = &mut self.traffic else { return };
        let mut counted = Vec::new();
        for o in outcomes {
            match o {
                Outcome::Converged(s) if s.kind == Removed => {
                    let (c, violations) = traffic.removal_converged(&s.key, s.programmed_at);
                    counted.extend(c);
                    report_violations(&violations);
                }
                Outcome::ConvergedUnsampled { key, kind: Removed } => {
                    let (c, violations) = traffic.removal_converged(key, at);
                    counted.extend(c);
                    report_violations(&violations);
                }
                Outcome::TimedOut { key, kind: Removed, .. } | Outcome::Superseded { key, kind: Removed } => {
                    counted.extend(traffic.removal_dropped(key));
                }
                _ => {}
            }
        }
        self.count_connections(&counted);
    }

    fn on_traffic(&mut self, event: ConntrackEvent) {
        match event {
            ConntrackEvent::Connections(conns) => {
                let Some(traffic) = &mut self.traffic else { return };
                let mut counted = Vec::new();
                for c in &conns {
                    let (n, violation) = traffic.connection(c);
                    counted.extend(n);
                    report_violations(violation.as_slice());
                }
                self.count_connections(&counted);
            }
            ConntrackEvent::Overrun => self.metrics.traffic_events_lost.inc(),
            ConntrackEvent::Failed(e) => {
                tracing::warn!(error = %e, "the conntrack event socket failed; restarting it");
            }
        }
    }

    fn count_connections(&self, counted: &crate::traffic::Counted) {
        for (reason, before, after) in counted {
            let m = &self.metrics.connections_after_removal;
            m.with_label_values(&[reason.as_str(), "before_converged"])
                .inc_by(*before);
            m.with_label_values(&[reason.as_str(), "after_converged"])
                .inc_by(*after);
        }
    }

    /// Hands the watched endpoints to the conntrack listener (it runs while there are any).
    fn share_traffic_targets(&self) {
        let Some(traffic) = &self.traffic else { return };
        self.traffic_targets.send_if_modified(|current| {
            if current.len() == traffic.len() && traffic.targets_in(current) {
                return false;
            }
            *current = Arc::new(traffic.targets());
            true
        });
    }

    fn recompute_all(&mut self, touched: BTreeSet<ServiceRef>, at: Timestamp) {
        let synced_now = self.slices_listed && self.services_listed;
        let before = self.tracker.pending_count();
        for svc in touched {
            let slices: Vec<&SliceRecord> = self
                .by_service
                .get(&svc)
                .into_iter()
                .flatten()
                .filter_map(|id| self.slices.get(id))
                .collect();
            let exp = expect_service_with(&svc, self.services.get(&svc), &slices, &self.node, &self.semantics);
            let outcomes = self.tracker.update_service(&svc, exp, at);
            self.note_traffic_outcomes(&outcomes, at);
            self.metrics.record_outcomes(&self.mode_label, &outcomes);
        }
        self.watch_new_removals(at);
        if synced_now && !self.tracker.is_synced() {
            self.tracker.mark_synced(at);
            tracing::info!(
                services = self.services.len(),
                slices = self.slices.len(),
                "initial lists complete; tracking changes"
            );
            // The lists' pages of JSON and k8s-openapi objects are freed by now.
            crate::telemetry::release_freed_memory();
            // Settling takes a full read that starts after this point; a read under way now
            // started too early. Ask for one now rather than at the next resync.
            self.share_plan(true);
        }
        if self.tracker.pending_count() > before || self.tracker.pending().any(|c| c.observed == at) {
            // The scheduler reads the pending frontends when it wakes.
            self.share_plan(true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_task_that_ends_without_error_fails_the_agent_loudly() {
        let err = task_outcome(Some(Ok(Ok(())))).unwrap_err();
        assert!(err.to_string().contains("stopped unexpectedly"), "{err}");
        assert!(task_outcome(Some(Ok(Err(anyhow::anyhow!("watch failed"))))).is_err());
        assert!(task_outcome(None).is_ok());
    }

    use crate::expected::builders::slice;

    fn core() -> Core {
        core_for("node-a")
    }

    /// A core with default settings and no API server or kernel behind it.
    pub(super) fn core_for(node: &str) -> Core {
        let config = AgentConfig {
            node_name: node.into(),
            scope: WatchScope::default(),
            mode: None,
            backend: None,
            netns: NetNs::default(),
            poll_interval: Duration::from_secs(1),
            resync_interval: Duration::from_secs(30),
            change_timeout: Duration::from_secs(300),
            listen: "127.0.0.1:0".parse().unwrap(),
            observer: None,
            status: None,
            max_holds: 1,
            traffic_window: Duration::from_secs(60),
            fault_report_removals_early: false,
        };
        Core::new(
            &config,
            Metrics::new().unwrap(),
            Arc::default(),
            tokio::sync::watch::channel(ReadPlan::default()).0,
            tokio::sync::watch::channel(0).0,
        )
    }

    fn item(name: &str, rv: u64, ip: &str) -> SliceItem {
        let mut record = slice("ns1/svc1").endpoint(ip).build();
        record.resource_version = rv;
        SliceItem {
            id: ("ns1".into(), name.into()),
            resource_version: rv,
            record: Ok((record, vec![])),
        }
    }

    fn clean_read(core: &mut Core, at: i64) {
        core.apply_reading(Reading {
            meta: ReadingMeta {
                started: Timestamp::from_millis(at),
                finished: Timestamp::from_millis(at + 1),
                programmed_at: Timestamp::from_millis(at),
                error_bound: Duration::ZERO,
                trigger: crate::tracker::ReadTrigger::Poll,
            },
            outcome: ReadingOutcome::Routed(Default::default()),
        });
    }

    /// The core as a state machine: a stream of inputs (lists, a slice update, readings) in, and
    /// its effects out: the read plan the scheduler gets, the lag the observer sees, the status
    /// draft the publisher pulls. No API server, no kernel.
    #[test]
    fn a_stream_of_inputs_yields_read_plans_lags_and_drafts() {
        #[derive(Debug, Default)]
        struct Seen(std::sync::Mutex<Vec<crate::tracker::LagSample>>);
        impl LagObserver for Seen {
            fn lag_measured(&self, sample: &crate::tracker::LagSample) {
                self.0.lock().unwrap().push(sample.clone());
            }
        }
        let seen = Arc::new(Seen::default());
        let (plan_tx, plan) = tokio::sync::watch::channel(ReadPlan::default());
        let mut core = core();
        core.plan = plan_tx;
        core.observer = Some(seen.clone());
        let t = Timestamp::from_millis;
        let (svc, spec) = crate::expected::builders::svc("ns1/svc1");
        let two = |rv: u64, ips: &[&str]| {
            let mut b = slice("ns1/svc1");
            for ip in ips {
                b = b.endpoint(ip);
            }
            let mut record = b.build();
            record.resource_version = rv;
            SliceItem {
                id: ("ns1".into(), "svc1-a".into()),
                resource_version: rv,
                record: Ok((record, vec![])),
            }
        };
        let reading = |at: i64, eps: &[&str]| Input::Reading {
            mode: Mode::Iptables,
            backend: "nft".into(),
            result: Ok(DataplaneSnapshot {
                services: vec![crate::dataplane::ServiceRoutes {
                    name: Some(crate::model::ServicePortName::new("ns1", "svc1", "p80")),
                    protocol: Some(crate::model::Protocol::Tcp),
                    frontends: ["172.30.0.41:80".to_string()].into(),
                    endpoints: eps.iter().map(|e| format!("{e}:80").parse().unwrap()).collect(),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            meta: ReadingMeta {
                started: t(at),
                finished: t(at + 1),
                programmed_at: t(at),
                error_bound: Duration::ZERO,
                trigger: crate::tracker::ReadTrigger::Event,
            },
            took: Duration::from_millis(1),
        };
        core.handle(Input::Service(WatchMsg::InitStart));
        core.handle(Input::Service(WatchMsg::InitItem(ServiceItem {
            service: svc,
            spec: Some(spec),
            resource_version: 3,
        })));
        core.handle(Input::Service(WatchMsg::InitDone(t(0))));
        core.handle(Input::Slice(WatchMsg::InitStart));
        core.handle(Input::Slice(WatchMsg::InitItem(two(5, &["10.180.0.1", "10.180.0.2"]))));
        core.handle(Input::Slice(WatchMsg::InitDone(t(10))));
        core.share_plan(false);
        assert!(
            plan.borrow().full_wanted,
            "after the lists, a full read settles the tracker"
        );
        let woken = plan.borrow().wake;
        assert!(woken >= 1, "the lists' end wakes the scheduler");
        core.handle(reading(20, &["10.180.0.1", "10.180.0.2"]));
        core.share_plan(false);
        assert_eq!(
            *plan.borrow(),
            ReadPlan {
                wake: woken,
                ..Default::default()
            },
            "settled: nothing to read"
        );
        assert_eq!(core.draft().observed_resource_version, 5);

        // 10.180.0.2 leaves the slice: the scheduler is woken for its service port.
        core.handle(Input::Slice(WatchMsg::Apply(two(6, &["10.180.0.1"]), t(10))));
        core.share_plan(false);
        let p = plan.borrow().clone();
        assert_eq!((p.pending, p.full_wanted), (1, false));
        assert!(p.wake > woken, "new pending changes wake the scheduler");
        assert!(p.targets.frontends.contains("172.30.0.41:80"), "{p:?}");
        // The kernel still routes it: still pending, nothing measured.
        core.handle(reading(30, &["10.180.0.1", "10.180.0.2"]));
        assert!(seen.0.lock().unwrap().is_empty());
        assert_eq!(core.draft().status.pending_count, 1);
        // It is gone from the kernel: one lag, 30 ms after the change was observed.
        core.handle(reading(40, &["10.180.0.1"]));
        core.share_plan(false);
        let lags = seen.0.lock().unwrap().clone();
        assert_eq!(lags.len(), 1, "{lags:?}");
        assert_eq!(lags[0].kind, crate::model::ChangeKind::Removed);
        assert_eq!(lags[0].key.endpoint, "10.180.0.2:80".parse().unwrap());
        assert_eq!(plan.borrow().pending, 0);
        let draft = core.draft();
        assert_eq!((draft.status.pending_count, draft.status.lag_samples), (0, 1));
        assert_eq!(draft.observed_resource_version, 6);
    }

    /// Issue 15 item 3: during a 410 relist the agent must not publish the relist's version
    /// before the tracker has applied the list.
    #[test]
    fn item3_a_relist_raises_the_observed_version_only_when_applied() {
        let mut core = core();
        let t = Timestamp::from_millis;
        core.handle(Input::Service(WatchMsg::InitStart));
        core.handle(Input::Service(WatchMsg::InitDone(t(0))));
        core.handle(Input::Slice(WatchMsg::InitStart));
        core.handle(Input::Slice(WatchMsg::InitItem(item("a", 5, "10.180.0.1"))));
        core.handle(Input::Slice(WatchMsg::InitDone(t(0))));
        clean_read(&mut core, 10);
        assert_eq!(core.draft().observed_resource_version, 5);
        // A relist after 410 Gone: the slice changed at version 9.
        core.handle(Input::Slice(WatchMsg::InitStart));
        core.handle(Input::Slice(WatchMsg::InitItem(item("a", 9, "10.180.0.2"))));
        assert_eq!(
            core.draft().observed_resource_version,
            5,
            "published a version whose change the tracker has not applied"
        );
        core.handle(Input::Slice(WatchMsg::InitDone(t(20))));
        assert_eq!(core.draft().observed_resource_version, 9);
    }
}

#[cfg(test)]
mod invariant;
mod schedule;
