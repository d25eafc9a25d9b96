//! Rewrite a parsed packet to a translated tuple, keeping the IPv4 header
//! checksum and the TCP/UDP checksum right incrementally (RFC 1624). A UDP
//! checksum of 0 ("none") stays 0.

use loxilb_common::{csum, IPPROTO_TCP};

use crate::parse::{ptr_at, Pkt};

/// Rewrite addresses/ports that differ from `(xs, xd, xsp, xdp)`.
/// Returns false (packet untouched) if a header could not be reached.
#[inline(always)]
pub fn rewrite(p: &Pkt, end: usize, xs: u32, xd: u32, xsp: u16, xdp: u16) -> bool {
    unsafe {
        let Some(ipc) = ptr_at::<u16>(p.ip, end, 10) else {
            return false;
        };
        let l4c_off = if p.proto == IPPROTO_TCP { 16 } else { 6 };
        let Some(l4c) = ptr_at::<u16>(p.l4, end, l4c_off) else {
            return false;
        };
        let Some(ports) = ptr_at::<[u16; 2]>(p.l4, end, 0) else {
            return false;
        };
        let Some(addrs) = ptr_at::<[u32; 2]>(p.ip, end, 12) else {
            return false;
        };
        let mut ic = *ipc;
        let mut lc = *l4c;
        // UDP over IPv4 may carry no checksum (0): leave it so.
        let l4_sum = p.proto == IPPROTO_TCP || lc != 0;
        if xs != p.saddr {
            ic = csum::replace4(ic, p.saddr, xs);
            lc = csum::replace4(lc, p.saddr, xs);
            (*addrs)[0] = xs;
        }
        if xd != p.daddr {
            ic = csum::replace4(ic, p.daddr, xd);
            lc = csum::replace4(lc, p.daddr, xd);
            (*addrs)[1] = xd;
        }
        if xsp != p.sport {
            lc = csum::replace2(lc, p.sport, xsp);
            (*ports)[0] = xsp;
        }
        if xdp != p.dport {
            lc = csum::replace2(lc, p.dport, xdp);
            (*ports)[1] = xdp;
        }
        *ipc = ic;
        if l4_sum {
            // A computed UDP checksum of 0 is sent as 0xffff (RFC 768).
            if lc == 0 && p.proto != IPPROTO_TCP {
                lc = 0xffff;
            }
            *l4c = lc;
        }
        true
    }
}
