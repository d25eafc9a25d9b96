//! Network namespaces joined by veth, with real TCP/UDP servers, that clean
//! up after themselves (also when a test panics: everything is a guard).

use std::{
    collections::BTreeSet,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

/// Run a command; fail with its stderr.
pub fn sh(args: &[&str]) -> Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("running {args:?}"))?;
    if !out.status.success() {
        bail!(
            "{args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Run a command inside namespace `ns`.
pub fn ns_sh(ns: &str, args: &[&str]) -> Result<String> {
    let mut v = vec!["ip", "netns", "exec", ns];
    v.extend_from_slice(args);
    sh(&v)
}

/// A named network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

/// The namespace names live in this process. All integration tests are
/// one binary whose tests run in parallel threads, and [`Netns::new`]
/// deletes a leftover namespace of the same name first: a name two tests
/// share would pull one test's namespace from under the other. So a name
/// in use is refused, naming the fix.
static LIVE: std::sync::Mutex<std::collections::BTreeSet<String>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());

impl Netns {
    pub fn new(name: &str) -> Result<Self> {
        if !LIVE
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string())
        {
            bail!(
                "network namespace {name} is in use by another test of this process: give each \
                 test a namespace prefix of its own (the pin directory, logs and state are named \
                 after it too)"
            );
        }
        let ns = Netns {
            name: name.to_string(),
        };
        let _ = sh(&["ip", "netns", "del", name]);
        sh(&["ip", "netns", "add", name])?;
        ns.sh(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn sh(&self, args: &[&str]) -> Result<String> {
        ns_sh(&self.name, args)
    }

    /// Run `f` on a thread that lives in this namespace (sockets it creates
    /// belong to the namespace and stay usable from any thread).
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            enter(&path).expect("setns");
            f()
        })
        .join()
        .expect("thread in netns panicked")
    }

    /// Spawn a long-running thread inside this namespace.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> JoinHandle<T> {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            enter(&path).expect("setns");
            f()
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = sh(&["ip", "netns", "del", &self.name]);
        LIVE.lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.name);
    }
}

/// Move the calling thread into the network namespace at `path`.
pub fn enter(path: &str) -> Result<()> {
    let f = std::fs::File::open(path).with_context(|| format!("open {path}"))?;
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns {path}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// The demo/test topology:
///
/// ```text
///  client ns            lb ns                      backend ns i
///  c0 10.X.0.2/24 ---- lbc 10.X.0.1/24
///                      lbbI 10.X.I.1/24 ---- b0 10.X.I.2/24
///  route VIP via 10.X.0.1                    default via 10.X.I.1
/// ```
pub struct Topology {
    pub prefix: String,
    pub client: Netns,
    pub lb: Netns,
    pub backends: Vec<Netns>,
    pub net: u8,
}

pub const VIP: &str = "20.0.0.100";
/// The IPv6 service prefix the client routes to the load balancer
/// (`fd00:20::/64`), and its first VIP.
pub const VIP6: &str = "fd00:20::100";

impl Topology {
    pub fn new(prefix: &str, n_backends: usize) -> Result<Self> {
        let net = 10u8;
        let client = Netns::new(&format!("{prefix}-c"))?;
        let lb = Netns::new(&format!("{prefix}-lb"))?;
        let mut backends = vec![];
        for i in 1..=n_backends {
            backends.push(Netns::new(&format!("{prefix}-b{i}"))?);
        }
        let t = Topology {
            prefix: prefix.to_string(),
            client,
            lb,
            backends,
            net,
        };
        t.link(&t.client, "c0", "lbc", 0)?;
        t.client.sh(&[
            "ip",
            "route",
            "add",
            &format!("{VIP}/32"),
            "via",
            &format!("10.{net}.0.1"),
        ])?;
        t.client.sh(&[
            "ip",
            "-6",
            "route",
            "add",
            "fd00:20::/64",
            "via",
            &format!("fd00:{net}:0::1"),
        ])?;
        for (i, b) in t.backends.iter().enumerate() {
            let i = i + 1;
            t.link(b, "b0", &format!("lbb{i}"), i as u8)?;
            b.sh(&[
                "ip",
                "route",
                "add",
                "default",
                "via",
                &format!("10.{net}.{i}.1"),
            ])?;
            b.sh(&[
                "ip",
                "-6",
                "route",
                "add",
                "default",
                "via",
                &format!("fd00:{net}:{i}::1"),
            ])?;
        }
        for (k, v) in [
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
            ("net.ipv6.conf.all.forwarding", "1"),
        ] {
            t.lb.sh(&["sysctl", "-qw", &format!("{k}={v}")])?;
        }
        Ok(t)
    }

    /// veth `outer` (in `ns`) <-> `inner` (in the lb ns), subnets
    /// 10.net.idx.0/24 and fd00:net:idx::/64 (`.2`/`::2` outside).
    fn link(&self, ns: &Netns, outer: &str, inner: &str, idx: u8) -> Result<()> {
        let net = self.net;
        let tmp = format!("{}{}", self.prefix, inner);
        let tmp = &tmp[tmp.len().saturating_sub(15)..];
        self.lb.sh(&[
            "ip", "link", "add", inner, "type", "veth", "peer", "name", tmp,
        ])?;
        self.lb.sh(&["ip", "link", "set", tmp, "netns", &ns.name])?;
        ns.sh(&["ip", "link", "set", tmp, "name", outer])?;
        ns.sh(&[
            "ip",
            "addr",
            "add",
            &format!("10.{net}.{idx}.2/24"),
            "dev",
            outer,
        ])?;
        ns.sh(&[
            "ip",
            "addr",
            "add",
            &format!("fd00:{net}:{idx}::2/64"),
            "dev",
            outer,
            "nodad",
        ])?;
        ns.sh(&["ip", "link", "set", outer, "up"])?;
        // Senders compute full checksums (no CHECKSUM_PARTIAL reaching
        // XDP); GRO gives the veth a NAPI context so native XDP redirect
        // can deliver into it.
        ns.sh(&["ethtool", "-K", outer, "tx", "off", "gro", "on"])?;
        self.lb.sh(&[
            "ip",
            "addr",
            "add",
            &format!("10.{net}.{idx}.1/24"),
            "dev",
            inner,
        ])?;
        self.lb.sh(&[
            "ip",
            "addr",
            "add",
            &format!("fd00:{net}:{idx}::1/64"),
            "dev",
            inner,
            "nodad",
        ])?;
        self.lb.sh(&["ip", "link", "set", inner, "up"])?;
        self.lb
            .sh(&["ethtool", "-K", inner, "tx", "off", "gro", "on"])?;
        Ok(())
    }

    /// Route `cidr` (e.g. an address pool) from the client via the load
    /// balancer.
    pub fn route_from_client(&self, cidr: &str) -> Result<()> {
        let via = format!("10.{}.0.1", self.net);
        self.client.sh(&["ip", "route", "add", cidr, "via", &via])?;
        Ok(())
    }

    pub fn client_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, self.net, 0, 2)
    }

    pub fn backend_ip(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, self.net, i as u8, 2)
    }

    pub fn client_ip6(&self) -> std::net::Ipv6Addr {
        format!("fd00:{}:0::2", self.net).parse().unwrap()
    }

    pub fn backend_ip6(&self, i: usize) -> std::net::Ipv6Addr {
        format!("fd00:{}:{i}::2", self.net).parse().unwrap()
    }

    pub fn lb_ifaces(&self) -> Vec<String> {
        let mut v = vec!["lbc".to_string()];
        for i in 1..=self.backends.len() {
            v.push(format!("lbb{i}"));
        }
        v
    }

    pub fn pin_dir(&self) -> PathBuf {
        PathBuf::from(format!("/sys/fs/bpf/loxilb-{}", self.prefix))
    }
}

/// Real TCP and UDP servers in a backend namespace. Every reply says which
/// backend answered and the client address the backend saw:
/// `backend=<name> client=<ip>:<port> echo=<request>`.
pub struct Servers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Servers {
    pub fn start(ns: &Netns, name: &str, tcp_port: u16, udp_port: u16) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let mut threads = vec![];
        // One socket per family: IPv6 sockets here take IPv6 only.
        ns.sh(&["sysctl", "-qw", "net.ipv6.bindv6only=1"])?;
        for any in ["0.0.0.0", "::"] {
            let (stop_t, name_t, tx_t) = (stop.clone(), name.to_string(), tx.clone());
            threads.push(ns.spawn(move || {
                let (stop, name, tx) = (stop_t, name_t, tx_t);
                let l = TcpListener::bind((any, tcp_port)).expect("bind tcp");
                l.set_nonblocking(true).unwrap();
                tx.send(()).unwrap();
                while !stop.load(Ordering::Relaxed) {
                    match l.accept() {
                        Ok((s, peer)) => {
                            let (stop, name) = (stop.clone(), name.clone());
                            std::thread::spawn(move || serve_tcp(s, peer, &name, &stop));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
            }));
            let (stop_u, name_u, tx_u) = (stop.clone(), name.to_string(), tx.clone());
            threads.push(ns.spawn(move || {
                let (stop, name, tx) = (stop_u, name_u, tx_u);
                let u = UdpSocket::bind((any, udp_port)).expect("bind udp");
                u.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
                tx.send(()).unwrap();
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((n, peer)) = u.recv_from(&mut buf) {
                        let req = String::from_utf8_lossy(&buf[..n]).trim().to_string();
                        let r = format!("backend={name} client={peer} echo={req}\n");
                        let _ = u.send_to(r.as_bytes(), peer);
                    }
                }
            }));
        }
        for _ in 0..threads.len() {
            rx.recv_timeout(Duration::from_secs(5))?;
        }
        Ok(Servers { stop, threads })
    }
}

fn serve_tcp(mut s: TcpStream, peer: SocketAddr, name: &str, stop: &AtomicBool) {
    let _ = s.set_nonblocking(false);
    let _ = s.set_read_timeout(Some(Duration::from_millis(100)));
    let mut buf = [0u8; 4096];
    let mut pending = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                pending.extend_from_slice(&buf[..n]);
                while let Some(pos) = pending.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=pos).collect();
                    let req = String::from_utf8_lossy(&line).trim().to_string();
                    let r = format!("backend={name} client={peer} echo={req}\n");
                    if s.write_all(r.as_bytes()).is_err() {
                        return;
                    }
                }
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return,
        }
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A parsed server reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub backend: String,
    pub client: SocketAddr,
    pub echo: String,
}

pub fn parse_reply(line: &str) -> Result<Reply> {
    let mut backend = None;
    let mut client = None;
    let mut echo = None;
    for part in line.trim().split(' ') {
        if let Some(v) = part.strip_prefix("backend=") {
            backend = Some(v.to_string());
        } else if let Some(v) = part.strip_prefix("client=") {
            client = Some(v.parse()?);
        } else if let Some(v) = part.strip_prefix("echo=") {
            echo = Some(v.to_string());
        }
    }
    match (backend, client, echo) {
        (Some(backend), Some(client), Some(echo)) => Ok(Reply {
            backend,
            client,
            echo,
        }),
        _ => bail!("unexpected reply {line:?}"),
    }
}

/// A TCP connection opened from inside a namespace (line-oriented).
pub struct Conn {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    pub fn open(ns: &Netns, to: SocketAddr) -> Result<Self> {
        let s = ns
            .run(move || TcpStream::connect_timeout(&to, Duration::from_secs(3)))
            .with_context(|| format!("TCP connect to {to}"))?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        Ok(Conn { s, buf: vec![] })
    }

    /// A connection already made (e.g. from a thread inside a namespace).
    pub fn from_stream(s: TcpStream) -> Self {
        Conn { s, buf: vec![] }
    }

    /// How long [`Conn::ask`] waits for the answer (3 s by default).
    pub fn set_timeout(&mut self, d: Duration) -> Result<()> {
        self.s.set_read_timeout(Some(d))?;
        Ok(())
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.s.local_addr().unwrap()
    }

    /// Send one line, read one reply line.
    pub fn ask(&mut self, msg: &str) -> Result<Reply> {
        self.s.write_all(format!("{msg}\n").as_bytes())?;
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            if let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                return parse_reply(&String::from_utf8_lossy(&line));
            }
            if Instant::now() > deadline {
                bail!("no reply to {msg:?}");
            }
            let mut b = [0u8; 1024];
            let n = match self.s.read(&mut b) {
                // A read with a timeout returns EINTR after the process
                // was stopped and continued (signal(7)), handler or not.
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                r => r.context("reading the reply")?,
            };
            if n == 0 {
                bail!("connection closed before a reply to {msg:?}");
            }
            self.buf.extend_from_slice(&b[..n]);
        }
    }
}

/// One UDP request/response from inside a namespace (with retries: UDP).
pub fn udp_ask(ns: &Netns, to: SocketAddr, msg: &str) -> Result<Reply> {
    let msg = msg.to_string();
    ns.run(move || -> Result<Reply> {
        let u = UdpSocket::bind(if to.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" })?;
        u.set_read_timeout(Some(Duration::from_millis(700)))?;
        for _ in 0..4 {
            u.send_to(msg.as_bytes(), to)?;
            let mut b = [0u8; 2048];
            if let Ok((n, _)) = u.recv_from(&mut b) {
                return parse_reply(&String::from_utf8_lossy(&b[..n]));
            }
        }
        bail!("no UDP reply from {to}")
    })
}

/// A counter's value in `loxilb-agent stats` output (a line `name value`);
/// panics if the counter is not listed.
pub fn counter(stats: &str, name: &str) -> u64 {
    stats
        .lines()
        .find_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some(name)).then(|| w.last()).flatten()
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("counter {name} not in:\n{stats}"))
}

/// The agent binary built next to the test executables.
pub fn agent_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().unwrap().to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let p = dir.join("loxilb-agent");
    assert!(
        p.exists(),
        "{} not found: build it first (`cargo build -p loxilb-agent`)",
        p.display()
    );
    p
}

/// Run `name`, a binary of the tests crate built next to the agent
/// (`cargo build -p loxilb-tests --bins`), with `args`: its standard
/// output, once it has exited with success (else a panic showing both of
/// its outputs).
pub fn run_test_bin(name: &str, args: &[&str]) -> String {
    let bin = agent_bin().with_file_name(name);
    assert!(
        bin.exists(),
        "{} not found: build it first (cargo build -p loxilb-tests --bins)",
        bin.display()
    );
    let out = Command::new(&bin).args(args).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{name} failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// A running agent (in the lb namespace), killed on drop.
pub struct Agent {
    child: Option<Child>,
    pub log: PathBuf,
    pin_dir: PathBuf,
    /// Where this agent's output starts in the (shared, appended) log.
    offset: usize,
}

impl Agent {
    pub fn start(t: &Topology, config: &std::path::Path, extra: &[&str]) -> Result<Self> {
        let log = std::env::temp_dir().join(format!("{}-agent.log", t.prefix));
        if !t.pin_dir().exists() {
            // first agent of this test: start a fresh log
            let _ = std::fs::remove_file(&log);
        }
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let offset = logf.metadata()?.len() as usize;
        let bin = agent_bin();
        let pin = t.pin_dir();
        // nsenter, not `ip netns exec`: the latter remounts /sys, which
        // hides the host's bpffs at /sys/fs/bpf.
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/var/run/netns/{}", t.lb.name))
            .arg(&bin)
            .arg("--pin-dir")
            .arg(&pin)
            .arg("run")
            .arg("--config")
            .arg(config);
        for i in t.lb_ifaces() {
            cmd.args(["--iface", &i]);
        }
        cmd.args(extra);
        let child = cmd
            .stdout(logf.try_clone()?)
            .stderr(logf)
            .stdin(Stdio::null())
            .spawn()?;
        let mut a = Agent {
            child: Some(child),
            log,
            pin_dir: pin,
            offset,
        };
        a.wait_for_log("serving;", Duration::from_secs(20))?;
        Ok(a)
    }

    /// The agent's process id (None once stopped).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// This agent's output.
    pub fn log_text(&self) -> String {
        let all = std::fs::read_to_string(&self.log).unwrap_or_default();
        all.get(self.offset..).unwrap_or_default().to_string()
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
                    bail!("agent exited ({st}) before logging {needle:?}:\n{text}");
                }
            }
            if Instant::now() > deadline {
                bail!("agent did not log {needle:?} within {timeout:?}:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Count occurrences of `needle` in the log.
    pub fn log_count(&self, needle: &str) -> usize {
        self.log_text().matches(needle).count()
    }

    pub fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            // nsenter execs the agent: the pid is the agent's.
            unsafe { libc::kill(c.id() as i32, sig) };
        }
    }

    /// Stop with SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Some(st) = c.try_wait()? {
                    if !st.success() {
                        bail!("agent exited with {st}:\n{}", self.log_text());
                    }
                    return Ok(());
                }
                if Instant::now() > deadline {
                    let _ = c.kill();
                    bail!("agent did not exit on SIGTERM");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    /// Run an agent CLI subcommand against this agent's pinned maps.
    pub fn cli(&self, sub: &str) -> Result<String> {
        agent_cli(&self.pin_dir, sub)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(c) = self.child.take() {
            terminate(c);
        }
    }
}

/// SIGTERM, at most 5 s to exit, then SIGKILL; reaped either way (an
/// agent process a test drops).
pub fn terminate(mut c: Child) {
    // nsenter execs the agent: the pid is the agent's.
    unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = c.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = c.kill();
    let _ = c.wait();
}

/// Run an agent CLI subcommand against the maps pinned in `pin_dir`.
pub fn agent_cli(pin_dir: &std::path::Path, sub: &str) -> Result<String> {
    sh(&[
        agent_bin().to_str().unwrap(),
        "--pin-dir",
        pin_dir.to_str().unwrap(),
        sub,
    ])
}

/// Removes a pin directory (links detach, maps go) on drop.
pub struct PinDirGuard(pub PathBuf);

impl Drop for PinDirGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The standard e2e scene: a [`Topology`] with `n` backends running
/// [`Servers`] on (`tcp_port`, `udp_port`), a rule file `rules(&t)`, and
/// the pin directory removed at the end. `prepare(t, i)` shapes backend `i`
/// (1-based) before its servers start.
pub struct Scene {
    pub t: Topology,
    pub cfg: PathBuf,
    _servers: Vec<Servers>,
    _pins: PinDirGuard,
}

impl Scene {
    pub fn new(
        prefix: &str,
        n: usize,
        (tcp_port, udp_port): (u16, u16),
        prepare: impl Fn(&Topology, usize),
        rules: impl Fn(&Topology) -> String,
    ) -> Self {
        let t = Topology::new(prefix, n).expect("topology");
        for i in 1..=n {
            prepare(&t, i);
        }
        let servers = t
            .backends
            .iter()
            .enumerate()
            .map(|(i, b)| Servers::start(b, &format!("b{}", i + 1), tcp_port, udp_port).unwrap())
            .collect();
        let cfg = std::env::temp_dir().join(format!("{prefix}-rules.yaml"));
        std::fs::write(&cfg, rules(&t)).unwrap();
        let pins = PinDirGuard(t.pin_dir());
        Scene {
            t,
            cfg,
            _servers: servers,
            _pins: pins,
        }
    }

    /// The VIP at `port`.
    pub fn vip(port: u16) -> SocketAddr {
        format!("{VIP}:{port}").parse().unwrap()
    }

    /// The backends that answered `n` new TCP connections from the client
    /// to `vip` (connections that fail are not counted).
    pub fn backends_reached(&self, vip: SocketAddr, n: usize) -> BTreeSet<String> {
        let mut seen = BTreeSet::new();
        for i in 0..n {
            if let Ok(mut c) = Conn::open(&self.t.client, vip) {
                if let Ok(r) = c.ask(&format!("p{i}")) {
                    seen.insert(r.backend);
                }
            }
        }
        seen
    }
}

/// The agent's state directory (where API rules persist), emptied when
/// made and removed on drop, so no run leaves rules to the next.
pub struct StateDir(pub PathBuf);

impl StateDir {
    /// The state directory of an agent pinning in `t`'s pin directory.
    pub fn of(t: &Topology) -> Self {
        let d = StateDir(loxilb_agent::node::state_dir(&t.pin_dir()));
        d.clear();
        d
    }

    /// Remove it (and the rules in it) now.
    pub fn clear(&self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Drop for StateDir {
    fn drop(&mut self) {
        self.clear();
    }
}

impl Agent {
    /// Write a new rule file, send SIGHUP, wait until the agent applied it.
    pub fn reload(&mut self, cfg: &std::path::Path, text: &str) {
        let before = self.log_count("reload applied");
        std::fs::write(cfg, text).unwrap();
        self.signal(libc::SIGHUP);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.log_count("reload applied") <= before {
            assert!(Instant::now() < deadline, "no reload:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
