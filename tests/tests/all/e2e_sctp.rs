//! End-to-end SCTP through the XDP datapath with real SCTP stacks
//! (usrsctp in raw-IP mode, `tests/sctp/`): an association from the client
//! to the VIP, DNAT to a backend listening on another port (the datapath
//! rewrites the ports and updates the CRC32c incrementally; the stacks
//! verify it), the client's address kept, data echoed both ways.
//! Then multihoming: two paths on each side, the client's primary link
//! cut, the association carrying on over the secondary VIP.

use std::{net::IpAddr, time::Duration};

use loxilb_tests::{
    need_root,
    netns::{Agent, Netns, Scene, Topology, VIP},
    sctp_peers::{need_tools, ClientOpts, SctpClient, SctpServer},
};

#[test]
fn sctp_association_through_the_vip_with_port_translation() {
    let name = "sctp_association_through_the_vip_with_port_translation";
    if !need_root(name) || !need_tools(name) {
        return;
    }
    // TCP/UDP servers are not needed; the scene gives the topology, the
    // rule file and cleanup.
    let e = Scene::new(
        "lxsc",
        1,
        (18080, 15353),
        |_, _| {},
        |t| {
            format!(
                "rules:\n  - name: diameter\n    vip: {VIP}\n    port: 3868\n    protocol: sctp\n    endpoints:\n      - {{ ip: {}, port: 30868 }}\n",
                t.backend_ip(1)
            )
        },
    );
    let t = &e.t;
    let server = SctpServer::spawn(&t.backends[0], &[IpAddr::V4(t.backend_ip(1))], 30868)
        .expect("SCTP server");
    let mut agent = Agent::start(t, &e.cfg, &[]).expect("agent");
    let client = SctpClient::spawn(
        &t.client,
        &[IpAddr::V4(t.client_ip())],
        &[VIP.parse().unwrap()],
        3868,
    )
    .expect("SCTP client");
    client
        .wait_up(Duration::from_secs(10))
        .unwrap_or_else(|err| panic!("{err}\nserver:\n{}", server.peer.transcript()));
    // Data both ways, several times.
    for _ in 0..3 {
        client
            .wait_fresh_echo(Duration::from_secs(5))
            .unwrap_or_else(|err| panic!("{err}\n{}", client.peer.transcript()));
    }
    // The backend saw the client's own address (DNAT keeps it).
    let d = server
        .peer
        .wait_for(|e| e.is("data"), Duration::from_secs(2))
        .unwrap();
    assert_eq!(
        d.addr("from"),
        Some(IpAddr::V4(t.client_ip())),
        "{}",
        d.line
    );
    // One association all along.
    assert_eq!(client.peer.of_kind("connected").len(), 1);
    let sessions = agent.cli("sessions").unwrap();
    assert!(sessions.contains("sctp"), "{sessions}");
    let stats = agent.cli("stats").unwrap();
    assert_eq!(
        loxilb_tests::netns::counter(&stats, "drop_sctp_malformed"),
        0,
        "{stats}"
    );
    agent.stop().unwrap();
}

/// veth `outer` (in `ns`, address `oa`) <-> `inner` (in the lb ns, address
/// `ia`), set up as the e2e topology's links are (no tx checksum offload,
/// GRO on so native XDP redirect can deliver into them).
fn extra_link(t: &Topology, ns: &Netns, outer: &str, inner: &str, oa: &str, ia: &str) {
    let tmp = format!("{}{inner}", t.prefix);
    let tmp = &tmp[tmp.len().saturating_sub(15)..];
    t.lb.sh(&[
        "ip", "link", "add", inner, "type", "veth", "peer", "name", tmp,
    ])
    .unwrap();
    t.lb.sh(&["ip", "link", "set", tmp, "netns", &ns.name])
        .unwrap();
    ns.sh(&["ip", "link", "set", tmp, "name", outer]).unwrap();
    for (n, dev, a) in [(ns, outer, oa), (&t.lb, inner, ia)] {
        // (nodad: an IPv6 address usable at once.)
        let mut add = vec!["ip", "addr", "add", a, "dev", dev];
        if a.contains(':') {
            add.push("nodad");
        }
        n.sh(&add).unwrap();
        n.sh(&["ip", "link", "set", dev, "up"]).unwrap();
        n.sh(&["ethtool", "-K", dev, "tx", "off", "gro", "on"])
            .unwrap();
    }
}

/// Multihoming with real SCTP stacks: the client (c1, c2) and the endpoint
/// (e1, e2) each have two addresses on separate links through the
/// load-balancer node; the rule has a primary and a secondary VIP. The
/// association starts on the primary VIP, the client learns only the VIPs,
/// data flows; then the client's primary link is cut and data continues
/// over the secondary VIP, in the same association.
#[test]
fn sctp_multihoming_failover_through_the_load_balancer() {
    let name = "sctp_multihoming_failover_through_the_load_balancer";
    if !need_root(name) || !need_tools(name) {
        return;
    }
    multihoming_failover("lxmh", false, false);
}

/// The same in fullnat: the endpoint sees the client as the VIPs (one per
/// client address) from a port the load balancer chose, and never the
/// client's addresses; its second path to the client is its second
/// address to the second VIP.
#[test]
fn sctp_multihoming_failover_in_fullnat() {
    let name = "sctp_multihoming_failover_in_fullnat";
    if !need_root(name) || !need_tools(name) {
        return;
    }
    multihoming_failover("lxmf", true, false);
}

/// Both modes again over IPv6: IPv6 address parameters, IPv6 VIPs.
#[test]
fn sctp_multihoming_failover_over_ipv6() {
    let name = "sctp_multihoming_failover_over_ipv6";
    if !need_root(name) || !need_tools(name) {
        return;
    }
    multihoming_failover("lxm6", false, true);
    multihoming_failover("lxm7", true, true);
}

fn multihoming_failover(prefix: &str, fullnat: bool, v6: bool) {
    // Addresses: `host` on subnet `sub` of the topology's network
    // (10.net.sub.0/24 or fd00:net:sub::/64), and the prefix lengths.
    let at = move |net: u8, sub: u8, host: u16| -> String {
        if v6 {
            format!("fd00:{net}:{sub}::{host}")
        } else {
            format!("10.{net}.{sub}.{host}")
        }
    };
    let (plen, hlen) = if v6 { (64, 128) } else { (24, 32) };
    // VIPs in the private range (unique local for IPv6), like the peers'
    // addresses: an SCTP stack lists in its INIT only the addresses within
    // the scope of the address it connects to (RFC 9260 5.1.2; usrsctp
    // and Linux leave private addresses out of an INIT to a public one),
    // and the client's second address must be listed for the endpoint to
    // use it.
    let vips = move |net: u8| (at(net, 200, 100), at(net, 200, 101));
    let mode = if fullnat { "fullnat" } else { "default" };
    let e = Scene::new(
        prefix,
        1,
        (18080, 15353),
        |_, _| {},
        |t| {
            let (v1, v2) = vips(t.net);
            format!(
                "rules:\n  - name: mh\n    vip: \"{v1}\"\n    secondary_vips: [\"{v2}\"]\n    port: 3868\n    protocol: sctp\n    mode: {mode}\n    endpoints:\n      - {{ ip: \"{}\", port: 3868 }}\n",
                at(t.net, 1, 2)
            )
        },
    );
    let t = &e.t;
    let net = t.net;
    let (v1, v2) = vips(net);
    // Second links: client c1 <-> lbc2 (subnet 100), backend b1 <-> lbb2
    // (subnet 101). The client reaches the secondary VIP over its second
    // link; the backend reaches the client's second path over its own.
    extra_link(
        t,
        &t.client,
        "c1",
        "lbc2",
        &format!("{}/{plen}", at(net, 100, 2)),
        &format!("{}/{plen}", at(net, 100, 1)),
    );
    extra_link(
        t,
        &t.backends[0],
        "b1",
        "lbb2",
        &format!("{}/{plen}", at(net, 101, 2)),
        &format!("{}/{plen}", at(net, 101, 1)),
    );
    let route = |ns: &Netns, to: String, via: String| {
        ns.sh(&["ip", "route", "add", &to, "via", &via]).unwrap();
    };
    route(&t.client, format!("{v1}/{hlen}"), at(net, 0, 1));
    route(&t.client, format!("{v2}/{hlen}"), at(net, 100, 1));
    // The backend's way to the client's second path: in default mode the
    // client's second address, in fullnat the second VIP (which the
    // endpoint knows as the client's second address).
    let second = if fullnat {
        format!("{v2}/{hlen}")
    } else {
        format!("{}/{plen}", at(net, 100, 0))
    };
    route(&t.backends[0], second, at(net, 101, 1));
    let (c1, c2) = (ip(&at(net, 0, 2)), ip(&at(net, 100, 2)));
    let (e1, e2) = (ip(&at(net, 1, 2)), ip(&at(net, 101, 2)));
    let (vip1, vip2) = (ip(&v1), ip(&v2));
    // usrsctp sends everything from the address bound last: the primary
    // ones go last.
    let server = SctpServer::spawn(&t.backends[0], &[e2, e1], 3868).expect("SCTP server");
    let mut agent =
        Agent::start(t, &e.cfg, &["--iface", "lbc2", "--iface", "lbb2"]).expect("agent");
    let opts = ClientOpts {
        interval_ms: 50,
        ..Default::default()
    };
    let client = SctpClient::spawn_with(&t.client, &[c2, c1], &[vip1, vip2], 3868, &opts)
        .expect("SCTP client");
    let assoc = client
        .wait_up(Duration::from_secs(10))
        .unwrap_or_else(|err| panic!("{err}\nserver:\n{}", server.peer.transcript()));
    let peers = client
        .peer
        .wait_for(|e| e.is("peers"), Duration::from_secs(5))
        .unwrap();
    let mut seen = peers.addrs("addrs");
    seen.sort();
    seen.dedup();
    assert_eq!(
        seen,
        vec![vip1, vip2],
        "the client sees the VIPs only: {}",
        peers.line
    );
    client
        .wait_fresh_echo(Duration::from_secs(5))
        .unwrap_or_else(|err| panic!("{err}\n{}", client.peer.transcript()));
    // The endpoint sees the client's addresses (default) or the VIPs in
    // their place (fullnat).
    let server_peers = server
        .peer
        .wait_for(|e| e.is("peers"), Duration::from_secs(5))
        .unwrap();
    let mut seen = server_peers.addrs("addrs");
    seen.sort();
    if fullnat {
        assert_eq!(
            seen,
            vec![vip1, vip2],
            "fullnat: the endpoint sees the VIPs only: {}",
            server_peers.line
        );
    } else {
        assert_eq!(
            seen,
            vec![c1, c2],
            "default: the endpoint sees the client's addresses: {}",
            server_peers.line
        );
    }
    // Cut the client's primary link.
    t.client.sh(&["ip", "link", "set", "c0", "down"]).unwrap();
    for _ in 0..3 {
        client
            .wait_fresh_echo(Duration::from_secs(15))
            .unwrap_or_else(|err| {
                panic!(
                    "{err}\nclient:\n{}\nserver:\n{}\nsessions:\n{}\nstats:\n{}",
                    client.peer.transcript(),
                    server.peer.transcript(),
                    agent.cli("sessions").unwrap_or_default(),
                    agent.cli("stats").unwrap_or_default()
                )
            });
    }
    // The same association all along: one connect, no restart.
    assert_eq!(client.peer.of_kind("connected").len(), 1);
    assert!(client
        .peer
        .of_kind("echo")
        .iter()
        .all(|e| e.num("assoc") == Some(assoc)));
    let ups = client
        .peer
        .of_kind("assoc")
        .iter()
        .filter(|e| e.get("state") == Some("COMM_UP"))
        .count();
    assert!(ups <= 1, "no second COMM_UP:\n{}", client.peer.transcript());
    // The CLI shows the association: both paths, and in fullnat how the
    // endpoint sees the client.
    let assocs = agent.cli("associations").unwrap();
    assert_eq!(assocs.lines().count(), 2, "one association:\n{assocs}");
    for path in [
        format!("{vip1} -> {}", std::net::SocketAddr::new(e1, 3868)),
        format!("{vip2} -> {}", std::net::SocketAddr::new(e2, 3868)),
    ] {
        assert!(assocs.contains(&path), "path {path}:\n{assocs}");
    }
    assert_eq!(assocs.contains(" (as "), fullnat, "{assocs}");
    // The data after the cut went through the secondary VIP to the
    // endpoint address paired with it (a new flow would have gone to the
    // rule's endpoint, e1).
    let sessions = agent.cli("sessions").unwrap();
    let (sv2, se2) = (
        std::net::SocketAddr::new(vip2, 3868).to_string(),
        std::net::SocketAddr::new(e2, 3868).to_string(),
    );
    assert!(
        sessions.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // PROTO CLIENT SERVICE ENDPOINT STATE IDLE PKTS-> PKTS<-
            f.len() == 8 && f[2] == sv2 && f[3] == se2 && f[6].parse::<u64>().is_ok_and(|n| n > 0)
        }),
        "packets through the secondary VIP to {se2}:\n{sessions}"
    );
    agent.stop().unwrap();
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}
