//! The speaker manager: runs BIRD as a supervised child process with a
//! generated configuration in a private directory, applies the desired VIP
//! and peer sets as diffs, and answers introspection queries.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    io::{BufRead, BufReader},
    net::IpAddr,
    os::unix::{fs::PermissionsExt, process::CommandExt},
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU32, Ordering},
        mpsc, Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use ipnet::IpNet;
use tracing::{debug, error, info, warn};

use super::{
    config::{protocol_name, render, BgpConfig, Peer},
    control::{Control, ControlError},
    show::{self, Neighbor, Status},
};

/// Where the speaker keeps its files and which BIRD it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpeakerOptions {
    /// Private directory (created with mode 0700): `bird.conf`,
    /// `bird.ctl` (control socket), `bird.pid`. Nothing outside it is
    /// read or written; `/etc/bird` is never used.
    pub run_dir: PathBuf,
    /// The BIRD 2 daemon (Debian package `bird2`).
    pub bird: PathBuf,
    /// How long start-up may take until the control socket answers.
    pub start_timeout: Duration,
}

pub const DEFAULT_RUN_DIR: &str = "/run/loxilb/bgp";

impl Default for SpeakerOptions {
    fn default() -> Self {
        SpeakerOptions {
            run_dir: PathBuf::from(DEFAULT_RUN_DIR),
            bird: PathBuf::from("bird"),
            start_timeout: Duration::from_secs(10),
        }
    }
}

impl SpeakerOptions {
    pub fn in_dir(run_dir: impl Into<PathBuf>) -> Self {
        SpeakerOptions {
            run_dir: run_dir.into(),
            ..Default::default()
        }
    }
    pub fn config_path(&self) -> PathBuf {
        self.run_dir.join("bird.conf")
    }
    pub fn socket_path(&self) -> PathBuf {
        self.run_dir.join("bird.ctl")
    }
    pub fn pid_path(&self) -> PathBuf {
        self.run_dir.join("bird.pid")
    }
}

/// What a [`BgpSpeaker::set_vips`] call changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VipChange {
    pub added: Vec<IpAddr>,
    pub removed: Vec<IpAddr>,
    /// Announced before and after, now as a backup / now as active.
    pub to_backup: Vec<IpAddr>,
    pub to_active: Vec<IpAddr>,
}

impl VipChange {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty()
            && self.removed.is_empty()
            && self.to_backup.is_empty()
            && self.to_active.is_empty()
    }
}

/// What a [`BgpSpeaker::set_peers`] call changed. Only the sessions of
/// `added`, `removed` and `changed` peers are touched; the others keep
/// running.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerChange {
    pub added: Vec<IpAddr>,
    pub removed: Vec<IpAddr>,
    /// Same address, other AS, port or multihop: that session restarts.
    pub changed: Vec<IpAddr>,
}

impl PeerChange {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

/// Routes exported to one peer: its Adj-RIB-Out, what was really sent on
/// the established session (empty while the session is down).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerRoutes {
    pub peer: IpAddr,
    pub routes: Vec<IpNet>,
}

/// The daemon's process and BIRD's own status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonStatus {
    /// The running BIRD's pid (`None` between a crash and its restart).
    pub pid: Option<u32>,
    /// How often BIRD died and was restarted.
    pub restarts: u32,
    pub bird: Status,
}

fn check_vip(v: IpAddr) -> Result<()> {
    if v.is_unspecified() || v.is_multicast() || v.is_loopback() {
        bail!("{v} cannot be announced as a VIP (unspecified, multicast or loopback)");
    }
    Ok(())
}

fn peer_map(peers: impl IntoIterator<Item = Peer>) -> Result<BTreeMap<IpAddr, Peer>> {
    let mut m = BTreeMap::new();
    for p in peers {
        p.validate().map_err(|e| anyhow!(e))?;
        if m.insert(p.address, p).is_some() {
            bail!("peer {} is given twice", p.address);
        }
    }
    Ok(m)
}

/// A running BGP speaker (BIRD) announcing the VIPs to the peers. Dropping
/// it stops BIRD (gracefully: peers get a Cease and withdraw at once).
///
/// Calls block on BIRD's control socket (milliseconds; at most the socket
/// timeout, 10 s); from async code use `spawn_blocking`.
///
/// BIRD inherits the network namespace of the thread that calls
/// [`BgpSpeaker::start`].
pub struct BgpSpeaker {
    config: BgpConfig,
    opts: SpeakerOptions,
    peers: BTreeMap<IpAddr, Peer>,
    vips: BTreeSet<IpAddr>,
    /// Of `vips`, those this node serves as a backup (announced as
    /// [`BgpConfig::backup`] says).
    backup: BTreeSet<IpAddr>,
    control: Control,
    daemon: Option<Daemon>,
    /// The last apply failed: the next call applies even without a change.
    dirty: bool,
    /// Exclusive lock on the run directory, held while the speaker lives.
    _lock: std::fs::File,
}

impl BgpSpeaker {
    /// Start BIRD with this configuration, these peers and VIPs; returns
    /// once its control socket answers. A BIRD left running by a previous
    /// agent with the same directory (pid file, same control socket) is
    /// stopped first.
    pub fn start(
        config: BgpConfig,
        opts: SpeakerOptions,
        peers: impl IntoIterator<Item = Peer>,
        vips: impl IntoIterator<Item = IpAddr>,
    ) -> Result<Self> {
        config
            .validate()
            .map_err(|e| anyhow!("BGP configuration: {e}"))?;
        let peers = peer_map(peers)?;
        let vips: BTreeSet<IpAddr> = vips.into_iter().collect();
        for v in &vips {
            check_vip(*v)?;
        }
        let dir = &opts.run_dir;
        let dir_s = dir.to_string_lossy();
        if dir_s.contains(['"', '\n', '\\']) || !dir.is_absolute() {
            bail!("BGP run directory {dir_s:?}: must be an absolute path without quotes, backslashes or newlines");
        }
        let sock = opts.socket_path();
        if sock.as_os_str().len() >= 108 {
            bail!(
                "BGP run directory {dir_s:?} is too long for a control socket path (at most 107 bytes)"
            );
        }
        std::fs::create_dir_all(dir).with_context(|| format!("creating {dir_s}"))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("chmod 0700 {dir_s}"))?;
        let lock = lock_dir(dir)?;
        stop_stale(&opts);
        let mut s = BgpSpeaker {
            _lock: lock,
            control: Control::new(&sock),
            config,
            opts,
            peers,
            vips,
            backup: BTreeSet::new(),
            daemon: None,
            dirty: false,
        };
        s.write_config()?;
        s.daemon = Some(Daemon::spawn(&s.opts)?);
        info!(
            "BGP speaker up: AS {}, {} peer(s), {} VIP(s), BIRD pid {:?}",
            s.config.local_as,
            s.peers.len(),
            s.vips.len(),
            s.pid()
        );
        Ok(s)
    }

    pub fn config(&self) -> &BgpConfig {
        &self.config
    }
    pub fn options(&self) -> &SpeakerOptions {
        &self.opts
    }
    pub fn vips(&self) -> &BTreeSet<IpAddr> {
        &self.vips
    }
    /// The announced VIPs this node serves as a backup.
    pub fn backup_vips(&self) -> &BTreeSet<IpAddr> {
        &self.backup
    }
    pub fn peers(&self) -> impl Iterator<Item = &Peer> {
        self.peers.values()
    }

    /// The running BIRD's pid.
    pub fn pid(&self) -> Option<u32> {
        self.daemon.as_ref().and_then(|d| d.pid())
    }

    /// Announce exactly these VIPs (/32 and /128): new ones are announced,
    /// missing ones withdrawn; nothing happens when the set is unchanged.
    /// No session is reset. On error the desired set is kept and applied by
    /// the next call or by [`BgpSpeaker::resync`].
    pub fn set_vips(&mut self, vips: impl IntoIterator<Item = IpAddr>) -> Result<VipChange> {
        self.set_announced(vips, [])
    }

    /// Announce exactly `vips`, those of them in `backup` as a backup
    /// (with a worse path, or not at all: [`BgpConfig::backup`]), the rest
    /// as active. A VIP moving between the two is re-announced with its
    /// new path; no session is reset.
    pub fn set_announced(
        &mut self,
        vips: impl IntoIterator<Item = IpAddr>,
        backup: impl IntoIterator<Item = IpAddr>,
    ) -> Result<VipChange> {
        let new: BTreeSet<IpAddr> = vips.into_iter().collect();
        for v in &new {
            check_vip(*v)?;
        }
        let backup: BTreeSet<IpAddr> = backup.into_iter().filter(|v| new.contains(v)).collect();
        let kept = || new.intersection(&self.vips);
        let change = VipChange {
            added: new.difference(&self.vips).copied().collect(),
            removed: self.vips.difference(&new).copied().collect(),
            to_backup: kept()
                .filter(|v| backup.contains(v) && !self.backup.contains(v))
                .copied()
                .collect(),
            to_active: kept()
                .filter(|v| !backup.contains(v) && self.backup.contains(v))
                .copied()
                .collect(),
        };
        if change.is_empty() && !self.dirty {
            return Ok(change);
        }
        self.vips = new;
        self.backup = backup;
        self.apply()?;
        debug!(
            "BGP VIPs: +{:?} -{:?}, now backup {:?}, now active {:?}",
            change.added, change.removed, change.to_backup, change.to_active
        );
        Ok(change)
    }

    /// Peer with exactly these neighbours (diffed by address): sessions of
    /// unchanged peers keep running.
    pub fn set_peers(&mut self, peers: impl IntoIterator<Item = Peer>) -> Result<PeerChange> {
        let new = peer_map(peers)?;
        let mut change = PeerChange::default();
        for (a, p) in &new {
            match self.peers.get(a) {
                None => change.added.push(*a),
                Some(old) if old != p => change.changed.push(*a),
                Some(_) => {}
            }
        }
        change.removed = self
            .peers
            .keys()
            .filter(|a| !new.contains_key(a))
            .copied()
            .collect();
        if change.is_empty() && !self.dirty {
            return Ok(change);
        }
        self.peers = new;
        self.apply()?;
        info!(
            "BGP peers: added {:?}, removed {:?}, changed {:?}",
            change.added, change.removed, change.changed
        );
        Ok(change)
    }

    /// Add or replace one peer.
    pub fn add_peer(&mut self, peer: Peer) -> Result<PeerChange> {
        let mut all: Vec<Peer> = self.peers.values().copied().collect();
        all.retain(|p| p.address != peer.address);
        all.push(peer);
        self.set_peers(all)
    }

    /// Remove one peer (no error when absent).
    pub fn remove_peer(&mut self, address: IpAddr) -> Result<PeerChange> {
        let all: Vec<Peer> = self
            .peers
            .values()
            .filter(|p| p.address != address)
            .copied()
            .collect();
        self.set_peers(all)
    }

    /// Write and apply the desired state again (after an error).
    pub fn resync(&mut self) -> Result<()> {
        self.apply()
    }

    fn write_config(&self) -> Result<()> {
        let text = render(&self.config, &self.peers, &self.vips, &self.backup);
        let conf = self.opts.config_path();
        let tmp = self.opts.run_dir.join("bird.conf.new");
        std::fs::write(&tmp, &text).with_context(|| format!("writing {}", tmp.display()))?;
        let out = Command::new(&self.opts.bird)
            .arg("-p")
            .arg("-c")
            .arg(&tmp)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {} -p", self.opts.bird.display()))?;
        if !out.status.success() {
            bail!(
                "BIRD rejected the generated configuration {} (kept for inspection): {}",
                tmp.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        std::fs::rename(&tmp, &conf).with_context(|| format!("renaming to {}", conf.display()))
    }

    /// Render, check (`bird -p`), replace the file, `configure`. BIRD's
    /// reconfiguration keeps every protocol whose configuration is
    /// unchanged.
    fn apply(&mut self) -> Result<()> {
        self.dirty = true;
        self.write_config()?;
        let cmd = format!("configure \"{}\"", self.opts.config_path().display());
        let r = self.control.command(&cmd).map_err(|e| {
            anyhow!("{e} (the new configuration is on disk and is used if BIRD restarts)")
        })?;
        // 3 reconfigured, 4 in progress, 5 queued after one in progress
        match r.code {
            3..=5 => {}
            6 => bail!("BIRD is shutting down: reconfiguration ignored"),
            c => warn!("BIRD answered configure with {c}: {}", r.message()),
        }
        self.dirty = false;
        Ok(())
    }

    /// BIRD's `show status`.
    pub fn bird_status(&self) -> Result<Status> {
        Ok(show::parse_status(&self.control.command("show status")?))
    }

    pub fn status(&self) -> Result<DaemonStatus> {
        Ok(DaemonStatus {
            pid: self.pid(),
            restarts: self.daemon.as_ref().map(|d| d.restarts()).unwrap_or(0),
            bird: self.bird_status()?,
        })
    }

    /// Every configured peer's session: state, uptime, timers, routes
    /// sent per family, last error. Sorted by address.
    pub fn neighbors(&self) -> Result<Vec<Neighbor>> {
        let mut ns = query_neighbors(&self.control)?;
        ns.retain(|n| self.peers.contains_key(&n.address));
        Ok(ns)
    }

    /// One peer's session.
    pub fn neighbor(&self, address: IpAddr) -> Result<Option<Neighbor>> {
        Ok(self.neighbors()?.into_iter().find(|n| n.address == address))
    }

    /// The routes sent to each configured peer (from BIRD's export tables).
    pub fn exported_routes(&self) -> Result<Vec<PeerRoutes>> {
        self.peers
            .keys()
            .map(|a| {
                Ok(PeerRoutes {
                    peer: *a,
                    routes: query_exported(&self.control, *a)?,
                })
            })
            .collect()
    }

    /// Stop BIRD: `down` (every session closed with a Cease notification,
    /// so peers withdraw the VIPs at once), then SIGTERM/SIGKILL if it
    /// lingers. The files stay in the run directory except the socket and
    /// the pid file.
    pub fn stop(mut self) -> Result<()> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<()> {
        let Some(mut d) = self.daemon.take() else {
            return Ok(());
        };
        d.shared.stop.store(true, Ordering::SeqCst);
        let graceful = self.control.command("down");
        let r = d.finish(Duration::from_secs(5));
        let _ = std::fs::remove_file(self.opts.socket_path());
        let _ = std::fs::remove_file(self.opts.pid_path());
        if let Err(e) = graceful {
            debug!("BIRD `down`: {e}");
        }
        info!("BGP speaker stopped");
        r
    }
}

impl Drop for BgpSpeaker {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            warn!("stopping BIRD: {e}");
        }
    }
}

/// Every BGP session of the BIRD behind `control`, sorted by address.
/// Usable from another process than the speaker's (a CLI):
/// `Control::new(&SpeakerOptions::default().socket_path())`.
pub fn query_neighbors(control: &Control) -> Result<Vec<Neighbor>> {
    let now = show::parse_status(&control.command("show status")?).server_time;
    let r = control.command("show protocols all")?;
    let protocols = show::parse_protocols(&r).map_err(|e| anyhow!(e))?;
    let mut ns = show::neighbors(&protocols, now);
    ns.sort_by_key(|n| n.address);
    Ok(ns)
}

/// The routes BIRD has sent to `peer` (both families; empty while the
/// session is down).
pub fn query_exported(control: &Control, peer: IpAddr) -> Result<Vec<IpNet>> {
    let name = protocol_name(peer);
    let mut routes = vec![];
    for fam in ["ipv4", "ipv6"] {
        match control.command(&format!("show route export table {name}.{fam}")) {
            Ok(r) => routes.extend(show::parse_export_table(&r)),
            // the channel is down: nothing sent
            Err(ControlError::Bird { message, .. }) if message.contains("No export table") => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(routes)
}

/// How long a start waits for the run directory's lock before it gives up.
/// A lock just released can still be held for a moment: a process forked
/// by another thread of ours keeps a copy of the descriptor (close-on-exec)
/// until it execs, and the lock lives while any copy does.
const LOCK_WAIT: Duration = Duration::from_secs(2);

/// One speaker per run directory: an exclusive `flock` on `lock` in it,
/// released by the kernel when the holder exits however it exits.
fn lock_dir(dir: &std::path::Path) -> Result<std::fs::File> {
    lock_dir_within(dir, LOCK_WAIT)
}

fn lock_dir_within(dir: &std::path::Path, wait: Duration) -> Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    let path = dir.join("lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    let deadline = Instant::now() + wait;
    while unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(e).with_context(|| format!("locking {}", path.display()));
        }
        if Instant::now() >= deadline {
            bail!(
                "BGP run directory {} is in use by another running speaker \
                 (its lock was held for {} ms): stop it or give this one another directory",
                dir.display(),
                wait.as_millis()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(f)
}

/// A BIRD left by an earlier agent that used the same directory: its pid
/// file names a process whose command line has our control socket.
fn stop_stale(opts: &SpeakerOptions) {
    let Ok(text) = std::fs::read_to_string(opts.pid_path()) else {
        return;
    };
    let Ok(pid) = text.trim().parse::<i32>() else {
        return;
    };
    if pid <= 1 {
        return;
    }
    let sock = opts.socket_path();
    let ours = std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| {
            c.split(|b| *b == 0)
                .any(|arg| arg == sock.as_os_str().as_encoded_bytes())
        })
        .unwrap_or(false);
    if !ours {
        return;
    }
    warn!(
        "stopping a BIRD (pid {pid}) left running with {}",
        sock.display()
    );
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(3);
    while alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    if alive(pid) {
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// Running (not gone, not a zombie).
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s
            .rsplit_once(')')
            .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
            .unwrap_or(false),
        Err(_) => false,
    }
}

struct Shared {
    child: Mutex<Option<Child>>,
    stop: AtomicBool,
    restarts: AtomicU32,
    /// The last lines BIRD wrote to stderr (for start-up errors).
    tail: Mutex<VecDeque<String>>,
}

/// The supervisor: a thread that spawns BIRD (so BIRD's parent-death
/// signal follows this thread, which lives as long as the speaker),
/// watches it, and restarts it with back-off (1 s doubling to 30 s) if it
/// dies. A restarted BIRD reads the current configuration file, which is
/// always the desired state.
struct Daemon {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

struct Spec {
    bird: PathBuf,
    conf: PathBuf,
    sock: PathBuf,
    pid: PathBuf,
    start_timeout: Duration,
}

impl Daemon {
    fn spawn(opts: &SpeakerOptions) -> Result<Self> {
        let shared = Arc::new(Shared {
            child: Mutex::new(None),
            stop: AtomicBool::new(false),
            restarts: AtomicU32::new(0),
            tail: Mutex::new(VecDeque::new()),
        });
        let spec = Spec {
            bird: opts.bird.clone(),
            conf: opts.config_path(),
            sock: opts.socket_path(),
            pid: opts.pid_path(),
            start_timeout: opts.start_timeout,
        };
        let (tx, rx) = mpsc::channel();
        let sh = shared.clone();
        let thread = std::thread::Builder::new()
            .name("bird-supervisor".into())
            .spawn(move || supervise(sh, spec, tx))
            .context("spawning the BIRD supervisor thread")?;
        let mut d = Daemon {
            shared,
            thread: Some(thread),
        };
        match rx.recv() {
            Ok(Ok(())) => Ok(d),
            Ok(Err(e)) => {
                d.shared.stop.store(true, Ordering::SeqCst);
                let _ = d.finish(Duration::from_secs(1));
                Err(e)
            }
            Err(_) => bail!("the BIRD supervisor ended before BIRD was ready"),
        }
    }

    fn pid(&self) -> Option<u32> {
        self.shared.child.lock().unwrap().as_ref().map(|c| c.id())
    }

    fn restarts(&self) -> u32 {
        self.shared.restarts.load(Ordering::Relaxed)
    }

    /// After `stop` is set (and BIRD told to go down): wait for the
    /// process to exit, escalate to SIGTERM then SIGKILL, join the thread.
    fn finish(&mut self, grace: Duration) -> Result<()> {
        let Some(t) = self.thread.take() else {
            return Ok(());
        };
        let deadline = Instant::now() + grace;
        let mut termed = false;
        while !t.is_finished() {
            if Instant::now() > deadline {
                let mut g = self.shared.child.lock().unwrap();
                if let Some(c) = g.as_mut() {
                    if let Ok(None) = c.try_wait() {
                        if termed {
                            warn!("BIRD (pid {}) ignores SIGTERM: SIGKILL", c.id());
                            let _ = c.kill();
                        } else {
                            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
                            termed = true;
                        }
                    }
                }
                drop(g);
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        t.join()
            .map_err(|_| anyhow!("the BIRD supervisor thread panicked"))
    }
}

fn spawn_bird(spec: &Spec, shared: &Arc<Shared>) -> Result<(Child, JoinHandle<()>)> {
    let mut cmd = Command::new(&spec.bird);
    cmd.arg("-f")
        .arg("-c")
        .arg(&spec.conf)
        .arg("-s")
        .arg(&spec.sock)
        .arg("-P")
        .arg(&spec.pid)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        // Its own process group: a Ctrl-C meant for the agent does not
        // reach BIRD; the agent stops it in order.
        .process_group(0);
    let parent = unsafe { libc::getpid() };
    // SAFETY: prctl and getppid are async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            // BIRD must not outlive the agent (announcing VIPs nobody
            // serves): SIGTERM when the spawning thread (the supervisor)
            // or the agent dies, also by SIGKILL.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                return Err(std::io::Error::other("agent died during spawn"));
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {} (Debian package bird2)", spec.bird.display()))?;
    let stderr = child.stderr.take().expect("piped stderr");
    let sh = shared.clone();
    let reader = std::thread::Builder::new()
        .name("bird-log".into())
        .spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if line.contains("<ERR>") || line.contains("<FATAL>") || line.contains("<BUG>") {
                    error!(target: "bird", "{line}");
                } else if line.contains("<WARN>") {
                    warn!(target: "bird", "{line}");
                } else {
                    info!(target: "bird", "{line}");
                }
                let mut t = sh.tail.lock().unwrap();
                if t.len() == 20 {
                    t.pop_front();
                }
                t.push_back(line);
            }
        })
        .context("spawning the BIRD log reader")?;
    Ok((child, reader))
}

fn tail(shared: &Shared) -> String {
    let t = shared.tail.lock().unwrap();
    t.iter().cloned().collect::<Vec<_>>().join("\n")
}

/// Poll the process under the lock: `Some(status)` once it has exited
/// (the child is then removed).
fn exited(shared: &Shared) -> Option<ExitStatus> {
    let mut g = shared.child.lock().unwrap();
    let st = match g.as_mut()?.try_wait() {
        Ok(Some(st)) => st,
        Ok(None) => return None,
        Err(_) => return None,
    };
    *g = None;
    Some(st)
}

fn supervise(shared: Arc<Shared>, spec: Spec, ready: mpsc::Sender<Result<()>>) {
    let control = Control::new(&spec.sock);
    let mut ready = Some(ready);
    let mut backoff = Duration::from_secs(1);
    loop {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let _ = std::fs::remove_file(&spec.sock);
        let started = Instant::now();
        match spawn_bird(&spec, &shared) {
            Ok((child, reader)) => {
                *shared.child.lock().unwrap() = Some(child);
                if let Some(tx) = ready.take() {
                    // first start: report readiness or the reason it failed
                    let r = wait_ready(&shared, &control, spec.start_timeout, reader);
                    let failed = r.is_err();
                    let _ = tx.send(r);
                    if failed {
                        return;
                    }
                }
            }
            Err(e) => {
                if let Some(tx) = ready.take() {
                    let _ = tx.send(Err(e));
                    return;
                }
                error!("restarting BIRD: {e:#}");
            }
        }
        let status = loop {
            if let Some(st) = exited(&shared) {
                break Some(st);
            }
            if shared.child.lock().unwrap().is_none() {
                break None; // never started (spawn error)
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        if started.elapsed() > Duration::from_secs(60) {
            backoff = Duration::from_secs(1);
        }
        shared.restarts.fetch_add(1, Ordering::Relaxed);
        warn!(
            "BIRD exited unexpectedly ({}); restarting in {backoff:?}. Last output:\n{}",
            status
                .map(|s| s.to_string())
                .unwrap_or_else(|| "not started".into()),
            tail(&shared)
        );
        let until = Instant::now() + backoff;
        while Instant::now() < until {
            if shared.stop.load(Ordering::SeqCst) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

fn wait_ready(
    shared: &Shared,
    control: &Control,
    timeout: Duration,
    reader: JoinHandle<()>,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = exited(shared) {
            let _ = reader.join(); // all of stderr is in the tail now
            bail!("BIRD exited at start ({st}):\n{}", tail(shared));
        }
        if control.command("show status").is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            let mut g = shared.child.lock().unwrap();
            if let Some(c) = g.as_mut() {
                let _ = c.kill();
                let _ = c.wait();
            }
            *g = None;
            bail!(
                "BIRD did not answer on {} within {timeout:?}:\n{}",
                control.socket.display(),
                tail(shared)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn peers_unique_and_valid() {
        assert!(peer_map([Peer::new(ip("10.0.0.2"), 1), Peer::new(ip("10.0.0.3"), 1)]).is_ok());
        let e = peer_map([Peer::new(ip("10.0.0.2"), 1), Peer::new(ip("10.0.0.2"), 2)]).unwrap_err();
        assert!(e.to_string().contains("given twice"), "{e}");
        assert!(peer_map([Peer::new(ip("10.0.0.2"), 0)]).is_err());
    }

    #[test]
    fn vips_checked() {
        assert!(check_vip(ip("20.0.0.1")).is_ok());
        assert!(check_vip(ip("2001:db8::1")).is_ok());
        for bad in ["0.0.0.0", "::", "224.0.0.1", "127.0.0.1", "::1", "ff02::1"] {
            assert!(check_vip(ip(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn options_paths() {
        let o = SpeakerOptions::default();
        assert_eq!(o.config_path(), Path::new("/run/loxilb/bgp/bird.conf"));
        assert_eq!(o.socket_path(), Path::new("/run/loxilb/bgp/bird.ctl"));
        assert_eq!(o.pid_path(), Path::new("/run/loxilb/bgp/bird.pid"));
    }

    #[test]
    fn start_refuses_bad_input_before_touching_anything() {
        let dir = std::env::temp_dir().join(format!("loxilb-bgp-refuse-{}", std::process::id()));
        let opts = SpeakerOptions::in_dir(&dir);
        let e = BgpSpeaker::start(BgpConfig::new(0), opts.clone(), [], [])
            .err()
            .unwrap();
        assert!(e.to_string().contains("local AS 0"), "{e}");
        let e = BgpSpeaker::start(BgpConfig::new(65001), opts.clone(), [], [ip("0.0.0.0")])
            .err()
            .unwrap();
        assert!(e.to_string().contains("cannot be announced"), "{e}");
        let e = BgpSpeaker::start(
            BgpConfig::new(65001),
            SpeakerOptions::in_dir("relative"),
            [],
            [],
        )
        .err()
        .unwrap();
        assert!(e.to_string().contains("absolute"), "{e}");
        let long = format!("/tmp/{}", "x".repeat(120));
        let e = BgpSpeaker::start(BgpConfig::new(65001), SpeakerOptions::in_dir(long), [], [])
            .err()
            .unwrap();
        assert!(e.to_string().contains("too long"), "{e}");
        assert!(!dir.exists());
    }

    #[test]
    fn one_speaker_per_directory() {
        let dir = std::env::temp_dir().join(format!("loxilb-bgp-lock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let held = lock_dir(&dir).unwrap();
        let e = BgpSpeaker::start(BgpConfig::new(65001), SpeakerOptions::in_dir(&dir), [], [])
            .err()
            .unwrap();
        assert!(e.to_string().contains("in use by another"), "{e}");
        // A holder that lets go while a start waits: the start gets it.
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            drop(held);
        });
        assert!(
            lock_dir_within(&dir, Duration::from_secs(5)).is_ok(),
            "released with its holder"
        );
        t.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn missing_bird_binary_is_a_clear_error() {
        let dir = std::env::temp_dir().join(format!("loxilb-bgp-nobird-{}", std::process::id()));
        let opts = SpeakerOptions {
            bird: PathBuf::from("/nonexistent/bird"),
            ..SpeakerOptions::in_dir(&dir)
        };
        let e = BgpSpeaker::start(BgpConfig::new(65001), opts, [], [])
            .err()
            .unwrap();
        assert!(e.to_string().contains("/nonexistent/bird"), "{e:#}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
