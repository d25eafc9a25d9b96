//! The sender's scan ([`Scanner`]) and the receiver's apply ([`Applier`]),
//! on a [`SessionTable`]: no sockets, no threads.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Result;
use loxilb_common::{ip_from_addr, AssocKey, CtKey, CtVal, EpIndex, SvcKey};
use serde::Serialize;

use super::{
    delta::{self, AssocState, State},
    table::SessionTable,
    wire::{AssocId, AssocRecord, Record},
    xlate::{self, ReceiverIndex, SenderIndex, Skip},
};

/// The VIPs whose sessions this node streams (it answers for them) and
/// does not take from another node; the sessions of every other VIP it
/// takes from their owners. A session belongs to its rule's identity VIP
/// (the lowest of a rule with several).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Owned {
    /// A backup for every VIP: streams nothing.
    #[default]
    None,
    /// The only active node (one owner for every VIP): streams every
    /// session, takes none.
    All,
    /// Active for these VIPs, a backup for the others.
    Vips(BTreeSet<IpAddr>),
}

impl Owned {
    /// Whether this node owns `vip`.
    pub fn contains(&self, vip: IpAddr) -> bool {
        match self {
            Owned::None => false,
            Owned::All => true,
            Owned::Vips(v) => v.contains(&vip),
        }
    }

    /// Whether this node owns the rule identified by `rule`.
    pub fn rule(&self, rule: &SvcKey) -> bool {
        self.contains(ip_from_addr(&rule.addr))
    }

    /// Whether this node owns any VIP (and so streams sessions).
    pub fn any(&self) -> bool {
        match self {
            Owned::None => false,
            Owned::All => true,
            Owned::Vips(v) => !v.is_empty(),
        }
    }

    /// For logs and the state file: `all`, `none`, or the VIPs.
    pub fn describe(&self) -> String {
        match self {
            Owned::None => "none".into(),
            Owned::All => "all".into(),
            Owned::Vips(v) if v.is_empty() => "none".into(),
            Owned::Vips(v) => v
                .iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(","),
        }
    }
}

/// One scan's outcome.
pub struct ScanOut {
    /// The table as exported (what a snapshot sends).
    pub state: Arc<State>,
    /// The SCTP association records as exported.
    pub assocs: Arc<AssocState>,
    /// The frames of the changes since the previous scan (UPSERTs,
    /// REMOVEs, then the same for associations), encoded once for every
    /// receiver.
    pub frames: Vec<Arc<Vec<u8>>>,
    pub upserts: usize,
    pub removes: usize,
    pub assoc_upserts: usize,
    pub assoc_removes: usize,
    /// Entries left out: rule or endpoint no longer known on this node.
    pub skipped: usize,
    /// Entries of VIPs this node does not own (their owner streams them).
    pub not_owned: usize,
    /// The table's clock at the scan (ages of a later snapshot count
    /// from it).
    pub now_ns: u64,
}

/// The sender's side: scans the table and works out the changes.
pub struct Scanner {
    prev: Arc<State>,
    prev_assocs: Arc<AssocState>,
    /// The local key of each association of the last scan.
    assoc_keys: HashMap<AssocId, AssocKey>,
    refresh_ns: u64,
    batch: usize,
    /// The VIPs of the last scan.
    owned: Owned,
}

impl Scanner {
    pub fn new(refresh: Duration, batch: usize) -> Self {
        Scanner {
            prev: Arc::new(State::new()),
            prev_assocs: Arc::new(AssocState::new()),
            assoc_keys: HashMap::new(),
            refresh_ns: refresh.as_nanos() as u64,
            batch,
            owned: Owned::All,
        }
    }

    /// Scan the sessions of the VIPs in `owned`. Those of a VIP given up
    /// since the last scan leave the stream without a REMOVE (their new
    /// owner streams them now, and the receivers keep them); those of a
    /// VIP taken appear as new.
    pub fn scan(&mut self, t: &mut dyn SessionTable, owned: &Owned) -> Result<ScanOut> {
        if *owned != self.owned {
            self.prev = Arc::new(
                self.prev
                    .iter()
                    .filter(|(_, e)| owned.rule(&e.rec.rule))
                    .map(|(k, e)| (*k, *e))
                    .collect(),
            );
            self.prev_assocs = Arc::new(
                self.prev_assocs
                    .iter()
                    .filter(|((rule, _), _)| owned.rule(rule))
                    .map(|(id, r)| (*id, *r))
                    .collect(),
            );
            self.assoc_keys.retain(|(rule, _), _| owned.rule(rule));
            self.owned = owned.clone();
        }
        let idx = SenderIndex::build(&t.services()?, &t.endpoints()?);
        let now = t.now_ns();
        let mut sessions = t.sessions()?;
        // A key missing from the walk may have been skipped by it (an LRU
        // walk restarts when its cursor entry vanishes): look each one up
        // before telling receivers it is gone.
        let seen: HashSet<CtKey> = sessions.iter().map(|(k, _)| *k).collect();
        for k in self.prev.keys().filter(|k| !seen.contains(k)) {
            if let Some(v) = t.get(k)? {
                sessions.push((*k, v));
            }
        }
        let (mut skipped, mut not_owned) = (0, 0);
        let mut scanned = Vec::with_capacity(sessions.len());
        for (k, v) in &sessions {
            match xlate::export(k, v, &idx) {
                Ok(r) if owned.rule(&r.rule) => scanned.push((r, v.last_seen_ns)),
                Ok(_) => not_owned += 1,
                Err(_) => {
                    skipped += 1;
                    // A live session that cannot be exported this time
                    // (its rule or endpoint changed under the walk, which
                    // reads the rules apart from the sessions) is not gone:
                    // it keeps its last record, and receivers are not told
                    // to remove it.
                    if let Some(e) = self.prev.get(k) {
                        scanned.push((e.rec, e.last_seen_ns));
                    }
                }
            }
        }
        let (state, d) = delta::diff(&self.prev, scanned, self.refresh_ns);
        // SCTP associations: the same, without ages.
        let mut assocs = t.assocs()?;
        let seen: HashSet<AssocKey> = assocs.iter().map(|(k, _)| *k).collect();
        for k in self.assoc_keys.values().filter(|k| !seen.contains(k)) {
            if let Some(v) = t.get_assoc(k)? {
                assocs.push((*k, v));
            }
        }
        let mut assoc_keys = HashMap::with_capacity(assocs.len());
        let mut exported: Vec<AssocRecord> = Vec::with_capacity(assocs.len());
        for (k, v) in &assocs {
            match xlate::export_assoc(k, v, &idx) {
                Ok(r) if owned.rule(&r.rule) => {
                    assoc_keys.insert(r.id(), *k);
                    exported.push(r);
                }
                Ok(_) => not_owned += 1,
                Err(_) => skipped += 1,
            }
        }
        let (astate, a_up, a_rm) = delta::diff_assocs(&self.prev_assocs, exported);
        let mut frames: Vec<Arc<Vec<u8>>> =
            delta::upsert_frames(&d.upserts, &state, self.batch, now)
                .into_iter()
                .map(Arc::new)
                .collect();
        frames.extend(
            delta::remove_frames(&d.removes, self.batch)
                .into_iter()
                .map(Arc::new),
        );
        frames.extend(
            delta::assoc_frames(&a_up, &astate, self.batch)
                .into_iter()
                .chain(delta::assoc_remove_frames(&a_rm, self.batch))
                .map(Arc::new),
        );
        self.prev = Arc::new(state);
        self.prev_assocs = Arc::new(astate);
        self.assoc_keys = assoc_keys;
        Ok(ScanOut {
            state: self.prev.clone(),
            assocs: self.prev_assocs.clone(),
            frames,
            upserts: d.upserts.len(),
            removes: d.removes.len(),
            assoc_upserts: a_up.len(),
            assoc_removes: a_rm.len(),
            skipped,
            not_owned,
            now_ns: now,
        })
    }
}

/// Counters of the receiving side.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct ApplyStats {
    /// Entries written to the session table.
    pub applied: u64,
    /// Entries removed on the sender's word (with the reply entries made
    /// here for them: see `one_split`).
    pub removed: u64,
    /// Entries dropped: this node has no rule of that VIP, port and
    /// protocol.
    pub dropped_no_rule: u64,
    /// Entries dropped: the rule here has no such endpoint.
    pub dropped_no_endpoint: u64,
    /// Entries removed at the end of a snapshot that did not hold them
    /// (installed by an earlier sync, ended while we were not connected;
    /// with the reply entries made here for them).
    pub stale_removed: u64,
    /// Full snapshots applied.
    pub snapshots: u64,
    /// Snapshots asked for because this node's rules changed after
    /// entries were dropped for want of them.
    pub resyncs_requested: u64,
    /// SCTP association records written, removed, and dropped (rule or
    /// endpoint unknown here).
    pub assoc_applied: u64,
    pub assoc_removed: u64,
    pub assoc_dropped: u64,
    /// Entries and association records not written because this node
    /// owns their VIP (a sender that has not yet heard it lost it).
    pub ignored_owned: u64,
    /// REMOVEs of an entry another sender installed here, or none did
    /// (its VIP moved; the sender was not told yet): ignored.
    pub ignored_removes: u64,
    /// Entries of one-entry sessions (`ct_state::ONE`) whose endpoint this
    /// node's endpoint index does not give to their VIP and port (other
    /// rules here, a slot another endpoint shares, a draining slot, an
    /// index not written yet): written without the bit, with a reply entry
    /// made here (else the endpoint's replies would find no session here).
    pub one_split: u64,
}

/// How long the receiver trusts its view of its own rules.
const INDEX_TTL: Duration = Duration::from_secs(1);

/// Who installed a synced entry here: the sender's node name, and the
/// entry's VIP (an entry of a VIP this node takes over becomes its own).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Origin {
    sender: Arc<str>,
    vip: IpAddr,
}

/// The receiver's side: installs records in the session table. Several
/// senders may stream at once (each owns some VIPs): each one's entries
/// are tracked as its own, so that its snapshots and REMOVEs touch only
/// them, and none of them touches the sessions of a VIP this node owns.
#[derive(Default)]
pub struct Applier {
    index: ReceiverIndex,
    index_at: Option<Instant>,
    /// The VIPs this node owns: their records are not written.
    owned: Owned,
    /// Keys this node holds because a sender sent them.
    tracked: HashMap<CtKey, Origin>,
    /// The reply entries made here for the one-entry sessions this node's
    /// endpoint index does not serve (`ApplyStats::one_split`), by their
    /// forward entry's key (tracked): they go with it (its REMOVE, a
    /// snapshot without it), and a snapshot never removes them for not
    /// holding them (no sender sends them).
    split: HashMap<CtKey, CtKey>,
    /// Slots of this node's endpoint index as read since `index` was last
    /// refreshed (cleared with it: the same lifetime, the same forced
    /// refreshes).
    ep_slots: HashMap<u32, Option<EpIndex>>,
    /// Per sender during its snapshot: the keys it held so far.
    snapshot: HashMap<Arc<str>, HashSet<CtKey>>,
    /// The same for SCTP association records.
    tracked_assoc: HashMap<AssocKey, Origin>,
    snapshot_assoc: HashMap<Arc<str>, HashSet<AssocKey>>,
    /// Per sender, since the first entry dropped after its last
    /// snapshot: when, and this node's rules then. Once they change (the
    /// rule or endpoint arrived), the sender is asked for a new snapshot.
    dropped_since: HashMap<Arc<str>, (Instant, ReceiverIndex)>,
    pub stats: ApplyStats,
}

impl Applier {
    fn refresh(&mut self, t: &mut dyn SessionTable, force: bool) -> Result<()> {
        if force || self.index_at.is_none_or(|at| at.elapsed() >= INDEX_TTL) {
            self.index = ReceiverIndex::build(&t.services()?, &t.endpoints()?);
            self.ep_slots.clear();
            self.index_at = Some(Instant::now());
        }
        Ok(())
    }

    /// Install `recs` from `from` (a sender's node name).
    pub fn upserts(&mut self, t: &mut dyn SessionTable, from: &str, recs: &[Record]) -> Result<()> {
        self.refresh(t, false)?;
        let from: Arc<str> = from.into();
        let now = t.now_ns();
        let mut refreshed = false;
        for r in recs {
            if self.owned.rule(&r.rule) {
                self.stats.ignored_owned += 1;
                continue;
            }
            let mut out = xlate::import(r, &self.index, now);
            if out.is_err() && !refreshed {
                // A rule may have just been installed here: look again.
                self.refresh(t, true)?;
                refreshed = true;
                out = xlate::import(r, &self.index, now);
            }
            if let Some(s) = self.snapshot.get_mut(&from) {
                s.insert(r.key);
            }
            match out {
                Ok((k, v)) => {
                    self.install(t, &k, &v)?;
                    let vip = ip_from_addr(&r.rule.addr);
                    self.tracked.insert(
                        k,
                        Origin {
                            sender: from.clone(),
                            vip,
                        },
                    );
                    self.stats.applied += 1;
                }
                Err(e) => {
                    match e {
                        Skip::NoRule => self.stats.dropped_no_rule += 1,
                        Skip::NoEndpoint => self.stats.dropped_no_endpoint += 1,
                    }
                    self.note_drop(&from);
                }
            }
        }
        Ok(())
    }

    /// Write imported entry (`k`, `v`). A one-entry session stays one
    /// only where this node's endpoint index serves it as the datapath's
    /// reply lookup needs ([`xlate::one_served`]); else it is written as
    /// two entries ([`xlate::split`]), the reply entry first (a reply never
    /// finds half a session), and the reply entry is tracked with the
    /// forward key. A session split earlier whose entry comes again served
    /// by the index (the slot was written since) is one entry again: its
    /// forward entry regains the bit, then the reply entry made here goes.
    /// (Either way the datapath finds the replies in between.)
    fn install(&mut self, t: &mut dyn SessionTable, k: &CtKey, v: &CtVal) -> Result<()> {
        let Some(slot) = xlate::one_slot(k, v) else {
            t.put(k, v)?;
            // Of a session split here before, now of two entries on the
            // sender (a new session on the tuple): the sender's reply
            // entry, of the same key, takes the place of the one made here.
            self.unsplit(t, k, k.peer(v))?;
            return Ok(());
        };
        let e = match self.ep_slots.get(&slot) {
            Some(e) => *e,
            None => {
                let e = t.ep_index(slot)?;
                self.ep_slots.insert(slot, e);
                e
            }
        };
        if xlate::one_served(k, v, e.as_ref()) {
            t.put(k, v)?;
            self.unsplit(t, k, None)?;
            return Ok(());
        }
        let Some([(fk, fv), (rk, rv)]) = xlate::split(k, v) else {
            t.put(k, v)?;
            return Ok(());
        };
        t.put(&rk, &rv)?;
        t.put(&fk, &fv)?;
        self.unsplit(t, k, Some(rk))?;
        self.split.insert(*k, rk);
        self.stats.one_split += 1;
        Ok(())
    }

    /// Forget the reply entry made here for forward key `k`, if any, and
    /// remove it from the table unless its key is `keep` or a sender sent
    /// an entry of that key itself. Returns whether it was removed.
    fn unsplit(
        &mut self,
        t: &mut dyn SessionTable,
        k: &CtKey,
        keep: Option<CtKey>,
    ) -> Result<bool> {
        let Some(rk) = self.split.remove(k) else {
            return Ok(false);
        };
        if Some(rk) == keep || self.tracked.contains_key(&rk) {
            return Ok(false);
        }
        t.remove(&rk)?;
        Ok(true)
    }

    /// Remove `keys` on `from`'s word: only the entries `from` installed.
    pub fn removes(&mut self, t: &mut dyn SessionTable, from: &str, keys: &[CtKey]) -> Result<()> {
        for k in keys {
            if self.tracked.get(k).is_none_or(|o| *o.sender != *from) {
                self.stats.ignored_removes += 1;
                continue;
            }
            t.remove(k)?;
            self.tracked.remove(k);
            if let Some(s) = self.snapshot.get_mut(from) {
                s.remove(k);
            }
            self.stats.removed += 1;
            if self.unsplit(t, k, None)? {
                self.stats.removed += 1;
            }
        }
        Ok(())
    }

    pub fn assoc_upserts(
        &mut self,
        t: &mut dyn SessionTable,
        from: &str,
        recs: &[AssocRecord],
    ) -> Result<()> {
        self.refresh(t, false)?;
        let from: Arc<str> = from.into();
        let mut refreshed = false;
        for r in recs {
            if self.owned.rule(&r.rule) {
                self.stats.ignored_owned += 1;
                continue;
            }
            let mut out = xlate::import_assoc(r, &self.index);
            if out.is_err() && !refreshed {
                self.refresh(t, true)?;
                refreshed = true;
                out = xlate::import_assoc(r, &self.index);
            }
            match out {
                Ok((k, v)) => {
                    t.put_assoc(&k, &v)?;
                    let vip = ip_from_addr(&r.rule.addr);
                    self.tracked_assoc.insert(
                        k,
                        Origin {
                            sender: from.clone(),
                            vip,
                        },
                    );
                    if let Some(s) = self.snapshot_assoc.get_mut(&from) {
                        s.insert(k);
                    }
                    self.stats.assoc_applied += 1;
                }
                Err(_) => {
                    self.stats.assoc_dropped += 1;
                    self.note_drop(&from);
                }
            }
        }
        Ok(())
    }

    pub fn assoc_removes(
        &mut self,
        t: &mut dyn SessionTable,
        from: &str,
        ids: &[AssocId],
    ) -> Result<()> {
        self.refresh(t, false)?;
        for (rule, vtag) in ids {
            let Some(rule_id) = self.index.rule_id(rule) else {
                continue;
            };
            let k = AssocKey {
                rule_id,
                vtag: *vtag,
            };
            if self
                .tracked_assoc
                .get(&k)
                .is_none_or(|o| *o.sender != *from)
            {
                self.stats.ignored_removes += 1;
                continue;
            }
            t.remove_assoc(&k)?;
            self.tracked_assoc.remove(&k);
            if let Some(s) = self.snapshot_assoc.get_mut(from) {
                s.remove(&k);
            }
            self.stats.assoc_removed += 1;
        }
        Ok(())
    }

    fn note_drop(&mut self, from: &Arc<str>) {
        if !self.dropped_since.contains_key(from) {
            self.dropped_since
                .insert(from.clone(), (Instant::now(), self.index.clone()));
        }
    }

    /// Whether to ask `from` for a new snapshot: entries it sent were
    /// dropped for want of a rule or endpoint, at least `after` ago, and
    /// this node's rules have changed since (a rule installed after its
    /// sessions arrived, e.g. the watchers of two nodes at different
    /// paces). Idle sessions are not resent otherwise.
    pub fn wants_resync(
        &mut self,
        t: &mut dyn SessionTable,
        from: &str,
        after: Duration,
    ) -> Result<bool> {
        let Some((at, _)) = self.dropped_since.get(from) else {
            return Ok(false);
        };
        if at.elapsed() < after {
            return Ok(false);
        }
        self.refresh(t, true)?;
        let (_, then) = &self.dropped_since[from];
        if *then == self.index {
            return Ok(false);
        }
        self.dropped_since.remove(from);
        self.stats.resyncs_requested += 1;
        Ok(true)
    }

    pub fn begin_snapshot(&mut self, from: &str) {
        self.dropped_since.remove(from);
        self.snapshot.insert(from.into(), HashSet::new());
        self.snapshot_assoc.insert(from.into(), HashSet::new());
    }

    /// End of `from`'s snapshot: entries it installed earlier that the
    /// snapshot did not hold are gone there; remove them. Returns how
    /// many.
    pub fn end_snapshot(&mut self, t: &mut dyn SessionTable, from: &str) -> Result<usize> {
        let Some(held) = self.snapshot.remove(from) else {
            return Ok(0);
        };
        let stale: Vec<CtKey> = self
            .tracked
            .iter()
            .filter(|(k, o)| *o.sender == *from && !held.contains(k))
            .map(|(k, _)| *k)
            .collect();
        let mut n = stale.len();
        for k in &stale {
            t.remove(k)?;
            self.tracked.remove(k);
            if self.unsplit(t, k, None)? {
                n += 1;
            }
        }
        let held_assoc = self.snapshot_assoc.remove(from).unwrap_or_default();
        let stale_assoc: Vec<AssocKey> = self
            .tracked_assoc
            .iter()
            .filter(|(k, o)| *o.sender == *from && !held_assoc.contains(k))
            .map(|(k, _)| *k)
            .collect();
        for k in &stale_assoc {
            t.remove_assoc(k)?;
            self.tracked_assoc.remove(k);
        }
        let n = n + stale_assoc.len();
        self.stats.stale_removed += n as u64;
        self.stats.snapshots += 1;
        Ok(n)
    }

    /// `from`'s snapshot cut short (the connection ended): keep what it
    /// wrote.
    pub fn abort_snapshot(&mut self, from: &str) {
        self.snapshot.remove(from);
        self.snapshot_assoc.remove(from);
    }

    /// This node owns `owned` now: the synced sessions of those VIPs are
    /// its own (no sender's snapshot or REMOVE touches them any more), and
    /// their records are no longer written.
    pub fn set_owned(&mut self, owned: &Owned) {
        self.tracked.retain(|_, o| !owned.contains(o.vip));
        // Their reply entries made here stay too, as that node's own.
        let tracked = &self.tracked;
        self.split.retain(|k, _| tracked.contains_key(k));
        self.tracked_assoc.retain(|_, o| !owned.contains(o.vip));
        self.owned = owned.clone();
    }

    /// Entries this node holds because a sender sent them (reply entries
    /// made here for them included).
    pub fn tracked(&self) -> usize {
        self.tracked.len() + self.split.len()
    }
}

#[cfg(test)]
mod tests {
    use super::super::{
        table::MemTable,
        wire::{self, Msg},
        xlate::tests as x,
    };
    use super::*;

    /// Sender: web is rule 1 (endpoints counters 0, 1). Receiver: another
    /// rule first, web is rule 2 (counters 5, 6).
    fn tables() -> (MemTable, MemTable) {
        let a = MemTable::default();
        a.with(|s| {
            s.svcs = vec![x::svc("20.0.0.100", 80, 1)];
            s.eps = vec![
                x::ep(1, 0, "10.0.1.10", 8080, 0),
                x::ep(1, 1, "10.0.1.11", 8080, 1),
            ];
            s.now_ns = 1_000_000_000_000;
        });
        let b = MemTable::default();
        b.with(|s| {
            s.svcs = vec![x::svc("20.0.0.101", 80, 1), x::svc("20.0.0.100", 80, 2)];
            s.eps = vec![
                x::ep(1, 0, "10.0.1.10", 8080, 4),
                x::ep(2, 0, "10.0.1.10", 8080, 5),
                x::ep(2, 1, "10.0.1.11", 8080, 6),
            ];
            s.now_ns = 50_000_000_000;
        });
        (a, b)
    }

    fn apply_frames(ap: &mut Applier, b: &mut MemTable, frames: &[Arc<Vec<u8>>]) {
        for f in frames {
            match wire::decode(&f[4..]).unwrap() {
                Msg::Upsert(r) => ap.upserts(b, "a", &r).unwrap(),
                Msg::Remove(k) => ap.removes(b, "a", &k).unwrap(),
                m => panic!("unexpected {m:?}"),
            }
        }
    }

    #[test]
    fn scan_apply_round_trip_renumbers_and_follows_removals() {
        let (mut a, mut b) = tables();
        let now = a.now_ns();
        let s1 = x::session(
            "192.168.0.2",
            40000,
            "20.0.0.100",
            "10.0.1.11",
            1,
            1,
            now - 3_000,
        );
        let s2 = x::session("192.168.0.3", 40000, "20.0.0.100", "10.0.1.10", 1, 0, now);
        // An entry of a rule the receiver lacks... and one the sender
        // itself no longer knows (skipped).
        let orphan = x::session("192.168.0.4", 1, "20.0.0.100", "10.0.1.10", 9, 0, now);
        a.with(|s| {
            s.ct.extend(s1.iter().chain(&s2).chain(&orphan[..1]).copied())
        });
        let mut sc = Scanner::new(Duration::from_secs(5), 64);
        let out = sc.scan(&mut a, &Owned::All).unwrap();
        assert_eq!((out.upserts, out.removes, out.skipped), (4, 0, 1));
        let mut ap = Applier::default();
        apply_frames(&mut ap, &mut b, &out.frames);
        assert_eq!(ap.stats.applied, 4);
        let bnow = b.now_ns();
        b.with(|s| {
            assert_eq!(s.ct.len(), 4);
            for (k, v) in s1 {
                let got = s.ct[&k];
                assert_eq!((got.rule_id, got.ep_stat), (2, 6));
                assert_eq!(got.last_seen_ns, bnow - 3_000);
                assert_eq!(
                    (got.xdaddr, got.xdport, k.peer(&got)),
                    (v.xdaddr, v.xdport, k.peer(&v))
                );
            }
            for (k, _) in s2 {
                assert_eq!((s.ct[&k].rule_id, s.ct[&k].ep_stat), (2, 5));
            }
        });
        // Nothing changed: nothing sent.
        assert!(sc.scan(&mut a, &Owned::All).unwrap().frames.is_empty());
        // s1 ends on the sender: gone on the receiver too.
        a.with(|s| {
            for (k, _) in s1 {
                s.ct.remove(&k);
            }
        });
        let out = sc.scan(&mut a, &Owned::All).unwrap();
        assert_eq!((out.upserts, out.removes), (0, 2));
        apply_frames(&mut ap, &mut b, &out.frames);
        b.with(|s| assert_eq!(s.ct.len(), 2));
        assert_eq!(ap.tracked(), 2);
    }

    #[test]
    fn a_session_the_sender_cannot_export_for_a_while_is_not_removed() {
        let (mut a, mut b) = tables();
        let now = a.now_ns();
        let s1 = x::session("192.168.0.2", 40000, "20.0.0.100", "10.0.1.11", 1, 1, now);
        a.with(|s| s.ct.extend(s1.iter().copied()));
        let mut sc = Scanner::new(Duration::from_secs(5), 64);
        let mut ap = Applier::default();
        let out = sc.scan(&mut a, &Owned::All).unwrap();
        apply_frames(&mut ap, &mut b, &out.frames);
        b.with(|s| assert_eq!(s.ct.len(), 2));
        // The sender's endpoint record is being rewritten while it scans:
        // the session cannot be exported, but it is still there.
        let eps = a.with(|s| std::mem::take(&mut s.eps));
        let out = sc.scan(&mut a, &Owned::All).unwrap();
        assert_eq!((out.upserts, out.removes, out.skipped), (0, 0, 2));
        assert_eq!(out.state.len(), 2, "kept in the snapshot state");
        apply_frames(&mut ap, &mut b, &out.frames);
        b.with(|s| assert_eq!(s.ct.len(), 2, "the receiver keeps it"));
        // Back: nothing to send; gone for good: removed.
        a.with(|s| s.eps = eps);
        assert!(sc.scan(&mut a, &Owned::All).unwrap().frames.is_empty());
        a.with(|s| s.ct.clear());
        let out = sc.scan(&mut a, &Owned::All).unwrap();
        assert_eq!((out.upserts, out.removes), (0, 2));
        apply_frames(&mut ap, &mut b, &out.frames);
        b.with(|s| assert!(s.ct.is_empty()));
    }

    #[test]
    fn receiver_without_the_rule_or_endpoint_drops_and_counts() {
        let (mut a, mut b) = tables();
        let now = a.now_ns();
        a.with(|s| {
            s.ct.extend(x::session(
                "192.168.0.2",
                1,
                "20.0.0.100",
                "10.0.1.10",
                1,
                0,
                now,
            ))
        });
        b.with(|s| s.eps.retain(|(k, _)| k.rule_id != 2));
        let mut sc = Scanner::new(Duration::from_secs(5), 64);
        let mut ap = Applier::default();
        apply_frames(
            &mut ap,
            &mut b,
            &sc.scan(&mut a, &Owned::All).unwrap().frames,
        );
        assert_eq!(ap.stats.dropped_no_endpoint, 2);
        // The endpoint arrives here: a resync is wanted (once, and not
        // before `after`).
        assert!(!ap.wants_resync(&mut b, "a", Duration::ZERO).unwrap());
        b.with(|s| s.eps.push(x::ep(2, 0, "10.0.1.10", 8080, 5)));
        assert!(!ap
            .wants_resync(&mut b, "a", Duration::from_secs(60))
            .unwrap());
        assert!(ap.wants_resync(&mut b, "a", Duration::ZERO).unwrap());
        assert!(!ap.wants_resync(&mut b, "a", Duration::ZERO).unwrap());
        assert_eq!(ap.stats.resyncs_requested, 1);
        b.with(|s| s.eps.retain(|(k, _)| k.rule_id != 2));
        b.with(|s| s.svcs.clear());
        a.with(|s| {
            s.ct.extend(x::session(
                "192.168.0.9",
                1,
                "20.0.0.100",
                "10.0.1.10",
                1,
                0,
                now,
            ))
        });
        // The receiver's view of its rules is refreshed on a miss (a new
        // applier: this one's view is younger than its 1 s lifetime, and
        // holds the endpoint it saw last).
        let mut ap = Applier::default();
        apply_frames(
            &mut ap,
            &mut b,
            &sc.scan(&mut a, &Owned::All).unwrap().frames,
        );
        assert_eq!(ap.stats.dropped_no_rule, 2);
        b.with(|s| assert!(s.ct.is_empty()));
    }

    #[test]
    fn a_key_the_walk_missed_is_not_reported_removed() {
        // A table whose walk misses one entry that a lookup still finds.
        struct Flaky(MemTable, Option<CtKey>);
        impl SessionTable for Flaky {
            fn sessions(&mut self) -> Result<Vec<(CtKey, loxilb_common::CtVal)>> {
                let mut v = self.0.sessions()?;
                v.retain(|(k, _)| Some(*k) != self.1);
                Ok(v)
            }
            fn get(&mut self, k: &CtKey) -> Result<Option<loxilb_common::CtVal>> {
                self.0.get(k)
            }
            fn put(&mut self, k: &CtKey, v: &loxilb_common::CtVal) -> Result<()> {
                self.0.put(k, v)
            }
            fn remove(&mut self, k: &CtKey) -> Result<()> {
                self.0.remove(k)
            }
            fn services(&mut self) -> Result<Vec<(loxilb_common::SvcKey, loxilb_common::SvcVal)>> {
                self.0.services()
            }
            fn endpoints(&mut self) -> Result<Vec<(loxilb_common::EpKey, loxilb_common::EpVal)>> {
                self.0.endpoints()
            }
            fn now_ns(&self) -> u64 {
                self.0.now_ns()
            }
        }
        let (a, _) = tables();
        let s = x::session("192.168.0.2", 1, "20.0.0.100", "10.0.1.10", 1, 0, 0);
        a.with(|st| st.ct.extend(s));
        let mut f = Flaky(a, None);
        let mut sc = Scanner::new(Duration::from_secs(5), 64);
        sc.scan(&mut f, &Owned::All).unwrap();
        f.1 = Some(s[0].0);
        let out = sc.scan(&mut f, &Owned::All).unwrap();
        assert_eq!((out.upserts, out.removes), (0, 0));
    }

    #[test]
    fn associations_follow_with_their_own_ids() {
        let (mut a, mut b) = tables();
        let v = loxilb_common::AssocVal {
            eps: [x::a("10.0.1.11"), [0; 4], [0; 4], [0; 4]],
            ep_port: 8080u16.to_be(),
            ep_stat: 1,
            n_pairs: 1,
            ctag: 5,
            etag: 6,
            ..Default::default()
        };
        let (kc, ke) = (
            AssocKey {
                rule_id: 1,
                vtag: 5,
            },
            AssocKey {
                rule_id: 1,
                vtag: 6,
            },
        );
        a.with(|s| {
            s.assoc.insert(kc, v);
            s.assoc.insert(ke, v);
        });
        let mut sc = Scanner::new(Duration::from_secs(5), 64);
        let mut ap = Applier::default();
        let out = sc.scan(&mut a, &Owned::All).unwrap();
        assert_eq!(out.assoc_upserts, 2);
        for f in &out.frames {
            match wire::decode(&f[4..]).unwrap() {
                Msg::AssocUpsert(r) => ap.assoc_upserts(&mut b, "a", &r).unwrap(),
                m => panic!("{m:?}"),
            }
        }
        // (Built outside the closure: rustc 1.95 miscompiles a struct
        // update of `AssocVal` captured by it: an ICE.)
        let mut want = v;
        want.ep_stat = 6;
        let got = b.with(|s| {
            assert_eq!(s.assoc.len(), 2);
            s.assoc[&AssocKey {
                rule_id: 2,
                vtag: 5,
            }]
        });
        assert_eq!(got, want);
        a.with(|s| s.assoc.remove(&ke));
        let out = sc.scan(&mut a, &Owned::All).unwrap();
        assert_eq!((out.assoc_upserts, out.assoc_removes), (0, 1));
        for f in &out.frames {
            match wire::decode(&f[4..]).unwrap() {
                Msg::AssocRemove(r) => ap.assoc_removes(&mut b, "a", &r).unwrap(),
                m => panic!("{m:?}"),
            }
        }
        b.with(|s| assert_eq!(s.assoc.len(), 1));
        // A snapshot without it drops the other.
        ap.begin_snapshot("a");
        assert_eq!(ap.end_snapshot(&mut b, "a").unwrap(), 1);
        b.with(|s| assert!(s.assoc.is_empty()));
    }

    #[test]
    fn a_snapshot_removes_what_an_earlier_sync_left_and_nothing_local() {
        let (mut a, mut b) = tables();
        let now = a.now_ns();
        let s1 = x::session("192.168.0.2", 1, "20.0.0.100", "10.0.1.10", 1, 0, now);
        let s2 = x::session("192.168.0.3", 1, "20.0.0.100", "10.0.1.10", 1, 0, now);
        let local = x::session("192.168.0.7", 1, "20.0.0.100", "10.0.1.10", 2, 5, 0);
        a.with(|s| s.ct.extend(s1.iter().chain(&s2).copied()));
        b.with(|s| s.ct.extend(local));
        let mut ap = Applier::default();
        let mut sc = Scanner::new(Duration::from_secs(5), 64);
        apply_frames(
            &mut ap,
            &mut b,
            &sc.scan(&mut a, &Owned::All).unwrap().frames,
        );
        // Disconnected; s1 ends meanwhile; a new sender snapshot holds s2.
        a.with(|s| {
            for (k, _) in s1 {
                s.ct.remove(&k);
            }
        });
        let mut sc = Scanner::new(Duration::from_secs(5), 3);
        let st = sc.scan(&mut a, &Owned::All).unwrap().state;
        ap.begin_snapshot("a");
        let order = delta::snapshot_order(&st);
        for f in delta::upsert_frames(&order, &st, 3, now) {
            let Msg::Upsert(r) = wire::decode(&f[4..]).unwrap() else {
                panic!()
            };
            ap.upserts(&mut b, "a", &r).unwrap();
        }
        assert_eq!(ap.end_snapshot(&mut b, "a").unwrap(), 2);
        b.with(|s| {
            assert_eq!(s.ct.len(), 4, "s2 and the local session");
            assert!(s.ct.contains_key(&local[0].0) && s.ct.contains_key(&s2[1].0));
        });
        assert_eq!(ap.stats.snapshots, 1);
    }

    fn vips(v: &[&str]) -> Owned {
        Owned::Vips(v.iter().map(|a| a.parse().unwrap()).collect())
    }

    /// Two rules (20.0.0.100 rule 1, 20.0.0.101 rule 3) on one node.
    fn two_rules(t: &MemTable) {
        t.with(|s| {
            s.svcs.push(x::svc("20.0.0.101", 80, 3));
            s.eps.push(x::ep(3, 0, "10.0.1.10", 8080, 9));
        });
    }

    #[test]
    fn a_scan_streams_the_owned_vips_only_and_a_vip_given_up_is_not_removed() {
        let (mut a, _) = tables();
        two_rules(&a);
        let now = a.now_ns();
        let s100 = x::session("192.168.0.2", 1, "20.0.0.100", "10.0.1.10", 1, 0, now);
        let s101 = x::session("192.168.0.3", 1, "20.0.0.101", "10.0.1.10", 3, 9, now);
        a.with(|s| s.ct.extend(s100.iter().chain(&s101).copied()));
        let mut sc = Scanner::new(Duration::from_secs(5), 64);
        let out = sc.scan(&mut a, &vips(&["20.0.0.100"])).unwrap();
        assert_eq!((out.upserts, out.removes, out.not_owned), (2, 0, 2));
        assert!(out.state.contains_key(&s100[0].0) && !out.state.contains_key(&s101[0].0));
        // 20.0.0.101 taken too: its sessions appear as new.
        let out = sc.scan(&mut a, &Owned::All).unwrap();
        assert_eq!((out.upserts, out.removes, out.not_owned), (2, 0, 0));
        // 20.0.0.100 given up: no REMOVE (its new owner has them), and
        // its sessions leave the snapshot.
        let out = sc.scan(&mut a, &vips(&["20.0.0.101"])).unwrap();
        assert_eq!((out.upserts, out.removes, out.not_owned), (0, 0, 2));
        assert_eq!(out.state.len(), 2);
        assert!(out.state.contains_key(&s101[1].0));
        // ... and one of its sessions ending is not this node's to tell.
        a.with(|s| {
            for (k, _) in s100 {
                s.ct.remove(&k);
            }
        });
        let out = sc.scan(&mut a, &vips(&["20.0.0.101"])).unwrap();
        assert_eq!((out.upserts, out.removes), (0, 0));
        assert!(sc.scan(&mut a, &Owned::None).unwrap().state.is_empty());
    }

    #[test]
    fn two_senders_touch_only_their_own_entries_and_never_an_owned_vip() {
        let (_, mut b) = tables();
        b.with(|s| {
            s.svcs.push(x::svc("20.0.0.102", 80, 3));
            s.eps.push(x::ep(3, 0, "10.0.1.10", 8080, 9));
        });
        let now = b.now_ns();
        // What two senders stream: their sessions as records.
        let recs = |vip: &str, client: &str| -> Vec<Record> {
            let (mut t, _) = tables();
            t.with(|s| {
                s.svcs = vec![x::svc(vip, 80, 1)];
                s.ct.extend(x::session(client, 1, vip, "10.0.1.10", 1, 0, now));
            });
            let out = Scanner::new(Duration::from_secs(5), 64)
                .scan(&mut t, &Owned::All)
                .unwrap();
            out.state.values().map(|e| e.rec).collect()
        };
        let (ra, rb) = (
            recs("20.0.0.100", "192.168.0.2"),
            recs("20.0.0.102", "192.168.0.3"),
        );
        let mut ap = Applier::default();
        ap.upserts(&mut b, "a", &ra).unwrap();
        ap.upserts(&mut b, "b", &rb).unwrap();
        b.with(|s| assert_eq!(s.ct.len(), 4));
        // Snapshots of the two interleave; a's holds nothing: only a's
        // entries go.
        ap.begin_snapshot("a");
        ap.begin_snapshot("b");
        ap.upserts(&mut b, "b", &rb).unwrap();
        assert_eq!(ap.end_snapshot(&mut b, "a").unwrap(), 2);
        assert_eq!(ap.end_snapshot(&mut b, "b").unwrap(), 0);
        b.with(|s| {
            assert_eq!(s.ct.len(), 2);
            assert!(rb.iter().all(|r| s.ct.contains_key(&r.key)));
        });
        // a's REMOVE of b's entries: ignored.
        let keys: Vec<CtKey> = rb.iter().map(|r| r.key).collect();
        ap.removes(&mut b, "a", &keys).unwrap();
        assert_eq!(ap.stats.ignored_removes, 2);
        b.with(|s| assert_eq!(s.ct.len(), 2));
        // This node takes 20.0.0.102: b's entries are its own now (b's
        // snapshot no longer removes them) and b's records are not written.
        ap.set_owned(&vips(&["20.0.0.102"]));
        assert_eq!(ap.tracked(), 0);
        ap.begin_snapshot("b");
        assert_eq!(ap.end_snapshot(&mut b, "b").unwrap(), 0);
        ap.removes(&mut b, "b", &keys).unwrap();
        b.with(|s| assert_eq!(s.ct.len(), 2, "owned sessions stay"));
        let mut changed = rb.clone();
        for r in &mut changed {
            r.ep_port = 1;
        }
        ap.upserts(&mut b, "b", &changed).unwrap();
        assert_eq!(ap.stats.ignored_owned, 2);
        b.with(|s| {
            assert!(
                rb.iter().all(|r| s.ct[&r.key].ep_stat == 9),
                "not overwritten"
            )
        });
        // a's, of a VIP this node does not own, are written again.
        ap.upserts(&mut b, "a", &ra).unwrap();
        b.with(|s| assert_eq!(s.ct.len(), 4));
    }

    use loxilb_common::{addr_fold, ct_dir, ct_state, ep_index_flags, ep_index_slot, IPPROTO_TCP};

    const CLIENT: &str = "192.168.0.2";

    /// A one-entry session CLIENT:`cport` -> 20.0.0.100:80 -> 10.0.1.10:8080
    /// on the sender (rule 1, endpoint counter 0), handshake still open.
    fn one(cport: u16, now: u64) -> (CtKey, CtVal) {
        let [(k, v), _] = x::session(CLIENT, cport, "20.0.0.100", "10.0.1.10", 1, 0, now);
        (
            k,
            CtVal {
                state: ct_state::ONE | ct_state::OPENING,
                rpackets: 4,
                rbytes: 300,
                rnh: v.nh,
                ..v
            },
        )
    }

    /// Slot of endpoint `ep`:`port` (TCP) in `t`'s endpoint index set to
    /// `e` (`None`: empty).
    fn set_index(t: &MemTable, ep: &str, port: u16, e: Option<EpIndex>) {
        let slot = ep_index_slot(addr_fold(&x::a(ep)), port.to_be(), IPPROTO_TCP);
        t.with(|s| match e {
            Some(e) => s.ep_index.insert(slot, e),
            None => s.ep_index.remove(&slot),
        });
    }

    /// An index slot: endpoint `ep`:`port` (TCP) serves `vip`:`vport`.
    fn slot(ep: &str, port: u16, vip: &str, vport: u16, flags: u8) -> EpIndex {
        EpIndex {
            addr: x::a(ep),
            vip: x::a(vip),
            port: port.to_be(),
            vport: vport.to_be(),
            proto: IPPROTO_TCP,
            flags,
            _pad2: 0,
        }
    }

    /// What the sender streams of its table.
    fn records(a: &mut MemTable) -> Vec<Record> {
        let out = Scanner::new(Duration::from_secs(5), 64)
            .scan(a, &Owned::All)
            .unwrap();
        out.state.values().map(|e| e.rec).collect()
    }

    /// The key of the reply entry of session CLIENT:`cport` ->
    /// 10.0.1.10:8080 (a two-entry session's, as the datapath makes it).
    fn reply_key(cport: u16) -> CtKey {
        x::session(CLIENT, cport, "20.0.0.100", "10.0.1.10", 1, 0, 0)[1].0
    }

    #[test]
    fn a_one_entry_session_the_index_serves_stays_one_entry() {
        let (mut a, mut b) = tables();
        let (k, v) = one(40000, a.now());
        a.with(|s| s.ct.insert(k, v));
        set_index(
            &b,
            "10.0.1.10",
            8080,
            Some(slot("10.0.1.10", 8080, "20.0.0.100", 80, 0)),
        );
        let recs = records(&mut a);
        assert_eq!(recs.len(), 1, "one record: the sender has one entry");
        let mut ap = Applier::default();
        ap.upserts(&mut b, "a", &recs).unwrap();
        b.with(|s| {
            assert_eq!(s.ct.len(), 1, "{:?}", s.ct);
            let got = s.ct[&k];
            assert_eq!(got.state, ct_state::ONE | ct_state::OPENING);
            assert_eq!((got.rule_id, got.ep_stat), (2, 5));
            assert_eq!((got.rpackets, got.rbytes), (0, 0));
        });
        assert_eq!((ap.stats.applied, ap.stats.one_split), (1, 0));
        assert_eq!(ap.tracked(), 1);
    }

    #[test]
    fn a_one_entry_session_the_index_does_not_serve_gets_its_reply_entry_here() {
        let cases = [
            ("no index entry", None),
            (
                "another VIP",
                Some(slot("10.0.1.10", 8080, "20.0.0.101", 80, 0)),
            ),
            (
                "another service port",
                Some(slot("10.0.1.10", 8080, "20.0.0.100", 81, 0)),
            ),
            // Another endpoint in the slot (one that hashes to it).
            (
                "a collision",
                Some(slot("10.0.1.99", 8080, "20.0.0.100", 80, 0)),
            ),
            (
                "draining",
                Some(slot(
                    "10.0.1.10",
                    8080,
                    "20.0.0.100",
                    80,
                    ep_index_flags::DRAINING,
                )),
            ),
        ];
        for (what, e) in cases {
            let (mut a, mut b) = tables();
            let (k, v) = one(40000, a.now() - 2_000);
            a.with(|s| s.ct.insert(k, v));
            set_index(&b, "10.0.1.10", 8080, e);
            let mut ap = Applier::default();
            let out = Scanner::new(Duration::from_secs(5), 64)
                .scan(&mut a, &Owned::All)
                .unwrap();
            apply_frames(&mut ap, &mut b, &out.frames);
            let bnow = b.now();
            let rk = reply_key(40000);
            assert_eq!(rk, k.peer(&CtVal { state: 0, ..v }).unwrap());
            b.with(|s| {
                assert_eq!(s.ct.len(), 2, "{what}: {:?}", s.ct);
                let fwd = CtVal {
                    rule_id: 2,
                    ep_stat: 5,
                    last_seen_ns: bnow - 2_000,
                    nh: Default::default(),
                    state: ct_state::OPENING,
                    rpackets: 0,
                    rbytes: 0,
                    rnh: Default::default(),
                    ..v
                };
                assert_eq!(s.ct.get(&k), Some(&fwd), "{what}: the forward entry");
                let rev = CtVal {
                    xsaddr: x::a("20.0.0.100"),
                    xdaddr: x::a(CLIENT),
                    xsport: 80u16.to_be(),
                    xdport: 40000u16.to_be(),
                    rule_id: 2,
                    timeout_s: 300,
                    last_seen_ns: bnow - 2_000,
                    dir: ct_dir::REPLY,
                    state: ct_state::OPENING,
                    mode: v.mode,
                    ep_stat: 5,
                    ..Default::default()
                };
                assert_eq!(s.ct.get(&rk), Some(&rev), "{what}: the reply entry");
            });
            assert_eq!((ap.stats.applied, ap.stats.one_split), (1, 1), "{what}");
            assert_eq!(ap.tracked(), 2, "{what}");
        }
    }

    #[test]
    fn the_reply_entry_made_here_goes_with_its_forward_entry() {
        let (mut a, mut b) = tables();
        let (k, v) = one(40000, a.now());
        a.with(|s| s.ct.insert(k, v));
        let mut sc = Scanner::new(Duration::from_secs(5), 64);
        let mut ap = Applier::default();
        apply_frames(
            &mut ap,
            &mut b,
            &sc.scan(&mut a, &Owned::All).unwrap().frames,
        );
        b.with(|s| assert_eq!(s.ct.len(), 2));
        // Another sender's REMOVE of the key: ignored, both stay.
        ap.removes(&mut b, "c", &[k]).unwrap();
        b.with(|s| assert_eq!(s.ct.len(), 2));
        // The session ends on the sender: a REMOVE of its one key.
        a.with(|s| s.ct.clear());
        let out = sc.scan(&mut a, &Owned::All).unwrap();
        assert_eq!(out.removes, 1);
        apply_frames(&mut ap, &mut b, &out.frames);
        b.with(|s| assert!(s.ct.is_empty(), "{:?}", s.ct));
        assert_eq!(ap.stats.removed, 2);
        assert_eq!(ap.tracked(), 0);
    }

    #[test]
    fn a_session_split_here_then_sent_with_two_entries_keeps_the_senders_reply_entry() {
        let (mut a, mut b) = tables();
        let (k, v) = one(40000, a.now());
        let mut ap = Applier::default();
        a.with(|s| s.ct.insert(k, v));
        ap.upserts(&mut b, "a", &records(&mut a)).unwrap();
        // A new session of the same tuple, of two entries on the sender.
        let pair = x::session(CLIENT, 40000, "20.0.0.100", "10.0.1.10", 1, 0, a.now());
        a.with(|s| {
            s.ct.clear();
            s.ct.extend(pair);
        });
        ap.upserts(&mut b, "a", &records(&mut a)).unwrap();
        b.with(|s| {
            assert_eq!(s.ct.len(), 2);
            assert_eq!(s.ct[&pair[1].0].packets, 3, "the sender's reply entry");
        });
        // Its forward entry's REMOVE leaves the sender's reply entry.
        ap.removes(&mut b, "a", &[k]).unwrap();
        b.with(|s| assert_eq!(s.ct.keys().collect::<Vec<_>>(), [&pair[1].0]));
    }

    #[test]
    fn a_snapshot_keeps_the_reply_entry_made_here_with_its_forward_key_and_removes_both_without_it()
    {
        let (mut a, mut b) = tables();
        let (k1, v1) = one(40000, a.now());
        let (k2, v2) = one(40001, a.now());
        a.with(|s| s.ct.insert(k1, v1));
        let mut ap = Applier::default();
        ap.upserts(&mut b, "a", &records(&mut a)).unwrap();
        // A snapshot holding the session: nothing goes.
        ap.begin_snapshot("a");
        ap.upserts(&mut b, "a", &records(&mut a)).unwrap();
        assert_eq!(ap.end_snapshot(&mut b, "a").unwrap(), 0);
        b.with(|s| {
            assert!(s.ct.contains_key(&k1) && s.ct.contains_key(&reply_key(40000)));
            assert_eq!(s.ct.len(), 2);
        });
        // One without it (another session instead): both its entries go.
        a.with(|s| {
            s.ct.clear();
            s.ct.insert(k2, v2);
        });
        ap.begin_snapshot("a");
        ap.upserts(&mut b, "a", &records(&mut a)).unwrap();
        assert_eq!(ap.end_snapshot(&mut b, "a").unwrap(), 2);
        b.with(|s| {
            let mut keys: Vec<CtKey> = s.ct.keys().copied().collect();
            keys.sort_by_key(|k| (k.sport, k.dport));
            let mut want = vec![k2, reply_key(40001)];
            want.sort_by_key(|k| (k.sport, k.dport));
            assert_eq!(keys, want);
        });
        assert_eq!(ap.stats.stale_removed, 2);
        // This node takes the VIP: both entries are its own (no snapshot
        // of the sender removes them).
        ap.set_owned(&vips(&["20.0.0.100"]));
        assert_eq!(ap.tracked(), 0);
        ap.begin_snapshot("a");
        assert_eq!(ap.end_snapshot(&mut b, "a").unwrap(), 0);
        b.with(|s| assert_eq!(s.ct.len(), 2));
    }

    #[test]
    fn a_split_session_the_index_serves_later_is_one_entry_again() {
        let (mut a, mut b) = tables();
        let (k, v) = one(40000, a.now());
        a.with(|s| s.ct.insert(k, v));
        let recs = records(&mut a);
        let mut ap = Applier::default();
        ap.upserts(&mut b, "a", &recs).unwrap();
        b.with(|s| assert_eq!(s.ct.len(), 2));
        // The slot is written here now; the receiver's view of its rules
        // and index is refreshed with them (at most INDEX_TTL old).
        set_index(
            &b,
            "10.0.1.10",
            8080,
            Some(slot("10.0.1.10", 8080, "20.0.0.100", 80, 0)),
        );
        ap.upserts(&mut b, "a", &recs).unwrap();
        b.with(|s| assert_eq!(s.ct.len(), 2, "not before the view is refreshed"));
        ap.index_at = None;
        ap.upserts(&mut b, "a", &recs).unwrap();
        b.with(|s| {
            assert_eq!(s.ct.len(), 1, "{:?}", s.ct);
            assert_ne!(s.ct[&k].state & ct_state::ONE, 0);
        });
        assert_eq!(ap.tracked(), 1);
        // Draining: two entries again.
        set_index(
            &b,
            "10.0.1.10",
            8080,
            Some(slot(
                "10.0.1.10",
                8080,
                "20.0.0.100",
                80,
                ep_index_flags::DRAINING,
            )),
        );
        ap.index_at = None;
        ap.upserts(&mut b, "a", &recs).unwrap();
        b.with(|s| {
            assert_eq!(s.ct.len(), 2);
            assert_eq!(s.ct[&k].state & ct_state::ONE, 0);
        });
        assert_eq!(ap.stats.one_split, 3);
    }
}
