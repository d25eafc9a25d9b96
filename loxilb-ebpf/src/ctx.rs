//! A packet context both XDP and TC programs can drive: the datapath logic
//! is written once over this trait.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, xdp_action, TC_ACT_OK, TC_ACT_SHOT},
    helpers::{bpf_redirect, bpf_skb_adjust_room, bpf_xdp_adjust_head},
    programs::{TcContext, XdpContext},
    EbpfContext,
};

/// What the datapath decided for a packet.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Hand to the kernel stack (untouched, or translated).
    Pass,
    Drop,
    /// Send back out of the interface it came in on.
    Tx,
    /// Send out of another interface.
    Redirect(u32),
}

pub trait PktCtx {
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
    fn ifindex(&self) -> u32;
    fn raw(&self) -> *mut c_void;
    /// Insert `len` bytes right after the Ethernet header (for an outer
    /// L3 header); every packet pointer is invalid afterwards.
    fn grow_l3(&self, len: u32) -> bool;
}

impl PktCtx for XdpContext {
    #[inline(always)]
    fn grow_l3(&self, len: u32) -> bool {
        if unsafe { bpf_xdp_adjust_head(self.ctx, -(len as i32)) } != 0 {
            return false;
        }
        // Move the Ethernet header to the new front.
        let data = self.data();
        let end = self.data_end();
        if data + len as usize + 14 > end || len > 64 {
            return false;
        }
        unsafe {
            // Word by word (volatile): a plain copy becomes a memmove call.
            let src = (data + len as usize) as *const u16;
            let dst = data as *mut u16;
            let mut i = 0;
            while i < 7 {
                core::ptr::write_volatile(dst.add(i), core::ptr::read_volatile(src.add(i)));
                i += 1;
            }
        }
        true
    }
    #[inline(always)]
    fn data(&self) -> usize {
        XdpContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        XdpContext::data_end(self)
    }
    #[inline(always)]
    fn ifindex(&self) -> u32 {
        self.ingress_ifindex() as u32
    }
    #[inline(always)]
    fn raw(&self) -> *mut c_void {
        self.as_ptr()
    }
}

impl PktCtx for TcContext {
    #[inline(always)]
    fn grow_l3(&self, len: u32) -> bool {
        unsafe { bpf_skb_adjust_room(self.skb.skb, len as i32, BPF_ADJ_ROOM_MAC, 0) == 0 }
    }
    #[inline(always)]
    fn data(&self) -> usize {
        TcContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        TcContext::data_end(self)
    }
    #[inline(always)]
    fn ifindex(&self) -> u32 {
        unsafe { (*self.skb.skb).ifindex }
    }
    #[inline(always)]
    fn raw(&self) -> *mut c_void {
        self.as_ptr()
    }
}

#[inline(always)]
pub fn xdp_action(v: Verdict) -> u32 {
    match v {
        Verdict::Pass => xdp_action::XDP_PASS,
        Verdict::Drop => xdp_action::XDP_DROP,
        Verdict::Tx => xdp_action::XDP_TX,
        Verdict::Redirect(ifindex) => unsafe { bpf_redirect(ifindex, 0) as u32 },
    }
}

#[inline(always)]
pub fn tc_action(v: Verdict, ingress: u32) -> i32 {
    match v {
        Verdict::Pass => TC_ACT_OK,
        Verdict::Drop => TC_ACT_SHOT,
        Verdict::Tx => unsafe { bpf_redirect(ingress, 0) as i32 },
        Verdict::Redirect(ifindex) => unsafe { bpf_redirect(ifindex, 0) as i32 },
    }
}
