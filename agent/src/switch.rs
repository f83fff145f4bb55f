//! Blue/green cutover made exact: `switch` replaces a Service's selector and waits until every
//! node routes only to the new set of pods (every new endpoint programmed, every old one gone),
//! then says per node when the old set stopped and when the new set was complete.
//!
//! Each old pod is a removal and each new pod an addition, judged by the hold verdict
//! ([`crate::hold::verdict`]) over the world narrowed to the one Service (an old pod may stay in
//! other Services). A node is done only when every one of those verdicts is done there: a node
//! that is unknown, stale, lagging or pending for any pod of either set is never counted, and
//! gets no time.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::Duration;

use anyhow::Context;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use serde::Serialize;
use serde_json::json;

use crate::crd::NodeConvergenceStatus;
use crate::hold::{pod_ips, verdict, Feed, HoldOptions, HoldReport, HoldTarget, NodeState, Subject, World};
use crate::isolate::Progress;
use crate::model::Timestamp;

/// A Service selector: label key to value.
pub type Selector = BTreeMap<String, String>;

/// `KEY=VALUE[,KEY=VALUE...]`, as `config::parse_selector` checked it, as a map.
pub fn selector_map(s: &str) -> Selector {
    s.split(',')
        .filter_map(|p| p.trim().split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub fn selector_text(sel: &Selector) -> String {
    sel.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// As the EndpointSlice controller selects: every key matches, and an empty selector picks
/// nothing.
fn selects(sel: &Selector, labels: &BTreeMap<String, String>) -> bool {
    !sel.is_empty() && sel.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn pod_ready(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Which pods leave the Service and which join it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    /// Pods the old selector picks and the new one does not: their endpoints must go.
    pub old: Vec<Subject>,
    /// Ready pods the new selector picks and the old one does not: their endpoints must come.
    pub new: Vec<Subject>,
    /// Pods both selectors pick: they stay.
    pub kept: Vec<String>,
    /// Pods the new selector picks that are not ready or have no IP yet: not waited for.
    pub new_not_ready: Vec<String>,
}

pub fn plan(ns: &str, old: &Selector, new: &Selector, pods: &[Pod]) -> Plan {
    let mut p = Plan::default();
    for pod in pods {
        let labels = pod.labels();
        let name = pod.name_any();
        let ips = pod_ips(pod);
        let subject = || Subject {
            namespace: ns.into(),
            pod: Some(name.clone()),
            ips: ips.clone(),
        };
        match (selects(old, labels), selects(new, labels)) {
            (true, true) => p.kept.push(name.clone()),
            // Unready or terminating, an old pod may still be routed (the terminating
            // fallback): it is waited for all the same. Without an IP nothing routes to it.
            (true, false) if !ips.is_empty() => p.old.push(subject()),
            (false, true) if pod_ready(pod) && !ips.is_empty() => p.new.push(subject()),
            (false, true) => p.new_not_ready.push(name.clone()),
            _ => {}
        }
    }
    p
}

/// The world as far as one Service is concerned: its slices and versions, and what agents list
/// for it. What an agent cannot tell (truncated lists, unknown families) is kept as it is.
pub fn scoped_world(world: &World, ns: &str, service: &str) -> World {
    let mine = |n: &str, s: &str| n == ns && s == service;
    let only = |m: &BTreeMap<String, u64>| -> BTreeMap<String, u64> {
        m.iter()
            .filter(|(k, _)| *k == service)
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    };
    World {
        slices: world
            .slices
            .iter()
            .filter(|(_, s)| s.record.service.name == service)
            .map(|(k, s)| (k.clone(), s.clone()))
            .collect(),
        deleted: only(&world.deleted),
        floor: world.floor,
        services: world
            .services
            .iter()
            .filter(|(k, _)| *k == service)
            .map(|(k, s)| (k.clone(), s.clone()))
            .collect(),
        services_deleted: only(&world.services_deleted),
        seen: world.seen.iter().filter(|(_, s)| s == service).cloned().collect(),
        nodes: world.nodes.clone(),
        convergences: world
            .convergences
            .iter()
            .map(|(node, st)| {
                let mut st = st.clone();
                st.pending.retain(|p| mine(&p.namespace, &p.service));
                st.stale.retain(|p| mine(&p.namespace, &p.service));
                st.recent.retain(|p| mine(&p.namespace, &p.service));
                (node.clone(), st)
            })
            .collect(),
    }
}

/// One set's state on each node: the first pod's state there that is not done; else skipped
/// when every pod was skipped there, else converged. A node some pod's report lacks is unknown.
pub fn set_states(reports: &[HoldReport]) -> BTreeMap<String, NodeState> {
    let names: BTreeSet<&String> = reports.iter().flat_map(|r| r.nodes.iter().map(|n| &n.node)).collect();
    names
        .into_iter()
        .map(|name| {
            let states: Vec<NodeState> = reports
                .iter()
                .map(|r| {
                    r.nodes
                        .iter()
                        .find(|n| &n.node == name)
                        .map_or(NodeState::Unknown, |n| n.state)
                })
                .collect();
            let state = states.iter().copied().find(|s| !s.done()).unwrap_or_else(|| {
                if states.iter().all(|s| *s == NodeState::Skipped) {
                    NodeState::Skipped
                } else {
                    NodeState::Converged
                }
            });
            (name.clone(), state)
        })
        .collect()
}

/// The last time a node's agent programmed a change (`removed` or `added`) of the Service for
/// one of `ips`, at or after `since`. `None` unless every address the Service's slices listed
/// has such a record: the agent's `recent` list is bounded, and a missing one may be the last.
pub fn last_programmed(
    st: &NodeConvergenceStatus,
    (ns, service): (&str, &str),
    ips: &[IpAddr],
    change: &str,
    since: Timestamp,
) -> Option<Timestamp> {
    let mut last = None;
    for ip in ips {
        let ip = ip.to_string();
        let t = st
            .recent
            .iter()
            .filter(|r| r.namespace == ns && r.service == service && r.ip == ip && r.change == change)
            .filter_map(|r| Timestamp::parse_rfc3339(&r.programmed_time))
            .filter(|t| *t >= since)
            .max()?;
        last = last.max(Some(t));
    }
    last
}

/// Where a per-node time comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TimeSource {
    /// The agent's programmed time of the last endpoint change (the kernel's notification, or
    /// the first poll that saw it).
    Kernel,
    /// When `switch` saw the node done, an upper bound: the agent no longer listed every
    /// endpoint's change.
    Observed,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Moment {
    /// Seconds after the selector was patched.
    pub seconds: f64,
    /// RFC 3339.
    pub time: String,
    pub source: TimeSource,
}

impl Moment {
    fn new(t: Timestamp, since: Timestamp, source: TimeSource) -> Self {
        Self {
            seconds: t.seconds_since(since),
            time: t.to_rfc3339(),
            source,
        }
    }

    fn cell(m: &Option<Moment>) -> String {
        match m {
            None => "-".into(),
            Some(m) if m.source == TimeSource::Kernel => format!("{:.3}s", m.seconds),
            Some(m) => format!("<={:.3}s", m.seconds),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeCutover {
    pub node: String,
    pub state: NodeState,
    /// The set this node still waits on: `old` (still routed) or `new` (not complete yet).
    pub waiting_on: Option<&'static str>,
    pub mode: String,
    /// When this node stopped sending new connections to the old set (its last old endpoint's
    /// removal was programmed).
    pub old_stopped: Option<Moment>,
    /// When this node's new set was complete (its last new endpoint's addition was programmed).
    pub new_complete: Option<Moment>,
    /// When `switch` saw this node done for both sets.
    pub confirmed: Option<Moment>,
    /// New connections this node still sent to the old set after the patch. Not measured yet
    /// (conntrack counting, issue 19 part 1): always `None`.
    pub connections_to_old_set: Option<u64>,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SwitchReport {
    /// Every node routes only to the new set.
    pub complete: bool,
    pub namespace: String,
    pub service: String,
    pub old_selector: Selector,
    pub new_selector: Selector,
    pub old_pods: Vec<String>,
    pub new_pods: Vec<String>,
    pub kept_pods: Vec<String>,
    pub new_pods_not_ready: Vec<String>,
    /// The API shows the change: no old pod is a ready endpoint of the Service, every new one
    /// is. Until then no node can be done.
    pub changed_in_api: bool,
    /// When the selector was patched: the origin of every per-node time.
    pub patched_time: String,
    pub waited_seconds: f64,
    /// `--rollback-on-timeout` put the old selector back.
    pub rolled_back: bool,
    pub nodes: Vec<NodeCutover>,
}

impl SwitchReport {
    /// The nodes not done, with what they wait on.
    pub fn waiting_on(&self) -> Vec<String> {
        self.nodes
            .iter()
            .filter(|n| !n.state.done())
            .map(|n| match n.waiting_on {
                Some("old") => format!("{} ({}: still routes to the old set)", n.node, n.state.as_str()),
                Some(_) => format!("{} ({}: new set not complete)", n.node, n.state.as_str()),
                None => format!("{} ({})", n.node, n.state.as_str()),
            })
            .collect()
    }

    pub fn table(&self) -> String {
        let mut rows = vec![[
            "NODE".to_string(),
            "STATE".into(),
            "MODE".into(),
            "OLD SET STOPPED".into(),
            "NEW SET COMPLETE".into(),
            "CONFIRMED".into(),
            "CONNS TO OLD SET".into(),
        ]];
        for n in &self.nodes {
            let state = match n.waiting_on {
                Some(set) => format!("{} ({set} set)", n.state.as_str()),
                None => n.state.as_str().into(),
            };
            rows.push([
                n.node.clone(),
                state,
                n.mode.clone(),
                Moment::cell(&n.old_stopped),
                Moment::cell(&n.new_complete),
                n.confirmed
                    .as_ref()
                    .map_or("-".into(), |m| format!("{:.3}s", m.seconds)),
                n.connections_to_old_set.map_or("-".into(), |c| c.to_string()),
            ]);
        }
        crate::table::render(&rows)
    }

    /// The same report in the shape `isolate`'s progress display takes.
    fn progress_view(&self, any: &HoldReport) -> HoldReport {
        let mut view = any.clone();
        view.converged = self.complete;
        view.changed_in_api = self.changed_in_api;
        view.waited_seconds = self.waited_seconds;
        view.nodes.retain(|n| self.nodes.iter().any(|c| c.node == n.node));
        for n in &mut view.nodes {
            if let Some(c) = self.nodes.iter().find(|c| c.node == n.node) {
                n.state = c.state;
                if let Some(set) = c.waiting_on {
                    n.node = format!("{}: {set} set", n.node);
                }
            }
        }
        view
    }
}

/// A cutover in progress.
#[derive(Clone, Debug)]
pub struct Cutover {
    pub namespace: String,
    pub service: String,
    pub old_selector: Selector,
    pub new_selector: Selector,
    pub plan: Plan,
    pub patched_at: Timestamp,
}

/// When `switch` first saw each node done for each set; forgotten when the node stops being
/// done (the last transition counts).
#[derive(Clone, Debug, Default)]
pub struct Seen {
    old: BTreeMap<String, Timestamp>,
    new: BTreeMap<String, Timestamp>,
}

fn note(seen: &mut BTreeMap<String, Timestamp>, node: &str, done: bool, now: Timestamp) {
    if done {
        seen.entry(node.to_string()).or_insert(now);
    } else {
        seen.remove(node);
    }
}

/// The cutover's state: a pure function of the world, the time, and what was seen before.
pub fn evaluate(
    cut: &Cutover,
    world: &World,
    opts: &HoldOptions,
    now: Timestamp,
    waited: Duration,
    seen: &mut Seen,
) -> (SwitchReport, Option<HoldReport>) {
    let (ns, svc) = (cut.namespace.as_str(), cut.service.as_str());
    let scoped = scoped_world(world, ns, svc);
    let target = |addition| HoldTarget {
        namespace: ns.into(),
        services: [svc.to_string()].into(),
        addition,
        ..Default::default()
    };
    let (removal, addition) = (target(false), target(true));
    let judge = |subjects: &[Subject], t: &HoldTarget| -> Vec<HoldReport> {
        subjects
            .iter()
            .map(|s| verdict(s, t, &scoped, opts, now, waited))
            .collect()
    };
    let (old, new) = (judge(&cut.plan.old, &removal), judge(&cut.plan.new, &addition));
    let (old_states, new_states) = (set_states(&old), set_states(&new));
    let ips = |subjects: &[Subject]| -> Vec<IpAddr> {
        subjects
            .iter()
            .flat_map(|s| s.ips.iter().copied())
            // Only what the Service's slices listed can have a record (a dual-stack pod of a
            // single-stack Service).
            .filter(|ip| scoped.seen.contains(&(*ip, svc.to_string())))
            .collect()
    };
    let (old_ips, new_ips) = (ips(&cut.plan.old), ips(&cut.plan.new));
    let names: BTreeSet<&String> = old_states.keys().chain(new_states.keys()).collect();
    let mut nodes = Vec::new();
    for name in names {
        // A set with no pod has nothing to wait for; a node one set's reports lack is unknown.
        let state_in = |states: &BTreeMap<String, NodeState>, empty: bool| {
            states.get(name).copied().unwrap_or(if empty {
                NodeState::Converged
            } else {
                NodeState::Unknown
            })
        };
        let old_state = state_in(&old_states, cut.plan.old.is_empty());
        let new_state = state_in(&new_states, cut.plan.new.is_empty());
        note(&mut seen.old, name, old_state.done(), now);
        note(&mut seen.new, name, new_state.done(), now);
        let (state, waiting_on) = if !old_state.done() {
            (old_state, Some("old"))
        } else if !new_state.done() {
            (new_state, Some("new"))
        } else if old_state == NodeState::Skipped || new_state == NodeState::Skipped {
            (NodeState::Skipped, None)
        } else {
            (NodeState::Converged, None)
        };
        let status = world.convergences.get(name);
        let moment =
            |set_state: NodeState, set: &[Subject], set_ips: &[IpAddr], change, seen_at: Option<&Timestamp>| {
                if set_state != NodeState::Converged || set.is_empty() {
                    return None;
                }
                let kernel = status
                    .filter(|_| !set_ips.is_empty())
                    .and_then(|st| last_programmed(st, (ns, svc), set_ips, change, cut.patched_at));
                match (kernel, seen_at) {
                    (Some(t), _) => Some(Moment::new(t, cut.patched_at, TimeSource::Kernel)),
                    (None, Some(t)) => Some(Moment::new(*t, cut.patched_at, TimeSource::Observed)),
                    (None, None) => None,
                }
            };
        let old_stopped = moment(old_state, &cut.plan.old, &old_ips, "removed", seen.old.get(name));
        let new_complete = moment(new_state, &cut.plan.new, &new_ips, "added", seen.new.get(name));
        let confirmed = state
            .done()
            .then(|| seen.old.get(name).into_iter().chain(seen.new.get(name)).max().copied())
            .flatten()
            .map(|t| Moment::new(t, cut.patched_at, TimeSource::Observed));
        nodes.push(NodeCutover {
            node: name.clone(),
            state,
            waiting_on,
            mode: status.map_or("-".into(), |st| st.mode.clone()),
            old_stopped,
            new_complete,
            confirmed,
            // What the node still sent to the old pods after the patch (the agents' live-traffic
            // check, before and after each removal converged); None when no agent reports it.
            connections_to_old_set: old
                .iter()
                .flat_map(|r| r.nodes.iter().filter(|n| n.node == **name))
                .filter_map(|n| Some(n.connections_before_converged? + n.connections_after_converged.unwrap_or(0)))
                .reduce(|a, b| a + b),
        });
    }
    let report = SwitchReport {
        complete: old.iter().chain(&new).all(|r| r.converged),
        namespace: ns.into(),
        service: svc.into(),
        old_selector: cut.old_selector.clone(),
        new_selector: cut.new_selector.clone(),
        old_pods: cut.plan.old.iter().filter_map(|s| s.pod.clone()).collect(),
        new_pods: cut.plan.new.iter().filter_map(|s| s.pod.clone()).collect(),
        kept_pods: cut.plan.kept.clone(),
        new_pods_not_ready: cut.plan.new_not_ready.clone(),
        changed_in_api: old.iter().chain(&new).all(|r| r.changed_in_api),
        patched_time: cut.patched_at.to_rfc3339(),
        waited_seconds: waited.as_secs_f64(),
        rolled_back: false,
        nodes,
    };
    let any = old.into_iter().chain(new).next();
    (report, any)
}

/// The merge patch that turns selector `from` into `to` (a key `to` lacks is removed), made
/// only if the Service is still at `resource_version`.
fn selector_patch(from: &Selector, to: &Selector, resource_version: Option<String>) -> serde_json::Value {
    let mut sel = serde_json::Map::new();
    for k in from.keys().filter(|k| !to.contains_key(*k)) {
        sel.insert(k.clone(), serde_json::Value::Null);
    }
    for (k, v) in to {
        sel.insert(k.clone(), json!(v));
    }
    json!({"metadata": {"resourceVersion": resource_version}, "spec": {"selector": sel}})
}

/// What to switch.
#[derive(Clone, Debug)]
pub struct SwitchRequest {
    pub namespace: String,
    pub service: String,
    pub selector: Selector,
    pub force: bool,
    pub rollback_on_timeout: bool,
}

/// Patches the Service's selector and waits until every node routes only to the new set, or
/// the timeout (then, with `rollback_on_timeout`, puts the old selector back). `Ok` carries the
/// last report either way: check `complete`.
pub async fn switch(
    client: &Client,
    req: &SwitchRequest,
    opts: &HoldOptions,
    progress: &mut Progress,
) -> anyhow::Result<SwitchReport> {
    let (ns, name) = (req.namespace.as_str(), req.service.as_str());
    let services: Api<Service> = Api::namespaced(client.clone(), ns);
    let svc = services
        .get(name)
        .await
        .with_context(|| format!("getting Service {ns}/{name}"))?;
    let old: Selector = svc.spec.as_ref().and_then(|s| s.selector.clone()).unwrap_or_default();
    if old.is_empty() {
        anyhow::bail!(
            "Service {ns}/{name} has no selector: its endpoints are not chosen by pod labels, so there is nothing to switch"
        );
    }
    if old == req.selector {
        anyhow::bail!(
            "Service {ns}/{name} already selects {}: nothing to switch",
            selector_text(&old)
        );
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let all = pods
        .list(&ListParams::default())
        .await
        .with_context(|| format!("listing the pods of namespace {ns}"))?
        .items;
    let plan = plan(ns, &old, &req.selector, &all);
    if plan.new.is_empty() && !req.force {
        let unready = if plan.new_not_ready.is_empty() {
            String::new()
        } else {
            format!(" ({} match but are not ready)", plan.new_not_ready.join(", "))
        };
        anyhow::bail!(
            "selector {} matches no ready pod in namespace {ns}{unready}: switching Service {ns}/{name} to it would leave it without endpoints; pass --force to switch anyway",
            selector_text(&req.selector)
        );
    }
    // Watch before the change: a slice the switch empties is deleted, and only a watch sees the
    // version of that deletion.
    let feed = Feed::start(client, ns);
    feed.synced(opts.timeout.max(Duration::from_secs(10))).await?;
    let patched_at = Timestamp::now();
    services
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(&selector_patch(&old, &req.selector, svc.resource_version())),
        )
        .await
        .with_context(|| {
            format!("patching the selector of Service {ns}/{name} (it may have changed meanwhile: retry)")
        })?;
    let kept = if plan.kept.is_empty() {
        String::new()
    } else {
        format!(", {} stay", plan.kept.len())
    };
    eprintln!(
        "switched Service {ns}/{name} from {} to {}: {} pod(s) leave, {} join{kept}; waiting for every node",
        selector_text(&old),
        selector_text(&req.selector),
        plan.old.len(),
        plan.new.len()
    );
    if !plan.new_not_ready.is_empty() {
        eprintln!(
            "not waiting for {} (selected but not ready)",
            plan.new_not_ready.join(", ")
        );
    }
    let cut = Cutover {
        namespace: ns.into(),
        service: name.into(),
        old_selector: old.clone(),
        new_selector: req.selector.clone(),
        plan,
        patched_at,
    };
    let mut seen = Seen::default();
    let mut report = feed
        .wait_with(opts, |world, now, waited| {
            let (report, any) = evaluate(&cut, world, opts, now, waited, &mut seen);
            if let Some(any) = any {
                progress.update(&report.progress_view(&any));
            }
            let done = report.complete;
            (report, done)
        })
        .await?;
    progress.finish();
    if !report.complete && req.rollback_on_timeout {
        rollback(&services, name, &req.selector, &old).await.with_context(|| {
            format!(
                "the cutover timed out (waiting on: {}); rolling Service {ns}/{name} back to {}",
                report.waiting_on().join(", "),
                selector_text(&old)
            )
        })?;
        report.rolled_back = true;
    }
    Ok(report)
}

/// Puts the old selector back, unless someone changed the selector since the switch.
async fn rollback(services: &Api<Service>, name: &str, new: &Selector, old: &Selector) -> anyhow::Result<()> {
    let now = services.get(name).await.context("getting the Service")?;
    let current: Selector = now.spec.as_ref().and_then(|s| s.selector.clone()).unwrap_or_default();
    if &current != new {
        anyhow::bail!(
            "its selector is now {}, not what switch set: it was changed meanwhile, so it is left alone",
            selector_text(&current)
        );
    }
    services
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(&selector_patch(new, old, now.resource_version())),
        )
        .await
        .context("patching the selector (it may have changed meanwhile: check it by hand)")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{ConvergedEndpoint, PendingEndpoint, StaleEndpoint};
    use crate::expected::builders::{slice, svc};
    use crate::hold::{WorldNode, WorldService, WorldSlice};
    use crate::k8s;

    const PATCH_MS: i64 = 1_000_000;
    const NOW_MS: i64 = PATCH_MS + 5_000;
    // Blue: 10.1.0.1 (blue-0), 10.1.0.2 (blue-1). Green: 10.2.0.1 (green-0), 10.2.0.2 (green-1).
    const BLUE: [&str; 2] = ["10.1.0.1", "10.1.0.2"];
    const GREEN: [&str; 2] = ["10.2.0.1", "10.2.0.2"];

    fn ts(ms: i64) -> Timestamp {
        Timestamp::from_millis(ms)
    }

    fn subject(pod: &str, ip: &str) -> Subject {
        Subject {
            namespace: "ns1".into(),
            pod: Some(pod.into()),
            ips: vec![ip.parse().unwrap()],
        }
    }

    fn cutover() -> Cutover {
        Cutover {
            namespace: "ns1".into(),
            service: "web".into(),
            old_selector: selector_map("track=blue"),
            new_selector: selector_map("track=green"),
            plan: Plan {
                old: vec![subject("blue-0", BLUE[0]), subject("blue-1", BLUE[1])],
                new: vec![subject("green-0", GREEN[0]), subject("green-1", GREEN[1])],
                ..Default::default()
            },
            patched_at: ts(PATCH_MS),
        }
    }

    fn world_slice(service: &str, rv: u64, ips: &[&str]) -> WorldSlice {
        let mut b = slice(&format!("ns1/{service}"));
        for ip in ips {
            b = b.endpoint(ip);
        }
        let mut record = b.build();
        record.resource_version = rv;
        WorldSlice {
            name: format!("{service}-abc"),
            labels: [(k8s::SERVICE_NAME_LABEL.to_string(), service.to_string())].into(),
            record,
        }
    }

    fn recent(ip: &str, change: &str, at_ms: i64) -> ConvergedEndpoint {
        ConvergedEndpoint {
            namespace: "ns1".into(),
            service: "web".into(),
            endpoint: format!("{ip}:80"),
            ip: ip.into(),
            change: change.into(),
            programmed_time: ts(at_ms).to_rfc3339(),
            ..Default::default()
        }
    }

    /// A fresh agent at version `rv` that programmed the whole cutover: blue removed and green
    /// added, `offset_ms` after the patch (the last one at `offset_ms + 30`).
    fn agent(rv: u64, offset_ms: i64) -> NodeConvergenceStatus {
        let t = PATCH_MS + offset_ms;
        NodeConvergenceStatus {
            mode: "iptables".into(),
            health: "Healthy".into(),
            observed_resource_version: rv.to_string(),
            observed_service_resource_version: rv.to_string(),
            heartbeat_time: ts(NOW_MS - 1000).to_rfc3339(),
            recent: vec![
                recent(BLUE[0], "removed", t),
                recent(BLUE[1], "removed", t + 20),
                recent(GREEN[0], "added", t + 10),
                recent(GREEN[1], "added", t + 30),
            ],
            ..Default::default()
        }
    }

    /// After the cutover: the slice (version 20) lists only green; blue was listed before (the
    /// watch saw it); node-a and node-b have processed it.
    fn world() -> World {
        let (_, spec) = svc("ns1/web");
        let mut w = World {
            slices: [("web-abc".to_string(), world_slice("web", 20, &GREEN))].into(),
            services: [(
                "web".to_string(),
                WorldService {
                    labels: Default::default(),
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
            convergences: [
                ("node-a".to_string(), agent(20, 100)),
                ("node-b".to_string(), agent(20, 900)),
            ]
            .into(),
            ..Default::default()
        };
        for ip in BLUE.iter().chain(&GREEN) {
            w.seen.insert((ip.parse().unwrap(), "web".into()));
        }
        w
    }

    fn run(world: &World, seen: &mut Seen) -> SwitchReport {
        let opts = HoldOptions::default();
        evaluate(&cutover(), world, &opts, ts(NOW_MS), Duration::from_secs(5), seen).0
    }

    fn node<'a>(r: &'a SwitchReport, name: &str) -> &'a NodeCutover {
        r.nodes.iter().find(|n| n.node == name).unwrap()
    }

    fn pending(ip: &str, change: &str) -> PendingEndpoint {
        PendingEndpoint {
            namespace: "ns1".into(),
            service: "web".into(),
            ip: ip.into(),
            change: change.into(),
            state: "pending".into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_complete_cutover_reports_each_nodes_kernel_times() {
        let r = run(&world(), &mut Seen::default());
        assert!(r.complete && r.changed_in_api, "{r:#?}");
        let a = node(&r, "node-a");
        assert_eq!((a.state, a.waiting_on), (NodeState::Converged, None));
        // The last blue removal at +120 ms, the last green addition at +130 ms.
        let old = a.old_stopped.as_ref().unwrap();
        assert_eq!((old.seconds, old.source), (0.12, TimeSource::Kernel));
        assert_eq!(old.time, ts(PATCH_MS + 120).to_rfc3339());
        let new = a.new_complete.as_ref().unwrap();
        assert_eq!((new.seconds, new.source), (0.13, TimeSource::Kernel));
        let b = node(&r, "node-b");
        assert_eq!(b.old_stopped.as_ref().unwrap().seconds, 0.92);
        assert_eq!(b.new_complete.as_ref().unwrap().seconds, 0.93);
        assert_eq!(b.confirmed.as_ref().unwrap().seconds, 5.0);
        assert_eq!(b.connections_to_old_set, None);
        let table = r.table();
        assert!(table.contains("CONNS TO OLD SET"), "{table}");
        let row = table.lines().find(|l| l.starts_with("node-b")).unwrap();
        assert_eq!(
            row.split_whitespace().collect::<Vec<_>>(),
            ["node-b", "converged", "iptables", "0.920s", "0.930s", "5.000s", "-"]
        );
    }

    #[test]
    fn a_node_still_routing_or_missing_a_new_endpoint_is_not_done_and_has_no_time() {
        // node-b still has a blue removal pending.
        let mut w = world();
        let b = w.convergences.get_mut("node-b").unwrap();
        b.pending.push(pending(BLUE[1], "removed"));
        b.recent.retain(|e| e.ip != BLUE[1]);
        let r = run(&w, &mut Seen::default());
        assert!(!r.complete);
        let b = node(&r, "node-b");
        assert_eq!((b.state, b.waiting_on), (NodeState::Pending, Some("old")));
        assert!(b.old_stopped.is_none() && b.confirmed.is_none(), "{b:?}");
        assert_eq!(node(&r, "node-a").state, NodeState::Converged);
        assert!(r.waiting_on()[0].contains("node-b (pending: still routes to the old set)"));
        // node-b still routes to a blue endpoint it does not expect.
        let mut w = world();
        w.convergences.get_mut("node-b").unwrap().stale.push(StaleEndpoint {
            namespace: "ns1".into(),
            service: "web".into(),
            ip: BLUE[0].into(),
            ..Default::default()
        });
        let r = run(&w, &mut Seen::default());
        assert_eq!(node(&r, "node-b").state, NodeState::StillRouted);
        assert!(!r.complete);
        // node-b has not programmed green-1 yet: the old set stopped, the new one is incomplete.
        let mut w = world();
        w.convergences
            .get_mut("node-b")
            .unwrap()
            .pending
            .push(pending(GREEN[1], "added"));
        let r = run(&w, &mut Seen::default());
        let b = node(&r, "node-b");
        assert_eq!((b.state, b.waiting_on), (NodeState::Pending, Some("new")));
        assert!(b.old_stopped.is_some() && b.new_complete.is_none() && b.confirmed.is_none());
        assert!(!r.complete);
    }

    #[test]
    fn unknown_stale_and_lagging_nodes_are_never_counted_done() {
        type Spoil = fn(&mut NodeConvergenceStatus);
        let cases: [(&str, Spoil, NodeState); 5] = [
            (
                "heartbeat too old",
                |st| st.heartbeat_time = ts(NOW_MS - 600_000).to_rfc3339(),
                NodeState::Stale,
            ),
            (
                "no heartbeat at all",
                |st| st.heartbeat_time = String::new(),
                NodeState::Stale,
            ),
            (
                "stale endpoints unknown after a failed read",
                |st| st.stale_unknown = vec!["ipv4".into()],
                NodeState::Unknown,
            ),
            (
                "slice change not processed",
                |st| st.observed_resource_version = "19".into(),
                NodeState::Lagging,
            ),
            (
                "a truncated stale list may hide an old endpoint",
                |st| st.stale_truncated = 1,
                NodeState::StillRouted,
            ),
        ];
        for (what, spoil, state) in cases {
            let mut w = world();
            spoil(w.convergences.get_mut("node-b").unwrap());
            let r = run(&w, &mut Seen::default());
            assert!(!r.complete, "{what}");
            let b = node(&r, "node-b");
            assert_eq!(b.state, state, "{what}");
            assert!(!b.state.done(), "{what}");
            assert!(b.old_stopped.is_none() && b.confirmed.is_none(), "{what}: {b:?}");
        }
        // A Ready node without an agent is waited on too.
        let mut w = world();
        w.convergences.remove("node-b");
        let r = run(&w, &mut Seen::default());
        assert_eq!(node(&r, "node-b").state, NodeState::NoAgent);
        assert!(!r.complete);
    }

    #[test]
    fn nothing_is_done_before_the_api_shows_the_change() {
        // The EndpointSlice controller has not acted yet: the slice still lists blue.
        let mut w = world();
        w.slices = [("web-abc".to_string(), world_slice("web", 20, &BLUE))].into();
        let r = run(&w, &mut Seen::default());
        assert!(!r.complete && !r.changed_in_api);
        assert!(r.nodes.iter().all(|n| !n.state.done()), "{r:#?}");
        // Half way: green added, blue still listed.
        let all: Vec<&str> = BLUE.iter().chain(&GREEN).copied().collect();
        w.slices = [("web-abc".to_string(), world_slice("web", 20, &all))].into();
        let r = run(&w, &mut Seen::default());
        assert!(!r.complete && !r.changed_in_api);
        assert!(r.nodes.iter().all(|n| n.waiting_on == Some("old")), "{r:#?}");
    }

    #[test]
    fn without_every_kernel_record_the_time_is_when_switch_saw_the_node_done() {
        let mut w = world();
        // node-b's bounded recent list lost blue-0's removal; blue-1's record predates the
        // patch (an earlier change).
        let b = w.convergences.get_mut("node-b").unwrap();
        b.recent.retain(|e| e.ip != BLUE[0]);
        b.recent.push(recent(BLUE[0], "removed", PATCH_MS - 50_000));
        let mut seen = Seen::default();
        let opts = HoldOptions::default();
        let first = evaluate(
            &cutover(),
            &w,
            &opts,
            ts(PATCH_MS + 2_000),
            Duration::from_secs(2),
            &mut seen,
        )
        .0;
        assert!(first.complete);
        let later = evaluate(
            &cutover(),
            &w,
            &opts,
            ts(PATCH_MS + 3_000),
            Duration::from_secs(3),
            &mut seen,
        )
        .0;
        let b = node(&later, "node-b");
        let old = b.old_stopped.as_ref().unwrap();
        assert_eq!(
            (old.seconds, old.source),
            (2.0, TimeSource::Observed),
            "the first time seen"
        );
        assert_eq!(b.new_complete.as_ref().unwrap().source, TimeSource::Kernel);
        assert!(later.table().contains("<=2.000s"));
        // A node that stops being done loses its time: the last transition counts.
        let mut w2 = w.clone();
        w2.convergences
            .get_mut("node-b")
            .unwrap()
            .pending
            .push(pending(BLUE[1], "removed"));
        let r = evaluate(
            &cutover(),
            &w2,
            &opts,
            ts(PATCH_MS + 4_000),
            Duration::from_secs(4),
            &mut seen,
        )
        .0;
        assert!(node(&r, "node-b").old_stopped.is_none());
        let r = evaluate(
            &cutover(),
            &w,
            &opts,
            ts(PATCH_MS + 6_000),
            Duration::from_secs(6),
            &mut seen,
        )
        .0;
        assert_eq!(node(&r, "node-b").old_stopped.as_ref().unwrap().seconds, 6.0);
    }

    #[test]
    fn an_old_pod_that_stays_in_another_service_does_not_block() {
        // blue-0 is also behind Service `admin`, still routed there; agents list that.
        let mut w = world();
        let (_, spec) = svc("ns1/admin");
        w.slices
            .insert("admin-abc".into(), world_slice("admin", 21, &[BLUE[0]]));
        w.services.insert(
            "admin".into(),
            WorldService {
                labels: Default::default(),
                resource_version: 4,
                spec: Some(spec),
            },
        );
        w.seen.insert((BLUE[0].parse().unwrap(), "admin".into()));
        let mut other = pending(BLUE[0], "added");
        other.service = "admin".into();
        w.convergences.get_mut("node-a").unwrap().pending.push(other);
        let r = run(&w, &mut Seen::default());
        assert!(r.complete, "{r:#?}");
    }

    #[test]
    fn only_the_old_or_only_the_new_set() {
        // --force to nothing: only removals.
        let mut cut = cutover();
        cut.plan.new.clear();
        let mut w = world();
        w.slices = [("web-abc".to_string(), world_slice("web", 20, &[]))].into();
        let opts = HoldOptions::default();
        let r = evaluate(
            &cut,
            &w,
            &opts,
            ts(NOW_MS),
            Duration::from_secs(1),
            &mut Seen::default(),
        )
        .0;
        assert!(r.complete, "{r:#?}");
        assert!(node(&r, "node-a").new_complete.is_none());
        // A Service that had no pod: only additions.
        let mut cut = cutover();
        cut.plan.old.clear();
        let r = evaluate(
            &cut,
            &world(),
            &opts,
            ts(NOW_MS),
            Duration::from_secs(1),
            &mut Seen::default(),
        )
        .0;
        assert!(r.complete && node(&r, "node-a").old_stopped.is_none());
    }

    #[test]
    fn the_plan_splits_pods_into_leaving_joining_and_staying() {
        let pod = |name: &str, labels: serde_json::Value, ip: Option<&str>, ready: bool| -> Pod {
            serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": "ns1", "labels": labels},
                "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]}
            }))
            .unwrap()
        };
        let pods = [
            pod("blue-0", json!({"app": "web", "track": "blue"}), Some("10.1.0.1"), true),
            pod(
                "blue-1",
                json!({"app": "web", "track": "blue"}),
                Some("10.1.0.2"),
                false,
            ),
            pod("blue-2", json!({"app": "web", "track": "blue"}), None, true),
            pod(
                "green-0",
                json!({"app": "web", "track": "green"}),
                Some("10.2.0.1"),
                true,
            ),
            pod(
                "green-1",
                json!({"app": "web", "track": "green"}),
                Some("10.2.0.2"),
                false,
            ),
            pod(
                "canary",
                json!({"app": "web", "track": "blue", "canary": "yes"}),
                Some("10.3.0.1"),
                true,
            ),
            pod("other", json!({"app": "db"}), Some("10.4.0.1"), true),
        ];
        let old = selector_map("app=web,track=blue");
        let new = selector_map("app=web,track=green");
        let p = plan("ns1", &old, &new, &pods);
        let names = |s: &[Subject]| s.iter().map(|s| s.pod.clone().unwrap()).collect::<Vec<_>>();
        // An unready old pod may still be routed (terminating fallback): it is waited for.
        assert_eq!(names(&p.old), ["blue-0", "blue-1", "canary"]);
        assert_eq!(names(&p.new), ["green-0"]);
        assert_eq!(p.new_not_ready, ["green-1"]);
        assert!(p.kept.is_empty());
        let p = plan("ns1", &old, &selector_map("app=web"), &pods);
        assert_eq!(p.kept, ["blue-0", "blue-1", "blue-2", "canary"]);
        assert!(p.old.is_empty());
        assert_eq!(
            (names(&p.new), p.new_not_ready),
            (vec!["green-0".to_string()], vec!["green-1".to_string()])
        );
    }

    #[test]
    fn a_set_is_done_on_a_node_only_when_every_pod_is() {
        let mut w = world();
        w.convergences
            .get_mut("node-b")
            .unwrap()
            .pending
            .push(pending(BLUE[1], "removed"));
        let opts = HoldOptions::default();
        let removal = HoldTarget {
            namespace: "ns1".into(),
            services: ["web".to_string()].into(),
            ..Default::default()
        };
        let reports: Vec<HoldReport> = cutover()
            .plan
            .old
            .iter()
            .map(|s| verdict(s, &removal, &w, &opts, ts(NOW_MS), Duration::from_secs(1)))
            .collect();
        let states = set_states(&reports);
        assert_eq!(states["node-a"], NodeState::Converged);
        assert_eq!(states["node-b"], NodeState::Pending, "blue-1 is still pending there");
        // A node one pod's report lacks is unknown, never done.
        let mut partial = reports.clone();
        partial[1].nodes.retain(|n| n.node != "node-a");
        assert_eq!(set_states(&partial)["node-a"], NodeState::Unknown);
        // Skipped only when every pod was skipped there.
        let mut skipped = reports;
        for r in &mut skipped {
            for n in &mut r.nodes {
                n.state = NodeState::Skipped;
            }
        }
        assert_eq!(set_states(&skipped)["node-a"], NodeState::Skipped);
        skipped[0].nodes[0].state = NodeState::Converged;
        assert_eq!(set_states(&skipped)[&skipped[0].nodes[0].node], NodeState::Converged);
    }

    #[test]
    fn the_selector_patch_replaces_the_selector_under_a_precondition() {
        let patch = selector_patch(
            &selector_map("app=web,track=blue"),
            &selector_map("app=web-v2"),
            Some("42".into()),
        );
        assert_eq!(
            patch,
            json!({"metadata": {"resourceVersion": "42"},
                "spec": {"selector": {"app": "web-v2", "track": null}}})
        );
        assert_eq!(selector_text(&selector_map("b=2, a=1")), "a=1,b=2");
    }
}
