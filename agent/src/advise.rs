//! `advise`: each workload behind a Service, its `preStop` and grace period set beside the
//! end-to-end removal lag measured across the nodes, with a verdict and the hold snippet that
//! replaces a guessed sleep. It only reads (workloads, Services, NodeConvergences or
//! Prometheus); it never changes the cluster.
//!
//! The judgement (`PreStop::of_handler`, `judge`, `Measurement::from_node_convergences`) is pure
//! and unit-tested; `advise` is the thin adapter that lists the objects.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{LifecycleHandler, PodTemplateSpec, Service};
use kube::api::ListParams;
use kube::{Api, Client};
use serde::Serialize;

use crate::crd::NodeConvergence;

/// Kubernetes' default `terminationGracePeriodSeconds`.
pub const DEFAULT_GRACE_SECONDS: f64 = 30.0;
/// The hold's default timeout when `timeout=` is not given (README, Holds).
const HOLD_DEFAULT_TIMEOUT_SECONDS: f64 = 30.0;
/// The hold timeout suggested when nothing is measured yet (the README's example).
const UNMEASURED_HOLD_TIMEOUT_SECONDS: u64 = 25;
/// Time left after the hold's timeout for the container to drain and exit before SIGKILL when a
/// grace period is suggested (the README's example: 25 s hold + 20 s drain).
const DRAIN_SECONDS: u64 = 20;
/// The agent's default `--listen` port, where `/v1/hold` is served on the node IP.
const AGENT_PORT: u16 = 9108;
/// A sleep is wasteful above `WASTE_FACTOR × p99.9 + WASTE_SLACK_SECONDS`.
const WASTE_FACTOR: f64 = 3.0;
const WASTE_SLACK_SECONDS: f64 = 5.0;
const PROMETHEUS_TIMEOUT: Duration = Duration::from_secs(15);
/// The end-to-end lag histogram (telemetry.rs), removals only.
const PROM_HISTOGRAM: &str = "kube_converge_end_to_end_lag_seconds";

/// What one container's preStop hook does, as far as its duration goes.
#[derive(Clone, Debug, PartialEq)]
pub enum PreStop {
    None,
    /// `lifecycle.preStop.sleep.seconds`.
    SleepAction {
        seconds: f64,
    },
    /// An exec hook whose time is spent in `sleep N` (`sleep 30`, `sh -c "sleep 5; nginx -s quit"`).
    ExecSleep {
        seconds: f64,
        command: String,
    },
    /// kube-converge's `/v1/hold` (httpGet, or exec `wget`/`curl`).
    Hold {
        timeout_seconds: f64,
        via: &'static str,
    },
    /// An httpGet to something else: its duration is the application's.
    HttpGet {
        path: String,
    },
    /// An exec hook that does not sleep a known time.
    Exec {
        command: String,
    },
}

impl PreStop {
    /// The hook of a `lifecycle.preStop` handler.
    pub fn of_handler(h: &LifecycleHandler) -> Self {
        if let Some(s) = &h.sleep {
            return PreStop::SleepAction {
                seconds: s.seconds.max(0) as f64,
            };
        }
        if let Some(g) = &h.http_get {
            let path = g.path.clone().unwrap_or_default();
            return match hold_timeout(&path) {
                Some(timeout_seconds) if path.starts_with("/v1/hold") => PreStop::Hold {
                    timeout_seconds,
                    via: "httpGet",
                },
                _ => PreStop::HttpGet { path },
            };
        }
        match h.exec.as_ref().and_then(|e| e.command.as_ref()) {
            Some(cmd) if !cmd.is_empty() => PreStop::of_exec(cmd),
            _ => PreStop::None,
        }
    }

    /// An exec hook: `sleep N`, a shell script that sleeps, or a call to the hold.
    pub fn of_exec(cmd: &[String]) -> Self {
        let command = shell_words(cmd);
        if let Some(Some(timeout_seconds)) = cmd.iter().find(|a| a.contains("/v1/hold")).map(|a| hold_timeout(a)) {
            return PreStop::Hold {
                timeout_seconds,
                via: "exec",
            };
        }
        let mut args: &[String] = cmd;
        if args.first().is_some_and(|a| basename(a) == "busybox") {
            args = &args[1..];
        }
        let seconds = match args.first().map(|a| basename(a)) {
            Some("sleep") => sleep_seconds(&args[1..]),
            Some("sh" | "bash" | "ash" | "dash" | "zsh") => {
                // The script is the argument after the first option carrying `c` (`-c`, `-ec`).
                let script = args
                    .iter()
                    .skip(1)
                    .position(|a| a.starts_with('-') && !a.starts_with("--") && a.contains('c'))
                    .and_then(|i| args.get(i + 2));
                script.and_then(|s| script_sleep_seconds(s))
            }
            _ => None,
        };
        match seconds {
            Some(seconds) => PreStop::ExecSleep { seconds, command },
            None => PreStop::Exec { command },
        }
    }

    /// The stable name of the hook's kind in `-o json`.
    pub fn kind(&self) -> &'static str {
        match self {
            PreStop::None => "none",
            PreStop::SleepAction { .. } => "sleep",
            PreStop::ExecSleep { .. } => "exec-sleep",
            PreStop::Hold { .. } => "hold",
            PreStop::HttpGet { .. } => "http-get",
            PreStop::Exec { .. } => "exec",
        }
    }

    /// How long the hook keeps the container serving, when that is known (`None`: 0 s).
    pub fn sleep_seconds(&self) -> Option<f64> {
        match self {
            PreStop::None => Some(0.0),
            PreStop::SleepAction { seconds } | PreStop::ExecSleep { seconds, .. } => Some(*seconds),
            _ => None,
        }
    }

    /// One short phrase for the table.
    pub fn describe(&self) -> String {
        match self {
            PreStop::None => "none".into(),
            PreStop::SleepAction { seconds } => format!("sleep {}", secs(*seconds)),
            PreStop::ExecSleep { seconds, .. } => format!("exec sleep {}", secs(*seconds)),
            PreStop::Hold { timeout_seconds, via } => {
                format!("kube-converge hold ({via}, timeout {})", secs(*timeout_seconds))
            }
            PreStop::HttpGet { path } => format!("httpGet {path}"),
            PreStop::Exec { .. } => "exec (duration unknown)".into(),
        }
    }

    /// Which of two containers' hooks decides how long the pod keeps serving: a hold, else the
    /// longest known sleep, else a hook of unknown length, else none.
    fn rank(&self) -> (u8, f64) {
        match self {
            PreStop::Hold { timeout_seconds, .. } => (3, *timeout_seconds),
            PreStop::SleepAction { seconds } | PreStop::ExecSleep { seconds, .. } => (2, *seconds),
            PreStop::HttpGet { .. } | PreStop::Exec { .. } => (1, 0.0),
            PreStop::None => (0, 0.0),
        }
    }
}

/// The pod's deciding hook among its containers, with the container's name: on a tie (e.g.
/// no hook anywhere) the first, and `WorkloadShape` lists serving containers first.
pub fn deciding_prestop(containers: &[(String, PreStop)]) -> (String, PreStop) {
    let mut best: Option<&(String, PreStop)> = None;
    for c in containers {
        if best.is_none_or(|b| c.1.rank() > b.1.rank()) {
            best = Some(c);
        }
    }
    best.cloned().unwrap_or_else(|| (String::new(), PreStop::None))
}

fn basename(s: &str) -> &str {
    s.rsplit('/').next().unwrap_or(s)
}

fn shell_words(cmd: &[String]) -> String {
    cmd.iter()
        .map(|a| {
            if a.is_empty() || a.contains(|c: char| c.is_whitespace() || "\"'$;&|".contains(c)) {
                format!("{a:?}")
            } else {
                a.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// `timeout=` of a hold URL (default 30 s); `None` when it does not parse.
fn hold_timeout(url: &str) -> Option<f64> {
    let query = url.split_once('?').map(|(_, q)| q).unwrap_or_default();
    // A shell command ends the URL at a quote or a space.
    let query = query.split(['"', '\'', ' ']).next().unwrap_or_default();
    match query.split('&').find_map(|kv| kv.strip_prefix("timeout=")) {
        None => Some(HOLD_DEFAULT_TIMEOUT_SECONDS),
        Some(t) => crate::config::parse_duration(t).ok().map(|d| d.as_secs_f64()),
    }
}

/// `sleep`'s operands as GNU and busybox sleep read them: numbers with an optional `s`, `m`,
/// `h` or `d` suffix, summed; `infinity` is infinite.
fn sleep_seconds(args: &[String]) -> Option<f64> {
    if args.is_empty() {
        return None;
    }
    let mut total = 0.0;
    for a in args {
        let a = a.trim_matches(|c| c == '"' || c == '\'');
        if a == "infinity" || a == "inf" {
            return Some(f64::INFINITY);
        }
        let (num, mult) = match a.char_indices().last() {
            Some((i, 's')) => (&a[..i], 1.0),
            Some((i, 'm')) => (&a[..i], 60.0),
            Some((i, 'h')) => (&a[..i], 3600.0),
            Some((i, 'd')) => (&a[..i], 86400.0),
            _ => (a, 1.0),
        };
        let v: f64 = num.parse().ok().filter(|v: &f64| v.is_finite() && *v >= 0.0)?;
        total += v * mult;
    }
    Some(total)
}

/// The seconds a shell script spends in `sleep` commands (`sleep 5; nginx -s quit`), `None`
/// when it runs no `sleep`.
fn script_sleep_seconds(script: &str) -> Option<f64> {
    let normalized = script.replace("&&", ";").replace("||", ";").replace('\n', ";");
    let mut found = None;
    for statement in normalized.split(';') {
        let words: Vec<String> = statement.split_whitespace().map(String::from).collect();
        let words: &[String] = match words.first().map(String::as_str) {
            Some("exec") => &words[1..],
            _ => &words,
        };
        if words.first().is_some_and(|w| basename(w) == "sleep") {
            if let Some(s) = sleep_seconds(&words[1..]) {
                found = Some(found.unwrap_or(0.0) + s);
            }
        }
    }
    found
}

/// The measured end-to-end removal lag across the nodes.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Measurement {
    /// `nodeconvergences` or `prometheus`.
    pub source: &'static str,
    pub p99_seconds: f64,
    pub p999_seconds: f64,
    /// True when p99.9 is an estimate (NodeConvergence objects keep no histogram).
    pub p999_estimated: bool,
    /// The node (or scrape target) with the highest p99.
    pub worst_node: Option<String>,
    /// Nodes (or scrape targets) that reported.
    pub nodes: usize,
    /// Measured changes behind the figures.
    pub samples: u64,
    /// How the figures were obtained.
    pub note: String,
}

/// Why there is no measurement (the verdicts are then `no-data`).
pub type NoData = String;

/// Nearest-rank quantile of sorted values.
fn quantile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

impl Measurement {
    /// From the agents' published status: p99 is the worst node's `lagP99Seconds` (the recent
    /// window of local lags) or the p99 of the recent end-to-end removal lags, whichever is
    /// higher; p99.9 can only be estimated, as the largest recent removal lag.
    pub fn from_node_convergences(ncs: &[NodeConvergence]) -> Result<Measurement, NoData> {
        if ncs.is_empty() {
            return Err("no NodeConvergence objects: the kube-converge agents are not running (install them with `kubectl apply -k deploy/base`), so no lag has been measured".into());
        }
        let mut worst: Option<(f64, String)> = None;
        let mut removals: Vec<(f64, String)> = Vec::new();
        let mut samples = 0u64;
        for nc in ncs {
            let node = nc.metadata.name.clone().unwrap_or_default();
            let Some(st) = &nc.status else { continue };
            samples += u64::from(st.lag_samples);
            if let Some(p99) = st.lag_p99_seconds.filter(|v| v.is_finite()) {
                if worst.as_ref().is_none_or(|(w, _)| p99 > *w) {
                    worst = Some((p99, node.clone()));
                }
            }
            for r in st.recent.iter().filter(|r| r.change == "removed") {
                let lag = r.end_to_end_seconds.unwrap_or(r.lag_seconds);
                if lag.is_finite() {
                    removals.push((lag.max(0.0), node.clone()));
                }
            }
        }
        removals.sort_by(|a, b| a.0.total_cmp(&b.0));
        let values: Vec<f64> = removals.iter().map(|r| r.0).collect();
        let recent_p99 = quantile(&values, 0.99).map(|v| {
            let node = removals
                .iter()
                .find(|r| r.0 == v)
                .map(|r| r.1.clone())
                .unwrap_or_default();
            (v, node)
        });
        let (p99, worst_node) = match (worst, recent_p99) {
            (Some(a), Some(b)) => {
                if b.0 > a.0 {
                    b
                } else {
                    a
                }
            }
            (Some(a), None) | (None, Some(a)) => a,
            (None, None) => {
                return Err(format!(
                    "the agents on {} node(s) have measured no change yet: delete or isolate a pod behind a Service (or wait for a rollout), then run advise again",
                    ncs.len()
                ))
            }
        };
        let max_recent = values.last().copied().unwrap_or(p99);
        Ok(Measurement {
            source: "nodeconvergences",
            p99_seconds: p99,
            p999_seconds: p99.max(max_recent),
            p999_estimated: true,
            worst_node: Some(worst_node),
            nodes: ncs.len(),
            samples,
            note: format!(
                "p99: the worst node's lagP99Seconds or the p99 of {} recent end-to-end removal lags, whichever is higher; p99.9 is estimated as the largest of them (NodeConvergence keeps no histogram: use --prometheus for measured quantiles)",
                values.len()
            ),
        })
    }
}

/// The verdict on one workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// Traffic still reaches pods after they stopped serving.
    TooShort,
    Fine,
    /// Sleeps far longer than the lag needs.
    Wasteful,
    /// Nothing is measured.
    NoData,
    /// Already uses kube-converge's hold.
    Hold,
    /// The hook's duration cannot be told (an httpGet or a command that does not sleep).
    Unknown,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::TooShort => "too-short",
            Verdict::Fine => "fine",
            Verdict::Wasteful => "wasteful",
            Verdict::NoData => "no-data",
            Verdict::Hold => "hold",
            Verdict::Unknown => "unknown",
        }
    }
}

/// Seconds as the table prints them: `30s`, `0.412s`.
fn secs(v: f64) -> String {
    if v.is_infinite() {
        "infinity".into()
    } else if v.fract() == 0.0 {
        format!("{v:.0}s")
    } else {
        format!("{v:.3}s")
    }
}

/// The verdict and its reason for a pod's deciding hook, its grace period and the lag.
pub fn judge(prestop: &PreStop, grace: f64, lag: Option<&Measurement>) -> (Verdict, String) {
    if let PreStop::Hold { timeout_seconds, .. } = prestop {
        let mut reason = format!(
            "waits until every node has converged (timeout {})",
            secs(*timeout_seconds)
        );
        if *timeout_seconds >= grace {
            reason += &format!(
                "; but the timeout is not under the grace period ({}): SIGKILL may come before the hold returns, leaving no time to drain",
                secs(grace)
            );
        }
        if let Some(m) = lag.filter(|m| *timeout_seconds < m.p999_seconds) {
            reason += &format!(
                "; but the timeout is below the measured p99.9 ({}): raise it",
                secs(m.p999_seconds)
            );
        }
        return (Verdict::Hold, reason);
    }
    let Some(m) = lag else {
        return (Verdict::NoData, "no removal lag is measured yet".into());
    };
    let Some(sleep) = prestop.sleep_seconds() else {
        return (
            Verdict::Unknown,
            format!(
                "the preStop ({}) takes a time advise cannot tell; it must keep the pod serving for at least {} (p99.9)",
                prestop.describe(),
                secs(m.p999_seconds)
            ),
        );
    };
    let p999 = m.p999_seconds;
    if grace <= sleep && sleep > 0.0 {
        return (
            Verdict::TooShort,
            format!(
                "the grace period ({}) does not cover the preStop sleep ({}): the container is killed before it can drain{}",
                secs(grace),
                secs(sleep),
                if grace < p999 {
                    format!(", and before every node stopped routing to it (p99.9 {})", secs(p999))
                } else {
                    String::new()
                }
            ),
        );
    }
    if sleep < p999 {
        let what = match prestop {
            PreStop::None => "there is no preStop: the container gets SIGTERM at once".to_string(),
            _ => format!("the preStop sleep ({}) ends", secs(sleep)),
        };
        return (
            Verdict::TooShort,
            format!(
                "{what} while nodes still route new connections to the pod (p99.9 removal lag {})",
                secs(p999)
            ),
        );
    }
    let waste_bound = WASTE_FACTOR * p999 + WASTE_SLACK_SECONDS;
    if sleep > waste_bound {
        return (
            Verdict::Wasteful,
            format!(
                "sleeps {} where every node has converged after {} (p99.9): more than {:.0}× p99.9 + {:.0}s",
                secs(sleep),
                secs(p999),
                WASTE_FACTOR,
                WASTE_SLACK_SECONDS
            ),
        );
    }
    (
        Verdict::Fine,
        format!(
            "sleeps {}, above the p99.9 removal lag ({}), within the grace period ({})",
            secs(sleep),
            secs(p999),
            secs(grace)
        ),
    )
}

/// The hold timeout to recommend: twice p99.9, at least p99.9 + 5 s, rounded up (25 s unmeasured).
pub fn recommended_timeout(lag: Option<&Measurement>) -> u64 {
    match lag {
        None => UNMEASURED_HOLD_TIMEOUT_SECONDS,
        Some(m) => {
            let p = m
                .p999_seconds
                .min(crate::telemetry::LAG_BUCKETS[crate::telemetry::LAG_BUCKETS.len() - 1]);
            (2.0 * p).max(p + 5.0).ceil() as u64
        }
    }
}

/// The grace period to recommend: the current one, raised to leave the drain time after the
/// hold's timeout.
pub fn recommended_grace(grace: f64, timeout: u64) -> u64 {
    (grace.ceil() as u64).max(timeout + DRAIN_SECONDS)
}

/// The strategic-merge patch (`kubectl patch KIND NAME --patch-file FILE`) that puts the
/// README's portable exec hold in place of the container's preStop.
pub fn hold_snippet(container: &str, current: &PreStop, grace: u64, timeout: u64) -> String {
    // A handler takes one action: the old one must go.
    let remove = match current {
        PreStop::SleepAction { .. } => "            sleep: null\n",
        PreStop::HttpGet { .. } | PreStop::Hold { via: "httpGet", .. } => "            httpGet: null\n",
        _ => "",
    };
    format!(
        "spec:
  template:
    spec:
      terminationGracePeriodSeconds: {grace}
      containers:
      - name: {container}
        env:
        - name: POD_NAME
          valueFrom: {{fieldRef: {{fieldPath: metadata.name}}}}
        - name: POD_NAMESPACE
          valueFrom: {{fieldRef: {{fieldPath: metadata.namespace}}}}
        - name: NODE_IP
          valueFrom: {{fieldRef: {{fieldPath: status.hostIP}}}}
        lifecycle:
          preStop:
{remove}            exec:
              command: [\"sh\", \"-c\", \"wget -q -O- \\\"http://$NODE_IP:{AGENT_PORT}/v1/hold?namespace=$POD_NAMESPACE&pod=$POD_NAME&timeout={timeout}s\\\" || true\"]
"
    )
}

/// A workload's preStop as `-o json` shows it.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PreStopView {
    /// none, sleep, exec-sleep, hold, http-get or exec.
    pub kind: &'static str,
    /// The container whose hook decides (the longest).
    pub container: String,
    /// The sleep (none: 0); null for a hold or a hook of unknown length, or `sleep infinity`.
    pub seconds: Option<f64>,
    /// The hold's timeout, for a hold.
    pub hold_timeout_seconds: Option<f64>,
    pub description: String,
}

/// The advice for one workload.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadAdvice {
    pub namespace: String,
    /// Deployment, StatefulSet or DaemonSet.
    pub kind: &'static str,
    pub name: String,
    /// The Services whose selector matches the pod template's labels.
    pub services: Vec<String>,
    pub pre_stop: PreStopView,
    pub termination_grace_period_seconds: f64,
    pub p99_seconds: Option<f64>,
    pub p999_seconds: Option<f64>,
    /// too-short, fine, wasteful, no-data, hold or unknown.
    pub verdict: Verdict,
    pub reason: String,
    /// For anything but `hold`: the hold timeout and grace period the snippet sets.
    pub recommended_hold_timeout_seconds: Option<u64>,
    pub recommended_termination_grace_period_seconds: Option<u64>,
    /// For anything but `hold`: the patch that replaces the preStop with the hold.
    pub snippet: Option<String>,
}

/// The whole answer.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AdviseReport {
    /// Null when nothing is measured (see `noDataReason`).
    pub measurement: Option<Measurement>,
    pub no_data_reason: Option<String>,
    pub workloads: Vec<WorkloadAdvice>,
}

/// A workload reduced to what the advice needs (no Kubernetes types past this point).
#[derive(Clone, Debug, Default)]
pub struct WorkloadShape {
    pub namespace: String,
    pub kind: &'static str,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub containers: Vec<(String, PreStop)>,
    pub grace: Option<f64>,
}

impl WorkloadShape {
    fn from_template(kind: &'static str, meta: &kube::api::ObjectMeta, template: &PodTemplateSpec) -> Self {
        let labels = template.metadata.as_ref().and_then(|m| m.labels.as_ref());
        let spec = template.spec.as_ref();
        let mut containers: Vec<&k8s_openapi::api::core::v1::Container> =
            spec.map(|s| s.containers.iter().collect()).unwrap_or_default();
        // Containers that declare ports first: a hook goes where the traffic is served
        // (kubelet sends SIGTERM to each container after its own preStop).
        containers.sort_by_key(|c| c.ports.as_ref().is_none_or(|p| p.is_empty()));
        let containers = containers
            .into_iter()
            .map(|c| {
                let hook = c
                    .lifecycle
                    .as_ref()
                    .and_then(|l| l.pre_stop.as_ref())
                    .map_or(PreStop::None, PreStop::of_handler);
                (c.name.clone(), hook)
            })
            .collect();
        WorkloadShape {
            namespace: meta.namespace.clone().unwrap_or_default(),
            kind,
            name: meta.name.clone().unwrap_or_default(),
            labels: labels.cloned().unwrap_or_default(),
            containers,
            grace: spec.and_then(|s| s.termination_grace_period_seconds).map(|g| g as f64),
        }
    }
}

/// (namespace, name, selector) of the Services with a selector.
pub type ServiceSelector = (String, String, BTreeMap<String, String>);

/// The advice for every workload some Service selects.
pub fn advise_workloads(
    workloads: &[WorkloadShape],
    services: &[ServiceSelector],
    lag: Result<&Measurement, &NoData>,
) -> AdviseReport {
    let m = lag.ok();
    let mut out: Vec<WorkloadAdvice> = workloads
        .iter()
        .filter_map(|w| {
            let backing: Vec<String> = services
                .iter()
                .filter(|(ns, _, sel)| {
                    *ns == w.namespace && !sel.is_empty() && sel.iter().all(|(k, v)| w.labels.get(k) == Some(v))
                })
                .map(|(_, name, _)| name.clone())
                .collect();
            if backing.is_empty() {
                return None;
            }
            let (container, prestop) = deciding_prestop(&w.containers);
            let grace = w.grace.unwrap_or(DEFAULT_GRACE_SECONDS);
            let (verdict, reason) = judge(&prestop, grace, m);
            let advice = (verdict != Verdict::Hold).then(|| {
                let timeout = recommended_timeout(m);
                let g = recommended_grace(grace, timeout);
                (timeout, g, hold_snippet(&container, &prestop, g, timeout))
            });
            Some(WorkloadAdvice {
                namespace: w.namespace.clone(),
                kind: w.kind,
                name: w.name.clone(),
                services: backing,
                pre_stop: PreStopView {
                    kind: prestop.kind(),
                    container,
                    seconds: prestop.sleep_seconds().filter(|s| s.is_finite()),
                    hold_timeout_seconds: match &prestop {
                        PreStop::Hold { timeout_seconds, .. } => Some(*timeout_seconds),
                        _ => None,
                    },
                    description: prestop.describe(),
                },
                termination_grace_period_seconds: grace,
                p99_seconds: m.map(|m| m.p99_seconds),
                p999_seconds: m.map(|m| m.p999_seconds),
                verdict,
                reason,
                recommended_hold_timeout_seconds: advice.as_ref().map(|a| a.0),
                recommended_termination_grace_period_seconds: advice.as_ref().map(|a| a.1),
                snippet: advice.map(|a| a.2),
            })
        })
        .collect();
    out.sort_by(|a, b| (&a.namespace, a.kind, &a.name).cmp(&(&b.namespace, b.kind, &b.name)));
    AdviseReport {
        measurement: m.cloned(),
        no_data_reason: lag.err().cloned(),
        workloads: out,
    }
}

impl AdviseReport {
    /// The table, the measurement it rests on, and per workload the reason and the patch.
    pub fn to_table(&self) -> String {
        let mut out = String::new();
        match (&self.measurement, &self.no_data_reason) {
            (Some(m), _) => {
                out += &format!(
                "measured end-to-end removal lag ({} node(s), from {}): p99 {}, p99.9 {}{} (worst node: {})\n  {}\n\n",
                m.nodes,
                m.source,
                secs(m.p99_seconds),
                if m.p999_estimated { "~" } else { "" },
                secs(m.p999_seconds),
                m.worst_node.as_deref().unwrap_or("-"),
                m.note
            )
            }
            (None, Some(why)) => out += &format!("no measured lag: {why}\n\n"),
            (None, None) => {}
        }
        if self.workloads.is_empty() {
            out += "no Deployment, StatefulSet or DaemonSet backs a Service here\n";
            return out;
        }
        let approx = self.measurement.as_ref().is_some_and(|m| m.p999_estimated);
        let mut rows = vec![[
            "NAMESPACE".to_string(),
            "WORKLOAD".into(),
            "SERVICES".into(),
            "PRESTOP".into(),
            "GRACE".into(),
            "P99".into(),
            "P99.9".into(),
            "VERDICT".into(),
        ]];
        for w in &self.workloads {
            rows.push([
                w.namespace.clone(),
                format!("{}/{}", w.kind.to_lowercase(), w.name),
                w.services.join(","),
                w.pre_stop.description.clone(),
                secs(w.termination_grace_period_seconds),
                w.p99_seconds.map_or("-".into(), secs),
                w.p999_seconds
                    .map_or("-".into(), |v| format!("{}{}", if approx { "~" } else { "" }, secs(v))),
                w.verdict.as_str().into(),
            ]);
        }
        out += &crate::table::render(&rows);
        for w in &self.workloads {
            out += &format!(
                "\n{}/{} ({}): {}: {}\n",
                w.kind.to_lowercase(),
                w.name,
                w.namespace,
                w.verdict.as_str(),
                w.reason
            );
            if let Some(snippet) = &w.snippet {
                out += &format!(
                    "  replace the preStop with the hold (kubectl patch {} {} -n {} --patch-file FILE):\n",
                    w.kind.to_lowercase(),
                    w.name,
                    w.namespace
                );
                for line in snippet.lines() {
                    out += &format!("    {line}\n");
                }
            }
        }
        out
    }
}

/// Where the lag comes from.
#[derive(Clone, Debug)]
pub enum LagSource {
    NodeConvergences,
    Prometheus { url: String, window: String },
}

#[derive(Debug, thiserror::Error)]
pub enum AdviseError {
    #[error("listing {what} {scope} was forbidden ({message}): advise needs `list` on `{resource}` in API group {group}; bind the kube-converge-operator ClusterRole (deploy/base/rbac-operator.yaml), e.g. `kubectl create clusterrolebinding kube-converge-operator-$USER --clusterrole=kube-converge-operator --user=$USER`")]
    ListForbidden {
        what: &'static str,
        scope: String,
        resource: &'static str,
        group: &'static str,
        message: String,
    },
    #[error("listing {what} {scope}")]
    ListFailed {
        what: &'static str,
        scope: String,
        #[source]
        source: kube::Error,
    },
    #[error("--prometheus {url:?} is not usable: {reason} (give http://HOST:PORT[/PREFIX], e.g. a `kubectl port-forward` to Prometheus)")]
    PrometheusUrlInvalid { url: String, reason: String },
    #[error("querying Prometheus at {url} ({query}): {reason}")]
    PrometheusQueryFailed { url: String, query: String, reason: String },
}

/// Lists every object of a kind, turning a 403 into the RBAC it lacks.
async fn list_all<K>(
    client: &Client,
    namespace: Option<&str>,
    (what, resource, group): (&'static str, &'static str, &'static str),
) -> Result<Vec<K>, AdviseError>
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
{
    let api: Api<K> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let scope = namespace.map_or("in every namespace".to_string(), |ns| format!("in namespace {ns}"));
    api.list(&ListParams::default())
        .await
        .map(|l| l.items)
        .map_err(|e| match e {
            kube::Error::Api(s) if s.code == 403 => AdviseError::ListForbidden {
                what,
                scope,
                resource,
                group,
                message: s.message.clone(),
            },
            source => AdviseError::ListFailed { what, scope, source },
        })
}

/// The measured lag from the NodeConvergence objects (no CRD: the agents are not installed).
async fn lag_from_node_convergences(client: &Client) -> Result<Result<Measurement, NoData>, AdviseError> {
    let api: Api<NodeConvergence> = Api::all(client.clone());
    match api.list(&ListParams::default()).await {
        Ok(l) => Ok(Measurement::from_node_convergences(&l.items)),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(Err(
            "the NodeConvergence CRD is not installed: the kube-converge agents are not running (install them with `kubectl apply -k deploy/base`)".into(),
        )),
        Err(kube::Error::Api(s)) if s.code == 403 => Err(AdviseError::ListForbidden {
            what: "NodeConvergences",
            scope: "(cluster-scoped)".into(),
            resource: "nodeconvergences",
            group: crate::crd::GROUP,
            message: s.message.clone(),
        }),
        Err(source) => Err(AdviseError::ListFailed {
            what: "NodeConvergences",
            scope: "(cluster-scoped)".into(),
            source,
        }),
    }
}

/// Lists the workloads, the Services and the measurement, and advises.
pub async fn advise(client: &Client, namespace: Option<&str>, source: &LagSource) -> Result<AdviseReport, AdviseError> {
    let services: Vec<Service> = list_all(client, namespace, ("Services", "services", "\"\" (core)")).await?;
    let deployments: Vec<Deployment> = list_all(client, namespace, ("Deployments", "deployments", "apps")).await?;
    let statefulsets: Vec<StatefulSet> = list_all(client, namespace, ("StatefulSets", "statefulsets", "apps")).await?;
    let daemonsets: Vec<DaemonSet> = list_all(client, namespace, ("DaemonSets", "daemonsets", "apps")).await?;
    let lag = match source {
        LagSource::NodeConvergences => lag_from_node_convergences(client).await?,
        LagSource::Prometheus { url, window } => lag_from_prometheus(url, window).await?,
    };
    let selectors: Vec<ServiceSelector> = services
        .iter()
        .filter_map(|s| {
            let sel = s.spec.as_ref()?.selector.clone()?;
            Some((s.metadata.namespace.clone()?, s.metadata.name.clone()?, sel))
        })
        .collect();
    let shapes: Vec<WorkloadShape> = (deployments.iter())
        .map(|d| WorkloadShape::from_template("Deployment", &d.metadata, &d.spec.template))
        .chain(
            statefulsets
                .iter()
                .map(|s| WorkloadShape::from_template("StatefulSet", &s.metadata, &s.spec.template)),
        )
        .chain(
            daemonsets
                .iter()
                .map(|d| WorkloadShape::from_template("DaemonSet", &d.metadata, &d.spec.template)),
        )
        .collect();
    Ok(advise_workloads(&shapes, &selectors, lag.as_ref()))
}

/// A PromQL range duration (`7d`, `12h`, `90m`).
pub fn parse_promql_window(s: &str) -> Result<String, String> {
    let s = s.trim();
    let ok = s.len() > 1
        && s[..s.len() - 1].chars().all(|c| c.is_ascii_digit())
        && s.ends_with(['s', 'm', 'h', 'd', 'w', 'y'])
        && !s.starts_with('0');
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!("{s:?} is not a PromQL duration: use e.g. 1h, 1d, 7d"))
    }
}

/// The PromQL of quantile `q` of the removal end-to-end lag, per node, over `window`.
pub fn prometheus_quantile_query(q: f64, window: &str) -> String {
    format!("histogram_quantile({q}, sum by (node, instance, le) (increase({PROM_HISTOGRAM}_bucket{{change=\"removed\"}}[{window}])))")
}

/// The PromQL of the number of removals measured over `window`.
pub fn prometheus_count_query(window: &str) -> String {
    format!("sum(increase({PROM_HISTOGRAM}_count{{change=\"removed\"}}[{window}]))")
}

/// One sample of an instant vector: its labels and value.
pub type PromSample = (BTreeMap<String, String>, f64);

/// The samples of an instant-vector answer of Prometheus' `/api/v1/query`.
pub fn parse_prometheus_vector(body: &str) -> Result<Vec<PromSample>, String> {
    let v: serde_json::Value = serde_json::from_str(body).map_err(|e| format!("the answer is not JSON ({e})"))?;
    if v["status"] != "success" {
        return Err(format!(
            "Prometheus answered {}: {}",
            v["errorType"].as_str().unwrap_or("an error"),
            v["error"].as_str().unwrap_or("no message")
        ));
    }
    let result = v["data"]["result"]
        .as_array()
        .ok_or("the answer has no data.result vector")?;
    result
        .iter()
        .map(|r| {
            let labels = r["metric"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                        .collect()
                })
                .unwrap_or_default();
            // Prometheus writes sample values as strings: "0.25", "NaN", "+Inf".
            let value = match r["value"][1].as_str() {
                Some("+Inf") => f64::INFINITY,
                Some("-Inf") => f64::NEG_INFINITY,
                Some(s) => s
                    .parse::<f64>()
                    .map_err(|_| format!("sample value {s:?} is not a number"))?,
                None => return Err("a sample has no value".to_string()),
            };
            Ok((labels, value))
        })
        .collect()
}

/// The measurement from Prometheus' answers to the quantile and count queries.
pub fn measurement_from_prometheus(
    p99: &[PromSample],
    p999: &[PromSample],
    count: &[PromSample],
    url: &str,
    window: &str,
) -> Result<Measurement, NoData> {
    let largest = crate::telemetry::LAG_BUCKETS[crate::telemetry::LAG_BUCKETS.len() - 1];
    // Above the last bucket histogram_quantile answers +Inf: "at least 300 s".
    fn worst(v: &[PromSample], largest: f64) -> Option<(f64, &BTreeMap<String, String>)> {
        v.iter()
            .filter(|(_, x)| !x.is_nan())
            .map(|(l, x)| (x.min(largest), l))
            .max_by(|a, b| a.0.total_cmp(&b.0))
    }
    let samples = count.first().map(|c| c.1).filter(|c| c.is_finite()).unwrap_or(0.0);
    let (Some((p99v, labels)), Some((p999v, _))) = (worst(p99, largest), worst(p999, largest)) else {
        return Err(format!(
            "Prometheus at {url} has no removal lag ({PROM_HISTOGRAM}{{change=\"removed\"}}) in the last {window}: check that it scrapes the agents (deploy/overlays/monitoring), or widen --prometheus-window"
        ));
    };
    if samples <= 0.0 {
        return Err(format!(
            "Prometheus at {url} counted no removal in the last {window}: widen --prometheus-window"
        ));
    }
    let node = labels
        .get("node")
        .filter(|n| !n.is_empty())
        .or_else(|| labels.get("instance"))
        .cloned();
    Ok(Measurement {
        source: "prometheus",
        p99_seconds: p99v,
        p999_seconds: p999v.max(p99v),
        p999_estimated: false,
        worst_node: node,
        nodes: p99.iter().filter(|(_, x)| !x.is_nan()).count(),
        samples: samples.round() as u64,
        note: format!("histogram_quantile over {PROM_HISTOGRAM}{{change=\"removed\"}} in the last {window}, the worst node's value"),
    })
}

async fn lag_from_prometheus(url: &str, window: &str) -> Result<Result<Measurement, NoData>, AdviseError> {
    let base = PrometheusUrl::parse(url)?;
    let (q99, q999, qc) = (
        prometheus_quantile_query(0.99, window),
        prometheus_quantile_query(0.999, window),
        prometheus_count_query(window),
    );
    let p99 = base.query(&q99).await?;
    let p999 = base.query(&q999).await?;
    let count = base.query(&qc).await?;
    Ok(measurement_from_prometheus(&p99, &p999, &count, url, window))
}

/// `http://HOST[:PORT][/PREFIX]`.
#[derive(Clone, Debug, PartialEq)]
pub struct PrometheusUrl {
    pub host: String,
    pub port: u16,
    pub prefix: String,
    url: String,
}

impl PrometheusUrl {
    pub fn parse(url: &str) -> Result<Self, AdviseError> {
        let invalid = |reason: &str| AdviseError::PrometheusUrlInvalid {
            url: url.to_string(),
            reason: reason.to_string(),
        };
        let rest = match url.split_once("://") {
            Some(("http", rest)) => rest,
            Some(("https", _)) => return Err(invalid("https is not supported")),
            Some(_) => return Err(invalid("the scheme must be http")),
            None => return Err(invalid("no scheme")),
        };
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        if authority.is_empty() || authority.contains('@') {
            return Err(invalid("no host, or credentials in the URL"));
        }
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(':') && (!h.contains(':') || h.starts_with('[')) => (
                h.to_string(),
                p.parse::<u16>().map_err(|_| invalid("the port is not a number"))?,
            ),
            _ => (authority.to_string(), 80),
        };
        Ok(Self {
            host: host.trim_start_matches('[').trim_end_matches(']').to_string(),
            port,
            prefix: path.trim_end_matches('/').to_string(),
            url: url.to_string(),
        })
    }

    async fn query(&self, expr: &str) -> Result<Vec<PromSample>, AdviseError> {
        let failed = |reason: String| AdviseError::PrometheusQueryFailed {
            url: self.url.clone(),
            query: expr.to_string(),
            reason,
        };
        let path = format!("{}/api/v1/query?query={}", self.prefix, percent_encode(expr));
        let (code, body) = tokio::time::timeout(PROMETHEUS_TIMEOUT, http_get(&self.host, self.port, &path))
            .await
            .map_err(|_| failed(format!("no answer within {}s", PROMETHEUS_TIMEOUT.as_secs())))?
            .map_err(|e| failed(e.to_string()))?;
        // Prometheus explains a refused query in a JSON body (400, 422, 503).
        match parse_prometheus_vector(&body) {
            Ok(v) if code == 200 => Ok(v),
            Ok(_) => Err(failed(format!("HTTP {code}"))),
            Err(e) if code == 200 => Err(failed(e)),
            Err(e) => Err(failed(format!("HTTP {code}: {e}"))),
        }
    }
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// One HTTP/1.1 GET with `Connection: close`; returns the status code and the body (plain,
/// `Content-Length` or chunked).
async fn http_get(host: &str, port: u16, path: &str) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect((host, port)).await?;
    let host_header = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {host_header}\r\nAccept: application/json\r\nConnection: close\r\nUser-Agent: kube-converge/{}\r\n\r\n", env!("CARGO_PKG_VERSION"))
                .as_bytes(),
        )
        .await?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await?;
    parse_http_response(&raw).map_err(std::io::Error::other)
}

fn parse_http_response(raw: &[u8]) -> Result<(u16, String), String> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("the answer is not HTTP (no header end)")?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let body = &raw[split + 4..];
    let mut lines = head.lines();
    let code: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or("the answer has no HTTP status line")?;
    let header = |name: &str| {
        head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_ascii_lowercase())
        })
    };
    let body = if header("transfer-encoding").is_some_and(|t| t.contains("chunked")) {
        dechunk(body)?
    } else if let Some(len) = header("content-length").and_then(|l| l.parse::<usize>().ok()) {
        body.get(..len)
            .ok_or("the answer is shorter than its Content-Length")?
            .to_vec()
    } else {
        body.to_vec()
    };
    Ok((code, String::from_utf8_lossy(&body).into_owned()))
}

fn dechunk(mut body: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let eol = body
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("a chunk has no size line")?;
        let size_text = String::from_utf8_lossy(&body[..eol]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| format!("bad chunk size {size_text:?}"))?;
        body = &body[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        out.extend_from_slice(body.get(..size).ok_or("a chunk is cut short")?);
        body = body.get(size + 2..).unwrap_or_default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{ConvergedEndpoint, NodeConvergenceSpec, NodeConvergenceStatus};
    use k8s_openapi::api::core::v1::{ExecAction, HTTPGetAction, PodSpec, SleepAction};
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

    fn exec(cmd: &[&str]) -> PreStop {
        PreStop::of_exec(&cmd.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    fn lag(p99: f64, p999: f64) -> Measurement {
        Measurement {
            source: "nodeconvergences",
            p99_seconds: p99,
            p999_seconds: p999,
            p999_estimated: true,
            worst_node: Some("node-1".into()),
            nodes: 3,
            samples: 10,
            note: String::new(),
        }
    }

    fn sleep(seconds: f64) -> PreStop {
        PreStop::SleepAction { seconds }
    }

    #[test]
    fn prestop_handlers_are_read_by_kind() {
        let h = LifecycleHandler {
            sleep: Some(SleepAction { seconds: 15 }),
            ..Default::default()
        };
        assert_eq!(PreStop::of_handler(&h), sleep(15.0));
        let get = |path: &str| LifecycleHandler {
            http_get: Some(HTTPGetAction {
                path: Some(path.into()),
                port: IntOrString::Int(9108),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(
            PreStop::of_handler(&get("/v1/hold?namespace=demo&pod=web-0&timeout=25s")),
            PreStop::Hold {
                timeout_seconds: 25.0,
                via: "httpGet"
            }
        );
        assert_eq!(
            PreStop::of_handler(&get("/v1/hold?namespace=demo&pod=web-0")),
            PreStop::Hold {
                timeout_seconds: 30.0,
                via: "httpGet"
            },
            "the hold's default timeout"
        );
        assert_eq!(
            PreStop::of_handler(&get("/drain")),
            PreStop::HttpGet { path: "/drain".into() }
        );
        assert_eq!(
            PreStop::of_handler(&get("/v1/hold?timeout=soon")),
            PreStop::HttpGet {
                path: "/v1/hold?timeout=soon".into()
            },
            "a hold that cannot parse its timeout is not counted as a hold"
        );
        let e = LifecycleHandler {
            exec: Some(ExecAction {
                command: Some(vec!["/bin/sleep".into(), "20".into()]),
            }),
            ..Default::default()
        };
        assert_eq!(PreStop::of_handler(&e).sleep_seconds(), Some(20.0));
        assert_eq!(PreStop::of_handler(&LifecycleHandler::default()), PreStop::None);
    }

    #[test]
    fn exec_sleeps_in_every_usual_form() {
        for (cmd, want) in [
            (&["sleep", "30"][..], 30.0),
            (&["/bin/sleep", "5s"], 5.0),
            (&["/usr/bin/sleep", "1m"], 60.0),
            (&["sleep", "1m", "30s"], 90.0),
            (&["sleep", "2.5"], 2.5),
            (&["sh", "-c", "sleep 10"], 10.0),
            (&["/bin/sh", "-ec", "sleep 3 && nginx -s quit"], 3.0),
            (&["bash", "-c", "sleep 5; kill -TERM 1; sleep 2"], 7.0),
            (&["busybox", "sleep", "4"], 4.0),
            (&["sh", "-c", "exec sleep 8"], 8.0),
        ] {
            match exec(cmd) {
                PreStop::ExecSleep { seconds, .. } => assert_eq!(seconds, want, "{cmd:?}"),
                other => panic!("{cmd:?}: {other:?}"),
            }
        }
        assert_eq!(exec(&["sleep", "infinity"]).sleep_seconds(), Some(f64::INFINITY));
        for cmd in [
            &["nginx", "-s", "quit"][..],
            &["sleep"],
            &["sleep", "soon"],
            &["sh", "-c", "nginx -s quit"],
            &["sh", "-c"],
            &["sleep", "-5"],
        ] {
            assert!(matches!(exec(cmd), PreStop::Exec { .. }), "{cmd:?}: {:?}", exec(cmd));
        }
    }

    #[test]
    fn the_readmes_exec_hold_is_a_hold() {
        let readme = concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md");
        let text = std::fs::read_to_string(readme).unwrap();
        let readme_hook = r#"command: ["sh", "-c", "wget -q -O- \"http://$NODE_IP:9108/v1/hold?namespace=$POD_NAMESPACE&pod=$POD_NAME&timeout=25s\" || true"]"#;
        assert!(
            text.contains(readme_hook),
            "the README's exec hold changed: update hold_snippet with it"
        );
        assert!(
            hold_snippet("app", &PreStop::None, 60, 25).contains(readme_hook),
            "the snippet must be the README's exec hold"
        );
        let hook = exec(&[
            "sh",
            "-c",
            "wget -q -O- \"http://$NODE_IP:9108/v1/hold?namespace=$POD_NAMESPACE&pod=$POD_NAME&timeout=25s\" || true",
        ]);
        assert_eq!(
            hook,
            PreStop::Hold {
                timeout_seconds: 25.0,
                via: "exec"
            }
        );
        let curl = exec(&[
            "sh",
            "-c",
            "curl -fsS 'http://$NODE_IP:9108/v1/hold?pod=$P&namespace=$N' || true",
        ]);
        assert_eq!(
            curl,
            PreStop::Hold {
                timeout_seconds: 30.0,
                via: "exec"
            }
        );
    }

    #[test]
    fn the_pod_is_judged_by_its_longest_hook() {
        let c = |n: &str, p: PreStop| (n.to_string(), p);
        let (name, hook) = deciding_prestop(&[
            c("sidecar", sleep(5.0)),
            c("app", exec(&["sleep", "20"])),
            c("log", PreStop::None),
        ]);
        assert_eq!((name.as_str(), hook.sleep_seconds()), ("app", Some(20.0)));
        let hold = PreStop::Hold {
            timeout_seconds: 10.0,
            via: "exec",
        };
        assert_eq!(
            deciding_prestop(&[c("app", sleep(60.0)), c("proxy", hold.clone())]),
            ("proxy".to_string(), hold)
        );
        assert_eq!(
            deciding_prestop(&[c("a", PreStop::None), c("b", PreStop::None)]),
            ("a".to_string(), PreStop::None),
            "no hook: the first container"
        );
        assert_eq!(deciding_prestop(&[]), (String::new(), PreStop::None));
    }

    #[test]
    fn each_verdict() {
        let m = lag(1.0, 2.0);
        let v = |p: &PreStop, grace: f64| judge(p, grace, Some(&m)).0;
        // Shorter than p99.9, or none at all: traffic reaches the terminated pod.
        assert_eq!(v(&PreStop::None, 30.0), Verdict::TooShort);
        assert_eq!(v(&sleep(1.5), 30.0), Verdict::TooShort);
        // Exactly p99.9 is enough; up to 3 × p99.9 + 5 s = 11 s is fine.
        assert_eq!(v(&sleep(2.0), 30.0), Verdict::Fine);
        assert_eq!(v(&sleep(11.0), 30.0), Verdict::Fine);
        assert_eq!(v(&sleep(11.5), 30.0), Verdict::Wasteful);
        // A grace period that does not cover the sleep: killed before it can drain.
        let (verdict, reason) = judge(&sleep(5.0), 5.0, Some(&m));
        assert_eq!(verdict, Verdict::TooShort);
        assert!(reason.contains("does not cover"), "{reason}");
        assert_eq!(v(&sleep(20.0), 10.0), Verdict::TooShort, "wasteful, but killed first");
        assert_eq!(v(&sleep(f64::INFINITY), 30.0), Verdict::TooShort);
        // A grace period shorter than the lag with no preStop: too short either way.
        assert_eq!(v(&PreStop::None, 0.0), Verdict::TooShort);
        // Holds, unknown hooks, and no measurement.
        let hold = PreStop::Hold {
            timeout_seconds: 25.0,
            via: "exec",
        };
        assert_eq!(v(&hold, 60.0), Verdict::Hold);
        assert_eq!(judge(&hold, 60.0, None).0, Verdict::Hold, "a hold needs no data");
        assert_eq!(v(&PreStop::HttpGet { path: "/drain".into() }, 30.0), Verdict::Unknown);
        assert_eq!(judge(&sleep(10.0), 30.0, None).0, Verdict::NoData);
    }

    #[test]
    fn hold_reasons_warn_about_its_timeout() {
        let m = lag(1.0, 40.0);
        let hold = |t| PreStop::Hold {
            timeout_seconds: t,
            via: "httpGet",
        };
        let (_, ok) = judge(&hold(50.0), 90.0, Some(&m));
        assert!(!ok.contains("but"), "{ok}");
        let (_, over_grace) = judge(&hold(50.0), 45.0, Some(&m));
        assert!(over_grace.contains("not under the grace period"), "{over_grace}");
        let (_, below_lag) = judge(&hold(25.0), 90.0, Some(&m));
        assert!(below_lag.contains("below the measured p99.9"), "{below_lag}");
    }

    #[test]
    fn recommendations_leave_room_to_drain() {
        assert_eq!(recommended_timeout(None), 25);
        assert_eq!(recommended_timeout(Some(&lag(0.1, 0.3))), 6, "p99.9 + 5 s, rounded up");
        assert_eq!(recommended_timeout(Some(&lag(9.0, 12.0))), 24, "twice p99.9");
        assert_eq!(
            recommended_timeout(Some(&lag(9.0, 1e9))),
            600,
            "capped at the largest bucket"
        );
        assert_eq!(recommended_grace(30.0, 6), 30, "already enough");
        assert_eq!(recommended_grace(30.0, 25), 45);
    }

    #[test]
    fn the_snippet_is_a_patch_that_advise_reads_back_as_a_hold() {
        for current in [sleep(30.0), PreStop::HttpGet { path: "/x".into() }, PreStop::None] {
            let snippet = hold_snippet("app", &current, 45, 6);
            let patch: serde_json::Value = serde_saphyr::from_str(&snippet).unwrap();
            let template = &patch["spec"]["template"]["spec"];
            assert_eq!(template["terminationGracePeriodSeconds"], 45);
            let container = &template["containers"][0];
            assert_eq!(container["name"], "app");
            // The old action is removed by the strategic merge (`null`).
            let pre_stop = container["lifecycle"]["preStop"].as_object().unwrap();
            assert_eq!(
                pre_stop.contains_key("sleep"),
                matches!(current, PreStop::SleepAction { .. })
            );
            assert_eq!(
                pre_stop.contains_key("httpGet"),
                matches!(current, PreStop::HttpGet { .. })
            );
            let mut spec = patch["spec"]["template"]["spec"].clone();
            spec["containers"][0]["lifecycle"]["preStop"]
                .as_object_mut()
                .unwrap()
                .retain(|_, v| !v.is_null());
            let spec: PodSpec = serde_json::from_value(spec).unwrap();
            let c = &spec.containers[0];
            let hook = PreStop::of_handler(c.lifecycle.as_ref().unwrap().pre_stop.as_ref().unwrap());
            assert_eq!(
                hook,
                PreStop::Hold {
                    timeout_seconds: 6.0,
                    via: "exec"
                }
            );
            let env: Vec<&str> = c.env.as_ref().unwrap().iter().map(|e| e.name.as_str()).collect();
            assert_eq!(env, ["POD_NAME", "POD_NAMESPACE", "NODE_IP"]);
        }
    }

    fn nc(node: &str, p99: Option<f64>, recent: &[(&str, f64, Option<f64>)]) -> NodeConvergence {
        let mut o = NodeConvergence::new(node, NodeConvergenceSpec { node_name: node.into() });
        o.status = Some(NodeConvergenceStatus {
            lag_p99_seconds: p99,
            lag_samples: recent.len() as u32,
            recent: recent
                .iter()
                .map(|(change, lag, e2e)| ConvergedEndpoint {
                    change: change.to_string(),
                    lag_seconds: *lag,
                    end_to_end_seconds: *e2e,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        });
        o
    }

    #[test]
    fn node_convergences_give_the_worst_node_and_an_estimated_p999() {
        let ncs = [
            nc(
                "node-1",
                Some(0.2),
                &[("removed", 0.1, Some(0.15)), ("added", 9.0, Some(9.0))],
            ),
            nc(
                "node-2",
                Some(0.5),
                &[("removed", 0.3, Some(1.25)), ("removed", 0.2, None)],
            ),
            nc("node-3", None, &[]),
        ];
        let m = Measurement::from_node_convergences(&ncs).unwrap();
        // p99 of the recent removals (0.15, 0.2, 1.25) is 1.25, above the worst lagP99 (0.5).
        assert_eq!(m.p99_seconds, 1.25);
        assert_eq!(m.p999_seconds, 1.25);
        assert_eq!(m.worst_node.as_deref(), Some("node-2"));
        assert!(m.p999_estimated);
        assert_eq!((m.nodes, m.samples), (3, 4));
        // Additions do not count as removals; lagP99 alone is used when nothing was removed.
        let m = Measurement::from_node_convergences(&[nc("node-1", Some(0.7), &[("added", 5.0, Some(5.0))])]).unwrap();
        assert_eq!((m.p99_seconds, m.p999_seconds), (0.7, 0.7));
        let none = Measurement::from_node_convergences(&[]).unwrap_err();
        assert!(none.contains("agents are not running"), "{none}");
        let idle = Measurement::from_node_convergences(&[nc("node-1", None, &[])]).unwrap_err();
        assert!(idle.contains("measured no change yet"), "{idle}");
    }

    #[test]
    fn workloads_are_matched_to_services_by_selector_and_namespace() {
        let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
        };
        let w = |ns: &str, name: &str, l: &[(&str, &str)]| WorkloadShape {
            namespace: ns.into(),
            kind: "Deployment",
            name: name.into(),
            labels: labels(l),
            containers: vec![("app".into(), sleep(5.0))],
            grace: None,
        };
        let workloads = [
            w("demo", "web", &[("app", "web"), ("tier", "front")]),
            w("demo", "batch", &[("app", "batch")]),
            w("other", "web", &[("app", "web")]),
        ];
        let services = [
            ("demo".to_string(), "web".to_string(), labels(&[("app", "web")])),
            (
                "demo".to_string(),
                "web-front".to_string(),
                labels(&[("tier", "front")]),
            ),
            ("demo".to_string(), "external".to_string(), labels(&[])),
        ];
        let m = lag(1.0, 2.0);
        let report = advise_workloads(&workloads, &services, Ok(&m));
        assert_eq!(report.workloads.len(), 1, "{report:?}");
        let web = &report.workloads[0];
        assert_eq!((web.namespace.as_str(), web.name.as_str()), ("demo", "web"));
        assert_eq!(web.services, ["web", "web-front"]);
        assert_eq!(web.termination_grace_period_seconds, 30.0, "the default grace period");
        assert_eq!(web.verdict, Verdict::Fine);
        assert_eq!(web.recommended_hold_timeout_seconds, Some(7));
        assert!(web.snippet.as_deref().unwrap().contains("timeout=7s"));
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["workloads"][0]["verdict"], "fine");
        assert_eq!(json["workloads"][0]["preStop"]["kind"], "sleep");
        assert_eq!(json["workloads"][0]["preStop"]["seconds"], 5.0);
        assert_eq!(json["measurement"]["p999Seconds"], 2.0);
        let no_data: NoData = "nothing".into();
        let report = advise_workloads(&workloads, &services, Err(&no_data));
        assert_eq!(report.workloads[0].verdict, Verdict::NoData);
        assert!(report.to_table().starts_with("no measured lag: nothing"));
    }

    #[test]
    fn prometheus_answers() {
        let body = r#"{"status":"success","data":{"resultType":"vector","result":[
            {"metric":{"instance":"10.0.0.1:9108","node":"node-1"},"value":[1,"0.25"]},
            {"metric":{"instance":"10.0.0.2:9108","node":"node-2"},"value":[1,"1.5"]},
            {"metric":{"instance":"10.0.0.3:9108"},"value":[1,"NaN"]}]}}"#;
        let p99 = parse_prometheus_vector(body).unwrap();
        let p999 = parse_prometheus_vector(body.replace("1.5", "+Inf").as_str()).unwrap();
        let count =
            parse_prometheus_vector(r#"{"status":"success","data":{"result":[{"metric":{},"value":[1,"42"]}]}}"#)
                .unwrap();
        let m = measurement_from_prometheus(&p99, &p999, &count, "http://p", "7d").unwrap();
        assert_eq!((m.p99_seconds, m.p999_seconds), (1.5, 300.0));
        assert_eq!((m.worst_node.as_deref(), m.nodes, m.samples), (Some("node-2"), 2, 42));
        assert!(!m.p999_estimated);
        let nan = parse_prometheus_vector(&body.replace("0.25", "NaN").replace("1.5", "NaN")).unwrap();
        assert!(measurement_from_prometheus(&nan, &nan, &count, "http://p", "7d").is_err());
        assert!(measurement_from_prometheus(&p99, &p99, &[], "http://p", "7d").is_err());
        let err = parse_prometheus_vector(r#"{"status":"error","errorType":"bad_data","error":"parse error"}"#);
        assert_eq!(err.unwrap_err(), "Prometheus answered bad_data: parse error");
        assert_eq!(
            prometheus_count_query("1d"),
            r#"sum(increase(kube_converge_end_to_end_lag_seconds_count{change="removed"}[1d]))"#
        );
    }

    #[test]
    fn prometheus_urls_and_http_answers() {
        let u = PrometheusUrl::parse("http://prometheus.monitoring:9090/prom/").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.prefix.as_str()),
            ("prometheus.monitoring", 9090, "/prom")
        );
        let u = PrometheusUrl::parse("http://[::1]:9090").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 9090));
        assert_eq!(PrometheusUrl::parse("http://prom").unwrap().port, 80);
        for bad in ["https://prom", "prom:9090", "http://", "http://prom:x", "ftp://prom"] {
            assert!(PrometheusUrl::parse(bad).is_err(), "{bad}");
        }
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n{\"a\"\r\n3\r\n:1}\r\n0\r\n\r\n";
        assert_eq!(parse_http_response(chunked).unwrap(), (200, "{\"a\":1}".into()));
        let sized = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 2\r\n\r\n{}xx";
        assert_eq!(parse_http_response(sized).unwrap(), (400, "{}".into()));
        assert!(parse_http_response(b"garbage").is_err());
        assert_eq!(parse_promql_window("7d"), Ok("7d".into()));
        for bad in ["7", "d", "0d", "1.5h", "7days"] {
            assert!(parse_promql_window(bad).is_err(), "{bad}");
        }
    }
}
