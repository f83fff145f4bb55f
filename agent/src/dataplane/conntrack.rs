//! New connections, from the kernel's conntrack events: ctnetlink's `NFNLGRP_CONNTRACK_NEW`
//! group announces every connection the kernel confirms, with its original tuple (where the
//! client sent it: a Service's VIP or NodePort) and its reply tuple (whose source is where the
//! DNAT really sent it: the endpoint). That is traffic, not rules: it shows whether a node
//! still sent new connections to an endpoint after it was removed.
//!
//! The listener runs only while the agent watches some endpoints (a removal pending, or within
//! a window after it converged), and forwards only connections to those, in batches.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use netlink_sys::protocols::NETLINK_NETFILTER;

use super::netlink::{self, NetlinkError};
use super::wire;
use crate::model::{Protocol, Timestamp};
use crate::netns::NetNs;

const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_NEW: u16 = 0;
const NFNLGRP_CONNTRACK_NEW: u32 = 1;
const NFGENMSG_LEN: usize = 4;
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_TIMESTAMP: u16 = 20;
const CTA_TIMESTAMP_START: u16 = 1;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;

/// One new connection the kernel translated (its destination was rewritten by a DNAT).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NewConnection {
    pub protocol: Protocol,
    /// Where the client sent it (a VIP, a node address with a NodePort).
    pub destination: SocketAddr,
    /// Where the DNAT sent it: the reply tuple's source.
    pub target: SocketAddr,
    /// When the kernel created it (conntrack's start timestamp when the kernel records one,
    /// else when the agent received the event).
    pub at: Timestamp,
}

/// `(source, destination, protocol)` of a tuple.
fn tuple(data: &[u8]) -> Option<(SocketAddr, SocketAddr, Protocol)> {
    let (mut src, mut dst, mut proto, mut sport, mut dport) = (None, None, None, None, None);
    for (kind, inner) in netlink::attributes(data) {
        match kind {
            CTA_TUPLE_IP => {
                for (k, v) in netlink::attributes(inner) {
                    match k {
                        CTA_IP_V4_SRC | CTA_IP_V6_SRC => src = wire::ip_from(v),
                        CTA_IP_V4_DST | CTA_IP_V6_DST => dst = wire::ip_from(v),
                        _ => {}
                    }
                }
            }
            CTA_TUPLE_PROTO => {
                for (k, v) in netlink::attributes(inner) {
                    match k {
                        CTA_PROTO_NUM => proto = v.first().and_then(|n| wire::protocol_from_number(u16::from(*n))),
                        CTA_PROTO_SRC_PORT => sport = wire::be16_at(v, 0),
                        CTA_PROTO_DST_PORT => dport = wire::be16_at(v, 0),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    let (src, dst): (IpAddr, IpAddr) = (src?, dst?);
    Some((SocketAddr::new(src, sport?), SocketAddr::new(dst, dport?), proto?))
}

/// The translated new connections announced in one netlink datagram. Connections nobody
/// translated (to a pod IP directly: the kubelet's probes, say) and malformed messages are
/// skipped. `received` is used when the kernel sent no start timestamp.
pub fn parse_new_connections(buf: &[u8], received: Timestamp) -> Vec<NewConnection> {
    let mut out = Vec::new();
    for msg in netlink::messages(buf).map_while(Result::ok) {
        if msg.kind != (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW {
            continue;
        }
        let Some(attrs) = msg.payload().get(NFGENMSG_LEN..) else {
            continue;
        };
        let (mut orig, mut reply, mut started) = (None, None, None);
        for (kind, data) in netlink::attributes(attrs) {
            match kind {
                CTA_TUPLE_ORIG => orig = tuple(data),
                CTA_TUPLE_REPLY => reply = tuple(data),
                CTA_TIMESTAMP => {
                    started = netlink::attributes(data)
                        .find(|(k, _)| *k == CTA_TIMESTAMP_START)
                        .and_then(|(_, v)| Some(u64::from_be_bytes(*v.first_chunk::<8>()?)))
                        .filter(|ns| *ns > 0)
                        .and_then(|ns| i64::try_from(ns).ok())
                        .map(Timestamp::from_nanos);
                }
                _ => {}
            }
        }
        let (Some((_, destination, protocol)), Some((target, _, _))) = (orig, reply) else {
            continue;
        };
        if target == destination {
            continue; // not translated
        }
        out.push(NewConnection {
            protocol,
            destination,
            target,
            at: started.unwrap_or(received),
        });
    }
    out
}

/// What the listener thread reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConntrackEvent {
    /// New connections to watched endpoints.
    Connections(Vec<NewConnection>),
    /// The socket buffer overflowed: some connections were not seen (counts are low).
    Overrun,
    /// The socket failed; the listener stopped.
    Failed(String),
}

/// Whether conntrack events can be had in `netns`, and if not, why (a sentence).
pub fn availability(netns: &NetNs) -> Result<(), String> {
    let setting = netns
        .run(|| std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_events"))
        .map_err(|e| format!("cannot enter the network namespace: {e}"))?;
    match setting.as_deref().map(str::trim) {
        Ok("0") => Err("conntrack events are disabled (net.netfilter.nf_conntrack_events = 0)".into()),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            Err("conntrack is not loaded (no net.netfilter.nf_conntrack_events: module nf_conntrack)".into())
        }
        Err(e) => Err(format!("cannot read net.netfilter.nf_conntrack_events: {e}")),
    }
}

/// How often the listener hands a batch over (and checks whether it should stop).
const BATCH_EVERY: Duration = Duration::from_millis(100);

/// Subscribes to new-connection events in `netns` and forwards, in batches, those whose
/// target `wanted` accepts, from a dedicated thread, until `stop` is set or the receiver is
/// dropped. Fails at once (no thread) when the subscription is refused.
pub fn spawn_listener(
    netns: &NetNs,
    wanted: impl Fn(&NewConnection) -> bool + Send + 'static,
    stop: Arc<AtomicBool>,
    tx: tokio::sync::mpsc::UnboundedSender<ConntrackEvent>,
) -> Result<std::thread::JoinHandle<()>, NetlinkError> {
    let sock = netlink::bound_socket(netns, NETLINK_NETFILTER)?;
    sock.add_membership(NFNLGRP_CONNTRACK_NEW)
        .map_err(NetlinkError::OpenFailed)?;
    netlink::grow_recv_buffer(&sock, 16 * 1024 * 1024);
    netlink::set_recv_deadline(&sock, BATCH_EVERY).map_err(NetlinkError::OpenFailed)?;
    std::thread::Builder::new()
        .name("conntrack".into())
        .spawn(move || {
            let mut buf = vec![0u8; 256 * 1024];
            let mut batch = Vec::new();
            let mut flushed = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                let event = match sock.recv(&mut &mut buf[..], 0) {
                    Ok(n) => {
                        let received = Timestamp::now();
                        batch.extend(
                            parse_new_connections(buf.get(..n).unwrap_or_default(), received)
                                .into_iter()
                                .filter(|c| wanted(c)),
                        );
                        None
                    }
                    Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => Some(ConntrackEvent::Overrun),
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                        ) =>
                    {
                        None
                    }
                    Err(e) => {
                        let _ = tx.send(ConntrackEvent::Failed(e.to_string()));
                        return;
                    }
                };
                if !batch.is_empty() && (flushed.elapsed() >= BATCH_EVERY || batch.len() >= 4096) {
                    if tx
                        .send(ConntrackEvent::Connections(std::mem::take(&mut batch)))
                        .is_err()
                    {
                        return;
                    }
                    flushed = Instant::now();
                }
                if let Some(e) = event {
                    if tx.send(e).is_err() {
                        return;
                    }
                }
            }
            if !batch.is_empty() {
                let _ = tx.send(ConntrackEvent::Connections(batch));
            }
        })
        .map_err(NetlinkError::OpenFailed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(kind: u16, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        netlink::put_attribute(&mut out, kind, data);
        out
    }

    fn nested(kind: u16, parts: &[Vec<u8>]) -> Vec<u8> {
        attr(kind | netlink::NLA_F_NESTED, &parts.concat())
    }

    fn tuple_attr(kind: u16, src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
        let ip = |a: SocketAddr| match a.ip() {
            IpAddr::V4(v4) => v4.octets().to_vec(),
            IpAddr::V6(v6) => v6.octets().to_vec(),
        };
        let (s, d) = if src.is_ipv4() {
            (CTA_IP_V4_SRC, CTA_IP_V4_DST)
        } else {
            (CTA_IP_V6_SRC, CTA_IP_V6_DST)
        };
        nested(
            kind,
            &[
                nested(CTA_TUPLE_IP, &[attr(s, &ip(src)), attr(d, &ip(dst))]),
                nested(
                    CTA_TUPLE_PROTO,
                    &[
                        attr(CTA_PROTO_NUM, &[6]),
                        attr(CTA_PROTO_SRC_PORT, &src.port().to_be_bytes()),
                        attr(CTA_PROTO_DST_PORT, &dst.port().to_be_bytes()),
                    ],
                ),
            ],
        )
    }

    /// A CT_NEW message: client -> `dst`, translated to `target`.
    pub(crate) fn ct_new(client: &str, dst: &str, target: &str, start_ns: Option<u64>) -> Vec<u8> {
        let (client, dst, target): (SocketAddr, SocketAddr, SocketAddr) =
            (client.parse().unwrap(), dst.parse().unwrap(), target.parse().unwrap());
        let mut payload = vec![libc::AF_INET as u8, 0, 0, 0];
        payload.extend(tuple_attr(CTA_TUPLE_ORIG, client, dst));
        payload.extend(tuple_attr(CTA_TUPLE_REPLY, target, client));
        if let Some(ns) = start_ns {
            payload.extend(nested(CTA_TIMESTAMP, &[attr(CTA_TIMESTAMP_START, &ns.to_be_bytes())]));
        }
        let mut msg = netlink::header(
            netlink::NLMSG_HDRLEN + payload.len(),
            (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW,
            0,
            0,
        );
        msg.extend(payload);
        msg
    }

    #[test]
    fn a_translated_connection_yields_its_endpoint_and_an_untranslated_one_nothing() {
        let now = Timestamp::from_millis(5);
        let mut buf = ct_new("10.0.0.9:40000", "172.30.0.41:80", "10.244.1.10:8080", None);
        // The kubelet probing the pod directly: no DNAT.
        buf.extend(ct_new("10.0.0.1:40001", "10.244.1.10:8080", "10.244.1.10:8080", None));
        buf.extend(ct_new(
            "[fd00::9]:40000",
            "[fd00:172:30::41]:80",
            "[fd00:10:244::10]:8080",
            Some(1_700_000_000_000_000_000),
        ));
        let got = parse_new_connections(&buf, now);
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got[0].target, "10.244.1.10:8080".parse().unwrap());
        assert_eq!(got[0].destination, "172.30.0.41:80".parse().unwrap());
        assert_eq!((got[0].protocol, got[0].at), (Protocol::Tcp, now));
        assert_eq!(got[1].target, "[fd00:10:244::10]:8080".parse().unwrap());
        assert_eq!(
            got[1].at,
            Timestamp::from_nanos(1_700_000_000_000_000_000),
            "the kernel's start time wins"
        );
    }

    #[test]
    fn malformed_and_foreign_messages_are_skipped_without_panicking() {
        let good = ct_new("10.0.0.9:40000", "172.30.0.41:80", "10.244.1.10:8080", None);
        for cut in 0..good.len() {
            let _ = parse_new_connections(&good[..cut], Timestamp::from_millis(0));
        }
        let mut other = good.clone();
        other[4] = 1; // another message type
        assert!(parse_new_connections(&other, Timestamp::from_millis(0)).is_empty());
    }
}
