//! The text form of the nat table: `iptables-save` output and `iptables-restore` input (what
//! kube-proxy writes and what the reference fixtures hold). The readers get the same rules from
//! the kernel directly; this parser is for fixtures and tests, and is the oracle the kernel
//! readers are checked against.

use super::xt::Dnat;
use super::{strip_prefix_len, NatTable, Rule, Verdict};

/// Splits a rule the way iptables-save quotes it: double quotes, backslash escapes.
pub(super) fn tokenize(line: &str) -> Option<Vec<String>> {
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
    let mut target: Option<&str> = None;
    let mut to_destination: Option<&str> = None;
    let mut negate = false;
    let mut i = 0;
    while i < tokens.len() {
        let tok = tokens[i].as_str();
        let value = tokens.get(i + 1).map(String::as_str);
        let mut consumed = 1;
        match tok {
            "!" => {
                negate = true;
                i += 1;
                continue;
            }
            "-d" | "--destination" | "--dst" => {
                if !negate {
                    rule.destination = value.and_then(strip_prefix_len);
                }
                consumed = 2;
            }
            "-p" | "--protocol" => {
                if !negate {
                    rule.protocol = value.and_then(|p| p.parse().ok());
                }
                consumed = 2;
            }
            "--dport" | "--destination-port" => {
                if !negate {
                    rule.dport = value.and_then(|p| p.parse().ok());
                }
                consumed = 2;
            }
            "--comment" => {
                rule.comment = value.map(str::to_string);
                consumed = 2;
            }
            "-j" | "--jump" | "-g" | "--goto" => {
                target = value;
                consumed = 2;
            }
            "--to-destination" => {
                to_destination = value;
                consumed = 2;
            }
            _ => {}
        }
        negate = false;
        i += consumed;
    }
    rule.verdict = match (target, to_destination) {
        (Some("DNAT"), Some(dest)) => Verdict::Dnat(match dest.parse() {
            Ok(addr) => Dnat::To(addr),
            Err(_) => Dnat::NotUnderstood(format!("cannot parse DNAT destination {dest:?}")),
        }),
        (Some("DNAT"), None) => Verdict::Dnat(Dnat::NotUnderstood("DNAT rule without --to-destination".into())),
        (Some(t), _) => Verdict::Jump(t.to_string()),
        (None, _) => Verdict::Continue,
    };
    rule
}

/// Parses the `*nat` section of `iptables-save` or `iptables-restore` input.
pub(super) fn parse_nat(text: &str) -> NatTable {
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
