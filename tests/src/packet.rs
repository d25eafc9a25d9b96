//! Build Ethernet/IPv4/IPv6/TCP/UDP frames with correct checksums (the
//! expected bytes of the packet tables are built here, independently of
//! the datapath's incremental checksum code).

use loxilb_common::csum;
use std::net::{IpAddr, Ipv4Addr};

fn octets(a: IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

#[derive(Clone, Debug)]
pub struct Frame {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub vlan: Option<u16>,
    /// Both of one family: the frame is IPv4 or IPv6 accordingly.
    pub src: IpAddr,
    pub dst: IpAddr,
    /// TTL / hop limit.
    pub ttl: u8,
    /// IPv4 TOS / IPv6 traffic class.
    pub tos: u8,
    /// IPv6 flow label (20 bits).
    pub flow: u32,
    /// IPv6 extension headers before the L4 header: (type, body); the
    /// builder puts each one's next-header byte in front of its body
    /// (so a body is 7 + 8n bytes; AH: 3 + 4n).
    pub ext: Vec<(u8, Vec<u8>)>,
    pub id: u16,
    /// Raw flags+fragment-offset field.
    pub frag: u16,
    /// IPv4 options (padded to a multiple of 4 by the builder).
    pub options: Vec<u8>,
    pub l4: L4,
    pub payload: Vec<u8>,
}

#[derive(Clone, Debug)]
pub enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
        seq: u32,
    },
    /// `zero_csum`: send without a UDP checksum (0).
    Udp {
        sport: u16,
        dport: u16,
        zero_csum: bool,
    },
}

pub const SYN: u8 = 0x02;
pub const ACK: u8 = 0x10;
pub const FIN: u8 = 0x01;
pub const RST: u8 = 0x04;

impl Frame {
    pub fn tcp(src: &str, sport: u16, dst: &str, dport: u16, flags: u8) -> Self {
        Frame {
            dst_mac: [0x02, 0, 0, 0, 0, 0x01],
            src_mac: [0x02, 0, 0, 0, 0, 0x02],
            vlan: None,
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            ttl: 64,
            tos: 0,
            flow: 0,
            ext: vec![],
            id: 0x1234,
            frag: 0x4000, // DF
            options: vec![],
            l4: L4::Tcp {
                sport,
                dport,
                flags,
                seq: 1000,
            },
            payload: b"hello".to_vec(),
        }
    }

    pub fn udp(src: &str, sport: u16, dst: &str, dport: u16) -> Self {
        let mut f = Self::tcp(src, sport, dst, dport, 0);
        f.l4 = L4::Udp {
            sport,
            dport,
            zero_csum: false,
        };
        f
    }

    /// Same frame, addressed differently (the expected translation).
    pub fn with(&self, src: &str, sport: u16, dst: &str, dport: u16) -> Self {
        let mut f = self.clone();
        f.src = src.parse().unwrap();
        f.dst = dst.parse().unwrap();
        f.l4 = match f.l4 {
            L4::Tcp { flags, seq, .. } => L4::Tcp {
                sport,
                dport,
                flags,
                seq,
            },
            L4::Udp { zero_csum, .. } => L4::Udp {
                sport,
                dport,
                zero_csum,
            },
        };
        f
    }

    pub fn routed(mut self, src_mac: [u8; 6], dst_mac: [u8; 6]) -> Self {
        self.src_mac = src_mac;
        self.dst_mac = dst_mac;
        self.ttl -= 1;
        self
    }

    pub fn bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(128);
        b.extend_from_slice(&self.dst_mac);
        b.extend_from_slice(&self.src_mac);
        if let Some(tci) = self.vlan {
            b.extend_from_slice(&0x8100u16.to_be_bytes());
            b.extend_from_slice(&tci.to_be_bytes());
        }
        if self.src.is_ipv6() {
            b.extend_from_slice(&0x86ddu16.to_be_bytes());
            let (proto, l4) = self.l4_bytes();
            let mut ext = vec![];
            for (i, (_, body)) in self.ext.iter().enumerate() {
                let next = self.ext.get(i + 1).map(|e| e.0).unwrap_or(proto);
                ext.push(next);
                ext.extend_from_slice(body);
            }
            let first = self.ext.first().map(|e| e.0).unwrap_or(proto);
            let vtf = (6u32 << 28) | ((self.tos as u32) << 20) | (self.flow & 0xfffff);
            b.extend_from_slice(&vtf.to_be_bytes());
            b.extend_from_slice(&((ext.len() + l4.len()) as u16).to_be_bytes());
            b.push(first);
            b.push(self.ttl);
            b.extend_from_slice(&octets(self.src));
            b.extend_from_slice(&octets(self.dst));
            b.extend_from_slice(&ext);
            b.extend_from_slice(&l4);
            return b;
        }
        b.extend_from_slice(&0x0800u16.to_be_bytes());
        let mut opts = self.options.clone();
        while !opts.len().is_multiple_of(4) {
            opts.push(0);
        }
        let ihl = 20 + opts.len();
        let (proto, l4) = self.l4_bytes();
        let tot = ihl + l4.len();
        let ip_start = b.len();
        b.push(0x40 | (ihl / 4) as u8);
        b.push(self.tos);
        b.extend_from_slice(&(tot as u16).to_be_bytes());
        b.extend_from_slice(&self.id.to_be_bytes());
        b.extend_from_slice(&self.frag.to_be_bytes());
        b.push(self.ttl);
        b.push(proto);
        b.extend_from_slice(&[0, 0]);
        b.extend_from_slice(&octets(self.src));
        b.extend_from_slice(&octets(self.dst));
        b.extend_from_slice(&opts);
        let c = csum::checksum_be(&b[ip_start..ip_start + ihl]);
        b[ip_start + 10..ip_start + 12].copy_from_slice(&c.to_be_bytes());
        b.extend_from_slice(&l4);
        b
    }

    fn l4_bytes(&self) -> (u8, Vec<u8>) {
        let mut l = vec![];
        let (proto, csum_off) = match &self.l4 {
            L4::Tcp {
                sport,
                dport,
                flags,
                seq,
            } => {
                l.extend_from_slice(&sport.to_be_bytes());
                l.extend_from_slice(&dport.to_be_bytes());
                l.extend_from_slice(&seq.to_be_bytes());
                l.extend_from_slice(&0u32.to_be_bytes());
                l.push(5 << 4);
                l.push(*flags);
                l.extend_from_slice(&64240u16.to_be_bytes());
                l.extend_from_slice(&[0, 0, 0, 0]);
                l.extend_from_slice(&self.payload);
                (6u8, 16)
            }
            L4::Udp { sport, dport, .. } => {
                l.extend_from_slice(&sport.to_be_bytes());
                l.extend_from_slice(&dport.to_be_bytes());
                l.extend_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
                l.extend_from_slice(&[0, 0]);
                l.extend_from_slice(&self.payload);
                (17u8, 6)
            }
        };
        let zero = matches!(
            self.l4,
            L4::Udp {
                zero_csum: true,
                ..
            }
        );
        if !zero {
            let mut pseudo = vec![];
            pseudo.extend_from_slice(&octets(self.src));
            pseudo.extend_from_slice(&octets(self.dst));
            if self.src.is_ipv6() {
                pseudo.extend_from_slice(&(l.len() as u32).to_be_bytes());
                pseudo.extend_from_slice(&[0, 0, 0, proto]);
            } else {
                pseudo.push(0);
                pseudo.push(proto);
                pseudo.extend_from_slice(&(l.len() as u16).to_be_bytes());
            }
            let s = csum::sum_be(&pseudo, 0);
            let mut c = !csum::fold(csum::sum_be(&l, s));
            if c == 0 && proto == 17 {
                c = 0xffff;
            }
            l[csum_off..csum_off + 2].copy_from_slice(&c.to_be_bytes());
        }
        (proto, l)
    }
}

/// `frame` (Ethernet + IPv4 ...) encapsulated in an outer IPv4 header
/// (protocol 4, TTL 64, DF, id 0) from `src` to `dst`, with new MACs.
pub fn ipip_wrap(
    frame: &[u8],
    src: &str,
    dst: &str,
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
) -> Vec<u8> {
    let inner = &frame[14..];
    let mut o = Vec::with_capacity(frame.len() + 20);
    o.extend_from_slice(&dst_mac);
    o.extend_from_slice(&src_mac);
    o.extend_from_slice(&0x0800u16.to_be_bytes());
    let mut h = vec![0x45, inner[1]];
    h.extend_from_slice(&((inner.len() + 20) as u16).to_be_bytes());
    h.extend_from_slice(&[0, 0, 0x40, 0, 64, 4, 0, 0]);
    h.extend_from_slice(&src.parse::<Ipv4Addr>().unwrap().octets());
    h.extend_from_slice(&dst.parse::<Ipv4Addr>().unwrap().octets());
    let c = csum::checksum_be(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    o.extend_from_slice(&h);
    o.extend_from_slice(inner);
    o
}

/// Hex dump diff for assertion messages.
pub fn diff(got: &[u8], want: &[u8]) -> String {
    let mut s = format!("len got {} want {}\n", got.len(), want.len());
    for i in 0..got.len().max(want.len()) {
        let g = got.get(i).copied();
        let w = want.get(i).copied();
        if g != w {
            s += &format!("  byte {i}: got {g:02x?} want {w:02x?}\n");
        }
    }
    s
}

/// Ethernet + IPv4 + ICMP frame with `icmp` (type, code, rest-of-header
/// word and payload; the checksum is computed).
pub fn icmp_frame(
    src: &str,
    dst: &str,
    ttl: u8,
    typ: u8,
    code: u8,
    rest: [u8; 4],
    payload: &[u8],
) -> Vec<u8> {
    let mut icmp = vec![typ, code, 0, 0];
    icmp.extend_from_slice(&rest);
    icmp.extend_from_slice(payload);
    let c = csum::checksum_be(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let mut b = vec![];
    b.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    b.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
    b.extend_from_slice(&0x0800u16.to_be_bytes());
    let mut h = vec![0x45, 0];
    h.extend_from_slice(&((20 + icmp.len()) as u16).to_be_bytes());
    h.extend_from_slice(&[0, 7, 0, 0, ttl, 1, 0, 0]);
    h.extend_from_slice(&src.parse::<Ipv4Addr>().unwrap().octets());
    h.extend_from_slice(&dst.parse::<Ipv4Addr>().unwrap().octets());
    let c = csum::checksum_be(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    b.extend_from_slice(&h);
    b.extend_from_slice(&icmp);
    b
}

/// An Ethernet/IPv6/ICMPv6 frame (checksum over the pseudo-header).
pub fn icmp6_frame(
    src: &str,
    dst: &str,
    hop: u8,
    typ: u8,
    code: u8,
    rest: [u8; 4],
    payload: &[u8],
) -> Vec<u8> {
    let s: std::net::Ipv6Addr = src.parse().unwrap();
    let d: std::net::Ipv6Addr = dst.parse().unwrap();
    let mut icmp = vec![typ, code, 0, 0];
    icmp.extend_from_slice(&rest);
    icmp.extend_from_slice(payload);
    let mut pseudo = vec![];
    pseudo.extend_from_slice(&s.octets());
    pseudo.extend_from_slice(&d.octets());
    pseudo.extend_from_slice(&(icmp.len() as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, 58]);
    let c = !csum::fold(csum::sum_be(&icmp, csum::sum_be(&pseudo, 0)));
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let mut b = vec![];
    b.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    b.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
    b.extend_from_slice(&0x86ddu16.to_be_bytes());
    b.extend_from_slice(&[0x60, 0, 0, 0]);
    b.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
    b.extend_from_slice(&[58, hop]);
    b.extend_from_slice(&s.octets());
    b.extend_from_slice(&d.octets());
    b.extend_from_slice(&icmp);
    b
}

/// What an ICMPv6 error quotes of an IPv6 `frame` (no extension
/// headers): its IPv6 header and the first 8 bytes of its payload.
pub fn quote6(frame: &[u8]) -> Vec<u8> {
    frame[14..14 + 40 + 8].to_vec()
}

/// True when an Ethernet/IPv6/ICMPv6 frame's checksum verifies.
pub fn icmp6_csum_ok(frame: &[u8]) -> bool {
    let ip = &frame[14..];
    let plen = u16::from_be_bytes([ip[4], ip[5]]) as usize;
    let mut pseudo = vec![];
    pseudo.extend_from_slice(&ip[8..40]);
    pseudo.extend_from_slice(&(plen as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, 58]);
    csum::fold(csum::sum_be(&ip[40..40 + plen], csum::sum_be(&pseudo, 0))) == 0xffff
}

/// What an ICMP error quotes of `frame`: its IP header and 8 bytes more.
pub fn quote(frame: &[u8]) -> Vec<u8> {
    let ihl = ((frame[14] & 0x0f) as usize) * 4;
    frame[14..14 + ihl + 8].to_vec()
}

/// True when the one's-complement sum of `data` verifies (is 0xffff).
pub fn csum_ok(data: &[u8]) -> bool {
    csum::fold(csum::sum_be(data, 0)) == 0xffff
}
