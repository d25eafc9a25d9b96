//! The BGP speaker (BIRD, run by `loxilb_agent::bgp::BgpSpeaker`) against
//! a different implementation, GoBGP, in peer network namespaces: sessions
//! (eBGP, iBGP, over IPv4 and IPv6, multihop), VIP announcement with next
//! hop self, withdrawal, peer restarts, a BIRD crash, peers added and
//! removed at run time, the listen port and the peer port.
//!
//! Every test builds its own namespaces (`lxbN-*`); the speaker, the
//! gobgpd daemons, the directories and the namespaces are guards, dropped
//! in that order also when a test fails.

use std::{
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
    time::Duration,
};

use loxilb_agent::bgp::{
    control::Control, query_exported, query_neighbors, BackupPath, BgpConfig, BgpFlags, BgpSpeaker,
    BgpState, Neighbor, Peer, SpeakerOptions, Timers,
};
use loxilb_tests::{
    bgp_peer::{eventually, veth, DirGuard, GobgpNeighbor, GobgpPeer, Listen, RibRoute},
    need_root,
    netns::{sh, Netns},
};

const VIP4: &str = "20.0.0.100";
const VIP4B: &str = "20.0.0.101";
const VIP6: &str = "2001:db8::100";
const T: Duration = Duration::from_secs(20);

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn have_daemons(test: &str) -> bool {
    if !need_root(test) {
        return false;
    }
    for bin in ["bird", "gobgpd", "gobgp"] {
        assert!(
            sh(&["sh", "-c", &format!("command -v {bin}")]).is_ok(),
            "{test}: {bin} not found: run scripts/setup.sh (Debian packages bird2, gobgpd)"
        );
    }
    true
}

/// Timers for tests: failures are noticed and retried within seconds.
fn quick(mut c: BgpConfig) -> BgpConfig {
    c.timers = Timers {
        hold: 9,
        keepalive: 3,
        connect_delay: 1,
        connect_retry: 1,
        error_wait_min: 1,
        error_wait_max: 4,
    };
    c
}

/// The load balancer's namespace and one namespace per peer; link i:
/// lb `pI` 10.I.0.1/24 fd00:I::1/64 <-> peer `lb0` 10.I.0.2/24 fd00:I::2/64.
struct Lab {
    // dropped first: the run directory; namespaces last
    dir: DirGuard,
    peers: Vec<Netns>,
    lb: Netns,
}

fn lab(prefix: &str, n: usize) -> Lab {
    let lb = Netns::new(&format!("{prefix}-lb")).unwrap();
    let mut peers = vec![];
    for i in 1..=n {
        let p = Netns::new(&format!("{prefix}-p{i}")).unwrap();
        veth(
            &lb,
            &format!("p{i}"),
            &[&format!("10.{i}.0.1/24"), &format!("fd00:{i}::1/64")],
            &p,
            "lb0",
            &[&format!("10.{i}.0.2/24"), &format!("fd00:{i}::2/64")],
        )
        .unwrap();
        peers.push(p);
    }
    let dir = PathBuf::from(format!("/tmp/{prefix}-bgp"));
    let _ = std::fs::remove_dir_all(&dir);
    Lab {
        dir: DirGuard(dir),
        peers,
        lb,
    }
}

impl Lab {
    /// GoBGP of AS `asn` on peer `i` (0-based), listening on 179, its one
    /// neighbour the speaker's address on that link (AS 65001).
    fn router(&self, i: usize, asn: u32) -> GobgpPeer {
        let n = i as u8 + 1;
        GobgpPeer::start(
            &self.peers[i],
            asn,
            Ipv4Addr::new(10, n, 0, 2),
            Listen::Port(179),
            &[GobgpNeighbor::new(&format!("10.{n}.0.1"), 65001)],
        )
        .unwrap()
    }

    /// Start the speaker inside the LB namespace (BIRD inherits it).
    fn speaker(&self, config: BgpConfig, peers: Vec<Peer>, vips: &[&str]) -> BgpSpeaker {
        let opts = SpeakerOptions::in_dir(&self.dir.0);
        let vips: Vec<IpAddr> = vips.iter().map(|v| ip(v)).collect();
        self.lb
            .run(move || BgpSpeaker::start(config, opts, peers, vips))
            .expect("speaker starts")
    }
}

fn neighbor(s: &BgpSpeaker, addr: &str) -> Neighbor {
    s.neighbor(ip(addr))
        .unwrap()
        .unwrap_or_else(|| panic!("no neighbour {addr}"))
}

fn wait_established(s: &BgpSpeaker, addr: &str) -> Neighbor {
    eventually(&format!("session with {addr} established"), T, || {
        let n = neighbor(s, addr);
        if n.is_established() {
            Ok(n)
        } else {
            Err(format!("{:?} {}", n.state, n.info))
        }
    })
}

fn find<'a>(routes: &'a [RibRoute], prefix: &str) -> Option<&'a RibRoute> {
    routes.iter().find(|r| r.prefix == prefix)
}

/// Wait until `peer` has a path for `prefix` that is as `want`ed.
fn wait_path(
    peer: &GobgpPeer,
    prefix: &str,
    what: &str,
    want: impl Fn(&RibRoute) -> bool,
) -> RibRoute {
    eventually(&format!("{prefix} {what} in the peer's RIB"), T, || {
        let routes = peer.routes().map_err(|e| e.to_string())?;
        match find(&routes, prefix) {
            Some(r) if want(r) => Ok(r.clone()),
            _ => Err(format!("{routes:?}")),
        }
    })
}

/// Wait until `peer` has `prefix` with next hop `nh`.
fn wait_route(peer: &GobgpPeer, prefix: &str, nh: &str) -> RibRoute {
    wait_path(peer, prefix, &format!("via {nh}"), |r| {
        r.next_hop == Some(ip(nh))
    })
}

fn wait_no_route(peer: &GobgpPeer, prefix: &str) {
    eventually(
        &format!("{prefix} withdrawn from the peer's RIB"),
        T,
        || {
            let routes = peer.routes().map_err(|e| e.to_string())?;
            match find(&routes, prefix) {
                None => Ok(()),
                Some(r) => Err(format!("still there: {r:?}")),
            }
        },
    )
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.rsplit_once(')').unwrap().1.trim_start().starts_with('Z'))
        .unwrap_or(false)
}

/// From the kube-loxilb flags to a running speaker; eBGP over IPv4
/// carrying an IPv4 and an IPv6 VIP (MP-BGP; the IPv6 next hop is the
/// LB's IPv6 address on the link), nothing in the LB's kernel FIB, VIPs
/// added and withdrawn without resetting the session, a second peer added
/// at run time and removed, and a clean stop withdrawing everything.
#[test]
fn ebgp_from_flags_announce_withdraw_and_runtime_peer() {
    if !have_daemons("ebgp_from_flags_announce_withdraw_and_runtime_peer") {
        return;
    }
    let lab = lab("lxb1", 2);
    let mut g1 = lab.router(0, 65002);
    let g2 = lab.router(1, 65003);

    let setup = BgpFlags::parse(Some("65001"), Some("10.1.0.2:65002"), None, None)
        .unwrap()
        .setup()
        .unwrap()
        .expect("BGP on");
    let mut config = quick(setup.config);
    config.router_id = Some(Ipv4Addr::new(10, 1, 0, 1));
    let mut s = lab.speaker(config, setup.peers, &[VIP4, VIP6]);

    let n = wait_established(&s, "10.1.0.2");
    assert_eq!(n.remote_as, Some(65002));
    assert_eq!(n.local_as, Some(65001));
    assert_eq!(n.internal, Some(false));
    assert_eq!((n.hold_time, n.keepalive), (Some(9), Some(3)));
    assert_eq!(n.source_address, Some(ip("10.1.0.1")));
    assert!(n.uptime.is_some());
    let r4 = wait_route(&g1, "20.0.0.100/32", "10.1.0.1");
    assert_eq!(r4.as_path, vec![65001]);
    // IPv6 VIP over the IPv4 session: next hop = the LB's address on the link
    let r6 = wait_route(&g1, "2001:db8::100/128", "fd00:1::1");
    assert_eq!(r6.as_path, vec![65001]);
    // introspection: routes sent
    let sent = eventually("export table filled", T, || {
        let e = s.exported_routes().map_err(|e| e.to_string())?;
        if e[0].routes.len() == 2 {
            Ok(e)
        } else {
            Err(format!("{e:?}"))
        }
    });
    assert_eq!(sent[0].peer, ip("10.1.0.2"));
    let mut got: Vec<String> = sent[0].routes.iter().map(|r| r.to_string()).collect();
    got.sort();
    assert_eq!(got, ["20.0.0.100/32", "2001:db8::100/128"]);
    assert_eq!(wait_established(&s, "10.1.0.2").routes_sent(), 2);
    // BIRD never installs the VIPs in the node's FIB
    for fam in ["-4", "-6"] {
        let rt = lab
            .lb
            .sh(&["ip", fam, "route", "show", "table", "all"])
            .unwrap();
        assert!(
            !rt.contains(VIP4) && !rt.contains(VIP6),
            "VIP in the LB's kernel routes:\n{rt}"
        );
    }

    // VIP changes: announce one, withdraw one; the session is not reset
    let since = neighbor(&s, "10.1.0.2").since;
    let ch = s.set_vips([ip(VIP4), ip(VIP4B), ip(VIP6)]).unwrap();
    assert_eq!(ch.added, vec![ip(VIP4B)]);
    wait_route(&g1, "20.0.0.101/32", "10.1.0.1");
    let ch = s.set_vips([ip(VIP4B), ip(VIP6)]).unwrap();
    assert_eq!(ch.removed, vec![ip(VIP4)]);
    wait_no_route(&g1, "20.0.0.100/32");
    assert!(find(&g1.routes().unwrap(), "20.0.0.101/32").is_some());
    assert!(
        s.set_vips([ip(VIP6), ip(VIP4B)]).unwrap().is_empty(),
        "same set: no change"
    );
    let n = neighbor(&s, "10.1.0.2");
    assert!(n.is_established());
    assert_eq!(n.since, since, "a VIP change must not reset the session");

    // a second peer at run time; the first session is untouched
    let ch = s.add_peer(Peer::new(ip("10.2.0.2"), 65003)).unwrap();
    assert_eq!(ch.added, vec![ip("10.2.0.2")]);
    wait_established(&s, "10.2.0.2");
    wait_route(&g2, "20.0.0.101/32", "10.2.0.1");
    wait_route(&g2, "2001:db8::100/128", "fd00:2::1");
    assert!(g2.established_with(ip("10.2.0.1")));
    assert_eq!(
        neighbor(&s, "10.1.0.2").since,
        since,
        "peer 1 kept its session"
    );

    // and removed: its session closes, its routes go; peer 1 untouched
    let ch = s.remove_peer(ip("10.2.0.2")).unwrap();
    assert_eq!(ch.removed, vec![ip("10.2.0.2")]);
    assert!(s.neighbor(ip("10.2.0.2")).unwrap().is_none());
    eventually("peer 2 session closed", T, || {
        if g2.established_with(ip("10.2.0.1")) {
            Err("still established".into())
        } else {
            Ok(())
        }
    });
    wait_no_route(&g2, "20.0.0.101/32");
    assert_eq!(neighbor(&s, "10.1.0.2").since, since);

    // scale: 1,000 more VIPs in one change, then gone again
    let many: Vec<IpAddr> = (0..1000u32)
        .map(|i| IpAddr::V4(Ipv4Addr::new(20, 1, (i / 250) as u8, (i % 250 + 1) as u8)))
        .collect();
    let t0 = std::time::Instant::now();
    let mut all = many.clone();
    all.extend([ip(VIP4B), ip(VIP6)]);
    assert_eq!(s.set_vips(all).unwrap().added.len(), 1000);
    eventually("1,000 more VIPs at the peer", T, || {
        let n = g1.rib("ipv4").map_err(|e| e.to_string())?.len();
        if n == 1001 {
            Ok(())
        } else {
            Err(format!("{n} IPv4 routes"))
        }
    });
    eprintln!("1,000 VIPs announced in {:?}", t0.elapsed());
    s.set_vips([ip(VIP4B), ip(VIP6)]).unwrap();
    eventually("1,000 VIPs withdrawn", T, || {
        let n = g1.rib("ipv4").map_err(|e| e.to_string())?.len();
        if n == 1 {
            Ok(())
        } else {
            Err(format!("{n} IPv4 routes"))
        }
    });
    assert_eq!(neighbor(&s, "10.1.0.2").since, since);

    // a clean stop: BIRD says goodbye (Cease), the peer withdraws at once
    let pid = s.pid().unwrap();
    s.stop().unwrap();
    assert!(!alive(pid), "BIRD still running after stop");
    wait_no_route(&g1, "20.0.0.101/32");
    wait_no_route(&g1, "2001:db8::100/128");
    g1.kill();
}

/// iBGP with next hop self (peer in our AS) over IPv4, and eBGP over an
/// IPv6 session carrying both VIPs.
#[test]
fn ibgp_next_hop_self_and_ipv6_session() {
    if !have_daemons("ibgp_next_hop_self_and_ipv6_session") {
        return;
    }
    let lab = lab("lxb2", 2);
    let g1 = lab.router(0, 65001);
    let g2 = GobgpPeer::start(
        &lab.peers[1],
        65002,
        Ipv4Addr::new(10, 2, 0, 2),
        Listen::Port(179),
        &[GobgpNeighbor::new("fd00:2::1", 65001)],
    )
    .unwrap();
    let mut config = quick(BgpConfig::new(65001));
    config.router_id = Some(Ipv4Addr::new(10, 1, 0, 1));
    let s = lab.speaker(
        config,
        vec![
            Peer::new(ip("10.1.0.2"), 65001),
            Peer::new(ip("fd00:2::2"), 65002),
        ],
        &[VIP4, VIP6],
    );

    let i = wait_established(&s, "10.1.0.2");
    assert_eq!(i.internal, Some(true), "same AS: iBGP");
    let r = wait_route(&g1, "20.0.0.100/32", "10.1.0.1");
    assert!(r.as_path.is_empty(), "iBGP adds no AS: {r:?}");
    assert_eq!(r.local_pref, Some(100));
    wait_route(&g1, "2001:db8::100/128", "fd00:1::1");

    let e = wait_established(&s, "fd00:2::2");
    assert_eq!(e.internal, Some(false));
    assert_eq!(e.source_address, Some(ip("fd00:2::1")));
    assert!(g2.established_with(ip("fd00:2::1")));
    let r = wait_route(&g2, "2001:db8::100/128", "fd00:2::1");
    assert_eq!(r.as_path, vec![65001]);
    assert_eq!(r.neighbor, Some(ip("fd00:2::1")));
    // the IPv4 VIP over the IPv6 session, next hop = LB's IPv4 on the link
    wait_route(&g2, "20.0.0.100/32", "10.2.0.1");
}

/// VIP roles: a VIP this node serves as a backup goes to an eBGP peer with
/// the local AS prepended (3 more times by default) and to an iBGP peer
/// with LOCAL_PREF 50 (a prepended own AS would be a loop there); when the
/// role flips the route is re-announced with the active path, in place
/// (no withdrawal, no session reset). `withdraw` takes backups off the
/// wire, `ecmp` announces them like active ones.
#[test]
fn backup_vips_announced_with_a_worse_path_and_flipped_in_place() {
    if !have_daemons("backup_vips_announced_with_a_worse_path_and_flipped_in_place") {
        return;
    }
    let lab = lab("lxb7", 2);
    let ebgp = lab.router(0, 65002);
    let ibgp = lab.router(1, 65001);
    let mut config = quick(BgpConfig::new(65001));
    config.router_id = Some(Ipv4Addr::new(10, 1, 0, 1));
    let mut s = lab.speaker(
        config,
        vec![
            Peer::new(ip("10.1.0.2"), 65002),
            Peer::new(ip("10.2.0.2"), 65001),
        ],
        &[VIP4],
    );
    wait_established(&s, "10.1.0.2");
    wait_established(&s, "10.2.0.2");
    let path_of = |g: &GobgpPeer, prefix: &str, want: &dyn Fn(&RibRoute) -> bool| {
        wait_path(g, prefix, "as wanted", want)
    };
    // 20.0.0.100 active, 20.0.0.101 backup.
    let uptime = neighbor(&s, "10.1.0.2").since;
    let c = s.set_announced([ip(VIP4), ip(VIP4B)], [ip(VIP4B)]).unwrap();
    assert_eq!(c.added, vec![ip(VIP4B)]);
    path_of(&ebgp, "20.0.0.100/32", &|r| r.as_path == [65001]);
    path_of(&ebgp, "20.0.0.101/32", &|r| r.as_path == [65001; 4]);
    path_of(&ibgp, "20.0.0.100/32", &|r| r.local_pref == Some(100));
    let r = path_of(&ibgp, "20.0.0.101/32", &|r| r.local_pref == Some(50));
    assert!(r.as_path.is_empty(), "no own AS toward iBGP: {r:?}");
    assert_eq!(
        s.backup_vips().iter().copied().collect::<Vec<_>>(),
        [ip(VIP4B)]
    );

    // The roles swap.
    let c = s.set_announced([ip(VIP4), ip(VIP4B)], [ip(VIP4)]).unwrap();
    assert_eq!(
        (c.to_backup, c.to_active),
        (vec![ip(VIP4)], vec![ip(VIP4B)])
    );
    path_of(&ebgp, "20.0.0.101/32", &|r| r.as_path == [65001]);
    path_of(&ebgp, "20.0.0.100/32", &|r| r.as_path == [65001; 4]);
    path_of(&ibgp, "20.0.0.101/32", &|r| r.local_pref == Some(100));
    path_of(&ibgp, "20.0.0.100/32", &|r| r.local_pref == Some(50));
    assert_eq!(neighbor(&s, "10.1.0.2").since, uptime, "no session reset");
    drop(s);

    // withdraw: the backup VIP is not announced; ecmp: as an active one.
    for (mode, backup_path) in [
        (BackupPath::Withdraw, None),
        (BackupPath::Ecmp, Some(vec![65001])),
    ] {
        let mut config = quick(BgpConfig::new(65001));
        config.backup = mode;
        let mut s = lab.speaker(config, vec![Peer::new(ip("10.1.0.2"), 65002)], &[]);
        s.set_announced([ip(VIP4), ip(VIP4B)], [ip(VIP4B)]).unwrap();
        wait_established(&s, "10.1.0.2");
        path_of(&ebgp, "20.0.0.100/32", &|r| r.as_path == [65001]);
        match &backup_path {
            None => {
                // Settled: the active VIP is there; the backup one must not be.
                std::thread::sleep(Duration::from_secs(1));
                let routes = ebgp.routes().unwrap();
                assert!(
                    find(&routes, "20.0.0.101/32").is_none(),
                    "{mode}: {routes:?}"
                );
            }
            Some(p) => {
                path_of(&ebgp, "20.0.0.101/32", &|r| &r.as_path == p);
            }
        }
        drop(s);
        wait_no_route(&ebgp, "20.0.0.100/32");
    }
}

/// The peer daemon crashes and comes back: the session is re-established
/// and the VIPs announced again. BIRD itself crashes: the supervisor
/// restarts it with the same state.
#[test]
fn session_recovers_from_peer_restart_and_bird_crash() {
    if !have_daemons("session_recovers_from_peer_restart_and_bird_crash") {
        return;
    }
    let lab = lab("lxb3", 1);
    let mut g = lab.router(0, 65002);
    let mut config = quick(BgpConfig::new(65001));
    config.router_id = Some(Ipv4Addr::new(10, 1, 0, 1));
    let s = lab.speaker(
        config,
        vec![Peer::new(ip("10.1.0.2"), 65002)],
        &[VIP4, VIP6],
    );
    wait_established(&s, "10.1.0.2");
    wait_route(&g, "20.0.0.100/32", "10.1.0.1");

    // gobgpd killed: the speaker sees the session go
    g.kill();
    let down = eventually("session down after the peer died", T, || {
        let n = neighbor(&s, "10.1.0.2");
        if n.is_established() {
            Err("still established".into())
        } else {
            Ok(n)
        }
    });
    assert_ne!(down.state, BgpState::Established);
    assert_eq!(down.uptime, None);
    eprintln!(
        "while the peer is gone: {} / last error {:?}",
        down.info, down.last_error
    );
    assert!(
        down.last_error.is_some(),
        "the reason is reported: {down:?}"
    );
    assert_eq!(
        s.exported_routes().unwrap()[0].routes,
        vec![],
        "nothing sent while down"
    );
    // and comes back: re-established, routes announced again (a fresh RIB)
    g.restart().unwrap();
    let t0 = std::time::Instant::now();
    wait_established(&s, "10.1.0.2");
    wait_route(&g, "20.0.0.100/32", "10.1.0.1");
    wait_route(&g, "2001:db8::100/128", "fd00:1::1");
    eprintln!("re-established {:?} after the peer restarted", t0.elapsed());

    // BIRD killed: restarted by the supervisor with the same VIPs and peers
    let pid = s.pid().unwrap();
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    eventually("BIRD restarted", T, || match s.status() {
        Ok(st) if st.pid.is_some() && st.pid != Some(pid) => Ok(st),
        other => Err(format!("{other:?}")),
    });
    assert_eq!(s.status().unwrap().restarts, 1);
    wait_established(&s, "10.1.0.2");
    wait_route(&g, "20.0.0.100/32", "10.1.0.1");
    eventually("peer sees the session again", T, || {
        if g.established_with(ip("10.1.0.1")) {
            Ok(())
        } else {
            Err(format!("{:?}", g.neighbors()))
        }
    });
}

/// `--listenBGPPort`: a peer that does not listen itself and connects to
/// the speaker's port 1790 gets a session (the speaker does not listen on
/// 179). `IP:AS:PORT`: a passive peer listening on 10179 is reached there.
#[test]
fn listen_port_and_peer_port() {
    if !have_daemons("listen_port_and_peer_port") {
        return;
    }
    let lab = lab("lxb4", 2);
    let mut n1 = GobgpNeighbor::new("10.1.0.1", 65001);
    n1.remote_port = Some(1790);
    let g1 = GobgpPeer::start(
        &lab.peers[0],
        65002,
        Ipv4Addr::new(10, 1, 0, 2),
        Listen::Off,
        &[n1],
    )
    .unwrap();
    let mut n2 = GobgpNeighbor::new("10.2.0.1", 65001);
    n2.passive = true;
    let g2 = GobgpPeer::start(
        &lab.peers[1],
        65003,
        Ipv4Addr::new(10, 2, 0, 2),
        Listen::Port(10179),
        &[n2],
    )
    .unwrap();
    let setup = BgpFlags::parse(
        Some("65001"),
        Some("10.1.0.2:65002,10.2.0.2:65003:10179"),
        Some("1790"),
        None,
    )
    .unwrap()
    .setup()
    .unwrap()
    .unwrap();
    assert_eq!(setup.config.listen_port, 1790);
    let mut config = quick(setup.config);
    config.router_id = Some(Ipv4Addr::new(10, 1, 0, 1));
    let s = lab.speaker(config, setup.peers, &[VIP4]);

    let listening = lab.lb.sh(&["ss", "-Hltn"]).unwrap();
    eventually("BIRD listens on 1790", T, || {
        let l = lab.lb.sh(&["ss", "-Hltn"]).map_err(|e| e.to_string())?;
        if l.contains(":1790 ") {
            Ok(())
        } else {
            Err(l)
        }
    });
    assert!(!listening.contains(":179 "), "nothing on 179:\n{listening}");

    wait_established(&s, "10.1.0.2");
    wait_route(&g1, "20.0.0.100/32", "10.1.0.1");
    wait_established(&s, "10.2.0.2");
    wait_route(&g2, "20.0.0.100/32", "10.2.0.1");

    // the same view from another process's point of view (a CLI): only
    // the control socket
    let c = Control::new(&s.options().socket_path());
    let ns = query_neighbors(&c).unwrap();
    let addrs: Vec<IpAddr> = ns.iter().map(|n| n.address).collect();
    assert_eq!(addrs, [ip("10.1.0.2"), ip("10.2.0.2")]);
    assert!(ns.iter().all(|n| n.is_established()), "{ns:?}");
    assert_eq!(
        query_exported(&c, ip("10.2.0.2"))
            .unwrap()
            .iter()
            .map(|r| r.to_string())
            .collect::<Vec<_>>(),
        ["20.0.0.100/32"]
    );
}

/// eBGP to a peer two hops away: without `--eBGPMultiHop` the session does
/// not come up (BIRD waits for a directly connected neighbour); with it
/// (the peer changed at run time) it does, and the IPv6 VIP goes with the
/// configured IPv6 next hop (a multihop session has no link to take one
/// from).
#[test]
fn ebgp_multihop() {
    if !have_daemons("ebgp_multihop") {
        return;
    }
    // lb p1 10.1.0.1 <-> router 10.1.0.2 ; router r1 10.9.0.1 <-> peer 10.9.0.2
    let lab = lab("lxb5", 1);
    let router = &lab.peers[0];
    router
        .sh(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        .unwrap();
    let far = Netns::new("lxb5-far").unwrap();
    veth(
        router,
        "r1",
        &["10.9.0.1/24"],
        &far,
        "up0",
        &["10.9.0.2/24"],
    )
    .unwrap();
    lab.lb
        .sh(&["ip", "route", "add", "10.9.0.0/24", "via", "10.1.0.2"])
        .unwrap();
    far.sh(&["ip", "route", "add", "10.1.0.0/24", "via", "10.9.0.1"])
        .unwrap();

    let mut n = GobgpNeighbor::new("10.1.0.1", 65001);
    n.multihop_ttl = Some(10);
    let g = GobgpPeer::start(
        &far,
        65002,
        Ipv4Addr::new(10, 9, 0, 2),
        Listen::Port(179),
        &[n],
    )
    .unwrap();

    let flags = |mh: Option<&str>| {
        BgpFlags::parse(Some("65001"), Some("10.9.0.2:65002"), None, mh)
            .unwrap()
            .setup()
            .unwrap()
            .unwrap()
    };
    let mut config = quick(flags(None).config);
    config.router_id = Some(Ipv4Addr::new(10, 1, 0, 1));
    config.next_hop_v6 = Some("fd00:1::1".parse().unwrap());
    let mut s = lab.speaker(config, flags(None).peers, &[VIP4, VIP6]);

    std::thread::sleep(Duration::from_secs(4));
    let n = neighbor(&s, "10.9.0.2");
    assert!(
        !n.is_established(),
        "a directly connected eBGP session to a peer two hops away: {n:?}"
    );
    assert!(g.routes().unwrap().is_empty());

    let mh = flags(Some("true")).peers;
    assert_eq!(mh[0].multihop_ttl, Some(64));
    let ch = s.set_peers(mh).unwrap();
    assert_eq!(ch.changed, vec![ip("10.9.0.2")]);
    let n = wait_established(&s, "10.9.0.2");
    assert!(n.multihop);
    assert_eq!(n.source_address, Some(ip("10.1.0.1")));
    wait_route(&g, "20.0.0.100/32", "10.1.0.1");
    wait_route(&g, "2001:db8::100/128", "fd00:1::1");
    drop(s);
    drop(g);
    drop(far);
}

/// A process killed on drop.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A BIRD left running by an earlier agent with the same directory (its
/// pid file, our control socket) is stopped before the new one starts:
/// never two speakers announcing for one node.
#[test]
fn stale_bird_from_earlier_agent_is_replaced() {
    if !have_daemons("stale_bird_from_earlier_agent_is_replaced") {
        return;
    }
    let lab = lab("lxb6", 0);
    let opts = SpeakerOptions::in_dir(&lab.dir.0);
    std::fs::create_dir_all(&lab.dir.0).unwrap();
    std::fs::write(
        opts.config_path(),
        "router id 10.6.0.1;\nprotocol device {}\n",
    )
    .unwrap();
    let stale = std::process::Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{}", lab.lb.name))
        .arg("bird")
        .arg("-f")
        .arg("-c")
        .arg(opts.config_path())
        .arg("-s")
        .arg(opts.socket_path())
        .arg("-P")
        .arg(opts.pid_path())
        .spawn()
        .unwrap();
    let mut stale = KillOnDrop(stale);
    let stale_pid = stale.0.id();
    eventually(
        "stale BIRD wrote its pid file",
        T,
        || match std::fs::read_to_string(opts.pid_path()) {
            Ok(p) if p.trim() == stale_pid.to_string() => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    eventually("stale BIRD answers", T, || {
        Control::new(&opts.socket_path())
            .command("show status")
            .map_err(|e| e.to_string())
    });
    let mut config = quick(BgpConfig::new(65001));
    config.router_id = Some(Ipv4Addr::new(10, 6, 0, 1));
    let s = lab.speaker(config, vec![], &[VIP4]);
    // it was stopped, not left running beside the new one
    let st = stale.0.wait().unwrap();
    eprintln!("stale BIRD: {st}");
    assert_ne!(s.pid(), Some(stale_pid));
    assert!(s.bird_status().unwrap().daemon.contains("up and running"));
    assert_eq!(
        std::fs::read_to_string(opts.pid_path()).unwrap().trim(),
        s.pid().unwrap().to_string()
    );
}
