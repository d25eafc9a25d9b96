//! Connection tracking: one LRU entry per direction, idle timeout per rule,
//! TCP FIN/RST shortening the session's life.

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_ktime_get_coarse_ns};
use loxilb_common::{ct_dir, ct_state, stat, CtKey4, CtVal4, CT_CLOSE_TIMEOUT_S, IPPROTO_TCP};

use crate::{
    maps::{count, ep_active_add, ep_stats, LB_CT4, LB_SCRATCH_CT},
    parse::{ptr_at, Pkt},
};

const NS: u64 = 1_000_000_000;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

#[inline(always)]
pub fn key_of(p: &Pkt) -> CtKey4 {
    CtKey4 {
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
/// `bpf_ktime_get_ns` costs ~100 ns per packet in a VM).
#[inline(always)]
pub fn now_ns() -> u64 {
    unsafe { bpf_ktime_get_coarse_ns() }
}

#[inline(always)]
fn idle(v: *const CtVal4, now: u64) -> bool {
    unsafe { now.saturating_sub((*v).last_seen_ns) > (*v).timeout_s as u64 * NS }
}

#[inline(always)]
fn tcp_flags(p: &Pkt, end: usize) -> u8 {
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
    /// Live session: translate to this tuple; `v` is the entry (its
    /// next-hop cache is used by forwarding).
    Hit {
        xs: u32,
        xd: u32,
        xsp: u16,
        xdp: u16,
        v: *mut CtVal4,
    },
    /// No live session (none, idle past its timeout, or a new SYN on a
    /// closed one).
    Miss,
}

/// Look the packet up and, on a hit, account it and advance TCP state.
#[inline(always)]
pub fn lookup(p: &Pkt, end: usize, key: &CtKey4, now: u64) -> Ct {
    let Some(v) = LB_CT4.get_ptr_mut(key) else {
        return Ct::Miss;
    };
    let flags = tcp_flags(p, end);
    unsafe {
        let closing = (*v).state & ct_state::CLOSING != 0;
        let new_syn = flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
        if (closing && new_syn) || (idle(v, now) && peer_idle(v, now)) {
            let peer = (*v).peer;
            if (*v).state & ct_state::RELEASED == 0 {
                ep_active_add((*v).ep_stat, -1);
            }
            let _ = LB_CT4.remove(&peer);
            let _ = LB_CT4.remove(key);
            count(stat::CT_EXPIRED);
            return Ct::Miss;
        }
        (*v).last_seen_ns = now;
        (*v).packets += 1;
        (*v).bytes += p.l3_len as u64;
        if let Some(es) = ep_stats((*v).ep_stat) {
            (*es).packets += 1;
            (*es).bytes += p.l3_len as u64;
        }
        if flags & (TCP_FIN | TCP_RST) != 0 {
            tcp_close(v, flags);
        }
        Ct::Hit {
            xs: (*v).xsaddr,
            xd: (*v).xdaddr,
            xsp: (*v).xsport,
            xdp: (*v).xdport,
            v,
        }
    }
}

/// A one-way flow refreshes only its own direction; the session is idle only
/// when both directions are.
#[inline(always)]
unsafe fn peer_idle(v: *const CtVal4, now: u64) -> bool {
    let peer = unsafe { (*v).peer };
    match LB_CT4.get_ptr(&peer) {
        Some(pv) => idle(pv, now),
        None => true,
    }
}

#[inline(never)]
fn tcp_close(v: *mut CtVal4, flags: u8) {
    unsafe {
        let peer_key = (*v).peer;
        let Some(pv) = LB_CT4.get_ptr_mut(&peer_key) else {
            (*v).state |= ct_state::CLOSING;
            (*v).timeout_s = CT_CLOSE_TIMEOUT_S;
            return;
        };
        let mut st = (*v).state | (*pv).state;
        if flags & TCP_RST != 0 {
            st |= ct_state::RST;
        } else if (*v).dir == ct_dir::FORWARD {
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

/// Create both directions of a new DNAT session: `fwd` is the client's
/// packet as received, translated to (`ep`, `ep_port`). Returns the tuple
/// the packet must be translated to (the existing one if another CPU won a
/// race on the same tuple), or None if the table refused the entry.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub fn create(
    fwd: &CtKey4,
    ep: u32,
    ep_port: u16,
    rule_id: u32,
    timeout_s: u32,
    mode: u8,
    l3_len: u32,
    now: u64,
    ep_stat: u32,
) -> Option<(u32, u16)> {
    let rev = CtKey4 {
        saddr: ep,
        daddr: fwd.saddr,
        sport: ep_port,
        dport: fwd.sport,
        proto: fwd.proto,
        _pad1: 0,
        _pad2: 0,
    };
    // Built in per-CPU scratch space, not on the 512-byte BPF stack, and
    // zeroed with word stores (a zeroing struct literal becomes a memset
    // call in BPF).
    let (Some(rv), Some(fv)) = (LB_SCRATCH_CT.get_ptr_mut(0), LB_SCRATCH_CT.get_ptr_mut(1)) else {
        return None;
    };
    unsafe {
        crate::zero_in_place(rv);
        (*rv).xsaddr = fwd.daddr;
        (*rv).xdaddr = fwd.saddr;
        (*rv).xsport = fwd.dport;
        (*rv).xdport = fwd.sport;
        (*rv).rule_id = rule_id;
        (*rv).timeout_s = timeout_s;
        (*rv).last_seen_ns = now;
        (*rv).peer = *fwd;
        (*rv).dir = ct_dir::REPLY;
        (*rv).mode = mode;
        (*rv).ep_stat = ep_stat;
        crate::zero_in_place(fv);
        (*fv).xsaddr = fwd.saddr;
        (*fv).xdaddr = ep;
        (*fv).xsport = fwd.sport;
        (*fv).xdport = ep_port;
        (*fv).rule_id = rule_id;
        (*fv).timeout_s = timeout_s;
        (*fv).last_seen_ns = now;
        (*fv).packets = 1;
        (*fv).bytes = l3_len as u64;
        (*fv).peer = rev;
        (*fv).dir = ct_dir::FORWARD;
        (*fv).mode = mode;
        (*fv).ep_stat = ep_stat;
    }
    let (rev_val, fwd_val) = unsafe { (&*rv, &*fv) };
    // Reply entry first, so a fast reply never finds half a session.
    if LB_CT4.insert(&rev, rev_val, 0).is_err() {
        count(stat::DROP_CT_FULL);
        return None;
    }
    if LB_CT4.insert(fwd, fwd_val, BPF_NOEXIST as u64).is_err() {
        // Another CPU created this session first: follow its choice (and
        // drop our reply entry unless it is the very same one).
        return match LB_CT4.get_ptr(fwd) {
            Some(v) => unsafe {
                let won = ((*v).xdaddr, (*v).xdport);
                if won != (ep, ep_port) {
                    let _ = LB_CT4.remove(&rev);
                }
                Some(won)
            },
            None => {
                let _ = LB_CT4.remove(&rev);
                count(stat::DROP_CT_FULL);
                None
            }
        };
    }
    count(stat::NEW_SESSION);
    ep_active_add(ep_stat, 1);
    if let Some(es) = ep_stats(ep_stat) {
        unsafe {
            (*es).new_sessions += 1;
            (*es).packets += 1;
            (*es).bytes += l3_len as u64;
        }
    }
    Some((ep, ep_port))
}
