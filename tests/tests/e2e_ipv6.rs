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
    assert!(stats.contains("drop_nat64"), "{stats}");
    agent.stop().unwrap();
}
