//! VIP owner groups (`--vipOwners=pool`): one Lease per address pool,
//! whose holder owns the VIPs of that pool on the wire (holds them on
//! `lo`, answers ARP/ND, announces them as the active path, streams their
//! sessions to the other agents). Each group's Lease is elected like the
//! leader's ([`crate::leader`]: same timings, same takeover hints from
//! the conntrack sync), so a group has at most one owner at a time and a
//! dead owner's groups move within the Lease duration (or at once on a
//! takeover hint).
//!
//! The groups spread over the agents:
//!
//! - **when taken**: an agent waits one retry period per group it already
//!   holds before taking a free one, so of the agents competing for a
//!   free group, the one holding the fewest takes it (a dead owner's
//!   groups go to the agents holding the fewest);
//! - **afterwards** (an agent joined later, or came back): every agent
//!   beats a counter of its own in one shared Lease, `<lease>-members`
//!   (annotation [`MEMBERS_ANNOTATION`], a JSON map identity → counter,
//!   written every half Lease duration); an agent is live while its
//!   counter moves (by the reader's clock, as for the Leases), except
//!   that one whose pool Lease we took over (expired, or its holder found
//!   dead) is not live until its counter moves again: otherwise its last
//!   beats would keep it live for a while after its death, and the agent
//!   that just took its pools over would give one of them up again with
//!   no one left to take it. An agent
//!   holding more than its share, ⌈groups / live agents⌉, gives one group
//!   up (at most one per two Lease durations): it stops owning the VIPs,
//!   releases the Lease, and leaves it to the others for a Lease duration
//!   plus two retry periods, so one of the agents holding fewer takes it.
//!   The VIPs are on no node for about a retry period then; established
//!   sessions carry on through conntrack sync.
//!
//! The leader Lease keeps its other jobs (addresses, status, Events) and
//! owns the VIPs outside every pool (static addresses).

use std::{
    collections::{BTreeMap, BTreeSet},
    hash::{Hash, Hasher},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use k8s_openapi::{api::coordination::v1::Lease, apimachinery::pkg::apis::meta::v1::ObjectMeta};
use kube::{Api, Client};
use tokio::{
    sync::{mpsc, watch},
    time::Instant,
};
use tracing::{debug, info, warn};

use crate::{
    leader::{LeaderElector, LeaseConfig},
    reconcile::post_params,
};

/// The members Lease's annotation: a JSON map from each agent's identity
/// to its heartbeat counter.
pub const MEMBERS_ANNOTATION: &str = "loxilb.io/members";

/// The Lease the agents beat their counters in: `<base>-members`.
pub fn members_lease_name(base: &str) -> String {
    format!("{base}-members")
}

/// The agents' liveness, from the counters they beat, by our own clock: a
/// counter seen to change (or seen for the first time) counts as live for
/// the window after.
#[derive(Debug, Default)]
pub struct Members {
    seen: BTreeMap<String, (u64, Instant)>,
    /// Agents presumed dead (one of our groups took its Lease over from
    /// them), each with the counter first read after that: not live until
    /// their counter moves from it. (A last beat written just before the
    /// agent died may be read once after the takeover; it is not a sign
    /// of life.)
    presumed_dead: BTreeMap<String, Option<u64>>,
}

impl Members {
    /// The counters as just read at `now`.
    pub fn observe(&mut self, beats: &BTreeMap<String, u64>, now: Instant) {
        for (id, n) in beats {
            match self.seen.get_mut(id) {
                Some((old, _)) if old == n => {}
                Some(e) => *e = (*n, now),
                None => {
                    self.seen.insert(id.clone(), (*n, now));
                }
            }
            match self.presumed_dead.get_mut(id) {
                Some(first @ None) => *first = Some(*n),
                Some(Some(first)) if first != n => {
                    self.presumed_dead.remove(id);
                }
                _ => {}
            }
        }
        self.seen.retain(|id, _| beats.contains_key(id));
        self.presumed_dead.retain(|id, _| beats.contains_key(id));
    }

    /// A Lease of `identity` was taken over (it expired, or the agent
    /// was found dead): not live until its counter moves again.
    pub fn presume_dead(&mut self, identity: &str) {
        self.presumed_dead.insert(identity.to_string(), None);
    }

    /// The identities whose counter moved within `window` of `now` (and
    /// not presumed dead since).
    pub fn live(&self, now: Instant, window: Duration) -> BTreeSet<String> {
        self.seen
            .iter()
            .filter(|(id, (_, at))| {
                now.saturating_duration_since(*at) < window && !self.presumed_dead.contains_key(*id)
            })
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Identities whose counter has not moved for `window`: removed from
    /// the Lease when we write it.
    fn gone(&self, now: Instant, window: Duration) -> BTreeSet<String> {
        self.seen
            .iter()
            .filter(|(_, (_, at))| now.saturating_duration_since(*at) >= window)
            .map(|(id, _)| id.clone())
            .collect()
    }
}

/// The group this agent (`identity`) gives up, holding `mine` of
/// `groups` with `live` agents (itself included): one, when it holds more
/// than its share ⌈groups / live⌉; which one is fixed by a hash of the
/// identity and the group (different agents give up different groups).
pub fn to_give_up(
    identity: &str,
    groups: usize,
    mine: &BTreeSet<String>,
    live: usize,
) -> Option<String> {
    let share = groups.div_ceil(live.max(1));
    if mine.len() <= share {
        return None;
    }
    mine.iter()
        .max_by_key(|g| {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            (identity, g.as_str()).hash(&mut h);
            h.finish()
        })
        .cloned()
}

/// The Lease of `pool`'s owner: `<base>-pool-<pool>`, lowercased, every
/// character a Lease name cannot hold (outside `[a-z0-9.-]`) as `-`.
pub fn lease_name(base: &str, pool: &str) -> String {
    let pool: String = pool
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    format!("{base}-pool-{pool}")
}

/// Every pool's Lease name, or why they cannot be used: two pools whose
/// names differ only where a Lease name cannot (`Pool_A`, `pool-a`), or a
/// name too long.
pub fn lease_names(base: &str, pools: &[String]) -> Result<Vec<String>, String> {
    let mut seen = std::collections::BTreeMap::new();
    let mut out = Vec::with_capacity(pools.len());
    for p in pools {
        let n = lease_name(base, p);
        if n.len() > 253 {
            return Err(format!(
                "pool {p:?}: its owner Lease name {n:?} is longer than 253 characters; use a shorter pool name"
            ));
        }
        if !n.ends_with(|c: char| c.is_ascii_alphanumeric()) {
            return Err(format!(
                "pool {p:?}: its owner Lease name {n:?} must end with a letter or digit; rename the pool"
            ));
        }
        if let Some(other) = seen.insert(n.clone(), p.clone()) {
            return Err(format!(
                "pools {other:?} and {p:?} would share the owner Lease {n:?}; rename one of them"
            ));
        }
        out.push(n);
    }
    Ok(out)
}

/// The running owner-group elections.
pub struct OwnerGroups {
    /// The pools whose Lease this agent holds now.
    pub held: watch::Receiver<BTreeSet<String>>,
    hints: Vec<mpsc::UnboundedSender<String>>,
    stop: watch::Sender<bool>,
    tasks: tokio::task::JoinSet<()>,
}

impl OwnerGroups {
    /// Campaign for each pool's Lease (named by [`lease_names`], in the
    /// leader Lease's namespace, with its identity and timings).
    pub fn start(
        client: Client,
        base: &LeaseConfig,
        pools: &[String],
    ) -> Result<OwnerGroups, String> {
        let names = lease_names(&base.name, pools)?;
        let (held_tx, held) = watch::channel(BTreeSet::new());
        let held_tx = Arc::new(held_tx);
        let count = Arc::new(AtomicUsize::new(0));
        let (stop, stop_rx) = watch::channel(false);
        let mut tasks = tokio::task::JoinSet::new();
        let mut hints = Vec::with_capacity(pools.len());
        let mut give_up = BTreeMap::new();
        let (took_tx, took_rx) = mpsc::unbounded_channel();
        for (pool, name) in pools.iter().zip(names) {
            let config = LeaseConfig {
                name,
                ..base.clone()
            };
            let (hint_tx, hint_rx) = mpsc::unbounded_channel();
            hints.push(hint_tx);
            let (give_tx, give_rx) = mpsc::unbounded_channel();
            give_up.insert(pool.clone(), give_tx);
            let c = count.clone();
            let period = config.retry_period;
            let elector = LeaderElector::new(client.clone(), config)
                .with_takeover_hints(hint_rx)
                .with_give_up_requests(give_rx)
                .with_takeover_reports(took_tx.clone())
                .with_acquire_delay(Arc::new(move || {
                    period * c.load(Ordering::SeqCst).min(u32::MAX as usize) as u32
                }));
            let (own_tx, mut own_rx) = watch::channel(false);
            let mut stop_rx = stop_rx.clone();
            let shutdown = async move {
                let _ = stop_rx.wait_for(|s| *s).await;
            };
            let (pool, held_tx, count) = (pool.clone(), held_tx.clone(), count.clone());
            tasks.spawn(async move {
                let follow = async {
                    while own_rx.changed().await.is_ok() {
                        let owns = *own_rx.borrow_and_update();
                        held_tx.send_modify(|h| {
                            let changed = if owns {
                                h.insert(pool.clone())
                            } else {
                                h.remove(&pool)
                            };
                            if changed && owns {
                                count.fetch_add(1, Ordering::SeqCst);
                            } else if changed {
                                count.fetch_sub(1, Ordering::SeqCst);
                            }
                        });
                        info!(
                            pool = %pool,
                            "{}",
                            if owns {
                                "owner of the pool's VIPs"
                            } else {
                                "no longer the owner of the pool's VIPs"
                            }
                        );
                    }
                };
                tokio::join!(elector.run(own_tx, shutdown), follow);
            });
        }
        let api: Api<Lease> = Api::namespaced(client, &base.namespace);
        let stopped = {
            let mut rx = stop_rx.clone();
            async move {
                let _ = rx.wait_for(|s| *s).await;
            }
        };
        tasks.spawn(rebalance(
            api,
            base.clone(),
            held.clone(),
            give_up,
            took_rx,
            stopped,
        ));
        Ok(OwnerGroups {
            held,
            hints,
            stop,
            tasks,
        })
    }

    /// The agent holding Leases as `identity` was found dead: every
    /// group's election takes its Lease over at once if it holds it.
    pub fn holder_dead(&self, identity: &str) {
        for h in &self.hints {
            let _ = h.send(identity.to_string());
        }
    }

    /// [`OwnerGroups::holder_dead`] for another task.
    pub fn hinter(&self) -> impl Fn(&str) + Send + 'static {
        let hints = self.hints.clone();
        move |identity: &str| {
            for h in &hints {
                let _ = h.send(identity.to_string());
            }
        }
    }

    /// Give the Leases up (after the VIPs left this node) and stop.
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        while self.tasks.join_next().await.is_some() {}
    }
}

/// Beat this agent's counter in the members Lease and, from everyone's,
/// give a group up when holding more than the share (see the module
/// documentation); the agents whose Leases our groups took over (`took`)
/// do not count as live until they beat again. Ends with `stopped`.
async fn rebalance(
    api: Api<Lease>,
    base: LeaseConfig,
    held: watch::Receiver<BTreeSet<String>>,
    give_up: BTreeMap<String, mpsc::UnboundedSender<Duration>>,
    mut took: mpsc::UnboundedReceiver<String>,
    stopped: impl std::future::Future<Output = ()>,
) {
    let name = members_lease_name(&base.name);
    let period = (base.lease_duration / 2).max(Duration::from_millis(100));
    let window = base.lease_duration * 2;
    let hold = base.lease_duration + base.retry_period * 2;
    let mut members = Members::default();
    let mut beat: u64 = 0;
    let mut last_give_up: Option<Instant> = None;
    let mut tick = tokio::time::interval(period);
    tokio::pin!(stopped);
    loop {
        tokio::select! {
            _ = &mut stopped => break,
            _ = tick.tick() => {}
        }
        beat += 1;
        let now = Instant::now();
        let gone = members.gone(now, window * 5);
        let beats = match heartbeat(&api, (&base.namespace, &name), &base.identity, beat, &gone)
            .await
        {
            Ok(b) => b,
            Err(e) => {
                debug!(lease = %name, error = %e, "members Lease not written (next beat retries)");
                continue;
            }
        };
        while let Ok(dead) = took.try_recv() {
            debug!(identity = %dead, "a Lease taken over from it: not live until it beats again");
            members.presume_dead(&dead);
        }
        members.observe(&beats, now);
        let live = members.live(now, window);
        if last_give_up.is_some_and(|t| t.elapsed() < window) {
            continue;
        }
        let mine = held.borrow().clone();
        if let Some(g) = to_give_up(&base.identity, give_up.len(), &mine, live.len()) {
            info!(
                pool = %g,
                held = mine.len(),
                agents = live.len(),
                "holding more pools than the share: giving one up to another agent"
            );
            if let Some(tx) = give_up.get(&g) {
                let _ = tx.send(hold);
            }
            last_give_up = Some(now);
        }
    }
}

/// Set our counter in the members Lease (created if missing), dropping
/// the identities in `gone`; the counters as written (or as read when the
/// write lost a race).
async fn heartbeat(
    api: &Api<Lease>,
    (namespace, name): (&str, &str),
    identity: &str,
    beat: u64,
    gone: &BTreeSet<String>,
) -> Result<BTreeMap<String, u64>, kube::Error> {
    let current = match api.get(name).await {
        Ok(l) => Some(l),
        Err(kube::Error::Api(s)) if s.is_not_found() => None,
        Err(e) => return Err(e),
    };
    let mut beats: BTreeMap<String, u64> = current
        .as_ref()
        .and_then(|l| l.metadata.annotations.as_ref())
        .and_then(|a| a.get(MEMBERS_ANNOTATION))
        .and_then(|v| serde_json::from_str(v).ok())
        .unwrap_or_default();
    let read = beats.clone();
    beats.retain(|id, _| !gone.contains(id));
    beats.insert(identity.to_string(), beat);
    let value = serde_json::to_string(&beats).expect("a map of numbers");
    let written = match current {
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name.to_string()),
                    namespace: Some(namespace.to_string()),
                    annotations: Some([(MEMBERS_ANNOTATION.to_string(), value)].into()),
                    ..Default::default()
                },
                spec: None,
            };
            api.create(&post_params(), &lease).await
        }
        Some(mut lease) => {
            lease
                .metadata
                .annotations
                .get_or_insert_with(Default::default)
                .insert(MEMBERS_ANNOTATION.to_string(), value);
            api.replace(name, &post_params(), &lease).await
        }
    };
    match written {
        Ok(_) => Ok(beats),
        Err(kube::Error::Api(s)) if s.is_conflict() || s.is_already_exists() => Ok(read),
        Err(e) => {
            warn!(lease = %name, error = %e, "members Lease not written");
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_names_are_valid_and_distinct() {
        assert_eq!(
            lease_name("loxilb-agent", "defaultPool"),
            "loxilb-agent-pool-defaultpool"
        );
        assert_eq!(lease_name("l", "a_b c"), "l-pool-a-b-c");
        let pools = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            lease_names("l", &pools(&["a", "b"])).unwrap(),
            ["l-pool-a", "l-pool-b"]
        );
        let e = lease_names("l", &pools(&["Pool_A", "pool-a"])).unwrap_err();
        assert!(
            e.contains("\"Pool_A\" and \"pool-a\"") && e.contains("rename"),
            "{e}"
        );
        let e = lease_names("l", &pools(&["a_"])).unwrap_err();
        assert!(e.contains("must end with a letter or digit"), "{e}");
        let e = lease_names("l", &pools(&[&"x".repeat(260)])).unwrap_err();
        assert!(e.contains("longer than 253"), "{e}");
    }

    #[test]
    fn members_are_live_while_their_counters_move() {
        let t0 = Instant::now();
        let s = |x: u64| t0 + Duration::from_secs(x);
        let w = Duration::from_secs(8);
        let beats = |v: &[(&str, u64)]| -> BTreeMap<String, u64> {
            v.iter().map(|(k, n)| (k.to_string(), *n)).collect()
        };
        let mut m = Members::default();
        m.observe(&beats(&[("a", 1), ("b", 7)]), s(0));
        assert_eq!(m.live(s(0), w).len(), 2, "first seen: live");
        m.observe(&beats(&[("a", 2), ("b", 7)]), s(5));
        assert_eq!(
            m.live(s(9), w),
            ["a".to_string()].into(),
            "b stopped beating"
        );
        assert_eq!(m.gone(s(9), w), ["b".to_string()].into());
        // b beats again; c leaves the Lease.
        m.observe(&beats(&[("a", 3), ("b", 8)]), s(10));
        assert_eq!(m.live(s(10), w).len(), 2);
        m.observe(&beats(&[("a", 4)]), s(11));
        assert_eq!(m.live(s(11), w), ["a".to_string()].into());
    }

    #[test]
    fn an_agent_whose_lease_was_taken_over_is_live_only_once_it_beats_again() {
        let t0 = Instant::now();
        let s = |x: u64| t0 + Duration::from_secs(x);
        let w = Duration::from_secs(8);
        let beats = |v: &[(&str, u64)]| -> BTreeMap<String, u64> {
            v.iter().map(|(k, n)| (k.to_string(), *n)).collect()
        };
        let both = BTreeSet::from(["a".to_string(), "b".to_string()]);
        let a_only = BTreeSet::from(["a".to_string()]);
        let mut m = Members::default();
        m.observe(&beats(&[("a", 1), ("b", 7)]), s(0));
        assert_eq!(m.live(s(0), w), both);
        // b's pool Lease taken over: b is not live, though its counter
        // moved within the window...
        m.presume_dead("b");
        assert_eq!(m.live(s(1), w), a_only);
        // ... nor when a beat it wrote before dying is read afterwards.
        m.observe(&beats(&[("a", 2), ("b", 8)]), s(2));
        assert_eq!(m.live(s(2), w), a_only);
        m.observe(&beats(&[("a", 3), ("b", 8)]), s(3));
        assert_eq!(m.live(s(3), w), a_only);
        // b beats again: live.
        m.observe(&beats(&[("a", 4), ("b", 9)]), s(4));
        assert_eq!(m.live(s(4), w), both);
        // Presumed dead, then gone from the Lease: forgotten.
        m.presume_dead("b");
        m.observe(&beats(&[("a", 5)]), s(5));
        m.observe(&beats(&[("a", 6), ("b", 1)]), s(6));
        assert_eq!(m.live(s(6), w), both, "a new b is live at once");
    }

    #[test]
    fn an_agent_above_its_share_gives_one_group_up() {
        let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        // 4 groups, 2 agents: a share of 2.
        assert_eq!(to_give_up("a", 4, &set(&["p1", "p2"]), 2), None);
        let g = to_give_up("a", 4, &set(&["p1", "p2", "p3"]), 2).unwrap();
        assert!(set(&["p1", "p2", "p3"]).contains(&g));
        assert_eq!(
            to_give_up("a", 4, &set(&["p1", "p2", "p3"]), 2),
            Some(g),
            "the same one every time"
        );
        // 3 groups, 2 agents: a share of 2; alone: all.
        assert_eq!(to_give_up("a", 3, &set(&["p1", "p2"]), 2), None);
        assert!(to_give_up("a", 3, &set(&["p1", "p2", "p3"]), 2).is_some());
        assert_eq!(to_give_up("a", 3, &set(&["p1", "p2", "p3"]), 1), None);
        assert_eq!(to_give_up("a", 3, &set(&["p1", "p2", "p3"]), 0), None);
        // More agents than groups: one each at most.
        assert!(to_give_up("a", 2, &set(&["p1", "p2"]), 3).is_some());
        assert_eq!(to_give_up("a", 2, &set(&["p1"]), 3), None);
    }
}
