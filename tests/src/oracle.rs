//! An independent check of the frames the packet tables expect: every
//! well-formed input and expected output is parsed by
//! [etherparse](https://docs.rs/etherparse) (not by our builders in
//! [`crate::packet`] and [`crate::sctp_packet`], nor by the datapath) and
//! must be consistent: Ethernet (802.1Q tags allowed), then ARP, IPv4 or
//! IPv6 with its extension headers, the frame as long as the IP length says,
//! the IPv4 header checksum right, and TCP, UDP, ICMP and ICMPv6 with the
//! checksum etherparse computes and UDP's length field; IPv4 or IPv6
//! inside IP (DSR's IPIP) is checked the same way one level down. SCTP,
//! which etherparse does not parse, has its CRC32c checked by the bitwise
//! [`crc32c`] here (RFC 3720's reference values are a unit test), not by
//! `loxilb_common::crc32c`, which both the builders and the datapath use.
//!
//! So a table whose expected bytes were built wrong by our own helpers (a
//! checksum not updated, a length field left stale) fails even when the
//! datapath agrees with it.

use etherparse::{IpNumber, NetSlice, SlicedPacket, TransportSlice};

/// IP protocol numbers the oracle looks at beyond what etherparse slices.
const IPIP: u8 = 4;
const IPV6_IN_IP: u8 = 41;
const SCTP: u8 = 132;

/// Why `frame` is not a consistent Ethernet frame (None: it is).
pub fn frame_error(frame: &[u8]) -> Option<String> {
    let p = match SlicedPacket::from_ethernet(frame) {
        Ok(p) => p,
        Err(e) => return Some(format!("etherparse refuses the frame: {e}")),
    };
    check_ip(&p, frame, "")
}

/// The frame must pass [`frame_error`]; the panic names `what` and why.
pub fn assert_frame(what: &str, frame: &[u8]) {
    if let Some(e) = frame_error(frame) {
        panic!(
            "{what}: the frame is not consistent by an independent parser ({e}); \
             fix how the test builds it\n{}",
            hex(frame)
        );
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[derive(Clone, Copy)]
enum Addrs {
    V4([u8; 4], [u8; 4]),
    V6([u8; 16], [u8; 16]),
}

/// The shortest Ethernet frame (without FCS): a shorter packet is padded
/// to it, so only then may bytes follow the IP packet.
const ETH_MIN: usize = 60;

/// Check the IP packet of `p`, sliced from `whole` (the frame, or the
/// outer packet's payload for IP in IP; `depth` names which in errors).
fn check_ip(p: &SlicedPacket, whole: &[u8], depth: &str) -> Option<String> {
    let (payload, addrs) = match &p.net {
        // Not IP (e.g. ARP): nothing more to check.
        None | Some(NetSlice::Arp(_)) => return None,
        Some(NetSlice::Ipv4(ip)) => {
            let h = ip.header();
            let want = h.to_header().calc_header_checksum();
            if h.header_checksum() != want {
                return Some(format!(
                    "{depth}IPv4 header checksum {:#06x}, should be {want:#06x}",
                    h.header_checksum()
                ));
            }
            (ip.payload(), Addrs::V4(h.source(), h.destination()))
        }
        Some(NetSlice::Ipv6(ip)) => {
            let h = ip.header();
            (ip.payload(), Addrs::V6(h.source(), h.destination()))
        }
    };
    // Length fields: etherparse cuts the payload where the IP header says
    // (and refuses a frame shorter than that); what follows can only be
    // padding to the minimum frame.
    let ip_end =
        payload.payload.as_ptr() as usize + payload.payload.len() - whole.as_ptr() as usize;
    if ip_end < whole.len() && (!depth.is_empty() || whole.len() > ETH_MIN) {
        return Some(format!(
            "{depth}{} bytes after the IP packet's end (its length field says less than there is)",
            whole.len() - ip_end
        ));
    }
    if payload.fragmented {
        // Only the IP layer is checkable in a fragment.
        return None;
    }
    let l4 = payload.payload;
    match &p.transport {
        Some(TransportSlice::Tcp(t)) => {
            let want = match addrs {
                Addrs::V4(s, d) => t.calc_checksum_ipv4(s, d).ok()?,
                Addrs::V6(s, d) => t.calc_checksum_ipv6(s, d).ok()?,
            };
            if t.checksum() != want {
                return Some(format!(
                    "{depth}TCP checksum {:#06x}, should be {want:#06x}",
                    t.checksum()
                ));
            }
        }
        Some(TransportSlice::Udp(u)) => {
            if usize::from(u.length()) != l4.len() {
                return Some(format!(
                    "{depth}UDP length field {}, the datagram is {} bytes",
                    u.length(),
                    l4.len()
                ));
            }
            let h = u.to_header();
            let want = match addrs {
                // RFC 768: 0 is "no checksum" over IPv4.
                Addrs::V4(_, _) if u.checksum() == 0 => 0,
                Addrs::V4(s, d) => h.calc_checksum_ipv4_raw(s, d, u.payload()).ok()?,
                Addrs::V6(s, d) => h.calc_checksum_ipv6_raw(s, d, u.payload()).ok()?,
            };
            if u.checksum() != want {
                return Some(format!(
                    "{depth}UDP checksum {:#06x}, should be {want:#06x}",
                    u.checksum()
                ));
            }
        }
        Some(TransportSlice::Icmpv4(i)) => {
            let want = i.icmp_type().calc_checksum(i.payload());
            if i.checksum() != want {
                return Some(format!(
                    "{depth}ICMP checksum {:#06x}, should be {want:#06x}",
                    i.checksum()
                ));
            }
        }
        Some(TransportSlice::Icmpv6(i)) => {
            let Addrs::V6(s, d) = addrs else {
                return Some(format!("{depth}ICMPv6 over IPv4"));
            };
            if !i.is_checksum_valid(s, d) {
                return Some(format!(
                    "{depth}ICMPv6 checksum {:#06x} is wrong",
                    i.checksum()
                ));
            }
        }
        Some(TransportSlice::Igmp(_)) => {}
        None => match payload.ip_number {
            IpNumber(SCTP) => {
                if l4.len() < 12 {
                    return Some(format!("{depth}SCTP packet of {} bytes", l4.len()));
                }
                let mut b = l4.to_vec();
                b[8..12].fill(0);
                let want = crc32c(&b).to_le_bytes();
                if want != l4[8..12] {
                    return Some(format!(
                        "{depth}SCTP CRC32c {:02x?}, should be {want:02x?}",
                        &l4[8..12]
                    ));
                }
            }
            IpNumber(IPIP) | IpNumber(IPV6_IN_IP) => {
                if !depth.is_empty() {
                    return Some(format!("{depth}IP in IP in IP"));
                }
                return match SlicedPacket::from_ip(l4) {
                    Ok(inner) => check_ip(&inner, l4, "inner packet: "),
                    Err(e) => Some(format!("inner IP packet: etherparse refuses it: {e}")),
                };
            }
            _ => {}
        },
    }
    None
}

/// CRC32c (Castagnoli, reflected 0x82f63b78), bit by bit: independent of
/// `loxilb_common::crc32c` (table-driven), which the datapath and our SCTP
/// builders use.
pub fn crc32c(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0x82f6_3b78
            } else {
                c >> 1
            };
        }
    }
    !c
}
