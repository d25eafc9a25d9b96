//! NAT modes as packet tables through BPF_PROG_TEST_RUN: full-NAT, onearm,
//! L2 DSR and IPIP DSR, both directions where there are two, source-port
//! allocation and its exhaustion, and a mode switch on a live rule.

use loxilb_tests::fib::verdict::{XDP_DROP, XDP_PASS, XDP_REDIRECT};
use std::collections::{HashMap, HashSet};

use loxilb_common::{prog_names, GlobalCfg};
use loxilb_tests::tables::expect_frame;
use loxilb_tests::{
    fib::{
        dst_of, run_prog, run_xdp, with_datapath, with_datapath_rules, CLIENT_MAC, EP1_MAC,
        LB_TO_CLIENT_MAC, LB_TO_EP_MAC,
    },
    need_root,
    netns::sh,
    packet::{diff, ipip_wrap, Frame, ACK, RST, SYN},
};

fn rule(mode: &str, ep_port: u16) -> String {
    format!("rules:\n  - {{vip: 20.0.0.100, port: 80, protocol: tcp, mode: {mode}, endpoints: [{{ip: 10.0.1.10, port: {ep_port}}}]}}\n  - {{vip: 20.0.0.100, port: 53, protocol: udp, mode: {mode}, endpoints: [{{ip: 10.0.1.10, port: {}}}]}}\n", if mode.starts_with("dsr") { 53 } else { 5353 })
}

fn addr(ip: &str) -> loxilb_common::Addr {
    loxilb_common::addr_from_ip(ip.parse().unwrap())
}

fn src_port(frame: &[u8]) -> u16 {
    u16::from_be_bytes([frame[34], frame[35]])
}

fn set_cfg(dp: &mut loxilb_agent::datapath::Datapath, f: impl FnOnce(&mut GlobalCfg)) {
    let mut c = dp.config().unwrap();
    f(&mut c);
    dp.set_config(c).unwrap();
}

/// Forward and reply of a source-NAT mode whose source is `snat_src`.
fn snat_round_trip(dp: &mut loxilb_agent::datapath::Datapath, snat_src: &str, sport: u16) {
    for (proto, vport, ep_port) in [("tcp", 80u16, 8080u16), ("udp", 53, 5353)] {
        let f = if proto == "tcp" {
            Frame::tcp("192.168.0.2", sport, "20.0.0.100", vport, SYN)
        } else {
            Frame::udp("192.168.0.2", sport, "20.0.0.100", vport)
        };
        let (v, out) = run_xdp(dp, &f.bytes());
        assert_eq!(v, XDP_REDIRECT, "{proto} forward");
        let port = src_port(&out);
        assert!(
            (32768..=60999).contains(&port),
            "{proto}: allocated port {port}"
        );
        let want = f
            .with(snat_src, port, "10.0.1.10", ep_port)
            .routed(LB_TO_EP_MAC, EP1_MAC)
            .bytes();
        expect_frame(&format!("{proto} forward bytes"), &out, &want);
        // The endpoint answers the translated source.
        let r = if proto == "tcp" {
            Frame::tcp("10.0.1.10", ep_port, snat_src, port, SYN | ACK)
        } else {
            Frame::udp("10.0.1.10", ep_port, snat_src, port)
        };
        let (v, out) = run_xdp(dp, &r.bytes());
        assert_eq!(v, XDP_REDIRECT, "{proto} reply");
        let want = r
            .with("20.0.0.100", vport, "192.168.0.2", sport)
            .routed(LB_TO_CLIENT_MAC, CLIENT_MAC)
            .bytes();
        expect_frame(&format!("{proto} reply bytes"), &out, &want);
    }
}

#[test]
fn fullnat_source_is_the_vip_or_the_configured_address() {
    if !need_root("fullnat_source_is_the_vip_or_the_configured_address") {
        return;
    }
    with_datapath("fnat", &rule("fullnat", 8080), |dp| {
        snat_round_trip(dp, "20.0.0.100", 40000);
        set_cfg(dp, |c| c.fullnat_src = u32::from_ne_bytes([10, 0, 1, 1]));
        snat_round_trip(dp, "10.0.1.1", 40001);
    });
}

#[test]
fn onearm_source_is_the_nodes_address_toward_the_endpoint() {
    if !need_root("onearm_source_is_the_nodes_address_toward_the_endpoint") {
        return;
    }
    with_datapath("onearm", &rule("onearm", 8080), |dp| {
        snat_round_trip(dp, "10.0.1.1", 40000);
    });
}

#[test]
fn source_ports_are_distinct_exhaustion_drops_and_ended_sessions_free_them() {
    if !need_root("source_ports_are_distinct_exhaustion_drops_and_ended_sessions_free_them") {
        return;
    }
    with_datapath("ports", &rule("fullnat", 8080), |dp| {
        let mut ports = HashSet::new();
        for i in 0..2000u16 {
            let f = Frame::tcp("192.168.0.2", 10000 + i, "20.0.0.100", 80, SYN);
            let (v, out) = run_xdp(dp, &f.bytes());
            assert_eq!(v, XDP_REDIRECT);
            assert!(ports.insert(src_port(&out)), "port reused while live");
        }
        assert_eq!(ports.len(), 2000);
        dp.clear_sessions().unwrap();
        // A tiny range: ten sessions fit, the eleventh is dropped and counted.
        set_cfg(dp, |c| (c.snat_port_lo, c.snat_port_hi) = (40000, 40009));
        let mut got = HashSet::new();
        for i in 0..10u16 {
            let (v, out) = run_xdp(
                dp,
                &Frame::tcp("192.168.0.2", 20000 + i, "20.0.0.100", 80, SYN).bytes(),
            );
            if v == XDP_REDIRECT {
                got.insert(src_port(&out));
            }
        }
        // 16 hashed tries per session: the last few free ports may be
        // missed; never a reuse.
        assert!(got.len() >= 8, "{got:?}");
        assert!(got.iter().all(|p| (40000..=40009).contains(p)));
        for i in 10..40u16 {
            let f = Frame::tcp("192.168.0.2", 20000 + i, "20.0.0.100", 80, SYN);
            let (v, _) = run_xdp(dp, &f.bytes());
            if got.len() == 10 {
                assert_eq!(v, XDP_DROP, "no free port must mean a drop");
            }
            if v == XDP_DROP {
                break;
            }
        }
        let stats: HashMap<_, _> = dp.stats().unwrap().into_iter().collect();
        assert!(stats["drop_snat_exhausted"] >= 1);
        // Sessions that ended (idle past their timeout) give their ports
        // back to the next new session.
        for (k, mut v) in dp.sessions().unwrap() {
            v.last_seen_ns = 1;
            v.timeout_s = 1;
            dp.insert_session(k, v).unwrap();
        }
        let (v, out) = run_xdp(
            dp,
            &Frame::tcp("192.168.0.2", 30000, "20.0.0.100", 80, SYN).bytes(),
        );
        assert_eq!(v, XDP_REDIRECT, "an ended session's port is reused");
        assert!((40000..=40009).contains(&src_port(&out)));
    });
}

#[test]
fn dsr_l2_rewrites_only_the_destination_mac() {
    if !need_root("dsr_l2_rewrites_only_the_destination_mac") {
        return;
    }
    let rules = rule("dsr", 80)
        + "  - {vip: 20.0.0.100, port: 81, protocol: tcp, mode: dsr, endpoints: [{ip: 10.0.9.5, port: 81}]}\n";
    with_datapath_rules("dsr", &rules, |dp, _| {
        // 10.0.9.0/24 sits behind a router (10.0.1.11).
        sh(&["ip", "route", "add", "10.0.9.0/24", "via", "10.0.1.11"]).unwrap();
        let f = Frame::tcp("192.168.0.2", 40000, "20.0.0.100", 80, SYN);
        let mut want = f.bytes();
        want[0..6].copy_from_slice(&EP1_MAC);
        want[6..12].copy_from_slice(&LB_TO_EP_MAC);
        let (v, out) = run_xdp(dp, &f.bytes());
        assert_eq!(v, XDP_REDIRECT);
        assert_eq!(
            out,
            want,
            "only MACs change, TTL included\n{}",
            diff(&out, &want)
        );
        // established packet: same
        let a = Frame::tcp("192.168.0.2", 40000, "20.0.0.100", 80, ACK);
        let mut want = a.bytes();
        want[0..6].copy_from_slice(&EP1_MAC);
        want[6..12].copy_from_slice(&LB_TO_EP_MAC);
        assert_eq!(run_xdp(dp, &a.bytes()), (XDP_REDIRECT, want));
        // one entry per session: no reply direction in DSR; it holds the
        // endpoint as its translated destination, no outer source.
        let s = dp.sessions().unwrap();
        assert_eq!(s.len(), 1);
        let v = s[0].1;
        assert_eq!(v.dsr_endpoint(), Some(addr("10.0.1.10")), "{v:?}");
        assert_eq!((v.xsaddr, v.xdport), ([0; 4], 80u16.to_be()), "{v:?}");
        // Behind a router: refused, counted.
        let g = Frame::tcp("192.168.0.2", 40001, "20.0.0.100", 81, SYN);
        assert_eq!(run_xdp(dp, &g.bytes()).0, XDP_DROP);
        let stats: HashMap<_, _> = dp.stats().unwrap().into_iter().collect();
        assert_eq!(stats["drop_dsr_no_l2"], 1);
        // A client RST closes the one-way session.
        run_xdp(
            dp,
            &Frame::tcp("192.168.0.2", 40000, "20.0.0.100", 80, RST).bytes(),
        );
        let s = dp.sessions().unwrap();
        assert!(
            s.iter()
                .all(|(_, v)| v.timeout_s == loxilb_common::CT_CLOSE_TIMEOUT_S),
            "{s:?}"
        );
    });
}

#[test]
fn dsr_ipip_encapsulates_and_the_decapsulator_restores_the_packet() {
    if !need_root("dsr_ipip_encapsulates_and_the_decapsulator_restores_the_packet") {
        return;
    }
    with_datapath("ipip", &rule("dsr-ipip", 80), |dp| {
        for f in [
            Frame::tcp("192.168.0.2", 40000, "20.0.0.100", 80, SYN),
            Frame::tcp("192.168.0.2", 40000, "20.0.0.100", 80, ACK),
            Frame::udp("192.168.0.2", 5000, "20.0.0.100", 53),
        ] {
            let (v, out) = run_xdp(dp, &f.bytes());
            assert_eq!(v, XDP_REDIRECT);
            let want = ipip_wrap(&f.bytes(), "10.0.1.1", "10.0.1.10", LB_TO_EP_MAC, EP1_MAC);
            expect_frame("IPIP-encapsulated", &out, &want);
            // What the endpoint's decapsulator makes of it: the original
            // packet, as the endpoint's stack must see it.
            let (v, inner) = run_prog(dp, prog_names::XDP_DECAP, &out);
            assert_eq!(v, XDP_PASS);
            let mut orig = f.bytes();
            orig[0..6].copy_from_slice(&EP1_MAC);
            orig[6..12].copy_from_slice(&LB_TO_EP_MAC);
            expect_frame("decapsulated", &inner, &orig);
        }
        // The session holds its endpoint, and the outer source cached with
        // its next hop, which its packets then take from there.
        let (k, v) = *dp
            .sessions()
            .unwrap()
            .iter()
            .find(|(k, _)| k.sport == 40000u16.to_be())
            .unwrap();
        assert_eq!(v.dsr_endpoint(), Some(addr("10.0.1.10")), "{v:?}");
        assert_eq!(v.xsaddr, addr("10.0.1.1"), "{v:?}");
        assert_ne!(v.nh.ifindex, 0, "{v:?}");
        dp.insert_session(
            k,
            loxilb_common::CtVal {
                xsaddr: addr("10.0.1.99"),
                ..v
            },
        )
        .unwrap();
        let f = Frame::tcp("192.168.0.2", 40000, "20.0.0.100", 80, ACK);
        let (v, out) = run_xdp(dp, &f.bytes());
        assert_eq!(v, XDP_REDIRECT);
        let want = ipip_wrap(&f.bytes(), "10.0.1.99", "10.0.1.10", LB_TO_EP_MAC, EP1_MAC);
        expect_frame("IPIP, the cached outer source", &out, &want);
        // Non-IPIP traffic passes the decapsulator untouched.
        let plain = Frame::tcp("192.168.0.2", 1, "10.0.1.10", 2, SYN).bytes();
        assert_eq!(
            run_prog(dp, prog_names::XDP_DECAP, &plain),
            (XDP_PASS, plain)
        );
    });
}

#[test]
fn mode_switch_on_a_live_rule_applies_to_new_sessions_only() {
    if !need_root("mode_switch_on_a_live_rule_applies_to_new_sessions_only") {
        return;
    }
    with_datapath_rules("switch", &rule("default", 8080), |dp, rules| {
        let (_, out) = run_xdp(
            dp,
            &Frame::tcp("192.168.0.2", 40000, "20.0.0.100", 80, SYN).bytes(),
        );
        assert_eq!(
            &out[26..30],
            &[192, 168, 0, 2],
            "DNAT keeps the client address"
        );
        let fullnat = loxilb_agent::config::parse("r", &rule("fullnat", 8080)).unwrap();
        let rep = rules.apply(&fullnat, dp).unwrap();
        assert_eq!(rep.updated.len(), 2);
        // The open session carries on in its old mode ...
        let (_, out) = run_xdp(
            dp,
            &Frame::tcp("192.168.0.2", 40000, "20.0.0.100", 80, ACK).bytes(),
        );
        assert_eq!(&out[26..30], &[192, 168, 0, 2]);
        assert_eq!(dst_of(&out), ("10.0.1.10".parse().unwrap(), 8080));
        // ... new ones take the new mode.
        let (_, out) = run_xdp(
            dp,
            &Frame::tcp("192.168.0.2", 40001, "20.0.0.100", 80, SYN).bytes(),
        );
        assert_eq!(&out[26..30], &[20, 0, 0, 100], "full-NAT source");
    });
}
