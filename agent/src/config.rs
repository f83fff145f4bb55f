//! Command-line and environment configuration (clap derive; every flag has an `env`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::telemetry::LogFormat;

#[derive(Debug, Parser)]
#[command(
    name = "kube-converge",
    version,
    about = "When does traffic to a removed pod actually stop, on every node?"
)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(
        long,
        env = "KUBE_CONVERGE_LOG_FORMAT",
        value_enum,
        default_value = "text",
        global = true
    )]
    pub log_format: LogFormat,
    /// The kubeconfig file for `agent`, `isolate`, `restore`, `status`, `switch` and `advise`
    /// (default: KUBECONFIG, ~/.kube/config, or the in-cluster config), as kubectl's
    /// `--kubeconfig`.
    #[arg(long, global = true)]
    pub kubeconfig: Option<std::path::PathBuf>,
    /// The kubeconfig context to use, as kubectl's `--context`.
    #[arg(long, global = true)]
    pub context: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the node agent: watch EndpointSlices, read the dataplane, export lags.
    Agent(AgentArgs),
    /// Show what this node's kube-proxy dataplane routes right now, read from the kernel.
    Inspect(InspectArgs),
    /// Print the NodeConvergence CustomResourceDefinition (YAML).
    Crd,
    /// Relabel a pod out of its Services and wait until every node stopped routing to it.
    Isolate(IsolateArgs),
    /// Put back the labels `isolate` changed and wait until every node routes to the pod again.
    Restore(RestoreArgs),
    /// Show every node's convergence state, or one pod's.
    Status(StatusArgs),
    /// Set each workload's preStop and grace period beside the measured removal lag: a verdict
    /// and the hold that replaces a guessed sleep.
    Advise(AdviseArgs),
    /// Blue/green cutover: change a Service's selector and wait until every node routes only
    /// to the new set of pods.
    Switch(SwitchArgs),
}

#[derive(Clone, Debug, Args)]
pub struct WaitArgs {
    /// Give up after this long (exit non-zero).
    #[arg(long, env = "KUBE_CONVERGE_TIMEOUT", value_parser = parse_duration, default_value = "2m")]
    pub timeout: Duration,
    /// A node whose agent heartbeat is older than this is stale.
    #[arg(long, env = "KUBE_CONVERGE_STALE_AFTER", value_parser = parse_duration, default_value = "90s")]
    pub stale_after: Duration,
    /// Stop waiting for stale nodes, nodes without an agent and nodes whose agent does not
    /// watch the pod's Services after this long (default: wait).
    #[arg(long, env = "KUBE_CONVERGE_SKIP_STALE_AFTER", value_parser = parse_duration)]
    pub skip_stale_after: Option<Duration>,
    /// Do not wait for nodes that are not Ready (default: wait; a partitioned node keeps its
    /// old rules and may still route to the pod).
    #[arg(long, env = "KUBE_CONVERGE_SKIP_NOT_READY")]
    pub skip_not_ready: bool,
}

#[derive(Clone, Debug, Args)]
pub struct IsolateArgs {
    /// The pod to isolate.
    pub pod: String,
    /// Its namespace (default: the kubeconfig context's).
    #[arg(short, long, env = "KUBE_CONVERGE_NAMESPACE")]
    pub namespace: Option<String>,
    /// Set this label (KEY=VALUE), e.g. app=test-offline. Default: the first selector key of the
    /// pod's first Service, with "-offline" appended to its value.
    #[arg(long, conflicts_with = "remove_label", value_parser = parse_label)]
    pub label: Option<String>,
    /// Remove this label instead.
    #[arg(long, value_parser = parse_label_key)]
    pub remove_label: Option<String>,
    /// Isolate the pod even when it is the last ready endpoint of one of its Services (that
    /// takes the Service down).
    #[arg(long)]
    pub force: bool,
    /// Delete the pod once every node has converged.
    #[arg(long)]
    pub delete: bool,
    #[command(flatten)]
    pub wait: WaitArgs,
}

#[derive(Clone, Debug, Args)]
pub struct RestoreArgs {
    /// The pod `isolate` relabelled.
    pub pod: String,
    /// Its namespace (default: the kubeconfig context's).
    #[arg(short, long, env = "KUBE_CONVERGE_NAMESPACE")]
    pub namespace: Option<String>,
    #[command(flatten)]
    pub wait: WaitArgs,
}

#[derive(Clone, Debug, Args)]
pub struct SwitchArgs {
    /// The Service whose selector changes.
    pub service: String,
    /// Its namespace (default: the kubeconfig context's).
    #[arg(short, long, env = "KUBE_CONVERGE_NAMESPACE")]
    pub namespace: Option<String>,
    /// The new selector, KEY=VALUE[,KEY=VALUE...] (it replaces the old one), e.g. track=green.
    #[arg(long, value_parser = parse_selector)]
    pub selector: String,
    /// Switch even when the new selector matches no ready pod (that takes the Service down).
    #[arg(long)]
    pub force: bool,
    /// On timeout, put the old selector back (the exit code stays non-zero).
    #[arg(long)]
    pub rollback_on_timeout: bool,
    /// Output format of the per-node result.
    #[arg(short = 'o', long, env = "KUBE_CONVERGE_OUTPUT", value_enum, default_value = "table")]
    pub output: OutputFormat,
    #[command(flatten)]
    pub wait: WaitArgs,
}

#[derive(Clone, Debug, Args)]
pub struct StatusArgs {
    /// Show this pod's convergence on every node instead of the node summary.
    pub pod: Option<String>,
    #[arg(short, long, env = "KUBE_CONVERGE_NAMESPACE")]
    pub namespace: Option<String>,
}

#[derive(Clone, Debug, Args)]
pub struct AdviseArgs {
    /// Only workloads in this namespace (default: every namespace).
    #[arg(short, long, env = "KUBE_CONVERGE_NAMESPACE")]
    pub namespace: Option<String>,
    /// Take the lag quantiles from this Prometheus (http://HOST:PORT[/PREFIX]), which scrapes
    /// the agents, instead of the NodeConvergence objects (whose p99.9 is only an estimate).
    #[arg(long, env = "KUBE_CONVERGE_PROMETHEUS")]
    pub prometheus: Option<String>,
    /// The range of the Prometheus queries (a PromQL duration).
    #[arg(long, env = "KUBE_CONVERGE_PROMETHEUS_WINDOW", default_value = "7d", value_parser = crate::advise::parse_promql_window)]
    pub prometheus_window: String,
    /// Output format (`json`: stable field names, see the README).
    #[arg(short = 'o', long, env = "KUBE_CONVERGE_OUTPUT", value_enum, default_value = "table")]
    pub output: OutputFormat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    Auto,
    Iptables,
    Nftables,
    Ipvs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BackendArg {
    Auto,
    Nft,
    Legacy,
}

#[derive(Clone, Debug, Args)]
pub struct DataplaneArgs {
    /// kube-proxy's mode; `auto` detects it from the kernel.
    #[arg(long, env = "KUBE_CONVERGE_MODE", value_enum, default_value = "auto")]
    pub mode: ModeArg,
    /// iptables backend; `auto` picks the one holding kube-proxy's chains.
    #[arg(long, env = "KUBE_CONVERGE_IPTABLES_BACKEND", value_enum, default_value = "auto")]
    pub iptables_backend: BackendArg,
    /// Read the dataplane of another network namespace (e.g. /run/netns/NAME).
    #[arg(long, env = "KUBE_CONVERGE_NETNS")]
    pub netns: Option<PathBuf>,
}

#[derive(Clone, Debug, Args)]
pub struct AgentArgs {
    /// This node's name, as in EndpointSlice `nodeName`.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// Watch only this namespace (default: all).
    #[arg(long, env = "KUBE_CONVERGE_NAMESPACE")]
    pub namespace: Option<String>,
    /// Watch only Services and EndpointSlices matching this label selector.
    #[arg(long, env = "KUBE_CONVERGE_LABEL_SELECTOR", value_parser = parse_label_selector)]
    pub label_selector: Option<String>,
    #[command(flatten)]
    pub dataplane: DataplaneArgs,
    /// Poll interval where the kernel does not notify (iptables-legacy), while changes are pending.
    #[arg(long, env = "KUBE_CONVERGE_POLL_INTERVAL", value_parser = parse_interval, default_value = "1s")]
    pub poll_interval: Duration,
    /// Full re-read interval when nothing is pending (safety net and stale-endpoint check).
    #[arg(long, env = "KUBE_CONVERGE_RESYNC_INTERVAL", value_parser = parse_interval, default_value = "30s")]
    pub resync_interval: Duration,
    /// A change pending longer than this is reported timed out (it stays tracked).
    #[arg(long, env = "KUBE_CONVERGE_CHANGE_TIMEOUT", value_parser = parse_interval, default_value = "5m")]
    pub change_timeout: Duration,
    /// At most one NodeConvergence status write per this interval while the state changes.
    #[arg(long, env = "KUBE_CONVERGE_STATUS_INTERVAL", value_parser = parse_interval, default_value = "1s")]
    pub status_interval: Duration,
    /// A heartbeat status write when nothing changes.
    #[arg(long, env = "KUBE_CONVERGE_HEARTBEAT_INTERVAL", value_parser = parse_interval, default_value = "30s")]
    pub heartbeat_interval: Duration,
    /// Sustained status-write budget: on average one write per this interval (node leases: 10s).
    #[arg(long, env = "KUBE_CONVERGE_STATUS_BUDGET", value_parser = parse_interval, default_value = "10s")]
    pub status_budget: Duration,
    /// Writes allowed in a burst at --status-interval before the budget applies.
    #[arg(long, env = "KUBE_CONVERGE_STATUS_BURST", default_value_t = 10)]
    pub status_burst: u32,
    /// Publish this node's NodeConvergence status (needed by holds and `isolate`).
    #[arg(long, env = "KUBE_CONVERGE_PUBLISH_STATUS", default_value_t = true, action = clap::ArgAction::Set)]
    pub publish_status: bool,
    /// Count new connections that still reach a removed endpoint (conntrack events), while its
    /// removal is pending and for this long after it converged; `0s` turns the check off.
    #[arg(long, env = "KUBE_CONVERGE_TRAFFIC_WINDOW", value_parser = parse_duration, default_value = "60s")]
    pub traffic_window: Duration,
    /// Concurrent /v1/hold requests served at most (more get 429).
    #[arg(long, env = "KUBE_CONVERGE_MAX_HOLDS", value_parser = parse_positive, default_value = "64")]
    pub max_holds: usize,
    /// Address of the HTTP server for /metrics, /healthz, /readyz and /v1/hold.
    #[arg(long, env = "KUBE_CONVERGE_LISTEN", default_value = "0.0.0.0:9108")]
    pub listen: SocketAddr,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Json,
    Table,
}

#[derive(Clone, Debug, Args)]
pub struct InspectArgs {
    #[command(flatten)]
    pub dataplane: DataplaneArgs,
    /// Only what serves this frontend (`IP:PORT`, `[IPv6]:PORT`, or `*:NODEPORT`); repeatable.
    /// nftables and IPVS then read just those service ports from the kernel (cheap on a large
    /// node); iptables reads in full and filters.
    #[arg(long = "frontend", value_name = "IP:PORT", value_parser = parse_frontend)]
    pub frontends: Vec<String>,
    /// Output format.
    #[arg(short = 'o', long, env = "KUBE_CONVERGE_OUTPUT", value_enum, default_value = "table")]
    pub output: OutputFormat,
}

/// Parses a frontend as the readers name them: `10.96.0.10:80`, `[fd00::a]:53`, `*:30080`.
pub fn parse_frontend(s: &str) -> Result<String, String> {
    let s = s.trim();
    if let Some(port) = s.strip_prefix("*:") {
        return match port.parse::<u16>() {
            Ok(p) if p > 0 => Ok(format!("*:{p}")),
            _ => Err(format!(
                "invalid NodePort frontend {s:?}: expected *:PORT with PORT 1-65535"
            )),
        };
    }
    match s.parse::<std::net::SocketAddr>() {
        Ok(a) if a.port() > 0 => Ok(a.to_string()),
        _ => Err(format!(
            "invalid frontend {s:?}: expected IP:PORT, [IPv6]:PORT or *:NODEPORT (e.g. 10.96.0.10:80)"
        )),
    }
}

/// Parses `250ms`, `1s`, `5m`, `1h` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: expected e.g. 500ms, 1s, 5m"))?;
    let secs = match unit {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(format!("invalid duration unit {unit:?} in {s:?}: use ms, s, m or h")),
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("invalid duration {s:?}"));
    }
    // Nothing here needs more than a week; larger values are typos (and past u64 seconds they
    // would not even fit a Duration).
    if secs > MAX_DURATION.as_secs_f64() {
        return Err(format!("duration {s:?} is too long: at most 168h"));
    }
    Duration::try_from_secs_f64(secs).map_err(|e| format!("invalid duration {s:?}: {e}"))
}

/// The longest duration any flag or parameter takes.
pub const MAX_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);

/// A duration that must not be zero (an interval: zero would spin).
pub fn parse_interval(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        d if d.is_zero() => Err(format!("{s:?} is zero: an interval must be positive, e.g. 1s")),
        d => Ok(d),
    }
}

/// A count that must be at least 1.
pub fn parse_positive(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("{s:?} is not a whole number")),
    }
}

/// One part of a label key, or a label value: at most 63 characters, alphanumerics with `-`,
/// `_` and `.` inside (Kubernetes' qualified name).
fn is_label_name(s: &str) -> bool {
    let ok = |c: char| c.is_ascii_alphanumeric();
    s.len() <= 63
        && s.chars().next().is_some_and(ok)
        && s.chars().last().is_some_and(ok)
        && s.chars().all(|c| ok(c) || matches!(c, '-' | '_' | '.'))
}

/// A label key as the API server accepts it: `[PREFIX/]NAME`, PREFIX a DNS subdomain.
pub fn parse_label_key(s: &str) -> Result<String, String> {
    let (prefix, name) = match s.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, s),
    };
    let prefix_ok = prefix.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                    && !l.starts_with('-')
                    && !l.ends_with('-')
            })
    });
    if prefix_ok && is_label_name(name) {
        Ok(s.to_string())
    } else {
        Err(format!(
            "{s:?} is not a label key: [PREFIX/]NAME, NAME at most 63 characters of letters, digits, '-', '_' and '.', starting and ending with a letter or digit"
        ))
    }
}

/// `KEY=VALUE` with a valid key and value (the value may be empty).
pub fn parse_label(s: &str) -> Result<String, String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected KEY=VALUE, e.g. app=test-offline"))?;
    parse_label_key(k)?;
    if !v.is_empty() && !is_label_name(v) {
        return Err(format!(
            "{v:?} is not a label value: at most 63 characters of letters, digits, '-', '_' and '.', starting and ending with a letter or digit"
        ));
    }
    Ok(s.to_string())
}

/// A Service selector: `KEY=VALUE[,KEY=VALUE...]`, each a valid label, no key twice.
pub fn parse_selector(s: &str) -> Result<String, String> {
    let mut keys = std::collections::BTreeSet::new();
    for part in s.split(',') {
        let label = parse_label(part.trim())?;
        let key = label.split_once('=').map_or(label.as_str(), |(k, _)| k).to_string();
        if !keys.insert(key.clone()) {
            return Err(format!("{s:?} names {key:?} twice: a selector has one value per key"));
        }
    }
    Ok(s.split(',').map(str::trim).collect::<Vec<_>>().join(","))
}

/// A label selector the API server would accept (kube-proxy's own terms are added to it).
pub fn parse_label_selector(s: &str) -> Result<String, String> {
    crate::selector::LabelSelector::parse(s).map(|_| s.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_checked_before_anything_is_patched() {
        assert_eq!(parse_label("app=test-offline"), Ok("app=test-offline".into()));
        assert_eq!(
            parse_label("example.com/track=blue"),
            Ok("example.com/track=blue".into())
        );
        assert!(parse_label("app=").is_ok(), "an empty value is a valid label value");
        for bad in [
            "=x",
            "app",
            "app=bad value",
            "a/b/c=x",
            "-app=x",
            "app=x-",
            "Example.COM/x=y",
            "/x=y",
        ] {
            assert!(parse_label(bad).is_err(), "{bad:?} accepted");
        }
        assert!(parse_label(&format!("app={}", "v".repeat(64))).is_err());
        assert_eq!(parse_label_key("app"), Ok("app".into()));
        assert!(parse_label_key("").is_err());
        assert!(parse_label_key("bad key").is_err());
    }

    #[test]
    fn switch_selectors_are_checked_before_anything_is_patched() {
        assert_eq!(parse_selector("track=green"), Ok("track=green".into()));
        assert_eq!(
            parse_selector("app=web, example.com/track=green"),
            Ok("app=web,example.com/track=green".into())
        );
        for bad in [
            "",
            "track",
            "track=green,",
            "track=gr een",
            "a=1,a=2",
            "in(x)",
            "app!=web",
        ] {
            assert!(parse_selector(bad).is_err(), "{bad:?} accepted");
        }
        let cli = Cli::try_parse_from([
            "kube-converge",
            "switch",
            "web",
            "-n",
            "demo",
            "--selector",
            "track=green",
            "--timeout",
            "30s",
            "--rollback-on-timeout",
            "-o",
            "json",
        ])
        .unwrap();
        let Command::Switch(a) = cli.command else {
            panic!("not switch")
        };
        assert_eq!((a.service.as_str(), a.selector.as_str()), ("web", "track=green"));
        assert!(a.rollback_on_timeout && !a.force && a.output == OutputFormat::Json);
        assert_eq!(a.wait.timeout, Duration::from_secs(30));
        let err = Cli::try_parse_from(["kube-converge", "switch", "web", "--selector", "bad key=x"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(
            Cli::try_parse_from(["kube-converge", "switch", "web"]).is_err(),
            "--selector is required"
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5d").is_err());
    }

    #[test]
    fn frontends_are_named_as_the_readers_name_them() {
        assert_eq!(parse_frontend("10.96.0.10:80"), Ok("10.96.0.10:80".into()));
        assert_eq!(parse_frontend("[FD00::A]:53"), Ok("[fd00::a]:53".into()));
        assert_eq!(parse_frontend(" *:30080 "), Ok("*:30080".into()));
        for bad in ["10.96.0.10", "10.96.0.10:0", "*:70000", "web:80", "fd00::a:53", ""] {
            assert!(parse_frontend(bad).is_err(), "{bad:?}");
        }
        let cli = Cli::try_parse_from([
            "kube-converge",
            "inspect",
            "--frontend",
            "10.96.0.10:80",
            "--frontend",
            "*:30080",
        ])
        .unwrap();
        let Command::Inspect(i) = cli.command else {
            panic!("not inspect")
        };
        assert_eq!(i.frontends, ["10.96.0.10:80", "*:30080"]);
        assert!(Cli::try_parse_from(["kube-converge", "inspect", "--frontend", "nope"]).is_err());
    }

    /// Issue 17: configuration that cannot work is refused at start (clap exits 2), and an
    /// absurd duration is an error, not a panic.
    #[test]
    fn absurd_flags_are_refused() {
        assert!(parse_duration("99999999999999999999s").is_err());
        assert!(parse_duration("169h").is_err());
        assert_eq!(parse_duration("168h"), Ok(MAX_DURATION));
        for bad in [
            &["--poll-interval", "0s"][..],
            &["--resync-interval", "0"],
            &["--poll-interval", "99999999999999999999s"],
            &["--max-holds", "0"],
            &["--label-selector", "app in (x"],
        ] {
            let mut args = vec!["kube-converge", "agent", "--node-name", "n1"];
            args.extend_from_slice(bad);
            let err = Cli::try_parse_from(&args).map(|_| ()).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{bad:?}");
        }
    }

    #[test]
    fn cli_parses_agent_flags() {
        let cli = Cli::try_parse_from([
            "kube-converge",
            "agent",
            "--node-name",
            "n1",
            "--poll-interval",
            "200ms",
        ])
        .unwrap();
        let Command::Agent(a) = cli.command else {
            panic!("not agent")
        };
        assert_eq!(
            (a.node_name.as_str(), a.poll_interval),
            ("n1", Duration::from_millis(200))
        );
    }
}
