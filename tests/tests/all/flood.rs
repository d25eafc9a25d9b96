//! Conntrack exhaustion: a flood of new flows, more than the session table
//! holds, through BPF_PROG_TEST_RUN, while established sessions keep
//! sending. With the new-flow rate limit (`--max-new-flows`, here set in
//! the datapath's configuration as the agent sets it) the flood is refused
//! above the rate and counted; the established sessions keep their
//! endpoint and their translation both ways throughout, and the table
//! never fills.

use loxilb_common::MAX_CT_ENTRIES;
use loxilb_tests::{
    fib::{dst_of, run_xdp, verdict::XDP_REDIRECT, with_datapath, CLIENT_MAC, LB_TO_CLIENT_MAC},
    need_root,
    packet::{diff, Frame, ACK, SYN},
};
use std::net::Ipv4Addr;

const RULES: &str = "rules:\n  - {vip: 20.0.0.100, port: 80, protocol: tcp, endpoints: [{ip: 10.0.1.10, port: 8080}, {ip: 10.0.1.11, port: 8080}]}\n";
const ESTABLISHED: u16 = 32;

type Dp = loxilb_agent::datapath::Datapath;

fn stat(dp: &Dp, name: &str) -> u64 {
    dp.stats()
        .unwrap()
        .into_iter()
        .find(|(n, _)| *n == name)
        .unwrap_or_else(|| panic!("no counter {name}"))
        .1
}

/// Open the established sessions: SYN, the endpoint's SYN-ACK, an ACK.
/// Returns each one's endpoint.
fn establish(dp: &mut Dp) -> Vec<(Ipv4Addr, u16)> {
    (0..ESTABLISHED)
        .map(|i| {
            let syn = Frame::tcp("192.168.0.2", 40000 + i, "20.0.0.100", 80, SYN);
            let (v, out) = run_xdp(dp, &syn.bytes());
            assert_eq!(v, XDP_REDIRECT, "SYN of flow {i}");
            let ep = dst_of(&out);
            check(dp, i, ep, "before the flood");
            ep
        })
        .collect()
}

/// Flow `i` still goes to `ep`, and the endpoint's reply comes back
/// translated to the VIP.
fn check(dp: &mut Dp, i: u16, ep: (Ipv4Addr, u16), when: &str) {
    let ack = Frame::tcp("192.168.0.2", 40000 + i, "20.0.0.100", 80, ACK);
    let (v, out) = run_xdp(dp, &ack.bytes());
    assert_eq!(v, XDP_REDIRECT, "flow {i} {when}: forward verdict");
    assert_eq!(dst_of(&out), ep, "flow {i} {when}: kept its endpoint");
    let ep_ip = ep.0.to_string();
    let reply = Frame::tcp(&ep_ip, ep.1, "192.168.0.2", 40000 + i, SYN | ACK);
    let (v, out) = run_xdp(dp, &reply.bytes());
    assert_eq!(v, XDP_REDIRECT, "flow {i} {when}: reply verdict");
    let want = reply
        .with("20.0.0.100", 80, "192.168.0.2", 40000 + i)
        .routed(LB_TO_CLIENT_MAC, CLIENT_MAC)
        .bytes();
    assert_eq!(
        out,
        want,
        "flow {i} {when}: reply reverse-NATed\n{}",
        diff(&out, &want)
    );
}

/// `n` SYNs of distinct new flows (sources in 100.64.0.0/10), the
/// established sessions sending between every `every` of them.
fn flood(dp: &mut Dp, n: u32, every: u32, eps: &[(Ipv4Addr, u16)]) {
    // One frame, its source address and port patched per flow (the
    // datapath does not verify checksums it does not need to).
    let mut f = Frame::tcp("100.64.0.1", 1024, "20.0.0.100", 80, SYN).bytes();
    for k in 0..n {
        let src = 0x6440_0000u32 | (k >> 6);
        f[26..30].copy_from_slice(&src.to_be_bytes());
        f[34..36].copy_from_slice(&(1024 + (k & 63) as u16).to_be_bytes());
        run_xdp(dp, &f);
        if k % every == every - 1 {
            for (i, ep) in eps.iter().enumerate() {
                check(dp, i as u16, *ep, &format!("after {} flood packets", k + 1));
            }
        }
    }
}

#[test]
fn a_flood_beyond_the_table_is_refused_above_the_rate_and_established_sessions_stay() {
    if !need_root(
        "a_flood_beyond_the_table_is_refused_above_the_rate_and_established_sessions_stay",
    ) {
        return;
    }
    with_datapath("flood", RULES, |dp| {
        // 20,000 new flows per second on this CPU, 100 at once: what
        // `--max-new-flows 20000 --new-flow-burst 100` sets.
        let mut c = dp.config().unwrap();
        (c.new_flow_interval_ns, c.new_flow_burst) = (50_000, 100);
        dp.set_config(c).unwrap();
        let eps = establish(dp);
        let before = (stat(dp, "new_session"), stat(dp, "drop_new_flow_rate"));
        assert_eq!(before, (ESTABLISHED as u64, 0));

        let n = MAX_CT_ENTRIES + MAX_CT_ENTRIES / 8;
        let t0 = std::time::Instant::now();
        flood(dp, n, 20_000, &eps);
        let secs = t0.elapsed().as_secs_f64();

        let admitted = stat(dp, "new_session") - before.0;
        let refused = stat(dp, "drop_new_flow_rate");
        assert_eq!(
            admitted + refused,
            n as u64,
            "every flood SYN made a session or was refused and counted"
        );
        // The limit held: at most the rate over the time the flood took
        // (plus the burst and the coarse clock's tick), far below the flood.
        let bound = (20_000.0 * (secs + 0.1)) as u64 + 100;
        assert!(
            admitted <= bound,
            "{admitted} new sessions in {secs:.1} s (bound {bound})"
        );
        assert!(admitted > 0, "the rate still admits new flows");
        assert!(refused > n as u64 / 2, "{refused} of {n} refused");
        assert_eq!(stat(dp, "drop_ct_full"), 0);
        // The table never filled: nothing was evicted to make room.
        let live = dp.sessions().unwrap().len();
        assert!(
            live < MAX_CT_ENTRIES as usize,
            "{live} entries of {MAX_CT_ENTRIES}"
        );
        for (i, ep) in eps.iter().enumerate() {
            check(dp, i as u16, *ep, "after the flood");
        }
        eprintln!(
            "flood of {n} new flows in {secs:.1} s: {admitted} admitted, {refused} refused \
             (drop_new_flow_rate), {live} table entries; {ESTABLISHED} established sessions intact"
        );

        // The limit off again (as without the flag): new flows are all
        // admitted.
        let mut c = dp.config().unwrap();
        (c.new_flow_interval_ns, c.new_flow_burst) = (0, 0);
        dp.set_config(c).unwrap();
        let s0 = stat(dp, "new_session");
        for k in 0..1000u16 {
            let syn = Frame::tcp("100.127.0.1", 1024 + k, "20.0.0.100", 80, SYN);
            assert_eq!(run_xdp(dp, &syn.bytes()).0, XDP_REDIRECT);
        }
        assert_eq!(stat(dp, "new_session") - s0, 1000);
        assert_eq!(stat(dp, "drop_new_flow_rate"), refused);
    });
}

/// Without a limit, the session table's LRU keeps the sessions that carry
/// traffic: a flood of more new flows than the table holds evicts flood
/// entries (made once, never seen again), not established sessions that
/// sent within the flood.
#[test]
fn without_a_limit_the_lru_evicts_the_flood_not_the_established_sessions() {
    if !need_root("without_a_limit_the_lru_evicts_the_flood_not_the_established_sessions") {
        return;
    }
    with_datapath("flood-lru", RULES, |dp| {
        let eps = establish(dp);
        let n = MAX_CT_ENTRIES + MAX_CT_ENTRIES / 8;
        flood(dp, n, 20_000, &eps);
        assert_eq!(stat(dp, "new_session"), ESTABLISHED as u64 + n as u64);
        assert_eq!(stat(dp, "drop_new_flow_rate"), 0);
        for (i, ep) in eps.iter().enumerate() {
            check(dp, i as u16, *ep, "after the flood");
        }
    });
}
