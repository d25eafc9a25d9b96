//! Forwarding of translated packets: `bpf_fib_lookup` and redirect, or the
//! kernel stack when the FIB cannot answer (no neighbour yet, local
//! destination, forwarding disabled, VLAN-tagged frames).
//!
//! The FIB answer (egress interface and both MACs) is cached in the
//! session's conntrack entry for `NH_CACHE_NS`, so an established flow pays
//! for one FIB lookup per second instead of one per packet.

use core::mem::size_of;

use aya_ebpf::{bindings::bpf_fib_lookup as FibParams, helpers::bpf_fib_lookup};
use loxilb_common::{cfg_flags, csum, stat, CtVal4, NH_CACHE_NS};

use crate::{
    ctx::{PktCtx, Verdict},
    maps::{count, LB_CONFIG},
    parse::{ptr_at, Pkt},
};

const AF_INET: u8 = 2;
const BPF_FIB_LKUP_RET_SUCCESS: i64 = 0;

/// Look the next hop up in the FIB: (egress ifindex, [dst MAC, src MAC] as
/// 16-bit words), or None when the stack must handle the packet.
#[inline(always)]
fn fib<C: PktCtx>(ctx: &C, h: &[u8; 20], p: &Pkt) -> Option<(u32, [u16; 6])> {
    // `mem::zeroed()` here would become a memset call in BPF.
    let mut slot = core::mem::MaybeUninit::<FibParams>::uninit();
    let params = unsafe {
        crate::zero_in_place(slot.as_mut_ptr());
        &mut *slot.as_mut_ptr()
    };
    params.family = AF_INET;
    params.l4_protocol = h[9];
    params.sport = p.sport;
    params.dport = p.dport;
    params.__bindgen_anon_1.tot_len = u16::from_be_bytes([h[2], h[3]]);
    params.__bindgen_anon_2.tos = h[1];
    params.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes([h[12], h[13], h[14], h[15]]);
    params.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes([h[16], h[17], h[18], h[19]]);
    params.ifindex = ctx.ifindex();
    let rc = unsafe { bpf_fib_lookup(ctx.raw(), params, size_of::<FibParams>() as i32, 0) };
    if rc != BPF_FIB_LKUP_RET_SUCCESS {
        return None;
    }
    let d = params.dmac;
    let s = params.smac;
    Some((
        params.ifindex,
        [
            u16::from_ne_bytes([d[0], d[1]]),
            u16::from_ne_bytes([d[2], d[3]]),
            u16::from_ne_bytes([d[4], d[5]]),
            u16::from_ne_bytes([s[0], s[1]]),
            u16::from_ne_bytes([s[2], s[3]]),
            u16::from_ne_bytes([s[4], s[5]]),
        ],
    ))
}

/// Forward a translated packet. `ct` is the session entry of this
/// direction (its next-hop cache), `now` the current coarse monotonic time (ns).
#[inline(always)]
pub fn forward<C: PktCtx>(ctx: &C, p: &Pkt, ct: *mut CtVal4, now: u64) -> Verdict {
    let stack = match LB_CONFIG.get_ptr(0) {
        Some(c) => unsafe { (*c).flags & cfg_flags::FORWARD_VIA_STACK != 0 },
        None => false,
    };
    if stack || p.vlan {
        count(stat::FWD_STACK);
        return Verdict::Pass;
    }
    let data = ctx.data();
    let end = ctx.data_end();
    unsafe {
        let Some(hdr) = ptr_at::<[u8; 20]>(p.ip, end, 0) else {
            return Verdict::Pass;
        };
        let Some(eth) = ptr_at::<[u16; 6]>(data, end, 0) else {
            return Verdict::Pass;
        };
        let h = &mut *hdr;
        let ttl = h[8];
        if ttl <= 1 {
            count(stat::PASS_TTL);
            return Verdict::Pass;
        }
        let cached = !ct.is_null() && (*ct).nh_ifindex != 0 && now < (*ct).nh_expiry_ns;
        let (ifindex, macs) = if cached {
            ((*ct).nh_ifindex, (*ct).nh_macs)
        } else {
            match fib(ctx, h, p) {
                Some((ifindex, macs)) => {
                    if !ct.is_null() {
                        (*ct).nh_ifindex = ifindex;
                        (*ct).nh_macs = macs;
                        (*ct).nh_expiry_ns = now + NH_CACHE_NS;
                    }
                    (ifindex, macs)
                }
                None => {
                    if !ct.is_null() {
                        (*ct).nh_ifindex = 0;
                    }
                    count(stat::FWD_STACK);
                    return Verdict::Pass;
                }
            }
        };
        // Decrement TTL as a router does; fix the header checksum.
        let old = u16::from_ne_bytes([h[8], h[9]]);
        let new = u16::from_ne_bytes([ttl - 1, h[9]]);
        let c = csum::replace2(u16::from_ne_bytes([h[10], h[11]]), old, new);
        h[8] = ttl - 1;
        let cb = c.to_ne_bytes();
        h[10] = cb[0];
        h[11] = cb[1];
        let e = &mut *eth;
        e[0] = macs[0];
        e[1] = macs[1];
        e[2] = macs[2];
        e[3] = macs[3];
        e[4] = macs[4];
        e[5] = macs[5];
        count(stat::FWD_REDIRECT);
        if ifindex == ctx.ifindex() {
            Verdict::Tx
        } else {
            Verdict::Redirect(ifindex)
        }
    }
}
