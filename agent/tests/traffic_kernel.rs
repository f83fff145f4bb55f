//! The live-traffic check against the real kernel: connections opened through kube-proxy-format
//! rules in a throw-away namespace reach the conntrack listener, and the watch splits them
//! exactly into before and after the removal's reported programming time.

mod common;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use common::{require, Netns};
use kc_sim::emulate::{render_nat, render_nft, EmulatedServicePort};
use kube_converge::dataplane::conntrack::{self, ConntrackEvent};
use kube_converge::model::{ChangeReason, EndpointKey, Protocol, ServicePortName, Timestamp};
use kube_converge::netns::NetNs;
use kube_converge::traffic::TrafficWatch;

const VIP: &str = "172.30.0.41:80";
const OLD: &str = "10.244.1.10:8080";
const NEW: &str = "10.244.2.11:8080";

fn port(eps: &[&str]) -> EmulatedServicePort {
    EmulatedServicePort {
        name: ServicePortName::new("demo", "web", "http"),
        protocol: Protocol::Tcp,
        cluster_ip: "172.30.0.41".parse().unwrap(),
        port: 80,
        node_port: None,
        endpoints: eps.iter().map(|e| e.parse().unwrap()).collect(),
    }
}

/// `n` TCP connection attempts to the VIP from inside the namespace (the pods' addresses are
/// local and closed: each SYN is translated, tracked and refused).
fn connect(ns: &Netns, n: usize) {
    let script =
        format!("for i in $(seq {n}); do timeout 2 bash -c 'exec 3<>/dev/tcp/172.30.0.41/80' 2>/dev/null; done; true");
    ns.run("bash", &["-c", &script]);
}

/// Collects the listener's connections for a moment.
fn drain(rx: &mut tokio::sync::mpsc::UnboundedReceiver<ConntrackEvent>) -> Vec<conntrack::NewConnection> {
    std::thread::sleep(Duration::from_millis(400));
    let mut out = Vec::new();
    while let Ok(e) = rx.try_recv() {
        match e {
            ConntrackEvent::Connections(c) => out.extend(c),
            other => panic!("listener trouble: {other:?}"),
        }
    }
    out
}

fn check_mode(mode: &str) {
    let ns = Netns::new("traffic");
    ns.run("ip", &["link", "set", "lo", "up"]);
    for ip in ["10.244.1.10/32", "10.244.2.11/32"] {
        ns.run("ip", &["addr", "add", ip, "dev", "lo"]);
    }
    // A route to the VIP, so that the connection reaches the nat hooks at all.
    ns.run("ip", &["route", "add", "172.30.0.0/16", "dev", "lo"]);
    let program = |eps: &[&str]| match mode {
        "nftables" => {
            ns.run_stdin("nft", &["-f", "-"], &render_nft("ip", &[port(eps)], &[], &[]));
        }
        _ => {
            ns.run_stdin(
                "iptables-nft-restore",
                &["--noflush"],
                &render_nat(&[port(eps)], true, &[]),
            );
        }
    };
    program(&[OLD]);
    let netns = NetNs::open(std::path::Path::new(&ns.path())).unwrap();
    conntrack::availability(&netns).expect("conntrack events in a fresh namespace");
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let handle = conntrack::spawn_listener(&netns, |_| true, stop.clone(), tx).unwrap();

    let key = EndpointKey::new(
        ServicePortName::new("demo", "web", "http"),
        Protocol::Tcp,
        OLD.parse().unwrap(),
    );
    let mut watch = TrafficWatch::new(Duration::from_secs(60));
    watch.removal_pending(&key, ChangeReason::Deleted, &[VIP.to_string()]);
    let feed = |watch: &mut TrafficWatch, conns: &[conntrack::NewConnection]| {
        for c in conns {
            watch.connection(c);
        }
    };

    // The removal is pending and the rules still send the VIP to OLD: 3 connections the lag
    // cost.
    connect(&ns, 3);
    let seen = drain(&mut rx);
    assert_eq!(seen.len(), 3, "{mode}: {seen:?}");
    assert!(seen
        .iter()
        .all(|c| c.target == OLD.parse().unwrap() && c.destination == VIP.parse().unwrap()));
    feed(&mut watch, &seen);
    // A broken agent says "programmed" now, while the kernel still routes to OLD: the next 2
    // connections are violations.
    std::thread::sleep(Duration::from_millis(20));
    let (_, violations) = watch.removal_converged(&key, Timestamp::now());
    assert!(violations.is_empty(), "{mode}: {violations:?}");
    std::thread::sleep(Duration::from_millis(20));
    connect(&ns, 2);
    feed(&mut watch, &drain(&mut rx));
    // The kernel really drops OLD: connections go to NEW and count for nothing.
    program(&[NEW]);
    connect(&ns, 4);
    let later = drain(&mut rx);
    assert!(
        later.iter().all(|c| c.target == NEW.parse().unwrap()),
        "{mode}: {later:?}"
    );
    assert_eq!(later.len(), 4, "{mode}");
    feed(&mut watch, &later);

    let s = watch.summary();
    assert_eq!(s.len(), 1);
    assert_eq!(
        (s[0].before_converged, s[0].after_converged),
        (3, 2),
        "{mode}: exactly 3 before and 2 after"
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    handle.join().unwrap();
}

#[test]
#[ignore = "needs root: network namespaces and kernel rules (scripts/test.sh runs it as root)"]
fn connections_to_a_removed_endpoint_are_counted_exactly_before_and_after_iptables() {
    require(&["ip", "iptables-nft-restore", "bash", "timeout"]);
    check_mode("iptables");
}

#[test]
#[ignore = "needs root: network namespaces and kernel rules (scripts/test.sh runs it as root)"]
fn connections_to_a_removed_endpoint_are_counted_exactly_before_and_after_nftables() {
    require(&["ip", "nft", "bash", "timeout"]);
    check_mode("nftables");
}

/// Without conntrack events the check says so, and never guesses.
#[test]
#[ignore = "needs root: network namespaces and kernel rules (scripts/test.sh runs it as root)"]
fn disabled_conntrack_events_are_reported_not_guessed() {
    require(&["ip", "sysctl"]);
    let ns = Netns::new("traffic-off");
    // The rules load conntrack in the namespace; then events are switched off.
    ns.run_stdin(
        "iptables-nft-restore",
        &["--noflush"],
        &render_nat(&[port(&[OLD])], true, &[]),
    );
    ns.run("sysctl", &["-w", "net.netfilter.nf_conntrack_events=0"]);
    let netns = NetNs::open(std::path::Path::new(&ns.path())).unwrap();
    let why = conntrack::availability(&netns).unwrap_err();
    assert!(why.contains("nf_conntrack_events = 0"), "{why}");
}
