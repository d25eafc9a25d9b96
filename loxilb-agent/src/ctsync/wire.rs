//! The wire format (see the module documentation of [`crate::ctsync`]):
//! frames, messages and the session record, encoded and decoded by hand.

use anyhow::{bail, Context, Result};
use loxilb_common::{Addr, AssocVal, CtKey, SvcKey, MAX_RULE_VIPS};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// First bytes of a HELLO.
pub const MAGIC: [u8; 4] = *b"LXCS";
/// Version of this protocol; a peer speaking another one is refused.
pub const PROTO_VERSION: u16 = 3;
/// Largest frame body (type byte included) accepted.
pub const MAX_FRAME: usize = 1 << 20;
/// Most records in one UPSERT or REMOVE message.
pub const MAX_BATCH: usize = 4096;
/// Bytes of a [`CtKey`] on the wire.
pub const KEY_LEN: usize = 37;
/// Bytes of a [`Record`] on the wire.
pub const RECORD_LEN: usize = 182;
/// Bytes of an association's identity ([`AssocId`]) on the wire.
pub const ASSOC_KEY_LEN: usize = 23;
/// Bytes of an [`AssocRecord`] on the wire.
pub const ASSOC_RECORD_LEN: usize = 317;
/// Most records in one ASSOC_UPSERT or ASSOC_REMOVE message.
pub const MAX_ASSOC_BATCH: usize = 2048;

// A full batch fits a frame.
const _: () = assert!(1 + 2 + MAX_BATCH * RECORD_LEN <= MAX_FRAME);
const _: () = assert!(1 + 2 + MAX_ASSOC_BATCH * ASSOC_RECORD_LEN <= MAX_FRAME);

/// Message types.
pub mod msg {
    pub const HELLO: u8 = 1;
    pub const SNAPSHOT_BEGIN: u8 = 2;
    pub const UPSERT: u8 = 3;
    pub const REMOVE: u8 = 4;
    pub const SNAPSHOT_END: u8 = 5;
    pub const ERROR: u8 = 6;
    pub const HEARTBEAT: u8 = 7;
    pub const ASSOC_UPSERT: u8 = 8;
    pub const ASSOC_REMOVE: u8 = 9;
    pub const RESYNC: u8 = 10;
}

/// HELLO roles.
pub const ROLE_SENDER: u8 = 1;
pub const ROLE_RECEIVER: u8 = 2;

/// One conntrack entry (one direction of a session) as it travels: the
/// node-local parts of `CtVal` replaced by identities the receiver maps
/// back through its own tables.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Record {
    pub key: CtKey,
    /// Key of the other direction's entry.
    pub peer: CtKey,
    pub xsaddr: Addr,
    pub xdaddr: Addr,
    pub xsport: u16,
    /// (DSR sessions: `xdaddr` is the endpoint the frame goes to, as in
    /// `CtVal`.)
    pub xdport: u16,
    /// The rule, by its identity (VIP, port, protocol).
    pub rule: SvcKey,
    /// The endpoint (address, port) whose counters the session feeds.
    pub ep_addr: Addr,
    pub ep_port: u16,
    pub dir: u8,
    pub state: u8,
    pub mode: u8,
    pub timeout_s: u32,
    pub sctp_tag: u32,
    /// Nanoseconds since the last packet in this direction (sender's
    /// clock at encoding time).
    pub age_ns: u64,
    pub packets: u64,
    pub bytes: u64,
}

impl Record {
    /// The record without what changes with every packet (age,
    /// counters): two entries equal here need no resend.
    pub fn semantic(&self) -> Record {
        Record {
            age_ns: 0,
            packets: 0,
            bytes: 0,
            ..*self
        }
    }
}

/// An SCTP association record's identity: its rule's (VIP, port,
/// protocol) and the verification tag it is found by.
pub type AssocId = (SvcKey, u32);

/// An SCTP multihoming association record (`LB_SCTP_ASSOC`) as it
/// travels: the rule by identity, the endpoint counter index as the
/// endpoint's (address, port).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AssocRecord {
    pub rule: SvcKey,
    /// As loaded (network order).
    pub vtag: u32,
    /// The record, `ep_stat` zero.
    pub val: AssocVal,
    pub ep_addr: Addr,
    pub ep_port: u16,
}

impl AssocRecord {
    pub fn id(&self) -> AssocId {
        (self.rule, self.vtag)
    }
}

/// A decoded message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Msg {
    Hello(Hello),
    SnapshotBegin {
        entries: u32,
    },
    Upsert(Vec<Record>),
    Remove(Vec<CtKey>),
    SnapshotEnd {
        entries: u32,
    },
    Error(String),
    Heartbeat,
    AssocUpsert(Vec<AssocRecord>),
    AssocRemove(Vec<AssocId>),
    /// Receiver to sender: send a full snapshot again.
    Resync,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    pub proto: u16,
    pub layout: u32,
    pub role: u8,
    pub name: String,
    /// The port this agent's sync listener is bound to (0: none). A
    /// receiver whose sender vanished dials it to tell a dead agent (the
    /// port refuses) from a lost path (no answer).
    pub listen_port: u16,
    /// The agent's leader-election identity (the Lease holder it writes),
    /// named in a takeover hint when it is found dead.
    pub identity: String,
}

impl Hello {
    pub fn ours(role: u8, name: &str) -> Self {
        Hello {
            proto: PROTO_VERSION,
            layout: loxilb_common::LAYOUT_VERSION,
            role,
            name: name.chars().take(255).collect(),
            listen_port: 0,
            identity: String::new(),
        }
    }

    /// With the listener's port and the Lease identity (see the fields).
    pub fn lease(mut self, listen_port: u16, identity: &str) -> Self {
        self.listen_port = listen_port;
        self.identity = identity.chars().take(255).collect();
        self
    }

    /// Refuse a peer of another protocol or map layout version.
    pub fn check(&self, peer: &str) -> Result<()> {
        if self.proto != PROTO_VERSION || self.layout != loxilb_common::LAYOUT_VERSION {
            bail!(
                "peer {peer} ({:?}) speaks ctsync protocol {} with map layout {}; this agent \
                 speaks protocol {PROTO_VERSION} with layout {}: run the same agent version on \
                 both nodes",
                self.name,
                self.proto,
                self.layout,
                loxilb_common::LAYOUT_VERSION
            );
        }
        Ok(())
    }
}

/// Appends fields to a frame being built.
struct Out(Vec<u8>);

impl Out {
    fn frame(ty: u8, cap: usize) -> Self {
        let mut v = Vec::with_capacity(5 + cap);
        v.extend_from_slice(&[0, 0, 0, 0, ty]);
        Out(v)
    }
    /// Network-order data exactly as stored in the maps.
    fn addr(&mut self, a: &Addr) {
        for w in a {
            self.0.extend_from_slice(&w.to_ne_bytes());
        }
    }
    fn raw16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_ne_bytes());
    }
    fn raw32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_ne_bytes());
    }
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn be16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn be32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn be64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn key(&mut self, k: &CtKey) {
        self.addr(&k.saddr);
        self.addr(&k.daddr);
        self.raw16(k.sport);
        self.raw16(k.dport);
        self.u8(k.proto);
    }
    fn record(&mut self, r: &Record) {
        self.key(&r.key);
        self.key(&r.peer);
        self.addr(&r.xsaddr);
        self.addr(&r.xdaddr);
        self.raw16(r.xsport);
        self.raw16(r.xdport);
        self.addr(&r.rule.addr);
        self.raw16(r.rule.port);
        self.u8(r.rule.proto);
        self.addr(&r.ep_addr);
        self.raw16(r.ep_port);
        self.u8(r.dir);
        self.u8(r.state);
        self.u8(r.mode);
        self.be32(r.timeout_s);
        self.raw32(r.sctp_tag);
        self.be64(r.age_ns);
        self.be64(r.packets);
        self.be64(r.bytes);
    }
    fn rule(&mut self, k: &SvcKey) {
        self.addr(&k.addr);
        self.raw16(k.port);
        self.u8(k.proto);
    }
    fn assoc(&mut self, r: &AssocRecord) {
        self.rule(&r.rule);
        self.raw32(r.vtag);
        let v = &r.val;
        for set in [&v.eps, &v.vips, &v.clients, &v.xclients] {
            for a in set {
                self.addr(a);
            }
        }
        self.raw16(v.ep_port);
        self.raw16(v.vport);
        self.raw16(v.cport);
        self.raw16(v.xcport);
        self.u8(v.n_pairs);
        self.u8(v.n_clients);
        self.u8(v.n_vips);
        self.u8(v.mode);
        self.raw32(v.ctag);
        self.raw32(v.etag);
        self.addr(&r.ep_addr);
        self.raw16(r.ep_port);
    }
    fn done(mut self) -> Vec<u8> {
        let n = (self.0.len() - 4) as u32;
        self.0[..4].copy_from_slice(&n.to_be_bytes());
        self.0
    }
}

/// Reads fields of a received message body.
struct In<'a>(&'a [u8]);

impl In<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N]> {
        if self.0.len() < N {
            bail!("message truncated");
        }
        let (a, b) = self.0.split_at(N);
        self.0 = b;
        Ok(a.try_into().expect("length checked"))
    }
    fn addr(&mut self) -> Result<Addr> {
        let b: [u8; 16] = self.take()?;
        let w = |i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        Ok([w(0), w(4), w(8), w(12)])
    }
    fn raw16(&mut self) -> Result<u16> {
        Ok(u16::from_ne_bytes(self.take()?))
    }
    fn raw32(&mut self) -> Result<u32> {
        Ok(u32::from_ne_bytes(self.take()?))
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take::<1>()?[0])
    }
    fn be16(&mut self) -> Result<u16> {
        Ok(u16::from_be_bytes(self.take()?))
    }
    fn be32(&mut self) -> Result<u32> {
        Ok(u32::from_be_bytes(self.take()?))
    }
    fn be64(&mut self) -> Result<u64> {
        Ok(u64::from_be_bytes(self.take()?))
    }
    fn key(&mut self) -> Result<CtKey> {
        Ok(CtKey {
            saddr: self.addr()?,
            daddr: self.addr()?,
            sport: self.raw16()?,
            dport: self.raw16()?,
            proto: self.u8()?,
            _pad1: 0,
            _pad2: 0,
        })
    }
    fn record(&mut self) -> Result<Record> {
        Ok(Record {
            key: self.key()?,
            peer: self.key()?,
            xsaddr: self.addr()?,
            xdaddr: self.addr()?,
            xsport: self.raw16()?,
            xdport: self.raw16()?,
            rule: SvcKey {
                addr: self.addr()?,
                port: self.raw16()?,
                proto: self.u8()?,
                _pad: 0,
            },
            ep_addr: self.addr()?,
            ep_port: self.raw16()?,
            dir: self.u8()?,
            state: self.u8()?,
            mode: self.u8()?,
            timeout_s: self.be32()?,
            sctp_tag: self.raw32()?,
            age_ns: self.be64()?,
            packets: self.be64()?,
            bytes: self.be64()?,
        })
    }
    fn rule(&mut self) -> Result<SvcKey> {
        Ok(SvcKey {
            addr: self.addr()?,
            port: self.raw16()?,
            proto: self.u8()?,
            _pad: 0,
        })
    }
    fn addrs(&mut self) -> Result<[Addr; MAX_RULE_VIPS]> {
        let mut out = [[0u32; 4]; MAX_RULE_VIPS];
        for a in &mut out {
            *a = self.addr()?;
        }
        Ok(out)
    }
    fn assoc(&mut self) -> Result<AssocRecord> {
        let rule = self.rule()?;
        let vtag = self.raw32()?;
        let val = AssocVal {
            eps: self.addrs()?,
            vips: self.addrs()?,
            clients: self.addrs()?,
            xclients: self.addrs()?,
            ep_port: self.raw16()?,
            vport: self.raw16()?,
            cport: self.raw16()?,
            xcport: self.raw16()?,
            ep_stat: 0,
            n_pairs: self.u8()?,
            n_clients: self.u8()?,
            n_vips: self.u8()?,
            mode: self.u8()?,
            ctag: self.raw32()?,
            etag: self.raw32()?,
        };
        Ok(AssocRecord {
            rule,
            vtag,
            val,
            ep_addr: self.addr()?,
            ep_port: self.raw16()?,
        })
    }
    fn end(&self) -> Result<()> {
        if !self.0.is_empty() {
            bail!(
                "{} unexpected bytes at the end of the message",
                self.0.len()
            );
        }
        Ok(())
    }
}

/// Encode a message as one frame (length prefix included).
pub fn encode(m: &Msg) -> Vec<u8> {
    match m {
        Msg::Hello(h) => {
            let mut o = Out::frame(msg::HELLO, 19 + h.name.len() + h.identity.len());
            o.0.extend_from_slice(&MAGIC);
            o.be16(h.proto);
            o.be32(h.layout);
            o.u8(h.role);
            let name = h.name.as_bytes();
            let name = &name[..name.len().min(255)];
            o.u8(name.len() as u8);
            o.0.extend_from_slice(name);
            o.be16(h.listen_port);
            let id = h.identity.as_bytes();
            let id = &id[..id.len().min(255)];
            o.u8(id.len() as u8);
            o.0.extend_from_slice(id);
            o.done()
        }
        Msg::SnapshotBegin { entries } => {
            let mut o = Out::frame(msg::SNAPSHOT_BEGIN, 4);
            o.be32(*entries);
            o.done()
        }
        Msg::SnapshotEnd { entries } => {
            let mut o = Out::frame(msg::SNAPSHOT_END, 4);
            o.be32(*entries);
            o.done()
        }
        Msg::Upsert(recs) => encode_upsert(recs),
        Msg::Remove(keys) => encode_remove(keys),
        Msg::Error(text) => {
            let t = &text.as_bytes()[..text.len().min(4096)];
            let mut o = Out::frame(msg::ERROR, t.len());
            o.0.extend_from_slice(t);
            o.done()
        }
        Msg::Heartbeat => Out::frame(msg::HEARTBEAT, 0).done(),
        Msg::AssocUpsert(recs) => encode_assoc_upsert(recs),
        Msg::AssocRemove(ids) => encode_assoc_remove(ids),
        Msg::Resync => Out::frame(msg::RESYNC, 0).done(),
    }
}

/// An ASSOC_UPSERT frame of `recs` (at most [`MAX_ASSOC_BATCH`]).
pub fn encode_assoc_upsert(recs: &[AssocRecord]) -> Vec<u8> {
    assert!(
        recs.len() <= MAX_ASSOC_BATCH,
        "batch of {} records",
        recs.len()
    );
    let mut o = Out::frame(msg::ASSOC_UPSERT, 2 + recs.len() * ASSOC_RECORD_LEN);
    o.be16(recs.len() as u16);
    for r in recs {
        o.assoc(r);
    }
    o.done()
}

/// An ASSOC_REMOVE frame of `ids` (at most [`MAX_ASSOC_BATCH`]).
pub fn encode_assoc_remove(ids: &[AssocId]) -> Vec<u8> {
    assert!(ids.len() <= MAX_ASSOC_BATCH, "batch of {} ids", ids.len());
    let mut o = Out::frame(msg::ASSOC_REMOVE, 2 + ids.len() * ASSOC_KEY_LEN);
    o.be16(ids.len() as u16);
    for (rule, vtag) in ids {
        o.rule(rule);
        o.raw32(*vtag);
    }
    o.done()
}

/// An UPSERT frame of `recs` (at most [`MAX_BATCH`]).
pub fn encode_upsert(recs: &[Record]) -> Vec<u8> {
    assert!(recs.len() <= MAX_BATCH, "batch of {} records", recs.len());
    let mut o = Out::frame(msg::UPSERT, 2 + recs.len() * RECORD_LEN);
    o.be16(recs.len() as u16);
    for r in recs {
        o.record(r);
    }
    o.done()
}

/// A REMOVE frame of `keys` (at most [`MAX_BATCH`]).
pub fn encode_remove(keys: &[CtKey]) -> Vec<u8> {
    assert!(keys.len() <= MAX_BATCH, "batch of {} keys", keys.len());
    let mut o = Out::frame(msg::REMOVE, 2 + keys.len() * KEY_LEN);
    o.be16(keys.len() as u16);
    for k in keys {
        o.key(k);
    }
    o.done()
}

/// Decode a frame body (the bytes after the length prefix).
pub fn decode(body: &[u8]) -> Result<Msg> {
    let Some((&ty, rest)) = body.split_first() else {
        bail!("empty message");
    };
    let mut i = In(rest);
    let m = match ty {
        msg::HELLO => {
            if i.take::<4>()? != MAGIC {
                bail!("not a ctsync HELLO (bad magic)");
            }
            let proto = i.be16()?;
            let layout = i.be32()?;
            let role = i.u8()?;
            let n = i.u8()? as usize;
            if i.0.len() < n {
                bail!("message truncated");
            }
            let name = String::from_utf8_lossy(&i.0[..n]).into_owned();
            i.0 = &i.0[n..];
            // Version 1 ended here: its hello still decodes (and is then
            // refused by `Hello::check`, which names both versions).
            let (mut listen_port, mut identity) = (0, String::new());
            if proto >= 2 {
                listen_port = i.be16()?;
                let n = i.u8()? as usize;
                if i.0.len() < n {
                    bail!("message truncated");
                }
                identity = String::from_utf8_lossy(&i.0[..n]).into_owned();
                i.0 = &i.0[n..];
            }
            Msg::Hello(Hello {
                proto,
                layout,
                role,
                name,
                listen_port,
                identity,
            })
        }
        msg::SNAPSHOT_BEGIN => Msg::SnapshotBegin { entries: i.be32()? },
        msg::SNAPSHOT_END => Msg::SnapshotEnd { entries: i.be32()? },
        msg::UPSERT => {
            let n = i.be16()? as usize;
            if n > MAX_BATCH || i.0.len() != n * RECORD_LEN {
                bail!("UPSERT of {n} records has {} bytes", i.0.len());
            }
            Msg::Upsert((0..n).map(|_| i.record()).collect::<Result<_>>()?)
        }
        msg::REMOVE => {
            let n = i.be16()? as usize;
            if n > MAX_BATCH || i.0.len() != n * KEY_LEN {
                bail!("REMOVE of {n} keys has {} bytes", i.0.len());
            }
            Msg::Remove((0..n).map(|_| i.key()).collect::<Result<_>>()?)
        }
        msg::ERROR => {
            let t = String::from_utf8_lossy(i.0).into_owned();
            i.0 = &[];
            Msg::Error(t)
        }
        msg::HEARTBEAT => Msg::Heartbeat,
        msg::RESYNC => Msg::Resync,
        msg::ASSOC_UPSERT => {
            let n = i.be16()? as usize;
            if n > MAX_ASSOC_BATCH || i.0.len() != n * ASSOC_RECORD_LEN {
                bail!("ASSOC_UPSERT of {n} records has {} bytes", i.0.len());
            }
            Msg::AssocUpsert((0..n).map(|_| i.assoc()).collect::<Result<_>>()?)
        }
        msg::ASSOC_REMOVE => {
            let n = i.be16()? as usize;
            if n > MAX_ASSOC_BATCH || i.0.len() != n * ASSOC_KEY_LEN {
                bail!("ASSOC_REMOVE of {n} ids has {} bytes", i.0.len());
            }
            Msg::AssocRemove(
                (0..n)
                    .map(|_| Ok((i.rule()?, i.raw32()?)))
                    .collect::<Result<_>>()?,
            )
        }
        t => bail!("unknown message type {t}"),
    };
    i.end()?;
    Ok(m)
}

/// Read one message; `Ok(None)` at a clean end of stream.
pub async fn read_msg<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Msg>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e).context("reading from the peer"),
    }
    let n = u32::from_be_bytes(len) as usize;
    if n == 0 || n > MAX_FRAME {
        bail!("frame of {n} bytes (at most {MAX_FRAME}): not a ctsync peer?");
    }
    let mut body = vec![0u8; n];
    r.read_exact(&mut body)
        .await
        .context("reading from the peer")?;
    decode(&body).map(Some)
}

/// Write one encoded frame.
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, frame: &[u8]) -> Result<()> {
    w.write_all(frame).await.context("writing to the peer")?;
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use loxilb_common::{addr_from_ip, IPPROTO_TCP};

    fn key(s: &str, sp: u16, d: &str, dp: u16) -> CtKey {
        CtKey {
            saddr: addr_from_ip(s.parse().unwrap()),
            daddr: addr_from_ip(d.parse().unwrap()),
            sport: sp.to_be(),
            dport: dp.to_be(),
            proto: IPPROTO_TCP,
            ..Default::default()
        }
    }

    pub(crate) fn sample() -> Record {
        Record {
            key: key("192.168.0.2", 40000, "20.0.0.100", 80),
            peer: key("10.0.1.10", 8080, "192.168.0.2", 40000),
            xsaddr: addr_from_ip("192.168.0.2".parse().unwrap()),
            xdaddr: addr_from_ip("10.0.1.10".parse().unwrap()),
            xsport: 40000u16.to_be(),
            xdport: 8080u16.to_be(),
            rule: SvcKey {
                addr: addr_from_ip("20.0.0.100".parse().unwrap()),
                port: 80u16.to_be(),
                proto: IPPROTO_TCP,
                _pad: 0,
            },
            ep_addr: addr_from_ip("fd00:1::10".parse().unwrap()),
            ep_port: 8080u16.to_be(),
            dir: 0,
            state: 3,
            mode: 2,
            timeout_s: 300,
            sctp_tag: 0xdead_beef,
            age_ns: 1_234_567_890_123,
            packets: 7,
            bytes: 0x0102_0304_0506_0708,
        }
    }

    #[test]
    fn record_round_trips_and_has_the_documented_size() {
        let r = sample();
        let f = encode_upsert(&[r, r]);
        assert_eq!(f.len(), 4 + 1 + 2 + 2 * RECORD_LEN);
        assert_eq!(
            u32::from_be_bytes(f[..4].try_into().unwrap()) as usize,
            f.len() - 4
        );
        assert_eq!(decode(&f[4..]).unwrap(), Msg::Upsert(vec![r, r]));
    }

    #[test]
    fn byte_order_on_the_wire() {
        let r = sample();
        let f = encode_upsert(&[r]);
        let rec = &f[7..];
        // Addresses and ports as on a packet (network order).
        assert_eq!(&rec[12..16], &[192, 168, 0, 2]);
        assert_eq!(&rec[32..34], &40000u16.to_be_bytes());
        // Rule port at offset 126, endpoint address at 129.
        assert_eq!(&rec[126..128], &80u16.to_be_bytes());
        assert_eq!(&rec[129..131], &[0xfd, 0x00]);
        // Host integers big-endian: timeout at 150, age at 158.
        assert_eq!(&rec[150..154], &300u32.to_be_bytes());
        assert_eq!(&rec[158..166], &1_234_567_890_123u64.to_be_bytes());
        assert_eq!(&rec[174..182], &[1, 2, 3, 4, 5, 6, 7, 8]);
    }

    pub(crate) fn sample_assoc() -> AssocRecord {
        let a = |s: &str| addr_from_ip(s.parse().unwrap());
        AssocRecord {
            rule: SvcKey {
                addr: a("20.0.0.100"),
                port: 3868u16.to_be(),
                proto: loxilb_common::IPPROTO_SCTP,
                _pad: 0,
            },
            vtag: 0x0102_0304,
            val: AssocVal {
                eps: [a("10.0.1.10"), a("10.0.2.10"), [0; 4], [0; 4]],
                vips: [a("20.0.0.100"), a("20.0.0.101"), [0; 4], [0; 4]],
                clients: [a("192.168.0.2"), a("192.168.1.2"), [0; 4], [0; 4]],
                xclients: [a("192.168.0.2"), a("192.168.1.2"), [0; 4], [0; 4]],
                ep_port: 3868u16.to_be(),
                vport: 3868u16.to_be(),
                cport: 5000u16.to_be(),
                xcport: 5000u16.to_be(),
                ep_stat: 0,
                n_pairs: 2,
                n_clients: 2,
                n_vips: 2,
                mode: 0,
                ctag: 0x0102_0304,
                etag: 0x0506_0708,
            },
            ep_addr: a("10.0.1.10"),
            ep_port: 3868u16.to_be(),
        }
    }

    #[test]
    fn assoc_records_round_trip_with_the_documented_size() {
        let r = sample_assoc();
        let f = encode_assoc_upsert(&[r, r]);
        assert_eq!(f.len(), 4 + 1 + 2 + 2 * ASSOC_RECORD_LEN);
        assert_eq!(decode(&f[4..]).unwrap(), Msg::AssocUpsert(vec![r, r]));
        let f = encode_assoc_remove(&[r.id()]);
        assert_eq!(f.len(), 4 + 1 + 2 + ASSOC_KEY_LEN);
        assert_eq!(decode(&f[4..]).unwrap(), Msg::AssocRemove(vec![r.id()]));
        // The endpoint identity ends the record.
        let f = encode_assoc_upsert(&[r]);
        assert_eq!(
            &f[7 + 299..7 + 311],
            &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]
        );
        assert_eq!(&f[7 + 311..7 + 315], &[10, 0, 1, 10]);
    }

    #[test]
    fn every_message_round_trips() {
        let r = sample();
        for m in [
            Msg::Hello(Hello::ours(ROLE_SENDER, "node-a")),
            Msg::Hello(Hello::ours(ROLE_RECEIVER, "node-b").lease(22222, "loxilb-agent-x7")),
            Msg::SnapshotBegin { entries: 5 },
            Msg::SnapshotEnd { entries: 5 },
            Msg::Upsert(vec![]),
            Msg::Upsert(vec![r]),
            Msg::Remove(vec![r.key, r.peer]),
            Msg::Error("no".into()),
            Msg::Heartbeat,
            Msg::Resync,
        ] {
            let f = encode(&m);
            assert_eq!(decode(&f[4..]).unwrap(), m);
        }
    }

    #[test]
    fn malformed_messages_are_refused() {
        let f = encode_upsert(&[sample()]);
        assert!(decode(&f[4..f.len() - 1]).is_err(), "truncated");
        let mut g = f[4..].to_vec();
        g.push(0);
        assert!(decode(&g).is_err(), "trailing byte");
        assert!(decode(&[99]).is_err(), "unknown type");
        assert!(decode(&[]).is_err());
        let mut h = encode(&Msg::Hello(Hello::ours(ROLE_SENDER, "x")));
        h[5] = b'X';
        assert!(decode(&h[4..]).unwrap_err().to_string().contains("magic"));
    }

    #[test]
    fn hello_version_mismatch_is_named() {
        let mut h = Hello::ours(ROLE_SENDER, "b");
        assert!(h.check("10.0.0.2:4789").is_ok());
        h.proto = PROTO_VERSION + 1;
        let e = h.check("10.0.0.2:4789").unwrap_err().to_string();
        assert!(
            e.contains("protocol 3") && e.contains("10.0.0.2:4789"),
            "{e}"
        );
        let mut h = Hello::ours(ROLE_SENDER, "b");
        h.layout += 1;
        let e = h.check("p").unwrap_err().to_string();
        assert!(e.contains(&format!("layout {}", h.layout)), "{e}");
    }

    #[tokio::test]
    async fn frames_over_a_stream_and_oversized_frames() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        write_frame(&mut a, &encode(&Msg::Heartbeat)).await.unwrap();
        write_frame(&mut a, &encode_remove(&[sample().key]))
            .await
            .unwrap();
        assert_eq!(read_msg(&mut b).await.unwrap(), Some(Msg::Heartbeat));
        assert_eq!(
            read_msg(&mut b).await.unwrap(),
            Some(Msg::Remove(vec![sample().key]))
        );
        write_frame(&mut a, &(MAX_FRAME as u32 + 1).to_be_bytes())
            .await
            .unwrap();
        assert!(read_msg(&mut b).await.is_err());
        drop(a);
        let (a, mut b) = tokio::io::duplex(64);
        drop(a);
        assert_eq!(read_msg(&mut b).await.unwrap(), None);
    }
}
