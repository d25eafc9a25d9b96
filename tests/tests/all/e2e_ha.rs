//! High availability with real traffic: two load-balancer nodes on the
//! client's L2 segment and on the backends' segment, one Lease between
//! them, in full-NAT with kube-loxilb's `--setRoles` VIP as the source the
//! backends answer to. The leader holds the service VIP and the role VIP,
//! the follower neither; when the leader's node dies, the follower takes
//! both over and announces them (gratuitous ARP), and the client's new
//! connections reach the backends through it, with no change anywhere
//! else (the client and the backends only ARP).
//!
//! ```text
//!   client 10.30.0.2 ─┐ brc (sw ns)          brb (sw ns) ┌─ backend 10.31.0.21
//!          lb-a x0 10.30.0.11 ─┤   lb-a x1 10.31.0.11 ──┤─ backend 10.31.0.22
//!          lb-b x0 10.30.0.12 ─┘   lb-b x1 10.31.0.12 ──┘
//!   VIPs: 10.30.0.100 (service, from the pool), 10.31.0.100 (--setRoles)
//! ```

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::{Duration, Instant},
};

use loxilb_tests::{
    bgp_peer::{GobgpNeighbor, GobgpPeer, Listen, RibRoute},
    certs::Certs,
    kube_api::{
        endpoint_slice, lo_addrs, node, service, wait_until, ApiServer, KubeAgent, KubeAgentSpec,
    },
    need_root,
    netns::{Conn, Netns, PinDirGuard, Reply, Servers},
    sctp_peers::{need_tools, SctpClient, SctpServer},
};

const POOL: &str = "defaultPool=10.30.0.100-10.30.0.103";
const ROLE_VIP: &str = "10.31.0.100";
/// Two pools of two addresses each (`--vipOwners=pool`).
const POOLS: &str = "p1=10.30.0.100-10.30.0.101,p2=10.30.0.102-10.30.0.103";

struct Ha {
    prefix: String,
    sw: Netns,
    client: Netns,
    lbs: Vec<Netns>,
    _backends: Vec<Netns>,
    _servers: Vec<Servers>,
    _pins: Vec<PinDirGuard>,
}

fn run(ns: &Netns, cmd: &str) {
    ns.sh(&cmd.split(' ').collect::<Vec<_>>())
        .unwrap_or_else(|e| panic!("{}: {cmd}: {e:#}", ns.name));
}

impl Ha {
    fn new(prefix: &str) -> Ha {
        let sw = Netns::new(&format!("{prefix}-sw")).unwrap();
        for c in [
            "ip link add brc type bridge",
            "ip link add brb type bridge",
            "ip link set brc up",
            "ip link set brb up",
        ] {
            run(&sw, c);
        }
        // A host `h` with device `dev` at `addr` on bridge `br`.
        let mut n = 0;
        let mut plug = |h: &Netns, dev: &str, addr: &str, br: &str| {
            n += 1;
            let port = format!("p{n}");
            let tmp = format!("{prefix}t{n}");
            run(
                &sw,
                &format!("ip link add {port} type veth peer name {tmp}"),
            );
            run(&sw, &format!("ip link set {tmp} netns {}", h.name));
            run(&sw, &format!("ip link set {port} master {br} up"));
            // GRO on the switch side: the LB nodes' XDP may redirect into
            // their devices.
            run(&sw, &format!("ethtool -K {port} gro on tx off"));
            run(h, &format!("ip link set {tmp} name {dev}"));
            run(h, &format!("ip addr add {addr}/24 dev {dev}"));
            run(h, &format!("ip link set {dev} up"));
            run(h, &format!("ethtool -K {dev} tx off"));
        };
        let client = Netns::new(&format!("{prefix}-c")).unwrap();
        plug(&client, "c0", "10.30.0.2", "brc");
        let mut lbs = vec![];
        for (i, who) in ["a", "b"].iter().enumerate() {
            let lb = Netns::new(&format!("{prefix}-{who}")).unwrap();
            plug(&lb, "x0", &format!("10.30.0.{}", 11 + i), "brc");
            plug(&lb, "x1", &format!("10.31.0.{}", 11 + i), "brb");
            for k in [
                "net.ipv4.ip_forward=1",
                "net.ipv4.conf.all.rp_filter=0",
                "net.ipv4.conf.default.rp_filter=0",
            ] {
                run(&lb, &format!("sysctl -qw {k}"));
            }
            lbs.push(lb);
        }
        let mut backends = vec![];
        let mut servers = vec![];
        for i in 1..=2 {
            let b = Netns::new(&format!("{prefix}-e{i}")).unwrap();
            plug(&b, "e0", &format!("10.31.0.{}", 20 + i), "brb");
            servers.push(Servers::start(&b, &format!("b{i}"), 8080, 5353).unwrap());
            backends.push(b);
        }
        let pins = ["a", "b"]
            .iter()
            .map(|w| PinDirGuard(Self::pin(prefix, w)))
            .collect();
        Ha {
            prefix: prefix.into(),
            sw,
            client,
            lbs,
            _backends: backends,
            _servers: servers,
            _pins: pins,
        }
    }

    fn pin(prefix: &str, who: &str) -> PathBuf {
        PathBuf::from(format!("/sys/fs/bpf/loxilb-{prefix}-{who}"))
    }

    fn start(&self, api: &ApiServer, i: usize, label: &str) -> KubeAgent {
        self.start_with(api, i, label, &["--health-listen=127.0.0.1:19436"])
    }

    /// The value of an unlabelled sample, or of the first sample of
    /// `name` whose line holds `with`, in node `i`'s `/metrics`.
    fn metric(&self, i: usize, name: &str, with: &str) -> Option<f64> {
        use std::io::{Read, Write};
        let body = self.lbs[i].run(|| {
            let mut s = std::net::TcpStream::connect("127.0.0.1:19436").ok()?;
            s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
            s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
                .ok()?;
            let mut out = String::new();
            s.read_to_string(&mut out).ok()?;
            Some(out)
        })?;
        body.lines()
            .filter(|l| !l.starts_with('#'))
            .find(|l| {
                (l.starts_with(&format!("{name} ")) || l.starts_with(&format!("{name}{{")))
                    && l.contains(with)
            })?
            .rsplit(' ')
            .next()?
            .parse()
            .ok()
    }

    /// With conntrack sync between the two nodes (over the client-side
    /// segment, mutual TLS with `certs.dirs[i]`, the peer found from the
    /// Node objects).
    fn start_synced(&self, api: &ApiServer, i: usize, label: &str, certs: &Certs) -> KubeAgent {
        self.start_synced_with(api, i, label, certs, &[])
    }

    fn start_synced_with(
        &self,
        api: &ApiServer,
        i: usize,
        label: &str,
        certs: &Certs,
        extra: &[&str],
    ) -> KubeAgent {
        let sync = Self::sync_args(i, certs);
        let mut args: Vec<&str> = sync.iter().map(String::as_str).collect();
        args.extend_from_slice(extra);
        self.start_with(api, i, label, &args)
    }

    /// Conntrack sync between the two nodes for node `i`: its listener on
    /// the client-side segment, the peers the other Node's InternalIP (the
    /// API's Node objects) at the listener's port, mutual TLS with
    /// `certs.dirs[i]`.
    fn sync_args(i: usize, certs: &Certs) -> [String; 3] {
        [
            format!("--ctsync-listen=10.30.0.{}:22222", 11 + i),
            "--ctsync-peers=nodes".to_string(),
            format!("--ctsync-tls={}", certs.dirs[i].to_str().unwrap()),
        ]
    }

    /// The MAC of node `i`'s client-side device.
    fn mac(&self, i: usize) -> String {
        self.lbs[i]
            .sh(&["cat", "/sys/class/net/x0/address"])
            .unwrap()
            .trim()
            .to_string()
    }

    fn start_with(&self, api: &ApiServer, i: usize, label: &str, extra: &[&str]) -> KubeAgent {
        let who = ["a", "b"][i];
        let mut spec = KubeAgentSpec::new(&format!("node-{who}"), label, POOL)
            .arg("--setLBMode=2")
            .arg(&format!("--setRoles={ROLE_VIP}"));
        for x in extra {
            spec = spec.arg(x);
        }
        self.launch(api, i, label, &spec)
    }

    /// `--vipOwners=pool` over [`POOLS`], full-NAT from each node's own
    /// backend-side address (no `--setRoles`).
    fn start_pools(&self, api: &ApiServer, i: usize, label: &str) -> KubeAgent {
        let source = format!("--fullnat-source=10.31.0.{}", 11 + i);
        self.start_pools_with(api, i, label, &[&source])
    }

    /// `--vipOwners=pool` over [`POOLS`] in full-NAT, with `extra`
    /// arguments (without `--fullnat-source` the source is the VIP).
    fn start_pools_with(
        &self,
        api: &ApiServer,
        i: usize,
        label: &str,
        extra: &[&str],
    ) -> KubeAgent {
        let who = ["a", "b"][i];
        let mut spec = KubeAgentSpec::new(&format!("node-{who}"), label, POOLS)
            .arg("--setLBMode=2")
            .arg("--vipOwners=pool");
        for x in extra {
            spec = spec.arg(x);
        }
        self.launch(api, i, label, &spec)
    }

    /// The nodes holding `vip` on `lo`.
    fn owners(&self, vip: &str) -> Vec<usize> {
        (0..2)
            .filter(|i| lo_addrs(&self.lbs[*i]).contains(&vip.to_string()))
            .collect()
    }

    /// Who sent and took TCP resets, and every host's neighbour table:
    /// where a broken connection's packets went.
    fn wire_state(&self) -> String {
        let hosts = std::iter::once(&self.client)
            .chain(&self.lbs)
            .chain(&self._backends);
        let mut out = String::new();
        for h in hosts {
            let tcp = h
                .sh(&[
                    "nstat",
                    "-asz",
                    "TcpOutRsts",
                    "TcpInErrs",
                    "TcpEstabResets",
                    "TcpExtTCPAbortOnData",
                ])
                .unwrap_or_else(|e| format!("{e:#}"));
            let neigh = h.sh(&["ip", "neigh", "show"]).unwrap_or_default();
            let lo = lo_addrs(h);
            out += &format!("--- {} (lo {lo:?})\n{tcp}{neigh}", h.name);
        }
        out
    }

    /// The client's neighbour entry for `ip` (`ip neigh show`).
    fn client_neigh(&self, ip: &str) -> String {
        self.client
            .sh(&["ip", "neigh", "show", ip])
            .unwrap_or_default()
    }

    fn launch(&self, api: &ApiServer, i: usize, label: &str, spec: &KubeAgentSpec) -> KubeAgent {
        let who = ["a", "b"][i];
        KubeAgent::start_in(
            &self.lbs[i],
            &["x0".into(), "x1".into()],
            Self::pin(&self.prefix, who),
            &self.prefix,
            api,
            spec,
        )
        .unwrap_or_else(|e| panic!("agent {label}: {e:#}"))
    }

    /// The node dies: its links go down (the agent was killed first).
    fn cut(&self, i: usize) {
        for d in ["x0", "x1"] {
            run(&self.lbs[i], &format!("ip link set {d} down"));
        }
    }

    /// The node's links up again.
    fn uncut(&self, i: usize) {
        for d in ["x0", "x1"] {
            run(&self.lbs[i], &format!("ip link set {d} up"));
        }
    }
}

fn seed_api(api: &ApiServer) {
    api.api.with(|s| {
        s.put("nodes", node("node-a", "10.30.0.11"));
        s.put("nodes", node("node-b", "10.30.0.12"));
        s.put("services", service("web", 80));
        s.put(
            "endpointslices",
            endpoint_slice(
                "web",
                &[Ipv4Addr::new(10, 31, 0, 21), Ipv4Addr::new(10, 31, 0, 22)],
            ),
        );
    });
}

/// Wait until web has a VIP, both datapaths have its rule and node-a
/// (the leader) holds the service and role VIPs; the VIP.
fn bring_up(ha: &Ha, api: &ApiServer, a: &KubeAgent, b: &KubeAgent) -> String {
    let mut vip = String::new();
    wait_until("web has a VIP", Duration::from_secs(20), || {
        vip = api.ingress("web").into_iter().next().unwrap_or_default();
        !vip.is_empty()
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", a.log_text()));
    for ag in [a, b] {
        wait_until("the rule in each datapath", Duration::from_secs(20), || {
            ag.cli("rules")
                .is_ok_and(|r| r.contains(&format!("{vip}:80")))
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", ag.log_text()));
    }
    wait_until("node-a holds both VIPs", Duration::from_secs(10), || {
        let lo = lo_addrs(&ha.lbs[0]);
        lo.contains(&vip) && lo.contains(&ROLE_VIP.to_string())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", a.log_text()));
    assert!(
        lo_addrs(&ha.lbs[1]).is_empty(),
        "the follower holds nothing"
    );
    vip
}

/// node-a's agent started (`start(0)`) and leading, then node-b's
/// (`start(1)`), and the web VIP up on node-a ([`bring_up`]): the two
/// agents and the VIP.
fn lead_then_follow(
    ha: &Ha,
    api: &ApiServer,
    start: impl Fn(usize) -> KubeAgent,
) -> (KubeAgent, KubeAgent, String) {
    let a = start(0);
    wait_until("node-a leads", Duration::from_secs(15), || {
        api.lease_holder().as_deref() == Some("node-a")
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", a.log_text()));
    let b = start(1);
    let vip = bring_up(ha, api, &a, &b);
    (a, b, vip)
}

/// `LOXILB_HA_RUNS` (default 2, at least 1): the takeovers of a timing test.
fn ha_runs() -> usize {
    std::env::var("LOXILB_HA_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2)
        .max(1)
}

/// How often node `i`'s agents took the Lease over on a proof of death.
fn death_hints(agents: &[Option<KubeAgent>], i: usize) -> usize {
    log_of(agents, i)
        .matches("found dead: taking the Lease over now")
        .count()
}

/// node-a's node dies (the agent killed, its links down); wait until
/// node-b holds both VIPs. Returns when it died.
fn fail_over(ha: &Ha, a: &mut KubeAgent, b: &KubeAgent, vip: &str) -> Instant {
    a.kill();
    ha.cut(0);
    let t0 = Instant::now();
    wait_until("node-b takes over", Duration::from_secs(20), || {
        let lo = lo_addrs(&ha.lbs[1]);
        lo.contains(&vip.to_string()) && lo.contains(&ROLE_VIP.to_string())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", b.log_text()));
    t0
}

/// A request through the VIP: the backend that answered (`b1`/`b2`) and
/// the source it saw.
fn ask(client: &Netns, vip: &str) -> anyhow::Result<(String, SocketAddr)> {
    let to: SocketAddr = format!("{vip}:80").parse().unwrap();
    let mut c = Conn::open(client, to)?;
    let r = c.ask("hello")?;
    Ok((r.backend, r.client))
}

#[test]
fn the_follower_takes_over_the_vips_when_the_leaders_node_dies() {
    let name = "the_follower_takes_over_the_vips_when_the_leaders_node_dies";
    if !need_root(name) {
        return;
    }
    let ha = Ha::new("lxha1");
    let api = ApiServer::new();
    seed_api(&api);
    let (mut a, mut b, vip) =
        lead_then_follow(&ha, &api, |i| ha.start(&api, i, ["node-a", "node-b"][i]));

    // Through node-a: full-NAT, the backends see the role VIP.
    for _ in 0..4 {
        let (backend, src) = ask(&ha.client, &vip)
            .unwrap_or_else(|e| panic!("through node-a: {e:#}\n{}", a.log_text()));
        assert!(backend.starts_with('b'));
        assert_eq!(src.ip().to_string(), ROLE_VIP, "the full-NAT source");
    }
    let neigh = ha.client_neigh(&vip);
    let mac_a = ha.lbs[0].sh(&["cat", "/sys/class/net/x0/address"]).unwrap();
    assert!(
        neigh.contains(mac_a.trim()),
        "client reaches the VIP at node-a: {neigh}"
    );

    // The metrics say who leads and how full the pool is (4 addresses,
    // one held).
    wait_until(
        "the controller's figures published",
        Duration::from_secs(10),
        || {
            ha.metric(0, "loxilb_kube_leader", "") == Some(1.0)
                && ha.metric(1, "loxilb_kube_leader", "") == Some(0.0)
        },
    )
    .unwrap();
    let pool = "pool=\"defaultPool\"";
    assert_eq!(ha.metric(0, "loxilb_ipam_pool_addresses", pool), Some(4.0));
    assert_eq!(ha.metric(0, "loxilb_ipam_pool_used", pool), Some(1.0));
    assert_eq!(ha.metric(0, "loxilb_kube_services", ""), Some(1.0));
    // The leader reconciled web (at least once), without failures.
    assert!(ha
        .metric(0, "loxilb_kube_reconciles_total", "")
        .is_some_and(|n| n >= 1.0));
    assert!(ha
        .metric(0, "loxilb_kube_reconcile_seconds_total", "")
        .is_some_and(|s| s > 0.0));
    assert_eq!(
        ha.metric(0, "loxilb_kube_reconcile_errors_total", "kind=\"error\""),
        Some(0.0)
    );

    // node-a's node dies.
    let t0 = fail_over(&ha, &mut a, &b, &vip);
    let took = t0.elapsed();
    // New connections reach the backends through node-b: the client and
    // the backends learnt the new owner from its announcements.
    let mut served = None;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok((backend, src)) = ask(&ha.client, &vip) {
            assert_eq!(src.ip().to_string(), ROLE_VIP);
            served = Some(backend);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let serving = t0.elapsed();
    assert!(
        served.is_some(),
        "no connection through node-b after the takeover:\n{}",
        b.log_text()
    );
    let neigh = ha.client_neigh(&vip);
    let mac_b = ha.lbs[1].sh(&["cat", "/sys/class/net/x0/address"]).unwrap();
    assert!(
        neigh.contains(mac_b.trim()),
        "client now at node-b: {neigh}"
    );
    let roles = b.cli("roles").unwrap();
    assert!(roles.contains("active"), "{roles}");
    wait_until("node-b reports leading", Duration::from_secs(10), || {
        ha.metric(1, "loxilb_kube_leader", "") == Some(1.0)
    })
    .unwrap();
    assert_eq!(ha.metric(1, "loxilb_ipam_pool_used", pool), Some(1.0));
    eprintln!(
        "{name}: VIPs on node-b {took:?} after the kill, first connection served {serving:?}"
    );
    b.stop().unwrap();
    drop(ha.sw);
}

/// With BGP: a router (GoBGP, on the client's segment) peers with both
/// nodes. The active node announces the VIP as it is, the backup with its
/// AS prepended (`--bgp-backup-path`, default prepend:3), so the router's
/// best path is the active node's; when the active agent is killed, its
/// BIRD goes with it (its session drops, its path is withdrawn) and the
/// new owner re-announces the VIP with the short path; the restarted
/// agent comes back as a backup, with the long path, and the router keeps
/// the new owner's.
#[test]
fn bgp_routers_prefer_the_active_node_and_follow_the_takeover() {
    let name = "bgp_routers_prefer_the_active_node_and_follow_the_takeover";
    if !need_root(name) {
        return;
    }
    let ha = Ha::new("lxha5");
    let router = GobgpPeer::start(
        &ha.client,
        65100,
        Ipv4Addr::new(10, 30, 0, 2),
        Listen::Port(179),
        &[
            GobgpNeighbor::new("10.30.0.11", 65001),
            GobgpNeighbor::new("10.30.0.12", 65001),
        ],
    )
    .unwrap_or_else(|e| panic!("{name}: gobgpd: {e:#}"));
    let api = ApiServer::new();
    seed_api(&api);
    let bgp = [
        "--setBGP=65001",
        "--extBGPPeers=10.30.0.2:65100",
        "--health-listen=127.0.0.1:19436",
    ];
    let (mut a, b, vip) = lead_then_follow(&ha, &api, |i| {
        ha.start_with(&api, i, ["node-a", "node-b"][i], &bgp)
    });
    let prefix = format!("{vip}/32");
    let node_a: std::net::IpAddr = "10.30.0.11".parse().unwrap();
    let node_b: std::net::IpAddr = "10.30.0.12".parse().unwrap();
    // The router's paths for the VIP: (from, AS path, best).
    let paths = || -> Vec<RibRoute> {
        router
            .routes()
            .unwrap_or_default()
            .into_iter()
            .filter(|r| r.prefix == prefix)
            .collect()
    };
    let show = |what: &str, a: &KubeAgent, b: &KubeAgent| {
        format!(
            "{what}: router's paths {:?}\n--- node-a\n{}\n--- node-b\n{}",
            paths(),
            a.log_text(),
            b.log_text()
        )
    };
    let path_is = |from: std::net::IpAddr, as_path: &[u32], best: bool| {
        let ps = paths();
        ps.iter()
            .any(|r| r.neighbor == Some(from) && r.as_path == as_path && r.best == best)
    };
    let short = [65001];
    let long = [65001; 4];
    wait_until(
        "the router has both paths, node-a's best",
        Duration::from_secs(30),
        || path_is(node_a, &short, true) && path_is(node_b, &long, false),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", show("before", &a, &b)));
    // The sessions in the metrics: up, one route (the VIP) sent by each.
    for i in 0..2 {
        assert_eq!(
            ha.metric(i, "loxilb_bgp_session_up", "10.30.0.2"),
            Some(1.0)
        );
        assert_eq!(ha.metric(i, "loxilb_bgp_routes_sent", "65100"), Some(1.0));
    }

    // The active agent dies.
    a.kill();
    let t0 = Instant::now();
    wait_until(
        "node-b's path is the router's best and short",
        Duration::from_secs(30),
        || {
            let ps = paths();
            ps.len() == 1 && path_is(node_b, &short, true)
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", show("after the kill", &a, &b)));
    let moved = t0.elapsed();
    assert!(lo_addrs(&ha.lbs[1]).contains(&vip), "node-b holds the VIP");

    // node-a comes back: as a backup, with the long path.
    let a2 = ha.start_with(&api, 0, "node-a2", &bgp);
    wait_until(
        "node-a back as a backup, the router keeps node-b's path",
        Duration::from_secs(30),
        || path_is(node_b, &short, true) && path_is(node_a, &long, false),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", show("after the restart", &a2, &b)));
    assert!(
        !lo_addrs(&ha.lbs[0]).contains(&vip),
        "the restarted node-a does not hold the VIP"
    );
    eprintln!("{name}: router's best path on node-b {moved:?} after the kill");
}

/// With conntrack sync on: a TCP connection opened through the leader
/// carries on through the follower after the leader's node dies (same
/// backend, same full-NAT source port, no reset), because the follower
/// received the session over the mutually authenticated sync stream.
#[test]
fn an_established_connection_survives_the_takeover() {
    let name = "an_established_connection_survives_the_takeover";
    if !need_root(name) {
        return;
    }
    let ha = Ha::new("lxha2");
    let certs = Certs::new(&["node-a", "node-b"]);
    let api = ApiServer::new();
    seed_api(&api);
    let (mut a, mut b, vip) = lead_then_follow(&ha, &api, |i| {
        ha.start_synced(&api, i, ["node-a", "node-b"][i], &certs)
    });

    let to: SocketAddr = format!("{vip}:80").parse().unwrap();
    let mut c = Conn::open(&ha.client, to).expect("TCP through node-a");
    let first = c.ask("before").unwrap();
    assert_eq!(first.client.ip().to_string(), ROLE_VIP);
    // The session reaches node-b's table over the sync stream.
    let local = c.local_addr().to_string();
    wait_until("node-b has the session", Duration::from_secs(10), || {
        b.cli("sessions").is_ok_and(|t| t.contains(&local))
    })
    .unwrap_or_else(|e| {
        panic!(
            "{e}\nnode-a sync: {}\nnode-b sync: {}\n{}",
            a.cli("sync").unwrap_or_default(),
            b.cli("sync").unwrap_or_default(),
            b.log_text()
        )
    });
    let sync_a = a.cli("sync").unwrap();
    assert!(sync_a.contains("\"active\""), "{sync_a}");

    // node-a's node dies; node-b takes the VIPs over.
    let t0 = fail_over(&ha, &mut a, &b, &vip);
    // The same connection goes on, to the same backend, which sees the
    // same source (address and port).
    c.set_timeout(Duration::from_secs(15)).unwrap();
    let after = c.ask("after").unwrap_or_else(|e| {
        panic!(
            "the connection broke at the takeover: {e:#}\n{}",
            b.log_text()
        )
    });
    assert_eq!(after.backend, first.backend, "same backend");
    assert_eq!(after.client, first.client, "same full-NAT source and port");
    assert_eq!(after.echo, "after");
    eprintln!(
        "{name}: the connection answered {:?} after the kill",
        t0.elapsed()
    );
    let roles = b.cli("roles").unwrap();
    assert!(roles.contains("active"), "{roles}");
    b.stop().unwrap();
}

fn log_of(agents: &[Option<KubeAgent>], i: usize) -> String {
    agents[i].as_ref().map(|a| a.log_text()).unwrap_or_default()
}

/// An SCTP Service (`diameter`, port 3868) with one endpoint,
/// 10.31.0.21:3868.
fn seed_sctp(api: &ApiServer) {
    api.api.with(|s| {
        s.put(
            "services",
            serde_json::json!({
                "metadata": {"namespace": "default", "name": "diameter", "generation": 1, "annotations": {}},
                "spec": {"type": "LoadBalancer", "loadBalancerClass": "loxilb.io/loxilb",
                         "ports": [{"name": "d", "port": 3868, "targetPort": 3868,
                                    "nodePort": 30868, "protocol": "SCTP"}]},
            }),
        );
        s.put(
            "endpointslices",
            serde_json::json!({
                "metadata": {"namespace": "default", "name": "diameter-1",
                             "labels": {"kubernetes.io/service-name": "diameter"}},
                "addressType": "IPv4",
                "ports": [{"name": "d", "port": 3868, "protocol": "SCTP"}],
                "endpoints": [{"addresses": ["10.31.0.21"], "conditions": {"ready": true}}],
            }),
        );
    });
}

/// p50 and p99 (nearest rank) of `xs`, in ms.
fn p50_p99(xs: &[Duration]) -> (f64, f64) {
    let mut v: Vec<f64> = xs.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    v.sort_by(f64::total_cmp);
    let rank = |p: f64| v[((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
    (rank(0.5), rank(0.99))
}

/// An established TCP connection through the leader (node `l`), synced
/// to the follower (`f`): the connection and its first answer.
fn synced_connection(
    ha: &Ha,
    agents: &[Option<KubeAgent>],
    (l, f): (usize, usize),
    to: SocketAddr,
    run: usize,
) -> (Conn, Reply) {
    let mut c = Conn::open(&ha.client, to)
        .unwrap_or_else(|e| panic!("run {run}: through node {l}: {e:#}\n{}", log_of(agents, l)));
    let first = c.ask("before").unwrap();
    let local = c.local_addr().to_string();
    wait_until(
        "the follower has the session",
        Duration::from_secs(10),
        || {
            agents[f]
                .as_ref()
                .unwrap()
                .cli("sessions")
                .is_ok_and(|t| t.contains(&local))
        },
    )
    .unwrap_or_else(|e| panic!("run {run}: {e}\n{}", log_of(agents, f)));
    (c, first)
}

/// Times from `t0` (the failure) until node `f` holds the service and
/// role VIPs, the client's ARP entry for the VIP names `f`, and a new
/// connection is served through it (full-NAT from the role VIP).
fn watch_takeover(
    ha: &Ha,
    agents: &[Option<KubeAgent>],
    f: usize,
    vip: &str,
    t0: Instant,
    run: usize,
) -> [Duration; 3] {
    let to: SocketAddr = format!("{vip}:80").parse().unwrap();
    let (mut vip_at, mut arp_at) = (None, None);
    let mac_f = ha.mac(f);
    while (vip_at.is_none() || arp_at.is_none()) && t0.elapsed() < Duration::from_secs(10) {
        if vip_at.is_none() {
            let lo = lo_addrs(&ha.lbs[f]);
            if lo.contains(&vip.to_string()) && lo.contains(&ROLE_VIP.to_string()) {
                vip_at = Some(t0.elapsed());
            }
        }
        if arp_at.is_none() && ha.client_neigh(vip).contains(&mac_f) {
            arp_at = Some(t0.elapsed());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let (Some(vip_at), Some(arp_at)) = (vip_at, arp_at) else {
        panic!(
            "run {run}: node {f} did not take over within 10 s (VIPs {vip_at:?}, client ARP {arp_at:?}):\n{}",
            log_of(agents, f)
        )
    };
    let served = loop {
        match Conn::open(&ha.client, to).and_then(|mut c| c.ask("new")) {
            Ok(r) => {
                assert_eq!(r.client.ip().to_string(), ROLE_VIP);
                break t0.elapsed();
            }
            Err(e) if t0.elapsed() > Duration::from_secs(10) => {
                panic!(
                    "run {run}: no new connection served: {e:#}\n{}",
                    log_of(agents, f)
                )
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    };
    [vip_at, arp_at, served]
}

/// The established connection carries on through the new owner `f`:
/// same backend, same source as `first`.
fn carries_on(
    ha: &Ha,
    c: &mut Conn,
    first: &Reply,
    agents: &[Option<KubeAgent>],
    f: usize,
    run: usize,
) {
    c.set_timeout(Duration::from_secs(10)).unwrap();
    let after = c.ask("after").unwrap_or_else(|e| {
        // What the new owner's datapath had and did, for the failure's cause.
        let cli = |sub: &str| {
            agents[f]
                .as_ref()
                .map(|a| a.cli(sub).unwrap_or_else(|e| format!("{e:#}")))
                .unwrap_or_default()
        };
        panic!(
            "run {run}: the connection broke: {e:#}\nnode {f}'s sessions:\n{}\nnode {f}'s counters:\n{}\n{}\n{}",
            cli("sessions"),
            cli("stats"),
            ha.wire_state(),
            log_of(agents, f)
        )
    });
    assert_eq!(
        (&after.backend, after.client),
        (&first.backend, first.client)
    );
}

/// Node `l`'s agent was started again (`agents[l]`): it gets the rule and
/// stays a backup; `f` keeps the Lease and the VIP.
fn back_as_backup(
    ha: &Ha,
    api: &ApiServer,
    agents: &[Option<KubeAgent>],
    (l, f): (usize, usize),
    vip: &str,
    run: usize,
) {
    wait_until(
        "the restarted agent has the rule",
        Duration::from_secs(15),
        || {
            agents[l]
                .as_ref()
                .unwrap()
                .cli("rules")
                .is_ok_and(|r| r.contains(&format!("{vip}:80")))
        },
    )
    .unwrap_or_else(|e| panic!("run {run}: {e}\n{}", log_of(agents, l)));
    assert!(lo_addrs(&ha.lbs[l]).is_empty(), "run {run}: a backup");
    assert_eq!(api.lease_holder().as_deref(), Some(["node-a", "node-b"][f]));
    let lo = lo_addrs(&ha.lbs[f]);
    assert!(
        lo.contains(&vip.to_string()),
        "run {run}: the owner kept the VIP: {lo:?}"
    );
}

/// p50 / p99 of each of the three times of [`watch_takeover`], in ms.
fn takeover_figures(times: &[[Duration; 3]]) -> String {
    let col = |i: usize| p50_p99(&times.iter().map(|t| t[i]).collect::<Vec<_>>());
    let ((v50, v99), (a50, a99), (n50, n99)) = (col(0), col(1), col(2));
    format!(
        "VIPs on the new owner p50 {v50:.0} ms / p99 {v99:.0} ms; client ARP moved p50 {a50:.0} \
         / p99 {a99:.0} ms; first new connection served p50 {n50:.0} / p99 {n99:.0} ms (goal < \
         1000 ms)"
    )
}

/// SIGKILL of the active node's agent, its node alive (`--keep`, as the
/// DaemonSet runs it): the backup's sync connection ends, the dead agent's
/// sync listener refuses, and the backup takes the Lease and the VIPs
/// over at once instead of waiting for the Lease to expire. The client's
/// ARP entry moves to it, an established TCP connection and an SCTP
/// association (usrsctp peers; skipped without them) carry on, new
/// connections are served; the VIPs the killed agent left on `lo` expire there (not
/// renewed); restarted, it comes back as the backup. Then the other way
/// round: `LOXILB_HA_RUNS` kills in all (default 2), alternating, with
/// the times printed (p50/p99: `scripts/bench.sh --ha` runs 20).
#[test]
fn a_killed_agent_is_replaced_at_once_on_proof_of_death() {
    let name = "a_killed_agent_is_replaced_at_once_on_proof_of_death";
    if !need_root(name) {
        return;
    }
    let runs = ha_runs();
    let sctp = need_tools(name);
    let ha = Ha::new("lxha3");
    let certs = Certs::new(&["node-a", "node-b"]);
    let api = ApiServer::new();
    seed_api(&api);
    if sctp {
        seed_sctp(&api);
    }
    let start = |i: usize, label: &str| ha.start_synced_with(&api, i, label, &certs, &["--keep"]);
    let (a, b, vip) = lead_then_follow(&ha, &api, |i| start(i, ["node-a", "node-b"][i]));
    let mut agents = vec![Some(a), Some(b)];
    let to: SocketAddr = format!("{vip}:80").parse().unwrap();
    let names = ["node-a", "node-b"];
    // An SCTP association through the leader (full-NAT), echoing every
    // 100 ms: it must carry on through every takeover.
    let assoc = sctp.then(|| {
        let mut svip = String::new();
        wait_until("diameter has a VIP", Duration::from_secs(20), || {
            svip = api
                .ingress("diameter")
                .into_iter()
                .next()
                .unwrap_or_default();
            !svip.is_empty()
        })
        .unwrap();
        wait_until("node-a holds the SCTP VIP", Duration::from_secs(10), || {
            lo_addrs(&ha.lbs[0]).contains(&svip)
        })
        .unwrap();
        let server = SctpServer::spawn(&ha._backends[0], &["10.31.0.21".parse().unwrap()], 3868)
            .expect("SCTP server");
        let client = SctpClient::spawn(
            &ha.client,
            &["10.30.0.2".parse().unwrap()],
            &[svip.parse().unwrap()],
            3868,
        )
        .expect("SCTP client");
        client
            .wait_up(Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("{e}\nserver:\n{}", server.peer.transcript()));
        (svip, server, client)
    });
    let mut times = vec![];
    for run in 0..runs {
        let (l, f) = (run % 2, 1 - run % 2);
        // An established connection through the leader, synced to the
        // follower.
        let (mut c, first) = synced_connection(&ha, &agents, (l, f), to, run);
        if let Some((svip, _, client)) = &assoc {
            client
                .wait_fresh_echo(Duration::from_secs(5))
                .unwrap_or_else(|e| {
                    panic!("run {run}: SCTP before: {e}\n{}", client.peer.transcript())
                });
            wait_until(
                "the follower has the association",
                Duration::from_secs(10),
                || {
                    agents[f]
                        .as_ref()
                        .unwrap()
                        .cli("sessions")
                        .is_ok_and(|t| t.contains(&format!("{svip}:3868")))
                },
            )
            .unwrap_or_else(|e| panic!("run {run}: {e}\n{}", log_of(&agents, f)));
        }
        let hints_before = death_hints(&agents, f);

        agents[l].as_mut().unwrap().kill();
        let t0 = Instant::now();
        let t = watch_takeover(&ha, &agents, f, &vip, t0, run);
        // The takeover came from the proof of death, not from expiry.
        assert_eq!(
            death_hints(&agents, f),
            hints_before + 1,
            "run {run}: {} took over without the hint:\n{}",
            names[f],
            log_of(&agents, f)
        );
        assert_eq!(api.lease_holder().as_deref(), Some(names[f]));
        // The established connection carries on, same backend and source.
        carries_on(&ha, &mut c, &first, &agents, f, run);
        // So does the SCTP association (its sessions and association
        // record came over the sync stream).
        if let Some((_, _, client)) = &assoc {
            client
                .wait_fresh_echo(Duration::from_secs(10))
                .unwrap_or_else(|e| {
                    panic!(
                        "run {run}: the SCTP association broke: {e}\n{}\n{}",
                        client.peer.transcript(),
                        log_of(&agents, f)
                    )
                });
        }
        times.push(t);

        // Its VIPs leave its node's lo on their own (not renewed), the
        // new owner keeps them.
        wait_until(
            "the killed agent's VIPs expire",
            Duration::from_secs(8),
            || lo_addrs(&ha.lbs[l]).is_empty(),
        )
        .unwrap_or_else(|e| panic!("run {run}: {e}: {:?}", lo_addrs(&ha.lbs[l])));
        assert!(lo_addrs(&ha.lbs[f]).contains(&vip));
        // The killed agent comes back: a backup.
        agents[l] = Some(start(l, &format!("{}#{}", names[l], run + 2)));
        back_as_backup(&ha, &api, &agents, (l, f), &vip, run);
    }
    eprintln!(
        "{name}: takeover after SIGKILL of the active agent, {runs} runs: {}",
        takeover_figures(&times)
    );
    for a in agents.iter_mut().flatten() {
        a.stop().unwrap();
    }
}

/// The Lease timings of a sub-second takeover after a node dies.
const FAST_LEASE: [&str; 3] = [
    "--leaseDuration=600ms",
    "--leaseRenewDeadline=400ms",
    "--leaseRetryPeriod=100ms",
];

/// The active node dies (its links cut, then its agent killed: no goodbye,
/// no refused dial, nothing proves the death), with the sub-second Lease
/// timings of `FAST_LEASE`: the backup takes the Lease at its expiry
/// (600 ms after it last saw it renewed) and with it the VIPs; the
/// client's ARP entry moves, an established TCP connection (synced)
/// carries on, new connections are served. The dead node comes back
/// (links up once its VIPs expired, agent restarted): a backup. Then the
/// other way round; `LOXILB_HA_RUNS` deaths in all (default 2), times
/// printed (p50/p99: `scripts/bench.sh` runs 20).
#[test]
fn a_dead_node_is_replaced_within_a_sub_second_lease() {
    let name = "a_dead_node_is_replaced_within_a_sub_second_lease";
    if !need_root(name) {
        return;
    }
    let runs = ha_runs();
    let ha = Ha::new("lxha6");
    let certs = Certs::new(&["node-a", "node-b"]);
    let api = ApiServer::new();
    seed_api(&api);
    let mut extra = vec!["--keep"];
    extra.extend(FAST_LEASE);
    let start = |i: usize, label: &str| ha.start_synced_with(&api, i, label, &certs, &extra);
    let (a, b, vip) = lead_then_follow(&ha, &api, |i| start(i, ["node-a", "node-b"][i]));
    let mut agents = vec![Some(a), Some(b)];
    let to: SocketAddr = format!("{vip}:80").parse().unwrap();
    let names = ["node-a", "node-b"];
    let (mut times, mut t_gone) = (vec![], vec![]);
    for run in 0..runs {
        let (l, f) = (run % 2, 1 - run % 2);
        let (mut c, first) = synced_connection(&ha, &agents, (l, f), to, run);
        let hints_before = death_hints(&agents, f);

        ha.cut(l);
        let t0 = Instant::now();
        agents[l].as_mut().unwrap().kill();
        let t = watch_takeover(&ha, &agents, f, &vip, t0, run);
        // By the Lease's expiry: nothing proved the death.
        assert_eq!(
            death_hints(&agents, f),
            hints_before,
            "run {run}: a death hint with the node's links down:\n{}",
            log_of(&agents, f)
        );
        assert_eq!(api.lease_holder().as_deref(), Some(names[f]));
        carries_on(&ha, &mut c, &first, &agents, f, run);
        times.push(t);

        // The dead node comes back once its VIPs expired (a node that
        // reboots has none): links up, agent restarted, a backup.
        wait_until(
            "the dead node's VIPs expire",
            Duration::from_secs(8),
            || lo_addrs(&ha.lbs[l]).is_empty(),
        )
        .unwrap_or_else(|e| panic!("run {run}: {e}: {:?}", lo_addrs(&ha.lbs[l])));
        // Their lifetime follows the Lease (1 s here): how long a killed
        // agent's node (alive) would still answer for them.
        t_gone.push(t0.elapsed());
        ha.uncut(l);
        agents[l] = Some(start(l, &format!("{}#{}", names[l], run + 2)));
        back_as_backup(&ha, &api, &agents, (l, f), &vip, run);
    }
    let (g50, g99) = p50_p99(&t_gone);
    eprintln!(
        "{name}: takeover after the active node died (links cut, agent killed; Lease 600 ms / \
         400 ms / 100 ms), {runs} runs: {}; the dead agent's VIPs left its lo p50 {g50:.0} / p99 \
         {g99:.0} ms",
        takeover_figures(&times)
    );
    for a in agents.iter_mut().flatten() {
        a.stop().unwrap();
    }
}

/// A small seeded generator (xorshift64*), for the random sequence.
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as usize % n
    }
}

/// A random sequence of kills (SIGKILL), stops (SIGTERM) and restarts of
/// the two agents (`LOXILB_HA_SEED`, `LOXILB_HA_STEPS`; 8 steps by
/// default): after each, once settled, exactly one node holds the VIPs on
/// `lo` (none when both agents are down) and, with an agent running, it
/// is the Lease holder's. A killed agent's VIPs expire on their own; a
/// restarted agent comes back as a backup when the other one leads.
#[test]
fn no_vip_on_two_nodes_after_random_kills_and_restarts() {
    let name = "no_vip_on_two_nodes_after_random_kills_and_restarts";
    if !need_root(name) {
        return;
    }
    let env = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let seed = env("LOXILB_HA_SEED", 0x5eed_0001);
    let steps = env("LOXILB_HA_STEPS", 8) as usize;
    let mut rng = Rng(seed | 1);
    let ha = Ha::new("lxha4");
    let certs = Certs::new(&["node-a", "node-b"]);
    let api = ApiServer::new();
    seed_api(&api);
    let names = ["node-a", "node-b"];
    let mut starts = [1, 0];
    let start = |i: usize, n: usize| {
        ha.start_synced_with(&api, i, &format!("{}#{n}", names[i]), &certs, &["--keep"])
    };
    let mut agents: Vec<Option<KubeAgent>> = vec![Some(start(0, 1)), None];
    wait_until("node-a leads", Duration::from_secs(15), || {
        api.lease_holder().as_deref() == Some("node-a")
    })
    .unwrap();
    starts[1] = 1;
    agents[1] = Some(start(1, 1));
    let vip = bring_up(
        &ha,
        &api,
        agents[0].as_ref().unwrap(),
        agents[1].as_ref().unwrap(),
    );
    let mut done = vec![];
    for step in 0..steps {
        let alive: Vec<usize> = (0..2).filter(|i| agents[*i].is_some()).collect();
        let dead: Vec<usize> = (0..2).filter(|i| agents[*i].is_none()).collect();
        // Restart a dead agent half the time (always when both are down);
        // otherwise kill or stop a running one.
        let action = if alive.is_empty() || (!dead.is_empty() && rng.below(2) == 0) {
            let i = dead[rng.below(dead.len())];
            starts[i] += 1;
            agents[i] = Some(start(i, starts[i]));
            format!("restart {}", names[i])
        } else {
            let i = alive[rng.below(alive.len())];
            let mut a = agents[i].take().unwrap();
            if rng.below(2) == 0 {
                a.kill();
                format!("kill {}", names[i])
            } else {
                a.stop().unwrap();
                format!("stop {}", names[i])
            }
        };
        done.push(action.clone());
        let running: Vec<usize> = (0..2).filter(|i| agents[*i].is_some()).collect();
        let mut last = String::new();
        wait_until("settled", Duration::from_secs(20), || {
            let holders: Vec<usize> = (0..2)
                .filter(|i| lo_addrs(&ha.lbs[*i]).contains(&vip))
                .collect();
            let lease = api.lease_holder();
            last = format!("holders {holders:?}, Lease {lease:?}, running {running:?}");
            if running.is_empty() {
                return holders.is_empty();
            }
            holders.len() == 1
                && running.contains(&holders[0])
                && lease.as_deref() == Some(names[holders[0]])
        })
        .unwrap_or_else(|e| {
            panic!(
                "seed {seed:#x}, step {step} ({action}) after {done:?}: {e}: {last}\n{}\n{}",
                log_of(&agents, 0),
                log_of(&agents, 1)
            )
        });
    }
    eprintln!("{name}: seed {seed:#x}, {steps} steps settled with one owner: {done:?}");
    for a in agents.iter_mut().flatten() {
        a.stop().unwrap();
    }
}

/// Two Services for `--vipOwners=pool`: web (port 80) from pool p1, web2
/// (port 81) from p2, both with the two backends.
fn seed_pools(api: &ApiServer) {
    api.api.with(|s| {
        s.put("nodes", node("node-a", "10.30.0.11"));
        s.put("nodes", node("node-b", "10.30.0.12"));
        for (svc, port, pool) in [("web", 80, "p1"), ("web2", 81, "p2")] {
            let mut v = service(svc, port);
            v["metadata"]["annotations"]["loxilb.io/poolSelect"] = pool.into();
            s.put("services", v);
            s.put(
                "endpointslices",
                endpoint_slice(
                    svc,
                    &[Ipv4Addr::new(10, 31, 0, 21), Ipv4Addr::new(10, 31, 0, 22)],
                ),
            );
        }
    });
}

/// node-a's agent started (`start(0)`) and leading, then node-b's; once
/// web and web2 have their VIPs ([`seed_pools`]), wait until each pool is
/// on exactly one node and the two on different nodes (the first agent
/// took both, then gave one up). The agents and the VIPs (web's, web2's).
fn pools_spread(
    ha: &Ha,
    api: &ApiServer,
    start: impl Fn(usize) -> KubeAgent,
) -> (KubeAgent, KubeAgent, Vec<String>) {
    let a = start(0);
    wait_until("node-a leads", Duration::from_secs(15), || {
        api.lease_holder().as_deref() == Some("node-a")
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", a.log_text()));
    let b = start(1);
    let mut vips = vec![];
    for svc in ["web", "web2"] {
        let mut vip = String::new();
        wait_until("a VIP", Duration::from_secs(20), || {
            vip = api.ingress(svc).into_iter().next().unwrap_or_default();
            !vip.is_empty()
        })
        .unwrap_or_else(|e| panic!("{svc}: {e}\n{}", a.log_text()));
        vips.push(vip);
    }
    assert!(vips[0].starts_with("10.30.0.10"), "{vips:?}");
    wait_until("one pool on each node", Duration::from_secs(40), || {
        let (o1, o2) = (ha.owners(&vips[0]), ha.owners(&vips[1]));
        o1.len() == 1 && o2.len() == 1 && o1 != o2
    })
    .unwrap_or_else(|e| {
        panic!(
            "{e}: web on {:?}, web2 on {:?}\n{}\n{}",
            ha.owners(&vips[0]),
            ha.owners(&vips[1]),
            a.log_text(),
            b.log_text()
        )
    });
    (a, b, vips)
}

/// `--vipOwners=pool`: two pools, two agents. The pools spread one per
/// node (the first agent takes both, then gives one up once the second
/// beats in the members Lease), each pool's VIP is on exactly one node
/// and serves; when one node dies, the other owns and serves both.
#[test]
fn pools_spread_over_the_nodes_and_follow_a_dead_owner() {
    let name = "pools_spread_over_the_nodes_and_follow_a_dead_owner";
    if !need_root(name) {
        return;
    }
    let ha = Ha::new("lxha7");
    let api = ApiServer::new();
    seed_pools(&api);
    let (mut a, b, vips) = pools_spread(&ha, &api, |i| {
        ha.start_pools(&api, i, ["node-a", "node-b"][i])
    });
    for (vip, port) in [(&vips[0], 80), (&vips[1], 81)] {
        let to: SocketAddr = format!("{vip}:{port}").parse().unwrap();
        let mut c = Conn::open(&ha.client, to)
            .unwrap_or_else(|e| panic!("{vip}: {e:#}\n{}\n{}", a.log_text(), b.log_text()));
        assert_eq!(c.ask("hi").unwrap().echo, "hi");
    }
    // node-a's node dies: node-b owns both pools.
    a.kill();
    ha.cut(0);
    wait_until("node-b owns both pools", Duration::from_secs(20), || {
        ha.owners(&vips[0]) == [1] && ha.owners(&vips[1]) == [1]
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", b.log_text()));
    for (vip, port) in [(&vips[0], 80), (&vips[1], 81)] {
        let to: SocketAddr = format!("{vip}:{port}").parse().unwrap();
        let mut served = false;
        wait_until("served through node-b", Duration::from_secs(10), || {
            served = Conn::open(&ha.client, to)
                .and_then(|mut c| c.ask("again"))
                .is_ok_and(|r| r.echo == "again");
            served
        })
        .unwrap_or_else(|e| panic!("{vip}: {e}\n{}", b.log_text()));
    }
    let log = b.log_text();
    assert!(log.contains("owner of the pool's VIPs"), "{log}");
}

/// `--vipOwners=pool` with conntrack sync, full-NAT with no
/// `--fullnat-source`: the source the backends see is the VIP itself,
/// which moves with its pool (the backends reach the pools' addresses on
/// their own segment, where the owner answers ARP for them). SIGKILL of
/// the agent owning web's pool (its node alive, `--keep`, as the
/// DaemonSet runs it): the other node takes the pool over, the client's
/// neighbour entry for web's VIP moves to that node's MAC, a TCP
/// connection established through web's VIP before the kill carries on
/// (same backend, same source address and port: the session came over
/// the sync stream), new connections are served; the survivor's own pool
/// (web2) is not disturbed, its established connection carries on too;
/// the survivor keeps both pools from then on (it does not take the dead
/// agent for a live one and give a pool up to it).
#[test]
fn a_dead_pool_owners_vip_moves_with_its_neighbour_entry_and_sessions() {
    let name = "a_dead_pool_owners_vip_moves_with_its_neighbour_entry_and_sessions";
    if !need_root(name) {
        return;
    }
    let ha = Ha::new("lxha8");
    // The pools' addresses are on the backends' link: their replies to a
    // VIP go to whichever node answers ARP for it.
    for b in &ha._backends {
        run(b, "ip route add 10.30.0.100/30 dev e0");
    }
    let certs = Certs::new(&["node-a", "node-b"]);
    let api = ApiServer::new();
    seed_pools(&api);
    let start = |i: usize, label: &str| {
        let sync = Ha::sync_args(i, &certs);
        let mut extra: Vec<&str> = sync.iter().map(String::as_str).collect();
        extra.push("--keep");
        ha.start_pools_with(&api, i, label, &extra)
    };
    let (a, b, vips) = pools_spread(&ha, &api, |i| start(i, ["node-a", "node-b"][i]));
    let mut agents = vec![Some(a), Some(b)];
    // l owns web's pool (p1) and dies; f owns web2's (p2) and survives.
    let l = ha.owners(&vips[0])[0];
    let f = 1 - l;
    let web: SocketAddr = format!("{}:80", vips[0]).parse().unwrap();
    let web2: SocketAddr = format!("{}:81", vips[1]).parse().unwrap();

    // Established connections through both VIPs, each synced to the other
    // node; full-NAT from the VIP.
    let (mut c, first) = synced_connection(&ha, &agents, (l, f), web, 0);
    assert_eq!(
        first.client.ip().to_string(),
        vips[0],
        "the full-NAT source"
    );
    let (mut c2, first2) = synced_connection(&ha, &agents, (f, l), web2, 0);
    assert_eq!(first2.client.ip().to_string(), vips[1]);
    let (mac_l, mac_f) = (ha.mac(l), ha.mac(f));
    let neigh = ha.client_neigh(&vips[0]);
    assert!(neigh.contains(&mac_l), "web's VIP at node {l}: {neigh}");
    let neigh = ha.client_neigh(&vips[1]);
    assert!(neigh.contains(&mac_f), "web2's VIP at node {f}: {neigh}");

    agents[l].as_mut().unwrap().kill();
    let t0 = Instant::now();
    wait_until(
        "the survivor holds web's VIP and the client's neighbour entry names it",
        Duration::from_secs(15),
        || ha.owners(&vips[0]).contains(&f) && ha.client_neigh(&vips[0]).contains(&mac_f),
    )
    .unwrap_or_else(|e| {
        panic!(
            "{e}: web's VIP on {:?}, client: {}\n{}",
            ha.owners(&vips[0]),
            ha.client_neigh(&vips[0]),
            log_of(&agents, f)
        )
    });
    let moved = t0.elapsed();
    // The established connection through the moved VIP carries on: same
    // backend, same source (the VIP and the port of the synced session).
    carries_on(&ha, &mut c, &first, &agents, f, 0);
    let carried = t0.elapsed();
    // New connections through it are served by the survivor.
    wait_until(
        "a new connection through web",
        Duration::from_secs(10),
        || {
            Conn::open(&ha.client, web)
                .and_then(|mut n| n.ask("new"))
                .is_ok_and(|r| r.client.ip().to_string() == vips[0] && r.echo == "new")
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", log_of(&agents, f)));
    // The survivor's own pool did not move.
    assert_eq!(ha.owners(&vips[1]), [f], "web2 stays on node {f}");
    assert!(ha.client_neigh(&vips[1]).contains(&mac_f));
    carries_on(&ha, &mut c2, &first2, &agents, f, 0);
    // The survivor keeps both pools, without a gap, for as long as the
    // dead agent's last beats in the members Lease are recent (two Lease
    // durations): they are no sign of life once its Lease was taken over,
    // so the survivor does not give the pool up again for it.
    while t0.elapsed() < Duration::from_secs(9) {
        let (o1, o2) = (ha.owners(&vips[0]), ha.owners(&vips[1]));
        assert!(
            o1.contains(&f) && o2 == [f],
            "{:?} after the kill: web's VIP on {o1:?}, web2's on {o2:?}\n{}",
            t0.elapsed(),
            log_of(&agents, f)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The killed agent's VIP leaves its node's lo on its own (not
    // renewed): then the survivor alone holds both.
    wait_until(
        "the killed agent's VIP expires",
        Duration::from_secs(8),
        || ha.owners(&vips[0]) == [f] && ha.owners(&vips[1]) == [f],
    )
    .unwrap_or_else(|e| panic!("{e}: {:?}", lo_addrs(&ha.lbs[l])));
    eprintln!(
        "{name}: after SIGKILL of the pool's owner, VIP and client neighbour entry on the \
         survivor {moved:?}, established connection answered {carried:?}"
    );
    agents[f].as_mut().unwrap().stop().unwrap();
}
