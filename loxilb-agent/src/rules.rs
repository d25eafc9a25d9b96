//! Reconcile: turn the desired rule set into map writes as a diff, so
//! untouched rules (and their sessions) are never disturbed. Plain Rust
//! over the narrow [`RuleTable`] seam, unit-tested with an in-memory table.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use std::{fmt, net::IpAddr};

use anyhow::{bail, Result};
use ipnet::IpNet;
use loxilb_common::{
    addr_filter_bit, addr_fold, addr_from_ip, ip_from_addr, lb_mode, lb_sel, svc_flags, Addr,
    EpIndex, EpKey, EpVal, RuleVips, SelChunk, SvcKey, SvcVal, ADDR_FILTER_WORDS, MAX_RULE_VIPS,
    MAX_SEL_CHUNKS, SEL_CHUNK,
};

use loxilb_model::{Endpoint, Mode, Protocol, Rule, Selection};

use crate::{ep_index::EpIndexRefs, sel_space::SelSpace, selection};

// The rule model's limits and protocol numbers are the datapath's.
const _: () = {
    assert!(loxilb_model::MAX_RULE_VIPS == loxilb_common::MAX_RULE_VIPS);
    assert!(loxilb_model::MAX_ENDPOINTS == loxilb_common::MAX_EPS_PER_RULE as usize);
    assert!(Protocol::Tcp.number() == loxilb_common::IPPROTO_TCP);
    assert!(Protocol::Udp.number() == loxilb_common::IPPROTO_UDP);
    assert!(Protocol::Sctp.number() == loxilb_common::IPPROTO_SCTP);
};

/// The maps the reconciler writes; implemented by the real datapath and by
/// an in-memory table in tests.
pub trait RuleTable {
    fn put_service(&mut self, key: SvcKey, val: SvcVal) -> Result<()>;
    fn delete_service(&mut self, key: SvcKey) -> Result<()>;
    fn put_endpoint(&mut self, key: EpKey, val: EpVal) -> Result<()>;
    fn delete_endpoint(&mut self, key: EpKey) -> Result<()>;
    /// Write chunk `index` of `LB_SEL_TABLE`.
    fn put_sel_chunk(&mut self, index: u32, val: SelChunk) -> Result<()>;
    /// Clear chunk `index` (its run was given back).
    fn delete_sel_chunk(&mut self, index: u32) -> Result<()>;
    fn put_src_range(&mut self, rule_id: u32, net: IpNet) -> Result<()>;
    fn delete_src_range(&mut self, rule_id: u32, net: IpNet) -> Result<()>;
    fn put_filter_word(&mut self, index: u32, word: u64) -> Result<()>;
    /// A VIP now exists / no longer exists (echo replies).
    fn put_vip(&mut self, vip: Addr) -> Result<()>;
    fn delete_vip(&mut self, vip: Addr) -> Result<()>;
    /// Every VIP of a rule, primary first (`LB_RULE_VIPS`: what SCTP's
    /// INIT-ACK rewrite tells clients).
    fn put_rule_vips(&mut self, rule_id: u32, vips: RuleVips) -> Result<()>;
    fn delete_rule_vips(&mut self, rule_id: u32) -> Result<()>;
    /// Zero a rule id's counters (before the id is used by a new rule).
    fn reset_rule_stats(&mut self, rule_id: u32) -> Result<()>;
    /// Zero an endpoint counter slot (before it is given to an endpoint).
    fn reset_ep_stats(&mut self, idx: u32) -> Result<()>;
    /// Mark endpoint slot `idx` empty (`LB_EP_SLOTS`): its endpoint left
    /// its rule, so a `persist` client remembered there goes elsewhere.
    /// (`put_endpoint` fills the slot of the endpoint it writes.)
    fn retire_ep_slot(&mut self, idx: u32) -> Result<()>;
    /// Remove every session (and client affinity) of `rule_id`; returns
    /// how many conntrack entries went.
    fn flush_sessions(&mut self, rule_id: u32) -> Result<usize>;
    /// Write endpoint index slot `slot` (`LB_EP_INDEX`; all zero: empty).
    fn put_ep_index(&mut self, slot: u32, e: EpIndex) -> Result<()>;
}

/// A rule as installed in the maps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Installed {
    pub name: String,
    /// The primary VIP's service entry (the rule's key).
    pub key: SvcKey,
    /// SCTP multihoming: the secondary VIPs that have a service entry of
    /// their own (`key` with this address: same port, protocol, `SvcVal`
    /// and rule id), in the rule's order. Exactly the entries in the map:
    /// while a change is under way it may hold VIPs being added or removed.
    pub secondary: Vec<Addr>,
    /// The rule's `LB_RULE_VIPS` entry as written: the primary VIP, then
    /// the secondary ones. Every SCTP rule has one (a single VIP when it
    /// is not multihomed, so the datapath always knows a rule's addresses);
    /// empty: no entry (TCP and UDP rules).
    pub rule_vips: Vec<Addr>,
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
    /// Each bank's selection table: the first chunk of its run in
    /// `LB_SEL_TABLE` and the run's length (0: no table; the idle bank of
    /// an adopted rule has none).
    pub sel_base: [u32; 2],
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

/// The service entry of secondary VIP `vip` of the rule whose primary
/// entry is `primary`.
pub fn secondary_key(primary: &SvcKey, vip: Addr) -> SvcKey {
    SvcKey {
        addr: vip,
        ..*primary
    }
}

/// The `LB_RULE_VIPS` value for `vips` (at most `MAX_RULE_VIPS`).
pub fn rule_vips_val(vips: &[Addr]) -> RuleVips {
    let mut v = RuleVips {
        n: vips.len().min(MAX_RULE_VIPS) as u32,
        ..RuleVips::default()
    };
    for (d, a) in v.vips.iter_mut().zip(vips) {
        *d = *a;
    }
    v
}

pub fn ep_val(e: &Endpoint) -> EpVal {
    EpVal {
        addr: addr_from_ip(e.ip),
        port: e.port.to_be(),
        weight: e.weight,
        flags: 0,
        stat_idx: 0,
        rule_id: 0,
    }
}

/// What identifies an endpoint's configuration (not its counter slot).
fn ep_conf(e: &EpVal) -> (Addr, u16, u16, u32) {
    (e.addr, e.port, e.weight, e.flags)
}

/// Counter slots of endpoints (`EpVal::stat_idx`), one per (rule,
/// endpoint), stable while the endpoint stays in its rule (the rule's
/// installed endpoints are the record of which slot each one holds).
/// Freed slots are reused oldest-first, so a slot still referenced by
/// lingering sessions of a removed endpoint is not handed out again soon.
#[derive(Debug, Default)]
struct StatSlots {
    free: std::collections::VecDeque<u32>,
    next: u32,
}

impl StatSlots {
    fn alloc(&mut self, t: &mut dyn RuleTable) -> Result<u32> {
        let i = if self.next < loxilb_common::MAX_EP_STATS {
            self.next += 1;
            self.next - 1
        } else {
            self.free.pop_front().ok_or_else(|| {
                anyhow::anyhow!(
                    "more than {} endpoints over all rules; remove endpoints or rules",
                    loxilb_common::MAX_EP_STATS
                )
            })?
        };
        if let Err(e) = t.reset_ep_stats(i) {
            self.free.push_front(i);
            return Err(e);
        }
        Ok(i)
    }

    /// Give each of `new` its slot: the one it holds in `old` (the rule's
    /// installed endpoints) when it is there, a fresh zeroed one otherwise.
    /// Returns the slots of `old` that `new` no longer uses (release them
    /// with [`StatSlots::release`] once `new` is installed) and the fresh
    /// ones (to give back if installing fails).
    fn assign(
        &mut self,
        t: &mut dyn RuleTable,
        old: &[EpVal],
        new: &mut [EpVal],
    ) -> Result<(Vec<u32>, Vec<u32>)> {
        let mut held: BTreeMap<(Addr, u16), u32> = BTreeMap::new();
        for e in old {
            held.entry((e.addr, e.port)).or_insert(e.stat_idx);
        }
        let mut kept: BTreeMap<(Addr, u16), u32> = BTreeMap::new();
        let mut fresh = vec![];
        for e in new.iter_mut() {
            let k = (e.addr, e.port);
            e.stat_idx = match kept.get(&k).or_else(|| held.get(&k)) {
                Some(i) => *i,
                None => match self.alloc(t) {
                    Ok(i) => {
                        fresh.push(i);
                        i
                    }
                    Err(err) => {
                        self.release(fresh);
                        return Err(err);
                    }
                },
            };
            kept.insert(k, e.stat_idx);
        }
        let gone = held
            .into_iter()
            .filter(|(k, _)| !kept.contains_key(k))
            .map(|(_, i)| i)
            .collect();
        Ok((gone, fresh))
    }

    fn release(&mut self, slots: Vec<u32>) {
        self.free.extend(slots);
    }
}

/// What an endpoint slot holds once its endpoint left its rule
/// (`RuleTable::retire_ep_slot`): no address, inactive.
pub const RETIRED_EP: EpVal = EpVal {
    addr: [0; 4],
    port: 0,
    weight: 0,
    flags: loxilb_common::ep_flags::INACTIVE,
    stat_idx: 0,
    rule_id: 0,
};

/// Run `f` on every one of `items`, also after one fails; the first error
/// is returned.
fn for_each_all(
    items: impl IntoIterator<Item = u32>,
    mut f: impl FnMut(u32) -> Result<()>,
) -> Result<()> {
    let mut first = Ok(());
    for i in items {
        if let Err(e) = f(i) {
            if first.is_ok() {
                first = Err(e);
            }
        }
    }
    first
}

/// Mark the slots of endpoints that left their rule empty, every one even
/// if one write fails (the first error is returned).
fn retire_slots(t: &mut dyn RuleTable, slots: &[u32]) -> Result<()> {
    for_each_all(slots.iter().copied(), |i| t.retire_ep_slot(i))
}

/// The selection-table space with the runs of adopted rules taken. A run
/// that overlaps another or lies outside the map (maps not written by this
/// agent) is not taken: its bank is recorded as having no table, so the
/// rule's next change places it anew.
fn adopt_runs(installed: &mut BTreeMap<SvcKeyOrd, Installed>) -> SelSpace {
    let mut sel = SelSpace::new(MAX_SEL_CHUNKS);
    for (k, i) in installed.iter_mut() {
        for b in 0..2 {
            if i.chunks[b] == 0 {
                continue;
            }
            if let Err(e) = sel.take(i.sel_base[b], i.chunks[b]) {
                tracing::warn!(
                    "rule {k}: selection table of bank {b}: {e}; placed anew on its next change"
                );
                i.chunks[b] = 0;
            }
        }
    }
    sel
}

/// Clear the run of `n` chunks from `base` and give it back (also when a
/// clear fails: its stale chunks are rewritten before the run serves
/// again; the first error is returned).
fn free_run(t: &mut dyn RuleTable, sel: &mut SelSpace, base: u32, n: u32) -> Result<()> {
    let cleared = for_each_all(base..base + n, |c| t.delete_sel_chunk(c));
    sel.release(base, n);
    cleared
}

/// Rule ids: the lowest free one is given out first.
#[derive(Debug)]
struct RuleIds {
    /// Free ids below `next`.
    free: BTreeSet<u32>,
    /// Every id from here on is free.
    next: u32,
}

impl RuleIds {
    fn of(used: impl Iterator<Item = u32>) -> Self {
        let used: BTreeSet<u32> = used.collect();
        let next = used.last().map_or(1, |m| m + 1).max(1);
        RuleIds {
            free: (1..next).filter(|i| !used.contains(i)).collect(),
            next,
        }
    }

    fn alloc(&mut self) -> Result<u32> {
        if let Some(i) = self.free.pop_first() {
            return Ok(i);
        }
        if self.next > loxilb_common::MAX_SERVICES {
            bail!(
                "all {} rule slots are in use; remove rules first",
                loxilb_common::MAX_SERVICES
            );
        }
        self.next += 1;
        Ok(self.next - 1)
    }

    fn release(&mut self, id: u32) {
        if id > 0 && id < self.next {
            self.free.insert(id);
        }
    }
}

/// The address filter and the VIP set, reference-counted so that a rule
/// change updates only the words and VIPs of the addresses it involves: a
/// bit is cleared when no VIP or endpoint of any rule sets it any more, a
/// VIP goes when its last rule does. Changes are written by
/// [`AddrRefs::flush`]; what is still unwritten (a write failed) stays
/// pending for the next flush.
///
/// An endpoint that leaves a rule keeps a count of its own (it lingers)
/// while sessions to it may live: the filter lets through only packets
/// to or from its addresses, and a live session's replies come from the
/// endpoint to the client. [`AddrRefs::drain`] lets it go once
/// [`ep_index::CLEAN_WALKS`] walks of the session table in a row found
/// no session with it.
#[derive(Debug)]
struct AddrRefs {
    /// Per filter bit: how many (rule VIP or endpoint) addresses set it.
    bits: Vec<u32>,
    /// The filter words as written in the map.
    words: Vec<u64>,
    dirty_words: BTreeSet<u32>,
    /// Per VIP: how many rules use it.
    vip_refs: HashMap<Addr, u32>,
    /// The VIPs as written in the map.
    vips: BTreeSet<Addr>,
    dirty_vips: BTreeSet<Addr>,
    /// Endpoint addresses kept for their sessions: clean walks in a row.
    lingering: BTreeMap<Addr, u32>,
}

fn filter_bit(a: &Addr) -> (u32, u32) {
    addr_filter_bit(addr_fold(a))
}

impl AddrRefs {
    /// The counts of what `installed` holds, taken as already written.
    fn of<'a>(installed: impl Iterator<Item = &'a Installed>) -> Self {
        let mut r = AddrRefs {
            bits: vec![0; ADDR_FILTER_WORDS as usize * 64],
            words: vec![0; ADDR_FILTER_WORDS as usize],
            dirty_words: BTreeSet::new(),
            vip_refs: HashMap::new(),
            vips: BTreeSet::new(),
            dirty_vips: BTreeSet::new(),
            lingering: BTreeMap::new(),
        };
        for i in installed {
            r.add_rule(i);
        }
        for (w, word) in r.words.iter_mut().enumerate() {
            *word = word_of(&r.bits, w as u32);
        }
        r.vips = r.vip_refs.keys().copied().collect();
        r.dirty_words.clear();
        r.dirty_vips.clear();
        r
    }

    fn addr(&mut self, a: &Addr, up: bool) {
        let (w, b) = filter_bit(a);
        let c = &mut self.bits[(w * 64 + b) as usize];
        if up {
            *c += 1;
        } else {
            *c = c.checked_sub(1).expect("address filter count underflow");
        }
        if *c == u32::from(up) {
            // 0 -> 1 or 1 -> 0: the word changes.
            self.dirty_words.insert(w);
        }
    }

    fn vip(&mut self, a: Addr, up: bool) {
        let c = self.vip_refs.entry(a).or_insert(0);
        if up {
            *c += 1;
        } else {
            *c = c.checked_sub(1).expect("VIP count underflow");
        }
        if *c == u32::from(up) {
            self.dirty_vips.insert(a);
        }
        if *c == 0 {
            self.vip_refs.remove(&a);
        }
    }

    /// Count (or uncount) everything of `i`: its VIPs and endpoint
    /// addresses.
    fn rule(&mut self, i: &Installed, up: bool) {
        self.vip(i.key.addr, up);
        self.addr(&i.key.addr, up);
        for a in &i.secondary {
            self.secondary(*a, up);
        }
        for e in &i.eps {
            self.addr(&e.addr, up);
        }
    }

    /// A secondary VIP of a rule (a VIP like the primary one).
    fn secondary(&mut self, a: Addr, up: bool) {
        self.vip(a, up);
        self.addr(&a, up);
    }

    fn add_rule(&mut self, i: &Installed) {
        self.rule(i, true)
    }

    fn remove_rule(&mut self, i: &Installed) {
        self.rule(i, false)
    }

    /// The endpoints of a rule changed from `old` to `new`: those that
    /// left linger for their sessions.
    fn eps(&mut self, old: &[EpVal], new: &[EpVal]) {
        // A set: a rule may have tens of thousands of endpoints.
        let kept: std::collections::HashSet<Addr> = new.iter().map(|e| e.addr).collect();
        for e in new {
            self.addr(&e.addr, true);
        }
        for e in old {
            if !kept.contains(&e.addr) {
                self.linger(e.addr);
            }
            self.addr(&e.addr, false);
        }
    }

    /// Keep endpoint address `a` in the filter for its sessions (again
    /// from a count of zero clean walks).
    fn linger(&mut self, a: Addr) {
        if self.lingering.insert(a, 0).is_none() {
            self.addr(&a, true);
        }
    }

    /// Count a walk of the session table: `sessions` yields the endpoint
    /// address of every live session ([`session_endpoint`]). A needed
    /// address the filter does not let through (left by an agent before a
    /// restart, say) starts lingering; a lingering one that
    /// [`ep_index::CLEAN_WALKS`] walks in a row did not need is let go.
    /// Returns how many were let go (written by the next flush).
    fn drain(&mut self, sessions: impl Iterator<Item = Addr>) -> usize {
        // Only addresses that linger or that the filter misses matter: the
        // set stays small however many sessions the table holds.
        let mut needed = BTreeSet::new();
        for a in sessions {
            let (w, b) = filter_bit(&a);
            if self.bits[(w * 64 + b) as usize] == 0 || self.lingering.contains_key(&a) {
                needed.insert(a);
            }
        }
        for a in &needed {
            if !self.lingering.contains_key(a) {
                self.linger(*a);
            }
        }
        let mut done = vec![];
        for (a, walks) in self.lingering.iter_mut() {
            if needed.contains(a) {
                *walks = 0;
            } else {
                *walks += 1;
                if *walks >= crate::ep_index::CLEAN_WALKS {
                    done.push(*a);
                }
            }
        }
        for a in &done {
            self.lingering.remove(a);
            self.addr(a, false);
        }
        done.len()
    }

    /// Write the words and VIPs that changed.
    fn flush(&mut self, t: &mut dyn RuleTable) -> Result<()> {
        while let Some(w) = self.dirty_words.first().copied() {
            let word = word_of(&self.bits, w);
            if word != self.words[w as usize] {
                t.put_filter_word(w, word)?;
                self.words[w as usize] = word;
            }
            self.dirty_words.remove(&w);
        }
        while let Some(v) = self.dirty_vips.first().copied() {
            let want = self.vip_refs.contains_key(&v);
            if want && !self.vips.contains(&v) {
                t.put_vip(v)?;
                self.vips.insert(v);
            } else if !want && self.vips.contains(&v) {
                t.delete_vip(v)?;
                self.vips.remove(&v);
            }
            self.dirty_vips.remove(&v);
        }
        Ok(())
    }
}

/// The endpoint address whose packets entry (`k`, `v`) translates: the
/// source of a reply entry's packets, where a forward entry sends its
/// packets (none for DSR, whose replies do not come back through the
/// node).
pub fn session_endpoint(k: &loxilb_common::CtKey, v: &loxilb_common::CtVal) -> Option<Addr> {
    use loxilb_common::ct_dir;
    if v.dir == ct_dir::REPLY {
        Some(k.saddr)
    } else if lb_mode::is_dsr(v.mode) {
        None
    } else {
        Some(v.xdaddr)
    }
}

/// Filter word `w` from the per-bit counts.
fn word_of(bits: &[u32], w: u32) -> u64 {
    let base = w as usize * 64;
    bits[base..base + 64]
        .iter()
        .enumerate()
        .fold(0u64, |acc, (b, c)| if *c > 0 { acc | 1 << b } else { acc })
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
    secondary: Vec<Addr>,
    rule_vips: Vec<Addr>,
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
            secondary: r.secondary_vips.iter().map(|a| addr_from_ip(*a)).collect(),
            rule_vips: if r.protocol == Protocol::Sctp {
                std::iter::once(r.vip)
                    .chain(r.secondary_vips.iter().copied())
                    .map(addr_from_ip)
                    .collect()
            } else {
                vec![]
            },
        }
    }

    fn same_as(&self, i: &Installed) -> bool {
        self.eps.iter().map(ep_conf).eq(i.eps.iter().map(ep_conf))
            && self.timeout_s == i.timeout_s
            && self.persist_timeout_s == i.persist_timeout_s
            && self.mode == i.mode
            && self.sel == i.sel
            && self.src_ranges == i.src_ranges
            && self.secondary == i.secondary
            && self.rule_vips == i.rule_vips
    }
}

/// The agent's view of what is installed, keyed by service.
#[derive(Debug)]
pub struct Rules {
    installed: BTreeMap<SvcKeyOrd, Installed>,
    /// The rule (key) each secondary-VIP service entry belongs to.
    owners: HashMap<SvcKeyOrd, SvcKeyOrd>,
    addrs: AddrRefs,
    slots: StatSlots,
    ids: RuleIds,
    /// Where the selection tables are in `LB_SEL_TABLE`.
    sel: SelSpace,
    /// The endpoint index (one-entry sessions).
    index: EpIndexRefs,
}

impl Default for Rules {
    fn default() -> Self {
        Rules::adopt(vec![])
    }
}

/// `SvcKey` ordered by address, port, protocol (for deterministic
/// iteration).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct SvcKeyOrd(IpAddr, u16, u8);

impl From<SvcKey> for SvcKeyOrd {
    fn from(k: SvcKey) -> Self {
        SvcKeyOrd(ip_from_addr(&k.addr), u16::from_be(k.port), k.proto)
    }
}

impl fmt::Display for SvcKeyOrd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let proto = Protocol::from_number(self.2)
            .map(|p| p.to_string())
            .unwrap_or_else(|| self.2.to_string());
        write!(f, "{}/{proto}", std::net::SocketAddr::new(self.0, self.1))
    }
}

/// The service entries of the secondary VIPs of `r`.
fn secondary_keys(r: &Rule) -> impl Iterator<Item = SvcKeyOrd> + '_ {
    r.secondary_vips
        .iter()
        .map(|a| SvcKeyOrd(*a, r.port, r.protocol.number()))
}

/// The secondary VIPs of rule `rule` (primary entry `key`) changed from
/// `old` to `new` (both as in the map): count and own them.
fn track_secondaries(
    addrs: &mut AddrRefs,
    owners: &mut HashMap<SvcKeyOrd, SvcKeyOrd>,
    rule: SvcKeyOrd,
    key: &SvcKey,
    old: &[Addr],
    new: &[Addr],
) {
    for a in new.iter().filter(|a| !old.contains(a)) {
        addrs.secondary(*a, true);
        owners.insert(secondary_key(key, *a).into(), rule);
    }
    for a in old.iter().filter(|a| !new.contains(a)) {
        addrs.secondary(*a, false);
        let s = SvcKeyOrd::from(secondary_key(key, *a));
        if owners.get(&s) == Some(&rule) {
            owners.remove(&s);
        }
    }
}

impl Rules {
    /// Start from what the maps already hold (an adopted datapath).
    pub fn adopt(installed: Vec<Installed>) -> Self {
        let used: BTreeSet<u32> = installed
            .iter()
            .flat_map(|i| i.eps.iter().map(|e| e.stat_idx))
            .collect();
        let next = used.iter().next_back().map(|m| m + 1).unwrap_or(0);
        let slots = StatSlots {
            free: (0..next).filter(|i| !used.contains(i)).collect(),
            next,
        };
        let mut installed: BTreeMap<SvcKeyOrd, Installed> = installed
            .into_iter()
            .map(|i| (SvcKeyOrd::from(i.key), i))
            .collect();
        let sel = adopt_runs(&mut installed);
        let owners = installed
            .iter()
            .flat_map(|(k, i)| {
                i.secondary
                    .iter()
                    .map(move |a| (SvcKeyOrd::from(secondary_key(&i.key, *a)), *k))
            })
            .collect();
        Rules {
            addrs: AddrRefs::of(installed.values()),
            index: EpIndexRefs::of(installed.values(), std::iter::empty()),
            ids: RuleIds::of(installed.values().map(|i| i.rule_id)),
            installed,
            owners,
            slots,
            sel,
        }
    }

    /// Take the endpoint index an adopted datapath holds (its non-empty
    /// slots) as written: the next change writes what the rules want of it
    /// (and drains the rest: see `ep_index`).
    pub fn adopt_ep_index(&mut self, written: Vec<(u32, EpIndex)>) {
        self.index = EpIndexRefs::of(self.installed.values(), written.into_iter());
    }

    /// Write what the endpoint index is still waiting to write (a failed
    /// write): before a walk of the session table, so that every draining
    /// mark precedes the walk [`Rules::drain_ep_index`] is given.
    pub fn flush_ep_index(&mut self, t: &mut dyn RuleTable) -> Result<()> {
        self.index.flush(t)
    }

    /// Empty the endpoint index's draining slots that no session of `live`
    /// (the session table, walked after [`Rules::flush_ep_index`]) has
    /// needed for `ep_index::CLEAN_WALKS` walks. Returns how many slots
    /// were released.
    pub fn drain_ep_index(
        &mut self,
        live: &[(loxilb_common::CtKey, loxilb_common::CtVal)],
        t: &mut dyn RuleTable,
    ) -> Result<usize> {
        self.index.drain(live, t)
    }

    /// Let go of the endpoint addresses that linger in the address filter
    /// (they left their rules) once no session of `live` (the session
    /// table, walked after they left) has needed them for
    /// `ep_index::CLEAN_WALKS` walks; keep there the endpoint of any live
    /// session the filter would not let through. Returns how many
    /// addresses were let go.
    pub fn drain_filter(
        &mut self,
        live: &[(loxilb_common::CtKey, loxilb_common::CtVal)],
        t: &mut dyn RuleTable,
    ) -> Result<usize> {
        let n = self
            .addrs
            .drain(live.iter().filter_map(|(k, v)| session_endpoint(k, v)));
        self.addrs.flush(t)?;
        Ok(n)
    }

    /// The endpoint addresses that linger in the address filter.
    pub fn lingering(&self) -> impl Iterator<Item = &Addr> {
        self.addrs.lingering.keys()
    }

    pub fn installed(&self) -> impl Iterator<Item = &Installed> {
        self.installed.values()
    }

    /// The rule installed for `key`.
    pub fn get(&self, key: &SvcKey) -> Option<&Installed> {
        self.installed.get(&SvcKeyOrd::from(*key))
    }

    /// How many rules are installed.
    pub fn len(&self) -> usize {
        self.installed.len()
    }

    pub fn is_empty(&self) -> bool {
        self.installed.is_empty()
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

    /// The address filter recomputed from every installed rule and the
    /// lingering endpoints (what the reference counts must always agree
    /// with).
    #[cfg(test)]
    fn compute_filter(&self) -> Vec<u64> {
        let mut f = vec![0u64; ADDR_FILTER_WORDS as usize];
        let mut set = |addr: Addr| {
            let (w, b) = addr_filter_bit(addr_fold(&addr));
            f[w as usize] |= 1 << b;
        };
        for i in self.installed.values() {
            set(i.key.addr);
            for a in &i.secondary {
                set(*a);
            }
            for e in &i.eps {
                set(e.addr);
            }
        }
        for a in self.addrs.lingering.keys() {
            set(*a);
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
        if desired.len() > loxilb_common::MAX_SERVICES as usize {
            bail!(
                "{} rules; the datapath holds at most {}; remove rules",
                desired.len(),
                loxilb_common::MAX_SERVICES
            );
        }
        let want: BTreeMap<SvcKeyOrd, &Rule> = desired
            .iter()
            .map(|r| (svc_key(r.vip, r.port, r.protocol).into(), r))
            .collect();
        let gone: Vec<SvcKeyOrd> = self
            .installed
            .keys()
            .filter(|k| !want.contains_key(k))
            .copied()
            .collect();
        self.change(gone, want, t, down)
    }

    /// Change only some rules: install (add, or update as a diff) every
    /// rule of `upserts`, remove the rules of `removed` (keys of rules no
    /// longer wanted; a key also in `upserts` stays, one not installed is
    /// ignored). Every other rule, and the filter bits and VIPs only they
    /// use, is not looked at: the cost is that of the rules changed, not of
    /// all installed. The maps end up exactly as [`Rules::apply_with`] of
    /// the whole set with these changes would leave them (same rule ids,
    /// banks and counter slots).
    pub fn apply_changes(
        &mut self,
        upserts: &[Rule],
        removed: &[SvcKey],
        t: &mut dyn RuleTable,
        down: &dyn Fn(&str, IpAddr, u16) -> bool,
    ) -> Result<Report> {
        let want: BTreeMap<SvcKeyOrd, &Rule> = upserts
            .iter()
            .map(|r| (svc_key(r.vip, r.port, r.protocol).into(), r))
            .collect();
        let gone: BTreeSet<SvcKeyOrd> = removed
            .iter()
            .map(|k| SvcKeyOrd::from(*k))
            .filter(|k| !want.contains_key(k) && self.installed.contains_key(k))
            .collect();
        self.change(gone.into_iter().collect(), want, t, down)
    }

    /// Remove `gone` (in key order: they free rule ids and counter slots
    /// first), then install `want` (key order), then write the filter and
    /// VIP changes.
    fn change(
        &mut self,
        gone: Vec<SvcKeyOrd>,
        want: BTreeMap<SvcKeyOrd, &Rule>,
        t: &mut dyn RuleTable,
        down: &dyn Fn(&str, IpAddr, u16) -> bool,
    ) -> Result<Report> {
        // Before any write: every service entry (VIP, port, protocol) is
        // one rule's, and secondary VIPs passing from one rule to another
        // are let go by the first before the second takes them.
        let release = self.check_claims(&gone, &want)?;
        let mut report = Report::default();
        let result = (|| -> Result<()> {
            for k in gone {
                self.remove(k, t, &mut report)?;
            }
            for (owner, vips) in release {
                self.release_secondaries(owner, &vips, t)?;
            }
            for (k, r) in want {
                self.upsert(k, r, t, down, &mut report)?;
            }
            Ok(())
        })();
        // Whatever was installed (also before a failed write) gets its
        // filter bits and VIPs.
        let flushed = self.addrs.flush(t);
        let indexed = self.index.flush(t);
        result?;
        flushed?;
        indexed?;
        Ok(report)
    }

    /// Which rule each service entry of `want` belongs to, checked against
    /// each other and against the installed rules that stay. Returns the
    /// secondary VIPs that installed rules of `want` must let go first
    /// (another rule of `want` takes them), by rule.
    fn check_claims(
        &self,
        gone: &[SvcKeyOrd],
        want: &BTreeMap<SvcKeyOrd, &Rule>,
    ) -> Result<BTreeMap<SvcKeyOrd, Vec<Addr>>> {
        let mut release: BTreeMap<SvcKeyOrd, Vec<Addr>> = BTreeMap::new();
        if self.owners.is_empty() && want.values().all(|r| r.secondary_vips.is_empty()) {
            // No secondary VIP anywhere: primary keys are the rules' keys.
            return Ok(release);
        }
        let name = |k: &SvcKeyOrd| -> String {
            want.get(k)
                .map(|r| r.name.clone())
                .or_else(|| self.installed.get(k).map(|i| i.name.clone()))
                .unwrap_or_else(|| k.to_string())
        };
        let conflict = |s: &SvcKeyOrd, a: &SvcKeyOrd, b: &SvcKeyOrd| {
            anyhow::anyhow!(
                "{s} is a VIP of both rule {:?} and rule {:?}; a VIP, port and protocol serve one \
                 rule: change the address or the port of one of them",
                name(a),
                name(b)
            )
        };
        let mut claims: BTreeMap<SvcKeyOrd, SvcKeyOrd> = want.keys().map(|k| (*k, *k)).collect();
        for (k, r) in want {
            for s in secondary_keys(r) {
                if let Some(other) = claims.insert(s, *k) {
                    return Err(conflict(&s, &other, k));
                }
            }
        }
        let gone: BTreeSet<&SvcKeyOrd> = gone.iter().collect();
        for (s, claimant) in &claims {
            // The primary entry of an installed rule that stays as it is.
            if s != claimant && self.installed.contains_key(s) && !gone.contains(s) {
                return Err(conflict(s, s, claimant));
            }
            match self.owners.get(s) {
                Some(owner) if owner != claimant && !gone.contains(owner) => {
                    if !want.contains_key(owner) {
                        return Err(conflict(s, owner, claimant));
                    }
                    release.entry(*owner).or_default().push(addr_from_ip(s.0));
                }
                _ => {}
            }
        }
        Ok(release)
    }

    /// Rule `k` lets go of its secondary VIPs `vips` (another rule takes
    /// them in this change): its VIP list first, then their entries.
    fn release_secondaries(
        &mut self,
        k: SvcKeyOrd,
        vips: &[Addr],
        t: &mut dyn RuleTable,
    ) -> Result<()> {
        let Some(inst) = self.installed.get_mut(&k) else {
            return Ok(());
        };
        if !inst.rule_vips.is_empty() {
            let list: Vec<Addr> = inst
                .rule_vips
                .iter()
                .filter(|a| !vips.contains(a))
                .copied()
                .collect();
            if list != inst.rule_vips {
                t.put_rule_vips(inst.rule_id, rule_vips_val(&list))?;
                inst.rule_vips = list;
            }
        }
        let gone: Vec<Addr> = vips
            .iter()
            .filter(|a| inst.secondary.contains(a))
            .copied()
            .collect();
        for a in gone {
            self.drop_secondary(k, a, t)?;
        }
        Ok(())
    }

    /// Delete secondary VIP `a` of rule `k` from the datapath and stop
    /// counting and owning it.
    fn drop_secondary(&mut self, k: SvcKeyOrd, a: Addr, t: &mut dyn RuleTable) -> Result<()> {
        let Some(inst) = self.installed.get_mut(&k) else {
            return Ok(());
        };
        t.delete_service(secondary_key(&inst.key, a))?;
        let old = inst.secondary.clone();
        inst.secondary.retain(|x| *x != a);
        track_secondaries(
            &mut self.addrs,
            &mut self.owners,
            k,
            &inst.key,
            &old,
            &inst.secondary,
        );
        Ok(())
    }

    fn remove(&mut self, k: SvcKeyOrd, t: &mut dyn RuleTable, report: &mut Report) -> Result<()> {
        let Some(inst) = self.installed.get(&k) else {
            return Ok(());
        };
        // The secondary VIPs first: the rule is gone from the datapath when
        // its primary entry is.
        for a in inst.secondary.clone().into_iter().rev() {
            self.drop_secondary(k, a, t)?;
        }
        let inst = self.installed.get_mut(&k).expect("present");
        if !inst.rule_vips.is_empty() {
            t.delete_rule_vips(inst.rule_id)?;
            inst.rule_vips.clear();
        }
        t.delete_service(inst.key)?;
        // From here on the rule is gone from the datapath: forget it even
        // if cleaning up its entries fails (they are unreachable).
        let inst = self.installed.remove(&k).expect("present");
        self.addrs.remove_rule(&inst);
        self.index.rule(&inst, false);
        self.ids.release(inst.rule_id);
        let mut slots: Vec<u32> = inst.eps.iter().map(|e| e.stat_idx).collect();
        slots.sort_unstable();
        slots.dedup();
        let retired = retire_slots(t, &slots);
        self.slots.release(slots);
        report.removed.push(inst.name.clone());
        // Both tables' runs go back first, so a failed write below leaks
        // no selection-table space.
        let freed = free_run(t, &mut self.sel, inst.sel_base[0], inst.chunks[0]);
        let freed = freed.and(free_run(t, &mut self.sel, inst.sel_base[1], inst.chunks[1]));
        retired?;
        freed?;
        for bank in 0..2u8 {
            for idx in 0..inst.bank_len[bank as usize] {
                t.delete_endpoint(EpKey::new(inst.rule_id, bank, idx))?;
            }
        }
        for net in &inst.src_ranges {
            t.delete_src_range(inst.rule_id, *net)?;
        }
        report.sessions_flushed += t.flush_sessions(inst.rule_id)?;
        Ok(())
    }

    fn upsert(
        &mut self,
        k: SvcKeyOrd,
        r: &Rule,
        t: &mut dyn RuleTable,
        down: &dyn Fn(&str, IpAddr, u16) -> bool,
        report: &mut Report,
    ) -> Result<()> {
        let mut w = Want::of(r, down);
        match self.installed.get_mut(&k) {
            Some(inst) if w.same_as(inst) => {
                if inst.name != r.name {
                    inst.name = r.name.clone();
                }
                report.unchanged += 1;
            }
            Some(inst) => {
                // Fill the idle bank, then flip to it with one write.
                let bank = inst.bank ^ 1;
                let (gone, fresh) = self.slots.assign(t, &inst.eps, &mut w.eps)?;
                let old_eps = inst.eps.clone();
                let old_secondary = inst.secondary.clone();
                // The endpoint index follows the mode and endpoints as
                // installed (also after a failed write).
                self.index.rule(inst, false);
                let installed = install(t, &mut self.sel, inst, bank, w, &mut false);
                self.index.rule(inst, true);
                // The secondary entries now in the map, also after a
                // failed write.
                track_secondaries(
                    &mut self.addrs,
                    &mut self.owners,
                    k,
                    &inst.key,
                    &old_secondary,
                    &inst.secondary,
                );
                if let Err(e) = installed {
                    self.slots.release(fresh);
                    return Err(e);
                }
                self.addrs.eps(&old_eps, &inst.eps);
                let retired = retire_slots(t, &gone);
                self.slots.release(gone);
                retired?;
                inst.name = r.name.clone();
                report.updated.push(r.name.clone());
            }
            None => {
                let rule_id = self.ids.alloc()?;
                if let Err(e) = t.reset_rule_stats(rule_id) {
                    self.ids.release(rule_id);
                    return Err(e);
                }
                let mut inst = Installed {
                    name: r.name.clone(),
                    key: svc_key(r.vip, r.port, r.protocol),
                    secondary: vec![],
                    rule_vips: vec![],
                    rule_id,
                    bank: 0,
                    timeout_s: 0,
                    persist_timeout_s: 0,
                    mode: 0,
                    sel: 0,
                    eps: vec![],
                    bank_len: [0, 0],
                    table_len: 0,
                    sel_base: [0, 0],
                    chunks: [0, 0],
                    src_ranges: BTreeSet::new(),
                };
                let (_, fresh) = match self.slots.assign(t, &[], &mut w.eps) {
                    Ok(x) => x,
                    Err(e) => {
                        self.ids.release(rule_id);
                        return Err(e);
                    }
                };
                let mut reachable = false;
                if let Err(e) = install(t, &mut self.sel, &mut inst, 0, w, &mut reachable) {
                    self.slots.release(fresh);
                    if reachable {
                        // A service entry (a secondary VIP's) or the VIP
                        // list is written: keep the rule, incomplete (it
                        // differs from every wanted rule), so that the next
                        // apply installs it again or removes all of it.
                        self.addrs.add_rule(&inst);
                        self.index.rule(&inst, true);
                        for a in &inst.secondary {
                            self.owners.insert(secondary_key(&inst.key, *a).into(), k);
                        }
                        self.installed.insert(k, inst);
                    } else {
                        // Entries written before the failure are
                        // unreachable (no service entry points at them) and
                        // are overwritten when the id is used again.
                        self.ids.release(rule_id);
                        let _ = free_run(t, &mut self.sel, inst.sel_base[0], inst.chunks[0]);
                    }
                    return Err(e);
                }
                self.addrs.add_rule(&inst);
                self.index.rule(&inst, true);
                for a in &inst.secondary {
                    self.owners.insert(secondary_key(&inst.key, *a).into(), k);
                }
                self.installed.insert(k, inst);
                report.added.push(r.name.clone());
            }
        }
        Ok(())
    }
}

/// Write rule `inst` as `w` into `bank` and make that bank live. Service
/// entries, in this order: the secondary VIPs the rule did not have, the
/// rule's VIP list, the primary VIP (the flip), the secondary VIPs it
/// keeps; then the secondary VIPs it no longer has go. So the rule is
/// never unreachable on its primary VIP, and its VIP list only names VIPs
/// that are served. `inst.secondary` and `inst.rule_vips` follow the
/// entries as they are written; `reachable` is set once any of those
/// (entries only the rule's record can clean up) is written.
fn install(
    t: &mut dyn RuleTable,
    sel: &mut SelSpace,
    inst: &mut Installed,
    bank: u8,
    w: Want,
    reachable: &mut bool,
) -> Result<()> {
    let rule_id = inst.rule_id;
    let mut w = w;
    for e in w.eps.iter_mut() {
        e.rule_id = rule_id;
    }
    // Endpoints.
    for (i, e) in w.eps.iter().enumerate() {
        t.put_endpoint(EpKey::new(rule_id, bank, i as u32), *e)?;
    }
    for idx in w.eps.len() as u32..inst.bank_len[bank as usize] {
        t.delete_endpoint(EpKey::new(rule_id, bank, idx))?;
    }
    inst.bank_len[bank as usize] = w.eps.len() as u32;
    // Selection table: the bank's run of chunks, placed anew when its
    // length changes.
    let table = table_for(w.sel, &w.eps);
    let n_chunks = table.len().div_ceil(SEL_CHUNK as usize) as u32;
    let b = bank as usize;
    if n_chunks != inst.chunks[b] {
        let (old_base, old_n) = (inst.sel_base[b], inst.chunks[b]);
        inst.chunks[b] = 0;
        free_run(t, sel, old_base, old_n)?;
        inst.sel_base[b] = sel.alloc(n_chunks)?;
        inst.chunks[b] = n_chunks;
    }
    let base = inst.sel_base[b];
    for (c, part) in table.chunks(SEL_CHUNK as usize).enumerate() {
        // The table holds positions in the bank; the datapath reads the
        // endpoint's slot.
        let mut chunk = SelChunk::default();
        for (slot, i) in chunk.ep.iter_mut().zip(part) {
            *slot = w.eps[*i as usize].stat_idx;
        }
        t.put_sel_chunk(base + c as u32, chunk)?;
    }
    // Source ranges: add new ones before the flip, drop old ones after.
    for net in w.src_ranges.difference(&inst.src_ranges) {
        t.put_src_range(rule_id, *net)?;
    }
    let flags = if w.src_ranges.is_empty() {
        0
    } else {
        svc_flags::SRC_RANGES
    };
    let val = SvcVal {
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
        sel_base: base,
    };
    let (kept, added): (Vec<Addr>, Vec<Addr>) =
        w.secondary.iter().partition(|a| inst.secondary.contains(a));
    for a in added {
        t.put_service(secondary_key(&inst.key, a), val)?;
        *reachable = true;
        inst.secondary.push(a);
    }
    if w.rule_vips != inst.rule_vips {
        if w.rule_vips.is_empty() {
            t.delete_rule_vips(rule_id)?;
        } else {
            t.put_rule_vips(rule_id, rule_vips_val(&w.rule_vips))?;
            *reachable = true;
        }
        inst.rule_vips = w.rule_vips.clone();
    }
    t.put_service(inst.key, val)?;
    *reachable = true;
    for a in kept {
        t.put_service(secondary_key(&inst.key, a), val)?;
    }
    while let Some(a) = inst
        .secondary
        .iter()
        .find(|a| !w.secondary.contains(a))
        .copied()
    {
        t.delete_service(secondary_key(&inst.key, a))?;
        inst.secondary.retain(|x| *x != a);
    }
    // The same VIPs now: take the rule's order.
    inst.secondary = w.secondary;
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
        /// `LB_EP_SLOTS`: the endpoint in each slot.
        pub slots: HashMap<u32, EpVal>,
        pub filter: HashMap<u32, u64>,
        /// `LB_SEL_TABLE`: the chunks written (cleared ones removed).
        pub chunks: HashMap<u32, SelChunk>,
        pub ranges: std::collections::HashSet<(u32, IpNet)>,
        pub flushed: Vec<u32>,
        pub ep_resets: Vec<u32>,
        pub vips: std::collections::BTreeSet<Addr>,
        pub rule_vips: HashMap<u32, RuleVips>,
        /// `LB_EP_INDEX`: the non-empty slots.
        pub ep_index: BTreeMap<u32, EpIndex>,
        pub writes: usize,
        /// Service and VIP-list writes, in order ("put 20.0.0.1:80/tcp",
        /// "del ...", "vips 3" / "novips 3" for rule 3's list).
        pub log: Vec<String>,
    }

    fn show_key(k: &SvcKey) -> String {
        SvcKeyOrd::from(*k).to_string()
    }

    impl RuleTable for MemTable {
        fn put_service(&mut self, key: SvcKey, val: SvcVal) -> Result<()> {
            self.writes += 1;
            self.log.push(format!("put {}", show_key(&key)));
            self.svcs.insert(key, val);
            Ok(())
        }
        fn delete_service(&mut self, key: SvcKey) -> Result<()> {
            self.writes += 1;
            self.log.push(format!("del {}", show_key(&key)));
            self.svcs.remove(&key);
            Ok(())
        }
        fn put_endpoint(&mut self, key: EpKey, val: EpVal) -> Result<()> {
            self.writes += 1;
            self.eps.insert(key, val);
            self.slots.insert(val.stat_idx, val);
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
        fn put_sel_chunk(&mut self, index: u32, val: SelChunk) -> Result<()> {
            self.writes += 1;
            self.chunks.insert(index, val);
            Ok(())
        }
        fn delete_sel_chunk(&mut self, index: u32) -> Result<()> {
            self.writes += 1;
            self.chunks.remove(&index);
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
        fn put_rule_vips(&mut self, rule_id: u32, vips: RuleVips) -> Result<()> {
            self.writes += 1;
            self.log.push(format!("vips {rule_id}"));
            self.rule_vips.insert(rule_id, vips);
            Ok(())
        }
        fn delete_rule_vips(&mut self, rule_id: u32) -> Result<()> {
            self.writes += 1;
            self.log.push(format!("novips {rule_id}"));
            self.rule_vips.remove(&rule_id);
            Ok(())
        }
        fn reset_ep_stats(&mut self, idx: u32) -> Result<()> {
            self.ep_resets.push(idx);
            Ok(())
        }
        fn retire_ep_slot(&mut self, idx: u32) -> Result<()> {
            self.slots.insert(idx, RETIRED_EP);
            Ok(())
        }
        fn flush_sessions(&mut self, rule_id: u32) -> Result<usize> {
            self.flushed.push(rule_id);
            Ok(3)
        }
        fn put_ep_index(&mut self, slot: u32, e: EpIndex) -> Result<()> {
            self.writes += 1;
            if e.proto == 0 {
                self.ep_index.remove(&slot);
            } else {
                self.ep_index.insert(slot, e);
            }
            Ok(())
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
    fn selection_entries_are_endpoint_slots_and_departed_endpoints_retire_theirs() {
        let mut t = MemTable::default();
        let mut r = Rules::adopt(vec![]);
        r.apply(&rules(TWO), &mut t).unwrap();
        let b = svc_key("20.0.0.1".parse().unwrap(), 53, Protocol::Udp);
        let a = svc_key("20.0.0.1".parse().unwrap(), 80, Protocol::Tcp);
        let slots_of = |t: &MemTable, k: SvcKey| -> Vec<u32> {
            let s = t.svcs[&k];
            let c = t.chunks[&s.sel_base];
            let mut v = c.ep[..s.table_len as usize].to_vec();
            v.sort_unstable();
            v.dedup();
            v
        };
        // Every entry of each table is the slot of one of the rule's own
        // endpoints, and that slot holds the endpoint, tagged with the rule
        // (not its position in the bank).
        for k in [a, b] {
            let eps = active_eps(&t, k);
            let want: BTreeSet<u32> = eps.iter().map(|e| e.stat_idx).collect();
            assert_eq!(slots_of(&t, k), want.iter().copied().collect::<Vec<_>>());
            for e in &eps {
                assert_eq!(t.slots[&e.stat_idx], *e);
                assert_eq!(e.rule_id, t.svcs[&k].rule_id);
            }
        }
        let b_slot = active_eps(&t, b)[0].stat_idx;
        let moved = [a, b]
            .iter()
            .flat_map(|k| active_eps(&t, *k).into_iter().enumerate())
            .any(|(pos, e)| e.stat_idx != pos as u32);
        assert!(
            moved,
            "two rules' endpoints cannot all have slot = position"
        );
        // An endpoint leaving its rule empties its slot; the one staying
        // keeps its slot and its entry.
        let one = "rules:
  - {name: a, vip: 20.0.0.1, port: 80, protocol: tcp, endpoints: [{ip: 10.0.0.2, port: 8080}]}
  - {name: b, vip: 20.0.0.1, port: 53, protocol: udp, endpoints: [{ip: 10.0.0.3, port: 53}]}
";
        let before = active_eps(&t, a);
        r.apply(&rules(one), &mut t).unwrap();
        let (gone, kept) = (before[0], before[1]);
        assert_eq!(active_eps(&t, a)[0].stat_idx, kept.stat_idx);
        assert_eq!(slots_of(&t, a), vec![kept.stat_idx]);
        assert_eq!(t.slots[&kept.stat_idx].addr, kept.addr);
        let empty = t.slots[&gone.stat_idx];
        assert_eq!(empty.addr, [0; 4]);
        assert_ne!(empty.flags & loxilb_common::ep_flags::INACTIVE, 0);
        // Liveness changes reach the slot too.
        r.set_endpoint_state(&mut t, "a", "10.0.0.2".parse().unwrap(), 8080, false)
            .unwrap();
        assert_ne!(
            t.slots[&kept.stat_idx].flags & loxilb_common::ep_flags::INACTIVE,
            0
        );
        // A removed rule's slots are emptied as well.
        r.apply(&rules("rules: []\n"), &mut t).unwrap();
        assert_eq!(t.slots[&b_slot].addr, [0; 4]);
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
        let c = t.chunks[&s.sel_base];
        let first = t.eps[&EpKey::new(s.rule_id, s.ep_bank, 0)];
        assert_eq!(
            c.ep[..4].iter().filter(|e| **e == first.stat_idx).count(),
            3
        );
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
        assert_eq!(s2.table_len, crate::selection::maglev_size(2));
        assert_ne!(s2.ep_bank, s.ep_bank);
        let want_chunks = s2.table_len.div_ceil(SEL_CHUNK);
        let run = |t: &MemTable, s: &SvcVal| {
            (s.sel_base..s.sel_base + s.table_len.div_ceil(SEL_CHUNK))
                .filter(|c| t.chunks.contains_key(c))
                .count() as u32
        };
        assert_eq!(run(&t, &s2), want_chunks);
        assert_eq!(
            t.chunks.len() as u32,
            want_chunks + 1,
            "the idle bank keeps its one-chunk table"
        );
        assert_eq!(t.ranges.len(), 1);
        assert!(t
            .ranges
            .contains(&(s.rule_id, "192.168.0.0/16".parse().unwrap())));

        // Back to rr without ranges: the old bank's run is reused in place.
        let plain = rr.replace("source_ranges: [10.0.0.0/8], ", "");
        r.apply(&rules(&plain), &mut t).unwrap();
        let s3 = t.svcs[&k];
        assert_eq!(s3.flags & svc_flags::SRC_RANGES, 0);
        assert!(t.ranges.is_empty());
        assert_eq!((s3.ep_bank, s3.sel_base), (s.ep_bank, s.sel_base));
        assert_eq!(run(&t, &s3), 1);
        // Another rr table: the bank that held the Maglev table gets a run
        // of the new length, and the Maglev table's chunks are cleared.
        let three = plain.replace("weight: 3}", "weight: 2}");
        r.apply(&rules(&three), &mut t).unwrap();
        let s4 = t.svcs[&k];
        assert_eq!(s4.ep_bank, s2.ep_bank);
        assert_eq!(s4.table_len, 3);
        assert_eq!(run(&t, &s4), 1);
        assert_eq!(t.chunks.len(), 2, "stale Maglev chunks left");

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
        r2.adopt_ep_index(t.ep_index.iter().map(|(s, e)| (*s, *e)).collect());
        assert_eq!(t.ep_index.len(), 3, "every endpoint indexed");
        let writes = t.writes;
        let rep = r2.apply(&rules(TWO), &mut t).unwrap();
        assert_eq!(rep.unchanged, 2);
        assert_eq!(t.writes, writes);
    }

    const MH: &str = "rules:
  - {name: s, vip: 20.0.0.7, secondary_vips: [30.0.0.1, 30.0.0.2], port: 9, protocol: sctp, endpoints: [{ip: 10.0.0.1, port: 9}, {ip: 10.0.0.2, port: 9}]}
  - {name: one, vip: 20.0.0.8, port: 9, protocol: sctp, endpoints: [{ip: 10.0.0.3, port: 9}]}
  - {name: t, vip: 20.0.0.7, port: 80, protocol: tcp, endpoints: [{ip: 10.0.0.1, port: 80}]}
";

    fn a(s: &str) -> Addr {
        addr_from_ip(s.parse().unwrap())
    }

    fn k(ip: &str, port: u16, p: Protocol) -> SvcKey {
        svc_key(ip.parse().unwrap(), port, p)
    }

    fn bit_set(t: &MemTable, x: Addr) -> bool {
        let (w, b) = filter_bit(&x);
        t.filter.get(&w).copied().unwrap_or(0) & (1 << b) != 0
    }

    fn position(log: &[String], what: &str) -> usize {
        log.iter()
            .position(|l| l == what)
            .unwrap_or_else(|| panic!("{what:?} not in {log:?}"))
    }

    #[test]
    fn a_multihomed_rule_has_an_entry_per_vip_and_a_vip_list() {
        let mut t = MemTable::default();
        let mut r = Rules::adopt(vec![]);
        let rep = r.apply(&rules(MH), &mut t).unwrap();
        assert_eq!(rep.added.len(), 3);
        assert_eq!(r.len(), 3, "three rules, five service entries");
        assert_eq!(t.svcs.len(), 5);
        let p = k("20.0.0.7", 9, Protocol::Sctp);
        let primary = t.svcs[&p];
        for s in ["30.0.0.1", "30.0.0.2"] {
            assert_eq!(t.svcs[&k(s, 9, Protocol::Sctp)], primary, "{s}");
            assert!(t.vips.contains(&a(s)) && bit_set(&t, a(s)), "{s}");
        }
        assert_eq!(active_eps(&t, k("30.0.0.2", 9, Protocol::Sctp)).len(), 2);
        assert_eq!(
            t.rule_vips[&primary.rule_id],
            rule_vips_val(&[a("20.0.0.7"), a("30.0.0.1"), a("30.0.0.2")])
        );
        assert_eq!(t.rule_vips[&primary.rule_id].n, 3);
        // A single-homed SCTP rule lists its one VIP; TCP rules none.
        let one = t.svcs[&k("20.0.0.8", 9, Protocol::Sctp)].rule_id;
        assert_eq!(t.rule_vips[&one], rule_vips_val(&[a("20.0.0.8")]));
        let tcp = t.svcs[&k("20.0.0.7", 80, Protocol::Tcp)].rule_id;
        assert!(!t.rule_vips.contains_key(&tcp));
        assert_eq!(t.rule_vips.len(), 2);
        assert_eq!(t.vips.len(), 4);
        // The rule is one rule: one installed record with its secondaries.
        let inst = r.get(&p).unwrap();
        assert_eq!(inst.secondary, vec![a("30.0.0.1"), a("30.0.0.2")]);
        assert!(r.get(&k("30.0.0.1", 9, Protocol::Sctp)).is_none());
        // Writes: the entries of the new VIPs, the list, then the primary.
        let log = &t.log;
        assert!(position(log, "put 30.0.0.2:9/sctp") < position(log, "put 20.0.0.7:9/sctp"));
        assert!(
            position(log, &format!("vips {}", primary.rule_id))
                < position(log, "put 20.0.0.7:9/sctp")
        );
        // Re-applying writes nothing.
        let writes = t.writes;
        let rep = r.apply(&rules(MH), &mut t).unwrap();
        assert_eq!((rep.unchanged, t.writes), (3, writes));
        // Liveness: one write, shared by every VIP (same bank).
        r.set_endpoint_state(&mut t, "s", "10.0.0.2".parse().unwrap(), 9, false)
            .unwrap();
        assert_eq!(
            active_eps(&t, k("30.0.0.1", 9, Protocol::Sctp))[1].flags,
            loxilb_common::ep_flags::INACTIVE
        );
    }

    #[test]
    fn changing_secondary_vips_adds_then_flips_then_deletes() {
        let mut t = MemTable::default();
        let mut r = Rules::adopt(vec![]);
        r.apply(&rules(MH), &mut t).unwrap();
        let p = k("20.0.0.7", 9, Protocol::Sctp);
        let before = t.svcs[&p];
        t.log.clear();
        let changed = MH.replace("[30.0.0.1, 30.0.0.2]", "[30.0.0.2, 30.0.0.3]");
        // The same change incrementally, on a copy.
        let mut ti = MemTable::default();
        let mut ri = Rules::adopt(vec![]);
        ri.apply(&rules(MH), &mut ti).unwrap();
        let rep = r.apply(&rules(&changed), &mut t).unwrap();
        assert_eq!((rep.updated, rep.unchanged), (vec!["s".to_string()], 2));
        assert!(t.flushed.is_empty(), "sessions stay");
        let s: Vec<Rule> = rules(&changed).into_iter().take(1).collect();
        ri.apply_changes(&s, &[], &mut ti, &|_, _, _| false)
            .unwrap();
        assert_same_maps(&t, &ti, 0);
        assert_eq!(
            r.installed().collect::<Vec<_>>(),
            ri.installed().collect::<Vec<_>>()
        );
        let after = t.svcs[&p];
        assert_eq!(after.rule_id, before.rule_id);
        assert_ne!(after.ep_bank, before.ep_bank);
        for s in ["30.0.0.2", "30.0.0.3"] {
            assert_eq!(t.svcs[&k(s, 9, Protocol::Sctp)], after, "{s}");
        }
        assert!(!t.svcs.contains_key(&k("30.0.0.1", 9, Protocol::Sctp)));
        assert!(!t.vips.contains(&a("30.0.0.1")) && !bit_set(&t, a("30.0.0.1")));
        assert!(t.vips.contains(&a("30.0.0.3")) && bit_set(&t, a("30.0.0.3")));
        assert_eq!(
            t.rule_vips[&after.rule_id],
            rule_vips_val(&[a("20.0.0.7"), a("30.0.0.2"), a("30.0.0.3")])
        );
        // New VIP's entry, the list, the flip, the kept VIP, the gone one.
        let log = &t.log;
        let order = [
            "put 30.0.0.3:9/sctp".to_string(),
            format!("vips {}", after.rule_id),
            "put 20.0.0.7:9/sctp".to_string(),
            "put 30.0.0.2:9/sctp".to_string(),
            "del 30.0.0.1:9/sctp".to_string(),
        ];
        let at: Vec<usize> = order.iter().map(|o| position(log, o)).collect();
        assert!(at.windows(2).all(|w| w[0] < w[1]), "{log:?}");
        assert_filter_and_vips_exact(&r, &t, 0);
        // No secondaries left: one entry, a one-VIP list.
        let single = MH.replace("secondary_vips: [30.0.0.1, 30.0.0.2], ", "");
        r.apply(&rules(&single), &mut t).unwrap();
        assert_eq!(t.svcs.len(), 3);
        assert_eq!(t.rule_vips[&after.rule_id], rule_vips_val(&[a("20.0.0.7")]));
        assert_filter_and_vips_exact(&r, &t, 1);
        // And back.
        r.apply(&rules(MH), &mut t).unwrap();
        assert_eq!(t.svcs.len(), 5);
        assert_filter_and_vips_exact(&r, &t, 2);
    }

    #[test]
    fn removing_a_multihomed_rule_removes_every_entry() {
        let mut t = MemTable::default();
        let mut r = Rules::adopt(vec![]);
        r.apply(&rules(MH), &mut t).unwrap();
        t.log.clear();
        let rep = r
            .apply_changes(
                &[],
                &[k("20.0.0.7", 9, Protocol::Sctp)],
                &mut t,
                &|_, _, _| false,
            )
            .unwrap();
        assert_eq!(rep.removed, vec!["s"]);
        assert_eq!(t.svcs.len(), 2);
        assert!(!t.vips.contains(&a("30.0.0.1")) && !t.vips.contains(&a("30.0.0.2")));
        assert!(t.vips.contains(&a("20.0.0.7")), "still the TCP rule's VIP");
        assert_eq!(t.rule_vips.len(), 1);
        // The secondary entries go before the primary one.
        assert!(position(&t.log, "del 30.0.0.1:9/sctp") < position(&t.log, "del 20.0.0.7:9/sctp"));
        r.apply(&[], &mut t).unwrap();
        assert!(t.svcs.is_empty() && t.rule_vips.is_empty() && t.vips.is_empty());
        assert!(t.eps.is_empty() && t.chunks.is_empty());
        assert!(t.filter.values().all(|w| *w == 0));
    }

    /// What `Datapath::read_installed` rebuilds from the maps: service
    /// entries grouped by rule id, the VIP lists.
    fn read_back(r: &Rules, t: &MemTable) -> Vec<Installed> {
        let mut by_rule: BTreeMap<u32, Vec<(SvcKey, SvcVal)>> = BTreeMap::new();
        for (k, v) in &t.svcs {
            by_rule.entry(v.rule_id).or_default().push((*k, *v));
        }
        by_rule
            .into_iter()
            .map(|(id, mut entries)| {
                let listed: Vec<Addr> = t
                    .rule_vips
                    .get(&id)
                    .map(|v| v.vips[..v.n as usize].to_vec())
                    .unwrap_or_default();
                let (key, _, secondary, consistent) =
                    crate::datapath::primary_and_secondaries(&mut entries, &listed);
                // The rest as the reconciler knows it (read_installed reads
                // it from the maps the same way as before).
                let mut i = r
                    .installed()
                    .find(|i| i.rule_id == id)
                    .cloned()
                    .expect("a rule of the maps");
                assert_eq!(i.key, key, "rule {id}: primary");
                i.secondary = secondary;
                i.rule_vips = if consistent { listed } else { vec![] };
                i
            })
            .collect()
    }

    #[test]
    fn adopting_multihomed_rules_neither_loses_nor_duplicates_them() {
        let mut t = MemTable::default();
        let mut r = Rules::adopt(vec![]);
        r.apply(&rules(MH), &mut t).unwrap();
        let snapshot = read_back(&r, &t);
        assert_eq!(snapshot.len(), 3, "one record per rule, not per entry");
        assert_eq!(
            snapshot,
            r.installed().cloned().collect::<Vec<_>>(),
            "rebuilt as installed"
        );
        let mut r2 = Rules::adopt(snapshot);
        r2.adopt_ep_index(t.ep_index.iter().map(|(s, e)| (*s, *e)).collect());
        let writes = t.writes;
        assert_eq!(r2.apply(&rules(MH), &mut t).unwrap().unchanged, 3);
        assert_eq!(t.writes, writes, "adopted rules are not rewritten");
        assert_filter_and_vips_exact(&r2, &t, 0);
        // Changes after adoption leave no stale entry.
        let changed = MH.replace("[30.0.0.1, 30.0.0.2]", "[30.0.0.3]");
        r2.apply(&rules(&changed), &mut t).unwrap();
        assert_eq!(t.svcs.len(), 4);
        assert!(!t.svcs.contains_key(&k("30.0.0.1", 9, Protocol::Sctp)));
        assert_filter_and_vips_exact(&r2, &t, 1);

        // An interrupted change left an entry the VIP list does not name
        // and one with an old value: adopted, then put right.
        let p = k("20.0.0.7", 9, Protocol::Sctp);
        let mut stale = t.svcs[&p];
        stale.ep_bank ^= 1;
        t.svcs.insert(k("30.0.0.9", 9, Protocol::Sctp), stale);
        let snapshot = read_back(&r2, &t);
        let s = snapshot.iter().find(|i| i.key == p).unwrap();
        assert_eq!(s.secondary, vec![a("30.0.0.3"), a("30.0.0.9")]);
        assert!(s.rule_vips.is_empty(), "disagreeing entries are rewritten");
        let mut r3 = Rules::adopt(snapshot);
        assert_eq!(
            r3.apply(&rules(&changed), &mut t).unwrap().updated,
            vec!["s"]
        );
        assert!(!t.svcs.contains_key(&k("30.0.0.9", 9, Protocol::Sctp)));
        assert_eq!(t.svcs[&k("30.0.0.3", 9, Protocol::Sctp)], t.svcs[&p]);
        assert_eq!(t.svcs.len(), 4);
        assert_filter_and_vips_exact(&r3, &t, 2);
    }

    #[test]
    fn a_secondary_vip_passes_between_rules_in_one_change() {
        let two = |a_sec: &str, with_b: bool| {
            let mut s = format!(
                "rules:\n  - {{name: a, vip: 20.0.0.1, secondary_vips: [{a_sec}], port: 9, protocol: sctp, endpoints: [{{ip: 10.0.0.1, port: 9}}]}}\n"
            );
            if with_b {
                s += "  - {name: b, vip: 30.0.0.1, port: 9, protocol: sctp, endpoints: [{ip: 10.0.0.2, port: 9}]}\n";
            }
            rules(&s)
        };
        let b_key = k("30.0.0.1", 9, Protocol::Sctp);
        // a's secondary VIP 30.0.0.1 becomes b's VIP: full and incremental.
        let (mut tf, mut ti) = (MemTable::default(), MemTable::default());
        let (mut rf, mut ri) = (Rules::adopt(vec![]), Rules::adopt(vec![]));
        rf.apply(&two("30.0.0.1, 30.0.0.2", false), &mut tf)
            .unwrap();
        ri.apply(&two("30.0.0.1, 30.0.0.2", false), &mut ti)
            .unwrap();
        let next = two("30.0.0.2", true);
        rf.apply(&next, &mut tf).unwrap();
        ri.apply_changes(&next, &[], &mut ti, &|_, _, _| false)
            .unwrap();
        for (r, t) in [(&rf, &tf), (&ri, &ti)] {
            let b = r.get(&b_key).unwrap();
            assert_eq!(t.svcs[&b_key].rule_id, b.rule_id);
            assert_eq!(active_eps(t, b_key)[0].addr, a("10.0.0.2"));
            let ai = r.get(&k("20.0.0.1", 9, Protocol::Sctp)).unwrap();
            assert_eq!(ai.secondary, vec![a("30.0.0.2")]);
            assert_eq!(
                t.rule_vips[&ai.rule_id],
                rule_vips_val(&[a("20.0.0.1"), a("30.0.0.2")])
            );
            assert_eq!(t.svcs.len(), 3);
            assert_filter_and_vips_exact(r, t, 0);
        }
        assert_same_maps(&tf, &ti, 0);
        // And back: b goes, a takes its VIP again.
        let back = two("30.0.0.1, 30.0.0.2", false);
        rf.apply(&back, &mut tf).unwrap();
        ri.apply_changes(&back, &[b_key], &mut ti, &|_, _, _| false)
            .unwrap();
        assert_same_maps(&tf, &ti, 1);
        for (r, t) in [(&rf, &tf), (&ri, &ti)] {
            let ai = r.get(&k("20.0.0.1", 9, Protocol::Sctp)).unwrap();
            assert_eq!(t.svcs[&b_key].rule_id, ai.rule_id);
            assert!(r.get(&b_key).is_none());
            assert_filter_and_vips_exact(r, t, 1);
        }
    }

    #[test]
    fn a_vip_of_two_rules_is_refused_before_any_write() {
        let mut t = MemTable::default();
        let mut r = Rules::adopt(vec![]);
        r.apply(&rules(MH), &mut t).unwrap();
        let writes = t.writes;
        // A new rule taking the secondary VIP of s, which stays.
        let c = rules("rules:\n  - {name: c, vip: 30.0.0.2, port: 9, protocol: sctp}\n");
        let e = r
            .apply_changes(&c, &[], &mut t, &|_, _, _| false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("30.0.0.2:9/sctp is a VIP of both rule \"s\" and rule \"c\""),
            "{e}"
        );
        // A new rule whose secondary VIP is another rule's VIP.
        let d = rules("rules:\n  - {name: d, vip: 20.0.0.9, secondary_vips: [20.0.0.8], port: 9, protocol: sctp}\n");
        let e = r
            .apply_changes(&d, &[], &mut t, &|_, _, _| false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("rule \"one\" and rule \"d\""), "{e}");
        // Two rules of one change claiming one VIP.
        let mut both = rules("rules:\n  - {name: e, vip: 20.0.0.10, secondary_vips: [30.0.0.5], port: 9, protocol: sctp}\n");
        both.extend(rules("rules:\n  - {name: f, vip: 20.0.0.11, secondary_vips: [30.0.0.5], port: 9, protocol: sctp}\n"));
        let e = r
            .apply_changes(&both, &[], &mut t, &|_, _, _| false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("30.0.0.5:9/sctp") && e.contains("\"e\"") && e.contains("\"f\""),
            "{e}"
        );
        assert_eq!(t.writes, writes, "nothing written");
        assert_eq!(r.len(), 3);
    }

    /// A small deterministic generator (xorshift64*) for the randomised
    /// tests: the same seed gives the same sequence on every run.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
        fn chance(&mut self, one_in: u64) -> bool {
            self.below(one_in) == 0
        }
    }

    /// Random rules of Service `s`: 0 to 2 of them (0: the Service is
    /// gone), IPv4 or IPv6 (some NAT64), VIPs shared between Services,
    /// endpoint addresses shared between rules and sometimes equal to a
    /// VIP, every mode and selection, sometimes source ranges.
    fn random_rules(rng: &mut Rng, s: u16) -> Vec<Rule> {
        let n = rng.below(3) as u16;
        (0..n)
            .map(|j| {
                let v6 = rng.chance(3);
                let vip: IpAddr = if v6 {
                    format!("2001:db8::{}", 1 + rng.below(3)).parse().unwrap()
                } else {
                    format!("20.0.0.{}", 1 + rng.below(3)).parse().unwrap()
                };
                let nat64 = v6 && rng.chance(3);
                let mut endpoints: Vec<Endpoint> = vec![];
                for _ in 0..rng.below(6) {
                    let ip: IpAddr = if rng.chance(8) {
                        vip
                    } else if v6 && !nat64 {
                        format!("2001:db8:1::{}", 1 + rng.below(8)).parse().unwrap()
                    } else {
                        format!("10.0.0.{}", 1 + rng.below(8)).parse().unwrap()
                    };
                    let port = [80, 8080, 9090][rng.below(3) as usize];
                    if endpoints.iter().any(|e| e.ip == ip && e.port == port) {
                        continue;
                    }
                    endpoints.push(Endpoint {
                        ip,
                        port,
                        weight: 1 + rng.below(3) as u16,
                    });
                }
                let source_ranges = match rng.below(4) {
                    0 if v6 => vec!["2001:db8:77::/48".parse().unwrap()],
                    0 => vec!["192.168.0.0/16".parse().unwrap()],
                    1 if !v6 => vec!["10.0.0.0/8".parse().unwrap()],
                    _ => vec![],
                };
                // SCTP, half of it multihomed: 1 to 3 secondary VIPs from
                // a pool that holds the other rules' VIPs too.
                let sctp = !nat64 && rng.chance(4);
                let mut secondary_vips: Vec<IpAddr> = vec![];
                if sctp && rng.chance(2) {
                    for _ in 0..1 + rng.below(3) {
                        let i = 1 + rng.below(5);
                        let a: IpAddr = match (v6, i) {
                            (true, 1..=3) => format!("2001:db8::{i}"),
                            (true, _) => format!("2001:db8:2::{i}"),
                            (false, 1..=3) => format!("20.0.0.{i}"),
                            (false, _) => format!("30.0.0.{i}"),
                        }
                        .parse()
                        .unwrap();
                        if a != vip && !secondary_vips.contains(&a) {
                            secondary_vips.push(a);
                        }
                    }
                }
                Rule {
                    name: format!("svc-{s}-{j}-{}", rng.below(2)),
                    vip,
                    port: 1000 + s * 2 + j,
                    protocol: if sctp {
                        Protocol::Sctp
                    } else if rng.chance(2) {
                        Protocol::Tcp
                    } else {
                        Protocol::Udp
                    },
                    mode: if secondary_vips.is_empty() {
                        [Mode::Default, Mode::OneArm, Mode::FullNat][rng.below(3) as usize]
                    } else {
                        Mode::Default
                    },
                    secondary_vips,
                    selection: if rng.chance(25) {
                        Selection::Hash
                    } else {
                        [
                            Selection::RoundRobin,
                            Selection::Persist,
                            Selection::LeastConn,
                        ][rng.below(3) as usize]
                    },
                    timeout_s: [60, 1800][rng.below(2) as usize],
                    persist_timeout_s: loxilb_model::DEFAULT_PERSIST_TIMEOUT_S,
                    source_ranges,
                    endpoints,
                    probe: None,
                    announce_local_only: false,
                }
            })
            .collect()
    }

    /// Everything the maps hold, to compare two tables.
    fn assert_same_maps(a: &MemTable, b: &MemTable, step: usize) {
        assert_eq!(a.svcs, b.svcs, "step {step}: services differ");
        assert_eq!(a.eps, b.eps, "step {step}: endpoints differ");
        assert_eq!(a.chunks, b.chunks, "step {step}: selection tables differ");
        assert_eq!(a.ranges, b.ranges, "step {step}: source ranges differ");
        assert_eq!(a.vips, b.vips, "step {step}: VIPs differ");
        assert_eq!(
            a.rule_vips, b.rule_vips,
            "step {step}: rule VIP lists differ"
        );
        assert_eq!(a.flushed, b.flushed, "step {step}: flushed rules differ");
        assert_eq!(
            a.ep_resets, b.ep_resets,
            "step {step}: counter resets differ"
        );
        let words = |t: &MemTable| -> Vec<u64> {
            (0..ADDR_FILTER_WORDS)
                .map(|w| t.filter.get(&w).copied().unwrap_or(0))
                .collect()
        };
        assert_eq!(words(a), words(b), "step {step}: address filters differ");
    }

    /// The filter in the maps is exactly the one computed from scratch,
    /// and the VIPs are exactly the installed rules' VIPs.
    fn assert_filter_and_vips_exact(r: &Rules, t: &MemTable, step: usize) {
        let f = r.compute_filter();
        for (w, word) in f.iter().enumerate() {
            assert_eq!(
                t.filter.get(&(w as u32)).copied().unwrap_or(0),
                *word,
                "step {step}: filter word {w}"
            );
        }
        let vips: BTreeSet<Addr> = r
            .installed()
            .flat_map(|i| std::iter::once(i.key.addr).chain(i.secondary.iter().copied()))
            .collect();
        assert_eq!(t.vips, vips, "step {step}: VIP set");
    }

    /// Every VIP of `i` has its service entry, all with the primary's
    /// value, and an SCTP rule's VIP list names them, primary first.
    fn assert_multihomed_entries(t: &MemTable, i: &Installed, step: usize) {
        let primary = t.svcs[&i.key];
        assert_eq!(primary.rule_id, i.rule_id, "step {step}");
        for a in &i.secondary {
            assert_eq!(
                t.svcs.get(&secondary_key(&i.key, *a)),
                Some(&primary),
                "step {step}: secondary VIP entry of {}",
                i.name
            );
        }
        let want: Vec<Addr> = std::iter::once(i.key.addr)
            .chain(i.secondary.iter().copied())
            .collect();
        if i.key.proto == loxilb_common::IPPROTO_SCTP {
            assert_eq!(
                t.rule_vips.get(&i.rule_id),
                Some(&rule_vips_val(&want)),
                "step {step}: VIP list of {}",
                i.name
            );
        } else {
            assert!(i.secondary.is_empty() && !t.rule_vips.contains_key(&i.rule_id));
        }
    }

    /// Random sequences of per-Service changes, applied both ways: the
    /// whole desired set through `apply_with`, and only the changed
    /// Services' rules through `apply_changes`. The maps must be identical
    /// after every step (rule ids, banks, counter slots, filter, VIPs).
    #[test]
    fn incremental_and_full_apply_leave_identical_maps() {
        let down = |_: &str, ip: IpAddr, port: u16| {
            let last = match ip {
                IpAddr::V4(a) => a.octets()[3],
                IpAddr::V6(a) => a.octets()[15],
            };
            (u16::from(last) + port).is_multiple_of(5)
        };
        let mut multihomed = 0;
        for seed in 1..=12u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let mut services: BTreeMap<u16, Vec<Rule>> = BTreeMap::new();
            let (mut full, mut inc) = (Rules::adopt(vec![]), Rules::adopt(vec![]));
            let (mut tf, mut ti) = (MemTable::default(), MemTable::default());
            for step in 0..60 {
                let mut upserts = vec![];
                let mut removed = vec![];
                for _ in 0..1 + rng.below(3) {
                    let s = rng.below(14) as u16;
                    let new = random_rules(&mut rng, s);
                    let old = services.remove(&s).unwrap_or_default();
                    removed.extend(old.iter().map(|r| svc_key(r.vip, r.port, r.protocol)));
                    upserts.retain(|r: &Rule| !old.contains(r));
                    upserts.extend(new.iter().cloned());
                    if !new.is_empty() {
                        services.insert(s, new);
                    }
                }
                let desired: Vec<Rule> = services.values().flatten().cloned().collect();
                let rf = full.apply_with(&desired, &mut tf, &down).unwrap();
                let ri = inc
                    .apply_changes(&upserts, &removed, &mut ti, &down)
                    .unwrap();
                assert_same_maps(&tf, &ti, step);
                assert_filter_and_vips_exact(&inc, &ti, step);
                for i in inc.installed() {
                    assert_multihomed_entries(&ti, i, step);
                    multihomed += usize::from(!i.secondary.is_empty());
                }
                assert_eq!(
                    ti.svcs.len(),
                    inc.installed()
                        .map(|i| 1 + i.secondary.len())
                        .sum::<usize>(),
                    "step {step}: a service entry of no rule"
                );
                assert_eq!(rf.added, ri.added, "step {step}");
                assert_eq!(rf.updated, ri.updated, "step {step}");
                assert_eq!(rf.removed, ri.removed, "step {step}");
                assert_eq!(
                    full.installed().collect::<Vec<_>>(),
                    inc.installed().collect::<Vec<_>>(),
                    "step {step}"
                );
            }
            // No session is left: the endpoints that left their rules stop
            // lingering in the filter after the walks that see none.
            for _ in 0..crate::ep_index::CLEAN_WALKS {
                full.drain_filter(&[], &mut tf).unwrap();
                inc.drain_filter(&[], &mut ti).unwrap();
            }
            assert_eq!(full.lingering().count(), 0);
            assert_eq!(inc.lingering().count(), 0);
            assert_same_maps(&tf, &ti, 60);
            assert_filter_and_vips_exact(&inc, &ti, 60);
            // An agent restart: both adopt what the maps hold and go on.
            let mut full = Rules::adopt(full.installed().cloned().collect());
            let mut inc = Rules::adopt(inc.installed().cloned().collect());
            for step in 60..80 {
                let s = rng.below(14) as u16;
                let new = random_rules(&mut rng, s);
                let old = services.remove(&s).unwrap_or_default();
                let removed: Vec<SvcKey> = old
                    .iter()
                    .map(|r| svc_key(r.vip, r.port, r.protocol))
                    .collect();
                if !new.is_empty() {
                    services.insert(s, new.clone());
                }
                let desired: Vec<Rule> = services.values().flatten().cloned().collect();
                full.apply_with(&desired, &mut tf, &down).unwrap();
                inc.apply_changes(&new, &removed, &mut ti, &down).unwrap();
                assert_same_maps(&tf, &ti, step);
                assert_filter_and_vips_exact(&inc, &ti, step);
                for i in inc.installed() {
                    assert_multihomed_entries(&ti, i, step);
                }
            }
        }
        assert!(multihomed > 100, "multihomed rules seen {multihomed} times");
    }

    /// An endpoint that leaves its rule stays in the address filter while
    /// a session to it lives (its replies come from it), and goes after
    /// `CLEAN_WALKS` walks of the session table without one; an agent
    /// started on maps with such a session puts it back at its first walk.
    #[test]
    fn an_endpoint_that_left_lingers_in_the_filter_while_its_sessions_live() {
        use loxilb_common::{ct_dir, CtKey, CtVal};
        let mut t = MemTable::default();
        let mut r = Rules::adopt(vec![]);
        r.apply(&rules(TWO), &mut t).unwrap();
        let gone = a("10.0.0.2");
        assert!(bit_set(&t, gone));
        // A two-entry session to 10.0.0.2: forward and reply entries.
        let fwd = (
            CtKey {
                saddr: a("192.168.0.2"),
                daddr: a("20.0.0.1"),
                ..Default::default()
            },
            CtVal {
                xdaddr: gone,
                dir: ct_dir::FORWARD,
                ..Default::default()
            },
        );
        let rep = (
            CtKey {
                saddr: gone,
                daddr: a("192.168.0.2"),
                ..Default::default()
            },
            CtVal {
                dir: ct_dir::REPLY,
                ..Default::default()
            },
        );
        let one_ep = rules(&TWO.replace(", {ip: 10.0.0.2, port: 8080}", ""));
        r.apply(&one_ep, &mut t).unwrap();
        assert!(bit_set(&t, gone), "left its rule, its sessions may live");
        assert_eq!(r.lingering().collect::<Vec<_>>(), vec![&gone]);
        assert_filter_and_vips_exact(&r, &t, 0);
        // Walks that find its session (either entry) keep it.
        for live in [vec![fwd, rep], vec![rep], vec![fwd], vec![fwd]] {
            assert_eq!(r.drain_filter(&live, &mut t).unwrap(), 0);
            assert!(bit_set(&t, gone));
        }
        // One clean walk is not enough (a walk can miss an entry).
        assert_eq!(r.drain_filter(&[], &mut t).unwrap(), 0);
        assert!(bit_set(&t, gone));
        // A session seen again starts the count over.
        r.drain_filter(&[rep], &mut t).unwrap();
        assert_eq!(r.drain_filter(&[], &mut t).unwrap(), 0);
        assert_eq!(r.drain_filter(&[], &mut t).unwrap(), 1);
        assert!(!bit_set(&t, gone), "no session for two walks: out");
        assert_eq!(r.lingering().count(), 0);
        assert_filter_and_vips_exact(&r, &t, 1);
        // The other endpoints and the VIP never left.
        for x in ["20.0.0.1", "10.0.0.1", "10.0.0.3"] {
            assert!(bit_set(&t, a(x)), "{x}");
        }
        // A DSR session's endpoint needs nothing: its replies go straight
        // to the client.
        let dsr = (
            fwd.0,
            CtVal {
                mode: lb_mode::DSR,
                ..fwd.1
            },
        );
        r.drain_filter(&[dsr], &mut t).unwrap();
        assert!(!bit_set(&t, gone));
        // A restarted agent (nothing lingering) whose maps hold a live
        // session to an address no rule has: its first walk keeps it.
        let mut r = Rules::adopt(r.installed().cloned().collect());
        r.drain_filter(&[fwd], &mut t).unwrap();
        assert!(bit_set(&t, gone));
        assert_eq!(r.lingering().collect::<Vec<_>>(), vec![&gone]);
    }

    /// A shared address keeps its filter bit (and a shared VIP its entry)
    /// until the last rule using it goes; adding one rule to many writes
    /// only that rule's entries.
    #[test]
    fn incremental_changes_touch_only_the_changed_rules() {
        let mut t = MemTable::default();
        let mut r = Rules::adopt(vec![]);
        r.apply(&rules(TWO), &mut t).unwrap();
        let ip = |s: &str| -> Addr { addr_from_ip(s.parse().unwrap()) };
        let bit_set = |t: &MemTable, a: Addr| {
            let (w, b) = filter_bit(&a);
            t.filter.get(&w).copied().unwrap_or(0) & (1 << b) != 0
        };
        let extra = rules(
            "rules:\n  - {name: c, vip: 20.0.0.1, port: 443, protocol: tcp, endpoints: [{ip: 10.0.0.1, port: 8443}, {ip: 10.0.0.77, port: 8443}]}\n",
        );
        let writes = t.writes;
        let rep = r
            .apply_changes(&extra, &[], &mut t, &|_, _, _| false)
            .unwrap();
        assert_eq!(rep.added, vec!["c"]);
        assert_eq!(rep.unchanged, 0, "the other rules are not even looked at");
        // service + 2 endpoints + 1 selection chunk + 2 endpoint index slots
        assert_eq!(t.writes - writes, 6);
        assert!(bit_set(&t, ip("10.0.0.77")));
        // Remove rule a (10.0.0.1 and 10.0.0.2): 10.0.0.1 is still used by
        // c, the VIP by b and c.
        let a = svc_key("20.0.0.1".parse().unwrap(), 80, Protocol::Tcp);
        r.apply_changes(&[], &[a], &mut t, &|_, _, _| false)
            .unwrap();
        assert!(bit_set(&t, ip("10.0.0.1")), "still an endpoint of c");
        assert!(t.vips.contains(&ip("20.0.0.1")));
        assert_filter_and_vips_exact(&r, &t, 0);
        // A key not installed is ignored; one also upserted stays.
        let c = svc_key("20.0.0.1".parse().unwrap(), 443, Protocol::Tcp);
        let rep = r
            .apply_changes(&extra, &[a, c], &mut t, &|_, _, _| false)
            .unwrap();
        assert_eq!((rep.unchanged, rep.removed.len()), (1, 0));
        // Everything goes: the VIP and every bit with it.
        let b = svc_key("20.0.0.1".parse().unwrap(), 53, Protocol::Udp);
        r.apply_changes(&[], &[b, c], &mut t, &|_, _, _| false)
            .unwrap();
        assert!(t.svcs.is_empty() && t.eps.is_empty() && t.vips.is_empty());
        assert!(t.filter.values().all(|w| *w == 0));
        assert!(r.is_empty());
    }

    /// A table whose writes fail from the `fail_at`-th on.
    struct Failing {
        inner: MemTable,
        ops: usize,
        fail_at: usize,
    }

    impl Failing {
        fn step(&mut self) -> Result<()> {
            self.ops += 1;
            if self.ops >= self.fail_at {
                bail!("injected map write failure");
            }
            Ok(())
        }
    }

    impl RuleTable for Failing {
        fn put_service(&mut self, key: SvcKey, val: SvcVal) -> Result<()> {
            self.step()?;
            self.inner.put_service(key, val)
        }
        fn delete_service(&mut self, key: SvcKey) -> Result<()> {
            self.step()?;
            self.inner.delete_service(key)
        }
        fn put_endpoint(&mut self, key: EpKey, val: EpVal) -> Result<()> {
            self.step()?;
            self.inner.put_endpoint(key, val)
        }
        fn delete_endpoint(&mut self, key: EpKey) -> Result<()> {
            self.step()?;
            self.inner.delete_endpoint(key)
        }
        fn put_sel_chunk(&mut self, index: u32, val: SelChunk) -> Result<()> {
            self.step()?;
            self.inner.put_sel_chunk(index, val)
        }
        fn delete_sel_chunk(&mut self, index: u32) -> Result<()> {
            self.step()?;
            self.inner.delete_sel_chunk(index)
        }
        fn put_src_range(&mut self, rule_id: u32, net: IpNet) -> Result<()> {
            self.step()?;
            self.inner.put_src_range(rule_id, net)
        }
        fn delete_src_range(&mut self, rule_id: u32, net: IpNet) -> Result<()> {
            self.step()?;
            self.inner.delete_src_range(rule_id, net)
        }
        fn put_filter_word(&mut self, index: u32, word: u64) -> Result<()> {
            self.step()?;
            self.inner.put_filter_word(index, word)
        }
        fn put_vip(&mut self, vip: Addr) -> Result<()> {
            self.step()?;
            self.inner.put_vip(vip)
        }
        fn delete_vip(&mut self, vip: Addr) -> Result<()> {
            self.step()?;
            self.inner.delete_vip(vip)
        }
        fn put_rule_vips(&mut self, rule_id: u32, vips: RuleVips) -> Result<()> {
            self.step()?;
            self.inner.put_rule_vips(rule_id, vips)
        }
        fn delete_rule_vips(&mut self, rule_id: u32) -> Result<()> {
            self.step()?;
            self.inner.delete_rule_vips(rule_id)
        }
        fn reset_rule_stats(&mut self, rule_id: u32) -> Result<()> {
            self.step()?;
            self.inner.reset_rule_stats(rule_id)
        }
        fn reset_ep_stats(&mut self, idx: u32) -> Result<()> {
            self.step()?;
            self.inner.reset_ep_stats(idx)
        }
        fn retire_ep_slot(&mut self, idx: u32) -> Result<()> {
            self.step()?;
            self.inner.retire_ep_slot(idx)
        }
        fn flush_sessions(&mut self, rule_id: u32) -> Result<usize> {
            self.step()?;
            self.inner.flush_sessions(rule_id)
        }
        fn put_ep_index(&mut self, slot: u32, e: EpIndex) -> Result<()> {
            self.step()?;
            self.inner.put_ep_index(slot, e)
        }
    }

    /// A write failing anywhere in an incremental change leaves state that
    /// the next (successful) apply of the same change repairs: the filter
    /// and VIPs are then exactly those of the installed rules, and every
    /// rule is live with its endpoints.
    #[test]
    fn a_failed_write_is_repaired_by_the_retry() {
        let mut rng = Rng(7);
        // (no Maglev tables: 65,537 entries each make this slow unoptimised)
        let mut gen = |range: std::ops::Range<u16>| -> Vec<Rule> {
            let mut v: Vec<Rule> = range.flat_map(|s| random_rules(&mut rng, s)).collect();
            for r in &mut v {
                if r.selection == Selection::Hash {
                    r.selection = Selection::RoundRobin;
                }
            }
            v
        };
        let before = gen(0..6);
        let after = gen(3..9);
        let removed: Vec<SvcKey> = before
            .iter()
            .map(|r| svc_key(r.vip, r.port, r.protocol))
            .collect();
        for fail_at in 1..200 {
            let mut t = Failing {
                inner: MemTable::default(),
                ops: 0,
                fail_at: usize::MAX,
            };
            let mut r = Rules::adopt(vec![]);
            r.apply(&before, &mut t).unwrap();
            t.ops = 0;
            t.fail_at = fail_at;
            let failed = r
                .apply_changes(&after, &removed, &mut t, &|_, _, _| false)
                .is_err();
            t.fail_at = usize::MAX;
            r.apply_changes(&after, &removed, &mut t, &|_, _, _| false)
                .unwrap();
            assert_filter_and_vips_exact(&r, &t.inner, fail_at);
            let want: std::collections::HashSet<SvcKey> = after
                .iter()
                .flat_map(|r| {
                    std::iter::once(r.vip)
                        .chain(r.secondary_vips.iter().copied())
                        .map(|a| svc_key(a, r.port, r.protocol))
                })
                .collect();
            let have: std::collections::HashSet<SvcKey> = t.inner.svcs.keys().copied().collect();
            assert_eq!(have, want, "fail_at {fail_at}");
            for x in &after {
                let k = svc_key(x.vip, x.port, x.protocol);
                let inst = r.get(&k).unwrap();
                assert_eq!(active_eps(&t.inner, k).len(), inst.eps.len());
                assert_multihomed_entries(&t.inner, inst, fail_at);
            }
            let ids: BTreeSet<u32> = r.installed().map(|i| i.rule_id).collect();
            let listed: BTreeSet<u32> = t.inner.rule_vips.keys().copied().collect();
            assert!(
                listed.is_subset(&ids),
                "fail_at {fail_at}: stale rule VIP lists"
            );
            if !failed {
                break;
            }
        }
    }
}
