//! `switch` on the simulated cluster: the per-node times of a blue/green cutover checked against
//! the kube-proxy emulators' ground truth, the refusal of a cutover to nothing, and the
//! rollback on timeout.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kc_sim::node::{GroundTruth, ProxyMode};
use kc_sim::scenario::{SimCluster, SimEvent};
use kube_converge::model::{ChangeKind, Timestamp};
use serde_json::{json, Value};

// The sim's workload: Service demo/web selects app=web (web-0..2), demo/api selects app=api.
const WEB: [&str; 3] = ["10.244.1.10", "10.244.2.11", "10.244.3.12"];
const API: [&str; 2] = ["10.244.1.20", "10.244.2.21"];
const NODES: [&str; 3] = ["node-1", "node-2", "node-3"];

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs the binary against the sim's API server (off the async runtime: it blocks).
async fn cli(kubeconfig: &Path, args: &[&str]) -> Run {
    let (kc, args): (PathBuf, Vec<String>) = (kubeconfig.to_path_buf(), args.iter().map(|a| a.to_string()).collect());
    tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_kube-converge"))
            .args(&args)
            .env("KUBECONFIG", kc)
            .output()
            .unwrap();
        Run {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    })
    .await
    .unwrap()
}

fn kubeconfig(sim: &SimCluster, dir: &tempfile::TempDir) -> PathBuf {
    let path = dir.path().join("kubeconfig");
    std::fs::write(&path, sim.api.kubeconfig()).unwrap();
    path
}

fn selector(sim: &SimCluster) -> Value {
    sim.cluster().get("Service", "demo", "web").unwrap()["spec"]["selector"].clone()
}

/// The emulators' truth for the removals of `removed` and the additions of `added`, per
/// (node, ip), until every node has one for each or 30 s pass.
async fn truths(
    sim: &mut SimCluster,
    removed: &[&str],
    added: &[&str],
) -> [BTreeMap<(String, String), GroundTruth>; 2] {
    let mut out = [BTreeMap::new(), BTreeMap::new()];
    let deadline = Instant::now() + Duration::from_secs(30);
    while out[0].len() + out[1].len() < NODES.len() * (removed.len() + added.len()) && Instant::now() < deadline {
        if let Some(SimEvent::Truth(t)) = sim.next_event(Duration::from_secs(1)).await {
            let ip = t.key.endpoint.ip().to_string();
            let (i, ips) = match t.kind {
                ChangeKind::Removed => (0, removed),
                _ => (1, added),
            };
            if ips.contains(&ip.as_str()) && t.key.port_name.service.name == "web" {
                out[i].insert((t.node.clone(), ip), t);
            }
        }
    }
    out
}

/// The latest truth among `ips` on `node`.
fn last_on<'a>(truth: &'a BTreeMap<(String, String), GroundTruth>, node: &str, ips: &[&str]) -> &'a GroundTruth {
    ips.iter()
        .map(|ip| {
            truth
                .get(&(node.to_string(), ip.to_string()))
                .unwrap_or_else(|| panic!("no truth for {ip} on {node}"))
        })
        .max_by_key(|t| t.write_finished)
        .unwrap()
}

fn time(v: &Value) -> Timestamp {
    Timestamp::parse_rfc3339(v["time"].as_str().unwrap_or_else(|| panic!("no time in {v}"))).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: network namespaces and kernel rules (scripts/test.sh runs it as root)"]
async fn a_cutover_reports_per_node_times_that_agree_with_the_kernel() {
    let Some(opts) = common::sim_options(ProxyMode::Iptables, 3, &[("node-3", 1500)]) else {
        return;
    };
    let mut sim = SimCluster::start(&opts).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kc = kubeconfig(&sim, &dir);
    let started = Timestamp::now();
    let run = cli(
        &kc,
        &[
            "switch",
            "web",
            "-n",
            "demo",
            "--selector",
            "app=api",
            "--timeout",
            "25s",
            "-o",
            "json",
        ],
    )
    .await;
    let returned = Timestamp::now();
    assert_eq!(run.code, Some(0), "stdout:\n{}\nstderr:\n{}", run.stdout, run.stderr);
    assert_eq!(selector(&sim), json!({"app": "api"}));
    let report: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(report["complete"], true, "{report:#}");
    assert_eq!(report["oldPods"], json!(["web-0", "web-1", "web-2"]), "{report:#}");
    assert_eq!(report["newPods"], json!(["api-0", "api-1"]), "{report:#}");
    let patched = Timestamp::parse_rfc3339(report["patchedTime"].as_str().unwrap()).unwrap();
    assert!(started <= patched && patched <= returned);
    let [removed, added] = truths(&mut sim, &WEB, &API).await;
    let nodes = report["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 3, "{report:#}");
    let mut old_seconds = BTreeMap::new();
    for n in nodes {
        let name = n["node"].as_str().unwrap();
        assert_eq!(n["state"], "converged", "{n:#}");
        // Every node's client sends traffic to the Service: each agent counts what still
        // reached the old pods, and the slow node's 1.5 s cost some.
        let conns = n["connectionsToOldSet"].as_u64();
        assert!(conns.is_some(), "no count of connections to the old set: {n:#}");
        if name == "node-3" {
            assert!(conns > Some(0), "the slow node's lag cost no connection? {n:#}");
        }
        let last_removal = last_on(&removed, name, &WEB);
        let last_addition = last_on(&added, name, &API);
        // What the command reports as done never precedes the kernel's last write.
        let confirmed = time(&n["confirmed"]);
        for t in [last_removal, last_addition] {
            assert!(
                confirmed >= t.write_finished,
                "{name}: switch saw the node done at {confirmed:?}, before its kernel wrote {:?} ({:?}) at {:?}",
                t.key,
                t.kind,
                t.write_finished
            );
        }
        assert!(confirmed <= returned);
        // The per-set times are the kernel's: the agent's programmed time of the last change,
        // within the write that made it (or the poll after it).
        for (what, set, t) in [
            ("oldStopped", &n["oldStopped"], last_removal),
            ("newComplete", &n["newComplete"], last_addition),
        ] {
            assert_eq!(set["source"], "kernel", "{name} {what}: {n:#}");
            let at = time(set);
            let lead = t.write_started.seconds_since(at);
            let lag = at.seconds_since(t.write_finished);
            assert!(
                lead <= 0.005 && lag <= 0.5,
                "{name} {what} at {at:?}: the kernel wrote it from {:?} to {:?}",
                t.write_started,
                t.write_finished
            );
            assert!(at <= confirmed, "{name} {what} after the node was seen done");
            let secs = set["seconds"].as_f64().unwrap();
            assert!((secs - at.seconds_since(patched)).abs() < 0.001, "{set}");
        }
        old_seconds.insert(name.to_string(), n["oldStopped"]["seconds"].as_f64().unwrap());
    }
    // node-3's kube-proxy is slow by 1.5 s: its old set stopped last, and no earlier than that.
    assert!(old_seconds["node-3"] >= 1.5, "{old_seconds:?}");
    assert!(
        old_seconds["node-3"] > old_seconds["node-1"] && old_seconds["node-3"] > old_seconds["node-2"],
        "{old_seconds:?}"
    );
    // The table shows the same, with '-' for the connections not measured yet.
    let run = cli(
        &kc,
        &[
            "switch",
            "web",
            "-n",
            "demo",
            "--selector",
            "app=web",
            "--timeout",
            "25s",
        ],
    )
    .await;
    assert_eq!(run.code, Some(0), "stdout:\n{}\nstderr:\n{}", run.stdout, run.stderr);
    eprintln!("{}", run.stdout);
    assert!(run.stderr.contains("2 pod(s) leave, 3 join"), "{}", run.stderr);
    for node in NODES {
        let row = run
            .stdout
            .lines()
            .find(|l| l.starts_with(node))
            .unwrap_or_else(|| panic!("{node} missing:\n{}", run.stdout));
        let cells: Vec<&str> = row.split_whitespace().collect();
        // The last column counts the connections that still reached the old set (a number
        // from the agents' live-traffic check, "-" only when no agent reports one).
        assert_eq!(cells[1], "converged", "{row}");
        assert!(cells.last().is_some_and(|c| c.parse::<u64>().is_ok()), "{row}");
    }
    assert!(run.stdout.contains("complete on every node"), "{}", run.stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: network namespaces and kernel rules (scripts/test.sh runs it as root)"]
async fn a_cutover_to_no_ready_pod_is_refused_without_force() {
    let Some(opts) = common::sim_options(ProxyMode::Iptables, 3, &[]) else {
        return;
    };
    let sim = SimCluster::start(&opts).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kc = kubeconfig(&sim, &dir);
    // A pod that matches but is not ready does not count.
    sim.cluster().apply(
        json!({"kind": "Pod", "metadata": {"name": "canary-0", "namespace": "demo", "labels": {"app": "canary"}},
        "spec": {"nodeName": "node-1"},
        "status": {"phase": "Running", "podIP": "10.244.1.30", "conditions": [{"type": "Ready", "status": "False"}]}}),
    );
    let run = cli(
        &kc,
        &[
            "switch",
            "web",
            "-n",
            "demo",
            "--selector",
            "app=canary",
            "--timeout",
            "10s",
        ],
    )
    .await;
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    assert!(
        run.stderr.contains("matches no ready pod")
            && run.stderr.contains("canary-0 match but are not ready")
            && run.stderr.contains("--force"),
        "{}",
        run.stderr
    );
    assert_eq!(selector(&sim), json!({"app": "web"}), "nothing was patched");
    // Bad selectors never reach the API server.
    for bad in ["app", "app=a b", "app=x,app=y", "Bad Key=x"] {
        let run = cli(&kc, &["switch", "web", "-n", "demo", "--selector", bad]).await;
        assert_eq!(run.code, Some(2), "{bad}: {}", run.stderr);
    }
    let run = cli(&kc, &["switch", "web", "-n", "demo", "--selector", "app=web"]).await;
    assert!(
        run.code != Some(0) && run.stderr.contains("already selects app=web"),
        "{}",
        run.stderr
    );
    let run = cli(&kc, &["switch", "nope", "-n", "demo", "--selector", "app=api"]).await;
    assert!(
        run.code != Some(0) && run.stderr.contains("demo/nope"),
        "{}",
        run.stderr
    );
    // With --force the cutover to nothing happens and completes once every node dropped web.
    let run = cli(
        &kc,
        &[
            "switch",
            "web",
            "-n",
            "demo",
            "--selector",
            "app=nothing",
            "--force",
            "--timeout",
            "25s",
            "-o",
            "json",
        ],
    )
    .await;
    assert_eq!(run.code, Some(0), "stdout:\n{}\nstderr:\n{}", run.stdout, run.stderr);
    let report: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(selector(&sim), json!({"app": "nothing"}));
    assert_eq!(report["newPods"], json!([]));
    for n in report["nodes"].as_array().unwrap() {
        assert_eq!(n["state"], "converged", "{n:#}");
        assert!(n["oldStopped"].is_object() && n["newComplete"].is_null(), "{n:#}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: network namespaces and kernel rules (scripts/test.sh runs it as root)"]
async fn a_timed_out_cutover_names_the_slow_node_and_rolls_back() {
    let Some(opts) = common::sim_options(ProxyMode::Iptables, 3, &[("node-3", 5000)]) else {
        return;
    };
    let sim = SimCluster::start(&opts).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kc = kubeconfig(&sim, &dir);
    let run = cli(
        &kc,
        &[
            "switch",
            "web",
            "-n",
            "demo",
            "--selector",
            "app=api",
            "--timeout",
            "2500ms",
            "--rollback-on-timeout",
        ],
    )
    .await;
    assert_eq!(run.code, Some(1), "stdout:\n{}\nstderr:\n{}", run.stdout, run.stderr);
    let err = &run.stderr;
    assert!(err.contains("timed out"), "{err}");
    assert!(
        err.contains("node-3 (lagging: still routes to the old set)")
            || err.contains("node-3 (pending: still routes to the old set)"),
        "{err}"
    );
    assert!(err.contains("rolled back: the selector is app=web again"), "{err}");
    assert_eq!(selector(&sim), json!({"app": "web"}), "the old selector is back");
    // The table still says where each node stood: the fast ones done, node-3 on the old set.
    let row = |node: &str| run.stdout.lines().find(|l| l.starts_with(node)).unwrap_or_default();
    assert!(row("node-3").contains("(old set)"), "{}", run.stdout);
    for node in ["node-1", "node-2"] {
        assert_eq!(row(node).split_whitespace().nth(1), Some("converged"), "{}", run.stdout);
    }
}
