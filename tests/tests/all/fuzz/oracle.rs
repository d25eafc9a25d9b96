//! The fuzzer's oracle: what the datapath may do with a frame, decided
//! from the rule set and the frames alone. Frames are parsed with
//! `etherparse` (not with anything of the datapath's), checksums are
//! computed here from their definitions (RFC 1071 sums, RFC 9260's
//! CRC32c), and sessions are known only from translations the oracle
//! itself has accepted.
//!
//! Properties checked on every (input, verdict, output):
//! 1. nothing is rewritten (bytes changed, or sent out with TX/REDIRECT)
//!    unless the input is addressed to a rule (VIP, port, protocol), is
//!    the reverse direction of a session, is an echo request to a VIP, or
//!    is an ICMP error about a session's packet;
//! 2. a rewritten packet parses cleanly and its checksums are right (IPv4
//!    header, TCP, UDP — 0 allowed over IPv4 —, ICMP, ICMPv6, SCTP CRC32c);
//! 3. its addresses and ports come from the rule: an endpoint's ip:port,
//!    the VIP:port in replies, the client's own address (default mode) or
//!    the node's / VIP's address with a port of the source-NAT range
//!    (onearm, fullnat, NAT64); the rest of the L4 header and the payload
//!    are the input's;
//! 4. (the test run itself does not fail: checked by the caller);
//! 5. the verdict is one of DROP, PASS, TX (echo replies only), REDIRECT.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use etherparse::{LaxNetSlice, LaxSlicedPacket, SlicedPacket};
use loxilb_tests::fib::{
    verdict::{XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX},
    CLIENT_MAC, EP1_MAC, EP2_MAC, LB_TO_CLIENT_MAC, LB_TO_EP_MAC,
};

pub const ICMP: u8 = 1;
pub const IPIP: u8 = 4;
pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const ICMP6: u8 = 58;
pub const SCTP: u8 = 132;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Default,
    Onearm,
    Fullnat,
    Dsr,
    DsrIpip,
}

impl Mode {
    fn yaml(self) -> &'static str {
        match self {
            Mode::Default => "default",
            Mode::Onearm => "onearm",
            Mode::Fullnat => "fullnat",
            Mode::Dsr => "dsr",
            Mode::DsrIpip => "dsr-ipip",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Rule {
    pub name: &'static str,
    pub vip: IpAddr,
    pub port: u16,
    pub proto: u8,
    pub mode: Mode,
    pub eps: Vec<(IpAddr, u16)>,
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// The rule set: every mode, IPv4 and IPv6, NAT64, TCP, UDP and SCTP.
/// (Endpoints and clients are the addresses `fib_netns` routes.)
pub fn rules() -> Vec<Rule> {
    let r = |name, vip: &str, port, proto, mode, eps: &[(&str, u16)]| Rule {
        name,
        vip: ip(vip),
        port,
        proto,
        mode,
        eps: eps.iter().map(|(a, p)| (ip(a), *p)).collect(),
    };
    use Mode::*;
    let v4 = "20.0.0.100";
    let v6 = "fd00:20::100";
    let (e1, e2, e61, e62) = ("10.0.1.10", "10.0.1.11", "fd00:1::10", "fd00:1::11");
    vec![
        r("dnat", v4, 80, TCP, Default, &[(e1, 8080), (e2, 8080)]),
        r("dnat-udp", v4, 53, UDP, Default, &[(e1, 5353)]),
        r("onearm", v4, 81, TCP, Onearm, &[(e1, 8081)]),
        r("onearm-udp", v4, 54, UDP, Onearm, &[(e2, 5354)]),
        r("fullnat", v4, 82, TCP, Fullnat, &[(e1, 8082), (e2, 8082)]),
        r("fullnat-udp", v4, 55, UDP, Fullnat, &[(e1, 5355)]),
        r("dsr", v4, 83, TCP, Dsr, &[(e2, 83)]),
        r("dsr-ipip", v4, 84, TCP, DsrIpip, &[(e1, 84)]),
        r("dsr-ipip-udp", v4, 56, UDP, DsrIpip, &[(e1, 56)]),
        r("sctp", v4, 3868, SCTP, Default, &[(e1, 30868)]),
        r("sctp-full", v4, 3869, SCTP, Fullnat, &[(e1, 30869)]),
        r("web6", v6, 80, TCP, Default, &[(e61, 8080), (e62, 8080)]),
        r("dns6", v6, 53, UDP, Default, &[(e61, 5353)]),
        r("onearm6", v6, 81, UDP, Onearm, &[(e62, 5354)]),
        r("full6", v6, 82, TCP, Fullnat, &[(e61, 8082)]),
        r("dsr6", v6, 83, TCP, Dsr, &[(e62, 83)]),
        r("nat64", v6, 84, TCP, Default, &[(e1, 8084)]),
        r("nat64-udp", v6, 54, UDP, Default, &[(e1, 5354)]),
        r("sctp6", v6, 3868, SCTP, Default, &[(e61, 30868)]),
        r("sctp6-full", v6, 3869, SCTP, Fullnat, &[(e61, 30869)]),
    ]
}

/// The rule file of `rules`.
pub fn yaml(rules: &[Rule]) -> String {
    let mut s = String::from("rules:\n");
    for r in rules {
        let proto = match r.proto {
            TCP => "tcp",
            UDP => "udp",
            _ => "sctp",
        };
        let eps: Vec<String> = r
            .eps
            .iter()
            .map(|(a, p)| format!("{{ip: \"{a}\", port: {p}}}"))
            .collect();
        s += &format!(
            "  - {{name: {}, vip: \"{}\", port: {}, protocol: {proto}, mode: {}, endpoints: [{}]}}\n",
            r.name,
            r.vip,
            r.port,
            r.mode.yaml(),
            eps.join(", ")
        );
    }
    s
}

/// The node's addresses toward the endpoints (onearm's source, NAT64's
/// IPv4 source, the IPIP tunnel's outer source) and the source-NAT port
/// range (the agent's defaults).
pub const NODE4: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 1);
pub const NODE6: Ipv6Addr = Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 1);
pub const SNAT_PORTS: std::ops::RangeInclusive<u16> = 32768..=60999;

fn node_addr(ep: IpAddr) -> IpAddr {
    match ep {
        IpAddr::V4(_) => IpAddr::V4(NODE4),
        IpAddr::V6(_) => IpAddr::V6(NODE6),
    }
}

// ---------------------------------------------------------------- checksums

fn sum16(data: &[u8], mut acc: u32) -> u32 {
    let mut it = data.chunks_exact(2);
    for w in &mut it {
        acc = acc.wrapping_add(u16::from_be_bytes([w[0], w[1]]) as u32);
    }
    if let [b] = it.remainder() {
        acc = acc.wrapping_add((*b as u32) << 8);
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// RFC 1071: the one's-complement sum over data with its checksum is 0xffff.
pub fn inet_ok(data: &[u8], pseudo: u32) -> bool {
    fold(sum16(data, pseudo)) == 0xffff
}

/// The pseudo-header sum of TCP/UDP/ICMPv6 (RFC 793, 768, 8200 8.1).
pub fn pseudo(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> u32 {
    let mut acc = 0;
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            acc = sum16(&s.octets(), acc);
            acc = sum16(&d.octets(), acc);
            acc += proto as u32 + len as u32;
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            acc = sum16(&s.octets(), acc);
            acc = sum16(&d.octets(), acc);
            acc = sum16(&(len as u32).to_be_bytes(), acc);
            acc += proto as u32;
        }
        _ => unreachable!("mixed families"),
    }
    acc
}

/// CRC32c bit by bit (not the datapath's table-driven one): the packet
/// tables' oracle's.
pub use loxilb_tests::oracle::crc32c;

/// RFC 9260 appendix A: the CRC over the packet with a zero checksum
/// field, stored little-endian.
pub fn sctp_crc_ok(l4: &[u8]) -> bool {
    if l4.len() < 12 {
        return false;
    }
    let mut b = l4.to_vec();
    b[8..12].fill(0);
    crc32c(&b).to_le_bytes() == l4[8..12]
}

// ------------------------------------------------------------------ parsing

/// An IP packet in a frame, as etherparse reads it.
#[derive(Clone, Debug)]
pub struct View<'a> {
    pub v6: bool,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub ttl: u8,
    /// IPv4 header with options, or the IPv6 fixed header.
    pub hdr: &'a [u8],
    /// Upper-layer protocol (after IPv6 extension headers).
    pub proto: u8,
    pub fragmented: bool,
    /// The frame is shorter than the IP length says.
    pub incomplete: bool,
    /// A packet quoted in an ICMP error.
    pub quoted: bool,
    /// The upper-layer bytes (as far as the IP length and the frame go).
    pub l4: &'a [u8],
    /// IP header + extensions + upper layer, as the IP length says (or
    /// to the frame's end when cut).
    pub packet: &'a [u8],
}

impl View<'_> {
    pub fn ports(&self) -> Option<(u16, u16)> {
        // (A quoted header's fragment fields are not looked at: what an
        // ICMP error quotes is a header and 8 bytes, the datapath reads
        // the ports there as Linux's conntrack does for ICMP errors.)
        if (self.fragmented && !self.quoted)
            || !matches!(self.proto, TCP | UDP | SCTP)
            || self.l4.len() < 4
        {
            return None;
        }
        let l = self.l4;
        Some((
            u16::from_be_bytes([l[0], l[1]]),
            u16::from_be_bytes([l[2], l[3]]),
        ))
    }

    /// The IPv4 header checksum (IPv6: no header checksum).
    pub fn hdr_ok(&self) -> bool {
        self.v6 || inet_ok(self.hdr, 0)
    }

    /// Whether the upper layer's checksum verifies: None when it cannot
    /// be told (fragment, frame cut short, not a checksummed protocol).
    pub fn l4_ok(&self) -> Option<bool> {
        if self.fragmented || self.incomplete {
            return None;
        }
        let l = self.l4;
        let ps = |proto| pseudo(self.src, self.dst, proto, l.len());
        match self.proto {
            TCP if l.len() >= 20 => Some(inet_ok(l, ps(TCP))),
            UDP if l.len() >= 8 => {
                if l[6] == 0 && l[7] == 0 {
                    // RFC 768: no checksum over IPv4; RFC 8200 8.1: required over IPv6.
                    Some(!self.v6)
                } else {
                    Some(inet_ok(l, ps(UDP)))
                }
            }
            ICMP if !self.v6 && l.len() >= 8 => Some(inet_ok(l, 0)),
            ICMP6 if self.v6 && l.len() >= 8 => Some(inet_ok(l, ps(ICMP6))),
            SCTP if l.len() >= 12 => Some(sctp_crc_ok(l)),
            _ => None,
        }
    }
}

fn off(frame: &[u8], part: &[u8]) -> usize {
    part.as_ptr() as usize - frame.as_ptr() as usize
}

/// The IP packet of an Ethernet frame (802.1Q tags allowed), read
/// laxly: lengths past the frame are cut, not refused.
pub fn view(frame: &[u8]) -> Option<View<'_>> {
    let p = LaxSlicedPacket::from_ethernet(frame).ok()?;
    from_lax_net(frame, p.net?, false)
}

/// The IP packet quoted in an ICMP error (an IP header and what follows,
/// usually cut short).
pub fn view_ip(quote: &[u8]) -> Option<View<'_>> {
    let p = LaxSlicedPacket::from_ip(quote).ok()?;
    from_lax_net(quote, p.net?, true)
}

/// The upper layer of a quoted packet is all that was quoted after its
/// headers: a quote's length field is the original packet's, which may
/// say less than was quoted (or more); the ports are read where they
/// stand, as receivers of ICMP errors (and Linux's conntrack) do.
fn quoted_rest<'a>(frame: &'a [u8], l4: &'a [u8], quoted: bool) -> &'a [u8] {
    if quoted {
        &frame[off(frame, l4)..]
    } else {
        l4
    }
}

fn from_lax_net<'a>(frame: &'a [u8], net: LaxNetSlice<'a>, quoted: bool) -> Option<View<'a>> {
    match net {
        LaxNetSlice::Ipv4(s) => {
            let h = s.header();
            let pl = s.payload();
            let l3 = off(frame, h.slice());
            let hdr = &frame[l3..l3 + h.slice().len()];
            let end = off(frame, pl.payload) + pl.payload.len();
            Some(View {
                v6: false,
                src: IpAddr::V4(h.source_addr()),
                dst: IpAddr::V4(h.destination_addr()),
                ttl: h.ttl(),
                hdr,
                proto: pl.ip_number.0,
                fragmented: pl.fragmented,
                incomplete: pl.incomplete,
                quoted,
                l4: quoted_rest(frame, pl.payload, quoted),
                packet: &frame[l3..end],
            })
        }
        LaxNetSlice::Ipv6(s) => {
            let h = s.header();
            let pl = s.payload();
            let hdr = h.slice();
            let l3 = off(frame, hdr);
            let end = off(frame, pl.payload) + pl.payload.len();
            // etherparse keeps one extension header of each kind, in RFC
            // 8200 4.1's order; where a chain goes on past that (a second
            // hop-by-hop or destination options header, AH after AH...)
            // it stops and calls the rest payload. The rest of the chain
            // is walked here by RFC 8200's length rules (4.3-4.5; AH: RFC
            // 4302 2.2), as a receiver must.
            let (mut proto, mut l4, mut fragmented) = (pl.ip_number.0, pl.payload, pl.fragmented);
            let mut n = 0;
            while !fragmented && matches!(proto, 0 | 43 | 44 | 51 | 60) && l4.len() >= 8 && n < 16 {
                let len = match proto {
                    51 => (l4[1] as usize + 2) * 4,
                    44 => {
                        fragmented = u16::from_be_bytes([l4[2], l4[3]]) & 0xfff9 != 0;
                        8
                    }
                    _ => (l4[1] as usize + 1) * 8,
                };
                if len > l4.len() {
                    break;
                }
                proto = l4[0];
                l4 = &l4[len..];
                n += 1;
            }
            Some(View {
                v6: true,
                src: IpAddr::V6(h.source_addr()),
                dst: IpAddr::V6(h.destination_addr()),
                ttl: h.hop_limit(),
                hdr,
                proto,
                fragmented,
                incomplete: pl.incomplete,
                quoted,
                l4: quoted_rest(frame, l4, quoted),
                packet: &frame[l3..end],
            })
        }
        LaxNetSlice::Arp(_) => None,
    }
}

// ------------------------------------------------------------------ sessions

/// A translation the oracle accepted: the client's packet (client:cport
/// -> vip:vport) went out as (xsrc:xsport -> ep:eport).
#[derive(Clone, Debug, PartialEq)]
pub struct Session {
    pub proto: u8,
    pub client: IpAddr,
    pub cport: u16,
    pub vip: IpAddr,
    pub vport: u16,
    pub xsrc: IpAddr,
    pub xsport: u16,
    pub ep: IpAddr,
    pub eport: u16,
}

type Tuple = (u8, IpAddr, u16, IpAddr, u16);

#[derive(Default)]
pub struct Sessions {
    /// By the reply's tuple (ep:eport -> xsrc:xsport).
    by_reply: HashMap<Tuple, usize>,
    /// By the client's tuple (client:cport -> vip:vport).
    by_fwd: HashMap<Tuple, usize>,
    pub list: Vec<Session>,
}

impl Sessions {
    /// Record (or record again) a session: the newest session with a
    /// tuple is the one the tuple means (a session that ended gave its
    /// source port back; a new one may take it, and the first may come back
    /// with the same port later, its flow hashing to the same probe).
    fn add(&mut self, s: Session) {
        let f = (s.proto, s.client, s.cport, s.vip, s.vport);
        if let Some(&i) = self.by_fwd.get(&f) {
            if self.list[i] == s {
                self.by_reply
                    .insert((s.proto, s.ep, s.eport, s.xsrc, s.xsport), i);
                return;
            }
        }
        let i = self.list.len();
        self.by_reply
            .insert((s.proto, s.ep, s.eport, s.xsrc, s.xsport), i);
        self.by_fwd
            .insert((s.proto, s.client, s.cport, s.vip, s.vport), i);
        self.list.push(s);
    }

    fn reply(&self, t: Tuple) -> Option<&Session> {
        self.by_reply.get(&t).map(|&i| &self.list[i])
    }

    fn fwd(&self, t: Tuple) -> Option<&Session> {
        self.by_fwd.get(&t).map(|&i| &self.list[i])
    }
}

// ------------------------------------------------------------------ oracle

pub struct Oracle {
    pub rules: Vec<Rule>,
    pub sessions: Sessions,
    /// Client tuples (client:cport -> vip:vport) of packets to a rule that
    /// were dropped or passed untouched: the datapath makes a session
    /// before it translates, and keeps it when the translation is then
    /// refused (NAT64 of a tagged frame, a header it does not translate,
    /// no route...). The oracle never saw where such a session goes; a
    /// reply on it is accepted when its every field fits the rule (the
    /// value: the rule's index).
    pending: HashMap<Tuple, usize>,
}

/// What justified a rewrite (for the figures).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Why {
    Untouched,
    Dropped,
    /// Translated by the rule of that name.
    Forward(&'static str),
    /// A session's reply (the protocol).
    Reply(u8),
    Echo,
    IcmpError,
}

fn tuple(v: &View) -> Option<Tuple> {
    let (s, d) = v.ports()?;
    Some((v.proto, v.src, s, v.dst, d))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Oracle {
    pub fn new(rules: Vec<Rule>) -> Self {
        Oracle {
            rules,
            sessions: Sessions::default(),
            pending: HashMap::new(),
        }
    }

    fn is_vip(&self, a: IpAddr) -> bool {
        self.rules.iter().any(|r| r.vip == a)
    }

    /// Check one run. Err: what property failed, and why.
    pub fn check(&mut self, input: &[u8], verdict: u32, out: &[u8]) -> Result<Why, String> {
        match verdict {
            XDP_DROP => {
                self.note_pending(input);
                return Ok(Why::Dropped);
            }
            XDP_PASS if out == input => {
                self.note_pending(input);
                return Ok(Why::Untouched);
            }
            XDP_PASS | XDP_TX | XDP_REDIRECT => {}
            v => {
                return Err(format!(
                    "property 5: verdict {v} is not DROP/PASS/TX/REDIRECT"
                ))
            }
        }
        if out == input {
            return Err("property 1: sent out (TX/REDIRECT) unchanged".into());
        }
        if verdict != XDP_PASS {
            // Sent out of an interface: from the load balancer's MAC to a
            // neighbour's (TX: back to the sender, MACs swapped).
            let (dmac, smac) = (&out[0..6], &out[6..12]);
            let ok = if verdict == XDP_TX {
                dmac == &input[6..12] && smac == &input[0..6]
            } else {
                [LB_TO_EP_MAC, LB_TO_CLIENT_MAC].iter().any(|m| smac == m)
                    && [EP1_MAC, EP2_MAC, CLIENT_MAC].iter().any(|m| dmac == m)
            };
            if !ok {
                return Err(format!(
                    "property 3: MACs {} -> {} on a verdict-{verdict} packet",
                    hex(smac),
                    hex(dmac)
                ));
            }
        }
        let Some(inv) = view(input) else {
            return Err("property 1: rewritten, but the input is no IP packet".into());
        };
        // Property 2: the input parses cleanly -> so does the output. (An
        // input etherparse refuses — e.g. a TCP data offset past the
        // segment — may be forwarded with only its addresses and ports
        // rewritten: the datapath does not validate what it does not
        // use, like a router; the output is then as malformed as the
        // input was, and is read laxly for the other checks.)
        let in_clean = SlicedPacket::from_ethernet(input).is_ok();
        if in_clean {
            if let Err(e) = SlicedPacket::from_ethernet(out) {
                return Err(format!("property 2: output does not parse: {e}"));
            }
        }
        let Some(outv) = view(out) else {
            return Err("property 2: output is no IP packet".into());
        };
        let mut errs = vec![];
        // Every interpretation that could justify the rewrite; the first
        // that holds wins.
        if let Some((sp, dp)) = inv.ports() {
            for r in self
                .rules
                .iter()
                .filter(|r| r.vip == inv.dst && r.port == dp && r.proto == inv.proto)
            {
                match self.forward(r, input, out, &inv, &outv, sp, dp, verdict) {
                    Ok(s) => {
                        if let Some(s) = s {
                            self.sessions.add(s);
                        }
                        return Ok(Why::Forward(r.name));
                    }
                    Err(e) => errs.push(format!("as rule {}: {e}", r.name)),
                }
            }
        }
        if let Some(t) = tuple(&inv) {
            if let Some(s) = self.sessions.reply(t) {
                match reply(s, &inv, &outv, verdict) {
                    Ok(()) => return Ok(Why::Reply(inv.proto)),
                    Err(e) => errs.push(format!("as a reply of {s:?}: {e}")),
                }
            }
            if let (Some((sp, dp)), Some((osp, odp))) = (inv.ports(), outv.ports()) {
                if let Some(s) = self.pending_session(
                    inv.proto, inv.src, sp, inv.dst, dp, outv.dst, odp, outv.src, osp,
                ) {
                    match reply(&s, &inv, &outv, verdict) {
                        Ok(()) => {
                            self.sessions.add(s);
                            return Ok(Why::Reply(inv.proto));
                        }
                        Err(e) => errs.push(format!("as a reply of unseen {s:?}: {e}")),
                    }
                }
            }
        }
        if is_echo_request(&inv) && self.is_vip(inv.dst) {
            match echo(&inv, &outv, verdict) {
                Ok(()) => return Ok(Why::Echo),
                Err(e) => errs.push(format!("as an echo request to a VIP: {e}")),
            }
        }
        if let Some(q) = icmp_error_quote(&inv) {
            match self.icmp_error(&inv, q, &outv, verdict) {
                Ok(true) => return Ok(Why::IcmpError),
                Ok(false) => {}
                Err(e) => errs.push(format!("as an ICMP error about a session: {e}")),
            }
        }
        if errs.is_empty() {
            Err(format!(
                "property 1: rewritten (verdict {verdict}) without a rule or session: {} {:?} -> {:?} ports {:?}",
                inv.proto,
                inv.src,
                inv.dst,
                inv.ports()
            ))
        } else {
            Err(errs.join("; "))
        }
    }

    /// The rule a packet is addressed to (VIP, port, protocol).
    fn rule_of(&self, v: &View) -> Option<usize> {
        let (_, dp) = v.ports()?;
        self.rules
            .iter()
            .position(|r| r.vip == v.dst && r.port == dp && r.proto == v.proto)
    }

    fn note_pending(&mut self, input: &[u8]) {
        if let Some(v) = view(input) {
            if let (Some(i), Some(t)) = (self.rule_of(&v), tuple(&v)) {
                self.pending.insert(t, i);
            }
        }
    }

    /// A session made for a client tuple in `pending`, going to ep:eport
    /// from xsrc:xsport: when these fit the rule's mode.
    #[allow(clippy::too_many_arguments)]
    fn pending_session(
        &self,
        proto: u8,
        ep: IpAddr,
        eport: u16,
        xsrc: IpAddr,
        xsport: u16,
        client: IpAddr,
        cport: u16,
        vip: IpAddr,
        vport: u16,
    ) -> Option<Session> {
        let &i = self.pending.get(&(proto, client, cport, vip, vport))?;
        let r = &self.rules[i];
        if !r.eps.contains(&(ep, eport)) {
            return None;
        }
        let nat64 = r.vip.is_ipv6() && ep.is_ipv4();
        let fits = match r.mode {
            Mode::Default if !nat64 => xsrc == client && xsport == cport,
            Mode::Default | Mode::Onearm => xsrc == node_addr(ep) && SNAT_PORTS.contains(&xsport),
            Mode::Fullnat => xsrc == r.vip && SNAT_PORTS.contains(&xsport),
            Mode::Dsr | Mode::DsrIpip => false,
        };
        fits.then_some(Session {
            proto,
            client,
            cport,
            vip,
            vport,
            xsrc,
            xsport,
            ep,
            eport,
        })
    }

    /// The client's packet to rule `r`: the output per the rule's mode.
    /// Ok(Some): the session it makes.
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        r: &Rule,
        input: &[u8],
        out: &[u8],
        inv: &View,
        outv: &View,
        sport: u16,
        dport: u16,
        verdict: u32,
    ) -> Result<Option<Session>, String> {
        if verdict == XDP_TX {
            return Err("TX".into());
        }
        match r.mode {
            Mode::Dsr => {
                // Only the MACs change: the frame goes as it came, to the
                // endpoint's MAC (checked with the verdict).
                if out[12..] != input[12..] {
                    return Err("L2 DSR changed more than the MACs".into());
                }
                Ok(None)
            }
            Mode::DsrIpip => {
                // Outer IPv4 from the node to the endpoint, around the
                // client's IP packet as it came.
                if outv.v6 || outv.proto != IPIP {
                    return Err(format!("protocol {} is not IPIP", outv.proto));
                }
                if outv.src != IpAddr::V4(NODE4) || !r.eps.iter().any(|(a, _)| *a == outv.dst) {
                    return Err(format!("tunnel {} -> {}", outv.src, outv.dst));
                }
                if !outv.hdr_ok() {
                    return Err("property 2: outer IPv4 header checksum".into());
                }
                if outv.l4 != inv.packet {
                    return Err("inner packet differs from the client's".into());
                }
                Ok(None)
            }
            mode => {
                let (osp, odp) = outv
                    .ports()
                    .ok_or_else(|| "output has no ports".to_string())?;
                if !r.eps.contains(&(outv.dst, odp)) {
                    return Err(format!("{}:{odp} is no endpoint", outv.dst));
                }
                let ep = outv.dst;
                let nat64 = r.vip.is_ipv6() && ep.is_ipv4();
                let (src_ok, port_ok) = match mode {
                    Mode::Default if !nat64 => (outv.src == inv.src, osp == sport),
                    Mode::Default | Mode::Onearm => {
                        (outv.src == node_addr(ep), SNAT_PORTS.contains(&osp))
                    }
                    _ => (outv.src == r.vip, SNAT_PORTS.contains(&osp)),
                };
                if !src_ok || !port_ok {
                    return Err(format!("source {}:{osp} for mode {mode:?}", outv.src));
                }
                same_l4(inv, outv, verdict)?;
                Ok(Some(Session {
                    proto: inv.proto,
                    client: inv.src,
                    cport: sport,
                    vip: inv.dst,
                    vport: dport,
                    xsrc: outv.src,
                    xsport: osp,
                    ep,
                    eport: odp,
                }))
            }
        }
    }

    /// An ICMP error quoting a packet of a session: Ok(false) when the
    /// quote is of no known session.
    fn icmp_error(&self, inv: &View, q: View, outv: &View, verdict: u32) -> Result<bool, String> {
        let Some((qs, qd)) = q.ports() else {
            return Ok(false);
        };
        // About the translated packet (xsrc -> ep), sent to xsrc: back to
        // the client, about the client's own packet (client -> vip).
        // About the reply (vip -> client), sent to the VIP: on to the
        // endpoint, about the endpoint's packet (ep -> xsrc).
        let fwd = self.sessions.reply((q.proto, q.dst, qd, q.src, qs));
        let rev = self.sessions.fwd((q.proto, q.dst, qd, q.src, qs));
        // A session the oracle did not see made (see `pending`): known by
        // the client tuple the output's quote names.
        let unseen = icmp_error_quote(outv).and_then(|oq| {
            let (s, d) = oq.ports()?;
            self.pending_session(q.proto, q.dst, qd, q.src, qs, oq.src, s, oq.dst, d)
        });
        let cases: Vec<(IpAddr, IpAddr, u16, IpAddr, u16, IpAddr)> = fwd
            .or(unseen.as_ref())
            .map(|s| (s.client, s.client, s.cport, s.vip, s.vport, s.vip))
            .into_iter()
            .chain(rev.map(|s| (s.ep, s.ep, s.eport, s.xsrc, s.xsport, s.xsrc)))
            .collect();
        if cases.is_empty() {
            return Ok(false);
        }
        let mut errs = vec![];
        for (to, isrc, isp, idst, idp, from) in cases {
            let r = (|| {
                if verdict == XDP_TX {
                    return Err("TX".to_string());
                }
                if outv.dst != to {
                    return Err(format!("sent to {} not {to}", outv.dst));
                }
                if outv.src != inv.src && outv.src != from {
                    return Err(format!("from {}", outv.src));
                }
                if outv.proto != inv.proto {
                    return Err(format!("protocol {}", outv.proto));
                }
                if !outv.hdr_ok() && inv.hdr_ok() {
                    return Err("property 2: IPv4 header checksum".into());
                }
                if inv.l4_ok() == Some(true) && outv.l4_ok() != Some(true) {
                    return Err("property 2: ICMP checksum".into());
                }
                let oq = icmp_error_quote(outv).ok_or("no quote in the output")?;
                let (s, d) = oq.ports().ok_or("no ports in the output's quote")?;
                if (oq.src, s, oq.dst, d) != (isrc, isp, idst, idp) {
                    return Err(format!(
                        "quote {}:{s} -> {}:{d}, want {isrc}:{isp} -> {idst}:{idp}",
                        oq.src, oq.dst
                    ));
                }
                if !oq.v6 && q.hdr_ok() && !oq.hdr_ok() {
                    return Err("property 2: quoted IPv4 header checksum".into());
                }
                Ok(())
            })();
            match r {
                Ok(()) => return Ok(true),
                Err(e) => errs.push(e),
            }
        }
        Err(errs.join(" / "))
    }
}

/// The reverse direction of session `s` (ep:eport -> xsrc:xsport):
/// back from vip:vport to client:cport.
fn reply(s: &Session, inv: &View, outv: &View, verdict: u32) -> Result<(), String> {
    if verdict == XDP_TX {
        return Err("TX".into());
    }
    let (sp, dp) = outv.ports().ok_or("output has no ports")?;
    if (outv.src, sp, outv.dst, dp) != (s.vip, s.vport, s.client, s.cport) {
        return Err(format!(
            "{}:{sp} -> {}:{dp}, want {}:{} -> {}:{}",
            outv.src, outv.dst, s.vip, s.vport, s.client, s.cport
        ));
    }
    same_l4(inv, outv, verdict)
}

/// TTL, checksums and the L4 bytes other than ports and checksum of a
/// translated packet.
fn same_l4(inv: &View, outv: &View, verdict: u32) -> Result<(), String> {
    if outv.proto != inv.proto {
        return Err(format!("protocol {} became {}", inv.proto, outv.proto));
    }
    // Forwarded: TTL - 1 (never to 0); handed to the stack: untouched
    // (the stack decrements it when it forwards).
    let want = if verdict == XDP_REDIRECT {
        if inv.ttl <= 1 {
            return Err(format!("forwarded with TTL {}", inv.ttl));
        }
        inv.ttl - 1
    } else {
        inv.ttl
    };
    if outv.ttl != want {
        return Err(format!("TTL {} -> {} (want {want})", inv.ttl, outv.ttl));
    }
    // Checksums: right wherever the input's were. (The datapath updates
    // checksums incrementally and verifies none, as a router does: a
    // wrong checksum in the input stays wrong in the output, and the
    // receiver drops it. A new IPv4 header — NAT64 — must be right.)
    if !outv.hdr_ok() && (inv.v6 || inv.hdr_ok()) {
        return Err("property 2: IPv4 header checksum".into());
    }
    if inv.l4_ok() == Some(true) && outv.l4_ok() != Some(true) {
        return Err(format!(
            "property 2: {} checksum",
            match outv.proto {
                TCP => "TCP",
                UDP => "UDP",
                _ => "SCTP CRC32c",
            }
        ));
    }
    let (a, b) = (inv.l4, outv.l4);
    if a.len() != b.len() {
        return Err(format!("L4 length {} became {}", a.len(), b.len()));
    }
    let tcp_changed = || a.len() >= 18 && (a[4..16] != b[4..16] || a[18..] != b[18..]);
    let udp_changed = || a.len() >= 8 && (a[4..6] != b[4..6] || a[8..] != b[8..]);
    match inv.proto {
        TCP if tcp_changed() => return Err("TCP header or payload changed".into()),
        UDP if udp_changed() => return Err("UDP length or payload changed".into()),
        SCTP => sctp_same(a, b)?,
        _ => {}
    }
    Ok(())
}

/// SCTP: the verification tag and every chunk as they came, except the
/// address parameters of INIT / INIT-ACK, which may be rewritten to a VIP
/// (fullnat's client addresses, an endpoint's addresses toward the
/// client) or hidden (type 0xbfff: an address the peer must not use).
fn sctp_same(a: &[u8], b: &[u8]) -> Result<(), String> {
    if a.len() < 12 {
        return if a[4.min(a.len())..] == b[4.min(b.len())..] {
            Ok(())
        } else {
            Err("cut SCTP header changed".into())
        };
    }
    if a[4..8] != b[4..8] {
        return Err("SCTP verification tag changed".into());
    }
    let vips = [ip("20.0.0.100"), ip("fd00:20::100")];
    let mut c = 12;
    while c + 4 <= a.len() {
        let typ = a[c];
        let len = u16::from_be_bytes([a[c + 2], a[c + 3]]) as usize;
        let end = (c + len).min(a.len());
        if len < 4 {
            break;
        }
        if (typ == 1 || typ == 2) && c + 20 <= end {
            if a[c..c + 20] != b[c..c + 20] {
                return Err("INIT chunk header changed".into());
            }
            let mut p = c + 20;
            while p + 4 <= end {
                let pt = u16::from_be_bytes([a[p], a[p + 1]]);
                let pl = u16::from_be_bytes([a[p + 2], a[p + 3]]) as usize;
                if pl < 4 || p + pl > end {
                    break;
                }
                if a[p..p + pl] != b[p..p + pl] {
                    let ot = u16::from_be_bytes([b[p], b[p + 1]]);
                    let val = &b[p + 4..p + pl];
                    let addr = match (pt, pl) {
                        (5, 8) => Some(IpAddr::from(<[u8; 4]>::try_from(val).unwrap())),
                        (6, 20) => Some(IpAddr::from(<[u8; 16]>::try_from(val).unwrap())),
                        _ => None,
                    };
                    let hidden = ot == 0xbfff && a[p + 2..p + pl] == b[p + 2..p + pl];
                    let to_vip = ot == pt
                        && a[p + 2..p + 4] == b[p + 2..p + 4]
                        && addr.is_some_and(|x| vips.contains(&x));
                    if addr.is_none() || !(hidden || to_vip) {
                        return Err(format!("SCTP parameter at {p} rewritten"));
                    }
                }
                p += pl.div_ceil(4) * 4;
            }
            if p < end && a[p..end] != b[p..end] {
                return Err("INIT tail changed".into());
            }
        } else if a[c..end] != b[c..end] {
            return Err(format!("SCTP chunk {typ} changed"));
        }
        c += len.div_ceil(4) * 4;
    }
    if c < a.len() && a[c..] != b[c..] {
        return Err("SCTP bytes after the chunks changed".into());
    }
    Ok(())
}

fn is_echo_request(v: &View) -> bool {
    !v.fragmented
        && v.l4.len() >= 8
        && match (v.v6, v.proto) {
            (false, ICMP) => v.l4[0] == 8,
            (true, ICMP6) => v.l4[0] == 128,
            _ => false,
        }
}

/// An echo request to a VIP answered in place: addresses swapped, the
/// reply type, identifier, sequence and data kept.
fn echo(inv: &View, outv: &View, verdict: u32) -> Result<(), String> {
    if verdict != XDP_TX {
        return Err(format!("verdict {verdict}, not TX"));
    }
    if (outv.src, outv.dst) != (inv.dst, inv.src) || outv.proto != inv.proto {
        return Err(format!("{} -> {}", outv.src, outv.dst));
    }
    let want_type = if inv.v6 { 129 } else { 0 };
    let (a, b) = (inv.l4, outv.l4);
    if b.len() != a.len() || b[0] != want_type || b[1] != a[1] || a[4..] != b[4..] {
        return Err("echo reply body".into());
    }
    if !outv.hdr_ok() && inv.hdr_ok() {
        return Err("property 2: IPv4 header checksum".into());
    }
    if inv.l4_ok() == Some(true) && outv.l4_ok() != Some(true) {
        return Err("property 2: ICMP checksum".into());
    }
    Ok(())
}

/// The quoted packet of an ICMP / ICMPv6 error.
fn icmp_error_quote<'a>(v: &View<'a>) -> Option<View<'a>> {
    if v.fragmented || v.l4.len() < 8 {
        return None;
    }
    let t = v.l4[0];
    let err = match (v.v6, v.proto) {
        (false, ICMP) => matches!(t, 3 | 4 | 5 | 11 | 12),
        (true, ICMP6) => matches!(t, 1..=4),
        _ => false,
    };
    if !err {
        return None;
    }
    view_ip(&v.l4[8..])
}

/// Hex of a frame, for replay.
pub fn to_hex(b: &[u8]) -> String {
    hex(b)
}

#[test]
fn crc32c_and_inet_checksum_reference_values() {
    // RFC 3720 B.4: 32 bytes of zeros.
    assert_eq!(crc32c(&[0u8; 32]), 0x8a91_36aa);
    assert_eq!(crc32c(b"123456789"), 0xe306_9283);
    // RFC 1071's example words sum to ddf2.
    let d = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
    assert_eq!(fold(sum16(&d, 0)), 0xddf2);
}

/// The oracle itself: it accepts the translations the packet tables
/// expect, and refuses each kind of wrong output.
#[test]
fn the_oracle_accepts_right_translations_and_refuses_wrong_ones() {
    use loxilb_tests::packet::{Frame, ACK, SYN};
    let mut o = Oracle::new(rules());
    let syn = Frame::tcp("192.168.0.2", 40000, "20.0.0.100", 80, SYN);
    let good = syn
        .with("192.168.0.2", 40000, "10.0.1.10", 8080)
        .routed(LB_TO_EP_MAC, EP1_MAC);
    let (i, g) = (syn.bytes(), good.bytes());
    assert_eq!(o.check(&i, XDP_REDIRECT, &g), Ok(Why::Forward("dnat")));
    assert_eq!(o.check(&i, XDP_PASS, &i), Ok(Why::Untouched));
    assert_eq!(o.check(&i, XDP_DROP, &g), Ok(Why::Dropped));
    let reply = Frame::tcp("10.0.1.10", 8080, "192.168.0.2", 40000, SYN | ACK);
    let back = reply
        .with("20.0.0.100", 80, "192.168.0.2", 40000)
        .routed(LB_TO_CLIENT_MAC, CLIENT_MAC);
    assert_eq!(
        o.check(&reply.bytes(), XDP_REDIRECT, &back.bytes()),
        Ok(Why::Reply(TCP))
    );

    let refused = |o: &mut Oracle, what: &str, i: &[u8], v: u32, out: &[u8], why: &str| {
        let r = o.check(i, v, out);
        assert!(
            r.as_ref().is_err_and(|e| e.contains(why)),
            "{what}: {r:?} (want an error with {why:?})"
        );
    };
    // Property 5: a verdict outside the set.
    refused(&mut o, "aborted", &i, 0, &g, "property 5");
    // Property 2: a wrong TCP checksum, a wrong IPv4 header checksum.
    let mut b = g.clone();
    b[14 + 20 + 16] ^= 1;
    refused(&mut o, "TCP checksum", &i, XDP_REDIRECT, &b, "TCP checksum");
    let mut b = g.clone();
    b[14 + 10] ^= 1;
    refused(
        &mut o,
        "IPv4 checksum",
        &i,
        XDP_REDIRECT,
        &b,
        "header checksum",
    );
    // Property 1: a packet for no rule rewritten; a reply of no session.
    let other = Frame::tcp("192.168.0.2", 40000, "20.0.0.200", 80, SYN);
    let o2 = other
        .with("192.168.0.2", 40000, "10.0.1.10", 8080)
        .routed(LB_TO_EP_MAC, EP1_MAC);
    refused(
        &mut o,
        "no rule",
        &other.bytes(),
        XDP_REDIRECT,
        &o2.bytes(),
        "property 1",
    );
    let stray = Frame::tcp("10.0.1.10", 8080, "192.168.0.2", 40001, ACK);
    let s2 = stray
        .with("20.0.0.100", 80, "192.168.0.2", 40001)
        .routed(LB_TO_CLIENT_MAC, CLIENT_MAC);
    refused(
        &mut o,
        "no session",
        &stray.bytes(),
        XDP_REDIRECT,
        &s2.bytes(),
        "property 1",
    );
    // Property 3: not an endpoint of the rule; a full-NAT source port out
    // of the range; a payload changed; TTL not decremented.
    let wrong = syn
        .with("192.168.0.2", 40000, "10.0.1.12", 8080)
        .routed(LB_TO_EP_MAC, EP1_MAC);
    refused(
        &mut o,
        "endpoint",
        &i,
        XDP_REDIRECT,
        &wrong.bytes(),
        "no endpoint",
    );
    let fsyn = Frame::tcp("192.168.0.2", 40000, "20.0.0.100", 82, SYN);
    let fout = fsyn
        .with("20.0.0.100", 1000, "10.0.1.10", 8082)
        .routed(LB_TO_EP_MAC, EP1_MAC);
    refused(
        &mut o,
        "SNAT port",
        &fsyn.bytes(),
        XDP_REDIRECT,
        &fout.bytes(),
        "source",
    );
    let mut p = syn.clone();
    p.payload = b"hellO".to_vec();
    let pout = p
        .with("192.168.0.2", 40000, "10.0.1.10", 8080)
        .routed(LB_TO_EP_MAC, EP1_MAC);
    refused(
        &mut o,
        "payload",
        &i,
        XDP_REDIRECT,
        &pout.bytes(),
        "payload",
    );
    let mut t = good.clone();
    t.ttl += 1;
    refused(&mut o, "TTL", &i, XDP_REDIRECT, &t.bytes(), "TTL");
    // A full-NAT source port given to one client, then (that session
    // over) another, then the first again: a reply means the last.
    let mut o = Oracle::new(rules());
    for cport in [1219u16, 58360, 1219] {
        let f = Frame::tcp("192.168.0.2", cport, "20.0.0.100", 82, SYN);
        let x = f
            .with("20.0.0.100", 40043, "10.0.1.10", 8082)
            .routed(LB_TO_EP_MAC, EP1_MAC);
        assert_eq!(
            o.check(&f.bytes(), XDP_REDIRECT, &x.bytes()),
            Ok(Why::Forward("fullnat"))
        );
    }
    let r = Frame::tcp("10.0.1.10", 8082, "20.0.0.100", 40043, ACK);
    let to = |cport| {
        r.with("20.0.0.100", 82, "192.168.0.2", cport)
            .routed(LB_TO_CLIENT_MAC, CLIENT_MAC)
            .bytes()
    };
    assert_eq!(
        o.check(&r.bytes(), XDP_REDIRECT, &to(1219)),
        Ok(Why::Reply(TCP))
    );
    refused(
        &mut o,
        "old owner",
        &r.bytes(),
        XDP_REDIRECT,
        &to(58360),
        "want",
    );
    // Sent out unchanged; MACs not the load balancer's.
    refused(&mut o, "unchanged", &i, XDP_REDIRECT, &i, "unchanged");
    let mut m = g.clone();
    m[0] = 0xee;
    refused(&mut o, "MAC", &i, XDP_REDIRECT, &m, "MACs");
}
