//! Real-kernel tests of the nftables reader: rulesets in kube-proxy's format are loaded with
//! `nft -f` into a throw-away namespace and read back over netlink by `kube-converge inspect`.

mod common;

use std::process::Command;

use common::{inspect_json, pair, require, routed, Netns};
use kc_sim::emulate::{nft_endpoint_chain, render_nft, EmulatedServicePort};
use kube_converge::model::{Protocol, ServicePortName};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/kube-proxy");

fn nft(ns: &Netns, script: &str) {
    ns.run_stdin("nft", &["-f", "-"], script);
}

fn inspect(ns: &Netns) -> serde_json::Value {
    inspect_json(ns, &["--mode", "nftables"])
}

fn port(name: &str, vip: &str, eps: &[&str]) -> EmulatedServicePort {
    EmulatedServicePort {
        name: ServicePortName::parse(name).unwrap(),
        protocol: Protocol::Tcp,
        cluster_ip: vip.parse().unwrap(),
        port: 80,
        node_port: Some(30080),
        endpoints: eps.iter().map(|e| e.parse().unwrap()).collect(),
    }
}

#[test]
#[ignore = "needs root: network namespaces and kernel rules (scripts/test.sh runs it as root)"]
fn shared_fixtures_read_back_exactly() {
    if !require(&["ip", "nft"]) {
        return;
    }
    let ns = Netns::new("nftfix");
    nft(
        &ns,
        &std::fs::read_to_string(format!("{FIXTURES}/nft_TestOverallNFTablesRules_loadable.nft")).unwrap(),
    );
    let report = inspect(&ns);
    assert_eq!(report["mode"], "nftables");
    let want = [
        pair("ns1/svc1:p80", &["10.180.0.1:80"]),
        pair("ns2/svc2:p80", &["10.180.0.2:80"]),
        pair("ns3/svc3:p80", &["10.180.0.3:80"]),
        pair("ns4/svc4:p80", &["10.180.0.4:80", "10.180.0.5:80"]),
        pair("ns5/svc5:p80", &["10.180.0.3:80"]),
    ];
    assert_eq!(routed(&report), want);
    // Auto-detection finds the table too.
    assert_eq!(inspect_json(&ns, &[])["mode"], "nftables");
    nft(
        &ns,
        &std::fs::read_to_string(format!("{FIXTURES}/constructed_nft_ipv6_min.nft")).unwrap(),
    );
    let got = routed(&inspect(&ns));
    assert!(got.contains(&pair("ns1/svc1:p80", &["[fd00:10:180::1]:80"])), "{got:?}");
}

#[test]
#[ignore = "needs root: network namespaces and kernel rules (scripts/test.sh runs it as root)"]
fn removal_the_kube_proxy_way_vmap_rewritten_chain_flushed_then_deleted() {
    if !require(&["ip", "nft"]) {
        return;
    }
    let cases = [
        ("ip", "172.30.0.41", ["10.180.0.1:80", "10.180.0.2:80", "10.180.0.3:80"]),
        (
            "ip6",
            "fd00:172:30::41",
            ["[fd00:10:180::1]:80", "[fd00:10:180::2]:80", "[fd00:10:180::3]:80"],
        ),
    ];
    for (family, vip, eps) in cases {
        let ns = Netns::new("nftrm");
        let before = port("ns1/svc1:p80", vip, &eps);
        nft(&ns, &render_nft(family, std::slice::from_ref(&before), &[], &[]));
        assert_eq!(routed(&inspect(&ns)), [pair("ns1/svc1:p80", &eps)], "{family} before");
        let after = port("ns1/svc1:p80", vip, &[eps[0], eps[2]]);
        let stale = nft_endpoint_chain(&before, eps[1].parse().unwrap());
        // Sync 1: the vmap no longer references the chain, which is flushed but still exists.
        nft(
            &ns,
            &render_nft(family, std::slice::from_ref(&after), std::slice::from_ref(&stale), &[]),
        );
        let listed = ns.run("nft", &["list", "chain", family, "kube-proxy", &stale]);
        assert!(
            String::from_utf8_lossy(&listed.stdout).contains(&stale),
            "the stale chain must still exist here"
        );
        assert_eq!(
            routed(&inspect(&ns)),
            [pair("ns1/svc1:p80", &[eps[0], eps[2]])],
            "{family} flushed"
        );
        // Sync 2, at least 1 s later in kube-proxy: the stale chain is deleted.
        nft(
            &ns,
            &render_nft(family, std::slice::from_ref(&after), &[], std::slice::from_ref(&stale)),
        );
        assert_eq!(
            routed(&inspect(&ns)),
            [pair("ns1/svc1:p80", &[eps[0], eps[2]])],
            "{family} deleted"
        );
        // The service loses every endpoint: no element, flushed chains, nothing routed.
        let none = port("ns1/svc1:p80", vip, &[]);
        let flushed: Vec<String> = [eps[0], eps[2]]
            .iter()
            .map(|e| nft_endpoint_chain(&before, e.parse().unwrap()))
            .collect();
        nft(&ns, &render_nft(family, &[none], &flushed, &[]));
        assert_eq!(
            routed(&inspect(&ns)),
            Vec::<(String, Vec<String>)>::new(),
            "{family} no endpoints"
        );
    }
}

#[test]
#[ignore = "needs root: network namespaces and kernel rules (scripts/test.sh runs it as root)"]
fn unknown_expressions_are_reported_uncertain() {
    if !require(&["ip", "nft"]) {
        return;
    }
    let ns = Netns::new("nftunk");
    let svc = port("ns1/svc1:p80", "172.30.0.41", &["10.180.0.1:80"]);
    nft(&ns, &render_nft("ip", std::slice::from_ref(&svc), &[], &[]));
    let chain = nft_endpoint_chain(&svc, "10.180.0.1:80".parse().unwrap());
    nft(&ns, &format!("insert rule ip kube-proxy {chain} dup to 10.0.0.9\n"));
    let report = inspect(&ns);
    let s = &report["services"][0];
    assert_eq!(s["uncertain"], true, "{report}");
    let warnings = report["warnings"].to_string();
    assert!(warnings.contains("dup"), "{warnings}");
}

#[test]
#[ignore = "needs root: network namespaces and kernel rules (scripts/test.sh runs it as root)"]
fn a_table_vanishing_mid_read_never_crashes_the_reader() {
    if !require(&["ip", "nft"]) {
        return;
    }
    let ns = Netns::new("nftvanish");
    let svc = port("ns1/svc1:p80", "172.30.0.41", &["10.180.0.1:80", "10.180.0.2:80"]);
    let script = render_nft("ip", std::slice::from_ref(&svc), &[], &[]);
    nft(&ns, &script);
    let name = ns.name.clone();
    let churn = std::thread::spawn(move || {
        for _ in 0..60 {
            let _ = Command::new("ip")
                .args(["netns", "exec", &name, "nft", "delete", "table", "ip", "kube-proxy"])
                .status();
            let mut c = Command::new("ip")
                .args(["netns", "exec", &name, "nft", "-f", "-"])
                .stdin(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            use std::io::Write;
            c.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
            let _ = c.wait();
        }
    });
    let mut ok = 0;
    for _ in 0..40 {
        let out = Command::new(env!("CARGO_BIN_EXE_kube-converge"))
            .args(["inspect", "-o", "json", "--mode", "nftables", "--netns", &ns.path()])
            .output()
            .unwrap();
        if out.status.success() {
            let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            let got = routed(&report);
            // Either the whole table or none of it: never a partial, wrong answer.
            assert!(
                got.is_empty() || got == [pair("ns1/svc1:p80", &["10.180.0.1:80", "10.180.0.2:80"])],
                "partial read: {got:?}"
            );
            ok += 1;
        } else {
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                err.contains("kube-proxy") || err.contains("changed"),
                "unclear error: {err}"
            );
            assert_eq!(out.status.code(), Some(1), "a clean error exit, not a crash: {err}");
        }
    }
    churn.join().unwrap();
    assert!(ok > 0, "no read succeeded at all");
}

#[test]
#[ignore = "needs root: network namespaces and kernel rules (scripts/test.sh runs it as root)"]
fn numgen_vmaps_read_by_key_equal_their_dumps() {
    use kube_converge::dataplane::nftnl::{numgen_keys, NftConn, NFPROTO_IPV4};
    if !require(&["ip", "nft"]) {
        return;
    }
    let ns = Netns::new("nftkeyed");
    let one = port("ns1/a:p80", "172.30.0.41", &["10.180.0.1:80"]);
    let mut three = port(
        "ns1/b:p80",
        "172.30.0.42",
        &["10.180.1.1:80", "10.180.1.2:80", "10.180.1.3:80"],
    );
    three.node_port = None;
    nft(&ns, &render_nft("ip", &[one, three], &[], &[]));
    let netns = kube_converge::netns::NetNs::open(std::path::Path::new(&ns.path())).unwrap();
    let mut conn = NftConn::open(&netns).unwrap();
    let rules = conn.rules(NFPROTO_IPV4, "kube-proxy").unwrap().unwrap();
    let keyed = numgen_keys(&rules);
    let mut sizes: Vec<usize> = keyed.values().map(Vec::len).collect();
    sizes.sort();
    assert_eq!(sizes, [1, 3], "one keyed vmap per service chain: {keyed:?}");
    for (set, keys) in &keyed {
        let by_key = conn
            .elems_by_key(NFPROTO_IPV4, "kube-proxy", set, keys)
            .unwrap()
            .expect("every numgen key is in the kernel's map");
        let dumped = conn.set(NFPROTO_IPV4, "kube-proxy", set).unwrap().unwrap().elems;
        let sorted = |mut v: Vec<kube_converge::dataplane::nftnl::NftElem>| {
            v.sort_by(|a, b| a.key.cmp(&b.key));
            v
        };
        assert_eq!(sorted(by_key), sorted(dumped), "{set}");
    }
    // A key the map does not have: None (the reader then dumps), not an error.
    let (set, _) = keyed.iter().next().unwrap();
    assert_eq!(
        conn.elems_by_key(NFPROTO_IPV4, "kube-proxy", set, &[99u32.to_ne_bytes().to_vec()])
            .unwrap(),
        None
    );
}

#[test]
#[ignore = "needs root: network namespaces and kernel rules (scripts/test.sh runs it as root)"]
fn targeted_reads_cover_exactly_the_asked_frontends() {
    use kube_converge::dataplane::nftables::NftablesReader;
    use kube_converge::dataplane::{DataplaneReader, ReadScope, ReadTargets};
    if !require(&["ip", "nft"]) {
        return;
    }
    let ns = Netns::new("nfttarget");
    let a = port("ns1/a:p80", "172.30.0.41", &["10.180.0.1:80", "10.180.0.2:80"]);
    let mut b = port("ns1/b:p80", "172.30.0.42", &["10.180.1.1:80"]);
    b.node_port = None;
    nft(&ns, &render_nft("ip", &[a.clone(), b.clone()], &[], &[]));
    let mut reader = NftablesReader::new(kube_converge::netns::NetNs::open(std::path::Path::new(&ns.path())).unwrap());
    let want = ReadTargets {
        frontends: ["172.30.0.41:80".to_string()].into(),
        ..Default::default()
    };
    let snap = reader.read_targeted(&want).unwrap().unwrap();
    assert_eq!(snap.scope, Some(ReadScope::Frontends(want.frontends.clone())));
    let names: Vec<String> = snap
        .services
        .iter()
        .map(|s| s.name.as_ref().unwrap().to_string())
        .collect();
    assert_eq!(names, ["ns1/a:p80"], "only the asked service port is read");
    assert_eq!(snap.services[0].endpoints.len(), 2);
    // The endpoint leaves the kube-proxy way: the targeted read sees it gone at once.
    let after = port("ns1/a:p80", "172.30.0.41", &["10.180.0.1:80"]);
    let stale = nft_endpoint_chain(&a, "10.180.0.2:80".parse().unwrap());
    nft(&ns, &render_nft("ip", &[after, b], std::slice::from_ref(&stale), &[]));
    let snap = reader.read_targeted(&want).unwrap().unwrap();
    assert_eq!(
        snap.services[0]
            .endpoints
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>(),
        ["10.180.0.1:80"]
    );
    // A frontend with no element any more: nothing routed, no error.
    let gone = ReadTargets {
        frontends: ["172.30.9.9:80".to_string()].into(),
        ..Default::default()
    };
    assert!(reader.read_targeted(&gone).unwrap().unwrap().services.is_empty());
}

#[test]
#[ignore = "needs root: network namespaces and kernel rules (scripts/test.sh runs it as root)"]
fn inspect_frontend_reports_only_what_serves_it() {
    if !require(&["ip", "nft"]) {
        return;
    }
    let ns = Netns::new("nftfront");
    let a = port("ns1/a:p80", "172.30.0.41", &["10.180.0.1:80", "10.180.0.2:80"]);
    let mut b = port("ns1/b:p80", "172.30.0.42", &["10.180.1.1:80"]);
    b.node_port = None;
    nft(&ns, &render_nft("ip", &[a, b], &[], &[]));
    let only_a = [pair("ns1/a:p80", &["10.180.0.1:80", "10.180.0.2:80"])];
    let by_ip = inspect_json(&ns, &["--mode", "nftables", "--frontend", "172.30.0.41:80"]);
    assert_eq!(routed(&by_ip), only_a);
    let by_node_port = inspect_json(&ns, &["--mode", "nftables", "--frontend", "*:30080"]);
    assert_eq!(routed(&by_node_port), only_a);
    let none = inspect_json(&ns, &["--mode", "nftables", "--frontend", "172.30.9.9:80"]);
    assert_eq!(routed(&none), []);
    let bad = Command::new(env!("CARGO_BIN_EXE_kube-converge"))
        .args(["inspect", "--netns", &ns.path(), "--frontend", "172.30.0.41"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("expected IP:PORT"), "{err}");
}

/// Real kube-proxy v1.37.2 DNATs in the service chain through an anonymous data map
/// (`dnat ip addr . port to numgen random mod 3 map { 0 : a . p, … }`), with no endpoint
/// chains. Full and targeted reads must both find every endpoint, and follow a removal.
#[test]
#[ignore = "needs root: network namespaces and kernel rules (scripts/test.sh runs it as root)"]
fn real_v1_37_dnat_through_a_numgen_data_map() {
    use kube_converge::dataplane::nftables::NftablesReader;
    use kube_converge::dataplane::{DataplaneReader, ReadTargets};
    if !require(&["ip", "nft"]) {
        return;
    }
    let ns = Netns::new("nft137");
    nft(
        &ns,
        &std::fs::read_to_string(format!("{FIXTURES}/nft_real_v1.37.2_web3.nft")).unwrap(),
    );
    let report = inspect(&ns);
    let three = pair(
        "demo/web:http",
        &["10.244.0.11:8080", "10.244.1.11:8080", "10.244.2.11:8080"],
    );
    assert!(routed(&report).contains(&three), "{report}");
    assert_eq!(
        report["warnings"].as_array().map(|w| w.len()).unwrap_or(0),
        0,
        "{report}"
    );
    let mut reader = NftablesReader::new(kube_converge::netns::NetNs::open(std::path::Path::new(&ns.path())).unwrap());
    let full = reader.read().unwrap();
    let web = full
        .services
        .iter()
        .find(|s| s.name.as_ref().is_some_and(|n| n.to_string() == "demo/web:http"))
        .expect("demo/web read");
    assert!(!web.uncertain);
    assert_eq!(web.endpoints.len(), 3);
    let vip = web.frontends.iter().next().unwrap().clone();
    let want = ReadTargets {
        frontends: [vip.clone()].into(),
        ..Default::default()
    };
    let snap = reader.read_targeted(&want).unwrap().unwrap();
    assert_eq!(snap.services.len(), 1);
    assert_eq!(snap.services[0].endpoints.len(), 3, "{snap:?}");
    // kube-proxy's removal: the service chain is rewritten with the remaining two.
    nft(
        &ns,
        "flush chain ip kube-proxy service-AXK6CI2C-demo/web/tcp/http\n\
         add rule ip kube-proxy service-AXK6CI2C-demo/web/tcp/http meta l4proto tcp dnat ip addr . port to numgen random mod 2 map { 0 : 10.244.1.11 . 8080, 1 : 10.244.2.11 . 8080 }\n",
    );
    let snap = reader.read_targeted(&want).unwrap().unwrap();
    let mut eps: Vec<String> = snap.services[0].endpoints.iter().map(|e| e.to_string()).collect();
    eps.sort();
    assert_eq!(eps, ["10.244.1.11:8080", "10.244.2.11:8080"]);
    let full = reader.read().unwrap();
    assert!(full
        .services
        .iter()
        .all(|s| !s.endpoints.iter().any(|e| e.to_string() == "10.244.0.11:8080")));
    // One endpoint left: kube-proxy DNATs with immediates, still in the service chain.
    nft(
        &ns,
        "flush chain ip kube-proxy service-AXK6CI2C-demo/web/tcp/http\n\
         add rule ip kube-proxy service-AXK6CI2C-demo/web/tcp/http meta l4proto tcp dnat to 10.244.2.11:8080\n",
    );
    let snap = reader.read_targeted(&want).unwrap().unwrap();
    let eps: Vec<String> = snap.services[0].endpoints.iter().map(|e| e.to_string()).collect();
    assert_eq!(eps, ["10.244.2.11:8080"]);
}

/// The emulator's v1.37 style (what the sim's nftables nodes now program) reads back exactly,
/// in both families, with one and with several endpoints.
#[test]
#[ignore = "needs root: network namespaces and kernel rules (scripts/test.sh runs it as root)"]
fn emulated_v1_37_service_dnat_reads_back_in_both_families() {
    use kc_sim::emulate::{render_nft_as, NftStyle};
    if !require(&["ip", "nft"]) {
        return;
    }
    let ns = Netns::new("nftstyle");
    let mut a = port(
        "ns1/a:p80",
        "172.30.0.51",
        &["10.180.0.1:80", "10.180.0.2:80", "10.180.0.3:80"],
    );
    a.node_port = None;
    let mut b = port("ns1/b:p80", "172.30.0.52", &["10.180.1.1:80"]);
    b.node_port = None;
    nft(&ns, &render_nft_as(NftStyle::ServiceDnat, "ip", &[a, b], &[], &[]));
    let mut v6 = port("ns1/c:p80", "fd00:30::53", &["[fd00:180::1]:80", "[fd00:180::2]:80"]);
    v6.node_port = None;
    nft(&ns, &render_nft_as(NftStyle::ServiceDnat, "ip6", &[v6], &[], &[]));
    let report = inspect(&ns);
    let got = routed(&report);
    for want in [
        pair("ns1/a:p80", &["10.180.0.1:80", "10.180.0.2:80", "10.180.0.3:80"]),
        pair("ns1/b:p80", &["10.180.1.1:80"]),
        pair("ns1/c:p80", &["[fd00:180::1]:80", "[fd00:180::2]:80"]),
    ] {
        assert!(got.contains(&want), "{want:?} not in {got:?}: {report}");
    }
    assert_eq!(
        report["warnings"].as_array().map(|w| w.len()).unwrap_or(0),
        0,
        "{report}"
    );
}
