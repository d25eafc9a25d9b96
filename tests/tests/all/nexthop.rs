//! The next hop kept per endpoint (`LB_EP_NH`), through BPF_PROG_TEST_RUN:
//! a new session's first packet fills it from the FIB and the next new
//! session to that endpoint takes it from there (no FIB lookup) — but only
//! for the same address, the same ingress device, a packet no longer than
//! the one the FIB checked, before it expires, and while the agent finds
//! the node's routing plain (a policy rule turns it off). A session's
//! second packet caches it in the session's own entry. L2 DSR uses it too,
//! when the next hop kept is the endpoint itself. The source address of a
//! new onearm or NAT64 session is kept the same way (`LB_EP_SRC`).

use loxilb_common::{cfg_flags, ep_nh_flags, v4_mapped, EpNh, EpSrc};
use loxilb_tests::fib::verdict::XDP_REDIRECT;
use loxilb_tests::{
    fib::{run_xdp, with_datapath, EP1_MAC, LB_TO_EP_MAC},
    need_root,
    netns::sh,
    packet::{Frame, ACK, SYN},
};

const RULE: &str = "rules:\n  - {vip: 20.0.0.100, port: 80, protocol: tcp, endpoints: [{ip: 10.0.1.10, port: 8080}]}\n";

/// A MAC no neighbour has: a frame sent to it took the kept next hop.
const KEPT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x99, 0x99];

fn words(dst: [u8; 6], src: [u8; 6]) -> [u16; 6] {
    let w = |m: [u8; 6], i: usize| u16::from_ne_bytes([m[2 * i], m[2 * i + 1]]);
    [
        w(dst, 0),
        w(dst, 1),
        w(dst, 2),
        w(src, 0),
        w(src, 1),
        w(src, 2),
    ]
}

fn ep_addr(ip: [u8; 4]) -> loxilb_common::Addr {
    v4_mapped(u32::from_ne_bytes(ip))
}

/// The FIB's answer `filled` with a MAC no neighbour has, never expiring:
/// a frame that leaves with it took the kept next hop.
fn kept_from(filled: EpNh) -> EpNh {
    EpNh {
        macs: words(KEPT_MAC, LB_TO_EP_MAC),
        expiry_ns: u64::MAX,
        ..filled
    }
}

/// Add (`on`) or delete a policy rule (from the clients, to an empty
/// table), after which the agent finds the node's routing not plain, and
/// let the agent check the routing.
fn policy_rule(dp: &mut loxilb_agent::datapath::Datapath, on: bool) {
    let verb = if on { "add" } else { "del" };
    sh(&[
        "ip",
        "rule",
        verb,
        "from",
        "192.168.0.0/24",
        "table",
        "100",
        "priority",
        "100",
    ])
    .unwrap();
    dp.check_routing().unwrap();
}

/// A new session's SYN from client port `sport` (`pad` more payload
/// bytes): the destination MAC it leaves with.
fn new_flow_mac(dp: &mut loxilb_agent::datapath::Datapath, sport: u16, pad: usize) -> [u8; 6] {
    let mut f = Frame::tcp("192.168.0.2", sport, "20.0.0.100", 80, SYN);
    f.payload.extend(std::iter::repeat_n(b'x', pad));
    let (v, out) = run_xdp(dp, &f.bytes());
    assert_eq!(v, XDP_REDIRECT, "port {sport}");
    out[0..6].try_into().unwrap()
}

/// An ACK of the session from client port `sport`: the destination MAC it
/// leaves with.
fn ack_mac(dp: &mut loxilb_agent::datapath::Datapath, sport: u16) -> [u8; 6] {
    let f = Frame::tcp("192.168.0.2", sport, "20.0.0.100", 80, ACK);
    let (v, out) = run_xdp(dp, &f.bytes());
    assert_eq!(v, XDP_REDIRECT, "ACK from port {sport}");
    out[0..6].try_into().unwrap()
}

#[test]
fn a_new_session_takes_the_next_hop_kept_for_its_endpoint_when_it_may() {
    if !need_root("a_new_session_takes_the_next_hop_kept_for_its_endpoint_when_it_may") {
        return;
    }
    with_datapath("epnh", RULE, |dp| {
        let idx = dp.endpoints().unwrap().values().next().unwrap().stat_idx;
        assert_eq!(dp.ep_nh(idx).unwrap(), EpNh::default(), "empty at first");
        // The first new session asks the FIB and keeps its answer.
        assert_eq!(new_flow_mac(dp, 40000, 0), EP1_MAC);
        let filled = dp.ep_nh(idx).unwrap();
        assert_eq!(filled.dst, ep_addr([10, 0, 1, 10]));
        assert_eq!(filled.macs, words(EP1_MAC, LB_TO_EP_MAC));
        assert_ne!(filled.ifindex, 0);
        // IPv4 20 + TCP 20 + "hello".
        assert_eq!(filled.max_len, 45);
        assert_eq!(
            filled.flags,
            ep_nh_flags::DIRECT,
            "on the endpoint's segment"
        );
        assert!(filled.expiry_ns > 0);

        // The kept entry is what the next new session uses: one with a
        // MAC no neighbour has shows it was not asked again.
        let kept = kept_from(filled);
        dp.set_ep_nh(idx, kept).unwrap();
        assert_eq!(
            new_flow_mac(dp, 40001, 0),
            KEPT_MAC,
            "taken from the kept next hop"
        );
        // The session's next packet finds no next hop in its own entry
        // (the first was not read back to store one): it takes the kept
        // one too and caches it in the entry, where the packets after it
        // find it whatever the kept one becomes.
        assert_eq!(ack_mac(dp, 40001), KEPT_MAC, "the session's second packet");
        dp.set_ep_nh(idx, EpNh::default()).unwrap();
        assert_eq!(ack_mac(dp, 40001), KEPT_MAC, "cached in the session");
        dp.set_ep_nh(idx, kept).unwrap();

        // Not for a longer packet than the FIB checked: asked again, and
        // the answer kept with the longer length.
        assert_eq!(new_flow_mac(dp, 40002, 100), EP1_MAC, "a longer packet");
        let again = dp.ep_nh(idx).unwrap();
        assert_eq!(
            (again.macs, again.max_len),
            (words(EP1_MAC, LB_TO_EP_MAC), 145)
        );
        // ... and a shorter one then fits the same answer.
        dp.set_ep_nh(
            idx,
            EpNh {
                max_len: 145,
                ..kept
            },
        )
        .unwrap();
        assert_eq!(new_flow_mac(dp, 40003, 50), KEPT_MAC, "a shorter packet");

        // Not for another address (the slot was reused), another ingress
        // device, nor once it expired.
        for (why, bad) in [
            (
                "another endpoint's",
                EpNh {
                    dst: ep_addr([10, 0, 1, 99]),
                    ..kept
                },
            ),
            (
                "another device's",
                EpNh {
                    in_ifindex: kept.in_ifindex + 1000,
                    ..kept
                },
            ),
            (
                "expired",
                EpNh {
                    expiry_ns: 1,
                    ..kept
                },
            ),
        ] {
            dp.set_ep_nh(idx, bad).unwrap();
            assert_eq!(new_flow_mac(dp, 40010, 0), EP1_MAC, "{why} entry taken");
            assert_eq!(
                dp.ep_nh(idx).unwrap().macs,
                words(EP1_MAC, LB_TO_EP_MAC),
                "{why} entry: the FIB's answer kept instead"
            );
            // The next new session to it can take the answer kept.
            let mut c = dp.ep_nh(idx).unwrap();
            c.macs = words(KEPT_MAC, LB_TO_EP_MAC);
            dp.set_ep_nh(idx, c).unwrap();
            assert_eq!(
                new_flow_mac(dp, 40011, 0),
                KEPT_MAC,
                "after the {why} entry"
            );
            // (the two sessions end, so the ports can be used again)
            dp.clear_sessions().unwrap();
        }

        // A policy rule: the FIB's answer may depend on more than the
        // destination, so the agent turns the kept next hops off and every
        // new session asks the FIB.
        policy_rule(dp, true);
        assert_eq!(dp.config().unwrap().flags & cfg_flags::EP_NH_CACHE, 0);
        dp.set_ep_nh(idx, kept).unwrap();
        assert_eq!(new_flow_mac(dp, 40020, 0), EP1_MAC, "with a policy rule");
        assert_eq!(
            ack_mac(dp, 40020),
            EP1_MAC,
            "its second packet asks the FIB too"
        );
        assert_eq!(dp.ep_nh(idx).unwrap(), kept, "nothing kept meanwhile");
        policy_rule(dp, false);
        assert_ne!(dp.config().unwrap().flags & cfg_flags::EP_NH_CACHE, 0);
        assert_eq!(new_flow_mac(dp, 40021, 0), KEPT_MAC, "the rule gone");

        // A multipath route: off too.
        sh(&[
            "ip",
            "route",
            "add",
            "10.9.0.0/24",
            "nexthop",
            "via",
            "10.0.1.10",
            "nexthop",
            "via",
            "10.0.1.11",
        ])
        .unwrap();
        dp.check_routing().unwrap();
        assert_eq!(dp.config().unwrap().flags & cfg_flags::EP_NH_CACHE, 0);
        assert_eq!(
            new_flow_mac(dp, 40030, 0),
            EP1_MAC,
            "with a multipath route"
        );
    });
}

const DSR_RULE: &str = "rules:\n  - {vip: 20.0.0.100, port: 83, protocol: tcp, mode: dsr, endpoints: [{ip: 10.0.1.10, port: 83}]}\n";

/// A DSR session's packet from client port `sport` (`flags`): the
/// destination MAC it leaves with (the frame otherwise untouched).
fn dsr_mac(dp: &mut loxilb_agent::datapath::Datapath, sport: u16, flags: u8) -> [u8; 6] {
    let f = Frame::tcp("192.168.0.2", sport, "20.0.0.100", 83, flags);
    let (v, out) = run_xdp(dp, &f.bytes());
    assert_eq!(v, XDP_REDIRECT, "DSR, port {sport}");
    assert_eq!(out[14..], f.bytes()[14..], "DSR leaves the IP packet alone");
    out[0..6].try_into().unwrap()
}

#[test]
fn a_new_dsr_session_takes_the_next_hop_kept_for_its_endpoint_only_when_it_is_the_endpoint() {
    if !need_root(
        "a_new_dsr_session_takes_the_next_hop_kept_for_its_endpoint_only_when_it_is_the_endpoint",
    ) {
        return;
    }
    with_datapath("epnh-dsr", DSR_RULE, |dp| {
        let idx = dp.endpoints().unwrap().values().next().unwrap().stat_idx;
        assert_eq!(dp.ep_nh(idx).unwrap(), EpNh::default(), "empty at first");
        // The first new session asks the FIB and keeps its answer: the
        // endpoint itself, on its segment.
        assert_eq!(dsr_mac(dp, 41000, SYN), EP1_MAC);
        let filled = dp.ep_nh(idx).unwrap();
        assert_eq!(filled.dst, ep_addr([10, 0, 1, 10]));
        assert_eq!(filled.macs, words(EP1_MAC, LB_TO_EP_MAC));
        assert_eq!(filled.flags, ep_nh_flags::DIRECT);
        // The next new session takes it (a MAC no neighbour has shows the
        // FIB was not asked), and so does the session's second packet,
        // which caches it in the session.
        let kept = kept_from(filled);
        dp.set_ep_nh(idx, kept).unwrap();
        assert_eq!(
            dsr_mac(dp, 41001, SYN),
            KEPT_MAC,
            "taken from the kept next hop"
        );
        assert_eq!(
            dsr_mac(dp, 41001, ACK),
            KEPT_MAC,
            "the session's second packet"
        );
        dp.set_ep_nh(idx, EpNh::default()).unwrap();
        assert_eq!(dsr_mac(dp, 41001, ACK), KEPT_MAC, "cached in the session");
        // A next hop that is not the endpoint (a router on the way, as a NAT
        // session toward it may have kept) is not taken: the frame, still
        // addressed to the VIP, would go to the router. The FIB is asked,
        // and its answer kept.
        dp.set_ep_nh(idx, EpNh { flags: 0, ..kept }).unwrap();
        assert_eq!(
            dsr_mac(dp, 41002, SYN),
            EP1_MAC,
            "a next hop not the endpoint"
        );
        let again = dp.ep_nh(idx).unwrap();
        assert_eq!(
            (again.macs, again.flags),
            (words(EP1_MAC, LB_TO_EP_MAC), ep_nh_flags::DIRECT)
        );
    });
}

// The source kept per endpoint (`LB_EP_SRC`): a new onearm (or NAT64)
// session's source address, the node's own toward the endpoint, is the
// FIB's answer kept by the last new session to that endpoint, under the
// same conditions as the next hop.

const ONEARM_RULE: &str = "rules:\n  - {vip: 20.0.0.100, port: 81, protocol: tcp, mode: onearm, endpoints: [{ip: 10.0.1.10, port: 8081}]}\n";

/// A new onearm session's SYN from client port `sport`: the source address
/// it leaves with.
fn onearm_src(dp: &mut loxilb_agent::datapath::Datapath, sport: u16) -> [u8; 4] {
    let f = Frame::tcp("192.168.0.2", sport, "20.0.0.100", 81, SYN);
    let (v, out) = run_xdp(dp, &f.bytes());
    assert_eq!(v, XDP_REDIRECT, "port {sport}");
    out[26..30].try_into().unwrap()
}

#[test]
fn a_new_onearm_session_takes_the_source_kept_for_its_endpoint_when_it_may() {
    if !need_root("a_new_onearm_session_takes_the_source_kept_for_its_endpoint_when_it_may") {
        return;
    }
    with_datapath("epsrc", ONEARM_RULE, |dp| {
        let idx = dp.endpoints().unwrap().values().next().unwrap().stat_idx;
        assert_eq!(dp.ep_src(idx).unwrap(), EpSrc::default(), "empty at first");
        // The first new session asks the FIB and keeps its answer.
        assert_eq!(onearm_src(dp, 40000), [10, 0, 1, 1]);
        let filled = dp.ep_src(idx).unwrap();
        assert_eq!(
            (filled.dst, filled.src),
            (ep_addr([10, 0, 1, 10]), ep_addr([10, 0, 1, 1]))
        );
        assert!(filled.expiry_ns > 0 && filled.in_ifindex != 0, "{filled:?}");
        // The next new session to it takes the source kept: one the FIB
        // would never give shows it was not asked again.
        let kept = EpSrc {
            src: ep_addr([10, 0, 1, 77]),
            expiry_ns: u64::MAX,
            ..filled
        };
        dp.set_ep_src(idx, kept).unwrap();
        assert_eq!(onearm_src(dp, 40001), [10, 0, 1, 77], "the source kept");
        // Not another endpoint's (a reused slot), not one kept for packets
        // from another device, not once expired: the FIB's, kept instead.
        for (i, (why, bad)) in [
            (
                "another endpoint's",
                EpSrc {
                    dst: ep_addr([10, 0, 1, 11]),
                    ..kept
                },
            ),
            (
                "another device's",
                EpSrc {
                    in_ifindex: kept.in_ifindex + 1000,
                    ..kept
                },
            ),
            (
                "expired",
                EpSrc {
                    expiry_ns: 1,
                    ..kept
                },
            ),
        ]
        .into_iter()
        .enumerate()
        {
            dp.set_ep_src(idx, bad).unwrap();
            assert_eq!(onearm_src(dp, 40010 + i as u16), [10, 0, 1, 1], "{why}");
            assert_eq!(
                dp.ep_src(idx).unwrap().src,
                ep_addr([10, 0, 1, 1]),
                "{why} entry: the FIB's answer kept instead"
            );
        }
        // A policy rule: the agent turns keeping off, every new session
        // asks the FIB and nothing is kept.
        policy_rule(dp, true);
        assert_eq!(dp.config().unwrap().flags & cfg_flags::EP_NH_CACHE, 0);
        dp.set_ep_src(idx, kept).unwrap();
        assert_eq!(onearm_src(dp, 40020), [10, 0, 1, 1], "with a policy rule");
        assert_eq!(dp.ep_src(idx).unwrap(), kept, "nothing kept meanwhile");
        policy_rule(dp, false);
        assert_eq!(onearm_src(dp, 40021), [10, 0, 1, 77], "the rule gone");
    });
}
