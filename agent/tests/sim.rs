//! Multi-node integration tests on the simulated cluster: real agents, one per node (network
//! namespace), against the fake API server and kube-proxy emulators that record when each
//! change reached the kernel.

mod common;

use std::time::Duration;

use kc_sim::node::ProxyMode;
use kc_sim::scenario::{SimCluster, SimOptions, SimReport};
use kc_sim::store::Part;
use kube_converge::model::{ChangeKind, EndpointKey};
use serde_json::json;

fn options(mode: ProxyMode, slow: &[(&str, u64)]) -> Option<SimOptions> {
    common::sim_options(mode, 3, slow)
}

fn metric(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#') && l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| labels.iter().all(|f| l.contains(f)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn is_ip(ip: &'static str) -> impl Fn(&EndpointKey) -> bool {
    move |k| k.endpoint.ip().to_string() == ip
}

fn isolate(sim: &SimCluster, pod: &str) {
    let patch = json!({"metadata": {"labels": {"app": "web-offline"}}});
    sim.cluster()
        .patch("Pod", "demo", pod, false, &patch, Part::Main)
        .unwrap();
}

async fn lags_never_earlier_than_truth_and_slow_node_named(mode: ProxyMode) {
    let Some(opts) = options(mode, &[("node-3", 800)]) else {
        return;
    };
    let mut sim = SimCluster::start(&opts).await.unwrap();
    sim.cluster().delete("Pod", "demo", "web-0", Some(2)).unwrap();
    isolate(&sim, "web-1");
    let watched = |k: &EndpointKey| ["10.244.1.10", "10.244.2.11"].contains(&k.endpoint.ip().to_string().as_str());
    let rows = sim.collect(ChangeKind::Removed, watched, 2).await.unwrap();
    let report = SimReport {
        rows,
        metrics: sim.metrics_addrs(),
    };
    let table = report.table();
    assert!(report.all_converged(), "{table}");
    assert_eq!(report.rows.len(), 6, "{table}");
    for r in &report.rows {
        let (s, t) = (r.sample.as_ref().unwrap(), r.truth.as_ref().unwrap());
        assert!(
            s.programmed_at >= t.write_started,
            "{}: the agent says {} reached the kernel before the emulator started writing it\n{table}",
            r.node,
            r.key
        );
        let slow = r.node == "node-3";
        assert_eq!(
            s.lag >= 0.8,
            slow,
            "{}: lag {} (slow node: {slow})\n{table}",
            r.node,
            s.lag
        );
    }
    let reasons: Vec<&str> = report
        .rows
        .iter()
        .map(|r| r.sample.as_ref().unwrap().reason.as_str())
        .collect();
    assert_eq!(reasons.iter().filter(|r| **r == "deleted").count(), 3, "{table}");
    assert_eq!(reasons.iter().filter(|r| **r == "isolated").count(), 3, "{table}");
    assert!(table.contains("node-3"));
    // Live traffic: every node's client kept opening connections to the Service. None may
    // reach a removed pod after its node reported the removal programmed; the slow node's lag
    // cost some.
    let mut rows = report.rows;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    sim.fill_connections(&mut rows);
    let report = SimReport {
        rows,
        metrics: sim.metrics_addrs(),
    };
    let table = report.table();
    for r in &report.rows {
        let (_, after) = r
            .connections
            .unwrap_or_else(|| panic!("{}: no connection counts\n{table}", r.node));
        assert_eq!(after, 0, "{}: connections after converged\n{table}", r.node);
    }
    let slow_before: u64 = report
        .rows
        .iter()
        .filter(|r| r.node == "node-3")
        .map(|r| r.connections.unwrap().0)
        .sum();
    assert!(slow_before > 0, "the slow node's 0.8 s cost connections\n{table}");
    for node in sim.node_names() {
        let m = sim.scrape(&node).await.unwrap();
        let after: f64 = ["deleted", "isolated"]
            .iter()
            .map(|r| {
                metric(
                    &m,
                    "kube_converge_connections_after_removal_total",
                    &[&format!("reason=\"{r}\""), "phase=\"after_converged\""],
                )
            })
            .sum();
        assert_eq!(after, 0.0, "{node}:\n{m}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: network namespaces and kernel rules (scripts/test.sh runs it as root)"]
async fn lags_are_never_earlier_than_truth_and_the_slow_node_stands_out_iptables_legacy() {
    lags_never_earlier_than_truth_and_slow_node_named(ProxyMode::IptablesLegacy).await;
}

/// The live-traffic check can fail: agents that report removals converged before their kernel
/// made them (a test-only fault) are caught by the connections the slow node still sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: network namespaces and kernel rules (scripts/test.sh runs it as root)"]
async fn an_agent_that_reports_converged_early_is_caught_by_live_traffic() {
    let Some(mut opts) = options(ProxyMode::Iptables, &[("node-3", 1500)]) else {
        return;
    };
    opts.faulty_agents = true;
    let mut sim = SimCluster::start(&opts).await.unwrap();
    sim.cluster().delete("Pod", "demo", "web-0", Some(2)).unwrap();
    let rows = sim.collect(ChangeKind::Removed, is_ip("10.244.1.10"), 1).await.unwrap();
    let report = SimReport {
        rows,
        metrics: sim.metrics_addrs(),
    };
    let early = report
        .rows
        .iter()
        .filter(|r| matches!((&r.sample, &r.truth), (Some(s), Some(t)) if s.programmed_at < t.write_started))
        .count();
    assert!(
        early > 0,
        "the fault must make some node report early:\n{}",
        report.table()
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let m = sim.scrape("node-3").await.unwrap();
    let after = metric(
        &m,
        "kube_converge_connections_after_removal_total",
        &["reason=\"deleted\"", "phase=\"after_converged\""],
    );
    assert!(
        after > 0.0,
        "node-3 kept routing 1.5 s after its agent said converged:\n{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: network namespaces and kernel rules (scripts/test.sh runs it as root)"]
async fn lags_are_never_earlier_than_truth_and_the_slow_node_stands_out_iptables() {
    lags_never_earlier_than_truth_and_slow_node_named(ProxyMode::Iptables).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: network namespaces and kernel rules (scripts/test.sh runs it as root)"]
async fn lags_are_never_earlier_than_truth_and_the_slow_node_stands_out_nftables() {
    lags_never_earlier_than_truth_and_slow_node_named(ProxyMode::Nftables).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: network namespaces and kernel rules (scripts/test.sh runs it as root)"]
async fn an_agent_restarted_while_a_change_is_pending_loses_none_and_invents_no_lag() {
    let Some(opts) = options(ProxyMode::Iptables, &[("node-2", 3000)]) else {
        return;
    };
    let mut sim = SimCluster::start(&opts).await.unwrap();
    sim.stop_agent(1).await;
    isolate(&sim, "web-1");
    // node-1 and node-3 converge; node-2's kube-proxy still routes to web-1 for ~3 s.
    let rows = sim.collect(ChangeKind::Removed, is_ip("10.244.2.11"), 0).await.unwrap();
    assert!(rows.iter().all(|r| r.node != "node-2" || r.sample.is_none()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    sim.start_agent(1).await.unwrap();
    sim.wait_ready(1).await.unwrap();
    let mut pending_seen = false;
    for _ in 0..200 {
        let m = sim.scrape("node-2").await.unwrap_or_default();
        if metric(&m, "kube_converge_pending_changes", &["state=\"pending\""]) == 1.0 {
            pending_seen = true;
            break;
        }
        if metric(&m, "kube_converge_changes_total", &["outcome=\"converged_unsampled\""]) >= 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        pending_seen,
        "the restarted agent must hold the removal its kernel has not made yet as pending"
    );
    let mut converged = false;
    for _ in 0..600 {
        let m = sim.scrape("node-2").await.unwrap_or_default();
        if metric(
            &m,
            "kube_converge_changes_total",
            &["change=\"removed\"", "outcome=\"converged_unsampled\""],
        ) == 1.0
        {
            assert_eq!(
                metric(&m, "kube_converge_lag_seconds_count", &[]),
                0.0,
                "no lag may be invented:\n{m}"
            );
            assert_eq!(metric(&m, "kube_converge_pending_changes", &[]), 0.0);
            converged = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(converged, "the adopted removal never converged");
}

/// An agent whose first full read finished before its lists came in (a slow or unreachable API
/// server at start-up) cannot vouch for its pending list until a full read after the lists. It
/// must ask for one at once, not wait for the next resync (30 s here): until then its status
/// shows no observed version and every hold waits on the node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: network namespaces and kernel rules (scripts/test.sh runs it as root)"]
async fn an_agent_whose_lists_came_after_its_first_read_settles_without_waiting_for_a_resync() {
    let Some(opts) = options(ProxyMode::Iptables, &[]) else {
        return;
    };
    let mut sim = SimCluster::start(&opts).await.unwrap();
    sim.stop_agent(1).await;
    sim.api.stop();
    sim.cluster().delete("NodeConvergence", "", "node-2", None).unwrap();
    sim.start_agent(1).await.unwrap();
    // The dataplane loop reads at once; the lists fail until the API server is back.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    sim.api.resume().await.unwrap();
    let observed = || {
        sim.cluster()
            .get("NodeConvergence", "", "node-2")
            .and_then(|n| n["status"]["observedResourceVersion"].as_str().map(str::to_owned))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let start = std::time::Instant::now();
    while observed() == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "node-2 published no observed version 10 s after its API server came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: network namespaces and kernel rules (scripts/test.sh runs it as root)"]
async fn api_server_restart_410_and_watch_disconnects_are_survived() {
    let Some(opts) = options(ProxyMode::Iptables, &[]) else {
        return;
    };
    let mut sim = SimCluster::start(&opts).await.unwrap();
    // The API server goes down; while it is down the pod is isolated and etcd compacts, so
    // every watch resuming from its last resourceVersion gets 410 Gone and relists.
    sim.api.stop();
    isolate(&sim, "web-1");
    sim.cluster().compact();
    tokio::time::sleep(Duration::from_millis(300)).await;
    sim.api.resume().await.unwrap();
    let rows = sim.collect(ChangeKind::Removed, is_ip("10.244.2.11"), 1).await.unwrap();
    if rows.iter().filter(|r| r.sample.is_some()).count() != 3 {
        panic!("{:?}\n{}", rows, sim.scrape("node-1").await.unwrap_or_default());
    }
    // A plain disconnect of every watch.
    sim.cluster().close_watches();
    sim.cluster().delete("Pod", "demo", "web-0", Some(1)).unwrap();
    let rows = sim.collect(ChangeKind::Removed, is_ip("10.244.1.10"), 1).await.unwrap();
    assert_eq!(rows.iter().filter(|r| r.sample.is_some()).count(), 3, "{:?}", rows);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let extra: Vec<_> = sim
        .drain_samples()
        .into_iter()
        .filter(|(_, s)| s.kind == ChangeKind::Removed)
        .collect();
    assert!(extra.is_empty(), "no change may be measured twice: {extra:?}");
    for node in sim.node_names() {
        let m = sim.scrape(&node).await.unwrap();
        assert!(
            metric(&m, "kube_converge_watch_restarts_total", &[]) >= 1.0,
            "{node} never relisted:\n{m}"
        );
        assert_eq!(
            metric(&m, "kube_converge_lag_seconds_count", &["change=\"removed\""]),
            2.0,
            "{node}:\n{m}"
        );
    }
}
