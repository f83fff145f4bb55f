//! The emulated kube-proxy's own model of what it programs, read straight from the stored JSON
//! Services and EndpointSlices. It shares no code with the agent's expected set
//! (`kube_converge::expected`): the simulation's ground truth must be able to catch a bug there,
//! so it cannot be computed by the code under test.
//!
//! kube-proxy's rules, as far as the simulated cluster uses them:
//! - Services without a cluster IP (headless, ExternalName) get no rules;
//! - a slice belongs to a Service by its `kubernetes.io/service-name` label and namespace;
//! - a service port takes the slice port of the same name and protocol (TCP when unset);
//! - an endpoint is ready unless `ready: false`; when no endpoint of a port is ready, the
//!   serving-and-terminating ones are used instead;
//! - `internalTrafficPolicy: Local` keeps the endpoints on this node only.
//!
//! Only IPv4 is programmed (the simulated nodes are single-stack).

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use serde_json::Value;

use crate::emulate::EmulatedServicePort;
use crate::store::Cluster;
use kube_converge::model::{Protocol, ServicePortName};

/// The service ports this node's kube-proxy programs.
pub fn desired_ports(cluster: &Cluster, node: &str) -> Vec<EmulatedServicePort> {
    let slices = cluster.list("EndpointSlice");
    cluster
        .list("Service")
        .iter()
        .flat_map(|svc| service_ports(svc, &slices, node))
        .collect()
}

fn service_ports(svc: &Value, slices: &[Value], node: &str) -> Vec<EmulatedServicePort> {
    let (Some(ns), Some(name)) = (svc["metadata"]["namespace"].as_str(), svc["metadata"]["name"].as_str()) else {
        return Vec::new();
    };
    let spec = &svc["spec"];
    if spec["type"] == "ExternalName" {
        return Vec::new();
    }
    let mut ips: Vec<&str> = spec["clusterIPs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    ips.extend(spec["clusterIP"].as_str());
    let Some(cluster_ip) = ips.iter().find_map(|ip| ip.parse::<Ipv4Addr>().ok()) else {
        return Vec::new(); // headless ("None"), or no IPv4
    };
    let local_only = spec["internalTrafficPolicy"] == "Local";
    let own: Vec<&Value> = slices
        .iter()
        .filter(|s| {
            s["metadata"]["namespace"] == ns
                && s["metadata"]["labels"]["kubernetes.io/service-name"] == name
                && s["addressType"] == "IPv4"
        })
        .collect();
    let mut out = Vec::new();
    for port in spec["ports"].as_array().into_iter().flatten() {
        let port_name = port["name"].as_str().unwrap_or("");
        let protocol = protocol_of(port);
        let (Some(protocol), Some(number)) = (protocol, port["port"].as_u64().and_then(|p| u16::try_from(p).ok()))
        else {
            continue;
        };
        // (address, ready, serving-and-terminating) of every endpoint serving this port.
        let mut candidates: Vec<(SocketAddr, bool, bool)> = Vec::new();
        for slice in &own {
            let Some(target) = slice["ports"].as_array().into_iter().flatten().find_map(|p| {
                let same = p["name"].as_str().unwrap_or("") == port_name && protocol_of(p) == Some(protocol);
                same.then(|| p["port"].as_u64().and_then(|n| u16::try_from(n).ok()))
                    .flatten()
            }) else {
                continue;
            };
            for ep in slice["endpoints"].as_array().into_iter().flatten() {
                if local_only && ep["nodeName"].as_str() != Some(node) {
                    continue;
                }
                let c = &ep["conditions"];
                let ready = c["ready"].as_bool().unwrap_or(true);
                let serving = c["serving"].as_bool().unwrap_or(ready);
                let terminating = c["terminating"].as_bool().unwrap_or(false);
                for addr in ep["addresses"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                {
                    if let Ok(ip) = addr.parse::<Ipv4Addr>() {
                        candidates.push((SocketAddr::new(IpAddr::V4(ip), target), ready, serving && terminating));
                    }
                }
            }
        }
        let ready: BTreeSet<SocketAddr> = candidates.iter().filter(|c| c.1).map(|c| c.0).collect();
        let endpoints = if ready.is_empty() {
            candidates.iter().filter(|c| c.2).map(|c| c.0).collect::<BTreeSet<_>>()
        } else {
            ready
        };
        out.push(EmulatedServicePort {
            name: ServicePortName::new(ns, name, port_name),
            protocol,
            cluster_ip: IpAddr::V4(cluster_ip),
            port: number,
            node_port: port["nodePort"].as_u64().and_then(|p| u16::try_from(p).ok()),
            endpoints: endpoints.into_iter().collect(),
        });
    }
    out
}

fn protocol_of(port: &Value) -> Option<Protocol> {
    match port["protocol"].as_str().unwrap_or("TCP") {
        "TCP" => Some(Protocol::Tcp),
        "UDP" => Some(Protocol::Udp),
        "SCTP" => Some(Protocol::Sctp),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn svc(extra: Value) -> Value {
        let mut s = json!({"metadata": {"namespace": "demo", "name": "web"},
            "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80}]}});
        for (k, v) in extra.as_object().unwrap() {
            s["spec"][k] = v.clone();
        }
        s
    }

    fn slice(endpoints: Value) -> Value {
        json!({"metadata": {"namespace": "demo", "name": "web-abc", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": endpoints})
    }

    fn eps(svc: &Value, slices: &[Value], node: &str) -> Vec<String> {
        service_ports(svc, slices, node)
            .into_iter()
            .flat_map(|p| p.endpoints)
            .map(|e| e.to_string())
            .collect()
    }

    #[test]
    fn ready_endpoints_then_the_terminating_fallback() {
        let s = svc(json!({}));
        let both = slice(json!([
            {"addresses": ["10.244.1.10"], "conditions": {"ready": true}},
            {"addresses": ["10.244.2.11"], "conditions": {"ready": false, "serving": true, "terminating": true}},
        ]));
        assert_eq!(eps(&s, &[both], "node-1"), ["10.244.1.10:8080"]);
        let only_terminating = slice(json!([
            {"addresses": ["10.244.2.11"], "conditions": {"ready": false, "serving": true, "terminating": true}},
            {"addresses": ["10.244.3.12"], "conditions": {"ready": false, "serving": false, "terminating": true}},
        ]));
        assert_eq!(eps(&s, &[only_terminating], "node-1"), ["10.244.2.11:8080"]);
    }

    #[test]
    fn local_policy_headless_and_other_services_slices() {
        let local = svc(json!({"internalTrafficPolicy": "Local"}));
        let sl = slice(json!([
            {"addresses": ["10.244.1.10"], "nodeName": "node-1"},
            {"addresses": ["10.244.2.11"], "nodeName": "node-2"},
        ]));
        assert_eq!(eps(&local, std::slice::from_ref(&sl), "node-2"), ["10.244.2.11:8080"]);
        assert!(service_ports(&svc(json!({"clusterIP": "None"})), std::slice::from_ref(&sl), "node-1").is_empty());
        let mut other = sl.clone();
        other["metadata"]["labels"]["kubernetes.io/service-name"] = json!("api");
        assert!(eps(&svc(json!({})), &[other], "node-1").is_empty());
    }
}
