//! The load-balancing datapath, written once for XDP and TC.

use loxilb_common::{
    addr_filter_bit, addr_fold, is_v4, lb_mode, stat, svc_flags, v4_mapped, Addr, CtKey, EpVal,
    JMP_NEW4, JMP_NEW6, JMP_ONE6, JMP_SCTP4, JMP_SCTP6, JMP_V6, SNAT_PORT_HI, SNAT_PORT_LO,
};

use crate::{
    conntrack::{self, Ct, NewSession, Xlate},
    ctx::{PktCtx, Verdict},
    fwd, icmp,
    maps::{
        count, rule_stats, src_allowed, LB_ADDR_FILTER, LB_CONFIG, LB_CT, LB_NEW_FLOW_TAT,
        LB_SCRATCH_EP, LB_SCRATCH_SVC, LB_SERVICES,
    },
    nat, nat64,
    parse::{self, sctp_ev, Parsed},
    sctp, select,
};

#[inline(always)]
fn maybe_ours(addr: &Addr) -> bool {
    let (w, b) = addr_filter_bit(addr_fold(addr));
    match LB_ADDR_FILTER.get_ptr(w) {
        Some(word) => unsafe { *word & (1u64 << b) != 0 },
        None => false,
    }
}

/// Forward a packet that belongs to no session (a translated ICMP error):
/// no entry to keep the next hop in, no endpoint's next hop to take.
#[inline(always)]
fn forward_untracked<C: PktCtx>(ctx: &C, p: &parse::Pkt) -> Verdict {
    fwd::forward(
        ctx,
        p,
        core::ptr::null_mut(),
        core::ptr::null_mut(),
        fwd::NO_EP,
        0,
    )
}

/// ICMP arriving on an interface: echo to a VIP answered, errors about a
/// translated packet translated back and forwarded.
#[inline(always)]
fn icmp_ingress<C: PktCtx>(ctx: &C, ic: &parse::Icmp) -> Verdict {
    let data = ctx.data();
    let end = ctx.data_end();
    if icmp::echo_reply(data, end, ic) {
        return Verdict::Tx;
    }
    if !icmp::translate_error(end, ic) {
        count(stat::PASS_NOT_SERVICE);
        return Verdict::Pass;
    }
    // Forward it as the translated ICMP packet it now is.
    let daddr = match unsafe { parse::ptr_at::<u32>(ic.ip, end, 16) } {
        Some(d) => unsafe { *d },
        None => return Verdict::Pass,
    };
    let saddr = match unsafe { parse::ptr_at::<u32>(ic.ip, end, 12) } {
        Some(d) => unsafe { *d },
        None => return Verdict::Pass,
    };
    let p = parse::Pkt {
        ip: ic.ip,
        l4: ic.l4,
        saddr: v4_mapped(saddr),
        daddr: v4_mapped(daddr),
        sport: 0,
        dport: 0,
        proto: loxilb_common::IPPROTO_ICMP,
        vlan: ic.vlan,
        l3_len: (end - ic.ip) as u32,
        v6: false,
        sctp: 0,
        l4_len: 0,
    };
    forward_untracked(ctx, &p)
}

/// ICMPv6 arriving on an interface: echo to a VIP answered, errors about
/// a translated packet translated back and forwarded; the rest (neighbour
/// discovery included) goes to the stack.
#[inline(always)]
fn icmp6_ingress<C: PktCtx>(ctx: &C, ic: &parse::Icmp6) -> Verdict {
    let end = ctx.data_end();
    if icmp::echo_reply6(ctx.data(), end, ic) {
        return Verdict::Tx;
    }
    if !icmp::translate_error6(end, ic) {
        count(stat::PASS_NOT_SERVICE);
        return Verdict::Pass;
    }
    let p = parse::Pkt {
        ip: ic.ip,
        l4: ic.l4,
        saddr: [0; 4],
        daddr: [0; 4],
        sport: 0,
        dport: 0,
        proto: loxilb_common::IPPROTO_ICMPV6,
        vlan: ic.vlan,
        l3_len: (end - ic.ip) as u32,
        v6: true,
        sctp: 0,
        l4_len: 0,
    };
    forward_untracked(ctx, &p)
}

/// The egress side (TC): only ICMP errors the node itself generates about
/// translated packets (fragmentation needed / packet too big when the
/// stack forwards one) need translating; everything else leaves as it is.
#[inline(always)]
pub fn egress<C: PktCtx>(ctx: &C) -> Verdict {
    let end = ctx.data_end();
    match parse::parse::<false, false>(ctx.data(), end) {
        Parsed::Icmp(ic) => {
            icmp::translate_error(end, &ic);
        }
        Parsed::Ipv6 => {
            if let Parsed::Icmp6(ic) = parse::parse::<true, false>(ctx.data(), end) {
                icmp::translate_error6(end, &ic);
            }
        }
        _ => {}
    }
    Verdict::Pass
}

/// The datapath for one packet. `V6`: the IPv6 program (reached by a tail
/// call from the IPv4 one, which counted the packet already).
#[inline(always)]
pub fn process<C: PktCtx, const V6: bool>(ctx: &C) -> Verdict {
    let data = ctx.data();
    let end = ctx.data_end();
    if !V6 {
        count(stat::RX);
    }
    let p = match parse::parse::<V6, false>(data, end) {
        Parsed::Pkt(p) => p,
        Parsed::Icmp(ic) => return icmp_ingress(ctx, &ic),
        Parsed::Icmp6(ic) => return icmp6_ingress(ctx, &ic),
        Parsed::Other => {
            count(stat::PASS_NOT_SERVICE);
            return Verdict::Pass;
        }
        Parsed::Fragment => {
            count(stat::PASS_FRAGMENT);
            return Verdict::Pass;
        }
        Parsed::Malformed => {
            count(stat::PASS_MALFORMED);
            return Verdict::Pass;
        }
        Parsed::Ext => {
            count(stat::PASS_IPV6_EXT);
            return Verdict::Pass;
        }
        Parsed::BadSctp => {
            count(stat::DROP_SCTP_MALFORMED);
            return Verdict::Drop;
        }
        Parsed::Ipv6 => {
            ctx.tail_call(JMP_V6);
            // Only reached when the IPv6 program is not loaded.
            count(stat::PASS_NOT_SERVICE);
            return Verdict::Pass;
        }
    };
    // Cheap exit for traffic that touches no VIP and no endpoint. (Not for
    // SCTP: a multihomed endpoint's other addresses are learnt from its
    // INIT-ACK, not configured, so only the session table knows them.)
    let from_ours = maybe_ours(&p.saddr);
    if !from_ours && !maybe_ours(&p.daddr) && p.proto != loxilb_common::IPPROTO_SCTP {
        count(stat::PASS_NOT_SERVICE);
        return Verdict::Pass;
    }
    if V6 && from_ours && conntrack::to_one6(&p) {
        // A reply to a one-entry session, maybe: its own program (returns
        // only if it is not loaded).
        ctx.tail_call(JMP_ONE6);
    }
    let key = conntrack::key_of(&p);
    let now = conntrack::now_ns();
    // (`!V6`: the IPv6 programs hand replies to one-entry sessions to a
    // program of their own (above): see `conntrack::lookup`. Only
    // a packet whose source passes the address filter can be an
    // endpoint's reply: a client's packet reads no endpoint index slot,
    // which for a new client port is a cache miss.)
    if let Ct::Hit { x, v, nh, ep } = conntrack::lookup(&p, end, &key, now, !V6 && from_ours) {
        count_hit(v, &p);
        let mode = unsafe { (*v).mode };
        if lb_mode::is_dsr(mode) {
            // (A DSR session's translated destination is its endpoint.)
            let ep = unsafe { (*v).xdaddr };
            return fwd::forward_dsr(
                ctx,
                &p,
                v,
                fwd::SESSION_EP,
                now,
                &ep,
                mode == lb_mode::DSR_IPIP,
            );
        }
        if p.sctp & (sctp_ev::INIT | sctp_ev::INIT_ACK | sctp_ev::CLOSE) != 0 {
            // Multihoming bookkeeping (the INIT-ACK rewrite, closing every
            // path of an association) lives in its own program (returns
            // only if it is not loaded).
            ctx.tail_call(if V6 { JMP_SCTP6 } else { JMP_SCTP4 });
        }
        return translate_and_forward(ctx, &p, &x, v, nh, ep, now);
    }
    // No live session: the new-flow program takes it from here.
    ctx.tail_call(if V6 { JMP_NEW6 } else { JMP_NEW4 });
    count(stat::PASS_NOT_SERVICE);
    Verdict::Pass
}

/// A session's packet: counted to the node and to its rule.
#[inline(always)]
fn count_hit(v: *mut loxilb_common::CtVal, p: &parse::Pkt) {
    count(stat::CT_HIT);
    if let Some(rs) = rule_stats(unsafe { (*v).rule_id }) {
        unsafe {
            (*rs).packets += 1;
            (*rs).bytes += p.l3_len as u64;
        }
    }
}

/// The IPv6 one-entry reply program (tail-called by `process::<V6>` for a
/// packet from an indexed endpoint): the reply of a one-entry session is
/// translated back from the VIP and forwarded; anything else goes back to
/// the IPv6 program, marked so that it looks the packet up by its own
/// tuple.
#[inline(always)]
pub fn process_one6<C: PktCtx>(ctx: &C) -> Verdict {
    let end = ctx.data_end();
    let p = match parse::parse::<true, false>(ctx.data(), end) {
        Parsed::Pkt(p) => p,
        _ => return Verdict::Pass,
    };
    let now = conntrack::now_ns();
    if let Ct::Hit { x, v, nh, ep } = conntrack::lookup_one(&p, end, now) {
        count_hit(v, &p);
        return translate_and_forward(ctx, &p, &x, v, nh, ep, now);
    }
    conntrack::handed_back_one6(true);
    ctx.tail_call(JMP_V6);
    // Only reached when the IPv6 program is not loaded.
    conntrack::handed_back_one6(false);
    count(stat::PASS_NOT_SERVICE);
    Verdict::Pass
}

/// The new-flow program (tail-called by `process` on a conntrack miss):
/// its own program so that each gets the verifier's whole budget and the
/// whole 512-byte stack. It parses the packet again (a few ns, on the first
/// packet of a flow only).
#[inline(always)]
pub fn process_new<C: PktCtx, const V6: bool>(ctx: &C) -> Verdict {
    let p = match parse::parse::<V6, true>(ctx.data(), ctx.data_end()) {
        Parsed::Pkt(p) => p,
        _ => return Verdict::Pass,
    };
    let key = conntrack::key_of(&p);
    new_session(ctx, &p, &key, conntrack::now_ns())
}

/// The new-flow rate limit (`GlobalCfg::new_flow_interval_ns` and
/// `new_flow_burst`, per CPU): a generic cell rate algorithm. Each admitted
/// flow moves this CPU's theoretical arrival time one interval on; a flow
/// that finds it `burst` intervals or more ahead of now is refused. Cheap
/// (one per-CPU slot, no lock) and exact over time even on the coarse
/// clock.
#[inline(always)]
fn admit_new_flow(now: u64) -> bool {
    let Some(c) = LB_CONFIG.get_ptr(0) else {
        return true;
    };
    let (interval, burst) = unsafe { ((*c).new_flow_interval_ns, (*c).new_flow_burst) };
    if interval == 0 {
        return true;
    }
    let Some(t) = LB_NEW_FLOW_TAT.get_ptr_mut(0) else {
        return true;
    };
    unsafe {
        let tat = if *t > now { *t } else { now };
        if tat - now >= interval as u64 * burst.max(1) as u64 {
            return false;
        }
        *t = tat + interval as u64;
    }
    true
}

/// A packet with no live session: find its rule, pick an endpoint, create
/// the session, translate and forward.
#[inline(always)]
fn new_session<C: PktCtx>(ctx: &C, p: &parse::Pkt, key: &CtKey, now: u64) -> Verdict {
    // The service key is built in per-CPU scratch: the new-flow programs
    // use all of their 512-byte stack.
    let Some(skey) = LB_SCRATCH_SVC.get_ptr_mut(0) else {
        return Verdict::Pass;
    };
    unsafe {
        crate::set_addr(&mut (*skey).addr, &p.daddr);
        (*skey).port = p.dport;
        (*skey).proto = p.proto;
        (*skey)._pad = 0;
    }
    let Some(svc) = LB_SERVICES.get_ptr_mut(unsafe { &*skey }) else {
        count(stat::PASS_NOT_SERVICE);
        return Verdict::Pass;
    };
    let (rule_id, timeout_s, mode, flags) =
        unsafe { ((*svc).rule_id, (*svc).timeout_s, (*svc).mode, (*svc).flags) };
    let rs = rule_stats(rule_id);
    if flags & svc_flags::SRC_RANGES != 0 && !src_allowed(rule_id, &p.saddr) {
        count(stat::DROP_SRC_RANGE);
        if let Some(rs) = rs {
            unsafe { (*rs).drop_src_range += 1 };
        }
        return Verdict::Drop;
    }
    if !admit_new_flow(now) {
        count(stat::DROP_NEW_FLOW_RATE);
        return Verdict::Drop;
    }
    // A packet of a known SCTP association on a new path goes to the
    // endpoint address paired with the VIP it came to; everything else is
    // a new flow for the rule's selection.
    let known = if p.proto == loxilb_common::IPPROTO_SCTP && p.sctp & sctp_ev::INIT == 0 {
        sctp::path_endpoint(rule_id, p, ctx.data_end())
    } else {
        None
    };
    let (src_addr, src_port, src_stat) = match known {
        Some(k) => k,
        None => {
            let Some(ep) = select::select(svc, p, now) else {
                count(stat::DROP_NO_ENDPOINT);
                if let Some(rs) = rs {
                    unsafe { (*rs).drop_no_endpoint += 1 };
                }
                return Verdict::Drop;
            };
            (&ep.addr, ep.port, ep.stat_idx)
        }
    };
    // Both ways end in the same per-CPU slot, so the verifier sees one
    // state from here on rather than one per map the endpoint came from.
    let Some(slot) = LB_SCRATCH_EP.get_ptr_mut(0) else {
        return Verdict::Pass;
    };
    let ep: &'static EpVal = unsafe {
        crate::set_addr(&mut (*slot).addr, src_addr);
        (*slot).port = src_port;
        (*slot).stat_idx = src_stat;
        &*slot
    };
    let (ep_addr, ep_port, ep_stat) = (&ep.addr, ep.port, ep.stat_idx);
    let v4 = is_v4(ep_addr);
    let (fullnat_src, port_lo, port_hi) = match LB_CONFIG.get_ptr(0) {
        Some(c) => unsafe {
            let src = if v4 {
                if (*c).fullnat_src != 0 {
                    v4_mapped((*c).fullnat_src)
                } else {
                    [0; 4]
                }
            } else {
                (*c).fullnat_src6
            };
            (src, (*c).snat_port_lo, (*c).snat_port_hi)
        },
        None => ([0; 4], SNAT_PORT_LO, SNAT_PORT_HI),
    };
    let (port_lo, port_hi) = if port_lo == 0 || port_hi < port_lo {
        (SNAT_PORT_LO, SNAT_PORT_HI)
    } else {
        (port_lo, port_hi)
    };
    let dsr = lb_mode::is_dsr(mode);
    // NAT64: an IPv6 client cannot be an IPv4 packet's source, so the
    // source is always translated: the full-NAT source, else the node's
    // own address toward the endpoint (as onearm).
    let nat64 = p.v6 && v4;
    if nat64 && dsr {
        count(stat::DROP_NAT64);
        return Verdict::Drop;
    }
    let snat_src = if (mode == lb_mode::FULLNAT || nat64) && fullnat_src != [0; 4] {
        Some(fullnat_src)
    } else if mode == lb_mode::FULLNAT && !nat64 {
        Some(p.daddr)
    } else if mode == lb_mode::ONEARM || nat64 {
        match fwd::src_toward(ctx, p, ep_addr, ep_stat, now) {
            Some(a) => Some(a),
            None => {
                count(stat::DROP_NO_ROUTE);
                return Verdict::Drop;
            }
        }
    } else {
        None
    };
    let x = if dsr {
        // The packet keeps its tuple; the entry holds the endpoint the frame
        // goes to, and IPIP's outer source once cached (`CtVal::xsaddr`).
        Xlate {
            xs: [0; 4],
            xd: *ep_addr,
            xsp: p.sport,
            xdp: p.dport,
        }
    } else if let Some(src) = snat_src {
        Xlate {
            xs: src,
            xd: *ep_addr,
            xsp: 0,
            xdp: ep_port,
        }
    } else {
        Xlate {
            xs: p.saddr,
            xd: *ep_addr,
            xsp: p.sport,
            xdp: ep_port,
        }
    };
    // One entry if the endpoint's replies can find it (DNAT within one
    // family; SCTP multihoming keeps its paths' entries).
    let one = mode == lb_mode::DEFAULT
        && v4 != p.v6
        && p.proto != loxilb_common::IPPROTO_SCTP
        && conntrack::indexed(ep_addr, ep_port, p.proto, &p.daddr, p.dport);
    let n = NewSession {
        rule_id,
        timeout_s,
        mode,
        l3_len: p.l3_len,
        now,
        ep_stat,
        snat: snat_src.is_some(),
        port_lo,
        port_hi,
        dsr,
        one,
        opening: conntrack::opens(p, ctx.data_end()),
    };
    let Some(x) = conntrack::create(key, x, &n) else {
        return Verdict::Drop;
    };
    if let Some(rs) = rs {
        unsafe {
            (*rs).new_sessions += 1;
            (*rs).packets += 1;
            (*rs).bytes += p.l3_len as u64;
        }
    }
    if dsr {
        // As for the NAT modes, the new entry is not read back to cache the
        // next hop in it: the session's next packet does that.
        let ipip = mode == lb_mode::DSR_IPIP;
        let verdict = fwd::forward_dsr(ctx, p, core::ptr::null_mut(), ep_stat, now, ep_addr, ipip);
        if verdict == Verdict::Drop {
            // The endpoint cannot be reached this way: no session.
            if let Some(v) = LB_CT.get_ptr_mut(key) {
                unsafe { conntrack::end_session(key, v) };
            }
        }
        return verdict;
    }
    if p.sctp & sctp_ev::INIT != 0 {
        ctx.tail_call(if p.v6 { JMP_SCTP6 } else { JMP_SCTP4 });
    }
    // The new entry is not read back to cache the next hop in it: the
    // session's next packet does that (from the next hop kept per
    // endpoint, or with a FIB lookup when the routing is not plain).
    translate_and_forward(
        ctx,
        p,
        &x,
        core::ptr::null_mut(),
        core::ptr::null_mut(),
        ep_stat,
        now,
    )
}

/// The SCTP program (tail-called on an INIT, INIT-ACK, ABORT or SHUTDOWN
/// COMPLETE that has a session): multihoming bookkeeping (`sctp`: the
/// INIT / INIT-ACK parameter walk, closing every path of an association),
/// then translate and forward as any packet of the session.
#[inline(always)]
pub fn process_sctp<C: PktCtx, const V6: bool>(ctx: &C) -> Verdict {
    // Entered again at the end of the parameter walk: only translate and
    // forward. (Read first: the mark is this packet's, whatever follows.)
    let walked = sctp::walk_done();
    let end = ctx.data_end();
    let p = match parse::parse::<V6, true>(ctx.data(), end) {
        Parsed::Pkt(p) => p,
        _ => return Verdict::Pass,
    };
    let key = conntrack::key_of(&p);
    let Some(v) = LB_CT.get_ptr_mut(&key) else {
        return Verdict::Pass;
    };
    let now = conntrack::now_ns();
    let x = unsafe {
        Xlate {
            xs: (*v).xsaddr,
            xd: (*v).xdaddr,
            xsp: (*v).xsport,
            xdp: (*v).xdport,
        }
    };
    // Else start the walk (returns if there is none to make).
    if !walked {
        let rule_id = unsafe { (*v).rule_id };
        let old = unsafe { (*v).sctp_tag };
        if p.sctp & sctp_ev::CLOSE != 0 {
            if let Some(tag) = sctp::vtag(&p, end) {
                sctp::close_paths(&p, rule_id, tag);
            }
        } else if p.sctp & sctp_ev::INIT != 0 && old != 0 {
            // An INIT with another tag on a session of an association: a
            // new association on this tuple. The old one's paths close,
            // and the packet starts afresh as a new flow (the new-flow
            // program returns here with a session of its own).
            match sctp::initiate_tag(&p, end) {
                Some(tag) if tag != old => {
                    sctp::close_paths(&p, rule_id, old);
                    unsafe { conntrack::end_session(&key, v) };
                    ctx.tail_call(if V6 { JMP_NEW6 } else { JMP_NEW4 });
                    return Verdict::Drop;
                }
                _ => sctp::begin(ctx, &p, end, v, now),
            }
        } else {
            sctp::begin(ctx, &p, end, v, now);
        }
    }
    translate_and_forward(
        ctx,
        &p,
        &x,
        v,
        unsafe { core::ptr::addr_of_mut!((*v).nh) },
        fwd::NO_EP,
        now,
    )
}

/// Rewrite `p` to `x` (across families for NAT64 sessions) and forward it
/// (`v`, `nh`, `ep`: see [`fwd::forward`]).
#[inline(always)]
fn translate_and_forward<C: PktCtx>(
    ctx: &C,
    p: &parse::Pkt,
    x: &Xlate,
    v: *mut loxilb_common::CtVal,
    nh: *mut loxilb_common::NextHop,
    ep: u32,
    now: u64,
) -> Verdict {
    if p.v6 == is_v4(&x.xd) {
        let q = if p.v6 {
            nat64::to_v4(ctx, p, x)
        } else {
            nat64::to_v6(ctx, p, x)
        };
        return match q {
            Some(q) => fwd::forward(ctx, &q, v, nh, ep, now),
            None => Verdict::Drop,
        };
    }
    if !nat::rewrite(p, ctx.data_end(), x) {
        return Verdict::Pass;
    }
    fwd::forward(ctx, p, v, nh, ep, now)
}
