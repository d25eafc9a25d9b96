//! Endpoint selection through the rule's selection table (built by the
//! agent): `rr` walks a weighted sequence, `hash` indexes a Maglev table by
//! the flow hash, `persist` remembers each client's endpoint (source-IP
//! affinity, with its own timeout, kept apart from conntrack so it survives
//! session expiry). Inactive endpoints are skipped by probing the next
//! table slots, a bounded number of times.

use loxilb_common::{ep_flags, flow_hash, lb_sel, AffKey, EpVal, SvcVal, SEL_CHUNK};

use crate::{
    maps::{ep_active, LB_AFFINITY, LB_EP_SLOTS, LB_SCRATCH_AFF, LB_SEL_TABLE},
    parse::Pkt,
};

const MAX_TRIES: u32 = 16;
const NS: u64 = 1_000_000_000;

/// The endpoint slot (`EpVal::stat_idx`) at `pos` of the table starting
/// at chunk `base` (an array read, inlined by the verifier).
#[inline(always)]
fn table_at(base: u32, pos: u32) -> Option<u32> {
    let chunk = LB_SEL_TABLE.get_ptr(base.wrapping_add(pos / SEL_CHUNK))?;
    let i = (pos % SEL_CHUNK) as usize;
    unsafe { Some((*chunk).ep[i & (SEL_CHUNK as usize - 1)]) }
}

/// The active endpoint in `slot`: a pointer into `LB_EP_SLOTS` (an array
/// read the verifier inlines; valid for the rest of the program run, no
/// 32-byte copy on the small BPF stack).
#[inline(always)]
fn endpoint(slot: u32) -> Option<&'static EpVal> {
    let ep = LB_EP_SLOTS.get_ptr(slot)?;
    let ep = unsafe { &*ep };
    if ep.flags & ep_flags::INACTIVE != 0 {
        return None;
    }
    Some(ep)
}

/// Pick an endpoint for a new session of `p`, or None when no active
/// endpoint could be found.
#[inline(always)]
pub fn select(svc: *mut SvcVal, p: &Pkt, now: u64) -> Option<&'static EpVal> {
    let (rule, base, n, len, sel) = unsafe {
        (
            (*svc).rule_id,
            (*svc).sel_base,
            (*svc).ep_count,
            (*svc).table_len,
            (*svc).sel,
        )
    };
    if n == 0 || len == 0 {
        return None;
    }
    let aff_key = AffKey {
        rule_id: rule,
        client: p.saddr,
    };
    if sel == lb_sel::LC {
        // Least connections by the power of two choices: the next slot in
        // rotation and the flow's hash slot; the one with fewer active
        // sessions wins (no scan, no lock).
        let a_slot = unsafe {
            let cur = (*svc).rr_next;
            (*svc).rr_next = cur.wrapping_add(1);
            cur % len
        };
        let b_slot = flow_hash(&p.saddr, &p.daddr, p.sport, p.dport, p.proto) % len;
        let a = table_at(base, a_slot).and_then(endpoint);
        let b = table_at(base, b_slot).and_then(endpoint);
        match (a, b) {
            (Some(a), Some(b)) => {
                return Some(if ep_active(b.stat_idx) < ep_active(a.stat_idx) {
                    b
                } else {
                    a
                });
            }
            (Some(a), None) => return Some(a),
            (None, Some(b)) => return Some(b),
            // both inactive: fall back to probing from the rotation slot
            (None, None) => {}
        }
    }
    let start = if sel == lb_sel::HASH {
        flow_hash(&p.saddr, &p.daddr, p.sport, p.dport, p.proto) % len
    } else if sel == lb_sel::LC {
        unsafe { (*svc).rr_next % len }
    } else {
        if sel == lb_sel::PERSIST {
            if let Some(a) = LB_AFFINITY.get_ptr_mut(&aff_key) {
                let fresh = unsafe {
                    now.saturating_sub((*a).last_seen_ns) <= (*svc).persist_timeout_s as u64 * NS
                };
                if fresh {
                    let (idx, addr, port) = unsafe { ((*a).ep_idx, (*a).ep_addr, (*a).ep_port) };
                    if let Some(ep) = endpoint(idx) {
                        // Still the same endpoint of this rule in that
                        // slot, and active.
                        if ep.rule_id == rule && ep.addr == addr && ep.port == port {
                            unsafe { (*a).last_seen_ns = now };
                            return Some(ep);
                        }
                    }
                }
            }
        }
        unsafe {
            let cur = (*svc).rr_next;
            (*svc).rr_next = cur.wrapping_add(1);
            cur % len
        }
    };
    let mut i = 0;
    while i < MAX_TRIES {
        let slot = (start + i) % len;
        if let Some(idx) = table_at(base, slot) {
            if let Some(ep) = endpoint(idx) {
                if sel == lb_sel::PERSIST {
                    // Built in per-CPU scratch, off the stack.
                    if let Some(v) = LB_SCRATCH_AFF.get_ptr_mut(0) {
                        let v = unsafe { &mut *v };
                        crate::set_addr(&mut v.ep_addr, &ep.addr);
                        v.ep_port = ep.port;
                        v._pad1 = 0;
                        v.ep_idx = idx;
                        v.last_seen_ns = now;
                        let _ = LB_AFFINITY.insert(&aff_key, &*v, 0);
                    }
                }
                return Some(ep);
            }
        }
        i += 1;
    }
    None
}
