//! Forwarding of translated packets: `bpf_fib_lookup` and redirect, or the
//! kernel stack when the FIB cannot answer (no neighbour yet, local
//! destination, forwarding disabled, VLAN-tagged frames). DSR frames go to
//! the endpoint's MAC untranslated, or IPIP-encapsulated to it.
//!
//! XDP can only transmit through devices that take XDP frames: a bridge,
//! a bond, a VLAN or tunnel device, or a veth whose peer has no XDP
//! program nor GRO would drop a redirected frame silently. The agent
//! classifies every device (`LB_DEV_FWD`); a packet whose egress device is
//! not marked for redirect goes to the stack untouched by the forwarding
//! step (no MAC or TTL rewrite) and is counted (`fwd_stack_device`).
//!
//! The FIB answer (egress interface and both MACs) is cached in the
//! session's conntrack entry for `NH_CACHE_NS`, so an established flow pays
//! for one FIB lookup per second instead of one per packet. When the agent
//! found the node's routing plain (`cfg_flags::EP_NH_CACHE`), the answer
//! toward an endpoint is also kept per endpoint (`LB_EP_NH`), so the first
//! packet of a new session to it pays for no FIB lookup either (nor for
//! reading its new entry back to cache it there: the session's next packet
//! caches it from the endpoint's), and a session toward it refreshes its
//! own from there.

use core::mem::size_of;

use aya_ebpf::{
    bindings::{bpf_fib_lookup as FibParams, BPF_FIB_LOOKUP_SRC},
    helpers::bpf_fib_lookup,
};
use loxilb_common::{
    cfg_flags, csum, ct_dir, dev_fwd, ep_nh_flags, is_v4, nh_fresh, nh_tick, stat, v4_mapped, Addr,
    CtVal, EpNh, EpSrc, NextHop, NH_CACHE_NS, NH_CACHE_TICKS,
};

use crate::{
    ctx::{PktCtx, Verdict},
    maps::{count, LB_CONFIG, LB_DEV_FWD, LB_EP_NH, LB_EP_SRC, LB_SCRATCH_FIB},
    parse::{ptr_at, Pkt, ETH_HLEN},
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const RET_SUCCESS: i64 = 0;
const RET_NO_NEIGH: i64 = 7;
const RET_FRAG_NEEDED: i64 = 8;
const IPPROTO_IPIP: u8 = 4;

/// A FIB answer.
pub struct Fib {
    pub rc: i64,
    pub ifindex: u32,
    /// [dst MAC, src MAC] as 16-bit words.
    pub macs: [u16; 6],
    /// Source address the kernel would use (with `BPF_FIB_LOOKUP_SRC`).
    pub src: Addr,
    /// The next hop: `dst` itself when directly connected, else the gateway.
    pub nexthop: Addr,
}

/// Look `src -> dst` (both of one family; all-zero `src` = any) up in the
/// FIB as a packet of `p`'s protocol and ports. `tot_len` is the packet's
/// length from its IP header (for the MTU check).
#[inline(always)]
pub fn fib<C: PktCtx>(ctx: &C, p: &Pkt, tot_len: u16, src: &Addr, dst: &Addr, flags: u32) -> Fib {
    // In per-CPU scratch (the stack cannot spare 64 bytes), zeroed with
    // word stores (`mem::zeroed()` would become a memset call in BPF).
    let Some(params) = LB_SCRATCH_FIB.get_ptr_mut(0) else {
        return Fib {
            rc: -1,
            ifindex: 0,
            macs: [0; 6],
            src: [0; 4],
            nexthop: [0; 4],
        };
    };
    let params = unsafe {
        crate::zero_in_place(params);
        &mut *params
    };
    let v4 = is_v4(dst);
    params.l4_protocol = p.proto;
    params.sport = p.sport;
    params.dport = p.dport;
    params.__bindgen_anon_1.tot_len = tot_len;
    if v4 {
        params.family = AF_INET;
        params.__bindgen_anon_3.ipv4_src = src[3];
        params.__bindgen_anon_4.ipv4_dst = dst[3];
    } else {
        params.family = AF_INET6;
        // Word by word, volatile: a constant (zero) source would otherwise
        // become a memset call.
        unsafe {
            let s = params.__bindgen_anon_3.ipv6_src.as_mut_ptr();
            let d = params.__bindgen_anon_4.ipv6_dst.as_mut_ptr();
            let mut i = 0;
            while i < 4 {
                core::ptr::write_volatile(s.add(i), src[i]);
                core::ptr::write_volatile(d.add(i), dst[i]);
                i += 1;
            }
        }
    }
    params.ifindex = ctx.ifindex();
    let rc = unsafe { bpf_fib_lookup(ctx.raw(), params, size_of::<FibParams>() as i32, flags) };
    let d = params.dmac;
    let s = params.smac;
    unsafe {
        Fib {
            rc,
            ifindex: params.ifindex,
            macs: [
                u16::from_ne_bytes([d[0], d[1]]),
                u16::from_ne_bytes([d[2], d[3]]),
                u16::from_ne_bytes([d[4], d[5]]),
                u16::from_ne_bytes([s[0], s[1]]),
                u16::from_ne_bytes([s[2], s[3]]),
                u16::from_ne_bytes([s[4], s[5]]),
            ],
            src: if v4 {
                v4_mapped(params.__bindgen_anon_3.ipv4_src)
            } else {
                params.__bindgen_anon_3.ipv6_src
            },
            nexthop: if v4 {
                v4_mapped(params.__bindgen_anon_4.ipv4_dst)
            } else {
                params.__bindgen_anon_4.ipv6_dst
            },
        }
    }
}

/// The node's own address toward `ep` (the source of an onearm or NAT64
/// session), if it has a route: the one kept for endpoint slot `slot`
/// (`LB_EP_SRC`) when the agent allows it (`cfg_flags::EP_NH_CACHE`) and
/// it matches, else the FIB's, then kept there.
#[inline(always)]
pub fn src_toward<C: PktCtx>(ctx: &C, p: &Pkt, ep: &Addr, slot: u32, now: u64) -> Option<Addr> {
    let keep = cfg() & cfg_flags::EP_NH_CACHE != 0;
    if keep {
        if let Some(e) = LB_EP_SRC.get_ptr(slot) {
            unsafe {
                if now < (*e).expiry_ns && (*e).in_ifindex == ctx.ifindex() && (*e).dst == *ep {
                    return Some((*e).src);
                }
            }
        }
    }
    let f = fib(ctx, p, 0, &[0; 4], ep, BPF_FIB_LOOKUP_SRC);
    let has_src = if is_v4(&f.src) {
        f.src[3] != 0
    } else {
        f.src != [0; 4]
    };
    if (f.rc == RET_SUCCESS || f.rc == RET_NO_NEIGH) && has_src {
        if keep {
            if let Some(e) = LB_EP_SRC.get_ptr_mut(slot) {
                unsafe {
                    *e = EpSrc {
                        dst: *ep,
                        src: f.src,
                        expiry_ns: now + NH_CACHE_NS,
                        in_ifindex: ctx.ifindex(),
                        _pad: 0,
                    };
                }
            }
        }
        Some(f.src)
    } else {
        None
    }
}

/// The agent's `cfg_flags`.
#[inline(always)]
fn cfg() -> u32 {
    match LB_CONFIG.get_ptr(0) {
        Some(c) => unsafe { (*c).flags },
        None => 0,
    }
}

/// Whether this hook can transmit through `ifindex`: always from TC (its
/// redirect is an ordinary transmit), from XDP only through a device the
/// agent marked (`LB_DEV_FWD`).
#[inline(always)]
fn can_send<C: PktCtx>(ifindex: u32) -> bool {
    if !C::XDP {
        return true;
    }
    match LB_DEV_FWD.get_ptr(&ifindex) {
        Some(d) => unsafe { (*d).mode == dev_fwd::REDIRECT },
        None => false,
    }
}

#[inline(always)]
fn set_macs(eth: *mut [u16; 6], macs: &[u16; 6]) {
    let e = unsafe { &mut *eth };
    e[0] = macs[0];
    e[1] = macs[1];
    e[2] = macs[2];
    e[3] = macs[3];
    e[4] = macs[4];
    e[5] = macs[5];
}

#[inline(always)]
fn out<C: PktCtx>(ctx: &C, ifindex: u32) -> Verdict {
    count(stat::FWD_REDIRECT);
    if ifindex == ctx.ifindex() {
        Verdict::Tx
    } else {
        Verdict::Redirect(ifindex)
    }
}

/// The next hop cache of session entry `ct` (null for null).
#[inline(always)]
fn nh_of(ct: *mut CtVal) -> *mut NextHop {
    if ct.is_null() {
        core::ptr::null_mut()
    } else {
        unsafe { core::ptr::addr_of_mut!((*ct).nh) }
    }
}

/// The session's cached next hop `nh`, if still fresh.
#[inline(always)]
fn cached(nh: *mut NextHop, now: u64) -> Option<(u32, [u16; 6])> {
    unsafe {
        if !nh.is_null() && (*nh).ifindex != 0 && nh_fresh((*nh).expiry, now) {
            Some(((*nh).ifindex, (*nh).macs))
        } else {
            None
        }
    }
}

#[inline(always)]
fn remember(nh: *mut NextHop, now: u64, ifindex: u32, macs: [u16; 6]) {
    if !nh.is_null() {
        unsafe {
            (*nh).ifindex = ifindex;
            (*nh).macs = macs;
            (*nh).expiry = nh_tick(now).wrapping_add(NH_CACHE_TICKS);
        }
    }
}

/// The next hop cached toward endpoint slot `ep` for a packet to `dst`
/// of `tot_len` bytes arriving on `in_ifindex`, if it may be used (see
/// `EpNh`), and it has the flags `need` (`ep_nh_flags::*`).
#[inline(always)]
fn ep_cached(
    ep: u32,
    dst: &Addr,
    in_ifindex: u32,
    tot_len: u16,
    now: u64,
    need: u16,
) -> Option<(u32, [u16; 6])> {
    let e = LB_EP_NH.get_ptr(ep)?;
    unsafe {
        if (*e).ifindex != 0
            && now < (*e).expiry_ns
            && (*e).in_ifindex == in_ifindex
            && tot_len <= (*e).max_len
            && (*e).flags & need == need
            && (*e).dst == *dst
        {
            Some(((*e).ifindex, (*e).macs))
        } else {
            None
        }
    }
}

/// Keep the FIB's answer `f` toward endpoint slot `ep` (see `EpNh`).
#[inline(always)]
fn ep_remember(ep: u32, dst: &Addr, in_ifindex: u32, tot_len: u16, now: u64, f: &Fib) {
    let Some(e) = LB_EP_NH.get_ptr_mut(ep) else {
        return;
    };
    let flags = if f.nexthop == *dst {
        ep_nh_flags::DIRECT
    } else {
        0
    };
    unsafe {
        // A fresh answer for the same address, device and next hop only
        // raises the length known to fit.
        let same = (*e).ifindex == f.ifindex
            && now < (*e).expiry_ns
            && (*e).in_ifindex == in_ifindex
            && (*e).dst == *dst
            && (*e).macs == f.macs
            && (*e).flags == flags;
        let max_len = if same && (*e).max_len > tot_len {
            (*e).max_len
        } else {
            tot_len
        };
        *e = EpNh {
            dst: *dst,
            ifindex: f.ifindex,
            in_ifindex,
            macs: f.macs,
            max_len,
            flags,
            expiry_ns: now + NH_CACHE_NS,
        };
    }
}

/// The endpoint slot whose kept next hop [`forward`] may use and fill
/// (written to `slot`), if the agent allows it: `ep`, or `ct`'s for
/// `SESSION_EP`.
#[inline(always)]
fn ep_slot(ct: *const CtVal, ep: u32, flags: u32, slot: &mut u32) -> bool {
    if flags & cfg_flags::EP_NH_CACHE == 0 || ep == NO_EP {
        return false;
    }
    *slot = if ep != SESSION_EP {
        ep
    } else if !ct.is_null() && unsafe { (*ct).dir } == ct_dir::FORWARD {
        unsafe { (*ct).ep_stat }
    } else {
        return false;
    };
    true
}

/// No endpoint slot: [`forward`] uses and fills no per-endpoint next hop.
pub const NO_EP: u32 = u32::MAX;
/// The endpoint slot of the session `ct`, if it is the forward entry (a
/// packet toward the endpoint).
pub const SESSION_EP: u32 = u32::MAX - 1;

/// Forward a translated packet. `ct` is the session entry (null for a new
/// session's first packet: the session's next packet fills its cache),
/// `nh` the next-hop cache of the packet's direction in it (`ct`'s `nh`,
/// or a one-entry session's reply `rnh`; null with `ct`), `ep` the
/// endpoint slot whose kept next hop may be used when `nh` has none
/// (`SESSION_EP`: `ct`'s own; `NO_EP`: none), `now` the current coarse
/// monotonic time (ns).
#[inline(always)]
pub fn forward<C: PktCtx>(
    ctx: &C,
    p: &Pkt,
    ct: *mut CtVal,
    nh: *mut NextHop,
    ep: u32,
    now: u64,
) -> Verdict {
    let flags = cfg();
    if flags & cfg_flags::FORWARD_VIA_STACK != 0 || p.vlan {
        count(stat::FWD_STACK);
        return Verdict::Pass;
    }
    let data = ctx.data();
    let end = ctx.data_end();
    unsafe {
        let Some(eth) = ptr_at::<[u16; 6]>(data, end, 0) else {
            return Verdict::Pass;
        };
        // TTL / hop limit, and what the FIB is asked: the addresses as
        // they are now in the header (translated), not as parsed.
        let (ttl_at, tot_len, src, dst) = if p.v6 {
            let Some(h) = ptr_at::<[u32; 10]>(p.ip, end, 0) else {
                return Verdict::Pass;
            };
            let h = &*h;
            let plen = u16::from_be((h[1] & 0xffff) as u16);
            (
                p.ip + 7,
                plen.saturating_add(40),
                [h[2], h[3], h[4], h[5]],
                [h[6], h[7], h[8], h[9]],
            )
        } else {
            let Some(h) = ptr_at::<[u8; 20]>(p.ip, end, 0) else {
                return Verdict::Pass;
            };
            let h = &*h;
            (
                p.ip + 8,
                u16::from_be_bytes([h[2], h[3]]),
                v4_mapped(u32::from_ne_bytes([h[12], h[13], h[14], h[15]])),
                v4_mapped(u32::from_ne_bytes([h[16], h[17], h[18], h[19]])),
            )
        };
        let Some(ttl_p) = ptr_at::<[u8; 2]>(ttl_at, end, 0) else {
            return Verdict::Pass;
        };
        let ttl = (*ttl_p)[0];
        if ttl <= 1 {
            count(stat::PASS_TTL);
            return Verdict::Pass;
        }
        let mut per_ep = NO_EP;
        let (ifindex, macs) = match cached(nh, now) {
            Some(nh) => nh,
            None => match if ep_slot(ct, ep, flags, &mut per_ep) {
                ep_cached(per_ep, &dst, ctx.ifindex(), tot_len, now, 0)
            } else {
                None
            } {
                Some((ifindex, macs)) => {
                    remember(nh, now, ifindex, macs);
                    (ifindex, macs)
                }
                None => {
                    let f = fib(ctx, p, tot_len, &src, &dst, 0);
                    if f.rc != RET_SUCCESS {
                        if !nh.is_null() {
                            (*nh).ifindex = 0;
                        }
                        count(stat::FWD_STACK);
                        return Verdict::Pass;
                    }
                    if !can_send::<C>(f.ifindex) {
                        // Not cached: the next packet asks again, so a device
                        // that becomes a redirect target is used within a
                        // packet.
                        if !nh.is_null() {
                            (*nh).ifindex = 0;
                        }
                        count(stat::FWD_STACK_DEVICE);
                        return Verdict::Pass;
                    }
                    remember(nh, now, f.ifindex, f.macs);
                    if per_ep != NO_EP {
                        ep_remember(per_ep, &dst, ctx.ifindex(), tot_len, now, &f);
                    }
                    (f.ifindex, f.macs)
                }
            },
        };
        // Decrement TTL / hop limit as a router does; fix the IPv4 header
        // checksum (IPv6 has none).
        if !p.v6 {
            let Some(h) = ptr_at::<[u8; 12]>(p.ip, end, 0) else {
                return Verdict::Pass;
            };
            let h = &mut *h;
            let old = u16::from_ne_bytes([h[8], h[9]]);
            let new = u16::from_ne_bytes([ttl - 1, h[9]]);
            let c = csum::replace2(u16::from_ne_bytes([h[10], h[11]]), old, new);
            let cb = c.to_ne_bytes();
            h[10] = cb[0];
            h[11] = cb[1];
        }
        (*ttl_p)[0] = ttl - 1;
        set_macs(eth, &macs);
        out(ctx, ifindex)
    }
}

/// DSR: send the frame, untranslated, to endpoint `ep`: on its L2 segment
/// (destination MAC rewritten; the endpoint must be directly connected), or
/// IPIP-encapsulated to it (`ipip`). The TTL is left alone: to the
/// endpoint, the load balancer is not a router hop. `ct` and `slot` as for
/// [`forward`] (an L2 frame takes the next hop kept for its endpoint only
/// when that is the endpoint itself).
#[inline(always)]
pub fn forward_dsr<C: PktCtx>(
    ctx: &C,
    p: &Pkt,
    ct: *mut CtVal,
    slot: u32,
    now: u64,
    ep: &Addr,
    ipip: bool,
) -> Verdict {
    if p.vlan {
        count(stat::FWD_STACK);
        return Verdict::Pass;
    }
    if ipip && p.v6 {
        // IPv6 in IPIP is not done (the agent refuses such rules).
        count(stat::DROP_NO_ROUTE);
        return Verdict::Drop;
    }
    let end = ctx.data_end();
    let Some(hdr) = (unsafe { ptr_at::<[u8; 8]>(p.ip, end, 0) }) else {
        return Verdict::Pass;
    };
    let h = unsafe { &*hdr };
    let tot_len = if p.v6 {
        u16::from_be_bytes([h[4], h[5]]).saturating_add(40)
    } else {
        u16::from_be_bytes([h[2], h[3]])
    };
    let tos = h[1];
    // (`cached` is None for a null `ct`.)
    let mut per_ep = NO_EP;
    let kept = match cached(nh_of(ct), now) {
        // (IPIP: the outer source is cached with the next hop, in the
        // untranslated session's `xsaddr`.)
        Some((i, m)) => Some((i, m, unsafe { (*ct).xsaddr })),
        None if !ipip && ep_slot(ct, slot, cfg(), &mut per_ep) => {
            match ep_cached(per_ep, ep, ctx.ifindex(), tot_len, now, ep_nh_flags::DIRECT) {
                Some((i, m)) => {
                    remember(nh_of(ct), now, i, m);
                    Some((i, m, [0; 4]))
                }
                None => None,
            }
        }
        None => None,
    };
    let (ifindex, macs, outer_src) = match kept {
        Some(nh) => nh,
        None => {
            let extra = if ipip { 20 } else { 0 };
            let f = fib(
                ctx,
                p,
                tot_len.saturating_add(extra),
                &[0; 4],
                ep,
                if ipip { BPF_FIB_LOOKUP_SRC } else { 0 },
            );
            if f.rc == RET_FRAG_NEEDED {
                count(stat::DROP_ENCAP_MTU);
                return Verdict::Drop;
            }
            if f.rc == RET_NO_NEIGH {
                // The stack cannot help (it would route on the VIP, which
                // is not ours to route): drop; the agent keeps endpoint
                // neighbours resolved, and the sender retransmits.
                count(stat::DROP_NO_NEIGH);
                return Verdict::Drop;
            }
            if f.rc != RET_SUCCESS {
                count(stat::FWD_STACK);
                return Verdict::Pass;
            }
            if !ipip && f.nexthop != *ep {
                // Behind a router: an L2 rewrite would hand the frame to
                // the router, with the VIP as its destination.
                count(stat::DROP_DSR_NO_L2);
                return Verdict::Drop;
            }
            if !can_send::<C>(f.ifindex) {
                if ipip {
                    // Encapsulated toward the endpoint's own address, the
                    // stack can route it: the outer header is added,
                    // the MACs stay as they came (addressed to this node).
                    if !ctx.grow_l3(20) {
                        return Verdict::Drop;
                    }
                    return if write_ipip(ctx, tot_len, tos, &f.src, ep) {
                        count(stat::FWD_STACK_DEVICE);
                        Verdict::Pass
                    } else {
                        Verdict::Drop
                    };
                }
                // A frame addressed to the VIP cannot be handed to the
                // stack (it would deliver or route it by the VIP).
                count(stat::DROP_DSR_NO_REDIRECT);
                return Verdict::Drop;
            }
            remember(nh_of(ct), now, f.ifindex, f.macs);
            if ipip && !ct.is_null() {
                unsafe { (*ct).xsaddr = f.src };
            }
            if per_ep != NO_EP {
                ep_remember(per_ep, ep, ctx.ifindex(), tot_len, now, &f);
            }
            (f.ifindex, f.macs, f.src)
        }
    };
    if ipip {
        if !ctx.grow_l3(20) || !write_ipip(ctx, tot_len, tos, &outer_src, ep) {
            return Verdict::Drop;
        }
        let data = ctx.data();
        let end = ctx.data_end();
        let Some(eth) = (unsafe { ptr_at::<[u16; 6]>(data, end, 0) }) else {
            return Verdict::Drop;
        };
        set_macs(eth, &macs);
        return out(ctx, ifindex);
    }
    let data = ctx.data();
    let Some(eth) = (unsafe { ptr_at::<[u16; 6]>(data, end, 0) }) else {
        return Verdict::Pass;
    };
    set_macs(eth, &macs);
    out(ctx, ifindex)
}

/// Write the outer IPv4 header of an IPIP packet (`grow_l3(20)` made room
/// for it right after the Ethernet header) and set the EtherType to IPv4.
/// `tot_len`: the inner packet's length.
#[inline(always)]
fn write_ipip<C: PktCtx>(ctx: &C, tot_len: u16, tos: u8, src: &Addr, ep: &Addr) -> bool {
    let data = ctx.data();
    let end = ctx.data_end();
    let Some(outer) = (unsafe { ptr_at::<[u16; 10]>(data, end, ETH_HLEN) }) else {
        return false;
    };
    let o = unsafe { &mut *outer };
    let w = |a: u8, b: u8| u16::from_ne_bytes([a, b]);
    let len = (tot_len + 20).to_be_bytes();
    let s = src[3].to_ne_bytes();
    let d = ep[3].to_ne_bytes();
    o[0] = w(0x45, tos);
    o[1] = w(len[0], len[1]);
    o[2] = 0; // id
    o[3] = w(0x40, 0); // DF
    o[4] = w(64, IPPROTO_IPIP);
    o[5] = 0;
    o[6] = w(s[0], s[1]);
    o[7] = w(s[2], s[3]);
    o[8] = w(d[0], d[1]);
    o[9] = w(d[2], d[3]);
    let mut sum = 0u32;
    for x in o.iter() {
        sum += *x as u32;
    }
    o[5] = !csum::fold(sum);
    let Some(eth) = (unsafe { ptr_at::<[u16; 7]>(data, end, 0) }) else {
        return false;
    };
    unsafe { (*eth)[6] = 0x0800u16.to_be() };
    true
}
