//! The shapes of nf_tables messages libnftnl 1.2 survives. libnftnl trusts the kernel: it ends
//! the process (`exit(1)`, "nf_tables kernel ABI is broken") when an attribute it knows has the
//! wrong size for its type, and dereferences NULL for an expression without a name, a jump or
//! goto verdict without its chain, or set data with neither a value nor a verdict. Every
//! message is checked here before libnftnl parses it (`nf_tables_ffi`), so such a message is a
//! decode error (the read fails, its endpoints stay unknown) and never the end of the agent.
//!
//! The checks are stricter than libnftnl where that is simpler (an attribute kind or an
//! expression not listed here is refused), and pass everything the kernel sends for the tables
//! the readers dump (tested on captured kernel messages). Every expression libnftnl 1.2 parses
//! is listed, with the attribute types its parser validates (the kernel's own types, from
//! `linux/netfilter/nf_tables.h`): a rule with an expression the readers do not model (a `dup`
//! someone added, a `log`) must reach them, so that they report its Service uncertain, rather
//! than fail the whole table's read. This module only looks at bytes.

use super::netlink::NLMSG_HDRLEN;
use super::nf_tables_ffi::{NFT_GOTO, NFT_JUMP};

/// What libnftnl is about to parse a message as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Parse {
    Rule,
    Set,
    SetElems,
}

/// Whether libnftnl can parse `msg` (a whole netlink message, header included) as `what`
/// without ending the process or reading through NULL.
pub(crate) fn libnftnl_survives(msg: &[u8], what: Parse) -> bool {
    // The nfgenmsg (family, version, resource id) before the attributes.
    let Some(body) = msg.get(NLMSG_HDRLEN + 4..) else {
        return false;
    };
    let top = match what {
        Parse::Rule => RULE_ATTRS,
        Parse::Set => SET_ATTRS,
        Parse::SetElems => SET_ELEM_LIST_ATTRS,
    };
    attrs_fit(body, top)
}

/// How libnftnl expects an attribute to look.
#[derive(Clone, Copy)]
enum Attr {
    /// A NUL-terminated string.
    Str,
    U8,
    U16,
    U32,
    U64,
    Binary,
    /// Nested attributes of these kinds (by type number, from 1).
    Nested(&'static [Attr]),
    /// A list of expressions (`NFTA_LIST_ELEM`s of name and data).
    Exprs,
    /// `nft_data`: a value of at most 64 bytes, or a verdict.
    Data,
    /// A list of `NFTA_LIST_ELEM`s, each nested attributes of these kinds.
    List(&'static [Attr]),
    /// Anything: libnftnl does not look at it.
    Ignored,
    /// Something not handed to libnftnl at all (a single expression, which libnftnl
    /// allocates by a name it does not check for).
    Refused,
}

use Attr::*;

const RULE_ATTRS: &[Attr] = &[
    Str,
    Str,
    U64,
    Exprs,
    Nested(&[U32, U32]),
    U64,
    Binary,
    Ignored,
    U32,
    U32,
    U32,
];
const SET_ATTRS: &[Attr] = &[
    Str,
    Str,
    U32,
    U32,
    U32,
    U32,
    U32,
    U32,
    Nested(&[U32, List(&[U32])]),
    U32,
    U64,
    U32,
    Binary,
    Ignored,
    U32,
    U64,
    Refused,
    Exprs,
    // NFTA_SET_TYPE and NFTA_SET_COUNT: newer than libnftnl 1.2, which skips them.
    Ignored,
    Ignored,
];
const ELEM_ATTRS: &[Attr] = &[Data, Data, U32, U64, U64, Binary, Refused, Ignored, Str, Data, Exprs];
const SET_ELEM_LIST_ATTRS: &[Attr] = &[Str, Str, List(ELEM_ATTRS), U32];
const VERDICT_ATTRS: &[Attr] = &[U32, Str, U32];

/// The data attributes (by type number, from 1) of every expression libnftnl 1.2 parses: those
/// the readers understand, those kube-proxy and iptables-nft write, and the rest, which the
/// readers report as not understood. Other names are refused (libnftnl would not parse them
/// either).
fn expression_attrs(name: &[u8]) -> Option<&'static [Attr]> {
    Some(match name {
        b"payload\0" => &[U32; 8],
        b"meta\0" => &[U32; 3],
        b"cmp\0" => &[U32, U32, Data],
        b"immediate\0" => &[U32, Data],
        b"bitwise\0" => &[U32, U32, U32, Data, Data, U32, Data],
        b"lookup\0" => &[Str, U32, U32, U32, U32],
        b"numgen\0" => &[U32, U32, U32, U32, Str, U32],
        b"nat\0" => &[U32; 7],
        b"match\0" | b"target\0" => &[Str, U32, Binary],
        // bytes, packets, pad
        b"counter\0" => &[U64, U64, Ignored],
        b"ct\0" => &[U32, U32, U8, U32],
        b"fib\0" => &[U32; 3],
        b"masq\0" => &[U32; 3],
        b"reject\0" => &[U32, U8],
        b"dynset\0" => &[Str, U32, U32, U32, U32, U64, Refused, Ignored, U32, Exprs],
        // sreg addr, sreg dev
        b"dup\0" => &[U32, U32],
        // sreg dev, sreg addr, nfproto
        b"fwd\0" => &[U32; 3],
        // group, prefix, snaplen, qthreshold, level, flags
        b"log\0" => &[U16, Str, U32, U16, U32, U32],
        // rate, unit, burst, type, flags, pad
        b"limit\0" => &[U64, U64, U32, U32, U32, Ignored],
        // bytes, flags, pad, consumed
        b"quota\0" => &[U64, U32, Ignored, U64],
        // sreg, op, from, to
        b"range\0" => &[U32, U32, Data, Data],
        // key, dreg, level
        b"socket\0" => &[U32; 3],
        // sreg, dreg, len, modulus, seed, offset, type, set name, set id
        b"hash\0" => &[U32, U32, U32, U32, U32, U32, U32, Str, U32],
        // proto min, proto max, flags
        b"redir\0" => &[U32; 3],
        // num, total, flags, sreg qnum
        b"queue\0" => &[U16, U16, U16, U32],
        // family, reg addr, reg port
        b"tproxy\0" => &[U32; 3],
        // imm type, imm name, set sreg, set name, set id
        b"objref\0" => &[U32, Str, U32, Str, U32],
        // dreg, type, offset, len, flags, op, sreg
        b"exthdr\0" => &[U32, U8, U32, U32, U32, U32, U32],
        // dreg, key
        b"rt\0" => &[U32, U32],
        // sreg, dreg, op, len, size
        b"byteorder\0" => &[U32; 5],
        // count, flags
        b"connlimit\0" => &[U32, U32],
        // set, msecs, pad
        b"last\0" => &[U32, U64, Ignored],
        // mss, wscale, flags
        b"synproxy\0" => &[U16, U8, U32],
        // dreg, ttl, flags
        b"osf\0" => &[U32, U8, U32],
        // dreg, key, dir, spnum
        b"xfrm\0" => &[U32, U32, U8, U32],
        // key, dreg, mode
        b"tunnel\0" => &[U32; 3],
        // table name
        b"flow_offload\0" => &[Str],
        _ => return None,
    })
}

/// The attributes in `b`, or `None` when one of them does not fit.
fn attrs(mut b: &[u8]) -> Option<Vec<(u16, &[u8])>> {
    let mut out = Vec::new();
    while !b.is_empty() {
        let len = usize::from(u16::from_ne_bytes([*b.first()?, *b.get(1)?]));
        let kind = u16::from_ne_bytes([*b.get(2)?, *b.get(3)?]) & 0x3fff;
        if len < 4 || len > b.len() {
            return None;
        }
        out.push((kind, &b[4..len]));
        b = &b[len.next_multiple_of(4).min(b.len())..];
    }
    Some(out)
}

/// Whether no attribute kind appears twice (libnftnl keeps the last, the checks here the first).
fn unique(all: &[(u16, &[u8])]) -> bool {
    let mut kinds: Vec<u16> = all.iter().map(|(k, _)| *k).collect();
    kinds.sort_unstable();
    kinds.windows(2).all(|w| w[0] != w[1])
}

fn attrs_fit(b: &[u8], kinds: &[Attr]) -> bool {
    attrs(b).is_some_and(|all| {
        unique(&all)
            && all
                .iter()
                .all(|(kind, payload)| match kinds.get(usize::from(*kind).wrapping_sub(1)) {
                    Some(a) => attr_fits(*a, payload),
                    None => false,
                })
    })
}

fn attr_fits(a: Attr, p: &[u8]) -> bool {
    match a {
        Str => p.last() == Some(&0),
        U8 => p.len() == 1,
        U16 => p.len() == 2,
        U32 => p.len() == 4,
        U64 => p.len() == 8,
        Binary | Ignored => true,
        Refused => false,
        Nested(kinds) => attrs_fit(p, kinds),
        List(kinds) => attrs(p).is_some_and(|all| all.iter().all(|(k, e)| *k == 1 && attrs_fit(e, kinds))),
        // With neither a value nor a verdict, libnftnl reads an uninitialised data type.
        Data => attrs(p).is_some_and(|all| {
            unique(&all)
                && all.iter().any(|(k, _)| *k == 1 || *k == 2)
                && all.iter().all(|(k, v)| match k {
                    1 => v.len() <= 64,
                    2 => attrs_fit(v, VERDICT_ATTRS) && verdict_has_its_chain(v),
                    _ => true,
                })
        }),
        Exprs => attrs(p).is_some_and(|all| {
            all.iter().all(|(k, e)| {
                let Some(parts) = attrs(e) else { return false };
                let name = parts.iter().find(|(k, _)| *k == 1).map(|(_, n)| *n);
                let kinds = name.and_then(expression_attrs);
                *k == 1
                    && unique(&parts)
                    && kinds.is_some_and(|kinds| {
                        parts.iter().all(|(k, v)| match k {
                            1 => true,
                            2 => attrs_fit(v, kinds),
                            _ => true,
                        })
                    })
            })
        }),
    }
}

/// A jump or goto names its chain: libnftnl copies the name without looking whether it is
/// there.
fn verdict_has_its_chain(v: &[u8]) -> bool {
    let all = attrs(v).unwrap_or_default();
    let code = all.iter().find(|(k, _)| *k == 1).map(|(_, c)| c);
    let jumps = code.is_some_and(|c| {
        [NFT_JUMP, NFT_GOTO]
            .map(i32::to_be_bytes)
            .contains(&<[u8; 4]>::try_from(&c[..]).unwrap_or_default())
    });
    code.is_some() && (!jumps || all.iter().any(|(k, _)| *k == 2))
}

#[cfg(test)]
pub(crate) mod captured {
    //! Messages the kernel really sent, for the tests of this module and of the FFI layer.
    use super::Parse;
    use crate::dataplane::netlink;

    const NFT_MSG_NEWRULE: u16 = 6;
    const NFT_MSG_NEWSET: u16 = 9;
    const NFT_MSG_NEWSETELEM: u16 = 12;

    /// The nf_tables messages of the committed fuzz seeds, which were captured from the kernel
    /// (fuzz/seeds.py), with what each is parsed as.
    pub(crate) fn messages() -> Vec<(Vec<u8>, Parse)> {
        let corpus = concat!(env!("CARGO_MANIFEST_DIR"), "/../fuzz/corpus");
        let dirs = ["nftables_table", "iptables_nft_rules"].map(|t| format!("{corpus}/{t}"));
        let mut out = Vec::new();
        for entry in dirs.iter().flat_map(|d| std::fs::read_dir(d).unwrap()) {
            let path = entry.unwrap().path();
            if !path.file_name().unwrap().to_string_lossy().starts_with("seed-") {
                continue;
            }
            let data = std::fs::read(&path).unwrap();
            for msg in netlink::messages(&data) {
                let msg = msg.unwrap();
                let what = match msg.kind & 0xff {
                    NFT_MSG_NEWRULE => Parse::Rule,
                    NFT_MSG_NEWSET => Parse::Set,
                    NFT_MSG_NEWSETELEM => Parse::SetElems,
                    other => panic!("{}: message type {other}", path.display()),
                };
                out.push((msg.bytes().to_vec(), what));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::netlink;

    /// What the kernel really sends passes the checks that keep libnftnl alive: they refuse
    /// only what a kernel does not send.
    #[test]
    fn kernel_messages_pass_the_libnftnl_checks() {
        let messages = captured::messages();
        for (i, (msg, what)) in messages.iter().enumerate() {
            assert!(libnftnl_survives(msg, *what), "message {i} ({what:?}) refused");
        }
        assert!(messages.len() > 100, "only {} messages in the seeds", messages.len());
    }

    fn attr(kind: u16, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        netlink::put_attribute(&mut out, kind, data);
        out
    }

    fn message(attrs: &[Vec<u8>]) -> Vec<u8> {
        let body = attrs.concat();
        let mut msg = netlink::header(NLMSG_HDRLEN + 4 + body.len(), (10 << 8) | 6, 0, 0);
        msg.extend([2, 0, 0, 0]);
        msg.extend(body);
        msg
    }

    #[test]
    fn what_libnftnl_would_not_survive_is_refused() {
        let table = attr(1, b"nat\0");
        let expr =
            |name: &[u8], data: Vec<u8>| attr(1, &[attr(1, name), attr(2 | netlink::NLA_F_NESTED, &data)].concat());
        let exprs = |list: Vec<Vec<u8>>| attr(4 | netlink::NLA_F_NESTED, &list.concat());
        let verdict = |code: i32, chain: Option<&[u8]>| {
            let mut v = attr(1, &code.to_be_bytes());
            if let Some(c) = chain {
                v.extend(attr(2, c));
            }
            attr(2 | netlink::NLA_F_NESTED, &attr(2 | netlink::NLA_F_NESTED, &v))
        };
        let ok = message(&[
            table.clone(),
            attr(3, &7u64.to_be_bytes()),
            exprs(vec![expr(
                b"immediate\0",
                [attr(1, &0u32.to_be_bytes()), verdict(NFT_JUMP, Some(b"KUBE-SVC-X\0"))].concat(),
            )]),
        ]);
        assert!(libnftnl_survives(&ok, Parse::Rule));
        let refused = [
            // The handle, a u64, in 4 bytes: libnftnl exits.
            message(&[table.clone(), attr(3, &7u32.to_be_bytes())]),
            // A chain name without its NUL.
            message(&[table.clone(), attr(2, b"KUBE-SERVICES")]),
            // An expression without a name.
            message(&[
                table.clone(),
                exprs(vec![attr(1, &attr(2 | netlink::NLA_F_NESTED, &[]))]),
            ]),
            // A jump without its chain.
            message(&[
                table.clone(),
                exprs(vec![expr(
                    b"immediate\0",
                    [attr(1, &0u32.to_be_bytes()), verdict(NFT_JUMP, None)].concat(),
                )]),
            ]),
            // Immediate data with neither a value nor a verdict.
            message(&[
                table.clone(),
                exprs(vec![expr(
                    b"immediate\0",
                    [attr(1, &1u32.to_be_bytes()), attr(2 | netlink::NLA_F_NESTED, &[])].concat(),
                )]),
            ]),
            // A message too short for its nfgenmsg.
            netlink::header(NLMSG_HDRLEN, (10 << 8) | 6, 0, 0),
        ];
        for (i, msg) in refused.iter().enumerate() {
            assert!(!libnftnl_survives(msg, Parse::Rule), "case {i} passed");
        }
    }

    /// An expression the readers do not model reaches them (they report its Service
    /// uncertain) instead of failing the table's read; its attributes are still checked.
    #[test]
    fn expressions_the_readers_do_not_model_pass_with_their_attributes_checked() {
        let table = attr(1, b"kube-proxy\0");
        let rule = |name: &[u8], data: Vec<u8>| {
            let expr = attr(1, &[attr(1, name), attr(2 | netlink::NLA_F_NESTED, &data)].concat());
            message(&[table.clone(), attr(4 | netlink::NLA_F_NESTED, &expr)])
        };
        let u16_ = |k: u16, v: u16| attr(k, &v.to_be_bytes());
        let u32_ = |k: u16, v: u32| attr(k, &v.to_be_bytes());
        // `dup to 10.0.0.9` as the kernel sends it; `log prefix "x" group 2`.
        assert!(libnftnl_survives(&rule(b"dup\0", u32_(1, 1)), Parse::Rule));
        let log = [attr(2, b"x\0"), u16_(1, 2)].concat();
        assert!(libnftnl_survives(&rule(b"log\0", log), Parse::Rule));
        // The group is a u16: in 4 bytes libnftnl exits.
        assert!(!libnftnl_survives(&rule(b"log\0", u32_(1, 2)), Parse::Rule));
        // An attribute past the ones listed: refused (libnftnl might check it some other way).
        assert!(!libnftnl_survives(&rule(b"dup\0", u32_(3, 1)), Parse::Rule));
    }
}
