//! `tcp`: the endpoint accepts a TCP connection.

use std::net::SocketAddr;

use tokio::net::TcpStream;

use super::ProbeResult;

pub(super) async fn check(addr: SocketAddr) -> ProbeResult {
    let s = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("TCP connect: {}", super::io_text(&e)))?;
    // Close with a reset: the node keeps no TIME_WAIT per probe.
    let _ = s.set_zero_linger();
    drop(s);
    Ok("TCP connected".into())
}
