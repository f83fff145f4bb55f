//! Cluster-wide convergence for one pod: the logic behind `GET /v1/hold` and `kube-converge
//! isolate`.
//!
//! The verdict is a pure function of watched state ([`World`]: the namespace's EndpointSlices
//! and Services, the Nodes, the NodeConvergence objects) and of the pod's addresses, every
//! family. A node has converged for the pod when its agent is fresh, watches the pod's
//! Services, has processed the EndpointSlice change (observedResourceVersion >= the version
//! that removed the endpoint, a slice deletion included), lists none of the pod's addresses as
//! pending or stale, and kube-proxy is no longer meant to route to them there (an endpoint kept
//! as the last serving one, or by a Local fallback, still gets traffic). It never says
//! "converged" while any of that is unknown. [`Feed`] keeps a [`World`] up to date from
//! watches, so a hold costs a few watches, not a LIST of the cluster per tick.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::ListParams;
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, ResourceExt};
use serde::Serialize;
use tokio::sync::Notify;

use crate::crd::{NodeConvergence, NodeConvergenceStatus};
use crate::expected::{expect_service_with, Semantics, ServiceSpec, SliceRecord};
use crate::k8s;
use crate::model::{ServiceRef, Timestamp};
use crate::selector::LabelSelector;

#[derive(Clone, Debug, Default)]
pub struct HoldTarget {
    pub namespace: String,
    pub pod: Option<String>,
    pub ip: Option<IpAddr>,
    /// Services the pod belonged to before a relabel (`isolate` knows them; slices no longer say).
    pub services: BTreeSet<String>,
    /// Wait for the pod to be routed again (restore) instead of no longer routed.
    pub addition: bool,
}

#[derive(Clone, Debug)]
pub struct HoldOptions {
    pub timeout: Duration,
    /// How often the verdict is re-evaluated without a watch event (heartbeat ages move).
    pub poll: Duration,
    /// A node whose heartbeat is older than this is stale.
    pub stale_after: Duration,
    /// Stop waiting for stale nodes, nodes without an agent and nodes whose agent does not
    /// watch the pod's Services after this long; `None` waits.
    pub skip_stale_after: Option<Duration>,
    /// Do not wait for nodes that are not Ready. Off by default: a partitioned node keeps its
    /// old rules and still routes to the pod.
    pub skip_not_ready: bool,
}

impl Default for HoldOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(30),
            poll: Duration::from_secs(1),
            stale_after: Duration::from_secs(90),
            skip_stale_after: None,
            skip_not_ready: false,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    Converged,
    /// The agent lists a pending (or unknown, or timed-out) change for one of the pod's IPs.
    Pending,
    /// The agent lists one of the pod's IPs as stale: routed, although no longer expected.
    StillRouted,
    /// The agent has not processed the EndpointSlice change yet.
    Lagging,
    /// kube-proxy is still meant to route to the endpoint on this node.
    StillExpected,
    /// The agent's last reads could not tell whether the node routes the pod's addresses.
    Unknown,
    /// The agent's heartbeat is too old.
    Stale,
    /// No NodeConvergence object: no agent on this node.
    NoAgent,
    /// The node's agent does not watch the pod's Services (`--namespace`, `--label-selector`).
    OutOfScope,
    /// Stale, without agent or out of scope, and skipped after --skip-stale-after; or not
    /// Ready and skipped by --skip-not-ready.
    Skipped,
}

impl NodeState {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Converged => "converged",
            NodeState::Pending => "pending",
            NodeState::StillRouted => "still-routed",
            NodeState::Lagging => "lagging",
            NodeState::StillExpected => "still-expected",
            NodeState::Unknown => "unknown",
            NodeState::Stale => "stale",
            NodeState::NoAgent => "no-agent",
            NodeState::OutOfScope => "out-of-scope",
            NodeState::Skipped => "skipped",
        }
    }

    /// Nothing left to wait for on this node (converged, or skipped by an explicit option).
    pub fn done(self) -> bool {
        matches!(self, NodeState::Converged | NodeState::Skipped)
    }
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeSummary {
    pub node: String,
    pub state: NodeState,
    pub mode: String,
    pub heartbeat_age_seconds: Option<f64>,
    pub observed_resource_version: u64,
    /// The node's measured lag for the pod (the slowest of its IPs), when it has converged and
    /// still lists it.
    pub lag_seconds: Option<f64>,
    pub end_to_end_seconds: Option<f64>,
    /// New connections this node still sent to the pod after its removal, before it converged
    /// (the lag's cost), from the node's live-traffic check; `None` when it reports none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connections_before_converged: Option<u64>,
    /// The same after the node reported the removal programmed: must be 0.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connections_after_converged: Option<u64>,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HoldReport {
    pub converged: bool,
    pub namespace: String,
    pub pod: Option<String>,
    /// The pod's first IP (`ips` has every family).
    pub ip: String,
    pub ips: Vec<String>,
    pub required_resource_version: u64,
    /// The Service version (a traffic-policy change) every agent must have processed.
    pub required_service_resource_version: u64,
    /// The API already shows the change (the endpoint left, or came back); until then nodes
    /// cannot converge.
    pub changed_in_api: bool,
    pub waited_seconds: f64,
    pub nodes: Vec<NodeSummary>,
}

impl HoldReport {
    pub fn converged_nodes(&self) -> usize {
        self.nodes.iter().filter(|n| n.state.done()).count()
    }

    pub fn waiting_on(&self) -> Vec<String> {
        self.nodes
            .iter()
            .filter(|n| !n.state.done())
            .map(|n| format!("{} ({})", n.node, n.state.as_str()))
            .collect()
    }

    pub fn table(&self) -> String {
        let secs = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.3}s"));
        let mut rows = vec![[
            "NODE".to_string(),
            "STATE".into(),
            "MODE".into(),
            "LAG".into(),
            "E2E".into(),
            "HEARTBEAT".into(),
            "CONNS BEFORE/AFTER".into(),
        ]];
        for n in &self.nodes {
            rows.push([
                n.node.clone(),
                n.state.as_str().into(),
                n.mode.clone(),
                secs(n.lag_seconds),
                secs(n.end_to_end_seconds),
                n.heartbeat_age_seconds.map_or("-".into(), |a| format!("{a:.0}s ago")),
                match (n.connections_before_converged, n.connections_after_converged) {
                    (Some(b), Some(a)) => format!("{b}/{a}"),
                    _ => "-".into(),
                },
            ]);
        }
        crate::table::render(&rows)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HoldError {
    #[error("pod {namespace}/{pod} not found")]
    PodNotFound { namespace: String, pod: String },
    #[error("pod {namespace}/{pod} has no IP yet; nothing routes to it")]
    PodHasNoIp { namespace: String, pod: String },
    #[error("no pod{} has IP {ip}", .namespace.as_ref().map(|n| format!(" in namespace {n}")).unwrap_or_default())]
    IpNotFound { namespace: Option<String>, ip: IpAddr },
    #[error("{0}")]
    BadRequest(String),
    #[error("talking to the API server: {0}")]
    Api(#[from] kube::Error),
    #[error("watching the cluster for the hold: {0}")]
    Watch(String),
}

/// The pod a hold is about, with every address it has (dual-stack: one per family).
#[derive(Clone, Debug, PartialEq)]
pub struct Subject {
    pub namespace: String,
    pub pod: Option<String>,
    pub ips: Vec<IpAddr>,
}

/// Every address of the pod (dual-stack: one per family), `podIP` first.
pub fn pod_ips(pod: &Pod) -> Vec<IpAddr> {
    let status = pod.status.as_ref();
    let mut ips: Vec<IpAddr> = status
        .and_then(|s| s.pod_ips.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|p| p.ip.parse().ok())
        .collect();
    if let Some(ip) = status.and_then(|s| s.pod_ip.as_deref()).and_then(|ip| ip.parse().ok()) {
        if !ips.contains(&ip) {
            ips.insert(0, ip);
        }
    }
    ips
}

/// Resolves the pod and every address it has. A pod name and an IP that disagree are a bad
/// request; an IP no pod has is not found (a hold never answers for an IP it cannot place).
pub async fn resolve(client: &Client, target: &HoldTarget) -> Result<Subject, HoldError> {
    let ns = (!target.namespace.is_empty()).then(|| target.namespace.clone());
    let Some(pod_name) = target.pod.clone() else {
        let ip = target
            .ip
            .ok_or_else(|| HoldError::BadRequest("give a pod or an ip".into()))?;
        let pods: Api<Pod> = match &ns {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        };
        return pod_with_ip(pods.list(&ListParams::default()).await?.items, ns, ip);
    };
    let namespace = target.namespace.clone();
    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let pod = match pods.get(&pod_name).await {
        Ok(p) => p,
        Err(kube::Error::Api(e)) if e.code == 404 => {
            return Err(HoldError::PodNotFound {
                namespace,
                pod: pod_name,
            })
        }
        Err(e) => return Err(e.into()),
    };
    subject_of(&namespace, &pod_name, &pod, target.ip)
}

/// The subject for a named pod; `ip`, when given too, must be one of its addresses.
fn subject_of(namespace: &str, pod_name: &str, pod: &Pod, ip: Option<IpAddr>) -> Result<Subject, HoldError> {
    let ips = pod_ips(pod);
    if ips.is_empty() {
        return Err(HoldError::PodHasNoIp {
            namespace: namespace.into(),
            pod: pod_name.into(),
        });
    }
    if let Some(ip) = ip {
        if !ips.contains(&ip) {
            return Err(HoldError::BadRequest(format!(
                "ip={ip} is not an IP of pod {namespace}/{pod_name} (it has {})",
                ips.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(", ")
            )));
        }
    }
    Ok(Subject {
        namespace: namespace.into(),
        pod: Some(pod_name.into()),
        ips,
    })
}

/// The pod among `pods` with address `ip`.
fn pod_with_ip(pods: Vec<Pod>, namespace: Option<String>, ip: IpAddr) -> Result<Subject, HoldError> {
    let pod = pods
        .into_iter()
        .find(|p| pod_ips(p).contains(&ip))
        .ok_or(HoldError::IpNotFound { namespace, ip })?;
    Ok(Subject {
        namespace: pod.namespace().unwrap_or_default(),
        ips: pod_ips(&pod),
        pod: Some(pod.name_any()),
    })
}

/// An EndpointSlice as the verdict needs it.
#[derive(Clone, Debug, PartialEq)]
pub struct WorldSlice {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub record: SliceRecord,
}

#[derive(Clone, Debug, PartialEq)]
pub struct WorldService {
    pub labels: BTreeMap<String, String>,
    pub resource_version: u64,
    /// `None` for a Service kube-proxy ignores (headless).
    pub spec: Option<ServiceSpec>,
}

/// A Node as the verdict needs it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WorldNode {
    pub ready: bool,
    /// `topology.kubernetes.io/zone` (zone hints).
    pub zone: Option<String>,
}

impl WorldNode {
    pub fn ready() -> Self {
        Self {
            ready: true,
            zone: None,
        }
    }
}

/// What a hold knows of the cluster at one moment, for one namespace.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct World {
    pub slices: BTreeMap<String, WorldSlice>,
    /// The highest resourceVersion at which a slice of each Service was deleted (a deletion
    /// leaves no slice to carry its version).
    pub deleted: BTreeMap<String, u64>,
    /// After a relist, the collection's version: whatever it no longer has may have been
    /// deleted at any version up to this one.
    pub floor: u64,
    pub services: BTreeMap<String, WorldService>,
    /// The resourceVersion at which each deleted Service was deleted.
    pub services_deleted: BTreeMap<String, u64>,
    /// Every (endpoint address, Service) a slice has listed while watched: a hold started
    /// before a relabel still knows the Services the pod left once their slices no longer
    /// say (or are deleted).
    pub seen: BTreeSet<(IpAddr, String)>,
    /// Node name and whether it is Ready.
    pub nodes: BTreeMap<String, WorldNode>,
    pub convergences: BTreeMap<String, NodeConvergenceStatus>,
}

fn family(ip: IpAddr) -> &'static str {
    if ip.is_ipv4() {
        "ipv4"
    } else {
        "ipv6"
    }
}

fn endpoint_ready(r: &SliceRecord, ip: IpAddr) -> bool {
    r.endpoints
        .iter()
        .any(|e| e.address == ip && e.conditions.ready && !e.conditions.terminating)
}

/// Whether a node's agent watches every object the hold depends on.
fn in_scope(
    st: &NodeConvergenceStatus,
    ns: &str,
    services: &[(&String, &WorldService)],
    slices: &[&WorldSlice],
) -> bool {
    if st.watch_namespace.as_deref().is_some_and(|w| w != ns) {
        return false;
    }
    let Some(sel) = &st.watch_label_selector else {
        return true;
    };
    // An agent's selector this version cannot read: never assume it covers the pod.
    let Ok(sel) = LabelSelector::parse(sel) else {
        return false;
    };
    services.iter().all(|(_, s)| sel.matches(&s.labels)) && slices.iter().all(|s| sel.matches(&s.labels))
}

/// The verdict: a pure function of the subject, the world and the time waited.
pub fn verdict(
    subject: &Subject,
    target: &HoldTarget,
    world: &World,
    opts: &HoldOptions,
    now: Timestamp,
    waited: Duration,
) -> HoldReport {
    let ips = &subject.ips;
    let ip_strings: Vec<String> = ips.iter().map(|i| i.to_string()).collect();
    let mut services: BTreeSet<String> = target.services.clone();
    services.extend(
        world
            .seen
            .iter()
            .filter(|(ip, _)| ips.contains(ip))
            .map(|(_, svc)| svc.clone()),
    );
    // What agents list for the pod's addresses names Services too (a hold started after a
    // relabel: the slices no longer say).
    let listed = |ns: &str, ip: &str| ns == subject.namespace && ip_strings.iter().any(|i| i == ip);
    for st in world.convergences.values() {
        services.extend(
            st.pending
                .iter()
                .filter(|p| listed(&p.namespace, &p.ip))
                .map(|p| p.service.clone()),
        );
        services.extend(
            st.stale
                .iter()
                .filter(|p| listed(&p.namespace, &p.ip))
                .map(|p| p.service.clone()),
        );
        services.extend(
            st.recent
                .iter()
                .filter(|p| listed(&p.namespace, &p.ip))
                .map(|p| p.service.clone()),
        );
    }
    for s in world.slices.values() {
        if s.record.endpoints.iter().any(|e| ips.contains(&e.address)) {
            services.insert(s.record.service.name.clone());
        }
    }
    let relevant: Vec<&WorldSlice> = world
        .slices
        .values()
        .filter(|s| services.contains(&s.record.service.name))
        .collect();
    let relevant_services: Vec<(&String, &WorldService)> =
        world.services.iter().filter(|(n, _)| services.contains(*n)).collect();
    let required = relevant
        .iter()
        .map(|s| s.record.resource_version)
        .chain(services.iter().filter_map(|n| world.deleted.get(n).copied()))
        .chain(std::iter::once(world.floor))
        .max()
        .unwrap_or(0);
    let required_services = relevant_services
        .iter()
        .map(|(_, s)| s.resource_version)
        .chain(services.iter().filter_map(|n| world.services_deleted.get(n).copied()))
        .max()
        .unwrap_or(0);
    let expected_on = |node: &str, zone: Option<&String>, mode: &str| -> bool {
        let semantics = Semantics {
            local_falls_back_to_cluster: mode == "ipvs",
            zone: zone.cloned(),
        };
        services.iter().any(|name| {
            let r = ServiceRef::new(&subject.namespace, name);
            let recs: Vec<&SliceRecord> = relevant
                .iter()
                .filter(|s| s.record.service.name == *name)
                .map(|s| &s.record)
                .collect();
            let spec = world.services.get(name).and_then(|s| s.spec.as_ref());
            expect_service_with(&r, spec, &recs, node, &semantics)
                .expected
                .iter()
                .any(|k| ips.contains(&k.endpoint.ip()))
        })
    };
    // The change is in the API once no address of the pod is ready anywhere (removal), or
    // every one is ready again (addition).
    let ready = |ip: IpAddr| relevant.iter().any(|s| endpoint_ready(&s.record, ip));
    let changed_in_api = if target.addition {
        !ips.is_empty() && ips.iter().all(|ip| ready(*ip))
    } else {
        !ips.iter().any(|ip| ready(*ip))
    };

    let skip_absent = opts.skip_stale_after.is_some_and(|d| waited >= d);
    let absent = |state: NodeState| if skip_absent { NodeState::Skipped } else { state };
    let mut summaries = Vec::new();
    // Every Node, and every agent that is alive although its Node is gone or not yet seen (a
    // node being drained away still routes until it stops).
    let fresh = |st: &NodeConvergenceStatus| {
        Timestamp::parse_rfc3339(&st.heartbeat_time)
            .is_some_and(|t| now.seconds_since(t) <= opts.stale_after.as_secs_f64())
    };
    let orphans: BTreeMap<String, WorldNode> = world
        .convergences
        .iter()
        .filter(|(name, st)| !world.nodes.contains_key(*name) && fresh(st))
        .map(|(name, _)| (name.clone(), WorldNode::default()))
        .collect();
    for (name, info) in world.nodes.iter().chain(&orphans) {
        let ready = info.ready;
        let mut summary = NodeSummary {
            node: name.clone(),
            state: NodeState::Converged,
            mode: "-".into(),
            heartbeat_age_seconds: None,
            observed_resource_version: 0,
            lag_seconds: None,
            end_to_end_seconds: None,
            connections_before_converged: None,
            connections_after_converged: None,
        };
        let status = world.convergences.get(name);
        summary.state = if !ready && opts.skip_not_ready {
            NodeState::Skipped
        } else if let Some(st) = status {
            let age = Timestamp::parse_rfc3339(&st.heartbeat_time).map(|t| now.seconds_since(t));
            let observed: u64 = st.observed_resource_version.parse().unwrap_or(0);
            let observed_services: u64 = st.observed_service_resource_version.parse().unwrap_or(0);
            summary.mode = st.mode.clone();
            summary.heartbeat_age_seconds = age;
            summary.observed_resource_version = observed;
            let lists = |list_ip: &String| ip_strings.contains(list_ip);
            if !in_scope(st, &subject.namespace, &relevant_services, &relevant) {
                absent(NodeState::OutOfScope)
            } else if age.is_none_or(|a| a > opts.stale_after.as_secs_f64()) {
                absent(NodeState::Stale)
            } else if observed < required || observed_services < required_services {
                NodeState::Lagging
            } else if st.pending.iter().any(|p| lists(&p.ip)) || (st.pending_truncated > 0 && !target.addition) {
                // A truncated list may hide the IP: never assume it is not there.
                NodeState::Pending
            } else if !target.addition && (st.stale.iter().any(|s| lists(&s.ip)) || st.stale_truncated > 0) {
                NodeState::StillRouted
            } else if !target.addition && ips.iter().any(|ip| st.stale_unknown.iter().any(|f| f == family(*ip))) {
                NodeState::Unknown
            } else if !target.addition && expected_on(name, info.zone.as_ref(), &st.mode) {
                NodeState::StillExpected
            } else if !changed_in_api {
                NodeState::Lagging
            } else {
                NodeState::Converged
            }
        } else {
            absent(NodeState::NoAgent)
        };
        if let Some(st) = status {
            let recent = st
                .recent
                .iter()
                .filter(|r| ip_strings.contains(&r.ip) && (r.change == "added") == target.addition);
            for r in recent {
                summary.lag_seconds = Some(summary.lag_seconds.map_or(r.lag_seconds, |l| l.max(r.lag_seconds)));
                if let Some(e) = r.end_to_end_seconds {
                    summary.end_to_end_seconds = Some(summary.end_to_end_seconds.map_or(e, |l| l.max(e)));
                }
            }
            for t in st.traffic.iter().filter(|t| ip_strings.contains(&t.ip)) {
                *summary.connections_before_converged.get_or_insert(0) += t.before_converged;
                *summary.connections_after_converged.get_or_insert(0) += t.after_converged;
            }
        }
        summaries.push(summary);
    }
    // No node at all is no proof of anything.
    let converged = changed_in_api && !summaries.is_empty() && summaries.iter().all(|n| n.state.done());
    HoldReport {
        converged,
        namespace: subject.namespace.clone(),
        pod: subject.pod.clone(),
        ip: ip_strings.first().cloned().unwrap_or_default(),
        ips: ip_strings,
        required_resource_version: required,
        required_service_resource_version: required_services,
        changed_in_api,
        waited_seconds: waited.as_secs_f64(),
        nodes: summaries,
    }
}

fn node_of(node: &Node) -> WorldNode {
    WorldNode {
        ready: node
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True")),
        zone: node.labels().get(k8s::ZONE_LABEL).cloned(),
    }
}

/// One watch's part of the state: the list in progress, the live map, and the watch's index
/// in `FeedState::synced` (0 is the EndpointSlices).
type Part<T> = fn(&mut FeedState) -> (&mut Option<BTreeMap<String, T>>, &mut BTreeMap<String, T>, usize);

#[derive(Default)]
struct FeedState {
    world: World,
    /// Which of the four watches have their current list in place (a relist in progress, or
    /// the slices' floor after one, clears it).
    synced: [bool; 4],
    /// Which of the four watches have completed a list at least once.
    listed_once: [bool; 4],
    /// Objects of a (re)list in progress, per watch.
    slices_init: Option<BTreeMap<String, WorldSlice>>,
    services_init: Option<BTreeMap<String, WorldService>>,
    nodes_init: Option<BTreeMap<String, WorldNode>>,
    convergences_init: Option<BTreeMap<String, NodeConvergenceStatus>>,
    slice_lists: u32,
    error: Option<String>,
}

/// A [`World`] kept up to date by watches of one namespace's EndpointSlices and Services, and
/// of the Nodes and NodeConvergence objects. Start it before making the change a hold waits
/// for (as `isolate` does) and it also sees the deletion of a slice the change empties.
pub struct Feed {
    state: Arc<Mutex<FeedState>>,
    changed: Arc<Notify>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Feed {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn slice_of(s: &EndpointSlice) -> Option<WorldSlice> {
    let (mut record, _) = k8s::slice_record(s).ok()?;
    // An unreadable version must not lower what agents have to reach.
    record.resource_version = deletion_version(s);
    Some(WorldSlice {
        name: s.name_any(),
        labels: s.labels().clone(),
        record,
    })
}

fn service_of(s: &Service) -> WorldService {
    WorldService {
        labels: s.labels().clone(),
        resource_version: s.resource_version().and_then(|v| v.parse().ok()).unwrap_or(u64::MAX),
        spec: k8s::service_spec(s),
    }
}

/// One watch feeding one part of the state; `index` names it in `synced`.
fn spawn_watch<K, T>(
    api: Api<K>,
    config: watcher::Config,
    feed: (&Arc<Mutex<FeedState>>, &Arc<Notify>),
    convert: fn(&K) -> Option<(String, T)>,
    part: Part<T>,
    on_delete: fn(&mut FeedState, &K),
    on_relist: Option<Api<K>>,
) -> tokio::task::JoinHandle<()>
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
    K::DynamicType: Default,
    T: Send + 'static,
{
    let (state, changed) = (feed.0.clone(), feed.1.clone());
    tokio::spawn(async move {
        // Errors are retried with kube-runtime's backoff, not in a hot loop.
        let mut stream = watcher::watcher(api, config).default_backoff().boxed();
        while let Some(ev) = stream.next().await {
            // A relist's floor: the collection's version once the list is in.
            let mut relisted = false;
            {
                let Ok(mut st) = state.lock() else { return };
                match ev {
                    Ok(watcher::Event::Init) => *part(&mut st).0 = Some(BTreeMap::new()),
                    Ok(watcher::Event::InitApply(o)) => {
                        if let Some((k, v)) = convert(&o) {
                            part(&mut st).0.get_or_insert_with(BTreeMap::new).insert(k, v);
                        }
                    }
                    Ok(watcher::Event::InitDone) => {
                        let (init, live, index) = part(&mut st);
                        *live = init.take().unwrap_or_default();
                        let first = !st.listed_once[index];
                        st.listed_once[index] = true;
                        st.synced[index] = true;
                        if index == 0 {
                            st.slice_lists += 1;
                            relisted = !first && on_relist.is_some();
                            remember_endpoints(&mut st, None);
                            // Until the floor is raised, a deletion the watch missed is unknown:
                            // no verdict meanwhile.
                            st.synced[0] = !relisted;
                        }
                    }
                    Ok(watcher::Event::Apply(o)) => {
                        if let Some((k, v)) = convert(&o) {
                            part(&mut st).1.insert(k.clone(), v);
                            if index_of(part, &mut st) == 0 {
                                remember_endpoints(&mut st, Some(&k));
                            }
                        }
                    }
                    Ok(watcher::Event::Delete(o)) => {
                        part(&mut st).1.remove(&o.name_any());
                        on_delete(&mut st, &o);
                    }
                    Err(e) => st.error = Some(e.to_string()),
                }
            }
            if relisted {
                if let Some(api) = &on_relist {
                    // Deletions the watch missed happened at or before the collection's
                    // current version: every Service's required version rises to it.
                    match api.list_metadata(&ListParams::default().limit(1)).await {
                        Ok(list) => {
                            let rv = list
                                .metadata
                                .resource_version
                                .and_then(|v| v.parse().ok())
                                .unwrap_or(u64::MAX);
                            if let Ok(mut st) = state.lock() {
                                st.world.floor = st.world.floor.max(rv);
                                st.synced[0] = true;
                            }
                        }
                        Err(e) => {
                            if let Ok(mut st) = state.lock() {
                                st.world.floor = u64::MAX;
                                st.error = Some(format!("after a relist: {e}"));
                                st.synced[0] = true;
                            }
                        }
                    }
                }
            }
            changed.notify_waiters();
        }
    })
}

fn index_of<T>(part: Part<T>, st: &mut FeedState) -> usize {
    part(st).2
}

/// Records which Services' slices list which addresses (see `World::seen`): of one slice, or
/// of all after a list.
fn remember_endpoints(st: &mut FeedState, slice: Option<&str>) {
    let w = &mut st.world;
    let slices: Vec<&WorldSlice> = match slice {
        Some(name) => w.slices.get(name).into_iter().collect(),
        None => w.slices.values().collect(),
    };
    for s in slices {
        for e in &s.record.endpoints {
            w.seen.insert((e.address, s.record.service.name.clone()));
        }
    }
}

/// The version a deletion happened at; unreadable, the highest (never too low).
fn deletion_version<K: kube::Resource>(o: &K) -> u64 {
    o.resource_version().and_then(|v| v.parse().ok()).unwrap_or(u64::MAX)
}

fn raise(map: &mut BTreeMap<String, u64>, key: &str, rv: u64) {
    let e = map.entry(key.to_string()).or_default();
    *e = (*e).max(rv);
}

impl Feed {
    /// Starts the watches for `namespace`.
    pub fn start(client: &Client, namespace: &str) -> Self {
        let state = Arc::new(Mutex::new(FeedState::default()));
        let changed = Arc::new(Notify::new());
        let feed = (&state, &changed);
        let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), namespace);
        let services: Api<Service> = Api::namespaced(client.clone(), namespace);
        let tasks = vec![
            spawn_watch(
                slices.clone(),
                watcher::Config::default().labels(k8s::KUBE_PROXY_SELECTOR),
                feed,
                |s| Some((s.name_any(), slice_of(s)?)),
                |st| (&mut st.slices_init, &mut st.world.slices, 0),
                |st, s| {
                    if let Some(svc) = s.labels().get(k8s::SERVICE_NAME_LABEL) {
                        raise(&mut st.world.deleted, svc, deletion_version(s));
                    }
                },
                Some(slices),
            ),
            spawn_watch(
                services,
                watcher::Config::default(),
                feed,
                |s| Some((s.name_any(), service_of(s))),
                |st| (&mut st.services_init, &mut st.world.services, 1),
                |st, s| raise(&mut st.world.services_deleted, &s.name_any(), deletion_version(s)),
                None,
            ),
            spawn_watch(
                Api::<Node>::all(client.clone()),
                watcher::Config::default(),
                feed,
                |n| Some((n.name_any(), node_of(n))),
                |st| (&mut st.nodes_init, &mut st.world.nodes, 2),
                |_, _| {},
                None,
            ),
            spawn_watch(
                Api::<NodeConvergence>::all(client.clone()),
                watcher::Config::default(),
                feed,
                |c| Some((c.name_any(), c.status.clone()?)),
                |st| (&mut st.convergences_init, &mut st.world.convergences, 3),
                |_, _| {},
                None,
            ),
        ];
        Self { state, changed, tasks }
    }

    /// The current world, once every watch has listed; else the last watch error, if any.
    fn snapshot(&self) -> Result<Option<World>, String> {
        let st = self.state.lock().map_err(|_| "hold state poisoned".to_string())?;
        if st.synced.iter().all(|s| *s) {
            Ok(Some(st.world.clone()))
        } else if st.listed_once.iter().all(|s| *s) {
            // A relist is under way: wait for it, errors included (the watcher retries).
            Ok(None)
        } else {
            st.error.clone().map_or(Ok(None), Err)
        }
    }

    /// Waits until every watch has listed (the state a change must be made after), or
    /// `timeout`.
    pub async fn synced(&self, timeout: Duration) -> Result<(), HoldError> {
        let deadline = Instant::now() + timeout;
        loop {
            let notified = self.changed.notified();
            match self.snapshot() {
                Ok(Some(_)) => return Ok(()),
                Err(e) if Instant::now() >= deadline => return Err(HoldError::Watch(e)),
                _ if Instant::now() >= deadline => {
                    return Err(HoldError::Watch("the watches did not list in time".into()))
                }
                _ => {}
            }
            let _ = tokio::time::timeout(Duration::from_millis(200).min(timeout), notified).await;
        }
    }

    /// Waits until the pod has converged on every node, or the timeout. `Ok` carries the last
    /// report either way: check `converged`.
    pub async fn wait(
        &self,
        subject: &Subject,
        target: &HoldTarget,
        opts: &HoldOptions,
        mut progress: impl FnMut(&HoldReport),
    ) -> Result<HoldReport, HoldError> {
        self.wait_with(opts, |world, now, waited| {
            let report = verdict(subject, target, world, opts, now, waited);
            progress(&report);
            let converged = report.converged;
            (report, converged)
        })
        .await
    }

    /// Evaluates `evaluate(world, now, waited)` on every change of the world (and at least every
    /// `opts.poll`) until it answers done or `opts.timeout` has passed; returns its last answer.
    /// [`Feed::wait`] for one pod, `switch` for a set of them.
    pub async fn wait_with<R>(
        &self,
        opts: &HoldOptions,
        mut evaluate: impl FnMut(&World, Timestamp, Duration) -> (R, bool),
    ) -> Result<R, HoldError> {
        let start = Instant::now();
        self.synced(opts.timeout.max(Duration::from_secs(5))).await?;
        let mut last = None;
        loop {
            let notified = self.changed.notified();
            // Between a relist and its floor the world is not complete: no verdict from it.
            match self.snapshot() {
                Ok(Some(world)) => {
                    let (answer, done) = evaluate(&world, Timestamp::now(), start.elapsed());
                    if done {
                        return Ok(answer);
                    }
                    last = Some(answer);
                }
                Ok(None) => {}
                Err(e) => return Err(HoldError::Watch(e)),
            }
            if start.elapsed() >= opts.timeout {
                return last.ok_or_else(|| HoldError::Watch("the watches did not list in time".into()));
            }
            let left = opts.timeout.saturating_sub(start.elapsed());
            let _ = tokio::time::timeout(opts.poll.min(left), notified).await;
        }
    }
}

/// Resolves the pod, watches the cluster and waits until the pod has converged on every node,
/// or the timeout.
pub async fn hold_until_converged(
    client: &Client,
    target: &HoldTarget,
    opts: &HoldOptions,
    progress: impl FnMut(&HoldReport),
) -> Result<HoldReport, HoldError> {
    let subject = resolve(client, target).await?;
    let feed = Feed::start(client, &subject.namespace);
    feed.wait(&subject, target, opts, progress).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{PendingEndpoint, StaleEndpoint};
    use crate::expected::builders::{slice, svc};

    const NOW_MS: i64 = 1_000_000;

    fn now() -> Timestamp {
        Timestamp::from_millis(NOW_MS)
    }

    /// A fresh agent that has processed version `rv`, lists nothing.
    fn agent(rv: u64) -> NodeConvergenceStatus {
        NodeConvergenceStatus {
            mode: "iptables".into(),
            health: "Healthy".into(),
            observed_resource_version: rv.to_string(),
            observed_service_resource_version: rv.to_string(),
            heartbeat_time: Timestamp::from_millis(NOW_MS - 1000).to_rfc3339(),
            ..Default::default()
        }
    }

    fn pending(ip: &str) -> PendingEndpoint {
        PendingEndpoint {
            ip: ip.into(),
            change: "removed".into(),
            state: "pending".into(),
            ..Default::default()
        }
    }

    fn subject(ips: &[&str]) -> Subject {
        Subject {
            namespace: "ns1".into(),
            pod: Some("web-0".into()),
            ips: ips.iter().map(|i| i.parse().unwrap()).collect(),
        }
    }

    fn removal() -> HoldTarget {
        HoldTarget {
            namespace: "ns1".into(),
            pod: Some("web-0".into()),
            ..Default::default()
        }
    }

    fn world_slice(name: &str, rv: u64, record: SliceRecord) -> (String, WorldSlice) {
        let mut record = record;
        record.resource_version = rv;
        let labels = [(k8s::SERVICE_NAME_LABEL.to_string(), record.service.name.clone())].into();
        (
            name.to_string(),
            WorldSlice {
                name: name.into(),
                labels,
                record,
            },
        )
    }

    /// Service ns1/svc1; its slice `a` (version 10) has 10.180.0.2 ready and 10.180.0.1
    /// terminating; nodes node-a and node-b, both Ready, with agents at version 10.
    fn world() -> World {
        let (_, spec) = svc("ns1/svc1");
        let s = slice("ns1/svc1")
            .endpoint("10.180.0.1")
            .terminating()
            .endpoint("10.180.0.2")
            .build();
        World {
            slices: [world_slice("a", 10, s)].into(),
            services: [(
                "svc1".to_string(),
                WorldService {
                    labels: [("app".to_string(), "web".to_string())].into(),
                    resource_version: 3,
                    spec: Some(spec),
                },
            )]
            .into(),
            nodes: [
                ("node-a".to_string(), WorldNode::ready()),
                ("node-b".to_string(), WorldNode::ready()),
            ]
            .into(),
            convergences: [("node-a".to_string(), agent(10)), ("node-b".to_string(), agent(10))].into(),
            ..Default::default()
        }
    }

    fn run(subject: &Subject, target: &HoldTarget, world: &World, opts: &HoldOptions) -> HoldReport {
        verdict(subject, target, world, opts, now(), Duration::from_secs(1))
    }

    fn state(r: &HoldReport, node: &str) -> NodeState {
        r.nodes.iter().find(|n| n.node == node).unwrap().state
    }

    #[test]
    fn a_terminating_endpoint_no_node_lists_has_converged() {
        let r = run(&subject(&["10.180.0.1"]), &removal(), &world(), &HoldOptions::default());
        assert!(r.converged, "{r:?}");
        assert_eq!(r.required_resource_version, 10);
    }

    #[test]
    fn a_pending_or_lagging_node_blocks() {
        let mut w = world();
        w.convergences
            .get_mut("node-a")
            .unwrap()
            .pending
            .push(pending("10.180.0.1"));
        w.convergences.get_mut("node-b").unwrap().observed_resource_version = "9".into();
        let r = run(&subject(&["10.180.0.1"]), &removal(), &w, &HoldOptions::default());
        assert!(!r.converged);
        assert_eq!(state(&r, "node-a"), NodeState::Pending);
        assert_eq!(state(&r, "node-b"), NodeState::Lagging);
    }

    #[test]
    fn item1_dual_stack_pod_waits_for_every_family() {
        let mut w = world();
        // The IPv6 family's slice, and node-a's agent still has the IPv6 removal pending.
        let v6 = slice("ns1/svc1").endpoint("fd00::1").terminating().build();
        w.slices.extend([world_slice("a6", 10, v6)]);
        w.convergences
            .get_mut("node-a")
            .unwrap()
            .pending
            .push(pending("fd00::1"));
        let r = run(
            &subject(&["10.180.0.1", "fd00::1"]),
            &removal(),
            &w,
            &HoldOptions::default(),
        );
        assert!(
            !r.converged,
            "released while node-a still routes the pod's IPv6 address"
        );
        assert_eq!(state(&r, "node-a"), NodeState::Pending);
        assert_eq!(r.ips, ["10.180.0.1", "fd00::1"]);
        // The IPv6 endpoint still ready: the change is not in the API for that family.
        let mut w = world();
        let v6 = slice("ns1/svc1").endpoint("fd00::1").build();
        w.slices.extend([world_slice("a6", 10, v6)]);
        let r = run(
            &subject(&["10.180.0.1", "fd00::1"]),
            &removal(),
            &w,
            &HoldOptions::default(),
        );
        assert!(!r.changed_in_api && !r.converged);
    }

    #[test]
    fn item1_pod_ips_lists_every_family() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web-0", "namespace": "ns1"},
            "status": {"podIP": "10.180.0.1", "podIPs": [{"ip": "10.180.0.1"}, {"ip": "fd00::1"}]}
        }))
        .unwrap();
        let s = subject_of("ns1", "web-0", &pod, None).unwrap();
        assert_eq!(s.ips, subject(&["10.180.0.1", "fd00::1"]).ips);
    }

    #[test]
    fn item2_a_deleted_slice_raises_the_required_version() {
        // The relabel emptied slice `b` (version 12), which the controller deleted at 20; the
        // remaining slice `a` is older. node-b's agent has not processed the deletion.
        let mut w = world();
        w.deleted.insert("svc1".into(), 20);
        w.seen.insert(("10.180.0.9".parse().unwrap(), "svc1".into()));
        w.convergences.get_mut("node-a").unwrap().observed_resource_version = "20".into();
        w.convergences.get_mut("node-b").unwrap().observed_resource_version = "15".into();
        let r = run(&subject(&["10.180.0.9"]), &removal(), &w, &HoldOptions::default());
        assert_eq!(r.required_resource_version, 20);
        assert!(!r.converged);
        assert_eq!(state(&r, "node-a"), NodeState::Converged);
        assert_eq!(state(&r, "node-b"), NodeState::Lagging);
        // Deletions of another Service's slices do not count.
        let mut w2 = world();
        w2.deleted.insert("other".into(), 50);
        assert_eq!(
            run(&subject(&["10.180.0.1"]), &removal(), &w2, &HoldOptions::default()).required_resource_version,
            10
        );
    }

    #[test]
    fn item5_a_node_listing_the_ip_as_stale_blocks() {
        let mut w = world();
        w.convergences.get_mut("node-b").unwrap().stale.push(StaleEndpoint {
            ip: "10.180.0.1".into(),
            ..Default::default()
        });
        let r = run(&subject(&["10.180.0.1"]), &removal(), &w, &HoldOptions::default());
        assert!(!r.converged);
        assert_eq!(state(&r, "node-b"), NodeState::StillRouted);
        let mut w = world();
        w.convergences.get_mut("node-b").unwrap().stale_truncated = 3;
        let r = run(&subject(&["10.180.0.1"]), &removal(), &w, &HoldOptions::default());
        assert_eq!(
            state(&r, "node-b"),
            NodeState::StillRouted,
            "a truncated stale list may hide it"
        );
    }

    /// Found by the random histories (seed 340): a traffic-policy change moves what is
    /// expected, so an agent that has not processed the Service's latest version is lagging.
    #[test]
    fn a_node_behind_the_services_version_is_lagging() {
        let mut w = world();
        w.services.get_mut("svc1").unwrap().resource_version = 12;
        let r = run(&subject(&["10.180.0.1"]), &removal(), &w, &HoldOptions::default());
        assert_eq!(r.required_service_resource_version, 12);
        assert!(!r.converged);
        assert_eq!(state(&r, "node-a"), NodeState::Lagging);
    }

    /// Found by the random histories (seed 7482): after a failed or partial read the agent
    /// does not know which endpoints are stale in that family.
    #[test]
    fn a_node_whose_stale_endpoints_are_unknown_blocks_removals_in_that_family() {
        let mut w = world();
        w.convergences.get_mut("node-b").unwrap().stale_unknown = vec!["ipv6".into()];
        let r = run(&subject(&["10.180.0.1"]), &removal(), &w, &HoldOptions::default());
        assert!(r.converged, "an IPv4-only pod does not wait on the IPv6 family");
        let r = run(
            &subject(&["10.180.0.1", "fd00::1"]),
            &removal(),
            &w,
            &HoldOptions::default(),
        );
        assert!(!r.converged);
        assert_eq!(state(&r, "node-b"), NodeState::Unknown);
    }

    #[test]
    fn item8_not_ready_nodes_are_waited_on_unless_skipped() {
        let mut w = world();
        w.nodes.insert("node-b".into(), WorldNode::default());
        w.convergences.get_mut("node-b").unwrap().heartbeat_time =
            Timestamp::from_millis(NOW_MS - 600_000).to_rfc3339();
        let r = run(&subject(&["10.180.0.1"]), &removal(), &w, &HoldOptions::default());
        assert!(!r.converged, "released while a partitioned node may still route");
        assert_eq!(state(&r, "node-b"), NodeState::Stale);
        let skip = HoldOptions {
            skip_not_ready: true,
            ..Default::default()
        };
        let r = run(&subject(&["10.180.0.1"]), &removal(), &w, &skip);
        assert!(r.converged);
        assert_eq!(state(&r, "node-b"), NodeState::Skipped);
    }

    #[test]
    fn item9_a_node_whose_agent_does_not_watch_the_service_counts_as_without_agent() {
        let opts = HoldOptions::default();
        for (ns, selector, covered) in [
            (Some("other"), None, false),
            (Some("ns1"), None, true),
            (None, Some("app=web"), true),
            (None, Some("app=db"), false),
            (None, Some("app in ("), false),
        ] {
            let mut w = world();
            let st = w.convergences.get_mut("node-b").unwrap();
            st.watch_namespace = ns.map(Into::into);
            st.watch_label_selector = selector.map(Into::into);
            // The slice carries the Service's labels, as the EndpointSlice controller copies them.
            for s in w.slices.values_mut() {
                s.labels.insert("app".into(), "web".into());
            }
            let r = run(&subject(&["10.180.0.1"]), &removal(), &w, &opts);
            assert_eq!(r.converged, covered, "{ns:?} {selector:?}");
            if !covered {
                assert_eq!(state(&r, "node-b"), NodeState::OutOfScope);
            }
        }
        // Skipped like a node without an agent, after --skip-stale-after.
        let mut w = world();
        w.convergences.get_mut("node-b").unwrap().watch_namespace = Some("other".into());
        let skip = HoldOptions {
            skip_stale_after: Some(Duration::ZERO),
            ..Default::default()
        };
        assert!(run(&subject(&["10.180.0.1"]), &removal(), &w, &skip).converged);
    }

    #[test]
    fn item10_ip_and_pod_must_agree_and_an_unknown_ip_is_not_found() {
        let pod = |name: &str, ip: &str| -> Pod {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": name, "namespace": "ns1"},
                "status": {"podIP": ip, "podIPs": [{"ip": ip}]}
            }))
            .unwrap()
        };
        let other: IpAddr = "10.180.0.2".parse().unwrap();
        assert!(matches!(
            subject_of("ns1", "web-0", &pod("web-0", "10.180.0.1"), Some(other)),
            Err(HoldError::BadRequest(_))
        ));
        let pods = vec![pod("web-0", "10.180.0.1"), pod("web-1", "10.180.0.2")];
        let s = pod_with_ip(pods.clone(), Some("ns1".into()), other).unwrap();
        assert_eq!(s.pod.as_deref(), Some("web-1"));
        assert!(matches!(
            pod_with_ip(pods, Some("ns1".into()), "10.180.0.99".parse().unwrap()),
            Err(HoldError::IpNotFound { .. })
        ));
    }

    #[test]
    fn still_expected_nodes_block_a_removal_and_additions_wait_for_the_api() {
        // The only endpoint left is terminating: the serving+terminating fallback keeps it.
        let mut w = world();
        let only = slice("ns1/svc1").endpoint("10.180.0.1").terminating().build();
        w.slices = [world_slice("a", 10, only)].into();
        let r = run(&subject(&["10.180.0.1"]), &removal(), &w, &HoldOptions::default());
        assert!(!r.converged);
        assert_eq!(state(&r, "node-a"), NodeState::StillExpected);
        // An addition of a terminating endpoint is not in the API yet.
        let add = HoldTarget {
            addition: true,
            ..removal()
        };
        let r = run(&subject(&["10.180.0.1"]), &add, &world(), &HoldOptions::default());
        assert!(!r.changed_in_api && !r.converged);
        let r = run(&subject(&["10.180.0.2"]), &add, &world(), &HoldOptions::default());
        assert!(r.converged, "{r:?}");
    }

    /// Review finding: an agent alive on a node the Node watch does not have (deleted while
    /// draining, or not seen yet) is still waited on; a dead one is not.
    #[test]
    fn an_alive_agent_without_a_node_object_is_waited_on() {
        let mut w = world();
        let mut orphan = agent(10);
        orphan.pending.push(pending("10.180.0.1"));
        w.convergences.insert("node-gone".into(), orphan.clone());
        let r = run(&subject(&["10.180.0.1"]), &removal(), &w, &HoldOptions::default());
        assert!(!r.converged);
        assert_eq!(state(&r, "node-gone"), NodeState::Pending);
        orphan.heartbeat_time = Timestamp::from_millis(NOW_MS - 600_000).to_rfc3339();
        w.convergences.insert("node-gone".into(), orphan);
        assert!(run(&subject(&["10.180.0.1"]), &removal(), &w, &HoldOptions::default()).converged);
    }

    /// Review finding: a hold started after a relabel finds the Services the pod left in what
    /// agents list for its addresses.
    #[test]
    fn services_named_by_agents_count_for_a_hold_started_after_a_relabel() {
        let mut w = world();
        // The relabel removed 10.180.0.9 from slice `a` (now version 10); node-a has processed
        // it and lists the removal, node-b has not.
        let mut listed = pending("10.180.0.9");
        listed.namespace = "ns1".into();
        listed.service = "svc1".into();
        w.convergences.get_mut("node-a").unwrap().pending.push(listed);
        w.convergences.get_mut("node-b").unwrap().observed_resource_version = "9".into();
        let r = run(&subject(&["10.180.0.9"]), &removal(), &w, &HoldOptions::default());
        assert_eq!(r.required_resource_version, 10);
        assert!(!r.converged);
        assert_eq!(state(&r, "node-b"), NodeState::Lagging);
    }

    #[test]
    fn no_node_at_all_is_not_converged() {
        let mut w = world();
        w.nodes.clear();
        w.convergences.clear();
        assert!(!run(&subject(&["10.180.0.1"]), &removal(), &w, &HoldOptions::default()).converged);
    }

    #[test]
    fn nodes_without_agent_block_until_skipped() {
        let mut w = world();
        w.nodes.insert("node-c".into(), WorldNode::ready());
        let r = run(&subject(&["10.180.0.1"]), &removal(), &w, &HoldOptions::default());
        assert_eq!(state(&r, "node-c"), NodeState::NoAgent);
        assert!(!r.converged);
        let skip = HoldOptions {
            skip_stale_after: Some(Duration::from_millis(500)),
            ..Default::default()
        };
        assert!(run(&subject(&["10.180.0.1"]), &removal(), &w, &skip).converged);
    }
}
