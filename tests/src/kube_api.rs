//! The real agent in `kube` mode against kube-watch's in-memory Kubernetes
//! API double (`kube-watch/tests/fake_api`, included as is), served over
//! HTTP/1.1.
//!
//! How the agent reaches the API: [`ApiServer::listen`] binds a TCP
//! listener on `127.0.0.1` from a thread that has entered the agent's
//! network namespace (a socket stays in the namespace it was created in),
//! and [`write_kubeconfig`] points a kubeconfig (`http://127.0.0.1:PORT`,
//! no credentials) at it; the agent finds it through `KUBECONFIG`
//! (`kube::Client::try_default`). Every agent start gets a listener of its
//! own, and every request that arrives on it is handed to
//! [`FakeApi::handle`] under that listener's label (e.g. `node-a#2`, the
//! second start of node-a's agent): the API's request log tells the agents
//! (and their restarts) apart.
//!
//! The HTTP side is deliberately small: requests with a `Content-Length`
//! body (what kube's client sends), responses always sent chunked, one
//! chunk per body frame, so a watch streams its events as they happen.
//! The accept loops and connections run on a runtime owned by the
//! [`ApiServer`]; dropping it closes them all.

#[path = "../../kube-watch/tests/fake_api/mod.rs"]
pub mod fake_api;

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub use fake_api::{FakeApi, Logged};

use crate::netns::{agent_bin, agent_cli, terminate, Netns, Topology};

/// The fake API served over HTTP, on listeners inside network namespaces.
pub struct ApiServer {
    pub api: FakeApi,
    rt: Option<tokio::runtime::Runtime>,
    /// What went wrong serving (a handler that panicked, a request the
    /// server could not read): a test checks this is empty.
    errors: Arc<Mutex<Vec<String>>>,
}

impl Default for ApiServer {
    fn default() -> Self {
        Self::new()
    }
}

impl ApiServer {
    pub fn new() -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        ApiServer {
            api: FakeApi::new(),
            rt: Some(rt),
            errors: Default::default(),
        }
    }

    /// Listen on `127.0.0.1` (a free port) inside `ns`; requests arriving
    /// there are logged as sent by `agent`. Returns the port.
    pub fn listen(&self, ns: &Netns, agent: &str) -> Result<u16> {
        let l = ns
            .run(|| -> std::io::Result<std::net::TcpListener> {
                let l = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
                l.set_nonblocking(true)?;
                Ok(l)
            })
            .with_context(|| format!("listening in {}", ns.name))?;
        let port = l.local_addr()?.port();
        let rt = self.rt.as_ref().unwrap();
        let l = {
            let _g = rt.enter();
            tokio::net::TcpListener::from_std(l)?
        };
        let (api, errors, agent) = (
            self.api.clone(),
            self.errors.clone(),
            Arc::<str>::from(agent),
        );
        rt.spawn(async move {
            loop {
                let Ok((s, _)) = l.accept().await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let (api, errors, agent) = (api.clone(), errors.clone(), agent.clone());
                tokio::spawn(async move {
                    match serve_conn(&api, &agent, s, &errors).await {
                        // A client killed with unread data on its socket
                        // (a watch event in flight) resets the connection:
                        // its going away, not an error of the API.
                        Err(e) if peer_went_away(&e) => {}
                        Err(e) => errors.lock().unwrap().push(format!("{agent}: {e:#}")),
                        Ok(()) => {}
                    }
                });
            }
        });
        Ok(port)
    }

    pub fn errors(&self) -> Vec<String> {
        self.errors.lock().unwrap().clone()
    }

    /// The request log (every request, with the label of the listener it
    /// came in on).
    pub fn log(&self) -> Vec<Logged> {
        self.api.with(|s| s.log.clone())
    }

    /// How many requests came from `agent`.
    pub fn requests_from(&self, agent: &str) -> usize {
        self.api
            .with(|s| s.log.iter().filter(|l| l.agent == agent).count())
    }

    /// How many Lease requests came from `agent`.
    pub fn lease_requests_from(&self, agent: &str) -> usize {
        self.api.with(|s| {
            s.log
                .iter()
                .filter(|l| l.agent == agent && l.path.contains("/leases"))
                .count()
        })
    }

    /// The holder of the agents' Lease (kube-system/loxilb-agent).
    pub fn lease_holder(&self) -> Option<String> {
        self.api
            .with(|s| s.get("leases", "kube-system", "loxilb-agent"))
            .and_then(|l| l["spec"]["holderIdentity"].as_str().map(String::from))
    }

    /// The IPs in a Service's `status.loadBalancer.ingress`.
    pub fn ingress(&self, name: &str) -> Vec<String> {
        self.api
            .with(|s| s.get("services", "default", name))
            .and_then(|s| s["status"]["loadBalancer"]["ingress"].as_array().cloned())
            .unwrap_or_default()
            .iter()
            .filter_map(|i| i["ip"].as_str().map(String::from))
            .collect()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// The connection was reset or cut by the peer (a killed agent).
fn peer_went_away(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>().is_some_and(|io| {
            matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::ConnectionAborted
            )
        })
    })
}

/// Serve HTTP/1.1 requests on one connection until the peer closes it.
async fn serve_conn(
    api: &FakeApi,
    agent: &Arc<str>,
    mut s: tokio::net::TcpStream,
    errors: &Arc<Mutex<Vec<String>>>,
) -> Result<()> {
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let Some(req) = read_request(&mut s, &mut buf).await? else {
            return Ok(());
        };
        let what = format!("{} {}", req.method(), req.uri());
        let (api2, agent2) = (api.clone(), agent.clone());
        // A handler that panics (an assertion of the double) answers 500
        // and is reported; it does not take the server down.
        let resp = match tokio::spawn(async move { api2.handle(&agent2, req).await }).await {
            Ok(r) => r,
            Err(e) => {
                let msg = match e.try_into_panic() {
                    Ok(p) => p
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default(),
                    Err(e) => e.to_string(),
                };
                errors
                    .lock()
                    .unwrap()
                    .push(format!("{agent}: {what}: the fake API panicked: {msg}"));
                http::Response::builder()
                    .status(500)
                    .body(
                        http_body_util::Full::new(bytes::Bytes::from_static(b"{}")).boxed_unsync(),
                    )
                    .unwrap()
            }
        };
        if !write_response(&mut s, &mut buf, resp).await? {
            return Ok(());
        }
    }
}

/// Read one request (headers and a `Content-Length` body); `None` when the
/// peer closed the connection between requests.
async fn read_request(
    s: &mut tokio::net::TcpStream,
    buf: &mut Vec<u8>,
) -> Result<Option<http::Request<kube::client::Body>>> {
    loop {
        if !buf.is_empty() {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut r = httparse::Request::new(&mut headers);
            if let httparse::Status::Complete(n) = r.parse(buf)? {
                let mut b = http::Request::builder()
                    .method(r.method.unwrap_or("GET"))
                    .uri(r.path.unwrap_or("/"));
                let mut len = 0usize;
                for h in r.headers.iter() {
                    if h.name.eq_ignore_ascii_case("content-length") {
                        len = std::str::from_utf8(h.value)?.trim().parse()?;
                    }
                    if h.name.eq_ignore_ascii_case("transfer-encoding") {
                        bail!("chunked request bodies are not supported");
                    }
                    b = b.header(h.name, h.value);
                }
                buf.drain(..n);
                while buf.len() < len {
                    read_more(s, buf)
                        .await?
                        .then_some(())
                        .context("connection closed inside a request body")?;
                }
                let body: Vec<u8> = buf.drain(..len).collect();
                return Ok(Some(b.body(kube::client::Body::from(body))?));
            }
        }
        if !read_more(s, buf).await? {
            if buf.is_empty() {
                return Ok(None);
            }
            bail!("connection closed inside a request head");
        }
    }
}

/// Append what the socket has; false at end of stream.
async fn read_more(s: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> Result<bool> {
    let mut tmp = [0u8; 16384];
    let n = s.read(&mut tmp).await?;
    buf.extend_from_slice(&tmp[..n]);
    Ok(n > 0)
}

/// Send the response, chunked (a watch streams until the peer goes away).
/// False when the peer closed the connection.
async fn write_response(
    s: &mut tokio::net::TcpStream,
    buf: &mut Vec<u8>,
    resp: http::Response<fake_api::RespBody>,
) -> Result<bool> {
    let (parts, mut body) = resp.into_parts();
    let mut head = format!(
        "HTTP/1.1 {} {}\r\n",
        parts.status.as_u16(),
        parts.status.canonical_reason().unwrap_or("")
    );
    for (k, v) in parts.headers.iter() {
        if k != http::header::CONTENT_LENGTH && k != http::header::TRANSFER_ENCODING {
            head.push_str(&format!("{k}: {}\r\n", v.to_str()?));
        }
    }
    head.push_str("transfer-encoding: chunked\r\n\r\n");
    if s.write_all(head.as_bytes()).await.is_err() {
        return Ok(false);
    }
    loop {
        let frame = tokio::select! {
            f = body.frame() => f,
            // The client sends nothing while a response is open: a read
            // that ends the stream means it went away (a watch ends so).
            more = read_more(s, buf) => {
                if !more.unwrap_or(false) {
                    return Ok(false);
                }
                continue;
            }
        };
        let Some(frame) = frame else { break };
        let Ok(data) = frame.unwrap_or_else(|e| match e {}).into_data() else {
            continue;
        };
        if data.is_empty() {
            continue;
        }
        let mut chunk = format!("{:x}\r\n", data.len()).into_bytes();
        chunk.extend_from_slice(&data);
        chunk.extend_from_slice(b"\r\n");
        if s.write_all(&chunk).await.is_err() {
            return Ok(false);
        }
    }
    Ok(s.write_all(b"0\r\n\r\n").await.is_ok())
}

/// A kubeconfig naming `http://127.0.0.1:port` (no credentials).
pub fn write_kubeconfig(path: &Path, port: u16) -> Result<()> {
    std::fs::write(
        path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://127.0.0.1:{port}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\ncurrent-context: fake\nusers:\n- name: fake\n  user: {{}}\n"
        ),
    )
    .with_context(|| format!("writing {}", path.display()))
}

/// A LoadBalancer Service of ours: TCP `port` to target port 8080.
pub fn service(name: &str, port: u16) -> Value {
    json!({
        "metadata": {"namespace": "default", "name": name, "generation": 1, "annotations": {}},
        "spec": {"type": "LoadBalancer", "loadBalancerClass": "loxilb.io/loxilb",
                 "ports": [{"name": "p", "port": port, "targetPort": 8080,
                            "nodePort": 30000 + (port % 1000), "protocol": "TCP"}]},
    })
}

/// The Service's EndpointSlice: ready pods at `ips`, port 8080.
pub fn endpoint_slice(service: &str, ips: &[Ipv4Addr]) -> Value {
    let eps: Vec<Value> = ips
        .iter()
        .map(|ip| json!({"addresses": [ip.to_string()], "conditions": {"ready": true}}))
        .collect();
    json!({
        "metadata": {"namespace": "default", "name": format!("{service}-1"),
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": "p", "port": 8080, "protocol": "TCP"}],
        "endpoints": eps,
    })
}

/// A ready Node.
pub fn node(name: &str, addr: &str) -> Value {
    json!({
        "metadata": {"name": name},
        "status": {"addresses": [{"type": "InternalIP", "address": addr}],
                   "conditions": [{"type": "Ready", "status": "True"}]},
    })
}

/// The IPv4 addresses on `lo` in `ns`, besides 127.0.0.1.
pub fn lo_addrs(ns: &Netns) -> Vec<String> {
    ns.sh(&["ip", "-4", "-o", "addr", "show", "dev", "lo"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            w.find(|x| *x == "inet")?;
            let a = w.next()?.split('/').next()?.to_string();
            (a != "127.0.0.1").then_some(a)
        })
        .collect()
}

/// Poll `f` every 100 ms until it holds; fail after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !f() {
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for: {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Remove ANSI escape sequences (colours of the agent's log).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        if c == '\x1b' {
            if it.peek() == Some(&'[') {
                it.next();
                for c in it.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// A `key=value` field of a log line (tracing's format); a value in
/// brackets is taken whole.
pub fn log_field(line: &str, key: &str) -> Option<String> {
    let pat = format!(" {key}=");
    let start = line.find(&pat)? + pat.len();
    let rest = &line[start..];
    if rest.starts_with('[') {
        let mut depth = 0;
        for (i, c) in rest.char_indices() {
            match c {
                '[' => depth += 1,
                ']' => {
                    depth -= 1;
                    if depth == 0 {
                        return Some(rest[..=i].to_string());
                    }
                }
                _ => {}
            }
        }
        Some(rest.to_string())
    } else {
        Some(rest.split_whitespace().next().unwrap_or("").to_string())
    }
}

/// How to start one agent in `kube` mode.
#[derive(Clone, Debug)]
pub struct KubeAgentSpec {
    /// NODE_NAME (and POD_NAME: the Lease identity).
    pub node: String,
    /// The label of this start in the API's request log and the log file's
    /// name (e.g. `node-a#2`).
    pub label: String,
    /// `--cidrPools`.
    pub pools: String,
    /// More arguments of `kube` (e.g. `--keep`).
    pub extra: Vec<String>,
}

impl KubeAgentSpec {
    pub fn new(node: &str, label: &str, pools: &str) -> Self {
        KubeAgentSpec {
            node: node.into(),
            label: label.into(),
            pools: pools.into(),
            extra: vec![],
        }
    }

    pub fn arg(mut self, a: &str) -> Self {
        self.extra.push(a.into());
        self
    }
}

/// The real agent in `kube` mode in a topology's LB namespace, with a
/// listener of the fake API of its own; SIGTERM (then SIGKILL) on drop.
pub struct KubeAgent {
    child: Option<Child>,
    pub log: PathBuf,
    pub label: String,
    pin_dir: PathBuf,
    kubeconfig: PathBuf,
}

/// What the agent logs once it serves the Services.
pub const SERVING: &str = "serving Kubernetes LoadBalancer Services";
/// What the agent logs when it installed the whole set of rules.
pub const WHOLE_SET: &str = "Kubernetes rules applied (whole set)";

impl KubeAgent {
    pub fn start(t: &Topology, api: &ApiServer, spec: &KubeAgentSpec) -> Result<Self> {
        Self::start_in(&t.lb, &t.lb_ifaces(), t.pin_dir(), &t.prefix, api, spec)
    }

    /// [`KubeAgent::start`] in any namespace `ns`, attached to `ifaces`,
    /// pinning in `pin`; `prefix` names its temporary files.
    pub fn start_in(
        ns: &Netns,
        ifaces: &[String],
        pin: PathBuf,
        prefix: &str,
        api: &ApiServer,
        spec: &KubeAgentSpec,
    ) -> Result<Self> {
        let port = api.listen(ns, &spec.label)?;
        let safe: String = spec
            .label
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        let kubeconfig = std::env::temp_dir().join(format!("{prefix}-{safe}.kubeconfig"));
        write_kubeconfig(&kubeconfig, port)?;
        let log = std::env::temp_dir().join(format!("{prefix}-{safe}-agent.log"));
        let logf = std::fs::File::create(&log)?;
        // nsenter, not `ip netns exec`: the latter remounts /sys, which
        // hides the host's bpffs at /sys/fs/bpf.
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/var/run/netns/{}", ns.name))
            .arg(agent_bin())
            .arg("--pin-dir")
            .arg(&pin)
            .arg("kube");
        for i in ifaces {
            cmd.args(["--iface", i]);
        }
        cmd.arg(format!("--cidrPools={}", spec.pools))
            .arg("--usePodNetwork=true")
            .args(&spec.extra);
        for k in [
            "http_proxy",
            "https_proxy",
            "all_proxy",
            "HTTP_PROXY",
            "HTTPS_PROXY",
            "ALL_PROXY",
            "KUBERNETES_SERVICE_HOST",
            "KUBERNETES_SERVICE_PORT",
        ] {
            cmd.env_remove(k);
        }
        cmd.env("KUBECONFIG", &kubeconfig)
            .env("NODE_NAME", &spec.node)
            .env("POD_NAME", &spec.node)
            .env("POD_NAMESPACE", "kube-system")
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1");
        let child = cmd
            .stdout(logf.try_clone()?)
            .stderr(logf)
            .stdin(Stdio::null())
            .spawn()?;
        let mut a = KubeAgent {
            child: Some(child),
            log,
            label: spec.label.clone(),
            pin_dir: pin,
            kubeconfig,
        };
        a.wait_for_log(SERVING, Duration::from_secs(30))?;
        Ok(a)
    }

    /// This agent's output, without colours.
    pub fn log_text(&self) -> String {
        strip_ansi(&std::fs::read_to_string(&self.log).unwrap_or_default())
    }

    /// The lines of the log that contain `needle`.
    pub fn log_lines(&self, needle: &str) -> Vec<String> {
        self.log_text()
            .lines()
            .filter(|l| l.contains(needle))
            .map(String::from)
            .collect()
    }

    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.log_text();
            if text.contains(needle) {
                return Ok(());
            }
            if let Some(c) = self.child.as_mut() {
                if let Some(st) = c.try_wait()? {
                    bail!(
                        "agent {} exited ({st}) before logging {needle:?}:\n{text}",
                        self.label
                    );
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "agent {} did not log {needle:?} within {timeout:?}:\n{text}",
                    self.label
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether the process still runs.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGTERM and wait (at most 15 s) for the exit; its status.
    pub fn stop(&mut self) -> Result<ExitStatus> {
        let Some(mut c) = self.child.take() else {
            bail!("agent {} is not running", self.label);
        };
        // nsenter execs the agent: the pid is the agent's.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(st) = c.try_wait()? {
                return Ok(st);
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                bail!(
                    "agent {} did not exit within 15 s of SIGTERM:\n{}",
                    self.label,
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL (a crash: nothing cleaned up) and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Run an agent CLI subcommand against this agent's pinned maps.
    pub fn cli(&self, sub: &str) -> Result<String> {
        agent_cli(&self.pin_dir, sub)
    }

    /// The client's socket, as the session table prints it, is there.
    pub fn has_session_of(&self, client: SocketAddr) -> Result<bool> {
        Ok(self.cli("sessions")?.contains(&client.to_string()))
    }
}

impl Drop for KubeAgent {
    fn drop(&mut self) {
        if let Some(c) = self.child.take() {
            terminate(c);
        }
        let _ = std::fs::remove_file(&self.kubeconfig);
    }
}

/// Checks that do not stop the test: each failure is recorded (with what
/// the test was doing) and [`Checks::finish`] fails the test with all of
/// them, so one run reports every wrong behaviour, not just the first.
#[derive(Default)]
pub struct Checks {
    failed: Vec<String>,
}

impl Checks {
    pub fn check(&mut self, ok: bool, what: impl FnOnce() -> String) {
        if !ok {
            let w = what();
            eprintln!("CHECK FAILED: {w}");
            self.failed.push(w);
        }
    }

    #[track_caller]
    pub fn finish(self, test: &str) {
        assert!(
            self.failed.is_empty(),
            "{test}: {} check(s) failed:\n- {}",
            self.failed.len(),
            self.failed.join("\n- ")
        );
    }
}
