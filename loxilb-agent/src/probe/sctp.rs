//! `sctp`: INIT → INIT-ACK → ABORT over a raw IPv4 socket (protocol 132),
//! so it needs no SCTP in the kernel. The association is aborted at once:
//! the endpoint keeps no state, and only its listening on the port is
//! tested. Packets carry a CRC32c checksum (RFC 9260 appendix B).

use std::{
    net::SocketAddr,
    sync::atomic::{AtomicU32, Ordering},
};

use socket2::Type;

use super::{
    crc32c, io_text,
    raw::{ipv4_payload, RawSock},
    ProbeResult,
};

pub(super) const IPPROTO_SCTP: i32 = 132;
const CHUNK_INIT: u8 = 1;
const CHUNK_INIT_ACK: u8 = 2;
const CHUNK_ABORT: u8 = 6;

static COUNTER: AtomicU32 = AtomicU32::new(0);

pub(super) async fn check(addr: SocketAddr) -> ProbeResult {
    let SocketAddr::V4(a) = addr else {
        return Err("SCTP: IPv6 is not implemented".into());
    };
    let sock = RawSock::open(Type::RAW, IPPROTO_SCTP, *a.ip())
        .map_err(|e| format!("SCTP: raw socket (protocol 132): {e}"))?;
    let r = random();
    let sport = 49152 + (r % 16384) as u16;
    let tag = (r >> 16) as u32 | 1;
    let tsn = random() as u32;
    let init = init_packet(sport, a.port(), tag, tsn);
    sock.send(&init)
        .await
        .map_err(|e| format!("SCTP: send INIT: {}", io_text(&e)))?;
    let mut buf = [0u8; 4096];
    loop {
        let n = sock
            .recv(&mut buf)
            .await
            .map_err(|e| match e.raw_os_error() {
                Some(libc::ENOPROTOOPT) => {
                    "SCTP: ICMP protocol unreachable (no SCTP there)".to_string()
                }
                Some(libc::ECONNREFUSED) => "SCTP: ICMP port unreachable".to_string(),
                _ => format!("SCTP: {}", io_text(&e)),
            })?;
        let Some(p) = ipv4_payload(&buf[..n], *a.ip(), IPPROTO_SCTP as u8) else {
            continue;
        };
        match classify(p, sport, a.port(), tag) {
            Answer::InitAck { peer_tag } => {
                let _ = sock.send(&abort_packet(sport, a.port(), peer_tag)).await;
                return Ok("SCTP INIT-ACK".into());
            }
            Answer::Abort => return Err("SCTP ABORT in answer to INIT (port closed)".into()),
            Answer::Other => continue,
        }
    }
}

fn random() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let c = COUNTER.fetch_add(1, Ordering::Relaxed) as u64;
    // splitmix64 of time and a counter
    let mut z = t ^ c.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ ((std::process::id() as u64) << 32);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn common_header(sport: u16, dport: u16, vtag: u32) -> Vec<u8> {
    let mut p = Vec::with_capacity(32);
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&vtag.to_be_bytes());
    p.extend_from_slice(&[0; 4]);
    p
}

/// Fill in the CRC32c (computed over the packet with a zero checksum,
/// stored least significant byte first, as Linux and usrsctp do).
pub(super) fn set_checksum(p: &mut [u8]) {
    p[8..12].fill(0);
    let c = crc32c(p);
    p[8..12].copy_from_slice(&c.to_le_bytes());
}

pub(super) fn checksum_ok(p: &[u8]) -> bool {
    if p.len() < 12 {
        return false;
    }
    let mut q = p.to_vec();
    set_checksum(&mut q);
    q[8..12] == p[8..12]
}

/// SCTP packet with one INIT chunk (no optional parameters).
pub(super) fn init_packet(sport: u16, dport: u16, tag: u32, tsn: u32) -> Vec<u8> {
    let mut p = common_header(sport, dport, 0);
    p.extend_from_slice(&[CHUNK_INIT, 0]);
    p.extend_from_slice(&20u16.to_be_bytes());
    p.extend_from_slice(&tag.to_be_bytes()); // initiate tag
    p.extend_from_slice(&65_535u32.to_be_bytes()); // a_rwnd
    p.extend_from_slice(&1u16.to_be_bytes()); // outbound streams
    p.extend_from_slice(&1u16.to_be_bytes()); // max inbound streams
    p.extend_from_slice(&tsn.to_be_bytes()); // initial TSN
    set_checksum(&mut p);
    p
}

/// SCTP packet with one ABORT chunk for the association the peer opened
/// with initiate tag `peer_tag` (T bit clear).
pub(super) fn abort_packet(sport: u16, dport: u16, peer_tag: u32) -> Vec<u8> {
    let mut p = common_header(sport, dport, peer_tag);
    p.extend_from_slice(&[CHUNK_ABORT, 0]);
    p.extend_from_slice(&4u16.to_be_bytes());
    set_checksum(&mut p);
    p
}

#[derive(Debug, PartialEq, Eq)]
pub(super) enum Answer {
    InitAck { peer_tag: u32 },
    Abort,
    Other,
}

/// What an SCTP packet from the endpoint says about our INIT (sent from
/// `sport` to `dport` with initiate tag `tag`).
pub(super) fn classify(p: &[u8], sport: u16, dport: u16, tag: u32) -> Answer {
    if p.len() < 16
        || p[0..2] != dport.to_be_bytes()
        || p[2..4] != sport.to_be_bytes()
        || p[4..8] != tag.to_be_bytes()
        || !checksum_ok(p)
    {
        return Answer::Other;
    }
    match p[12] {
        CHUNK_INIT_ACK if p.len() >= 12 + 20 => {
            let peer_tag = u32::from_be_bytes([p[16], p[17], p[18], p[19]]);
            if peer_tag == 0 {
                Answer::Other
            } else {
                Answer::InitAck { peer_tag }
            }
        }
        CHUNK_ABORT => Answer::Abort,
        _ => Answer::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_sctp_init_packet_layout_and_checksum() {
        let p = init_packet(50000, 7, 0x1234_5678, 42);
        assert_eq!(p.len(), 32);
        assert_eq!(&p[0..4], &[0xc3, 0x50, 0, 7]);
        assert_eq!(&p[4..8], &[0; 4], "INIT goes with verification tag 0");
        assert_eq!(p[12], CHUNK_INIT);
        assert_eq!(&p[14..16], &[0, 20]);
        assert_eq!(&p[16..20], &0x1234_5678u32.to_be_bytes());
        assert!(checksum_ok(&p));
        let mut bad = p.clone();
        bad[20] ^= 1;
        assert!(!checksum_ok(&bad));
        // The stored checksum is the CRC32c of the zero-checksum packet, LSB first.
        let mut z = p.clone();
        z[8..12].fill(0);
        assert_eq!(u32::from_le_bytes(p[8..12].try_into().unwrap()), crc32c(&z));
    }

    #[test]
    fn probe_sctp_classifies_answers() {
        let (sport, dport, tag) = (50000u16, 7u16, 0xdead_beefu32);
        // INIT-ACK from the endpoint: ports swapped, our tag, its own tag.
        let mut ack = common_header(dport, sport, tag);
        ack.extend_from_slice(&[CHUNK_INIT_ACK, 0, 0, 20]);
        ack.extend_from_slice(&0x0bad_cafeu32.to_be_bytes());
        ack.extend_from_slice(&[0; 12]);
        set_checksum(&mut ack);
        assert_eq!(
            classify(&ack, sport, dport, tag),
            Answer::InitAck {
                peer_tag: 0x0bad_cafe
            }
        );
        assert_eq!(classify(&ack, sport, dport, tag ^ 1), Answer::Other);
        assert_eq!(classify(&ack, sport + 1, dport, tag), Answer::Other);
        let mut corrupt = ack.clone();
        corrupt[9] ^= 0xff;
        assert_eq!(classify(&corrupt, sport, dport, tag), Answer::Other);
        let mut abort = common_header(dport, sport, tag);
        abort.extend_from_slice(&[CHUNK_ABORT, 0, 0, 4]);
        set_checksum(&mut abort);
        assert_eq!(classify(&abort, sport, dport, tag), Answer::Abort);
        let a = abort_packet(sport, dport, 0x0bad_cafe);
        assert_eq!(&a[4..8], &0x0bad_cafeu32.to_be_bytes());
        assert_eq!(a[12], CHUNK_ABORT);
        assert!(checksum_ok(&a));
    }
}
