//! The EndpointSlice controller of the simulated cluster, as kube-controller-manager runs it
//! for these objects: a Service's selector picks its pods; each pod with an IP is an endpoint,
//! terminating while its deletion is pending; a pod relabelled out of the selector leaves at
//! once. Slices carry `last-change-trigger-time` when their endpoints change.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use kube_converge::model::Timestamp;

pub enum SliceChange {
    Upsert(Value),
    Delete(String),
}

const MANAGED_BY: &str = "endpointslice-controller.k8s.io";

fn labels(o: &Value) -> BTreeMap<String, String> {
    o["metadata"]["labels"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect()
        })
        .unwrap_or_default()
}

fn selects(selector: &serde_json::Map<String, Value>, pod: &Value) -> bool {
    let l = labels(pod);
    !selector.is_empty() && selector.iter().all(|(k, v)| l.get(k).map(String::as_str) == v.as_str())
}

fn pod_ready(pod: &Value) -> bool {
    match pod["status"]["conditions"].as_array() {
        Some(c) => c.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"),
        None => pod["status"]["phase"] == "Running",
    }
}

/// Returns the slice writes that bring `slices` in line with `services` and `pods` (all of one
/// namespace).
pub fn reconcile(services: &[Value], pods: &[Value], slices: &[Value], now: Timestamp) -> Vec<SliceChange> {
    let mut out = Vec::new();
    let mut wanted: BTreeMap<String, Value> = BTreeMap::new();
    for svc in services {
        let Some(selector) = svc["spec"]["selector"].as_object() else {
            continue;
        };
        let svc_name = svc["metadata"]["name"].as_str().unwrap_or_default();
        let ports: Vec<Value> = svc["spec"]["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| {
                let port = p["targetPort"].as_u64().or_else(|| p["port"].as_u64()).unwrap_or(0);
                json!({"name": p["name"].as_str().unwrap_or(""), "port": port, "protocol": p["protocol"].as_str().unwrap_or("TCP")})
            })
            .collect();
        let mut by_family: BTreeMap<&str, Vec<Value>> = BTreeMap::new();
        for pod in pods.iter().filter(|p| selects(selector, p)) {
            let Some(ip) = pod["status"]["podIP"].as_str() else {
                continue;
            };
            let family = if ip.contains(':') { "IPv6" } else { "IPv4" };
            let terminating = pod["metadata"]["deletionTimestamp"].is_string();
            let serving = pod_ready(pod);
            by_family.entry(family).or_default().push(json!({
                "addresses": [ip],
                "conditions": {"ready": serving && !terminating, "serving": serving, "terminating": terminating},
                "nodeName": pod["spec"]["nodeName"],
                "targetRef": {"kind": "Pod", "namespace": pod["metadata"]["namespace"], "name": pod["metadata"]["name"],
                    "uid": pod["metadata"]["uid"]},
            }));
        }
        by_family.entry("IPv4").or_default();
        for (family, mut endpoints) in by_family {
            endpoints.sort_by(|a, b| a["addresses"][0].as_str().cmp(&b["addresses"][0].as_str()));
            let name = if family == "IPv4" {
                format!("{svc_name}-sim")
            } else {
                format!("{svc_name}-sim-v6")
            };
            wanted.insert(
                name.clone(),
                json!({"kind": "EndpointSlice", "addressType": family,
                    "metadata": {"name": name, "namespace": svc["metadata"]["namespace"],
                        "labels": {"kubernetes.io/service-name": svc_name, "endpointslice.kubernetes.io/managed-by": MANAGED_BY}},
                    "ports": ports, "endpoints": endpoints}),
            );
        }
    }
    for slice in slices {
        if slice["metadata"]["labels"]["endpointslice.kubernetes.io/managed-by"] != MANAGED_BY {
            continue; // hand-made slices are not the controller's
        }
        let name = slice["metadata"]["name"].as_str().unwrap_or_default().to_string();
        if !wanted.contains_key(&name) {
            out.push(SliceChange::Delete(name));
        }
    }
    for (name, mut want) in wanted {
        let current = slices.iter().find(|s| s["metadata"]["name"] == name.as_str());
        let same = current.is_some_and(|c| c["endpoints"] == want["endpoints"] && c["ports"] == want["ports"]);
        if same {
            continue;
        }
        want["metadata"]["annotations"] = json!({"endpoints.kubernetes.io/last-change-trigger-time": now.to_rfc3339()});
        out.push(SliceChange::Upsert(want));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, app: &str, ip: &str, node: &str) -> Value {
        json!({"kind": "Pod", "metadata": {"name": name, "namespace": "ns1", "labels": {"app": app}},
            "spec": {"nodeName": node}, "status": {"podIP": ip, "phase": "Running",
            "conditions": [{"type": "Ready", "status": "True"}]}})
    }

    fn svc() -> Value {
        json!({"kind": "Service", "metadata": {"name": "web", "namespace": "ns1"},
            "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}})
    }

    fn upserts(changes: &[SliceChange]) -> Vec<&Value> {
        changes
            .iter()
            .filter_map(|c| match c {
                SliceChange::Upsert(v) => Some(v),
                SliceChange::Delete(_) => None,
            })
            .collect()
    }

    #[test]
    fn selected_pods_become_endpoints_and_relabelled_pods_leave() {
        let now = Timestamp::from_millis(1000);
        let pods = [
            pod("a", "web", "10.0.0.1", "n1"),
            pod("b", "web-offline", "10.0.0.2", "n2"),
        ];
        let changes = reconcile(&[svc()], &pods, &[], now);
        let s = upserts(&changes)[0];
        assert_eq!(s["endpoints"].as_array().unwrap().len(), 1);
        assert_eq!(s["endpoints"][0]["addresses"][0], "10.0.0.1");
        assert_eq!(s["ports"][0]["port"], 8080);
        assert!(s["metadata"]["annotations"]["endpoints.kubernetes.io/last-change-trigger-time"].is_string());
        // Unchanged state: no write.
        assert!(upserts(&reconcile(&[svc()], &pods, std::slice::from_ref(s), now)).is_empty());
    }

    #[test]
    fn deleting_pods_are_terminating() {
        let mut p = pod("a", "web", "10.0.0.1", "n1");
        p["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        let changes = reconcile(&[svc()], &[p], &[], Timestamp::from_millis(0));
        let c = &upserts(&changes)[0]["endpoints"][0]["conditions"];
        assert_eq!(
            (c["ready"].as_bool(), c["serving"].as_bool(), c["terminating"].as_bool()),
            (Some(false), Some(true), Some(true))
        );
    }
}
