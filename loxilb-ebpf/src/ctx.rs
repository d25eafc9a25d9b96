//! A packet context both XDP and TC programs can drive: the datapath logic
//! is written once over this trait.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, xdp_action, TC_ACT_OK, TC_ACT_SHOT},
    btf_maps::ProgramArray,
    helpers::{bpf_redirect, bpf_skb_adjust_room, bpf_skb_change_proto, bpf_xdp_adjust_head},
    macros::btf_map,
    programs::{TcContext, XdpContext},
    EbpfContext,
};

/// Tail-call targets of the XDP and TC programs (one array per program
/// type; the agent fills them after loading), indexed by
/// `loxilb_common::JMP_*`.
#[btf_map]
pub static LB_JMP_XDP: ProgramArray<{ JMP_SLOTS as usize }> = ProgramArray::new();
#[btf_map]
pub static LB_JMP_TC: ProgramArray<{ JMP_SLOTS as usize }> = ProgramArray::new();
use loxilb_common::JMP_SLOTS;

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
    /// An XDP hook (its redirects need a device that takes XDP frames); a
    /// TC hook's redirects go through the device's ordinary transmit path.
    const XDP: bool;
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
    fn ifindex(&self) -> u32;
    fn raw(&self) -> *mut c_void;
    /// Insert `len` bytes right after the Ethernet header (for an outer
    /// L3 header); every packet pointer is invalid afterwards.
    fn grow_l3(&self, len: u32) -> bool;
    /// NAT64: make the IPv6 packet's L3 header 20 bytes shorter (the
    /// frame then holds the Ethernet header, with EtherType IPv4, and 20
    /// bytes for the IPv4 header the caller writes, then the L4 header).
    fn to_v4(&self) -> bool;
    /// NAT64 replies: make the IPv4 packet's L3 header 20 bytes longer
    /// (Ethernet header with EtherType IPv6, 40 bytes for the caller's
    /// IPv6 header, then the L4 header).
    fn to_v6(&self) -> bool;
    /// Continue in program `idx` (`loxilb_common::JMP_*`) of this hook's
    /// tail-call array; returns only if it is not there.
    fn tail_call(&self, idx: u32);
}

/// Set the EtherType of the frame at `data` (no VLAN tag: the callers
/// translate untagged frames only).
#[inline(always)]
fn set_ethertype(data: usize, end: usize, proto_be: u16) -> bool {
    if data + 14 > end {
        return false;
    }
    unsafe { *((data + 12) as *mut u16) = proto_be };
    true
}

/// Copy the 14-byte Ethernet header from `src` to `dst` (word by word,
/// volatile: a plain copy becomes a memmove call). `dst < src`: copy
/// forwards; else backwards, so overlapping ranges are safe.
#[inline(always)]
unsafe fn move_eth(src: usize, dst: usize) {
    let s = src as *const u16;
    let d = dst as *mut u16;
    if dst < src {
        let mut i = 0;
        while i < 7 {
            unsafe { core::ptr::write_volatile(d.add(i), core::ptr::read_volatile(s.add(i))) };
            i += 1;
        }
    } else {
        let mut i = 7;
        while i > 0 {
            i -= 1;
            unsafe { core::ptr::write_volatile(d.add(i), core::ptr::read_volatile(s.add(i))) };
        }
    }
}

impl PktCtx for XdpContext {
    const XDP: bool = true;
    #[inline(always)]
    fn to_v4(&self) -> bool {
        let data = self.data();
        if data + 20 + 14 > self.data_end() {
            return false;
        }
        // Ethernet header 20 bytes later, then drop the first 20 bytes.
        unsafe { move_eth(data, data + 20) };
        if unsafe { bpf_xdp_adjust_head(self.ctx, 20) } != 0 {
            return false;
        }
        set_ethertype(self.data(), self.data_end(), 0x0800u16.to_be())
    }
    #[inline(always)]
    fn to_v6(&self) -> bool {
        if unsafe { bpf_xdp_adjust_head(self.ctx, -20) } != 0 {
            return false;
        }
        let data = self.data();
        if data + 20 + 14 > self.data_end() {
            return false;
        }
        unsafe { move_eth(data + 20, data) };
        set_ethertype(data, self.data_end(), 0x86ddu16.to_be())
    }
    #[inline(always)]
    fn tail_call(&self, idx: u32) {
        unsafe { LB_JMP_XDP.tail_call(self, idx) };
    }
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
    const XDP: bool = false;
    #[inline(always)]
    fn to_v4(&self) -> bool {
        // Removes 20 bytes right after the MAC header.
        if unsafe { bpf_skb_change_proto(self.skb.skb, 0x0800u16.to_be(), 0) } != 0 {
            return false;
        }
        set_ethertype(self.data(), self.data_end(), 0x0800u16.to_be())
    }
    #[inline(always)]
    fn to_v6(&self) -> bool {
        // Inserts 20 bytes right after the MAC header.
        if unsafe { bpf_skb_change_proto(self.skb.skb, 0x86ddu16.to_be(), 0) } != 0 {
            return false;
        }
        set_ethertype(self.data(), self.data_end(), 0x86ddu16.to_be())
    }
    #[inline(always)]
    fn tail_call(&self, idx: u32) {
        unsafe { LB_JMP_TC.tail_call(self, idx) };
    }
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
