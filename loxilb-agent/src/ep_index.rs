//! The endpoint index (`LB_EP_INDEX`): for each endpoint (address, port,
//! protocol) that serves exactly one DNAT service of its own family (IPv4
//! or IPv6), that service's VIP and port. A new session to an indexed endpoint has one conntrack entry
//! (`ct_state::ONE`): the endpoint's replies find it through the index.
//!
//! An endpoint claimed by two services, also used by an onearm, full-NAT
//! or NAT64 rule (whose replies would pay a failed lookup of a forward key
//! first), or sharing its slot with another endpoint is not indexed: its
//! sessions keep two entries. A slot whose
//! claim goes (the endpoint left its rule, another rule took it too) is
//! first marked draining: live one-entry sessions still find their
//! replies through it, new ones are not made; [`EpIndexRefs::drain`]
//! empties it once no session needs it, as seen by [`CLEAN_WALKS`] walks
//! of the session table in a row that began after the mark (the agent's
//! upkeep, which walks the table anyway, writes pending marks first).
//! Counted like the address filter: changes are written by
//! [`EpIndexRefs::flush`], what a failed write left stays pending for the
//! next one.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use anyhow::Result;
use loxilb_common::{
    addr_fold, ct_dir, ct_state, ep_index_flags, ep_index_slot, is_v4, lb_mode, Addr, CtKey, CtVal,
    EpIndex, IPPROTO_TCP, IPPROTO_UDP,
};

use crate::rules::{Installed, RuleTable};

/// Walks of the session table in a row that must find no session needing
/// a draining slot before it is emptied: one walk can miss an entry (the
/// kernel's walk skips keys that move meanwhile), and a session whose
/// creation read the slot just before the mark can land after the walk
/// passed its bucket.
pub const CLEAN_WALKS: u32 = 2;

/// An endpoint as the index knows it: address, port (network order),
/// protocol.
pub type EpId = (Addr, u16, u8);
/// A service: VIP, port (network order).
pub type Svc = (Addr, u16);

/// The service an endpoint is counted as serving for a rule that does not
/// claim it but whose replies come back through the node (see
/// [`EpIndexRefs::rule`]): no VIP and port are these.
const OTHER: Svc = ([u32::MAX; 4], 0);

/// The slot of endpoint `id`.
pub fn slot_of(id: &EpId) -> u32 {
    ep_index_slot(addr_fold(&id.0), id.1, id.2)
}

/// The endpoint and service whose index slot one-entry session (`k`,
/// `v`) needs for its replies to find it (the datapath's `one_entry`: the
/// slot of the endpoint, holding that endpoint for the session's VIP and
/// port); `None` for any other entry.
pub fn needed_by(k: &CtKey, v: &CtVal) -> Option<(EpId, Svc)> {
    (v.state & ct_state::ONE != 0 && v.dir == ct_dir::FORWARD)
        .then_some(((v.xdaddr, v.xdport, k.proto), (k.daddr, k.dport)))
}

/// The endpoint and service slot entry `e` maps.
pub fn mapping(e: &EpIndex) -> (EpId, Svc) {
    ((e.addr, e.port, e.proto), (e.vip, e.vport))
}

/// Whether rule `i`'s sessions to its endpoint at `ep` may have one
/// entry: DNAT over TCP or UDP to an endpoint of the VIP's family (the
/// datapath's condition too; SCTP keeps its paths' entries, NAT64 its
/// reply entry, which its source port allocation needs).
fn claims(i: &Installed, ep: &Addr) -> bool {
    i.mode == lb_mode::DEFAULT
        && (i.key.proto == IPPROTO_TCP || i.key.proto == IPPROTO_UDP)
        && is_v4(&i.key.addr) == is_v4(ep)
}

#[derive(Debug, Default)]
pub struct EpIndexRefs {
    /// Per endpoint: the services claiming it, with how many rules.
    claims: HashMap<EpId, BTreeMap<Svc, u32>>,
    /// Per slot: the endpoints that hash to it.
    users: HashMap<u32, BTreeSet<EpId>>,
    /// The slots as written in the map (non-empty ones).
    written: BTreeMap<u32, EpIndex>,
    dirty: BTreeSet<u32>,
    /// Per draining slot: walks in a row, since it was marked, that found
    /// no session needing it.
    clean: HashMap<u32, u32>,
}

impl EpIndexRefs {
    /// The claims of `installed`; `written`: what the map holds (an
    /// adopted datapath), every slot of either to be checked by the next
    /// flush.
    pub fn of<'a>(
        installed: impl Iterator<Item = &'a Installed>,
        written: impl Iterator<Item = (u32, EpIndex)>,
    ) -> Self {
        let mut r = EpIndexRefs::default();
        for i in installed {
            r.rule(i, true);
        }
        for (slot, e) in written {
            if e.proto != 0 {
                r.written.insert(slot, e);
                r.dirty.insert(slot);
            }
        }
        r
    }

    fn claim(&mut self, id: EpId, svc: Svc, up: bool) {
        let slot = slot_of(&id);
        let c = self.claims.entry(id).or_default();
        let n = c.entry(svc).or_insert(0);
        if up {
            *n += 1;
        } else {
            *n = n.checked_sub(1).expect("endpoint index count underflow");
        }
        if *n == 0 {
            c.remove(&svc);
        }
        if c.is_empty() {
            self.claims.remove(&id);
            if let Some(u) = self.users.get_mut(&slot) {
                u.remove(&id);
                if u.is_empty() {
                    self.users.remove(&slot);
                }
            }
        } else {
            self.users.entry(slot).or_default().insert(id);
        }
        self.dirty.insert(slot);
    }

    /// Count (or uncount) the claims of rule `i` on its endpoints. A rule
    /// whose sessions keep two entries but whose endpoints' replies come
    /// back through the node (onearm, fullnat, NAT64) counts too, as the
    /// service [`OTHER`]: its TCP/UDP endpoints are then not one DNAT
    /// service's alone, and are not indexed (their replies to it would
    /// each pay a failed lookup of a forward key first).
    pub fn rule(&mut self, i: &Installed, up: bool) {
        if i.mode == lb_mode::DSR
            || i.mode == lb_mode::DSR_IPIP
            || (i.key.proto != IPPROTO_TCP && i.key.proto != IPPROTO_UDP)
        {
            return;
        }
        for e in &i.eps {
            let svc = if claims(i, &e.addr) {
                (i.key.addr, i.key.port)
            } else {
                OTHER
            };
            self.claim((e.addr, e.port, i.key.proto), svc, up);
        }
    }

    /// What slot `slot` should hold: its one endpoint's one service.
    fn want(&self, slot: u32) -> Option<EpIndex> {
        let users = self.users.get(&slot)?;
        if users.len() != 1 {
            return None;
        }
        let id = users.first()?;
        let c = self.claims.get(id)?;
        if c.len() != 1 {
            return None;
        }
        let (vip, vport) = *c.keys().next()?;
        if (vip, vport) == OTHER {
            return None;
        }
        Some(EpIndex {
            addr: id.0,
            vip,
            port: id.1,
            vport,
            proto: id.2,
            flags: 0,
            _pad2: 0,
        })
    }

    fn put(&mut self, t: &mut dyn RuleTable, slot: u32, e: Option<EpIndex>) -> Result<()> {
        t.put_ep_index(slot, e.unwrap_or_default())?;
        // A new mark counts its walks from zero.
        self.clean.remove(&slot);
        match e {
            Some(e) => self.written.insert(slot, e),
            None => self.written.remove(&slot),
        };
        Ok(())
    }

    /// Write the slots that changed. A slot whose claim went is marked
    /// draining, not emptied (see the module's documentation).
    pub fn flush(&mut self, t: &mut dyn RuleTable) -> Result<()> {
        while let Some(slot) = self.dirty.first().copied() {
            let want = self.want(slot);
            match self.written.get(&slot).copied() {
                None => {
                    if want.is_some() {
                        self.put(t, slot, want)?;
                    }
                }
                Some(old) if old.flags & ep_index_flags::DRAINING == 0 => {
                    if want != Some(old) {
                        let draining = EpIndex {
                            flags: ep_index_flags::DRAINING,
                            ..old
                        };
                        self.put(t, slot, Some(draining))?;
                    }
                }
                Some(old) => {
                    // Draining: taken back by the same claim, or left to
                    // `drain` (which writes whatever is wanted then).
                    let same = EpIndex { flags: 0, ..old };
                    if want == Some(same) {
                        self.put(t, slot, want)?;
                    }
                }
            }
            self.dirty.remove(&slot);
        }
        Ok(())
    }

    /// Count a walk of the session table (`live`, begun after the last
    /// [`EpIndexRefs::flush`]) for each draining slot, and empty those no
    /// session has needed for [`CLEAN_WALKS`] walks in a row, writing what
    /// the slot is wanted for now, if anything. Returns how many slots were
    /// released; a failed write leaves its slot for the next walk and the
    /// others are still released.
    pub fn drain(&mut self, live: &[(CtKey, CtVal)], t: &mut dyn RuleTable) -> Result<usize> {
        let draining: Vec<(u32, EpIndex)> = self
            .written
            .iter()
            .filter(|(_, e)| e.flags & ep_index_flags::DRAINING != 0)
            .map(|(s, e)| (*s, *e))
            .collect();
        if draining.is_empty() {
            return Ok(0);
        }
        let needed: BTreeSet<(EpId, Svc)> =
            live.iter().filter_map(|(k, v)| needed_by(k, v)).collect();
        let mut released = 0;
        let mut failed = None;
        for (slot, e) in draining {
            if needed.contains(&mapping(&e)) {
                self.clean.insert(slot, 0);
                continue;
            }
            let walks = self.clean.entry(slot).or_insert(0);
            *walks += 1;
            if *walks < CLEAN_WALKS {
                continue;
            }
            let want = self.want(slot);
            match self.put(t, slot, want) {
                Ok(()) => released += 1,
                Err(e) => failed = failed.or(Some(e)),
            }
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(released),
        }
    }

    /// The slots as written (tests).
    #[cfg(test)]
    pub fn written(&self) -> &BTreeMap<u32, EpIndex> {
        &self.written
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use loxilb_common::{addr_from_ip, EpVal, SvcKey};

    fn a(s: &str) -> Addr {
        addr_from_ip(s.parse().unwrap())
    }

    fn rule(vip: &str, port: u16, mode: u8, eps: &[(&str, u16)]) -> Installed {
        Installed {
            name: format!("{vip}:{port}"),
            key: SvcKey {
                addr: a(vip),
                port: port.to_be(),
                proto: IPPROTO_TCP,
                _pad: 0,
            },
            secondary: vec![],
            rule_vips: vec![],
            rule_id: 0,
            bank: 0,
            timeout_s: 0,
            persist_timeout_s: 0,
            mode,
            sel: 0,
            eps: eps
                .iter()
                .map(|(ip, p)| EpVal {
                    addr: a(ip),
                    port: p.to_be(),
                    ..Default::default()
                })
                .collect(),
            bank_len: [0, 0],
            table_len: 0,
            sel_base: [0, 0],
            chunks: [0, 0],
            src_ranges: BTreeSet::new(),
        }
    }

    type Table = crate::rules::tests::MemTable;

    fn get(t: &Table, ep: &str, port: u16) -> Option<EpIndex> {
        let slot = slot_of(&(a(ep), port.to_be(), IPPROTO_TCP));
        t.ep_index.get(&slot).copied()
    }

    fn one_session(ep: &str, port: u16, vip: &str, vport: u16) -> (CtKey, CtVal) {
        (
            CtKey {
                saddr: a("192.168.0.2"),
                daddr: a(vip),
                sport: 40000u16.to_be(),
                dport: vport.to_be(),
                proto: IPPROTO_TCP,
                ..Default::default()
            },
            CtVal {
                xdaddr: a(ep),
                xdport: port.to_be(),
                state: ct_state::ONE,
                ..Default::default()
            },
        )
    }

    #[test]
    fn an_endpoint_of_one_dnat_service_is_indexed_and_of_two_is_not() {
        let mut t = Table::default();
        let web = rule("20.0.0.100", 80, lb_mode::DEFAULT, &[("10.0.1.10", 8080)]);
        let mut ix = EpIndexRefs::of([&web].into_iter(), std::iter::empty());
        ix.flush(&mut t).unwrap();
        let e = get(&t, "10.0.1.10", 8080).expect("indexed");
        assert_eq!(
            (e.vip, u16::from_be(e.vport), e.flags),
            (a("20.0.0.100"), 80, 0)
        );
        // Not DNAT, or NAT64 (an IPv6 service's IPv4 endpoint): never
        // indexed. An IPv6 DNAT service's IPv6 endpoint is.
        for r in [
            rule("20.0.0.100", 81, lb_mode::FULLNAT, &[("10.0.1.11", 8080)]),
            rule("fd00::1", 84, lb_mode::DEFAULT, &[("10.0.1.12", 8064)]),
            rule("fd00::1", 80, lb_mode::DEFAULT, &[("fd00:1::10", 8080)]),
        ] {
            ix.rule(&r, true);
        }
        ix.flush(&mut t).unwrap();
        assert_eq!(t.ep_index.len(), 2);
        let e = get(&t, "fd00:1::10", 8080).expect("IPv6 DNAT indexed");
        assert_eq!((e.vip, u16::from_be(e.vport)), (a("fd00::1"), 80));
        for (ep, port) in [("10.0.1.11", 8080), ("10.0.1.12", 8064)] {
            assert!(get(&t, ep, port).is_none(), "{ep}");
        }
        // A second service on the same endpoint: the slot drains (and a
        // live one-entry session keeps it), then empties.
        let api = rule("20.0.0.100", 443, lb_mode::DEFAULT, &[("10.0.1.10", 8080)]);
        ix.rule(&api, true);
        ix.flush(&mut t).unwrap();
        let e = get(&t, "10.0.1.10", 8080).expect("still there");
        assert_eq!(e.flags, ep_index_flags::DRAINING);
        let live = [one_session("10.0.1.10", 8080, "20.0.0.100", 80)];
        assert_eq!(
            ix.drain(&[], &mut t).unwrap(),
            0,
            "one clean walk is not enough"
        );
        assert_eq!(ix.drain(&live, &mut t).unwrap(), 0);
        assert_eq!(
            ix.drain(&[], &mut t).unwrap(),
            0,
            "a needed slot counts afresh"
        );
        assert!(get(&t, "10.0.1.10", 8080).is_some());
        assert_eq!(ix.drain(&[], &mut t).unwrap(), 1);
        assert_eq!(get(&t, "10.0.1.10", 8080), None);
        // The second service goes: the first takes the slot again.
        ix.rule(&api, false);
        ix.flush(&mut t).unwrap();
        assert_eq!(get(&t, "10.0.1.10", 8080).map(|e| e.flags), Some(0));
        // Its rule goes: draining until no session needs it.
        ix.rule(&web, false);
        ix.flush(&mut t).unwrap();
        assert_eq!(
            get(&t, "10.0.1.10", 8080).map(|e| e.flags),
            Some(ep_index_flags::DRAINING)
        );
        assert_eq!(ix.drain(&[], &mut t).unwrap(), 0);
        assert_eq!(ix.drain(&[], &mut t).unwrap(), 1);
        assert_eq!(get(&t, "10.0.1.10", 8080), None);
        // Only the IPv6 endpoint's slot is left.
        assert_eq!(t.ep_index.len(), 1);
        assert_eq!(ix.written().len(), 1);
    }

    #[test]
    fn an_endpoint_a_rule_of_another_mode_shares_is_not_indexed() {
        let mut t = Table::default();
        let web = rule("20.0.0.100", 80, lb_mode::DEFAULT, &[("10.0.1.10", 8080)]);
        let mut ix = EpIndexRefs::of([&web].into_iter(), std::iter::empty());
        ix.flush(&mut t).unwrap();
        assert_eq!(get(&t, "10.0.1.10", 8080).map(|e| e.flags), Some(0));
        for (what, other) in [
            (
                "onearm",
                rule("20.0.0.100", 81, lb_mode::ONEARM, &[("10.0.1.10", 8080)]),
            ),
            (
                "fullnat",
                rule("20.0.0.100", 82, lb_mode::FULLNAT, &[("10.0.1.10", 8080)]),
            ),
            (
                "NAT64",
                rule("fd00::1", 84, lb_mode::DEFAULT, &[("10.0.1.10", 8080)]),
            ),
        ] {
            ix.rule(&other, true);
            ix.flush(&mut t).unwrap();
            assert_eq!(
                get(&t, "10.0.1.10", 8080).map(|e| e.flags),
                Some(ep_index_flags::DRAINING),
                "{what}"
            );
            ix.rule(&other, false);
            ix.flush(&mut t).unwrap();
            assert_eq!(
                get(&t, "10.0.1.10", 8080).map(|e| e.flags),
                Some(0),
                "{what}"
            );
        }
        // DSR: the endpoint answers the client directly; nothing of its
        // comes back through the node to pay for the index.
        let dsr = rule("20.0.0.100", 83, lb_mode::DSR, &[("10.0.1.10", 8080)]);
        ix.rule(&dsr, true);
        ix.flush(&mut t).unwrap();
        assert_eq!(get(&t, "10.0.1.10", 8080).map(|e| e.flags), Some(0));
        // Another mode's rule alone on an endpoint: nothing indexed.
        let t2 = &mut Table::default();
        let fullnat = rule("20.0.0.100", 82, lb_mode::FULLNAT, &[("10.0.1.12", 8080)]);
        let mut ix2 = EpIndexRefs::of([&fullnat].into_iter(), std::iter::empty());
        ix2.flush(t2).unwrap();
        assert!(t2.ep_index.is_empty());
    }

    #[test]
    fn a_draining_slot_taken_back_by_its_claim_is_live_again() {
        let mut t = Table::default();
        let web = rule("20.0.0.100", 80, lb_mode::DEFAULT, &[("10.0.1.10", 8080)]);
        let mut ix = EpIndexRefs::of([&web].into_iter(), std::iter::empty());
        ix.flush(&mut t).unwrap();
        ix.rule(&web, false);
        ix.flush(&mut t).unwrap();
        assert_eq!(
            get(&t, "10.0.1.10", 8080).map(|e| e.flags),
            Some(ep_index_flags::DRAINING)
        );
        ix.rule(&web, true);
        ix.flush(&mut t).unwrap();
        assert_eq!(get(&t, "10.0.1.10", 8080).map(|e| e.flags), Some(0));
    }

    #[test]
    fn an_adopted_index_drains_what_no_rule_claims() {
        let mut t = Table::default();
        let web = rule("20.0.0.100", 80, lb_mode::DEFAULT, &[("10.0.1.10", 8080)]);
        let stale = EpIndex {
            addr: a("10.0.1.99"),
            vip: a("20.0.0.100"),
            port: 8080u16.to_be(),
            vport: 80u16.to_be(),
            proto: IPPROTO_TCP,
            ..Default::default()
        };
        let stale_slot = slot_of(&(stale.addr, stale.port, stale.proto));
        t.ep_index.insert(stale_slot, stale);
        let mut ix = EpIndexRefs::of([&web].into_iter(), [(stale_slot, stale)].into_iter());
        ix.flush(&mut t).unwrap();
        assert!(get(&t, "10.0.1.10", 8080).is_some());
        assert_eq!(t.ep_index[&stale_slot].flags, ep_index_flags::DRAINING);
        assert_eq!(ix.drain(&[], &mut t).unwrap(), 0);
        assert_eq!(ix.drain(&[], &mut t).unwrap(), 1);
        assert_eq!(t.ep_index.len(), 1);
    }
}
