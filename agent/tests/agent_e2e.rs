//! End-to-end tests of the agent process: slice events come from the fake API server, rules
//! change in a throw-away namespace at known times, and the exported histograms must get
//! exactly one sample per change, never shorter than the true lag.

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{require, Netns};
use kc_sim::apiserver::FakeApiServer;
use kc_sim::emulate::{nft_endpoint_chain, render_nat, render_nft, sep_chain, EmulatedServicePort};
use kube_converge::model::{Protocol, ServicePortName, Timestamp};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

fn spawn_agent(kubeconfig: &std::path::Path, listen: SocketAddr, extra: &[&str]) -> Agent {
    let child = Command::new(env!("CARGO_BIN_EXE_kube-converge"))
        .args([
            "agent",
            "--node-name",
            "node-a",
            "--listen",
            &listen.to_string(),
            "--poll-interval",
            "100ms",
        ])
        .args(extra)
        .env("KUBECONFIG", kubeconfig)
        .env("RUST_LOG", "info,kube_converge=debug")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn the agent");
    Agent(child)
}

async fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.ok()?;
    let code = buf.split_whitespace().nth(1)?.parse().ok()?;
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((code, body))
}

/// Sum of the samples of `name` whose labels contain every `labels` fragment.
fn metric(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| labels.iter().all(|f| l.contains(f)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn wait_for(addr: SocketAddr, what: &str, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
    let start = Instant::now();
    loop {
        if let Some((200, body)) = http_get(addr, "/metrics").await {
            if pred(&body) {
                return body;
            }
            if start.elapsed() > timeout {
                panic!("timed out waiting for {what}; metrics:\n{body}");
            }
        } else if start.elapsed() > timeout {
            panic!("timed out waiting for {what}: agent not answering");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn service() -> Value {
    json!({"kind": "Service", "metadata": {"name": "svc1", "namespace": "ns1"},
        "spec": {"clusterIP": "172.30.0.41", "clusterIPs": ["172.30.0.41"], "ports": [{"name": "p80", "port": 80, "protocol": "TCP"}]}})
}

fn slice(endpoints: &[(&str, bool)]) -> Value {
    let eps: Vec<Value> = endpoints
        .iter()
        .map(|(ip, terminating)| {
            json!({"addresses": [ip], "nodeName": "node-b",
            "conditions": {"ready": !terminating, "serving": true, "terminating": terminating}})
        })
        .collect();
    json!({"kind": "EndpointSlice", "addressType": "IPv4",
        "metadata": {"name": "svc1-abc", "namespace": "ns1", "labels": {"kubernetes.io/service-name": "svc1"},
            "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": Timestamp::now().to_rfc3339()}},
        "ports": [{"name": "p80", "port": 80, "protocol": "TCP"}], "endpoints": eps})
}

/// The kube-proxy dataplane a node runs in a test.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Plane {
    IptablesNft,
    IptablesLegacy,
    Nftables,
}

impl Plane {
    fn tools(self) -> Vec<&'static str> {
        match self {
            Plane::IptablesNft => vec!["ip", "iptables-nft-restore", "iptables-nft-save"],
            Plane::IptablesLegacy => vec!["ip", "iptables-legacy-restore", "iptables-legacy-save"],
            Plane::Nftables => vec!["ip", "nft"],
        }
    }

    fn agent_args(self) -> &'static [&'static str] {
        match self {
            Plane::IptablesNft => &["--mode", "iptables", "--iptables-backend", "nft"],
            Plane::IptablesLegacy => &["--mode", "iptables", "--iptables-backend", "legacy"],
            Plane::Nftables => &["--mode", "nftables"],
        }
    }

    /// `mode` and `backend` labels of the info metric, and the read trigger of kernel changes.
    fn labels(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Plane::IptablesNft => ("iptables", "nft", "event"),
            Plane::IptablesLegacy => ("iptables", "legacy", "poll"),
            Plane::Nftables => ("nftables", "nftables", "event"),
        }
    }

    /// Programs svc1 with `eps` the way kube-proxy does; `removed` endpoints' chains are
    /// flushed and deleted.
    fn program(self, ns: &Netns, eps: &[&str], removed: &[&str]) {
        let spn = ServicePortName::new("ns1", "svc1", "p80");
        let addr = |e: &&str| -> std::net::SocketAddr { format!("{e}:80").parse().unwrap() };
        let port = EmulatedServicePort {
            name: spn.clone(),
            protocol: Protocol::Tcp,
            cluster_ip: "172.30.0.41".parse().unwrap(),
            port: 80,
            node_port: None,
            endpoints: eps.iter().map(addr).collect(),
        };
        match self {
            Plane::IptablesNft | Plane::IptablesLegacy => {
                let gone: Vec<String> = removed
                    .iter()
                    .map(|e| sep_chain(&spn, Protocol::Tcp, addr(e)))
                    .collect();
                let restore = if self == Plane::IptablesNft {
                    "iptables-nft-restore"
                } else {
                    "iptables-legacy-restore"
                };
                ns.run_stdin(restore, &["--noflush"], &render_nat(&[port], true, &gone));
            }
            Plane::Nftables => {
                let gone: Vec<String> = removed.iter().map(|e| nft_endpoint_chain(&port, addr(e))).collect();
                ns.run_stdin(
                    "nft",
                    &["-f", "-"],
                    &render_nft("ip", std::slice::from_ref(&port), &gone, &[]),
                );
                ns.run_stdin(
                    "nft",
                    &["-f", "-"],
                    &render_nft("ip", std::slice::from_ref(&port), &[], &gone),
                );
            }
        }
    }
}

/// One node: a fake API server holding svc1 with two ready endpoints, a namespace whose
/// rules route both, and a ready agent reading that namespace.
async fn start_node(
    plane: Plane,
    tag: &str,
    extra: &[&str],
) -> (FakeApiServer, Netns, SocketAddr, Agent, tempfile::TempDir) {
    let api = FakeApiServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
    let ns = Netns::new(tag);
    plane.program(&ns, &["10.180.0.1", "10.180.0.2"], &[]);
    api.apply(service());
    api.apply(slice(&[("10.180.0.1", false), ("10.180.0.2", false)]));
    let listen = free_port();
    let path = ns.path();
    let mut args = vec!["--netns", path.as_str()];
    args.extend_from_slice(extra);
    let agent = spawn_agent(&kubeconfig, listen, &args);
    let start = Instant::now();
    while http_get(listen, "/readyz").await.map(|r| r.0) != Some(200) {
        assert!(start.elapsed() < Duration::from_secs(30), "agent never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (api, ns, listen, agent, dir)
}

async fn scenario(plane: Plane) {
    if !require(&plane.tools()) {
        return;
    }
    let (api, ns, listen, _agent, _dir) = start_node(plane, "e2e", plane.agent_args()).await;
    let hold = Duration::from_millis(400);
    let pending = |b: &str| metric(b, "kube_converge_pending_changes", &["state=\"pending\""]) == 1.0;

    // Removal: the pod is deleted (terminating); kube-proxy drops it `hold` after the agent saw it.
    api.apply(slice(&[("10.180.0.1", false), ("10.180.0.2", true)]));
    wait_for(listen, "the removal to be pending", Duration::from_secs(10), pending).await;
    tokio::time::sleep(hold).await;
    plane.program(&ns, &["10.180.0.1"], &["10.180.0.2"]);
    let removed = ["change=\"removed\"", "reason=\"deleted\""];
    // Both histograms: a scrape may fall between the two observations of one sample.
    let body = wait_for(listen, "the removal sample", Duration::from_secs(10), |b| {
        metric(b, "kube_converge_lag_seconds_count", &removed) >= 1.0
            && metric(b, "kube_converge_end_to_end_lag_seconds_count", &removed) >= 1.0
    })
    .await;
    let lag = metric(&body, "kube_converge_lag_seconds_sum", &removed);
    assert!(
        lag >= hold.as_secs_f64(),
        "measured lag {lag}s is shorter than the true lag (>= {hold:?})"
    );
    assert!(
        lag < hold.as_secs_f64() + 5.0,
        "measured lag {lag}s is implausibly long"
    );
    let e2e = metric(&body, "kube_converge_end_to_end_lag_seconds_sum", &removed);
    assert!(
        e2e >= lag,
        "end-to-end lag {e2e} must include the watch delay on top of {lag}"
    );

    // Addition: a new pod becomes ready.
    api.apply(slice(&[("10.180.0.1", false), ("10.180.0.3", false)]));
    wait_for(listen, "the addition to be pending", Duration::from_secs(10), pending).await;
    tokio::time::sleep(hold).await;
    plane.program(&ns, &["10.180.0.1", "10.180.0.3"], &[]);
    let added = ["change=\"added\"", "reason=\"added\""];
    let body = wait_for(listen, "the addition sample", Duration::from_secs(10), |b| {
        metric(b, "kube_converge_lag_seconds_count", &added) >= 1.0
    })
    .await;
    assert!(metric(&body, "kube_converge_lag_seconds_sum", &added) >= hold.as_secs_f64());

    // Malformed input is counted and survived.
    let mut bad = slice(&[("10.180.0.1", false), ("10.180.0.3", false)]);
    bad["metadata"]["name"] = json!("svc1-bad");
    bad["endpoints"] = json!([{"addresses": ["10.0.0.300"]}, {"addresses": []}]);
    api.apply(bad);
    wait_for(
        listen,
        "the malformed slice to be counted",
        Duration::from_secs(10),
        |b| {
            metric(b, "kube_converge_malformed_objects_total", &["reason=\"invalid_ip\""]) >= 1.0
                && metric(b, "kube_converge_malformed_objects_total", &["reason=\"no_address\""]) >= 1.0
        },
    )
    .await;

    // Exactly one sample per change, even after more reads.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, body) = http_get(listen, "/metrics").await.unwrap();
    assert_eq!(
        metric(&body, "kube_converge_lag_seconds_count", &[]),
        2.0,
        "one sample per change:\n{body}"
    );
    assert_eq!(metric(&body, "kube_converge_pending_changes", &[]), 0.0);
    let (mode, backend, trigger) = plane.labels();
    let info = [format!("mode=\"{mode}\""), format!("backend=\"{backend}\"")];
    assert_eq!(
        metric(&body, "kube_converge_info", &[&info[0], &info[1]]),
        1.0,
        "{body}"
    );
    let trig = format!("trigger=\"{trigger}\"");
    assert!(metric(&body, "kube_converge_dataplane_reads_total", &[&trig]) >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: network namespaces and kernel rules (scripts/test.sh runs it as root)"]
async fn agent_measures_removal_and_addition_with_iptables_nft() {
    scenario(Plane::IptablesNft).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: network namespaces and kernel rules (scripts/test.sh runs it as root)"]
async fn agent_measures_removal_and_addition_with_iptables_legacy() {
    scenario(Plane::IptablesLegacy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: network namespaces and kernel rules (scripts/test.sh runs it as root)"]
async fn agent_measures_removal_and_addition_with_nftables() {
    scenario(Plane::Nftables).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: network namespaces and kernel rules (scripts/test.sh runs it as root)"]
async fn agent_notices_kube_proxy_switching_modes() {
    let tools: Vec<&str> = Plane::IptablesNft
        .tools()
        .into_iter()
        .chain(Plane::Nftables.tools())
        .collect();
    if !require(&tools) {
        return;
    }
    let (_api, ns, listen, _agent, _dir) =
        start_node(Plane::IptablesNft, "switch", &["--resync-interval", "300ms"]).await;
    wait_for(listen, "iptables mode", Duration::from_secs(10), |b| {
        metric(b, "kube_converge_info", &["mode=\"iptables\"", "backend=\"nft\""]) == 1.0
    })
    .await;
    // kube-proxy restarts in nftables mode: it programs its table and cleans up iptables.
    Plane::Nftables.program(&ns, &["10.180.0.1", "10.180.0.2"], &[]);
    ns.run("iptables-nft", &["-t", "nat", "-F"]);
    ns.run("iptables-nft", &["-t", "nat", "-X"]);
    wait_for(listen, "the switch to nftables", Duration::from_secs(10), |b| {
        metric(b, "kube_converge_info", &["mode=\"nftables\""]) == 1.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_api_server_keeps_the_agent_alive_and_unready() {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    let closed = free_port(); // bound then released: nothing listens there
    std::fs::write(
        &kubeconfig,
        format!("apiVersion: v1\nkind: Config\nclusters:\n- name: x\n  cluster:\n    server: http://{closed}\nusers:\n- name: x\n  user: {{}}\ncontexts:\n- name: x\n  context:\n    cluster: x\n    user: x\ncurrent-context: x\n"),
    )
    .unwrap();
    let listen = free_port();
    let mut agent = spawn_agent(
        &kubeconfig,
        listen,
        &[
            "--mode",
            "iptables",
            "--iptables-backend",
            "nft",
            "--netns",
            "/proc/self/ns/net",
        ],
    );
    let body = wait_for(listen, "watch errors", Duration::from_secs(20), |b| {
        metric(b, "kube_converge_watch_errors_total", &["resource=\"endpointslices\""]) >= 2.0
    })
    .await;
    assert!(metric(&body, "kube_converge_watch_errors_total", &["resource=\"services\""]) >= 1.0);
    assert_eq!(http_get(listen, "/healthz").await.map(|r| r.0), Some(200));
    let (code, text) = http_get(listen, "/readyz").await.unwrap();
    assert_eq!(code, 503);
    assert!(text.contains("EndpointSlices not listed yet"), "{text}");
    assert!(agent.0.try_wait().unwrap().is_none(), "the agent must keep running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: network namespaces and kernel rules (scripts/test.sh runs it as root)"]
async fn watch_disconnect_and_410_gone_relist_loses_and_duplicates_nothing() {
    if !require(&Plane::IptablesNft.tools()) {
        return;
    }
    let (api, ns, listen, _agent, _dir) =
        start_node(Plane::IptablesNft, "relist", Plane::IptablesNft.agent_args()).await;
    // History is compacted and every watch is cut: the agent must relist (410 Gone) and diff.
    api.apply(slice(&[("10.180.0.1", false)]));
    // Another resource moves the global resourceVersion on; compaction then puts the slice
    // watch's last version out of reach, so resuming it gets 410 Gone.
    api.apply(json!({"kind": "Node", "metadata": {"name": "node-z"}}));
    api.compact();
    api.close_watches();
    let body = wait_for(listen, "a relist", Duration::from_secs(20), |b| {
        metric(
            b,
            "kube_converge_watch_restarts_total",
            &["resource=\"endpointslices\""],
        ) >= 1.0
            && metric(b, "kube_converge_pending_changes", &["state=\"pending\""]) == 1.0
    })
    .await;
    assert_eq!(
        metric(&body, "kube_converge_pending_changes", &[]),
        1.0,
        "exactly one change after the relist"
    );
    Plane::IptablesNft.program(&ns, &["10.180.0.1"], &["10.180.0.2"]);
    wait_for(listen, "the sample", Duration::from_secs(10), |b| {
        metric(b, "kube_converge_lag_seconds_count", &[]) >= 1.0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, body) = http_get(listen, "/metrics").await.unwrap();
    assert_eq!(
        metric(&body, "kube_converge_lag_seconds_count", &["reason=\"isolated\""]),
        1.0,
        "{body}"
    );
    assert_eq!(metric(&body, "kube_converge_lag_seconds_count", &[]), 1.0);
}

/// The host pid of `parent`'s only child (the agent that `unshare --fork` runs as PID 1).
fn child_of(parent: u32) -> Option<u32> {
    let children = std::fs::read_to_string(format!("/proc/{parent}/task/{parent}/children")).ok()?;
    children.split_whitespace().next()?.parse().ok()
}

/// Issue 17: as PID 1 (in its container) the agent got no SIGTERM at all, so every rollout
/// waited for SIGKILL. It now stops on SIGTERM: new holds get 503, an in-flight hold is answered
/// (not converged), and it exits 0 within the drain bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: network namespaces and kernel rules (scripts/test.sh runs it as root)"]
async fn sigterm_stops_the_agent_as_pid_1_and_answers_in_flight_holds() {
    if !require(&["unshare"]) {
        return;
    }
    let api = FakeApiServer::start().await.unwrap();
    // A pod whose hold cannot converge (no node has an agent).
    api.apply(json!({"kind": "Pod", "apiVersion": "v1",
        "metadata": {"name": "web-0", "namespace": "demo"},
        "status": {"podIP": "10.244.1.10", "podIPs": [{"ip": "10.244.1.10"}]}}));
    api.apply(
        json!({"kind": "Node", "apiVersion": "v1", "metadata": {"name": "node-a"},
        "status": {"conditions": [{"type": "Ready", "status": "True"}]}}),
    );
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
    let listen = free_port();
    let mut unshare = Agent(
        Command::new("unshare")
            .args(["--pid", "--fork", "--kill-child"])
            .arg(env!("CARGO_BIN_EXE_kube-converge"))
            .args(["agent", "--node-name", "node-a", "--listen", &listen.to_string()])
            .args([
                "--publish-status",
                "false",
                "--mode",
                "iptables",
                "--netns",
                "/proc/self/ns/net",
            ])
            .env("KUBECONFIG", &kubeconfig)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn unshare"),
    );
    wait_for(listen, "/healthz", Duration::from_secs(20), |_| true).await;
    let agent = child_of(unshare.0.id()).expect("the agent under unshare");
    let hold = tokio::spawn(async move { http_get(listen, "/v1/hold?namespace=demo&pod=web-0&timeout=60s").await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!hold.is_finished(), "the hold should be waiting");
    let sent = Instant::now();
    assert!(Command::new("kill")
        .args(["-TERM", &agent.to_string()])
        .status()
        .unwrap()
        .success());
    let (code, body) = tokio::time::timeout(Duration::from_secs(10), hold)
        .await
        .expect("the in-flight hold was not answered")
        .unwrap()
        .expect("the in-flight hold got no reply");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("shutting down"), "{body}");
    let status = loop {
        if let Some(s) = unshare.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            sent.elapsed() < Duration::from_secs(10),
            "the agent (PID 1) ignored SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status:?}");
}
