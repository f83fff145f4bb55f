//! One scenario suite for the API semantics kube-converge relies on, run against the real
//! kube-apiserver and against the fake one (`kc_sim::apiserver`). The real server
//! must pass every check. The fake must agree, except where `FAKE_DIFFERS` documents that it
//! differs. There the fake must really differ, so the list stays true.

use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube_converge::crd::{NodeConvergence, NodeConvergenceSpec, NodeConvergenceStatus};
use serde_json::json;

/// Checks on which the fake API server knowingly differs from the real one, and why. This is
/// the one place that documents the differences; `tests/README.md` repeats it.
pub const FAKE_DIFFERS: &[(&str, &str)] = &[
    (
        "rbac_forbids_an_unbound_identity",
        "the fake authenticates no one and authorizes everything; it records each user's calls \
         instead (agent/tests/deploy.rs compares them with the roles)",
    ),
    (
        "kubectl_get_prints_the_printer_columns",
        "the fake serves no server-side tables (as=Table): kubectl prints NAME and AGE only",
    ),
];

pub struct Target {
    pub client: kube::Client,
    /// A client whose identity no role binds.
    pub unbound: kube::Client,
    /// kubectl of the pinned release, and a kubeconfig for this server.
    pub kubectl: std::path::PathBuf,
    pub kubeconfig: std::path::PathBuf,
}

const NS: &str = "agree";

fn svc(name: &str, app: &str) -> Service {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": NS, "labels": {"app": app}},
        "spec": {"ports": [{"port": 80, "protocol": "TCP"}]},
    }))
    .expect("literal service")
}

impl Target {
    fn kubectl(&self, args: &[&str]) -> anyhow::Result<String> {
        crate::run(
            std::process::Command::new(&self.kubectl)
                .arg(format!("--kubeconfig={}", self.kubeconfig.display()))
                .args(args),
        )
    }

    /// Every check, in order, with its outcome.
    pub async fn run(&self) -> Vec<(&'static str, anyhow::Result<()>)> {
        let mut out = Vec::new();
        out.push(("create_of_an_existing_object_is_409", self.create_conflict().await));
        out.push(("get_of_a_missing_object_is_404", self.get_missing().await));
        out.push(("list_by_label_selector", self.label_selector().await));
        out.push(("list_nodes_by_field_selector", self.field_selector().await));
        out.push(("status_merge_patch_clears_null_fields", self.status_patch().await));
        out.push(("status_is_ignored_on_the_main_resource", self.status_on_main().await));
        out.push(("graceful_pod_deletion_then_grace_zero", self.graceful_delete().await));
        out.push(("watch_from_a_lists_resource_version", self.watch_from_list().await));
        out.push(("discovery_lists_nodeconvergences", self.discovery()));
        out.push(("rbac_forbids_an_unbound_identity", self.rbac().await));
        out.push(("kubectl_get_prints_the_printer_columns", self.printer_columns()));
        // Leave no NodeConvergence without a node behind (holds look at every one).
        let ncs: Api<NodeConvergence> = Api::all(self.client.clone());
        for name in ["agree-status", "agree-main"] {
            let _ = ncs.delete(name, &DeleteParams::default()).await;
        }
        out
    }

    async fn create_conflict(&self) -> anyhow::Result<()> {
        let api: Api<Service> = Api::namespaced(self.client.clone(), NS);
        api.create(&PostParams::default(), &svc("dup", "x")).await?;
        match api.create(&PostParams::default(), &svc("dup", "x")).await {
            Err(kube::Error::Api(e)) if e.code == 409 && e.reason == "AlreadyExists" => Ok(()),
            other => anyhow::bail!("second create: {other:?}"),
        }
    }

    async fn get_missing(&self) -> anyhow::Result<()> {
        let api: Api<Service> = Api::namespaced(self.client.clone(), NS);
        match api.get("missing").await {
            Err(kube::Error::Api(e)) if e.code == 404 && e.reason == "NotFound" => {}
            other => anyhow::bail!("get: {other:?}"),
        }
        anyhow::ensure!(api.get_opt("missing").await?.is_none());
        Ok(())
    }

    async fn label_selector(&self) -> anyhow::Result<()> {
        let api: Api<Service> = Api::namespaced(self.client.clone(), NS);
        api.create(&PostParams::default(), &svc("sel-a", "a")).await?;
        api.create(&PostParams::default(), &svc("sel-b", "b")).await?;
        let names = |l: kube::core::ObjectList<Service>| -> Vec<String> {
            l.items.into_iter().filter_map(|s| s.metadata.name).collect()
        };
        let a = names(api.list(&ListParams::default().labels("app=a")).await?);
        anyhow::ensure!(a == ["sel-a"], "app=a: {a:?}");
        let not_a = names(api.list(&ListParams::default().labels("app in (b),app!=a")).await?);
        anyhow::ensure!(not_a == ["sel-b"], "set-based: {not_a:?}");
        Ok(())
    }

    async fn field_selector(&self) -> anyhow::Result<()> {
        let api: Api<Node> = Api::all(self.client.clone());
        let name = "agree-node";
        let node: Node = serde_json::from_value(json!({"metadata": {"name": name}}))?;
        api.create(&PostParams::default(), &node).await?;
        let got: Vec<String> = api
            .list(&ListParams::default().fields(&format!("metadata.name={name}")))
            .await?
            .items
            .into_iter()
            .filter_map(|n| n.metadata.name)
            .collect();
        anyhow::ensure!(got == [name], "metadata.name={name}: {got:?}");
        api.delete(name, &DeleteParams::default()).await?;
        Ok(())
    }

    async fn new_nc(&self, name: &str) -> anyhow::Result<Api<NodeConvergence>> {
        let api: Api<NodeConvergence> = Api::all(self.client.clone());
        let nc = NodeConvergence::new(
            name,
            NodeConvergenceSpec {
                node_name: name.to_string(),
            },
        );
        api.create(&PostParams::default(), &nc).await?;
        Ok(api)
    }

    async fn status_patch(&self) -> anyhow::Result<()> {
        let api = self.new_nc("agree-status").await?;
        let first = NodeConvergenceStatus {
            health: "Degraded".into(),
            health_message: Some("reads fail".into()),
            stale_unknown: vec!["ipv4".into()],
            ..Default::default()
        };
        let pp = PatchParams::default();
        api.patch_status(
            "agree-status",
            &pp,
            &Patch::Merge(kube_converge::crd::status_merge_patch(&first)),
        )
        .await?;
        let healthy = NodeConvergenceStatus {
            health: "Healthy".into(),
            ..Default::default()
        };
        api.patch_status(
            "agree-status",
            &pp,
            &Patch::Merge(kube_converge::crd::status_merge_patch(&healthy)),
        )
        .await?;
        let got = api.get("agree-status").await?.status.unwrap_or_default();
        anyhow::ensure!(
            got.health == "Healthy" && got.health_message.is_none() && got.stale_unknown.is_empty(),
            "after the second patch: {got:?}"
        );
        Ok(())
    }

    async fn status_on_main(&self) -> anyhow::Result<()> {
        let api = self.new_nc("agree-main").await?;
        let patch = json!({"metadata": {"labels": {"x": "y"}}, "status": {"health": "Healthy"}});
        let after = api
            .patch("agree-main", &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        anyhow::ensure!(
            after.metadata.labels.is_some_and(|l| l.contains_key("x")),
            "label not applied"
        );
        let health = after.status.map(|s| s.health).unwrap_or_default();
        anyhow::ensure!(
            health.is_empty(),
            "status written through the main resource: {health:?}"
        );
        Ok(())
    }

    async fn graceful_delete(&self) -> anyhow::Result<()> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), NS);
        // Bound to a node no kubelet (or stand-in) serves: nothing finishes the deletion.
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "graceful", "namespace": NS},
            "spec": {"nodeName": "nowhere", "containers": [{"name": "c", "image": "registry.invalid/x:1"}]},
        }))?;
        api.create(&PostParams::default(), &pod).await?;
        let dp = DeleteParams {
            grace_period_seconds: Some(30),
            ..Default::default()
        };
        api.delete("graceful", &dp).await?;
        let p = api.get("graceful").await?;
        anyhow::ensure!(
            p.metadata.deletion_timestamp.is_some(),
            "no deletionTimestamp: {:?}",
            p.metadata
        );
        anyhow::ensure!(
            p.metadata.deletion_grace_period_seconds == Some(30),
            "grace: {:?}",
            p.metadata
        );
        let now = DeleteParams {
            grace_period_seconds: Some(0),
            ..Default::default()
        };
        api.delete("graceful", &now).await?;
        for _ in 0..50 {
            if api.get_opt("graceful").await?.is_none() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        anyhow::bail!("still there after a deletion with grace 0")
    }

    async fn watch_from_list(&self) -> anyhow::Result<()> {
        let api: Api<Service> = Api::namespaced(self.client.clone(), NS);
        let rv = api
            .list(&ListParams::default())
            .await?
            .metadata
            .resource_version
            .unwrap_or_default();
        let mut stream = api.watch(&WatchParams::default().timeout(20), &rv).await?.boxed();
        api.create(&PostParams::default(), &svc("watched", "w")).await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let ev = tokio::time::timeout_at(deadline, stream.next())
                .await
                .map_err(|_| anyhow::anyhow!("no ADDED event within 10 s"))?;
            match ev {
                Some(Ok(WatchEvent::Added(s))) if s.metadata.name.as_deref() == Some("watched") => return Ok(()),
                Some(Ok(_)) => continue,
                other => anyhow::bail!("watch ended: {other:?}"),
            }
        }
    }

    fn discovery(&self) -> anyhow::Result<()> {
        let out = self.kubectl(&["api-resources", "--api-group=converge.kube-converge.io", "-o", "name"])?;
        anyhow::ensure!(out.contains("nodeconvergences"), "api-resources: {out}");
        Ok(())
    }

    async fn rbac(&self) -> anyhow::Result<()> {
        let api: Api<Pod> = Api::namespaced(self.unbound.clone(), NS);
        match api.list(&ListParams::default()).await {
            Err(kube::Error::Api(e)) if e.code == 403 => Ok(()),
            other => anyhow::bail!("an unbound identity listed pods: {:?}", other.map(|l| l.items.len())),
        }
    }

    fn printer_columns(&self) -> anyhow::Result<()> {
        let out = self.kubectl(&["get", "nodeconvergences"])?;
        let header = out.lines().next().unwrap_or_default();
        anyhow::ensure!(
            header.contains("MODE") && header.contains("HEALTH"),
            "header: {header:?}"
        );
        Ok(())
    }
}
