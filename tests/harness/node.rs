//! A node: a network namespace joined to the host by a veth link, a Node object, a real
//! kube-proxy in the namespace, a kube-converge agent reading it (`--netns`), and a listener
//! recording the namespace's nf_tables commits (NEWGEN) as ground truth.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::Node as NodeObject;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube_converge::dataplane::nfnotify::{spawn_listener, Notification};
use kube_converge::model::Timestamp;
use kube_converge::netns::NetNs;

use crate::cluster::{kubeconfig, Cluster};
use crate::{run, Proc};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyMode {
    /// iptables mode, iptables-nft backend.
    IptablesNft,
    /// iptables mode, iptables-legacy backend.
    IptablesLegacy,
    Nftables,
}

impl ProxyMode {
    pub const ALL: [ProxyMode; 3] = [ProxyMode::IptablesNft, ProxyMode::IptablesLegacy, ProxyMode::Nftables];

    pub fn name(self) -> &'static str {
        match self {
            ProxyMode::IptablesNft => "iptables-nft",
            ProxyMode::IptablesLegacy => "iptables-legacy",
            ProxyMode::Nftables => "nftables",
        }
    }

    /// Whether every rule change is an nf_tables commit the kernel announces (NEWGEN).
    pub fn event_driven(self) -> bool {
        self != ProxyMode::IptablesLegacy
    }

    /// The NAT rules of the namespace as text, in this mode's own tool.
    pub fn dump_args(self) -> &'static [&'static str] {
        match self {
            ProxyMode::IptablesNft => &["iptables-nft-save", "-t", "nat"],
            ProxyMode::IptablesLegacy => &["iptables-legacy-save", "-t", "nat"],
            ProxyMode::Nftables => &["nft", "list", "table", "ip", "kube-proxy"],
        }
    }
}

pub struct Node {
    pub index: usize,
    pub name: String,
    pub mode: ProxyMode,
    pub netns: String,
    pub ip: String,
    pub agent_port: u16,
    dir: PathBuf,
    pub kube_proxy: Option<Proc>,
    pub agent: Option<Proc>,
    /// nf_tables commits seen in the namespace, in order.
    pub commits: Arc<Mutex<Vec<Timestamp>>>,
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    run(Command::new("ip").args(args)).map(|_| ())
}

fn in_ns(ns: &str, args: &[&str]) -> anyhow::Result<String> {
    run(Command::new("ip").args(["netns", "exec", ns]).args(args))
}

impl Node {
    /// Creates the namespace and its link, the Node object, and starts the commit recorder.
    pub async fn create(cluster: &Cluster, index: usize, mode: ProxyMode) -> anyhow::Result<Self> {
        let pid = std::process::id();
        let name = format!("node-{index}");
        let netns = format!("kc-real-{pid}-{index}");
        let host_if = format!("kcr{}h{index}", pid % 100_000);
        let _ = Command::new("ip")
            .args(["netns", "del", &netns])
            .stderr(std::process::Stdio::null())
            .status();
        ip(&["netns", "add", &netns])?;
        let host_ip = format!("10.200.{index}.1");
        let node_ip = format!("10.200.{index}.2");
        let setup = |netns: &str| -> anyhow::Result<()> {
            ip(&[
                "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", netns,
            ])?;
            ip(&["addr", "add", &format!("{host_ip}/24"), "dev", &host_if])?;
            ip(&["link", "set", &host_if, "up"])?;
            in_ns(netns, &["ip", "link", "set", "lo", "up"])?;
            in_ns(netns, &["ip", "addr", "add", &format!("{node_ip}/24"), "dev", "eth0"])?;
            in_ns(netns, &["ip", "link", "set", "eth0", "up"])?;
            in_ns(netns, &["ip", "route", "add", "default", "via", &host_ip])?;
            Ok(())
        };
        let dir = cluster.dir.join(&name);
        std::fs::create_dir_all(&dir)?;
        let node = Self {
            index,
            name: name.clone(),
            mode,
            netns,
            ip: node_ip.clone(),
            agent_port: cluster.port + 10 + index as u16,
            dir,
            kube_proxy: None,
            agent: None,
            commits: Arc::new(Mutex::new(Vec::new())),
        };
        setup(&node.netns)?;
        node.record_commits()?;
        let nodes: Api<NodeObject> = Api::all(cluster.admin.clone());
        let obj: NodeObject = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kc-test/proxy-mode": mode.name(),
            }},
            "spec": {"podCIDR": format!("10.244.{index}.0/24"), "podCIDRs": [format!("10.244.{index}.0/24")]},
        }))?;
        nodes.create(&PostParams::default(), &obj).await?;
        let now = Timestamp::now().to_rfc3339();
        let status = serde_json::json!({"status": {
            "addresses": [{"type": "InternalIP", "address": node_ip}, {"type": "Hostname", "address": name}],
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                            "lastHeartbeatTime": now, "lastTransitionTime": now}],
        }});
        nodes
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
            .await?;
        Ok(node)
    }

    pub fn netns_path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.netns))
    }

    fn record_commits(&self) -> anyhow::Result<()> {
        let ns = NetNs::open(&self.netns_path())?;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        spawn_listener(&ns, tx)?;
        let commits = self.commits.clone();
        tokio::spawn(async move {
            while let Some(n) = rx.recv().await {
                if let Notification::Generation(g) = n {
                    commits.lock().unwrap().push(g.at);
                }
            }
        });
        Ok(())
    }

    /// Starts (or restarts) this node's kube-proxy with a KubeProxyConfiguration of its mode.
    pub fn start_kube_proxy(&mut self, cluster: &Cluster) -> anyhow::Result<()> {
        let kc = self.dir.join("kube-proxy.kubeconfig");
        std::fs::write(
            &kc,
            kubeconfig(
                &cluster.dir,
                &format!("https://10.200.{}.1:{}", self.index, cluster.port),
                "proxy-token",
            ),
        )?;
        let mode = match self.mode {
            ProxyMode::Nftables => "nftables",
            _ => "iptables",
        };
        // Conntrack settings at 0 leave the namespace's sysctls alone (a namespace cannot set
        // the global ones).
        let config = format!(
            "apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection:
  kubeconfig: {kc}
hostnameOverride: {name}
mode: {mode}
clusterCIDR: 10.244.0.0/16
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
  udpTimeout: 0s
  udpStreamTimeout: 0s
",
            kc = kc.display(),
            name = self.name,
        );
        let cfg = self.dir.join("kube-proxy.yaml");
        std::fs::write(&cfg, config)?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.netns])
            .arg(cluster.bin.join("kube-proxy"))
            .arg(format!("--config={}", cfg.display()))
            .arg("--v=2");
        if self.mode == ProxyMode::IptablesLegacy {
            cmd.env("PATH", legacy_path(&self.dir)?);
        }
        let n = if self.kube_proxy.is_some() { 2 } else { 1 };
        self.kube_proxy = None;
        self.kube_proxy = Some(Proc::spawn(
            &format!("kube-proxy {}", self.name),
            cmd,
            self.dir.join(format!("kube-proxy-{n}.log")),
        )?);
        Ok(())
    }

    /// Starts (or restarts) the agent for this node, under the ServiceAccount's token.
    pub fn start_agent(&mut self, cluster: &Cluster, agent: &Path, token: &str) -> anyhow::Result<()> {
        let kc = self.dir.join("agent.kubeconfig");
        std::fs::write(
            &kc,
            kubeconfig(&cluster.dir, &format!("https://127.0.0.1:{}", cluster.port), token),
        )?;
        let mut cmd = Command::new(agent);
        cmd.arg(format!("--kubeconfig={}", kc.display()))
            .args(["agent", "--node-name", &self.name])
            .arg(format!("--netns={}", self.netns_path().display()))
            .arg(format!("--listen=127.0.0.1:{}", self.agent_port))
            .env("RUST_LOG", "info");
        let n = std::fs::read_dir(&self.dir)?
            .filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.file_name().to_string_lossy().starts_with("agent-"))
            })
            .count()
            + 1;
        self.agent = None;
        self.agent = Some(Proc::spawn(
            &format!("agent {}", self.name),
            cmd,
            self.dir.join(format!("agent-{n}.log")),
        )?);
        Ok(())
    }

    /// This node's NAT rules now, as its mode's tool prints them.
    pub fn dump_rules(&self) -> anyhow::Result<String> {
        let args = self.mode.dump_args();
        in_ns(&self.netns, args)
    }

    /// Whether a DNAT rule in this node's kernel still sends connections to `ip`.
    pub fn routes_to(&self, ip: &str) -> anyhow::Result<bool> {
        let rules = self.dump_rules()?;
        Ok(rules.lines().any(|l| {
            (l.contains("DNAT") || l.contains("dnat"))
                && [format!(" {ip}:"), format!("={ip}:"), format!(" {ip} . ")]
                    .iter()
                    .any(|p| l.contains(p.as_str()))
        }))
    }

    pub fn commits_between(&self, from: Timestamp, to: Timestamp) -> Vec<Timestamp> {
        self.commits
            .lock()
            .unwrap()
            .iter()
            .copied()
            .filter(|t| *t >= from && *t <= to)
            .collect()
    }

    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        for p in [&mut self.kube_proxy, &mut self.agent].into_iter().flatten() {
            p.check_alive()?;
        }
        Ok(())
    }

    pub fn agent_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.agent_port)
    }
}

/// A PATH on which `iptables` & co. are the legacy backend (kube-proxy runs `iptables`).
fn legacy_path(dir: &Path) -> anyhow::Result<String> {
    let bin = dir.join("legacy-bin");
    std::fs::create_dir_all(&bin)?;
    for tool in [
        "iptables",
        "iptables-save",
        "iptables-restore",
        "ip6tables",
        "ip6tables-save",
        "ip6tables-restore",
    ] {
        let target = std::env::var_os("PATH")
            .and_then(|p| {
                std::env::split_paths(&p)
                    .map(|d| d.join(tool.replacen("tables", "tables-legacy", 1)))
                    .find(|p| p.is_file())
            })
            .ok_or_else(|| anyhow::anyhow!("{tool} legacy variant not found"))?;
        let link = bin.join(tool);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(target, link)?;
    }
    Ok(format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    ))
}

impl Drop for Node {
    fn drop(&mut self) {
        self.agent = None;
        self.kube_proxy = None;
        let _ = Command::new("ip").args(["netns", "del", &self.netns]).status();
    }
}
