//! Leader election over a `coordination.k8s.io/v1` Lease, as client-go's
//! `leaderelection` does it: the leader renews the Lease every retry period;
//! another agent takes it over when the Lease record has not changed for
//! `leaseDurationSeconds` *by its own clock* (the time it first saw that
//! record, not the `renewTime` written by another machine, so clock skew
//! does not matter), or at once when the holder released it. Every write is
//! a create or an update with the `resourceVersion` read, so of two agents
//! racing for the Lease exactly one wins (the other gets 409 Conflict).
//!
//! [`Elector`] is the decision, pure; [`LeaderElector`] does the I/O (verbs
//! `get`, `create` and `update` on the one Lease, nothing else).

use std::{future::Future, time::Duration};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::{SignedDuration, Timestamp},
};
use kube::{Api, Client};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::reconcile::post_params;

/// The Lease the agents share (in the agents' namespace).
pub const DEFAULT_LEASE_NAME: &str = "loxilb-agent";

/// The Lease's duration to the millisecond, written by the holder next to
/// `leaseDurationSeconds` (whole seconds, rounded up, what other readers
/// go by): with a sub-second `--leaseDuration` the agents' expiry is the
/// exact one.
pub const DURATION_MS_ANNOTATION: &str = "loxilb.io/lease-duration-ms";

pub const DEFAULT_LEASE_DURATION: Duration = Duration::from_secs(4);
pub const DEFAULT_RENEW_DEADLINE: Duration = Duration::from_secs(3);
pub const DEFAULT_RETRY_PERIOD: Duration = Duration::from_secs(1);

/// Who competes for which Lease, and how fast.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// This agent's identity (unique per agent: the pod name).
    pub identity: String,
    /// How long a Lease record stays valid without renewal.
    pub lease_duration: Duration,
    /// A leader that could not renew for this long steps down (shorter
    /// than `lease_duration`, so it stops before anyone takes over).
    pub renew_deadline: Duration,
    /// How often to try to acquire or renew.
    pub retry_period: Duration,
}

impl LeaseConfig {
    /// Defaults: a 4 s lease, renewed every 1 s, given up after 3 s
    /// without a renewal; so a killed leader is replaced within 5 s (lease
    /// duration + one retry period: the followers see the last renewal
    /// within a period and take over at the first poll after it expired).
    /// client-go's defaults (15/10/2 s) took 17 s. Set by
    /// `--leaseDuration`, `--leaseRenewDeadline`, `--leaseRetryPeriod`.
    pub fn new(namespace: impl Into<String>, identity: impl Into<String>) -> Self {
        LeaseConfig {
            namespace: namespace.into(),
            name: DEFAULT_LEASE_NAME.into(),
            identity: identity.into(),
            lease_duration: DEFAULT_LEASE_DURATION,
            renew_deadline: DEFAULT_RENEW_DEADLINE,
            retry_period: DEFAULT_RETRY_PERIOD,
        }
    }

    /// (lease duration, renew deadline, retry period).
    pub fn timings(&self) -> (Duration, Duration, Duration) {
        (self.lease_duration, self.renew_deadline, self.retry_period)
    }

    fn duration_secs(&self) -> i32 {
        // The Lease holds whole seconds: round up.
        let secs = self.lease_duration.as_secs_f64().ceil() as u64;
        i32::try_from(secs.max(1)).unwrap_or(i32::MAX)
    }
}

/// What to do with the Lease.
#[derive(Clone, Debug, PartialEq)]
pub enum LeaseAction {
    /// There is none: create it, held by us.
    Create(Lease),
    /// Write it (with the `resourceVersion` read): renew our own
    /// (`takeover == false`), or take over one expired or released.
    Update { lease: Lease, takeover: bool },
    /// Someone else holds it and it has not expired.
    Wait { holder: String },
}

/// The election's decisions and what it has observed.
#[derive(Clone, Debug)]
pub struct Elector {
    config: LeaseConfig,
    /// The last Lease record seen and when (our clock) it was first seen.
    observed: Option<(LeaseSpec, Timestamp)>,
    /// A holder found dead (its identity, when we were told): its Lease
    /// is taken over at once rather than after it expires.
    dead: Option<(String, Timestamp)>,
    /// How long the Lease must have been free (missing, released, expired
    /// or its holder dead) before we take it: owner groups spread over the
    /// agents by having an agent that holds more wait longer.
    acquire_delay: Duration,
    /// Since when (our clock) we have seen it free.
    free_since: Option<Timestamp>,
    /// After we gave it up for another agent to take: not before then.
    not_before: Option<Timestamp>,
}

fn holder(spec: &LeaseSpec) -> Option<&str> {
    spec.holder_identity.as_deref().filter(|h| !h.is_empty())
}

/// How long the Lease record stays valid: our annotation's milliseconds
/// when a holder of ours wrote it, else `leaseDurationSeconds`; `None`
/// when it says neither (our own configured duration then).
fn duration_of(lease: &Lease, spec: &LeaseSpec) -> Option<Duration> {
    let ms = lease
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(DURATION_MS_ANNOTATION))
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|&ms| ms > 0);
    match ms {
        Some(ms) => Some(Duration::from_millis(ms)),
        None => spec
            .lease_duration_seconds
            .filter(|&s| s > 0)
            .map(|s| Duration::from_secs(s as u64)),
    }
}

/// How long a round of the election may take: a leader's ends at its
/// renew deadline (counted from the start of its last successful round),
/// so it steps down on time even when the API server hangs; a follower's
/// is the renew deadline.
pub fn round_budget(
    leading: bool,
    last_renew: Option<tokio::time::Instant>,
    now: tokio::time::Instant,
    renew_deadline: Duration,
) -> Duration {
    match (leading, last_renew) {
        (true, Some(t)) => (t + renew_deadline)
            .saturating_duration_since(now)
            .min(renew_deadline),
        (true, None) => Duration::ZERO,
        (false, _) => renew_deadline,
    }
}

impl Elector {
    pub fn new(config: LeaseConfig) -> Self {
        Elector {
            config,
            observed: None,
            dead: None,
            acquire_delay: Duration::ZERO,
            free_since: None,
            not_before: None,
        }
    }

    /// Leave the Lease to the others until `until` (we gave it up so that
    /// another agent takes it).
    pub fn hold_off(&mut self, until: Timestamp) {
        self.not_before = Some(until);
    }

    /// Take a free Lease only once it has been free for `delay` (see
    /// `acquire_delay`); zero: at once.
    pub fn set_acquire_delay(&mut self, delay: Duration) {
        self.acquire_delay = delay;
    }

    /// The Lease is free at `now`: whether to hold back (waiting out the
    /// acquire delay). A Lease whose holder was found `dead` is taken
    /// without the delay: the delay spreads owner groups over live agents,
    /// and the one that finds an owner dead should take its VIPs at once
    /// (rebalancing moves them on later if it then holds too many).
    fn hold_back(&mut self, now: Timestamp, dead: bool) -> bool {
        if self.not_before.is_some_and(|t| now < t) {
            return true;
        }
        if dead || self.acquire_delay.is_zero() {
            return false;
        }
        let since = *self.free_since.get_or_insert(now);
        let d = SignedDuration::try_from(self.acquire_delay).unwrap_or(SignedDuration::MAX);
        since.checked_add(d).is_ok_and(|end| now < end)
    }

    pub fn config(&self) -> &LeaseConfig {
        &self.config
    }

    /// Remember `spec` as seen at `now` unless it is the record already seen.
    fn observe(&mut self, spec: &LeaseSpec, now: Timestamp) {
        if self.observed.as_ref().map(|(s, _)| s) != Some(spec) {
            self.observed = Some((spec.clone(), now));
        }
    }

    /// The next step, given the Lease as just read (`None`: not found).
    pub fn decide(&mut self, current: Option<&Lease>, now: Timestamp) -> LeaseAction {
        let me = self.config.identity.clone();
        let Some(lease) = current else {
            if self.hold_back(now, false) {
                return LeaseAction::Wait {
                    holder: String::new(),
                };
            }
            self.free_since = None;
            return LeaseAction::Create(Lease {
                metadata: ObjectMeta {
                    name: Some(self.config.name.clone()),
                    namespace: Some(self.config.namespace.clone()),
                    annotations: Some(self.duration_annotation(None)),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(me),
                    lease_duration_seconds: Some(self.config.duration_secs()),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            });
        };
        let spec = lease.spec.clone().unwrap_or_default();
        self.observe(&spec, now);
        let duration = duration_of(lease, &spec);
        let mut next = lease.clone();
        next.metadata.annotations =
            Some(self.duration_annotation(lease.metadata.annotations.clone()));
        let mut new_spec = spec.clone();
        new_spec.renew_time = Some(MicroTime(now));
        new_spec.lease_duration_seconds = Some(self.config.duration_secs());
        match holder(&spec) {
            Some(h) if h == me => {
                self.free_since = None;
                next.spec = Some(new_spec);
                LeaseAction::Update {
                    lease: next,
                    takeover: false,
                }
            }
            Some(h) if !self.expired(&spec, duration, now) && !self.known_dead(h, now) => {
                self.free_since = None;
                LeaseAction::Wait {
                    holder: h.to_string(),
                }
            }
            h if self.hold_back(now, h.is_some_and(|h| self.known_dead(h, now))) => {
                LeaseAction::Wait {
                    holder: h.unwrap_or_default().to_string(),
                }
            }
            _ => {
                self.free_since = None;
                new_spec.holder_identity = Some(me);
                new_spec.acquire_time = Some(MicroTime(now));
                new_spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
                next.spec = Some(new_spec);
                LeaseAction::Update {
                    lease: next,
                    takeover: true,
                }
            }
        }
    }

    /// Whether the observed record `spec` has gone unchanged for its
    /// duration, by our clock.
    /// The agent holding the Lease as `identity` was found dead (its
    /// process is gone: see `loxilb_agent::ctsync`, "A sender found
    /// dead"): the next decision takes its Lease over without waiting for
    /// it to expire. The hint counts for one Lease duration (after that
    /// expiry decides anyway).
    pub fn holder_dead(&mut self, identity: &str, now: Timestamp) {
        if identity != self.config.identity {
            self.dead = Some((identity.to_string(), now));
        }
    }

    fn known_dead(&self, holder: &str, now: Timestamp) -> bool {
        self.dead.as_ref().is_some_and(|(who, at)| {
            who == holder
                && at
                    .checked_add(SignedDuration::from_secs(
                        self.config.duration_secs().into(),
                    ))
                    .is_ok_and(|end| now < end)
        })
    }

    fn expired(&self, spec: &LeaseSpec, duration: Option<Duration>, now: Timestamp) -> bool {
        let Some((_, since)) = self.observed.as_ref().filter(|(s, _)| s == spec) else {
            return false;
        };
        let d = duration.unwrap_or(self.config.lease_duration);
        let d = SignedDuration::try_from(d).unwrap_or(SignedDuration::MAX);
        since.checked_add(d).is_ok_and(|end| now >= end)
    }

    /// `annotations` with ours set to our Lease duration.
    fn duration_annotation(
        &self,
        annotations: Option<std::collections::BTreeMap<String, String>>,
    ) -> std::collections::BTreeMap<String, String> {
        let mut a = annotations.unwrap_or_default();
        a.insert(
            DURATION_MS_ANNOTATION.to_string(),
            self.config.lease_duration.as_millis().to_string(),
        );
        a
    }

    /// The Lease that gives up our hold (no holder, expired at once), or
    /// `None` when we do not hold `current`.
    pub fn release(&self, current: &Lease, now: Timestamp) -> Option<Lease> {
        let spec = current.spec.as_ref()?;
        if holder(spec) != Some(self.config.identity.as_str()) {
            return None;
        }
        let mut next = current.clone();
        next.spec = Some(LeaseSpec {
            holder_identity: None,
            lease_duration_seconds: Some(1),
            renew_time: Some(MicroTime(now)),
            ..spec.clone()
        });
        Some(next)
    }

    /// Record what a successful write returned (our own record is not
    /// "someone else's renewal").
    pub fn written(&mut self, lease: &Lease, now: Timestamp) {
        if let Some(spec) = &lease.spec {
            self.observe(spec, now);
        }
    }
}

/// The election against the API server.
pub struct LeaderElector {
    api: Api<Lease>,
    elector: Elector,
    /// The Lease as last read or written.
    last: Option<Lease>,
    hints: Option<mpsc::UnboundedReceiver<String>>,
    /// The acquire delay before each round (see
    /// [`Elector::set_acquire_delay`]).
    acquire_delay: Option<AcquireDelay>,
    /// Requests to give the Lease up to another agent, each with how long
    /// to leave it to the others.
    give_up: Option<mpsc::UnboundedReceiver<Duration>>,
    /// Where to tell the identity of a holder whose Lease we took over
    /// (expired, or its holder found dead).
    takeovers: Option<mpsc::UnboundedSender<String>>,
}

/// The acquire delay of a round, asked before each one.
pub type AcquireDelay = std::sync::Arc<dyn Fn() -> Duration + Send + Sync>;

impl LeaderElector {
    pub fn new(client: Client, config: LeaseConfig) -> Self {
        LeaderElector {
            api: Api::namespaced(client, &config.namespace),
            elector: Elector::new(config),
            last: None,
            hints: None,
            acquire_delay: None,
            give_up: None,
            takeovers: None,
        }
    }

    /// Tell `reports` the identity of every other agent whose Lease this
    /// election took over (it expired, or its holder was found dead: the
    /// holder is presumed dead), not of a Lease that was free.
    pub fn with_takeover_reports(mut self, reports: mpsc::UnboundedSender<String>) -> Self {
        self.takeovers = Some(reports);
        self
    }

    /// Identities of Lease holders found dead (by the conntrack sync: see
    /// [`Elector::holder_dead`]): each one starts a round at once, which
    /// takes the Lease over if that agent holds it.
    pub fn with_takeover_hints(mut self, hints: mpsc::UnboundedReceiver<String>) -> Self {
        self.hints = Some(hints);
        self
    }

    /// Take a free Lease only after it has been free for `delay()` (asked
    /// before each round): see [`Elector::set_acquire_delay`].
    pub fn with_acquire_delay(mut self, delay: AcquireDelay) -> Self {
        self.acquire_delay = Some(delay);
        self
    }

    /// Give the Lease up when asked (rebalancing owner groups): stop
    /// leading, wait a moment for what it guarded to stop (the VIPs leave
    /// this node), release it, and leave it to the others for the
    /// duration asked.
    pub fn with_give_up_requests(mut self, requests: mpsc::UnboundedReceiver<Duration>) -> Self {
        self.give_up = Some(requests);
        self
    }

    pub fn config(&self) -> &LeaseConfig {
        self.elector.config()
    }

    /// One round: read the Lease; create, renew or take it over when due.
    /// `Ok(true)`: we hold it now. A lost race (409) is `Ok(false)`.
    pub async fn try_acquire_or_renew(&mut self, now: Timestamp) -> Result<bool, kube::Error> {
        let name = self.elector.config().name.clone();
        let current = match self.api.get(&name).await {
            Ok(l) => Some(l),
            Err(kube::Error::Api(s)) if s.is_not_found() => None,
            Err(e) => return Err(e),
        };
        if let Some(d) = &self.acquire_delay {
            self.elector.set_acquire_delay(d());
        }
        let action = self.elector.decide(current.as_ref(), now);
        let previous = current
            .as_ref()
            .and_then(|l| l.spec.as_ref())
            .and_then(holder)
            .filter(|h| *h != self.elector.config().identity)
            .map(String::from);
        self.last = current;
        let mut took_from = None;
        let written = match action {
            LeaseAction::Wait { .. } => return Ok(false),
            LeaseAction::Create(lease) => self.api.create(&post_params(), &lease).await,
            LeaseAction::Update { lease, takeover } => {
                if takeover {
                    took_from = previous;
                    info!(lease = %name, previous = ?took_from, "taking over the leader Lease");
                }
                self.api.replace(&name, &post_params(), &lease).await
            }
        };
        match written {
            Ok(lease) => {
                self.elector.written(&lease, now);
                self.last = Some(lease);
                if let (Some(tx), Some(h)) = (&self.takeovers, took_from) {
                    let _ = tx.send(h);
                }
                Ok(true)
            }
            Err(kube::Error::Api(s)) if s.is_conflict() || s.is_already_exists() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Give up the Lease if we hold it (so the next agent need not wait for
    /// it to expire). Uses the Lease as last read or written.
    pub async fn release(&mut self, now: Timestamp) -> Result<bool, kube::Error> {
        let Some(next) = self
            .last
            .as_ref()
            .and_then(|l| self.elector.release(l, now))
        else {
            return Ok(false);
        };
        let name = self.elector.config().name.clone();
        match self.api.replace(&name, &post_params(), &next).await {
            Ok(l) => {
                self.last = Some(l);
                Ok(true)
            }
            Err(kube::Error::Api(s)) if s.is_conflict() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Campaign until `shutdown` completes, publishing whether we lead on
    /// `leader`; on shutdown, release the Lease if held.
    pub async fn run(mut self, leader: watch::Sender<bool>, shutdown: impl Future<Output = ()>) {
        let cfg = self.elector.config().clone();
        let mut last_renew: Option<tokio::time::Instant> = None;
        tokio::pin!(shutdown);
        loop {
            let is_leader = *leader.borrow();
            // A request that hangs must not keep a leader past its
            // deadline: the round ends there.
            let started = tokio::time::Instant::now();
            let budget = round_budget(is_leader, last_renew, started, cfg.renew_deadline);
            let round = tokio::time::timeout(budget, self.try_acquire_or_renew(Timestamp::now()))
                .await
                .unwrap_or_else(|_| {
                    Err(kube::Error::Service(
                        format!("no answer within {budget:?}").into(),
                    ))
                });
            match round {
                Ok(true) => {
                    // From the start of the round: the record others see
                    // was written after it (a conservative deadline).
                    last_renew = Some(started);
                    if !is_leader {
                        info!(identity = %cfg.identity, lease = %cfg.name, "became leader");
                        leader.send_replace(true);
                    }
                }
                Ok(false) => {
                    if is_leader {
                        warn!(identity = %cfg.identity, "lost the leader Lease");
                        leader.send_replace(false);
                    }
                }
                Err(e) => {
                    if matches!(&e, kube::Error::Api(s) if s.code == 403) {
                        warn!(lease = %cfg.name, error = %e, "leader election: access to the Lease forbidden; the agent's Role must grant get and update on this Lease's name (see manifest/in-cluster/loxilb.yaml)");
                    } else {
                        warn!(lease = %cfg.name, error = %e, "leader election: Lease not read or written");
                    }
                    let overdue = last_renew.is_none_or(|t| t.elapsed() >= cfg.renew_deadline);
                    if is_leader && overdue {
                        warn!(identity = %cfg.identity, "could not renew the leader Lease in time; stepping down");
                        leader.send_replace(false);
                    }
                }
            }
            // A leader's next round comes no later than its deadline.
            let pause = if *leader.borrow() {
                cfg.retry_period.min(round_budget(
                    true,
                    last_renew,
                    tokio::time::Instant::now(),
                    cfg.renew_deadline,
                ))
            } else {
                cfg.retry_period
            };
            tokio::select! {
                _ = &mut shutdown => break,
                _ = tokio::time::sleep(pause) => {}
                Some(dead) = next_hint(&mut self.hints) => {
                    if !*leader.borrow() {
                        info!(holder = %dead, "the agent holding the Lease was found dead: taking the Lease over now");
                        self.elector.holder_dead(&dead, Timestamp::now());
                    }
                }
                Some(hold) = next_hint(&mut self.give_up) => {
                    if *leader.borrow() {
                        info!(lease = %cfg.name, "giving the Lease up for another agent to take");
                        leader.send_replace(false);
                        // What the Lease guards goes first (two holders
                        // never act at once); the others take it at
                        // their next round anyway.
                        tokio::time::sleep(cfg.retry_period.min(Duration::from_millis(500))).await;
                        match self.release(Timestamp::now()).await {
                            Ok(_) => {}
                            Err(e) => warn!(error = %e, "could not release the Lease (it expires instead)"),
                        }
                        let until = Timestamp::now()
                            .checked_add(SignedDuration::try_from(hold).unwrap_or(SignedDuration::MAX))
                            .unwrap_or(Timestamp::MAX);
                        self.elector.hold_off(until);
                        last_renew = None;
                    }
                }
            }
        }
        if *leader.borrow() {
            leader.send_replace(false);
            match self.release(Timestamp::now()).await {
                Ok(true) => info!("released the leader Lease"),
                Ok(false) => {}
                Err(e) => warn!(error = %e, "could not release the leader Lease"),
            }
        }
    }
}

/// The next takeover hint; never, without a hint channel (or once it
/// closed).
async fn next_hint<T>(hints: &mut Option<mpsc::UnboundedReceiver<T>>) -> Option<T> {
    match hints {
        Some(rx) => match rx.recv().await {
            Some(h) => Some(h),
            None => {
                *hints = None;
                std::future::pending().await
            }
        },
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: i64) -> Timestamp {
        "2026-05-01T10:00:00Z"
            .parse::<Timestamp>()
            .unwrap()
            .checked_add(SignedDuration::from_secs(secs))
            .unwrap()
    }

    /// client-go's timings (15 s lease), which these tables were written
    /// for.
    fn cfg(me: &str) -> LeaseConfig {
        let mut c = LeaseConfig::new("kube-system", me);
        c.lease_duration = Duration::from_secs(15);
        c.renew_deadline = Duration::from_secs(10);
        c.retry_period = Duration::from_secs(2);
        c
    }

    #[test]
    fn default_takeover_within_five_seconds() {
        let c = LeaseConfig::new("kube-system", "a");
        assert!(c.lease_duration + c.retry_period <= Duration::from_secs(5));
        assert!(c.retry_period < c.renew_deadline && c.renew_deadline < c.lease_duration);
        // Expired exactly lease duration after the last record was first
        // seen (a follower polls every retry period).
        let mut e = Elector::new(c);
        assert!(matches!(
            e.decide(Some(&lease(Some("b"), 0, 0)), t(0)),
            LeaseAction::Wait { .. }
        ));
        let mut l = lease(Some("b"), 0, 0);
        l.spec.as_mut().unwrap().lease_duration_seconds = Some(4);
        assert!(matches!(e.decide(Some(&l), t(1)), LeaseAction::Wait { .. }));
        assert!(matches!(e.decide(Some(&l), t(4)), LeaseAction::Wait { .. }));
        assert!(matches!(
            e.decide(Some(&l), t(5)),
            LeaseAction::Update { takeover: true, .. }
        ));
    }

    fn ms(ms: i64) -> Timestamp {
        t(0).checked_add(SignedDuration::from_millis(ms)).unwrap()
    }

    /// A sub-second `--leaseDuration`: written to the millisecond in our
    /// annotation (the seconds field rounded up for other readers) and
    /// honoured by the other agents; a Lease without it goes by its
    /// seconds.
    #[test]
    fn a_sub_second_lease_expires_to_the_millisecond() {
        let mut c = LeaseConfig::new("kube-system", "b");
        c.lease_duration = Duration::from_millis(600);
        c.renew_deadline = Duration::from_millis(400);
        c.retry_period = Duration::from_millis(100);
        let mut holder = Elector::new(LeaseConfig {
            identity: "a".into(),
            ..c.clone()
        });
        let LeaseAction::Create(mut l) = holder.decide(None, ms(0)) else {
            panic!("create")
        };
        let ann =
            |l: &Lease| l.metadata.annotations.as_ref().unwrap()[DURATION_MS_ANNOTATION].clone();
        assert_eq!(ann(&l), "600");
        assert_eq!(l.spec.as_ref().unwrap().lease_duration_seconds, Some(1));
        // Renewals keep it (and other annotations).
        l.metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert("other".into(), "x".into());
        let LeaseAction::Update { lease: r, takeover } = holder.decide(Some(&l), ms(100)) else {
            panic!("renew")
        };
        assert!(!takeover);
        assert_eq!(ann(&r), "600");
        assert_eq!(r.metadata.annotations.as_ref().unwrap()["other"], "x");
        // Another agent: waits 600 ms from first seeing the record, then
        // takes over (not the 1 s of the seconds field).
        let mut other = Elector::new(c);
        assert!(matches!(
            other.decide(Some(&r), ms(150)),
            LeaseAction::Wait { .. }
        ));
        assert!(matches!(
            other.decide(Some(&r), ms(700)),
            LeaseAction::Wait { .. }
        ));
        assert!(matches!(
            other.decide(Some(&r), ms(750)),
            LeaseAction::Update { takeover: true, .. }
        ));
        // Without our annotation: the seconds field (1 s).
        let mut plain = r.clone();
        plain.metadata.annotations = None;
        let mut other = Elector::new(LeaseConfig::new("kube-system", "c"));
        assert!(matches!(
            other.decide(Some(&plain), ms(0)),
            LeaseAction::Wait { .. }
        ));
        assert!(matches!(
            other.decide(Some(&plain), ms(900)),
            LeaseAction::Wait { .. }
        ));
        assert!(matches!(
            other.decide(Some(&plain), ms(1000)),
            LeaseAction::Update { takeover: true, .. }
        ));
    }

    /// A leader's round ends at its renew deadline, counted from the start
    /// of its last successful round: it steps down on time even when the
    /// API server hangs.
    #[test]
    fn a_leaders_round_ends_at_its_deadline() {
        let now = tokio::time::Instant::now();
        let d = Duration::from_millis(400);
        let ago = |ms: u64| Some(now - Duration::from_millis(ms));
        assert_eq!(round_budget(false, ago(5000), now, d), d);
        assert_eq!(round_budget(false, None, now, d), d);
        assert_eq!(round_budget(true, ago(0), now, d), d);
        assert_eq!(
            round_budget(true, ago(100), now, d),
            Duration::from_millis(300)
        );
        assert_eq!(round_budget(true, ago(400), now, d), Duration::ZERO);
        assert_eq!(round_budget(true, ago(900), now, d), Duration::ZERO);
        assert_eq!(round_budget(true, None, now, d), Duration::ZERO);
    }

    fn lease(holder: Option<&str>, renew: i64, transitions: i32) -> Lease {
        Lease {
            metadata: ObjectMeta {
                name: Some("loxilb-agent".into()),
                namespace: Some("kube-system".into()),
                resource_version: Some("10".into()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: holder.map(Into::into),
                lease_duration_seconds: Some(15),
                acquire_time: Some(MicroTime(t(0))),
                renew_time: Some(MicroTime(t(renew))),
                lease_transitions: Some(transitions),
                ..Default::default()
            }),
        }
    }

    /// A holder found dead loses its Lease at the next decision, not at
    /// expiry; the hint names one holder (another is waited for), lapses
    /// after a Lease duration, and never concerns ourselves.
    #[test]
    fn a_holder_found_dead_is_taken_over_at_once() {
        let mut e = Elector::new(cfg("a"));
        let l = lease(Some("b"), 0, 3);
        assert!(matches!(e.decide(Some(&l), t(0)), LeaseAction::Wait { .. }));
        e.holder_dead("c", t(1));
        assert!(
            matches!(e.decide(Some(&l), t(1)), LeaseAction::Wait { .. }),
            "another agent's death changes nothing"
        );
        e.holder_dead("b", t(1));
        let LeaseAction::Update { lease: w, takeover } = e.decide(Some(&l), t(1)) else {
            panic!("not taken over")
        };
        assert!(takeover);
        let spec = w.spec.unwrap();
        assert_eq!(spec.holder_identity.as_deref(), Some("a"));
        assert_eq!(spec.lease_transitions, Some(4));
        assert_eq!(
            w.metadata.resource_version.as_deref(),
            Some("10"),
            "written over the version read: a second backup racing conflicts"
        );
        // A hint 15 s old (the Lease duration) has lapsed: b, holding
        // again (a new agent renewed), is waited for.
        let mut e = Elector::new(cfg("a"));
        e.holder_dead("b", t(0));
        let l2 = lease(Some("b"), 20, 3);
        assert!(matches!(
            e.decide(Some(&l2), t(20)),
            LeaseAction::Wait { .. }
        ));
        let mut e = Elector::new(cfg("a"));
        e.holder_dead("a", t(0));
        assert!(e.dead.is_none(), "never a hint about ourselves");
    }

    #[test]
    fn creates_a_missing_lease() {
        let mut e = Elector::new(cfg("a"));
        let LeaseAction::Create(l) = e.decide(None, t(0)) else {
            panic!()
        };
        let s = l.spec.unwrap();
        assert_eq!(s.holder_identity.as_deref(), Some("a"));
        assert_eq!(s.lease_duration_seconds, Some(15));
        assert_eq!(s.lease_transitions, Some(0));
        assert_eq!(s.acquire_time, Some(MicroTime(t(0))));
        assert_eq!(l.metadata.namespace.as_deref(), Some("kube-system"));
    }

    #[test]
    fn renews_its_own_lease() {
        let mut e = Elector::new(cfg("a"));
        let LeaseAction::Update { lease: l, takeover } =
            e.decide(Some(&lease(Some("a"), 0, 3)), t(2))
        else {
            panic!()
        };
        assert!(!takeover);
        assert_eq!(l.metadata.resource_version.as_deref(), Some("10"));
        let s = l.spec.unwrap();
        assert_eq!(s.renew_time, Some(MicroTime(t(2))));
        assert_eq!(s.acquire_time, Some(MicroTime(t(0))), "kept");
        assert_eq!(s.lease_transitions, Some(3), "kept");
    }

    #[test]
    fn waits_a_full_duration_by_its_own_clock() {
        let mut e = Elector::new(cfg("b"));
        // The record says it was renewed long ago (another machine's clock):
        // that alone does not make it expired.
        let old = lease(Some("a"), -3600, 1);
        assert_eq!(
            e.decide(Some(&old), t(0)),
            LeaseAction::Wait { holder: "a".into() }
        );
        assert!(matches!(
            e.decide(Some(&old), t(14)),
            LeaseAction::Wait { .. }
        ));
        // The holder renews at 10: the clock starts again.
        let renewed = lease(Some("a"), 10, 1);
        assert!(matches!(
            e.decide(Some(&renewed), t(10)),
            LeaseAction::Wait { .. }
        ));
        assert!(matches!(
            e.decide(Some(&renewed), t(24)),
            LeaseAction::Wait { .. }
        ));
        let LeaseAction::Update { lease: l, takeover } = e.decide(Some(&renewed), t(25)) else {
            panic!("expired at 10 + 15")
        };
        assert!(takeover);
        let s = l.spec.unwrap();
        assert_eq!(s.holder_identity.as_deref(), Some("b"));
        assert_eq!(s.lease_transitions, Some(2));
        assert_eq!(s.acquire_time, Some(MicroTime(t(25))));
        assert_eq!(l.metadata.resource_version.as_deref(), Some("10"));
    }

    #[test]
    fn takes_a_released_lease_at_once() {
        let mut e = Elector::new(cfg("b"));
        for h in [None, Some("")] {
            assert!(matches!(
                e.decide(Some(&lease(h, 0, 4)), t(0)),
                LeaseAction::Update { takeover: true, .. }
            ));
        }
    }

    #[test]
    fn release_only_what_it_holds() {
        let e = Elector::new(cfg("a"));
        let r = e.release(&lease(Some("a"), 0, 2), t(5)).unwrap();
        let s = r.spec.unwrap();
        assert_eq!(s.holder_identity, None);
        assert_eq!(s.lease_duration_seconds, Some(1));
        assert_eq!(s.lease_transitions, Some(2));
        assert!(e.release(&lease(Some("b"), 0, 2), t(5)).is_none());
    }

    /// With an acquire delay (owner groups: one retry period per group
    /// held), a free Lease is taken only once it has been free that long;
    /// one held by someone else in between starts the wait again, and
    /// renewing our own is never delayed.
    #[test]
    fn an_acquire_delay_holds_back_a_free_lease() {
        let mut e = Elector::new(cfg("b"));
        e.set_acquire_delay(Duration::from_secs(4));
        let missing = |e: &mut Elector, at| matches!(e.decide(None, t(at)), LeaseAction::Create(_));
        assert!(!missing(&mut e, 0));
        assert!(!missing(&mut e, 3));
        assert!(missing(&mut e, 4));
        // Released at 10: free from then.
        let released = lease(None, 10, 1);
        assert_eq!(
            e.decide(Some(&released), t(10)),
            LeaseAction::Wait {
                holder: String::new()
            }
        );
        // Someone took it meanwhile (and holds it, unexpired): the wait
        // starts over once it is free again.
        assert!(matches!(
            e.decide(Some(&lease(Some("c"), 12, 2)), t(12)),
            LeaseAction::Wait { .. }
        ));
        let released = lease(None, 13, 3);
        assert!(matches!(
            e.decide(Some(&released), t(14)),
            LeaseAction::Wait { .. }
        ));
        assert!(matches!(
            e.decide(Some(&released), t(18)),
            LeaseAction::Update { takeover: true, .. }
        ));
        // Our own is renewed at once.
        assert!(matches!(
            e.decide(Some(&lease(Some("b"), 18, 3)), t(19)),
            LeaseAction::Update {
                takeover: false,
                ..
            }
        ));
        // Zero: at once.
        e.set_acquire_delay(Duration::ZERO);
        assert!(missing(&mut e, 30));
    }

    /// A Lease whose holder was found dead is taken at once even with an
    /// acquire delay (the agent that found it dead takes its VIPs; the
    /// rebalancing moves them later if it then holds too many); a hold-off
    /// after giving the Lease up is still kept.
    #[test]
    fn a_dead_holders_lease_is_taken_without_the_acquire_delay() {
        let mut e = Elector::new(cfg("b"));
        e.set_acquire_delay(Duration::from_secs(4));
        let held = lease(Some("a"), 10, 1);
        assert!(matches!(
            e.decide(Some(&held), t(10)),
            LeaseAction::Wait { .. }
        ));
        // Expired but not known dead: the delay holds.
        assert!(matches!(
            e.decide(Some(&held), t(26)),
            LeaseAction::Wait { .. }
        ));
        let mut e = Elector::new(cfg("b"));
        e.set_acquire_delay(Duration::from_secs(4));
        assert!(matches!(
            e.decide(Some(&held), t(10)),
            LeaseAction::Wait { .. }
        ));
        e.holder_dead("a", t(11));
        assert!(matches!(
            e.decide(Some(&held), t(11)),
            LeaseAction::Update { takeover: true, .. }
        ));
        // Holding off (we gave it up a moment ago) wins over the hint.
        let mut e = Elector::new(cfg("b"));
        e.set_acquire_delay(Duration::from_secs(4));
        e.hold_off(t(20));
        e.holder_dead("a", t(11));
        assert!(matches!(
            e.decide(Some(&held), t(11)),
            LeaseAction::Wait { .. }
        ));
        assert!(matches!(
            e.decide(Some(&held), t(20)),
            LeaseAction::Update { takeover: true, .. }
        ));
    }
}
