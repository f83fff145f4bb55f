//! Entry points for the coverage-guided fuzz targets in `fuzz/`: each hands arbitrary bytes
//! to one decoder of untrusted input as the reader that owns it would, then runs what consumes
//! the decoded value, so a malformed input that decodes "successfully" is followed as far as a
//! real read would take it. Not an API: it exists only so the targets reach decoders that are
//! private to their modules. Nothing here may panic, loop or allocate beyond the input's size;
//! when something does, the decoder is at fault, not this module.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::ResourceExt;

use crate::dataplane::iptables::{self, legacy, nft, xt, NatTable};
use crate::dataplane::nftnl::{self, NftRule, NftTable};
use crate::dataplane::{ipvs, nfnotify, nftables};
use crate::expected::{self, Semantics, SliceRecord};
use crate::k8s;
use crate::model::ServiceRef;

/// The first bytes of the legacy target's input stand for `ipt_getinfo`: a flags byte (bit 0:
/// IPv6; bits 1..=5: which of the five hooks are valid), then five `u16` hook offsets.
const LEGACY_HEADER: usize = 1 + 5 * 2;
const HOOK_NAMES: [&str; 5] = ["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"];

/// The legacy iptables `nat` blob (`IPT_SO_GET_ENTRIES`), decoded and walked.
pub fn iptables_legacy_blob(data: &[u8]) {
    let Some((header, blob)) = data.split_at_checked(LEGACY_HEADER) else {
        return;
    };
    let v6 = header[0] & 1 != 0;
    let hooks: Vec<(usize, &str)> = (0..5)
        .filter(|h| header[0] & (2 << h) != 0)
        .map(|h| {
            let at = 1 + 2 * h;
            (
                usize::from(u16::from_ne_bytes([header[at], header[at + 1]])),
                HOOK_NAMES[h],
            )
        })
        .collect();
    let table = legacy::decode(blob, &hooks, v6);
    let _ = iptables::walk(&table);
}

/// The xtables match and target payloads: the first byte picks the decoder (and the DNAT
/// revision and family), the rest is the payload.
pub fn xt_payload(data: &[u8]) {
    let Some((&which, info)) = data.split_first() else {
        return;
    };
    match which % 8 {
        0 => {
            let _ = xt::comment(info);
        }
        1 => {
            let _ = xt::destination_port("tcp", info);
        }
        2 => {
            let _ = xt::destination_port("udp", info);
        }
        3 => {
            let _ = xt::destination_port("sctp", info);
        }
        _ => {
            let _ = xt::dnat(u32::from(which >> 4), info, which & 8 != 0);
        }
    }
}

/// `iptables-save` text (or `iptables-restore` input), parsed and walked.
pub fn iptables_save_text(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = iptables::routes_from_save(text);
    }
}

/// nf_tables messages as a dump receives them: rule, set and set-element messages in one
/// stream (the elements belong to the set before them).
struct NfTablesStream {
    rules: Vec<NftRule>,
    table: NftTable,
}

const NLMSG_HDRLEN: usize = 16;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_NEWSET: u16 = 9;
const NFT_MSG_NEWSETELEM: u16 = 12;

/// Splits `data` into netlink messages with the checks `NftConn` makes on a received datagram,
/// and hands each to libnftnl by its type. Like `NftConn`'s receive buffer, the copy is 8-byte
/// aligned and has room beyond the last message.
fn nf_tables_stream(data: &[u8]) -> NfTablesStream {
    let mut words = vec![0u64; data.len().div_ceil(8) + 8];
    let mut aligned = Vec::with_capacity(words.len() * 8);
    aligned.extend_from_slice(data);
    aligned.resize(words.len() * 8, 0);
    for (w, b) in words.iter_mut().zip(aligned.chunks_exact(8)) {
        *w = u64::from_ne_bytes(b.try_into().unwrap_or_default());
    }
    let mut out = NfTablesStream {
        rules: Vec::new(),
        table: NftTable::default(),
    };
    let mut off = 0;
    while off + NLMSG_HDRLEN <= data.len() {
        let len = u32::from_ne_bytes(data[off..off + 4].try_into().unwrap_or_default()) as usize;
        let kind = u16::from_ne_bytes([data[off + 4], data[off + 5]]);
        if len < NLMSG_HDRLEN || len > data.len() - off {
            break;
        }
        let hdr = words.as_ptr().cast::<u8>().wrapping_add(off).cast::<libc::nlmsghdr>();
        if !libnftnl_survives(&data[off..off + len], kind & 0xff) {
            off += (len + 3) & !3;
            continue;
        }
        match kind & 0xff {
            NFT_MSG_NEWRULE => {
                if let Ok(rule) = nftnl::decode_rule(hdr) {
                    out.rules.push(rule);
                }
            }
            NFT_MSG_NEWSET => {
                if let Ok(set) = nftnl::decode_set_header(hdr) {
                    out.table.sets.push(set);
                }
            }
            NFT_MSG_NEWSETELEM => {
                if let (Ok(elems), Some(set)) = (nftnl::decode_elems(hdr), out.table.sets.last_mut()) {
                    set.elems.extend(elems);
                }
            }
            _ => {}
        }
        off += (len + 3) & !3;
    }
    out
}

/// How libnftnl expects an attribute to look. libnftnl 1.2 ends the process (`exit(1)`, "nf_tables
/// kernel ABI is broken") when an attribute it knows has the wrong size for its type, and
/// dereferences NULL for an expression without a name: it trusts the kernel. The fuzzer would
/// find those at once and nothing past them, so messages libnftnl would not survive are not
/// handed to it (the agent trusts the kernel's messages as libnftnl does; see fuzz/README.md).
/// The checks are stricter than libnftnl's where that is simpler: a skipped input costs nothing.
#[derive(Clone, Copy)]
enum Attr {
    /// A NUL-terminated string.
    Str,
    U8,
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

/// The data attributes of the expressions the readers understand and of the others kube-proxy
/// writes; other expressions are not handed on.
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
        b"counter\0" => &[U64, U64],
        b"ct\0" => &[U32, U32, U8, U32],
        b"fib\0" => &[U32; 3],
        b"masq\0" => &[U32; 3],
        b"reject\0" => &[U32, U8],
        b"dynset\0" => &[Str, U32, U32, U32, U32, U64, Refused, Ignored, U32, Exprs],
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
        [nftnl::NFT_JUMP, nftnl::NFT_GOTO]
            .map(i32::to_be_bytes)
            .contains(&<[u8; 4]>::try_from(&c[..]).unwrap_or_default())
    });
    code.is_some() && (!jumps || all.iter().any(|(k, _)| *k == 2))
}

/// Whether libnftnl can parse this message without ending the process.
fn libnftnl_survives(msg: &[u8], kind: u16) -> bool {
    let Some(body) = msg.get(NLMSG_HDRLEN + 4..) else {
        return false;
    };
    let top = match kind {
        NFT_MSG_NEWRULE => RULE_ATTRS,
        NFT_MSG_NEWSET => SET_ATTRS,
        NFT_MSG_NEWSETELEM => SET_ELEM_LIST_ATTRS,
        _ => return true,
    };
    attrs_fit(body, top)
}

/// kube-proxy's nftables-mode table from nf_tables messages, followed as the nftables reader
/// follows it (both families), and the keys a keyed read would ask for.
pub fn nftables_table(data: &[u8]) {
    let NfTablesStream { rules, mut table } = nf_tables_stream(data);
    table.rules = rules;
    let _ = nftnl::numgen_keys(&table.rules);
    let _ = nftables::routes_from_table(&table, false);
    let _ = nftables::routes_from_table(&table, true);
}

/// iptables-nft's `nat` table from nf_tables rule messages, decoded into rules and walked as
/// the iptables reader walks it (both families).
pub fn iptables_nft_rules(data: &[u8]) {
    let rules = nf_tables_stream(data).rules;
    for v6 in [false, true] {
        let mut table = NatTable::default();
        nft::add_rules(&mut table, &rules, v6);
        let _ = iptables::walk(&table);
    }
}

/// The attributes of one IPVS generic netlink reply (after the genl header), decoded both as
/// a virtual server and as a destination of it, and turned into routes.
pub fn ipvs_attributes(data: &[u8]) {
    let nlas = ipvs::parse_nlas(data);
    let service = ipvs::decode_service(&nlas);
    let af = service.as_ref().map_or(libc::AF_INET as u16, |vs| vs.af);
    let dest = ipvs::decode_dest(&nlas, af);
    if let Some(vs) = service {
        let _ = ipvs::routes(&[(vs, dest.into_iter().collect())]);
    }
}

/// One datagram of the nf_tables notification stream.
pub fn nf_notifications(data: &[u8]) {
    let _ = nfnotify::parse_generations(data);
}

/// What the EndpointSlice target reads: a Service, its slices, and the node's view.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct ClusterView {
    #[serde(default)]
    service: Option<Service>,
    #[serde(default)]
    slices: Vec<EndpointSlice>,
    #[serde(default)]
    node: String,
    #[serde(default)]
    zone: Option<String>,
    #[serde(default)]
    local_falls_back_to_cluster: bool,
}

/// A Service and EndpointSlices from arbitrary JSON, converted as the watchers convert them,
/// and the expected set computed for every Service the slices name.
pub fn endpoint_slices_json(data: &[u8]) {
    let Ok(view) = serde_json::from_slice::<ClusterView>(data) else {
        return;
    };
    let spec = view.service.as_ref().and_then(|s| {
        let service = ServiceRef::new(s.namespace().unwrap_or_default(), s.name_any());
        Some((service, k8s::service_spec(s)?))
    });
    let mut by_service: BTreeMap<ServiceRef, Vec<SliceRecord>> = BTreeMap::new();
    for slice in &view.slices {
        if let Ok((record, _problems)) = k8s::slice_record(slice) {
            by_service.entry(record.service.clone()).or_default().push(record);
        }
    }
    let semantics = Semantics {
        local_falls_back_to_cluster: view.local_falls_back_to_cluster,
        zone: view.zone,
    };
    for (service, records) in &by_service {
        let slices: Vec<&SliceRecord> = records.iter().collect();
        let spec = spec.as_ref().filter(|(s, _)| s == service).map(|(_, spec)| spec);
        let _ = expected::expect_service_with(service, spec, &slices, &view.node, &semantics);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the kernel really sends (the seeds are captured from it) passes the checks that
    /// keep libnftnl alive: they refuse only what a kernel does not send.
    #[test]
    fn kernel_messages_pass_the_libnftnl_checks() {
        let corpus = concat!(env!("CARGO_MANIFEST_DIR"), "/../fuzz/corpus");
        let dirs = ["nftables_table", "iptables_nft_rules"].map(|t| format!("{corpus}/{t}"));
        let mut messages = 0;
        for entry in dirs.iter().flat_map(|d| std::fs::read_dir(d).unwrap()) {
            let path = entry.unwrap().path();
            if !path.file_name().unwrap().to_string_lossy().starts_with("seed-") {
                continue;
            }
            let data = std::fs::read(&path).unwrap();
            let mut off = 0;
            while off + NLMSG_HDRLEN <= data.len() {
                let len = u32::from_ne_bytes(data[off..off + 4].try_into().unwrap()) as usize;
                let kind = u16::from_ne_bytes([data[off + 4], data[off + 5]]);
                assert!(
                    libnftnl_survives(&data[off..off + len], kind & 0xff),
                    "{}: message at {off} (type {kind:#x}) refused",
                    path.display()
                );
                messages += 1;
                off += (len + 3) & !3;
            }
        }
        assert!(messages > 100, "only {messages} messages in the seeds");
    }
}
