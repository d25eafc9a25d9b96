//! ICMP through the datapath: echo to a VIP answered, ICMP errors about
//! translated packets translated back (packet tables), and path-MTU
//! discovery through the load balancer with real traffic.

use loxilb_tests::fib::verdict::{XDP_PASS, XDP_REDIRECT, XDP_TX};
use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    os::fd::AsRawFd,
    time::Duration,
};

use loxilb_tests::tables::expect_frame;
use loxilb_tests::{
    fib::{run_xdp, with_datapath, CLIENT_MAC, LB_TO_CLIENT_MAC},
    need_root,
    netns::{Agent, PinDirGuard, Servers, Topology, VIP},
    packet::{csum_ok, diff, icmp6_frame, icmp_frame, quote, quote6, Frame, SYN},
};

const RULES: &str = "rules:\n  - {vip: 20.0.0.100, port: 80, protocol: tcp, endpoints: [{ip: 10.0.1.10, port: 8080}]}\n  - {vip: 20.0.0.100, port: 53, protocol: udp, mode: fullnat, endpoints: [{ip: 10.0.1.10, port: 5353}]}\n";

#[test]
fn echo_to_a_vip_is_answered_and_other_echoes_pass() {
    if !need_root("echo_to_a_vip_is_answered_and_other_echoes_pass") {
        return;
    }
    with_datapath("echo", RULES, |dp| {
        let req = icmp_frame(
            "192.168.0.2",
            "20.0.0.100",
            64,
            8,
            0,
            [0x12, 0x34, 0, 1],
            b"ping-payload",
        );
        let mut want = icmp_frame(
            "20.0.0.100",
            "192.168.0.2",
            64,
            0,
            0,
            [0x12, 0x34, 0, 1],
            b"ping-payload",
        );
        want[0..6].copy_from_slice(&req[6..12]);
        want[6..12].copy_from_slice(&req[0..6]);
        let (v, out) = run_xdp(dp, &req);
        assert_eq!(v, XDP_TX);
        expect_frame("echo reply", &out, &want);
        let other = icmp_frame("192.168.0.2", "20.0.0.200", 64, 8, 0, [0, 1, 0, 1], b"x");
        assert_eq!(run_xdp(dp, &other), (XDP_PASS, other));
        let stats: HashMap<_, _> = dp.stats().unwrap().into_iter().collect();
        assert_eq!(stats["icmp_echo_replied"], 1);
    });
}

/// Parse an ICMP error frame: (outer src, outer dst, inner src, inner dst,
/// inner sport, inner dport), checking every checksum on the way.
fn inspect(f: &[u8]) -> (Ipv4Addr, Ipv4Addr, Ipv4Addr, Ipv4Addr, u16, u16) {
    let ip = &f[14..34];
    assert!(csum_ok(ip), "outer IP checksum");
    let icmp = &f[34..];
    assert!(csum_ok(icmp), "ICMP checksum");
    let inner = &icmp[8..28];
    assert!(csum_ok(inner), "quoted IP header checksum");
    let a = |b: &[u8]| Ipv4Addr::new(b[0], b[1], b[2], b[3]);
    (
        a(&ip[12..16]),
        a(&ip[16..20]),
        a(&inner[12..16]),
        a(&inner[16..20]),
        u16::from_be_bytes([icmp[28], icmp[29]]),
        u16::from_be_bytes([icmp[30], icmp[31]]),
    )
}

#[test]
fn icmp_errors_about_translated_packets_are_translated_back() {
    if !need_root("icmp_errors_about_translated_packets_are_translated_back") {
        return;
    }
    with_datapath("icmperr", RULES, |dp| {
        // DNAT session; a router behind the LB says "fragmentation needed"
        // about the translated packet.
        let syn = Frame::tcp("192.168.0.2", 40000, "20.0.0.100", 80, SYN);
        let (_, sent) = run_xdp(dp, &syn.bytes());
        let err = icmp_frame(
            "10.0.1.254",
            "192.168.0.2",
            64,
            3,
            4,
            [0, 0, 0x05, 0x14],
            &quote(&sent),
        );
        let (v, out) = run_xdp(dp, &err);
        assert_eq!(v, XDP_REDIRECT);
        let (os, od, is, id, isp, idp) = inspect(&out);
        assert_eq!(
            (os, od),
            (
                "10.0.1.254".parse().unwrap(),
                "192.168.0.2".parse().unwrap()
            )
        );
        assert_eq!(
            (is, id, isp, idp),
            (
                "192.168.0.2".parse().unwrap(),
                "20.0.0.100".parse().unwrap(),
                40000,
                80
            )
        );
        assert_eq!(
            &out[0..12],
            &[CLIENT_MAC, LB_TO_CLIENT_MAC].concat()[..],
            "routed to the client"
        );
        assert_eq!(
            &out[34 + 4..34 + 8],
            &[0, 0, 0x05, 0x14],
            "the next-hop MTU is kept"
        );
        // The quoted header is the client's own packet again (as it left
        // the LB: TTL one lower).
        let mut orig = syn.clone();
        orig.ttl -= 1;
        let q = quote(&orig.bytes());
        assert_eq!(
            &out[42..42 + 20],
            &q[..20],
            "{}",
            diff(&out[42..62], &q[..20])
        );

        // Full-NAT session; the endpoint itself says "port unreachable" to
        // the full-NAT source.
        let u = Frame::udp("192.168.0.2", 5000, "20.0.0.100", 53);
        let (_, sent) = run_xdp(dp, &u.bytes());
        let snat_port = u16::from_be_bytes([sent[34], sent[35]]);
        let err = icmp_frame("10.0.1.10", "20.0.0.100", 64, 3, 3, [0; 4], &quote(&sent));
        let (v, out) = run_xdp(dp, &err);
        assert_eq!(v, XDP_REDIRECT);
        let (os, od, is, id, isp, idp) = inspect(&out);
        assert_eq!(
            (os, od),
            (
                "20.0.0.100".parse().unwrap(),
                "192.168.0.2".parse().unwrap()
            ),
            "from the service, to the client"
        );
        assert_eq!(
            (is, id, isp, idp),
            (
                "192.168.0.2".parse().unwrap(),
                "20.0.0.100".parse().unwrap(),
                5000,
                53
            )
        );
        assert_ne!(snat_port, 5000);
        // An error about something we never translated passes untouched.
        let stray = Frame::tcp("192.168.0.2", 1, "10.0.1.10", 2, SYN).bytes();
        let err = icmp_frame(
            "10.0.1.254",
            "192.168.0.2",
            64,
            3,
            1,
            [0; 4],
            &quote(&stray),
        );
        assert_eq!(run_xdp(dp, &err), (XDP_PASS, err));
        let stats: HashMap<_, _> = dp.stats().unwrap().into_iter().collect();
        assert_eq!(stats["icmp_err_xlated"], 2);
    });
}

/// Found by the packet fuzzer (tests/tests/all/fuzz/mod.rs): ICMP read past the
/// IP packet's own length (into the frame's padding) was answered or
/// translated, and an ICMPv6 error quoting something that is not an IPv6
/// header was translated. Each passes untouched now, next to the same
/// frame with its lengths right, which is still handled.
#[test]
fn icmp_past_the_ip_length_and_quotes_not_ipv6_pass_untouched() {
    if !need_root("icmp_past_the_ip_length_and_quotes_not_ipv6_pass_untouched") {
        return;
    }
    let rules = RULES.to_string()
        + "  - {vip: \"fd00:20::100\", port: 80, protocol: tcp, endpoints: [{ip: \"fd00:1::10\", port: 8080}]}\n";
    with_datapath("icmplen", &rules, |dp| {
        // IPv4 total length / IPv6 payload length set to `len`, the frame
        // unchanged (the rest is padding); the checksum over what the
        // length covers.
        let cut4 = |f: &[u8], len: usize| {
            let mut b = f.to_vec();
            b[16..18].copy_from_slice(&(len as u16).to_be_bytes());
            b[24..26].fill(0);
            let c = loxilb_common::csum::checksum_be(&b[14..34]);
            b[24..26].copy_from_slice(&c.to_be_bytes());
            b
        };
        let cut6 = |f: &[u8], plen: usize| {
            let mut b = f.to_vec();
            b[18..20].copy_from_slice(&(plen as u16).to_be_bytes());
            b
        };
        // Echo requests whose ICMP header the IP length cuts.
        let req = icmp_frame("192.168.0.2", "20.0.0.100", 64, 8, 0, [0, 1, 0, 1], b"ping");
        let short = cut4(&req, 20 + 6);
        assert_eq!(
            run_xdp(dp, &short),
            (XDP_PASS, short),
            "IPv4 echo of 6 bytes"
        );
        assert_eq!(run_xdp(dp, &req).0, XDP_TX, "the whole echo is answered");
        let req6 = icmp6_frame(
            "fd00:c::2",
            "fd00:20::100",
            64,
            128,
            0,
            [0, 1, 0, 1],
            b"ping",
        );
        let short6 = cut6(&req6, 7);
        assert_eq!(
            run_xdp(dp, &short6),
            (XDP_PASS, short6),
            "ICMPv6 echo of 7 bytes"
        );
        assert_eq!(run_xdp(dp, &req6).0, XDP_TX);

        // Errors about a translated packet whose quote the IP length cuts
        // (before the quoted ports).
        let (v, sent) = run_xdp(
            dp,
            &Frame::tcp("192.168.0.2", 40000, "20.0.0.100", 80, SYN).bytes(),
        );
        assert_eq!(v, XDP_REDIRECT);
        let err = icmp_frame(
            "10.0.1.254",
            "192.168.0.2",
            64,
            3,
            4,
            [0, 0, 5, 0x14],
            &quote(&sent),
        );
        let cut = cut4(&err, 20 + 8 + 20 + 2);
        assert_eq!(run_xdp(dp, &cut), (XDP_PASS, cut), "IPv4 quote cut");
        assert_eq!(
            run_xdp(dp, &err).0,
            XDP_REDIRECT,
            "the whole error is translated"
        );
        let (v, sent6) = run_xdp(
            dp,
            &Frame::tcp("fd00:c::2", 40000, "fd00:20::100", 80, SYN).bytes(),
        );
        assert_eq!(v, XDP_REDIRECT);
        let err6 = icmp6_frame(
            "fd00:1::fe",
            "fd00:c::2",
            64,
            2,
            0,
            [0, 0, 5, 0],
            &quote6(&sent6),
        );
        let cut = cut6(&err6, 8 + 40 + 2);
        assert_eq!(run_xdp(dp, &cut), (XDP_PASS, cut), "IPv6 quote cut");
        // The quoted header's version nibble is not 6.
        let mut bad = err6.clone();
        bad[14 + 40 + 8] = 0x80;
        assert_eq!(run_xdp(dp, &bad), (XDP_PASS, bad), "quote of version 8");
        assert_eq!(run_xdp(dp, &err6).0, XDP_REDIRECT);
        let stats: HashMap<_, _> = dp.stats().unwrap().into_iter().collect();
        assert_eq!(
            (stats["icmp_echo_replied"], stats["icmp_err_xlated"]),
            (2, 2),
            "only the whole frames were handled"
        );
    });
}

/// Real traffic: the LB-backend link has a smaller MTU; a client sends a
/// UDP datagram too big for it with DF set. The LB's stack answers
/// "fragmentation needed" about the translated packet; the TC egress
/// program translates it back, so the client's kernel learns the path MTU
/// toward the VIP.
#[test]
fn path_mtu_discovery_works_through_the_load_balancer() {
    if !need_root("path_mtu_discovery_works_through_the_load_balancer") {
        return;
    }
    let t = Topology::new("lxmtu", 1).expect("topology");
    let _pins = PinDirGuard(t.pin_dir());
    let _servers = Servers::start(&t.backends[0], "b1", 8080, 5353).unwrap();
    t.lb.sh(&["ip", "link", "set", "lbb1", "mtu", "1300"])
        .unwrap();
    t.backends[0]
        .sh(&["ip", "link", "set", "b0", "mtu", "1300"])
        .unwrap();
    let cfg = std::env::temp_dir().join("lxmtu-rules.yaml");
    std::fs::write(
        &cfg,
        format!("rules:\n  - {{vip: {VIP}, port: 53, protocol: udp, endpoints: [{{ip: {}, port: 5353}}]}}\n", t.backend_ip(1)),
    )
    .unwrap();
    let mut agent = Agent::start(&t, &cfg, &[]).expect("agent");
    let to: SocketAddr = format!("{VIP}:53").parse().unwrap();
    let mtu = t.client.run(move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.connect(to).unwrap();
        // Path-MTU discovery on: DF set, no local fragmentation.
        let val: libc::c_int = libc::IP_PMTUDISC_DO;
        unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_MTU_DISCOVER,
                &val as *const _ as *const libc::c_void,
                4,
            );
        }
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut mtu = 0;
        for _ in 0..10 {
            let _ = s.send(&[b'x'; 1400]);
            std::thread::sleep(Duration::from_millis(300));
            let mut m: libc::c_int = 0;
            let mut len: libc::socklen_t = 4;
            unsafe {
                libc::getsockopt(
                    s.as_raw_fd(),
                    libc::IPPROTO_IP,
                    libc::IP_MTU,
                    &mut m as *mut _ as *mut libc::c_void,
                    &mut len,
                );
            }
            mtu = m;
            if mtu == 1300 {
                break;
            }
        }
        // and a datagram that fits still gets through (the first calls may
        // report the queued EMSGSIZE of the ICMP error: that is the point)
        let mut buf = [0u8; 256];
        let mut n = None;
        for _ in 0..5 {
            if s.send(b"small").is_ok() {
                if let Ok(k) = s.recv(&mut buf) {
                    n = Some(k);
                    break;
                }
            }
        }
        let n = n.expect("reply to a datagram that fits");
        assert!(String::from_utf8_lossy(&buf[..n]).contains("backend=b1"));
        mtu
    });
    assert_eq!(mtu, 1300, "the client learned the path MTU toward the VIP");
    let stats = agent.cli("stats").unwrap();
    assert!(
        loxilb_tests::netns::counter(&stats, "icmp_err_xlated") > 0,
        "{stats}"
    );
    agent.stop().unwrap();
}
