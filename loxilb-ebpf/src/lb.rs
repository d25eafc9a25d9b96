//! The load-balancing datapath, written once for XDP and TC.

use loxilb_common::{addr_filter_bit, stat, svc_flags, SvcKey4};

use crate::{
    conntrack::{self, Ct},
    ctx::{PktCtx, Verdict},
    fwd,
    maps::{count, rule_stats, src_allowed, LB_ADDR_FILTER, LB_CT4, LB_SERVICES4},
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

#[inline(always)]
pub fn process<C: PktCtx>(ctx: &C) -> Verdict {
    let data = ctx.data();
    let end = ctx.data_end();
    count(stat::RX);
    let p = match parse::parse(data, end) {
        Parsed::Pkt(p) => p,
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
    if let Some(rs) = rs {
        unsafe {
            (*rs).new_sessions += 1;
            (*rs).packets += 1;
            (*rs).bytes += p.l3_len as u64;
        }
    }
    let Some((ep_addr, ep_port)) = conntrack::create(
        &key,
        ep.addr,
        ep.port,
        rule_id,
        timeout_s,
        mode,
        p.l3_len,
        now,
        ep.stat_idx,
    ) else {
        return Verdict::Drop;
    };
    if !nat::rewrite(&p, end, p.saddr, ep_addr, p.sport, ep_port) {
        return Verdict::Pass;
    }
    let v = LB_CT4.get_ptr_mut(&key).unwrap_or(core::ptr::null_mut());
    fwd::forward(ctx, &p, v, now)
}
