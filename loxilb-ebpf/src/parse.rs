//! Header parsing: Ethernet (+ one 802.1Q tag), IPv4 (options skipped,
//! fragments flagged), TCP/UDP ports. Every read is bounds-checked against
//! `data_end` so the verifier accepts it and garbage never over-reads.

use loxilb_common::{IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP};

pub const ETH_HLEN: usize = 14;
const ETH_P_IP_BE: u16 = 0x0800u16.to_be();
const ETH_P_8021Q_BE: u16 = 0x8100u16.to_be();
const ETH_P_8021AD_BE: u16 = 0x88a8u16.to_be();

/// Offsets (absolute addresses) and fields of a parsed IPv4 TCP/UDP packet.
pub struct Pkt {
    /// Start of the IPv4 header.
    pub ip: usize,
    /// Start of the TCP/UDP header.
    pub l4: usize,
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// Frame carried an 802.1Q/802.1ad tag.
    pub vlan: bool,
    /// Bytes from the IP header to the end of the frame.
    pub l3_len: u32,
}

/// An unfragmented IPv4 ICMP packet.
pub struct Icmp {
    pub ip: usize,
    /// Start of the ICMP header.
    pub l4: usize,
    pub saddr: u32,
    pub daddr: u32,
    pub vlan: bool,
}

pub enum Parsed {
    Pkt(Pkt),
    Icmp(Icmp),
    /// Not IPv4 TCP/UDP/ICMP: nothing for us.
    Other,
    Fragment,
    Malformed,
}

#[inline(always)]
pub unsafe fn ptr_at<T>(start: usize, end: usize, off: usize) -> Option<*mut T> {
    if start + off + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *mut T)
}

#[inline(always)]
pub fn parse(data: usize, end: usize) -> Parsed {
    unsafe {
        let Some(eth_proto) = ptr_at::<u16>(data, end, 12) else {
            return Parsed::Malformed;
        };
        let mut proto = *eth_proto;
        let mut l3 = ETH_HLEN;
        let mut vlan = false;
        if proto == ETH_P_8021Q_BE || proto == ETH_P_8021AD_BE {
            let Some(inner) = ptr_at::<u16>(data, end, 16) else {
                return Parsed::Malformed;
            };
            proto = *inner;
            l3 = ETH_HLEN + 4;
            vlan = true;
        }
        if proto != ETH_P_IP_BE {
            return Parsed::Other;
        }
        let ip = data + l3;
        // 20-byte minimum header.
        if ip + 20 > end {
            return Parsed::Malformed;
        }
        let ver_ihl = *(ip as *const u8);
        if ver_ihl >> 4 != 4 {
            return Parsed::Malformed;
        }
        let ihl = ((ver_ihl & 0x0f) as usize) << 2;
        if ihl < 20 {
            return Parsed::Malformed;
        }
        let l4_proto = *((ip + 9) as *const u8);
        if l4_proto != IPPROTO_TCP && l4_proto != IPPROTO_UDP && l4_proto != IPPROTO_ICMP {
            return Parsed::Other;
        }
        // More-fragments flag or a fragment offset: never rewrite.
        let frag = u16::from_be(*((ip + 6) as *const u16));
        if frag & 0x3fff != 0 {
            return Parsed::Fragment;
        }
        let tot_len = u16::from_be(*((ip + 2) as *const u16)) as usize;
        if tot_len < ihl || ip + tot_len > end {
            return Parsed::Malformed;
        }
        let saddr = *((ip + 12) as *const u32);
        let daddr = *((ip + 16) as *const u32);
        let l4 = ip + ihl;
        if l4_proto == IPPROTO_ICMP {
            // The ICMP header is bounds-checked where it is read, against
            // the frame's end. (Checking it here against the total length
            // lets LLVM prove that later check redundant and drop it, and
            // the verifier cannot follow that proof.)
            return Parsed::Icmp(Icmp {
                ip,
                l4,
                saddr,
                daddr,
                vlan,
            });
        }
        let min_l4 = if l4_proto == IPPROTO_TCP { 20 } else { 8 };
        if l4 + min_l4 > end || ihl + min_l4 > tot_len {
            return Parsed::Malformed;
        }
        let sport = *(l4 as *const u16);
        let dport = *((l4 + 2) as *const u16);
        Parsed::Pkt(Pkt {
            ip,
            l4,
            saddr,
            daddr,
            sport,
            dport,
            proto: l4_proto,
            vlan,
            l3_len: (end - ip) as u32,
        })
    }
}
