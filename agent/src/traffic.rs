//! What a removal cost in real traffic: new connections the node still sent to an endpoint
//! after it was removed, split by whether this node had converged yet.
//!
//! - `before_converged`: the lag cost real connections (the kernel still routed there).
//! - `after_converged`: the agent reported the removal programmed at `t_programmed`, and a new
//!   connection created later still went there. That is a false "converged", caught on live
//!   traffic: a safety violation.
//!
//! A connection is classified by its creation time against the removal's `t_programmed`, so
//! connections seen before the removal converges are kept (times only) until it does. The
//! watch on an endpoint lasts while its removal is pending and for `window` after it
//! converged; then the endpoint is forgotten and, with nothing watched, the listener stops.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::dataplane::conntrack::NewConnection;
use crate::model::{ChangeReason, EndpointKey, Protocol, Timestamp};

/// Connections recorded per endpoint while its removal is pending, at most; more are counted
/// as before convergence (they cannot be later than a removal that has not converged, except
/// in the violation this check exists for, which a smaller sample still shows).
const MAX_UNRESOLVED: usize = 100_000;

/// Two clocks meet here: the kernel's (or the listener's) and the NEWGEN listener's. A
/// connection this close after `t_programmed` is not called a violation.
pub const CLOCK_SKEW: Duration = Duration::from_millis(5);

#[derive(Clone, Debug)]
struct Watched {
    key: EndpointKey,
    reason: ChangeReason,
    /// The service port's frontends (`ip:port`, `*:nodePort`); empty when unknown (a deleted
    /// Service): then any translated connection to the endpoint counts.
    frontends: Arc<[String]>,
    /// When the agent reported the removal programmed.
    programmed_at: Option<Timestamp>,
    /// Creation times of connections seen while the removal was pending.
    unresolved: Vec<Timestamp>,
    before: u64,
    after: u64,
}

/// A connection after convergence: what the agent logs and counts.
#[derive(Clone, Debug, PartialEq)]
pub struct Violation {
    pub key: EndpointKey,
    pub reason: ChangeReason,
    pub programmed_at: Timestamp,
    pub connection_at: Timestamp,
}

/// Counts for one endpoint, for the status and the hold summaries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointTraffic {
    pub key: EndpointKey,
    pub reason: ChangeReason,
    pub before_converged: u64,
    pub after_converged: u64,
    pub converged: bool,
}

/// Counts to add to the metrics: `(reason, before, after)` per classification.
pub type Counted = Vec<(ChangeReason, u64, u64)>;

#[derive(Debug)]
pub struct TrafficWatch {
    window: Duration,
    /// By (protocol, endpoint): a connection names no service port.
    watched: HashMap<(Protocol, std::net::SocketAddr), Vec<Watched>>,
}

impl TrafficWatch {
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            watched: HashMap::new(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.watched.is_empty()
    }

    /// Whether a connection to `target` concerns a watched endpoint (the listener's filter).
    pub fn wants(&self, protocol: Protocol, target: std::net::SocketAddr) -> bool {
        self.watched.contains_key(&(protocol, target))
    }

    /// How many (protocol, endpoint) pairs are watched.
    pub fn len(&self) -> usize {
        self.watched.len()
    }

    /// Whether every watched pair is in `set`.
    pub fn targets_in(&self, set: &std::collections::HashSet<(Protocol, std::net::SocketAddr)>) -> bool {
        self.watched.keys().all(|k| set.contains(k))
    }

    /// The watched (protocol, endpoint) pairs.
    pub fn targets(&self) -> std::collections::HashSet<(Protocol, std::net::SocketAddr)> {
        self.watched.keys().copied().collect()
    }

    /// A removal became pending.
    pub fn removal_pending(&mut self, key: &EndpointKey, reason: ChangeReason, frontends: &[String]) {
        let list = self.watched.entry((key.protocol, key.endpoint)).or_default();
        if let Some(w) = list.iter_mut().find(|w| w.key == *key) {
            // Removed again (after coming back): a new removal, watched afresh.
            w.programmed_at = None;
            w.reason = reason;
            return;
        }
        list.push(Watched {
            key: key.clone(),
            reason,
            frontends: frontends.into(),
            programmed_at: None,
            unresolved: Vec::new(),
            before: 0,
            after: 0,
        });
    }

    /// The removal converged, programmed at `at`: the connections seen meanwhile are
    /// classified against it.
    pub fn removal_converged(&mut self, key: &EndpointKey, at: Timestamp) -> (Counted, Vec<Violation>) {
        let (mut counted, mut violations) = (Vec::new(), Vec::new());
        let Some(w) = self.find(key) else {
            return (counted, violations);
        };
        w.programmed_at = Some(at);
        let (mut before, mut after) = (0, 0);
        for t in std::mem::take(&mut w.unresolved) {
            if is_after(t, at) {
                after += 1;
                violations.push(Violation {
                    key: w.key.clone(),
                    reason: w.reason,
                    programmed_at: at,
                    connection_at: t,
                });
            } else {
                before += 1;
            }
        }
        w.before += before;
        w.after += after;
        if before + after > 0 {
            counted.push((w.reason, before, after));
        }
        (counted, violations)
    }

    /// The removal will not converge as such (reverted, timed out): stop watching it. What
    /// was seen meanwhile happened before any convergence.
    pub fn removal_dropped(&mut self, key: &EndpointKey) -> Counted {
        let mut counted = Vec::new();
        let slot = (key.protocol, key.endpoint);
        if let Some(list) = self.watched.get_mut(&slot) {
            if let Some(i) = list.iter().position(|w| w.key == *key && w.programmed_at.is_none()) {
                let w = list.swap_remove(i);
                if !w.unresolved.is_empty() {
                    counted.push((w.reason, w.unresolved.len() as u64, 0));
                }
            }
            if list.is_empty() {
                self.watched.remove(&slot);
            }
        }
        counted
    }

    /// One new connection: counted now when its removal has converged, else kept.
    pub fn connection(&mut self, c: &NewConnection) -> (Counted, Option<Violation>) {
        let (mut counted, mut violation) = (Vec::new(), None);
        let Some(list) = self.watched.get_mut(&(c.protocol, c.target)) else {
            return (counted, violation);
        };
        let destination = c.destination.to_string();
        let node_port = format!("*:{}", c.destination.port());
        for w in list
            .iter_mut()
            .filter(|w| w.frontends.is_empty() || w.frontends.iter().any(|f| *f == destination || *f == node_port))
        {
            match w.programmed_at {
                None if w.unresolved.len() < MAX_UNRESOLVED => w.unresolved.push(c.at),
                None => {
                    w.before += 1;
                    counted.push((w.reason, 1, 0));
                }
                Some(at) if is_after(c.at, at) => {
                    w.after += 1;
                    counted.push((w.reason, 0, 1));
                    violation = Some(Violation {
                        key: w.key.clone(),
                        reason: w.reason,
                        programmed_at: at,
                        connection_at: c.at,
                    });
                }
                Some(_) => {
                    w.before += 1;
                    counted.push((w.reason, 1, 0));
                }
            }
        }
        (counted, violation)
    }

    /// Forgets endpoints whose removal converged more than the window ago.
    pub fn expire(&mut self, now: Timestamp) {
        let window = self.window.as_secs_f64();
        self.watched.retain(|_, list| {
            list.retain(|w| w.programmed_at.is_none_or(|at| now.seconds_since(at) <= window));
            !list.is_empty()
        });
    }

    /// The counts of every watched endpoint, sorted by endpoint.
    pub fn summary(&self) -> Vec<EndpointTraffic> {
        let mut out: Vec<EndpointTraffic> = self
            .watched
            .values()
            .flatten()
            .map(|w| EndpointTraffic {
                key: w.key.clone(),
                reason: w.reason,
                before_converged: w.before + w.unresolved.len() as u64,
                after_converged: w.after,
                converged: w.programmed_at.is_some(),
            })
            .collect();
        out.sort_by(|a, b| a.key.cmp(&b.key));
        out
    }

    fn find(&mut self, key: &EndpointKey) -> Option<&mut Watched> {
        self.watched
            .get_mut(&(key.protocol, key.endpoint))?
            .iter_mut()
            .find(|w| w.key == *key)
    }
}

fn is_after(connection: Timestamp, programmed: Timestamp) -> bool {
    connection.seconds_since(programmed) > CLOCK_SKEW.as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ServicePortName;

    fn key(ep: &str) -> EndpointKey {
        EndpointKey::new(
            ServicePortName::new("demo", "web", "http"),
            Protocol::Tcp,
            ep.parse().unwrap(),
        )
    }

    fn conn(target: &str, dst: &str, at_ms: i64) -> NewConnection {
        NewConnection {
            protocol: Protocol::Tcp,
            destination: dst.parse().unwrap(),
            target: target.parse().unwrap(),
            at: Timestamp::from_millis(at_ms),
        }
    }

    const VIP: &str = "10.96.0.10:80";
    const EP: &str = "10.244.1.10:8080";

    #[test]
    fn connections_are_split_at_the_reported_programming_time() {
        let mut w = TrafficWatch::new(Duration::from_secs(60));
        let k = key(EP);
        w.removal_pending(&k, ChangeReason::Deleted, &[VIP.to_string()]);
        assert!(w.wants(Protocol::Tcp, EP.parse().unwrap()));
        // Seen while pending: classified later.
        for t in [100, 200, 300] {
            assert_eq!(w.connection(&conn(EP, VIP, t)), (vec![], None));
        }
        // The agent says programmed at 250 ms: the connection at 300 ms is a violation.
        let (counted, violations) = w.removal_converged(&k, Timestamp::from_millis(250));
        assert_eq!(counted, vec![(ChangeReason::Deleted, 2, 1)]);
        assert_eq!(violations.len(), 1);
        assert_eq!(violations[0].connection_at, Timestamp::from_millis(300));
        // Within the clock skew after it: not a violation; well after: one.
        assert_eq!(w.connection(&conn(EP, VIP, 253)).0, vec![(ChangeReason::Deleted, 1, 0)]);
        let (counted, violation) = w.connection(&conn(EP, VIP, 400));
        assert_eq!(counted, vec![(ChangeReason::Deleted, 0, 1)]);
        assert!(violation.is_some());
        let s = w.summary();
        assert_eq!(
            (s[0].before_converged, s[0].after_converged, s[0].converged),
            (3, 2, true)
        );
    }

    #[test]
    fn other_frontends_other_endpoints_and_expired_watches_count_nothing() {
        let mut w = TrafficWatch::new(Duration::from_secs(60));
        let k = key(EP);
        w.removal_pending(&k, ChangeReason::Deleted, &[VIP.to_string(), "*:30080".to_string()]);
        w.removal_converged(&k, Timestamp::from_millis(0));
        // The same pod behind another Service's VIP is still legitimately in use.
        assert_eq!(w.connection(&conn(EP, "10.96.0.99:80", 1000)), (vec![], None));
        // Another endpoint.
        assert_eq!(w.connection(&conn("10.244.2.11:8080", VIP, 1000)), (vec![], None));
        // Its NodePort on any node address counts.
        assert_eq!(w.connection(&conn(EP, "192.168.1.5:30080", 1000)).0.len(), 1);
        w.expire(Timestamp::from_millis(61_000));
        assert!(w.is_empty(), "the window ended: nothing watched, the listener may stop");
    }

    #[test]
    fn a_dropped_removal_counts_what_it_saw_as_before() {
        let mut w = TrafficWatch::new(Duration::from_secs(60));
        let k = key(EP);
        w.removal_pending(&k, ChangeReason::Isolated, &[]);
        w.connection(&conn(EP, VIP, 10));
        assert_eq!(w.removal_dropped(&k), vec![(ChangeReason::Isolated, 1, 0)]);
        assert!(w.is_empty());
    }
}
