//! The benchmark (`tests/src/bin/bench.rs`, `scripts/bench.sh`) is what
//! issue 14's figures come from, and nothing else runs it: here it runs
//! briefly (a few hundred calls per path, a 1 s long run, 500 flows with
//! the table full) so that it keeps working. Its own checks are what this
//! test relies on: every verdict of every timed call, the counters over the
//! timed calls, the references' translations; it exits non-zero when one
//! fails. No timing is asserted (the figures of so short a run mean
//! nothing); only that every part of the report is there.

use loxilb_tests::need_root;

/// Every row of the main table (labels as the bench prints them).
const ROWS: &[&str] = &[
    "floor (XDP_PASS only)",
    "ref: xdp_pass",
    "ref: parse+lookup",
    "ref: dnat ",
    "ref: dnat+ct, hit",
    "ref: dnat+ct, miss",
    "ref: lean v4 entry, 1 ins",
    "ref: our entry, 1 insert",
    "ref: our entry, 2 inserts",
    "ref: our entry, hit",
    "ref: 1 entry, hit",
    "ref: 1 entry, reply",
    "ref: 1 entry, miss",
    "ref: array table, hit",
    "ref: array table, 2 ins",
    "non-service",
    "established (DNAT)",
    "reply (reverse NAT)",
    "established (onearm)",
    "reply (onearm)",
    "established (fullnat)",
    "reply (fullnat)",
    "established (dsr L2)",
    "established (dsr-ipip)",
    "established (IPv6 DNAT)",
    "reply (IPv6)",
    "established (NAT64 6->4)",
    "reply (NAT64 4->6)",
    "established (SCTP DATA)",
    "SCTP INIT-ACK, multihomed",
    "new flow (rr)",
    "new flow (hash/Maglev)",
    "new flow (persist)",
    "new flow (lc)",
    "new flow (IPv6)",
    "new flow (NAT64)",
    "new flow (dsr, 1 entry)",
    "new flow (rr, 2 entries)",
];

/// Every program whose verified instructions and stack are reported.
const PROGRAMS: &[&str] = &[
    "loxilb loxilb_xdp ",
    "loxilb loxilb_xdp6 ",
    "loxilb loxilb_xdp_new4 ",
    "loxilb loxilb_xdp_new6 ",
    "loxilb loxilb_xdp_one6 ",
    "loxilb loxilb_xdp_sctp4 ",
    "loxilb loxilb_xdp_sctp6 ",
    "loxilb loxilb_tc ",
    "loxilb loxilb_tc6 ",
    "loxilb loxilb_tc_new4 ",
    "loxilb loxilb_tc_new6 ",
    "loxilb loxilb_tc_egress ",
    "ref    ref_xdp_dnat_ct ",
    "ref    ref_xdp_dnat_ct_lean ",
    "ref    ref_xdp_dnat_ct_shape1 ",
    "ref    ref_xdp_dnat_tbl2 ",
];

#[test]
fn the_benchmark_runs_every_path_and_its_checks_pass() {
    if !need_root("the_benchmark_runs_every_path_and_its_checks_pass") {
        return;
    }
    let text = loxilb_tests::netns::run_test_bin(
        "bench",
        &[
            "--rounds",
            "1",
            "--iters",
            "200",
            "--warmup",
            "100",
            "--soak",
            "1",
            "--soak-flows",
            "2000",
            "--full",
            "500",
        ],
    );
    let row = |label: &str| {
        text.lines()
            .find(|l| l.starts_with(label))
            .unwrap_or_else(|| panic!("no row {label:?} in:\n{text}"))
            .to_string()
    };
    for label in ROWS {
        // Each row: its label, then the calls it timed (1 round x 200).
        let r = row(label);
        let calls = r[label.len()..].split_whitespace().next().unwrap_or("");
        assert_eq!(calls, "200", "row {label:?} timed {calls} calls: {r}");
    }
    for p in PROGRAMS {
        let l = text
            .lines()
            .find(|l| l.trim_start().starts_with(p))
            .unwrap_or_else(|| panic!("program {p:?} not reported:\n{text}"));
        assert!(l.contains(" insns") && l.contains("stack "), "{l}");
    }
    for part in [
        "note: counters over the timed calls as expected",
        "= reference miss",
        "the least entry that loses no feature (IPv4 only: 16 B key, 104 B value",
        "new-flow rate (rr, one core, datapath time):",
        "targets (over the floor median; reported only, never enforced):",
        "2000 sessions opened by SYNs",
        "session table full:",
        "new flow (rr), every insert evicting:",
    ] {
        assert!(text.contains(part), "missing {part:?} in:\n{text}");
    }
    let after = row("  after the long run:");
    assert!(
        after.contains("ct_expired +0") && after.contains("drops +0"),
        "{after}"
    );
    let ns = loxilb_tests::netns::sh(&["ip", "netns", "list"]).unwrap();
    assert!(
        !ns.contains("lxbench"),
        "bench left namespaces behind: {ns}"
    );
}
