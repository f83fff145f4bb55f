//! A running real cluster, as the tier and the demo use it: the control plane with our
//! `deploy/base` applied, one node per kube-proxy mode (node-0 iptables-nft, node-1
//! iptables-legacy, node-2 nftables), each with its agent under the ServiceAccount's token,
//! the kubelet stand-in, a `demo` namespace and an operator ServiceAccount for the CLI.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Pod, Service, ServiceAccount};
use kube::api::{Api, DeleteParams, PostParams};
use kube_converge::crd::NodeConvergence;
use kube_converge::model::Timestamp;

use crate::kubelet::Kubelet;
use crate::{agent_binary, k8s_bin_dir, Cluster, Node, ProxyMode};

/// The namespace the scenarios and the demo use.
pub const NS: &str = "demo";
const WAIT: Duration = Duration::from_secs(90);

pub struct World {
    pub cluster: Cluster,
    pub nodes: Vec<Node>,
    /// The `kube-converge` binary.
    pub agent: std::path::PathBuf,
    /// The `kube-converge` ServiceAccount's token, as the agents use it.
    pub token: String,
    /// A kubeconfig with the token of `demo/operator`, bound to the kube-converge-operator role:
    /// the CLI runs as an operator would.
    pub operator: std::path::PathBuf,
    /// The kubelet stand-in's task, stopped with the world.
    pub kubelet: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for World {
    fn drop(&mut self) {
        if let Some(k) = self.kubelet.take() {
            k.abort();
        }
    }
}

impl World {
    /// Fails with a log tail if a component died.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        self.cluster.check_alive()?;
        for n in &mut self.nodes {
            n.check_alive()?;
        }
        Ok(())
    }
}

pub async fn start() -> anyhow::Result<World> {
    let bin = k8s_bin_dir()?;
    let agent = agent_binary()?;
    let cluster = Cluster::start(&bin).await?;
    let root = crate::repo_root();
    cluster.kubectl(&["apply", "-k", &root.join("deploy/base").display().to_string()])?;
    cluster.kubectl(&[
        "wait",
        "--for=condition=Established",
        "crd/nodeconvergences.converge.kube-converge.io",
        "--timeout=60s",
    ])?;
    let token = cluster
        .kubectl(&[
            "create",
            "token",
            "kube-converge",
            "-n",
            "kube-converge",
            "--duration=6h",
        ])?
        .trim()
        .to_string();
    let nss: Api<Namespace> = Api::all(cluster.admin.clone());
    nss.create(
        &PostParams::default(),
        &serde_json::from_value(serde_json::json!({"metadata": {"name": NS}}))?,
    )
    .await?;
    // No ServiceAccount controller runs: create the namespace's default account ourselves.
    let sas: Api<ServiceAccount> = Api::namespaced(cluster.admin.clone(), NS);
    sas.create(
        &PostParams::default(),
        &serde_json::from_value(serde_json::json!({"metadata": {"name": "default"}}))?,
    )
    .await?;
    cluster.kubectl(&["create", "serviceaccount", "operator", "-n", NS])?;
    cluster.kubectl(&[
        "create",
        "clusterrolebinding",
        "kc-test-operator",
        "--clusterrole=kube-converge-operator",
        &format!("--serviceaccount={NS}:operator"),
    ])?;
    let op_token = cluster.kubectl(&["create", "token", "operator", "-n", NS, "--duration=6h"])?;
    let operator = cluster.dir.join("operator.kubeconfig");
    std::fs::write(
        &operator,
        crate::cluster::kubeconfig(
            &cluster.dir,
            &format!("https://127.0.0.1:{}", cluster.port),
            op_token.trim(),
        ),
    )?;
    let mut env = World {
        cluster,
        nodes: Vec::new(),
        agent,
        token,
        operator,
        kubelet: None,
    };
    let mut index = BTreeMap::new();
    for (i, mode) in ProxyMode::ALL.into_iter().enumerate() {
        let mut node = Node::create(&env.cluster, i, mode).await?;
        node.start_kube_proxy(&env.cluster)?;
        index.insert(node.name.clone(), i);
        env.nodes.push(node);
    }
    env.kubelet = Some(Kubelet::new(index).spawn(env.cluster.admin.clone()));
    for i in 0..env.nodes.len() {
        let (cluster, token, agent) = (&env.cluster, env.token.clone(), env.agent.clone());
        env.nodes[i].start_agent(cluster, &agent, &token)?;
    }
    // Every agent publishes, having detected its node's mode from the kernel.
    let want: BTreeMap<String, (&str, &str)> = env
        .nodes
        .iter()
        .map(|n| {
            let (mode, backend) = match n.mode {
                ProxyMode::IptablesNft => ("iptables", "nft"),
                ProxyMode::IptablesLegacy => ("iptables", "legacy"),
                ProxyMode::Nftables => ("nftables", ""),
            };
            (n.name.clone(), (mode, backend))
        })
        .collect();
    let ncs: Api<NodeConvergence> = Api::all(env.cluster.admin.clone());
    let deadline = Instant::now() + WAIT;
    loop {
        env.check_alive()?;
        let list = ncs.list(&Default::default()).await?;
        let ok = want.iter().all(|(node, (mode, backend))| {
            list.items.iter().any(|nc| {
                nc.spec.node_name == *node
                    && nc.status.as_ref().is_some_and(|s| {
                        s.mode == *mode && (backend.is_empty() || s.backend == *backend) && s.health_message.is_none()
                    })
            })
        });
        if ok {
            env.cluster.keep = std::env::var_os("KC_REAL_KEEP").is_some();
            return Ok(env);
        }
        if Instant::now() > deadline {
            let seen: Vec<String> = list
                .items
                .iter()
                .map(|nc| {
                    format!(
                        "{}: {:?}",
                        nc.spec.node_name,
                        nc.status
                            .as_ref()
                            .map(|s| (&s.mode, &s.backend, &s.health, &s.health_message))
                    )
                })
                .collect();
            anyhow::bail!("agents did not all report their node's mode and health ok: want {want:?}, seen {seen:?}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

// ---- objects, and what the agents say about them ----

pub async fn create_pod(
    env: &World,
    name: &str,
    labels: serde_json::Value,
    node: usize,
    grace: i64,
) -> anyhow::Result<String> {
    create_pod_annotated(env, name, labels, node, grace, serde_json::json!({})).await
}

pub async fn create_pod_annotated(
    env: &World,
    name: &str,
    labels: serde_json::Value,
    node: usize,
    grace: i64,
    annotations: serde_json::Value,
) -> anyhow::Result<String> {
    let pods: Api<Pod> = Api::namespaced(env.cluster.admin.clone(), NS);
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "labels": labels, "annotations": annotations},
        "spec": {
            "nodeName": env.nodes[node].name,
            "terminationGracePeriodSeconds": grace,
            "containers": [{"name": "app", "image": "registry.invalid/app:1", "ports": [{"containerPort": 8080}]}],
        },
    }))?;
    pods.create(&PostParams::default(), &pod).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let p = pods.get(name).await?;
        if let Some(ip) = p.status.and_then(|s| s.pod_ip) {
            return Ok(ip);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "pod {name} got no IP from the kubelet stand-in"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn create_service(env: &World, name: &str, selector: serde_json::Value) -> anyhow::Result<()> {
    let svcs: Api<Service> = Api::namespaced(env.cluster.admin.clone(), NS);
    let svc: Service = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "spec": {"selector": selector, "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]},
    }))?;
    svcs.create(&PostParams::default(), &svc).await?;
    Ok(())
}

pub async fn delete_pod(env: &World, name: &str, grace: Option<i64>) -> anyhow::Result<()> {
    let pods: Api<Pod> = Api::namespaced(env.cluster.admin.clone(), NS);
    let dp = DeleteParams {
        grace_period_seconds: grace.map(|g| g as u32),
        ..Default::default()
    };
    pods.delete(name, &dp).await?;
    Ok(())
}

pub async fn wait_pod_gone(env: &World, name: &str) -> anyhow::Result<()> {
    let pods: Api<Pod> = Api::namespaced(env.cluster.admin.clone(), NS);
    let deadline = Instant::now() + Duration::from_secs(60);
    while pods.get_opt(name).await?.is_some() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "pod {name} was never finished by the kubelet stand-in"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// Waits until every node's agent reports `change` ("added"/"removed") of `ip` programmed after
/// `since`; returns each node's t_programmed.
pub async fn wait_programmed(
    env: &mut World,
    ip: &str,
    change: &str,
    since: Timestamp,
) -> anyhow::Result<Vec<Timestamp>> {
    let ncs: Api<NodeConvergence> = Api::all(env.cluster.admin.clone());
    let deadline = Instant::now() + WAIT;
    let mut last_progress = Instant::now();
    loop {
        env.check_alive()?;
        let list = ncs.list(&Default::default()).await?;
        let mut found = Vec::new();
        for node in &env.nodes {
            let t = list
                .items
                .iter()
                .filter(|nc| nc.spec.node_name == node.name)
                .filter_map(|nc| nc.status.as_ref())
                .flat_map(|s| s.recent.iter())
                .filter(|r| r.ip == ip && r.change == change)
                .filter_map(|r| Timestamp::parse_rfc3339(&r.programmed_time))
                .filter(|t| *t >= since)
                .min();
            found.push(t);
        }
        if found.iter().all(|t| t.is_some()) {
            return Ok(found.into_iter().flatten().collect());
        }
        let waiting: Vec<&str> = env
            .nodes
            .iter()
            .zip(&found)
            .filter(|(_, t)| t.is_none())
            .map(|(n, _)| n.name.as_str())
            .collect();
        if Instant::now() > deadline {
            let pending: Vec<String> = list
                .items
                .iter()
                .filter_map(|nc| {
                    nc.status.as_ref().map(|s| {
                        format!(
                            "{}: pending {:?} health {}",
                            nc.spec.node_name,
                            s.pending
                                .iter()
                                .map(|p| (&p.ip, &p.change, &p.state))
                                .collect::<Vec<_>>(),
                            s.health
                        )
                    })
                })
                .collect();
            anyhow::bail!("{ip} {change}: no agent report after {WAIT:?} on {waiting:?}; {pending:?}");
        }
        if last_progress.elapsed() > Duration::from_secs(10) {
            eprintln!("  waiting for {ip} {change} on {waiting:?}");
            last_progress = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
