//! kube-proxy's chain naming: the hashes that name the per-service-port and per-endpoint chains
//! of its iptables and nftables modes. The readers use them to find a service port's chains;
//! the catalogue uses them to map a chain back to its service port.

use sha2::{Digest, Sha256};

use crate::model::{Protocol, ServicePortName};

/// kube-proxy's `portProtoHash`: base32(sha256(spn + proto))[:16], shared by the SVC, SVL, EXT
/// and FW chains of one service port.
pub fn port_proto_hash(spn: &ServicePortName, protocol: Protocol) -> String {
    hash16(format!("{spn}{protocol}").as_bytes())
}

/// kube-proxy's `servicePortEndpointChainName` hash: base32(sha256(spn + proto + endpoint))[:16]
/// (the `KUBE-SEP-` suffix).
pub fn endpoint_hash(spn: &ServicePortName, protocol: Protocol, endpoint: std::net::SocketAddr) -> String {
    hash16(format!("{spn}{protocol}{endpoint}").as_bytes())
}

/// kube-proxy's nftables `hashAndTruncate`: base32(sha256(name))[:8] + "-" + name.
pub fn nft_hash_and_truncate(name: &str) -> String {
    format!("{}-{name}", &hash16(name.as_bytes())[..8])
}

/// base32 of the first 10 bytes of sha256(input): 16 characters.
fn hash16(input: &[u8]) -> String {
    base32_16(&Sha256::digest(input)[..10])
}

fn base32_16(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::with_capacity(16);
    let (mut acc, mut bits) = (0u32, 0u32);
    for &b in bytes {
        acc = (acc << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(ALPHABET[((acc >> bits) & 31) as usize] as char);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Names taken from kube-proxy's own test fixtures (agent/tests/fixtures/kube-proxy).
    #[test]
    fn hashes_match_kube_proxy() {
        let spn = ServicePortName::parse("ns1/svc1:p80").unwrap();
        assert_eq!(port_proto_hash(&spn, Protocol::Tcp), "XPGD46QRK7WJZT7O");
        let ep = "10.180.0.1:80".parse().unwrap();
        assert_eq!(endpoint_hash(&spn, Protocol::Tcp, ep), "SXIVWICOYRO3J4NJ");
    }
}
