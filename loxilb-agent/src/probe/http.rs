//! `http` / `https`: `GET /<request>` over HTTP/1.1 (hand-written, one
//! request per connection); up on a 2xx status and, with `response`, a body
//! containing it (the first 64 KiB of the body are searched).
//!
//! https uses rustls and **does not verify the server certificate** (nor
//! its name): endpoints are addressed by IP and usually present
//! self-signed certificates. The handshake's signatures are still checked
//! against the certificate the server sent.

use std::{
    net::SocketAddr,
    sync::{Arc, OnceLock},
};

use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{ring, verify_tls12_signature, verify_tls13_signature, CryptoProvider},
    pki_types::{CertificateDer, ServerName, UnixTime},
    ClientConfig, DigitallySignedStruct, SignatureScheme,
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};
use tokio_rustls::TlsConnector;

use super::{io_text, quote, udp::contains, ProbeResult, ProbeSpec};

const MAX_HEAD: usize = 16 * 1024;
const MAX_BODY: usize = 64 * 1024;

pub(super) async fn check(addr: SocketAddr, spec: &ProbeSpec, tls: bool) -> ProbeResult {
    let scheme = if tls { "HTTPS" } else { "HTTP" };
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("{scheme}: TCP connect: {}", io_text(&e)))?;
    let _ = tcp.set_nodelay(true);
    let req = request(addr, spec.request.as_deref());
    let want = spec.response.as_deref();
    let r = if tls {
        let name = ServerName::IpAddress(addr.ip().into());
        let s = TlsConnector::from(client_config())
            .connect(name, tcp)
            .await
            .map_err(|e| format!("HTTPS: TLS handshake: {e}"))?;
        exchange(s, &req, want).await
    } else {
        exchange(tcp, &req, want).await
    };
    r.map_err(|e| format!("{scheme}: {e}"))
        .map(|s| format!("{scheme}: {s}"))
}

/// The request text: `GET /<path>`.
pub(super) fn request(addr: SocketAddr, path: Option<&str>) -> String {
    let path = path.unwrap_or("");
    let path = path.strip_prefix('/').unwrap_or(path);
    format!(
        "GET /{path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: loxilb-probe\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    )
}

async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    req: &str,
    want: Option<&str>,
) -> Result<String, String> {
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| format!("send: {}", io_text(&e)))?;
    s.flush()
        .await
        .map_err(|e| format!("send: {}", io_text(&e)))?;
    let mut buf = Vec::with_capacity(4096);
    let mut eof = false;
    loop {
        match parse(&buf, eof, want.is_some()) {
            Parsed::More => {}
            Parsed::Bad(e) => return Err(e),
            Parsed::Done(r) => return judge(&r, want),
        }
        let mut chunk = [0u8; 8192];
        match s.read(&mut chunk).await {
            Ok(0) => eof = true,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            // A TLS server closing without close_notify: the end all the same.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => eof = true,
            Err(e) => return Err(format!("read: {}", io_text(&e))),
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub(super) struct Response {
    pub status: u16,
    pub reason: String,
    pub body: Vec<u8>,
    /// Body cut at MAX_BODY or by the connection's end.
    pub truncated: bool,
}

#[derive(Debug, PartialEq, Eq)]
pub(super) enum Parsed {
    More,
    Bad(String),
    Done(Response),
}

/// Parse what arrived so far. The body is only waited for when `need_body`
/// and the status is 2xx.
pub(super) fn parse(buf: &[u8], eof: bool, need_body: bool) -> Parsed {
    let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        if buf.len() > MAX_HEAD {
            return Parsed::Bad(format!("response headers longer than {MAX_HEAD} bytes"));
        }
        if eof {
            return Parsed::Bad(if buf.is_empty() {
                "connection closed without a response".into()
            } else {
                format!(
                    "connection closed within the response headers: {}",
                    super::show_bytes(buf)
                )
            });
        }
        return Parsed::More;
    };
    let head = String::from_utf8_lossy(&buf[..head_end]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let mut parts = status_line.splitn(3, ' ');
    let (version, code) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let reason = parts.next().unwrap_or("").to_string();
    let status = match code.parse::<u16>() {
        Ok(s) if version.starts_with("HTTP/1.") && (100..=999).contains(&s) => s,
        _ => return Parsed::Bad(format!("not an HTTP response: {}", quote(status_line))),
    };
    let mut chunked = false;
    let mut length = None;
    for l in lines {
        let Some((k, v)) = l.split_once(':') else {
            continue;
        };
        let (k, v) = (k.trim(), v.trim());
        if k.eq_ignore_ascii_case("transfer-encoding") && v.to_ascii_lowercase().contains("chunked")
        {
            chunked = true;
        } else if k.eq_ignore_ascii_case("content-length") {
            length = v.parse::<usize>().ok();
        }
    }
    let done = |body: Vec<u8>, truncated: bool| {
        Parsed::Done(Response {
            status,
            reason: reason.clone(),
            body,
            truncated,
        })
    };
    if !need_body || !(200..300).contains(&status) {
        return done(vec![], false);
    }
    let raw = &buf[head_end + 4..];
    if chunked {
        return match dechunk(raw) {
            Some((body, true)) => done(body, false),
            Some((body, false)) if eof || body.len() >= MAX_BODY => done(body, true),
            None if eof => Parsed::Bad("malformed chunked body".into()),
            _ if raw.len() > MAX_BODY + MAX_HEAD => done(vec![], true),
            _ => Parsed::More,
        };
    }
    match length {
        Some(n) if raw.len() >= n.min(MAX_BODY) => {
            done(raw[..n.min(MAX_BODY)].to_vec(), n > MAX_BODY)
        }
        _ if eof => done(raw.to_vec(), length.is_some()),
        None if raw.len() >= MAX_BODY => done(raw[..MAX_BODY].to_vec(), true),
        _ => Parsed::More,
    }
}

/// Decode a chunked body: (data so far, complete?); None when malformed.
pub(super) fn dechunk(mut raw: &[u8]) -> Option<(Vec<u8>, bool)> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = raw.windows(2).position(|w| w == b"\r\n") else {
            return Some((out, false));
        };
        let line = std::str::from_utf8(&raw[..eol]).ok()?;
        let size = usize::from_str_radix(line.split(';').next()?.trim(), 16).ok()?;
        let rest = &raw[eol + 2..];
        if size == 0 {
            return Some((out, true));
        }
        if rest.len() < size + 2 {
            out.extend_from_slice(&rest[..rest.len().min(size)]);
            return Some((out, false));
        }
        out.extend_from_slice(&rest[..size]);
        raw = &rest[size + 2..];
    }
}

fn judge(r: &Response, want: Option<&str>) -> Result<String, String> {
    if !(200..300).contains(&r.status) {
        return Err(format!("status {} {}", r.status, r.reason)
            .trim_end()
            .to_string());
    }
    match want {
        None => Ok(format!("status {}", r.status)),
        Some(w) if contains(&r.body, w.as_bytes()) => {
            Ok(format!("status {}, body contains {}", r.status, quote(w)))
        }
        Some(w) => Err(format!(
            "status {} but the body{} does not contain {}",
            r.status,
            if r.truncated { " (as far as read)" } else { "" },
            quote(w)
        )),
    }
}

fn provider() -> Arc<CryptoProvider> {
    static P: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    P.get_or_init(|| Arc::new(ring::default_provider())).clone()
}

fn client_config() -> Arc<ClientConfig> {
    static C: OnceLock<Arc<ClientConfig>> = OnceLock::new();
    C.get_or_init(|| {
        let p = provider();
        let mut c = ClientConfig::builder_with_provider(p.clone())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default TLS versions")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(p)))
            .with_no_client_auth();
        c.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(c)
    })
    .clone()
}

/// Accepts any server certificate (see the module doc).
#[derive(Debug)]
struct NoVerify(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_http_request_line() {
        let a: SocketAddr = "10.0.0.1:8080".parse().unwrap();
        assert!(request(a, Some("healthz"))
            .starts_with("GET /healthz HTTP/1.1\r\nHost: 10.0.0.1:8080\r\n"));
        assert!(request(a, Some("/a/b?x=1")).starts_with("GET /a/b?x=1 HTTP/1.1\r\n"));
        assert!(request(a, None).starts_with("GET / HTTP/1.1\r\n"));
        assert!(request(a, None).ends_with("Connection: close\r\n\r\n"));
        let v6: SocketAddr = "[fd00::1]:80".parse().unwrap();
        assert!(request(v6, None).contains("Host: [fd00::1]:80\r\n"));
    }

    fn done(buf: &str, eof: bool, need: bool) -> Response {
        match parse(buf.as_bytes(), eof, need) {
            Parsed::Done(r) => r,
            other => panic!("{buf:?}: {other:?}"),
        }
    }

    #[test]
    fn probe_http_response_parsing() {
        assert_eq!(
            parse(b"HTTP/1.1 200 OK\r\nContent-Le", false, true),
            Parsed::More
        );
        // Status only needed: no wait for the body.
        let r = done("HTTP/1.1 204 No Content\r\n\r\n", false, false);
        assert_eq!((r.status, r.reason.as_str()), (204, "No Content"));
        // Non-2xx: decided without the body.
        assert_eq!(done("HTTP/1.1 503 Busy\r\n\r\n", false, true).status, 503);
        // Content-Length: waits for all of it, not more.
        let h = "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n";
        assert_eq!(
            parse(format!("{h}he").as_bytes(), false, true),
            Parsed::More
        );
        assert_eq!(done(&format!("{h}hello+junk"), false, true).body, b"hello");
        // Until EOF without framing.
        let h = "HTTP/1.0 200 OK\r\n\r\n";
        assert_eq!(
            parse(format!("{h}abc").as_bytes(), false, true),
            Parsed::More
        );
        assert_eq!(done(&format!("{h}abc"), true, true).body, b"abc");
        // Chunked, with the wanted text split over chunks.
        let h = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
        let c = "3\r\nali\r\n4;x=y\r\nve-o\r\n1\r\nk\r\n0\r\n\r\n";
        let r = done(&format!("{h}{c}"), false, true);
        assert_eq!(r.body, b"alive-ok");
        assert!(judge(&r, Some("alive-ok")).is_ok());
        assert_eq!(
            parse(format!("{h}3\r\nali").as_bytes(), false, true),
            Parsed::More
        );
        // Errors.
        assert!(matches!(
            parse(b"SSH-2.0-OpenSSH\r\n\r\n", false, true),
            Parsed::Bad(_)
        ));
        assert!(matches!(parse(b"", true, true), Parsed::Bad(_)));
        assert!(matches!(parse(b"HTTP/1.1 200", true, true), Parsed::Bad(_)));
    }

    #[test]
    fn probe_http_judgement() {
        let r = |status, body: &str| Response {
            status,
            reason: "X".into(),
            body: body.as_bytes().to_vec(),
            truncated: false,
        };
        assert_eq!(judge(&r(200, ""), None).unwrap(), "status 200");
        assert_eq!(judge(&r(500, ""), None).unwrap_err(), "status 500 X");
        assert_eq!(
            judge(&r(302, "ok"), Some("ok")).unwrap_err(),
            "status 302 X"
        );
        assert!(judge(&r(200, "all ok here"), Some("ok")).is_ok());
        assert!(judge(&r(200, "fail"), Some("ok"))
            .unwrap_err()
            .contains("does not contain \"ok\""));
    }
}
