//! Peers for the health-probe tests, each a guard that cleans up on drop:
//! an HTTP/HTTPS server whose status and body can be changed while it
//! runs, the usrsctp echo server (userspace SCTP over raw IP: this kernel
//! has no SCTP), and nftables drop rules.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU16, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use rustls::{
    crypto::ring,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
    ServerConfig, ServerConnection, StreamOwned,
};

use crate::netns::Netns;

/// A self-signed certificate and its key, made now (rcgen).
pub fn self_signed(name: &str) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>)> {
    let ck = rcgen::generate_simple_self_signed(vec![name.to_string()])?;
    let cert = ck.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der()));
    Ok((cert, key))
}

fn tls_config() -> Result<Arc<ServerConfig>> {
    let (cert, key) = self_signed("backend.probe.test")?;
    let cfg = ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)?;
    Ok(Arc::new(cfg))
}

/// An HTTP (or, with TLS, HTTPS) server in a namespace. Answers every
/// request with the current status and body; keeps the request lines.
pub struct HttpPeer {
    pub port: u16,
    status: Arc<AtomicU16>,
    body: Arc<Mutex<String>>,
    requests: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl HttpPeer {
    pub fn start(ns: &Netns, port: u16, tls: bool, body: &str) -> Result<Self> {
        let tls = if tls { Some(tls_config()?) } else { None };
        let status = Arc::new(AtomicU16::new(200));
        let body = Arc::new(Mutex::new(body.to_string()));
        let requests = Arc::new(Mutex::new(vec![]));
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = {
            let (status, body, requests, stop) =
                (status.clone(), body.clone(), requests.clone(), stop.clone());
            ns.spawn(move || {
                let l = match TcpListener::bind(("0.0.0.0", port)) {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                l.set_nonblocking(true).unwrap();
                let _ = tx.send(Ok(()));
                while !stop.load(Ordering::Relaxed) {
                    match l.accept() {
                        Ok((s, _)) => {
                            let st = status.load(Ordering::Relaxed);
                            let b = body.lock().unwrap().clone();
                            let (tls, requests) = (tls.clone(), requests.clone());
                            std::thread::spawn(move || {
                                let _ = serve(s, tls, st, &b, &requests);
                            });
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            })
        };
        rx.recv_timeout(Duration::from_secs(5))?
            .with_context(|| format!("binding HTTP port {port}"))?;
        Ok(HttpPeer {
            port,
            status,
            body,
            requests,
            stop,
            thread: Some(thread),
        })
    }

    pub fn set_status(&self, s: u16) {
        self.status.store(s, Ordering::Relaxed);
    }

    pub fn set_body(&self, b: &str) {
        *self.body.lock().unwrap() = b.to_string();
    }

    /// Request lines received so far (`GET /path HTTP/1.1`).
    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

fn serve(
    s: TcpStream,
    tls: Option<Arc<ServerConfig>>,
    status: u16,
    body: &str,
    requests: &Mutex<Vec<String>>,
) -> Result<()> {
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    let reason = match status {
        200 => "OK",
        503 => "Service Unavailable",
        500 => "Internal Server Error",
        _ => "Whatever",
    };
    let resp = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    match tls {
        Some(cfg) => {
            let mut t = StreamOwned::new(ServerConnection::new(cfg)?, s);
            let req = read_head(&mut t)?;
            requests.lock().unwrap().push(req);
            t.write_all(resp.as_bytes())?;
            t.conn.send_close_notify();
            t.flush()?;
        }
        None => {
            let mut s = s;
            let req = read_head(&mut s)?;
            requests.lock().unwrap().push(req);
            s.write_all(resp.as_bytes())?;
        }
    }
    Ok(())
}

/// Read a request's head; returns its first line.
fn read_head(r: &mut impl Read) -> Result<String> {
    let mut buf = vec![];
    let mut b = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = r.read(&mut b)?;
        if n == 0 {
            bail!("closed before the end of the request");
        }
        buf.extend_from_slice(&b[..n]);
    }
    let text = String::from_utf8_lossy(&buf);
    Ok(text.lines().next().unwrap_or("").to_string())
}

impl Drop for HttpPeer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Where Debian's libusrsctp-examples puts the echo server.
pub const USRSCTP_ECHO: &str = "/usr/lib/usrsctp/echo_server";
/// The SCTP port the usrsctp echo server listens on (the echo service).
pub const USRSCTP_ECHO_PORT: u16 = 7;

/// The usrsctp echo server in a namespace, killed on drop. Started as
/// `echo_server 0`: UDP encapsulation port 0 means no UDP socket, only
/// raw IPv4/IPv6 sockets of protocol 132 — SCTP straight over IP, served
/// in user space (this kernel has no SCTP).
pub struct SctpEcho {
    child: Option<Child>,
}

impl SctpEcho {
    pub fn start(ns: &Netns) -> Result<Self> {
        if !std::path::Path::new(USRSCTP_ECHO).exists() {
            bail!("{USRSCTP_ECHO} missing: install libusrsctp-examples (scripts/setup.sh)");
        }
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name, USRSCTP_ECHO, "0"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the usrsctp echo server")?;
        let pid = child.id();
        let mut g = SctpEcho { child: Some(child) };
        // Ready once its raw SCTP socket exists (protocol 132 = 0x84 is
        // the "port" of a raw socket in /proc/net/raw).
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let raw = std::fs::read_to_string(format!("/proc/{pid}/net/raw")).unwrap_or_default();
            if raw.lines().skip(1).any(|l| {
                l.split_whitespace()
                    .nth(1)
                    .is_some_and(|a| a.ends_with(":0084"))
            }) {
                // usrsctp starts its receive threads right after.
                std::thread::sleep(Duration::from_millis(100));
                return Ok(g);
            }
            if let Some(st) = g.child.as_mut().unwrap().try_wait()? {
                bail!("usrsctp echo server exited at start: {st}");
            }
            if Instant::now() > deadline {
                bail!("usrsctp echo server opened no raw SCTP socket within 5 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kill it now (as a crash would).
    pub fn kill(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for SctpEcho {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An nftables table in a namespace dropping what `rule` matches on
/// input (e.g. `tcp dport 8080 drop`); deleted on drop.
pub struct NftDrop {
    ns: String,
    table: String,
}

impl NftDrop {
    pub fn input(ns: &Netns, table: &str, rule: &str) -> Result<Self> {
        let g = NftDrop {
            ns: ns.name.clone(),
            table: table.to_string(),
        };
        let _ = ns.sh(&["nft", "delete", "table", "inet", table]);
        ns.sh(&["nft", "add", "table", "inet", table])
            .context("nft (install nftables: scripts/setup.sh)")?;
        ns.sh(&[
            "nft", "add", "chain", "inet", table, "input", "{", "type", "filter", "hook", "input",
            "priority", "0", ";", "policy", "accept", ";", "}",
        ])?;
        let mut args = vec!["nft", "add", "rule", "inet", table, "input"];
        args.extend(rule.split_whitespace());
        ns.sh(&args)?;
        Ok(g)
    }
}

impl Drop for NftDrop {
    fn drop(&mut self) {
        let _ = crate::netns::ns_sh(&self.ns, &["nft", "delete", "table", "inet", &self.table]);
    }
}
