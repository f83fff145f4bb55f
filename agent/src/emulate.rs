//! Writes rules in kube-proxy's exact iptables format (`iptables-restore` input, as the
//! proxier of kubernetes 531be81 writes it), for real-kernel tests, benchmarks and the
//! simulated cluster. It emulates the writer; it never reads the kernel.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

use sha2::{Digest, Sha256};

use crate::dataplane::iptables::port_proto_hash;
use crate::model::{Protocol, ServicePortName};

/// One service port as kube-proxy would program it.
#[derive(Clone, Debug)]
pub struct EmulatedServicePort {
    pub name: ServicePortName,
    pub protocol: Protocol,
    pub cluster_ip: IpAddr,
    pub port: u16,
    pub node_port: Option<u16>,
    pub endpoints: Vec<SocketAddr>,
}

/// `KUBE-SEP-` hash: base32(sha256(spn + proto + endpoint))[:16].
pub fn sep_chain(spn: &ServicePortName, protocol: Protocol, endpoint: SocketAddr) -> String {
    let digest = Sha256::digest(format!("{spn}{protocol}{endpoint}").as_bytes());
    format!(
        "KUBE-SEP-{}",
        crate::dataplane::iptables::base32_16(&digest[..10])
    )
}

fn host_cidr(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(_) => format!("{ip}/32"),
        IpAddr::V6(_) => format!("{ip}/128"),
    }
}

/// Renders a full nat table for `services`. `comments: false` mimics large-cluster mode (no
/// comments on SVC→SEP and SEP rules). `deleted_chains` are removed with `-X`, as kube-proxy
/// does for the chains of removed endpoints. Load with `iptables-restore --noflush`.
pub fn render_nat(
    services: &[EmulatedServicePort],
    comments: bool,
    deleted_chains: &[String],
) -> String {
    let mut chains = vec![
        "KUBE-SERVICES".to_string(),
        "KUBE-NODEPORTS".into(),
        "KUBE-MARK-MASQ".into(),
        "KUBE-POSTROUTING".into(),
    ];
    let mut rules = String::new();
    let c = |text: &str| {
        if comments {
            format!("-m comment --comment \"{text}\" ")
        } else {
            String::new()
        }
    };
    let _ = writeln!(rules, "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000");
    let _ = writeln!(
        rules,
        "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN"
    );
    let _ = writeln!(rules, "-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000");
    let _ = writeln!(rules, "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE");
    for svc in services {
        let (spn, p) = (&svc.name, svc.protocol.as_str());
        let hash = port_proto_hash(spn, svc.protocol);
        let svc_chain = format!("KUBE-SVC-{hash}");
        if svc.endpoints.is_empty() {
            continue; // kube-proxy writes only a filter REJECT for these
        }
        chains.push(svc_chain.clone());
        // The KUBE-SERVICES comment stays in large-cluster mode.
        let _ = writeln!(
            rules,
            "-A KUBE-SERVICES -m comment --comment \"{spn} cluster IP\" -m {p} -p {p} -d {} --dport {} -j {svc_chain}",
            svc.cluster_ip, svc.port
        );
        if let Some(np) = svc.node_port {
            let ext = format!("KUBE-EXT-{hash}");
            chains.push(ext.clone());
            let _ = writeln!(
                rules,
                "-A KUBE-NODEPORTS -m comment --comment {spn} -m {p} -p {p} --dport {np} -j {ext}"
            );
            let _ = writeln!(rules, "-A {ext} -m comment --comment \"masquerade traffic for {spn} external destinations\" -j KUBE-MARK-MASQ");
            let _ = writeln!(rules, "-A {ext} -j {svc_chain}");
        }
        let mut sorted = svc.endpoints.clone();
        sorted.sort_by_key(|e| e.to_string());
        let n = sorted.len();
        for (i, ep) in sorted.iter().enumerate() {
            let sep = sep_chain(spn, svc.protocol, *ep);
            chains.push(sep.clone());
            let stat = if i + 1 < n {
                format!(
                    "-m statistic --mode random --probability {:.10} ",
                    1.0 / (n - i) as f64
                )
            } else {
                String::new()
            };
            let _ = writeln!(
                rules,
                "-A {svc_chain} {}{stat}-j {sep}",
                c(&format!("{spn} -> {ep}"))
            );
            let _ = writeln!(
                rules,
                "-A {sep} {}-s {} -j KUBE-MARK-MASQ",
                c(&spn.to_string()),
                host_cidr(ep.ip())
            );
            let _ = writeln!(
                rules,
                "-A {sep} {}-m {p} -p {p} -j DNAT --to-destination {ep}",
                c(&spn.to_string())
            );
        }
    }
    let _ = writeln!(
        rules,
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS"
    );
    let mut out = String::from("*nat\n");
    // Declaring a chain in `--noflush` mode flushes it; kube-proxy flushes stale chains before `-X`.
    for ch in chains.iter().chain(deleted_chains) {
        let _ = writeln!(out, ":{ch} - [0:0]");
    }
    out.push_str(&rules);
    for ch in deleted_chains {
        let _ = writeln!(out, "-X {ch}");
    }
    out.push_str("COMMIT\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::iptables::routes_from_save;

    #[test]
    fn sep_names_match_kube_proxy() {
        let spn = ServicePortName::new("ns1", "svc1", "p80");
        assert_eq!(
            sep_chain(&spn, Protocol::Tcp, "10.180.0.1:80".parse().unwrap()),
            "KUBE-SEP-SXIVWICOYRO3J4NJ"
        );
        assert_eq!(
            sep_chain(&spn, Protocol::Tcp, "10.180.2.1:80".parse().unwrap()),
            "KUBE-SEP-ZX7GRIZKSNUQ3LAJ"
        );
    }

    #[test]
    fn rendered_rules_read_back() {
        let svc = EmulatedServicePort {
            name: ServicePortName::new("ns1", "svc1", "p80"),
            protocol: Protocol::Tcp,
            cluster_ip: "172.30.0.41".parse().unwrap(),
            port: 80,
            node_port: Some(30080),
            endpoints: vec![
                "10.180.0.1:80".parse().unwrap(),
                "10.180.0.2:80".parse().unwrap(),
            ],
        };
        for comments in [true, false] {
            let (s, w, _) =
                routes_from_save(&render_nat(std::slice::from_ref(&svc), comments, &[]));
            assert!(w.is_empty(), "{w:?}");
            assert_eq!(s.len(), 1);
            assert_eq!(s[0].endpoints.len(), 2);
            assert_eq!(
                s[0].name.as_ref().map(|n| n.to_string()).as_deref(),
                Some("ns1/svc1:p80")
            );
        }
    }
}
