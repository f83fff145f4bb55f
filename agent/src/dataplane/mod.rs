//! Dataplane readers: what this node's kernel routes right now, one reader per kube-proxy mode
//! behind the `DataplaneReader` trait. Readers report what they see, including what they could
//! not understand; they never guess that an endpoint is gone.

pub mod iptables;
pub mod ipvs;
pub mod nfnotify;
pub mod nftables;
pub mod nftnl;

use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::str::FromStr;
use std::time::Duration;

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
    #[error("running {program}: {source} (install the package that provides it, e.g. `apt-get install iptables`)")]
    ToolMissing { program: String, source: std::io::Error },
    #[error("{program} failed ({status}): {stderr} (the agent needs CAP_NET_ADMIN and the host network namespace)")]
    ToolFailed {
        program: String,
        status: String,
        stderr: String,
    },
    #[error("parsing the output of {program}: {reason}")]
    Unparseable { program: String, reason: String },
    #[error("{0}")]
    Netns(#[from] crate::netns::NetnsError),
    #[error("{what}: {source}")]
    Netlink { what: String, source: std::io::Error },
    #[error("no kube-proxy rules found: {detail}")]
    NotFound { detail: String },
}

impl ReadError {
    /// A short, fixed label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            ReadError::ToolMissing { .. } => "tool_missing",
            ReadError::ToolFailed { .. } => "tool_failed",
            ReadError::Unparseable { .. } => "unparseable",
            ReadError::Netns(_) => "netns",
            ReadError::Netlink { .. } => "netlink",
            ReadError::NotFound { .. } => "not_found",
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
                return Err(ReadError::NotFound {
                    detail: "this process lacks CAP_NET_ADMIN, which reading nf_tables, iptables and IPVS rules from \
                             the kernel needs, and kube-proxy's /proxyMode (127.0.0.1:10249) did not answer: run it as \
                             root or grant CAP_NET_ADMIN"
                        .into(),
                })
            }
            None => {
                return Err(ReadError::NotFound {
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
                None => Err(ReadError::NotFound {
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

/// The error an `NLMSG_ERROR` reply carries: `None` for 0 (an ACK), else the negated errno.
/// A value that is not a negative errno (positive, or `i32::MIN`, whose negation overflows) is
/// a protocol error, never a panic.
pub fn netlink_error(raw: i32) -> Option<std::io::Error> {
    match raw {
        0 => None,
        r if r < 0 && r != i32::MIN => Some(std::io::Error::from_raw_os_error(-r)),
        _ => Some(std::io::Error::from_raw_os_error(libc::EPROTO)),
    }
}

/// How long the kernel may take to answer one netlink request before the read fails (and the
/// affected changes are unknown) instead of stopping the dataplane loop forever.
pub const KERNEL_REPLY_DEADLINE: Duration = Duration::from_secs(5);

/// Gives every `recv` on `sock` a deadline (`SO_RCVTIMEO`): past it, `recv` fails with
/// `WouldBlock`. Replies that arrive later carry an old sequence number and are skipped.
pub fn set_recv_deadline(sock: &impl AsRawFd, deadline: Duration) -> std::io::Result<()> {
    let tv = libc::timeval {
        tv_sec: deadline.as_secs().min(i32::MAX as u64) as libc::time_t,
        tv_usec: deadline.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: a valid socket descriptor, and a timeval of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The receive deadline set on `sock`, if any.
pub fn recv_deadline(sock: &impl AsRawFd) -> std::io::Result<Option<Duration>> {
    let mut tv = libc::timeval { tv_sec: 0, tv_usec: 0 };
    let mut len = std::mem::size_of::<libc::timeval>() as libc::socklen_t;
    // SAFETY: a valid socket descriptor, and a timeval buffer of the size passed.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&mut tv as *mut libc::timeval).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let d = Duration::from_secs(tv.tv_sec as u64) + Duration::from_micros(tv.tv_usec as u64);
    Ok((!d.is_zero()).then_some(d))
}

#[cfg(test)]
mod deadline_tests {
    use super::*;

    /// A netlink request whose reply never comes no longer blocks forever.
    #[test]
    fn a_recv_with_no_reply_fails_at_the_deadline() {
        let mut sock = netlink_sys::Socket::new(netlink_sys::protocols::NETLINK_NETFILTER).unwrap();
        sock.bind_auto().unwrap();
        assert_eq!(recv_deadline(&sock).unwrap(), None);
        set_recv_deadline(&sock, Duration::from_millis(200)).unwrap();
        assert_eq!(recv_deadline(&sock).unwrap(), Some(Duration::from_millis(200)));
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            let r = sock.recv(&mut &mut buf[..], 0);
            let _ = tx.send(r.map_err(|e| e.kind()));
        });
        let got = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("recv returned within the deadline");
        assert!(matches!(got, Err(std::io::ErrorKind::WouldBlock)), "{got:?}");
    }

    /// Hostile or broken replies: an errno whose negation overflows is an error, not a panic.
    #[test]
    fn netlink_errors_decode_without_overflow() {
        assert!(netlink_error(0).is_none());
        assert_eq!(netlink_error(-libc::ENOENT).unwrap().raw_os_error(), Some(libc::ENOENT));
        assert_eq!(netlink_error(i32::MIN).unwrap().raw_os_error(), Some(libc::EPROTO));
        assert_eq!(netlink_error(5).unwrap().raw_os_error(), Some(libc::EPROTO));
    }

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
        let conn = nftnl::NftConn::open(&ns).unwrap();
        assert_eq!(conn.recv_deadline().unwrap(), Some(KERNEL_REPLY_DEADLINE));
        let probe = nfnotify::GenerationProbe::open(&ns).unwrap();
        assert_eq!(probe.recv_deadline().unwrap(), Some(KERNEL_REPLY_DEADLINE));
    }
}
