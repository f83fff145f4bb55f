//! Values as the kernel carries them, for every reader: fixed-width integers at an offset,
//! addresses of 4 or 16 bytes, IP protocol numbers. Reads are bounds-checked and say `None`
//! rather than guess.

use std::net::IpAddr;

use crate::model::Protocol;

/// The protocols kube-proxy programs, each a Service port can have.
pub const PROTOCOLS: [Protocol; 3] = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];

/// The protocol with IP protocol number `n` (`IPPROTO_*`), if kube-proxy programs it.
pub fn protocol_from_number(n: u16) -> Option<Protocol> {
    PROTOCOLS.into_iter().find(|p| u16::from(protocol_number(*p)) == n)
}

/// The IP protocol number (`IPPROTO_*`) of `p`.
pub fn protocol_number(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => libc::IPPROTO_TCP as u8,
        Protocol::Udp => libc::IPPROTO_UDP as u8,
        Protocol::Sctp => libc::IPPROTO_SCTP as u8,
    }
}

/// An address as the kernel carries it: 4 bytes (IPv4) or 16 (IPv6).
pub fn ip_from(b: &[u8]) -> Option<IpAddr> {
    match b.len() {
        4 => Some(IpAddr::from(<[u8; 4]>::try_from(b).ok()?)),
        16 => Some(IpAddr::from(<[u8; 16]>::try_from(b).ok()?)),
        _ => None,
    }
}

/// A host-order u16 at `at`.
pub fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(*b.get(at..)?.first_chunk()?))
}

/// A network-order (big-endian) u16 at `at`: a port.
pub fn be16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(*b.get(at..)?.first_chunk()?))
}

/// A host-order u32 at `at`.
pub fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(*b.get(at..)?.first_chunk()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_numbers_round_trip() {
        for p in PROTOCOLS {
            assert_eq!(protocol_from_number(u16::from(protocol_number(p))), Some(p));
        }
        assert_eq!(protocol_number(Protocol::Tcp), 6);
        assert_eq!(protocol_number(Protocol::Udp), 17);
        assert_eq!(protocol_number(Protocol::Sctp), 132);
        assert_eq!(protocol_from_number(1), None, "ICMP");
        assert_eq!(protocol_from_number(6 + 256), None);
    }

    #[test]
    fn reads_past_the_end_are_none() {
        assert_eq!(u16_at(&[1, 2, 3], 1), Some(u16::from_ne_bytes([2, 3])));
        assert_eq!(u16_at(&[1, 2, 3], 2), None);
        assert_eq!(u16_at(&[1, 2, 3], usize::MAX), None);
        assert_eq!(be16_at(&[0, 80], 0), Some(80));
        assert_eq!(u32_at(&[0; 7], 4), None);
        assert_eq!(ip_from(&[10, 0, 0, 1]), Some("10.0.0.1".parse().unwrap()));
        assert_eq!(ip_from(&[10, 0, 0]), None);
    }
}
