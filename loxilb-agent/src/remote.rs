//! External mode (`kube --loxiURL=URL,...`): the controller's rules go to
//! remote agents (or loxilb) through their REST API (`/netlox/v1`, see
//! [`crate::api`]) instead of a datapath of this node.
//!
//! Every URL is a remote of its own and gets every rule (kube-loxilb's
//! semantics). Each has a worker task that makes the remote hold the
//! desired rules:
//!
//! - on (re)connecting it checks health (`GET /netlox/v1/status`), lists
//!   the remote's rules (`GET .../loadbalancer/all`) and from then on
//!   POSTs what is missing or different and DELETEs (by tuple) what is
//!   extra — among *our* rules only: those listed with `managed: true`.
//!   Rules with `managed: false` (a remote agent's rule file) are never
//!   touched; a VIP, port and protocol of theirs is refused by the remote
//!   (409), and that refusal is reported on the Service;
//! - every `resync` it lists the rules again: a remote that restarted
//!   without its state (or whose rules someone changed) is re-synced;
//! - connection errors, timeouts and 5xx answers: the remote counts as
//!   down, retried with exponential back-off (`backoff_min` doubling up to
//!   `backoff_max`), then re-synced from a fresh list;
//! - a 4xx answer to a POST refuses that rule (not retried until the rule
//!   changes or the remote is re-synced); the sink reports it
//!   ([`Applied::refused`]) so the controller raises a Warning Event.
//!
//! Only the leader programs the remotes ([`RuleSink::leading`]); the
//! other agents keep the desired set, to take over at once.
//!
//! `--setRoles=<VIP>` ([`Options::roles`]): the leader also arbitrates
//! the remotes' cluster roles as kube-loxilb does. Every `role_interval`
//! (2 s) it reads each remote's `GET /netlox/v1/config/cistate/all`
//! (within `role_timeout`, 1 s: no answer counts as down); one live remote
//! is MASTER, the others BACKUP, told with `POST /config/cistate
//! {"instance": "default", "state", "vip"}` whenever what a remote reports
//! differs (a restarted remote, a new leader, a promotion). The MASTER is
//! sticky: the current one stays while it answers; at start (or on a new
//! leader) a remote already reporting MASTER is kept; otherwise the first
//! live remote in `--loxiURL` order is promoted. A MASTER that this agent
//! cannot reach but that still runs (a partition between the two) is not
//! reachable to demote: it stays MASTER on its side until it answers
//! again and is told BACKUP, as with kube-loxilb. [`RemoteSink::roles`]
//! reports each remote's role.
//!
//! Rules carry kube-loxilb's name (`namespace_service`, shared by a
//! Service's ports) and `managed: true`; `BGP` is `--setBGP` (the remote
//! announces the VIPs). The mapping is the one of the agent's own
//! datapath ([`kube_rules::to_rule`], then [`api::from_rule`]), so a rule
//! this agent cannot serve is refused before it is sent.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use kube_watch::{
    controller::{Applied, Refused, RuleSink},
    translate::ServiceRule as KubeRule,
    ServiceKey,
};
use loxilb_model::Protocol;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::{
    api::{self, Key},
    kube_rules,
};

/// loxilb's API port, when a URL gives none.
pub const DEFAULT_PORT: u16 = 11111;

/// One `--loxiURL` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Remote {
    /// As given (in logs and Events).
    pub url: String,
    pub https: bool,
    /// Host name or IP address (IPv6 without brackets).
    pub host: String,
    pub port: u16,
}

impl Remote {
    fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// `--loxiURL`: comma-separated `http(s)://host[:port]` (port 11111 by
/// default), no path. The error says what is wrong and what to give, not
/// the flag (clap's message names it: `invalid value '...' for
/// '--loxiURL <URLS>': ...`).
pub fn parse_urls(list: &str) -> Result<Vec<Remote>, String> {
    let mut out: Vec<Remote> = vec![];
    for item in list.split(',').map(str::trim) {
        if item.is_empty() {
            return Err("an empty entry; give http(s)://host:port[,...]".to_string());
        }
        let bad = |why: &str| {
            format!("{item:?} {why}; give http(s)://host:port (e.g. http://10.0.0.5:11111)")
        };
        let uri: http::Uri = item.parse().map_err(|_| bad("is not a URL"))?;
        let https = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            Some(_) => return Err(bad("is neither http nor https")),
            None => return Err(bad("has no scheme")),
        };
        let host = uri
            .host()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| bad("has no host"))?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(bad("has a path (the API's base path is fixed)"));
        }
        if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
            return Err(bad("has user information (use --loxiTokenFile)"));
        }
        let port = uri.port_u16().unwrap_or(DEFAULT_PORT);
        if port == 0 {
            return Err(bad("has port 0"));
        }
        let r = Remote {
            url: item.to_string(),
            https,
            host,
            port,
        };
        if out.iter().any(|o| o.host == r.host && o.port == r.port) {
            return Err(format!("{item:?} is given twice"));
        }
        out.push(r);
    }
    Ok(out)
}

/// How the remotes are reached and kept in sync.
#[derive(Clone, Debug)]
pub struct Options {
    /// `--loxiCA`: PEM CA certificate(s) the https remotes' certificates
    /// must chain to (needed for https URLs).
    pub ca_file: Option<PathBuf>,
    /// `--loxiTokenFile`'s token, sent as `Authorization: Bearer`.
    pub token: Option<String>,
    /// `BGP` of every rule (`--setBGP` given: the remotes announce).
    pub bgp: bool,
    /// How often each remote's rules are listed and compared.
    pub resync: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// One request (connect included).
    pub request_timeout: Duration,
    /// How long an update waits for the remotes that are up (to report
    /// their refusals).
    pub wait: Duration,
    /// `--setRoles=<VIP>`: arbitrate the remotes' MASTER / BACKUP roles
    /// (the VIP is sent with them; `0.0.0.0` for none).
    pub roles: Option<Ipv4Addr>,
    /// How often the roles are checked (kube-loxilb: 2 s).
    pub role_interval: Duration,
    /// A role check's timeout; no answer within it counts as down
    /// (kube-loxilb: 1 s).
    pub role_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            ca_file: None,
            token: None,
            bgp: false,
            resync: Duration::from_secs(10),
            backoff_min: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            request_timeout: Duration::from_secs(10),
            wait: Duration::from_secs(10),
            roles: None,
            role_interval: Duration::from_secs(2),
            role_timeout: Duration::from_secs(1),
        }
    }
}

/// kube-loxilb's rule name: `namespace_service` (all of a Service's
/// ports).
pub fn remote_name(s: &ServiceKey) -> String {
    format!("{}_{}", s.namespace, s.name)
}

/// The request body for `r` (POST `/netlox/v1/config/loadbalancer`), or
/// why it cannot be served.
pub fn to_api(r: &KubeRule, bgp: bool) -> Result<api::LbRule, kube_rules::Unsupported> {
    let rule = kube_rules::to_rule(r)?;
    let mut out = api::from_rule(&rule);
    out.service.name = remote_name(&r.service);
    out.service.managed = true;
    out.service.bgp = bgp;
    Ok(out)
}

/// A listed rule's key (VIP, port, protocol), `None` when it has none
/// this side can read.
fn key_of(r: &api::LbRule) -> Option<Key> {
    let ip: IpAddr = r.service.external_ip.trim().parse().ok()?;
    let p = Protocol::from_name(&r.service.protocol.trim().to_ascii_lowercase())?;
    Some((ip, r.service.port, p))
}

/// A listed rule as it was sent: without the output-only endpoint fields.
fn as_sent(mut r: api::LbRule) -> api::LbRule {
    for e in &mut r.endpoints {
        e.state.clear();
        e.counter.clear();
    }
    r
}

fn show_key((ip, port, p): Key) -> String {
    format!("{}/{p}", std::net::SocketAddr::new(ip, port))
}

/// The message of an error answer (`{"message": ...}`), else its text.
fn message_of(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_string())
}

/// HTTP/1 client of one remote: one kept-alive connection, reopened when
/// it fails.
struct Client {
    remote: Remote,
    tls: Option<(
        tokio_rustls::TlsConnector,
        rustls::pki_types::ServerName<'static>,
    )>,
    token: Option<String>,
    timeout: Duration,
    conn: Option<SendRequest<Full<Bytes>>>,
}

/// A rustls client configuration trusting the CA certificates of `ca`.
fn tls_config(ca: &std::path::Path) -> Result<rustls::ClientConfig> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let pem =
        std::fs::read(ca).with_context(|| format!("--loxiCA {}: cannot read", ca.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&pem) {
        let c = c.map_err(|e| anyhow::anyhow!("--loxiCA {}: bad PEM: {e}", ca.display()))?;
        roots
            .add(c)
            .map_err(|e| anyhow::anyhow!("--loxiCA {}: not a CA certificate: {e}", ca.display()))?;
    }
    if roots.is_empty() {
        anyhow::bail!(
            "--loxiCA {}: no certificate in it (give the PEM CA certificate that signed the \
             remote API's certificate)",
            ca.display()
        );
    }
    Ok(rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| anyhow::anyhow!("TLS: {e}"))?
    .with_root_certificates(roots)
    .with_no_client_auth())
}

impl Client {
    fn new(remote: Remote, tls: Option<Arc<rustls::ClientConfig>>, opts: &Options) -> Result<Self> {
        let tls = match (remote.https, tls) {
            (false, _) => None,
            (true, None) => anyhow::bail!(
                "--loxiURL={}: https needs --loxiCA FILE (the CA certificate that signed the \
                 remote API's certificate)",
                remote.url
            ),
            (true, Some(cfg)) => {
                let name = rustls::pki_types::ServerName::try_from(remote.host.clone())
                    .map_err(|e| anyhow::anyhow!("--loxiURL={}: {e}", remote.url))?;
                Some((tokio_rustls::TlsConnector::from(cfg), name))
            }
        };
        Ok(Client {
            remote,
            tls,
            token: opts.token.clone(),
            timeout: opts.request_timeout,
            conn: None,
        })
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>> {
        let tcp = tokio::net::TcpStream::connect((self.remote.host.as_str(), self.remote.port))
            .await
            .with_context(|| format!("cannot connect to {}", self.remote.authority()))?;
        let _ = tcp.set_nodelay(true);
        let url = self.remote.url.clone();
        Ok(match &self.tls {
            None => {
                let (s, c) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
                tokio::spawn(async move {
                    if let Err(e) = c.await {
                        debug!(remote = %url, "connection ended: {e}");
                    }
                });
                s
            }
            Some((connector, name)) => {
                let t = connector
                    .connect(name.clone(), tcp)
                    .await
                    .context("TLS handshake")?;
                let (s, c) = hyper::client::conn::http1::handshake(TokioIo::new(t)).await?;
                tokio::spawn(async move {
                    if let Err(e) = c.await {
                        debug!(remote = %url, "connection ended: {e}");
                    }
                });
                s
            }
        })
    }

    async fn once(
        &mut self,
        fresh: bool,
        method: &http::Method,
        path: &str,
        body: &Option<Bytes>,
    ) -> Result<(u16, Bytes)> {
        let mut s = match self.conn.take() {
            Some(s) if !fresh && !s.is_closed() => s,
            _ => self.connect().await?,
        };
        s.ready().await?;
        let mut req = http::Request::builder()
            .method(method.clone())
            .uri(path)
            .header(http::header::HOST, self.remote.authority());
        if body.is_some() {
            req = req.header(http::header::CONTENT_TYPE, "application/json");
        }
        if let Some(t) = &self.token {
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let req = req.body(Full::new(body.clone().unwrap_or_default()))?;
        let resp = s.send_request(req).await?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        self.conn = Some(s);
        Ok((status, body))
    }

    /// One request: status and body. A kept-alive connection the remote
    /// closed meanwhile is retried once on a new one.
    async fn call(
        &mut self,
        method: http::Method,
        path: &str,
        body: Option<Bytes>,
    ) -> Result<(u16, Bytes)> {
        let path = format!("{}{path}", api::BASE);
        let reused = self.conn.as_ref().is_some_and(|c| !c.is_closed());
        let t = self.timeout;
        let r = match tokio::time::timeout(t, self.once(false, &method, &path, &body)).await {
            Ok(r) => r,
            Err(_) => Err(anyhow::anyhow!("no answer within {t:?}")),
        };
        let r = match r {
            Err(_) if reused => {
                match tokio::time::timeout(t, self.once(true, &method, &path, &body)).await {
                    Ok(r) => r,
                    Err(_) => Err(anyhow::anyhow!("no answer within {t:?}")),
                }
            }
            r => r,
        };
        r.with_context(|| format!("{method} {}{path}", self.remote.url.trim_end_matches('/')))
    }
}

/// What the remotes should hold.
#[derive(Clone, Debug, Default)]
struct Desired {
    /// Bumped by every change.
    gen: u64,
    leading: bool,
    rules: Arc<BTreeMap<Key, api::LbRule>>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
enum State {
    #[default]
    Unknown,
    Up,
    Down(String),
}

/// A remote's worker's report.
#[derive(Clone, Debug, Default)]
struct Status {
    state: State,
    /// The last [`Desired::gen`] carried out.
    gen: u64,
    /// Rules the remote refused (4xx), with its message.
    refused: Arc<BTreeMap<Key, String>>,
}

struct Worker {
    client: Client,
    opts: Arc<Options>,
    /// What the remote holds of ours (as sent); `None`: list it first.
    known: Option<BTreeMap<Key, api::LbRule>>,
    /// Rules it refused, as sent, and why (not sent again unchanged).
    refused: BTreeMap<Key, (api::LbRule, String)>,
    status: watch::Sender<Status>,
}

/// A remote failure that makes it count as down (retried with back-off).
type Down = anyhow::Error;

impl Worker {
    async fn run(mut self, mut desired: watch::Receiver<Desired>) {
        let url = self.client.remote.url.clone();
        let mut backoff = self.opts.backoff_min;
        let mut next_list = Instant::now();
        loop {
            let d = desired.borrow_and_update().clone();
            if !d.leading {
                // The leader programs; ours may change meanwhile.
                self.known = None;
                self.refused.clear();
                self.status.send_modify(|s| {
                    s.gen = d.gen;
                    s.refused = Arc::default();
                });
                if desired.changed().await.is_err() {
                    return;
                }
                continue;
            }
            let list = Instant::now() >= next_list;
            match self.sync(&d, list).await {
                Ok(()) => {
                    if matches!(self.status.borrow().state, State::Down(_)) {
                        info!(remote = %url, "reachable again: re-synced");
                    }
                    backoff = self.opts.backoff_min;
                    if list {
                        next_list = Instant::now() + self.opts.resync;
                    }
                    let refused: BTreeMap<Key, String> = self
                        .refused
                        .iter()
                        .map(|(k, (_, m))| (*k, m.clone()))
                        .collect();
                    self.status.send_modify(|s| {
                        s.state = State::Up;
                        s.gen = d.gen;
                        s.refused = Arc::new(refused);
                    });
                    tokio::select! {
                        r = desired.changed() => if r.is_err() { return },
                        _ = tokio::time::sleep_until(next_list.into()) => {}
                    }
                }
                Err(e) => {
                    warn!(remote = %url, "{e:#}; retrying in {backoff:?}, then re-syncing");
                    self.known = None;
                    self.status
                        .send_modify(|s| s.state = State::Down(format!("{e:#}")));
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(self.opts.backoff_max);
                    next_list = Instant::now();
                    if desired.has_changed().is_err() {
                        return;
                    }
                }
            }
        }
    }

    /// Credentials refused: the remote as a whole, not a rule.
    fn check_auth(&self, status: u16, body: &[u8]) -> Result<(), Down> {
        if status == 401 || status == 403 {
            anyhow::bail!(
                "{} refused our credentials ({status}: {}); give --loxiTokenFile with the \
                 remote's --api-token-file token",
                self.client.remote.url,
                message_of(body)
            );
        }
        Ok(())
    }

    /// Our rules on the remote (`managed: true`), as sent.
    async fn list(&mut self) -> Result<BTreeMap<Key, api::LbRule>, Down> {
        let (st, body) = self
            .client
            .call(http::Method::GET, "/config/loadbalancer/all", None)
            .await?;
        if st != 200 {
            anyhow::bail!("listing the rules: {st} {}", message_of(&body));
        }
        #[derive(serde::Deserialize)]
        struct All {
            #[serde(rename = "lbAttr", default)]
            lb_attr: Option<Vec<api::LbRule>>,
        }
        let all: All = serde_json::from_slice(&body).context("listing the rules: bad JSON")?;
        let mut out = BTreeMap::new();
        for r in all.lb_attr.unwrap_or_default() {
            if !r.service.managed {
                continue;
            }
            match key_of(&r) {
                Some(k) => {
                    out.insert(k, as_sent(r));
                }
                None => warn!(
                    remote = %self.client.remote.url,
                    "a listed rule has no readable VIP, port, protocol: {:?}", r.service
                ),
            }
        }
        Ok(out)
    }

    async fn health(&mut self) -> Result<(), Down> {
        let (st, body) = self.client.call(http::Method::GET, "/status", None).await?;
        if st != 200 {
            anyhow::bail!("not healthy: {st} {}", message_of(&body));
        }
        Ok(())
    }

    /// Make the remote hold `d.rules` (of ours); `list`: compare with its
    /// list first.
    async fn sync(&mut self, d: &Desired, list: bool) -> Result<(), Down> {
        let url = self.client.remote.url.clone();
        let mut known = match self.known.take() {
            None => {
                self.health().await?;
                self.refused.clear();
                let l = self.list().await?;
                info!(remote = %url, ours = l.len(), want = d.rules.len(), "connected: syncing");
                l
            }
            Some(k) if list => {
                let l = self.list().await?;
                if l != k {
                    info!(
                        remote = %url,
                        held = l.len(),
                        sent = k.len(),
                        "its rules differ from what was sent (restarted, or changed by someone \
                         else): re-syncing"
                    );
                    self.refused.clear();
                }
                l
            }
            Some(k) => k,
        };
        // Removals first: they may free a key a new rule takes.
        let extra: Vec<Key> = known
            .keys()
            .filter(|k| !d.rules.contains_key(k))
            .copied()
            .collect();
        for k in extra {
            let (ip, port, p) = k;
            let path =
                format!("/config/loadbalancer/externalipaddress/{ip}/port/{port}/protocol/{p}");
            let (st, body) = self.client.call(http::Method::DELETE, &path, None).await?;
            self.check_auth(st, &body)?;
            match st {
                200 | 404 => {
                    info!(remote = %url, rule = %show_key(k), "deleted");
                }
                400..=499 => warn!(
                    remote = %url,
                    rule = %show_key(k),
                    "deleting it was refused: {st} {}; left as it is",
                    message_of(&body)
                ),
                _ => anyhow::bail!("deleting {}: {st} {}", show_key(k), message_of(&body)),
            }
            known.remove(&k);
        }
        for (k, r) in d.rules.iter() {
            if known.get(k) == Some(r) {
                self.refused.remove(k);
                continue;
            }
            if self.refused.get(k).is_some_and(|(x, _)| x == r) {
                continue;
            }
            let body = Bytes::from(serde_json::to_vec(r)?);
            let (st, resp) = self
                .client
                .call(http::Method::POST, "/config/loadbalancer", Some(body))
                .await?;
            self.check_auth(st, &resp)?;
            match st {
                200..=299 => {
                    debug!(remote = %url, rule = %show_key(*k), "programmed");
                    known.insert(*k, r.clone());
                    self.refused.remove(k);
                }
                400..=499 => {
                    let m = message_of(&resp);
                    warn!(remote = %url, rule = %show_key(*k), "refused: {st} {m}");
                    // What it held under that key is not ours any more.
                    known.remove(k);
                    self.refused.insert(*k, (r.clone(), format!("{st} {m}")));
                }
                _ => {
                    self.known = Some(known);
                    anyhow::bail!("programming {}: {st} {}", show_key(*k), message_of(&resp));
                }
            }
        }
        self.refused.retain(|k, _| d.rules.contains_key(k));
        self.known = Some(known);
        Ok(())
    }
}

/// The instance kube-loxilb's roles are set on (loxilb's default one).
pub const ROLE_INSTANCE: &str = "default";

/// A remote's cluster role, as the arbiter last saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteRole {
    pub url: String,
    /// `MASTER` or `BACKUP` as the remote reported it after the check
    /// (told so if it differed); `None`: down (no answer in time).
    pub state: Option<String>,
    /// When `state` last changed.
    pub since: Instant,
}

/// `--setRoles`: keeps one live remote MASTER and the others BACKUP.
struct Arbiter {
    clients: Vec<Client>,
    vip: Ipv4Addr,
    interval: Duration,
    /// The remote (index) made MASTER; `None` until the first check of a
    /// leader.
    master: Option<usize>,
    report: watch::Sender<Vec<RemoteRole>>,
}

impl Arbiter {
    async fn run(mut self, mut desired: watch::Receiver<Desired>) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                r = desired.changed() => if r.is_err() { return },
            }
            if !desired.borrow_and_update().leading {
                // The leader arbitrates; a new one starts from what the
                // remotes report.
                self.master = None;
                continue;
            }
            self.round().await;
        }
    }

    /// What a remote reports for [`ROLE_INSTANCE`]: `Ok(None)` when it
    /// holds no role yet; `Err` when it does not answer as it should.
    async fn read(c: &mut Client) -> Result<Option<String>> {
        let (st, body) = c
            .call(http::Method::GET, "/config/cistate/all", None)
            .await?;
        if st != 200 {
            anyhow::bail!("reading its role: {st} {}", message_of(&body));
        }
        #[derive(serde::Deserialize)]
        struct All {
            #[serde(rename = "Attr", default)]
            attr: Option<Vec<One>>,
        }
        #[derive(serde::Deserialize)]
        struct One {
            #[serde(default)]
            instance: String,
            #[serde(default)]
            state: String,
        }
        let all: All = serde_json::from_slice(&body).context("reading its role: bad JSON")?;
        Ok(all
            .attr
            .unwrap_or_default()
            .into_iter()
            .find(|o| o.instance == ROLE_INSTANCE)
            .map(|o| o.state.to_ascii_uppercase()))
    }

    async fn tell(c: &mut Client, state: &str, vip: Ipv4Addr) -> Result<()> {
        let body =
            serde_json::json!({"instance": ROLE_INSTANCE, "state": state, "vip": vip.to_string()});
        let (st, resp) = c
            .call(
                http::Method::POST,
                "/config/cistate",
                Some(Bytes::from(body.to_string())),
            )
            .await?;
        if !(200..300).contains(&st) {
            anyhow::bail!("setting its role {state}: {st} {}", message_of(&resp));
        }
        Ok(())
    }

    /// One check of every remote, and the roles set where they differ.
    async fn round(&mut self) {
        let seen: Vec<Result<Option<String>>> =
            futures::future::join_all(self.clients.iter_mut().map(Self::read)).await;
        let live = |i: usize| seen[i].is_ok();
        let master = match self.master {
            Some(m) if live(m) => Some(m),
            _ => {
                // Keep a remote that already is MASTER (a new leader, a
                // restart of this agent); else the first live one.
                let reported =
                    (0..seen.len()).find(|&i| matches!(&seen[i], Ok(Some(s)) if s == "MASTER"));
                let pick = reported.or_else(|| (0..seen.len()).find(|&i| live(i)));
                if pick != self.master {
                    match pick {
                        Some(i) => info!(
                            remote = %self.clients[i].remote.url,
                            previous = ?self.master.map(|m| self.clients[m].remote.url.clone()),
                            "--setRoles: MASTER"
                        ),
                        None => warn!("--setRoles: no remote answers; no MASTER"),
                    }
                }
                pick
            }
        };
        self.master = master;
        let mut now: Vec<Option<String>> = Vec::with_capacity(seen.len());
        for (i, r) in seen.into_iter().enumerate() {
            let c = &mut self.clients[i];
            let state = match r {
                Err(e) => {
                    debug!(remote = %c.remote.url, "role check: {e:#}");
                    None
                }
                Ok(have) => {
                    let want = if Some(i) == master {
                        "MASTER"
                    } else {
                        "BACKUP"
                    };
                    if have.as_deref() == Some(want) {
                        Some(want.to_string())
                    } else {
                        match Self::tell(c, want, self.vip).await {
                            Ok(()) => {
                                info!(remote = %c.remote.url, was = ?have, "--setRoles: told {want}");
                                Some(want.to_string())
                            }
                            Err(e) => {
                                warn!(remote = %c.remote.url, "{e:#}; retried in the next check");
                                have
                            }
                        }
                    }
                }
            };
            now.push(state);
        }
        let t = Instant::now();
        self.report.send_modify(|rep| {
            for (r, s) in rep.iter_mut().zip(now) {
                if r.state != s {
                    r.state = s;
                    r.since = t;
                }
            }
        });
    }
}

/// The controller's [`RuleSink`] over remote agents.
pub struct RemoteSink {
    desired: watch::Sender<Desired>,
    status: Vec<(String, watch::Receiver<Status>)>,
    /// Rule key -> its Service and kube rule name (for refusals).
    names: BTreeMap<Key, (ServiceKey, String)>,
    opts: Arc<Options>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// The arbiter's report (`--setRoles`; empty without).
    roles: watch::Receiver<Vec<RemoteRole>>,
}

impl Drop for RemoteSink {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl RemoteSink {
    /// A worker per remote (in the current tokio runtime, which must be
    /// multi-threaded: the sink's calls wait for the workers).
    pub fn start(remotes: Vec<Remote>, opts: Options) -> Result<Self> {
        if remotes.is_empty() {
            anyhow::bail!("--loxiURL: no URL");
        }
        let tls = match &opts.ca_file {
            Some(ca) => Some(Arc::new(tls_config(ca)?)),
            None => None,
        };
        let opts = Arc::new(opts);
        let (desired, rx) = watch::channel(Desired::default());
        let mut status = vec![];
        let mut workers = vec![];
        for r in remotes {
            let client = Client::new(r.clone(), tls.clone(), &opts)?;
            let (tx, srx) = watch::channel(Status::default());
            status.push((r.url.clone(), srx));
            workers.push(Worker {
                client,
                opts: opts.clone(),
                known: None,
                refused: BTreeMap::new(),
                status: tx,
            });
        }
        let (roles_tx, roles) = watch::channel(vec![]);
        let arbiter = match opts.roles {
            None => None,
            Some(vip) => {
                let t = Instant::now();
                roles_tx.send_replace(
                    workers
                        .iter()
                        .map(|w| RemoteRole {
                            url: w.client.remote.url.clone(),
                            state: None,
                            since: t,
                        })
                        .collect(),
                );
                // Its own connections, with the role check's timeout.
                let role_opts = Options {
                    request_timeout: opts.role_timeout,
                    ..(*opts).clone()
                };
                let clients = workers
                    .iter()
                    .map(|w| Client::new(w.client.remote.clone(), tls.clone(), &role_opts))
                    .collect::<Result<Vec<_>>>()?;
                Some(Arbiter {
                    clients,
                    vip,
                    interval: opts.role_interval,
                    master: None,
                    report: roles_tx,
                })
            }
        };
        let mut tasks: Vec<_> = workers
            .into_iter()
            .map(|w| tokio::spawn(w.run(rx.clone())))
            .collect();
        if let Some(a) = arbiter {
            tasks.push(tokio::spawn(a.run(rx.clone())));
        }
        Ok(RemoteSink {
            desired,
            status,
            names: BTreeMap::new(),
            opts,
            tasks,
            roles,
        })
    }

    /// Each remote's role as the arbiter last saw it (`--setRoles`; empty
    /// without it or before the first check of a leader).
    pub fn roles(&self) -> Vec<RemoteRole> {
        self.roles.borrow().clone()
    }

    /// Wait (up to `opts.wait`) until every remote carried out `gen` or is
    /// down; their reports.
    fn wait_for(&self, gen: u64) -> Result<Vec<(String, Status)>> {
        let mut rx: Vec<(String, watch::Receiver<Status>)> = self.status.clone();
        let deadline = tokio::time::Instant::now() + self.opts.wait;
        let fut = async move {
            for (_, r) in rx.iter_mut() {
                let _ = tokio::time::timeout_at(
                    deadline,
                    r.wait_for(|s| s.gen >= gen || matches!(s.state, State::Down(_))),
                )
                .await;
            }
            rx.iter()
                .map(|(u, r)| (u.clone(), r.borrow().clone()))
                .collect::<Vec<_>>()
        };
        let h = tokio::runtime::Handle::try_current()
            .context("the remote sink runs inside a tokio runtime")?;
        if h.runtime_flavor() != tokio::runtime::RuntimeFlavor::MultiThread {
            anyhow::bail!("the remote sink needs a multi-threaded tokio runtime");
        }
        Ok(tokio::task::block_in_place(|| h.block_on(fut)))
    }
}

impl RuleSink for RemoteSink {
    fn apply(&mut self, rules: Vec<KubeRule>) -> Result<Applied> {
        let mut applied = Applied::default();
        let mut want = BTreeMap::new();
        self.names.clear();
        for r in &rules {
            let k = (r.rule.vip, r.rule.port, r.rule.protocol);
            match to_api(r, self.opts.bgp) {
                Ok(a) => {
                    want.insert(k, a);
                    self.names
                        .insert(k, (r.service.clone(), r.rule.name.clone()));
                }
                Err(e) => applied.refused.push(Refused {
                    service: r.service.clone(),
                    rule: r.rule.name.clone(),
                    reason: e.reason,
                }),
            }
        }
        let mut gen = 0;
        let mut leading = false;
        self.desired.send_modify(|d| {
            d.gen += 1;
            d.rules = Arc::new(want);
            gen = d.gen;
            leading = d.leading;
        });
        if !leading {
            return Ok(applied);
        }
        let reports = self.wait_for(gen)?;
        let mut by_key: BTreeMap<Key, Vec<String>> = BTreeMap::new();
        let (mut done, mut down) = (0, vec![]);
        for (url, s) in &reports {
            if s.gen >= gen && s.state == State::Up {
                done += 1;
                for (k, m) in s.refused.iter() {
                    by_key
                        .entry(*k)
                        .or_default()
                        .push(format!("{url} refused it: {m}"));
                }
            } else if let State::Down(e) = &s.state {
                down.push(format!("{url}: {e}"));
            }
        }
        if done == 0 && down.len() == reports.len() {
            anyhow::bail!(
                "no loxilb API is reachable ({}); retrying (each remote is re-synced once it \
                 answers)",
                down.join("; ")
            );
        }
        if done < reports.len() {
            info!(
                done,
                remotes = reports.len(),
                "not every remote has the rules yet (down or still programming); they get them \
                 as they can"
            );
        }
        for (k, reasons) in by_key {
            if let Some((service, rule)) = self.names.get(&k) {
                applied.refused.push(Refused {
                    service: service.clone(),
                    rule: rule.clone(),
                    reason: reasons.join("; "),
                });
            }
        }
        Ok(applied)
    }

    fn own_vips(&mut self, vips: Vec<IpAddr>) -> Result<()> {
        // The remotes answer for the VIPs; nothing goes on this node.
        debug!(?vips, "VIPs served by the remote load balancers");
        Ok(())
    }

    fn leading(&mut self, leader: bool) {
        info!(
            leader,
            "{}",
            if leader {
                "leading: programming the remote load balancers"
            } else {
                "following: the leader programs the remote load balancers"
            }
        );
        self.desired.send_modify(|d| {
            d.gen += 1;
            d.leading = leader;
        });
    }
}

#[cfg(test)]
mod tests;
