//! Benchmark: how long after the kernel change the agent's t_programmed lies, event-driven and
//! polled, under a background churn of endpoint changes.
//!
//! sudo cargo run --release --example detection -- MODE SECONDS CHURN_PER_SECOND
//! MODE: iptables | iptables-legacy | nftables (kube-proxy mode of the simulated nodes).
//!
//! Ground truth: the emulator's write (`nft -f`, `iptables-restore`) brackets the kernel change.
//! In the nf_tables modes the harness also listens for the kernel's own commit announcements
//! (NEWGEN) in each node, on its own socket: the one commit inside the measured write is the
//! moment the change took effect, to within a thread wake-up.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use kc_sim::node::{Delay, GroundTruth, ProxyMode};
use kc_sim::scenario::{SimCluster, SimEvent, SimOptions};
use kc_sim::store::Part;
use kube_converge::dataplane::nfnotify::{spawn_listener, Notification};
use kube_converge::model::{ChangeKind, EndpointKey, Timestamp};
use serde_json::json;

fn pct(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * q).round() as usize]
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let a: Vec<String> = std::env::args().collect();
    let mode = match a.get(1).map(String::as_str).unwrap_or("iptables") {
        "nftables" => ProxyMode::Nftables,
        "iptables-legacy" => ProxyMode::IptablesLegacy,
        _ => ProxyMode::Iptables,
    };
    let seconds: u64 = a.get(2).and_then(|v| v.parse().ok()).unwrap_or(30);
    let churn: u64 = a.get(3).and_then(|v| v.parse().ok()).unwrap_or(100);
    let opts = SimOptions {
        nodes: 3,
        proxy_mode: mode,
        delay: Delay {
            base: Duration::from_millis(20),
            jitter: Duration::from_millis(30),
        },
        slow: Default::default(),
        grace: Duration::from_secs(1),
        timeout: Duration::from_secs(60),
        metrics_port: 0,
        keep: false,
        traffic_rate: 0,
        faulty_agents: false,
    };
    let mut sim = SimCluster::start(&opts).await?;
    let cluster = sim.cluster().clone();
    // The kernel's commits, per node (nf_tables modes; legacy iptables announces nothing).
    let (commit_tx, mut commit_rx) = tokio::sync::mpsc::unbounded_channel::<(String, Notification)>();
    if mode != ProxyMode::IptablesLegacy {
        for (node, netns) in sim.node_netns()? {
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            spawn_listener(&netns, tx)?;
            let forward = commit_tx.clone();
            tokio::spawn(async move {
                while let Some(n) = rx.recv().await {
                    let _ = forward.send((node.clone(), n));
                }
            });
        }
    }
    drop(commit_tx);
    // A churn Service with 20 pods whose readiness flips `churn` times per second.
    cluster.apply(
        json!({"kind": "Service", "metadata": {"name": "churn", "namespace": "demo"},
        "spec": {"clusterIP": "10.96.0.50", "clusterIPs": ["10.96.0.50"], "selector": {"app": "churn"},
            "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}}),
    );
    for i in 0..20 {
        cluster.apply(json!({"kind": "Pod", "metadata": {"name": format!("churn-{i}"), "namespace": "demo", "labels": {"app": "churn"}},
            "spec": {"nodeName": "node-1"}, "status": {"phase": "Running", "podIP": format!("10.244.9.{}", i + 10),
            "conditions": [{"type": "Ready", "status": "True"}]}}));
    }
    let churner = {
        let cluster = cluster.clone();
        tokio::spawn(async move {
            let mut i = 0u64;
            let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / churn.max(1)));
            loop {
                tick.tick().await;
                let pod = format!("churn-{}", i % 20);
                let ready = if (i / 20).is_multiple_of(2) { "False" } else { "True" };
                let _ = cluster.patch(
                    "Pod",
                    "demo",
                    &pod,
                    false,
                    &json!({"status": {"conditions": [{"type": "Ready", "status": ready}]}}),
                    Part::Status,
                );
                i += 1;
            }
        })
    };
    // The measured changes: web-2 leaves and rejoins its Service every second.
    let mut truths: HashMap<(String, EndpointKey, ChangeKind), Vec<GroundTruth>> = HashMap::new();
    let mut samples = Vec::new();
    let mut after_started = Vec::new();
    let mut after_finished = Vec::new();
    let start = Instant::now();
    let mut next_flip = Instant::now();
    let mut flips = 0u64;
    while start.elapsed() < Duration::from_secs(seconds) {
        if Instant::now() >= next_flip {
            let app = if flips.is_multiple_of(2) { "web-offline" } else { "web" };
            cluster.patch(
                "Pod",
                "demo",
                "web-2",
                false,
                &json!({"metadata": {"labels": {"app": app}}}),
                Part::Main,
            )?;
            flips += 1;
            next_flip += Duration::from_secs(1);
        }
        let Some(ev) = sim.next_event(Duration::from_millis(50)).await else {
            continue;
        };
        match ev {
            SimEvent::Truth(t) if t.key.endpoint.ip().to_string() == "10.244.3.12" => {
                truths
                    .entry((t.node.clone(), t.key.clone(), t.kind))
                    .or_default()
                    .push(t);
            }
            SimEvent::Sample(node, s) if s.key.endpoint.ip().to_string() == "10.244.3.12" => samples.push((node, s)),
            _ => {}
        }
    }
    churner.abort();
    // A sample can arrive before the emulator reports its write (the agent sees the commit
    // before the write command returns): match them once everything is in.
    while let Some(ev) = sim.next_event(Duration::from_millis(500)).await {
        if let SimEvent::Truth(t) = ev {
            truths
                .entry((t.node.clone(), t.key.clone(), t.kind))
                .or_default()
                .push(t);
        }
    }
    let mut commits: HashMap<String, Vec<Timestamp>> = HashMap::new();
    let mut overruns = 0;
    while let Ok((node, n)) = commit_rx.try_recv() {
        match n {
            Notification::Generation(g) => commits.entry(node).or_default().push(g.at),
            Notification::Overrun(_) => overruns += 1,
        }
    }
    let mut after_commit = Vec::new();
    let mut ambiguous = 0;
    for (node, s) in &samples {
        // The truth for this sample: the latest write of the same change before it.
        if let Some(t) = truths
            .get(&(node.clone(), s.key.clone(), s.kind))
            .and_then(|v| v.iter().rev().find(|t| t.write_started <= s.programmed_at))
        {
            after_started.push(s.programmed_at.seconds_since(t.write_started) * 1000.0);
            after_finished.push(s.programmed_at.seconds_since(t.write_finished) * 1000.0);
            // The write is one transaction: exactly one commit inside it.
            let inside: Vec<&Timestamp> = commits
                .get(node)
                .into_iter()
                .flatten()
                .filter(|c| c.seconds_since(t.write_started) >= 0.0 && t.write_finished.seconds_since(**c) >= 0.0)
                .collect();
            match inside.as_slice() {
                [c] => after_commit.push(s.programmed_at.seconds_since(**c) * 1000.0),
                _ => ambiguous += 1,
            }
        }
    }
    let n = after_started.len();
    anyhow::ensure!(n > 0, "no measured change");
    println!(
        "{mode:?}: {n} measured changes over {seconds}s with {churn} background changes/s; \
         t_programmed - write start: p50 {:.1} ms p99 {:.1} ms max {:.1} ms; \
         t_programmed - write end: p50 {:.1} ms p99 {:.1} ms; min(after start) {:.1} ms",
        pct(&mut after_started, 0.5),
        pct(&mut after_started, 0.99),
        pct(&mut after_started, 1.0),
        pct(&mut after_finished, 0.5),
        pct(&mut after_finished, 0.99),
        pct(&mut after_started, 0.0),
    );
    if !after_commit.is_empty() {
        println!(
            "{mode:?}: t_programmed - the kernel's commit (NEWGEN seen by the harness): p50 {:.2} ms p99 {:.2} ms \
             max {:.2} ms min {:.2} ms over {} changes ({ambiguous} without exactly one commit inside the write, \
             {overruns} notification overruns)",
            pct(&mut after_commit, 0.5),
            pct(&mut after_commit, 0.99),
            pct(&mut after_commit, 1.0),
            pct(&mut after_commit, 0.0),
            after_commit.len(),
        );
    }
    Ok(())
}
