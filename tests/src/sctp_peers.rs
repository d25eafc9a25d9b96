//! Real SCTP peers (usrsctp) for the end-to-end tests.
//!
//! This kernel has no SCTP sockets. Debian's usrsctp runs SCTP in user
//! space over raw IPv4/IPv6 sockets of protocol 132 (UDP encapsulation port
//! 0), so a peer in each network namespace speaks plain SCTP over IP to the
//! other. The two small C programs under `tests/sctp/` (a multihomed echo
//! server and a multihomed client) are compiled on demand with
//! `cc ... -lusrsctp` into the target directory (cached by source hash) and
//! run inside a namespace with `nsenter --net=` (not `ip netns exec`, which
//! remounts /sys). Each prints one line per event (`<event> key=value ...`,
//! see the sources); [`Peer`] collects them with their arrival time so
//! tests can wait for and assert on them. Processes are killed on drop.
//!
//! ```text
//! let srv = SctpServer::spawn(&server_ns, &[a1, a2], 5000)?;
//! let cli = SctpClient::spawn(&client_ns, &[c1, c2], &[a1, a2], 5000)?;
//! let up = cli.wait_for(|e| e.kind == "assoc" && e.get("state") == Some("COMM_UP"), 5s)?;
//! cli.wait_for(|e| e.kind == "echo" && e.num("seq") >= Some(10), 5s)?;
//! ```
//!
//! usrsctp quirks worth knowing (found while writing these peers):
//! - It has no routing table ("dummy route"): every packet of an
//!   association carries the same source address, the local address bound
//!   **last**, whatever link the kernel routes it out of. Packets toward the
//!   peer's primary address on link A may leave with the address of link B
//!   as their source; the peer then answers on link B.
//! - Each stack sees every SCTP packet of its namespace (raw socket) and
//!   answers packets of unknown associations with ABORT unless
//!   `blackhole=2`: run two peers in one namespace only with blackhole 2.
//! - It learns the local addresses at start (getifaddrs): configure
//!   addresses before spawning a peer.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader},
    net::IpAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Condvar, Mutex},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::netns::Netns;

const COMMON_H: &str = include_str!("../sctp/sctp_common.h");
const SERVER_C: &str = include_str!("../sctp/sctp_server.c");
const CLIENT_C: &str = include_str!("../sctp/sctp_client.c");

/// The header the peers are compiled against (Debian: libusrsctp-dev).
pub const USRSCTP_HEADER: &str = "/usr/include/usrsctp.h";

/// What is missing to build and run the peers, if anything (for skip
/// messages; `LOXILB_REQUIRE_TOOLS=1` turns a skip into a failure).
pub fn missing_tools() -> Option<String> {
    if !Path::new(USRSCTP_HEADER).exists() {
        return Some(format!(
            "{USRSCTP_HEADER} missing: install libusrsctp-dev (scripts/setup.sh)"
        ));
    }
    for tool in ["cc", "nsenter"] {
        if !on_path(tool) {
            return Some(format!("{tool} not found (scripts/setup.sh installs it)"));
        }
    }
    None
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
}

/// FNV-1a: a cache key stable across toolchains.
fn fnv64(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.bytes().chain([0u8]) {
            h ^= b as u64;
            h = h.wrapping_mul(0x100_0000_01b3);
        }
    }
    h
}

/// Where the compiled peers go: `<target>/<profile>/sctp-peers/<hash>/`.
fn cache_dir(hash: u64) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().unwrap().to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir.join("sctp-peers").join(format!("{hash:016x}"))
}

/// Paths of the compiled peers.
#[derive(Clone, Debug)]
pub struct PeerBins {
    pub server: PathBuf,
    pub client: PathBuf,
}

/// Compile the peers if this version of their sources is not built yet.
/// Safe to call from tests running in parallel (each output is written
/// under a temporary name and renamed into place).
pub fn build() -> Result<PeerBins> {
    if let Some(m) = missing_tools() {
        bail!("{m}");
    }
    let hash = fnv64(&[COMMON_H, SERVER_C, CLIENT_C]);
    let dir = cache_dir(hash);
    let bins = PeerBins {
        server: dir.join("sctp_server"),
        client: dir.join("sctp_client"),
    };
    if bins.server.exists() && bins.client.exists() {
        return Ok(bins);
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let tag = format!("{}-{:?}", std::process::id(), std::thread::current().id())
        .replace(|c: char| !c.is_ascii_alphanumeric(), "");
    let src = dir.join(format!("src-{tag}"));
    std::fs::create_dir_all(&src)?;
    std::fs::write(src.join("sctp_common.h"), COMMON_H)?;
    std::fs::write(src.join("sctp_server.c"), SERVER_C)?;
    std::fs::write(src.join("sctp_client.c"), CLIENT_C)?;
    for (name, out) in [("sctp_server", &bins.server), ("sctp_client", &bins.client)] {
        let tmp = dir.join(format!("{name}.{tag}.tmp"));
        let o = Command::new("cc")
            .args(["-O2", "-Wall", "-Wextra", "-DINET", "-DINET6", "-o"])
            .arg(&tmp)
            .arg(src.join(format!("{name}.c")))
            .args(["-lusrsctp", "-lpthread"])
            .output()
            .context("running cc")?;
        if !o.status.success() {
            bail!(
                "compiling tests/sctp/{name}.c failed:\n{}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        std::fs::rename(&tmp, out)?;
    }
    let _ = std::fs::remove_dir_all(&src);
    Ok(bins)
}

/// Stack settings (`-T key=value`): timers in ms. The default detects a
/// dead path in about a second (RTO 100..400 ms, heartbeat every 200 ms,
/// a path is down after 2 retransmissions) and keeps the association
/// through 20 consecutive losses.
#[derive(Clone, Debug)]
pub struct Tuning {
    pub rto_min: u32,
    pub rto_max: u32,
    pub rto_initial: u32,
    pub hb_interval: u32,
    pub path_max_rxt: u32,
    pub assoc_max_rxt: u32,
    pub init_max_rxt: u32,
    /// 0: ABORT out-of-the-blue packets (standard); 2: ignore them (two
    /// stacks in one namespace).
    pub blackhole: u32,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            rto_min: 100,
            rto_max: 400,
            rto_initial: 200,
            hb_interval: 200,
            path_max_rxt: 2,
            assoc_max_rxt: 20,
            init_max_rxt: 8,
            blackhole: 0,
        }
    }
}

impl Tuning {
    fn args(&self) -> Vec<String> {
        [
            ("rto_min", self.rto_min),
            ("rto_max", self.rto_max),
            ("rto_initial", self.rto_initial),
            ("hb_interval", self.hb_interval),
            ("path_max_rxt", self.path_max_rxt),
            ("assoc_max_rxt", self.assoc_max_rxt),
            ("init_max_rxt", self.init_max_rxt),
            ("blackhole", self.blackhole),
        ]
        .iter()
        .flat_map(|(k, v)| ["-T".to_string(), format!("{k}={v}")])
        .collect()
    }
}

/// One line a peer printed: `<kind> key=value ...`.
#[derive(Clone, Debug)]
pub struct Event {
    /// When the test read it.
    pub at: Instant,
    pub kind: String,
    pub fields: BTreeMap<String, String>,
    pub line: String,
}

impl Event {
    fn parse(line: &str, at: Instant) -> Self {
        let mut it = line.split_whitespace();
        let kind = it.next().unwrap_or("").to_string();
        let fields = it
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Event {
            at,
            kind,
            fields,
            line: line.to_string(),
        }
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields.get(key).map(|s| s.as_str())
    }

    /// A numeric field.
    pub fn num(&self, key: &str) -> Option<u64> {
        self.get(key)?.parse().ok()
    }

    /// A comma-separated address list field (`addrs=a,b`).
    pub fn addrs(&self, key: &str) -> Vec<IpAddr> {
        self.get(key)
            .unwrap_or("")
            .split(',')
            .filter_map(|a| a.parse().ok())
            .collect()
    }

    /// An address field.
    pub fn addr(&self, key: &str) -> Option<IpAddr> {
        self.get(key)?.parse().ok()
    }

    pub fn is(&self, kind: &str) -> bool {
        self.kind == kind
    }
}

#[derive(Default)]
struct Log {
    events: Vec<Event>,
    closed: bool,
}

/// A running peer process in a namespace: its output as events, killed on
/// drop.
pub struct Peer {
    pub name: String,
    child: Option<Child>,
    log: Arc<(Mutex<Log>, Condvar)>,
    readers: Vec<JoinHandle<()>>,
}

impl Peer {
    fn spawn(name: &str, ns: &Netns, bin: &Path, args: &[String]) -> Result<Self> {
        let mut child = Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{}", ns.name))
            .arg(bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {} in {}", bin.display(), ns.name))?;
        let log: Arc<(Mutex<Log>, Condvar)> = Arc::default();
        let mut readers = vec![];
        let out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        for (stream, prefix) in [
            (Box::new(out) as Box<dyn std::io::Read + Send>, ""),
            (Box::new(err), "stderr "),
        ] {
            let log = log.clone();
            readers.push(std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    let e = Event::parse(&format!("{prefix}{line}"), Instant::now());
                    let (m, cv) = &*log;
                    m.lock().unwrap().events.push(e);
                    cv.notify_all();
                }
                if prefix.is_empty() {
                    let (m, cv) = &*log;
                    m.lock().unwrap().closed = true;
                    cv.notify_all();
                }
            }));
        }
        Ok(Peer {
            name: name.to_string(),
            child: Some(child),
            log,
            readers,
        })
    }

    /// Every event so far.
    pub fn events(&self) -> Vec<Event> {
        self.log.0.lock().unwrap().events.clone()
    }

    /// Events of one kind so far.
    pub fn of_kind(&self, kind: &str) -> Vec<Event> {
        self.events()
            .into_iter()
            .filter(|e| e.kind == kind)
            .collect()
    }

    /// Number of events so far (an index for [`Peer::wait_for_from`]).
    pub fn len(&self) -> usize {
        self.log.0.lock().unwrap().events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The first event matching `pred` (also one already printed).
    pub fn wait_for(&self, pred: impl Fn(&Event) -> bool, timeout: Duration) -> Result<Event> {
        self.wait_for_from(0, pred, timeout)
    }

    /// The first event at index `from` or later matching `pred`; fails
    /// when `timeout` passes or the peer's output ends first.
    pub fn wait_for_from(
        &self,
        from: usize,
        pred: impl Fn(&Event) -> bool,
        timeout: Duration,
    ) -> Result<Event> {
        let deadline = Instant::now() + timeout;
        let (m, cv) = &*self.log;
        let mut g = m.lock().unwrap();
        loop {
            if let Some(e) = g.events.iter().skip(from).find(|e| pred(e)) {
                return Ok(e.clone());
            }
            let now = Instant::now();
            if g.closed || now >= deadline {
                let why = if g.closed { "exited" } else { "timed out" };
                let tail: Vec<&str> = g
                    .events
                    .iter()
                    .rev()
                    .take(30)
                    .map(|e| e.line.as_str())
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect();
                bail!(
                    "{}: {why} waiting ({timeout:?}); last output:\n  {}",
                    self.name,
                    tail.join("\n  ")
                );
            }
            g = cv.wait_timeout(g, deadline - now).unwrap().0;
        }
    }

    /// Whether the process has exited.
    pub fn exited(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => !matches!(c.try_wait(), Ok(None)),
            None => true,
        }
    }

    /// All output so far, one line each (for assertion messages).
    pub fn transcript(&self) -> String {
        self.events()
            .iter()
            .map(|e| e.line.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Kill it now (SIGKILL, as a crash would).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn addr_args(flag: &str, addrs: &[IpAddr]) -> Vec<String> {
    addrs
        .iter()
        .flat_map(|a| [flag.to_string(), a.to_string()])
        .collect()
}

/// The multihomed echo server (`tests/sctp/sctp_server.c`).
pub struct SctpServer {
    pub peer: Peer,
}

impl SctpServer {
    /// Bind `addrs` (all on `port`) in `ns`; returns once it listens.
    pub fn spawn(ns: &Netns, addrs: &[IpAddr], port: u16) -> Result<Self> {
        Self::spawn_with(ns, addrs, port, &Tuning::default())
    }

    pub fn spawn_with(ns: &Netns, addrs: &[IpAddr], port: u16, t: &Tuning) -> Result<Self> {
        let bins = build()?;
        let mut args = vec!["-p".to_string(), port.to_string()];
        args.extend(addr_args("-a", addrs));
        args.extend(t.args());
        let peer = Peer::spawn(&format!("sctp_server@{}", ns.name), ns, &bins.server, &args)?;
        peer.wait_for(|e| e.is("ready") || e.is("error"), Duration::from_secs(5))
            .and_then(|e| {
                if e.is("error") {
                    bail!("sctp_server failed: {}", e.line)
                }
                Ok(())
            })?;
        Ok(SctpServer { peer })
    }
}

impl std::ops::Deref for SctpServer {
    type Target = Peer;
    fn deref(&self) -> &Peer {
        &self.peer
    }
}

impl std::ops::DerefMut for SctpServer {
    fn deref_mut(&mut self) -> &mut Peer {
        &mut self.peer
    }
}

/// Options of the client beyond its addresses.
#[derive(Clone, Debug)]
pub struct ClientOpts {
    /// Local port (0: the stack picks one).
    pub sport: u16,
    /// Milliseconds between messages.
    pub interval_ms: u32,
    /// Messages to send (0: until killed).
    pub count: u32,
    pub tuning: Tuning,
}

impl Default for ClientOpts {
    fn default() -> Self {
        ClientOpts {
            sport: 0,
            interval_ms: 100,
            count: 0,
            tuning: Tuning::default(),
        }
    }
}

/// The multihomed client (`tests/sctp/sctp_client.c`): binds `local`,
/// connects to `remote` (the INIT goes to the first one), then sends
/// `seq=N` every interval and reports each echo.
pub struct SctpClient {
    pub peer: Peer,
}

impl SctpClient {
    pub fn spawn(ns: &Netns, local: &[IpAddr], remote: &[IpAddr], port: u16) -> Result<Self> {
        Self::spawn_with(ns, local, remote, port, &ClientOpts::default())
    }

    /// Returns once the process has bound its addresses (the association
    /// is not necessarily up yet: wait for `connected` or `assoc`).
    pub fn spawn_with(
        ns: &Netns,
        local: &[IpAddr],
        remote: &[IpAddr],
        port: u16,
        o: &ClientOpts,
    ) -> Result<Self> {
        let bins = build()?;
        let mut args = vec![
            "-p".to_string(),
            port.to_string(),
            "-s".to_string(),
            o.sport.to_string(),
            "-i".to_string(),
            o.interval_ms.to_string(),
            "-n".to_string(),
            o.count.to_string(),
        ];
        args.extend(addr_args("-l", local));
        args.extend(addr_args("-r", remote));
        args.extend(o.tuning.args());
        let peer = Peer::spawn(&format!("sctp_client@{}", ns.name), ns, &bins.client, &args)?;
        let e = peer.wait_for(|e| e.is("bound") || e.is("error"), Duration::from_secs(5))?;
        if e.is("error") {
            bail!("sctp_client failed: {}", e.line);
        }
        Ok(SctpClient { peer })
    }

    /// Wait until the association is up; returns its id (the client
    /// stack's `assoc` number).
    pub fn wait_up(&self, timeout: Duration) -> Result<u64> {
        let e = self.peer.wait_for(
            |e| e.is("connected") || e.is("closed") || e.is("error"),
            timeout,
        )?;
        if !e.is("connected") {
            bail!(
                "association not established: {}\n{}",
                e.line,
                self.peer.transcript()
            );
        }
        e.num("assoc").context("connected without assoc id")
    }

    /// Highest `seq` echoed back so far (0: none).
    pub fn last_echo(&self) -> u64 {
        self.peer
            .of_kind("echo")
            .iter()
            .filter_map(|e| e.num("seq"))
            .max()
            .unwrap_or(0)
    }

    /// Wait until the echo of a message sent after now comes back; returns
    /// that echo event.
    pub fn wait_fresh_echo(&self, timeout: Duration) -> Result<Event> {
        let sent = self
            .peer
            .of_kind("sent")
            .iter()
            .filter_map(|e| e.num("seq"))
            .max()
            .unwrap_or(0);
        self.peer.wait_for(
            |e| e.is("echo") && e.num("seq").is_some_and(|s| s > sent),
            timeout,
        )
    }
}

impl std::ops::Deref for SctpClient {
    type Target = Peer;
    fn deref(&self) -> &Peer {
        &self.peer
    }
}

impl std::ops::DerefMut for SctpClient {
    fn deref_mut(&mut self) -> &mut Peer {
        &mut self.peer
    }
}

/// A packet capture (tcpdump) on one interface of a namespace, to see
/// what went over the wire. Stopped and removed on drop.
pub struct Capture {
    child: Option<Child>,
    file: PathBuf,
}

/// One captured frame.
#[derive(Clone, Debug)]
pub struct Captured {
    /// Seconds and microseconds (pcap timestamp).
    pub ts: (u32, u32),
    pub data: Vec<u8>,
}

impl Capture {
    /// Capture what `filter` (tcpdump syntax, e.g. `sctp`) matches on
    /// `iface` in `ns`, Ethernet frames, unbuffered.
    pub fn start(ns: &Netns, iface: &str, filter: &str) -> Result<Self> {
        if !on_path("tcpdump") {
            bail!("tcpdump not found (scripts/setup.sh installs it)");
        }
        let file = std::env::temp_dir().join(format!(
            "loxilb-cap-{}-{}-{}.pcap",
            ns.name,
            iface,
            std::process::id()
        ));
        let _ = std::fs::remove_file(&file);
        let mut child = Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{}", ns.name))
            .args([
                "tcpdump",
                "--immediate-mode",
                "-i",
                iface,
                "-U",
                "-s",
                "0",
                "-w",
            ])
            .arg(&file)
            .args(filter.split_whitespace())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting tcpdump")?;
        // Ready when it says it is listening.
        let err = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(err);
            let mut line = String::new();
            while r.read_line(&mut line).unwrap_or(0) > 0 {
                let _ = tx.send(line.trim().to_string());
                line.clear();
            }
        });
        let mut cap = Capture {
            child: Some(child),
            file,
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut said = vec![];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(l) if l.contains("listening on") => return Ok(cap),
                Ok(l) => said.push(l),
                Err(_) => {
                    cap.stop_child();
                    bail!(
                        "tcpdump on {iface} in {} did not start: {}",
                        ns.name,
                        said.join(" / ")
                    );
                }
            }
        }
    }

    fn stop_child(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe { libc::kill(c.id() as i32, libc::SIGINT) };
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stop capturing; the frames captured. (Immediate mode and `-U`: a
    /// frame is in the file once tcpdump saw it; without them libpcap's
    /// ring hands frames over in blocks and the last second is lost.)
    pub fn finish(mut self) -> Result<Vec<Captured>> {
        std::thread::sleep(Duration::from_millis(100));
        self.stop_child();
        let b = std::fs::read(&self.file)
            .with_context(|| format!("reading {}", self.file.display()))?;
        read_pcap(&b)
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop_child();
        let _ = std::fs::remove_file(&self.file);
    }
}

/// The frames of a classic pcap file (either byte order, microsecond or
/// nanosecond timestamps; the link type is not checked).
pub fn read_pcap(b: &[u8]) -> Result<Vec<Captured>> {
    if b.len() < 24 {
        bail!("pcap file of {} bytes", b.len());
    }
    let magic = u32::from_le_bytes(b[0..4].try_into().unwrap());
    let le = match magic {
        0xa1b2_c3d4 | 0xa1b2_3c4d => true,
        0xd4c3_b2a1 | 0x4d3c_b2a1 => false,
        m => bail!("not a pcap file (magic {m:#x})"),
    };
    let rd = |o: usize| -> u32 {
        let w: [u8; 4] = b[o..o + 4].try_into().unwrap();
        if le {
            u32::from_le_bytes(w)
        } else {
            u32::from_be_bytes(w)
        }
    };
    let mut out = vec![];
    let mut off = 24;
    while off + 16 <= b.len() {
        let (s, us, incl) = (rd(off), rd(off + 4), rd(off + 8) as usize);
        off += 16;
        if off + incl > b.len() {
            break; // a record cut short by the stop
        }
        out.push(Captured {
            ts: (s, us),
            data: b[off..off + incl].to_vec(),
        });
        off += incl;
    }
    Ok(out)
}

/// SCTP tests call this after `need_root`: false (the test skips, saying
/// why) when the usrsctp peers cannot be built or run, unless
/// LOXILB_REQUIRE_TOOLS=1 (CI), where that is a failure.
pub fn need_tools(test: &str) -> bool {
    let Some(m) = missing_tools().or_else(|| {
        crate::netns::sh(&["tcpdump", "--version"])
            .err()
            .map(|_| "tcpdump not found (scripts/setup.sh installs it)".to_string())
    }) else {
        return true;
    };
    if std::env::var("LOXILB_REQUIRE_TOOLS").as_deref() == Ok("1") {
        panic!("{test}: {m} (LOXILB_REQUIRE_TOOLS=1 forbids skipping)");
    }
    eprintln!("SKIPPED {test}: {m}");
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_parse() {
        let e = Event::parse("peers assoc=3 addrs=10.0.0.1,fd00::1", Instant::now());
        assert_eq!(e.kind, "peers");
        assert_eq!(e.num("assoc"), Some(3));
        assert_eq!(
            e.addrs("addrs"),
            vec![
                "10.0.0.1".parse::<IpAddr>().unwrap(),
                "fd00::1".parse().unwrap()
            ]
        );
        let d = Event::parse(
            "data assoc=1 from=10.0.0.2 count=4 msg=seq=17",
            Instant::now(),
        );
        assert_eq!(d.get("msg"), Some("seq=17"));
    }

    #[test]
    fn pcap_both_byte_orders() {
        let mut le = vec![];
        le.extend_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
        le.extend_from_slice(&[0; 20]);
        for w in [7u32, 8, 3, 3] {
            le.extend_from_slice(&w.to_le_bytes());
        }
        le.extend_from_slice(&[1, 2, 3]);
        let p = read_pcap(&le).unwrap();
        assert_eq!((p[0].ts, p[0].data.clone()), ((7, 8), vec![1, 2, 3]));
        let mut be = vec![];
        be.extend_from_slice(&0xa1b2_c3d4u32.to_be_bytes());
        be.extend_from_slice(&[0; 20]);
        for w in [7u32, 8, 2, 2] {
            be.extend_from_slice(&w.to_be_bytes());
        }
        be.extend_from_slice(&[9, 9]);
        assert_eq!(read_pcap(&be).unwrap()[0].data, vec![9, 9]);
    }
}
