//! The load-balancing datapath, written once for XDP and TC.

use loxilb_common::{
    addr_filter_bit, lb_mode, stat, svc_flags, SvcKey4, SNAT_PORT_HI, SNAT_PORT_LO,
};

use crate::{
    conntrack::{self, Ct, NewSession, Xlate},
    ctx::{PktCtx, Verdict},
    fwd, icmp,
    maps::{count, rule_stats, src_allowed, LB_ADDR_FILTER, LB_CONFIG, LB_CT4, LB_SERVICES4},
    nat,
    parse::{self, Parsed},
    select,
};

#[inline(always)]
fn maybe_ours(addr: u32) -> bool {
    let (w, b) = addr_filter_bit(addr);
    match LB_ADDR_FILTER.get_ptr(w) {
        Some(word) => unsafe { *word & (1u64 << b) != 0 },
        None => false,
    }
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
        saddr,
        daddr,
        sport: 0,
        dport: 0,
        proto: loxilb_common::IPPROTO_ICMP,
        vlan: ic.vlan,
        l3_len: (end - ic.ip) as u32,
    };
    fwd::forward(ctx, &p, core::ptr::null_mut(), 0)
}

/// The egress side (TC): only ICMP errors the node itself generates about
/// translated packets (fragmentation needed when the stack forwards one)
/// need translating; everything else leaves as it is.
#[inline(always)]
pub fn egress<C: PktCtx>(ctx: &C) -> Verdict {
    let end = ctx.data_end();
    if let Parsed::Icmp(ic) = parse::parse(ctx.data(), end) {
        icmp::translate_error(end, &ic);
    }
    Verdict::Pass
}

#[inline(always)]
pub fn process<C: PktCtx>(ctx: &C) -> Verdict {
    let data = ctx.data();
    let end = ctx.data_end();
    count(stat::RX);
    let p = match parse::parse(data, end) {
        Parsed::Pkt(p) => p,
        Parsed::Icmp(ic) => return icmp_ingress(ctx, &ic),
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
    };
    // Cheap exit for traffic that touches no VIP and no endpoint.
    if !maybe_ours(p.daddr) && !maybe_ours(p.saddr) {
        count(stat::PASS_NOT_SERVICE);
        return Verdict::Pass;
    }
    let key = conntrack::key_of(&p);
    let now = conntrack::now_ns();
    if let Ct::Hit {
        xs,
        xd,
        xsp,
        xdp,
        v,
    } = conntrack::lookup(&p, end, &key, now)
    {
        count(stat::CT_HIT);
        if let Some(rs) = rule_stats(unsafe { (*v).rule_id }) {
            unsafe {
                (*rs).packets += 1;
                (*rs).bytes += p.l3_len as u64;
            }
        }
        let (dsr_ep, mode) = unsafe { ((*v).dsr_ep, (*v).mode) };
        if dsr_ep != 0 {
            return fwd::forward_dsr(ctx, &p, v, now, dsr_ep, mode == lb_mode::DSR_IPIP);
        }
        if !nat::rewrite(&p, end, xs, xd, xsp, xdp) {
            return Verdict::Pass;
        }
        return fwd::forward(ctx, &p, v, now);
    }
    let skey = SvcKey4 {
        addr: p.daddr,
        port: p.dport,
        proto: p.proto,
        _pad: 0,
    };
    let Some(svc) = LB_SERVICES4.get_ptr_mut(&skey) else {
        count(stat::PASS_NOT_SERVICE);
        return Verdict::Pass;
    };
    let (rule_id, timeout_s, mode, flags) =
        unsafe { ((*svc).rule_id, (*svc).timeout_s, (*svc).mode, (*svc).flags) };
    let rs = rule_stats(rule_id);
    if flags & svc_flags::SRC_RANGES != 0 && !src_allowed(rule_id, p.saddr) {
        count(stat::DROP_SRC_RANGE);
        if let Some(rs) = rs {
            unsafe { (*rs).drop_src_range += 1 };
        }
        return Verdict::Drop;
    }
    let Some(ep) = select::select(svc, &p, now) else {
        count(stat::DROP_NO_ENDPOINT);
        if let Some(rs) = rs {
            unsafe { (*rs).drop_no_endpoint += 1 };
        }
        return Verdict::Drop;
    };
    // The translation this mode asks for.
    let (fullnat_src, port_lo, port_hi) = match LB_CONFIG.get_ptr(0) {
        Some(c) => unsafe { ((*c).fullnat_src, (*c).snat_port_lo, (*c).snat_port_hi) },
        None => (0, SNAT_PORT_LO, SNAT_PORT_HI),
    };
    let (port_lo, port_hi) = if port_lo == 0 || port_hi < port_lo {
        (SNAT_PORT_LO, SNAT_PORT_HI)
    } else {
        (port_lo, port_hi)
    };
    let dsr = mode == lb_mode::DSR || mode == lb_mode::DSR_IPIP;
    let snat_src = if mode == lb_mode::FULLNAT {
        if fullnat_src != 0 {
            fullnat_src
        } else {
            p.daddr
        }
    } else if mode == lb_mode::ONEARM {
        match fwd::src_toward(ctx, &p, ep.addr) {
            Some(a) => a,
            None => {
                count(stat::DROP_NO_ROUTE);
                return Verdict::Drop;
            }
        }
    } else {
        0
    };
    let x = if dsr {
        Xlate {
            xs: p.saddr,
            xd: p.daddr,
            xsp: p.sport,
            xdp: p.dport,
        }
    } else if snat_src != 0 {
        Xlate {
            xs: snat_src,
            xd: ep.addr,
            xsp: 0,
            xdp: ep.port,
        }
    } else {
        Xlate {
            xs: p.saddr,
            xd: ep.addr,
            xsp: p.sport,
            xdp: ep.port,
        }
    };
    let n = NewSession {
        rule_id,
        timeout_s,
        mode,
        l3_len: p.l3_len,
        now,
        ep_stat: ep.stat_idx,
        snat: snat_src != 0,
        port_lo,
        port_hi,
        dsr_ep: if dsr { ep.addr } else { 0 },
    };
    let Some(x) = conntrack::create(&key, x, &n) else {
        return Verdict::Drop;
    };
    if let Some(rs) = rs {
        unsafe {
            (*rs).new_sessions += 1;
            (*rs).packets += 1;
            (*rs).bytes += p.l3_len as u64;
        }
    }
    let v = LB_CT4.get_ptr_mut(&key).unwrap_or(core::ptr::null_mut());
    if dsr {
        let verdict = fwd::forward_dsr(ctx, &p, v, now, ep.addr, mode == lb_mode::DSR_IPIP);
        if verdict == Verdict::Drop && !v.is_null() {
            // The endpoint cannot be reached this way: no session.
            unsafe { conntrack::end_session(&key, v) };
        }
        return verdict;
    }
    if !nat::rewrite(&p, end, x.xs, x.xd, x.xsp, x.xdp) {
        return Verdict::Pass;
    }
    fwd::forward(ctx, &p, v, now)
}
