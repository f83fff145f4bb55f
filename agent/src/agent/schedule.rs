//! The read scheduler: when to read the dataplane, how much of it, and what a reading's time
//! means. It owns every piece of the loop's timing state (the last full read and its cost,
//! the generations announced by nf_tables notifications, the notification thread, the mode
//! re-detection timer) and learns what to read from the core through one `watch` channel
//! carrying the [`ReadPlan`]. It sends each reading to the core as an [`Input`].

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

use super::{AgentConfig, Input};
use crate::admin::Health;
use crate::dataplane::nfnotify::{self, GenerationProbe, Notification};
use crate::dataplane::{self, ChangeSource, DataplaneReader, Mode, ReadError, ReadTargets};
use crate::model::Timestamp;
use crate::tracker::{ReadTrigger, ReadingMeta};

/// What the core wants read, as of its last input.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct ReadPlan {
    /// Changes waiting for the kernel: the scheduler polls at the poll interval while any are.
    pub pending: usize,
    /// The service ports with pending changes, for targeted reads.
    pub targets: ReadTargets,
    /// A full read is wanted: the tracker waits for one to settle (after the initial lists), or
    /// for one to tell which endpoints are stale, or a pending change has no frontend a targeted
    /// read could find.
    pub full_wanted: bool,
    /// Raised when new changes are pending: the scheduler reads right away, not at its timer.
    pub wake: u64,
}

/// A reading whose nf_tables generation moved while it was taken may mix two rulesets (a rule
/// dump from one, a set dump from the next, where anonymous set names are reused). It is read
/// again at once, up to this many times in a row; then it is reported as failed (pending
/// changes become unknown), never applied.
const TORN_READ_RETRIES: u32 = 3;

/// What to do with a reading, given the generation before and after it.
#[derive(Debug, PartialEq, Eq)]
enum Consistency {
    /// One generation (or no generation to compare: polled readers): apply it.
    Apply,
    /// The ruleset moved during the read, or a generation could not be read: read again at
    /// once.
    Retry,
    /// It kept moving: report the reading as failed.
    Fail { before: u32, after: u32 },
    /// A generation kept being unreadable: report the reading as failed.
    Unchecked,
}

/// `checked`: the reader's reads are many nf_tables requests (nftables, iptables-nft), so a
/// reading counts only with the same generation read before and after it; a missing one (the
/// probe failed or could not be opened) is no proof that nothing changed.
fn consistency(g1: Option<u32>, g2: Option<u32>, torn_in_a_row: u32, checked: bool) -> Consistency {
    let retry = torn_in_a_row + 1 < TORN_READ_RETRIES;
    match (g1, g2) {
        (Some(a), Some(b)) if a == b => Consistency::Apply,
        (Some(_), Some(_)) if retry => Consistency::Retry,
        (Some(before), Some(after)) => Consistency::Fail { before, after },
        _ if !checked => Consistency::Apply,
        _ if retry => Consistency::Retry,
        _ => Consistency::Unchecked,
    }
}

/// Whether `--mode auto` should look at the kernel again: once per resync interval, whatever
/// triggers the reads.
fn redetect_due(mode: Option<Mode>, since_last: Duration, resync: Duration) -> bool {
    mode.is_none() && since_last >= resync
}

pub(super) struct ReadScheduler {
    config: AgentConfig,
    tx: mpsc::Sender<Input>,
    plan: watch::Receiver<ReadPlan>,
    health: Arc<Health>,
    reader: Option<Box<dyn DataplaneReader>>,
    probe: Option<GenerationProbe>,
    notifications: mpsc::UnboundedReceiver<Notification>,
    notification_tx: mpsc::UnboundedSender<Notification>,
    listener: Listener,
    /// Generations announced by notifications, with when (the last 256).
    seen: VecDeque<(u32, Timestamp)>,
    /// Notifications were lost since the last read: the generations seen are incomplete.
    overrun: bool,
    last_full: Instant,
    last_full_cost: Duration,
    prev_started: Option<Timestamp>,
    trigger: ReadTrigger,
    last_detect: Instant,
    /// The plan's `wake` the scheduler has acted on.
    woken: u64,
    torn_in_a_row: u32,
}

impl ReadScheduler {
    pub(super) fn new(
        config: AgentConfig,
        tx: mpsc::Sender<Input>,
        plan: watch::Receiver<ReadPlan>,
        health: Arc<Health>,
    ) -> Self {
        let (notification_tx, notifications) = mpsc::unbounded_channel();
        Self {
            listener: Listener::new(config.resync_interval),
            config,
            tx,
            plan,
            health,
            reader: None,
            probe: None,
            notifications,
            notification_tx,
            seen: VecDeque::new(),
            overrun: false,
            last_full: Instant::now(),
            last_full_cost: Duration::ZERO,
            prev_started: None,
            trigger: ReadTrigger::Initial,
            last_detect: Instant::now(),
            woken: 0,
            torn_in_a_row: 0,
        }
    }

    /// Reads the dataplane on kernel notifications, on new pending changes and on a timer,
    /// until the core is gone.
    pub(super) async fn run(mut self) -> anyhow::Result<()> {
        loop {
            self.health.beat();
            if self.reader.is_none() && !self.open_reader().await? {
                return Ok(());
            }
            self.ensure_events();
            if self.mode_changed().await? {
                self.reader = None;
                continue;
            }
            match self.read_once().await? {
                Next::Stop => return Ok(()),
                Next::ReadAgain => continue,
                Next::Wait => {}
            }
            self.trigger = self.wait_for_trigger().await;
        }
    }

    /// Opens the reader; a failure is reported to the core (pending changes stay unknown).
    /// False when the core is gone.
    async fn open_reader(&mut self) -> anyhow::Result<bool> {
        let (mode, backend, netns) = (self.config.mode, self.config.backend, self.config.netns.clone());
        let opened = tokio::task::spawn_blocking(move || dataplane::open_reader(mode, backend, &netns)).await?;
        match opened {
            Ok(r) => {
                tracing::info!(mode = %r.mode(), backend = r.backend(), "dataplane reader ready");
                self.reader = Some(r);
                Ok(true)
            }
            Err(e) => {
                tracing::warn!(error = %e, "no dataplane reader; pending changes stay unknown");
                let now = Timestamp::now();
                let meta = ReadingMeta {
                    started: now,
                    finished: now,
                    programmed_at: now,
                    error_bound: Duration::ZERO,
                    trigger: self.trigger,
                };
                Ok(self.tx.send(Input::ReaderUnavailable(e, meta)).await.is_ok())
            }
        }
    }

    /// An event-driven reader needs the notification thread and the generation probe; both
    /// are (re)opened whenever missing, after a reader rebuild too. While the thread is down
    /// the scheduler polls (`listening` is false).
    fn ensure_events(&mut self) {
        if self
            .reader
            .as_ref()
            .is_some_and(|r| r.change_source() == ChangeSource::NfTablesEvents)
        {
            let (netns, ntx) = (&self.config.netns, &self.notification_tx);
            self.listener
                .ensure(Instant::now(), || nfnotify::spawn_listener(netns, ntx.clone()));
            if self.probe.is_none() {
                self.probe = GenerationProbe::open(&self.config.netns)
                    .map_err(|e| tracing::warn!(error = %e, "cannot query the nf_tables generation"))
                    .ok();
            }
        }
    }

    /// With --mode auto, the mode is re-checked once per resync interval, on its own timer (a
    /// steady stream of nf_tables events must not keep it from running): kube-proxy may have
    /// been reconfigured (it cleans up the old mode's rules when it starts in the new one).
    async fn mode_changed(&mut self) -> anyhow::Result<bool> {
        if !redetect_due(
            self.config.mode,
            self.last_detect.elapsed(),
            self.config.resync_interval,
        ) {
            return Ok(false);
        }
        self.last_detect = Instant::now();
        let Some(current) = self.reader.as_ref().map(|r| r.mode()) else {
            return Ok(false);
        };
        let netns = self.config.netns.clone();
        let detected = tokio::task::spawn_blocking(move || dataplane::detect_mode(&netns)).await?;
        match detected.filter(|(m, _)| *m != current) {
            Some((mode, _)) => {
                tracing::warn!(from = %current, to = %mode, "kube-proxy's mode changed; switching readers");
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// One read, if one is due, sent to the core.
    async fn read_once(&mut self) -> anyhow::Result<Next> {
        let Some(mut r) = self.reader.take() else {
            return Ok(Next::Wait);
        };
        let listening = self.listener.listening();
        let events = listening && r.change_source() == ChangeSource::NfTablesEvents;
        let plan = {
            let plan = self.plan.borrow_and_update();
            self.woken = plan.wake;
            plan.clone()
        };
        // Between full reads, read only the service ports with pending changes where the reader
        // can (IPVS, nftables); a full read is due every `full_interval`, which grows with the
        // cost of a full read so a large dataplane stays cheap to watch.
        let full_interval = self.config.resync_interval.max(self.last_full_cost * 100);
        let full_due =
            self.last_full.elapsed() >= full_interval || self.trigger == ReadTrigger::Initial || plan.full_wanted;
        if !full_due && plan.targets.is_empty() && r.can_read_targeted() {
            // Nothing pending (a kernel change, or a timer): nothing to confirm until the next
            // full read.
            self.reader = Some(r);
            return Ok(Next::Wait);
        }
        let targets = if full_due { ReadTargets::default() } else { plan.targets };
        let mut p = self.probe.take();
        let started = Timestamp::now();
        let clock = Instant::now();
        let (r_back, p_back, g1, (result, full), g2) = tokio::task::spawn_blocking(move || {
            let g1 = p.as_mut().and_then(|p| p.current().ok());
            // A reader with no targeted form (iptables-legacy) reads in full: that read counts
            // as the full read it is, for its cost and for the next one's schedule.
            let result = match targets.is_empty() {
                true => (r.read(), true),
                false => match r.read_targeted(&targets) {
                    Some(read) => (read, false),
                    None => (r.read(), true),
                },
            };
            let g2 = p.as_mut().and_then(|p| p.current().ok());
            (r, p, g1, result, g2)
        })
        .await?;
        let elapsed = clock.elapsed();
        if full {
            self.last_full = Instant::now();
            self.last_full_cost = elapsed;
        }
        let finished = Timestamp::now();
        // Notifications that arrived during the read: if any announces a generation other than
        // the one read, the state moved on and must be read again right away.
        let mut moved_on = false;
        while let Ok(n) = self.notifications.try_recv() {
            moved_on |= !matches!(n, Notification::Generation(g) if Some(g.generation) == g2 && g1 == g2);
            note(&mut self.seen, &mut self.overrun, n);
        }
        let checked = r_back.change_source() == ChangeSource::NfTablesEvents;
        let result = match consistency(g1, g2, self.torn_in_a_row, checked) {
            Consistency::Apply => {
                self.torn_in_a_row = 0;
                result
            }
            Consistency::Retry => {
                self.torn_in_a_row += 1;
                tracing::debug!(?g1, ?g2, "the ruleset changed during the read; reading again");
                self.reader = Some(r_back);
                self.probe = p_back;
                self.trigger = ReadTrigger::Event;
                return Ok(Next::ReadAgain);
            }
            Consistency::Fail { before, after } => {
                self.torn_in_a_row = 0;
                Err(ReadError::GenerationChanged { before, after })
            }
            Consistency::Unchecked => {
                self.torn_in_a_row = 0;
                Err(ReadError::GenerationUnreadable)
            }
        };
        let window = self.prev_started.map_or(Duration::ZERO, |p| {
            Duration::from_secs_f64(finished.seconds_since(p).max(0.0))
        });
        // The state seen took effect when its generation was announced; when that is not known
        // for sure, the read's end is a safe upper bound.
        let (programmed_at, error_bound) = match (events, g1, g2) {
            (true, Some(a), Some(b)) if a == b && !self.overrun => self
                .seen
                .iter()
                .find(|(g, _)| *g == b)
                .map_or((finished, window), |(_, at)| (*at, Duration::ZERO)),
            _ => (finished, window),
        };
        self.overrun = false;
        self.prev_started = Some(started);
        let meta = ReadingMeta {
            started,
            finished,
            programmed_at,
            error_bound,
            trigger: self.trigger,
        };
        let (mode, backend) = (r_back.mode(), r_back.backend().to_string());
        // Rules gone altogether (kube-proxy stopped, or moved to another mode): open afresh.
        let rebuild = matches!(&result, Err(ReadError::RulesNotFound { .. }));
        if let Err(e) = &result {
            tracing::debug!(error = %e, "dataplane read failed");
        }
        let sent = self.tx.send(Input::Reading {
            mode,
            backend,
            result,
            meta,
            took: elapsed,
        });
        if sent.await.is_err() {
            return Ok(Next::Stop);
        }
        if !rebuild {
            self.reader = Some(r_back);
            self.probe = p_back;
        }
        if moved_on {
            self.trigger = ReadTrigger::Event;
            return Ok(Next::ReadAgain);
        }
        Ok(Next::Wait)
    }

    /// Waits for the next reason to read: a kernel notification, new pending changes (the
    /// plan's `wake` raised), or the timer.
    async fn wait_for_trigger(&mut self) -> ReadTrigger {
        let wait = poll_period(
            self.config.poll_interval,
            self.config.resync_interval,
            self.reader.as_ref().map(|r| (r.change_source(), r.can_read_targeted())),
            self.listener.listening(),
            self.plan.borrow().pending > 0,
            self.last_full_cost,
        );
        let woken = self.woken;
        tokio::select! {
            Some(n) = self.notifications.recv() => {
                note(&mut self.seen, &mut self.overrun, n);
                ReadTrigger::Event
            }
            Ok(_) = self.plan.wait_for(|p| p.wake > woken) => ReadTrigger::Pending,
            _ = tokio::time::sleep(wait) => ReadTrigger::Poll,
        }
    }
}

enum Next {
    /// The core is gone.
    Stop,
    /// Read again at once (the ruleset moved during the read).
    ReadAgain,
    /// Wait for the next trigger.
    Wait,
}

/// Keeps the nf_tables notification thread running: when it stops (its socket failed), the
/// loop polls, and the thread is started again after a backoff (1 s, doubling up to `max`).
struct Listener {
    handle: Option<std::thread::JoinHandle<()>>,
    /// No start before this (after a stop or a failed start).
    retry_at: Option<Instant>,
    backoff: Duration,
    max: Duration,
}

impl Listener {
    fn new(max: Duration) -> Self {
        Self {
            handle: None,
            retry_at: None,
            backoff: Duration::from_secs(1),
            max: max.max(Duration::from_secs(1)),
        }
    }

    /// Whether the thread is running now.
    fn listening(&self) -> bool {
        self.handle.as_ref().is_some_and(|h| !h.is_finished())
    }

    /// Starts the thread if it is not running and its retry time has come.
    fn ensure(&mut self, now: Instant, spawn: impl FnOnce() -> std::io::Result<std::thread::JoinHandle<()>>) {
        if self.listening() {
            return;
        }
        if self.handle.take().is_some() {
            tracing::warn!(retry_in = ?self.backoff, "the nf_tables notification thread stopped; polling until it restarts");
            self.retry_at = Some(now + self.backoff);
            self.backoff = (self.backoff * 2).min(self.max);
            return;
        }
        if self.retry_at.is_some_and(|at| now < at) {
            return;
        }
        match spawn() {
            Ok(h) => {
                self.handle = Some(h);
                self.backoff = Duration::from_secs(1);
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?self.backoff, "cannot subscribe to nf_tables notifications; polling instead");
                self.retry_at = Some(now + self.backoff);
                self.backoff = (self.backoff * 2).min(self.max);
            }
        }
    }
}

/// How long to wait for a trigger before polling. `reader` is the reader's change source and
/// whether it can read only the pending service ports.
///
/// While changes are pending, a reader that can only read in full (iptables-legacy: the
/// kernel hands its table over whole) waits at least twice its last full read between polls,
/// so a large table costs at most a third of a core instead of a busy one (2.5 s reads at 30k
/// Services). Its measurement stays an upper bound: the poll window is the error bound.
fn poll_period(
    poll: Duration,
    resync: Duration,
    reader: Option<(ChangeSource, bool)>,
    listening: bool,
    pending: bool,
    last_full_cost: Duration,
) -> Duration {
    match reader {
        Some((ChangeSource::NfTablesEvents, _)) if listening => resync,
        Some(_) if !pending => resync,
        Some((_, true)) => poll,
        Some((_, false)) => poll.max(last_full_cost * 2),
        None => poll.max(Duration::from_secs(5)),
    }
}

fn note(seen: &mut VecDeque<(u32, Timestamp)>, overrun: &mut bool, n: Notification) {
    match n {
        Notification::Generation(g) => {
            if !seen.iter().any(|(s, _)| *s == g.generation) {
                seen.push_back((g.generation, g.at));
                if seen.len() > 256 {
                    seen.pop_front();
                }
            }
        }
        Notification::Overrun(_) => *overrun = true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reading across two nf_tables generations is never applied: read again, and after
    /// TORN_READ_RETRIES in a row, reported failed (unknown), never "not routed".
    #[test]
    fn a_reading_across_two_generations_is_never_applied() {
        assert_eq!(consistency(Some(7), Some(7), 0, true), Consistency::Apply);
        assert_eq!(
            consistency(None, None, 0, false),
            Consistency::Apply,
            "polled readers have no generation"
        );
        assert_eq!(consistency(Some(7), Some(8), 0, true), Consistency::Retry);
        assert_eq!(consistency(Some(7), Some(8), 1, true), Consistency::Retry);
        assert_eq!(
            consistency(Some(7), Some(8), TORN_READ_RETRIES - 1, true),
            Consistency::Fail { before: 7, after: 8 }
        );
    }

    /// An nf_tables reading whose generation could not be read before or after it (the probe
    /// failed, or never opened) cannot be checked for a concurrent change: read again, then
    /// reported failed (unknown), never applied. (Found by review: it was applied.)
    #[test]
    fn a_reading_without_both_generations_is_not_applied() {
        for (g1, g2) in [(Some(7), None), (None, Some(8)), (None, None)] {
            assert_eq!(consistency(g1, g2, 0, true), Consistency::Retry, "{g1:?} {g2:?}");
            assert_eq!(
                consistency(g1, g2, TORN_READ_RETRIES - 1, true),
                Consistency::Unchecked,
                "{g1:?} {g2:?}"
            );
        }
    }

    /// Supervision: a notification thread that stops is noticed (the loop polls meanwhile) and
    /// started again after a backoff that doubles up to the resync interval; a failed start too.
    #[test]
    fn the_notification_thread_is_restarted_with_backoff() {
        let mut l = Listener::new(Duration::from_secs(4));
        let t0 = Instant::now();
        let quick = || Ok(std::thread::spawn(|| {}));
        l.ensure(t0, quick);
        let h = l.handle.as_ref().expect("started");
        while !h.is_finished() {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(!l.listening(), "a stopped thread is not listening: the loop polls");
        l.ensure(t0, || panic!("noticed, not restarted at once"));
        l.ensure(t0 + Duration::from_millis(500), || panic!("not before the backoff"));
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        l.ensure(t0 + Duration::from_secs(1), move || {
            Ok(std::thread::spawn(move || {
                let _ = rx.recv();
            }))
        });
        assert!(l.listening(), "restarted after 1 s");
        drop(tx);
        // A failing start backs off 1 s, 2 s, 4 s, then stays at the bound.
        let mut l = Listener::new(Duration::from_secs(4));
        let fail = || Err(std::io::Error::other("no netlink"));
        let mut at = t0;
        for expected in [1, 2, 4, 4] {
            l.ensure(at, fail);
            assert_eq!(l.retry_at.unwrap() - at, Duration::from_secs(expected));
            l.ensure(at + Duration::from_secs(expected) - Duration::from_millis(1), || {
                panic!("too early")
            });
            at += Duration::from_secs(expected);
        }
    }

    /// Issue 15 item 6: re-detection ran only on poll-triggered reads, so a steady stream of
    /// nf_tables events kept it from ever running. It now has its own timer.
    #[test]
    fn item6_mode_redetection_runs_on_its_own_timer() {
        let resync = Duration::from_secs(30);
        assert!(redetect_due(None, Duration::from_secs(31), resync));
        assert!(!redetect_due(None, Duration::from_secs(5), resync));
        assert!(
            !redetect_due(Some(Mode::Nftables), Duration::from_secs(600), resync),
            "a given mode is not re-detected"
        );
    }

    #[test]
    fn polled_full_reads_leave_the_core_idle_two_thirds_of_the_time() {
        let (poll, resync) = (Duration::from_secs(1), Duration::from_secs(30));
        let legacy = Some((ChangeSource::Poll, false));
        let ipvs = Some((ChangeSource::Poll, true));
        let cheap = Duration::from_millis(3);
        let costly = Duration::from_millis(2500);
        // iptables-legacy at 30k Services: a 2.5 s read is followed by 5 s of rest.
        assert_eq!(poll_period(poll, resync, legacy, false, true, costly), costly * 2);
        assert_eq!(poll_period(poll, resync, legacy, false, true, cheap), poll);
        // Targeted polls (IPVS) stay at the poll interval whatever a full read costs.
        assert_eq!(poll_period(poll, resync, ipvs, false, true, costly), poll);
        // Nothing pending: resync; notifications: resync; no reader yet: retry within 5 s.
        assert_eq!(poll_period(poll, resync, legacy, false, false, costly), resync);
        let events = Some((ChangeSource::NfTablesEvents, true));
        assert_eq!(poll_period(poll, resync, events, true, true, cheap), resync);
        assert_eq!(poll_period(poll, resync, events, false, true, cheap), poll);
        assert_eq!(
            poll_period(poll, resync, None, false, true, cheap),
            Duration::from_secs(5)
        );
    }
}
