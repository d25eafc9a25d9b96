//! Endpoint selection, weights, source ranges, inactive endpoints and
//! large endpoint sets, through BPF_PROG_TEST_RUN with maps loaded by the
//! agent's own reconciler.

use loxilb_tests::fib::verdict::{XDP_DROP, XDP_PASS, XDP_REDIRECT};
use std::{collections::HashMap, net::Ipv4Addr};

use loxilb_agent::{config, rules::table_for};
use loxilb_common::{ep_flags, flow_hash, lb_sel, v4_mapped, EpKey};
use loxilb_tests::{
    fib::{dst_of, run_xdp, src_of, with_datapath, with_datapath_rules},
    need_root,
    packet::{Frame, ACK, SYN},
};

fn syn(client: &str, sport: u16, vip_port: u16) -> Frame {
    Frame::tcp(client, sport, "20.0.0.100", vip_port, SYN)
}

/// Send a SYN; return the endpoint it was sent to (translated, forwarded).
fn pick(dp: &mut loxilb_agent::datapath::Datapath, f: &Frame) -> (Ipv4Addr, u16) {
    let (v, out) = run_xdp(dp, &f.bytes());
    assert!(
        v == XDP_REDIRECT || v == XDP_PASS,
        "verdict {v} for {:?}",
        f.l4
    );
    let d = dst_of(&out);
    assert_ne!(d.0, Ipv4Addr::new(20, 0, 0, 100), "not translated");
    d
}

fn tally(v: &[(Ipv4Addr, u16)]) -> HashMap<Ipv4Addr, usize> {
    let mut m = HashMap::new();
    for (a, _) in v {
        *m.entry(*a).or_default() += 1;
    }
    m
}

#[test]
fn weighted_round_robin_follows_weights() {
    if !need_root("weighted_round_robin_follows_weights") {
        return;
    }
    let rules = "rules:\n  - {vip: 20.0.0.100, port: 80, protocol: tcp, endpoints: [{ip: 10.0.1.10, port: 8080, weight: 3}, {ip: 10.0.1.11, port: 8080, weight: 1}]}\n";
    with_datapath("wrr", rules, |dp| {
        let picks: Vec<_> = (0..400)
            .map(|i| pick(dp, &syn("192.168.0.2", 10000 + i, 80)))
            .collect();
        let t = tally(&picks);
        assert_eq!(t[&Ipv4Addr::new(10, 0, 1, 10)], 300, "{t:?}");
        assert_eq!(t[&Ipv4Addr::new(10, 0, 1, 11)], 100, "{t:?}");
        let rs = dp.rule_stats().unwrap();
        assert_eq!(rs.values().map(|s| s.new_sessions).sum::<u64>(), 400);
    });
}

#[test]
fn hash_selection_is_maglev_consistent_and_stateless() {
    if !need_root("hash_selection_is_maglev_consistent_and_stateless") {
        return;
    }
    let rules = "rules:\n  - {vip: 20.0.0.100, port: 80, protocol: tcp, selection: hash, endpoints: [{ip: 10.0.1.10, port: 8080}, {ip: 10.0.1.11, port: 8080}, {ip: 10.0.1.12, port: 8080, weight: 2}]}\n";
    let parsed = config::parse("r", rules).unwrap();
    let eps: Vec<_> = parsed[0]
        .endpoints
        .iter()
        .map(loxilb_agent::rules::ep_val)
        .collect();
    let table = table_for(lb_sel::HASH, &eps);
    with_datapath("hash", rules, move |dp| {
        let mut picks = vec![];
        for i in 0..300u16 {
            let client = format!("192.168.{}.{}", i % 7, 2 + i % 200);
            let f = syn(&client, 20000 + i, 80);
            let got = pick(dp, &f);
            // The datapath's choice is exactly the agent's Maglev table at
            // the flow's hash.
            let c: Ipv4Addr = client.parse().unwrap();
            let h = flow_hash(
                &v4_mapped(u32::from_ne_bytes(c.octets())),
                &v4_mapped(u32::from_ne_bytes([20, 0, 0, 100])),
                (20000 + i).to_be(),
                80u16.to_be(),
                6,
            );
            let e = eps[table[h as usize % table.len()] as usize];
            assert_eq!(
                got,
                (Ipv4Addr::from(e.addr[3].to_ne_bytes()), 8080),
                "flow {i}"
            );
            picks.push(got);
        }
        // Stateless: with every session gone, each flow lands where it did.
        dp.clear_sessions().unwrap();
        for i in 0..300u16 {
            let client = format!("192.168.{}.{}", i % 7, 2 + i % 200);
            assert_eq!(pick(dp, &syn(&client, 20000 + i, 80)), picks[i as usize]);
        }
        let t = tally(&picks);
        assert_eq!(t.len(), 3, "{t:?}");
        // weight 2 endpoint gets about half
        let heavy = t[&Ipv4Addr::new(10, 0, 1, 12)] as f64 / 300.0;
        assert!((0.38..0.62).contains(&heavy), "weight-2 share {heavy}");
    });
}

#[test]
fn persist_keeps_a_client_on_its_endpoint_beyond_session_expiry() {
    if !need_root("persist_keeps_a_client_on_its_endpoint_beyond_session_expiry") {
        return;
    }
    let rules = "rules:\n  - {vip: 20.0.0.100, port: 80, protocol: tcp, selection: persist, persist_timeout: 1, endpoints: [{ip: 10.0.1.10, port: 8080}, {ip: 10.0.1.11, port: 8080}, {ip: 10.0.1.12, port: 8080}]}\n";
    with_datapath("persist", rules, |dp| {
        let a0 = pick(dp, &syn("192.168.0.2", 30000, 80));
        for p in 30001..30006 {
            assert_eq!(
                pick(dp, &syn("192.168.0.2", p, 80)),
                a0,
                "same client, new port"
            );
        }
        // Affinity is not conntrack: it survives the sessions going away.
        dp.clear_sessions().unwrap();
        assert_eq!(pick(dp, &syn("192.168.0.2", 30010, 80)), a0);
        let b0 = pick(dp, &syn("192.168.0.3", 30000, 80));
        assert_ne!(b0, a0, "a new client is balanced");
        // ... and expires after persist_timeout.
        std::thread::sleep(std::time::Duration::from_millis(2100));
        let a1 = pick(dp, &syn("192.168.0.2", 30020, 80));
        assert_ne!(a1, a0, "affinity should have expired");
        assert_eq!(pick(dp, &syn("192.168.0.2", 30021, 80)), a1, "new affinity");
    });
}

#[test]
fn persist_sends_a_client_elsewhere_once_its_endpoint_leaves_the_rule() {
    if !need_root("persist_sends_a_client_elsewhere_once_its_endpoint_leaves_the_rule") {
        return;
    }
    let rule = |eps: &str| {
        format!("rules:\n  - {{vip: 20.0.0.100, port: 80, protocol: tcp, selection: persist, persist_timeout: 600, endpoints: [{eps}]}}\n")
    };
    let all = rule(
        "{ip: 10.0.1.10, port: 8080}, {ip: 10.0.1.11, port: 8080}, {ip: 10.0.1.12, port: 8080}",
    );
    with_datapath_rules("persist-gone", &all, move |dp, r| {
        let a0 = pick(dp, &syn("192.168.0.2", 30000, 80));
        assert_eq!(pick(dp, &syn("192.168.0.2", 30001, 80)), a0);
        // The client's endpoint leaves the rule (the other two stay, in new
        // positions of the bank): its remembered slot is emptied, so the
        // client is balanced again, to an endpoint the rule still has.
        let keep: Vec<String> = ["10.0.1.10", "10.0.1.11", "10.0.1.12"]
            .iter()
            .filter(|ip| **ip != a0.0.to_string())
            .map(|ip| format!("{{ip: {ip}, port: 8080}}"))
            .collect();
        let rules = config::parse("t.yaml", &rule(&keep.join(", "))).unwrap();
        r.apply(&rules, dp).unwrap();
        dp.clear_sessions().unwrap();
        let a1 = pick(dp, &syn("192.168.0.2", 30010, 80));
        assert_ne!(a1, a0, "sent to an endpoint that left the rule");
        assert!(keep.iter().any(|k| k.contains(&a1.0.to_string())), "{a1:?}");
        // ... and it sticks to its new endpoint.
        for p in 30011..30016 {
            assert_eq!(pick(dp, &syn("192.168.0.2", p, 80)), a1);
        }
    });
}

/// An endpoint that leaves every rule keeps its live sessions: their
/// replies (a one-entry DNAT session's, found through the draining index
/// slot, and a onearm session's reply entry) are still translated, since
/// the address filter keeps the endpoint until the agent's walks of the
/// session table find none of its sessions.
#[test]
fn sessions_of_an_endpoint_that_left_every_rule_still_get_their_replies() {
    if !need_root("sessions_of_an_endpoint_that_left_every_rule_still_get_their_replies") {
        return;
    }
    let rules = |eps: &[&str]| {
        let list = |port: u16| {
            eps.iter()
                .map(|ip| format!("{{ip: {ip}, port: {port}}}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        format!(
            "rules:\n  - {{vip: 20.0.0.100, port: 80, protocol: tcp, endpoints: [{}]}}\n  - {{vip: 20.0.0.100, port: 81, protocol: tcp, mode: onearm, endpoints: [{}]}}\n",
            list(8080),
            list(9081)
        )
    };
    let both = rules(&["10.0.1.10", "10.0.1.11"]);
    with_datapath_rules("ep-left", &both, move |dp, r| {
        let web_syn = syn("192.168.0.2", 46000, 80);
        let (ep, _) = pick(dp, &web_syn);
        let (v, out) = run_xdp(dp, &syn("192.168.0.2", 46001, 81).bytes());
        assert_eq!(v, XDP_REDIRECT);
        let (one_ep, _) = dst_of(&out);
        assert_eq!(one_ep, ep, "both rules' first endpoint");
        let snat_port = src_of(&out).1;
        let other = if ep == Ipv4Addr::new(10, 0, 1, 10) {
            "10.0.1.11"
        } else {
            "10.0.1.10"
        };
        let ep_addr = loxilb_common::addr_from_ip(ep.into());
        assert!(dp.filter_passes(ep_addr).unwrap());
        // The endpoint leaves both rules; its sessions stay.
        r.apply(&config::parse("t.yaml", &rules(&[other])).unwrap(), dp)
            .unwrap();
        assert!(dp.filter_passes(ep_addr).unwrap(), "it lingers");
        let ep_s = ep.to_string();
        let web_reply = Frame::tcp(&ep_s, 8080, "192.168.0.2", 46000, SYN | ACK);
        let (v, out) = run_xdp(dp, &web_reply.bytes());
        assert_eq!(v, XDP_REDIRECT, "the DNAT session's reply");
        assert_eq!(src_of(&out), (Ipv4Addr::new(20, 0, 0, 100), 80));
        let one_reply = Frame::tcp(&ep_s, 9081, "10.0.1.1", snat_port, SYN | ACK);
        let (v, out) = run_xdp(dp, &one_reply.bytes());
        assert_eq!(v, XDP_REDIRECT, "the onearm session's reply");
        assert_eq!(
            (src_of(&out), dst_of(&out)),
            (
                (Ipv4Addr::new(20, 0, 0, 100), 81),
                (Ipv4Addr::new(192, 168, 0, 2), 46001)
            )
        );
        // The agent's upkeep walks: the sessions keep it, then they end
        // and two walks without them let it go.
        let walk = |dp: &mut loxilb_agent::datapath::Datapath| {
            dp.expire_idle(loxilb_tests::coarse_now_ns()).unwrap().1
        };
        let live = walk(dp);
        assert_eq!(live.len(), 3, "one entry for DNAT, two for onearm");
        assert_eq!(r.drain_filter(&live, dp).unwrap(), 0);
        assert!(dp.filter_passes(ep_addr).unwrap());
        dp.clear_sessions().unwrap();
        let live = walk(dp);
        assert_eq!(r.drain_filter(&live, dp).unwrap(), 0);
        assert_eq!(r.drain_filter(&live, dp).unwrap(), 1);
        assert!(!dp.filter_passes(ep_addr).unwrap(), "let go");
        let (v, out) = run_xdp(dp, &web_reply.bytes());
        assert_eq!((v, out), (XDP_PASS, web_reply.bytes()));
    });
}

#[test]
fn tables_placed_after_adopting_the_maps_leave_live_tables_alone() {
    if !need_root("tables_placed_after_adopting_the_maps_leave_live_tables_alone") {
        return;
    }
    // Two rules, each with endpoints of its own.
    let rule = |port: u16, sel: &str, eps: &[&str]| {
        let eps: Vec<String> = eps
            .iter()
            .map(|ip| format!("{{ip: {ip}, port: 8080}}"))
            .collect();
        format!(
            "  - {{vip: 20.0.0.100, port: {port}, protocol: tcp, selection: {sel}, endpoints: [{}]}}\n",
            eps.join(", ")
        )
    };
    let a_eps = ["10.0.1.10", "10.0.1.11"];
    let b_eps = ["10.0.1.12", "10.0.1.13"];
    let c_eps = ["10.0.1.20", "10.0.1.21", "10.0.1.22"];
    let first = format!(
        "rules:\n{}{}",
        rule(80, "rr", &a_eps),
        rule(81, "hash", &b_eps)
    );
    with_datapath_rules("adopt-tables", &first, move |dp, _| {
        let check = |dp: &mut loxilb_agent::datapath::Datapath, port: u16, eps: &[&str], n: u16| {
            for i in 0..n {
                let (ip, _) = pick(dp, &syn("192.168.0.2", 20000 + port * 100 + i, port));
                assert!(
                    eps.contains(&ip.to_string().as_str()),
                    "port {port} went to {ip}"
                );
            }
        };
        check(dp, 80, &a_eps, 8);
        check(dp, 81, &b_eps, 8);
        // A restart: a new reconciler adopts what the maps hold (the live
        // tables only), then rule a changes its table's length and a new
        // hash rule needs a large table. Neither may land on b's.
        let mut r = loxilb_agent::rules::Rules::adopt(dp.read_installed().unwrap());
        let a2 = ["10.0.1.10", "10.0.1.11", "10.0.1.14"];
        let next = format!(
            "rules:\n{}{}{}",
            rule(80, "rr", &a2),
            rule(81, "hash", &b_eps),
            rule(82, "hash", &c_eps)
        );
        r.apply(&config::parse("t.yaml", &next).unwrap(), dp)
            .unwrap();
        dp.clear_sessions().unwrap();
        check(dp, 80, &a2, 12);
        check(dp, 81, &b_eps, 16);
        check(dp, 82, &c_eps, 16);
    });
}

#[test]
fn source_ranges_admit_listed_clients_only() {
    if !need_root("source_ranges_admit_listed_clients_only") {
        return;
    }
    let rules = "rules:\n  - {vip: 20.0.0.100, port: 80, protocol: tcp, source_ranges: [192.168.0.0/24, 10.9.0.0/16], endpoints: [{ip: 10.0.1.10, port: 8080}]}\n  - {vip: 20.0.0.100, port: 81, protocol: tcp, endpoints: [{ip: 10.0.1.10, port: 8081}]}\n";
    with_datapath("src", rules, |dp| {
        pick(dp, &syn("192.168.0.2", 40000, 80));
        pick(dp, &syn("10.9.200.1", 40000, 80));
        let outside = syn("192.168.1.2", 40000, 80);
        let (v, out) = run_xdp(dp, &outside.bytes());
        assert_eq!(v, XDP_DROP);
        assert_eq!(out, outside.bytes());
        // The other rule has no ranges: everyone is admitted.
        pick(dp, &syn("192.168.1.2", 40000, 81));
        let stats: HashMap<_, _> = dp.stats().unwrap().into_iter().collect();
        assert_eq!(stats["drop_src_range"], 1);
        let rs = dp.rule_stats().unwrap();
        assert_eq!(rs.values().map(|s| s.drop_src_range).sum::<u64>(), 1);
        assert_eq!(rs.values().map(|s| s.new_sessions).sum::<u64>(), 3);
    });
}

#[test]
fn inactive_endpoints_get_no_new_sessions_but_keep_old_ones() {
    if !need_root("inactive_endpoints_get_no_new_sessions_but_keep_old_ones") {
        return;
    }
    let rules = "rules:\n  - {vip: 20.0.0.100, port: 80, protocol: tcp, endpoints: [{ip: 10.0.1.10, port: 8080}, {ip: 10.0.1.11, port: 8080}, {ip: 10.0.1.12, port: 8080}]}\n";
    with_datapath("inactive", rules, |dp| {
        // One session per endpoint.
        let before: Vec<_> = (0..3)
            .map(|i| pick(dp, &syn("192.168.0.2", 50000 + i, 80)))
            .collect();
        let svc = dp.services().unwrap()[0].1;
        let victim = before[1];
        dp.set_endpoint_flags(EpKey::new(svc.rule_id, svc.ep_bank, 1), ep_flags::INACTIVE)
            .unwrap();
        for i in 10..40 {
            assert_ne!(pick(dp, &syn("192.168.0.2", 50000 + i, 80)), victim);
        }
        // The existing session to the inactive endpoint keeps flowing.
        let est = Frame::tcp("192.168.0.2", 50001, "20.0.0.100", 80, ACK);
        let (_, out) = run_xdp(dp, &est.bytes());
        assert_eq!(dst_of(&out), victim);
        // Every endpoint inactive: new connections are dropped and counted.
        for idx in 0..3 {
            dp.set_endpoint_flags(
                EpKey::new(svc.rule_id, svc.ep_bank, idx),
                ep_flags::INACTIVE,
            )
            .unwrap();
        }
        let (v, _) = run_xdp(dp, &syn("192.168.0.2", 50100, 80).bytes());
        assert_eq!(v, XDP_DROP);
        let stats: HashMap<_, _> = dp.stats().unwrap().into_iter().collect();
        assert_eq!(stats["drop_no_endpoint"], 1);
    });
}

#[test]
fn rules_with_4096_endpoints() {
    if !need_root("rules_with_4096_endpoints") {
        return;
    }
    let mut rules = String::from("rules:\n");
    for (port, sel) in [(80, "rr"), (81, "hash")] {
        rules += &format!("  - vip: 20.0.0.100\n    port: {port}\n    protocol: tcp\n    selection: {sel}\n    endpoints:\n");
        for i in 0..4096u32 {
            rules += &format!(
                "      - {{ ip: 10.{}.{}.{}, port: 8080 }}\n",
                100 + i / 65536,
                (i / 256) % 256,
                i % 256
            );
        }
    }
    with_datapath("big", &rules, |dp| {
        let mut seen = std::collections::HashSet::new();
        for i in 0..4096u32 {
            let client = format!("192.168.{}.{}", i / 200, 2 + i % 200);
            seen.insert(pick(dp, &syn(&client, 1024 + (i % 60000) as u16, 80)));
        }
        assert_eq!(seen.len(), 4096, "round-robin reaches every endpoint once");
        let mut hseen = std::collections::HashSet::new();
        for i in 0..16384u32 {
            let client = format!("172.16.{}.{}", i / 250, 1 + i % 250);
            hseen.insert(pick(dp, &syn(&client, 2000 + (i % 50000) as u16, 81)));
        }
        // 16k flows over 4096 Maglev-balanced endpoints: nearly all get some.
        assert!(hseen.len() > 3900, "only {} endpoints used", hseen.len());
    });
}

fn ep_slots(dp: &loxilb_agent::datapath::Datapath) -> HashMap<Ipv4Addr, u32> {
    dp.endpoints()
        .unwrap()
        .values()
        .map(|e| (Ipv4Addr::from(e.addr[3].to_ne_bytes()), e.stat_idx))
        .collect()
}

fn active_of(dp: &loxilb_agent::datapath::Datapath, a: Ipv4Addr) -> u64 {
    let idx = ep_slots(dp)[&a];
    dp.ep_stats(&[idx]).unwrap()[0].1
}

#[test]
fn least_connections_avoids_the_busy_endpoint_and_counts_are_kept() {
    if !need_root("least_connections_avoids_the_busy_endpoint_and_counts_are_kept") {
        return;
    }
    let rules = "rules:\n  - {vip: 20.0.0.100, port: 80, protocol: tcp, selection: lc, endpoints: [{ip: 10.0.1.10, port: 8080}, {ip: 10.0.1.11, port: 8080}, {ip: 10.0.1.12, port: 8080}]}\n";
    with_datapath("lc", rules, |dp| {
        let busy = Ipv4Addr::new(10, 0, 1, 10);
        let mut open = vec![];
        for i in 0..30u16 {
            let d = pick(dp, &syn("192.168.0.2", 60000 + i, 80));
            open.push((60000 + i, d));
        }
        let total: u64 = [10, 11, 12]
            .iter()
            .map(|h| active_of(dp, Ipv4Addr::new(10, 0, 1, *h)))
            .sum();
        assert_eq!(total, 30, "every new session counted active");
        // Close every session not on the busy endpoint (RST).
        for (sport, d) in &open {
            if d.0 != busy {
                let rst = Frame::tcp(
                    "192.168.0.2",
                    *sport,
                    "20.0.0.100",
                    80,
                    loxilb_tests::packet::RST,
                );
                run_xdp(dp, &rst.bytes());
            }
        }
        let busy_n = active_of(dp, busy);
        assert!(busy_n > 0);
        assert_eq!(
            active_of(dp, Ipv4Addr::new(10, 0, 1, 11)),
            0,
            "RST releases the session"
        );
        assert_eq!(active_of(dp, Ipv4Addr::new(10, 0, 1, 12)), 0);
        // New sessions now avoid the busy endpoint (power of two choices:
        // only when both choices land on it, about 1 in 9).
        let to_busy = (0..45u16)
            .filter(|i| pick(dp, &syn("192.168.0.3", 61000 + i, 80)).0 == busy)
            .count();
        assert!(
            to_busy <= 12,
            "{to_busy} of 45 new sessions went to the busiest endpoint"
        );
        // Per-endpoint counters.
        let slots = ep_slots(dp);
        let idx: Vec<u32> = [10, 11, 12]
            .iter()
            .map(|h| slots[&Ipv4Addr::new(10, 0, 1, *h)])
            .collect();
        let st = dp.ep_stats(&idx).unwrap();
        assert_eq!(st.iter().map(|(s, _)| s.new_sessions).sum::<u64>(), 75);
        assert!(st
            .iter()
            .all(|(s, _)| s.packets >= s.new_sessions && s.bytes > 0));
        // Sessions that vanish without a close (as LRU eviction does) leave
        // the counts high until the agent re-counts from conntrack.
        dp.clear_sessions().unwrap();
        assert!(active_of(dp, busy) > 0);
        assert!(dp.recount_active().unwrap() > 0);
        for h in [10, 11, 12] {
            assert_eq!(active_of(dp, Ipv4Addr::new(10, 0, 1, h)), 0);
        }
    });
}
