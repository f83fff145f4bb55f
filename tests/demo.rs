//! `kc-real-demo`: the `sim` demo on the real components. It needs root and
//! `scripts/k8s-build.sh`. It starts a real kube-apiserver, kube-controller-manager and
//! kube-proxy v1.37.2, one node per mode (iptables-nft, iptables-legacy, nftables), each with
//! an agent. It deletes one pod and isolates another, then prints every node's measured lag
//! next to the kernel's nf_tables commit. `--keep` leaves the cluster up for kubectl,
//! `isolate` and holds until Ctrl-C; the kubeconfig is printed.
//!
//!     cargo build --release && sudo cargo run --release -p kc-real-cluster --bin kc-real-demo -- [--keep]

use std::process::ExitCode;
use std::time::Duration;

use kc_real_cluster::world::{create_pod, create_service, delete_pod, start, wait_programmed, World, NS};
use kube::api::Api;
use kube_converge::crd::NodeConvergence;
use kube_converge::model::Timestamp;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!("usage: kc-real-demo [--keep]\n\nThe sim's demo on real kube-apiserver, kube-controller-manager and kube-proxy v1.37.2.\n  --keep  leave the cluster running until Ctrl-C (prints its kubeconfig)");
        return ExitCode::SUCCESS;
    }
    if let Some(bad) = args.iter().find(|a| *a != "--keep") {
        eprintln!("kc-real-demo: unknown argument {bad:?} (try --help)");
        return ExitCode::from(2);
    }
    let keep = args.iter().any(|a| a == "--keep");
    let missing = kc_real_cluster::missing_prerequisites();
    if !missing.is_empty() {
        eprintln!("kc-real-demo needs: {}", missing.join("; "));
        return ExitCode::from(2);
    }
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    let result = rt.block_on(demo(keep));
    rt.shutdown_timeout(std::time::Duration::from_secs(5));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kc-real-demo: {e:#}");
            ExitCode::FAILURE
        }
    }
}

struct Row {
    node: String,
    mode: &'static str,
    ip: String,
    change: String,
    lag: f64,
    e2e: Option<f64>,
    /// t_programmed minus the node's last nf_tables commit before it, in ms.
    after_commit_ms: Option<f64>,
}

async fn rows(w: &mut World, ip: &str, what: &str, since: Timestamp) -> anyhow::Result<Vec<Row>> {
    let at = wait_programmed(w, ip, "removed", since).await?;
    let ncs: Api<NodeConvergence> = Api::all(w.cluster.admin.clone());
    let list = ncs.list(&Default::default()).await?;
    let mut out = Vec::new();
    for (node, t) in w.nodes.iter().zip(&at) {
        let entry = list
            .items
            .iter()
            .filter(|nc| nc.spec.node_name == node.name)
            .filter_map(|nc| nc.status.as_ref())
            .flat_map(|s| s.recent.iter())
            .find(|r| r.ip == ip && r.change == "removed" && Timestamp::parse_rfc3339(&r.programmed_time) == Some(*t));
        let commit = node
            .mode
            .event_driven()
            .then(|| {
                node.commits_between(since, t.plus(Duration::from_millis(3)))
                    .last()
                    .copied()
            })
            .flatten();
        out.push(Row {
            node: node.name.clone(),
            mode: node.mode.name(),
            ip: ip.to_string(),
            change: format!("removed ({what})"),
            lag: entry.map(|e| e.lag_seconds).unwrap_or(f64::NAN),
            e2e: entry.and_then(|e| e.end_to_end_seconds),
            after_commit_ms: commit.map(|c| (t.as_nanos() - c.as_nanos()) as f64 / 1e6),
        });
    }
    Ok(out)
}

async fn demo(keep: bool) -> anyhow::Result<()> {
    eprintln!("starting etcd, kube-apiserver, kube-controller-manager and 3 nodes with kube-proxy v1.37.2 …");
    let mut w = start().await?;
    w.cluster.keep = keep;
    create_service(&w, "web", serde_json::json!({"app": "web"})).await?;
    let t0 = Timestamp::now();
    let mut ips = Vec::new();
    for i in 0..3 {
        ips.push(create_pod(&w, &format!("web-{i}"), serde_json::json!({"app": "web"}), i, 30).await?);
    }
    for ip in &ips {
        wait_programmed(&mut w, ip, "added", t0).await?;
    }
    eprintln!("demo/web has 3 endpoints on every node; deleting web-0, then isolating web-1");
    let t1 = Timestamp::now();
    delete_pod(&w, "web-0", Some(5)).await?;
    let mut table = rows(&mut w, &ips[0], "deleted", t1).await?;
    let t2 = Timestamp::now();
    let out = tokio::process::Command::new(&w.agent)
        .arg(format!("--kubeconfig={}", w.operator.display()))
        .args(["isolate", "web-1", "-n", NS, "--timeout", "90s"])
        .output()
        .await?;
    anyhow::ensure!(
        out.status.success(),
        "isolate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    table.extend(rows(&mut w, &ips[1], "isolated", t2).await?);
    println!(
        "{:<7} {:<16} {:<30} {:<19} {:>9} {:>9} {:>22}",
        "NODE", "KUBE-PROXY", "ENDPOINT", "CHANGE", "AGENT LAG", "AGENT E2E", "AGENT - KERNEL COMMIT"
    );
    for r in &table {
        let secs = |v: f64| {
            if v.is_nan() {
                "-".to_string()
            } else {
                format!("{v:.3}s")
            }
        };
        println!(
            "{:<7} {:<16} {:<30} {:<19} {:>9} {:>9} {:>22}",
            r.node,
            r.mode,
            format!("demo/web:http {}:8080", r.ip),
            r.change,
            secs(r.lag),
            r.e2e.map(secs).unwrap_or_else(|| "-".into()),
            r.after_commit_ms
                .map(|m| format!("{m:+.2} ms"))
                .unwrap_or_else(|| "(polled)".into())
        );
    }
    println!("every node converged; AGENT - KERNEL COMMIT is the agent's t_programmed minus the nf_tables commit its kernel announced");
    if keep {
        let kc = w.cluster.admin_kubeconfig();
        println!("\nThe cluster stays up until Ctrl-C. Try:");
        println!("  export KUBECONFIG={}", kc.display());
        println!("  {} get nodeconvergences", w.cluster.bin.join("kubectl").display());
        println!("  {} isolate web-2 -n {NS}", w.agent.display());
        println!("  {} status", w.agent.display());
        for n in &w.nodes {
            println!(
                "  curl '{}'   # {} ({})",
                n.agent_url(&format!("/v1/hold?namespace={NS}&pod=web-2&timeout=30s")),
                n.name,
                n.mode.name()
            );
        }
        tokio::signal::ctrl_c().await?;
        w.cluster.keep = false;
    }
    Ok(())
}
