//! The install manifests: they parse into the typed Kubernetes objects, kustomize renders
//! them, the RBAC roles grant exactly what the code calls (recorded by the fake API server),
//! and every metric the dashboard and the alerts use is exported by a real agent.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Namespace, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kc_sim::node::ProxyMode;
use kc_sim::scenario::{SimCluster, SimOptions};
use serde_json::Value;

const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy");

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            yaml_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "yaml") && p.file_name().is_some_and(|n| n != "kustomization.yaml")
        {
            out.push(p);
        }
    }
}

fn documents() -> Vec<(PathBuf, Value)> {
    let mut files = Vec::new();
    yaml_files(Path::new(DEPLOY), &mut files);
    files.sort();
    files
        .into_iter()
        .flat_map(|f| {
            let text = std::fs::read_to_string(&f).unwrap();
            let docs: Vec<Value> =
                serde_saphyr::from_multiple(&text).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            docs.into_iter().filter(|d| !d.is_null()).map(move |d| (f.clone(), d))
        })
        .collect()
}

fn typed<T: serde::de::DeserializeOwned>(f: &Path, d: &Value) -> T {
    serde_json::from_value(d.clone()).unwrap_or_else(|e| panic!("{}: not a valid {}: {e}", f.display(), d["kind"]))
}

#[test]
fn every_manifest_parses_into_typed_objects() {
    let docs = documents();
    let mut kinds = BTreeSet::new();
    for (f, d) in &docs {
        let kind = d["kind"].as_str().unwrap_or_else(|| panic!("{}: no kind", f.display()));
        kinds.insert(kind.to_string());
        match kind {
            "Namespace" => drop(typed::<Namespace>(f, d)),
            "ServiceAccount" => drop(typed::<ServiceAccount>(f, d)),
            "ClusterRole" => drop(typed::<ClusterRole>(f, d)),
            "ClusterRoleBinding" => drop(typed::<ClusterRoleBinding>(f, d)),
            "Service" => drop(typed::<Service>(f, d)),
            "CustomResourceDefinition" => drop(typed::<CustomResourceDefinition>(f, d)),
            "DaemonSet" => {
                let ds: DaemonSet = typed(f, d);
                let pod = ds.spec.template.spec.unwrap();
                assert_eq!(pod.host_network, Some(true));
                assert_eq!(pod.priority_class_name.as_deref(), Some("system-node-critical"));
                assert!(pod
                    .tolerations
                    .unwrap()
                    .iter()
                    .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none()));
                let c = &pod.containers[0];
                let sc = c.security_context.clone().unwrap();
                assert_eq!(sc.read_only_root_filesystem, Some(true));
                assert_eq!(sc.allow_privilege_escalation, Some(false));
                let caps = sc.capabilities.unwrap();
                assert_eq!(caps.drop.unwrap(), ["ALL"]);
                assert_eq!(caps.add.unwrap(), ["NET_ADMIN", "NET_RAW"]);
                let env = c.env.clone().unwrap();
                let node = env.iter().find(|e| e.name == "NODE_NAME").unwrap();
                assert_eq!(
                    node.value_from.as_ref().unwrap().field_ref.as_ref().unwrap().field_path,
                    "spec.nodeName"
                );
                assert_eq!(
                    c.liveness_probe
                        .as_ref()
                        .unwrap()
                        .http_get
                        .as_ref()
                        .unwrap()
                        .path
                        .as_deref(),
                    Some("/healthz")
                );
                assert_eq!(
                    c.readiness_probe
                        .as_ref()
                        .unwrap()
                        .http_get
                        .as_ref()
                        .unwrap()
                        .path
                        .as_deref(),
                    Some("/readyz")
                );
                assert!(c
                    .resources
                    .as_ref()
                    .unwrap()
                    .limits
                    .as_ref()
                    .unwrap()
                    .contains_key("memory"));
            }
            "ServiceMonitor" | "PrometheusRule" => {
                assert_eq!(d["apiVersion"], "monitoring.coreos.com/v1", "{}", f.display());
                assert!(d["spec"].is_object());
            }
            other => panic!("{}: unexpected kind {other}", f.display()),
        }
    }
    for k in [
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "DaemonSet",
        "Service",
        "CustomResourceDefinition",
        "ServiceMonitor",
        "PrometheusRule",
    ] {
        assert!(kinds.contains(k), "no {k} in deploy/");
    }
}

#[test]
#[ignore = "needs kubectl (scripts/test.sh runs it as root, where .ci/run installed it)"]
fn kustomize_renders_base_and_monitoring_overlay() {
    if !common::require(&["kubectl"]) {
        return;
    }
    for dir in ["base", "overlays/monitoring"] {
        let out = std::process::Command::new("kubectl")
            .args(["kustomize", &format!("{DEPLOY}/{dir}")])
            .output()
            .unwrap();
        assert!(out.status.success(), "{dir}: {}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("kind: DaemonSet"), "{dir}");
        if dir.contains("monitoring") {
            assert!(
                text.contains("grafana_dashboard: \"1\"") && text.contains("kube-converge-dashboard"),
                "{text}"
            );
        }
    }
}

/// (verb, group, resource) granted by a ClusterRole in deploy/base.
fn granted(role: &str) -> BTreeSet<(String, String, String)> {
    let (f, d) = documents()
        .into_iter()
        .find(|(_, d)| d["kind"] == "ClusterRole" && d["metadata"]["name"] == role)
        .unwrap_or_else(|| panic!("no ClusterRole {role}"));
    let role: ClusterRole = typed(&f, &d);
    let mut out = BTreeSet::new();
    for rule in role.rules.unwrap_or_default() {
        for g in rule.api_groups.clone().unwrap_or_default() {
            for r in rule.resources.clone().unwrap_or_default() {
                for v in &rule.verbs {
                    out.insert((v.clone(), g.clone(), r.clone()));
                }
            }
        }
    }
    out
}

fn used(sim: &SimCluster, user: &str) -> BTreeSet<(String, String, String)> {
    sim.api
        .requests()
        .into_iter()
        .filter(|(u, ..)| u == user)
        .map(|(_, v, g, r)| (v, g, r))
        .collect()
}

fn sim_options() -> Option<SimOptions> {
    common::sim_options(ProxyMode::Iptables, 2, &[])
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: network namespaces and kernel rules (scripts/test.sh runs it as root)"]
async fn rbac_roles_grant_exactly_what_agents_and_the_cli_call() {
    let Some(opts) = sim_options() else { return };
    let sim = SimCluster::start(&opts).await.unwrap();
    let addr = sim.metrics_addrs()["node-1"];
    // Exercise the agents: a hold while a pod is deleted (and status writes, which never stop).
    sim.cluster().delete("Pod", "demo", "web-0", Some(5)).unwrap();
    let hold = http_get(addr, "/v1/hold?namespace=demo&pod=web-0&timeout=20s&annotate=true").await;
    assert!(hold.lines().next().is_some_and(|l| l.contains(" 200 ")), "{hold}");
    // A hold by IP finds the pod by listing (the pod may be gone by now: any answer will do).
    let _ = http_get(addr, "/v1/hold?namespace=demo&ip=10.244.2.11&timeout=1s").await;
    // Exercise the CLI as an operator.
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, sim.api.kubeconfig_for("operator")).unwrap();
    for args in [
        vec!["advise"],
        vec!["advise", "-n", "demo", "-o", "json"],
        vec!["isolate", "web-1", "-n", "demo", "--timeout", "20s"],
        vec!["restore", "web-1", "-n", "demo", "--timeout", "20s"],
        vec!["status"],
        vec!["status", "web-2", "-n", "demo"],
        vec!["isolate", "web-2", "-n", "demo", "--timeout", "20s", "--delete"],
        vec![
            "switch",
            "web",
            "-n",
            "demo",
            "--selector",
            "app=api",
            "--timeout",
            "20s",
        ],
    ] {
        // `status` of a pod nobody removes says so with exit code 1; its calls still count.
        let expect_code = if args.starts_with(&["status", "web-2"]) { 1 } else { 0 };
        let what = args.join(" ");
        let kc = kubeconfig.clone();
        let out = tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_kube-converge"))
                .args(&args)
                .env("KUBECONFIG", kc)
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        assert_eq!(
            out.status.code(),
            Some(expect_code),
            "{what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let agent_used = used(&sim, "agent");
    let agent_granted = granted("kube-converge-agent");
    assert_eq!(
        agent_used, agent_granted,
        "the agent role must grant exactly what agents call"
    );
    let operator_used = used(&sim, "operator");
    let operator_granted = granted("kube-converge-operator");
    assert_eq!(
        operator_used, operator_granted,
        "the operator role must grant exactly what the CLI calls"
    );
}

/// `kube_converge_*` names in a text (PromQL expressions), with histogram suffixes removed.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("kube_converge_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        out.insert(base.to_string());
        rest = &tail[end..];
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: network namespaces and kernel rules (scripts/test.sh runs it as root)"]
async fn dashboard_and_alert_metrics_are_exported_by_a_real_agent() {
    let Some(opts) = sim_options() else { return };
    let mut sim = SimCluster::start(&opts).await.unwrap();
    // Make every family carry a sample: a removal (lags), a hold (hold outcomes).
    sim.cluster().delete("Pod", "demo", "web-0", Some(5)).unwrap();
    let watched = |k: &kube_converge::model::EndpointKey| k.endpoint.ip().to_string() == "10.244.1.10";
    sim.collect(kube_converge::model::ChangeKind::Removed, watched, 1)
        .await
        .unwrap();
    let addr = sim.metrics_addrs()["node-1"];
    let _ = http_get(addr, "/v1/hold?namespace=demo&pod=web-0&timeout=10s").await;
    let start = Instant::now();
    let scrape = loop {
        let s = sim.scrape("node-1").await.unwrap();
        if s.contains("kube_converge_holds_total{") || start.elapsed() > Duration::from_secs(5) {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let exported: BTreeSet<String> = scrape
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(String::from)
        .collect();
    let dashboard = std::fs::read_to_string(format!("{DEPLOY}/overlays/monitoring/kube-converge.json")).unwrap();
    let rules = std::fs::read_to_string(format!("{DEPLOY}/overlays/monitoring/prometheusrule.yaml")).unwrap();
    let wanted: BTreeSet<String> = metric_names(&dashboard)
        .into_iter()
        .chain(metric_names(&rules))
        .collect();
    assert!(wanted.len() >= 10, "{wanted:?}");
    let missing: Vec<&String> = wanted.iter().filter(|m| !exported.contains(*m)).collect();
    assert!(
        missing.is_empty(),
        "used by the dashboard or alerts but not exported: {missing:?}\nexported: {exported:?}"
    );
}

/// Every alert of the PrometheusRule passes `promtool check rules`, and has a `promtool test
/// rules` case in which it fires on its condition and one in which it stays silent.
#[test]
#[ignore = "needs promtool (scripts/test.sh runs it as root, where .ci/run installed it)"]
fn alerts_fire_on_their_condition_and_stay_silent_otherwise() {
    if !common::require(&["promtool"]) {
        return;
    }
    let rule: Value = documents()
        .into_iter()
        .map(|(_, d)| d)
        .find(|d| d["kind"] == "PrometheusRule")
        .expect("the monitoring overlay has a PrometheusRule");
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("alerts.rules.json");
    std::fs::write(&rules, serde_json::to_string_pretty(&rule["spec"]).unwrap()).unwrap();
    let tests_src = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/promtool/alerts.test.yaml");
    let tests = std::fs::read_to_string(tests_src).unwrap();
    std::fs::write(dir.path().join("alerts.test.yaml"), &tests).unwrap();
    for args in [
        ["check", "rules", "alerts.rules.json"],
        ["test", "rules", "alerts.test.yaml"],
    ] {
        let out = std::process::Command::new("promtool")
            .args(args)
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Each alert is tested both ways: firing (a non-empty exp_alerts) and silent ([]).
    let parsed: Value = serde_saphyr::from_str(&tests).unwrap();
    let cases: Vec<(String, bool)> = parsed["tests"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|t| t["alert_rule_test"].as_array().cloned().unwrap_or_default())
        .map(|c| {
            let fires = c["exp_alerts"].as_array().is_some_and(|a| !a.is_empty());
            (c["alertname"].as_str().unwrap_or_default().to_string(), fires)
        })
        .collect();
    for group in rule["spec"]["groups"].as_array().unwrap() {
        for r in group["rules"].as_array().unwrap() {
            let Some(name) = r["alert"].as_str() else { continue };
            for fires in [true, false] {
                assert!(
                    cases.iter().any(|(n, f)| n == name && *f == fires),
                    "{name} has no promtool case where it {}",
                    if fires { "fires" } else { "stays silent" }
                );
            }
        }
    }
}

/// A query through Prometheus' HTTP API; returns the result vector.
async fn prom_query(port: u16, expr: &str) -> Vec<Value> {
    let q: String = expr
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let reply = http_get(addr, &format!("/api/v1/query?query={q}")).await;
    let body = reply.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or_default();
    let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{expr}: {e}: {reply}"));
    assert_eq!(v["status"], "success", "{expr}: {v}");
    v["data"]["result"].as_array().cloned().unwrap_or_default()
}

/// The dashboard in a real Prometheus: it scrapes the sim's agents with the `node` label the
/// ServiceMonitor's relabelling gives, a deletion and an isolation happen, and every panel's
/// query returns data through Prometheus' HTTP API; the lag panels show the removals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: network namespaces and kernel rules (scripts/test.sh runs it as root)"]
async fn every_dashboard_panel_returns_data_from_a_real_prometheus() {
    if !common::require(&["prometheus"]) {
        return;
    }
    let Some(opts) = sim_options() else { return };
    let mut sim = SimCluster::start(&opts).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    // As the ServiceMonitor does: job kube-converge-metrics, `node` from the pod's node name.
    let targets: Vec<String> = sim
        .metrics_addrs()
        .iter()
        .map(|(node, addr)| format!("    - targets: ['{addr}']\n      labels: {{node: {node}}}\n"))
        .collect();
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n- job_name: kube-converge-metrics\n  static_configs:\n{}",
        targets.concat()
    );
    std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut prom = std::process::Command::new("prometheus")
        .arg(format!("--config.file={}", dir.path().join("prometheus.yml").display()))
        .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("prometheus.log")).unwrap())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _guard = Kill(std::mem::replace(
        &mut prom,
        std::process::Command::new("true").spawn().unwrap(),
    ));
    let up_deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let up = if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            prom_query(port, "up == 1").await.len()
        } else {
            0
        };
        if up == sim.metrics_addrs().len() {
            break;
        }
        assert!(
            Instant::now() < up_deadline,
            "Prometheus never scraped every agent: {}",
            std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // A deletion and an isolation, and a hold, as the demo does.
    sim.cluster().delete("Pod", "demo", "web-0", Some(5)).unwrap();
    let relabel = serde_json::json!({"metadata": {"labels": {"app": "web-offline"}}});
    sim.cluster()
        .patch("Pod", "demo", "web-1", false, &relabel, kc_sim::store::Part::Main)
        .unwrap();
    let watched = |k: &kube_converge::model::EndpointKey| {
        ["10.244.1.10", "10.244.2.11"].contains(&k.endpoint.ip().to_string().as_str())
    };
    sim.collect(kube_converge::model::ChangeKind::Removed, watched, 2)
        .await
        .unwrap();
    let addr = sim.metrics_addrs()["node-1"];
    let _ = http_get(addr, "/v1/hold?namespace=demo&pod=web-0&timeout=5s").await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{DEPLOY}/overlays/monitoring/kube-converge.json")).unwrap(),
    )
    .unwrap();
    let mut checked = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        let title = panel["title"].as_str().unwrap_or_default();
        for t in panel["targets"].as_array().into_iter().flatten() {
            let Some(expr) = t["expr"].as_str() else { continue };
            // Grafana's variables: every node; a rate window covering the whole test.
            let q = expr.replace("$node", ".*").replace("$__rate_interval", "5m");
            let result = prom_query(port, &q).await;
            assert!(!result.is_empty(), "panel {title:?}: {q} returned no data");
            if q.contains("lag_seconds") {
                let shows = result.iter().any(|r| {
                    r["value"][1]
                        .as_str()
                        .and_then(|v| v.parse::<f64>().ok())
                        .is_some_and(|v| v.is_finite() && v > 0.0)
                });
                assert!(shows, "panel {title:?}: {q} shows no lag: {result:?}");
            }
            checked += 1;
        }
    }
    assert!(checked >= 10, "only {checked} panel queries");
    // The dashboard's node variable lists every node.
    let nodes = prom_query(port, "count by (node) (kube_converge_info)").await;
    assert_eq!(nodes.len(), sim.metrics_addrs().len(), "{nodes:?}");
}
