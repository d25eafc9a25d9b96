//! Endpoint health probes (`loxilb.io/liveness`, `probetype`, `probeport`,
//! `probereq`, `proberesp`, `probetimeout`, `proberetries`).
//!
//! A [`Prober`] holds a set of targets — (rule, endpoint address, endpoint
//! port) with a [`ProbeSpec`] — and probes each one on its own schedule
//! from lightweight Tokio tasks (no thread per endpoint). At most
//! `max_in_flight` probes run at once (a semaphore), so 4,096 endpoints do
//! not open 4,096 sockets together. Every change of an endpoint's liveness
//! is sent on the transition channel as a [`Transition`]; the agent turns
//! it into `Datapath::set_endpoint_flags(key, ep_flags::INACTIVE or 0)`.
//! [`Prober::snapshot`] gives every target's state, last result and
//! latency (for the CLI).
//!
//! Probe types (`ProbeKind`):
//!
//! | kind | up when | down when |
//! |---|---|---|
//! | `tcp` | the TCP connection is established (then reset: no TIME_WAIT on the node) | refused, unreachable, or no answer before the timeout |
//! | `udp` | `proberesp` unset: a reply, or no ICMP error within min(timeout/2, 1 s); set: a reply containing it | ICMP port unreachable; with `proberesp`, a reply without it or no reply before the timeout |
//! | `http`, `https` | `GET /<probereq>` answers 2xx (and, with `proberesp`, a body containing it) | anything else. **https does not verify the server's certificate** (endpoints are addressed by IP and commonly use self-signed certificates, as with loxilb) |
//! | `sctp` | INIT answered with INIT-ACK (then ABORT, so no association stays), over a raw IPv4 socket (protocol 132, CRC32c): works without kernel SCTP | ABORT, ICMP unreachable, or no answer before the timeout |
//! | `ping` | ICMP echo reply (raw socket; ICMP datagram socket when raw is not permitted) | no reply before the timeout, ICMP error |
//! | `none` | always (not probed) | never |
//!
//! A `udp` probe without `response` relies on the endpoint's kernel
//! answering ICMP port unreachable; Linux rate-limits those per peer
//! (`net.ipv4.icmp_ratelimit`, one a second after a small burst), which
//! probe intervals of seconds stay under. It holds its in-flight slot for
//! its quiet window (at most 1 s): with thousands of such endpoints, raise
//! `max_in_flight`. IPv6 endpoints work for `tcp`, `udp`, `http`, `https`;
//! `ping` and `sctp` are IPv4 only for now (refused with an error).
//!
//! A probe's settings ([`ProbeSpec`], [`ProbeKind`], their checks) are
//! the rule model's (`loxilb_model::probe`): a rule carries them whichever
//! front end made it (rule file, REST API, Kubernetes annotations); this
//! module probes.
//!
//! Schedule and state machine:
//!
//! - A target's first probe runs at a random point within its first
//!   interval (spreads thousands of new targets); after that a probe
//!   starts every `interval` ±10 % (jitter), measured from the start of
//!   the previous probe; a probe slower than the interval is followed at
//!   once by the next (never two at a time for one target).
//! - Each probe is bounded by `timeout`, which counts from when it got its
//!   in-flight slot.
//! - A target starts **up** (endpoints are installed active), `retries`
//!   consecutive failures make it **down** (`retries` 0 behaves as 1),
//!   and one success makes it up again (no rise hysteresis).
//! - A transition is sent the moment the deciding probe completes, so the
//!   datapath follows within one probe interval of the probe that decided.
//!
//! Targets are replaced as a set ([`Prober::set_targets`], or per rule with
//! [`Prober::set_rule_targets`]): an unchanged target keeps its task and
//! state; a target whose spec changed keeps its up/down state and restarts
//! probing with the new spec; a removed target stops without a
//! transition. Settings are validated first ([`ProbeSpec::validate`]); one
//! bad target rejects the whole call with an error naming it and the field.

mod http;
mod icmp;
mod raw;
mod sctp;
mod tcp;
mod udp;

use std::{
    collections::{HashMap, HashSet},
    fmt,
    future::Future,
    hash::{Hash, Hasher},
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};
use tokio::{
    runtime::Handle,
    sync::{mpsc, Semaphore},
    task::AbortHandle,
    time::Instant,
};

/// CRC32c (SCTP's checksum): the one implementation, shared with the datapath.
pub use loxilb_common::crc32c::crc32c;

use loxilb_model::probe::quote;
pub use loxilb_model::probe::{
    fmt_dur, ProbeError, ProbeKind, ProbeSpec, DEFAULT_INTERVAL, DEFAULT_RETRIES, DEFAULT_TIMEOUT,
    MAX_INTERVAL, MAX_RETRIES, MAX_TEXT, MAX_TIMEOUT, MIN_DURATION,
};

/// Probes in flight at once, over all targets, when the agent has no reason
/// to choose another bound.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 256;
/// Jitter applied to every interval, percent either way.
pub const JITTER_PERCENT: u64 = 10;
/// Longest a `udp` probe without `response` waits for an ICMP error.
pub const UDP_QUIET_MAX: Duration = Duration::from_secs(1);

/// One probed endpoint of one rule.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TargetKey {
    /// The rule (its unique name).
    pub rule: String,
    pub addr: IpAddr,
    /// The endpoint's port (probed unless the spec names another).
    pub port: u16,
}

impl TargetKey {
    pub fn new(rule: impl Into<String>, addr: IpAddr, port: u16) -> Self {
        TargetKey {
            rule: rule.into(),
            addr,
            port,
        }
    }
}

impl fmt::Display for TargetKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rule {} endpoint {}",
            self.rule,
            SocketAddr::new(self.addr, self.port)
        )
    }
}

/// A target and how to probe it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub key: TargetKey,
    pub spec: ProbeSpec,
}

impl Target {
    pub fn new(key: TargetKey, spec: ProbeSpec) -> Self {
        Target { key, spec }
    }

    /// Where the probe goes (port unused for `ping`).
    pub fn probe_addr(&self) -> SocketAddr {
        SocketAddr::new(self.key.addr, self.spec.port.unwrap_or(self.key.port))
    }

    /// [`ProbeSpec::validate`] plus what depends on the endpoint.
    pub fn validate(&self) -> Result<(), ProbeError> {
        let named = |mut e: ProbeError| {
            e.target = Some(self.key.to_string());
            e
        };
        self.spec.validate().map_err(named)?;
        let k = self.spec.kind;
        if k.uses_port() && self.probe_addr().port() == 0 {
            return Err(named(ProbeError {
                target: None,
                field: "port",
                value: "0".into(),
                message: format!(
                    "a {k} probe needs a port: the endpoint has none, set the probe port"
                ),
            }));
        }
        if self.key.addr.is_ipv6() && matches!(k, ProbeKind::Ping | ProbeKind::Sctp) {
            return Err(named(ProbeError {
                target: None,
                field: "address",
                value: self.key.addr.to_string(),
                message: format!("{k} probes of IPv6 endpoints are not implemented yet"),
            }));
        }
        Ok(())
    }
}

/// An endpoint's liveness changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    pub key: TargetKey,
    pub up: bool,
    /// The result of the probe that decided (or why probing stopped deciding).
    pub reason: String,
}

/// What [`Prober::set_targets`] changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SetReport {
    pub added: Vec<TargetKey>,
    /// Spec changed: probing restarted, up/down kept.
    pub changed: Vec<TargetKey>,
    pub removed: Vec<TargetKey>,
    pub unchanged: usize,
}

/// One target's state, for the CLI (serializable, so the agent can hand
/// it to the CLI process).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetStatus {
    pub key: TargetKey,
    pub kind: ProbeKind,
    /// Where the probe goes.
    pub probe_addr: SocketAddr,
    pub up: bool,
    /// Whether any probe completed (a new target is up before that).
    pub probed: bool,
    /// Result of the last probe: what succeeded, or why it failed.
    pub last_result: String,
    pub last_ok: Option<bool>,
    /// Duration of the last probe (successful or not).
    pub last_latency: Option<Duration>,
    pub consecutive_failures: u32,
    pub probes: u64,
    pub failures: u64,
    pub last_probe: Option<SystemTime>,
    /// When `up` last changed.
    pub last_change: Option<SystemTime>,
}

impl TargetStatus {
    /// `up`, `down`, `up (not probed yet)` or `up (not probed)`.
    pub fn state(&self) -> &'static str {
        match (self.kind, self.up, self.probed) {
            (ProbeKind::None, _, _) => "up (not probed)",
            (_, true, false) => "up (not probed yet)",
            (_, true, true) => "up",
            (_, false, _) => "down",
        }
    }
}

/// The pure up/down state machine of one target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Health {
    pub up: bool,
    pub probed: bool,
    pub consecutive_failures: u32,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            up: true,
            probed: false,
            consecutive_failures: 0,
        }
    }
}

impl Health {
    /// Record one probe result; returns the new liveness when it changed.
    pub fn record(&mut self, ok: bool, spec: &ProbeSpec) -> Option<bool> {
        self.probed = true;
        if ok {
            self.consecutive_failures = 0;
            if !self.up {
                self.up = true;
                return Some(true);
            }
        } else {
            self.consecutive_failures = self.consecutive_failures.saturating_add(1);
            if self.up && self.consecutive_failures >= spec.failures_to_down() {
                self.up = false;
                return Some(false);
            }
        }
        None
    }
}

/// The result of one probe: `Ok(what answered)` or `Err(why it failed)`.
pub type ProbeResult = Result<String, String>;

/// Boxed future of one probe.
pub type ProbeFuture<'a> = Pin<Box<dyn Future<Output = ProbeResult> + Send + 'a>>;

/// Runs one probe. [`NetCheck`] does it on the network; tests plug in
/// scripted outcomes. The prober applies the timeout around it.
pub trait Check: Send + Sync + 'static {
    fn check<'a>(&'a self, addr: SocketAddr, spec: &'a ProbeSpec) -> ProbeFuture<'a>;
}

/// The real probes.
#[derive(Clone, Copy, Debug, Default)]
pub struct NetCheck;

impl Check for NetCheck {
    fn check<'a>(&'a self, addr: SocketAddr, spec: &'a ProbeSpec) -> ProbeFuture<'a> {
        Box::pin(async move {
            match spec.kind {
                ProbeKind::None => Ok("not probed".into()),
                ProbeKind::Tcp => tcp::check(addr).await,
                ProbeKind::Udp => udp::check(addr, spec).await,
                ProbeKind::Http => http::check(addr, spec, false).await,
                ProbeKind::Https => http::check(addr, spec, true).await,
                ProbeKind::Sctp => sctp::check(addr).await,
                ProbeKind::Ping => icmp::check(addr.ip()).await,
            }
        })
    }
}

struct Entry {
    spec: Arc<ProbeSpec>,
    /// Identifies the task that may update this entry.
    generation: u64,
    health: Health,
    last_result: String,
    last_ok: Option<bool>,
    last_latency: Option<Duration>,
    probes: u64,
    failures: u64,
    last_probe: Option<SystemTime>,
    last_change: Option<SystemTime>,
    task: Option<AbortHandle>,
}

impl Entry {
    fn new(spec: Arc<ProbeSpec>, generation: u64) -> Self {
        let last_result = if spec.kind == ProbeKind::None {
            "not probed (probe type none)"
        } else {
            "not probed yet"
        };
        Entry {
            spec,
            generation,
            health: Health::default(),
            last_result: last_result.into(),
            last_ok: None,
            last_latency: None,
            probes: 0,
            failures: 0,
            last_probe: None,
            last_change: None,
            task: None,
        }
    }
}

struct Shared {
    targets: Mutex<HashMap<TargetKey, Entry>>,
    slots: Arc<Semaphore>,
    tx: mpsc::UnboundedSender<Transition>,
    check: Arc<dyn Check>,
    generation: AtomicU64,
}

impl Shared {
    /// Store a probe result; false when the target is gone or was replaced
    /// (the task then ends).
    fn record(
        &self,
        key: &TargetKey,
        generation: u64,
        result: ProbeResult,
        latency: Duration,
    ) -> bool {
        let mut targets = self.targets.lock().unwrap();
        let Some(e) = targets.get_mut(key) else {
            return false;
        };
        if e.generation != generation {
            return false;
        }
        let ok = result.is_ok();
        e.probes += 1;
        if !ok {
            e.failures += 1;
        }
        let now = SystemTime::now();
        e.last_probe = Some(now);
        e.last_ok = Some(ok);
        e.last_latency = Some(latency);
        e.last_result = match result {
            Ok(s) | Err(s) => s,
        };
        if let Some(up) = e.health.record(ok, &e.spec) {
            e.last_change = Some(now);
            let reason = if up {
                e.last_result.clone()
            } else {
                format!(
                    "{} ({} failed probe{} in a row)",
                    e.last_result,
                    e.health.consecutive_failures,
                    if e.health.consecutive_failures == 1 {
                        ""
                    } else {
                        "s"
                    }
                )
            };
            let _ = self.tx.send(Transition {
                key: key.clone(),
                up,
                reason,
            });
        }
        true
    }
}

/// The prober: targets, their tasks and their state. Dropping it stops
/// every probe.
pub struct Prober {
    shared: Arc<Shared>,
    rt: Handle,
    max_in_flight: usize,
}

impl Prober {
    /// A prober running real probes on the current Tokio runtime, at most
    /// `max_in_flight` at once. Returns the receiver of liveness
    /// transitions (drain it; dropping it just discards them).
    ///
    /// Panics outside a Tokio runtime, or if `max_in_flight` is 0.
    pub fn new(max_in_flight: usize) -> (Prober, mpsc::UnboundedReceiver<Transition>) {
        Self::with_check(Handle::current(), max_in_flight, Arc::new(NetCheck))
    }

    /// A prober on runtime `rt` with probes done by `check`.
    pub fn with_check(
        rt: Handle,
        max_in_flight: usize,
        check: Arc<dyn Check>,
    ) -> (Prober, mpsc::UnboundedReceiver<Transition>) {
        assert!(
            max_in_flight > 0,
            "Prober: max_in_flight must be at least 1"
        );
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            targets: Mutex::new(HashMap::new()),
            slots: Arc::new(Semaphore::new(max_in_flight)),
            tx,
            check,
            generation: AtomicU64::new(1),
        });
        (
            Prober {
                shared,
                rt,
                max_in_flight,
            },
            rx,
        )
    }

    pub fn max_in_flight(&self) -> usize {
        self.max_in_flight
    }

    /// Probes running right now.
    pub fn in_flight(&self) -> usize {
        self.max_in_flight - self.shared.slots.available_permits()
    }

    /// Make the target set exactly `targets` (all rules). Validates every
    /// target first; on error nothing changes.
    pub fn set_targets(
        &self,
        targets: impl IntoIterator<Item = Target>,
    ) -> Result<SetReport, ProbeError> {
        self.apply(None, targets.into_iter().collect())
    }

    /// Make `rule`'s targets exactly `targets` (other rules untouched).
    /// Every target must belong to `rule`.
    pub fn set_rule_targets(
        &self,
        rule: &str,
        targets: impl IntoIterator<Item = Target>,
    ) -> Result<SetReport, ProbeError> {
        self.apply(Some(rule), targets.into_iter().collect())
    }

    /// Stop probing every target of `rule`.
    pub fn remove_rule(&self, rule: &str) -> SetReport {
        self.apply(Some(rule), vec![])
            .expect("removing targets cannot fail")
    }

    fn apply(&self, scope: Option<&str>, desired: Vec<Target>) -> Result<SetReport, ProbeError> {
        let mut seen = HashSet::new();
        for t in &desired {
            t.validate()?;
            if let Some(rule) = scope {
                if t.key.rule != rule {
                    return Err(ProbeError {
                        target: Some(t.key.to_string()),
                        field: "target",
                        value: t.key.rule.clone(),
                        message: format!("given in the targets of rule {rule}"),
                    });
                }
            }
            if !seen.insert(&t.key) {
                return Err(ProbeError {
                    target: Some(t.key.to_string()),
                    field: "target",
                    value: SocketAddr::new(t.key.addr, t.key.port).to_string(),
                    message: "listed twice".into(),
                });
            }
        }
        let mut report = SetReport::default();
        let mut targets = self.shared.targets.lock().unwrap();
        let gone: Vec<TargetKey> = targets
            .keys()
            .filter(|k| scope.is_none_or(|r| k.rule == r) && !seen.contains(k))
            .cloned()
            .collect();
        for k in gone {
            if let Some(e) = targets.remove(&k) {
                if let Some(t) = e.task {
                    t.abort();
                }
            }
            report.removed.push(k);
        }
        for t in desired {
            let generation = self.shared.generation.fetch_add(1, Ordering::Relaxed);
            let spec = Arc::new(t.spec);
            match targets.get_mut(&t.key) {
                Some(e) if *e.spec == *spec => {
                    report.unchanged += 1;
                    continue;
                }
                Some(e) => {
                    if let Some(task) = e.task.take() {
                        task.abort();
                    }
                    e.spec = spec.clone();
                    e.generation = generation;
                    e.health.consecutive_failures = 0;
                    if spec.kind == ProbeKind::None {
                        e.last_result = "not probed (probe type none)".into();
                        if !e.health.up {
                            e.health.up = true;
                            e.last_change = Some(SystemTime::now());
                            let _ = self.shared.tx.send(Transition {
                                key: t.key.clone(),
                                up: true,
                                reason: "probing turned off (probe type none)".into(),
                            });
                        }
                    }
                    report.changed.push(t.key.clone());
                }
                None => {
                    targets.insert(t.key.clone(), Entry::new(spec.clone(), generation));
                    report.added.push(t.key.clone());
                }
            }
            if spec.kind != ProbeKind::None {
                let task = self.rt.spawn(run_target(
                    self.shared.clone(),
                    t.key.clone(),
                    spec,
                    generation,
                ));
                targets.get_mut(&t.key).unwrap().task = Some(task.abort_handle());
            }
        }
        report.added.sort();
        report.changed.sort();
        report.removed.sort();
        Ok(report)
    }

    /// Every target's state, sorted by key.
    pub fn snapshot(&self) -> Vec<TargetStatus> {
        let targets = self.shared.targets.lock().unwrap();
        let mut v: Vec<TargetStatus> = targets.iter().map(|(k, e)| status(k, e)).collect();
        v.sort_by(|a, b| a.key.cmp(&b.key));
        v
    }

    /// One target's state.
    pub fn status(&self, key: &TargetKey) -> Option<TargetStatus> {
        let targets = self.shared.targets.lock().unwrap();
        targets.get(key).map(|e| status(key, e))
    }

    /// Whether `key` is up (`None`: not a target).
    pub fn is_up(&self, key: &TargetKey) -> Option<bool> {
        let targets = self.shared.targets.lock().unwrap();
        targets.get(key).map(|e| e.health.up)
    }

    /// Targets currently down.
    pub fn down(&self) -> Vec<TargetKey> {
        let targets = self.shared.targets.lock().unwrap();
        let mut v: Vec<TargetKey> = targets
            .iter()
            .filter(|(_, e)| !e.health.up)
            .map(|(k, _)| k.clone())
            .collect();
        v.sort();
        v
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        let mut targets = self.shared.targets.lock().unwrap();
        for (_, e) in targets.drain() {
            if let Some(t) = e.task {
                t.abort();
            }
        }
    }
}

fn status(k: &TargetKey, e: &Entry) -> TargetStatus {
    TargetStatus {
        key: k.clone(),
        kind: e.spec.kind,
        probe_addr: SocketAddr::new(k.addr, e.spec.port.unwrap_or(k.port)),
        up: e.health.up,
        probed: e.health.probed,
        last_result: e.last_result.clone(),
        last_ok: e.last_ok,
        last_latency: e.last_latency,
        consecutive_failures: e.health.consecutive_failures,
        probes: e.probes,
        failures: e.failures,
        last_probe: e.last_probe,
        last_change: e.last_change,
    }
}

/// One target's probe loop.
async fn run_target(shared: Arc<Shared>, key: TargetKey, spec: Arc<ProbeSpec>, generation: u64) {
    let addr = SocketAddr::new(key.addr, spec.port.unwrap_or(key.port));
    let mut rng = Rng::seeded(&key, generation);
    let mut next = Instant::now() + rng.below(spec.interval);
    loop {
        tokio::time::sleep_until(next).await;
        let Ok(_slot) = shared.slots.clone().acquire_owned().await else {
            return;
        };
        let started = Instant::now();
        let result = match tokio::time::timeout(spec.timeout, shared.check.check(addr, &spec)).await
        {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {}", fmt_dur(spec.timeout))),
        };
        let latency = started.elapsed();
        drop(_slot);
        if !shared.record(&key, generation, result, latency) {
            return;
        }
        next = started + rng.jittered(spec.interval);
    }
}

/// Small xorshift generator for jitter (no need for a crypto RNG).
struct Rng(u64);

impl Rng {
    fn seeded(key: &TargetKey, generation: u64) -> Self {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        key.hash(&mut h);
        generation.hash(&mut h);
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
            .hash(&mut h);
        Rng(h.finish() | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Uniform in [0, d).
    fn below(&mut self, d: Duration) -> Duration {
        let n = d.as_nanos().min(u64::MAX as u128) as u64;
        if n == 0 {
            return Duration::ZERO;
        }
        Duration::from_nanos(self.next() % n)
    }

    /// `d` ± JITTER_PERCENT.
    fn jittered(&mut self, d: Duration) -> Duration {
        let spread = d * (2 * JITTER_PERCENT as u32) / 100;
        d - spread / 2 + self.below(spread)
    }
}

/// An I/O error as a probe result.
fn io_text(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ECONNREFUSED) => "connection refused".into(),
        Some(libc::EHOSTUNREACH) => "host unreachable".into(),
        Some(libc::ENETUNREACH) => "network unreachable".into(),
        Some(libc::ETIMEDOUT) => "timed out".into(),
        Some(libc::ECONNRESET) => "connection reset".into(),
        _ => e.to_string(),
    }
}

/// Text of a reply, shortened and printable, for messages.
fn show_bytes(b: &[u8]) -> String {
    quote(&String::from_utf8_lossy(b))
}

#[cfg(test)]
mod tests;
