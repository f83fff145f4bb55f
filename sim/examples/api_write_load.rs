//! Benchmark: API writes from NodeConvergence status publication, at N simulated nodes, idle
//! and under endpoint churn, extrapolated to 5,000 nodes.
//!
//! sudo cargo run --release --example api_write_load -- [NODES] [IDLE_SECONDS] [CHURN_SECONDS]

use std::time::{Duration, Instant};

use kc_sim::node::{Delay, ProxyMode};
use kc_sim::scenario::{SimCluster, SimOptions};
use serde_json::json;

async fn count_writes(sim: &SimCluster, window: Duration, mut during: impl FnMut(u64)) -> u64 {
    let mut events = sim.cluster().subscribe();
    let start = Instant::now();
    let mut writes = 0u64;
    let mut tick = 0u64;
    while start.elapsed() < window {
        tokio::select! {
            ev = events.recv() => match ev {
                Ok(e) if e.resource == "nodeconvergences" => writes += 1,
                Ok(_) => {}
                Err(_) => break,
            },
            _ = tokio::time::sleep(Duration::from_millis(100)) => {
                tick += 1;
                during(tick);
            }
        }
    }
    writes
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<u64> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let nodes = *args.first().unwrap_or(&50) as usize;
    let idle = Duration::from_secs(*args.get(1).unwrap_or(&60));
    let churn = Duration::from_secs(*args.get(2).unwrap_or(&120));
    let opts = SimOptions {
        nodes,
        proxy_mode: ProxyMode::Iptables,
        delay: Delay {
            base: Duration::from_millis(50),
            jitter: Duration::from_millis(200),
        },
        slow: Default::default(),
        grace: Duration::from_secs(1),
        timeout: Duration::from_secs(120),
        metrics_port: 0,
        keep: false,
        traffic_rate: 0,
        faulty_agents: false,
    };
    let started = Instant::now();
    let sim = SimCluster::start(&opts).await?;
    eprintln!(
        "{nodes} nodes ready in {:.1?}; letting first writes settle",
        started.elapsed()
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    let idle_writes = count_writes(&sim, idle, |_| {}).await;
    // Churn: every 2 s flip one pod in and out of its Service (one removal and one addition on
    // every node each time).
    let cluster = sim.cluster().clone();
    let churn_writes = count_writes(&sim, churn, |tick| {
        if tick % 20 == 0 {
            let app = if (tick / 20) % 2 == 1 { "web-offline" } else { "web" };
            let _ = cluster.patch(
                "Pod",
                "demo",
                "web-2",
                false,
                &json!({"metadata": {"labels": {"app": app}}}),
                kc_sim::store::Part::Main,
            );
        }
    })
    .await;
    let per_node_idle = idle_writes as f64 / nodes as f64 / idle.as_secs_f64();
    let per_node_churn = churn_writes as f64 / nodes as f64 / churn.as_secs_f64();
    println!("nodes: {nodes}");
    println!(
        "idle: {idle_writes} writes in {idle:?} = {:.3} writes/s = {:.4} per node per s ({:.2} per node per 10 s)",
        idle_writes as f64 / idle.as_secs_f64(),
        per_node_idle,
        per_node_idle * 10.0
    );
    println!(
        "churn (a label flip every 2 s): {churn_writes} writes in {churn:?} = {:.3} writes/s = {:.4} per node per s",
        churn_writes as f64 / churn.as_secs_f64(),
        per_node_churn
    );
    println!("extrapolated to 5000 nodes: idle {:.1} writes/s, churn {:.1} writes/s (node leases: 5000 / 10 s = 500 writes/s)", per_node_idle * 5000.0, per_node_churn * 5000.0);
    Ok(())
}
