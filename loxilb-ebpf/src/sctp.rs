//! SCTP multihoming (modes default and fullnat): one association over
//! several paths, each path a (client address, VIP) pair on the client's
//! side and an (endpoint address, client address as the endpoint sees it)
//! pair on the endpoint's side.
//!
//! - INIT (client -> VIP, on its session): the association is recorded
//!   under the client's initiate tag with the client's addresses (the
//!   INIT's source and address parameters; in fullnat rewritten to the
//!   VIPs, which is how the endpoint sees them). Addresses the rule would
//!   not take a client from, and the load balancer's own, are hidden.
//! - INIT-ACK (endpoint -> client, on the association's first path): its
//!   address parameters (the endpoint's addresses) are rewritten to the
//!   rule's VIPs, so the client only ever sees the load balancer: the
//!   INIT-ACK's own source stays paired with the VIP the association
//!   started on, each other endpoint address gets the next VIP. The record
//!   is stored under the endpoint's initiate tag too, and both sessions of
//!   every (endpoint address, client address) path made. The CRC32c is
//!   updated for each rewritten word.
//! - Default mode: a packet of the association arriving at a VIP on a path
//!   whose sessions expired (client -> VIP k): found by its verification
//!   tag, sent to the endpoint address paired with VIP k (`path_endpoint`).
//! - ABORT / SHUTDOWN COMPLETE on any path close every path and drop the
//!   records; an INIT with another tag on a session of an association
//!   starts afresh (`lb::process_sctp`).
//!
//! A record is found by a tag, which another session could guess or copy:
//! every use checks that the packet is on one of the record's paths
//! (`on_path`), and a record is never replaced by another association's.
//!
//! The walk over the chunk's parameters is a chain of tail calls, one
//! parameter per call (`param_step`): the verifier then checks one
//! parameter's handling once, instead of every combination of what the
//! parameters before it were. The walk's state lives in a per-CPU scratch
//! record (`SctpWalk`) between the calls. Bounded everywhere: at most
//! `MAX_PARAMS` parameters are looked at, 4 addresses per side kept.

use loxilb_common::{
    crc32c, ct_dir, ct_state, lb_mode, sctp_walk, svc_flags, AssocKey, AssocVal, CtKey, CtVal,
    SctpWalk, SvcKey, IPPROTO_SCTP, JMP_SCTP4, JMP_SCTP6, JMP_SCTP_PARAM, MAX_RULE_VIPS,
};

use aya_ebpf::bindings::BPF_NOEXIST;

use crate::{
    ctx::PktCtx,
    maps::{
        ep_active_add, src_allowed, LB_CT, LB_RULE_VIPS, LB_SCRATCH_ASSOC, LB_SCRATCH_CT,
        LB_SCRATCH_WALK, LB_SCTP_ASSOC, LB_SERVICES, LB_VIPS,
    },
    parse::{ptr_at, Pkt},
};

const CHUNK_INIT: u8 = 1;
const CHUNK_INIT_ACK: u8 = 2;
const PARAM_IPV4: u16 = 5;
const PARAM_IPV6: u16 = 6;
/// Parameters looked at (a tail call each; a packet may make 33 in all).
const MAX_PARAMS: u8 = 16;
/// INIT / INIT-ACK: chunk header (4) + fixed fields (16).
const INIT_FIXED: usize = 20;
/// The first chunk starts after the 12-byte common header.
const CHUNK0: usize = 12;
/// The type an address parameter of the wrong family is given: unknown to
/// receivers, which skip it (high bits 10: skip, do not report).
const HIDDEN_PARAM: u16 = 0xbfff;
/// Parameters are looked at within this many bytes of the SCTP header.
const WALK_LIMIT: usize = 2048;

/// The packet's verification tag (network order, as loaded).
#[inline(always)]
pub fn vtag(p: &Pkt, end: usize) -> Option<u32> {
    unsafe { ptr_at::<u32>(p.l4, end, 4).map(|t| *t) }
}

/// The initiate tag of the packet's INIT / INIT-ACK chunk (the first).
#[inline(always)]
pub fn initiate_tag(p: &Pkt, end: usize) -> Option<u32> {
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
    // (In fullnat the endpoint knows the client by the addresses and port
    // the association's sessions gave it; a new session would pick others.
    // Its paths' sessions are all made at the INIT-ACK and kept alive by
    // heartbeats.)
    if a.mode != lb_mode::DEFAULT {
        return None;
    }
    // Only the association's own client, from its own port, to its port
    // (a tag alone is a guess away).
    // (Not `on_path`: the new-flow program has no stack to spare for
    // the call.)
    if p.sport != a.cport || p.dport != a.vport || !in_list(&a.clients, a.n_clients, &p.saddr) {
        return None;
    }
    let mut k = 0;
    while k < MAX_RULE_VIPS {
        if k < a.n_pairs as usize && a.vips[k] == p.daddr {
            return Some((&a.eps[k], a.ep_port, a.ep_stat));
        }
        k += 1;
    }
    Some((&a.eps[0], a.ep_port, a.ep_stat))
}

/// Whether `x` is among the first `n` of `l`.
#[inline(always)]
fn in_list(l: &[[u32; 4]; MAX_RULE_VIPS], n: u8, x: &[u32; 4]) -> bool {
    let mut k = 0;
    while k < MAX_RULE_VIPS {
        if k < n as usize && l[k] == *x {
            return true;
        }
        k += 1;
    }
    false
}

/// Whether packet `p` is on a path of association `a`, from either side:
/// a client address and port to a VIP and the service port, or an
/// endpoint address and port to the client as the endpoint sees it. (A
/// record is found by a verification tag; this is what ties it to the
/// packet's own association. A BPF subprogram: callers are at the stack
/// limit.)
#[inline(never)]
fn on_path(a: &AssocVal, p: &Pkt) -> bool {
    (p.sport == a.cport
        && p.dport == a.vport
        && in_list(&a.clients, a.n_clients, &p.saddr)
        && in_list(&a.vips, a.n_vips, &p.daddr))
        || (p.sport == a.ep_port
            && p.dport == a.xcport
            && in_list(&a.eps, a.n_pairs, &p.saddr)
            && in_list(&a.xclients, a.n_clients, &p.daddr))
}

/// Whether records `x` and `a` are of the association started on the same
/// first path (the same client address and port to the same VIP and port).
#[inline(always)]
fn same_first_path(x: &AssocVal, a: &AssocVal) -> bool {
    x.clients[0] == a.clients[0]
        && x.cport == a.cport
        && x.vips[0] == a.vips[0]
        && x.vport == a.vport
}

/// Record `a` under `tag` unless another association holds that tag (an
/// honest collision of random tags, or a forged one): that record stays.
#[inline(always)]
fn record(rule_id: u32, tag: u32, a: &AssocVal) {
    let key = AssocKey { rule_id, vtag: tag };
    if let Some(x) = LB_SCTP_ASSOC.get_ptr(&key) {
        if !same_first_path(unsafe { &*x }, a) {
            return;
        }
    }
    let _ = LB_SCTP_ASSOC.insert(&key, a, 0);
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

/// `a.vips`: `first` (the VIP the association starts on), then the rule's
/// other VIPs in rule order.
#[inline(always)]
fn order_vips(a: &mut AssocVal, first: &[u32; 4], rule_id: u32) {
    crate::set_addr(&mut a.vips[0], first);
    a.n_vips = 1;
    let Some(rv) = LB_RULE_VIPS.get_ptr(&rule_id) else {
        return;
    };
    let n = unsafe { (*rv).n } as usize;
    let mut j = 0;
    while j < MAX_RULE_VIPS {
        if j < n {
            // (black_box: LLVM drops a mask it can prove redundant; the
            // verifier cannot follow its proof.)
            let cand = unsafe { &(*rv).vips[core::hint::black_box(j) & (MAX_RULE_VIPS - 1)] };
            let m = a.n_vips as usize;
            if cand != first && m < MAX_RULE_VIPS {
                crate::set_addr(&mut a.vips[m & (MAX_RULE_VIPS - 1)], cand);
                a.n_vips += 1;
            }
        }
        j += 1;
    }
}

/// Start the walk for an INIT or INIT-ACK that has session `v` (called by
/// the family's SCTP program): set up the association record and the walk
/// state, then hand over to the parameter program. Returns when there is
/// nothing to record (not a multihomed rule, no association for an
/// INIT-ACK) or the parameter program is not loaded: the caller then
/// translates and forwards the packet as it is.
#[inline(always)]
pub fn begin<C: PktCtx>(ctx: &C, p: &Pkt, end: usize, v: *mut CtVal, now: u64) {
    let Some(tag) = initiate_tag(p, end) else {
        return;
    };
    let Some(clen) = (unsafe { ptr_at::<[u8; 4]>(p.l4, end, CHUNK0) }) else {
        return;
    };
    // The walk reads from the first chunk: it must be the INIT / INIT-ACK
    // (RFC 9260 bundles neither with another chunk).
    let first = unsafe { (*clen)[0] };
    // (The walk keeps the SCTP header's offset in 9 bits.)
    let l4_off = p.l4 - ctx.data();
    if l4_off > 0x1ff {
        return;
    }
    let chunk_end = CHUNK0 + u16::from_be_bytes(unsafe { [(*clen)[2], (*clen)[3]] }) as usize;
    let rule_id = unsafe { (*v).rule_id };
    // Only rules with more than one VIP are multihomed.
    match LB_RULE_VIPS.get_ptr(&rule_id) {
        Some(r) if unsafe { (*r).n } > 1 => {}
        _ => return,
    }
    let (Some(a), Some(w)) = (
        LB_SCRATCH_ASSOC.get_ptr_mut(0),
        LB_SCRATCH_WALK.get_ptr_mut(0),
    ) else {
        return;
    };
    let (a, w) = unsafe {
        crate::zero_in_place(w);
        (&mut *a, &mut *w)
    };
    let forward = unsafe { (*v).dir } == ct_dir::FORWARD;
    if forward {
        if first != CHUNK_INIT {
            return;
        }
        // The session belongs to this association from now on (an INIT
        // with another tag on it starts afresh: see `lb::process_sctp`).
        unsafe { (*v).sctp_tag = tag };
        unsafe { crate::zero_in_place(a) };
        crate::set_addr(&mut a.eps[0], unsafe { &(*v).xdaddr });
        crate::set_addr(&mut a.clients[0], &p.saddr);
        crate::set_addr(&mut a.xclients[0], unsafe { &(*v).xsaddr });
        a.ep_port = unsafe { (*v).xdport };
        a.vport = p.dport;
        a.cport = p.sport;
        a.xcport = unsafe { (*v).xsport };
        a.n_pairs = 1;
        a.n_clients = 1;
        a.ep_stat = unsafe { (*v).ep_stat };
        a.mode = unsafe { (*v).mode };
        a.ctag = tag;
        order_vips(a, &p.daddr, rule_id);
        w.kind = sctp_walk::INIT;
        let svc = SvcKey {
            addr: p.daddr,
            port: p.dport,
            proto: IPPROTO_SCTP,
            _pad: 0,
        };
        if let Some(sv) = LB_SERVICES.get_ptr(&svc) {
            w.ranges = unsafe { (*sv).flags } & svc_flags::SRC_RANGES;
        }
    } else {
        if first != CHUNK_INIT_ACK {
            return;
        }
        // The association the client's INIT recorded, under the client's
        // tag (this packet's verification tag).
        let Some(ctag) = vtag(p, end) else {
            return;
        };
        let Some(found) = LB_SCTP_ASSOC.get_ptr(&AssocKey {
            rule_id,
            vtag: ctag,
        }) else {
            return;
        };
        // Only on the association's own path: a packet bearing the
        // client's tag on another session (a guess, or a forgery) does not
        // get to rewrite the record.
        if !on_path(unsafe { &*found }, p) {
            return;
        }
        unsafe { copy_words(a, found) };
        // The pairs are this INIT-ACK's (a retransmitted one lists the
        // same addresses again).
        a.n_pairs = 1;
        a.etag = tag;
        crate::set_addr(&mut w.source, &p.saddr);
        w.tag_b = ctag;
        w.kind = sctp_walk::INIT_ACK;
    }
    w.tag_a = tag;
    w.now = now;
    w.rule_id = rule_id;
    w.timeout_s = unsafe { (*v).timeout_s };
    w.mode = unsafe { (*v).mode };
    w.l4_off = l4_off as u16;
    w.off = (CHUNK0 + INIT_FIXED) as u16;
    w.chunk_end = chunk_end.min(p.l4_len as usize).min(WALK_LIMIT) as u16;
    w.l4_len = p.l4_len as u16;
    w.v6 = p.v6 as u8;
    w.stage = sctp_walk::WALKING;
    ctx.tail_call(JMP_SCTP_PARAM);
    // Not loaded: no walk.
    w.stage = 0;
}

/// Whether the walk of this packet is over (the SCTP program entered again
/// by the parameter program); consumes the mark.
#[inline(always)]
pub fn walk_done() -> bool {
    match LB_SCRATCH_WALK.get_ptr_mut(0) {
        Some(w) => unsafe {
            if (*w).stage == sctp_walk::DONE {
                (*w).stage = 0;
                true
            } else {
                false
            }
        },
        None => false,
    }
}

/// The parameter program: one parameter of the INIT / INIT-ACK per call,
/// then itself again; at the end the association is recorded, the reply
/// sessions made, and the family's SCTP program entered again to translate
/// and forward. Returns only when a tail call could not be made (or the
/// program was entered outside a walk): the packet is then dropped.
#[inline(always)]
pub fn param_step<C: PktCtx>(ctx: &C) {
    let (Some(a), Some(w)) = (
        LB_SCRATCH_ASSOC.get_ptr_mut(0),
        LB_SCRATCH_WALK.get_ptr_mut(0),
    ) else {
        return;
    };
    let (a, w) = unsafe { (&mut *a, &mut *w) };
    if w.stage != sctp_walk::WALKING {
        return;
    }
    if w.idx < MAX_PARAMS && one_param(ctx, a, w) {
        w.idx += 1;
        ctx.tail_call(JMP_SCTP_PARAM);
        w.stage = 0;
        return;
    }
    finish(a, w);
    w.stage = sctp_walk::DONE;
    ctx.tail_call(if w.v6 != 0 { JMP_SCTP6 } else { JMP_SCTP4 });
    w.stage = 0;
}

/// Look at the parameter at `w.off` and move past it; `false` when there
/// is none (the chunk ends, or a length is wrong).
#[inline(always)]
fn one_param<C: PktCtx>(ctx: &C, a: &mut AssocVal, w: &mut SctpWalk) -> bool {
    let end = ctx.data_end();
    // (Offsets masked: the verifier checks packet accesses only at offsets
    // it knows are below 64 KiB.)
    let l4 = ctx.data() + (w.l4_off as usize & 0x1ff);
    let chunk_end = w.chunk_end as usize;
    // (Checked before the mask: `chunk_end` is at most `WALK_LIMIT`, so
    // the mask changes nothing that passes.)
    if w.off as usize + 4 > chunk_end {
        return false;
    }
    let off = w.off as usize & (WALK_LIMIT - 1);
    let Some(h) = (unsafe { ptr_at::<[u8; 4]>(l4, end, off) }) else {
        return false;
    };
    let (t, len) = unsafe {
        (
            u16::from_be_bytes([(*h)[0], (*h)[1]]),
            u16::from_be_bytes([(*h)[2], (*h)[3]]) as usize,
        )
    };
    if len < 4 || off + len > chunk_end {
        return false;
    }
    w.off = (off + ((len + 3) & !3)) as u16;
    let v6 = if t == PARAM_IPV4 && len == 8 {
        false
    } else if t == PARAM_IPV6 && len == 20 {
        true
    } else {
        return true;
    };
    let at = off + 4;
    if v6 == loxilb_common::is_v4(&a.vips[0]) {
        // An address of the other family than the service's: the other
        // side could only reach it around the load balancer. Hidden: the
        // parameter's type becomes one receivers skip without a report
        // (RFC 9260 3.2.1, high bits 10).
        hide_param(l4, end, off, w.l4_len as usize, h);
        return true;
    }
    let addr = unsafe {
        if v6 {
            match ptr_at::<[u32; 4]>(l4, end, at) {
                Some(x) => *x,
                None => return false,
            }
        } else {
            match ptr_at::<u32>(l4, end, at) {
                Some(x) => loxilb_common::v4_mapped(*x),
                None => return false,
            }
        }
    };
    let new = if w.kind == sctp_walk::INIT {
        // A client address: shown to the endpoint as `xclients[n]` (itself
        // in default mode, the n-th VIP in fullnat).
        if addr == a.clients[0] {
            Some(a.xclients[0])
        } else {
            // Not an address the rule would take a client from, or one of
            // the load balancer's own: no path for it (hidden).
            let refused = (w.ranges != 0 && !src_allowed(w.rule_id, &addr))
                || LB_VIPS.get_ptr(&addr).is_some();
            let n = if refused {
                MAX_RULE_VIPS
            } else {
                a.n_clients as usize
            };
            let room = if a.mode == lb_mode::FULLNAT {
                a.n_vips as usize
            } else {
                MAX_RULE_VIPS
            };
            if n < room && n < MAX_RULE_VIPS {
                let n = n & (MAX_RULE_VIPS - 1);
                let x = if a.mode == lb_mode::FULLNAT {
                    a.vips[n]
                } else {
                    addr
                };
                crate::set_addr(&mut a.clients[n], &addr);
                crate::set_addr(&mut a.xclients[n], &x);
                a.n_clients += 1;
                Some(x)
            } else {
                None
            }
        }
    } else if addr == w.source {
        // INIT-ACK: the endpoint address it came from stays paired with
        // the VIP the association started on; each other one gets the
        // next VIP.
        Some(a.vips[0])
    } else {
        let k = a.n_pairs as usize;
        if k < a.n_vips as usize && k < MAX_RULE_VIPS {
            let k = k & (MAX_RULE_VIPS - 1);
            crate::set_addr(&mut a.eps[k], &addr);
            a.n_pairs += 1;
            Some(a.vips[k])
        } else {
            None
        }
    };
    match new {
        Some(new) => rewrite_addr(l4, end, at, w.l4_len as usize, v6, &addr, &new),
        // No address of the load balancer to show for it: hidden.
        None => hide_param(l4, end, off, w.l4_len as usize, h),
    }
    true
}

/// Give the parameter at `off` (header `h`) a type receivers skip without
/// a report (RFC 9260 3.2.1: high bits 10), so the other side never sees
/// its address.
#[inline(always)]
fn hide_param(l4: usize, end: usize, off: usize, len: usize, h: *mut [u8; 4]) {
    let old = unsafe { core::ptr::read_unaligned(h as *const u32) };
    let mut new = old;
    unsafe { *(&mut new as *mut u32 as *mut [u8; 2]) = HIDDEN_PARAM.to_be_bytes() };
    patch_word(l4, end, off, len, old, new);
}

/// Write `new` over the address at `at` (from the SCTP header at `l4`) and
/// update the CRC32c for each changed word.
#[inline(always)]
fn rewrite_addr(
    l4: usize,
    end: usize,
    at: usize,
    len: usize,
    v6: bool,
    old: &[u32; 4],
    new: &[u32; 4],
) {
    let Some(crc) = (unsafe { ptr_at::<[u8; 4]>(l4, end, 8) }) else {
        return;
    };
    let mut c = crc32c::from_wire(unsafe { *crc });
    // Constant indexes only (an index computed at run time makes LLVM
    // address the stack array with an OR, which the verifier refuses).
    if v6 {
        c = rewrite_word(l4, end, at, len, old[0], new[0], c);
        c = rewrite_word(l4, end, at + 4, len, old[1], new[1], c);
        c = rewrite_word(l4, end, at + 8, len, old[2], new[2], c);
        c = rewrite_word(l4, end, at + 12, len, old[3], new[3], c);
    } else {
        c = rewrite_word(l4, end, at, len, old[3], new[3], c);
    }
    unsafe { *crc = crc32c::to_wire(c) };
}

/// Write one 32-bit word at `o` (from the SCTP header at `l4`) and update
/// the CRC32c for it.
#[inline(always)]
fn patch_word(l4: usize, end: usize, o: usize, len: usize, old: u32, new: u32) {
    let Some(crc) = (unsafe { ptr_at::<[u8; 4]>(l4, end, 8) }) else {
        return;
    };
    let c = rewrite_word(
        l4,
        end,
        o,
        len,
        old,
        new,
        crc32c::from_wire(unsafe { *crc }),
    );
    unsafe { *crc = crc32c::to_wire(c) };
}

/// Write one 32-bit word at `o` (from the SCTP header) if it changes, and
/// return the CRC32c updated for it.
#[inline(always)]
fn rewrite_word(l4: usize, end: usize, o: usize, len: usize, a: u32, b: u32, c: u32) -> u32 {
    if a == b || o + 4 > len {
        return c;
    }
    match unsafe { ptr_at::<u32>(l4, end, o & (WALK_LIMIT - 1)) } {
        Some(dst) => {
            unsafe { *dst = b };
            crc32c::adjust_fast_u32_nb(c, a ^ b, (len - o - 4) as u16)
        }
        None => c,
    }
}

/// After the walk: record the association (INIT: under the client's tag;
/// INIT-ACK: under both tags, and the sessions of every path).
#[inline(always)]
fn finish(a: &AssocVal, w: &SctpWalk) {
    if w.kind == sctp_walk::INIT {
        record(w.rule_id, w.tag_a, a);
        return;
    }
    // Under the client's tag (the record `begin` checked this packet
    // against) and the endpoint's.
    let _ = LB_SCTP_ASSOC.insert(
        &AssocKey {
            rule_id: w.rule_id,
            vtag: w.tag_b,
        },
        a,
        0,
    );
    record(w.rule_id, w.tag_a, a);
    // Every (endpoint address k, client address i) but the pair the
    // association started on, which has its sessions.
    each_path(a, |k, i| {
        if (k | i) != 0 {
            add_path(a, w, k, i);
        }
    });
}

/// `f(k, i)` for every path of `a`: endpoint address `k` x client address
/// `i` (both < 4).
#[inline(always)]
fn each_path(a: &AssocVal, mut f: impl FnMut(usize, usize)) {
    let mut k = 0;
    while k < MAX_RULE_VIPS {
        if k < a.n_pairs as usize {
            let mut i = 0;
            while i < MAX_RULE_VIPS {
                if i < a.n_clients as usize {
                    f(k, i);
                }
                i += 1;
            }
        }
        k += 1;
    }
}

/// The conntrack keys of path (endpoint address `k`, client address `i`),
/// written in place: the client's packets `clients[i]:cport ->
/// vips[k]:vport` (`fwd`) and the endpoint's `eps[k]:ep_port ->
/// xclients[i]:xcport` (`rev`). (`k`, `i` < 4. In place, not returned: a
/// returned pair costs another 80 bytes of a stack at its limit.)
#[inline(always)]
fn path_keys(a: &AssocVal, k: usize, i: usize, fwd: &mut CtKey, rev: &mut CtKey) {
    for (key, saddr, daddr, sport, dport) in [
        (fwd, &a.clients[i], &a.vips[k], a.cport, a.vport),
        (rev, &a.eps[k], &a.xclients[i], a.ep_port, a.xcport),
    ] {
        crate::set_addr(&mut key.saddr, saddr);
        crate::set_addr(&mut key.daddr, daddr);
        key.sport = sport;
        key.dport = dport;
        key.proto = IPPROTO_SCTP;
        key._pad1 = 0;
        key._pad2 = 0;
    }
}

/// The two sessions of path (endpoint address `k`, client address `i`) of
/// association `a`: the client's packets `clients[i]:cport -> vips[k]:vport`
/// become `xclients[i]:xcport -> eps[k]:ep_port`, and the endpoint's
/// packets the other way back. Never replaces a live entry. (A BPF
/// subprogram: verified once per call site, not inlined into every loop
/// iteration.)
#[inline(never)]
fn add_path(a: &AssocVal, w: &SctpWalk, k: usize, i: usize) {
    let k = k & (MAX_RULE_VIPS - 1);
    let i = i & (MAX_RULE_VIPS - 1);
    let (ep, vip, client, xclient) = (&a.eps[k], &a.vips[k], &a.clients[i], &a.xclients[i]);
    let (Some(rv), Some(fv)) = (LB_SCRATCH_CT.get_ptr_mut(0), LB_SCRATCH_CT.get_ptr_mut(1)) else {
        return;
    };
    let (mut fwd, mut rev) = (CtKey::default(), CtKey::default());
    path_keys(a, k, i, &mut fwd, &mut rev);
    // Each entry's translated tuple, reversed, is the other's key.
    for (val, dir, xs, xd, xsp, xdp) in [
        (rv, ct_dir::REPLY, vip, client, a.vport, a.cport),
        (fv, ct_dir::FORWARD, xclient, ep, a.xcport, a.ep_port),
    ] {
        unsafe {
            crate::zero_in_place(val);
            crate::set_addr(&mut (*val).xsaddr, xs);
            crate::set_addr(&mut (*val).xdaddr, xd);
            (*val).xsport = xsp;
            (*val).xdport = xdp;
            (*val).rule_id = w.rule_id;
            (*val).timeout_s = w.timeout_s;
            (*val).last_seen_ns = w.now;
            (*val).dir = dir;
            // (Paths are not sessions of their own on the endpoint: the
            // association counts once, by the session it started on.)
            (*val).state = ct_state::RELEASED;
            (*val).sctp_tag = a.ctag;
            (*val).mode = w.mode;
            (*val).ep_stat = a.ep_stat;
        }
    }
    // Reply entry first, so a fast reply never finds half a path.
    if LB_CT
        .insert(&rev, unsafe { &*rv }, BPF_NOEXIST as u64)
        .is_ok()
    {
        let _ = LB_CT.insert(&fwd, unsafe { &*fv }, BPF_NOEXIST as u64);
    }
}

/// An ABORT or SHUTDOWN COMPLETE of a multihomed association (the packet's
/// own session is closed by conntrack): every other path of the
/// association closes too, as an RST closes a TCP session (10 s to live, a
/// new INIT on a tuple starts afresh).
#[inline(always)]
pub fn close_paths(p: &Pkt, rule_id: u32, tag: u32) {
    let key = AssocKey { rule_id, vtag: tag };
    let Some(a) = LB_SCTP_ASSOC.get_ptr(&key) else {
        return;
    };
    let a = unsafe { &*a };
    // Only from the association's own paths (a tag alone is a guess away).
    if !on_path(a, p) {
        return;
    }
    each_path(a, |k, i| close_path(a, k, i));
    // The association is over: its records go (read before the first
    // removal frees the value).
    let (ctag, etag) = (a.ctag, a.etag);
    for t in [ctag, etag] {
        if t != 0 {
            let _ = LB_SCTP_ASSOC.remove(&AssocKey { rule_id, vtag: t });
        }
    }
}

/// Close both sessions of path (endpoint address `k`, client address `i`);
/// the endpoint stops counting the association as active once. (A BPF
/// subprogram, like `add_path`.)
#[inline(never)]
fn close_path(a: &AssocVal, k: usize, i: usize) {
    let (mut fwd, mut rev) = (CtKey::default(), CtKey::default());
    path_keys(
        a,
        k & (MAX_RULE_VIPS - 1),
        i & (MAX_RULE_VIPS - 1),
        &mut fwd,
        &mut rev,
    );
    let (Some(f), Some(r)) = (LB_CT.get_ptr_mut(&fwd), LB_CT.get_ptr_mut(&rev)) else {
        return;
    };
    unsafe {
        let st = (*f).state | (*r).state;
        if st & ct_state::RELEASED == 0 {
            ep_active_add((*f).ep_stat, -1);
        }
        let st = st | ct_state::RST | ct_state::CLOSING | ct_state::RELEASED;
        for v in [f, r] {
            (*v).state = st;
            (*v).timeout_s = loxilb_common::CT_CLOSE_TIMEOUT_S;
        }
    }
}
