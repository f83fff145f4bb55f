//! Attributes a dataplane snapshot's service ports to the Services the agent knows, producing
//! the tracker's `RoutedView`. Names come from the rules when they carry them, else from the
//! iptables chain hash of a known port, else from a known frontend. Whatever cannot be
//! attributed still counts as routed for its address (safety first).

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;

use crate::dataplane::{DataplaneSnapshot, ReadScope};
use crate::expected::ServiceExpectation;
use crate::kube_proxy_names::port_proto_hash;
use crate::model::{Protocol, ServicePortName, ServiceRef};
use crate::tracker::{RoutedView, Tracker};

/// Turns dataplane snapshots into the tracker's routed views, in one place: it names each
/// rule's service port (through the catalogue of the known Services, rebuilt only when some
/// Service's frontends changed), and gives a targeted read what it cannot see itself from the
/// last full read: routes to unknown services, and whether stray rules were unreadable.
#[derive(Debug, Default)]
pub struct Resolver {
    /// The catalogue, with the tracker's frontends generation it was built at.
    catalog: Option<(u64, ServiceCatalog)>,
    /// Unattributed routes of the last full read.
    last_unattributed: HashSet<(Protocol, SocketAddr)>,
    /// The last full read found unattributed rules it could not read.
    last_unattributed_uncertain: bool,
}

impl Resolver {
    pub fn resolve(&mut self, tracker: &Tracker, snap: &DataplaneSnapshot) -> RoutedView {
        let generation = tracker.frontends_generation();
        if self.catalog.as_ref().is_none_or(|(g, _)| *g != generation) {
            // Building it hashes every port: far too often to do per reading under churn.
            self.catalog = Some((generation, ServiceCatalog::build(tracker.services())));
        }
        let catalog = &self.catalog.as_ref().expect("built above").1;
        let mut view = catalog.view(snap);
        match &snap.scope {
            None => {
                self.last_unattributed = view.unattributed.clone();
                self.last_unattributed_uncertain = view.unattributed_uncertain;
            }
            Some(scope) => {
                view.inherit_from_last_full_read(self.last_unattributed_uncertain);
                view.scope = Some(match scope {
                    ReadScope::Frontends(read) => tracker.ports_served_only_by(read),
                    ReadScope::Ports(ports) => ports.iter().cloned().collect(),
                });
                view.unattributed.extend(self.last_unattributed.iter().copied());
            }
        }
        view
    }
}

const ALL_PROTOCOLS: [Protocol; 3] = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];

/// Lookup tables built from the known Services.
#[derive(Debug, Default)]
pub struct ServiceCatalog {
    by_hash: HashMap<String, (Arc<ServicePortName>, Protocol)>,
    /// Every service port serving a frontend: TCP and UDP share one in kube-dns.
    by_frontend: HashMap<String, Vec<(Arc<ServicePortName>, Protocol)>>,
}

impl ServiceCatalog {
    pub fn build<'a>(services: impl Iterator<Item = (&'a ServiceRef, &'a ServiceExpectation)>) -> Self {
        let mut cat = Self::default();
        for (_, exp) in services {
            for (spn, proto, frontends) in exp.frontends.iter() {
                cat.by_hash.insert(port_proto_hash(spn, proto), (spn.clone(), proto));
                for f in frontends {
                    cat.by_frontend.entry(f.clone()).or_default().push((spn.clone(), proto));
                }
            }
        }
        cat
    }

    /// The one service port serving exactly this frontend (`ip:port`) with the rules'
    /// protocol. With the protocol unknown, only a frontend one port serves is attributed.
    fn frontend(&self, key: &str, protocol: Option<Protocol>) -> Option<&(Arc<ServicePortName>, Protocol)> {
        let mut matching = self
            .by_frontend
            .get(key)?
            .iter()
            .filter(|(_, p)| protocol.is_none_or(|want| *p == want));
        let first = matching.next()?;
        matching.next().is_none().then_some(first)
    }

    /// The service port whose NodePort is this frontend's port (IPVS has one virtual server
    /// per node IP and NodePort; the node's addresses are not listed, so any address matches).
    fn node_port(&self, f: &str, protocol: Option<Protocol>) -> Option<&(Arc<ServicePortName>, Protocol)> {
        let (_, port) = f.rsplit_once(':')?;
        self.frontend(&format!("*:{port}"), protocol)
    }

    pub fn view(&self, snap: &DataplaneSnapshot) -> RoutedView {
        let mut view = RoutedView {
            unreadable_v4: snap.unreadable_v4,
            unreadable_v6: snap.unreadable_v6,
            absent_v4: snap.absent_v4,
            absent_v6: snap.absent_v6,
            ..Default::default()
        };
        for svc in &snap.services {
            let exact = svc
                .chain_id
                .as_ref()
                .and_then(|h| self.by_hash.get(h))
                .or_else(|| svc.frontends.iter().find_map(|f| self.frontend(f, svc.protocol)));
            // Matched by port alone, the rules may also be another Service's stale virtual
            // server on the same port number (a deleted Service's VIP): attributed to the
            // NodePort's Service, and also counted as routing their endpoints for any Service,
            // so that no removal of them converges while they exist.
            let by_port_only = exact.is_none() && svc.name.is_none();
            let from_catalog = || exact.or_else(|| svc.frontends.iter().find_map(|f| self.node_port(f, svc.protocol)));
            let resolved = match (&svc.name, svc.protocol) {
                (Some(n), Some(p)) => Some((Arc::new(n.clone()), p)),
                (Some(n), None) => from_catalog().filter(|(cn, _)| **cn == *n).cloned(),
                (None, _) => from_catalog().cloned(),
            };
            match resolved {
                Some((spn, proto)) => {
                    if svc.uncertain {
                        view.uncertain.insert((*spn).clone());
                    }
                    view.named
                        .extend(svc.endpoints.iter().map(|e| (spn.clone(), proto, *e)));
                    if by_port_only {
                        view.unattributed.extend(svc.endpoints.iter().map(|e| (proto, *e)));
                    }
                }
                None => {
                    if svc.uncertain {
                        // Rules we cannot read and cannot attribute: nothing can be confirmed.
                        view.unreadable_v4 = true;
                        view.unreadable_v6 = true;
                        view.unattributed_uncertain = true;
                    }
                    let protos: Vec<Protocol> = svc.protocol.map_or(ALL_PROTOCOLS.to_vec(), |p| vec![p]);
                    for e in &svc.endpoints {
                        view.unattributed.extend(protos.iter().map(|p| (*p, *e)));
                    }
                }
            }
        }
        view
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::ServiceRoutes;
    use crate::expected::builders::{slice, svc};
    use crate::expected::{expect_service, ServicePortSpec};
    use crate::model::EndpointKey;
    use crate::tracker::Routed;

    fn catalog() -> ServiceCatalog {
        let (r, spec) = svc("ns1/svc1");
        let s = slice("ns1/svc1").endpoint("10.180.0.1").build();
        let exp = expect_service(&r, Some(&spec), &[&s], "n");
        ServiceCatalog::build([(&r, &exp)].into_iter())
    }

    fn key() -> EndpointKey {
        EndpointKey::new(
            ServicePortName::new("ns1", "svc1", "p80"),
            Protocol::Tcp,
            "10.180.0.1:80".parse().unwrap(),
        )
    }

    fn routes(f: impl FnOnce(&mut ServiceRoutes)) -> DataplaneSnapshot {
        let mut r = ServiceRoutes {
            endpoints: ["10.180.0.1:80".parse().unwrap()].into(),
            ..Default::default()
        };
        f(&mut r);
        DataplaneSnapshot {
            services: vec![r],
            ..Default::default()
        }
    }

    #[test]
    fn names_come_from_rules_hash_or_frontend() {
        let cat = catalog();
        let by_name = routes(|r| {
            r.name = ServicePortName::parse("ns1/svc1:p80");
            r.protocol = Some(Protocol::Tcp);
        });
        assert_eq!(cat.view(&by_name).routes(&key()), Routed::Yes);
        let by_hash = routes(|r| r.chain_id = Some("XPGD46QRK7WJZT7O".into()));
        assert!(cat
            .view(&by_hash)
            .named
            .contains(&(key().port_name, Protocol::Tcp, key().endpoint)));
        let by_frontend = routes(|r| {
            r.frontends.insert("172.30.0.41:80".into());
        });
        assert!(cat.view(&by_frontend).unattributed.is_empty());
        let unknown_vip = routes(|r| {
            r.frontends.insert("172.30.9.9:80".into());
        });
        assert_eq!(
            cat.view(&unknown_vip).unattributed.len(),
            3,
            "unknown frontends stay routed, any protocol"
        );
    }

    #[test]
    fn ipvs_node_port_servers_resolve_through_the_node_port() {
        let (r, mut spec) = svc("ns1/svc1");
        spec.ports[0].node_port = Some(30080);
        let s = slice("ns1/svc1").endpoint("10.180.0.1").build();
        let exp = expect_service(&r, Some(&spec), &[&s], "n");
        let cat = ServiceCatalog::build([(&r, &exp)].into_iter());
        let vs = routes(|r| {
            r.protocol = Some(Protocol::Tcp);
            r.frontends.insert("192.168.0.2:30080".into());
        });
        assert_eq!(cat.view(&vs).routes(&key()), Routed::Yes);
        // Matched by port number alone: its endpoint also counts as routed for any Service
        // (the virtual server may be a deleted Service's stale VIP on the same port).
        assert_eq!(
            cat.view(&vs).unattributed,
            [(Protocol::Tcp, "10.180.0.1:80".parse().unwrap())].into()
        );
    }

    /// Issue 15 item 4: kube-dns in IPVS mode has TCP and UDP virtual servers on the same
    /// address and port. Each must resolve to its own protocol's service port.
    #[test]
    fn item4_ipvs_tcp_and_udp_on_one_frontend_resolve_by_protocol() {
        let (r, mut spec) = svc("kube-system/kube-dns");
        spec.ports = vec![
            ServicePortSpec {
                name: "dns".into(),
                protocol: Protocol::Udp,
                port: 53,
                node_port: None,
            },
            ServicePortSpec {
                name: "dns-tcp".into(),
                protocol: Protocol::Tcp,
                port: 53,
                node_port: None,
            },
        ];
        let udp = slice("kube-system/kube-dns")
            .port("dns", Protocol::Udp, 5353)
            .endpoint("10.180.0.1")
            .build();
        let tcp = slice("kube-system/kube-dns")
            .port("dns-tcp", Protocol::Tcp, 5354)
            .endpoint("10.180.0.1")
            .build();
        let exp = expect_service(&r, Some(&spec), &[&udp, &tcp], "n");
        let cat = ServiceCatalog::build([(&r, &exp)].into_iter());
        let vs = |proto: Protocol, port: u16| ServiceRoutes {
            protocol: Some(proto),
            frontends: ["172.30.0.41:53".to_string()].into(),
            endpoints: [format!("10.180.0.1:{port}").parse().unwrap()].into(),
            ..Default::default()
        };
        let udp_key = EndpointKey::new(
            ServicePortName::new("kube-system", "kube-dns", "dns"),
            Protocol::Udp,
            "10.180.0.1:5353".parse().unwrap(),
        );
        let tcp_key = EndpointKey::new(
            ServicePortName::new("kube-system", "kube-dns", "dns-tcp"),
            Protocol::Tcp,
            "10.180.0.1:5354".parse().unwrap(),
        );
        for order in [[Protocol::Udp, Protocol::Tcp], [Protocol::Tcp, Protocol::Udp]] {
            let snap = DataplaneSnapshot {
                services: order
                    .iter()
                    .map(|p| vs(*p, if *p == Protocol::Udp { 5353 } else { 5354 }))
                    .collect(),
                ..Default::default()
            };
            let view = cat.view(&snap);
            assert_eq!(view.routes(&udp_key), Routed::Yes, "{order:?}");
            assert_eq!(view.routes(&tcp_key), Routed::Yes, "{order:?}");
        }
        // Only the TCP server left: the UDP endpoint is gone, the TCP one still routed.
        let snap = DataplaneSnapshot {
            services: vec![vs(Protocol::Tcp, 5354)],
            ..Default::default()
        };
        let view = cat.view(&snap);
        assert_eq!(view.routes(&udp_key), Routed::No);
        assert_eq!(view.routes(&tcp_key), Routed::Yes);
        // The UDP server still routing to the UDP port keeps the UDP key routed.
        let snap = DataplaneSnapshot {
            services: vec![vs(Protocol::Udp, 5353)],
            ..Default::default()
        };
        assert_eq!(cat.view(&snap).routes(&udp_key), Routed::Yes);
    }

    #[test]
    fn unattributed_routes_still_count_and_uncertain_ones_block_everything() {
        let cat = catalog();
        let unknown = routes(|_| {});
        assert_eq!(cat.view(&unknown).routes(&key()), Routed::Yes);
        let broken = routes(|r| r.uncertain = true);
        assert_eq!(cat.view(&broken).routes(&key()), Routed::Unknown);
    }

    /// IPVS. Service ns1/a (port 30080, ClusterIP 172.30.9.9) was deleted; its removal of
    /// 10.180.0.9:80 is pending while kube-proxy still has the virtual server
    /// 172.30.9.9:30080 -> 10.180.0.9:80. Another Service ns1/b has NodePort 30080. The
    /// NodePort match attributes the stale virtual server to ns1/b; ns1/a's key must still read
    /// routed, as the kernel still routes it (found by review: it read "not routed").
    #[test]
    fn a_stale_vip_matched_only_by_a_nodeport_number_still_routes_its_endpoints() {
        let (b, mut spec) = svc("ns1/b");
        spec.ports[0].node_port = Some(30080);
        let s = slice("ns1/b").endpoint("10.180.0.1").build();
        let exp = expect_service(&b, Some(&spec), &[&s], "n");
        let cat = ServiceCatalog::build([(&b, &exp)].into_iter());
        let snap = DataplaneSnapshot {
            services: vec![ServiceRoutes {
                protocol: Some(Protocol::Tcp),
                frontends: ["172.30.9.9:30080".to_string()].into(),
                endpoints: ["10.180.0.9:80".parse().unwrap()].into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let a_key = EndpointKey::new(
            ServicePortName::new("ns1", "a", "p80"),
            Protocol::Tcp,
            "10.180.0.9:80".parse().unwrap(),
        );
        assert_ne!(cat.view(&snap).routes(&a_key), Routed::No);
    }
}
