//! Header parsing: Ethernet (+ one 802.1Q tag), IPv4 (options skipped,
//! fragments flagged), IPv6 (extension headers walked to the L4 header
//! within a fixed bound), TCP/UDP ports. Every read is bounds-checked
//! against `data_end` so the verifier accepts it and garbage never
//! over-reads.

use loxilb_common::{
    v4_mapped, Addr, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP,
};

pub const ETH_HLEN: usize = 14;
const ETH_P_IP_BE: u16 = 0x0800u16.to_be();
const ETH_P_IPV6_BE: u16 = 0x86ddu16.to_be();
/// SCTP chunks whose headers are checked (and looked at for INIT, ABORT,
/// SHUTDOWN COMPLETE) per packet; later chunks are not looked at.
const MAX_SCTP_CHUNKS: u32 = 8;
/// `Pkt::sctp` bits: what the walked chunks were.
pub mod sctp_ev {
    pub const INIT: u8 = 1;
    pub const INIT_ACK: u8 = 2;
    /// ABORT or SHUTDOWN COMPLETE: the association ends.
    pub const CLOSE: u8 = 4;
}
const CHUNK_INIT: u8 = 1;
const CHUNK_INIT_ACK: u8 = 2;
const CHUNK_ABORT: u8 = 6;
const CHUNK_SHUTDOWN_COMPLETE: u8 = 14;

/// IPv6 extension headers walked before giving up (passing the packet).
const MAX_EXT_HDRS: u32 = 4;
const NH_HOPOPTS: u8 = 0;
const NH_ROUTING: u8 = 43;
const NH_FRAGMENT: u8 = 44;
const NH_AH: u8 = 51;
const NH_DSTOPTS: u8 = 60;
const ETH_P_8021Q_BE: u16 = 0x8100u16.to_be();
const ETH_P_8021AD_BE: u16 = 0x88a8u16.to_be();

/// Offsets (absolute addresses) and fields of a parsed TCP/UDP packet.
pub struct Pkt {
    /// Start of the IP header.
    pub ip: usize,
    /// Start of the TCP/UDP header.
    pub l4: usize,
    /// Addresses as in the maps (IPv4-mapped for IPv4).
    pub saddr: Addr,
    pub daddr: Addr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// Frame carried an 802.1Q/802.1ad tag.
    pub vlan: bool,
    /// Bytes from the IP header to the end of the frame.
    pub l3_len: u32,
    /// An IPv6 packet.
    pub v6: bool,
    /// SCTP: `sctp_ev::*` bits of the walked chunks; 0 otherwise.
    pub sctp: u8,
    /// SCTP: bytes of the SCTP packet (common header + chunks, from the IP
    /// lengths, not the frame: it may be padded); what CRC32c covers.
    pub l4_len: u32,
}

/// An unfragmented IPv4 ICMP packet.
pub struct Icmp {
    pub ip: usize,
    /// Start of the ICMP header.
    pub l4: usize,
    /// End of the IP packet by its total length (at most the frame's end:
    /// what lies past it is padding, not ICMP).
    pub ip_end: usize,
    pub saddr: u32,
    pub daddr: u32,
    pub vlan: bool,
}

/// An ICMPv6 packet (any type: the ICMP module decides what is ours).
pub struct Icmp6 {
    pub ip: usize,
    /// Start of the ICMPv6 header.
    pub l4: usize,
    /// End of the IPv6 packet by its payload length (at most the frame's
    /// end).
    pub ip_end: usize,
    pub saddr: Addr,
    pub daddr: Addr,
    pub vlan: bool,
}

pub enum Parsed {
    Pkt(Pkt),
    Icmp(Icmp),
    Icmp6(Icmp6),
    /// Not IPv4 TCP/UDP/ICMP: nothing for us.
    Other,
    Fragment,
    Malformed,
    /// IPv6 with extension headers we do not walk through.
    Ext,
    /// An IPv6 packet, seen by the IPv4 program (which hands it to the
    /// IPv6 program by a tail call).
    Ipv6,
    /// SCTP whose chunk lengths do not add up: dropped (an endpoint must
    /// never get it translated, and nothing is read past a chunk's end).
    BadSctp,
}

#[inline(always)]
pub unsafe fn ptr_at<T>(start: usize, end: usize, off: usize) -> Option<*mut T> {
    if start + off + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *mut T)
}

/// Parse a frame. `V6`: the IPv6 program (IPv4 and the rest are not its
/// business); otherwise the IPv4 program, which reports IPv6 as `Ipv6`.
/// Two programs, because one holding both paths is past the verifier's
/// budget: each family is verified on its own. `LAUNDER`: see `parse6`.
#[inline(always)]
pub fn parse<const V6: bool, const LAUNDER: bool>(data: usize, end: usize) -> Parsed {
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
        if proto == ETH_P_IPV6_BE {
            if V6 {
                return parse6(data + l3, end, vlan, LAUNDER);
            }
            return Parsed::Ipv6;
        }
        if V6 || proto != ETH_P_IP_BE {
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
        if l4_proto != IPPROTO_TCP
            && l4_proto != IPPROTO_UDP
            && l4_proto != IPPROTO_ICMP
            && l4_proto != IPPROTO_SCTP
        {
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
            // the frame's end, then against `ip_end`. (Checking it here against the total length
            // lets LLVM prove that later check redundant and drop it, and
            // the verifier cannot follow that proof.)
            return Parsed::Icmp(Icmp {
                ip,
                l4,
                ip_end: ip + tot_len,
                saddr,
                daddr,
                vlan,
            });
        }
        let min_l4 = min_l4(l4_proto);
        if l4 + min_l4 > end || ihl + min_l4 > tot_len {
            return Parsed::Malformed;
        }
        let sport = *(l4 as *const u16);
        let dport = *((l4 + 2) as *const u16);
        let l4_len = (tot_len - ihl) as u32;
        let sctp = if l4_proto == IPPROTO_SCTP {
            match sctp_chunks(l4, end, l4_len as usize) {
                Some(ev) => ev,
                None => return Parsed::BadSctp,
            }
        } else {
            0
        };
        Parsed::Pkt(Pkt {
            ip,
            l4,
            saddr: v4_mapped(saddr),
            daddr: v4_mapped(daddr),
            sport,
            dport,
            proto: l4_proto,
            vlan,
            l3_len: (end - ip) as u32,
            v6: false,
            sctp,
            l4_len,
        })
    }
}

/// Smallest L4 header the datapath reads: TCP 20, UDP 8, SCTP 12 (common
/// header) + 4 (a chunk header).
#[inline(always)]
fn min_l4(proto: u8) -> usize {
    if proto == IPPROTO_TCP {
        20
    } else if proto == IPPROTO_SCTP {
        16
    } else {
        8
    }
}

/// Walk the chunk headers of the SCTP packet at `l4` (`len` bytes by the IP
/// header): every chunk length at least 4 and inside the packet, for the
/// first `MAX_SCTP_CHUNKS` chunks. The `sctp_ev` bits of what was seen, or
/// None for a malformed packet.
#[inline(always)]
fn sctp_chunks(l4: usize, end: usize, len: usize) -> Option<u8> {
    let mut ev = 0u8;
    let mut off: usize = 12;
    let mut i = 0;
    while i < MAX_SCTP_CHUNKS {
        if off >= len {
            break;
        }
        if off > 2048 {
            // Bounded for the verifier; later chunks are not looked at.
            break;
        }
        let c = unsafe { ptr_at::<[u8; 4]>(l4, end, off)? };
        let c = unsafe { &*c };
        let clen = u16::from_be_bytes([c[2], c[3]]) as usize;
        if clen < 4 || off + clen > len {
            return None;
        }
        let t = c[0];
        if t == CHUNK_INIT {
            ev |= sctp_ev::INIT;
        } else if t == CHUNK_INIT_ACK {
            ev |= sctp_ev::INIT_ACK;
        } else if t == CHUNK_ABORT || t == CHUNK_SHUTDOWN_COMPLETE {
            ev |= sctp_ev::CLOSE;
        }
        off += (clen + 3) & !3;
        i += 1;
    }
    Some(ev)
}

/// IPv6: the fixed header, then up to `MAX_EXT_HDRS` extension headers
/// (hop-by-hop, destination options, routing with no segments left, AH) to
/// a TCP/UDP/SCTP header. Fragments are passed as fragments; anything else
/// (ICMPv6 included: neighbour discovery must reach the stack) is not ours.
///
/// `launder`: pass the L4 offset through a per-CPU map so the verifier sees
/// one unknown (bounded) offset instead of one exact value per number of
/// extension headers; otherwise it verifies everything after the parse
/// once per extension-header count, which the long new-flow program cannot
/// afford. (A map write and read: only the new-flow program pays it.)
#[inline(always)]
fn parse6(ip: usize, end: usize, vlan: bool, launder: bool) -> Parsed {
    unsafe {
        let Some(h) = ptr_at::<[u32; 10]>(ip, end, 0) else {
            return Parsed::Malformed;
        };
        let b0 = *(ip as *const u8);
        if b0 >> 4 != 6 {
            return Parsed::Malformed;
        }
        let plen = u16::from_be(*((ip + 4) as *const u16)) as usize;
        // A payload length of 0 is a jumbogram (or garbage): not ours.
        if plen == 0 {
            return Parsed::Other;
        }
        if ip + 40 + plen > end {
            return Parsed::Malformed;
        }
        let mut nh = *((ip + 6) as *const u8);
        let mut off: usize = 40;
        let mut i = 0;
        while i < MAX_EXT_HDRS {
            if nh == IPPROTO_TCP || nh == IPPROTO_UDP || nh == IPPROTO_SCTP || nh == IPPROTO_ICMPV6
            {
                break;
            }
            if nh == NH_FRAGMENT {
                return Parsed::Fragment;
            }
            if nh != NH_HOPOPTS && nh != NH_DSTOPTS && nh != NH_ROUTING && nh != NH_AH {
                return Parsed::Other;
            }
            let Some(eh) = ptr_at::<[u8; 4]>(ip, end, off) else {
                return Parsed::Malformed;
            };
            let eh = &*eh;
            // A routing header still to be processed changes the final
            // destination (and the checksum's pseudo-header): not ours.
            if nh == NH_ROUTING && eh[3] != 0 {
                return Parsed::Ext;
            }
            let len = if nh == NH_AH {
                (eh[1] as usize + 2) * 4
            } else {
                (eh[1] as usize + 1) * 8
            };
            nh = eh[0];
            off += len;
            if off > 40 + plen {
                return Parsed::Malformed;
            }
            i += 1;
        }
        if nh == IPPROTO_ICMPV6 {
            // Bounds-checked where its header is read (neighbour
            // discovery and the rest pass through untouched).
            let h = &*h;
            return Parsed::Icmp6(Icmp6 {
                ip,
                l4: ip + (off & 0x3fff),
                ip_end: ip + 40 + plen,
                saddr: [h[2], h[3], h[4], h[5]],
                daddr: [h[6], h[7], h[8], h[9]],
                vlan,
            });
        }
        if nh != IPPROTO_TCP && nh != IPPROTO_UDP && nh != IPPROTO_SCTP {
            return Parsed::Ext;
        }
        if launder {
            let Some(slot) = crate::maps::LB_SCRATCH_OFF.get_ptr_mut(0) else {
                return Parsed::Malformed;
            };
            core::ptr::write_volatile(slot, off as u32);
            off = core::ptr::read_volatile(slot) as usize;
        }
        let min_l4 = min_l4(nh);
        // Bounded for the verifier (40 + 4 headers of at most 2 KiB).
        if off > 8232 || off + min_l4 > 40 + plen {
            return Parsed::Malformed;
        }
        let Some(ports) = ptr_at::<[u16; 2]>(ip, end, off) else {
            return Parsed::Malformed;
        };
        if ip + off + min_l4 > end {
            return Parsed::Malformed;
        }
        let h = &*h;
        let l4_len = (40 + plen - off) as u32;
        let sctp = if nh == IPPROTO_SCTP {
            match sctp_chunks(ip + off, end, l4_len as usize) {
                Some(ev) => ev,
                None => return Parsed::BadSctp,
            }
        } else {
            0
        };
        Parsed::Pkt(Pkt {
            ip,
            l4: ip + off,
            saddr: [h[2], h[3], h[4], h[5]],
            daddr: [h[6], h[7], h[8], h[9]],
            sport: (*ports)[0],
            dport: (*ports)[1],
            proto: nh,
            vlan,
            l3_len: (end - ip) as u32,
            v6: true,
            sctp,
            l4_len,
        })
    }
}
