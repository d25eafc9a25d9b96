//! SCTP multihoming (default/DNAT mode): one association over several
//! paths, each path a (client address, VIP) pair on the client's side and
//! an (endpoint address, client address) pair on the endpoint's side.
//!
//! - INIT (client -> VIP, the session just created): the association is
//!   recorded under the client's initiate tag with the client's addresses
//!   (the INIT's source and address parameters), and the endpoint's
//!   packets toward each other client address get a reply session
//!   (endpoint -> that address, shown as coming from the VIP).
//! - INIT-ACK (endpoint -> client): its address parameters (the endpoint's
//!   addresses) are rewritten to the rule's VIPs, so the client only ever
//!   sees the load balancer: the INIT-ACK's own source stays paired with
//!   the VIP the association started on, each other endpoint address gets
//!   the next VIP. The pairs are recorded under the endpoint's initiate
//!   tag too, and reply sessions made for every (endpoint address, client
//!   address). The CRC32c is updated for each rewritten word.
//! - Any other packet of the association arriving at any VIP on a new path
//!   (client -> VIP k): found by its verification tag, sent to the endpoint
//!   address paired with VIP k (`path_endpoint`).
//!
//! Bounded everywhere: at most 8 address parameters are looked at, 4
//! addresses per side kept.

use loxilb_common::{
    crc32c, ct_dir, AssocKey, AssocVal, CtKey, CtVal, IPPROTO_SCTP, MAX_RULE_VIPS,
};

use aya_ebpf::bindings::BPF_NOEXIST;

use crate::{
    maps::{LB_CT, LB_RULE_VIPS, LB_SCRATCH_ASSOC, LB_SCRATCH_CT, LB_SCRATCH_OFF, LB_SCTP_ASSOC},
    parse::{ptr_at, sctp_ev, Pkt},
};

const PARAM_IPV4: u16 = 5;
const PARAM_IPV6: u16 = 6;
const MAX_PARAMS: u32 = 4;
/// INIT / INIT-ACK: chunk header (4) + fixed fields (16).
const INIT_FIXED: usize = 20;
/// The first chunk starts after the 12-byte common header.
const CHUNK0: usize = 12;

/// The packet's verification tag (network order, as loaded).
#[inline(always)]
pub fn vtag(p: &Pkt, end: usize) -> Option<u32> {
    unsafe { ptr_at::<u32>(p.l4, end, 4).map(|t| *t) }
}

/// The initiate tag of the packet's INIT / INIT-ACK chunk (the first).
#[inline(always)]
fn initiate_tag(p: &Pkt, end: usize) -> Option<u32> {
    unsafe { ptr_at::<u32>(p.l4, end, CHUNK0 + 4).map(|t| *t) }
}

/// For a packet of a known association arriving at `vip` on a path with
/// no session yet: the endpoint address (pointer into the association
/// record) and port to send it to.
#[inline(always)]
pub fn path_endpoint(rule_id: u32, p: &Pkt, end: usize) -> Option<(&'static [u32; 4], u16, u32)> {
    let tag = vtag(p, end)?;
    let a = LB_SCTP_ASSOC.get_ptr(&AssocKey { rule_id, vtag: tag })?;
    let a: &'static AssocVal = unsafe { &*a };
    let mut k = 0;
    while k < MAX_RULE_VIPS {
        if k < a.n_pairs as usize && a.vips[k] == p.daddr {
            return Some((&a.eps[k], a.ep_port, a.ep_stat));
        }
        k += 1;
    }
    Some((&a.eps[0], a.ep_port, a.ep_stat))
}

/// A reply session for path pair `k` toward client address `i` of
/// association `a`: packets `eps[k]:eport -> clients[i]:cport` translated
/// to `vips[k]:vport -> clients[i]:cport`. Never replaces a live entry.
/// (A BPF subprogram: verified once per call site, not inlined into every
/// loop iteration.)
#[inline(never)]
fn add_reply(a: &AssocVal, k: usize, i: usize, tmpl: *const CtVal, now: u64) {
    let k = k & (MAX_RULE_VIPS - 1);
    let i = i & (MAX_RULE_VIPS - 1);
    let (ep, client, vip) = (&a.eps[k], &a.clients[i], &a.vips[k]);
    let Some(rv) = LB_SCRATCH_CT.get_ptr_mut(0) else {
        return;
    };
    unsafe {
        crate::zero_in_place(rv);
        crate::set_addr(&mut (*rv).xsaddr, vip);
        crate::set_addr(&mut (*rv).xdaddr, client);
        (*rv).xsport = a.vport;
        (*rv).xdport = a.cport;
        (*rv).rule_id = (*tmpl).rule_id;
        (*rv).timeout_s = (*tmpl).timeout_s;
        (*rv).last_seen_ns = now;
        (*rv).dir = ct_dir::REPLY;
        (*rv).mode = (*tmpl).mode;
        (*rv).ep_stat = a.ep_stat;
        // (The forward entry of this path is made when the client uses
        // it; until then `peer` names it, as it will be.)
        crate::set_addr(&mut (*rv).peer.saddr, client);
        crate::set_addr(&mut (*rv).peer.daddr, vip);
        (*rv).peer.sport = a.cport;
        (*rv).peer.dport = a.vport;
        (*rv).peer.proto = IPPROTO_SCTP;
    }
    let key = CtKey {
        saddr: *ep,
        daddr: *client,
        sport: a.ep_port,
        dport: a.cport,
        proto: IPPROTO_SCTP,
        _pad1: 0,
        _pad2: 0,
    };
    let _ = LB_CT.insert(&key, unsafe { &*rv }, BPF_NOEXIST as u64);
}

/// `off`, masked to what the parameter walk allows (2 KiB) in a way LLVM
/// cannot drop as redundant: the verifier checks packet accesses only at
/// offsets it knows are below 64 KiB, and LLVM's own proof of the bound
/// does not reach it.
#[inline(always)]
fn bounded(off: usize) -> usize {
    core::hint::black_box(off) & 0x7ff
}

/// `*dst = *src` between map values, word by word (volatile: a plain copy
/// becomes a `memmove` call in BPF).
#[inline(always)]
unsafe fn copy_words(dst: *mut AssocVal, src: *const AssocVal) {
    const N: usize = core::mem::size_of::<AssocVal>() / 4;
    let d = dst as *mut u32;
    let s = src as *const u32;
    let mut i = 0;
    while i < N {
        unsafe { core::ptr::write_volatile(d.add(i), core::ptr::read_volatile(s.add(i))) };
        i += 1;
    }
}

/// The type and length of the parameter at `off` (from the SCTP common
/// header).
#[inline(always)]
fn param_at(p: &Pkt, end: usize, off: usize) -> Option<(u16, u16)> {
    // (Offsets are masked to what the walk allows, so the verifier keeps a
    // bound on them: it only checks packet pointers with offsets below 64
    // KiB.)
    let h = unsafe { ptr_at::<[u8; 4]>(p.l4, end, bounded(off))? };
    let h = unsafe { &*h };
    Some((
        u16::from_be_bytes([h[0], h[1]]),
        u16::from_be_bytes([h[2], h[3]]),
    ))
}

/// Read the address of an address parameter whose value starts at `off`.
#[inline(always)]
fn param_addr(p: &Pkt, end: usize, off: usize, v6: bool) -> Option<[u32; 4]> {
    unsafe {
        if v6 {
            let a = ptr_at::<[u32; 4]>(p.l4, end, bounded(off))?;
            Some(*a)
        } else {
            let a = ptr_at::<u32>(p.l4, end, bounded(off))?;
            Some(loxilb_common::v4_mapped(*a))
        }
    }
}

/// INIT from the client (forward direction, session `v` exists): record
/// the association and reply sessions toward the client's other
/// addresses. (A BPF subprogram: its own stack frame.)
#[inline(never)]
pub fn on_init(p: &Pkt, end: usize, v: *const CtVal, now: u64) {
    if p.sctp & sctp_ev::INIT == 0 {
        return;
    }
    let Some(tag) = initiate_tag(p, end) else {
        return;
    };
    let (rule_id, xd, xdp) = unsafe { ((*v).rule_id, (*v).xdaddr, (*v).xdport) };
    // Only rules with more than one VIP are multihomed.
    match LB_RULE_VIPS.get_ptr(&rule_id) {
        Some(r) if unsafe { (*r).n } > 1 => {}
        _ => return,
    }
    let Some(a) = LB_SCRATCH_ASSOC.get_ptr_mut(0) else {
        return;
    };
    let a = unsafe {
        crate::zero_in_place(a);
        &mut *a
    };
    crate::set_addr(&mut a.eps[0], &xd);
    crate::set_addr(&mut a.vips[0], &p.daddr);
    crate::set_addr(&mut a.clients[0], &p.saddr);
    a.ep_port = xdp;
    a.vport = p.dport;
    a.cport = p.sport;
    a.n_pairs = 1;
    a.n_clients = 1;
    a.ep_stat = unsafe { (*v).ep_stat };
    a.mode = unsafe { (*v).mode };
    walk_params(p, end, |addr, _| {
        let n = a.n_clients as usize;
        if n < MAX_RULE_VIPS && addr != a.clients[0] {
            crate::set_addr(&mut a.clients[n & (MAX_RULE_VIPS - 1)], &addr);
            a.n_clients += 1;
        }
        None
    });
    let _ = LB_SCTP_ASSOC.insert(&AssocKey { rule_id, vtag: tag }, &*a, 0);
    let mut i = 1;
    while i < MAX_RULE_VIPS {
        if i < a.n_clients as usize {
            add_reply(a, 0, i, v, now);
        }
        i += 1;
    }
}

/// Walk the address parameters of the INIT / INIT-ACK chunk; `f(addr,
/// value offset)` may return a replacement address (same family), which
/// is written and the CRC32c updated for.
#[inline(always)]
fn walk_params(p: &Pkt, end: usize, mut f: impl FnMut([u32; 4], usize) -> Option<[u32; 4]>) {
    let Some(clen) = (unsafe { ptr_at::<[u8; 4]>(p.l4, end, CHUNK0) }) else {
        return;
    };
    let chunk_end = CHUNK0 + u16::from_be_bytes(unsafe { [(*clen)[2], (*clen)[3]] }) as usize;
    let mut off = CHUNK0 + INIT_FIXED;
    let mut i = 0;
    while i < MAX_PARAMS {
        // Through a per-CPU slot: the verifier then sees one unknown
        // (bounded) offset at the top of every iteration, whatever the
        // previous parameters were, instead of one state per combination.
        if let Some(slot) = LB_SCRATCH_OFF.get_ptr_mut(0) {
            unsafe {
                core::ptr::write_volatile(slot, off as u32);
                off = core::ptr::read_volatile(slot) as usize;
            }
        }
        if off + 4 > chunk_end || off > 1024 {
            return;
        }
        let Some((t, len)) = param_at(p, end, off) else {
            return;
        };
        let len = len as usize;
        if len < 4 || off + len > chunk_end {
            return;
        }
        if (t == PARAM_IPV4 && len == 8) || (t == PARAM_IPV6 && len == 20) {
            let v6 = t == PARAM_IPV6;
            if let Some(addr) = param_addr(p, end, off + 4, v6) {
                if let Some(new) = f(addr, off + 4) {
                    rewrite_addr(p, end, off + 4, v6, &addr, &new);
                }
            }
        }
        off += (len + 3) & !3;
        i += 1;
    }
}

/// Write `new` over the address at `off` (from the SCTP header) and
/// update the CRC32c for each changed word.
#[inline(always)]
fn rewrite_addr(p: &Pkt, end: usize, off: usize, v6: bool, old: &[u32; 4], new: &[u32; 4]) {
    let Some(crc) = (unsafe { ptr_at::<[u8; 4]>(p.l4, end, 8) }) else {
        return;
    };
    let len = p.l4_len as usize;
    let mut c = crc32c::from_wire(unsafe { *crc });
    // Constant indexes only (an index computed at run time makes LLVM
    // address the stack array with an OR, which the verifier refuses).
    if v6 {
        let mut w = 0;
        while w < 4 {
            c = rewrite_word(p, end, off + 4 * w, len, old[w], new[w], c);
            w += 1;
        }
    } else {
        c = rewrite_word(p, end, off, len, old[3], new[3], c);
    }
    unsafe { *crc = crc32c::to_wire(c) };
}

/// Write one 32-bit word at `o` (from the SCTP header) if it changes, and
/// return the CRC32c updated for it.
#[inline(always)]
fn rewrite_word(p: &Pkt, end: usize, o: usize, len: usize, a: u32, b: u32, c: u32) -> u32 {
    if a == b || o + 4 > len {
        return c;
    }
    match unsafe { ptr_at::<u32>(p.l4, end, bounded(o)) } {
        Some(dst) => {
            unsafe { *dst = b };
            crc32c::adjust_fast_u32_nb(c, a ^ b, (len - o - 4) as u16)
        }
        None => c,
    }
}

/// INIT-ACK from the endpoint (reply direction, session `v`): rewrite its
/// address parameters to the rule's VIPs, record the paths, and make the
/// reply sessions for them. (A BPF subprogram: its own stack frame.)
#[inline(never)]
pub fn on_init_ack(p: &Pkt, end: usize, v: *const CtVal, now: u64) {
    if p.sctp & sctp_ev::INIT_ACK == 0 {
        return;
    }
    let (Some(ctag), Some(etag)) = (vtag(p, end), initiate_tag(p, end)) else {
        return;
    };
    let rule_id = unsafe { (*v).rule_id };
    let Some(rv) = LB_RULE_VIPS.get_ptr(&rule_id) else {
        return;
    };
    let rv = unsafe { &*rv };
    let Some(found) = LB_SCTP_ASSOC.get_ptr(&AssocKey {
        rule_id,
        vtag: ctag,
    }) else {
        return;
    };
    let Some(a) = LB_SCRATCH_ASSOC.get_ptr_mut(0) else {
        return;
    };
    let a = unsafe {
        copy_words(a, found);
        &mut *a
    };
    let source = p.saddr;
    let used = a.vips[0];
    let n_vips = rv.n as usize;
    // The rule's VIPs other than the one in use, in order, go to the
    // endpoint's other addresses in the order it lists them.
    // (The cursor lives in the scratch record, not a register, so it does
    // not split the verifier's states either.)
    a._pad2 = 0;
    walk_params(p, end, |addr, _| {
        if addr == source {
            return Some(used);
        }
        let mut vip = used;
        let mut tries = 0;
        while tries < MAX_RULE_VIPS {
            let next = a._pad2 as usize;
            if next < n_vips && next < MAX_RULE_VIPS {
                let cand = rv.vips[core::hint::black_box(next) & (MAX_RULE_VIPS - 1)];
                a._pad2 += 1;
                if cand != used {
                    vip = cand;
                    break;
                }
            }
            tries += 1;
        }
        let n = a.n_pairs as usize;
        if vip != used && n < MAX_RULE_VIPS {
            crate::set_addr(&mut a.eps[n & (MAX_RULE_VIPS - 1)], &addr);
            crate::set_addr(&mut a.vips[n & (MAX_RULE_VIPS - 1)], &vip);
            a.n_pairs += 1;
        }
        // (More endpoint addresses than VIPs: the first VIP again.)
        Some(vip)
    });
    let _ = LB_SCTP_ASSOC.insert(
        &AssocKey {
            rule_id,
            vtag: etag,
        },
        &*a,
        0,
    );
    let _ = LB_SCTP_ASSOC.insert(
        &AssocKey {
            rule_id,
            vtag: ctag,
        },
        &*a,
        0,
    );
    // Reply sessions: every (endpoint address, client address) but the
    // ones the INIT made (pair 0).
    let mut k = 1;
    while k < MAX_RULE_VIPS {
        if k < a.n_pairs as usize {
            let mut i = 0;
            while i < MAX_RULE_VIPS {
                if i < a.n_clients as usize {
                    add_reply(a, k, i, v, now);
                }
                i += 1;
            }
        }
        k += 1;
    }
}
