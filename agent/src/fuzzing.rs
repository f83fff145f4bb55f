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

use crate::dataplane::iptables::{self, legacy, nft_backend, xt, NatTable};
use crate::dataplane::netlink::{self, RecvBuf};
use crate::dataplane::nf_tables_ffi::{self, NftRule, NftTable};
use crate::dataplane::{conntrack, ipvs, nfnotify, nftables};
use crate::expected::{self, Semantics, SliceRecord};
use crate::k8s;
use crate::model::{ServiceRef, Timestamp};

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

const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_NEWSET: u16 = 9;
const NFT_MSG_NEWSETELEM: u16 = 12;

/// Splits `data` into netlink messages as `NftConn` splits a datagram it received (in an
/// aligned receive buffer) and hands each to the FFI layer's decoder for its type. The
/// decoders check first that libnftnl would survive the message (`nf_tables_shape`): what the
/// fuzzer reaches in libnftnl is what the agent would hand it.
fn nf_tables_stream(data: &[u8]) -> NfTablesStream {
    let buf = RecvBuf::holding(data);
    let mut out = NfTablesStream {
        rules: Vec::new(),
        table: NftTable::default(),
    };
    for msg in netlink::messages(&buf.as_bytes()[..data.len()]).map_while(Result::ok) {
        match msg.kind & 0xff {
            NFT_MSG_NEWRULE => {
                if let Ok(rule) = nf_tables_ffi::decode_rule(msg) {
                    out.rules.push(rule);
                }
            }
            NFT_MSG_NEWSET => {
                if let Ok(set) = nf_tables_ffi::decode_set_header(msg) {
                    out.table.sets.push(set);
                }
            }
            NFT_MSG_NEWSETELEM => {
                if let (Ok(elems), Some(set)) = (nf_tables_ffi::decode_elems(msg), out.table.sets.last_mut()) {
                    set.elems.extend(elems);
                }
            }
            _ => {}
        }
    }
    out
}

/// kube-proxy's nftables-mode table from nf_tables messages, followed as the nftables reader
/// follows it (both families), and the keys a keyed read would ask for.
pub fn nftables_table(data: &[u8]) {
    let NfTablesStream { rules, mut table } = nf_tables_stream(data);
    table.rules = rules;
    let _ = nf_tables_ffi::numgen_keys(&table.rules);
    let _ = nftables::routes_from_table(&table, false);
    let _ = nftables::routes_from_table(&table, true);
}

/// iptables-nft's `nat` table from nf_tables rule messages, decoded into rules and walked as
/// the iptables reader walks it (both families).
pub fn iptables_nft_rules(data: &[u8]) {
    let rules = nf_tables_stream(data).rules;
    for v6 in [false, true] {
        let mut table = NatTable::default();
        nft_backend::add_rules(&mut table, &rules, v6);
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

/// One datagram of ctnetlink's new-connection events, and the time each connection is
/// counted at.
pub fn conntrack_events(data: &[u8]) {
    let received = Timestamp::from_millis(1_700_000_000_000);
    for c in conntrack::parse_new_connections(data, received) {
        let _ = c.at.seconds_since(received);
    }
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
