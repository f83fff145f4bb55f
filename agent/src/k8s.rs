//! Thin adapters from Kubernetes objects to the domain records of `expected`, and the one
//! generic watch helper. Objects are trimmed to domain records on arrival, so no cache ever
//! holds managedFields or unused fields. Malformed input is reported, never fatal.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::watcher;
use kube::{Api, Resource, ResourceExt};
use serde::de::DeserializeOwned;

use crate::expected::{Conditions, ServicePortSpec, ServiceSpec, SliceEndpoint, SlicePort, SliceRecord};
use crate::model::{Protocol, ServiceRef, Timestamp, Trigger, TriggerSource};

pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
pub const TRIGGER_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";
/// kube-proxy ignores objects carrying either label.
/// A Node's zone, for topology hints.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
pub const KUBE_PROXY_SELECTOR: &str = "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";

/// Why a whole slice was skipped.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SliceError {
    #[error("EndpointSlice {0} has no {SERVICE_NAME_LABEL} label; kube-proxy ignores it")]
    ServiceLabelMissing(String),
    #[error("EndpointSlice {0} has addressType FQDN; kube-proxy ignores it")]
    FqdnIgnored(String),
}

/// Something wrong inside a slice that kube-proxy skips too. `reason` is a metric label.
#[derive(Debug, PartialEq)]
pub struct SliceProblem {
    pub reason: &'static str,
    pub detail: String,
}

fn nanos(t: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Time) -> Timestamp {
    Timestamp::from_nanos(t.0.as_nanosecond().clamp(i64::MIN as i128, i64::MAX as i128) as i64)
}

/// The best trigger time a slice carries: the controller's annotation, else the newest
/// managedFields time.
fn slice_trigger(slice: &EndpointSlice) -> Option<Trigger> {
    if let Some(t) = slice
        .annotations()
        .get(TRIGGER_ANNOTATION)
        .and_then(|v| Timestamp::parse_rfc3339(v))
    {
        return Some(Trigger {
            time: t,
            source: TriggerSource::LastChangeTriggerTime,
        });
    }
    let newest = slice
        .meta()
        .managed_fields
        .iter()
        .flatten()
        .filter_map(|m| m.time.as_ref())
        .map(nanos)
        .max()?;
    Some(Trigger {
        time: newest,
        source: TriggerSource::ManagedFields,
    })
}

/// Converts an EndpointSlice, skipping what kube-proxy skips and reporting why.
/// One shared copy of each node name. The table only grows with the cluster's node names
/// (a few thousand at most), which the agent would hold anyway.
pub fn intern_node_name(name: &str) -> Arc<str> {
    static NAMES: std::sync::OnceLock<std::sync::Mutex<std::collections::HashSet<Arc<str>>>> =
        std::sync::OnceLock::new();
    let mut names = NAMES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(n) = names.get(name) {
        return n.clone();
    }
    let n: Arc<str> = name.into();
    names.insert(n.clone());
    n
}

pub fn slice_record(slice: &EndpointSlice) -> Result<(SliceRecord, Vec<SliceProblem>), SliceError> {
    let id = format!("{}/{}", slice.namespace().unwrap_or_default(), slice.name_any());
    let service = match slice.labels().get(SERVICE_NAME_LABEL) {
        Some(name) if !name.is_empty() => ServiceRef::new(slice.namespace().unwrap_or_default(), name.clone()),
        _ => return Err(SliceError::ServiceLabelMissing(id)),
    };
    if slice.address_type == "FQDN" {
        return Err(SliceError::FqdnIgnored(id));
    }
    let mut problems = Vec::new();
    let mut ports = Vec::new();
    for p in slice.ports.iter().flatten() {
        let protocol = p.protocol.as_deref().unwrap_or("TCP");
        match (
            p.port.and_then(|n| u16::try_from(n).ok()).filter(|n| *n != 0),
            protocol.parse::<Protocol>(),
        ) {
            (Some(port), Ok(protocol)) => ports.push(SlicePort {
                name: p.name.clone().unwrap_or_default(),
                protocol,
                port,
            }),
            (None, _) => problems.push(SliceProblem {
                reason: "missing_port",
                detail: format!(
                    "EndpointSlice {id}: port {:?} has no valid number",
                    p.name.as_deref().unwrap_or("")
                ),
            }),
            (_, Err(e)) => problems.push(SliceProblem {
                reason: "bad_protocol",
                detail: format!("EndpointSlice {id}: {e}"),
            }),
        }
    }
    let mut endpoints = Vec::new();
    for ep in slice.endpoints.iter().flatten() {
        let Some(first) = ep.addresses.first() else {
            problems.push(SliceProblem {
                reason: "no_address",
                detail: format!("EndpointSlice {id}: endpoint without addresses"),
            });
            continue;
        };
        let Ok(address) = first.parse::<IpAddr>() else {
            problems.push(SliceProblem {
                reason: "invalid_ip",
                detail: format!("EndpointSlice {id}: invalid address {first:?}"),
            });
            continue;
        };
        let c = ep.conditions.as_ref();
        endpoints.push(SliceEndpoint {
            address,
            conditions: Conditions {
                ready: c.and_then(|c| c.ready).unwrap_or(true),
                serving: c.and_then(|c| c.serving).unwrap_or(true),
                terminating: c.and_then(|c| c.terminating).unwrap_or(false),
            },
            node_name: ep.node_name.as_deref().map(intern_node_name),
            hints: ep.hints.as_ref().and_then(|h| {
                let zones: Vec<String> = h.for_zones.iter().flatten().map(|z| z.name.clone()).collect();
                let nodes: Vec<String> = h.for_nodes.iter().flatten().map(|n| n.name.clone()).collect();
                (!zones.is_empty() || !nodes.is_empty()).then(|| Box::new(crate::expected::Hints { zones, nodes }))
            }),
        });
    }
    // Kept for the agent's lifetime, one per slice: no spare capacity.
    ports.shrink_to_fit();
    endpoints.shrink_to_fit();
    let record = SliceRecord {
        service,
        ports,
        endpoints,
        trigger: slice_trigger(slice),
        resource_version: slice.resource_version().and_then(|v| v.parse().ok()).unwrap_or(0),
    };
    Ok((record, problems))
}

/// Converts a Service; `None` for Services kube-proxy programs no rules for (headless,
/// ExternalName).
pub fn service_spec(svc: &Service) -> Option<ServiceSpec> {
    let spec = svc.spec.as_ref()?;
    if spec.type_.as_deref() == Some("ExternalName") {
        return None;
    }
    let cluster_ips: Vec<IpAddr> = match &spec.cluster_ips {
        Some(ips) if !ips.is_empty() => ips.iter().filter_map(|ip| ip.parse().ok()).collect(),
        _ => spec.cluster_ip.iter().filter_map(|ip| ip.parse().ok()).collect(),
    };
    if cluster_ips.is_empty() {
        return None; // headless ("None") or not yet allocated
    }
    let ports: Vec<ServicePortSpec> = spec
        .ports
        .iter()
        .flatten()
        .filter_map(|p| {
            Some(ServicePortSpec {
                name: p.name.clone().unwrap_or_default(),
                protocol: p.protocol.as_deref().unwrap_or("TCP").parse().ok()?,
                port: u16::try_from(p.port).ok()?,
                node_port: p.node_port.and_then(|n| u16::try_from(n).ok()),
            })
        })
        .collect();
    let external_ips: Vec<IpAddr> = spec
        .external_ips
        .iter()
        .flatten()
        .filter_map(|ip| ip.parse().ok())
        .collect();
    let load_balancer_ips: Vec<IpAddr> = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|i| i.ip.as_deref()?.parse().ok())
        .collect();
    let type_ = spec.type_.as_deref().unwrap_or("ClusterIP");
    let has_external =
        matches!(type_, "NodePort" | "LoadBalancer") || !external_ips.is_empty() || !load_balancer_ips.is_empty();
    Some(ServiceSpec {
        internal_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
        external_local: spec.external_traffic_policy.as_deref() == Some("Local"),
        has_external,
        ports,
        cluster_ips,
        external_ips,
        load_balancer_ips,
    })
}

/// A watch event translated to the domain, stamped with the time the agent received it.
#[derive(Debug)]
pub enum WatchMsg<T> {
    /// A (re)list starts: items until `InitDone` replace the whole cache.
    InitStart,
    InitItem(T),
    InitDone(Timestamp),
    Apply(T, Timestamp),
    Delete(T, Timestamp),
    /// The watch failed and will be retried with backoff. `kind` is a metric label.
    Failed {
        kind: &'static str,
        message: String,
    },
}

/// Which objects to watch.
#[derive(Clone, Debug, Default)]
pub struct WatchScope {
    pub namespace: Option<String>,
    pub label_selector: Option<String>,
}

impl WatchScope {
    fn selector(&self) -> String {
        match &self.label_selector {
            Some(s) if !s.is_empty() => format!("{KUBE_PROXY_SELECTOR},{s}"),
            _ => KUBE_PROXY_SELECTOR.to_string(),
        }
    }
}

/// The one generic watcher: lists and watches `K` with kube-runtime's watcher (which handles
/// bookmarks, 410 Gone relists and backoff) and maps objects through `convert`.
pub fn watch<K, T>(
    client: kube::Client,
    scope: &WatchScope,
    convert: impl Fn(&K) -> T + Send + 'static,
) -> impl Stream<Item = WatchMsg<T>> + Send
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + 'static,
    K::DynamicType: Default,
    T: Send + 'static,
{
    let api: Api<K> = match &scope.namespace {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::all(client),
    };
    let config = watcher::Config::default().labels(&scope.selector()).timeout(290);
    watcher::watcher(api, config).map(move |ev| {
        let now = Timestamp::now();
        match ev {
            Ok(watcher::Event::Init) => WatchMsg::InitStart,
            Ok(watcher::Event::InitApply(o)) => WatchMsg::InitItem(convert(&o)),
            Ok(watcher::Event::InitDone) => WatchMsg::InitDone(now),
            Ok(watcher::Event::Apply(o)) => WatchMsg::Apply(convert(&o), now),
            Ok(watcher::Event::Delete(o)) => WatchMsg::Delete(convert(&o), now),
            Err(e) => WatchMsg::Failed {
                kind: watch_error_kind(&e),
                message: e.to_string(),
            },
        }
    })
}

fn watch_error_kind(e: &watcher::Error) -> &'static str {
    match e {
        watcher::Error::InitialListFailed(_) => "initial_list",
        watcher::Error::WatchStartFailed(_) => "watch_start",
        watcher::Error::WatchError(_) => "watch_error",
        watcher::Error::WatchFailed(_) => "watch_failed",
        _ => "other",
    }
}

/// How long to wait between retries of a failing watch.
pub const WATCH_RETRY: Duration = Duration::from_secs(1);

/// The wait before retrying a watch after `failures` failures in a row: 1 s doubling up to
/// 60 s, with `jitter` (0..1) taking off up to a quarter so agents do not retry in step.
pub fn retry_delay(failures: u32, jitter: f64) -> Duration {
    let base = WATCH_RETRY
        .saturating_mul(1 << failures.saturating_sub(1).min(6))
        .min(Duration::from_secs(60));
    base.mul_f64(1.0 - 0.25 * jitter.clamp(0.0, 1.0))
}

/// A number in 0..1 that differs between agents and calls (std's randomly keyed hasher, over
/// the clock): enough to spread retries, no dependency for it.
pub fn jitter() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// What a watch failure most likely means, in words an operator can act on.
pub fn failure_cause(message: &str) -> &'static str {
    let m = message.to_ascii_lowercase();
    if m.contains("connection refused") || m.contains("tcp connect") || m.contains("dns") || m.contains("timed out") {
        "the API server cannot be reached (address, network, or it is down)"
    } else if m.contains("401") || m.contains("unauthorized") {
        "the API server rejects the agent's credentials (service account token)"
    } else if m.contains("403") || m.contains("forbidden") {
        "RBAC: the agent's ServiceAccount may not list/watch this resource (deploy/base/rbac-agent.yaml)"
    } else if m.contains("400") || m.contains("badrequest") || m.contains("bad request") {
        "the API server refuses the request (an invalid --label-selector?)"
    } else {
        "see the error"
    }
}

#[cfg(test)]
mod failure_tests {
    use super::*;

    /// Issue 17: exponential backoff with jitter, and a cause that names the real problem.
    #[test]
    fn retries_back_off_and_causes_are_named() {
        assert_eq!(retry_delay(1, 0.0), Duration::from_secs(1));
        assert_eq!(retry_delay(2, 0.0), Duration::from_secs(2));
        assert_eq!(retry_delay(5, 0.0), Duration::from_secs(16));
        assert_eq!(retry_delay(40, 0.0), Duration::from_secs(60));
        assert_eq!(retry_delay(3, 1.0), Duration::from_secs(3));
        assert!(
            failure_cause("error trying to connect: tcp connect error: Connection refused (os error 111)")
                .contains("cannot be reached")
        );
        assert!(failure_cause("ApiError: endpointslices is forbidden: ... (Forbidden): 403").contains("RBAC"));
        assert!(
            !failure_cause("Connection refused").contains("RBAC"),
            "connection refused is not RBAC"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn slice(v: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(v).expect("valid EndpointSlice JSON")
    }

    #[test]
    fn reads_topology_hints() {
        let s = slice(json!({
            "metadata": {"name": "svc1-1", "namespace": "ns1", "labels": {SERVICE_NAME_LABEL: "svc1"}},
            "addressType": "IPv4",
            "ports": [{"name": "p80", "port": 80, "protocol": "TCP"}],
            "endpoints": [
                {"addresses": ["10.180.0.1"], "hints": {"forZones": [{"name": "a"}], "forNodes": [{"name": "n1"}]}},
                {"addresses": ["10.180.0.2"], "hints": {}}
            ]
        }));
        let (r, _) = slice_record(&s).unwrap();
        let h = r.endpoints[0].hints.as_deref().unwrap();
        assert_eq!(
            (h.zones.as_slice(), h.nodes.as_slice()),
            (&["a".to_string()][..], &["n1".to_string()][..])
        );
        assert!(r.endpoints[1].hints.is_none(), "empty hints are no hints");
    }

    #[test]
    fn converts_a_slice_with_kube_proxy_defaults() {
        let s = slice(json!({
            "metadata": {"name": "svc1-1", "namespace": "ns1", "resourceVersion": "42",
                "labels": {SERVICE_NAME_LABEL: "svc1"},
                "annotations": {TRIGGER_ANNOTATION: "2025-01-01T00:00:00.5Z"},
                "managedFields": [{"manager": "x", "time": "2025-01-01T00:00:09Z"}]},
            "addressType": "IPv4",
            "ports": [{"name": "p80", "port": 80, "protocol": "TCP"}, {"port": 53}],
            "endpoints": [
                {"addresses": ["10.180.0.1"], "nodeName": "node-a"},
                {"addresses": ["10.180.0.2", "10.180.0.3"], "conditions": {"ready": false, "serving": true, "terminating": true}}
            ]
        }));
        let (r, problems) = slice_record(&s).unwrap();
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(r.service, ServiceRef::new("ns1", "svc1"));
        assert_eq!(r.resource_version, 42);
        assert_eq!(r.ports.len(), 2);
        assert_eq!(
            r.ports[1],
            SlicePort {
                name: String::new(),
                protocol: Protocol::Tcp,
                port: 53
            }
        );
        assert_eq!(r.endpoints[0].conditions, Conditions::READY);
        assert_eq!(r.endpoints[1].address.to_string(), "10.180.0.2");
        assert!(r.endpoints[1].conditions.terminating);
        let trigger = r.trigger.unwrap();
        assert_eq!(trigger.source, TriggerSource::LastChangeTriggerTime);
        assert_eq!(trigger.time.to_rfc3339(), "2025-01-01T00:00:00.500000000Z");
    }

    #[test]
    fn node_names_are_shared_across_endpoints_and_slices() {
        let s = |name: &str| {
            slice(json!({
                "metadata": {"name": name, "namespace": "ns1", "labels": {SERVICE_NAME_LABEL: "svc1"}},
                "addressType": "IPv4",
                "endpoints": [
                    {"addresses": ["10.180.0.1"], "nodeName": "node-shared"},
                    {"addresses": ["10.180.0.2"], "nodeName": "node-shared"},
                    {"addresses": ["10.180.0.3"], "nodeName": "node-other"}
                ]
            }))
        };
        let (a, b) = (slice_record(&s("a")).unwrap().0, slice_record(&s("b")).unwrap().0);
        let name = |r: &SliceRecord, i: usize| r.endpoints[i].node_name.clone().unwrap();
        assert!(Arc::ptr_eq(&name(&a, 0), &name(&a, 1)));
        assert!(Arc::ptr_eq(&name(&a, 0), &name(&b, 1)));
        assert_eq!(&*name(&a, 2), "node-other");
        assert!(!Arc::ptr_eq(&name(&a, 0), &name(&a, 2)));
    }

    #[test]
    fn managed_fields_time_is_the_fallback_trigger() {
        let s = slice(json!({
            "metadata": {"name": "a", "namespace": "ns1", "labels": {SERVICE_NAME_LABEL: "svc1"},
                "managedFields": [{"manager": "x", "time": "2025-01-01T00:00:09Z"}, {"manager": "y", "time": "2025-01-01T00:00:03Z"}]},
            "addressType": "IPv4", "endpoints": []
        }));
        let t = slice_record(&s).unwrap().0.trigger.unwrap();
        assert_eq!(
            (t.source, t.time.to_rfc3339().as_str()),
            (TriggerSource::ManagedFields, "2025-01-01T00:00:09.000000000Z")
        );
    }

    #[test]
    fn malformed_slices_are_reported_not_fatal() {
        let s = slice(json!({
            "metadata": {"name": "bad", "namespace": "ns1", "labels": {SERVICE_NAME_LABEL: "svc1"}},
            "addressType": "IPv4",
            "ports": [{"name": "p80"}, {"name": "x", "port": 80, "protocol": "QUIC"}],
            "endpoints": [{"addresses": []}, {"addresses": ["10.0.0.300"]}, {"addresses": ["10.0.0.1"]}]
        }));
        let (r, problems) = slice_record(&s).unwrap();
        let reasons: Vec<_> = problems.iter().map(|p| p.reason).collect();
        assert_eq!(reasons, ["missing_port", "bad_protocol", "no_address", "invalid_ip"]);
        assert_eq!(r.endpoints.len(), 1);
        let unlabelled =
            slice(json!({"metadata": {"name": "x", "namespace": "ns1"}, "addressType": "IPv4", "endpoints": []}));
        assert_eq!(
            slice_record(&unlabelled).unwrap_err(),
            SliceError::ServiceLabelMissing("ns1/x".into())
        );
    }

    #[test]
    fn converts_services_and_skips_headless() {
        let svc: Service = serde_json::from_value(json!({
            "metadata": {"name": "svc2", "namespace": "ns2"},
            "spec": {"type": "LoadBalancer", "clusterIP": "172.30.0.42", "clusterIPs": ["172.30.0.42", "fd00::42"],
                "externalIPs": ["192.168.99.22"], "externalTrafficPolicy": "Local",
                "ports": [{"name": "p80", "port": 80, "nodePort": 3001}]},
            "status": {"loadBalancer": {"ingress": [{"ip": "1.2.3.4"}]}}
        }))
        .unwrap();
        let spec = service_spec(&svc).unwrap();
        assert_eq!(spec.cluster_ips.len(), 2);
        assert!(spec.external_local && spec.has_external && !spec.internal_local);
        assert_eq!(spec.load_balancer_ips, ["1.2.3.4".parse::<IpAddr>().unwrap()]);
        assert_eq!(spec.ports[0].protocol, Protocol::Tcp);
        let headless: Service =
            serde_json::from_value(json!({"metadata": {"name": "h"}, "spec": {"clusterIP": "None"}})).unwrap();
        assert!(service_spec(&headless).is_none());
    }
}
