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
                    s.endpoints.join(",")
                };
                if s.uncertain {
                    eps.push_str(" (some rules not understood)");
                }
                [
                    s.name.clone().unwrap_or_else(|| "<unnamed>".into()),
                    s.protocol.clone().unwrap_or_else(|| "?".into()),
                    s.frontends.join(","),
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
