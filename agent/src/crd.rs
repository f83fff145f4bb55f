//! The per-node custom resource `NodeConvergence`: one cluster-scoped object per node, named
//! after the node, whose status says what the node's agent sees. The CRD YAML in `deploy/` is
//! generated from these types (`kube-converge crd`) and a test keeps the committed copy fresh.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub const GROUP: &str = "converge.kube-converge.io";
/// Set on a pod once every node has converged for it (by `isolate` and `/v1/hold?annotate=true`).
pub const CONVERGED_ANNOTATION: &str = "converge.kube-converge.io/converged";
/// The labels `isolate` changed, for `restore`.
pub const ORIGINAL_LABELS_ANNOTATION: &str = "converge.kube-converge.io/original-labels";

#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[kube(
    group = "converge.kube-converge.io",
    version = "v1alpha1",
    kind = "NodeConvergence",
    plural = "nodeconvergences",
    shortname = "nconv",
    status = "NodeConvergenceStatus",
    printcolumn = r#"{"name":"Node","type":"string","jsonPath":".spec.nodeName"}"#,
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".status.mode"}"#,
    printcolumn = r#"{"name":"Health","type":"string","jsonPath":".status.health"}"#,
    printcolumn = r#"{"name":"Pending","type":"integer","jsonPath":".status.pendingCount"}"#,
    printcolumn = r#"{"name":"P99 Lag","type":"number","jsonPath":".status.lagP99Seconds"}"#,
    printcolumn = r#"{"name":"Heartbeat","type":"date","jsonPath":".status.heartbeatTime"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct NodeConvergenceSpec {
    pub node_name: String,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NodeConvergenceStatus {
    /// kube-proxy's mode as the agent reads it: iptables, nftables, ipvs or unknown.
    #[serde(default)]
    pub mode: String,
    #[serde(default)]
    pub backend: String,
    /// Healthy, Degraded (reads fail or rules are not understood) or Unknown.
    #[serde(default)]
    pub health: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_message: Option<String>,
    /// Changes this node's kernel has not made yet (bounded; see pendingTruncated).
    #[serde(default)]
    pub pending: Vec<PendingEndpoint>,
    #[serde(default)]
    pub pending_count: u32,
    /// How many pending changes did not fit in `pending`.
    #[serde(default)]
    pub pending_truncated: u32,
    /// Endpoints the kernel still routes although they are neither expected nor pending
    /// (bounded; see staleTruncated). Holds wait on them.
    #[serde(default)]
    pub stale: Vec<StaleEndpoint>,
    #[serde(default)]
    pub stale_truncated: u32,
    /// Families (`ipv4`, `ipv6`) whose stale endpoints are not known (a failed or partial
    /// read): holds wait on this node for addresses in them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stale_unknown: Vec<String>,
    /// The highest EndpointSlice resourceVersion the agent has processed.
    #[serde(default)]
    pub observed_resource_version: String,
    /// The highest Service resourceVersion the agent has processed (traffic policies move what
    /// kube-proxy should route).
    #[serde(default)]
    pub observed_service_resource_version: String,
    /// The agent's watch scope (`--namespace`, `--label-selector`): a hold counts a node whose
    /// agent does not watch the pod's Service as a node without an agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watch_namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watch_label_selector: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag_p50_seconds: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag_p99_seconds: Option<f64>,
    /// The measurements behind the percentiles (recent window).
    #[serde(default)]
    pub lag_samples: u32,
    /// The most recent converged changes with their lags (bounded).
    #[serde(default)]
    pub recent: Vec<ConvergedEndpoint>,
    /// New connections this node sent to recently removed endpoints (conntrack), while each
    /// removal is pending and for the traffic window after it converged (bounded).
    #[serde(default)]
    pub traffic: Vec<RemovedEndpointTraffic>,
    /// When the agent last wrote this status (RFC 3339).
    #[serde(default)]
    pub heartbeat_time: String,
    #[serde(default)]
    pub agent_version: String,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PendingEndpoint {
    pub namespace: String,
    pub service: String,
    /// The Service port name ("" for an unnamed port).
    pub port: String,
    pub protocol: String,
    /// `ip:port` (`[ip]:port` for IPv6).
    pub endpoint: String,
    pub ip: String,
    /// removed or added.
    pub change: String,
    pub reason: String,
    /// pending, unknown or timed_out.
    pub state: String,
    pub observed_time: String,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RemovedEndpointTraffic {
    pub namespace: String,
    pub service: String,
    pub port: String,
    pub protocol: String,
    /// `ip:port` (`[ip]:port` for IPv6).
    pub endpoint: String,
    pub ip: String,
    pub reason: String,
    /// Connections before this node's kernel dropped the endpoint (the lag's cost).
    pub before_converged: u64,
    /// Connections after the agent reported it dropped: must be 0 (a false converged).
    pub after_converged: u64,
    /// The removal has converged on this node.
    pub converged: bool,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StaleEndpoint {
    pub namespace: String,
    pub service: String,
    pub port: String,
    pub protocol: String,
    /// `ip:port` (`[ip]:port` for IPv6).
    pub endpoint: String,
    pub ip: String,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ConvergedEndpoint {
    pub namespace: String,
    pub service: String,
    pub endpoint: String,
    pub ip: String,
    pub change: String,
    pub reason: String,
    pub lag_seconds: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_to_end_seconds: Option<f64>,
    pub programmed_time: String,
}

/// The CRD as YAML, as committed under `deploy/`.
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt;
    let crd = NodeConvergence::crd();
    let body = serde_saphyr::to_string(&crd).unwrap_or_default();
    format!("# Generated by `kube-converge crd`; do not edit. CI checks it is up to date.\n{body}")
}

/// Status fields left out of the serialization when empty. A JSON merge patch keeps whatever
/// field it omits, so the status patch names each of them as `null` when it has no value:
/// otherwise an old `staleUnknown` (which holds wait on) or `healthMessage` outlives its cause.
pub const STATUS_OMITTABLE_FIELDS: [&str; 6] = [
    "healthMessage",
    "staleUnknown",
    "watchNamespace",
    "watchLabelSelector",
    "lagP50Seconds",
    "lagP99Seconds",
];

/// The merge patch that makes the stored status equal `status`, fields it lacks included.
pub fn status_merge_patch(status: &NodeConvergenceStatus) -> serde_json::Value {
    let mut value = serde_json::to_value(status).unwrap_or_default();
    if let Some(map) = value.as_object_mut() {
        for field in STATUS_OMITTABLE_FIELDS {
            map.entry(field).or_insert(serde_json::Value::Null);
        }
    }
    serde_json::json!({ "status": value })
}

#[cfg(test)]
mod tests {
    #[test]
    fn status_patch_clears_every_field_an_empty_status_omits() {
        // Every field that an empty status leaves out is in the list, so a patch clears it.
        let empty = serde_json::to_value(NodeConvergenceStatus::default()).unwrap();
        let full = NodeConvergenceStatus {
            health_message: Some("m".into()),
            stale_unknown: vec!["ipv4".into()],
            watch_namespace: Some("n".into()),
            watch_label_selector: Some("a=b".into()),
            lag_p50_seconds: Some(1.0),
            lag_p99_seconds: Some(2.0),
            ..Default::default()
        };
        let full = serde_json::to_value(&full).unwrap();
        let omitted: Vec<&String> = full
            .as_object()
            .unwrap()
            .keys()
            .filter(|k| !empty.as_object().unwrap().contains_key(*k))
            .collect();
        for k in &omitted {
            assert!(
                STATUS_OMITTABLE_FIELDS.contains(&k.as_str()),
                "{k} is omitted when empty but not cleared by the patch"
            );
        }
        let patch = status_merge_patch(&NodeConvergenceStatus::default());
        for k in STATUS_OMITTABLE_FIELDS {
            assert_eq!(patch["status"][k], serde_json::Value::Null, "{k}");
            assert!(
                patch["status"].as_object().unwrap().contains_key(k),
                "{k} must be an explicit null"
            );
        }
        // Merged onto an old status, the patch leaves none of the old values.
        let mut stored = serde_json::json!({"status": full});
        json_patch::merge(&mut stored, &patch);
        for k in STATUS_OMITTABLE_FIELDS {
            assert!(stored["status"].get(k).is_none(), "{k} survived the patch: {stored}");
        }
    }

    use super::*;

    #[test]
    fn committed_crd_is_up_to_date() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/base/crd.yaml");
        let committed = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            committed == crd_yaml(),
            "deploy/base/crd.yaml is stale: run `cargo run -- crd > deploy/base/crd.yaml` and commit it"
        );
    }

    #[test]
    fn crd_is_cluster_scoped_with_status_and_columns() {
        let yaml = crd_yaml();
        for needle in [
            "scope: Cluster",
            "nodeconvergences",
            "status: {}",
            "Heartbeat",
            "type: date",
            "nconv",
        ] {
            assert!(yaml.contains(needle), "{needle} missing from:\n{yaml}");
        }
    }
}
