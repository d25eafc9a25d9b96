//! End-to-end NAT modes with real traffic through the XDP datapath:
//! onearm and full-NAT to backends that have no route to the client,
//! 2,000 concurrent connections through full-NAT, L2 and IPIP DSR to
//! backends holding the VIP, and open connections surviving rule updates.

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    process::{Child, Command, Stdio},
    time::Duration,
};

use loxilb_tests::{
    need_root,
    netns::{agent_bin, udp_ask, Agent, Conn, Scene, Topology, VIP},
};

fn rules(t: &Topology, mode: &str, backends: &[usize]) -> String {
    let dsr = mode.starts_with("dsr");
    let eps = |port: u16| {
        backends
            .iter()
            .map(|i| format!("      - {{ ip: {}, port: {port} }}\n", t.backend_ip(*i)))
            .collect::<String>()
    };
    format!(
        "rules:\n  - name: web\n    vip: {VIP}\n    port: 80\n    protocol: tcp\n    mode: {mode}\n    endpoints:\n{}  - name: dns\n    vip: {VIP}\n    port: 53\n    protocol: udp\n    mode: {mode}\n    endpoints:\n{}",
        eps(if dsr { 80 } else { 8080 }),
        eps(if dsr { 53 } else { 5353 })
    )
}

/// `prepare` shapes each backend namespace before its servers start.
fn env(prefix: &str, n: usize, mode: &str, prepare: impl Fn(&Topology, usize)) -> Scene {
    let ports = if mode.starts_with("dsr") {
        (80, 53)
    } else {
        (8080, 5353)
    };
    let all: Vec<usize> = (1..=n).collect();
    Scene::new(prefix, n, ports, prepare, |t| rules(t, mode, &all))
}

fn vip(port: u16) -> SocketAddr {
    Scene::vip(port)
}

/// Backends keep only their connected subnet: no way back to the client.
fn no_route_back(t: &Topology, i: usize) {
    t.backends[i - 1]
        .sh(&["ip", "route", "del", "default"])
        .unwrap();
}

/// Traffic in `mode` reaches every backend, the backend sees `seen(i)` as
/// the client address, and an open connection survives a rule update.
fn check_mode(e: &Scene, agent: &mut Agent, mode: &str, seen: impl Fn(usize) -> IpAddr) {
    let mut backends = BTreeSet::new();
    for i in 0..6 {
        let mut c = Conn::open(&e.t.client, vip(80)).expect("TCP through the VIP");
        let r = c.ask(&format!("{mode}-{i}")).unwrap();
        let b: usize = r.backend[1..].parse().unwrap();
        assert_eq!(r.client.ip(), seen(b), "{mode}: source the backend sees");
        backends.insert(b);
    }
    assert_eq!(
        backends.len(),
        e.t.backends.len(),
        "{mode}: all backends used"
    );
    for i in 0..4 {
        let r = udp_ask(&e.t.client, vip(53), &format!("u{i}")).expect("UDP through the VIP");
        let b: usize = r.backend[1..].parse().unwrap();
        assert_eq!(r.client.ip(), seen(b), "{mode}: UDP source");
    }
    // A long-lived connection survives a rule update (endpoint removed
    // that it does not use, then added back).
    let mut c = Conn::open(&e.t.client, vip(80)).unwrap();
    let mine: usize = c.ask("hold").unwrap().backend[1..].parse().unwrap();
    let only_mine: Vec<usize> = (1..=e.t.backends.len()).filter(|b| *b == mine).collect();
    agent.reload(&e.cfg, &rules(&e.t, mode, &only_mine));
    assert_eq!(c.ask("after-update").unwrap().backend, format!("b{mine}"));
    let all: Vec<usize> = (1..=e.t.backends.len()).collect();
    agent.reload(&e.cfg, &rules(&e.t, mode, &all));
    assert_eq!(
        c.ask("after-second-update").unwrap().backend,
        format!("b{mine}")
    );
}

#[test]
fn onearm_works_without_a_route_back_to_the_client() {
    if !need_root("onearm_works_without_a_route_back_to_the_client") {
        return;
    }
    let e = env("lxm1", 2, "onearm", no_route_back);
    let mut agent = Agent::start(&e.t, &e.cfg, &[]).expect("agent");
    let t = &e.t;
    check_mode(&e, &mut agent, "onearm", |b| {
        // the LB's own address on that backend's link
        IpAddr::V4(std::net::Ipv4Addr::new(10, t.net, b as u8, 1))
    });
    agent.stop().unwrap();
}

#[test]
fn fullnat_works_without_a_route_back_to_the_client() {
    if !need_root("fullnat_works_without_a_route_back_to_the_client") {
        return;
    }
    // Backends know only their subnet and the VIP (the full-NAT source).
    let e = env("lxm2", 2, "fullnat", |t, i| {
        no_route_back(t, i);
        t.backends[i - 1]
            .sh(&[
                "ip",
                "route",
                "add",
                &format!("{VIP}/32"),
                "via",
                &format!("10.{}.{i}.1", t.net),
            ])
            .unwrap();
    });
    let mut agent = Agent::start(&e.t, &e.cfg, &[]).expect("agent");
    check_mode(&e, &mut agent, "fullnat", |_| VIP.parse().unwrap());
    agent.stop().unwrap();
}

#[test]
fn two_thousand_concurrent_connections_through_fullnat_to_one_backend() {
    if !need_root("two_thousand_concurrent_connections_through_fullnat_to_one_backend") {
        return;
    }
    let lim = libc::rlimit {
        rlim_cur: 16384,
        rlim_max: 16384,
    };
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    let e = env("lxm3", 1, "fullnat", |_, _| {});
    let mut agent = Agent::start(&e.t, &e.cfg, &[]).expect("agent");
    let mut conns = Vec::with_capacity(2000);
    for i in 0..2000 {
        conns.push(
            Conn::open(&e.t.client, vip(80))
                .unwrap_or_else(|err| panic!("connection {i}: {err:#}")),
        );
    }
    // All open at once; each works, and the backend saw 2,000 distinct
    // (VIP, port) sources.
    let mut ports = BTreeSet::new();
    for (i, c) in conns.iter_mut().enumerate() {
        let r = c
            .ask(&format!("c{i}"))
            .unwrap_or_else(|err| panic!("connection {i}: {err:#}"));
        assert_eq!(r.echo, format!("c{i}"));
        assert_eq!(r.client.ip().to_string(), VIP);
        ports.insert(r.client.port());
    }
    assert_eq!(ports.len(), 2000, "source ports must be distinct");
    let stats = agent.cli("stats").unwrap();
    assert_eq!(
        loxilb_tests::netns::counter(&stats, "drop_snat_exhausted"),
        0,
        "{stats}"
    );
    drop(conns);
    agent.stop().unwrap();
}

/// The backend holds the VIP (DSR endpoints do), replies go straight back.
fn vip_on_backend(t: &Topology, i: usize) {
    t.backends[i - 1]
        .sh(&["ip", "addr", "add", &format!("{VIP}/32"), "dev", "lo"])
        .unwrap();
}

#[test]
fn dsr_l2_backend_sees_the_client_and_replies_directly() {
    if !need_root("dsr_l2_backend_sees_the_client_and_replies_directly") {
        return;
    }
    let e = env("lxm4", 2, "dsr", vip_on_backend);
    let mut agent = Agent::start(&e.t, &e.cfg, &[]).expect("agent");
    let client = e.t.client_ip();
    check_mode(&e, &mut agent, "dsr", |_| IpAddr::V4(client));
    // Only one direction goes through the datapath.
    let s = agent.cli("sessions").unwrap();
    assert!(s.contains("20.0.0.100:80"), "{s}");
    agent.stop().unwrap();
}

/// The decapsulator, running in a backend namespace; killed on drop.
struct Decap(Child);

impl Drop for Decap {
    fn drop(&mut self) {
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

#[test]
fn dsr_ipip_backend_decapsulates_and_replies_directly() {
    if !need_root("dsr_ipip_backend_decapsulates_and_replies_directly") {
        return;
    }
    let e = env("lxm5", 2, "dsr-ipip", vip_on_backend);
    let mut decaps = vec![];
    for b in &e.t.backends {
        let log = std::env::temp_dir().join(format!("{}-decap.log", b.name));
        let f = std::fs::File::create(&log).unwrap();
        let child = Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{}", b.name))
            .arg(agent_bin())
            .args(["decap", "-i", "b0"])
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        decaps.push(Decap(child));
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("decapsulating")
        {
            assert!(
                std::time::Instant::now() < deadline,
                "decap did not start: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let mut agent = Agent::start(&e.t, &e.cfg, &[]).expect("agent");
    let client = e.t.client_ip();
    check_mode(&e, &mut agent, "dsr-ipip", |_| IpAddr::V4(client));
    agent.stop().unwrap();
    drop(decaps);
}
