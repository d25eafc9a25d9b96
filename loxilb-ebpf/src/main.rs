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
mod lb;
mod maps;
mod nat;
mod parse;
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
    ctx::xdp_action(lb::process(&ctx))
}

/// The same datapath on a TC (clsact) hook, for paths XDP does not see.
#[classifier]
pub fn loxilb_tc(ctx: TcContext) -> i32 {
    let ifindex = ctx.ifindex();
    ctx::tc_action(lb::process(&ctx), ifindex)
}

/// A program that only passes: the benchmark floor, and what the tests put
/// on veth peers so native XDP redirect can deliver to them.
#[xdp]
pub fn loxilb_xdp_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// Zero `*p` in place with volatile 32-bit stores, so LLVM cannot turn it
/// into a call to `memset` (which the BPF backend emits as a byte loop).
#[inline(always)]
pub(crate) unsafe fn zero_in_place<T>(p: *mut T) {
    const { assert!(core::mem::size_of::<T>() % 4 == 0 && core::mem::align_of::<T>() >= 4) };
    let w = p as *mut u32;
    let mut i = 0;
    while i < core::mem::size_of::<T>() / 4 {
        unsafe { core::ptr::write_volatile(w.add(i), 0) };
        i += 1;
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
