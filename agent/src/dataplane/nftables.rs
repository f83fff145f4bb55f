//! Reader for kube-proxy's nftables mode (tables `ip kube-proxy` and `ip6 kube-proxy`), read
//! over netlink with libnftnl.
//!
//! An endpoint is routed when an element of `service-ips` or `service-nodeports` leads
//! (through `external-…`/`firewall-…` chains) to a `service-…` or `local-…` chain whose
//! `numgen … vmap` or `goto` reaches an `endpoint-…` chain that does `dnat to IP:port`.
//! kube-proxy flushes a removed endpoint chain at once and deletes it later: a flushed or
//! unreferenced chain routes nothing. Expressions the reader does not know make the service
//! port `unknown`, never "not routed".

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};

use super::netlink::{LazyConnection, NetlinkError};
use super::nf_dnat::{dnat_targets, Registers};
use super::nf_tables_ffi::{
    self, Expr, NfTablesError, NftConn, NftElem, NftTable, NFT_DATA_VERDICT, NFT_GOTO, NFT_JUMP, NFT_NAT_DNAT,
};
use super::wire::{be16_at, ip_from, protocol_from_number, protocol_number, PROTOCOLS};
use super::{ChangeSource, DataplaneReader, DataplaneSnapshot, Mode, ReadError, ReadScope, ReadTargets, ServiceRoutes};
use crate::model::{Protocol, ServicePortName};
use crate::netns::NetNs;

pub const TABLE: &str = "kube-proxy";
const ENTRY_MAPS: [&str; 2] = ["service-ips", "service-nodeports"];
const CHAIN_PREFIXES: [&str; 4] = ["service-", "local-", "external-", "firewall-"];
/// Expressions that cannot redirect traffic to another chain or address.
const HARMLESS: &[&str] = &[
    "payload",
    "meta",
    "cmp",
    "bitwise",
    "counter",
    "ct",
    "fib",
    "masq",
    "reject",
    "log",
    "limit",
    "dynset",
    "range",
    "socket",
    "quota",
    "numgen",
    "hash",
    "notrack",
    "exthdr",
    "rt",
    "byteorder",
    "objref",
    "connlimit",
    "last",
];

/// Service port and protocol from a per-service chain name: `service-ULMVA6XW-ns1/svc1/tcp/p80`.
fn parse_chain(chain: &str) -> Option<(String, ServicePortName, Protocol)> {
    let base = CHAIN_PREFIXES.iter().find_map(|p| chain.strip_prefix(p))?;
    let (_hash, rest) = base.split_once('-')?;
    let mut parts = rest.splitn(4, '/');
    let (ns, svc, proto, port) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let protocol = proto.parse().ok()?;
    let spn = ServicePortName::parse(&format!("{ns}/{svc}{}{port}", if port.is_empty() { "" } else { ":" }))?;
    Some((base.to_string(), spn, protocol))
}

/// Decodes a map key: `addr . proto . port` (service-ips) or `proto . port` (service-nodeports),
/// each field padded to 4 bytes.
fn frontend(map: &str, key: &[u8], v6: bool) -> Option<(String, Option<Protocol>)> {
    let alen = if v6 { 16 } else { 4 };
    match map {
        "service-ips" if key.len() >= alen + 8 => {
            let ip = ip_from(&key[..alen])?;
            let proto = protocol_from_number(u16::from(key[alen]));
            let port = be16_at(key, alen + 4)?;
            Some((SocketAddr::new(ip, port).to_string(), proto))
        }
        "service-nodeports" if key.len() >= 8 => Some((
            format!("*:{}", be16_at(key, 4)?),
            protocol_from_number(u16::from(key[0])),
        )),
        _ => None,
    }
}

/// The elements of entry map `map` for `frontends` (`ip:port`, or `*:port` for NodePorts), by
/// key lookups, for every protocol kube-proxy programs: a frontend does not say its protocol.
fn frontend_elems(
    conn: &mut NftConn,
    family: u16,
    map: &str,
    frontends: &BTreeSet<String>,
    v6: bool,
) -> Result<Vec<NftElem>, NfTablesError> {
    let mut out = Vec::new();
    for f in frontends {
        for proto in PROTOCOLS {
            let Some(key) = frontend_key(map, f, proto, v6) else {
                continue;
            };
            if let Some(e) = conn.elem(family, TABLE, map, &key)? {
                out.push(e);
            }
        }
    }
    Ok(out)
}

/// The key of `frontend` in entry map `map` (the inverse of `frontend`): registers of 4 bytes
/// per concatenated field, as nft lays them out. `None` when the frontend has no key there.
fn frontend_key(map: &str, frontend: &str, proto: Protocol, v6: bool) -> Option<Vec<u8>> {
    let (host, port) = frontend.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    let mut key = Vec::with_capacity(24);
    match map {
        "service-ips" => {
            let addr: SocketAddr = frontend.parse().ok()?;
            match (addr.ip(), v6) {
                (IpAddr::V4(ip), false) => key.extend(ip.octets()),
                (IpAddr::V6(ip), true) => key.extend(ip.octets()),
                _ => return None,
            }
        }
        "service-nodeports" if host == "*" => {}
        _ => return None,
    }
    key.extend([protocol_number(proto), 0, 0, 0]);
    key.extend(port.to_be_bytes());
    key.extend([0, 0]);
    Some(key)
}

/// Follows the graph of one table and returns the routed service ports.
pub fn routes_from_table(table: &NftTable, v6: bool) -> (Vec<ServiceRoutes>, Vec<String>) {
    let mut chains: HashMap<&str, Vec<&nf_tables_ffi::NftRule>> = HashMap::new();
    for r in &table.rules {
        chains.entry(r.chain.as_str()).or_default().push(r);
    }
    let sets: HashMap<&str, &nf_tables_ffi::NftSet> = table.sets.iter().map(|s| (s.name.as_str(), s)).collect();
    let mut groups: BTreeMap<String, ServiceRoutes> = BTreeMap::new();
    let mut warnings = Vec::new();
    let mut reached = HashSet::new();
    for map in ENTRY_MAPS {
        let Some(set) = sets.get(map) else { continue };
        for elem in &set.elems {
            let Some((code, Some(target))) = &elem.verdict else {
                continue;
            };
            if *code != NFT_GOTO && *code != NFT_JUMP {
                continue;
            }
            let (id, name, proto) = match parse_chain(target) {
                Some((base, spn, p)) => (base, Some(spn), Some(p)),
                None => (target.clone(), None, None),
            };
            let group = groups.entry(id.clone()).or_default();
            group.chain_id = Some(id);
            group.name = group.name.take().or(name);
            group.protocol = group.protocol.or(proto);
            match frontend(map, &elem.key, v6) {
                Some((f, p)) => {
                    group.frontends.insert(f);
                    group.protocol = group.protocol.or(p);
                }
                None => warnings.push(format!("{map}: cannot decode element key {:02x?}", elem.key)),
            }
            follow(&chains, &sets, target, group, &mut warnings, &mut reached);
        }
    }
    let mut out: Vec<ServiceRoutes> = groups.into_values().collect();
    out.extend(stray_dnats(&chains, &sets, &reached, &mut warnings));
    (out, warnings)
}

/// DNATs outside kube-proxy's graph: reached from a chain no service map leads to that is not
/// one of kube-proxy's endpoint chains (a hooked chain, `services` itself, a chain someone
/// added), following its jumps and maps as the service chains are followed, but not into the
/// chains the service maps already cover. An endpoint chain that nothing refers to is
/// kube-proxy's leftover and routes nothing; one that a stray chain jumps to is followed.
/// Whatever such rules may send traffic to counts as routed (unattributed), and a target that
/// cannot be read makes the group uncertain.
fn stray_dnats(
    chains: &HashMap<&str, Vec<&nf_tables_ffi::NftRule>>,
    sets: &HashMap<&str, &nf_tables_ffi::NftSet>,
    reached: &HashSet<String>,
    warnings: &mut Vec<String>,
) -> Vec<ServiceRoutes> {
    let mut out = Vec::new();
    let mut names: Vec<&str> = chains.keys().copied().collect();
    names.sort_unstable();
    let mut visited: HashSet<String> = reached.clone();
    for chain in names {
        if visited.contains(chain) || chain.starts_with("endpoint-") {
            continue;
        }
        let mut group = ServiceRoutes::default();
        let mut local = Vec::new();
        let mut seen = HashSet::new();
        follow_from(chains, sets, chain, &mut group, &mut local, &mut seen, reached);
        visited.extend(seen);
        for a in &group.endpoints {
            warnings.push(format!(
                "chain {chain}: DNAT to {a} outside kube-proxy's service chains; counted as routing it"
            ));
        }
        warnings.extend(
            local
                .into_iter()
                .map(|w| format!("{w} (outside kube-proxy's service chains)")),
        );
        if !group.endpoints.is_empty() || group.uncertain {
            out.push(group);
        }
    }
    out
}

fn follow(
    chains: &HashMap<&str, Vec<&nf_tables_ffi::NftRule>>,
    sets: &HashMap<&str, &nf_tables_ffi::NftSet>,
    start: &str,
    group: &mut ServiceRoutes,
    warnings: &mut Vec<String>,
    reached: &mut HashSet<String>,
) {
    let mut seen = HashSet::new();
    follow_from(chains, sets, start, group, warnings, &mut seen, &HashSet::new());
    reached.extend(seen);
}

/// Follows `start` and what it jumps to, skipping the chains in `skip` (already covered),
/// recording every chain it walks in `seen`.
fn follow_from(
    chains: &HashMap<&str, Vec<&nf_tables_ffi::NftRule>>,
    sets: &HashMap<&str, &nf_tables_ffi::NftSet>,
    start: &str,
    group: &mut ServiceRoutes,
    warnings: &mut Vec<String>,
    seen: &mut HashSet<String>,
    skip: &HashSet<String>,
) {
    let mut stack = vec![start.to_string()];
    while let Some(chain) = stack.pop() {
        if (chain != start && skip.contains(&chain)) || !seen.insert(chain.clone()) {
            continue;
        }
        for rule in chains.get(chain.as_str()).into_iter().flatten() {
            // Registers loaded from a data map: kube-proxy v1.37 DNATs in the service chain
            // with `dnat ip addr . port to numgen random mod N map { 0 : a . p, … }`.
            let mut regs = Registers::default();
            for expr in &rule.exprs {
                match expr {
                    Expr::Verdict {
                        code,
                        chain: Some(next),
                    } if *code == NFT_GOTO || *code == NFT_JUMP => {
                        stack.push(next.clone());
                    }
                    Expr::Nat { kind, .. } if *kind == NFT_NAT_DNAT => {
                        match dnat_targets(expr, &regs, |name| sets.get(name).copied()) {
                            Ok(targets) => group.endpoints.extend(targets),
                            Err(why) => {
                                group.uncertain = true;
                                warnings.push(format!("chain {chain}: {why}"));
                            }
                        }
                    }
                    Expr::Verdict { .. } => {}
                    Expr::Lookup { set, dreg: Some(0), .. } => match sets.get(set.as_str()) {
                        Some(s) if s.data_type == Some(NFT_DATA_VERDICT) => {
                            stack.extend(s.elems.iter().filter_map(|e| match &e.verdict {
                                Some((c, Some(next))) if *c == NFT_GOTO || *c == NFT_JUMP => Some(next.clone()),
                                _ => None,
                            }));
                        }
                        _ => {
                            group.uncertain = true;
                            warnings.push(format!("chain {chain}: verdict map {set} not found"));
                        }
                    },
                    Expr::Lookup { .. } => {}
                    Expr::Nat { .. }
                    | Expr::Immediate { .. }
                    | Expr::Numgen { .. }
                    | Expr::Payload { .. }
                    | Expr::Meta { .. }
                    | Expr::Cmp { .. }
                    | Expr::Bitwise { .. } => {}
                    // kube-proxy's nftables mode uses no xtables extensions.
                    Expr::Match { name, .. } | Expr::Target { name, .. } => {
                        group.uncertain = true;
                        warnings.push(format!("chain {chain}: xtables extension {name:?} not understood"));
                    }
                    Expr::Other(name) if HARMLESS.contains(&name.as_str()) => {}
                    Expr::Other(name) => {
                        group.uncertain = true;
                        warnings.push(format!("chain {chain}: expression {name:?} not understood"));
                    }
                }
                // What the expression wrote, after what it read.
                regs.apply(expr);
            }
        }
    }
}

/// A family without kube-proxy's table, or whose table has no `service-ips` map (kube-proxy
/// always creates it): nothing there can be read as "not routed".
fn lacks_kube_proxy_rules(table: Option<&NftTable>) -> bool {
    table.is_none_or(|t| !t.sets.iter().any(|s| s.name == ENTRY_MAPS[0]))
}

pub struct NftablesReader {
    conn: LazyConnection<NftConn>,
}

impl NftablesReader {
    pub fn new(netns: NetNs) -> Self {
        Self {
            conn: LazyConnection::new(netns),
        }
    }

    /// Whether a kube-proxy table exists in either family (for mode detection).
    pub fn table_exists(netns: &NetNs) -> bool {
        let Ok(mut conn) = NftConn::open(netns) else {
            return false;
        };
        [nf_tables_ffi::NFPROTO_IPV4, nf_tables_ffi::NFPROTO_IPV6]
            .into_iter()
            // One GETTABLE per family: detection runs on every resync and must stay cheap.
            .any(|f| matches!(conn.table_exists(f, TABLE), Ok(true)))
    }

    fn dump(&mut self, family: u16) -> Result<Option<NftTable>, ReadError> {
        // The error, and whether it came five times in a row.
        let dump = |conn: &mut NftConn| {
            // A dump that overlaps a ruleset commit is retried, as nft does.
            for _ in 0..5 {
                match conn.table(family, TABLE) {
                    Ok(t) => return Ok(t),
                    Err(NfTablesError::DumpInterrupted) => continue,
                    Err(e) => return Err((e, false)),
                }
            }
            Err((NfTablesError::DumpInterrupted, true))
        };
        let open = |netns: &NetNs| NftConn::open(netns).map_err(|e| (e, false));
        self.conn.with(open, dump).map_err(|(e, repeated)| match e {
            NfTablesError::RequestFailed(
                source @ NetlinkError::OpenFailed(_) | source @ NetlinkError::EnterNetnsFailed(_),
            ) => ReadError::ReadFailed {
                what: "opening an nf_tables netlink socket".into(),
                source: source.into(),
            },
            e if repeated => ReadError::DecodeFailed {
                what: "nf_tables netlink dump".into(),
                reason: format!("{e} five times in a row"),
            },
            e => ReadError::DecodeFailed {
                what: "nf_tables netlink dump".into(),
                reason: e.to_string(),
            },
        })
    }
}

/// Reads only what serves `frontends`: the two dispatch maps, then the chains and verdict
/// maps reachable from their matching elements. A handful of requests instead of one per
/// service (the kernel looks sets up by name, so a full read grows with the square of the
/// number of services).
fn targeted(
    conn: &mut NftConn,
    family: u16,
    v6: bool,
    frontends: &BTreeSet<String>,
) -> Result<Option<NftTable>, NfTablesError> {
    if !conn.table_exists(family, TABLE)? {
        return Ok(None);
    }
    let mut table = NftTable::default();
    let mut pending: Vec<String> = Vec::new();
    for map in ENTRY_MAPS {
        let Some(mut set) = conn.set_header(family, TABLE, map)? else {
            if map == ENTRY_MAPS[0] {
                return Ok(None);
            }
            continue;
        };
        // Ask the kernel for the frontends' elements one by one: dumping a map of 10k
        // Services to keep a few of them cost ~20 ms a read. Kernels that cannot look up
        // one element get the dump.
        set.elems = match frontend_elems(conn, family, map, frontends, v6) {
            Ok(elems) => elems,
            Err(NfTablesError::RequestFailed(e)) if e.is_transport() => match conn.set(family, TABLE, map)? {
                Some(full) => full
                    .elems
                    .into_iter()
                    .filter(|e| frontend(map, &e.key, v6).is_some_and(|(f, _)| frontends.contains(&f)))
                    .collect(),
                // Its header was there a moment ago: the ruleset changed under the read.
                None => return Err(NfTablesError::DumpInterrupted),
            },
            Err(e) => return Err(e),
        };
        pending.extend(set.elems.iter().filter_map(|e| e.verdict.as_ref()?.1.clone()));
        table.sets.push(set);
    }
    let mut seen = HashSet::new();
    while let Some(chain) = pending.pop() {
        if !seen.insert(chain.clone()) {
            continue;
        }
        for rule in conn.chain_rules(family, TABLE, &chain)? {
            for expr in &rule.exprs {
                match expr {
                    Expr::Verdict { chain: Some(next), .. } => pending.push(next.clone()),
                    // Verdict maps and data maps (DNAT targets) alike.
                    Expr::Lookup { set, dreg: Some(_), .. } if seen.insert(format!("set:{set}")) => {
                        // A rule looks it up, so the kernel had it: gone now, the ruleset
                        // changed under the read (its chains would go unread: not routed).
                        let s = conn.set(family, TABLE, set)?.ok_or(NfTablesError::DumpInterrupted)?;
                        pending.extend(s.elems.iter().filter_map(|e| e.verdict.as_ref()?.1.clone()));
                        table.sets.push(s);
                    }
                    _ => {}
                }
            }
            table.rules.push(rule);
        }
    }
    Ok(Some(table))
}

impl DataplaneReader for NftablesReader {
    fn mode(&self) -> Mode {
        Mode::Nftables
    }

    fn backend(&self) -> &str {
        "nftables"
    }

    fn change_source(&self) -> ChangeSource {
        ChangeSource::NfTablesEvents
    }

    fn can_read_targeted(&self) -> bool {
        true
    }

    fn read_targeted(&mut self, targets: &ReadTargets) -> Option<Result<DataplaneSnapshot, ReadError>> {
        let frontends = &targets.frontends;
        let mut snap = DataplaneSnapshot {
            scope: Some(ReadScope::Frontends(frontends.clone())),
            ..Default::default()
        };
        for (family, v6) in [
            (nf_tables_ffi::NFPROTO_IPV4, false),
            (nf_tables_ffi::NFPROTO_IPV6, true),
        ] {
            match self
                .conn
                .with(NftConn::open, |conn| targeted(conn, family, v6, frontends))
            {
                Ok(Some(table)) => {
                    let (services, warnings) = routes_from_table(&table, v6);
                    snap.services.extend(services);
                    snap.warnings.extend(warnings);
                }
                // No table, or no service-ips map: as for a full read, the family's keys are
                // unknown (kube-proxy switching modes, a `flush ruleset`), never "not routed".
                Ok(None) => {
                    if v6 {
                        snap.absent_v6 = true;
                    } else {
                        snap.absent_v4 = true;
                    }
                }
                Err(e) => {
                    snap.warnings.push(format!("targeted nf_tables read: {e}"));
                    if v6 {
                        snap.unreadable_v6 = true;
                    } else {
                        snap.unreadable_v4 = true;
                    }
                }
            }
        }
        Some(Ok(snap))
    }

    fn read(&mut self) -> Result<DataplaneSnapshot, ReadError> {
        let mut snap = DataplaneSnapshot::default();
        let mut found = false;
        let mut first_error = None;
        for (family, v6) in [
            (nf_tables_ffi::NFPROTO_IPV4, false),
            (nf_tables_ffi::NFPROTO_IPV6, true),
        ] {
            match self.dump(family) {
                Ok(Some(table)) if !lacks_kube_proxy_rules(Some(&table)) => {
                    found = true;
                    let (services, warnings) = routes_from_table(&table, v6);
                    snap.services.extend(services);
                    let fam = if v6 { "ip6" } else { "ip" };
                    snap.warnings
                        .extend(warnings.into_iter().map(|w| format!("table {fam} {TABLE}: {w}")));
                }
                Ok(table) => {
                    found |= table.is_some();
                    // Never "routes nothing": kube-proxy may be switching modes or recreating
                    // its table. The family's keys are unknown.
                    if v6 {
                        snap.absent_v6 = true;
                    } else {
                        snap.absent_v4 = true;
                    }
                }
                Err(e) => {
                    snap.warnings.push(e.to_string());
                    if v6 {
                        snap.unreadable_v6 = true;
                    } else {
                        snap.unreadable_v4 = true;
                    }
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) if snap.unreadable_v4 && snap.unreadable_v6 => Err(e),
            _ if !found && first_error.is_none() => Err(ReadError::RulesNotFound {
                detail: format!(
                    "neither table ip {TABLE} nor ip6 {TABLE} exists; is kube-proxy running in nftables mode?"
                ),
            }),
            None if snap.absent_v4 && snap.absent_v6 => Err(ReadError::RulesNotFound {
                detail: format!("table {TABLE} has no service-ips map in either family (kube-proxy recreating it?)"),
            }),
            _ => Ok(snap),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frontend_keys_are_what_the_frontends_decode_from() {
        for (map, f, v6) in [
            ("service-ips", "172.30.0.41:80", false),
            ("service-ips", "[fd00::41]:8443", true),
            ("service-nodeports", "*:30080", false),
            ("service-nodeports", "*:30080", true),
        ] {
            for proto in PROTOCOLS {
                let key = frontend_key(map, f, proto, v6).unwrap();
                assert_eq!(frontend(map, &key, v6), Some((f.to_string(), Some(proto))), "{map} {f}");
            }
        }
        assert_eq!(frontend_key("service-ips", "172.30.0.41:80", Protocol::Tcp, true), None);
        assert_eq!(frontend_key("service-ips", "*:30080", Protocol::Tcp, false), None);
        assert_eq!(
            frontend_key("service-nodeports", "172.30.0.41:80", Protocol::Tcp, false),
            None
        );
        assert_eq!(
            frontend_key("service-ips", "10.0.0.1:80", Protocol::Udp, false).unwrap(),
            [10, 0, 0, 1, 17, 0, 0, 0, 0, 80, 0, 0]
        );
    }
    use nf_tables_ffi::{NftElem, NftRule, NftSet};

    fn rule(chain: &str, exprs: Vec<Expr>) -> NftRule {
        NftRule {
            chain: chain.into(),
            exprs,
            userdata: None,
        }
    }

    fn goto(chain: &str) -> Expr {
        Expr::Verdict {
            code: NFT_GOTO,
            chain: Some(chain.into()),
        }
    }

    #[test]
    fn nodeports_reach_the_service_through_the_external_chain() {
        let mut t = table(&[EP1]);
        let ext = "external-ULMVA6XW-ns1/svc1/tcp/p80";
        t.rules.push(rule(ext, vec![Expr::Other("fib".into()), goto(SVC)]));
        t.sets.push(NftSet {
            name: "service-nodeports".into(),
            flags: 0,
            data_type: Some(NFT_DATA_VERDICT),
            elems: vec![NftElem {
                key: vec![6, 0, 0, 0, 0x75, 0x30, 0, 0],
                verdict: Some((NFT_GOTO, Some(ext.into()))),
                data: None,
            }],
        });
        let (s, _) = routes_from_table(&t, false);
        assert_eq!(s.len(), 1, "external and service chains are one service port");
        assert_eq!(s[0].frontends.iter().collect::<Vec<_>>(), ["*:30000", "172.30.0.41:80"]);
        assert_eq!(s[0].endpoints.len(), 1);
    }

    fn dnat(ip: [u8; 4], port: u16) -> Vec<Expr> {
        let mut exprs = vec![Expr::Other("meta".into())];
        exprs.extend(crate::dataplane::nf_dnat::builders::dnat_to(&ip, port));
        exprs
    }

    const SVC: &str = "service-ULMVA6XW-ns1/svc1/tcp/p80";
    const EP1: &str = "endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80";
    const EP2: &str = "endpoint-AAAAAAAA-ns1/svc1/tcp/p80__10.180.0.2/80";

    fn table(vmap: &[&str]) -> NftTable {
        let key = [172, 30, 0, 41, 6, 0, 0, 0, 0, 80, 0, 0].to_vec();
        NftTable {
            rules: vec![
                rule(
                    SVC,
                    vec![
                        Expr::Other("numgen".into()),
                        Expr::Lookup {
                            set: "__map0".into(),
                            sreg: 1,
                            dreg: Some(0),
                        },
                    ],
                ),
                rule(EP1, dnat([10, 180, 0, 1], 80)),
                rule(EP2, dnat([10, 180, 0, 2], 80)),
            ],
            sets: vec![
                NftSet {
                    name: "service-ips".into(),
                    flags: 0,
                    data_type: Some(NFT_DATA_VERDICT),
                    elems: vec![NftElem {
                        key,
                        verdict: Some((NFT_GOTO, Some(SVC.into()))),
                        data: None,
                    }],
                },
                NftSet {
                    name: "__map0".into(),
                    flags: 3,
                    data_type: Some(NFT_DATA_VERDICT),
                    elems: vmap
                        .iter()
                        .enumerate()
                        .map(|(i, c)| NftElem {
                            key: (i as u32).to_ne_bytes().to_vec(),
                            verdict: Some((NFT_GOTO, Some(c.to_string()))),
                            data: None,
                        })
                        .collect(),
                },
            ],
        }
    }

    #[test]
    fn follows_vmap_to_dnat_and_ignores_unreferenced_chains() {
        let (s, w) = routes_from_table(&table(&[EP1]), false);
        assert!(w.is_empty(), "{w:?}");
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].name.as_ref().unwrap().to_string(), "ns1/svc1:p80");
        assert_eq!(s[0].protocol, Some(Protocol::Tcp));
        assert_eq!(s[0].frontends.iter().collect::<Vec<_>>(), ["172.30.0.41:80"]);
        let eps: Vec<String> = s[0].endpoints.iter().map(|e| e.to_string()).collect();
        assert_eq!(eps, ["10.180.0.1:80"], "EP2 exists but nothing references it");
    }

    #[test]
    fn unknown_expressions_make_the_service_uncertain() {
        let mut t = table(&[EP1, EP2]);
        t.rules.push(rule(EP2, vec![Expr::Other("tproxy".into())]));
        let (s, w) = routes_from_table(&t, false);
        assert!(s[0].uncertain);
        assert!(w[0].contains("tproxy"));
        let mut t = table(&[EP1]);
        t.rules[0] = rule(
            SVC,
            vec![Expr::Lookup {
                set: "__gone".into(),
                sreg: 1,
                dreg: Some(0),
            }],
        );
        assert!(routes_from_table(&t, false).0[0].uncertain);
    }

    /// Issue 15 item 11: `dnat to A-B:port` picks one of several addresses; reading it as A
    /// alone would confirm B's removal while the range still sends to it.
    #[test]
    fn item11_a_dnat_to_a_range_is_uncertain_not_its_first_address() {
        let mut t = table(&[EP1, EP2]);
        let mut ranged = dnat([10, 180, 0, 2], 80);
        ranged.insert(
            2,
            Expr::Immediate {
                dreg: 3,
                data: vec![10, 180, 0, 9],
            },
        );
        if let Some(Expr::Nat { addr_max_reg, .. }) = ranged.last_mut() {
            *addr_max_reg = Some(3);
        }
        t.rules[2] = rule(EP2, ranged);
        let (s, w) = routes_from_table(&t, false);
        assert!(s[0].uncertain, "{s:?}");
        assert!(w.iter().any(|w| w.contains("range")), "{w:?}");
        // The kernel reports one address as a range of one: min and max in one register.
        let (s, _) = routes_from_table(&table(&[EP1, EP2]), false);
        assert!(!s[0].uncertain);
        assert_eq!(s[0].endpoints.len(), 2);
    }

    /// Issue 15 item 11: a DNAT outside kube-proxy's graph (a hooked chain, `services` itself)
    /// routes traffic too; a leftover endpoint chain nothing references does not.
    fn data_map(name: &str, values: &[([u8; 4], u16)]) -> NftSet {
        NftSet {
            name: name.into(),
            flags: nf_tables_ffi::NFT_SET_ANONYMOUS | nf_tables_ffi::NFT_SET_MAP,
            data_type: None,
            elems: values
                .iter()
                .enumerate()
                .map(|(i, (ip, port))| {
                    let mut data = ip.to_vec();
                    data.extend_from_slice(&port.to_be_bytes());
                    data.extend_from_slice(&[0, 0]);
                    NftElem {
                        key: (i as u32).to_ne_bytes().to_vec(),
                        verdict: None,
                        data: Some(data),
                    }
                })
                .collect(),
        }
    }

    /// v1.37's `dnat ip addr . port to numgen random mod N map { … }`, with `between` after
    /// the lookup.
    fn map_dnat(between: Vec<Expr>) -> Vec<Expr> {
        let mut e = vec![
            Expr::Numgen {
                dreg: 1,
                modulus: 2,
                offset: 0,
            },
            Expr::Lookup {
                set: "__map9".into(),
                sreg: 1,
                dreg: Some(1),
            },
        ];
        e.extend(between);
        e.push(Expr::Nat {
            kind: NFT_NAT_DNAT,
            addr_reg: Some(1),
            addr_max_reg: Some(1),
            proto_reg: Some(9),
            proto_max_reg: Some(9),
        });
        e
    }

    fn service_with(exprs: Vec<Expr>) -> NftTable {
        let mut t = table(&[EP1]);
        t.rules.retain(|r| r.chain != SVC);
        t.rules.push(rule(SVC, exprs));
        t.sets
            .push(data_map("__map9", &[([10, 180, 0, 1], 80), ([10, 180, 0, 2], 80)]));
        t
    }

    #[test]
    fn a_map_dnat_routes_to_every_value() {
        let (s, w) = routes_from_table(&service_with(map_dnat(vec![])), false);
        let svc = s.iter().find(|g| g.name.is_some()).unwrap();
        assert!(!svc.uncertain, "{w:?}");
        assert_eq!(svc.endpoints.len(), 2);
    }

    /// Found by review: a write between the map lookup and the DNAT (the port half, reg 9, or
    /// the address) means the DNAT no longer uses the map's values: uncertain, never the map.
    #[test]
    fn a_register_overwritten_after_the_map_lookup_is_not_read_as_the_map() {
        for between in [
            vec![Expr::Immediate {
                dreg: 9,
                data: 9090u16.to_be_bytes().to_vec(),
            }],
            vec![Expr::Payload {
                base: 1,
                offset: 16,
                len: 4,
                dreg: 1,
            }],
            vec![Expr::Meta { key: 3, dreg: Some(8) }],
            vec![Expr::Other("ct".into())],
        ] {
            let (s, _) = routes_from_table(&service_with(map_dnat(between.clone())), false);
            let svc = s.iter().find(|g| g.name.is_some()).unwrap();
            assert!(svc.uncertain, "{between:?}: {svc:?}");
        }
        // A stale immediate address overwritten by a payload load: uncertain too.
        let mut stale = dnat([10, 180, 0, 9], 80);
        stale.insert(
            3,
            Expr::Payload {
                base: 1,
                offset: 16,
                len: 4,
                dreg: 1,
            },
        );
        let (s, _) = routes_from_table(&service_with(stale), false);
        let svc = s.iter().find(|g| g.name.is_some()).unwrap();
        assert!(
            svc.uncertain && !svc.endpoints.contains(&"10.180.0.9:80".parse().unwrap()),
            "{svc:?}"
        );
    }

    /// Found by review: a stray chain's map DNAT, and an endpoint chain a stray chain jumps to,
    /// both count as routed.
    #[test]
    fn stray_chains_are_followed_through_maps_and_jumps() {
        let mut t = service_with(map_dnat(vec![]));
        t.rules.push(rule("custom", map_dnat(vec![])));
        let (s, _) = routes_from_table(&t, false);
        let stray: Vec<_> = s.iter().filter(|g| g.chain_id.is_none()).collect();
        assert_eq!(stray.len(), 1, "{s:?}");
        assert_eq!(stray[0].endpoints.len(), 2);
        let mut t = table(&[EP1]);
        t.rules.push(rule("custom", vec![goto("endpoint-ZZZZ-x")]));
        t.rules.push(rule("endpoint-ZZZZ-x", dnat([10, 180, 0, 7], 80)));
        // A leftover endpoint chain nothing refers to routes nothing.
        t.rules.push(rule("endpoint-YYYY-y", dnat([10, 180, 0, 8], 80)));
        let (s, _) = routes_from_table(&t, false);
        let stray: Vec<_> = s.iter().filter(|g| g.chain_id.is_none()).collect();
        assert_eq!(stray.len(), 1, "{s:?}");
        assert!(stray[0].endpoints.contains(&"10.180.0.7:80".parse().unwrap()));
        assert!(!s
            .iter()
            .any(|g| g.endpoints.contains(&"10.180.0.8:80".parse().unwrap())));
    }

    #[test]
    fn item11_a_dnat_outside_the_service_chains_counts_as_routed() {
        let mut t = table(&[EP1]);
        t.rules.push(rule("nat-prerouting", dnat([10, 180, 0, 2], 80)));
        let (s, w) = routes_from_table(&t, false);
        let stray: Vec<_> = s.iter().filter(|g| g.chain_id.is_none()).collect();
        assert_eq!(stray.len(), 1, "{s:?}");
        assert!(stray[0].endpoints.contains(&"10.180.0.2:80".parse().unwrap()));
        assert!(w.iter().any(|w| w.contains("nat-prerouting")), "{w:?}");
        // Unreadable there: unknown.
        let mut t = table(&[EP1]);
        t.rules.push(rule(
            "services",
            vec![Expr::Nat {
                kind: NFT_NAT_DNAT,
                addr_reg: Some(1),
                addr_max_reg: None,
                proto_reg: None,
                proto_max_reg: None,
            }],
        ));
        let (s, _) = routes_from_table(&t, false);
        assert!(s.iter().any(|g| g.chain_id.is_none() && g.uncertain), "{s:?}");
        // A leftover endpoint chain (EP2 is in no vmap) routes nothing.
        let (s, w) = routes_from_table(&table(&[EP1]), false);
        assert_eq!(s.len(), 1);
        assert!(w.is_empty(), "{w:?}");
    }

    /// Issue 15 item 6: an emptied kube-proxy table (no service maps) is no proof that
    /// nothing routes.
    #[test]
    fn item6_a_table_without_service_maps_lacks_kube_proxy_rules() {
        assert!(lacks_kube_proxy_rules(None));
        assert!(lacks_kube_proxy_rules(Some(&NftTable::default())));
        assert!(!lacks_kube_proxy_rules(Some(&table(&[EP1]))));
    }

    #[test]
    fn chain_names_and_keys() {
        let (base, spn, p) = parse_chain("local-ABCDEFGH-ns1/svc1/udp/").unwrap();
        assert_eq!(
            (base.as_str(), spn.to_string().as_str(), p),
            ("ABCDEFGH-ns1/svc1/udp/", "ns1/svc1", Protocol::Udp)
        );
        assert!(parse_chain("endpoint-X-ns/s/tcp/p__1.2.3.4/80").is_none());
        assert_eq!(
            frontend("service-nodeports", &[17, 0, 0, 0, 0x75, 0x30, 0, 0], false)
                .unwrap()
                .0,
            "*:30000"
        );
        let mut k6 = vec![0u8; 24];
        k6[0] = 0xfd;
        k6[15] = 1;
        k6[16] = 6;
        k6[20] = 0;
        k6[21] = 80;
        assert_eq!(frontend("service-ips", &k6, true).unwrap().0, "[fd00::1]:80");
    }
}
