//! nf_tables generation tracking over netlink: the kernel announces every committed ruleset
//! transaction (iptables-nft and nftables mode alike) with an `NFT_MSG_NEWGEN` message on the
//! `NFNLGRP_NFTABLES` group. The generation id tells a reading which committed state it saw,
//! and the notification time is when that state took effect. iptables-legacy does not notify.

use std::io;

use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};

use crate::model::Timestamp;
use crate::netns::NetNs;

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWGEN: u16 = 15;
const NFT_MSG_GETGEN: u16 = 16;
const NFTA_GEN_ID: u16 = 1;
const NFNLGRP_NFTABLES: u32 = 7;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLMSG_HDRLEN: usize = 16;
const NFGENMSG_LEN: usize = 4;

/// A committed nf_tables generation and when the agent learned of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GenerationEvent {
    pub generation: u32,
    pub at: Timestamp,
}

/// Returns the generation ids announced in one netlink datagram, in order, or the negative
/// errno of an `NLMSG_ERROR` reply.
pub fn parse_generations(buf: &[u8]) -> Result<Vec<u32>, i32> {
    let mut out = Vec::new();
    let mut off = 0;
    while off + NLMSG_HDRLEN <= buf.len() {
        let len = u32::from_ne_bytes(buf[off..off + 4].try_into().unwrap_or_default()) as usize;
        let kind = u16::from_ne_bytes([buf[off + 4], buf[off + 5]]);
        if len < NLMSG_HDRLEN || off + len > buf.len() {
            break;
        }
        let msg = &buf[off..off + len];
        if kind == NLMSG_ERROR && msg.len() >= NLMSG_HDRLEN + 4 {
            let errno = i32::from_ne_bytes(msg[16..20].try_into().unwrap_or_default());
            if errno != 0 {
                return Err(errno);
            }
        }
        if kind == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN {
            let mut a = NLMSG_HDRLEN + NFGENMSG_LEN;
            while a + 4 <= msg.len() {
                let alen = u16::from_ne_bytes([msg[a], msg[a + 1]]) as usize;
                let atype = u16::from_ne_bytes([msg[a + 2], msg[a + 3]]) & 0x3fff;
                if alen < 4 || a + alen > msg.len() {
                    break;
                }
                if atype == NFTA_GEN_ID && alen >= 8 {
                    out.push(u32::from_be_bytes(msg[a + 4..a + 8].try_into().unwrap_or_default()));
                }
                a += (alen + 3) & !3;
            }
        }
        off += (len + 3) & !3;
    }
    Ok(out)
}

fn open_socket(netns: &NetNs) -> io::Result<Socket> {
    netns
        .run(|| -> io::Result<Socket> {
            let mut sock = Socket::new(NETLINK_NETFILTER)?;
            sock.bind_auto()?;
            Ok(sock)
        })
        .map_err(io::Error::other)?
}

/// Asks the kernel for the current nf_tables generation.
pub struct GenerationProbe {
    sock: Socket,
    seq: u32,
}

impl GenerationProbe {
    pub fn open(netns: &NetNs) -> io::Result<Self> {
        let sock = open_socket(netns)?;
        sock.connect(&SocketAddr::new(0, 0))?;
        super::set_recv_deadline(&sock, super::KERNEL_REPLY_DEADLINE)?;
        Ok(Self { sock, seq: 1 })
    }

    /// The receive deadline of the probe's socket.
    pub fn recv_deadline(&self) -> io::Result<Option<std::time::Duration>> {
        super::recv_deadline(&self.sock)
    }

    pub fn current(&mut self) -> io::Result<u32> {
        self.seq = self.seq.wrapping_add(1);
        let mut req = Vec::with_capacity(NLMSG_HDRLEN + NFGENMSG_LEN);
        req.extend_from_slice(&((NLMSG_HDRLEN + NFGENMSG_LEN) as u32).to_ne_bytes());
        req.extend_from_slice(&((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN).to_ne_bytes());
        req.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
        req.extend_from_slice(&self.seq.to_ne_bytes());
        req.extend_from_slice(&0u32.to_ne_bytes());
        req.extend_from_slice(&[libc::AF_UNSPEC as u8, 0, 0, 0]);
        self.sock.send(&req, 0)?;
        let mut buf = vec![0u8; 8192];
        loop {
            let n = self.sock.recv(&mut &mut buf[..], 0)?;
            match probe_reply(&buf[..n], self.seq) {
                Ok(Some(generation)) => return Ok(generation),
                Ok(None) => continue,
                Err(errno) => {
                    return Err(super::netlink_error(errno).unwrap_or_else(|| io::Error::other("netlink error 0")))
                }
            }
        }
    }
}

/// The generation in the answer to request `seq` within one datagram, or its negative errno.
/// A message of another request (a reply that came after an earlier request's deadline) is
/// skipped: its generation is stale.
fn probe_reply(buf: &[u8], seq: u32) -> Result<Option<u32>, i32> {
    let mut off = 0;
    let mut last = None;
    while off + NLMSG_HDRLEN <= buf.len() {
        let len = u32::from_ne_bytes(buf[off..off + 4].try_into().unwrap_or_default()) as usize;
        let msg_seq = u32::from_ne_bytes(buf[off + 8..off + 12].try_into().unwrap_or_default());
        if len < NLMSG_HDRLEN || off + len > buf.len() {
            break;
        }
        if msg_seq == seq {
            if let Some(g) = parse_generations(&buf[off..off + len])?.pop() {
                last = Some(g);
            }
        }
        off += (len + 3) & !3;
    }
    Ok(last)
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
    let sock = open_socket(netns)?;
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
        let mut m = Vec::new();
        let len = (NLMSG_HDRLEN + NFGENMSG_LEN + 8) as u32;
        m.extend_from_slice(&len.to_ne_bytes());
        m.extend_from_slice(&((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN).to_ne_bytes());
        m.extend_from_slice(&[0; 10]);
        m.extend_from_slice(&[0, 0, 0, 0]);
        m.extend_from_slice(&8u16.to_ne_bytes());
        m.extend_from_slice(&NFTA_GEN_ID.to_ne_bytes());
        m.extend_from_slice(&gen.to_be_bytes());
        m
    }

    #[test]
    fn parses_newgen_messages_and_skips_others() {
        let mut buf = newgen(41);
        let mut other = newgen(99);
        other[4] = 3; // some other nftables message type
        buf.extend(other);
        buf.extend(newgen(42));
        assert_eq!(parse_generations(&buf), Ok(vec![41, 42]));
        assert_eq!(
            parse_generations(&buf[..10]),
            Ok(vec![]),
            "a truncated header is ignored"
        );
    }

    /// Found while unifying the netlink layer: the probe took any generation message as its
    /// answer, so a reply that came late for an earlier request (after its deadline) was read
    /// as the current generation.
    #[test]
    fn the_probe_takes_only_the_answer_to_its_own_request() {
        let with_seq = |gen: u32, seq: u32| {
            let mut m = newgen(gen);
            m[8..12].copy_from_slice(&seq.to_ne_bytes());
            m
        };
        assert_eq!(probe_reply(&with_seq(41, 6), 7), Ok(None), "a stale reply");
        let mut both = with_seq(41, 6);
        both.extend(with_seq(42, 7));
        assert_eq!(probe_reply(&both, 7), Ok(Some(42)));
    }

    #[test]
    fn reports_netlink_errors() {
        let mut m = Vec::new();
        m.extend_from_slice(&36u32.to_ne_bytes());
        m.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        m.extend_from_slice(&[0; 10]);
        m.extend_from_slice(&(-1i32).to_ne_bytes());
        m.extend_from_slice(&[0; 16]);
        assert_eq!(parse_generations(&m), Err(-1));
    }
}
