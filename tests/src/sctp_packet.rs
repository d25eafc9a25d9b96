//! SCTP packet builders for the packet tables (raw bytes, inside Ethernet +
//! IPv4 or IPv6), with a correct CRC32c from `loxilb_common::crc32c`, and a
//! parser that gives back the chunks and the INIT/INIT-ACK address
//! parameters, so tests can assert on rewritten packets.
//!
//! ```text
//! let init = SctpPacket::new(40000, 3868, 0).chunk(Chunk::init(
//!     0x1111_2222, 1, &["10.0.0.2".parse()?, "10.1.0.2".parse()?]));
//! let frame = SctpFrame::new("10.0.0.2", "20.0.0.100", init).bytes();
//! let p = parse_frame(&frame)?;
//! assert!(p.sctp.crc_ok);
//! assert_eq!(p.sctp.addresses(), vec![...]);
//! ```
//!
//! Wire format (RFC 9260): common header `sport dport vtag checksum` (12
//! bytes; the checksum is CRC32c over the whole SCTP packet with the field
//! zero, stored least significant byte first), then chunks `type flags
//! length value` padded to 4 bytes (the length excludes the padding).
//! INIT/INIT-ACK values: `initiate_tag a_rwnd out_streams in_streams
//! initial_tsn` (16 bytes), then parameters `type length value` padded to 4.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{bail, ensure, Result};
use loxilb_common::{crc32c, csum};

pub const DATA: u8 = 0;
pub const INIT: u8 = 1;
pub const INIT_ACK: u8 = 2;
pub const SACK: u8 = 3;
pub const HEARTBEAT: u8 = 4;
pub const HEARTBEAT_ACK: u8 = 5;
pub const ABORT: u8 = 6;
pub const SHUTDOWN: u8 = 7;
pub const SHUTDOWN_ACK: u8 = 8;
pub const ERROR: u8 = 9;
pub const COOKIE_ECHO: u8 = 10;
pub const COOKIE_ACK: u8 = 11;
pub const SHUTDOWN_COMPLETE: u8 = 14;

/// Heartbeat Info (in HEARTBEAT / HEARTBEAT-ACK).
pub const PARAM_HEARTBEAT_INFO: u16 = 1;
pub const PARAM_IPV4: u16 = 5;
pub const PARAM_IPV6: u16 = 6;
pub const PARAM_STATE_COOKIE: u16 = 7;
/// Supported Address Types (in INIT).
pub const PARAM_SUPPORTED_ADDR_TYPES: u16 = 12;

/// IP protocol number of SCTP.
pub const IPPROTO_SCTP: u8 = 132;

/// Flag of ABORT and SHUTDOWN-COMPLETE: the vtag is the receiver's own
/// ("reflected"), not the peer's.
pub const FLAG_T: u8 = 0x01;
/// DATA flags: E (last fragment), B (first fragment), U (unordered).
pub const DATA_E: u8 = 0x01;
pub const DATA_B: u8 = 0x02;
pub const DATA_U: u8 = 0x04;

/// One TLV parameter (INIT/INIT-ACK, HEARTBEAT).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Param {
    pub typ: u16,
    pub value: Vec<u8>,
}

impl Param {
    pub fn addr(a: IpAddr) -> Self {
        match a {
            IpAddr::V4(a) => Param {
                typ: PARAM_IPV4,
                value: a.octets().to_vec(),
            },
            IpAddr::V6(a) => Param {
                typ: PARAM_IPV6,
                value: a.octets().to_vec(),
            },
        }
    }

    pub fn cookie(c: &[u8]) -> Self {
        Param {
            typ: PARAM_STATE_COOKIE,
            value: c.to_vec(),
        }
    }

    /// The address of an IPv4/IPv6 address parameter.
    pub fn as_addr(&self) -> Option<IpAddr> {
        match (self.typ, self.value.len()) {
            (PARAM_IPV4, 4) => Some(IpAddr::V4(Ipv4Addr::from(
                <[u8; 4]>::try_from(&self.value[..]).unwrap(),
            ))),
            (PARAM_IPV6, 16) => Some(IpAddr::V6(Ipv6Addr::from(
                <[u8; 16]>::try_from(&self.value[..]).unwrap(),
            ))),
            _ => None,
        }
    }

    fn push(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.typ.to_be_bytes());
        out.extend_from_slice(&((4 + self.value.len()) as u16).to_be_bytes());
        out.extend_from_slice(&self.value);
        pad4(out);
    }
}

/// A parameter as found in a packet: where it starts (offset of its type
/// field from the start of the SCTP common header) and its declared length.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamAt {
    pub offset: usize,
    pub param: Param,
}

/// The fixed part of INIT and INIT-ACK.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InitFixed {
    pub initiate_tag: u32,
    pub a_rwnd: u32,
    pub out_streams: u16,
    pub in_streams: u16,
    pub initial_tsn: u32,
}

/// One chunk: type, flags and value (without the 4-byte chunk header and
/// without padding). `length` overrides the declared length (malformed
/// packets); `None` writes `4 + value.len()`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chunk {
    pub typ: u8,
    pub flags: u8,
    pub value: Vec<u8>,
    pub length: Option<u16>,
}

impl Chunk {
    pub fn raw(typ: u8, flags: u8, value: &[u8]) -> Self {
        Chunk {
            typ,
            flags,
            value: value.to_vec(),
            length: None,
        }
    }

    /// Declare a length other than the real one (malformed-packet tests).
    pub fn with_length(mut self, len: u16) -> Self {
        self.length = Some(len);
        self
    }

    fn init_like(typ: u8, f: InitFixed, params: &[Param]) -> Self {
        let mut v = vec![];
        v.extend_from_slice(&f.initiate_tag.to_be_bytes());
        v.extend_from_slice(&f.a_rwnd.to_be_bytes());
        v.extend_from_slice(&f.out_streams.to_be_bytes());
        v.extend_from_slice(&f.in_streams.to_be_bytes());
        v.extend_from_slice(&f.initial_tsn.to_be_bytes());
        for p in params {
            p.push(&mut v);
        }
        // the last parameter's padding is not part of the chunk length
        if let Some(last) = params.last() {
            let pad = (4 - last.value.len() % 4) % 4;
            v.truncate(v.len() - pad);
        }
        Chunk::raw(typ, 0, &v)
    }

    fn fixed(tag: u32, tsn: u32) -> InitFixed {
        InitFixed {
            initiate_tag: tag,
            a_rwnd: 65_536,
            out_streams: 10,
            in_streams: 10,
            initial_tsn: tsn,
        }
    }

    /// INIT with initiate tag `tag`, initial TSN `tsn` and one address
    /// parameter per entry of `addrs` (IPv4 type 5, IPv6 type 6).
    pub fn init(tag: u32, tsn: u32, addrs: &[IpAddr]) -> Self {
        let params: Vec<Param> = addrs.iter().map(|a| Param::addr(*a)).collect();
        Self::init_with(Self::fixed(tag, tsn), &params)
    }

    pub fn init_with(f: InitFixed, params: &[Param]) -> Self {
        Self::init_like(INIT, f, params)
    }

    /// INIT-ACK: the address parameters, then the state cookie.
    pub fn init_ack(tag: u32, tsn: u32, addrs: &[IpAddr], cookie: &[u8]) -> Self {
        let mut params: Vec<Param> = addrs.iter().map(|a| Param::addr(*a)).collect();
        params.push(Param::cookie(cookie));
        Self::init_ack_with(Self::fixed(tag, tsn), &params)
    }

    pub fn init_ack_with(f: InitFixed, params: &[Param]) -> Self {
        Self::init_like(INIT_ACK, f, params)
    }

    pub fn cookie_echo(cookie: &[u8]) -> Self {
        Chunk::raw(COOKIE_ECHO, 0, cookie)
    }

    pub fn cookie_ack() -> Self {
        Chunk::raw(COOKIE_ACK, 0, &[])
    }

    /// An unfragmented DATA chunk (B and E set).
    pub fn data(tsn: u32, stream: u16, ssn: u16, ppid: u32, payload: &[u8]) -> Self {
        let mut v = vec![];
        v.extend_from_slice(&tsn.to_be_bytes());
        v.extend_from_slice(&stream.to_be_bytes());
        v.extend_from_slice(&ssn.to_be_bytes());
        v.extend_from_slice(&ppid.to_be_bytes());
        v.extend_from_slice(payload);
        Chunk::raw(DATA, DATA_B | DATA_E, &v)
    }

    /// SACK without gap blocks or duplicates.
    pub fn sack(cum_tsn: u32, a_rwnd: u32) -> Self {
        let mut v = vec![];
        v.extend_from_slice(&cum_tsn.to_be_bytes());
        v.extend_from_slice(&a_rwnd.to_be_bytes());
        v.extend_from_slice(&[0, 0, 0, 0]);
        Chunk::raw(SACK, 0, &v)
    }

    /// HEARTBEAT carrying `info` in a Heartbeat Info parameter.
    pub fn heartbeat(info: &[u8]) -> Self {
        let mut v = vec![];
        Param {
            typ: PARAM_HEARTBEAT_INFO,
            value: info.to_vec(),
        }
        .push(&mut v);
        v.truncate(4 + info.len());
        Chunk::raw(HEARTBEAT, 0, &v)
    }

    pub fn heartbeat_ack(info: &[u8]) -> Self {
        let mut c = Self::heartbeat(info);
        c.typ = HEARTBEAT_ACK;
        c
    }

    /// ABORT without error causes; `t`: the T bit.
    pub fn abort(t: bool) -> Self {
        Chunk::raw(ABORT, if t { FLAG_T } else { 0 }, &[])
    }

    pub fn shutdown(cum_tsn: u32) -> Self {
        Chunk::raw(SHUTDOWN, 0, &cum_tsn.to_be_bytes())
    }

    pub fn shutdown_ack() -> Self {
        Chunk::raw(SHUTDOWN_ACK, 0, &[])
    }

    pub fn shutdown_complete(t: bool) -> Self {
        Chunk::raw(SHUTDOWN_COMPLETE, if t { FLAG_T } else { 0 }, &[])
    }

    fn push(&self, out: &mut Vec<u8>) {
        out.push(self.typ);
        out.push(self.flags);
        let len = self.length.unwrap_or((4 + self.value.len()) as u16);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&self.value);
        pad4(out);
    }

    /// The fixed part of an INIT/INIT-ACK.
    pub fn init_fixed(&self) -> Option<InitFixed> {
        if !matches!(self.typ, INIT | INIT_ACK) || self.value.len() < 16 {
            return None;
        }
        let v = &self.value;
        Some(InitFixed {
            initiate_tag: be32(&v[0..4]),
            a_rwnd: be32(&v[4..8]),
            out_streams: u16::from_be_bytes([v[8], v[9]]),
            in_streams: u16::from_be_bytes([v[10], v[11]]),
            initial_tsn: be32(&v[12..16]),
        })
    }

    /// The parameters of an INIT/INIT-ACK (or a HEARTBEAT's), with offsets
    /// relative to the start of the chunk's value. Fails on a parameter
    /// that is shorter than 4 or runs past the chunk.
    pub fn params(&self) -> Result<Vec<ParamAt>> {
        let start = match self.typ {
            INIT | INIT_ACK => 16,
            HEARTBEAT | HEARTBEAT_ACK => 0,
            t => bail!("chunk type {t} has no parameters"),
        };
        parse_params(&self.value, start)
    }

    /// DATA: (tsn, stream, ssn, ppid, payload).
    pub fn as_data(&self) -> Option<(u32, u16, u16, u32, &[u8])> {
        if self.typ != DATA || self.value.len() < 12 {
            return None;
        }
        let v = &self.value;
        Some((
            be32(&v[0..4]),
            u16::from_be_bytes([v[4], v[5]]),
            u16::from_be_bytes([v[6], v[7]]),
            be32(&v[8..12]),
            &v[12..],
        ))
    }
}

fn parse_params(v: &[u8], start: usize) -> Result<Vec<ParamAt>> {
    let mut out = vec![];
    let mut off = start;
    while off < v.len() {
        ensure!(v.len() - off >= 4, "truncated parameter header at {off}");
        let typ = u16::from_be_bytes([v[off], v[off + 1]]);
        let len = u16::from_be_bytes([v[off + 2], v[off + 3]]) as usize;
        ensure!(len >= 4, "parameter type {typ} at {off}: length {len} < 4");
        ensure!(
            off + len <= v.len(),
            "parameter type {typ} at {off}: length {len} runs past the chunk ({} bytes)",
            v.len()
        );
        out.push(ParamAt {
            offset: off,
            param: Param {
                typ,
                value: v[off + 4..off + len].to_vec(),
            },
        });
        off += (len + 3) & !3;
    }
    Ok(out)
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn pad4(v: &mut Vec<u8>) {
    while !v.len().is_multiple_of(4) {
        v.push(0);
    }
}

/// An SCTP packet: common header and chunks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SctpPacket {
    pub sport: u16,
    pub dport: u16,
    pub vtag: u32,
    pub chunks: Vec<Chunk>,
}

impl SctpPacket {
    pub fn new(sport: u16, dport: u16, vtag: u32) -> Self {
        SctpPacket {
            sport,
            dport,
            vtag,
            chunks: vec![],
        }
    }

    pub fn chunk(mut self, c: Chunk) -> Self {
        self.chunks.push(c);
        self
    }

    /// The bytes, checksum computed.
    pub fn bytes(&self) -> Vec<u8> {
        let mut b = self.bytes_unchecked();
        crc32c::sctp_set_checksum(&mut b);
        b
    }

    /// The bytes with a zero checksum field.
    pub fn bytes_unchecked(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(64);
        b.extend_from_slice(&self.sport.to_be_bytes());
        b.extend_from_slice(&self.dport.to_be_bytes());
        b.extend_from_slice(&self.vtag.to_be_bytes());
        b.extend_from_slice(&[0; 4]);
        for c in &self.chunks {
            c.push(&mut b);
        }
        b
    }
}

/// A parsed SCTP packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parsed {
    /// The packet; `bytes()` of it gives the parsed bytes back (with the
    /// right checksum).
    pub packet: SctpPacket,
    /// The checksum as stored (`from_wire` of bytes 8..12).
    pub checksum: u32,
    /// Whether it is the packet's CRC32c.
    pub crc_ok: bool,
    /// Offset of each chunk (its type byte) from the common header.
    pub chunk_offsets: Vec<usize>,
}

impl Parsed {
    pub fn chunk_types(&self) -> Vec<u8> {
        self.packet.chunks.iter().map(|c| c.typ).collect()
    }

    /// The first chunk of type `typ`.
    pub fn find(&self, typ: u8) -> Option<&Chunk> {
        self.packet.chunks.iter().find(|c| c.typ == typ)
    }

    /// Every IPv4/IPv6 address parameter of the INIT/INIT-ACK chunks, in
    /// order.
    pub fn addresses(&self) -> Vec<IpAddr> {
        self.address_params().into_iter().map(|(_, a)| a).collect()
    }

    /// Every address parameter with the offset of its address (its value)
    /// from the common header: what an incremental CRC update needs.
    pub fn address_params(&self) -> Vec<(usize, IpAddr)> {
        let mut out = vec![];
        for (c, off) in self.packet.chunks.iter().zip(&self.chunk_offsets) {
            if matches!(c.typ, INIT | INIT_ACK) {
                for p in c.params().unwrap_or_default() {
                    if let Some(a) = p.param.as_addr() {
                        out.push((off + 4 + p.offset + 4, a));
                    }
                }
            }
        }
        out
    }

    /// The state cookie of an INIT-ACK.
    pub fn cookie(&self) -> Option<Vec<u8>> {
        let c = self.find(INIT_ACK)?;
        c.params()
            .ok()?
            .into_iter()
            .find(|p| p.param.typ == PARAM_STATE_COOKIE)
            .map(|p| p.param.value)
    }
}

/// Parse an SCTP packet (common header first). Strict: a chunk length
/// below 4 or past the end of the packet, or INIT/INIT-ACK parameters that
/// do not fit, is an error. A bad checksum is not (see `crc_ok`).
pub fn parse(b: &[u8]) -> Result<Parsed> {
    ensure!(b.len() >= 12, "SCTP packet of {} bytes (< 12)", b.len());
    let mut p = SctpPacket::new(
        u16::from_be_bytes([b[0], b[1]]),
        u16::from_be_bytes([b[2], b[3]]),
        be32(&b[4..8]),
    );
    let checksum = crc32c::from_wire([b[8], b[9], b[10], b[11]]);
    let crc_ok = crc32c::sctp_checksum(b) == checksum;
    let mut offsets = vec![];
    let mut off = 12;
    while off < b.len() {
        ensure!(b.len() - off >= 4, "truncated chunk header at {off}");
        let len = u16::from_be_bytes([b[off + 2], b[off + 3]]) as usize;
        ensure!(len >= 4, "chunk type {} at {off}: length {len} < 4", b[off]);
        ensure!(
            off + len <= b.len(),
            "chunk type {} at {off}: length {len} runs past the packet ({} bytes)",
            b[off],
            b.len()
        );
        let c = Chunk::raw(b[off], b[off + 1], &b[off + 4..off + len]);
        if matches!(c.typ, INIT | INIT_ACK) {
            ensure!(
                c.value.len() >= 16,
                "INIT/INIT-ACK at {off} shorter than 20"
            );
            c.params()?;
        }
        offsets.push(off);
        p.chunks.push(c);
        off += (len + 3) & !3;
    }
    Ok(Parsed {
        packet: p,
        checksum,
        crc_ok,
        chunk_offsets: offsets,
    })
}

/// Whether the SCTP packet (common header first) carries its CRC32c.
pub fn crc_ok(sctp: &[u8]) -> bool {
    crc32c::sctp_checksum_ok(sctp)
}

/// An SCTP packet in Ethernet (+ optional 802.1Q) + IPv4 or IPv6; the
/// family follows `src`/`dst` (which must agree).
#[derive(Clone, Debug)]
pub struct SctpFrame {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub vlan: Option<u16>,
    pub src: IpAddr,
    pub dst: IpAddr,
    /// TTL (IPv4) or hop limit (IPv6).
    pub ttl: u8,
    /// IPv4 identification.
    pub id: u16,
    /// IPv4 flags+fragment offset (DF by default).
    pub frag: u16,
    pub sctp: SctpPacket,
}

impl SctpFrame {
    /// `src`, `dst`: both IPv4 or both IPv6 literals.
    pub fn new(src: &str, dst: &str, sctp: SctpPacket) -> Self {
        SctpFrame {
            dst_mac: [0x02, 0, 0, 0, 0, 0x01],
            src_mac: [0x02, 0, 0, 0, 0, 0x02],
            vlan: None,
            src: src.parse().expect("source address"),
            dst: dst.parse().expect("destination address"),
            ttl: 64,
            id: 0x1234,
            frag: 0x4000,
            sctp,
        }
    }

    /// The same frame between other addresses (the expected translation;
    /// the SCTP bytes, and so the CRC, do not change: no pseudo-header).
    pub fn with_addrs(&self, src: &str, dst: &str) -> Self {
        let mut f = self.clone();
        f.src = src.parse().unwrap();
        f.dst = dst.parse().unwrap();
        f
    }

    /// The same frame with other ports (the CRC is recomputed).
    pub fn with_ports(&self, sport: u16, dport: u16) -> Self {
        let mut f = self.clone();
        f.sctp.sport = sport;
        f.sctp.dport = dport;
        f
    }

    /// Forwarded: new MACs, TTL/hop limit decremented.
    pub fn routed(mut self, src_mac: [u8; 6], dst_mac: [u8; 6]) -> Self {
        self.src_mac = src_mac;
        self.dst_mac = dst_mac;
        self.ttl -= 1;
        self
    }

    pub fn bytes(&self) -> Vec<u8> {
        wrap(self, &self.sctp.bytes())
    }

    /// With the SCTP bytes as given (e.g. a deliberately wrong checksum).
    pub fn bytes_with_sctp(&self, sctp: &[u8]) -> Vec<u8> {
        wrap(self, sctp)
    }
}

fn wrap(f: &SctpFrame, l4: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(l4.len() + 58);
    b.extend_from_slice(&f.dst_mac);
    b.extend_from_slice(&f.src_mac);
    if let Some(tci) = f.vlan {
        b.extend_from_slice(&0x8100u16.to_be_bytes());
        b.extend_from_slice(&tci.to_be_bytes());
    }
    match (f.src, f.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            b.extend_from_slice(&0x0800u16.to_be_bytes());
            let ip = b.len();
            b.extend_from_slice(&[0x45, 0]);
            b.extend_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
            b.extend_from_slice(&f.id.to_be_bytes());
            b.extend_from_slice(&f.frag.to_be_bytes());
            b.extend_from_slice(&[f.ttl, IPPROTO_SCTP, 0, 0]);
            b.extend_from_slice(&s.octets());
            b.extend_from_slice(&d.octets());
            let c = csum::checksum_be(&b[ip..ip + 20]);
            b[ip + 10..ip + 12].copy_from_slice(&c.to_be_bytes());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            b.extend_from_slice(&0x86ddu16.to_be_bytes());
            b.extend_from_slice(&[0x60, 0, 0, 0]);
            b.extend_from_slice(&(l4.len() as u16).to_be_bytes());
            b.extend_from_slice(&[IPPROTO_SCTP, f.ttl]);
            b.extend_from_slice(&s.octets());
            b.extend_from_slice(&d.octets());
        }
        _ => panic!(
            "SctpFrame: {} and {} are of different families",
            f.src, f.dst
        ),
    }
    b.extend_from_slice(l4);
    b
}

/// A parsed frame: the IP header's essentials and the SCTP packet.
#[derive(Clone, Debug)]
pub struct ParsedFrame {
    pub vlan: Option<u16>,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub ttl: u8,
    /// Offset of the SCTP common header in the frame.
    pub sctp_offset: usize,
    pub sctp: Parsed,
}

/// Parse Ethernet (+ one 802.1Q tag) + IPv4 (options allowed, no
/// fragments) or IPv6 (no extension headers) + SCTP.
pub fn parse_frame(f: &[u8]) -> Result<ParsedFrame> {
    ensure!(f.len() >= 14, "frame of {} bytes", f.len());
    let mut off = 12;
    let mut vlan = None;
    let mut et = u16::from_be_bytes([f[off], f[off + 1]]);
    if et == 0x8100 {
        ensure!(f.len() >= 18, "truncated 802.1Q header");
        vlan = Some(u16::from_be_bytes([f[14], f[15]]));
        off += 4;
        et = u16::from_be_bytes([f[off], f[off + 1]]);
    }
    off += 2;
    let ip = &f[off..];
    let (src, dst, ttl, l4off, l4len) = match et {
        0x0800 => {
            ensure!(ip.len() >= 20 && ip[0] >> 4 == 4, "not an IPv4 header");
            let ihl = (ip[0] & 0x0f) as usize * 4;
            let tot = u16::from_be_bytes([ip[2], ip[3]]) as usize;
            ensure!(
                ihl >= 20 && tot >= ihl && tot <= ip.len(),
                "bad IHL/total length"
            );
            ensure!(ip[9] == IPPROTO_SCTP, "IPv4 protocol {} is not SCTP", ip[9]);
            ensure!(
                csum::fold(csum::sum_be(&ip[..ihl], 0)) == 0xffff,
                "bad IPv4 header checksum"
            );
            let s = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
            let d = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
            (IpAddr::V4(s), IpAddr::V4(d), ip[8], off + ihl, tot - ihl)
        }
        0x86dd => {
            ensure!(ip.len() >= 40 && ip[0] >> 4 == 6, "not an IPv6 header");
            ensure!(
                ip[6] == IPPROTO_SCTP,
                "IPv6 next header {} is not SCTP",
                ip[6]
            );
            let plen = u16::from_be_bytes([ip[4], ip[5]]) as usize;
            ensure!(40 + plen <= ip.len(), "IPv6 payload length past the frame");
            let s = Ipv6Addr::from(<[u8; 16]>::try_from(&ip[8..24]).unwrap());
            let d = Ipv6Addr::from(<[u8; 16]>::try_from(&ip[24..40]).unwrap());
            (IpAddr::V6(s), IpAddr::V6(d), ip[7], off + 40, plen)
        }
        e => bail!("ethertype {e:#06x} is neither IPv4 nor IPv6"),
    };
    Ok(ParsedFrame {
        vlan,
        src,
        dst,
        ttl,
        sctp_offset: l4off,
        sctp: parse(&f[l4off..l4off + l4len])?,
    })
}

/// Whether the SCTP packet in an Ethernet frame carries its CRC32c.
pub fn frame_crc_ok(f: &[u8]) -> bool {
    parse_frame(f).map(|p| p.sctp.crc_ok).unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn init_round_trip_v4_and_v6_params() {
        let addrs = [a("10.0.0.2"), a("10.1.0.2"), a("fd00::2"), a("fd00:1::2")];
        let p = SctpPacket::new(40_000, 3868, 0).chunk(Chunk::init(0xabcd_0123, 77, &addrs));
        let b = p.bytes();
        // 12 + INIT (20 + 2 * 8 + 2 * 20)
        assert_eq!(b.len(), 12 + 20 + 16 + 40);
        assert_eq!(&b[12..16], &[INIT, 0, 0, 76]);
        let q = parse(&b).unwrap();
        assert!(q.crc_ok);
        assert_eq!(q.packet, p);
        assert_eq!(q.addresses(), addrs.to_vec());
        assert_eq!(q.packet.bytes(), b);
        let f = q.find(INIT).unwrap().init_fixed().unwrap();
        assert_eq!((f.initiate_tag, f.initial_tsn), (0xabcd_0123, 77));
        // address offsets point at the address bytes
        for (off, addr) in q.address_params() {
            match addr {
                IpAddr::V4(v) => assert_eq!(&b[off..off + 4], &v.octets()),
                IpAddr::V6(v) => assert_eq!(&b[off..off + 16], &v.octets()),
            }
        }
        assert_eq!(q.address_params()[0].0, 12 + 20 + 4);
    }

    #[test]
    fn init_ack_with_cookie_round_trip() {
        let cookie: Vec<u8> = (0..37).collect(); // odd length: padded
        let p = SctpPacket::new(3868, 40_000, 0xabcd_0123).chunk(Chunk::init_ack(
            0x5555_6666,
            9,
            &[a("10.0.1.2"), a("fd00:1::2")],
            &cookie,
        ));
        let b = p.bytes();
        assert_eq!(b.len() % 4, 0);
        let q = parse(&b).unwrap();
        assert!(q.crc_ok);
        assert_eq!(q.packet, p);
        assert_eq!(q.cookie().unwrap(), cookie);
        assert_eq!(q.addresses(), vec![a("10.0.1.2"), a("fd00:1::2")]);
        // declared chunk length excludes the final padding
        let len = u16::from_be_bytes([b[14], b[15]]) as usize;
        assert_eq!(len, 4 + 16 + 8 + 20 + 4 + 37);
    }

    #[test]
    fn every_chunk_kind_round_trips() {
        let p = SctpPacket::new(1, 2, 3)
            .chunk(Chunk::cookie_echo(b"cookie!"))
            .chunk(Chunk::cookie_ack())
            .chunk(Chunk::data(100, 1, 2, 46, b"hello"))
            .chunk(Chunk::sack(99, 4096))
            .chunk(Chunk::heartbeat(b"hb-info-123"))
            .chunk(Chunk::heartbeat_ack(b"hb-info-123"))
            .chunk(Chunk::abort(true))
            .chunk(Chunk::shutdown(100))
            .chunk(Chunk::shutdown_ack())
            .chunk(Chunk::shutdown_complete(false));
        let b = p.bytes();
        let q = parse(&b).unwrap();
        assert!(q.crc_ok);
        assert_eq!(q.packet, p);
        assert_eq!(
            q.chunk_types(),
            vec![
                COOKIE_ECHO,
                COOKIE_ACK,
                DATA,
                SACK,
                HEARTBEAT,
                HEARTBEAT_ACK,
                ABORT,
                SHUTDOWN,
                SHUTDOWN_ACK,
                SHUTDOWN_COMPLETE
            ]
        );
        let (tsn, sid, ssn, ppid, payload) = q.find(DATA).unwrap().as_data().unwrap();
        assert_eq!(
            (tsn, sid, ssn, ppid, payload),
            (100, 1, 2, 46, &b"hello"[..])
        );
        let hb = q.find(HEARTBEAT).unwrap().params().unwrap();
        assert_eq!(hb[0].param.value, b"hb-info-123");
        assert_eq!(q.find(ABORT).unwrap().flags, FLAG_T);
    }

    #[test]
    fn frames_v4_and_v6() {
        let s = SctpPacket::new(5000, 6000, 7).chunk(Chunk::data(1, 0, 0, 0, b"x"));
        for (src, dst) in [("10.0.0.2", "20.0.0.100"), ("fd00::2", "fd00:20::100")] {
            let f = SctpFrame::new(src, dst, s.clone());
            let b = f.bytes();
            let p = parse_frame(&b).unwrap();
            assert_eq!((p.src, p.dst, p.ttl), (a(src), a(dst), 64));
            assert!(p.sctp.crc_ok);
            assert_eq!(p.sctp.packet, s);
            assert_eq!(&b[p.sctp_offset..], &s.bytes()[..]);
            // other addresses: same SCTP bytes (no pseudo-header)
            let g = f.with_addrs(dst, src).bytes();
            assert_eq!(&g[p.sctp_offset..], &b[p.sctp_offset..]);
            assert!(frame_crc_ok(&g));
            // other ports: the CRC follows
            let h = f.with_ports(1, 2).bytes();
            assert!(frame_crc_ok(&h));
            assert_ne!(
                &h[p.sctp_offset + 8..p.sctp_offset + 12],
                &b[p.sctp_offset + 8..p.sctp_offset + 12]
            );
        }
        let mut f = SctpFrame::new("10.0.0.2", "10.0.0.3", s.clone());
        f.vlan = Some(42);
        let p = parse_frame(&f.bytes()).unwrap();
        assert_eq!(p.vlan, Some(42));
        assert_eq!(p.sctp_offset, 18 + 20);
    }

    #[test]
    fn bad_crc_and_malformed_lengths_are_seen() {
        let s = SctpPacket::new(1, 2, 3).chunk(Chunk::data(1, 0, 0, 0, b"abc"));
        let mut b = s.bytes();
        b[20] ^= 1;
        assert!(!parse(&b).unwrap().crc_ok);
        assert!(!crc_ok(&b));
        // chunk length past the packet, and below 4
        let long = SctpPacket::new(1, 2, 3).chunk(Chunk::raw(DATA, 3, &[0; 12]).with_length(200));
        assert!(parse(&long.bytes()).is_err());
        let short = SctpPacket::new(1, 2, 3).chunk(Chunk::raw(DATA, 3, &[0; 12]).with_length(2));
        assert!(parse(&short.bytes()).is_err());
        // an address parameter that runs past its INIT
        let mut init = Chunk::init(1, 1, &[a("10.0.0.1")]);
        init.value[18..20].copy_from_slice(&40u16.to_be_bytes());
        assert!(parse(&SctpPacket::new(1, 2, 0).chunk(init).bytes()).is_err());
        // the builder still gives these a correct CRC (only the length lies)
        assert!(crc_ok(&long.bytes()));
    }

    #[test]
    fn incremental_crc_on_an_address_parameter() {
        // What the datapath will do: rewrite an IPv4 and an IPv6 address
        // parameter and the ports with the incremental update only.
        let addrs = [a("10.0.0.2"), a("fd00::2")];
        let p = SctpPacket::new(40_000, 80, 0).chunk(Chunk::init(9, 9, &addrs));
        let mut b = p.bytes();
        let q = parse(&b).unwrap();
        let len = b.len();
        let mut crc = q.checksum;
        let new4: [u8; 4] = [20, 0, 0, 100];
        let new6: [u8; 16] = "fd00:20::100".parse::<Ipv6Addr>().unwrap().octets();
        for (off, addr) in q.address_params() {
            match addr {
                IpAddr::V4(v) => {
                    crc = crc32c::adjust(crc, &v.octets(), &new4, (len - off - 4) as u16);
                    b[off..off + 4].copy_from_slice(&new4);
                }
                IpAddr::V6(v) => {
                    crc = crc32c::adjust(crc, &v.octets(), &new6, (len - off - 16) as u16);
                    b[off..off + 16].copy_from_slice(&new6);
                }
            }
        }
        crc = crc32c::adjust(
            crc,
            &[0x9c, 0x40, 0, 80],
            &[0x9c, 0x40, 0x1f, 0x90],
            (len - 4) as u16,
        );
        b[2..4].copy_from_slice(&8080u16.to_be_bytes());
        b[8..12].copy_from_slice(&crc32c::to_wire(crc));
        let want = SctpPacket::new(40_000, 8080, 0)
            .chunk(Chunk::init(9, 9, &[a("20.0.0.100"), a("fd00:20::100")]))
            .bytes();
        assert_eq!(b, want);
    }
}
