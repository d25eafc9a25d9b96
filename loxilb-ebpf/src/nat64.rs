//! NAT64 (an IPv6 VIP whose endpoints are IPv4): the header is translated
//! between the families as RFC 7915 says for the fields that matter —
//! traffic class <-> TOS, hop limit <-> TTL (then decremented by
//! forwarding as any routed packet), payload length <-> total length, next
//! header <-> protocol, DF set above 1260 bytes — and the TCP/UDP checksum
//! is updated for the new pseudo-header. The packet shrinks or grows by 20
//! bytes.
//!
//! Not translated (dropped, `drop_nat64`): IPv6 packets with extension
//! headers, IPv4 packets with options, VLAN-tagged frames, IPv4 UDP
//! without a checksum (IPv6 requires one), and SCTP (its INIT address
//! parameters would need translating too; the agent refuses such rules). ICMP errors of NAT64 sessions
//! are not translated.

use loxilb_common::{csum, stat, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP};

use crate::{
    conntrack::Xlate,
    ctx::PktCtx,
    maps::count,
    nat::replace_addr,
    parse::{ptr_at, Pkt, ETH_HLEN},
};

#[inline(always)]
fn w(a: u8, b: u8) -> u16 {
    u16::from_ne_bytes([a, b])
}

/// Ports and the TCP/UDP checksum for translation `x` (in place; the L4
/// header does not move relative to the end of the packet). The
/// pseudo-header's length and protocol words sum the same in both
/// families, and an IPv4-mapped address sums as its IPv4 address (its
/// `0xffff` word is a one's-complement zero), so only the address words
/// change the sum.
#[inline(always)]
fn update_l4(p: &Pkt, end: usize, x: &Xlate) -> bool {
    unsafe {
        let l4c_off = if p.proto == IPPROTO_TCP { 16 } else { 6 };
        let Some(l4c) = ptr_at::<u16>(p.l4, end, l4c_off) else {
            return false;
        };
        let Some(ports) = ptr_at::<[u16; 2]>(p.l4, end, 0) else {
            return false;
        };
        let mut lc = *l4c;
        lc = replace_addr(lc, &p.saddr, &x.xs);
        lc = replace_addr(lc, &p.daddr, &x.xd);
        if x.xsp != p.sport {
            lc = csum::replace2(lc, p.sport, x.xsp);
            (*ports)[0] = x.xsp;
        }
        if x.xdp != p.dport {
            lc = csum::replace2(lc, p.dport, x.xdp);
            (*ports)[1] = x.xdp;
        }
        if lc == 0 && p.proto == IPPROTO_UDP {
            lc = 0xffff;
        }
        *l4c = lc;
        true
    }
}

#[inline(always)]
fn refuse() -> Option<Pkt> {
    count(stat::DROP_NAT64);
    None
}

/// IPv6 `p` -> IPv4 with tuple `x` (IPv4-mapped addresses). The
/// translated packet, or None (dropped, counted).
#[inline(always)]
pub fn to_v4<C: PktCtx>(ctx: &C, p: &Pkt, x: &Xlate) -> Option<Pkt> {
    let end = ctx.data_end();
    // (SCTP's address parameters would need translating too: not done.)
    if p.vlan || p.l4 != p.ip + 40 || p.proto == IPPROTO_SCTP {
        return refuse();
    }
    let Some(h) = (unsafe { ptr_at::<[u8; 8]>(p.ip, end, 0) }) else {
        return refuse();
    };
    let h = unsafe { &*h };
    let tos = (h[0] << 4) | (h[1] >> 4);
    let plen = u16::from_be_bytes([h[4], h[5]]);
    let hop = h[7];
    if plen > 65515 || !update_l4(p, end, x) || !ctx.to_v4() {
        return refuse();
    }
    let data = ctx.data();
    let end = ctx.data_end();
    let ip = data + ETH_HLEN;
    let Some(hdr) = (unsafe { ptr_at::<[u16; 10]>(ip, end, 0) }) else {
        return refuse();
    };
    let o = unsafe { &mut *hdr };
    let tot = plen + 20;
    let t = tot.to_be_bytes();
    let df: u8 = if tot > 1260 { 0x40 } else { 0 };
    let s = x.xs[3].to_ne_bytes();
    let d = x.xd[3].to_ne_bytes();
    o[0] = w(0x45, tos);
    o[1] = w(t[0], t[1]);
    o[2] = 0;
    o[3] = w(df, 0);
    o[4] = w(hop, p.proto);
    o[5] = 0;
    o[6] = w(s[0], s[1]);
    o[7] = w(s[2], s[3]);
    o[8] = w(d[0], d[1]);
    o[9] = w(d[2], d[3]);
    let mut sum = 0u32;
    for v in o.iter() {
        sum += *v as u32;
    }
    o[5] = !csum::fold(sum);
    Some(Pkt {
        ip,
        l4: ip + 20,
        saddr: x.xs,
        daddr: x.xd,
        sport: x.xsp,
        dport: x.xdp,
        proto: p.proto,
        vlan: false,
        l3_len: (end - ip) as u32,
        v6: false,
        sctp: p.sctp,
        l4_len: p.l4_len,
    })
}

/// IPv4 `p` (a NAT64 session's reply) -> IPv6 with tuple `x`. The
/// translated packet, or None (dropped, counted).
#[inline(always)]
pub fn to_v6<C: PktCtx>(ctx: &C, p: &Pkt, x: &Xlate) -> Option<Pkt> {
    let end = ctx.data_end();
    if p.vlan || p.l4 != p.ip + 20 || p.proto == IPPROTO_SCTP {
        return refuse();
    }
    let Some(h) = (unsafe { ptr_at::<[u8; 20]>(p.ip, end, 0) }) else {
        return refuse();
    };
    let h = unsafe { &*h };
    let tos = h[1];
    let tot = u16::from_be_bytes([h[2], h[3]]);
    let ttl = h[8];
    if tot < 20 {
        return refuse();
    }
    if p.proto == IPPROTO_UDP {
        // No checksum: IPv6 cannot carry that.
        match unsafe { ptr_at::<u16>(p.l4, end, 6) } {
            Some(c) if unsafe { *c } != 0 => {}
            _ => return refuse(),
        }
    }
    if !update_l4(p, end, x) || !ctx.to_v6() {
        return refuse();
    }
    let data = ctx.data();
    let end = ctx.data_end();
    let ip = data + ETH_HLEN;
    let Some(hdr) = (unsafe { ptr_at::<[u32; 10]>(ip, end, 0) }) else {
        return refuse();
    };
    let o = hdr as *mut u32;
    let plen = (tot - 20).to_be_bytes();
    let vtf = (6u32 << 28) | ((tos as u32) << 20);
    let words = [
        vtf.to_be(),
        u32::from_ne_bytes([plen[0], plen[1], p.proto, ttl]),
    ];
    unsafe {
        core::ptr::write_volatile(o, words[0]);
        core::ptr::write_volatile(o.add(1), words[1]);
        let mut i = 0;
        while i < 4 {
            core::ptr::write_volatile(o.add(2 + i), x.xs[i]);
            core::ptr::write_volatile(o.add(6 + i), x.xd[i]);
            i += 1;
        }
    }
    Some(Pkt {
        ip,
        l4: ip + 40,
        saddr: x.xs,
        daddr: x.xd,
        sport: x.xsp,
        dport: x.xdp,
        proto: p.proto,
        vlan: false,
        l3_len: (end - ip) as u32,
        v6: true,
        sctp: p.sctp,
        l4_len: p.l4_len,
    })
}
