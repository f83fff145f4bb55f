//! `kube-converge inspect`: what this node's dataplane routes right now, from the kernel.

use std::fmt::Write as _;

use serde::Serialize;

use std::collections::BTreeSet;

use crate::dataplane::{self, iptables::Backend, DataplaneSnapshot, Mode, ReadError, ReadTargets};
use crate::netns::NetNs;

#[derive(Debug, Serialize)]
pub struct InspectReport {
    pub mode: Mode,
    pub backend: String,
    pub services: Vec<InspectService>,
    /// IPVS destinations with weight 0 and their remaining connections.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub draining: Option<crate::dataplane::Draining>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct InspectService {
    /// `ns/svc:port`, `ns/svc`, or null when the rules do not say.
    pub name: Option<String>,
    pub protocol: Option<String>,
    pub frontends: Vec<String>,
    pub endpoints: Vec<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub uncertain: bool,
}

pub fn inspect(mode: Option<Mode>, backend: Option<Backend>, netns: &NetNs) -> Result<InspectReport, ReadError> {
    let mut reader = dataplane::open_reader(mode, backend, netns)?;
    let snap = reader.read()?;
    Ok(report(reader.mode(), reader.backend(), snap))
}

/// What serves `frontends` only (as [`crate::config::parse_frontend`] names them). nftables and
/// IPVS read just those frontends' service ports, as the agent does while a change is pending;
/// iptables names its targeted reads by service port, which a frontend does not give, so it
/// reads in full. Either way only service ports serving one of `frontends` are reported.
pub fn inspect_frontends(
    mode: Option<Mode>,
    backend: Option<Backend>,
    netns: &NetNs,
    frontends: &BTreeSet<String>,
) -> Result<InspectReport, ReadError> {
    let mut reader = dataplane::open_reader(mode, backend, netns)?;
    let targets = ReadTargets {
        frontends: frontends.clone(),
        ..Default::default()
    };
    // A targeted read already holds only what serves the frontends, matched by the reader
    // (an IPVS NodePort `*:PORT` is a virtual server on any address with that port).
    let targeted = match reader.mode() {
        Mode::Nftables | Mode::Ipvs => reader.read_targeted(&targets),
        Mode::Iptables => None,
    };
    let snap = match targeted {
        Some(read) => read?,
        None => {
            let mut snap = reader.read()?;
            snap.services
                .retain(|s| s.frontends.iter().any(|f| frontends.contains(f)));
            snap
        }
    };
    Ok(report(reader.mode(), reader.backend(), snap))
}

fn report(mode: Mode, backend: &str, snap: DataplaneSnapshot) -> InspectReport {
    let mut services: Vec<InspectService> = snap
        .services
        .into_iter()
        .map(|s| InspectService {
            name: s.name.map(|n| n.to_string()),
            protocol: s.protocol.map(|p| p.as_str().to_string()),
            frontends: s.frontends.into_iter().collect(),
            endpoints: s.endpoints.iter().map(|e| e.to_string()).collect(),
            uncertain: s.uncertain,
        })
        .collect();
    services.sort_by(|a, b| (&a.name, &a.frontends).cmp(&(&b.name, &b.frontends)));
    let mut warnings = snap.warnings;
    if snap.unreadable_v4 {
        warnings.push("IPv4 rules could not be read".into());
    }
    if snap.unreadable_v6 {
        warnings.push("IPv6 rules could not be read".into());
    }
    InspectReport {
        mode,
        backend: backend.to_string(),
        services,
        draining: snap.draining,
        warnings,
    }
}

/// At most this many items of a table cell are listed; the rest are counted.
const CELL_ITEMS: usize = 8;
/// And a cell never runs longer than this many characters.
const CELL_CHARS: usize = 200;

/// `items` joined with commas, cut to a readable cell: a service whose rules hold thousands of
/// frontends or endpoints (or junk) gets a count, not a 37,000-character row. `-o json` has all.
fn cell(items: &[String]) -> String {
    let mut out = String::new();
    let mut shown = 0;
    for item in items.iter().take(CELL_ITEMS) {
        let sep = if shown == 0 { "" } else { "," };
        if out.chars().count() + sep.len() + item.chars().count() > CELL_CHARS {
            break;
        }
        out.push_str(sep);
        out.push_str(item);
        shown += 1;
    }
    if shown == 0 && !items.is_empty() {
        out = items[0].chars().take(CELL_CHARS).collect::<String>() + "…";
        shown = 1;
    }
    if shown < items.len() {
        out.push_str(&format!(" (+{} more)", items.len() - shown));
    }
    out
}

impl InspectReport {
    pub fn to_table(&self) -> String {
        let mut out = format!("MODE: {}  BACKEND: {}\n", self.mode, self.backend);
        let rows: Vec<[String; 4]> = self
            .services
            .iter()
            .map(|s| {
                let mut eps = if s.endpoints.is_empty() {
                    "<none>".to_string()
                } else {
                    cell(&s.endpoints)
                };
                if s.uncertain {
                    eps.push_str(" (some rules not understood)");
                }
                [
                    s.name.clone().unwrap_or_else(|| "<unnamed>".into()),
                    s.protocol.clone().unwrap_or_else(|| "?".into()),
                    cell(&s.frontends),
                    eps,
                ]
            })
            .collect();
        let header = ["SERVICE", "PROTO", "FRONTENDS", "ENDPOINTS"].map(String::from);
        let mut widths = header.clone().map(|h| h.len());
        for r in &rows {
            for (w, c) in widths.iter_mut().zip(r) {
                *w = (*w).max(c.len());
            }
        }
        for r in std::iter::once(&header).chain(&rows) {
            let line = format!(
                "{:w0$}  {:w1$}  {:w2$}  {}",
                r[0],
                r[1],
                r[2],
                r[3],
                w0 = widths[0],
                w1 = widths[1],
                w2 = widths[2]
            );
            let _ = writeln!(out, "{}", line.trim_end());
        }
        if let Some(d) = &self.draining {
            let _ = writeln!(
                out,
                "draining: {} destinations with weight 0, {} active and {} inactive connections",
                d.endpoints, d.active_connections, d.inactive_connections
            );
        }
        for w in &self.warnings {
            let _ = writeln!(out, "warning: {w}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_cells_are_cut_with_a_count() {
        let few: Vec<String> = (1..=3).map(|i| format!("10.0.0.{i}:80")).collect();
        assert_eq!(cell(&few), "10.0.0.1:80,10.0.0.2:80,10.0.0.3:80");
        let many: Vec<String> = (0..3000).map(|i| format!("10.{}.{}.1:80", i / 256, i % 256)).collect();
        let c = cell(&many);
        assert!(c.chars().count() < CELL_CHARS + 20, "{c}");
        assert!(c.ends_with("(+2992 more)"), "{c}");
        let junk = vec!["x".repeat(37_000)];
        let c = cell(&junk);
        assert!(c.chars().count() <= CELL_CHARS + 1, "{}", c.len());
        assert!(c.ends_with('…'));
        assert_eq!(cell(&[]), "");
    }
}
