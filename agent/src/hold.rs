//! Cluster-wide convergence for one pod, from the nodes' published `NodeConvergence` status:
//! the logic behind `GET /v1/hold` and `kube-converge isolate`.
//!
//! A node has converged for the pod's IP when its agent is fresh, has processed the
//! EndpointSlice change (observedResourceVersion >= the slices' resourceVersion), lists no
//! pending change for the IP, and kube-proxy is no longer meant to route to it there (an
//! endpoint kept as the last serving one, or by a Local fallback, still gets traffic). It must
//! never say "converged" while any of that is unknown.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::ListParams;
use kube::{Api, Client, ResourceExt};
use serde::Serialize;

use crate::crd::NodeConvergence;
use crate::expected::{expect_service_with, Semantics, SliceRecord};
use crate::k8s;
use crate::model::{ServiceRef, Timestamp};

#[derive(Clone, Debug, Default)]
pub struct HoldTarget {
    pub namespace: String,
    pub pod: Option<String>,
    pub ip: Option<IpAddr>,
    /// Services the pod belonged to before a relabel (`isolate` knows them; slices no longer say).
    pub services: BTreeSet<String>,
    /// Wait for the IP to be routed again (restore) instead of no longer routed.
    pub addition: bool,
}

#[derive(Clone, Debug)]
pub struct HoldOptions {
    pub timeout: Duration,
    pub poll: Duration,
    /// A node whose heartbeat is older than this is stale.
    pub stale_after: Duration,
    /// Stop waiting for stale nodes and nodes without an agent after this long; `None` waits.
    pub skip_stale_after: Option<Duration>,
}

impl Default for HoldOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(30),
            poll: Duration::from_millis(250),
            stale_after: Duration::from_secs(90),
            skip_stale_after: None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    Converged,
    /// The agent lists a pending (or unknown, or timed-out) change for the IP.
    Pending,
    /// The agent has not processed the EndpointSlice change yet.
    Lagging,
    /// kube-proxy is still meant to route to the endpoint on this node.
    StillExpected,
    /// The agent's heartbeat is too old.
    Stale,
    /// No NodeConvergence object: no agent on this node.
    NoAgent,
    /// Stale or without agent, and skipped after --skip-stale-after.
    Skipped,
}

impl NodeState {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Converged => "converged",
            NodeState::Pending => "pending",
            NodeState::Lagging => "lagging",
            NodeState::StillExpected => "still-expected",
            NodeState::Stale => "stale",
            NodeState::NoAgent => "no-agent",
            NodeState::Skipped => "skipped",
        }
    }

    fn done(self) -> bool {
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
    /// The node's measured lag for this IP, when it has converged and still lists it.
    pub lag_seconds: Option<f64>,
    pub end_to_end_seconds: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HoldReport {
    pub converged: bool,
    pub namespace: String,
    pub pod: Option<String>,
    pub ip: String,
    pub required_resource_version: u64,
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
        ]];
        for n in &self.nodes {
            rows.push([
                n.node.clone(),
                n.state.as_str().into(),
                n.mode.clone(),
                secs(n.lag_seconds),
                secs(n.end_to_end_seconds),
                n.heartbeat_age_seconds.map_or("-".into(), |a| format!("{a:.0}s ago")),
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
    #[error("{0}")]
    BadRequest(String),
    #[error("talking to the API server: {0}")]
    Api(#[from] kube::Error),
}

fn has_ip(slice: &EndpointSlice, ip: &str) -> bool {
    slice
        .endpoints
        .iter()
        .flatten()
        .any(|e| e.addresses.first().is_some_and(|a| a == ip))
}

/// Resolves the pod's IP (the pod may already be gone when only `ip` is given).
pub async fn resolve_ip(client: &Client, target: &HoldTarget) -> Result<IpAddr, HoldError> {
    if let Some(ip) = target.ip {
        return Ok(ip);
    }
    let pod_name = target
        .pod
        .clone()
        .ok_or_else(|| HoldError::BadRequest("give a pod or an ip".into()))?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &target.namespace);
    let pod = match pods.get(&pod_name).await {
        Ok(p) => p,
        Err(kube::Error::Api(e)) if e.code == 404 => {
            return Err(HoldError::PodNotFound {
                namespace: target.namespace.clone(),
                pod: pod_name,
            })
        }
        Err(e) => return Err(e.into()),
    };
    pod.status
        .and_then(|s| s.pod_ip)
        .and_then(|ip| ip.parse().ok())
        .ok_or(HoldError::PodHasNoIp {
            namespace: target.namespace.clone(),
            pod: pod_name,
        })
}

/// One evaluation of every node.
pub async fn evaluate(
    client: &Client,
    target: &HoldTarget,
    ip: IpAddr,
    opts: &HoldOptions,
    waited: Duration,
) -> Result<HoldReport, HoldError> {
    let ip_s = ip.to_string();
    let slices_api: Api<EndpointSlice> = Api::namespaced(client.clone(), &target.namespace);
    let slices = slices_api.list(&ListParams::default()).await?.items;
    let mut services: BTreeSet<String> = target.services.clone();
    for s in slices.iter().filter(|s| has_ip(s, &ip_s)) {
        if let Some(name) = s.labels().get(k8s::SERVICE_NAME_LABEL) {
            services.insert(name.clone());
        }
    }
    let relevant: Vec<&EndpointSlice> = slices
        .iter()
        .filter(|s| {
            s.labels()
                .get(k8s::SERVICE_NAME_LABEL)
                .is_some_and(|n| services.contains(n))
        })
        .collect();
    let required = relevant
        .iter()
        .filter_map(|s| s.resource_version()?.parse::<u64>().ok())
        .max()
        .unwrap_or(0);
    let records: BTreeMap<String, Vec<SliceRecord>> =
        relevant
            .iter()
            .filter_map(|s| k8s::slice_record(s).ok())
            .fold(BTreeMap::new(), |mut m, (r, _)| {
                m.entry(r.service.name.clone()).or_default().push(r);
                m
            });
    let svc_api: Api<Service> = Api::namespaced(client.clone(), &target.namespace);
    let mut specs = BTreeMap::new();
    for name in &services {
        if let Some(svc) = svc_api.get_opt(name).await? {
            specs.insert(name.clone(), k8s::service_spec(&svc));
        }
    }
    let expected_on = |node: &str, mode: &str| -> bool {
        let semantics = Semantics {
            local_falls_back_to_cluster: mode == "ipvs",
        };
        services.iter().any(|name| {
            let r = ServiceRef::new(&target.namespace, name);
            let recs: Vec<&SliceRecord> = records.get(name).into_iter().flatten().collect();
            let spec = specs.get(name).and_then(|s| s.as_ref());
            expect_service_with(&r, spec, &recs, node, semantics)
                .expected
                .iter()
                .any(|k| k.endpoint.ip() == ip)
        })
    };
    // The change is in the API once the endpoint is no longer ready anywhere (removal), or is
    // ready again (addition).
    let ready_somewhere = relevant.iter().any(|s| {
        s.endpoints.iter().flatten().any(|e| {
            e.addresses.first().is_some_and(|a| *a == ip_s)
                && e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true)
                && !e.conditions.as_ref().and_then(|c| c.terminating).unwrap_or(false)
        })
    });
    let changed_in_api = ready_somewhere == target.addition;

    let nodes: Api<Node> = Api::all(client.clone());
    let convergences: Api<NodeConvergence> = Api::all(client.clone());
    let states: BTreeMap<String, NodeConvergence> = convergences
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .map(|c| (c.name_any(), c))
        .collect();
    let now = Timestamp::now();
    let skip = opts.skip_stale_after.is_some_and(|d| waited >= d);
    let mut summaries = Vec::new();
    for node in nodes.list(&ListParams::default()).await?.items {
        let ready = node
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_none_or(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        if !ready {
            continue; // "every ready node"
        }
        let name = node.name_any();
        let Some(st) = states.get(&name).and_then(|c| c.status.clone()) else {
            let state = if skip { NodeState::Skipped } else { NodeState::NoAgent };
            summaries.push(NodeSummary {
                node: name,
                state,
                mode: "-".into(),
                heartbeat_age_seconds: None,
                observed_resource_version: 0,
                lag_seconds: None,
                end_to_end_seconds: None,
            });
            continue;
        };
        let age = Timestamp::parse_rfc3339(&st.heartbeat_time).map(|t| now.seconds_since(t));
        let observed: u64 = st.observed_resource_version.parse().unwrap_or(0);
        let lists_ip = st.pending.iter().any(|p| p.ip == ip_s);
        let state = if age.is_none_or(|a| a > opts.stale_after.as_secs_f64()) {
            if skip {
                NodeState::Skipped
            } else {
                NodeState::Stale
            }
        } else if observed < required {
            NodeState::Lagging
        } else if lists_ip || (st.pending_truncated > 0 && !target.addition) {
            // A truncated list may hide the IP: never assume it is not there.
            NodeState::Pending
        } else if !target.addition && expected_on(&name, &st.mode) {
            NodeState::StillExpected
        } else if !changed_in_api {
            NodeState::Lagging
        } else {
            NodeState::Converged
        };
        let recent = st
            .recent
            .iter()
            .find(|r| r.ip == ip_s && (r.change == "added") == target.addition);
        summaries.push(NodeSummary {
            node: name,
            state,
            mode: st.mode.clone(),
            heartbeat_age_seconds: age,
            observed_resource_version: observed,
            lag_seconds: recent.map(|r| r.lag_seconds),
            end_to_end_seconds: recent.and_then(|r| r.end_to_end_seconds),
        });
    }
    let converged = changed_in_api && summaries.iter().all(|n| n.state.done());
    Ok(HoldReport {
        converged,
        namespace: target.namespace.clone(),
        pod: target.pod.clone(),
        ip: ip_s,
        required_resource_version: required,
        changed_in_api,
        waited_seconds: waited.as_secs_f64(),
        nodes: summaries,
    })
}

/// Waits until the pod has converged on every node, or the timeout. `Ok` carries the last
/// report either way: check `converged`.
pub async fn hold_until_converged(
    client: &Client,
    target: &HoldTarget,
    opts: &HoldOptions,
    mut progress: impl FnMut(&HoldReport),
) -> Result<HoldReport, HoldError> {
    let ip = resolve_ip(client, target).await?;
    let start = Instant::now();
    loop {
        let report = evaluate(client, target, ip, opts, start.elapsed()).await?;
        progress(&report);
        if report.converged || start.elapsed() >= opts.timeout {
            return Ok(report);
        }
        tokio::time::sleep(opts.poll.min(opts.timeout.saturating_sub(start.elapsed()))).await;
    }
}
