//! Real node topologies with real traffic, no forwarding flag given:
//! backends behind a Linux bridge (pods behind cni0, VMs behind br0) and
//! behind macvlan devices, in default, onearm and full-NAT modes. XDP
//! cannot transmit into those devices; the agent must see that and hand
//! the translated packets to the stack (before the per-device forwarding,
//! every request through the bridge timed out). And an agent started in a
//! fresh mount namespace without bpffs (`ip netns exec`) mounts its own.
//!
//! (This kernel has no 802.1Q or bonding support, so VLAN sub-interfaces
//! and bonds cannot be built here; they take the same path as the macvlan
//! devices — virtual kinds go to the stack — which the unit tests of
//! `devices::classify` check by kind.)

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use loxilb_tests::{
    need_root,
    netns::{agent_bin, counter, udp_ask, Agent, Conn, Netns, PinDirGuard, Servers, Topology, VIP},
};

#[derive(Clone, Copy, PartialEq)]
enum Behind {
    /// One bridge `br1` (10.N.1.1/24) with a veth port per backend
    /// (10.N.1.1x).
    Bridge,
    /// Per backend a veth whose lb end carries a macvlan device `mvI`
    /// (10.N.I.1/24); the backend is 10.N.I.2.
    Macvlan,
}

struct Site {
    t: Topology,
    backends: Vec<Netns>,
    cfg: std::path::PathBuf,
    /// The interfaces the agent attaches to besides `lbc`.
    ifaces: Vec<String>,
    _servers: Vec<Servers>,
    _pins: PinDirGuard,
}

impl Site {
    fn backend_ip(&self, behind: Behind, i: usize) -> Ipv4Addr {
        let n = self.t.net;
        match behind {
            Behind::Bridge => Ipv4Addr::new(10, n, 1, 10 + i as u8),
            Behind::Macvlan => Ipv4Addr::new(10, n, i as u8, 2),
        }
    }

    /// The load balancer's own address on backend `i`'s segment.
    fn lb_ip(&self, behind: Behind, i: usize) -> Ipv4Addr {
        let n = self.t.net;
        match behind {
            Behind::Bridge => Ipv4Addr::new(10, n, 1, 1),
            Behind::Macvlan => Ipv4Addr::new(10, n, i as u8, 1),
        }
    }
}

fn site(prefix: &str, n: usize, behind: Behind) -> Site {
    let t = Topology::new(prefix, 0).expect("topology");
    let net = t.net;
    let mut backends = vec![];
    let mut ifaces = vec![];
    if behind == Behind::Bridge {
        for c in [
            "ip link add br1 type bridge".to_string(),
            format!("ip addr add 10.{net}.1.1/24 dev br1"),
            "ip link set br1 up".into(),
        ] {
            t.lb.sh(&c.split(' ').collect::<Vec<_>>()).unwrap();
        }
        ifaces.push("br1".to_string());
    }
    for i in 1..=n {
        let b = Netns::new(&format!("{prefix}-b{i}")).unwrap();
        let port = format!("lbp{i}");
        let tmp = format!("{prefix}p{i}");
        let (ip, gw) = match behind {
            Behind::Bridge => (format!("10.{net}.1.{}", 10 + i), format!("10.{net}.1.1")),
            Behind::Macvlan => (format!("10.{net}.{i}.2"), format!("10.{net}.{i}.1")),
        };
        let lb = |c: &str| t.lb.sh(&c.split(' ').collect::<Vec<_>>()).unwrap();
        let be = |c: &str| b.sh(&c.split(' ').collect::<Vec<_>>()).unwrap();
        lb(&format!("ip link add {port} type veth peer name {tmp}"));
        lb(&format!("ip link set {tmp} netns {}", b.name));
        be(&format!("ip link set {tmp} name b0"));
        be(&format!("ip addr add {ip}/24 dev b0"));
        be("ip link set b0 up");
        // Full checksums from the senders (no CHECKSUM_PARTIAL at XDP).
        be("ethtool -K b0 tx off");
        be(&format!("ip route add default via {gw}"));
        lb(&format!("ethtool -K {port} tx off"));
        match behind {
            Behind::Bridge => {
                lb(&format!("ip link set {port} master br1 up"));
            }
            Behind::Macvlan => {
                let mv = format!("mv{i}");
                lb(&format!("ip link set {port} up"));
                lb(&format!(
                    "ip link add link {port} name {mv} type macvlan mode bridge"
                ));
                lb(&format!("ip addr add {gw}/24 dev {mv}"));
                lb(&format!("ip link set {mv} up"));
                ifaces.push(mv);
            }
        }
        backends.push(b);
    }
    let servers = backends
        .iter()
        .enumerate()
        .map(|(i, b)| Servers::start(b, &format!("b{}", i + 1), 8080, 5353).unwrap())
        .collect();
    let cfg = std::env::temp_dir().join(format!("{prefix}-rules.yaml"));
    let pins = PinDirGuard(t.pin_dir());
    let mut s = Site {
        t,
        backends,
        cfg,
        ifaces,
        _servers: servers,
        _pins: pins,
    };
    let eps = |port: u16| {
        (1..=n)
            .map(|i| {
                format!(
                    "      - {{ ip: {}, port: {port} }}\n",
                    s.backend_ip(behind, i)
                )
            })
            .collect::<String>()
    };
    let mut rules = String::from("rules:\n");
    for (name, port, proto, mode, ep_port) in [
        ("dnat", 80, "tcp", "default", 8080),
        ("onearm", 81, "tcp", "onearm", 8080),
        ("fullnat", 82, "tcp", "fullnat", 8080),
        ("dns", 53, "udp", "default", 5353),
    ] {
        rules.push_str(&format!(
            "  - name: {name}\n    vip: {VIP}\n    port: {port}\n    protocol: {proto}\n    mode: {mode}\n    endpoints:\n{}",
            eps(ep_port)
        ));
    }
    std::fs::write(&s.cfg, rules).unwrap();
    s.ifaces.sort();
    s
}

fn vip(port: u16) -> SocketAddr {
    format!("{VIP}:{port}").parse().unwrap()
}

/// Every mode serves every backend, each seeing the source its mode
/// gives; UDP too.
fn serve_all_modes(s: &Site, behind: Behind) {
    let client = IpAddr::V4(s.t.client_ip());
    let n = s.backends.len();
    for (port, mode) in [(80, "default"), (81, "onearm"), (82, "fullnat")] {
        let mut seen = BTreeSet::new();
        for k in 0..(2 * n) {
            let mut c = Conn::open(&s.t.client, vip(port))
                .unwrap_or_else(|e| panic!("{mode}: TCP to the VIP: {e:#}"));
            let r = c
                .ask(&format!("{mode}-{k}"))
                .unwrap_or_else(|e| panic!("{mode}: no answer through the VIP: {e:#}"));
            let b: usize = r.backend[1..].parse().unwrap();
            let want = match mode {
                "default" => client,
                "onearm" => IpAddr::V4(s.lb_ip(behind, b)),
                _ => VIP.parse().unwrap(),
            };
            assert_eq!(r.client.ip(), want, "{mode}: the source backend b{b} sees");
            seen.insert(b);
        }
        assert_eq!(seen.len(), n, "{mode}: every backend served: {seen:?}");
    }
    for k in 0..n {
        let r = udp_ask(&s.t.client, vip(53), &format!("u{k}")).expect("UDP through the VIP");
        assert_eq!(r.client.ip(), client, "UDP: the client's own address");
    }
}

fn run_site(prefix: &str, behind: Behind, kind_words: &str) {
    let s = site(prefix, 3, behind);
    let extra: Vec<String> = s
        .ifaces
        .iter()
        .flat_map(|i| ["--iface".to_string(), i.clone()])
        .collect();
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let mut agent = Agent::start(&s.t, &s.cfg, &extra).expect("agent");
    serve_all_modes(&s, behind);
    let stats = agent.cli("stats").unwrap();
    assert!(counter(&stats, "fwd_stack_device") > 0, "{stats}");
    assert!(counter(&stats, "new_session") >= 9, "{stats}");
    for i in &s.ifaces {
        let line = stats
            .lines()
            .find(|l| l.split_whitespace().next() == Some(i.as_str()))
            .unwrap_or_else(|| panic!("{i} not in the device table:\n{stats}"));
        assert!(line.contains(kind_words), "{line}");
    }
    // The client's link is a veth whose peer takes XDP frames: replies
    // leave through it by redirect.
    let lbc = stats
        .lines()
        .find(|l| l.starts_with("lbc "))
        .unwrap_or_else(|| panic!("lbc not in the device table:\n{stats}"));
    assert!(lbc.contains("xdp redirect"), "{lbc}");
    assert!(counter(&stats, "fwd_redirect") > 0, "{stats}");
    let log = agent.log_text();
    assert!(log.contains("forwarding: stack"), "choices logged:\n{log}");
    agent.stop().unwrap();
}

#[test]
fn backends_behind_a_bridge_are_served_in_every_mode() {
    if !need_root("backends_behind_a_bridge_are_served_in_every_mode") {
        return;
    }
    run_site("lxbr", Behind::Bridge, "stack (bridge");
}

#[test]
fn backends_behind_macvlan_devices_are_served_in_every_mode() {
    if !need_root("backends_behind_macvlan_devices_are_served_in_every_mode") {
        return;
    }
    run_site("lxmv", Behind::Macvlan, "stack (virtual device");
}

/// `--forward=xdp` with an attached bridge: refused at start, naming the
/// device, nothing left attached or pinned.
#[test]
fn forward_xdp_is_refused_where_it_would_blackhole() {
    if !need_root("forward_xdp_is_refused_where_it_would_blackhole") {
        return;
    }
    let s = site("lxfx", 1, Behind::Bridge);
    let out = Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{}", s.t.lb.name))
        .arg(agent_bin())
        .args([
            "--pin-dir",
            s.t.pin_dir().to_str().unwrap(),
            "run",
            "--config",
        ])
        .arg(&s.cfg)
        .args(["--iface", "lbc", "--iface", "br1", "--forward", "xdp"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "must refuse:\n{err}");
    assert!(err.contains("--forward=xdp"), "{err}");
    assert!(err.contains("br1: stack (bridge"), "{err}");
    let xdp = s.t.lb.sh(&["ip", "link", "show", "lbc"]).unwrap();
    assert!(!xdp.contains("xdp"), "nothing attached: {xdp}");
}

/// Under `ip netns exec` (a fresh mount namespace whose /sys has no
/// bpffs) the agent mounts a bpffs at /sys/fs/bpf, serves, and exits
/// cleanly; its pins live in that mount namespace only.
#[test]
fn agent_mounts_bpffs_in_a_fresh_mount_namespace() {
    if !need_root("agent_mounts_bpffs_in_a_fresh_mount_namespace") {
        return;
    }
    let s = site("lxfs", 2, Behind::Bridge);
    let pin = format!("/sys/fs/bpf/lxfs-{}", std::process::id());
    let _pins = PinDirGuard(pin.clone().into());
    let log = std::env::temp_dir().join("lxfs-agent.log");
    let logf = std::fs::File::create(&log).unwrap();
    // `ip netns exec` remounts /sys: no bpffs below it.
    let mut child = Command::new("ip")
        .args(["netns", "exec", &s.t.lb.name])
        .arg(agent_bin())
        .args(["--pin-dir", &pin, "run", "--config"])
        .arg(&s.cfg)
        .args(["--iface", "lbc", "--iface", "br1"])
        .stdout(logf.try_clone().unwrap())
        .stderr(logf)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    // Kills the agent if the test fails before it exits (disarmed once it
    // is reaped: its pid may then belong to another process).
    struct Kill(Option<u32>);
    impl Drop for Kill {
        fn drop(&mut self) {
            if let Some(pid) = self.0 {
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
    }
    let mut guard = Kill(Some(child.id()));
    let text = || std::fs::read_to_string(&log).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !text().contains("serving;") {
        if let Some(st) = child.try_wait().unwrap() {
            guard.0 = None;
            panic!("agent exited ({st}):\n{}", text());
        }
        assert!(
            Instant::now() < deadline,
            "agent did not start:\n{}",
            text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(text().contains("mounted one"), "{}", text());
    let mut c = Conn::open(&s.t.client, vip(80)).expect("TCP through the VIP");
    assert!(c.ask("hello").unwrap().backend.starts_with('b'));
    // Not in the host's bpffs: the pins are the agent's mount namespace's.
    assert!(
        !std::path::Path::new(&pin).exists(),
        "pins leaked to the host's bpffs"
    );
    // The CLI reaches them from inside that mount namespace.
    let stats = Command::new("nsenter")
        .args(["-t", &child.id().to_string(), "-m", "-n"])
        .arg(agent_bin())
        .args(["--pin-dir", &pin, "stats"])
        .output()
        .unwrap();
    let stats = String::from_utf8_lossy(&stats.stdout);
    assert!(counter(&stats, "new_session") >= 1, "{stats}");
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    let st = loop {
        if let Some(st) = child.try_wait().unwrap() {
            guard.0 = None;
            break st;
        }
        assert!(Instant::now() < deadline, "no exit on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(st.success(), "exit status {st}:\n{}", text());
}

/// `loxilb-agent cleanup` removes what an agent run with `--keep` left:
/// the attached programs, the pinned maps.
#[test]
fn cleanup_removes_what_a_kept_agent_left() {
    if !need_root("cleanup_removes_what_a_kept_agent_left") {
        return;
    }
    let s = site("lxcl", 1, Behind::Bridge);
    let mut agent = Agent::start(&s.t, &s.cfg, &["--iface", "br1", "--keep"]).expect("agent");
    let mut c = Conn::open(&s.t.client, vip(80)).expect("TCP through the VIP");
    c.ask("before").unwrap();
    agent.stop().unwrap();
    // Still served with no agent running: the datapath was kept.
    assert!(c.ask("kept").unwrap().backend.starts_with('b'));
    let link = s.t.lb.sh(&["ip", "link", "show", "lbc"]).unwrap();
    assert!(link.contains("xdp"), "{link}");
    assert!(s.t.pin_dir().exists());
    let out = Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{}", s.t.lb.name))
        .arg(agent_bin())
        .args(["--pin-dir", s.t.pin_dir().to_str().unwrap(), "cleanup"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("detached"), "{text}");
    for dev in ["lbc", "br1"] {
        let link = s.t.lb.sh(&["ip", "link", "show", dev]).unwrap();
        assert!(!link.contains("xdp"), "{dev} still has XDP: {link}");
    }
    assert!(!s.t.pin_dir().exists(), "pins left");
}
