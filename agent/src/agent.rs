//! The node agent's runtime: watchers and the dataplane loop feed one core task that owns the
//! caches and the tracker. Work flows stream → bounded channel → core; the core never does
//! I/O itself, so a slow API server or a slow read cannot corrupt its state.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::ResourceExt;
use tokio::sync::{mpsc, Notify};

use crate::admin::{self, Health};
use crate::dataplane::nfnotify::{self, GenerationProbe, Notification};
use crate::dataplane::{
    self, iptables::Backend, ChangeSource, DataplaneReader, DataplaneSnapshot, Mode, ReadError, ReadTargets,
};
use crate::expected::{expect_service_with, Semantics, ServiceSpec, SliceRecord};
use crate::k8s::{self, SliceError, SliceProblem, WatchMsg, WatchScope};
use crate::model::{ServiceRef, Timestamp};
use crate::netns::NetNs;
use crate::resolve::Resolver;
use crate::telemetry::Metrics;
use crate::tracker::{ReadTrigger, Reading, ReadingMeta, ReadingOutcome, Tracker, TrackerConfig};

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

/// What the tracker tells the dataplane loop: when to wake, what to read.
#[derive(Clone, Default)]
struct ReadRequests {
    /// Woken when new changes are pending (or a full read is wanted).
    wakeup: Arc<Notify>,
    /// Pending changes: the loop polls at the poll interval while there are any.
    count: Arc<AtomicUsize>,
    /// The service ports with pending changes, for targeted reads.
    targets: Arc<std::sync::Mutex<ReadTargets>>,
    /// Set while the tracker waits for a full reading to settle (after the initial lists):
    /// targeted reads cannot adopt what the kernel has not caught up with.
    full_wanted: Arc<AtomicBool>,
}

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
    let requests = ReadRequests::default();

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
    tasks.spawn(dataplane_loop(config.clone(), tx, requests.clone(), health.clone()));
    let (status_tx, status_rx) = tokio::sync::watch::channel(Arc::new(crate::publish::StatusDraft::default()));
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
        tasks.spawn(publisher.run(status_rx));
    }
    let core = Core::new(&config, metrics, health, requests, status_tx);
    tasks.spawn(core.run(rx));

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
    metrics: Metrics,
    health: Arc<Health>,
    mode_label: String,
    /// This node's zone label.
    zone: Option<String>,
    semantics: Semantics,
    observer: Option<Arc<dyn LagObserver>>,
    requests: ReadRequests,
    /// Names the routes of each dataplane snapshot.
    resolver: Resolver,
    status_tx: tokio::sync::watch::Sender<Arc<crate::publish::StatusDraft>>,
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
        requests: ReadRequests,
        status_tx: tokio::sync::watch::Sender<Arc<crate::publish::StatusDraft>>,
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
            metrics,
            health,
            mode_label: "unknown".into(),
            zone: None,
            semantics: Semantics::default(),
            observer: config.observer.clone(),
            requests,
            resolver: Resolver::default(),
            status_tx,
            lags: Default::default(),
            observed_rv: 0,
            observed_service_rv: 0,
            backend: "unknown".into(),
            last_read: None,
            watch_causes: HashMap::new(),
        }
    }

    /// Hands the pending count and frontends to the dataplane loop.
    fn share_pending(&self) {
        self.requests
            .count
            .store(self.tracker.pending_count(), Ordering::Relaxed);
        if let Ok(mut f) = self.requests.targets.lock() {
            *f = self.tracker.pending_targets();
        }
        // A full read is wanted until the tracker settles, and while the last reads could not
        // tell which endpoints are stale (holds wait on that).
        // So is a full read while a pending change has no frontend a targeted read could find
        // (its Service was deleted).
        let wanted = self.tracker.is_synced()
            && (!self.tracker.is_settled()
                || self.tracker.wants_full_read()
                || self.tracker.pending_without_frontends());
        self.requests.full_wanted.store(wanted, Ordering::Relaxed);
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

    fn publish(&self) {
        // Safety: until the first full reading after the lists has adopted what the kernel has
        // not caught up with (e.g. right after a restart), an empty pending list proves
        // nothing: publish no observed version, so holds treat this node as lagging.
        let observed = if self.tracker.is_settled() {
            (self.observed_rv, self.observed_service_rv)
        } else {
            (0, 0)
        };
        let draft = crate::publish::draft(
            &self.tracker,
            &self.lags,
            &self.mode_label,
            &self.backend,
            self.health(),
            observed,
            &self.scope,
        );
        self.status_tx.send_if_modified(|cur| {
            if **cur == draft {
                false
            } else {
                *cur = Arc::new(draft);
                true
            }
        });
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Input>) -> anyhow::Result<()> {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                msg = rx.recv() => match msg {
                    Some(input) => self.handle(input),
                    None => return Ok(()),
                },
                _ = tick.tick() => {
                    let outcomes = self.tracker.expire(Timestamp::now());
                    for o in &outcomes {
                        if let crate::tracker::Outcome::TimedOut { key, reason, .. } = o {
                            tracing::warn!(%key, reason = reason.as_str(), "change still not reflected in the kernel after the change timeout");
                        }
                    }
                    self.metrics.record_outcomes(&self.mode_label, &outcomes);
                }
            }
            self.metrics.refresh_gauges(&self.tracker, Timestamp::now());
            self.share_pending();
            self.publish();
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
                        let view = self.resolver.resolve(&self.tracker, &snap);
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
        if self.tracker.is_settled() {
            self.requests.full_wanted.store(false, Ordering::Relaxed);
        }
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

    fn recompute_all(&mut self, touched: BTreeSet<ServiceRef>, at: Timestamp) {
        let synced_now =
            self.health.slices_listed.load(Ordering::Relaxed) && self.health.services_listed.load(Ordering::Relaxed);
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
            self.metrics.record_outcomes(&self.mode_label, &outcomes);
        }
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
            self.share_pending();
            self.requests.wakeup.notify_one();
        }
        if self.tracker.pending_count() > before || self.tracker.pending().any(|c| c.observed == at) {
            // The dataplane loop reads the pending frontends when it wakes: share them first.
            self.share_pending();
            self.requests.wakeup.notify_one();
        }
    }
}

/// Whether `--mode auto` should look at the kernel again: once per resync interval, whatever
/// triggers the reads.
fn redetect_due(mode: Option<Mode>, since_last: Duration, resync: Duration) -> bool {
    mode.is_none() && since_last >= resync
}

/// Reads the dataplane on kernel notifications, on new pending changes and on a timer.
async fn dataplane_loop(
    config: AgentConfig,
    tx: mpsc::Sender<Input>,
    requests: ReadRequests,
    health: Arc<Health>,
) -> anyhow::Result<()> {
    let mut last_full = Instant::now();
    let mut last_full_cost = Duration::ZERO;
    let mut reader: Option<Box<dyn DataplaneReader>> = None;
    let mut probe: Option<GenerationProbe> = None;
    let (ntx, mut nrx) = mpsc::unbounded_channel::<Notification>();
    let mut listener = Listener::new(config.resync_interval);
    let mut seen: VecDeque<(u32, Timestamp)> = VecDeque::new();
    let mut overrun = false;
    let mut prev_started: Option<Timestamp> = None;
    let mut trigger = ReadTrigger::Initial;
    let mut last_detect = Instant::now();
    loop {
        health.beat();
        if reader.is_none() {
            let (mode, backend, netns) = (config.mode, config.backend, config.netns.clone());
            let opened = tokio::task::spawn_blocking(move || dataplane::open_reader(mode, backend, &netns)).await?;
            match opened {
                Ok(r) => {
                    tracing::info!(mode = %r.mode(), backend = r.backend(), "dataplane reader ready");
                    reader = Some(r);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "no dataplane reader; pending changes stay unknown");
                    let now = Timestamp::now();
                    let meta = ReadingMeta {
                        started: now,
                        finished: now,
                        programmed_at: now,
                        error_bound: Duration::ZERO,
                        trigger,
                    };
                    if tx.send(Input::ReaderUnavailable(e, meta)).await.is_err() {
                        return Ok(());
                    }
                }
            }
        }
        // An event-driven reader needs the notification thread and the generation probe; both
        // are (re)opened whenever missing, after a reader rebuild too. While the thread is down
        // the loop polls (`listening` is false).
        if reader
            .as_ref()
            .is_some_and(|r| r.change_source() == ChangeSource::NfTablesEvents)
        {
            listener.ensure(Instant::now(), || nfnotify::spawn_listener(&config.netns, ntx.clone()));
            if probe.is_none() {
                probe = GenerationProbe::open(&config.netns)
                    .map_err(|e| tracing::warn!(error = %e, "cannot query the nf_tables generation"))
                    .ok();
            }
        }
        let listening = listener.listening();
        // With --mode auto, the mode is re-checked once per resync interval, on its own timer
        // (a steady stream of nf_tables events must not keep it from running): kube-proxy may
        // have been reconfigured (it cleans up the old mode's rules when it starts in the new one).
        if redetect_due(config.mode, last_detect.elapsed(), config.resync_interval) {
            last_detect = Instant::now();
            if let Some(current) = reader.as_ref().map(|r| r.mode()) {
                let netns = config.netns.clone();
                let detected = tokio::task::spawn_blocking(move || dataplane::detect_mode(&netns)).await?;
                if let Some((mode, _)) = detected.filter(|(m, _)| *m != current) {
                    tracing::warn!(from = %current, to = %mode, "kube-proxy's mode changed; switching readers");
                    reader = None;
                    continue;
                }
            }
        }
        if let Some(mut r) = reader.take() {
            let events = listening && r.change_source() == ChangeSource::NfTablesEvents;
            let mut p = probe.take();
            // Between full reads, read only the service ports with pending changes where the
            // reader can (IPVS, nftables); a full read is due every `full_interval`, which grows
            // with the cost of a full read so a large dataplane stays cheap to watch.
            let full_interval = config.resync_interval.max(last_full_cost * 100);
            let full_due = last_full.elapsed() >= full_interval
                || trigger == ReadTrigger::Initial
                || requests.full_wanted.load(Ordering::Relaxed);
            let pending: ReadTargets = requests.targets.lock().map(|f| f.clone()).unwrap_or_default();
            if !full_due && pending.is_empty() && r.can_read_targeted() {
                // Nothing pending (a kernel change, or a timer): nothing to confirm until the next
                // full read.
                reader = Some(r);
                probe = p_take_back(probe, p);
                trigger = wait_for_trigger(
                    poll_wait(&config, &reader, listening, &requests.count, last_full_cost),
                    &requests.wakeup,
                    &mut nrx,
                    &mut seen,
                    &mut overrun,
                )
                .await;
                continue;
            }
            let targets = if full_due { Default::default() } else { pending };
            let started = Timestamp::now();
            let clock = Instant::now();
            let (r_back, p_back, g1, (result, full), g2) = tokio::task::spawn_blocking(move || {
                let g1 = p.as_mut().and_then(|p| p.current().ok());
                // A reader with no targeted form (iptables-legacy) reads in full: that read
                // counts as the full read it is, for its cost and for the next one's schedule.
                let result = match targets.is_empty() {
                    true => (r.read(), true),
                    false => match r.read_targeted(&targets) {
                        Some(read) => (read, false),
                        None => (r.read(), true),
                    },
                };
                let g2 = p.as_mut().and_then(|p| p.current().ok());
                (r, p, g1, result, g2)
            })
            .await?;
            let elapsed = clock.elapsed();
            if full {
                last_full = Instant::now();
                last_full_cost = elapsed;
            }
            let finished = Timestamp::now();
            // Notifications that arrived during the read: if any announces a generation other
            // than the one read, the state moved on and must be read again right away.
            let mut moved_on = false;
            while let Ok(n) = nrx.try_recv() {
                moved_on |= !matches!(n, Notification::Generation(g) if Some(g.generation) == g2 && g1 == g2);
                note(&mut seen, &mut overrun, n);
            }
            let window = prev_started.map_or(Duration::ZERO, |p| {
                Duration::from_secs_f64(finished.seconds_since(p).max(0.0))
            });
            // The state seen took effect when its generation was announced; when that is not
            // known for sure, the read's end is a safe upper bound.
            let (programmed_at, error_bound) = match (events, g1, g2) {
                (true, Some(a), Some(b)) if a == b && !overrun => seen
                    .iter()
                    .find(|(g, _)| *g == b)
                    .map_or((finished, window), |(_, at)| (*at, Duration::ZERO)),
                _ => (finished, window),
            };
            overrun = false;
            prev_started = Some(started);
            let meta = ReadingMeta {
                started,
                finished,
                programmed_at,
                error_bound,
                trigger,
            };
            let (mode, backend) = (r_back.mode(), r_back.backend().to_string());
            let rebuild = matches!(&result, Err(ReadError::ToolMissing { .. } | ReadError::NotFound { .. }));
            if let Err(e) = &result {
                tracing::debug!(error = %e, "dataplane read failed");
            }
            if tx
                .send(Input::Reading {
                    mode,
                    backend,
                    result,
                    meta,
                    took: elapsed,
                })
                .await
                .is_err()
            {
                return Ok(());
            }
            if !rebuild {
                reader = Some(r_back);
                probe = p_back;
            }
            if moved_on {
                trigger = ReadTrigger::Event;
                continue;
            }
        }
        trigger = wait_for_trigger(
            poll_wait(&config, &reader, listening, &requests.count, last_full_cost),
            &requests.wakeup,
            &mut nrx,
            &mut seen,
            &mut overrun,
        )
        .await;
    }
}

/// Keeps the nf_tables notification thread running: when it stops (its socket failed), the
/// loop polls, and the thread is started again after a backoff (1 s, doubling up to `max`).
struct Listener {
    handle: Option<std::thread::JoinHandle<()>>,
    /// No start before this (after a stop or a failed start).
    retry_at: Option<Instant>,
    backoff: Duration,
    max: Duration,
}

impl Listener {
    fn new(max: Duration) -> Self {
        Self {
            handle: None,
            retry_at: None,
            backoff: Duration::from_secs(1),
            max: max.max(Duration::from_secs(1)),
        }
    }

    /// Whether the thread is running now.
    fn listening(&self) -> bool {
        self.handle.as_ref().is_some_and(|h| !h.is_finished())
    }

    /// Starts the thread if it is not running and its retry time has come.
    fn ensure(&mut self, now: Instant, spawn: impl FnOnce() -> std::io::Result<std::thread::JoinHandle<()>>) {
        if self.listening() {
            return;
        }
        if self.handle.take().is_some() {
            tracing::warn!(retry_in = ?self.backoff, "the nf_tables notification thread stopped; polling until it restarts");
            self.retry_at = Some(now + self.backoff);
            self.backoff = (self.backoff * 2).min(self.max);
            return;
        }
        if self.retry_at.is_some_and(|at| now < at) {
            return;
        }
        match spawn() {
            Ok(h) => {
                self.handle = Some(h);
                self.backoff = Duration::from_secs(1);
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?self.backoff, "cannot subscribe to nf_tables notifications; polling instead");
                self.retry_at = Some(now + self.backoff);
                self.backoff = (self.backoff * 2).min(self.max);
            }
        }
    }
}

fn p_take_back(current: Option<GenerationProbe>, taken: Option<GenerationProbe>) -> Option<GenerationProbe> {
    current.or(taken)
}

/// How long to wait for a trigger before polling.
///
/// While changes are pending, a reader that can only read in full (iptables-legacy: the
/// kernel hands its table over whole) waits at least twice its last full read between polls,
/// so a large table costs at most a third of a core instead of a busy one (2.5 s reads at 30k
/// Services). Its measurement stays an upper bound: the poll window is the error bound.
fn poll_wait(
    config: &AgentConfig,
    reader: &Option<Box<dyn DataplaneReader>>,
    listening: bool,
    pending_count: &AtomicUsize,
    last_full_cost: Duration,
) -> Duration {
    let pending = pending_count.load(Ordering::Relaxed) > 0;
    let reader = reader.as_ref().map(|r| (r.change_source(), r.can_read_targeted()));
    poll_period(
        config.poll_interval,
        config.resync_interval,
        reader,
        listening,
        pending,
        last_full_cost,
    )
}

/// [`poll_wait`] without the agent: `reader` is the reader's change source and whether it can
/// read only the pending service ports.
fn poll_period(
    poll: Duration,
    resync: Duration,
    reader: Option<(ChangeSource, bool)>,
    listening: bool,
    pending: bool,
    last_full_cost: Duration,
) -> Duration {
    match reader {
        Some((ChangeSource::NfTablesEvents, _)) if listening => resync,
        Some(_) if !pending => resync,
        Some((_, true)) => poll,
        Some((_, false)) => poll.max(last_full_cost * 2),
        None => poll.max(Duration::from_secs(5)),
    }
}

/// Waits for the next reason to read: a kernel notification, new pending changes, or a timer.
async fn wait_for_trigger(
    wait: Duration,
    pending_wakeup: &Notify,
    nrx: &mut mpsc::UnboundedReceiver<Notification>,
    seen: &mut VecDeque<(u32, Timestamp)>,
    overrun: &mut bool,
) -> ReadTrigger {
    tokio::select! {
        Some(n) = nrx.recv() => {
            note(seen, overrun, n);
            ReadTrigger::Event
        }
        _ = pending_wakeup.notified() => ReadTrigger::Pending,
        _ = tokio::time::sleep(wait) => ReadTrigger::Poll,
    }
}

fn note(seen: &mut VecDeque<(u32, Timestamp)>, overrun: &mut bool, n: Notification) {
    match n {
        Notification::Generation(g) => {
            if !seen.iter().any(|(s, _)| *s == g.generation) {
                seen.push_back((g.generation, g.at));
                if seen.len() > 256 {
                    seen.pop_front();
                }
            }
        }
        Notification::Overrun(_) => *overrun = true,
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_task_that_ends_without_error_fails_the_agent_loudly() {
        let err = task_outcome(Some(Ok(Ok(())))).unwrap_err();
        assert!(err.to_string().contains("stopped unexpectedly"), "{err}");
        assert!(task_outcome(Some(Ok(Err(anyhow::anyhow!("watch failed"))))).is_err());
        assert!(task_outcome(None).is_ok());
    }

    /// Supervision: a notification thread that stops is noticed (the loop polls meanwhile) and
    /// started again after a backoff that doubles up to the resync interval; a failed start too.
    #[test]
    fn the_notification_thread_is_restarted_with_backoff() {
        let mut l = Listener::new(Duration::from_secs(4));
        let t0 = Instant::now();
        let quick = || Ok(std::thread::spawn(|| {}));
        l.ensure(t0, quick);
        let h = l.handle.as_ref().expect("started");
        while !h.is_finished() {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(!l.listening(), "a stopped thread is not listening: the loop polls");
        l.ensure(t0, || panic!("noticed, not restarted at once"));
        l.ensure(t0 + Duration::from_millis(500), || panic!("not before the backoff"));
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        l.ensure(t0 + Duration::from_secs(1), move || {
            Ok(std::thread::spawn(move || {
                let _ = rx.recv();
            }))
        });
        assert!(l.listening(), "restarted after 1 s");
        drop(tx);
        // A failing start backs off 1 s, 2 s, 4 s, then stays at the bound.
        let mut l = Listener::new(Duration::from_secs(4));
        let fail = || Err(std::io::Error::other("no netlink"));
        let mut at = t0;
        for expected in [1, 2, 4, 4] {
            l.ensure(at, fail);
            assert_eq!(l.retry_at.unwrap() - at, Duration::from_secs(expected));
            l.ensure(at + Duration::from_secs(expected) - Duration::from_millis(1), || {
                panic!("too early")
            });
            at += Duration::from_secs(expected);
        }
    }
    use super::*;
    use crate::expected::builders::slice;

    fn core() -> (Core, tokio::sync::watch::Receiver<Arc<crate::publish::StatusDraft>>) {
        core_for("node-a")
    }

    /// A core with default settings and no API server or kernel behind it.
    pub(super) fn core_for(node: &str) -> (Core, tokio::sync::watch::Receiver<Arc<crate::publish::StatusDraft>>) {
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
        };
        let (tx, rx) = tokio::sync::watch::channel(Arc::new(crate::publish::StatusDraft::default()));
        let metrics = Metrics::new().unwrap();
        (
            Core::new(&config, metrics, Arc::default(), ReadRequests::default(), tx),
            rx,
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
                trigger: ReadTrigger::Poll,
            },
            outcome: ReadingOutcome::Routed(Default::default()),
        });
    }

    /// Issue 15 item 3: during a 410 relist the agent must not publish the relist's version
    /// before the tracker has applied the list.
    #[test]
    fn item3_a_relist_raises_the_observed_version_only_when_applied() {
        let (mut core, rx) = core();
        let t = Timestamp::from_millis;
        core.handle(Input::Service(WatchMsg::InitStart));
        core.handle(Input::Service(WatchMsg::InitDone(t(0))));
        core.handle(Input::Slice(WatchMsg::InitStart));
        core.handle(Input::Slice(WatchMsg::InitItem(item("a", 5, "10.180.0.1"))));
        core.handle(Input::Slice(WatchMsg::InitDone(t(0))));
        clean_read(&mut core, 10);
        core.publish();
        assert_eq!(rx.borrow().observed_resource_version, 5);
        // A relist after 410 Gone: the slice changed at version 9.
        core.handle(Input::Slice(WatchMsg::InitStart));
        core.handle(Input::Slice(WatchMsg::InitItem(item("a", 9, "10.180.0.2"))));
        core.publish();
        assert_eq!(
            rx.borrow().observed_resource_version,
            5,
            "published a version whose change the tracker has not applied"
        );
        core.handle(Input::Slice(WatchMsg::InitDone(t(20))));
        core.publish();
        assert_eq!(rx.borrow().observed_resource_version, 9);
    }

    /// Issue 15 item 6: re-detection ran only on poll-triggered reads, so a steady stream of
    /// nf_tables events kept it from ever running. It now has its own timer.
    #[test]
    fn item6_mode_redetection_runs_on_its_own_timer() {
        let resync = Duration::from_secs(30);
        assert!(redetect_due(None, Duration::from_secs(31), resync));
        assert!(!redetect_due(None, Duration::from_secs(5), resync));
        assert!(
            !redetect_due(Some(Mode::Nftables), Duration::from_secs(600), resync),
            "a given mode is not re-detected"
        );
    }

    #[test]
    fn polled_full_reads_leave_the_core_idle_two_thirds_of_the_time() {
        let (poll, resync) = (Duration::from_secs(1), Duration::from_secs(30));
        let legacy = Some((ChangeSource::Poll, false));
        let ipvs = Some((ChangeSource::Poll, true));
        let cheap = Duration::from_millis(3);
        let costly = Duration::from_millis(2500);
        // iptables-legacy at 30k Services: a 2.5 s read is followed by 5 s of rest.
        assert_eq!(poll_period(poll, resync, legacy, false, true, costly), costly * 2);
        assert_eq!(poll_period(poll, resync, legacy, false, true, cheap), poll);
        // Targeted polls (IPVS) stay at the poll interval whatever a full read costs.
        assert_eq!(poll_period(poll, resync, ipvs, false, true, costly), poll);
        // Nothing pending: resync; notifications: resync; no reader yet: retry within 5 s.
        assert_eq!(poll_period(poll, resync, legacy, false, false, costly), resync);
        let events = Some((ChangeSource::NfTablesEvents, true));
        assert_eq!(poll_period(poll, resync, events, true, true, cheap), resync);
        assert_eq!(poll_period(poll, resync, events, false, true, cheap), poll);
        assert_eq!(
            poll_period(poll, resync, None, false, true, cheap),
            Duration::from_secs(5)
        );
    }
}

#[cfg(test)]
mod invariant;
