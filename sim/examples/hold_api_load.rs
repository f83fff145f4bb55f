//! Benchmark: API requests one hold costs. A pod of the simulated cluster is deleted while a
//! hold waits for it; the agents' requests during the hold (everything but their own status
//! writes and watches, which run anyway) are counted by kind. One node is slow, so the hold
//! lasts a few seconds, as on a real cluster.
//!
//! sudo cargo run --release --example hold_api_load -- [NODES] [SLOW_NODE_DELAY_MS]

use std::time::{Duration, Instant};

use kc_sim::node::{Delay, ProxyMode};
use kc_sim::scenario::{SimCluster, SimOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<u64> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let nodes = *args.first().unwrap_or(&3) as usize;
    let slow_ms = *args.get(1).unwrap_or(&3000);
    let opts = SimOptions {
        nodes,
        proxy_mode: ProxyMode::Iptables,
        delay: Delay {
            base: Duration::from_millis(50),
            jitter: Duration::from_millis(50),
        },
        slow: [("node-2".to_string(), Duration::from_millis(slow_ms))].into(),
        grace: Duration::from_secs(30),
        timeout: Duration::from_secs(120),
        metrics_port: 0,
        keep: false,
        traffic_rate: 0,
        faulty_agents: false,
    };
    let sim = SimCluster::start(&opts).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = sim.api.request_counts();
    let addr = sim.metrics_addrs()["node-1"];
    let hold = tokio::spawn(async move {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(b"GET /v1/hold?namespace=demo&pod=web-0&timeout=60s HTTP/1.0\r\nHost: x\r\n\r\n")
            .await?;
        let mut out = String::new();
        s.read_to_string(&mut out).await?;
        anyhow::Ok(out)
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let start = Instant::now();
    sim.cluster().delete("Pod", "demo", "web-0", Some(30))?;
    let reply = hold.await??;
    let held = start.elapsed();
    let after = sim.api.request_counts();
    let status = reply.lines().next().unwrap_or_default().to_string();
    println!("nodes: {nodes}, hold: {status:?} after {held:.1?}");
    let mut total = 0;
    for (kind, n) in &after {
        let (user, verb, _, resource) = kind;
        let d = n - before.get(kind).copied().unwrap_or(0);
        // The agents' own status writes go on with or without holds.
        if user != "agent" || d == 0 || resource == "nodeconvergences/status" {
            continue;
        }
        println!("  {verb:6} {resource:20} {d}");
        total += d;
    }
    println!(
        "requests during the hold: {total} ({:.1} per second of hold)",
        total as f64 / held.as_secs_f64()
    );
    Ok(())
}
