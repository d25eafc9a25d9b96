//! Rewrite a parsed packet to a translated tuple, keeping the checksums
//! right incrementally (RFC 1624): the IPv4 header checksum, and the
//! TCP/UDP checksum, whose pseudo-header covers the addresses (IPv6 has no
//! header checksum). A UDP-over-IPv4 checksum of 0 ("none") stays 0. SCTP
//! has no pseudo-header: only a port change touches its CRC32c, which is
//! updated for the changed bytes alone (`crc32c::adjust_fast_u32`).

use loxilb_common::{crc32c, csum, Addr, IPPROTO_SCTP, IPPROTO_TCP};

use crate::{
    conntrack::Xlate,
    parse::{ptr_at, Pkt},
};

/// Rewrite addresses/ports that differ from `x` (of the packet's own
/// family). Returns false (packet untouched) if a header could not be
/// reached.
#[inline(always)]
pub fn rewrite(p: &Pkt, end: usize, x: &Xlate) -> bool {
    if p.proto == IPPROTO_SCTP {
        return rewrite_sctp(p, end, x);
    }
    unsafe {
        let l4c_off = if p.proto == IPPROTO_TCP { 16 } else { 6 };
        let Some(l4c) = ptr_at::<u16>(p.l4, end, l4c_off) else {
            return false;
        };
        let Some(ports) = ptr_at::<[u16; 2]>(p.l4, end, 0) else {
            return false;
        };
        let mut lc = *l4c;
        // UDP over IPv4 may carry no checksum (0): leave it so.
        let l4_sum = p.proto == IPPROTO_TCP || lc != 0 || p.v6;
        if p.v6 {
            let Some(addrs) = ptr_at::<[Addr; 2]>(p.ip, end, 8) else {
                return false;
            };
            lc = replace_addr(lc, &p.saddr, &x.xs);
            lc = replace_addr(lc, &p.daddr, &x.xd);
            (*addrs)[0] = x.xs;
            (*addrs)[1] = x.xd;
        } else {
            let Some(ipc) = ptr_at::<u16>(p.ip, end, 10) else {
                return false;
            };
            let Some(addrs) = ptr_at::<[u32; 2]>(p.ip, end, 12) else {
                return false;
            };
            let mut ic = *ipc;
            let (s, xs, d, xd) = (p.saddr[3], x.xs[3], p.daddr[3], x.xd[3]);
            if xs != s {
                ic = csum::replace4(ic, s, xs);
                lc = csum::replace4(lc, s, xs);
                (*addrs)[0] = xs;
            }
            if xd != d {
                ic = csum::replace4(ic, d, xd);
                lc = csum::replace4(lc, d, xd);
                (*addrs)[1] = xd;
            }
            *ipc = ic;
        }
        if x.xsp != p.sport {
            lc = csum::replace2(lc, p.sport, x.xsp);
            (*ports)[0] = x.xsp;
        }
        if x.xdp != p.dport {
            lc = csum::replace2(lc, p.dport, x.xdp);
            (*ports)[1] = x.xdp;
        }
        if l4_sum {
            // A computed UDP checksum of 0 is sent as 0xffff (RFC 768/8200).
            if lc == 0 && p.proto != IPPROTO_TCP {
                lc = 0xffff;
            }
            *l4c = lc;
        }
        true
    }
}

/// A checksum after a 16-byte address changed from `old` to `new`.
#[inline(always)]
pub fn replace_addr(mut c: u16, old: &Addr, new: &Addr) -> u16 {
    let mut i = 0;
    while i < 4 {
        if old[i] != new[i] {
            c = csum::replace4(c, old[i], new[i]);
        }
        i += 1;
    }
    c
}

/// SCTP: addresses (and the IPv4 header checksum), then the ports and the
/// CRC32c for them.
#[inline(always)]
fn rewrite_sctp(p: &Pkt, end: usize, x: &Xlate) -> bool {
    unsafe {
        if p.v6 {
            let Some(addrs) = ptr_at::<[Addr; 2]>(p.ip, end, 8) else {
                return false;
            };
            (*addrs)[0] = x.xs;
            (*addrs)[1] = x.xd;
        } else {
            let Some(ipc) = ptr_at::<u16>(p.ip, end, 10) else {
                return false;
            };
            let Some(addrs) = ptr_at::<[u32; 2]>(p.ip, end, 12) else {
                return false;
            };
            let mut ic = *ipc;
            ic = csum::replace4(ic, p.saddr[3], x.xs[3]);
            ic = csum::replace4(ic, p.daddr[3], x.xd[3]);
            (*addrs)[0] = x.xs[3];
            (*addrs)[1] = x.xd[3];
            *ipc = ic;
        }
        if x.xsp == p.sport && x.xdp == p.dport {
            return true;
        }
        let Some(ports) = ptr_at::<[u16; 2]>(p.l4, end, 0) else {
            return false;
        };
        let Some(crc) = ptr_at::<[u8; 4]>(p.l4, end, 8) else {
            return false;
        };
        if p.l4_len < 4 || p.l4_len > 0xffff {
            return false;
        }
        let old = *(ports as *const u32);
        let new = u32::from_ne_bytes({
            let a = x.xsp.to_ne_bytes();
            let b = x.xdp.to_ne_bytes();
            [a[0], a[1], b[0], b[1]]
        });
        let c = crc32c::adjust_fast_u32(crc32c::from_wire(*crc), old ^ new, (p.l4_len - 4) as u16);
        (*ports)[0] = x.xsp;
        (*ports)[1] = x.xdp;
        *crc = crc32c::to_wire(c);
        true
    }
}
