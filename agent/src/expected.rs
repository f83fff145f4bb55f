//! The set of endpoints kube-proxy should program on this node, computed from trimmed Service
//! and EndpointSlice records with kube-proxy's semantics (`CategorizeEndpoints`). Pure logic:
//! it never talks to the API server and never looks at the kernel.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use crate::model::{EndpointKey, Protocol, ServicePortName, ServiceRef, Trigger};

/// The fields of a Service that decide what kube-proxy programs.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ServiceSpec {
    pub ports: Vec<ServicePortSpec>,
    pub cluster_ips: Vec<IpAddr>,
    pub external_ips: Vec<IpAddr>,
    pub load_balancer_ips: Vec<IpAddr>,
    /// `internalTrafficPolicy: Local`.
    pub internal_local: bool,
    /// `externalTrafficPolicy: Local` (only meaningful with external frontends).
    pub external_local: bool,
    /// Has NodePorts, external IPs or load-balancer IPs.
    pub has_external: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePortSpec {
    /// Empty for an unnamed port.
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
    pub node_port: Option<u16>,
}

impl ServiceSpec {
    /// The frontends of one port as readers render them: `ip:port` for ClusterIPs, external
    /// and load-balancer IPs, and `*:nodePort` for a NodePort on any node address.
    pub fn frontends(&self, port: &ServicePortSpec) -> Vec<String> {
        self.cluster_ips
            .iter()
            .chain(&self.external_ips)
            .chain(&self.load_balancer_ips)
            .map(|ip| SocketAddr::new(*ip, port.port).to_string())
            .chain(port.node_port.map(|np| format!("*:{np}")))
            .collect()
    }
}

/// An EndpointSlice, trimmed to what kube-proxy reads.
#[derive(Clone, Debug, PartialEq)]
pub struct SliceRecord {
    pub service: ServiceRef,
    pub ports: Vec<SlicePort>,
    pub endpoints: Vec<SliceEndpoint>,
    pub trigger: Option<Trigger>,
    pub resource_version: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlicePort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conditions {
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

impl Conditions {
    pub const READY: Conditions = Conditions {
        ready: true,
        serving: true,
        terminating: false,
    };

    fn usable_as_fallback(self) -> bool {
        self.serving && self.terminating
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceEndpoint {
    /// `addresses[0]`.
    pub address: IpAddr,
    pub conditions: Conditions,
    /// Interned (`k8s::intern_node_name`): 100k endpoints name a few thousand nodes.
    pub node_name: Option<Arc<str>>,
    /// Topology hints (`hints.forZones`, `hints.forNodes`); boxed: most endpoints have none.
    pub hints: Option<Box<Hints>>,
}

/// An endpoint's topology hints.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Hints {
    pub zones: Vec<String>,
    pub nodes: Vec<String>,
}

/// Which topology kube-proxy applies to a Service port's cluster endpoints on a node, from
/// the hints of its ready endpoints (kube-proxy's `topologyModeFromHints`): same-node when every
/// ready endpoint has a node hint and one names this node, else same-zone when every one has a
/// zone hint and one names this node's zone, else none.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Topology {
    None,
    SameNode,
    SameZone,
}

fn topology<'a>(ready: impl Iterator<Item = &'a SliceEndpoint> + Clone, node: &str, zone: Option<&str>) -> Topology {
    let hints = |f: fn(&Hints) -> &Vec<String>| {
        let mut all = true;
        let mut any = false;
        let mut mine = false;
        for e in ready.clone() {
            any = true;
            match e.hints.as_deref().map(f).filter(|h| !h.is_empty()) {
                None => all = false,
                Some(h) => mine |= h.iter().any(|n| Some(n.as_str()) == Some(node)),
            }
        }
        (any && all, mine)
    };
    let (all_node, for_node) = hints(|h| &h.nodes);
    if all_node && for_node {
        return Topology::SameNode;
    }
    let zone_hints = |h: &Hints| -> bool { zone.is_some_and(|z| h.zones.iter().any(|x| x == z)) };
    let all_zone = ready.clone().next().is_some()
        && ready
            .clone()
            .all(|e| e.hints.as_deref().is_some_and(|h| !h.zones.is_empty()));
    if all_zone && ready.clone().any(|e| e.hints.as_deref().is_some_and(zone_hints)) {
        return Topology::SameZone;
    }
    Topology::None
}

fn available(e: &SliceEndpoint, topo: Topology, node: &str, zone: Option<&str>) -> bool {
    let h = e.hints.as_deref();
    match topo {
        Topology::None => true,
        Topology::SameNode => h.is_some_and(|h| h.nodes.iter().any(|n| n == node)),
        Topology::SameZone => h.is_some_and(|h| zone.is_some_and(|z| h.zones.iter().any(|x| x == z))),
    }
}

/// What one Service should look like in this node's dataplane.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ServiceExpectation {
    pub expected: BTreeSet<EndpointKey>,
    /// The condition of every endpoint IP in the Service's slices (non-terminating copy wins),
    /// so a removal can be classified.
    pub conditions: HashMap<IpAddr, Conditions>,
    /// The newest trigger among the Service's slices.
    pub trigger: Option<Trigger>,
    /// The highest slice resourceVersion that went into this expectation.
    pub resource_version: u64,
    /// Frontends per port (see `ServiceSpec::frontends`), to name rules that carry no name.
    pub frontends: PortFrontends,
    /// False when the Service object is gone (its endpoints leave as `service_deleted`).
    pub service_exists: bool,
}

/// Frontends per service port, in the order of the Service's ports. A list, not a map: a
/// Service has one or two ports, and a B-tree node holds eleven (ten times the memory, at
/// 10k Services).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PortFrontends(Vec<(Arc<ServicePortName>, Protocol, Vec<String>)>);

impl PortFrontends {
    pub fn get(&self, spn: &ServicePortName, protocol: Protocol) -> Option<&[String]> {
        self.0
            .iter()
            .find(|(n, p, _)| **n == *spn && *p == protocol)
            .map(|(_, _, f)| f.as_slice())
    }

    /// Sets one port's frontends (replacing what it had).
    pub fn insert(&mut self, spn: Arc<ServicePortName>, protocol: Protocol, frontends: Vec<String>) {
        match self.0.iter_mut().find(|(n, p, _)| *n == spn && *p == protocol) {
            Some(entry) => entry.2 = frontends,
            None => self.0.push((spn, protocol, frontends)),
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (&Arc<ServicePortName>, Protocol, &[String])> {
        self.0.iter().map(|(n, p, f)| (n, *p, f.as_slice()))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// What else shapes kube-proxy's choice on a node: the mode, and the node's zone.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Semantics {
    /// IPVS: a Local-policy virtual server with no local endpoints uses the cluster endpoints
    /// (iptables and nftables route nothing there).
    pub local_falls_back_to_cluster: bool,
    /// The node's `topology.kubernetes.io/zone` label, for zone hints.
    pub zone: Option<String>,
}

/// Computes the expectation for one Service on `node`. `None` spec means the Service does not
/// exist (kube-proxy programs nothing for slices without a Service).
pub fn expect_service(
    service: &ServiceRef,
    spec: Option<&ServiceSpec>,
    slices: &[&SliceRecord],
    node: &str,
) -> ServiceExpectation {
    expect_service_with(service, spec, slices, node, &Semantics::default())
}

pub fn expect_service_with(
    service: &ServiceRef,
    spec: Option<&ServiceSpec>,
    slices: &[&SliceRecord],
    node: &str,
    semantics: &Semantics,
) -> ServiceExpectation {
    let mut out = ServiceExpectation {
        trigger: slices.iter().filter_map(|s| s.trigger).max_by_key(|t| t.time),
        resource_version: slices.iter().map(|s| s.resource_version).max().unwrap_or(0),
        ..Default::default()
    };
    for ep in slices.iter().flat_map(|s| &s.endpoints) {
        out.conditions
            .entry(ep.address)
            .and_modify(|c| {
                if c.terminating && !ep.conditions.terminating {
                    *c = ep.conditions;
                }
            })
            .or_insert(ep.conditions);
    }
    let Some(spec) = spec else { return out };
    out.service_exists = true;
    for port in &spec.ports {
        // One copy of the names for the port's frontends and all of its endpoints.
        let spn = Arc::new(ServicePortName::new(&service.namespace, &service.name, &port.name));
        out.frontends.insert(spn.clone(), port.protocol, spec.frontends(port));
        // One entry per ip:port: the same endpoint in two slices counts once, and the
        // non-terminating copy wins.
        let mut candidates: BTreeMap<SocketAddr, (&SliceEndpoint, bool)> = BTreeMap::new();
        for slice in slices {
            let Some(sp) = slice
                .ports
                .iter()
                .find(|p| p.name == port.name && p.protocol == port.protocol)
            else {
                continue;
            };
            for ep in &slice.endpoints {
                let addr = SocketAddr::new(ep.address, sp.port);
                let local = ep.node_name.as_deref() == Some(node);
                candidates
                    .entry(addr)
                    .and_modify(|(e, l)| {
                        if e.conditions.terminating && !ep.conditions.terminating {
                            *e = ep;
                            *l = local;
                        }
                    })
                    .or_insert((ep, local));
            }
        }
        let zone = semantics.zone.as_deref();
        // Topology (hints) narrows the cluster endpoints only; the Local set ignores it.
        let topo = topology(
            candidates.values().map(|(e, _)| *e).filter(|e| e.conditions.ready),
            node,
            zone,
        );
        let pick = |only_local: bool| -> Vec<SocketAddr> {
            let pool = candidates.iter().filter(|(_, (_, l))| !only_local || *l);
            let ready: Vec<_> = pool
                .clone()
                .filter(|(_, (e, _))| e.conditions.ready && (only_local || available(e, topo, node, zone)))
                .map(|(a, _)| *a)
                .collect();
            if !ready.is_empty() {
                return ready;
            }
            pool.filter(|(_, (e, _))| e.conditions.usable_as_fallback())
                .map(|(a, _)| *a)
                .collect()
        };
        // Internal traffic uses the cluster set unless iTP=Local. Like kube-proxy's
        // `UsesClusterEndpoints`, an externally reachable port always has the cluster chain
        // (eTP=Local short-circuits in-cluster traffic to external addresses through it). The
        // dataplane routes the union of the chains in use.
        let needs_cluster = !spec.internal_local || spec.has_external;
        let needs_local = spec.internal_local || (spec.has_external && spec.external_local);
        let mut chosen = BTreeSet::new();
        if needs_cluster {
            chosen.extend(pick(false));
        }
        if needs_local {
            let local = pick(true);
            if local.is_empty() && semantics.local_falls_back_to_cluster {
                chosen.extend(pick(false));
            }
            chosen.extend(local);
        }
        out.expected.extend(
            chosen
                .into_iter()
                .map(|a| EndpointKey::new(spn.clone(), port.protocol, a)),
        );
    }
    out
}

#[cfg(test)]
pub(crate) mod builders {
    //! Test builders: `slice("ns/svc").endpoint("10.0.0.1").terminating()`.
    use super::*;
    use crate::model::{Timestamp, TriggerSource};

    pub fn svc(ns_name: &str) -> (ServiceRef, ServiceSpec) {
        let (ns, name) = ns_name.split_once('/').expect("ns/name");
        let spec = ServiceSpec {
            ports: vec![ServicePortSpec {
                name: "p80".into(),
                protocol: Protocol::Tcp,
                port: 80,
                node_port: None,
            }],
            cluster_ips: vec!["172.30.0.41".parse().unwrap()],
            ..Default::default()
        };
        (ServiceRef::new(ns, name), spec)
    }

    pub struct SliceBuilder(pub SliceRecord);

    pub fn slice(ns_name: &str) -> SliceBuilder {
        let (ns, name) = ns_name.split_once('/').expect("ns/name");
        SliceBuilder(SliceRecord {
            service: ServiceRef::new(ns, name),
            ports: vec![SlicePort {
                name: "p80".into(),
                protocol: Protocol::Tcp,
                port: 80,
            }],
            endpoints: vec![],
            trigger: None,
            resource_version: 1,
        })
    }

    impl SliceBuilder {
        pub fn port(mut self, name: &str, protocol: Protocol, port: u16) -> Self {
            self.0.ports = vec![SlicePort {
                name: name.into(),
                protocol,
                port,
            }];
            self
        }
        pub fn endpoint(mut self, ip: &str) -> Self {
            self.0.endpoints.push(SliceEndpoint {
                address: ip.parse().expect("ip"),
                conditions: Conditions::READY,
                node_name: None,
                hints: None,
            });
            self
        }
        fn last(&mut self) -> &mut SliceEndpoint {
            self.0.endpoints.last_mut().expect("endpoint() first")
        }
        pub fn terminating(mut self) -> Self {
            self.last().conditions = Conditions {
                ready: false,
                serving: true,
                terminating: true,
            };
            self
        }
        pub fn unready(mut self) -> Self {
            self.last().conditions = Conditions {
                ready: false,
                serving: false,
                terminating: false,
            };
            self
        }
        /// Zone hints (`hints.forZones`).
        pub fn for_zones(mut self, zones: &[&str]) -> Self {
            self.last().hints.get_or_insert_with(Default::default).zones =
                zones.iter().map(|z| z.to_string()).collect();
            self
        }
        /// Node hints (`hints.forNodes`).
        pub fn for_nodes(mut self, nodes: &[&str]) -> Self {
            self.last().hints.get_or_insert_with(Default::default).nodes =
                nodes.iter().map(|n| n.to_string()).collect();
            self
        }
        pub fn on(mut self, node: &str) -> Self {
            self.last().node_name = Some(node.into());
            self
        }
        pub fn trigger_ms(mut self, ms: i64) -> Self {
            self.0.trigger = Some(Trigger {
                time: Timestamp::from_millis(ms),
                source: TriggerSource::LastChangeTriggerTime,
            });
            self
        }
        pub fn build(self) -> SliceRecord {
            self.0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::builders::*;
    use super::*;

    fn addrs(e: &ServiceExpectation) -> Vec<String> {
        e.expected.iter().map(|k| k.endpoint.to_string()).collect()
    }

    #[test]
    fn ready_endpoints_are_expected_and_unready_are_not() {
        let (r, spec) = svc("ns1/svc1");
        let s = slice("ns1/svc1")
            .endpoint("10.180.0.1")
            .endpoint("10.180.0.2")
            .unready()
            .build();
        let e = expect_service(&r, Some(&spec), &[&s], "node-a");
        assert_eq!(addrs(&e), ["10.180.0.1:80"]);
    }

    #[test]
    fn terminating_fallback_only_when_nothing_is_ready() {
        let (r, spec) = svc("ns1/svc1");
        let mixed = slice("ns1/svc1")
            .endpoint("10.180.0.1")
            .endpoint("10.180.0.2")
            .terminating()
            .build();
        assert_eq!(
            addrs(&expect_service(&r, Some(&spec), &[&mixed], "n")),
            ["10.180.0.1:80"]
        );
        let all_term = slice("ns1/svc1")
            .endpoint("10.180.0.1")
            .terminating()
            .endpoint("10.180.0.2")
            .unready()
            .build();
        assert_eq!(
            addrs(&expect_service(&r, Some(&spec), &[&all_term], "n")),
            ["10.180.0.1:80"]
        );
    }

    #[test]
    fn local_policy_keeps_only_this_nodes_endpoints() {
        let (r, mut spec) = svc("ns1/svc1");
        spec.internal_local = true;
        let s = slice("ns1/svc1")
            .endpoint("10.180.0.1")
            .on("node-a")
            .endpoint("10.180.0.2")
            .on("node-b")
            .build();
        assert_eq!(
            addrs(&expect_service(&r, Some(&spec), &[&s], "node-a")),
            ["10.180.0.1:80"]
        );
        assert_eq!(
            addrs(&expect_service(&r, Some(&spec), &[&s], "node-c")),
            Vec::<String>::new()
        );
        // eTP=Local with iTP=Cluster: the cluster chain still routes everything.
        spec.internal_local = false;
        spec.external_local = true;
        spec.has_external = true;
        assert_eq!(addrs(&expect_service(&r, Some(&spec), &[&s], "node-c")).len(), 2);
    }

    /// Issue 15 item 7: kube-proxy's `UsesClusterEndpoints` is true for any externally
    /// reachable port, even with both policies `Local` (short-circuiting in-cluster traffic to
    /// external addresses goes to the cluster chain), so every node routes to remote endpoints.
    #[test]
    fn item7_internal_and_external_local_on_an_external_service_still_routes_cluster_endpoints() {
        let (r, mut spec) = svc("ns1/svc1");
        spec.internal_local = true;
        spec.external_local = true;
        spec.has_external = true;
        let s = slice("ns1/svc1")
            .endpoint("10.180.0.1")
            .on("node-a")
            .endpoint("10.180.0.2")
            .on("node-b")
            .build();
        assert_eq!(
            addrs(&expect_service(&r, Some(&spec), &[&s], "node-c")),
            ["10.180.0.1:80", "10.180.0.2:80"]
        );
        // Not externally reachable: iTP=Local keeps only this node's endpoints.
        spec.has_external = false;
        assert_eq!(
            addrs(&expect_service(&r, Some(&spec), &[&s], "node-a")),
            ["10.180.0.1:80"]
        );
    }

    fn zoned(zone: Option<&str>) -> Semantics {
        Semantics {
            zone: zone.map(Into::into),
            ..Default::default()
        }
    }

    /// Issue 15 (topology): kube-proxy routes only the endpoints hinted to this node's zone
    /// when every ready endpoint has a zone hint and one names the zone; otherwise all.
    #[test]
    fn zone_hints_narrow_the_cluster_endpoints_as_kube_proxy_does() {
        let (r, spec) = svc("ns1/svc1");
        let hinted = slice("ns1/svc1")
            .endpoint("10.180.0.1")
            .for_zones(&["a"])
            .endpoint("10.180.0.2")
            .for_zones(&["b"])
            .endpoint("10.180.0.3")
            .unready()
            .build();
        let got =
            |s: &SliceRecord, zone: Option<&str>| addrs(&expect_service_with(&r, Some(&spec), &[s], "n", &zoned(zone)));
        assert_eq!(got(&hinted, Some("a")), ["10.180.0.1:80"]);
        assert_eq!(got(&hinted, Some("b")), ["10.180.0.2:80"]);
        // No endpoint for this zone, or the node has no zone label: hints are ignored.
        assert_eq!(got(&hinted, Some("c")), ["10.180.0.1:80", "10.180.0.2:80"]);
        assert_eq!(got(&hinted, None), ["10.180.0.1:80", "10.180.0.2:80"]);
        // One ready endpoint without a hint: hints are ignored.
        let partial = slice("ns1/svc1")
            .endpoint("10.180.0.1")
            .for_zones(&["a"])
            .endpoint("10.180.0.2")
            .build();
        assert_eq!(got(&partial, Some("a")), ["10.180.0.1:80", "10.180.0.2:80"]);
        // Nothing ready: the terminating fallback ignores topology.
        let terminating = slice("ns1/svc1")
            .endpoint("10.180.0.1")
            .for_zones(&["a"])
            .terminating()
            .endpoint("10.180.0.2")
            .for_zones(&["b"])
            .terminating()
            .build();
        assert_eq!(got(&terminating, Some("a")), ["10.180.0.1:80", "10.180.0.2:80"]);
    }

    /// PreferSameNode: node hints win when every ready endpoint has one and one names this
    /// node; otherwise zone hints apply.
    #[test]
    fn node_hints_win_over_zone_hints() {
        let (r, spec) = svc("ns1/svc1");
        let s = slice("ns1/svc1")
            .endpoint("10.180.0.1")
            .for_nodes(&["n1"])
            .for_zones(&["a"])
            .endpoint("10.180.0.2")
            .for_nodes(&["n2"])
            .for_zones(&["a"])
            .build();
        let got = |node: &str| addrs(&expect_service_with(&r, Some(&spec), &[&s], node, &zoned(Some("a"))));
        assert_eq!(got("n1"), ["10.180.0.1:80"]);
        assert_eq!(
            got("n3"),
            ["10.180.0.1:80", "10.180.0.2:80"],
            "no node hint for n3: zone hints (both in a)"
        );
    }

    /// Topology narrows the cluster chain only: with iTP=Local, local endpoints are routed
    /// whatever their hints.
    #[test]
    fn topology_does_not_narrow_the_local_endpoints() {
        let (r, mut spec) = svc("ns1/svc1");
        spec.internal_local = true;
        let s = slice("ns1/svc1")
            .endpoint("10.180.0.1")
            .on("n")
            .for_zones(&["b"])
            .endpoint("10.180.0.2")
            .for_zones(&["a"])
            .build();
        assert_eq!(
            addrs(&expect_service_with(&r, Some(&spec), &[&s], "n", &zoned(Some("a")))),
            ["10.180.0.1:80"]
        );
    }

    #[test]
    fn local_fallback_keeps_local_terminating_endpoint_even_when_remote_ones_are_ready() {
        let (r, mut spec) = svc("ns1/svc1");
        spec.internal_local = true;
        let s = slice("ns1/svc1")
            .endpoint("10.180.0.1")
            .on("node-a")
            .terminating()
            .endpoint("10.180.0.2")
            .on("node-b")
            .build();
        assert_eq!(
            addrs(&expect_service(&r, Some(&spec), &[&s], "node-a")),
            ["10.180.0.1:80"]
        );
    }

    #[test]
    fn one_endpoint_in_two_slices_counts_once_and_non_terminating_copy_wins() {
        let (r, spec) = svc("ns1/svc1");
        let a = slice("ns1/svc1")
            .endpoint("10.180.0.1")
            .terminating()
            .endpoint("10.180.0.3")
            .build();
        let b = slice("ns1/svc1").endpoint("10.180.0.1").build();
        let e = expect_service(&r, Some(&spec), &[&a, &b], "n");
        assert_eq!(addrs(&e), ["10.180.0.1:80", "10.180.0.3:80"]);
        assert!(!e.conditions[&"10.180.0.1".parse::<IpAddr>().unwrap()].terminating);
    }

    #[test]
    fn ports_are_matched_by_name_and_protocol() {
        let (r, mut spec) = svc("ns1/svc1");
        spec.ports = vec![
            ServicePortSpec {
                name: "".into(),
                protocol: Protocol::Udp,
                port: 53,
                node_port: None,
            },
            ServicePortSpec {
                name: "p80".into(),
                protocol: Protocol::Tcp,
                port: 80,
                node_port: None,
            },
        ];
        let udp = slice("ns1/svc1")
            .port("", Protocol::Udp, 5353)
            .endpoint("10.180.0.1")
            .build();
        let tcp = slice("ns1/svc1")
            .port("p80", Protocol::Tcp, 8080)
            .endpoint("10.180.0.1")
            .build();
        let wrong = slice("ns1/svc1")
            .port("p80", Protocol::Udp, 9999)
            .endpoint("10.180.0.9")
            .build();
        let e = expect_service(&r, Some(&spec), &[&udp, &tcp, &wrong], "n");
        let got: Vec<String> = e
            .expected
            .iter()
            .map(|k| format!("{} {} {}", k.port_name, k.protocol, k.endpoint))
            .collect();
        assert_eq!(
            got,
            ["ns1/svc1 udp 10.180.0.1:5353", "ns1/svc1:p80 tcp 10.180.0.1:8080"]
        );
    }

    #[test]
    fn no_service_means_nothing_expected_but_conditions_are_kept() {
        let r = ServiceRef::new("ns1", "svc1");
        let s = slice("ns1/svc1").endpoint("10.180.0.1").build();
        let e = expect_service(&r, None, &[&s], "n");
        assert!(e.expected.is_empty());
        assert_eq!(e.conditions.len(), 1);
    }

    #[test]
    fn dual_stack_slices_produce_both_families() {
        let (r, spec) = svc("ns1/svc1");
        let v4 = slice("ns1/svc1").endpoint("10.180.0.1").build();
        let v6 = slice("ns1/svc1").endpoint("fd00:10:180::1").build();
        assert_eq!(
            addrs(&expect_service(&r, Some(&spec), &[&v4, &v6], "n")),
            ["10.180.0.1:80", "[fd00:10:180::1]:80"]
        );
    }
}
