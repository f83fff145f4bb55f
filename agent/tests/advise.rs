//! `kube-converge advise` as a user runs it: the binary against the fake API server (known
//! NodeConvergence figures, a fake Prometheus) and on the simulated cluster, where the lag is
//! measured by the agents for real. Deployments with different preStops stand behind the demo
//! Services; the table and the JSON must give each its verdict.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kc_sim::apiserver::FakeApiServer;
use kc_sim::node::ProxyMode;
use kc_sim::scenario::SimCluster;
use kube_converge::model::{ChangeKind, EndpointKey};
use serde_json::{json, Value};

/// Runs the binary with `kubeconfig`; returns (exit code, stdout, stderr).
async fn run(kubeconfig: &Path, args: &[&str]) -> (i32, String, String) {
    let kc = kubeconfig.to_path_buf();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_kube-converge"))
            .args(&args)
            .env("KUBECONFIG", kc)
            .env_remove("KUBE_CONVERGE_NAMESPACE")
            .env_remove("KUBE_CONVERGE_OUTPUT")
            .env_remove("RUST_BACKTRACE")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A workload of `kind` whose pods carry `labels`, with one container `app` and `pre_stop`.
fn workload(kind: &str, ns: &str, name: &str, labels: Value, pre_stop: Option<Value>, grace: Option<u64>) -> Value {
    let mut container = json!({"name": "app", "image": "registry.example/app:1", "ports": [{"containerPort": 8080}]});
    if let Some(p) = pre_stop {
        container["lifecycle"] = json!({"preStop": p});
    }
    let mut spec = json!({"containers": [{"name": "log-shipper", "image": "registry.example/log:1"}, container]});
    if let Some(g) = grace {
        spec["terminationGracePeriodSeconds"] = json!(g);
    }
    json!({"kind": kind, "metadata": {"name": name, "namespace": ns},
        "spec": {"selector": {"matchLabels": labels.clone()}, "template": {"metadata": {"labels": labels}, "spec": spec}}})
}

const HOLD_PATH: &str = "/v1/hold?namespace=demo&pod=web-hold-0&timeout=20s";

/// The workloads of the test, and the verdict each must get when p99.9 is between 0 and 5 s.
fn workloads() -> Vec<(Value, Option<&'static str>)> {
    let web = json!({"app": "web"});
    vec![
        (
            workload("Deployment", "demo", "web-none", web.clone(), None, None),
            Some("too-short"),
        ),
        (
            workload(
                "Deployment",
                "demo",
                "web-sleep",
                web.clone(),
                Some(json!({"sleep": {"seconds": 5}})),
                None,
            ),
            Some("fine"),
        ),
        (
            workload(
                "Deployment",
                "demo",
                "web-long",
                web.clone(),
                Some(json!({"exec": {"command": ["/bin/sh", "-c", "sleep 120"]}})),
                Some(300),
            ),
            Some("wasteful"),
        ),
        (
            workload(
                "Deployment",
                "demo",
                "web-grace",
                web.clone(),
                Some(json!({"sleep": {"seconds": 10}})),
                Some(10),
            ),
            Some("too-short"),
        ),
        (
            workload(
                "Deployment",
                "demo",
                "web-hold",
                web.clone(),
                Some(json!({"httpGet": {"path": HOLD_PATH, "port": 9108}})),
                Some(60),
            ),
            Some("hold"),
        ),
        (
            workload(
                "Deployment",
                "demo",
                "web-drain",
                web.clone(),
                Some(json!({"httpGet": {"path": "/drain", "port": 8080}})),
                None,
            ),
            Some("unknown"),
        ),
        (
            workload(
                "StatefulSet",
                "demo",
                "api",
                json!({"app": "api"}),
                Some(json!({"exec": {"command": ["sleep", "3"]}})),
                None,
            ),
            Some("fine"),
        ),
        // Backs no Service: not listed.
        (
            workload("Deployment", "demo", "batch", json!({"app": "batch"}), None, None),
            None,
        ),
        // The same labels in a namespace with no Service: not listed either.
        (workload("DaemonSet", "other", "web-agent", web, None, None), None),
    ]
}

fn expected_verdicts() -> BTreeMap<String, &'static str> {
    workloads()
        .into_iter()
        .filter_map(|(w, v)| Some((w["metadata"]["name"].as_str()?.to_string(), v?)))
        .collect()
}

fn verdicts(report: &Value) -> BTreeMap<String, &str> {
    report["workloads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| (w["name"].as_str().unwrap().to_string(), w["verdict"].as_str().unwrap()))
        .collect()
}

fn service(name: &str, app: &str) -> Value {
    json!({"kind": "Service", "metadata": {"name": name, "namespace": "demo"},
        "spec": {"selector": {"app": app}, "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}})
}

fn node_convergence(node: &str, p99: f64, recent: &[(&str, f64)]) -> Value {
    let recent: Vec<Value> = recent
        .iter()
        .map(|(change, e2e)| {
            json!({"namespace": "demo", "service": "web", "endpoint": "10.244.1.10:8080", "ip": "10.244.1.10",
            "change": change, "reason": if *change == "removed" { "deleted" } else { "added" },
            "lagSeconds": e2e / 2.0, "endToEndSeconds": e2e, "programmedTime": "2026-01-01T00:00:00Z"})
        })
        .collect();
    json!({"kind": "NodeConvergence", "metadata": {"name": node}, "spec": {"nodeName": node},
        "status": {"mode": "iptables", "health": "Healthy", "lagP50Seconds": p99 / 2.0, "lagP99Seconds": p99,
            "lagSamples": recent.len(), "recent": recent, "heartbeatTime": "2026-01-01T00:00:00Z"}})
}

/// A fake Prometheus: answers the three queries with fixed vectors (the p99.9 one chunked)
/// and records each query.
async fn fake_prometheus() -> (u16, Arc<Mutex<Vec<String>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            let head = String::from_utf8_lossy(&buf).to_string();
            let target = head.split_whitespace().nth(1).unwrap_or_default().to_string();
            let query = target.split_once("query=").map(|(_, q)| q).unwrap_or_default();
            let query = percent_decode(query);
            log.lock().unwrap().push(query.clone());
            let vector = |rows: &[(&str, &str)]| {
                let result: Vec<Value> = rows
                    .iter()
                    .map(|(node, v)| json!({"metric": {"node": node, "instance": format!("{node}:9108")}, "value": [1.0, v]}))
                    .collect();
                json!({"status": "success", "data": {"resultType": "vector", "result": result}}).to_string()
            };
            let (body, chunked) = if query.starts_with("histogram_quantile(0.99,") {
                (
                    vector(&[("node-1", "0.3"), ("node-2", "0.8"), ("node-3", "NaN")]),
                    false,
                )
            } else if query.starts_with("histogram_quantile(0.999,") {
                (vector(&[("node-1", "0.5"), ("node-2", "2.5")]), true)
            } else if query.starts_with("sum(increase(") {
                (
                    json!({"status": "success", "data": {"resultType": "vector", "result": [{"metric": {}, "value": [1.0, "17"]}]}}).to_string(),
                    false,
                )
            } else {
                (
                    json!({"status": "error", "errorType": "bad_data", "error": "unexpected query"}).to_string(),
                    false,
                )
            };
            let reply = if chunked {
                let (a, b) = body.split_at(body.len() / 2);
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n",
                    a.len(),
                    b.len()
                )
            } else {
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )
            };
            let _ = s.write_all(reply.as_bytes()).await;
        }
    });
    (port, seen)
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() + 1 {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8(out).unwrap()
}

fn row_of<'a>(table: &'a str, workload: &str) -> &'a str {
    table
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(workload))
        .unwrap_or_else(|| panic!("no row for {workload} in:\n{table}"))
}

/// Known NodeConvergence figures give exact values: p99 and p99.9 from the recent removals,
/// each verdict, the snippets, the Prometheus source, and no-data without agents.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn advise_judges_each_workload_against_known_lags() {
    let api = FakeApiServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
    api.apply(service("web", "web"));
    api.apply(service("api", "api"));
    for (w, _) in workloads() {
        api.apply(w);
    }

    // No agents: every verdict but the hold is no-data, and stderr says why.
    let (code, out, err) = run(&kubeconfig, &["advise", "-o", "json"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("agents are not running"), "{err}");
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["measurement"], Value::Null);
    assert!(report["noDataReason"].as_str().unwrap().contains("NodeConvergence"));
    let got = verdicts(&report);
    assert_eq!(got.len(), 7, "{got:?}");
    for (name, verdict) in &got {
        let want = if name == "web-hold" { "hold" } else { "no-data" };
        assert_eq!(*verdict, want, "{name}");
    }

    // Three agents: node-2 saw the slowest removal (1.5 s end to end); additions do not count.
    api.apply(node_convergence("node-1", 0.2, &[("removed", 0.4), ("added", 9.0)]));
    api.apply(node_convergence("node-2", 0.3, &[("removed", 1.5), ("removed", 0.25)]));
    api.apply(node_convergence("node-3", 0.1, &[]));
    let (code, out, err) = run(&kubeconfig, &["advise", "-o", "json"]).await;
    assert_eq!(code, 0, "{err}");
    let report: Value = serde_json::from_str(&out).unwrap();
    let m = &report["measurement"];
    assert_eq!(m["source"], "nodeconvergences");
    assert_eq!(
        (m["p99Seconds"].as_f64(), m["p999Seconds"].as_f64()),
        (Some(1.5), Some(1.5))
    );
    assert_eq!(m["p999Estimated"], true);
    assert_eq!(m["worstNode"], "node-2");
    assert_eq!((m["nodes"].as_u64(), m["samples"].as_u64()), (Some(3), Some(4)));
    let want = expected_verdicts();
    assert_eq!(
        verdicts(&report),
        want.iter().map(|(k, v)| (k.clone(), *v)).collect::<BTreeMap<_, _>>()
    );
    let by_name: BTreeMap<&str, &Value> = report["workloads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| (w["name"].as_str().unwrap(), w))
        .collect();
    let long = by_name["web-long"];
    assert_eq!(long["kind"], "Deployment");
    assert_eq!(long["services"], json!(["web"]));
    assert_eq!(long["preStop"]["kind"], "exec-sleep");
    assert_eq!(long["preStop"]["seconds"], 120.0);
    assert_eq!(
        long["preStop"]["container"], "app",
        "the longest hook, not the first container"
    );
    assert_eq!(long["terminationGracePeriodSeconds"], 300.0);
    // Twice p99.9 is 3 s, p99.9 + 5 s is 6.5 s: the timeout is 7 s; the grace period stays.
    assert_eq!(long["recommendedHoldTimeoutSeconds"], 7);
    assert_eq!(long["recommendedTerminationGracePeriodSeconds"], 300);
    let snippet = long["snippet"].as_str().unwrap();
    assert!(
        snippet.contains("wget -q -O- \\\"http://$NODE_IP:9108/v1/hold?namespace=$POD_NAMESPACE&pod=$POD_NAME&timeout=7s\\\" || true"),
        "{snippet}"
    );
    let none = by_name["web-none"];
    assert_eq!(
        (none["preStop"]["kind"].as_str(), none["preStop"]["seconds"].as_f64()),
        (Some("none"), Some(0.0))
    );
    assert_eq!(none["terminationGracePeriodSeconds"], 30.0, "the default");
    assert_eq!(
        none["preStop"]["container"], "app",
        "with no hook anywhere, the hold goes on the serving container (not the first, log-shipper)"
    );
    assert!(none["snippet"].as_str().unwrap().contains("- name: app\n"));
    assert_eq!(by_name["web-sleep"]["preStop"]["kind"], "sleep");
    let grace = by_name["web-grace"]["reason"].as_str().unwrap();
    assert!(grace.contains("does not cover the preStop sleep"), "{grace}");
    let hold = by_name["web-hold"];
    assert_eq!(hold["preStop"]["kind"], "hold");
    assert_eq!(hold["preStop"]["holdTimeoutSeconds"], 20.0);
    assert_eq!(hold["snippet"], Value::Null, "a hold needs no replacement");
    assert_eq!(by_name["api"]["kind"], "StatefulSet");
    assert_eq!(by_name["api"]["services"], json!(["api"]));

    // The same as a table: one row per workload, the measurement above it, a patch below.
    let (code, table, err) = run(&kubeconfig, &["advise", "-n", "demo"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        table.starts_with("measured end-to-end removal lag (3 node(s), from nodeconvergences): p99 1.500s, p99.9 ~1.500s (worst node: node-2)"),
        "{table}"
    );
    let header = table.lines().find(|l| l.starts_with("NAMESPACE")).unwrap();
    assert_eq!(
        header.split_whitespace().collect::<Vec<_>>(),
        [
            "NAMESPACE",
            "WORKLOAD",
            "SERVICES",
            "PRESTOP",
            "GRACE",
            "P99",
            "P99.9",
            "VERDICT"
        ]
    );
    for (name, verdict) in &want {
        let kind = if name == "api" { "statefulset" } else { "deployment" };
        let row = row_of(&table, &format!("{kind}/{name}"));
        assert!(row.ends_with(&format!("  {verdict}")), "{row}");
        assert!(row.contains("1.500s  ~1.500s"), "{row}");
    }
    let long_row = row_of(&table, "deployment/web-long");
    assert!(long_row.contains("exec sleep 120s "), "{long_row}");
    assert_eq!(long_row.split_whitespace().nth(6), Some("300s"), "{long_row}");
    assert!(row_of(&table, "deployment/web-hold").contains("kube-converge hold (httpGet, timeout 20s)"));
    assert!(!table.contains("batch") && !table.contains("web-agent"), "{table}");
    assert!(table.contains("kubectl patch deployment web-none -n demo --patch-file FILE"));
    // Another namespace has none of them.
    let (code, other, _) = run(&kubeconfig, &["advise", "-n", "other"]).await;
    assert_eq!(code, 0);
    assert!(
        other.contains("no Deployment, StatefulSet or DaemonSet backs a Service here"),
        "{other}"
    );

    // From Prometheus: the worst node's histogram_quantile, measured (not estimated).
    let (port, queries) = fake_prometheus().await;
    let url = format!("http://127.0.0.1:{port}");
    let (code, out, err) = run(
        &kubeconfig,
        &[
            "advise",
            "--prometheus",
            &url,
            "--prometheus-window",
            "2d",
            "-o",
            "json",
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let report: Value = serde_json::from_str(&out).unwrap();
    let m = &report["measurement"];
    assert_eq!(m["source"], "prometheus");
    assert_eq!(
        (m["p99Seconds"].as_f64(), m["p999Seconds"].as_f64()),
        (Some(0.8), Some(2.5))
    );
    assert_eq!(m["p999Estimated"], false);
    assert_eq!(
        (m["worstNode"].as_str(), m["nodes"].as_u64(), m["samples"].as_u64()),
        (Some("node-2"), Some(2), Some(17))
    );
    let queries = queries.lock().unwrap().clone();
    assert_eq!(
        queries,
        [
            r#"histogram_quantile(0.99, sum by (node, instance, le) (increase(kube_converge_end_to_end_lag_seconds_bucket{change="removed"}[2d])))"#,
            r#"histogram_quantile(0.999, sum by (node, instance, le) (increase(kube_converge_end_to_end_lag_seconds_bucket{change="removed"}[2d])))"#,
            r#"sum(increase(kube_converge_end_to_end_lag_seconds_count{change="removed"}[2d]))"#,
        ]
    );
    // p99.9 2.5 s: sleep 5 s is fine, 120 s wasteful, none too short.
    assert_eq!(verdicts(&report)["web-sleep"], "fine");
    assert_eq!(verdicts(&report)["web-long"], "wasteful");
    assert_eq!(verdicts(&report)["web-none"], "too-short");

    // Clear errors: an unreachable Prometheus, an https URL.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (code, _, err) = run(
        &kubeconfig,
        &["advise", "--prometheus", &format!("http://127.0.0.1:{closed}")],
    )
    .await;
    assert_eq!(code, 1);
    assert!(
        err.starts_with("error: querying Prometheus at http://127.0.0.1:"),
        "{err}"
    );
    let (code, _, err) = run(&kubeconfig, &["advise", "--prometheus", "https://prom:9090"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("https is not supported"), "{err}");
}

fn options() -> Option<kc_sim::scenario::SimOptions> {
    common::sim_options(ProxyMode::Iptables, 3, &[("node-3", 400)])
}

/// On the simulated cluster the agents measure a real removal; advise's figures are those
/// samples and its verdicts follow from them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: network namespaces and kernel rules (scripts/test.sh runs it as root)"]
async fn advise_on_the_simulated_cluster_uses_the_agents_measurements() {
    let Some(opts) = options() else { return };
    let mut sim = SimCluster::start(&opts).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, sim.api.kubeconfig_for("operator")).unwrap();
    for (w, _) in workloads() {
        sim.api.apply(w);
    }
    // Before any removal the agents have measured nothing.
    let (code, out, err) = run(&kubeconfig, &["advise", "-n", "demo", "-o", "json"]).await;
    assert_eq!(code, 0, "{err}");
    let before: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(before["measurement"], Value::Null, "{before}");
    assert!(
        before["noDataReason"]
            .as_str()
            .unwrap()
            .contains("measured no change yet"),
        "{before}"
    );
    assert_eq!(verdicts(&before)["web-sleep"], "no-data");

    sim.cluster().delete("Pod", "demo", "web-0", Some(5)).unwrap();
    let is_web0 = |k: &EndpointKey| k.endpoint.ip().to_string() == "10.244.1.10";
    let rows = sim.collect(ChangeKind::Removed, is_web0, 1).await.unwrap();
    assert_eq!(rows.len(), 3, "{rows:?}");
    // What the agents measured, as their status rounds it (ms).
    let measured: Vec<f64> = rows
        .iter()
        .map(|r| {
            let s = r.sample.as_ref().unwrap();
            (s.end_to_end.map_or(s.lag, |e| e.0) * 1000.0).round() / 1000.0
        })
        .collect();
    let slowest = measured.iter().copied().fold(0.0, f64::max);
    // Wait until every node has published its sample.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let published = sim
            .cluster()
            .list("NodeConvergence")
            .iter()
            .filter(|nc| {
                nc["status"]["recent"]
                    .as_array()
                    .is_some_and(|r| r.iter().any(|e| e["change"] == "removed"))
            })
            .count();
        if published == 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {published} nodes published the removal"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (code, out, err) = run(&kubeconfig, &["advise", "-n", "demo", "-o", "json"]).await;
    assert_eq!(code, 0, "{err}");
    let report: Value = serde_json::from_str(&out).unwrap();
    let m = &report["measurement"];
    let (p99, p999) = (m["p99Seconds"].as_f64().unwrap(), m["p999Seconds"].as_f64().unwrap());
    // Three removals: p99.9 (estimated) is the slowest node's end-to-end lag; p99 is no lower
    // than the slowest local lag and no higher than p99.9.
    assert!((p999 - slowest).abs() < 0.0015, "p99.9 {p999} vs measured {measured:?}");
    assert!(p99 > 0.0 && p99 <= p999, "{m}");
    assert_eq!(m["nodes"], 3);
    assert!(p999 < 5.0, "the sim's lags are sub-second plus node-3's 400 ms: {m}");
    let want = expected_verdicts();
    assert_eq!(
        verdicts(&report),
        want.iter().map(|(k, v)| (k.clone(), *v)).collect::<BTreeMap<_, _>>(),
        "{report:#}"
    );
    let (code, table, err) = run(&kubeconfig, &["advise", "-n", "demo"]).await;
    assert_eq!(code, 0, "{err}");
    for (name, verdict) in &want {
        let kind = if name == "api" { "statefulset" } else { "deployment" };
        assert!(
            row_of(&table, &format!("{kind}/{name}")).ends_with(&format!("  {verdict}")),
            "{table}"
        );
    }
    assert!(table.contains(&format!("p99.9 ~{p999:.3}s")), "{table}");
}

/// An API server that refuses everything with 403, as one without the operator binding does.
async fn forbidding_api_server() -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&buf).to_string();
                let path = head.split_whitespace().nth(1).unwrap_or_default().to_string();
                let resource = path
                    .split('?')
                    .next()
                    .unwrap_or_default()
                    .rsplit('/')
                    .next()
                    .unwrap_or_default()
                    .to_string();
                let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                    "message": format!("{resource} is forbidden: User \"bob\" cannot list resource \"{resource}\""),
                    "reason": "Forbidden", "code": 403})
                .to_string();
                let reply = format!(
                    "HTTP/1.1 403 Forbidden\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(reply.as_bytes()).await;
            });
        }
    });
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: http://{addr}\nusers:\n- name: bob\n  user:\n    token: bob\ncontexts:\n- name: c\n  context:\n    cluster: c\n    user: bob\ncurrent-context: c\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forbidden_list_names_the_missing_rbac() {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, forbidding_api_server().await).unwrap();
    let (code, out, err) = run(&kubeconfig, &["advise", "-n", "demo"]).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.is_empty(), "{out}");
    assert!(
        err.starts_with("error: listing Services in namespace demo was forbidden (services is forbidden: User \"bob\" cannot list resource \"services\"): advise needs `list` on `services` in API group \"\" (core); bind the kube-converge-operator ClusterRole"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "one sentence, not a dump: {err}");
}

/// A real Prometheus scrapes the simulated cluster's agents: advise's PromQL runs there, its
/// HTTP client reads Prometheus' answers, and the quantiles fall in the histogram bucket of the
/// slowest lag the agents measured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and prometheus: network namespaces and kernel rules (scripts/test.sh runs it as root)"]
async fn advise_reads_the_quantiles_from_a_real_prometheus() {
    if !common::require(&["prometheus"]) {
        return;
    }
    let Some(opts) = options() else { return };
    let mut sim = SimCluster::start(&opts).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, sim.api.kubeconfig_for("operator")).unwrap();
    for (w, _) in workloads() {
        sim.api.apply(w);
    }
    let targets: Vec<String> = sim
        .metrics_addrs()
        .iter()
        .map(|(node, addr)| format!("    - targets: ['{addr}']\n      labels: {{node: {node}}}\n"))
        .collect();
    std::fs::write(
        dir.path().join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n- job_name: kube-converge-metrics\n  static_configs:\n{}",
            targets.concat()
        ),
    )
    .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _prometheus = Kill(
        std::process::Command::new("prometheus")
            .arg(format!("--config.file={}", dir.path().join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("prometheus.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    // The removal must come after Prometheus has scraped the lag series at zero: increase()
    // counts nothing for a series whose first sample already holds the change.
    let scraped_at_zero =
        "count(count by (node) (kube_converge_end_to_end_lag_seconds_count{change=\"removed\"} == 0))";
    let deadline = Instant::now() + Duration::from_secs(60);
    while prometheus_value(port, scraped_at_zero).await < Some(3.0) {
        assert!(Instant::now() < deadline, "Prometheus never scraped the agents");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    sim.cluster().delete("Pod", "demo", "web-0", Some(5)).unwrap();
    let is_web0 = |k: &EndpointKey| k.endpoint.ip().to_string() == "10.244.1.10";
    let rows = sim.collect(ChangeKind::Removed, is_web0, 1).await.unwrap();
    let slowest = rows
        .iter()
        .map(|r| {
            let s = r.sample.as_ref().unwrap();
            s.end_to_end.map_or(s.lag, |e| e.0)
        })
        .fold(0.0, f64::max);
    let url = format!("http://127.0.0.1:{port}");
    let args = [
        "advise",
        "-n",
        "demo",
        "--prometheus",
        &url,
        "--prometheus-window",
        "10m",
        "-o",
        "json",
    ];
    // Until Prometheus is up and has scraped every node's removal.
    let deadline = Instant::now() + Duration::from_secs(90);
    let report = loop {
        let (code, out, err) = run(&kubeconfig, &args).await;
        if code == 0 {
            let report: Value = serde_json::from_str(&out).unwrap();
            if report["measurement"]["nodes"] == 3 && report["measurement"]["samples"].as_u64() >= Some(3) {
                break report;
            }
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never had the removals: {err}\n{out}\n{}",
            std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let m = &report["measurement"];
    assert_eq!(
        (m["source"].as_str(), m["p999Estimated"].as_bool()),
        (Some("prometheus"), Some(false))
    );
    // histogram_quantile interpolates inside the bucket holding the slowest node's lag.
    let buckets = kube_converge::telemetry::LAG_BUCKETS;
    let upper = buckets.iter().copied().find(|b| slowest <= *b).unwrap();
    let lower = buckets.iter().copied().filter(|b| *b < upper).fold(0.0, f64::max);
    for q in ["p99Seconds", "p999Seconds"] {
        let v = m[q].as_f64().unwrap();
        assert!(
            v > lower && v <= upper,
            "{q} {v} outside the bucket ({lower}, {upper}] of the slowest lag {slowest}: {m}"
        );
    }
    let got = verdicts(&report);
    assert_eq!(got["web-none"], "too-short");
    assert_eq!(got["web-long"], "wasteful");
    assert_eq!(got["web-hold"], "hold");
}

/// The first value of an instant query, if Prometheus answers.
async fn prometheus_value(port: u16, expr: &str) -> Option<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let q: String = expr
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    s.write_all(format!("GET /api/v1/query?query={q} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut reply = String::new();
    s.read_to_string(&mut reply).await.ok()?;
    let body: Value = serde_json::from_str(reply.split_once("\r\n\r\n")?.1).ok()?;
    body["data"]["result"][0]["value"][1].as_str()?.parse().ok()
}
