//! A kubelet stand-in, as kwok plays it: a pod bound to one of our nodes gets a running, ready
//! status with an address from that node's pod CIDR; a pod being deleted is finished (deleted
//! with grace 0) once its containers would have stopped.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};
use kube::runtime::{watcher, WatchStreamExt};
use kube_converge::model::Timestamp;

/// How long a terminating pod's containers take to stop, unless the pod's annotation
/// `kc-test/stop-after` (seconds) says otherwise; never longer than its grace period.
pub const STOP_AFTER: Duration = Duration::from_secs(2);

#[derive(Clone, Default)]
pub struct Kubelet {
    /// node name -> node index (its pod CIDR is 10.244.<index>.0/24).
    nodes: Arc<BTreeMap<String, usize>>,
    next_ip: Arc<Mutex<BTreeMap<usize, u32>>>,
    finishing: Arc<Mutex<BTreeSet<String>>>,
}

impl Kubelet {
    pub fn new(nodes: BTreeMap<String, usize>) -> Self {
        Self {
            nodes: Arc::new(nodes),
            ..Default::default()
        }
    }

    /// Runs until the task is aborted.
    pub fn spawn(self, client: kube::Client) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let pods: Api<Pod> = Api::all(client.clone());
            // With backoff: without it, errors (an API server restarting or gone) come back
            // at once and the loop never yields, which also blocks the runtime's shutdown.
            let mut stream = watcher(pods, watcher::Config::default()).default_backoff().boxed();
            while let Some(ev) = stream.next().await {
                let list = match ev {
                    Ok(watcher::Event::Apply(p)) | Ok(watcher::Event::InitApply(p)) => vec![p],
                    _ => continue,
                };
                for pod in list {
                    self.handle(&client, pod).await;
                }
            }
        })
    }

    async fn handle(&self, client: &kube::Client, pod: Pod) {
        let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) else {
            return;
        };
        let Some(&index) = self.nodes.get(&node) else { return };
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
        if pod.metadata.deletion_timestamp.is_some() {
            let uid = pod.metadata.uid.clone().unwrap_or_default();
            if !self.finishing.lock().unwrap().insert(uid.clone()) {
                return;
            }
            let grace = Duration::from_secs(pod.metadata.deletion_grace_period_seconds.unwrap_or(0).max(0) as u64);
            let stop = pod
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get("kc-test/stop-after"))
                .and_then(|v| v.parse::<f64>().ok())
                .map(Duration::from_secs_f64)
                .unwrap_or(STOP_AFTER)
                .min(grace);
            tokio::spawn(async move {
                tokio::time::sleep(stop).await;
                let dp = DeleteParams {
                    grace_period_seconds: Some(0),
                    preconditions: Some(Preconditions {
                        uid: Some(uid),
                        resource_version: None,
                    }),
                    ..Default::default()
                };
                let _ = api.delete(&name, &dp).await;
            });
            return;
        }
        if pod.status.as_ref().and_then(|s| s.pod_ip.as_ref()).is_some() {
            return;
        }
        let host = {
            let mut next = self.next_ip.lock().unwrap();
            let n = next.entry(index).or_insert(10);
            *n += 1;
            *n
        };
        let pod_ip = format!("10.244.{index}.{host}");
        let node_ip = format!("10.200.{index}.2");
        let now = Timestamp::now().to_rfc3339();
        let cond = |t: &str| serde_json::json!({"type": t, "status": "True", "lastTransitionTime": now});
        let status = serde_json::json!({"status": {
            "phase": "Running",
            "podIP": pod_ip, "podIPs": [{"ip": pod_ip}],
            "hostIP": node_ip, "hostIPs": [{"ip": node_ip}],
            "startTime": now,
            "conditions": [cond("PodScheduled"), cond("Initialized"), cond("ContainersReady"), cond("Ready")],
        }});
        if let Err(e) = api
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
            .await
        {
            eprintln!("kubelet: status of {ns}/{name}: {e}");
        }
    }
}
