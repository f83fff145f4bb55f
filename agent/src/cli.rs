//! Runs the selected command: the glue between parsed configuration and the library.

use anyhow::Context;

use crate::agent::{self, AgentConfig};
use crate::config::{
    AdviseArgs, AgentArgs, BackendArg, Cli, Command, DataplaneArgs, InspectArgs, IsolateArgs, ModeArg, OutputFormat,
    RestoreArgs, StatusArgs, SwitchArgs, WaitArgs,
};
use crate::dataplane::{iptables::Backend, Mode};
use crate::k8s::WatchScope;
use crate::netns::NetNs;
use crate::telemetry::{self, Metrics};

fn mode(arg: ModeArg) -> Option<Mode> {
    match arg {
        ModeArg::Auto => None,
        ModeArg::Iptables => Some(Mode::Iptables),
        ModeArg::Nftables => Some(Mode::Nftables),
        ModeArg::Ipvs => Some(Mode::Ipvs),
    }
}

fn backend(arg: BackendArg) -> Option<Backend> {
    match arg {
        BackendArg::Auto => None,
        BackendArg::Nft => Some(Backend::Nft),
        BackendArg::Legacy => Some(Backend::Legacy),
    }
}

fn netns(args: &DataplaneArgs) -> anyhow::Result<NetNs> {
    Ok(match &args.netns {
        Some(p) => NetNs::open(p)?,
        None => NetNs::current(),
    })
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let cluster = ClusterArgs {
        kubeconfig: cli.kubeconfig.clone(),
        context: cli.context.clone(),
    };
    let quiet = !matches!(cli.command, Command::Agent(_));
    telemetry::init_logging(cli.log_format, if quiet { "warn" } else { "info" });
    match cli.command {
        Command::Agent(args) => run_agent(args, &cluster).await,
        Command::Inspect(args) => run_inspect(args).await,
        Command::Crd => {
            print!("{}", crate::crd::crd_yaml());
            Ok(())
        }
        Command::Isolate(args) => run_isolate(args, &cluster).await,
        Command::Restore(args) => run_restore(args, &cluster).await,
        Command::Status(args) => run_status(args, &cluster).await,
        Command::Advise(args) => run_advise(args, &cluster).await,
        Command::Switch(args) => run_switch(args, &cluster).await,
    }
}

async fn run_agent(args: AgentArgs, cluster: &ClusterArgs) -> anyhow::Result<()> {
    if args.node_name.trim().is_empty() {
        anyhow::bail!("--node-name (or NODE_NAME) is empty; set it from the downward API (spec.nodeName)");
    }
    let metrics = Metrics::new().context("registering metrics")?;
    let config = AgentConfig {
        node_name: args.node_name,
        scope: WatchScope {
            namespace: args.namespace,
            label_selector: args.label_selector,
        },
        mode: mode(args.dataplane.mode),
        backend: backend(args.dataplane.iptables_backend),
        netns: netns(&args.dataplane)?,
        poll_interval: args.poll_interval,
        resync_interval: args.resync_interval,
        change_timeout: args.change_timeout,
        listen: args.listen,
        observer: None,
        status: args.publish_status.then_some(crate::agent::StatusConfig {
            status_interval: args.status_interval,
            heartbeat_interval: args.heartbeat_interval,
            budget_interval: args.status_budget,
            burst: args.status_burst,
        }),
        max_holds: args.max_holds,
        traffic_window: args.traffic_window,
        fault_report_removals_early: false,
    };
    agent::run(cluster_client(cluster).await?, config, metrics).await
}

async fn run_inspect(args: InspectArgs) -> anyhow::Result<()> {
    let (m, b, ns) = (
        mode(args.dataplane.mode),
        backend(args.dataplane.iptables_backend),
        netns(&args.dataplane)?,
    );
    let frontends: std::collections::BTreeSet<String> = args.frontends.into_iter().collect();
    let report = tokio::task::spawn_blocking(move || match frontends.is_empty() {
        true => crate::inspect::inspect(m, b, &ns),
        false => crate::inspect::inspect_frontends(m, b, &ns, &frontends),
    })
    .await?
    .context("reading the dataplane")?;
    match args.output {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        OutputFormat::Table => print!("{}", report.to_table()),
    }
    Ok(())
}

/// An error as one line of sentences: each cause in turn, the API server's answers by their
/// message and reason (never the `Status { … }` structure).
pub fn describe_error(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let text = match cause.downcast_ref::<kube::Error>() {
            Some(kube::Error::Api(s)) => {
                let reason = if s.reason.is_empty() {
                    "no reason"
                } else {
                    s.reason.as_str()
                };
                // Its only cause is the same Status: nothing more to say.
                parts.push(format!(
                    "the API server refused: {} ({reason}, HTTP {})",
                    s.message.trim(),
                    s.code
                ));
                break;
            }
            _ => cause.to_string(),
        };
        // kube's errors repeat their cause in their own text; keep each piece once.
        if !parts.iter().any(|p| p.contains(text.as_str())) {
            parts.push(text);
        }
    }
    parts.join(": ")
}

/// Where the CLI finds the cluster: kubectl's `--kubeconfig` and `--context`.
#[derive(Clone, Debug, Default)]
struct ClusterArgs {
    kubeconfig: Option<std::path::PathBuf>,
    context: Option<String>,
}

async fn cluster_client(cluster: &ClusterArgs) -> anyhow::Result<kube::Client> {
    let options = kube::config::KubeConfigOptions {
        context: cluster.context.clone(),
        ..Default::default()
    };
    let config = match (&cluster.kubeconfig, &cluster.context) {
        (Some(path), _) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading the kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &options)
                .await
                .with_context(|| format!("using the kubeconfig {}", path.display()))?
        }
        (None, Some(context)) => kube::Config::from_kubeconfig(&options)
            .await
            .with_context(|| format!("using context {context:?} of the kubeconfig (KUBECONFIG or ~/.kube/config)"))?,
        (None, None) => kube::Config::infer().await.context(
            "finding the cluster (KUBECONFIG, ~/.kube/config or in-cluster config): check that one is present and valid",
        )?,
    };
    kube::Client::try_from(config).context("building the Kubernetes client")
}

fn hold_options(w: &WaitArgs) -> crate::hold::HoldOptions {
    crate::hold::HoldOptions {
        timeout: w.timeout,
        stale_after: w.stale_after,
        skip_stale_after: w.skip_stale_after,
        skip_not_ready: w.skip_not_ready,
        ..Default::default()
    }
}

fn finish(report: &crate::hold::HoldReport, what: &str) -> anyhow::Result<()> {
    print!("{}", report.table());
    if report.converged {
        println!("{what} converged on every node after {:.1}s", report.waited_seconds);
        Ok(())
    } else {
        anyhow::bail!(
            "timed out after {:.0}s; still waiting on: {}",
            report.waited_seconds,
            report.waiting_on().join(", ")
        )
    }
}

async fn run_isolate(args: IsolateArgs, cluster: &ClusterArgs) -> anyhow::Result<()> {
    use crate::isolate::Relabel;
    let client = cluster_client(cluster).await?;
    let ns = args
        .namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_string());
    let relabel = match (&args.label, &args.remove_label) {
        (Some(l), _) => {
            let (k, v) = l
                .split_once('=')
                .context("--label takes KEY=VALUE, e.g. app=test-offline")?;
            Relabel::Set(k.into(), v.into())
        }
        (None, Some(k)) => Relabel::Remove(k.clone()),
        (None, None) => Relabel::Default,
    };
    let mut progress = crate::isolate::Progress::default();
    let report = crate::isolate::isolate(
        &client,
        &ns,
        &args.pod,
        relabel,
        args.force,
        &hold_options(&args.wait),
        &mut progress,
    )
    .await?;
    finish(&report, &format!("isolation of {ns}/{}", args.pod))?;
    if args.delete {
        crate::isolate::delete_pod(&client, &ns, &args.pod).await?;
        println!("deleted pod {ns}/{}", args.pod);
    }
    Ok(())
}

async fn run_restore(args: RestoreArgs, cluster: &ClusterArgs) -> anyhow::Result<()> {
    let client = cluster_client(cluster).await?;
    let ns = args
        .namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_string());
    let mut progress = crate::isolate::Progress::default();
    let report = crate::isolate::restore(&client, &ns, &args.pod, &hold_options(&args.wait), &mut progress).await?;
    finish(&report, &format!("restore of {ns}/{}", args.pod))
}

async fn run_switch(args: SwitchArgs, cluster: &ClusterArgs) -> anyhow::Result<()> {
    use crate::switch::{selector_text, SwitchRequest};
    let client = cluster_client(cluster).await?;
    let ns = args
        .namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_string());
    let req = SwitchRequest {
        namespace: ns.clone(),
        service: args.service.clone(),
        selector: crate::switch::selector_map(&args.selector),
        force: args.force,
        rollback_on_timeout: args.rollback_on_timeout,
    };
    let mut progress = crate::isolate::Progress::default();
    let report = crate::switch::switch(&client, &req, &hold_options(&args.wait), &mut progress).await?;
    match args.output {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        OutputFormat::Table => print!("{}", report.table()),
    }
    let what = format!("Service {ns}/{} to {}", args.service, selector_text(&req.selector));
    if report.complete {
        if args.output == OutputFormat::Table {
            println!(
                "cutover of {what} complete on every node after {:.1}s",
                report.waited_seconds
            );
        }
        return Ok(());
    }
    let rolled_back = if report.rolled_back {
        format!(
            "; rolled back: the selector is {} again",
            selector_text(&report.old_selector)
        )
    } else {
        String::new()
    };
    let api = if report.changed_in_api {
        ""
    } else {
        " (the API does not show the change yet: is the EndpointSlice controller running?)"
    };
    anyhow::bail!(
        "cutover of {what} timed out after {:.0}s{api}; still waiting on: {}{rolled_back}",
        report.waited_seconds,
        report.waiting_on().join(", ")
    )
}

async fn run_status(args: StatusArgs, cluster: &ClusterArgs) -> anyhow::Result<()> {
    let client = cluster_client(cluster).await?;
    match args.pod {
        None => print!("{}", crate::isolate::status_table(&client).await?),
        Some(pod) => {
            let ns = args
                .namespace
                .clone()
                .unwrap_or_else(|| client.default_namespace().to_string());
            let target = crate::hold::HoldTarget {
                namespace: ns,
                pod: Some(pod),
                ..Default::default()
            };
            let opts = crate::hold::HoldOptions {
                timeout: std::time::Duration::ZERO,
                ..Default::default()
            };
            let report = crate::hold::hold_until_converged(&client, &target, &opts, |_| {}).await?;
            print!("{}", report.table());
            if !report.converged {
                // A script asking "is it safe yet?" gets its answer from the exit code too.
                anyhow::bail!(
                    "not converged everywhere; waiting on: {}",
                    report.waiting_on().join(", ")
                );
            }
            println!("converged everywhere");
        }
    }
    Ok(())
}

async fn run_advise(args: AdviseArgs, cluster: &ClusterArgs) -> anyhow::Result<()> {
    use crate::advise::LagSource;
    let client = cluster_client(cluster).await?;
    let source = match args.prometheus {
        Some(url) => LagSource::Prometheus {
            url,
            window: args.prometheus_window,
        },
        None => LagSource::NodeConvergences,
    };
    let report = crate::advise::advise(&client, args.namespace.as_deref(), &source).await?;
    if let Some(why) = &report.no_data_reason {
        eprintln!("warning: no measured lag, every verdict is no-data (holds excepted): {why}");
    }
    match args.output {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        OutputFormat::Table => print!("{}", report.to_table()),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_errors_read_as_sentences_not_status_dumps() {
        let status: kube::core::Status = serde_json::from_value(serde_json::json!({
            "status": "Failure", "message": "pods \"web-9\" not found", "reason": "NotFound", "code": 404,
            "details": {"name": "web-9", "kind": "pods"}
        }))
        .unwrap();
        let e = anyhow::Error::new(kube::Error::Api(Box::new(status))).context("reading pod demo/web-9");
        let text = describe_error(&e);
        assert_eq!(
            text,
            "reading pod demo/web-9: the API server refused: pods \"web-9\" not found (NotFound, HTTP 404)"
        );
        assert!(!text.contains("Status {") && !text.contains("ErrorResponse"), "{text}");
        let plain = anyhow::anyhow!("no kube-proxy rules found").context("inspect");
        assert_eq!(describe_error(&plain), "inspect: no kube-proxy rules found");
    }
}
