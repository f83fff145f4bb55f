//! Reader for kube-proxy's iptables mode (IPv4 and IPv6, iptables-nft and iptables-legacy).
//!
//! It reads the `nat` table from the kernel with no userland tool (chain by chain over
//! nf_tables netlink for the nft backend, `nft_backend.rs`; the legacy table's binary blob,
//! `legacy.rs`) and follows the chain graph from `KUBE-SERVICES` and `KUBE-NODEPORTS` through
//! `KUBE-FW-*`, `KUBE-EXT-*`, `KUBE-SVC-*` and `KUBE-SVL-*` to the `KUBE-SEP-*` chains' DNAT
//! targets. A SEP chain that no reachable chain jumps to does not count: kube-proxy leaves such
//! chains behind in large clusters. Comments are optional (they are dropped above 1000
//! endpoints); names then come from the entry rules or chain hashes. A DNAT the reader does not
//! understand makes its service port `unknown`, never "not routed".

pub(crate) mod legacy;
pub(crate) mod nft_backend;
mod save;
pub mod xt;

use crate::kube_proxy_names::port_proto_hash;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};

use super::{ChangeSource, DataplaneReader, DataplaneSnapshot, Mode, ReadError, ReadScope, ReadTargets, ServiceRoutes};
use crate::model::{Protocol, ServicePortName};
use crate::netns::NetNs;
use xt::Dnat;

/// The iptables backend kube-proxy writes through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Nft,
    Legacy,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Nft => "nft",
            Backend::Legacy => "legacy",
        }
    }

    pub fn save_program(self, ipv6: bool) -> String {
        format!("{}-{}-save", if ipv6 { "ip6tables" } else { "iptables" }, self.as_str())
    }
}

/// Where a rule sends the packets it matches, as far as reaching endpoints goes.
#[derive(Clone, Debug, Default, PartialEq)]
enum Verdict {
    /// No target, or one that sends nothing to another address (ACCEPT, RETURN, MARK, ...).
    #[default]
    Continue,
    /// `-j`/`-g` to this name: a chain when the table has one by that name.
    Jump(String),
    Dnat(Dnat),
}

/// One rule of the nat table: only the parts the graph walk needs. Matches that are negated
/// or cover more than one address or port are left out.
#[derive(Clone, Debug, Default, PartialEq)]
struct Rule {
    /// `-d` with a host address.
    destination: Option<IpAddr>,
    protocol: Option<Protocol>,
    dport: Option<u16>,
    comment: Option<String>,
    verdict: Verdict,
}

#[derive(Debug, Default)]
pub(crate) struct NatTable {
    /// foldhash: a full read at 30k Services spent ~6% of its time in SipHash on chain names.
    chains: HashMap<String, Vec<Rule>, foldhash::fast::RandomState>,
    /// Chains with a rule that could not be read.
    broken: HashSet<String>,
    warnings: Vec<String>,
}

const ENTRY_CHAINS: [&str; 2] = ["KUBE-SERVICES", "KUBE-NODEPORTS"];
const GROUP_PREFIXES: [&str; 5] = ["KUBE-SVC-", "KUBE-SVL-", "KUBE-EXT-", "KUBE-FW-", "KUBE-XLB-"];

/// The service-port id of a chain: its hash for kube-proxy's per-port chains.
fn group_id(chain: &str) -> &str {
    GROUP_PREFIXES
        .iter()
        .find_map(|p| chain.strip_prefix(p))
        .unwrap_or(chain)
}

/// The service port name in a kube-proxy comment, if the comment names one.
fn name_from_comment(comment: &str) -> Option<ServicePortName> {
    const SUFFIXES: [&str; 4] = [
        " cluster IP",
        " external IP",
        " loadbalancer IP",
        " health check node port",
    ];
    let base = SUFFIXES.iter().find_map(|s| comment.strip_suffix(s)).unwrap_or(comment);
    let base = base.split_once(" -> ").map_or(base, |(spn, _)| spn);
    ServicePortName::parse(base)
}

/// A host address from `-d`'s `addr[/len]` (`None` for a network).
fn strip_prefix_len(ip: &str) -> Option<IpAddr> {
    let (addr, len) = ip.split_once('/').unwrap_or((ip, ""));
    let parsed: IpAddr = addr.parse().ok()?;
    let host_len = if parsed.is_ipv4() { "32" } else { "128" };
    (len.is_empty() || len == host_len).then_some(parsed)
}

impl NatTable {
    /// The chain a rule jumps to, when it is one of this table's chains and not an entry chain.
    fn jump_target<'a>(&self, rule: &'a Rule) -> Option<&'a str> {
        match &rule.verdict {
            Verdict::Jump(t) if !ENTRY_CHAINS.contains(&t.as_str()) && self.chains.contains_key(t) => Some(t),
            _ => None,
        }
    }
}

/// Follows the chain graph from the entry chains and returns the routed service ports, the
/// warnings, and whether an entry chain itself could not be read.
pub(crate) fn walk(table: &NatTable) -> (Vec<ServiceRoutes>, Vec<String>, bool) {
    let mut groups: BTreeMap<String, ServiceRoutes> = BTreeMap::new();
    let mut warnings = table.warnings.clone();
    let mut entry_broken = false;
    for entry in ENTRY_CHAINS {
        if table.broken.contains(entry) {
            entry_broken = true;
        }
        let Some(rules) = table.chains.get(entry) else {
            continue;
        };
        for rule in rules {
            // kube-proxy never DNATs in an entry chain; a rule that does still sends traffic.
            if let Verdict::Dnat(d) = &rule.verdict {
                let mut stray = ServiceRoutes {
                    protocol: rule.protocol,
                    ..Default::default()
                };
                match d {
                    Dnat::To(addr) => {
                        warnings.push(format!(
                            "chain {entry}: DNAT to {addr} outside kube-proxy's service chains; counted as routing it"
                        ));
                        stray.endpoints.insert(*addr);
                    }
                    Dnat::NotUnderstood(why) => {
                        warnings.push(format!("chain {entry}: {why}"));
                        stray.uncertain = true;
                    }
                }
                groups.insert(format!("{entry}/{}", groups.len()), stray);
                continue;
            }
            let Some(target) = table.jump_target(rule) else {
                continue;
            };
            let id = group_id(target).to_string();
            let group = groups.entry(id.clone()).or_default();
            group.chain_id = Some(id);
            group.protocol = rule.protocol.or(group.protocol);
            if group.name.is_none() {
                group.name = rule.comment.as_deref().and_then(name_from_comment);
            }
            match (entry, rule.destination, rule.dport) {
                ("KUBE-SERVICES", Some(ip), Some(port)) => {
                    group.frontends.insert(SocketAddr::new(ip, port).to_string());
                }
                ("KUBE-NODEPORTS", _, Some(port)) => {
                    group.frontends.insert(format!("*:{port}"));
                }
                _ => {}
            }
            follow(table, target, group, &mut warnings);
        }
    }
    (groups.into_values().collect(), warnings, entry_broken)
}

/// Follows the per-port chains of the service ports with these chain hashes (a targeted read:
/// the entry chains were not read).
fn walk_ports(table: &NatTable, ids: &BTreeSet<String>) -> (Vec<ServiceRoutes>, Vec<String>) {
    let mut services = Vec::new();
    let mut warnings = table.warnings.clone();
    for id in ids {
        let mut group = ServiceRoutes {
            chain_id: Some(id.clone()),
            ..Default::default()
        };
        let mut found = false;
        for prefix in GROUP_PREFIXES {
            let chain = format!("{prefix}{id}");
            if table.chains.contains_key(&chain) {
                found = true;
                follow(table, &chain, &mut group, &mut warnings);
            }
        }
        if found {
            services.push(group);
        }
    }
    (services, warnings)
}

/// Depth-first walk from one entry target; every DNAT reached is a routed endpoint.
fn follow(table: &NatTable, start: &str, group: &mut ServiceRoutes, warnings: &mut Vec<String>) {
    let mut stack = vec![start];
    let mut seen = foldhash::HashSet::default();
    while let Some(chain) = stack.pop() {
        if !seen.insert(chain) {
            continue;
        }
        if table.broken.contains(chain) {
            group.uncertain = true;
        }
        let Some(rules) = table.chains.get(chain) else {
            continue;
        };
        for rule in rules {
            if group.name.is_none() {
                group.name = rule.comment.as_deref().and_then(name_from_comment);
            }
            group.protocol = group.protocol.or(rule.protocol);
            match &rule.verdict {
                Verdict::Dnat(Dnat::To(addr)) => {
                    group.endpoints.insert(*addr);
                }
                Verdict::Dnat(Dnat::NotUnderstood(why)) => {
                    group.uncertain = true;
                    warnings.push(format!("chain {chain}: {why}"));
                }
                Verdict::Jump(_) => stack.extend(table.jump_target(rule)),
                Verdict::Continue => {}
            }
        }
    }
}

/// Parses `iptables-save` output (or `iptables-restore` input) into routed service ports.
pub fn routes_from_save(text: &str) -> (Vec<ServiceRoutes>, Vec<String>, bool) {
    walk(&save::parse_nat(text))
}

/// kube-proxy's share of a nat table: its chains and rules, 0 without `KUBE-SERVICES` (kubelet
/// creates KUBE- chains of its own).
fn kube_rule_count(table: &NatTable) -> usize {
    if !table.chains.contains_key("KUBE-SERVICES") {
        return 0;
    }
    table
        .chains
        .iter()
        .filter(|(name, _)| name.starts_with("KUBE-"))
        .map(|(_, rules)| 1 + rules.len())
        .sum()
}

/// Picks the backend holding kube-proxy's chains, like kube-proxy's iptables wrapper: the one
/// with `KUBE-SERVICES`; when both have it, the one with more KUBE- rules, nft on a tie. `None`
/// when neither has any. Runs on every resync with `--mode auto`, so the common case (one
/// backend) costs a chain lookup, not a read of the table.
pub fn detect_backend(netns: &NetNs) -> Option<Backend> {
    let mut nft = IptablesReader::new(Backend::Nft, netns.clone());
    let mut legacy = IptablesReader::new(Backend::Legacy, netns.clone());
    let legacy_tables: Vec<NatTable> = [false, true]
        .into_iter()
        .filter_map(|v6| legacy.nat_table(v6).ok().flatten())
        .collect();
    let in_legacy = legacy_tables.iter().any(|t| kube_rule_count(t) > 0);
    let in_nft = [false, true].into_iter().any(|v6| nft.nft.has_kube_services(v6));
    match (in_nft, in_legacy) {
        (false, false) => None,
        (true, false) => Some(Backend::Nft),
        (false, true) => Some(Backend::Legacy),
        (true, true) => {
            let count = |tables: &[NatTable]| tables.iter().map(kube_rule_count).sum::<usize>();
            let nft_tables: Vec<NatTable> = [false, true]
                .into_iter()
                .filter_map(|v6| nft.nat_table(v6).ok().flatten())
                .collect();
            if count(&legacy_tables) > count(&nft_tables) {
                Some(Backend::Legacy)
            } else {
                Some(Backend::Nft)
            }
        }
    }
}

pub struct IptablesReader {
    backend: Backend,
    netns: NetNs,
    nft: nft_backend::NatReader,
    /// Chain hashes the last full read reached from the entry chains. A targeted read relies on
    /// kube-proxy's chain names only for these, or for chains it finds.
    known_ids: HashSet<String>,
}

impl IptablesReader {
    pub fn new(backend: Backend, netns: NetNs) -> Self {
        Self {
            nft: nft_backend::NatReader::new(netns.clone()),
            backend,
            netns,
            known_ids: HashSet::new(),
        }
    }

    /// The nat table of one family; `None` when it does not exist.
    /// Whether the family's nat table has `KUBE-SERVICES` (the nft reader keeps only chains
    /// with rules, so it asks the kernel).
    fn has_entry_chain(&mut self, v6: bool, table: &NatTable) -> bool {
        table.chains.contains_key(ENTRY_CHAINS[0]) || (self.backend == Backend::Nft && self.nft.has_kube_services(v6))
    }

    fn nat_table(&mut self, v6: bool) -> Result<Option<NatTable>, ReadError> {
        match self.backend {
            Backend::Nft => self.nft.table(v6),
            Backend::Legacy => legacy::table(&self.netns, v6),
        }
    }
}

fn absent(snap: &mut DataplaneSnapshot, v6: bool) {
    if v6 {
        snap.absent_v6 = true;
    } else {
        snap.absent_v4 = true;
    }
}

fn family_name(v6: bool) -> &'static str {
    if v6 {
        "ip6 nat"
    } else {
        "ip nat"
    }
}

impl DataplaneReader for IptablesReader {
    fn mode(&self) -> Mode {
        Mode::Iptables
    }

    fn backend(&self) -> &str {
        self.backend.as_str()
    }

    fn change_source(&self) -> ChangeSource {
        match self.backend {
            Backend::Nft => ChangeSource::NfTablesEvents,
            Backend::Legacy => ChangeSource::Poll,
        }
    }

    fn read(&mut self) -> Result<DataplaneSnapshot, ReadError> {
        let mut snap = DataplaneSnapshot::default();
        let mut first_error = None;
        let mut known = HashSet::new();
        for v6 in [false, true] {
            let unreadable = match self.nat_table(v6) {
                Ok(Some(table)) if !self.has_entry_chain(v6, &table) => {
                    absent(&mut snap, v6);
                    false
                }
                Ok(None) => {
                    absent(&mut snap, v6);
                    false
                }
                Ok(Some(table)) => {
                    let (services, warnings, entry_broken) = walk(&table);
                    known.extend(services.iter().filter_map(|s| s.chain_id.clone()));
                    snap.services.extend(services);
                    let family = family_name(v6);
                    snap.warnings
                        .extend(warnings.into_iter().map(|w| format!("{family}: {w}")));
                    entry_broken
                }
                Err(e) => {
                    snap.warnings.push(e.to_string());
                    first_error.get_or_insert(e);
                    true
                }
            };
            if v6 {
                snap.unreadable_v6 = unreadable;
            } else {
                snap.unreadable_v4 = unreadable;
            }
        }
        match first_error {
            Some(e) if snap.unreadable_v4 && snap.unreadable_v6 => Err(e),
            None if snap.absent_v4 && snap.absent_v6 => Err(ReadError::RulesNotFound {
                detail: format!(
                    "no KUBE-SERVICES chain in the nat table of iptables-{} (kube-proxy switching modes, or a firewall reload?)",
                    self.backend.as_str()
                ),
            }),
            _ => {
                if !snap.unreadable_v4 && !snap.unreadable_v6 {
                    self.known_ids = known;
                }
                Ok(snap)
            }
        }
    }

    fn can_read_targeted(&self) -> bool {
        self.backend == Backend::Nft
    }

    /// Reads only the per-port chains (`KUBE-SVC-<hash>` and friends) of the pending service
    /// ports and what they jump to: a few small dumps instead of the whole table. A port is in
    /// scope when its chains were found, or when the last full read reached them under these
    /// names (so a port whose chains are now gone is confirmed as not routed).
    fn read_targeted(&mut self, targets: &ReadTargets) -> Option<Result<DataplaneSnapshot, ReadError>> {
        if self.backend != Backend::Nft {
            return None;
        }
        let ids: BTreeMap<String, &ServicePortName> = targets
            .ports
            .iter()
            .map(|(spn, proto)| (port_proto_hash(spn, *proto), spn))
            .collect();
        let wanted: BTreeSet<String> = ids.keys().cloned().collect();
        let mut snap = DataplaneSnapshot::default();
        let mut found = HashSet::new();
        for v6 in [false, true] {
            // Without KUBE-SERVICES the per-port chains are gone with everything else (kube-proxy
            // cleaning up, a firewall reload): nothing can be confirmed in that family.
            if !self.nft.has_kube_services(v6) {
                absent(&mut snap, v6);
                continue;
            }
            match self.nft.chains_of(v6, &wanted) {
                Ok(table) => {
                    let (services, warnings) = walk_ports(&table, &wanted);
                    found.extend(services.iter().filter_map(|s| s.chain_id.clone()));
                    snap.services.extend(services);
                    let family = family_name(v6);
                    snap.warnings
                        .extend(warnings.into_iter().map(|w| format!("{family}: {w}")));
                }
                Err(e) => {
                    snap.warnings.push(format!("targeted read of {}: {e}", family_name(v6)));
                    if v6 {
                        snap.unreadable_v6 = true;
                    } else {
                        snap.unreadable_v4 = true;
                    }
                }
            }
        }
        let covered = ids
            .iter()
            .filter(|(id, _)| found.contains(*id) || self.known_ids.contains(*id))
            .map(|(_, spn)| (*spn).clone())
            .collect();
        snap.scope = Some(ReadScope::Ports(covered));
        Some(Ok(snap))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/kube-proxy");

    fn fixture(name: &str) -> String {
        std::fs::read_to_string(format!("{FIXTURES}/{name}")).unwrap_or_else(|e| panic!("fixture {name}: {e}"))
    }

    fn summary(services: &[ServiceRoutes]) -> Vec<String> {
        let mut out: Vec<String> = services
            .iter()
            .map(|s| {
                let name = s.name.as_ref().map_or("?".to_string(), |n| n.to_string());
                let eps: Vec<String> = s.endpoints.iter().map(|e| e.to_string()).collect();
                format!(
                    "{name} {} [{}] -> [{}]",
                    s.protocol.map_or("?", |p| p.as_str()),
                    s.frontends.iter().cloned().collect::<Vec<_>>().join(","),
                    eps.join(",")
                )
            })
            .collect();
        out.sort();
        out
    }

    #[test]
    fn chain_hashes_match_kube_proxy() {
        let h = |spn: &str, p| port_proto_hash(&ServicePortName::parse(spn).unwrap(), p);
        assert_eq!(h("ns1/svc1:p80", Protocol::Tcp), "XPGD46QRK7WJZT7O");
        assert_eq!(h("ns1/svc1", Protocol::Tcp), "AQI2S6QIMU7PVVRP");
        assert_eq!(h("default/kubernetes:https", Protocol::Tcp), "NPX46M4PTMTKRN6Y");
        assert_eq!(h("kube-system/kube-dns:dns", Protocol::Udp), "TCOU7JCQXEZGVUNU");
    }

    #[test]
    fn tokenizer_handles_quotes_and_escapes() {
        assert_eq!(
            save::tokenize(r#"-A X -m comment --comment "a \"b\" c" -j Y"#).unwrap(),
            ["-A", "X", "-m", "comment", "--comment", "a \"b\" c", "-j", "Y"]
        );
        assert!(save::tokenize(r#"-A X --comment "open"#).is_none());
    }

    #[test]
    fn overall_fixture_restore_input() {
        let (services, _, broken) = routes_from_save(&fixture("ipt_TestOverallIPTablesRules_531be81.txt"));
        assert!(!broken);
        assert_eq!(
            summary(&services),
            [
                "ns1/svc1:p80 tcp [172.30.0.41:80] -> [10.180.0.1:80]",
                "ns2/svc2:p80 tcp [*:3001,1.2.3.4:80,172.30.0.42:80,192.168.99.22:80] -> [10.180.0.2:80]",
                "ns3/svc3:p80 tcp [*:3003,172.30.0.43:80] -> [10.180.0.3:80]",
                "ns4/svc4:p80 tcp [172.30.0.44:80,192.168.99.33:80] -> [10.180.0.4:80,10.180.0.5:80]",
                "ns5/svc5:p80 tcp [*:3002,172.30.0.45:80,5.6.7.8:80] -> [10.180.0.3:80]",
            ]
        );
    }

    #[test]
    fn real_iptables_save_rendering_matches_restore_input() {
        let a = routes_from_save(&fixture("ipt_TestOverallIPTablesRules_531be81.txt")).0;
        let b = routes_from_save(&fixture("iptables-save_nat_TestOverallIPTablesRules.txt")).0;
        assert_eq!(summary(&a), summary(&b));
    }

    #[test]
    fn local_policy_fixture_and_basic_fixture() {
        let (s, _, _) = routes_from_save(&fixture("constructed_ipt_3ep_local_iptables-save.txt"));
        assert_eq!(
            summary(&s),
            ["ns1/svc1:p80 tcp [*:30080,172.30.0.41:80] -> [10.180.0.1:80,10.180.1.1:80,10.180.2.1:80]"]
        );
        let (s, _, _) = routes_from_save(&fixture("ipt_TestParseIPTablesData_basic_531be81.txt"));
        assert_eq!(summary(&s), ["ns1/svc1:p80 tcp [10.20.30.41:80] -> [10.180.0.1:80]"]);
    }

    const NO_COMMENTS: &str = "*nat
:KUBE-SERVICES - [0:0]
:KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]
:KUBE-SEP-SXIVWICOYRO3J4NJ - [0:0]
:KUBE-SEP-ZX7GRIZKSNUQ3LAJ - [0:0]
:KUBE-SEP-LEFTOVER00000000 - [0:0]
-A KUBE-SERVICES -d 172.30.0.41/32 -p tcp -m comment --comment \"ns1/svc1:p80 cluster IP\" -m tcp --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O
-A KUBE-SVC-XPGD46QRK7WJZT7O -m statistic --mode random --probability 0.50000000000 -j KUBE-SEP-SXIVWICOYRO3J4NJ
-A KUBE-SVC-XPGD46QRK7WJZT7O -j KUBE-SEP-ZX7GRIZKSNUQ3LAJ
-A KUBE-SEP-SXIVWICOYRO3J4NJ -s 10.180.0.1/32 -j KUBE-MARK-MASQ
-A KUBE-SEP-SXIVWICOYRO3J4NJ -p tcp -m tcp -j DNAT --to-destination 10.180.0.1:80
-A KUBE-SEP-ZX7GRIZKSNUQ3LAJ -p tcp -m tcp -j DNAT --to-destination 10.180.2.1:80
-A KUBE-SEP-LEFTOVER00000000 -p tcp -m tcp -j DNAT --to-destination 10.180.9.9:80
COMMIT
";

    #[test]
    fn large_cluster_mode_without_comments_and_leftover_sep_chain() {
        let (s, _, _) = routes_from_save(NO_COMMENTS);
        assert_eq!(
            summary(&s),
            ["ns1/svc1:p80 tcp [172.30.0.41:80] -> [10.180.0.1:80,10.180.2.1:80]"]
        );
        // Without even the entry comment the hash still identifies the service port.
        let bare = NO_COMMENTS.replace(" -m comment --comment \"ns1/svc1:p80 cluster IP\"", "");
        let (s, _, _) = routes_from_save(&bare);
        assert_eq!(s[0].name, None);
        assert_eq!(s[0].chain_id.as_deref(), Some("XPGD46QRK7WJZT7O"));
    }

    #[test]
    fn ipv6_destinations() {
        let text = "*nat
:KUBE-SERVICES - [0:0]
:KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]
:KUBE-SEP-A - [0:0]
-A KUBE-SERVICES -d fd00:172:30::41/128 -p tcp -m comment --comment \"ns1/svc1:p80 cluster IP\" -m tcp --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O
-A KUBE-SVC-XPGD46QRK7WJZT7O -j KUBE-SEP-A
-A KUBE-SEP-A -p tcp -m tcp -j DNAT --to-destination [fd00:10:180::1]:80
COMMIT
";
        let (s, _, _) = routes_from_save(text);
        assert_eq!(
            summary(&s),
            ["ns1/svc1:p80 tcp [[fd00:172:30::41]:80] -> [[fd00:10:180::1]:80]"]
        );
    }

    /// Issue 15 item 11: a DNAT placed directly in `KUBE-SERVICES` routes traffic too.
    #[test]
    fn item11_a_dnat_in_an_entry_chain_counts_as_routed() {
        let (s, w, _) = routes_from_save(
            "*nat\n:KUBE-SERVICES - [0:0]\n-A KUBE-SERVICES -d 172.30.0.9/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 10.180.0.9:8080\nCOMMIT\n",
        );
        assert_eq!(s.len(), 1, "{s:?}");
        assert!(s[0].endpoints.contains(&"10.180.0.9:8080".parse().unwrap()));
        assert_eq!(s[0].chain_id, None, "not attributed to a service port");
        assert!(
            w.iter().any(|w| w.contains("outside kube-proxy's service chains")),
            "{w:?}"
        );
        let (s, _, _) = routes_from_save(
            "*nat\n:KUBE-SERVICES - [0:0]\n-A KUBE-SERVICES -p tcp -j DNAT --to-destination 10.180.0.9-10.180.0.12:8080\nCOMMIT\n",
        );
        assert!(s[0].uncertain, "{s:?}");
    }

    #[test]
    fn unparseable_rules_make_the_service_uncertain_not_empty() {
        let bad = NO_COMMENTS.replace(
            "-A KUBE-SEP-ZX7GRIZKSNUQ3LAJ -p tcp -m tcp -j DNAT --to-destination 10.180.2.1:80",
            "-A KUBE-SEP-ZX7GRIZKSNUQ3LAJ -p tcp -m comment --comment \"oops -j DNAT --to-destination 10.180.2.1:80",
        );
        let (s, warnings, _) = routes_from_save(&bad);
        assert!(s[0].uncertain);
        assert!(warnings.iter().any(|w| w.contains("unbalanced quotes")), "{warnings:?}");
        let weird = NO_COMMENTS.replace(
            "--to-destination 10.180.2.1:80",
            "--to-destination 10.180.2.1-10.180.2.9",
        );
        let (s, warnings, _) = routes_from_save(&weird);
        assert!(s[0].uncertain);
        assert!(warnings.iter().any(|w| w.contains("cannot parse DNAT")));
        let (_, _, entry_broken) =
            routes_from_save("*nat\n:KUBE-SERVICES - [0:0]\n-A KUBE-SERVICES -m comment --comment \"x\n");
        assert!(entry_broken);
    }
}
