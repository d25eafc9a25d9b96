//! The fuzzer's frames: valid TCP / UDP / SCTP / ICMP / ICMPv6 frames to
//! the rules, replies and ICMP errors of sessions the oracle knows, other
//! traffic and garbage; then VLAN tags, IPv4 options, IPv6 extension-header
//! chains, and mutations (truncation at any offset, bad lengths, bad IHL,
//! wrong checksums, byte flips, random flags, TTLs), after which the
//! checksums are made right again half of the time (so that bad headers
//! with good checksums get past any checksum test).

use std::net::IpAddr;

use loxilb_tests::packet::{icmp6_frame, icmp_frame, Frame, L4};
use loxilb_tests::sctp_packet::{Chunk, SctpFrame, SctpPacket};

use super::oracle::{crc32c, pseudo, Rule, Session, ICMP, ICMP6, SCTP, TCP, UDP};
use super::rng::Rng;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// A valid frame to a rule (or an echo request), cut at one offset:
    /// the run starts with every offset of one such frame per rule.
    Truncated,
    Forward,
    Reply,
    Echo,
    IcmpError,
    Other,
    Garbage,
}

pub struct Gen {
    pub rng: Rng,
    rules: Vec<Rule>,
    /// (frame, next offset to cut it at) of the truncation sweep.
    sweep: Vec<(Vec<u8>, usize)>,
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

const CLIENT4: &str = "192.168.0.2";
const CLIENT6: &str = "fd00:c::2";

impl Gen {
    pub fn new(seed: u64, rules: Vec<Rule>) -> Self {
        let mut g = Gen {
            rng: Rng::new(seed),
            rules,
            sweep: vec![],
        };
        // One short valid frame per rule, and echo requests, each to be
        // cut at every offset from the end of the Ethernet header on.
        let mut frames = vec![];
        for r in g.rules.clone() {
            let c = ip(if r.vip.is_ipv6() { CLIENT6 } else { CLIENT4 });
            let f = loop {
                let f = g.l4(r.proto, c, 1000, r.vip, r.port, false);
                if f.len() <= 200 {
                    break f;
                }
            };
            frames.push(f);
        }
        frames.push(icmp_frame(
            CLIENT4,
            "20.0.0.100",
            64,
            8,
            0,
            [0, 1, 0, 1],
            b"ping",
        ));
        frames.push(icmp6_frame(
            CLIENT6,
            "fd00:20::100",
            64,
            128,
            0,
            [0, 1, 0, 1],
            b"ping",
        ));
        g.sweep = frames.into_iter().rev().map(|f| (f, 14)).collect();
        g
    }

    /// Frames of the truncation sweep still to come.
    fn next_cut(&mut self) -> Option<Vec<u8>> {
        let (f, at) = self.sweep.last_mut()?;
        let cut = f[..*at].to_vec();
        *at += 1;
        if *at >= f.len() {
            self.sweep.pop();
        }
        Some(cut)
    }

    /// The next frame, what it was made as, and the mutations applied.
    pub fn packet(&mut self, sessions: &[Session]) -> (Kind, Vec<u8>, Vec<&'static str>) {
        if let Some(b) = self.next_cut() {
            return (Kind::Truncated, b, vec!["truncated"]);
        }
        let mut kind = match self.rng.below(100) {
            0..35 => Kind::Forward,
            35..57 => Kind::Reply,
            57..63 => Kind::Echo,
            63..72 => Kind::IcmpError,
            72..92 => Kind::Other,
            _ => Kind::Garbage,
        };
        if sessions.is_empty() && matches!(kind, Kind::Reply | Kind::IcmpError) {
            kind = Kind::Forward;
        }
        let mut b = match kind {
            Kind::Forward => self.forward(),
            Kind::Reply => {
                let s = self.session(sessions);
                self.l4(s.proto, s.ep, s.eport, s.xsrc, s.xsport, true)
            }
            Kind::Echo => self.echo(),
            Kind::IcmpError => {
                let s = self.session(sessions).clone();
                self.icmp_error(&s)
            }
            Kind::Other => self.other(),
            Kind::Garbage => return (kind, self.garbage(), vec![]),
            Kind::Truncated => unreachable!("only the sweep cuts frames this way"),
        };
        let mut muts = vec![];
        // Structure first (checksums still right after these) ...
        if self.rng.chance(12, 100) {
            muts.push("vlan");
            insert_vlan(&mut b, &mut self.rng);
        }
        if self.rng.chance(10, 100) && ipv4_options(&mut b, &mut self.rng) {
            muts.push("ipv4-options");
        }
        if self.rng.chance(12, 100) && ipv6_exts(&mut b, &mut self.rng) {
            muts.push("ipv6-ext-chain");
        }
        // ... then damage.
        if self.rng.chance(55, 100) {
            for _ in 0..1 + self.rng.below(3) {
                muts.push(mutate(&mut b, &mut self.rng));
            }
            if self.rng.chance(1, 2) {
                muts.push("checksums-fixed");
                fix_checksums(&mut b);
            }
        }
        (kind, b, muts)
    }

    fn session<'a>(&mut self, s: &'a [Session]) -> &'a Session {
        // Mostly recent sessions (their endpoint still has them).
        let n = s.len();
        if self.rng.chance(3, 4) {
            &s[n - 1 - self.rng.below(n.min(64))]
        } else {
            &s[self.rng.below(n)]
        }
    }

    fn client(&mut self, v6: bool) -> IpAddr {
        match self.rng.below(20) {
            0 => {
                if v6 {
                    IpAddr::from([
                        0xfd,
                        0,
                        0,
                        0xc,
                        0,
                        0,
                        0,
                        0,
                        0,
                        0,
                        0,
                        0,
                        0,
                        0,
                        0,
                        self.rng.byte(),
                    ])
                } else {
                    IpAddr::from([192, 168, 0, self.rng.byte()])
                }
            }
            1 => {
                if v6 {
                    IpAddr::from(std::net::Ipv6Addr::from(
                        self.rng.next() as u128 | (self.rng.next() as u128) << 64,
                    ))
                } else {
                    IpAddr::from((self.rng.next() as u32).to_be_bytes())
                }
            }
            _ => ip(if v6 { CLIENT6 } else { CLIENT4 }),
        }
    }

    fn cport(&mut self) -> u16 {
        if self.rng.chance(1, 10) {
            self.rng.u16()
        } else {
            1024 + self.rng.below(200) as u16
        }
    }

    fn forward(&mut self) -> Vec<u8> {
        let r = self.rng.pick(&self.rules).clone();
        let c = self.client(r.vip.is_ipv6());
        let p = self.cport();
        self.l4(r.proto, c, p, r.vip, r.port, false)
    }

    /// A TCP, UDP or SCTP frame with random contents.
    fn l4(
        &mut self,
        proto: u8,
        src: IpAddr,
        sp: u16,
        dst: IpAddr,
        dp: u16,
        reply: bool,
    ) -> Vec<u8> {
        let rng = &mut self.rng;
        let ttl = *rng.pick(&[64, 64, 64, 64, 64, 64, 1, 2, 255]);
        let frag = *rng.pick(&[0x4000, 0x4000, 0x4000, 0x4000, 0, 0x2000, 0x0010, 0x3fff]);
        let payload = |rng: &mut Rng| -> Vec<u8> {
            let n = if rng.chance(1, 20) {
                1000 + rng.below(460)
            } else {
                rng.below(48)
            };
            (0..n).map(|_| rng.byte()).collect()
        };
        if proto == SCTP {
            let vtag = if rng.chance(1, 2) {
                0
            } else {
                rng.next() as u32
            };
            let ack_addrs = if reply {
                vec![src, ip("10.0.1.11"), ip("fd00:1::11")]
            } else {
                vec![src, ip("192.168.0.3"), ip("fd00:c::3"), dst]
            };
            let n = 1 + rng.below(ack_addrs.len());
            let addrs = &ack_addrs[..n];
            let chunk = match rng.below(10) {
                0..3 if !reply => Chunk::init(rng.next() as u32, rng.next() as u32, addrs),
                0..3 => Chunk::init_ack(rng.next() as u32, 1, addrs, b"cookie"),
                3 => Chunk::data(rng.next() as u32, 0, 0, 0, &payload(rng)),
                4 => Chunk::sack(rng.next() as u32, 65535),
                5 => Chunk::heartbeat(&payload(rng)),
                6 => Chunk::abort(rng.chance(1, 2)),
                7 => Chunk::shutdown_complete(rng.chance(1, 2)),
                8 => Chunk::cookie_echo(&payload(rng)),
                _ => Chunk::raw(rng.byte(), rng.byte(), &payload(rng)),
            };
            let mut pkt = SctpPacket::new(sp, dp, vtag).chunk(chunk);
            if rng.chance(1, 4) {
                pkt = pkt.chunk(Chunk::data(1, 0, 0, 0, &payload(rng)));
            }
            let mut f = SctpFrame::new(&src.to_string(), &dst.to_string(), pkt);
            f.ttl = ttl;
            f.frag = frag;
            return f.bytes();
        }
        let mut f = if proto == TCP {
            let flags = match rng.below(9) {
                0 => 0x02,
                1 => 0x10,
                2 => 0x12,
                3 => 0x18,
                4 => 0x11,
                5 => 0x04,
                6 => 0x14,
                _ => rng.byte(),
            };
            let mut f = Frame::tcp(&src.to_string(), sp, &dst.to_string(), dp, flags);
            f.l4 = L4::Tcp {
                sport: sp,
                dport: dp,
                flags,
                seq: rng.next() as u32,
            };
            f
        } else {
            let mut f = Frame::udp(&src.to_string(), sp, &dst.to_string(), dp);
            f.l4 = L4::Udp {
                sport: sp,
                dport: dp,
                zero_csum: src.is_ipv4() && rng.chance(1, 8),
            };
            f
        };
        f.ttl = ttl;
        f.frag = frag;
        f.tos = if rng.chance(1, 4) { rng.byte() } else { 0 };
        f.flow = if rng.chance(1, 4) {
            rng.next() as u32
        } else {
            0
        };
        f.id = rng.u16();
        f.payload = payload(rng);
        f.bytes()
    }

    fn echo(&mut self) -> Vec<u8> {
        let v6 = self.rng.chance(1, 2);
        let dst = match self.rng.below(4) {
            0 => ip(if v6 { "fd00:20::200" } else { "20.0.0.200" }),
            _ => ip(if v6 { "fd00:20::100" } else { "20.0.0.100" }),
        };
        let src = self.client(v6);
        let rest = (self.rng.next() as u32).to_be_bytes();
        let n = self.rng.below(64);
        let data: Vec<u8> = (0..n).map(|_| self.rng.byte()).collect();
        let ttl = *self.rng.pick(&[64, 1, 255]);
        if v6 {
            icmp6_frame(&src.to_string(), &dst.to_string(), ttl, 128, 0, rest, &data)
        } else {
            icmp_frame(&src.to_string(), &dst.to_string(), ttl, 8, 0, rest, &data)
        }
    }

    /// An ICMP error about a session's packet: the translated one (from a
    /// router toward the endpoint, or the endpoint itself, to the
    /// translated source) or the reply (from the client's side, to the VIP).
    fn icmp_error(&mut self, s: &Session) -> Vec<u8> {
        let about_reply = self.rng.chance(1, 4);
        let (qsrc, qsp, qdst, qdp) = if about_reply {
            (s.vip, s.vport, s.client, s.cport)
        } else {
            (s.xsrc, s.xsport, s.ep, s.eport)
        };
        let quoted = self.l4(s.proto, qsrc, qsp, qdst, qdp, about_reply);
        let q = &quoted[14..];
        let keep = match self.rng.below(3) {
            0 => q.len(),
            _ => {
                let hl = if qsrc.is_ipv4() { 20 } else { 40 };
                (hl + 8 + self.rng.below(8)).min(q.len())
            }
        };
        let q = &q[..keep];
        let (from, to) = if about_reply {
            let r = if qdst.is_ipv4() {
                "192.168.0.254"
            } else {
                "fd00:c::fe"
            };
            (ip(r), s.vip)
        } else if self.rng.chance(1, 2) {
            (s.ep, s.xsrc)
        } else {
            let r = if qdst.is_ipv4() {
                "10.0.1.254"
            } else {
                "fd00:1::fe"
            };
            (ip(r), s.xsrc)
        };
        let rest = (self.rng.next() as u32 & 0xffff).to_be_bytes();
        if from.is_ipv4() {
            let (t, c) = *self.rng.pick(&[
                (3u8, 0u8),
                (3, 1),
                (3, 3),
                (3, 4),
                (11, 0),
                (12, 0),
                (4, 0),
                (5, 1),
            ]);
            icmp_frame(&from.to_string(), &to.to_string(), 64, t, c, rest, q)
        } else {
            let (t, c) = *self.rng.pick(&[(1u8, 0u8), (1, 4), (2, 0), (3, 0), (4, 1)]);
            icmp6_frame(&from.to_string(), &to.to_string(), 64, t, c, rest, q)
        }
    }

    /// Traffic for no rule: other ports, protocols and addresses.
    fn other(&mut self) -> Vec<u8> {
        let r = self.rng.pick(&self.rules).clone();
        let v6 = r.vip.is_ipv6();
        let c = self.client(v6);
        let p = self.cport();
        match self.rng.below(8) {
            0 => {
                let port = r.port.wrapping_add(1 + self.rng.below(1000) as u16);
                self.l4(r.proto, c, p, r.vip, port, false)
            }
            1 => {
                let proto = *self.rng.pick(&[TCP, UDP, SCTP]);
                let dp = self.rng.u16();
                self.l4(proto, c, p, r.vip, dp, false)
            }
            2 => {
                let d = ip(if v6 { "fd00:20::200" } else { "20.0.0.200" });
                self.l4(r.proto, c, p, d, r.port, false)
            }
            3 => {
                let (ep, port) = r.eps[0];
                if ep.is_ipv6() == v6 {
                    self.l4(r.proto, c, p, ep, port, false)
                } else {
                    self.l4(r.proto, c, p, r.vip, r.port, false)
                }
            }
            4 => {
                // An endpoint's packet to no session.
                let (ep, port) = r.eps[0];
                let to = ip(if ep.is_ipv6() { CLIENT6 } else { CLIENT4 });
                let dp = self.rng.u16();
                self.l4(r.proto, ep, port, to, dp, true)
            }
            5 => {
                // Another IP protocol to the VIP (GRE, IPIP, ESP, raw).
                let proto = *self.rng.pick(&[47u8, 4, 50, 41, 0, 255, ICMP, ICMP6]);
                let mut b = self.l4(UDP, c, p, r.vip, r.port, false);
                set_proto(&mut b, proto);
                fix_checksums(&mut b);
                b
            }
            6 => {
                // ARP request for the VIP.
                let mut b = vec![0xff; 6];
                b.extend_from_slice(&[2, 0, 0, 0, 0, 2, 0x08, 0x06]);
                b.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1, 2, 0, 0, 0, 0, 2]);
                b.extend_from_slice(&[192, 168, 0, 2, 0, 0, 0, 0, 0, 0, 20, 0, 0, 100]);
                b
            }
            _ => {
                // An ICMP error about something never translated.
                let q = self.l4(
                    r.proto,
                    c,
                    p,
                    ip(if v6 { "fd00:9::1" } else { "9.9.9.9" }),
                    1,
                    false,
                );
                if v6 {
                    icmp6_frame(
                        "fd00:1::fe",
                        CLIENT6,
                        64,
                        1,
                        0,
                        [0; 4],
                        &q[14..q.len().min(14 + 48)],
                    )
                } else {
                    icmp_frame(
                        "10.0.1.254",
                        CLIENT4,
                        64,
                        3,
                        1,
                        [0; 4],
                        &q[14..q.len().min(14 + 28)],
                    )
                }
            }
        }
    }

    fn garbage(&mut self) -> Vec<u8> {
        let n = 14 + self.rng.below(200);
        let mut b: Vec<u8> = (0..n).map(|_| self.rng.byte()).collect();
        match self.rng.below(4) {
            0 => {}
            1 => {
                b[12..14].copy_from_slice(&[0x86, 0xdd]);
                if b.len() >= 54 && self.rng.chance(1, 2) {
                    b[14] = 0x60;
                    b[38..54].copy_from_slice(&ip6("fd00:20::100"));
                }
            }
            _ => {
                b[12..14].copy_from_slice(&[0x08, 0x00]);
                if b.len() >= 34 && self.rng.chance(1, 2) {
                    b[14] = 0x45;
                    b[30..34].copy_from_slice(&[20, 0, 0, 100]);
                    if self.rng.chance(1, 2) {
                        fix_checksums(&mut b);
                    }
                }
            }
        }
        b
    }
}

fn ip6(s: &str) -> [u8; 16] {
    s.parse::<std::net::Ipv6Addr>().unwrap().octets()
}

/// Where the layers of a frame are, as far as its bytes tell.
#[derive(Clone, Copy, Debug)]
pub struct Loc {
    pub l3: usize,
    pub v6: bool,
    /// IPv6: offset of the last next-header byte.
    pub nh: usize,
    pub l4: usize,
    pub end: usize,
    pub proto: u8,
    pub fragment: bool,
}

pub fn locate(b: &[u8]) -> Option<Loc> {
    let mut o = 12;
    while o + 2 <= b.len() && matches!(u16::from_be_bytes([b[o], b[o + 1]]), 0x8100 | 0x88a8) {
        o += 4;
    }
    if o + 2 > b.len() {
        return None;
    }
    let et = u16::from_be_bytes([b[o], b[o + 1]]);
    let l3 = o + 2;
    match et {
        0x0800 if b.len() >= l3 + 20 => {
            let ihl = (b[l3] & 0x0f) as usize * 4;
            let tot = u16::from_be_bytes([b[l3 + 2], b[l3 + 3]]) as usize;
            let frag = u16::from_be_bytes([b[l3 + 6], b[l3 + 7]]);
            Some(Loc {
                l3,
                v6: false,
                nh: l3 + 9,
                l4: l3 + ihl.max(20),
                end: (l3 + tot).min(b.len()),
                proto: b[l3 + 9],
                fragment: frag & 0x3fff != 0,
            })
        }
        0x86dd if b.len() >= l3 + 40 => {
            let plen = u16::from_be_bytes([b[l3 + 4], b[l3 + 5]]) as usize;
            let mut nh = l3 + 6;
            let mut p = l3 + 40;
            let mut fragment = false;
            for _ in 0..8 {
                let Some(&t) = b.get(nh) else { break };
                let len = match t {
                    0 | 43 | 60 if p + 2 <= b.len() => (b[p + 1] as usize + 1) * 8,
                    51 if p + 2 <= b.len() => (b[p + 1] as usize + 2) * 4,
                    44 => {
                        fragment = true;
                        8
                    }
                    _ => break,
                };
                nh = p;
                p += len;
            }
            Some(Loc {
                l3,
                v6: true,
                nh,
                l4: p,
                end: (l3 + 40 + plen).min(b.len()),
                proto: b.get(nh).copied().unwrap_or(0),
                fragment,
            })
        }
        _ => None,
    }
}

fn addrs(b: &[u8], l: &Loc) -> (IpAddr, IpAddr) {
    let a = l.l3;
    if l.v6 {
        let s: [u8; 16] = b[a + 8..a + 24].try_into().unwrap();
        let d: [u8; 16] = b[a + 24..a + 40].try_into().unwrap();
        (IpAddr::from(s), IpAddr::from(d))
    } else {
        let s: [u8; 4] = b[a + 12..a + 16].try_into().unwrap();
        let d: [u8; 4] = b[a + 16..a + 20].try_into().unwrap();
        (IpAddr::from(s), IpAddr::from(d))
    }
}

fn csum(data: &[u8], acc: u32) -> u16 {
    let mut acc = acc as u64;
    for w in data.chunks(2) {
        acc += (u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)])) as u64;
    }
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// Make the IPv4 header checksum and the upper layer's checksum right
/// for the bytes as they are (where the bytes allow).
pub fn fix_checksums(b: &mut [u8]) {
    let Some(l) = locate(b) else { return };
    if !l.v6 {
        let ihl = (b[l.l3] & 0x0f) as usize * 4;
        if ihl >= 20 && l.l3 + ihl <= b.len() {
            b[l.l3 + 10..l.l3 + 12].fill(0);
            let c = csum(&b[l.l3..l.l3 + ihl], 0);
            b[l.l3 + 10..l.l3 + 12].copy_from_slice(&c.to_be_bytes());
        }
    }
    if l.fragment || l.l4 > l.end {
        return;
    }
    let (src, dst) = addrs(b, &l);
    let len = l.end - l.l4;
    let (at, ps) = match l.proto {
        TCP if len >= 20 => (16, Some(TCP)),
        UDP if len >= 8 => {
            if !l.v6 && b[l.l4 + 6] == 0 && b[l.l4 + 7] == 0 {
                return;
            }
            (6, Some(UDP))
        }
        ICMP if !l.v6 && len >= 4 => (2, None),
        ICMP6 if l.v6 && len >= 4 => (2, Some(ICMP6)),
        SCTP if len >= 12 => {
            let s = &mut b[l.l4..l.end];
            s[8..12].fill(0);
            let c = crc32c(s);
            s[8..12].copy_from_slice(&c.to_le_bytes());
            return;
        }
        _ => return,
    };
    let s = &mut b[l.l4..l.end];
    s[at..at + 2].fill(0);
    let acc = ps.map(|p| pseudo(src, dst, p, len)).unwrap_or(0);
    let mut c = csum(s, acc);
    if l.proto == UDP && c == 0 {
        c = 0xffff;
    }
    s[at..at + 2].copy_from_slice(&c.to_be_bytes());
}

fn set_proto(b: &mut [u8], proto: u8) {
    if let Some(l) = locate(b) {
        b[l.nh] = proto;
    }
}

/// An 802.1Q tag after the MACs (sometimes two: 802.1ad outside).
fn insert_vlan(b: &mut Vec<u8>, rng: &mut Rng) {
    let tci = rng.u16().to_be_bytes();
    b.splice(12..12, [0x81, 0x00, tci[0], tci[1]]);
    if rng.chance(1, 5) {
        b.splice(12..12, [0x88, 0xa8, 0, rng.byte()]);
    }
}

/// IPv4 options (router alert, NOPs, record route, timestamp, or
/// random bytes), IHL and total length to match.
fn ipv4_options(b: &mut Vec<u8>, rng: &mut Rng) -> bool {
    let Some(l) = locate(b) else { return false };
    if l.v6 || b[l.l3] != 0x45 {
        return false;
    }
    let mut o: Vec<u8> = match rng.below(6) {
        0 => vec![0x94, 4, 0, 0],
        1 => vec![1, 1, 1, 1],
        2 => vec![7, 11, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        3 => vec![0x44, 12, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        4 => vec![1, 0, 0, 0],
        _ => (0..4 + rng.below(37)).map(|_| rng.byte()).collect(),
    };
    o.truncate(40);
    while !o.len().is_multiple_of(4) {
        o.push(0);
    }
    let n = o.len();
    b.splice(l.l3 + 20..l.l3 + 20, o);
    b[l.l3] = 0x40 | ((20 + n) / 4) as u8;
    let tot = u16::from_be_bytes([b[l.l3 + 2], b[l.l3 + 3]]) as usize + n;
    b[l.l3 + 2..l.l3 + 4].copy_from_slice(&(tot as u16).to_be_bytes());
    fix_checksums(b);
    true
}

/// A chain of 1 to 6 IPv6 extension headers (hop-by-hop first if any,
/// destination options, routing with or without segments left,
/// fragment, AH) before the upper layer.
fn ipv6_exts(b: &mut Vec<u8>, rng: &mut Rng) -> bool {
    let Some(l) = locate(b) else { return false };
    if !l.v6 || l.l4 != l.l3 + 40 {
        return false;
    }
    let upper = b[l.l3 + 6];
    let n = 1 + rng.below(6);
    let mut types = vec![];
    for i in 0..n {
        let t = match rng.below(10) {
            0 if i == 0 => 0,
            0..4 => 60,
            4..6 => 43,
            6 => 44,
            7 => 51,
            _ => 60,
        };
        types.push(t);
    }
    let mut chain = vec![];
    for (i, &t) in types.iter().enumerate() {
        let next = types.get(i + 1).copied().unwrap_or(upper);
        let mut h = match t {
            0 | 60 => {
                let k = rng.below(3);
                let mut h = vec![next, k as u8, 1, (4 + 8 * k) as u8];
                h.resize(8 + 8 * k, 0);
                h
            }
            43 => {
                let segs = if rng.chance(1, 2) { 0 } else { 1 };
                let mut h = vec![next, 2, 0, segs, 0, 0, 0, 0];
                h.extend_from_slice(&ip6("fd00:1::10"));
                h
            }
            44 => {
                let fo: u16 = *rng.pick(&[0, 0, 1, 8]);
                let m = u16::from(rng.chance(1, 2));
                let mut h = vec![next, 0];
                h.extend_from_slice(&((fo << 3) | m).to_be_bytes());
                h.extend_from_slice(&(rng.next() as u32).to_be_bytes());
                h
            }
            _ => {
                let mut h = vec![next, 4, 0, 0];
                h.extend_from_slice(&[0, 0, 1, 0, 0, 0, 0, 7]);
                h.resize(24, 0xab);
                h
            }
        };
        if rng.chance(1, 20) {
            // A length that lies.
            h[1] = rng.byte();
        }
        chain.extend_from_slice(&h);
    }
    let n = chain.len();
    b[l.l3 + 6] = types[0];
    let plen = u16::from_be_bytes([b[l.l3 + 4], b[l.l3 + 5]]) as usize + n;
    b[l.l3 + 4..l.l3 + 6].copy_from_slice(&(plen as u16).to_be_bytes());
    b.splice(l.l3 + 40..l.l3 + 40, chain);
    true
}

/// One random mutation; its name.
fn mutate(b: &mut Vec<u8>, rng: &mut Rng) -> &'static str {
    let loc = locate(b);
    let m = rng.below(12);
    let put16 = |b: &mut Vec<u8>, at: usize, v: u16| {
        if at + 2 <= b.len() {
            b[at..at + 2].copy_from_slice(&v.to_be_bytes());
        }
    };
    let near = |rng: &mut Rng, v: usize| -> u16 {
        match rng.below(4) {
            0 => rng.u16(),
            1 => 0,
            _ => (v as i64 + rng.below(41) as i64 - 20).clamp(0, 65535) as u16,
        }
    };
    match (m, loc) {
        (0, _) | (1, None) => {
            let n = rng.below(b.len());
            b.truncate(n.max(14));
            "truncated"
        }
        (1, Some(l)) if !l.v6 => {
            let v = near(rng, l.end.saturating_sub(l.l3));
            put16(b, l.l3 + 2, v);
            "ipv4-total-length"
        }
        (1, Some(l)) => {
            let v = near(rng, l.end.saturating_sub(l.l3 + 40));
            put16(b, l.l3 + 4, v);
            "ipv6-payload-length"
        }
        (2, Some(l)) if !l.v6 => {
            b[l.l3] = (b[l.l3] & 0xf0) | rng.below(16) as u8;
            "ipv4-ihl"
        }
        (3, Some(l)) if l.proto == UDP && l.l4 + 8 <= b.len() => {
            let v = near(rng, l.end.saturating_sub(l.l4));
            put16(b, l.l4 + 4, v);
            "udp-length"
        }
        (4, Some(l)) => {
            let at = if rng.chance(1, 2) && !l.v6 {
                l.l3 + 10
            } else {
                l.l4 + match l.proto {
                    TCP => 16,
                    UDP => 6,
                    SCTP => 8,
                    _ => 2,
                }
            };
            if at + 2 <= b.len() {
                b[at] ^= 1 + rng.below(255) as u8;
            }
            "wrong-checksum"
        }
        (5, Some(l)) if l.proto == TCP && l.l4 + 14 <= b.len() => {
            b[l.l4 + 13] = rng.byte();
            if rng.chance(1, 4) {
                b[l.l4 + 12] = rng.byte();
            }
            "tcp-flags"
        }
        (6, Some(l)) if !l.v6 => {
            let v = rng.u16();
            put16(b, l.l3 + 6, v);
            "ipv4-frag-flags"
        }
        (7, Some(l)) => {
            let at = l.l3 + if l.v6 { 7 } else { 8 };
            b[at] = *rng.pick(&[0, 1, 2, 255]);
            "ttl"
        }
        (8, Some(l)) if l.proto == SCTP && l.l4 + 16 <= b.len() => {
            let v = near(rng, b.len() - l.l4 - 12);
            put16(b, l.l4 + 14, v);
            "sctp-chunk-length"
        }
        (9, Some(l)) => {
            b[l.l3] = (rng.byte() & 0xf0) | (b[l.l3] & 0x0f);
            "ip-version"
        }
        (10, Some(l)) => {
            // Flips in the headers.
            for _ in 0..1 + rng.below(3) {
                let at = l.l3 + rng.below((l.l4 + 20).min(b.len()) - l.l3);
                if at < b.len() {
                    b[at] ^= 1 << rng.below(8);
                }
            }
            "header-bit-flips"
        }
        _ => {
            for _ in 0..1 + rng.below(4) {
                let at = rng.below(b.len());
                b[at] ^= 1 + rng.below(255) as u8;
            }
            "byte-flips"
        }
    }
}
