//! Datapath benchmark: nanoseconds per packet through BPF_PROG_TEST_RUN.
//!
//! Every call runs the program once (`repeat = 1`) on a fresh copy of the
//! packet, so programs that rewrite the packet are timed on the packet they
//! would really see; the figure is the kernel's own per-call `duration`
//! (a `ktime_get_ns()` read either side of the program). The floor is a
//! program that only returns XDP_PASS, fed the same packet: "over floor" is
//! what the load balancer itself costs.
//!
//! Paths, interleaved round by round:
//! - floor: `loxilb_xdp_pass`;
//! - non-service: a TCP packet to an address that is neither a VIP nor an
//!   endpoint (passed to the stack);
//! - established, one per NAT mode, each on its own VIP port: ACKs of a
//!   flow whose session a SYN created (conntrack hit, cached next hop,
//!   redirect): default (DNAT), onearm and fullnat (source NAT to an
//!   allocated port as well), dsr (L2: only the MACs change) and dsr-ipip
//!   (IPIP encapsulation to the endpoint);
//! - reply, for the modes whose replies come back through the load
//!   balancer (default, onearm, fullnat): the endpoint's packets of that
//!   flow, to the client or to the allocated source port (reverse NAT,
//!   redirect);
//! - new flow: every call a tuple never seen before (service lookup,
//!   endpoint selection, two conntrack inserts, DNAT, redirect), once per
//!   selection algorithm (rr, hash, persist, lc) and for IPv6 and NAT64;
//! - IPv6: established and reply of a NAT66 (DNAT) flow, and of a NAT64
//!   flow (IPv6 client, IPv4 endpoint: the header translated both ways).
//!
//! Every mode's flow is checked byte for byte before timing (SYN, ACK and,
//! where there is one, reply), and every timed verdict must be XDP_REDIRECT
//! (XDP_PASS for the floor and non-service).
//!
//! Runs in a namespace built by `fib::fib_netns`, so `bpf_fib_lookup`
//! resolves the endpoints and the client. Needs root.
//!
//! Reference programs (loxilb-ebpf/ref, built by this crate's build.rs and
//! loaded from their own object with maps of their own) are timed in the
//! same rounds: `ref_xdp_pass`, `ref_xdp_parse_lookup` (on the non-service
//! packet), `ref_xdp_dnat`, and `ref_xdp_dnat_ct` on a conntrack hit (the
//! DNAT flow's ACK) and a miss (a new tuple every call). Each of our rows
//! is printed against its matching reference: established and reply paths
//! against the conntrack hit, new flows against the miss, non-service
//! against parse + lookup. `ref_xdp_dnat_ct_shape1` / `_shape2` make the
//! miss with the datapath's conntrack entry shape, one insert and two; a
//! line after the table splits the rr new-flow cost with them (reference
//! miss | entry shape | second insert | the rest of our path).
//! `ref_xdp_dnat_ct_lean` makes it with the least entry that keeps every
//! feature of ours for an IPv4 session (16-byte key, 104-byte value): the
//! most that a leaner layout (IPv4 sessions in a table of their own) could
//! save.
//! `ref_xdp_dnat_tbl` / `_tbl2` keep the same entry shape in a
//! set-associative table of array maps instead of the LRU hash (a hit; a
//! miss with two inserts): what a session table the verifier inlines,
//! with no call into the kernel, costs.
//!
//! Then: the instructions the verifier processed and the stack of every
//! program, ours and the references'; the new-flow rate; and a long run
//! (`--soak`, 60 s) with 100,000 live sessions, established packets spread
//! over all of them, reported per 10 s window to show no degradation;
//! and new flows with the session table full (`--full`, 20,000 flows), as
//! on a busy node, where every insert evicts a live session, against both
//! conntrack references filled the same way.
//!
//! `bench [--iters N] [--rounds R] [--warmup W] [--soak S] [--soak-flows F] [--full N]`

use loxilb_tests::fib::verdict::{XDP_PASS, XDP_REDIRECT};
use std::{
    collections::{HashMap, HashSet},
    process::{exit, Command},
    sync::atomic::{AtomicBool, Ordering},
    time::Instant,
};

use anyhow::{anyhow, bail, Context, Result};
use aya::programs::{TestRun, TestRunOptions, Xdp};
use loxilb_agent::{config, datapath::Datapath, rules::Rules};
use loxilb_common::{
    addr_filter_bit, ct_dir, lb_mode, prog_names, CtKey, CtVal, IPPROTO_TCP, MAX_CT_ENTRIES,
    SNAT_PORT_HI, SNAT_PORT_LO,
};
use loxilb_tests::{
    fib::{fib_netns, CLIENT_MAC, EP1_MAC, EP2_MAC, LB_TO_CLIENT_MAC, LB_TO_EP_MAC},
    netns::enter,
    packet::{diff, ipip_wrap, Frame, ACK, SYN},
    sctp_packet::{Chunk, SctpFrame, SctpPacket},
};

const VIP: &str = "20.0.0.100";
const CLIENT: &str = "192.168.0.2";
const CLIENT_PORT: u16 = 40000;
const EP_PORT: u16 = 8080;
/// The NAT64 rule's endpoint port: not web's (an IPv4 endpoint a NAT64
/// rule shares is not in the endpoint index, and web's sessions would
/// keep two entries).
const NAT64_EP_PORT: u16 = 8064;

/// The node's address on the endpoints' segment in `fib_netns` (d0): the
/// onearm source and the outer source of IPIP DSR.
const LB_EP_ADDR: &str = "10.0.1.1";

/// One rule per NAT mode, each on its own VIP port (see `MODES`). DSR
/// endpoints listen on the service port: the packet reaches them untranslated.
const RULES: &str = r#"
rules:
  - name: web
    vip: 20.0.0.100
    port: 80
    protocol: tcp
    endpoints:
      - { ip: 10.0.1.10, port: 8080 }
      - { ip: 10.0.1.11, port: 8080 }
  - { name: onearm, vip: 20.0.0.100, port: 81, protocol: tcp, mode: onearm, endpoints: [{ ip: 10.0.1.10, port: 8081 }] }
  - { name: fullnat, vip: 20.0.0.100, port: 82, protocol: tcp, mode: fullnat, endpoints: [{ ip: 10.0.1.10, port: 8082 }] }
  - { name: dsr, vip: 20.0.0.100, port: 83, protocol: tcp, mode: dsr, endpoints: [{ ip: 10.0.1.10, port: 83 }] }
  - { name: dsr-ipip, vip: 20.0.0.100, port: 84, protocol: tcp, mode: dsr-ipip, endpoints: [{ ip: 10.0.1.10, port: 84 }] }
  - { name: hash, vip: 20.0.0.100, port: 85, protocol: tcp, selection: hash, endpoints: [{ ip: 10.0.1.10, port: 8085 }, { ip: 10.0.1.11, port: 8085 }] }
  - { name: persist, vip: 20.0.0.100, port: 86, protocol: tcp, selection: persist, endpoints: [{ ip: 10.0.1.10, port: 8086 }, { ip: 10.0.1.11, port: 8086 }] }
  - { name: lc, vip: 20.0.0.100, port: 87, protocol: tcp, selection: lc, endpoints: [{ ip: 10.0.1.10, port: 8087 }, { ip: 10.0.1.11, port: 8087 }] }
  - { name: web-shared, vip: 20.0.0.100, port: 88, protocol: tcp, endpoints: [{ ip: 10.0.1.10, port: 8088 }, { ip: 10.0.1.11, port: 8088 }] }
  - { name: web-shared2, vip: 20.0.0.100, port: 89, protocol: tcp, endpoints: [{ ip: 10.0.1.10, port: 8088 }, { ip: 10.0.1.11, port: 8088 }] }
  - { name: web6, vip: "fd00:20::100", port: 80, protocol: tcp, endpoints: [{ ip: "fd00:1::10", port: 8080 }] }
  - { name: nat64, vip: "fd00:20::100", port: 84, protocol: tcp, endpoints: [{ ip: 10.0.1.10, port: 8064 }] }
  - { name: sctp, vip: 20.0.0.100, port: 3868, protocol: sctp, endpoints: [{ ip: 10.0.1.10, port: 30868 }] }
  - { name: sctp-mh, vip: 20.0.0.100, secondary_vips: [20.0.0.101], port: 3870, protocol: sctp, endpoints: [{ ip: 10.0.1.10, port: 30870 }] }
"#;

const VIP6: &str = "fd00:20::100";
const CLIENT6: &str = "fd00:c::2";
const EP6: &str = "fd00:1::10";

/// New flows, per selection algorithm and family: (kind, label, VIP, port).
/// (rr, hash, persist and lc go to endpoints their rule alone serves: IPv4
/// DNAT sessions of one conntrack entry, their replies found through the
/// endpoint index. `rr, 2 entries` goes to endpoints two rules share, so
/// its sessions keep a reply entry: the two rr rows show what the second
/// insert costs in our own datapath. DSR makes one entry too.)
const NEW_FLOWS: [(NewKind, &str, &str, u16); 8] = [
    (NewKind::Rr, "new flow (rr)", VIP, 80),
    (NewKind::Hash, "new flow (hash/Maglev)", VIP, 85),
    (NewKind::Persist, "new flow (persist)", VIP, 86),
    (NewKind::Lc, "new flow (lc)", VIP, 87),
    (NewKind::V6, "new flow (IPv6)", VIP6, 80),
    (NewKind::Nat64, "new flow (NAT64)", VIP6, 84),
    (NewKind::Dsr, "new flow (dsr, 1 entry)", VIP, 83),
    (NewKind::Rr2, "new flow (rr, 2 entries)", VIP, 88),
];
/// Targets, in ns over the floor's median (reported, never enforced).
/// New flow of rr (IPv4); hash, persist and lc within `TARGET_NEW_SEL_X`
/// of it.
const TARGET_NEW_FLOW_NS: f64 = 430.0;
const TARGET_NEW_SEL_X: f64 = 1.2;
/// Established IPv6 flow, SCTP DATA of an established association.
const TARGET_ESTABLISHED6_NS: f64 = 100.0;
const TARGET_SCTP_NS: f64 = 100.0;
/// Established flow (and its replies), every NAT mode, IPv4.
const TARGET_ESTABLISHED_NS: f64 = 75.0;
const TARGET_NON_SERVICE_NS: f64 = 20.0;
const TARGET_MODE_NS: f64 = 75.0;
const TARGET_DSR_IPIP_NS: f64 = 75.0;

/// The reference programs (loxilb-ebpf/ref), built by this crate's build.rs:
/// the least each path can cost, timed in the same run as the datapath.
static REF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/loxilb-ref"));
const REF_XDP_PROGS: [&str; 10] = [
    "ref_xdp_pass",
    "ref_xdp_parse_lookup",
    "ref_xdp_dnat",
    "ref_xdp_dnat_ct",
    "ref_xdp_dnat_ct_lean",
    "ref_xdp_dnat_ct_shape1",
    "ref_xdp_dnat_ct_shape2",
    "ref_xdp_dnat_one",
    "ref_xdp_dnat_tbl",
    "ref_xdp_dnat_tbl2",
];
const REF_TC_PROGS: [&str; 2] = ["ref_tc_pass", "ref_tc_parse_lookup"];
/// Entries of the reference conntrack LRU (as in loxilb-ebpf/ref); its
/// miss path clears it before half of them are in use.
const REF_CT_ENTRIES: usize = 262_144;
/// A bucket of the reference array table (8 tags of 8 bytes, 8 ticks of 4).
const REF_TBL_BUCKET_SIZE: usize = 96;
/// `LeanVal` of loxilb-ebpf/ref: the least entry every feature of ours
/// needs, for an IPv4 session (under the 16-byte `RefCtKey`).
const REF_LEAN_VAL_SIZE: usize = 104;

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Mode {
    Dnat,
    OneArm,
    FullNat,
    Dsr,
    DsrIpip,
}

/// A NAT mode as the benchmark exercises it.
struct ModeSpec {
    mode: Mode,
    /// Rule name in `RULES`.
    rule: &'static str,
    /// `lb_mode::*` the session must be created with.
    lb_mode: u8,
    /// VIP port of the mode's rule, and its endpoint's port.
    vport: u16,
    ep_port: u16,
    /// Conntrack entries a new session of this mode makes.
    entries: usize,
    /// Row labels: established path, reply path (None: replies do not come
    /// back through the load balancer).
    est_label: &'static str,
    reply_label: Option<&'static str>,
    /// Target of the established path: name, ns over floor.
    target_name: &'static str,
    target_ns: f64,
}

const MODES: [ModeSpec; 5] = [
    ModeSpec {
        mode: Mode::Dnat,
        rule: "web",
        lb_mode: lb_mode::DEFAULT,
        vport: 80,
        ep_port: EP_PORT,
        // Its endpoints serve it alone: one-entry sessions.
        entries: 1,
        est_label: "established (DNAT)",
        reply_label: Some("reply (reverse NAT)"),
        target_name: "established-flow DNAT",
        target_ns: TARGET_ESTABLISHED_NS,
    },
    ModeSpec {
        mode: Mode::OneArm,
        rule: "onearm",
        lb_mode: lb_mode::ONEARM,
        vport: 81,
        // (Not web's endpoint port: a reply from an endpoint the index
        // holds for a DNAT service pays a failed lookup of the forward
        // key first, which is not this mode's path.)
        ep_port: 8081,
        entries: 2,
        est_label: "established (onearm)",
        reply_label: Some("reply (onearm)"),
        target_name: "established onearm",
        target_ns: TARGET_MODE_NS,
    },
    ModeSpec {
        mode: Mode::FullNat,
        rule: "fullnat",
        lb_mode: lb_mode::FULLNAT,
        vport: 82,
        ep_port: 8082,
        entries: 2,
        est_label: "established (fullnat)",
        reply_label: Some("reply (fullnat)"),
        target_name: "established fullnat",
        target_ns: TARGET_MODE_NS,
    },
    ModeSpec {
        mode: Mode::Dsr,
        rule: "dsr",
        lb_mode: lb_mode::DSR,
        vport: 83,
        ep_port: 83,
        entries: 1,
        est_label: "established (dsr L2)",
        reply_label: None,
        target_name: "established dsr (L2)",
        target_ns: TARGET_MODE_NS,
    },
    ModeSpec {
        mode: Mode::DsrIpip,
        rule: "dsr-ipip",
        lb_mode: lb_mode::DSR_IPIP,
        vport: 84,
        ep_port: 84,
        entries: 1,
        est_label: "established (dsr-ipip)",
        reply_label: None,
        target_name: "established dsr-ipip",
        target_ns: TARGET_DSR_IPIP_NS,
    },
];

/// New-flow sessions are left in the table; once this many flows (two
/// entries each) are live, the table is cleared between rounds (and the
/// established flow put back), so it never fills and evicts the flows
/// being timed. A default run stays below it.
const NEW_FLOW_BUDGET: usize = MAX_CT_ENTRIES as usize / 4;
/// NAT64 sessions all take a source port toward the one endpoint, from
/// the node's one address (28,232 ports): the table is cleared before a
/// third of them are in use, so allocation is timed as it normally runs.
const NAT64_FLOW_BUDGET: usize = 9_000;

/// Calls a path makes before the next path takes its turn.
const CHUNK: usize = 1000;

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

struct Opts {
    iters: usize,
    rounds: usize,
    warmup: usize,
    /// Seconds of the long run with `soak_flows` live sessions (0: none).
    soak_s: usize,
    soak_flows: usize,
    /// New flows timed with the session table full (0: skip).
    full: usize,
}

const USAGE: &str =
    "usage: bench [--iters N] [--rounds R] [--warmup W] [--soak S] [--soak-flows F] [--full N]
  --iters N       timed calls per path per round (default 20000)
  --rounds R      interleaved rounds (default 5)
  --warmup W      untimed calls per path before the first round (default 10000)
  --soak S        seconds of the long run with many live sessions (default 60; 0: skip)
  --soak-flows F  live sessions of the long run (default 100000)
  --full N        new flows timed with the session table full, every insert
                  evicting (default 20000; 0: skip)
Needs root (loads BPF programs, creates a network namespace).";

fn parse_args() -> Result<Opts, String> {
    let mut o = Opts {
        iters: 20_000,
        rounds: 5,
        warmup: 10_000,
        soak_s: 60,
        soak_flows: 100_000,
        full: 20_000,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let slot = match a.as_str() {
            "--iters" => &mut o.iters,
            "--rounds" => &mut o.rounds,
            "--warmup" => &mut o.warmup,
            "--soak" => &mut o.soak_s,
            "--soak-flows" => &mut o.soak_flows,
            "--full" => &mut o.full,
            "-h" | "--help" => {
                println!("{USAGE}");
                exit(0);
            }
            _ => return Err(format!("unknown argument {a:?}")),
        };
        let v = args.next().ok_or_else(|| format!("{a} needs a number"))?;
        *slot = v
            .parse()
            .map_err(|_| format!("{a} {v:?}: not a whole number"))?;
    }
    if o.iters == 0 || o.rounds == 0 {
        return Err("--iters and --rounds must be at least 1".into());
    }
    Ok(o)
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Floor,
    Ref(RefKind),
    NonService,
    Established(Mode),
    Reply(Mode),
    NewFlow(NewKind),
    Extra(Extra),
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum NewKind {
    Rr,
    /// rr to endpoints two rules share: two entries per session.
    Rr2,
    Hash,
    Persist,
    Lc,
    V6,
    Nat64,
    Dsr,
}

/// The reference programs' paths.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum RefKind {
    /// `ref_xdp_pass` (the floor again, from the other object).
    Pass,
    /// `ref_xdp_parse_lookup` on the non-service packet.
    ParseLookup,
    /// `ref_xdp_dnat` on the established DNAT flow's ACK.
    Dnat,
    /// `ref_xdp_dnat_ct`, a conntrack hit (the same ACK).
    DnatCtHit,
    /// `ref_xdp_dnat_ct`, a miss: every call a new tuple.
    DnatCtMiss,
    /// `ref_xdp_dnat_ct_lean`: the miss with the least entry that keeps
    /// every feature of ours, IPv4 only (16-byte key, 104-byte value, our
    /// table's size), one insert.
    LeanMiss1,
    /// `ref_xdp_dnat_ct_shape1`: the miss with the datapath's conntrack
    /// entry shape (key and value sizes, table size), one insert.
    ShapeMiss1,
    /// `ref_xdp_dnat_ct_shape2`: the same with a reply entry inserted too.
    ShapeMiss2,
    /// `ref_xdp_dnat_ct_shape1`, a hit (the DNAT flow's ACK): what a
    /// packet of either direction costs with an entry per direction.
    ShapeHit,
    /// `ref_xdp_dnat_one` (one entry per session), a hit of the client's
    /// ACK.
    OneHit,
    /// `ref_xdp_dnat_one`, the endpoint's reply: found through the
    /// endpoint index and the forward entry.
    OneReply,
    /// `ref_xdp_dnat_one`, a miss: one insert.
    OneMiss,
    /// `ref_xdp_dnat_tbl`: our entry shape in a set-associative table of
    /// array maps (no kernel call), a hit.
    TblHit,
    /// `ref_xdp_dnat_tbl2`: its miss, two inserts (as `ShapeMiss2`).
    TblMiss2,
}

/// Which object a path's program is in.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Obj {
    Ours,
    Ref,
}

/// IPv6 paths of established flows.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Extra {
    Est6,
    Reply6,
    Est64,
    Reply64,
    Sctp,
    SctpInitAck,
}

struct PathBench {
    kind: Kind,
    label: &'static str,
    obj: Obj,
    prog: &'static str,
    verdict: u32,
    /// The packet every call gets (empty for the new-flow path, whose
    /// packets are all different).
    packet: Vec<u8>,
    /// (VIP, port) of the rule whose counters its packets go to.
    rule_port: Option<(&'static str, u16)>,
    samples: Vec<u32>,
    round_medians: Vec<f64>,
}

impl PathBench {
    fn new(
        kind: Kind,
        label: &'static str,
        prog: &'static str,
        verdict: u32,
        packet: Vec<u8>,
        rule_port: Option<(&'static str, u16)>,
    ) -> Self {
        PathBench {
            kind,
            label,
            obj: if matches!(kind, Kind::Ref(_)) {
                Obj::Ref
            } else {
                Obj::Ours
            },
            prog,
            verdict,
            packet,
            rule_port,
            samples: vec![],
            round_medians: vec![],
        }
    }
}

/// What the run measured, handed back to the main thread.
struct Outcome {
    paths: Vec<PathBench>,
    notes: Vec<String>,
    /// (object, program, instructions verified, stack per subprogram).
    progs: Vec<ProgStat>,
    /// Lines of the long run with many live sessions.
    soak: Vec<String>,
    full: Vec<String>,
}

fn verdict_name(v: u32) -> String {
    let n = match v {
        0 => "XDP_ABORTED",
        1 => "XDP_DROP",
        2 => "XDP_PASS",
        3 => "XDP_TX",
        4 => "XDP_REDIRECT",
        _ => "?",
    };
    format!("{n} ({v})")
}

fn median(sorted: &[u32]) -> f64 {
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2] as f64
    } else {
        (sorted[n / 2 - 1] as f64 + sorted[n / 2] as f64) / 2.0
    }
}

fn percentile(sorted: &[u32], p: f64) -> u32 {
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

/// One call, with the output bytes (for the correctness checks).
fn run_once(prog: &Xdp, input: &[u8]) -> Result<(u32, Vec<u8>)> {
    let mut out = vec![0u8; input.len() + 256];
    let r = prog
        .test_run(TestRunOptions {
            data_in: Some(input),
            data_out: Some(&mut out),
            repeat: 1,
            ..Default::default()
        })
        .context("BPF_PROG_TEST_RUN")?;
    out.truncate(r.data_size_out as usize);
    Ok((r.return_value, out))
}

/// Time one call per packet; every verdict must be `want`.
fn run_block<'a>(
    prog: &Xdp,
    packets: impl Iterator<Item = &'a [u8]>,
    want: u32,
    what: &str,
    out: Option<&mut Vec<u32>>,
) -> Result<()> {
    let mut sink = vec![];
    let out = out.unwrap_or(&mut sink);
    for (i, p) in packets.enumerate() {
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(p),
                repeat: 1,
                ..Default::default()
            })
            .with_context(|| format!("BPF_PROG_TEST_RUN failed on the {what} path (call {i})"))?;
        if r.return_value != want {
            bail!(
                "{what} path, call {i}: verdict {} where {} was expected; the figures would \
                 time another path than the one named, so the benchmark stops here",
                verdict_name(r.return_value),
                verdict_name(want)
            );
        }
        out.push(r.duration.as_nanos() as u32);
        if i % 1024 == 0 && STOP.load(Ordering::Relaxed) {
            bail!("interrupted");
        }
    }
    Ok(())
}

/// Source 100.64.0.0/20 (fd00:64::/96 for IPv6) x ports 1024.. : distinct
/// for every `i` below 264M.
fn new_flow_frame(kind: NewKind, i: usize) -> Vec<u8> {
    let sport = 1024 + (i >> 12) as u16;
    let (_, _, vip, port) = NEW_FLOWS.iter().find(|n| n.0 == kind).expect("listed");
    let src = if vip.contains(':') {
        format!("fd00:64::{:x}:{:x}", (i >> 8) & 0x0f, i & 0xff)
    } else {
        format!("100.64.{}.{}", (i >> 8) & 0x0f, i & 0xff)
    };
    Frame::tcp(&src, sport, vip, *port, SYN).bytes()
}

/// The IPv6 flows (NAT66 and NAT64), opened and checked byte for byte:
/// (path, packet) for each of their established and reply paths.
fn open_ipv6_flows(dp: &mut Datapath, notes: &mut Vec<String>) -> Result<Vec<(Extra, Vec<u8>)>> {
    let main = prog_names::XDP_MAIN;
    // NAT66, default mode.
    let syn = Frame::tcp(CLIENT6, CLIENT_PORT, VIP6, 80, SYN);
    let to_ep = |f: &Frame| {
        f.with(CLIENT6, CLIENT_PORT, EP6, EP_PORT)
            .routed(LB_TO_EP_MAC, EP1_MAC)
            .bytes()
    };
    check(
        dp,
        "IPv6 SYN",
        main,
        &syn.bytes(),
        XDP_REDIRECT,
        &to_ep(&syn),
    )?;
    let ack = Frame::tcp(CLIENT6, CLIENT_PORT, VIP6, 80, ACK);
    check(
        dp,
        "IPv6 ACK",
        main,
        &ack.bytes(),
        XDP_REDIRECT,
        &to_ep(&ack),
    )?;
    let reply = Frame::tcp(EP6, EP_PORT, CLIENT6, CLIENT_PORT, ACK);
    let want = reply
        .with(VIP6, 80, CLIENT6, CLIENT_PORT)
        .routed(LB_TO_CLIENT_MAC, CLIENT_MAC)
        .bytes();
    check(dp, "IPv6 reply", main, &reply.bytes(), XDP_REDIRECT, &want)?;
    notes.push(format!(
        "IPv6 flow (rule web6) [{CLIENT6}]:{CLIENT_PORT} -> [{VIP6}]:80: to [{EP6}]:{EP_PORT}"
    ));
    // NAT64: the IPv4 side's source is the node's address toward the
    // endpoint, with an allocated port.
    let syn = Frame::tcp(CLIENT6, CLIENT_PORT, VIP6, 84, SYN);
    let (v, out) = run_once(dp.xdp_program(main)?, &syn.bytes())?;
    if v != XDP_REDIRECT || out.len() < 36 {
        bail!("the NAT64 SYN got {}", verdict_name(v));
    }
    let sport = u16::from_be_bytes([out[34], out[35]]);
    let as_v4 = |f: &Frame| {
        let mut g = f.with(LB_EP_ADDR, sport, "10.0.1.10", NAT64_EP_PORT);
        g.id = 0;
        g.frag = 0;
        g.routed(LB_TO_EP_MAC, EP1_MAC).bytes()
    };
    if out != as_v4(&syn) {
        bail!("NAT64 SYN translated wrongly\n{}", diff(&out, &as_v4(&syn)));
    }
    let ack64 = Frame::tcp(CLIENT6, CLIENT_PORT, VIP6, 84, ACK);
    check(
        dp,
        "NAT64 ACK",
        main,
        &ack64.bytes(),
        XDP_REDIRECT,
        &as_v4(&ack64),
    )?;
    let reply64 = Frame::tcp("10.0.1.10", NAT64_EP_PORT, LB_EP_ADDR, sport, ACK);
    let want = reply64
        .with(VIP6, 84, CLIENT6, CLIENT_PORT)
        .routed(LB_TO_CLIENT_MAC, CLIENT_MAC)
        .bytes();
    check(
        dp,
        "NAT64 reply",
        main,
        &reply64.bytes(),
        XDP_REDIRECT,
        &want,
    )?;
    notes.push(format!(
        "NAT64 flow (rule nat64) [{CLIENT6}]:{CLIENT_PORT} -> [{VIP6}]:84: to {LB_EP_ADDR}:{sport} -> 10.0.1.10:{NAT64_EP_PORT}, reply translated back to IPv6"
    ));
    // SCTP: an association opened by an INIT, then DATA (ports rewritten:
    // the CRC32c is updated for them).
    let c: std::net::IpAddr = CLIENT.parse().unwrap();
    let init = SctpFrame::new(
        CLIENT,
        VIP,
        SctpPacket::new(CLIENT_PORT, 3868, 0).chunk(Chunk::init(0x1111, 1, &[c])),
    );
    let to_ep = |f: &SctpFrame| {
        f.with_addrs(CLIENT, "10.0.1.10")
            .with_ports(CLIENT_PORT, 30868)
            .routed(LB_TO_EP_MAC, EP1_MAC)
            .bytes()
    };
    check(
        dp,
        "SCTP INIT",
        main,
        &init.bytes(),
        XDP_REDIRECT,
        &to_ep(&init),
    )?;
    let data = SctpFrame::new(
        CLIENT,
        VIP,
        SctpPacket::new(CLIENT_PORT, 3868, 0x2222).chunk(Chunk::data(2, 0, 0, 0, &[0x42; 32])),
    );
    check(
        dp,
        "SCTP DATA",
        main,
        &data.bytes(),
        XDP_REDIRECT,
        &to_ep(&data),
    )?;
    notes.push(format!(
        "SCTP association (rule sctp) {CLIENT}:{CLIENT_PORT} -> {VIP}:3868: to 10.0.1.10:30868, \
         DATA of 32 bytes (CRC32c updated for the ports)"
    ));
    // A multihomed association (rule sctp-mh): the INIT, then the
    // endpoint's INIT-ACK listing two addresses, rewritten to the two VIPs
    // (a walk of tail calls, one per parameter, and a CRC32c update per
    // rewritten address). Timed: the INIT-ACK, walked and rewritten anew
    // each call.
    let init = SctpFrame::new(
        CLIENT,
        VIP,
        SctpPacket::new(CLIENT_PORT, 3870, 0).chunk(Chunk::init(0x3333, 1, &[c])),
    );
    check(
        dp,
        "multihomed SCTP INIT",
        main,
        &init.bytes(),
        XDP_REDIRECT,
        &init
            .with_addrs(CLIENT, "10.0.1.10")
            .with_ports(CLIENT_PORT, 30870)
            .routed(LB_TO_EP_MAC, EP1_MAC)
            .bytes(),
    )?;
    let ip = |s: &str| -> std::net::IpAddr { s.parse().unwrap() };
    let cookie = [0x5a; 64];
    let init_ack = |a: &str, b: &str| Chunk::init_ack(0x4444, 1, &[ip(a), ip(b)], &cookie);
    let ack_mh = SctpFrame::new(
        "10.0.1.10",
        CLIENT,
        SctpPacket::new(30870, CLIENT_PORT, 0x3333).chunk(init_ack("10.0.1.10", "10.0.1.11")),
    );
    let want = SctpFrame::new(
        VIP,
        CLIENT,
        SctpPacket::new(3870, CLIENT_PORT, 0x3333).chunk(init_ack(VIP, "20.0.0.101")),
    )
    .routed(LB_TO_CLIENT_MAC, CLIENT_MAC);
    check(
        dp,
        "multihomed SCTP INIT-ACK",
        main,
        &ack_mh.bytes(),
        XDP_REDIRECT,
        &want.bytes(),
    )?;
    notes.push(format!(
        "multihomed SCTP association (rule sctp-mh) {CLIENT}:{CLIENT_PORT} -> {VIP}:3870: \
         INIT-ACK from 10.0.1.10 listing 10.0.1.10, 10.0.1.11 and a 64-byte cookie: to the \
         client listing {VIP}, 20.0.0.101"
    ));
    Ok(vec![
        (Extra::Est6, ack.bytes()),
        (Extra::Reply6, reply.bytes()),
        (Extra::Est64, ack64.bytes()),
        (Extra::Reply64, reply64.bytes()),
        (Extra::Sctp, data.bytes()),
        (Extra::SctpInitAck, ack_mh.bytes()),
    ])
}

/// The reference programs' map layouts (as in loxilb-ebpf/ref).
#[repr(C)]
#[derive(Clone, Copy)]
struct RefSvcKey {
    addr: u32,
    port: u16,
    proto: u8,
    pad: u8,
}
#[repr(C)]
#[derive(Clone, Copy)]
struct RefSvcVal {
    id: u32,
    nbackends: u32,
}
#[repr(C)]
#[derive(Clone, Copy)]
struct RefBackend {
    addr: u32,
    port: u16,
    mac: [u8; 6],
}
#[repr(C)]
#[derive(Clone, Copy)]
struct RefCtKey {
    saddr: u32,
    daddr: u32,
    sport: u16,
    dport: u16,
    proto: u8,
    pad: [u8; 3],
}
#[repr(C)]
#[derive(Clone, Copy)]
struct RefCtVal {
    backend: u32,
    pad: u32,
    packets: u64,
}
const _: () = assert!(std::mem::size_of::<RefSvcKey>() == 8);
const _: () = assert!(std::mem::size_of::<RefBackend>() == 12);
const _: () = assert!(std::mem::size_of::<RefCtKey>() == 16);
const _: () = assert!(std::mem::size_of::<RefCtVal>() == 16);
/// `EpIdx` of loxilb-ebpf/ref.
#[repr(C)]
#[derive(Clone, Copy)]
struct RefEpIdx {
    addr: u32,
    port: u16,
    proto: u8,
    pad: u8,
    vip: u32,
    vport: u16,
    pad2: u16,
}
const _: () = assert!(std::mem::size_of::<RefEpIdx>() == 16);
// SAFETY: plain data, no padding.
unsafe impl aya::Pod for RefSvcKey {}
unsafe impl aya::Pod for RefSvcVal {}
unsafe impl aya::Pod for RefBackend {}
unsafe impl aya::Pod for RefCtKey {}
unsafe impl aya::Pod for RefCtVal {}
unsafe impl aya::Pod for RefEpIdx {}

/// The reference programs, loaded, with the benchmark's DNAT service
/// (VIP:80/TCP -> rule web's two endpoints) in their maps.
struct Refs {
    ebpf: aya::Ebpf,
    /// The DNAT flow's ACK: run through `ref_xdp_dnat_one` after every
    /// clear, so the endpoint's reply finds its session's entry.
    reopen: Vec<u8>,
}

impl Refs {
    fn load(reopen: Vec<u8>) -> Result<Self> {
        let mut ebpf = aya::Ebpf::load(REF_OBJECT).context("loading the reference programs")?;
        for name in REF_XDP_PROGS {
            let p: &mut Xdp = ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("reference program {name} missing"))?
                .try_into()?;
            p.load()
                .with_context(|| format!("the verifier rejected {name}"))?;
        }
        for name in REF_TC_PROGS {
            let p: &mut aya::programs::SchedClassifier = ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("reference program {name} missing"))?
                .try_into()?;
            p.load()
                .with_context(|| format!("the verifier rejected {name}"))?;
        }
        let v4 = |s: &str| ip_u32(s)[3];
        let mut svc: aya::maps::HashMap<_, RefSvcKey, RefSvcVal> = aya::maps::HashMap::try_from(
            ebpf.map_mut("REF_SVC")
                .ok_or_else(|| anyhow!("no REF_SVC"))?,
        )?;
        svc.insert(
            RefSvcKey {
                addr: v4(VIP),
                port: 80u16.to_be(),
                proto: IPPROTO_TCP,
                pad: 0,
            },
            RefSvcVal {
                id: 0,
                nbackends: 2,
            },
            0,
        )?;
        let mut be: aya::maps::Array<_, RefBackend> = aya::maps::Array::try_from(
            ebpf.map_mut("REF_BACKENDS")
                .ok_or_else(|| anyhow!("no REF_BACKENDS"))?,
        )?;
        for (i, (addr, mac)) in [("10.0.1.10", EP1_MAC), ("10.0.1.11", EP2_MAC)]
            .into_iter()
            .enumerate()
        {
            be.set(
                i as u32,
                RefBackend {
                    addr: v4(addr),
                    port: EP_PORT.to_be(),
                    mac,
                },
                0,
            )?;
        }
        // Both endpoints serve VIP:80 (for `ref_xdp_dnat_one`'s replies).
        let mut idx: aya::maps::Array<_, RefEpIdx> = aya::maps::Array::try_from(
            ebpf.map_mut("REF_EP_IDX")
                .ok_or_else(|| anyhow!("no REF_EP_IDX"))?,
        )?;
        for addr in ["10.0.1.10", "10.0.1.11"] {
            let e = RefEpIdx {
                addr: v4(addr),
                port: EP_PORT.to_be(),
                proto: IPPROTO_TCP,
                pad: 0,
                vip: v4(VIP),
                vport: 80u16.to_be(),
                pad2: 0,
            };
            idx.set(loxilb_common::ep_index_slot(e.addr, e.port, e.proto), e, 0)?;
        }
        let mut refs = Refs { ebpf, reopen };
        refs.clear_ct()?;
        Ok(refs)
    }

    fn xdp(&self, name: &str) -> Result<&Xdp> {
        Ok(self
            .ebpf
            .program(name)
            .ok_or_else(|| anyhow!("reference program {name} missing"))?
            .try_into()?)
    }

    /// Empty the reference conntrack tables (between rounds of their miss
    /// paths).
    fn clear_ct(&mut self) -> Result<usize> {
        let mut n = clear_map::<RefCtKey, RefCtVal>(&mut self.ebpf, "REF_CT")?;
        // Of the datapath's key and value sizes (see loxilb-ebpf/ref).
        n += clear_map::<CtKey, CtVal>(&mut self.ebpf, "REF_CT_SHAPE")?;
        n += clear_map::<RefCtKey, [u8; REF_LEAN_VAL_SIZE]>(&mut self.ebpf, "REF_CT_LEAN")?;
        // The array table: every bucket's tags cleared.
        let mut b: aya::maps::Array<_, [u8; REF_TBL_BUCKET_SIZE]> = aya::maps::Array::try_from(
            self.ebpf
                .map_mut("REF_TBL_BUCKETS")
                .ok_or_else(|| anyhow!("no REF_TBL_BUCKETS"))?,
        )?;
        for i in 0..b.len() {
            b.set(i, [0u8; REF_TBL_BUCKET_SIZE], 0)?;
        }
        let (v, _) = run_once(self.xdp("ref_xdp_dnat_one")?, &self.reopen)?;
        if v != loxilb_tests::fib::verdict::XDP_TX {
            bail!(
                "ref_xdp_dnat_one did not open the DNAT flow: {}",
                verdict_name(v)
            );
        }
        Ok(n)
    }
}

/// Remove every entry of the hash map `name` of `ebpf`.
fn clear_map<K: aya::Pod, V: aya::Pod>(ebpf: &mut aya::Ebpf, name: &str) -> Result<usize> {
    let mut m: aya::maps::HashMap<_, K, V> =
        aya::maps::HashMap::try_from(ebpf.map_mut(name).ok_or_else(|| anyhow!("no {name}"))?)?;
    let keys: Vec<K> = m.keys().collect::<Result<_, _>>()?;
    for k in &keys {
        let _ = m.remove(k);
    }
    Ok(keys.len())
}

/// The IPv4 header checksum and the TCP checksum of an untagged
/// Ethernet/IPv4 (no options)/TCP frame are right.
fn tcp4_csums_ok(f: &[u8]) -> bool {
    let sum = |b: &[u8], mut acc: u32| {
        for w in b.chunks(2) {
            acc += u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]) as u32;
        }
        while acc > 0xffff {
            acc = (acc & 0xffff) + (acc >> 16);
        }
        acc
    };
    if f.len() < 54 {
        return false;
    }
    let ip = &f[14..34];
    let tot = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    if sum(ip, 0) != 0xffff || f.len() < 14 + tot {
        return false;
    }
    let l4 = &f[34..14 + tot];
    let mut pseudo = vec![];
    pseudo.extend_from_slice(&ip[12..20]);
    pseudo.extend_from_slice(&[0, ip[9]]);
    pseudo.extend_from_slice(&((tot - 20) as u16).to_be_bytes());
    sum(l4, sum(&pseudo, 0)) == 0xffff
}

/// Stack use per subprogram of a loaded program, from its translated
/// instructions (`BPF_OBJ_GET_INFO_BY_FD`): the deepest frame-pointer
/// offset each subprogram reaches, directly or through a pointer derived
/// from r10 (as the verifier's "stack depth a+b" counts it).
fn stack_depths(fd: std::os::fd::BorrowedFd) -> Option<String> {
    use std::os::fd::AsRawFd;
    #[repr(C)]
    struct Attr {
        fd: u32,
        len: u32,
        info: u64,
    }
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    let get = |info: &mut [u8; 256]| {
        let mut a = Attr {
            fd: fd.as_raw_fd() as u32,
            len: info.len() as u32,
            info: info.as_mut_ptr() as u64,
        };
        unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_OBJ_GET_INFO_BY_FD,
                &mut a as *mut Attr,
                std::mem::size_of::<Attr>(),
            ) == 0
        }
    };
    let mut info = [0u8; 256];
    if !get(&mut info) {
        return None;
    }
    let n = u32::from_ne_bytes(info[20..24].try_into().ok()?) as usize;
    let mut insns = vec![0u8; n];
    let mut info = [0u8; 256];
    info[20..24].copy_from_slice(&(n as u32).to_ne_bytes());
    info[32..40].copy_from_slice(&(insns.as_mut_ptr() as u64).to_ne_bytes());
    if n == 0 || !get(&mut info) {
        return None;
    }
    let ins: Vec<(u8, u8, u8, i16, i32)> = insns
        .chunks_exact(8)
        .map(|c| {
            (
                c[0],
                c[1] & 0x0f,
                c[1] >> 4,
                i16::from_ne_bytes([c[2], c[3]]),
                i32::from_ne_bytes([c[4], c[5], c[6], c[7]]),
            )
        })
        .collect();
    let mut starts = vec![0usize];
    for (i, &(code, _, src, _, imm)) in ins.iter().enumerate() {
        if code == 0x85 && src == 1 {
            starts.push((i as i64 + imm as i64 + 1) as usize);
        }
    }
    starts.sort_unstable();
    starts.dedup();
    let mut depth = vec![0i64; starts.len()];
    let mut fp: [Option<i64>; 11] = [None; 11];
    let mut skip = false;
    for (i, &(code, dst, src, off, imm)) in ins.iter().enumerate() {
        if skip {
            skip = false;
            continue;
        }
        let seg = starts.partition_point(|&s| s <= i) - 1;
        if starts[seg] == i {
            fp = [None; 11];
        }
        let mut note = |o: i64| depth[seg] = depth[seg].max(-o);
        let base = |r: u8, fp: &[Option<i64>; 11]| {
            if r == 10 {
                Some(0)
            } else {
                fp.get(r as usize).copied().flatten()
            }
        };
        let class = code & 7;
        match class {
            1 => {
                if let Some(b) = base(src, &fp) {
                    note(b + off as i64);
                }
                if (dst as usize) < 11 {
                    fp[dst as usize] = None;
                }
            }
            2 | 3 => {
                if let Some(b) = base(dst, &fp) {
                    note(b + off as i64);
                }
            }
            0 if code == 0x18 => {
                skip = true;
                if (dst as usize) < 11 {
                    fp[dst as usize] = None;
                }
            }
            7 | 4 => {
                let d = dst as usize;
                if d >= 11 {
                    continue;
                }
                if code == 0xbf {
                    fp[d] = base(src, &fp);
                } else if code == 0x07 {
                    fp[d] = fp[d].map(|o| o + imm as i64);
                    if let Some(o) = fp[d] {
                        note(o);
                    }
                } else {
                    fp[d] = None;
                }
            }
            5 if code == 0x85 => {
                // A call clobbers r0-r5.
                for r in fp.iter_mut().take(6) {
                    *r = None;
                }
            }
            _ => {}
        }
    }
    let depth: Vec<i64> = depth.iter().map(|d| (d + 7) / 8 * 8).collect();
    if depth.len() <= 4 {
        return Some(
            depth
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join("+"),
        );
    }
    // Many small subprograms (the SCTP walk): the main frame and the
    // deepest of the rest.
    Some(format!(
        "{}+{} (deepest of {} subprograms)",
        depth[0],
        depth[1..].iter().max().copied().unwrap_or(0),
        depth.len() - 1
    ))
}

/// (object, program, instructions verified, stack per subprogram).
type ProgStat = (&'static str, String, Option<u32>, String);

/// Instructions verified and stack use of every program of `ebpf`.
fn prog_stats(obj: &'static str, ebpf: &aya::Ebpf) -> Vec<ProgStat> {
    use std::os::fd::AsFd;
    let mut v: Vec<_> = ebpf
        .programs()
        .filter_map(|(name, p)| {
            let info = p.info().ok()?;
            let stack = p
                .fd()
                .ok()
                .and_then(|fd| stack_depths(fd.as_fd()))
                .unwrap_or_else(|| "?".into());
            Some((
                obj,
                name.to_string(),
                info.verified_instruction_count(),
                stack,
            ))
        })
        .collect();
    v.sort_by(|a, b| a.1.cmp(&b.1));
    v
}

/// Our object loaded once more (maps shrunk: nothing runs in it) with
/// every program, XDP and TC, for the verifier's figures.
fn our_prog_stats() -> Result<Vec<ProgStat>> {
    use loxilb_common::map_names as mn;
    let mut loader = aya::EbpfLoader::new();
    for m in [
        mn::CONNTRACK,
        mn::AFFINITY,
        mn::SEL_TABLE,
        mn::ENDPOINTS,
        mn::SCTP_ASSOC,
        mn::SRC_RANGES,
    ] {
        loader.map_max_entries(m, 1024);
    }
    let mut ebpf = loader
        .load(loxilb_agent::datapath::EBPF_OBJECT)
        .context("loading the datapath object for its program figures")?;
    let names: Vec<String> = ebpf.programs().map(|(n, _)| n.to_string()).collect();
    for name in names {
        match ebpf.program_mut(&name) {
            Some(aya::programs::Program::Xdp(p)) => p.load()?,
            Some(aya::programs::Program::SchedClassifier(p)) => p.load()?,
            _ => {}
        }
    }
    Ok(prog_stats("loxilb", &ebpf))
}

fn ip_u32(s: &str) -> loxilb_common::Addr {
    loxilb_common::addr_from_ip(s.parse().unwrap())
}

/// An address as the maps store it (network order) -> dotted quad.
fn ip_str(a: loxilb_common::Addr) -> String {
    loxilb_common::ip_from_addr(&a).to_string()
}

/// Source port of an untagged Ethernet/IPv4/TCP frame without IP options.
fn src_port(frame: &[u8]) -> u16 {
    u16::from_be_bytes([frame[34], frame[35]])
}

/// One call must give verdict `want_v` and exactly the bytes `want`.
fn check(
    dp: &mut Datapath,
    what: &str,
    prog: &str,
    input: &[u8],
    want_v: u32,
    want: &[u8],
) -> Result<Vec<u8>> {
    let (v, out) = run_once(dp.xdp_program(prog)?, input)?;
    if v != want_v || out != want {
        bail!(
            "correctness check {what:?} failed: verdict {} (want {})\n{}counters: {}",
            verdict_name(v),
            verdict_name(want_v),
            diff(&out, want),
            counters_line(dp)
        );
    }
    Ok(out)
}

/// A mode's flow, opened and checked: what its paths send.
struct Flow {
    /// The session's conntrack entries (to put back after a table clear).
    entries: Vec<(CtKey, CtVal)>,
    /// The client's ACK, and the endpoint's reply if it comes through us.
    ack: Vec<u8>,
    reply: Option<Vec<u8>>,
    note: String,
}

/// Create `m`'s session with a SYN from the client, and check the SYN, an
/// ACK and (where there is one) the endpoint's reply byte for byte.
fn open_flow(dp: &mut Datapath, m: &ModeSpec) -> Result<Flow> {
    let main = prog_names::XDP_MAIN;
    let before: HashSet<CtKey> = dp.sessions()?.into_iter().map(|(k, _)| k).collect();
    let syn = Frame::tcp(CLIENT, CLIENT_PORT, VIP, m.vport, SYN);
    let ack = Frame::tcp(CLIENT, CLIENT_PORT, VIP, m.vport, ACK);
    let (v, syn_out) = run_once(dp.xdp_program(main)?, &syn.bytes())?;
    if v != XDP_REDIRECT {
        bail!(
            "the SYN that creates the {} flow got {} instead of {}; counters: {}",
            m.rule,
            verdict_name(v),
            verdict_name(XDP_REDIRECT),
            counters_line(dp)
        );
    }
    let entries: Vec<(CtKey, CtVal)> = dp
        .sessions()?
        .into_iter()
        .filter(|(k, _)| !before.contains(k))
        .collect();
    if entries.len() != m.entries {
        bail!(
            "the {} SYN should leave {} conntrack entries, found {}",
            m.rule,
            m.entries,
            entries.len()
        );
    }
    let fwd_key = CtKey {
        saddr: ip_u32(CLIENT),
        daddr: ip_u32(VIP),
        sport: CLIENT_PORT.to_be(),
        dport: m.vport.to_be(),
        proto: IPPROTO_TCP,
        _pad1: 0,
        _pad2: 0,
    };
    let fwd = entries
        .iter()
        .find(|(k, v)| *k == fwd_key && v.dir == ct_dir::FORWARD)
        .ok_or_else(|| anyhow!("no forward conntrack entry after the {} SYN", m.rule))?
        .1;
    if fwd.mode != m.lb_mode {
        bail!(
            "the {} session was created in mode {}, not {}",
            m.rule,
            fwd.mode,
            m.lb_mode
        );
    }
    let dsr = matches!(m.mode, Mode::Dsr | Mode::DsrIpip);
    let ep = ip_str(fwd.xdaddr);
    let ep_mac = match ep.as_str() {
        "10.0.1.10" => EP1_MAC,
        "10.0.1.11" => EP2_MAC,
        other => bail!(
            "the {} SYN was sent to {other}, not a configured endpoint",
            m.rule
        ),
    };
    // The source the endpoint sees: the client's, or the translated one
    // with the port allocated to the session (read from the SYN's output).
    let (src, sport) = match m.mode {
        Mode::OneArm | Mode::FullNat => {
            let cfg = dp.config()?;
            let src = match m.mode {
                Mode::OneArm => LB_EP_ADDR.to_string(),
                _ if cfg.fullnat_src != 0 => ip_str(loxilb_common::v4_mapped(cfg.fullnat_src)),
                _ => VIP.to_string(),
            };
            let (lo, hi) = if cfg.snat_port_lo == 0 || cfg.snat_port_hi < cfg.snat_port_lo {
                (SNAT_PORT_LO, SNAT_PORT_HI)
            } else {
                (cfg.snat_port_lo, cfg.snat_port_hi)
            };
            let port = src_port(&syn_out);
            if !(lo..=hi).contains(&port) || u16::from_be(fwd.xsport) != port {
                bail!(
                    "{}: the SYN left with source port {port}; the session has {}, the \
                     range is {lo}..={hi}",
                    m.rule,
                    u16::from_be(fwd.xsport)
                );
            }
            (src, port)
        }
        _ => (CLIENT.to_string(), CLIENT_PORT),
    };
    let forwarded = |f: &Frame| -> Vec<u8> {
        match m.mode {
            Mode::Dnat | Mode::OneArm | Mode::FullNat => f
                .with(&src, sport, &ep, m.ep_port)
                .routed(LB_TO_EP_MAC, ep_mac)
                .bytes(),
            Mode::Dsr => {
                // Only the MACs change, TTL included.
                let mut b = f.bytes();
                b[0..6].copy_from_slice(&ep_mac);
                b[6..12].copy_from_slice(&LB_TO_EP_MAC);
                b
            }
            Mode::DsrIpip => ipip_wrap(&f.bytes(), LB_EP_ADDR, &ep, LB_TO_EP_MAC, ep_mac),
        }
    };
    let what = |p: &str| format!("{} {p}", m.rule);
    if syn_out != forwarded(&syn) {
        bail!(
            "correctness check {:?} failed\n{}counters: {}",
            what("SYN"),
            diff(&syn_out, &forwarded(&syn)),
            counters_line(dp)
        );
    }
    check(
        dp,
        &what("established ACK"),
        main,
        &ack.bytes(),
        XDP_REDIRECT,
        &forwarded(&ack),
    )?;
    let reply = if dsr {
        None
    } else {
        let r = Frame::tcp(&ep, m.ep_port, &src, sport, ACK);
        let want = r
            .with(VIP, m.vport, CLIENT, CLIENT_PORT)
            .routed(LB_TO_CLIENT_MAC, CLIENT_MAC)
            .bytes();
        check(dp, &what("reply"), main, &r.bytes(), XDP_REDIRECT, &want)?;
        Some(r.bytes())
    };
    let how = match m.mode {
        Mode::Dnat | Mode::OneArm | Mode::FullNat => {
            format!(
                "to {src}:{sport} -> {ep}:{}, reply {ep}:{} -> {src}:{sport}",
                m.ep_port, m.ep_port
            )
        }
        Mode::Dsr => format!("to {ep}'s MAC, untranslated"),
        Mode::DsrIpip => format!("IPIP {LB_EP_ADDR} -> {ep}, inner untranslated"),
    };
    Ok(Flow {
        entries,
        ack: ack.bytes(),
        reply,
        note: format!(
            "{} flow (rule {}) {CLIENT}:{CLIENT_PORT} -> {VIP}:{}: {how}",
            match m.mode {
                Mode::Dnat => "default (DNAT)",
                Mode::OneArm => "onearm",
                Mode::FullNat => "fullnat",
                Mode::Dsr => "dsr (L2)",
                Mode::DsrIpip => "dsr-ipip",
            },
            m.rule,
            m.vport
        ),
    })
}

fn stats_map(dp: &Datapath) -> Result<std::collections::HashMap<&'static str, u64>> {
    Ok(dp.stats()?.into_iter().collect())
}

fn counters_line(dp: &Datapath) -> String {
    match dp.stats() {
        Ok(s) => s
            .iter()
            .filter(|(_, v)| *v != 0)
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" "),
        Err(e) => format!("(counters unreadable: {e})"),
    }
}

/// Everything that runs inside the benchmark namespace.
fn bench(opts: &Opts) -> Result<Outcome> {
    let mut notes = vec![];
    let t0 = Instant::now();
    let mut dp = loxilb_tests::fib::load_datapath();
    let rules = config::parse("bench.yaml", RULES).map_err(|e| anyhow!("{e}"))?;
    Rules::adopt(vec![])
        .apply(&rules, &mut dp)
        .context("installing the benchmark rules")?;
    notes.push(format!(
        "datapath loaded (verified on {} threads) and {} rules installed in {} ms",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        rules.len(),
        t0.elapsed().as_millis()
    ));
    // Pin to the CPU we are on (after loading: the programs are verified
    // on every CPU this process may use): per-CPU counters, LRU lists and
    // caches stay put.
    let cpu = unsafe { libc::sched_getcpu() };
    if cpu >= 0 {
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu as usize, &mut set);
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0 {
                notes.push(format!("bench thread pinned to CPU {cpu}"));
            }
        }
    }
    // (The same packet as the DNAT flow's ACK below.)
    let mut refs = Refs::load(Frame::tcp(CLIENT, CLIENT_PORT, VIP, 80, ACK).bytes())?;

    // A non-service packet that misses the address pre-filter (as almost
    // all non-service traffic does), so it takes the cheap exit.
    let ours: Vec<loxilb_common::Addr> = rules
        .iter()
        .flat_map(|r| {
            std::iter::once(loxilb_common::addr_from_ip(r.vip)).chain(
                r.endpoints
                    .iter()
                    .map(|e| loxilb_common::addr_from_ip(e.ip)),
            )
        })
        .collect();
    let bit = |a: &loxilb_common::Addr| addr_filter_bit(loxilb_common::addr_fold(a));
    let filtered = |a: loxilb_common::Addr| ours.iter().any(|o| bit(o) == bit(&a));
    let ns_src = (2..=250)
        .map(|h| format!("192.168.0.{h}"))
        .find(|a| !filtered(ip_u32(a)))
        .ok_or_else(|| anyhow!("no client address misses the address filter"))?;
    let ns_dst = (200..=250)
        .map(|h| format!("20.0.0.{h}"))
        .find(|a| !filtered(ip_u32(a)))
        .ok_or_else(|| anyhow!("no non-service address misses the address filter"))?;
    let non_service = Frame::tcp(&ns_src, CLIENT_PORT, &ns_dst, 80, ACK).bytes();
    notes.push(format!(
        "non-service packet {ns_src}:{CLIENT_PORT} -> {ns_dst}:80 (misses the address filter)"
    ));

    // Correctness first: each path does what its name says, byte for byte.
    // One flow per mode, each created by its SYN.
    let mut flows = HashMap::new();
    for m in &MODES {
        let f = open_flow(&mut dp, m)?;
        notes.push(f.note.clone());
        flows.insert(m.mode, f);
    }
    let dnat_ack = flows[&Mode::Dnat].ack.clone();
    check(
        &mut dp,
        "non-service",
        prog_names::XDP_MAIN,
        &non_service,
        XDP_PASS,
        &non_service,
    )?;
    check(
        &mut dp,
        "floor",
        prog_names::XDP_PASS,
        &dnat_ack,
        XDP_PASS,
        &dnat_ack,
    )?;
    // The reference DNAT programs: a first call misses (the conntrack one
    // inserts its entry), a second hits; both translate with right
    // checksums to one of the two backends.
    for (prog, what) in [
        ("ref_xdp_dnat", "reference DNAT"),
        ("ref_xdp_dnat_ct", "reference DNAT + conntrack (miss)"),
        ("ref_xdp_dnat_ct", "reference DNAT + conntrack (hit)"),
    ] {
        let (v, out) = run_once(refs.xdp(prog)?, &dnat_ack)?;
        let ok = v == loxilb_tests::fib::verdict::XDP_TX
            && out.len() == dnat_ack.len()
            && tcp4_csums_ok(&out)
            && [ip_u32("10.0.1.10")[3], ip_u32("10.0.1.11")[3]]
                .contains(&u32::from_ne_bytes([out[30], out[31], out[32], out[33]]))
            && u16::from_be_bytes([out[36], out[37]]) == EP_PORT;
        if !ok {
            bail!(
                "correctness check {what:?} failed: verdict {}\n{}",
                verdict_name(v),
                diff(&out, &dnat_ack)
            );
        }
    }
    if refs.reopen != dnat_ack {
        bail!("the references' DNAT flow is not the datapath's");
    }
    // One entry per session: the ACK goes to the backend the session
    // holds, and that backend's reply comes back from the VIP.
    let (v, out) = run_once(refs.xdp("ref_xdp_dnat_one")?, &dnat_ack)?;
    let one_ep = u32::from_ne_bytes([out[30], out[31], out[32], out[33]]);
    let one_ep = [ip_u32("10.0.1.10"), ip_u32("10.0.1.11")]
        .into_iter()
        .find(|a| a[3] == one_ep)
        .map(ip_str);
    let Some(one_ep) = one_ep.filter(|_| v == loxilb_tests::fib::verdict::XDP_TX) else {
        bail!(
            "correctness check \"one-entry reference, ACK\" failed: verdict {}\n{}",
            verdict_name(v),
            diff(&out, &dnat_ack)
        );
    };
    let one_reply = Frame::tcp(&one_ep, EP_PORT, CLIENT, CLIENT_PORT, ACK).bytes();
    let (v, out) = run_once(refs.xdp("ref_xdp_dnat_one")?, &one_reply)?;
    if v != loxilb_tests::fib::verdict::XDP_TX
        || !tcp4_csums_ok(&out)
        || out[26..30] != ip_u32(VIP)[3].to_ne_bytes()
        || u16::from_be_bytes([out[34], out[35]]) != 80
    {
        bail!(
            "correctness check \"one-entry reference, reply\" failed: verdict {}\n{}",
            verdict_name(v),
            diff(&out, &one_reply)
        );
    }
    notes.push(
        "reference programs (loxilb-ebpf/ref) loaded; ref_xdp_dnat and ref_xdp_dnat_ct translate \
         the DNAT flow's ACK to a backend with right checksums (XDP_TX); ref_xdp_dnat_one \
         (one entry per session) translates the ACK and, through its endpoint index, the \
         endpoint's reply back from the VIP"
            .into(),
    );
    let ipv6_flows = open_ipv6_flows(&mut dp, &mut notes)?;
    // Kept so a table clear (see NEW_FLOW_BUDGET) can put the flows back.
    let established_entries: Vec<(CtKey, CtVal)> = dp.sessions()?;
    let mode_entries: usize = MODES.iter().map(|m| flows[&m.mode].entries.len()).sum();
    // +5 for IPv6 (one entry: its endpoint is indexed), NAT64, SCTP; +4
    // for the multihomed SCTP association (its first path and the
    // endpoint's second address's path).
    if established_entries.len() != mode_entries + 9 {
        bail!(
            "{} sessions after opening the flows; expected {} (+9 for IPv6, NAT64, SCTP)",
            established_entries.len(),
            mode_entries
        );
    }

    let mut paths = vec![
        // The floor program gets the very packet the DNAT established path does.
        PathBench::new(
            Kind::Floor,
            "floor (XDP_PASS only)",
            prog_names::XDP_PASS,
            XDP_PASS,
            dnat_ack.clone(),
            None,
        ),
        PathBench::new(
            Kind::Ref(RefKind::Pass),
            "ref: xdp_pass",
            "ref_xdp_pass",
            XDP_PASS,
            dnat_ack.clone(),
            None,
        ),
        PathBench::new(
            Kind::Ref(RefKind::ParseLookup),
            "ref: parse+lookup",
            "ref_xdp_parse_lookup",
            XDP_PASS,
            non_service.clone(),
            None,
        ),
        PathBench::new(
            Kind::Ref(RefKind::Dnat),
            "ref: dnat",
            "ref_xdp_dnat",
            loxilb_tests::fib::verdict::XDP_TX,
            dnat_ack.clone(),
            None,
        ),
        PathBench::new(
            Kind::Ref(RefKind::DnatCtHit),
            "ref: dnat+ct, hit",
            "ref_xdp_dnat_ct",
            loxilb_tests::fib::verdict::XDP_TX,
            dnat_ack.clone(),
            None,
        ),
        PathBench::new(
            Kind::Ref(RefKind::DnatCtMiss),
            "ref: dnat+ct, miss",
            "ref_xdp_dnat_ct",
            loxilb_tests::fib::verdict::XDP_TX,
            vec![],
            None,
        ),
        PathBench::new(
            Kind::Ref(RefKind::LeanMiss1),
            "ref: lean v4 entry, 1 ins",
            "ref_xdp_dnat_ct_lean",
            loxilb_tests::fib::verdict::XDP_TX,
            vec![],
            None,
        ),
        PathBench::new(
            Kind::Ref(RefKind::ShapeMiss1),
            "ref: our entry, 1 insert",
            "ref_xdp_dnat_ct_shape1",
            loxilb_tests::fib::verdict::XDP_TX,
            vec![],
            None,
        ),
        PathBench::new(
            Kind::Ref(RefKind::ShapeMiss2),
            "ref: our entry, 2 inserts",
            "ref_xdp_dnat_ct_shape2",
            loxilb_tests::fib::verdict::XDP_TX,
            vec![],
            None,
        ),
        PathBench::new(
            Kind::Ref(RefKind::ShapeHit),
            "ref: our entry, hit",
            "ref_xdp_dnat_ct_shape1",
            loxilb_tests::fib::verdict::XDP_TX,
            dnat_ack.clone(),
            None,
        ),
        PathBench::new(
            Kind::Ref(RefKind::OneHit),
            "ref: 1 entry, hit",
            "ref_xdp_dnat_one",
            loxilb_tests::fib::verdict::XDP_TX,
            dnat_ack.clone(),
            None,
        ),
        PathBench::new(
            Kind::Ref(RefKind::OneReply),
            "ref: 1 entry, reply",
            "ref_xdp_dnat_one",
            loxilb_tests::fib::verdict::XDP_TX,
            one_reply.clone(),
            None,
        ),
        PathBench::new(
            Kind::Ref(RefKind::OneMiss),
            "ref: 1 entry, miss",
            "ref_xdp_dnat_one",
            loxilb_tests::fib::verdict::XDP_TX,
            vec![],
            None,
        ),
        PathBench::new(
            Kind::Ref(RefKind::TblHit),
            "ref: array table, hit",
            "ref_xdp_dnat_tbl",
            loxilb_tests::fib::verdict::XDP_TX,
            dnat_ack.clone(),
            None,
        ),
        PathBench::new(
            Kind::Ref(RefKind::TblMiss2),
            "ref: array table, 2 ins",
            "ref_xdp_dnat_tbl2",
            loxilb_tests::fib::verdict::XDP_TX,
            vec![],
            None,
        ),
        PathBench::new(
            Kind::NonService,
            "non-service",
            prog_names::XDP_MAIN,
            XDP_PASS,
            non_service.clone(),
            None,
        ),
    ];
    for m in &MODES {
        let f = &flows[&m.mode];
        paths.push(PathBench::new(
            Kind::Established(m.mode),
            m.est_label,
            prog_names::XDP_MAIN,
            XDP_REDIRECT,
            f.ack.clone(),
            Some((VIP, m.vport)),
        ));
        if let (Some(label), Some(reply)) = (m.reply_label, &f.reply) {
            paths.push(PathBench::new(
                Kind::Reply(m.mode),
                label,
                prog_names::XDP_MAIN,
                XDP_REDIRECT,
                reply.clone(),
                Some((VIP, m.vport)),
            ));
        }
    }
    for (x, packet) in ipv6_flows {
        let (label, vip, port) = match x {
            Extra::Est6 => ("established (IPv6 DNAT)", VIP6, 80),
            Extra::Reply6 => ("reply (IPv6)", VIP6, 80),
            Extra::Est64 => ("established (NAT64 6->4)", VIP6, 84),
            Extra::Reply64 => ("reply (NAT64 4->6)", VIP6, 84),
            Extra::Sctp => ("established (SCTP DATA)", VIP, 3868),
            Extra::SctpInitAck => ("SCTP INIT-ACK, multihomed", VIP, 3870),
        };
        paths.push(PathBench::new(
            Kind::Extra(x),
            label,
            prog_names::XDP_MAIN,
            XDP_REDIRECT,
            packet,
            Some((vip, port)),
        ));
    }
    for (kind, label, vip, port) in NEW_FLOWS {
        paths.push(PathBench::new(
            Kind::NewFlow(kind),
            label,
            prog_names::XDP_MAIN,
            XDP_REDIRECT,
            vec![],
            Some((vip, port)),
        ));
    }

    let mut next_flow = 0usize;
    let mut live_flows = 0usize;
    let mut live_nat64 = 0usize;
    let mut clears = 0usize;
    let mut ref_next = 0usize;
    let mut ref_live = 0usize;
    let mut run_path = |dp: &mut Datapath, p: &mut PathBench, n: usize, timed: bool| {
        let what = p.label;
        let out = if timed { Some(&mut p.samples) } else { None };
        let r = match p.kind {
            Kind::Ref(
                RefKind::DnatCtMiss
                | RefKind::LeanMiss1
                | RefKind::ShapeMiss1
                | RefKind::ShapeMiss2
                | RefKind::OneMiss
                | RefKind::TblMiss2,
            ) => {
                if ref_live + n > REF_CT_ENTRIES / 2 {
                    refs.clear_ct()?;
                    ref_live = 0;
                }
                let frames: Vec<Vec<u8>> = (ref_next..ref_next + n)
                    .map(|i| new_flow_frame(NewKind::Rr, i))
                    .collect();
                ref_next += n;
                ref_live += n;
                run_block(
                    refs.xdp(p.prog)?,
                    frames.iter().map(Vec::as_slice),
                    p.verdict,
                    what,
                    out,
                )
            }
            Kind::Ref(_) => run_block(
                refs.xdp(p.prog)?,
                std::iter::repeat_n(p.packet.as_slice(), n),
                p.verdict,
                what,
                out,
            ),
            Kind::NewFlow(kind) => {
                if live_flows + n > NEW_FLOW_BUDGET
                    || (kind == NewKind::Nat64 && live_nat64 + n > NAT64_FLOW_BUDGET)
                {
                    dp.clear_sessions()?;
                    // Stamped now, so none of them looks idle when it is put back.
                    let now = loxilb_tests::coarse_now_ns();
                    for (k, v) in &established_entries {
                        dp.insert_session(
                            *k,
                            CtVal {
                                last_seen_ns: now,
                                ..*v
                            },
                        )?;
                    }
                    live_flows = 0;
                    live_nat64 = 0;
                    clears += 1;
                }
                if kind == NewKind::Nat64 {
                    live_nat64 += n;
                }
                let frames: Vec<Vec<u8>> = (next_flow..next_flow + n)
                    .map(|i| new_flow_frame(kind, i))
                    .collect();
                next_flow += n;
                live_flows += n;
                run_block(
                    dp.xdp_program(p.prog)?,
                    frames.iter().map(Vec::as_slice),
                    p.verdict,
                    what,
                    out,
                )
            }
            _ => run_block(
                dp.xdp_program(p.prog)?,
                std::iter::repeat_n(p.packet.as_slice(), n),
                p.verdict,
                what,
                out,
            ),
        };
        if let Err(e) = r {
            return Err(anyhow!("{e:#}\ndatapath counters: {}", counters_line(dp)));
        }
        Ok::<_, anyhow::Error>(())
    };

    for p in paths.iter_mut() {
        run_path(&mut dp, p, opts.warmup, false)?;
    }

    // Rule ids by (VIP, port), for the per-rule counters.
    let rule_of_port: HashMap<(loxilb_common::Addr, u16), u32> = dp
        .services()?
        .into_iter()
        .filter(|(k, _)| k.proto == IPPROTO_TCP || k.proto == loxilb_common::IPPROTO_SCTP)
        .map(|(k, v)| ((k.addr, u16::from_be(k.port)), v.rule_id))
        .collect();
    let start = stats_map(&dp)?;
    let rule_start = dp.rule_stats()?;
    let t_run = Instant::now();
    let n = paths.len();
    for round in 0..opts.rounds {
        let starts: Vec<usize> = paths.iter().map(|p| p.samples.len()).collect();
        // Paths take turns in chunks, the order rotating every chunk, so a
        // slow or fast phase of the machine falls on all of them alike.
        let mut done = 0;
        let mut turn = round;
        while done < opts.iters {
            let k = CHUNK.min(opts.iters - done);
            for j in 0..n {
                run_path(&mut dp, &mut paths[(j + turn) % n], k, true)?;
            }
            done += k;
            turn += 1;
        }
        for (p, start) in paths.iter_mut().zip(starts) {
            let mut s = p.samples[start..].to_vec();
            s.sort_unstable();
            p.round_medians.push(median(&s));
        }
    }
    let elapsed = t_run.elapsed();
    let end = stats_map(&dp)?;
    let rule_end = dp.rule_stats()?;

    // The counters must show each path did what it is named after.
    let delta = |k: &str| end.get(k).copied().unwrap_or(0) - start.get(k).copied().unwrap_or(0);
    let calls = (opts.rounds * opts.iters) as u64;
    let main_paths = paths
        .iter()
        .filter(|p| p.obj == Obj::Ours && p.kind != Kind::Floor)
        .count() as u64;
    let hit_paths = paths
        .iter()
        .filter(|p| {
            matches!(
                p.kind,
                Kind::Established(_) | Kind::Reply(_) | Kind::Extra(_)
            )
        })
        .count() as u64;
    let new_paths = NEW_FLOWS.len() as u64;
    let mut bad = vec![];
    for (k, want) in [
        ("rx", main_paths * calls),
        ("new_session", new_paths * calls),
        ("ct_hit", hit_paths * calls),
        ("fwd_redirect", (hit_paths + new_paths) * calls),
        ("pass_not_service", calls),
        ("ct_expired", 0),
        ("drop_ct_full", 0),
        ("fwd_stack", 0),
        ("pass_ttl", 0),
        ("drop_no_endpoint", 0),
        ("drop_snat_exhausted", 0),
        ("drop_dsr_no_l2", 0),
        ("drop_encap_mtu", 0),
        ("drop_no_route", 0),
        ("drop_no_neigh", 0),
        ("drop_nat64", 0),
    ] {
        if delta(k) != want {
            bad.push(format!("{k} +{} (want +{want})", delta(k)));
        }
    }
    // Each mode's packets were counted by its own rule.
    let mut per_rule = vec![];
    let mut rule_ports: Vec<(&str, u16)> = paths.iter().filter_map(|p| p.rule_port).collect();
    rule_ports.sort();
    rule_ports.dedup();
    for (vip, port) in rule_ports {
        let id = *rule_of_port
            .get(&(ip_u32(vip), port))
            .ok_or_else(|| anyhow!("no rule for {vip} port {port} is installed"))?;
        let got = rule_end.get(&id).map_or(0, |s| s.packets)
            - rule_start.get(&id).map_or(0, |s| s.packets);
        let want = calls
            * paths
                .iter()
                .filter(|p| p.rule_port == Some((vip, port)))
                .count() as u64;
        if got != want {
            bad.push(format!("rule {vip}:{port} packets +{got} (want +{want})"));
        }
        per_rule.push(format!("{vip}:{port} +{got}"));
    }
    if !bad.is_empty() {
        bail!(
            "the datapath counters of the timed calls do not match the paths: {}",
            bad.join(", ")
        );
    }
    notes.push(format!(
        "counters over the timed calls as expected: rx +{}, new_session +{}, ct_hit +{}, \
         fwd_redirect +{}, pass_not_service +{calls}, no drops; rule packets: {}",
        main_paths * calls,
        new_paths * calls,
        hit_paths * calls,
        (hit_paths + new_paths) * calls,
        per_rule.join(", ")
    ));
    notes.push(format!(
        "{} distinct new flows created ({} sessions in the table at the end{})",
        next_flow,
        dp.sessions()?.len(),
        if clears > 0 {
            format!(
                "; table cleared {clears} time(s) to stay under half full and NAT64 source \
                 ports under a third in use"
            )
        } else {
            String::new()
        }
    ));
    notes.push(format!(
        "timed phase: {:.1} s wall clock for {} calls",
        elapsed.as_secs_f64(),
        calls * paths.len() as u64
    ));
    let soak = if opts.soak_s > 0 {
        soak(&mut dp, &mut refs, opts, &established_entries)?
    } else {
        vec![]
    };
    let full = if opts.full > 0 {
        full_table(&mut dp, &mut refs, opts.full)?
    } else {
        vec![]
    };
    let mut progs = our_prog_stats()?;
    progs.extend(prog_stats("ref", &refs.ebpf));
    Ok(Outcome {
        paths,
        notes,
        progs,
        soak,
        full,
    })
}

/// The long run: `opts.soak_flows` sessions opened by SYNs through the
/// new-flow path (its wall-clock rate measured), then, for `opts.soak_s`
/// seconds, established packets spread over all of them (a stride through
/// the flows, so consecutive calls hit different entries) taking turns
/// with the floor; medians per 10 s window.
fn soak(
    dp: &mut Datapath,
    refs: &mut Refs,
    opts: &Opts,
    established: &[(CtKey, CtVal)],
) -> Result<Vec<String>> {
    let mut lines = vec![];
    dp.clear_sessions()?;
    let now = loxilb_tests::coarse_now_ns();
    for (k, v) in established {
        dp.insert_session(
            *k,
            CtVal {
                last_seen_ns: now,
                ..*v
            },
        )?;
    }
    let n = opts.soak_flows.max(1);
    let frame = |i: usize, flags: u8| {
        let src = format!(
            "100.{}.{}.{}",
            80 + (i >> 16) % 16,
            (i >> 8) & 0xff,
            i & 0xff
        );
        Frame::tcp(&src, 2000 + (i >> 20) as u16, VIP, 80, flags).bytes()
    };
    let syns: Vec<Vec<u8>> = (0..n).map(|i| frame(i, SYN)).collect();
    let mut create_ns = vec![];
    let t = Instant::now();
    run_block(
        dp.xdp_program(prog_names::XDP_MAIN)?,
        syns.iter().map(Vec::as_slice),
        XDP_REDIRECT,
        "soak: new flow",
        Some(&mut create_ns),
    )?;
    let wall = t.elapsed().as_secs_f64();
    // The reference conntrack gets the same sessions.
    refs.clear_ct()?;
    run_block(
        refs.xdp("ref_xdp_dnat_ct")?,
        syns.iter().map(Vec::as_slice),
        loxilb_tests::fib::verdict::XDP_TX,
        "soak: reference miss",
        None,
    )?;
    drop(syns);
    let live = dp.sessions()?.len();
    let mean = create_ns.iter().map(|&x| x as f64).sum::<f64>() / n as f64;
    lines.push(format!(
        "{n} sessions opened by SYNs (rule web, rr) in {wall:.2} s: {:.0} flows/s through \
         BPF_PROG_TEST_RUN on one core (syscall and packet copy included); datapath time \
         {mean:.0} ns mean per new flow = {:.0} flows/s on one core; {live} conntrack entries",
        n as f64 / wall,
        1e9 / mean
    ));
    let acks: Vec<Vec<u8>> = (0..n).map(|i| frame(i, ACK)).collect();
    let floor_pkt = acks[0].clone();
    let total = std::time::Duration::from_secs(opts.soak_s as u64);
    let window = std::time::Duration::from_secs(10).min(total);
    let start = stats_map(dp)?;
    let t0 = Instant::now();
    let mut k = 0usize;
    let mut w = 0;
    while t0.elapsed() < total {
        let w0 = Instant::now();
        let (mut fl, mut est, mut rf) = (vec![], vec![], vec![]);
        while w0.elapsed() < window && t0.elapsed() < total {
            run_block(
                dp.xdp_program(prog_names::XDP_PASS)?,
                std::iter::repeat_n(floor_pkt.as_slice(), CHUNK),
                XDP_PASS,
                "soak: floor",
                Some(&mut fl),
            )?;
            let idx: Vec<usize> = (k..k + CHUNK).map(|j| (j * 7919) % n).collect();
            k += CHUNK;
            run_block(
                dp.xdp_program(prog_names::XDP_MAIN)?,
                idx.iter().map(|&i| acks[i].as_slice()),
                XDP_REDIRECT,
                "soak: established",
                Some(&mut est),
            )?;
            run_block(
                refs.xdp("ref_xdp_dnat_ct")?,
                idx.iter().map(|&i| acks[i].as_slice()),
                loxilb_tests::fib::verdict::XDP_TX,
                "soak: reference hit",
                Some(&mut rf),
            )?;
        }
        fl.sort_unstable();
        est.sort_unstable();
        rf.sort_unstable();
        let (f, e, r) = (median(&fl), median(&est), median(&rf));
        lines.push(format!(
            "{:>3}-{:>3} s: established over {n} sessions median {e:.0} ns (p10 {}, p90 {}), \
             over floor {:+.0}; reference ct hit over the same tuples {:+.0}; floor {f:.0}; \
             {} calls each",
            w * 10,
            w * 10 + w0.elapsed().as_secs(),
            percentile(&est, 0.1),
            percentile(&est, 0.9),
            e - f,
            r - f,
            est.len()
        ));
        w += 1;
    }
    let end = stats_map(dp)?;
    let delta = |k: &str| end.get(k).copied().unwrap_or(0) - start.get(k).copied().unwrap_or(0);
    let drops: u64 = end
        .keys()
        .filter(|k| k.starts_with("drop_"))
        .map(|k| delta(k))
        .sum();
    lines.push(format!(
        "after the long run: {} conntrack entries, ct_hit +{}, ct_expired +{}, new_session +{}, \
         fwd_stack +{}, drops +{drops}",
        dp.sessions()?.len(),
        delta("ct_hit"),
        delta("ct_expired"),
        delta("new_session"),
        delta("fwd_stack")
    ));
    Ok(lines)
}

/// New flows when the session table is full, as it stays on a busy node:
/// every insert takes an element back from a live session (the LRU's
/// eviction) instead of a free one. Our table and the two references'
/// (the minimal conntrack LRU, 262,144 entries, one insert; our entry's
/// shape, 524,288 entries, two inserts; that shape in the array table,
/// where an insert into a full bucket takes its oldest way) are each filled to an eighth over
/// capacity through their own new-flow path, then `n` more new flows are
/// timed through each, in blocks taking turns with the floor.
fn full_table(dp: &mut Datapath, refs: &mut Refs, n: usize) -> Result<Vec<String>> {
    // Sources outside the long run's (100.80-95.x.x) and the timed paths'.
    let frame = |i: usize| {
        let src = format!("101.{}.{}.{}", (i >> 16) & 0xff, (i >> 8) & 0xff, i & 0xff);
        Frame::tcp(&src, 3000 + (i >> 24) as u16, VIP, 80, SYN).bytes()
    };
    let fill = REF_CT_ENTRIES + REF_CT_ENTRIES / 8;
    let ours_cap = MAX_CT_ENTRIES as usize / 2;
    let ours_fill = ours_cap + ours_cap / 8;
    let t = Instant::now();
    dp.clear_sessions()?;
    refs.clear_ct()?;
    let fill_frames: Vec<Vec<u8>> = (0..fill.max(ours_fill)).map(frame).collect();
    let tx = loxilb_tests::fib::verdict::XDP_TX;
    run_block(
        dp.xdp_program(prog_names::XDP_MAIN)?,
        fill_frames[..ours_fill].iter().map(Vec::as_slice),
        XDP_REDIRECT,
        "full table: filling ours",
        None,
    )?;
    for prog in [
        "ref_xdp_dnat_ct",
        "ref_xdp_dnat_ct_shape2",
        "ref_xdp_dnat_tbl2",
    ] {
        run_block(
            refs.xdp(prog)?,
            fill_frames[..fill].iter().map(Vec::as_slice),
            tx,
            "full table: filling a reference",
            None,
        )?;
    }
    drop(fill_frames);
    let fill_s = t.elapsed().as_secs_f64();
    let base = fill.max(ours_fill);
    let (mut fl, mut ours, mut r1, mut r2, mut r3) = (vec![], vec![], vec![], vec![], vec![]);
    let mut k = 0;
    while k < n {
        let m = CHUNK.min(n - k);
        let frames: Vec<Vec<u8>> = (base + k..base + k + m).map(frame).collect();
        let it = || frames.iter().map(Vec::as_slice);
        run_block(
            dp.xdp_program(prog_names::XDP_PASS)?,
            it(),
            XDP_PASS,
            "full table: floor",
            Some(&mut fl),
        )?;
        run_block(
            dp.xdp_program(prog_names::XDP_MAIN)?,
            it(),
            XDP_REDIRECT,
            "full table: new flow",
            Some(&mut ours),
        )?;
        run_block(
            refs.xdp("ref_xdp_dnat_ct")?,
            it(),
            tx,
            "full table: reference miss",
            Some(&mut r1),
        )?;
        run_block(
            refs.xdp("ref_xdp_dnat_ct_shape2")?,
            it(),
            tx,
            "full table: reference miss, our entry, 2 inserts",
            Some(&mut r2),
        )?;
        run_block(
            refs.xdp("ref_xdp_dnat_tbl2")?,
            it(),
            tx,
            "full table: reference miss, our entry in an array table, 2 inserts",
            Some(&mut r3),
        )?;
        k += m;
    }
    for v in [&mut fl, &mut ours, &mut r1, &mut r2, &mut r3] {
        v.sort_unstable();
    }
    let f = median(&fl);
    let over = |v: &[u32]| median(v) - f;
    let mean = ours.iter().map(|&x| x as f64).sum::<f64>() / ours.len().max(1) as f64;
    Ok(vec![
        format!(
            "filled in {fill_s:.1} s: ours with {ours_fill} sessions ({} entries; {} fit), the \
             references with {fill} flows each",
            2 * ours_fill,
            MAX_CT_ENTRIES
        ),
        format!(
            "new flow (rr), every insert evicting: median {:+.0} ns over the floor (p90 {:+.0}, \
             mean {mean:.0} ns); reference miss {:+.0}; reference with our entry, 2 inserts \
             {:+.0} (in an array table instead of the LRU: {:+.0}); floor {f:.0}; {} flows each",
            over(&ours),
            percentile(&ours, 0.9) as f64 - f,
            over(&r1),
            over(&r2),
            over(&r3),
            ours.len()
        ),
        format!(
            "× reference miss {:.2}, × reference with our entry {:.2}",
            over(&ours) / over(&r1).max(1.0),
            over(&ours) / over(&r2).max(1.0)
        ),
    ])
}

fn first_line(cmd: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(cmd).args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    Some(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn read_trim(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

fn cpu_model() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    for key in ["model name", "Model", "Hardware", "cpu model"] {
        if let Some(v) = info
            .lines()
            .find(|l| l.split(':').next().map(str::trim) == Some(key))
            .and_then(|l| l.split_once(':'))
        {
            return v.1.trim().to_string();
        }
    }
    "unknown".to_string()
}

fn print_header(opts: &Opts) {
    let date = first_line("date", &["-u", "+%Y-%m-%d %H:%M:%S UTC"]).unwrap_or_else(|| {
        let s = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        format!("unix time {s}")
    });
    let kernel = read_trim("/proc/sys/kernel/osrelease")
        .or_else(|| first_line("uname", &["-r"]))
        .unwrap_or_else(|| "unknown".into());
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    println!("loxilb XDP datapath benchmark (BPF_PROG_TEST_RUN, one call per packet, repeat=1)");
    println!("date:    {date}");
    println!("kernel:  {kernel}");
    println!("cpu:     {} ({cpus} CPUs available)", cpu_model());
    println!(
        "system:  bpf_jit_enable={}  bpf_stats_enabled={}  clocksource={}",
        read_trim("/proc/sys/net/core/bpf_jit_enable").unwrap_or_else(|| "?".into()),
        read_trim("/proc/sys/kernel/bpf_stats_enabled").unwrap_or_else(|| "?".into()),
        read_trim("/sys/devices/system/clocksource/clocksource0/current_clocksource")
            .unwrap_or_else(|| "?".into()),
    );
    println!(
        "method:  {} rounds x {} calls per path, paths taking turns every {CHUNK} calls, after {} \
         warm-up calls per path;",
        opts.rounds, opts.iters, opts.warmup
    );
    println!(
        "         ns = the kernel's per-call duration (program run plus one clock read); every \
         verdict checked; 59-byte Ethernet/IPv4/TCP frames"
    );
}

/// The reference path each of our paths is measured against.
fn ref_of(k: Kind) -> Option<RefKind> {
    match k {
        Kind::Floor => Some(RefKind::Pass),
        Kind::NonService => Some(RefKind::ParseLookup),
        Kind::Established(_) | Kind::Reply(_) => Some(RefKind::DnatCtHit),
        Kind::Extra(Extra::SctpInitAck) | Kind::NewFlow(_) => Some(RefKind::DnatCtMiss),
        Kind::Extra(_) => Some(RefKind::DnatCtHit),
        Kind::Ref(_) => None,
    }
}

fn print_results(out: &Outcome) {
    let med_of = |p: &PathBench| {
        let mut s = p.samples.clone();
        s.sort_unstable();
        median(&s)
    };
    let floor = out
        .paths
        .iter()
        .find(|p| p.kind == Kind::Floor)
        .map(med_of)
        .unwrap_or(0.0);
    let refs: HashMap<RefKind, f64> = out
        .paths
        .iter()
        .filter_map(|p| match p.kind {
            Kind::Ref(r) => Some((r, med_of(p))),
            _ => None,
        })
        .collect();
    println!();
    println!(
        "{:<27} {:>7} {:>7} {:>7} {:>5} {:>5} {:>8} {:>6} {:>18} {:>6}  round medians",
        "path",
        "calls",
        "median",
        "mean",
        "p10",
        "p90",
        "over fl",
        "x fl",
        "ref (over floor)",
        "x ref"
    );
    let mut over = HashMap::new();
    for p in &out.paths {
        let mut s = p.samples.clone();
        s.sort_unstable();
        let med = median(&s);
        let mean = s.iter().map(|&x| x as f64).sum::<f64>() / s.len() as f64;
        over.insert(p.kind, med - floor);
        let rounds = p
            .round_medians
            .iter()
            .map(|m| format!("{m:.0}"))
            .collect::<Vec<_>>()
            .join(" ");
        let (over_s, ratio_s) = if p.kind == Kind::Floor {
            ("-".to_string(), "1.00".to_string())
        } else {
            (
                format!("{:+.1}", med - floor),
                format!("{:.2}", med / floor),
            )
        };
        let (ref_s, xref_s) = match ref_of(p.kind).and_then(|r| Some((r, *refs.get(&r)?))) {
            Some((r, rm)) => (
                format!(
                    "{} {:+.0}",
                    match r {
                        RefKind::Pass => "pass",
                        RefKind::ParseLookup => "parse+lkup",
                        RefKind::Dnat => "dnat",
                        RefKind::DnatCtHit => "ct hit",
                        RefKind::DnatCtMiss => "ct miss",
                        RefKind::LeanMiss1 => "ct miss, lean entry",
                        RefKind::ShapeMiss1 | RefKind::ShapeMiss2 => "ct miss, our entry",
                        RefKind::ShapeHit => "ct hit, our entry",
                        RefKind::OneHit | RefKind::OneReply => "1 entry, hit",
                        RefKind::OneMiss => "1 entry, miss",
                        RefKind::TblHit => "array table, hit",
                        RefKind::TblMiss2 => "array table, miss",
                    },
                    rm - floor
                ),
                format!("{:.2}", med / rm),
            ),
            None => ("".into(), "".into()),
        };
        println!(
            "{:<27} {:>7} {:>7.1} {:>7.1} {:>5} {:>5} {:>8} {:>6} {:>18} {:>6}  {}",
            p.label,
            s.len(),
            med,
            mean,
            percentile(&s, 0.10),
            percentile(&s, 0.90),
            over_s,
            ratio_s,
            ref_s,
            xref_s,
            rounds
        );
    }
    println!(
        "(ns per packet; \"over fl\" = path median - floor median; \"ref\" = the matching \
         reference program's median over the floor; \"x ref\" = path median / reference median)"
    );
    let over_of = |k: Kind| over.get(&k).copied();
    if let (Some(rr), Some(miss), Some(s1), Some(s2)) = (
        over_of(Kind::NewFlow(NewKind::Rr2)),
        over_of(Kind::Ref(RefKind::DnatCtMiss)),
        over_of(Kind::Ref(RefKind::ShapeMiss1)),
        over_of(Kind::Ref(RefKind::ShapeMiss2)),
    ) {
        println!(
            "new flow (rr, 2 entries) {rr:+.0} over the floor = reference miss {miss:+.0} | our entry's \
             shape ({} B key, {} B value, {} entries) {:+.0} | a second insert {:+.0} | the rest \
             of our new-flow path {:+.0}",
            std::mem::size_of::<CtKey>(),
            std::mem::size_of::<CtVal>(),
            MAX_CT_ENTRIES,
            s1 - miss,
            s2 - s1,
            rr - s2
        );
    }
    if let (Some(rr1), Some(miss), Some(lean), Some(s1)) = (
        over_of(Kind::NewFlow(NewKind::Rr)),
        over_of(Kind::Ref(RefKind::DnatCtMiss)),
        over_of(Kind::Ref(RefKind::LeanMiss1)),
        over_of(Kind::Ref(RefKind::ShapeMiss1)),
    ) {
        let saving = if s1 > lean {
            format!("would save at most {:.0} ns of", s1 - lean)
        } else {
            "would save nothing measurable in this run on".to_string()
        };
        println!(
            "the least entry that loses no feature (IPv4 only: 16 B key, {REF_LEAN_VAL_SIZE} B \
             value, {MAX_CT_ENTRIES} entries), one insert: {lean:+.0} over the floor against \
             {s1:+.0} with our entry and {miss:+.0} with the minimal one ({:.2}x its cost over the \
             floor); a session \
             table of such entries {saving} our new flow rr {rr1:+.0}",
            lean / miss
        );
    }
    if let (Some(rr1), Some(rr2)) = (
        over_of(Kind::NewFlow(NewKind::Rr)),
        over_of(Kind::NewFlow(NewKind::Rr2)),
    ) {
        println!(
            "ours, new flow rr: one entry (an indexed endpoint) {rr1:+.0}, two entries {rr2:+.0} \
             ({:+.0})",
            rr1 - rr2
        );
    }
    if let (Some(hit), Some(one_hit), Some(one_reply), Some(s2), Some(one_miss)) = (
        over_of(Kind::Ref(RefKind::ShapeHit)),
        over_of(Kind::Ref(RefKind::OneHit)),
        over_of(Kind::Ref(RefKind::OneReply)),
        over_of(Kind::Ref(RefKind::ShapeMiss2)),
        over_of(Kind::Ref(RefKind::OneMiss)),
    ) {
        println!(
            "one entry per session instead of two (references, our entry's shape): a client's \
             packet {one_hit:+.0} and the endpoint's reply {one_reply:+.0} against {hit:+.0} for \
             either with two entries ({:+.0} / {:+.0} a packet); a new flow {one_miss:+.0} \
             against {s2:+.0} ({:+.0})",
            one_hit - hit,
            one_reply - hit,
            one_miss - s2
        );
    }
    if let Some(p) = out
        .paths
        .iter()
        .find(|p| p.kind == Kind::NewFlow(NewKind::Rr))
    {
        let mean = p.samples.iter().map(|&x| x as f64).sum::<f64>() / p.samples.len() as f64;
        let med = med_of(p);
        println!(
            "new-flow rate (rr, one core, datapath time): {:.0} flows/s by the median, {:.0} by \
             the mean ({mean:.0} ns)",
            1e9 / med,
            1e9 / mean
        );
    }
    println!();
    println!("targets (over the floor median; reported only, never enforced):");
    let mut targets = vec![
        (
            Kind::NonService,
            "non-service".to_string(),
            TARGET_NON_SERVICE_NS,
        ),
        (
            Kind::Established(Mode::Dnat),
            "established-flow DNAT".to_string(),
            TARGET_ESTABLISHED_NS,
        ),
    ];
    for m in MODES.iter().filter(|m| m.mode != Mode::Dnat) {
        targets.push((
            Kind::Established(m.mode),
            m.target_name.to_string(),
            m.target_ns,
        ));
    }
    for m in MODES.iter() {
        if let Some(l) = m.reply_label {
            targets.push((Kind::Reply(m.mode), l.to_string(), TARGET_ESTABLISHED_NS));
        }
    }
    targets.push((
        Kind::Extra(Extra::Est6),
        "established IPv6".into(),
        TARGET_ESTABLISHED6_NS,
    ));
    targets.push((
        Kind::Extra(Extra::Reply6),
        "reply IPv6".into(),
        TARGET_ESTABLISHED6_NS,
    ));
    targets.push((
        Kind::Extra(Extra::Sctp),
        "established SCTP DATA".into(),
        TARGET_SCTP_NS,
    ));
    targets.push((
        Kind::NewFlow(NewKind::Rr),
        "new flow (rr)".into(),
        TARGET_NEW_FLOW_NS,
    ));
    let rr = over
        .get(&Kind::NewFlow(NewKind::Rr))
        .copied()
        .unwrap_or(0.0);
    for k in [NewKind::Hash, NewKind::Persist, NewKind::Lc] {
        let label = NEW_FLOWS.iter().find(|n| n.0 == k).map_or("", |n| n.1);
        targets.push((
            Kind::NewFlow(k),
            format!("{label} ({TARGET_NEW_SEL_X}x rr)"),
            rr * TARGET_NEW_SEL_X,
        ));
    }
    for (kind, name, target) in targets {
        let Some(&o) = over.get(&kind) else { continue };
        println!(
            "  {name:<32} <= {target:>4.0} ns over floor: {o:>6.1} ns  {}",
            if o <= target { "MET" } else { "NOT MET" }
        );
    }
    println!();
    println!("programs (instructions the verifier processed; stack bytes per subprogram):");
    for (obj, name, insns, stack) in &out.progs {
        println!(
            "  {obj:<6} {name:<24} {:>9} insns  stack {stack}",
            insns.map_or("?".to_string(), |n| n.to_string())
        );
    }
    if !out.soak.is_empty() {
        println!();
        println!("long run:");
        for l in &out.soak {
            println!("  {l}");
        }
    }
    if !out.full.is_empty() {
        println!();
        println!("session table full:");
        for l in &out.full {
            println!("  {l}");
        }
    }
    println!();
    for n in &out.notes {
        println!("note: {n}");
    }
}

fn main() {
    let opts = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("bench: {e}\n{USAGE}");
            exit(2);
        }
    };
    if unsafe { libc::geteuid() } != 0 {
        eprintln!(
            "bench: needs root (it loads BPF programs and creates a network namespace); \
             run it as root, e.g. `sudo ./target/release/bench`"
        );
        exit(2);
    }
    print_header(&opts);
    unsafe {
        libc::signal(
            libc::SIGINT,
            on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
        libc::signal(
            libc::SIGTERM,
            on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
    }
    let ns = fib_netns(&format!("lxbench-{}", std::process::id()));
    let path = format!("/var/run/netns/{}", ns.name);
    let result = std::thread::spawn(move || -> Result<Outcome> {
        // BPF_PROG_TEST_RUN does its FIB lookups in the caller's namespace.
        enter(&path)?;
        bench(&opts)
    })
    .join();
    // The namespace goes whatever happened in the thread.
    drop(ns);
    match result {
        Ok(Ok(out)) => print_results(&out),
        Ok(Err(e)) => {
            eprintln!("bench: {e:#}");
            exit(1);
        }
        Err(_) => {
            eprintln!("bench: the benchmark thread panicked (message above)");
            exit(1);
        }
    }
}
