//! Dataplane readers: what this node's kernel routes right now, one reader per kube-proxy mode
//! behind the `DataplaneReader` trait. Readers report what they see, including what they could
//! not understand; they never guess that an endpoint is gone.

pub mod conntrack;
pub mod iptables;
pub mod ipvs;
pub mod netlink;
pub mod nf_dnat;
// The libnftnl FFI: raw pointers throughout, each use under a SAFETY line.
#[allow(unsafe_code)]
pub mod nf_tables_ffi;
mod nf_tables_shape;
pub mod nfnotify;
pub mod nftables;
pub mod wire;

/// The old name of [`nf_tables_ffi`], kept for `agent/tests/nftables_kernel.rs`.
pub use nf_tables_ffi as nftnl;

use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use serde::Serialize;

use crate::model::{Protocol, ServicePortName};

/// kube-proxy's proxy mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Iptables,
    Nftables,
    Ipvs,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Iptables => "iptables",
            Mode::Nftables => "nftables",
            Mode::Ipvs => "ipvs",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "iptables" => Ok(Mode::Iptables),
            "nftables" => Ok(Mode::Nftables),
            "ipvs" => Ok(Mode::Ipvs),
            other => Err(format!("unknown mode {other:?} (expected iptables, nftables or ipvs)")),
        }
    }
}

/// How a reader learns that the dataplane changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeSource {
    /// nf_tables netlink notifications (iptables-nft, nftables mode).
    NfTablesEvents,
    /// Nothing notifies: poll.
    Poll,
}

/// One service port as the rules show it.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ServiceRoutes {
    /// kube-proxy's service port name when the rules say it.
    pub name: Option<ServicePortName>,
    /// A mode-specific id of the service port's rules (the iptables chain hash).
    #[serde(skip)]
    pub chain_id: Option<String>,
    pub protocol: Option<Protocol>,
    /// `ip:port` destinations, and `*:nodePort` for NodePorts.
    pub frontends: BTreeSet<String>,
    /// Endpoints that new connections can be sent to.
    pub endpoints: BTreeSet<SocketAddr>,
    /// Some rule of this service port could not be understood: its endpoints are `unknown`.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub uncertain: bool,
}

/// Everything a reader saw in one read.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct DataplaneSnapshot {
    pub services: Vec<ServiceRoutes>,
    /// A family the reader could not read (e.g. no ip6tables): its keys are `unknown`.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub unreadable_v4: bool,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub unreadable_v6: bool,
    /// A family without kube-proxy's rules (no `KUBE-SERVICES`: never there on a single-stack
    /// node, or removed while kube-proxy switches modes or a firewall reloads): its keys are
    /// `unknown`, never "not routed"; unlike an unreadable family it does not keep the tracker
    /// from settling (a single-stack node has no keys there).
    #[serde(skip)]
    pub absent_v4: bool,
    #[serde(skip)]
    pub absent_v6: bool,
    /// For a targeted read: what it covered (everything else was not read).
    #[serde(skip)]
    pub scope: Option<ReadScope>,
    /// IPVS destinations with weight 0: no new connections, existing ones draining.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub draining: Option<Draining>,
    /// Human-readable notes about rules the reader skipped or could not parse.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

pub use crate::model::ReadTargets;

/// What a targeted read covered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReadScope {
    /// Every service port all of whose frontends are among these (read from the frontends on).
    Frontends(BTreeSet<String>),
    /// Exactly these service ports (read from their own chains on).
    Ports(BTreeSet<ServicePortName>),
}

/// Connections still draining from destinations that take no new ones (IPVS weight 0).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Draining {
    pub endpoints: u64,
    pub active_connections: u64,
    pub inactive_connections: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("decoding {what}: {reason}")]
    DecodeFailed { what: String, reason: String },
    #[error(transparent)]
    EnterNetnsFailed(#[from] crate::netns::NetnsError),
    #[error("{what}: {source}")]
    ReadFailed {
        what: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("no kube-proxy rules found: {detail}")]
    RulesNotFound { detail: String },
    /// The nf_tables ruleset changed during every attempt to read it: the reading may mix two
    /// rulesets, so it confirms nothing.
    #[error("the nf_tables ruleset kept changing during the read (generation {before} -> {after})")]
    GenerationChanged { before: u32, after: u32 },
    /// The nf_tables generation could not be read before or after the read (the probe failed
    /// or is not open): a change during the read could not be ruled out, so it confirms
    /// nothing.
    #[error("the nf_tables generation could not be read around the read, so a change during it cannot be ruled out")]
    GenerationUnreadable,
}

impl ReadError {
    /// A short, fixed label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            ReadError::DecodeFailed { .. } => "unparseable",
            ReadError::EnterNetnsFailed(_) => "netns",
            ReadError::ReadFailed { .. } => "netlink",
            ReadError::RulesNotFound { .. } => "not_found",
            ReadError::GenerationChanged { .. } => "generation_changed",
            ReadError::GenerationUnreadable => "generation_unreadable",
        }
    }
}

/// A reader of one kube-proxy mode's kernel state. Reads are blocking; the agent runs them on
/// a blocking thread.
pub trait DataplaneReader: Send {
    fn mode(&self) -> Mode;
    /// The backend within the mode (`nft` or `legacy` for iptables).
    fn backend(&self) -> &str;
    fn change_source(&self) -> ChangeSource;
    fn read(&mut self) -> Result<DataplaneSnapshot, ReadError>;

    /// Reads only what serves `targets`, when the mode allows a cheaper targeted read; `None`
    /// when it does not. The snapshot's `scope` says what was read.
    fn read_targeted(&mut self, _targets: &ReadTargets) -> Option<Result<DataplaneSnapshot, ReadError>> {
        None
    }

    /// Whether `read_targeted` does anything.
    fn can_read_targeted(&self) -> bool {
        false
    }
}

/// Where a mode decision came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModeSource {
    Flag,
    KubeProxy,
    Kernel,
}

/// Asks kube-proxy's metrics server (`/proxyMode` on 127.0.0.1:10249) inside `netns`.
pub fn kube_proxy_mode(netns: &crate::netns::NetNs) -> Option<Mode> {
    use std::io::{Read, Write};
    let reply = netns
        .run(|| -> std::io::Result<String> {
            let addr = std::net::SocketAddr::from(([127, 0, 0, 1], 10249));
            let timeout = std::time::Duration::from_millis(500);
            let mut s = std::net::TcpStream::connect_timeout(&addr, timeout)?;
            s.set_read_timeout(Some(timeout))?;
            s.write_all(b"GET /proxyMode HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
            let mut out = String::new();
            s.take(4096).read_to_string(&mut out)?;
            Ok(out)
        })
        .ok()?
        .ok()?;
    let (head, body) = reply.split_once("\r\n\r\n")?;
    head.split_whitespace().nth(1).filter(|c| *c == "200")?;
    body.trim().parse().ok()
}

/// Detects kube-proxy's mode: kube-proxy's own answer first, then what exists in the kernel.
pub fn detect_mode(netns: &crate::netns::NetNs) -> Option<(Mode, ModeSource)> {
    if let Some(m) = kube_proxy_mode(netns) {
        return Some((m, ModeSource::KubeProxy));
    }
    if nftables::NftablesReader::table_exists(netns) {
        return Some((Mode::Nftables, ModeSource::Kernel));
    }
    if iptables::detect_backend(netns).is_some() {
        return Some((Mode::Iptables, ModeSource::Kernel));
    }
    if ipvs::IpvsReader::has_services(netns) {
        return Some((Mode::Ipvs, ModeSource::Kernel));
    }
    None
}

/// Opens the reader for `mode` (`None`: detect it).
pub fn open_reader(
    mode: Option<Mode>,
    backend: Option<iptables::Backend>,
    netns: &crate::netns::NetNs,
) -> Result<Box<dyn DataplaneReader>, ReadError> {
    let mode = match mode {
        Some(m) => m,
        None => match detect_mode(netns) {
            Some((m, source)) => {
                tracing::debug!(mode = %m, ?source, "detected kube-proxy mode");
                m
            }
            None if !has_cap_net_admin(&std::fs::read_to_string("/proc/self/status").unwrap_or_default()) => {
                return Err(ReadError::RulesNotFound {
                    detail: "this process lacks CAP_NET_ADMIN, which reading nf_tables, iptables and IPVS rules from \
                             the kernel needs, and kube-proxy's /proxyMode (127.0.0.1:10249) did not answer: run it as \
                             root or grant CAP_NET_ADMIN"
                        .into(),
                })
            }
            None => {
                return Err(ReadError::RulesNotFound {
                    detail: "kube-proxy's /proxyMode (127.0.0.1:10249) did not answer, and the kernel has no table \
                             ip/ip6 kube-proxy, no KUBE-SERVICES chain in iptables-nft or iptables-legacy and no IPVS virtual server; is \
                             kube-proxy running on this node? (use --mode to choose explicitly)"
                        .into(),
                })
            }
        },
    };
    match mode {
        Mode::Iptables => {
            let backend = match backend {
                Some(b) => Some(b),
                None => iptables::detect_backend(netns),
            };
            match backend {
                Some(b) => Ok(Box::new(iptables::IptablesReader::new(b, netns.clone()))),
                None => Err(ReadError::RulesNotFound {
                    detail: "no KUBE-SERVICES chain in the nat table of iptables-nft or iptables-legacy; is \
                             kube-proxy running in iptables mode on this node? (use --mode to choose explicitly)"
                        .into(),
                }),
            }
        }
        Mode::Nftables => Ok(Box::new(nftables::NftablesReader::new(netns.clone()))),
        Mode::Ipvs => Ok(Box::new(ipvs::IpvsReader::new(netns.clone()))),
    }
}

/// Whether the effective capabilities in `/proc/self/status` text include CAP_NET_ADMIN (12).
/// Unknown (no CapEff line) counts as yes: the kernel's own answer then tells.
pub fn has_cap_net_admin(status: &str) -> bool {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_none_or(|caps| caps & (1 << 12) != 0)
}

#[cfg(test)]
mod deadline_tests {
    use super::*;

    #[test]
    fn cap_net_admin_is_read_from_the_effective_set() {
        assert!(has_cap_net_admin("Name:\tx\nCapEff:\t000001ffffffffff\n"));
        assert!(!has_cap_net_admin("CapEff:\t0000000000000000\n"));
        assert!(
            !has_cap_net_admin("CapEff:\t0000000000000400\n"),
            "CAP_NET_BIND_SERVICE only"
        );
        assert!(has_cap_net_admin("CapEff:\t0000000000001000\n"));
        assert!(has_cap_net_admin(""), "unknown: let the kernel answer");
    }

    #[test]
    fn readers_connections_have_the_deadline() {
        let ns = crate::netns::NetNs::current();
        let conn = nf_tables_ffi::NftConn::open(&ns).unwrap();
        assert_eq!(conn.recv_deadline().unwrap(), Some(netlink::KERNEL_REPLY_DEADLINE));
        let probe = nfnotify::GenerationProbe::open(&ns).unwrap();
        assert_eq!(probe.recv_deadline().unwrap(), Some(netlink::KERNEL_REPLY_DEADLINE));
    }
}
