//! `kube-converge-sim`: the README's quick start. A simulated cluster on this machine (root:
//! network namespaces), with the real agent in-process on every node.

use std::time::Duration;

use clap::Parser;
use kube_converge::config::parse_duration;

#[derive(Clone, Debug, Parser)]
#[command(
    name = "kube-converge-sim",
    version,
    about = "Run a simulated cluster (nodes as network namespaces, kube-proxy emulators, one agent per\nnode), delete and isolate a pod, and print each node's measured lag next to the truth."
)]
struct SimArgs {
    /// Number of nodes.
    #[arg(long, env = "KUBE_CONVERGE_SIM_NODES", default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=64))]
    nodes: u16,
    /// kube-proxy mode of the simulated nodes.
    #[arg(long, env = "KUBE_CONVERGE_SIM_PROXY_MODE", value_enum, default_value = "iptables")]
    proxy_mode: kc_sim::node::ProxyMode,
    /// Base delay of every node's kube-proxy before it programs a change.
    #[arg(long, env = "KUBE_CONVERGE_SIM_DELAY", value_parser = parse_duration, default_value = "100ms")]
    delay: Duration,
    /// Random extra delay per sync, up to this much.
    #[arg(long, env = "KUBE_CONVERGE_SIM_JITTER", value_parser = parse_duration, default_value = "200ms")]
    jitter: Duration,
    /// Make a node slow: NODE=DELAY, added to its base delay (repeatable; `none` for no slow
    /// node). Default: the last node, by 1s, when there are several.
    #[arg(long, env = "KUBE_CONVERGE_SIM_SLOW", value_delimiter = ',')]
    slow: Option<Vec<String>>,
    /// Grace period of the deleted pod.
    #[arg(long, env = "KUBE_CONVERGE_SIM_GRACE", value_parser = parse_duration, default_value = "5s")]
    grace: Duration,
    /// Give up waiting for convergence after this long.
    #[arg(long, env = "KUBE_CONVERGE_SIM_TIMEOUT", value_parser = parse_duration, default_value = "60s")]
    timeout: Duration,
    /// First port of the agents' /metrics on 127.0.0.1 (node-1 gets this one, node-2 the next…).
    #[arg(long, env = "KUBE_CONVERGE_SIM_METRICS_PORT", default_value_t = 9108)]
    metrics_port: u16,
    /// New connections per second each node's client opens to the demo Service (0: none);
    /// the table shows those the nodes still sent to the removed pods.
    #[arg(long, env = "KUBE_CONVERGE_SIM_TRAFFIC_RATE", default_value_t = 50, value_parser = clap::value_parser!(u32).range(0..=10000))]
    traffic_rate: u32,
    /// Keep the cluster running after the table (for dashboards), until Ctrl-C.
    #[arg(long, env = "KUBE_CONVERGE_SIM_KEEP")]
    keep: bool,
}

/// Parses `NODE=DELAY` entries of `--slow`.
fn parse_slow(entries: &[String]) -> Result<std::collections::BTreeMap<String, Duration>, String> {
    let mut out = std::collections::BTreeMap::new();
    for e in entries
        .iter()
        .map(|e| e.trim())
        .filter(|e| !e.is_empty() && *e != "none")
    {
        let (node, d) = e
            .split_once('=')
            .ok_or_else(|| format!("--slow {e:?}: expected NODE=DELAY, e.g. node-3=1s"))?;
        out.insert(node.to_string(), parse_duration(d)?);
    }
    Ok(out)
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = SimArgs::parse();
    kube_converge::telemetry::init_logging(kube_converge::telemetry::LogFormat::Text, "warn");
    match run_sim(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", kube_converge::cli::describe_error(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run_sim(args: SimArgs) -> anyhow::Result<()> {
    let opts = kc_sim::scenario::SimOptions {
        nodes: usize::from(args.nodes),
        proxy_mode: args.proxy_mode,
        delay: kc_sim::node::Delay {
            base: args.delay,
            jitter: args.jitter,
        },
        slow: {
            let nodes = usize::from(args.nodes);
            let given = args.slow.clone().unwrap_or_else(|| match nodes {
                1 => vec![],
                n => vec![format!("node-{n}=1s")],
            });
            let slow = parse_slow(&given).map_err(anyhow::Error::msg)?;
            if let Some(bad) = slow.keys().find(|n| !(1..=nodes).any(|i| **n == format!("node-{i}"))) {
                anyhow::bail!("--slow {bad}: the simulated cluster has node-1 … node-{nodes}");
            }
            slow
        },
        grace: args.grace,
        timeout: args.timeout,
        metrics_port: args.metrics_port,
        keep: args.keep,
        traffic_rate: args.traffic_rate,
        faulty_agents: false,
    };
    let keep = opts.keep;
    // Dropping the simulation on Ctrl-C removes its namespaces and stops its tasks. With
    // --keep, the simulation itself waits for Ctrl-C after printing the table.
    let report = if keep {
        kc_sim::scenario::run(opts).await?
    } else {
        tokio::select! {
            r = kc_sim::scenario::run(opts) => r?,
            _ = kube_converge::telemetry::stop_signal() => anyhow::bail!("interrupted; the simulated cluster was removed"),
        }
    };
    if !keep {
        println!("{}", report.table());
    }
    if !report.all_converged() {
        anyhow::bail!("not every node converged before the timeout (rows with '-')");
    }
    println!("every node converged; the agents' lags are never earlier than the kernel truth (AGENT - TRUTH >= 0)");
    Ok(())
}
