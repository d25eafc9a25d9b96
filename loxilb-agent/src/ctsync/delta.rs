//! What changed between two scans of the session table, and how changes
//! are cut into batches (a session's two entries never split).

use std::collections::{HashMap, HashSet};

use loxilb_common::CtKey;

use super::wire::{self, AssocId, AssocRecord, Record};

/// One exported entry as the sender last scanned it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The record (its `age_ns` unused: see `last_seen_ns`).
    pub rec: Record,
    /// The sender's clock of the entry's last packet.
    pub last_seen_ns: u64,
    /// `last_seen_ns` as of the last time the entry was sent.
    pub sent_last_seen_ns: u64,
}

/// Every exported entry of the last scan.
pub type State = HashMap<CtKey, Entry>;

/// Changes since the previous scan: entries to (re)send, keys removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Delta {
    /// In send order: a session's two entries next to each other.
    pub upserts: Vec<CtKey>,
    pub removes: Vec<CtKey>,
}

const NS: u64 = 1_000_000_000;

/// Whether an entry whose only change is a newer last packet must be sent
/// again: when the receiver's copy would be older than `refresh_ns`, or
/// than a quarter of the entry's idle timeout (so that the receiver never
/// expires a live session).
pub fn needs_refresh(e: &Entry, refresh_ns: u64) -> bool {
    let idle_s = loxilb_common::idle_timeout_s(e.rec.timeout_s, e.rec.state);
    let limit = refresh_ns.min(idle_s as u64 * NS / 4).max(1);
    e.last_seen_ns > e.sent_last_seen_ns && e.last_seen_ns - e.sent_last_seen_ns >= limit
}

/// The new state from this scan's entries (record, last seen), and what
/// changed against `prev`.
pub fn diff(prev: &State, scanned: Vec<(Record, u64)>, refresh_ns: u64) -> (State, Delta) {
    let mut next: State = HashMap::with_capacity(scanned.len());
    let mut changed: HashSet<CtKey> = HashSet::new();
    for (rec, last_seen_ns) in scanned {
        let mut e = Entry {
            rec,
            last_seen_ns,
            sent_last_seen_ns: last_seen_ns,
        };
        match prev.get(&rec.key) {
            Some(p) if p.rec.semantic() == rec.semantic() => {
                e.sent_last_seen_ns = p.sent_last_seen_ns;
                if needs_refresh(&e, refresh_ns) {
                    e.sent_last_seen_ns = last_seen_ns;
                    changed.insert(rec.key);
                }
            }
            _ => {
                changed.insert(rec.key);
            }
        }
        next.insert(rec.key, e);
    }
    let mut removes: Vec<CtKey> = prev
        .keys()
        .filter(|k| !next.contains_key(k))
        .copied()
        .collect();
    removes.sort_by_key(key_order);
    let mut keys: Vec<CtKey> = changed.into_iter().collect();
    keys.sort_by_key(key_order);
    let upserts = pair_up(&keys, &next, |k| {
        keys.binary_search_by_key(&key_order(k), key_order).is_ok()
    });
    (next, Delta { upserts, removes })
}

fn key_order(k: &CtKey) -> ([u32; 4], [u32; 4], u16, u16, u8) {
    (k.saddr, k.daddr, k.sport, k.dport, k.proto)
}

/// `keys` reordered so that an entry is followed by its peer when the
/// peer is also included (`included`), each key once.
fn pair_up(keys: &[CtKey], state: &State, included: impl Fn(&CtKey) -> bool) -> Vec<CtKey> {
    let mut done: HashSet<CtKey> = HashSet::with_capacity(keys.len());
    let mut out = Vec::with_capacity(keys.len());
    for k in keys {
        if !done.insert(*k) {
            continue;
        }
        out.push(*k);
        if let Some(e) = state.get(k) {
            let p = e.rec.peer;
            if p != *k && state.contains_key(&p) && included(&p) && done.insert(p) {
                out.push(p);
            }
        }
    }
    out
}

/// Every key of `state`, a session's entries next to each other.
pub fn snapshot_order(state: &State) -> Vec<CtKey> {
    let mut keys: Vec<CtKey> = state.keys().copied().collect();
    keys.sort_by_key(key_order);
    pair_up(&keys, state, |_| true)
}

/// Cut `keys` (in send order) into batches of at most `max` (>= 2) keys,
/// never between an entry and its peer when they are adjacent.
pub fn batches(keys: &[CtKey], state: &State, max: usize) -> Vec<Vec<CtKey>> {
    let max = max.clamp(2, wire::MAX_BATCH);
    let mut out: Vec<Vec<CtKey>> = vec![];
    let mut cur: Vec<CtKey> = Vec::with_capacity(max.min(keys.len()));
    let mut i = 0;
    while i < keys.len() {
        let pair = i + 1 < keys.len()
            && state
                .get(&keys[i])
                .is_some_and(|e| e.rec.peer == keys[i + 1]);
        let n = if pair { 2 } else { 1 };
        if cur.len() + n > max {
            out.push(std::mem::take(&mut cur));
        }
        cur.extend_from_slice(&keys[i..i + n]);
        i += n;
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// The UPSERT frames for `keys` of `state`, ages on the sender's clock
/// `now_ns`.
pub fn upsert_frames(keys: &[CtKey], state: &State, max: usize, now_ns: u64) -> Vec<Vec<u8>> {
    batches(keys, state, max)
        .iter()
        .map(|b| {
            let recs: Vec<Record> = b
                .iter()
                .filter_map(|k| state.get(k))
                .map(|e| Record {
                    age_ns: now_ns.saturating_sub(e.last_seen_ns),
                    ..e.rec
                })
                .collect();
            wire::encode_upsert(&recs)
        })
        .collect()
}

/// The REMOVE frames for `keys`.
pub fn remove_frames(keys: &[CtKey], max: usize) -> Vec<Vec<u8>> {
    keys.chunks(max.clamp(1, wire::MAX_BATCH))
        .map(wire::encode_remove)
        .collect()
}

/// Every exported SCTP association entry of the last scan.
pub type AssocState = HashMap<AssocId, AssocRecord>;

/// The new association state and what changed against `prev`:
/// (state, new or changed ids, removed ids).
pub fn diff_assocs(
    prev: &AssocState,
    scanned: Vec<AssocRecord>,
) -> (AssocState, Vec<AssocId>, Vec<AssocId>) {
    let next: AssocState = scanned.into_iter().map(|r| (r.id(), r)).collect();
    let upserts = next
        .iter()
        .filter(|(id, r)| prev.get(id) != Some(r))
        .map(|(id, _)| *id)
        .collect();
    let removes = prev
        .keys()
        .filter(|id| !next.contains_key(id))
        .copied()
        .collect();
    (next, upserts, removes)
}

/// The ASSOC_UPSERT frames for `ids` of `state`.
pub fn assoc_frames(ids: &[AssocId], state: &AssocState, max: usize) -> Vec<Vec<u8>> {
    ids.chunks(max.clamp(1, wire::MAX_ASSOC_BATCH))
        .map(|c| {
            let recs: Vec<AssocRecord> = c.iter().filter_map(|id| state.get(id)).copied().collect();
            wire::encode_assoc_upsert(&recs)
        })
        .collect()
}

/// The ASSOC_REMOVE frames for `ids`.
pub fn assoc_remove_frames(ids: &[AssocId], max: usize) -> Vec<Vec<u8>> {
    ids.chunks(max.clamp(1, wire::MAX_ASSOC_BATCH))
        .map(wire::encode_assoc_remove)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::xlate::{export, tests as x, SenderIndex};
    use super::*;

    fn idx() -> SenderIndex {
        SenderIndex::build(
            &[x::svc("20.0.0.100", 80, 1)],
            &[
                x::ep(1, 0, "10.0.1.10", 8080, 0),
                x::ep(1, 1, "10.0.1.11", 8080, 1),
            ],
        )
    }

    /// `n` sessions (2n entries) as scanned records.
    fn scan(n: u16, now: u64) -> Vec<(Record, u64)> {
        let idx = idx();
        (0..n)
            .flat_map(|i| {
                x::session(
                    "192.168.0.2",
                    1000 + i,
                    "20.0.0.100",
                    "10.0.1.10",
                    1,
                    0,
                    now,
                )
            })
            .map(|(k, v)| (export(&k, &v, &idx).unwrap(), v.last_seen_ns))
            .collect()
    }

    #[test]
    fn new_entries_then_nothing_then_changes_and_removals() {
        let (s1, d1) = diff(&State::new(), scan(3, 100), 5 * NS);
        assert_eq!(d1.upserts.len(), 6);
        assert!(d1.removes.is_empty());
        // Pairs travel together.
        for p in d1.upserts.chunks(2) {
            assert_eq!(s1[&p[0]].rec.peer, p[1]);
        }
        // Unchanged: nothing to send (a packet's counters alone do not count).
        let mut again = scan(3, 100);
        again[0].0.packets += 10;
        let (s2, d2) = diff(&s1, again, 5 * NS);
        assert_eq!(d2, Delta::default());
        // A state change of one entry: that entry only. One session gone:
        // both its keys removed.
        let mut third = scan(2, 100);
        third[1].0.state = 8;
        let gone: Vec<CtKey> = scan(3, 100)[4..].iter().map(|(r, _)| r.key).collect();
        let (s3, d3) = diff(&s2, third.clone(), 5 * NS);
        assert_eq!(d3.upserts, vec![third[1].0.key]);
        let mut want = gone.clone();
        want.sort_by_key(key_order);
        assert_eq!(d3.removes, want);
        assert_eq!(s3.len(), 4);
    }

    #[test]
    fn a_newer_last_packet_is_resent_only_past_the_refresh_limit() {
        let (s1, _) = diff(&State::new(), scan(1, 0), 5 * NS);
        // 1 s later: not yet (refresh 5 s, timeout 300 s).
        let (s2, d) = diff(&s1, scan(1, NS), 5 * NS);
        assert!(d.upserts.is_empty());
        // 5 s after the last send: both entries again, together.
        let (s3, d) = diff(&s2, scan(1, 5 * NS), 5 * NS);
        assert_eq!(d.upserts.len(), 2);
        // The send moved the reference point.
        let (_, d) = diff(&s3, scan(1, 6 * NS), 5 * NS);
        assert!(d.upserts.is_empty());
        // A closing session (timeout 10 s) refreshes every 2.5 s.
        let mut e = s1.values().next().copied().unwrap();
        e.rec.timeout_s = 10;
        e.last_seen_ns = e.sent_last_seen_ns + 2_500_000_000;
        assert!(needs_refresh(&e, 5 * NS));
        e.last_seen_ns -= 1;
        assert!(!needs_refresh(&e, 5 * NS));
    }

    #[test]
    fn batches_never_split_a_session_and_respect_the_limit() {
        let (s, d) = diff(&State::new(), scan(5, 0), 5 * NS);
        // A lone entry first shifts the pairs by one.
        let mut keys = vec![d.upserts[0]];
        keys.extend_from_slice(&d.upserts[2..]);
        let b = batches(&keys, &s, 4);
        assert!(b.iter().all(|b| b.len() <= 4), "{b:?}");
        assert_eq!(b.iter().map(Vec::len).sum::<usize>(), keys.len());
        for batch in &b {
            for k in batch {
                let p = s[k].rec.peer;
                if keys.contains(&p) {
                    assert!(batch.contains(&p), "a session split across batches");
                }
            }
        }
        assert_eq!(batches(&[], &s, 4), Vec::<Vec<CtKey>>::new());
    }

    #[test]
    fn association_changes_and_removals() {
        let a = wire::tests::sample_assoc();
        let mut b = a;
        b.vtag = 9;
        let (s1, up, rm) = diff_assocs(&AssocState::new(), vec![a, b]);
        assert_eq!((up.len(), rm.len()), (2, 0));
        let (s2, up, rm) = diff_assocs(&s1, vec![a, b]);
        assert_eq!((up.len(), rm.len()), (0, 0));
        let mut a2 = a;
        a2.val.etag = 1;
        let (_, up, rm) = diff_assocs(&s2, vec![a2]);
        assert_eq!((up, rm), (vec![a.id()], vec![b.id()]));
        assert_eq!(assoc_frames(&[a.id(), b.id()], &s1, 1).len(), 2);
        assert_eq!(assoc_remove_frames(&[a.id(), b.id()], 10).len(), 1);
    }

    #[test]
    fn frames_carry_ages_and_decode_back() {
        let (s, d) = diff(&State::new(), scan(3, 1_000), 5 * NS);
        let frames = upsert_frames(&d.upserts, &s, 4, 3_000);
        assert_eq!(frames.len(), 2);
        let mut n = 0;
        for f in &frames {
            let wire::Msg::Upsert(recs) = wire::decode(&f[4..]).unwrap() else {
                panic!("not an upsert");
            };
            for r in recs {
                assert_eq!(r.age_ns, 2_000);
                n += 1;
            }
        }
        assert_eq!(n, 6);
        let rf = remove_frames(&d.upserts, 4);
        assert_eq!(rf.len(), 2);
        assert_eq!(snapshot_order(&s).len(), 6);
    }
}
