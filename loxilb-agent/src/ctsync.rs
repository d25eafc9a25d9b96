//! Conntrack sync between agents (high availability): each node streams
//! the session table changes of the VIPs it owns to the other nodes (the
//! backups of those VIPs), which install them in their own pinned maps,
//! so that a node taking over a VIP finds its established sessions
//! already there.
//!
//! # Roles
//!
//! One [`Syncer`] per agent, started with [`Syncer::start`] and told
//! which VIPs this node owns with [`Syncer::set_owned`] as ownership
//! changes ([`Syncer::set_active`]: all or none). A session belongs to
//! its rule's VIP (the lowest of a rule with several); every node is the
//! sender of the VIPs it owns and a receiver of all the others, so nodes
//! that own different VIPs (per-Service or per-pool owner groups) stream
//! to each other at the same time:
//!
//! - **sending** (owns at least one VIP): every `interval` it scans
//!   `LB_CT`, keeps the entries of its VIPs, works out what changed since
//!   the previous scan (new and changed entries, removed keys) and sends
//!   it to every peer in `peers`, which it dials. A receiver that
//!   connects gets a full snapshot first. Each receiver has a bounded
//!   queue of `queue` batches; a receiver that cannot keep up (its queue
//!   full) is cut off from the changes and given a new full snapshot once
//!   it has drained what was queued — never unbounded buffering. The
//!   sessions of a VIP it gives up leave its stream without a REMOVE
//!   (their new owner streams them now).
//! - **receiving** (always, on `listen`): takes the streams of any number
//!   of senders and writes them to its own `LB_CT`, except the entries of
//!   VIPs it owns itself (counted `ignored_owned`: a sender that has not
//!   yet heard it lost the VIP). Each entry is tracked as its sender's:
//!   a sender's snapshot and REMOVEs touch only the entries it sent
//!   (a REMOVE of another's entry is counted `ignored_removes`). When
//!   this node takes a VIP, the entries it received for it become its
//!   own sessions: no sender touches them again.
//!
//! # What is translated
//!
//! A conntrack entry (one per direction, or one for a one-entry DNAT
//! session; a session's two entries travel in
//! the same batch) is sent with its node-local fields replaced:
//!
//! - `rule_id` becomes the rule's identity, its `SvcKey` (VIP, port,
//!   protocol; the lowest for a rule with several VIPs), mapped back
//!   through the receiver's `LB_SERVICES`. An entry whose rule the
//!   receiver lacks is dropped and counted (`dropped_no_rule`); once the
//!   receiver's rules change after such a drop (the rule arrived later
//!   than its sessions), it asks the sender for a new snapshot (RESYNC),
//!   so idle sessions that are not resent on their own are not lost.
//! - `ep_stat` becomes the endpoint's (address, port), found through the
//!   sender's `LB_ENDPOINTS` (`EpVal::stat_idx`) and mapped back to the
//!   receiver's counter index of that endpoint in that rule; dropped and
//!   counted when the receiver's rule has no such endpoint
//!   (`dropped_no_endpoint`).
//! - `last_seen_ns` (the sender's CLOCK_MONOTONIC) travels as an age; the
//!   receiver sets its own now minus the age.
//! - The cached next hops (`nh`, a one-entry session's `rnh`, and an
//!   IPIP DSR session's outer source, its `xsaddr`) are zeroed: the
//!   receiver's first packet looks its own route up. A one-entry session's reply counters (`rpackets`,
//!   `rbytes`) do not travel.
//! - The counters (`packets`, `bytes`) are copied as of the last send
//!   (they alone never cause a resend).
//!
//! - A one-entry session (`ct_state::ONE`) stays one entry only when the
//!   receiver's own endpoint index (`LB_EP_INDEX`) serves it: the slot of
//!   its endpoint (address, port, protocol) holds that endpoint for the
//!   session's VIP and port, and is not draining (the datapath's replies
//!   find the session through that slot; a receiver with other rules, a
//!   slot collision of its own or an index not written yet would pass
//!   them untranslated). Otherwise it is written as two entries: the
//!   forward one without the bit and a reply entry made here as the
//!   datapath makes one (`one_split`), which goes with its forward key
//!   (its REMOVE, a snapshot without it); a later record of the session
//!   that the index serves makes it one entry again. The index is read
//!   slot by slot, each slot at most once per refresh of the receiver's
//!   view of its rules (1 s).
//!
//! Everything else (translated tuple, peer key, direction, TCP state,
//! mode, timeout, SCTP tag; a DSR session's endpoint is its translated
//! destination) is copied. An entry whose only
//! change is a newer last packet is resent once its receiver copy would
//! be older than `refresh` or a quarter of its idle timeout, whichever is
//! less. `LB_EP_ACTIVE` (active sessions per endpoint) is not written: the
//! agent's periodic re-count from conntrack (every 10 s) covers the synced
//! sessions; an agent taking over should re-count at once
//! (`Datapath::recount_active`), so that `lc` rules see them and closing
//! them does not take the counts below zero meanwhile.
//!
//! A synced full-NAT or onearm session keeps its translated source
//! (address and port): its reply entry, installed on the backup too,
//! reserves that source port there. A onearm session's source is the old
//! node's own address, so its replies reach the new node only if that
//! address moves with the VIPs.
//!
//! SCTP multihoming association records (`LB_SCTP_ASSOC`, no clock in
//! them) are synced the same way: key `(rule_id, vtag)` sent as (rule
//! identity, vtag), `ep_stat` as the endpoint (address, port), the rest
//! copied.
//!
//! # A sender found dead (fast takeover)
//!
//! A backup knows its sender's listener port and Lease identity from the
//! HELLO. When the connection ends without an ERROR (end of stream or a
//! reset: what the kernel does to a killed process's sockets), it dials
//! that port once (500 ms at most):
//!
//! - **refused** (the node answers, nothing listens): the agent is dead.
//!   Its identity goes out on [`Syncer::takeover_hints`]; the Kubernetes
//!   controller takes the leader Lease over at once instead of waiting
//!   for it to expire (`kube_watch::leader`), and with it the VIPs.
//! - **accepted**: the agent lives (the connection broke for another
//!   reason); it will dial again.
//! - **no answer**: its node or the path to it is down, which a backup
//!   cannot tell from a partition: nothing is done, the Lease decides
//!   (takeover after the Lease duration).
//!
//! Only proof of death shortens the takeover, so a partition never makes
//! two active nodes; several backups racing for the Lease are settled by
//! the API server (one update wins, the others conflict).
//!
//! # Transport
//!
//! TCP with mutual TLS 1.2/1.3 (rustls, ring): each side presents the
//! certificate and key of `tls_dir` (`tls.crt`, `tls.key`, PEM, laid out
//! like a Kubernetes TLS Secret) and accepts only a peer whose certificate
//! chains to `tls_dir/ca.crt`. Names are not checked unless
//! `server_name` is set (then the backups' certificates must carry it).
//! A plaintext peer, one with no certificate or one of another CA is
//! refused, logged and counted (`refused_tls`). The certificates are
//! reloaded when the directory's files change (a rotated Secret): new
//! connections use the new ones, established ones keep theirs; a change
//! that does not load is logged and the previous certificates stay in use
//! (`tls_reloads` counts the reloads).
//!
//! # Wire format (protocol version 3)
//!
//! A stream of frames: `length: u32` (big-endian; bytes after this field,
//! at most 1 MiB), `type: u8`, body. Integers the agent keeps in host
//! order are sent **big-endian**; addresses, ports and the SCTP tag are
//! sent as the **network-order bytes** they are in the maps (and on the
//! wire of the packets). An address is 16 bytes (IPv4 as `::ffff:a.b.c.d`).
//!
//! | type | name | body | direction |
//! |---|---|---|---|
//! | 1 | HELLO | `"LXCS"`, protocol `u16`, map layout `u32` (`loxilb_common::LAYOUT_VERSION`), role `u8` (1 sender, 2 receiver), name length `u8`, name (UTF-8), listener port `u16` (0: none), Lease identity length `u8`, identity (UTF-8) | both, first |
//! | 2 | SNAPSHOT_BEGIN | entries `u32` | sender |
//! | 3 | UPSERT | count `u16` (at most 4096), count × record | sender |
//! | 4 | REMOVE | count `u16`, count × key | sender |
//! | 5 | SNAPSHOT_END | entries `u32` | sender |
//! | 6 | ERROR | UTF-8 text; the connection then ends | both |
//! | 7 | HEARTBEAT | empty (every 2 s; a receiver hangs up after 15 s of silence) | sender |
//! | 8 | ASSOC_UPSERT | count `u16` (at most 2048), count × association record | sender |
//! | 9 | ASSOC_REMOVE | count `u16`, count × association id | sender |
//! | 10 | RESYNC | empty: send a full snapshot again | receiver |
//!
//! The sender (the connecting side) sends HELLO; the receiver answers
//! HELLO, or ERROR (another protocol or layout version, named in the
//! text) and closes. Then SNAPSHOT_BEGIN, UPSERTs,
//! SNAPSHOT_END, then changes (UPSERT, REMOVE) for as long as the
//! connection lasts; after the receiver's RESYNC, another snapshot. At
//! SNAPSHOT_END the receiver removes entries an earlier sync installed
//! that the snapshot did not hold.
//!
//! A key (37 bytes): source address 16, destination address 16, source
//! port 2, destination port 2, protocol 1.
//!
//! A record (182 bytes), by offset: 0 key; 37 peer key (the other
//! direction's entry); 74 translated source address 16; 90 translated
//! destination address 16 (a DSR session's endpoint); 106 translated
//! source port 2; 108 translated destination port 2; 110 rule VIP 16; 126
//! rule port 2; 128 rule protocol 1; 129 endpoint address 16; 145
//! endpoint port 2; 147 direction 1; 148 state 1; 149 mode 1; 150 idle
//! timeout in seconds `u32`; 154 SCTP tag 4; 158 age in ns `u64`; 166
//! packets `u64`; 174 bytes `u64`. (Protocol version 2 had a DSR endpoint
//! address of its own at 110.)
//!
//! An association id (23 bytes): rule VIP 16, rule port 2, rule protocol
//! 1, verification tag 4. An association record (317 bytes): 0 id (23);
//! 23 `eps`, 87 `vips`, 151 `clients`, 215 `xclients` (4 addresses
//! each, 64 bytes); 279 `ep_port`, 281 `vport`, 283 `cport`, 285
//! `xcport` (2 each); 287 `n_pairs`, 288 `n_clients`, 289 `n_vips`, 290
//! `mode` (1 each); 291 `ctag` 4; 295 `etag` 4; 299 endpoint address 16;
//! 315 endpoint port 2. A snapshot sends the associations after the
//! conntrack entries, before SNAPSHOT_END.
//!
//! # Wiring into the agent
//!
//! After the datapath is loaded with its pin directory:
//! `let sync = Syncer::start(pin_dir, Config { listen, peers, tls_dir,
//! .. })?;` (a backup: listening). Whenever the VIPs this node owns
//! change: `sync.set_owned(Owned::Vips(vips))`, before announcing the
//! VIPs it gains. `sync.stats()` or the `state_file` for the
//! CLI; dropping the `Syncer` (or `sync.stop()`) ends it.
//!
//! # Stats
//!
//! [`Syncer::stats`] returns a [`Stats`]; with `state_file` set the same
//! is written there as JSON every second (for a CLI).

mod delta;
mod engine;
mod net;
pub mod table;
mod tls;
pub mod wire;
mod xlate;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

pub use engine::{ApplyStats, Owned};
pub use table::{MemState, MemTable, PinnedTable, SessionTable};
/// PEM loading, shared with the REST API's listener.
pub(crate) use tls::{certs as read_pem_certs, key as read_pem_key};
pub use tls::{CA_FILE, CERT_FILE, KEY_FILE};

/// The port the sync listens on and dials when none is given.
pub const DEFAULT_PORT: u16 = 22222;

/// Peers from a comma-separated list of `host[:port]` (IP addresses or
/// names, resolved now; an IPv6 address with a port in brackets), the
/// port [`DEFAULT_PORT`] when missing. For a `--ctsync-peers` flag.
pub fn parse_peers(list: &str) -> Result<Vec<SocketAddr>> {
    use std::net::{IpAddr, ToSocketAddrs};
    let mut out = vec![];
    for p in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if let Ok(ip) = p.parse::<IpAddr>() {
            out.push(SocketAddr::new(ip, DEFAULT_PORT));
            continue;
        }
        let with_port = if p.rsplit_once(':').is_some_and(|(h, port)| {
            !h.is_empty() && port.parse::<u16>().is_ok() && (!h.contains(':') || h.ends_with(']'))
        }) {
            p.to_string()
        } else {
            format!("{p}:{DEFAULT_PORT}")
        };
        let addrs: Vec<SocketAddr> = with_port
            .to_socket_addrs()
            .with_context(|| {
                format!("ctsync peer {p:?}: not an address, or a name that does not resolve")
            })?
            .collect();
        let first = addrs
            .first()
            .copied()
            .ok_or_else(|| anyhow!("ctsync peer {p:?}: the name resolves to no address"))?;
        out.push(first);
    }
    Ok(out)
}

/// How the agent runs the sync.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where a backup accepts senders (`None`: this node never receives).
    pub listen: Option<SocketAddr>,
    /// The other agents, dialled while this node owns VIPs.
    pub peers: Vec<SocketAddr>,
    /// `ca.crt`, `tls.crt`, `tls.key` (PEM).
    pub tls_dir: PathBuf,
    /// A name the peers' certificates must carry; `None`: any certificate
    /// the CA signed.
    pub server_name: Option<String>,
    /// How often a node owning VIPs scans its session table.
    pub interval: Duration,
    /// Longest a backup's copy of a live entry lags its last packet.
    pub refresh: Duration,
    /// Most entries per message (2..=4096).
    pub batch: usize,
    /// Batches queued per receiver before it is dropped to a full resync
    /// (a burst of more than `queue` × `batch` changes in one scan also
    /// resyncs). Batches are shared by all receivers: at most about
    /// `queue` × `batch` × 198 bytes are held.
    pub queue: usize,
    /// Write [`Stats`] here as JSON every second.
    pub state_file: Option<PathBuf>,
    /// This node's name, sent in the hello (logs of the peers).
    pub node_name: String,
    /// This agent's leader-election identity, sent in the hello: a backup
    /// that finds this agent dead names it in its takeover hint. Empty:
    /// no hints about this agent.
    pub identity: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: None,
            peers: vec![],
            tls_dir: PathBuf::from("/etc/loxilb/ctsync"),
            server_name: None,
            interval: Duration::from_millis(250),
            refresh: Duration::from_secs(5),
            batch: 512,
            queue: 256,
            state_file: None,
            node_name: String::new(),
            identity: String::new(),
        }
    }
}

impl Config {
    fn check(&self) -> Result<()> {
        if self.interval < Duration::from_millis(10) {
            bail!("the ctsync interval must be at least 10 ms");
        }
        if !(2..=wire::MAX_BATCH).contains(&self.batch) {
            bail!("the ctsync batch must be 2 to {} entries", wire::MAX_BATCH);
        }
        if self.queue == 0 {
            bail!("the ctsync queue must hold at least one batch");
        }
        Ok(())
    }
}

/// The sync's state and counters (for a CLI).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Stats {
    /// `active` (owns VIPs: streams their sessions; a backup for the
    /// others) or `backup` (owns none).
    pub role: String,
    /// The VIPs whose sessions this node streams: `all`, `none` or a
    /// comma-separated list.
    pub owned: String,
    pub listen: Option<String>,
    /// Active: scans done, entries in the last, how long it took.
    pub scans: u64,
    pub last_scan_entries: u64,
    pub last_scan_ms: f64,
    /// Entries of the last scan left out: their rule or endpoint is gone
    /// from this node's tables.
    pub skipped_last_scan: u64,
    /// Entries of the last scan not streamed: their VIP is another
    /// node's (synced from it, or left from before a VIP moved).
    pub not_owned_last_scan: u64,
    /// Entries found new or changed, and keys found removed, over all scans.
    pub changes: u64,
    pub removals: u64,
    /// SCTP association records in the last scan; their changes and
    /// removals over all scans.
    pub last_scan_assocs: u64,
    pub assoc_changes: u64,
    pub last_error: Option<String>,
    /// Times the TLS certificates were reloaded after their files changed.
    pub tls_reloads: u64,
    /// Active: one per configured peer.
    pub peers: Vec<PeerStats>,
    /// Backup: what senders sent.
    pub inbound: InboundStats,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct PeerStats {
    pub addr: String,
    /// `idle` (backup), `connecting`, `snapshot`, `streaming`, `error`.
    pub state: String,
    pub connects: u64,
    pub entries_sent: u64,
    pub removes_sent: u64,
    /// SCTP association records and removals sent (outside snapshots).
    pub assocs_sent: u64,
    pub snapshots: u64,
    /// Full resyncs because the receiver fell behind.
    pub resyncs: u64,
    /// Full resyncs the receiver asked for (its rules changed after it
    /// had dropped entries for want of them).
    pub resyncs_asked: u64,
    pub last_snapshot_unix: Option<u64>,
    pub last_error: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct InboundStats {
    /// Senders accepted, and connected now.
    pub connections: u64,
    pub connected: u64,
    /// Refused: TLS (plaintext, no certificate, another CA, ...).
    pub refused_tls: u64,
    /// Refused: bad hello (another protocol or layout version, ...).
    pub refused_hello: u64,
    /// Senders whose connection ended and whose listener then refused a
    /// connection: found dead, a takeover hint given (see the module
    /// documentation); the last one, and when.
    pub senders_dead: u64,
    pub last_dead: Option<String>,
    pub last_refused: Option<String>,
    pub last_sender: Option<String>,
    pub last_error: Option<String>,
    pub last_snapshot_unix: Option<u64>,
    /// Entries this node holds because a sender sent them.
    pub tracked: u64,
    #[serde(flatten)]
    pub apply: ApplyStats,
}

/// A running sync (its own thread and runtime). Dropping it stops it.
pub struct Syncer {
    owned: Option<watch::Sender<Owned>>,
    peers: watch::Sender<Vec<SocketAddr>>,
    hints: Mutex<Option<mpsc::UnboundedReceiver<String>>>,
    ctx: Arc<net::Ctx>,
    local: Option<SocketAddr>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Syncer {
    /// Start on the maps pinned in `pin_dir` (the agent's `--pin-dir`;
    /// the datapath must be loaded). Starts as a backup (listening when
    /// `config.listen` is set); call [`Syncer::set_owned`] (or
    /// [`Syncer::set_active`]) when this node holds VIPs. Fails with the file or address at fault when the
    /// maps, the certificates or the listening address are unusable.
    pub fn start(pin_dir: &Path, config: Config) -> Result<Syncer> {
        let table = PinnedTable::open(pin_dir)
            .with_context(|| format!("ctsync: the datapath maps in {}", pin_dir.display()))?;
        Self::start_with_table(Box::new(table), config)
    }

    /// [`Syncer::start`] on any [`SessionTable`] (tests: [`MemTable`]).
    pub fn start_with_table(table: Box<dyn SessionTable>, config: Config) -> Result<Syncer> {
        config.check()?;
        let tls = tls::TlsSource::load(&config.tls_dir, config.server_name.as_deref())
            .context("ctsync: loading the TLS certificates")?;
        let listener = match config.listen {
            Some(a) => {
                let l = std::net::TcpListener::bind(a)
                    .with_context(|| format!("ctsync: cannot listen on {a}"))?;
                l.set_nonblocking(true)?;
                Some(l)
            }
            None => None,
        };
        let local = listener.as_ref().map(|l| l.local_addr()).transpose()?;
        let (owned_tx, owned_rx) = watch::channel(Owned::None);
        let (hint_tx, hint_rx) = mpsc::unbounded_channel();
        let (peers_tx, peers_rx) = watch::channel(peers_but_self(&config.peers, local));
        let stats = Stats {
            role: "backup".into(),
            owned: Owned::None.describe(),
            listen: local.map(|a| a.to_string()),
            peers: peer_stats(&[], &peers_but_self(&config.peers, local)),
            ..Default::default()
        };
        let ctx = Arc::new(net::Ctx {
            cfg: config,
            tls: Arc::new(tls),
            table: Arc::new(Mutex::new(table)),
            applier: Default::default(),
            stats: Mutex::new(stats),
            owned: owned_rx,
            subs: Mutex::new(vec![]),
            listen_port: local.map_or(0, |a| a.port()),
            dead: hint_tx,
            peers: peers_rx,
        });
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("ctsync: starting its runtime")?;
        let c = ctx.clone();
        let thread = std::thread::Builder::new()
            .name("ctsync".into())
            .spawn(move || rt.block_on(run(c, listener)))
            .context("ctsync: starting its thread")?;
        Ok(Syncer {
            owned: Some(owned_tx),
            peers: peers_tx,
            hints: Mutex::new(Some(hint_rx)),
            ctx,
            local,
            thread: Some(thread),
        })
    }

    /// This node now holds every VIP (`true`: scan and send every
    /// session, take none) or none (`false`: only receive).
    pub fn set_active(&self, active: bool) {
        self.set_owned(if active { Owned::All } else { Owned::None });
    }

    /// This node now holds the VIPs of `owned`: it streams their sessions
    /// to the peers, and takes the sessions of every other VIP from their
    /// owners. The synced sessions of a VIP it takes are its own from now
    /// on; the sessions of a VIP it gives up stay (the new owner streams
    /// them here).
    pub fn set_owned(&self, owned: Owned) {
        // At once, not at the sync thread's next turn: from here on no
        // sender's record overwrites a session of these VIPs.
        self.ctx
            .applier
            .lock()
            .expect("applier lock")
            .set_owned(&owned);
        if let Some(a) = &self.owned {
            a.send_if_modified(|o| {
                let changed = *o != owned;
                *o = owned;
                changed
            });
        }
    }

    /// Dial these peers while owning VIPs (replacing the configured ones;
    /// this node's own listening address is left out, so one list serves
    /// every node). Connections to peers no longer listed close; new ones
    /// are dialled at once when owning VIPs.
    pub fn set_peers(&self, peers: Vec<SocketAddr>) {
        let want = peers_but_self(&peers, self.local);
        self.peers.send_if_modified(|p| {
            let changed = *p != want;
            if changed {
                info!("ctsync: peers now {want:?}");
                *p = want;
            }
            changed
        });
    }

    /// The Lease identities of senders found dead (see the module
    /// documentation), as they are found; `None` after the first call.
    pub fn takeover_hints(&self) -> Option<mpsc::UnboundedReceiver<String>> {
        self.hints.lock().expect("hints lock").take()
    }

    /// The address the listener is bound to (with port 0 in `listen`, the
    /// one the kernel chose).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local
    }

    pub fn stats(&self) -> Stats {
        let reloads = self.ctx.tls.reloads();
        self.ctx.stats(|s| {
            s.tls_reloads = reloads;
            s.clone()
        })
    }

    /// Stop (connections close; entries already written stay).
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.owned.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The running peer tasks, by address.
type Peers = std::collections::HashMap<SocketAddr, tokio::task::AbortHandle>;

/// `peers` without this node's own listening address, each once.
fn peers_but_self(peers: &[SocketAddr], local: Option<SocketAddr>) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = vec![];
    for p in peers {
        if Some(*p) != local && !out.contains(p) {
            out.push(*p);
        }
    }
    out
}

/// The counters of `peers`, kept from `old` for peers still listed.
fn peer_stats(old: &[PeerStats], peers: &[SocketAddr]) -> Vec<PeerStats> {
    peers
        .iter()
        .map(|a| {
            let addr = a.to_string();
            old.iter()
                .find(|p| p.addr == addr)
                .cloned()
                .unwrap_or(PeerStats {
                    addr,
                    state: "idle".into(),
                    ..Default::default()
                })
        })
        .collect()
}

/// The syncer's main task: the listener always; the scanner and the
/// peers while this node owns VIPs. Ends when the [`Syncer`] is dropped.
async fn run(ctx: Arc<net::Ctx>, listener: Option<std::net::TcpListener>) {
    let mut bg = tokio::task::JoinSet::new();
    if let Some(l) = listener {
        match tokio::net::TcpListener::from_std(l) {
            Ok(l) => {
                bg.spawn(net::listen(ctx.clone(), l));
            }
            Err(e) => warn!("ctsync: the listener: {e}"),
        }
    }
    if let Some(path) = ctx.cfg.state_file.clone() {
        bg.spawn(write_state(ctx.clone(), path));
    }
    let mut owned = ctx.owned.clone();
    let mut peers_rx = ctx.peers.clone();
    // While this node owns VIPs: the scanner, and one task per peer.
    let mut sending: Option<(tokio::task::JoinSet<()>, Peers)> = None;
    loop {
        let o = owned.borrow_and_update().clone();
        let want = peers_rx.borrow_and_update().clone();
        ctx.stats(|s| {
            s.peers = peer_stats(&s.peers, &want);
            s.owned = o.describe();
        });
        if o.any() {
            let (_, running) = sending.get_or_insert_with(|| {
                info!(
                    "ctsync: active for {}: sending their sessions to {want:?}",
                    o.describe()
                );
                ctx.stats(|s| s.role = "active".into());
                let mut js = tokio::task::JoinSet::new();
                js.spawn(net::scanner(ctx.clone()));
                (js, Peers::default())
            });
            running.retain(|p, h| {
                let keep = want.contains(p);
                if !keep {
                    h.abort();
                }
                keep
            });
            for p in &want {
                if !running.contains_key(p) {
                    running.insert(*p, tokio::spawn(net::peer(ctx.clone(), *p)).abort_handle());
                }
            }
        } else {
            if let Some((mut js, running)) = sending.take() {
                info!("ctsync: backup: receiving sessions");
                js.abort_all();
                for h in running.values() {
                    h.abort();
                }
                while js.join_next().await.is_some() {}
                ctx.subs.lock().expect("subs lock").clear();
            }
            ctx.stats(|s| {
                s.role = "backup".into();
                for p in &mut s.peers {
                    p.state = "idle".into();
                }
            });
        }
        tokio::select! {
            r = owned.changed() => if r.is_err() { break },
            r = peers_rx.changed() => if r.is_err() { break },
        }
    }
    if let Some((mut js, running)) = sending.take() {
        js.abort_all();
        for h in running.values() {
            h.abort();
        }
    }
    bg.abort_all();
}

async fn write_state(ctx: Arc<net::Ctx>, path: PathBuf) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut warned = false;
    loop {
        tick.tick().await;
        let reloads = ctx.tls.reloads();
        let json = ctx.stats(|s| {
            s.tls_reloads = reloads;
            serde_json::to_vec_pretty(s)
        });
        let r = json.map_err(|e| anyhow!(e)).and_then(|j| {
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, j)?;
            std::fs::rename(&tmp, &path)?;
            Ok(())
        });
        if let Err(e) = r {
            if !warned {
                warn!("ctsync: writing {}: {e:#}", path.display());
                warned = true;
            }
        }
    }
}

/// Read the stats a running agent writes to `path` (for the CLI).
pub fn read_state(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read(path).with_context(|| {
        format!(
            "cannot read {}; is the agent running with conntrack sync?",
            path.display()
        )
    })?;
    serde_json::from_slice(&text).with_context(|| format!("{} is not valid JSON", path.display()))
}

#[cfg(test)]
mod tests;
