//! SCTP packet tables through BPF_PROG_TEST_RUN: an association through
//! the VIP in default (DNAT) and full-NAT modes, IPv4 and IPv6, with the
//! CRC32c right after every port rewrite (and untouched when only
//! addresses change); ABORT and SHUTDOWN COMPLETE end the session;
//! malformed chunk lengths are dropped and counted.

use std::collections::HashMap;

use loxilb_agent::datapath::Datapath;
use loxilb_tests::fib::verdict::{TC_ACT_REDIRECT, XDP_DROP, XDP_REDIRECT};
use loxilb_tests::{
    fib::{self, run_tc, run_xdp, CLIENT_MAC, EP1_MAC, LB_TO_CLIENT_MAC, LB_TO_EP_MAC},
    need_root,
    packet::diff,
    sctp_packet::{frame_crc_ok, parse_frame, Chunk, SctpFrame, SctpPacket},
};

const RULES: &str = r#"
rules:
  - name: sctp
    vip: 20.0.0.100
    port: 3868
    protocol: sctp
    endpoints:
      - { ip: 10.0.1.10, port: 30868 }
  - name: same-port
    vip: 20.0.0.100
    port: 2905
    protocol: sctp
    endpoints:
      - { ip: 10.0.1.10, port: 2905 }
  - name: full
    vip: 20.0.0.100
    port: 3869
    protocol: sctp
    mode: fullnat
    endpoints:
      - { ip: 10.0.1.10, port: 30869 }
  - name: sctp6
    vip: "fd00:20::100"
    port: 3868
    protocol: sctp
    endpoints:
      - { ip: "fd00:1::10", port: 30868 }
"#;

const CLIENT: &str = "192.168.0.2";
const VIP: &str = "20.0.0.100";
const EP: &str = "10.0.1.10";

fn stats(dp: &Datapath) -> HashMap<&'static str, u64> {
    dp.stats().unwrap().into_iter().collect()
}

/// Run `input` and compare with `want` byte for byte; the output's CRC32c
/// must verify on its own too (the expected frame is built independently,
/// with its CRC computed over the whole packet).
fn expect(dp: &mut Datapath, what: &str, input: &SctpFrame, want: &SctpFrame, verdict: u32) {
    let (v, out) = run_xdp(dp, &input.bytes());
    assert_eq!(v, verdict, "{what}: verdict; counters {:?}", stats(dp));
    assert_eq!(out, want.bytes(), "{what}\n{}", diff(&out, &want.bytes()));
    assert!(frame_crc_ok(&out), "{what}: CRC32c of the output");
}

fn sessions(dp: &Datapath) -> usize {
    dp.sessions().unwrap().len()
}

#[test]
fn sctp_dnat_association_with_port_rewrite_and_crc() {
    if !need_root("sctp_dnat_association_with_port_rewrite_and_crc") {
        return;
    }
    fib::with_datapath("sctp", RULES, |dp| {
        let c: std::net::IpAddr = CLIENT.parse().unwrap();
        let init = SctpFrame::new(
            CLIENT,
            VIP,
            SctpPacket::new(5000, 3868, 0).chunk(Chunk::init(0x1111_1111, 100, &[c])),
        );
        expect(
            dp,
            "INIT to the VIP: DNAT, ports rewritten, CRC32c updated",
            &init,
            &init
                .with_addrs(CLIENT, EP)
                .with_ports(5000, 30868)
                .routed(LB_TO_EP_MAC, EP1_MAC),
            XDP_REDIRECT,
        );
        assert_eq!(sessions(dp), 2);
        let e: std::net::IpAddr = EP.parse().unwrap();
        let ack = SctpFrame::new(
            EP,
            CLIENT,
            SctpPacket::new(30868, 5000, 0x1111_1111).chunk(Chunk::init_ack(
                0x2222_2222,
                200,
                &[e],
                b"cookie-cookie-cookie",
            )),
        );
        expect(
            dp,
            "INIT-ACK back: source VIP:3868",
            &ack,
            &ack.with_addrs(VIP, CLIENT)
                .with_ports(3868, 5000)
                .routed(LB_TO_CLIENT_MAC, CLIENT_MAC),
            XDP_REDIRECT,
        );
        // DATA of several sizes (the CRC correction depends on the length
        // after the ports), bundled with a SACK.
        for (i, n) in [1usize, 3, 100, 1000].iter().enumerate() {
            let data = SctpFrame::new(
                CLIENT,
                VIP,
                SctpPacket::new(5000, 3868, 0x2222_2222)
                    .chunk(Chunk::sack(199, 65535))
                    .chunk(Chunk::data(101 + i as u32, 0, i as u16, 0, &vec![0x42; *n])),
            );
            expect(
                dp,
                &format!("DATA of {n} bytes"),
                &data,
                &data
                    .with_addrs(CLIENT, EP)
                    .with_ports(5000, 30868)
                    .routed(LB_TO_EP_MAC, EP1_MAC),
                XDP_REDIRECT,
            );
        }
        // The same through TC.
        let hb = SctpFrame::new(
            CLIENT,
            VIP,
            SctpPacket::new(5000, 3868, 0x2222_2222).chunk(Chunk::heartbeat(b"hb-info")),
        );
        let (v, out) = run_tc(dp, &hb.bytes());
        assert_eq!(v, TC_ACT_REDIRECT);
        let want = hb
            .with_addrs(CLIENT, EP)
            .with_ports(5000, 30868)
            .routed(LB_TO_EP_MAC, EP1_MAC)
            .bytes();
        assert_eq!(out, want, "TC heartbeat\n{}", diff(&out, &want));
        // ABORT ends the session: a new INIT on the tuple starts afresh.
        let abort = SctpFrame::new(
            CLIENT,
            VIP,
            SctpPacket::new(5000, 3868, 0x2222_2222).chunk(Chunk::abort(false)),
        );
        let (v, _) = run_xdp(dp, &abort.bytes());
        assert_eq!(v, XDP_REDIRECT, "the ABORT itself is delivered");
        for (_, val) in dp.sessions().unwrap() {
            assert_eq!(
                val.timeout_s,
                loxilb_common::CT_CLOSE_TIMEOUT_S,
                "ABORT closes both directions"
            );
        }
        let before = stats(dp)["new_session"];
        let (v, _) = run_xdp(dp, &init.bytes());
        assert_eq!(v, XDP_REDIRECT);
        assert_eq!(stats(dp)["new_session"], before + 1, "INIT after ABORT");
        // SHUTDOWN COMPLETE from the endpoint closes too.
        let sc = SctpFrame::new(
            EP,
            CLIENT,
            SctpPacket::new(30868, 5000, 0x1111_1111).chunk(Chunk::shutdown_complete(false)),
        );
        let (v, _) = run_xdp(dp, &sc.bytes());
        assert_eq!(v, XDP_REDIRECT);
        assert!(dp
            .sessions()
            .unwrap()
            .iter()
            .all(|(_, v)| v.timeout_s == loxilb_common::CT_CLOSE_TIMEOUT_S));
    });
}

#[test]
fn sctp_same_port_keeps_the_crc_and_fullnat_and_ipv6() {
    if !need_root("sctp_same_port_keeps_the_crc_and_fullnat_and_ipv6") {
        return;
    }
    fib::with_datapath("sctp2", RULES, |dp| {
        // Only addresses change: the SCTP bytes (CRC included) are untouched.
        let c: std::net::IpAddr = CLIENT.parse().unwrap();
        let init = SctpFrame::new(
            CLIENT,
            VIP,
            SctpPacket::new(2905, 2905, 0).chunk(Chunk::init(7, 1, &[c])),
        );
        let (v, out) = run_xdp(dp, &init.bytes());
        assert_eq!(v, XDP_REDIRECT);
        let p = parse_frame(&out).unwrap();
        let q = parse_frame(&init.bytes()).unwrap();
        assert_eq!(
            out[p.sctp_offset..],
            init.bytes()[q.sctp_offset..],
            "SCTP bytes unchanged"
        );
        // Full-NAT: source = the VIP with an allocated port.
        let init = SctpFrame::new(
            CLIENT,
            VIP,
            SctpPacket::new(5001, 3869, 0).chunk(Chunk::init(8, 1, &[c])),
        );
        let (v, out) = run_xdp(dp, &init.bytes());
        assert_eq!(v, XDP_REDIRECT);
        assert!(frame_crc_ok(&out));
        let p = parse_frame(&out).unwrap();
        let sport = u16::from_be_bytes([out[p.sctp_offset], out[p.sctp_offset + 1]]);
        assert!((32768..=60999).contains(&sport));
        assert_eq!((p.src, p.dst), (VIP.parse().unwrap(), EP.parse().unwrap()));
        // IPv6.
        let c6: std::net::IpAddr = "fd00:c::2".parse().unwrap();
        let init6 = SctpFrame::new(
            "fd00:c::2",
            "fd00:20::100",
            SctpPacket::new(5002, 3868, 0).chunk(Chunk::init(9, 1, &[c6])),
        );
        expect(
            dp,
            "IPv6 INIT",
            &init6,
            &init6
                .with_addrs("fd00:c::2", "fd00:1::10")
                .with_ports(5002, 30868)
                .routed(LB_TO_EP_MAC, EP1_MAC),
            XDP_REDIRECT,
        );
    });
}

#[test]
fn sctp_malformed_chunk_lengths_dropped_and_counted() {
    if !need_root("sctp_malformed_chunk_lengths_dropped_and_counted") {
        return;
    }
    fib::with_datapath("sctp3", RULES, |dp| {
        let bad = |c: Chunk| SctpFrame::new(CLIENT, VIP, SctpPacket::new(6000, 3868, 0).chunk(c));
        let cases = [
            (
                "chunk length 0",
                bad(Chunk::data(1, 0, 0, 0, b"abcd").with_length(0)),
            ),
            (
                "chunk length 3",
                bad(Chunk::data(1, 0, 0, 0, b"abcd").with_length(3)),
            ),
            (
                "chunk length past the packet",
                bad(Chunk::data(1, 0, 0, 0, b"abcd").with_length(400)),
            ),
        ];
        for (what, f) in cases {
            let before = stats(dp)["drop_sctp_malformed"];
            let (v, _) = run_xdp(dp, &f.bytes());
            assert_eq!(v, XDP_DROP, "{what}");
            assert_eq!(stats(dp)["drop_sctp_malformed"], before + 1, "{what}");
        }
        // A second chunk whose length runs past the end, after a good one.
        let two = SctpFrame::new(
            CLIENT,
            VIP,
            SctpPacket::new(6000, 3868, 0)
                .chunk(Chunk::sack(1, 100))
                .chunk(Chunk::data(1, 0, 0, 0, b"abcd").with_length(100)),
        );
        let (v, _) = run_xdp(dp, &two.bytes());
        assert_eq!(v, XDP_DROP, "second chunk too long");
        assert_eq!(stats(dp)["new_session"], 0, "nothing malformed was served");
    });
}

const MH_RULES: &str = r#"
rules:
  - name: mh
    vip: 20.0.0.100
    secondary_vips: [20.0.0.101, 20.0.0.102]
    port: 3868
    protocol: sctp
    endpoints:
      - { ip: 10.0.1.10, port: 30868 }
"#;

/// Multihoming in default (DNAT) mode: the INIT-ACK's address parameters
/// become the rule's VIPs (CRC32c right), a packet of the association on a
/// secondary VIP goes to the endpoint address paired with it, and the
/// endpoint's packets from or to its other addresses come back from the
/// paired VIP.
#[test]
fn sctp_multihoming_init_ack_rewrite_and_paths() {
    if !need_root("sctp_multihoming_init_ack_rewrite_and_paths") {
        return;
    }
    fib::with_datapath("sctpmh", MH_RULES, |dp| {
        use loxilb_tests::fib::{verdict::XDP_PASS, EP2_MAC};
        let ip = |s: &str| -> std::net::IpAddr { s.parse().unwrap() };
        let (c1, c2) = ("192.168.0.2", "192.168.0.3");
        let (e1, e2) = ("10.0.1.10", "10.0.1.11");
        let (v1, v2) = ("20.0.0.100", "20.0.0.101");
        let (ctag, etag) = (0x0c11_e000u32, 0x0e0d_0000u32);
        // INIT from c1 to the primary VIP, listing both client addresses.
        let init = SctpFrame::new(
            c1,
            v1,
            SctpPacket::new(5000, 3868, 0).chunk(Chunk::init(ctag, 1, &[ip(c1), ip(c2)])),
        );
        let (v, out) = run_xdp(dp, &init.bytes());
        assert_eq!(v, XDP_REDIRECT, "INIT; counters {:?}", stats(dp));
        let p = parse_frame(&out).unwrap();
        assert_eq!((p.src, p.dst), (ip(c1), ip(e1)), "DNAT");
        assert_eq!(
            p.sctp.addresses(),
            vec![ip(c1), ip(c2)],
            "INIT params untouched"
        );
        assert!(p.sctp.crc_ok);
        // The endpoint's packets to c2 already have their way back.
        let to_c2 = dp.sessions().unwrap().into_iter().any(|(k, v)| {
            loxilb_common::ip_from_addr(&k.saddr) == ip(e1)
                && loxilb_common::ip_from_addr(&k.daddr) == ip(c2)
                && loxilb_common::ip_from_addr(&v.xsaddr) == ip(v1)
        });
        assert!(to_c2, "reply session e1 -> c2 made at the INIT");
        // INIT-ACK from e1 listing both endpoint addresses.
        let ack = SctpFrame::new(
            e1,
            c1,
            SctpPacket::new(30868, 5000, ctag).chunk(Chunk::init_ack(
                etag,
                1,
                &[ip(e1), ip(e2)],
                b"a-state-cookie-of-some-length",
            )),
        );
        let (v, out) = run_xdp(dp, &ack.bytes());
        assert_eq!(v, XDP_REDIRECT, "INIT-ACK");
        let p = parse_frame(&out).unwrap();
        assert_eq!((p.src, p.dst), (ip(v1), ip(c1)));
        assert_eq!(
            p.sctp.addresses(),
            vec![ip(v1), ip(v2)],
            "the client learns the VIPs, never the endpoint's addresses"
        );
        assert!(p.sctp.crc_ok, "CRC32c after the address rewrite");
        assert_eq!(p.sctp.cookie().unwrap(), b"a-state-cookie-of-some-length");
        // DATA of the association from c1 to the secondary VIP: to e2.
        let data = SctpFrame::new(
            c1,
            v2,
            SctpPacket::new(5000, 3868, etag).chunk(Chunk::data(2, 0, 0, 0, b"on path 2")),
        );
        expect(
            dp,
            "DATA on the secondary VIP",
            &data,
            &data
                .with_addrs(c1, e2)
                .with_ports(5000, 30868)
                .routed(LB_TO_EP_MAC, EP2_MAC),
            XDP_REDIRECT,
        );
        // The endpoint answers from e2: seen as v2.
        let hb = SctpFrame::new(
            e2,
            c1,
            SctpPacket::new(30868, 5000, ctag).chunk(Chunk::heartbeat(b"hb")),
        );
        expect(
            dp,
            "endpoint's second address, seen as the second VIP",
            &hb,
            &hb.with_addrs(v2, c1)
                .with_ports(3868, 5000)
                .routed(LB_TO_CLIENT_MAC, CLIENT_MAC),
            XDP_REDIRECT,
        );
        // From e1 to the client's second address: seen as v1 (no neighbour
        // for c2 in this namespace: translated, then to the stack).
        let hb2 = SctpFrame::new(
            e1,
            c2,
            SctpPacket::new(30868, 5000, ctag).chunk(Chunk::heartbeat(b"hb2")),
        );
        let (v, out) = run_xdp(dp, &hb2.bytes());
        assert_eq!(v, XDP_PASS);
        let p = parse_frame(&out).unwrap();
        assert_eq!((p.src, p.dst), (ip(v1), ip(c2)));
        assert!(p.sctp.crc_ok);
        // An unknown tag on a secondary VIP is a new flow like any other.
        let stray = SctpFrame::new(
            c1,
            v2,
            SctpPacket::new(5001, 3868, 0x5555).chunk(Chunk::data(2, 0, 0, 0, b"?")),
        );
        let (v, out) = run_xdp(dp, &stray.bytes());
        assert_eq!(v, XDP_REDIRECT);
        assert_eq!(parse_frame(&out).unwrap().dst, ip(e1));
    });
}
