//! Native nf_tables DNAT, decoded once for both nf_tables readers (kube-proxy's nftables mode
//! and iptables-nft): what the registers hold along a rule, and which endpoints a `nat`
//! expression sends to. Anything it cannot justify is an error saying why (the caller makes
//! the service port uncertain), never a guess.

use std::collections::HashMap;
use std::net::SocketAddr;

use super::nf_tables_ffi::{Expr, NftSet};
use super::wire::ip_from;

/// Registers as the reader can tell them, in 32-bit units: immediates (by the register number
/// the rule names) and registers loaded from a data map. Any other write to a register
/// forgets what overlaps it, so a DNAT never reads a value that was overwritten in between.
#[derive(Default)]
pub struct Registers<'a> {
    imm: HashMap<u32, &'a [u8]>,
    mapped: HashMap<u32, &'a str>,
}

/// The 32-bit units a write of `len` bytes to register `r` covers.
/// In u64: register numbers and lengths come from the rule, and may be anything up to u32::MAX.
fn span(r: u32, len: usize) -> std::ops::Range<u64> {
    let start = reg32(r);
    start..start + (len.div_ceil(4).max(1) as u64)
}

/// Expressions that write no register.
const NO_REGISTER_WRITE: &[&str] = &[
    "counter",
    "log",
    "limit",
    "quota",
    "notrack",
    "objref",
    "last",
    "connlimit",
    "reject",
    "masq",
    "dynset",
    "range",
];

impl<'a> Registers<'a> {
    /// Forgets every value overlapping a write of `len` bytes to `r`.
    fn clobber(&mut self, r: u32, len: usize) {
        let w = span(r, len);
        let overlaps = |s: std::ops::Range<u64>| s.start < w.end && w.start < s.end;
        self.imm.retain(|r2, d| !overlaps(span(*r2, d.len())));
        // A map value is at most an IPv6 address and a port: 20 bytes.
        self.mapped.retain(|r2, _| !overlaps(span(*r2, 20)));
    }

    /// Tracks what `expr` does to the registers.
    pub fn apply(&mut self, expr: &'a Expr) {
        match expr {
            Expr::Immediate { dreg, data } => {
                self.clobber(*dreg, data.len());
                self.imm.insert(*dreg, data);
            }
            Expr::Lookup { set, dreg: Some(r), .. } if *r != 0 => {
                self.clobber(*r, 20);
                self.mapped.insert(*r, set.as_str());
            }
            Expr::Numgen { dreg, .. } => self.clobber(*dreg, 4),
            Expr::Payload { dreg, len, .. } => self.clobber(*dreg, *len as usize),
            Expr::Meta { dreg: Some(r), .. } => self.clobber(*r, 16),
            Expr::Bitwise { dreg, .. } => self.clobber(*dreg, 16),
            Expr::Other(name) if !NO_REGISTER_WRITE.contains(&name.as_str()) => {
                // An expression that may load a register (ct, hash, fib, rt, exthdr, socket,
                // byteorder, anything unknown): nothing loaded before can be trusted.
                self.imm.clear();
                self.mapped.clear();
            }
            _ => {}
        }
    }
}

/// Every endpoint the DNAT `expr` can send to, from the registers the rule loaded before it:
/// one `ip:port` from immediates, or every value of the data map a lookup loaded (`set` finds
/// a map of the table by name).
pub fn dnat_targets<'s>(
    expr: &Expr,
    regs: &Registers<'_>,
    set: impl FnOnce(&str) -> Option<&'s NftSet>,
) -> Result<Vec<SocketAddr>, String> {
    match expr {
        Expr::Nat { addr_reg: Some(r), .. } if regs.mapped.contains_key(r) => map_targets(expr, set(regs.mapped[r])),
        _ => immediate_target(expr, &regs.imm).map(|a| vec![a]),
    }
}

/// The one `ip:port` a native DNAT (`dnat to IP:PORT`, as nft and kube-proxy write it) sends
/// to, from the registers the rule's immediates loaded. Anything else is an error saying why:
/// a range (`dnat to A-B:P` picks among several endpoints), a missing port, a register not
/// loaded by an immediate.
fn immediate_target(expr: &Expr, regs: &HashMap<u32, &[u8]>) -> Result<SocketAddr, String> {
    let Expr::Nat {
        addr_reg,
        addr_max_reg,
        proto_reg,
        proto_max_reg,
        ..
    } = expr
    else {
        return Err("not a NAT expression".into());
    };
    let load = |reg: Option<u32>| reg.and_then(|r| regs.get(&r).copied());
    let ranged = |min: Option<u32>, max: Option<u32>| max.is_some_and(|m| Some(m) != min && load(Some(m)) != load(min));
    if ranged(*addr_reg, *addr_max_reg) || ranged(*proto_reg, *proto_max_reg) {
        return Err("DNAT to a range of addresses or ports: which endpoint gets a connection is not known".into());
    }
    let addr = load(*addr_reg).and_then(ip_from);
    let port = load(*proto_reg)
        .filter(|b| b.len() >= 2)
        .map(|b| u16::from_be_bytes([b[0], b[1]]));
    match (addr, port) {
        (Some(a), Some(p)) => Ok(SocketAddr::new(a, p)),
        _ => Err("DNAT without an immediate address and port".into()),
    }
}

/// A register as a 32-bit register number: nf_tables' 16-byte registers 1..=4 start at the
/// 32-bit registers 8, 12, 16 and 20 (`NFT_REG32_00` = 8); nft loads a map's concatenated
/// value into `reg 1` and names the port's part `reg 9`.
fn reg32(r: u32) -> u64 {
    match r {
        1..=4 => 8 + u64::from(r - 1) * 4,
        _ => u64::from(r),
    }
}

/// Every endpoint a DNAT whose address and port come from a data map can choose: each
/// element's value is `address . port` (4 or 16 bytes, then the port in the next 32-bit
/// register). Anything else (no such map, a range, an address without a port, a value of
/// another layout) cannot be justified and is an error.
fn map_targets(expr: &Expr, set: Option<&NftSet>) -> Result<Vec<SocketAddr>, String> {
    let Expr::Nat {
        addr_reg: Some(addr),
        addr_max_reg,
        proto_reg,
        proto_max_reg,
        ..
    } = expr
    else {
        return Err("not a DNAT from registers".into());
    };
    let Some(set) = set else {
        return Err("DNAT through a map that is not in the table".into());
    };
    if addr_max_reg.is_some_and(|m| m != *addr) || proto_max_reg.is_some_and(|m| Some(m) != *proto_reg) {
        return Err(format!(
            "DNAT through map {} to a range: which endpoint is chosen is not known",
            set.name
        ));
    }
    let Some(proto) = proto_reg else {
        return Err(format!("DNAT through map {} without a port", set.name));
    };
    let mut out = Vec::new();
    for e in &set.elems {
        let Some(data) = e.data.as_deref() else {
            return Err(format!("map {}: an element without a value", set.name));
        };
        let alen = match data.len() {
            8 => 4,
            20 => 16,
            n => return Err(format!("map {}: a {n}-byte value is not address . port", set.name)),
        };
        // The port is loaded into the 32-bit register right after the address's.
        if reg32(*proto) != reg32(*addr) + (alen as u64 / 4) {
            return Err(format!(
                "map {}: the port register does not follow the address",
                set.name
            ));
        }
        let ip = ip_from(&data[..alen]).ok_or_else(|| format!("map {}: bad address", set.name))?;
        let port = u16::from_be_bytes([data[alen], data[alen + 1]]);
        out.push(SocketAddr::new(ip, port));
    }
    if out.is_empty() {
        return Err(format!("DNAT through map {} with no elements", set.name));
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod builders {
    //! Native DNATs as nft writes them, for the tests of both nf_tables readers.
    use crate::dataplane::nf_tables_ffi::{Expr, NFT_NAT_DNAT};

    /// `dnat` from the address in `addr_reg` and the port in `proto_reg` (one address: the
    /// kernel reports max equal to min).
    pub fn nat(addr_reg: u32, proto_reg: u32) -> Expr {
        Expr::Nat {
            kind: NFT_NAT_DNAT,
            addr_reg: Some(addr_reg),
            addr_max_reg: Some(addr_reg),
            proto_reg: Some(proto_reg),
            proto_max_reg: Some(proto_reg),
        }
    }

    /// `dnat to IP:PORT`: two immediates, then the DNAT.
    pub fn dnat_to(ip: &[u8], port: u16) -> Vec<Expr> {
        vec![
            Expr::Immediate {
                dreg: 1,
                data: ip.to_vec(),
            },
            Expr::Immediate {
                dreg: 2,
                data: port.to_be_bytes().to_vec(),
            },
            nat(1, 2),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::builders::{dnat_to, nat};
    use super::*;
    use crate::dataplane::nf_tables_ffi::NftElem;

    /// Found while unifying the DNAT decoders: a payload write (`@th,16,16 set …`, decoded
    /// with no destination register, u32::MAX) or any register number near u32::MAX
    /// overflowed the register arithmetic: a panic in debug builds on rules anyone can add.
    #[test]
    fn register_numbers_at_the_top_of_the_range_do_not_overflow() {
        let writes = [
            Expr::Payload {
                base: 2,
                offset: 2,
                len: 2,
                dreg: u32::MAX,
            },
            Expr::Payload {
                base: 1,
                offset: 0,
                len: u32::MAX,
                dreg: 1,
            },
            Expr::Immediate {
                dreg: u32::MAX,
                data: vec![10, 0, 0, 1],
            },
            Expr::Lookup {
                set: "m".into(),
                sreg: 1,
                dreg: Some(u32::MAX),
            },
            Expr::Meta {
                key: 3,
                dreg: Some(u32::MAX - 1),
            },
        ];
        let mut regs = Registers::default();
        for w in &writes {
            regs.apply(w);
        }
        let map = NftSet {
            name: "m".into(),
            flags: 0,
            data_type: None,
            elems: vec![NftElem {
                key: vec![0; 4],
                verdict: None,
                data: Some(vec![10, 0, 0, 1, 0, 80, 0, 0]),
            }],
        };
        let got = dnat_targets(&nat(u32::MAX, 1), &regs, |_| Some(&map));
        assert!(got.is_err(), "{got:?}");
    }

    #[test]
    fn a_dnat_reads_its_immediates_and_forgets_overwritten_ones() {
        let exprs = dnat_to(&[10, 180, 0, 1], 80);
        let mut regs = Registers::default();
        regs.apply(&exprs[0]);
        regs.apply(&exprs[1]);
        assert_eq!(
            dnat_targets(&nat(1, 2), &regs, |_| None),
            Ok(vec!["10.180.0.1:80".parse().unwrap()])
        );
        let ct = Expr::Other("ct".into());
        regs.apply(&ct);
        assert!(dnat_targets(&nat(1, 2), &regs, |_| None).is_err());
    }
}
