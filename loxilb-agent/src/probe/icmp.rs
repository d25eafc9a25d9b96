//! `ping`: ICMP echo request, up on the matching echo reply. A raw ICMP
//! socket (the agent runs as root); an ICMP datagram ("ping") socket when
//! raw sockets are not permitted.

use std::{
    io,
    net::IpAddr,
    sync::atomic::{AtomicU16, Ordering},
};

use socket2::Type;

use super::{
    io_text,
    raw::{inet_checksum, ipv4_payload, RawSock},
    ProbeResult,
};

const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_ECHO: u8 = 8;
const ICMP_TIME_EXCEEDED: u8 = 11;
const MAGIC: &[u8; 8] = b"loxilbpr";

static SEQ: AtomicU16 = AtomicU16::new(1);

pub(super) async fn check(ip: IpAddr) -> ProbeResult {
    let IpAddr::V4(ip) = ip else {
        return Err("ping: IPv6 is not implemented".into());
    };
    let (sock, raw) = match RawSock::open(Type::RAW, libc::IPPROTO_ICMP, ip) {
        Ok(s) => (s, true),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EPERM | libc::EACCES)) => (
            RawSock::open(Type::DGRAM, libc::IPPROTO_ICMP, ip).map_err(|e2| {
                format!("ping: no raw ICMP socket ({e}) nor ICMP datagram socket ({e2})")
            })?,
            false,
        ),
        Err(e) => return Err(format!("ping: ICMP socket: {e}")),
    };
    if raw {
        // Only echo replies and the errors that may be about our request.
        let mask: u32 =
            !((1 << ICMP_ECHO_REPLY) | (1 << ICMP_DEST_UNREACH) | (1 << ICMP_TIME_EXCEEDED));
        set_icmp_filter(&sock, mask);
    }
    let ident = (std::process::id() as u16) ^ 0x4c58;
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    let nonce: u64 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let req = echo_request(ident, seq, nonce);
    sock.send(&req)
        .await
        .map_err(|e| format!("ping: send: {}", io_text(&e)))?;
    let mut buf = [0u8; 2048];
    loop {
        let n = sock.recv(&mut buf).await.map_err(|e| ping_err(&e))?;
        let icmp = if raw {
            match ipv4_payload(&buf[..n], ip, libc::IPPROTO_ICMP as u8) {
                Some(p) => p,
                None => continue,
            }
        } else {
            &buf[..n]
        };
        match parse_reply(icmp, ident, seq, nonce, raw) {
            Reply::Match => return Ok("ICMP echo reply".into()),
            Reply::Error(t, c) => return Err(format!("ping: ICMP {}", icmp_error_text(t, c))),
            Reply::Other => continue,
        }
    }
}

fn ping_err(e: &io::Error) -> String {
    format!("ping: {}", io_text(e))
}

fn set_icmp_filter(sock: &RawSock, mask: u32) {
    use std::os::fd::AsRawFd;
    // ICMP_FILTER (1) at SOL_RAW (255): a bit set drops that type.
    // Failure only costs some wake-ups: replies are matched anyway.
    let _ = unsafe {
        libc::setsockopt(
            sock.socket().as_raw_fd(),
            libc::SOL_RAW,
            1,
            &mask as *const u32 as *const libc::c_void,
            4,
        )
    };
}

/// An echo request: header, then MAGIC and the nonce.
pub(super) fn echo_request(ident: u16, seq: u16, nonce: u64) -> Vec<u8> {
    let mut p = vec![ICMP_ECHO, 0, 0, 0];
    p.extend_from_slice(&ident.to_be_bytes());
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(MAGIC);
    p.extend_from_slice(&nonce.to_be_bytes());
    let c = inet_checksum(&p);
    p[2..4].copy_from_slice(&c.to_be_bytes());
    p
}

#[derive(Debug, PartialEq, Eq)]
pub(super) enum Reply {
    Match,
    /// An ICMP error (type, code) quoting our request.
    Error(u8, u8),
    Other,
}

/// Classify an ICMP message. With a datagram socket the kernel chooses the
/// identifier, so only the sequence number and payload are compared.
pub(super) fn parse_reply(icmp: &[u8], ident: u16, seq: u16, nonce: u64, check_id: bool) -> Reply {
    if icmp.len() < 8 {
        return Reply::Other;
    }
    let id_ok = |h: &[u8]| !check_id || h[4..6] == ident.to_be_bytes();
    match icmp[0] {
        ICMP_ECHO_REPLY => {
            let body_ok =
                icmp.len() >= 24 && &icmp[8..16] == MAGIC && icmp[16..24] == nonce.to_be_bytes();
            if id_ok(icmp) && icmp[6..8] == seq.to_be_bytes() && body_ok {
                Reply::Match
            } else {
                Reply::Other
            }
        }
        t @ (ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED) => {
            // Quoted: IPv4 header of our request, then its first 8 bytes.
            let q = &icmp[8..];
            if q.len() < 20 {
                return Reply::Other;
            }
            let ihl = ((q[0] & 0x0f) as usize) * 4;
            if q.len() < ihl + 8 || q[9] != libc::IPPROTO_ICMP as u8 {
                return Reply::Other;
            }
            let h = &q[ihl..ihl + 8];
            if h[0] == ICMP_ECHO && h[6..8] == seq.to_be_bytes() && id_ok(h) {
                Reply::Error(t, icmp[1])
            } else {
                Reply::Other
            }
        }
        _ => Reply::Other,
    }
}

fn icmp_error_text(t: u8, code: u8) -> String {
    match (t, code) {
        (ICMP_DEST_UNREACH, 0) => "network unreachable".into(),
        (ICMP_DEST_UNREACH, 1) => "host unreachable".into(),
        (ICMP_DEST_UNREACH, 13) => "communication administratively prohibited".into(),
        (ICMP_DEST_UNREACH, c) => format!("destination unreachable (code {c})"),
        (ICMP_TIME_EXCEEDED, _) => "time exceeded".into(),
        (t, c) => format!("type {t} code {c}"),
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn ipv4(src: Ipv4Addr, proto: u8, payload: &[u8]) -> Vec<u8> {
        let mut p = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, proto, 0, 0];
        p.extend_from_slice(&src.octets());
        p.extend_from_slice(&[10, 0, 0, 1]);
        let len = (p.len() + payload.len()) as u16;
        p[2..4].copy_from_slice(&len.to_be_bytes());
        p.extend_from_slice(payload);
        p
    }

    #[test]
    fn probe_ping_echo_request_and_reply_matching() {
        let req = echo_request(0x1234, 7, 99);
        assert_eq!(req.len(), 24);
        assert_eq!((req[0], req[1]), (ICMP_ECHO, 0));
        assert_eq!(inet_checksum(&req), 0, "checksum verifies");
        let mut reply = req.clone();
        reply[0] = ICMP_ECHO_REPLY;
        assert_eq!(parse_reply(&reply, 0x1234, 7, 99, true), Reply::Match);
        assert_eq!(
            parse_reply(&reply, 0x1234, 8, 99, true),
            Reply::Other,
            "other seq"
        );
        assert_eq!(
            parse_reply(&reply, 0x1234, 7, 98, true),
            Reply::Other,
            "other nonce"
        );
        assert_eq!(
            parse_reply(&reply, 0x4321, 7, 99, true),
            Reply::Other,
            "other id"
        );
        // Datagram sockets: the kernel picks the id.
        assert_eq!(parse_reply(&reply, 0x4321, 7, 99, false), Reply::Match);
        assert_eq!(
            parse_reply(&req, 0x1234, 7, 99, true),
            Reply::Other,
            "a request is no reply"
        );
        // Host unreachable quoting our request.
        let me = Ipv4Addr::new(10, 0, 0, 1);
        let mut err = vec![ICMP_DEST_UNREACH, 1, 0, 0, 0, 0, 0, 0];
        err.extend_from_slice(&ipv4(me, 1, &req[..8]));
        assert_eq!(parse_reply(&err, 0x1234, 7, 99, true), Reply::Error(3, 1));
        assert_eq!(icmp_error_text(3, 1), "host unreachable");
        assert_eq!(parse_reply(&err, 0x1234, 6, 99, true), Reply::Other);
    }

    #[test]
    fn probe_raw_ipv4_payload() {
        let src = Ipv4Addr::new(10, 0, 0, 2);
        let p = ipv4(src, 132, b"sctp!");
        assert_eq!(ipv4_payload(&p, src, 132), Some(&b"sctp!"[..]));
        assert_eq!(ipv4_payload(&p, Ipv4Addr::new(10, 0, 0, 3), 132), None);
        assert_eq!(ipv4_payload(&p, src, 1), None);
        assert_eq!(ipv4_payload(&p[..10], src, 132), None);
        let mut opts = p.clone();
        opts[0] = 0x46; // IHL 6: 4 bytes of options
        opts.splice(20..20, [1, 1, 1, 1]);
        let len = opts.len() as u16;
        opts[2..4].copy_from_slice(&len.to_be_bytes());
        assert_eq!(ipv4_payload(&opts, src, 132), Some(&b"sctp!"[..]));
    }
}
