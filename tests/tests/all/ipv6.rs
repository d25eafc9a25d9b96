//! IPv6 packet tables through BPF_PROG_TEST_RUN: NAT66 in every mode that
//! applies, both directions, extension headers walked (and the ones that
//! are not), malformed headers, source ranges, selection; on XDP and TC.

use loxilb_agent::datapath::Datapath;
use loxilb_tests::fib::verdict::{TC_ACT_OK, TC_ACT_REDIRECT, XDP_DROP, XDP_PASS, XDP_REDIRECT};
use loxilb_tests::{
    fib::{self, run_tc, run_xdp, CLIENT_MAC, EP1_MAC, EP2_MAC, LB_TO_CLIENT_MAC, LB_TO_EP_MAC},
    need_root,
    packet::{icmp6_csum_ok, icmp6_frame, quote6, Frame, ACK, SYN},
    tables::{check_malformed, check_with, expect_frame, stats, Case},
};

const VIP: &str = "fd00:20::100";
const CLIENT: &str = "fd00:c::2";
const EP1: &str = "fd00:1::10";
const EP2: &str = "fd00:1::11";

const RULES: &str = r#"
rules:
  - name: web6
    vip: fd00:20::100
    port: 80
    protocol: tcp
    endpoints:
      - { ip: "fd00:1::10", port: 8080 }
      - { ip: "fd00:1::11", port: 8080 }
  - name: dns6
    vip: fd00:20::100
    port: 53
    protocol: udp
    endpoints:
      - { ip: "fd00:1::10", port: 5353 }
  - name: full6
    vip: fd00:20::100
    port: 82
    protocol: tcp
    mode: fullnat
    endpoints:
      - { ip: "fd00:1::10", port: 8080 }
  - name: onearm6
    vip: fd00:20::100
    port: 81
    protocol: tcp
    mode: onearm
    endpoints:
      - { ip: "fd00:1::10", port: 8080 }
  - name: dsr6
    vip: fd00:20::100
    port: 83
    protocol: tcp
    mode: dsr
    endpoints:
      - { ip: "fd00:1::11", port: 83 }
  - name: ranged6
    vip: fd00:20::101
    port: 80
    protocol: tcp
    source_ranges: ["fd00:c::/64"]
    endpoints:
      - { ip: "fd00:1::10", port: 8080 }
  - name: nat64
    vip: fd00:20::100
    port: 84
    protocol: tcp
    endpoints:
      - { ip: 10.0.1.10, port: 8080 }
  - name: nat64udp
    vip: fd00:20::100
    port: 54
    protocol: udp
    endpoints:
      - { ip: 10.0.1.10, port: 5353 }
  - name: web4
    vip: 20.0.0.100
    port: 80
    protocol: tcp
    endpoints:
      - { ip: 10.0.1.10, port: 8080 }
"#;

/// An options extension header of 8 + 8n bytes without its next-header
/// byte (the builder adds it): length n, one PadN option filling the rest.
fn opts_body(n: usize) -> Vec<u8> {
    let len = 7 + 8 * n;
    let mut b = vec![n as u8, 1, (len - 3) as u8];
    b.resize(len, 0);
    b
}

#[test]
fn nat66_dnat_table_both_directions() {
    if !need_root("nat66_dnat_table_both_directions") {
        return;
    }
    fib::with_datapath("v6dnat", RULES, |dp| {
        let syn = Frame::tcp(CLIENT, 40000, VIP, 80, SYN);
        let syn2 = Frame::tcp(CLIENT, 40001, VIP, 80, SYN);
        let est = Frame::tcp(CLIENT, 40000, VIP, 80, ACK);
        let reply = Frame::tcp(EP1, 8080, CLIENT, 40000, SYN | ACK);
        let udp = Frame::udp(CLIENT, 5000, VIP, 53);
        let udp_reply = Frame::udp(EP1, 5353, CLIENT, 5000);
        let mut tc = Frame::tcp(CLIENT, 40002, VIP, 80, SYN);
        tc.tos = 0xb8;
        tc.flow = 0x12345;
        let other = Frame::tcp(CLIENT, 40000, "fd00:20::200", 80, SYN);
        let v4 = Frame::tcp("192.168.0.2", 40000, "20.0.0.100", 80, SYN);
        let cases = vec![
            Case {
                name: "SYN to the IPv6 VIP: DNAT to the first endpoint, hop limit - 1",
                input: syn.bytes(),
                expected: syn
                    .with(CLIENT, 40000, EP1, 8080)
                    .routed(LB_TO_EP_MAC, EP1_MAC)
                    .bytes(),
                verdict: XDP_REDIRECT,
            },
            Case {
                name: "second SYN: round-robin to the next endpoint",
                input: syn2.bytes(),
                expected: syn2
                    .with(CLIENT, 40001, EP2, 8080)
                    .routed(LB_TO_EP_MAC, EP2_MAC)
                    .bytes(),
                verdict: XDP_REDIRECT,
            },
            Case {
                name: "established packet keeps its endpoint",
                input: est.bytes(),
                expected: est
                    .with(CLIENT, 40000, EP1, 8080)
                    .routed(LB_TO_EP_MAC, EP1_MAC)
                    .bytes(),
                verdict: XDP_REDIRECT,
            },
            Case {
                name: "reply reverse-NATed to [VIP]:80",
                input: reply.bytes(),
                expected: reply
                    .with(VIP, 80, CLIENT, 40000)
                    .routed(LB_TO_CLIENT_MAC, CLIENT_MAC)
                    .bytes(),
                verdict: XDP_REDIRECT,
            },
            Case {
                name: "UDP to the VIP (checksum over the new pseudo-header)",
                input: udp.bytes(),
                expected: udp
                    .with(CLIENT, 5000, EP1, 5353)
                    .routed(LB_TO_EP_MAC, EP1_MAC)
                    .bytes(),
                verdict: XDP_REDIRECT,
            },
            Case {
                name: "UDP reply",
                input: udp_reply.bytes(),
                expected: udp_reply
                    .with(VIP, 53, CLIENT, 5000)
                    .routed(LB_TO_CLIENT_MAC, CLIENT_MAC)
                    .bytes(),
                verdict: XDP_REDIRECT,
            },
            Case {
                name: "traffic class and flow label kept",
                input: tc.bytes(),
                expected: tc
                    .with(CLIENT, 40002, EP1, 8080)
                    .routed(LB_TO_EP_MAC, EP1_MAC)
                    .bytes(),
                verdict: XDP_REDIRECT,
            },
            Case {
                name: "non-service IPv6 untouched",
                input: other.bytes(),
                expected: other.bytes(),
                verdict: XDP_PASS,
            },
            Case {
                name: "IPv4 still served next to IPv6",
                input: v4.bytes(),
                expected: v4
                    .with("192.168.0.2", 40000, "10.0.1.10", 8080)
                    .routed(LB_TO_EP_MAC, EP1_MAC)
                    .bytes(),
                verdict: XDP_REDIRECT,
            },
        ];
        check_with(dp, cases, run_xdp);
        let s = stats(dp);
        assert_eq!(s["new_session"], 5, "{s:?}");
    });
}

#[test]
fn nat66_on_the_tc_hook_too() {
    if !need_root("nat66_on_the_tc_hook_too") {
        return;
    }
    fib::with_datapath("v6tc", RULES, |dp| {
        let syn = Frame::tcp(CLIENT, 41000, VIP, 80, SYN);
        let reply = Frame::tcp(EP1, 8080, CLIENT, 41000, SYN | ACK);
        let other = Frame::tcp(CLIENT, 41000, "fd00:20::200", 80, SYN);
        let cases = vec![
            Case {
                name: "TC: SYN translated and redirected",
                input: syn.bytes(),
                expected: syn
                    .with(CLIENT, 41000, EP1, 8080)
                    .routed(LB_TO_EP_MAC, EP1_MAC)
                    .bytes(),
                verdict: TC_ACT_REDIRECT,
            },
            Case {
                name: "TC: reply reverse-translated",
                input: reply.bytes(),
                expected: reply
                    .with(VIP, 80, CLIENT, 41000)
                    .routed(LB_TO_CLIENT_MAC, CLIENT_MAC)
                    .bytes(),
                verdict: TC_ACT_REDIRECT,
            },
            Case {
                name: "TC: non-service passes",
                input: other.bytes(),
                expected: other.bytes(),
                verdict: TC_ACT_OK,
            },
        ];
        check_with(dp, cases, run_tc);
    });
}

#[test]
fn nat66_fullnat_onearm_and_dsr() {
    if !need_root("nat66_fullnat_onearm_and_dsr") {
        return;
    }
    fib::with_datapath("v6modes", RULES, |dp| {
        // fullnat: source becomes the VIP with an allocated port.
        let syn = Frame::tcp(CLIENT, 42000, VIP, 82, SYN);
        let (v, out) = run_xdp(dp, &syn.bytes());
        assert_eq!(v, XDP_REDIRECT);
        let sport = u16::from_be_bytes([out[54], out[55]]);
        assert!(
            (32768..=60999).contains(&sport),
            "allocated source port {sport}"
        );
        let want = syn
            .with(VIP, sport, EP1, 8080)
            .routed(LB_TO_EP_MAC, EP1_MAC)
            .bytes();
        expect_frame("fullnat SYN", &out, &want);
        let reply = Frame::tcp(EP1, 8080, VIP, sport, SYN | ACK);
        let (v, out) = run_xdp(dp, &reply.bytes());
        let want = reply
            .with(VIP, 82, CLIENT, 42000)
            .routed(LB_TO_CLIENT_MAC, CLIENT_MAC)
            .bytes();
        assert_eq!(v, XDP_REDIRECT);
        expect_frame("fullnat reply", &out, &want);

        // onearm: source becomes the node's own address toward the endpoint.
        let syn = Frame::tcp(CLIENT, 42001, VIP, 81, SYN);
        let (v, out) = run_xdp(dp, &syn.bytes());
        assert_eq!(v, XDP_REDIRECT);
        let sport = u16::from_be_bytes([out[54], out[55]]);
        let want = syn
            .with("fd00:1::1", sport, EP1, 8080)
            .routed(LB_TO_EP_MAC, EP1_MAC)
            .bytes();
        expect_frame("onearm SYN", &out, &want);

        // L2 DSR: untranslated, only the MACs change, hop limit untouched.
        let syn = Frame::tcp(CLIENT, 42002, VIP, 83, SYN);
        let (v, out) = run_xdp(dp, &syn.bytes());
        let mut want = syn.clone();
        want.src_mac = LB_TO_EP_MAC;
        want.dst_mac = EP2_MAC;
        assert_eq!(v, XDP_REDIRECT);
        expect_frame("dsr", &out, &want.bytes());
    });
}

#[test]
fn extension_headers_walked_within_bound_others_passed() {
    if !need_root("extension_headers_walked_within_bound_others_passed") {
        return;
    }
    fib::with_datapath("v6ext", RULES, |dp| {
        // Hop-by-hop + destination options, then TCP: served, headers kept.
        let mut hbh = Frame::tcp(CLIENT, 43000, VIP, 80, SYN);
        hbh.ext = vec![(0, opts_body(0)), (60, opts_body(1))];
        // AH (length in 4-byte units) then UDP.
        let mut ah = Frame::udp(CLIENT, 43001, VIP, 53);
        ah.ext = vec![(51, {
            // (16 bytes in all: length 16/4 - 2; SPI, sequence, ICV)
            let mut b = vec![2u8, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1];
            b.resize(15, 0);
            b
        })];
        // Routing header with segments left: the destination would change.
        let mut rh = Frame::tcp(CLIENT, 43002, VIP, 80, SYN);
        rh.ext = vec![(43, {
            // (24 bytes: length 2, type 0, one segment left, one address)
            let mut b = vec![2u8, 0, 1];
            b.extend_from_slice(&[0; 4]);
            b.extend_from_slice(&[0; 16]);
            b
        })];
        // Five extension headers: past the walk's bound.
        let mut deep = Frame::tcp(CLIENT, 43003, VIP, 80, SYN);
        deep.ext = (0..5).map(|_| (60u8, opts_body(0))).collect();
        // A fragment header.
        let mut frag = Frame::udp(CLIENT, 43004, VIP, 53);
        frag.ext = vec![(44, vec![0, 0, 1, 0, 0, 0, 7])]; // offset 0, more fragments
        let cases = vec![
            Case {
                name: "hop-by-hop + destination options walked, translated",
                input: hbh.bytes(),
                expected: hbh
                    .with(CLIENT, 43000, EP1, 8080)
                    .routed(LB_TO_EP_MAC, EP1_MAC)
                    .bytes(),
                verdict: XDP_REDIRECT,
            },
            Case {
                name: "AH walked (4-byte units), translated",
                input: ah.bytes(),
                expected: ah
                    .with(CLIENT, 43001, EP1, 5353)
                    .routed(LB_TO_EP_MAC, EP1_MAC)
                    .bytes(),
                verdict: XDP_REDIRECT,
            },
            Case {
                name: "routing header with segments left: passed untouched",
                input: rh.bytes(),
                expected: rh.bytes(),
                verdict: XDP_PASS,
            },
            Case {
                name: "five extension headers: passed untouched",
                input: deep.bytes(),
                expected: deep.bytes(),
                verdict: XDP_PASS,
            },
            Case {
                name: "fragment: passed untouched",
                input: frag.bytes(),
                expected: frag.bytes(),
                verdict: XDP_PASS,
            },
        ];
        check_with(dp, cases, run_xdp);
        let s = stats(dp);
        assert_eq!(s["pass_ipv6_ext"], 2, "{s:?}");
        assert_eq!(s["pass_fragment"], 1, "{s:?}");
    });
}

#[test]
fn malformed_ipv6_passed_untouched_and_counted() {
    if !need_root("malformed_ipv6_passed_untouched_and_counted") {
        return;
    }
    fib::with_datapath("v6bad", RULES, |dp| {
        let good = Frame::tcp(CLIENT, 44000, VIP, 80, SYN).bytes();
        let mut cases = vec![];
        // Cut inside the fixed header.
        cases.push(("truncated IPv6 header", good[..14 + 30].to_vec()));
        // Payload length beyond the frame.
        let mut long = good.clone();
        long[18..20].copy_from_slice(&2000u16.to_be_bytes());
        cases.push(("payload length past the frame", long));
        // Cut inside the TCP header (payload length says so too).
        let mut short = good[..14 + 40 + 10].to_vec();
        short[18..20].copy_from_slice(&10u16.to_be_bytes());
        cases.push(("TCP header cut short", short));
        // An extension header whose length runs past the payload.
        let mut e = Frame::tcp(CLIENT, 44001, VIP, 80, SYN);
        e.ext = vec![(60, opts_body(0))];
        let mut eb = e.bytes();
        eb[14 + 40 + 1] = 200; // (200 + 1) * 8 bytes
        cases.push(("extension header length past the payload", eb));
        // Version nibble says 4 under an IPv6 ethertype.
        let mut ver = good.clone();
        ver[14] = 0x45;
        cases.push(("IPv4 version under the IPv6 ethertype", ver));
        let n = cases.len() as u64;
        let before = stats(dp)["pass_malformed"];
        check_malformed(
            dp,
            cases
                .into_iter()
                .map(|(name, b)| Case {
                    name,
                    expected: b.clone(),
                    input: b,
                    verdict: XDP_PASS,
                })
                .collect(),
            run_xdp,
        );
        assert_eq!(stats(dp)["pass_malformed"] - before, n);
        assert_eq!(stats(dp)["new_session"], 0, "nothing malformed was served");
    });
}

#[test]
fn ipv6_source_ranges_and_hop_limit() {
    if !need_root("ipv6_source_ranges_and_hop_limit") {
        return;
    }
    fib::with_datapath("v6src", RULES, |dp| {
        let inside = Frame::tcp(CLIENT, 45000, "fd00:20::101", 80, SYN);
        let outside = Frame::tcp("fd00:d::2", 45000, "fd00:20::101", 80, SYN);
        let mut last_hop = Frame::tcp(CLIENT, 45001, VIP, 80, SYN);
        last_hop.ttl = 1;
        let cases = vec![
            Case {
                name: "client inside fd00:c::/64: served",
                input: inside.bytes(),
                expected: inside
                    .with(CLIENT, 45000, EP1, 8080)
                    .routed(LB_TO_EP_MAC, EP1_MAC)
                    .bytes(),
                verdict: XDP_REDIRECT,
            },
            Case {
                name: "client outside the ranges: dropped",
                input: outside.bytes(),
                expected: outside.bytes(),
                verdict: XDP_DROP,
            },
        ];
        check_with(dp, cases, run_xdp);
        assert_eq!(stats(dp)["drop_src_range"], 1);
        // Hop limit 1: translated, then handed to the stack (which sends
        // the time-exceeded message), never forwarded with hop limit 0.
        let (v, out) = run_xdp(dp, &last_hop.bytes());
        assert_eq!(v, XDP_PASS);
        assert_eq!(out[14 + 7], 1, "hop limit untouched");
        assert_eq!(stats(dp)["pass_ttl"], 1);
    });
}

/// The IPv4 frame NAT64 should make of `f` (IPv6): same L4 and payload,
/// from `src:sport` to `dst:dport`, TOS = traffic class, TTL = hop limit
/// (then routed: - 1), id 0, DF only above 1260 bytes.
fn as_v4(f: &Frame, src: &str, sport: u16, dst: &str, dport: u16) -> Frame {
    let mut g = f.with(src, sport, dst, dport);
    g.id = 0;
    g.flow = 0;
    let tot = 20 + f.bytes().len() - 14 - 40;
    g.frag = if tot > 1260 { 0x4000 } else { 0 };
    g
}

/// The IPv6 frame NAT64 should make of the IPv4 reply `f`.
fn as_v6(f: &Frame, src: &str, sport: u16, dst: &str, dport: u16) -> Frame {
    let mut g = f.with(src, sport, dst, dport);
    g.flow = 0;
    g
}

fn nat64_both_ways(
    dp: &mut Datapath,
    run: fn(&mut Datapath, &[u8]) -> (u32, Vec<u8>),
    fwd: u32,
    cport: u16,
) {
    let mut syn = Frame::tcp(CLIENT, cport, VIP, 84, SYN);
    syn.tos = 0x28;
    let (v, out) = run(dp, &syn.bytes());
    assert_eq!(v, fwd, "NAT64 SYN verdict");
    // Ethernet 14 + IPv4 20: the source port the session was given.
    let sport = u16::from_be_bytes([out[34], out[35]]);
    let want = as_v4(&syn, "10.0.1.1", sport, "10.0.1.10", 8080)
        .routed(LB_TO_EP_MAC, EP1_MAC)
        .bytes();
    expect_frame("IPv6 SYN -> IPv4", &out, &want);
    // The reply, IPv4 from the endpoint, becomes IPv6 from the VIP.
    let mut reply = Frame::tcp("10.0.1.10", 8080, "10.0.1.1", sport, SYN | ACK);
    reply.tos = 0x10;
    let (v, out) = run(dp, &reply.bytes());
    let want = as_v6(&reply, VIP, 84, CLIENT, cport)
        .routed(LB_TO_CLIENT_MAC, CLIENT_MAC)
        .bytes();
    assert_eq!(v, fwd, "NAT64 reply verdict");
    expect_frame("IPv4 reply -> IPv6", &out, &want);
    // A large segment: DF set on the IPv4 side.
    let mut big = Frame::tcp(CLIENT, cport, VIP, 84, ACK);
    big.payload = vec![0x5a; 1300];
    let (v, out) = run(dp, &big.bytes());
    let want = as_v4(&big, "10.0.1.1", sport, "10.0.1.10", 8080)
        .routed(LB_TO_EP_MAC, EP1_MAC)
        .bytes();
    assert_eq!(v, fwd);
    expect_frame("large segment", &out, &want);
}

#[test]
fn nat64_table_tcp_both_directions_xdp_and_tc() {
    if !need_root("nat64_table_tcp_both_directions_xdp_and_tc") {
        return;
    }
    fib::with_datapath("nat64", RULES, |dp| {
        nat64_both_ways(dp, run_xdp, XDP_REDIRECT, 46000);
        nat64_both_ways(dp, run_tc, TC_ACT_REDIRECT, 46001);
        assert_eq!(stats(dp)["drop_nat64"], 0);
    });
}

#[test]
fn nat64_udp_and_what_is_not_translated() {
    if !need_root("nat64_udp_and_what_is_not_translated") {
        return;
    }
    fib::with_datapath("nat64u", RULES, |dp| {
        let q = Frame::udp(CLIENT, 47000, VIP, 54);
        let (v, out) = run_xdp(dp, &q.bytes());
        assert_eq!(v, XDP_REDIRECT);
        let sport = u16::from_be_bytes([out[34], out[35]]);
        let want = as_v4(&q, "10.0.1.1", sport, "10.0.1.10", 5353)
            .routed(LB_TO_EP_MAC, EP1_MAC)
            .bytes();
        expect_frame("UDP query", &out, &want);
        let a = Frame::udp("10.0.1.10", 5353, "10.0.1.1", sport);
        let (v, out) = run_xdp(dp, &a.bytes());
        let want = as_v6(&a, VIP, 54, CLIENT, 47000)
            .routed(LB_TO_CLIENT_MAC, CLIENT_MAC)
            .bytes();
        assert_eq!(v, XDP_REDIRECT);
        expect_frame("UDP answer", &out, &want);
        // Not translated: dropped and counted.
        let mut nock = Frame::udp("10.0.1.10", 5353, "10.0.1.1", sport);
        nock.l4 = loxilb_tests::packet::L4::Udp {
            sport: 5353,
            dport: sport,
            zero_csum: true,
        };
        let mut opts = Frame::udp("10.0.1.10", 5353, "10.0.1.1", sport);
        opts.options = vec![0x94, 0x04, 0, 0];
        let mut ext = Frame::udp(CLIENT, 47001, VIP, 54);
        ext.ext = vec![(60, opts_body(0))];
        for (what, f) in [
            ("IPv4 UDP without a checksum", nock),
            ("IPv4 with options", opts),
            ("IPv6 with an extension header", ext),
        ] {
            let before = stats(dp)["drop_nat64"];
            let (v, _) = run_xdp(dp, &f.bytes());
            assert_eq!(v, XDP_DROP, "{what}");
            assert_eq!(stats(dp)["drop_nat64"], before + 1, "{what}");
        }
    });
}

/// 10,000 concurrent NAT64 sessions to one endpoint, all from the node's
/// one address: each gets a source port (a third of the range in use;
/// source ports probed along one fixed stride ran out at ~8,000).
#[test]
fn nat64_ten_thousand_sessions_get_ports() {
    if !need_root("nat64_ten_thousand_sessions_get_ports") {
        return;
    }
    fib::with_datapath("nat64many", RULES, |dp| {
        let mut ports = std::collections::HashSet::new();
        for i in 60000..70000usize {
            let src = format!("fd00:64::{:x}:{:x}", (i >> 8) & 0x0f, i & 0xff);
            let f = Frame::tcp(&src, 1024 + (i >> 12) as u16, VIP, 84, SYN);
            let (v, out) = run_xdp(dp, &f.bytes());
            assert_eq!(v, XDP_REDIRECT, "flow {i}: {:?}", stats(dp));
            assert!(ports.insert(u16::from_be_bytes([out[34], out[35]])));
        }
        assert_eq!(stats(dp)["drop_snat_exhausted"], 0);
    });
}

/// The IPv6 address at the start of `b`, as text.
fn ip6_at(b: &[u8]) -> String {
    std::net::Ipv6Addr::from(<[u8; 16]>::try_from(&b[..16]).unwrap()).to_string()
}

/// The (source, destination, source port, destination port) an ICMPv6
/// error frame quotes (Ethernet, IPv6, ICMPv6 header, the quoted IPv6
/// header and ports).
fn quoted(f: &[u8]) -> (String, String, u16, u16) {
    let inner = &f[14 + 48..];
    (
        ip6_at(&inner[8..]),
        ip6_at(&inner[24..]),
        u16::from_be_bytes([inner[40], inner[41]]),
        u16::from_be_bytes([inner[42], inner[43]]),
    )
}

#[test]
fn icmpv6_echo_answered_errors_translated_nd_passed() {
    if !need_root("icmpv6_echo_answered_errors_translated_nd_passed") {
        return;
    }
    fib::with_datapath("icmp6", RULES, |dp| {
        use loxilb_tests::fib::verdict::XDP_TX;
        // Echo request to the VIP: answered in place.
        let req = icmp6_frame(CLIENT, VIP, 64, 128, 0, [0x12, 0x34, 0, 1], b"ping6");
        let mut want = icmp6_frame(VIP, CLIENT, 64, 129, 0, [0x12, 0x34, 0, 1], b"ping6");
        want[0..6].copy_from_slice(&req[6..12]);
        want[6..12].copy_from_slice(&req[0..6]);
        let (v, out) = run_xdp(dp, &req);
        assert_eq!(v, XDP_TX);
        expect_frame("echo reply", &out, &want);
        // Echo to another address, and neighbour solicitation: untouched.
        let other = icmp6_frame(CLIENT, "fd00:20::200", 64, 128, 0, [0; 4], b"x");
        assert_eq!(run_xdp(dp, &other), (XDP_PASS, other));
        let ns = icmp6_frame(CLIENT, "ff02::1:ff00:100", 255, 135, 0, [0; 4], &[0; 16]);
        assert_eq!(run_xdp(dp, &ns), (XDP_PASS, ns));
        // A session, then "packet too big" from a router on the endpoint
        // side about the translated packet: back to the client's view.
        let syn = Frame::tcp(CLIENT, 48000, VIP, 80, SYN);
        let (v, fwd) = run_xdp(dp, &syn.bytes());
        assert_eq!(v, XDP_REDIRECT);
        let mtu = 1280u32.to_be_bytes();
        let ptb = icmp6_frame("fd00:1::fe", CLIENT, 64, 2, 0, mtu, &quote6(&fwd));
        let (v, out) = run_xdp(dp, &ptb);
        assert_eq!(v, XDP_REDIRECT, "translated and forwarded to the client");
        assert!(icmp6_csum_ok(&out), "ICMPv6 checksum after translation");
        let ip = &out[14..];
        assert_eq!(ip6_at(&ip[24..]), CLIENT, "to the client");
        assert_eq!(ip6_at(&ip[8..]), "fd00:1::fe", "from the router still");
        assert_eq!(quoted(&out), (CLIENT.into(), VIP.into(), 48000, 80));
        // The endpoint itself reports: the error comes from the service.
        let unreach = icmp6_frame(EP1, CLIENT, 64, 1, 4, [0; 4], &quote6(&fwd));
        let (v, out) = run_xdp(dp, &unreach);
        assert_eq!(v, XDP_REDIRECT);
        assert!(icmp6_csum_ok(&out));
        assert_eq!(ip6_at(&out[14 + 8..]), VIP, "from the service");
        // An error about something never translated: untouched.
        let stray = Frame::tcp(CLIENT, 1, EP1, 2, SYN).bytes();
        let err = icmp6_frame("fd00:1::fe", CLIENT, 64, 1, 0, [0; 4], &quote6(&stray));
        assert_eq!(run_xdp(dp, &err), (XDP_PASS, err));
        let s = stats(dp);
        assert_eq!(
            (s["icmp_echo_replied"], s["icmp_err_xlated"]),
            (1, 2),
            "{s:?}"
        );
    });
}

/// A NAT66 DNAT session to an endpoint the index holds has one entry, as
/// an IPv4 one does: the IPv6 program hands the endpoint's packets to its
/// one-entry reply program, which translates a session's reply back from
/// the VIP (XDP and TC) and hands anything else back to be looked up by
/// its own tuple (a session made with two entries while the endpoint was
/// not indexed keeps working). ICMPv6 errors about a packet such a
/// session sent to its endpoint are translated back too.
#[test]
fn a_nat66_session_to_an_indexed_endpoint_has_one_entry() {
    if !need_root("a_nat66_session_to_an_indexed_endpoint_has_one_entry") {
        return;
    }
    let rules = "rules:\n  - {name: web6, vip: \"fd00:20::100\", port: 80, protocol: tcp, endpoints: [{ip: \"fd00:1::10\", port: 8080}, {ip: \"fd00:1::11\", port: 8080}]}\n";
    fib::with_datapath("one6", rules, |dp| {
        use loxilb_common::ct_state as st;
        let a = |s: &str| loxilb_common::addr_from_ip(s.parse().unwrap());
        let ix = dp.ep_index().unwrap();
        for ep in [EP1, EP2] {
            assert!(
                ix.iter()
                    .any(|(_, e)| e.addr == a(ep) && e.vip == a(VIP) && e.flags == 0),
                "{ep} not indexed: {ix:?}"
            );
        }
        let syn = Frame::tcp(CLIENT, 46000, VIP, 80, SYN);
        let synack = Frame::tcp(EP1, 8080, CLIENT, 46000, SYN | ACK);
        let ack = Frame::tcp(CLIENT, 46000, VIP, 80, ACK);
        let stray = Frame::tcp(EP2, 8080, CLIENT, 46000, ACK);
        let back = synack
            .with(VIP, 80, CLIENT, 46000)
            .routed(LB_TO_CLIENT_MAC, CLIENT_MAC);
        let cases = vec![
            Case {
                name: "SYN: DNAT to the first endpoint",
                input: syn.bytes(),
                expected: syn
                    .with(CLIENT, 46000, EP1, 8080)
                    .routed(LB_TO_EP_MAC, EP1_MAC)
                    .bytes(),
                verdict: XDP_REDIRECT,
            },
            Case {
                name: "SYN-ACK found through the index, back from the VIP",
                input: synack.bytes(),
                expected: back.bytes(),
                verdict: XDP_REDIRECT,
            },
            Case {
                name: "the client's ACK keeps its endpoint",
                input: ack.bytes(),
                expected: ack
                    .with(CLIENT, 46000, EP1, 8080)
                    .routed(LB_TO_EP_MAC, EP1_MAC)
                    .bytes(),
                verdict: XDP_REDIRECT,
            },
            Case {
                name: "the other endpoint's packet to the client: handed back, untouched",
                input: stray.bytes(),
                expected: stray.bytes(),
                verdict: XDP_PASS,
            },
            Case {
                name: "the reply again (the hand-back mark was used up)",
                input: synack.bytes(),
                expected: back.bytes(),
                verdict: XDP_REDIRECT,
            },
        ];
        check_with(dp, cases, run_xdp);
        let s = dp.sessions().unwrap();
        assert_eq!(s.len(), 1, "one entry for the session: {s:?}");
        let (k, v) = s[0];
        assert_eq!(
            (u16::from_be(k.sport), k.daddr, v.state),
            (46000, a(VIP), st::ONE)
        );
        assert_eq!((v.packets, v.rpackets), (2, 2));
        // The same reply through the TC hook.
        let (verdict, out) = run_tc(dp, &synack.bytes());
        assert_eq!(verdict, TC_ACT_REDIRECT, "tc verdict");
        expect_frame("TC reply", &out, &back.bytes());
        // ICMPv6 about the packet sent to the endpoint: from a router on
        // the endpoint's side, then from the endpoint itself.
        let (_, fwd) = run_xdp(dp, &ack.bytes());
        let ptb = icmp6_frame(
            "fd00:1::fe",
            CLIENT,
            64,
            2,
            0,
            1280u32.to_be_bytes(),
            &quote6(&fwd),
        );
        let (v, out) = run_xdp(dp, &ptb);
        assert_eq!(v, XDP_REDIRECT, "packet too big translated");
        assert!(icmp6_csum_ok(&out));
        assert_eq!(
            quoted(&out),
            (CLIENT.into(), VIP.into(), 46000, 80),
            "the quote in the client's view"
        );
        let unreach = icmp6_frame(EP1, CLIENT, 64, 1, 4, [0; 4], &quote6(&fwd));
        let (v, out) = run_xdp(dp, &unreach);
        assert_eq!(v, XDP_REDIRECT);
        assert!(icmp6_csum_ok(&out));
        assert_eq!(ip6_at(&out[14 + 8..]), VIP, "from the service");
        // A session made while its endpoint was not indexed has two
        // entries; once indexed again, its replies go to the one-entry
        // program, miss there and are found by their own tuple.
        let slot = loxilb_common::ep_index_slot(
            loxilb_common::addr_fold(&a(EP2)),
            8080u16.to_be(),
            loxilb_common::IPPROTO_TCP,
        );
        let held = ix.iter().find(|(s, _)| *s == slot).expect("EP2's slot").1;
        loxilb_agent::rules::RuleTable::put_ep_index(dp, slot, Default::default()).unwrap();
        let syn2 = Frame::tcp(CLIENT, 46001, VIP, 80, SYN);
        let (v, out) = run_xdp(dp, &syn2.bytes());
        assert_eq!(v, XDP_REDIRECT);
        expect_frame(
            "second SYN to the second endpoint",
            &out,
            &syn2
                .with(CLIENT, 46001, EP2, 8080)
                .routed(LB_TO_EP_MAC, EP2_MAC)
                .bytes(),
        );
        assert_eq!(dp.sessions().unwrap().len(), 3, "two entries for it");
        loxilb_agent::rules::RuleTable::put_ep_index(dp, slot, held).unwrap();
        let synack2 = Frame::tcp(EP2, 8080, CLIENT, 46001, SYN | ACK);
        for hook in ["xdp", "tc"] {
            let (verdict, out) = if hook == "xdp" {
                run_xdp(dp, &synack2.bytes())
            } else {
                run_tc(dp, &synack2.bytes())
            };
            assert_eq!(
                verdict,
                if hook == "xdp" {
                    XDP_REDIRECT
                } else {
                    TC_ACT_REDIRECT
                },
                "{hook}"
            );
            expect_frame(
                hook,
                &out,
                &synack2
                    .with(VIP, 80, CLIENT, 46001)
                    .routed(LB_TO_CLIENT_MAC, CLIENT_MAC)
                    .bytes(),
            );
        }
        // And the one-entry session's reply still finds its way.
        let (v, out) = run_xdp(dp, &synack.bytes());
        assert_eq!(v, XDP_REDIRECT);
        expect_frame("one-entry reply after a hand-back", &out, &back.bytes());
        let s = stats(dp);
        assert_eq!(s["new_session"], 2, "{s:?}");
        assert_eq!(s["icmp_err_xlated"], 2, "{s:?}");
    });
}
