//! End-to-end IPv6 with real traffic through the XDP datapath: NAT66
//! (client address kept; full-NAT to backends with no route back) and
//! NAT64 (an IPv6-only client reaching IPv4-only backends), TCP and UDP,
//! IPv4 services still served next to them.

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
};

use loxilb_tests::{
    need_root,
    netns::{udp_ask, Agent, Conn, Scene, Topology, VIP, VIP6},
};

fn vip6(port: u16) -> SocketAddr {
    SocketAddr::new(VIP6.parse().unwrap(), port)
}

fn rules(t: &Topology) -> String {
    let eps6 = |port: u16| {
        (1..=t.backends.len())
            .map(|i| format!("      - {{ ip: \"{}\", port: {port} }}\n", t.backend_ip6(i)))
            .collect::<String>()
    };
    let eps4 = |port: u16| {
        (1..=t.backends.len())
            .map(|i| format!("      - {{ ip: {}, port: {port} }}\n", t.backend_ip(i)))
            .collect::<String>()
    };
    let rule = |name: &str, vip: &str, port: u16, proto: &str, mode: &str, eps: String| {
        format!(
            "  - name: {name}\n    vip: \"{vip}\"\n    port: {port}\n    protocol: {proto}\n    mode: {mode}\n    endpoints:\n{eps}"
        )
    };
    [
        "rules:\n".to_string(),
        rule("web6", VIP6, 80, "tcp", "default", eps6(8080)),
        rule("dns6", VIP6, 53, "udp", "default", eps6(5353)),
        rule("full6", VIP6, 82, "tcp", "fullnat", eps6(8080)),
        rule("nat64", VIP6, 90, "tcp", "default", eps4(8080)),
        rule("nat64dns", VIP6, 93, "udp", "default", eps4(5353)),
        rule("web4", VIP, 80, "tcp", "default", eps4(8080)),
    ]
    .concat()
}

fn backend_of(r: &loxilb_tests::netns::Reply) -> usize {
    r.backend[1..].parse().unwrap()
}

#[test]
fn nat66_and_nat64_with_real_tcp_and_udp() {
    if !need_root("nat66_and_nat64_with_real_tcp_and_udp") {
        return;
    }
    let e = Scene::new("lx6", 2, (8080, 5353), |_, _| {}, rules);
    let t = &e.t;
    let mut agent = Agent::start(t, &e.cfg, &[]).expect("agent");

    // NAT66, default mode: every backend used, the client's own IPv6
    // address seen, TCP and UDP.
    let mut used = BTreeSet::new();
    for i in 0..6 {
        let mut c = Conn::open(&t.client, vip6(80)).expect("TCP to the IPv6 VIP");
        let r = c.ask(&format!("six-{i}")).unwrap();
        assert_eq!(r.client.ip(), IpAddr::V6(t.client_ip6()), "source kept");
        assert_eq!(r.client.port(), c.local_addr().port(), "source port kept");
        used.insert(backend_of(&r));
    }
    assert_eq!(used.len(), 2, "both backends served IPv6");
    for i in 0..4 {
        let r = udp_ask(&t.client, vip6(53), &format!("u6-{i}")).expect("UDP to the IPv6 VIP");
        assert_eq!(r.client.ip(), IpAddr::V6(t.client_ip6()));
    }

    // NAT66 full-NAT: the backend sees the VIP.
    let r = Conn::open(&t.client, vip6(82))
        .unwrap()
        .ask("full")
        .unwrap();
    assert_eq!(r.client.ip(), VIP6.parse::<IpAddr>().unwrap());

    // NAT64: an IPv6 client, IPv4 backends; the backend sees the load
    // balancer's own IPv4 address on its link.
    let mut used = BTreeSet::new();
    for i in 0..4 {
        let mut c = Conn::open(&t.client, vip6(90)).expect("TCP to the NAT64 VIP");
        let r = c.ask(&format!("n64-{i}")).unwrap();
        let b = backend_of(&r);
        assert_eq!(
            r.client.ip(),
            IpAddr::V4(std::net::Ipv4Addr::new(10, t.net, b as u8, 1)),
            "NAT64 source"
        );
        // Several exchanges on one connection (segments both ways).
        for k in 0..3 {
            assert_eq!(backend_of(&c.ask(&format!("more-{k}")).unwrap()), b);
        }
        used.insert(b);
    }
    assert_eq!(used.len(), 2, "both IPv4 backends served the IPv6 client");
    let r = udp_ask(&t.client, vip6(93), "n64-udp").expect("UDP through NAT64");
    assert!(r.client.is_ipv4(), "{r:?}");
    // A reply larger than one IPv4 segment of the client's request.
    let big = "x".repeat(3000);
    let mut c = Conn::open(&t.client, vip6(90)).unwrap();
    assert_eq!(c.ask(&big).unwrap().echo, big, "large echo through NAT64");

    // IPv4 next to it.
    let r = Conn::open(&t.client, Scene::vip(80))
        .unwrap()
        .ask("four")
        .unwrap();
    assert_eq!(r.client.ip(), IpAddr::V4(t.client_ip()));

    let stats = agent.cli("stats").unwrap();
    assert_eq!(
        loxilb_tests::netns::counter(&stats, "drop_nat64"),
        0,
        "{stats}"
    );
    agent.stop().unwrap();
}

/// Path-MTU discovery for IPv6 through the load balancer: the LB-backend
/// link has a smaller MTU; the client sends a UDP datagram too big for it
/// (IPv6 routers never fragment). The LB's stack answers "packet too big"
/// about the translated packet; the TC egress program translates it back,
/// so the client's kernel learns the path MTU toward the IPv6 VIP.
#[test]
fn ipv6_path_mtu_discovery_through_the_load_balancer() {
    use std::os::fd::AsRawFd;
    if !need_root("ipv6_path_mtu_discovery_through_the_load_balancer") {
        return;
    }
    let e = Scene::new(
        "lx6m",
        1,
        (8080, 5353),
        |_, _| {},
        |t| {
            format!(
            "rules:\n  - {{vip: \"{VIP6}\", port: 53, protocol: udp, endpoints: [{{ip: \"{}\", port: 5353}}]}}\n",
            t.backend_ip6(1)
        )
        },
    );
    let t = &e.t;
    t.lb.sh(&["ip", "link", "set", "lbb1", "mtu", "1300"])
        .unwrap();
    t.backends[0]
        .sh(&["ip", "link", "set", "b0", "mtu", "1300"])
        .unwrap();
    let mut agent = Agent::start(t, &e.cfg, &[]).expect("agent");
    let to = vip6(53);
    let mtu = t.client.run(move || {
        let s = std::net::UdpSocket::bind("[::]:0").unwrap();
        s.connect(to).unwrap();
        let val: libc::c_int = libc::IPV6_PMTUDISC_DO;
        unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::IPPROTO_IPV6,
                libc::IPV6_MTU_DISCOVER,
                &val as *const _ as *const libc::c_void,
                4,
            );
        }
        s.set_read_timeout(Some(std::time::Duration::from_millis(300)))
            .unwrap();
        let mut mtu = 0;
        for _ in 0..10 {
            let _ = s.send(&[b'x'; 1400]);
            std::thread::sleep(std::time::Duration::from_millis(300));
            let mut m: libc::c_int = 0;
            let mut len: libc::socklen_t = 4;
            unsafe {
                libc::getsockopt(
                    s.as_raw_fd(),
                    libc::IPPROTO_IPV6,
                    libc::IPV6_MTU,
                    &mut m as *mut _ as *mut libc::c_void,
                    &mut len,
                );
            }
            mtu = m;
            if mtu == 1300 {
                break;
            }
        }
        mtu
    });
    assert_eq!(
        mtu, 1300,
        "the client learned the path MTU toward the IPv6 VIP"
    );
    let stats = agent.cli("stats").unwrap();
    assert!(
        loxilb_tests::netns::counter(&stats, "icmp_err_xlated") > 0,
        "{stats}"
    );
    agent.stop().unwrap();
}
