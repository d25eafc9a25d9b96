//! Packet tables through BPF_PROG_TEST_RUN: input bytes, maps loaded
//! through the agent's own datapath API, expected output bytes and verdict.

use loxilb_agent::datapath::Datapath;
use loxilb_tests::fib::verdict::{TC_ACT_OK, TC_ACT_REDIRECT, XDP_DROP, XDP_PASS, XDP_REDIRECT};
use loxilb_tests::{
    fib::{self, run_tc, run_xdp, CLIENT_MAC, EP1_MAC, EP2_MAC, LB_TO_CLIENT_MAC, LB_TO_EP_MAC},
    need_root,
    packet::{Frame, ACK, FIN, L4, RST, SYN},
    tables::{check, check_malformed, check_random, expect_frame, Case},
};

const RULES: &str = r#"
rules:
  - name: web
    vip: 20.0.0.100
    port: 80
    protocol: tcp
    endpoints:
      - { ip: 10.0.1.10, port: 8080 }
      - { ip: 10.0.1.11, port: 8080 }
  - name: dns
    vip: 20.0.0.100
    port: 53
    protocol: udp
    endpoints:
      - { ip: 10.0.1.10, port: 5353 }
  - name: empty
    vip: 20.0.0.101
    port: 80
    protocol: tcp
    endpoints: []
"#;

fn with_datapath(tag: &str, f: impl FnOnce(&mut Datapath) + Send + 'static) {
    fib::with_datapath(tag, RULES, f)
}

/// Empty the endpoint index slots of rule web's endpoints: its new
/// sessions then have two entries, a forward and a reply one (what the
/// sessions of endpoints two services share, and of the NAT modes, have).
fn unindex_web(dp: &mut Datapath) {
    for ep in ["10.0.1.10", "10.0.1.11"] {
        let slot = loxilb_common::ep_index_slot(
            loxilb_common::addr_fold(&a(ep)),
            8080u16.to_be(),
            loxilb_common::IPPROTO_TCP,
        );
        loxilb_agent::rules::RuleTable::put_ep_index(dp, slot, Default::default()).unwrap();
    }
}

#[test]
fn dnat_table_tcp_session_and_non_service() {
    if !need_root("dnat_table_tcp_session_and_non_service") {
        return;
    }
    with_datapath("tcp", |dp| {
        let syn = Frame::tcp("192.168.0.2", 40000, "20.0.0.100", 80, SYN);
        let syn2 = Frame::tcp("192.168.0.2", 40001, "20.0.0.100", 80, SYN);
        let est = Frame::tcp("192.168.0.2", 40000, "20.0.0.100", 80, ACK);
        let reply = Frame::tcp("10.0.1.10", 8080, "192.168.0.2", 40000, SYN | ACK);
        let other = Frame::tcp("192.168.0.2", 40000, "20.0.0.200", 80, SYN);
        let other_port = Frame::tcp("192.168.0.2", 40000, "20.0.0.100", 81, SYN);
        let mut opts = Frame::tcp("192.168.0.2", 40002, "20.0.0.100", 80, SYN);
        opts.options = vec![0x94, 0x04, 0, 0]; // router alert: IHL 6
        let mut vlan = Frame::tcp("192.168.0.2", 40003, "20.0.0.100", 80, SYN);
        vlan.vlan = Some(100);
        let empty = Frame::tcp("192.168.0.2", 40004, "20.0.0.101", 80, SYN);
        let cases = vec![
            Case {
                name: "SYN to VIP: DNAT to first endpoint, routed",
                input: syn.bytes(),
                expected: syn
                    .with("192.168.0.2", 40000, "10.0.1.10", 8080)
                    .routed(LB_TO_EP_MAC, EP1_MAC)
                    .bytes(),
                verdict: XDP_REDIRECT,
            },
            Case {
                name: "second SYN: round-robin to the next endpoint",
                input: syn2.bytes(),
                expected: syn2
                    .with("192.168.0.2", 40001, "10.0.1.11", 8080)
                    .routed(LB_TO_EP_MAC, EP2_MAC)
                    .bytes(),
                verdict: XDP_REDIRECT,
            },
            Case {
                name: "established packet keeps its endpoint",
                input: est.bytes(),
                expected: est
                    .with("192.168.0.2", 40000, "10.0.1.10", 8080)
                    .routed(LB_TO_EP_MAC, EP1_MAC)
                    .bytes(),
                verdict: XDP_REDIRECT,
            },
            Case {
                name: "reply reverse-NATed to VIP:port",
                input: reply.bytes(),
                expected: reply
                    .with("20.0.0.100", 80, "192.168.0.2", 40000)
                    .routed(LB_TO_CLIENT_MAC, CLIENT_MAC)
                    .bytes(),
                verdict: XDP_REDIRECT,
            },
            Case {
                name: "non-service address untouched",
                input: other.bytes(),
                expected: other.bytes(),
                verdict: XDP_PASS,
            },
            Case {
                name: "VIP but no rule for the port untouched",
                input: other_port.bytes(),
                expected: other_port.bytes(),
                verdict: XDP_PASS,
            },
            Case {
                name: "IPv4 with options: rewritten, options kept",
                input: opts.bytes(),
                expected: opts
                    .with("192.168.0.2", 40002, "10.0.1.10", 8080)
                    .routed(LB_TO_EP_MAC, EP1_MAC)
                    .bytes(),
                verdict: XDP_REDIRECT,
            },
            Case {
                name: "802.1Q tagged: rewritten, handed to the stack",
                input: vlan.bytes(),
                expected: vlan.with("192.168.0.2", 40003, "10.0.1.11", 8080).bytes(),
                verdict: XDP_PASS,
            },
            Case {
                name: "rule without endpoints drops",
                input: empty.bytes(),
                expected: empty.bytes(),
                verdict: XDP_DROP,
            },
        ];
        check(dp, cases);
        let stats: std::collections::HashMap<_, _> = dp.stats().unwrap().into_iter().collect();
        assert_eq!(stats["new_session"], 4);
        assert_eq!(stats["drop_no_endpoint"], 1);
        assert!(stats["ct_hit"] >= 2);
        // One entry per session: web's endpoints serve it alone, so the
        // agent indexed them (replies found through the index).
        let s = dp.sessions().unwrap();
        assert_eq!(s.len(), 4, "{s:?}");
        assert!(s
            .iter()
            .all(|(_, v)| v.state & loxilb_common::ct_state::ONE != 0));
    });
}

#[test]
fn fragments_truncated_and_garbage_pass_untouched() {
    if !need_root("fragments_truncated_and_garbage_pass_untouched") {
        return;
    }
    with_datapath("frag", |dp| {
        let mut mf = Frame::tcp("192.168.0.2", 40000, "20.0.0.100", 80, SYN);
        mf.frag = 0x2000; // more fragments
        let mut later = Frame::tcp("192.168.0.2", 40000, "20.0.0.100", 80, SYN);
        later.frag = 0x0010; // offset 128 bytes
        let full = Frame::tcp("192.168.0.2", 40000, "20.0.0.100", 80, SYN).bytes();
        let mut bad_ihl = full.clone();
        bad_ihl[14] = 0x44; // IHL 4 (< 20 bytes)
        let mut bad_len = full.clone();
        bad_len[16] = 0x05; // total length beyond the frame
        let cases = vec![
            Case {
                name: "first fragment",
                input: mf.bytes(),
                expected: mf.bytes(),
                verdict: XDP_PASS,
            },
            Case {
                name: "later fragment",
                input: later.bytes(),
                expected: later.bytes(),
                verdict: XDP_PASS,
            },
        ];
        check(dp, cases);
        let cases = vec![
            Case {
                name: "IP header cut",
                input: full[..30].to_vec(),
                expected: full[..30].to_vec(),
                verdict: XDP_PASS,
            },
            Case {
                name: "TCP header cut",
                input: full[..40].to_vec(),
                expected: full[..40].to_vec(),
                verdict: XDP_PASS,
            },
            Case {
                name: "IHL < 5",
                input: bad_ihl.clone(),
                expected: bad_ihl,
                verdict: XDP_PASS,
            },
            Case {
                name: "total length > frame",
                input: bad_len.clone(),
                expected: bad_len,
                verdict: XDP_PASS,
            },
            Case {
                name: "ethernet only",
                input: full[..14].to_vec(),
                expected: full[..14].to_vec(),
                verdict: XDP_PASS,
            },
        ];
        check_malformed(dp, cases, run_xdp);
        // Garbage: random bytes behind an IPv4 ethertype and at random.
        let mut cases = vec![];
        let mut seed = 0x1234_5678_9abc_def0u64;
        let mut rnd = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for i in 0..300 {
            let len = 14 + (rnd() % 120) as usize;
            let mut b: Vec<u8> = (0..len).map(|_| rnd() as u8).collect();
            if i % 2 == 0 {
                b[12] = 0x08;
                b[13] = 0x00;
                // random IPv4 header aimed at something that is not a VIP
                if len >= 34 {
                    b[30..34].iter_mut().for_each(|x| *x = 0x7f);
                }
            }
            cases.push(Case {
                name: "garbage",
                input: b.clone(),
                expected: b,
                verdict: XDP_PASS,
            });
        }
        check_random(dp, cases, run_xdp);
        assert!(
            dp.sessions().unwrap().is_empty(),
            "garbage created sessions"
        );
    });
}

#[test]
fn udp_checksums_zero_stays_zero_and_tc_path() {
    if !need_root("udp_checksums_zero_stays_zero_and_tc_path") {
        return;
    }
    with_datapath("udp", |dp| {
        let u = Frame::udp("192.168.0.2", 5000, "20.0.0.100", 53);
        let mut z = Frame::udp("192.168.0.2", 5001, "20.0.0.100", 53);
        z.l4 = L4::Udp {
            sport: 5001,
            dport: 53,
            zero_csum: true,
        };
        let zr = {
            let mut r = Frame::udp("10.0.1.10", 5353, "192.168.0.2", 5001);
            r.l4 = L4::Udp {
                sport: 5353,
                dport: 5001,
                zero_csum: true,
            };
            r
        };
        check(
            dp,
            vec![
                Case {
                    name: "UDP with checksum",
                    input: u.bytes(),
                    expected: u
                        .with("192.168.0.2", 5000, "10.0.1.10", 5353)
                        .routed(LB_TO_EP_MAC, EP1_MAC)
                        .bytes(),
                    verdict: XDP_REDIRECT,
                },
                Case {
                    name: "UDP checksum 0 stays 0",
                    input: z.bytes(),
                    expected: z
                        .with("192.168.0.2", 5001, "10.0.1.10", 5353)
                        .routed(LB_TO_EP_MAC, EP1_MAC)
                        .bytes(),
                    verdict: XDP_REDIRECT,
                },
                Case {
                    name: "UDP reply with checksum 0 reverse-NATed, still 0",
                    input: zr.bytes(),
                    expected: zr
                        .with("20.0.0.100", 53, "192.168.0.2", 5001)
                        .routed(LB_TO_CLIENT_MAC, CLIENT_MAC)
                        .bytes(),
                    verdict: XDP_REDIRECT,
                },
            ],
        );
        // The same datapath code on the TC hook.
        let t = Frame::tcp("192.168.0.2", 41000, "20.0.0.100", 80, SYN);
        let (v, out) = run_tc(dp, &t.bytes());
        let want = t
            .with("192.168.0.2", 41000, "10.0.1.10", 8080)
            .routed(LB_TO_EP_MAC, EP1_MAC)
            .bytes();
        assert_eq!(v, TC_ACT_REDIRECT, "tc verdict");
        expect_frame("TC DNAT", &out, &want);
        let other = Frame::tcp("192.168.0.2", 41000, "20.0.0.222", 80, SYN).bytes();
        let (v, out) = run_tc(dp, &other);
        assert_eq!((v, out), (TC_ACT_OK, other));
    });
}

#[test]
fn tcp_fin_and_rst_shorten_the_session() {
    if !need_root("tcp_fin_and_rst_shorten_the_session") {
        return;
    }
    with_datapath("fin", |dp| {
        unindex_web(dp);
        let syn = Frame::tcp("192.168.0.2", 42000, "20.0.0.100", 80, SYN);
        run_xdp(dp, &syn.bytes());
        let fin = Frame::tcp("192.168.0.2", 42000, "20.0.0.100", 80, FIN | ACK);
        run_xdp(dp, &fin.bytes());
        let s = dp.sessions().unwrap();
        let fwd = s
            .iter()
            .find(|(k, _)| u16::from_be(k.sport) == 42000)
            .unwrap()
            .1;
        assert_eq!(
            fwd.timeout_s,
            loxilb_model::DEFAULT_TIMEOUT_S,
            "one FIN is not a close"
        );
        let ep = loxilb_common::ip_from_addr(&fwd.xdaddr).to_string();
        let rfin = Frame::tcp(&ep, 8080, "192.168.0.2", 42000, FIN | ACK);
        run_xdp(dp, &rfin.bytes());
        for (_, v) in dp.sessions().unwrap() {
            assert_eq!(
                v.timeout_s,
                loxilb_common::CT_CLOSE_TIMEOUT_S,
                "both FINs: closing"
            );
            assert!(v.state & loxilb_common::ct_state::CLOSING != 0);
        }
        // A new SYN on the closed tuple starts a new session.
        let (v, _) = run_xdp(dp, &syn.bytes());
        assert_eq!(v, XDP_REDIRECT);
        let s = dp.sessions().unwrap();
        assert!(
            s.iter()
                .all(|(_, v)| v.state == loxilb_common::ct_state::OPENING),
            "fresh session expected (its handshake open): {s:?}"
        );
        // RST closes at once
        let rst = Frame::tcp("192.168.0.2", 42000, "20.0.0.100", 80, RST);
        run_xdp(dp, &rst.bytes());
        assert!(dp
            .sessions()
            .unwrap()
            .iter()
            .all(|(_, v)| v.timeout_s == loxilb_common::CT_CLOSE_TIMEOUT_S));
    });
}

#[test]
fn the_datapath_clock_is_the_jiffies_counter_fitted_to_the_coarse_clock() {
    if !need_root("the_datapath_clock_is_the_jiffies_counter_fitted_to_the_coarse_clock") {
        return;
    }
    with_datapath("clock", |dp| {
        let fit = dp.clock().expect("the load calibrates the datapath clock");
        assert_eq!(fit.ns_per_jiffy, loxilb_agent::clock::tick_ns(fit.hz));
        let tick = fit.ns_per_jiffy;
        let last_seen = |dp: &mut loxilb_agent::datapath::Datapath, sport: u16| {
            let before = loxilb_tests::coarse_now_ns();
            let syn = Frame::tcp("192.168.0.2", sport, "20.0.0.100", 80, SYN);
            assert_eq!(run_xdp(dp, &syn.bytes()).0, XDP_REDIRECT);
            let after = loxilb_tests::coarse_now_ns();
            let s = dp.sessions().unwrap();
            let (_, v) = s
                .iter()
                .find(|(k, _)| u16::from_be(k.sport) == sport)
                .expect("the SYN made a session");
            (before, v.last_seen_ns, after)
        };
        // The session's time is the coarse clock's, within two ticks.
        let (before, seen, after) = last_seen(dp, 44000);
        assert!(
            seen + 2 * tick >= before && seen <= after + 2 * tick,
            "last seen {seen} ns, coarse clock {before}..{after} ns"
        );
        // The datapath reads the fitted clock, not the kernel's: a fit one
        // second off shows in the next session ...
        let off = loxilb_agent::clock::Fit {
            offset_ns: fit.offset_ns.wrapping_add(1_000_000_000),
            ..fit
        };
        dp.set_clock(off).unwrap();
        let (before, seen, after) = last_seen(dp, 44001);
        assert!(
            seen >= before + 1_000_000_000 - 2 * tick && seen <= after + 1_000_000_000 + 2 * tick,
            "last seen {seen} ns, coarse clock {before}..{after} ns: the datapath should read \
             the fitted clock, a second ahead"
        );
        // ... and the upkeep's check finds it and fits it again.
        let gap = dp.check_clock().unwrap().expect("a second off is mended");
        assert!(
            gap.abs_diff(1_000_000_000) <= 2 * tick,
            "gap found: {gap} ns"
        );
        assert_eq!(dp.check_clock().unwrap(), None, "in step again");
        let (before, seen, after) = last_seen(dp, 44002);
        assert!(
            seen + 2 * tick >= before && seen <= after + 2 * tick,
            "last seen {seen} ns, coarse clock {before}..{after} ns"
        );
    });
}

/// A session opened by a SYN lives at most `CT_OPENING_TIMEOUT_S` idle
/// until the client acknowledges (both entries start `OPENING`; the
/// endpoint's SYN-ACK and ACK do not end it, the client's ACK does, in the
/// forward entry, which the reply entry then goes by), so the agent's
/// expiry takes a SYN flood's sessions within a minute; once open, the
/// rule's timeout.
#[test]
fn a_half_open_session_lives_a_minute_until_the_client_acknowledges() {
    if !need_root("a_half_open_session_lives_a_minute_until_the_client_acknowledges") {
        return;
    }
    use loxilb_common::{ct_state::OPENING, CT_OPENING_TIMEOUT_S};
    with_datapath("opening", |dp| {
        unindex_web(dp);
        let states = |dp: &mut loxilb_agent::datapath::Datapath, sport: u16| {
            let s = dp.sessions().unwrap();
            let mine: Vec<_> = s
                .into_iter()
                .filter(|(k, v)| u16::from_be(k.sport) == sport || u16::from_be(v.xdport) == sport)
                .collect();
            assert_eq!(mine.len(), 2, "both entries of the session: {mine:?}");
            mine
        };
        let syn = Frame::tcp("192.168.0.2", 45000, "20.0.0.100", 80, SYN);
        assert_eq!(run_xdp(dp, &syn.bytes()).0, XDP_REDIRECT);
        for (_, v) in states(dp, 45000) {
            assert_eq!(v.state, OPENING, "a SYN opens: {v:?}");
            assert_eq!(v.timeout_s, loxilb_model::DEFAULT_TIMEOUT_S);
            assert_eq!(v.idle_timeout_s(), CT_OPENING_TIMEOUT_S);
        }
        let fwd = states(dp, 45000)
            .into_iter()
            .find(|(_, v)| v.dir == loxilb_common::ct_dir::FORWARD)
            .unwrap()
            .1;
        let ep = loxilb_common::ip_from_addr(&fwd.xdaddr).to_string();
        // The endpoint's SYN-ACK: still opening.
        let synack = Frame::tcp(&ep, 8080, "192.168.0.2", 45000, SYN | ACK);
        assert_eq!(run_xdp(dp, &synack.bytes()).0, XDP_REDIRECT);
        assert!(states(dp, 45000).iter().all(|(_, v)| v.state == OPENING));
        // The endpoint's ACK (the reply direction): still opening.
        let ep_ack = Frame::tcp(&ep, 8080, "192.168.0.2", 45000, ACK);
        assert_eq!(run_xdp(dp, &ep_ack.bytes()).0, XDP_REDIRECT);
        assert!(states(dp, 45000).iter().all(|(_, v)| v.state == OPENING));
        // A retransmitted SYN: still opening.
        assert_eq!(run_xdp(dp, &syn.bytes()).0, XDP_REDIRECT);
        assert!(states(dp, 45000).iter().all(|(_, v)| v.state == OPENING));
        // The client's ACK: open, by the rule's timeout (the forward entry
        // holds the session's state; the reply entry keeps its first).
        let ack = Frame::tcp("192.168.0.2", 45000, "20.0.0.100", 80, ACK);
        assert_eq!(run_xdp(dp, &ack.bytes()).0, XDP_REDIRECT);
        let open = states(dp, 45000);
        let timeouts = loxilb_agent::datapath::session_timeouts_s(&open);
        for ((_, v), t) in open.iter().zip(timeouts) {
            if v.dir == loxilb_common::ct_dir::FORWARD {
                assert_eq!(v.state, 0, "the client acknowledged: {v:?}");
            }
            assert_eq!(t, loxilb_model::DEFAULT_TIMEOUT_S, "{v:?}");
        }
        // A session that did not start with a SYN (its state lost, a
        // packet of the middle of a connection) is no handshake.
        let mid = Frame::tcp("192.168.0.2", 45001, "20.0.0.100", 80, ACK);
        assert_eq!(run_xdp(dp, &mid.bytes()).0, XDP_REDIRECT);
        assert!(states(dp, 45001).iter().all(|(_, v)| v.state == 0));

        // The agent's expiry: a half-open session idle past the minute
        // (and the grace) goes, an open one idle as long stays.
        let now = loxilb_tests::coarse_now_ns();
        let aged = now
            - (CT_OPENING_TIMEOUT_S as u64 + 1) * 1_000_000_000
            - loxilb_agent::datapath::EXPIRY_GRACE_NS;
        let again = Frame::tcp("192.168.0.2", 45003, "20.0.0.100", 80, SYN);
        assert_eq!(run_xdp(dp, &again.bytes()).0, XDP_REDIRECT);
        for sport in [45000, 45003] {
            for (k, v) in states(dp, sport) {
                dp.insert_session(
                    k,
                    loxilb_common::CtVal {
                        last_seen_ns: aged,
                        ..v
                    },
                )
                .unwrap();
            }
        }
        let (removed, live) = dp.expire_idle(now).unwrap();
        assert_eq!(removed, 2, "the half-open session's two entries");
        assert!(live.iter().any(|(k, _)| u16::from_be(k.sport) == 45000));
        assert!(!live
            .iter()
            .any(|(k, v)| u16::from_be(k.sport) == 45003 || u16::from_be(v.xdport) == 45003));
    });
}

#[test]
fn idle_session_expires_and_is_replaced() {
    if !need_root("idle_session_expires_and_is_replaced") {
        return;
    }
    with_datapath("idle", |dp| {
        unindex_web(dp);
        let syn = Frame::tcp("192.168.0.2", 43000, "20.0.0.100", 80, SYN);
        run_xdp(dp, &syn.bytes());
        // Age the session past its timeout by rewriting its timestamps.
        let s = dp.sessions().unwrap();
        assert_eq!(s.len(), 2);
        let old_ep = s.iter().find(|(_, v)| v.dir == 0).unwrap().1.xdaddr;
        for (k, mut v) in s {
            v.last_seen_ns = 1;
            v.timeout_s = 1;
            dp.insert_session(k, v).unwrap();
        }
        let ack = Frame::tcp("192.168.0.2", 43000, "20.0.0.100", 80, ACK);
        let (v, _) = run_xdp(dp, &ack.bytes());
        assert_eq!(v, XDP_REDIRECT);
        let stats: std::collections::HashMap<_, _> = dp.stats().unwrap().into_iter().collect();
        assert_eq!(stats["ct_expired"], 1);
        assert_eq!(stats["new_session"], 2);
        let s = dp.sessions().unwrap();
        let new_ep = s.iter().find(|(_, v)| v.dir == 0).unwrap().1.xdaddr;
        assert_ne!(
            old_ep, new_ep,
            "a new session is balanced afresh (round-robin moved on)"
        );
    });
}

/// The agent indexed rule web's endpoints (both on 8080/TCP, serving it
/// alone) for its VIP and port.
fn assert_web_indexed(dp: &Datapath) {
    let ix = dp.ep_index().unwrap();
    for ep in ["10.0.1.10", "10.0.1.11"] {
        let want = loxilb_common::EpIndex {
            addr: a(ep),
            vip: a("20.0.0.100"),
            port: 8080u16.to_be(),
            vport: 80u16.to_be(),
            proto: loxilb_common::IPPROTO_TCP,
            ..Default::default()
        };
        assert!(
            ix.iter().any(|(_, e)| *e == want),
            "{ep} not indexed: {ix:?}"
        );
    }
}

fn a(s: &str) -> loxilb_common::Addr {
    loxilb_common::addr_from_ip(s.parse().unwrap())
}

#[test]
fn a_dnat_session_to_an_indexed_endpoint_has_one_entry() {
    if !need_root("a_dnat_session_to_an_indexed_endpoint_has_one_entry") {
        return;
    }
    with_datapath("one", |dp| {
        use loxilb_common::ct_state as st;
        assert_web_indexed(dp);
        let syn = Frame::tcp("192.168.0.2", 46000, "20.0.0.100", 80, SYN);
        let synack = Frame::tcp("10.0.1.10", 8080, "192.168.0.2", 46000, SYN | ACK);
        let ack = Frame::tcp("192.168.0.2", 46000, "20.0.0.100", 80, ACK);
        // From the session's other endpoint: not a reply of this session.
        let stray = Frame::tcp("10.0.1.11", 8080, "192.168.0.2", 46000, ACK);
        check(
            dp,
            vec![
                Case {
                    name: "SYN: DNAT to the first endpoint",
                    input: syn.bytes(),
                    expected: syn
                        .with("192.168.0.2", 46000, "10.0.1.10", 8080)
                        .routed(LB_TO_EP_MAC, EP1_MAC)
                        .bytes(),
                    verdict: XDP_REDIRECT,
                },
                Case {
                    name: "SYN-ACK found through the index, back from the VIP",
                    input: synack.bytes(),
                    expected: synack
                        .with("20.0.0.100", 80, "192.168.0.2", 46000)
                        .routed(LB_TO_CLIENT_MAC, CLIENT_MAC)
                        .bytes(),
                    verdict: XDP_REDIRECT,
                },
                Case {
                    name: "the client's ACK keeps its endpoint",
                    input: ack.bytes(),
                    expected: ack
                        .with("192.168.0.2", 46000, "10.0.1.10", 8080)
                        .routed(LB_TO_EP_MAC, EP1_MAC)
                        .bytes(),
                    verdict: XDP_REDIRECT,
                },
                Case {
                    name: "the other endpoint's packet to the client untouched",
                    input: stray.bytes(),
                    expected: stray.bytes(),
                    verdict: XDP_PASS,
                },
            ],
        );
        let s = dp.sessions().unwrap();
        assert_eq!(s.len(), 1, "one entry for the session: {s:?}");
        let (k, v) = s[0];
        assert_eq!(
            (u16::from_be(k.sport), k.daddr, v.state),
            (46000, a("20.0.0.100"), st::ONE),
            "the forward entry, marked, its handshake completed by the ACK"
        );
        assert_eq!((v.packets, v.rpackets), (2, 1));
        assert!(!v.has_peer());
        // The same reply through the TC hook.
        let (verdict, out) = run_tc(dp, &synack.bytes());
        assert_eq!(verdict, TC_ACT_REDIRECT, "tc verdict");
        expect_frame(
            "TC reply",
            &out,
            &synack
                .with("20.0.0.100", 80, "192.168.0.2", 46000)
                .routed(LB_TO_CLIENT_MAC, CLIENT_MAC)
                .bytes(),
        );
        // Both FINs close it, one from each side.
        run_xdp(
            dp,
            &Frame::tcp("192.168.0.2", 46000, "20.0.0.100", 80, FIN | ACK).bytes(),
        );
        let v = dp.sessions().unwrap()[0].1;
        assert_eq!(
            v.timeout_s,
            loxilb_model::DEFAULT_TIMEOUT_S,
            "one FIN is not a close"
        );
        assert_eq!(v.state, st::ONE | st::FIN_FWD);
        let rfin = Frame::tcp("10.0.1.10", 8080, "192.168.0.2", 46000, FIN | ACK);
        let (verdict, _) = run_xdp(dp, &rfin.bytes());
        assert_eq!(verdict, XDP_REDIRECT);
        let v = dp.sessions().unwrap()[0].1;
        assert_eq!(
            v.timeout_s,
            loxilb_common::CT_CLOSE_TIMEOUT_S,
            "both FINs: closing"
        );
        assert_eq!(
            v.state & (st::FIN_FWD | st::FIN_REPLY | st::CLOSING),
            st::FIN_FWD | st::FIN_REPLY | st::CLOSING
        );
        // Idle past its timeout: the agent's expiry removes it, and a reply
        // then finds no session.
        let stats: std::collections::HashMap<_, _> = dp.stats().unwrap().into_iter().collect();
        let (gone, _) = dp
            .expire_idle(loxilb_tests::coarse_now_ns() + 3_600_000_000_000)
            .unwrap();
        assert_eq!(gone, 1);
        let (verdict, out) = run_xdp(dp, &rfin.bytes());
        assert_eq!((verdict, out), (XDP_PASS, rfin.bytes()));
        assert_eq!(stats["new_session"], 1);
        // A session of a rule whose endpoint is not indexed has two.
        let dns_slot = loxilb_common::ep_index_slot(
            loxilb_common::addr_fold(&a("10.0.1.10")),
            5353u16.to_be(),
            loxilb_common::IPPROTO_UDP,
        );
        loxilb_agent::rules::RuleTable::put_ep_index(dp, dns_slot, Default::default()).unwrap();
        let u = Frame::udp("192.168.0.2", 5000, "20.0.0.100", 53);
        assert_eq!(run_xdp(dp, &u.bytes()).0, XDP_REDIRECT);
        assert_eq!(dp.sessions().unwrap().len(), 2);
    });
}

#[test]
fn a_one_entry_session_expires_in_the_datapath_and_is_replaced() {
    if !need_root("a_one_entry_session_expires_in_the_datapath_and_is_replaced") {
        return;
    }
    with_datapath("one-idle", |dp| {
        assert_web_indexed(dp);
        let syn = Frame::tcp("192.168.0.2", 46100, "20.0.0.100", 80, SYN);
        run_xdp(dp, &syn.bytes());
        let s = dp.sessions().unwrap();
        assert_eq!(s.len(), 1);
        let (k, mut v) = s[0];
        let ep = loxilb_common::ip_from_addr(&v.xdaddr).to_string();
        v.last_seen_ns = 1;
        v.timeout_s = 1;
        dp.insert_session(k, v).unwrap();
        // The endpoint's late reply ends it and is not translated.
        let late = Frame::tcp(&ep, 8080, "192.168.0.2", 46100, ACK);
        assert_eq!(run_xdp(dp, &late.bytes()), (XDP_PASS, late.bytes()));
        let stats: std::collections::HashMap<_, _> = dp.stats().unwrap().into_iter().collect();
        assert_eq!(stats["ct_expired"], 1);
        assert!(dp.sessions().unwrap().is_empty());
        // The client's next packet starts a new session.
        assert_eq!(run_xdp(dp, &syn.bytes()).0, XDP_REDIRECT);
        assert_eq!(dp.sessions().unwrap().len(), 1);
    });
}

/// The verifier gives up at 1,000,000 instructions processed per program;
/// a change that takes a program near it must be seen before it fails a
/// load (the count moves with LLVM's inlining: the same logic has verified
/// in 445k and in 874k).
const VERIFIER_BUDGET: u32 = 850_000;

#[test]
fn every_program_verifies_within_its_budget() {
    if !need_root("every_program_verifies_within_its_budget") {
        return;
    }
    with_datapath("verifier", |dp| {
        let progs = dp.verified_insns();
        assert!(
            progs.len() >= 15,
            "only {} programs loaded: {progs:?}",
            progs.len()
        );
        let mut over = vec![];
        for (name, n) in &progs {
            let n = n.unwrap_or_else(|| {
                panic!(
                    "{name}: no verified-instruction count (not loaded, or the kernel did not say)"
                )
            });
            assert!(n > 0, "{name}: 0 instructions verified");
            if n > VERIFIER_BUDGET {
                over.push(format!("{name}: {n}"));
            }
        }
        assert!(
            over.is_empty(),
            "programs past the verifier budget of {VERIFIER_BUDGET} instructions (the kernel's \
             limit is 1,000,000): {}; split the work (a tail call, an #[inline(never)] function) \
             or cut the paths the verifier has to walk",
            over.join(", ")
        );
    });
}
