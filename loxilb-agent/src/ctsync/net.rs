//! The tasks: the scanner and one connection per receiver on the active
//! node; the listener and its connections on a backup.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{anyhow, bail, Context, Result};
use tokio::{
    io::AsyncWriteExt,
    net::{TcpListener, TcpStream},
    sync::{mpsc, oneshot, watch},
    time::timeout,
};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tracing::{debug, info, warn};

use super::{
    delta::{self, AssocState, State},
    engine::{Applier, Owned, Scanner},
    table::SessionTable,
    tls::TlsSource,
    wire::{self, Hello, Msg},
    Config, PeerStats, Stats,
};

/// A connect, TLS handshake or hello must finish within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// The sender says something at least this often...
const HEARTBEAT: Duration = Duration::from_secs(2);
/// ... and a receiver that hears nothing for this long hangs up.
const RECV_TIMEOUT: Duration = Duration::from_secs(15);
/// A receiver that dropped entries for want of a rule asks for a new
/// snapshot once its rules change, at the earliest this long after.
const RESYNC_AFTER: Duration = Duration::from_secs(1);

/// What every task of one syncer shares.
pub(super) struct Ctx {
    pub cfg: Config,
    pub tls: Arc<TlsSource>,
    pub table: Arc<Mutex<Box<dyn SessionTable>>>,
    pub applier: Arc<Mutex<Applier>>,
    pub stats: Mutex<Stats>,
    /// The VIPs this node owns (see `Syncer::set_owned`).
    pub owned: watch::Receiver<Owned>,
    pub subs: Mutex<Vec<Sub>>,
    /// The listener's port (0: none), told to receivers in the hello.
    pub listen_port: u16,
    /// Takeover hints: Lease identities of senders found dead.
    pub dead: mpsc::UnboundedSender<String>,
    /// The peers dialled while active (see `Syncer::set_peers`).
    pub peers: watch::Receiver<Vec<SocketAddr>>,
}

impl Ctx {
    pub fn stats<T>(&self, f: impl FnOnce(&mut Stats) -> T) -> T {
        f(&mut self.stats.lock().expect("stats lock"))
    }
    /// The counters of peer `addr` (a scratch entry once it left the
    /// peer list).
    fn peer<T>(&self, addr: SocketAddr, f: impl FnOnce(&mut PeerStats) -> T) -> T {
        let key = addr.to_string();
        self.stats(|s| match s.peers.iter_mut().find(|p| p.addr == key) {
            Some(p) => f(p),
            None => f(&mut PeerStats::default()),
        })
    }
}

pub(super) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The exported table at one scan, for a snapshot.
pub(super) struct Snap {
    state: Arc<State>,
    assocs: Arc<AssocState>,
    now_ns: u64,
    at: Instant,
}

/// One receiver's subscription to the scanner's changes.
pub(super) struct Sub {
    tx: mpsc::Sender<Arc<Vec<u8>>>,
    /// Waiting for its snapshot (handed over at the next scan; the
    /// changes of later scans follow in `tx`).
    want: Option<oneshot::Sender<Snap>>,
    /// Set when its queue was full: it gets a full resync.
    overflow: Arc<AtomicBool>,
}

/// (entries in an UPSERT frame, keys in a REMOVE frame, association
/// records or ids in an ASSOC_* frame)
fn frame_counts(f: &[u8]) -> (u64, u64, u64) {
    let n = u16::from_be_bytes([f[5], f[6]]) as u64;
    match f[4] {
        wire::msg::UPSERT => (n, 0, 0),
        wire::msg::REMOVE => (0, n, 0),
        wire::msg::ASSOC_UPSERT | wire::msg::ASSOC_REMOVE => (0, 0, n),
        _ => (0, 0, 0),
    }
}

/// The active node's scanner: every interval, the changes go to every
/// subscribed receiver; a receiver whose queue is full is cut off (and
/// resyncs); a new one is handed the scan as its snapshot.
pub(super) async fn scanner(ctx: Arc<Ctx>) {
    let mut sc = Some(Scanner::new(ctx.cfg.refresh, ctx.cfg.batch));
    let mut tick = tokio::time::interval(ctx.cfg.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_err = String::new();
    loop {
        tick.tick().await;
        let table = ctx.table.clone();
        let mut s = sc.take().expect("scanner present");
        let owned = ctx.owned.borrow().clone();
        let t0 = Instant::now();
        let (s, r) = match tokio::task::spawn_blocking(move || {
            let r = s.scan(&mut **table.lock().expect("table lock"), &owned);
            (s, r)
        })
        .await
        {
            Ok(x) => x,
            Err(e) => {
                warn!("ctsync: the scan failed: {e}");
                return;
            }
        };
        sc = Some(s);
        let out = match r {
            Ok(o) => o,
            Err(e) => {
                let t = format!("{e:#}");
                if t != last_err {
                    warn!("ctsync: scanning the session table failed: {t}");
                }
                ctx.stats(|s| s.last_error = Some(t.clone()));
                last_err = t;
                continue;
            }
        };
        last_err.clear();
        ctx.stats(|s| {
            s.scans += 1;
            s.last_scan_entries = out.state.len() as u64;
            s.last_scan_ms = t0.elapsed().as_secs_f64() * 1e3;
            s.skipped_last_scan = out.skipped as u64;
            s.not_owned_last_scan = out.not_owned as u64;
            s.changes += out.upserts as u64;
            s.removals += out.removes as u64;
            s.last_scan_assocs = out.assocs.len() as u64;
            s.assoc_changes += (out.assoc_upserts + out.assoc_removes) as u64;
        });
        let mut subs = ctx.subs.lock().expect("subs lock");
        subs.retain_mut(|s| {
            if let Some(w) = s.want.take() {
                return w
                    .send(Snap {
                        state: out.state.clone(),
                        assocs: out.assocs.clone(),
                        now_ns: out.now_ns,
                        at: t0,
                    })
                    .is_ok();
            }
            for f in &out.frames {
                match s.tx.try_send(f.clone()) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        s.overflow.store(true, Ordering::SeqCst);
                        return false;
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => return false,
                }
            }
            true
        });
    }
}

/// The active node's link to one receiver, reconnecting for ever.
pub(super) async fn peer(ctx: Arc<Ctx>, addr: SocketAddr) {
    let mut backoff = Duration::from_millis(500);
    let mut last_err = String::new();
    loop {
        ctx.peer(addr, |p| p.state = "connecting".into());
        let t0 = Instant::now();
        let r = peer_session(&ctx, addr).await;
        let e = match r {
            Ok(()) => "the connection ended".to_string(),
            Err(e) => format!("{e:#}"),
        };
        if e != last_err {
            warn!("ctsync: receiver {addr}: {e}");
            last_err = e.clone();
        }
        ctx.peer(addr, |p| {
            p.state = "error".into();
            p.last_error = Some(e);
        });
        if t0.elapsed() > Duration::from_secs(10) {
            backoff = Duration::from_millis(500);
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);
impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn peer_session(ctx: &Arc<Ctx>, addr: SocketAddr) -> Result<()> {
    let tcp = timeout(HANDSHAKE_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| anyhow!("no TCP connection within {HANDSHAKE_TIMEOUT:?}"))?
        .context("TCP connect")?;
    tcp.set_nodelay(true)?;
    let tls = timeout(HANDSHAKE_TIMEOUT, {
        let t = ctx.tls.current();
        TlsConnector::from(t.client).connect(t.server_name, tcp)
    })
    .await
    .map_err(|_| anyhow!("no TLS handshake within {HANDSHAKE_TIMEOUT:?}"))?
    .context("TLS handshake")?;
    let (mut rd, mut wr) = tokio::io::split(tls);
    let hello = Hello::ours(wire::ROLE_SENDER, &ctx.cfg.node_name)
        .lease(ctx.listen_port, &ctx.cfg.identity);
    wire::write_frame(&mut wr, &wire::encode(&Msg::Hello(hello))).await?;
    match timeout(HANDSHAKE_TIMEOUT, wire::read_msg(&mut rd))
        .await
        .map_err(|_| anyhow!("no hello within {HANDSHAKE_TIMEOUT:?}"))??
    {
        Some(Msg::Hello(h)) => h.check(&addr.to_string())?,
        Some(Msg::Error(t)) => bail!("refused: {t}"),
        Some(m) => bail!("sent {m:?} instead of a hello"),
        None => {
            bail!("closed the connection during the hello (does it trust our certificate's CA?)")
        }
    }
    info!("ctsync: streaming sessions to {addr}");
    ctx.peer(addr, |p| {
        p.connects += 1;
        p.last_error = None;
    });
    // The receiver only speaks to refuse or to ask for a resync: a reader
    // notices that, or the end of the connection.
    let resync = Arc::new(tokio::sync::Notify::new());
    let wants = resync.clone();
    let mut reader = AbortOnDrop(tokio::spawn(async move {
        loop {
            match wire::read_msg(&mut rd).await {
                Ok(Some(Msg::Error(t))) => return anyhow!("the receiver hung up: {t}"),
                Ok(Some(Msg::Resync)) => wants.notify_one(),
                Ok(Some(_)) => {}
                Ok(None) => return anyhow!("the receiver closed the connection"),
                Err(e) => return e,
            }
        }
    }));
    let mut hb = tokio::time::interval(HEARTBEAT);
    loop {
        // Subscribe; the next scan hands over the snapshot.
        let (tx, mut rx) = mpsc::channel(ctx.cfg.queue.max(1));
        let (want, snap) = oneshot::channel();
        let overflow = Arc::new(AtomicBool::new(false));
        ctx.subs.lock().expect("subs lock").push(Sub {
            tx,
            want: Some(want),
            overflow: overflow.clone(),
        });
        ctx.peer(addr, |p| p.state = "snapshot".into());
        let snap = tokio::select! {
            s = snap => s.map_err(|_| anyhow!("the scanner stopped"))?,
            e = &mut reader.0 => return Err(e.unwrap_or_else(|e| anyhow!("{e}"))),
        };
        let n = send_snapshot(ctx, &mut wr, &snap).await?;
        drop(snap);
        ctx.peer(addr, |p| {
            p.state = "streaming".into();
            p.snapshots += 1;
            p.entries_sent += n;
            p.last_snapshot_unix = Some(unix_now());
        });
        debug!("ctsync: sent {addr} a snapshot of {n} entries");
        loop {
            tokio::select! {
                f = rx.recv() => match f {
                    Some(f) => {
                        wire::write_frame(&mut wr, &f).await?;
                        let (u, r, a) = frame_counts(&f);
                        ctx.peer(addr, |p| {
                            p.entries_sent += u;
                            p.removes_sent += r;
                            p.assocs_sent += a;
                        });
                    }
                    None if overflow.load(Ordering::SeqCst) => {
                        warn!("ctsync: receiver {addr} fell behind ({} batches queued): full resync", ctx.cfg.queue);
                        ctx.peer(addr, |p| p.resyncs += 1);
                        break;
                    }
                    None => bail!("the scanner stopped"),
                },
                _ = hb.tick() => {
                    wire::write_frame(&mut wr, &wire::encode(&Msg::Heartbeat)).await?;
                }
                _ = resync.notified() => {
                    info!("ctsync: receiver {addr} asked for a new snapshot (its rules changed)");
                    ctx.peer(addr, |p| p.resyncs_asked += 1);
                    break;
                }
                e = &mut reader.0 => return Err(e.unwrap_or_else(|e| anyhow!("{e}"))),
            }
        }
    }
}

/// Write a full snapshot, a batch at a time. Returns the entries sent.
async fn send_snapshot<W: tokio::io::AsyncWrite + Unpin>(
    ctx: &Ctx,
    wr: &mut W,
    snap: &Snap,
) -> Result<u64> {
    let order = delta::snapshot_order(&snap.state);
    let n = order.len() as u32;
    wire::write_frame(wr, &wire::encode(&Msg::SnapshotBegin { entries: n })).await?;
    // Ages on the table's clock, advanced by the time since the scan.
    let now = snap.now_ns + snap.at.elapsed().as_nanos() as u64;
    for b in delta::batches(&order, &snap.state, ctx.cfg.batch) {
        for f in delta::upsert_frames(&b, &snap.state, ctx.cfg.batch, now) {
            wire::write_frame(wr, &f).await?;
        }
    }
    let ids: Vec<_> = snap.assocs.keys().copied().collect();
    for f in delta::assoc_frames(&ids, &snap.assocs, ctx.cfg.batch) {
        wire::write_frame(wr, &f).await?;
    }
    wire::write_frame(wr, &wire::encode(&Msg::SnapshotEnd { entries: n })).await?;
    wr.flush().await?;
    Ok(n as u64)
}

/// A backup's listener: every connection is a possible sender.
pub(super) async fn listen(ctx: Arc<Ctx>, l: TcpListener) {
    loop {
        match l.accept().await {
            Ok((tcp, addr)) => {
                let _ = tcp.set_nodelay(true);
                tokio::spawn(inbound(ctx.clone(), tcp, addr));
            }
            Err(e) => {
                warn!("ctsync: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

async fn inbound(ctx: Arc<Ctx>, tcp: TcpStream, addr: SocketAddr) {
    let tls = match timeout(
        HANDSHAKE_TIMEOUT,
        TlsAcceptor::from(ctx.tls.current().server).accept(tcp),
    )
    .await
    {
        Ok(Ok(s)) => s,
        // A bare TCP probe (a backup checking this agent lives, see
        // `probe_sender`) closes before any TLS: not a refusal.
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            debug!("ctsync: {addr} closed before TLS (a liveness probe)");
            return;
        }
        Ok(Err(e)) => {
            warn!("ctsync: refused {addr}: TLS: {e}");
            ctx.stats(|s| {
                s.inbound.refused_tls += 1;
                s.inbound.last_refused = Some(format!("{addr}: TLS: {e}"));
            });
            return;
        }
        Err(_) => {
            warn!("ctsync: refused {addr}: no TLS handshake within {HANDSHAKE_TIMEOUT:?}");
            ctx.stats(|s| {
                s.inbound.refused_tls += 1;
                s.inbound.last_refused = Some(format!("{addr}: no TLS handshake"));
            });
            return;
        }
    };
    let (mut rd, mut wr) = tokio::io::split(tls);
    let refuse = |why: String| {
        warn!("ctsync: refused {addr}: {why}");
        ctx.stats(|s| {
            s.inbound.refused_hello += 1;
            s.inbound.last_refused = Some(format!("{addr}: {why}"));
        });
        why
    };
    let hello = match timeout(HANDSHAKE_TIMEOUT, wire::read_msg(&mut rd)).await {
        Ok(Ok(Some(Msg::Hello(h)))) => h,
        Ok(Ok(Some(m))) => {
            let t = refuse(format!("sent {m:?} instead of a hello"));
            let _ = wire::write_frame(&mut wr, &wire::encode(&Msg::Error(t))).await;
            return;
        }
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            refuse(format!("{e:#}"));
            return;
        }
        Err(_) => {
            refuse(format!("no hello within {HANDSHAKE_TIMEOUT:?}"));
            return;
        }
    };
    let why = match hello.check(&addr.to_string()) {
        Err(e) => Some(refuse(format!("{e:#}"))),
        Ok(()) if hello.role != wire::ROLE_SENDER => Some(refuse(format!(
            "its hello has role {}, not sender",
            hello.role
        ))),
        Ok(()) => None,
    };
    if let Some(t) = why {
        let _ = wire::write_frame(&mut wr, &wire::encode(&Msg::Error(t))).await;
        let _ = wr.shutdown().await;
        return;
    }
    let ours = Hello::ours(wire::ROLE_RECEIVER, &ctx.cfg.node_name)
        .lease(ctx.listen_port, &ctx.cfg.identity);
    if wire::write_frame(&mut wr, &wire::encode(&Msg::Hello(ours)))
        .await
        .is_err()
    {
        return;
    }
    info!("ctsync: receiving sessions from {addr} ({:?})", hello.name);
    ctx.stats(|s| {
        s.inbound.connections += 1;
        s.inbound.connected += 1;
        s.inbound.last_sender = Some(format!("{addr} ({})", hello.name));
    });
    // Whether the connection just vanished (end of stream, reset): the
    // sender may be dead, which `probe_sender` finds out.
    let mut vanished = false;
    let end = loop {
        // A sender keeps streaming while this node owns VIPs too: their
        // records are not written (see `Applier::set_owned`).
        let m = timeout(RECV_TIMEOUT, wire::read_msg(&mut rd)).await;
        let msg = match m {
            Err(_) => break format!("nothing heard for {RECV_TIMEOUT:?}"),
            Ok(Err(e)) => {
                vanished = true;
                break format!("{e:#}");
            }
            Ok(Ok(None)) => {
                vanished = true;
                break "the sender closed the connection".into();
            }
            Ok(Ok(Some(msg))) => msg,
        };
        match apply(&ctx, &hello.name, msg).await {
            Ok(false) => {}
            Ok(true) => {
                info!("ctsync: rules changed since entries from {addr} were dropped: asking for a new snapshot");
                if let Err(e) = wire::write_frame(&mut wr, &wire::encode(&Msg::Resync)).await {
                    break format!("{e:#}");
                }
            }
            Err(e) => {
                let t = format!("{e:#}");
                let _ = wire::write_frame(&mut wr, &wire::encode(&Msg::Error(t.clone()))).await;
                break t;
            }
        }
    };
    ctx.applier
        .lock()
        .expect("applier lock")
        .abort_snapshot(&hello.name);
    ctx.stats(|s| {
        s.inbound.connected -= 1;
        s.inbound.last_error = Some(format!("{addr}: {end}"));
    });
    info!("ctsync: sender {addr} gone: {end}");
    if vanished && *ctx.owned.borrow() != Owned::All {
        probe_sender(&ctx, &hello, addr).await;
    }
}

/// How long a receiver keeps dialling its vanished sender's listener.
const PROBE_WINDOW: Duration = Duration::from_millis(500);
/// How long an accepted probe waits: a live agent's listener waits for
/// the TLS hello, a dying one's resets what it had queued.
const PROBE_HOLD: Duration = Duration::from_millis(100);

/// The sender's connection vanished: dial its listener. Refused means its
/// agent is dead (its node answers, nothing listens): a takeover hint
/// with its Lease identity. An accepted connection that is then reset
/// (a listener closing as its process exits: the sockets of a killed
/// process close one by one) is dialled again; one held open means the
/// agent lives. See the module documentation.
async fn probe_sender(ctx: &Ctx, hello: &Hello, addr: SocketAddr) {
    use tokio::io::AsyncReadExt;
    if hello.listen_port == 0 || hello.identity.is_empty() {
        return;
    }
    let to = SocketAddr::new(addr.ip(), hello.listen_port);
    let t0 = Instant::now();
    let why = loop {
        let left = PROBE_WINDOW.saturating_sub(t0.elapsed());
        match timeout(left, TcpStream::connect(to)).await {
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                warn!(
                    "ctsync: sender {:?} is dead (its listener {to} refuses): takeover hint for {:?}",
                    hello.name, hello.identity
                );
                // The hint first: whoever sees the count sees the hint.
                let _ = ctx.dead.send(hello.identity.clone());
                ctx.stats(|s| {
                    s.inbound.senders_dead += 1;
                    s.inbound.last_dead =
                        Some(format!("{} ({to}) at {}", hello.identity, unix_now()));
                });
                return;
            }
            Ok(Ok(mut probe)) => {
                let mut b = [0u8; 1];
                match timeout(PROBE_HOLD, probe.read(&mut b)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                    _ => {
                        info!(
                            "ctsync: sender {:?} lives (its listener {to} answers): it will connect again",
                            hello.name
                        );
                        return;
                    }
                }
            }
            // Accepted, then reset as the listener closed: dial again.
            Ok(Err(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::ConnectionAborted
                ) =>
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Ok(Err(e)) => break format!("its listener {to}: {e}"),
            Err(_) => {
                break format!(
                    "no answer from {to} within {PROBE_WINDOW:?} (node down or path lost)"
                )
            }
        }
    };
    info!(
        "ctsync: sender {:?}: {why}: the Lease decides a takeover",
        hello.name
    );
}

/// Apply one message from a sender (on a blocking thread: map writes).
/// Returns whether to ask the sender for a new snapshot.
async fn apply(ctx: &Arc<Ctx>, from: &str, msg: Msg) -> Result<bool> {
    let c = ctx.clone();
    let from = from.to_string();
    tokio::task::spawn_blocking(move || -> Result<bool> {
        let mut ap = c.applier.lock().expect("applier lock");
        let mut t = c.table.lock().expect("table lock");
        let t: &mut dyn SessionTable = &mut **t;
        match msg {
            Msg::Upsert(r) => ap.upserts(t, &from, &r)?,
            Msg::Remove(k) => ap.removes(t, &from, &k)?,
            Msg::AssocUpsert(r) => ap.assoc_upserts(t, &from, &r)?,
            Msg::AssocRemove(k) => ap.assoc_removes(t, &from, &k)?,
            Msg::SnapshotBegin { .. } => ap.begin_snapshot(&from),
            Msg::SnapshotEnd { .. } => {
                let stale = ap.end_snapshot(t, &from)?;
                if stale > 0 {
                    info!("ctsync: snapshot applied; {stale} stale synced entries removed");
                }
                c.stats(|s| s.inbound.last_snapshot_unix = Some(unix_now()));
            }
            Msg::Error(t) => bail!("the sender reported: {t}"),
            Msg::Hello(_) => bail!("a second hello"),
            Msg::Resync => bail!("a resync request, from a sender"),
            Msg::Heartbeat => {}
        }
        let resync = ap.wants_resync(t, &from, RESYNC_AFTER)?;
        let (st, n) = (ap.stats.clone(), ap.tracked());
        c.stats(|s| {
            s.inbound.apply = st;
            s.inbound.tracked = n as u64;
        });
        Ok(resync)
    })
    .await
    .map_err(|e| anyhow!("applying: {e}"))?
}
