//! One node's load balancer: the datapath, the installed rules, the health
//! prober and the BGP speaker, kept consistent. The standalone `run`
//! command and the Kubernetes `kube` command both drive it.

use std::{
    collections::BTreeSet,
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use tracing::{info, warn};

use crate::{
    bgp::{speaker::SpeakerOptions, BgpSetup, BgpSpeaker},
    config::Rule,
    datapath::Datapath,
    probe::{Prober, Target, TargetKey, TargetStatus, Transition},
    rules::{Report, Rules},
};

pub struct Node {
    /// VIPs to announce over BGP (see [`announced_vips`]).
    announce: BTreeSet<IpAddr>,
    pub dp: Datapath,
    pub rules: Rules,
    prober: Prober,
    bgp_setup: Option<BgpSetup>,
    bgp: Option<BgpSpeaker>,
    bgp_dir: PathBuf,
    state_dir: PathBuf,
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

/// The VIPs this node announces over BGP: every VIP of `rules`, except that
/// a rule marked `announce_local_only` (Kubernetes `externalTrafficPolicy:
/// Local`) makes this node announce its VIP only when one of the rule's
/// endpoints is an address of this node (it has a local ready pod). A VIP
/// is announced when any of its rules asks for it.
pub fn announced_vips(rules: &[Rule], local_addrs: &BTreeSet<IpAddr>) -> BTreeSet<IpAddr> {
    rules
        .iter()
        .filter(|r| {
            !r.announce_local_only || r.endpoints.iter().any(|e| local_addrs.contains(&e.ip))
        })
        .map(|r| r.vip)
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
            dp,
            rules,
            prober,
            bgp_setup,
            bgp: None,
            bgp_dir: state_dir.join("bgp"),
            state_dir,
        }
    }

    /// Install `desired` (as a diff), keep endpoints the probes found down
    /// inactive, probe what the rules ask for, announce the VIPs.
    pub fn apply(&mut self, desired: &[Rule]) -> Result<Report> {
        let prober = &self.prober;
        let down = |rule: &str, ip: IpAddr, port: u16| {
            prober.is_up(&TargetKey::new(rule, ip, port)) == Some(false)
        };
        let rep = self.rules.apply_with(desired, &mut self.dp, &down)?;
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
        self.announce = announced_vips(desired, &local_addrs());
        self.nudge_neighbours();
        self.sync_bgp();
        self.publish_probe_state();
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
        if let Err(e) = self.dp.recount_active() {
            warn!("re-counting active sessions failed: {e:#}");
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
        let vips = self.announce.clone();
        if let Some(s) = self.bgp.as_mut() {
            if let Err(e) = s.set_vips(vips) {
                warn!("BGP: announcing the VIPs failed: {e:#}");
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
            vips,
        ) {
            Ok(s) => {
                info!(
                    "BGP speaker started (BIRD, run directory {})",
                    self.bgp_dir.display()
                );
                self.bgp = Some(s);
            }
            Err(e) => warn!("BGP speaker did not start: {e:#}; retrying"),
        }
    }

    /// Keep the kernel's neighbour entries of endpoints resolved (the
    /// datapath reads them through the FIB but cannot trigger resolution
    /// itself): a datagram to each endpoint's discard port makes the
    /// kernel resolve it.
    fn nudge_neighbours(&self) {
        let sock4 = std::net::UdpSocket::bind("0.0.0.0:0").ok();
        let sock6 = std::net::UdpSocket::bind("[::]:0").ok();
        let mut seen = BTreeSet::new();
        for r in self.rules.installed() {
            for e in &r.eps {
                if seen.insert(e.addr) {
                    let ip = loxilb_common::ip_from_addr(&e.addr);
                    let sock = if ip.is_ipv4() { &sock4 } else { &sock6 };
                    if let Some(s) = sock {
                        let _ = s.send_to(&[], (ip, 9));
                    }
                }
            }
        }
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
    fn local_addresses_include_loopback() {
        let mine = local_addrs();
        assert!(mine.contains(&IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)));
    }
}
