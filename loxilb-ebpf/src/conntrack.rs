//! Connection tracking: one LRU entry per direction, idle timeout per rule,
//! TCP FIN/RST shortening the session's life; an open handshake
//! (`ct_state::OPENING`) is marked here and its short timeout applied by
//! the agent's expiry.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns},
};
use loxilb_common::{
    addr_fold, ct_dir, ct_state, ep_index_slot, flow_hash, lb_mode, mix32, stat, Addr, CtKey,
    CtVal, EpIndex, NextHop, CT_CLOSE_TIMEOUT_S, IPPROTO_SCTP, IPPROTO_TCP,
};

use crate::{
    fwd::{NO_EP, SESSION_EP},
    maps::{
        count, ep_active_add, ep_stats, LB_CLOCK, LB_CT, LB_EP_INDEX, LB_SCRATCH_CT,
        LB_SCRATCH_KEY, LB_SKIP_ONE6,
    },
    parse::{ptr_at, sctp_ev, Pkt},
};

const NS: u64 = 1_000_000_000;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

#[inline(always)]
pub fn key_of(p: &Pkt) -> CtKey {
    CtKey {
        saddr: p.saddr,
        daddr: p.daddr,
        sport: p.sport,
        dport: p.dport,
        proto: p.proto,
        _pad1: 0,
        _pad2: 0,
    }
}

/// CLOCK_MONOTONIC at tick resolution (a few ms): plenty for idle
/// timeouts in seconds, and it reads no clock hardware (a precise
/// `bpf_ktime_get_ns` costs ~100 ns per packet in a VM). From the jiffies
/// counter once the agent has calibrated `LB_CLOCK` (one inlined load
/// instead of a helper call: see `loxilb_common::Clock`).
#[inline(always)]
pub fn now_ns() -> u64 {
    if let Some(c) = LB_CLOCK.get_ptr(0) {
        let c = unsafe { &*c };
        if c.ns_per_jiffy != 0 {
            return c.at(unsafe { bpf_jiffies64() });
        }
    }
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// Idle past the rule's timeout (not `CtVal::idle_timeout_s`: a session
/// still opening is the agent's expiry's to remove after its minute).
#[inline(always)]
fn idle(v: *const CtVal, now: u64) -> bool {
    unsafe { now.saturating_sub((*v).last_seen_ns) > (*v).timeout_s as u64 * NS }
}

/// `ct_state::OPENING` if packet `p` opens a handshake, a TCP SYN without
/// ACK or an SCTP INIT (the session it creates is opening until the client
/// acknowledges: [`completes`]), else 0.
#[inline(always)]
pub fn opens(p: &Pkt, end: usize) -> u8 {
    // `tcp_flags` gives an SCTP INIT as SYN, UDP no flags.
    let syn_only = ((tcp_flags(p, end) & (TCP_SYN | TCP_ACK)) ^ TCP_SYN) as u32;
    (is_zero(syn_only) as u8) * ct_state::OPENING
}

/// 1 when `x` is 0, else 0 (for `x` below 2^31), without a branch.
#[inline(always)]
fn is_zero(x: u32) -> u32 {
    (x.wrapping_sub(1) >> 31) & 1
}

/// `ct_state::OPENING` if a packet with `flags` ([`tcp_flags`]) in
/// direction `dir` is the client completing the handshake its SYN or INIT
/// opened, else 0: TCP, the client's ACK without SYN or RST; SCTP, any
/// packet of the client's but an INIT or a close (its COOKIE ECHO, the
/// first after the endpoint's INIT ACK). Without a branch: the one branch
/// left is whether to write (a call that cleared the reply entry too, and
/// the datapath's idle check going by the short timeout, cost the IPv6
/// programs 80-150k verified instructions).
#[inline(always)]
fn completes(p: &Pkt, flags: u8, dir: u8) -> u8 {
    let tcp = ((flags & (TCP_SYN | TCP_ACK | TCP_RST)) ^ TCP_ACK) as u32;
    let sctp = 0u32.wrapping_sub(is_zero((p.proto ^ IPPROTO_SCTP) as u32));
    let x = (tcp & !sctp) | (flags as u32 & sctp);
    ((is_zero(x) & is_zero(dir as u32)) as u8) * ct_state::OPENING
}

/// The packet's TCP flags; for SCTP, the same meaning from its chunks (an
/// INIT starts an association like a SYN, ABORT or SHUTDOWN COMPLETE ends
/// it like an RST); 0 for UDP.
#[inline(always)]
fn tcp_flags(p: &Pkt, end: usize) -> u8 {
    if p.proto == IPPROTO_SCTP {
        let mut f = 0;
        if p.sctp & sctp_ev::INIT != 0 {
            f |= TCP_SYN;
        }
        if p.sctp & sctp_ev::CLOSE != 0 {
            f |= TCP_RST;
        }
        return f;
    }
    if p.proto != IPPROTO_TCP {
        return 0;
    }
    match unsafe { ptr_at::<u8>(p.l4, end, 13) } {
        Some(f) => unsafe { *f },
        None => 0,
    }
}

/// Outcome of looking a packet up in connection tracking.
pub enum Ct {
    /// Live session: translate to this tuple; `v` is the entry, `nh` the
    /// next-hop cache of the packet's direction, `ep` the endpoint slot
    /// whose kept next hop forwarding may use (`fwd::NO_EP`: none; see
    /// `fwd::forward`).
    Hit {
        x: Xlate,
        v: *mut CtVal,
        nh: *mut NextHop,
        ep: u32,
    },
    /// No live session (none, idle past its timeout, or a new SYN on a
    /// closed one).
    Miss,
}

/// The endpoint index's slot for endpoint (`addr`, `port`) over `proto`,
/// if it holds that endpoint (a slot is shared by every endpoint that
/// hashes to it; it holds one of them, or none).
#[inline(always)]
fn index_entry(addr: &Addr, port: u16, proto: u8) -> Option<*const EpIndex> {
    let e = LB_EP_INDEX.get_ptr(ep_index_slot(addr_fold(addr), port, proto))?;
    unsafe {
        if (*e).proto != proto || (*e).port != port || (*e).addr != *addr {
            return None;
        }
    }
    Some(e)
}

/// The endpoint index says endpoint (`addr`, `port`) serves the DNAT
/// service `vip`:`vport` over `proto` (and is not draining): a session to
/// it can have one entry (`ct_state::ONE`), its replies found through the
/// index.
#[inline(always)]
pub fn indexed(addr: &Addr, port: u16, proto: u8, vip: &Addr, vport: u16) -> bool {
    let Some(e) = index_entry(addr, port, proto) else {
        return false;
    };
    unsafe { (*e).flags == 0 && (*e).vport == vport && (*e).vip == *vip }
}

/// The forward entry of the one-entry session (`ct_state::ONE`) between
/// `client`:`cport` and endpoint `ep`:`eport` over `proto`, found through
/// the endpoint index, and its key (client -> VIP, left in
/// `LB_SCRATCH_KEY` slot 1: slot 0 is `peer_of`'s).
#[inline(always)]
fn one_entry(
    ep: &Addr,
    eport: u16,
    client: &Addr,
    cport: u16,
    proto: u8,
) -> Option<(*const CtKey, *mut CtVal)> {
    let e = index_entry(ep, eport, proto)?;
    let fk = LB_SCRATCH_KEY.get_ptr_mut(1)?;
    unsafe {
        crate::set_addr(&mut (*fk).saddr, client);
        crate::set_addr(&mut (*fk).daddr, &(*e).vip);
        (*fk).sport = cport;
        (*fk).dport = (*e).vport;
        (*fk).proto = proto;
        (*fk)._pad1 = 0;
        (*fk)._pad2 = 0;
        let v = LB_CT.get_ptr_mut(&*fk)?;
        if (*v).state & ct_state::ONE == 0 || (*v).xdport != eport || (*v).xdaddr != *ep {
            return None;
        }
        Some((fk, v))
    }
}

/// Count a packet of `len` bytes to session `v` (a one-entry session's
/// reply (`reply`, a constant) in its reply counters) and to its
/// endpoint, and mark the session seen at `now`.
#[inline(always)]
unsafe fn account(v: *mut CtVal, now: u64, reply: bool, len: u32) {
    (*v).last_seen_ns = now;
    if reply {
        (*v).rpackets += 1;
        (*v).rbytes += len as u64;
    } else {
        (*v).packets += 1;
        (*v).bytes += len as u64;
    }
    if let Some(es) = ep_stats((*v).ep_stat) {
        (*es).packets += 1;
        (*es).bytes += len as u64;
    }
}

/// A reply to a one-entry session (`ct_state::ONE`): a packet from an
/// endpoint in the index, to a client of the service it serves, whose
/// session with that endpoint has one entry ([`one_entry`]). Accounted
/// and its TCP state advanced as `lookup` does; the entry and its key, or
/// None for anything else (the packet is then looked up by its own tuple).
#[inline(always)]
fn one_reply(p: &Pkt, end: usize, now: u64) -> Option<(*const CtKey, *mut CtVal)> {
    let (key, v) = one_entry(&p.saddr, p.sport, &p.daddr, p.dport, p.proto)?;
    unsafe {
        let k = &*key;
        if over(k, v, now) {
            end_session(k, v);
            count(stat::CT_EXPIRED);
            return None;
        }
        account(v, now, true, p.l3_len);
        let flags = tcp_flags(p, end);
        if flags & (TCP_FIN | TCP_RST) != 0 {
            tcp_close(k, v, flags, true);
        }
        Some((key, v))
    }
}

/// The service (VIP, port) of the one-entry session (`ct_state::ONE`)
/// between `client`:`cport` and endpoint `ep`:`eport` over `proto`, if
/// there is one (what an ICMP error quoting a packet the session sent to
/// its endpoint needs to be translated back).
#[inline(always)]
pub fn one_entry_service(
    ep: &Addr,
    eport: u16,
    client: &Addr,
    cport: u16,
    proto: u8,
) -> Option<(Addr, u16)> {
    let (k, _) = one_entry(ep, eport, client, cport, proto)?;
    unsafe { Some(((*k).daddr, (*k).dport)) }
}

/// The packet as a reply to a one-entry session ([`one_reply`]): a hit
/// back from the client's VIP and port (its entry's key), to it; or a
/// miss.
#[inline(always)]
pub fn lookup_one(p: &Pkt, end: usize, now: u64) -> Ct {
    let Some((fk, v)) = one_reply(p, end, now) else {
        return Ct::Miss;
    };
    unsafe {
        Ct::Hit {
            x: Xlate {
                xs: (*fk).daddr,
                xd: p.daddr,
                xsp: (*fk).dport,
                xdp: p.dport,
            },
            v,
            nh: core::ptr::addr_of_mut!((*v).rnh),
            ep: NO_EP,
        }
    }
}

/// Whether the IPv6 program hands `p` (its source passed the address
/// filter) to its one-entry reply program (`JMP_ONE6`): it comes from an
/// endpoint the index holds, and that program has not just handed it
/// back (a miss there; the mark is cleared here).
#[inline(always)]
pub fn to_one6(p: &Pkt) -> bool {
    if let Some(f) = LB_SKIP_ONE6.get_ptr_mut(0) {
        unsafe {
            if *f != 0 {
                *f = 0;
                return false;
            }
        }
    }
    index_entry(&p.saddr, p.sport, p.proto).is_some()
}

/// Mark (or unmark) this CPU's packet as handed back by the one-entry
/// reply program (see [`to_one6`]).
#[inline(always)]
pub fn handed_back_one6(on: bool) {
    if let Some(f) = LB_SKIP_ONE6.get_ptr_mut(0) {
        unsafe { *f = on as u32 };
    }
}

/// Look the packet up and, on a hit, account it and advance TCP state.
/// `one`: the packet may be a reply to a one-entry session (IPv4: its
/// source may be an endpoint, by the address filter; the IPv6 programs
/// have no verifier budget left for this second way to a session and hand
/// such packets to a program of their own, [`to_one6`]).
#[inline(always)]
pub fn lookup(p: &Pkt, end: usize, key: &CtKey, now: u64, one: bool) -> Ct {
    if one {
        if let hit @ Ct::Hit { .. } = lookup_one(p, end, now) {
            return hit;
        }
    }
    let Some(v) = LB_CT.get_ptr_mut(key) else {
        return Ct::Miss;
    };
    let flags = tcp_flags(p, end);
    unsafe {
        let closing = (*v).state & ct_state::CLOSING != 0;
        let new_syn = flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
        if (closing && new_syn) || over(key, v, now) {
            end_session(key, v);
            count(stat::CT_EXPIRED);
            return Ct::Miss;
        }
        account(v, now, false, p.l3_len);
        // Only the forward entry's bit counts once the client acknowledged
        // (see `ct_state::OPENING`). Written only then: a store on every
        // packet could undo a close another CPU marks in this entry
        // meanwhile (`tcp_close` writes the peer's state too).
        let opened = completes(p, flags, (*v).dir) & (*v).state;
        if opened != 0 {
            (*v).state &= !opened;
        }
        if flags & (TCP_FIN | TCP_RST) != 0 {
            tcp_close(key, v, flags, false);
        }
        Ct::Hit {
            x: Xlate {
                xs: (*v).xsaddr,
                xd: (*v).xdaddr,
                xsp: (*v).xsport,
                xdp: (*v).xdport,
            },
            v,
            nh: core::ptr::addr_of_mut!((*v).nh),
            // A packet toward the endpoint may use the next hop kept for it.
            ep: SESSION_EP,
        }
    }
}

/// The key of the other direction of the session `key` -> `v` (as
/// `CtKey::peer`: the translated tuple reversed; `None` for DSR), written
/// to per-CPU scratch, valid until the next call. A one-entry session
/// (`ct_state::ONE`) gets one too, under which nothing is found: going by
/// the mode alone, as the state bit would, keeps every caller's paths as
/// few for the verifier (a branch on the bit here cost the IPv6
/// programs 150k verified instructions).
#[inline(always)]
fn peer_of(key: &CtKey, v: *const CtVal) -> Option<*const CtKey> {
    let v = unsafe { &*v };
    if lb_mode::is_dsr(v.mode) {
        return None;
    }
    let s = LB_SCRATCH_KEY.get_ptr_mut(0)?;
    unsafe {
        crate::set_addr(&mut (*s).saddr, &v.xdaddr);
        crate::set_addr(&mut (*s).daddr, &v.xsaddr);
        (*s).sport = v.xdport;
        (*s).dport = v.xsport;
        (*s).proto = key.proto;
        (*s)._pad1 = 0;
        (*s)._pad2 = 0;
    }
    Some(s)
}

/// Idle past its timeout in both directions (a one-way flow refreshes only
/// its own direction).
#[inline(always)]
unsafe fn over(key: &CtKey, v: *const CtVal, now: u64) -> bool {
    unsafe { idle(v, now) && peer_idle(key, v, now) }
}

/// Remove the session `key` (entry `v`) and its reply entry; its endpoint
/// stops counting it as active (unless a close already did).
#[inline(always)]
pub unsafe fn end_session(key: &CtKey, v: *const CtVal) {
    unsafe {
        if (*v).state & ct_state::RELEASED == 0 {
            ep_active_add((*v).ep_stat, -1);
        }
        if let Some(peer) = peer_of(key, v) {
            let _ = LB_CT.remove(&*peer);
        }
        let _ = LB_CT.remove(key);
    }
}

/// A one-way flow refreshes only its own direction; the session is idle only
/// when both directions are.
#[inline(always)]
unsafe fn peer_idle(key: &CtKey, v: *const CtVal, now: u64) -> bool {
    let Some(peer) = peer_of(key, v) else {
        return true;
    };
    match LB_CT.get_ptr(unsafe { &*peer }) {
        Some(pv) => idle(pv, now),
        None => true,
    }
}

/// A FIN or an RST on session entry `v` (`reply`: a one-entry session's
/// reply, which its forward entry `v` accounts).
#[inline(never)]
fn tcp_close(key: &CtKey, v: *mut CtVal, flags: u8, reply: bool) {
    unsafe {
        let pv = if (*v).state & ct_state::ONE != 0 {
            // One entry holds both directions' state.
            Some(v)
        } else {
            match peer_of(key, v) {
                Some(peer) => LB_CT.get_ptr_mut(&*peer),
                None => None,
            }
        };
        let Some(pv) = pv else {
            // No reply entry (DSR: we see one direction only): a FIN or an
            // RST from the client closes the session.
            if (*v).state & ct_state::RELEASED == 0 {
                ep_active_add((*v).ep_stat, -1);
            }
            (*v).state |= ct_state::CLOSING | ct_state::RELEASED;
            (*v).timeout_s = CT_CLOSE_TIMEOUT_S;
            return;
        };
        let mut st = (*v).state | (*pv).state;
        if flags & TCP_RST != 0 {
            st |= ct_state::RST;
        } else if (*v).dir == ct_dir::FORWARD && !reply {
            st |= ct_state::FIN_FWD;
        } else {
            st |= ct_state::FIN_REPLY;
        }
        let both_fin = ct_state::FIN_FWD | ct_state::FIN_REPLY;
        if st & ct_state::RST != 0 || st & both_fin == both_fin {
            if st & ct_state::RELEASED == 0 {
                ep_active_add((*v).ep_stat, -1);
                st |= ct_state::RELEASED;
            }
            st |= ct_state::CLOSING;
            (*v).timeout_s = CT_CLOSE_TIMEOUT_S;
            (*pv).timeout_s = CT_CLOSE_TIMEOUT_S;
        }
        (*v).state = st;
        (*pv).state = st;
    }
}

/// The tuple a packet is translated to.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Xlate {
    pub xs: Addr,
    pub xd: Addr,
    pub xsp: u16,
    pub xdp: u16,
}

/// What the new session needs besides its translation.
pub struct NewSession {
    pub rule_id: u32,
    pub timeout_s: u32,
    pub mode: u8,
    pub l3_len: u32,
    pub now: u64,
    pub ep_stat: u32,
    /// Allocate the translated source port (onearm, full-NAT) from
    /// `[port_lo, port_hi]` (host order).
    pub snat: bool,
    pub port_lo: u16,
    pub port_hi: u16,
    /// DSR: the packet keeps its tuple and there is no reply entry
    /// (replies do not come back through us); the translated destination
    /// is the endpoint the frame goes to (see `CtVal::xdaddr`).
    pub dsr: bool,
    /// One entry (`ct_state::ONE`): the endpoint's replies find the
    /// forward entry through the endpoint index, so no reply entry.
    pub one: bool,
    /// `ct_state::OPENING` for a session opened by a TCP SYN or an SCTP
    /// INIT ([`opens`]), else 0: both entries' first state.
    pub opening: u8,
}

const SNAT_TRIES: u32 = 16;

/// Remove the session owning `key` if it is over (idle past its timeout in
/// both directions); true if it went.
#[inline(always)]
fn reclaim(key: &CtKey, now: u64) -> bool {
    let Some(v) = LB_CT.get_ptr(key) else {
        return true;
    };
    unsafe {
        if !over(key, v, now) {
            return false;
        }
        end_session(key, v);
    }
    count(stat::CT_EXPIRED);
    true
}

/// Create a new session for `fwd` (the client's packet as received),
/// translated to `x`: the forward entry and (unless DSR) the reply entry.
/// Returns the translation to apply (another CPU's, if it won a race on the
/// same tuple), or None when the session cannot be created (table full, no
/// free source port: counted).
#[inline(always)]
pub fn create(fwd: &CtKey, x: Xlate, n: &NewSession) -> Option<Xlate> {
    // Built in per-CPU scratch space, not on the 512-byte BPF stack, and
    // zeroed with word stores (a zeroing struct literal becomes a memset
    // call in BPF).
    let (Some(rv), Some(fv)) = (LB_SCRATCH_CT.get_ptr_mut(0), LB_SCRATCH_CT.get_ptr_mut(1)) else {
        return None;
    };
    let mut x = x;
    let mut rev = CtKey {
        saddr: x.xd,
        daddr: x.xs,
        sport: x.xdp,
        dport: x.xsp,
        proto: fwd.proto,
        _pad1: 0,
        _pad2: 0,
    };
    let no_reply_entry = n.dsr || n.one;
    // The reply entry's value, built only for a session that has one (a
    // new DNAT session to an indexed endpoint, or a DSR one, does not).
    let rev_val = if no_reply_entry {
        None
    } else {
        unsafe {
            crate::zero_in_place(rv);
            crate::set_addr(&mut (*rv).xsaddr, &fwd.daddr);
            crate::set_addr(&mut (*rv).xdaddr, &fwd.saddr);
            (*rv).xsport = fwd.dport;
            (*rv).xdport = fwd.sport;
            (*rv).rule_id = n.rule_id;
            (*rv).timeout_s = n.timeout_s;
            (*rv).last_seen_ns = n.now;
            (*rv).dir = ct_dir::REPLY;
            (*rv).state = n.opening;
            (*rv).mode = n.mode;
            (*rv).ep_stat = n.ep_stat;
            Some(&*rv)
        }
    };
    if let Some(rev_val) = rev_val {
        if n.snat {
            // The reply entry is the port's allocation record: the first free
            // (endpoint, source, port) tuple wins; it is released with the
            // session.
            let range = (n.port_hi as u32).saturating_sub(n.port_lo as u32) + 1;
            let h = flow_hash(&fwd.saddr, &fwd.daddr, fwd.sport, fwd.dport, fwd.proto);
            let mut i = 0;
            let mut ok = false;
            while i < SNAT_TRIES {
                // An independent hash per try (not a fixed stride from one
                // start: flows whose starts are near would then share their
                // whole probe sequence, and runs of taken ports fail new
                // sessions at a third of the range in use).
                let port = n.port_lo as u32
                    + mix32(h ^ i.wrapping_add(1).wrapping_mul(0x9e37_79b9)) % range;
                rev.dport = (port as u16).to_be();
                if LB_CT.insert(&rev, rev_val, BPF_NOEXIST as u64).is_ok() {
                    ok = true;
                    break;
                }
                // Taken: by a live session, or by one that ended and was never
                // seen again (nothing removed it). Reclaim the latter.
                if reclaim(&rev, n.now) && LB_CT.insert(&rev, rev_val, BPF_NOEXIST as u64).is_ok() {
                    ok = true;
                    break;
                }
                i += 1;
            }
            if !ok {
                count(stat::DROP_SNAT_EXHAUSTED);
                return None;
            }
            x.xsp = rev.dport;
        } else if LB_CT.insert(&rev, rev_val, 0).is_err() {
            // Reply entry first, so a fast reply never finds half a session.
            count(stat::DROP_CT_FULL);
            return None;
        }
    }
    unsafe {
        crate::zero_in_place(fv);
        crate::set_addr(&mut (*fv).xsaddr, &x.xs);
        crate::set_addr(&mut (*fv).xdaddr, &x.xd);
        (*fv).xsport = x.xsp;
        (*fv).xdport = x.xdp;
        (*fv).rule_id = n.rule_id;
        (*fv).timeout_s = n.timeout_s;
        (*fv).last_seen_ns = n.now;
        (*fv).packets = 1;
        (*fv).bytes = n.l3_len as u64;
        (*fv).dir = ct_dir::FORWARD;
        (*fv).state = n.opening | if n.one { ct_state::ONE } else { 0 };
        (*fv).mode = n.mode;
        (*fv).ep_stat = n.ep_stat;
    }
    let fwd_val = unsafe { &*fv };
    if LB_CT.insert(fwd, fwd_val, BPF_NOEXIST as u64).is_err() {
        // Another CPU created this session first: follow its choice (and
        // drop our reply entry unless it is the very same one).
        return match LB_CT.get_ptr(fwd) {
            Some(v) => unsafe {
                let won = Xlate {
                    xs: (*v).xsaddr,
                    xd: (*v).xdaddr,
                    xsp: (*v).xsport,
                    xdp: (*v).xdport,
                };
                // (Also when the winner made a one-entry session: the
                // index changed between the two decisions.)
                if (won != x || (*v).state & ct_state::ONE != 0) && !no_reply_entry {
                    let _ = LB_CT.remove(&rev);
                }
                Some(won)
            },
            None => {
                if !no_reply_entry {
                    let _ = LB_CT.remove(&rev);
                }
                count(stat::DROP_CT_FULL);
                None
            }
        };
    }
    count(stat::NEW_SESSION);
    ep_active_add(n.ep_stat, 1);
    if let Some(es) = ep_stats(n.ep_stat) {
        unsafe {
            (*es).new_sessions += 1;
            (*es).packets += 1;
            (*es).bytes += n.l3_len as u64;
        }
    }
    Some(x)
}
