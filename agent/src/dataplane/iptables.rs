//! Reader for kube-proxy's iptables mode (IPv4 and IPv6, iptables-nft and iptables-legacy).
//!
//! It parses `iptables-save -t nat` and follows the chain graph from `KUBE-SERVICES` and
//! `KUBE-NODEPORTS` through `KUBE-FW-*`, `KUBE-EXT-*`, `KUBE-SVC-*` and `KUBE-SVL-*` to the
//! `KUBE-SEP-*` chains' DNAT targets. A SEP chain that no reachable chain jumps to does not
//! count: kube-proxy leaves such chains behind in large clusters. Comments are optional (they
//! are dropped above 1000 endpoints); names then come from the entry rules or chain hashes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::process::Stdio;

use sha2::{Digest, Sha256};

use super::{ChangeSource, DataplaneReader, DataplaneSnapshot, Mode, ReadError, ServiceRoutes};
use crate::model::{Protocol, ServicePortName};
use crate::netns::NetNs;

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

/// kube-proxy's `portProtoHash`: base32(sha256(spn + proto))[:16], shared by the SVC, SVL, EXT
/// and FW chains of one service port.
pub fn port_proto_hash(spn: &ServicePortName, protocol: Protocol) -> String {
    let digest = Sha256::digest(format!("{spn}{protocol}").as_bytes());
    base32_16(&digest[..10])
}

pub(crate) fn base32_16(bytes: &[u8]) -> String {
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

/// One parsed `-A` rule: only the parts the graph walk needs.
#[derive(Clone, Debug, Default, PartialEq)]
struct Rule {
    destination: Option<String>,
    protocol: Option<String>,
    dport: Option<String>,
    comment: Option<String>,
    /// `-j` or `-g` target.
    target: Option<String>,
    to_destination: Option<String>,
}

#[derive(Debug, Default)]
struct NatTable {
    chains: HashMap<String, Vec<Rule>>,
    /// Chains with a rule that could not be tokenized.
    broken: HashSet<String>,
    warnings: Vec<String>,
}

/// Splits a rule the way iptables-save quotes it: double quotes, backslash escapes.
fn tokenize(line: &str) -> Option<Vec<String>> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_token = false;
    let mut quoted = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                cur.push(chars.next()?);
                in_token = true;
            }
            '"' => {
                quoted = !quoted;
                in_token = true;
            }
            c if c.is_whitespace() && !quoted => {
                if in_token {
                    out.push(std::mem::take(&mut cur));
                    in_token = false;
                }
            }
            c => {
                cur.push(c);
                in_token = true;
            }
        }
    }
    if quoted {
        return None;
    }
    if in_token {
        out.push(cur);
    }
    Some(out)
}

fn parse_rule(tokens: &[String]) -> Rule {
    let mut rule = Rule::default();
    let mut negate = false;
    let mut i = 0;
    while i < tokens.len() {
        let tok = tokens[i].as_str();
        let value = tokens.get(i + 1).cloned();
        let mut consumed = 1;
        match tok {
            "!" => {
                negate = true;
                i += 1;
                continue;
            }
            "-d" | "--destination" | "--dst" => {
                if !negate {
                    rule.destination = value;
                }
                consumed = 2;
            }
            "-p" | "--protocol" => {
                if !negate {
                    rule.protocol = value;
                }
                consumed = 2;
            }
            "--dport" | "--destination-port" => {
                if !negate {
                    rule.dport = value;
                }
                consumed = 2;
            }
            "--comment" => {
                rule.comment = value;
                consumed = 2;
            }
            "-j" | "--jump" | "-g" | "--goto" => {
                rule.target = value;
                consumed = 2;
            }
            "--to-destination" => {
                rule.to_destination = value;
                consumed = 2;
            }
            _ => {}
        }
        negate = false;
        i += consumed;
    }
    rule
}

/// Parses the `*nat` section of `iptables-save` or `iptables-restore` input.
fn parse_nat(text: &str) -> NatTable {
    let mut table = NatTable::default();
    let mut in_nat = false;
    for (lineno, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(name) = line.strip_prefix('*') {
            in_nat = name == "nat";
            continue;
        }
        if !in_nat || line == "COMMIT" {
            continue;
        }
        if let Some(decl) = line.strip_prefix(':') {
            if let Some(chain) = decl.split_whitespace().next() {
                table.chains.entry(chain.to_string()).or_default();
            }
            continue;
        }
        let Some(rest) = line.strip_prefix("-A ") else {
            table
                .warnings
                .push(format!("line {}: not a rule: {line:.120}", lineno + 1));
            continue;
        };
        let chain = rest.split_whitespace().next().unwrap_or_default().to_string();
        match tokenize(rest) {
            Some(tokens) => table.chains.entry(chain).or_default().push(parse_rule(&tokens[1..])),
            None => {
                table.warnings.push(format!(
                    "line {}: unbalanced quotes in chain {chain}: {line:.120}",
                    lineno + 1
                ));
                table.broken.insert(chain.clone());
                table.chains.entry(chain).or_default();
            }
        }
    }
    table
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

fn strip_prefix_len(ip: &str) -> Option<IpAddr> {
    let (addr, len) = ip.split_once('/').unwrap_or((ip, ""));
    let parsed: IpAddr = addr.parse().ok()?;
    let host_len = if parsed.is_ipv4() { "32" } else { "128" };
    (len.is_empty() || len == host_len).then_some(parsed)
}

/// Follows the chain graph and returns the routed service ports.
fn walk(table: &NatTable) -> (Vec<ServiceRoutes>, Vec<String>, bool) {
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
            let Some(target) = rule.target.as_deref() else {
                continue;
            };
            if ENTRY_CHAINS.contains(&target) || !table.chains.contains_key(target) {
                continue;
            }
            let id = group_id(target).to_string();
            let group = groups.entry(id.clone()).or_default();
            group.chain_id = Some(id);
            if let Some(proto) = rule.protocol.as_deref().and_then(|p| p.parse().ok()) {
                group.protocol = Some(proto);
            }
            if group.name.is_none() {
                group.name = rule.comment.as_deref().and_then(name_from_comment);
            }
            if let Some(port) = &rule.dport {
                match (entry, rule.destination.as_deref().and_then(strip_prefix_len)) {
                    ("KUBE-SERVICES", Some(ip)) => {
                        group
                            .frontends
                            .insert(SocketAddr::new(ip, port.parse().unwrap_or(0)).to_string());
                    }
                    ("KUBE-NODEPORTS", _) => {
                        group.frontends.insert(format!("*:{port}"));
                    }
                    _ => {}
                }
            }
            follow(table, target, group, &mut warnings);
        }
    }
    (groups.into_values().collect(), warnings, entry_broken)
}

/// Depth-first walk from one entry target; every DNAT reached is a routed endpoint.
fn follow(table: &NatTable, start: &str, group: &mut ServiceRoutes, warnings: &mut Vec<String>) {
    let mut stack = vec![start.to_string()];
    let mut seen = HashSet::new();
    while let Some(chain) = stack.pop() {
        if !seen.insert(chain.clone()) {
            continue;
        }
        if table.broken.contains(&chain) {
            group.uncertain = true;
        }
        let Some(rules) = table.chains.get(&chain) else {
            continue;
        };
        for rule in rules {
            if group.name.is_none() {
                group.name = rule.comment.as_deref().and_then(name_from_comment);
            }
            if group.protocol.is_none() {
                group.protocol = rule.protocol.as_deref().and_then(|p| p.parse().ok());
            }
            match (rule.target.as_deref(), rule.to_destination.as_deref()) {
                (Some("DNAT"), Some(dest)) => match dest.parse::<SocketAddr>() {
                    Ok(addr) => {
                        group.endpoints.insert(addr);
                    }
                    Err(_) => {
                        group.uncertain = true;
                        warnings.push(format!("chain {chain}: cannot parse DNAT destination {dest:?}"));
                    }
                },
                (Some("DNAT"), None) => {
                    group.uncertain = true;
                    warnings.push(format!("chain {chain}: DNAT rule without --to-destination"));
                }
                (Some(target), _) if table.chains.contains_key(target) && !ENTRY_CHAINS.contains(&target) => {
                    stack.push(target.to_string());
                }
                _ => {}
            }
        }
    }
}

/// Parses `iptables-save` output (or `iptables-restore` input) into routed service ports.
pub fn routes_from_save(text: &str) -> (Vec<ServiceRoutes>, Vec<String>, bool) {
    walk(&parse_nat(text))
}

/// Counts kube-proxy chains in a save dump, to pick the backend kube-proxy uses.
fn kube_chain_count(text: &str) -> usize {
    // Only kube-proxy creates KUBE-SERVICES in nat; kubelet's own KUBE- chains do not count.
    if !text.lines().any(|l| l.starts_with(":KUBE-SERVICES ")) {
        return 0;
    }
    text.lines()
        .filter(|l| l.starts_with(":KUBE-") || l.starts_with("-A KUBE-"))
        .count()
}

/// Picks the backend holding kube-proxy's chains, like kube-proxy's iptables wrapper: the one
/// with more KUBE- rules wins, nft on a tie. `None` when neither has any.
pub fn detect_backend(netns: &NetNs) -> Option<Backend> {
    let count = |b: Backend| -> usize {
        [false, true]
            .into_iter()
            .filter_map(|v6| run_save(netns, &b.save_program(v6)).ok())
            .map(|t| kube_chain_count(&t))
            .sum()
    };
    let (nft, legacy) = (count(Backend::Nft), count(Backend::Legacy));
    match (nft, legacy) {
        (0, 0) => None,
        (n, l) if l > n => Some(Backend::Legacy),
        _ => Some(Backend::Nft),
    }
}

fn run_save(netns: &NetNs, program: &str) -> Result<String, ReadError> {
    let output = netns
        .command(program)
        .args(["-t", "nat"])
        .stdin(Stdio::null())
        .output()
        .map_err(|source| ReadError::ToolMissing {
            program: program.into(),
            source,
        })?;
    if !output.status.success() {
        return Err(ReadError::ToolFailed {
            program: program.into(),
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    String::from_utf8(output.stdout).map_err(|_| ReadError::Unparseable {
        program: program.into(),
        reason: "output is not UTF-8".into(),
    })
}

pub struct IptablesReader {
    backend: Backend,
    netns: NetNs,
}

impl IptablesReader {
    pub fn new(backend: Backend, netns: NetNs) -> Self {
        Self { backend, netns }
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
        for v6 in [false, true] {
            let program = self.backend.save_program(v6);
            let unreadable = match run_save(&self.netns, &program) {
                Ok(text) => {
                    let (services, warnings, entry_broken) = routes_from_save(&text);
                    snap.services.extend(services);
                    snap.warnings
                        .extend(warnings.into_iter().map(|w| format!("{program}: {w}")));
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
            _ => Ok(snap),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURES: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/reference/kube-proxy/fixtures"
    );

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
            tokenize(r#"-A X -m comment --comment "a \"b\" c" -j Y"#).unwrap(),
            ["-A", "X", "-m", "comment", "--comment", "a \"b\" c", "-j", "Y"]
        );
        assert!(tokenize(r#"-A X --comment "open"#).is_none());
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
