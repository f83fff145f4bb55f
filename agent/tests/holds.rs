//! Holds and `isolate` on the simulated cluster: a hold is released only after every node's
//! kernel stopped routing to the pod (checked against the emulators' ground truth).

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use kc_sim::node::ProxyMode;
use kc_sim::scenario::{SimCluster, SimEvent, SimOptions};
use kube_converge::hold::HoldOptions;
use kube_converge::model::{ChangeKind, EndpointKey, Timestamp};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn options(slow: &[(&str, u64)]) -> Option<SimOptions> {
    common::sim_options(ProxyMode::Iptables, 3, slow)
}

/// A kube client for the simulated cluster's fake API server.
async fn client_of(sim: &SimCluster) -> kube::Client {
    let kc = kube::config::Kubeconfig::from_yaml(&sim.api.kubeconfig()).unwrap();
    kube::Client::try_from(
        kube::Config::from_custom_kubeconfig(kc, &Default::default())
            .await
            .unwrap(),
    )
    .unwrap()
}

async fn get(addr: SocketAddr, path: &str) -> (u16, Value) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.unwrap();
    let code = buf.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = buf.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or_default();
    (code, serde_json::from_str(body).unwrap_or(Value::Null))
}

fn node1(sim: &SimCluster) -> SocketAddr {
    sim.metrics_addrs()["node-1"]
}

fn is_ip(ip: &'static str) -> impl Fn(&EndpointKey) -> bool {
    move |k| k.endpoint.ip().to_string() == ip
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: network namespaces and kernel rules (scripts/test.sh runs it as root)"]
async fn a_hold_is_released_only_after_the_slowest_nodes_kernel_dropped_the_pod() {
    let Some(opts) = options(&[("node-3", 1500)]) else {
        return;
    };
    let mut sim = SimCluster::start(&opts).await.unwrap();
    let addr = node1(&sim);
    // Two holds at once: the pod being deleted, and (by IP) the same pod.
    let a = tokio::spawn(async move {
        let r = get(addr, "/v1/hold?namespace=demo&pod=web-0&timeout=25s").await;
        (r, Timestamp::now())
    });
    let b = tokio::spawn(async move {
        let r = get(addr, "/v1/hold?ip=10.244.1.10&namespace=demo&timeout=25s").await;
        (r, Timestamp::now())
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    sim.cluster().delete("Pod", "demo", "web-0", Some(20)).unwrap();
    let rows = sim.collect(ChangeKind::Removed, is_ip("10.244.1.10"), 1).await.unwrap();
    assert_eq!(rows.len(), 3, "every node's removal: {rows:?}");
    // Both holds, by name and by IP, answer the same: converged on all three nodes, and never
    // before the slowest kernel dropped the pod.
    for (which, hold) in [("by name", a), ("by IP", b)] {
        let ((code, body), released) = hold.await.unwrap();
        assert_eq!(code, 200, "{which}: {body}");
        assert_eq!(body["converged"], true, "{which}: {body}");
        assert_eq!(body["ip"], "10.244.1.10", "{which}: {body}");
        let nodes = body["nodes"].as_array().unwrap();
        assert_eq!(nodes.len(), 3, "{which}: {body}");
        assert!(nodes.iter().all(|n| n["state"] == "converged"), "{which}: {body}");
        for r in &rows {
            let t = r.truth.as_ref().unwrap_or_else(|| panic!("no truth for {}", r.node));
            assert!(
                released >= t.write_finished,
                "hold {which} released before {}'s kernel dropped the pod (released {released:?}, kernel {:?})",
                r.node,
                t.write_finished
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: network namespaces and kernel rules (scripts/test.sh runs it as root)"]
async fn bad_and_unknown_hold_requests() {
    let Some(opts) = options(&[]) else { return };
    let sim = SimCluster::start(&opts).await.unwrap();
    let addr = node1(&sim);
    for path in [
        "/v1/hold",
        "/v1/hold?pod=web-0",
        "/v1/hold?ip=not-an-ip",
        "/v1/hold?namespace=demo&pod=web-0&timeout=soon",
        "/v1/hold?bogus=1",
        // Issue 17: bounded and validated parameters.
        "/v1/hold?namespace=demo&pod=web-0&timeout=99999999999999999999s",
        "/v1/hold?namespace=demo&pod=web-0&annotate=maybe",
        "/v1/hold?namespace=demo&pod=web-0&pod=web-1",
        "/v1/hold?namespace=demo&pod=Web_0",
        "/v1/hold?namespace=Demo!&pod=web-0",
        "/v1/hold?namespace=demo&pod=web-0&skipNotReady=yes",
    ] {
        assert_eq!(get(addr, path).await.0, 400, "{path}");
    }
    // Issue 15 item 10: an IP of another pod contradicts pod=; an IP no pod has is not found.
    let (code, body) = get(addr, "/v1/hold?namespace=demo&pod=web-0&ip=10.244.2.11&timeout=2s").await;
    assert_eq!(code, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("not an IP of pod demo/web-0"),
        "{body}"
    );
    let (code, body) = get(addr, "/v1/hold?namespace=demo&ip=10.244.9.99&timeout=2s").await;
    assert_eq!(code, 404, "{body}");
    let (code, body) = get(addr, "/v1/hold?namespace=demo&pod=nope&timeout=2s").await;
    assert_eq!(code, 404, "{body}");
    assert!(body["error"].as_str().unwrap().contains("demo/nope"));
    // A pod that is not being removed times out with 504, naming the nodes.
    let (code, body) = get(addr, "/v1/hold?namespace=demo&pod=web-2&timeout=1s").await;
    assert_eq!(code, 504, "{body}");
    assert!(body["error"].as_str().unwrap().contains("node-1"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: network namespaces and kernel rules (scripts/test.sh runs it as root)"]
async fn a_node_without_an_agent_blocks_until_skipped() {
    let Some(opts) = options(&[]) else { return };
    let sim = SimCluster::start(&opts).await.unwrap();
    sim.cluster()
        .apply(json!({"kind": "Node", "metadata": {"name": "node-9"},
        "status": {"conditions": [{"type": "Ready", "status": "True"}]}}));
    let addr = node1(&sim);
    sim.cluster().delete("Pod", "demo", "web-0", Some(20)).unwrap();
    let (code, body) = get(addr, "/v1/hold?namespace=demo&pod=web-0&timeout=4s").await;
    assert_eq!(code, 504, "{body}");
    assert!(body["error"].as_str().unwrap().contains("node-9 (no-agent)"), "{body}");
    let (code, body) = get(addr, "/v1/hold?namespace=demo&pod=web-0&timeout=10s&skipStaleAfter=1s").await;
    assert_eq!(code, 200, "{body}");
    let skipped: Vec<&Value> = body["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["state"] == "skipped")
        .collect();
    assert_eq!(skipped.len(), 1);
    assert_eq!(skipped[0]["node"], "node-9");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: network namespaces and kernel rules (scripts/test.sh runs it as root)"]
async fn a_hold_survives_an_agent_restart() {
    let Some(opts) = options(&[("node-2", 2500)]) else {
        return;
    };
    let mut sim = SimCluster::start(&opts).await.unwrap();
    let addr = node1(&sim);
    let hold = tokio::spawn(async move {
        let r = get(addr, "/v1/hold?namespace=demo&pod=web-0&timeout=25s").await;
        (r, Timestamp::now())
    });
    sim.cluster().delete("Pod", "demo", "web-0", Some(20)).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    sim.stop_agent(1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    sim.start_agent(1).await.unwrap();
    let ((code, body), released) = hold.await.unwrap();
    assert_eq!(code, 200, "{body}");
    // node-2 (slow by 2.5 s, its agent restarted meanwhile) is the last kernel to drop the pod:
    // the hold must not have been released before it did.
    let mut truth = None;
    while truth.is_none() {
        match sim.next_event(Duration::from_secs(5)).await {
            Some(SimEvent::Truth(t))
                if t.node == "node-2" && t.kind == ChangeKind::Removed && is_ip("10.244.1.10")(&t.key) =>
            {
                truth = Some(t)
            }
            Some(_) => {}
            None => panic!("node-2's emulator never reported removing web-0"),
        }
    }
    let t = truth.unwrap();
    assert!(
        released >= t.write_finished,
        "hold released before node-2's kernel dropped the pod (released {released:?}, kernel {:?})",
        t.write_finished
    );
    assert!(
        body["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["state"] == "converged"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: network namespaces and kernel rules (scripts/test.sh runs it as root)"]
async fn isolate_and_restore_from_the_cli_and_the_timeout_path() {
    let Some(opts) = options(&[("node-3", 1000)]) else {
        return;
    };
    let sim = SimCluster::start(&opts).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, sim.api.kubeconfig()).unwrap();
    let run = move |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_kube-converge"))
            .args(args)
            .env("KUBECONFIG", &kubeconfig)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let started = Instant::now();
    let (code, out, err) = tokio::task::spawn_blocking({
        let run = run.clone();
        move || run(&["isolate", "web-1", "-n", "demo", "--timeout", "20s"])
    })
    .await
    .unwrap();
    assert_eq!(code, Some(0), "stdout:\n{out}\nstderr:\n{err}");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "node-3 needs 1 s: the command cannot finish before"
    );
    for node in ["node-1", "node-2", "node-3"] {
        let line = out
            .lines()
            .find(|l| l.starts_with(node))
            .unwrap_or_else(|| panic!("{node} missing:\n{out}"));
        // NODE STATE MODE LAG E2E HEARTBEAT
        let cells: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(cells.get(1), Some(&"converged"), "{line}");
        let secs = |cell: Option<&&str>| -> f64 {
            cell.and_then(|c| c.strip_suffix('s'))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("a lag in seconds: {line}"))
        };
        let (lag, e2e) = (secs(cells.get(3)), secs(cells.get(4)));
        assert!((0.0..20.0).contains(&lag) && lag <= e2e, "{line}");
        if node == "node-3" {
            assert!(e2e >= 1.0, "node-3 is slow by 1 s: {line}");
        }
    }
    let pod = sim.cluster().get("Pod", "demo", "web-1").unwrap();
    assert_eq!(pod["metadata"]["labels"]["app"], "web-offline");
    assert!(pod["metadata"]["annotations"]["converge.kube-converge.io/converged"].is_string());
    let (code, out, err) = tokio::task::spawn_blocking({
        let run = run.clone();
        move || run(&["restore", "web-1", "-n", "demo", "--timeout", "20s"])
    })
    .await
    .unwrap();
    assert_eq!(code, Some(0), "stdout:\n{out}\nstderr:\n{err}");
    assert_eq!(
        sim.cluster().get("Pod", "demo", "web-1").unwrap()["metadata"]["labels"]["app"],
        "web"
    );
    // Issue 17: `status` of a pod not converged everywhere exits non-zero (web-1 is routed
    // again: a removal has not converged).
    let (code, out, err) = tokio::task::spawn_blocking({
        let run = run.clone();
        move || run(&["status", "web-1", "-n", "demo"])
    })
    .await
    .unwrap();
    assert_eq!(code, Some(1), "stdout:\n{out}\nstderr:\n{err}");
    assert!(err.contains("not converged everywhere"), "{err}");
    // Issue 17: --kubeconfig and --context, as kubectl's.
    let file = dir.path().join("kubeconfig");
    let with_flags = |context: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_kube-converge"))
            .args(["status", "--kubeconfig"])
            .arg(&file)
            .args(["--context", context])
            .env_remove("KUBECONFIG")
            .env("HOME", "/nonexistent")
            .output()
            .unwrap()
    };
    let out = with_flags("sim");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("node-1"));
    let out = with_flags("nope");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("nope"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The timeout path: node-3 needs 1 s, the command allows 300 ms.
    let (code, _out, err) =
        tokio::task::spawn_blocking(move || run(&["isolate", "web-2", "-n", "demo", "--timeout", "300ms"]))
            .await
            .unwrap();
    assert_ne!(code, Some(0));
    assert!(err.contains("timed out") && err.contains("node-3"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: network namespaces and kernel rules (scripts/test.sh runs it as root)"]
async fn isolate_as_a_library_reports_per_node_lags() {
    let Some(opts) = options(&[]) else { return };
    let sim = SimCluster::start(&opts).await.unwrap();
    let client = client_of(&sim).await;
    let mut progress = kube_converge::isolate::Progress::default();
    let opts = HoldOptions {
        timeout: Duration::from_secs(20),
        ..Default::default()
    };
    let relabel = kube_converge::isolate::Relabel::Set("app".into(), "web-offline".into());
    let report = kube_converge::isolate::isolate(&client, "demo", "web-1", relabel, false, &opts, &mut progress)
        .await
        .unwrap();
    assert!(report.converged);
    assert!(
        report.nodes.iter().all(|n| n.lag_seconds.is_some()),
        "{}",
        report.table()
    );
    // Isolating with a label that keeps the pod selected is refused.
    let keep = kube_converge::isolate::Relabel::Set("tier".into(), "x".into());
    let err = kube_converge::isolate::isolate(&client, "demo", "web-2", keep, false, &opts, &mut progress)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("still be selected"), "{err}");
    // The last ready endpoint of a Service is not isolated without --force: that is an outage.
    let default = kube_converge::isolate::Relabel::Default;
    let report = kube_converge::isolate::isolate(&client, "demo", "web-0", default, false, &opts, &mut progress)
        .await
        .unwrap();
    assert!(report.converged);
    let default = kube_converge::isolate::Relabel::Default;
    let err = kube_converge::isolate::isolate(&client, "demo", "web-2", default, false, &opts, &mut progress)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("last ready endpoint") && err.to_string().contains("--force"),
        "{err}"
    );
    let pods: kube::Api<k8s_openapi::api::core::v1::Pod> = kube::Api::namespaced(client.clone(), "demo");
    let labels = pods.get("web-2").await.unwrap().metadata.labels.unwrap_or_default();
    assert_eq!(
        labels.get("app").map(String::as_str),
        Some("web"),
        "nothing was patched"
    );
    let default = kube_converge::isolate::Relabel::Default;
    let report = kube_converge::isolate::isolate(&client, "demo", "web-2", default, true, &opts, &mut progress)
        .await
        .unwrap();
    assert!(report.converged, "--force isolates it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: network namespaces and kernel rules (scripts/test.sh runs it as root)"]
async fn the_binary_works_as_a_kubectl_plugin() {
    let Some(opts) = options(&[]) else { return };
    let sim = SimCluster::start(&opts).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let plugin = dir.path().join("kubectl-converge");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_kube-converge"), &plugin).unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, sim.api.kubeconfig()).unwrap();
    // Wait for every agent's first status write.
    let start = Instant::now();
    let published = || {
        sim.cluster()
            .list("NodeConvergence")
            .iter()
            .filter(|n| n["status"]["mode"] == "iptables")
            .count()
    };
    while published() < 3 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "agents never published their status"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Exactly as a user types it: kubectl finds kubectl-converge on PATH. Without kubectl
    // this test proves nothing, so it fails (.ci/run installs one).
    common::require(&["kubectl"]);
    let path = format!("{}:{}", dir.path().display(), std::env::var("PATH").unwrap_or_default());
    let out = std::process::Command::new("kubectl")
        .args(["converge", "status"])
        .env("PATH", &path)
        .env("KUBECONFIG", &kubeconfig)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        text.starts_with("NODE") && text.contains("node-1") && text.contains("iptables"),
        "{text}"
    );
}

/// Every emulated mode survives a Service losing its last endpoint, and keeps programming
/// later changes (the iptables emulator failed with CHAIN_DEL EBUSY on every node, and every
/// later change timed out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: network namespaces and kernel rules (scripts/test.sh runs it as root)"]
async fn a_service_losing_its_last_endpoint_and_getting_it_back_in_every_mode() {
    for mode in [ProxyMode::Iptables, ProxyMode::IptablesLegacy, ProxyMode::Nftables] {
        let Some(opts) = common::sim_options(mode, 2, &[]) else {
            return;
        };
        let sim = SimCluster::start(&opts).await.unwrap();
        let client = client_of(&sim).await;
        let hold = HoldOptions {
            timeout: Duration::from_secs(20),
            ..Default::default()
        };
        let mut progress = kube_converge::isolate::Progress::default();
        for pod in ["web-0", "web-1", "web-2"] {
            let relabel = kube_converge::isolate::Relabel::Default;
            let report = kube_converge::isolate::isolate(&client, "demo", pod, relabel, true, &hold, &mut progress)
                .await
                .unwrap_or_else(|e| panic!("{mode:?}: isolating {pod}: {e:#}"));
            assert!(report.converged, "{mode:?}: {pod}: {}", report.table());
        }
        // The Service has no endpoint now; bringing one back converges too.
        let report = kube_converge::isolate::restore(&client, "demo", "web-2", &hold, &mut progress)
            .await
            .unwrap_or_else(|e| panic!("{mode:?}: restoring web-2: {e:#}"));
        assert!(report.converged, "{mode:?}: restore: {}", report.table());
    }
}
