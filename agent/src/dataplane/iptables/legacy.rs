//! The nat table of iptables-legacy, read as the kernel hands it to `iptables-legacy-save`: one
//! `getsockopt(IPT_SO_GET_ENTRIES)` (IPv6: `IP6T_SO_GET_ENTRIES`) copies the whole table as a
//! binary blob of `ipt_entry` records, which this module decodes without a process or text.
//!
//! Layout (x86-64 UAPI): each entry is the fixed `ipt_entry`/`ip6t_entry` header, its matches
//! (`xt_entry_match`: u16 size, name[29], revision, data) and its target (`xt_entry_target`,
//! same header). A user chain begins after an `ERROR` target naming it; a standard target
//! (empty name) holds a verdict, or the byte offset of the chain it jumps to. The table is
//! only read when `/proc/net/ip_tables_names` lists it: reading a missing table would make the
//! kernel create it.

use std::collections::HashMap;
use std::io;

use super::xt;
use super::{NatTable, Rule, Verdict};
use crate::dataplane::wire::{ip_from, protocol_from_number, u16_at, u32_at};
use crate::dataplane::ReadError;
use crate::netns::NetNs;

const SO_GET_INFO: libc::c_int = 64;
const SO_GET_ENTRIES: libc::c_int = 65;
const TABLE_NAME_LEN: usize = 32;
/// `struct ipt_getinfo`: name[32], valid_hooks, hook_entry[5], underflow[5], num_entries, size.
const GETINFO_LEN: usize = 84;
/// `struct ipt_get_entries` up to the 8-aligned entry table.
const GET_ENTRIES_HEADER: usize = 40;
const XT_HEADER: usize = 32;
const INV_DSTIP: u8 = 0x02;
const INV_PROTO: u8 = 0x40;
const IP6T_F_PROTO: u8 = 0x01;
const HOOK_NAMES: [&str; 5] = ["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"];

/// Offsets of the fields of `ipt_entry` (IPv4) or `ip6t_entry` (IPv6).
struct EntryLayout {
    dst: usize,
    dmsk: usize,
    addr_len: usize,
    proto: usize,
    flags: Option<usize>,
    invflags: usize,
    target_offset: usize,
    next_offset: usize,
    size: usize,
}

const IPV4: EntryLayout = EntryLayout {
    dst: 4,
    dmsk: 12,
    addr_len: 4,
    proto: 80,
    flags: None,
    invflags: 83,
    target_offset: 88,
    next_offset: 90,
    size: 112,
};

const IPV6: EntryLayout = EntryLayout {
    dst: 16,
    dmsk: 48,
    addr_len: 16,
    proto: 128,
    flags: Some(131),
    invflags: 132,
    target_offset: 140,
    next_offset: 142,
    size: 168,
};

/// A NUL-terminated name in a fixed-size field.
fn name_at(b: &[u8], at: usize, len: usize) -> Option<&str> {
    let field = b.get(at..at + len)?;
    let end = field.iter().position(|&c| c == 0).unwrap_or(len);
    std::str::from_utf8(&field[..end]).ok()
}

/// One entry's header fields and its match/target area.
struct Entry<'a> {
    offset: usize,
    bytes: &'a [u8],
    target_offset: usize,
}

impl Entry<'_> {
    fn target_name(&self) -> Option<&str> {
        name_at(self.bytes, self.target_offset + 2, 29)
    }

    fn target_revision(&self) -> u8 {
        self.bytes.get(self.target_offset + 31).copied().unwrap_or(0)
    }

    fn target_data(&self) -> &[u8] {
        let size = u16_at(self.bytes, self.target_offset).map_or(0, usize::from);
        self.bytes
            .get(self.target_offset + XT_HEADER..self.target_offset + size.max(XT_HEADER))
            .unwrap_or_default()
    }
}

/// Splits the blob into entries; `None` when an offset points outside it.
fn entries<'a>(blob: &'a [u8], l: &EntryLayout) -> Option<Vec<Entry<'a>>> {
    let mut out = Vec::new();
    let mut off = 0;
    while off < blob.len() {
        let next = usize::from(u16_at(blob, off + l.next_offset)?);
        let target_offset = usize::from(u16_at(blob, off + l.target_offset)?);
        if next < l.size || target_offset < l.size || target_offset + XT_HEADER > next || off + next > blob.len() {
            return None;
        }
        out.push(Entry {
            offset: off,
            bytes: &blob[off..off + next],
            target_offset,
        });
        off += next;
    }
    Some(out)
}

/// Decodes a nat table blob. `hook_entry` holds the offsets where the built-in chains begin.
pub(crate) fn decode(blob: &[u8], hook_entry: &[(usize, &str)], v6: bool) -> NatTable {
    let l = if v6 { &IPV6 } else { &IPV4 };
    let mut table = NatTable::default();
    let Some(entries) = entries(blob, l) else {
        table
            .warnings
            .push("the nat table blob is malformed (an entry points outside it)".into());
        table.broken.extend(super::ENTRY_CHAINS.iter().map(|c| c.to_string()));
        return table;
    };
    // Where each chain begins: built-in hooks, and the entry after each user chain's ERROR.
    // The names borrow from the blob and the hook list; a name is copied once, when its chain is stored.
    let mut starts: HashMap<usize, &str> = hook_entry.iter().map(|(o, n)| (*o, *n)).collect();
    for (i, e) in entries.iter().enumerate() {
        if e.target_name() == Some("ERROR") {
            let name = name_at(e.bytes, e.target_offset + XT_HEADER, TABLE_NAME_LEN).unwrap_or_default();
            if let (Some(next), false) = (entries.get(i + 1), name == "ERROR") {
                starts.insert(next.offset, name);
            }
        }
    }
    // The chain being decoded and its rules so far, stored when the next chain begins.
    let mut chain: Option<(&str, Vec<Rule>)> = None;
    for e in &entries {
        if let Some(name) = starts.get(&e.offset) {
            store_chain(&mut table, chain.take());
            chain = Some((name, Vec::new()));
        }
        let Some((current, rules)) = chain.as_mut() else {
            continue;
        };
        let current = *current;
        let target = e.target_name().unwrap_or_default();
        if target == "ERROR" {
            store_chain(&mut table, chain.take());
            continue;
        }
        let mut rule = Rule::default();
        let b = e.bytes;
        let invflags = b.get(l.invflags).copied().unwrap_or(0);
        let dmsk = b.get(l.dmsk..l.dmsk + l.addr_len).unwrap_or_default();
        if invflags & INV_DSTIP == 0 && !dmsk.is_empty() && dmsk.iter().all(|&m| m == 0xff) {
            rule.destination = b.get(l.dst..l.dst + l.addr_len).and_then(ip_from);
        }
        let proto_set = l.flags.is_none_or(|f| b.get(f).is_some_and(|v| v & IP6T_F_PROTO != 0));
        if proto_set && invflags & INV_PROTO == 0 {
            rule.protocol = u16_at(b, l.proto).and_then(protocol_from_number);
        }
        let mut m = l.size;
        while m + XT_HEADER <= e.target_offset {
            let size = usize::from(u16_at(b, m).unwrap_or(0));
            if size < XT_HEADER || m + size > e.target_offset {
                table.broken.insert(current.to_string());
                table.warnings.push(format!("chain {current}: a match has a bad size"));
                break;
            }
            let name = name_at(b, m + 2, 29).unwrap_or_default();
            let data = &b[m + XT_HEADER..m + size];
            match name {
                "comment" => rule.comment = xt::comment(data),
                "tcp" | "udp" | "sctp" => rule.dport = rule.dport.or(xt::destination_port(name, data)),
                _ => {}
            }
            m += size;
        }
        rule.verdict = match target {
            "DNAT" => Verdict::Dnat(xt::dnat(u32::from(e.target_revision()), e.target_data(), v6)),
            // A standard target: a verdict (negative), or the offset of the chain it jumps to.
            "" => match u32_at(e.target_data(), 0).map(|v| v as i32) {
                Some(v) if v >= 0 => match starts.get(&(v as usize)) {
                    Some(name) => Verdict::Jump(name.to_string()),
                    None => {
                        table.broken.insert(current.to_string());
                        table
                            .warnings
                            .push(format!("chain {current}: a jump to offset {v}, which starts no chain"));
                        Verdict::Continue
                    }
                },
                _ => Verdict::Continue,
            },
            _ => Verdict::Continue,
        };
        rules.push(rule);
    }
    store_chain(&mut table, chain);
    table
}

/// Stores a decoded chain's rules (a name seen twice keeps the rules of both).
fn store_chain(table: &mut NatTable, chain: Option<(&str, Vec<Rule>)>) {
    let Some((name, rules)) = chain else { return };
    match table.chains.get_mut(name) {
        Some(existing) => existing.extend(rules),
        None => {
            table.chains.insert(name.to_string(), rules);
        }
    }
}

/// Whether this network namespace has the legacy `nat` table (without creating it).
fn has_nat_table(v6: bool) -> bool {
    let file = if v6 { "ip6_tables_names" } else { "ip_tables_names" };
    match std::fs::read_to_string(format!("/proc/thread-self/net/{file}")) {
        Ok(names) => names.lines().any(|l| l.trim() == "nat"),
        // No ip_tables module at all: no legacy table.
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        // The list is root's only (0440); a non-root reader with the capabilities asks the
        // kernel directly, as iptables-legacy-save does.
        Err(_) => true,
    }
}

/// Offsets where the built-in chains begin, with their names.
type HookEntries = Vec<(usize, &'static str)>;

/// The raw nat table and the built-in chain offsets, read in the current network namespace.
#[allow(unsafe_code)] // socket(2) and getsockopt(2), which std does not wrap
fn read_blob(v6: bool) -> io::Result<Option<(Vec<u8>, HookEntries)>> {
    if !has_nat_table(v6) {
        return Ok(None);
    }
    let (domain, level) = if v6 {
        (libc::AF_INET6, libc::SOL_IPV6)
    } else {
        (libc::AF_INET, libc::SOL_IP)
    };
    // SAFETY: a plain socket(2) call; the descriptor is owned right away.
    let fd = unsafe { libc::socket(domain, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::IPPROTO_RAW) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
    let getsockopt = |opt: libc::c_int, buf: &mut [u8]| -> io::Result<()> {
        let mut len = buf.len() as libc::socklen_t;
        // SAFETY: buf is valid for len bytes; the kernel writes at most len.
        let r = unsafe { libc::getsockopt(raw, level, opt, buf.as_mut_ptr().cast(), &mut len) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    // The table may be replaced between the two calls (its size then no longer matches): retry.
    for _ in 0..5 {
        let mut info = [0u8; GETINFO_LEN];
        info[..3].copy_from_slice(b"nat");
        match getsockopt(SO_GET_INFO, &mut info) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
            r => r?,
        }
        let valid_hooks = u32_at(&info, 32).unwrap_or(0);
        let size = u32_at(&info, 80).unwrap_or(0) as usize;
        let hooks: HookEntries = (0..5)
            .filter(|h| valid_hooks & (1 << h) != 0)
            .filter_map(|h| Some((u32_at(&info, 36 + 4 * h)? as usize, HOOK_NAMES[h])))
            .collect();
        let mut buf = vec![0u8; GET_ENTRIES_HEADER + size];
        buf[..3].copy_from_slice(b"nat");
        buf[TABLE_NAME_LEN..TABLE_NAME_LEN + 4].copy_from_slice(&(size as u32).to_ne_bytes());
        match getsockopt(SO_GET_ENTRIES, &mut buf) {
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => continue,
            r => r?,
        }
        buf.drain(..GET_ENTRIES_HEADER);
        return Ok(Some((buf, hooks)));
    }
    Err(io::Error::other("the nat table kept changing while it was read"))
}

/// The legacy nat table of one family in `netns`; `None` when it does not exist.
pub(super) fn table(netns: &NetNs, v6: bool) -> Result<Option<NatTable>, ReadError> {
    let family = if v6 { "ip6tables" } else { "iptables" };
    let blob = netns
        .run(move || read_blob(v6))?
        .map_err(|source| ReadError::ReadFailed {
            what: format!(
                "reading the {family}-legacy nat table (getsockopt on a raw socket: the agent needs CAP_NET_ADMIN and CAP_NET_RAW in the host network namespace)"
            ),
            source: source.into(),
        })?;
    Ok(blob.map(|(bytes, hooks)| decode(&bytes, &hooks, v6)))
}

#[cfg(test)]
mod tests {
    use super::super::xt::builders;
    use super::*;
    use crate::model::Protocol;

    /// Builds a blob the way the kernel lays it out, for IPv4.
    #[derive(Default)]
    struct Blob {
        bytes: Vec<u8>,
    }

    fn xt(name: &str, rev: u8, data: &[u8]) -> Vec<u8> {
        let size = (XT_HEADER + data.len()).next_multiple_of(8);
        let mut b = vec![0u8; size];
        b[0..2].copy_from_slice(&(size as u16).to_ne_bytes());
        b[2..2 + name.len()].copy_from_slice(name.as_bytes());
        b[31] = rev;
        b[XT_HEADER..XT_HEADER + data.len()].copy_from_slice(data);
        b
    }

    impl Blob {
        /// Appends an entry and returns its offset.
        fn entry(&mut self, dst: Option<[u8; 4]>, proto: u16, matches: &[Vec<u8>], target: Vec<u8>) -> usize {
            let mut e = vec![0u8; IPV4.size];
            if let Some(d) = dst {
                e[4..8].copy_from_slice(&d);
                e[12..16].copy_from_slice(&[0xff; 4]);
            }
            e[80..82].copy_from_slice(&proto.to_ne_bytes());
            for m in matches {
                e.extend_from_slice(m);
            }
            let target_offset = e.len();
            e.extend_from_slice(&target);
            e[88..90].copy_from_slice(&(target_offset as u16).to_ne_bytes());
            let next = e.len() as u16;
            e[90..92].copy_from_slice(&next.to_ne_bytes());
            let at = self.bytes.len();
            self.bytes.extend_from_slice(&e);
            at
        }

        fn chain(&mut self, name: &str) -> usize {
            let mut data = [0u8; 32];
            data[..name.len()].copy_from_slice(name.as_bytes());
            self.entry(None, 0, &[], xt("ERROR", 0, &data));
            self.bytes.len()
        }

        fn standard(verdict: i32) -> Vec<u8> {
            xt("", 0, &verdict.to_ne_bytes())
        }
    }

    const RETURN: i32 = -5;

    #[test]
    fn a_kube_proxy_table_decodes_into_rules() {
        let mut b = Blob::default();
        // Built-in PREROUTING: jump to KUBE-SERVICES (offset patched below), then its policy.
        let pre = b.entry(None, 0, &[], Blob::standard(0));
        b.entry(None, 0, &[], Blob::standard(-2));
        let services = b.chain("KUBE-SERVICES");
        let entry_rule = b.entry(
            Some([172, 30, 0, 41]),
            6,
            &[
                xt("comment", 0, &builders::comment("ns1/svc1:p80 cluster IP")),
                xt("tcp", 0, &builders::tcp_dport(80)),
            ],
            Blob::standard(0),
        );
        b.entry(None, 0, &[], Blob::standard(RETURN));
        let svc = b.chain("KUBE-SVC-XPGD46QRK7WJZT7O");
        b.entry(None, 0, &[], Blob::standard(0)); // patched to the SEP chain
        b.entry(None, 0, &[], Blob::standard(RETURN));
        let sep = b.chain("KUBE-SEP-A");
        b.entry(
            None,
            6,
            &[xt("tcp", 0, &[0u8; 12])],
            xt("DNAT", 2, &builders::dnat2("10.180.0.1:80".parse().unwrap())),
        );
        b.entry(None, 0, &[], Blob::standard(RETURN));
        let leftover = b.chain("KUBE-SEP-LEFTOVER");
        b.entry(
            None,
            6,
            &[],
            xt("DNAT", 2, &builders::dnat2("10.180.9.9:80".parse().unwrap())),
        );
        b.entry(None, 0, &[], Blob::standard(RETURN));
        b.chain("ERROR");
        let _ = leftover;
        // Patch the jumps: verdict sits right after the target header.
        let patch = |bytes: &mut Vec<u8>, entry: usize, to: usize| {
            let t = usize::from(u16_at(bytes, entry + 88).unwrap());
            bytes[entry + t + XT_HEADER..entry + t + XT_HEADER + 4].copy_from_slice(&(to as i32).to_ne_bytes());
        };
        patch(&mut b.bytes, pre, services);
        patch(&mut b.bytes, entry_rule, svc);
        patch(&mut b.bytes, svc, sep);
        let table = decode(&b.bytes, &[(pre, "PREROUTING")], false);
        assert!(table.warnings.is_empty(), "{:?}", table.warnings);
        let (services, _, broken) = super::super::walk(&table);
        assert!(!broken);
        assert_eq!(services.len(), 1);
        let s = &services[0];
        assert_eq!(s.name.as_ref().unwrap().to_string(), "ns1/svc1:p80");
        assert_eq!(s.protocol, Some(Protocol::Tcp));
        assert_eq!(s.frontends.iter().collect::<Vec<_>>(), ["172.30.0.41:80"]);
        assert_eq!(
            s.endpoints.iter().map(|e| e.to_string()).collect::<Vec<_>>(),
            ["10.180.0.1:80"],
            "the leftover SEP chain is unreferenced"
        );
    }

    #[test]
    fn malformed_blobs_and_bad_jumps_are_reported_not_guessed() {
        let table = decode(&[1, 2, 3], &[], false);
        assert!(!table.warnings.is_empty());
        assert!(
            table.broken.contains("KUBE-SERVICES"),
            "an unreadable table makes the entry chains unknown"
        );
        let mut b = Blob::default();
        b.chain("KUBE-SERVICES");
        b.entry(None, 0, &[], Blob::standard(12345));
        b.chain("ERROR");
        let table = decode(&b.bytes, &[], false);
        assert!(table.broken.contains("KUBE-SERVICES"));
        let (_, _, entry_broken) = super::super::walk(&table);
        assert!(entry_broken);
    }
}
