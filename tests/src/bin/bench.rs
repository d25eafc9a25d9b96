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
//!   endpoint selection, two conntrack inserts, DNAT, redirect).
//!
//! Every mode's flow is checked byte for byte before timing (SYN, ACK and,
//! where there is one, reply), and every timed verdict must be XDP_REDIRECT
//! (XDP_PASS for the floor and non-service).
//!
//! Runs in a namespace built by `fib::fib_netns`, so `bpf_fib_lookup`
//! resolves the endpoints and the client. Needs root.
//!
//! `bench [--iters N] [--rounds R] [--warmup W]`

use loxilb_tests::fib::verdict::{XDP_PASS, XDP_REDIRECT};
use std::{
    collections::{HashMap, HashSet},
    net::Ipv4Addr,
    process::{exit, Command},
    sync::atomic::{AtomicBool, Ordering},
    time::Instant,
};

use anyhow::{anyhow, bail, Context, Result};
use aya::programs::{TestRun, TestRunOptions, Xdp};
use loxilb_agent::{config, datapath::Datapath, rules::Rules};
use loxilb_common::{
    addr_filter_bit, ct_dir, lb_mode, prog_names, CtKey4, CtVal4, IPPROTO_TCP, MAX_CT_ENTRIES,
    SNAT_PORT_HI, SNAT_PORT_LO,
};
use loxilb_tests::{
    fib::{fib_netns, CLIENT_MAC, EP1_MAC, EP2_MAC, LB_TO_CLIENT_MAC, LB_TO_EP_MAC},
    netns::enter,
    packet::{diff, ipip_wrap, Frame, ACK, SYN},
};

const VIP: &str = "20.0.0.100";
const CLIENT: &str = "192.168.0.2";
const CLIENT_PORT: u16 = 40000;
const EP_PORT: u16 = 8080;

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
  - { name: onearm, vip: 20.0.0.100, port: 81, protocol: tcp, mode: onearm, endpoints: [{ ip: 10.0.1.10, port: 8080 }] }
  - { name: fullnat, vip: 20.0.0.100, port: 82, protocol: tcp, mode: fullnat, endpoints: [{ ip: 10.0.1.10, port: 8080 }] }
  - { name: dsr, vip: 20.0.0.100, port: 83, protocol: tcp, mode: dsr, endpoints: [{ ip: 10.0.1.10, port: 83 }] }
  - { name: dsr-ipip, vip: 20.0.0.100, port: 84, protocol: tcp, mode: dsr-ipip, endpoints: [{ ip: 10.0.1.10, port: 84 }] }
"#;

/// Targets, in ns over the floor's median (reported, never enforced).
const TARGET_ESTABLISHED_NS: f64 = 50.0;
const TARGET_NON_SERVICE_NS: f64 = 35.0;
/// Established flow of onearm, fullnat and L2 DSR.
const TARGET_MODE_NS: f64 = 60.0;
/// Established flow of IPIP DSR: half of Katran's ~150 ns per packet.
const TARGET_DSR_IPIP_NS: f64 = 75.0;

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
    /// Target of the established path: name, ns over floor, remark.
    target_name: &'static str,
    target_ns: f64,
    target_note: &'static str,
}

const MODES: [ModeSpec; 5] = [
    ModeSpec {
        mode: Mode::Dnat,
        rule: "web",
        lb_mode: lb_mode::DEFAULT,
        vport: 80,
        ep_port: EP_PORT,
        entries: 2,
        est_label: "established (DNAT)",
        reply_label: Some("reply (reverse NAT)"),
        target_name: "established-flow DNAT",
        target_ns: TARGET_ESTABLISHED_NS,
        target_note: "",
    },
    ModeSpec {
        mode: Mode::OneArm,
        rule: "onearm",
        lb_mode: lb_mode::ONEARM,
        vport: 81,
        ep_port: EP_PORT,
        entries: 2,
        est_label: "established (onearm)",
        reply_label: Some("reply (onearm)"),
        target_name: "established onearm",
        target_ns: TARGET_MODE_NS,
        target_note: "",
    },
    ModeSpec {
        mode: Mode::FullNat,
        rule: "fullnat",
        lb_mode: lb_mode::FULLNAT,
        vport: 82,
        ep_port: EP_PORT,
        entries: 2,
        est_label: "established (fullnat)",
        reply_label: Some("reply (fullnat)"),
        target_name: "established fullnat",
        target_ns: TARGET_MODE_NS,
        target_note: "",
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
        target_note: "",
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
        target_note: "  (0.5x Katran's ~150 ns per packet)",
    },
];

/// New-flow sessions are left in the table; once this many flows (two
/// entries each) are live, the table is cleared between rounds (and the
/// established flow put back), so it never fills and evicts the flows
/// being timed. A default run stays below it.
const NEW_FLOW_BUDGET: usize = MAX_CT_ENTRIES as usize / 4;

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
}

const USAGE: &str = "usage: bench [--iters N] [--rounds R] [--warmup W]
  --iters N    timed calls per path per round (default 20000)
  --rounds R   interleaved rounds (default 5)
  --warmup W   untimed calls per path before the first round (default 10000)
Needs root (loads BPF programs, creates a network namespace).";

fn parse_args() -> Result<Opts, String> {
    let mut o = Opts {
        iters: 20_000,
        rounds: 5,
        warmup: 10_000,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let slot = match a.as_str() {
            "--iters" => &mut o.iters,
            "--rounds" => &mut o.rounds,
            "--warmup" => &mut o.warmup,
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
    NonService,
    Established(Mode),
    Reply(Mode),
    NewFlow,
}

struct PathBench {
    kind: Kind,
    label: &'static str,
    prog: &'static str,
    verdict: u32,
    /// The packet every call gets (empty for the new-flow path, whose
    /// packets are all different).
    packet: Vec<u8>,
    /// VIP port of the rule whose counters its packets go to.
    rule_port: Option<u16>,
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
        rule_port: Option<u16>,
    ) -> Self {
        PathBench {
            kind,
            label,
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

/// Source 100.64.0.0/20 x ports 1024.. : distinct for every `i` below 264M.
fn new_flow_frame(i: usize) -> Vec<u8> {
    let src = format!("100.64.{}.{}", (i >> 8) & 0x0f, i & 0xff);
    let sport = 1024 + (i >> 12) as u16;
    Frame::tcp(&src, sport, VIP, 80, SYN).bytes()
}

fn ip_u32(s: &str) -> u32 {
    u32::from_ne_bytes(s.parse::<Ipv4Addr>().unwrap().octets())
}

/// An address as the maps store it (network order) -> dotted quad.
fn ip_str(a: u32) -> String {
    Ipv4Addr::from(a.to_ne_bytes()).to_string()
}

/// Source port of an untagged Ethernet/IPv4/TCP frame without IP options.
fn src_port(frame: &[u8]) -> u16 {
    u16::from_be_bytes([frame[34], frame[35]])
}

/// Coarse monotonic time, the clock the datapath stamps sessions with
/// (`bpf_ktime_get_coarse_ns` reads CLOCK_MONOTONIC_COARSE).
fn coarse_now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
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
    entries: Vec<(CtKey4, CtVal4)>,
    /// The client's ACK, and the endpoint's reply if it comes through us.
    ack: Vec<u8>,
    reply: Option<Vec<u8>>,
    note: String,
}

/// Create `m`'s session with a SYN from the client, and check the SYN, an
/// ACK and (where there is one) the endpoint's reply byte for byte.
fn open_flow(dp: &mut Datapath, m: &ModeSpec) -> Result<Flow> {
    let main = prog_names::XDP_MAIN;
    let before: HashSet<CtKey4> = dp.sessions()?.into_iter().map(|(k, _)| k).collect();
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
    let entries: Vec<(CtKey4, CtVal4)> = dp
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
    let fwd_key = CtKey4 {
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
    let ep = ip_str(if dsr { fwd.dsr_ep } else { fwd.xdaddr });
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
                _ if cfg.fullnat_src != 0 => ip_str(cfg.fullnat_src),
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
    // Pin to the CPU we are on: per-CPU counters, LRU lists and caches stay put.
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

    let t0 = Instant::now();
    let mut dp = Datapath::load(None).context("loading the datapath")?;
    let rules = config::parse("bench.yaml", RULES).map_err(|e| anyhow!("{e}"))?;
    Rules::adopt(vec![])
        .apply(&rules, &mut dp)
        .context("installing the benchmark rules")?;
    notes.push(format!(
        "datapath loaded and {} rules installed in {} ms",
        rules.len(),
        t0.elapsed().as_millis()
    ));

    // A non-service packet that misses the address pre-filter (as almost
    // all non-service traffic does), so it takes the cheap exit.
    let ours: Vec<u32> = rules
        .iter()
        .flat_map(|r| {
            std::iter::once(u32::from_ne_bytes(r.vip.octets())).chain(
                r.endpoints
                    .iter()
                    .map(|e| u32::from_ne_bytes(e.ip.octets())),
            )
        })
        .collect();
    let filtered = |a: u32| {
        ours.iter()
            .any(|o| addr_filter_bit(*o) == addr_filter_bit(a))
    };
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
    // Kept so a table clear (see NEW_FLOW_BUDGET) can put the flows back.
    let established_entries: Vec<(CtKey4, CtVal4)> = MODES
        .iter()
        .flat_map(|m| flows[&m.mode].entries.iter().copied())
        .collect();

    let mut paths = vec![
        // The floor program gets the very packet the DNAT established path does.
        PathBench::new(
            Kind::Floor,
            "floor (XDP_PASS only)",
            prog_names::XDP_PASS,
            XDP_PASS,
            dnat_ack,
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
            Some(m.vport),
        ));
        if let (Some(label), Some(reply)) = (m.reply_label, &f.reply) {
            paths.push(PathBench::new(
                Kind::Reply(m.mode),
                label,
                prog_names::XDP_MAIN,
                XDP_REDIRECT,
                reply.clone(),
                Some(m.vport),
            ));
        }
    }
    paths.push(PathBench::new(
        Kind::NewFlow,
        "new flow (session create)",
        prog_names::XDP_MAIN,
        XDP_REDIRECT,
        vec![],
        Some(MODES[0].vport),
    ));

    let mut next_flow = 0usize;
    let mut live_flows = 0usize;
    let mut clears = 0usize;
    let mut run_path = |dp: &mut Datapath, p: &mut PathBench, n: usize, timed: bool| {
        let what = p.label;
        let out = if timed { Some(&mut p.samples) } else { None };
        let r = match p.kind {
            Kind::NewFlow => {
                if live_flows + n > NEW_FLOW_BUDGET {
                    dp.clear_sessions()?;
                    // Stamped now, so none of them looks idle when it is put back.
                    let now = coarse_now_ns();
                    for (k, v) in &established_entries {
                        dp.insert_session(
                            *k,
                            CtVal4 {
                                last_seen_ns: now,
                                ..*v
                            },
                        )?;
                    }
                    live_flows = 0;
                    clears += 1;
                }
                let frames: Vec<Vec<u8>> = (next_flow..next_flow + n).map(new_flow_frame).collect();
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

    // Rule ids by VIP port, for the per-rule counters.
    let rule_of_port: HashMap<u16, u32> = dp
        .services()?
        .into_iter()
        .filter(|(k, _)| k.addr == ip_u32(VIP) && k.proto == IPPROTO_TCP)
        .map(|(k, v)| (u16::from_be(k.port), v.rule_id))
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
    let main_paths = paths.iter().filter(|p| p.kind != Kind::Floor).count() as u64;
    let hit_paths = paths
        .iter()
        .filter(|p| matches!(p.kind, Kind::Established(_) | Kind::Reply(_)))
        .count() as u64;
    let mut bad = vec![];
    for (k, want) in [
        ("rx", main_paths * calls),
        ("new_session", calls),
        ("ct_hit", hit_paths * calls),
        ("fwd_redirect", (hit_paths + 1) * calls),
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
    ] {
        if delta(k) != want {
            bad.push(format!("{k} +{} (want +{want})", delta(k)));
        }
    }
    // Each mode's packets were counted by its own rule.
    let mut per_rule = vec![];
    for m in &MODES {
        let id = *rule_of_port
            .get(&m.vport)
            .ok_or_else(|| anyhow!("rule {} ({VIP}:{}) is not installed", m.rule, m.vport))?;
        let got = rule_end.get(&id).map_or(0, |s| s.packets)
            - rule_start.get(&id).map_or(0, |s| s.packets);
        let want = calls
            * paths
                .iter()
                .filter(|p| p.rule_port == Some(m.vport))
                .count() as u64;
        if got != want {
            bad.push(format!("rule {} packets +{got} (want +{want})", m.rule));
        }
        per_rule.push(format!("{} +{got}", m.rule));
    }
    if !bad.is_empty() {
        bail!(
            "the datapath counters of the timed calls do not match the paths: {}",
            bad.join(", ")
        );
    }
    notes.push(format!(
        "counters over the timed calls as expected: rx +{}, new_session +{calls}, ct_hit +{}, \
         fwd_redirect +{}, pass_not_service +{calls}, no drops; rule packets: {}",
        main_paths * calls,
        hit_paths * calls,
        (hit_paths + 1) * calls,
        per_rule.join(", ")
    ));
    notes.push(format!(
        "{} distinct new flows created ({} sessions in the table at the end{})",
        next_flow,
        dp.sessions()?.len(),
        if clears > 0 {
            format!("; table cleared {clears} time(s) to stay under half full")
        } else {
            String::new()
        }
    ));
    notes.push(format!(
        "timed phase: {:.1} s wall clock for {} calls",
        elapsed.as_secs_f64(),
        calls * paths.len() as u64
    ));
    Ok(Outcome { paths, notes })
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

fn print_results(out: &Outcome) {
    let floor = out
        .paths
        .iter()
        .find(|p| p.kind == Kind::Floor)
        .map(|p| {
            let mut s = p.samples.clone();
            s.sort_unstable();
            median(&s)
        })
        .unwrap_or(0.0);
    println!();
    println!(
        "{:<27} {:>7} {:>8} {:>8} {:>6} {:>6} {:>11} {:>8}  round medians",
        "path", "calls", "median", "mean", "p10", "p90", "over floor", "x floor"
    );
    let mut over = std::collections::HashMap::new();
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
        println!(
            "{:<27} {:>7} {:>8.1} {:>8.1} {:>6} {:>6} {:>11} {:>8}  {}",
            p.label,
            s.len(),
            med,
            mean,
            percentile(&s, 0.10),
            percentile(&s, 0.90),
            over_s,
            ratio_s,
            rounds
        );
    }
    println!("(ns per packet; \"over floor\" = path median - floor median)");
    println!();
    println!("targets (over the floor median; reported only, never enforced):");
    let mut targets = vec![
        (
            Kind::Established(Mode::Dnat),
            "established-flow DNAT",
            TARGET_ESTABLISHED_NS,
            "",
        ),
        (Kind::NonService, "non-service", TARGET_NON_SERVICE_NS, ""),
    ];
    for m in MODES.iter().filter(|m| m.mode != Mode::Dnat) {
        targets.push((
            Kind::Established(m.mode),
            m.target_name,
            m.target_ns,
            m.target_note,
        ));
    }
    for (kind, name, target, remark) in targets {
        let Some(&o) = over.get(&kind) else { continue };
        println!(
            "  {name:<22} <= {target:.0} ns over floor: {o:.1} ns  {}{remark}",
            if o <= target { "MET" } else { "NOT MET" }
        );
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
