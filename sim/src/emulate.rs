//! Writes rules in kube-proxy's exact iptables format (`iptables-restore` input, as the
//! proxier of kubernetes 531be81 writes it), for real-kernel tests, benchmarks and the
//! simulated cluster. It emulates the writer; it never reads the kernel.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

use kube_converge::kube_proxy_names::{endpoint_hash, nft_hash_and_truncate, port_proto_hash};
use kube_converge::model::{Protocol, ServicePortName};

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
    format!("KUBE-SEP-{}", endpoint_hash(spn, protocol, endpoint))
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
/// The service port's own chains (`KUBE-SVC-*`, `KUBE-EXT-*`). When its last endpoint goes,
/// kube-proxy deletes them with the endpoint chains; left behind, the service chain keeps a
/// jump to the endpoint chain and `-X` of that chain fails with EBUSY.
pub fn service_chains(spn: &ServicePortName, protocol: Protocol) -> [String; 2] {
    let hash = port_proto_hash(spn, protocol);
    [format!("KUBE-SVC-{hash}"), format!("KUBE-EXT-{hash}")]
}

pub fn render_nat(services: &[EmulatedServicePort], comments: bool, deleted_chains: &[String]) -> String {
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
    let _ = writeln!(rules, "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN");
    let _ = writeln!(rules, "-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000");
    let _ = writeln!(
        rules,
        "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE"
    );
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
                format!("-m statistic --mode random --probability {:.10} ", 1.0 / (n - i) as f64)
            } else {
                String::new()
            };
            let _ = writeln!(rules, "-A {svc_chain} {}{stat}-j {sep}", c(&format!("{spn} -> {ep}")));
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
    // kube-proxy's jumps into its rules from the built-in chains (it ensures them with `-C`/`-I`;
    // here the emulated node has no other rules there, so they are declared, flushed and set
    // again on every sync): traffic of the node itself (OUTPUT) and through it (PREROUTING).
    for builtin in ["PREROUTING", "OUTPUT"] {
        let _ = writeln!(out, ":{builtin} ACCEPT [0:0]");
        let _ = writeln!(
            rules,
            "-A {builtin} -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"
        );
    }
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
    use kube_converge::dataplane::iptables::routes_from_save;

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
            endpoints: vec!["10.180.0.1:80".parse().unwrap(), "10.180.0.2:80".parse().unwrap()],
        };
        for comments in [true, false] {
            let (s, w, _) = routes_from_save(&render_nat(std::slice::from_ref(&svc), comments, &[]));
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

/// kube-proxy's nftables `hashAndTruncate`: base32(sha256(name))[:8] + "-" + name.
pub fn nft_chain_base(name: &str) -> String {
    nft_hash_and_truncate(name)
}

fn nft_port_base(svc: &EmulatedServicePort) -> String {
    let spn = &svc.name;
    nft_chain_base(&format!(
        "{}/{}/{}/{}",
        spn.service.namespace, spn.service.name, svc.protocol, spn.port
    ))
}

/// A service port's own nftables chains (`service-…`, `external-…`): when its last endpoint
/// goes, kube-proxy flushes them (they would keep jumping to, or DNATing to, what left) and
/// deletes them later, as it does endpoint chains.
pub fn nft_service_chains(spn: &ServicePortName, protocol: Protocol) -> [String; 2] {
    let base = nft_chain_base(&format!(
        "{}/{}/{}/{}",
        spn.service.namespace, spn.service.name, protocol, spn.port
    ));
    [format!("service-{base}"), format!("external-{base}")]
}

/// The `endpoint-…` chain of one endpoint (`:` of IPv6 addresses becomes `.`).
pub fn nft_endpoint_chain(svc: &EmulatedServicePort, ep: SocketAddr) -> String {
    let spn = &svc.name;
    let ip = ep.ip().to_string().replace(':', ".");
    format!(
        "endpoint-{}",
        nft_chain_base(&format!(
            "{}/{}/{}/{}__{ip}/{}",
            spn.service.namespace,
            spn.service.name,
            svc.protocol,
            spn.port,
            ep.port()
        ))
    )
}

/// Renders one kube-proxy nftables sync as an `nft -f` transaction for `family` (`ip` or
/// `ip6`): the table, its dispatch maps and chains, every service and endpoint chain
/// rewritten, `flush` for chains that just went stale and `delete` for chains stale long
/// enough (kube-proxy deletes them at least 1 s later).
pub fn render_nft(family: &str, services: &[EmulatedServicePort], flush: &[String], delete: &[String]) -> String {
    render_nft_as(NftStyle::EndpointChains, family, services, flush, delete)
}

/// How kube-proxy's nftables mode sends a service to its endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NftStyle {
    /// `numgen random mod N vmap { i : goto endpoint-… }`, each endpoint chain DNATing
    /// (kube-proxy before v1.37, and every version with session affinity).
    EndpointChains,
    /// kube-proxy v1.37 without session affinity: the service chain DNATs itself, through
    /// `numgen random mod N map { i : addr . port }` (one endpoint: `dnat to addr:port`); no
    /// endpoint chains. A change rewrites the service chain in one transaction.
    ServiceDnat,
}

/// The ruleset of kube-proxy's nftables mode in `style`, as `nft -f` input.
pub fn render_nft_as(
    style: NftStyle,
    family: &str,
    services: &[EmulatedServicePort],
    flush: &[String],
    delete: &[String],
) -> String {
    let t = format!("{family} kube-proxy");
    let ipx = if family == "ip6" { "ip6" } else { "ip" };
    let addr = if family == "ip6" { "ipv6_addr" } else { "ipv4_addr" };
    let daddr = if family == "ip6" { "ip6 daddr" } else { "ip daddr" };
    let saddr = if family == "ip6" { "ip6 saddr" } else { "ip saddr" };
    let mut o = String::new();
    let _ = writeln!(o, "add table {t} {{ comment \"rules for kube-proxy\" ; }}");
    let _ = writeln!(
        o,
        "add map {t} service-ips {{ type {addr} . inet_proto . inet_service : verdict ; }}"
    );
    let _ = writeln!(
        o,
        "add map {t} service-nodeports {{ type inet_proto . inet_service : verdict ; }}"
    );
    for c in ["services", "mark-for-masquerade"] {
        let _ = writeln!(o, "add chain {t} {c}\nflush chain {t} {c}");
    }
    let _ = writeln!(
        o,
        "add chain {t} nat-prerouting {{ type nat hook prerouting priority -100 ; }}"
    );
    let _ = writeln!(
        o,
        "flush chain {t} nat-prerouting\nadd rule {t} nat-prerouting jump services"
    );
    // The node's own connections (kube-proxy's nat-output chain).
    let _ = writeln!(
        o,
        "add chain {t} nat-output {{ type nat hook output priority -100 ; }}\nflush chain {t} nat-output\nadd rule {t} nat-output jump services"
    );
    let _ = writeln!(o, "add rule {t} mark-for-masquerade mark set mark or 0x4000");
    let _ = writeln!(
        o,
        "add rule {t} services {daddr} . meta l4proto . th dport vmap @service-ips"
    );
    let _ = writeln!(
        o,
        "add rule {t} services fib daddr type local meta l4proto . th dport vmap @service-nodeports"
    );
    let _ = writeln!(o, "flush map {t} service-ips\nflush map {t} service-nodeports");
    // Every chain is declared (and flushed) before any rule refers to it, as kube-proxy does.
    let mut rules = String::new();
    for svc in services.iter().filter(|s| !s.endpoints.is_empty()) {
        let base = nft_port_base(svc);
        let (chain, p) = (format!("service-{base}"), svc.protocol.as_str());
        let _ = writeln!(o, "add chain {t} {chain}\nflush chain {t} {chain}");
        let mut eps = svc.endpoints.clone();
        eps.sort_by_key(|e| e.to_string());
        if style == NftStyle::ServiceDnat {
            let _ = match eps.as_slice() {
                [one] => writeln!(rules, "add rule {t} {chain} meta l4proto {p} dnat to {one}"),
                _ => {
                    let map: Vec<String> = eps
                        .iter()
                        .enumerate()
                        .map(|(i, e)| format!("{i} : {} . {}", e.ip(), e.port()))
                        .collect();
                    writeln!(
                        rules,
                        "add rule {t} {chain} meta l4proto {p} dnat {ipx} addr . port to numgen random mod {} map {{ {} }}",
                        eps.len(),
                        map.join(" , ")
                    )
                }
            };
        }
        for ep in eps.iter().filter(|_| style == NftStyle::EndpointChains) {
            let ec = nft_endpoint_chain(svc, *ep);
            let _ = writeln!(o, "add chain {t} {ec}\nflush chain {t} {ec}");
            let _ = writeln!(rules, "add rule {t} {ec} {saddr} {} jump mark-for-masquerade", ep.ip());
            let _ = writeln!(rules, "add rule {t} {ec} meta l4proto {p} dnat to {ep}");
        }
        if style == NftStyle::EndpointChains {
            let vmap: Vec<String> = eps
                .iter()
                .enumerate()
                .map(|(i, e)| format!("{i} : goto {}", nft_endpoint_chain(svc, *e)))
                .collect();
            let _ = writeln!(
                rules,
                "add rule {t} {chain} numgen random mod {} vmap {{ {} }}",
                eps.len(),
                vmap.join(" , ")
            );
        }
        let _ = writeln!(
            rules,
            "add element {t} service-ips {{ {} . {p} . {} : goto {chain} }}",
            svc.cluster_ip, svc.port
        );
        if let Some(np) = svc.node_port {
            let ext = format!("external-{base}");
            let _ = writeln!(o, "add chain {t} {ext}\nflush chain {t} {ext}");
            let _ = writeln!(
                rules,
                "add rule {t} {ext} jump mark-for-masquerade\nadd rule {t} {ext} goto {chain}"
            );
            let _ = writeln!(rules, "add element {t} service-nodeports {{ {p} . {np} : goto {ext} }}");
        }
    }
    o.push_str(&rules);
    for c in flush {
        let _ = writeln!(o, "add chain {t} {c}\nflush chain {t} {c}");
    }
    for c in delete {
        let _ = writeln!(o, "delete chain {t} {c}");
    }
    o
}

/// Splits a bulk `render_nft` ruleset (no chains to flush or delete) into several `nft -f`
/// transactions with the same result: the first declares the table, the maps and every chain,
/// the others add at most `per_tx` rules and elements each.
///
/// For loading large benchmark rulesets: in one transaction the kernel binds each anonymous
/// vmap by walking the whole transaction list (`__nft_set_trans_bind`), so a single load grows
/// with the square of the Services (kube-proxy's own first sync pays that too).
pub fn nft_load_transactions(rendered: &str, per_tx: usize) -> Vec<String> {
    let lines: Vec<&str> = rendered.lines().collect();
    let split = lines
        .iter()
        .rposition(|l| l.starts_with("add chain ") || l.starts_with("flush chain "))
        .map_or(0, |i| i + 1);
    let mut out = vec![lines[..split].iter().map(|l| format!("{l}\n")).collect::<String>()];
    for chunk in lines[split..].chunks(per_tx.max(1)) {
        out.push(chunk.iter().map(|l| format!("{l}\n")).collect());
    }
    out
}

/// Loads a whole benchmark ruleset into `netns` with `program` (`nft`, `iptables-*-restore`,
/// `ipvsadm`) reading `rules` on stdin; nftables rulesets go in several transactions
/// ([`nft_load_transactions`]), with the same result.
pub fn load_ruleset(
    netns: &kube_converge::netns::NetNs,
    program: &str,
    args: &[&str],
    rules: String,
) -> anyhow::Result<()> {
    use std::io::Write as _;
    let transactions = if program == "nft" {
        nft_load_transactions(&rules, 20_000)
    } else {
        vec![rules]
    };
    for tx in transactions {
        let mut child = netns
            .command(program)
            .args(args)
            .stdin(std::process::Stdio::piped())
            .spawn()?;
        child
            .stdin
            .take()
            .ok_or_else(|| anyhow::anyhow!("no stdin for {program}"))?
            .write_all(tx.as_bytes())?;
        anyhow::ensure!(child.wait()?.success(), "loading the ruleset with {program} failed");
    }
    Ok(())
}

#[cfg(test)]
mod nft_tests {
    use super::*;

    #[test]
    fn bulk_load_transactions_declare_every_chain_first_and_keep_every_line() {
        let ports: Vec<EmulatedServicePort> = (0..3u8)
            .map(|i| EmulatedServicePort {
                name: ServicePortName::new("ns", &format!("svc{i}"), "http"),
                protocol: Protocol::Tcp,
                cluster_ip: IpAddr::V4(std::net::Ipv4Addr::new(10, 96, 0, i)),
                port: 80,
                node_port: Some(30000 + u16::from(i)),
                endpoints: vec![SocketAddr::new(
                    IpAddr::V4(std::net::Ipv4Addr::new(10, 180, 0, i)),
                    8080,
                )],
            })
            .collect();
        let all = render_nft("ip", &ports, &[], &[]);
        let txs = nft_load_transactions(&all, 4);
        assert_eq!(txs.concat(), all, "the transactions together are the ruleset, in order");
        assert!(txs.len() > 2);
        assert!(txs[1..].iter().all(|t| t.lines().count() <= 4));
        assert!(txs[1..]
            .iter()
            .flat_map(|t| t.lines())
            .all(|l| l.starts_with("add rule ") || l.starts_with("add element ")));
        let chains_in = |t: &str| t.lines().filter(|l| l.starts_with("add chain ")).count();
        assert_eq!(chains_in(&txs[0]), chains_in(&all));
    }

    #[test]
    fn nft_names_match_kube_proxy() {
        assert_eq!(nft_chain_base("ns1/svc1/tcp/p80"), "ULMVA6XW-ns1/svc1/tcp/p80");
        let svc = EmulatedServicePort {
            name: ServicePortName::new("ns1", "svc1", "p80"),
            protocol: Protocol::Tcp,
            cluster_ip: "172.30.0.41".parse().unwrap(),
            port: 80,
            node_port: None,
            endpoints: vec![],
        };
        assert_eq!(
            nft_endpoint_chain(&svc, "10.180.0.1:80".parse().unwrap()),
            "endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80"
        );
    }
}
