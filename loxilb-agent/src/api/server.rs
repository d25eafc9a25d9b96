//! The API's listener: HTTP/1.1 (hyper), over TLS (rustls) with
//! `--api-tls DIR`, and who may write.
//!
//! - `--api-tls DIR`: `DIR/tls.crt` and `DIR/tls.key` are the server's
//!   certificate and key; with `DIR/ca.crt`, a client presenting a
//!   certificate of that CA may write (clients without one may still
//!   connect, and read).
//! - `--api-token-file PATH`: a client sending the token in the file
//!   (`Authorization: Bearer <token>`, or the bare token as kube-loxilb's
//!   client does) may write.
//! - Reads (`GET`, `HEAD`) are open: they show rules and sessions, change
//!   nothing, and kube-loxilb's health check polls `GET /` without
//!   credentials.
//! - Writes without credentials: 401; with a wrong token: 403 (even with
//!   `--insecure-api`: a client that sends a token expects it checked).
//! - `--insecure-api`: writes need no credentials; and the listener may be
//!   plain HTTP (kube-loxilb's default `http://` URL). Without it, the
//!   agent refuses to start unless TLS and one way to authenticate are
//!   configured (a token sent over plain HTTP could be read on the way).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{body::Incoming, Request, Response};
use rustls::{server::WebPkiClientVerifier, RootCertStore, ServerConfig};
use tracing::{info, warn};

use super::{Api, ApiError, MAX_BODY};

/// The API's flags, checked.
#[derive(Clone)]
pub struct ApiListen {
    pub addr: SocketAddr,
    pub tls: Option<Arc<ServerConfig>>,
    pub auth: Auth,
}

/// Who may write.
#[derive(Clone, Debug, Default)]
pub struct Auth {
    pub token: Option<String>,
    /// Clients with a certificate verified against `ca.crt`.
    pub client_certs: bool,
    pub insecure: bool,
}

impl ApiListen {
    /// From the flags: `--api-listen`, `--api-tls`, `--api-token-file`,
    /// `--insecure-api`. `None` when the API is off; an error saying what
    /// to change when the set is unsafe or incomplete.
    pub fn from_flags(
        listen: Option<SocketAddr>,
        tls_dir: Option<&Path>,
        token_file: Option<&Path>,
        insecure: bool,
    ) -> Result<Option<Self>> {
        let Some(addr) = listen else {
            if tls_dir.is_some() || token_file.is_some() || insecure {
                bail!(
                    "--api-tls, --api-token-file and --insecure-api configure the REST API, \
                     which is off: add --api-listen ADDR:PORT (e.g. 0.0.0.0:11111)"
                );
            }
            return Ok(None);
        };
        let token = match token_file {
            None => None,
            Some(p) => {
                let t = std::fs::read_to_string(p)
                    .with_context(|| format!("--api-token-file {}: cannot read it", p.display()))?;
                let t = t.trim().to_string();
                if t.is_empty() {
                    bail!(
                        "--api-token-file {}: the file is empty; write the token in it",
                        p.display()
                    );
                }
                if t.chars().any(|c| c.is_whitespace() || c.is_control()) {
                    bail!(
                        "--api-token-file {}: the token has blanks or control characters inside; \
                         a token is one word",
                        p.display()
                    );
                }
                Some(t)
            }
        };
        let (tls, client_certs) = match tls_dir {
            None => (None, false),
            Some(d) => {
                let (c, certs) = server_tls(d)?;
                (Some(c), certs)
            }
        };
        if !insecure {
            if tls.is_none() {
                bail!(
                    "--api-listen {addr}: without --api-tls DIR the API is plain HTTP, where \
                     credentials and rules travel readable; give --api-tls DIR (tls.crt, \
                     tls.key, and ca.crt for client certificates), or --insecure-api to serve \
                     it unprotected"
                );
            }
            if token.is_none() && !client_certs {
                bail!(
                    "--api-listen {addr}: nothing authenticates writes; give --api-token-file \
                     PATH, or put ca.crt in --api-tls {} (client certificates of that CA may \
                     write), or --insecure-api",
                    tls_dir.map(|d| d.display().to_string()).unwrap_or_default()
                );
            }
        }
        Ok(Some(ApiListen {
            addr,
            tls,
            auth: Auth {
                token,
                client_certs,
                insecure,
            },
        }))
    }
}

/// The server side of `--api-tls DIR`; whether client certificates are
/// verified (`ca.crt` present).
fn server_tls(dir: &Path) -> Result<(Arc<ServerConfig>, bool)> {
    use crate::ctsync::{read_pem_certs, read_pem_key, CA_FILE, CERT_FILE, KEY_FILE};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = read_pem_certs(&dir.join(CERT_FILE)).context("--api-tls")?;
    let key = read_pem_key(&dir.join(KEY_FILE)).context("--api-tls")?;
    let ca: PathBuf = dir.join(CA_FILE);
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let (builder, certs) = if ca.exists() {
        let mut roots = RootCertStore::empty();
        for c in read_pem_certs(&ca).context("--api-tls")? {
            roots
                .add(c)
                .map_err(|e| anyhow!("{}: not a usable CA certificate: {e}", ca.display()))?;
        }
        let v = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .allow_unauthenticated()
            .build()
            .map_err(|e| anyhow!("{}: {e}", ca.display()))?;
        (builder.with_client_cert_verifier(v), true)
    } else {
        (builder.with_no_client_auth(), false)
    };
    let mut cfg = builder.with_single_cert(chain, key).map_err(|e| {
        anyhow!(
            "--api-tls {}: {CERT_FILE} and {KEY_FILE} do not make a usable certificate and key: \
             {e}",
            dir.display()
        )
    })?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok((Arc::new(cfg), certs))
}

/// Constant-time equality (the token's length is not secret).
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

/// Whether a request may go on: reads always; writes with a verified
/// client certificate, the token, or `--insecure-api`.
pub fn authorize(
    auth: &Auth,
    method: &http::Method,
    authorization: Option<&str>,
    client_cert: bool,
) -> Result<(), ApiError> {
    if matches!(*method, http::Method::GET | http::Method::HEAD) {
        return Ok(());
    }
    if let (Some(token), Some(h)) = (&auth.token, authorization) {
        let given = h.trim();
        let given = given
            .strip_prefix("Bearer ")
            .or_else(|| given.strip_prefix("bearer "))
            .unwrap_or(given)
            .trim();
        if same(given.as_bytes(), token.as_bytes()) {
            return Ok(());
        }
        return Err(ApiError::new(
            403,
            "",
            "the Authorization token is not the one of --api-token-file",
        ));
    }
    if client_cert && auth.client_certs {
        return Ok(());
    }
    if auth.insecure {
        return Ok(());
    }
    let how = match (auth.token.is_some(), auth.client_certs) {
        (true, true) => {
            "a client certificate of the API's CA, or the API token (Authorization: Bearer <token>)"
        }
        (true, false) => "the API token (Authorization: Bearer <token>)",
        (false, true) => "a client certificate of the API's CA",
        (false, false) => "credentials this agent is not configured to check",
    };
    Err(ApiError::new(
        401,
        "",
        format!("{method} changes rules and needs {how}"),
    ))
}

fn respond(status: u16, body: &serde_json::Value) -> Response<Full<Bytes>> {
    let text = serde_json::to_vec(body).unwrap_or_default();
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(text)))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

/// One HTTP request: authorize, read the body (at most [`MAX_BODY`]),
/// hand it to the API.
async fn serve_one(
    req: Request<Incoming>,
    api: Arc<Mutex<Api>>,
    auth: Arc<Auth>,
    client_cert: bool,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let authz = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    if let Err(e) = authorize(&auth, &method, authz.as_deref(), client_cert) {
        warn!(%method, %path, "REST API: refused: {}", e.message);
        return Ok(respond(e.status, &e.body()));
    }
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            let (status, msg) = if e.is::<http_body_util::LengthLimitError>() {
                (413, format!("the body is over {MAX_BODY} bytes"))
            } else {
                (400, format!("cannot read the body: {e}"))
            };
            return Ok(respond(status, &ApiError::new(status, "", msg).body()));
        }
    };
    let (status, v) = {
        let mut api = api.lock().expect("API lock");
        api.handle(&method, &path, &body)
    };
    if method != http::Method::GET {
        if status == 200 {
            info!(%method, %path, "REST API: done");
        } else {
            warn!(%method, %path, status, "REST API: {}", v["message"]);
        }
    }
    Ok(respond(status, &v))
}

/// Serve `api` on `l` until the task is dropped.
pub async fn serve(l: tokio::net::TcpListener, cfg: ApiListen, api: Arc<Mutex<Api>>) {
    let auth = Arc::new(cfg.auth.clone());
    let acceptor = cfg.tls.clone().map(tokio_rustls::TlsAcceptor::from);
    loop {
        let (sock, peer) = match l.accept().await {
            Ok(x) => x,
            Err(e) => {
                warn!("REST API: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = sock.set_nodelay(true);
        let (api, auth, acceptor) = (api.clone(), auth.clone(), acceptor.clone());
        tokio::spawn(async move {
            // A client that does not send its request head in time is
            // dropped (a slow client cannot hold connections open).
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10));
            match acceptor {
                None => {
                    let svc = hyper::service::service_fn(move |r| {
                        serve_one(r, api.clone(), auth.clone(), false)
                    });
                    let _ = http
                        .serve_connection(hyper_util::rt::TokioIo::new(sock), svc)
                        .await;
                }
                Some(acc) => {
                    let tls = match tokio::time::timeout(Duration::from_secs(10), acc.accept(sock))
                        .await
                    {
                        Ok(Ok(t)) => t,
                        Ok(Err(e)) => {
                            warn!("REST API: TLS handshake with {peer} failed: {e}");
                            return;
                        }
                        Err(_) => {
                            warn!("REST API: TLS handshake with {peer} timed out");
                            return;
                        }
                    };
                    // A certificate is only there once the verifier
                    // accepted it (chain to ca.crt).
                    let cert = tls.get_ref().1.peer_certificates().is_some();
                    let svc = hyper::service::service_fn(move |r| {
                        serve_one(r, api.clone(), auth.clone(), cert)
                    });
                    let _ = http
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                        .await;
                }
            }
        });
    }
}

/// Bind `cfg.addr` and serve in the background.
pub async fn start(cfg: ApiListen, api: Arc<Mutex<Api>>) -> Result<SocketAddr> {
    let l = tokio::net::TcpListener::bind(cfg.addr)
        .await
        .with_context(|| format!("--api-listen {}: cannot listen", cfg.addr))?;
    let addr = l.local_addr()?;
    info!(
        "REST API on {}://{addr}{} ({})",
        if cfg.tls.is_some() { "https" } else { "http" },
        super::BASE,
        match (
            cfg.auth.insecure,
            cfg.auth.token.is_some(),
            cfg.auth.client_certs
        ) {
            (true, _, _) => "writes open: --insecure-api",
            (false, true, true) => "writes need a client certificate or the token",
            (false, true, false) => "writes need the token",
            (false, false, _) => "writes need a client certificate",
        }
    );
    tokio::spawn(serve(l, cfg, api));
    Ok(addr)
}
