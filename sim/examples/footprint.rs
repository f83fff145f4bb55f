//! Benchmark: the agent's RSS and CPU with a large cache and dataplane, idle and under churn.
//!
//! sudo cargo run --release --example footprint -- SERVICES ENDPOINTS_PER_SERVICE IDLE_S CHURN_S RATE [MODE]
//! The API (in-process fake) holds SERVICES Services with ENDPOINTS each; the node's dataplane
//! (MODE: nftables, the default, or iptables-nft) programs exactly those. The agent runs as its
//! own process (the release binary; `AGENT_BIN=path` runs another build instead).

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kc_sim::apiserver::FakeApiServer;
use kc_sim::emulate::{load_ruleset, render_nat, render_nft, EmulatedServicePort};
use kc_sim::node::NetnsGuard;
use kube_converge::model::{Protocol, ServicePortName};
use kube_converge::netns::NetNs;
use serde_json::json;

fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks: f64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    ticks / 100.0
}

fn rss_mib(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb = |k: &str| {
        status
            .lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (kb("VmRSS:") / 1024.0, kb("VmHWM:") / 1024.0)
}

fn ip(base: u32, i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(base + i))
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let mode = std::env::args().nth(6).unwrap_or_else(|| "nftables".into());
    let a: Vec<u64> = std::env::args()
        .skip(1)
        .take(5)
        .filter_map(|v| v.parse().ok())
        .collect();
    let (n, e) = (*a.first().unwrap_or(&10_000) as u32, *a.get(1).unwrap_or(&10) as u32);
    let (idle, churn, rate) = (
        *a.get(2).unwrap_or(&60),
        *a.get(3).unwrap_or(&60),
        *a.get(4).unwrap_or(&100),
    );
    let api = FakeApiServer::start().await?;
    let mut ports = Vec::new();
    for i in 0..n {
        let (ns, name) = (format!("ns{}", i % 50), format!("svc{i}"));
        let vip = ip(0x0a60_0000, i);
        api.apply(json!({"kind": "Service", "metadata": {"name": name, "namespace": ns},
            "spec": {"clusterIP": vip.to_string(), "clusterIPs": [vip.to_string()],
                "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}}));
        let eps: Vec<serde_json::Value> = (0..e)
            .map(|j| {
                json!({"addresses": [ip(0x0b00_0000, i * 16 + j).to_string()], "nodeName": format!("node-{}", j % 7),
                "conditions": {"ready": true}})
            })
            .collect();
        api.apply(json!({"kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": format!("{name}-0"), "namespace": ns, "labels": {"kubernetes.io/service-name": name}},
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}], "endpoints": eps}));
        ports.push(EmulatedServicePort {
            name: ServicePortName::new(&ns, &name, "http"),
            protocol: Protocol::Tcp,
            cluster_ip: vip,
            port: 80,
            node_port: None,
            endpoints: (0..e)
                .map(|j| SocketAddr::new(ip(0x0b00_0000, i * 16 + j), 8080))
                .collect(),
        });
    }
    let guard = NetnsGuard::create(&NetnsGuard::unique_name("footprint"))?;
    let netns = NetNs::open(std::path::Path::new(&guard.path()))?;
    let t = Instant::now();
    let (program, args, rules) = match mode.as_str() {
        "nftables" => ("nft", vec!["-f", "-"], render_nft("ip", &ports, &[], &[])),
        "iptables-nft" => ("iptables-nft-restore", vec![], render_nat(&ports, false, &[])),
        other => anyhow::bail!("unknown mode {other} (nftables or iptables-nft)"),
    };
    load_ruleset(&netns, program, &args, rules)?;
    eprintln!(
        "{n} services x {e} endpoints in the API and the {mode} dataplane (load {:.0?})",
        t.elapsed()
    );
    let dir = tempfile::tempdir()?;
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig())?;
    let listen = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    // AGENT_BIN compares another build (say, main's) on the same machine and ruleset.
    let bin = std::env::var("AGENT_BIN")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../target/release/kube-converge").into());
    eprintln!("agent binary: {bin}");
    let mut agent = Command::new(&bin)
        .args([
            "agent",
            "--node-name",
            "node-1",
            "--netns",
            &guard.path(),
            "--listen",
            &listen.to_string(),
        ])
        .env("KUBECONFIG", &kubeconfig)
        .env("RUST_LOG", "warn")
        .stderr(Stdio::null())
        .spawn()?;
    let pid = agent.id();
    let start = Instant::now();
    loop {
        let ok = std::net::TcpStream::connect(listen).ok().and_then(|mut s| {
            use std::io::Read;
            s.write_all(b"GET /readyz HTTP/1.0\r\n\r\n").ok()?;
            let mut b = String::new();
            s.read_to_string(&mut b).ok()?;
            Some(b.contains(" 200 "))
        });
        if ok == Some(true) {
            break;
        }
        anyhow::ensure!(start.elapsed() < Duration::from_secs(600), "agent never ready");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("agent ready after {:.1?}; settling 20 s", start.elapsed());
    tokio::time::sleep(Duration::from_secs(20)).await;
    let (settled, settled_peak) = rss_mib(pid);
    eprintln!("settled: RSS {settled:.1} MiB, peak so far {settled_peak:.1} MiB");
    let c0 = cpu_seconds(pid);
    tokio::time::sleep(Duration::from_secs(idle)).await;
    let idle_cpu = (cpu_seconds(pid) - c0) / idle as f64 * 100.0;
    let (idle_rss, _) = rss_mib(pid);
    // Churn: `rate` changes per second, API side: an endpoint turns unready, then ready again.
    let c1 = cpu_seconds(pid);
    let t = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate.max(1)));
    let mut k = 0u32;
    while t.elapsed() < Duration::from_secs(churn) {
        tick.tick().await;
        let i = (k / 2) % n;
        let ready = k % 2 == 1;
        let (ns, name) = (format!("ns{}", i % 50), format!("svc{i}"));
        let eps: Vec<serde_json::Value> = (0..e)
            .map(|j| {
                json!({"addresses": [ip(0x0b00_0000, i * 16 + j).to_string()], "nodeName": format!("node-{}", j % 7),
                "conditions": {"ready": j != 0 || ready}})
            })
            .collect();
        api.apply(json!({"kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": format!("{name}-0"), "namespace": ns, "labels": {"kubernetes.io/service-name": name}},
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}], "endpoints": eps}));
        k += 1;
    }
    let churn_cpu = (cpu_seconds(pid) - c1) / t.elapsed().as_secs_f64() * 100.0;
    let (churn_rss, peak) = rss_mib(pid);
    println!(
        "{mode}: services={n} endpoints={} cache+dataplane; idle {idle}s: CPU {idle_cpu:.2}% of one core, RSS {idle_rss:.1} MiB; \
         churn {rate}/s for {churn}s: CPU {churn_cpu:.1}%, RSS {churn_rss:.1} MiB; peak RSS {peak:.1} MiB",
        n * e
    );
    let _ = agent.kill();
    let _ = agent.wait();
    Ok(())
}
