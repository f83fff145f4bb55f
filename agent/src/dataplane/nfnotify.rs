//! nf_tables generation tracking over netlink: the kernel announces every committed ruleset
//! transaction (iptables-nft and nftables mode alike) with an `NFT_MSG_NEWGEN` message on the
//! `NFNLGRP_NFTABLES` group. The generation id tells a reading which committed state it saw,
//! and the notification time is when that state took effect. iptables-legacy does not notify.

use std::io;

use netlink_sys::protocols::NETLINK_NETFILTER;

use super::netlink::{self, NetlinkError, NetlinkSocket, NLMSG_HDRLEN, NLM_F_ACK};
use crate::model::Timestamp;
use crate::netns::NetNs;

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWGEN: u16 = 15;
const NFT_MSG_GETGEN: u16 = 16;
const NFTA_GEN_ID: u16 = 1;
const NFNLGRP_NFTABLES: u32 = 7;
const NFGENMSG_LEN: usize = 4;

/// A committed nf_tables generation and when the agent learned of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GenerationEvent {
    pub generation: u32,
    pub at: Timestamp,
}

/// The generation id a `NFT_MSG_NEWGEN` message announces; `None` for any other message.
fn generation_of(msg: &netlink::Message<'_>) -> Option<u32> {
    if msg.kind != (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN {
        return None;
    }
    netlink::attributes(msg.payload().get(NFGENMSG_LEN..)?)
        .filter(|(kind, _)| *kind == NFTA_GEN_ID)
        .find_map(|(_, data)| Some(u32::from_be_bytes(*data.first_chunk::<4>()?)))
}

/// Returns the generation ids announced in one netlink datagram, in order, or the kernel's
/// error of an `NLMSG_ERROR` message. A malformed message ends the walk.
pub fn parse_generations(buf: &[u8]) -> Result<Vec<u32>, NetlinkError> {
    let mut out = Vec::new();
    for msg in netlink::messages(buf).map_while(Result::ok) {
        if msg.kind == netlink::NLMSG_ERROR {
            if let Some(e) = msg.error()? {
                return Err(NetlinkError::RequestRefused(e));
            }
        }
        out.extend(generation_of(&msg));
    }
    Ok(out)
}

/// Asks the kernel for the current nf_tables generation.
pub struct GenerationProbe {
    sock: NetlinkSocket,
}

impl GenerationProbe {
    pub fn open(netns: &NetNs) -> Result<Self, NetlinkError> {
        Ok(Self {
            sock: NetlinkSocket::open(netns, NETLINK_NETFILTER, 8192)?,
        })
    }

    /// The receive deadline of the probe's socket.
    pub fn recv_deadline(&self) -> io::Result<Option<std::time::Duration>> {
        self.sock.recv_deadline()
    }

    pub fn current(&mut self) -> Result<u32, NetlinkError> {
        let seq = self.sock.next_seq();
        let kind = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN;
        // Acknowledged, so that the request ends with the ACK after the answer.
        let mut req = netlink::header(NLMSG_HDRLEN + NFGENMSG_LEN, kind, NLM_F_ACK, seq);
        req.extend_from_slice(&[libc::AF_UNSPEC as u8, 0, 0, 0]);
        let mut generation = None;
        self.sock.request(&req, |msg| {
            generation = generation_of(&msg).or(generation);
            Ok::<(), NetlinkError>(())
        })?;
        generation.ok_or(NetlinkError::DecodeFailed(
            "no generation in the kernel's answer".into(),
        ))
    }
}

/// What the notification thread reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Notification {
    Generation(GenerationEvent),
    /// The socket buffer overflowed: some generations were missed.
    Overrun(Timestamp),
}

/// Subscribes to nf_tables notifications and forwards new generations from a dedicated thread
/// until the receiver is dropped. Duplicate generation ids are suppressed.
pub fn spawn_listener(
    netns: &NetNs,
    tx: tokio::sync::mpsc::UnboundedSender<Notification>,
) -> io::Result<std::thread::JoinHandle<()>> {
    let sock = netlink::bound_socket(netns, NETLINK_NETFILTER).map_err(io::Error::other)?;
    sock.add_membership(NFNLGRP_NFTABLES)?;
    let _ = sock.set_rx_buf_sz(4 * 1024 * 1024);
    std::thread::Builder::new().name("nf-notify".into()).spawn(move || {
        let mut buf = vec![0u8; 256 * 1024];
        let mut last = None;
        loop {
            let msg = match sock.recv(&mut &mut buf[..], 0) {
                Ok(n) => match parse_generations(&buf[..n]) {
                    Ok(gens) => gens
                        .into_iter()
                        .filter(|g| last.replace(*g) != Some(*g))
                        .last()
                        .map(|g| {
                            Notification::Generation(GenerationEvent {
                                generation: g,
                                at: Timestamp::now(),
                            })
                        }),
                    Err(_) => None,
                },
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => Some(Notification::Overrun(Timestamp::now())),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => None,
                Err(e) => {
                    tracing::error!(error = %e, "nf_tables notification socket failed; falling back to polling");
                    // Wake the loop: it sees the thread gone, polls and restarts it.
                    let _ = tx.send(Notification::Overrun(Timestamp::now()));
                    return;
                }
            };
            if let Some(m) = msg {
                if tx.send(m).is_err() {
                    return;
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn newgen(gen: u32) -> Vec<u8> {
        let mut m = netlink::header(
            NLMSG_HDRLEN + NFGENMSG_LEN + 8,
            (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN,
            0,
            0,
        );
        m.extend_from_slice(&[0, 0, 0, 0]);
        netlink::put_attribute(&mut m, NFTA_GEN_ID, &gen.to_be_bytes());
        m
    }

    #[test]
    fn parses_newgen_messages_and_skips_others() {
        let mut buf = newgen(41);
        let mut other = newgen(99);
        other[4] = 3; // some other nftables message type
        buf.extend(other);
        buf.extend(newgen(42));
        assert_eq!(parse_generations(&buf).unwrap(), [41, 42]);
        assert_eq!(
            parse_generations(&buf[..10]).unwrap(),
            [] as [u32; 0],
            "a truncated header is ignored"
        );
    }

    #[test]
    fn reports_netlink_errors() {
        let mut m = netlink::header(36, netlink::NLMSG_ERROR, 0, 0);
        m.extend_from_slice(&(-1i32).to_ne_bytes());
        m.extend_from_slice(&[0; 16]);
        let err = parse_generations(&m).unwrap_err();
        assert_eq!(err.refused_with(), Some(1));
    }
}
