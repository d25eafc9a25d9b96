//! The real SCTP peers (usrsctp, `tests/sctp/`) and multihoming failover,
//! without a load balancer: the ground the SCTP load-balancing tests stand
//! on. Two namespaces, client and server, joined by two veth pairs on two
//! subnets (each side has one address on each link):
//!
//! ```text
//!   client ns                       server ns
//!   c1 10.81.1.2/24 ------------ s1 10.81.1.3/24    (primary path)
//!   c2 10.81.2.2/24 ------------ s2 10.81.2.3/24    (secondary path)
//! ```
//!
//! Also checks the test crate's SCTP parser and the common crate's CRC32c
//! against every packet a real SCTP stack put on the wire.
//!
//! Needs root (namespaces) and libusrsctp-dev, cc, nsenter, tcpdump; skips
//! with a message otherwise, unless LOXILB_REQUIRE_ROOT=1 /
//! LOXILB_REQUIRE_TOOLS=1 (CI) make that a failure.

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use loxilb_tests::{
    need_root,
    netns::{sh, Netns},
    sctp_packet::{self, parse_frame, ParsedFrame},
    sctp_peers::{need_tools, Capture, ClientOpts, SctpClient, SctpServer},
};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Two namespaces joined by two veth pairs; deleted (with the veths) on
/// drop, also when the test fails.
struct TwoLinks {
    client: Netns,
    server: Netns,
}

impl TwoLinks {
    /// `addrs[i]` = (client address/prefix, server address/prefix) of
    /// link i+1 (`c{i+1}` <-> `s{i+1}`).
    fn new(prefix: &str, addrs: &[(&str, &str)]) -> Self {
        let client = Netns::new(&format!("{prefix}-c")).expect("client ns");
        let server = Netns::new(&format!("{prefix}-s")).expect("server ns");
        let t = TwoLinks { client, server };
        for (i, (c, s)) in addrs.iter().enumerate() {
            let (ci, si) = (format!("c{}", i + 1), format!("s{}", i + 1));
            sh(&[
                "ip",
                "link",
                "add",
                &ci,
                "netns",
                &t.client.name,
                "type",
                "veth",
                "peer",
                "name",
                &si,
                "netns",
                &t.server.name,
            ])
            .expect("veth");
            for (ns, dev, a) in [(&t.client, &ci, c), (&t.server, &si, s)] {
                let mut args = vec!["ip", "addr", "add", a, "dev", dev];
                if a.contains(':') {
                    args.push("nodad"); // usable at once
                }
                ns.sh(&args).expect("address");
                ns.sh(&["ip", "link", "set", dev, "up"]).expect("link up");
            }
        }
        t
    }
}

/// Every SCTP frame captured on the client's links, parsed; each must
/// parse and carry a correct CRC32c (checked with the common crate's
/// implementation against what usrsctp computed).
fn parse_all(link: &str, caps: Vec<loxilb_tests::sctp_peers::Captured>) -> Vec<ParsedFrame> {
    caps.iter()
        .map(|c| {
            let p = parse_frame(&c.data)
                .unwrap_or_else(|e| panic!("{link}: unparsable SCTP frame ({e}): {:02x?}", c.data));
            assert!(
                p.sctp.crc_ok,
                "{link}: CRC32c mismatch on a frame usrsctp sent: {:02x?}",
                c.data
            );
            p
        })
        .collect()
}

/// The failover scenario, shared by the IPv4 and the mixed-family test.
/// `c`/`s`: per link, the client's and the server's address.
fn failover(prefix: &str, c: [&str; 2], s: [&str; 2], plen: [u8; 2]) {
    let port = 9911;
    let t = TwoLinks::new(
        prefix,
        &[
            (
                &format!("{}/{}", c[0], plen[0]),
                &format!("{}/{}", s[0], plen[0]),
            ),
            (
                &format!("{}/{}", c[1], plen[1]),
                &format!("{}/{}", s[1], plen[1]),
            ),
        ],
    );
    let (c1, c2, s1, s2) = (ip(c[0]), ip(c[1]), ip(s[0]), ip(s[1]));
    let cap1 = Capture::start(&t.client, "c1", "sctp").expect("capture c1");
    let cap2 = Capture::start(&t.client, "c2", "sctp").expect("capture c2");

    // usrsctp sends every packet from the address bound last (it has no
    // routing table): bind the primary link's address last on both sides
    // so that, before the cut, everything travels on link 1.
    let server = SctpServer::spawn(&t.server, &[s2, s1], port).expect("server");
    let opts = ClientOpts {
        interval_ms: 50,
        ..Default::default()
    };
    let client =
        SctpClient::spawn_with(&t.client, &[c2, c1], &[s1, s2], port, &opts).expect("client");
    let assoc = client.wait_up(Duration::from_secs(5)).expect("association");

    // The client sees both server addresses, primary the first.
    let peers = client
        .wait_for(|e| e.is("peers"), Duration::from_secs(1))
        .unwrap();
    let mut got = peers.addrs("addrs");
    got.sort();
    let mut want = vec![s1, s2];
    want.sort();
    assert_eq!(got, want, "client's view of the server's addresses");
    let prim = client
        .wait_for(|e| e.is("primary"), Duration::from_secs(1))
        .unwrap();
    assert_eq!(prim.addr("addr"), Some(s1), "primary path");
    // ... and the server both client addresses.
    let speers = server
        .wait_for(|e| e.is("peers"), Duration::from_secs(2))
        .unwrap();
    let mut got = speers.addrs("addrs");
    got.sort();
    let mut want = vec![c1, c2];
    want.sort();
    assert_eq!(got, want, "server's view of the client's addresses");

    // Data flows on the primary path.
    client
        .wait_for(
            |e| e.is("echo") && e.num("seq") >= Some(10),
            Duration::from_secs(5),
        )
        .expect("echoes before the cut");

    // Cut the primary link. Messages numbered above `sent_before` were
    // handed to the stack after the link went down.
    let cut = Instant::now();
    t.client
        .sh(&["ip", "link", "set", "c1", "down"])
        .expect("link down");
    let sent_before = client
        .of_kind("sent")
        .iter()
        .filter_map(|e| e.num("seq"))
        .max()
        .unwrap();

    // The client notices the path is gone ...
    let unreach = client
        .wait_for(
            |e| {
                e.is("paddr") && e.addr("addr") == Some(s1) && e.get("state") == Some("UNREACHABLE")
            },
            Duration::from_secs(10),
        )
        .expect("primary path declared unreachable");
    // ... and messages sent after the cut come back.
    let first = client
        .wait_for(
            |e| e.is("echo") && e.num("seq") > Some(sent_before),
            Duration::from_secs(10),
        )
        .expect("echo after the cut");
    let later = client
        .wait_for(
            |e| e.is("echo") && e.num("seq") >= Some(sent_before + 20),
            Duration::from_secs(10),
        )
        .expect("data keeps flowing after the cut");
    eprintln!(
        "{prefix}: path unreachable after {:?}, first echo of a post-cut message after {:?}, +20 messages after {:?}",
        unreach.at - cut,
        first.at - cut,
        later.at - cut
    );

    // Same association throughout: one COMM_UP on each side, nothing
    // closed or restarted, every echo on the same association id, and the
    // server's per-association count equals the sequence number (nothing
    // lost, duplicated or reordered).
    let cev = client.events();
    let ups: Vec<_> = cev.iter().filter(|e| e.is("assoc")).collect();
    assert_eq!(
        ups.len(),
        1,
        "client association events:\n{}",
        client.transcript()
    );
    assert_eq!(ups[0].get("state"), Some("COMM_UP"));
    assert_eq!(ups[0].num("assoc"), Some(assoc));
    assert!(
        !cev.iter()
            .any(|e| e.is("closed") || e.is("send_error") || e.is("error")),
        "{}",
        client.transcript()
    );
    assert!(cev
        .iter()
        .filter(|e| e.is("echo") || e.is("sent"))
        .all(|e| e.num("assoc") == Some(assoc)));
    let sev = server.events();
    let sups: Vec<_> = sev.iter().filter(|e| e.is("assoc")).collect();
    assert_eq!(
        sups.len(),
        1,
        "server association events:\n{}",
        server.transcript()
    );
    let sassoc = sups[0].num("assoc");
    let data: Vec<_> = sev.iter().filter(|e| e.is("data")).collect();
    assert!(data.len() as u64 >= sent_before + 20);
    for d in &data {
        assert_eq!(d.num("assoc"), sassoc, "{}", d.line);
        assert_eq!(
            d.get("msg").and_then(|m| m.strip_prefix("seq=")),
            d.get("count"),
            "server count vs sequence: {}",
            d.line
        );
    }
    drop(client);
    drop(server);

    // On the wire: one INIT and one INIT-ACK in total, their address
    // parameters are each side's addresses, every packet carries the same
    // pair of verification tags, the client's DATA went to the primary
    // address on link 1 before the cut and to the secondary on link 2
    // after, and usrsctp's CRC32c agrees with ours on every packet.
    let l1 = parse_all("c1", cap1.finish().expect("capture c1"));
    let l2 = parse_all("c2", cap2.finish().expect("capture c2"));
    let all: Vec<&ParsedFrame> = l1.iter().chain(l2.iter()).collect();
    let with = |typ: u8| -> Vec<&&ParsedFrame> {
        all.iter()
            .filter(|p| p.sctp.chunk_types().contains(&typ))
            .collect()
    };
    let inits = with(sctp_packet::INIT);
    let acks = with(sctp_packet::INIT_ACK);
    assert_eq!(inits.len(), 1, "INITs on the wire (a new association?)");
    assert_eq!(acks.len(), 1, "INIT-ACKs on the wire");
    let init = inits[0];
    assert_eq!(init.dst, s1, "INIT goes to the first remote address");
    let mut a = init.sctp.addresses();
    a.sort();
    let mut want = vec![c1, c2];
    want.sort();
    assert_eq!(a, want, "INIT address parameters");
    let mut a = acks[0].sctp.addresses();
    a.sort();
    let mut want = vec![s1, s2];
    want.sort();
    assert_eq!(a, want, "INIT-ACK address parameters");
    assert!(acks[0].sctp.cookie().is_some_and(|c| !c.is_empty()));
    let ctag = init
        .sctp
        .find(sctp_packet::INIT)
        .unwrap()
        .init_fixed()
        .unwrap()
        .initiate_tag;
    let stag = acks[0]
        .sctp
        .find(sctp_packet::INIT_ACK)
        .unwrap()
        .init_fixed()
        .unwrap()
        .initiate_tag;
    let cport = init.sctp.packet.sport;
    for p in &all {
        let h = &p.sctp.packet;
        if h.chunks.iter().any(|c| c.typ == sctp_packet::INIT) {
            assert_eq!(h.vtag, 0);
            continue;
        }
        let want = if h.sport == cport { stag } else { ctag };
        assert_eq!(
            h.vtag,
            want,
            "verification tag of {:?}",
            p.sctp.chunk_types()
        );
    }
    // (destination, TSN) of the client's DATA chunks on a link
    let client_data = |ps: &[ParsedFrame]| -> Vec<(IpAddr, u32)> {
        ps.iter()
            .filter(|p| p.sctp.packet.sport == cport)
            .flat_map(|p| {
                p.sctp
                    .packet
                    .chunks
                    .iter()
                    .filter_map(|c| c.as_data().map(|d| (p.dst, d.0)))
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    let d1 = client_data(&l1);
    let d2 = client_data(&l2);
    assert!(
        d1.len() as u64 >= 10 && d1.iter().all(|d| d.0 == s1),
        "DATA on link 1: {d1:?}"
    );
    assert!(d2.iter().all(|d| d.0 == s2), "DATA on link 2: {d2:?}");
    let mut tsns: Vec<u32> = d2.iter().map(|d| d.1).collect();
    tsns.sort();
    tsns.dedup();
    assert!(tsns.len() >= 20, "DATA chunks on link 2: {d2:?}");
}

/// An association between two multihomed usrsctp peers survives the loss
/// of its primary link: the client declares the primary address
/// unreachable within a few seconds, data continues over the second link,
/// on the same association (one INIT on the wire, same tags, same
/// association id, nothing lost).
#[test]
fn sctp_multihomed_failover_ipv4() {
    if !need_root("sctp_multihomed_failover_ipv4") || !need_tools("sctp_multihomed_failover_ipv4") {
        return;
    }
    failover(
        "sctpst4",
        ["10.81.1.2", "10.81.2.2"],
        ["10.81.1.3", "10.81.2.3"],
        [24, 24],
    );
}

/// The same with an IPv4 primary path and an IPv6 secondary path: the
/// INIT/INIT-ACK carry an IPv4 (type 5) and an IPv6 (type 6) address
/// parameter each, and the association fails over from IPv4 to IPv6.
#[test]
fn sctp_multihomed_failover_ipv4_to_ipv6() {
    if !need_root("sctp_multihomed_failover_ipv4_to_ipv6")
        || !need_tools("sctp_multihomed_failover_ipv4_to_ipv6")
    {
        return;
    }
    failover(
        "sctpst6",
        ["10.82.1.2", "fd00:82:2::2"],
        ["10.82.1.3", "fd00:82:2::3"],
        [24, 64],
    );
}

/// The server takes several associations at once (one-to-many socket):
/// two clients in the same namespace (usrsctp's blackhole mode, see
/// `Tuning::blackhole`) each get their own association and their own
/// echoes.
#[test]
fn sctp_server_serves_two_associations() {
    let test = "sctp_server_serves_two_associations";
    if !need_root(test) || !need_tools(test) {
        return;
    }
    let t = TwoLinks::new("sctpst2", &[("10.83.1.2/24", "10.83.1.3/24")]);
    let port = 9912;
    let mut tuning = loxilb_tests::sctp_peers::Tuning {
        blackhole: 2,
        ..Default::default()
    };
    let server = SctpServer::spawn_with(&t.server, &[ip("10.83.1.3")], port, &tuning).unwrap();
    tuning.blackhole = 2;
    let opts = ClientOpts {
        tuning,
        ..Default::default()
    };
    let local = [ip("10.83.1.2")];
    let remote = [ip("10.83.1.3")];
    let a = SctpClient::spawn_with(&t.client, &local, &remote, port, &opts).unwrap();
    let b = SctpClient::spawn_with(&t.client, &local, &remote, port, &opts).unwrap();
    a.wait_up(Duration::from_secs(5)).unwrap();
    b.wait_up(Duration::from_secs(5)).unwrap();
    for c in [&a, &b] {
        c.wait_for(
            |e| e.is("echo") && e.num("seq") >= Some(5),
            Duration::from_secs(5),
        )
        .unwrap();
    }
    let ups = server.of_kind("assoc");
    assert_eq!(ups.len(), 2, "{}", server.transcript());
    assert_ne!(ups[0].num("assoc"), ups[1].num("assoc"));
}
