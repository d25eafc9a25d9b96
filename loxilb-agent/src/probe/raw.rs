//! A connected, non-blocking IPv4 socket (raw, or ICMP datagram) driven by
//! Tokio. Connecting makes the kernel deliver only the endpoint's packets
//! and report ICMP errors about ours (ECONNREFUSED, EHOSTUNREACH, ...).

use std::{
    io::{self, Read},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::io::{unix::AsyncFd, Interest};

pub(super) struct RawSock {
    fd: AsyncFd<Socket>,
}

impl RawSock {
    pub(super) fn open(ty: Type, proto: i32, peer: Ipv4Addr) -> io::Result<Self> {
        let s = Socket::new(Domain::IPV4, ty, Some(Protocol::from(proto)))?;
        s.set_nonblocking(true)?;
        s.connect(&SockAddr::from(SocketAddr::V4(SocketAddrV4::new(peer, 0))))?;
        // SAFETY: `s` owns its descriptor and moves into the AsyncFd, which
        // owns it (open, the same one) until the AsyncFd is dropped.
        let fd = unsafe { AsyncFd::register(s) }.map_err(io::Error::from)?;
        Ok(RawSock { fd })
    }

    pub(super) fn socket(&self) -> &Socket {
        self.fd.get_ref()
    }

    pub(super) async fn send(&self, buf: &[u8]) -> io::Result<usize> {
        loop {
            let mut g = self.fd.writable().await?;
            match g.try_io(|s| s.get_ref().send(buf)) {
                Ok(r) => return r,
                Err(_would_block) => continue,
            }
        }
    }

    pub(super) async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            // ERROR too: an ICMP error about our packet only sets the
            // socket error (EPOLLERR), which `readable` would not see.
            let mut g = self.fd.ready(Interest::READABLE | Interest::ERROR).await?;
            match g.try_io(|s| s.get_ref().read(buf)) {
                Ok(r) => return r,
                Err(_would_block) => continue,
            }
        }
    }
}

/// The payload of an IPv4 packet (as raw sockets deliver it) from `src`
/// carrying `proto`; None for anything else or a malformed header.
pub(super) fn ipv4_payload(pkt: &[u8], src: Ipv4Addr, proto: u8) -> Option<&[u8]> {
    if pkt.len() < 20 || pkt[0] >> 4 != 4 {
        return None;
    }
    let ihl = ((pkt[0] & 0x0f) as usize) * 4;
    let total = u16::from_be_bytes([pkt[2], pkt[3]]) as usize;
    if ihl < 20 || pkt.len() < ihl || pkt[9] != proto || pkt[12..16] != src.octets() {
        return None;
    }
    let end = total.clamp(ihl, pkt.len());
    Some(&pkt[ihl..end])
}

/// The Internet checksum (RFC 1071).
pub(super) fn inet_checksum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for c in data.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_be_bytes([c[0], 0])
        };
        sum += w as u32;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}
