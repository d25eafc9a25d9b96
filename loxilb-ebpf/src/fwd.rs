//! Forwarding of translated packets: `bpf_fib_lookup` and redirect, or the
//! kernel stack when the FIB cannot answer (no neighbour yet, local
//! destination, forwarding disabled, VLAN-tagged frames).

use core::mem::size_of;

use aya_ebpf::{bindings::bpf_fib_lookup as FibParams, helpers::bpf_fib_lookup};
use loxilb_common::{cfg_flags, csum, stat};

use crate::{
    ctx::{PktCtx, Verdict},
    maps::{count, LB_CONFIG},
    parse::{ptr_at, Pkt},
};

const AF_INET: u8 = 2;
const BPF_FIB_LKUP_RET_SUCCESS: i64 = 0;

#[inline(always)]
pub fn forward<C: PktCtx>(ctx: &C, p: &Pkt) -> Verdict {
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
        let Some(eth) = ptr_at::<[u8; 12]>(data, end, 0) else {
            return Verdict::Pass;
        };
        let h = &mut *hdr;
        let mut params: FibParams = core::mem::zeroed();
        params.family = AF_INET;
        params.l4_protocol = h[9];
        params.sport = p.sport;
        params.dport = p.dport;
        params.__bindgen_anon_1.tot_len = u16::from_be_bytes([h[2], h[3]]);
        params.__bindgen_anon_2.tos = h[1];
        params.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes([h[12], h[13], h[14], h[15]]);
        params.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes([h[16], h[17], h[18], h[19]]);
        params.ifindex = ctx.ifindex();
        let rc = bpf_fib_lookup(ctx.raw(), &mut params, size_of::<FibParams>() as i32, 0);
        if rc != BPF_FIB_LKUP_RET_SUCCESS {
            count(stat::FWD_STACK);
            return Verdict::Pass;
        }
        let ttl = h[8];
        if ttl <= 1 {
            count(stat::PASS_TTL);
            return Verdict::Pass;
        }
        // Decrement TTL as a router does; fix the header checksum.
        let old = u16::from_ne_bytes([h[8], h[9]]);
        let new = u16::from_ne_bytes([ttl - 1, h[9]]);
        let c = csum::replace2(u16::from_ne_bytes([h[10], h[11]]), old, new);
        h[8] = ttl - 1;
        let cb = c.to_ne_bytes();
        h[10] = cb[0];
        h[11] = cb[1];
        let e = &mut *eth;
        e[0..6].copy_from_slice(&params.dmac);
        e[6..12].copy_from_slice(&params.smac);
        count(stat::FWD_REDIRECT);
        if params.ifindex == ctx.ifindex() {
            Verdict::Tx
        } else {
            Verdict::Redirect(params.ifindex)
        }
    }
}
