//! `kube-converge-sim`: a whole cluster on one machine. It starts the fake API server, N nodes
//! as network namespaces with kube-proxy emulators, and one real agent per node; deletes one
//! pod and isolates another by relabelling it, as operators do; and prints each node's lag as
//! the agents measured it next to the emulators' ground truth. Everything it creates is removed
//! when it returns, also when it is interrupted.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};

use super::apiserver::FakeApiServer;
use super::node::{Delay, GroundTruth, KubeProxyEmulator, NetnsGuard, ProxyMode};
use kube_converge::agent::{self, AgentConfig};
use kube_converge::k8s::WatchScope;
use kube_converge::model::{ChangeKind, EndpointKey};
use kube_converge::netns::NetNs;
use kube_converge::telemetry::Metrics;
use kube_converge::tracker::LagSample;

#[derive(Clone, Debug)]
pub struct SimOptions {
    pub nodes: usize,
    pub proxy_mode: ProxyMode,
    pub delay: Delay,
    /// Extra delay for named nodes (`node-3` → 1 s).
    pub slow: BTreeMap<String, Duration>,
    pub grace: Duration,
    pub timeout: Duration,
    /// First port of the agents' metrics servers on 127.0.0.1 (0: any free port).
    pub metrics_port: u16,
    /// Keep everything running after the table, until interrupted.
    pub keep: bool,
    /// New connections per second each node's client opens to the demo Service (0: none).
    pub traffic_rate: u32,
    /// Test-only: agents that report removals converged early (see
    /// `AgentConfig::fault_report_removals_early`), to prove the live-traffic check fails them.
    pub faulty_agents: bool,
}

/// Checks root and tools; says exactly what is missing.
pub fn preflight(mode: ProxyMode) -> anyhow::Result<()> {
    let mut missing = Vec::new();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root: the simulation creates network namespaces (run it with sudo)".to_string());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for tool in std::iter::once(&"ip").chain(mode.tools()) {
        if !std::env::split_paths(&path).any(|d| d.join(tool).is_file()) {
            let pkg = match *tool {
                "ip" => "iproute2",
                "nft" => "nftables",
                _ => "iptables",
            };
            missing.push(format!("{tool} (apt-get install {pkg})"));
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        anyhow::bail!(
            "cannot start the simulated cluster; missing:\n  - {}",
            missing.join("\n  - ")
        )
    }
}

fn workload() -> Vec<Value> {
    let svc = |name: &str, ip: &str, port: u16, target: u16| {
        json!({"kind": "Service", "metadata": {"name": name, "namespace": "demo"},
            "spec": {"type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip], "selector": {"app": name},
                "ports": [{"name": "http", "port": port, "targetPort": target, "protocol": "TCP"}]}})
    };
    let pod = |name: &str, app: &str, ip: &str, node: &str| {
        json!({"kind": "Pod", "metadata": {"name": name, "namespace": "demo", "labels": {"app": app}},
            "spec": {"nodeName": node, "terminationGracePeriodSeconds": 30},
            "status": {"phase": "Running", "podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]}})
    };
    vec![
        svc("web", "10.96.0.10", 80, 8080),
        svc("api", "10.96.0.11", 443, 8443),
        pod("web-0", "web", "10.244.1.10", "node-1"),
        pod("web-1", "web", "10.244.2.11", "node-2"),
        pod("web-2", "web", "10.244.3.12", "node-3"),
        pod("api-0", "api", "10.244.1.20", "node-1"),
        pod("api-1", "api", "10.244.2.21", "node-2"),
    ]
}

async fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: sim\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut buf = vec![0u8; 64];
    let n = s.read(&mut buf).await.ok()?;
    String::from_utf8_lossy(&buf[..n])
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Node `i`'s metrics address: `base + i` (0: any free port). A busy port is an error, not a
/// silent other port (dashboards and scrapes point at the asked one).
fn pick_port(base: u16, i: usize) -> anyhow::Result<SocketAddr> {
    let want = if base == 0 {
        0
    } else {
        u16::try_from(usize::from(base) + i)
            .map_err(|_| anyhow::anyhow!("--metrics-port {base} + {i} is past 65535; choose a lower port"))?
    };
    let addr = SocketAddr::from(([127, 0, 0, 1], want));
    let l = std::net::TcpListener::bind(addr).map_err(|e| {
        anyhow::anyhow!(
            "metrics port {want} for node-{} is not free ({e}); choose another --metrics-port, or 0 for any free ports",
            i + 1
        )
    })?;
    Ok(l.local_addr().unwrap_or(addr))
}

/// The number in a node name (`node-10` → 10), for sorting node-2 before node-10.
pub fn node_number(name: &str) -> u64 {
    name.rsplit('-').next().and_then(|n| n.parse().ok()).unwrap_or(u64::MAX)
}

/// What `SimCluster::next_event` yields.
#[derive(Debug)]
pub enum SimEvent {
    Truth(GroundTruth),
    Sample(String, LagSample),
}

/// One row of the result: a change on a node, as measured and as it really happened.
#[derive(Clone, Debug)]
pub struct Row {
    pub node: String,
    pub key: EndpointKey,
    pub kind: ChangeKind,
    pub sample: Option<LagSample>,
    pub truth: Option<GroundTruth>,
    /// New connections the node still sent to the endpoint after its removal: (before the
    /// node converged, after), from its agent's published status.
    pub connections: Option<(u64, u64)>,
}

#[derive(Debug, Default)]
pub struct SimReport {
    pub rows: Vec<Row>,
    pub metrics: BTreeMap<String, SocketAddr>,
}

impl SimReport {
    pub fn all_converged(&self) -> bool {
        !self.rows.is_empty() && self.rows.iter().all(|r| r.sample.is_some() && r.truth.is_some())
    }

    pub fn table(&self) -> String {
        let secs = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.3}s"));
        let mut rows = vec![[
            "NODE".to_string(),
            "ENDPOINT".into(),
            "CHANGE".into(),
            "AGENT LAG".into(),
            "AGENT E2E".into(),
            "KERNEL E2E (TRUTH)".into(),
            "CONNS BEFORE/AFTER".into(),
            "AGENT - TRUTH".into(),
        ]];
        for r in &self.rows {
            let s = r.sample.as_ref();
            let trigger = s.and_then(|s| s.trigger).map(|t| t.time);
            let truth_e2e = match (&r.truth, trigger) {
                (Some(t), Some(tr)) => Some(t.write_started.seconds_since(tr)),
                _ => None,
            };
            let diff = match (s, &r.truth) {
                (Some(s), Some(t)) => Some(s.programmed_at.seconds_since(t.write_started)),
                _ => None,
            };
            let reason = s.map_or("pending", |s| s.reason.as_str());
            rows.push([
                r.node.clone(),
                format!("{} {}", r.key.port_name, r.key.endpoint),
                format!("{} ({reason})", r.kind.as_str()),
                secs(s.map(|s| s.lag)),
                secs(s.and_then(|s| s.end_to_end.map(|e| e.0))),
                secs(truth_e2e),
                r.connections.map_or("-".into(), |(b, a)| format!("{b}/{a}")),
                diff.map_or("-".into(), |d| format!("{d:+.3}s")),
            ]);
        }
        kube_converge::table::render(&rows)
    }
}

struct SimNode {
    name: String,
    /// Held for its drop, which comes before the namespace's: the client stops first.
    _client: Option<TrafficClient>,
    guard: NetnsGuard,
    metrics: SocketAddr,
    stop: Option<watch::Sender<bool>>,
}

/// The demo Service's VIP, where every node's client sends its new connections.
pub const DEMO_VIP: &str = "10.96.0.10:80";

/// A client in a node's namespace that opens new TCP connections to `target` at a steady
/// rate, as the node's workloads would: each SYN goes through the node's kube-proxy rules, and
/// conntrack records where the DNAT sent it. The connections need not succeed (the pods are
/// not real); only their translation matters. Stops when dropped.
pub struct TrafficClient {
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl TrafficClient {
    pub fn start(netns_path: &str, target: &str, per_second: u32) -> anyhow::Result<Self> {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let netns = NetNs::open(std::path::Path::new(netns_path))?;
        let target: SocketAddr = target.parse()?;
        let every = Duration::from_secs(1) / per_second.max(1);
        let flag = stop.clone();
        std::thread::Builder::new().name("sim-traffic".into()).spawn(move || {
            let _ = netns.run(move || {
                while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                    // The SYN leaves (and is tracked) before connect returns; the timeout only
                    // bounds the wait for an answer that never comes.
                    let _ = std::net::TcpStream::connect_timeout(&target, Duration::from_millis(2));
                    std::thread::sleep(every);
                }
            });
        })?;
        Ok(Self { stop })
    }
}

impl Drop for TrafficClient {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A running simulated cluster: API server, nodes with kube-proxy emulators, and agents.
/// Dropping it stops everything and removes the namespaces.
pub struct SimCluster {
    pub api: FakeApiServer,
    nodes: Vec<SimNode>,
    tasks: tokio::task::JoinSet<anyhow::Result<()>>,
    truth_rx: mpsc::UnboundedReceiver<GroundTruth>,
    sample_tx: mpsc::UnboundedSender<(String, LagSample)>,
    sample_rx: mpsc::UnboundedReceiver<(String, LagSample)>,
    timeout: Duration,
    faulty_agents: bool,
}

impl SimCluster {
    /// Starts the API server, the nodes and their emulators, waits for the initial rules, then
    /// starts one agent per node and waits until all are ready.
    pub async fn start(opts: &SimOptions) -> anyhow::Result<Self> {
        preflight(opts.proxy_mode)?;
        let api = FakeApiServer::start().await.context("starting the fake API server")?;
        let cluster = api.cluster().clone();
        let (truth_tx, truth_rx) = mpsc::unbounded_channel::<GroundTruth>();
        let (sample_tx, sample_rx) = mpsc::unbounded_channel();
        let mut sim = Self {
            api,
            nodes: Vec::new(),
            tasks: tokio::task::JoinSet::new(),
            truth_rx,
            sample_tx,
            sample_rx,
            timeout: opts.timeout,
            faulty_agents: opts.faulty_agents,
        };
        for i in 0..opts.nodes {
            let name = format!("node-{}", i + 1);
            let guard = NetnsGuard::create(&NetnsGuard::unique_name(&name))?;
            guard.routes_for_traffic()?;
            cluster.apply(
                json!({"kind": "Node", "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
                "status": {"conditions": [{"type": "Ready", "status": "True"}]}}),
            );
            let extra = opts.slow.get(&name).copied().unwrap_or_default();
            let emulator = KubeProxyEmulator {
                nft_style: crate::emulate::NftStyle::ServiceDnat,
                node: name.clone(),
                mode: opts.proxy_mode,
                netns: NetNs::open(std::path::Path::new(&guard.path()))?,
                delay: Delay {
                    base: opts.delay.base + extra,
                    jitter: opts.delay.jitter,
                },
                cluster: cluster.clone(),
                truth: truth_tx.clone(),
            };
            sim.tasks.spawn(emulator.run());
            let client = (opts.traffic_rate > 0)
                .then(|| TrafficClient::start(&guard.path(), DEMO_VIP, opts.traffic_rate))
                .transpose()?;
            sim.nodes.push(SimNode {
                name,
                _client: client,
                guard,
                metrics: pick_port(opts.metrics_port, i)?,
                stop: None,
            });
        }
        for o in workload() {
            cluster.apply(o);
        }
        // Each node programs the initial state before its agent starts; a slow node takes its
        // delay for that too, whatever --timeout (which bounds the demo's changes) says.
        let mut initial = std::collections::BTreeSet::new();
        let slowest = opts.slow.values().max().copied().unwrap_or_default();
        let deadline = Instant::now() + opts.timeout + slowest + opts.delay.base + opts.delay.jitter;
        while initial.len() < sim.nodes.len() {
            let t = tokio::time::timeout_at(deadline.into(), sim.truth_rx.recv())
                .await
                .context("waiting for the initial rules")?;
            initial.insert(t.context("kube-proxy emulators stopped")?.node);
        }
        for i in 0..sim.nodes.len() {
            sim.start_agent(i).await?;
        }
        for i in 0..sim.nodes.len() {
            sim.wait_ready(i).await?;
        }
        while sim.truth_rx.try_recv().is_ok() {}
        Ok(sim)
    }

    pub fn cluster(&self) -> &super::store::Cluster {
        self.api.cluster()
    }

    pub fn node_names(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.name.clone()).collect()
    }

    /// Each node's network namespace, by node name (for harnesses that watch the kernel too).
    pub fn node_netns(&self) -> anyhow::Result<BTreeMap<String, NetNs>> {
        self.nodes
            .iter()
            .map(|n| Ok((n.name.clone(), NetNs::open(std::path::Path::new(&n.guard.path()))?)))
            .collect()
    }

    pub fn metrics_addrs(&self) -> BTreeMap<String, SocketAddr> {
        self.nodes.iter().map(|n| (n.name.clone(), n.metrics)).collect()
    }

    /// Starts (or restarts) the agent of node `i`; it keeps its metrics address.
    pub async fn start_agent(&mut self, i: usize) -> anyhow::Result<()> {
        let kubeconfig = kube::config::Kubeconfig::from_yaml(&self.api.kubeconfig_for("agent"))?;
        let client =
            kube::Client::try_from(kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?)?;
        let node = &mut self.nodes[i];
        let observer = Arc::new(NodeSamples {
            node: node.name.clone(),
            tx: self.sample_tx.clone(),
        });
        let config = AgentConfig {
            node_name: node.name.clone(),
            scope: WatchScope::default(),
            mode: None,
            backend: None,
            netns: NetNs::open(std::path::Path::new(&node.guard.path()))?,
            poll_interval: Duration::from_millis(100),
            resync_interval: Duration::from_secs(30),
            change_timeout: Duration::from_secs(300),
            listen: node.metrics,
            observer: Some(observer),
            status: Some(kube_converge::agent::StatusConfig {
                status_interval: Duration::from_secs(1),
                heartbeat_interval: Duration::from_secs(30),
                budget_interval: Duration::from_secs(10),
                burst: 10,
            }),
            max_holds: 64,
            traffic_window: Duration::from_secs(60),
            fault_report_removals_early: self.faulty_agents,
        };
        let (stop_tx, mut stop_rx) = watch::channel(false);
        node.stop = Some(stop_tx);
        let shutdown = async move {
            let _ = stop_rx.wait_for(|s| *s).await;
        };
        self.tasks
            .spawn(agent::run_with_client(client, config, Metrics::new()?, shutdown));
        Ok(())
    }

    /// Stops the agent of node `i` (as a crash or a rolling update would).
    pub async fn stop_agent(&mut self, i: usize) {
        if let Some(stop) = self.nodes[i].stop.take() {
            let _ = stop.send(true);
        }
        // Wait until its metrics server is gone, so a restart can bind the same address.
        let addr = self.nodes[i].metrics;
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(addr).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn wait_ready(&self, i: usize) -> anyhow::Result<()> {
        let node = &self.nodes[i];
        let start = Instant::now();
        while http_status(node.metrics, "/readyz").await != Some(200) {
            if start.elapsed() > self.timeout {
                anyhow::bail!(
                    "the agent of {} did not become ready within {:?}",
                    node.name,
                    self.timeout
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// Scrapes one node's /metrics.
    pub async fn scrape(&self, node: &str) -> Option<String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = self.nodes.iter().find(|n| n.name == node)?.metrics;
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: sim\r\n\r\n").await.ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).await.ok()?;
        out.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
    }

    /// Fills each row's connection counts from its node's published NodeConvergence status
    /// (the agents publish about once a second: call it a moment after the changes settled).
    pub fn fill_connections(&self, rows: &mut [Row]) {
        let statuses: BTreeMap<String, Value> = self
            .cluster()
            .list("NodeConvergence")
            .into_iter()
            .filter_map(|n| Some((n["metadata"]["name"].as_str()?.to_string(), n["status"].clone())))
            .collect();
        for r in rows.iter_mut() {
            let endpoint = r.key.endpoint.to_string();
            r.connections = statuses.get(&r.node).and_then(|st| {
                st["traffic"].as_array()?.iter().find_map(|t| {
                    (t["endpoint"] == endpoint.as_str()).then(|| {
                        (
                            t["beforeConverged"].as_u64().unwrap_or(0),
                            t["afterConverged"].as_u64().unwrap_or(0),
                        )
                    })
                })
            });
        }
    }

    /// Collects, per node, the agent's sample and the emulator's truth for changes of `kind`
    /// to endpoints matching `watched`, until every node has `per_node` of both or the timeout.
    pub async fn collect(
        &mut self,
        kind: ChangeKind,
        watched: impl Fn(&EndpointKey) -> bool,
        per_node: usize,
    ) -> anyhow::Result<Vec<Row>> {
        let mut rows: BTreeMap<(String, EndpointKey), Row> = BTreeMap::new();
        let expected = self.nodes.len() * per_node;
        let deadline = Instant::now() + self.timeout;
        let mut last_progress = Instant::now();
        loop {
            let done = rows
                .values()
                .filter(|r| r.sample.is_some() && r.truth.is_some())
                .count();
            if done >= expected {
                break;
            }
            if last_progress.elapsed() > Duration::from_secs(2) {
                eprintln!("sim: waiting for convergence: {done}/{expected} node changes measured");
                last_progress = Instant::now();
            }
            let new_row = |node: &str, key: &EndpointKey| Row {
                node: node.to_string(),
                key: key.clone(),
                kind,
                sample: None,
                truth: None,
                connections: None,
            };
            tokio::select! {
                Some(t) = self.truth_rx.recv() => {
                    if t.kind == kind && watched(&t.key) {
                        let row = rows.entry((t.node.clone(), t.key.clone())).or_insert_with(|| new_row(&t.node, &t.key));
                        row.truth = Some(t);
                    }
                }
                Some((node, s)) = self.sample_rx.recv() => {
                    if s.kind == kind && watched(&s.key) {
                        let row = rows.entry((node.clone(), s.key.clone())).or_insert_with(|| new_row(&node, &s.key));
                        row.sample = Some(s);
                    }
                }
                Some(r) = self.tasks.join_next() => {
                    match r {
                        Ok(Err(e)) => return Err(e.context("a simulation task failed")),
                        Err(e) if e.is_panic() => anyhow::bail!("a simulation task panicked: {e}"),
                        _ => {}
                    }
                }
                _ = tokio::time::sleep_until(deadline.into()) => {
                    eprintln!("sim: timed out after {:?}; unconverged rows show '-'", self.timeout);
                    break;
                }
            }
        }
        // A node that measured nothing yet (a slow node past --timeout) still gets its rows,
        // unconverged ('-'), for every change seen on any node.
        let keys: BTreeSet<EndpointKey> = rows.keys().map(|(_, k)| k.clone()).collect();
        for node in self.nodes.iter().map(|n| n.name.clone()) {
            for key in &keys {
                rows.entry((node.clone(), key.clone())).or_insert_with(|| Row {
                    node: node.clone(),
                    key: key.clone(),
                    kind,
                    sample: None,
                    truth: None,
                    connections: None,
                });
            }
        }
        let mut rows: Vec<Row> = rows.into_values().collect();
        rows.sort_by(|a, b| (node_number(&a.node), &a.key).cmp(&(node_number(&b.node), &b.key)));
        Ok(rows)
    }

    /// The next ground-truth record or agent sample, for benchmarks that follow many changes.
    pub async fn next_event(&mut self, timeout: Duration) -> Option<SimEvent> {
        tokio::select! {
            Some(t) = self.truth_rx.recv() => Some(SimEvent::Truth(t)),
            Some((node, s)) = self.sample_rx.recv() => Some(SimEvent::Sample(node, s)),
            _ = tokio::time::sleep(timeout) => None,
        }
    }

    /// Drains samples received so far (for tests that count them).
    pub fn drain_samples(&mut self) -> Vec<(String, LagSample)> {
        let mut out = Vec::new();
        while let Ok(s) = self.sample_rx.try_recv() {
            out.push(s);
        }
        out
    }
}

impl Drop for SimCluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(stop) = n.stop.take() {
                let _ = stop.send(true);
            }
        }
        self.tasks.abort_all();
    }
}

/// The demo: delete one pod, isolate another, and report what every agent measured next to
/// the ground truth.
pub async fn run(opts: SimOptions) -> anyhow::Result<SimReport> {
    let mut sim = SimCluster::start(&opts).await?;
    eprintln!(
        "sim: fake API server on {}; {} node{} in {} mode",
        sim.api.url(),
        opts.nodes,
        if opts.nodes == 1 { "" } else { "s" },
        opts.proxy_mode.name()
    );
    let metrics = sim.metrics_addrs();
    let mut by_node: Vec<(String, SocketAddr)> = metrics.iter().map(|(n, a)| (n.clone(), *a)).collect();
    by_node.sort_by_key(|(n, _)| node_number(n));
    eprintln!(
        "sim: {} agent{} ready; metrics: {}",
        metrics.len(),
        if metrics.len() == 1 { "" } else { "s" },
        by_node
            .iter()
            .map(|(n, a)| format!("{n} http://{a}/metrics"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    eprintln!("sim: deleting pod demo/web-0 (grace period {:?})", opts.grace);
    sim.cluster()
        .delete("Pod", "demo", "web-0", Some(opts.grace.as_secs().max(1)))?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    eprintln!("sim: isolating pod demo/web-1 (app=web -> app=web-offline)");
    let relabel = json!({"metadata": {"labels": {"app": "web-offline"}}});
    sim.cluster()
        .patch("Pod", "demo", "web-1", false, &relabel, super::store::Part::Main)?;
    let watched = |key: &EndpointKey| ["10.244.1.10", "10.244.2.11"].contains(&key.endpoint.ip().to_string().as_str());
    let mut rows = sim.collect(ChangeKind::Removed, watched, 2).await?;
    // Let every agent publish its last counts (they write about once a second).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    sim.fill_connections(&mut rows);
    let report = SimReport { rows, metrics };
    if opts.keep {
        print!("{}", report.table());
        let kc = std::env::temp_dir().join(format!("kube-converge-sim-{}.kubeconfig", std::process::id()));
        std::fs::write(&kc, sim.api.kubeconfig())?;
        // The agent's CLI, built beside this binary by the same cargo (or `cargo run` it).
        let exe = std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(|d| d.join("kube-converge")))
            .filter(|p| p.is_file())
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "cargo run --release -p kube-converge --".into());
        let first = by_node.first().map(|(_, a)| a.to_string()).unwrap_or_default();
        println!("\nThe simulated cluster stays up. Try, in another shell:");
        println!("  export KUBECONFIG={}", kc.display());
        println!("  {exe} status");
        println!("  {exe} isolate web-2 -n demo");
        println!("  {exe} restore web-2 -n demo");
        println!("  curl 'http://{first}/v1/hold?namespace=demo&pod=web-2&timeout=30s'");
        println!("  kubectl get nodeconvergences");
        eprintln!("sim: keeping the cluster running for dashboards; Ctrl-C (or SIGTERM) to stop");
        kube_converge::telemetry::stop_signal().await;
        let _ = std::fs::remove_file(&kc);
    }
    drop(sim);
    Ok(report)
}

/// The agent observer of one simulated node: its lag measurements, tagged with the node, go to
/// the simulation's table.
#[derive(Debug)]
struct NodeSamples {
    node: String,
    tx: mpsc::UnboundedSender<(String, LagSample)>,
}

impl kube_converge::agent::LagObserver for NodeSamples {
    fn lag_measured(&self, sample: &LagSample) {
        let _ = self.tx.send((self.node.clone(), sample.clone()));
    }
}
