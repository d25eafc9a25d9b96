//! One node's load balancer: the datapath, the installed rules, the health
//! prober and the BGP speaker, kept consistent. The standalone `run`
//! command and the Kubernetes `kube` command both drive it.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use kube_watch::{controller::RuleUpdate, ServiceKey};
use loxilb_common::SvcKey;
use loxilb_model::{Mode, Rule};
use tracing::{debug, info, warn};

use crate::{
    bgp::{speaker::SpeakerOptions, BgpSetup, BgpSpeaker},
    datapath::Datapath,
    kube_rules::{to_rule, Unsupported},
    probe::{Prober, Target, TargetKey, TargetStatus, Transition},
    rules::{svc_key, Report, Rules},
};

pub struct Node {
    /// VIPs to announce over BGP (see [`announced_vips`]).
    announce: BTreeSet<IpAddr>,
    /// Per announced VIP, how many rules ask for it; and the rules that
    /// ask, by key (so a changed or removed rule undoes its count).
    announce_refs: HashMap<IpAddr, u32>,
    announcing: HashMap<SvcKey, Vec<IpAddr>>,
    /// With VIP roles (Kubernetes mode): the VIPs this node is active
    /// for; every other announced VIP is announced as a backup
    /// ([`crate::bgp::BackupPath`]). `None`: no roles, every VIP active.
    owned: Option<BTreeSet<IpAddr>>,
    /// Names of the rules with health-probe targets.
    probed: BTreeSet<String>,
    pub dp: Datapath,
    pub rules: Rules,
    prober: Prober,
    bgp_setup: Option<BgpSetup>,
    bgp: Option<BgpSpeaker>,
    bgp_dir: PathBuf,
    state_dir: PathBuf,
    /// The runtime the prober runs on when the node made its own
    /// ([`Node::detached`]); dropped after the prober.
    _own_rt: Option<tokio::runtime::Runtime>,
}

/// Every VIP of `r`: the primary, then the secondary ones (SCTP
/// multihoming), each announced like the primary.
fn rule_vips(r: &Rule) -> Vec<IpAddr> {
    std::iter::once(r.vip)
        .chain(r.secondary_vips.iter().copied())
        .collect()
}

/// Whether `r` asks this node to announce its VIP (see [`announced_vips`]).
fn asks_announce(r: &Rule, local: &BTreeSet<IpAddr>) -> bool {
    !r.announce_local_only || r.endpoints.iter().any(|e| local.contains(&e.ip))
}

/// Where the agent publishes state the CLI reads (probe results): a
/// directory per pin directory, so several agents can coexist.
pub fn state_dir(pin_dir: &Path) -> PathBuf {
    let name = pin_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "loxilb".into());
    PathBuf::from("/run/loxilb").join(name)
}

/// The VIPs this node announces over BGP: every VIP of `rules` (secondary
/// VIPs included), except that a rule marked `announce_local_only`
/// (Kubernetes `externalTrafficPolicy: Local`) makes this node announce its
/// VIPs only when one of the rule's endpoints is an address of this node
/// (it has a local ready pod). A VIP is announced when any of its rules
/// asks for it.
pub fn announced_vips(rules: &[Rule], local_addrs: &BTreeSet<IpAddr>) -> BTreeSet<IpAddr> {
    rules
        .iter()
        .filter(|r| asks_announce(r, local_addrs))
        .flat_map(rule_vips)
        .collect()
}

/// This node's IPv4 and IPv6 addresses (all interfaces).
pub fn local_addrs() -> BTreeSet<IpAddr> {
    let mut out = BTreeSet::new();
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    if unsafe { libc::getifaddrs(&mut ifap) } != 0 {
        return out;
    }
    let mut p = ifap;
    while !p.is_null() {
        let ifa = unsafe { &*p };
        let family = if ifa.ifa_addr.is_null() {
            0
        } else {
            unsafe { (*ifa.ifa_addr).sa_family as i32 }
        };
        if family == libc::AF_INET {
            let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
            out.insert(IpAddr::V4(std::net::Ipv4Addr::from(u32::from_be(
                sin.sin_addr.s_addr,
            ))));
        } else if family == libc::AF_INET6 {
            let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
            out.insert(IpAddr::V6(std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr)));
        }
        p = ifa.ifa_next;
    }
    unsafe { libc::freeifaddrs(ifap) };
    out
}

/// A datagram to the discard port of each address (once each): the kernel
/// resolves its neighbour entry (see [`Node::tick`]).
fn nudge(addrs: impl Iterator<Item = IpAddr>) {
    let mut sock4 = None;
    let mut sock6 = None;
    let mut seen = HashSet::new();
    for ip in addrs {
        if !seen.insert(ip) {
            continue;
        }
        let sock = if ip.is_ipv4() {
            sock4.get_or_insert_with(|| std::net::UdpSocket::bind("0.0.0.0:0").ok())
        } else {
            sock6.get_or_insert_with(|| std::net::UdpSocket::bind("[::]:0").ok())
        };
        if let Some(s) = sock {
            let _ = s.send_to(&[], (ip, 9));
        }
    }
}

/// Give the memory the allocator holds free back to the system: a full
/// update converts and diffs every rule at once (tens of MiB at 10,000
/// Services), and glibc would otherwise keep that as the agent's RSS.
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages of the heap to the
    // system; it is safe to call at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Probe states published by a running agent (for the CLI).
pub fn read_probe_state(pin_dir: &Path) -> Option<Vec<TargetStatus>> {
    let text = std::fs::read_to_string(state_dir(pin_dir).join("probes.json")).ok()?;
    serde_json::from_str(&text).ok()
}

impl Node {
    pub fn new(
        dp: Datapath,
        rules: Rules,
        prober: Prober,
        bgp_setup: Option<BgpSetup>,
        pin_dir: &Path,
    ) -> Self {
        let state_dir = state_dir(pin_dir);
        Node {
            announce: BTreeSet::new(),
            announce_refs: HashMap::new(),
            announcing: HashMap::new(),
            owned: None,
            probed: BTreeSet::new(),
            dp,
            rules,
            prober,
            bgp_setup,
            bgp: None,
            bgp_dir: state_dir.join("bgp"),
            state_dir,
            _own_rt: None,
        }
    }

    /// A node for tools and benchmarks that run outside a Tokio runtime:
    /// no BGP, and a prober on a (current-thread) runtime of its own. Its
    /// probe liveness transitions are discarded.
    pub fn detached(dp: Datapath, rules: Rules, pin_dir: &Path) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("creating a runtime for the health prober")?;
        let (prober, _) = {
            let _in_rt = rt.enter();
            Prober::new(crate::probe::DEFAULT_MAX_IN_FLIGHT)
        };
        let mut node = Node::new(dp, rules, prober, None, pin_dir);
        node._own_rt = Some(rt);
        Ok(node)
    }

    /// The VIPs this node announces over BGP now.
    pub fn announced(&self) -> &BTreeSet<IpAddr> {
        &self.announce
    }

    /// VIP roles: `Some(owned)` makes this node announce the VIPs in
    /// `owned` as their active node and the others as a backup (a worse
    /// path, none, or the same: `--bgp-backup-path`); `None` announces
    /// every VIP as active (no roles, the standalone agent). Applied to the
    /// speaker at once: routers move a VIP's traffic with its role.
    pub fn set_owned_vips(&mut self, owned: Option<BTreeSet<IpAddr>>) {
        if self.owned != owned {
            self.owned = owned;
            self.sync_bgp();
        }
    }

    /// Of the announced VIPs, those announced as a backup.
    pub fn backup_vips(&self) -> BTreeSet<IpAddr> {
        match &self.owned {
            Some(owned) => self.announce.difference(owned).copied().collect(),
            None => BTreeSet::new(),
        }
    }

    /// Count a rule (key `k`) as asking for the announcement of its VIPs
    /// `vips`; true if the announced set changed.
    fn announce_rule(&mut self, k: SvcKey, vips: Vec<IpAddr>) -> bool {
        let mut changed = false;
        for vip in &vips {
            let c = self.announce_refs.entry(*vip).or_insert(0);
            *c += 1;
            changed |= *c == 1 && self.announce.insert(*vip);
        }
        self.announcing.insert(k, vips);
        changed
    }

    /// Undo [`Node::announce_rule`] for key `k` (if it asked).
    fn unannounce_rule(&mut self, k: &SvcKey) -> bool {
        let Some(vips) = self.announcing.remove(k) else {
            return false;
        };
        let mut changed = false;
        for vip in vips {
            let c = self.announce_refs.get_mut(&vip).expect("counted");
            *c -= 1;
            if *c == 0 {
                self.announce_refs.remove(&vip);
                changed |= self.announce.remove(&vip);
            }
        }
        changed
    }

    /// Install `desired` (as a diff), keep endpoints the probes found down
    /// inactive, probe what the rules ask for, announce the VIPs.
    pub fn apply(&mut self, desired: &[Rule]) -> Result<Report> {
        let prober = &self.prober;
        let down = |rule: &str, ip: IpAddr, port: u16| {
            prober.is_up(&TargetKey::new(rule, ip, port)) == Some(false)
        };
        let rep = self.rules.apply_with(desired, &mut self.dp, &down)?;
        self.probed = desired
            .iter()
            .filter(|r| r.probe.is_some())
            .map(|r| r.name.clone())
            .collect();
        let targets: Vec<Target> = desired
            .iter()
            .filter_map(|r| r.probe.as_ref().map(|p| (r, p)))
            .flat_map(|(r, spec)| {
                r.endpoints
                    .iter()
                    .map(move |e| Target::new(TargetKey::new(&r.name, e.ip, e.port), spec.clone()))
            })
            .collect();
        match self.prober.set_targets(targets) {
            Ok(pr) => {
                // Endpoints no longer probed are active again.
                for k in pr.removed {
                    let _ =
                        self.rules
                            .set_endpoint_state(&mut self.dp, &k.rule, k.addr, k.port, true);
                }
            }
            Err(e) => warn!("health probes not updated: {e}"),
        }
        let local = local_addrs();
        self.announce.clear();
        self.announce_refs.clear();
        self.announcing.clear();
        for r in desired {
            if asks_announce(r, &local) {
                self.announce_rule(svc_key(r.vip, r.port, r.protocol), rule_vips(r));
            }
        }
        if let Err(e) = self.dp.check_routing() {
            warn!("reading the node's routing failed: {e:#}");
        }
        match self.dp.check_clock() {
            Ok(Some(gap)) if gap != u64::MAX => {
                warn!(
                    gap_ns = gap,
                    "the datapath clock had drifted from the kernel's; calibrated again"
                )
            }
            Ok(Some(_)) => info!("the datapath clock is calibrated now"),
            Ok(None) => {}
            Err(e) => warn!("checking the datapath clock failed: {e:#}"),
        }
        self.nudge_neighbours();
        self.sync_bgp();
        self.publish_probe_state();
        Ok(rep)
    }

    /// Change only some rules (see [`Rules::apply_changes`]): install
    /// `upserts`, remove the rules of `removed` (keys). Probe targets, BGP
    /// announcements and neighbour nudges follow for those rules only; the
    /// rest is not looked at, so the cost is that of the change.
    pub fn apply_changes(&mut self, upserts: &[Rule], removed: &[SvcKey]) -> Result<Report> {
        let prober = &self.prober;
        let down = |rule: &str, ip: IpAddr, port: u16| {
            prober.is_up(&TargetKey::new(rule, ip, port)) == Some(false)
        };
        let rep = self
            .rules
            .apply_changes(upserts, removed, &mut self.dp, &down)?;
        // Health probes: the targets of the changed rules.
        let mut probes_changed = false;
        let upserted: HashSet<&str> = upserts.iter().map(|r| r.name.as_str()).collect();
        for name in &rep.removed {
            if !upserted.contains(name.as_str()) && self.probed.remove(name) {
                self.prober.remove_rule(name);
                probes_changed = true;
            }
        }
        for r in upserts {
            if r.probe.is_none() && !self.probed.contains(&r.name) {
                continue;
            }
            probes_changed = true;
            let targets: Vec<Target> = match &r.probe {
                Some(spec) => r
                    .endpoints
                    .iter()
                    .map(|e| Target::new(TargetKey::new(&r.name, e.ip, e.port), spec.clone()))
                    .collect(),
                None => vec![],
            };
            match self.prober.set_rule_targets(&r.name, targets) {
                Ok(pr) => {
                    // Endpoints no longer probed are active again.
                    for k in pr.removed {
                        let _ = self.rules.set_endpoint_state(
                            &mut self.dp,
                            &k.rule,
                            k.addr,
                            k.port,
                            true,
                        );
                    }
                }
                Err(e) => warn!("health probes of rule {} not updated: {e}", r.name),
            }
            if r.probe.is_some() {
                self.probed.insert(r.name.clone());
            } else {
                self.probed.remove(&r.name);
            }
        }
        // BGP: the announcements of the changed rules.
        let mut announce_changed = false;
        let upsert_keys: HashSet<SvcKey> = upserts
            .iter()
            .map(|r| svc_key(r.vip, r.port, r.protocol))
            .collect();
        for k in removed {
            if !upsert_keys.contains(k) {
                announce_changed |= self.unannounce_rule(k);
            }
        }
        let local = if upserts.iter().any(|r| r.announce_local_only) {
            local_addrs()
        } else {
            BTreeSet::new()
        };
        for r in upserts {
            let k = svc_key(r.vip, r.port, r.protocol);
            announce_changed |= self.unannounce_rule(&k);
            if asks_announce(r, &local) {
                announce_changed |= self.announce_rule(k, rule_vips(r));
            }
        }
        nudge(
            upserts
                .iter()
                .flat_map(|r| r.endpoints.iter().map(|e| e.ip)),
        );
        if announce_changed {
            self.sync_bgp();
        }
        if probes_changed {
            self.publish_probe_state();
        }
        Ok(rep)
    }

    /// A health probe changed an endpoint's liveness.
    pub fn on_transition(&mut self, t: Transition) {
        let a = t.key.addr;
        match self
            .rules
            .set_endpoint_state(&mut self.dp, &t.key.rule, a, t.key.port, t.up)
        {
            Ok(true) => info!(
                rule = %t.key.rule,
                endpoint = %format!("{a}:{}", t.key.port),
                "endpoint {}: {}",
                if t.up { "up" } else { "down" },
                t.reason
            ),
            Ok(false) => {}
            Err(e) => warn!("marking {a}:{} failed: {e:#}", t.key.port),
        }
        self.publish_probe_state();
    }

    /// Periodic upkeep.
    pub fn tick(&mut self) {
        // Draining marks of the endpoint index a failed write left are
        // written before the walk that may release them.
        if let Err(e) = self.rules.flush_ep_index(&mut self.dp) {
            warn!("updating the endpoint index failed: {e:#}");
        }
        // One walk of the session table: expired sessions go, the rest are
        // counted per endpoint.
        match self.dp.expire_idle(crate::show::monotonic_ns()) {
            Ok((removed, live)) => {
                if removed > 0 {
                    debug!(removed, live = live.len(), "expired sessions removed");
                }
                if let Err(e) = self.dp.recount_active_from(&live) {
                    warn!("re-counting active sessions failed: {e:#}");
                }
                match self.rules.drain_ep_index(&live, &mut self.dp) {
                    Ok(0) => {}
                    Ok(n) => debug!(released = n, "endpoint index slots drained"),
                    Err(e) => warn!("updating the endpoint index failed: {e:#}"),
                }
                match self.rules.drain_filter(&live, &mut self.dp) {
                    Ok(0) => {}
                    Ok(n) => debug!(
                        released = n,
                        "endpoints without sessions left the address filter"
                    ),
                    Err(e) => warn!("updating the address filter failed: {e:#}"),
                }
            }
            Err(e) => warn!("walking the session table failed: {e:#}"),
        }
        if let Err(e) = self.dp.check_routing() {
            warn!("reading the node's routing failed: {e:#}");
        }
        self.nudge_neighbours();
        self.sync_bgp();
        self.publish_probe_state();
    }

    /// Replace the BGP peer set (e.g. flag peers plus BGPPeerService
    /// objects): used when the speaker starts, applied now if it runs.
    pub fn set_bgp_peers(&mut self, peers: Vec<crate::bgp::Peer>) -> Result<()> {
        let Some(setup) = self.bgp_setup.as_mut() else {
            anyhow::bail!("BGP peers given but BGP is off (--setBGP)");
        };
        setup.peers = peers.clone();
        if let Some(s) = self.bgp.as_mut() {
            s.set_peers(peers)?;
        }
        Ok(())
    }

    /// The BGP flag peers (`--extBGPPeers`) and multihop setting.
    pub fn bgp_setup(&self) -> Option<&BgpSetup> {
        self.bgp_setup.as_ref()
    }

    /// The speaker's neighbours now (empty before it started).
    pub fn bgp_neighbors(&self) -> Vec<crate::bgp::Neighbor> {
        self.bgp
            .as_ref()
            .and_then(|s| s.neighbors().ok())
            .unwrap_or_default()
    }

    /// Announce exactly the installed VIPs (starting the speaker on first
    /// use); failures are logged and retried on the next tick.
    fn sync_bgp(&mut self) {
        // Without BGP there is nothing to tell (and copying every VIP
        // would make each rule change cost as much as all rules).
        if self.bgp.is_none() && self.bgp_setup.is_none() {
            return;
        }
        let vips = self.announce.clone();
        let backup = self.backup_vips();
        if let Some(s) = self.bgp.as_mut() {
            match s.set_announced(vips, backup) {
                Ok(c) => {
                    for v in &c.to_active {
                        info!(vip = %v, "BGP: announced as the active node");
                    }
                    for v in &c.to_backup {
                        info!(vip = %v, backup = %s.config().backup, "BGP: announced as a backup");
                    }
                }
                Err(e) => warn!("BGP: announcing the VIPs failed: {e:#}"),
            }
            return;
        }
        let Some(setup) = self.bgp_setup.clone() else {
            return;
        };
        match BgpSpeaker::start(
            setup.config,
            SpeakerOptions::in_dir(&self.bgp_dir),
            setup.peers,
            // The active VIPs only: the backup ones follow with their
            // worse path (never announced as active, not even briefly).
            vips.difference(&backup).copied(),
        ) {
            Ok(s) => {
                info!(
                    "BGP speaker started (BIRD, run directory {})",
                    self.bgp_dir.display()
                );
                self.bgp = Some(s);
                if !backup.is_empty() {
                    self.sync_bgp();
                }
            }
            Err(e) => warn!("BGP speaker did not start: {e:#}; retrying"),
        }
    }

    /// Keep the kernel's neighbour entries of endpoints resolved (the
    /// datapath reads them through the FIB but cannot trigger resolution
    /// itself): a datagram to each endpoint's discard port makes the
    /// kernel resolve it.
    fn nudge_neighbours(&self) {
        nudge(
            self.rules
                .installed()
                .flat_map(|r| r.eps.iter().map(|e| loxilb_common::ip_from_addr(&e.addr))),
        );
    }

    fn publish_probe_state(&self) {
        let snap = self.prober.snapshot();
        let write = || -> Result<()> {
            std::fs::create_dir_all(&self.state_dir)?;
            let tmp = self.state_dir.join("probes.json.tmp");
            std::fs::write(&tmp, serde_json::to_vec(&snap)?)?;
            std::fs::rename(&tmp, self.state_dir.join("probes.json"))?;
            Ok(())
        };
        if let Err(e) = write() {
            warn!("publishing probe state: {e:#}");
        }
    }

    /// Stop probing and the BGP speaker, and hand the datapath over as it
    /// is (maps and whatever is attached kept), e.g. to a new `Node` that
    /// adopts it.
    pub fn into_datapath(self) -> Datapath {
        if let Some(s) = self.bgp {
            if let Err(e) = s.stop() {
                warn!("stopping the BGP speaker: {e:#}");
            }
        }
        self.dp
    }

    /// Withdraw the VIPs first (routers move traffic away), then stop the
    /// datapath (see `Datapath::shutdown`).
    pub fn shutdown(self, keep: bool) -> Result<()> {
        if let Some(s) = self.bgp {
            if let Err(e) = s.stop() {
                warn!("stopping the BGP speaker: {e:#}");
            }
        }
        let _ = std::fs::remove_file(self.state_dir.join("probes.json"));
        self.dp.shutdown(keep).context("shutting the datapath down")
    }
}

/// Where [`KubeRules`] installs the rules it converted: a [`Node`], or
/// the thread owning one ([`crate::owner::Handle`]; the agent's). The
/// conversion and the node's checks stay with the caller; only the
/// finished rules travel.
pub trait RuleTarget {
    /// [`Node::apply`].
    fn apply_rules(&mut self, rules: Vec<Rule>) -> Result<Report>;
    /// [`Node::apply_changes`].
    fn apply_rule_changes(&mut self, upserts: Vec<Rule>, removed: Vec<SvcKey>) -> Result<Report>;
}

impl RuleTarget for Node {
    fn apply_rules(&mut self, rules: Vec<Rule>) -> Result<Report> {
        self.apply(&rules)
    }

    fn apply_rule_changes(&mut self, upserts: Vec<Rule>, removed: Vec<SvcKey>) -> Result<Report> {
        self.apply_changes(&upserts, &removed)
    }
}

/// On the owner thread, the caller waiting ([`crate::owner::Handle::call_blocking`]).
impl RuleTarget for crate::owner::Handle<Node> {
    fn apply_rules(&mut self, rules: Vec<Rule>) -> Result<Report> {
        self.call_blocking(move |n| n.apply(&rules))?
    }

    fn apply_rule_changes(&mut self, upserts: Vec<Rule>, removed: Vec<SvcKey>) -> Result<Report> {
        self.call_blocking(move |n| n.apply_changes(&upserts, &removed))?
    }
}

/// The Kubernetes controller's rule updates ([`RuleUpdate`]) to a node's
/// rules: the whole set through [`Node::apply`] when the update is full
/// (the first after start, when the maps may hold rules from before), else
/// only the changed Services' rules through [`Node::apply_changes`]. It
/// remembers which rule keys each Service installed, to remove those a
/// Service no longer has. The agent's `KubeSink` and the control-plane
/// benchmark both go through [`KubeRules::update`].
#[derive(Debug, Default)]
pub struct KubeRules {
    by_service: HashMap<ServiceKey, Box<[SvcKey]>>,
}

/// What [`KubeRules::update`] did. The rules of the update not in
/// `refused` are installed (when it returns `Ok`); the agent's `KubeSink`
/// hands `refused` to the controller, which raises the Services' Events.
#[derive(Debug, Default)]
pub struct KubeApplied {
    pub report: Report,
    /// Rules this datapath cannot serve (not installed), each with its
    /// Service and why.
    pub refused: Vec<(ServiceKey, Unsupported)>,
    /// The whole set was applied (not only the changed Services).
    pub full: bool,
}

/// What depends on this node for rules of Kubernetes: L2 DSR needs each
/// endpoint on a directly connected segment behind a device XDP can send
/// through (the rule file's checks, [`crate::config::check_reachability`]
/// and [`crate::config::check_dsr_forwarding`]). The routes and devices
/// are read once per update, and only when a DSR rule is in it.
/// The routing table and every device's forwarding, as read for checks.
type NodeView = (
    Vec<crate::routes::Route>,
    Vec<(crate::netlink::Link, loxilb_common::DevFwd)>,
);

struct NodeChecks {
    seen: Option<NodeView>,
}

impl NodeChecks {
    fn new() -> Self {
        NodeChecks { seen: None }
    }

    /// Why `x` (from Kubernetes rule `name`) cannot be served here.
    fn check(&mut self, name: &str, x: &Rule) -> Result<(), Unsupported> {
        if x.mode != Mode::Dsr {
            return Ok(());
        }
        let bad = |reason: String| Unsupported {
            rule: name.to_string(),
            reason,
        };
        if self.seen.is_none() {
            let routes = crate::routes::read()
                .map_err(|e| bad(format!("cannot read the routing table: {e}")))?;
            let devs = crate::devices::survey()
                .map_err(|e| bad(format!("cannot list the network devices: {e:#}")))?;
            self.seen = Some((routes, devs));
        }
        let (routes, devs) = self.seen.as_ref().expect("just read");
        let one = std::slice::from_ref(x);
        crate::config::check_reachability(name, one, routes)
            .and_then(|()| crate::config::check_dsr_forwarding(name, one, routes, devs))
            .map_err(|e| bad(e.message))
    }
}

impl KubeRules {
    /// Make `rules` (every rule of every Service) the node's whole rule
    /// set.
    pub fn full<'a>(
        &mut self,
        node: &mut impl RuleTarget,
        rules: impl Iterator<Item = &'a kube_watch::translate::ServiceRule>,
    ) -> Result<KubeApplied> {
        let mut refused = vec![];
        let mut ok = vec![];
        let mut by_service: HashMap<ServiceKey, Vec<SvcKey>> = HashMap::new();
        let mut checks = NodeChecks::new();
        for r in rules {
            match to_rule(r).and_then(|x| checks.check(&r.rule.name, &x).map(|()| x)) {
                Ok(x) => {
                    by_service
                        .entry(r.service.clone())
                        .or_default()
                        .push(svc_key(x.vip, x.port, x.protocol));
                    ok.push(x);
                }
                Err(e) => refused.push((r.service.clone(), e)),
            }
        }
        // The rules go (and are freed) with the call.
        let report = node.apply_rules(ok);
        if report.is_ok() {
            self.by_service = by_service
                .into_iter()
                .map(|(k, v)| (k, v.into_boxed_slice()))
                .collect();
        }
        release_free_memory();
        let report = report?;
        Ok(KubeApplied {
            report,
            refused,
            full: true,
        })
    }

    /// Make `node`'s rules follow `update`. On error nothing is
    /// remembered as done: the controller retries with the changes
    /// accumulated since the last success.
    pub fn update(
        &mut self,
        node: &mut impl RuleTarget,
        update: &RuleUpdate<'_>,
    ) -> Result<KubeApplied> {
        if update.is_full() {
            return self.full(node, update.all());
        }
        let mut refused = vec![];
        let mut upserts = vec![];
        let mut removed = vec![];
        let mut next = vec![];
        let mut checks = NodeChecks::new();
        for (svc, rules) in update.changed() {
            if let Some(old) = self.by_service.get(svc) {
                removed.extend_from_slice(old);
            }
            let mut keys = vec![];
            for r in rules {
                match to_rule(r).and_then(|x| checks.check(&r.rule.name, &x).map(|()| x)) {
                    Ok(x) => {
                        keys.push(svc_key(x.vip, x.port, x.protocol));
                        upserts.push(x);
                    }
                    Err(e) => refused.push((svc.clone(), e)),
                }
            }
            next.push((svc, keys));
        }
        let report = node.apply_rule_changes(upserts, removed)?;
        for (svc, keys) in next {
            if keys.is_empty() {
                self.by_service.remove(svc);
            } else {
                self.by_service.insert(svc.clone(), keys.into_boxed_slice());
            }
        }
        Ok(KubeApplied {
            report,
            refused,
            full: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_traffic_rules_are_announced_only_by_endpoint_nodes() {
        let text = "rules:
  - {name: a, vip: 20.0.0.1, port: 80, protocol: tcp, endpoints: [{ip: 10.0.0.1, port: 30080}]}
  - {name: b, vip: 20.0.0.2, port: 80, protocol: tcp, endpoints: [{ip: 10.0.0.1, port: 30081}]}
  - {name: c, vip: 20.0.0.3, port: 80, protocol: tcp, endpoints: [{ip: 10.0.0.2, port: 30082}]}
  - {name: d, vip: 20.0.0.3, port: 81, protocol: tcp, endpoints: [{ip: 10.0.0.3, port: 30083}]}
";
        let mut rules = crate::config::parse("t", text).unwrap();
        // b, c, d are externalTrafficPolicy: Local
        for r in rules.iter_mut().skip(1) {
            r.announce_local_only = true;
        }
        let v = |s: &str| IpAddr::V4(s.parse().unwrap());
        let me: BTreeSet<IpAddr> = ["10.0.0.1".parse().unwrap()].into();
        assert_eq!(
            announced_vips(&rules, &me),
            [v("20.0.0.1"), v("20.0.0.2")].into()
        );
        let me: BTreeSet<IpAddr> = ["10.0.0.3".parse().unwrap()].into();
        assert_eq!(
            announced_vips(&rules, &me),
            [v("20.0.0.1"), v("20.0.0.3")].into(),
            "cluster-traffic VIPs from every node; a shared VIP when any rule asks"
        );
        assert_eq!(
            announced_vips(&rules, &BTreeSet::new()),
            [v("20.0.0.1")].into()
        );
    }

    #[test]
    fn secondary_vips_are_announced_like_the_primary() {
        let text = "rules:
  - {name: s, vip: 20.0.0.7, secondary_vips: [30.0.0.2, 31.0.0.2], port: 38412, protocol: sctp, endpoints: [{ip: 10.0.0.1, port: 38412}]}
  - {name: l, vip: 20.0.0.8, secondary_vips: [30.0.0.3], port: 38412, protocol: sctp, endpoints: [{ip: 10.0.0.2, port: 38412}]}
";
        let mut rules = crate::config::parse("t", text).unwrap();
        rules[1].announce_local_only = true;
        let v = |s: &str| IpAddr::V4(s.parse().unwrap());
        assert_eq!(
            announced_vips(&rules, &BTreeSet::new()),
            [v("20.0.0.7"), v("30.0.0.2"), v("31.0.0.2")].into()
        );
        let me: BTreeSet<IpAddr> = ["10.0.0.2".parse().unwrap()].into();
        assert_eq!(
            announced_vips(&rules, &me).len(),
            5,
            "a local endpoint: all of l's too"
        );
    }

    #[test]
    fn local_addresses_include_loopback() {
        let mine = local_addrs();
        assert!(mine.contains(&IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)));
    }
}
