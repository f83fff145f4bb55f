//! Real-kernel tests of the iptables reader: kube-proxy-format rules are loaded with
//! iptables-restore into a throw-away network namespace, for both backends and both families,
//! and `kube-converge inspect` must report exactly the routed endpoints.

mod common;

use std::process::Command;

use common::{inspect_json, pair, require, routed, Netns};
use kc_sim::emulate::{render_nat, sep_chain, EmulatedServicePort};
use kube_converge::model::{Protocol, ServicePortName};
use serde_json::Value;

const BACKENDS: [&str; 2] = ["nft", "legacy"];
const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/kube-proxy");

fn tools(backend: &str) -> Vec<String> {
    ["iptables", "ip6tables"]
        .iter()
        .flat_map(|f| [format!("{f}-{backend}-restore"), format!("{f}-{backend}-save")])
        .chain(["ip".to_string()])
        .collect()
}

fn prerequisites() -> bool {
    let all: Vec<String> = BACKENDS.iter().flat_map(|b| tools(b)).collect();
    require(&all.iter().map(String::as_str).collect::<Vec<_>>())
}

fn restore(ns: &Netns, backend: &str, v6: bool, rules: &str) {
    let prog = format!("{}-{backend}-restore", if v6 { "ip6tables" } else { "iptables" });
    ns.run_stdin(&prog, &["--noflush"], rules);
}

fn inspect(ns: &Netns, backend: &str) -> Value {
    inspect_json(ns, &["--mode", "iptables", "--iptables-backend", backend])
}

fn port(name: &str, cluster_ip: &str, eps: &[&str]) -> EmulatedServicePort {
    EmulatedServicePort {
        name: ServicePortName::parse(name).unwrap(),
        protocol: Protocol::Tcp,
        cluster_ip: cluster_ip.parse().unwrap(),
        port: 80,
        node_port: None,
        endpoints: eps.iter().map(|e| e.parse().unwrap()).collect(),
    }
}

#[test]
#[ignore = "needs root: network namespaces and kernel rules (scripts/test.sh runs it as root)"]
fn upstream_fixtures_load_and_read_back_on_both_backends() {
    if !prerequisites() {
        return;
    }
    let overall = std::fs::read_to_string(format!("{FIXTURES}/ipt_TestOverallIPTablesRules_531be81.txt")).unwrap();
    // nfacct objects do not exist in a fresh namespace; drop those matches as the reference did.
    let overall: String = overall
        .lines()
        .map(|l| {
            l.replace(" -m nfacct --nfacct-name localhost_nps_accepted_pkts", "")
                .replace(" -m nfacct --nfacct-name ct_state_invalid_dropped_pkts", "")
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n";
    for backend in BACKENDS {
        let ns = Netns::new("fixture");
        restore(&ns, backend, false, &overall);
        let report = inspect(&ns, backend);
        assert_eq!(report["mode"], "iptables");
        assert_eq!(report["backend"], backend);
        assert_eq!(
            routed(&report),
            [
                pair("ns1/svc1:p80", &["10.180.0.1:80"]),
                pair("ns2/svc2:p80", &["10.180.0.2:80"]),
                pair("ns3/svc3:p80", &["10.180.0.3:80"]),
                pair("ns4/svc4:p80", &["10.180.0.4:80", "10.180.0.5:80"]),
                pair("ns5/svc5:p80", &["10.180.0.3:80"]),
            ],
            "backend {backend}"
        );
        let svc2 = report["services"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == "ns2/svc2:p80")
            .unwrap();
        let fronts: Vec<&str> = svc2["frontends"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f.as_str().unwrap())
            .collect();
        assert_eq!(fronts, ["*:3001", "1.2.3.4:80", "172.30.0.42:80", "192.168.99.22:80"]);
    }
    let local = std::fs::read_to_string(format!("{FIXTURES}/constructed_ipt_3ep_local_iptables-save.txt")).unwrap();
    let ns = Netns::new("local");
    restore(&ns, "nft", false, &local);
    assert_eq!(
        routed(&inspect(&ns, "nft")),
        [pair(
            "ns1/svc1:p80",
            &["10.180.0.1:80", "10.180.1.1:80", "10.180.2.1:80"]
        )]
    );
}

#[test]
#[ignore = "needs root: network namespaces and kernel rules (scripts/test.sh runs it as root)"]
fn endpoint_removal_done_the_kube_proxy_way_on_both_backends_and_families() {
    if !prerequisites() {
        return;
    }
    let cases = [
        (
            false,
            "172.30.0.41",
            ["10.180.0.1:80", "10.180.0.2:80", "10.180.0.3:80"],
        ),
        (
            true,
            "fd00:172:30::41",
            ["[fd00:10:180::1]:80", "[fd00:10:180::2]:80", "[fd00:10:180::3]:80"],
        ),
    ];
    for backend in BACKENDS {
        for (v6, vip, eps) in &cases {
            let ns = Netns::new("removal");
            let before = port("ns1/svc1:p80", vip, eps);
            restore(&ns, backend, *v6, &render_nat(std::slice::from_ref(&before), true, &[]));
            assert_eq!(
                routed(&inspect(&ns, backend)),
                [pair("ns1/svc1:p80", eps)],
                "{backend} v6={v6} before"
            );
            // Remove the middle endpoint: rewrite the SVC chain, flush and delete its SEP chain.
            let after = port("ns1/svc1:p80", vip, &[eps[0], eps[2]]);
            let gone = sep_chain(&after.name, Protocol::Tcp, eps[1].parse().unwrap());
            restore(
                &ns,
                backend,
                *v6,
                &render_nat(std::slice::from_ref(&after), true, &[gone]),
            );
            assert_eq!(
                routed(&inspect(&ns, backend)),
                [pair("ns1/svc1:p80", &[eps[0], eps[2]])],
                "{backend} v6={v6} after"
            );
        }
    }
}

#[test]
#[ignore = "needs root: network namespaces and kernel rules (scripts/test.sh runs it as root)"]
fn unreferenced_sep_chain_and_missing_comments() {
    if !prerequisites() {
        return;
    }
    for backend in BACKENDS {
        let ns = Netns::new("leftover");
        let before = port("ns1/svc1", "172.30.0.41", &["10.180.0.1:80", "10.180.0.2:80"]);
        restore(
            &ns,
            backend,
            false,
            &render_nat(std::slice::from_ref(&before), false, &[]),
        );
        // Large-cluster mode: the SVC chain is rewritten but the stale SEP chain is left behind.
        let after = port("ns1/svc1", "172.30.0.41", &["10.180.0.1:80"]);
        restore(
            &ns,
            backend,
            false,
            &render_nat(std::slice::from_ref(&after), false, &[]),
        );
        let leftover = sep_chain(&after.name, Protocol::Tcp, "10.180.0.2:80".parse().unwrap());
        let save = ns.run(&format!("iptables-{backend}-save"), &["-t", "nat"]);
        let save = String::from_utf8_lossy(&save.stdout);
        assert!(
            save.contains(&format!("-A {leftover} ")),
            "the leftover chain must still exist for this test"
        );
        assert_eq!(
            routed(&inspect(&ns, backend)),
            [pair("ns1/svc1", &["10.180.0.1:80"])],
            "{backend}"
        );
    }
}

#[test]
#[ignore = "needs root: network namespaces and kernel rules (scripts/test.sh runs it as root)"]
fn auto_detection_picks_the_backend_holding_kube_chains_and_reports_none() {
    if !prerequisites() {
        return;
    }
    let ns = Netns::new("detect");
    let out = Command::new(env!("CARGO_BIN_EXE_kube-converge"))
        .args(["inspect", "-o", "json", "--netns", &ns.path()])
        .output()
        .unwrap();
    assert!(!out.status.success(), "no kube-proxy rules: inspect must fail clearly");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no KUBE-SERVICES chain") && err.contains("--mode"),
        "unclear error: {err}"
    );
    restore(
        &ns,
        "legacy",
        false,
        &render_nat(&[port("ns1/svc1:p80", "172.30.0.41", &["10.180.0.9:80"])], true, &[]),
    );
    let out = Command::new(env!("CARGO_BIN_EXE_kube-converge"))
        .args(["inspect", "-o", "json", "--netns", &ns.path()])
        .output()
        .unwrap();
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["backend"], "legacy");
    assert_eq!(routed(&report), [pair("ns1/svc1:p80", &["10.180.0.9:80"])]);
}

#[test]
#[ignore = "needs root: network namespaces and kernel rules (scripts/test.sh runs it as root)"]
fn missing_binaries_and_missing_permissions_give_clear_errors() {
    if !prerequisites() {
        return;
    }
    // Both backends read the kernel directly: no userland tool is needed.
    let ns = Netns::new("notools");
    for backend in BACKENDS {
        ns.run(&format!("iptables-{backend}"), &["-t", "nat", "-N", "KUBE-SERVICES"]);
        let out = Command::new(env!("CARGO_BIN_EXE_kube-converge"))
            .args([
                "inspect",
                "--mode",
                "iptables",
                "--iptables-backend",
                backend,
                "--netns",
                &ns.path(),
            ])
            .env("PATH", "/nonexistent")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{backend} backend without binaries: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    if !require(&["setpriv", "iptables-nft-save"]) {
        return;
    }
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            env!("CARGO_BIN_EXE_kube-converge"),
        ])
        .args(["inspect", "--mode", "iptables", "--iptables-backend", "nft"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("CAP_NET_ADMIN"), "unclear error: {err}");
}

/// Which capabilities the readers need, as the DaemonSet grants them: NET_ADMIN for netlink
/// (iptables-nft, nftables), NET_RAW too for iptables-legacy's raw socket.
#[test]
#[ignore = "needs root: network namespaces and kernel rules (scripts/test.sh runs it as root)"]
fn readers_need_net_admin_and_legacy_needs_net_raw() {
    if !prerequisites() || !require(&["setpriv", "nft"]) {
        return;
    }
    let ns = Netns::new("caps");
    ns.run("iptables-legacy", &["-t", "nat", "-N", "KUBE-SERVICES"]);
    ns.run("iptables-nft", &["-t", "nat", "-N", "KUBE-SERVICES"]);
    ns.run_stdin(
        "nft",
        &["-f", "-"],
        "table ip kube-proxy {\n map service-ips {\n  type ipv4_addr . inet_proto . inet_service : verdict\n }\n}\n",
    );
    let run = |caps: &str, args: &[&str]| {
        let mut cmd = Command::new("ip");
        cmd.args([
            "netns",
            "exec",
            &ns.name,
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
        ]);
        cmd.arg(format!("--inh-caps={caps}"))
            .arg(format!("--ambient-caps={caps}"));
        cmd.arg(env!("CARGO_BIN_EXE_kube-converge")).arg("inspect").args(args);
        cmd.output().unwrap().status.success()
    };
    let nft = ["--mode", "iptables", "--iptables-backend", "nft"];
    let legacy = ["--mode", "iptables", "--iptables-backend", "legacy"];
    let nftables = ["--mode", "nftables"];
    assert!(!run("-all", &nft), "without capabilities nothing is readable");
    assert!(run("+net_admin", &nft));
    assert!(run("+net_admin", &nftables));
    assert!(
        !run("+net_admin", &legacy),
        "the legacy table is read through a raw socket: NET_RAW too"
    );
    assert!(run("+net_admin,+net_raw", &legacy));
}

/// The reader's own view of a snapshot: one line per service port, sorted.
fn lines(snap: &kube_converge::dataplane::DataplaneSnapshot) -> Vec<String> {
    let mut out: Vec<String> = snap
        .services
        .iter()
        .map(|s| {
            format!(
                "{} {} {:?} {:?} {:?}",
                s.name.as_ref().map_or("?".into(), |n| n.to_string()),
                s.chain_id.as_deref().unwrap_or("?"),
                s.frontends,
                s.endpoints,
                s.uncertain
            )
        })
        .collect();
    out.sort();
    out
}

/// Both backends read the kernel directly (nf_tables netlink, the legacy table's blob). On the
/// same kernel state each must see exactly what its `iptables-*-save` shows, in both families,
/// and a targeted read (nft) of some service ports must see of them exactly what a full read
/// sees, including their chains being gone.
#[test]
#[ignore = "needs root: network namespaces and kernel rules (scripts/test.sh runs it as root)"]
fn kernel_reads_agree_with_iptables_save_and_targeted_reads_with_full_ones() {
    use kube_converge::dataplane::iptables::{routes_from_save, Backend, IptablesReader};
    use kube_converge::dataplane::{DataplaneReader, DataplaneSnapshot, ReadScope, ReadTargets};
    if !prerequisites() {
        return;
    }
    let ns = Netns::new("iptnl");
    let ports = |v6: bool, without: Option<usize>| -> Vec<EmulatedServicePort> {
        (0..12)
            .filter(|i| Some(*i) != without)
            .map(|i| {
                let (vip, ep) = if v6 {
                    (format!("fd00:172:30::{}", i + 1), format!("[fd00:10:180::{}]", i + 1))
                } else {
                    (format!("172.30.0.{}", i + 1), format!("10.180.0.{}", i + 1))
                };
                let eps: Vec<String> = (0..(i % 4)).map(|j| format!("{ep}:{}", 8080 + j)).collect();
                let mut p = port(
                    &format!("ns{}/svc{i}:p{}", i % 3, 80 + i),
                    &vip,
                    &eps.iter().map(String::as_str).collect::<Vec<_>>(),
                );
                p.protocol = if i % 5 == 4 { Protocol::Udp } else { Protocol::Tcp };
                p.node_port = (i % 2 == 1).then_some(30000 + i as u16);
                p
            })
            .collect()
    };
    let netns = kube_converge::netns::NetNs::open(std::path::Path::new(&ns.path())).unwrap();
    let mut full = DataplaneSnapshot::default();
    for (backend, b) in [("legacy", Backend::Legacy), ("nft", Backend::Nft)] {
        for v6 in [false, true] {
            // Comments on in one family and off in the other: names then come from hashes.
            restore(&ns, backend, v6, &render_nat(&ports(v6, None), !v6, &[]));
        }
        full = IptablesReader::new(b, netns.clone()).read().expect("kernel read");
        let mut from_text = DataplaneSnapshot::default();
        for v6 in [false, true] {
            let save = ns.run(&b.save_program(v6), &["-t", "nat"]);
            let (services, warnings, broken) = routes_from_save(&String::from_utf8_lossy(&save.stdout));
            assert!(warnings.is_empty() && !broken, "{warnings:?}");
            from_text.services.extend(services);
        }
        assert_eq!(
            lines(&full),
            lines(&from_text),
            "the {backend} reader and {} disagree",
            b.save_program(false)
        );
        assert!(full.warnings.is_empty(), "{:?}", full.warnings);
        assert_eq!(full.services.iter().map(|s| s.endpoints.len()).sum::<usize>(), 2 * 18);
    }
    let mut reader = IptablesReader::new(Backend::Nft, netns);
    assert_eq!(
        lines(&reader.read().unwrap()),
        lines(&full),
        "the full read teaches the reader its chains"
    );
    // Targeted: svc3 (3 endpoints, a NodePort) in both families, and a port never seen.
    let v4_svc3 = &ports(false, None)[3];
    let never = ServicePortName::parse("ns9/never:p1").unwrap();
    let targets = ReadTargets {
        ports: [(v4_svc3.name.clone(), v4_svc3.protocol), (never.clone(), Protocol::Tcp)].into(),
        ..Default::default()
    };
    let snap = reader.read_targeted(&targets).unwrap().unwrap();
    assert_eq!(
        snap.scope,
        Some(ReadScope::Ports([v4_svc3.name.clone()].into())),
        "the unknown port is not covered"
    );
    let endpoints = |s: &DataplaneSnapshot| -> Vec<String> {
        let mut e: Vec<String> = s
            .services
            .iter()
            .flat_map(|s| &s.endpoints)
            .map(|e| e.to_string())
            .collect();
        e.sort();
        e
    };
    let full_svc3 = DataplaneSnapshot {
        services: full
            .services
            .iter()
            .filter(|s| s.chain_id == snap.services[0].chain_id)
            .cloned()
            .collect(),
        ..Default::default()
    };
    assert_eq!(endpoints(&snap), endpoints(&full_svc3));
    assert_eq!(endpoints(&snap).len(), 6, "3 endpoints in each family");

    // One endpoint leaves (its SEP chain deleted), then the whole service port (all chains).
    let mut fewer = ports(false, None);
    let gone = fewer[3].endpoints.pop().unwrap();
    restore(
        &ns,
        "nft",
        false,
        &render_nat(&fewer, true, &[sep_chain(&fewer[3].name, fewer[3].protocol, gone)]),
    );
    let snap = reader.read_targeted(&targets).unwrap().unwrap();
    assert_eq!(endpoints(&snap).len(), 5);
    assert!(!endpoints(&snap).contains(&gone.to_string()));
    for v6 in [false, true] {
        let all = ports(v6, None);
        let svc3 = &all[3];
        let hash = kube_converge::kube_proxy_names::port_proto_hash(&svc3.name, svc3.protocol);
        let mut dead = vec![format!("KUBE-SVC-{hash}"), format!("KUBE-EXT-{hash}")];
        dead.extend(svc3.endpoints.iter().map(|e| sep_chain(&svc3.name, svc3.protocol, *e)));
        restore(&ns, "nft", v6, &render_nat(&ports(v6, Some(3)), !v6, &dead));
    }
    let snap = reader.read_targeted(&targets).unwrap().unwrap();
    assert!(snap.services.is_empty(), "{:?}", snap.services);
    assert_eq!(
        snap.scope,
        Some(ReadScope::Ports([v4_svc3.name.clone()].into())),
        "a port the last full read knew stays covered: its chains being gone is the answer"
    );
}

#[test]
#[ignore = "needs root: network namespaces and kernel rules (scripts/test.sh runs it as root)"]
fn inspect_frontend_filters_a_full_read_on_both_backends() {
    if !prerequisites() {
        return;
    }
    for backend in BACKENDS {
        let ns = Netns::new(&format!("iptfront-{backend}"));
        let a = port("ns1/a:p80", "172.30.0.41", &["10.180.0.1:80"]);
        let b = port("ns1/b:p80", "172.30.0.42", &["10.180.1.1:80", "10.180.1.2:80"]);
        restore(&ns, backend, false, &render_nat(&[a, b], true, &[]));
        let args = [
            "--mode",
            "iptables",
            "--iptables-backend",
            backend,
            "--frontend",
            "172.30.0.42:80",
        ];
        assert_eq!(
            routed(&inspect_json(&ns, &args)),
            [pair("ns1/b:p80", &["10.180.1.1:80", "10.180.1.2:80"])],
            "{backend}"
        );
        // No NodePort here: `*:80` is not the ClusterIPs' port 80.
        let node_port = [
            "--mode",
            "iptables",
            "--iptables-backend",
            backend,
            "--frontend",
            "*:80",
        ];
        assert_eq!(routed(&inspect_json(&ns, &node_port)), [], "{backend}");
    }
}

/// Issue 15 item 6: with the backend given, a nat table without `KUBE-SERVICES` (kube-proxy
/// switching modes and cleaning up, a firewall reload) must not read as "routes nothing", in a
/// full read or a targeted one: that would confirm every pending removal.
#[test]
#[ignore = "needs root: network namespaces and kernel rules (scripts/test.sh runs it as root)"]
fn item6_a_nat_table_without_kube_services_is_not_found_not_empty() {
    use kube_converge::dataplane::iptables::{Backend, IptablesReader};
    use kube_converge::dataplane::{DataplaneReader, ReadError, ReadTargets};
    if !prerequisites() {
        return;
    }
    for (backend, b) in [("nft", Backend::Nft), ("legacy", Backend::Legacy)] {
        let ns = Netns::new("nokube");
        let svc = port("ns1/svc1:p80", "172.30.0.41", &["10.180.0.1:80", "10.180.0.2:80"]);
        restore(&ns, backend, false, &render_nat(std::slice::from_ref(&svc), true, &[]));
        let netns = kube_converge::netns::NetNs::open(std::path::Path::new(&ns.path())).unwrap();
        let mut reader = IptablesReader::new(b, netns);
        let snap = reader.read().expect("read with kube-proxy's rules");
        assert_eq!(snap.services.len(), 1, "{backend}");
        assert!(!snap.absent_v4 && snap.absent_v6, "{backend}: no ip6 rules were loaded");
        let targets = ReadTargets {
            frontends: ["172.30.0.41:80".to_string()].into(),
            ports: [(svc.name.clone(), Protocol::Tcp)].into(),
        };
        // kube-proxy's chains are removed, the nat table stays.
        let save = format!("iptables-{backend}");
        ns.run(&save, &["-t", "nat", "-F"]);
        ns.run(&save, &["-t", "nat", "-X"]);
        match reader.read() {
            Err(ReadError::NotFound { detail }) => assert!(detail.contains("KUBE-SERVICES"), "{detail}"),
            other => panic!("{backend}: a table without KUBE-SERVICES read as {other:?}"),
        }
        if let Some(targeted) = reader.read_targeted(&targets) {
            let snap = targeted.expect("targeted read");
            assert!(
                snap.absent_v4,
                "{backend}: a targeted read confirmed ports whose chains are gone: {snap:?}"
            );
        }
    }
}
