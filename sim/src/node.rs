//! Simulated nodes: a network namespace per node and a kube-proxy emulator that watches the
//! simulated cluster and rewrites that node's rules in kube-proxy's exact format, after a
//! configurable delay. It records the ground truth: when each change reached the kernel.

use std::collections::BTreeSet;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use tokio::sync::mpsc;

use super::store::Cluster;
use crate::emulate::{
    nft_endpoint_chain, nft_service_chains, render_nat, render_nft_as, sep_chain, service_chains, EmulatedServicePort,
    NftStyle,
};
use kube_converge::model::{ChangeKind, EndpointKey, Timestamp};
use kube_converge::netns::NetNs;

/// The kube-proxy mode a simulated node runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ProxyMode {
    /// iptables mode through iptables-nft.
    Iptables,
    /// iptables mode through iptables-legacy.
    IptablesLegacy,
    Nftables,
}

impl ProxyMode {
    /// The mode as `--proxy-mode` spells it.
    pub fn name(self) -> &'static str {
        match self {
            ProxyMode::Iptables => "iptables",
            ProxyMode::IptablesLegacy => "iptables-legacy",
            ProxyMode::Nftables => "nftables",
        }
    }

    /// The programs a node in this mode needs.
    pub fn tools(self) -> &'static [&'static str] {
        match self {
            ProxyMode::Iptables => &["iptables-nft-restore", "iptables-nft-save", "ip6tables-nft-save"],
            ProxyMode::IptablesLegacy => &[
                "iptables-legacy-restore",
                "iptables-legacy-save",
                "ip6tables-legacy-save",
            ],
            ProxyMode::Nftables => &["nft"],
        }
    }
}

/// A network namespace that is deleted when dropped.
pub struct NetnsGuard {
    pub name: String,
}

static NETNS_SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl NetnsGuard {
    /// A name unique to this process and call: `kc-sim-PID-SEQ-TAG`.
    pub fn unique_name(tag: &str) -> String {
        let seq = NETNS_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        format!("kc-sim-{}-{seq}-{tag}", std::process::id())
    }

    pub fn create(name: &str) -> anyhow::Result<Self> {
        let _ = Command::new("ip")
            .args(["netns", "del", name])
            .stderr(Stdio::null())
            .status();
        let out = Command::new("ip").args(["netns", "add", name]).output()?;
        if !out.status.success() {
            anyhow::bail!("ip netns add {name}: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(Self { name: name.to_string() })
    }

    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// Loopback up, and routes to the Service and pod ranges through it: the node's own
    /// connections to a Service then reach kube-proxy's nat hooks, and after the DNAT leave
    /// (tracked by conntrack) towards the pod.
    pub fn routes_for_traffic(&self) -> anyhow::Result<()> {
        for args in [
            &["link", "set", "lo", "up"][..],
            &["route", "add", "10.96.0.0/16", "dev", "lo"],
            &["route", "add", "10.244.0.0/16", "dev", "lo"],
        ] {
            let out = Command::new("ip").args(["-n", &self.name]).args(args).output()?;
            if !out.status.success() {
                anyhow::bail!(
                    "ip -n {} {args:?}: {}",
                    self.name,
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
        }
        Ok(())
    }
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// When a change reached one node's kernel: after `write_started`, by `write_finished`.
#[derive(Clone, Debug, PartialEq)]
pub struct GroundTruth {
    pub node: String,
    pub key: EndpointKey,
    pub kind: ChangeKind,
    pub write_started: Timestamp,
    pub write_finished: Timestamp,
}

/// How long a node's kube-proxy waits before programming a change: `base` plus a uniform
/// random part up to `jitter`.
#[derive(Clone, Copy, Debug)]
pub struct Delay {
    pub base: Duration,
    pub jitter: Duration,
}

impl Delay {
    fn sample(&self, rng: &mut u64) -> Duration {
        // xorshift64: enough randomness for delays, no dependency.
        *rng ^= *rng << 13;
        *rng ^= *rng >> 7;
        *rng ^= *rng << 17;
        let frac = (*rng % 10_000) as f64 / 10_000.0;
        self.base + self.jitter.mul_f64(frac)
    }
}

pub struct KubeProxyEmulator {
    pub node: String,
    pub mode: ProxyMode,
    pub netns: NetNs,
    pub delay: Delay,
    /// How the emulated nftables mode DNATs: real kube-proxy v1.37 does it in the service
    /// chain (`NftStyle::ServiceDnat`), older releases through endpoint chains.
    pub nft_style: NftStyle,
    pub cluster: Cluster,
    pub truth: mpsc::UnboundedSender<GroundTruth>,
}

fn run_in(netns: &NetNs, program: &str, args: &[&str], input: &str) -> Result<(), String> {
    let mut child = netns
        .command(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{program}: {e}"))?;
    child.stdin.take().map(|mut s| s.write_all(input.as_bytes()));
    let out = child.wait_with_output().map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

pub use crate::desired::desired_ports;

fn keys(ports: &[EmulatedServicePort]) -> BTreeSet<EndpointKey> {
    ports
        .iter()
        .flat_map(|p| {
            p.endpoints
                .iter()
                .map(|e| EndpointKey::new(p.name.clone(), p.protocol, *e))
        })
        .collect()
}

impl KubeProxyEmulator {
    /// Programs the node once, then again after `delay` whenever Services or slices change.
    pub async fn run(self) -> anyhow::Result<()> {
        let mut events = self.cluster.subscribe();
        let mut programmed: BTreeSet<EndpointKey> = BTreeSet::new();
        let mut stale: Vec<(String, Timestamp)> = Vec::new();
        let mut rng = Timestamp::now().as_nanos() as u64 | 1;
        let mut dirty = true;
        loop {
            if dirty {
                tokio::time::sleep(self.delay.sample(&mut rng)).await;
                while events.try_recv().is_ok() {}
                programmed = self.sync(&programmed, &mut stale).await?;
            }
            let tick = if stale.is_empty() {
                Duration::from_secs(3600)
            } else {
                Duration::from_millis(500)
            };
            dirty = tokio::select! {
                ev = events.recv() => match ev {
                    Ok(e) => e.resource == "services" || e.resource == "endpointslices",
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => true,
                    Err(_) => return Ok(()),
                },
                _ = tokio::time::sleep(tick) => true,
            };
        }
    }

    async fn sync(
        &self,
        before: &BTreeSet<EndpointKey>,
        stale: &mut Vec<(String, Timestamp)>,
    ) -> anyhow::Result<BTreeSet<EndpointKey>> {
        let ports = desired_ports(&self.cluster, &self.node);
        let after = keys(&ports);
        let removed: Vec<&EndpointKey> = before.difference(&after).collect();
        let added: Vec<&EndpointKey> = after.difference(before).collect();
        let now = Timestamp::now();
        let (script, program, args): (String, &str, Vec<&str>) = match self.mode {
            ProxyMode::Iptables | ProxyMode::IptablesLegacy => {
                let mut gone: Vec<String> = removed
                    .iter()
                    .map(|k| sep_chain(&k.port_name, k.protocol, k.endpoint))
                    .collect();
                // A service port left without endpoints loses its own chains too.
                for k in &removed {
                    let served = ports
                        .iter()
                        .any(|p| p.name == *k.port_name && p.protocol == k.protocol && !p.endpoints.is_empty());
                    if !served {
                        for c in service_chains(&k.port_name, k.protocol) {
                            if !gone.contains(&c) {
                                gone.push(c);
                            }
                        }
                    }
                }
                let program = if self.mode == ProxyMode::Iptables {
                    "iptables-nft-restore"
                } else {
                    "iptables-legacy-restore"
                };
                (render_nat(&ports, true, &gone), program, vec!["--noflush"])
            }
            ProxyMode::Nftables => {
                // kube-proxy flushes a removed endpoint chain at once and deletes it > 1 s later
                // (v1.37 without affinity has none); so too the chains of a service port left
                // without endpoints.
                let endpoint_chains = self.nft_style == NftStyle::EndpointChains;
                let mut flush: Vec<String> = removed
                    .iter()
                    .filter(|_| endpoint_chains)
                    .map(|k| {
                        let p = ports
                            .iter()
                            .find(|p| p.name == *k.port_name)
                            .cloned()
                            .unwrap_or(EmulatedServicePort {
                                name: (*k.port_name).clone(),
                                protocol: k.protocol,
                                cluster_ip: k.endpoint.ip(),
                                port: 0,
                                node_port: None,
                                endpoints: vec![],
                            });
                        nft_endpoint_chain(&p, k.endpoint)
                    })
                    .collect();
                for k in &removed {
                    let served = ports
                        .iter()
                        .any(|p| p.name == *k.port_name && p.protocol == k.protocol && !p.endpoints.is_empty());
                    for c in nft_service_chains(&k.port_name, k.protocol)
                        .into_iter()
                        .filter(|_| !served)
                    {
                        if !flush.contains(&c) {
                            flush.push(c);
                        }
                    }
                }
                // A chain programmed again (the endpoint came back) is no longer stale.
                let live: BTreeSet<String> = ports
                    .iter()
                    .filter(|p| !p.endpoints.is_empty())
                    .flat_map(|p| {
                        p.endpoints
                            .iter()
                            .map(|e| nft_endpoint_chain(p, *e))
                            .chain(nft_service_chains(&p.name, p.protocol))
                    })
                    .collect();
                stale.retain(|(c, _)| !live.contains(c));
                let (old, young): (Vec<_>, Vec<_>) = stale.drain(..).partition(|(_, at)| now.seconds_since(*at) > 1.0);
                *stale = young;
                stale.extend(flush.iter().map(|c| (c.clone(), now)));
                let delete: Vec<String> = old.into_iter().map(|(c, _)| c).collect();
                (
                    render_nft_as(self.nft_style, "ip", &ports, &flush, &delete),
                    "nft",
                    vec!["-f", "-"],
                )
            }
        };
        let netns = self.netns.clone();
        let started = Timestamp::now();
        let result = tokio::task::spawn_blocking(move || run_in(&netns, program, &args, &script)).await?;
        let finished = Timestamp::now();
        if let Err(e) = result {
            tracing::error!(node = %self.node, error = %e, "kube-proxy emulator failed to program the node");
            return Ok(before.clone());
        }
        for (list, kind) in [(removed, ChangeKind::Removed), (added, ChangeKind::Added)] {
            for key in list {
                let _ = self.truth.send(GroundTruth {
                    node: self.node.clone(),
                    key: key.clone(),
                    kind,
                    write_started: started,
                    write_finished: finished,
                });
            }
        }
        Ok(after)
    }
}
