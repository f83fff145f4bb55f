//! Decoders for the binary info blobs of the xtables extensions kube-proxy uses: the
//! `comment`, `tcp`/`udp`/`sctp` matches and the `DNAT` target. iptables-legacy keeps every
//! match and target in this form, iptables-nft keeps those it cannot translate to native
//! expressions. The layouts are the kernel's UAPI structs, in host byte order except where the
//! kernel says `__be`. A blob that does not fit its layout decodes to "not understood", never to
//! a guess.

use std::net::SocketAddr;

use crate::dataplane::wire::{be16_at, ip_from, u16_at, u32_at};

const NF_NAT_RANGE_MAP_IPS: u32 = 1;
const NF_NAT_RANGE_PROTO_SPECIFIED: u32 = 2;
const XT_TCP_INV_DSTPT: u8 = 0x02;
const XT_UDP_INV_DSTPT: u8 = 0x02;
const XT_SCTP_DEST_PORTS: u32 = 0x02;

/// `struct xt_comment_info { char comment[256]; }`: the text up to the first NUL.
pub fn comment(info: &[u8]) -> Option<String> {
    let end = info.iter().position(|&b| b == 0).unwrap_or(info.len());
    std::str::from_utf8(&info[..end]).ok().map(str::to_string)
}

/// The single destination port of a `tcp`, `udp` or `sctp` match, when it matches exactly one
/// port and is not negated.
pub fn destination_port(name: &str, info: &[u8]) -> Option<u16> {
    // xt_tcp/xt_udp: u16 spts[2], u16 dpts[2], then (tcp) option, flg_mask, flg_cmp, invflags
    // or (udp) invflags. xt_sctp_info: u16 dpts[2], u16 spts[2], ..., u32 flags at 60, invflags at 64.
    let (lo, hi, negated) = match name {
        "tcp" => (
            u16_at(info, 4)?,
            u16_at(info, 6)?,
            info.get(11)? & XT_TCP_INV_DSTPT != 0,
        ),
        "udp" => (u16_at(info, 4)?, u16_at(info, 6)?, info.get(8)? & XT_UDP_INV_DSTPT != 0),
        "sctp" => {
            if u32_at(info, 60)? & XT_SCTP_DEST_PORTS == 0 {
                return None;
            }
            (
                u16_at(info, 0)?,
                u16_at(info, 2)?,
                u32_at(info, 64)? & XT_SCTP_DEST_PORTS != 0,
            )
        }
        _ => return None,
    };
    (lo == hi && !negated).then_some(lo)
}

/// What a `DNAT` target does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Dnat {
    /// One address and one port: kube-proxy's `--to-destination IP:port`.
    To(SocketAddr),
    /// Anything else (ranges, no port, a layout we do not know), described for a warning.
    NotUnderstood(String),
}

/// Decodes a `DNAT` target's info of revision `rev` (0: IPv4 multi-range compat, 1:
/// `nf_nat_range`, 2: `nf_nat_range2`) for an IPv4 or IPv6 rule.
pub fn dnat(rev: u32, info: &[u8], ipv6: bool) -> Dnat {
    // An address of `len` bytes at `at`.
    let ip = |at: usize, len: usize| ip_from(info.get(at..at.checked_add(len)?)?);
    let decoded = match rev {
        // nf_nat_ipv4_multi_range_compat: u32 rangesize, then one nf_nat_ipv4_range:
        // u32 flags, __be32 min_ip, __be32 max_ip, __be16 min port, __be16 max port.
        0 if !ipv6 => (|| {
            if u32_at(info, 0)? != 1 {
                return None;
            }
            Some((
                u32_at(info, 4)?,
                ip(8, 4)?,
                ip(12, 4)?,
                be16_at(info, 16)?,
                be16_at(info, 18)?,
            ))
        })(),
        // nf_nat_range(2): u32 flags, nf_inet_addr min (16 bytes), max (16), __be16 min port, max.
        1 | 2 => (|| {
            let len = if ipv6 { 16 } else { 4 };
            Some((
                u32_at(info, 0)?,
                ip(4, len)?,
                ip(20, len)?,
                be16_at(info, 36)?,
                be16_at(info, 38)?,
            ))
        })(),
        _ => None,
    };
    let Some((flags, min_ip, max_ip, min_port, max_port)) = decoded else {
        return Dnat::NotUnderstood(format!("DNAT revision {rev} with {} bytes of info", info.len()));
    };
    let wanted = NF_NAT_RANGE_MAP_IPS | NF_NAT_RANGE_PROTO_SPECIFIED;
    if flags & wanted != wanted {
        return Dnat::NotUnderstood(format!("DNAT without an address and a port (flags {flags:#x})"));
    }
    if min_ip != max_ip || min_port != max_port {
        return Dnat::NotUnderstood(format!("DNAT to a range {min_ip}-{max_ip}:{min_port}-{max_port}"));
    }
    Dnat::To(SocketAddr::new(min_ip, min_port))
}

#[cfg(test)]
pub(crate) mod builders {
    //! The blobs as iptables writes them, for tests of every reader that meets them.
    use std::net::{IpAddr, SocketAddr};

    pub fn comment(text: &str) -> Vec<u8> {
        let mut b = text.as_bytes().to_vec();
        b.resize(256, 0);
        b
    }

    pub fn tcp_dport(port: u16) -> Vec<u8> {
        let mut b = vec![0u8; 12];
        b[2..4].copy_from_slice(&u16::MAX.to_ne_bytes());
        b[4..6].copy_from_slice(&port.to_ne_bytes());
        b[6..8].copy_from_slice(&port.to_ne_bytes());
        b
    }

    /// `nf_nat_range2` for `--to-destination addr`, as iptables 1.8 writes it (revision 2).
    pub fn dnat2(addr: SocketAddr) -> Vec<u8> {
        let mut b = vec![0u8; 48];
        b[0..4].copy_from_slice(&3u32.to_ne_bytes());
        let ip = match addr.ip() {
            IpAddr::V4(v4) => v4.octets().to_vec(),
            IpAddr::V6(v6) => v6.octets().to_vec(),
        };
        b[4..4 + ip.len()].copy_from_slice(&ip);
        b[20..20 + ip.len()].copy_from_slice(&ip);
        b[36..38].copy_from_slice(&addr.port().to_be_bytes());
        b[38..40].copy_from_slice(&addr.port().to_be_bytes());
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comments_stop_at_the_first_nul() {
        assert_eq!(
            comment(&builders::comment("ns1/svc1:p80 cluster IP")).as_deref(),
            Some("ns1/svc1:p80 cluster IP")
        );
        assert_eq!(comment(b"no nul").as_deref(), Some("no nul"));
        assert_eq!(comment(&[0xff, 0xfe, 0]), None, "not UTF-8");
    }

    #[test]
    fn destination_ports_only_when_exact_and_positive() {
        assert_eq!(destination_port("tcp", &builders::tcp_dport(80)), Some(80));
        let mut negated = builders::tcp_dport(80);
        negated[11] = XT_TCP_INV_DSTPT;
        assert_eq!(destination_port("tcp", &negated), None);
        let mut range = builders::tcp_dport(80);
        range[6..8].copy_from_slice(&90u16.to_ne_bytes());
        assert_eq!(destination_port("tcp", &range), None);
        let mut any = [0u8; 12];
        any[6..8].copy_from_slice(&u16::MAX.to_ne_bytes());
        assert_eq!(
            destination_port("tcp", &any),
            None,
            "`-m tcp` with no --dport matches 0:65535"
        );
        assert_eq!(destination_port("tcp", &[0u8; 3]), None, "short blob");
        let mut udp = vec![0u8; 10];
        udp[4..6].copy_from_slice(&53u16.to_ne_bytes());
        udp[6..8].copy_from_slice(&53u16.to_ne_bytes());
        assert_eq!(destination_port("udp", &udp), Some(53));
        let mut sctp = vec![0u8; 72];
        sctp[0..2].copy_from_slice(&3868u16.to_ne_bytes());
        sctp[2..4].copy_from_slice(&3868u16.to_ne_bytes());
        sctp[60..64].copy_from_slice(&XT_SCTP_DEST_PORTS.to_ne_bytes());
        assert_eq!(destination_port("sctp", &sctp), Some(3868));
        assert_eq!(destination_port("statistic", &sctp), None);
    }

    #[test]
    fn dnat_revisions_and_families() {
        let v4: SocketAddr = "10.180.0.1:80".parse().unwrap();
        assert_eq!(dnat(2, &builders::dnat2(v4), false), Dnat::To(v4));
        assert_eq!(dnat(1, &builders::dnat2(v4)[..40], false), Dnat::To(v4));
        let v6: SocketAddr = "[fd00:10:180::1]:8080".parse().unwrap();
        assert_eq!(dnat(2, &builders::dnat2(v6), true), Dnat::To(v6));
        // Revision 0: rangesize 1, flags, min_ip, max_ip, min port, max port.
        let mut r0 = vec![0u8; 20];
        r0[0..4].copy_from_slice(&1u32.to_ne_bytes());
        r0[4..8].copy_from_slice(&3u32.to_ne_bytes());
        r0[8..12].copy_from_slice(&[10, 180, 0, 1]);
        r0[12..16].copy_from_slice(&[10, 180, 0, 1]);
        r0[16..18].copy_from_slice(&80u16.to_be_bytes());
        r0[18..20].copy_from_slice(&80u16.to_be_bytes());
        assert_eq!(dnat(0, &r0, false), Dnat::To(v4));
    }

    #[test]
    fn dnat_that_is_not_one_address_and_port_is_not_understood() {
        let v4: SocketAddr = "10.180.0.1:80".parse().unwrap();
        let mut no_port = builders::dnat2(v4);
        no_port[0..4].copy_from_slice(&1u32.to_ne_bytes());
        assert!(matches!(dnat(2, &no_port, false), Dnat::NotUnderstood(_)));
        let mut range = builders::dnat2(v4);
        range[20..24].copy_from_slice(&[10, 180, 0, 9]);
        assert!(matches!(dnat(2, &range, false), Dnat::NotUnderstood(m) if m.contains("range")));
        assert!(
            matches!(dnat(2, &[0u8; 10], false), Dnat::NotUnderstood(_)),
            "short blob"
        );
        assert!(
            matches!(dnat(7, &builders::dnat2(v4), false), Dnat::NotUnderstood(_)),
            "unknown revision"
        );
    }
}
