//! The convergence tracker: the heart of the agent. It takes expectation updates (what
//! kube-proxy should program, with the time the agent observed them) and dataplane readings
//! (what the kernel routes, with the time that state took effect) and returns lags and states.
//!
//! It owns no clock, no kernel handle and no API client: every input carries its timestamps.
//! It must never report a removal as converged while the last reading that could confirm it
//! still routes to the endpoint, or could not tell (the safety rule).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::expected::ServiceExpectation;
use crate::model::{
    ChangeKind, ChangeReason, EndpointKey, Protocol, ReadTargets, ServicePortName, ServiceRef, Timestamp, Trigger,
    TriggerSource,
};

/// How a dataplane reading was triggered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ReadTrigger {
    /// A kernel notification (nf_tables generation change).
    Event,
    /// A periodic poll.
    Poll,

    /// New pending changes asked for a check.
    Pending,
    /// The first read after start-up.
    Initial,
}

impl ReadTrigger {
    pub fn as_str(self) -> &'static str {
        match self {
            ReadTrigger::Event => "event",
            ReadTrigger::Poll => "poll",

            ReadTrigger::Pending => "pending",
            ReadTrigger::Initial => "initial",
        }
    }
}

/// What a successful reading says is routed, keyed the way the tracker asks.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RoutedView {
    /// Endpoints routed by a service whose port name is known.
    pub named: HashSet<(Arc<ServicePortName>, Protocol, SocketAddr)>,
    /// Endpoints routed by rules that could not be attributed to a service port. They count as
    /// routed for every key with the same protocol and address (safety first).
    pub unattributed: HashSet<(Protocol, SocketAddr)>,
    /// Service ports whose rules could not be fully understood: their keys are `unknown`.
    pub uncertain: HashSet<ServicePortName>,
    /// Address families the reader could not read: every key in them is `unknown`.
    pub unreadable_v4: bool,
    pub unreadable_v6: bool,
    /// Families without kube-proxy's rules: every key in them is `unknown`.
    pub absent_v4: bool,
    pub absent_v6: bool,
    /// A targeted read covers only these service ports; the others were not read at all.
    pub scope: Option<HashSet<ServicePortName>>,
    /// Rules outside any service port that could not be read (a stray DNAT through something
    /// unreadable): they may route anywhere, so nothing can be confirmed while they stand.
    pub unattributed_uncertain: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Routed {
    Yes,
    No,
    Unknown,
    /// Outside a targeted read's scope: this reading says nothing about the key.
    NotRead,
}

impl RoutedView {
    /// A targeted read does not look at the rules outside the pending ports: unattributed
    /// rules the last full read could not read still stand, and blind this read as they
    /// blinded that one (found by review: targeted reads dropped that uncertainty).
    pub fn inherit_from_last_full_read(&mut self, last_full_unattributed_uncertain: bool) {
        if last_full_unattributed_uncertain {
            self.unreadable_v4 = true;
            self.unreadable_v6 = true;
        }
    }

    /// Every family read and every rule understood.
    pub fn is_clean(&self) -> bool {
        !self.unreadable_v4 && !self.unreadable_v6 && self.uncertain.is_empty()
    }

    /// The families (v4, v6) this reading could not fully see: unreadable, or (any family)
    /// some rule not understood.
    pub fn unclean_families(&self) -> [bool; 2] {
        let uncertain = !self.uncertain.is_empty();
        [self.unreadable_v4 || uncertain, self.unreadable_v6 || uncertain]
    }

    pub fn routes(&self, key: &EndpointKey) -> Routed {
        let unreadable = if key.endpoint.is_ipv4() {
            self.unreadable_v4 || self.absent_v4
        } else {
            self.unreadable_v6 || self.absent_v6
        };
        if self.scope.as_ref().is_some_and(|s| !s.contains(&key.port_name)) {
            return Routed::NotRead;
        }
        if unreadable || self.uncertain.contains(&key.port_name) {
            return Routed::Unknown;
        }
        let named = self
            .named
            .contains(&(key.port_name.clone(), key.protocol, key.endpoint));
        if named || self.unattributed.contains(&(key.protocol, key.endpoint)) {
            Routed::Yes
        } else {
            Routed::No
        }
    }
}

/// What the tracker keeps of the last full reading: enough to tell whether a new change was
/// already in effect then (its candidate time). Routed keys are kept as 64-bit fingerprints,
/// not copies (100k endpoints: ~2 MiB instead of ~25 MiB). A collision could only move a lag
/// sample's start earlier; it never confirms a change, which takes a new reading.
#[derive(Debug)]
struct LastView {
    named: HashSet<u64>,
    unattributed: HashSet<(Protocol, SocketAddr)>,
    uncertain: HashSet<ServicePortName>,
    unreadable_v4: bool,
    unreadable_v6: bool,
}

fn fingerprint(spn: &ServicePortName, protocol: Protocol, endpoint: SocketAddr) -> u64 {
    use std::hash::{Hash, Hasher};
    // Fixed keys: the fingerprints of one process must agree with each other.
    let mut h = std::hash::DefaultHasher::new();
    (spn, protocol, endpoint).hash(&mut h);
    h.finish()
}

impl LastView {
    fn of(view: &RoutedView) -> Self {
        Self {
            named: view.named.iter().map(|(s, p, e)| fingerprint(s, *p, *e)).collect(),
            unattributed: view.unattributed.clone(),
            uncertain: view.uncertain.clone(),
            unreadable_v4: view.unreadable_v4 || view.absent_v4,
            unreadable_v6: view.unreadable_v6 || view.absent_v6,
        }
    }

    /// As `RoutedView::routes` for a full reading.
    fn routes(&self, key: &EndpointKey) -> Routed {
        let unreadable = if key.endpoint.is_ipv4() {
            self.unreadable_v4
        } else {
            self.unreadable_v6
        };
        if unreadable || self.uncertain.contains(&key.port_name) {
            Routed::Unknown
        } else if self
            .named
            .contains(&fingerprint(&key.port_name, key.protocol, key.endpoint))
            || self.unattributed.contains(&(key.protocol, key.endpoint))
        {
            Routed::Yes
        } else {
            Routed::No
        }
    }
}

/// When a reading's state took effect, and how it was obtained.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ReadingMeta {
    pub started: Timestamp,
    pub finished: Timestamp,
    /// The latest time at which the state seen by this reading can have come into effect: the
    /// kernel notification time for event-driven readers, the read time for polls.
    pub programmed_at: Timestamp,
    /// How much earlier the state may really have taken effect.
    pub error_bound: Duration,
    pub trigger: ReadTrigger,
}

#[derive(Clone, Debug, PartialEq)]
pub enum ReadingOutcome {
    Routed(RoutedView),
    /// The reading failed; `kind` is a short fixed string for metric labels.
    Failed {
        kind: &'static str,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct Reading {
    pub meta: ReadingMeta,
    pub outcome: ReadingOutcome,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PendingState {
    Pending,
    /// The last reading could not tell whether the endpoint is routed.
    Unknown,
    /// Pending for longer than the change timeout; still tracked so it is never dropped.
    TimedOut,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PendingChange {
    pub key: EndpointKey,
    pub kind: ChangeKind,
    pub reason: ChangeReason,
    pub observed: Timestamp,
    pub trigger: Option<Trigger>,
    pub resource_version: u64,
    pub state: PendingState,
    /// The change already showed in a reading that could not confirm it on its own
    /// (programmed_at, error bound).
    #[serde(skip)]
    candidate: Option<(Timestamp, Duration)>,
    /// False for a removal of an endpoint the kernel may never have routed (an addition that
    /// was cancelled before it was programmed): it must converge, but its lag means nothing.
    #[serde(skip)]
    sampled: bool,
    /// Adopted at start-up: when the agent observed it is unknown, so it is never timed.
    pub adopted: bool,
}

/// A finished measurement.
#[derive(Clone, Debug, PartialEq)]
pub struct LagSample {
    pub key: EndpointKey,
    pub kind: ChangeKind,
    pub reason: ChangeReason,
    /// t_programmed − t_observed, clamped at zero.
    pub lag: f64,
    /// The kernel was already programmed before the agent saw the change.
    pub lag_clamped: bool,
    /// t_programmed − t_trigger, clamped at zero, with the trigger's source.
    pub end_to_end: Option<(f64, TriggerSource)>,
    pub end_to_end_clamped: bool,
    pub programmed_at: Timestamp,
    pub error_bound: Duration,
    pub read_trigger: ReadTrigger,
    pub resource_version: u64,
    pub trigger: Option<Trigger>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Converged(LagSample),
    /// Converged, but the lag is not meaningful (see `PendingChange::sampled`).
    ConvergedUnsampled {
        key: EndpointKey,
        kind: ChangeKind,
    },
    TimedOut {
        key: EndpointKey,
        kind: ChangeKind,
        reason: ChangeReason,
    },
    /// Reverted by the API before the node converged (flapping).
    Superseded {
        key: EndpointKey,
        kind: ChangeKind,
    },
}

#[derive(Clone, Debug)]
pub struct TrackerConfig {
    pub change_timeout: Duration,
}

impl Default for TrackerConfig {
    fn default() -> Self {
        Self {
            change_timeout: Duration::from_secs(300),
        }
    }
}

#[derive(Debug, Default)]
pub struct Tracker {
    config: TrackerConfig,
    services: HashMap<ServiceRef, ServiceExpectation>,
    pending: BTreeMap<EndpointKey, PendingChange>,
    last_view: Option<(LastView, ReadingMeta)>,
    synced: bool,
    adopt_after: Option<Timestamp>,
    /// Routed endpoints of known Services, neither expected nor pending (last full read, and
    /// the targeted reads since for the ports they covered).
    stale: Vec<EndpointKey>,
    /// Families (v4, v6) whose stale endpoints are not known: a read failed, or could not read
    /// the family or understand some rule. Cleared by a clean full read.
    stale_unknown: [bool; 2],
    /// Families (v4, v6) without kube-proxy's rules in the last reading: their stale endpoints
    /// are unknown too (kube-proxy may put rules back), but a single-stack node always has one
    /// and a full read would not change that.
    absent: [bool; 2],
    /// Highest slice resourceVersion folded into the expectation.
    observed_resource_version: u64,
    /// Bumped whenever some Service's frontends change (see `frontends_generation`).
    frontends_generation: u64,
}

impl Tracker {
    pub fn new(config: TrackerConfig) -> Self {
        Self {
            config,
            ..Default::default()
        }
    }

    /// True once the initial lists are in: before that, updates set a baseline and create no
    /// changes, so start-up never invents lags from history.
    pub fn is_synced(&self) -> bool {
        self.synced
    }

    /// Synced, and a full reading since the sync has adopted whatever the kernel had not caught
    /// up with. Until then the pending list may be missing changes, so nobody may conclude
    /// from it that nothing is pending.
    pub fn is_settled(&self) -> bool {
        self.synced && self.adopt_after.is_none()
    }

    /// The initial lists are in, at `at`. The first successful reading that starts after
    /// that adopts whatever the kernel has not caught up with as pending changes without a lag
    /// (`adopt_unconverged`): an agent restarted while changes were pending loses none of them
    /// and invents no lag for them.
    pub fn mark_synced(&mut self, at: Timestamp) {
        self.synced = true;
        self.adopt_after = Some(at);
    }

    fn adopt_unconverged(&mut self, view: &RoutedView, at: Timestamp) {
        let mut adopted = Vec::new();
        for exp in self.services.values() {
            for key in &exp.expected {
                if !self.pending.contains_key(key) && view.routes(key) == Routed::No {
                    adopted.push((
                        key.clone(),
                        ChangeKind::Added,
                        ChangeReason::Added,
                        exp.trigger,
                        exp.resource_version,
                    ));
                }
            }
        }
        for (spn, proto, addr) in &view.named {
            let Some(exp) = self.services.get(&spn.service) else {
                continue;
            };
            let key = EndpointKey::new(spn.clone(), *proto, *addr);
            if !exp.expected.contains(&key) && !self.pending.contains_key(&key) {
                let reason = classify_removal(&key, exp, exp);
                adopted.push((key, ChangeKind::Removed, reason, exp.trigger, exp.resource_version));
            }
        }
        for (key, kind, reason, trigger, resource_version) in adopted {
            let change = PendingChange {
                key: key.clone(),
                kind,
                reason,
                observed: at,
                trigger,
                resource_version,
                state: PendingState::Pending,
                candidate: None,
                sampled: false,
                adopted: true,
            };
            self.pending.insert(key, change);
        }
    }

    pub fn observed_resource_version(&self) -> u64 {
        self.observed_resource_version
    }

    pub fn service(&self, svc: &ServiceRef) -> Option<&ServiceExpectation> {
        self.services.get(svc)
    }

    pub fn services(&self) -> impl Iterator<Item = (&ServiceRef, &ServiceExpectation)> {
        self.services.iter()
    }

    /// Replaces one Service's expectation, observed at `at`, and returns flapping outcomes.
    /// Applying the same expectation twice (a relist) creates nothing.
    pub fn update_service(&mut self, svc: &ServiceRef, new: ServiceExpectation, at: Timestamp) -> Vec<Outcome> {
        self.observed_resource_version = self.observed_resource_version.max(new.resource_version);
        let old = self.services.remove(svc).unwrap_or_default();
        let mut outcomes = Vec::new();
        if self.synced {
            for key in old.expected.difference(&new.expected) {
                let reason = classify_removal(key, &old, &new);
                self.on_removed(key.clone(), reason, &new, at, &mut outcomes);
            }
            for key in new.expected.difference(&old.expected) {
                self.on_added(key.clone(), &new, at, &mut outcomes);
            }
        }
        if new.expected.is_empty() && new.conditions.is_empty() && !new.service_exists {
            // Keep removals pending for a deleted Service, but forget the Service itself.
            if !old.frontends.is_empty() {
                self.frontends_generation += 1;
            }
        } else {
            if old.frontends != new.frontends {
                self.frontends_generation += 1;
            }
            self.services.insert(svc.clone(), new);
        }
        outcomes
    }

    /// Changes whenever the frontends of any Service change: what is derived from them alone
    /// (the catalog that names rules) can be kept until then. Endpoint churn leaves it alone.
    pub fn frontends_generation(&self) -> u64 {
        self.frontends_generation
    }

    fn on_removed(
        &mut self,
        key: EndpointKey,
        reason: ChangeReason,
        new: &ServiceExpectation,
        at: Timestamp,
        out: &mut Vec<Outcome>,
    ) {
        let mut sampled = true;
        if let Some(prev) = self.pending.remove(&key) {
            out.push(Outcome::Superseded {
                key: key.clone(),
                kind: prev.kind,
            });
            // The addition may never have reached the kernel; converge the removal for safety
            // but only measure it if the kernel had programmed the addition.
            sampled = prev.candidate.is_some();
        }
        self.insert_pending(key, ChangeKind::Removed, reason, new, at, sampled);
    }

    fn on_added(&mut self, key: EndpointKey, new: &ServiceExpectation, at: Timestamp, out: &mut Vec<Outcome>) {
        if let Some(prev) = self.pending.remove(&key) {
            out.push(Outcome::Superseded {
                key: key.clone(),
                kind: prev.kind,
            });
            if prev.candidate.is_none() {
                // The removal never reached the kernel: nothing changes there, nothing to time.
                return;
            }
        }
        self.insert_pending(key, ChangeKind::Added, ChangeReason::Added, new, at, true);
    }

    fn insert_pending(
        &mut self,
        key: EndpointKey,
        kind: ChangeKind,
        reason: ChangeReason,
        new: &ServiceExpectation,
        at: Timestamp,
        sampled: bool,
    ) {
        let candidate = self.last_view.as_ref().and_then(|(view, meta)| {
            (view.routes(&key) == desired(kind)).then_some((meta.programmed_at, meta.error_bound))
        });
        let change = PendingChange {
            key: key.clone(),
            kind,
            reason,
            observed: at,
            trigger: new.trigger,
            resource_version: new.resource_version,
            state: PendingState::Pending,
            candidate,
            sampled,
            adopted: false,
        };
        self.pending.insert(key, change);
    }

    /// Folds a dataplane reading in and returns the changes it completed.
    pub fn apply_reading(&mut self, reading: &Reading) -> Vec<Outcome> {
        let meta = reading.meta;
        let full = !matches!(&reading.outcome, ReadingOutcome::Routed(v) if v.scope.is_some());
        if let (Some(after), ReadingOutcome::Routed(view), true) = (self.adopt_after, &reading.outcome, full) {
            // Only a clean read can adopt: what an unreadable family or a rule not understood
            // hides would never be adopted, and the tracker would settle without it.
            if meta.started >= after && view.is_clean() {
                self.adopt_after = None;
                self.adopt_unconverged(view, meta.started);
            }
        }
        let mut done = Vec::new();
        for change in self.pending.values_mut() {
            let routed = match &reading.outcome {
                ReadingOutcome::Routed(view) => view.routes(&change.key),
                ReadingOutcome::Failed { .. } => Routed::Unknown,
            };
            // A reading that began before the agent saw the change cannot confirm it: the kernel
            // may have routed the endpoint again after that reading's snapshot.
            let can_confirm = meta.started >= change.observed;
            if routed == Routed::NotRead {
                continue;
            }
            if routed == Routed::Unknown {
                change.candidate = None;
                if can_confirm && change.state != PendingState::TimedOut {
                    change.state = PendingState::Unknown;
                }
                continue;
            }
            if routed != desired(change.kind) {
                change.candidate = None;
                // Seen routed: the removal now has a real lag to measure.
                change.sampled |= change.kind == ChangeKind::Removed;
                if can_confirm && change.state == PendingState::Unknown {
                    change.state = PendingState::Pending;
                }
                continue;
            }
            let (at, bound) = *change.candidate.get_or_insert((meta.programmed_at, meta.error_bound));
            if can_confirm {
                done.push((change.key.clone(), at, bound));
            }
        }
        let mut outcomes = Vec::with_capacity(done.len());
        for (key, at, bound) in done {
            let Some(change) = self.pending.remove(&key) else {
                continue;
            };
            outcomes.push(finish(change, at, bound, meta.trigger));
        }
        match &reading.outcome {
            ReadingOutcome::Routed(view) if full => {
                self.stale = self.find_stale(view);
                self.stale_unknown = view.unclean_families();
                self.absent = [view.absent_v4, view.absent_v6];
                self.last_view = Some((LastView::of(view), meta));
            }
            // A targeted read is no picture of the whole node, and the last full one may now be
            // out of date for the ports it covered: no candidates from it any more. Its ports'
            // stale endpoints are what it saw.
            ReadingOutcome::Routed(view) => {
                if let Some(scope) = &view.scope {
                    self.stale.retain(|k| !scope.contains(&*k.port_name));
                    let mut seen = self.find_stale(view);
                    seen.retain(|k| scope.contains(&*k.port_name));
                    self.stale.extend(seen);
                    self.stale.sort();
                    self.stale.dedup();
                }
                let unclean = view.unclean_families();
                self.stale_unknown = [self.stale_unknown[0] || unclean[0], self.stale_unknown[1] || unclean[1]];
                self.absent = [self.absent[0] || view.absent_v4, self.absent[1] || view.absent_v6];
                self.last_view = None;
            }
            ReadingOutcome::Failed { .. } => {
                self.stale_unknown = [true, true];
                self.last_view = None;
            }
        }
        outcomes
    }

    /// The service ports all of whose frontends are in `read` (what a targeted read covered).
    pub fn ports_served_only_by(&self, read: &BTreeSet<String>) -> HashSet<ServicePortName> {
        self.services
            .values()
            .flat_map(|e| e.frontends.iter())
            .filter(|(_, _, fronts)| !fronts.is_empty() && fronts.iter().all(|f| read.contains(f)))
            .map(|(spn, _, _)| (**spn).clone())
            .collect()
    }

    /// The service ports with pending changes and their frontends, for targeted reads.
    pub fn pending_targets(&self) -> ReadTargets {
        let ports: BTreeSet<(ServicePortName, Protocol)> = self
            .pending
            .values()
            .map(|c| ((*c.key.port_name).clone(), c.key.protocol))
            .collect();
        let frontends = ports
            .iter()
            .filter_map(|(spn, proto)| self.services.get(&spn.service)?.frontends.get(spn, *proto))
            .flatten()
            .cloned()
            .collect();
        ReadTargets { frontends, ports }
    }

    /// Whether a pending change belongs to a service port whose frontends are not known (its
    /// Service was deleted, or has no address yet): a targeted read cannot find its rules, so
    /// only a full read can confirm it. Without one it would wait for the next periodic read.
    pub fn pending_without_frontends(&self) -> bool {
        self.pending.values().any(|c| {
            let spn = &*c.key.port_name;
            self.services
                .get(&spn.service)
                .and_then(|s| s.frontends.get(spn, c.key.protocol))
                .is_none_or(|f| f.is_empty())
        })
    }

    /// Marks changes pending longer than the timeout. They stay pending (a hold must keep
    /// waiting), and are reported once.
    pub fn expire(&mut self, now: Timestamp) -> Vec<Outcome> {
        let timeout = self.config.change_timeout;
        self.pending
            .values_mut()
            .filter(|c| c.state != PendingState::TimedOut && now.seconds_since(c.observed) > timeout.as_secs_f64())
            .map(|c| {
                c.state = PendingState::TimedOut;
                Outcome::TimedOut {
                    key: c.key.clone(),
                    kind: c.kind,
                    reason: c.reason,
                }
            })
            .collect()
    }

    pub fn pending(&self) -> impl Iterator<Item = &PendingChange> {
        self.pending.values()
    }

    pub fn pending_count(&self) -> usize {
        self.pending.len()
    }

    pub fn oldest_pending_age(&self, now: Timestamp) -> f64 {
        self.pending
            .values()
            .map(|c| now.seconds_since(c.observed))
            .fold(0.0, f64::max)
    }

    /// Routed endpoints of known Services that are neither expected nor pending removal.
    pub fn stale_endpoints(&self) -> usize {
        self.stale.len()
    }

    /// Families (v4, v6) whose stale endpoints the last reads could not establish (holds wait
    /// on addresses in them).
    pub fn stale_unknown(&self) -> [bool; 2] {
        [
            self.stale_unknown[0] || self.absent[0],
            self.stale_unknown[1] || self.absent[1],
        ]
    }

    /// Whether a full read could tell what the last reads could not (a failed, partial or not
    /// understood read; an absent family stays absent).
    pub fn wants_full_read(&self) -> bool {
        self.stale_unknown.contains(&true)
    }

    /// The stale endpoints: a hold waits on them as on pending removals.
    pub fn stale(&self) -> impl Iterator<Item = &EndpointKey> {
        self.stale.iter()
    }

    fn find_stale(&self, view: &RoutedView) -> Vec<EndpointKey> {
        if !self.synced {
            return Vec::new();
        }
        let mut stale: Vec<EndpointKey> = view
            .named
            .iter()
            .filter_map(|(spn, proto, addr)| {
                let exp = self.services.get(&spn.service)?;
                let key = EndpointKey::new(spn.clone(), *proto, *addr);
                (!exp.expected.contains(&key) && !self.pending.contains_key(&key)).then_some(key)
            })
            .collect();
        stale.sort();
        stale
    }
}

fn desired(kind: ChangeKind) -> Routed {
    match kind {
        ChangeKind::Removed => Routed::No,
        ChangeKind::Added => Routed::Yes,
    }
}

fn classify_removal(key: &EndpointKey, old: &ServiceExpectation, new: &ServiceExpectation) -> ChangeReason {
    if !new.service_exists {
        return ChangeReason::ServiceDeleted;
    }
    match new.conditions.get(&key.ip()) {
        Some(c) if c.terminating => ChangeReason::Deleted,
        Some(c) if !c.ready => ChangeReason::Unready,
        Some(_) => ChangeReason::Isolated,
        None if old.conditions.get(&key.ip()).is_some_and(|c| c.terminating) => ChangeReason::Deleted,
        None => ChangeReason::Isolated,
    }
}

fn finish(change: PendingChange, at: Timestamp, bound: Duration, read_trigger: ReadTrigger) -> Outcome {
    if !change.sampled || change.adopted {
        return Outcome::ConvergedUnsampled {
            key: change.key,
            kind: change.kind,
        };
    }
    let raw = at.seconds_since(change.observed);
    let end_to_end_raw = change.trigger.map(|t| (at.seconds_since(t.time), t.source));
    Outcome::Converged(LagSample {
        lag: raw.max(0.0),
        lag_clamped: raw < 0.0,
        end_to_end: end_to_end_raw.map(|(v, s)| (v.max(0.0), s)),
        end_to_end_clamped: end_to_end_raw.is_some_and(|(v, _)| v < 0.0),
        key: change.key,
        kind: change.kind,
        reason: change.reason,
        programmed_at: at,
        error_bound: bound,
        read_trigger,
        resource_version: change.resource_version,
        trigger: change.trigger,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::expected::builders::*;
    use crate::expected::{expect_service, SliceRecord};

    const NODE: &str = "node-a";

    fn t(ms: i64) -> Timestamp {
        Timestamp::from_millis(ms)
    }

    fn expectation(slices: &[SliceRecord]) -> (ServiceRef, ServiceExpectation) {
        let (r, spec) = svc("ns1/svc1");
        let refs: Vec<&SliceRecord> = slices.iter().collect();
        (r.clone(), expect_service(&r, Some(&spec), &refs, NODE))
    }

    fn key(ip: &str) -> EndpointKey {
        key_port(ip, "p80")
    }

    fn key_port(ip: &str, port: &str) -> EndpointKey {
        let addr: std::net::IpAddr = ip.parse().unwrap();
        EndpointKey::new(
            ServicePortName::new("ns1", "svc1", port),
            Protocol::Tcp,
            SocketAddr::new(addr, 80),
        )
    }

    fn view(keys: &[&EndpointKey]) -> RoutedView {
        RoutedView {
            named: keys
                .iter()
                .map(|k| (k.port_name.clone(), k.protocol, k.endpoint))
                .collect(),
            ..Default::default()
        }
    }

    fn reading(started_ms: i64, programmed_ms: i64, keys: &[&EndpointKey]) -> Reading {
        Reading {
            meta: ReadingMeta {
                started: t(started_ms),
                finished: t(started_ms + 1),
                programmed_at: t(programmed_ms),
                error_bound: Duration::ZERO,
                trigger: ReadTrigger::Event,
            },
            outcome: ReadingOutcome::Routed(view(keys)),
        }
    }

    fn failed(started_ms: i64) -> Reading {
        Reading {
            meta: ReadingMeta {
                started: t(started_ms),
                finished: t(started_ms + 1),
                programmed_at: t(started_ms),
                error_bound: Duration::ZERO,
                trigger: ReadTrigger::Poll,
            },
            outcome: ReadingOutcome::Failed { kind: "exec" },
        }
    }

    #[test]
    fn restart_adopts_what_the_kernel_has_not_caught_up_with_without_inventing_lag() {
        let mut tr = Tracker::new(TrackerConfig::default());
        // After the restart the API says .1 and .3; the kernel still routes .1 and .2.
        let (r, e) = expectation(&[slice("ns1/svc1").endpoint("10.180.0.1").endpoint("10.180.0.3").build()]);
        tr.update_service(&r, e, t(0));
        tr.mark_synced(t(10));
        assert!(tr
            .apply_reading(&reading(5, 5, &[&key("10.180.0.1"), &key("10.180.0.2")]))
            .is_empty());
        assert_eq!(tr.pending_count(), 0, "a reading from before the sync adopts nothing");
        assert!(tr
            .apply_reading(&reading(20, 20, &[&key("10.180.0.1"), &key("10.180.0.2")]))
            .is_empty());
        let mut got: Vec<_> = tr.pending().map(|p| (p.key.endpoint.to_string(), p.kind)).collect();
        got.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            got,
            [
                ("10.180.0.2:80".into(), ChangeKind::Removed),
                ("10.180.0.3:80".into(), ChangeKind::Added)
            ]
        );
        let out = tr.apply_reading(&reading(30, 30, &[&key("10.180.0.1"), &key("10.180.0.3")]));
        assert_eq!(out.len(), 2);
        assert!(
            out.iter().all(|o| matches!(o, Outcome::ConvergedUnsampled { .. })),
            "no lag is invented: {out:?}"
        );
    }

    /// Issue 15 item 5: a restart's adoption needs the whole picture. A reading with an
    /// unreadable family or rules it could not understand must not settle the tracker: what it
    /// could not see would never be adopted, and an empty pending list would read "converged".
    #[test]
    fn item5_restart_adoption_settles_only_on_a_clean_full_read() {
        let mut tr = Tracker::new(TrackerConfig::default());
        let (r, e) = expectation(&[slice("ns1/svc1").endpoint("10.180.0.1").build()]);
        tr.update_service(&r, e, t(0));
        tr.mark_synced(t(10));
        // The kernel routes .1 and (left over) .2, but the reader could not read the port's rules.
        let mut uncertain = reading(20, 20, &[&key("10.180.0.1")]);
        if let ReadingOutcome::Routed(v) = &mut uncertain.outcome {
            v.uncertain.insert((*key("10.180.0.2").port_name).clone());
        }
        tr.apply_reading(&uncertain);
        assert!(!tr.is_settled(), "a read with rules not understood settled the tracker");
        let mut half = reading(30, 30, &[&key("10.180.0.1")]);
        if let ReadingOutcome::Routed(v) = &mut half.outcome {
            v.unreadable_v6 = true;
        }
        tr.apply_reading(&half);
        assert!(!tr.is_settled(), "a read with an unreadable family settled the tracker");
        tr.apply_reading(&reading(40, 40, &[&key("10.180.0.1"), &key("10.180.0.2")]));
        assert!(tr.is_settled());
        let got: Vec<_> = tr.pending().map(|p| (p.key.endpoint.to_string(), p.kind)).collect();
        assert_eq!(got, [("10.180.0.2:80".to_string(), ChangeKind::Removed)]);
    }

    /// Issue 15 item 5: stale endpoints (routed, no longer expected, not pending) are listed,
    /// so a hold can wait on them.
    #[test]
    fn item5_stale_endpoints_are_listed_by_key() {
        let (mut tr, _) = steady();
        tr.apply_reading(&reading(
            100,
            100,
            &[&key("10.180.0.1"), &key("10.180.0.2"), &key("10.180.0.7")],
        ));
        let stale: Vec<String> = tr.stale().map(|k| k.endpoint.to_string()).collect();
        assert_eq!(stale, ["10.180.0.7:80"]);
    }

    /// A failed or partial read leaves the stale endpoints of what it could not see unknown,
    /// until a clean full read.
    #[test]
    fn stale_endpoints_are_unknown_after_a_failed_or_partial_read() {
        let (mut tr, _) = steady();
        assert_eq!(tr.stale_unknown(), [false, false]);
        tr.apply_reading(&failed(100));
        assert_eq!(tr.stale_unknown(), [true, true]);
        tr.apply_reading(&reading(200, 200, &[&key("10.180.0.1"), &key("10.180.0.2")]));
        assert_eq!(tr.stale_unknown(), [false, false]);
        let mut half = reading(300, 300, &[&key("10.180.0.1"), &key("10.180.0.2")]);
        if let ReadingOutcome::Routed(v) = &mut half.outcome {
            v.unreadable_v6 = true;
        }
        tr.apply_reading(&half);
        assert_eq!(tr.stale_unknown(), [false, true]);
        assert!(tr.wants_full_read());
        // A family without kube-proxy's rules: unknown for holds, but no full read would help.
        let mut absent = reading(400, 400, &[&key("10.180.0.1"), &key("10.180.0.2")]);
        if let ReadingOutcome::Routed(v) = &mut absent.outcome {
            v.absent_v6 = true;
        }
        tr.apply_reading(&absent);
        assert_eq!(tr.stale_unknown(), [false, true]);
        assert!(!tr.wants_full_read());
    }

    /// A synced tracker with 10.180.0.1 and 10.180.0.2 expected and routed.
    fn steady() -> (Tracker, ServiceRef) {
        let mut tr = Tracker::new(TrackerConfig::default());
        let (r, e) = expectation(&[slice("ns1/svc1").endpoint("10.180.0.1").endpoint("10.180.0.2").build()]);
        assert!(tr.update_service(&r, e, t(0)).is_empty());
        tr.mark_synced(t(0));
        assert!(tr
            .apply_reading(&reading(1, 1, &[&key("10.180.0.1"), &key("10.180.0.2")]))
            .is_empty());
        (tr, r)
    }

    fn samples(out: &[Outcome]) -> Vec<&LagSample> {
        out.iter()
            .filter_map(|o| match o {
                Outcome::Converged(s) => Some(s),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn deletion_is_tracked_until_the_kernel_drops_the_endpoint() {
        let (mut tr, r) = steady();
        let (_, e) = expectation(&[slice("ns1/svc1")
            .endpoint("10.180.0.1")
            .endpoint("10.180.0.2")
            .terminating()
            .trigger_ms(900)
            .build()]);
        assert!(tr.update_service(&r, e, t(1000)).is_empty());
        let p: Vec<_> = tr.pending().collect();
        assert_eq!(p.len(), 1);
        assert_eq!((p[0].kind, p[0].reason), (ChangeKind::Removed, ChangeReason::Deleted));
        // Still routed: safety rule, nothing converges.
        assert!(tr
            .apply_reading(&reading(1100, 1100, &[&key("10.180.0.1"), &key("10.180.0.2")]))
            .is_empty());
        assert_eq!(tr.pending_count(), 1);
        let out = tr.apply_reading(&reading(1500, 1400, &[&key("10.180.0.1")]));
        let s = samples(&out);
        assert_eq!(s.len(), 1);
        assert!((s[0].lag - 0.4).abs() < 1e-9);
        let (e2e, src) = s[0].end_to_end.unwrap();
        assert!((e2e - 0.5).abs() < 1e-9);
        assert_eq!(src, TriggerSource::LastChangeTriggerTime);
        assert_eq!(tr.pending_count(), 0);
    }

    #[test]
    fn label_change_is_isolated_and_unready_is_unready() {
        let (mut tr, r) = steady();
        let (_, e) = expectation(&[slice("ns1/svc1").endpoint("10.180.0.1").build()]);
        tr.update_service(&r, e, t(1000));
        assert_eq!(tr.pending().next().unwrap().reason, ChangeReason::Isolated);
        let (mut tr, r) = steady();
        let (_, e) = expectation(&[slice("ns1/svc1")
            .endpoint("10.180.0.1")
            .endpoint("10.180.0.2")
            .unready()
            .build()]);
        tr.update_service(&r, e, t(1000));
        assert_eq!(tr.pending().next().unwrap().reason, ChangeReason::Unready);
    }

    #[test]
    fn endpoint_vanishing_after_terminating_stays_a_deletion() {
        let (mut tr, r) = steady();
        let (_, e) = expectation(&[slice("ns1/svc1")
            .endpoint("10.180.0.1")
            .endpoint("10.180.0.2")
            .terminating()
            .build()]);
        tr.update_service(&r, e, t(1000));
        let (_, e) = expectation(&[slice("ns1/svc1").endpoint("10.180.0.1").build()]);
        tr.update_service(&r, e, t(2000));
        let p: Vec<_> = tr.pending().collect();
        assert_eq!(p.len(), 1, "the final removal from the slice is not a second change");
        assert_eq!((p[0].reason, p[0].observed), (ChangeReason::Deleted, t(1000)));
    }

    #[test]
    fn addition_converges_when_routed() {
        let (mut tr, r) = steady();
        let (_, e) = expectation(&[slice("ns1/svc1")
            .endpoint("10.180.0.1")
            .endpoint("10.180.0.2")
            .endpoint("10.180.0.3")
            .build()]);
        tr.update_service(&r, e, t(1000));
        let p = tr.pending().next().unwrap();
        assert_eq!((p.kind, p.reason), (ChangeKind::Added, ChangeReason::Added));
        let out = tr.apply_reading(&reading(
            1200,
            1150,
            &[&key("10.180.0.1"), &key("10.180.0.2"), &key("10.180.0.3")],
        ));
        let s = samples(&out);
        assert_eq!((s[0].kind, s[0].reason), (ChangeKind::Added, ChangeReason::Added));
        assert!((s[0].lag - 0.15).abs() < 1e-9);
    }

    #[test]
    fn flapping_removal_then_readd_before_convergence_records_nothing() {
        let (mut tr, r) = steady();
        let both = || expectation(&[slice("ns1/svc1").endpoint("10.180.0.1").endpoint("10.180.0.2").build()]).1;
        let (_, gone) = expectation(&[slice("ns1/svc1").endpoint("10.180.0.1").build()]);
        tr.update_service(&r, gone, t(1000));
        let out = tr.update_service(&r, both(), t(1100));
        assert!(matches!(
            &out[..],
            [Outcome::Superseded {
                kind: ChangeKind::Removed,
                ..
            }]
        ));
        assert_eq!(tr.pending_count(), 0, "the kernel never dropped it: nothing to measure");
        assert!(tr
            .apply_reading(&reading(1200, 1200, &[&key("10.180.0.1"), &key("10.180.0.2")]))
            .is_empty());
    }

    #[test]
    fn flapping_after_the_kernel_dropped_it_measures_the_readdition() {
        let (mut tr, r) = steady();
        let (_, gone) = expectation(&[slice("ns1/svc1").endpoint("10.180.0.1").build()]);
        tr.update_service(&r, gone, t(1000));
        // A reading that started before the change was observed shows it gone: not a confirmation.
        assert!(tr.apply_reading(&reading(990, 995, &[&key("10.180.0.1")])).is_empty());
        let (_, both) = expectation(&[slice("ns1/svc1").endpoint("10.180.0.1").endpoint("10.180.0.2").build()]);
        tr.update_service(&r, both, t(1100));
        let p = tr.pending().next().unwrap();
        assert_eq!(p.kind, ChangeKind::Added);
        let out = tr.apply_reading(&reading(1300, 1250, &[&key("10.180.0.1"), &key("10.180.0.2")]));
        assert!((samples(&out)[0].lag - 0.15).abs() < 1e-9);
    }

    #[test]
    fn addition_cancelled_before_programming_still_needs_a_confirming_read() {
        let (mut tr, r) = steady();
        let (_, three) = expectation(&[slice("ns1/svc1")
            .endpoint("10.180.0.1")
            .endpoint("10.180.0.2")
            .endpoint("10.180.0.3")
            .build()]);
        tr.update_service(&r, three, t(1000));
        let (_, two) = expectation(&[slice("ns1/svc1").endpoint("10.180.0.1").endpoint("10.180.0.2").build()]);
        tr.update_service(&r, two, t(1100));
        let p = tr.pending().next().unwrap();
        assert_eq!(
            p.kind,
            ChangeKind::Removed,
            "safety: the kernel may have added it meanwhile"
        );
        let k3 = key("10.180.0.3");
        assert!(tr
            .apply_reading(&reading(1200, 1200, &[&key("10.180.0.1"), &k3]))
            .is_empty());
        let out = tr.apply_reading(&reading(1300, 1300, &[&key("10.180.0.1")]));
        assert!(
            matches!(&out[..], [Outcome::Converged(_)]),
            "it was programmed once, so the removal is timed"
        );
    }

    #[test]
    fn terminating_fallback_keeps_last_endpoints_until_gone() {
        let mut tr = Tracker::new(TrackerConfig::default());
        let (r, e) = expectation(&[slice("ns1/svc1").endpoint("10.180.0.1").build()]);
        tr.update_service(&r, e, t(0));
        tr.mark_synced(t(0));
        // The only endpoint turns terminating: kube-proxy keeps it (fallback), so no change.
        let (_, e) = expectation(&[slice("ns1/svc1").endpoint("10.180.0.1").terminating().build()]);
        assert!(tr.update_service(&r, e, t(1000)).is_empty());
        assert_eq!(tr.pending_count(), 0);
        // A ready endpoint appears: the terminating one now leaves, as a deletion.
        let (_, e) = expectation(&[slice("ns1/svc1")
            .endpoint("10.180.0.1")
            .terminating()
            .endpoint("10.180.0.9")
            .build()]);
        tr.update_service(&r, e, t(2000));
        let mut kinds: Vec<_> = tr.pending().map(|p| (p.key.endpoint.to_string(), p.reason)).collect();
        kinds.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            kinds,
            [
                ("10.180.0.1:80".to_string(), ChangeReason::Deleted),
                ("10.180.0.9:80".to_string(), ChangeReason::Added)
            ]
        );
    }

    #[test]
    fn multi_slice_move_is_not_a_removal() {
        let mut tr = Tracker::new(TrackerConfig::default());
        let (r, e) = expectation(&[
            slice("ns1/svc1").endpoint("10.180.0.1").build(),
            slice("ns1/svc1").endpoint("10.180.0.2").build(),
        ]);
        tr.update_service(&r, e, t(0));
        tr.mark_synced(t(0));
        // 10.180.0.2 moves to the first slice; the second slice is emptied.
        let (_, e) = expectation(&[
            slice("ns1/svc1").endpoint("10.180.0.1").endpoint("10.180.0.2").build(),
            slice("ns1/svc1").build(),
        ]);
        assert!(tr.update_service(&r, e, t(1000)).is_empty());
        assert_eq!(tr.pending_count(), 0);
        // Transiently in both slices, one copy terminating: still one endpoint, still expected.
        let (_, e) = expectation(&[
            slice("ns1/svc1").endpoint("10.180.0.1").endpoint("10.180.0.2").build(),
            slice("ns1/svc1").endpoint("10.180.0.2").terminating().build(),
        ]);
        assert!(tr.update_service(&r, e, t(1100)).is_empty());
        assert_eq!(tr.pending_count(), 0);
    }

    #[test]
    fn service_deletion_removes_every_endpoint() {
        let (mut tr, r) = steady();
        let gone = expect_service(&r, None, &[], NODE);
        tr.update_service(&r, gone, t(1000));
        let reasons: Vec<_> = tr.pending().map(|p| p.reason).collect();
        assert_eq!(reasons, [ChangeReason::ServiceDeleted, ChangeReason::ServiceDeleted]);
        let out = tr.apply_reading(&reading(1100, 1050, &[]));
        assert_eq!(samples(&out).len(), 2);
        assert!(tr.service(&r).is_none());
    }

    /// Found by the real-cluster tier: a deleted Service's removals have no frontend for a
    /// targeted read, so in the event-driven modes they waited ~30 s for the periodic full read.
    #[test]
    fn a_deleted_services_pending_removals_ask_for_a_full_read() {
        let (mut tr, r) = steady();
        assert!(!tr.pending_without_frontends());
        let gone = expect_service(&r, None, &[], NODE);
        tr.update_service(&r, gone, t(1000));
        assert!(tr.pending_count() > 0);
        assert!(
            tr.pending_without_frontends(),
            "only a full read can confirm these removals"
        );
        tr.apply_reading(&reading(1100, 1050, &[]));
        assert_eq!(tr.pending_count(), 0);
        assert!(!tr.pending_without_frontends());
    }

    #[test]
    fn ipv6_and_dual_stack_keys_are_independent() {
        let mut tr = Tracker::new(TrackerConfig::default());
        let (r, e) = expectation(&[
            slice("ns1/svc1").endpoint("10.180.0.1").build(),
            slice("ns1/svc1").endpoint("fd00:10:180::1").build(),
        ]);
        tr.update_service(&r, e, t(0));
        tr.mark_synced(t(0));
        let (_, e) = expectation(&[
            slice("ns1/svc1").endpoint("10.180.0.1").build(),
            slice("ns1/svc1").build(),
        ]);
        tr.update_service(&r, e, t(1000));
        let p: Vec<_> = tr.pending().map(|p| p.key.endpoint.to_string()).collect();
        assert_eq!(p, ["[fd00:10:180::1]:80"]);
        // The IPv6 family could not be read: the IPv6 change is unknown, never converged.
        let mut v = view(&[&key("10.180.0.1")]);
        v.unreadable_v6 = true;
        let r6 = Reading {
            outcome: ReadingOutcome::Routed(v),
            ..reading(1100, 1100, &[])
        };
        assert!(tr.apply_reading(&r6).is_empty());
        assert_eq!(tr.pending().next().unwrap().state, PendingState::Unknown);
        assert_eq!(
            samples(&tr.apply_reading(&reading(1200, 1200, &[&key("10.180.0.1")]))).len(),
            1
        );
    }

    #[test]
    fn named_and_unnamed_ports_are_distinct_keys() {
        let mut tr = Tracker::new(TrackerConfig::default());
        let (r, mut spec) = svc("ns1/svc1");
        spec.ports[0].name = String::new();
        let s = slice("ns1/svc1")
            .port("", Protocol::Tcp, 80)
            .endpoint("10.180.0.1")
            .build();
        tr.update_service(&r, expect_service(&r, Some(&spec), &[&s], NODE), t(0));
        tr.mark_synced(t(0));
        let s = slice("ns1/svc1").port("", Protocol::Tcp, 80).build();
        tr.update_service(&r, expect_service(&r, Some(&spec), &[&s], NODE), t(1000));
        assert_eq!(tr.pending().next().unwrap().key.port_name.to_string(), "ns1/svc1");
        // A route under the named port does not keep the unnamed key pending.
        let out = tr.apply_reading(&reading(1100, 1100, &[&key_port("10.180.0.1", "p80")]));
        assert_eq!(samples(&out).len(), 1);
        assert_eq!(samples(&out)[0].key, key_port("10.180.0.1", ""));
    }

    #[test]
    fn relist_with_the_same_state_creates_nothing_and_a_diff_creates_exactly_it() {
        let (mut tr, r) = steady();
        let (_, same) = expectation(&[slice("ns1/svc1").endpoint("10.180.0.1").endpoint("10.180.0.2").build()]);
        assert!(tr.update_service(&r, same, t(5000)).is_empty());
        assert_eq!(tr.pending_count(), 0);
        // While the watch was down, .2 was removed and .3 added: the relist shows both once.
        let (_, diff) = expectation(&[slice("ns1/svc1").endpoint("10.180.0.1").endpoint("10.180.0.3").build()]);
        tr.update_service(&r, diff.clone(), t(6000));
        tr.update_service(&r, diff, t(6001));
        let mut got: Vec<_> = tr
            .pending()
            .map(|p| (p.key.endpoint.to_string(), p.kind, p.observed))
            .collect();
        got.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            got,
            [
                ("10.180.0.2:80".into(), ChangeKind::Removed, t(6000)),
                ("10.180.0.3:80".into(), ChangeKind::Added, t(6000))
            ]
        );
    }

    #[test]
    fn startup_with_rules_in_place_invents_no_lag() {
        let mut tr = Tracker::new(TrackerConfig::default());
        let (r, e) = expectation(&[slice("ns1/svc1").endpoint("10.180.0.1").build()]);
        tr.update_service(&r, e, t(0));
        assert!(tr.apply_reading(&reading(10, 10, &[&key("10.180.0.1")])).is_empty());
        tr.mark_synced(t(0));
        assert!(tr.apply_reading(&reading(20, 20, &[&key("10.180.0.1")])).is_empty());
        assert_eq!(tr.pending_count(), 0);
        assert_eq!(tr.stale_endpoints(), 0);
    }

    #[test]
    fn kube_proxy_faster_than_the_watch_gives_a_clamped_zero_lag() {
        let (mut tr, r) = steady();
        // The kernel dropped .2 at 900 and the agent read it at 950; the watch delivered at 1000.
        assert!(tr.apply_reading(&reading(950, 900, &[&key("10.180.0.1")])).is_empty());
        let (_, e) = expectation(&[slice("ns1/svc1").endpoint("10.180.0.1").trigger_ms(800).build()]);
        tr.update_service(&r, e, t(1000));
        let out = tr.apply_reading(&reading(1010, 900, &[&key("10.180.0.1")]));
        let s = samples(&out);
        assert_eq!(s[0].lag, 0.0);
        assert!(s[0].lag_clamped);
        assert!(
            (s[0].end_to_end.unwrap().0 - 0.1).abs() < 1e-9,
            "uses the earlier reading's time"
        );
    }

    #[test]
    fn clock_skew_on_end_to_end_lag_is_clamped_and_flagged() {
        let (mut tr, r) = steady();
        // The API server's clock is 5 s ahead of this node.
        let (_, e) = expectation(&[slice("ns1/svc1").endpoint("10.180.0.1").trigger_ms(6000).build()]);
        tr.update_service(&r, e, t(1000));
        let out = tr.apply_reading(&reading(1100, 1100, &[&key("10.180.0.1")]));
        let s = samples(&out);
        assert!((s[0].lag - 0.1).abs() < 1e-9);
        assert_eq!(s[0].end_to_end.unwrap().0, 0.0);
        assert!(s[0].end_to_end_clamped);
        assert!(!s[0].lag_clamped);
    }

    #[test]
    fn failed_or_uncertain_reads_make_changes_unknown_never_converged() {
        let (mut tr, r) = steady();
        let (_, e) = expectation(&[slice("ns1/svc1").endpoint("10.180.0.1").build()]);
        tr.update_service(&r, e, t(1000));
        assert!(tr.apply_reading(&failed(1100)).is_empty());
        assert_eq!(tr.pending().next().unwrap().state, PendingState::Unknown);
        let mut v = view(&[&key("10.180.0.1")]);
        v.uncertain.insert((*key("10.180.0.2").port_name).clone());
        let uncertain = Reading {
            outcome: ReadingOutcome::Routed(v),
            ..reading(1200, 1200, &[])
        };
        assert!(tr.apply_reading(&uncertain).is_empty());
        assert_eq!(tr.pending().next().unwrap().state, PendingState::Unknown);
        assert_eq!(
            samples(&tr.apply_reading(&reading(1300, 1300, &[&key("10.180.0.1")]))).len(),
            1
        );
    }

    #[test]
    fn unattributed_routes_keep_a_removal_pending() {
        let (mut tr, r) = steady();
        let (_, e) = expectation(&[slice("ns1/svc1").endpoint("10.180.0.1").build()]);
        tr.update_service(&r, e, t(1000));
        let mut v = view(&[&key("10.180.0.1")]);
        v.unattributed.insert((Protocol::Tcp, key("10.180.0.2").endpoint));
        let r1 = Reading {
            outcome: ReadingOutcome::Routed(v),
            ..reading(1100, 1100, &[])
        };
        assert!(tr.apply_reading(&r1).is_empty());
        assert_eq!(tr.pending_count(), 1);
    }

    #[test]
    fn timed_out_changes_stay_pending_and_are_reported_once() {
        let mut tr = Tracker::new(TrackerConfig {
            change_timeout: Duration::from_secs(10),
        });
        let (r, e) = expectation(&[slice("ns1/svc1").endpoint("10.180.0.1").build()]);
        tr.update_service(&r, e, t(0));
        tr.mark_synced(t(0));
        let (_, e) = expectation(&[]);
        tr.update_service(&r, e, t(1000));
        assert!(tr.expire(t(5000)).is_empty());
        assert_eq!(tr.expire(t(12_000)).len(), 1);
        assert!(tr.expire(t(13_000)).is_empty());
        assert_eq!(tr.pending().next().unwrap().state, PendingState::TimedOut);
        assert!((tr.oldest_pending_age(t(13_000)) - 12.0).abs() < 1e-9);
        assert_eq!(samples(&tr.apply_reading(&reading(14_000, 14_000, &[]))).len(), 1);
    }

    #[test]
    fn the_kept_fingerprints_answer_like_the_full_view() {
        let (a, b, c) = (key("10.180.0.1"), key("10.180.0.2"), key_port("10.180.0.3", "p81"));
        let v6 = key("fd00::1");
        let mut v = view(&[&a]);
        v.unattributed.insert((Protocol::Tcp, b.endpoint));
        v.uncertain.insert((*c.port_name).clone());
        v.unreadable_v6 = true;
        let other_proto = EndpointKey::new(a.port_name.clone(), Protocol::Udp, a.endpoint);
        let kept = LastView::of(&v);
        for k in [&a, &b, &c, &v6, &other_proto, &key("10.180.0.9")] {
            assert_eq!(kept.routes(k), v.routes(k), "{k}");
        }
        assert_eq!(kept.routes(&a), Routed::Yes);
        assert_eq!(kept.routes(&other_proto), Routed::No);
        assert_eq!(kept.routes(&c), Routed::Unknown);
        assert_eq!(kept.routes(&v6), Routed::Unknown);
    }

    #[test]
    fn the_frontends_generation_moves_with_frontends_not_with_endpoints() {
        let mut tr = Tracker::new(TrackerConfig::default());
        let (r, e) = expectation(&[slice("ns1/svc1").endpoint("10.180.0.1").build()]);
        tr.update_service(&r, e.clone(), t(0));
        let g0 = tr.frontends_generation();
        // Endpoint churn: same frontends.
        let (_, e2) = expectation(&[slice("ns1/svc1").endpoint("10.180.0.2").build()]);
        tr.update_service(&r, e2.clone(), t(1));
        assert_eq!(tr.frontends_generation(), g0);
        // A new frontend (say, an external IP) must rebuild what is derived from them.
        let mut e3 = e2.clone();
        let (spn, proto, fronts) = e3.frontends.iter().next().unwrap();
        let (spn, proto, mut fronts) = (spn.clone(), proto, fronts.to_vec());
        fronts.push("192.0.2.7:80".into());
        e3.frontends.insert(spn, proto, fronts);
        tr.update_service(&r, e3, t(2));
        let g1 = tr.frontends_generation();
        assert_ne!(g1, g0);
        // The Service and its slices are gone: forgotten, and its frontends with it.
        let gone = ServiceExpectation::default();
        tr.update_service(&r, gone, t(3));
        assert_ne!(tr.frontends_generation(), g1);
    }

    #[test]
    fn targeted_reads_only_speak_for_their_scope() {
        let (mut tr, r) = steady();
        let (_, e) = expectation(&[slice("ns1/svc1").endpoint("10.180.0.1").build()]);
        tr.update_service(&r, e, t(1000));
        assert_eq!(
            tr.pending_targets().frontends.into_iter().collect::<Vec<_>>(),
            ["172.30.0.41:80"]
        );
        let mut other = view(&[]);
        other.scope = Some([ServicePortName::new("ns9", "x", "p")].into());
        let r1 = Reading {
            outcome: ReadingOutcome::Routed(other),
            ..reading(1100, 1100, &[])
        };
        assert!(tr.apply_reading(&r1).is_empty(), "out of scope: not a confirmation");
        assert_eq!(
            tr.pending().next().unwrap().state,
            PendingState::Pending,
            "and not unknown either"
        );
        let mut scoped = view(&[&key("10.180.0.1")]);
        scoped.scope = Some([(*key("10.180.0.1").port_name).clone()].into());
        let r2 = Reading {
            outcome: ReadingOutcome::Routed(scoped),
            ..reading(1200, 1200, &[])
        };
        assert_eq!(samples(&tr.apply_reading(&r2)).len(), 1);
        assert_eq!(tr.stale_endpoints(), 0, "a targeted read leaves the stale count alone");
    }

    /// Found by review: a stray DNAT the last full read could not read may route the removed
    /// endpoint; a targeted read (which does not look there) must not confirm the removal.
    #[test]
    fn a_targeted_read_inherits_the_last_full_reads_unreadable_stray_rules() {
        let (mut tr, r) = steady();
        let (_, e) = expectation(&[slice("ns1/svc1").endpoint("10.180.0.1").build()]);
        tr.update_service(&r, e, t(1000));
        let targeted = |blind: bool| {
            let mut v = view(&[&key("10.180.0.1")]);
            v.scope = Some([(*key("10.180.0.1").port_name).clone()].into());
            v.inherit_from_last_full_read(blind);
            Reading {
                outcome: ReadingOutcome::Routed(v),
                ..reading(1100, 1100, &[])
            }
        };
        assert!(
            samples(&tr.apply_reading(&targeted(true))).is_empty(),
            "blind: nothing confirmed"
        );
        assert_eq!(tr.pending().next().unwrap().state, PendingState::Unknown);
        assert_eq!(samples(&tr.apply_reading(&targeted(false))).len(), 1);
    }

    #[test]
    fn stale_endpoints_are_counted_after_sync() {
        let (mut tr, _) = steady();
        tr.apply_reading(&reading(
            100,
            100,
            &[&key("10.180.0.1"), &key("10.180.0.2"), &key("10.180.0.7")],
        ));
        assert_eq!(tr.stale_endpoints(), 1);
    }
}
