//! Reconcile: turn the desired rule set into map writes as a diff, so
//! untouched rules (and their sessions) are never disturbed. Plain Rust
//! over the narrow [`RuleTable`] seam, unit-tested with an in-memory table.

use std::collections::{BTreeMap, BTreeSet};

use std::net::IpAddr;

use anyhow::{bail, Result};
use ipnet::IpNet;
use loxilb_common::{
    addr_filter_bit, addr_fold, addr_from_ip, ip_from_addr, lb_mode, lb_sel, svc_flags, Addr,
    EpKey, EpVal, SelChunk, SelKey, SvcKey, SvcVal, ADDR_FILTER_WORDS, SEL_CHUNK,
};

use crate::{
    config::{Mode, Protocol, Rule, Selection},
    selection,
};

/// The maps the reconciler writes; implemented by the real datapath and by
/// an in-memory table in tests.
pub trait RuleTable {
    fn put_service(&mut self, key: SvcKey, val: SvcVal) -> Result<()>;
    fn delete_service(&mut self, key: SvcKey) -> Result<()>;
    fn put_endpoint(&mut self, key: EpKey, val: EpVal) -> Result<()>;
    fn delete_endpoint(&mut self, key: EpKey) -> Result<()>;
    fn put_sel_chunk(&mut self, key: SelKey, val: SelChunk) -> Result<()>;
    fn delete_sel_chunk(&mut self, key: SelKey) -> Result<()>;
    fn put_src_range(&mut self, rule_id: u32, net: IpNet) -> Result<()>;
    fn delete_src_range(&mut self, rule_id: u32, net: IpNet) -> Result<()>;
    fn put_filter_word(&mut self, index: u32, word: u64) -> Result<()>;
    /// A VIP now exists / no longer exists (echo replies).
    fn put_vip(&mut self, vip: Addr) -> Result<()>;
    fn delete_vip(&mut self, vip: Addr) -> Result<()>;
    /// Zero a rule id's counters (before the id is used by a new rule).
    fn reset_rule_stats(&mut self, rule_id: u32) -> Result<()>;
    /// Zero an endpoint counter slot (before it is given to an endpoint).
    fn reset_ep_stats(&mut self, idx: u32) -> Result<()>;
    /// Remove every session (and client affinity) of `rule_id`; returns
    /// how many conntrack entries went.
    fn flush_sessions(&mut self, rule_id: u32) -> Result<usize>;
}

/// A rule as installed in the maps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Installed {
    pub name: String,
    pub key: SvcKey,
    pub rule_id: u32,
    /// Live bank of endpoints and selection table.
    pub bank: u8,
    pub timeout_s: u32,
    pub persist_timeout_s: u32,
    pub mode: u8,
    pub sel: u8,
    pub eps: Vec<EpVal>,
    /// Endpoint entries present in each bank (the idle one may hold stale ones).
    pub bank_len: [u32; 2],
    pub table_len: u32,
    /// Selection-table chunks present in each bank.
    pub chunks: [u32; 2],
    pub src_ranges: BTreeSet<IpNet>,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub added: Vec<String>,
    pub updated: Vec<String>,
    pub removed: Vec<String>,
    pub unchanged: usize,
    pub sessions_flushed: usize,
}

pub fn svc_key(vip: IpAddr, port: u16, proto: Protocol) -> SvcKey {
    SvcKey {
        addr: addr_from_ip(vip),
        port: port.to_be(),
        proto: proto.number(),
        _pad: 0,
    }
}

pub fn ep_val(e: &crate::config::Endpoint) -> EpVal {
    EpVal {
        addr: addr_from_ip(e.ip),
        port: e.port.to_be(),
        weight: e.weight,
        flags: 0,
        stat_idx: 0,
        _pad: 0,
    }
}

/// What identifies an endpoint's configuration (not its counter slot).
fn ep_conf(e: &EpVal) -> (Addr, u16, u16, u32) {
    (e.addr, e.port, e.weight, e.flags)
}

/// Counter slots of endpoints (`EpVal::stat_idx`), one per (rule,
/// endpoint), stable while the endpoint stays in its rule. Freed slots are
/// reused oldest-first, so a slot still referenced by lingering sessions of
/// a removed endpoint is not handed out again soon.
#[derive(Debug, Default)]
struct StatSlots {
    by_ep: BTreeMap<(u32, Addr, u16), u32>,
    free: std::collections::VecDeque<u32>,
    next: u32,
}

impl StatSlots {
    fn get(&mut self, t: &mut dyn RuleTable, rule: u32, e: &EpVal) -> Result<u32> {
        if let Some(i) = self.by_ep.get(&(rule, e.addr, e.port)) {
            return Ok(*i);
        }
        let i = if self.next < loxilb_common::MAX_EP_STATS {
            self.next += 1;
            self.next - 1
        } else {
            self.free.pop_front().ok_or_else(|| {
                anyhow::anyhow!(
                    "more than {} endpoints over all rules; remove some",
                    loxilb_common::MAX_EP_STATS
                )
            })?
        };
        t.reset_ep_stats(i)?;
        self.by_ep.insert((rule, e.addr, e.port), i);
        Ok(i)
    }

    fn release_rule_except(&mut self, rule: u32, keep: &[EpVal]) {
        let gone: Vec<(u32, Addr, u16)> = self
            .by_ep
            .keys()
            .filter(|(r, a, p)| *r == rule && !keep.iter().any(|e| e.addr == *a && e.port == *p))
            .copied()
            .collect();
        for k in gone {
            if let Some(i) = self.by_ep.remove(&k) {
                self.free.push_back(i);
            }
        }
    }
}

fn mode_code(m: Mode) -> u8 {
    match m {
        Mode::Default => lb_mode::DEFAULT,
        Mode::OneArm => lb_mode::ONEARM,
        Mode::FullNat => lb_mode::FULLNAT,
        Mode::Dsr => lb_mode::DSR,
        Mode::DsrIpip => lb_mode::DSR_IPIP,
    }
}

fn sel_code(s: Selection) -> u8 {
    match s {
        Selection::RoundRobin => lb_sel::RR,
        Selection::Hash => lb_sel::HASH,
        Selection::Persist => lb_sel::PERSIST,
        Selection::LeastConn => lb_sel::LC,
    }
}

/// The selection table of a rule: Maglev for `hash`, weighted round-robin
/// otherwise.
pub fn table_for(sel: u8, eps: &[EpVal]) -> Vec<u16> {
    let weights: Vec<u16> = eps.iter().map(|e| e.weight.max(1)).collect();
    if sel == lb_sel::HASH {
        let ids: Vec<Vec<u8>> = eps
            .iter()
            .map(|e| {
                // IPv4: the 4 address bytes (as before IPv6 existed, so
                // tables did not move); IPv6: all 16.
                let mut id = match ip_from_addr(&e.addr) {
                    IpAddr::V4(a) => a.octets().to_vec(),
                    IpAddr::V6(a) => a.octets().to_vec(),
                };
                id.extend_from_slice(&e.port.to_ne_bytes());
                id
            })
            .collect();
        selection::maglev_table(&ids, &weights)
    } else {
        selection::rr_table(&weights)
    }
}

/// What a rule should look like in the maps.
struct Want {
    eps: Vec<EpVal>,
    timeout_s: u32,
    persist_timeout_s: u32,
    mode: u8,
    sel: u8,
    src_ranges: BTreeSet<IpNet>,
}

impl Want {
    fn of(r: &Rule, down: &dyn Fn(&str, IpAddr, u16) -> bool) -> Self {
        Want {
            eps: r
                .endpoints
                .iter()
                .map(|e| {
                    let mut v = ep_val(e);
                    if down(&r.name, e.ip, e.port) {
                        v.flags |= loxilb_common::ep_flags::INACTIVE;
                    }
                    v
                })
                .collect(),
            timeout_s: r.timeout_s,
            persist_timeout_s: r.persist_timeout_s,
            mode: mode_code(r.mode),
            sel: sel_code(r.selection),
            src_ranges: r.source_ranges.iter().copied().collect(),
        }
    }

    fn same_as(&self, i: &Installed) -> bool {
        self.eps.iter().map(ep_conf).eq(i.eps.iter().map(ep_conf))
            && self.timeout_s == i.timeout_s
            && self.persist_timeout_s == i.persist_timeout_s
            && self.mode == i.mode
            && self.sel == i.sel
            && self.src_ranges == i.src_ranges
    }
}

/// The agent's view of what is installed, keyed by service.
#[derive(Debug, Default)]
pub struct Rules {
    installed: BTreeMap<SvcKeyOrd, Installed>,
    filter: Vec<u64>,
    vips: BTreeSet<Addr>,
    slots: StatSlots,
}

/// `SvcKey` ordered by address, port, protocol (for deterministic
/// iteration).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct SvcKeyOrd(IpAddr, u16, u8);

impl From<SvcKey> for SvcKeyOrd {
    fn from(k: SvcKey) -> Self {
        SvcKeyOrd(ip_from_addr(&k.addr), u16::from_be(k.port), k.proto)
    }
}

impl Rules {
    /// Start from what the maps already hold (an adopted datapath).
    pub fn adopt(installed: Vec<Installed>) -> Self {
        let mut slots = StatSlots::default();
        for i in &installed {
            for e in &i.eps {
                slots.by_ep.insert((i.rule_id, e.addr, e.port), e.stat_idx);
            }
        }
        let used: BTreeSet<u32> = slots.by_ep.values().copied().collect();
        slots.next = used.iter().next_back().map(|m| m + 1).unwrap_or(0);
        slots.free = (0..slots.next).filter(|i| !used.contains(i)).collect();
        let mut r = Rules {
            installed: installed
                .into_iter()
                .map(|i| (SvcKeyOrd::from(i.key), i))
                .collect(),
            filter: vec![0; ADDR_FILTER_WORDS as usize],
            vips: BTreeSet::new(),
            slots,
        };
        r.filter = r.compute_filter();
        r.vips = r.installed.values().map(|i| i.key.addr).collect();
        r
    }

    pub fn installed(&self) -> impl Iterator<Item = &Installed> {
        self.installed.values()
    }

    /// An endpoint's liveness changed (health probes): mark it active or
    /// inactive in place, in the rule's live bank. False if the rule or the
    /// endpoint is not installed (any more).
    pub fn set_endpoint_state(
        &mut self,
        t: &mut dyn RuleTable,
        rule: &str,
        addr: IpAddr,
        port: u16,
        up: bool,
    ) -> Result<bool> {
        let a = addr_from_ip(addr);
        let p = port.to_be();
        let Some(inst) = self.installed.values_mut().find(|i| i.name == rule) else {
            return Ok(false);
        };
        let Some(idx) = inst.eps.iter().position(|e| e.addr == a && e.port == p) else {
            return Ok(false);
        };
        let e = &mut inst.eps[idx];
        if up {
            e.flags &= !loxilb_common::ep_flags::INACTIVE;
        } else {
            e.flags |= loxilb_common::ep_flags::INACTIVE;
        }
        t.put_endpoint(EpKey::new(inst.rule_id, inst.bank, idx as u32), *e)?;
        Ok(true)
    }

    /// The lowest free rule id at or after `*cursor` (one pass over the
    /// ids for a whole apply, not one per new rule).
    fn next_rule_id(used: &mut BTreeSet<u32>, cursor: &mut u32) -> Result<u32> {
        while used.contains(cursor) {
            *cursor += 1;
        }
        if *cursor > loxilb_common::MAX_SERVICES {
            bail!(
                "all {} rule slots are in use; remove rules first",
                loxilb_common::MAX_SERVICES
            );
        }
        used.insert(*cursor);
        Ok(*cursor)
    }

    fn compute_filter(&self) -> Vec<u64> {
        let mut f = vec![0u64; ADDR_FILTER_WORDS as usize];
        let mut set = |addr: Addr| {
            let (w, b) = addr_filter_bit(addr_fold(&addr));
            f[w as usize] |= 1 << b;
        };
        for i in self.installed.values() {
            set(i.key.addr);
            for e in &i.eps {
                set(e.addr);
            }
        }
        f
    }

    /// Make the maps hold exactly `desired`, touching only what changed.
    pub fn apply(&mut self, desired: &[Rule], t: &mut dyn RuleTable) -> Result<Report> {
        self.apply_with(desired, t, &|_, _, _| false)
    }

    /// [`Rules::apply`], with endpoints that health probes found down
    /// (`down(rule name, ip, port)`) written inactive.
    pub fn apply_with(
        &mut self,
        desired: &[Rule],
        t: &mut dyn RuleTable,
        down: &dyn Fn(&str, IpAddr, u16) -> bool,
    ) -> Result<Report> {
        let mut report = Report::default();
        if desired.len() > loxilb_common::MAX_SERVICES as usize {
            bail!(
                "{} rules; the datapath holds at most {}",
                desired.len(),
                loxilb_common::MAX_SERVICES
            );
        }
        let want: BTreeMap<SvcKeyOrd, &Rule> = desired
            .iter()
            .map(|r| (svc_key(r.vip, r.port, r.protocol).into(), r))
            .collect();
        // Removals first: they free rule ids and slots.
        let gone: Vec<SvcKeyOrd> = self
            .installed
            .keys()
            .filter(|k| !want.contains_key(k))
            .copied()
            .collect();
        for k in gone {
            let inst = self.installed.remove(&k).expect("present");
            t.delete_service(inst.key)?;
            for bank in 0..2u8 {
                for idx in 0..inst.bank_len[bank as usize] {
                    t.delete_endpoint(EpKey::new(inst.rule_id, bank, idx))?;
                }
                for c in 0..inst.chunks[bank as usize] {
                    t.delete_sel_chunk(SelKey::new(inst.rule_id, bank, c))?;
                }
            }
            for net in &inst.src_ranges {
                t.delete_src_range(inst.rule_id, *net)?;
            }
            report.sessions_flushed += t.flush_sessions(inst.rule_id)?;
            self.slots.release_rule_except(inst.rule_id, &[]);
            report.removed.push(inst.name);
        }
        let mut used_ids: BTreeSet<u32> = self.installed.values().map(|i| i.rule_id).collect();
        let mut id_cursor = 1;
        for (k, r) in want {
            let mut w = Want::of(r, down);
            match self.installed.get_mut(&k) {
                Some(inst) if w.same_as(inst) => {
                    inst.name = r.name.clone();
                    report.unchanged += 1;
                }
                Some(inst) => {
                    // Fill the idle bank, then flip to it with one write.
                    let bank = inst.bank ^ 1;
                    for e in w.eps.iter_mut() {
                        e.stat_idx = self.slots.get(t, inst.rule_id, e)?;
                    }
                    self.slots.release_rule_except(inst.rule_id, &w.eps);
                    install(t, inst, bank, w)?;
                    inst.name = r.name.clone();
                    report.updated.push(r.name.clone());
                }
                None => {
                    let rule_id = Self::next_rule_id(&mut used_ids, &mut id_cursor)?;
                    t.reset_rule_stats(rule_id)?;
                    let mut inst = Installed {
                        name: r.name.clone(),
                        key: svc_key(r.vip, r.port, r.protocol),
                        rule_id,
                        bank: 0,
                        timeout_s: 0,
                        persist_timeout_s: 0,
                        mode: 0,
                        sel: 0,
                        eps: vec![],
                        bank_len: [0, 0],
                        table_len: 0,
                        chunks: [0, 0],
                        src_ranges: BTreeSet::new(),
                    };
                    for e in w.eps.iter_mut() {
                        e.stat_idx = self.slots.get(t, rule_id, e)?;
                    }
                    install(t, &mut inst, 0, w)?;
                    self.installed.insert(k, inst);
                    report.added.push(r.name.clone());
                }
            }
        }
        let filter = self.compute_filter();
        for (i, (new, old)) in filter.iter().zip(self.filter.iter()).enumerate() {
            if new != old {
                t.put_filter_word(i as u32, *new)?;
            }
        }
        self.filter = filter;
        let vips: BTreeSet<Addr> = self.installed.values().map(|i| i.key.addr).collect();
        for v in vips.difference(&self.vips) {
            t.put_vip(*v)?;
        }
        for v in self.vips.difference(&vips) {
            t.delete_vip(*v)?;
        }
        self.vips = vips;
        Ok(report)
    }
}

/// Write rule `inst` as `w` into `bank` and make that bank live.
fn install(t: &mut dyn RuleTable, inst: &mut Installed, bank: u8, w: Want) -> Result<()> {
    let rule_id = inst.rule_id;
    // Endpoints.
    for (i, e) in w.eps.iter().enumerate() {
        t.put_endpoint(EpKey::new(rule_id, bank, i as u32), *e)?;
    }
    for idx in w.eps.len() as u32..inst.bank_len[bank as usize] {
        t.delete_endpoint(EpKey::new(rule_id, bank, idx))?;
    }
    inst.bank_len[bank as usize] = w.eps.len() as u32;
    // Selection table.
    let table = table_for(w.sel, &w.eps);
    let n_chunks = table.len().div_ceil(SEL_CHUNK as usize) as u32;
    for (c, part) in table.chunks(SEL_CHUNK as usize).enumerate() {
        let mut chunk = SelChunk::default();
        chunk.ep[..part.len()].copy_from_slice(part);
        t.put_sel_chunk(SelKey::new(rule_id, bank, c as u32), chunk)?;
    }
    for c in n_chunks..inst.chunks[bank as usize] {
        t.delete_sel_chunk(SelKey::new(rule_id, bank, c))?;
    }
    inst.chunks[bank as usize] = n_chunks;
    // Source ranges: add new ones before the flip, drop old ones after.
    for net in w.src_ranges.difference(&inst.src_ranges) {
        t.put_src_range(rule_id, *net)?;
    }
    let flags = if w.src_ranges.is_empty() {
        0
    } else {
        svc_flags::SRC_RANGES
    };
    t.put_service(
        inst.key,
        SvcVal {
            rule_id,
            ep_count: w.eps.len() as u32,
            timeout_s: w.timeout_s,
            rr_next: 0,
            ep_bank: bank,
            mode: w.mode,
            sel: w.sel,
            flags,
            table_len: table.len() as u32,
            persist_timeout_s: w.persist_timeout_s,
            _pad: 0,
        },
    )?;
    for net in inst.src_ranges.difference(&w.src_ranges) {
        t.delete_src_range(rule_id, *net)?;
    }
    inst.bank = bank;
    inst.table_len = table.len() as u32;
    inst.eps = w.eps;
    inst.timeout_s = w.timeout_s;
    inst.persist_timeout_s = w.persist_timeout_s;
    inst.mode = w.mode;
    inst.sel = w.sel;
    inst.src_ranges = w.src_ranges;
    Ok(())
}

#[cfg(test)]
pub mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::config;

    /// An in-memory stand-in for the datapath maps.
    #[derive(Default, Debug)]
    pub struct MemTable {
        pub svcs: HashMap<SvcKey, SvcVal>,
        pub eps: HashMap<EpKey, EpVal>,
        pub filter: HashMap<u32, u64>,
        pub chunks: HashMap<SelKey, SelChunk>,
        pub ranges: std::collections::HashSet<(u32, IpNet)>,
        pub flushed: Vec<u32>,
        pub ep_resets: Vec<u32>,
        pub vips: std::collections::BTreeSet<Addr>,
        pub writes: usize,
    }

    impl RuleTable for MemTable {
        fn put_service(&mut self, key: SvcKey, val: SvcVal) -> Result<()> {
            self.writes += 1;
            self.svcs.insert(key, val);
            Ok(())
        }
        fn delete_service(&mut self, key: SvcKey) -> Result<()> {
            self.writes += 1;
            self.svcs.remove(&key);
            Ok(())
        }
        fn put_endpoint(&mut self, key: EpKey, val: EpVal) -> Result<()> {
            self.writes += 1;
            self.eps.insert(key, val);
            Ok(())
        }
        fn delete_endpoint(&mut self, key: EpKey) -> Result<()> {
            self.writes += 1;
            self.eps.remove(&key);
            Ok(())
        }
        fn put_filter_word(&mut self, index: u32, word: u64) -> Result<()> {
            self.filter.insert(index, word);
            Ok(())
        }
        fn put_sel_chunk(&mut self, key: SelKey, val: SelChunk) -> Result<()> {
            self.writes += 1;
            self.chunks.insert(key, val);
            Ok(())
        }
        fn delete_sel_chunk(&mut self, key: SelKey) -> Result<()> {
            self.writes += 1;
            self.chunks.remove(&key);
            Ok(())
        }
        fn put_src_range(&mut self, rule_id: u32, net: IpNet) -> Result<()> {
            self.writes += 1;
            self.ranges.insert((rule_id, net));
            Ok(())
        }
        fn delete_src_range(&mut self, rule_id: u32, net: IpNet) -> Result<()> {
            self.writes += 1;
            self.ranges.remove(&(rule_id, net));
            Ok(())
        }
        fn reset_rule_stats(&mut self, _rule_id: u32) -> Result<()> {
            Ok(())
        }
        fn put_vip(&mut self, vip: Addr) -> Result<()> {
            self.vips.insert(vip);
            Ok(())
        }
        fn delete_vip(&mut self, vip: Addr) -> Result<()> {
            self.vips.remove(&vip);
            Ok(())
        }
        fn reset_ep_stats(&mut self, idx: u32) -> Result<()> {
            self.ep_resets.push(idx);
            Ok(())
        }
        fn flush_sessions(&mut self, rule_id: u32) -> Result<usize> {
            self.flushed.push(rule_id);
            Ok(3)
        }
    }

    fn rules(text: &str) -> Vec<Rule> {
        config::parse("t.yaml", text).unwrap()
    }

    const TWO: &str = "rules:
  - {name: a, vip: 20.0.0.1, port: 80, protocol: tcp, endpoints: [{ip: 10.0.0.1, port: 8080}, {ip: 10.0.0.2, port: 8080}]}
  - {name: b, vip: 20.0.0.1, port: 53, protocol: udp, endpoints: [{ip: 10.0.0.3, port: 53}]}
";

    fn active_eps(t: &MemTable, key: SvcKey) -> Vec<EpVal> {
        let s = t.svcs[&key];
        (0..s.ep_count)
            .map(|i| t.eps[&EpKey::new(s.rule_id, s.ep_bank, i)])
            .collect()
    }

    #[test]
    fn add_then_reapply_is_a_no_op() {
        let mut t = MemTable::default();
        let mut r = Rules::adopt(vec![]);
        let rep = r.apply(&rules(TWO), &mut t).unwrap();
        assert_eq!(rep.added, vec!["b", "a"]);
        assert_eq!(t.svcs.len(), 2);
        let k = svc_key("20.0.0.1".parse().unwrap(), 80, Protocol::Tcp);
        assert_eq!(active_eps(&t, k).len(), 2);
        assert_eq!(t.vips.len(), 1, "one VIP for both rules");
        // the filter knows the VIP and every endpoint
        for a in ["20.0.0.1", "10.0.0.1", "10.0.0.2", "10.0.0.3"] {
            let ip: std::net::Ipv4Addr = a.parse().unwrap();
            let (w, b) = addr_filter_bit(u32::from_ne_bytes(ip.octets()));
            assert!(t.filter[&w] & (1 << b) != 0, "{a} not in filter");
        }
        let writes = t.writes;
        let rep = r.apply(&rules(TWO), &mut t).unwrap();
        assert_eq!(rep.unchanged, 2);
        assert!(rep.added.is_empty() && rep.updated.is_empty() && rep.removed.is_empty());
        assert_eq!(t.writes, writes, "an unchanged rule set must write nothing");
    }

    #[test]
    fn endpoint_change_flips_bank_and_keeps_rule_id() {
        let mut t = MemTable::default();
        let mut r = Rules::adopt(vec![]);
        r.apply(&rules(TWO), &mut t).unwrap();
        let k = svc_key("20.0.0.1".parse().unwrap(), 80, Protocol::Tcp);
        let before = t.svcs[&k];
        let three = TWO.replace(
            "{ip: 10.0.0.2, port: 8080}]",
            "{ip: 10.0.0.2, port: 8080}, {ip: 10.0.0.9, port: 8080}]",
        );
        let rep = r.apply(&rules(&three), &mut t).unwrap();
        assert_eq!(rep.updated, vec!["a"]);
        assert_eq!(rep.unchanged, 1);
        let after = t.svcs[&k];
        assert_eq!(after.rule_id, before.rule_id);
        assert_ne!(after.ep_bank, before.ep_bank);
        assert_eq!(active_eps(&t, k).len(), 3);
        assert!(
            t.flushed.is_empty(),
            "updating endpoints must not flush sessions"
        );
        // Shrink to one endpoint (bank flips back to the first bank, which
        // held two entries: the stale second one must go), then grow to two
        // (the other bank, which held three: the third must go).
        let one = TWO.replace(", {ip: 10.0.0.2, port: 8080}]", "]");
        r.apply(&rules(&one), &mut t).unwrap();
        let s = t.svcs[&k];
        assert_eq!((s.ep_count, s.ep_bank), (1, before.ep_bank));
        let in_bank = |t: &MemTable, bank: u8| {
            t.eps
                .keys()
                .filter(|e| e.rule_id == s.rule_id && (e.slot >> 16) as u8 == bank)
                .count()
        };
        assert_eq!(
            in_bank(&t, s.ep_bank),
            1,
            "stale entry left in the reused bank"
        );
        r.apply(&rules(TWO), &mut t).unwrap();
        let s2 = t.svcs[&k];
        assert_eq!(s2.ep_count, 2);
        assert_eq!(in_bank(&t, s2.ep_bank), 2, "stale third entry left");
        assert_eq!(active_eps(&t, k).len(), 2);
    }

    #[test]
    fn selection_tables_and_source_ranges_follow_the_rule() {
        let mut t = MemTable::default();
        let mut r = Rules::adopt(vec![]);
        let rr = "rules:\n  - {vip: 20.0.0.1, port: 80, protocol: tcp, source_ranges: [10.0.0.0/8], endpoints: [{ip: 10.0.0.1, port: 1, weight: 3}, {ip: 10.0.0.2, port: 1}]}\n";
        r.apply(&rules(rr), &mut t).unwrap();
        let k = svc_key("20.0.0.1".parse().unwrap(), 80, Protocol::Tcp);
        let s = t.svcs[&k];
        assert_eq!(s.table_len, 4, "weights 3:1 give a 4-entry sequence");
        assert_eq!(s.flags & svc_flags::SRC_RANGES, svc_flags::SRC_RANGES);
        let c = t.chunks[&SelKey::new(s.rule_id, s.ep_bank, 0)];
        assert_eq!(c.ep[..4].iter().filter(|e| **e == 0).count(), 3);
        assert!(t
            .ranges
            .contains(&(s.rule_id, "10.0.0.0/8".parse().unwrap())));

        // Switch to hash and change the ranges: a full Maglev table in the
        // other bank, ranges diffed.
        let hash = rr.replace(
            "source_ranges: [10.0.0.0/8]",
            "selection: hash, source_ranges: [192.168.0.0/16]",
        );
        r.apply(&rules(&hash), &mut t).unwrap();
        let s2 = t.svcs[&k];
        assert_eq!(s2.sel, lb_sel::HASH);
        assert_eq!(s2.table_len, loxilb_common::MAGLEV_M);
        assert_ne!(s2.ep_bank, s.ep_bank);
        let want_chunks = loxilb_common::MAGLEV_M.div_ceil(SEL_CHUNK);
        let in_bank = |t: &MemTable, bank: u8| {
            t.chunks
                .keys()
                .filter(|c| c.rule_id == s.rule_id && (c.chunk >> 24) as u8 == bank)
                .count() as u32
        };
        assert_eq!(in_bank(&t, s2.ep_bank), want_chunks);
        assert_eq!(t.ranges.len(), 1);
        assert!(t
            .ranges
            .contains(&(s.rule_id, "192.168.0.0/16".parse().unwrap())));

        // Back to rr without ranges: the old bank is reused and trimmed.
        let plain = rr.replace("source_ranges: [10.0.0.0/8], ", "");
        r.apply(&rules(&plain), &mut t).unwrap();
        let s3 = t.svcs[&k];
        assert_eq!(s3.flags & svc_flags::SRC_RANGES, 0);
        assert!(t.ranges.is_empty());
        assert_eq!(in_bank(&t, s3.ep_bank), 1);

        // Removal takes every chunk of both banks.
        r.apply(&[], &mut t).unwrap();
        assert!(t.chunks.is_empty(), "{} chunks left", t.chunks.len());
    }

    #[test]
    fn endpoint_counter_slots_are_stable_and_reused_oldest_first() {
        let mut t = MemTable::default();
        let mut r = Rules::adopt(vec![]);
        r.apply(&rules(TWO), &mut t).unwrap();
        let k = svc_key("20.0.0.1".parse().unwrap(), 80, Protocol::Tcp);
        let slots =
            |t: &MemTable| -> Vec<u32> { active_eps(t, k).iter().map(|e| e.stat_idx).collect() };
        let first = slots(&t);
        assert_eq!(first.len(), 2);
        let all: BTreeSet<u32> = t.eps.values().map(|e| e.stat_idx).collect();
        assert_eq!(all.len(), 3, "one slot per (rule, endpoint)");
        // Adding an endpoint keeps the others' slots.
        let three = TWO.replace(
            "{ip: 10.0.0.2, port: 8080}]",
            "{ip: 10.0.0.2, port: 8080}, {ip: 10.0.0.9, port: 8080}]",
        );
        r.apply(&rules(&three), &mut t).unwrap();
        let second = slots(&t);
        assert_eq!(&second[..2], &first[..]);
        // Adoption rebuilds the slot table: nothing is reallocated.
        let snapshot: Vec<Installed> = r.installed().cloned().collect();
        let mut r2 = Rules::adopt(snapshot);
        let resets = t.ep_resets.len();
        r2.apply(&rules(&three), &mut t).unwrap();
        assert_eq!(t.ep_resets.len(), resets);
        // A new endpoint gets a fresh, zeroed slot.
        let four = three.replace(
            "{ip: 10.0.0.9, port: 8080}]",
            "{ip: 10.0.0.9, port: 8080}, {ip: 10.0.0.10, port: 8080}]",
        );
        r2.apply(&rules(&four), &mut t).unwrap();
        assert_eq!(t.ep_resets.len(), resets + 1);
        assert!(!second.contains(t.ep_resets.last().unwrap()));
    }

    #[test]
    fn endpoint_liveness_in_place_and_at_apply() {
        let mut t = MemTable::default();
        let mut r = Rules::adopt(vec![]);
        r.apply(&rules(TWO), &mut t).unwrap();
        let k = svc_key("20.0.0.1".parse().unwrap(), 80, Protocol::Tcp);
        let writes = t.writes;
        assert!(r
            .set_endpoint_state(&mut t, "a", "10.0.0.2".parse().unwrap(), 8080, false)
            .unwrap());
        assert_eq!(t.writes, writes + 1, "one endpoint write, no bank flip");
        let eps = active_eps(&t, k);
        assert_eq!(eps[1].flags, loxilb_common::ep_flags::INACTIVE);
        assert_eq!(eps[0].flags, 0);
        // Re-applying the same file with the same liveness changes nothing.
        let down =
            |rule: &str, ip: IpAddr, _| rule == "a" && ip == "10.0.0.2".parse::<IpAddr>().unwrap();
        let rep = r.apply_with(&rules(TWO), &mut t, &down).unwrap();
        assert_eq!(rep.unchanged, 2);
        // An endpoint change keeps the down endpoint inactive in the new bank.
        let three = TWO.replace(
            "{ip: 10.0.0.2, port: 8080}]",
            "{ip: 10.0.0.2, port: 8080}, {ip: 10.0.0.9, port: 8080}]",
        );
        r.apply_with(&rules(&three), &mut t, &down).unwrap();
        let eps = active_eps(&t, k);
        assert_eq!(eps.len(), 3);
        assert_eq!(eps[1].flags, loxilb_common::ep_flags::INACTIVE);
        // Back up.
        assert!(r
            .set_endpoint_state(&mut t, "a", "10.0.0.2".parse().unwrap(), 8080, true)
            .unwrap());
        assert_eq!(active_eps(&t, k)[1].flags, 0);
        assert!(!r
            .set_endpoint_state(&mut t, "nope", "10.0.0.2".parse().unwrap(), 8080, true)
            .unwrap());
    }

    #[test]
    fn removal_deletes_everything_and_flushes_sessions() {
        let mut t = MemTable::default();
        let mut r = Rules::adopt(vec![]);
        r.apply(&rules(TWO), &mut t).unwrap();
        let rep = r.apply(&[], &mut t).unwrap();
        assert_eq!(rep.removed.len(), 2);
        assert_eq!(rep.sessions_flushed, 6);
        assert!(t.svcs.is_empty());
        assert!(t.eps.is_empty());
        assert!(t.vips.is_empty(), "VIPs go with their last rule");
        assert!(t.filter.values().all(|w| *w == 0));
    }

    #[test]
    fn adopted_rules_are_diffed_not_rewritten() {
        let mut t = MemTable::default();
        let mut r = Rules::adopt(vec![]);
        r.apply(&rules(TWO), &mut t).unwrap();
        let snapshot: Vec<Installed> = r.installed().cloned().collect();
        let mut r2 = Rules::adopt(snapshot);
        let writes = t.writes;
        let rep = r2.apply(&rules(TWO), &mut t).unwrap();
        assert_eq!(rep.unchanged, 2);
        assert_eq!(t.writes, writes);
    }
}
