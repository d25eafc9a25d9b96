//! ICMP: echo requests to a VIP are answered here (the VIP is not an
//! address of the node, so the stack would not); ICMP errors about a
//! translated packet (destination unreachable, fragmentation needed, time
//! exceeded, parameter problem) are translated back to the view the
//! offending packet's sender has, so path-MTU discovery works through the
//! load balancer. The inner TCP/UDP checksum is left alone (nobody verifies
//! it in an ICMP error; its field may not even be quoted).

use loxilb_common::{csum, is_v4, stat, v4_mapped, Addr, CtKey, IPPROTO_TCP, IPPROTO_UDP};

use crate::{
    maps::{count, LB_CT, LB_VIPS},
    nat::replace_addr,
    parse::{ptr_at, Icmp, Icmp6},
};

const ECHO_REQUEST: u8 = 8;
const DEST_UNREACH: u8 = 3;
const TIME_EXCEEDED: u8 = 11;
const PARAM_PROBLEM: u8 = 12;

#[inline(always)]
fn w(a: u8, b: u8) -> u16 {
    u16::from_ne_bytes([a, b])
}

/// Whether `len` bytes at `at` lie inside the IP packet ending at
/// `ip_end`. (Checked after the frame bounds checks, never instead of
/// them: `ip_end` is within the frame, and a check against it placed first
/// lets LLVM drop the later one the verifier needs.)
#[inline(always)]
fn within(at: usize, len: usize, ip_end: usize) -> bool {
    at + len <= ip_end
}

/// Swap the destination and source MACs (a reply goes back the way the
/// request came).
#[inline(always)]
fn swap_macs(e: &mut [u16; 6]) {
    let mut i = 0;
    while i < 3 {
        let t = e[i];
        e[i] = e[i + 3];
        e[i + 3] = t;
        i += 1;
    }
}

/// Answer an echo request to a VIP in place (the caller transmits it back
/// out of the interface it came in on). False if it is not one.
#[inline(always)]
pub fn echo_reply(data: usize, end: usize, p: &Icmp) -> bool {
    unsafe {
        let Some(ih) = ptr_at::<[u8; 4]>(p.l4, end, 0) else {
            return false;
        };
        let ih = &mut *ih;
        // The 8-byte header inside the IP packet (its total length may
        // end before the frame does: the rest is padding).
        if !within(p.l4, 8, p.ip_end) {
            return false;
        }
        if ih[0] != ECHO_REQUEST || ih[1] != 0 || LB_VIPS.get_ptr(&v4_mapped(p.daddr)).is_none() {
            return false;
        }
        let (Some(hdr), Some(eth)) = (
            ptr_at::<[u8; 20]>(p.ip, end, 0),
            ptr_at::<[u16; 6]>(data, end, 0),
        ) else {
            return false;
        };
        let h = &mut *hdr;
        // Swap addresses (the header sum does not change), fresh TTL.
        let old = w(h[8], h[9]);
        let c = csum::replace2(w(h[10], h[11]), old, w(64, h[9]));
        h[8] = 64;
        let cb = c.to_ne_bytes();
        h[10] = cb[0];
        h[11] = cb[1];
        let mut i = 12;
        while i < 16 {
            let t = h[i];
            h[i] = h[i + 4];
            h[i + 4] = t;
            i += 1;
        }
        // Echo reply: type 8 -> 0.
        let c = csum::replace2(w(ih[2], ih[3]), w(ECHO_REQUEST, ih[1]), w(0, ih[1]));
        ih[0] = 0;
        let cb = c.to_ne_bytes();
        ih[2] = cb[0];
        ih[3] = cb[1];
        swap_macs(&mut *eth);
        count(stat::ICMP_ECHO_REPLIED);
        true
    }
}

/// If `p` is an ICMP error quoting a packet this load balancer translated,
/// rewrite it (in place) as the sender of that packet must see it: the
/// quoted header back to its original addresses and ports, the outer
/// destination to that sender, and the outer source to the service when
/// the endpoint itself reported the error. True if rewritten.
#[inline(always)]
pub fn translate_error(end: usize, p: &Icmp) -> bool {
    unsafe {
        let Some(ih) = ptr_at::<[u8; 4]>(p.l4, end, 0) else {
            return false;
        };
        let ih = &mut *ih;
        let t = ih[0];
        if t != DEST_UNREACH && t != TIME_EXCEEDED && t != PARAM_PROBLEM {
            return false;
        }
        let inner_ip = p.l4 + 8;
        let Some(inner) = ptr_at::<[u8; 20]>(inner_ip, end, 0) else {
            return false;
        };
        let inner = &mut *inner;
        if inner[0] >> 4 != 4 {
            return false;
        }
        let ihl = ((inner[0] & 0x0f) as usize) << 2;
        if ihl < 20 {
            return false;
        }
        let proto = inner[9];
        if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
            return false;
        }
        let Some(ports) = ptr_at::<[u16; 2]>(inner_ip + ihl, end, 0) else {
            return false;
        };
        // The quoted header and ports inside the IP packet.
        if !within(inner_ip + ihl, 4, p.ip_end) {
            return false;
        }
        let ports = &mut *ports;
        let ins = u32::from_ne_bytes([inner[12], inner[13], inner[14], inner[15]]);
        let ind = u32::from_ne_bytes([inner[16], inner[17], inner[18], inner[19]]);
        let (isp, idp) = (ports[0], ports[1]);
        // The quoted packet was the output of a translation; the session's
        // entry for the opposite direction maps its reverse to the
        // original view.
        let key = CtKey {
            saddr: v4_mapped(ind),
            daddr: v4_mapped(ins),
            sport: idp,
            dport: isp,
            proto,
            _pad1: 0,
            _pad2: 0,
        };
        let (ns, nd, nsp, ndp) = match LB_CT.get_ptr(&key) {
            Some(e) => {
                // IPv4 sessions only (a NAT64 session's errors are not
                // translated).
                if !is_v4(&(*e).xdaddr) {
                    return false;
                }
                ((*e).xdaddr[3], (*e).xsaddr[3], (*e).xdport, (*e).xsport)
            }
            // No reply entry: a packet a one-entry session sent to its
            // endpoint, whose original view is client -> service.
            None => match crate::conntrack::one_entry_service(
                &key.saddr, key.sport, &key.daddr, key.dport, proto,
            ) {
                Some((vip, vport)) if is_v4(&vip) => (ins, vip[3], isp, vport),
                _ => return false,
            },
        };
        let Some(outer) = ptr_at::<[u8; 20]>(p.ip, end, 0) else {
            return false;
        };
        let outer = &mut *outer;
        // Quoted header and the ICMP checksum over it.
        let mut ic = w(ih[2], ih[3]);
        let old_inner_c = w(inner[10], inner[11]);
        let mut inner_c = csum::replace4(old_inner_c, ins, ns);
        inner_c = csum::replace4(inner_c, ind, nd);
        ic = csum::replace4(ic, ins, ns);
        ic = csum::replace4(ic, ind, nd);
        ic = csum::replace2(ic, old_inner_c, inner_c);
        ic = csum::replace2(ic, isp, nsp);
        ic = csum::replace2(ic, idp, ndp);
        let sb = ns.to_ne_bytes();
        let db = nd.to_ne_bytes();
        inner[12..16].copy_from_slice(&sb);
        inner[16..20].copy_from_slice(&db);
        let cb = inner_c.to_ne_bytes();
        inner[10] = cb[0];
        inner[11] = cb[1];
        ports[0] = nsp;
        ports[1] = ndp;
        let cb = ic.to_ne_bytes();
        ih[2] = cb[0];
        ih[3] = cb[1];
        // Outer header: to the original sender; from the service if the
        // endpoint (the quoted destination) reported it.
        let mut oc = w(outer[10], outer[11]);
        oc = csum::replace4(oc, p.daddr, ns);
        outer[16..20].copy_from_slice(&sb);
        if p.saddr == ind {
            oc = csum::replace4(oc, p.saddr, nd);
            outer[12..16].copy_from_slice(&db);
        }
        let cb = oc.to_ne_bytes();
        outer[10] = cb[0];
        outer[11] = cb[1];
        count(stat::ICMP_ERR_XLATED);
        true
    }
}

const ICMP6_DEST_UNREACH: u8 = 1;
const ICMP6_PACKET_TOO_BIG: u8 = 2;
const ICMP6_TIME_EXCEEDED: u8 = 3;
const ICMP6_PARAM_PROBLEM: u8 = 4;
const ICMP6_ECHO_REQUEST: u8 = 128;
const ICMP6_ECHO_REPLY: u8 = 129;

/// Write `a` into the packet at `dst` word by word.
#[inline(always)]
unsafe fn put_addr(dst: *mut Addr, a: &Addr) {
    unsafe { crate::set_addr(&mut *dst, a) };
}

/// ICMPv6 echo request to a VIP: answered in place (the caller transmits
/// it back). False if it is not one.
#[inline(always)]
pub fn echo_reply6(data: usize, end: usize, p: &Icmp6) -> bool {
    unsafe {
        let Some(ih) = ptr_at::<[u8; 4]>(p.l4, end, 0) else {
            return false;
        };
        let ih = &mut *ih;
        if !within(p.l4, 8, p.ip_end) {
            return false;
        }
        if ih[0] != ICMP6_ECHO_REQUEST || ih[1] != 0 || LB_VIPS.get_ptr(&p.daddr).is_none() {
            return false;
        }
        let (Some(hdr), Some(eth)) = (
            ptr_at::<[u8; 8]>(p.ip, end, 0),
            ptr_at::<[u16; 6]>(data, end, 0),
        ) else {
            return false;
        };
        let Some(addrs) = ptr_at::<[Addr; 2]>(p.ip, end, 8) else {
            return false;
        };
        // Swapped addresses: the pseudo-header sums the same.
        put_addr(&mut (*addrs)[0], &p.daddr);
        put_addr(&mut (*addrs)[1], &p.saddr);
        (*hdr)[7] = 64;
        let c = csum::replace2(
            w(ih[2], ih[3]),
            w(ICMP6_ECHO_REQUEST, 0),
            w(ICMP6_ECHO_REPLY, 0),
        );
        ih[0] = ICMP6_ECHO_REPLY;
        let cb = c.to_ne_bytes();
        ih[2] = cb[0];
        ih[3] = cb[1];
        swap_macs(&mut *eth);
        count(stat::ICMP_ECHO_REPLIED);
        true
    }
}

/// The IPv6 [`translate_error`]: an ICMPv6 error (destination unreachable,
/// packet too big, time exceeded, parameter problem) quoting a packet this
/// load balancer translated is rewritten for that packet's sender: the
/// quoted header and ports back to the original view, the destination to
/// that sender, the source to the service when the endpoint reported it.
/// The ICMPv6 checksum (over the pseudo-header too) is updated
/// incrementally. True if rewritten.
#[inline(always)]
pub fn translate_error6(end: usize, p: &Icmp6) -> bool {
    unsafe {
        let Some(ih) = ptr_at::<[u8; 4]>(p.l4, end, 0) else {
            return false;
        };
        let ih = &mut *ih;
        let t = ih[0];
        if t != ICMP6_DEST_UNREACH
            && t != ICMP6_PACKET_TOO_BIG
            && t != ICMP6_TIME_EXCEEDED
            && t != ICMP6_PARAM_PROBLEM
        {
            return false;
        }
        let inner_ip = p.l4 + 8;
        let Some(inner) = ptr_at::<[u32; 10]>(inner_ip, end, 0) else {
            return false;
        };
        let Some(ports) = ptr_at::<[u16; 2]>(inner_ip, end, 40) else {
            return false;
        };
        // The quoted header and ports inside the IPv6 packet, and an IPv6
        // header indeed.
        if !within(inner_ip + 40, 4, p.ip_end) {
            return false;
        }
        let inner = &mut *inner;
        if inner[0].to_ne_bytes()[0] >> 4 != 6 {
            return false;
        }
        let nh = inner[1].to_ne_bytes()[2];
        if nh != IPPROTO_TCP && nh != IPPROTO_UDP {
            return false;
        }
        let ins: Addr = [inner[2], inner[3], inner[4], inner[5]];
        let ind: Addr = [inner[6], inner[7], inner[8], inner[9]];
        let ports = &mut *ports;
        let (isp, idp) = (ports[0], ports[1]);
        let key = CtKey {
            saddr: ind,
            daddr: ins,
            sport: idp,
            dport: isp,
            proto: nh,
            _pad1: 0,
            _pad2: 0,
        };
        let (ns, nd, nsp, ndp) = match LB_CT.get_ptr(&key) {
            Some(e) => {
                if is_v4(&(*e).xdaddr) {
                    return false;
                }
                ((*e).xdaddr, (*e).xsaddr, (*e).xdport, (*e).xsport)
            }
            // No reply entry: a packet a one-entry session sent to its
            // endpoint, whose original view is client -> service.
            None => match crate::conntrack::one_entry_service(
                &key.saddr, key.sport, &key.daddr, key.dport, nh,
            ) {
                Some((vip, vport)) if !is_v4(&vip) => (ins, vip, isp, vport),
                _ => return false,
            },
        };
        let Some(outer) = ptr_at::<[Addr; 2]>(p.ip, end, 8) else {
            return false;
        };
        let mut ic = w(ih[2], ih[3]);
        ic = replace_addr(ic, &ins, &ns);
        ic = replace_addr(ic, &ind, &nd);
        ic = csum::replace2(ic, isp, nsp);
        ic = csum::replace2(ic, idp, ndp);
        ic = replace_addr(ic, &p.daddr, &ns);
        let from_endpoint = p.saddr == ind;
        if from_endpoint {
            ic = replace_addr(ic, &p.saddr, &nd);
        }
        let mut i = 0;
        while i < 4 {
            inner[2 + i] = ns[i];
            inner[6 + i] = nd[i];
            i += 1;
        }
        ports[0] = nsp;
        ports[1] = ndp;
        put_addr(&mut (*outer)[1], &ns);
        if from_endpoint {
            put_addr(&mut (*outer)[0], &nd);
        }
        let cb = ic.to_ne_bytes();
        ih[2] = cb[0];
        ih[3] = cb[1];
        count(stat::ICMP_ERR_XLATED);
        true
    }
}
