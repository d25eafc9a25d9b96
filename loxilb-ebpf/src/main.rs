//! loxilb eBPF datapath: XDP (and TC) entry points over one shared
//! implementation in `lb`.
#![no_std]
#![no_main]
// Atomic add on map memory (per-endpoint active sessions).
#![feature(core_intrinsics)]
#![allow(internal_features)]
// Map keys are passed by reference on purpose: no extra copies on the
// 512-byte BPF stack.
#![allow(clippy::needless_borrows_for_generic_args)]

mod conntrack;
mod ctx;
mod fwd;
mod icmp;
mod lb;
mod maps;
mod nat;
mod nat64;
mod parse;
mod sctp;
mod select;

use aya_ebpf::{
    bindings::xdp_action,
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};

use crate::ctx::PktCtx;

/// The load balancer on an interface's XDP hook.
#[xdp]
pub fn loxilb_xdp(ctx: XdpContext) -> u32 {
    ctx::xdp_action(lb::process::<_, false>(&ctx))
}

/// Its IPv6 half, tail-called by `loxilb_xdp`.
#[xdp]
pub fn loxilb_xdp6(ctx: XdpContext) -> u32 {
    ctx::xdp_action(lb::process::<_, true>(&ctx))
}

/// New flows (conntrack misses) of `loxilb_xdp`, tail-called.
#[xdp]
pub fn loxilb_xdp_new4(ctx: XdpContext) -> u32 {
    ctx::xdp_action(lb::process_new::<_, false>(&ctx))
}

/// New flows of `loxilb_xdp6`, tail-called.
#[xdp]
pub fn loxilb_xdp_new6(ctx: XdpContext) -> u32 {
    ctx::xdp_action(lb::process_new::<_, true>(&ctx))
}

/// The same datapath on a TC (clsact) hook, for paths XDP does not see.
#[classifier]
pub fn loxilb_tc(ctx: TcContext) -> i32 {
    let ifindex = ctx.ifindex();
    ctx::tc_action(lb::process::<_, false>(&ctx), ifindex)
}

/// Its IPv6 half, tail-called by `loxilb_tc`.
#[classifier]
pub fn loxilb_tc6(ctx: TcContext) -> i32 {
    let ifindex = ctx.ifindex();
    ctx::tc_action(lb::process::<_, true>(&ctx), ifindex)
}

/// New flows of `loxilb_tc`, tail-called.
#[classifier]
pub fn loxilb_tc_new4(ctx: TcContext) -> i32 {
    let ifindex = ctx.ifindex();
    ctx::tc_action(lb::process_new::<_, false>(&ctx), ifindex)
}

/// New flows of `loxilb_tc6`, tail-called.
#[classifier]
pub fn loxilb_tc_new6(ctx: TcContext) -> i32 {
    let ifindex = ctx.ifindex();
    ctx::tc_action(lb::process_new::<_, true>(&ctx), ifindex)
}

/// IPv6 replies to one-entry sessions, tail-called by `loxilb_xdp6`.
#[xdp]
pub fn loxilb_xdp_one6(ctx: XdpContext) -> u32 {
    ctx::xdp_action(lb::process_one6(&ctx))
}

/// IPv6 replies to one-entry sessions, tail-called by `loxilb_tc6`.
#[classifier]
pub fn loxilb_tc_one6(ctx: TcContext) -> i32 {
    let ifindex = ctx.ifindex();
    ctx::tc_action(lb::process_one6(&ctx), ifindex)
}

/// SCTP INIT / INIT-ACK of `loxilb_xdp` / `loxilb_xdp_new4`, tail-called.
#[xdp]
pub fn loxilb_xdp_sctp4(ctx: XdpContext) -> u32 {
    ctx::xdp_action(lb::process_sctp::<_, false>(&ctx))
}

/// SCTP INIT / INIT-ACK of the IPv6 programs, tail-called.
#[xdp]
pub fn loxilb_xdp_sctp6(ctx: XdpContext) -> u32 {
    ctx::xdp_action(lb::process_sctp::<_, true>(&ctx))
}

/// SCTP INIT / INIT-ACK of `loxilb_tc` / `loxilb_tc_new4`, tail-called.
#[classifier]
pub fn loxilb_tc_sctp4(ctx: TcContext) -> i32 {
    let ifindex = ctx.ifindex();
    ctx::tc_action(lb::process_sctp::<_, false>(&ctx), ifindex)
}

/// SCTP INIT / INIT-ACK of the IPv6 TC programs, tail-called.
#[classifier]
pub fn loxilb_tc_sctp6(ctx: TcContext) -> i32 {
    let ifindex = ctx.ifindex();
    ctx::tc_action(lb::process_sctp::<_, true>(&ctx), ifindex)
}

/// One INIT / INIT-ACK parameter per call, either family (tail-called by
/// the XDP SCTP programs and by itself).
#[xdp]
pub fn loxilb_xdp_sctp_param(ctx: XdpContext) -> u32 {
    sctp::param_step(&ctx);
    ctx::xdp_action(ctx::Verdict::Drop)
}

/// One INIT / INIT-ACK parameter per call (the TC SCTP programs').
#[classifier]
pub fn loxilb_tc_sctp_param(ctx: TcContext) -> i32 {
    let ifindex = ctx.ifindex();
    sctp::param_step(&ctx);
    ctx::tc_action(ctx::Verdict::Drop, ifindex)
}

/// TC egress: translates ICMP errors the stack generates about translated
/// packets; passes everything.
#[classifier]
pub fn loxilb_tc_egress(ctx: TcContext) -> i32 {
    let ifindex = ctx.ifindex();
    ctx::tc_action(lb::egress(&ctx), ifindex)
}

/// A program that only passes: the benchmark floor, and what the tests put
/// on veth peers so native XDP redirect can deliver to them.
#[xdp]
pub fn loxilb_xdp_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// Zero `*p` in place with volatile stores, so LLVM cannot turn it into a
/// call to `memset` (which the BPF backend emits as a byte loop): 64-bit
/// stores where the type allows (half as many instructions: a new
/// session zeroes two 136-byte values), else 32-bit ones.
#[inline(always)]
pub(crate) unsafe fn zero_in_place<T>(p: *mut T) {
    const { assert!(core::mem::size_of::<T>() % 4 == 0 && core::mem::align_of::<T>() >= 4) };
    if core::mem::size_of::<T>() % 8 == 0 && core::mem::align_of::<T>() >= 8 {
        let w = p as *mut u64;
        let mut i = 0;
        while i < core::mem::size_of::<T>() / 8 {
            unsafe { core::ptr::write_volatile(w.add(i), 0) };
            i += 1;
        }
    } else {
        let w = p as *mut u32;
        let mut i = 0;
        while i < core::mem::size_of::<T>() / 4 {
            unsafe { core::ptr::write_volatile(w.add(i), 0) };
            i += 1;
        }
    }
}

/// `*dst = *src` for an address, with volatile word stores: a plain copy
/// between map values becomes a `memmove` call in BPF.
#[inline(always)]
pub(crate) fn set_addr(dst: &mut loxilb_common::Addr, src: &loxilb_common::Addr) {
    let d = dst.as_mut_ptr();
    let mut i = 0;
    while i < 4 {
        unsafe { core::ptr::write_volatile(d.add(i), src[i]) };
        i += 1;
    }
}

/// IPIP decapsulation, for the endpoints of an IPIP-DSR rule (this
/// kernel has no ipip module): an IPv4-in-IPv4 packet loses its outer
/// header and goes up the stack as the inner packet; anything else passes.
#[xdp]
pub fn loxilb_decap(ctx: XdpContext) -> u32 {
    let data = ctx.data();
    let end = ctx.data_end();
    if data + 14 + 20 + 20 > end {
        return xdp_action::XDP_PASS;
    }
    unsafe {
        let proto = *((data + 12) as *const u16);
        let ver_ihl = *((data + 14) as *const u8);
        let l4 = *((data + 14 + 9) as *const u8);
        if proto != 0x0800u16.to_be() || ver_ihl != 0x45 || l4 != 4 {
            return xdp_action::XDP_PASS;
        }
        // Move the Ethernet header over the outer IP header, then drop the
        // first 20 bytes.
        let src = data as *const u16;
        let dst = (data + 20) as *mut u16;
        let mut i = 7;
        while i > 0 {
            i -= 1;
            core::ptr::write_volatile(dst.add(i), core::ptr::read_volatile(src.add(i)));
        }
        if aya_ebpf::helpers::bpf_xdp_adjust_head(ctx.ctx, 20) != 0 {
            return xdp_action::XDP_DROP;
        }
    }
    xdp_action::XDP_PASS
}

/// Calibration of the datapath's clock (see `loxilb_common::Clock`):
/// `bpf_jiffies64()` and `bpf_ktime_get_coarse_ns()` read within one tick
/// (the jiffies read again after the clock, until it has not moved),
/// written to `LB_CLOCK`. Run by the agent with `BPF_PROG_TEST_RUN`;
/// returns XDP_PASS with a sample written, XDP_ABORTED without.
#[xdp]
pub fn loxilb_clock(_ctx: XdpContext) -> u32 {
    let Some(c) = maps::LB_CLOCK.get_ptr_mut(0) else {
        return xdp_action::XDP_ABORTED;
    };
    let mut i = 0;
    while i < 4 {
        let (j, ns, j2) = unsafe {
            let j = aya_ebpf::helpers::bpf_jiffies64();
            let ns = aya_ebpf::helpers::bpf_ktime_get_coarse_ns();
            (j, ns, aya_ebpf::helpers::bpf_jiffies64())
        };
        if j == j2 {
            unsafe {
                (*c).sample_jiffies = j;
                (*c).sample_coarse_ns = ns;
            }
            return xdp_action::XDP_PASS;
        }
        i += 1;
    }
    xdp_action::XDP_ABORTED
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
