//! Telling the segment that this node now answers for a VIP: gratuitous
//! ARP for IPv4 VIPs and unsolicited Neighbor Advertisements (RFC 4861
//! 7.2.6) for IPv6 VIPs, on every interface the datapath is attached to,
//! repeated (neighbours and switches that missed one, or whose ARP entry
//! was locked for a second, take a later one). Sent on a takeover: hosts
//! and routers whose neighbour entry still names the previous owner's MAC
//! switch to this node at once instead of after their entry goes stale.
//!
//! The frames are built here ([`garp`], [`unsolicited_na`]) and sent
//! through an `AF_PACKET` socket bound to each interface.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use tracing::{debug, warn};

use crate::netlink;

/// How many times each announcement is sent, and the gap between them
/// (3 over 1 s).
pub const REPEATS: usize = 3;
pub const GAP: Duration = Duration::from_millis(500);

/// A gratuitous ARP reply for `vip` from `mac`: sender and target
/// protocol address both the VIP, sender and target hardware address both
/// `mac`, broadcast (what Linux `arping -A` sends; receivers override an existing entry, gratuitous ARP being
/// exempt from the neighbour lock time, and create one where
/// `arp_accept` says so). A reply, not a request: a request for the VIP
/// is answered by every node that still has it on an interface (one whose
/// agent was killed keeps its VIPs on `lo` until an agent starts there
/// again), and that answer, coming last, would win.
pub fn garp(mac: [u8; 6], vip: Ipv4Addr) -> Vec<u8> {
    let mut f = Vec::with_capacity(42);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&0x0806u16.to_be_bytes());
    f.extend_from_slice(&1u16.to_be_bytes()); // Ethernet
    f.extend_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    f.push(6);
    f.push(4);
    f.extend_from_slice(&2u16.to_be_bytes()); // reply
    f.extend_from_slice(&mac);
    f.extend_from_slice(&vip.octets());
    // Linux takes a reply as gratuitous (overriding the lock time) only
    // when the target hardware address is the sender's too.
    f.extend_from_slice(&mac);
    f.extend_from_slice(&vip.octets());
    f
}

/// One's-complement sum of 16-bit words (odd length padded).
fn sum16(data: &[u8], mut acc: u32) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc += u16::from_be_bytes([c[0], c[1]]) as u32;
    }
    if let [b] = chunks.remainder() {
        acc += (*b as u32) << 8;
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// An unsolicited Neighbor Advertisement for `vip` from `mac`, sent from
/// `src` (the interface's link-local address) to all nodes (ff02::1), hop
/// limit 255, Override set, with the target link-layer address option.
pub fn unsolicited_na(mac: [u8; 6], src: Ipv6Addr, vip: Ipv6Addr) -> Vec<u8> {
    let dst = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
    // ICMPv6: type 136, code 0, checksum, flags (O), reserved, target,
    // option 2 (target link-layer address), length 1 (8 bytes).
    let mut icmp = vec![136u8, 0, 0, 0, 0x20, 0, 0, 0];
    icmp.extend_from_slice(&vip.octets());
    icmp.extend_from_slice(&[2, 1]);
    icmp.extend_from_slice(&mac);
    let len = icmp.len() as u32;
    let mut acc = sum16(&src.octets(), 0);
    acc = sum16(&dst.octets(), acc);
    acc += len;
    acc += 58;
    acc = sum16(&icmp, acc);
    let c = !fold(acc);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let mut f = Vec::with_capacity(14 + 40 + icmp.len());
    f.extend_from_slice(&[0x33, 0x33, 0, 0, 0, 1]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&0x86ddu16.to_be_bytes());
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
    f.push(58);
    f.push(255);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    f.extend_from_slice(&icmp);
    f
}

/// Send `frame` out of device `ifindex` as it is.
fn send_frame(ifindex: u32, frame: &[u8]) -> Result<()> {
    // SAFETY: plain socket calls with a sockaddr_ll we fill in; the fd is
    // closed on every path.
    unsafe {
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
        if fd < 0 {
            bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
        }
        let mut sa: libc::sockaddr_ll = std::mem::zeroed();
        sa.sll_family = libc::AF_PACKET as u16;
        sa.sll_ifindex = ifindex as i32;
        sa.sll_halen = 6;
        sa.sll_addr[..6].copy_from_slice(&frame[..6]);
        let r = libc::sendto(
            fd,
            frame.as_ptr() as *const libc::c_void,
            frame.len(),
            0,
            &sa as *const libc::sockaddr_ll as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        );
        let e = std::io::Error::last_os_error();
        libc::close(fd);
        if r < 0 {
            bail!("sending on device {ifindex}: {e}");
        }
    }
    Ok(())
}

/// Whether `vip` lies in one of device `ifindex`'s connected subnets
/// (`connected`: destination, prefix length and device of the main
/// table's routes without a gateway).
fn on_home_subnet(vip: IpAddr, ifindex: u32, connected: &[(IpAddr, u8, u32)]) -> bool {
    connected.iter().any(|(dest, len, oif)| {
        *oif == ifindex
            && *len > 0
            && ipnet::IpNet::new(*dest, *len).is_ok_and(|n| n.trunc().contains(&vip))
    })
}

/// The order in which `vip` is announced on `devs` (ifindexes, in the
/// order given): first the devices where the VIP is a foreign address
/// (its endpoints and routers reach it by a route of theirs: as the
/// full-NAT source, it is what they answer to), then the devices whose
/// connected subnet holds it (its clients' segment). Once a client's
/// entry names this node, its packets arrive here, and the endpoints'
/// answers must come here too: a frame sent earlier by the same thread
/// is delivered first on a software path, and on a wire it is not
/// overtaken. Announced the other way round, an endpoint could answer
/// the client's first packet toward the old owner, whose node (its agent
/// killed) may still hold the address and reset the connection.
fn device_order(vip: IpAddr, devs: &[u32], connected: &[(IpAddr, u8, u32)]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..devs.len()).collect();
    order.sort_by_key(|i| on_home_subnet(vip, devs[*i], connected));
    order
}

/// The frames that announce `vips` on each of `ifaces` (by name):
/// (device, ifindex, frame), VIP by VIP in the order given, each on its
/// devices in [`device_order`]. Devices without a MAC are skipped; an
/// IPv6 VIP is announced from the device's link-local address (from the
/// VIP itself when it has none).
pub fn frames(ifaces: &[String], vips: &[IpAddr]) -> Result<Vec<(String, u32, Vec<u8>)>> {
    let links = netlink::links()?;
    let mut devs = vec![];
    for name in ifaces {
        let Some(l) = links.iter().find(|l| &l.name == name) else {
            continue;
        };
        let Some(mac) = l.mac else { continue };
        let ll = if vips.iter().any(|v| v.is_ipv6()) {
            netlink::link_local6(l.index).unwrap_or_default()
        } else {
            vec![]
        };
        devs.push((name, l.index, mac, ll));
    }
    // Without the routes every device is taken as foreign: the order
    // given, as before.
    let connected: Vec<(IpAddr, u8, u32)> = netlink::routes()
        .unwrap_or_else(|e| {
            warn!("announcing: listing routes (devices in the order given): {e:#}");
            vec![]
        })
        .into_iter()
        .filter(|r| r.gateway.is_none())
        .map(|r| (r.dest, r.prefix_len, r.oif))
        .collect();
    let indexes: Vec<u32> = devs.iter().map(|d| d.1).collect();
    // In the order of `vips`, each on every device: the caller puts
    // first what must move first.
    let mut out = vec![];
    for v in vips {
        for i in device_order(*v, &indexes, &connected) {
            let (name, index, mac, ll) = &devs[i];
            let f = match v {
                IpAddr::V4(a) => garp(*mac, *a),
                IpAddr::V6(a) => unsolicited_na(*mac, ll.first().copied().unwrap_or(*a), *a),
            };
            out.push(((*name).clone(), *index, f));
        }
    }
    Ok(out)
}

/// Announce `vips` on `ifaces`, [`REPEATS`] times [`GAP`] apart, on a
/// thread of its own (the caller does not wait).
pub fn announce(ifaces: Vec<String>, vips: Vec<IpAddr>) {
    if vips.is_empty() || ifaces.is_empty() {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("announce".into())
        .spawn(move || {
            let frames =
                match frames(&ifaces, &vips).with_context(|| format!("announcing {vips:?}")) {
                    Ok(f) => f,
                    Err(e) => {
                        warn!("{e:#}");
                        return;
                    }
                };
            for round in 0..REPEATS {
                if round > 0 {
                    std::thread::sleep(GAP);
                }
                for (dev, idx, f) in &frames {
                    if let Err(e) = send_frame(*idx, f) {
                        warn!(device = %dev, "gratuitous ARP / unsolicited NA: {e:#}");
                    }
                }
            }
            debug!(
                ?vips,
                ?ifaces,
                "announced (gratuitous ARP / unsolicited NA)"
            );
        });
    if let Err(e) = spawned {
        warn!("cannot start the announcer: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x02, 0, 0, 0, 0xaa, 0x01];

    #[test]
    fn the_clients_segment_is_announced_last() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        // x0 (10) holds the clients' subnet, x1 (12) the endpoints'; a
        // default route through x1 is no connected subnet.
        let connected = [
            (ip("10.30.0.0"), 24, 10),
            (ip("10.31.0.0"), 24, 12),
            (ip("2001:db8::"), 64, 10),
            (ip("0.0.0.0"), 0, 12),
        ];
        let devs = [10, 12];
        assert_eq!(
            device_order(ip("10.30.0.100"), &devs, &connected),
            vec![1, 0],
            "a service VIP from the clients' subnet: endpoints' side first"
        );
        assert_eq!(
            device_order(ip("10.31.0.100"), &devs, &connected),
            vec![0, 1],
            "a VIP on the endpoints' subnet (--setRoles): the other side first"
        );
        assert_eq!(
            device_order(ip("2001:db8::7"), &devs, &connected),
            vec![1, 0]
        );
        // In no connected subnet (routed to the node, BGP): as given.
        assert_eq!(device_order(ip("192.0.2.1"), &devs, &connected), vec![0, 1]);
        assert_eq!(device_order(ip("192.0.2.1"), &devs, &[]), vec![0, 1]);
        // A host route's prefix is its own, not the whole space.
        assert!(!on_home_subnet(
            ip("10.30.0.9"),
            10,
            &[(ip("10.30.0.8"), 32, 10)]
        ));
        assert!(on_home_subnet(
            ip("10.30.0.9"),
            10,
            &[(ip("10.30.0.9"), 32, 10)]
        ));
    }

    #[test]
    fn gratuitous_arp_frame() {
        let f = garp(MAC, "192.0.2.7".parse().unwrap());
        assert_eq!(f.len(), 42);
        assert_eq!(&f[..6], &[0xff; 6]);
        assert_eq!(&f[6..12], &MAC);
        assert_eq!(&f[12..14], &[0x08, 0x06]);
        assert_eq!(&f[14..22], &[0, 1, 0x08, 0, 6, 4, 0, 2], "a reply");
        assert_eq!(&f[22..28], &MAC, "sender MAC");
        assert_eq!(&f[28..32], &[192, 0, 2, 7], "sender IP = VIP");
        assert_eq!(
            &f[32..38],
            &MAC,
            "target MAC = sender's (Linux: arp_is_garp)"
        );
        assert_eq!(&f[38..42], &[192, 0, 2, 7], "target IP = VIP");
    }

    #[test]
    fn unsolicited_na_frame_and_checksum() {
        let src: Ipv6Addr = "fe80::1".parse().unwrap();
        let vip: Ipv6Addr = "2001:db8::7".parse().unwrap();
        let f = unsolicited_na(MAC, src, vip);
        assert_eq!(f.len(), 14 + 40 + 32);
        assert_eq!(&f[..6], &[0x33, 0x33, 0, 0, 0, 1]);
        assert_eq!(&f[12..14], &[0x86, 0xdd]);
        let ip = &f[14..54];
        assert_eq!(u16::from_be_bytes([ip[4], ip[5]]), 32, "payload length");
        assert_eq!(ip[6], 58);
        assert_eq!(ip[7], 255, "hop limit 255 (RFC 4861 7.1.2)");
        assert_eq!(&ip[8..24], &src.octets());
        assert_eq!(
            &ip[24..40],
            &"ff02::1".parse::<Ipv6Addr>().unwrap().octets()
        );
        let icmp = &f[54..];
        assert_eq!(icmp[0], 136);
        assert_eq!(icmp[4], 0x20, "Override only: not solicited, not a router");
        assert_eq!(&icmp[8..24], &vip.octets());
        assert_eq!(&icmp[24..32], &[2, 1, 0x02, 0, 0, 0, 0xaa, 0x01]);
        // The checksum verifies: the sum over pseudo-header and message
        // folds to 0xffff.
        let mut acc = sum16(&ip[8..24], 0);
        acc = sum16(&ip[24..40], acc);
        acc += icmp.len() as u32 + 58;
        acc = sum16(icmp, acc);
        assert_eq!(fold(acc), 0xffff);
    }
}
