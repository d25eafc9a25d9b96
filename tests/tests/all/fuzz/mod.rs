//! Packet fuzzing through BPF_PROG_TEST_RUN, every verdict checked by an
//! oracle that does not use the datapath's code (see `fuzz/oracle.rs` for
//! the properties, `fuzz/gen.rs` for the frames).
//!
//! One datapath, loaded with a rule of every mode (default, onearm,
//! fullnat, dsr, dsr-ipip; IPv4, IPv6 and NAT64; TCP, UDP and SCTP), takes
//! the whole sequence, so sessions made by earlier packets are there for
//! the replies and ICMP errors of later ones. Every fourth packet goes
//! through the TC program instead of XDP (same maps, same sessions).
//!
//! CI runs 50,000 packets with a fixed seed; `scripts/fuzz.sh` runs a
//! million (`LOXILB_FUZZ_PACKETS`, `LOXILB_FUZZ_SEED`). A failure prints
//! the seed and the packet's index (the run replays with the same seed and
//! `LOXILB_FUZZ_PACKETS=index+1`) and the input and output in hex.

pub mod gen;
pub mod oracle;
pub mod rng;

use std::collections::BTreeMap;
use std::time::Instant;

use self::{
    gen::Gen,
    oracle::{rules, to_hex, yaml, Oracle, Why, SCTP, TCP, UDP},
};
use aya::programs::{TestRun, TestRunOptions, TestRunResult};
use loxilb_tests::{fib, need_root};

const CI_PACKETS: u64 = 50_000;
const CI_SEED: u64 = 0x10c5_1b17;
/// Failures reported in full before the run stops.
const MAX_FAILURES: usize = 10;

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(s) => {
            let s = s.trim();
            let r = match s.strip_prefix("0x") {
                Some(h) => u64::from_str_radix(h, 16),
                None => s.parse(),
            };
            r.unwrap_or_else(|e| panic!("{name}={s}: not a number ({e})"))
        }
        Err(_) => default,
    }
}

/// BPF_PROG_TEST_RUN of `prog` on `input`; the kernel's error, if any.
fn test_run<P>(prog: &P, input: &[u8]) -> Result<(u32, Vec<u8>), String>
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult>,
{
    let mut out = vec![0u8; input.len() + 256];
    let r = prog
        .test_run(TestRunOptions {
            data_in: Some(input),
            data_out: Some(&mut out),
            ..Default::default()
        })
        .map_err(|e| format!("{e:?}"))?;
    out.truncate(r.data_size_out as usize);
    Ok((r.return_value, out))
}

/// Every TC_SHARE-th packet goes through the TC program instead of XDP.
const TC_SHARE: u64 = 4;

/// Whether BPF_PROG_TEST_RUN runs a TC program on the frame: the kernel
/// refuses (EINVAL) an IPv4 or IPv6 frame too short for the IP header
/// (bpf_prog_test_run_skb pulls it before the program runs), which then
/// goes through XDP.
fn skb_test_run_takes(frame: &[u8]) -> bool {
    match frame.get(12..14) {
        Some([0x08, 0x00]) => frame.len() >= 14 + 20,
        Some([0x86, 0xdd]) => frame.len() >= 14 + 40,
        Some(_) => true,
        None => false,
    }
}

/// A TC verdict as the XDP verdict of the same meaning: OK is PASS, SHOT
/// is DROP, REDIRECT is REDIRECT — or TX when it goes back out where it
/// came from (an echo reply, the MACs swapped; a frame forwarded to the
/// client may have the MACs of its input swapped too). Anything else stays out
/// of the XDP range (property 5).
fn tc_as_xdp(v: u32, input: &[u8], out: &[u8]) -> u32 {
    use fib::verdict::*;
    const TC_ACT_SHOT: u32 = 2;
    match v {
        TC_ACT_OK => XDP_PASS,
        TC_ACT_SHOT => XDP_DROP,
        TC_ACT_REDIRECT
            if out.len() >= 12
                && out[0..6] == input[6..12]
                && out[6..12] == input[0..6]
                && is_echo_reply(out) =>
        {
            XDP_TX
        }
        TC_ACT_REDIRECT => XDP_REDIRECT,
        v => 1000 + v,
    }
}

fn is_echo_reply(frame: &[u8]) -> bool {
    oracle::view(frame).is_some_and(|v| {
        v.l4.first() == Some(&if v.v6 { 129 } else { 0 })
            && v.proto == if v.v6 { oracle::ICMP6 } else { oracle::ICMP }
    })
}

fn verdict_name(v: u32) -> String {
    use fib::verdict::*;
    match v {
        XDP_DROP => "DROP".into(),
        XDP_PASS => "PASS".into(),
        XDP_TX => "TX".into(),
        XDP_REDIRECT => "REDIRECT".into(),
        v => format!("verdict-{v}"),
    }
}

fn proto_name(p: u8) -> &'static str {
    match p {
        TCP => "tcp",
        UDP => "udp",
        SCTP => "sctp",
        _ => "other",
    }
}

#[test]
fn fuzzed_frames_through_the_datapath_satisfy_the_oracle() {
    if !need_root("fuzzed_frames_through_the_datapath_satisfy_the_oracle") {
        return;
    }
    let packets = env_u64("LOXILB_FUZZ_PACKETS", CI_PACKETS);
    let seed = env_u64("LOXILB_FUZZ_SEED", CI_SEED);
    eprintln!("fuzz: {packets} packets, seed {seed:#x} (LOXILB_FUZZ_SEED={seed:#x} LOXILB_FUZZ_PACKETS={packets} to replay)");
    let rules = rules();
    let file = yaml(&rules);
    fib::with_datapath("fuzz", &file, move |dp| {
        let mut gen = Gen::new(seed, rules.clone());
        let mut oracle = Oracle::new(rules);
        let mut verdicts: BTreeMap<String, u64> = BTreeMap::new();
        let mut kinds: BTreeMap<String, u64> = BTreeMap::new();
        let mut whys: BTreeMap<String, u64> = BTreeMap::new();
        let mut mutated = 0u64;
        let mut failures = vec![];
        let t0 = Instant::now();
        let mut run = 0;
        for i in 0..packets {
            run = i + 1;
            let (kind, input, muts) = gen.packet(&oracle.sessions.list);
            *kinds.entry(format!("{kind:?}")).or_default() += 1;
            if !muts.is_empty() {
                mutated += 1;
            }
            // One packet in TC_SHARE through the TC program (its verdict
            // read as the XDP one it stands for).
            let tc = i % TC_SHARE == TC_SHARE - 1 && skb_test_run_takes(&input);
            let fail = |what: String, v: Option<u32>, out: &[u8]| {
                format!(
                    "seed {seed:#x} packet {i} ({kind:?}, mutations {muts:?}, {}): {what}\n  verdict {}\n  input  {}\n  output {}",
                    if tc { "TC" } else { "XDP" },
                    v.map(verdict_name).unwrap_or_else(|| "-".into()),
                    to_hex(&input),
                    to_hex(out)
                )
            };
            let r = if tc {
                test_run(dp.tc_program().expect("the TC program"), &input)
                    .map(|(v, out)| (tc_as_xdp(v, &input, &out), out))
            } else {
                test_run(
                    dp.xdp_program(loxilb_common::prog_names::XDP_MAIN)
                        .expect("the XDP program"),
                    &input,
                )
            };
            let hook = if tc { "TC" } else { "XDP" };
            let (v, out) = match r {
                Ok(r) => r,
                Err(e) => {
                    failures.push(fail(
                        format!("property 4: BPF_PROG_TEST_RUN failed: {e}"),
                        None,
                        &[],
                    ));
                    if failures.len() >= MAX_FAILURES {
                        break;
                    }
                    continue;
                }
            };
            *verdicts
                .entry(format!("{hook} {}", verdict_name(v)))
                .or_default() += 1;
            match oracle.check(&input, v, &out) {
                Ok(why) => {
                    let w = match why {
                        Why::Forward(rule) => format!("Forward {rule}"),
                        Why::Reply(p) => format!("Reply {}", proto_name(p)),
                        w => format!("{w:?}"),
                    };
                    *whys.entry(w).or_default() += 1
                }
                Err(e) => {
                    failures.push(fail(e, Some(v), &out));
                    if failures.len() >= MAX_FAILURES {
                        break;
                    }
                }
            }
        }
        let secs = t0.elapsed().as_secs_f64();
        let stats: BTreeMap<_, _> = dp
            .stats()
            .unwrap()
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .collect();
        eprintln!(
            "fuzz: {run} packets in {secs:.1} s ({:.0} packets/s), seed {seed:#x}, {} failures",
            run as f64 / secs,
            failures.len()
        );
        eprintln!("fuzz: verdicts {verdicts:?}");
        eprintln!("fuzz: generated as {kinds:?}; {mutated} mutated");
        eprintln!(
            "fuzz: oracle {whys:?}; {} sessions seen",
            oracle.sessions.list.len()
        );
        eprintln!("fuzz: datapath counters {stats:?}");
        assert!(
            failures.is_empty(),
            "{} failure(s) (the first {MAX_FAILURES} stop the run):\n{}",
            failures.len(),
            failures.join("\n")
        );
        assert_eq!(run, packets, "every packet was run");
        // The sample reached every kind of path: every rule translated,
        // replies of every protocol, echo answered, ICMP errors
        // translated, dropped, passed.
        let mut want: Vec<String> = ["Echo", "IcmpError", "Untouched", "Dropped"]
            .iter()
            .map(|w| w.to_string())
            .collect();
        want.extend(
            oracle::rules()
                .iter()
                .map(|r| format!("Forward {}", r.name)),
        );
        want.extend(["tcp", "udp", "sctp"].iter().map(|p| format!("Reply {p}")));
        for w in want {
            assert!(
                whys.get(&w).copied().unwrap_or(0) > 0 || packets < 10_000,
                "no packet of the run was {w}: {whys:?}"
            );
        }
    });
}
