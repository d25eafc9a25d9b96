//! `udp`: a datagram (`request`, else empty) to the endpoint. Without
//! `response`: down on ICMP port unreachable, up on a reply or when no
//! error comes within min(timeout/2, 1 s). With `response`: up only on a
//! reply containing it.

use std::{io, net::SocketAddr};

use tokio::net::UdpSocket;

use super::{fmt_dur, io_text, quote, show_bytes, ProbeResult, ProbeSpec, UDP_QUIET_MAX};

pub(super) async fn check(addr: SocketAddr, spec: &ProbeSpec) -> ProbeResult {
    let local: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0".parse().unwrap()
    } else {
        "[::]:0".parse().unwrap()
    };
    let s = UdpSocket::bind(local)
        .await
        .map_err(|e| format!("UDP socket: {e}"))?;
    s.connect(addr)
        .await
        .map_err(|e| format!("UDP connect: {}", udp_err(&e)))?;
    let req = spec.request.as_deref().unwrap_or("");
    s.send(req.as_bytes())
        .await
        .map_err(|e| format!("UDP send: {}", udp_err(&e)))?;
    let mut buf = vec![0u8; 65536];
    match spec.response.as_deref() {
        Some(want) => {
            let n = s
                .recv(&mut buf)
                .await
                .map_err(|e| format!("UDP: {}", udp_err(&e)))?;
            let got = &buf[..n];
            if contains(got, want.as_bytes()) {
                Ok(format!("UDP reply contains {}", quote(want)))
            } else {
                Err(format!(
                    "UDP reply {} does not contain {}",
                    show_bytes(got),
                    quote(want)
                ))
            }
        }
        None => {
            let quiet = (spec.timeout / 2).min(UDP_QUIET_MAX);
            match tokio::time::timeout(quiet, s.recv(&mut buf)).await {
                Err(_) => Ok(format!("UDP: no ICMP error within {}", fmt_dur(quiet))),
                Ok(Ok(n)) => Ok(format!("UDP reply of {n} bytes")),
                Ok(Err(e)) => Err(format!("UDP: {}", udp_err(&e))),
            }
        }
    }
}

pub(super) fn contains(hay: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || hay.windows(needle.len()).any(|w| w == needle)
}

/// A UDP error: ECONNREFUSED on a connected UDP socket is the ICMP port
/// unreachable the endpoint sent.
fn udp_err(e: &io::Error) -> String {
    if e.raw_os_error() == Some(libc::ECONNREFUSED) {
        "ICMP port unreachable".into()
    } else {
        io_text(e)
    }
}
