//! Domain vocabulary shared by every module: endpoint keys, service port names, protocols,
//! timestamps and change reasons. Nothing here knows about Kubernetes types or the kernel.

use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Wall-clock time in nanoseconds since the Unix epoch. Inputs carry their own timestamps so
/// the tracker can be tested with no clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Timestamp(i64);

impl Timestamp {
    pub const fn from_nanos(nanos: i64) -> Self {
        Self(nanos)
    }

    pub const fn from_millis(millis: i64) -> Self {
        Self(millis * 1_000_000)
    }

    pub fn now() -> Self {
        Self::from(SystemTime::now())
    }

    pub const fn as_nanos(self) -> i64 {
        self.0
    }

    /// `self - earlier` in seconds; negative when `earlier` is later.
    pub fn seconds_since(self, earlier: Timestamp) -> f64 {
        (self.0 - earlier.0) as f64 / 1e9
    }

    pub fn plus(self, d: Duration) -> Self {
        Self(self.0.saturating_add(d.as_nanos().min(i64::MAX as u128) as i64))
    }

    pub fn minus(self, d: Duration) -> Self {
        Self(self.0.saturating_sub(d.as_nanos().min(i64::MAX as u128) as i64))
    }

    /// RFC 3339 with nanoseconds, as the API server writes `last-change-trigger-time`.
    pub fn to_rfc3339(self) -> String {
        let secs = self.0.div_euclid(1_000_000_000);
        let nanos = self.0.rem_euclid(1_000_000_000);
        let days = secs.div_euclid(86_400);
        let rem = secs.rem_euclid(86_400);
        let (y, m, d) = civil_from_days(days);
        format!(
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{nanos:09}Z",
            rem / 3600,
            (rem % 3600) / 60,
            rem % 60
        )
    }

    /// Parses `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`.
    pub fn parse_rfc3339(s: &str) -> Option<Self> {
        let b = s.as_bytes();
        if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !(b[10] == b'T' || b[10] == b't') {
            return None;
        }
        let num = |r: std::ops::Range<usize>| -> Option<i64> { s.get(r)?.parse().ok() };
        let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
        let (h, mi, se) = (num(11..13)?, num(14..16)?, num(17..19)?);
        if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
            return None;
        }
        let mut i = 19;
        let mut nanos = 0i64;
        if b.get(i) == Some(&b'.') {
            i += 1;
            let start = i;
            while i < b.len() && b[i].is_ascii_digit() {
                i += 1;
            }
            let frac = &s[start..i];
            if frac.is_empty() {
                return None;
            }
            let digits: String = frac.chars().chain(std::iter::repeat('0')).take(9).collect();
            nanos = digits.parse().ok()?;
        }
        let offset = match s.get(i..)? {
            "Z" | "z" => 0,
            tz if tz.len() == 6 && (tz.starts_with('+') || tz.starts_with('-')) => {
                let sign = if tz.starts_with('-') { -1 } else { 1 };
                sign * (tz.get(1..3)?.parse::<i64>().ok()? * 3600 + tz.get(4..6)?.parse::<i64>().ok()? * 60)
            }
            _ => return None,
        };
        let secs = days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + se - offset;
        Some(Self(secs.checked_mul(1_000_000_000)?.checked_add(nanos)?))
    }
}

impl From<SystemTime> for Timestamp {
    fn from(t: SystemTime) -> Self {
        match t.duration_since(UNIX_EPOCH) {
            Ok(d) => Self(d.as_nanos().min(i64::MAX as u128) as i64),
            Err(e) => Self(-(e.duration().as_nanos().min(i64::MAX as u128) as i64)),
        }
    }
}

// Howard Hinnant's civil-date algorithms; avoids a date-time dependency for two conversions.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" => Ok(Protocol::Tcp),
            "udp" => Ok(Protocol::Udp),
            "sctp" => Ok(Protocol::Sctp),
            other => Err(format!("unknown protocol {other:?}")),
        }
    }
}

/// A Service, by namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ServiceRef {
    pub namespace: String,
    pub name: String,
}

impl ServiceRef {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ServiceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// kube-proxy's `ServicePortName`: `ns/svc:port`, or `ns/svc` for an unnamed port.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ServicePortName {
    pub service: ServiceRef,
    /// Empty for an unnamed port.
    pub port: String,
}

impl ServicePortName {
    pub fn new(namespace: &str, name: &str, port: &str) -> Self {
        Self {
            service: ServiceRef::new(namespace, name),
            port: port.to_string(),
        }
    }

    /// Parses kube-proxy's rendering; tolerates the trailing colon of very old releases.
    pub fn parse(s: &str) -> Option<Self> {
        let (ns, rest) = s.split_once('/')?;
        let (name, port) = match rest.split_once(':') {
            Some((n, p)) => (n, p),
            None => (rest, ""),
        };
        let dns_ok = |v: &str| {
            !v.is_empty()
                && v.len() <= 253
                && v.bytes()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'.')
        };
        let port_ok = port
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_' || c == b'.');
        (dns_ok(ns) && dns_ok(name) && port_ok).then(|| Self::new(ns, name, port))
    }
}

impl fmt::Display for ServicePortName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.port.is_empty() {
            write!(f, "{}", self.service)
        } else {
            write!(f, "{}:{}", self.service, self.port)
        }
    }
}

/// (namespace, service, port name, protocol, endpoint IP, endpoint port).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct EndpointKey {
    /// Shared by every endpoint of the port (see `expect_service`): at 100k endpoints, a copy
    /// of the three names per key was the largest part of the agent's memory.
    pub port_name: Arc<ServicePortName>,
    pub protocol: Protocol,
    pub endpoint: SocketAddr,
}

impl EndpointKey {
    pub fn new(port_name: impl Into<Arc<ServicePortName>>, protocol: Protocol, endpoint: SocketAddr) -> Self {
        Self {
            port_name: port_name.into(),
            protocol,
            endpoint,
        }
    }

    pub fn ip(&self) -> IpAddr {
        self.endpoint.ip()
    }
}

impl fmt::Display for EndpointKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{} -> {}", self.port_name, self.protocol, self.endpoint)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChangeKind {
    Removed,
    Added,
}

impl ChangeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::Removed => "removed",
            ChangeKind::Added => "added",
        }
    }
}

/// Why an endpoint left or joined the set kube-proxy should program.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeReason {
    /// The endpoint turned terminating (its pod is being deleted), or vanished after that.
    Deleted,
    /// It left every slice of the Service while not terminating, e.g. a label change.
    Isolated,
    /// ready=false while not terminating.
    Unready,
    /// The whole Service went away.
    ServiceDeleted,
    /// A new or newly ready endpoint.
    Added,
}

impl ChangeReason {
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeReason::Deleted => "deleted",
            ChangeReason::Isolated => "isolated",
            ChangeReason::Unready => "unready",
            ChangeReason::ServiceDeleted => "service_deleted",
            ChangeReason::Added => "added",
        }
    }
}

/// Where t_trigger came from, best first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TriggerSource {
    /// `endpoints.kubernetes.io/last-change-trigger-time` (nanosecond precision).
    LastChangeTriggerTime,
    /// The pod's `deletionTimestamp` minus its grace period (second precision).
    PodDeletion,
    /// The newest `managedFields` time of the slice (second precision).
    ManagedFields,
}

impl TriggerSource {
    pub fn as_str(self) -> &'static str {
        match self {
            TriggerSource::LastChangeTriggerTime => "last_change_trigger_time",
            TriggerSource::PodDeletion => "pod_deletion",
            TriggerSource::ManagedFields => "managed_fields",
        }
    }

    /// How far the source may be from the real change time because of its precision.
    pub fn precision(self) -> Duration {
        match self {
            TriggerSource::LastChangeTriggerTime => Duration::from_nanos(1),
            TriggerSource::PodDeletion | TriggerSource::ManagedFields => Duration::from_secs(1),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trigger {
    pub time: Timestamp,
    pub source: TriggerSource,
}

/// What a targeted read is asked to cover: the service ports with pending changes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReadTargets {
    /// Their frontends (`ip:port`, `*:nodePort`).
    pub frontends: BTreeSet<String>,
    /// The service ports themselves.
    pub ports: BTreeSet<(ServicePortName, Protocol)>,
}

impl ReadTargets {
    pub fn is_empty(&self) -> bool {
        self.frontends.is_empty() && self.ports.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trip_and_offsets() {
        let t = Timestamp::parse_rfc3339("2025-01-01T00:00:00.123456789Z").unwrap();
        assert_eq!(t.to_rfc3339(), "2025-01-01T00:00:00.123456789Z");
        assert_eq!(t.as_nanos(), 1_735_689_600_123_456_789);
        let plus = Timestamp::parse_rfc3339("2025-01-01T02:00:00+02:00").unwrap();
        assert_eq!(plus.as_nanos(), 1_735_689_600_000_000_000);
        assert_eq!(
            Timestamp::parse_rfc3339("2024-02-29T12:00:00Z").unwrap().to_rfc3339(),
            "2024-02-29T12:00:00.000000000Z"
        );
        assert!(Timestamp::parse_rfc3339("2025-13-01T00:00:00Z").is_none());
        assert!(Timestamp::parse_rfc3339("yesterday").is_none());
        assert!(Timestamp::parse_rfc3339("2025-01-01T00:00:00.Z").is_none());
    }

    #[test]
    fn service_port_names_render_like_kube_proxy() {
        assert_eq!(ServicePortName::new("ns1", "svc1", "p80").to_string(), "ns1/svc1:p80");
        assert_eq!(ServicePortName::new("ns1", "svc1", "").to_string(), "ns1/svc1");
        assert_eq!(
            ServicePortName::parse("default/hostnames:"),
            Some(ServicePortName::new("default", "hostnames", ""))
        );
        assert_eq!(
            ServicePortName::parse("ns1/svc1:p80"),
            Some(ServicePortName::new("ns1", "svc1", "p80"))
        );
        assert_eq!(ServicePortName::parse("kubernetes service portals"), None);
        assert_eq!(ServicePortName::parse("ns/svc:p80 cluster IP"), None);
    }
}
