//! The operator workflow made exact: `isolate` relabels a pod out of its Services and waits
//! until every node has stopped routing to it, `restore` puts the labels back and waits for
//! the additions, `status` shows the nodes. Also the "converged" pod annotation.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{IsTerminal, Write};
use std::time::Duration;

use anyhow::Context;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

use crate::crd::{NodeConvergence, CONVERGED_ANNOTATION, ORIGINAL_LABELS_ANNOTATION};
use crate::hold::{hold_until_converged, resolve, Feed, HoldOptions, HoldReport, HoldTarget};
use crate::model::Timestamp;

/// How to change the pod's labels.
#[derive(Clone, Debug, PartialEq)]
pub enum Relabel {
    Set(String, String),
    Remove(String),
    /// The first selector key of the first Service selecting the pod, value + "-offline".
    Default,
}

/// Services in the pod's namespace whose selector matches `labels`.
async fn selecting(client: &Client, ns: &str, labels: &BTreeMap<String, String>) -> anyhow::Result<Vec<Service>> {
    let api: Api<Service> = Api::namespaced(client.clone(), ns);
    let all = api
        .list(&ListParams::default())
        .await
        .context("listing Services")?
        .items;
    Ok(all
        .into_iter()
        .filter(|s| {
            let sel = s.spec.as_ref().and_then(|sp| sp.selector.clone()).unwrap_or_default();
            !sel.is_empty() && sel.iter().all(|(k, v)| labels.get(k) == Some(v))
        })
        .collect())
}

/// Prints progress: a redrawn bar on a terminal, a line per change otherwise.
pub struct Progress {
    tty: bool,
    last: String,
}

impl Default for Progress {
    fn default() -> Self {
        Self {
            tty: std::io::stderr().is_terminal(),
            last: String::new(),
        }
    }
}

impl Progress {
    pub fn update(&mut self, r: &HoldReport) {
        let total = r.nodes.len().max(1);
        let done = r.converged_nodes();
        let waiting = r.waiting_on();
        let api = if r.changed_in_api {
            ""
        } else {
            " (the API does not show the change yet)"
        };
        let text = if waiting.is_empty() {
            format!("{done}/{total} nodes converged{api}")
        } else {
            format!("{done}/{total} nodes converged; waiting on {}{api}", waiting.join(", "))
        };
        let mut err = std::io::stderr();
        if self.tty {
            let width = 20;
            let filled = done * width / total;
            let _ = write!(
                err,
                "\r\x1b[2K[{}{}] {text} ({:.0}s)",
                "#".repeat(filled),
                "-".repeat(width - filled),
                r.waited_seconds
            );
            if r.converged {
                let _ = writeln!(err);
            }
        } else if text != self.last {
            let _ = writeln!(err, "{text}");
        }
        self.last = text;
    }

    pub fn finish(&self) {
        if self.tty {
            let _ = writeln!(std::io::stderr());
        }
    }
}

/// Relabels `pod` out of its Services and waits until every node has converged.
pub async fn isolate(
    client: &Client,
    ns: &str,
    pod_name: &str,
    relabel: Relabel,
    force: bool,
    opts: &HoldOptions,
    progress: &mut Progress,
) -> anyhow::Result<HoldReport> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let pod = pods
        .get(pod_name)
        .await
        .with_context(|| format!("getting pod {ns}/{pod_name}"))?;
    let labels = pod.labels().clone();
    let services = selecting(client, ns, &labels).await?;
    if services.is_empty() {
        anyhow::bail!("pod {ns}/{pod_name} is in no Service (no selector matches its labels): nothing routes to it");
    }
    let (key, value) = match relabel {
        Relabel::Set(k, v) => (k, Some(v)),
        Relabel::Remove(k) => (k, None),
        Relabel::Default => {
            let sel = services[0]
                .spec
                .as_ref()
                .and_then(|s| s.selector.clone())
                .unwrap_or_default();
            let (k, v) = sel
                .into_iter()
                .next()
                .context("the selecting Service has an empty selector")?;
            (k, Some(format!("{v}-offline")))
        }
    };
    let mut after = labels.clone();
    match &value {
        Some(v) => after.insert(key.clone(), v.clone()),
        None => after.remove(&key),
    };
    let still: Vec<String> = selecting(client, ns, &after)
        .await?
        .iter()
        .map(|s| s.name_any())
        .collect();
    if !still.is_empty() {
        anyhow::bail!(
            "after changing {key} the pod would still be selected by Service(s) {}; choose a label that leaves them",
            still.join(", ")
        );
    }
    let names: BTreeSet<String> = services.iter().map(|s| s.name_any()).collect();
    if !force {
        let ips: BTreeSet<String> = pod
            .status
            .as_ref()
            .map(|s| {
                let mut ips: BTreeSet<String> = s.pod_ips.iter().flatten().map(|p| p.ip.clone()).collect();
                ips.extend(s.pod_ip.clone());
                ips
            })
            .unwrap_or_default();
        let down = left_without_ready_endpoints(client, ns, &names, &ips).await?;
        if !down.is_empty() {
            anyhow::bail!(
                "pod {ns}/{pod_name} is the last ready endpoint of Service(s) {}: isolating it takes them down; pass --force to isolate it anyway",
                down.join(", ")
            );
        }
    }
    // Watch before the change: a slice the relabel empties is deleted, and only a watch sees
    // the version of that deletion.
    let target = HoldTarget {
        namespace: ns.into(),
        pod: Some(pod_name.into()),
        ip: None,
        services: names.clone(),
        addition: false,
    };
    let subject = resolve(client, &target).await?;
    let feed = Feed::start(client, ns);
    feed.synced(opts.timeout.max(Duration::from_secs(10))).await?;
    let original = json!({ key.clone(): labels.get(&key) }).to_string();
    let patch = json!({"metadata": {
        "resourceVersion": pod.resource_version(),
        "labels": { key.clone(): value },
        "annotations": { ORIGINAL_LABELS_ANNOTATION: original },
    }});
    pods.patch(pod_name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .with_context(|| format!("relabelling pod {ns}/{pod_name} (it may have changed meanwhile: retry)"))?;
    eprintln!(
        "isolated {ns}/{pod_name} from {} by setting {key}={}",
        names.iter().cloned().collect::<Vec<_>>().join(", "),
        value.as_deref().unwrap_or("<removed>")
    );
    let report = feed.wait(&subject, &target, opts, |r| progress.update(r)).await?;
    progress.finish();
    if report.converged {
        annotate_converged(client, ns, pod_name).await;
    }
    Ok(report)
}

/// The Services among `services` that no ready endpoint other than `ips` serves, from their
/// EndpointSlices (an endpoint with no `ready` condition counts as ready, as kube-proxy counts
/// it).
async fn left_without_ready_endpoints(
    client: &Client,
    ns: &str,
    services: &BTreeSet<String>,
    ips: &BTreeSet<String>,
) -> anyhow::Result<Vec<String>> {
    let slices: Api<k8s_openapi::api::discovery::v1::EndpointSlice> = Api::namespaced(client.clone(), ns);
    let mut out = Vec::new();
    for svc in services {
        let list = slices
            .list(&ListParams::default().labels(&format!("kubernetes.io/service-name={svc}")))
            .await
            .with_context(|| format!("listing the EndpointSlices of Service {ns}/{svc}"))?;
        let others = list.items.iter().flat_map(|s| s.endpoints.iter().flatten()).any(|e| {
            e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true) && e.addresses.iter().any(|a| !ips.contains(a))
        });
        if !others {
            out.push(svc.clone());
        }
    }
    Ok(out)
}

/// Puts back the labels `isolate` changed and waits for every node to route to the pod again.
pub async fn restore(
    client: &Client,
    ns: &str,
    pod_name: &str,
    opts: &HoldOptions,
    progress: &mut Progress,
) -> anyhow::Result<HoldReport> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let pod = pods
        .get(pod_name)
        .await
        .with_context(|| format!("getting pod {ns}/{pod_name}"))?;
    let saved = pod.annotations().get(ORIGINAL_LABELS_ANNOTATION).with_context(|| {
        format!(
            "pod {ns}/{pod_name} has no {ORIGINAL_LABELS_ANNOTATION} annotation: it was not isolated by kube-converge"
        )
    })?;
    let original: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(saved).with_context(|| format!("reading the {ORIGINAL_LABELS_ANNOTATION} annotation"))?;
    let patch = json!({"metadata": {
        "resourceVersion": pod.resource_version(),
        "labels": original,
        "annotations": { ORIGINAL_LABELS_ANNOTATION: null, CONVERGED_ANNOTATION: null },
    }});
    let restored = pods
        .patch(pod_name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .context("restoring the labels")?;
    let names: BTreeSet<String> = selecting(client, ns, restored.labels())
        .await?
        .iter()
        .map(|s| s.name_any())
        .collect();
    eprintln!("restored the labels of {ns}/{pod_name}; waiting for every node to route to it again");
    let target = HoldTarget {
        namespace: ns.into(),
        pod: Some(pod_name.into()),
        ip: None,
        services: names,
        addition: true,
    };
    let report = hold_until_converged(client, &target, opts, |r| progress.update(r)).await?;
    progress.finish();
    Ok(report)
}

/// Marks the pod converged everywhere, so other automation can `kubectl wait` for it. Best
/// effort: a failure is logged, never fatal.
pub async fn annotate_converged(client: &Client, ns: &str, pod: &str) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let patch = json!({"metadata": {"annotations": { CONVERGED_ANNOTATION: Timestamp::now().to_rfc3339() }}});
    if let Err(e) = pods.patch(pod, &PatchParams::default(), &Patch::Merge(&patch)).await {
        tracing::warn!(pod, error = %e, "could not annotate the pod as converged");
    }
}

/// Deletes the pod after isolation.
pub async fn delete_pod(client: &Client, ns: &str, pod: &str) -> anyhow::Result<()> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    pods.delete(pod, &DeleteParams::default())
        .await
        .with_context(|| format!("deleting pod {ns}/{pod}"))?;
    Ok(())
}

/// One line per node from the NodeConvergence objects.
pub async fn status_table(client: &Client) -> anyhow::Result<String> {
    let api: Api<NodeConvergence> = Api::all(client.clone());
    let list = api
        .list(&ListParams::default())
        .await
        .context("listing NodeConvergence objects (is the CRD installed?)")?;
    let now = Timestamp::now();
    let mut rows = vec![[
        "NODE".to_string(),
        "MODE".into(),
        "HEALTH".into(),
        "PENDING".into(),
        "P99 LAG".into(),
        "HEARTBEAT".into(),
    ]];
    for nc in list.items {
        let st = nc.status.clone().unwrap_or_default();
        let age = Timestamp::parse_rfc3339(&st.heartbeat_time)
            .map_or("-".into(), |t| format!("{:.0}s ago", now.seconds_since(t)));
        rows.push([
            nc.spec.node_name.clone(),
            st.mode,
            st.health,
            st.pending_count.to_string(),
            st.lag_p99_seconds.map_or("-".into(), |v| format!("{v:.3}s")),
            age,
        ]);
    }
    Ok(crate::table::render(&rows))
}
